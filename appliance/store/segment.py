"""Encoding and scanning of WAL segments; the layout is in FORMAT.md beside this file."""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SEGMENT_MAGIC = b"MIWAL\r\n\x1a"
SEGMENT_VERSION = 1
SEGMENT_HEADER = struct.Struct(">8sHHIQQ")
RECORD_PREFIX = struct.Struct(">II")  # crc, length
RECORD_FIELDS = struct.Struct(">IQQQHH")  # length, recv_ns, ts_ns, seq, channel, id_len
FIELDS_SIZE = RECORD_FIELDS.size - 4  # what `length` counts besides id and payload
ID_OFFSET = 4 + RECORD_FIELDS.size  # crc, then the fields
SUFFIX = ".wal"


class SegmentError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Record:
    segment: int
    offset: int
    identity: str
    channel: int
    seq: int
    ts_ns: int
    recv_ns: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class ScanEnd:
    """Where and why the valid part of a segment ended before the end of the file."""

    offset: int
    reason: str


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


def encode_header(number: int, created_ns: int) -> bytes:
    return SEGMENT_HEADER.pack(SEGMENT_MAGIC, SEGMENT_VERSION, 0, 0, number, created_ns)


def encode_record(
    ident: bytes, channel: int, seq: int, ts_ns: int, recv_ns: int, payload: bytes
) -> bytes:
    body = (
        RECORD_FIELDS.pack(
            FIELDS_SIZE + len(ident) + len(payload), recv_ns, ts_ns, seq, channel, len(ident)
        )
        + ident
        + payload
    )
    return zlib.crc32(body).to_bytes(4, "big") + body


def check_header(data: bytes, number: int | None = None) -> int:
    """The segment number in a header; SegmentError if the header is not ours."""
    if len(data) < SEGMENT_HEADER.size:
        raise SegmentError("shorter than a segment header")
    magic, version, _flags, _res, seg, _created = SEGMENT_HEADER.unpack_from(data)
    if magic != SEGMENT_MAGIC:
        raise SegmentError("bad segment magic")
    if version != SEGMENT_VERSION:
        raise SegmentError(f"unknown segment version {version}")
    if number is not None and seg != number:
        raise SegmentError(f"header says segment {seg}, file name says {number}")
    return seg


def scan(data: bytes, number: int, start: int = SEGMENT_HEADER.size) -> Iterator[Record | ScanEnd]:
    """Records from `start`; a final ScanEnd if the valid part ends before the data does."""
    pos = start
    end = len(data)
    with memoryview(data) as mv:
        while pos < end:
            if end - pos < RECORD_PREFIX.size:
                yield ScanEnd(pos, "torn record prefix")
                return
            crc, length = RECORD_PREFIX.unpack_from(data, pos)
            if length < FIELDS_SIZE or pos + 8 + length > end:
                yield ScanEnd(pos, "bad or torn record length")
                return
            if zlib.crc32(mv[pos + 4 : pos + 8 + length]) != crc:
                yield ScanEnd(pos, "CRC mismatch")
                return
            _, recv_ns, ts_ns, seq, channel, id_len = RECORD_FIELDS.unpack_from(data, pos + 4)
            id_end = pos + ID_OFFSET + id_len
            yield Record(
                number,
                pos,
                bytes(mv[pos + ID_OFFSET : id_end]).decode("utf-8", "replace"),
                channel,
                seq,
                ts_ns,
                recv_ns,
                bytes(mv[id_end : pos + 8 + length]),
            )
            pos += 8 + length


def read_segment(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
