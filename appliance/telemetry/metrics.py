"""Metrics: the daemon's figures as a JSON snapshot, Prometheus text and a summary.

What the figures are lives in one table, catalog.METRICS; this module reads
them and renders them. `Metrics.snapshot()` runs on the loop thread and only
reads: the server's snapshot (appliance/net/snapshot.py), a listing of the WAL
directory, the subscriber manager's figures, and a few process and file-system
figures from psutil. It returns a JSON-able dict with one entry per row of the
table; `prometheus` and `text` render such a dict.
"""

from __future__ import annotations

import math
import os
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psutil

from appliance.telemetry import gcwatch
from appliance.telemetry.catalog import METRICS, SUMMARY_LINES, WORDS, Family, Metric, Samples
from appliance.telemetry.figures import duration

if TYPE_CHECKING:
    from appliance.config import Config
    from appliance.net.server import Server
    from appliance.net.snapshot import Snapshot
    from appliance.subscribers.manager import SubscriberManager

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


# -- what one snapshot reads --------------------------------------------------------


@dataclass(frozen=True)
class Sources:
    """Everything one snapshot reads, each gathered once."""

    daemon: Snapshot  # the server's, with its per-identity rows
    board: str
    rate: RateMeter
    commit_seconds: list[float]  # recent commit times, sorted
    segments: tuple[int, int]  # WAL segment files: how many, bytes
    lags: dict[str, int]  # bytes each subscriber is behind
    subscribers: dict[str, dict]  # each subscriber's status (SubscriberManager.status)
    process: dict[str, Any]  # rss_bytes, cpu_percent, gc
    disk: dict[str, Any]  # path, free_bytes, total_bytes


_process: psutil.Process | None = None  # cpu_percent needs the same object every time


def _proc() -> psutil.Process:
    global _process
    if _process is None or _process.pid != os.getpid():
        _process = psutil.Process()
    return _process


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


class Metrics:
    """The figures of one daemon: its server's, its subscribers', the process's.

    Made once by the builder (appliance/app.py); a sweep hook samples the frame rate.
    """

    def __init__(
        self, server: Server, config: Config, subscribers: SubscriberManager | None = None
    ) -> None:
        self.server = server
        self.board: str = config.values["board"]["profile"]
        self.data_dir = config.data_dir
        self.subscribers = subscribers
        self.rate = RateMeter()
        server.sweep_hooks.append(self._sample)
        _proc().cpu_percent(None)  # the first reading only starts psutil's interval

    def _sample(self, now: float) -> None:
        self.rate.sample(now, self.server.snapshot().counters["frames"])

    def snapshot(self, identities: bool = False) -> dict:
        """Every figure of METRICS, as a JSON-able dict; the per-identity rows only with
        `identities`."""
        daemon = self.server.snapshot(identities=identities)
        subscribers = self.subscribers
        sources = Sources(
            daemon=daemon,
            board=self.board,
            rate=self.rate,
            commit_seconds=sorted(daemon.store.commit_seconds),
            segments=_segments(daemon.store.directory),
            lags=subscribers.lags() if subscribers is not None else {},
            subscribers=subscribers.status() if subscribers is not None else {},
            process=_process_figures(),
            disk=_disk(self.data_dir),
        )
        out: dict = {}
        for metric in METRICS:
            if metric.per_identity and not identities:
                continue
            *path, name = metric.key.split(".")
            place = out
            for part in path:
                place = place.setdefault(part, {})
            place[name] = metric.read(sources)
        return out

    def text(self, identities: bool = False) -> str:
        """The human summary of a snapshot taken now."""
        return text(self.snapshot(identities))


def _figure(snapshot: dict, key: str) -> Any:
    value = snapshot
    for part in key.split("."):
        value = value[part]
    return value


def _figures(snapshot: dict) -> list[tuple[Metric, Any]]:
    """(metric, figure) of every row in the snapshot: the per-identity ones only when it
    was taken with them."""
    rows = []
    for metric in METRICS:
        try:
            rows.append((metric, _figure(snapshot, metric.key)))
        except KeyError:
            if not metric.per_identity:
                raise
    return rows


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


def _family(lines: list[str], family: Family, samples: Samples) -> None:
    rows = [(labels, value) for labels, value in samples if value is not None]
    if not rows:
        return  # a family without samples only confuses some parsers
    full = PREFIX + family.name
    help_text = family.help.replace("\\", "\\\\").replace("\n", "\\n")
    lines.append(f"# HELP {full} {help_text}")
    lines.append(f"# TYPE {full} {family.kind}")
    for labels, value in rows:
        if labels:
            inner = ",".join(f'{k}="{_label_value(str(v))}"' for k, v in labels.items())
            lines.append(f"{full}{{{inner}}} {_number(value)}")
        else:
            lines.append(f"{full} {_number(value)}")


def prometheus(snapshot: dict) -> str:
    """The snapshot in the Prometheus text format 0.0.4 (names prefixed module_ingest_)."""
    lines: list[str] = []
    for metric, value in _figures(snapshot):
        for family in metric.families:
            _family(lines, family, family.samples(value, snapshot))
    return "\n".join(lines) + "\n"


# -- human summary ----------------------------------------------------------------------


def text(snapshot: dict) -> str:
    """A short human summary of the snapshot."""
    s = snapshot
    lines = [
        f"module-ingest {s['version']} (board {s['board']}, pid {s['pid']}), "
        f"up {duration(s['uptime_seconds'])}"
    ]
    figures = _figures(s)
    for line, joint in SUMMARY_LINES.items():
        rows = [(metric, value) for metric, value in figures if metric.line == line]
        phrases = [WORDS.format(m.phrase, value) for m, value in rows if m.phrase is not None]
        if phrases:
            lines.append(f"{line:<12} {joint.join(phrases)}")
        for metric, value in rows:
            if metric.notes is not None:
                lines.extend(metric.notes(value))
    return "\n".join(lines) + "\n"
