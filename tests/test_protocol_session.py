"""ServerSession and ClientSession talking to each other in memory (PROTOCOL.md §3-§7)."""

import hmac
import json
import struct
import zlib

import pytest

from appliance.protocol import crypto
from appliance.protocol.client_session import ClientSession, ProtocolViolation
from appliance.protocol.frames import FrameType, encode_frame
from appliance.protocol.session import BYE, CLOSED, DATA, HELLO, ServerSession, State, parse_hello

SECRET = bytes(range(32))
OTHER_SECRET = bytes(range(1, 33))
IDENT = "m-0007/core-2"
SN = "00112233445566778899aabbccddeeff"
CN = "ffeeddccbbaa99887766554433221100"
MACS = ["none", "hmac-sha256", "blake2s"]


def parse_frames(data):
    """(type, flags, seq, payload) of every frame in `data`, parsed straight from §2."""
    frames = []
    pos = 0
    while pos < len(data):
        _, _, ftype, flags, _, length, _, seq, _ = struct.unpack_from(">HBBHHIIQQ", data, pos)
        end = pos + 32 + length
        assert zlib.crc32(data[pos:end]) == int.from_bytes(data[end : end + 4], "big")
        frames.append((ftype, flags, seq, bytes(data[pos + 32 : end])))
        pos = end + 4 + (16 if flags & 1 else 0)
    assert pos == len(data)
    return frames


def sent(server):
    """What the server queued, as (type, seq, payload) with JSON payloads decoded."""
    out = []
    for ftype, flags, seq, payload in parse_frames(server.data_to_send()):
        assert flags == 0, "frames the server sends never carry a MAC"
        if ftype in (FrameType.CHALLENGE, FrameType.WELCOME, FrameType.NACK, FrameType.ERROR):
            payload = json.loads(payload)
        out.append((ftype, seq, payload))
    return out


def codes(frames):
    return [(ftype, seq, payload["code"]) for ftype, seq, payload in frames]


def hello_payload(**changes):
    hello = {
        "id": IDENT,
        "nonce": CN,
        "fingerprint": "",
        "mac": "none",
        "proof": crypto.hello_proof(SECRET, SN, CN, IDENT, "", "none"),
    }
    hello.update(changes)
    return json.dumps(hello).encode()


def hello_frame(**changes):
    return encode_frame(FrameType.HELLO, 0, hello_payload(**changes))


def new_server(**kw):
    server = ServerSession(SN, **kw)
    [(ftype, _, _)] = sent(server)
    assert ftype == FrameType.CHALLENGE
    return server


def handshake(mac="none", *, fingerprint="", last_seq=0, channels=(1, 2)):
    """A full handshake between the two sides; returns (server, client) with WELCOME done."""
    server = ServerSession(SN)
    client = ClientSession(IDENT, SECRET, CN, fingerprint=fingerprint, mac=mac)
    assert client.receive_data(server.data_to_send()) == []

    events = server.receive_data(client.data_to_send())
    assert len(events) == 1
    kind, hello = events[0]
    assert kind == HELLO
    # the caller's check (auth/): the proof for this identity's secret
    expected = crypto.hello_proof(
        SECRET, SN, hello["nonce"], hello["id"], hello["fingerprint"], hello["mac"]
    )
    assert hmac.compare_digest(hello["proof"], expected)

    assert server.accept(SECRET, last_seq, list(channels)) == []
    assert client.receive_data(server.data_to_send()) == [
        (FrameType.WELCOME, last_seq, list(channels))
    ]
    assert client.welcomed
    return server, client


def deliver(client, server):
    return server.receive_data(client.data_to_send())


# -- handshake ---------------------------------------------------------------


def test_challenge_announces_nonce_and_limits():
    server = ServerSession(SN, server_name="board-1", max_payload=4096, idle_timeout=30)
    [(ftype, _, challenge)] = sent(server)
    assert ftype == FrameType.CHALLENGE
    assert challenge == {
        "server": "board-1",
        "nonce": SN,
        "version": 1,
        "max_payload": 4096,
        "idle_timeout": 30,
    }


@pytest.mark.parametrize("mac", MACS)
def test_full_handshake(mac):
    fingerprint = "sha256:" + "ab" * 32
    server = ServerSession(SN)
    client = ClientSession(IDENT, SECRET, CN, fingerprint=fingerprint, mac=mac)
    assert client.receive_data(server.data_to_send()) == []

    hello_bytes = bytes(client.data_to_send())
    [(ftype, flags, _, payload)] = parse_frames(hello_bytes)
    assert (ftype, flags) == (FrameType.HELLO, 0)
    assert json.loads(payload) == {
        "id": IDENT,
        "nonce": CN,
        "fingerprint": fingerprint,
        "mac": mac,
        "proof": crypto.hello_proof(SECRET, SN, CN, IDENT, fingerprint, mac),
    }

    events = server.receive_data(hello_bytes)
    assert events == [(HELLO, json.loads(payload))]
    assert sent(server) == []  # nothing until the caller decides

    assert server.accept(SECRET, 17, [3, 4]) == []
    assert server.identity == IDENT
    assert server.mac_algorithm == mac
    welcome = server.data_to_send()
    [(ftype, _, _, payload)] = parse_frames(welcome)
    assert ftype == FrameType.WELCOME
    assert json.loads(payload) == {
        "last_seq": 17,
        "channels": [3, 4],
        "proof": crypto.welcome_proof(SECRET, SN, CN, IDENT, mac),
    }
    assert client.receive_data(welcome) == [(FrameType.WELCOME, 17, [3, 4])]
    assert client.welcomed


@pytest.mark.parametrize("mac", MACS)
def test_data_events_and_ack(mac):
    server, client = handshake(mac)
    client.send_data(1, 1, b"first", ts_ns=1700000000000000000)
    client.send_data(2, 2, b"")
    client.send_data(65535, 2**64 - 1, b"\x00" * 1000, ts_ns=5)
    assert deliver(client, server) == [
        (DATA, 1, 1, 1700000000000000000, b"first"),
        (DATA, 2, 2, 0, b""),
        (DATA, 65535, 2**64 - 1, 5, b"\x00" * 1000),
    ]
    assert sent(server) == []
    server.send_ack(2)
    assert client.receive_data(server.data_to_send()) == [(FrameType.ACK, 2)]


@pytest.mark.parametrize("mac", MACS)
def test_client_frames_carry_the_mac_exactly_when_the_session_uses_one(mac):
    _, client = handshake(mac)
    client.send_data(1, 1, b"x")
    [(_, flags, _, _)] = parse_frames(client.data_to_send())
    assert flags == (0 if mac == "none" else 1)


def test_data_split_byte_by_byte():
    server, client = handshake("blake2s")
    client.send_data(1, 10, b"abc")
    client.send(FrameType.PING, 11)
    client.send_data(1, 12, b"def")
    stream = bytes(client.data_to_send())
    events = []
    for i in range(len(stream)):
        events += server.receive_data(stream[i : i + 1])
    assert events == [(DATA, 1, 10, 0, b"abc"), (DATA, 1, 12, 0, b"def")]
    assert sent(server) == [(FrameType.PONG, 11, b"")]


def test_wrong_welcome_proof_is_a_protocol_violation():
    server = ServerSession(SN)
    client = ClientSession(IDENT, SECRET, CN)
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    server.accept(OTHER_SECRET, 0, [1])  # an impostor that does not hold the secret
    with pytest.raises(ProtocolViolation):
        client.receive_data(server.data_to_send())
    assert not client.welcomed


@pytest.mark.parametrize(
    "proof",
    [
        crypto.welcome_proof(SECRET, SN, CN, "someone-else", "hmac-sha256"),
        crypto.welcome_proof(SECRET, CN, SN, IDENT, "hmac-sha256"),
        crypto.hello_proof(SECRET, SN, CN, IDENT, "", "hmac-sha256"),
        # revision 2: a session with another MAC (a downgrade to "none") is refused
        crypto.welcome_proof(SECRET, SN, CN, IDENT, "none"),
        crypto.welcome_proof(SECRET, SN, CN, IDENT, "blake2s"),
        "",
        None,
        12345,
    ],
)
def test_welcome_with_a_forged_proof_is_refused(proof):
    client = ClientSession(IDENT, SECRET, CN)
    challenge = {"server": "x", "nonce": SN, "version": 1, "max_payload": 65536}
    client.receive_data(encode_frame(FrameType.CHALLENGE, 0, json.dumps(challenge).encode()))
    welcome = {"last_seq": 0, "channels": [1], "proof": proof}
    with pytest.raises(ProtocolViolation):
        client.receive_data(encode_frame(FrameType.WELCOME, 0, json.dumps(welcome).encode()))
    assert not client.welcomed


@pytest.mark.parametrize(
    "payload",
    [
        json.dumps({"last_seq": 0, "channels": [], "proof": "\u00e9" * 64}).encode(),
        b"[" * 50000,
        json.dumps(
            {
                "last_seq": "x",
                "channels": [],
                "proof": crypto.welcome_proof(SECRET, SN, CN, IDENT, "hmac-sha256"),
            }
        ).encode(),
    ],
    ids=["non-ascii proof", "deeply nested", "last_seq not a number"],
)
def test_malformed_welcome_is_a_protocol_violation(payload):
    client = ClientSession(IDENT, SECRET, CN)
    challenge = {"server": "x", "nonce": SN, "version": 1, "max_payload": 65536}
    client.receive_data(encode_frame(FrameType.CHALLENGE, 0, json.dumps(challenge).encode()))
    with pytest.raises(ProtocolViolation):
        client.receive_data(encode_frame(FrameType.WELCOME, 0, payload))


def test_welcome_before_challenge_is_refused():
    client = ClientSession(IDENT, SECRET, CN)
    welcome = {"last_seq": 0, "channels": [], "proof": "00" * 32}
    with pytest.raises(ProtocolViolation):
        client.receive_data(encode_frame(FrameType.WELCOME, 0, json.dumps(welcome).encode()))


# -- PING, PONG, BYE ----------------------------------------------------------


@pytest.mark.parametrize("mac", MACS)
def test_ping_is_answered_with_pong(mac):
    server, client = handshake(mac)
    client.send(FrameType.PING, 77)
    assert deliver(client, server) == []
    pong = server.data_to_send()
    assert parse_frames(pong) == [(FrameType.PONG, 0, 77, b"")]
    assert client.receive_data(pong) == [(FrameType.PONG, 77)]


def test_ping_before_welcome_is_answered():
    server = new_server()
    assert server.receive_data(encode_frame(FrameType.PING, 5)) == []
    assert sent(server) == [(FrameType.PONG, 5, b"")]
    # the handshake still works afterwards
    assert [e[0] for e in server.receive_data(hello_frame())] == [HELLO]


@pytest.mark.parametrize("mac", MACS)
def test_unsolicited_pong_is_ignored(mac):
    server, client = handshake(mac)
    client.send(FrameType.PONG, 123)
    assert deliver(client, server) == []
    assert sent(server) == []
    client.send_data(1, 1, b"still open")
    assert deliver(client, server) == [(DATA, 1, 1, 0, b"still open")]


@pytest.mark.parametrize("mac", MACS)
def test_bye_stops_decoding(mac):
    server, client = handshake(mac)
    client.send_data(1, 1, b"before")
    client.send(FrameType.BYE, 0)
    client.send_data(1, 2, b"after")
    client.send(FrameType.PING, 3)
    assert deliver(client, server) == [(DATA, 1, 1, 0, b"before"), (BYE,)]
    assert sent(server) == []  # no PONG, no NACK for what followed BYE
    client.send_data(1, 4, b"later")
    assert deliver(client, server) == []
    # the server still answers BYE with its ACK
    server.send_ack(1)
    assert client.receive_data(server.data_to_send()) == [(FrameType.ACK, 1)]


# -- before WELCOME -----------------------------------------------------------


@pytest.mark.parametrize(
    "ftype",
    [
        FrameType.DATA,
        FrameType.BYE,
        FrameType.PONG,
        FrameType.ACK,
        FrameType.NACK,
        FrameType.CHALLENGE,
        FrameType.WELCOME,
        FrameType.ERROR,
        0x55,
    ],
)
def test_frame_before_welcome_is_unauthenticated(ftype):
    server = new_server()
    events = server.receive_data(encode_frame(ftype, 1, b"payload", channel=1))
    assert [e[:2] for e in events] == [(CLOSED, "UNAUTHENTICATED")]
    assert codes(sent(server)) == [(FrameType.ERROR, 0, "UNAUTHENTICATED")]
    assert server.state is State.CLOSED
    assert server.receive_data(hello_frame()) == []
    assert sent(server) == []


def test_data_before_welcome_is_refused_from_its_header():
    server = new_server()
    big = encode_frame(FrameType.DATA, 1, bytes(60000), channel=1)
    events = server.receive_data(big[:32])
    assert [e[:2] for e in events] == [(CLOSED, "UNAUTHENTICATED")]
    assert codes(sent(server)) == [(FrameType.ERROR, 0, "UNAUTHENTICATED")]
    assert server.receive_data(big[32:]) == []
    assert server.buffered() == 0


def test_data_before_welcome_after_a_ping_is_unauthenticated():
    server = new_server()
    stream = encode_frame(FrameType.PING, 1) + encode_frame(FrameType.DATA, 2, b"x")
    events = server.receive_data(stream)
    assert [e[:2] for e in events] == [(CLOSED, "UNAUTHENTICATED")]
    assert sent(server) == [
        (FrameType.PONG, 1, b""),
        (FrameType.ERROR, 0, {"code": "UNAUTHENTICATED", "message": events[0][2]}),
    ]


@pytest.mark.parametrize("ftype", [FrameType.HELLO, FrameType.PING])
def test_mac_flag_before_welcome_is_unauthenticated(ftype):
    server = new_server()
    mac_fn = crypto.make_mac(
        "hmac-sha256", crypto.session_key(SECRET, SN, CN, IDENT, "hmac-sha256")
    )
    payload = hello_payload(mac="hmac-sha256") if ftype == FrameType.HELLO else b""
    events = server.receive_data(encode_frame(ftype, 0, payload, mac_fn=mac_fn))
    assert [e[:2] for e in events] == [(CLOSED, "UNAUTHENTICATED")]
    assert codes(sent(server)) == [(FrameType.ERROR, 0, "UNAUTHENTICATED")]


def test_bad_crc_before_welcome_is_nacked_and_the_handshake_goes_on():
    server = new_server()
    frame = bytearray(hello_frame())
    frame[40] ^= 0x01
    assert server.receive_data(bytes(frame)) == []
    assert codes(sent(server)) == [(FrameType.NACK, 0, "BAD_CRC")]
    assert [e[0] for e in server.receive_data(hello_frame())] == [HELLO]


MALFORMED_HELLOS = {
    "bad json": b'{"id": "m-0007/core-2",',
    "not utf-8": b'{"id": "\xff\xfe"}',
    "not an object": b'["m-0007/core-2"]',
    "empty": b"",
    "deeply nested": b"[" * 2000,  # within HELLO_MAX_PAYLOAD
    "missing id": json.dumps({k: v for k, v in json.loads(hello_payload()).items() if k != "id"}),
    "missing nonce": json.dumps(
        {k: v for k, v in json.loads(hello_payload()).items() if k != "nonce"}
    ),
    "missing fingerprint": json.dumps(
        {k: v for k, v in json.loads(hello_payload()).items() if k != "fingerprint"}
    ),
    "missing mac": json.dumps({k: v for k, v in json.loads(hello_payload()).items() if k != "mac"}),
    "missing proof": json.dumps(
        {k: v for k, v in json.loads(hello_payload()).items() if k != "proof"}
    ),
    "id not a string": hello_payload(id=7),
    "fingerprint null": hello_payload(fingerprint=None),
    "non-hex nonce": hello_payload(nonce="zz" + CN[2:]),
    "uppercase nonce": hello_payload(nonce=CN.upper()),
    "short nonce": hello_payload(nonce=CN[:-1]),
    "long nonce": hello_payload(nonce=CN + "0"),
    "short proof": hello_payload(proof=crypto.hello_proof(SECRET, SN, CN, IDENT, "", "none")[:-1]),
    "long proof": hello_payload(proof=crypto.hello_proof(SECRET, SN, CN, IDENT, "", "none") + "0"),
    "non-hex proof": hello_payload(proof="g" * 64),
    "unknown mac": hello_payload(mac="hmac-md5"),
    "mac uppercase": hello_payload(mac="BLAKE2S"),
    # revision 2 bounds, in bytes of UTF-8
    "id of 129 bytes": hello_payload(id="i" * 129),
    "id of 3000 characters": hello_payload(id="i" * 3000),  # within HELLO_MAX_PAYLOAD
    "id of 64 characters, 192 bytes": hello_payload(id="\u20ac" * 64),
    "fingerprint of 257 bytes": hello_payload(fingerprint="f" * 257),
    "fingerprint of 200 characters, 400 bytes": hello_payload(fingerprint="\u00e9" * 200),
}


def test_hello_fields_at_their_bounds_are_well_formed():
    hello = parse_hello(hello_payload(id="i" * 128, fingerprint="\u00e9" * 128))
    assert hello is not None and len(hello["fingerprint"].encode()) == 256


@pytest.mark.parametrize("payload", MALFORMED_HELLOS.values(), ids=MALFORMED_HELLOS.keys())
def test_malformed_hello_is_auth_failed(payload):
    if isinstance(payload, str):
        payload = payload.encode()
    server = new_server()
    events = server.receive_data(encode_frame(FrameType.HELLO, 0, payload))
    assert [e[:2] for e in events] == [(CLOSED, "AUTH_FAILED")]
    assert codes(sent(server)) == [(FrameType.ERROR, 0, "AUTH_FAILED")]
    assert server.state is State.CLOSED
    assert server.receive_data(hello_frame()) == []
    assert sent(server) == []


def test_auth_failed_never_tells_which_check_failed():
    messages = set()
    for payload in MALFORMED_HELLOS.values():
        if isinstance(payload, str):
            payload = payload.encode()
        server = new_server()
        server.receive_data(encode_frame(FrameType.HELLO, 0, payload))
        [(_, _, error)] = sent(server)
        messages.add(error["message"])
    assert len(messages) == 1


def test_caller_rejects_hello_with_auth_failed():
    server = new_server()
    [(kind, hello)] = server.receive_data(hello_frame(proof="0" * 64))
    assert kind == HELLO
    assert hello["proof"] == "0" * 64
    assert server.fail("AUTH_FAILED", "authentication failed") == (
        CLOSED,
        "AUTH_FAILED",
        "authentication failed",
    )
    assert codes(sent(server)) == [(FrameType.ERROR, 0, "AUTH_FAILED")]


# -- after WELCOME -------------------------------------------------------------


@pytest.mark.parametrize("mac", MACS)
@pytest.mark.parametrize(
    "ftype",
    [
        FrameType.HELLO,
        FrameType.ACK,
        FrameType.CHALLENGE,
        FrameType.WELCOME,
        FrameType.NACK,
        FrameType.ERROR,
        0x00,
        0x55,
        0xFF,
    ],
)
def test_refused_type_after_welcome_is_bad_type_and_session_stays_open(mac, ftype):
    server, client = handshake(mac)
    payload = hello_payload() if ftype == FrameType.HELLO else b"{}"
    refused = client.encode(ftype, 4242, payload)
    client.send_data(1, 5, b"next")
    assert server.receive_data(refused + client.data_to_send()) == [(DATA, 1, 5, 0, b"next")]
    assert codes(sent(server)) == [(FrameType.NACK, 4242, "BAD_TYPE")]
    assert server.state is State.OPEN


def test_bad_type_is_reported_before_its_payload_arrives():
    server, client = handshake("none")
    big = encode_frame(FrameType.HELLO, 9, bytes(60000))
    assert server.receive_data(big[:32]) == []
    assert codes(sent(server)) == [(FrameType.NACK, 9, "BAD_TYPE")]
    for pos in range(32, len(big), 4096):
        assert server.receive_data(big[pos : pos + 4096]) == []
        assert server.buffered() < 32
    client.send_data(1, 10, b"ok")
    assert deliver(client, server) == [(DATA, 1, 10, 0, b"ok")]


def test_mac_flag_in_a_session_without_mac_is_bad_mac():
    server, client = handshake("none")
    mac_fn = crypto.make_mac(
        "hmac-sha256", crypto.session_key(SECRET, SN, CN, IDENT, "hmac-sha256")
    )
    stream = encode_frame(FrameType.DATA, 6, b"flagged", channel=1, mac_fn=mac_fn)
    assert server.receive_data(stream) == []
    assert codes(sent(server)) == [(FrameType.NACK, 6, "BAD_MAC")]
    client.send_data(1, 7, b"plain")
    assert deliver(client, server) == [(DATA, 1, 7, 0, b"plain")]


@pytest.mark.parametrize("mac", ["hmac-sha256", "blake2s"])
def test_missing_mac_is_bad_mac(mac):
    server, client = handshake(mac)
    assert server.receive_data(encode_frame(FrameType.DATA, 8, b"bare", channel=1)) == []
    assert server.receive_data(encode_frame(FrameType.PING, 9)) == []
    assert codes(sent(server)) == [
        (FrameType.NACK, 8, "BAD_MAC"),
        (FrameType.NACK, 9, "BAD_MAC"),
    ]
    client.send_data(1, 10, b"signed")
    assert deliver(client, server) == [(DATA, 1, 10, 0, b"signed")]


@pytest.mark.parametrize("mac", ["hmac-sha256", "blake2s"])
def test_wrong_mac_is_bad_mac(mac):
    server, client = handshake(mac)
    other = "blake2s" if mac == "hmac-sha256" else "hmac-sha256"
    right_key = crypto.session_key(SECRET, SN, CN, IDENT, mac)
    wrong_key = crypto.session_key(OTHER_SECRET, SN, CN, IDENT, mac)
    forged = [
        encode_frame(FrameType.DATA, 20, b"x", mac_fn=crypto.make_mac(mac, wrong_key)),
        encode_frame(FrameType.DATA, 21, b"x", mac_fn=crypto.make_mac(other, right_key)),
        encode_frame(FrameType.DATA, 22, b"x", mac_fn=lambda body: bytes(16)),
    ]
    client.send_data(1, 23, b"x")
    flipped = bytearray(client.data_to_send())
    flipped[-1] ^= 0x01
    assert server.receive_data(b"".join(forged) + bytes(flipped)) == []
    assert codes(sent(server)) == [
        (FrameType.NACK, 20, "BAD_MAC"),
        (FrameType.NACK, 21, "BAD_MAC"),
        (FrameType.NACK, 22, "BAD_MAC"),
        (FrameType.NACK, 23, "BAD_MAC"),
    ]
    client.send_data(1, 24, b"y")
    assert deliver(client, server) == [(DATA, 1, 24, 0, b"y")]


@pytest.mark.parametrize("mac", MACS)
def test_bad_crc_after_welcome_is_nacked(mac):
    server, client = handshake(mac)
    client.send_data(1, 30, b"payload")
    frame = bytearray(client.data_to_send())
    frame[33] ^= 0x40
    client.send_data(1, 31, b"next")
    assert server.receive_data(bytes(frame) + client.data_to_send()) == [(DATA, 1, 31, 0, b"next")]
    assert codes(sent(server)) == [(FrameType.NACK, 30, "BAD_CRC")]


def patched_header(offset, replacement):
    head = bytearray(encode_frame(FrameType.DATA, 1)[:32])
    head[offset : offset + len(replacement)] = replacement
    return bytes(head)


@pytest.mark.parametrize(
    ("head", "code"),
    [
        (patched_header(0, b"XX"), "BAD_MAGIC"),
        (patched_header(2, b"\x02"), "BAD_MAGIC"),
        (patched_header(4, b"\x00\x02"), "BAD_FLAGS"),
        (patched_header(8, b"\x00\x01\x00\x01"), "TOO_LARGE"),
    ],
    ids=["magic", "version", "flags", "length"],
)
def test_framing_errors_after_welcome_close_the_session(head, code):
    server, client = handshake("none")
    client.send_data(1, 1, b"ok")
    events = server.receive_data(bytes(client.data_to_send()) + head)
    assert events[0] == (DATA, 1, 1, 0, b"ok")
    assert [e[:2] for e in events[1:]] == [(CLOSED, code)]
    assert codes(sent(server)) == [(FrameType.ERROR, 0, code)]
    assert server.state is State.CLOSED
    client.send_data(1, 2, b"ignored")
    assert deliver(client, server) == []


def test_max_payload_is_enforced_on_the_announced_value():
    server = new_server(max_payload=1024)
    assert [e[0] for e in server.receive_data(hello_frame())] == [HELLO]
    server.accept(SECRET, 0, [1])
    sent(server)
    ok = encode_frame(FrameType.DATA, 1, bytes(1024), channel=1)
    assert server.receive_data(ok) == [(DATA, 1, 1, 0, bytes(1024))]
    events = server.receive_data(encode_frame(FrameType.DATA, 2, bytes(1025))[:32])
    assert [e[:2] for e in events] == [(CLOSED, "TOO_LARGE")]


# -- pipelining -----------------------------------------------------------------


@pytest.mark.parametrize("mac", MACS)
def test_data_pipelined_after_hello_is_decoded_after_accept(mac):
    server = new_server()
    mac_fn = crypto.make_mac(mac, crypto.session_key(SECRET, SN, CN, IDENT, mac))
    pipelined = (
        encode_frame(FrameType.DATA, 1, b"one", channel=1, mac_fn=mac_fn)
        + encode_frame(FrameType.PING, 2, mac_fn=mac_fn)
        + encode_frame(FrameType.DATA, 3, b"three", channel=2, mac_fn=mac_fn)
    )
    chunk = hello_frame(mac=mac) + pipelined[:50]
    events = server.receive_data(chunk)
    assert [e[0] for e in events] == [HELLO]
    assert sent(server) == []
    assert server.receive_data(pipelined[50:]) == []  # held until the caller decides
    assert server.accept(SECRET, 0, [1, 2]) == [
        (DATA, 1, 1, 0, b"one"),
        (DATA, 2, 3, 0, b"three"),
    ]
    frames = sent(server)
    assert [(ftype, seq) for ftype, seq, _ in frames] == [
        (FrameType.WELCOME, 0),
        (FrameType.PONG, 2),
    ]


def test_pipelined_data_is_dropped_when_authentication_fails():
    server = new_server()
    chunk = hello_frame() + encode_frame(FrameType.DATA, 1, b"one", channel=1)
    [(kind, _)] = server.receive_data(chunk)
    assert kind == HELLO
    assert server.fail("AUTH_FAILED", "authentication failed")[:2] == (CLOSED, "AUTH_FAILED")
    assert codes(sent(server)) == [(FrameType.ERROR, 0, "AUTH_FAILED")]
    assert server.receive_data(encode_frame(FrameType.DATA, 2, b"two", channel=1)) == []


# -- fail, frames_seen ------------------------------------------------------------


@pytest.mark.parametrize("code", ["TIMEOUT", "SUPERSEDED", "REVOKED"])
def test_fail_queues_error_and_closes(code):
    server, client = handshake("hmac-sha256")
    assert server.fail(code, "bye now") == (CLOSED, code, "bye now")
    assert sent(server) == [(FrameType.ERROR, 0, {"code": code, "message": "bye now"})]
    assert server.state is State.CLOSED
    client.send_data(1, 1, b"late")
    assert deliver(client, server) == []
    # a second failure queues nothing more
    server.fail("TIMEOUT", "again")
    assert sent(server) == []
    assert server.state is State.CLOSED


def test_fail_before_hello():
    server = new_server()
    assert server.fail("TIMEOUT", "no HELLO in time")[:2] == (CLOSED, "TIMEOUT")
    assert codes(sent(server)) == [(FrameType.ERROR, 0, "TIMEOUT")]
    assert server.receive_data(hello_frame()) == []


def test_client_reports_error_from_server():
    server, client = handshake("none")
    server.fail("SUPERSEDED", "newer connection")
    assert client.receive_data(server.data_to_send()) == [
        (FrameType.ERROR, "SUPERSEDED", "newer connection")
    ]


def test_client_reports_nack_from_server():
    server, client = handshake("none")
    server.send_nack(5, "DENIED", "channel not in scope")
    assert client.receive_data(server.data_to_send()) == [
        (FrameType.NACK, 5, "DENIED", "channel not in scope")
    ]


@pytest.mark.parametrize("mac", MACS)
def test_frames_seen_counts_valid_frames_only(mac):
    server, client = handshake(mac)
    before = server.frames_seen
    client.send_data(1, 1, b"a")  # valid
    client.send(FrameType.PING, 2)  # valid
    client.send(FrameType.PONG, 3)  # valid, ignored
    client.send_data(1, 4, b"b")
    good = bytes(client.data_to_send())
    client.send_data(1, 5, b"crc")
    bad_crc = bytearray(client.data_to_send())
    bad_crc[33] ^= 0x01
    bad_type = client.encode(FrameType.ACK, 6)
    if mac == "none":
        mac_fn = crypto.make_mac("blake2s", crypto.session_key(SECRET, SN, CN, IDENT, "blake2s"))
        bad_mac = encode_frame(FrameType.DATA, 7, b"c", mac_fn=mac_fn)
    else:
        bad_mac = encode_frame(FrameType.DATA, 7, b"c")
    server.receive_data(good + bytes(bad_crc) + bad_type + bad_mac)
    assert server.frames_seen == before + 4
    assert codes([f for f in sent(server) if f[0] == FrameType.NACK]) == [
        (FrameType.NACK, 5, "BAD_CRC"),
        (FrameType.NACK, 6, "BAD_TYPE"),
        (FrameType.NACK, 7, "BAD_MAC"),
    ]


def test_frames_seen_counts_ping_before_welcome():
    server = new_server()
    assert server.frames_seen == 0
    server.receive_data(encode_frame(FrameType.PING, 1))
    assert server.frames_seen == 1
    bad = bytearray(encode_frame(FrameType.PING, 2))
    bad[-1] ^= 0x01
    server.receive_data(bytes(bad))
    assert server.frames_seen == 1


def test_parse_hello_refuses_a_60000_character_id_before_encoding_it():
    assert parse_hello(hello_payload(id="i" * 60000)) is None
    assert parse_hello(hello_payload(fingerprint="\u00e9" * 60000)) is None
