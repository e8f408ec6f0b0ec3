"""The TFLite backend: a .tflite model in the LiteRT interpreter, on the CPU.

The interpreter comes from ai-edge-litert (`ai_edge_litert.interpreter`, the
successor, with wheels for current Pythons) or tflite-runtime
(`tflite_runtime.interpreter`, older boards' images), whichever imports; both
are the optional extra `module-ingest[inference]`. The model must have one
input and one output tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.subscribers.inference.backend import EXTRA, Backend, InferenceError, require_numpy


def interpreter_class() -> tuple[type, str]:
    """(Interpreter, module name) from whichever runtime is installed."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "ai_edge_litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter

        return Interpreter, "tflite_runtime"
    except ImportError:
        pass
    raise InferenceError(f"the tflite backend needs ai-edge-litert or tflite-runtime: {EXTRA}")


class TFLiteBackend(Backend):
    name = "tflite"

    def __init__(self, model: str | Path, threads: int = 1) -> None:
        np = require_numpy()
        self.np = np
        interpreter, self.runtime = interpreter_class()
        self.model = Path(model)
        if not self.model.is_file():
            raise InferenceError(f"tflite: model file {self.model} not found")
        try:
            self.interpreter = interpreter(model_path=str(self.model), num_threads=threads)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InferenceError(f"tflite: cannot load {self.model}: {first}") from None
        inputs = self.interpreter.get_input_details()
        outputs = self.interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise InferenceError(
                f"tflite: {self.model} has {len(inputs)} inputs and {len(outputs)} outputs; "
                "one of each is supported"
            )
        self._input = inputs[0]["index"]
        self._output = outputs[0]["index"]
        self.input_shape = tuple(int(n) for n in inputs[0]["shape"])
        self.input_dtype = np.dtype(inputs[0]["dtype"])
        self.output_shape = tuple(int(n) for n in outputs[0]["shape"])
        self.output_dtype = np.dtype(outputs[0]["dtype"])

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "runtime": self.runtime,
            "model": str(self.model),
            "input": [list(self.input_shape), self.input_dtype.str],
            "output": [list(self.output_shape), self.output_dtype.str],
        }

    def run(self, input):
        x = self.np.asarray(input, dtype=self.input_dtype).reshape(self.input_shape)
        self.interpreter.set_tensor(self._input, x)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self._output).copy()

    def close(self) -> None:
        self.interpreter = None
