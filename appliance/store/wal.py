"""The durable store: an mmap ring in front of preallocated WAL segments.

The loop thread encodes each accepted frame as a record straight into the
ring (`append`) and, once per loop iteration, tells the committer what it
appended (`submit`, with the highest seq per identity). The committer thread
takes everything in the ring that is not durable yet (after waiting at most
`commit_delay` for more, or until `commit_max_bytes` have gathered), pads it
to a 4 KiB boundary, writes it with `pwrite` and makes it durable with one
`fdatasync`; both release the GIL. It then reports the batch's marks, and
`wakeup` tells the loop to collect them with `completed` and send the ACKs.

A full ring is backpressure: `append` refuses, and the loop stops reading
sockets before it gets there (`pending_bytes`). Recently committed records
stay in the ring until overwritten, so readers that keep up are served from
memory (`read_ring`); readers that fall behind read the segment files.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import mmap
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from appliance.durable import fsync_dir
from appliance.store import meta
from appliance.store.recovery import read_segment_records, recover
from appliance.store.segment import (
    BLOCK,
    DATA_START,
    encode_header,
    encode_padding,
    list_segments,
    padding_to_block,
    segment_name,
)

log = logging.getLogger("appliance.store")

RETRY_DELAY = 0.1  # after a failed write (disk full, I/O error) the batch is retried, never dropped
HOUSEKEEPING_INTERVAL = 1.0  # retention and checkpoints by age are looked at this often
RING_RESERVE = 2 * BLOCK  # ring room kept for the committer's padding
MiB = 1024 * 1024


class Store:
    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        segment_bytes: int = 64 * MiB,
        ring_bytes: int = 16 * MiB,
        commit_delay: float = 0.001,
        commit_max_bytes: int = 4 * MiB,
        checkpoint_bytes: int = 32 * MiB,
        checkpoint_seconds: float = 10.0,
        quota_bytes: int = 0,
        min_free_bytes: int = 0,
        retention_bytes: int = 0,
        retention_seconds: float = 0.0,
        overflow: str = "block",
    ) -> None:
        self.directory = Path(directory)
        self.segment_bytes = segment_bytes
        self.ring_bytes = ring_bytes
        self.commit_delay = commit_delay
        self.commit_max_bytes = commit_max_bytes
        self.checkpoint_bytes = checkpoint_bytes
        self.checkpoint_seconds = checkpoint_seconds
        self.quota_bytes = quota_bytes
        self.min_free_bytes = min_free_bytes
        self.retention_bytes = retention_bytes
        self.retention_seconds = retention_seconds
        self.overflow = overflow
        # the replay window: highest stored seq per identity, from the checkpoint and the log
        self.last_seq: dict[str, int] = {}
        self.frames = 0  # frames stored (durable or about to be), since the store was created
        self.dropped_frames = 0  # overflow = "drop-oldest" only
        self.bytes_on_disk = 0  # segment files, preallocated size included
        # no room for another segment (quota or free-space floor): a frame that would need
        # one is refused (BUSY) until retention or the operator makes room
        self.full = False
        self.commit_error: str | None = None
        self.commits = 0
        self.commit_seconds: deque[float] = deque(maxlen=1024)  # recent write+fdatasync times
        self.commit_started: float | None = None  # monotonic start of the commit in flight
        self.recovery_seconds = 0.0
        # called from the committer thread after each commit; the loop sets it
        self.wakeup: Callable[[], None] = lambda: None

        self._ring = mmap.mmap(-1, ring_bytes)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        # ring positions only grow; a byte at position p lives at p % ring_bytes
        self._head = 0  # next byte the loop appends
        self._taken = 0  # the committer has taken everything before this
        self._durable = 0  # everything before this is on flash
        self._seg_used = DATA_START  # bytes used in the segment the loop appends to
        self._switches: deque[int] = deque()  # ring positions where a new segment begins
        self._marks: deque[tuple[int, dict[str, int], int]] = deque()  # (ring end, marks, frames)
        self._first_pending: float | None = None
        self._done: deque[dict[str, int]] = deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # committer-side state
        self._fd = -1
        self._segment = 0
        self._offset = DATA_START  # file offset of the next byte in the current segment
        self._parts: deque[tuple[int, int, int, int]] = deque(maxlen=4096)  # ring a, b, seg, off
        self._window: dict[str, int] = {}  # replay window as of the durable position
        self._durable_frames = 0
        self._since_checkpoint = 0
        self._checkpoint_at = time.monotonic()
        self._housekeeping_at = 0.0

    # -- start and stop ------------------------------------------------------

    def open(self) -> None:
        """Recover from the checkpoint to the tail, then start the committer."""
        started = time.monotonic()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._recover()
        self._window = dict(self.last_seq)
        self._durable_frames = self.frames
        self._write_checkpoint()
        self._update_usage()
        self.recovery_seconds = time.monotonic() - started
        self._thread = threading.Thread(target=self._run, name="wal-commit", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Commit what is in the ring, write the checkpoint and stop the committer."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self._write_checkpoint()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _recover(self) -> None:
        found = recover(self.directory, self.segment_bytes, self.commit_max_bytes)
        self.last_seq = found.last_seq
        self.frames = found.frames
        if found.fresh:
            self._start_segment(found.segment)
        else:
            self._open_segment(
                found.segment, self.directory / segment_name(found.segment), found.offset
            )

    # -- segments (committer thread, and open) ---------------------------------

    def _open_segment(self, number: int, path: Path, end: int) -> None:
        fd = os.open(path, os.O_RDWR)
        self._preallocate(fd)
        self._fd, self._segment, self._offset = fd, number, end
        self._seg_used = end

    def _start_segment(self, number: int) -> None:
        path = self.directory / segment_name(number)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            self._preallocate(fd)
            os.pwrite(fd, encode_header(number, time.time_ns(), self.segment_bytes), 0)
            os.fdatasync(fd)
            fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._segment, self._offset = fd, number, DATA_START

    def _preallocate(self, fd: int) -> None:
        # reserve the blocks now: a full disk shows up at rotation, never inside a commit
        if os.fstat(fd).st_size < self.segment_bytes:
            os.posix_fallocate(fd, 0, self.segment_bytes)

    # -- loop side -----------------------------------------------------------

    def append(self, records: list[bytes], ident: str, seqs: list[int]) -> int:
        """Put one identity's encoded records (`encode_frame_record`, with these seqs) in
        the ring, in order; returns how many went in. The rest did not fit: the ring is
        full, or the store is full and they would need a new segment.

        The seqs are recorded with the records' ring position, under the same lock, so
        a commit that makes the records durable always carries their marks: the
        checkpoint never gets ahead of the replay window."""
        data = b"".join(records)
        n = len(data)
        with self._lock:
            head = self._head
            room = self._durable + self.ring_bytes - RING_RESERVE - head
            if n <= room and self._seg_used + n + RING_RESERVE <= self.segment_bytes:
                self._put(head, data)  # the common case: one copy for the whole read
                self._head = head + n
                self._seg_used += n
                self._mark(ident, seqs[-1], len(records))
                return len(records)
            done = 0
            for rec in records:
                size = len(rec)
                if size > room:
                    break
                if self._seg_used + size + RING_RESERVE > self.segment_bytes:
                    if self.full:
                        break
                    self._switches.append(head)
                    self._seg_used = DATA_START
                self._put(head, rec)
                head += size
                room -= size
                self._seg_used += size
                done += 1
            self._head = head
            if done:
                self._mark(ident, seqs[done - 1], done)
            return done

    def _mark(self, ident: str, seq: int, count: int) -> None:
        # caller holds the lock
        self._marks.append((self._head, {ident: seq}, count))
        self.frames += count
        if self._first_pending is None:
            self._first_pending = time.monotonic()

    def _put(self, pos: int, data: bytes) -> None:
        at = pos % self.ring_bytes
        first = min(len(data), self.ring_bytes - at)
        self._ring[at : at + first] = data[:first]
        if first < len(data):
            self._ring[0 : len(data) - first] = data[first:]

    def submit(self) -> None:
        """Wake the committer for what was appended (once per loop iteration)."""
        with self._cond:
            self._cond.notify()

    def pending_bytes(self) -> int:
        """Ring bytes not yet durable: the loop's backpressure signal."""
        return self._head - self._durable

    def stalled_for(self, now: float) -> float:
        """Seconds the commit in flight has been running (0 when none is): the watchdog's input."""
        started = self.commit_started
        return 0.0 if started is None else now - started

    def completed(self) -> list[dict[str, int]]:
        """Marks of the batches made durable since the last call, oldest first."""
        done = []
        while self._done:
            done.append(self._done.popleft())
        return done

    def durable_position(self) -> tuple[int, int]:
        """(segment, offset) before which everything is durable."""
        with self._lock:
            return self._position_locked(self._durable)

    def read_ring(self, segment: int, offset: int, limit: int) -> bytes | None:
        """Up to `limit` durable bytes from (segment, offset) if the ring still holds them."""
        with self._lock:
            for a, b, seg, off in reversed(self._parts):
                if seg == segment and off <= offset < off + (b - a):
                    pos = a + (offset - off)
                    if pos < self._head - self.ring_bytes:
                        return None  # overwritten by newer records
                    end = min(b, self._durable, pos + limit)
                    return self._get(pos, end - pos)
        return None

    def _get(self, pos: int, n: int) -> bytes:
        at = pos % self.ring_bytes
        first = min(n, self.ring_bytes - at)
        data = self._ring[at : at + first]
        if first < n:
            data += self._ring[0 : n - first]
        return data

    # -- committer thread ----------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            start, end, switches, marks, frames = batch
            started = time.monotonic()
            seg, off = self._segment, self._offset
            while True:
                # per attempt: a retry that hangs after a failed one is a stall too
                self.commit_started = time.monotonic()
                try:
                    rotated = self._write(start, end, switches)
                    break
                except OSError as exc:
                    # Not durable, not acknowledged; keep the batch and try again.
                    error = f"{exc.strerror or exc} ({self.directory})"
                    if error != self.commit_error:  # say it once, not every retry
                        log.error("store: commit failed: %s; retrying until it succeeds", error)
                    self.commit_error = error
                    self.commit_started = None  # waiting to retry is not a stuck write
                    self._segment, self._offset = seg, off
                    self._reopen(seg)
                    self._housekeeping(force=True)
                    time.sleep(RETRY_DELAY)
            if self.commit_error is not None:
                log.warning("store: commits succeed again")
            self.commit_error = None
            self.commit_seconds.append(time.monotonic() - started)
            self.commits += 1
            self.commit_started = None
            for ident, seq in marks.items():
                if seq > self._window.get(ident, 0):
                    self._window[ident] = seq
            self._durable_frames += frames
            self._since_checkpoint += end - start
            with self._cond:
                # marks first: once pending_bytes() reads 0, completed() has them
                self._done.append(marks)
                self._durable = end
            self.wakeup()
            if rotated or self._since_checkpoint >= self.checkpoint_bytes:
                self._write_checkpoint()
            if rotated:
                self._update_usage()
            self._housekeeping()

    def _take(self):
        """Wait for records, then up to commit_delay for more; None when stopping and idle."""
        with self._cond:
            while True:
                if self._head == self._taken:
                    if self._stopping:
                        return None
                    self._cond.wait(HOUSEKEEPING_INTERVAL)
                    if self._head == self._taken:
                        self._cond.release()
                        try:
                            self._housekeeping()
                        finally:
                            self._cond.acquire()
                    continue
                deadline = (self._first_pending or 0) + self.commit_delay
                left = deadline - time.monotonic()
                if left <= 0 or self._stopping or self._head - self._taken >= self.commit_max_bytes:
                    break
                self._cond.wait(left)
            pad = padding_to_block(self._seg_used)
            if pad:
                self._put(self._head, encode_padding(pad))
                self._head += pad
                self._seg_used += pad
            start, end = self._taken, self._head
            switches = []
            while self._switches and self._switches[0] < end:
                switches.append(self._switches.popleft())
            marks: dict[str, int] = {}
            frames = 0
            while self._marks and self._marks[0][0] <= end:
                _, more, n = self._marks.popleft()
                marks.update(more)
                frames += n
            self._taken = end
            self._first_pending = time.monotonic() if self._marks else None
        return start, end, switches, marks, frames

    def _write(self, start: int, end: int, switches: list[int]) -> bool:
        """Write ring[start:end) to the segments (a new one at each switch) and fdatasync."""
        rotated = False
        # a switch at `start` itself opens the new segment before the first part, once
        bounds = [start, *(s for s in switches if s != start), end]
        for a, b in itertools.pairwise(bounds):
            if a in switches:
                os.fdatasync(self._fd)
                self._start_segment(self._segment + 1)
                rotated = True
            if b > a:
                self._pwrite(a, b)
                with self._lock:  # readers walk _parts under the lock
                    self._parts.append((a, b, self._segment, self._offset))
                self._offset += b - a
        os.fdatasync(self._fd)
        return rotated

    def _pwrite(self, a: int, b: int) -> None:
        view = memoryview(self._ring)
        try:
            pos, off = a, self._offset
            while pos < b:
                at = pos % self.ring_bytes
                n = min(b - pos, self.ring_bytes - at)
                written = os.pwrite(self._fd, view[at : at + n], off)
                pos += written
                off += written
        finally:
            view.release()

    def _reopen(self, number: int) -> None:
        path = self.directory / segment_name(number)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if path.exists():
            self._fd = os.open(path, os.O_RDWR)

    # -- checkpoint, retention, quota (committer thread) ------------------------

    def _write_checkpoint(self) -> None:
        with self._lock:
            position = self._position_locked(self._durable)
        state = {
            "version": 1,
            "checkpoint": list(position),
            "frames": self._durable_frames,
            "last_seq": self._window,
        }
        try:
            meta.write(self.directory / meta.STORE_META, state)
        except OSError as exc:
            log.error("store: cannot write the checkpoint: %s", exc)
            return
        self._since_checkpoint = 0
        self._checkpoint_at = time.monotonic()

    def _position_locked(self, ring_pos: int) -> tuple[int, int]:
        for a, b, seg, off in reversed(self._parts):
            if a < ring_pos <= b:
                return seg, off + (ring_pos - a)
        return self._segment, self._offset

    def _housekeeping(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._housekeeping_at < HOUSEKEEPING_INTERVAL:
            return
        self._housekeeping_at = now
        if self._since_checkpoint and now - self._checkpoint_at >= self.checkpoint_seconds:
            self._write_checkpoint()
        try:
            self._retain()
        except OSError as exc:
            log.error("store: retention: %s", exc)
        self._update_usage()

    def _update_usage(self) -> None:
        total = 0
        for _, path in list_segments(self.directory):
            with contextlib.suppress(FileNotFoundError):  # a reader's retention raced us
                total += path.stat().st_size
        self.bytes_on_disk = total
        full = bool(self.quota_bytes) and total + self.segment_bytes > self.quota_bytes
        if self.min_free_bytes:
            stat = os.statvfs(self.directory)
            full = full or stat.f_bavail * stat.f_frsize < self.min_free_bytes
        if full != self.full:
            log.warning(
                "store: %s", "storage full: new frames get BUSY" if full else "space is back"
            )
        self.full = full

    def _retain(self) -> None:
        """Delete sealed segments every cursor has passed, where retention or space asks."""
        segments = [s for s in list_segments(self.directory) if s[0] < self._segment]
        if not segments:
            return
        cursors = meta.list_cursors(self.directory)
        oldest_needed = min(
            (pos[0] if pos else 0 for pos in cursors.values()), default=None
        )  # a cursor at segment S still needs S
        total = sum(p.stat().st_size for _, p in list_segments(self.directory))
        now = time.time()
        for number, path in segments:
            passed = oldest_needed is None or number < oldest_needed
            over_bytes = bool(self.retention_bytes) and total > self.retention_bytes
            too_old = (
                bool(self.retention_seconds) and now - path.stat().st_mtime > self.retention_seconds
            )
            tight = bool(self.quota_bytes) and total + self.segment_bytes > self.quota_bytes
            if self.min_free_bytes:
                stat = os.statvfs(self.directory)
                tight = tight or stat.f_bavail * stat.f_frsize < self.min_free_bytes
            if passed and (over_bytes or too_old):
                why = "retention"
            elif passed and tight and cursors:
                # space pressure frees only what readers have consumed; with no reader
                # registered the data is kept (dump, recover-dump) and new frames get BUSY
                why = "space"
            elif tight and self.overflow == "drop-oldest":
                why = "overflow"
            else:
                break  # oldest first: keep this one, and so every newer one
            size = path.stat().st_size
            if why == "overflow":
                dropped = sum(1 for item in read_segment_records(path, number))
                self.dropped_frames += dropped
                log.warning(
                    "store: storage full; dropping %s with %d unread frames"
                    " (overflow = drop-oldest, %d dropped in all)",
                    path.name,
                    dropped,
                    self.dropped_frames,
                )
            else:
                log.info("store: deleting %s (%s)", path.name, why)
            os.unlink(path)
            total -= size
        fsync_dir(self.directory)
