"""Recovery: from the checkpoint in store.meta to the end of the log, before anything
is appended (FORMAT.md, "Recovery").

Runs once, in the process that opens the store, before the writer starts. It
rebuilds the replay window (the highest stored seq per identity) and finds
where the next commit goes: the end of the data in the newest segment, or a
new segment when the newest one cannot be appended to.
"""

from __future__ import annotations

import logging
import mmap
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from appliance.durable import fsync_dir
from appliance.store import meta
from appliance.store.segment import (
    BLOCK,
    DATA_START,
    MIN_PAD,
    QUARANTINE_SUFFIX,
    Record,
    ScanEnd,
    SegmentError,
    check_header,
    encode_frame_record,
    encode_header,
    encode_padding,
    list_segments,
    padding_to_block,
    resync,
    scan,
    scan_all,
)

log = logging.getLogger("appliance.store")


@dataclass
class Recovered:
    """What recovery found: the replay window and where the log goes on."""

    last_seq: dict[str, int] = field(default_factory=dict)
    frames: int = 0
    segment: int = 1  # the segment the next commit goes to
    offset: int = DATA_START  # where its data ends
    fresh: bool = True  # the segment does not exist yet (or was unusable): create it


def recover(directory: Path, segment_bytes: int, commit_max_bytes: int) -> Recovered:
    """Read the checkpoint, scan from it to the tail, repair what a crash left."""
    return _Recovery(directory, segment_bytes, commit_max_bytes).run()


class _Recovery:
    def __init__(self, directory: Path, segment_bytes: int, commit_max_bytes: int) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.commit_max_bytes = commit_max_bytes
        self.result = Recovered()
        self._salvaged_end = DATA_START

    def run(self) -> Recovered:
        out = self.result
        segments = list_segments(self.directory)
        start_seg, start_off = segments[0][0] if segments else 1, DATA_START
        try:
            saved = meta.read(self.directory / meta.STORE_META)
            start_seg, start_off = (int(v) for v in saved["checkpoint"])
            out.last_seq = {str(k): int(v) for k, v in saved["last_seq"].items()}
            out.frames = int(saved["frames"])
        except meta.MetaError as exc:
            if segments:
                log.warning("store: %s; reading every segment to rebuild the state", exc)
        except (KeyError, TypeError, ValueError, AttributeError):
            log.warning("store: store.meta has bad fields; reading every segment")
            out.last_seq, out.frames = {}, 0
            start_seg, start_off = (segments[0][0] if segments else 1), DATA_START
        todo = [(n, p) for n, p in segments if n >= start_seg]
        if not todo:
            out.segment = max([start_seg, *(n + 1 for n, _ in segments)])
            return out
        for i, (number, path) in enumerate(todo):
            newest = i == len(todo) - 1
            offset = start_off if number == start_seg else DATA_START
            end = self._segment(number, path, offset, newest=newest)
            if newest:
                if end is None:  # no usable header: never append behind it
                    out.segment, out.offset, out.fresh = number + 1, DATA_START, True
                else:
                    out.segment, out.offset, out.fresh = number, end, False
        return out

    def _segment(self, number: int, path: Path, offset: int, *, newest: bool) -> int | None:
        """Scan one segment from `offset`; the offset where its data ends, None if unusable."""
        with open(path, "r+b") as f:
            size = os.fstat(f.fileno()).st_size
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            try:
                try:
                    check_header(data, number)
                except SegmentError as exc:
                    if newest and _all_zero(data):
                        log.warning("store: %s was never written; starting it anew", path.name)
                        return write_segment(path, number, [], self.segment_bytes)
                    # keep what the body holds: the records carry their own CRCs
                    self._quarantine(number, path, f"bad header ({exc})", data)
                    return self._salvaged_end if newest else None
                if offset > size:
                    log.warning(
                        "store: %s (%d bytes) ends before its checkpoint (%d); reading it whole",
                        path.name,
                        size,
                        offset,
                    )
                    offset = DATA_START
                end = self._apply(scan(data, number, max(offset, DATA_START)))
                if end.clean:
                    return end.offset
                if newest and resync(data, end.offset) is None:
                    torn = self._zero_tail(f, end.offset, size)
                    log.warning(
                        "store: %s: %s at offset %d; torn tail of %d bytes cleared",
                        path.name,
                        end.reason,
                        end.offset,
                        torn,
                    )
                    return end.offset
                self._quarantine(number, path, f"{end.reason} at offset {end.offset}", data)
                return self._salvaged_end if newest else None
            finally:
                if isinstance(data, mmap.mmap):
                    data.close()

    def _apply(self, items: Iterator[Record | ScanEnd]) -> ScanEnd:
        """Fold scanned records into the replay window; the ScanEnd that ended them."""
        last = self.result.last_seq
        for item in items:
            if isinstance(item, ScanEnd):
                return item
            if item.seq > last.get(item.identity, 0):
                last[item.identity] = item.seq
            self.result.frames += 1
        raise AssertionError("scan always ends with a ScanEnd")

    def _zero_tail(self, f, start: int, size: int) -> int:
        """Zero the torn batch: it ends within commit_max_bytes (plus padding) of `start`."""
        end = min(size, start + self.commit_max_bytes + 2 * BLOCK)
        os.pwrite(f.fileno(), bytes(end - start), start)
        os.fdatasync(f.fileno())
        return end - start

    def _quarantine(self, number: int, path: Path, why: str, data) -> None:
        """Set a damaged segment aside and put its good records into a clean one of the same
        number, so the rest of the data is still served."""
        aside = path.with_name(f"{number:012d}{QUARANTINE_SUFFIX}")
        os.replace(path, aside)
        records = []
        bad = 0
        for item in scan_all(data, number):
            if isinstance(item, ScanEnd):
                bad += not item.clean
            else:
                records.append(item)
        self._salvaged_end = write_segment(
            path, number, records, self.segment_bytes, keep_offsets=True
        )
        last = self.result.last_seq
        for rec in records:
            if rec.seq > last.get(rec.identity, 0):
                last[rec.identity] = rec.seq
        fsync_dir(self.directory)
        log.error(
            "store: %s: %s; set aside as %s, %d good records kept in %s, %d damaged stretch(es)",
            path.name,
            why,
            aside.name,
            len(records),
            path.name,
            bad,
        )


def _all_zero(data, chunk: int = 1 << 20) -> bool:
    return all(
        data[i : i + chunk].count(0) == len(data[i : i + chunk]) for i in range(0, len(data), chunk)
    )


def write_segment(
    path: Path,
    number: int,
    records: Iterable[Record],
    segment_bytes: int,
    *,
    keep_offsets: bool = False,
) -> int:
    """A clean segment holding `records`; returns the offset where its data ends.

    With `keep_offsets` each record stays at its offset (padding fills the gaps left by
    damaged stretches), so readers' committed positions in the segment stay valid."""
    body = bytearray(encode_header(number, time.time_ns(), segment_bytes))
    for rec in records:
        gap = rec.offset - len(body)
        if keep_offsets and gap >= MIN_PAD:
            body += encode_padding(gap)
        body += encode_frame_record(
            rec.identity.encode(), rec.channel, rec.seq, rec.ts_ns, rec.recv_ns, rec.payload
        )
    end = len(body)
    pad = padding_to_block(end)
    if pad:
        body += encode_padding(pad)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, body)
        if len(body) < segment_bytes:
            os.posix_fallocate(fd, 0, segment_bytes)
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(body)


def read_segment_records(path: Path, number: int, start: int = DATA_START) -> Iterator[Record]:
    """The good records of one segment file, skipping damaged stretches."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                check_header(data, number)
            except SegmentError:
                return
            for item in scan_all(data, number, start):
                if not isinstance(item, ScanEnd):
                    yield item


def read_records(directory: str | os.PathLike) -> Iterator[Record]:
    """Every valid record, oldest first; safe beside a running daemon (a tail being
    written reads as the end)."""
    for number, path in list_segments(Path(directory)):
        yield from read_segment_records(path, number)
