"""The MQTT uplink against a real Mosquitto broker that each test starts.

The broker runs on a free loopback port with its own config and files in the
test's temp dir, and is killed at the end. A collector (a paho client in the
test) subscribes to the broker and checks what arrives against `module-ingest
dump`. For the broker-restart test the broker keeps its state on disk and
saves it at every change (autosave_on_changes), and the collector has a
persistent session: after a kill -9 and a restart the broker still knows the
collector's subscription and queues for it whatever the uplink sends before
the collector is back, so the test sees every frame the uplink delivered,
whichever of the two reconnects first.
"""

from __future__ import annotations

import getpass
import json
import re
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest
from benchkit.daemonproc import free_port
from conftest import cli, stats_json, wait_for

from appliance.client import Client

paho = pytest.importorskip("paho.mqtt.client", reason="needs paho-mqtt (the mqtt extra)")

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"


class Broker:
    """mosquitto -c DIR/mosquitto.conf on 127.0.0.1:port (plus `extra` config lines)."""

    def __init__(self, directory: Path, extra: str = "") -> None:
        assert Path(MOSQUITTO).exists(), "mosquitto is not installed (.ci/debian-packages)"
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self.log_path = directory / "mosquitto.log"

    def start(self) -> Broker:
        conf = self.dir / "mosquitto.conf"
        conf.write_text(
            # as root, mosquitto would switch to user mosquitto, which cannot write here
            f"user {getpass.getuser()}\n"
            f"listener {self.port} 127.0.0.1\n"
            f"log_dest file {self.log_path}\n"
            "log_type error\nlog_type warning\nlog_type notice\n" + self.extra
        )
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
        )
        wait_for(self._up, what="mosquitto to listen")
        return self

    def _up(self) -> bool:
        assert self.proc.poll() is None, self.log()
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None:
            self.proc.send_signal(sig)
            self.proc.wait()
            self.proc = None


@pytest.fixture
def broker_factory(tmp_path):
    made: list[Broker] = []

    def make(extra: str = "allow_anonymous true\n", name: str = "broker") -> Broker:
        broker = Broker(tmp_path / f"{name}{len(made)}", extra)
        made.append(broker)
        return broker.start()

    yield make
    for broker in made:
        broker.kill()


class Collector:
    """A test subscriber on the broker: every message it gets, in order of arrival."""

    def __init__(self, port: int, topic: str = "#", *, session: str = "", auth=None) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=session or "",
            clean_session=not session,
        )
        if auth:
            self.client.username_pw_set(*auth)
        self.client.reconnect_delay_set(1, 1)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.on_connect = lambda c, *args: c.subscribe(topic, qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.subscribed.wait(10), "the collector did not subscribe"

    def _on_message(self, client, userdata, message) -> None:
        with self.lock:
            self.messages.append((message.topic, message.payload))

    def got(self) -> list[tuple[str, bytes]]:
        with self.lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def collect():
    made: list[Collector] = []

    def make(*args, **kwargs) -> Collector:
        made.append(Collector(*args, **kwargs))
        return made[-1]

    yield make
    for c in made:
        c.close()


def uplink(name: str, broker: str, **options) -> str:
    lines = [f"[subscribers.{name}]", 'type = "mqtt"', f'broker = "{broker}"']
    if broker.startswith("mqtt://"):
        options.setdefault("allow_insecure", True)
    options.setdefault("retry_base", 0.1)
    options.setdefault("retry_max", 1.0)
    for key, value in options.items():
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def stream(d, count: int, channel: int = 1, start: int = 0) -> None:
    with Client(d.host, d.port, "dev/core-0", d.dev_token) as client:
        for i in range(count):
            client.send(channel, b"frame %06d" % (start + i))
        client.flush()


def dumped(d, channel: int | None = None) -> list[dict]:
    args = ["dump"] + (["--channel", str(channel)] if channel is not None else [])
    result = cli(*args, data_dir=d.data_dir)
    assert result.returncode == 0, result.stderr.decode()
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_frames_arrive_with_their_topics_and_payloads(daemon_factory, broker_factory, collect):
    broker = broker_factory()
    collector = collect(broker.port)
    d = daemon_factory(
        uplink("up", f"mqtt://127.0.0.1:{broker.port}", topic="t/{module}/{core}/{channel}",
               payload="json", channels=[1])
        + uplink("raw", f"mqtt://127.0.0.1:{broker.port}", topic="r/{id}/{channel}",
                 channels=[2])
        + uplink("lines", f"mqtt://127.0.0.1:{broker.port}", topic="l/{core}",
                 payload="jsonl", max_frames=7)
    )  # fmt: skip
    stream(d, 300, channel=1)
    stream(d, 40, channel=2, start=1000)
    everything = dumped(d)

    def lines() -> list[dict]:
        return [
            json.loads(x) for t, p in collector.got() if t == "l/core-0" for x in p.splitlines()
        ]

    wait_for(lambda: len(lines()) >= len(everything), what="every frame in the jsonl messages")

    def count(prefix: str) -> int:
        return sum(t.startswith(prefix) for t, _ in collector.got())

    wait_for(lambda: (count("t/"), count("r/")) == (300, 40), what="every frame at the broker")
    got = collector.got()
    json_msgs = [json.loads(p) for t, p in got if t == "t/dev/core-0/1"]
    raw_msgs = [p for t, p in got if t == "r/dev/core-0/2"]
    batched = [p for t, p in got if t == "l/core-0"]
    assert len(json_msgs) + len(raw_msgs) + len(batched) == len(got)  # no other topic
    assert lines() == everything  # every frame once, in log order, 7 at most per message
    assert len(batched) >= len(everything) / 7 and all(p.count(b"\n") <= 7 for p in batched)
    assert json_msgs == dumped(d, 1)  # the keys of dump, in log order, once each
    assert raw_msgs == [b"frame %06d" % (1000 + i) for i in range(40)]

    def confirmed(s: dict) -> tuple:
        return s["up"].get("confirmed"), s["raw"].get("confirmed"), s["lines"].get("confirmed")

    status = wait_for(
        lambda: confirmed(s := stats_json(d.data_dir)["subscribers"]) == (300, 40, 340) and s,
        what="the status lines",
    )
    assert status["up"]["in_flight"] == status["raw"]["in_flight"] == 0
    assert status["up"]["connected"] is True and status["up"]["last_error"] is None
    assert status["raw"]["confirmed"] == 40
    assert d.stop() == 0


def test_a_broker_stopped_mid_stream_loses_nothing(daemon_factory, broker_factory, collect):
    """The broker stops mid-stream (SIGTERM: Mosquitto saves what it acknowledged) and
    starts again: every frame arrives, some twice. A kill -9 can lose a message Mosquitto
    had acknowledged and not yet saved (the README says so): the broker's own durability,
    which no client can make up for."""
    broker = broker_factory(
        "allow_anonymous true\npersistence true\npersistence_location ./\n"
        "autosave_on_changes true\nautosave_interval 1\nqueue_qos0_messages true\n"
        "max_queued_messages 0\n"
    )
    collector = collect(broker.port, "t/#", session="collector")
    d = daemon_factory(
        uplink("up", f"mqtt://127.0.0.1:{broker.port}", topic="t/{id}", payload="json",
               max_inflight=50)
    )  # fmt: skip
    sender = threading.Thread(target=stream, args=(d, 3000))
    sender.start()
    try:
        wait_for(lambda: len(collector.got()) >= 300, what="the stream to be under way")
        broker.kill(signal.SIGTERM)  # mid-stream
        broker.start()  # same port, same state dir
    finally:
        sender.join()
    wanted = {(r["id"], r["seq"]) for r in dumped(d)}
    assert len(wanted) == 3000

    def arrived() -> set:
        return {(m["id"], m["seq"]) for m in (json.loads(p) for _, p in collector.got())}

    wait_for(lambda: arrived() >= wanted, timeout=30, what="every frame after the restart")
    seqs = [json.loads(p)["seq"] for _, p in collector.got()]
    first_seen: list[int] = []
    seen: set[int] = set()
    for seq in seqs:
        if seq not in seen:
            first_seen.append(seq)
            seen.add(seq)
    assert first_seen == sorted(first_seen)  # in order per core; repeats are re-sends
    assert "lost the connection" in d.log()
    after = wait_for(
        lambda: (s := stats_json(d.data_dir)["subscribers"]["up"])["in_flight"] == 0 and s,
        what="the last PUBACKs in the status",
    )
    assert after["connects"] >= 2 and after["connected"]
    # each frame handed to paho once; paho sent the unconfirmed ones again itself
    assert after["published"] == after["confirmed"] == 3000
    assert d.stop() == 0


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(directory: Path, name: str) -> None:
    """name.pem and name.key: a self-signed test CA."""
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
            "-subj", f"/CN={name}", cwd=directory)  # fmt: skip


def make_cert(directory: Path, ca: str, name: str, san: str) -> None:
    """name.pem and name.key, signed by the test CA `ca`."""
    (directory / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
            cwd=directory)  # fmt: skip
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
            "-extfile", f"{name}.ext", cwd=directory)  # fmt: skip


def test_tls_with_a_test_ca_and_a_client_certificate(
    tmp_path, daemon_factory, broker_factory, collect
):
    pki = tmp_path / "pki"
    pki.mkdir()
    make_ca(pki, "ca")
    make_ca(pki, "other-ca")
    make_cert(pki, "ca", "server", "DNS:localhost,IP:127.0.0.1")
    make_cert(pki, "ca", "board", "DNS:board")
    tls_port = free_port()
    broker = broker_factory(
        "allow_anonymous true\n"
        f"listener {tls_port} 127.0.0.1\n"
        f"cafile {pki}/ca.pem\ncertfile {pki}/server.pem\nkeyfile {pki}/server.key\n"
        "require_certificate true\n"
    )
    collector = collect(broker.port)
    url = f"mqtts://localhost:{tls_port}"
    d = daemon_factory(
        uplink("good", url, topic="good/{id}", ca_file=str(pki / "ca.pem"),
               cert_file=str(pki / "board.pem"), key_file=str(pki / "board.key"))
        + uplink("stranger", url, topic="bad/{id}", ca_file=str(pki / "other-ca.pem"),
                 cert_file=str(pki / "board.pem"), key_file=str(pki / "board.key"))
    )  # fmt: skip
    stream(d, 100)
    wait_for(
        lambda: sum(t.startswith("good/") for t, _ in collector.got()) >= 100,
        what="the frames over TLS",
    )
    stranger = wait_for(
        lambda: (s := stats_json(d.data_dir)["subscribers"]["stranger"]).get("last_error") and s,
        what="the other CA's failure in stats",
    )
    assert "CERTIFICATE_VERIFY_FAILED" in stranger["last_error"]
    assert stranger["failing"] and stranger["lag_bytes"] > 0
    assert not any(t.startswith("bad/") for t, _ in collector.got())
    assert d.stop() == 0


def test_a_wrong_password_is_reported_and_retried_until_it_works(
    tmp_path, daemon_factory, broker_factory, collect
):
    passwords = tmp_path / "mosquitto.passwd"
    subprocess.run([MOSQUITTO_PASSWD, "-b", "-c", str(passwords), "reader", "r-secret"],
                   check=True, capture_output=True)  # fmt: skip
    subprocess.run([MOSQUITTO_PASSWD, "-b", str(passwords), "board", "the-right-one"],
                   check=True, capture_output=True)  # fmt: skip
    broker = broker_factory(f"allow_anonymous false\npassword_file {passwords}\n")
    collector = collect(broker.port, auth=("reader", "r-secret"))
    secret = tmp_path / "board-password"
    secret.write_text("not-the-right-one\n")
    secret.chmod(0o600)
    d = daemon_factory(
        uplink("up", f"mqtt://127.0.0.1:{broker.port}", topic="t/{id}", username="board",
               password_file=str(secret), retry_base=0.2, retry_max=2.0)
    )  # fmt: skip
    stream(d, 200)
    status = wait_for(
        lambda: (s := stats_json(d.data_dir)["subscribers"]["up"]).get("failing") and s,
        what="the refusal in stats",
    )
    assert "refused the connection: Not authorized" in status["last_error"]
    assert status["lag_bytes"] > 0 and status["confirmed"] == 0
    refused = re.compile(r"refused the connection.*?trying again in ([\d.]+) s")
    pauses = lambda: [float(p) for p in refused.findall(d.log())]  # noqa: E731
    wait_for(lambda: len(pauses()) >= 4, what="four refused attempts")
    first, later = pauses()[0], pauses()[3]
    assert later > first  # backoff: 0.1-0.2 s at first, 0.8-1.6 s by the fourth
    assert collector.got() == []
    # the operator fixes the broker's side; the uplink's next try gets in, nothing was dropped
    subprocess.run([MOSQUITTO_PASSWD, "-b", str(passwords), "board", "not-the-right-one"],
                   check=True, capture_output=True)  # fmt: skip
    broker.proc.send_signal(1)  # SIGHUP: mosquitto reloads its password file
    wait_for(lambda: len(collector.got()) >= 200, timeout=20, what="the frames after the fix")
    assert [p for _, p in collector.got()] == [b"frame %06d" % i for i in range(200)]
    text = d.log() + json.dumps(stats_json(d.data_dir))
    assert "not-the-right-one" not in text  # the password is in no log line, no stats
    assert d.stop() == 0
