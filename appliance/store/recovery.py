"""Recovery: from the checkpoint in store.meta to the end of the log, before anything is
appended (FORMAT.md, "Recovery: finding the end of the log").

Runs once, in the process that opens the store, before the writer starts. It
rebuilds the replay window (the highest stored seq per identity), makes the
end of the log unambiguous (whatever a torn batch left after the last good
record of the newest segment is zeroed and synced), and says where the next
commit goes: a block boundary in the newest segment, or a new segment when
the newest one cannot be appended to.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from appliance.durable import fsync_dir, make_dirs
from appliance.store import meta
from appliance.store.reader import (
    CHUNK,
    Damage,
    SegmentReader,
    describe,
    first_nonzero,
)
from appliance.store.segment import (
    BLOCK,
    DATA_START,
    MIN_PAD,
    QUARANTINE_SUFFIX,
    Record,
    SegmentError,
    check_header,
    encode_frame_record,
    encode_header,
    encode_padding,
    list_segments,
    padding_to_block,
)

log = logging.getLogger("appliance.store")


@dataclass
class Recovered:
    """What recovery found: the replay window and where the log goes on."""

    last_seq: dict[str, int] = field(default_factory=dict)
    frames: int = 0
    segment: int = 1  # the segment the next commit goes to
    offset: int = DATA_START  # where its data ends: always a block boundary
    fresh: bool = True  # the segment does not exist yet (or was unusable): create it


def recover(directory: Path, segment_bytes: int, commit_max_bytes: int) -> Recovered:
    """Read the checkpoint, scan from it to the tail, repair what a crash left.

    `commit_max_bytes` bounds what one commit writes (plus its padding): the most a
    power cut in the middle of a commit can leave behind the last good record."""
    make_dirs(directory)
    return _Recovery(Path(directory), segment_bytes, commit_max_bytes + 2 * BLOCK).run()


class _Recovery:
    def __init__(self, directory: Path, segment_bytes: int, torn_window: int) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.torn_window = torn_window
        self.result = Recovered()

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
        for number, path in todo[:-1]:
            self._sealed(number, path, start_off if number == start_seg else DATA_START)
        number, path = todo[-1]
        end = self._newest(number, path, start_off if number == start_seg else DATA_START)
        if end is None:  # no usable header: never append behind it
            out.segment, out.offset, out.fresh = number + 1, DATA_START, True
        else:
            out.segment, out.offset, out.fresh = number, end, False
        return out

    # -- one segment -------------------------------------------------------------------

    def _sealed(self, number: int, path: Path, offset: int) -> None:
        """A segment with a newer one after it: complete on flash before the newer one was
        created, so any damage in it is real."""
        with _mapped(path) as (_, data):
            try:
                check_header(data, number)
            except SegmentError as exc:
                self._quarantine(number, path, data, f"bad header ({exc})", counted=offset)
                return
            damages: list[Damage] = []
            reader = SegmentReader(data, number, report=damages.append)
            self._fold(reader.records(max(offset, DATA_START)))
            if damages:
                first = damages[0]
                why = f"{first.reason} at offset {first.offset}"
                self._quarantine(number, path, data, why, counted=len(data))

    def _newest(self, number: int, path: Path, offset: int) -> int | None:
        """The newest segment: the block boundary where appending goes on (None if the
        segment cannot be appended to)."""
        with _mapped(path) as (fd, data):
            try:
                check_header(data, number)
            except SegmentError as exc:
                if first_nonzero(data, 0) is None:  # created; the power went before its header
                    log.warning("store: %s was never written; starting it anew", path.name)
                    _write_header(fd, number, self.segment_bytes)
                    return DATA_START
                # keep what the body holds: the records carry their own CRCs
                return self._quarantine(number, path, data, f"bad header ({exc})", counted=offset)
            if offset > len(data):
                log.warning(
                    "store: %s (%d bytes) ends before its checkpoint (%d); reading it whole",
                    path.name,
                    len(data),
                    offset,
                )
                offset = DATA_START
            # Past the checkpoint nothing is known to be durable: the log is what chains
            # from it up to the first gap.
            reader = SegmentReader(data, number, trusted=offset)
            self._fold(reader.records(max(offset, DATA_START)))
            end, why = reader.end, describe(reader.stop)
            # What lies behind that gap: what a torn batch left, or damage with the log going
            # on after it. A torn batch is the last one written: all it left ends within one
            # commit of its first gap, and holds no commit boundary with data after it.
            damages: list[Damage] = []
            begun: list[int] = []  # frames that follow a padding record: a commit began there
            expect = end

            def on_damage(damage: Damage) -> None:
                nonlocal expect
                damages.append(damage)
                expect = damage.resumed

            behind = SegmentReader(data, number, report=on_damage)
            for rec in behind.records(end):
                if rec.offset != expect:  # scan skipped padding to get here
                    begun.append(rec.offset)
                expect = rec.end
            last = behind.end
            torn = next(
                (
                    d.offset
                    for d in damages
                    if last - d.offset <= self.torn_window and not any(b > d.offset for b in begun)
                ),
                last,
            )
            if torn > end:
                first = damages[0]
                why = f"{first.reason} at offset {first.offset}"
                return self._quarantine(number, path, data, why, counted=end, cut=torn)
            cleared = _clear_tail(fd, data, end)
            if cleared:
                log.warning(
                    "store: %s: %s at offset %d; torn tail of %d bytes cleared",
                    path.name,
                    why,
                    end,
                    cleared,
                )
            return end + padding_to_block(end)

    def _fold(self, records: Iterable[Record], counted: int = 0) -> None:
        """Fold records into the replay window; count those from offset `counted` on (the
        ones before it are counted already)."""
        last = self.result.last_seq
        for rec in records:
            if rec.seq > last.get(rec.identity, 0):
                last[rec.identity] = rec.seq
            self.result.frames += rec.offset >= counted

    def _quarantine(
        self, number: int, path: Path, data, why: str, *, counted: int, cut: int | None = None
    ) -> int:
        """Set a damaged segment aside and put its good records (those before `cut`) into a
        clean one of the same number, so the rest of the data is still served; the offset
        where the clean one's data ends. Records from `counted` on join the frame count.

        The clean copy is written and synced under a temporary name first, the damaged
        file linked aside, then the copy renamed over it: a power cut at any point leaves
        NNN.wal whole, damaged or clean."""
        damaged = 0

        def count(_: Damage) -> None:
            nonlocal damaged
            damaged += 1

        records = []
        reader = SegmentReader(data, number, report=count)
        with contextlib.closing(reader.records()) as good:
            for rec in good:
                if cut is not None and rec.offset >= cut:
                    break
                records.append(rec)
        tmp = path.with_name(path.name + ".tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        end = write_segment(tmp, number, records, self.segment_bytes, keep_offsets=True)
        aside = self._aside(number, path)
        if not aside.exists():
            os.link(path, aside)
            fsync_dir(self.directory)
        os.replace(tmp, path)
        fsync_dir(self.directory)
        self._fold(records, counted)
        log.error(
            "store: %s: %s; set aside as %s, %d good records kept in %s, %d damaged stretch(es)",
            path.name,
            why,
            aside.name,
            len(records),
            path.name,
            max(damaged, 1),
        )
        return end

    def _aside(self, number: int, path: Path) -> Path:
        """NNN.wal.quarantined, or .2, .3 ... if an earlier one holds other bytes; the same
        name if it is already this very file (a quarantine cut short by a crash)."""
        base = path.with_name(f"{number:012d}{QUARANTINE_SUFFIX}")
        aside, n = base, 1
        while aside.exists() and not os.path.samefile(aside, path):
            n += 1
            aside = base.with_name(f"{base.name}.{n}")
        return aside


@contextlib.contextmanager
def _mapped(path: Path) -> Iterator[tuple[int, object]]:
    """A segment open for writing and mapped for reading: (fd, bytes-like)."""
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size
        data = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if size else b""
        try:
            yield fd, data
        finally:
            if isinstance(data, mmap.mmap):
                data.close()
    finally:
        os.close(fd)


def _clear_tail(fd: int, data, end: int) -> int:
    """Make the end of the log unambiguous: zeros from `end` to the end of the file, synced,
    then a padding record from `end` to the next block boundary, synced. How many bytes
    after `end` were not zero (0: nothing needed clearing).

    The zeros go first: a padding that reached the disk before them would carry reading
    from `end` straight into whatever the torn batch left after the boundary."""
    size = len(data)
    last = end
    at = end
    while (at := first_nonzero(data, at)) is not None:
        chunk = data[at : min(size, at + CHUNK)]
        last = at + len(chunk.rstrip(b"\0"))
        os.pwrite(fd, bytes(len(chunk)), at)
        at += len(chunk)
    if last > end:
        os.fdatasync(fd)
    pad = padding_to_block(end)
    if pad:
        os.pwrite(fd, encode_padding(pad), end)
        os.fdatasync(fd)
    return last - end


def _write_header(fd: int, number: int, segment_bytes: int) -> None:
    os.pwrite(fd, encode_header(number, time.time_ns(), segment_bytes), 0)
    if os.fstat(fd).st_size < segment_bytes:
        os.posix_fallocate(fd, 0, segment_bytes)
    os.fdatasync(fd)


def write_segment(
    path: Path,
    number: int,
    records: Iterable[Record],
    segment_bytes: int,
    *,
    keep_offsets: bool = False,
) -> int:
    """A new segment file holding `records` (never one that exists, never through a link,
    mode 0600); returns the offset where its data ends, a block boundary.

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
    pad = padding_to_block(len(body))
    if pad:
        body += encode_padding(pad)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(body)
        while view:
            view = view[os.write(fd, view) :]
        if len(body) < segment_bytes:
            os.posix_fallocate(fd, 0, segment_bytes)
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(body)
