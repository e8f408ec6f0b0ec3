"""Inference latency per window: the p50/p99 the subscriber reports in `stats`, and the
measurement of a backend alone (`python -m appliance.subscribers.inference`)."""

from __future__ import annotations

import time
from collections.abc import Iterable

from appliance.subscribers.inference.backend import Backend, require_numpy
from appliance.telemetry.figures import percentile


def latency_summary(latencies_ms: Iterable[float]) -> dict[str, float]:
    values = sorted(latencies_ms)
    if not values:
        return {"windows": 0, "p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    return {
        "windows": len(values),
        "p50_ms": round(percentile(values, 50), 4),
        "p99_ms": round(percentile(values, 99), 4),
        "max_ms": round(values[-1], 4),
    }


def measure(backend: Backend, windows: int, seed: int = 1) -> dict[str, float]:
    """Run `windows` random inputs through `backend`, timed like the subscriber does."""
    np = require_numpy()
    rng = np.random.default_rng(seed)
    latencies = []
    for _ in range(windows):
        x = rng.normal(size=backend.input_shape).astype(backend.input_dtype)
        started = time.perf_counter_ns()
        backend.run(x)
        latencies.append((time.perf_counter_ns() - started) / 1e6)
    return latency_summary(latencies)
