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
Each full window is one `Backend.run` (the TFLite interpreter in tflite.py,
or the accelerator of fpga.py) and one JSON result on
`output_channel`, published as identity subscriber/NAME:

    {"identity": "dev/core-0", "channel": 3, "first": ["dev/core-0", 1],
     "last": ["dev/core-0", 4], "scores": [...], "label": 1, "label_name": "walk",
     "latency_ms": 0.031, "backend": "tflite"}

`latency_ms` is the time of `run` for that window, input conversion included.

Nothing is lost across a crash. The frames of unfinished windows are saved in
`state_dir/windows.json` (windows.py) at every flush, beside the log position they
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
--device D`) measures the latency per window (p50/p99) of a backend (__main__.py).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

from appliance.config import REQUIRED, OptionError
from appliance.durable import write_checked_json
from appliance.store.segment import Record
from appliance.subscribers.base import Context, Subscriber
from appliance.subscribers.inference.backend import (
    EXTRA,
    Backend,
    InferenceError,
    open_backend,
    require_numpy,
)
from appliance.subscribers.inference.decode import DecodeRule
from appliance.subscribers.inference.latency import latency_summary
from appliance.subscribers.inference.windows import (
    STATE_FILE,
    Frame,
    Key,
    Windows,
    read_state_file,
)

log = logging.getLogger("appliance.subscribers.inference")

STATE_VERSION = 1
LATENCY_SAMPLES = 10000  # the latest windows' latencies kept for p50/p99


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
            obj = read_state_file(path)
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
        write_checked_json(
            self.state_path,
            {
                "version": STATE_VERSION,
                "rule": self._rule_json(),
                "base": self.base.to_json(),
                "state": self.state.to_json(),
            },
        )

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
        out = {
            "windows": self.windows,
            "wrong_size_frames": self.skipped_total,  # skipped: not the decode rule's size
            "latency_p50_ms": latency["p50_ms"],
            "latency_p99_ms": latency["p99_ms"],
        }
        counters = self.backend.counters()
        if counters:  # the accelerator link's health (fpga)
            out["backend_counters"] = counters
        return out

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
