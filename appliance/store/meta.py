"""Small metadata files: the store's checkpoint and the readers' cursors.

Each is a JSON object followed by a line with its CRC-32, replaced atomically
(durable.write_checked_json: temp file, fsync, rename, fsync of the directory),
so a crash leaves the old or the new version and a damaged one is recognised
rather than trusted. They
are written rarely: the checkpoint on rotation, every `checkpoint_bytes` of
WAL or `checkpoint_seconds`, and at a clean stop; a cursor when its reader
commits. Never once per frame: flash wears with every write.

    store.meta     {"version": 1, "checkpoint": [segment, offset], "frames": N,
                    "last_seq": {identity: seq}}
    NAME.cursor    {"version": 1, "name": NAME, "position": [segment, offset]}

The checkpoint says: every record before [segment, offset] is durable and is
reflected in last_seq and frames. Recovery reads only from there to the tail.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from appliance.durable import ChecksumError, read_checked_json, write_checked_json

log = logging.getLogger("appliance.store")

STORE_META = "store.meta"
CURSOR_SUFFIX = ".cursor"
CURSOR_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class MetaError(Exception):
    pass


def write(path: Path, obj: dict) -> None:
    write_checked_json(path, obj)


def read(path: Path) -> dict:
    """The object in a meta file; MetaError if it is missing, torn or damaged."""
    try:
        obj = read_checked_json(path)
    except FileNotFoundError:
        raise MetaError(f"{path.name}: missing") from None
    except OSError as exc:
        raise MetaError(f"{path.name}: unreadable ({exc})") from None
    except ChecksumError:
        obj = None
    if not isinstance(obj, dict) or obj.get("version") != 1:
        raise MetaError(f"{path.name}: damaged (CRC or JSON)")
    return obj


def check_cursor_name(name: str) -> str:
    if not CURSOR_NAME.fullmatch(name):
        raise MetaError(f"bad cursor name {name!r}: letters, digits, _ . - (at most 64)")
    return name


def cursor_path(directory: Path, name: str) -> Path:
    return directory / (check_cursor_name(name) + CURSOR_SUFFIX)


def read_cursor(directory: Path, name: str) -> tuple[int, int] | None:
    """A cursor's committed position, or None if it has none (or it is damaged: logged)."""
    path = cursor_path(directory, name)
    try:
        seg, off = read(path)["position"]
        return int(seg), int(off)
    except MetaError as exc:
        if path.exists():
            log.error("store: cursor %s: %s; it restarts from the oldest data", name, exc)
        return None
    except (KeyError, TypeError, ValueError):
        log.error("store: cursor %s: damaged position; it restarts from the oldest data", name)
        return None


def write_cursor(directory: Path, name: str, position: tuple[int, int]) -> None:
    write(cursor_path(directory, name), {"version": 1, "name": name, "position": list(position)})


def list_cursors(directory: Path) -> dict[str, tuple[int, int] | None]:
    out = {}
    for path in directory.glob("*" + CURSOR_SUFFIX):
        name = path.name[: -len(CURSOR_SUFFIX)]
        if CURSOR_NAME.fullmatch(name):
            out[name] = read_cursor(directory, name)
    return out
