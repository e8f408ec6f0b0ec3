"""The archive's bytes and names: file headers, entries, index lines, gzip members,
and the names of channel directories and hour files. FORMAT.md beside this file
specifies them; everything that reads or writes an archive file goes through here."""

from __future__ import annotations

import os
import re
import struct
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

HOUR_NS = 3600 * 1_000_000_000
MAGIC = b"MIARC\r\n\x1a"
VERSION = 1
HEADER = struct.Struct(">8sHHII")  # magic, version, channel, hour, crc
HEADER_SIZE = HEADER.size  # 20
ENTRY = struct.Struct(">IIQQQH")  # crc, length, ts_ns, recv_ns, seq, id_len
ENTRY_SIZE = ENTRY.size  # 34
ENTRY_BODY = struct.Struct(">IQQQH")  # the same without the crc: what it covers
ENTRY_FIXED = ENTRY_SIZE - 8  # bytes counted by length besides identity and payload
INDEX = struct.Struct(">QQQIII")  # min_t, max_t, pos, size, count, crc
INDEX_SIZE = INDEX.size  # 36
INDEX_BYTES = 64 * 1024  # a block closes at this many bytes even with fewer entries
ARCHIVE_DIR = "archive"
STATE_FILE = "archive.state"
READ_CHUNK = 1 << 20
NAME_RE = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2})(?:\.(\d+))?\.log(\.gz)?(\.idx)?$")
CHANNEL_DIR_RE = re.compile(r"ch-(\d{5})")


@dataclass(frozen=True, slots=True)
class Entry:
    """One archived frame (the attributes `segment.record_json` reads)."""

    identity: str
    channel: int
    seq: int
    ts_ns: int
    recv_ns: int
    payload: bytes

    @property
    def t(self) -> int:
        return self.ts_ns or self.recv_ns


@dataclass(frozen=True, slots=True)
class Block:
    min_t: int
    max_t: int
    pos: int
    size: int
    count: int

    def encode(self) -> bytes:
        head = INDEX.pack(self.min_t, self.max_t, self.pos, self.size, self.count, 0)[:-4]
        return head + zlib.crc32(head).to_bytes(4, "big")

    @property
    def end(self) -> int:
        return self.pos + self.size


# -- names -----------------------------------------------------------------------------


def channel_dir(root: Path, channel: int) -> Path:
    return root / f"ch-{channel:05d}"


def hour_name(hour: int) -> str:
    return datetime.fromtimestamp(hour * 3600, UTC).strftime("%Y-%m-%dT%H")


def hour_of_name(text: str) -> int:
    stamp = datetime.strptime(text, "%Y-%m-%dT%H").replace(tzinfo=UTC)
    return int(stamp.timestamp()) // 3600


def data_name(hour: int, part: int, compressed: bool) -> str:
    return hour_name(hour) + (f".{part}" if part else "") + (".log.gz" if compressed else ".log")


def parse_name(name: str) -> tuple[int, int, bool, bool] | None:
    """(hour, part, compressed, is_index) of an archive file name, or None."""
    match = NAME_RE.match(name)
    if not match:
        return None
    try:
        hour = hour_of_name(match.group(1))
    except ValueError:
        return None
    return hour, int(match.group(2) or 0), bool(match.group(3)), bool(match.group(4))


def index_path(data: Path) -> Path:
    return data.with_name(data.name + ".idx")


def archive_root(state_dir: Path) -> Path:
    return state_dir / ARCHIVE_DIR


def channel_of_dir(directory: Path) -> int | None:
    """The channel of a channel directory (`ch-00007`), or None for anything else."""
    match = CHANNEL_DIR_RE.fullmatch(directory.name)
    return int(match.group(1)) if match and directory.is_dir() else None


# -- encoding --------------------------------------------------------------------------


def encode_header(channel: int, hour: int) -> bytes:
    head = HEADER.pack(MAGIC, VERSION, channel, hour, 0)[:-4]
    return head + zlib.crc32(head).to_bytes(4, "big")


def check_header(data: bytes, channel: int, hour: int) -> str | None:
    """Why a header is not the one this file should have, or None."""
    if len(data) < HEADER_SIZE:
        return "shorter than the header"
    magic, version, ch, hr, crc = HEADER.unpack_from(data)
    if magic != MAGIC:
        return "bad magic"
    if zlib.crc32(data[: HEADER_SIZE - 4]) != crc:
        return "header CRC mismatch"
    if version != VERSION:
        return f"unknown version {version}"
    if (ch, hr) != (channel, hour):
        return f"header says channel {ch} hour {hour_name(hr)}"
    return None


def encode_entry(identity: bytes, ts_ns: int, recv_ns: int, seq: int, payload: bytes) -> bytes:
    length = ENTRY_FIXED + len(identity) + len(payload)
    body = ENTRY_BODY.pack(length, ts_ns, recv_ns, seq, len(identity)) + identity + payload
    return zlib.crc32(body).to_bytes(4, "big") + body


class EntryParser:
    """Entries from a byte stream fed in chunks; `bad` says where and why it stopped."""

    def __init__(self, channel: int, base: int) -> None:
        self.channel = channel
        self.buf = bytearray()
        self.base = base  # stream offset of buf[0]: the end of the good data so far
        self.bad: str | None = None

    def feed(self, data: bytes) -> list[tuple[int, int, Entry]]:
        """(offset, size, entry) of every complete good entry; stops at the first bad one."""
        if self.bad:
            return []
        buf = self.buf
        buf += data
        out = []
        pos = 0
        n = len(buf)
        while n - pos >= ENTRY_SIZE:
            crc, length, ts_ns, recv_ns, seq, id_len = ENTRY.unpack_from(buf, pos)
            end = pos + 8 + length
            if length < ENTRY_FIXED + id_len:
                self.bad = "bad entry length"
                break
            if end > n:
                break
            if zlib.crc32(memoryview(buf)[pos + 4 : end]) != crc:
                self.bad = "CRC mismatch"
                break
            id_end = pos + ENTRY_SIZE + id_len
            entry = Entry(
                bytes(buf[pos + ENTRY_SIZE : id_end]).decode("utf-8", "replace"),
                self.channel,
                seq,
                ts_ns,
                recv_ns,
                bytes(buf[id_end:end]),
            )
            out.append((self.base + pos, end - pos, entry))
            pos = end
        del buf[:pos]
        self.base += pos
        return out

    def finish(self) -> str | None:
        """At the end of the stream: None if it ended cleanly, else why not."""
        if self.bad is None and self.buf:
            self.bad = "torn entry at the end"
        return self.bad


def read_index(path: Path, first_pos: int | None, limit: int | None) -> list[Block]:
    """The good, contiguous prefix of an index file: lines whose CRC holds, each starting
    where the one before ended (the first at `first_pos` unless None), none past `limit`."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    blocks: list[Block] = []
    for pos in range(0, len(data) - INDEX_SIZE + 1, INDEX_SIZE):
        min_t, max_t, bpos, size, count, crc = INDEX.unpack_from(data, pos)
        if zlib.crc32(data[pos : pos + INDEX_SIZE - 4]) != crc:
            break
        expected = blocks[-1].end if blocks else first_pos
        if (expected is not None and bpos != expected) or not size or not count:
            break
        if limit is not None and bpos + size > limit:
            break
        blocks.append(Block(min_t, max_t, bpos, size, count))
    return blocks


def gzip_member(data: bytes, level: int) -> bytes:
    comp = zlib.compressobj(level, zlib.DEFLATED, 31)
    return comp.compress(data) + comp.flush()


def gunzip_member(data: bytes) -> bytes:
    """One complete gzip member; zlib.error if it is not one."""
    d = zlib.decompressobj(31)
    out = d.decompress(data)
    if not d.eof or d.unused_data:
        raise zlib.error("incomplete or trailing gzip data")
    return out


def pread_all(fd: int, size: int, pos: int) -> bytes:
    data = os.pread(fd, size, pos)
    while len(data) < size:
        more = os.pread(fd, size - len(data), pos + len(data))
        if not more:
            break
        data += more
    return data


def pwrite_all(fd: int, data: bytes | bytearray, pos: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, pos)
        if n <= 0:
            raise OSError(28, "short write")
        view = view[n:]
        pos += n
