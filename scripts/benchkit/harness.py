"""The benchmarks' daemon harness: `python -m appliance serve` on a temp data dir with N
core identities, its stats snapshot, and the temp dir's clean-up.

Every mode of scripts/bench runs its daemon through `bench_daemon`; bench-subscribers
and bench-provisioning start theirs from the same class.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from _loadlib import raise_nofile_limit

from appliance.auth.registry import Registry
from appliance.protocol.crypto import MAC_ALGORITHMS

from .daemonproc import NotifySocket, listen_address, notify_env
from .errors import BenchError

ROOT = Path(__file__).resolve().parent.parent.parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"  # has the daemon's dependencies (scripts/serve)
DEFAULT_PYTHON = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
RECOVERED = re.compile(r"store: recovered in ([0-9.]+) s")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
STATS_TIMEOUT = 10.0
CHANNEL = 1
IDENT_FORMAT = "bench/core-{:05d}"


def go_on_in_venv() -> None:
    """Run the rest of this script in .venv's interpreter when it exists and this is
    another one: a script that uses the client library needs the daemon's dependencies."""
    if VENV_PYTHON.exists() and Path(sys.prefix).resolve() != VENV_PYTHON.parent.parent.resolve():
        os.execv(VENV_PYTHON, [str(VENV_PYTHON), *sys.argv])


def stats_snapshot(data_dir: Path) -> dict:
    """The daemon's JSON stats snapshot from data_dir/stats.sock."""
    chunks = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(STATS_TIMEOUT)
            sock.connect(str(data_dir / "stats.sock"))
            sock.sendall(b"json\n")
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return json.loads(b"".join(chunks))
    except (OSError, ValueError) as exc:
        raise BenchError(f"stats snapshot from {data_dir / 'stats.sock'}: {exc}") from None


def cli_env(data_dir: Path) -> dict[str, str]:
    """The environment for `python -m appliance COMMAND` on data_dir: this checkout's code,
    and no config from the caller's environment."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), MODULE_INGEST_DATA_DIR=str(data_dir))
    env.pop("MODULE_INGEST_CONFIG", None)
    return env


# -- the daemon ------------------------------------------------------------------------


class Daemon:
    """`python -m appliance serve` on a temp data dir, with N identities."""

    def __init__(
        self,
        workdir: Path,
        connections: int,
        python: str = DEFAULT_PYTHON,
        storage: str = "",
        extra: str = "",
        auth: str = "",
    ) -> None:
        self.workdir = workdir
        self.python = python
        self.data_dir = workdir / "data"
        self.wal = self.data_dir / "wal"
        self.identities = workdir / "flood-identities.json"
        self.log_path = workdir / "daemon.log"
        self.config = workdir / "config.toml"
        self.connections = connections
        self.storage = storage  # extra [storage] lines
        self.auth = auth  # extra [auth] lines
        self.extra = extra  # more TOML, e.g. [subscribers.NAME] tables (--config-extra)
        self.proc: subprocess.Popen | None = None
        self.address = ""
        self.notify: NotifySocket | None = None

    def prepare(self) -> None:
        """The data dir (it may already hold a WAL), the identities and the config."""
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        registry = Registry(self.data_dir / "identities.json")
        tokens = registry.add_many(
            {
                "ident": IDENT_FORMAT.format(n),
                "kind": "core",
                "module": "bench",
                "channels": [CHANNEL],
                "macs": MAC_ALGORITHMS,  # --mac none is measured too: opt in to it
            }
            for n in range(self.connections)
        )
        fd = os.open(self.identities, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(tokens, f)
        self.config.write_text(
            "[server]\n"
            "idle_timeout = 0\n"
            "handshake_timeout = 60.0\n"
            f"max_connections = {self.connections + 64}\n"
            # every core of a benchmark comes from 127.0.0.1: one source, not a fleet's many
            "max_handshakes_per_source = 1024\n"
            "[auth]\n"
            "dev_identity = false\n"
            + self.auth
            + (f"[storage]\n{self.storage}" if self.storage else "")
            + self.extra
        )

    def start(
        self,
        log_name: str = "daemon.log",
        timeout: float = START_TIMEOUT,
        *,
        same_port: bool = False,
    ) -> None:
        """Start the daemon and wait for its READY=1 (as systemd would); `same_port` listens
        where the previous start did (a restart the connected cores can find again)."""
        self.log_path = self.workdir / log_name
        listen = self.address if same_port else "127.0.0.1:0"
        if self.notify is not None:
            self.notify.close()
        self.notify = NotifySocket(self.workdir / "notify.sock")
        env = dict(
            notify_env(self.notify.path),
            **cli_env(self.data_dir),
            MODULE_INGEST_LISTEN=listen,
            MODULE_INGEST_CONFIG=str(self.config),
        )
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [self.python, "-m", "appliance", "serve"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
                # The daemon raises RLIMIT_NOFILE itself too (app.raise_fd_limit); belt and braces.
                preexec_fn=raise_nofile_limit,
            )
        ready = self.notify.wait_ready(self.proc, timeout)
        if ready is not None:
            host, port = listen_address(ready)
            self.address = f"{host}:{port}"
            return
        if self.proc.poll() is not None:
            raise BenchError(f"daemon exited with {self.proc.returncode}: {self.last_log_line()}")
        raise BenchError(f"daemon did not start within {timeout:.0f} s: {self.last_log_line()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def last_log_line(self) -> str:
        lines = self.log().strip().splitlines()
        return lines[-1] if lines else "(no output)"

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"daemon exited with {self.proc.returncode}: {self.last_log_line()}")

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT; returns the exit code."""
        if self.notify is not None:
            self.notify.close()
            self.notify = None
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -signal.SIGKILL


@contextlib.contextmanager
def temp_workdir(prog: str, parent: str | None, keep: bool, prefix: str) -> Iterator[Path]:
    """A temp dir under `parent` (default $TMPDIR), removed at the end, on an error or
    Ctrl-C too, unless `keep`."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield workdir
    finally:
        if keep:
            print(f"{prog}: kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def bench_daemon(
    args: argparse.Namespace, storage: str = "", extra: str | None = None, auth: str = ""
) -> Iterator[Daemon]:
    """A started daemon with args.connections identities in a temp dir under args.workdir;
    stopped and its dir removed (unless args.keep) however the block ends."""
    with temp_workdir("bench", args.workdir, args.keep, "module-ingest-bench-") as workdir:
        daemon = Daemon(workdir, args.connections, args.python, storage, extra or "", auth)
        try:
            daemon.prepare()
            daemon.start()
            yield daemon
        finally:
            daemon.stop()
