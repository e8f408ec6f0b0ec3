"""What the loop shows its extensions: one frozen snapshot of the server and its store.

Telemetry, the console and the watchdog notifier run in the loop and read the
daemon only through `Server.snapshot()` (and the console's few commands:
`Server.clients()`, `disconnect`, `refresh_identities`), never through the
server's or the store's attributes, so the loop can change its insides without
them noticing. A snapshot is built on the loop thread when asked for and never
changes afterwards; the cheap one (counts and store figures, no per-identity
rows) is fine to take on every sweep.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.store.wal import Store


@dataclass(frozen=True, slots=True)
class StoreFigures:
    directory: Path  # the WAL segments' directory
    frames: int  # frames in the store (durable or about to be)
    bytes_on_disk: int  # segment files, preallocated size included
    pending_bytes: int  # ring bytes not yet durable
    ring_bytes: int  # the ring's size
    quota_bytes: int  # [storage] quota_bytes (0: none)
    full: bool  # no room for another segment: frames that need one get BUSY
    dropped_frames: int  # oldest frames dropped to make room (overflow = drop-oldest)
    commits: int
    commit_seconds: tuple[float, ...]  # recent commit times (write + fdatasync), oldest first
    commit_error: str | None  # the last failure while commits fail
    stalled_seconds: float  # how long the commit in flight has run (0: none runs)
    recovery_seconds: float

    @classmethod
    def of(cls, store: Store, now: float) -> StoreFigures:
        return cls(
            directory=store.directory,
            frames=store.frames,
            bytes_on_disk=store.bytes_on_disk,
            pending_bytes=store.pending_bytes(),
            ring_bytes=store.ring_bytes,
            quota_bytes=store.options.quota_bytes,
            full=store.full,
            dropped_frames=store.dropped_frames,
            commits=store.commits,
            commit_seconds=tuple(store.commit_seconds),
            commit_error=store.commit_error,
            stalled_seconds=store.stalled_for(now),
            recovery_seconds=store.recovery_seconds,
        )


@dataclass(frozen=True, slots=True)
class Identities:
    frames: Mapping[str, int]  # frames stored since start, per identity that stored any
    connected: frozenset[str]  # the identities with an authenticated connection now


@dataclass(frozen=True, slots=True)
class Snapshot:
    uptime_seconds: float
    # since start: frames, bytes_in, replays, connections (accepted), evicted (from the
    # handshake, for room), nack.CODE and error.CODE (sent); a missing key counts 0
    counters: Mapping[str, int]
    connections: int  # open now
    authenticated: int
    paused: int  # connections the loop does not read now
    pause_bytes: int  # pending ring bytes beyond which the loop stops reading
    stopping: bool
    store: StoreFigures
    # only in `Server.snapshot(identities=True)`: it copies a row per identity
    identities: Identities | None = None


@dataclass(frozen=True, slots=True)
class Peer:
    """One connection, as the console's `clients` lists it."""

    identity: str | None  # None until it authenticated
    address: object  # the socket's peer address
    mac: str | None  # the per-frame MAC algorithm of its session, once chosen
