"""Shared fixtures: a real daemon as a subprocess on loopback, in a temp data dir."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

# the daemon as a child process is one harness for the tests and the benchmarks
from benchkit.daemonproc import (  # noqa: E402
    NotifySocket,
    listen_address,
    notify_env,
)

from appliance import app  # noqa: E402
from appliance.config import load  # noqa: E402


def wait_for(
    condition,
    timeout: float = 10.0,
    what: str = "condition",
    interval: float = 0.002,
    explain=None,
):
    """Poll `condition` until it returns something true (returned) or the deadline passes;
    a larger `interval` for conditions that cost a process each. `explain()`, if given,
    says in the failure what was found instead."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            found = f"; found: {explain()}" if explain is not None else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{found}")
        time.sleep(interval)


def subscriber_pid(daemon: Daemon, name: str) -> int:
    """The pid of `daemon`'s subscriber process NAME (a child running `subscriber NAME`), or 0."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == daemon.proc.pid and b"subscriber" in cmdline and name.encode() in cmdline:
            return int(entry)
    return 0


def cli(*args: str, data_dir: Path, stdin: bytes | None = None, config: Path | None = None):
    """Run `python -m appliance ARGS` against data_dir; returns the CompletedProcess."""
    env = dict(os.environ, MODULE_INGEST_DATA_DIR=str(data_dir), PYTHONPATH=str(ROOT))
    env.pop("MODULE_INGEST_CONFIG", None)
    cmd = [sys.executable, "-m", "appliance"]
    if config is not None:
        cmd += ["--config", str(config)]
    return subprocess.run(
        [*cmd, *args], input=stdin, capture_output=True, env=env, timeout=60, check=False
    )


def stats_json(data_dir: Path) -> dict:
    """`module-ingest stats --format json` of the daemon on data_dir."""
    result = cli("stats", "--format", "json", data_dir=data_dir)
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


class Daemon:
    """`module-ingest serve` as a subprocess; the first start picks a port, restarts keep it.

    `start` returns once the daemon sent READY=1 to its own $NOTIFY_SOCKET (`notify`, in
    the temp dir, open until `stop` or `kill`), as systemd would see it."""

    def __init__(self, data_dir: Path, config_text: str = "") -> None:
        self.data_dir = data_dir
        self.config = data_dir.with_suffix(".toml")
        self.config.write_text(config_text)
        self.host = "127.0.0.1"
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = data_dir.with_suffix(".log")
        self.extra_env: dict[str, str] = {}
        self.command = [sys.executable, "-m", "appliance", "serve"]  # or a test's own runner
        self.cwd: Path | None = None  # the daemon's working directory (None: the tests')
        self.notify: NotifySocket | None = None
        self.ready: dict[str, str] = {}  # the last start's READY=1 message

    def start(self) -> Daemon:
        self._close_notify()
        self.notify = NotifySocket(self.data_dir.with_suffix(".notify"))
        env = dict(
            notify_env(self.notify.path),
            PYTHONPATH=str(ROOT),
            MODULE_INGEST_DATA_DIR=str(self.data_dir),
            MODULE_INGEST_LISTEN=f"{self.host}:{self.port}",
            MODULE_INGEST_CONFIG=str(self.config),
            **self.extra_env,
        )
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        offset = log.tell()
        self.proc = self.spawn(env, log)
        log.close()
        ready = self.notify.wait_ready(self.proc)
        if ready is not None:
            self.ready = ready
            self.port = listen_address(ready)[1]
            return self
        text = self.log_path.read_bytes()[offset:].decode(errors="replace")
        if self.proc.poll() is not None:
            raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{text}")
        self.proc.kill()
        raise RuntimeError(f"daemon did not start:\n{self.log()}")

    def spawn(self, env: dict[str, str], log) -> subprocess.Popen:
        """Start the daemon process with this environment, output to `log`."""
        return subprocess.Popen(
            self.command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=self.cwd,
        )

    def _close_notify(self) -> None:
        if self.notify is not None:
            self.notify.close()
            self.notify = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def dev_token(self) -> str:
        creds = json.loads((self.data_dir / "dev-credentials.json").read_text())
        return creds["token"]

    def add_identity(self, ident: str, *args: str) -> str:
        """`identity add` through the CLI, before the start or live (the daemon picks it up);
        returns the token."""
        result = cli("identity", "add", ident, *args, data_dir=self.data_dir)
        assert result.returncode == 0, result.stderr.decode()
        return json.loads(result.stdout)["token"]

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.proc = None
            self._close_notify()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
        self._close_notify()


@pytest.fixture
def server(tmp_path):
    """A real Server on a real Store, as the daemon assembles them, not bound: the loop
    never runs."""
    config_path = tmp_path / "config.toml"
    config_path.write_text(
        "[storage]\nsegment_bytes = 1048576\nring_bytes = 1048576\n[auth]\ndev_identity = false\n"
    )
    config = load(config_path, environ={"MODULE_INGEST_DATA_DIR": str(tmp_path / "data")})
    config.data_dir.mkdir()
    daemon = app.assemble(config)
    yield daemon.server
    daemon.close()


@pytest.fixture
def daemon_factory(tmp_path):
    """Make daemons with a given config text; all are killed at the end of the test."""
    made: list[Daemon] = []

    def make(config_text: str = "", *, start: bool = True) -> Daemon:
        d = Daemon(tmp_path / f"data{len(made)}", config_text)
        made.append(d)
        return d.start() if start else d

    yield make
    for d in made:
        d.kill()


@pytest.fixture
def daemon(daemon_factory) -> Daemon:
    """A running daemon on defaults (with dev/core-0) and a short handshake/idle timeout."""
    return daemon_factory("[server]\nhandshake_timeout = 2.0\nidle_timeout = 3.0\n")
