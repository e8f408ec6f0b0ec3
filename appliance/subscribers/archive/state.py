"""`archive.state`, the archive's checkpoint: the highest seq written per identity and the
size of each `.log` when it was written (see FORMAT.md, Delivery).

CRC-checked JSON in the layout of appliance/durable.py. Archives made before that layout
have the CRC line first, then the JSON: such a file is still read, and the next checkpoint
replaces it in the new layout."""

from __future__ import annotations

import json
import logging
import os
import zlib
from pathlib import Path
from typing import Any

from appliance.durable import decode_checked_json, write_checked_json

log = logging.getLogger("appliance.subscribers.archive")

STATE_VERSION = 1


def save(path: Path, highest: dict[str, int], sizes: dict[str, int]) -> None:
    """Replace the checkpoint; only call it when every entry it counts is fsynced."""
    write_checked_json(path, {"version": STATE_VERSION, "highest": highest, "files": sizes})


def load(path: Path, root: Path, name: str) -> tuple[dict[str, int], dict[str, int] | None]:
    """(highest seqs, .log sizes at the checkpoint); sizes None when every file needs
    scanning (no state, or a damaged one: set aside as NAME.bad, said once)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if any(root.glob("ch-*/*.log*")):
            log.warning("%s: %s missing; scanning the whole archive", name, path.name)
        return {}, None
    try:
        state = decode(raw)
        highest = {str(k): int(v) for k, v in state["highest"].items()}
        sizes = {str(k): int(v) for k, v in state["files"].items()}
        return highest, sizes
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        bad = path.with_name(path.name + ".bad")
        os.replace(path, bad)
        log.warning(
            "%s: %s is damaged (%s); set aside as %s, scanning the whole archive",
            name,
            path.name,
            exc,
            bad.name,
        )
        return {}, None


def decode(raw: bytes) -> Any:
    """The state object in either layout; ValueError if it does not check."""
    if raw.startswith(b"{"):  # JSON first: durable.py's layout
        return decode_checked_json(raw)
    # the layout before durable.py: 8 hex digits of CRC-32, a newline, the JSON
    crc_text, _, body = raw.partition(b"\n")
    if int(crc_text, 16) != zlib.crc32(body):
        raise ValueError("CRC mismatch")
    return json.loads(body)
