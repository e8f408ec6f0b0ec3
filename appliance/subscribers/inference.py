"""On-board inference: run a model over windows of frames, publish the results.

    [subscribers.ai]
    type = "inference"
    channels = [3]                   # the runner's filters: which frames are inputs
    output_channel = 100             # results go back into the store on this channel
    backend = "tflite"               # or "fpga"
    model = "models/tiny.tflite"     # tflite: relative paths are from the config file
    threads = 1                      # tflite: interpreter threads
    # device = "/dev/ttyUSB1"        # fpga: a tty (pyserial) or a character device
    # link = "auto"                  # fpga: serial | chardev | auto (serial for a tty)
    # baudrate = 115200              # fpga, serial link
    # timeout = 1.0                  # fpga: seconds per attempt
    # retries = 2                    # fpga: attempts after the first
    dtype = "float32"                # decode rule: one frame = `shape` values of `dtype`
    shape = [4]                      #   (little-endian unless the dtype says "<" or ">")
    window = 4                       #   N frames of one (identity, channel) = one input
    scale = 1.0                      #   input = value * scale + offset, cast to the
    offset = 0.0                     #   model's input dtype and reshaped to its shape
    labels = ["idle", "walk", "run", "fall"]   # optional names for the argmax

Windows are tumbling and kept per (identity, channel); a frame whose size does
not match the rule is skipped and counted (a warning at the 1st, 2nd, 4th, 8th...).
Each full window is one `Backend.run` (the TFLite interpreter in
tflite_backend.py, or the accelerator of fpga.py) and one JSON result on
`output_channel`, published as identity subscriber/NAME:

    {"identity": "dev/core-0", "channel": 3, "first": ["dev/core-0", 1],
     "last": ["dev/core-0", 4], "scores": [...], "label": 1, "label_name": "walk",
     "latency_ms": 0.031, "backend": "tflite"}

`latency_ms` is the time of `run` for that window, input conversion included.

Nothing is lost across a crash. The frames of unfinished windows are saved in
`state_dir/windows.json` at every flush, beside the log position they
correspond to, together with the previous such state: the runner commits its
cursor only after flush and the results' ACKs, so after a kill (or a batch
that failed after `handle`) the first record delivered tells which of the two
states the cursor matches, and the batch is replayed on top of that one.
Results are delivered at least once: a window whose result was stored just
before a kill comes again; (identity, first seq) names it.

Without the `inference` extra (numpy, and ai-edge-litert or tflite-runtime)
this module still imports, so the daemon can check the config; the
subscriber process stops with a one-line error.

`python -m appliance.subscribers.inference --model M` (or `--backend fpga
--device D`) measures the latency per window (p50/p99) of a backend.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import logging
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.config import REQUIRED, ConfigError, OptionError
from appliance.store.segment import Record
from appliance.subscribers.base import Context, Subscriber
from appliance.telemetry.figures import percentile

log = logging.getLogger("appliance.subscribers.inference")

STATE_FILE = "windows.json"
STATE_VERSION = 1
EXTRA = "pip install 'module-ingest[inference]'"
LATENCY_SAMPLES = 10000  # the latest windows' latencies kept for p50/p99


class InferenceError(ConfigError):
    """A configuration or set-up problem (an option, the model, the device, the extra):
    the subscriber process stops with it as one line, like a config error."""


class BackendError(Exception):
    """A window could not be run (device timeout...): the batch comes again."""


def require_numpy():
    try:
        import numpy
    except ImportError:
        raise InferenceError(f"inference needs numpy: {EXTRA}") from None
    return numpy


class Backend:
    """One way of running the model. Subclasses set, in __init__:

    input_shape, input_dtype     what `run` takes (numpy shape and dtype)
    output_shape, output_dtype   what it returns
    """

    name = "backend"
    input_shape: tuple[int, ...] = ()
    input_dtype: Any = None
    output_shape: tuple[int, ...] = ()
    output_dtype: Any = None

    def run(self, input):  # input: ndarray of input_shape -> ndarray
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name}

    def close(self) -> None:
        pass


def open_backend(options: dict[str, Any], base_dir: Path | None = None) -> Backend:
    """The backend an options table asks for ("backend", "model", "device"...)."""
    kind = options.get("backend", "tflite")
    if kind == "tflite":
        from appliance.subscribers.tflite_backend import TFLiteBackend

        model = options.get("model")
        if not isinstance(model, str) or not model:
            raise InferenceError("inference: backend tflite needs model = PATH")
        path = Path(model)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return TFLiteBackend(path, threads=_option(options, "threads", int, 1))
    if kind == "fpga":
        from appliance.subscribers.fpga import FpgaBackend

        device = options.get("device")
        if not isinstance(device, str) or not device:
            raise InferenceError("inference: backend fpga needs device = PATH")
        return FpgaBackend(
            device,
            link=_option(options, "link", str, "auto"),
            baudrate=_option(options, "baudrate", int, 115200),
            timeout=_option(options, "timeout", float, 1.0),
            retries=_option(options, "retries", int, 2),
        )
    raise InferenceError(f"inference: backend must be tflite or fpga, not {kind!r}")


def _option(options: dict[str, Any], key: str, kind: type, default):
    value = options.get(key, default)
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind:
        raise InferenceError(f"inference: option {key} must be {kind.__name__}, not {value!r}")
    return value


# -- the decode rule -------------------------------------------------------------------


class DecodeRule:
    """Frame payloads -> one model input: `window` frames of `shape` values of `dtype`."""

    def __init__(
        self,
        dtype: str,
        shape: list[int] | None,
        window: int,
        input_shape: tuple[int, ...],
        input_dtype,
        scale: float = 1.0,
        offset: float = 0.0,
    ) -> None:
        np = require_numpy()
        self.np = np
        try:
            dt = np.dtype(dtype)
        except TypeError:
            raise InferenceError(f"inference: dtype {dtype!r} is not a numpy dtype") from None
        if dt.kind not in "iuf":
            raise InferenceError(f"inference: dtype {dtype!r} is not an integer or float type")
        if dt.byteorder == "=" and dt.itemsize > 1:
            dt = dt.newbyteorder("<")  # sensor boards are little-endian; say ">" otherwise
        if window < 1:
            raise InferenceError(f"inference: window must be at least 1, not {window}")
        total = int(np.prod(input_shape))
        if shape is None:
            if total % window:
                raise InferenceError(
                    f"inference: the model takes {total} values, not a multiple of window {window}"
                )
            shape = [total // window]
        if not shape or not all(type(n) is int and n > 0 for n in shape):
            raise InferenceError(f"inference: shape must be a list of positive ints: {shape!r}")
        per_frame = int(np.prod(shape))
        if per_frame * window != total:
            raise InferenceError(
                f"inference: window {window} x shape {shape} = {per_frame * window} values; "
                f"the model takes {list(input_shape)} = {total}"
            )
        self.dtype = dt
        self.shape = tuple(shape)
        self.window = window
        self.input_shape = tuple(input_shape)
        self.input_dtype = np.dtype(input_dtype)
        self.scale = scale
        self.offset = offset
        self.frame_bytes = per_frame * dt.itemsize

    @classmethod
    def from_options(cls, options: dict[str, Any], backend: Backend) -> DecodeRule:
        shape = options.get("shape") or None  # none or []: from the model
        if shape is not None and not isinstance(shape, list):
            raise InferenceError(f"inference: shape must be a list of ints, not {shape!r}")
        return cls(
            _option(options, "dtype", str, "float32"),
            shape,
            _option(options, "window", int, 1),
            backend.input_shape,
            backend.input_dtype,
            _option(options, "scale", float, 1.0),
            _option(options, "offset", float, 0.0),
        )

    def fits(self, payload: bytes) -> bool:
        return len(payload) == self.frame_bytes

    def assemble(self, payloads: list[bytes]):
        """The model input for one window of frame payloads (each `fits`)."""
        return self.assemble_many([payloads])[0]

    def assemble_many(self, windows: list[list[bytes]]):
        """The model inputs of many windows at once (one array, one input per window)."""
        np = self.np
        raw = np.frombuffer(b"".join(b"".join(w) for w in windows), dtype=self.dtype)
        # (windows, window, *shape): frames in order
        raw = raw.reshape((len(windows), len(windows[0]), *self.shape))
        if self.scale != 1.0 or self.offset != 0.0:
            raw = raw.astype(np.float64) * self.scale + self.offset
        return raw.astype(self.input_dtype).reshape((len(windows), *self.input_shape))


# -- window state ----------------------------------------------------------------------

Key = tuple[str, int]  # (identity, channel)
Frame = tuple[int, int, bytes]  # (seq, ts_ns, payload)


@dataclass(frozen=True)
class Windows:
    """The unfinished windows after every record before log position `pos` was applied.
    Treated as immutable: applying a batch makes a new one."""

    pos: tuple[int, int] = (0, 0)  # (segment, offset) just past the last record applied
    pending: dict[Key, tuple[Frame, ...]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "pos": list(self.pos),
            "pending": [
                {
                    "identity": ident,
                    "channel": channel,
                    "frames": [[s, t, base64.b64encode(p).decode()] for s, t, p in frames],
                }
                for (ident, channel), frames in self.pending.items()
            ],
        }

    @classmethod
    def from_json(cls, obj: dict) -> Windows:
        pending = {}
        for entry in obj["pending"]:
            frames = tuple(
                (int(s), int(t), base64.b64decode(p, validate=True)) for s, t, p in entry["frames"]
            )
            pending[(str(entry["identity"]), int(entry["channel"]))] = frames
        seg, off = obj["pos"]
        return cls((int(seg), int(off)), pending)


def latency_summary(latencies_ms) -> dict[str, float]:
    values = sorted(latencies_ms)
    if not values:
        return {"windows": 0, "p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    return {
        "windows": len(values),
        "p50_ms": round(percentile(values, 50), 4),
        "p99_ms": round(percentile(values, 99), 4),
        "max_ms": round(values[-1], 4),
    }


# -- the subscriber --------------------------------------------------------------------


class InferenceSubscriber(Subscriber):
    OPTIONS = {  # documented in the module docstring
        "output_channel": (int, REQUIRED, 0),
        "backend": (str, "tflite", None),
        "model": (str, "", None),
        "threads": (int, 1, 1),
        "device": (str, "", None),
        "link": (str, "auto", None),
        "baudrate": (int, 115200, 50),
        "timeout": (float, 1.0, 0.001),
        "retries": (int, 2, 0),
        "dtype": (str, "float32", None),
        "shape": (list[int], [], None),  # []: the model's input size / window
        "window": (int, 1, 1),
        "scale": (float, 1.0, None),
        "offset": (float, 0.0, None),
        "labels": (list[str], [], None),
    }
    CHOICES = {"backend": ("tflite", "fpga"), "link": ("auto", "serial", "chardev")}

    @classmethod
    def check(cls, options: dict[str, Any], config_dir: Path) -> None:
        if options["output_channel"] > 0xFFFF:
            raise OptionError("output_channel", "a channel is 0..65535")
        if options["backend"] == "fpga":
            if not options["device"]:
                raise OptionError("device", "the fpga backend needs device = PATH")
            return
        if importlib.util.find_spec("numpy") is None or not any(
            importlib.util.find_spec(m) for m in ("ai_edge_litert", "tflite_runtime")
        ):
            raise OptionError("backend", f"tflite needs numpy and LiteRT: {EXTRA}")
        if not options["model"]:
            raise OptionError("model", "the tflite backend needs model = PATH")
        model = Path(options["model"])
        model = model if model.is_absolute() else config_dir / model
        if not model.is_file():
            raise OptionError("model", f"model file {model} not found")

    def __init__(self, context: Context, backend: Backend | None = None) -> None:
        super().__init__(context)
        require_numpy()
        opts = self.options
        if context.publish is None:
            raise InferenceError(f"inference {self.name}: the daemon gave no way to publish")
        self.output_channel = opts["output_channel"]
        self.own_identity = f"subscriber/{self.name}"
        self.labels = opts["labels"]
        self.backend = backend if backend is not None else open_backend(opts, context.config_dir)
        try:
            self.rule = DecodeRule.from_options(opts, self.backend)
        except BaseException:
            if backend is None:
                self.backend.close()
            raise
        self.state_path = context.state_dir / STATE_FILE
        # base: the state the previous batch was applied to; state: after it
        self.base, self.state = self._load()
        self._saved = self.state
        self._on_disk = (self.base.pending, self.state.pending)  # what a restart would find
        self.windows = 0
        self.skipped: dict[Key, int] = {}
        self.latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        log.info(
            "inference %s: %s, %d x %s %s per window -> channel %d",
            self.name,
            json.dumps(self.backend.describe()),
            self.rule.window,
            list(self.rule.shape),
            self.rule.dtype.str,
            self.output_channel,
        )

    # -- state file ----------------------------------------------------------------

    def _rule_json(self) -> dict:
        return {"frame_bytes": self.rule.frame_bytes, "window": self.rule.window}

    def _load(self) -> tuple[Windows, Windows]:
        path = self.state_path
        try:
            obj = json.loads(path.read_bytes())
        except FileNotFoundError:
            return Windows(), Windows()
        except (OSError, ValueError) as exc:
            return self._set_aside(f"unreadable ({exc})")
        try:
            if obj.get("version") != STATE_VERSION:
                return self._set_aside(f"version {obj.get('version')!r}")
            base = Windows.from_json(obj["base"])
            state = Windows.from_json(obj["state"])
        except (KeyError, TypeError, ValueError) as exc:
            return self._set_aside(f"damaged ({exc!r})")
        if obj.get("rule") != self._rule_json():
            log.warning(
                "inference %s: the decode rule changed; unfinished windows dropped", self.name
            )
            return Windows(state.pos), Windows(state.pos)
        return base, state

    def _set_aside(self, why: str) -> tuple[Windows, Windows]:
        bad = self.state_path.with_suffix(".bad")
        os.replace(self.state_path, bad)
        log.warning(
            "inference %s: %s is %s; set aside as %s, unfinished windows start empty",
            self.name,
            self.state_path,
            why,
            bad.name,
        )
        return Windows(), Windows()

    def _save(self) -> None:
        data = json.dumps(
            {
                "version": STATE_VERSION,
                "rule": self._rule_json(),
                "base": self.base.to_json(),
                "state": self.state.to_json(),
            }
        ).encode()
        tmp = self.state_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.state_path)
        dir_fd = os.open(self.state_path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    # -- batches -------------------------------------------------------------------

    def _start_from(self, first: Record) -> Windows:
        """The state this batch applies to: the latest, unless the batch is a redelivery
        (its first record precedes it), then the one before."""
        pos = (first.segment, first.offset)
        if pos >= self.state.pos:
            return self.state
        if pos >= self.base.pos:
            log.info(
                "inference %s: batch at %d:%d comes again; windows as before it",
                self.name,
                *pos,
            )
            return self.base
        log.warning(
            "inference %s: the log restarts at %d:%d, before the saved windows; "
            "unfinished windows dropped",
            self.name,
            *pos,
        )
        return Windows()

    def handle(self, records: list[Record]) -> None:
        if not records:
            return
        start = self._start_from(records[0])
        pending = dict(start.pending)
        rule = self.rule
        windows: list[tuple[Key, tuple[Frame, ...]]] = []
        for rec in records:
            if (rec.segment, rec.offset) < start.pos or rec.identity == self.own_identity:
                continue
            key = (rec.identity, rec.channel)
            if not rule.fits(rec.payload):
                self._skip(key, rec)
                continue
            frames = (*pending.get(key, ()), (rec.seq, rec.ts_ns, rec.payload))
            if len(frames) < rule.window:
                pending[key] = frames
                continue
            pending.pop(key, None)
            windows.append((key, frames))
        results, latencies = self._infer(windows)
        last = records[-1]
        # only now, with every window of the batch run: a failure above changes nothing
        self.base, self.state = start, Windows((last.segment, last.end), pending)
        for payload, ts_ns in results:
            self.context.publish(self.output_channel, payload, ts_ns)
        self.windows += len(results)
        self.latencies.extend(latencies)

    def _infer(self, windows: list[tuple[Key, tuple[Frame, ...]]]):
        """Run the windows of a batch: ([(JSON result, ts_ns)], [latency ms]). The inputs
        are converted in one go and each result is one string format, not a dict."""
        if not windows:
            return [], []
        np = self.rule.np
        inputs = self.rule.assemble_many([[p for _s, _t, p in frames] for _k, frames in windows])
        run, clock = self.backend.run, time.perf_counter_ns
        outputs, latencies = [], []
        for x in inputs:
            started = clock()
            outputs.append(run(x))
            latencies.append((clock() - started) / 1e6)
        scores = np.asarray(outputs, dtype=np.float64).reshape(len(windows), -1)
        labels = scores.argmax(axis=1).tolist()
        backend = json.dumps(self.backend.name)
        names = [json.dumps(n) for n in self.labels]
        results = []
        for (key, frames), row, label, latency in zip(
            windows, scores.tolist(), labels, latencies, strict=True
        ):
            ident = json.dumps(key[0])
            named = f',"label_name":{names[label]}' if label < len(names) else ""
            text = (
                f'{{"identity":{ident},"channel":{key[1]},"first":[{ident},{frames[0][0]}],'
                f'"last":[{ident},{frames[-1][0]}],"scores":[{",".join(map(repr, row))}],'
                f'"label":{label},"latency_ms":{round(latency, 4)!r},"backend":{backend}{named}}}'
            )
            results.append((text.encode(), frames[-1][1]))
        return results, latencies

    def _skip(self, key: Key, rec: Record) -> None:
        count = self.skipped.get(key, 0) + 1
        self.skipped[key] = count
        if count & (count - 1) == 0:  # 1, 2, 4, 8...: the count grows, the log does not
            log.warning(
                "inference %s: %s seq %d on channel %d has %d bytes, the decode rule "
                "wants %d; skipped (%d so far from it)",
                self.name,
                rec.identity,
                rec.seq,
                rec.channel,
                len(rec.payload),
                self.rule.frame_bytes,
                count,
            )

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def stats(self) -> dict[str, Any]:
        latency = latency_summary(self.latencies)
        return {
            "windows": self.windows,
            "wrong_size_frames": self.skipped_total,  # skipped: not the decode rule's size
            "latency_p50_ms": latency["p50_ms"],
            "latency_p99_ms": latency["p99_ms"],
        }

    def flush(self) -> None:
        if self.state is self._saved:
            return
        on_disk = (self.base.pending, self.state.pending)
        if not (on_disk[0] == on_disk[1] == self._on_disk[0] == self._on_disk[1]):
            self._save()
            self._on_disk = on_disk
        # else: every state a restart could pick holds the same unfinished windows (say,
        # none, with window = 1): the file stays as it is and flash is spared a write
        self._saved = self.state

    def close(self) -> None:
        summary = latency_summary(self.latencies)
        log.info(
            "inference %s: %d windows, latency p50 %.3f ms p99 %.3f ms, %d frames skipped",
            self.name,
            self.windows,
            summary["p50_ms"],
            summary["p99_ms"],
            self.skipped_total,
        )
        self.backend.close()


# -- latency measurement: python -m appliance.subscribers.inference ----------------------


def measure(backend: Backend, windows: int, seed: int = 1) -> dict[str, float]:
    """Run `windows` random inputs through `backend`, timed like the subscriber does."""
    np = require_numpy()
    rng = np.random.default_rng(seed)
    latencies = []
    for _ in range(windows):
        x = rng.normal(size=backend.input_shape).astype(backend.input_dtype)
        started = time.perf_counter_ns()
        backend.run(x)
        latencies.append((time.perf_counter_ns() - started) / 1e6)
    return latency_summary(latencies)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m appliance.subscribers.inference",
        description="Inference latency per window (p50/p99) of a backend.",
    )
    parser.add_argument("--backend", default="tflite", choices=["tflite", "fpga"])
    parser.add_argument("--model", help="tflite: the .tflite file")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", help="fpga: the tty or character device")
    parser.add_argument("--link", default="auto", choices=["auto", "serial", "chardev"])
    parser.add_argument("--baudrate", type=int, default=115200)
    parser.add_argument("--windows", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args(argv)
    options = {k: v for k, v in vars(args).items() if v is not None}
    try:
        backend = open_backend(options, Path.cwd())
        try:
            measure(backend, args.warmup)
            result = {**backend.describe(), **measure(backend, args.windows)}
        finally:
            backend.close()
    except (InferenceError, BackendError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
