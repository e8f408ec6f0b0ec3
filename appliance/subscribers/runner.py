"""One subscriber in its own process: `module-ingest subscriber NAME`.

The daemon starts it (manager.py); it reads the log through the cursor
`sub-NAME` (reader.py), hands each batch (filtered by the table's `channels`
and `identities`) to the subscriber, and commits the cursor only after `handle`,
`flush` and any published frames' ACKs: data first, then the pointer. A batch
whose handling raised comes again after a pause (exponential, with jitter). Being
a process, a subscriber's CPU and its bugs stay out of the ingest loop.

It logs like the daemon (log.format, log.level, log.file; each line carries
subscriber=NAME), one line per failure (the traceback at debug level only), and
sends the daemon a status line about once a second (records, failures, the last
error, the subscriber's own `stats()`) for `module-ingest stats`.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import threading
import time
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from appliance.children import die_with_parent
from appliance.client import Client
from appliance.config import (
    SUBSCRIBER_KEYS,
    Config,
    ConfigError,
    OptionError,
    check_table,
    parse_address,
)
from appliance.durable import make_dirs
from appliance.errors import ToolError
from appliance.store import wal_dir
from appliance.store.consumer import cursor_lock, stop_on_signals, sync_segments
from appliance.store.cursor import Cursor
from appliance.store.segment import Record
from appliance.subscribers.backoff import Backoff
from appliance.subscribers.base import ENTRY_POINT_GROUP, Context, Subscriber
from appliance.subscribers.reader import LogReader
from appliance.telemetry import logs

log = logging.getLogger("appliance.subscribers")

BUILTIN = {
    "archive": "appliance.subscribers.archive.subscriber:ArchiveSubscriber",
    "index": "appliance.subscribers.index:IndexSubscriber",
    "inference": "appliance.subscribers.inference.subscriber:InferenceSubscriber",
    "cloud": "appliance.subscribers.cloud:CloudSubscriber",
    "mqtt": "appliance.subscribers.mqtt:MqttSubscriber",
}
ENV_CONNECT = "MODULE_INGEST_SUBSCRIBER_CONNECT"  # set by the manager: where the daemon listens
ENV_TOKEN = "MODULE_INGEST_SUBSCRIBER_TOKEN"  # the token of identity subscriber/NAME
ENV_PARENT = "MODULE_INGEST_SUBSCRIBER_PARENT"  # the daemon's pid: the process dies with it
ENV_STATUS_FD = "MODULE_INGEST_SUBSCRIBER_STATUS_FD"  # a pipe to the manager: status lines
IDLE_FLUSH = 1.0  # seconds between flushes while nothing new arrives (held records age)
STATUS_EVERY = 1.0  # seconds between status lines
RETRY = (0.5, 60.0)  # first and longest pause before a failed batch comes again


def cursor_name(name: str) -> str:
    return f"sub-{name}"


def identity_name(name: str) -> str:
    return f"subscriber/{name}"


def load_class(kind: str) -> type[Subscriber]:
    """A built-in name, an entry point of module_ingest.subscribers, or "module:Class"."""
    target = BUILTIN.get(kind)
    if target is None:
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == kind]
        if found:
            return found[0].load()
        target = kind
    module, _, attr = target.partition(":")
    if not attr:
        raise ToolError(f"unknown subscriber type {kind!r} (built-in: {', '.join(BUILTIN)})")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ToolError(f"subscriber type {kind!r}: {exc}") from None


def config_dir(config: Config) -> Path:
    """Where relative paths in subscriber options start: the config file's folder."""
    return Path(config.path).resolve().parent if config.path else Path.cwd()


def check_subscriber(config: Config, name: str) -> tuple[type[Subscriber], dict[str, Any]]:
    """The class of [subscribers.NAME] and its options, checked against the schema the
    class declares; ConfigError naming the table, the key and the file."""
    table = config.subscribers.get(name)
    where = config.path or config.source
    if table is None:
        raise ConfigError(f"{where}: no [subscribers.{name}]")
    try:
        cls = load_class(table["type"])
    except ToolError as exc:
        raise ConfigError(f"{where}: subscribers.{name}.type: {exc}") from None
    raw = {k: v for k, v in table.items() if k not in SUBSCRIBER_KEYS}
    if cls.OPTIONS is None:  # a plug-in that checks its options itself
        return cls, raw
    options = check_table(f"subscribers.{name}", raw, cls.OPTIONS, where, cls.CHOICES)
    try:
        cls.check(options, config_dir(config))
    except OptionError as exc:
        raise ConfigError(f"{where}: subscribers.{name}.{exc.key}: {exc}") from None
    return cls, options


def check_subscribers(config: Config) -> None:
    """Every [subscribers.NAME] table, as the daemon does when it starts."""
    for name in config.subscribers:
        check_subscriber(config, name)


class Publisher:
    """Derived frames (inference results) go back into the store through the daemon,
    as identity subscriber/NAME over MIP: gathered, sent together by `flush` (one write,
    one wait for the ACK), durable once it returned."""

    def __init__(self, name: str) -> None:
        address = parse_address(os.environ[ENV_CONNECT])
        self.client = Client(address.host, address.port, identity_name(name), os.environ[ENV_TOKEN])
        self.client.connect()
        self.gathered: list[tuple[int, bytes, int]] = []  # at most one batch's results

    def publish(self, channel: int, payload: bytes, ts_ns: int) -> None:
        self.gathered.append((channel, payload, ts_ns))

    def flush(self) -> None:
        if self.gathered:
            frames, self.gathered = self.gathered, []  # the client keeps them until ACKed
            self.client.send_many(frames)
        self.client.flush()
        if self.client.rejected:
            seq, code, message = self.client.rejected[0]
            raise RuntimeError(f"derived frame {seq} refused: {code} {message}")

    def close(self) -> None:
        self.client.close()


def build(
    name: str, config: Config, stopping: threading.Event
) -> tuple[Subscriber, Publisher | None]:
    cls, options = check_subscriber(config, name)
    state_dir = Path(config.data_dir) / "subscribers" / name
    make_dirs(state_dir)  # 0700, and its entry durable before anything is kept in it
    publisher = Publisher(name) if os.environ.get(ENV_TOKEN) else None
    context = Context(
        name=name,
        data_dir=Path(config.data_dir),
        state_dir=state_dir,
        config=config,
        publish=publisher.publish if publisher else None,
        options=options,
        stopping=stopping,
        config_dir=config_dir(config),
    )
    try:
        return cls(context), publisher
    except ValueError as exc:  # a bad option a plug-in found itself: one line
        if publisher is not None:
            publisher.close()
        raise ToolError(f"subscriber {name}: {exc}") from None


class Status:
    """What the process tells the manager: one JSON line about once a second on the pipe
    the manager gave it, from a thread of its own, so it goes on while a subscriber waits
    (for a broker, say). A line that finds the pipe full is dropped: the next says it all."""

    def __init__(self, sub: Subscriber) -> None:
        self.sub = sub
        fd = os.environ.get(ENV_STATUS_FD)
        self.fd = int(fd) if fd and fd.isdigit() else None
        self.records = 0  # handed to the subscriber and committed
        self.batches = 0
        self.failures = 0  # batches or flushes that raised
        self.failing = False  # the last attempt raised
        self.last_error: str | None = None
        self.last_error_time: float | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.fd is None:
            return
        os.set_blocking(self.fd, False)
        self._thread = threading.Thread(target=self._run, name="status", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Send the last line and end the thread."""
        if self._thread is not None:
            self._done.set()
            self._thread.join()
            self._thread = None

    def failed(self, what: str, exc: BaseException) -> None:
        self.failures += 1
        self.failing = True
        self.last_error = f"{what}: {exc}"
        self.last_error_time = round(time.time(), 3)

    def _run(self) -> None:
        while not self._done.wait(STATUS_EVERY):
            self._send()
        self._send()

    def _send(self) -> None:
        try:
            own = self.sub.stats()
        except Exception as exc:  # a plug-in's stats must not stop its delivery
            own = {"stats_error": str(exc)}
        times = os.times()
        line = {
            "cpu_seconds": round(times.user + times.system, 3),  # this process's, so far
            "records": self.records,
            "batches": self.batches,
            "failures": self.failures,
            "failing": self.failing,
            "last_error": self.last_error,
            "last_error_time": self.last_error_time,
            **own,  # a subscriber that retries by itself reports its own failing, last_error
        }
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(self.fd, json.dumps(line, default=str).encode() + b"\n")


class Runner:
    """The read, hand on, commit loop of one subscriber process."""

    def __init__(
        self,
        sub: Subscriber,
        table: dict[str, Any],
        cursor: Cursor,
        publisher: Publisher | None,
        stop: threading.Event,
    ) -> None:
        self.sub = sub
        self.cursor = cursor
        self.publisher = publisher
        self.stop = stop
        self.reader = LogReader(cursor, table["channels"], table["identities"])
        self.batch = table["batch"]
        self.poll = table["poll"]
        self.status = Status(sub)
        self.retry = Backoff(*RETRY)
        self.retry_at = 0.0  # after a failure: no attempt (batch or idle flush) before this

    def run(self) -> None:
        idle_at = time.monotonic()
        log.info("subscriber %s: reading from %s", self.sub.name, list(self.cursor.position))
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                start = self.cursor.position
                try:
                    records, moved = self.reader.read(self.batch)
                except (OSError, ValueError) as exc:
                    # e.g. a segment the daemon is creating this moment (still empty)
                    self.cursor.position = start
                    log.warning("subscriber %s: reading the log: %s", self.sub.name, exc)
                    self.stop.wait(self.poll)
                    continue
                if not moved:
                    if now - idle_at >= IDLE_FLUSH and now >= self.retry_at:
                        idle_at = now
                        self._attempt("flush", self._flush)
                    self.stop.wait(self.poll)
                    continue
                self._sync(start[0], self.cursor.position[0])
                if not self._deliver(records, start):
                    return  # stopping: the batch was not handled; it comes again next start
                idle_at = time.monotonic()
        finally:
            self.reader.close()

    def _deliver(self, records: list[Record], start: tuple[int, int]) -> bool:
        """Hand on the kept records of what was read from `start` (maybe none), flush,
        commit; after a failure the same again, after a pause. False: stopping."""

        def handle() -> bool:
            if records:
                self.sub.handle(records)
            return self._flush()

        while True:
            wait = self.retry_at - time.monotonic()
            if wait > 0 and self.stop.wait(wait):
                self.cursor.position = start
                return False
            if self._attempt("batch", handle):
                break
        self.status.records += len(records)
        self.status.batches += 1
        return True

    def _flush(self) -> bool:
        """Flush the subscriber and the published frames, then commit what it no longer holds."""
        held = self.sub.flush()
        if self.publisher is not None:
            self.publisher.flush()
        if held is None:
            self.cursor.commit()
        else:
            self.cursor.commit_at(held)
        return True

    def _attempt(self, what: str, action) -> bool:
        """Run `action`. A failure is one log line (the traceback at debug level) and no
        attempt of anything before a pause, exponential with jitter: False."""
        try:
            done = action()
        except Exception as exc:
            self.status.failed(what, exc)
            pause = self.retry.pause()
            self.retry_at = time.monotonic() + pause
            log.error(
                "subscriber %s: %s failed: %s; trying again in %.1f s",
                self.sub.name, what, exc, pause,
            )  # fmt: skip
            log.debug("subscriber %s: %s failed", self.sub.name, what, exc_info=True)
            return False
        self.status.failing = False
        self.retry.reset()
        return done

    def _sync(self, first: int, last: int) -> None:
        sync_segments(self.cursor.directory, range(first, last + 1))


def cmd_subscriber(args, config: Config) -> int:
    if ENV_PARENT in os.environ:  # started by the daemon (by hand it runs on its own)
        die_with_parent(int(os.environ[ENV_PARENT]))
    name = args.name
    os.umask(0o077)  # whatever a subscriber creates (SQLite files too) is its own: 0600
    # below the daemon: when the CPU is short, ingestion goes first and subscribers fall
    # behind (the log keeps what they have not read) instead of slowing the cores' ACKs
    os.nice(config.subscribers[name]["nice"] if name in config.subscribers else 0)
    logs.setup(config, child={"subscriber": name})
    directory = wal_dir(config.data_dir)
    stop = threading.Event()
    sub, publisher = build(name, config, stop)
    try:
        with stop_on_signals(stop), cursor_lock(directory, cursor_name(name)):
            cursor = Cursor(directory, cursor_name(name))
            runner = Runner(sub, config.subscribers[name], cursor, publisher, stop)
            runner.status.start()
            try:
                runner.run()
            finally:
                runner.status.stop()
        return 0
    finally:
        sub.close()
        if publisher is not None:
            publisher.close()
        log.info("subscriber %s: stopped", name)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "subscriber", help="run one configured subscriber (the daemon starts these itself)"
    )
    p.add_argument("name")
    p.set_defaults(func=cmd_subscriber)
