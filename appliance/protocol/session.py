"""The server side of a MIP/1 connection as a state machine (PROTOCOL.md §3-§7).

No sockets, no clock, no randomness: the caller passes the nonce in, feeds
received bytes to `receive_data`, acts on the events it returns, and sends
whatever `data_to_send` hands back. Identity lookup and the proof check belong
to the caller (auth/); it answers a `Hello` with `accept` or `fail`.

Events are tuples whose first item is the kind; all but DATA are typed
(NamedTuples, so they still compare and index as tuples):
    (DATA, channel, seq, ts_ns, payload)   a verified DATA frame (a plain tuple: the hot path)
    Hello(HELLO, hello)                    a well-formed HELLO; decoding waits for accept/fail
    Bye(BYE)                               the client said BYE; nothing more is decoded
    Closed(CLOSED, code, message)          the session ended with ERROR `code` (already queued)

PING is answered with PONG here, unsolicited PONGs are dropped, and bad frames
get their NACK here; the caller only sees that the peer was active
(`frames_seen` grows with every valid client frame).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from enum import Enum
from typing import NamedTuple

from appliance.protocol import crypto
from appliance.protocol.decoder import FATAL, REJECT, FrameDecoder, Policy
from appliance.protocol.frames import (
    DEFAULT_MAX_PAYLOAD,
    ErrorCode,
    FrameType,
    encode_ack,
    encode_error,
    encode_frame,
    encode_json,
    encode_nack,
)

DATA = FrameType.DATA.value
HELLO = FrameType.HELLO.value
BYE = FrameType.BYE.value
CLOSED = 0

_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_HELLO_KEYS = {"id": str, "nonce": str, "fingerprint": str, "mac": str, "proof": str}
# Revision 2 bounds, in bytes of UTF-8: checked before any HMAC or log line sees them.
MAX_ID_BYTES = 128
MAX_FINGERPRINT_BYTES = 256

# A HELLO is a few hundred bytes (PROTOCOL.md bounds its fields); before WELCOME nobody
# may make the server buffer more than that, whatever max_payload says.
HELLO_MAX_PAYLOAD = 4096

BEFORE_WELCOME = Policy(
    allowed=frozenset({FrameType.HELLO, FrameType.PING}),
    refuse_code=ErrorCode.UNAUTHENTICATED,
    refuse_fatal=True,
    mac_fatal=True,
    stop_types=frozenset({FrameType.HELLO, FrameType.BYE}),
    max_payload=HELLO_MAX_PAYLOAD,
)
AFTER_WELCOME = Policy(
    allowed=frozenset({FrameType.DATA, FrameType.PING, FrameType.PONG, FrameType.BYE}),
    stop_types=frozenset({FrameType.BYE}),
)


class Hello(NamedTuple):
    kind: int
    hello: dict


class Bye(NamedTuple):
    kind: int


class Closed(NamedTuple):
    kind: int
    code: str
    message: str


_NACK_MESSAGES = {
    ErrorCode.BAD_CRC: "CRC mismatch",
    ErrorCode.BAD_MAC: "MAC missing or wrong",
    ErrorCode.BAD_TYPE: "frame type not accepted from a client",
}


class State(Enum):
    AWAIT_HELLO = "await-hello"
    AUTHENTICATING = "authenticating"
    OPEN = "open"
    CLOSED = "closed"


def parse_hello(payload: bytes) -> dict | None:
    """The HELLO object if it is well formed (PROTOCOL.md §4 step 3), else None."""
    try:
        hello = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):  # deep nesting recurses
        return None
    if not isinstance(hello, dict):
        return None
    for key, kind in _HELLO_KEYS.items():
        if not isinstance(hello.get(key), kind):
            return None
    if not _HEX32.fullmatch(hello["nonce"]) or not _HEX64.fullmatch(hello["proof"]):
        return None
    if hello["mac"] not in crypto.MAC_ALGORITHMS:
        return None
    ident, fingerprint = hello["id"], hello["fingerprint"]
    # Every character is at least one byte: a long string is refused without encoding it.
    if len(ident) > MAX_ID_BYTES or len(fingerprint) > MAX_FINGERPRINT_BYTES:
        return None
    try:  # lone surrogates survive JSON but cannot enter the proof's HMAC
        if len(ident.encode()) > MAX_ID_BYTES:
            return None
        if len(fingerprint.encode()) > MAX_FINGERPRINT_BYTES:
            return None
    except UnicodeEncodeError:
        return None
    hello["proof"] = hello["proof"].lower()
    return hello


class ServerSession:
    # one per connection, ten thousand of them: no per-instance dict
    __slots__ = (
        "_decoder",
        "_hello",
        "_out",
        "counters",
        "frames_seen",
        "identity",
        "mac_algorithm",
        "nonce",
        "state",
    )

    def __init__(
        self,
        nonce: str,
        *,
        server_name: str = "module-ingest",
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        idle_timeout: float = 60,
        counters: Counter | None = None,
    ) -> None:
        self.nonce = nonce
        self.state = State.AWAIT_HELLO
        self.identity: str | None = None
        self.mac_algorithm: str | None = None
        self.frames_seen = 0
        # NACKs and ERRORs sent, by code: "nack.BAD_CRC", "error.TIMEOUT", ...
        self.counters = Counter() if counters is None else counters
        self._hello: dict | None = None
        self._out = bytearray()
        self._decoder = FrameDecoder(max_payload)
        self._decoder.policy = BEFORE_WELCOME
        self._out += encode_json(
            FrameType.CHALLENGE,
            {
                "server": server_name,
                "nonce": nonce,
                "version": 1,
                "max_payload": max_payload,
                # whole seconds as an integer, as the examples in PROTOCOL.md show
                "idle_timeout": int(idle_timeout)
                if idle_timeout == int(idle_timeout)
                else idle_timeout,
            },
        )

    # -- input -------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[tuple]:
        if self.state is State.CLOSED:
            return []
        dec = self._decoder
        frames = dec.feed(data)
        if dec.others:
            return self._events(frames)
        self.frames_seen += len(frames)  # only DATA: nothing for the session to do
        return frames

    def buffered(self) -> int:
        return self._decoder.buffered()

    def _events(self, frames: list[tuple]) -> list[tuple]:
        events: list[tuple] = []
        out = self._out
        valid = len(frames)
        for item in frames:
            kind = item[0]
            if kind == DATA:
                events.append(item)
                continue
            valid -= 1
            if kind == REJECT:
                _, code, seq = item
                self.send_nack(seq, code, _NACK_MESSAGES[code])
                continue
            if kind == FATAL:
                events.append(self._close(item[1], item[2], send=True))
                break
            valid += 1
            if kind == FrameType.PING:
                out += encode_frame(FrameType.PONG, item[2])
            elif kind == HELLO:
                hello = parse_hello(item[4])
                if hello is None:
                    events.append(self.fail(ErrorCode.AUTH_FAILED, "authentication failed"))
                    break
                self._hello = hello
                self.state = State.AUTHENTICATING
                events.append(Hello(HELLO, hello))
            elif kind == BYE:
                self.state = State.CLOSED
                self._decoder.close()
                events.append(Bye(BYE))
            # an unsolicited PONG is ignored
        self.frames_seen += valid
        return events

    # -- decisions from the caller ----------------------------------------

    def accept(self, secret: bytes, last_seq: int, channels: list[int]) -> list[tuple]:
        """Send WELCOME, switch to the session MAC, and decode what came meanwhile."""
        hello = self._hello
        assert self.state is State.AUTHENTICATING and hello is not None
        ident, cn, mac = hello["id"], hello["nonce"], hello["mac"]
        proof = crypto.welcome_proof(secret, self.nonce, cn, ident, mac)
        self._out += encode_json(
            FrameType.WELCOME, {"last_seq": last_seq, "channels": channels, "proof": proof}
        )
        self.identity = ident
        self.mac_algorithm = mac
        dec = self._decoder
        dec.policy = AFTER_WELCOME
        dec.mac_fn = crypto.make_mac(mac, crypto.session_key(secret, self.nonce, cn, ident, mac))
        self.state = State.OPEN
        return self._events(dec.resume())

    def fail(self, code: str, message: str) -> Closed:
        """End the session with ERROR `code` (AUTH_FAILED, TIMEOUT, SUPERSEDED, REVOKED)."""
        return self._close(code, message, send=True)

    def _close(self, code: str, message: str, *, send: bool) -> Closed:
        if self.state is not State.CLOSED:
            self.state = State.CLOSED
            self._decoder.close()
            if send:
                self.counters["error." + code] += 1
                self._out += encode_error(code, message)
        return Closed(CLOSED, code, message)

    # -- output ------------------------------------------------------------

    def send_ack(self, seq: int) -> None:
        self._out += encode_ack(seq)

    def send_nack(self, seq: int, code: str, message: str) -> None:
        self.counters["nack." + code] += 1
        self._out += encode_nack(seq, code, message)

    def data_to_send(self) -> bytes | bytearray:
        out = self._out
        if not out:
            return b""
        self._out = bytearray()
        return out
