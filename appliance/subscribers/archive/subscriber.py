"""The archive subscriber: files every frame per channel and hour, compresses an hour once
it is finished, deletes closed hours by age or size. The files are specified in FORMAT.md
beside this module; `module-ingest export` reads them back (reader.py).

Configured as

    [subscribers.arch]
    type = "archive"
    channels = [1, 2]          # optional filters, applied by the runner
    retention_hours = 720      # options, all optional (see below)
    max_bytes = 2000000000

Options: the keys of the `[subscribers.NAME]` table besides those of the runner
(ArchiveSubscriber.OPTIONS); the daemon refuses to start with an unknown key or a bad
value, in one line naming the table, the key and the file.

```
retention_hours  0       delete a closed hour this long after its end (0: keep)
max_bytes        0       keep the archive at most this big, oldest closed first (0: no limit)
close_after      300     seconds without writes before a .log is compressed
compress_level   6       gzip level 1..9 (1: a third faster here, a little bigger)
index_every      256     entries per index block (a block also ends at 64 KiB)
max_open_files   32      file descriptors kept open
```

Compression and retention run inside `flush`, which the runner calls after each batch:
an archive that receives nothing keeps its last hour as a `.log` (readable all the same)
until frames come again. One flush spends at most about MAINTENANCE_SECONDS compressing
before handing back (a file started is finished); the rest waits for the next flush.

Memory is bounded: at most `max_open_files` file descriptors (least recently written
closed first), one block of index state per `.log`, and a batch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from appliance.config import OptionError
from appliance.durable import fsync_dir, make_dirs, write_atomic
from appliance.store.segment import Record
from appliance.subscribers.archive import state
from appliance.subscribers.archive.format import (
    HEADER_SIZE,
    HOUR_NS,
    READ_CHUNK,
    STATE_FILE,
    Block,
    archive_root,
    channel_dir,
    channel_of_dir,
    data_name,
    encode_entry,
    encode_header,
    gzip_member,
    hour_name,
    index_path,
    parse_name,
    pread_all,
    pwrite_all,
    read_index,
)
from appliance.subscribers.archive.live import LiveFile
from appliance.subscribers.archive.recovery import Recovery
from appliance.subscribers.base import Context, Subscriber

log = logging.getLogger("appliance.subscribers.archive")

CHECKPOINT_SECONDS = 2.0
RETENTION_SECONDS = 60.0  # retention also runs after every compression
MAINTENANCE_SECONDS = 1.0  # compression work per flush before the rest waits for the next
RETRY_SECONDS = 60.0  # pause after a failed compression or retention


class ArchiveSubscriber(Subscriber):
    """Files every frame under state_dir/archive/ (the layout: FORMAT.md)."""

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
        self._live: dict[Path, LiveFile] = {}
        self._reload()

    def _reload(self) -> None:
        """(Re)build the in-memory state from the files: after start and after a failure."""
        for live in self._live.values():
            if live.fd is not None:
                with contextlib.suppress(OSError):
                    os.close(live.fd)
        self._live = {}
        self._current: dict[tuple[int, int], LiveFile] = {}  # (channel, hour) -> file to append
        self._open: OrderedDict[Path, LiveFile] = OrderedDict()  # LRU of open fds
        self._dirty_dirs: set[Path] = set()
        self._saved_sizes: dict[str, int] = {}
        # until the files are read back, what is in memory (highest seqs from a failed
        # batch, say) must not be trusted: a reload that fails is tried again first
        self._needs_reload = True
        self._next_checkpoint = 0.0
        self._next_retention = 0.0
        make_dirs(self.root)
        found = Recovery(self.root, self.state_path, self.index_every, self.name)
        self._live = found.live
        self._current = found.current
        self._dirty_dirs = found.dirty_dirs
        self._saved_sizes = found.saved_sizes
        self.highest: dict[str, int] = found.highest
        if found.full_scan:
            self._save_state()  # the .log files are fsynced by now
        self._needs_reload = False
        if found.recovered:
            log.info(
                "%s: %d entries found past the last checkpoint count as archived",
                self.name,
                found.recovered,
            )

    # -- writing -----------------------------------------------------------------------

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
        pwrite_all(fd, encode_header(channel, hour), 0)
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
            pwrite_all(fd, live.buf, live.size)
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
        pwrite_all(fd, live.buf, live.size)
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
            live.add_to_block(live.size + len(live.buf), len(entry), t, self.index_every)
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
        state.save(self.state_path, self.highest, sizes)
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
                live.rebuild_blocks(src, live.size, self.index_every)
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
        write_atomic(index_path(gz), b"".join(b.encode() for b in lines))
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
            member = gzip_member(pread_all(src, HEADER_SIZE, 0), self.level)
            pwrite_all(out, member, 0)
            pos = len(member)
            lines = []
            for block in blocks:
                member = gzip_member(pread_all(src, block.size, block.pos), self.level)
                pwrite_all(out, member, pos)
                lines.append(Block(block.min_t, block.max_t, pos, len(member), block.count))
                pos += len(member)
            os.fsync(out)
        finally:
            os.close(out)
        return lines

    def _closed_files(self) -> Iterator[tuple[int, int, int, Path]]:
        """(hour, part, channel, path) of every `.log.gz`."""
        for directory in self.root.iterdir():
            channel = channel_of_dir(directory)
            if channel is None:
                continue
            for name in os.listdir(directory):
                parsed = parse_name(name)
                if parsed and parsed[2] and not parsed[3]:
                    yield parsed[0], parsed[1], channel, directory / name

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
