"""Making file-system changes durable: the one home for directory fsyncs, atomic file
replacement and CRC-checked JSON files.

A new or renamed directory entry survives a power cut only once its directory
has been fsynced; ext4 in ordered mode usually gets it there anyway, other file
systems (and ext4 without a journal, common on boards) do not.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable
from pathlib import Path


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make the entries of `directory` (creations, renames, deletions) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: str | os.PathLike, mode: int = 0o700) -> Path:
    """`mkdir -p` whose every new entry is durable: each directory created is followed
    by an fsync of its parent. Existing directories are left as they are."""
    path = Path(path)
    missing = []
    probe = path
    while not probe.is_dir():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode)
        except FileExistsError:
            if not directory.is_dir():
                raise
            continue
        fsync_dir(directory.parent)
    return path


def write_atomic(
    path: str | os.PathLike,
    data: bytes,
    mode: int = 0o600,
    prepare: Callable[[int], None] | None = None,
) -> os.stat_result:
    """Replace `path` with `data` so that a crash leaves either the old file or the new
    one, never a mix: the temp file `.NAME.tmp` beside it (never through a planted link,
    `mode`), fsync, rename over `path`, fsync of the directory. `prepare(fd)` may adjust
    the new file before its fsync. Returns the new file's stat.

    Every file written this way has one writer at a time (its owner, or the holder of
    its lock), so the temp file's name is fixed: one that a crash left behind is taken
    over by the next write instead of piling up beside the file, crash after crash."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if prepare is not None:
            prepare(fd)
        os.fsync(fd)
        info = os.fstat(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return info


class ChecksumError(ValueError):
    """A checked file is torn or damaged: its CRC or its JSON does not hold."""


def encode_checked_json(obj: object) -> bytes:
    """JSON, a newline, the CRC-32 of the JSON as 8 hex digits, a newline: a file a
    crash or a flipped bit cannot make look valid."""
    body = json.dumps(obj, separators=(",", ":"), sort_keys=True)
    return f"{body}\n{zlib.crc32(body.encode()):08x}\n".encode()


def decode_checked_json(data: bytes) -> object:
    """The object in encode_checked_json's layout; ChecksumError if it does not check."""
    try:
        body, _, crc = data.decode().rstrip("\n").rpartition("\n")
        if int(crc, 16) != zlib.crc32(body.encode()):
            raise ChecksumError("CRC mismatch")
        return json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, ChecksumError):
            raise
        raise ChecksumError(f"damaged ({exc.__class__.__name__})") from None


def write_checked_json(path: str | os.PathLike, obj: object) -> None:
    write_atomic(path, encode_checked_json(obj))


def read_checked_json(path: str | os.PathLike) -> object:
    """OSError if it cannot be read (FileNotFoundError if missing), ChecksumError if bad."""
    return decode_checked_json(Path(path).read_bytes())
