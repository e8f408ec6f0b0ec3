"""Wiring and lifecycle of the daemon: data dir, identities, store, loop."""

from __future__ import annotations

import json
import logging
import os
import resource
import stat
import sys
from pathlib import Path

from appliance.auth.registry import Registry
from appliance.config import Config, ConfigError
from appliance.console.serial_port import install as install_console
from appliance.durable import make_dirs, write_atomic
from appliance.net.server import Server
from appliance.store import wal_dir
from appliance.store.wal import Store
from appliance.subscribers.manager import install as install_subscribers
from appliance.telemetry import endpoint as stats_endpoint
from appliance.telemetry import gcwatch, logs, metrics
from hw import notify
from hw.fingerprint import fingerprint

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


def serve(config: Config) -> int:
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
    registry = Registry(registry_path(config.data_dir))
    registry.load()
    ensure_dev_identity(config, registry)
    store = open_store(config)
    server = Server(config, registry, store)
    addresses = server.bind()
    server.handle_signals()
    stats_endpoint.install(server, config)
    subscribers = install_subscribers(server, config, addresses[0])
    if subscribers is not None:
        server.subscriber_lags = subscribers.lags
    fp = fingerprint()  # once: getmac can be slow, and the console runs in the loop
    install_console(
        server,
        config,
        stats=lambda: metrics.text(metrics.snapshot(server)),
        log_lines=log_buffer.lines,
        fingerprint=lambda: fp,
        subscribers=subscribers.describe if subscribers is not None else None,
    )
    notifier = notify.install(server, config)
    log.info(
        "listening on %s (data in %s, %d frames stored)",
        ", ".join(f"{h}:{p}" for h, p in addresses),
        config.data_dir,
        store.frames,
    )
    gcwatch.settle()
    server.sweep_hooks.append(collector.tick)
    notifier.ready()  # READY=1: recovered and listening
    return server.run()
