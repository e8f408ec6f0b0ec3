"""A `.log` being written: what the subscriber writes and what recovery rebuilds the same
way, so that a restart goes on exactly where the last write ended."""

from __future__ import annotations

import time
from pathlib import Path

from appliance.subscribers.archive.format import (
    HEADER_SIZE,
    INDEX_BYTES,
    READ_CHUNK,
    Block,
    EntryParser,
    pread_all,
)


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

    def add_to_block(self, offset: int, size: int, t: int, index_every: int) -> None:
        """Count the entry at `offset` into the block being filled; a block that is full
        (`index_every` entries or INDEX_BYTES) goes to `pending`, its index line to write."""
        if self.blk_count == 0:
            self.blk_pos = offset
            self.blk_min = self.blk_max = t
        elif t < self.blk_min:
            self.blk_min = t
        elif t > self.blk_max:
            self.blk_max = t
        self.blk_count += 1
        end = offset + size
        if self.blk_count >= index_every or end - self.blk_pos >= INDEX_BYTES:
            self.pending.append(
                Block(self.blk_min, self.blk_max, self.blk_pos, end - self.blk_pos, self.blk_count)
            )
            self.blk_count = 0
            self.blk_pos = end

    def rebuild_blocks(self, fd: int, end: int, index_every: int) -> None:
        """Block state and index lines from blk_pos to `end`, by scanning the file `fd`."""
        parser = EntryParser(self.channel, self.blk_pos)
        pos = self.blk_pos
        while pos < end:
            chunk = pread_all(fd, min(READ_CHUNK, end - pos), pos)
            if not chunk:
                break
            pos += len(chunk)
            for offset, size, entry in parser.feed(chunk):
                self.add_to_block(offset, size, entry.t, index_every)
