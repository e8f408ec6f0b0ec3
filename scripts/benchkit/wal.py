"""The daemon's WAL seen from outside, through its files: how much log the segments hold,
how much of it lies between two positions, and the page cache they take."""

from __future__ import annotations

import os
from pathlib import Path

from appliance.store.segment import BLOCK, FRAME_HEAD, list_segments

from .harness import IDENT_FORMAT
from .procfs import page_cache_kib
from .report import MiB

# refuse to fill a WAL unless its file system has this many times what it will hold free
FREE_FACTOR = 3


def data_end(path: Path) -> int:
    """Where the data in a preallocated segment ends: after its last non-zero byte, rounded
    up to a block (commits end on block boundaries; the rest of the file is zeros)."""
    step = MiB
    with open(path, "rb") as f:
        end = os.fstat(f.fileno()).st_size
        while end > 0:
            start = max(0, end - step)
            used = len(os.pread(f.fileno(), end - start, start).rstrip(b"\0"))
            if used:
                return -(-(start + used) // BLOCK) * BLOCK
            end = start
    return 0


def wal_usage(wal: Path) -> dict[str, int]:
    """Segments, their size on disk (preallocated) and the bytes of log in them."""
    segments = list_segments(wal)
    return {
        "segments": len(segments),
        "bytes_on_disk": sum(p.stat().st_size for _, p in segments),
        "log_bytes": sum(data_end(p) for _, p in segments),
    }


def log_between(wal: Path, start: list[int], end: list[int]) -> int:
    """Bytes of log from position `start` to `end` ([segment, offset] each): what recovery
    reads when it goes from the checkpoint to the tail."""
    total = 0
    for number, path in list_segments(wal):
        if start[0] <= number <= end[0]:
            first = start[1] if number == start[0] else BLOCK
            last = end[1] if number == end[0] else data_end(path)
            total += max(0, last - first)
    return total


def record_bytes(payload: int) -> int:
    """A FRAME record in the WAL: the fixed head, the identity, the payload (FORMAT.md)."""
    return FRAME_HEAD + len(IDENT_FORMAT.format(0).encode()) + payload


def evict_wal(wal: Path) -> int:
    """Write the segments' dirty pages, then drop them from the page cache (these files only);
    returns how far the machine's page cache shrank, in KiB."""
    before = page_cache_kib()
    for _, path in list_segments(wal):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)  # the killed daemon's last writes: dirty pages are not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return before - page_cache_kib()
