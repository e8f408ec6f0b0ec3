"""The disk archive: frames filed per channel and hour, compressed when finished.

Configured as

    [subscribers.arch]
    type = "archive"
    channels = [1, 2]          # optional filters, applied by the runner
    retention_hours = 720      # options, all optional
    max_bytes = 2000000000     # (see Options below)

and read back with `module-ingest export --channel N [--from T] [--to T]`.

Layout
------

Everything lives in the subscriber's state dir, `data/subscribers/NAME/`:

```
archive.state                    checkpoint: highest seq per identity, .log sizes
archive/
  ch-00007/                      one directory per channel (5 digits: 0..65535)
    2026-11-27T13.log.gz         a finished hour, compressed (gzip members, see below)
    2026-11-27T13.log.gz.idx     its index
    2026-11-27T13.1.log.gz       part 1 of that hour: frames that came after it was closed
    2026-11-27T14.log            the hour being written: append-only
    2026-11-27T14.log.idx        its index (complete blocks only)
```

The hour of a frame is taken from its `ts_ns` (the sender's clock), or from
`recv_ns` (the appliance's clock) when `ts_ns` is 0; call it `t`. A file named
`2026-11-27T14` holds frames with 14:00:00 <= t < 15:00:00 UTC, in the order
the log delivered them (arrival order; not sorted by `t`). Part numbers (`.1`,
`.2`, ...) appear only when frames for an hour arrive after its file was
compressed. All integers are unsigned big-endian; CRC-32 is zlib.crc32.

A `.log` file starts with a 20-byte header:

```
0   8  magic    "MIARC\\r\\n\\x1a"
8   2  version  1
10  2  channel
12  4  hour     hours since the Unix epoch (the name says the same thing)
16  4  crc      CRC-32 of bytes [0, 16)
```

then entries, one per frame, back to back:

```
0   4  crc      CRC-32 of bytes [4, 8 + length)
4   4  length   bytes after this field (26 + id_len + payload length)
8   8  ts_ns
16  8  recv_ns
24  8  seq
32  2  id_len
34  .  identity (UTF-8), then the payload
```

Reading stops at the end of the file or at the first entry whose length runs
past it or whose CRC does not match: after a crash that is a torn last entry,
which the archive cuts off when it starts (it is rewritten: the frame comes
again, see Delivery). Damage earlier than the last checkpoint is not cut
silently: the rest of the file is copied aside to `NAME.log.bad-OFFSET` and
logged once.

Entries are grouped in blocks of `index_every` entries (or 64 KiB, whichever
comes first). The index has one 36-byte line per complete block:

```
0   8  min_t    smallest t in the block
8   8  max_t    largest t in the block
16  8  pos      where the block starts in the data file
24  4  size     its bytes in the data file
28  4  count    entries in the block
32  4  crc      CRC-32 of bytes [0, 32)
```

In a `.log` the blocks are the entries themselves (the first at offset 20);
the entries after the last indexed block are the block being filled. An index
line is written only after the entries it points to are fsynced, and an index
is only an accelerator: when it is missing or damaged, readers scan.

Finishing a file: a `.log` not written for `close_after` seconds (or found at
start and then left alone that long) is compressed into `.log.gz`: the header
as one gzip member, then one gzip member per block, so `gzip -dc` gives back
the `.log` byte for byte, and the `.log.gz.idx` (same line format, `pos` and
`size` now the member's place in the `.gz`) still lets a reader decompress
only the blocks that overlap its time range. The switch is crash-safe: both
new files are written as `.tmp`, fsynced, renamed (index first, `.gz` last),
and only then the `.log` and its index are removed; a start that finds both a
`.log` and its `.log.gz` keeps the `.gz`.

Retention (closed files only; the files being written are never deleted):
`retention_hours` deletes a `.log.gz` once the end of its hour is that many
hours behind the appliance's clock; `max_bytes` deletes the oldest `.log.gz`
(by hour, across channels) while the whole archive is larger.

Delivery
--------

Delivery is at least once; the protocol makes `seq` strictly increasing per
identity in the log, so the archive keeps the highest seq written per identity
and skips a frame at or below it. Frames whose entries reached a file are
counted even if the process died before `flush`: at start the archive scans
each `.log` past the size recorded in `archive.state` (a checkpoint written
after the fsync in `flush`, at most every CHECKPOINT_SECONDS) and takes their
seqs in, so a redelivered batch is written once. A failure inside `handle` or
`flush` makes the next call reload that same way from disk. Consequences: frames
salvaged into the log with old seqs (recover-dump --salvage), or an identity
re-created with seqs starting again, are skipped as already archived; if
`archive.state` is lost or damaged it is set aside and every file is scanned.

Memory is bounded: at most `max_open_files` file descriptors (least recently
written closed first), one block of index state per `.log`, and a batch.

Options
-------

The keys of the `[subscribers.NAME]` table besides those of the runner
(ArchiveSubscriber.OPTIONS); the daemon refuses to start with an unknown key
or a bad value, in one line naming the table, the key and the file.

```
retention_hours  0       delete a closed hour this long after its end (0: keep)
max_bytes        0       keep the archive at most this big, oldest closed first (0: no limit)
close_after      300     seconds without writes before a .log is compressed
compress_level   6       gzip level 1..9 (1: a third faster here, a little bigger)
index_every      256     entries per index block (a block also ends at 64 KiB)
max_open_files   32      file descriptors kept open
```

Compression and retention run inside `flush`, which the runner calls after
each batch: an archive that receives nothing keeps its last hour as a `.log`
(readable all the same) until frames come again. One flush
spends at most about MAINTENANCE_SECONDS compressing before handing back
(a file started is finished); the rest waits for the next flush.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import struct
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from appliance.config import OptionError
from appliance.durable import fsync_dir
from appliance.store.segment import Record
from appliance.subscribers.base import Context, Subscriber

log = logging.getLogger("appliance.subscribers.archive")

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
CHECKPOINT_SECONDS = 2.0
RETENTION_SECONDS = 60.0  # retention also runs after every compression
MAINTENANCE_SECONDS = 1.0  # compression work per flush before the rest waits for the next
RETRY_SECONDS = 60.0  # pause after a failed compression or retention
READ_CHUNK = 1 << 20
NAME_RE = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2})(?:\.(\d+))?\.log(\.gz)?(\.idx)?$")


@dataclass(frozen=True, slots=True)
class Entry:
    """One archived frame (the attributes `tools.record_json` reads)."""

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


def frame_time(ts_ns: int, recv_ns: int) -> int:
    return ts_ns or recv_ns


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


def _pread_all(fd: int, size: int, pos: int) -> bytes:
    data = os.pread(fd, size, pos)
    while len(data) < size:
        more = os.pread(fd, size - len(data), pos + len(data))
        if not more:
            break
        data += more
    return data


def _pwrite_all(fd: int, data: bytes | bytearray, pos: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, pos)
        if n <= 0:
            raise OSError(28, "short write")
        view = view[n:]
        pos += n


# -- reading (export) ------------------------------------------------------------------


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
    reason = check_header(_pread_all(fd, HEADER_SIZE, 0), df.channel, df.hour)
    if reason:
        damage(f"{df.path}: {reason}; file skipped")
        return
    blocks = read_index(index_path(df.path), HEADER_SIZE, size)
    for block in blocks:
        if not _wanted(block, start_ns, end_ns):
            continue
        parser = EntryParser(df.channel, block.pos)
        entries = parser.feed(_pread_all(fd, block.size, block.pos))
        yield from (e for _, _, e in entries)
        if parser.finish():
            damage(f"{df.path}: {parser.bad} at offset {parser.base}; rest of block skipped")
    pos = blocks[-1].end if blocks else HEADER_SIZE
    parser = EntryParser(df.channel, pos)
    while pos < size:
        chunk = _pread_all(fd, min(READ_CHUNK, size - pos), pos)
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
                data = gunzip_member(_pread_all(fd, block.size, block.pos))
            except zlib.error as exc:
                damage(f"{df.path}: block at {block.pos}: {exc}; block skipped")
                continue
            parser = EntryParser(df.channel, 0)
            yield from (e for _, _, e in parser.feed(data))
            if parser.finish():
                damage(f"{df.path}: block at {block.pos}: {parser.bad}; rest of block skipped")
        return
    damage(f"{df.path}: index missing or damaged; reading the whole file")
    yield from _stream_gz(fd, df, damage)


def _stream_gz(fd: int, df: DataFile, damage: Callable[[str], None]) -> Iterator[Entry]:
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


# -- the subscriber --------------------------------------------------------------------


class LiveFile:
    """A `.log` being (or recently) written: its good size, its index state, its fd."""

    __slots__ = (
        "blk_count",
        "blk_max",
        "blk_min",
        "blk_pos",
        "buf",
        "channel",
        "dirty",
        "fd",
        "hour",
        "last_write",
        "part",
        "path",
        "pending",
        "rel",
        "size",
    )

    def __init__(self, path: Path, rel: str, channel: int, hour: int, part: int) -> None:
        self.path = path
        self.rel = rel  # path relative to the archive root, the key in archive.state
        self.channel = channel
        self.hour = hour
        self.part = part
        self.fd: int | None = None
        self.size = HEADER_SIZE  # good bytes written (buf comes after)
        self.buf = bytearray()  # entries not yet written
        self.dirty = False  # written since the last fsync
        self.blk_pos = HEADER_SIZE
        self.blk_count = 0
        self.blk_min = 0
        self.blk_max = 0
        self.pending: list[Block] = []  # complete blocks whose index lines are not written
        self.last_write = time.monotonic()


class ArchiveSubscriber(Subscriber):
    """Files every frame under state_dir/archive/ (see the module docstring for the layout)."""

    OPTIONS = {  # documented in the module docstring
        "retention_hours": (float, 0.0, 0),  # 0: keep forever
        "max_bytes": (int, 0, 0),  # 0: no limit
        "close_after": (float, 300.0, 0),  # seconds without writes before compressing
        "compress_level": (int, 6, 1),
        "index_every": (int, 256, 1),
        "max_open_files": (int, 32, 1),
    }
    CHOICES = {"compress_level": tuple(range(1, 10))}

    @classmethod
    def check(cls, options: dict, config_dir: Path) -> None:
        if options["index_every"] > 1 << 20:
            raise OptionError("index_every", f"at most {1 << 20}, got {options['index_every']}")

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        opts = self.options
        self.check(opts, context.config_dir)
        self.retention_ns = int(opts["retention_hours"] * HOUR_NS)
        self.max_bytes = opts["max_bytes"]
        self.close_after = opts["close_after"]
        self.level = opts["compress_level"]
        self.index_every = opts["index_every"]
        self.max_open = opts["max_open_files"]
        self.state_dir = Path(context.state_dir)
        self.root = archive_root(self.state_dir)
        self.state_path = self.state_dir / STATE_FILE
        # counters, in stats
        self.written = 0
        self.skipped = 0
        self.compressed = 0
        self.deleted = 0
        self.retry_seconds = RETRY_SECONDS
        self._maintain_after = 0.0
        self._maintain_failed = False
        self._reload()

    # -- recovery ----------------------------------------------------------------------

    def _reload(self) -> None:
        """(Re)build the in-memory state from the files: after start and after a failure."""
        for live in getattr(self, "_live", {}).values():
            if live.fd is not None:
                with contextlib.suppress(OSError):
                    os.close(live.fd)
        self._live: dict[Path, LiveFile] = {}
        self._current: dict[tuple[int, int], LiveFile] = {}  # (channel, hour) -> file to append
        self._open: OrderedDict[Path, LiveFile] = OrderedDict()  # LRU of open fds
        self._dirty_dirs: set[Path] = set()
        self._saved_sizes: dict[str, int] = {}
        self._needs_reload = False
        self._next_checkpoint = 0.0
        self._next_retention = 0.0
        self.root.mkdir(parents=True, exist_ok=True)
        self._recovered = 0
        highest, saved = self._load_state()
        full_scan = saved is None
        saved = saved or {}
        self.highest: dict[str, int] = highest
        for directory in sorted(self.root.iterdir()):
            match = re.fullmatch(r"ch-(\d{5})", directory.name)
            if not match or not directory.is_dir():
                continue
            self._recover_channel(directory, int(match.group(1)), saved, full_scan)
        self._saved_sizes = {rel: size for rel, size in saved.items() if rel in self._rels()}
        if full_scan:
            self._save_state()  # the .log files are fsynced by now
        if self._recovered:
            log.info(
                "%s: %d entries found past the last checkpoint count as archived",
                self.name,
                self._recovered,
            )

    def _rels(self) -> set[str]:
        return {live.rel for live in self._live.values()}

    def _load_state(self) -> tuple[dict[str, int], dict[str, int] | None]:
        """(highest seqs, .log sizes at the checkpoint); sizes None when every file needs
        scanning (no state or a damaged one)."""
        try:
            raw = self.state_path.read_bytes()
        except FileNotFoundError:
            if any(self.root.glob("ch-*/*.log*")):
                log.warning("%s: %s missing; scanning the whole archive", self.name, STATE_FILE)
            return {}, None
        try:
            crc_text, _, body = raw.partition(b"\n")
            if int(crc_text, 16) != zlib.crc32(body):
                raise ValueError("CRC mismatch")
            state = json.loads(body)
            highest = {str(k): int(v) for k, v in state["highest"].items()}
            sizes = {str(k): int(v) for k, v in state["files"].items()}
            return highest, sizes
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            bad = self.state_path.with_name(STATE_FILE + ".bad")
            os.replace(self.state_path, bad)
            log.warning(
                "%s: %s is damaged (%s); set aside as %s, scanning the whole archive",
                self.name,
                STATE_FILE,
                exc,
                bad.name,
            )
            return {}, None

    def _recover_channel(
        self, directory: Path, channel: int, saved: dict[str, int], full_scan: bool
    ) -> None:
        names = set(os.listdir(directory))
        for name in sorted(names):
            path = directory / name
            if name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            parsed = parse_name(name)
            if parsed is None:
                continue
            hour, part, compressed, is_index = parsed
            data = data_name(hour, part, compressed)
            if is_index and data not in names:
                path.unlink()  # left over from a compression or a deletion
            elif not is_index and not compressed and data + ".gz" in names:
                # compressed, then the crash came before the .log was removed
                path.unlink()
                with contextlib.suppress(FileNotFoundError):
                    index_path(path).unlink()
                self._dirty_dirs.add(directory)
            elif not is_index and not compressed:
                rel = f"{directory.name}/{name}"
                self._recover_log(path, rel, channel, hour, part, saved.get(rel))
            elif not is_index and full_scan:
                self._scan_gz(path, channel, hour)

    def _take_seq(self, entry: Entry) -> None:
        self._recovered += 1
        if entry.seq > self.highest.get(entry.identity, 0):
            self.highest[entry.identity] = entry.seq

    def _scan_gz(self, path: Path, channel: int, hour: int) -> None:
        df = DataFile(path, channel, hour, 0, True)
        fd = os.open(path, os.O_RDONLY)
        try:
            for entry in _stream_gz(fd, df, lambda m: log.warning("%s: %s", self.name, m)):
                self._take_seq(entry)
        finally:
            os.close(fd)

    def _recover_log(
        self, path: Path, rel: str, channel: int, hour: int, part: int, checkpoint: int | None
    ) -> None:
        """Adopt a `.log`: cut a torn tail, rebuild the block being filled and the index lines
        not written, take in the seqs past the checkpoint, fsync (they count as written)."""
        live = LiveFile(path, rel, channel, hour, part)
        checkpoint = HEADER_SIZE if checkpoint is None else checkpoint
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        try:
            file_size = os.fstat(fd).st_size
            reason = check_header(_pread_all(fd, HEADER_SIZE, 0), channel, hour)
            if reason and file_size <= HEADER_SIZE:  # torn at creation
                _pwrite_all(fd, encode_header(channel, hour), 0)
                os.ftruncate(fd, HEADER_SIZE)
                file_size = HEADER_SIZE
            elif reason:
                os.close(fd)
                fd = -1
                self._set_aside(path, reason)
                return
            blocks = read_index(index_path(path), HEADER_SIZE, file_size)
            indexed_end = blocks[-1].end if blocks else HEADER_SIZE
            # scan from an entry boundary: the start of the block holding the checkpoint
            start = next((b.pos for b in blocks if b.end > checkpoint), indexed_end)
            parser = EntryParser(channel, start)
            pos = start
            while pos < file_size and not parser.bad:
                chunk = _pread_all(fd, min(READ_CHUNK, file_size - pos), pos)
                if not chunk:
                    break
                pos += len(chunk)
                for offset, size, entry in parser.feed(chunk):
                    if offset >= checkpoint:
                        self._take_seq(entry)
                    if offset >= indexed_end:
                        self._add_to_block(live, offset, size, entry.t)
            bad = parser.finish()
            good_end = parser.base
            if bad:
                if good_end < checkpoint:
                    self._copy_aside(fd, path, good_end, file_size, bad)
                else:
                    log.warning(
                        "%s: %s: cut a torn tail of %d bytes at offset %d (%s)",
                        self.name,
                        rel,
                        file_size - good_end,
                        good_end,
                        bad,
                    )
                os.ftruncate(fd, good_end)
            os.fdatasync(fd)
            if good_end < indexed_end:  # the index pointed into the cut part
                blocks = [b for b in blocks if b.end <= good_end]
                live.blk_count = 0
                live.blk_pos = blocks[-1].end if blocks else HEADER_SIZE
                live.pending.clear()
                self._rebuild_blocks(fd, live, good_end)
            idx = index_path(path)
            if idx.exists() and idx.stat().st_size != len(blocks) * INDEX_SIZE:
                os.truncate(idx, len(blocks) * INDEX_SIZE)
            live.size = good_end
        finally:
            if fd >= 0:
                os.close(fd)
        self._live[path] = live
        key = (channel, hour)
        if key not in self._current or self._current[key].part < part:
            self._current[key] = live

    def _rebuild_blocks(self, fd: int, live: LiveFile, end: int) -> None:
        """Block state and index lines of `live` from live.blk_pos to `end`, by scanning."""
        parser = EntryParser(live.channel, live.blk_pos)
        pos = live.blk_pos
        while pos < end:
            chunk = _pread_all(fd, min(READ_CHUNK, end - pos), pos)
            if not chunk:
                break
            pos += len(chunk)
            for offset, size, entry in parser.feed(chunk):
                self._add_to_block(live, offset, size, entry.t)

    def _copy_aside(self, fd: int, path: Path, start: int, end: int, reason: str) -> None:
        aside = path.with_name(f"{path.name}.bad-{start}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
        with os.fdopen(os.open(aside, flags, 0o600), "wb") as out:
            pos = start
            while pos < end:
                chunk = _pread_all(fd, min(READ_CHUNK, end - pos), pos)
                if not chunk:
                    break
                out.write(chunk)
                pos += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        log.warning(
            "%s: %s: damaged at offset %d (%s); the %d bytes from there set aside as %s",
            self.name,
            path.name,
            start,
            reason,
            end - start,
            aside.name,
        )

    def _set_aside(self, path: Path, reason: str) -> None:
        aside = path.with_name(path.name + ".bad")
        os.replace(path, aside)
        with contextlib.suppress(FileNotFoundError):
            index_path(path).unlink()
        log.warning("%s: %s: %s; set aside as %s", self.name, path.name, reason, aside.name)

    # -- writing -----------------------------------------------------------------------

    def _add_to_block(self, live: LiveFile, offset: int, size: int, t: int) -> None:
        if live.blk_count == 0:
            live.blk_pos = offset
            live.blk_min = live.blk_max = t
        elif t < live.blk_min:
            live.blk_min = t
        elif t > live.blk_max:
            live.blk_max = t
        live.blk_count += 1
        end = offset + size
        if live.blk_count >= self.index_every or end - live.blk_pos >= INDEX_BYTES:
            live.pending.append(
                Block(live.blk_min, live.blk_max, live.blk_pos, end - live.blk_pos, live.blk_count)
            )
            live.blk_count = 0
            live.blk_pos = end

    def _new_file(self, channel: int, hour: int) -> LiveFile:
        directory = channel_dir(self.root, channel)
        if not directory.is_dir():
            directory.mkdir()
            self._dirty_dirs.add(self.root)
        prefix = hour_name(hour)
        part = 0
        for name in os.listdir(directory):
            parsed = parse_name(name) if name.startswith(prefix) else None
            if parsed and parsed[0] == hour:
                part = max(part, parsed[1] + 1)
        name = data_name(hour, part, False)
        path = directory / name
        live = LiveFile(path, f"{directory.name}/{name}", channel, hour, part)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        live.fd = fd
        live.dirty = True
        self._dirty_dirs.add(directory)
        self._live[path] = live
        self._current[(channel, hour)] = live
        self._open[path] = live
        _pwrite_all(fd, encode_header(channel, hour), 0)
        self._evict()
        return live

    def _fd(self, live: LiveFile) -> int:
        if live.fd is None:
            live.fd = os.open(live.path, os.O_RDWR | os.O_NOFOLLOW)
            self._open[live.path] = live
            self._evict()
        else:
            self._open.move_to_end(live.path)
        return live.fd

    def _evict(self) -> None:
        while len(self._open) > self.max_open:
            _, old = self._open.popitem(last=False)
            self._sync_close(old)

    def _sync_close(self, live: LiveFile) -> None:
        """Write what `live` holds, fsync, close its fd (already out of the LRU)."""
        fd = live.fd
        if live.buf:
            _pwrite_all(fd, live.buf, live.size)
            live.size += len(live.buf)
            live.buf = bytearray()
            live.dirty = True
            live.last_write = time.monotonic()
        if live.dirty:
            os.fdatasync(fd)
            live.dirty = False
        live.fd = None
        os.close(fd)

    def _write_buf(self, live: LiveFile) -> None:
        if not live.buf:
            return
        fd = self._fd(live)
        _pwrite_all(fd, live.buf, live.size)
        live.size += len(live.buf)
        live.buf = bytearray()
        live.dirty = True
        live.last_write = time.monotonic()

    def handle(self, records: list[Record]) -> None:
        if self._needs_reload:
            self._reload()
        try:
            self._handle(records)
        except BaseException:
            self._needs_reload = True
            raise

    def _handle(self, records: list[Record]) -> None:
        highest = self.highest
        current = self._current
        touched: dict[Path, LiveFile] = {}
        staged = 0
        for rec in records:
            ident = rec.identity
            if rec.seq <= highest.get(ident, 0):
                self.skipped += 1
                continue
            t = rec.ts_ns or rec.recv_ns
            live = current.get((rec.channel, t // HOUR_NS))
            if live is None:
                live = self._new_file(rec.channel, t // HOUR_NS)
            entry = encode_entry(ident.encode(), rec.ts_ns, rec.recv_ns, rec.seq, rec.payload)
            self._add_to_block(live, live.size + len(live.buf), len(entry), t)
            live.buf += entry
            touched[live.path] = live
            highest[ident] = rec.seq
            self.written += 1
            staged += len(entry)
            if staged >= READ_CHUNK:  # what a batch holds in memory stays bounded
                for each in touched.values():
                    self._write_buf(each)
                staged = 0
        for live in touched.values():
            self._write_buf(live)

    def flush(self) -> None:
        if self._needs_reload:
            self._reload()
        try:
            self._sync()
            if time.monotonic() >= self._next_checkpoint:
                self._save_state()
        except BaseException:
            self._needs_reload = True
            raise
        # the batch is durable now: a failure from here on is the archive's own business
        if time.monotonic() < self._maintain_after:
            return
        try:
            self._maintain()
            self._maintain_failed = False
        except OSError as exc:
            self._needs_reload = True  # the next call sees the files as they are
            self._maintain_after = time.monotonic() + self.retry_seconds
            if not self._maintain_failed:
                log.error(
                    "%s: compression or retention failed: %s; trying again every %.0f s",
                    self.name,
                    exc,
                    self.retry_seconds,
                )
            self._maintain_failed = True

    def _sync(self) -> None:
        """Everything handled so far on flash: entries, new directory entries, index lines."""
        for live in self._live.values():
            self._write_buf(live)
            if live.dirty and live.fd is not None:
                os.fdatasync(live.fd)
                live.dirty = False
        for directory in self._dirty_dirs:
            fsync_dir(directory)
        self._dirty_dirs.clear()
        for live in self._live.values():
            if live.pending:
                self._write_index(live)

    def _maintain(self) -> None:
        """Compress the files not written for close_after (their entries in the checkpoint
        first), then retention. A failed compression leaves the `.log` as it was."""
        now = time.monotonic()
        due = [live for live in self._live.values() if now - live.last_write >= self.close_after]
        if any(self._saved_sizes.get(live.rel) != live.size for live in due):
            self._save_state()
        deadline = now + MAINTENANCE_SECONDS
        for live in due:
            if time.monotonic() > deadline:
                break
            self._compress(live)
        if due or now >= self._next_retention:
            self._retention()

    def _write_index(self, live: LiveFile) -> None:
        fd = os.open(
            index_path(live.path), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600
        )
        try:
            os.write(fd, b"".join(b.encode() for b in live.pending))
            os.fsync(fd)
        finally:
            os.close(fd)
        live.pending.clear()

    def _save_state(self) -> None:
        """The checkpoint; only called when every entry written is fsynced."""
        sizes = {live.rel: live.size for live in self._live.values()}
        body = json.dumps({"version": 1, "highest": self.highest, "files": sizes}).encode()
        tmp = self.state_path.with_name(STATE_FILE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            _pwrite_all(fd, b"%08x\n" % zlib.crc32(body) + body, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.state_path)
        fsync_dir(self.state_dir)
        self._saved_sizes = sizes
        self._next_checkpoint = time.monotonic() + CHECKPOINT_SECONDS

    # -- finishing and retention -------------------------------------------------------

    def _compress(self, live: LiveFile) -> None:
        """`.log` -> `.log.gz` with its index. The caller made sure that everything is
        fsynced and covered by the last checkpoint."""
        if live.fd is not None:
            self._open.pop(live.path, None)
            self._sync_close(live)
        if live.size == HEADER_SIZE:  # no entries: nothing to keep
            self._forget(live)
            for each in (live.path, index_path(live.path)):
                with contextlib.suppress(FileNotFoundError):
                    each.unlink()
            fsync_dir(live.path.parent)
            return
        src = os.open(live.path, os.O_RDONLY)
        try:
            blocks = read_index(index_path(live.path), HEADER_SIZE, live.size)
            if (blocks[-1].end if blocks else HEADER_SIZE) != live.blk_pos:
                # index lines lost (a failed write): rebuild them from the file
                blocks = []
                live.blk_count = 0
                live.blk_pos = HEADER_SIZE
                self._rebuild_blocks(src, live, live.size)
                blocks, live.pending = live.pending, []
            if live.blk_count:
                blocks.append(
                    Block(
                        live.blk_min,
                        live.blk_max,
                        live.blk_pos,
                        live.size - live.blk_pos,
                        live.blk_count,
                    )
                )
            gz = live.path.with_name(live.path.name + ".gz")
            lines = self._write_gz(src, gz.with_name(gz.name + ".tmp"), blocks)
        finally:
            os.close(src)
        idx = index_path(gz)
        _write_file(idx.with_name(idx.name + ".tmp"), b"".join(b.encode() for b in lines))
        os.replace(idx.with_name(idx.name + ".tmp"), idx)
        os.replace(gz.with_name(gz.name + ".tmp"), gz)  # the commit point
        fsync_dir(live.path.parent)
        live.path.unlink()
        with contextlib.suppress(FileNotFoundError):
            index_path(live.path).unlink()
        fsync_dir(live.path.parent)
        self._forget(live)
        self.compressed += 1
        gz_size = lines[-1].end if lines else 0
        log.info("%s: compressed %s (%d -> %d bytes)", self.name, live.rel, live.size, gz_size)

    def _forget(self, live: LiveFile) -> None:
        del self._live[live.path]
        if self._current.get((live.channel, live.hour)) is live:
            del self._current[(live.channel, live.hour)]
        self._saved_sizes.pop(live.rel, None)

    def _write_gz(self, src: int, tmp: Path, blocks: list[Block]) -> list[Block]:
        """The header as one gzip member, each block as one; returns the new index lines."""
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            member = gzip_member(_pread_all(src, HEADER_SIZE, 0), self.level)
            _pwrite_all(out, member, 0)
            pos = len(member)
            lines = []
            for block in blocks:
                member = gzip_member(_pread_all(src, block.size, block.pos), self.level)
                _pwrite_all(out, member, pos)
                lines.append(Block(block.min_t, block.max_t, pos, len(member), block.count))
                pos += len(member)
            os.fsync(out)
        finally:
            os.close(out)
        return lines

    def _closed_files(self) -> Iterator[tuple[int, int, int, Path]]:
        """(hour, part, channel, path) of every `.log.gz`."""
        for directory in self.root.iterdir():
            match = re.fullmatch(r"ch-(\d{5})", directory.name)
            if not match or not directory.is_dir():
                continue
            for name in os.listdir(directory):
                parsed = parse_name(name)
                if parsed and parsed[2] and not parsed[3]:
                    yield parsed[0], parsed[1], int(match.group(1)), directory / name

    def _archive_bytes(self) -> int:
        total = 0
        for directory in self.root.iterdir():
            if directory.is_dir():
                for entry in os.scandir(directory):
                    with contextlib.suppress(FileNotFoundError):
                        total += entry.stat().st_size
        return total

    def _retention(self) -> None:
        self._next_retention = time.monotonic() + RETENTION_SECONDS
        if not self.retention_ns and not self.max_bytes:
            return
        closed = sorted(self._closed_files())
        if self.retention_ns:
            cutoff = time.time_ns() - self.retention_ns
            while closed and (closed[0][0] + 1) * HOUR_NS <= cutoff:
                self._delete(closed.pop(0)[3], "older than retention_hours")
        if self.max_bytes:
            total = self._archive_bytes()
            while closed and total > self.max_bytes:
                path = closed.pop(0)[3]
                total -= self._delete(path, "the archive is above max_bytes")

    def _delete(self, path: Path, why: str) -> int:
        """Delete a closed file and its index; returns the bytes freed."""
        freed = 0
        for each in (path, index_path(path)):
            with contextlib.suppress(FileNotFoundError):
                freed += each.stat().st_size
                each.unlink()
        fsync_dir(path.parent)
        self.deleted += 1
        log.info("%s: deleted %s/%s (%s)", self.name, path.parent.name, path.name, why)
        return freed

    def stats(self) -> dict:
        return {
            "written": self.written,
            "skipped_as_archived": self.skipped,
            "compressed_files": self.compressed,
            "deleted_files": self.deleted,
        }

    def close(self) -> None:
        try:
            if not self._needs_reload:  # else the files are what the next start recovers
                self._sync()
                self._save_state()
        finally:
            for live in self._live.values():
                if live.fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(live.fd)
                    live.fd = None
            self._open.clear()


def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        _pwrite_all(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
