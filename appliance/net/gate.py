"""The gate: listeners, accepting, and room for newcomers (admission.py decides whom).

A part of the Server (a base class, as socketserver's mix-ins are); it uses
the Server's connections, admission, transport and deadlines, and asks the
Server to read a waiting HELLO (`_on_readable`) or to push a connection out
(`_evict`, which sends ERROR TIMEOUT). Owner: the loop thread.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import ssl

from appliance.net import sockets
from appliance.net.connection import Connection, Phase
from appliance.net.loop import EPOLLIN, EPOLLOUT
from appliance.protocol import crypto
from appliance.protocol.frames import ErrorCode
from appliance.protocol.session import ServerSession

log = logging.getLogger("appliance.net")

ACCEPT_BATCH = 256  # connections accepted per iteration at most
MAKE_ROOM_TRIES = 8  # handshakes looked at per accept when the slots are full
LISTENER = object()  # the control tag of a listener: (LISTENER, socket, TLS context)


class Gate:
    def __init__(self) -> None:
        self.listeners: list[tuple[socket.socket, ssl.SSLContext | None]] = []
        self._accepting = False

    def open_listeners(self) -> list[tuple[str, int]]:
        """Open the listeners and accept; returns their bound addresses."""
        srv = self.config.server
        self.listeners.append((sockets.listen(self.config.listen, srv["backlog"]), None))
        tls = self.config.tls
        if tls["enabled"]:
            ctx = sockets.server_tls_context(tls["cert"], tls["key"])
            self.listeners.append((sockets.listen(self.config.tls_listen, srv["backlog"]), ctx))
        self._set_accepting(True)
        return [lsock.getsockname()[:2] for lsock, _ in self.listeners]

    def close_listeners(self) -> None:
        self._set_accepting(False)
        for lsock, _ in self.listeners:
            lsock.close()

    def _set_accepting(self, on: bool) -> None:
        if on == self._accepting:
            return
        self._accepting = on
        for lsock, ctx in self.listeners:
            if on:
                self._register(lsock.fileno(), EPOLLIN, (LISTENER, lsock, ctx))
            else:
                self._unregister(lsock.fileno())

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
            self.deadlines.arm(conn)
            if conn.phase is Phase.TLS:
                self._tls_handshake(conn)
            else:
                self.io.flush_session(conn)
                self.io.update(conn)
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
            self.io.set_events(conn, EPOLLIN)
            return
        except ssl.SSLWantWriteError:
            self.io.set_events(conn, EPOLLOUT)
            return
        except (ssl.SSLError, OSError) as exc:
            log.info("tls: handshake with %s failed: %s", conn.addr, exc)
            self._close(conn)
            return
        conn.move(Phase.HANDSHAKE)
        self.io.flush_session(conn)
        self.io.update(conn)

    def _evict(self, conn: Connection) -> None:
        """Close a connection still in the handshake at once, to free its slot."""
        self.admission.leave(conn)
        self.counters["evicted"] += 1
        conn.session.fail(ErrorCode.TIMEOUT, "too many connections in the handshake")
        with contextlib.suppress(OSError):
            conn.write(conn.session.data_to_send())
        self._close(conn)
