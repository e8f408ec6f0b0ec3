"""The selector loop: accepts cores, runs their sessions, stores DATA, sends ACKs.

One thread owns every socket. It never waits on the disk: the store's
committer thread does the fdatasync and wakes the loop through a pipe, and the
loop then acknowledges the newly durable frames. When the store falls behind
(its ring is nearly full) or a peer stops reading its ACKs (`send_buffer_limit`),
the loop stops reading from sockets, so the kernel's TCP window pushes back on
the senders instead of memory growing here.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import signal
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable

from appliance.auth.handshake import authenticate
from appliance.auth.registry import Registry, RegistryError
from appliance.config import Config
from appliance.net import sockets
from appliance.net.connection import LINGER, Connection
from appliance.protocol import crypto
from appliance.protocol.frames import ErrorCode
from appliance.protocol.session import BYE, CLOSED, DATA, HELLO, ServerSession, State
from appliance.store.segment import encode_frame_record
from appliance.store.wal import Store

log = logging.getLogger("appliance.net")

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE
SWEEP_INTERVAL = 0.25  # timeouts, registry changes and accept retries are checked this often
STOP_GRACE = 1.5  # on SIGTERM: time allowed to commit and ACK before closing anyway


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
        # stop reading sockets while the ring has less room than a few reads can fill
        self.pending_max = store.ring_bytes - 3 * self.recv_bytes
        self.tofu = config.auth["trust_on_first_use"]
        self.selector = selectors.DefaultSelector()
        self.conns: dict[int, Connection] = {}
        self.by_identity: dict[str, Connection] = {}
        self.accepted: dict[str, int] = dict(store.last_seq)  # replay window: highest stored seq
        self.durable: dict[str, int] = dict(store.last_seq)
        self.marks: dict[str, int] = {}  # this iteration's highest accepted seq per identity
        # an insertion-ordered set: paused sockets resume oldest first, so none starves
        self.paused: dict[Connection, None] = {}
        self.commit_waiting: set[Connection] = set()
        self.listeners: list[tuple[socket.socket, ssl.SSLContext | None]] = []
        # frames, bytes_in, replays, connections, nack.CODE, error.CODE (read by telemetry)
        self.counters: Counter[str] = Counter()
        self.frames_by_identity: Counter[str] = Counter()
        self.started = time.monotonic()
        # extension points for telemetry, the console and the watchdog: they run in this loop
        self.sweep_hooks: list[Callable[[float], None]] = []
        self.subscriber_lags: Callable[[], dict[str, int]] = dict  # set by the subscriber manager
        self.stop_hooks: list[Callable[[], None]] = []
        self.stopping = False
        self._accepting = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- set-up ---------------------------------------------------------------

    def wakeup(self) -> None:
        """Wake the loop from another thread (the committer)."""
        # a full pipe means a wake-up is already pending
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")

    def bind(self) -> list[tuple[str, int]]:
        """Open the listeners; returns their bound addresses."""
        srv = self.config.server
        self.listeners.append((sockets.listen(self.config.listen, srv["backlog"]), None))
        tls = self.config.tls
        if tls["enabled"]:
            ctx = sockets.server_tls_context(tls["cert"], tls["key"])
            self.listeners.append((sockets.listen(self.config.tls_listen, srv["backlog"]), ctx))
        self.selector.register(self._wake_r, READ, None)
        self._set_accepting(True)
        return [lsock.getsockname()[:2] for lsock, _ in self.listeners]

    def _set_accepting(self, on: bool) -> None:
        if on == self._accepting:
            return
        self._accepting = on
        for lsock, ctx in self.listeners:
            if on:
                self.selector.register(lsock, READ, (lsock, ctx))
            else:
                self.selector.unregister(lsock)

    # -- the loop ---------------------------------------------------------------

    def run(self) -> None:
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        next_sweep = time.monotonic() + SWEEP_INTERVAL
        stop_deadline = None
        select = self.selector.select
        store = self.store
        while True:
            timeout = max(0.0, next_sweep - time.monotonic())
            for key, mask in select(timeout):
                data = key.data
                if data is None:
                    self._drain_wakeups()
                elif type(data) is Connection:
                    try:
                        if mask & WRITE:
                            self._on_writable(data)
                        if mask & READ and data.fd in self.conns:
                            self._on_readable(data)
                    except Exception:
                        # a bug must cost one connection, not every core's
                        log.exception(
                            "conn %s (%s): internal error; closing", data.addr, data.identity
                        )
                        self._close(data)
                elif type(data) is tuple:
                    self._accept(*data)
                else:
                    self._run_hooks((data,), mask)  # a watched file: stats socket, console
            if self.marks:
                store.submit()
                self.marks = {}
            if self.stopping:
                if stop_deadline is None:  # the signal came in during this iteration
                    stop_deadline = self._begin_stop()
                if store.pending_bytes() == 0 and not self.commit_waiting:
                    self._finish_stop()
                    return
                if time.monotonic() > stop_deadline:
                    log.warning("stop: commit still running after %.1f s; closing", STOP_GRACE)
                    self._finish_stop()
                    return
            now = time.monotonic()
            if now >= next_sweep:
                self._sweep(now)
                next_sweep = now + SWEEP_INTERVAL

    def _on_signal(self, signum, frame) -> None:
        self.stopping = True

    # -- for the extensions (all called on the loop thread) ---------------------

    def _run_hooks(self, hooks, *args) -> None:
        """Run extension callbacks; a failing one is logged, never stops the loop."""
        for hook in hooks:
            try:
                hook(*args)
            except Exception:
                log.exception("extension %r failed", hook)

    def watch(self, fileobj, events: int, callback: Callable[[int], None]) -> None:
        """Run `callback(mask)` in the loop when `fileobj` is ready."""
        self.selector.register(fileobj, events, callback)

    def unwatch(self, fileobj) -> None:
        self.selector.unregister(fileobj)

    def connection_for(self, ident: str) -> Connection | None:
        return self.by_identity.get(ident)

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

    def _begin_stop(self) -> float:
        log.info("stop: no longer accepting; committing and acknowledging")
        self._set_accepting(False)
        for lsock, _ in self.listeners:
            lsock.close()
        for conn in list(self.conns.values()):
            self._pause(conn)
        return time.monotonic() + STOP_GRACE

    def _finish_stop(self) -> None:
        self._drain_wakeups()
        self._run_hooks(self.stop_hooks)
        for conn in list(self.conns.values()):
            conn.flush()
            self._close(conn)
        self.store.close()
        self.selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        log.info("stop: done")

    # -- acknowledgements -------------------------------------------------------

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        durable = self.durable
        by_identity = self.by_identity
        for marks in self.store.completed():
            for ident, seq in marks.items():
                if seq > durable.get(ident, 0):
                    durable[ident] = seq
                conn = by_identity.get(ident)
                # not before WELCOME (it carries last_seq), not after ERROR or BYE
                if conn is not None and conn.session.state is State.OPEN:
                    conn.session.send_ack(durable[ident])
                    self._flush(conn)
        for conn in list(self.commit_waiting):
            if self._committed(conn.identity):
                self.commit_waiting.discard(conn)
                then, conn.commit_wait = conn.commit_wait, None
                if then == "bye":
                    self._final_ack(conn)
                else:
                    self._welcome(conn)
        self._resume_paused()

    def _resume_paused(self) -> None:
        """Read again from paused sockets once the ring has room. A core refused with BUSY
        is read again at most once per sweep or commit while the store stays full."""
        store = self.store
        if not self.paused or self.stopping:
            return
        # while commits fail, read anyway: the frames get BUSY instead of waiting unanswered
        if store.pending_bytes() > self.pending_max // 2 and store.commit_error is None:
            return
        for conn in list(self.paused):
            if conn.commit_wait is None and len(conn.out) <= self.send_limit:
                self._resume(conn)

    def _committed(self, ident: str) -> bool:
        """Whether every frame accepted for `ident` is durable."""
        return ident not in self.marks and self.durable.get(ident, 0) >= self.accepted.get(ident, 0)

    def _wait_commit(self, conn: Connection, then: str) -> None:
        conn.commit_wait = then
        self.commit_waiting.add(conn)
        self._pause(conn)

    # -- accept -----------------------------------------------------------------

    def _accept(self, lsock: socket.socket, ctx: ssl.SSLContext | None) -> None:
        for _ in range(64):  # bounded, so a connect storm cannot starve established cores
            if len(self.conns) >= self.max_connections:
                self._set_accepting(False)
                return
            try:
                sock, addr = lsock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("accept: %s; pausing accept until the next sweep", exc.strerror)
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
            conn = Connection(sock, addr, session, time.monotonic() + self.handshake_timeout)
            self.conns[conn.fd] = conn
            self.counters["connections"] += 1
            if conn.tls_pending:
                self._tls_handshake(conn)
            else:
                self._flush(conn)
                self._interest(conn, READ | (WRITE if conn.out else 0))

    def _tls_handshake(self, conn: Connection) -> None:
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._interest(conn, READ)
            return
        except ssl.SSLWantWriteError:
            self._interest(conn, WRITE)
            return
        except (ssl.SSLError, OSError) as exc:
            log.info("tls: handshake with %s failed: %s", conn.addr, exc)
            self._close(conn)
            return
        conn.tls_pending = False
        self._flush(conn)
        self._interest(conn, READ | (WRITE if conn.out else 0))

    # -- I/O --------------------------------------------------------------------

    def _interest(self, conn: Connection, events: int) -> None:
        if events == conn.events:
            return
        if conn.events == 0:
            self.selector.register(conn.sock, events, conn)
        elif events == 0:
            self.selector.unregister(conn.sock)
        else:
            self.selector.modify(conn.sock, events, conn)
        conn.events = events

    def _want(self, conn: Connection) -> int:
        events = 0 if conn.paused else READ
        if conn.out and not conn.shut:
            events |= WRITE
        return events

    def _flush(self, conn: Connection) -> None:
        try:
            empty = conn.flush()
        except OSError:
            self._close(conn)
            return
        if empty and conn.closing and conn.commit_wait is None and not conn.shut:
            conn.shutdown_write()  # after the ERROR or the final ACK, not before
        if len(conn.out) > self.send_limit and not conn.paused:
            self._pause(conn)  # the peer does not read: stop reading it until it does
        self._interest(conn, self._want(conn))

    def _pause(self, conn: Connection) -> None:
        conn.paused = True
        self.paused[conn] = None
        self._interest(conn, self._want(conn))

    def _resume(self, conn: Connection) -> None:
        conn.paused = False
        self.paused.pop(conn, None)
        self._interest(conn, self._want(conn))

    def _on_writable(self, conn: Connection) -> None:
        if conn.tls_pending:
            self._tls_handshake(conn)
            return
        self._flush(conn)
        if (
            conn.paused
            and conn.commit_wait is None
            and len(conn.out) <= self.send_limit // 2
            and self.store.pending_bytes() <= self.pending_max
            and not self.stopping
        ):
            self._resume(conn)

    def _on_readable(self, conn: Connection) -> None:
        if conn.tls_pending:
            self._tls_handshake(conn)
            return
        store = self.store
        if not conn.closing and store.pending_bytes() > self.pending_max and not store.commit_error:
            self._pause(conn)  # the store is behind: leave the bytes in the kernel
            return
        try:
            data = conn.recv(self.recv_bytes)
        except OSError:
            self._close(conn)
            return
        if data is None:
            return
        if not data:
            self._close(conn)
            return
        self.counters["bytes_in"] += len(data)
        if conn.closing:
            return  # discarded: the ERROR (or final ACK) is on its way
        self._handle(conn, conn.session.receive_data(data))
        if conn.fd in self.conns:
            self._flush(conn)

    # -- protocol events ----------------------------------------------------------

    def _handle(self, conn: Connection, events: list[tuple]) -> None:
        """DATA events first; a HELLO, BYE or CLOSED can only be the last event."""
        if not events:
            return
        last_event = events[-1]
        if last_event[0] != DATA:
            events = events[:-1]
        if events:
            self._store_data(conn, events)
        kind = last_event[0]
        if kind == HELLO:
            self._on_hello(conn, last_event[1])
        elif kind == BYE:
            conn.closing = True
            self._on_bye(conn)
        elif kind == CLOSED:
            self._begin_close(conn, last_event[1])

    def _store_data(self, conn: Connection, events: list[tuple]) -> None:
        """Replay window, scope and storage state per frame; one ring append per read."""
        ident = conn.identity
        before = last = self.accepted.get(ident, 0)
        session = conn.session
        replay = False
        busy = self._busy()
        recv_ns = time.time_ns()
        ident_bytes = conn.ident_bytes
        records: list[bytes] = []
        seqs: list[int] = []
        for _, channel, seq, ts_ns, payload in events:
            if seq <= last:
                replay = True
                self.counters["replays"] += 1
            elif channel not in conn.scope:
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
                for seq in seqs[stored:]:
                    session.send_nack(seq, ErrorCode.BUSY, "storage cannot take the frame now")
                self._pause(conn)  # until the ring drains or space returns
                last = seqs[stored - 1] if stored else before
            if stored:
                self.accepted[ident] = last
                self.marks[ident] = last
                self.counters["frames"] += stored
                self.frames_by_identity[ident] += stored
        elif busy:
            self._pause(conn)
        if replay:
            session.send_ack(self.durable.get(ident, 0))

    def _on_hello(self, conn: Connection, hello: dict) -> None:
        self._reload_registry()  # an identity added or revoked a moment ago counts already
        identity = authenticate(
            self.registry, hello, conn.session.nonce, trust_on_first_use=self.tofu
        )
        if identity is None:
            log.info("auth: failed for %r from %s", hello.get("id"), conn.addr)
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
            self._wait_commit(conn, "welcome")  # WELCOME's last_seq must be durable

    def _welcome(self, conn: Connection) -> None:
        identity = self.registry.get(conn.identity)
        if identity is None or identity.revoked:
            self._fail(conn, ErrorCode.REVOKED, "identity revoked")
            return
        conn.deadline = time.monotonic() + (self.idle_timeout or float("inf"))
        last = self.durable.get(conn.identity, 0)
        events = conn.session.accept(identity.secret, last, sorted(identity.channels))
        if conn.paused and not self.stopping:
            self._resume(conn)
        self._handle(conn, events)
        self._flush(conn)

    def _on_bye(self, conn: Connection) -> None:
        """BYE: commit, ACK the durable seq (even if unchanged), then close."""
        if self._committed(conn.identity):
            self._final_ack(conn)
        else:
            self._wait_commit(conn, "bye")

    def _final_ack(self, conn: Connection) -> None:
        conn.session.send_ack(self.durable.get(conn.identity, 0))
        conn.deadline = time.monotonic() + LINGER
        self._flush(conn)

    def _busy(self) -> bool:
        """Whether new DATA gets NACK BUSY: the disk refuses writes. (A full store refuses
        in append, when a frame would need a new segment.)"""
        return self.store.commit_error is not None

    def _fail(self, conn: Connection, code: str, message: str) -> None:
        """Send ERROR `code` and close the connection the way PROTOCOL.md §7 says."""
        conn.session.fail(code, message)
        self._begin_close(conn, code)
        self._flush(conn)

    def _begin_close(self, conn: Connection, code: str) -> None:
        conn.closing = True
        conn.commit_wait = None
        self.commit_waiting.discard(conn)
        conn.deadline = time.monotonic() + LINGER
        if code != ErrorCode.AUTH_FAILED:
            log.info("conn %s (%s): closing with %s", conn.addr, conn.identity, code)

    def _close(self, conn: Connection) -> None:
        if self.conns.pop(conn.fd, None) is None:
            return
        if conn.events:
            self.selector.unregister(conn.sock)
            conn.events = 0
        self.paused.pop(conn, None)
        self.commit_waiting.discard(conn)
        if conn.identity is not None and self.by_identity.get(conn.identity) is conn:
            del self.by_identity[conn.identity]
        conn.sock.close()
        if not self._accepting and not self.stopping:
            self._set_accepting(True)

    # -- timers -------------------------------------------------------------------

    def _sweep(self, now: float) -> None:
        self._reload_registry()
        self._resume_paused()  # also after BUSY, when no commit wakes the loop
        self._run_hooks(self.sweep_hooks, now)
        if not self._accepting and not self.stopping and len(self.conns) < self.max_connections:
            self._set_accepting(True)
        idle = self.idle_timeout
        for conn in list(self.conns.values()):
            seen = conn.session.frames_seen
            if seen != conn.seen and conn.session.state is State.OPEN and not conn.closing:
                conn.seen = seen
                conn.deadline = now + idle if idle else float("inf")
            elif now >= conn.deadline:
                if conn.closing:
                    self._close(conn)
                elif conn.session.state is not State.OPEN:
                    self._expire(conn, "no HELLO within the handshake timeout")
                else:
                    self._expire(conn, "idle past the idle timeout")

    def _reload_registry(self) -> None:
        """Pick up identity changes (one stat when nothing changed); close revoked ones."""
        try:
            revoked = self.registry.reload_if_changed()
        except RegistryError as exc:
            log.error("identities: %s; serving the last good copy", exc)
            return
        for ident in revoked:
            conn = self.by_identity.get(ident)
            if conn is not None and not conn.closing:
                self._fail(conn, ErrorCode.REVOKED, "identity revoked")

    def _expire(self, conn: Connection, message: str) -> None:
        if conn.commit_wait is None:  # not when it waits on our own commit
            self._fail(conn, ErrorCode.TIMEOUT, message)
