"""The FPGA backend: run the model on an accelerator behind a serial link or a character
device, with the small request/response protocol of FPGA.md beside this file.

    backend = FpgaBackend("/dev/ttyUSB1", baudrate=921600, timeout=0.5, retries=2)
    scores = backend.run(window)        # numpy in, numpy out, like the TFLite backend

The framing (`encode_frame`, `FrameReader`) is sans-IO; the links only move bytes.
A request that gets no valid answer in `timeout` seconds (lost, garbled, or
answered with a stale tag) is sent again under a new tag, up to `retries` times;
then `run` raises FpgaError and the subscriber's batch comes again later.
"""

from __future__ import annotations

import contextlib
import os
import select
import struct
import time
import zlib
from typing import Any

from appliance.subscribers.inference.backend import Backend, BackendError, InferenceError

SYNC = b"\xa5\x5a"
HEADER = struct.Struct(">2sBBH")  # sync, type, tag, payload length
CRC = struct.Struct(">I")  # CRC-32 (zlib) of type, tag, length and payload
MAX_PAYLOAD = 0xFFFF

INFO = 0x01  # request: no payload
INFER = 0x02  # request: the input tensor
RESPONSE = 0x80  # a response's type is the request's | RESPONSE; payload[0] is the status
INFO_BODY = struct.Struct(">BBBBII")  # status, input dtype, output dtype, 0, counts

OK, BAD_LENGTH, UNKNOWN_TYPE, BUSY, DEVICE_ERROR = range(5)
STATUS_NAMES = {
    OK: "OK",
    BAD_LENGTH: "BAD_LENGTH",
    UNKNOWN_TYPE: "UNKNOWN_TYPE",
    BUSY: "BUSY",
    DEVICE_ERROR: "DEVICE_ERROR",
}
# dtype codes of INFO; tensor bytes are little-endian, C order
DTYPES = {0: "<f4", 1: "i1", 2: "u1", 3: "<i2", 4: "<i4"}
BUSY_PAUSE = 0.01


class FpgaError(BackendError):
    """The accelerator did not answer, or answered with an error status."""


def encode_frame(kind: int, tag: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    head = HEADER.pack(SYNC, kind, tag & 0xFF, len(payload))
    return head + payload + CRC.pack(zlib.crc32(head[2:] + payload))


class FrameReader:
    """Bytes in, (type, tag, payload) out. Resynchronises on the sync bytes: whatever
    precedes a sync, a header with an unexpected type or an oversized length, and a
    frame whose CRC fails are skipped one byte at a time and counted."""

    def __init__(self, types: frozenset[int] | set[int], max_payload: int = MAX_PAYLOAD) -> None:
        self.types = frozenset(types)
        self.max_payload = max_payload
        self.buffer = bytearray()
        self.skipped = 0  # bytes thrown away while looking for a frame
        self.crc_errors = 0

    def reset(self) -> None:
        self.skipped += len(self.buffer)
        self.buffer.clear()

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        buf = self.buffer
        buf += data
        frames = []
        while True:
            start = buf.find(SYNC)
            if start < 0:
                keep = 1 if buf.endswith(SYNC[:1]) else 0  # half a sync at the end
                self.skipped += len(buf) - keep
                del buf[: len(buf) - keep]
                return frames
            if start:
                self.skipped += start
                del buf[:start]
            if len(buf) < HEADER.size:
                return frames
            _sync, kind, tag, length = HEADER.unpack_from(buf)
            if kind not in self.types or length > self.max_payload:
                self.skipped += 1
                del buf[:1]
                continue
            end = HEADER.size + length + CRC.size
            if len(buf) < end:
                return frames
            (crc,) = CRC.unpack_from(buf, end - CRC.size)
            if zlib.crc32(buf[2 : end - CRC.size]) != crc:
                self.crc_errors += 1
                self.skipped += 1
                del buf[:1]
                continue
            frames.append((kind, tag, bytes(buf[HEADER.size : end - CRC.size])))
            del buf[:end]


# -- links: move bytes, nothing else ---------------------------------------------------


class SerialLink:
    """A UART (or any tty) through pyserial: raw mode, 8N1, no flow control."""

    def __init__(self, device: str, baudrate: int) -> None:
        import serial  # pyserial: a dependency of the daemon (console, FPGA UART)

        try:
            self.port = serial.Serial(device, baudrate=baudrate, timeout=0, exclusive=True)
        except (serial.SerialException, ValueError) as exc:
            raise InferenceError(f"fpga: cannot open {device}: {exc}") from None

    def write(self, data: bytes) -> None:
        self.port.write(data)
        self.port.flush()

    def read(self, timeout: float) -> bytes:
        self.port.timeout = max(0.0, timeout)
        first = self.port.read(1)
        if not first:
            return b""
        self.port.timeout = 0
        return first + self.port.read(self.port.in_waiting)

    def discard(self) -> bytes:
        """Whatever is buffered on the way in (stale answers, noise)."""
        self.port.timeout = 0
        return self.port.read(self.port.in_waiting)

    def close(self) -> None:
        self.port.close()


class CharDeviceLink:
    """A character device (an accelerator's driver, or any byte stream): os.read/os.write
    with select for the timeouts; no termios calls."""

    def __init__(self, device: str) -> None:
        try:
            self.fd = os.open(device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError as exc:
            raise InferenceError(f"fpga: cannot open {device}: {exc.strerror}") from None

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:
                select.select([], [self.fd], [], 1.0)

    def read(self, timeout: float) -> bytes:
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not ready:
            return b""
        try:
            return os.read(self.fd, 65536)
        except BlockingIOError:
            return b""

    def discard(self) -> bytes:
        dropped = b""
        while chunk := self.read(0):
            dropped += chunk
        return dropped

    def close(self) -> None:
        os.close(self.fd)


def open_link(device: str, link: str = "auto", baudrate: int = 115200):
    """A link by name: "serial" (pyserial), "chardev" (os.read/os.write), or "auto":
    serial for a tty by its name (/dev/tty*, /dev/pts/*, after symlinks), so that
    nothing is opened (and no DTR toggled) just to find out."""
    if link == "auto":
        real = os.path.realpath(device)
        tty_name = os.path.basename(real).startswith("tty") or real.startswith("/dev/pts/")
        link = "serial" if tty_name else "chardev"
    if link == "serial":
        return SerialLink(device, baudrate)
    if link == "chardev":
        return CharDeviceLink(device)
    raise InferenceError(f"fpga: link must be serial, chardev or auto, not {link!r}")


# -- the backend -----------------------------------------------------------------------


class FpgaBackend(Backend):
    name = "fpga"

    def __init__(
        self,
        device: str,
        *,
        link: str = "auto",
        baudrate: int = 115200,
        timeout: float = 1.0,
        retries: int = 2,
    ) -> None:
        import numpy as np

        self.np = np
        self.device = device
        self.timeout = timeout
        self.retries = retries
        self._open = lambda: open_link(device, link, baudrate)
        self.link = self._open()
        self.reader = FrameReader({RESPONSE | INFO, RESPONSE | INFER}, INFO_BODY.size)
        self.tag = 0
        self.counts = {"requests": 0, "retries": 0, "timeouts": 0, "stale": 0, "busy": 0}
        try:
            body = self.request(INFO, b"")
            if len(body) != INFO_BODY.size - 1:
                raise FpgaError(f"fpga {device}: INFO answer of {len(body)} bytes")
            _status, in_code, out_code, _res, in_count, out_count = INFO_BODY.unpack(b"\0" + body)
            if in_code not in DTYPES or out_code not in DTYPES:
                raise FpgaError(f"fpga {device}: unknown dtype codes {in_code}, {out_code}")
        except BaseException:
            self.close()
            raise
        self.input_dtype = np.dtype(DTYPES[in_code])
        self.output_dtype = np.dtype(DTYPES[out_code])
        self.input_shape = (in_count,)
        self.output_shape = (out_count,)
        self.reader.max_payload = max(INFO_BODY.size, 1 + out_count * self.output_dtype.itemsize)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "device": self.device,
            "input": [list(self.input_shape), self.input_dtype.str],
            "output": [list(self.output_shape), self.output_dtype.str],
        }

    def run(self, input):
        np = self.np
        x = np.ascontiguousarray(input, dtype=self.input_dtype)
        if x.size != self.input_shape[0]:
            raise ValueError(
                f"fpga: input of {x.size} values, the accelerator takes {self.input_shape[0]}"
            )
        body = self.request(INFER, x.astype(self.input_dtype.newbyteorder("<")).tobytes())
        want = self.output_shape[0] * self.output_dtype.itemsize
        if len(body) != want:
            raise FpgaError(f"fpga {self.device}: result of {len(body)} bytes, wanted {want}")
        return np.frombuffer(body, dtype=self.output_dtype).astype(
            self.output_dtype.newbyteorder("=")
        )

    def request(self, kind: int, payload: bytes) -> bytes:
        """Send one request and return the answer's body (after the status byte)."""
        self.counts["requests"] += 1
        if self.link is None:  # lost (a USB adapter unplugged): open it again
            self.link = self._open()
        try:
            return self._request(kind, payload)
        except OSError as exc:  # pyserial's SerialException is one too
            with contextlib.suppress(OSError):
                self.link.close()
            self.link = None
            raise FpgaError(f"fpga {self.device}: {exc}") from None

    def _request(self, kind: int, payload: bytes) -> bytes:
        for attempt in range(1 + self.retries):
            if attempt:
                self.counts["retries"] += 1
            self.tag = (self.tag + 1) & 0xFF
            self.reader.skipped += len(self.link.discard())
            self.reader.reset()
            self.link.write(encode_frame(kind, self.tag, payload))
            answer = self._await(kind | RESPONSE, self.tag)
            if answer is None:
                self.counts["timeouts"] += 1
                continue
            status, body = answer[0], answer[1:]
            if status == OK:
                return body
            if status == BUSY:
                self.counts["busy"] += 1
                time.sleep(BUSY_PAUSE)
                continue
            name = STATUS_NAMES.get(status, f"status {status}")
            raise FpgaError(f"fpga {self.device}: {name}")
        raise FpgaError(
            f"fpga {self.device}: no valid answer in {1 + self.retries} attempts "
            f"of {self.timeout} s"
        )

    def _await(self, kind: int, tag: int) -> bytes | None:
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            for rkind, rtag, body in self.reader.feed(self.link.read(left)):
                if rkind == kind and rtag == tag and body:
                    return body
                self.counts["stale"] += 1  # an answer to an earlier attempt

    def counters(self) -> dict[str, int]:
        return {
            **self.counts,
            "crc_errors": self.reader.crc_errors,  # answers garbled on the link
            "garbage_bytes": self.reader.skipped,  # bytes skipped looking for a frame
        }

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None
