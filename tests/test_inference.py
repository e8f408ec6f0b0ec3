"""The inference subscriber: the tiny model in the real interpreter against numpy, the
decode rule, the FPGA backend against a simulator on a real pty, crash recovery of
unfinished windows, and the whole path through the daemon."""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import ROOT, cli, stats_json, subscriber_pid, wait_for
from fpga_sim import FpgaSimulator, load_make_model

from appliance.client import Client
from appliance.store.segment import Record
from appliance.subscribers.base import Context
from appliance.subscribers.fpga import (
    RESPONSE,
    FpgaBackend,
    FpgaError,
    FrameReader,
    encode_frame,
)
from appliance.subscribers.inference import (
    STATE_FILE,
    DecodeRule,
    InferenceError,
    InferenceSubscriber,
)
from appliance.subscribers.tflite_backend import TFLiteBackend

MODEL = ROOT / "models" / "tiny.tflite"
MM = load_make_model()
PARAMS = MM.weights()
LABELS = list(MM.LABELS)
TOL = 1e-5  # float32 kernels vs float64 numpy: the scores agree far closer than this


def reference(x) -> np.ndarray:
    return MM.reference(np.asarray(x, dtype=np.float32).reshape(1, -1))[0]


# -- the model -------------------------------------------------------------------------


def test_committed_model_is_what_make_model_writes(tmp_path):
    out = tmp_path / "tiny.tflite"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make-model"), "--out", str(out)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert out.read_bytes() == MODEL.read_bytes()
    assert len(out.read_bytes()) < 4096


def test_interpreter_output_matches_numpy_reference():
    backend = TFLiteBackend(MODEL)
    assert backend.input_shape == (1, 16) and backend.output_shape == (1, 4)
    assert backend.input_dtype == np.float32
    rng = np.random.default_rng(42)
    inputs = [np.zeros(16), np.full(16, -3.0), np.arange(16) / 4.0]
    inputs += [rng.normal(scale=s, size=16) for s in (0.1, 1.0, 5.0) for _ in range(30)]
    labels = set()
    for x in inputs:
        got = backend.run(np.asarray(x, dtype=np.float32).reshape(1, 16))[0]
        want = reference(x)
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
        assert abs(float(got.sum()) - 1.0) < 1e-5
        labels.add(int(np.argmax(got)))
    assert len(labels) >= 2  # the weights separate inputs: not a constant model
    # by hand for x = 0: relu(b1) feeds the second layer
    z = PARAMS["W2"].astype(np.float64) @ np.maximum(PARAMS["b1"], 0) + PARAMS["b2"]
    np.testing.assert_allclose(
        backend.run(np.zeros((1, 16), np.float32))[0], np.exp(z) / np.exp(z).sum(), atol=TOL
    )


def test_a_missing_runtime_is_one_clear_line(tmp_path):
    # a Python where neither runtime imports: packages of those names that fail to import
    for name in ("ai_edge_litert", "tflite_runtime"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise ImportError('not installed')\n")
    code = (
        "from appliance.subscribers.tflite_backend import TFLiteBackend\n"
        f"TFLiteBackend({str(MODEL)!r})\n"
    )
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}:{ROOT}")
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, env=env, timeout=60, check=False
    )
    last = result.stderr.decode().strip().splitlines()[-1]
    assert result.returncode == 1
    assert "needs ai-edge-litert or tflite-runtime" in last
    assert "module-ingest[inference]" in last


# -- the decode rule -------------------------------------------------------------------


def test_decode_rule_float32_window_in_frame_order():
    rule = DecodeRule("float32", [4], 4, (1, 16), np.float32)
    assert rule.frame_bytes == 16
    frames = [np.arange(4 * i, 4 * i + 4, dtype="<f4").tobytes() for i in range(4)]
    x = rule.assemble(frames)
    assert x.shape == (1, 16) and x.dtype == np.float32
    assert x.tolist() == [list(range(16))]


def test_decode_rule_int16_scaled_and_big_endian():
    rule = DecodeRule("int16", [2, 2], 4, (1, 16), np.float32, scale=0.5, offset=-1.0)
    assert rule.frame_bytes == 8
    raw = np.arange(-8, 8, dtype=np.int16)
    frames = [raw[i * 4 : i * 4 + 4].astype("<i2").tobytes() for i in range(4)]
    assert rule.assemble(frames).reshape(-1).tolist() == (raw * 0.5 - 1.0).tolist()
    big = DecodeRule(">f4", None, 2, (1, 16), np.float32)
    assert big.shape == (8,) and big.frame_bytes == 32
    vals = np.linspace(-1, 1, 16).astype(np.float32)
    frames = [vals[:8].astype(">f4").tobytes(), vals[8:].astype(">f4").tobytes()]
    assert big.assemble(frames).reshape(-1).tolist() == vals.tolist()


@pytest.mark.parametrize(
    ("dtype", "shape", "window", "message"),
    [
        ("float32", [4], 3, "window 3 x shape [4] = 12 values; the model takes [1, 16] = 16"),
        ("float32", None, 3, "not a multiple of window 3"),
        ("float32", [4], 0, "window must be at least 1"),
        ("complex64", [4], 4, "not an integer or float type"),
        ("nonsense", [4], 4, "is not a numpy dtype"),
        ("float32", [0, 4], 4, "shape must be a list of positive ints"),
    ],
)
def test_decode_rule_refuses_what_does_not_fit(dtype, shape, window, message):
    with pytest.raises(InferenceError, match=message.replace("[", r"\[").replace("]", r"\]")):
        DecodeRule(dtype, shape, window, (1, 16), np.float32)


# -- the subscriber, without a daemon ---------------------------------------------------


class Log:
    """Records as the runner hands them over: consecutive positions, seqs per identity."""

    def __init__(self) -> None:
        self.offset = 4096
        self.seqs: dict[str, int] = {}
        self.values: dict[tuple[str, int], np.ndarray] = {}  # (identity, seq) -> values

    def record(self, payload: bytes, identity="dev/core-0", channel=3) -> Record:
        seq = self.seqs.get(identity, 0) + 1
        self.seqs[identity] = seq
        start, self.offset = self.offset, self.offset + 40 + len(identity) + len(payload)
        return Record(
            1, start, identity, channel, seq, seq * 1000, seq * 1000, payload, self.offset
        )

    def frames(self, count: int, identity="dev/core-0", channel=3, seed=0) -> list[Record]:
        rng = np.random.default_rng(seed + len(self.values))
        out = []
        for _ in range(count):
            values = rng.normal(size=4).astype(np.float32)
            rec = self.record(values.astype("<f4").tobytes(), identity, channel)
            self.values[(identity, rec.seq)] = values
            out.append(rec)
        return out


def make_sub(tmp_path, **options) -> tuple[InferenceSubscriber, list]:
    published: list[tuple[int, dict, int]] = []

    def publish(channel: int, payload: bytes, ts_ns: int) -> None:
        published.append((channel, json.loads(payload), ts_ns))

    opts = {
        "output_channel": 100,
        "model": str(MODEL),
        "dtype": "float32",
        "shape": [4],
        "window": 4,
        "labels": LABELS,
        **options,
    }
    state_dir = tmp_path / "subscribers" / "ai"
    state_dir.mkdir(parents=True, exist_ok=True)
    context = Context("ai", tmp_path, state_dir, None, publish, opts)
    return InferenceSubscriber(context), published


def check_result(log: Log, result: dict, seqs=None) -> None:
    ident, first = result["first"]
    seqs = range(first, first + 4) if seqs is None else seqs
    assert result["last"] == [ident, seqs[-1]]
    x = np.concatenate([log.values[(ident, s)] for s in seqs])
    np.testing.assert_allclose(result["scores"], reference(x), atol=TOL, rtol=0)
    assert result["label"] == int(np.argmax(result["scores"]))
    assert result["label_name"] == LABELS[result["label"]]
    assert result["latency_ms"] >= 0


def firsts(published) -> list[tuple[str, int]]:
    return [tuple(result["first"]) for _channel, result, _ts in published]


def test_windows_per_identity_and_channel_with_bad_frames_counted(tmp_path, caplog):
    sub, published = make_sub(tmp_path)
    log = Log()
    stream: list[Record] = []
    streams: dict[tuple[str, int], list[Record]] = {}
    for i in range(8):  # three streams interleaved, with frames of the wrong size among them
        for ident, channel, count in (
            ("dev/core-0", 3, 8),
            ("dev/core-1", 3, 6),
            ("dev/core-0", 5, 4),
        ):
            if i < count:
                (rec,) = log.frames(1, ident, channel)
                stream.append(rec)
                streams.setdefault((ident, channel), []).append(rec)
        if i in (1, 4):
            stream += [log.record(b"\x00" * n) for n in ((0, 15, 17) if i == 1 else (32, 3))]
    with caplog.at_level(logging.WARNING, logger="appliance.subscribers.inference"):
        sub.handle(stream[:11])
        sub.handle(stream[11:])
    assert sub.skipped_total == 5
    warnings = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warnings) == 3  # the 1st, 2nd and 4th of that stream
    assert "the decode rule wants 16; skipped (4 so far" in warnings[-1].getMessage()
    want = {
        (key, tuple(r.seq for r in recs[i : i + 4]))
        for key, recs in streams.items()
        for i in range(0, len(recs) - 3, 4)
    }
    assert len(want) == 4 and len(published) == 4
    for channel, result, ts_ns in published:
        assert channel == 100
        key = (result["identity"], result["channel"])
        seqs = next(seqs for k, seqs in want if k == key and seqs[0] == result["first"][1])
        assert (key, seqs) in want
        check_result(log, result, seqs)
        assert ts_ns == seqs[-1] * 1000  # the window's last frame's time
    assert {((r["identity"], r["channel"]), r["first"][1]) for _c, r, _t in published} == {
        (key, seqs[0]) for key, seqs in want
    }
    b = streams[("dev/core-1", 3)]
    assert sub.state.pending == {
        ("dev/core-1", 3): tuple((r.seq, r.ts_ns, r.payload) for r in b[4:])
    }


def test_own_results_are_not_inputs(tmp_path):
    sub, published = make_sub(tmp_path, window=1, shape=[16])
    log = Log()
    sub.handle([log.record(np.zeros(16, "<f4").tobytes(), identity="subscriber/ai")])
    assert published == [] and sub.skipped_total == 0


def test_the_state_file_is_written_only_when_a_restart_needs_it(tmp_path):
    state = tmp_path / "subscribers" / "ai" / STATE_FILE
    sub, published = make_sub(tmp_path, window=1, shape=[16])
    log = Log()
    for _ in range(3):
        sub.handle([log.record(np.ones(16, "<f4").tobytes()) for _ in range(5)])
        sub.flush()
    assert len(published) == 15 and not state.exists()  # nothing unfinished, ever
    sub, published = make_sub(tmp_path)
    sub.handle(log.frames(8))
    sub.flush()
    assert len(published) == 2 and not state.exists()
    sub.handle(log.frames(2))
    sub.flush()
    assert state.exists()
    saved = state.stat().st_mtime_ns, state.read_bytes()
    sub.handle(log.frames(2))
    sub.flush()  # the window completed: but the state before it had 2 frames
    assert state.read_bytes() != saved[1]
    sub.handle(log.frames(4))
    sub.flush()  # base and state both empty, the file is not: written
    assert json.loads(state.read_text())["state"]["pending"] == []
    saved = state.read_bytes()
    sub.handle(log.frames(4))
    sub.flush()
    assert state.read_bytes() == saved  # empty, empty, on flash already: no write


def test_unfinished_windows_survive_a_restart(tmp_path):
    log = Log()
    batch1, batch2 = log.frames(6), log.frames(4)
    sub, published = make_sub(tmp_path)
    sub.handle(batch1)
    sub.flush()  # the runner commits the cursor after this
    sub.close()
    again, published2 = make_sub(tmp_path)  # a restart: the cursor is past batch1
    again.handle(batch2)
    assert firsts(published) == [("dev/core-0", 1)]
    assert firsts(published2) == [("dev/core-0", 5)]  # frames 5, 6 from before the restart
    check_result(log, published2[0][1])
    assert again.state.pending[("dev/core-0", 3)][0][0] == 9


def test_a_kill_before_the_commit_replays_the_batch_on_the_state_before_it(tmp_path):
    log = Log()
    batch0, batch1, batch2 = log.frames(2), log.frames(4), log.frames(6)
    sub, published = make_sub(tmp_path)
    sub.handle(batch0)
    sub.flush()  # committed
    sub.handle(batch1)
    sub.flush()  # killed here: before the results' ACKs and the commit
    again, published2 = make_sub(tmp_path)
    again.handle(batch1)  # comes again from the committed cursor
    again.flush()
    again.handle(batch2)
    assert firsts(published) == [("dev/core-0", 1)]
    assert firsts(published2) == [("dev/core-0", 1), ("dev/core-0", 5), ("dev/core-0", 9)]
    for _c, result, _t in published2:
        check_result(log, result)


def test_a_kill_before_the_flush_loses_nothing_either(tmp_path):
    log = Log()
    batch1, batch2 = log.frames(6), log.frames(6)
    sub, _ = make_sub(tmp_path)
    sub.handle(batch1)  # killed before flush: nothing saved, nothing committed
    again, published = make_sub(tmp_path)
    again.handle(batch1)
    again.handle(batch2)
    assert firsts(published) == [("dev/core-0", 1), ("dev/core-0", 5), ("dev/core-0", 9)]


def test_a_batch_that_comes_again_in_process_does_not_double_frames(tmp_path):
    # the runner's flush of the published results failed: same batch, same process
    log = Log()
    batch1, batch2 = log.frames(6), log.frames(2)
    sub, published = make_sub(tmp_path)
    sub.handle(batch1)
    sub.flush()
    sub.handle(batch1)
    sub.flush()
    sub.handle(batch2)
    assert firsts(published) == [("dev/core-0", 1), ("dev/core-0", 1), ("dev/core-0", 5)]
    check_result(log, published[-1][1])


def test_a_damaged_state_file_is_set_aside(tmp_path, caplog):
    state = tmp_path / "subscribers" / "ai" / STATE_FILE
    state.parent.mkdir(parents=True)
    state.write_bytes(b'{"version": 1, "base": {"pos": [1, 2], "pending": [{"ident')
    with caplog.at_level(logging.WARNING, logger="appliance.subscribers.inference"):
        sub, published = make_sub(tmp_path)
    assert "set aside as windows.bad" in caplog.text
    assert state.with_suffix(".bad").exists() and not state.exists()
    log = Log()
    sub.handle(log.frames(6))
    sub.flush()
    assert firsts(published) == [("dev/core-0", 1)]
    assert len(json.loads(state.read_text())["state"]["pending"][0]["frames"]) == 2


def test_a_model_that_does_not_load_is_one_line(tmp_path):
    with pytest.raises(InferenceError, match=r"model file .* not found"):
        make_sub(tmp_path, model=str(tmp_path / "missing.tflite"))
    bad_model = tmp_path / "bad.tflite"
    bad_model.write_bytes(b"not a flatbuffer" * 8)
    with pytest.raises(InferenceError, match="cannot load"):
        make_sub(tmp_path, model=str(bad_model))


# -- the FPGA backend and its protocol -------------------------------------------------


def hexbytes(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def test_frame_vectors_of_fpga_md():
    doc = (ROOT / "appliance" / "subscribers" / "FPGA.md").read_text()
    info_req = "a5 5a 01 01 00 00 98 3a d2 4e"
    info_resp = "a5 5a 81 01 00 0c 00 00 00 00 00 00 00 10 00 00 00 04 5a e2 06 b8"
    infer = "a5 5a 02 02 00 10 00 00 00 00 00 00 80 3f 00 00 00 40 00 00 40 40 6f 25 22 53"
    bad_len = "a5 5a 82 03 00 01 01 71 ad ba d6"
    for vector in (info_req, info_resp, infer, bad_len):
        assert vector in doc
    assert encode_frame(0x01, 1) == hexbytes(info_req)
    assert encode_frame(0x02, 2, np.arange(4, dtype="<f4").tobytes()) == hexbytes(infer)
    reader = FrameReader({0x81, 0x82}, max_payload=17)  # the largest answer the host expects
    noise = b"\x00\xa5\xa5\x5a\x81\xff\xff\x13"  # a sync with an oversized length in front
    frames = reader.feed(noise + hexbytes(info_resp) + hexbytes(bad_len)[:5])
    assert frames == [(0x81, 1, hexbytes(info_resp)[6:-4])]
    assert reader.feed(hexbytes(bad_len)[5:]) == [(0x82, 3, b"\x01")]
    assert reader.skipped == len(noise)
    corrupt = bytearray(hexbytes(bad_len))
    corrupt[6] ^= 0x40
    assert reader.feed(bytes(corrupt) + hexbytes(bad_len)) == [(0x82, 3, b"\x01")]
    assert reader.crc_errors == 1


@pytest.fixture
def sim():
    with FpgaSimulator(PARAMS) as simulator:
        yield simulator


@pytest.mark.parametrize("link", ["serial", "chardev", "auto"])
def test_fpga_backend_against_the_simulator(sim, link):
    backend = FpgaBackend(sim.device, link=link, timeout=0.5)
    try:
        assert backend.input_shape == (16,) and backend.output_shape == (4,)
        rng = np.random.default_rng(3)
        for _ in range(50):
            x = rng.normal(scale=2.0, size=16).astype(np.float32)
            np.testing.assert_allclose(backend.run(x), reference(x), atol=TOL, rtol=0)
        assert backend.stats["timeouts"] == 0 and backend.garbage_bytes == 0
    finally:
        backend.close()


def test_fpga_backend_resyncs_after_garbage_timeouts_and_stale_answers(sim):
    backend = FpgaBackend(sim.device, timeout=0.1, retries=2)
    try:
        x = np.linspace(-2, 2, 16, dtype=np.float32)
        want = reference(x)
        sim.inject("garbage", "drop", "corrupt", "stale", "busy", "split")
        started = time.monotonic()
        for _ in range(8):
            np.testing.assert_allclose(backend.run(x), want, atol=TOL, rtol=0)
        elapsed = time.monotonic() - started
        stats = backend.stats
        assert stats["timeouts"] == 2  # the dropped and the corrupted answer
        assert stats["stale"] == 1 and stats["busy"] == 1 and stats["retries"] == 3
        assert backend.reader.crc_errors >= 1 and backend.garbage_bytes >= 40
        assert elapsed >= 0.2  # two timeouts of 0.1 s waited out
        # garbage towards the device: it skips to the next sync and answers the request
        backend.link.write(b"\x5a\xa5\x5a\x02\x07\x00\x10junk" + bytes(range(30)))
        np.testing.assert_allclose(backend.run(x), want, atol=TOL, rtol=0)
        assert sim.garbage_in > 0
    finally:
        backend.close()


def test_fpga_backend_gives_up_after_its_retries(sim):
    backend = FpgaBackend(sim.device, timeout=0.05, retries=1)
    try:
        sim.inject("drop", "drop")
        started = time.monotonic()
        with pytest.raises(FpgaError, match=r"no valid answer in 2 attempts of 0\.05 s"):
            backend.run(np.zeros(16, np.float32))
        assert time.monotonic() - started > 0.09  # two attempts of 0.05 s each
        assert backend.stats["timeouts"] == 2
        np.testing.assert_allclose(
            backend.run(np.zeros(16, np.float32)), reference(np.zeros(16)), atol=TOL
        )
        # a status error fails at once, without retries
        with pytest.raises(FpgaError, match="BAD_LENGTH"):
            backend.request(0x02, b"\0" * 12)
        # a request type the device does not know
        backend.link.write(encode_frame(0x33, 9))
        reader = FrameReader({0x33 | RESPONSE})
        answer = wait_for(lambda: reader.feed(backend.link.read(0.1)), what="an answer")
        assert answer == [(0x33 | RESPONSE, 9, b"\x02")]  # UNKNOWN_TYPE
    finally:
        backend.close()


def test_fpga_backend_reopens_a_lost_device(sim):
    backend = FpgaBackend(sim.device, link="chardev", timeout=0.2)
    x = np.ones(16, np.float32)
    os.close(backend.link.fd)  # the device went away under it (an unplugged adapter)
    with pytest.raises(FpgaError, match="Bad file descriptor"):
        backend.run(x)
    assert backend.link is None
    np.testing.assert_allclose(backend.run(x), reference(x), atol=TOL, rtol=0)
    backend.close()


def test_subscriber_with_the_fpga_backend_and_a_failing_device(sim, tmp_path):
    sub, published = make_sub(tmp_path, backend="fpga", device=sim.device, timeout=0.05, retries=0)
    log = Log()
    batch = log.frames(8)
    sim.inject("none", "drop")  # the second window fails: the batch raises, nothing changes
    with pytest.raises(FpgaError):
        sub.handle(batch)
    assert published == [] and sub.state.pending == {}
    sub.handle(batch)  # the runner hands it over again
    assert firsts(published) == [("dev/core-0", 1), ("dev/core-0", 5)]
    for _c, result, _t in published:
        check_result(log, result)
        assert result["backend"] == "fpga"
    sub.close()


# -- the latency command -----------------------------------------------------------------


def test_latency_command_for_both_backends(sim):
    base = [sys.executable, "-m", "appliance.subscribers.inference", "--windows", "200"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for extra in (["--model", str(MODEL)], ["--backend", "fpga", "--device", sim.device]):
        result = subprocess.run(
            base + extra, capture_output=True, env=env, timeout=60, check=False, cwd=ROOT
        )
        assert result.returncode == 0, result.stderr.decode()
        figures = json.loads(result.stdout)
        assert figures["windows"] == 200
        assert 0 < figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"]


# -- through the daemon ------------------------------------------------------------------


def config(**extra: str) -> str:
    lines = [
        "[subscribers.ai]",
        'type = "inference"',
        "channels = [3]",
        "output_channel = 100",
        f"model = {json.dumps(str(MODEL))}",
        'dtype = "float32"',
        "shape = [4]",
        "window = 4",
        f"labels = {json.dumps(LABELS)}",
        *(f"{k} = {v}" for k, v in extra.items()),
    ]
    return "\n".join(lines) + "\n"


def dumped(d, channel: int) -> list[dict]:
    result = cli("dump", "--channel", str(channel), data_dir=d.data_dir)
    assert result.returncode == 0, result.stderr.decode()
    return [json.loads(line) for line in result.stdout.splitlines()]


def results(d) -> list[dict]:
    out = []
    for rec in dumped(d, 100):
        assert rec["id"] == "subscriber/ai"
        out.append(json.loads(base64.b64decode(rec["payload_b64"])))
    return out


class Sender:
    """Frames of 4 float32 on channel 3 as dev/core-0; remembers every value by seq."""

    def __init__(self, d) -> None:
        self.d = d
        self.values: dict[tuple[str, int], np.ndarray] = {}
        self.rng = np.random.default_rng(11)
        self.good: list[int] = []  # seqs of good channel-3 frames, in order

    def send(self, count: int, *, bad_every: int = 0) -> None:
        with Client(self.d.host, self.d.port, "dev/core-0", self.d.dev_token) as client:
            for i in range(count):
                values = self.rng.normal(size=4).astype(np.float32)
                seq = client.send(3, values.astype("<f4").tobytes())
                self.values[("dev/core-0", seq)] = values
                self.good.append(seq)
                if bad_every and i % bad_every == 1:
                    client.send(3, b"short")  # skipped and counted
                    client.send(4, values.astype("<f4").tobytes())  # not a channel of ai
            client.flush()

    def windows(self) -> list[tuple[int, int]]:
        g = self.good
        return [(g[i], g[i + 3]) for i in range(0, len(g) - 3, 4)]

    def check(self, result: dict) -> None:
        ident, first = result["first"]
        _, last = result["last"]
        i = self.good.index(first)
        assert self.good[i + 3] == last
        x = np.concatenate([self.values[(ident, s)] for s in self.good[i : i + 4]])
        np.testing.assert_allclose(result["scores"], reference(x), atol=TOL, rtol=0)
        assert result["label"] == int(np.argmax(reference(x)))


def window_set(d) -> set[tuple[int, int]]:
    return {(r["first"][1], r["last"][1]) for r in results(d)}


def test_results_through_the_daemon(daemon_factory):
    d = daemon_factory(config())
    sender = Sender(d)
    sender.send(40, bad_every=7)
    want = set(sender.windows())
    assert len(want) == 10
    wait_for(lambda: window_set(d) >= want, timeout=15, what="10 windows on channel 100")
    got = results(d)
    for result in got:
        assert result["identity"] == "dev/core-0" and result["channel"] == 3
        assert result["backend"] == "tflite" and result["latency_ms"] > 0
        sender.check(result)
    assert {(r["first"][1], r["last"][1]) for r in got} == want
    assert len(got) == len(want)  # no crash: exactly once here
    assert "skipped (4 so far from it)" in d.log()  # 6 short frames: warned at 1, 2, 4
    status = wait_for(
        lambda: (s := stats_json(d.data_dir)["subscribers"]["ai"]).get("windows") == 10 and s,
        what="the subscriber's status",
    )
    assert status["wrong_size_frames"] == 6 and status["latency_p99_ms"] > 0


def test_kill_9_of_the_subscriber_loses_no_window(daemon_factory):
    d = daemon_factory(config())
    sender = Sender(d)
    sender.send(42)  # 10 windows and 2 frames of the 11th
    wait_for(lambda: len(window_set(d)) >= 10, timeout=15, what="the first 10 windows")
    state = d.data_dir / "subscribers" / "ai" / STATE_FILE
    wait_for(
        lambda: state.exists() and json.loads(state.read_text())["state"]["pending"],
        what="the unfinished window on flash",
    )
    pid = wait_for(lambda: subscriber_pid(d, "ai"), what="the subscriber process")
    os.kill(pid, signal.SIGKILL)
    # more frames while it is down and restarting, and a kill in the middle of a stream
    sender.send(22)
    wait_for(lambda: subscriber_pid(d, "ai") not in (0, pid), timeout=10, what="a restart")
    pid = subscriber_pid(d, "ai")
    stop = threading.Event()

    def stream() -> None:
        while not stop.is_set() and len(sender.good) < 400:
            sender.send(8)

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        wait_for(lambda: len(sender.good) >= 150, timeout=10, what="streaming")
        os.kill(pid, signal.SIGKILL)
        wait_for(
            lambda: subscriber_pid(d, "ai") not in (0, pid), timeout=10, what="a second restart"
        )
    finally:
        stop.set()
        thread.join()
    want = set(sender.windows())
    wait_for(lambda: window_set(d) >= want, timeout=15, what="every window after the kills")
    assert (sender.good[40], sender.good[43]) in window_set(d)  # the one cut by the kill
    got = results(d)
    for result in got:
        sender.check(result)  # at least once; never a window of mixed-up frames
    assert window_set(d) == want
    assert d.log().count("exited with -9; restarting") == 2


def test_fpga_backend_through_the_daemon(daemon_factory, sim):
    text = config(backend='"fpga"', device=json.dumps(sim.device), timeout="0.5")
    d = daemon_factory(text)
    sender = Sender(d)
    sender.send(16)
    want = set(sender.windows())
    wait_for(lambda: window_set(d) >= want, timeout=15, what="4 windows from the FPGA")
    for result in results(d):
        assert result["backend"] == "fpga"
        sender.check(result)
