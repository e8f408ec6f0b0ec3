"""The subscriber plug-in interface.

A subscriber is one class in one module:

    from appliance.subscribers.base import Subscriber

    class Printer(Subscriber):
        def handle(self, records):
            for rec in records:
                print(rec.identity, rec.channel, rec.seq, rec.payload)

declared in the config as

    [subscribers.print]
    type = "mypackage.printer:Printer"   # or a built-in name, or an entry point name
    channels = [1, 2]                    # optional filters
    identities = ["m-0007/core-2"]
    anything_else = "goes to options"   # checked against Printer.OPTIONS at daemon start

and loaded by the daemon, which runs it in a child process (`module-ingest
subscriber NAME`) that reads the log through the cursor `sub-NAME`. The
process hands it batches of records in log order; when `handle` returns, the
batch counts as done and the cursor moves past it (after `flush`); when it
raises, the batch comes again after a pause. Delivery is at least once:
(identity, seq) names a frame, so a subscriber that must not double-count
deduplicates on it. A subscriber that dies is restarted with backoff; a slow
one only falls behind (its lag is in `module-ingest stats`), it never slows
ingestion. Third-party subscribers can also register under the entry-point
group `module_ingest.subscribers`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from appliance.config import Spec, check_table
from appliance.store.segment import Record

ENTRY_POINT_GROUP = "module_ingest.subscribers"


@dataclass
class Context:
    """What a subscriber gets from the process that runs it."""

    name: str
    data_dir: Path  # the daemon's data dir; keep own files under state_dir
    state_dir: Path  # data_dir / "subscribers" / name, created for it
    config: Any  # the daemon's appliance.config.Config
    # publish(channel, payload, ts_ns): store a derived frame (inference results) through
    # the daemon, as identity "subscriber/NAME"; durable once flush() returned
    publish: Callable[[int, bytes, int], None] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    # flush() may return the (segment, offset) of the first record it still holds
    # (gathering a larger object); the cursor then commits only up to there, and
    # flush() is also called about once a second while nothing new arrives
    partial_commit: bool = True
    stopping: threading.Event | None = None  # set when the process is asked to stop
    config_dir: Path = field(default_factory=Path.cwd)  # relative paths in options start here


class Subscriber:
    """Base class: override `handle`; `flush` and `close` when there is state to keep."""

    # The table's own keys (besides the runner's: type, channels, identities, batch, poll):
    # key -> (type, default, lower bound) as in appliance/config.py, config.REQUIRED for a
    # key that must be given. The daemon checks every table against it when it starts and
    # refuses a bad one in one line; `options` then holds every key, defaults filled in.
    # None: the plug-in checks its options itself, in __init__.
    OPTIONS: ClassVar[dict[str, Spec] | None] = None
    CHOICES: ClassVar[dict[str, tuple]] = {}  # key -> the values it may take

    @classmethod
    def check(cls, options: dict[str, Any], config_dir: Path) -> None:
        """Checks beyond types and bounds, made at daemon start (a file that must exist):
        raise appliance.config.OptionError(key, why)."""

    def stats(self) -> dict[str, Any]:
        """Counters and state for `module-ingest stats` (JSON-able, no secrets)."""
        return {}

    def __init__(self, context: Context) -> None:
        self.context = context
        self.name = context.name
        self.options = context.options
        if self.OPTIONS is not None:  # checked at start already; here for the defaults
            where = getattr(context.config, "path", None) or "options"
            table = f"subscribers.{self.name}"
            self.options = check_table(table, context.options, self.OPTIONS, where, self.CHOICES)

    def handle(self, records: list[Record]) -> None:
        """Process one batch (log order, already filtered). Raise to have it redelivered."""
        raise NotImplementedError

    def flush(self) -> tuple[int, int] | None:
        """Make everything handled so far durable or delivered: the cursor moves next.
        Return the (segment, offset) of the first record still held, if any."""

    def close(self) -> None:
        """The process stops (after a flush)."""
