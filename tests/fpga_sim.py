#!/usr/bin/env python3
"""A simulated FPGA accelerator on a real pty, speaking appliance/subscribers/inference/FPGA.md.

    with FpgaSimulator(params) as sim:      # params: scripts/make-model's weights()
        backend = FpgaBackend(sim.device)   # the pty's slave side, e.g. /dev/pts/7

A thread owns the master side: it reads requests, checks their framing and CRC
(its own code, written from FPGA.md, not the host's) and answers with the
model's math in numpy: softmax(W2 relu(W1 x + b1) + b2), in float32. Faults for
the resync tests are queued with `inject`; each applies to one request:

    "drop"     no answer (the host times out and retries)
    "garbage"  random bytes, some of them sync bytes, before the answer
    "corrupt"  the answer with a flipped CRC bit
    "stale"    first an answer with the previous tag, then the right one
    "busy"     status BUSY instead of a result
    "split"    the answer a byte at a time, 1 ms apart
    "none"     a normal answer (to aim a fault at a later request)

Run as a script it serves until interrupted and prints the device path:
`python tests/fpga_sim.py` (then `--backend fpga --device PATH` for the bench).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import random
import select
import struct
import sys
import threading
import time
import tty
import zlib
from collections import deque
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

SYNC = b"\xa5\x5a"
INFO, INFER, RESPONSE = 0x01, 0x02, 0x80
OK, BAD_LENGTH, UNKNOWN_TYPE, BUSY = 0, 1, 2, 3
FLOAT32 = 0


def load_make_model():
    """scripts/make-model as a module (it has no .py suffix)."""
    path = ROOT / "scripts" / "make-model"
    loader = importlib.machinery.SourceFileLoader("make_model", str(path))
    spec = importlib.util.spec_from_loader("make_model", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def forward(params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The accelerator's datapath, float32 like the fabric would be."""
    x = x.astype(np.float32).reshape(-1)
    h = np.maximum(params["W1"] @ x + params["b1"], np.float32(0))
    z = params["W2"] @ h + params["b2"]
    e = np.exp(z - z.max())
    return (e / e.sum()).astype(np.float32)


def frame(kind: int, tag: int, payload: bytes) -> bytes:
    body = bytes([kind, tag]) + len(payload).to_bytes(2, "big") + payload
    return SYNC + body + zlib.crc32(body).to_bytes(4, "big")


class FpgaSimulator:
    def __init__(self, params: dict[str, np.ndarray], *, seed: int = 7) -> None:
        self.params = params
        self.in_count = params["W1"].shape[1]
        self.out_count = params["W2"].shape[0]
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)  # no echo, no line editing: bytes pass as they are
        self.device = os.ttyname(self.slave)
        self.faults: deque[str] = deque()
        self.requests = 0
        self.bad_crc = 0
        self.garbage_in = 0  # bytes it skipped looking for a request
        self.rng = random.Random(seed)
        self._buf = bytearray()
        self._last_tag = 0
        self._wake_r, self._wake_w = os.pipe()
        self._stop = False
        self._thread = threading.Thread(target=self._serve, name="fpga-sim", daemon=True)

    def __enter__(self) -> FpgaSimulator:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def inject(self, *faults: str) -> None:
        self.faults.extend(faults)

    def close(self) -> None:
        self._stop = True
        os.write(self._wake_w, b"x")
        if self._thread.is_alive():
            self._thread.join(5)
        for fd in (self.master, self.slave, self._wake_r, self._wake_w):
            os.close(fd)

    # -- the device --------------------------------------------------------------------

    def _serve(self) -> None:
        while not self._stop:
            ready, _, _ = select.select([self.master, self._wake_r], [], [])
            if self._wake_r in ready:
                return
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO while no one holds the slave open: not our case
                time.sleep(0.01)
                continue
            self._buf += data
            for kind, tag, payload in self._requests():
                self._answer(kind, tag, payload)

    def _requests(self):
        buf = self._buf
        max_payload = self.in_count * 4
        while True:
            start = buf.find(SYNC)
            if start < 0:
                keep = 1 if buf[-1:] == SYNC[:1] else 0
                self.garbage_in += len(buf) - keep
                del buf[: len(buf) - keep]
                return
            self.garbage_in += start
            del buf[:start]
            if len(buf) < 6:
                return
            kind, tag = buf[2], buf[3]
            length = int.from_bytes(buf[4:6], "big")
            if length > max_payload:
                self.garbage_in += 1
                del buf[:1]
                continue
            if len(buf) < 6 + length + 4:
                return
            crc = int.from_bytes(buf[6 + length : 10 + length], "big")
            if zlib.crc32(buf[2 : 6 + length]) != crc:
                self.bad_crc += 1  # a request it cannot trust is not answered
                self.garbage_in += 1
                del buf[:1]
                continue
            payload = bytes(buf[6 : 6 + length])
            del buf[: 10 + length]
            yield kind, tag, payload

    def _answer(self, kind: int, tag: int, payload: bytes) -> None:
        self.requests += 1
        fault = self.faults.popleft() if self.faults else None
        if kind == INFO:
            body = struct.pack(">BBBBII", OK, FLOAT32, FLOAT32, 0, self.in_count, self.out_count)
        elif kind == INFER and fault == "busy":
            body = bytes([BUSY])
        elif kind == INFER and len(payload) != self.in_count * 4:
            body = bytes([BAD_LENGTH])
        elif kind == INFER:
            x = np.frombuffer(payload, dtype="<f4")
            body = bytes([OK]) + forward(self.params, x).astype("<f4").tobytes()
        else:
            body = bytes([UNKNOWN_TYPE])
        out = frame(kind | RESPONSE, tag, body)
        if fault == "drop":
            self._last_tag = tag
            return
        if fault == "garbage":
            noise = bytes(self.rng.randrange(256) for _ in range(40))
            out = noise + SYNC + b"\x82" + noise[:9] + SYNC + out
        elif fault == "corrupt":
            out = out[:-1] + bytes([out[-1] ^ 0x01])
        elif fault == "stale":
            out = frame(kind | RESPONSE, self._last_tag, body) + out
        self._last_tag = tag
        if fault == "split":
            for i in range(len(out)):
                os.write(self.master, out[i : i + 1])
                time.sleep(0.001)
            return
        os.write(self.master, out)


def main() -> int:
    params = load_make_model().weights()
    with FpgaSimulator(params) as sim:
        print(f"fpga-sim: {sim.device}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
