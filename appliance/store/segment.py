"""Encoding and scanning of WAL segments; the layout is in FORMAT.md beside this file."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

BLOCK = 4096
DATA_START = BLOCK  # the header has the first block to itself: batches stay block-aligned
SEGMENT_MAGIC = b"MIWAL\r\n\x1a"
SEGMENT_VERSION = 1
# magic, version, flags, reserved, segment, created_ns, segment_bytes, crc of the preceding
SEGMENT_HEADER = struct.Struct(">8sHHIQQQI")
PREFIX = struct.Struct(">II")  # crc, length
# length, type, reserved, channel, id_len, reserved, recv_ns, ts_ns, seq
FRAME_FIELDS = struct.Struct(">IBBHHHQQQ")
FRAME_HEAD = 4 + FRAME_FIELDS.size  # crc + fields: where the identity starts
TYPE_FRAME = 1
TYPE_PAD = 2
MIN_PAD = 9  # crc, length, type
SUFFIX = ".wal"
QUARANTINE_SUFFIX = ".wal.quarantined"


class SegmentError(Exception):
    pass


class Record(NamedTuple):
    """A frame record read from a segment. A tuple, not a dataclass: the subscribers'
    reader builds one per frame kept, and a tuple is several times cheaper to build."""

    segment: int
    offset: int
    identity: str
    channel: int
    seq: int
    ts_ns: int
    recv_ns: int
    payload: bytes
    end: int  # offset just past this record: the cursor position after reading it


@dataclass(frozen=True, slots=True)
class ScanEnd:
    """Where and why the valid data of a segment ended.

    `clean` is True at the normal end (zero bytes of the preallocated tail, or the
    end of the file); False at a bad record: a torn write or corruption.
    """

    offset: int
    reason: str
    clean: bool


def segment_name(number: int) -> str:
    return f"{number:012d}{SUFFIX}"


def segment_number(path: Path) -> int | None:
    stem = path.name.removesuffix(SUFFIX)
    return int(stem) if path.name.endswith(SUFFIX) and stem.isdigit() else None


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for path in directory.iterdir() if directory.is_dir() else ():
        number = segment_number(path)
        if number is not None:
            found.append((number, path))
    return sorted(found)


def encode_header(number: int, created_ns: int, segment_bytes: int) -> bytes:
    head = SEGMENT_HEADER.pack(
        SEGMENT_MAGIC, SEGMENT_VERSION, 0, 0, number, created_ns, segment_bytes, 0
    )[:-4]
    return (head + zlib.crc32(head).to_bytes(4, "big")).ljust(DATA_START, b"\0")


def check_header(data: bytes, number: int | None = None) -> int:
    """The segment number in a header; SegmentError if the header is not ours or damaged."""
    if len(data) < SEGMENT_HEADER.size:
        raise SegmentError("shorter than a segment header")
    magic, version, _flags, _res, seg, _created, _size, crc = SEGMENT_HEADER.unpack_from(data)
    if magic != SEGMENT_MAGIC:
        raise SegmentError("bad segment magic")
    if zlib.crc32(data[: SEGMENT_HEADER.size - 4]) != crc:
        raise SegmentError("segment header CRC mismatch")
    if version != SEGMENT_VERSION:
        raise SegmentError(f"unknown segment version {version}")
    if number is not None and seg != number:
        raise SegmentError(f"header says segment {seg}, file name says {number}")
    return seg


def encode_frame_record(
    ident: bytes, channel: int, seq: int, ts_ns: int, recv_ns: int, payload: bytes
) -> bytes:
    body = (
        FRAME_FIELDS.pack(
            FRAME_HEAD - 8 + len(ident) + len(payload),
            TYPE_FRAME,
            0,
            channel,
            len(ident),
            0,
            recv_ns,
            ts_ns,
            seq,
        )
        + ident
        + payload
    )
    return zlib.crc32(body).to_bytes(4, "big") + body


def encode_padding(size: int) -> bytes:
    """A padding record of exactly `size` bytes (at least MIN_PAD)."""
    body = (size - 8).to_bytes(4, "big") + bytes([TYPE_PAD]) + bytes(size - MIN_PAD)
    return zlib.crc32(body).to_bytes(4, "big") + body


def padding_to_block(offset: int) -> int:
    """Bytes of padding that bring `offset` to a block boundary (0, or at least MIN_PAD)."""
    gap = -offset % BLOCK
    if gap and gap < MIN_PAD:
        gap += BLOCK
    return gap


def scan(
    data: bytes, number: int, start: int = DATA_START, end: int | None = None
) -> Iterator[Record | ScanEnd]:
    """Frame records from `start`, skipping padding, up to the first record that is not
    valid; then one ScanEnd saying where and why the valid data ended. What a record must
    be to count lives here; what to do after a bad one is reader.py's."""
    pos = start
    end = len(data) if end is None else end
    with memoryview(data) as mv:
        while pos < end:
            if end - pos < PREFIX.size:
                if not any(mv[pos:end]):
                    yield ScanEnd(pos, "end of data", True)
                else:
                    yield ScanEnd(pos, "torn record prefix", False)
                return
            crc, length = PREFIX.unpack_from(data, pos)
            if crc == 0 and length == 0:
                yield ScanEnd(pos, "end of data", True)
                return
            if length < 1 or pos + 8 + length > end:
                yield ScanEnd(pos, "bad or torn record length", False)
                return
            if zlib.crc32(mv[pos + 4 : pos + 8 + length]) != crc:
                yield ScanEnd(pos, "CRC mismatch", False)
                return
            kind = data[pos + 8]
            if kind == TYPE_FRAME and length >= FRAME_HEAD - 8:
                _, _, _, channel, id_len, _, recv_ns, ts_ns, seq = FRAME_FIELDS.unpack_from(
                    data, pos + 4
                )
                id_end = pos + FRAME_HEAD + id_len
                if id_end > pos + 8 + length:
                    yield ScanEnd(pos, "identity longer than its record", False)
                    return
                yield Record(
                    number,
                    pos,
                    bytes(mv[pos + FRAME_HEAD : id_end]).decode("utf-8", "replace"),
                    channel,
                    seq,
                    ts_ns,
                    recv_ns,
                    bytes(mv[id_end : pos + 8 + length]),
                    pos + 8 + length,
                )
            elif kind != TYPE_PAD:
                yield ScanEnd(pos, f"unknown record type {kind}", False)
                return
            pos += 8 + length
    yield ScanEnd(min(pos, end), "end of file", True)


# -- records as JSON (dump, recover-dump, worker, export) --------------------------------


def record_json(rec: Record) -> dict:
    """A record with the keys of `dump`."""
    return {
        "id": rec.identity,
        "channel": rec.channel,
        "seq": rec.seq,
        "ts_ns": rec.ts_ns,
        "recv_ns": rec.recv_ns,
        "payload_b64": base64.b64encode(rec.payload).decode(),
    }


def json_line(obj: dict) -> str:
    return json.dumps(obj) + "\n"
