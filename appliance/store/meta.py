"""Small metadata files: the store's checkpoint and the readers' cursors.

Each is a JSON object followed by a line with its CRC-32, replaced atomically
(temp file, fsync, rename, fsync of the directory), so a crash leaves the old
or the new version and a damaged one is recognised rather than trusted. They
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

import json
import logging
import os
import re
import zlib
from pathlib import Path

from appliance.durable import fsync_dir

log = logging.getLogger("appliance.store")

STORE_META = "store.meta"
CURSOR_SUFFIX = ".cursor"
CURSOR_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class MetaError(Exception):
    pass


def write(path: Path, obj: dict) -> None:
    body = json.dumps(obj, separators=(",", ":"), sort_keys=True)
    text = f"{body}\n{zlib.crc32(body.encode()):08x}\n"
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read(path: Path) -> dict:
    """The object in a meta file; MetaError if it is missing, torn or damaged."""
    try:
        text = path.read_bytes().decode()
    except FileNotFoundError:
        raise MetaError(f"{path.name}: missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MetaError(f"{path.name}: unreadable ({exc})") from None
    body, _, crc = text.rstrip("\n").rpartition("\n")
    try:
        ok = int(crc, 16) == zlib.crc32(body.encode())
        obj = json.loads(body) if ok else None
    except ValueError:
        ok = False
    if not ok or not isinstance(obj, dict) or obj.get("version") != 1:
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
