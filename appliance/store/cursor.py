"""Named readers of the durable log.

A Cursor reads records after its position and, when its owner has handled
them, commits the new position to `NAME.cursor` beside the segments. Delivery
is at least once: after a crash a reader starts again from its last commit.
Inside the daemon a cursor is given the live Store and reads recent records
from the ring; a reader that has fallen behind the ring, and any reader in
another process (`module-ingest worker`), reads the segment files. The store
deletes a segment only when every cursor has passed it.
"""

from __future__ import annotations

import logging
import mmap
import os
from pathlib import Path

from appliance.store import meta
from appliance.store.segment import (
    DATA_START,
    Record,
    ScanEnd,
    SegmentError,
    check_header,
    list_segments,
    resync,
    scan,
)
from appliance.store.wal import Store

log = logging.getLogger("appliance.store")

RING_READ = 1024 * 1024  # bytes taken from the ring per read


class Cursor:
    def __init__(self, directory: str | os.PathLike, name: str, store: Store | None = None):
        self.directory = Path(directory)
        self.name = meta.check_cursor_name(name)
        self.store = store
        saved = meta.read_cursor(self.directory, name)
        self.position: tuple[int, int] = saved or self._oldest()
        self.committed = saved
        if saved is None:
            # registering pins the data from here on against retention
            self.commit()

    def _oldest(self) -> tuple[int, int]:
        segments = list_segments(self.directory)
        return (segments[0][0] if segments else 1), DATA_START

    def commit(self, position: tuple[int, int] | None = None) -> None:
        """Persist the position (default: after the last record read)."""
        if position is not None:
            self.position = position
        if self.committed != self.position:  # each write wears the flash
            meta.write_cursor(self.directory, self.name, self.position)
            self.committed = self.position

    def commit_at(self, position: tuple[int, int]) -> None:
        """Persist `position` (behind the read position: records its owner still holds)
        without moving where reading goes on."""
        if self.committed != position:
            meta.write_cursor(self.directory, self.name, position)
            self.committed = position

    def read(self, max_records: int = 1000) -> list[Record]:
        """Durable records after the position (at most `max_records`); [] when caught up.
        Advances `position` past them; `commit` makes that stick."""
        out: list[Record] = []
        while len(out) < max_records:
            got = self._read_once(max_records - len(out))
            if not got:
                break
            out += got
        return out

    def _read_once(self, limit: int) -> list[Record]:
        seg, off = self.position
        if self.store is not None:
            durable_seg, durable_off = self.store.durable_position()
            if (seg, off) >= (durable_seg, durable_off):
                return []
            data = self.store.read_ring(seg, off, RING_READ)
            if data:
                records = []
                for item in scan(data, seg, 0):
                    if isinstance(item, ScanEnd) or len(records) >= limit:
                        break
                    records.append(_shift(item, off))
                if records:
                    self.position = (seg, records[-1].end)
                    return records
        return self._read_file(seg, off, limit)

    def _read_file(self, seg: int, off: int, limit: int) -> list[Record]:
        segments = list_segments(self.directory)
        numbers = [n for n, _ in segments]
        if seg not in numbers:
            later = [n for n in numbers if n > seg]
            if not later:
                return []
            log.warning("cursor %s: segment %d is gone; going on at %d", self.name, seg, later[0])
            self.position = (later[0], DATA_START)
            return self._read_file(later[0], DATA_START, limit)
        path = dict(segments)[seg]
        sealed = seg != numbers[-1]
        if path.stat().st_size == 0:
            return []  # the daemon is creating it right now
        # inside the daemon, never past what is durable (the file may hold a commit in flight)
        bound = self.store.durable_position() if self.store is not None else None
        records: list[Record] = []
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                check_header(data, seg)
            except SegmentError as exc:
                log.error("cursor %s: %s: %s; skipping it", self.name, path.name, exc)
                end = ScanEnd(len(data), "bad header", True)
            else:
                end = None
                for item in scan(data, seg, max(off, DATA_START)):
                    if isinstance(item, ScanEnd):
                        end = item
                        break
                    if bound is not None and (seg, item.end) > bound:
                        break
                    records.append(item)
                    if len(records) >= limit:
                        break
            if records:
                self.position = (seg, records[-1].end)
                return records
            # damage, not a commit in flight: in a sealed segment, or below what is durable
            damaged = sealed or (
                bound is not None and end is not None and (seg, end.offset) < bound
            )
            if end is not None and not end.clean and damaged:
                nxt = resync(data, end.offset)
                log.error(
                    "cursor %s: %s: %s at offset %d; skipping to %s",
                    self.name,
                    path.name,
                    end.reason,
                    end.offset,
                    nxt,
                )
                if nxt is not None:
                    self.position = (seg, nxt)
                    return self._read_file(seg, nxt, limit)
        if sealed:
            self.position = (numbers[numbers.index(seg) + 1], DATA_START)
            return self._read_file(*self.position, limit)
        return []


def _shift(rec: Record, base: int) -> Record:
    """A record scanned from a ring buffer that starts at file offset `base`."""
    return Record(
        rec.segment,
        rec.offset + base,
        rec.identity,
        rec.channel,
        rec.seq,
        rec.ts_ns,
        rec.recv_ns,
        rec.payload,
        rec.end + base,
    )
