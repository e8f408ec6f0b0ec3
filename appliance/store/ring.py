"""The ring: the bounded, shared-memory stage between the loop and the writer process.

Owner: the loop thread. It appends encoded records at `head`, cuts everything
appended since the last batch into the next batch (`cut`, padded to a 4 KiB
boundary, split where a new segment begins), and learns from the writer when
a batch is durable (`durable`). The writer process only reads the batch in
flight, from the same memory (an anonymous MAP_SHARED mapping that it
inherits when the store forks it), so the ring holds byte for byte what goes
into the segment files and nothing is copied between the processes.

Positions only grow; the byte at position p lives at p % size. Between
`durable` and `head` nothing is overwritten, so a batch whose write or sync
failed is still here to be written again (never trust a sync after a failed
one: the kernel may have dropped the pages).

A batch starts over at the ring's beginning (its position jumps to the next
multiple of size) once the head is past `wrap_at` and the batch in flight is
small and leaves room there. The fleet shape's batches are a block or two, so the loop and
the writer keep to the first megabyte instead of cycling through the whole
ring: a shared page, once touched, stays resident in both processes, and a
16 MiB cycle also evicts the caches. The bytes jumped over belong to no batch;
they count as durable once the batch in flight before them is (`made_durable`).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

from appliance.store.segment import BLOCK, DATA_START, encode_padding, padding_to_block

RESERVE = 2 * BLOCK  # room kept for a batch's padding, in the ring and in a segment
WRAP_AT = 1024 * 1024  # a new batch goes back to the ring's start past this (or size / 4)


@dataclass(frozen=True, slots=True)
class Batch:
    """One commit: ring bytes [start, end), a new segment at each of `switches`."""

    start: int
    end: int
    switches: tuple[int, ...]
    marks: dict[str, int]  # highest seq per identity in the batch
    frames: int


class Ring:
    def __init__(self, size: int, segment_bytes: int, seg_used: int, commit_max_bytes: int) -> None:
        self.size = size
        self.segment_bytes = segment_bytes
        self.commit_max_bytes = commit_max_bytes
        self.memory = mmap.mmap(-1, size)  # MAP_SHARED | MAP_ANONYMOUS on Linux
        self.head = 0  # next byte appended
        self.taken = 0  # everything before it is in a batch
        self.durable = 0  # everything before it is on flash
        self.wrap_at = min(WRAP_AT, size // 4)
        # (end of the batch in flight, where the next batch started): the jump over the
        # ring's tail that becomes durable with that batch
        self._skip: tuple[int, int] | None = None
        self.seg_used = seg_used  # bytes used in the segment the next record goes to
        # a segment that would need starting refuses records (quota, free-space floor)
        self.full = False
        # the batch being gathered: where new segments begin, highest seq per identity
        self._switches: list[int] = []
        self._marks: dict[str, int] = {}
        self._frames = 0

    def pending(self) -> int:
        """Bytes appended and not yet durable."""
        skipped = self._skip[1] - self._skip[0] if self._skip is not None else 0
        return self.head - self.durable - skipped

    def made_durable(self, end: int) -> None:
        """The writer's news: everything before `end` (a batch's end) is on flash."""
        if self._skip is not None and end == self._skip[0]:
            end = self._skip[1]
            self._skip = None
        self.durable = end

    def gathered(self) -> int:
        """Bytes appended and not yet in a batch."""
        return self.head - self.taken

    def space(self) -> int:
        """How much more may be appended: the ring's room, and what keeps the next batch
        within commit_max_bytes (a torn commit can only damage that much, FORMAT.md)."""
        return min(
            self.commit_max_bytes - (self.head - self.taken),
            self.durable + self.size - RESERVE - self.head,
        )

    def append(self, records: list[bytes], ident: str, seqs: list[int]) -> int:
        """Put one identity's encoded records in the ring, in order; how many went in.

        The rest did not fit: the ring is full, or the store is full and they would
        need a new segment. The highest seq joins the batch being gathered, so the
        batch that makes the records durable carries it."""
        if self.head == self.taken and self.head % self.size >= self.wrap_at:
            self._rewind()
        data = b"".join(records) if len(records) > 1 else records[0]
        n = len(data)
        head = self.head
        room = self.durable + self.size - RESERVE - head
        if n <= room and self.seg_used + n + RESERVE <= self.segment_bytes:
            self._put(head, data)  # the common case: one copy for the whole read
            self.head = head + n
            self.seg_used += n
            self._marks[ident] = seqs[-1]
            self._frames += len(records)
            return len(records)
        done = 0
        for rec in records:
            size = len(rec)
            if size > room:
                break
            if self.seg_used + size + RESERVE > self.segment_bytes:
                if self.full:
                    break
                self._switches.append(head)
                self.seg_used = DATA_START
            self._put(head, rec)
            head += size
            room -= size
            self.seg_used += size
            done += 1
        self.head = head
        if done:
            self._marks[ident] = seqs[done - 1]
            self._frames += done
        return done

    def _rewind(self) -> None:
        """Start the batch about to be gathered at the ring's beginning, if the batch in
        flight (between durable and head) is small and leaves at least wrap_at there: the
        bytes jumped over are room the next batch cannot use until that one is durable."""
        start = self.head + self.size - self.head % self.size
        if (
            self._skip is not None
            or self.head - self.durable > self.wrap_at // 4
            or self.durable + self.size - RESERVE - start < self.wrap_at
        ):
            return
        if self.durable == self.head:
            self.durable = start
        else:
            self._skip = (self.head, start)
        self.head = self.taken = start

    def _put(self, pos: int, data: bytes) -> None:
        at = pos % self.size
        end = at + len(data)
        if end <= self.size:
            self.memory[at:end] = data
        else:
            first = self.size - at
            self.memory[at:] = data[:first]
            self.memory[: end - self.size] = data[first:]

    def cut(self) -> Batch:
        """Everything gathered as the next batch, padded to a block boundary so that the
        next commit never rewrites a block of this one. Call only when gathered() > 0."""
        pad = padding_to_block(self.seg_used)
        if pad:
            self._put(self.head, encode_padding(pad))
            self.head += pad
            self.seg_used += pad
        batch = Batch(self.taken, self.head, tuple(self._switches), self._marks, self._frames)
        self.taken = self.head
        self._switches = []
        self._marks = {}
        self._frames = 0
        return batch
