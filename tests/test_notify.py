"""sd_notify and the watchdog: a real daemon, a real AF_UNIX datagram socket as NOTIFY_SOCKET.

The daemon is a small runner built the way appliance.app.serve builds it, with
hw.notify.install and ready() added. To wedge the commit path it wraps the
store's `_write` so the commit thread blocks in a real blocking call (opening
and reading a FIFO) until the test writes to the FIFO; to fill the disk, each
commit attempt first writes to /dev/full (a real ENOSPC) while a flag file exists.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import ROOT, wait_for

from appliance.client import Client
from appliance.protocol import crypto
from appliance.protocol.client_session import ClientSession
from appliance.protocol.frames import FrameType
from hw import notify

WATCHDOG_USEC = 500_000  # systemd's WatchdogSec=0.5s: a ping every 0.25 s (every sweep)
STALL = 1.0  # [watchdog] stall_seconds
SLACK = 0.75  # the sweep period, a commit that starts a little after the send, scheduling
START_TIMEOUT = 15.0
STATUS_RE = re.compile(r"(\d+) connections, ([0-9.]+) frames/s")

RUNNER = """
import logging
import os
import sys

from appliance import app
from appliance.auth.registry import Registry
from appliance.config import load
from appliance.net.server import Server
from appliance.store.writer import Writer
from hw import notify

logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s: %(message)s")
config = load()
app.ensure_data_dir(config.data_dir)
registry = Registry(app.registry_path(config.data_dir))
registry.load()
app.ensure_dev_identity(config, registry)
wedge_fifo = os.environ.get("TEST_WEDGE_FIFO")
disk_full = os.environ.get("TEST_DISK_FULL_FLAG")
real_write = Writer._write  # runs in the store's writer process, which inherits this
wedged = []


def _write(*args, **kwargs):
    if wedge_fifo and not wedged:  # the first commit only
        wedged.append(True)
        fd = os.open(wedge_fifo, os.O_RDONLY)  # blocks until the test opens the FIFO
        try:
            os.read(fd, 1)  # and until it writes a byte
        finally:
            os.close(fd)
    if disk_full and os.path.exists(disk_full):
        with open("/dev/full", "wb", buffering=0) as full:
            full.write(b"frame")  # OSError ENOSPC, from the kernel
    return real_write(*args, **kwargs)


Writer._write = _write
store = app.open_store(config)
server = Server(config, registry, store)
host, port = server.bind()[0]
notifier = notify.install(server, config)
print(f"listening on {host}:{port}", flush=True)
notifier.ready()
sys.exit(server.run())
"""


class NotifyListener:
    """The systemd side of sd_notify: a bound AF_UNIX datagram socket, messages as dicts."""

    def __init__(self, path: Path) -> None:
        self.path = path
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


def is_ping(fields: dict[str, str]) -> bool:
    return fields.get("WATCHDOG") == "1"


def pings(messages) -> list[float]:
    return [t for t, fields in messages if is_ping(fields)]


class Runner:
    def __init__(self, tmp_path: Path, proc: subprocess.Popen, log: Path) -> None:
        self.tmp_path = tmp_path
        self.proc = proc
        self.log = log
        self.data_dir = tmp_path / "data"
        self.fifo = tmp_path / "wedge.fifo"
        self.device = tmp_path / "watchdog"
        self.full_flag = tmp_path / "disk-is-full"

    @property
    def port(self) -> int:
        match = re.search(r"listening on [0-9.]+:(\d+)", self.log.read_text())
        assert match, self.log.read_text()
        return int(match.group(1))

    def client(self) -> Client:
        token = json.loads((self.data_dir / "dev-credentials.json").read_text())["token"]
        return Client("127.0.0.1", self.port, "dev/core-0", token, timeout=10)

    def state(self) -> str:
        """The process state letter from /proc (R, S, T for stopped, ...)."""
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0]


@pytest.fixture
def listener(tmp_path):
    sock = NotifyListener(tmp_path / "notify.sock")
    yield sock
    sock.close()


@pytest.fixture
def start_runner(tmp_path, listener):
    """Start the runner daemon; it is killed at the end (also when stopped or wedged)."""
    started: list[subprocess.Popen] = []

    def start(*, wedge: bool = False, disk_full: bool = False) -> Runner:
        (tmp_path / "runner.py").write_text(RUNNER)
        device = tmp_path / "watchdog"
        device.write_bytes(b"")  # a plain file stands in for /dev/watchdog
        config = tmp_path / "config.toml"
        config.write_text(
            f'[server]\nlisten = "127.0.0.1:0"\n\n'
            f'[watchdog]\nstall_seconds = {STALL}\ndevice = "{device}"\n'
        )
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("MODULE_INGEST_", "NOTIFY_", "WATCHDOG_", "TEST_"))
        }
        env.update(
            PYTHONPATH=str(ROOT),
            MODULE_INGEST_CONFIG=str(config),
            MODULE_INGEST_DATA_DIR=str(tmp_path / "data"),
            NOTIFY_SOCKET=str(listener.path),
            WATCHDOG_USEC=str(WATCHDOG_USEC),
        )
        if wedge:
            os.mkfifo(tmp_path / "wedge.fifo")
            env["TEST_WEDGE_FIFO"] = str(tmp_path / "wedge.fifo")
        if disk_full:
            env["TEST_DISK_FULL_FLAG"] = str(tmp_path / "disk-is-full")
        log = tmp_path / "runner.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, str(tmp_path / "runner.py")],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        started.append(proc)
        return Runner(tmp_path, proc, log)

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()  # SIGKILL ends a stopped process too
            proc.wait()


def wait_ready(listener: NotifyListener, runner: Runner) -> dict[str, str]:
    try:
        return listener.wait(lambda f: "READY" in f, START_TIMEOUT, "READY=1")[1]
    except AssertionError:
        raise AssertionError(f"no READY=1; runner log:\n{runner.log.read_text()}") from None


def probe_ping(port: int) -> bool:
    """A PING over MIP (allowed before HELLO) answered with a PONG: the loop is serving."""
    session = ClientSession("probe", bytes(32), crypto.random_nonce())
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(session.encode(FrameType.PING, 7))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            data = sock.recv(4096)
            if not data:
                return False
            if (FrameType.PONG, 7) in session.receive_data(data):
                return True
    return False


# -- the daemon over NOTIFY_SOCKET --------------------------------------------------


def test_ready_status_pings_and_stopping(start_runner, listener):
    runner = start_runner()
    ready = wait_ready(listener, runner)
    assert ready["READY"] == "1"
    assert STATUS_RE.fullmatch(ready["STATUS"]), ready
    # READY=1 comes after listen: the listener accepts, and the loop greets with a CHALLENGE
    with socket.create_connection(("127.0.0.1", runner.port), timeout=5) as sock:
        sock.settimeout(5)
        assert sock.recv(64)

    # a ping every WATCHDOG_USEC / 2, never a gap systemd would count as a hang
    start = time.monotonic()
    times = pings(listener.collect(start + 1.5))
    assert len(times) >= 4, times
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) < WATCHDOG_USEC / 1e6, gaps

    # STATUS= every STATUS_INTERVAL, with the ingest rate and the connections
    with runner.client() as core:
        for i in range(50):
            core.send(1, b"frame %d" % i)
        core.flush()
        _, status = listener.wait(
            lambda f: "STATUS" in f and float(STATUS_RE.match(f["STATUS"]).group(2)) > 0,
            notify.STATUS_INTERVAL + 3,
            "a STATUS= with a non-zero frames/s",
        )
    assert STATUS_RE.match(status["STATUS"]).group(1) == "1", status

    # the hardware watchdog got keepalive bytes
    assert runner.device.read_bytes().strip(b"\0") == b""
    assert runner.device.stat().st_size >= 4

    runner.proc.send_signal(signal.SIGTERM)
    listener.wait(lambda f: f.get("STOPPING") == "1", 5, "STOPPING=1")
    assert runner.proc.wait(10) == 0, runner.log.read_text()
    # a clean stop ends with the magic close "V": the driver disarms instead of resetting
    written = runner.device.read_bytes()
    assert written.endswith(b"V") and written[:-1].strip(b"\0") == b""


def test_wedged_commit_stops_the_pings(start_runner, listener):
    runner = start_runner(wedge=True)
    wait_ready(listener, runner)
    listener.wait(is_ping, 2, "WATCHDOG=1")
    core = runner.client()
    core.connect()
    sent_at = time.monotonic()
    seq = core.send(1, b"this commit blocks in the FIFO")

    stop_by = sent_at + STALL + SLACK
    before = listener.collect(stop_by)
    # pings go on while the commit is younger than stall_seconds, then stop
    assert any(t > sent_at for t in pings(before)), "pings stopped at once, not after STALL"
    assert any("commit stalled" in f.get("STATUS", "") for _, f in before), before
    device_size = runner.device.stat().st_size

    # the loop is alive: it answers a PING; only the commit path is stuck
    assert probe_ping(runner.port)
    silence = listener.collect(time.monotonic() + 1.5)
    assert pings(silence) == [], "WATCHDOG=1 while a commit is stuck"
    assert runner.device.stat().st_size == device_size, "watchdog device fed while stuck"
    assert core.acked < seq

    # release the commit: pings resume and the frame is acknowledged
    fd = os.open(runner.fifo, os.O_WRONLY | os.O_NONBLOCK)  # the commit thread has it open
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)
    listener.wait(is_ping, 2, "WATCHDOG=1 after the commit returned")
    core.flush(timeout=5)
    assert core.acked == seq
    assert runner.device.stat().st_size > device_size
    core.close()


def test_disk_full_is_not_a_wedge(start_runner, listener):
    """ENOSPC makes the commit retry (commit_error set): pings go on, new frames get BUSY."""
    runner = start_runner(disk_full=True)
    wait_ready(listener, runner)
    runner.full_flag.write_text("")
    core = runner.client()
    core.connect()
    sent_at = time.monotonic()
    seq = core.send(1, b"waits for space")
    messages = listener.collect(sent_at + STALL + SLACK + 1.5)
    assert [t for t in pings(messages) if t > sent_at + STALL + SLACK], "pings stopped"
    assert any("storage error" in f.get("STATUS", "") for _, f in messages), messages

    runner.full_flag.unlink()  # space again
    core.flush(timeout=5)
    assert core.acked == seq
    core.close()


def test_wedged_loop_stops_the_pings(start_runner, listener):
    runner = start_runner()
    wait_ready(listener, runner)
    listener.wait(is_ping, 2, "WATCHDOG=1")
    os.kill(runner.proc.pid, signal.SIGSTOP)
    wait_for(lambda: runner.state() == "T", 5, "the daemon to be stopped")
    listener.drain()  # what it sent before it stopped
    assert listener.collect(time.monotonic() + 1.0) == []
    os.kill(runner.proc.pid, signal.SIGCONT)
    listener.wait(is_ping, 2, "WATCHDOG=1 after SIGCONT")


# -- Notifier and the environment, in process --------------------------------------------


def test_abstract_address_and_message_format():
    name = f"module-ingest-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        notifier = notify.Notifier("@" + name)
        assert notifier.enabled
        assert notifier.send(READY=1, STATUS="two\nlines")
        assert notifier.send_raw("WATCHDOG=1")
        sock.settimeout(5)
        assert sock.recv(4096) == b"READY=1\nSTATUS=two lines"
        assert sock.recv(4096) == b"WATCHDOG=1"
        notifier.close()


def test_no_notify_socket_means_disabled(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = notify.Notifier()
    assert not notifier.enabled
    assert not notifier.send(READY=1)
    assert not notify.Notifier("vsock:2:1234").enabled  # not an AF_UNIX address


def test_send_errors_are_logged_once(tmp_path, caplog):
    notifier = notify.Notifier(str(tmp_path / "nobody-listens.sock"))
    assert notifier.enabled
    assert not notifier.send(WATCHDOG=1)
    assert not notifier.send(WATCHDOG=1)
    assert len([r for r in caplog.records if r.name == "hw.notify"]) == 1


def test_watchdog_interval(monkeypatch):
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert notify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    assert notify.watchdog_interval() == 20.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert notify.watchdog_interval() == 20.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert notify.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("0", "", "soon", "-5"):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert notify.watchdog_interval() is None
