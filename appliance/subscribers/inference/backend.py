"""The backend interface of the inference subscriber: one way of running the model
(tflite.py: the LiteRT interpreter; fpga.py: an accelerator behind a serial link or a
character device), the errors they raise, and the choice of one from the options."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.config import ConfigError

EXTRA = "pip install 'module-ingest[inference]'"


class InferenceError(ConfigError):
    """A configuration or set-up problem (an option, the model, the device, the extra):
    the subscriber process stops with it as one line, like a config error."""


class BackendError(Exception):
    """A window could not be run (device timeout...): the batch comes again."""


def require_numpy() -> Any:
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

    def counters(self) -> dict[str, int]:
        """How the backend is doing (an accelerator link: timeouts, CRC errors...), for
        `stats`; none by default."""
        return {}

    def close(self) -> None:
        pass


def open_backend(options: dict[str, Any], base_dir: Path | None = None) -> Backend:
    """The backend an options table asks for ("backend", "model", "device"...)."""
    kind = options.get("backend", "tflite")
    if kind == "tflite":
        from appliance.subscribers.inference.tflite import TFLiteBackend

        model = options.get("model")
        if not isinstance(model, str) or not model:
            raise InferenceError("inference: backend tflite needs model = PATH")
        path = Path(model)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return TFLiteBackend(path, threads=option(options, "threads", int, 1))
    if kind == "fpga":
        from appliance.subscribers.inference.fpga import FpgaBackend

        device = options.get("device")
        if not isinstance(device, str) or not device:
            raise InferenceError("inference: backend fpga needs device = PATH")
        return FpgaBackend(
            device,
            link=option(options, "link", str, "auto"),
            baudrate=option(options, "baudrate", int, 115200),
            timeout=option(options, "timeout", float, 1.0),
            retries=option(options, "retries", int, 2),
        )
    raise InferenceError(f"inference: backend must be tflite or fpga, not {kind!r}")


def option(options: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = options.get(key, default)
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind:
        raise InferenceError(f"inference: option {key} must be {kind.__name__}, not {value!r}")
    return value
