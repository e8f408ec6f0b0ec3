"""Reading an archive back (`module-ingest export`), beside the running subscriber:
a `.log` is read up to its last complete entry, a `.log.gz` block by block through
its index (or whole, member after member, when the index is missing or damaged)."""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from appliance.subscribers.archive.format import (
    HEADER_SIZE,
    HOUR_NS,
    READ_CHUNK,
    Block,
    Entry,
    EntryParser,
    channel_dir,
    check_header,
    gunzip_member,
    index_path,
    parse_name,
    pread_all,
    read_index,
)


@dataclass(frozen=True)
class DataFile:
    path: Path
    channel: int
    hour: int
    part: int
    compressed: bool


def list_files(root: Path, channel: int) -> list[DataFile]:
    """The data files of a channel by (hour, part); a `.log.gz` wins over its `.log`."""
    directory = channel_dir(root, channel)
    found: dict[tuple[int, int], DataFile] = {}
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    for name in names:
        parsed = parse_name(name)
        if parsed is None or parsed[3]:
            continue
        hour, part, compressed, _ = parsed
        old = found.get((hour, part))
        if old is None or compressed:
            found[(hour, part)] = DataFile(directory / name, channel, hour, part, compressed)
    return [found[k] for k in sorted(found)]


def read_archive(
    root: Path,
    channel: int,
    start_ns: int = 0,
    end_ns: int | None = None,
    identity: str | None = None,
    on_damage: Callable[[str], None] | None = None,
) -> Iterator[Entry]:
    """The entries of `channel` with start_ns <= t < end_ns, by hour, then in arrival order.

    Reads beside a running archive: a `.log` is read up to its last complete entry.
    Damage is reported through `on_damage` (one message per damaged stretch) and skipped."""
    damage = on_damage or (lambda message: None)
    first_hour = start_ns // HOUR_NS
    last_hour = None if end_ns is None else (end_ns - 1) // HOUR_NS
    for df in list_files(root, channel):
        if df.hour < first_hour or (last_hour is not None and df.hour > last_hour):
            continue
        for entry in _read_file(df, start_ns, end_ns, damage):
            if identity is not None and entry.identity != identity:
                continue
            if entry.t < start_ns or (end_ns is not None and entry.t >= end_ns):
                continue
            yield entry


def _open_data(df: DataFile) -> tuple[int, DataFile] | None:
    try:
        return os.open(df.path, os.O_RDONLY), df
    except FileNotFoundError:
        if df.compressed:
            return None  # deleted by retention since the listing
    gz = df.path.with_name(df.path.name + ".gz")  # compressed since the listing
    try:
        return os.open(gz, os.O_RDONLY), DataFile(gz, df.channel, df.hour, df.part, True)
    except FileNotFoundError:
        return None


def _read_file(
    df: DataFile, start_ns: int, end_ns: int | None, damage: Callable[[str], None]
) -> Iterator[Entry]:
    opened = _open_data(df)
    if opened is None:
        return
    fd, df = opened
    try:
        size = os.fstat(fd).st_size
        if df.compressed:
            yield from _read_gz(fd, size, df, start_ns, end_ns, damage)
        else:
            yield from _read_log(fd, size, df, start_ns, end_ns, damage)
    finally:
        os.close(fd)


def _wanted(block: Block, start_ns: int, end_ns: int | None) -> bool:
    return block.max_t >= start_ns and (end_ns is None or block.min_t < end_ns)


def _read_log(fd, size, df, start_ns, end_ns, damage) -> Iterator[Entry]:
    reason = check_header(pread_all(fd, HEADER_SIZE, 0), df.channel, df.hour)
    if reason:
        damage(f"{df.path}: {reason}; file skipped")
        return
    blocks = read_index(index_path(df.path), HEADER_SIZE, size)
    for block in blocks:
        if not _wanted(block, start_ns, end_ns):
            continue
        parser = EntryParser(df.channel, block.pos)
        entries = parser.feed(pread_all(fd, block.size, block.pos))
        yield from (e for _, _, e in entries)
        if parser.finish():
            damage(f"{df.path}: {parser.bad} at offset {parser.base}; rest of block skipped")
    pos = blocks[-1].end if blocks else HEADER_SIZE
    parser = EntryParser(df.channel, pos)
    while pos < size:
        chunk = pread_all(fd, min(READ_CHUNK, size - pos), pos)
        if not chunk:
            break
        pos += len(chunk)
        yield from (e for _, _, e in parser.feed(chunk))
        if parser.bad:
            break
    if parser.bad:  # a torn last entry of a file being written is not damage
        damage(f"{df.path}: {parser.bad} at offset {parser.base}; rest of file skipped")


def _read_gz(fd, size, df, start_ns, end_ns, damage) -> Iterator[Entry]:
    blocks = read_index(index_path(df.path), None, size)
    if blocks and blocks[-1].end == size:
        for block in blocks:
            if not _wanted(block, start_ns, end_ns):
                continue
            try:
                data = gunzip_member(pread_all(fd, block.size, block.pos))
            except zlib.error as exc:
                damage(f"{df.path}: block at {block.pos}: {exc}; block skipped")
                continue
            parser = EntryParser(df.channel, 0)
            yield from (e for _, _, e in parser.feed(data))
            if parser.finish():
                damage(f"{df.path}: block at {block.pos}: {parser.bad}; rest of block skipped")
        return
    damage(f"{df.path}: index missing or damaged; reading the whole file")
    yield from stream_gz(fd, df, damage)


def stream_gz(fd: int, df: DataFile, damage: Callable[[str], None]) -> Iterator[Entry]:
    """Every entry of a `.log.gz`, decompressing member after member (no index needed)."""
    size = os.fstat(fd).st_size
    parser: EntryParser | None = None
    head = b""
    d = zlib.decompressobj(31)
    fed = False  # d is inside a member
    pos = 0
    while pos < size:
        data = os.pread(fd, min(READ_CHUNK, size - pos), pos)
        if not data:
            break
        pos += len(data)
        while data:
            try:
                out = d.decompress(data)
            except zlib.error as exc:
                damage(f"{df.path}: {exc} before compressed offset {pos}; rest of file skipped")
                return
            fed = True
            data = b""
            if d.eof:
                data = d.unused_data
                d = zlib.decompressobj(31)
                fed = False
            if parser is None:
                head += out
                if len(head) < HEADER_SIZE:
                    continue
                reason = check_header(head, df.channel, df.hour)
                if reason:
                    damage(f"{df.path}: {reason}; file skipped")
                    return
                parser = EntryParser(df.channel, HEADER_SIZE)
                out = head[HEADER_SIZE:]
            yield from (e for _, _, e in parser.feed(out))
            if parser.bad:
                damage(f"{df.path}: {parser.bad}; rest of file skipped")
                return
    if fed or parser is None or parser.finish():
        damage(f"{df.path}: truncated")
