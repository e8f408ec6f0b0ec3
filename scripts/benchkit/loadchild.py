"""A load generator (scripts/flood, scripts/fleet) as the benchmark's child process, and
the marks taken of it and of the daemon while it runs.

The generators are plain children that print one JSON object and note "start" and
"end" of their timed phase (and more words, per mode) on a pipe; a Mark at each word
gives the CPU and memory figures over a phase.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from .errors import BenchError
from .harness import CHANNEL, Daemon
from .procfs import (
    children,
    cpu_seconds,
    cpu_wait_seconds,
    machine_busy_seconds,
    memory_kib,
    tree_cpu_seconds,
)

RSS_EVERY = 0.25


def generator_command(
    script: Path, daemon: Daemon, args: argparse.Namespace, *options: str
) -> list[str]:
    """The command line of a load generator against `daemon`: its identities, the shape
    every mode gives (connections, payload, MAC, duration, processes), one JSON object out,
    and the generator's own `options`."""
    return [
        sys.executable,
        str(script),
        "--connect",
        daemon.address,
        "--identities",
        str(daemon.identities),
        "--connections",
        str(args.connections),
        "--payload",
        str(args.payload),
        "--mac",
        args.mac,
        "--channel",
        str(CHANNEL),
        "--duration",
        str(args.duration),
        "--procs",
        str(args.procs),
        "--json",
        *options,
    ]


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
