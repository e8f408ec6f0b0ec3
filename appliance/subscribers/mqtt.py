"""The MQTT uplink: stored frames forwarded to a broker, at least once.

    [subscribers.uplink]
    type = "mqtt"
    broker = "mqtts://broker.example:8883"     # mqtt:// (1883) or mqtts:// (8883, TLS)
    client_id = "board-0042"                   # default: mi-FINGERPRINT12-NAME
    topic = "fleet/{module}/{core}/{channel}"  # fields: id, module, core, channel
    qos = 1                                    # the only one: confirmed, at least once
    payload = "raw"                            # or "json": the keys of `dump`; or "jsonl"
    channels = [1, 2]                          # the runner's filters (default: all)
    username = "board-0042"                    # and password, or password_file
    password_file = "/etc/module-ingest/mqtt-password"
    ca_file = "/etc/module-ingest/fleet-ca.pem"    # TLS: the CA to trust (default: the system's)
    cert_file = ""                             # mutual TLS: this board's certificate
    key_file = ""                              #   and its key

Topic fields: `id` is the sending identity; `module` is the part of it before
the first "/" and `core` the rest (`m-0007/core-2` -> `m-0007`, `core-2`; an id
without "/" is both); `channel` the frame's channel. MQTT's wildcards `+` and
`#` in an identity become `_`. Payload "raw" is the frame's payload as stored;
"json" is one object with the keys of `module-ingest dump`. "jsonl" puts up to
`max_frames` (100) frames of one topic in one message, a JSON line each (the
keys of dump): a message costs this process about as much as a frame, so a
fleet-scale stream goes many times faster this way.

Delivery. Every frame is published with QoS 1; the cursor moves only past
frames whose PUBACK came back: `flush()` returns the log place
of the oldest frame still unconfirmed, and the runner commits up to there. At
most `max_inflight` messages are unconfirmed at once; `handle` waits for room.
While the broker is unreachable or refuses the connection (a wrong password),
frames wait in the log, not in memory (the WAL keeps what the cursor has not
passed; the lag is in `module-ingest stats`), the error is logged and shown in
`stats` (`last_error`), and the connection is tried again with exponential
backoff and jitter (`retry_base` doubling to `retry_max`). After a reconnect
the unconfirmed frames are sent again first (paho's session), in order, so the
frames of each core arrive in order; a frame can arrive twice (after a broker
restart or a kill of this process), never not at all. A consumer that must
not see duplicates keys on (id, seq), in the topic or the json payload.
The client speaks MQTT 3.1.1, where a broker acknowledges a publish it then
discards (its ACL refuses the topic): let the broker's ACL allow the topics.
QoS 2 is not offered: Mosquitto, for one, PUBRECs and drops a 3.1.1 client's
QoS 2 messages beyond its max_inflight_messages, so it would lose frames.

One paho-mqtt client, driven from this process's one thread (no paho thread):
`handle` publishes and reads PUBACKs while it waits for room; `flush`, which
the runner calls after every batch and about once a second while idle, reads
what came back and keeps the connection alive.

Other options: max_frames (100, with jsonl), max_inflight (1000 messages),
keepalive (60 s), timeout (10 s to connect), retry_base (0.5 s), retry_max
(60 s), allow_insecure (mqtt:// is refused without it: the frames and the
password would cross the network in clear).
Needs the `mqtt` extra: pip install 'module-ingest[mqtt]'.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import ssl
import string
import time
from collections import deque
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from appliance.config import REQUIRED, OptionError
from appliance.store.segment import Record
from appliance.subscribers.backoff import Backoff
from appliance.subscribers.base import Context, Subscriber
from appliance.subscribers.lines import frame_line

log = logging.getLogger("appliance.subscribers.mqtt")

EXTRA = "pip install 'module-ingest[mqtt]'"
PORTS = {"mqtt": 1883, "mqtts": 8883}
TOPIC_FIELDS = ("id", "module", "core", "channel")
TOPICS_MAX = 65536  # (identity, channel) -> topic cache entries, cleared beyond
WAIT = 0.05  # seconds per wait for PUBACKs while handle() has no room
CLOSE_WAIT = 1.0  # seconds close() gives the unconfirmed frames (they come again anyway)
PASSWORD_MAX = 4096


def _topic_fields(template: str) -> list[str]:
    return [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]


def _clean(level: str) -> str:
    """A topic level without MQTT's wildcards."""
    return level.replace("+", "_").replace("#", "_")


def read_secret(path: Path) -> str:
    """A password file's first line; not through a symbolic link (a planted link must not
    make us send another file's content to a broker)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        data = f.read(PASSWORD_MAX + 1)
    if len(data) > PASSWORD_MAX:
        raise ValueError(f"{path} is longer than {PASSWORD_MAX} bytes")
    return data.decode("utf-8").splitlines()[0] if data.strip() else ""


def _path(value: str, config_dir: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else config_dir / path


class MqttSubscriber(Subscriber):
    OPTIONS = {
        "broker": (str, REQUIRED, None),
        "client_id": (str, "", None),
        "topic": (str, "fleet/{module}/{core}/{channel}", None),
        "qos": (int, 1, None),
        "payload": (str, "raw", None),
        "username": (str, "", None),
        "password": (str, "", None),
        "password_file": (str, "", None),
        "ca_file": (str, "", None),
        "cert_file": (str, "", None),
        "key_file": (str, "", None),
        "max_frames": (int, 100, 1),
        "max_inflight": (int, 1000, 1),
        "keepalive": (int, 60, 5),
        "timeout": (float, 10.0, 0.1),
        "retry_base": (float, 0.5, 0.01),
        "retry_max": (float, 60.0, 0.1),
        "allow_insecure": (bool, False, None),
    }
    CHOICES = {"qos": (1,), "payload": ("raw", "json", "jsonl")}

    @classmethod
    def check(cls, options: dict[str, Any], config_dir: Path) -> None:
        if importlib.util.find_spec("paho") is None:
            raise OptionError("type", f"the MQTT uplink needs paho-mqtt: {EXTRA}")
        url = urlsplit(options["broker"])
        if url.scheme not in PORTS or not url.hostname or url.path not in ("", "/"):
            raise OptionError("broker", "expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
        try:
            url.port  # noqa: B018 - a port out of range raises here
        except ValueError as exc:
            raise OptionError("broker", str(exc)) from None
        if url.scheme == "mqtt" and not options["allow_insecure"]:
            raise OptionError(
                "broker",
                "mqtt:// sends frames and password in clear; use mqtts:// "
                "or set allow_insecure = true",
            )
        unknown = set(_topic_fields(options["topic"])) - set(TOPIC_FIELDS)
        if unknown or not options["topic"]:
            raise OptionError("topic", f"fields are {', '.join(TOPIC_FIELDS)}, not {unknown}")
        if options["max_inflight"] > 65535:
            raise OptionError("max_inflight", "at most 65535 (MQTT's packet ids)")
        if options["password"] and options["password_file"]:
            raise OptionError("password_file", "give password or password_file, not both")
        for key in ("password_file", "ca_file", "cert_file", "key_file"):
            if options[key] and not _path(options[key], config_dir).is_file():
                raise OptionError(key, f"{options[key]} is not a readable file")
        if bool(options["cert_file"]) != bool(options["key_file"]):
            raise OptionError("key_file", "cert_file and key_file go together")

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        try:
            import paho.mqtt.client as paho
        except ImportError:
            raise ValueError(f"the MQTT uplink needs paho-mqtt: {EXTRA}") from None
        self.paho = paho
        # what publish() may answer for a message it keeps (and sends once connected)
        self.queued = (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN, paho.MQTT_ERR_CONN_LOST)
        opts = self.options
        url = urlsplit(opts["broker"])
        self.host = url.hostname
        self.port = url.port or PORTS[url.scheme]
        self.broker = f"{url.scheme}://{self.host}:{self.port}"
        self.qos = opts["qos"]
        self.template = opts["topic"]
        self.json = opts["payload"] == "json"
        self.jsonl = opts["payload"] == "jsonl"
        self.max_frames = opts["max_frames"]
        self.max_inflight = opts["max_inflight"]
        self.stopping = context.stopping
        self.backoff = Backoff(opts["retry_base"], opts["retry_max"])
        client_id = opts["client_id"] or self._default_client_id()
        client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv311,
            clean_session=True,
        )
        client.connect_timeout = opts["timeout"]
        # handle() keeps at most max_inflight unconfirmed; paho's own limit would cost a
        # walk over every unconfirmed message per PUBACK (quadratic), so it is off
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_publish = self._on_publish
        client.on_disconnect = self._on_disconnect
        if url.scheme == "mqtts":
            client.tls_set_context(self._tls(opts, context.config_dir))
        password = opts["password"]
        if opts["password_file"]:
            password = read_secret(_path(opts["password_file"], context.config_dir))
        if opts["username"] or password:
            client.username_pw_set(opts["username"] or None, password or None)
        client.connect_async(self.host, self.port, opts["keepalive"])  # no I/O yet: see _pump
        self.client = client
        self.topics: dict[tuple[str, int], str] = {}
        # published, not yet confirmed: (packet id, log place of its first frame, frames)
        self.pending: deque[tuple[int, tuple[int, int], int]] = deque()
        self.confirmed: set[int] = set()  # packet ids PUBACKed, not yet at the head
        # of the last record of the last batch published whole
        self.last_position: tuple[int, int] | None = None
        self.interrupted: tuple[int, int] | None = None  # first record left when stopping
        self.socket_open = False
        self.connected = False
        self.refused: str | None = None  # why the broker refused the last CONNECT
        self.retry_at = 0.0
        self.published = 0  # frames
        self.messages = 0
        self.delivered = 0
        self.connects = 0
        self.last_error: str | None = None
        self.last_error_time: float | None = None
        log.info("mqtt %s: forwarding to %s as %s", self.name, self.broker, client_id)

    def _default_client_id(self) -> str:
        from hw.fingerprint import fingerprint

        short = fingerprint().partition(":")[2][:12] or "unknown"
        return f"mi-{short}-{self.name}"  # one per table: two tables must not share an id

    @staticmethod
    def _tls(opts: dict[str, Any], config_dir: Path) -> ssl.SSLContext:
        cafile = str(_path(opts["ca_file"], config_dir)) if opts["ca_file"] else None
        context = ssl.create_default_context(cafile=cafile)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if opts["cert_file"]:
            context.load_cert_chain(
                _path(opts["cert_file"], config_dir), _path(opts["key_file"], config_dir)
            )
        return context

    # -- the Subscriber interface --------------------------------------------------------

    def handle(self, records: list[Record]) -> None:
        last = self.last_position
        if last is not None and records and (records[0].segment, records[0].offset) <= last:
            # handed over again after a failure: what the whole batch published is skipped
            records = [r for r in records if (r.segment, r.offset) > last]
        publish = self.client.publish
        pending = self.pending
        for topic, payload, first, frames in self._messages(records):
            while len(pending) >= self.max_inflight:
                if self.stopping is not None and self.stopping.is_set():
                    # messages go in the order of their first frame: every frame before
                    # this one is in a message published already
                    self.interrupted = first
                    return
                self._pump(WAIT)
            info = publish(topic, payload, self.qos)
            if info.rc not in self.queued:
                raise RuntimeError(f"publish: {self.paho.error_string(info.rc)}")
            pending.append((info.mid, first, frames))
            self.published += frames
            self.messages += 1
        if records:
            self.last_position = (records[-1].segment, records[-1].offset)
        self._pump(0)

    def _messages(self, records: list[Record]):
        """(topic, payload, log place of its first frame, frames) of each message, in the
        order of their first frames: one frame each, or with payload "jsonl" up to
        max_frames frames of one topic, a JSON line each."""
        if not self.jsonl:
            for rec in records:
                yield self._topic(rec), self._payload(rec), (rec.segment, rec.offset), 1
            return
        groups: dict[str, list[Record]] = {}
        order: list[tuple[str, list[Record]]] = []
        for rec in records:
            topic = self._topic(rec)
            group = groups.get(topic)
            if group is None or len(group) >= self.max_frames:
                group = groups[topic] = []
                order.append((topic, group))
            group.append(rec)
        for topic, group in order:
            first = (group[0].segment, group[0].offset)
            yield topic, b"".join(map(frame_line, group)), first, len(group)

    def flush(self) -> tuple[int, int] | None:
        """Read what the broker confirmed; the log place of the oldest frame it has not."""
        self._pump(0)
        if self.pending:
            return self.pending[0][1]
        return self.interrupted

    def close(self) -> None:
        deadline = time.monotonic() + CLOSE_WAIT
        while self.pending and self.connected and time.monotonic() < deadline:
            self._pump(WAIT)
        if self.socket_open:
            self.client.disconnect()
            self.client.loop(0)
        log.info(
            "mqtt %s: %d frames published, %d confirmed", self.name, self.published, self.delivered
        )

    def stats(self) -> dict[str, Any]:
        out = {
            "broker": self.broker,
            "connected": self.connected,
            "published": self.published,
            "messages": self.messages,
            "confirmed": self.delivered,
            "in_flight": len(self.pending),  # messages
            "connects": self.connects,
        }
        if not self.connected and self.last_error:
            out.update(failing=True, last_error=self.last_error)
            out["last_error_time"] = self.last_error_time
        return out

    # -- frames to messages -------------------------------------------------------------

    def _topic(self, rec: Record) -> str:
        key = (rec.identity, rec.channel)
        topic = self.topics.get(key)
        if topic is None:
            if len(self.topics) >= TOPICS_MAX:
                self.topics.clear()
            ident = _clean(rec.identity)
            module, sep, core = ident.partition("/")
            topic = self.topics[key] = self.template.format(
                id=ident, module=module, core=core if sep else ident, channel=rec.channel
            )
        return topic

    def _payload(self, rec: Record) -> bytes:
        return frame_line(rec)[:-1] if self.json else rec.payload

    # -- the connection -----------------------------------------------------------------

    def _pump(self, wait: float) -> None:
        """Connect when it is time to, else read and write what is due for up to `wait`."""
        if not self.socket_open:
            now = time.monotonic()
            if now < self.retry_at:
                pause = min(wait, self.retry_at - now)
                if pause > 0:
                    if self.stopping is not None:
                        self.stopping.wait(pause)
                    else:
                        time.sleep(pause)
                return
            self._connect()
            return
        rc = self.client.loop(wait)
        if rc != self.paho.MQTT_ERR_SUCCESS:
            why = self.refused or f"lost the connection to {self.broker} ({rc.name})"
            self.refused = None
            self.socket_open = self.connected = False
            self._failed(why)
        self._settle()

    def _connect(self) -> None:
        try:
            self.client.reconnect()
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            self._failed(f"cannot connect to {self.broker}: {exc}")
            return
        self.socket_open = True  # CONNACK comes in a later loop()

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        if reason.is_failure:
            self.refused = f"{self.broker} refused the connection: {reason}"
            return
        self.connected = True
        self.connects += 1
        self.backoff.reset()
        if self.last_error:
            log.info("mqtt %s: connected to %s", self.name, self.broker)
        self.last_error = None

    def _on_disconnect(self, client, userdata, flags, reason, properties) -> None:
        self.connected = False

    def _on_publish(self, client, userdata, mid, reason, properties) -> None:
        self.confirmed.add(mid)

    def _settle(self) -> None:
        """Drop the confirmed messages at the head: the cursor may pass their frames."""
        pending, confirmed = self.pending, self.confirmed
        while pending and pending[0][0] in confirmed:
            mid, _, frames = pending.popleft()
            confirmed.discard(mid)
            self.delivered += frames

    def _failed(self, why: str) -> None:
        pause = self.backoff.pause()
        self.retry_at = time.monotonic() + pause
        self.last_error = why
        self.last_error_time = round(time.time(), 3)
        log.warning(
            "mqtt %s: %s; %d frames wait, trying again in %.1f s",
            self.name,
            why,
            len(self.pending),
            pause,
        )
