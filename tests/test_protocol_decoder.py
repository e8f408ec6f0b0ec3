"""FrameDecoder: header checks, resynchronisation, skipping refused payloads, splitting."""

import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.protocol import crypto
from appliance.protocol.decoder import FATAL, REJECT, FrameDecoder, Policy
from appliance.protocol.frames import FrameType

MAX = 256
LIMIT = 32 + MAX + 4 + 16  # one incomplete frame at most: header, payload, CRC, MAC
KEY = bytes(range(32))
MAC_FN = crypto.make_mac("hmac-sha256", KEY)

ERROR_CODES = {
    "BAD_MAGIC",
    "BAD_FLAGS",
    "TOO_LARGE",
    "UNAUTHENTICATED",
    "AUTH_FAILED",
    "TIMEOUT",
    "SUPERSEDED",
    "REVOKED",
}
NACK_CODES = {"BAD_CRC", "BAD_MAC", "DENIED", "BUSY", "BAD_TYPE"}


def raw_frame(
    ftype=FrameType.DATA,
    seq=1,
    payload=b"",
    *,
    channel=0,
    ts_ns=0,
    flags=0,
    magic=0x4D49,
    version=1,
    length=None,
    mac_fn=None,
    bad_crc=False,
):
    """A frame built straight from PROTOCOL.md §2, with every field under the test's control."""
    if mac_fn is not None:
        flags |= 0x0001
    if length is None:
        length = len(payload)
    head = struct.pack(">HBBHHIIQQ", magic, version, ftype, flags, channel, length, 0, seq, ts_ns)
    body = head + payload
    crc = zlib.crc32(body) ^ (0xFFFFFFFF if bad_crc else 0)
    body += crc.to_bytes(4, "big")
    if mac_fn is not None:
        body += mac_fn(body)
    elif flags & 0x0001:
        body += bytes(16)
    return body


def header(**kw):
    return raw_frame(**kw)[:32]


def decoder(max_payload=MAX, *, allowed=None, refuse_fatal=False, refuse_code="BAD_TYPE"):
    dec = FrameDecoder(max_payload)
    if allowed is not None:
        dec.policy = Policy(
            allowed=frozenset(allowed), refuse_fatal=refuse_fatal, refuse_code=refuse_code
        )
    return dec


def feed_in_pieces(dec, data, cuts):
    out = []
    prev = 0
    for cut in [*sorted(cuts), len(data)]:
        out += dec.feed(data[prev:cut])
        prev = max(prev, cut)
    return out


# -- header checks, fatal as soon as the header is in ------------------------


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"magic": 0x4D48}, "BAD_MAGIC"),
        ({"magic": 0x494D}, "BAD_MAGIC"),
        ({"version": 0}, "BAD_MAGIC"),
        ({"version": 2}, "BAD_MAGIC"),
        ({"flags": 0x0002}, "BAD_FLAGS"),
        ({"flags": 0x8000}, "BAD_FLAGS"),
        ({"flags": 0x0003}, "BAD_FLAGS"),
        ({"length": MAX + 1}, "TOO_LARGE"),
        ({"length": 0xFFFFFFFF}, "TOO_LARGE"),
        # the order: magic and version, then flags, then length
        ({"magic": 0, "flags": 0xFFFF, "length": 0xFFFFFFFF}, "BAD_MAGIC"),
        ({"version": 9, "flags": 0x0004}, "BAD_MAGIC"),
        ({"flags": 0x0010, "length": MAX + 1}, "BAD_FLAGS"),
    ],
)
def test_bad_header_is_fatal_without_the_payload(fields, code):
    dec = decoder()
    head = header(**fields)
    assert dec.feed(head[:31]) == []
    out = dec.feed(head[31:])
    assert len(out) == 1
    assert out[0][0] == FATAL
    assert out[0][1] == code
    assert isinstance(out[0][2], str)
    # nothing after FATAL, whatever arrives
    assert dec.feed(raw_frame(FrameType.PING, 5)) == []
    assert dec.buffered() == 0


def test_too_large_comes_before_the_type_check():
    dec = decoder(allowed={FrameType.HELLO}, refuse_fatal=True, refuse_code="UNAUTHENTICATED")
    out = dec.feed(header(ftype=FrameType.DATA, length=MAX + 1))
    assert [item[:2] for item in out] == [(FATAL, "TOO_LARGE")]


def test_bad_flags_comes_before_the_type_check():
    dec = decoder(allowed={FrameType.HELLO}, refuse_fatal=True, refuse_code="UNAUTHENTICATED")
    out = dec.feed(header(ftype=FrameType.DATA, flags=0x0100))
    assert [item[:2] for item in out] == [(FATAL, "BAD_FLAGS")]


def test_fatal_refused_type_reported_from_the_header():
    dec = decoder(allowed={FrameType.HELLO}, refuse_fatal=True, refuse_code="UNAUTHENTICATED")
    out = dec.feed(header(ftype=FrameType.DATA, length=MAX))
    assert [item[:2] for item in out] == [(FATAL, "UNAUTHENTICATED")]


def test_length_equal_to_max_payload_is_accepted():
    dec = decoder()
    payload = bytes(range(256)) * (MAX // 256)
    assert dec.feed(raw_frame(payload=payload, channel=3)) == [(FrameType.DATA, 3, 1, 0, payload)]


def test_frames_before_a_bad_header_are_delivered():
    dec = decoder()
    good = raw_frame(seq=7, payload=b"x")
    out = dec.feed(good + header(magic=0xFFFF))
    assert out[0] == (FrameType.DATA, 0, 7, 0, b"x")
    assert out[1][:2] == (FATAL, "BAD_MAGIC")
    assert len(out) == 2


def test_reserved_field_and_channel_do_not_matter():
    dec = decoder()
    frame = bytearray(raw_frame(FrameType.PING, 9, channel=4))
    frame[12:16] = b"\xff\xff\xff\xff"  # reserved: ignored by receivers
    frame[-4:] = zlib.crc32(bytes(frame[:-4])).to_bytes(4, "big")
    assert dec.feed(bytes(frame)) == [(FrameType.PING, 4, 9, 0, b"")]


# -- CRC and MAC keep the stream in sync ------------------------------------


def test_bad_crc_keeps_the_stream_in_sync():
    dec = decoder()
    stream = (
        raw_frame(seq=1, payload=b"one")
        + raw_frame(seq=2, payload=b"two", bad_crc=True)
        + raw_frame(seq=3, payload=b"three")
    )
    assert dec.feed(stream) == [
        (FrameType.DATA, 0, 1, 0, b"one"),
        (REJECT, "BAD_CRC", 2),
        (FrameType.DATA, 0, 3, 0, b"three"),
    ]
    assert dec.buffered() == 0


def test_corrupted_payload_is_bad_crc_and_next_frame_decodes():
    dec = decoder()
    bad = bytearray(raw_frame(seq=4, payload=b"payload"))
    bad[35] ^= 0x80
    out = dec.feed(bytes(bad) + raw_frame(seq=5, payload=b"next"))
    assert out == [(REJECT, "BAD_CRC", 4), (FrameType.DATA, 0, 5, 0, b"next")]


def test_mac_checked_after_crc_and_stream_stays_in_sync():
    dec = decoder()
    dec.mac_fn = MAC_FN
    other = crypto.make_mac("blake2s", KEY)
    stream = (
        raw_frame(seq=1, payload=b"a", mac_fn=MAC_FN)
        + raw_frame(seq=2, payload=b"b")  # no MAC
        + raw_frame(seq=3, payload=b"c", mac_fn=other)  # wrong MAC
        + raw_frame(seq=4, payload=b"d", mac_fn=MAC_FN, bad_crc=True)
        + raw_frame(seq=5, payload=b"e", mac_fn=MAC_FN)
    )
    assert dec.feed(stream) == [
        (FrameType.DATA, 0, 1, 0, b"a"),
        (REJECT, "BAD_MAC", 2),
        (REJECT, "BAD_MAC", 3),
        (REJECT, "BAD_CRC", 4),
        (FrameType.DATA, 0, 5, 0, b"e"),
    ]


def test_mac_flag_without_session_mac_is_bad_mac():
    dec = decoder()
    stream = raw_frame(seq=1, mac_fn=MAC_FN) + raw_frame(seq=2)
    assert dec.feed(stream) == [(REJECT, "BAD_MAC", 1), (FrameType.DATA, 0, 2, 0, b"")]


# -- refused types are skipped, not buffered ---------------------------------


def test_refused_type_is_rejected_and_skipped():
    dec = decoder(allowed={FrameType.DATA, FrameType.PING})
    stream = (
        raw_frame(FrameType.HELLO, 11, b"{}")
        + raw_frame(0x55, 12, b"unknown")
        + raw_frame(FrameType.ACK, 13, mac_fn=MAC_FN)
        + raw_frame(FrameType.PING, 14)
    )
    assert dec.feed(stream) == [
        (REJECT, "BAD_TYPE", 11),
        (REJECT, "BAD_TYPE", 12),
        (REJECT, "BAD_TYPE", 13),
        (FrameType.PING, 0, 14, 0, b""),
    ]


@pytest.mark.parametrize("with_mac", [False, True])
def test_refused_payload_is_not_buffered(with_mac):
    max_payload = 65536
    dec = decoder(max_payload, allowed={FrameType.DATA})
    payload = bytes(max_payload)
    refused = raw_frame(FrameType.HELLO, 99, payload, mac_fn=MAC_FN if with_mac else None)
    follower = raw_frame(FrameType.DATA, 100, b"after")
    out = dec.feed(refused[:32])
    assert out == [(REJECT, "BAD_TYPE", 99)]
    rest = refused[32:]
    for pos in range(0, len(rest), 1000):
        assert dec.feed(rest[pos : pos + 1000]) == []
        assert dec.buffered() < 32
    assert dec.feed(follower) == [(FrameType.DATA, 0, 100, 0, b"after")]
    assert dec.buffered() == 0


def test_refused_frame_end_and_next_frame_in_one_chunk():
    dec = decoder(allowed={FrameType.DATA})
    refused = raw_frame(FrameType.WELCOME, 1, b"z" * 200)
    follower = raw_frame(FrameType.DATA, 2, b"ok")
    assert dec.feed(refused[:100]) == [(REJECT, "BAD_TYPE", 1)]
    assert dec.feed(refused[100:] + follower[:10]) == []
    assert dec.buffered() == 10
    assert dec.feed(follower[10:]) == [(FrameType.DATA, 0, 2, 0, b"ok")]


# -- splitting ---------------------------------------------------------------


def mixed_stream():
    return (
        raw_frame(FrameType.DATA, 1, b"first", channel=2, ts_ns=123)
        + raw_frame(FrameType.PING, 2)
        + raw_frame(FrameType.DATA, 3, b"bad", bad_crc=True)
        + raw_frame(FrameType.HELLO, 4, b"x" * 100)
        + raw_frame(FrameType.DATA, 5, b"m" * MAX, channel=65535, ts_ns=2**64 - 1)
        + raw_frame(FrameType.DATA, 6, b"flagged", mac_fn=MAC_FN)
        + raw_frame(FrameType.BYE, 7)
    )


def test_byte_at_a_time_equals_one_chunk():
    stream = mixed_stream()
    whole = decoder(allowed={FrameType.DATA, FrameType.PING, FrameType.BYE}).feed(stream)
    assert whole == [
        (FrameType.DATA, 2, 1, 123, b"first"),
        (FrameType.PING, 0, 2, 0, b""),
        (REJECT, "BAD_CRC", 3),
        (REJECT, "BAD_TYPE", 4),
        (FrameType.DATA, 65535, 5, 2**64 - 1, b"m" * MAX),
        (REJECT, "BAD_MAC", 6),
        (FrameType.BYE, 0, 7, 0, b""),
    ]
    dec = decoder(allowed={FrameType.DATA, FrameType.PING, FrameType.BYE})
    out = []
    for i in range(len(stream)):
        out += dec.feed(stream[i : i + 1])
        assert dec.buffered() <= LIMIT
    assert out == whole
    assert dec.buffered() == 0


def test_empty_feed_is_harmless():
    dec = decoder()
    assert dec.feed(b"") == []
    frame = raw_frame(seq=3, payload=b"p")
    assert dec.feed(frame[:20]) == []
    assert dec.feed(b"") == []
    assert dec.feed(frame[20:]) == [(FrameType.DATA, 0, 3, 0, b"p")]


# -- property: any bytes, any split -----------------------------------------

FRAME_TYPES = [int(t) for t in FrameType] + [0x00, 0x04, 0x55, 0xFF]


@st.composite
def frames(draw):
    frame = raw_frame(
        draw(st.sampled_from(FRAME_TYPES)),
        draw(st.integers(0, 2**64 - 1)),
        draw(st.binary(max_size=MAX + 8)),
        channel=draw(st.integers(0, 0xFFFF)),
        ts_ns=draw(st.integers(0, 2**64 - 1)),
        mac_fn=MAC_FN if draw(st.booleans()) else None,
        bad_crc=draw(st.integers(0, 9)) == 0,
    )
    corrupt = draw(st.integers(0, 5))
    if corrupt < 2:  # corrupt one byte: in the header, or anywhere
        index = draw(st.integers(0, 31 if corrupt == 0 else len(frame) - 1))
        mask = draw(st.integers(1, 255))
        frame = frame[:index] + bytes([frame[index] ^ mask]) + frame[index + 1 :]
    return frame


streams = st.lists(st.one_of(frames(), frames(), st.binary(max_size=40)), max_size=8).map(b"".join)

POLICIES = [
    {},
    {"allowed": {FrameType.DATA, FrameType.PING, FrameType.PONG, FrameType.BYE}},
    {
        "allowed": {FrameType.HELLO, FrameType.PING},
        "refuse_fatal": True,
        "refuse_code": "UNAUTHENTICATED",
    },
]


def check_output(items, finished):
    """Every item is a frame, a REJECT or a FATAL; FATAL is last and only once."""
    for i, item in enumerate(items):
        assert isinstance(item, tuple)
        kind = item[0]
        assert not finished, "nothing may follow FATAL"
        if kind == FATAL:
            assert len(item) == 3
            assert item[1] in ERROR_CODES
            assert isinstance(item[2], str)
            assert i == len(items) - 1
            finished = True
        elif kind == REJECT:
            assert len(item) == 3
            assert item[1] in NACK_CODES
            assert 0 <= item[2] < 2**64
        else:
            assert len(item) == 5
            ftype, channel, seq, ts_ns, payload = item
            assert 0 <= ftype <= 0xFF  # a type byte; 0 is not a kind (REJECT, FATAL < 0)
            assert 0 <= channel <= 0xFFFF
            assert 0 <= seq < 2**64
            assert 0 <= ts_ns < 2**64
            assert isinstance(payload, bytes)
            assert len(payload) <= MAX
    return finished


PROPERTY_SETTINGS = settings(
    max_examples=300,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@PROPERTY_SETTINGS
@given(
    data=streams,
    cuts=st.lists(st.integers(0, 3000), max_size=12),
    policy=st.sampled_from(POLICIES),
    with_mac=st.booleans(),
)
def test_any_bytes_any_split(data, cuts, policy, with_mac):
    dec = decoder(**policy)
    if with_mac:
        dec.mac_fn = MAC_FN
    finished = False
    out = []
    prev = 0
    for cut in [*sorted(cuts), len(data)]:
        items = dec.feed(data[prev:cut])
        prev = max(prev, cut)
        finished = check_output(items, finished)
        out += items
        assert dec.buffered() <= LIMIT

    whole = decoder(**policy)
    if with_mac:
        whole.mac_fn = MAC_FN
    assert whole.feed(data) == out


@PROPERTY_SETTINGS
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 600), max_size=8))
def test_arbitrary_bytes(data, cuts):
    dec = decoder()
    finished = False
    prev = 0
    for cut in [*sorted(cuts), len(data)]:
        finished = check_output(dec.feed(data[prev:cut]), finished)
        prev = max(prev, cut)
        assert dec.buffered() <= LIMIT
