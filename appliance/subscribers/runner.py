"""One subscriber in its own process: `module-ingest subscriber NAME`.

The daemon starts it (manager.py); it reads the log through the cursor
`sub-NAME` like `module-ingest worker` does, hands each batch (filtered by the
table's `channels` and `identities`) to the subscriber, and commits the cursor
only after `handle`, `flush` and any published frames' ACKs: data first, then
the pointer. A batch whose handling raised comes again after a pause. Being a
process, a subscriber's CPU and its bugs stay out of the ingest loop.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from importlib.metadata import entry_points
from pathlib import Path

from appliance.children import die_with_parent
from appliance.client import Client
from appliance.config import Config, parse_address
from appliance.store import wal_dir
from appliance.store.cursor import Cursor
from appliance.store.segment import Record
from appliance.store.tools import ToolError, cursor_lock, run_consumer, stop_on_signals
from appliance.subscribers.base import ENTRY_POINT_GROUP, Context, Subscriber

log = logging.getLogger("appliance.subscribers")

BUILTIN = {
    "archive": "appliance.subscribers.archive:ArchiveSubscriber",
    "index": "appliance.subscribers.index:IndexSubscriber",
    "inference": "appliance.subscribers.inference:InferenceSubscriber",
    "cloud": "appliance.subscribers.cloud:CloudSubscriber",
}
# keys of a [subscribers.NAME] table that the runner uses; the rest are the options
RUNNER_KEYS = ("type", "channels", "identities", "batch", "poll")
ENV_CONNECT = "MODULE_INGEST_SUBSCRIBER_CONNECT"  # set by the manager: where the daemon listens
ENV_TOKEN = "MODULE_INGEST_SUBSCRIBER_TOKEN"  # the token of identity subscriber/NAME
ENV_PARENT = "MODULE_INGEST_SUBSCRIBER_PARENT"  # the daemon's pid: the process dies with it


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


class Publisher:
    """Derived frames (inference results) go back into the store through the daemon,
    as identity subscriber/NAME over MIP: durable once `flush` returned."""

    def __init__(self, name: str) -> None:
        address = parse_address(os.environ[ENV_CONNECT])
        self.client = Client(address.host, address.port, identity_name(name), os.environ[ENV_TOKEN])
        self.client.connect()

    def publish(self, channel: int, payload: bytes, ts_ns: int) -> None:
        self.client.send(channel, payload, ts_ns)

    def flush(self) -> None:
        self.client.flush()
        if self.client.rejected:
            seq, code, message = self.client.rejected[0]
            raise RuntimeError(f"derived frame {seq} refused: {code} {message}")

    def close(self) -> None:
        self.client.close()


def build(
    name: str, config: Config, stopping: threading.Event
) -> tuple[Subscriber, Publisher | None]:
    table = config.subscribers.get(name)
    if table is None:
        raise ToolError(f"subscriber: no [subscribers.{name}] in {config.source}")
    cls = load_class(table["type"])
    state_dir = Path(config.data_dir) / "subscribers" / name
    state_dir.mkdir(parents=True, exist_ok=True)
    publisher = Publisher(name) if os.environ.get(ENV_TOKEN) else None
    context = Context(
        name=name,
        data_dir=Path(config.data_dir),
        state_dir=state_dir,
        config=config,
        publish=publisher.publish if publisher else None,
        options={k: v for k, v in table.items() if k not in RUNNER_KEYS},
        stopping=stopping,
    )
    try:
        return cls(context), publisher
    except ValueError as exc:  # a bad option: one line, and the manager's backoff
        raise ToolError(f"subscriber {name}: {exc}") from None


def handler(sub: Subscriber, table: dict, publisher: Publisher | None):
    channels = frozenset(table.get("channels", ()))
    identities = frozenset(table.get("identities", ()))

    def flush() -> tuple[int, int] | None:
        held = sub.flush()
        if publisher is not None:
            publisher.flush()
        return held

    def handle(records: list[Record]) -> bool | tuple[int, int]:
        chosen = [
            r
            for r in records
            if (not channels or r.channel in channels)
            and (not identities or r.identity in identities)
        ]
        try:
            if chosen:
                sub.handle(chosen)
            held = flush()
        except Exception:
            log.exception("subscriber %s: batch failed; it comes again", sub.name)
            return False
        return True if held is None else held

    def idle() -> tuple[int, int] | bool | None:
        try:
            return flush()
        except Exception:
            log.exception("subscriber %s: flush failed; trying again later", sub.name)
            return False

    return handle, idle


def cmd_subscriber(args, config: Config) -> int:
    if ENV_PARENT in os.environ:  # started by the daemon (by hand it runs on its own)
        die_with_parent(int(os.environ[ENV_PARENT]))
    name = args.name
    directory = wal_dir(config.data_dir)
    stop = threading.Event()
    sub, publisher = build(name, config, stop)
    table = config.subscribers[name]
    handle, idle = handler(sub, table, publisher)
    try:
        with stop_on_signals(stop), cursor_lock(directory, cursor_name(name)):
            cursor = Cursor(directory, cursor_name(name))
            return run_consumer(
                cursor,
                handle,
                stop,
                idle=idle,
                batch=int(table.get("batch", 1000)),
                poll=float(table.get("poll", 0.05)),
                once=False,
            )
    finally:
        sub.close()
        if publisher is not None:
            publisher.close()


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "subscriber", help="run one configured subscriber (the daemon starts these itself)"
    )
    p.add_argument("name")
    p.set_defaults(func=cmd_subscriber)
