"""A full disk and a full quota, with the real daemon as a subprocess.

The promise (DESIGN.md): when flash is full the daemon NACKs BUSY, never drops an
acknowledged frame, stays up, and takes frames again once there is room. The disk is a small
tmpfs (needs root to mount; skipped otherwise) filled with a ballast file so that only a few
1 MiB segments fit; the quota variant needs no mount.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from appliance.client import Client, ClientError
from appliance.protocol.frames import ErrorCode, FrameType
from appliance.store.cursor import Cursor
from appliance.store.reader import read_records

MiB = 1024 * 1024
DEV = "dev/core-0"
CLIENT_TIMEOUT = 5.0  # the daemon answers within this, or says BUSY
BUSY_WITHIN = 8.0  # streaming into a full disk gets a BUSY within this
RESUME = 5.0  # space is back: new frames are ACKed within this
BASE_CONFIG = """
[server]
handshake_timeout = 5.0
idle_timeout = 0
[storage]
segment_bytes = 1048576
ring_bytes = 1048576
"""


class BusyClient(Client):
    """The real client, noting every NACK it gets (BUSY frames it sends again later)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nacked: list[tuple[int, str]] = []

    def _on_event(self, event: tuple) -> None:
        if event[0] == FrameType.NACK:
            self.nacked.append((event[1], event[2]))
        super()._on_event(event)


class Core:
    """One core: a BusyClient and every payload it handed to send(), each one unique."""

    def __init__(self, daemon) -> None:
        self.client = BusyClient(
            daemon.host,
            daemon.port,
            DEV,
            daemon.dev_token,
            timeout=CLIENT_TIMEOUT,
            max_unacked=10**7,
        )
        self.client.connect()
        self.sent: dict[int, bytes] = {}  # seq given by send() -> payload
        self.n = 0

    def send(self, size: int = 2000) -> int:
        self.n += 1
        payload = f"frame {self.n}#".encode().ljust(size, b".")
        seq = self.client.send(1, payload)
        self.sent[seq] = payload
        return seq

    def stream_until_busy(self, daemon, *, paced: bool) -> None:
        """Send 2 KB frames until one is refused with BUSY. Paced: bursts of 10 about 2 ms
        apart, so the ring holds little when the disk fills up; else as fast as the client
        goes."""
        deadline = time.monotonic() + BUSY_WITHIN
        try:
            while not self.busy():
                assert time.monotonic() < deadline, (
                    f"no BUSY within {BUSY_WITHIN} s ({self.n} frames sent, "
                    f"{self.client.acked} ACKed); daemon log:\n{log_summary(daemon)}"
                )
                self.send()
                if paced and self.n % 10 == 0:
                    time.sleep(0.002)
        except ClientError as exc:
            pytest.fail(
                f"the client gave up waiting for the daemon ({exc}) after {self.n} frames, "
                f"{self.client.acked} ACKed, without any BUSY; daemon log:\n"
                f"{log_summary(daemon)}"
            )

    def busy(self) -> list[int]:
        assert all(code == ErrorCode.BUSY for _, code in self.client.nacked), self.client.nacked
        return [seq for seq, _ in self.client.nacked]

    def acked_payloads(self) -> set[bytes]:
        """Payloads of the frames acknowledged so far (by the seq send() gave them)."""
        refused = set(self.busy())
        acked = self.client.acked
        return {p for seq, p in self.sent.items() if seq <= acked and seq not in refused}


def log_summary(daemon) -> str:
    """The daemon's log messages without timestamps, each once, with how often it came."""
    counts = Counter(
        line.split(" msg=", 1)[-1] for line in daemon.log().splitlines() if "stats:" not in line
    )
    return "\n".join(f"{n:5d} x {msg}" for msg, n in counts.items())


def stored(daemon) -> list:
    """Every record in the log (read_records is safe beside the running daemon)."""
    return list(read_records(daemon.data_dir / "wal"))


def assert_no_acked_frame_lost(daemon, core: Core) -> None:
    records = stored(daemon)
    twice = [seq for seq, n in Counter(r.seq for r in records).items() if n > 1]
    assert not twice, f"stored twice: {twice[:20]}"
    payloads = {r.payload for r in records}
    lost = core.acked_payloads() - payloads
    assert not lost, f"{len(lost)} ACKed frames are not in the log"
    refused = set(core.busy())
    assert not refused & {r.seq for r in records}, "a seq refused with BUSY was stored"


def assert_up(daemon) -> None:
    assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log()[-3000:]
    log = daemon.log()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


def still_busy(core: Core) -> None:
    """Nothing has made room: the client's resends are refused again, and none is ACKed."""
    before = len(core.busy())
    with pytest.raises(ClientError):
        core.client.flush(1.0)  # resends the refused frames every 0.2 s
    assert len(core.busy()) > before, "the daemon did not answer the resends"


def resume(core: Core, extra: int = 200, within: float = RESUME) -> None:
    """Space is back: the refused frames go again (the client resends them under new seqs)
    and new ones follow; all are ACKed within `within` seconds."""
    t0 = time.monotonic()
    core.client.flush(within)
    for _ in range(extra):
        core.send()
    core.client.flush(max(0.1, within - (time.monotonic() - t0)))
    assert core.client.unacked == 0 and core.client.rejected == []


def assert_all_stored_once(daemon, core: Core) -> None:
    """At the end: every payload handed to send() is in the log exactly once."""
    records = stored(daemon)
    counts = Counter(r.payload for r in records)
    assert set(counts) == set(core.sent.values())
    assert max(counts.values()) == 1
    assert len({r.seq for r in records}) == len(records)


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def ballast(path: Path, leave: int) -> Path:
    """A file that takes all free space but `leave` bytes."""
    file = path / "ballast"
    fd = os.open(file, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        os.posix_fallocate(fd, 0, free_bytes(path) - leave)
    finally:
        os.close(fd)
    assert abs(free_bytes(path) - leave) < 64 * 1024
    return file


@pytest.mark.parametrize(
    ("trigger", "paced"),
    [("enospc", True), ("enospc", False), ("min_free_bytes", False)],
    ids=["enospc-paced", "enospc-flood", "min_free_bytes-flood"],
)
def test_a_full_disk_gives_busy_keeps_acked_frames_and_recovers(daemon_factory, trigger, paced):
    """enospc: creating a segment fails (posix_fallocate), the commit is retried and new
    frames get BUSY. min_free_bytes: the store sees the floor coming and refuses the frames
    that would need a new segment. Flood: the client sends as fast as it can, so the ring is
    well filled when the disk runs out."""
    config = BASE_CONFIG
    leave = 2 * MiB + MiB // 2  # room for two more segments, not three
    if trigger == "min_free_bytes":
        config += f"min_free_bytes = {MiB}\n"  # one segment less
    d = daemon_factory(config, start=False)
    with tmpfs(d.data_dir, "32m"):  # the ballast gives back room for every refused frame
        try:
            d.start()
            weight = ballast(d.data_dir, leave)
            core = Core(d)
            core.stream_until_busy(d, paced=paced)
            assert_up(d)
            assert_no_acked_frame_lost(d, core)
            if trigger == "enospc":
                assert "No space left on device" in d.log()
            else:
                assert "storage full" in d.log()
            still_busy(core)
            assert_up(d)

            weight.unlink()
            resume(core)
            assert_up(d)
            assert_no_acked_frame_lost(d, core)
            core.client.close()
            assert d.stop() == 0
        finally:
            d.kill()
        assert_all_stored_once(d, core)
        if trigger == "min_free_bytes":
            assert "space is back" in d.log()


def test_a_full_quota_gives_busy_until_a_reader_frees_space(daemon_factory):
    """No reader registered: the data is kept and new segments are refused (BUSY). A reader
    that has consumed the log lets the daemon delete what it has read, and frames flow again."""
    d = daemon_factory(BASE_CONFIG + f"quota_bytes = {3 * MiB}\n")
    core = Core(d)
    core.stream_until_busy(d, paced=True)
    assert_up(d)
    assert_no_acked_frame_lost(d, core)
    assert "storage full" in d.log()
    still_busy(core)
    assert_up(d)
    wal = d.data_dir / "wal"
    assert sum(p.stat().st_size for p in wal.glob("*.wal")) <= 3 * MiB

    # a reader (in another process, as `worker` is) consumes the log as it grows
    read: list = []
    stop = threading.Event()

    def worker() -> None:
        reader = Cursor(wal, "archive")
        while not stop.is_set():
            more = reader.read(10_000)
            read.extend(more)
            reader.commit()
            if not more:
                stop.wait(0.05)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        resume(core, within=3 * RESUME)  # the daemon looks at the cursors about once a second
    finally:
        stop.set()
        thread.join(10)
    assert "(space)" in d.log()
    assert_up(d)
    core.client.close()
    assert d.stop() == 0
    # everything sent is ACKed by now (resends included); the space retention deleted only
    # what the reader had read
    records = stored(d)
    assert records and {r.payload for r in records} <= set(core.sent.values())
    lost = set(core.sent.values()) - {r.payload for r in records} - {r.payload for r in read}
    assert not lost, f"{len(lost)} ACKed frames neither read nor in the log"
    assert len({r.seq for r in records}) == len(records)
