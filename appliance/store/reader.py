"""Reading a segment: the one place that decides where valid data ends and where reading
goes on after damage (FORMAT.md, "Reading a segment").

Recovery, cursors, `dump`, `recover-dump` and its salvage all read through
`SegmentReader`, as LevelDB's log::Reader serves every reader of its log and
tells a Reporter about each damaged stretch it skips.
"""

from __future__ import annotations

import logging
import mmap
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from appliance.store import meta
from appliance.store.segment import (
    DATA_START,
    PREFIX,
    TYPE_FRAME,
    TYPE_PAD,
    Record,
    ScanEnd,
    SegmentError,
    check_header,
    list_segments,
    scan,
)

log = logging.getLogger("appliance.store")

# What the bytes of a record's type field, and the reserved byte after a frame's, look like:
# where a record may begin, found with find() at C speed instead of a CRC at every offset.
FRAME_MARK = bytes([TYPE_FRAME, 0])
PAD_MARK = bytes([TYPE_PAD])
TYPE_AT = 8  # offset of the type byte in a record
CHUNK = 1024 * 1024  # bytes compared or searched at a time
ZEROS = bytes(CHUNK)
PROOF_BUDGET = 8 * 1024 * 1024  # bytes hashed to prove where one damaged record ends


@dataclass(frozen=True, slots=True)
class Damage:
    """A stretch a reader skipped: where it starts, why, and where reading went on (None:
    nothing valid follows)."""

    offset: int
    reason: str
    resumed: int | None


Report = Callable[[Damage], None]


class SegmentReader:
    """The records of one segment's bytes (a mapped file), in order.

    `trusted` is the offset before which the data is durable: the whole file for a sealed
    segment, the checkpoint for the newest one. Damage before it is real; the reader tells
    `report` and goes on after it. At or after it, the first bad or empty record header ends
    the reading quietly: what follows is a commit in flight, or a torn tail that recovery
    clears.

    After iterating, `end` is where the valid data ended (just past the last good record,
    padding included) and `stop` why."""

    def __init__(
        self,
        data,
        number: int,
        *,
        trusted: int | None = None,
        report: Report | None = None,
    ) -> None:
        self.data = data
        self.number = number
        self.size = len(data)
        self.trusted = self.size if trusted is None else trusted
        self.report = report
        self.end = DATA_START
        self.stop = ScanEnd(DATA_START, "not read", True)

    def records(self, start: int = DATA_START) -> Iterator[Record]:
        pos = start
        while True:
            stop = None
            for item in scan(self.data, self.number, pos):
                if isinstance(item, ScanEnd):
                    stop = item
                else:
                    yield item
            self.end, self.stop = stop.offset, stop
            if stop.offset >= min(self.trusted, self.size):
                return
            resumed = self.resync(stop)
            if resumed is None and stop.clean:
                return  # zeros to the end: the normal end of the data
            if self.report is not None:
                self.report(Damage(stop.offset, describe(stop), resumed))
            if resumed is None:
                return
            pos = resumed

    def resync(self, bad: ScanEnd) -> int | None:
        """Where the next record after a bad one (or after zeros) begins, None if none does.

        The bad record's own header is asked first: payloads are the senders' bytes and may
        hold what looks like a record, and only a header says where a payload ends."""
        at = bad.offset
        if not bad.clean and at + PREFIX.size <= self.size:
            crc, length = PREFIX.unpack_from(self.data, at)
            # its length damaged, its CRC and body intact: the CRC proves the true end
            budget = PROOF_BUDGET  # shortest first: a real record is short, a guess may not be
            for alt in sorted(_one_byte_changes(length)):
                end = at + 8 + alt
                if end >= self.size or alt > budget:
                    break
                if self._starts(end):
                    budget -= alt
                    if self._proves(at, alt, crc):
                        return end
            # its length intact (the damage is in the rest): the next record is where it says
            end = at + 8 + length
            if at < end < self.size and self._starts(end):
                return end
        for pos in self._candidates(at + 1):
            if self._starts(pos):
                return pos
        return None

    def _starts(self, pos: int) -> bool:
        """Whether a valid record (by scan's own rules) begins at `pos`."""
        first = next(scan(self.data, self.number, pos), None)
        return isinstance(first, Record) or (first is not None and first.offset > pos)

    def _proves(self, at: int, length: int, crc: int) -> bool:
        with memoryview(self.data) as view:
            body = view[at + 8 : at + 8 + length]
            return zlib.crc32(body, zlib.crc32(length.to_bytes(4, "big"))) == crc

    def _candidates(self, start: int) -> Iterator[int]:
        """Offsets from `start` on whose type byte could begin a record, in order. Runs of
        zeros (the preallocated tail, a lost block) are passed a chunk at a time."""
        data, size = self.data, self.size
        at = start + TYPE_AT
        while (at := first_nonzero(data, at)) is not None:
            end = min(size, at + CHUNK)
            chunk = data[at : end + 1]  # one byte more: a frame's mark is two bytes long
            limit = end - at
            frame, pad = chunk.find(FRAME_MARK), chunk.find(PAD_MARK)
            while 0 <= frame < limit or 0 <= pad < limit:
                if 0 <= frame < limit and not 0 <= pad < frame:
                    i, frame = frame, chunk.find(FRAME_MARK, frame + 1)
                else:
                    i, pad = pad, chunk.find(PAD_MARK, pad + 1)
                if at + i - TYPE_AT + PREFIX.size < size:
                    yield at + i - TYPE_AT
            at = end


def first_nonzero(data, start: int, end: int | None = None) -> int | None:
    """The first offset in [start, end) whose byte is not zero, None if there is none; a
    chunk compare at a time, so a preallocated tail is passed at memory speed."""
    end = len(data) if end is None else end
    at = start
    while at < end:
        chunk = data[at : min(end, at + CHUNK)]
        if chunk != (ZEROS if len(chunk) == CHUNK else bytes(len(chunk))):
            return at + len(chunk) - len(chunk.lstrip(b"\0"))
        at += len(chunk)
    return None


def describe(stop: ScanEnd) -> str:
    """Why reading stopped there, in words for a log line."""
    return "zeros before more data" if stop.clean else stop.reason


def _one_byte_changes(value: int) -> Iterator[int]:
    """Every 32-bit value that differs from `value` in exactly one byte, smallest first
    within each byte."""
    for shift in (0, 8, 16, 24):
        kept = value & ~(0xFF << shift)
        for byte in range(256):
            alt = kept | byte << shift
            if alt != value:
                yield alt


# -- files ---------------------------------------------------------------------------------


def checkpoint(directory: Path) -> tuple[int, int] | None:
    """The checkpoint in store.meta: everything before it is durable (None: unknown)."""
    try:
        seg, off = meta.read(directory / meta.STORE_META)["checkpoint"]
        return int(seg), int(off)
    except (meta.MetaError, KeyError, TypeError, ValueError):
        return None


def trusted_in(number: int, newest: int, saved: tuple[int, int] | None) -> int | None:
    """How far a reader may trust segment `number` (SegmentReader's `trusted`): all of a
    sealed one, the newest up to the checkpoint if it is in it."""
    if number != newest:
        return None
    if saved is not None and saved[0] == number:
        return saved[1]
    return DATA_START


def read_segment_records(
    path: Path,
    number: int,
    start: int = DATA_START,
    *,
    trusted: int | None = None,
    report: Report | None = None,
) -> Iterator[Record]:
    """The good records of one segment file (nothing if its header is not intact)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                check_header(data, number)
            except SegmentError as exc:
                log.error("store: %s: %s; not read", path.name, exc)
                return
            reader = SegmentReader(data, number, trusted=trusted, report=report)
            yield from reader.records(start)


def read_records(directory: str | os.PathLike) -> Iterator[Record]:
    """Every valid record, oldest first; safe beside a running daemon (the tail of the
    newest segment past the checkpoint reads as the end at its first gap). Damage is
    logged, one line per stretch."""
    directory = Path(directory)
    segments = list_segments(directory)
    saved = checkpoint(directory)
    for number, path in segments:

        def report(damage: Damage, name: str = path.name) -> None:
            log.warning(
                "store: %s: %s at offset %d; %s",
                name,
                damage.reason,
                damage.offset,
                "nothing valid after it"
                if damage.resumed is None
                else f"reading goes on at {damage.resumed}",
            )

        trusted = trusted_in(number, segments[-1][0], saved)
        yield from read_segment_records(path, number, trusted=trusted, report=report)
