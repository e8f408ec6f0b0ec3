"""One client connection: its socket, its protocol session and its send buffer."""

from __future__ import annotations

import contextlib
import socket
import ssl

from appliance.protocol.session import ServerSession

LINGER = 2.0  # after an ERROR: discard input this long so the peer can read the ERROR


class Connection:
    __slots__ = (
        "accepted",
        "addr",
        "closing",
        "commit_wait",
        "deadline",
        "events",
        "fd",
        "ident_bytes",
        "identity",
        "out",
        "paused",
        "scope",
        "seen",
        "session",
        "shut",
        "sock",
        "tls_pending",
    )

    def __init__(self, sock: socket.socket, addr, session: ServerSession, deadline: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.addr = addr
        self.session = session
        self.out = bytearray()
        self.events = 0  # selector interest currently registered
        self.deadline = deadline  # handshake, idle or linger deadline (monotonic)
        self.seen = 0  # session.frames_seen at the last sweep
        self.identity: str | None = None
        self.ident_bytes = b""
        self.scope: frozenset[int] = frozenset()
        self.accepted = 0
        self.closing = False  # ERROR sent or BYE handled; input is discarded
        self.shut = False  # write side shut down
        self.paused = (
            False  # not reading: store backpressure, full send buffer, or awaiting a commit
        )
        self.commit_wait: str | None = None  # "welcome" or "bye": answered once the commit is done
        self.tls_pending = isinstance(sock, ssl.SSLSocket)  # TLS handshake not yet done

    def recv(self, size: int) -> bytes | None:
        """Bytes received; b"" at EOF; None if nothing is there now."""
        try:
            data = self.sock.recv(size)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return None
        if data and self.tls_pending is False and isinstance(self.sock, ssl.SSLSocket):
            # TLS decrypts whole records: what is already decrypted raises no new event
            while self.sock.pending():
                data += self.sock.recv(self.sock.pending())
        return data

    def flush(self) -> bool:
        """Send what the buffer holds; True when it is empty."""
        out = self.out
        out += self.session.data_to_send()
        if not out:
            return True
        try:
            sent = self.sock.send(out)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return False
        del out[:sent]
        return not out

    def shutdown_write(self) -> None:
        if not self.shut:
            self.shut = True
            # on TLS a plain FIN, not close_notify: unwrap() would block
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
