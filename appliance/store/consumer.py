"""The consumer loop shared by `module-ingest worker` and the subscriber processes.

A consumer reads the segment files from its cursor (`NAME.cursor` beside the
segments, so the daemon's retention keeps what it has not read), hands each
batch on, and commits the cursor only after the batch was handled: data
first, then the pointer. Delivery is at least once: a crash between handling
and commit delivers the batch again; (id, seq) identifies a frame. One
consumer per cursor (a lock file), and SIGTERM / SIGINT finish the batch in
hand, commit and stop.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from appliance.errors import EXIT_CLEAN, EXIT_DAMAGED, ToolError
from appliance.store import meta
from appliance.store.cursor import Cursor
from appliance.store.segment import Record, json_line, segment_name

log = logging.getLogger("appliance.tools")

RETRY_MAX = 30.0  # longest pause before a failed batch is tried again
READ_ATTEMPTS = 5  # --once gives up after this many failed reads in a row

Handler = Callable[[list[Record]], bool | tuple[int, int]]
IDLE_FLUSH = 1.0  # seconds between idle calls of a consumer that holds records


@contextlib.contextmanager
def cursor_lock(directory: Path, name: str):
    """One worker per cursor: two would deliver the same frames and move it backwards."""
    path = directory / f"{name}{meta.CURSOR_SUFFIX}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise ToolError(f"worker: {path}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ToolError(f"worker: cursor {name} is in use by another worker") from None
        yield
    finally:
        os.close(fd)  # the lock goes with it; the file stays (removing it would race)


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event):
    """SIGTERM and SIGINT set `stop`: the worker finishes its batch, commits and exits."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in saved:
        signal.signal(sig, lambda _signum, _frame: stop.set())
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def run_consumer(
    cursor: Cursor,
    handle: Handler,
    stop: threading.Event,
    *,
    batch: int,
    poll: float,
    once: bool,
    idle: Callable[[], tuple[int, int] | bool | None] | None = None,
) -> int:
    """Read, hand on, commit, until stopped. A handler may return a (segment, offset)
    instead of True: it handled the batch but still holds the records from there on
    (a subscriber gathering a larger object), so the cursor commits only up to there.
    `idle`, called about once a second while there is nothing new, flushes such held
    records and answers the same way (None: nothing held any more)."""
    delivered = batches = errors = 0
    idle_at = time.monotonic()
    status = EXIT_CLEAN
    log.info("worker %s: reading from %s", cursor.name, list(cursor.position))
    while not stop.is_set():
        try:
            records = cursor.read(batch)
            errors = 0
        except (OSError, ValueError) as exc:
            # e.g. a segment the daemon is creating this moment (still empty)
            errors += 1
            cursor.position = cursor.committed  # what was read before the error comes again
            if once and errors >= READ_ATTEMPTS:
                raise ToolError(f"worker: cannot read the store: {exc}") from None
            log.warning("worker %s: reading: %s; trying again", cursor.name, exc)
            stop.wait(poll)
            continue
        if not records:
            if once:
                break
            if idle is not None and time.monotonic() - idle_at >= IDLE_FLUSH:
                idle_at = time.monotonic()
                held = idle()  # False: it failed, commit nothing
                if held is None:
                    cursor.commit()
                elif held:
                    cursor.commit_at(held)
            stop.wait(poll)
            continue
        # The cursor will point past these records, so they must be on flash before
        # anyone sees them: the daemon may not have finished its fdatasync yet.
        sync_segments(cursor.directory, sorted({rec.segment for rec in records}))
        result = _handle(cursor.name, handle, records, stop, poll=poll, once=once)
        if not result:
            status = EXIT_DAMAGED if once else EXIT_CLEAN  # stopping: it comes again next time
            break
        if isinstance(result, tuple):
            cursor.commit_at(result)
        else:
            cursor.commit()
        delivered += len(records)
        batches += 1
        if once and len(records) < batch:
            break  # caught up
    summary = {
        "cursor": cursor.name,
        "delivered": delivered,
        "batches": batches,
        "position": list(cursor.committed or cursor.position),
    }
    sys.stdout.write(json_line(summary))
    sys.stdout.flush()
    return status


def _handle(
    name: str, handle: Handler, records: list[Record], stop: threading.Event, *, poll, once
) -> bool | tuple[int, int]:
    """Hand a batch on until it is handled (the handler's answer); False with --once or
    when stopping."""
    where = f"{records[0].segment}:{records[0].offset}"
    pause = poll
    while not (result := handle(records)):
        if once:
            log.error("worker %s: batch at %s not handled; not committed", name, where)
            return False
        log.error("worker %s: batch at %s not handled; trying again in %.1f s", name, where, pause)
        if stop.wait(pause):
            return False
        pause = min(pause * 2, RETRY_MAX)
    return result


def sync_segments(directory: Path, numbers: Iterable[int]) -> None:
    """Make segments durable before a cursor points past what was read in them: the
    daemon may not have finished its fdatasync of the newest records yet."""
    for number in numbers:
        try:
            fd = os.open(directory / segment_name(number), os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
