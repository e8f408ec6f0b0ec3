"""The durable store: segmented WAL with group commit off the selector loop.

The loop thread stages records with `append` and hands each loop iteration's
batch to the committer with `submit`, together with the highest seq it holds
per identity. The committer thread writes the batch with one `write`, makes it
durable with one `fdatasync` (both release the GIL), and reports the batch's
marks back; `wakeup` tells the loop to collect them with `completed`, and only
then does the loop acknowledge. Batches queue while a commit runs, so every
commit takes whatever accumulated meanwhile: group commit without a timer.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

from appliance.store.segment import (
    Record,
    ScanEnd,
    SegmentError,
    check_header,
    encode_header,
    encode_record,
    fsync_dir,
    list_segments,
    read_segment,
    scan,
    segment_name,
)

log = logging.getLogger("appliance.store")

RETRY_DELAY = 0.1  # after a failed write (disk full, I/O error) the batch is retried, never dropped


class Store:
    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        segment_bytes: int = 64 * 1024 * 1024,
        commit_max_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.directory = Path(directory)
        self.segment_bytes = segment_bytes
        self.commit_max_bytes = commit_max_bytes
        self.last_seq: dict[str, int] = {}  # highest stored seq per identity, rebuilt by recovery
        self.frames = 0
        self.bytes_on_disk = 0  # segment bytes, for the quota
        self.commit_error: str | None = None
        self.commits = 0
        self.commit_seconds: deque[float] = deque(maxlen=1024)  # recent write+fdatasync times
        self.commit_started: float | None = None  # monotonic start of the commit in flight
        # called from the committer thread after each commit; the loop sets it
        self.wakeup: Callable[[], None] = lambda: None
        self._staged = bytearray()
        self._queue: deque[tuple[bytearray, dict[str, int]]] = deque()
        self._queued_bytes = 0
        self._done: deque[dict[str, int]] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._fd = -1
        self._segment = 0
        self._size = 0

    # -- start and stop ------------------------------------------------------

    def open(self) -> None:
        """Recover the log, then start the committer."""
        self.directory.mkdir(parents=True, exist_ok=True)
        segments = list_segments(self.directory)
        status = "ok"
        for number, path in segments:
            status = self._recover_segment(number, path, newest=number == segments[-1][0])
        if not segments:
            self._start_segment(1)
        elif status == "ok":
            self._segment, path = segments[-1]
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            self._size = os.fstat(self._fd).st_size
        elif status == "empty":
            self._start_segment(segments[-1][0])  # its header never reached the disk
        else:
            self._start_segment(segments[-1][0] + 1)  # never append behind a bad header
        self.bytes_on_disk = sum(path.stat().st_size for _, path in list_segments(self.directory))
        self._thread = threading.Thread(target=self._run, name="wal-commit", daemon=True)
        self._thread.start()

    def _recover_segment(self, number: int, path: Path, *, newest: bool) -> str:
        """Rebuild the replay window from one segment; "ok", "empty" (all zero) or "bad"."""
        data = read_segment(path)
        try:
            check_header(data, number)
        except SegmentError as exc:
            if not data.strip(b"\0"):
                log.warning("wal: %s has no header (%s) and no data", path.name, exc)
                return "empty"
            log.error("wal: %s is not a valid segment (%s); its records are skipped", path, exc)
            return "bad"
        last = self.last_seq
        end = None
        for item in scan(data, number):
            if isinstance(item, ScanEnd):
                end = item
                break
            if item.seq > last.get(item.identity, 0):
                last[item.identity] = item.seq
            self.frames += 1
        if end is None:
            return "ok"
        if newest:
            log.warning(
                "wal: %s: %s at offset %d; truncating the torn tail (%d bytes)",
                path.name,
                end.reason,
                end.offset,
                len(data) - end.offset,
            )
            os.truncate(path, end.offset)
        else:
            log.error(
                "wal: %s: %s at offset %d; the rest of this segment is skipped",
                path.name,
                end.reason,
                end.offset,
            )
        return "ok"

    def close(self) -> None:
        """Commit what is queued and stop the committer."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -- loop side -----------------------------------------------------------

    def append(
        self, ident: bytes, channel: int, seq: int, ts_ns: int, recv_ns: int, payload: bytes
    ) -> None:
        self._staged += encode_record(ident, channel, seq, ts_ns, recv_ns, payload)

    def submit(self, marks: dict[str, int]) -> None:
        """Queue the staged records for commit; `marks` are their highest seq per identity."""
        staged = self._staged
        if not staged and not marks:
            return
        self._staged = bytearray()
        with self._cond:
            self._queue.append((staged, marks))
            self._queued_bytes += len(staged)
            self._cond.notify()

    def stalled_for(self, now: float) -> float:
        """Seconds the commit in flight has been running (0 when none is): the watchdog's input."""
        started = self.commit_started
        return 0.0 if started is None else now - started

    def pending_bytes(self) -> int:
        """Bytes handed to the committer and not yet durable: the loop's backpressure signal."""
        return self._queued_bytes + len(self._staged)

    def completed(self) -> list[dict[str, int]]:
        """Marks of the batches made durable since the last call, oldest first."""
        done = []
        while self._done:
            done.append(self._done.popleft())
        return done

    # -- committer thread ----------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                batch, marks, size = self._take()
            self.commit_started = started = time.monotonic()
            while True:
                try:
                    self._write(batch)
                    break
                except OSError as exc:
                    # Not durable, not acknowledged; keep the batch and try again.
                    self.commit_error = f"{exc.strerror or exc} ({self.directory})"
                    log.error("wal: commit failed: %s; retrying", self.commit_error)
                    time.sleep(RETRY_DELAY)
            self.commit_error = None
            self.commit_seconds.append(time.monotonic() - started)
            self.commits += 1
            self.commit_started = None
            with self._cond:
                # marks first: once pending_bytes() reads 0, completed() has them
                self._done.append(marks)
                self._queued_bytes -= size
            self.wakeup()

    def _take(self) -> tuple[bytearray, dict[str, int], int]:
        """Merge queued batches up to commit_max_bytes into one write."""
        batch, marks = self._queue.popleft()
        marks = dict(marks)
        while self._queue and len(batch) + len(self._queue[0][0]) <= self.commit_max_bytes:
            more, more_marks = self._queue.popleft()
            batch += more
            marks.update(more_marks)
        return batch, marks, len(batch)

    def _write(self, batch: bytearray) -> None:
        if self._size + len(batch) > self.segment_bytes and self._size > 32:
            self._start_segment(self._segment + 1)
        if batch:
            start = self._size
            try:
                view = memoryview(batch)
                while view:
                    view = view[os.write(self._fd, view) :]
                os.fdatasync(self._fd)
            except OSError:
                os.ftruncate(self._fd, start)  # drop a partial write before the retry
                raise
            self._size = start + len(batch)
            self.bytes_on_disk += len(batch)

    def _start_segment(self, number: int) -> None:
        path = self.directory / segment_name(number)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        try:
            os.write(fd, encode_header(number, time.time_ns()))
            os.fdatasync(fd)
            fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._segment, self._size = fd, number, os.fstat(fd).st_size
        self.bytes_on_disk += self._size


def read_records(directory: str | os.PathLike) -> Iterator[Record]:
    """Every valid record, oldest first; safe beside a running daemon (a tail being
    written reads as the end)."""
    for number, path in list_segments(Path(directory)):
        data = read_segment(path)
        try:
            check_header(data, number)
        except SegmentError:
            continue
        for item in scan(data, number):
            if isinstance(item, ScanEnd):
                break
            yield item
