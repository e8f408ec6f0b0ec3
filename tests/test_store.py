"""store/: the WAL Store and read_records on real files with real fsync (no daemon)."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest
from conftest import wait_for

from appliance.store.segment import (
    SEGMENT_HEADER,
    encode_header,
    encode_record,
    list_segments,
    segment_name,
)
from appliance.store.wal import Store, read_records

WAIT = 10.0  # deadline for a commit (fdatasync on a slow CI disk)


class Harness:
    """A Store plus bookkeeping: what was appended and which marks came back."""

    def __init__(self, directory: Path, **options) -> None:
        self.store = Store(directory, **options)
        self.directory = directory
        self.woken = threading.Event()
        self.store.wakeup = self.woken.set
        self.marks: list[dict[str, int]] = []

    def open(self) -> Harness:
        self.store.open()
        return self

    def commit(self, frames, *, ts_ns: int = 1_700_000_000_000_000_000) -> list[dict[str, int]]:
        """Append (ident, channel, seq, payload) tuples, submit, wait until durable."""
        marks: dict[str, int] = {}
        for ident, channel, seq, payload in frames:
            self.store.append(ident.encode(), channel, seq, ts_ns + seq, ts_ns + seq + 7, payload)
            marks[ident] = max(marks.get(ident, 0), seq)
        self.store.submit(marks)
        wait_for(lambda: self.store.pending_bytes() == 0, what="the commit")
        done = self.store.completed()
        self.marks += done
        return done

    def close(self) -> None:
        self.store.close()


def records(directory: Path):
    return list(read_records(directory))


def keys(directory: Path) -> list[tuple[str, int]]:
    return [(r.identity, r.seq) for r in read_records(directory)]


def newest_segment(directory: Path) -> Path:
    return list_segments(directory)[-1][1]


def disk_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for _, path in list_segments(directory))


@pytest.fixture
def wal(tmp_path) -> Path:
    return tmp_path / "wal"


# -- append, commit, read -----------------------------------------------------------


def test_new_store_has_one_segment_with_a_header(wal):
    h = Harness(wal).open()
    try:
        segments = list_segments(wal)
        assert [n for n, _ in segments] == [1]
        data = segments[0][1].read_bytes()
        assert len(data) == SEGMENT_HEADER.size
        assert data[:8] == b"MIWAL\r\n\x1a"
        assert int.from_bytes(data[16:24], "big") == 1
        assert h.store.last_seq == {}
        assert h.store.completed() == []
        assert records(wal) == []
    finally:
        h.close()


def test_completed_returns_the_marks_after_the_commit(wal):
    h = Harness(wal).open()
    try:
        assert h.store.completed() == []
        done = h.commit([("a", 1, 1, b"x"), ("a", 1, 2, b"y"), ("b", 2, 9, b"z")])
        assert done == [{"a": 2, "b": 9}]
        assert h.woken.is_set()  # the committer woke the loop
        # the marks are handed out once
        assert h.store.completed() == []
        # and what they cover is on disk
        assert keys(wal) == [("a", 1), ("a", 2), ("b", 9)]
    finally:
        h.close()


def test_marks_are_durable_when_pending_bytes_reads_zero(wal):
    """Several batches queued back to back: every mark comes back, none before its data."""
    h = Harness(wal).open()
    try:
        for seq in range(1, 51):
            h.store.append(b"a", 1, seq, seq, seq, b"p" * 100)
            h.store.submit({"a": seq})
        wait_for(lambda: h.store.pending_bytes() == 0, what="all commits")
        done = h.store.completed()
        assert done, "pending_bytes() read 0 but completed() had no marks"
        # group commit may merge batches; the marks stay in order and reach the last seq
        seen = [m["a"] for m in done]
        assert seen == sorted(seen)
        assert seen[-1] == 50
        on_disk = [r.seq for r in read_records(wal)]
        assert on_disk == list(range(1, 51))
    finally:
        h.close()


def test_read_records_returns_every_field_in_order(wal):
    h = Harness(wal).open()
    try:
        payloads = [b"", b"\x00\xff" * 10, "ü-utf8".encode(), os.urandom(3000)]
        h.commit([("m-1/core-2", 7, 10 + i, p) for i, p in enumerate(payloads)])
        h.commit([("dev/core-0", 65535, 1, b"last")])
    finally:
        h.close()
    got = records(wal)
    assert [(r.identity, r.channel, r.seq, r.payload) for r in got] == [
        ("m-1/core-2", 7, 10, payloads[0]),
        ("m-1/core-2", 7, 11, payloads[1]),
        ("m-1/core-2", 7, 12, payloads[2]),
        ("m-1/core-2", 7, 13, payloads[3]),
        ("dev/core-0", 65535, 1, b"last"),
    ]
    base = 1_700_000_000_000_000_000
    for r in got:
        assert r.ts_ns == base + r.seq
        assert r.recv_ns == base + r.seq + 7
        assert r.segment == 1
    offsets = [r.offset for r in got]
    assert offsets[0] == SEGMENT_HEADER.size
    assert offsets == sorted(offsets)
    assert newest_segment(wal).stat().st_size == offsets[-1] + len(
        encode_record(b"dev/core-0", 65535, 1, 0, 0, b"last")
    )


def test_reopening_rebuilds_last_seq_per_identity(wal):
    h = Harness(wal).open()
    h.commit([("a", 1, 1, b"1"), ("b", 1, 5, b"5"), ("a", 1, 3, b"3")])
    h.commit([("c", 2, 100, b"100"), ("b", 1, 6, b"6")])
    h.close()

    h2 = Harness(wal).open()
    try:
        assert h2.store.last_seq == {"a": 3, "b": 6, "c": 100}
        assert h2.store.frames == 5
        assert h2.store.bytes_on_disk == disk_bytes(wal)
        h2.commit([("a", 1, 4, b"4")])
    finally:
        h2.close()
    assert keys(wal) == [("a", 1), ("b", 5), ("a", 3), ("c", 100), ("b", 6), ("a", 4)]
    h3 = Harness(wal).open()
    try:
        assert h3.store.last_seq == {"a": 4, "b": 6, "c": 100}
    finally:
        h3.close()


def test_close_commits_what_was_submitted(wal):
    h = Harness(wal).open()
    h.store.append(b"a", 1, 1, 0, 0, b"queued")
    h.store.submit({"a": 1})
    h.close()  # no wait: close must commit the queue before it returns
    assert keys(wal) == [("a", 1)]


# -- rotation -------------------------------------------------------------------------


def test_rotation_starts_new_segments_when_segment_bytes_is_small(wal):
    segment_bytes = 4096
    h = Harness(wal, segment_bytes=segment_bytes, commit_max_bytes=4096).open()
    payload = b"r" * 900
    try:
        for seq in range(1, 21):
            h.commit([("a", 1, seq, payload + seq.to_bytes(2, "big"))])
    finally:
        h.close()
    segments = list_segments(wal)
    assert len(segments) >= 5
    assert [n for n, _ in segments] == list(range(1, len(segments) + 1))
    for number, path in segments:
        data = path.read_bytes()
        assert len(data) <= segment_bytes
        assert int.from_bytes(data[16:24], "big") == number  # header names its segment
    got = records(wal)
    assert [r.seq for r in got] == list(range(1, 21))
    assert [r.segment for r in got] == sorted(r.segment for r in got)
    assert {r.segment for r in got} == {n for n, _ in segments}
    assert all(r.payload == payload + r.seq.to_bytes(2, "big") for r in got)

    # reopening continues in the newest segment and rebuilds last_seq across all of them
    h2 = Harness(wal, segment_bytes=segment_bytes).open()
    try:
        assert h2.store.last_seq == {"a": 20}
        assert h2.store.frames == 20
        h2.commit([("a", 1, 21, b"after reopen")])
    finally:
        h2.close()
    assert [r.seq for r in read_records(wal)] == list(range(1, 22))


# -- recovery of the newest segment -------------------------------------------------------


def _fill(wal: Path, count: int = 5) -> list[int]:
    """Commit `count` records of identity "a", one batch each; returns their end offsets."""
    h = Harness(wal).open()
    try:
        for seq in range(1, count + 1):
            h.commit([("a", 3, seq, f"payload-{seq}".encode() * 4)])
    finally:
        h.close()
    got = records(wal)
    size = newest_segment(wal).stat().st_size
    return [r.offset for r in got[1:]] + [size]


def _cut_mid_record(path: Path, ends: list[int]) -> int:
    cut = ends[-2] + (ends[-1] - ends[-2]) // 2
    os.truncate(path, cut)
    return ends[-2]


def _append_garbage(path: Path, ends: list[int]) -> int:
    with open(path, "ab") as f:
        f.write(b"\xde\xad\xbe\xef garbage that is not a record \x01\x02\x03")
    return ends[-1]


def _append_zeros(path: Path, ends: list[int]) -> int:
    with open(path, "ab") as f:
        f.write(b"\0" * 8192)  # a preallocated or zero-filled tail after a power cut
    return ends[-1]


def _append_torn_prefix(path: Path, ends: list[int]) -> int:
    with open(path, "ab") as f:
        f.write(b"\x12\x34\x56")  # fewer bytes than a record's crc and length
    return ends[-1]


@pytest.mark.parametrize(
    "damage",
    [_cut_mid_record, _append_garbage, _append_zeros, _append_torn_prefix],
    ids=["cut-mid-record", "garbage", "zero-filled", "torn-prefix"],
)
def test_recovery_truncates_a_torn_tail_and_keeps_appending(wal, caplog, damage):
    ends = _fill(wal)
    path = newest_segment(wal)
    valid_end = damage(path, ends)
    survivors = [("a", s) for s in range(1, 6)]
    if damage is _cut_mid_record:
        survivors = survivors[:-1]

    caplog.set_level(logging.WARNING, logger="appliance.store")
    h = Harness(wal).open()
    try:
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, caplog.text
        assert "truncating" in warnings[0].getMessage()
        assert path.name in warnings[0].getMessage()
        assert path.stat().st_size == valid_end
        assert h.store.last_seq == {"a": survivors[-1][1]}
        assert h.store.frames == len(survivors)
        assert h.store.bytes_on_disk == disk_bytes(wal)
        assert keys(wal) == survivors

        h.commit([("a", 3, 100, b"after recovery"), ("b", 4, 1, b"new identity")])
    finally:
        h.close()
    got = records(wal)
    assert [(r.identity, r.seq) for r in got] == [*survivors, ("a", 100), ("b", 1)]
    assert got[-2].payload == b"after recovery"
    assert got[-2].offset == valid_end  # written right where the valid data ended

    # a second recovery finds nothing to repair
    caplog.clear()
    h2 = Harness(wal).open()
    try:
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
        assert h2.store.last_seq == {"a": 100, "b": 1}
    finally:
        h2.close()


def test_flipped_byte_in_the_last_record_is_truncated(wal, caplog):
    ends = _fill(wal)
    path = newest_segment(wal)
    data = bytearray(path.read_bytes())
    data[ends[-1] - 3] ^= 0x40  # inside the last record's payload: CRC mismatch
    path.write_bytes(bytes(data))

    caplog.set_level(logging.WARNING, logger="appliance.store")
    h = Harness(wal).open()
    try:
        assert "CRC mismatch" in caplog.text
        assert path.stat().st_size == ends[-2]
        assert h.store.last_seq == {"a": 4}
        h.commit([("a", 3, 5, b"resent")])
    finally:
        h.close()
    got = records(wal)
    assert [r.seq for r in got] == [1, 2, 3, 4, 5]
    assert got[-1].payload == b"resent"


def test_read_records_beside_a_torn_tail_stops_at_the_valid_end(wal):
    """read_records (dump) is read-only: a torn tail reads as the end, nothing is changed."""
    ends = _fill(wal)
    path = newest_segment(wal)
    _append_garbage(path, ends)
    size = path.stat().st_size
    assert keys(wal) == [("a", s) for s in range(1, 6)]
    assert path.stat().st_size == size


# -- damage in older segments ----------------------------------------------------------


def _three_segments(wal: Path) -> None:
    h = Harness(wal, segment_bytes=4096).open()
    try:
        for seq in range(1, 16):
            h.commit([("a", 1, seq, bytes([seq]) * 1000)])
    finally:
        h.close()
    assert len(list_segments(wal)) >= 3


def test_corrupt_record_in_an_older_segment_is_skipped_and_later_segments_read(wal, caplog):
    _three_segments(wal)
    before = records(wal)
    first = [r for r in before if r.segment == 1]
    assert len(first) >= 3
    victim = first[1]
    path = list_segments(wal)[0][1]
    data = bytearray(path.read_bytes())
    data[victim.offset + 40] ^= 0xFF  # inside the record: its CRC no longer matches
    path.write_bytes(bytes(data))
    size = len(data)

    expected = [r.seq for r in before if r.segment != 1 or r.offset < victim.offset]
    caplog.set_level(logging.WARNING, logger="appliance.store")
    h = Harness(wal, segment_bytes=4096).open()
    try:
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1, caplog.text
        assert path.name in errors[0].getMessage()
        assert "skipped" in errors[0].getMessage()
        assert path.stat().st_size == size  # an older segment is set aside, never truncated
        assert h.store.last_seq == {"a": 15}
        assert h.store.frames == len(expected)
        assert [r.seq for r in read_records(wal)] == expected
        h.commit([("a", 1, 16, b"new")])
    finally:
        h.close()
    assert [r.seq for r in read_records(wal)] == [*expected, 16]


def test_an_older_segment_with_a_bad_header_is_skipped(wal, caplog):
    _three_segments(wal)
    path = list_segments(wal)[0][1]
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))
    expected = [r.seq for r in read_records(wal)]  # read_records already skips it
    assert 1 not in expected and 15 in expected

    caplog.set_level(logging.WARNING, logger="appliance.store")
    h = Harness(wal, segment_bytes=4096).open()
    try:
        assert "not a valid segment" in caplog.text
        assert h.store.last_seq == {"a": 15}
        h.commit([("a", 1, 16, b"new")])
    finally:
        h.close()
    assert [r.seq for r in read_records(wal)] == [*expected, 16]


# -- a segment whose header never reached the disk ------------------------------------------


@pytest.mark.parametrize(
    "size", [0, SEGMENT_HEADER.size, 4096], ids=["empty", "32-zeros", "4k-zeros"]
)
def test_newest_segment_of_only_zeros_is_rewritten_and_used(wal, caplog, size):
    _fill(wal, 3)
    zero = wal / segment_name(2)
    zero.write_bytes(b"\0" * size)

    caplog.set_level(logging.WARNING, logger="appliance.store")
    h = Harness(wal).open()
    try:
        assert "has no header" in caplog.text
        assert zero.read_bytes()[:8] == b"MIWAL\r\n\x1a"
        assert int.from_bytes(zero.read_bytes()[16:24], "big") == 2
        assert h.store.last_seq == {"a": 3}
        h.commit([("a", 3, 4, b"into the rewritten segment")])
    finally:
        h.close()
    got = records(wal)
    assert [(r.segment, r.seq) for r in got] == [(1, 1), (1, 2), (1, 3), (2, 4)]


def test_bytes_on_disk_matches_the_files_after_a_zero_segment_is_rewritten(wal):
    """bytes_on_disk feeds the quota: it must count what the files hold, not what they held."""
    _fill(wal, 3)
    (wal / segment_name(2)).write_bytes(b"\0" * 4096)
    h = Harness(wal).open()
    try:
        assert h.store.bytes_on_disk == disk_bytes(wal)
    finally:
        h.close()


def test_only_segment_of_only_zeros(wal, caplog):
    wal.mkdir()
    (wal / segment_name(1)).write_bytes(b"\0" * 4096)
    caplog.set_level(logging.WARNING, logger="appliance.store")
    h = Harness(wal).open()
    try:
        assert "has no header" in caplog.text
        assert h.store.last_seq == {}
        h.commit([("a", 1, 1, b"first")])
    finally:
        h.close()
    assert keys(wal) == [("a", 1)]


def test_read_records_skips_a_zero_segment_without_raising(wal):
    _fill(wal, 2)
    (wal / segment_name(2)).write_bytes(b"\0" * 100)
    assert keys(wal) == [("a", 1), ("a", 2)]


@pytest.mark.parametrize(
    "header",
    [encode_header(2, 1)[:12], b"XXWAL\r\n\x1a" + encode_header(2, 1)[8:]],
    ids=["torn-header", "bad-magic"],
)
def test_records_appended_after_a_damaged_newest_header_stay_readable(wal, caplog, header):
    """The newest segment's header is damaged (not all zeros). Recovery sets it aside; what
    the store acknowledges afterwards must still be readable, after a restart too."""
    _fill(wal, 3)
    (wal / segment_name(2)).write_bytes(header)
    caplog.set_level(logging.WARNING, logger="appliance.store")
    h = Harness(wal).open()
    try:
        assert caplog.records, "the damaged segment was not reported"
        done = h.commit([("a", 3, 4, b"acknowledged after recovery")])
        assert done == [{"a": 4}]  # the loop would ACK seq 4 now
    finally:
        h.close()
    assert keys(wal) == [("a", 1), ("a", 2), ("a", 3), ("a", 4)]
    h2 = Harness(wal).open()
    try:
        assert h2.store.last_seq == {"a": 4}
    finally:
        h2.close()


def test_empty_directory_reads_nothing(tmp_path):
    assert records(tmp_path / "missing") == []
    (tmp_path / "empty").mkdir()
    assert records(tmp_path / "empty") == []
