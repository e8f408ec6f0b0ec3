"""Incremental MIP/1 frame decoder (PROTOCOL.md §2, §5).

Bytes go in with `feed`; complete frames and per-frame rejections come out.
The decoder checks a header (magic and version, flags, length, then whether
the type is admitted) before it waits for the payload, so a refused payload is
skipped as it arrives and never buffered. Between calls it keeps at most one
incomplete frame: header + max_payload + CRC + MAC bytes. The exception is a
stop (after HELLO, until `resume`): the bytes after it are held, so a caller
stops reading its socket while the decoder is stopped.

`feed` returns a list of tuples whose first item tells the kind:

- a frame type (> 0): `(type, channel, seq, ts_ns, payload)` — CRC (and MAC,
  when the session uses one) verified;
- `REJECT`: `(REJECT, code, seq)` — the frame is dropped, the stream stays in
  sync, the peer gets NACK `code`;
- `FATAL`: `(FATAL, code, message)` — always the last item; the decoder
  discards everything from then on.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from hmac import compare_digest

from appliance.protocol.crypto import MacFn
from appliance.protocol.frames import (
    CRC_SIZE,
    DEFAULT_MAX_PAYLOAD,
    FLAG_MAC,
    HEADER,
    HEADER_SIZE,
    KNOWN_FLAGS,
    MAC_SIZE,
    MAGIC,
    VERSION,
    ErrorCode,
    FrameType,
)

DATA = FrameType.DATA.value
REJECT = -1
FATAL = -2

_CRC = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class Policy:
    """What the decoder admits in one state of the connection.

    allowed:       frame types admitted (None: every type)
    refuse_code:   what an unadmitted type gets
    refuse_fatal:  whether that ends the stream (ERROR) or drops one frame (NACK)
    mac_fatal:     a MAC flag where none is expected ends the stream (before WELCOME)
    stop_types:    after one of these the decoder holds further bytes until `resume`
    max_payload:   a tighter bound for admitted types, checked after the type (None: none)
    """

    allowed: frozenset[int] | None = None
    refuse_code: str = ErrorCode.BAD_TYPE
    refuse_fatal: bool = False
    mac_fatal: bool = False
    stop_types: frozenset[int] = frozenset()
    max_payload: int | None = None


ADMIT_ALL = Policy()


class FrameDecoder:
    """Splits a byte stream into frames under an admission `policy` (a Policy) and,
    after WELCOME, the session MAC `mac_fn` (frames must carry FLAG_MAC exactly when set)."""

    __slots__ = ("_buf", "_dead", "_held", "_skip", "mac_fn", "max_payload", "others", "policy")

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self.policy = ADMIT_ALL
        self.mac_fn: MacFn | None = None
        # items other than admitted DATA frames in the last feed (0: the caller may pass
        # the list on as it is)
        self.others = 0
        self._buf = bytearray()
        self._skip = 0
        self._held = False
        self._dead = False

    def buffered(self) -> int:
        """Bytes held between calls (an incomplete frame, or bytes held while stopped)."""
        return len(self._buf)

    def close(self) -> None:
        """Discard everything from now on."""
        self._dead = True
        self._buf = bytearray()

    def resume(self) -> list[tuple]:
        """Continue after a stop type, decoding the bytes held meanwhile."""
        self._held = False
        return self.feed(b"")

    def feed(self, data: bytes) -> list[tuple]:
        if (
            not self._buf
            and not self._skip
            and not self._held
            and not self._dead
            and len(data) >= HEADER_SIZE
        ):
            one = self._one(data)
            if one is not None:
                self.others = 0
                return one
        return self._feed(data)

    def _one(self, data: bytes) -> list[tuple] | None:
        """The common read after WELCOME: exactly one admitted, intact DATA frame. None
        for anything else, which the general path then decodes (and rejects) in full."""
        magic, version, ftype, flags, channel, length, _, seq, ts_ns = HEADER.unpack_from(data)
        size = HEADER_SIZE + length + CRC_SIZE
        mac_fn = self.mac_fn
        if mac_fn is not None:
            size += MAC_SIZE
            if flags != FLAG_MAC:
                return None
        elif flags:
            return None
        if (
            ftype != DATA
            or magic != MAGIC
            or version != VERSION
            or len(data) != size
            or length > self.max_payload
        ):
            return None
        allowed = self.policy.allowed
        if allowed is not None and DATA not in allowed:
            return None
        body_end = HEADER_SIZE + length
        with memoryview(data) as mv:
            if zlib.crc32(mv[:body_end]) != _CRC.unpack_from(data, body_end)[0]:
                return None
            if mac_fn is not None and not compare_digest(
                mac_fn(mv[: body_end + CRC_SIZE]), mv[body_end + CRC_SIZE :]
            ):
                return None
        return [(DATA, channel, seq, ts_ns, data[HEADER_SIZE:body_end])]

    def _feed(self, data: bytes) -> list[tuple]:
        out: list[tuple] = []
        self.others = 0
        if self._dead:
            return out
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
        buf = self._buf
        if buf:
            buf += data
            src = buf
        else:
            src = data
        if self._held:
            if src is data:
                buf += data
            return out

        end = len(src)
        pos = 0
        policy = self.policy
        max_payload = self.max_payload
        state_max = policy.max_payload
        allowed = policy.allowed
        mac_fn = self.mac_fn
        stop_types = policy.stop_types
        others = 0
        unpack_header = HEADER.unpack_from
        unpack_crc = _CRC.unpack_from
        crc32 = zlib.crc32
        with memoryview(src) as mv:
            while end - pos >= HEADER_SIZE:
                magic, version, ftype, flags, channel, length, _, seq, ts_ns = unpack_header(
                    src, pos
                )
                if magic != MAGIC or version != VERSION:
                    return self._fatal(out, ErrorCode.BAD_MAGIC, "bad magic or version")
                if flags & ~KNOWN_FLAGS:
                    return self._fatal(out, ErrorCode.BAD_FLAGS, f"unknown flags {flags:#06x}")
                if length > max_payload:
                    return self._fatal(
                        out, ErrorCode.TOO_LARGE, f"length {length} > max_payload {max_payload}"
                    )
                has_mac = flags & FLAG_MAC
                size = HEADER_SIZE + length + CRC_SIZE + (MAC_SIZE if has_mac else 0)
                if allowed is not None and ftype not in allowed:
                    if policy.refuse_fatal:
                        return self._fatal(
                            out, policy.refuse_code, f"frame type {ftype:#04x} not allowed now"
                        )
                    others += 1
                    out.append((REJECT, policy.refuse_code, seq))
                    if end - pos < size:
                        self._skip = size - (end - pos)
                        pos = end
                        break
                    pos += size
                    continue
                if state_max is not None and length > state_max:
                    return self._fatal(
                        out, ErrorCode.TOO_LARGE, f"length {length} > {state_max} in this state"
                    )
                if has_mac and policy.mac_fatal:
                    return self._fatal(out, policy.refuse_code, "a MAC trailer before WELCOME")
                if end - pos < size:
                    break
                body_end = pos + HEADER_SIZE + length
                if crc32(mv[pos:body_end]) != unpack_crc(src, body_end)[0]:
                    others += 1
                    out.append((REJECT, ErrorCode.BAD_CRC, seq))
                    pos += size
                    continue
                if mac_fn is not None:
                    if not has_mac or not compare_digest(
                        mac_fn(mv[pos : body_end + CRC_SIZE]), mv[body_end + CRC_SIZE : pos + size]
                    ):
                        others += 1
                        out.append((REJECT, ErrorCode.BAD_MAC, seq))
                        pos += size
                        continue
                elif has_mac:
                    others += 1
                    out.append((REJECT, ErrorCode.BAD_MAC, seq))
                    pos += size
                    continue
                out.append((ftype, channel, seq, ts_ns, bytes(mv[pos + HEADER_SIZE : body_end])))
                if ftype != DATA:
                    others += 1
                pos += size
                if ftype in stop_types:
                    self._held = True
                    break
        self.others = others
        if pos == 0:
            if src is data and data:
                self._buf = bytearray(data)
        elif pos >= end:
            self._buf = bytearray()
        else:
            self._buf = bytearray(src[pos:])
        return out

    def _fatal(self, out: list[tuple], code: str, message: str) -> list[tuple]:
        self.others = 1
        out.append((FATAL, code, message))
        self.close()
        return out
