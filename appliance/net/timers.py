"""Connection deadlines (handshake, idle, linger) in one heap.

Owner: the loop thread. The loop only ever looks at connections whose
deadline has come, never at all of them. A connection has one current
deadline (`Connection.deadline`); setting a new one pushes a new entry, and
entries of an earlier deadline are skipped when they come up (the heap is
rebuilt when such stale entries outnumber the connections, so it stays
bounded). The idle timeout is checked lazily: a read only stores the time of
the last valid frame, and the loop re-arms the deadline when it comes.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

from appliance.net.connection import Connection


class Deadlines:
    def __init__(self, conns: dict[int, Connection]) -> None:
        self._conns = conns  # the loop's open connections, by fd
        self._heap: list[tuple[float, int, int]] = []  # (deadline, serial, fd)

    def arm(self, conn: Connection) -> None:
        """Make the connection's current deadline fire."""
        heapq.heappush(self._heap, (conn.deadline, conn.serial, conn.fd))
        if len(self._heap) > 2 * len(self._conns) + 1024:
            self._heap = [t for t in self._heap if self._current(t) is not None]
            heapq.heapify(self._heap)

    def next(self) -> float | None:
        """When the earliest entry is due (it may be a stale one)."""
        return self._heap[0][0] if self._heap else None

    def due(self, now: float) -> Iterator[Connection]:
        """The connections whose current deadline has come, earliest first."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            conn = self._current(heapq.heappop(heap))
            if conn is not None:
                yield conn

    def _current(self, entry: tuple[float, int, int]) -> Connection | None:
        when, serial, fd = entry
        conn = self._conns.get(fd)
        if conn is None or conn.serial != serial or conn.deadline != when:
            return None
        return conn
