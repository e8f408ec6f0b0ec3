"""The Server: one thread serving MIP/1 to every core; it runs their sessions, appends
DATA to the store's ring and sends the ACKs.

It never waits on the disk: the store's writer process does the fdatasync,
and its reply makes the loop acknowledge the newly durable frames, written
straight to each socket. Whatever arrives while a commit runs goes into the
next one. When the ring has no room for another read, the loop stops reading
sockets, so the kernel's TCP window pushes back on the senders instead of
memory growing here.

Its parts, each in its own module and all owned by the loop thread:
loop.py (the two epolls, extension hooks, signals), gate.py (listeners and
accepting, with admission.py deciding who may wait in the handshake),
transport.py (output, pauses, what epoll watches), timers.py (deadlines),
connection.py (one connection's phase and its transition table).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter
from types import MappingProxyType

from appliance.auth.handshake import bind_first_use, check_hello, to_bind
from appliance.auth.identity import Identity
from appliance.auth.registry import Registry, RegistryError
from appliance.config import Config
from appliance.net.admission import Admission
from appliance.net.connection import LINGER, READING, Connection, Pause, Phase
from appliance.net.gate import Gate
from appliance.net.loop import EPOLL_FAIL, EPOLLIN, EPOLLOUT, Loop
from appliance.net.snapshot import Identities, Peer, Snapshot, StoreFigures
from appliance.net.timers import Deadlines
from appliance.net.transport import Transport
from appliance.protocol.frames import ErrorCode, encode_ack
from appliance.protocol.session import BYE, CLOSED, DATA, HELLO
from appliance.store.ring import RESERVE as RING_RESERVE
from appliance.store.segment import encode_frame_record
from appliance.store.wal import Store, StoreError
from appliance.telemetry.throttle import Throttled

log = logging.getLogger("appliance.net")

TICK = 0.25  # registry changes, extension hooks and accept retries are looked at this often
# bytes of a changed registry file taken in per loop iteration: about 0.3 ms of the
# loop each, so a 10,000-core import (2.8 MB) is picked up within tens of milliseconds
# without stopping the loop for the ~10 ms the whole file takes
RELOAD_PART = 128 * 1024
STOP_GRACE = 1.5  # on SIGTERM: time allowed to commit and ACK before closing anyway
MAX_EVENTS = 64  # connections per poll: a burst of reads is cut into short iterations
SLICE = 0.002  # within an iteration, the writer and the control fds are served this often
# failed handshakes and connections closed before they authenticated: a peer decides how
# many there are, so they are logged at most once a second, with a count
UNPROVEN_LOG_EVERY = 1.0
LOG_IDENT_MAX = 64  # identities in log lines are cut to this many characters

_WAKE = object()  # control tags of what is not a listener or a watched file
_STORE = object()


def printable_ident(ident: object) -> str:
    """An identity as it may appear in a log line: a peer chose it, so it is cut short
    and shown with repr's escapes."""
    text = repr(ident)
    return text if len(text) <= LOG_IDENT_MAX else text[: LOG_IDENT_MAX - 3] + "..."


class Server(Gate, Loop):
    def __init__(self, config: Config, registry: Registry, store: Store) -> None:
        Loop.__init__(self)
        Gate.__init__(self)
        self.config = config
        self.registry = registry
        self.reloading = False  # a changed registry file is being taken in, part by part
        self.store = store
        srv = config.server
        self.max_payload = srv["max_payload"]
        self.handshake_timeout = srv["handshake_timeout"]
        self.idle_timeout = srv["idle_timeout"]
        # one read must fit in a batch (Store.space), or a small commit_max_bytes would
        # stop every read for good
        self.recv_bytes = min(srv["recv_bytes"], store.commit_max_bytes // 2)
        self.max_connections = srv["max_connections"]
        self.admission = Admission(srv["max_handshakes"], srv["max_handshakes_per_source"])
        # pending ring bytes beyond which the loop stops reading (the ring's share of
        # Store.space; a batch larger than commit_max_bytes stops reading earlier)
        self.pause_bytes = store.ring_bytes - RING_RESERVE - self.recv_bytes
        self.tofu = config.auth["trust_on_first_use"]
        self.conns: dict[int, Connection] = {}
        self.by_identity: dict[str, Connection] = {}
        self.accepted: dict[str, int] = dict(store.last_seq)  # replay window: highest stored seq
        self.durable: dict[str, int] = dict(store.last_seq)  # highest durable (ACKed) seq
        self.io = Transport(self.epoll, srv["send_buffer_limit"], self._close)
        self.paused = self.io.paused  # connections with a pause reason (telemetry reads it)
        self.deadlines = Deadlines(self.conns)
        self.commit_waiting: dict[Connection, None] = {}  # WELCOMING and DRAINING
        # BINDING: the proven identity and the fingerprint to bind, until the iteration's end
        self.binding: dict[Connection, tuple[Identity, str]] = {}
        # frames, bytes_in, replays, connections, nack.CODE, error.CODE (read by telemetry)
        self.counters: Counter[str] = Counter()
        self.frames_by_identity: Counter[str] = Counter()
        self.started = time.monotonic()
        self.now = self.started  # the loop's clock, read once per iteration
        self._serial = 0
        self._log_unproven = Throttled(log, UNPROVEN_LOG_EVERY)

    # -- set-up ---------------------------------------------------------------

    def bind(self) -> list[tuple[str, int]]:
        """Open the listeners; returns their bound addresses."""
        self._register(self._wake_r, EPOLLIN, _WAKE)
        self._register(self.store.fileno(), EPOLLIN, _STORE)
        return self.open_listeners()

    # -- the loop ---------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM / SIGINT; the exit code."""
        self.handle_signals()
        poll = self.epoll.poll
        poll_control = self.control.poll
        control_fd = self.control.fileno()
        conns = self.conns
        tags = self._tags
        store = self.store
        deadlines = self.deadlines
        monotonic = time.monotonic
        next_tick = monotonic() + TICK
        stop_deadline = None
        while True:
            timeout = 0.0 if self.reloading else next_tick - self.now
            deadline = deadlines.next()
            if deadline is not None and deadline - self.now < timeout:
                timeout = deadline - self.now
            due = store.commit_due()
            if due is not None and due - self.now < timeout:
                timeout = due - self.now
            events = poll(max(timeout, 0.0), MAX_EVENTS)
            self.now = now = monotonic()
            if len(events) == MAX_EVENTS:
                # busy: the control epoll may be behind thousands of ready sockets
                for fd, mask in poll_control(0):
                    self._on_control(tags.get(fd), mask)
            for fd, mask in events:
                conn = conns.get(fd)
                if conn is None:
                    if fd == control_fd:  # not busy: this poll returned all that is ready
                        for cfd, cmask in poll_control(0):
                            self._on_control(tags.get(cfd), cmask)
                    continue  # or a connection closed meanwhile
                try:
                    if mask & EPOLLOUT:
                        if conn.phase is Phase.TLS:
                            self._tls_handshake(conn)
                        else:
                            self.io.writable(conn)
                    if mask & (EPOLLIN | EPOLL_FAIL) and conn.phase is not Phase.CLOSED:
                        self._on_readable(conn, mask)
                except Exception:
                    self._close_on_bug(conn, conn.identity)
                if monotonic() - now > SLICE:
                    # long reads (a pipelined blast): let the writer start on what gathered,
                    # and hear its replies, before the rest of this iteration's reads
                    self.now = now = monotonic()
                    store.submit(now)
                    for cfd, cmask in poll_control(0):
                        self._on_control(tags.get(cfd), cmask)
            if self.binding:
                self._bind_first_use()
            store.submit(now)
            for conn in deadlines.due(now):
                self._on_deadline(conn)
            if self.reloading:
                self._reload_registry()
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

    def disconnect(self, ident: str) -> bool:
        """Close an identity's connection at once (the console's kick); False if none."""
        conn = self.by_identity.get(ident)
        if conn is None:
            return False
        self._close(conn)
        return True

    def refresh_identities(self) -> None:
        """Apply registry changes now (revocations close their connections)."""
        self._reload_registry(whole=True)

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

    def _begin_stop(self) -> float:
        log.info("stop: no longer accepting; committing and acknowledging")
        self.close_listeners()
        for conn in list(self.conns.values()):
            self.io.pause(conn, Pause.STOPPING)
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
                    self.io.send(conn, ack)
                    continue
                try:  # the common case: straight to the socket
                    sent = conn.sock.send(ack)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    self._close(conn)
                    continue
                if sent < len(ack):
                    self.io.send(conn, ack[sent:])
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
                self.io.resume(conn, Pause.STORE)

    def _committed(self, ident: str) -> bool:
        """Whether every frame accepted for `ident` is durable."""
        return self.durable.get(ident, 0) >= self.accepted.get(ident, 0)

    # -- reading ----------------------------------------------------------------

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
            self.io.pause(conn, Pause.STORE)  # the store is behind: leave the bytes in the kernel
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
            self.io.flush_session(conn)

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
                self.io.pause(conn, Pause.STORE)  # until the ring drains or space returns
                last = seqs[stored - 1] if stored else before
            if stored:
                self.accepted[ident] = last
                self.counters["frames"] += stored
                self.frames_by_identity[ident] += stored
        elif busy:
            self.io.pause(conn, Pause.STORE)
        if replay:
            session.send_ack(self.durable.get(ident, 0))

    def _on_hello(self, conn: Connection, hello: dict) -> None:
        self.admission.leave(conn)  # proved or failed: it no longer holds a handshake slot
        self._resume_accepting()
        self._reload_registry()  # an identity added or revoked a moment ago counts already
        identity = check_hello(self.registry, hello, conn.session.nonce)
        if identity is None and self.reloading:
            # it may be in the part of the changed file not taken in yet: take in the rest
            self._reload_registry(whole=True)
            identity = check_hello(self.registry, hello, conn.session.nonce)
        if identity is None:
            self._auth_failed(conn, hello.get("id"))
        elif self.tofu and to_bind(identity, hello):
            conn.move(Phase.BINDING)  # written with the others of this iteration
            conn.deadline = float("inf")
            self.binding[conn] = (identity, hello["fingerprint"])
            self.io.update(conn)
        else:
            self._admit(conn, identity)

    def _bind_first_use(self) -> None:
        """The fingerprints of this iteration's HELLOs, bound in one registry write (each
        one costs the whole file: 10-20 ms for 10,000 cores); then each goes on."""
        waiting, self.binding = self.binding, {}
        bound = bind_first_use(self.registry, list(waiting.values()))
        for (conn, (proven, _)), identity in zip(waiting.items(), bound, strict=True):
            if conn.phase is not Phase.BINDING:
                continue  # closed meanwhile
            try:
                if identity is None:
                    self._auth_failed(conn, proven.id)
                else:
                    self._admit(conn, identity)
            except Exception:
                self._close_on_bug(conn, proven.id)

    def _close_on_bug(self, conn: Connection, ident: str | None) -> None:
        """An exception while serving `conn` (a bug): it must cost that connection, not
        every core's; logged with its traceback."""
        log.exception("conn %s (%s): internal error; closing", conn.addr, printable_ident(ident))
        self._close(conn)

    def _auth_failed(self, conn: Connection, ident: object) -> None:
        self._log_unproven(
            logging.INFO, "auth: failed for %s from %s", printable_ident(ident), conn.addr
        )
        self._fail(conn, ErrorCode.AUTH_FAILED, "authentication failed")

    def _admit(self, conn: Connection, identity: Identity) -> None:
        """A proven HELLO: the connection takes over the identity, WELCOME when durable."""
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
            self.io.update(conn)

    def _welcome(self, conn: Connection) -> None:
        identity = self.registry.get(conn.identity)
        if identity is None or identity.revoked:
            self._fail(conn, ErrorCode.REVOKED, "identity revoked")
            return
        conn.move(Phase.OPEN)
        conn.active = self.now
        if self.idle_timeout:
            conn.deadline = self.now + self.idle_timeout
            self.deadlines.arm(conn)
        else:
            conn.deadline = float("inf")
        last = self.durable.get(conn.identity, 0)
        events = conn.session.accept(identity.secret, last, sorted(identity.channels))
        if events:
            self._handle(conn, events)
        if conn.phase is not Phase.CLOSED:
            self.io.flush_session(conn)
            self.io.update(conn)

    def _on_bye(self, conn: Connection) -> None:
        """BYE: commit, ACK the durable seq (even if unchanged), then close."""
        if self._committed(conn.identity):
            self._final_ack(conn)
        else:
            conn.move(Phase.DRAINING)
            conn.deadline = float("inf")
            self.commit_waiting[conn] = None
            self.io.update(conn)

    def _final_ack(self, conn: Connection) -> None:
        conn.move(Phase.CLOSING)
        conn.deadline = self.now + LINGER
        self.deadlines.arm(conn)
        conn.session.send_ack(self.durable.get(conn.identity, 0))
        self.io.flush_session(conn)
        self.io.update(conn)

    def _fail(self, conn: Connection, code: str, message: str) -> None:
        """Send ERROR `code` and close the connection the way PROTOCOL.md §7 says."""
        conn.session.fail(code, message)
        self._begin_close(conn, code)
        self.io.flush_session(conn)

    def _begin_close(self, conn: Connection, code: str) -> None:
        if conn.phase is Phase.CLOSED:
            return
        self.admission.leave(conn)
        if conn.phase is not Phase.CLOSING:
            conn.move(Phase.CLOSING)
        self.commit_waiting.pop(conn, None)
        self.binding.pop(conn, None)
        conn.deadline = self.now + LINGER
        self.deadlines.arm(conn)
        if conn.identity is not None:
            log.info(
                "conn %s (%s): closing with %s", conn.addr, printable_ident(conn.identity), code
            )
        elif code != ErrorCode.AUTH_FAILED:  # that one was logged with its id
            self._log_unproven(
                logging.INFO, "conn %s: closing with %s before authentication", conn.addr, code
            )
        if conn.phase is not Phase.CLOSED:
            self.io.update(conn)

    def _close(self, conn: Connection) -> None:
        if conn.phase is Phase.CLOSED:
            return
        conn.move(Phase.CLOSED)
        del self.conns[conn.fd]
        self.admission.leave(conn)
        self.io.release(conn)
        self.commit_waiting.pop(conn, None)
        self.binding.pop(conn, None)
        if conn.identity is not None and self.by_identity.get(conn.identity) is conn:
            del self.by_identity[conn.identity]
        self._resume_accepting()

    # -- timers -------------------------------------------------------------------

    def _on_deadline(self, conn: Connection) -> None:
        phase = conn.phase
        if phase is Phase.CLOSING:
            self._close(conn)
        elif phase is Phase.OPEN:
            idle_until = conn.active + self.idle_timeout
            if idle_until > self.now:  # it was active since: look again then
                conn.deadline = idle_until
                self.deadlines.arm(conn)
            else:
                self._fail(conn, ErrorCode.TIMEOUT, "idle past the idle timeout")
        elif phase in (Phase.TLS, Phase.HANDSHAKE):
            self._fail(conn, ErrorCode.TIMEOUT, "no HELLO within the handshake timeout")

    def _tick(self, now: float) -> None:
        self._reload_registry()
        self._resume_store_paused()  # also after BUSY, when no commit wakes the loop
        self._run_hooks(self.sweep_hooks, now)
        self._resume_accepting()

    def _reload_registry(self, whole: bool = False) -> None:
        """Pick up identity changes (one stat when nothing changed), a part of a changed
        file per loop iteration, or with `whole` the rest of it now; close revoked ones."""
        registry = self.registry
        try:
            revoked = registry.reload_if_changed() if whole else registry.reload_part(RELOAD_PART)
        except RegistryError as exc:
            self.reloading = False
            log.error("identities: %s; serving the last good copy", exc)
            return
        self.reloading = revoked is None
        if revoked is None:
            return
        for ident in revoked:
            conn = self.by_identity.get(ident)
            if conn is not None and conn.phase is not Phase.CLOSING:
                self._fail(conn, ErrorCode.REVOKED, "identity revoked")
