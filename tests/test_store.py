"""store/: the Store on real files with real fdatasync, in a temp dir (no daemon).

Sizes are small (1 MiB segments, 1 MiB ring) so rotation, a full ring and retention show up
after a few MiB. A crash is a subprocess that commits and then os._exit()s: no close(), so no
checkpoint at the tail, which is what SIGKILL (or a power cut after the fdatasync) leaves.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from conftest import ROOT, wait_for

from appliance.store import meta
from appliance.store.cursor import Cursor
from appliance.store.reader import read_records
from appliance.store.recovery import write_segment
from appliance.store.segment import (
    BLOCK,
    DATA_START,
    FRAME_HEAD,
    MIN_PAD,
    QUARANTINE_SUFFIX,
    TYPE_FRAME,
    TYPE_PAD,
    Record,
    check_header,
    encode_frame_record,
    encode_padding,
    list_segments,
    padding_to_block,
    segment_name,
)
from appliance.store.wal import Store

MiB = 1024 * 1024
SMALL = {"segment_bytes": MiB, "ring_bytes": MiB}
T0 = 1_700_000_000_000_000_000  # ts_ns = T0 + seq, recv_ns = T0 + seq + 7
WAIT = 10.0  # deadline for a commit (fdatasync on a slow CI disk)
HOUSEKEEPING = 5.0  # deadline for retention: the committer looks about once a second
A = "dev/core-0"
B = "m-1/core-ü"  # identities are UTF-8
RECORD_512 = 512 - FRAME_HEAD - len(A)  # the payload that makes a record of A 512 bytes

# (identity, channel, seq, payload)
Frame = tuple[str, int, int, bytes]


def payload(ident: str, seq: int, size: int) -> bytes:
    head = f"{ident}#{seq}#".encode()
    return (head + random.Random(f"{ident}/{seq}").randbytes(size))[:size]


def make(ident: str, seqs, size: int = 200, channel: int = 1) -> list[Frame]:
    return [(ident, channel, seq, payload(ident, seq, size)) for seq in seqs]


def encode(frame: Frame) -> bytes:
    ident, channel, seq, data = frame
    return encode_frame_record(ident.encode(), channel, seq, T0 + seq, T0 + seq + 7, data)


def marks_of(frames: list[Frame]) -> dict[str, int]:
    marks: dict[str, int] = {}
    for ident, _, seq, _ in frames:
        marks[ident] = max(marks.get(ident, 0), seq)
    return marks


class Harness:
    """A Store and the frames the test put in it."""

    def __init__(self, directory: Path, **options) -> None:
        self.directory = directory
        self.store = Store(directory, **{**SMALL, **options})
        self.done: list[dict[str, int]] = []  # what completed() returned, in order

    def open(self) -> Harness:
        self.store.open()
        return self

    def append(self, frames: list[Frame]) -> int:
        """Append as the loop does, one call per run of one identity's frames; returns how
        many went in (the rest did not fit)."""
        done = 0
        for ident, group in itertools.groupby(frames, key=lambda f: f[0]):
            run = list(group)
            n = self.store.append([encode(f) for f in run], ident, [f[2] for f in run])
            done += n
            if n < len(run):
                break
        return done

    def submit(self) -> None:
        self.store.submit()

    def pump(self) -> None:
        """Read the writer's news, as the loop does when the store's socket is readable."""
        self.done += self.store.completed()

    def until(self, condition, timeout: float, what: str) -> None:
        def check() -> bool:
            self.pump()
            return condition()

        wait_for(check, timeout, what)

    def wait_durable(self) -> None:
        self.until(lambda: self.store.pending_bytes() == 0, WAIT, "the commit")

    def commit(self, frames: list[Frame]) -> None:
        """Append, submit and wait until durable: one commit (the committer batches what it
        finds in the ring; nothing else is appended meanwhile)."""
        assert self.append(frames) == len(frames), "the ring refused frames"
        self.submit()
        self.wait_durable()

    def close(self) -> None:
        self.store.close()


def stored(directory: Path) -> list[tuple[str, int]]:
    return [(r.identity, r.seq) for r in read_records(directory)]


def keys(frames: list[Frame]) -> list[tuple[str, int]]:
    return [(f[0], f[2]) for f in frames]


def numbers(directory: Path) -> list[int]:
    return [n for n, _ in list_segments(directory)]


def seg_path(directory: Path, number: int) -> Path:
    return directory / segment_name(number)


def disk_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for _, path in list_segments(directory))


def checkpoint(directory: Path) -> tuple[int, int]:
    seg, off = meta.read(directory / meta.STORE_META)["checkpoint"]
    return seg, off


def raw_records(data: bytes, start: int = DATA_START):
    """(offset, type, size) of each record up to the zero tail, decoded by hand from FORMAT.md
    rather than with segment.scan, and every CRC checked."""
    pos = start
    while pos + 8 <= len(data):
        crc, length = struct.unpack_from(">II", data, pos)
        if crc == 0 and length == 0:
            return
        assert zlib.crc32(data[pos + 4 : pos + 8 + length]) == crc, f"bad CRC at {pos}"
        yield pos, data[pos + 8], 8 + length
        pos += 8 + length


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x5A]))


def log_lines(caplog, level: int) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("appliance") and r.levelno >= level
    ]


CRASHER = """
import itertools, json, os, sys, time
from appliance.store.segment import encode_frame_record
from appliance.store.wal import Store

spec = json.loads(sys.stdin.read())
store = Store(spec["directory"], **spec["options"])
store.open()
positions = []
for batch in spec["batches"]:
    for ident, group in itertools.groupby(batch, key=lambda f: f[0]):
        run = list(group)
        records = [
            encode_frame_record(i.encode(), c, s, t, t + 7, bytes.fromhex(p))
            for i, c, s, t, p in run
        ]
        n = store.append(records, ident, [f[2] for f in run])
        assert n == len(run), "the ring refused frames"
    store.submit()
    deadline = time.monotonic() + 10
    while store.pending_bytes():
        assert time.monotonic() < deadline, "commit timed out"
        time.sleep(0.001)
        store.completed()
    positions.append(store.durable_position())
print(json.dumps(positions), flush=True)
os._exit(0)  # no close(): the checkpoint stays where open() or the last rotation put it
"""


def crash_after(directory: Path, batches: list[list[Frame]], **options) -> list[tuple[int, int]]:
    """Open the store in a subprocess, make each batch durable in its own commit, then die
    without close(). Returns the durable (segment, offset) after each batch."""
    spec = {
        "directory": str(directory),
        "options": {**SMALL, **options},
        "batches": [[(i, c, s, T0 + s, p.hex()) for i, c, s, p in batch] for batch in batches],
    }
    result = subprocess.run(
        [sys.executable, "-c", CRASHER],
        input=json.dumps(spec).encode(),
        capture_output=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    return [tuple(p) for p in json.loads(result.stdout)]


@pytest.fixture
def wal(tmp_path) -> Path:
    return tmp_path / "wal"


# -- append, commit, read ------------------------------------------------------------------


def test_a_new_store_has_one_preallocated_segment_and_a_checkpoint(wal):
    h = Harness(wal).open()
    try:
        assert numbers(wal) == [1]
        path = seg_path(wal, 1)
        st = path.stat()
        assert st.st_size == MiB
        assert st.st_blocks * 512 >= MiB, "segment not preallocated"
        data = path.read_bytes()
        assert check_header(data, 1) == 1
        assert not any(data[DATA_START:]), "a new segment is zero after its header block"
        assert h.store.durable_position() == (1, DATA_START)
        assert checkpoint(wal) == (1, DATA_START)
        assert h.store.last_seq == {} and h.store.frames == 0
    finally:
        h.close()
    assert list(read_records(wal)) == []


def test_completed_gives_the_marks_once_durable_and_in_order(wal):
    h = Harness(wal).open()
    frames = make(A, range(1, 11))
    assert h.append(frames) == 10
    h.submit()
    h.wait_durable()
    assert h.done == [{A: 10}]
    assert stored(wal) == keys(frames)

    # many small submissions in a row: the committer may fold several into one commit, but
    # the marks come back in order, and when a mark comes back its frames are on disk
    sent: list[Frame] = []
    seen: dict[str, int] = {A: 10}
    for n in range(40):
        ident = (A, B)[n % 2]
        seq0 = 11 + n // 2 * 3
        batch = make(ident, range(seq0, seq0 + 3), size=50 + n)
        assert h.append(batch) == 3
        h.submit()
        sent += batch
        done = h.store.completed()
        h.done += done
        for marks in done:
            on_disk = set(stored(wal))
            for ident_, seq in marks.items():
                assert seq > seen.get(ident_, 0), f"marks went backwards: {marks} after {seen}"
                seen[ident_] = seq
                assert all((i, s) in on_disk for i, _, s, _ in sent if i == ident_ and s <= seq), (
                    f"completed() returned {marks} before the frames were durable"
                )
    h.wait_durable()
    final: dict[str, int] = {}
    for marks in h.done:
        final.update(marks)
    assert final == marks_of(make(A, range(1, 11)) + sent)
    h.close()
    assert stored(wal) == keys(make(A, range(1, 11)) + sent)


def test_every_commit_ends_on_a_block_boundary(wal):
    """Each commit is padded with a padding record to a 4 KiB boundary; a gap of 1 to 8
    bytes (too short for a padding record) is padded to the boundary after next."""
    h = Harness(wal).open()
    rng = random.Random(7)
    ident = "a/b"
    per_record = FRAME_HEAD + len(ident)
    ends = [DATA_START]
    seq = 0
    plans = [[rng.randrange(0, 3000) for _ in range(rng.randrange(1, 12))] for _ in range(25)]
    plans += [
        [BLOCK - per_record - 5],  # a gap of 5 bytes: padded to the boundary after next
        [BLOCK - per_record - MIN_PAD],  # the smallest padding record
        [BLOCK - per_record],  # exactly one block: no padding at all
        [0],
        [3 * BLOCK + 17],  # a record longer than a block
    ]
    for sizes in plans:
        frames = [(ident, 1, seq + i + 1, bytes([i % 256]) * n) for i, n in enumerate(sizes)]
        seq += len(sizes)
        h.commit(frames)
        seg, off = h.store.durable_position()
        assert seg == 1
        assert off % BLOCK == 0, f"commit ended at {off}, not on a block boundary"
        ends.append(off)
    h.close()
    gaps = [b - a for a, b in itertools.pairwise(ends)]
    assert gaps[-5:] == [2 * BLOCK, BLOCK, BLOCK, BLOCK, 4 * BLOCK]

    data = seg_path(wal, 1).read_bytes()
    records = list(raw_records(data))
    pads = [(off, size) for off, kind, size in records if kind == TYPE_PAD]
    assert {kind for _, kind, _ in records} == {TYPE_FRAME, TYPE_PAD}
    # the records tile the file from the header to the last commit without a hole
    pos = DATA_START
    for off, _, size in records:
        assert off == pos
        pos += size
    assert pos == ends[-1]
    # padding ends exactly the commits that needed it, and only those
    assert all(size >= MIN_PAD for _, size in pads)
    assert {off + size for off, size in pads} <= set(ends)
    assert len(pads) == len(ends) - 1 - 1  # every commit but the exactly-one-block one
    assert sum(1 for _, kind, _ in records if kind == TYPE_FRAME) == seq
    assert not any(data[ends[-1] :])


def test_read_records_returns_every_field(wal):
    h = Harness(wal).open()
    frames = [
        (A, 1, 1, b"hello"),
        (B, 0xFFFF, 7, b""),
        (A, 0, 2, bytes(range(256)) * 256),  # 64 KiB
        (B, 3, 2**63, b"\0" * 100),  # zeros inside a record are data, not the end
        ("x" * 300, 5, 3, b"long identity"),
    ]
    h.commit(frames[:2])
    h.commit(frames[2:])
    h.close()
    records = list(read_records(wal))
    assert [(r.identity, r.channel, r.seq, r.payload) for r in records] == [
        (i, c, s, p) for i, c, s, p in frames
    ]
    assert [(r.ts_ns, r.recv_ns) for r in records] == [(T0 + f[2], T0 + f[2] + 7) for f in frames]
    assert all(r.segment == 1 for r in records)
    assert records[0].offset == DATA_START
    for r, nxt in itertools.pairwise(records):
        assert r.end == r.offset + FRAME_HEAD + len(r.identity.encode()) + len(r.payload)
        assert nxt.offset >= r.end
    assert records[2].offset % BLOCK == 0  # the second commit starts on a block boundary


def test_rotation_fills_preallocated_segments_in_order(wal):
    h = Harness(wal).open()
    frames = make(A, range(1, 1001), size=3900)  # about 3.8 MiB: four segments
    for i in range(0, len(frames), 40):
        h.commit(frames[i : i + 40])
    newest = numbers(wal)[-1]
    assert numbers(wal) == list(range(1, newest + 1)) and newest >= 4
    assert checkpoint(wal)[0] == newest, "no checkpoint written at the last rotation"
    end = h.store.durable_position()
    h.close()
    for number, path in list_segments(wal):
        st = path.stat()
        assert st.st_size == MiB, path.name
        assert st.st_blocks * 512 >= MiB, f"{path.name} is not preallocated"
        assert check_header(path.read_bytes(), number) == number
    records = list(read_records(wal))
    assert [r.seq for r in records] == list(range(1, 1001))
    assert [r.payload for r in records] == [f[3] for f in frames]
    assert all(r.end <= MiB for r in records)
    assert [r.segment for r in records] == sorted(r.segment for r in records)
    # a segment is filled before the next one starts: less than two records' room is left
    for number in range(1, newest):
        last = max(r.end for r in records if r.segment == number)
        assert MiB - last < 2 * (3900 + FRAME_HEAD + len(A)) + 2 * BLOCK, (number, last)
    assert checkpoint(wal) == end  # close() puts it at the tail


def test_a_commit_that_starts_in_a_new_segment_creates_exactly_one(wal):
    """At a low rate each commit holds one frame, so the frame that fills a segment is the
    first of its commit: the rotation must start one new segment, not an empty one (a whole
    preallocated segment for nothing, counted against the quota) and then another."""
    h = Harness(wal).open()
    for seq in range(1, 81):
        h.commit(make(A, [seq], size=30_000))  # 34 to a segment
    h.close()
    used = sorted({r.segment for r in read_records(wal)})
    assert numbers(wal) == used == [1, 2, 3], "segments without a record"
    assert [s for _, s in stored(wal)] == list(range(1, 81))


def test_a_full_ring_refuses_appends_until_a_commit_frees_it(wal):
    h = Harness(wal).open()
    accepted: list[Frame] = []
    size = 4000
    seq = 0
    refused = None
    # appended but not submitted: the committer is not told, so the ring fills up
    while refused is None:
        seq += 1
        frame = make(A, [seq], size=size)
        if h.append(frame) == 0:
            refused = frame
        else:
            accepted += frame
        assert seq < 20 * MiB // size, "the ring never refused"
    record = len(encode(refused[0]))
    assert len(accepted) >= (MiB - 2 * BLOCK) // record
    assert h.store.pending_bytes() <= MiB
    assert h.append(make(A, [seq + 1, seq + 2], size=size)) == 0  # a list: none of it fits

    h.submit()
    h.wait_durable()
    assert h.append(refused) == 1
    h.submit()
    h.wait_durable()
    h.close()
    assert stored(wal) == keys([*accepted, *refused])


def test_close_commits_what_was_appended_and_submitted(wal):
    h = Harness(wal).open()
    frames = make(A, range(1, 301))
    assert h.append(frames) == 300
    h.submit()
    h.close()
    assert stored(wal) == keys(frames)
    *_, (off, _, size) = raw_records(seg_path(wal, 1).read_bytes())
    assert checkpoint(wal) == (1, off + size)  # at the tail
    saved = meta.read(wal / meta.STORE_META)
    assert saved["last_seq"] == {A: 300} and saved["frames"] == 300


# -- reopening and recovery --------------------------------------------------------------


def test_reopen_after_close_starts_from_the_checkpoint_at_the_tail(wal, caplog):
    h = Harness(wal).open()
    h.commit(make(A, range(1, 51)) + make(B, range(1, 4)))
    h.commit(make(A, range(51, 61)))
    end = h.store.durable_position()
    h.close()
    assert checkpoint(wal) == end
    assert meta.read(wal / meta.STORE_META)["last_seq"] == {A: 60, B: 3}

    caplog.set_level(logging.INFO)
    h = Harness(wal).open()
    assert h.store.last_seq == {A: 60, B: 3}
    assert h.store.frames == 63
    assert h.store.durable_position() == end
    h.commit(make(B, range(4, 6)))
    h.close()
    assert stored(wal)[-3:] == [(A, 60), (B, 4), (B, 5)]
    assert log_lines(caplog, logging.WARNING) == []


def test_reopen_after_a_crash_rebuilds_last_seq_from_the_checkpoint_and_the_tail(wal, caplog):
    h = Harness(wal).open()
    h.commit(make(A, range(1, 101)))
    h.close()  # checkpoint: A up to 100
    at = checkpoint(wal)
    positions = crash_after(wal, [make(B, range(1, 21)), make(A, range(101, 111))])
    assert checkpoint(wal) == at, "the crashed store wrote a checkpoint after its open"
    assert meta.read(wal / meta.STORE_META)["last_seq"] == {A: 100}

    caplog.set_level(logging.INFO)
    h = Harness(wal).open()
    assert h.store.last_seq == {A: 110, B: 20}
    assert h.store.frames == 130
    assert h.store.durable_position() == positions[-1]
    # the state is saved at once: a second crash does not have to scan the tail again
    assert checkpoint(wal) == positions[-1]
    assert meta.read(wal / meta.STORE_META)["last_seq"] == {A: 110, B: 20}
    h.commit(make(A, [111]))
    h.close()
    assert log_lines(caplog, logging.WARNING) == []
    assert stored(wal) == keys(
        make(A, range(1, 101)) + make(B, range(1, 21)) + make(A, range(101, 112))
    )


def test_recovery_reads_only_from_the_checkpoint(wal, caplog):
    """Damage before the checkpoint is not seen by open() (it does not scan there); readers
    that meet it skip the damaged record and go on at the next one, which its length says."""
    h = Harness(wal).open()
    for n in range(1, 51, 10):
        h.commit(make(A, range(n, n + 10)))
    h.close()
    victim = next(r for r in read_records(wal) if r.seq == 24)
    flip(seg_path(wal, 1), victim.offset + FRAME_HEAD + 5)

    caplog.set_level(logging.INFO)
    h = Harness(wal).open()
    assert h.store.last_seq == {A: 50} and h.store.frames == 50
    assert not list(wal.glob("*" + QUARANTINE_SUFFIX))
    assert log_lines(caplog, logging.WARNING) == []
    h.commit(make(A, [51]))
    h.close()
    assert [s for _, s in stored(wal)] == [s for s in range(1, 52) if s != 24]


@pytest.mark.parametrize("damage", ["half-record", "garbage", "cut"])
def test_a_torn_tail_is_cleared_with_one_warning_and_appending_goes_on(wal, caplog, damage):
    batches = [make(A, range(n, n + 20)) for n in range(1, 61, 20)]
    positions = crash_after(wal, batches)
    seg, end = positions[-1]
    path = seg_path(wal, seg)
    kept = list(range(1, 61))
    if damage == "half-record":
        # the start of a commit that never finished: a record's first half, then zeros
        record = encode(make(A, [61], size=3000)[0])
        with open(path, "r+b") as f:
            f.seek(end)
            f.write(record[: len(record) // 2])
    elif damage == "garbage":
        with open(path, "r+b") as f:
            f.seek(end)
            f.write(random.Random(3).randbytes(777))
    else:  # the file ends in the middle of the last record
        last = list(read_records(wal))[-1]
        os.truncate(path, last.offset + 30)
        kept = kept[:-1]

    caplog.set_level(logging.INFO)
    h = Harness(wal).open()
    warnings = log_lines(caplog, logging.WARNING)
    assert len(warnings) == 1 and "torn tail" in warnings[0] and path.name in warnings[0], warnings
    assert h.store.last_seq == {A: kept[-1]}
    assert path.stat().st_size == MiB
    h.commit(make(A, range(61, 71)))
    h.close()
    assert [s for _, s in stored(wal)] == [*kept, *range(61, 71)]
    assert [r.payload for r in read_records(wal)][-10:] == [f[3] for f in make(A, range(61, 71))]

    caplog.clear()
    Harness(wal).open().close()
    assert log_lines(caplog, logging.WARNING) == [], "the repair did not stick"


def torn_commit(path: Path, at: int, frames: list[Frame], kept_blocks) -> bytes:
    """Leave what a power cut in the middle of one commit at `at` can: the commit laid out as
    the writer does (records, then padding to a block boundary), but only the given 4 KiB
    blocks of it on disk. Returns the whole commit."""
    body = b"".join(encode(f) for f in frames)
    pad = padding_to_block(at + len(body))
    body += encode_padding(pad) if pad else b""
    with open(path, "r+b") as f:
        for i in kept_blocks:
            f.seek(at + i * BLOCK)
            f.write(body[i * BLOCK : (i + 1) * BLOCK])
    return body


@pytest.mark.parametrize("lost", [[0], [1], [4, 6]], ids=["first", "second", "two"])
def test_stale_blocks_of_a_torn_commit_never_come_back(wal, caplog, lost):
    """The power went in the middle of a commit, and later blocks of it reached the disk
    while an earlier one did not (issue 9). With 512-byte records every block starts with a
    valid record. Recovery must not take the gap for the end of the log and append in front
    of the stale blocks: after a short commit, a stop and a restart they would read as data
    (frames never acknowledged; seqs past a gap, so a core's replay window jumps)."""
    positions = crash_after(wal, [make(A, range(1, 41), size=RECORD_512)])
    seg, end = positions[-1]
    path = seg_path(wal, seg)
    frames = make(A, range(41, 121), size=RECORD_512)  # 80 records: 10 blocks, no padding
    body = torn_commit(path, end, frames, [i for i in range(10) if i not in lost])
    assert len(body) == 10 * BLOCK
    kept = list(range(1, 41 + 8 * lost[0]))  # what comes before the first lost block

    caplog.set_level(logging.INFO)
    h = Harness(wal).open()
    warnings = log_lines(caplog, logging.WARNING)
    assert len(warnings) == 1 and "torn tail" in warnings[0], warnings
    assert h.store.last_seq == {A: kept[-1]}
    new_end = end + 8 * lost[0] * 512
    assert h.store.durable_position() == (seg, new_end)
    assert not any(path.read_bytes()[new_end:]), "the torn commit was not cleared"
    h.commit(make(A, range(kept[-1] + 1, kept[-1] + 4)))  # one core back, a short commit
    h.close()
    caplog.clear()
    h = Harness(wal).open()
    h.close()
    assert log_lines(caplog, logging.WARNING) == []
    assert [s for _, s in stored(wal)] == [*kept, *range(kept[-1] + 1, kept[-1] + 4)]
    assert not list(wal.glob("*" + QUARANTINE_SUFFIX))


def test_a_torn_commit_ending_mid_block_is_padded_to_the_boundary(wal, caplog):
    """When the records that survived end inside a block, recovery closes that block with
    a padding record: the next commit starts on a boundary and never rewrites a block that
    holds records."""
    positions = crash_after(wal, [make(A, range(1, 11))])
    seg, end = positions[-1]
    path = seg_path(wal, seg)
    frames = [make(A, [10 + n], size=150 + 37 * n)[0] for n in range(1, 40)]
    torn_commit(path, end, frames, [0, 2, 3])
    ends = itertools.accumulate(len(encode(f)) for f in frames)
    whole = [f for f, e in zip(frames, ends, strict=True) if e <= BLOCK]  # all of it in block 0

    caplog.set_level(logging.INFO)
    h = Harness(wal).open()
    assert h.store.last_seq == {A: whole[-1][2]}
    seg2, at = h.store.durable_position()
    assert seg2 == seg and at == end + BLOCK  # padded to the boundary after the survivors
    h.commit(make(A, [100]))
    h.close()
    assert [s for _, s in stored(wal)] == [*range(1, 11), *(f[2] for f in whole), 100]
    assert next(r for r in read_records(wal) if r.seq == 100).offset == end + BLOCK


def test_damage_in_the_last_commit_of_the_newest_segment_reads_as_a_torn_tail(wal, caplog):
    """The limit of a format without a commit number: damage in the last commit of the
    newest segment looks like a commit the power cut short, so the rest of that commit is
    cleared (said once) rather than the segment set aside. Damage with a commit after it is
    set aside (test_damage_mid_segment_is_quarantined_and_the_good_records_kept)."""
    batches = [make(A, range(n, n + 20), size=300) for n in range(1, 61, 20)]
    crash_after(wal, batches)
    victim = next(r for r in read_records(wal) if r.seq == 45)
    flip(seg_path(wal, 1), victim.offset + FRAME_HEAD + 10)

    caplog.set_level(logging.INFO)
    h = Harness(wal).open()
    warnings = log_lines(caplog, logging.WARNING)
    assert len(warnings) == 1 and "torn tail" in warnings[0], warnings
    assert h.store.last_seq == {A: 44}
    h.close()
    assert not list(wal.glob("*" + QUARANTINE_SUFFIX))
    assert [s for _, s in stored(wal)] == list(range(1, 45))


def test_damage_with_valid_data_beyond_one_commit_is_set_aside(wal, caplog):
    """Valid data further than one commit (commit_max_bytes and padding) after the damage
    cannot be what a torn commit left: the segment is damaged, and set aside."""
    records = [
        Record(1, 0, A, 1, seq, T0 + seq, T0 + seq + 7, payload(A, seq, 1000), 0)
        for seq in range(1, 300)
    ]
    wal.mkdir()
    write_segment(seg_path(wal, 1), 1, records, MiB)  # one stretch of records, no padding
    victim = next(r for r in read_records(wal) if r.seq == 5)
    flip(seg_path(wal, 1), victim.offset + FRAME_HEAD + 10)

    caplog.set_level(logging.INFO)
    h = Harness(wal, commit_max_bytes=65536).open()
    errors = log_lines(caplog, logging.ERROR)
    assert len(errors) == 1 and "set aside" in errors[0], errors
    assert h.store.last_seq == {A: 299}
    h.close()
    assert [s for _, s in stored(wal)] == [s for s in range(1, 300) if s != 5]


def test_a_newest_segment_cut_below_the_checkpoint_still_opens(wal, caplog):
    """A clean stop puts the checkpoint at the tail; if the file then loses its tail (a bad
    copy, a file system repair), open() must still start: say so, keep what is there."""
    h = Harness(wal).open()
    for n in range(1, 61, 20):
        h.commit(make(A, range(n, n + 20)))
    h.close()
    last = list(read_records(wal))[-1]
    os.truncate(seg_path(wal, 1), last.offset + 30)

    caplog.set_level(logging.INFO)
    h = Harness(wal)
    h.open()  # must not raise
    assert log_lines(caplog, logging.WARNING), "the damage was not logged"
    h.commit(make(A, range(61, 63)))
    h.close()
    assert [s for _, s in stored(wal)] == [*range(1, 60), 61, 62]


def test_damage_mid_segment_is_quarantined_and_the_good_records_kept(wal, caplog):
    batches = [make(A, range(n, n + 20), size=300) for n in range(1, 101, 20)]
    positions = crash_after(wal, batches)
    path = seg_path(wal, 1)
    third = [r for r in read_records(wal) if 41 <= r.seq <= 60]
    flip(path, third[5].offset + FRAME_HEAD + 10)  # the payload of seq 46
    damaged = path.read_bytes()

    caplog.set_level(logging.INFO)
    h = Harness(wal).open()
    errors = log_lines(caplog, logging.ERROR)
    assert len(errors) == 1, errors
    assert "000000000001.wal.quarantined" in errors[0] and "CRC mismatch" in errors[0]
    assert log_lines(caplog, logging.WARNING) == errors
    aside = wal / ("000000000001" + QUARANTINE_SUFFIX)
    assert aside.read_bytes() == damaged, "the damaged segment was not set aside untouched"
    kept = [s for s in range(1, 101) if s != 46]  # only the damaged record is lost
    assert h.store.last_seq == {A: 100}
    assert [s for _, s in stored(wal)] == kept  # before and after the damage
    h.commit(make(A, range(101, 111), size=300))
    h.close()
    records = list(read_records(wal))
    assert [r.seq for r in records] == [*kept, *range(101, 111)]
    want = {f[2]: f[3] for b in [*batches, make(A, range(101, 111), size=300)] for f in b}
    assert all(r.payload == want[r.seq] for r in records)
    assert positions[-1][0] == 1 and numbers(wal) == [1]

    caplog.clear()
    h = Harness(wal).open()
    assert log_lines(caplog, logging.WARNING) == []  # said once, not at every start
    assert h.store.last_seq == {A: 110}
    h.close()


def test_a_zero_filled_preallocated_tail_is_the_normal_end(wal, caplog):
    positions = crash_after(wal, [make(A, range(1, 11)), make(A, range(11, 21))])
    seg, end = positions[-1]
    data = seg_path(wal, seg).read_bytes()
    assert len(data) == MiB and not any(data[end:])

    caplog.set_level(logging.INFO)
    h = Harness(wal).open()
    assert log_lines(caplog, logging.WARNING) == []
    assert h.store.durable_position() == (seg, end)
    assert h.store.last_seq == {A: 20}
    h.commit(make(A, [21]))
    assert list(read_records(wal))[-1].offset == end  # appending goes on right there
    h.close()


@pytest.mark.parametrize("size", [0, MiB])
def test_a_newest_segment_whose_header_never_reached_the_disk_is_started_anew(wal, caplog, size):
    """A crash between creating (or preallocating) a segment and writing its header."""
    h = Harness(wal).open()
    h.commit(make(A, range(1, 11)))
    h.close()
    path = seg_path(wal, 2)
    with open(path, "wb") as f:
        f.truncate(size)

    caplog.set_level(logging.INFO)
    h = Harness(wal).open()
    warnings = log_lines(caplog, logging.WARNING)
    assert len(warnings) == 1 and path.name in warnings[0], warnings
    assert h.store.last_seq == {A: 10}
    h.commit(make(A, range(11, 21)))
    h.close()
    assert [s for _, s in stored(wal)] == list(range(1, 21))
    assert path.stat().st_size == MiB and check_header(path.read_bytes(), 2) == 2
    assert not list(wal.glob("*" + QUARANTINE_SUFFIX))


@pytest.mark.parametrize("damage", ["zeroed", "flipped"])
def test_a_newest_segment_with_a_damaged_header_is_set_aside_and_its_records_kept(
    wal, caplog, damage
):
    batches = [make(A, range(n, n + 20)) for n in range(1, 61, 20)]
    crash_after(wal, batches)
    path = seg_path(wal, 1)
    with open(path, "r+b") as f:
        if damage == "zeroed":
            f.write(bytes(DATA_START))
        else:
            f.seek(20)
            f.write(b"\xff")
    damaged = path.read_bytes()

    caplog.set_level(logging.INFO)
    h = Harness(wal).open()
    errors = log_lines(caplog, logging.ERROR)
    assert len(errors) == 1 and "bad header" in errors[0] and "60 good records" in errors[0]
    assert (wal / ("000000000001" + QUARANTINE_SUFFIX)).read_bytes() == damaged
    assert h.store.last_seq == {A: 60}
    h.commit(make(A, range(61, 71)))
    h.close()
    assert [s for _, s in stored(wal)] == list(range(1, 71))


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "missing", "bad-fields"])
def test_a_damaged_store_meta_means_a_full_scan(wal, caplog, damage):
    h = Harness(wal).open()
    fill(h, 1, 600, size=3000)  # two segments
    h.commit(make(B, range(1, 11)))
    h.close()
    crash_after(wal, [make(B, range(11, 21))])
    assert numbers(wal) == [1, 2]
    path = wal / meta.STORE_META
    text = path.read_bytes()
    if damage == "flip":
        flip(path, text.index(b"last_seq") + 2)
    elif damage == "truncate":
        path.write_bytes(text[: len(text) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "missing":
        path.unlink()
    else:  # a well-formed file with the wrong content
        meta.write(path, {"version": 1, "checkpoint": [3, "x"]})

    caplog.set_level(logging.INFO)
    h = Harness(wal).open()
    warnings = log_lines(caplog, logging.WARNING)
    assert len(warnings) == 1 and "every segment" in warnings[0], warnings
    assert h.store.last_seq == {A: 600, B: 20}
    assert h.store.frames == 620
    # the rebuilt state is saved at once
    saved = meta.read(path)
    assert saved["last_seq"] == {A: 600, B: 20} and saved["frames"] == 620
    h.commit(make(B, [21]))
    h.close()
    assert stored(wal) == keys(make(A, range(1, 601)) + make(B, range(1, 22)))


def test_damage_in_a_sealed_segment_is_quarantined_by_the_full_scan(wal, caplog):
    h = Harness(wal).open()
    for n in range(1, 801, 50):
        h.commit(make(A, range(n, n + 50), size=3000))  # segment 1 fills with commits of 50
    h.close()
    assert numbers(wal) == [1, 2, 3]
    victim = next(r for r in read_records(wal) if r.seq == 120)
    flip(seg_path(wal, 1), victim.offset + 100)
    (wal / meta.STORE_META).unlink()

    caplog.set_level(logging.INFO)
    h = Harness(wal).open()
    errors = log_lines(caplog, logging.ERROR)
    assert len(errors) == 1 and "000000000001.wal" in errors[0], errors
    assert (wal / ("000000000001" + QUARANTINE_SUFFIX)).exists()
    assert h.store.last_seq == {A: 800}
    h.close()
    assert [s for _, s in stored(wal)] == [s for s in range(1, 801) if s != 120]


# -- cursors -------------------------------------------------------------------------------


def test_a_new_cursor_starts_at_the_oldest_record_and_registers(wal):
    h = Harness(wal).open()
    for n in range(1, 801, 100):
        h.commit(make(A, range(n, n + 100), size=3000))
    h.close()
    assert numbers(wal)[0] == 1 and len(numbers(wal)) >= 3
    seg_path(wal, 1).unlink()  # retention took the oldest
    first = next(iter(read_records(wal)))

    cursor = Cursor(wal, "archive")
    assert cursor.position == (2, DATA_START)
    assert meta.read_cursor(wal, "archive") == (2, DATA_START), "not registered"
    assert [r.seq for r in cursor.read(5)] == list(range(first.seq, first.seq + 5))


def test_a_cursor_resumes_after_its_commit_and_rereads_what_it_did_not_commit(wal):
    h = Harness(wal).open()
    frames = make(A, range(1, 701), size=3000)  # two segments and a bit
    for i in range(0, 700, 70):
        h.commit(frames[i : i + 70])
    h.close()

    cursor = Cursor(wal, "index")
    got = cursor.read(300)
    assert [r.seq for r in got] == list(range(1, 301))
    cursor.commit()
    assert cursor.read(200)[-1].seq == 500  # read, then "crashed" before committing

    again = Cursor(wal, "index")
    assert again.position == (got[-1].segment, got[-1].end)
    rest = again.read(10_000)
    assert [r.seq for r in rest] == list(range(301, 701))  # at least once: 301-500 again
    assert [r.payload for r in rest] == [f[3] for f in frames[300:]]
    assert {r.segment for r in rest} == set(numbers(wal))
    again.commit()
    assert again.read() == []
    assert Cursor(wal, "index").read() == []
    assert Cursor(wal, "other").read(10_000)[-1].seq == 700  # cursors are independent


def test_a_cursor_on_the_live_store_reads_every_durable_record_once(wal):
    h = Harness(wal).open()
    cursor = Cursor(wal, "live")
    seen: list[int] = []
    for n in range(1, 1201, 60):  # across three segments, read as it is written
        h.commit(make(A, range(n, n + 60), size=2500))
        for record in cursor.read(45):
            seen.append(record.seq)
            assert (record.segment, record.end) <= h.store.durable_position()
        cursor.commit()
    while more := cursor.read():
        seen += [r.seq for r in more]
    cursor.commit()
    assert seen == list(range(1, 1201))
    assert len(numbers(wal)) >= 3
    h.close()
    assert Cursor(wal, "live").read() == []


@pytest.mark.parametrize("sealed", [False, True], ids=["newest", "sealed"])
def test_a_cursor_skips_damage_and_reads_on(wal, caplog, sealed):
    """FORMAT.md: readers that meet damage skip the damaged record, go on at the next one,
    and say so (once); in the newest segment (before its checkpoint: durable, so damage
    there is not a commit in flight) as in a sealed one."""
    h = Harness(wal).open()
    for n in range(1, 51, 10):
        h.commit(make(A, range(n, n + 10)))
    h.close()
    victim = next(r for r in read_records(wal) if r.seq == 24)
    flip(seg_path(wal, 1), victim.offset + FRAME_HEAD + 5)
    h = Harness(wal).open()
    h.commit(make(A, range(51, 61)))
    if sealed:
        fill(h, 61, 300)
        assert numbers(wal) == [1, 2]
    want = [s for s in range(1, 61 + 300 * sealed) if s != 24]
    caplog.clear()
    cursor = Cursor(wal, "reader")
    got = [r.seq for r in cursor.read(40)]
    cursor.position = (1, DATA_START)  # read past the damage again, as after a restart
    got2 = [r.seq for r in cursor.read(1000)]
    h.close()
    assert got == want[:40] and got2 == want
    said = [m for m in log_lines(caplog, logging.ERROR) if "CRC mismatch" in m]
    assert len(said) == 1, said


def test_a_cursor_waits_at_a_gap_past_the_checkpoint_a_commit_in_flight(wal, caplog):
    """Past the checkpoint of the newest segment a gap may be a commit being written (its
    later blocks already there, its first not yet): the reader stops there without a word
    and reads on once the gap is filled."""
    positions = crash_after(wal, [make(A, range(1, 21), size=RECORD_512)])
    Harness(wal).open().close()  # the checkpoint at the end of the data
    seg, end = positions[-1]
    assert checkpoint(wal) == (seg, end)
    in_flight = make(A, range(21, 61), size=RECORD_512)  # five blocks
    body = torn_commit(seg_path(wal, seg), end, in_flight, [1, 2, 3, 4])
    caplog.set_level(logging.INFO)
    cursor = Cursor(wal, "reader")
    assert [r.seq for r in cursor.read(100)] == list(range(1, 21))
    assert cursor.read(100) == []
    assert log_lines(caplog, logging.WARNING) == []
    with open(seg_path(wal, seg), "r+b") as f:
        f.seek(end)
        f.write(body[:BLOCK])  # the write completes
    assert [r.seq for r in cursor.read(100)] == list(range(21, 61))


@pytest.mark.parametrize("sealed", [False, True], ids=["newest", "sealed"])
def test_a_cursor_in_a_segment_that_recovery_rewrites_misses_nothing(wal, caplog, sealed):
    """Quarantine copies the good records into a new file where they sit at other offsets
    (no padding between commits); a reader's committed position in that segment must still
    lead to every good record after it (at least once), and to those appended later."""
    batches = [make(A, range(n, n + 20), size=300) for n in range(1, 101, 20)]
    crash_after(wal, batches)
    cursor = Cursor(wal, "reader")
    assert [r.seq for r in cursor.read(30)] == list(range(1, 31))
    cursor.commit()
    victim = next(r for r in read_records(wal) if r.seq == 66)
    flip(seg_path(wal, 1), victim.offset + FRAME_HEAD + 10)

    caplog.set_level(logging.INFO)
    h = Harness(wal).open()
    assert (wal / ("000000000001" + QUARANTINE_SUFFIX)).exists()
    later = fill(h, 101, 300 if sealed else 10, size=3900)
    assert (len(numbers(wal)) > 1) == sealed
    want = [s for s in range(31, 101) if s != 66] + [f[2] for f in later]
    got = [r.seq for r in Cursor(wal, "reader").read(10_000)]
    h.close()
    missing = sorted(set(want) - set(got))
    assert not missing, (
        f"the reader never gets {len(missing)} records: {missing[:10]}...; "
        f"it read {len(got)}: {got[:10]}..."
    )


# -- retention, quota, overflow ----------------------------------------------------------


def fill(h: Harness, first: int, count: int, size: int = 3900) -> list[Frame]:
    frames = make(A, range(first, first + count), size=size)
    for i in range(0, count, 50):
        h.commit(frames[i : i + 50])
    return frames


def read_into(cursor: Cursor, segment: int) -> None:
    """Read until the cursor's position is in `segment`, and commit."""
    while cursor.position[0] < segment:
        assert cursor.read(50), f"no more records before segment {segment}"
    cursor.commit()


def test_retention_bytes_deletes_only_what_every_cursor_has_passed(tmp_path, caplog):
    """Two stores side by side (the committer looks about once a second; this waits once):
    in one a reader still needs segment 2, in the other every reader is at the end."""
    caplog.set_level(logging.INFO)
    behind, ahead = tmp_path / "behind", tmp_path / "ahead"
    stores = []
    for directory in (behind, ahead):
        h = Harness(directory, retention_bytes=2 * MiB).open()
        stores.append(h)
        fast, slow = Cursor(directory, "fast"), Cursor(directory, "slow")
        fill(h, 1, 1000)
        assert numbers(directory) == [1, 2, 3, 4]
        read_into(fast, 4)
        read_into(slow, 2 if directory == behind else 4)
    h_behind, h_ahead = stores
    # behind: over retention_bytes, but the slow reader still needs segment 2;
    # ahead: 1 and 2 go, 3 is passed too but 2 MiB is within retention_bytes
    wait_for(
        lambda: (
            [h.pump() for h in stores]
            and (numbers(behind), h_behind.store.bytes_on_disk) == ([2, 3, 4], 3 * MiB)
            and (numbers(ahead), h_ahead.store.bytes_on_disk) == ([3, 4], 2 * MiB)
        ),
        HOUSEKEEPING,
        "retention",
    )
    for h in stores:
        h.close()
    first = {directory: next(read_records(directory)).seq for directory in (behind, ahead)}
    for directory in (behind, ahead):
        assert [s for _, s in stored(directory)] == list(range(first[directory], 1001))
    deleted = [m for m in log_lines(caplog, logging.INFO) if "deleting" in m]
    assert sorted(deleted) == sorted(
        f"store: deleting {segment_name(n)} (retention)" for n in (1, 1, 2)
    )


def test_retention_seconds_deletes_old_sealed_segments_every_cursor_passed(wal):
    h = Harness(wal, retention_seconds=3600).open()
    reader = Cursor(wal, "reader")
    fill(h, 1, 1000)
    assert numbers(wal) == [1, 2, 3, 4]
    old = time.time() - 7200
    for number in (1, 2):
        os.utime(seg_path(wal, number), (old, old))
    read_into(reader, 4)
    # 1 and 2 are old and passed; 3 is passed but young; 4 is being written
    h.until(
        lambda: numbers(wal) == [3, 4] and h.store.bytes_on_disk == 2 * MiB,
        HOUSEKEEPING,
        "old segments deleted",
    )
    h.close()


def housekeeping_pass(store: Store) -> None:
    """Have the writer run one whole retention pass from now: it runs one as it stops."""
    store.close()


def test_quota_without_a_cursor_keeps_the_data_and_refuses_new_segments(wal, caplog):
    caplog.set_level(logging.INFO)
    h = Harness(wal, quota_bytes=3 * MiB).open()
    seq = 0
    accepted: list[Frame] = []
    while True:
        seq += 1
        frame = make(A, [seq], size=3900)
        if h.append(frame) == 0:
            break
        accepted += frame
        h.submit()
        if seq % 50 == 0:
            h.wait_durable()
        assert seq < 2000, "the quota never refused"
    h.wait_durable()
    assert h.store.full
    assert numbers(wal) == [1, 2, 3]
    assert any("storage full" in m for m in log_lines(caplog, logging.WARNING))
    housekeeping_pass(h.store)
    assert numbers(wal) == [1, 2, 3], "space pressure deleted data no reader has seen"
    assert stored(wal) == keys(accepted)

    # a reader that has consumed the oldest segments lets space retention free them
    read_into(Cursor(wal, "reader"), 3)
    h = Harness(wal, quota_bytes=3 * MiB).open()
    h.until(lambda: not h.store.full, HOUSEKEEPING, "space retention")
    assert numbers(wal) == [2, 3]
    h.commit(make(A, range(seq, seq + 100), size=3900))  # into a new segment
    assert numbers(wal) == [2, 3, 4]
    h.close()
    assert [s for _, s in stored(wal)][-100:] == list(range(seq, seq + 100))
    assert any("(space)" in m for m in log_lines(caplog, logging.INFO))


def test_quota_with_a_reader_keeping_up_never_refuses(wal):
    h = Harness(wal, quota_bytes=3 * MiB).open()
    reader = Cursor(wal, "reader")
    read: list[int] = []
    seq = 1
    deadline = time.monotonic() + 15
    while seq <= 1500:  # about six segments through a quota of three
        frames = make(A, range(seq, min(seq + 25, 1501)), size=3900)
        n = h.append(frames)
        if n:
            h.submit()
            h.wait_durable()
            seq += n
        else:
            assert time.monotonic() < deadline, "refused for good although the reader keeps up"
            time.sleep(0.01)
            h.pump()
        read += [r.seq for r in reader.read(10_000)]
        reader.commit()
        assert disk_bytes(wal) <= 3 * MiB
    read += [r.seq for r in reader.read(10_000)]
    h.close()
    assert read == list(range(1, 1501))


def test_overflow_drop_oldest_drops_the_oldest_segment_and_counts_it(wal, caplog):
    caplog.set_level(logging.INFO)
    h = Harness(wal, quota_bytes=3 * MiB, overflow="drop-oldest").open()
    lagging = Cursor(wal, "lagging")  # even a reader that has not read it does not keep it
    in_first: list[int] = []
    seq = 1
    deadline = time.monotonic() + 15
    while seq <= 1200:
        frames = make(A, range(seq, min(seq + 25, 1201)), size=3900)
        n = h.append(frames)
        if n:
            h.submit()
            h.wait_durable()
            seq += n
            if not in_first and numbers(wal)[0] == 1 and 3 in numbers(wal):
                in_first = [r.seq for r in read_records(wal) if r.segment == 1]
        else:
            assert time.monotonic() < deadline, "overflow = drop-oldest did not make room"
            time.sleep(0.01)
            h.pump()
    h.close()
    on_disk = [s for _, s in stored(wal)]
    dropped = sorted(set(range(1, 1201)) - set(on_disk))
    assert on_disk == list(range(dropped[-1] + 1, 1201)), "dropped frames are not the oldest"
    assert h.store.dropped_frames == len(dropped)
    assert dropped[: len(in_first)] == in_first
    warnings = [m for m in log_lines(caplog, logging.WARNING) if "dropping" in m]
    assert warnings and "000000000001.wal" in warnings[0]
    caplog.clear()
    assert [r.seq for r in lagging.read(10_000)] == on_disk
    assert any("is gone" in m for m in log_lines(caplog, logging.WARNING))
