"""Moving bytes for the loop: which connection is read or written, output queues, pauses.

Owner: the loop thread. The loop decides what a connection's phase is and
what to say; this module decides, from that phase, its pause reasons and its
queued output, what epoll should watch, and writes the output (straight to
the socket when nothing is queued before it). A peer that does not read its
ACKs is not read either (Pause.SEND), so TCP pushes back on it instead of
its queue growing here.
"""

from __future__ import annotations

import select
from collections.abc import Callable

from appliance.net.connection import Connection, Pause, Phase

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT


class Transport:
    def __init__(
        self, epoll: select.epoll, send_limit: int, on_broken: Callable[[Connection], None]
    ) -> None:
        self.epoll = epoll
        self.send_limit = send_limit
        self.on_broken = on_broken  # a write failed: the loop closes the connection
        # insertion-ordered set: paused sockets resume oldest first, so none starves
        self.paused: dict[Connection, None] = {}

    def set_events(self, conn: Connection, events: int) -> None:
        if events == conn.events:
            return
        if conn.events == 0:
            self.epoll.register(conn.fd, events)
        elif events == 0:
            self.epoll.unregister(conn.fd)
        else:
            self.epoll.modify(conn.fd, events)
        conn.events = events

    def update(self, conn: Connection) -> None:
        """Watch what the connection's phase, pauses and output call for."""
        if conn.phase is Phase.TLS:
            return  # the TLS handshake decides
        events = EPOLLIN if conn.reading() else 0
        if conn.out and not conn.shut:
            events |= EPOLLOUT
        if events != conn.events:
            self.set_events(conn, events)

    def send(self, conn: Connection, data: bytes | bytearray) -> None:
        """Write to the peer now; what the socket does not take waits for EPOLLOUT."""
        try:
            conn.write(data)
        except OSError:
            self.on_broken(conn)
            return
        if conn.out:
            if len(conn.out) > self.send_limit:
                self.pause(conn, Pause.SEND)  # the peer does not read: stop reading it
            else:
                self.update(conn)
        elif conn.phase is Phase.CLOSING and not conn.shut:
            conn.shutdown_write()  # after the ERROR or the final ACK, not before

    def flush_session(self, conn: Connection) -> None:
        """Send what the connection's protocol session has queued."""
        out = conn.session.data_to_send()
        if out:
            self.send(conn, out)

    def writable(self, conn: Connection) -> None:
        """EPOLLOUT: send what is queued; read the peer again once it reads its ACKs."""
        self.send(conn, b"")
        if conn.phase is Phase.CLOSED:
            return
        if Pause.SEND in conn.pauses and len(conn.out) <= self.send_limit // 2:
            self.resume(conn, Pause.SEND)
        else:
            self.update(conn)

    def pause(self, conn: Connection, reason: Pause) -> None:
        conn.pauses |= {reason}
        self.paused[conn] = None
        self.update(conn)

    def resume(self, conn: Connection, reason: Pause) -> None:
        conn.pauses -= {reason}
        if not conn.pauses:
            self.paused.pop(conn, None)
        self.update(conn)

    def release(self, conn: Connection) -> None:
        """Forget a connection the loop has closed, and close its socket."""
        if conn.events:
            self.epoll.unregister(conn.fd)
            conn.events = 0
        self.paused.pop(conn, None)
        conn.sock.close()
