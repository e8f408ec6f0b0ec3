"""A log line that may repeat at a peer's whim, at most once per interval, with a count.

What a remote peer can cause as often as it likes (a failed handshake, a
garbage connection) must not cost log volume in proportion: one line per
interval says what happened last and how often since the previous line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class Throttled:
    def __init__(
        self,
        logger: logging.Logger,
        every: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.every = every
        self.clock = clock
        self._count = 0
        self._at = -every

    def __call__(self, level: int, message: str, *args: object) -> None:
        self._count += 1
        now = self.clock()
        if now - self._at < self.every:
            return
        more = self._count - 1
        if more:
            message += f" (and {more} more since the last line)"
        self.logger.log(level, message, *args)
        self._count = 0
        self._at = now
