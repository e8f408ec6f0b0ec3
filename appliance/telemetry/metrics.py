"""Metrics: one snapshot of the daemon's state, and its text and Prometheus renderings.

`snapshot(server)` runs on the loop thread and only reads: counters the loop
keeps anyway, the store's figures, a listing of the WAL directory, and a few
process and file-system figures from psutil. The dict it returns is JSON-able:

    version, board, pid, time (unix seconds), uptime_seconds
    frames, bytes_in, rate (frames/s over the last rate_seconds, at most RATE_WINDOW), replays
    connections: open, authenticated, paused, accepted, evicted (from the handshake, for room)
    identities: {identity: {frames, connected}}     frames stored since start
    nacks, errors: {CODE: count}                     since start
    ring: pending_bytes (not yet durable), capacity_bytes, fill (0..1),
          pause_bytes (pending beyond this, the loop stops reading sockets)
    wal: segments, bytes_on_disk (preallocated size included), frames_stored,
         dropped_frames, full, commits, commit_p50_ms, commit_p99_ms (None before the
         first commit), commit_error (None or text), stalled_seconds, recovery_seconds
    subscriber_lag_bytes: {subscriber: bytes}
    subscribers: {subscriber: {type, pid, restarts, lag_bytes, cpu_seconds, records, batches,
                  failures, failing, last_error, last_error_time, and what the
                  subscriber's stats() adds}}
    process: rss_bytes, cpu_percent (since the previous snapshot),
             gc: collections per generation, pause_max_ms, pause_total_ms (gcwatch.py)
    disk: path, free_bytes, total_bytes
"""

from __future__ import annotations

import math
import os
import time
import weakref
from collections import deque
from typing import Any

import psutil

from appliance import __version__
from appliance.telemetry import gcwatch
from appliance.telemetry.figures import duration, percentile

RATE_WINDOW = 5.0  # seconds of history behind `rate`
RATE_SAMPLES = 64  # bound on that history (the loop samples every 0.25 s)
SEGMENT_SUFFIX = ".wal"
PREFIX = "module_ingest_"


class RateMeter:
    """Rate of a growing count over a sliding window of (time, count) samples."""

    def __init__(self, window: float = RATE_WINDOW, maxlen: int = RATE_SAMPLES) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque(maxlen=maxlen)

    def sample(self, now: float, count: int) -> None:
        samples = self._samples
        samples.append((now, count))
        # keep one sample at or before the window's start, so the span covers the window
        while len(samples) > 2 and samples[1][0] <= now - self.window:
            samples.popleft()

    def span(self) -> float:
        """Seconds the samples cover: what per_second() averages over."""
        if len(self._samples) < 2:
            return 0.0
        return self._samples[-1][0] - self._samples[0][0]

    def per_second(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, c0), (t1, c1) = self._samples[0], self._samples[-1]
        if t1 <= t0:
            return 0.0
        return max(0, c1 - c0) / (t1 - t0)


# per server: its frame-rate meter and its psutil.Process (cpu_percent needs the same object)
_meters: weakref.WeakKeyDictionary[Any, RateMeter] = weakref.WeakKeyDictionary()
_process: psutil.Process | None = None


def install_rate_meter(server) -> RateMeter:
    """The server's frame-rate meter, sampled by a sweep hook; created on first call."""
    meter = _meters.get(server)
    if meter is None:
        meter = _meters[server] = RateMeter()
        counters = server.counters
        server.sweep_hooks.append(lambda now: meter.sample(now, counters["frames"]))
        _proc().cpu_percent(None)  # the first reading only starts psutil's interval
    return meter


def _proc() -> psutil.Process:
    global _process
    if _process is None or _process.pid != os.getpid():
        _process = psutil.Process()
    return _process


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _segments(directory) -> tuple[int, int]:
    count = size = 0
    try:
        entries = os.scandir(directory)
    except OSError:
        return 0, 0
    with entries:
        for entry in entries:
            if entry.name.endswith(SEGMENT_SUFFIX):
                try:
                    size += entry.stat().st_size
                except OSError:
                    continue  # deleted by retention meanwhile
                count += 1
    return count, size


def _by_code(counters, prefix: str) -> dict[str, int]:
    return {k[len(prefix) :]: v for k, v in sorted(counters.items()) if k.startswith(prefix)}


def _identities(server) -> dict[str, dict[str, Any]]:
    connected = server.by_identity
    idents = sorted(set(server.frames_by_identity) | set(connected))
    return {
        i: {"frames": server.frames_by_identity.get(i, 0), "connected": i in connected}
        for i in idents
    }


def _wal(server) -> dict[str, Any]:
    store = server.store
    # sorted() copies the deque in one C call: the committer cannot append midway
    latencies = sorted(store.commit_seconds)
    segments, size = _segments(store.directory)
    return {
        "segments": segments,
        "bytes_on_disk": size,
        "frames_stored": store.frames,
        "dropped_frames": store.dropped_frames,
        "full": store.full,
        "commits": store.commits,
        "commit_p50_ms": _ms(percentile(latencies, 50)),
        "commit_p99_ms": _ms(percentile(latencies, 99)),
        "commit_error": store.commit_error,
        "stalled_seconds": round(store.stalled_for(time.monotonic()), 3),
        "recovery_seconds": round(store.recovery_seconds, 3),
    }


def _process_figures() -> dict[str, Any]:
    proc = _proc()
    try:
        with proc.oneshot():
            return {
                "rss_bytes": proc.memory_info().rss,
                "cpu_percent": round(proc.cpu_percent(None), 1),
                "gc": gcwatch.figures(),
            }
    except psutil.Error:
        return {"rss_bytes": None, "cpu_percent": None, "gc": gcwatch.figures()}


def _disk(path) -> dict[str, Any]:
    try:
        usage = psutil.disk_usage(str(path))
    except OSError:
        return {"path": str(path), "free_bytes": None, "total_bytes": None}
    return {"path": str(path), "free_bytes": usage.free, "total_bytes": usage.total}


def snapshot(server) -> dict:
    """Everything the stats endpoint reports, as a JSON-able dict (see the module doc)."""
    counters = server.counters
    meter = _meters.get(server)
    store = server.store
    pending = store.pending_bytes()
    return {
        "version": __version__,
        "board": server.config.values["board"]["profile"],
        "pid": os.getpid(),
        "time": round(time.time(), 3),
        "uptime_seconds": round(time.monotonic() - server.started, 3),
        "frames": counters["frames"],
        "bytes_in": counters["bytes_in"],
        "rate": round(meter.per_second(), 2) if meter is not None else 0.0,
        "rate_seconds": round(meter.span(), 2) if meter is not None else 0.0,
        "replays": counters["replays"],
        "connections": {
            "open": len(server.conns),
            "authenticated": len(server.by_identity),
            "paused": len(server.paused),
            "accepted": counters["connections"],
            "evicted": counters["evicted"],
        },
        "identities": _identities(server),
        "nacks": _by_code(counters, "nack."),
        "errors": _by_code(counters, "error."),
        "ring": {
            "pending_bytes": pending,
            "capacity_bytes": store.ring_bytes,
            "fill": round(pending / store.ring_bytes, 4),
            "pause_bytes": server.pause_bytes,
        },
        "wal": _wal(server),
        "subscriber_lag_bytes": server.subscriber_lags(),
        # set by the subscriber manager when there are subscribers
        "subscribers": getattr(server, "subscriber_status", dict)(),
        "process": _process_figures(),
        "disk": _disk(server.config.data_dir),
    }


# -- Prometheus text exposition format 0.0.4 -------------------------------------------


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class _Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples) -> None:
        """One metric family; samples are (labels dict, value); None values are skipped."""
        rows = [(labels, value) for labels, value in samples if value is not None]
        if not rows:
            return  # a family without samples only confuses some parsers
        full = PREFIX + name
        help_text = help_text.replace("\\", "\\\\").replace("\n", "\\n")
        self.lines.append(f"# HELP {full} {help_text}")
        self.lines.append(f"# TYPE {full} {kind}")
        for labels, value in rows:
            if labels:
                inner = ",".join(f'{k}="{_label_value(str(v))}"' for k, v in labels.items())
                self.lines.append(f"{full}{{{inner}}} {_number(value)}")
            else:
                self.lines.append(f"{full} {_number(value)}")

    def one(self, name: str, kind: str, help_text: str, value) -> None:
        self.family(name, kind, help_text, [({}, value)])


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000


# fields of a subscriber's status that Prometheus gets: (field, metric, kind, help)
SUBSCRIBER_FAMILIES = (
    ("records", "records_total", "counter", "Records handled since its process started."),
    ("cpu_seconds", "cpu_seconds_total", "counter", "CPU time of its process (user + system)."),
    ("failures", "failures_total", "counter", "Failed batches or flushes since it started."),
    ("restarts", "restarts_total", "counter", "Times the daemon restarted its process."),
    ("failing", "failing", "gauge", "1 while its last attempt failed (last_error in JSON)."),
)


def prometheus(snapshot: dict) -> str:
    """The snapshot in the Prometheus text format 0.0.4 (names prefixed module_ingest_)."""
    s = snapshot
    out = _Exposition()
    info = {"version": s["version"], "board": s["board"]}
    out.family("info", "gauge", "Version and board profile.", [(info, 1)])
    out.one("uptime_seconds", "gauge", "Seconds since the daemon started.", s["uptime_seconds"])
    out.one("frames_total", "counter", "Frames stored since start.", s["frames"])
    out.one("bytes_in_total", "counter", "Bytes received from cores since start.", s["bytes_in"])
    out.one("frames_per_second", "gauge", "Ingest rate over the last seconds.", s["rate"])
    out.one("replays_total", "counter", "Replayed frames refused since start.", s["replays"])
    conns = s["connections"]
    out.one("connections_open", "gauge", "Open core connections.", conns["open"])
    out.one(
        "connections_authenticated", "gauge", "Authenticated connections.", conns["authenticated"]
    )
    out.one("connections_paused", "gauge", "Connections not being read.", conns["paused"])
    out.one(
        "connections_accepted_total",
        "counter",
        "Connections accepted since start.",
        conns["accepted"],
    )
    idents = s["identities"].items()
    out.family(
        "identity_frames_total",
        "counter",
        "Frames stored per identity since start.",
        [({"identity": i}, v["frames"]) for i, v in idents],
    )
    out.family(
        "identity_connected",
        "gauge",
        "Whether the identity has a connection now.",
        [({"identity": i}, v["connected"]) for i, v in idents],
    )
    out.family(
        "nacks_total",
        "counter",
        "NACKs sent, by code.",
        [({"code": c}, n) for c, n in s["nacks"].items()],
    )
    out.family(
        "errors_total",
        "counter",
        "ERRORs sent, by code.",
        [({"code": c}, n) for c, n in s["errors"].items()],
    )
    ring = s["ring"]
    out.one("ring_pending_bytes", "gauge", "Ring bytes not yet durable.", ring["pending_bytes"])
    out.one("ring_capacity_bytes", "gauge", "Size of the ring.", ring["capacity_bytes"])
    out.one("ring_fill_ratio", "gauge", "Ring bytes not yet durable over its size.", ring["fill"])
    wal = s["wal"]
    out.one("wal_segments", "gauge", "WAL segment files.", wal["segments"])
    out.one("wal_bytes", "gauge", "Bytes in WAL segment files.", wal["bytes_on_disk"])
    out.one("wal_frames_stored", "gauge", "Frames in the store.", wal["frames_stored"])
    out.one(
        "wal_dropped_frames_total",
        "counter",
        "Oldest frames dropped to make room (overflow = drop-oldest).",
        wal["dropped_frames"],
    )
    out.one("wal_full", "gauge", "1 while the store refuses frames for lack of space.", wal["full"])
    out.one("wal_commits_total", "counter", "Commits (write + fdatasync).", wal["commits"])
    out.one(
        "wal_commit_p50_seconds",
        "gauge",
        "Median of recent commit times.",
        _seconds(wal["commit_p50_ms"]),
    )
    out.one(
        "wal_commit_p99_seconds",
        "gauge",
        "99th percentile of recent commit times.",
        _seconds(wal["commit_p99_ms"]),
    )
    out.one(
        "wal_commit_failing",
        "gauge",
        "1 while the last commit attempt failed (disk full, I/O error).",
        wal["commit_error"] is not None,
    )
    out.one(
        "wal_commit_stalled_seconds",
        "gauge",
        "How long the commit in flight has run.",
        wal["stalled_seconds"],
    )
    out.family(
        "subscriber_lag_bytes",
        "gauge",
        "Bytes a subscriber is behind the WAL tail.",
        [({"subscriber": n}, lag) for n, lag in s["subscriber_lag_bytes"].items()],
    )
    subs = s.get("subscribers", {}).items()
    for field, metric, kind, help_text in SUBSCRIBER_FAMILIES:
        samples = [({"subscriber": n}, v.get(field)) for n, v in subs]
        out.family(f"subscriber_{metric}", kind, help_text, samples)
    proc = s["process"]
    out.one("process_rss_bytes", "gauge", "Resident memory.", proc["rss_bytes"])
    out.one("process_cpu_percent", "gauge", "CPU use since the last reading.", proc["cpu_percent"])
    disk = s["disk"]
    out.one("disk_free_bytes", "gauge", "Free bytes on the data dir's disk.", disk["free_bytes"])
    out.one("disk_total_bytes", "gauge", "Size of the data dir's file system.", disk["total_bytes"])
    return "\n".join(out.lines) + "\n"


# -- human summary ----------------------------------------------------------------------

TEXT_IDENTITIES = 20  # the summary lists the busiest few; json and prometheus list all


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _codes(counts: dict[str, int]) -> str:
    return " ".join(f"{c}={n}" for c, n in counts.items()) or "none"


def _latency(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.1f} ms"


def text(snapshot: dict) -> str:
    """A short human summary of the snapshot."""
    s = snapshot
    c, ring, wal = s["connections"], s["ring"], s["wal"]
    proc, disk = s["process"], s["disk"]
    cpu = "?" if proc["cpu_percent"] is None else f"{proc['cpu_percent']:.1f}%"
    lines = [
        f"module-ingest {s['version']} (board {s['board']}, pid {s['pid']}), "
        f"up {duration(s['uptime_seconds'])}",
        f"frames       {s['frames']} stored, {_size(s['bytes_in'])} in, "
        f"{s['rate']:.1f} frames/s, {s['replays']} replays refused",
        f"connections  {c['open']} open, {c['authenticated']} authenticated, "
        f"{c['paused']} paused, {c['accepted']} accepted since start",
        f"nacks        {_codes(s['nacks'])}",
        f"errors       {_codes(s['errors'])}",
        f"ring         {_size(ring['pending_bytes'])} of {_size(ring['capacity_bytes'])} "
        f"pending ({ring['fill'] * 100:.1f}%)",
        f"wal          {wal['segments']} segments, {_size(wal['bytes_on_disk'])}, "
        f"{wal['commits']} commits, p50 {_latency(wal['commit_p50_ms'])}, "
        f"p99 {_latency(wal['commit_p99_ms'])}",
    ]
    if wal["full"]:
        lines.append("             storage full: new frames get BUSY")
    if wal["dropped_frames"]:
        lines.append(f"             {wal['dropped_frames']} oldest frames dropped (overflow)")
    if wal["commit_error"]:
        lines.append(f"             commit failing: {wal['commit_error']}")
    lags = s["subscriber_lag_bytes"]
    lines.append(
        "subscribers  " + (", ".join(f"{n} {_size(b)} behind" for n, b in lags.items()) or "none")
    )
    for name, sub in s.get("subscribers", {}).items():
        if sub.get("failing"):
            lines.append(f"             {name} failing: {sub.get('last_error')}")
    lines.append(f"process      rss {_size(proc['rss_bytes'])}, cpu {cpu}")
    lines.append(
        f"disk         {_size(disk['free_bytes'])} free of {_size(disk['total_bytes'])} "
        f"({disk['path']})"
    )
    idents = sorted(s["identities"].items(), key=lambda kv: -kv[1]["frames"])
    if idents:
        lines.append("identities")
        width = max(len(i) for i, _ in idents[:TEXT_IDENTITIES])
        for ident, v in idents[:TEXT_IDENTITIES]:
            state = "connected" if v["connected"] else ""
            lines.append(f"  {ident:<{width}}  {v['frames']:>10} frames  {state}".rstrip())
        if len(idents) > TEXT_IDENTITIES:
            lines.append(f"  ... and {len(idents) - TEXT_IDENTITIES} more")
    return "\n".join(lines) + "\n"
