"""Board profiles: tuned defaults per board, picked in the config or detected.

A profile overrides the embedded defaults; the config file and the
environment still override the profile. Segment sizes are multiples of the
flash erase block (4 MiB on common SD cards and eMMC), so a segment never
shares an erase block with the next one.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

MiB = 1024 * 1024

PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "generic": {},
    "generic-x86": {
        "storage": {"segment_bytes": 64 * MiB, "ring_bytes": 16 * MiB},
        "server": {"max_connections": 16384},
    },
    "rpi4": {
        "storage": {"segment_bytes": 16 * MiB, "ring_bytes": 8 * MiB},
        "server": {"max_connections": 4096},
    },
    "rpi5": {
        "storage": {"segment_bytes": 32 * MiB, "ring_bytes": 16 * MiB},
        "server": {"max_connections": 8192},
    },
    "jetson-orin": {
        "storage": {"segment_bytes": 64 * MiB, "ring_bytes": 32 * MiB},
        "server": {"max_connections": 16384},
    },
    "imx8": {
        "storage": {"segment_bytes": 16 * MiB, "ring_bytes": 8 * MiB},
        "server": {"max_connections": 4096},
    },
    "zynq": {
        "storage": {"segment_bytes": 8 * MiB, "ring_bytes": 4 * MiB},
        "server": {"max_connections": 2048},
    },
}

# substrings of /proc/device-tree/model, most specific first
_MODELS = (
    ("Raspberry Pi 5", "rpi5"),
    ("Raspberry Pi 4", "rpi4"),
    ("Orin", "jetson-orin"),
    ("i.MX8", "imx8"),
    ("ZynqMP", "zynq"),
    ("Zynq", "zynq"),
)

DEVICE_TREE_MODEL = Path("/proc/device-tree/model")


def detect(model_path: Path = DEVICE_TREE_MODEL) -> str:
    """The profile for this board: from the device-tree model, else by architecture."""
    try:
        model = model_path.read_bytes().rstrip(b"\0").decode(errors="replace")
    except OSError:
        model = ""
    for needle, name in _MODELS:
        if needle in model:
            return name
    return "generic-x86" if platform.machine() in ("x86_64", "AMD64", "i686") else "generic"
