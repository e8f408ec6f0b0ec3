"""MIP/1 on real loopback sockets against the real daemon (PROTOCOL.md §2-§7).

Every test starts `module-ingest serve` as a subprocess (tests/conftest.py), drives a
`ClientSession` over a plain socket so it controls every byte it sends, and checks
what was stored with `module-ingest dump`. Waits are bounded reads, never sleeps: a
PING answered with its PONG proves the daemon has processed everything sent before it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
import re
import shutil
import socket
import ssl
import subprocess
import time
import zlib
from collections import deque

import pytest
from conftest import Daemon, cli

from appliance.client import Client
from appliance.protocol import crypto
from appliance.protocol.client_session import ClientSession
from appliance.protocol.frames import (
    FLAG_MAC,
    HEADER,
    MAGIC,
    VERSION,
    ErrorCode,
    FrameType,
    encode_frame,
)

DEV = "dev/core-0"
DEV_CHANNELS = list(range(1, 9))
WAIT = 5.0  # bound on any single wait for the daemon
PROMPT = 1.0  # after an ERROR the server shuts its write side at once: EOF follows promptly
CORE = ("--kind", "core", "--module", "m", "--channels", "1-3")
FP = "sha256:" + "ab" * 32
OTHER_FP = "sha256:" + "cd" * 32
TIMEOUTS = "[server]\nhandshake_timeout = 1.0\nidle_timeout = 1.0\n"

CHALLENGE = FrameType.CHALLENGE
HELLO = FrameType.HELLO
WELCOME = FrameType.WELCOME
DATA = FrameType.DATA
ACK = FrameType.ACK
NACK = FrameType.NACK
PING = FrameType.PING
PONG = FrameType.PONG
BYE = FrameType.BYE
ERROR = FrameType.ERROR


# -- helpers -------------------------------------------------------------------


def header(
    ftype: int,
    *,
    length: int = 0,
    seq: int = 0,
    flags: int = 0,
    channel: int = 0,
    magic: int = MAGIC,
    version: int = VERSION,
) -> bytes:
    """A 32-byte frame header with any field set to anything (PROTOCOL.md §2)."""
    return HEADER.pack(magic, version, ftype, flags, channel, length, 0, seq, 0)


def crc(body: bytes) -> bytes:
    return zlib.crc32(body).to_bytes(4, "big")


_open_peers: list[Peer] = []


@pytest.fixture(autouse=True)
def _close_peers():
    yield
    while _open_peers:
        _open_peers.pop().close()


class Peer:
    """One raw MIP/1 connection driven by a ClientSession: the test decides every byte sent.

    Events are those of ClientSession: (WELCOME, last_seq, channels), (ACK, seq),
    (NACK, seq, code, message), (PONG, seq), (ERROR, code, message).
    """

    def __init__(
        self,
        daemon: Daemon,
        ident: str = DEV,
        token: str | None = None,
        *,
        secret: bytes | None = None,
        mac: str = "hmac-sha256",
        fingerprint: str = "",
        port: int | None = None,
        tls: ssl.SSLContext | None = None,
        source: str | None = None,
    ) -> None:
        if secret is None:
            secret = crypto.token_to_secret(token or daemon.dev_token)
        sock = socket.create_connection(
            (daemon.host, port or daemon.port),
            timeout=WAIT,
            source_address=(source, 0) if source else None,
        )
        _open_peers.append(self)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=daemon.host)
        self.sock = sock
        self.session = ClientSession(
            ident, secret, crypto.random_nonce(), fingerprint=fingerprint, mac=mac
        )
        self.events: deque[tuple] = deque()
        self.eof = False
        self.eof_at = 0.0
        self.error_at = 0.0

    # -- reading

    def _recv(self, deadline: float) -> bool:
        """Read once; False if nothing came before the deadline."""
        remaining = deadline - time.monotonic()
        if self.eof or remaining <= 0:
            return False
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        except ConnectionResetError:
            pytest.fail(f"the daemon reset the connection; events left unread: {list(self.events)}")
        now = time.monotonic()
        if not data:
            self.eof, self.eof_at = True, now
            return True
        for event in self.session.receive_data(data):
            if event[0] == ERROR:
                self.error_at = now
            self.events.append(event)
        return True

    def next_event(self, timeout: float = WAIT) -> tuple | None:
        """The next event; None at EOF; AssertionError if nothing came within `timeout`."""
        deadline = time.monotonic() + timeout
        while not self.events:
            if self.eof:
                return None
            if not self._recv(deadline):
                raise AssertionError(f"nothing from the daemon within {timeout} s")
        return self.events.popleft()

    def expect(self, kind: int, timeout: float = WAIT) -> tuple:
        event = self.next_event(timeout)
        assert event is not None and event[0] == kind, f"expected {kind!r}, got {event}"
        return event

    def expect_ack(self, seq: int) -> None:
        assert self.next_event() == (ACK, seq)

    def expect_nack(self, seq: int, code: str) -> str:
        event = self.next_event()
        assert event is not None and event[:3] == (NACK, seq, code), event
        return event[3]

    def ack_to(self, seq: int) -> list[int]:
        """Read ACKs until one covers `seq`; anything but an ACK fails. Returns the ACK seqs."""
        acks: list[int] = []
        while not acks or acks[-1] < seq:
            event = self.next_event()
            assert event is not None and event[0] == ACK, f"waiting for ACK {seq}: {event}"
            acks.append(event[1])
        assert acks[-1] == seq, acks
        assert acks == sorted(acks), f"ACKs went backwards: {acks}"
        return acks

    def until_closed(self, timeout: float = WAIT) -> list[tuple]:
        """Every event up to EOF (a reset fails the test)."""
        deadline = time.monotonic() + timeout
        events = []
        while True:
            event = self.next_event(max(0.0, deadline - time.monotonic()))
            if event is None:
                return events
            events.append(event)

    def expect_error(self, code: str, *, allow: tuple = (), timeout: float = WAIT) -> str:
        """ERROR `code`, then EOF (not a reset); returns its message.

        Only events of the kinds in `allow` may come before the ERROR.
        """
        events = self.until_closed(timeout)
        assert events, "EOF without an ERROR"
        *before, last = events
        assert last[0] == ERROR and last[1] == code, f"expected ERROR {code}, got {events}"
        assert all(e[0] in allow for e in before), events
        assert self.eof_at - self.error_at < PROMPT, "no prompt EOF after the ERROR"
        return last[2]

    def sync(self, seq: int = 0xC0FFEE, before: bytes = b"") -> list[tuple]:
        """PING (after `before`, in one write) and wait for its PONG: the daemon has handled
        all sent before. Returns the events that came first."""
        self.send(before + self.frame(PING, seq))
        events = []
        while (event := self.next_event()) != (PONG, seq):
            assert event is not None and event[0] != ERROR, f"before PONG {seq}: {event}"
            events.append(event)
        return events

    # -- writing

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def frame(self, ftype: int, seq: int = 0, payload: bytes = b"", **kw) -> bytes:
        """A frame with the session MAC once welcomed."""
        return self.session.encode(ftype, seq, payload, **kw)

    def data(self, channel: int, seq: int, payload: bytes | None = None, ts_ns: int = 0) -> None:
        if payload is None:
            payload = b"frame %d" % seq
        self.send(self.frame(DATA, seq, payload, channel=channel, ts_ns=ts_ns))

    def challenge(self) -> dict:
        deadline = time.monotonic() + WAIT
        while self.session.challenge is None:
            assert self._recv(deadline), "no CHALLENGE"
            assert not self.eof, "EOF before CHALLENGE"
        return self.session.challenge

    def hello(self, mutate=None) -> None:
        """Send the HELLO the session prepared, optionally changed by `mutate(dict)`, which
        returns the new dict or the raw payload bytes."""
        self.challenge()
        out = bytes(self.session.data_to_send())
        if mutate is not None:
            new = mutate(json.loads(out[32:-4]))
            payload = new if isinstance(new, bytes) else json.dumps(new).encode()
            out = encode_frame(HELLO, 0, payload)
        self.send(out)

    def handshake(self) -> tuple:
        """HELLO until WELCOME (whose proof the session verifies); returns the WELCOME event."""
        self.hello()
        event = self.next_event()
        assert event is not None, "EOF instead of WELCOME"
        assert event[0] == WELCOME, f"expected WELCOME first, got {event}"
        assert self.session.welcomed
        return event

    def bye(self) -> int:
        """BYE: the final ACK then EOF; returns the ACK's seq."""
        self.send(self.frame(BYE))
        events = self.until_closed()
        assert events and all(e[0] == ACK for e in events), events
        return events[-1][1]

    def close(self) -> None:
        self.sock.close()


def dump(d: Daemon, ident: str | None = None) -> list[dict]:
    """`module-ingest dump` as a list of records."""
    args = ("dump", "--identity", ident) if ident else ("dump",)
    result = cli(*args, data_dir=d.data_dir)
    assert result.returncode == 0, result.stderr.decode()
    return [json.loads(line) for line in result.stdout.splitlines()]


def stored(d: Daemon, ident: str = DEV) -> list[int]:
    """The seqs stored for `ident`, in log order."""
    return [rec["seq"] for rec in dump(d, ident)]


def assert_healthy(d: Daemon) -> None:
    """The daemon runs and never hit an internal error (which closes a connection silently)."""
    assert d.proc is not None and d.proc.poll() is None, f"daemon exited:\n{d.log()}"
    assert "Traceback" not in d.log() and "internal error" not in d.log(), d.log()


def start_with(daemon_factory, config: str, *identities: tuple[str, ...], revoked=()):
    """A daemon with identities added (and some revoked) before it starts, so that it
    knows them from its first HELLO on; returns it and {id: token}."""
    d = daemon_factory(config, start=False)
    tokens = {ident: d.add_identity(ident, *args) for ident, *args in identities}
    for ident in revoked:
        result = cli("identity", "revoke", ident, data_dir=d.data_dir)
        assert result.returncode == 0, result.stderr.decode()
    d.start()
    return d, tokens


# -- handshake (§4) ----------------------------------------------------------------


NO_MAC = "m/no-mac"
ALL_MACS = ",".join(crypto.MAC_ALGORITHMS)


def opt_in_to_none(d: Daemon) -> str:
    """The token of NO_MAC, a module like dev/core-0 whose policy allows mac "none" too."""
    return d.add_identity(NO_MAC, "--kind", "module", "--channels", "1-8", "--mac", ALL_MACS)


def test_handshake_welcomes_with_every_mac_and_fresh_nonces(daemon):
    nonces = set()
    token = opt_in_to_none(daemon)
    for seq, mac in enumerate(crypto.MAC_ALGORITHMS, start=1):
        peer = Peer(daemon, NO_MAC, token, mac=mac)
        challenge = peer.challenge()
        assert challenge["version"] == 1
        assert challenge["max_payload"] == 65536
        assert challenge["idle_timeout"] == 3
        assert re.fullmatch(r"[0-9a-f]{32}", challenge["nonce"])
        nonces.add(challenge["nonce"])
        # PING is allowed before HELLO and answered
        peer.send(encode_frame(PING, 77))
        assert peer.next_event() == (PONG, 77)
        # the session checked the WELCOME proof (ProtocolViolation otherwise)
        assert peer.handshake() == (WELCOME, seq - 1, DEV_CHANNELS)
        peer.data(1, seq)
        peer.expect_ack(seq)
        assert peer.bye() == seq
    assert len(nonces) == 3
    assert stored(daemon, NO_MAC) == [1, 2, 3]
    # the proof is compared as lowercase hex: an uppercase one is the same proof
    peer = Peer(daemon, NO_MAC, token)
    peer.hello(lambda h: {**h, "proof": h["proof"].upper()})
    assert peer.expect(WELCOME)[1] == 3
    assert_healthy(daemon)


def test_every_failed_handshake_check_gives_the_same_auth_failed(daemon_factory):
    d, tokens = start_with(
        daemon_factory,
        "",
        ("m/fp", *CORE, "--fingerprint", FP),
        ("m/blake", *CORE, "--mac", "blake2s"),
        ("m/rev", *CORE),
        revoked=["m/rev"],
    )
    stranger = bytes(32)
    cases = {
        "unknown id": dict(ident="m/nobody", secret=stranger),
        "wrong token": dict(secret=stranger),
        "another identity's token": dict(ident="m/fp", token=d.dev_token, fingerprint=FP),
        "revoked": dict(ident="m/rev", token=tokens["m/rev"]),
        "fingerprint mismatch": dict(ident="m/fp", token=tokens["m/fp"], fingerprint=OTHER_FP),
        "no fingerprint": dict(ident="m/fp", token=tokens["m/fp"]),
        "mac not allowed": dict(ident="m/blake", token=tokens["m/blake"], mac="hmac-sha256"),
        "mac none not allowed": dict(ident="m/blake", token=tokens["m/blake"], mac="none"),
    }
    messages = {}
    for name, kw in cases.items():
        peer = Peer(d, **kw)
        peer.hello()
        messages[name] = peer.expect_error(ErrorCode.AUTH_FAILED)
    malformed = {
        "not JSON": lambda h: b"{not json",
        "not UTF-8": lambda h: b"\xff\xfe",
        "a JSON array": lambda h: [h],
        "a key missing": lambda h: {k: v for k, v in h.items() if k != "fingerprint"},
        "id not a string": lambda h: {**h, "id": 7},
        "uppercase nonce": lambda h: {**h, "nonce": h["nonce"].upper()},
        "short proof": lambda h: {**h, "proof": h["proof"][:-1]},
        "unknown mac": lambda h: {**h, "mac": "md5"},
        "deeply nested": lambda h: b"[" * 2000 + b"]" * 2000,  # within HELLO_MAX_PAYLOAD
    }
    for name, mutate in malformed.items():
        peer = Peer(d)
        peer.hello(mutate)
        messages[name] = peer.expect_error(ErrorCode.AUTH_FAILED)
    assert len(set(messages.values())) == 1, messages
    # a HELLO longer than a HELLO can be is refused from its header, before it is buffered
    peer = Peer(d)
    peer.hello(lambda h: {**h, "id": "x" * 60_000})
    assert "4096 in this state" in peer.expect_error(ErrorCode.TOO_LARGE)

    # the same identities pass with what their policy allows
    peer = Peer(d, "m/fp", tokens["m/fp"], fingerprint=FP)
    assert peer.handshake() == (WELCOME, 0, [1, 2, 3])
    peer = Peer(d, "m/blake", tokens["m/blake"], mac="blake2s")
    assert peer.handshake() == (WELCOME, 0, [1, 2, 3])
    peer.data(1, 1)
    peer.expect_ack(1)
    assert stored(d, "m/blake") == [1]
    assert_healthy(d)


# -- fatal framing errors (§2, §7) ---------------------------------------------------

FRAMING = {
    "bad magic": (header(PING, magic=0x4D4A), ErrorCode.BAD_MAGIC),
    "bad version": (header(PING, version=2), ErrorCode.BAD_MAGIC),
    "unknown flag": (header(PING, flags=0x0002), ErrorCode.BAD_FLAGS),
    "unknown flag with MAC": (header(PING, flags=0x8001), ErrorCode.BAD_FLAGS),
    "too large": (header(DATA, length=65537, channel=1, seq=1), ErrorCode.TOO_LARGE),
    # the order of §2: magic, flags, length, then the type
    "bad magic and flags": (header(PING, magic=0, flags=0xFFFF), ErrorCode.BAD_MAGIC),
    "bad flags and length": (header(PING, flags=4, length=1 << 31), ErrorCode.BAD_FLAGS),
    "too large, unknown type": (header(0x55, length=1 << 20), ErrorCode.TOO_LARGE),
}


@pytest.mark.parametrize("phase", ["before HELLO", "after WELCOME"])
@pytest.mark.parametrize("case", list(FRAMING))
def test_framing_errors_send_error_then_close(daemon, case, phase):
    bad, code = FRAMING[case]
    peer = Peer(daemon, mac="hmac-sha256")
    if phase == "before HELLO":
        peer.challenge()
    else:
        peer.handshake()
    # the rest of the frame, and more, follow at once: the server must discard
    # them and still let us read the ERROR (no reset)
    length = int.from_bytes(bad[8:12], "big")
    peer.send(bad + bytes(min(length, 65537) + 4) + b"trailing garbage" * 64)
    peer.expect_error(code)
    assert stored(daemon) == []
    assert_healthy(daemon)


def test_too_large_is_refused_from_the_header_alone(daemon_factory):
    """§2: `length` is checked against the announced max_payload before the payload is
    awaited; a payload of exactly max_payload is fine."""
    d = daemon_factory("[server]\nmax_payload = 1024\n")
    peer = Peer(d)
    assert peer.challenge()["max_payload"] == 1024
    peer.handshake()
    peer.data(1, 1, b"x" * 1024)
    peer.expect_ack(1)
    peer.send(header(DATA, length=1025, channel=1, seq=2))  # and no payload at all
    peer.expect_error(ErrorCode.TOO_LARGE)
    assert stored(d) == [1]


# -- state rules (§3) ----------------------------------------------------------------

EARLY = {
    "DATA": encode_frame(DATA, 1, b"early", channel=1),
    "BYE": encode_frame(BYE),
    "ACK": encode_frame(ACK, 1),
    "unknown type": encode_frame(0x55, 1, b"?"),
    "PING with a MAC": encode_frame(PING, 1, mac_fn=lambda body: bytes(16)),
    "DATA with a MAC": encode_frame(DATA, 1, b"early", channel=1, mac_fn=lambda b: bytes(16)),
    "DATA header only": header(DATA, length=1000, channel=1, seq=1),
}


@pytest.mark.parametrize("case", list(EARLY))
def test_anything_but_hello_or_ping_before_welcome_is_unauthenticated(daemon, case):
    peer = Peer(daemon)
    peer.challenge()
    peer.send(EARLY[case])
    peer.expect_error(ErrorCode.UNAUTHENTICATED)
    # nothing was stored: a later, acknowledged frame is the only one in the log
    peer = Peer(daemon)
    peer.handshake()
    peer.data(1, 1)
    peer.expect_ack(1)
    assert [(r["seq"], r["payload_b64"]) for r in dump(daemon)] == [(1, "ZnJhbWUgMQ==")]


def test_hello_with_a_mac_trailer_is_unauthenticated(daemon):
    peer = Peer(daemon)
    peer.challenge()
    hello = bytes(peer.session.data_to_send())
    payload = hello[32:-4]
    peer.send(encode_frame(HELLO, 0, payload, mac_fn=lambda body: bytes(16)))
    peer.expect_error(ErrorCode.UNAUTHENTICATED)


def test_bad_type_after_welcome_is_nacked_and_the_connection_stays(daemon):
    peer = Peer(daemon, mac="hmac-sha256")
    peer.handshake()
    refused = [HELLO, CHALLENGE, WELCOME, ACK, NACK, ERROR, 0x55, 0x00, 0xFF]
    for seq, ftype in enumerate(refused, start=100):
        peer.send(peer.frame(ftype, seq, b'{"code":"X","message":"m"}'))
        peer.expect_nack(seq, ErrorCode.BAD_TYPE)
    # without a MAC too: the type is checked first (§2)
    peer.send(encode_frame(0x55, 120, b"abc"))
    peer.expect_nack(120, ErrorCode.BAD_TYPE)
    # §2: refused from the header, before its payload arrives; the stream stays in sync
    peer.send(header(0x55, length=5000, seq=121, flags=FLAG_MAC))
    peer.expect_nack(121, ErrorCode.BAD_TYPE)
    peer.send(bytes(5000 + 4 + 16))
    # an unsolicited PONG is ignored: the next answer is the PING's
    peer.send(peer.frame(PONG, 5))
    assert peer.sync(6) == []
    peer.data(1, 1)
    peer.expect_ack(1)
    assert stored(daemon) == [1]
    assert_healthy(daemon)


# -- timeouts (§3, §4, §7) -----------------------------------------------------------


def test_no_hello_in_time_is_timeout_and_ping_does_not_extend_it(daemon_factory):
    d = daemon_factory(TIMEOUTS)
    silent, pinger = Peer(d), Peer(d)
    start = time.monotonic()
    silent.challenge()
    pinger.challenge()
    pongs = 0
    while True:
        pinger.send(encode_frame(PING, pongs + 1))
        event = pinger.next_event()
        if event is None or event[0] == ERROR:
            break
        assert event == (PONG, pongs + 1)
        pongs += 1
        # paced at 0.2 s: fifty PINGs outlast a 1 s handshake timeout tenfold
        assert pongs < 50, "PINGs kept the handshake open"
        # pace the PINGs: anything the daemon sends meanwhile ends the loop above
        pinger._recv(time.monotonic() + 0.2)
    elapsed = time.monotonic() - start
    assert pongs >= 3
    assert elapsed >= 0.9, elapsed  # not before the handshake timeout
    assert event is not None and event[1] == ErrorCode.TIMEOUT
    pinger.events.appendleft(event)
    pinger.expect_error(ErrorCode.TIMEOUT)
    silent.expect_error(ErrorCode.TIMEOUT)
    assert_healthy(d)


def test_idle_past_idle_timeout_is_timeout_and_ping_keeps_alive(daemon_factory):
    d, tokens = start_with(daemon_factory, TIMEOUTS, ("m/core-1", *CORE))
    silent = Peer(d)
    pinger = Peer(d, "m/core-1", tokens["m/core-1"], mac="blake2s")
    silent.handshake()
    pinger.handshake()
    welcomed = time.monotonic()
    seq = 0
    while time.monotonic() - welcomed < 2.5:  # 2.5 idle timeouts
        seq += 1
        last_ping = time.monotonic()
        assert pinger.sync(seq) == []
        assert pinger._recv(time.monotonic() + 0.25) is False  # pace; nothing may arrive
    silent.expect_error(ErrorCode.TIMEOUT)
    pinger.expect_error(ErrorCode.TIMEOUT)
    assert pinger.error_at - last_ping >= 0.9, pinger.error_at - last_ping  # not before
    assert_healthy(d)


# -- identity: superseded, revoked (§4, §7) ---------------------------------------------


def test_second_connection_supersedes_the_first(daemon):
    first = Peer(daemon, mac="hmac-sha256")
    first.handshake()
    first.data(1, 1)
    first.expect_ack(1)
    # frames accepted but maybe not yet durable when the second HELLO arrives
    first.send(b"".join(first.frame(DATA, s, b"p%d" % s, channel=2) for s in range(2, 51)))
    first.sync()
    second = Peer(daemon, mac="blake2s")
    # §4.4: WELCOME's last_seq covers every frame accepted from the older connection
    assert second.handshake() == (WELCOME, 50, DEV_CHANNELS)
    first.expect_error(ErrorCode.SUPERSEDED, allow=(ACK,))
    second.data(3, 51)
    second.expect_ack(51)
    second.data(3, 50)  # an honest resend: ACK, not stored again
    second.expect_ack(51)
    assert stored(daemon) == list(range(1, 52))
    assert second.bye() == 51
    assert_healthy(daemon)


def test_superseding_during_a_commit_gets_welcome_before_any_ack(daemon):
    """The new connection's HELLO arrives while the old one's frames are being
    committed: it waits for that commit, and its first frame is WELCOME."""
    first = Peer(daemon)
    first.handshake()
    big = b"x" * 4096
    first.send(b"".join(first.frame(DATA, s, big, channel=1) for s in range(1, 1001)))
    second = Peer(daemon)
    welcome = second.handshake()  # asserts WELCOME is the first event
    assert welcome[1] == stored(daemon)[-1]  # last_seq is durable: it is in the log
    second.data(1, 5000)
    second.expect_ack(5000)


def test_revoke_while_connected_closes_with_revoked(daemon_factory):
    d, tokens = start_with(daemon_factory, "", ("m/core-1", *CORE))
    peer = Peer(d, "m/core-1", tokens["m/core-1"], mac="hmac-sha256")
    peer.handshake()
    peer.data(2, 1)
    peer.expect_ack(1)
    revoked_at = time.monotonic()
    result = cli("identity", "revoke", "m/core-1", data_dir=d.data_dir)
    assert result.returncode == 0, result.stderr.decode()
    peer.expect_error(ErrorCode.REVOKED)
    assert peer.error_at - revoked_at < 2.0
    again = Peer(d, "m/core-1", tokens["m/core-1"], mac="hmac-sha256")
    again.hello()
    again.expect_error(ErrorCode.AUTH_FAILED)
    assert stored(d, "m/core-1") == [1]  # acknowledged data stays
    assert_healthy(d)


# -- per-frame errors (§5, §7) -----------------------------------------------------------


def test_bad_crc_is_nacked_and_the_connection_stays(daemon):
    peer = Peer(daemon, mac="hmac-sha256")
    peer.handshake()
    flipped = bytearray(peer.frame(DATA, 1, b"payload", channel=1))
    flipped[33] ^= 0x01  # a payload byte: the CRC (checked before the MAC) fails
    peer.send(bytes(flipped))
    peer.expect_nack(1, ErrorCode.BAD_CRC)
    bad_crc = bytearray(peer.frame(DATA, 2, b"payload", channel=1))
    bad_crc[-17] ^= 0xFF  # the CRC itself
    peer.send(bytes(bad_crc))
    peer.expect_nack(2, ErrorCode.BAD_CRC)
    peer.data(1, 3)
    peer.expect_ack(3)
    assert stored(daemon) == [3]


def test_bad_crc_in_a_session_without_mac(daemon):
    peer = Peer(daemon, NO_MAC, opt_in_to_none(daemon), mac="none")
    peer.handshake()
    frame = bytearray(peer.frame(DATA, 1, b"payload", channel=1))
    frame[-1] ^= 0x80
    peer.send(bytes(frame))
    peer.expect_nack(1, ErrorCode.BAD_CRC)
    peer.data(1, 2)
    peer.expect_ack(2)
    assert stored(daemon, NO_MAC) == [2]


def test_bad_crc_then_bad_magic_closes_with_error(daemon):
    peer = Peer(daemon)
    peer.handshake()
    frame = bytearray(peer.frame(DATA, 1, b"payload", channel=1))
    frame[-1] ^= 0x80
    peer.send(bytes(frame) + header(PING, magic=0x1234))
    peer.expect_error(ErrorCode.BAD_MAGIC, allow=(NACK,))


def test_bad_mac_wrong_missing_or_unexpected(daemon):
    peer = Peer(daemon, mac="hmac-sha256")
    peer.handshake()
    session = peer.session
    key = crypto.session_key(session.secret, session.server_nonce, session.nonce, DEV, session.mac)
    good = peer.frame(DATA, 1, b"a", channel=1)
    wrong_byte = good[:-1] + bytes([good[-1] ^ 1])
    no_mac = encode_frame(DATA, 2, b"b", channel=1)
    other_key = encode_frame(
        DATA, 3, b"c", channel=1, mac_fn=crypto.make_mac("hmac-sha256", bytes(32))
    )
    other_algorithm = encode_frame(DATA, 4, b"d", channel=1, mac_fn=crypto.make_mac("blake2s", key))
    for seq, frame in enumerate([wrong_byte, no_mac, other_key, other_algorithm], start=1):
        peer.send(frame)
        peer.expect_nack(seq, ErrorCode.BAD_MAC)
    peer.data(1, 5)
    peer.expect_ack(5)
    assert stored(daemon) == [5]
    assert peer.bye() == 5

    # blake2s session: a missing MAC, and a PING without one
    peer = Peer(daemon, mac="blake2s")
    peer.handshake()
    peer.send(encode_frame(DATA, 6, b"e", channel=1))
    peer.expect_nack(6, ErrorCode.BAD_MAC)
    peer.send(encode_frame(PING, 7))
    peer.expect_nack(7, ErrorCode.BAD_MAC)
    assert peer.bye() == 5

    # mac "none": a frame with the MAC flag gets BAD_MAC
    peer = Peer(daemon, NO_MAC, opt_in_to_none(daemon), mac="none")
    assert peer.handshake()[1] == 0
    peer.send(encode_frame(DATA, 8, b"f", channel=1, mac_fn=lambda body: bytes(16)))
    peer.expect_nack(8, ErrorCode.BAD_MAC)
    peer.data(1, 9)
    peer.expect_ack(9)
    assert stored(daemon) == [5]
    assert stored(daemon, NO_MAC) == [9]
    assert_healthy(daemon)


def test_channel_outside_scope_is_denied_and_not_stored(daemon_factory):
    d, tokens = start_with(daemon_factory, "", ("m/core-1", *CORE))
    peer = Peer(d, "m/core-1", tokens["m/core-1"], mac="hmac-sha256")
    assert peer.handshake() == (WELCOME, 0, [1, 2, 3])
    peer.data(4, 1)
    peer.expect_nack(1, ErrorCode.DENIED)
    peer.data(0, 2)
    peer.expect_nack(2, ErrorCode.DENIED)
    peer.data(3, 3)
    peer.expect_ack(3)
    peer.data(65535, 4)
    peer.expect_nack(4, ErrorCode.DENIED)
    peer.sync()
    records = dump(d)
    assert [(r["id"], r["channel"], r["seq"]) for r in records] == [("m/core-1", 3, 3)]
    # the dev identity may write channel 8 but not 9
    dev = Peer(d)
    dev.handshake()
    dev.data(9, 1)
    dev.expect_nack(1, ErrorCode.DENIED)
    dev.data(8, 2)
    dev.expect_ack(2)
    assert stored(d) == [2]
    assert_healthy(d)


def test_quota_reached_is_busy_and_not_stored(daemon_factory):
    """Segments are 1 MiB, preallocated; a 2.5 MiB quota leaves no room for a third, so
    frames that would need it get BUSY, and nothing is stored past that point."""
    d = daemon_factory(
        "[storage]\nquota_bytes = 2621440\nsegment_bytes = 1048576\nring_bytes = 1048576\n"
    )
    peer = Peer(d, mac="hmac-sha256")
    peer.handshake()
    busy_seq = None
    seq = 0
    while busy_seq is None and seq < 4000:
        batch = range(seq + 1, seq + 51)
        frames = b"".join(peer.frame(DATA, s, bytes([s % 251]) * 1000, channel=1) for s in batch)
        # one write: a refused frame pauses reading, but the PING in the same read is answered
        for event in peer.sync(before=frames):
            if event[0] == NACK and busy_seq is None:
                assert event[2] == ErrorCode.BUSY, event
                busy_seq = event[1]
        seq = batch[-1]
    # two segments of 1 MiB hold about 2000 records of 1 KiB
    assert busy_seq is not None and 1500 <= busy_seq <= 2100, busy_seq
    assert stored(d) == list(range(1, busy_seq))
    # after a reconnect the core is refused again, and its connection stays open
    again = Peer(d)
    again.handshake()
    again.data(2, seq + 1, b"small")
    again.expect_nack(seq + 1, ErrorCode.BUSY)
    assert stored(d) == list(range(1, busy_seq))
    assert_healthy(d)


# -- seq, replay, ACK, BYE (§6) -----------------------------------------------------


def test_replays_after_reconnect_are_acked_and_stored_once(daemon):
    peer = Peer(daemon, mac="hmac-sha256")
    peer.handshake()
    peer.send(b"".join(peer.frame(DATA, s, b"first %d" % s, channel=1) for s in range(1, 6)))
    peer.ack_to(5)
    peer.close()  # no BYE: as if the link dropped

    peer = Peer(daemon, mac="hmac-sha256")
    assert peer.handshake()[1] == 5
    for seq in (3, 4, 5, 0):
        peer.data(1, seq, b"resent")
        peer.expect_ack(5)
    peer.data(1, 6)
    peer.expect_ack(6)
    for seq in (6, 2):  # duplicates within one connection
        peer.data(1, seq, b"resent")
        peer.expect_ack(6)
    records = dump(daemon)
    assert [(r["seq"], base64.b64decode(r["payload_b64"])) for r in records] == [
        *((s, b"first %d" % s) for s in range(1, 6)),
        (6, b"frame 6"),
    ]
    assert_healthy(daemon)


def test_seq_zero_on_a_fresh_identity_is_a_replay(daemon):
    peer = Peer(daemon)
    peer.handshake()
    peer.data(1, 0)
    peer.expect_ack(0)
    peer.data(1, 1)
    peer.expect_ack(1)
    assert stored(daemon) == [1]


def test_restart_keeps_last_seq_and_refuses_replays(daemon):
    peer = Peer(daemon, mac="blake2s")
    peer.handshake()
    peer.send(b"".join(peer.frame(DATA, s, channel=1) for s in (1, 2, 5, 9)))
    peer.ack_to(9)
    assert peer.bye() == 9
    assert daemon.stop() == 0

    daemon.start()
    peer = Peer(daemon, mac="blake2s")
    assert peer.handshake() == (WELCOME, 9, DEV_CHANNELS)
    for seq in (5, 9, 3):
        peer.data(1, seq, b"replayed")
        peer.expect_ack(9)
    peer.data(1, 10)
    peer.expect_ack(10)
    daemon.kill()  # an ACK survives kill -9

    daemon.start()
    peer = Peer(daemon)
    assert peer.handshake()[1] == 10
    peer.data(1, 10, b"replayed")
    peer.expect_ack(10)
    assert stored(daemon) == [1, 2, 5, 9, 10]
    assert_healthy(daemon)


def test_bye_commits_acks_and_closes(daemon):
    """§6: on BYE the server commits, ACKs the durable seq, then closes, also when the
    DATA frames and the BYE arrive in one read."""
    peer = Peer(daemon, mac="hmac-sha256")
    peer.handshake()
    frames = b"".join(peer.frame(DATA, s, channel=1) for s in (1, 2, 3))
    after = peer.frame(DATA, 4, channel=1)
    peer.send(frames + peer.frame(BYE) + after)  # bytes after BYE are discarded
    events = peer.until_closed()
    assert events and events[-1] == (ACK, 3), events
    assert all(e[0] == ACK for e in events), events
    assert stored(daemon) == [1, 2, 3]
    # BYE with nothing new still gets an ACK with the durable seq
    peer = Peer(daemon)
    assert peer.handshake()[1] == 3
    assert peer.bye() == 3
    assert stored(daemon) == [1, 2, 3]


def test_an_ack_means_the_frames_are_in_the_log(daemon):
    peer = Peer(daemon, mac="hmac-sha256")
    peer.handshake()
    n = 300
    sent = {
        s: (s % 8 + 1, 1_700_000_000_000_000_000 + s, b"payload %d" % s) for s in range(1, n + 1)
    }
    for chunk in (range(1, 2), range(2, 52), range(52, n + 1)):
        peer.send(
            b"".join(
                peer.frame(DATA, s, sent[s][2], channel=sent[s][0], ts_ns=sent[s][1]) for s in chunk
            )
        )
        ack = peer.expect(ACK)[1]
        assert chunk.start <= ack <= chunk[-1], (chunk, ack)
        # at the moment the ACK arrives, every frame up to it is in the log
        assert stored(daemon)[:ack] == list(range(1, ack + 1))
        if ack < chunk[-1]:
            peer.ack_to(chunk[-1])
    records = dump(daemon)
    assert [r["seq"] for r in records] == list(range(1, n + 1))
    for r in records:
        channel, ts_ns, payload = sent[r["seq"]]
        assert (r["id"], r["channel"], r["ts_ns"]) == (DEV, channel, ts_ns)
        assert r["payload_b64"] == base64.b64encode(payload).decode()
        assert abs(r["recv_ns"] - time.time_ns()) < 60 * 10**9
    assert_healthy(daemon)


def test_client_library_streams_and_gets_acks(daemon):
    with Client(daemon.host, daemon.port, DEV, daemon.dev_token) as client:
        for i in range(50):
            client.send(1 + i % 8, b"line %d" % i)
        client.flush()
        assert client.acked == 50 and client.rejected == []
    assert stored(daemon) == list(range(1, 51))


# -- garbage (§7: never crash, hang or lose acknowledged data) -------------------------


def _serves_a_good_client(d: Daemon, seq: int) -> None:
    with Client(d.host, d.port, DEV, d.dev_token, timeout=WAIT) as client:
        client.next_seq = seq
        client.send(1, b"good %d" % seq)
        client.flush()
        assert client.acked == seq


def test_garbage_and_half_frames_never_crash_the_daemon(daemon):
    rng = random.Random(20261127)
    # random bytes, then close without reading
    for _ in range(30):
        with socket.create_connection((daemon.host, daemon.port), timeout=WAIT) as sock:
            sock.sendall(rng.randbytes(rng.randint(1, 5000)))
    # random bytes that do not start with the magic: read ERROR BAD_MAGIC and EOF
    peer = Peer(daemon)
    peer.challenge()
    peer.send(b"\x00" + rng.randbytes(3000))
    peer.expect_error(ErrorCode.BAD_MAGIC)
    # half-written frames, before and after the handshake, then close
    for cut in (1, 16, 31, 32, 40):
        peer = Peer(daemon)
        peer.challenge()
        peer.send(bytes(peer.session.data_to_send())[:cut])  # part of the HELLO
        peer.close()
    for cut in (1, 20, 32, 40, -17, -1):
        peer = Peer(daemon, mac="hmac-sha256")
        peer.handshake()
        peer.send(peer.frame(DATA, 1000, b"half" * 100, channel=1)[:cut])
        peer.sock.shutdown(socket.SHUT_WR)  # our EOF mid-frame: the daemon closes too
        assert peer.until_closed() == []
    _serves_a_good_client(daemon, 1)
    assert stored(daemon) == [1]  # no half frame was stored
    # bit flips in a valid stream after the handshake
    for round_ in range(20):
        peer = Peer(daemon, mac="hmac-sha256")
        peer.handshake()
        stream = bytearray(
            b"".join(peer.frame(DATA, 100 + s, rng.randbytes(50), channel=1) for s in range(5))
        )
        for _ in range(rng.randint(1, 4)):
            stream[rng.randrange(len(stream))] ^= 1 << rng.randrange(8)
        peer.send(bytes(stream))
        peer.sock.shutdown(socket.SHUT_WR)
        for event in peer.until_closed():
            assert event[0] in (ACK, NACK, ERROR), (round_, event)
    _serves_a_good_client(daemon, 2000)
    assert 2000 in stored(daemon)
    assert_healthy(daemon)


# -- TLS -----------------------------------------------------------------------------

TLS_LISTENING = re.compile(r"listening on ([0-9.]+):(\d+), ([0-9.]+):(\d+)")


@pytest.fixture
def tls_daemon(daemon_factory, tmp_path):
    """A daemon with a plaintext and a TLS listener; returns it, the TLS port, the CA file."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl CLI to make a certificate")
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt"),
            *("ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=IP:127.0.0.1", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    d = daemon_factory(
        "[server]\nhandshake_timeout = 1.0\n"
        f'[tls]\nenabled = true\nlisten = "127.0.0.1:0"\ncert = "{cert}"\nkey = "{key}"\n'
    )
    matches = TLS_LISTENING.findall(d.log())
    assert matches, d.log()
    _, port, _, tls_port = matches[-1]
    assert int(port) == d.port
    assert d.ready["X_LISTEN"] == f"127.0.0.1:{port}, 127.0.0.1:{tls_port}"  # READY=1 says so too
    return d, int(tls_port), str(cert)


def test_tls_client_streams_and_gets_acks(tls_daemon):
    d, port, ca = tls_daemon
    ctx = ssl.create_default_context(cafile=ca)
    with Client(d.host, port, DEV, d.dev_token, tls=ctx, timeout=WAIT) as client:
        for i in range(200):
            client.send(1 + i % 8, b"tls %d" % i)
        client.flush()
        assert client.acked == 200 and client.rejected == []
    assert stored(d) == list(range(1, 201))
    # a raw session over TLS: NACKs keep it open, an ERROR arrives before the close
    peer = Peer(d, port=port, tls=ctx, mac="blake2s")
    assert peer.handshake()[1] == 200
    peer.data(9, 201)
    peer.expect_nack(201, ErrorCode.DENIED)
    peer.data(1, 202)
    peer.expect_ack(202)
    peer.send(header(PING, flags=2))
    peer.expect_error(ErrorCode.BAD_FLAGS)
    assert stored(d) == [*range(1, 201), 202]
    assert_healthy(d)


def test_plaintext_mip_on_the_tls_port_does_not_crash_the_daemon(tls_daemon):
    d, port, ca = tls_daemon
    silent = socket.create_connection((d.host, port), timeout=WAIT)  # never says anything
    with socket.create_connection((d.host, port), timeout=WAIT) as sock:
        # a plaintext client waits for CHALLENGE; the TLS port waits for a ClientHello
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(100)
        sock.settimeout(WAIT)
        sock.sendall(encode_frame(PING, 1) + encode_frame(HELLO, 0, b'{"id":"dev/core-0"}'))
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(4096):
                received += chunk
        assert not received.startswith(b"MI"), "plaintext MIP answered on the TLS port"
    # the silent one is dropped after the handshake timeout (plus at most the linger)
    silent.settimeout(WAIT)
    with contextlib.suppress(ConnectionResetError):
        assert not silent.recv(4096).startswith(b"MI")
    silent.close()
    ctx = ssl.create_default_context(cafile=ca)
    with Client(d.host, port, DEV, d.dev_token, tls=ctx, timeout=WAIT) as client:
        client.send(1, b"after")
        client.flush()
        assert client.acked == 1
    _serves_a_good_client(d, 2)
    assert stored(d) == [1, 2]
    assert d.proc.poll() is None
