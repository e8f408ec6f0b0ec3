"""Exponential backoff with jitter: the pause before trying again after a failure."""

from __future__ import annotations

import random


class Backoff:
    """Pauses from `base` doubling to at most `maximum`, each drawn in [half, whole] so
    that many boards cut off together do not come back in step."""

    def __init__(self, base: float, maximum: float) -> None:
        self.base = base
        self.maximum = maximum
        self._next = base

    def pause(self) -> float:
        """The pause before the next attempt; the one after it is twice as long."""
        delay = self._next
        self._next = min(self._next * 2, self.maximum)
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        """It worked: the next failure starts from `base` again."""
        self._next = self.base
