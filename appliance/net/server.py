"""The loop: one thread, one epoll, every socket; it accepts cores, runs their
sessions, appends DATA to the store's ring and sends the ACKs.

It never waits on the disk: the store's writer process does the fdatasync,
and its reply (on a socket in this same epoll) makes the loop acknowledge the
newly durable frames, written straight to each socket. Whatever arrives while
a commit runs goes into the next one. When the ring has no room for another
read, or a peer does not read its ACKs (`send_buffer_limit`), the loop stops
reading those sockets, so the kernel's TCP window pushes back on the senders
instead of memory growing here.

Timeouts live in a heap keyed by deadline, so the loop only ever looks at the
connections whose deadline has come, never at all of them; the idle timeout
is checked lazily (a read only stores the time, the timer re-arms itself).
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import logging
import os
import select
import signal
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable
from types import MappingProxyType

from appliance.auth.handshake import authenticate
from appliance.auth.registry import Registry, RegistryError
from appliance.config import Config
from appliance.net import sockets
from appliance.net.admission import Admission
from appliance.net.connection import LINGER, READING, Connection, Pause, Phase
from appliance.net.snapshot import Identities, Peer, Snapshot, StoreFigures
from appliance.protocol import crypto
from appliance.protocol.frames import ErrorCode, encode_ack
from appliance.protocol.session import BYE, CLOSED, DATA, HELLO, ServerSession
from appliance.store.ring import RESERVE as RING_RESERVE
from appliance.store.segment import encode_frame_record
from appliance.store.wal import Store, StoreError
from appliance.telemetry.throttle import Throttled

log = logging.getLogger("appliance.net")

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLL_FAIL = select.EPOLLERR | select.EPOLLHUP
TICK = 0.25  # registry changes, extension hooks and accept retries are looked at this often
STOP_GRACE = 1.5  # on SIGTERM: time allowed to commit and ACK before closing anyway
MAX_EVENTS = 64  # connections per poll: a burst of reads is cut into short iterations
ACCEPT_BATCH = 256  # connections accepted per iteration at most
MAKE_ROOM_TRIES = 8  # handshakes looked at per accept when the slots are full
# failed handshakes and connections closed before they authenticated: a peer decides how
# many there are, so they are logged at most once a second, with a count
UNPROVEN_LOG_EVERY = 1.0
LOG_IDENT_MAX = 64  # identities in log lines are cut to this many characters

_LISTENER = object()  # epoll registry tags for what is not a connection
_WAKE = object()
_STORE = object()


def printable_ident(ident: object) -> str:
    """An identity as it may appear in a log line: a peer chose it, so it is cut short
    and shown with repr's escapes."""
    text = repr(ident)
    return text if len(text) <= LOG_IDENT_MAX else text[: LOG_IDENT_MAX - 3] + "..."


class Server:
    def __init__(self, config: Config, registry: Registry, store: Store) -> None:
        self.config = config
        self.registry = registry
        self.store = store
        srv = config.server
        self.max_payload = srv["max_payload"]
        self.handshake_timeout = srv["handshake_timeout"]
        self.idle_timeout = srv["idle_timeout"]
        self.recv_bytes = srv["recv_bytes"]
        self.send_limit = srv["send_buffer_limit"]
        self.max_connections = srv["max_connections"]
        self.admission = Admission(srv["max_handshakes"], srv["max_handshakes_per_source"])
        # pending ring bytes beyond which the loop stops reading (the ring's share of
        # Store.space; a batch larger than commit_max_bytes stops reading earlier)
        self.pause_bytes = store.ring_bytes - RING_RESERVE - self.recv_bytes
        self.tofu = config.auth["trust_on_first_use"]
        # Two levels: the loop waits on `epoll` (every connection, and `control`); the
        # fds on `control` (the store's writer, listeners, the wake-up pipe, the stats
        # socket and console) are served first in every iteration, so ACKs, accepts and
        # diagnostics never queue behind thousands of busy sockets.
        self.epoll = select.epoll()
        self.control = select.epoll()
        self.epoll.register(self.control.fileno(), EPOLLIN)
        self.conns: dict[int, Connection] = {}
        self.by_identity: dict[str, Connection] = {}
        self.accepted: dict[str, int] = dict(store.last_seq)  # replay window: highest stored seq
        self.durable: dict[str, int] = dict(store.last_seq)  # highest durable (ACKed) seq
        # insertion-ordered sets: paused sockets resume oldest first, so none starves
        self.paused: dict[Connection, None] = {}
        self.commit_waiting: dict[Connection, None] = {}  # WELCOMING and DRAINING
        self.listeners: list[tuple[socket.socket, ssl.SSLContext | None]] = []
        # frames, bytes_in, replays, connections, nack.CODE, error.CODE (read by telemetry)
        self.counters: Counter[str] = Counter()
        self.frames_by_identity: Counter[str] = Counter()
        self.started = time.monotonic()
        self.now = self.started  # the loop's clock, read once per iteration
        # extension points for telemetry, the console and the watchdog: they run in this loop
        self.sweep_hooks: list[Callable[[float], None]] = []
        self.stop_hooks: list[Callable[[], None]] = []
        self.stopping = False
        self.exit_code = 0
        self._tags: dict[int, object] = {}  # fd -> listener / wake / store / watched callback
        self._timers: list[tuple[float, int, int]] = []  # (deadline, serial, fd)
        self._serial = 0
        self._accepting = False
        self._signals = False
        self._log_unproven = Throttled(log, UNPROVEN_LOG_EVERY)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- set-up ---------------------------------------------------------------

    def bind(self) -> list[tuple[str, int]]:
        """Open the listeners; returns their bound addresses."""
        srv = self.config.server
        self.listeners.append((sockets.listen(self.config.listen, srv["backlog"]), None))
        tls = self.config.tls
        if tls["enabled"]:
            ctx = sockets.server_tls_context(tls["cert"], tls["key"])
            self.listeners.append((sockets.listen(self.config.tls_listen, srv["backlog"]), ctx))
        self._register(self._wake_r, EPOLLIN, _WAKE)
        self._register(self.store.fileno(), EPOLLIN, _STORE)
        self._set_accepting(True)
        return [lsock.getsockname()[:2] for lsock, _ in self.listeners]

    def _register(self, fd: int, mask: int, tag: object) -> None:
        self.control.register(fd, mask)
        self._tags[fd] = tag

    def _unregister(self, fd: int) -> None:
        self.control.unregister(fd)
        del self._tags[fd]

    def _set_accepting(self, on: bool) -> None:
        if on == self._accepting:
            return
        self._accepting = on
        for lsock, ctx in self.listeners:
            if on:
                self._register(lsock.fileno(), EPOLLIN, (_LISTENER, lsock, ctx))
            else:
                self._unregister(lsock.fileno())

    # -- the loop ---------------------------------------------------------------

    def handle_signals(self) -> None:
        """From now on SIGTERM and SIGINT stop the loop gracefully (call before saying
        that the daemon listens: a stop request may come right after)."""
        if self._signals:
            return
        self._signals = True
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def run(self) -> int:
        """Serve until SIGTERM / SIGINT; the exit code."""
        self.handle_signals()
        poll = self.epoll.poll
        poll_control = self.control.poll
        conns = self.conns
        tags = self._tags
        store = self.store
        timers = self._timers
        monotonic = time.monotonic
        next_tick = monotonic() + TICK
        stop_deadline = None
        while True:
            timeout = next_tick - self.now
            if timers and timers[0][0] - self.now < timeout:
                timeout = timers[0][0] - self.now
            due = store.commit_due()
            if due is not None and due - self.now < timeout:
                timeout = due - self.now
            events = poll(max(timeout, 0.0), MAX_EVENTS)
            self.now = now = monotonic()
            for fd, mask in poll_control(0):
                self._on_control(tags.get(fd), mask)
            for fd, mask in events:
                conn = conns.get(fd)
                if conn is None:
                    continue  # the control epoll, or a connection closed meanwhile
                try:
                    if mask & EPOLLOUT:
                        self._on_writable(conn)
                    if mask & (EPOLLIN | EPOLL_FAIL) and conn.phase is not Phase.CLOSED:
                        self._on_readable(conn, mask)
                except Exception:
                    # a bug must cost one connection, not every core's
                    log.exception(
                        "conn %s (%s): internal error; closing",
                        conn.addr,
                        printable_ident(conn.identity),
                    )
                    self._close(conn)
            store.submit(now)
            while timers and timers[0][0] <= now:
                self._on_timer(heapq.heappop(timers))
            if self.stopping:
                if stop_deadline is None:  # the signal came in during this iteration
                    stop_deadline = self._begin_stop()
                # a failing disk will not take the rest: what it did not make durable
                # stays unacknowledged, and the stop does not wait for it
                if (
                    (store.pending_bytes() == 0 and not self.commit_waiting)
                    or store.commit_error is not None
                    or self.exit_code
                ):
                    self._finish_stop()
                    return self.exit_code
                if now > stop_deadline:
                    log.warning("stop: commit still running after %.1f s; closing", STOP_GRACE)
                    self._finish_stop()
                    return self.exit_code
            if now >= next_tick:
                self._tick(now)
                next_tick = now + TICK

    def _on_signal(self, signum, frame) -> None:
        self.stopping = True

    def _on_control(self, tag: object, mask: int) -> None:
        if tag is _STORE:
            self._on_store()
        elif tag is _WAKE:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wake_r, 4096):
                    pass
        elif type(tag) is tuple:
            self._accept(tag[1], tag[2])
        elif tag is not None:  # a watched file: stats socket, console
            selector_mask = (1 if mask & (EPOLLIN | EPOLL_FAIL) else 0) | (
                2 if mask & EPOLLOUT else 0
            )
            self._run_hooks((tag,), selector_mask)

    # -- for the extensions (all called on the loop thread) ---------------------

    def _run_hooks(self, hooks, *args) -> None:
        """Run extension callbacks; a failing one is logged, never stops the loop."""
        for hook in hooks:
            try:
                hook(*args)
            except Exception:
                log.exception("extension %r failed", hook)

    def watch(self, fileobj, events: int, callback: Callable[[int], None]) -> None:
        """Run `callback(mask)` in the loop when `fileobj` is ready (selectors' masks)."""
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        mask = (EPOLLIN if events & 1 else 0) | (EPOLLOUT if events & 2 else 0)
        self._register(fd, mask, callback)

    def unwatch(self, fileobj) -> None:
        self._unregister(fileobj if isinstance(fileobj, int) else fileobj.fileno())

    def disconnect(self, ident: str) -> bool:
        """Close an identity's connection at once (the console's kick); False if none."""
        conn = self.by_identity.get(ident)
        if conn is None:
            return False
        self._close(conn)
        return True

    def refresh_identities(self) -> None:
        """Apply registry changes now (revocations close their connections)."""
        self._reload_registry()

    def snapshot(self, *, identities: bool = False) -> Snapshot:
        """The loop's figures, frozen; with `identities`, one row per identity too."""
        now = time.monotonic()
        rows = None
        if identities:
            stored = MappingProxyType(dict(self.frames_by_identity))
            rows = Identities(stored, frozenset(self.by_identity))
        return Snapshot(
            uptime_seconds=now - self.started,
            counters=MappingProxyType(Counter(self.counters)),  # a missing key reads 0
            connections=len(self.conns),
            authenticated=len(self.by_identity),
            paused=len(self.paused),
            pause_bytes=self.pause_bytes,
            stopping=self.stopping,
            store=StoreFigures.of(self.store, now),
            identities=rows,
        )

    def clients(self) -> list[Peer]:
        """Every connection: its identity (None before HELLO), address and MAC algorithm."""
        return [
            Peer(conn.identity, conn.addr, conn.session.mac_algorithm)
            for conn in self.conns.values()
        ]

    def close(self) -> None:
        """Let go of the loop's own descriptors: the end of run(), or a server never run."""
        self.control.close()
        self.epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _begin_stop(self) -> float:
        log.info("stop: no longer accepting; committing and acknowledging")
        self._set_accepting(False)
        for lsock, _ in self.listeners:
            lsock.close()
        for conn in list(self.conns.values()):
            self._pause(conn, Pause.STOPPING)
        return time.monotonic() + STOP_GRACE

    def _finish_stop(self) -> None:
        with contextlib.suppress(StoreError):
            self._on_store()
        self._run_hooks(self.stop_hooks)
        for conn in list(self.conns.values()):
            with contextlib.suppress(OSError):
                conn.write(b"")
            self._close(conn)
        self.store.close()
        self.close()
        log.info("stop: done")

    # -- acknowledgements -------------------------------------------------------

    def _on_store(self) -> None:
        """The writer made batches durable (or has news): ACK, answer the waiting."""
        try:
            batches = self.store.completed()
        except StoreError as exc:
            if not self.exit_code:
                log.error("store: %s; stopping", exc)
            self.exit_code = 1
            self.stopping = True
            return
        durable = self.durable
        by_identity = self.by_identity
        for marks in batches:
            for ident, seq in marks.items():
                durable[ident] = seq
                conn = by_identity.get(ident)
                # not before WELCOME (it carries last_seq), not after ERROR or BYE
                if conn is None or conn.phase is not Phase.OPEN:
                    continue
                ack = encode_ack(seq)
                if conn.out or conn.tls:
                    self._send(conn, ack)
                    continue
                try:  # the common case: straight to the socket
                    sent = conn.sock.send(ack)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    self._close(conn)
                    continue
                if sent < len(ack):
                    self._send(conn, ack[sent:])
        if self.commit_waiting:
            for conn in list(self.commit_waiting):
                if self._committed(conn.identity):
                    del self.commit_waiting[conn]
                    if conn.phase is Phase.WELCOMING:
                        self._welcome(conn)
                    else:
                        self._final_ack(conn)
        self._resume_store_paused()

    def _resume_store_paused(self) -> None:
        """Read again from sockets paused for the store once the ring has room. A core
        refused with BUSY is read again at most once per commit or tick while the store
        stays full."""
        if not self.paused or self.stopping:
            return
        store = self.store
        # while commits fail, read anyway: the frames get BUSY instead of waiting unanswered
        if store.space() < self.recv_bytes and store.commit_error is None:
            return
        for conn in list(self.paused):
            if Pause.STORE in conn.pauses:
                self._resume(conn, Pause.STORE)

    def _committed(self, ident: str) -> bool:
        """Whether every frame accepted for `ident` is durable."""
        return self.durable.get(ident, 0) >= self.accepted.get(ident, 0)

    # -- accept -----------------------------------------------------------------

    def _accept(self, lsock: socket.socket, ctx: ssl.SSLContext | None) -> None:
        # bounded, so that a connect storm cannot starve established cores, yet large: a
        # herd of reconnecting cores (after a restart) must not overflow the listen queue
        admission = self.admission
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = lsock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("accept: %s; pausing accept until the next tick", exc.strerror)
                    self._set_accepting(False)
                return
            try:
                sockets.tune(sock, keepalive=self.config.server["keepalive"])
                if ctx is not None:
                    sock = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            except (OSError, ssl.SSLError):
                sock.close()
                continue
            session = ServerSession(
                crypto.random_nonce(),
                server_name=self.config.server["name"],
                max_payload=self.max_payload,
                idle_timeout=self.idle_timeout,
                counters=self.counters,
            )
            # room before the newcomer counts; without it, this one is let in (one over the
            # limits at most) and the next ones wait in the listen queue for a moment
            room = self._make_room()
            self._serial += 1
            conn = Connection(
                sock,
                addr,
                session,
                self._serial,
                self.now,
                self.now + self.handshake_timeout,
                Phase.TLS if ctx is not None else Phase.HANDSHAKE,
            )
            self.conns[conn.fd] = conn
            self.counters["connections"] += 1
            crowded = admission.admit(conn)
            if crowded is not None:
                self._evict(crowded)
            self._arm(conn)
            if conn.phase is Phase.TLS:
                self._tls_handshake(conn)
            else:
                self._flush_session(conn)
                self._update(conn)
            if not room:
                self._set_accepting(False)
                return

    def _make_room(self) -> bool:
        """Whether one more connection may be accepted, after pushing out an unproven one
        that had its grace if need be (admission.py). A handshake whose HELLO is waiting in
        its socket is served instead of pushed out."""
        admission = self.admission
        for _ in range(MAKE_ROOM_TRIES):
            if len(self.conns) < self.max_connections and not admission.full():
                return True
            victim = admission.evictable(self.now)
            if victim is None:
                return False
            if sockets.pending_input(victim.sock):
                self._on_readable(victim, EPOLLIN)
                if victim.phase not in (Phase.TLS, Phase.HANDSHAKE):
                    continue  # it was a HELLO (or garbage): its slot is free either way
            self._evict(victim)
        return False

    def _resume_accepting(self) -> None:
        """Accept again once there is room (or a handshake old enough to push out)."""
        if self._accepting or self.stopping:
            return
        admission = self.admission
        room = len(self.conns) < self.max_connections and not admission.full()
        if room or admission.evictable(self.now) is not None:
            self._set_accepting(True)

    def _tls_handshake(self, conn: Connection) -> None:
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._set_events(conn, EPOLLIN)
            return
        except ssl.SSLWantWriteError:
            self._set_events(conn, EPOLLOUT)
            return
        except (ssl.SSLError, OSError) as exc:
            log.info("tls: handshake with %s failed: %s", conn.addr, exc)
            self._close(conn)
            return
        conn.move(Phase.HANDSHAKE)
        self._flush_session(conn)
        self._update(conn)

    # -- I/O --------------------------------------------------------------------

    def _set_events(self, conn: Connection, events: int) -> None:
        if events == conn.events:
            return
        if conn.events == 0:
            self.epoll.register(conn.fd, events)
        elif events == 0:
            self.epoll.unregister(conn.fd)
        else:
            self.epoll.modify(conn.fd, events)
        conn.events = events

    def _update(self, conn: Connection) -> None:
        """Register the interest the connection's phase, pauses and output call for."""
        if conn.phase is Phase.TLS:
            return  # the TLS handshake decides
        events = EPOLLIN if conn.reading() else 0
        if conn.out and not conn.shut:
            events |= EPOLLOUT
        if events != conn.events:
            self._set_events(conn, events)

    def _send(self, conn: Connection, data: bytes | bytearray) -> None:
        """Write to the peer now; what the socket does not take waits for EPOLLOUT."""
        try:
            conn.write(data)
        except OSError:
            self._close(conn)
            return
        if conn.out:
            if len(conn.out) > self.send_limit:
                self._pause(conn, Pause.SEND)  # the peer does not read: stop reading it
            else:
                self._update(conn)
        elif conn.phase is Phase.CLOSING and not conn.shut:
            conn.shutdown_write()  # after the ERROR or the final ACK, not before

    def _flush_session(self, conn: Connection) -> None:
        out = conn.session.data_to_send()
        if out:
            self._send(conn, out)

    def _pause(self, conn: Connection, reason: Pause) -> None:
        conn.pauses |= {reason}
        self.paused[conn] = None
        self._update(conn)

    def _resume(self, conn: Connection, reason: Pause) -> None:
        conn.pauses -= {reason}
        if not conn.pauses:
            self.paused.pop(conn, None)
        self._update(conn)

    def _on_writable(self, conn: Connection) -> None:
        if conn.phase is Phase.TLS:
            self._tls_handshake(conn)
            return
        self._send(conn, b"")
        if conn.phase is Phase.CLOSED:
            return
        if Pause.SEND in conn.pauses and len(conn.out) <= self.send_limit // 2:
            self._resume(conn, Pause.SEND)
        else:
            self._update(conn)

    def _on_readable(self, conn: Connection, mask: int) -> None:
        phase = conn.phase
        if phase is Phase.TLS:
            self._tls_handshake(conn)
            return
        if conn.pauses or phase not in READING:
            if mask & EPOLL_FAIL:
                self._close(conn)  # hung up while we were not reading
            return
        store = self.store
        if (
            phase is not Phase.CLOSING
            and store.space() < self.recv_bytes
            and store.commit_error is None
        ):
            self._pause(conn, Pause.STORE)  # the store is behind: leave the bytes in the kernel
            return
        try:
            data = conn.recv(self.recv_bytes) if conn.tls else conn.sock.recv(self.recv_bytes)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn)
            return
        if data is None:
            return
        if not data:
            self._close(conn)
            return
        self.counters["bytes_in"] += len(data)
        if phase is Phase.CLOSING:
            return  # discarded: the ERROR (or final ACK) is on its way
        session = conn.session
        seen = session.frames_seen
        events = session.receive_data(data)
        if session.frames_seen != seen:
            conn.active = self.now
        if events:
            if phase is Phase.OPEN and events[-1][0] == DATA:
                self._store_data(conn, events)  # the common case: only DATA
            else:
                self._handle(conn, events)
        if conn.phase is not Phase.CLOSED:
            self._flush_session(conn)

    # -- protocol events ----------------------------------------------------------

    def _handle(self, conn: Connection, events: list[tuple]) -> None:
        """DATA events first; a HELLO, BYE or CLOSED can only be the last event."""
        last_event = events[-1]
        kind = last_event[0]
        if kind != DATA:
            events = events[:-1]
        if events:
            self._store_data(conn, events)
        if kind == HELLO:
            self._on_hello(conn, last_event.hello)
        elif kind == BYE:
            self._on_bye(conn)
        elif kind == CLOSED:
            self._begin_close(conn, last_event.code)

    def _store_data(self, conn: Connection, events: list[tuple]) -> None:
        """Replay window, scope and storage state per frame; one ring append per read."""
        ident = conn.identity
        before = last = self.accepted.get(ident, 0)
        session = conn.session
        replay = False
        busy = self.store.commit_error is not None  # the disk refuses writes
        recv_ns = time.time_ns()
        ident_bytes = conn.ident_bytes
        scope = conn.scope
        records: list[bytes] = []
        seqs: list[int] = []
        for _, channel, seq, ts_ns, payload in events:
            if seq <= last:
                replay = True
                self.counters["replays"] += 1
            elif channel not in scope:
                session.send_nack(seq, ErrorCode.DENIED, f"channel {channel} not in scope")
            elif busy:
                session.send_nack(seq, ErrorCode.BUSY, "storage cannot take the frame now")
            else:
                records.append(
                    encode_frame_record(ident_bytes, channel, seq, ts_ns, recv_ns, payload)
                )
                seqs.append(seq)
                last = seq
        if records:
            stored = self.store.append(records, ident, seqs)
            if stored < len(records):
                # a full store (quota, free-space floor): what needs a new segment is refused
                for seq in seqs[stored:]:
                    session.send_nack(seq, ErrorCode.BUSY, "storage cannot take the frame now")
                self._pause(conn, Pause.STORE)  # until the ring drains or space returns
                last = seqs[stored - 1] if stored else before
            if stored:
                self.accepted[ident] = last
                self.counters["frames"] += stored
                self.frames_by_identity[ident] += stored
        elif busy:
            self._pause(conn, Pause.STORE)
        if replay:
            session.send_ack(self.durable.get(ident, 0))

    def _evict(self, conn: Connection) -> None:
        """Close a connection still in the handshake at once, to free its slot."""
        self.admission.leave(conn)
        self.counters["evicted"] += 1
        conn.session.fail(ErrorCode.TIMEOUT, "too many connections in the handshake")
        with contextlib.suppress(OSError):
            conn.write(conn.session.data_to_send())
        self._close(conn)

    def _on_hello(self, conn: Connection, hello: dict) -> None:
        self.admission.leave(conn)  # proved or failed: it no longer holds a handshake slot
        self._resume_accepting()
        self._reload_registry()  # an identity added or revoked a moment ago counts already
        identity = authenticate(
            self.registry, hello, conn.session.nonce, trust_on_first_use=self.tofu
        )
        if identity is None:
            self._log_unproven(
                logging.INFO,
                "auth: failed for %s from %s",
                printable_ident(hello.get("id")),
                conn.addr,
            )
            self._fail(conn, ErrorCode.AUTH_FAILED, "authentication failed")
            return
        ident = identity.id
        old = self.by_identity.get(ident)
        if old is not None and old is not conn:
            self._fail(old, ErrorCode.SUPERSEDED, "the same identity connected again")
        self.by_identity[ident] = conn
        conn.identity = ident
        conn.ident_bytes = ident.encode()
        conn.scope = identity.channels
        if self._committed(ident):
            self._welcome(conn)
        else:
            conn.move(Phase.WELCOMING)  # WELCOME's last_seq must be durable
            conn.deadline = float("inf")
            self.commit_waiting[conn] = None
            self._update(conn)

    def _welcome(self, conn: Connection) -> None:
        identity = self.registry.get(conn.identity)
        if identity is None or identity.revoked:
            self._fail(conn, ErrorCode.REVOKED, "identity revoked")
            return
        conn.move(Phase.OPEN)
        conn.active = self.now
        if self.idle_timeout:
            conn.deadline = self.now + self.idle_timeout
            self._arm(conn)
        else:
            conn.deadline = float("inf")
        last = self.durable.get(conn.identity, 0)
        events = conn.session.accept(identity.secret, last, sorted(identity.channels))
        if events:
            self._handle(conn, events)
        if conn.phase is not Phase.CLOSED:
            self._flush_session(conn)
            self._update(conn)

    def _on_bye(self, conn: Connection) -> None:
        """BYE: commit, ACK the durable seq (even if unchanged), then close."""
        if self._committed(conn.identity):
            self._final_ack(conn)
        else:
            conn.move(Phase.DRAINING)
            conn.deadline = float("inf")
            self.commit_waiting[conn] = None
            self._update(conn)

    def _final_ack(self, conn: Connection) -> None:
        conn.move(Phase.CLOSING)
        conn.deadline = self.now + LINGER
        self._arm(conn)
        conn.session.send_ack(self.durable.get(conn.identity, 0))
        self._flush_session(conn)
        self._update(conn)

    def _fail(self, conn: Connection, code: str, message: str) -> None:
        """Send ERROR `code` and close the connection the way PROTOCOL.md §7 says."""
        conn.session.fail(code, message)
        self._begin_close(conn, code)
        self._flush_session(conn)

    def _begin_close(self, conn: Connection, code: str) -> None:
        if conn.phase is Phase.CLOSED:
            return
        self.admission.leave(conn)
        if conn.phase is not Phase.CLOSING:
            conn.move(Phase.CLOSING)
        self.commit_waiting.pop(conn, None)
        conn.deadline = self.now + LINGER
        self._arm(conn)
        if conn.identity is not None:
            log.info(
                "conn %s (%s): closing with %s", conn.addr, printable_ident(conn.identity), code
            )
        elif code != ErrorCode.AUTH_FAILED:  # that one was logged with its id
            self._log_unproven(
                logging.INFO, "conn %s: closing with %s before authentication", conn.addr, code
            )
        if conn.phase is not Phase.CLOSED:
            self._update(conn)

    def _close(self, conn: Connection) -> None:
        if conn.phase is Phase.CLOSED:
            return
        conn.move(Phase.CLOSED)
        del self.conns[conn.fd]
        self.admission.leave(conn)
        if conn.events:
            self.epoll.unregister(conn.fd)
            conn.events = 0
        self.paused.pop(conn, None)
        self.commit_waiting.pop(conn, None)
        if conn.identity is not None and self.by_identity.get(conn.identity) is conn:
            del self.by_identity[conn.identity]
        conn.sock.close()
        self._resume_accepting()

    # -- timers -------------------------------------------------------------------

    def _arm(self, conn: Connection) -> None:
        """Make the connection's current deadline fire. Entries of an earlier deadline
        stay in the heap and are skipped when they come up; the heap is rebuilt when
        such stale entries outnumber the connections."""
        heapq.heappush(self._timers, (conn.deadline, conn.serial, conn.fd))
        if len(self._timers) > 2 * len(self.conns) + 1024:
            self._timers = [t for t in self._timers if self._current(t) is not None]
            heapq.heapify(self._timers)

    def _current(self, timer: tuple[float, int, int]) -> Connection | None:
        """The connection a timer entry belongs to, if the entry is its current deadline."""
        when, serial, fd = timer
        conn = self.conns.get(fd)
        if conn is None or conn.serial != serial or conn.deadline != when:
            return None
        return conn

    def _on_timer(self, timer: tuple[float, int, int]) -> None:
        conn = self._current(timer)
        if conn is None:
            return
        phase = conn.phase
        if phase is Phase.CLOSING:
            self._close(conn)
        elif phase is Phase.OPEN:
            idle_until = conn.active + self.idle_timeout
            if idle_until > self.now:  # it was active since: look again then
                conn.deadline = idle_until
                self._arm(conn)
            else:
                self._fail(conn, ErrorCode.TIMEOUT, "idle past the idle timeout")
        elif phase in (Phase.TLS, Phase.HANDSHAKE):
            self._fail(conn, ErrorCode.TIMEOUT, "no HELLO within the handshake timeout")

    def _tick(self, now: float) -> None:
        self._reload_registry()
        self._resume_store_paused()  # also after BUSY, when no commit wakes the loop
        self._run_hooks(self.sweep_hooks, now)
        self._resume_accepting()

    def _reload_registry(self) -> None:
        """Pick up identity changes (one stat when nothing changed); close revoked ones."""
        try:
            revoked = self.registry.reload_if_changed()
        except RegistryError as exc:
            log.error("identities: %s; serving the last good copy", exc)
            return
        for ident in revoked:
            conn = self.by_identity.get(ident)
            if conn is not None and conn.phase is not Phase.CLOSING:
                self._fail(conn, ErrorCode.REVOKED, "identity revoked")
