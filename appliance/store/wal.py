"""The durable store as the loop sees it: the ring in front, the writer process behind.

Owners, one each:
- the loop thread owns this object, the ring (ring.py) and every field below:
  it appends records, cuts a batch whenever the writer is idle (`submit`),
  and reads the writer's replies (`completed`) when `fileno()` is readable;
- the writer process (writer.py) owns the segment files, store.meta and
  retention (retention.py); it only ever reads the batch in flight from the
  ring, and it tells the loop about itself in messages, so no state is
  shared between the two but the ring's bytes;
- recovery (recovery.py) runs once in `open`, before the writer exists.

Batching is natural: whatever arrived while the previous fdatasync ran goes
into the next one, and when the disk is idle a batch starts at once (or
after `commit_delay`, if one is configured to trade latency for fewer, fuller
blocks on flash). A full ring is backpressure: the loop stops reading
sockets when `space()` is smaller than a read.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import marshal
import os
import select
import signal
import time
from collections import deque
from pathlib import Path

from appliance.durable import make_dirs
from appliance.store import writer
from appliance.store.recovery import recover
from appliance.store.ring import Ring
from appliance.store.segment import DATA_START

log = logging.getLogger("appliance.store")

MiB = 1024 * 1024
LOCK_NAME = "LOCK"
LOCK_WAIT = 10.0  # a previous daemon's writer may take a moment to die with it
CLOSE_WAIT = 0.4  # at close: how long the writer may take to finish and checkpoint
MARKS_CHUNK = 1000  # identities per marks message (well below writer.MESSAGE_MAX)
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


class StoreError(Exception):
    """The store cannot go on (its writer died, or another daemon holds it)."""


class Store:
    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        segment_bytes: int = 64 * MiB,
        ring_bytes: int = 16 * MiB,
        commit_delay: float = 0.0,
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
        self.options = writer.WriterOptions(
            segment_bytes=segment_bytes,
            checkpoint_bytes=checkpoint_bytes,
            checkpoint_seconds=checkpoint_seconds,
            quota_bytes=quota_bytes,
            min_free_bytes=min_free_bytes,
            retention_bytes=retention_bytes,
            retention_seconds=retention_seconds,
            overflow=overflow,
        )
        # the replay window recovery found: highest stored seq per identity
        self.last_seq: dict[str, int] = {}
        self.frames = 0  # frames stored (durable or about to be), since the store was created
        # from the writer's messages
        self.dropped_frames = 0  # overflow = "drop-oldest" only
        self.bytes_on_disk = 0  # segment files, preallocated size included
        self.commit_error: str | None = None  # the last failure while commits fail
        self.commits = 0
        self.commit_seconds: deque[float] = deque(maxlen=1024)  # recent write+fdatasync times
        self.recovery_seconds = 0.0
        self.ring: Ring | None = None
        self._position = (1, DATA_START)  # (segment, offset) before which all is durable
        self._inflight: dict[str, int] | None = None  # marks of the batch being written
        self._inflight_since: float | None = None  # when it was sent (None: waiting to retry)
        self._first_gathered: float | None = None  # for commit_delay
        self._done: list[dict[str, int]] = []
        self._pid = 0
        self._sock = None
        self._lock_fd = -1

    @property
    def full(self) -> bool:
        """No room for another segment (quota or free-space floor): frames that would
        need one are refused (BUSY) until retention or the operator makes room."""
        return self.ring is not None and self.ring.full

    # -- start and stop ------------------------------------------------------

    def open(self) -> None:
        """Lock the directory, recover from the checkpoint to the tail, start the writer."""
        started = time.monotonic()
        make_dirs(self.directory)
        self._lock()
        found = recover(self.directory, self.segment_bytes, self.commit_max_bytes)
        self.last_seq = found.last_seq
        self.frames = found.frames
        self.ring = Ring(
            self.ring_bytes,
            self.segment_bytes,
            DATA_START if found.fresh else found.offset,
            self.commit_max_bytes,
        )
        self._position = (found.segment, found.offset)
        self._pid, self._sock = writer.spawn(
            self.ring.memory,
            self.directory,
            self.options,
            segment=found.segment,
            offset=found.offset,
            fresh=found.fresh,
            window=found.last_seq,
            frames=found.frames,
            keep_fds=(self._lock_fd,),
        )
        self._wait_open()
        self._sock.setblocking(False)
        self.recovery_seconds = time.monotonic() - started

    def _wait_open(self) -> None:
        """The writer's first answer: its segment and checkpoint are on disk, or why not."""
        while True:
            data = self._sock.recv(writer.MESSAGE_MAX)
            message = marshal.loads(data) if data else ("o", "the writer exited")
            if message[0] != "o":
                self._on_message(message)  # its log lines and usage come first
                continue
            if message[1] is not None:
                self._reap(time.monotonic() + CLOSE_WAIT)
                self._sock.close()
                self._sock = None
                os.close(self._lock_fd)
                self._lock_fd = -1
                raise StoreError(f"cannot start the log: {message[1]}")
            return

    def _lock(self) -> None:
        """One daemon per store. The lock is shared with the writer (it inherits the
        descriptor), so it is free only once both are gone."""
        fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise StoreError(
                        f"{self.directory} is in use by another module-ingest daemon"
                    ) from None
                time.sleep(0.01)
        os.set_inheritable(fd, False)
        self._lock_fd = fd

    def close(self) -> None:
        """Commit what is in the ring (while the writer keeps up), checkpoint, stop the
        writer. Bounded: a writer stuck in a failing or hung disk is killed, and what it
        had not made durable stays unacknowledged."""
        if self._sock is None:
            return
        deadline = time.monotonic() + CLOSE_WAIT
        with contextlib.suppress(StoreError):
            while self.ring.pending() and self.commit_error is None:
                self.submit()
                if time.monotonic() > deadline or not self._wait_readable(deadline):
                    break
                self.completed()
        with contextlib.suppress(StoreError):
            self._send(("s",))
            # its last words (log lines, usage) until it exits
            deadline += CLOSE_WAIT
            while self._wait_readable(deadline):
                self.completed()
        self._reap(deadline)
        self._sock.close()
        self._sock = None
        os.close(self._lock_fd)
        self._lock_fd = -1

    def _wait_readable(self, deadline: float) -> bool:
        ready, _, _ = select.select([self._sock], [], [], max(0.0, deadline - time.monotonic()))
        return bool(ready)

    def _reap(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            pid, _ = os.waitpid(self._pid, os.WNOHANG)
            if pid:
                return
            time.sleep(0.005)
        log.error("store: the writer did not stop in time; killing it")
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._pid, signal.SIGKILL)
        os.waitpid(self._pid, 0)

    # -- the loop's side -------------------------------------------------------

    def fileno(self) -> int:
        """Readable when the writer has news: call `completed`."""
        return self._sock.fileno()

    def append(self, records: list[bytes], ident: str, seqs: list[int]) -> int:
        """Put one identity's encoded records (`encode_frame_record`, with these seqs) in
        the ring, in order; how many went in. The rest did not fit: the ring is full, or
        the store is full and they would need a new segment."""
        ring = self.ring
        if self._first_gathered is None:
            self._first_gathered = time.monotonic()
        n = ring.append(records, ident, seqs)
        self.frames += n
        return n

    def space(self) -> int:
        """Bytes that may still be appended before the loop has to stop reading."""
        return self.ring.space()

    def pending_bytes(self) -> int:
        """Ring bytes not yet durable."""
        return self.ring.pending()

    def submit(self, now: float | None = None) -> None:
        """Send the writer the next batch if it is idle and something has gathered (once
        per loop iteration, and after every reply)."""
        ring = self.ring
        if self._inflight is not None or not ring.gathered():
            return
        if self.commit_delay:
            now = time.monotonic() if now is None else now
            if now - (self._first_gathered or now) < self.commit_delay:
                return
        batch = ring.cut()
        self._first_gathered = None
        marks = batch.marks
        if len(marks) > MARKS_CHUNK:  # rare (a large batch): ahead of it, in chunks
            items = list(marks.items())
            for i in range(0, len(items), MARKS_CHUNK):
                self._send(("m", dict(items[i : i + MARKS_CHUNK])))
            marks = {}
        self._send(("c", batch.start, batch.end, batch.switches, batch.frames, marks))
        self._inflight = batch.marks
        self._inflight_since = time.monotonic()

    def commit_due(self) -> float | None:
        """With commit_delay: when the gathered batch is due (None: nothing waits)."""
        if not self.commit_delay or self._inflight is not None or self._first_gathered is None:
            return None
        return self._first_gathered + self.commit_delay

    def _send(self, message: tuple) -> None:
        # Sent only while the writer waits for messages (it answers one batch before it
        # takes another), and each fits the socket buffer, so this does not block.
        try:
            self._sock.send(marshal.dumps(message))
        except BlockingIOError:
            self._sock.setblocking(True)
            try:
                self._sock.send(marshal.dumps(message))
            finally:
                self._sock.setblocking(False)
        except OSError as exc:
            raise StoreError(f"the store's writer is gone ({exc.strerror})") from None

    def completed(self) -> list[dict[str, int]]:
        """Read the writer's news; the marks of the batches made durable since the last
        call (each {identity: highest seq}), oldest first. StoreError if the writer died."""
        sock = self._sock
        while True:
            try:
                data = sock.recv(writer.MESSAGE_MAX)
            except BlockingIOError:
                break
            except ConnectionResetError:
                data = b""
            if not data:
                raise StoreError("the store's writer exited")
            self._on_message(marshal.loads(data))
        done, self._done = self._done, []
        return done

    def _on_message(self, message: tuple) -> None:
        kind = message[0]
        if kind == "d":
            _, end, seg, off, seconds = message
            self.ring.made_durable(end)
            self._position = (seg, off)
            self.commit_seconds.append(seconds)
            self.commits += 1
            if self.commit_error is not None:
                self.commit_error = None
            self._done.append(self._inflight)
            self._inflight = None
            self._inflight_since = None
            self.submit()
        elif kind == "e":
            self.commit_error = message[1]
            self._inflight_since = None  # waiting to retry is not a stuck write
        elif kind == "r":
            self._inflight_since = time.monotonic()
        elif kind == "u":
            _, full, self.bytes_on_disk, self.dropped_frames = message
            self.ring.full = full
        elif kind == "l":
            _, level, text = message
            log.log(LEVELS.get(level, logging.ERROR), "%s", text)

    def stalled_for(self, now: float) -> float:
        """Seconds the commit in flight has been running (0 when none is): the watchdog's input."""
        since = self._inflight_since
        return 0.0 if since is None else now - since

    def durable_position(self) -> tuple[int, int]:
        """(segment, offset) before which everything is durable."""
        return self._position
