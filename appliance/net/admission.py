"""Admission: how many connections may sit in the handshake, overall and per source.

A connection costs the daemon memory and a slot from the moment it is
accepted, before it has proved anything. Handshakes are quick for an honest
core (CHALLENGE, HELLO, WELCOME: one round trip), so a connection still in
the handshake when the slots run out is the one to let go: the oldest of its
source when one address holds too many; else the oldest of all, once it has
had GRACE to send its HELLO. A HELLO may already be waiting in its socket
(in a herd of cores reconnecting after a restart the loop is busy): the loop
looks first and answers it instead. When every slot holds a younger one, the
loop stops accepting for a moment: the kernel's listen queue holds the
newcomers while the loop answers the HELLOs it has. A flood of idle or slow
handshakes then keeps an honest core out for about GRACE at most, and holds
at most `max_handshakes` sessions in memory.

Owner: the loop thread.
"""

from __future__ import annotations

from appliance.net.connection import Connection

GRACE = 0.25  # seconds an unproven connection has before a newcomer may push it out


class Admission:
    def __init__(self, max_handshakes: int, max_per_source: int) -> None:
        self.max_handshakes = max_handshakes
        self.max_per_source = max_per_source
        # insertion-ordered: the oldest handshake first
        self._all: dict[Connection, None] = {}
        self._by_source: dict[str, dict[Connection, None]] = {}

    def __len__(self) -> int:
        return len(self._all)

    def full(self) -> bool:
        return len(self._all) >= self.max_handshakes

    def evictable(self, now: float) -> Connection | None:
        """The connection to push out to make room for a new one: the oldest in the
        handshake, if it has had its GRACE; None if there is none such."""
        oldest = next(iter(self._all), None)
        if oldest is None or now - oldest.born < GRACE:
            return None
        return oldest

    def admit(self, conn: Connection) -> Connection | None:
        """Count a new connection into the handshake (room was made for it); the one of
        its own source it pushes out (to close), if that source holds too many."""
        mine = self._by_source.setdefault(conn.source, {})
        old = next(iter(mine)) if len(mine) >= self.max_per_source else None
        if old is not None:
            self.leave(old)
        self._all[conn] = None
        mine[conn] = None
        return old

    def leave(self, conn: Connection) -> None:
        """The connection left the handshake (welcomed, failed or closed)."""
        if conn not in self._all:
            return
        del self._all[conn]
        mine = self._by_source[conn.source]
        del mine[conn]
        if not mine:
            del self._by_source[conn.source]
