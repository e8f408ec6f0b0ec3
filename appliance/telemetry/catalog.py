"""METRICS: every figure the daemon reports, one row each, in the order it reports them.

A row says where the figure stands in the JSON snapshot (`key`, "wal.commits"
for snapshot["wal"]["commits"]), how it is read from what a snapshot gathers
(metrics.Sources), the Prometheus families made from it, and its words in the
text summary: the line it shows on (SUMMARY_LINES), a phrase on that line, and
notes under it. appliance/telemetry/metrics.py builds the snapshot and renders
it from this table alone, so adding a figure is adding a row here.
"""

from __future__ import annotations

import os
import string
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from appliance import __version__
from appliance.telemetry.figures import percentile

if TYPE_CHECKING:
    from appliance.net.snapshot import Snapshot
    from appliance.telemetry.metrics import Sources

COUNTER = "counter"
GAUGE = "gauge"
TEXT_IDENTITIES = 20  # the summary lists the busiest few; json and prometheus list all
NOTE = " " * 13  # a note under a summary line starts below that line's figures

# -- Prometheus families -----------------------------------------------------------------

Samples = Iterable[tuple[dict[str, str], Any]]  # (labels, value); a None value is left out


def _plain(value: Any, snapshot: dict) -> Samples:
    """One sample without labels: the figure itself."""
    return [({}, value)]


def _converted(convert: Callable[[Any], Any]) -> Callable[[Any, dict], Samples]:
    """One sample without labels: the figure converted."""
    return lambda value, snapshot: [({}, convert(value))]


def _each(label: str, field: str | None = None) -> Callable[[Any, dict], Samples]:
    """One sample per key of a {name: figure} (or {name: {field: figure}}) mapping."""

    def samples(value: dict, snapshot: dict) -> Samples:
        return [({label: k}, v if field is None else v.get(field)) for k, v in value.items()]

    return samples


def _info(value: Any, snapshot: dict) -> Samples:
    return [({"version": snapshot["version"], "board": snapshot["board"]}, 1)]


@dataclass(frozen=True)
class Family:
    """A Prometheus metric family made from one row's figure."""

    name: str  # after PREFIX
    kind: str  # COUNTER or GAUGE
    help: str
    samples: Callable[[Any, dict], Samples] = _plain  # from (figure, whole snapshot)


# -- the text summary ---------------------------------------------------------------

# its lines in order (below the title), and what joins the phrases on each
SUMMARY_LINES = {
    "frames": ", ",
    "connections": ", ",
    "nacks": ", ",
    "errors": ", ",
    "ring": " ",
    "wal": ", ",
    "subscribers": ", ",
    "process": ", ",
    "disk": " ",
    "identities": ", ",
}


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


class _Words(string.Formatter):
    """str.format with the summary's own format specs ({:size}, {:ms}, ...)."""

    SPECS: dict[str, Callable[[Any], str]] = {
        "size": _size,
        "ms": lambda ms: "-" if ms is None else f"{ms:.1f} ms",
        "ratio": lambda ratio: f"{ratio * 100:.1f}%",
        "percent": lambda pct: "?" if pct is None else f"{pct:.1f}%",
        "codes": lambda counts: " ".join(f"{c}={n}" for c, n in counts.items()) or "none",
        "behind": lambda lags: (
            ", ".join(f"{n} {_size(b)} behind" for n, b in lags.items()) or "none"
        ),
    }

    def format_field(self, value: Any, format_spec: str) -> str:
        special = self.SPECS.get(format_spec)
        return special(value) if special else super().format_field(value, format_spec)


WORDS = _Words()


def _notes_if(template: str) -> Callable[[Any], list[str]]:
    """A note under the summary line while the figure is true (non-zero, set)."""
    return lambda value: [NOTE + WORDS.format(template, value)] if value else []


def _failing(subscribers: dict[str, dict]) -> list[str]:
    return [
        f"{NOTE}{name} failing: {sub.get('last_error')}"
        for name, sub in subscribers.items()
        if sub.get("failing")
    ]


def _busiest(identities: dict[str, dict]) -> list[str]:
    idents = sorted(identities.items(), key=lambda kv: -kv[1]["frames"])
    if not idents:
        return []
    lines = ["identities"]
    width = max(len(i) for i, _ in idents[:TEXT_IDENTITIES])
    for ident, v in idents[:TEXT_IDENTITIES]:
        state = "connected" if v["connected"] else ""
        lines.append(f"  {ident:<{width}}  {v['frames']:>10} frames  {state}".rstrip())
    if len(idents) > TEXT_IDENTITIES:
        lines.append(f"  ... and {len(idents) - TEXT_IDENTITIES} more")
    return lines


# -- the table ----------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """One figure: its JSON place, how it is read, and what Prometheus and the summary show."""

    key: str  # its place in the JSON snapshot: "wal.commits" is snapshot["wal"]["commits"]
    read: Callable[[Sources], Any]
    families: tuple[Family, ...] = ()  # what Prometheus gets of it
    line: str | None = None  # the summary line it shows on (SUMMARY_LINES)
    phrase: str | None = None  # its words on that line, a WORDS format of the figure
    notes: Callable[[Any], list[str]] | None = None  # lines under that line, from the figure
    # a row per identity: only in a snapshot asked for with identities, because building
    # and encoding 10,000 rows holds the loop for tens of milliseconds
    per_identity: bool = False


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000


def _by_code(counters, prefix: str) -> dict[str, int]:
    return {k[len(prefix) :]: v for k, v in sorted(counters.items()) if k.startswith(prefix)}


def _identities(daemon: Snapshot) -> dict[str, dict[str, Any]]:
    stored, connected = daemon.identities.frames, daemon.identities.connected
    return {
        i: {"frames": stored.get(i, 0), "connected": i in connected}
        for i in sorted(stored.keys() | connected)
    }


SUBSCRIBER = "subscriber"
METRICS: tuple[Metric, ...] = (
    Metric(
        "version",
        lambda s: __version__,
        (Family("info", GAUGE, "Version and board profile.", _info),),
    ),
    Metric("board", lambda s: s.board),
    Metric("pid", lambda s: os.getpid()),
    Metric("time", lambda s: round(time.time(), 3)),  # unix seconds
    Metric(
        "uptime_seconds",
        lambda s: round(s.daemon.uptime_seconds, 3),
        (Family("uptime_seconds", GAUGE, "Seconds since the daemon started."),),
    ),
    Metric(
        "frames",
        lambda s: s.daemon.counters["frames"],
        (Family("frames_total", COUNTER, "Frames stored since start."),),
        "frames",
        "{} stored",
    ),
    Metric(
        "bytes_in",
        lambda s: s.daemon.counters["bytes_in"],
        (Family("bytes_in_total", COUNTER, "Bytes received from cores since start."),),
        "frames",
        "{:size} in",
    ),
    Metric(
        "rate",  # frames/s over the last rate_seconds, at most RATE_WINDOW
        lambda s: round(s.rate.per_second(), 2),
        (Family("frames_per_second", GAUGE, "Ingest rate over the last seconds."),),
        "frames",
        "{:.1f} frames/s",
    ),
    Metric("rate_seconds", lambda s: round(s.rate.span(), 2)),
    Metric(
        "replays",
        lambda s: s.daemon.counters["replays"],
        (Family("replays_total", COUNTER, "Replayed frames refused since start."),),
        "frames",
        "{} replays refused",
    ),
    Metric(
        "connections.open",
        lambda s: s.daemon.connections,
        (Family("connections_open", GAUGE, "Open core connections."),),
        "connections",
        "{} open",
    ),
    Metric(
        "connections.authenticated",
        lambda s: s.daemon.authenticated,
        (Family("connections_authenticated", GAUGE, "Authenticated connections."),),
        "connections",
        "{} authenticated",
    ),
    Metric(
        "connections.paused",
        lambda s: s.daemon.paused,
        (Family("connections_paused", GAUGE, "Connections not being read."),),
        "connections",
        "{} paused",
    ),
    Metric(
        "connections.accepted",
        lambda s: s.daemon.counters["connections"],
        (Family("connections_accepted_total", COUNTER, "Connections accepted since start."),),
        "connections",
        "{} accepted since start",
    ),
    # closed in the handshake to make room for newer ones
    Metric("connections.evicted", lambda s: s.daemon.counters["evicted"]),
    Metric(
        "identities",  # {identity: {frames (stored since start), connected}}
        lambda s: _identities(s.daemon),
        (
            Family(
                "identity_frames_total",
                COUNTER,
                "Frames stored per identity since start.",
                _each("identity", "frames"),
            ),
            Family(
                "identity_connected",
                GAUGE,
                "Whether the identity has a connection now.",
                _each("identity", "connected"),
            ),
        ),
        "identities",
        notes=_busiest,
        per_identity=True,
    ),
    Metric(
        "nacks",  # {CODE: count} since start
        lambda s: _by_code(s.daemon.counters, "nack."),
        (Family("nacks_total", COUNTER, "NACKs sent, by code.", _each("code")),),
        "nacks",
        "{:codes}",
    ),
    Metric(
        "errors",
        lambda s: _by_code(s.daemon.counters, "error."),
        (Family("errors_total", COUNTER, "ERRORs sent, by code.", _each("code")),),
        "errors",
        "{:codes}",
    ),
    Metric(
        "ring.pending_bytes",  # not yet durable
        lambda s: s.daemon.store.pending_bytes,
        (Family("ring_pending_bytes", GAUGE, "Ring bytes not yet durable."),),
        "ring",
        "{:size}",
    ),
    Metric(
        "ring.capacity_bytes",
        lambda s: s.daemon.store.ring_bytes,
        (Family("ring_capacity_bytes", GAUGE, "Size of the ring."),),
        "ring",
        "of {:size} pending",
    ),
    Metric(
        "ring.fill",  # 0..1
        lambda s: round(s.daemon.store.pending_bytes / s.daemon.store.ring_bytes, 4),
        (Family("ring_fill_ratio", GAUGE, "Ring bytes not yet durable over its size."),),
        "ring",
        "({:ratio})",
    ),
    # pending beyond this, the loop stops reading sockets
    Metric("ring.pause_bytes", lambda s: s.daemon.pause_bytes),
    Metric(
        "wal.segments",
        lambda s: s.segments[0],
        (Family("wal_segments", GAUGE, "WAL segment files."),),
        "wal",
        "{} segments",
    ),
    Metric(
        "wal.bytes_on_disk",  # preallocated size included
        lambda s: s.segments[1],
        (Family("wal_bytes", GAUGE, "Bytes in WAL segment files."),),
        "wal",
        "{:size}",
    ),
    Metric(
        "wal.frames_stored",
        lambda s: s.daemon.store.frames,
        (Family("wal_frames_stored", GAUGE, "Frames in the store."),),
    ),
    Metric(
        "wal.dropped_frames",
        lambda s: s.daemon.store.dropped_frames,
        (
            Family(
                "wal_dropped_frames_total",
                COUNTER,
                "Oldest frames dropped to make room (overflow = drop-oldest).",
            ),
        ),
        "wal",
        notes=_notes_if("{} oldest frames dropped (overflow)"),
    ),
    Metric(
        "wal.full",
        lambda s: s.daemon.store.full,
        (Family("wal_full", GAUGE, "1 while the store refuses frames for lack of space."),),
        "wal",
        notes=_notes_if("storage full: new frames get BUSY"),
    ),
    Metric(
        "wal.commits",
        lambda s: s.daemon.store.commits,
        (Family("wal_commits_total", COUNTER, "Commits (write + fdatasync)."),),
        "wal",
        "{} commits",
    ),
    Metric(
        "wal.commit_p50_ms",  # None before the first commit
        lambda s: _ms(percentile(s.commit_seconds, 50)),
        (
            Family(
                "wal_commit_p50_seconds",
                GAUGE,
                "Median of recent commit times.",
                _converted(_seconds),
            ),
        ),
        "wal",
        "p50 {:ms}",
    ),
    Metric(
        "wal.commit_p99_ms",
        lambda s: _ms(percentile(s.commit_seconds, 99)),
        (
            Family(
                "wal_commit_p99_seconds",
                GAUGE,
                "99th percentile of recent commit times.",
                _converted(_seconds),
            ),
        ),
        "wal",
        "p99 {:ms}",
    ),
    Metric(
        "wal.commit_error",  # None, or the text of the last failure while commits fail
        lambda s: s.daemon.store.commit_error,
        (
            Family(
                "wal_commit_failing",
                GAUGE,
                "1 while the last commit attempt failed (disk full, I/O error).",
                _converted(lambda error: error is not None),
            ),
        ),
        "wal",
        notes=_notes_if("commit failing: {}"),
    ),
    Metric(
        "wal.stalled_seconds",
        lambda s: round(s.daemon.store.stalled_seconds, 3),
        (Family("wal_commit_stalled_seconds", GAUGE, "How long the commit in flight has run."),),
    ),
    Metric("wal.recovery_seconds", lambda s: round(s.daemon.store.recovery_seconds, 3)),
    Metric(
        "subscriber_lag_bytes",  # {subscriber: bytes}
        lambda s: s.lags,
        (
            Family(
                "subscriber_lag_bytes",
                GAUGE,
                "Bytes a subscriber is behind the WAL tail.",
                _each(SUBSCRIBER),
            ),
        ),
        "subscribers",
        "{:behind}",
    ),
    Metric(
        # {subscriber: {type, pid, restarts, lag_bytes, cpu_seconds, records, batches,
        #  failures, failing, last_error, last_error_time, and what its stats() adds}}
        "subscribers",
        lambda s: s.subscribers,
        (
            Family(
                "subscriber_records_total",
                COUNTER,
                "Records handled since its process started.",
                _each(SUBSCRIBER, "records"),
            ),
            Family(
                "subscriber_cpu_seconds_total",
                COUNTER,
                "CPU time of its process (user + system).",
                _each(SUBSCRIBER, "cpu_seconds"),
            ),
            Family(
                "subscriber_failures_total",
                COUNTER,
                "Failed batches or flushes since it started.",
                _each(SUBSCRIBER, "failures"),
            ),
            Family(
                "subscriber_restarts_total",
                COUNTER,
                "Times the daemon restarted its process.",
                _each(SUBSCRIBER, "restarts"),
            ),
            Family(
                "subscriber_failing",
                GAUGE,
                "1 while its last attempt failed (last_error in JSON).",
                _each(SUBSCRIBER, "failing"),
            ),
        ),
        "subscribers",
        notes=_failing,
    ),
    Metric(
        "process.rss_bytes",
        lambda s: s.process["rss_bytes"],
        (Family("process_rss_bytes", GAUGE, "Resident memory."),),
        "process",
        "rss {:size}",
    ),
    Metric(
        "process.cpu_percent",  # since the previous snapshot
        lambda s: s.process["cpu_percent"],
        (Family("process_cpu_percent", GAUGE, "CPU use since the last reading."),),
        "process",
        "cpu {:percent}",
    ),
    # collections per generation, pause_max_ms, pause_total_ms (gcwatch.py)
    Metric("process.gc", lambda s: s.process["gc"]),
    Metric("disk.path", lambda s: s.disk["path"], line="disk", phrase="{}:"),
    Metric(
        "disk.free_bytes",
        lambda s: s.disk["free_bytes"],
        (Family("disk_free_bytes", GAUGE, "Free bytes on the data dir's disk."),),
        "disk",
        "{:size} free",
    ),
    Metric(
        "disk.total_bytes",
        lambda s: s.disk["total_bytes"],
        (Family("disk_total_bytes", GAUGE, "Size of the data dir's file system."),),
        "disk",
        "of {:size}",
    ),
)
