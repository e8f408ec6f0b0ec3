"""Rebuilding the archive's in-memory state from its files, at start and after a failure:
the `.log` files being written (a torn tail cut, the block being filled and the index
lines not written rebuilt), the seqs past the checkpoint taken in, the leftovers of an
interrupted compression or deletion finished or undone (FORMAT.md, Delivery)."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from appliance.subscribers.archive import state
from appliance.subscribers.archive.format import (
    HEADER_SIZE,
    INDEX_SIZE,
    READ_CHUNK,
    Entry,
    EntryParser,
    channel_of_dir,
    check_header,
    data_name,
    encode_header,
    index_path,
    parse_name,
    pread_all,
    pwrite_all,
    read_index,
)
from appliance.subscribers.archive.live import LiveFile
from appliance.subscribers.archive.reader import DataFile, stream_gz

log = logging.getLogger("appliance.subscribers.archive")


class Recovery:
    """The state found in the files of the archive at `root` (checkpoint at `state_path`).

    live         every `.log`, fsynced, its torn tail cut: the files to append to
    current      (channel, hour) -> the `.log` new entries of that hour go to
    highest      the highest seq archived per identity
    saved_sizes  the `.log` sizes the checkpoint holds (of the files still there)
    full_scan    the checkpoint was missing or damaged: every file was scanned
    dirty_dirs   directories whose entries changed (to fsync before the next checkpoint)
    recovered    entries found past the checkpoint, counted as archived
    """

    def __init__(self, root: Path, state_path: Path, index_every: int, name: str) -> None:
        self.root = root
        self.index_every = index_every
        self.name = name
        self.live: dict[Path, LiveFile] = {}
        self.current: dict[tuple[int, int], LiveFile] = {}
        self.dirty_dirs: set[Path] = set()
        self.recovered = 0
        self.highest, saved = state.load(state_path, root, name)
        self.full_scan = saved is None
        saved = saved or {}
        for directory in sorted(root.iterdir()):
            channel = channel_of_dir(directory)
            if channel is not None:
                self._recover_channel(directory, channel, saved)
        rels = {live.rel for live in self.live.values()}
        self.saved_sizes = {rel: size for rel, size in saved.items() if rel in rels}

    def _recover_channel(self, directory: Path, channel: int, saved: dict[str, int]) -> None:
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
                self.dirty_dirs.add(directory)
            elif not is_index and not compressed:
                rel = f"{directory.name}/{name}"
                self._recover_log(path, rel, channel, hour, part, saved.get(rel))
            elif not is_index and self.full_scan:
                self._scan_gz(path, channel, hour)

    def _take_seq(self, entry: Entry) -> None:
        self.recovered += 1
        if entry.seq > self.highest.get(entry.identity, 0):
            self.highest[entry.identity] = entry.seq

    def _scan_gz(self, path: Path, channel: int, hour: int) -> None:
        df = DataFile(path, channel, hour, 0, True)
        fd = os.open(path, os.O_RDONLY)
        try:
            for entry in stream_gz(fd, df, lambda m: log.warning("%s: %s", self.name, m)):
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
            reason = check_header(pread_all(fd, HEADER_SIZE, 0), channel, hour)
            if reason and file_size <= HEADER_SIZE:  # torn at creation
                pwrite_all(fd, encode_header(channel, hour), 0)
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
                chunk = pread_all(fd, min(READ_CHUNK, file_size - pos), pos)
                if not chunk:
                    break
                pos += len(chunk)
                for offset, size, entry in parser.feed(chunk):
                    if offset >= checkpoint:
                        self._take_seq(entry)
                    if offset >= indexed_end:
                        live.add_to_block(offset, size, entry.t, self.index_every)
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
                live.rebuild_blocks(fd, good_end, self.index_every)
            idx = index_path(path)
            if idx.exists() and idx.stat().st_size != len(blocks) * INDEX_SIZE:
                os.truncate(idx, len(blocks) * INDEX_SIZE)
            live.size = good_end
        finally:
            if fd >= 0:
                os.close(fd)
        self.live[path] = live
        key = (channel, hour)
        if key not in self.current or self.current[key].part < part:
            self.current[key] = live

    def _copy_aside(self, fd: int, path: Path, start: int, end: int, reason: str) -> None:
        aside = path.with_name(f"{path.name}.bad-{start}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
        with os.fdopen(os.open(aside, flags, 0o600), "wb") as out:
            pos = start
            while pos < end:
                chunk = pread_all(fd, min(READ_CHUNK, end - pos), pos)
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
