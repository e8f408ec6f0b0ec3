"""A daemon as a child process, as systemd sees it: shared by the benchmarks
(harness.py) and the test suite (tests/conftest.py).

The daemon is told where to send sd_notify messages ($NOTIFY_SOCKET, a datagram
socket of our own); it is up when READY=1 arrives, and READY=1's X_LISTEN says
where it listens. Nothing here imports the daemon's code.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import time
from pathlib import Path

START_TIMEOUT = 15.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NotifySocket:
    """The systemd side of sd_notify: a bound AF_UNIX datagram socket, messages as dicts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a previous start's
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def receive(self, timeout: float) -> tuple[float, dict[str, str]] | None:
        if not select.select([self.sock], [], [], max(0.0, timeout))[0]:
            return None
        data = self.sock.recv(4096)
        fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
        return time.monotonic(), fields

    def wait(self, predicate, timeout: float, what: str) -> tuple[float, dict[str, str]]:
        """The first message from now on that satisfies `predicate`."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.receive(deadline - time.monotonic())
            if message is None:
                raise AssertionError(f"no {what} within {timeout} s")
            if predicate(message[1]):
                return message

    def wait_ready(self, proc: subprocess.Popen, timeout: float = START_TIMEOUT) -> dict | None:
        """The READY=1 message of the daemon `proc`; None if it exited or the time ran out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.receive(0.05)
            if message is not None and message[1].get("READY") == "1":
                return message[1]
            if proc.poll() is not None:
                return None
        return None

    def collect(self, until: float) -> list[tuple[float, dict[str, str]]]:
        """Every message until the monotonic time `until`."""
        messages = []
        while (message := self.receive(until - time.monotonic())) is not None:
            messages.append(message)
        return messages

    def drain(self) -> None:
        while self.receive(0) is not None:
            pass

    def close(self) -> None:
        self.sock.close()


def notify_env(path: Path) -> dict[str, str]:
    """The environment of a daemon that tells `path` it is ready, and nothing else of
    systemd's: no watchdog a test did not ask for."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
    env["NOTIFY_SOCKET"] = str(path)
    return env


def listen_address(ready: dict[str, str]) -> tuple[str, int]:
    """The first listener's host and port, from the READY=1 message's X_LISTEN."""
    host, _, port = ready["X_LISTEN"].split(", ")[0].rpartition(":")
    return host, int(port)
