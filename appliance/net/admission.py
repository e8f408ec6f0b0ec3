"""Admission: how many connections may sit in the handshake, overall and per source.

A connection costs the daemon memory and a slot from the moment it is
accepted, before it has proved anything. Handshakes are quick for an honest
core (CHALLENGE, HELLO, WELCOME: one round trip), so a connection that is
still in the handshake when the slots run out is the one to let go: the
oldest of its source when one address holds too many, else the oldest of
all. A flood of idle or slow handshakes then keeps an honest core out for
at most a moment, and holds at most `max_handshakes` sessions in memory.

Owner: the loop thread.
"""

from __future__ import annotations

from appliance.net.connection import Connection


class Admission:
    def __init__(self, max_handshakes: int, max_per_source: int) -> None:
        self.max_handshakes = max_handshakes
        self.max_per_source = max_per_source
        # insertion-ordered: the oldest handshake first
        self._all: dict[Connection, None] = {}
        self._by_source: dict[str, dict[Connection, None]] = {}

    def __len__(self) -> int:
        return len(self._all)

    def admit(self, conn: Connection) -> list[Connection]:
        """Count a new connection into the handshake; the ones it pushes out (to close)."""
        evict = []
        mine = self._by_source.setdefault(conn.source, {})
        if len(mine) >= self.max_per_source:
            evict.append(next(iter(mine)))
        elif len(self._all) >= self.max_handshakes:
            evict.append(next(iter(self._all)))
        for old in evict:
            self.leave(old)
        self._all[conn] = None
        mine[conn] = None
        return evict

    def oldest(self) -> Connection | None:
        """The connection longest in the handshake (to make room for a new one)."""
        return next(iter(self._all), None)

    def leave(self, conn: Connection) -> None:
        """The connection left the handshake (welcomed, failed or closed)."""
        if conn not in self._all:
            return
        del self._all[conn]
        mine = self._by_source[conn.source]
        del mine[conn]
        if not mine:
            del self._by_source[conn.source]
