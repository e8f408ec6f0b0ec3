"""The durable store: the mmap ring, WAL segments, meta and cursors (FORMAT.md)."""

from pathlib import Path


def wal_dir(data_dir: Path) -> Path:
    """Where the store lives inside the data dir."""
    return Path(data_dir) / "wal"
