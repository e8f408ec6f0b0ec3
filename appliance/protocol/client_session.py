"""The client side of a MIP/1 connection as a state machine (PROTOCOL.md §4-§6).

Used by the client library, the load generator and the tests. Like the server
side it does no I/O: feed it received bytes, send what `data_to_send` returns.

Events (tuples, first item a FrameType):
    (WELCOME, last_seq, channels)   handshake done, the appliance proved it holds the secret
    (ACK, seq)                      every accepted frame up to seq is durable
    (NACK, seq, code, message)      frame seq was not stored
    (PONG, seq)
    (ERROR, code, message)          the server closes after this
"""

from __future__ import annotations

import json
from hmac import compare_digest

from appliance.protocol import crypto
from appliance.protocol.decoder import FATAL, REJECT, FrameDecoder
from appliance.protocol.frames import FrameType, encode_frame, encode_json


class ProtocolViolation(Exception):
    """The server broke the protocol (or is not who it claims to be)."""


def _json(payload: bytes) -> dict:
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolViolation(f"unreadable JSON payload: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolViolation("JSON payload is not an object")
    return obj


class ClientSession:
    def __init__(
        self,
        ident: str,
        secret: bytes,
        nonce: str,
        *,
        fingerprint: str = "",
        mac: str = "hmac-sha256",
    ) -> None:
        if mac not in crypto.MAC_ALGORITHMS:
            raise ValueError(f"unknown MAC algorithm {mac!r}")
        self.ident = ident
        self.secret = secret
        self.nonce = nonce
        self.fingerprint = fingerprint
        self.mac = mac
        self.server_nonce: str | None = None
        self.challenge: dict | None = None
        self.welcomed = False
        self.mac_fn: crypto.MacFn | None = None
        self._decoder = FrameDecoder()
        self._out = bytearray()

    @property
    def max_payload(self) -> int:
        return int(self.challenge["max_payload"]) if self.challenge else 65536

    def receive_data(self, data: bytes) -> list[tuple]:
        events: list[tuple] = []
        for item in self._decoder.feed(data):
            kind = item[0]
            if kind in (REJECT, FATAL):
                raise ProtocolViolation(f"bad frame from server: {item[1]}")
            _, _channel, seq, _ts, payload = item
            if kind == FrameType.ACK:
                events.append((FrameType.ACK, seq))
            elif kind == FrameType.NACK:
                obj = _json(payload)
                events.append((FrameType.NACK, seq, obj.get("code"), obj.get("message")))
            elif kind == FrameType.CHALLENGE:
                self._on_challenge(_json(payload))
            elif kind == FrameType.WELCOME:
                events.append(self._on_welcome(_json(payload)))
            elif kind == FrameType.PING:
                self._out += self.encode(FrameType.PONG, seq)
            elif kind == FrameType.PONG:
                events.append((FrameType.PONG, seq))
            elif kind == FrameType.ERROR:
                obj = _json(payload)
                events.append((FrameType.ERROR, obj.get("code"), obj.get("message")))
        return events

    def _on_challenge(self, challenge: dict) -> None:
        sn = challenge.get("nonce")
        if not isinstance(sn, str) or self.server_nonce is not None:
            raise ProtocolViolation("unexpected or malformed CHALLENGE")
        self.challenge = challenge
        self.server_nonce = sn
        self._decoder.max_payload = max(self._decoder.max_payload, self.max_payload)
        proof = crypto.hello_proof(
            self.secret, sn, self.nonce, self.ident, self.fingerprint, self.mac
        )
        hello = {
            "id": self.ident,
            "nonce": self.nonce,
            "fingerprint": self.fingerprint,
            "mac": self.mac,
            "proof": proof,
        }
        self._out += encode_json(FrameType.HELLO, hello)

    def _on_welcome(self, welcome: dict) -> tuple:
        sn = self.server_nonce
        if sn is None or self.welcomed:
            raise ProtocolViolation("WELCOME out of order")
        # The proof covers the `mac` we asked for: a server (or a path) that switched it
        # cannot produce it, so a session is never opened with another MAC than ours.
        expected = crypto.welcome_proof(self.secret, sn, self.nonce, self.ident, self.mac).encode()
        proof = welcome.get("proof")
        if not isinstance(proof, str) or not compare_digest(proof.encode(), expected):
            raise ProtocolViolation("WELCOME proof is wrong: the server does not hold our secret")
        last_seq, channels = welcome.get("last_seq"), welcome.get("channels")
        if type(last_seq) is not int or last_seq < 0 or not isinstance(channels, list):
            raise ProtocolViolation("WELCOME without a valid last_seq and channels")
        self.welcomed = True
        key = crypto.session_key(self.secret, sn, self.nonce, self.ident, self.mac)
        self.mac_fn = crypto.make_mac(self.mac, key)
        return (FrameType.WELCOME, last_seq, channels)

    def encode(self, ftype: int, seq: int, payload: bytes = b"", **kw) -> bytes:
        """A frame from this client, with the session MAC once welcomed."""
        return encode_frame(ftype, seq, payload, mac_fn=self.mac_fn, **kw)

    def send_data(self, channel: int, seq: int, payload: bytes, ts_ns: int = 0) -> None:
        self._out += encode_frame(
            FrameType.DATA, seq, payload, channel=channel, ts_ns=ts_ns, mac_fn=self.mac_fn
        )

    def send(self, ftype: int, seq: int = 0) -> None:
        self._out += self.encode(ftype, seq)

    def data_to_send(self) -> bytearray:
        out = self._out
        self._out = bytearray()
        return out
