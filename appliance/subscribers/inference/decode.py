"""The decode rule: frame payloads -> one model input (`window` frames of `shape` values
of `dtype`, little-endian unless the dtype says otherwise, scaled and offset)."""

from __future__ import annotations

from typing import Any

from appliance.subscribers.inference.backend import (
    Backend,
    InferenceError,
    option,
    require_numpy,
)


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
            option(options, "dtype", str, "float32"),
            shape,
            option(options, "window", int, 1),
            backend.input_shape,
            backend.input_dtype,
            option(options, "scale", float, 1.0),
            option(options, "offset", float, 0.0),
        )

    def fits(self, payload: bytes) -> bool:
        return len(payload) == self.frame_bytes

    def assemble_many(self, windows: list[list[bytes]]):
        """The model inputs of many windows at once (one array, one input per window)."""
        np = self.np
        raw = np.frombuffer(b"".join(b"".join(w) for w in windows), dtype=self.dtype)
        # (windows, window, *shape): frames in order
        raw = raw.reshape((len(windows), len(windows[0]), *self.shape))
        if self.scale != 1.0 or self.offset != 0.0:
            raw = raw.astype(np.float64) * self.scale + self.offset
        return raw.astype(self.input_dtype).reshape((len(windows), *self.input_shape))
