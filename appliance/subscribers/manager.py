"""The daemon side of subscribers: start one process per [subscribers.NAME] table,
restart a failed one with backoff, stop them cleanly, report their lag.

Runs in the loop (a sweep hook and a stop hook); it only polls processes and
reads the small cursor files, so it never blocks on a subscriber.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

from appliance.config import Config
from appliance.protocol import crypto
from appliance.store import meta
from appliance.subscribers import runner

log = logging.getLogger("appliance.subscribers")

BACKOFF = (1.0, 60.0)  # first and longest pause before a restart
STABLE = 60.0  # a process that ran this long starts the backoff over
STOP_WAIT = 1.0  # at stop: time for the processes to commit and exit before SIGKILL


class Child:
    def __init__(self, name: str) -> None:
        self.name = name
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.backoff = BACKOFF[0]
        self.restart_at = 0.0
        self.restarts = 0
        self.status_fd: int | None = None  # read end of the process's status pipe
        self.status: dict = {}  # its last status line
        self.partial = b""


class SubscriberManager:
    def __init__(self, server, config: Config, connect: tuple[str, int]) -> None:
        self.server = server
        self.config = config
        host, port = connect
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        self.connect = f"{host}:{port}"
        self.children = {name: Child(name) for name in config.subscribers}

    def start(self) -> None:
        runner.check_subscribers(self.config)  # a bad table fails at start, in one line
        for name, table in self.config.subscribers.items():
            self._ensure_identity(name, table)
            self._spawn(self.children[name])
        self.server.sweep_hooks.append(self._sweep)
        self.server.stop_hooks.append(self.stop)

    def _ensure_identity(self, name: str, table: dict) -> None:
        """subscriber/NAME may write the derived channel (inference results)."""
        channel = table.get("output_channel")
        if channel is None:
            return
        registry = self.server.registry
        ident = runner.identity_name(name)
        if registry.get(ident) is None:
            registry.add(ident, "core", module="subscribers", channels=[int(channel)])

    def _spawn(self, child: Child) -> None:
        data_dir = os.path.abspath(self.config.data_dir)
        env = dict(os.environ)
        env["MODULE_INGEST_DATA_DIR"] = data_dir
        env[runner.ENV_PARENT] = str(os.getpid())  # it dies with this process, even on SIGKILL
        identity = self.server.registry.get(runner.identity_name(child.name))
        if identity is not None:
            env[runner.ENV_CONNECT] = self.connect
            env[runner.ENV_TOKEN] = crypto.secret_to_token(identity.secret)
        # -P: the working directory is not on the module path (a planted secrets.py there
        # would run inside the subscriber); -s: nor is the user's site-packages. PYTHONPATH
        # stays: the board's launcher finds the application through it.
        cmd = [sys.executable, "-P", "-s", "-m", "appliance"]
        if self.config.path:
            cmd += ["--config", os.path.abspath(self.config.path)]
        cmd += ["subscriber", child.name]
        self._close_status(child)
        child.status_fd, status_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        env[runner.ENV_STATUS_FD] = str(status_w)
        try:
            child.proc = subprocess.Popen(
                cmd, env=env, stdin=subprocess.DEVNULL, pass_fds=(status_w,), cwd=data_dir
            )
        finally:
            os.close(status_w)
        child.started = time.monotonic()
        log.info("subscriber %s: started (pid %d)", child.name, child.proc.pid)

    def _sweep(self, now: float) -> None:
        if self.server.stopping:
            return
        for child in self.children.values():
            self._read_status(child)
            proc = child.proc
            if proc is not None and proc.poll() is not None:
                if now - child.started >= STABLE:
                    child.backoff = BACKOFF[0]
                log.error(
                    "subscriber %s: exited with %s; restarting in %.0f s",
                    child.name,
                    proc.returncode,
                    child.backoff,
                )
                child.proc = None
                child.restart_at = now + child.backoff
                child.backoff = min(child.backoff * 2, BACKOFF[1])
            elif proc is None and now >= child.restart_at:
                child.restarts += 1
                self._spawn(child)

    def _read_status(self, child: Child) -> None:
        """Keep the newest complete status line the process sent (runner.Status)."""
        if child.status_fd is None:
            return
        try:
            data = os.read(child.status_fd, 65536)
        except BlockingIOError:
            return
        if not data:  # the process has gone
            self._close_status(child)
            return
        lines = (child.partial + data).split(b"\n")
        child.partial = lines.pop()[-65536:]
        for line in reversed(lines):
            try:
                child.status = json.loads(line)
                break
            except ValueError:
                continue

    def _close_status(self, child: Child) -> None:
        if child.status_fd is not None:
            os.close(child.status_fd)
            child.status_fd = None
            child.partial = b""

    def status(self) -> dict[str, dict]:
        """Per subscriber: its type, process, restarts, lag and the last status it sent."""
        lags = self.lags()
        return {
            name: {
                "type": self.config.subscribers[name]["type"],
                "pid": child.proc.pid if child.proc else None,
                "restarts": child.restarts,
                "lag_bytes": lags.get(name, 0),
                **child.status,
            }
            for name, child in self.children.items()
        }

    def stop(self) -> None:
        procs = [c.proc for c in self.children.values() if c.proc is not None]
        for proc in procs:
            proc.terminate()
        deadline = time.monotonic() + STOP_WAIT
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for child in self.children.values():
            self._close_status(child)

    def lags(self) -> dict[str, int]:
        """Bytes of log each subscriber has still to read."""
        store = self.server.store
        seg, off = store.durable_position()
        out = {}
        for name in self.children:
            pos = meta.read_cursor(store.directory, runner.cursor_name(name))
            if pos is None:
                out[name] = (seg - 1) * store.segment_bytes + off
                continue
            cseg, coff = pos
            out[name] = max(0, (seg - cseg) * store.segment_bytes + off - coff)
        return out

    def describe(self) -> list[str]:
        """One line per subscriber, for the console."""
        lags = self.lags()
        lines = []
        for name, child in self.children.items():
            state = f"pid {child.proc.pid}" if child.proc else "restarting"
            table = self.config.subscribers[name]
            lines.append(
                f"{name} ({table['type']}): {state}, {child.restarts} restarts, "
                f"{lags.get(name, 0)} bytes behind"
            )
        return lines
