"""The engine of scripts/fleet: one worker process's sensor cores on one epoll.

Each core is one identity on one connection and sends one DATA frame per send, on
a fixed schedule: core g of N has phase g/N of the period N/R, so the fleet sends R
frames/s, evenly spread. A worker's cores are kept in phase order, so its sends
form a sorted schedule (send s goes to core s % n in round s // n): no heap and no
timer per frame. The frames are built before the clock starts (they depend on the
session key and the seq); only a core that reconnected builds its next frames as
it sends them.

Timing: the send time of a frame is when its send(2) returned; its latency runs
to the moment the recv(2) that read the ACK covering it returned (ACKs are
cumulative per identity). The loop sleeps in select(2) on the epoll fd, which
takes a timeout in microseconds (epoll_wait(2) only in milliseconds), so it
wakes for an ACK at once and for the next send on time (at most once per TICK_S).
"""

from __future__ import annotations

import bisect
import errno
import json
import select
import socket
import struct
import time
import zlib
from array import array
from collections import Counter, deque
from collections.abc import Callable

from _loadlib import LoadError

from appliance.protocol import crypto
from appliance.protocol.client_session import ClientSession, ProtocolViolation
from appliance.protocol.decoder import FATAL, REJECT, FrameDecoder
from appliance.protocol.frames import HEADER, MAGIC, VERSION, FrameType

DOWN, HANDSHAKE, OPEN = "down", "handshake", "open"
RECV_BYTES = 4096
BURST = 64  # sends at most, before the loop reads ACKs again (when it is behind)
# A sleep and wake-up costs about 25 µs of CPU here (more than a send): the loop wakes
# for sends at most once per TICK_S, and sends what fell due together (an ACK wakes it
# at once). So a send is up to TICK_S behind its schedule, plus the wake-up's own delay.
TICK_S = 0.0005
# The head of every ACK (magic ... reserved: no flags, no channel, no payload); an exact
# 36-byte read with this head is one ACK, read without the general decoder.
ACK_HEAD = HEADER.pack(MAGIC, VERSION, FrameType.ACK, 0, 0, 0, 0, 0, 0)[:16]
ACK_SIZE = HEADER.size + 4
CRC = struct.Struct(">I")
# After a failed reconnect, as the client library does (appliance/client.py's
# RECONNECT_BACKOFF and its default timeout for a handshake; this script cannot import
# it: the client needs getmac). A core without WELCOME by then tries again: a daemon
# whose accept queue overflowed may have let the connection complete from this side
# only (SYN cookies), and MIP's server speaks first, so nothing else would notice.
RETRY_BACKOFF = (0.05, 2.0)
HANDSHAKE_TIMEOUT_S = 10.0
FD_SETSIZE = 1024
EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT


class Core:
    """One sensor core: its identity, connection and how far its stream got."""

    __slots__ = (
        "acked",
        "acked_at_loss",
        "backoff",
        "decoder",
        "fd",
        "ident",
        "nacked",
        "next_seq",
        "out",
        "out_sent",
        "partial",
        "pending",
        "prebuilt",
        "recv",
        "retry_at",
        "secret",
        "send",
        "session",
        "sock",
        "state",
        "t_challenge",
        "t_connect",
        "t_welcome",
        "times",
    )

    def __init__(self, ident: str, token: str) -> None:
        self.ident = ident
        self.secret = crypto.token_to_secret(token)
        self.state = DOWN
        self.sock: socket.socket | None = None
        self.session: ClientSession | None = None
        self.decoder: FrameDecoder | None = None
        self.partial = False  # the decoder holds part of a frame
        self.next_seq = 1  # the seq of the next frame this core sends
        self.acked = 0  # the highest seq ACKed (or durable by WELCOME's last_seq)
        self.acked_at_loss: int | None = None  # `acked` when the connection was first lost
        self.times: deque[float] = deque()  # send times of seqs acked + 1, acked + 2, ...
        self.nacked: set[int] = set()  # NACKed seqs above `acked`: resolved, never ACKed
        self.out = bytearray()  # bytes the socket did not take yet
        self.out_sent = 0  # bytes of `out` ever written
        self.pending: deque[tuple[int, float]] = deque()  # (end in out, scheduled) per frame
        self.prebuilt = False  # the worker's pre-built frames are this connection's
        self.t_connect = self.t_challenge = self.t_welcome = 0.0
        self.retry_at = 0.0
        self.backoff = RETRY_BACKOFF[0]

    def row(self) -> tuple:
        """What a restart check needs: identity, ACKed seq at the loss and at the end, the
        highest seq sent, and the monotonic times of the last connect(), its first byte
        (CHALLENGE) and its WELCOME."""
        seqs = (self.acked_at_loss, self.acked, self.next_seq - 1)
        return (self.ident, *seqs, self.t_connect, self.t_challenge, self.t_welcome)


class Fleet:
    """One worker's cores: set-up, the paced stream, the drain, a reconnect of them all."""

    def __init__(self, cores: list[Core], phases: list[float], opts: dict) -> None:
        # select() watches the epoll fd, so it must be below FD_SETSIZE: make it first
        self.ep = select.epoll()
        if self.ep.fileno() >= FD_SETSIZE:
            raise LoadError(f"epoll fd {self.ep.fileno()} is not below {FD_SETSIZE}")
        self.cores = cores
        self.address = opts["address"]
        self.mac = opts["mac"]
        self.fingerprints = opts["fingerprints"]
        self.channel = opts["channel"]
        self.payload = opts["payload"]
        self.period = opts["period"]
        self.offsets = [phase * self.period for phase in phases]  # sorted
        self.by_fd: dict[int, Core] = {}
        self.frames: list[bytes] = []
        self.strict = True  # set-up: a failed handshake ends the run; later: retry
        self.open = 0
        self.welcomed = 0
        self.handshaking = 0
        self.retrying: list[Core] = []
        self.connecting: deque[tuple[float, Core]] = deque()  # (connect time, core), in order
        self.stop = False
        self.until = 0.0
        self.after = 0.0  # a reconnect: how long to stream once every core is back
        self.on_welcomed: Callable[[float], None] | None = None
        self.all_welcomed_at = 0.0
        # the schedule: next send s, its core m = s % n, the start of its round
        self.s = self.m = 0
        self.t0 = self.round_t = 0.0
        # figures
        self.latencies = array("d")  # one per ACKed frame
        self.lags = array("d")  # one per frame sent: send time - scheduled time
        self.sent = 0
        self.skipped = 0  # scheduled while the core was not connected
        self.blocked = 0  # waited for room in the socket's send buffer
        self.nacks: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.losses: Counter[str] = Counter()
        self.retries: Counter[str] = Counter()
        self.resent = 0
        self.durable_by_welcome = 0  # unACKed frames that WELCOME's last_seq showed stored
        self.welcome_behind = 0  # cores whose WELCOME last_seq is below a seq ACKed before

    # -- connections ---------------------------------------------------------------

    def connect(self, core: Core, now: float) -> None:
        family = socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(self.address)  # a refusal shows up at the first recv
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self.handshaking += 1  # as _failed counts it down
            self._failed(core, os_reason(err), connected=False)
            return
        core.sock, core.fd = sock, sock.fileno()
        core.send, core.recv = sock.send, sock.recv
        fingerprint = f"fp:{core.ident}" if self.fingerprints else ""
        core.session = ClientSession(
            core.ident, core.secret, crypto.random_nonce(), fingerprint=fingerprint, mac=self.mac
        )
        core.state = HANDSHAKE
        core.t_connect, core.t_challenge = now, 0.0
        self.by_fd[core.fd] = core
        self.ep.register(core.fd, EPOLLIN)
        self.handshaking += 1
        if not self.strict:
            self.connecting.append((now, core))

    def set_up(self, parallel: int, timeout: float) -> None:
        """Connect and authenticate every core, `parallel` at a time (so the listen backlog
        never overflows); LoadError on the first failure."""
        waiting = deque(self.cores)
        deadline = time.monotonic() + timeout
        while self.welcomed < len(self.cores):
            now = time.monotonic()
            while waiting and self.handshaking < parallel:
                self.connect(waiting.popleft(), now)
            if now > deadline:
                raise LoadError(
                    f"handshakes timed out after {timeout:.0f} s "
                    f"({self.welcomed} of {len(self.cores)} done)"
                )
            for fd, _ in self.ep.poll(min(deadline - now, 1.0)):
                self._on_handshake(self.by_fd[fd])
        self.strict = False

    def _read(self, core: Core, failed: Callable[[Core, str], None]) -> bytes | None:
        """What arrived for `core` (b"" at EOF); None if nothing did, or if the connection
        failed (then told to `failed`)."""
        try:
            return core.recv(RECV_BYTES)
        except BlockingIOError:
            return None
        except OSError as exc:
            failed(core, os_reason(exc.errno))
            return None

    def _on_handshake(self, core: Core) -> None:
        data = self._read(core, self._failed)
        if data is None:
            return
        now = time.monotonic()
        if not data:
            self._failed(core, "closed by the server")
            return
        core.t_challenge = core.t_challenge or now  # the first bytes: CHALLENGE
        try:
            events = core.session.receive_data(data)
        except ProtocolViolation as exc:
            self._failed(core, f"protocol violation: {exc}")
            return
        out = core.session.data_to_send()
        if out and core.send(out) != len(out):  # a HELLO of ~300 bytes on a fresh socket
            self._failed(core, "HELLO not sent in one write")
            return
        for ev in events:
            if ev[0] == FrameType.ERROR:
                self._failed(core, f"ERROR {ev[1]}")
                return
            if ev[0] == FrameType.WELCOME:
                self._on_welcome(core, ev[1], ev[2], now)

    def _on_welcome(self, core: Core, last_seq: int, channels: list, now: float) -> None:
        if self.channel not in channels:
            raise LoadError(f"{core.ident} may not write channel {self.channel} ({channels})")
        self.handshaking -= 1
        self.welcomed += 1
        self.open += 1
        core.state = OPEN
        core.t_welcome = now
        core.backoff = RETRY_BACKOFF[0]
        core.decoder = FrameDecoder()
        core.partial = False
        if core.acked_at_loss is None:  # the first connection
            core.acked = last_seq
            core.next_seq = last_seq + 1
        else:
            self._resume(core, last_seq, now)
        if self.welcomed == len(self.cores) and self.on_welcomed is not None:
            self.all_welcomed_at = now
            self.until = min(self.until, now + self.after)
            self.on_welcomed(now)
            self.on_welcomed = None  # once

    def _resume(self, core: Core, last_seq: int, now: float) -> None:
        """After a reconnect: what WELCOME says is stored counts as durable; the rest is
        sent again with the same seqs (as the client library does), under the new MAC."""
        if last_seq < core.acked:
            self.welcome_behind += 1
        if last_seq >= core.next_seq:  # more than was ever sent: take the daemon's word
            core.next_seq = last_seq + 1
        if last_seq > core.acked:
            self.durable_by_welcome += (
                last_seq - core.acked - sum(1 for s in core.nacked if s <= last_seq)
            )
            core.acked = last_seq
        core.nacked = {s for s in core.nacked if s > core.acked}
        core.times = deque()
        for seq in range(core.acked + 1, core.next_seq):
            if seq in core.nacked:  # used up, never sent again: keeps `times` in seq order
                self._write(core, b"", None)
            else:
                self._write(core, self.encode(core, seq), None)
                self.resent += 1
            if core.state is not OPEN:
                return

    def _expire(self, now: float) -> None:
        """Give up on the handshakes older than HANDSHAKE_TIMEOUT_S (they retry)."""
        connecting = self.connecting
        while connecting and connecting[0][0] <= now - HANDSHAKE_TIMEOUT_S:
            started, core = connecting.popleft()
            if core.state is HANDSHAKE and core.t_connect == started:
                why = "WELCOME" if core.t_challenge else "CHALLENGE"
                self._failed(core, f"no {why} within {HANDSHAKE_TIMEOUT_S:.0f} s")

    def _failed(self, core: Core, reason: str, connected: bool = True) -> None:
        """A connection attempt failed: fatal during set-up, else retried after a pause."""
        if self.strict:
            raise LoadError(f"handshake failed for {core.ident}: {reason}")
        if connected:
            self._close(core)
        self.handshaking -= 1
        self.retries[reason] += 1
        core.retry_at = time.monotonic() + core.backoff
        core.backoff = min(2 * core.backoff, RETRY_BACKOFF[1])
        self.retrying.append(core)

    def _close(self, core: Core) -> None:
        del self.by_fd[core.fd]
        core.sock.close()  # also leaves the epoll set
        core.sock = core.session = core.decoder = None
        core.state = DOWN
        core.out.clear()
        core.pending.clear()
        core.prebuilt = False

    def _lost(self, core: Core, reason: str) -> None:
        if core.state is not OPEN:
            return
        if core.acked_at_loss is None:
            core.acked_at_loss = core.acked
        self.losses[reason] += 1
        self.open -= 1
        self.welcomed -= 1
        self._close(core)
        if not self.open:
            self.stop = True  # the daemon is gone

    def reconnect_all(
        self, after: float, timeout: float, on_welcomed: Callable[[float], None]
    ) -> None:
        """Connect every core at once, as a fleet does after the appliance restarts; then
        stream (resends first) until `after` s past the last WELCOME, `timeout` at most.
        `on_welcomed(time)` is called once every core has its WELCOME again."""
        now = time.monotonic()
        self.after = after
        self.on_welcomed = on_welcomed
        self.until = now + timeout
        self.stop = False
        self.latencies = array("d")  # the figures after the restart, apart from before
        self.lags = array("d")
        for core in self.cores:
            self.connect(core, time.monotonic())
        self._skip_to(time.monotonic())
        self.run()

    def _skip_to(self, now: float) -> None:
        """Move the schedule to the first send due at or after `now`."""
        n = len(self.cores)
        rounds, into = divmod(now - self.t0, self.period)
        s = int(rounds) * n + bisect.bisect_left(self.offsets, into)
        self.skipped += max(0, s - self.s)
        self.s, self.m = s, s % n
        self.round_t = self.t0 + (s // n) * self.period

    # -- frames ------------------------------------------------------------------------

    def encode(self, core: Core, seq: int) -> bytes:
        return core.session.encode(
            FrameType.DATA, seq, self.payload, channel=self.channel, ts_ns=time.time_ns()
        )

    def prebuild(self, rounds: int) -> None:
        """Every core's next `rounds` frames, in send order."""
        n = len(self.cores)
        frames: list[bytes] = [b""] * (rounds * n)
        for m, core in enumerate(self.cores):
            for k in range(rounds):
                frames[k * n + m] = self.encode(core, core.next_seq + k)
            core.prebuilt = True
        self.frames = frames

    # -- the stream --------------------------------------------------------------------

    def start(self, t0: float, until: float) -> None:
        self.s = self.m = 0
        self.t0 = self.round_t = t0
        self.until = until
        self.run()

    def run(self) -> None:
        """Send on schedule and read ACKs until `self.until` or `self.stop`."""
        cores, offsets, frames = self.cores, self.offsets, self.frames
        n, period, built = len(cores), self.period, len(self.frames)
        by_fd, poll, wait_on = self.by_fd, self.ep.poll, [self.ep.fileno()]
        mono, sleep = time.monotonic, select.select
        lags = self.lags.append
        s, m, round_t = self.s, self.m, self.round_t
        next_t = round_t + offsets[m]
        while not self.stop:
            now = mono()
            if now >= self.until:
                break
            burst = BURST
            while next_t <= now and burst:
                burst -= 1
                core = cores[m]
                if core.state is OPEN:
                    seq = core.next_seq
                    frame = frames[s] if core.prebuilt and s < built else self.encode(core, seq)
                    if core.out:
                        k = 0
                    else:
                        try:
                            k = core.send(frame)
                        except BlockingIOError:
                            k = 0
                        except OSError as exc:
                            self._lost(core, os_reason(exc.errno))
                            k = -1
                    if k == len(frame):
                        t = mono()
                        core.times.append(t)
                        lags(t - next_t)
                        self.sent += 1
                        core.next_seq = seq + 1
                    elif k >= 0:
                        self._queue(core, frame, k, next_t)
                        core.next_seq = seq + 1
                else:
                    self.skipped += 1
                s += 1
                m += 1
                if m == n:
                    m = 0
                    round_t += period
                next_t = round_t + offsets[m]
            if self.connecting:
                self._expire(now)
            if self.retrying:
                self._retry(now)
            # wake for the next send, but not sooner than TICK_S after this wake-up
            wait = max(next_t, now + TICK_S) - mono() if next_t > now else 0.0
            if wait > 0:
                sleep(wait_on, (), (), min(wait, self.until - now))
            for fd, ev in poll(0):
                core = by_fd.get(fd)
                if core is None:
                    continue  # closed earlier in this batch
                if core.state is not OPEN:
                    self._on_handshake(core)
                    continue
                if ev & EPOLLOUT:
                    self._flush(core)
                if ev & ~EPOLLOUT and core.state is OPEN:
                    self._on_readable(core)
        self.s, self.m, self.round_t = s, m, round_t

    def _on_readable(self, core: Core) -> None:
        data = self._read(core, self._lost)
        if data is None:
            return
        t = time.monotonic()
        if (
            len(data) == ACK_SIZE
            and data[:16] == ACK_HEAD
            and not core.partial
            and zlib.crc32(data[:32]) == CRC.unpack_from(data, 32)[0]
        ):
            self._on_ack(core, int.from_bytes(data[16:24], "big"), t)
        elif data:
            self._on_frames(core, data, t)
        else:
            self._lost(core, "closed by the server")

    def _on_ack(self, core: Core, seq: int, t: float) -> None:
        gap = min(seq, core.next_seq - 1 - len(core.pending)) - core.acked
        if gap <= 0:
            return
        times = core.times
        record = self.latencies.append
        if core.nacked:  # a NACKed seq is resolved, never ACKed: no latency for it
            for seq_k in range(core.acked + 1, core.acked + gap + 1):
                sent = times.popleft()
                if seq_k in core.nacked:
                    core.nacked.discard(seq_k)
                else:
                    record(t - sent)
        else:
            for _ in range(gap):
                record(t - times.popleft())
        core.acked += gap

    def _on_frames(self, core: Core, data: bytes, t: float) -> None:
        """Anything but one whole ACK: the general decoder."""
        for item in core.decoder.feed(data):
            kind = item[0]
            if kind == FrameType.ACK:
                self._on_ack(core, item[2], t)
            elif kind == FrameType.NACK:
                self.nacks[_code(item[4])] += 1
                if item[2] > core.acked:
                    core.nacked.add(item[2])
            elif kind == FrameType.ERROR:
                self.errors[_code(item[4])] += 1
                self._lost(core, f"ERROR {_code(item[4])}")
                return
            elif kind in (REJECT, FATAL):
                self.errors[f"bad frame from the server: {item[1]}"] += 1
                self._lost(core, "protocol violation")
                return
        core.partial = core.decoder.buffered() > 0

    def _write(self, core: Core, frame: bytes, scheduled: float | None) -> None:
        """Send one frame outside the schedule (a resend; b"" for a seq used up), queueing
        what the socket does not take."""
        if core.out:
            self._queue(core, frame, 0, scheduled)
            return
        try:
            k = core.send(frame) if frame else 0
        except BlockingIOError:
            k = 0
        except OSError as exc:
            self._lost(core, os_reason(exc.errno))
            return
        if k == len(frame):
            core.times.append(time.monotonic())
        else:
            self._queue(core, frame, k, scheduled)

    def _queue(self, core: Core, frame: bytes, written: int, scheduled: float | None) -> None:
        """The socket's send buffer is full: keep the rest (behind what waits already) and
        wait until it is writable. `scheduled` is None for a frame outside the schedule."""
        if not core.out:
            self.ep.modify(core.fd, EPOLLIN | EPOLLOUT)
        core.out += memoryview(frame)[written:]
        core.pending.append((core.out_sent + len(core.out), scheduled))
        self.blocked += 1

    def _flush(self, core: Core) -> None:
        try:
            k = core.send(core.out)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(core, os_reason(exc.errno))
            return
        t = time.monotonic()
        del core.out[:k]
        core.out_sent += k
        while core.pending and core.pending[0][0] <= core.out_sent:
            core.times.append(t)
            scheduled = core.pending.popleft()[1]
            if scheduled is not None:
                self.lags.append(t - scheduled)
                self.sent += 1
        if not core.out:
            self.ep.modify(core.fd, EPOLLIN)

    def _retry(self, now: float) -> None:
        due = [c for c in self.retrying if c.retry_at <= now]
        if due:
            self.retrying = [c for c in self.retrying if c.retry_at > now]
            for core in due:
                self.connect(core, now)

    def drain(self, until: float) -> None:
        """Read the outstanding ACKs, sending nothing, until every frame sent is resolved."""
        by_fd = self.by_fd
        while time.monotonic() < until and not self.all_resolved():
            for fd, ev in self.ep.poll(0.05):
                core = by_fd.get(fd)
                if core is not None and core.state is OPEN:
                    if ev & EPOLLOUT:
                        self._flush(core)
                    if ev & ~EPOLLOUT:
                        self._on_readable(core)

    def all_resolved(self) -> bool:
        return all(
            c.state is not OPEN or c.acked + len(c.nacked) >= c.next_seq - 1 for c in self.cores
        )

    def unacked(self) -> int:
        """Frames sent but neither ACKed nor NACKed."""
        return sum(max(0, c.next_seq - 1 - c.acked - len(c.nacked)) for c in self.cores)


def _code(payload: bytes) -> str:
    try:
        return str(json.loads(payload).get("code"))
    except (ValueError, AttributeError):
        return "?"


def os_reason(err: int | None) -> str:
    return errno.errorcode.get(err or 0, str(err))
