"""PROTOCOL.md §8: the MIP/1 test vectors, encoded and decoded."""

import base64
import hashlib
import hmac
import json
import struct

import pytest

from appliance.protocol import crypto
from appliance.protocol.client_session import ClientSession
from appliance.protocol.decoder import REJECT, FrameDecoder
from appliance.protocol.frames import FrameType, encode_ack, encode_frame
from appliance.protocol.session import DATA, HELLO, ServerSession

SECRET = bytes(range(32))
TOKEN = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"
IDENT = "m-0007/core-2"
SN = "00112233445566778899aabbccddeeff"
CN = "ffeeddccbbaa99887766554433221100"
FINGERPRINT = "sha256:f6298bff015cb6c58e55e400b8097684422eb3d3c85edc856cb8d1ba2084878f"

# revision 2: the proofs and the session key cover `mac` (these are for "hmac-sha256")
HELLO_PROOF = "7d5a2f84d47de8a325764f41c7e91c6924fe56aa3abbc84980bd58fbe7fdb281"
WELCOME_PROOF = "c6015ea817a43575ed51a928aa5d7e176fd46b0b17d0a08f8702e1aa06f6e49b"
SESSION_KEY = "0a3d99b91be6db38247a5bc4389ca5b16fbcd91b541de1e7aac3ad6b48259f00"
SESSION_KEY_BLAKE2S = "685c4fe9bcb34ed1336225d8a4d594f5f1bba3507e222fcb3106a35a661cd0f6"
SESSION_KEYS = {"hmac-sha256": SESSION_KEY, "blake2s": SESSION_KEY_BLAKE2S, "none": SESSION_KEY}

CHANNEL = 7
TS_NS = 1700000000000000000
PAYLOAD = b'{"t":21.5}'

DATA_VECTORS = [
    (
        "none",
        42,
        "4d490110000000070000000a00000000000000000000002a17979cfe362a0000"
        "7b2274223a32312e357d48919b5f",
    ),
    (
        "hmac-sha256",
        43,
        "4d490110000100070000000a00000000000000000000002b17979cfe362a0000"
        "7b2274223a32312e357d1f830c18f874c4b4e7efa02a89ffe8f698b1ed58",
    ),
    (
        "blake2s",
        43,
        "4d490110000100070000000a00000000000000000000002b17979cfe362a0000"
        "7b2274223a32312e357d1f830c18bfe96c8ed4a61d0f1a218104be94fd4d",
    ),
]
MAC_VECTORS = [v for v in DATA_VECTORS if v[0] != "none"]
ACK_VECTOR = "4d490111000000000000000000000000000000000000002b0000000000000000a0e0f811"


def vector_mac_fn(mac):
    return crypto.make_mac(mac, bytes.fromhex(SESSION_KEYS[mac]))


def flip(data, index):
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


def parse_frames(data):
    """(type, flags, seq, payload) of every frame in `data`, parsed straight from §2."""
    frames = []
    pos = 0
    while pos < len(data):
        _, _, ftype, flags, _, length, _, seq, _ = struct.unpack_from(">HBBHHIIQQ", data, pos)
        frames.append((ftype, flags, seq, bytes(data[pos + 32 : pos + 32 + length])))
        pos += 36 + length + (16 if flags & 1 else 0)
    assert pos == len(data)
    return frames


def open_server_session(mac):
    """A ServerSession in the §8 context (sn, cn, id, fingerprint) after WELCOME."""
    server = ServerSession(SN)
    server.data_to_send()
    hello = {"id": IDENT, "nonce": CN, "fingerprint": FINGERPRINT, "mac": mac, "proof": HELLO_PROOF}
    events = server.receive_data(encode_frame(FrameType.HELLO, 0, json.dumps(hello).encode()))
    assert [e[0] for e in events] == [HELLO]
    assert server.accept(SECRET, 0, [CHANNEL]) == []
    server.data_to_send()
    return server


# -- token, proofs, session key --------------------------------------------


def test_token_decodes_to_secret():
    assert crypto.token_to_secret(TOKEN) == SECRET


def test_secret_encodes_to_token():
    assert crypto.secret_to_token(SECRET) == TOKEN


def test_token_uses_the_url_alphabet():
    secret = b"\xfb" * 32
    token = crypto.secret_to_token(secret)
    assert len(token) == 43 and "-" in token and "_" in token
    assert crypto.token_to_secret(token) == secret


@pytest.mark.parametrize(
    "token",
    [
        "",
        TOKEN + "=",  # padded
        TOKEN[:-1],  # too short
        TOKEN + "A",  # too long
        TOKEN[:-1] + "9",  # non-canonical: the last character's unused bits are set
        base64.b64encode(b"\xfb" * 32).rstrip(b"=").decode(),  # "+" and "/": not base64url
        "é" + TOKEN[1:],
    ],
)
def test_malformed_token_is_refused(token):
    with pytest.raises(ValueError):
        crypto.token_to_secret(token)


def test_hello_proof():
    assert crypto.hello_proof(SECRET, SN, CN, IDENT, FINGERPRINT, "hmac-sha256") == HELLO_PROOF


def test_welcome_proof():
    assert crypto.welcome_proof(SECRET, SN, CN, IDENT, "hmac-sha256") == WELCOME_PROOF


def test_session_key():
    assert crypto.session_key(SECRET, SN, CN, IDENT, "hmac-sha256").hex() == SESSION_KEY
    assert crypto.session_key(SECRET, SN, CN, IDENT, "blake2s").hex() == SESSION_KEY_BLAKE2S


@pytest.mark.parametrize("mac", ["blake2s", "none"])
def test_proofs_and_session_key_cover_mac(mac):
    """Revision 2: the same handshake with another `mac` gives other proofs and keys."""
    assert crypto.hello_proof(SECRET, SN, CN, IDENT, FINGERPRINT, mac) != HELLO_PROOF
    assert crypto.welcome_proof(SECRET, SN, CN, IDENT, mac) != WELCOME_PROOF
    assert crypto.session_key(SECRET, SN, CN, IDENT, mac).hex() != SESSION_KEY


def test_client_session_sends_the_vector_hello_proof():
    client = ClientSession(IDENT, SECRET, CN, fingerprint=FINGERPRINT, mac="hmac-sha256")
    challenge = {
        "server": "t",
        "nonce": SN,
        "version": 1,
        "max_payload": 65536,
        "idle_timeout": 60,
    }
    client.receive_data(encode_frame(FrameType.CHALLENGE, 0, json.dumps(challenge).encode()))
    [(ftype, flags, _, payload)] = parse_frames(client.data_to_send())
    assert (ftype, flags) == (FrameType.HELLO, 0)
    assert json.loads(payload) == {
        "id": IDENT,
        "nonce": CN,
        "fingerprint": FINGERPRINT,
        "mac": "hmac-sha256",
        "proof": HELLO_PROOF,
    }


def test_server_session_sends_the_vector_welcome_proof():
    server = ServerSession(SN)
    server.data_to_send()
    hello = {"id": IDENT, "nonce": CN, "fingerprint": FINGERPRINT, "mac": "hmac-sha256"}
    hello["proof"] = HELLO_PROOF
    server.receive_data(encode_frame(FrameType.HELLO, 0, json.dumps(hello).encode()))
    server.accept(SECRET, 41, [CHANNEL])
    [(ftype, flags, _, payload)] = parse_frames(server.data_to_send())
    assert (ftype, flags) == (FrameType.WELCOME, 0)
    assert json.loads(payload) == {"last_seq": 41, "channels": [CHANNEL], "proof": WELCOME_PROOF}


# -- frames ----------------------------------------------------------------


@pytest.mark.parametrize(("mac", "seq", "expected"), DATA_VECTORS)
def test_data_vector_encodes(mac, seq, expected):
    frame = encode_frame(
        FrameType.DATA,
        seq,
        PAYLOAD,
        channel=CHANNEL,
        ts_ns=TS_NS,
        mac_fn=vector_mac_fn(mac),
    )
    assert frame.hex() == expected


def test_make_mac_none_is_no_mac():
    assert crypto.make_mac("none", bytes.fromhex(SESSION_KEY)) is None


def test_make_mac_unknown_algorithm():
    with pytest.raises(ValueError):
        crypto.make_mac("sha1", bytes.fromhex(SESSION_KEY))


@pytest.mark.parametrize("size", [0, 1, 36, 55, 56, 63, 64, 65, 1000])
def test_mac_algorithms_match_their_definitions(size):
    key = bytes.fromhex(SESSION_KEY)
    data = bytes(i % 251 for i in range(size))
    expected_hmac = hmac.new(key, data, hashlib.sha256).digest()[:16]
    expected_blake = hashlib.blake2s(data, key=key, digest_size=16).digest()
    assert crypto.make_mac("hmac-sha256", key)(data) == expected_hmac
    assert crypto.make_mac("blake2s", key)(data) == expected_blake


def test_ack_vector_encodes():
    assert encode_ack(43).hex() == ACK_VECTOR
    assert encode_frame(FrameType.ACK, 43).hex() == ACK_VECTOR


def test_ack_vector_decodes():
    assert FrameDecoder().feed(bytes.fromhex(ACK_VECTOR)) == [(FrameType.ACK, 0, 43, 0, b"")]


# -- decoding the DATA vectors ---------------------------------------------


@pytest.mark.parametrize(("mac", "seq", "vector"), DATA_VECTORS)
def test_data_vector_decodes(mac, seq, vector):
    decoder = FrameDecoder()
    decoder.mac_fn = vector_mac_fn(mac)
    assert decoder.feed(bytes.fromhex(vector)) == [(FrameType.DATA, CHANNEL, seq, TS_NS, PAYLOAD)]
    assert decoder.buffered() == 0


@pytest.mark.parametrize(("mac", "seq", "vector"), DATA_VECTORS)
def test_data_vector_through_server_session(mac, seq, vector):
    server = open_server_session(mac)
    assert server.receive_data(bytes.fromhex(vector)) == [(DATA, CHANNEL, seq, TS_NS, PAYLOAD)]
    assert server.data_to_send() == b""


@pytest.mark.parametrize(("mac", "seq", "vector"), MAC_VECTORS)
@pytest.mark.parametrize("index", [-16, -9, -1])
def test_flipped_mac_byte_is_bad_mac(mac, seq, vector, index):
    frame = flip(bytes.fromhex(vector), index)
    decoder = FrameDecoder()
    decoder.mac_fn = vector_mac_fn(mac)
    assert decoder.feed(frame) == [(REJECT, "BAD_MAC", seq)]

    server = open_server_session(mac)
    assert server.receive_data(frame) == []
    [(ftype, flags, nack_seq, payload)] = parse_frames(server.data_to_send())
    assert (ftype, flags, nack_seq) == (FrameType.NACK, 0, seq)
    assert json.loads(payload)["code"] == "BAD_MAC"


@pytest.mark.parametrize(("mac", "seq", "vector"), DATA_VECTORS)
@pytest.mark.parametrize("index", [32, 36, 41])
def test_flipped_payload_byte_is_bad_crc(mac, seq, vector, index):
    frame = flip(bytes.fromhex(vector), index)
    decoder = FrameDecoder()
    decoder.mac_fn = vector_mac_fn(mac)
    assert decoder.feed(frame) == [(REJECT, "BAD_CRC", seq)]

    server = open_server_session(mac)
    assert server.receive_data(frame) == []
    [(ftype, flags, nack_seq, payload)] = parse_frames(server.data_to_send())
    assert (ftype, flags, nack_seq) == (FrameType.NACK, 0, seq)
    assert json.loads(payload)["code"] == "BAD_CRC"


@pytest.mark.parametrize(("mac", "seq", "vector"), DATA_VECTORS)
def test_flipped_crc_byte_is_bad_crc(mac, seq, vector):
    frame = flip(bytes.fromhex(vector), 42)  # first CRC byte
    decoder = FrameDecoder()
    decoder.mac_fn = vector_mac_fn(mac)
    assert decoder.feed(frame) == [(REJECT, "BAD_CRC", seq)]
