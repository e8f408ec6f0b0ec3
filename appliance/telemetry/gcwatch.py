"""The garbage collector: kept off the ACK path, and its pauses measured (gc.callbacks).

A collection of the oldest generation walks every object that lives in it;
with 10,000 connections (session, decoder, MAC state each) that was an 80 ms
pause that every core's ACK waited behind, and connection storms (a restart,
a power blip) trigger such collections. So what survives a collection of the
middle generation is frozen (gc.freeze) on the loop's next tick: it lives as
long as its connection, is freed by reference counting when that closes
(nothing in a connection refers back to it), and no collection walks it
again. A cycle that became garbage after being frozen would stay; once an
hour everything is unfrozen and collected in one full pass, whose pause
these figures show too. They are in `stats` under process.gc.
"""

from __future__ import annotations

import gc
import time
from typing import Any

FULL_EVERY = 3600.0  # seconds between full collections of everything, frozen objects included


class GcWatch:
    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.pause_total = 0.0
        self.pause_max = 0.0
        self.promoted = False  # objects reached the oldest generation since the last freeze
        self.full_at = time.monotonic() + FULL_EVERY
        self._started = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        generation = info["generation"]
        self.collections[generation] += 1
        self.promoted |= generation >= 1
        self.pause_total += pause
        self.pause_max = max(self.pause_max, pause)

    def tick(self, now: float) -> None:
        """On the loop's tick: freeze what the last collections promoted; now and then,
        collect everything."""
        if now >= self.full_at:
            self.full_at = now + FULL_EVERY
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            self.promoted = False
        elif self.promoted:
            gc.freeze()
            self.promoted = False

    def figures(self) -> dict[str, Any]:
        return {
            "collections": list(self.collections),
            "pause_max_ms": round(self.pause_max * 1000, 3),
            "pause_total_ms": round(self.pause_total * 1000, 3),
        }


_watch: GcWatch | None = None


def install() -> GcWatch:
    """Watch the collector from now on (once per process)."""
    global _watch
    if _watch is None:
        _watch = GcWatch()
        gc.callbacks.append(_watch)
    return _watch


def settle() -> None:
    """After start-up: what exists now lives as long as the daemon, so no collection
    needs to walk it again."""
    gc.collect()
    gc.freeze()


def figures() -> dict[str, Any] | None:
    return _watch.figures() if _watch is not None else None
