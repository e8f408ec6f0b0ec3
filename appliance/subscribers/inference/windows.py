"""The unfinished windows of the inference subscriber, and their state file
(`windows.json`: CRC-checked JSON in the layout of appliance/durable.py; a file from
before that layout, one line of plain JSON, is still read)."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path

from appliance.durable import decode_checked_json

STATE_FILE = "windows.json"

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


def read_state_file(path: Path) -> object:
    """The object in the state file; OSError (FileNotFoundError if missing), ValueError if
    it does not check."""
    raw = path.read_bytes()
    if b"\n" not in raw:  # written before the CRC line: one line of plain JSON
        return json.loads(raw)
    return decode_checked_json(raw)
