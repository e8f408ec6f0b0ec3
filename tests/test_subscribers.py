"""The subscriber manager through the real daemon: processes, restarts, lag, filters."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from conftest import cli, subscriber_pid, wait_for

from appliance.client import Client
from appliance.config import ConfigError
from appliance.config import load as load_config

TAP = 'type = "appliance.subscribers.example:JsonlFile"\n'


def tapped(d, name="tap") -> list[dict]:
    path = d.data_dir / "subscribers" / name / "records.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def stream(d, seqs_from: int, count: int, channel: int = 1) -> None:
    with Client(d.host, d.port, "dev/core-0", d.dev_token) as client:
        for i in range(count):
            client.send(channel, b"frame %d" % (seqs_from + i))
        client.flush()


def test_a_subscriber_gets_every_frame_and_survives_kill_9(daemon_factory):
    d = daemon_factory(f"[subscribers.tap]\n{TAP}channels = [1]\n")
    stream(d, 0, 200)
    stream(d, 200, 20, channel=2)  # filtered out
    wait_for(lambda: len(tapped(d)) >= 200, what="the tap to catch up")
    pid = wait_for(lambda: subscriber_pid(d, "tap"), what="the subscriber process")
    os.kill(pid, signal.SIGKILL)
    stream(d, 1000, 300)
    wait_for(lambda: subscriber_pid(d, "tap") not in (0, pid), timeout=10, what="a restart")
    wait_for(
        lambda: {r["payload_b64"] for r in tapped(d)} >= {r["payload_b64"] for r in dumped(d, 1)},
        what="every channel-1 frame in the tap",
    )
    got = tapped(d)
    assert {r["channel"] for r in got} == {1}
    assert "exited with -9; restarting" in d.log()
    # at least once: nothing missing; a kill between handle and commit may repeat some
    assert {(r["id"], r["seq"]) for r in got} == {(r["id"], r["seq"]) for r in dumped(d, 1)}
    stats = cli("stats", "--format", "json", data_dir=d.data_dir)
    assert stats.returncode == 0, stats.stderr.decode()
    lags = json.loads(stats.stdout)["subscriber_lag_bytes"]
    assert set(lags) == {"tap"} and lags["tap"] >= 0
    pid = subscriber_pid(d, "tap")
    assert d.stop() == 0
    assert not Path(f"/proc/{pid}").exists()  # the daemon stopped its subscriber


def dumped(d, channel: int) -> list[dict]:
    result = cli("dump", "--channel", str(channel), data_dir=d.data_dir)
    assert result.returncode == 0, result.stderr.decode()
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_an_unknown_subscriber_type_stops_the_start_in_one_line(daemon_factory):
    d = daemon_factory('[subscribers.x]\ntype = "nosuch"\n', start=False)
    with pytest.raises(RuntimeError) as err:
        d.start()
    assert "unknown subscriber type 'nosuch'" in str(err.value)
    assert "Traceback" not in str(err.value)


@pytest.mark.parametrize(
    "table, key",
    [
        ("[subscribers.a]\nchannels = [1]\n", "subscribers.a.type"),
        ('[subscribers.a]\ntype = "index"\nchannels = ["x"]\n', "subscribers.a.channels"),
        ('[subscribers.a]\ntype = "index"\nidentities = "m"\n', "subscribers.a.identities"),
        ('[subscribers."a b"]\ntype = "index"\n', "subscribers.a b"),
    ],
)
def test_bad_subscriber_tables_name_the_key(tmp_path, table, key):
    path = tmp_path / "c.toml"
    path.write_text(table)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert key in str(err.value) and str(path) in str(err.value)
