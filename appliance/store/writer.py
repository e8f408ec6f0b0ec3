"""The writer: a child process that makes the loop's batches durable.

The loop cuts a batch in the shared ring and sends its bounds; the writer
`pwrite`s those bytes into the current segment (starting a new one where the
batch says), calls `fdatasync` once and answers with the new durable
position. Being a process, not a thread, it never waits for the loop's GIL
when fdatasync returns, and it puts the second core to work. It owns every
file descriptor of the log, the segment numbering, the checkpoint in
store.meta (with the replay window, kept from the marks each batch carries)
and retention; the loop owns the ring, the marks and the ACKs.

One batch is in flight at a time, and the writer answers every one before it
takes the next, so a reply always belongs to the last batch sent.

Messages are marshal'd tuples over a SOCK_SEQPACKET socketpair:

    loop -> writer   ("m", {identity: seq})          marks of the next batch, when many
                     ("c", start, end, switches, frames, {identity: seq})
                                                      commit ring[start:end), its marks
                     ("s",)                           stop: retention, checkpoint, exit
    writer -> loop   ("o", error)                     open: the segment is ready (error None)
                     ("d", end, segment, offset, seconds)  durable up to end
                     ("e", error)                     the write or sync failed; retrying
                     ("r",)                           retrying now
                     ("u", full, bytes_on_disk, dropped_frames)   usage changed
                     ("l", level, text)               a log line for the daemon's log

A failed write or fdatasync is never retried as a sync alone: after an error
the kernel may have dropped the dirty pages and marked them clean, so a later
successful fdatasync would not cover them (PostgreSQL's "fsyncgate"). The
whole batch is written again from the ring, which still holds it.
"""

from __future__ import annotations

import contextlib
import itertools
import marshal
import os
import select
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.children import die_with_parent
from appliance.durable import fsync_dir
from appliance.store import meta
from appliance.store.retention import Retention
from appliance.store.segment import DATA_START, encode_header, segment_name

RETRY_DELAY = 0.1  # after a failed write (disk full, I/O error) the batch is retried, never dropped
HOUSEKEEPING_INTERVAL = 1.0  # retention, usage and checkpoints by age are looked at this often
MESSAGE_MAX = 65536  # largest message either side sends (marks are chunked below it)


@dataclass(frozen=True)
class WriterOptions:
    segment_bytes: int
    checkpoint_bytes: int
    checkpoint_seconds: float
    quota_bytes: int
    min_free_bytes: int
    retention_bytes: int
    retention_seconds: float
    overflow: str


def spawn(
    ring,
    directory: Path,
    options: WriterOptions,
    *,
    segment: int,
    offset: int,
    fresh: bool,
    window: dict[str, int],
    frames: int,
    keep_fds: tuple[int, ...] = (),
) -> tuple[int, socket.socket]:
    """Fork the writer; returns its pid and the loop's end of the socketpair."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    parent = os.getpid()
    pid = os.fork()
    if pid:
        theirs.close()
        return pid, ours
    code = 1
    try:
        ours.close()
        die_with_parent(parent)
        # the daemon stops us (a "stop" message); its Ctrl-C and SIGTERM are its own
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _close_fds_except({0, 1, 2, theirs.fileno(), *keep_fds})
        writer = Writer(theirs, ring, directory, options, window, frames)
        try:
            writer.open(segment, offset, fresh)
        except OSError as exc:
            _send(theirs, ("o", f"{exc.strerror or exc} ({directory})"))
            return  # through finally: exit 1
        _send(theirs, ("o", None))
        writer.run()
        code = 0
    except BaseException as exc:  # a child must never return into the parent's code
        try:
            _send(theirs, ("l", "error", f"store: writer failed: {exc!r}"))
        except OSError:
            print(f"module-ingest store writer failed: {exc!r}", file=sys.stderr)
    finally:
        os._exit(code)


def _close_fds_except(keep: set[int]) -> None:
    """A forked child holds copies of every socket and file of the daemon (and of a test
    process); a copy of a client socket would keep the connection open after the daemon
    closes it."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            with contextlib.suppress(OSError):  # the listing's own fd, closed by now
                os.close(fd)


def _send(sock: socket.socket, message: tuple) -> None:
    sock.send(marshal.dumps(message))


class Writer:
    def __init__(
        self,
        sock: socket.socket,
        ring,
        directory: Path,
        options: WriterOptions,
        window: dict[str, int],
        frames: int,
    ) -> None:
        self.sock = sock
        self.ring = ring
        self.size = len(ring)
        self.directory = directory
        self.options = options
        self.window = dict(window)  # replay window as of the durable position
        self.frames = frames  # frames stored as of the durable position
        self.retention = Retention(
            directory,
            options.segment_bytes,
            quota_bytes=options.quota_bytes,
            min_free_bytes=options.min_free_bytes,
            retention_bytes=options.retention_bytes,
            retention_seconds=options.retention_seconds,
            overflow=options.overflow,
            log=self.log,
        )
        self.fd = -1
        self.segment = 0
        self.offset = DATA_START  # file offset of the next byte in the current segment
        self.marks: dict[str, int] = {}  # of the batch announced next
        self.since_checkpoint = 0
        self.checkpoint_at = time.monotonic()
        self.housekeeping_at = 0.0
        self.usage = (False, 0, 0)

    def log(self, level: str, text: str) -> None:
        _send(self.sock, ("l", level, text))

    # -- the message loop --------------------------------------------------------

    def open(self, segment: int, offset: int, fresh: bool) -> None:
        if fresh:
            self._start_segment(segment)
        else:
            self.fd = os.open(self.directory / segment_name(segment), os.O_RDWR)
            self._preallocate(self.fd)
            self.segment, self.offset = segment, offset
        self._write_checkpoint()
        self._housekeeping(force=True)

    def run(self) -> None:
        # a blocking recv that gives up after HOUSEKEEPING_INTERVAL: one system call per
        # message instead of a select and a recv
        seconds = int(HOUSEKEEPING_INTERVAL)
        micros = int((HOUSEKEEPING_INTERVAL - seconds) * 1e6)
        self.sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", seconds, micros)
        )
        while True:
            try:
                data = self.sock.recv(MESSAGE_MAX)
            except BlockingIOError:  # the timeout: nothing came
                self._housekeeping()
                continue
            if not data:
                return  # the daemon is gone
            message = marshal.loads(data)
            kind = message[0]
            if kind == "m":
                self.marks.update(message[1])
            elif kind == "c":
                self.marks.update(message[5])
                if not self._commit(*message[1:5]):
                    return
                self._housekeeping()
            elif kind == "s":
                self._housekeeping(force=True)  # a clean stop leaves retention done
                self._write_checkpoint()
                return

    def _commit(self, start: int, end: int, switches: tuple[int, ...], frames: int) -> bool:
        """Make ring[start:end) durable; False if told to stop while retrying."""
        started = time.monotonic()
        seg, off = self.segment, self.offset
        failed = False
        while True:
            try:
                rotated = self._write(start, end, switches)
                break
            except OSError as exc:
                # not durable, not acknowledged: keep the batch and write it again
                error = f"{exc.strerror or exc} ({self.directory})"
                _send(self.sock, ("e", error))
                if not failed:
                    self.log("error", f"store: commit failed: {error}; retrying until it succeeds")
                failed = True
                self._reopen(seg)
                self.segment, self.offset = seg, off
                self._housekeeping(force=True)
                if self._stop_requested(RETRY_DELAY):
                    return False
                _send(self.sock, ("r",))
        if failed:
            self.log("warning", "store: commits succeed again")
        for ident, seq in self.marks.items():
            if seq > self.window.get(ident, 0):
                self.window[ident] = seq
        self.marks = {}
        self.frames += frames
        self.since_checkpoint += end - start
        _send(self.sock, ("d", end, self.segment, self.offset, time.monotonic() - started))
        if rotated or self.since_checkpoint >= self.options.checkpoint_bytes:
            self._write_checkpoint()
        if rotated:
            self._update_usage()
        return True

    def _stop_requested(self, wait: float) -> bool:
        """Wait up to `wait` seconds; True if the daemon asked to stop (or is gone). Only
        "stop" can arrive while a commit is in flight."""
        ready, _, _ = select.select([self.sock], [], [], wait)
        if ready:
            self.sock.recv(MESSAGE_MAX)  # read, so that closing does not reset the daemon's end
        return bool(ready)

    # -- segments -----------------------------------------------------------------

    def _write(self, start: int, end: int, switches: tuple[int, ...]) -> bool:
        """Write ring[start:end) to the segments (a new one at each switch) and fdatasync."""
        rotated = False
        # a switch at `start` itself opens the new segment before the first part, once
        bounds = [start, *(s for s in switches if s != start), end]
        for a, b in itertools.pairwise(bounds):
            if a in switches:
                os.fdatasync(self.fd)  # the old segment is complete on flash before the next
                self._start_segment(self.segment + 1)
                rotated = True
            if b > a:
                self._pwrite(a, b)
                self.offset += b - a
        os.fdatasync(self.fd)
        return rotated

    def _pwrite(self, a: int, b: int) -> None:
        view = memoryview(self.ring)
        try:
            pos, off = a, self.offset
            while pos < b:
                at = pos % self.size
                n = min(b - pos, self.size - at)
                written = os.pwrite(self.fd, view[at : at + n], off)
                pos += written
                off += written
        finally:
            view.release()

    def _start_segment(self, number: int) -> None:
        path = self.directory / segment_name(number)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            self._preallocate(fd)
            os.pwrite(fd, encode_header(number, time.time_ns(), self.options.segment_bytes), 0)
            os.fdatasync(fd)
            fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
        if self.fd >= 0:
            os.close(self.fd)
        self.fd, self.segment, self.offset = fd, number, DATA_START

    def _preallocate(self, fd: int) -> None:
        # reserve the blocks now: a full disk shows up at rotation, never inside a commit
        if os.fstat(fd).st_size < self.options.segment_bytes:
            os.posix_fallocate(fd, 0, self.options.segment_bytes)

    def _reopen(self, number: int) -> None:
        """After a failure: a fresh descriptor of the segment the batch started in."""
        path = self.directory / segment_name(number)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if path.exists():
            self.fd = os.open(path, os.O_RDWR)

    # -- checkpoint, retention, quota -------------------------------------------------

    def _write_checkpoint(self) -> None:
        state = {
            "version": 1,
            "checkpoint": [self.segment, self.offset],
            "frames": self.frames,
            "last_seq": self.window,
        }
        try:
            meta.write(self.directory / meta.STORE_META, state)
        except OSError as exc:
            self.log("error", f"store: cannot write the checkpoint: {exc}")
            return
        self.since_checkpoint = 0
        self.checkpoint_at = time.monotonic()

    def _housekeeping(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.housekeeping_at < HOUSEKEEPING_INTERVAL:
            return
        self.housekeeping_at = now
        if self.since_checkpoint and now - self.checkpoint_at >= self.options.checkpoint_seconds:
            self._write_checkpoint()
        try:
            self.retention.retain(self.segment)
        except OSError as exc:
            self.log("error", f"store: retention: {exc}")
        self._update_usage()

    def _update_usage(self) -> None:
        try:
            self.retention.update_usage()
        except OSError as exc:
            self.log("error", f"store: usage: {exc}")
        r = self.retention
        usage = (r.full, r.bytes_on_disk, r.dropped_frames)
        if usage != self.usage:
            self.usage = usage
            _send(self.sock, ("u", *usage))
