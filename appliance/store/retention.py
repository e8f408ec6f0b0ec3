"""Retention, quota and the free-space floor (owned by the writer process).

A sealed segment is deleted only when every cursor has passed it and
retention (age, size) or space asks; `overflow = "drop-oldest"` also drops
unread ones when the store is full, counting the frames lost.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from appliance.durable import fsync_dir
from appliance.store import meta
from appliance.store.reader import read_segment_records
from appliance.store.segment import list_segments

Log = Callable[..., None]  # log(level, message): the writer's log, sent to the daemon


class Retention:
    def __init__(
        self,
        directory: Path,
        segment_bytes: int,
        *,
        quota_bytes: int,
        min_free_bytes: int,
        retention_bytes: int,
        retention_seconds: float,
        overflow: str,
        log: Log,
    ) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.quota_bytes = quota_bytes
        self.min_free_bytes = min_free_bytes
        self.retention_bytes = retention_bytes
        self.retention_seconds = retention_seconds
        self.overflow = overflow
        self.log = log
        self.bytes_on_disk = 0  # segment files, preallocated size included
        self.full = False  # no room for another segment: frames that need one get BUSY
        self.dropped_frames = 0  # overflow = "drop-oldest" only

    def update_usage(self) -> None:
        total = 0
        for _, path in list_segments(self.directory):
            with contextlib.suppress(FileNotFoundError):  # a reader's retention raced us
                total += path.stat().st_size
        self.bytes_on_disk = total
        full = self._tight(total)
        if full != self.full:
            self.log(
                "warning",
                "store: storage full: new frames get BUSY" if full else "store: space is back",
            )
        self.full = full

    def _tight(self, total: int) -> bool:
        """No room for one more segment under the quota or above the free-space floor."""
        if self.quota_bytes and total + self.segment_bytes > self.quota_bytes:
            return True
        if self.min_free_bytes:
            stat = os.statvfs(self.directory)
            return stat.f_bavail * stat.f_frsize < self.min_free_bytes
        return False

    def retain(self, current: int) -> None:
        """Delete sealed segments (older than `current`) where retention or space asks."""
        segments = [s for s in list_segments(self.directory) if s[0] < current]
        if not segments:
            return
        cursors = meta.list_cursors(self.directory)
        oldest_needed = min(
            (pos[0] if pos else 0 for pos in cursors.values()), default=None
        )  # a cursor at segment S still needs S
        total = sum(p.stat().st_size for _, p in list_segments(self.directory))
        now = time.time()
        deleted = False
        for number, path in segments:
            passed = oldest_needed is None or number < oldest_needed
            over_bytes = bool(self.retention_bytes) and total > self.retention_bytes
            too_old = (
                bool(self.retention_seconds) and now - path.stat().st_mtime > self.retention_seconds
            )
            tight = self._tight(total)
            if passed and (over_bytes or too_old):
                why = "retention"
            elif passed and tight and cursors:
                # space pressure frees only what readers have consumed; with no reader
                # registered the data is kept (dump, recover-dump) and new frames get BUSY
                why = "space"
            elif tight and self.overflow == "drop-oldest":
                why = "overflow"
            else:
                break  # oldest first: keep this one, and so every newer one
            size = path.stat().st_size
            if why == "overflow":
                dropped = sum(1 for _ in read_segment_records(path, number))
                self.dropped_frames += dropped
                self.log(
                    "warning",
                    f"store: storage full; dropping {path.name} with {dropped} unread frames"
                    f" (overflow = drop-oldest, {self.dropped_frames} dropped in all)",
                )
            else:
                self.log("info", f"store: deleting {path.name} ({why})")
            os.unlink(path)
            total -= size
            deleted = True
        if deleted:
            fsync_dir(self.directory)
