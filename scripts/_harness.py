"""The benchmarks' harness: a daemon on a temp data dir, a load generator as a child
process, and the marks taken of both while it runs.

Shared by scripts/bench's modes; the load generators themselves (scripts/flood,
scripts/fleet) are plain children that print one JSON object and note "start" and
"end" of their timed phase (and more words, per mode) on a pipe.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from _loadlib import raise_nofile_limit
from _procfs import (
    children,
    cpu_seconds,
    cpu_wait_seconds,
    machine_busy_seconds,
    memory_kib,
    tree_cpu_seconds,
)

from appliance.auth.registry import Registry
from appliance.protocol.crypto import MAC_ALGORITHMS

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"  # has the daemon's dependencies (scripts/serve)
LISTENING = re.compile(r"listening on ([0-9.]+):(\d+)")
RECOVERED = re.compile(r"store: recovered in ([0-9.]+) s")
START_TIMEOUT = 60.0
START_POLL = 0.005  # how often start() looks for "listening on" in the log
STOP_TIMEOUT = 15.0
STATS_TIMEOUT = 10.0
RSS_EVERY = 0.25
CHANNEL = 1
IDENT_FORMAT = "bench/core-{:05d}"


class BenchError(Exception):
    """A run could not be done; the message is one line."""


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


# -- the daemon ------------------------------------------------------------------------


class Daemon:
    """`python -m appliance serve` on a temp data dir, with N identities."""

    def __init__(
        self, workdir: Path, connections: int, python: str, storage: str = "", extra: str = ""
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
        self.extra = extra  # more TOML, e.g. [subscribers.NAME] tables (--config-extra)
        self.proc: subprocess.Popen | None = None
        self.address = ""

    def prepare(self) -> None:
        self.data_dir.mkdir(mode=0o700, parents=True)
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
        """Start the daemon and wait for its "listening on" line; `same_port` listens where
        the previous start did (a restart the connected cores can find again)."""
        self.log_path = self.workdir / log_name
        listen = self.address if same_port else "127.0.0.1:0"
        env = dict(
            os.environ,
            PYTHONPATH=str(ROOT),
            MODULE_INGEST_DATA_DIR=str(self.data_dir),
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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = LISTENING.search(self.log())
            if match:
                self.address = f"{match[1]}:{match[2]}"
                return
            if self.proc.poll() is not None:
                raise BenchError(
                    f"daemon exited with {self.proc.returncode}: {self.last_log_line()}"
                )
            time.sleep(START_POLL)
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
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -signal.SIGKILL


# -- the load generator ------------------------------------------------------------------------


class LoadChild:
    """A load generator (scripts/flood, scripts/fleet) as a child in its own process group,
    with the words it notes on a pipe ("start", "end", ...) and, with `control`, a pipe to
    tell it words in turn (its --control-fd)."""

    def __init__(self, cmd: list[str], name: str, control: bool = False) -> None:
        self.name = name
        notify_r, notify_w = os.pipe()
        control_r, self.control = os.pipe() if control else (None, None)
        extra = ["--notify-fd", str(notify_w)]
        if control_r is not None:
            extra += ["--control-fd", str(control_r)]
        try:
            self.proc = subprocess.Popen(
                [*cmd, *extra],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                pass_fds=(notify_w,) if control_r is None else (notify_w, control_r),
                start_new_session=True,  # its own process group: kill() reaches the workers
            )
        except BaseException:
            os.close(notify_r)
            if self.control is not None:
                os.close(self.control)
            raise
        finally:
            os.close(notify_w)
            if control_r is not None:
                os.close(control_r)
        self.notes = os.fdopen(notify_r, "rb", buffering=0)
        self.pending = b""
        self.closed = False  # the child exited or closed the pipe

    def tell(self, word: str) -> None:
        os.write(self.control, word.encode() + b"\n")

    def words(self, timeout: float) -> list[str]:
        """The notes that arrived within `timeout` s; waits the whole timeout if none did."""
        if self.closed:
            time.sleep(timeout)
            return []
        ready, _, _ = select.select([self.notes], [], [], timeout)
        if not ready:
            return []
        chunk = self.notes.read(64)
        if not chunk:
            self.closed = True
            return []
        *words, self.pending = (self.pending + chunk).split(b"\n")
        return [w.decode() for w in words]

    def result(self, timeout: float) -> dict:
        """The child's JSON result once it exits; BenchError if it fails."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BenchError(f"{self.name} did not finish in time") from None
        finally:
            self._close_pipes()
        if self.proc.returncode != 0:
            message = err.decode(errors="replace").strip().splitlines()
            if len(message) > 1:  # a traceback: show it whole
                sys.stderr.write(err.decode(errors="replace"))
            raise BenchError(
                message[-1] if message else f"{self.name} exited with {self.proc.returncode}"
            )
        return json.loads(out)

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.communicate()
        self._close_pipes()

    def _close_pipes(self) -> None:
        self.notes.close()
        if self.control is not None:
            os.close(self.control)
            self.control = None


class Mark(NamedTuple):
    """CPU seconds and memory at one moment; two marks give the figures over a phase."""

    t: float
    daemon_cpu: tuple[float, float]  # (utime, stime) of the daemon's threads
    daemon_tree_s: float  # utime + stime of the daemon, its threads and its children
    child_s: float  # the same for the load generator and its worker processes
    busy_s: float  # every core of the machine, on anything but idle and iowait
    rss_kib: int  # the daemon's VmRSS
    daemon_wait_s: float  # the daemon's main thread (its loop) runnable, waiting for a CPU
    child_wait_s: float  # the same, summed over the load generator's worker processes


def mark(daemon_pid: int, child_pid: int) -> Mark:
    return Mark(
        time.monotonic(),
        cpu_seconds(daemon_pid),
        tree_cpu_seconds(daemon_pid),
        tree_cpu_seconds(child_pid),
        machine_busy_seconds(),
        memory_kib(daemon_pid)["VmRSS"],
        cpu_wait_seconds(daemon_pid),
        sum(cpu_wait_seconds(pid) for pid in children(child_pid)),
    )


class Watched(NamedTuple):
    result: dict  # the child's JSON
    marks: dict[str, Mark]  # one per word the child noted
    rss_max_kib: int  # the daemon's VmRSS, sampled every RSS_EVERY s
    rss_timed_max_kib: int  # the same between "start" and "end"


def watch(
    daemon: Daemon,
    child: LoadChild,
    deadline: float,
    on_word: Callable[[str], None] | None = None,
) -> Watched:
    """Follow `child` until it exits: the daemon's RSS every RSS_EVERY s, a Mark at each word
    the child notes (then `on_word(word)`). Kills the child on any error."""
    pid = daemon.proc.pid
    marks: dict[str, Mark] = {}
    rss_max = rss_timed_max = 0
    try:
        while not child.closed:
            if time.monotonic() > deadline:
                raise BenchError(f"{child.name} did not finish in time")
            daemon.check_alive()
            rss = memory_kib(pid)["VmRSS"]
            rss_max = max(rss_max, rss)
            if "start" in marks and "end" not in marks:
                rss_timed_max = max(rss_timed_max, rss)
            for word in child.words(RSS_EVERY):
                marks[word] = mark(pid, child.proc.pid)
                if on_word is not None:
                    on_word(word)
        result = child.result(max(1.0, deadline - time.monotonic()))
    except BaseException:
        child.kill()
        raise
    if "start" not in marks or "end" not in marks:
        raise BenchError(f"{child.name} never reported its timed phase")
    return Watched(result, marks, rss_max, rss_timed_max)


def cleanup(workdir: Path, keep: bool) -> None:
    if keep:
        print(f"bench: kept {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
