"""How module-ingest computes and writes its figures: one percentile, one duration.

The stats snapshot, the console, the inference subscriber and the load scripts
(scripts/flood, scripts/fleet, the benches) all call these, so a p99 from one is
comparable with a p99 from another. Standard library only: the scripts import
this module on machines without the daemon's dependencies (psutil).
"""

from __future__ import annotations

import math


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile `p` (0-100) of sorted `values`: the smallest value with
    at least p% of the values at or below it, always one of them; None when empty."""
    if not values:
        return None
    rank = max(1, math.ceil(p / 100 * len(values)))
    return values[min(rank, len(values)) - 1]


def duration(seconds: float) -> str:
    """Whole seconds as HH:MM:SS, with the days in front once there are any ("2d 03:04:05")."""
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    text = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text
