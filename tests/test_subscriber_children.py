"""Subscriber processes as children of the daemon: they die with it, even when it is killed
with SIGKILL, and they start isolated, in the data dir, with neither their working directory
nor the user's site-packages on the module path."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from conftest import subscriber_pid, wait_for

from appliance.client import Client

TAP = '[subscribers.tap]\ntype = "appliance.subscribers.example:JsonlFile"\n'


def running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie waiting for its reaper is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def tapped(d) -> list[dict]:
    path = d.data_dir / "subscribers" / "tap" / "records.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def send(d, *payloads: bytes) -> None:
    with Client(d.host, d.port, "dev/core-0", d.dev_token) as client:
        for payload in payloads:
            client.send(1, payload)
        client.flush()


def test_kill_9_of_the_daemon_leaves_no_subscriber_running(daemon_factory):
    d = daemon_factory(TAP)
    pid = wait_for(lambda: subscriber_pid(d, "tap"), what="the subscriber process")
    send(d, b"before")
    wait_for(lambda: len(tapped(d)) == 1, what="the first frame in the tap")
    d.kill()
    wait_for(lambda: not running(pid), what="the subscriber to die with its daemon")

    # the next daemon's subscriber gets the cursor (an orphan would hold its lock forever)
    d.start()
    send(d, b"after")
    wait_for(
        lambda: "YWZ0ZXI=" in {x["payload_b64"] for x in tapped(d)},
        what="a frame through the new daemon's subscriber",
    )
    # at least once: "before" may come again if the kill beat the cursor's commit
    assert {x["payload_b64"] for x in tapped(d)} == {"YmVmb3Jl", "YWZ0ZXI="}


def test_a_planted_secrets_py_does_not_run_in_the_subscriber(daemon_factory, tmp_path):
    """The daemon runs as the launcher starts it (python -P) from a directory where someone
    planted secrets.py, and one is planted in the data dir, the subscriber's working
    directory, too: neither may run (the stdlib's secrets is imported by the subscriber)."""
    marker = tmp_path / "planted-code-ran"
    plant = f"with open({str(marker)!r}, 'a') as f:\n    f.write(__file__ + '\\n')\n"
    d = daemon_factory(TAP, start=False)
    d.cwd = tmp_path / "cwd"
    d.cwd.mkdir()
    d.data_dir.mkdir(mode=0o700)
    for where in (d.cwd, d.data_dir):
        (where / "secrets.py").write_text(plant)
    d.command = [sys.executable, "-P", "-m", "appliance", "serve"]
    d.start()
    send(d, b"one", b"two")
    wait_for(lambda: marker.exists() or len(tapped(d)) == 2, what="the frames in the tap")
    assert not marker.exists(), f"planted code ran: {marker.read_text()}"
    pid = subscriber_pid(d, "tap")
    assert Path(f"/proc/{pid}/cwd").resolve() == d.data_dir.resolve()
    assert d.stop() == 0
