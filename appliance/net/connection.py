"""One client connection: its lifecycle, its socket, its protocol session, its output.

Owner: the loop thread. A connection is in exactly one Phase; `move` checks
every change against the transition table, so the lifecycle reads in one
place:

    TLS ──► HANDSHAKE ──► WELCOMING ──► OPEN ──► DRAINING ──► CLOSING ──► CLOSED
     │          │    │         ▲  │          │                      ▲
     │          │    └►BINDING─┘  │          │                      │
     └──────────┴─────────┴───────┴──────────┴──────────────────────┘

- TLS: the TLS handshake runs (TLS listeners only);
- HANDSHAKE: CHALLENGE sent, waiting for HELLO (the handshake timeout runs);
- BINDING: HELLO proved, and trust on first use binds its fingerprint: the
  bindings of every HELLO of one loop iteration are written to the registry
  together at the iteration's end (one write of the whole file, not one each),
  then each goes on to WELCOMING or OPEN, or fails;
- WELCOMING: HELLO accepted; frames of this identity are still being
  committed, and WELCOME (with a durable last_seq) waits for that commit;
- OPEN: DATA flows, ACKs go out after each commit (the idle timeout runs);
- DRAINING: BYE received; the final ACK waits for the commit;
- CLOSING: ERROR or final ACK queued; input is discarded until the peer
  closes or LINGER passes (PROTOCOL.md §7);
- CLOSED: the socket is closed (from any phase: a reset, a kick, the stop).

Reading is further held back by a set of pause reasons (Pause), each added
and removed by the one part of the loop that owns it.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from enum import Enum

from appliance.protocol.session import ServerSession

LINGER = 2.0  # after an ERROR: discard input this long so the peer can read the ERROR


class Phase(Enum):
    TLS = "tls"
    HANDSHAKE = "handshake"
    BINDING = "binding"
    WELCOMING = "welcoming"
    OPEN = "open"
    DRAINING = "draining"
    CLOSING = "closing"
    CLOSED = "closed"


TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.TLS: frozenset({Phase.HANDSHAKE, Phase.CLOSING, Phase.CLOSED}),
    Phase.HANDSHAKE: frozenset(
        {Phase.BINDING, Phase.WELCOMING, Phase.OPEN, Phase.CLOSING, Phase.CLOSED}
    ),
    Phase.BINDING: frozenset({Phase.WELCOMING, Phase.OPEN, Phase.CLOSING, Phase.CLOSED}),
    Phase.WELCOMING: frozenset({Phase.OPEN, Phase.CLOSING, Phase.CLOSED}),
    Phase.OPEN: frozenset({Phase.DRAINING, Phase.CLOSING, Phase.CLOSED}),
    Phase.DRAINING: frozenset({Phase.CLOSING, Phase.CLOSED}),
    Phase.CLOSING: frozenset({Phase.CLOSED}),
    Phase.CLOSED: frozenset(),
}

# phases in which the loop reads the socket (CLOSING reads to discard, see above)
READING = frozenset({Phase.TLS, Phase.HANDSHAKE, Phase.OPEN, Phase.CLOSING})


class Pause(Enum):
    STORE = "store"  # the ring has no room for another read, or the store is full (BUSY)
    SEND = "send"  # the peer does not read its ACKs: output above send_buffer_limit
    STOPPING = "stopping"  # the daemon stops: nothing new is read


NO_PAUSES: frozenset[Pause] = frozenset()


class Connection:
    __slots__ = (
        "active",
        "addr",
        "born",
        "deadline",
        "events",
        "fd",
        "ident_bytes",
        "identity",
        "out",
        "pauses",
        "phase",
        "scope",
        "serial",
        "session",
        "shut",
        "sock",
        "source",
        "tls",
    )

    def __init__(
        self,
        sock: socket.socket,
        addr,
        session: ServerSession,
        serial: int,
        born: float,
        deadline: float,
        phase: Phase,
    ) -> None:
        self.sock = sock
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.fd = sock.fileno()
        self.addr = addr
        self.source = addr[0] if isinstance(addr, tuple) else str(addr)
        self.serial = serial  # unique per connection: timers name it with its fd
        self.born = born  # loop time of the accept
        self.session = session
        self.phase = phase
        self.pauses: frozenset[Pause] = NO_PAUSES  # replaced, not changed: most stay empty
        self.out = bytearray()  # queued output the socket did not take yet
        self.events = 0  # epoll interest currently registered (0: none)
        self.deadline = deadline  # the current phase's deadline (monotonic)
        self.active = 0.0  # loop time of the last read with a valid frame (idle timeout)
        self.identity: str | None = None
        self.ident_bytes = b""
        self.scope: frozenset[int] = frozenset()
        self.shut = False  # write side shut down

    def move(self, phase: Phase) -> None:
        if phase not in TRANSITIONS[self.phase]:
            raise AssertionError(f"connection {self.addr}: {self.phase} -> {phase}")
        self.phase = phase

    def reading(self) -> bool:
        return self.phase in READING and not self.pauses

    def recv(self, size: int) -> bytes | None:
        """Bytes received; b"" at EOF; None if nothing is there now."""
        sock = self.sock
        try:
            data = sock.recv(size)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return None
        if data and self.tls:
            # TLS decrypts whole records: what is already decrypted raises no new event
            while sock.pending():
                data += sock.recv(sock.pending())
        return data

    def write(self, data: bytes | bytearray) -> None:
        """Send `data` after what is queued; what the socket does not take is queued.
        OSError if the connection is broken."""
        out = self.out
        if out:
            out += data
            data = out
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            sent = 0
        if data is out:
            del out[:sent]
        elif sent < len(data):
            out += memoryview(data)[sent:]

    def shutdown_write(self) -> None:
        if not self.shut:
            self.shut = True
            # on TLS a plain FIN, not close_notify: unwrap() would block
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
