"""telemetry/throttle.py: at most one line per interval, with the count of the rest."""

from __future__ import annotations

import logging

from appliance.telemetry.throttle import Throttled


def test_one_line_per_interval_with_a_count_of_what_was_left_out(caplog):
    caplog.set_level(logging.INFO)
    now = [100.0]
    throttled = Throttled(logging.getLogger("appliance.test"), every=1.0, clock=lambda: now[0])
    for i in range(5):
        throttled(logging.INFO, "bad thing %d", i)
    now[0] += 0.5
    throttled(logging.INFO, "bad thing %d", 5)
    now[0] += 0.6
    throttled(logging.INFO, "bad thing %d", 6)
    now[0] += 5
    throttled(logging.INFO, "bad thing %d", 7)
    assert [r.getMessage() for r in caplog.records] == [
        "bad thing 0",
        "bad thing 6 (and 5 more since the last line)",
        "bad thing 7",
    ]
