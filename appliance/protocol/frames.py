"""MIP/1 frame layout and encoding (PROTOCOL.md §2, §3)."""

from __future__ import annotations

import json
import struct
import zlib
from enum import IntEnum

MAGIC = 0x4D49
VERSION = 1
FLAG_MAC = 0x0001
KNOWN_FLAGS = FLAG_MAC
HEADER = struct.Struct(">HBBHHIIQQ")
HEADER_SIZE = HEADER.size  # 32
CRC_SIZE = 4
MAC_SIZE = 16
DEFAULT_MAX_PAYLOAD = 65536


class FrameType(IntEnum):
    CHALLENGE = 0x01
    HELLO = 0x02
    WELCOME = 0x03
    DATA = 0x10
    ACK = 0x11
    NACK = 0x12
    PING = 0x20
    PONG = 0x21
    BYE = 0x30
    ERROR = 0x7F


class ErrorCode:
    """The error codes of PROTOCOL.md §7, as sent on the wire."""

    BAD_MAGIC = "BAD_MAGIC"
    BAD_FLAGS = "BAD_FLAGS"
    TOO_LARGE = "TOO_LARGE"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    AUTH_FAILED = "AUTH_FAILED"
    TIMEOUT = "TIMEOUT"
    SUPERSEDED = "SUPERSEDED"
    REVOKED = "REVOKED"
    BAD_CRC = "BAD_CRC"
    BAD_MAC = "BAD_MAC"
    DENIED = "DENIED"
    BUSY = "BUSY"
    BAD_TYPE = "BAD_TYPE"


def encode_frame(
    ftype: int,
    seq: int = 0,
    payload: bytes = b"",
    *,
    channel: int = 0,
    ts_ns: int = 0,
    mac_fn=None,
) -> bytes:
    """One complete frame. `mac_fn(bytes) -> 16 bytes` adds the MAC trailer."""
    flags = FLAG_MAC if mac_fn is not None else 0
    head = HEADER.pack(MAGIC, VERSION, ftype, flags, channel, len(payload), 0, seq, ts_ns)
    body = head + payload
    body += zlib.crc32(body).to_bytes(4, "big")
    if mac_fn is not None:
        body += mac_fn(body)
    return body


def encode_json(ftype: int, obj: dict, seq: int = 0) -> bytes:
    return encode_frame(ftype, seq, json.dumps(obj, separators=(",", ":")).encode())


# An ACK differs from another only in its seq: its first 16 bytes and their CRC are
# computed once (one ACK goes out per core per commit, the hottest encode there is).
_ACK_HEAD = HEADER.pack(MAGIC, VERSION, FrameType.ACK, 0, 0, 0, 0, 0, 0)[:16]
_ACK_HEAD_CRC = zlib.crc32(_ACK_HEAD)
_SEQ_TS = struct.Struct(">QQ")


def encode_ack(seq: int) -> bytes:
    tail = _SEQ_TS.pack(seq, 0)
    return _ACK_HEAD + tail + zlib.crc32(tail, _ACK_HEAD_CRC).to_bytes(4, "big")


def encode_nack(seq: int, code: str, message: str) -> bytes:
    return encode_json(FrameType.NACK, {"code": code, "message": message}, seq)


def encode_error(code: str, message: str) -> bytes:
    return encode_json(FrameType.ERROR, {"code": code, "message": message})
