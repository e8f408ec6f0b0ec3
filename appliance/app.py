"""Wiring and lifecycle of the daemon: data dir, identities, store, loop, extensions.

`build(config)` makes the daemon `module-ingest serve` runs (`.run()`); the tests'
daemons come from it too. `assemble(config)` is its core alone, for tests in process.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from appliance.auth.registry import Registry
from appliance.config import Config, ConfigError
from appliance.console.serial_port import install as install_console
from appliance.durable import make_dirs, write_atomic
from appliance.net.server import Server
from appliance.store import wal_dir
from appliance.store.wal import Store
from appliance.subscribers.manager import SubscriberManager
from appliance.telemetry import endpoint as stats_endpoint
from appliance.telemetry import gcwatch, logs, metrics
from hw import notify
from hw.fingerprint import fingerprint as read_fingerprint

log = logging.getLogger("appliance")

DEV_IDENTITY = "dev/core-0"
DEV_CHANNELS = range(1, 9)


def registry_path(data_dir: Path) -> Path:
    return data_dir / "identities.json"


def ensure_data_dir(data_dir: Path) -> None:
    """Create the data dir (durably) and make it 0700: it holds every secret and frame.

    ConfigError (one line) if it cannot be created or tightened, e.g. another user owns it.
    """
    try:
        make_dirs(data_dir, 0o700)
        if stat.S_IMODE(os.stat(data_dir).st_mode) != 0o700:
            os.chmod(data_dir, 0o700)
    except OSError as exc:
        raise ConfigError(
            f"storage.data_dir {data_dir}: cannot make it private (0700): {exc.strerror or exc}"
        ) from None


def ensure_dev_identity(config: Config, registry: Registry, out=sys.stdout) -> None:
    """On first start, create dev/core-0 and print its token once."""
    if not config.auth["dev_identity"] or registry.get(DEV_IDENTITY) is not None:
        return
    # the default MAC policy (hmac-sha256, blake2s): "none" is for identities that opt in
    token = registry.add(DEV_IDENTITY, "core", module="dev", channels=DEV_CHANNELS)
    creds = {
        "id": DEV_IDENTITY,
        "token": token,
        "channels": list(DEV_CHANNELS),
    }
    path = config.data_dir / "dev-credentials.json"
    write_atomic(path, (json.dumps(creds, indent=2) + "\n").encode())  # 0600
    print(
        f"development identity created: id {DEV_IDENTITY} token {token} (saved in {path})",
        file=out,
        flush=True,
    )


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one: every core is a file descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def open_store(config: Config) -> Store:
    """The store as configured, recovered and committing."""
    storage = config.storage
    store = Store(
        wal_dir(config.data_dir),
        **{key: storage[key] for key in STORE_KEYS},
    )
    store.open()
    log.info("store: recovered in %.3f s", store.recovery_seconds)
    return store


STORE_KEYS = (
    "segment_bytes",
    "ring_bytes",
    "commit_delay",
    "commit_max_bytes",
    "checkpoint_bytes",
    "checkpoint_seconds",
    "quota_bytes",
    "min_free_bytes",
    "retention_bytes",
    "retention_seconds",
    "overflow",
)


@dataclass
class Appliance:
    """A daemon, built: `run()` serves until SIGTERM; `close()` lets go of one never run.

    `assemble` makes the core (nothing listens yet), `build` the whole daemon."""

    config: Config
    registry: Registry
    store: Store
    server: Server
    addresses: list[tuple[str, int]] = field(default_factory=list)  # bound by `build`
    notifier: notify.Notifier | None = None
    collector: gcwatch.GcWatch | None = None

    def run(self) -> int:
        """Serve until SIGTERM / SIGINT; the exit code."""
        listening = ", ".join(f"{h}:{p}" for h, p in self.addresses)
        log.info(
            "listening on %s (data in %s, %d frames stored)",
            listening,
            self.config.data_dir,
            self.store.frames,
        )
        gcwatch.settle()
        if self.collector is not None:
            self.server.sweep_hooks.append(self.collector.tick)
        if self.notifier is not None:
            # READY=1: recovered and listening; where, for whoever started us on port 0
            self.notifier.ready(X_LISTEN=listening)
        return self.server.run()

    def close(self) -> None:
        """Release the server and the store of a daemon that will not run."""
        self.server.close()
        self.store.close()


def assemble(config: Config) -> Appliance:
    """The registry, the store and the server on them. Nothing listens yet and nothing
    process-wide (logging, signals, the collector) is touched, so a test can assemble
    one in its own process; `close()` it after."""
    registry = Registry(registry_path(config.data_dir))
    registry.load()
    ensure_dev_identity(config, registry)
    store = open_store(config)
    return Appliance(config, registry, store, Server(config, registry, store))


def build(config: Config, *, fingerprint: str | None = None) -> Appliance:
    """The daemon `serve` runs: the process set up, the core assembled, the listeners
    open, and the extensions (stats, subscribers, console, sd_notify) in the loop.

    `fingerprint` replaces the board's in the console (tests: a fixed one)."""
    ensure_data_dir(config.data_dir)  # first: the log file may live in it
    log_buffer = logs.setup(config)  # from here on every event is one structured line
    collector = gcwatch.install()
    limit = raise_fd_limit()
    if limit < config.server["max_connections"] + 64:  # listeners, segments, registry
        log.warning(
            "open-files limit %d is below server.max_connections %d; raise LimitNOFILE",
            limit,
            config.server["max_connections"],
        )
    daemon = assemble(config)
    server = daemon.server
    daemon.addresses = server.bind()
    server.handle_signals()
    subscribers = None
    if config.subscribers:
        subscribers = SubscriberManager(server, config, daemon.addresses[0])
    figures = metrics.Metrics(server, config, subscribers)
    stats_endpoint.install(server, config, figures)
    if subscribers is not None:
        subscribers.start()  # after the stats endpoint: its hooks run after the endpoint's
    if fingerprint is None:
        fingerprint = read_fingerprint()  # once: getmac can be slow, the console is in the loop
    install_console(
        server,
        config,
        stats=figures.text,
        log_lines=log_buffer.lines,
        fingerprint=lambda: fingerprint,
        subscribers=subscribers.describe if subscribers is not None else None,
    )
    daemon.notifier = notify.install(server, config)
    daemon.collector = collector
    return daemon
