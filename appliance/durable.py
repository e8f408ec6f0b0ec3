"""Making file-system changes durable: the one home for directory fsyncs and the like.

A new or renamed directory entry survives a power cut only once its directory
has been fsynced; ext4 in ordered mode usually gets it there anyway, other file
systems (and ext4 without a journal, common on boards) do not.
"""

from __future__ import annotations

import os
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
