"""`python -m appliance.subscribers.inference --model M` (or `--backend fpga --device D`):
the latency per window (p50/p99) of a backend, as one JSON line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from appliance.subscribers.inference.backend import BackendError, InferenceError, open_backend
from appliance.subscribers.inference.latency import measure


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
