"""Named readers of the durable log.

A Cursor reads records after its position and, when its owner has handled
them, commits the new position to `NAME.cursor` beside the segments. Delivery
is at least once: after a crash a reader starts again from its last commit.
Every reader is a process of its own beside the daemon (`module-ingest
worker`, the subscribers) and reads the segment files through the segment
reader (reader.py): the newest segment only as far as its data runs without a
gap, since a commit may be in flight there. The store deletes a segment only
when every cursor has passed it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import mmap
import os
from pathlib import Path

from appliance.store import meta
from appliance.store.reader import Damage, SegmentReader, checkpoint, trusted_in
from appliance.store.segment import (
    DATA_START,
    Record,
    SegmentError,
    check_header,
    list_segments,
)

log = logging.getLogger("appliance.store")


class Cursor:
    def __init__(self, directory: str | os.PathLike, name: str):
        self.directory = Path(directory)
        self.name = meta.check_cursor_name(name)
        saved = meta.read_cursor(self.directory, name)
        self.position: tuple[int, int] = saved or self._oldest()
        self.committed = saved
        self._said: set[tuple[int, int]] = set()  # damage already logged: (segment, offset)
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
            got = self._read_segment(max_records - len(out))
            if not got:
                break
            out += got
        return out

    def _read_segment(self, limit: int) -> list[Record]:
        """Records from the position on, in its segment or the next ones that hold any."""
        while True:
            seg, off = self.position
            segments = list_segments(self.directory)
            numbers = [n for n, _ in segments]
            if seg not in numbers:
                later = [n for n in numbers if n > seg]
                if not later:
                    return []
                log.warning(
                    "cursor %s: segment %d is gone; going on at %d", self.name, seg, later[0]
                )
                self.position = (later[0], DATA_START)
                continue
            path = dict(segments)[seg]
            newest = numbers[-1]
            records = self._read_file(path, seg, off, limit, newest)
            if records or seg == newest:
                return records
            self.position = (numbers[numbers.index(seg) + 1], DATA_START)

    def _read_file(self, path: Path, seg: int, off: int, limit: int, newest: int) -> list[Record]:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return []  # the daemon is creating it right now
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                try:
                    check_header(data, seg)
                except SegmentError as exc:
                    if seg != newest:
                        self._say(seg, 0, f"{path.name}: {exc}; skipping it")
                    return []
                trusted = trusted_in(seg, newest, checkpoint(self.directory))
                reader = SegmentReader(data, seg, trusted=trusted, report=self._reporter(path, seg))
                with contextlib.closing(reader.records(max(off, DATA_START))) as found:
                    records = list(itertools.islice(found, limit))
        if records:
            self.position = (seg, records[-1].end)
        return records

    def _reporter(self, path: Path, seg: int):
        def report(damage: Damage) -> None:
            where = "nothing valid after it" if damage.resumed is None else damage.resumed
            self._say(
                seg,
                damage.offset,
                f"{path.name}: {damage.reason} at offset {damage.offset}; skipping to {where}",
            )

        return report

    def _say(self, seg: int, offset: int, text: str) -> None:
        """Log damage once per reader, not at every poll that passes it again."""
        if (seg, offset) not in self._said:
            self._said.add((seg, offset))
            log.error("cursor %s: %s", self.name, text)
