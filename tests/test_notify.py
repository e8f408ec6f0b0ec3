"""sd_notify and the watchdog: a real daemon, a real AF_UNIX datagram socket as NOTIFY_SOCKET.

The daemon is appliance.app.build's, run by a small runner that first wraps the
store writer's `_write` (the writer is a forked process, so it inherits the
wrapper): to wedge the commit path, the first commit blocks in a real blocking
call (opening and reading a FIFO) until the test writes to the FIFO; to fill the
disk, each commit attempt first writes to /dev/full (a real ENOSPC) while a flag
file exists.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import Daemon, wait_for

from appliance.client import Client
from appliance.protocol import crypto
from appliance.protocol.client_session import ClientSession
from appliance.protocol.frames import FrameType
from hw import notify

WATCHDOG_USEC = 500_000  # systemd's WatchdogSec=0.5s: a ping every 0.25 s (every sweep)
STALL = 1.0  # [watchdog] stall_seconds
SLACK = 0.75  # the sweep period, a commit that starts a little after the send, scheduling
STATUS_RE = re.compile(r"(\d+) connections, ([0-9.]+) frames/s")

RUNNER = """
import os
import sys

from appliance import app
from appliance.config import load
from appliance.store.writer import Writer

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
sys.exit(app.build(load()).run())
"""


def is_ping(fields: dict[str, str]) -> bool:
    return fields.get("WATCHDOG") == "1"


def pings(messages) -> list[float]:
    return [t for t, fields in messages if is_ping(fields)]


class Runner(Daemon):
    """The daemon RUNNER builds, with a watchdog device (a plain file stands in for
    /dev/watchdog) and systemd's watchdog expecting a ping every WATCHDOG_USEC."""

    def __init__(self, tmp_path: Path, *, wedge: bool = False, disk_full: bool = False) -> None:
        self.device = tmp_path / "watchdog"
        self.device.write_bytes(b"")
        super().__init__(
            tmp_path / "data",
            f'[watchdog]\nstall_seconds = {STALL}\ndevice = "{self.device}"\n',
        )
        runner = tmp_path / "runner.py"
        runner.write_text(RUNNER)
        self.command = [sys.executable, str(runner)]
        self.fifo = tmp_path / "wedge.fifo"
        self.full_flag = tmp_path / "disk-is-full"
        self.extra_env["WATCHDOG_USEC"] = str(WATCHDOG_USEC)
        if wedge:
            os.mkfifo(self.fifo)
            self.extra_env["TEST_WEDGE_FIFO"] = str(self.fifo)
        if disk_full:
            self.extra_env["TEST_DISK_FULL_FLAG"] = str(self.full_flag)

    def client(self) -> Client:
        return Client(self.host, self.port, "dev/core-0", self.dev_token, timeout=10)

    def state(self) -> str:
        """The process state letter from /proc (R, S, T for stopped, ...)."""
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0]


@pytest.fixture
def start_runner(tmp_path):
    """Start the runner daemon (it returns once READY=1 came); it is killed at the end
    (also when stopped or wedged: SIGKILL ends a stopped process too)."""
    started: list[Runner] = []

    def start(**faults: bool) -> Runner:
        runner = Runner(tmp_path, **faults)
        started.append(runner)
        return runner.start()

    yield start
    for runner in started:
        runner.kill()


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


def test_ready_status_pings_and_stopping(start_runner):
    runner = start_runner()
    listener = runner.notify
    ready = runner.ready
    assert ready["READY"] == "1"
    assert STATUS_RE.fullmatch(ready["STATUS"]), ready
    assert ready["X_LISTEN"] == f"127.0.0.1:{runner.port}"
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
    assert runner.proc.wait(10) == 0, runner.log()
    # a clean stop ends with the magic close "V": the driver disarms instead of resetting
    written = runner.device.read_bytes()
    assert written.endswith(b"V") and written[:-1].strip(b"\0") == b""


def test_wedged_commit_stops_the_pings(start_runner):
    runner = start_runner(wedge=True)
    listener = runner.notify
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


def test_disk_full_is_not_a_wedge(start_runner):
    """ENOSPC makes the commit retry (commit_error set): pings go on, new frames get BUSY."""
    runner = start_runner(disk_full=True)
    listener = runner.notify
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


def test_wedged_loop_stops_the_pings(start_runner):
    runner = start_runner()
    listener = runner.notify
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
