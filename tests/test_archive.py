"""subscribers/archive/ and `module-ingest export`: the archive on real files (records
built directly, crashes by SIGKILL of a child process), then end to end through the daemon
(frames over TCP, a kill -9 of the subscriber process, export shows each frame once)."""

from __future__ import annotations

import argparse
import base64
import contextlib
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from conftest import ROOT, cli, stats_json, subscriber_pid, wait_for

from appliance import cli as appliance_cli  # first: it imports app before store.tools
from appliance.client import Client
from appliance.config import load as load_config
from appliance.durable import read_checked_json
from appliance.store.segment import Record
from appliance.subscribers import export_cli
from appliance.subscribers.archive.format import (
    HEADER_SIZE,
    HOUR_NS,
    INDEX_SIZE,
    STATE_FILE,
    archive_root,
    encode_entry,
    read_index,
)
from appliance.subscribers.archive.reader import read_archive
from appliance.subscribers.archive.subscriber import ArchiveSubscriber
from appliance.subscribers.base import Context
from appliance.subscribers.timeargs import parse_time

DEV = "dev/core-0"
SEC = 1_000_000_000
T0 = 1795788000 * SEC  # 2026-11-27T14:00:00Z, the start of an hour
ARCHIVE_LOG = "appliance.subscribers.archive"


# -- helpers ---------------------------------------------------------------------------


def context(data_dir: Path, name: str = "arch", **options) -> Context:
    state_dir = data_dir / "subscribers" / name
    state_dir.mkdir(parents=True, exist_ok=True)
    return Context(name=name, data_dir=data_dir, state_dir=state_dir, config=None, options=options)


def archive(data_dir: Path, **options) -> ArchiveSubscriber:
    return ArchiveSubscriber(context(data_dir, **options))


def rec(seq: int, t: int = T0, channel: int = 1, ident: str = DEV, payload=None, ts=True):
    """A record as the runner hands it; t is ts_ns (or recv_ns with ts=False)."""
    body = b"frame %d" % seq if payload is None else payload
    return Record(0, 0, ident, channel, seq, t if ts else 0, t + 7 if ts else t, body, 0)


def recs(first: int, count: int, t: int = T0, step: int = SEC, **kw) -> list[Record]:
    return [rec(first + i, t + i * step, **kw) for i in range(count)]


def root(data_dir: Path, name: str = "arch") -> Path:
    return archive_root(data_dir / "subscribers" / name)


def stored(data_dir: Path, channel: int = 1, start=0, end=None, identity=None, damage=None):
    return list(read_archive(root(data_dir), channel, start, end, identity, damage))


def keys(entries) -> list[tuple[str, int]]:
    return [(e.identity, e.seq) for e in entries]


def names(data_dir: Path, channel: int = 1) -> list[str]:
    directory = root(data_dir) / f"ch-{channel:05d}"
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def run_export(capsys, data_dir: Path, *argv) -> tuple[int, bytes | str, str]:
    """`export ARGV` in this process as the CLI will call it; (exit code, stdout, stderr)."""
    parser = argparse.ArgumentParser(prog="module-ingest")
    export_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", *map(str, argv)])
    config = load_config(environ={"MODULE_INGEST_DATA_DIR": str(data_dir)})
    capsys.readouterr()
    code = args.func(args, config)
    out = capsys.readouterr()
    return code, out.out, out.err


def export_cli_run(data_dir: Path, *argv: str, config: Path | None = None):
    """`module-ingest export ARGV` in a process of its own."""
    return cli("export", *argv, data_dir=data_dir, config=config)


# -- writing and reading ---------------------------------------------------------------


def test_frames_are_filed_per_channel_and_hour_and_read_back(tmp_path):
    sub = archive(tmp_path)
    batch = [
        *recs(1, 5, T0 + 3590 * SEC, step=4 * SEC),  # crosses into the next hour
        rec(6, T0 + 10 * SEC, channel=300, payload=b""),
        rec(1, T0 + 20 * SEC, ident="m-1/core-2", payload=bytes(range(256))),
    ]
    sub.handle(batch)
    sub.flush()
    assert names(tmp_path) == ["2026-11-27T14.log", "2026-11-27T15.log"]
    assert names(tmp_path, 300) == ["2026-11-27T14.log"]
    got = stored(tmp_path)
    assert keys(got) == [(DEV, 1), (DEV, 2), (DEV, 3), ("m-1/core-2", 1), (DEV, 4), (DEV, 5)]
    first = got[0]
    assert (first.channel, first.ts_ns, first.recv_ns, first.payload) == (
        1,
        T0 + 3590 * SEC,
        T0 + 3590 * SEC + 7,
        b"frame 1",
    )
    assert got[3].payload == bytes(range(256))
    assert [e.payload for e in stored(tmp_path, 300)] == [b""]
    assert stored(tmp_path, 2) == []
    # the header says what the file is
    data = (root(tmp_path) / "ch-00001" / "2026-11-27T14.log").read_bytes()
    assert data[:8] == b"MIARC\r\n\x1a" and len(data) > HEADER_SIZE
    assert (tmp_path / "subscribers" / "arch" / STATE_FILE).is_file()
    sub.close()


def test_the_hour_comes_from_recv_ns_when_ts_ns_is_0(tmp_path):
    sub = archive(tmp_path)
    sub.handle([rec(1, T0 - 1, ts=False), rec(2, T0)])
    sub.flush()
    assert names(tmp_path) == ["2026-11-27T13.log", "2026-11-27T14.log"]
    assert [(e.ts_ns, e.recv_ns) for e in stored(tmp_path)] == [(0, T0 - 1), (T0, T0 + 7)]
    # export ranges use the same time
    assert keys(stored(tmp_path, start=T0 - 1, end=T0)) == [(DEV, 1)]


def test_a_redelivered_batch_is_written_once(tmp_path):
    sub = archive(tmp_path)
    sub.handle(recs(1, 10))
    sub.flush()
    sub.handle(recs(5, 10))  # half again, half new
    sub.flush()
    sub.close()
    sub = archive(tmp_path)  # a restart after a clean stop
    sub.handle(recs(1, 20))
    sub.flush()
    assert keys(stored(tmp_path)) == [(DEV, s) for s in range(1, 21)]
    assert (sub.written, sub.skipped) == (6, 14)


KILL_SCRIPT = """
import json, os, signal, sys
from pathlib import Path
from appliance.store.segment import Record
from appliance.subscribers.archive.subscriber import ArchiveSubscriber
from appliance.subscribers.base import Context
spec = json.load(sys.stdin)
data = Path(spec["data_dir"])
ctx = Context("arch", data, data / "subscribers" / "arch", None, options={})
sub = ArchiveSubscriber(ctx)
for n, batch in enumerate(spec["batches"]):
    sub.handle([Record(0, 0, i, c, s, t, r, bytes.fromhex(p), 0) for i, c, s, t, r, p in batch])
    if n < len(spec["batches"]) - 1:
        sub.flush()
os.kill(os.getpid(), signal.SIGKILL)  # after handle, before flush: the cursor did not move
"""


def crash_after_handle(data_dir: Path, *batches: list[Record]) -> None:
    """A child process handles the batches, flushing all but the last, then dies by SIGKILL."""
    spec = {
        "data_dir": str(data_dir),
        "batches": [
            [[r.identity, r.channel, r.seq, r.ts_ns, r.recv_ns, r.payload.hex()] for r in b]
            for b in batches
        ],
    }
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT],
        input=json.dumps(spec).encode(),
        capture_output=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()


@pytest.mark.parametrize("torn", [False, True])
def test_a_kill_before_flush_then_redelivery_gives_each_frame_once(tmp_path, caplog, torn):
    first, second = recs(1, 50), recs(51, 50, T0 + 100 * SEC)
    crash_after_handle(tmp_path, first, second)
    path = root(tmp_path) / "ch-00001" / "2026-11-27T14.log"
    if torn:  # the last write was cut short by the crash (a power cut)
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 5)
    sub = archive(tmp_path)
    sub.handle(second)  # the runner delivers the uncommitted batch again
    sub.flush()
    assert keys(stored(tmp_path)) == [(DEV, s) for s in range(1, 101)]
    assert (sub.written, sub.skipped) == ((1, 49) if torn else (0, 50))
    assert ("cut a torn tail" in caplog.text) == torn


def test_damage_before_the_checkpoint_is_set_aside_not_lost(tmp_path, caplog):
    sub = archive(tmp_path)
    sub.handle(recs(1, 20, payload=b"p" * 8))
    sub.flush()
    sub.close()
    path = root(tmp_path) / "ch-00001" / "2026-11-27T14.log"
    data = bytearray(path.read_bytes())
    entry = len(encode_entry(DEV.encode(), T0, T0 + 7, 1, b"p" * 8))
    data[HEADER_SIZE + 10 * entry + 40] ^= 0xFF  # a bit flip inside the 11th entry
    path.write_bytes(bytes(data))
    sub = archive(tmp_path)
    aside = path.with_name(f"{path.name}.bad-{HEADER_SIZE + 10 * entry}")
    assert aside.read_bytes() == bytes(data[HEADER_SIZE + 10 * entry :])
    assert "set aside as" in caplog.text
    assert keys(stored(tmp_path)) == [(DEV, s) for s in range(1, 11)]
    sub.handle(recs(21, 2))  # the archive goes on; seqs 11..20 count as written
    sub.flush()
    assert keys(stored(tmp_path))[-2:] == [(DEV, 21), (DEV, 22)]


def test_a_damaged_state_file_is_set_aside_and_rebuilt_from_the_files(tmp_path, caplog):
    sub = archive(tmp_path, close_after=0)
    sub.handle(recs(1, 10, T0 - HOUR_NS))
    sub.flush()  # compressed: the seqs now live in a .gz only
    sub.handle(recs(11, 10))
    sub.flush()
    state = tmp_path / "subscribers" / "arch" / STATE_FILE
    state.write_bytes(b"00000000\n{garbage")
    sub = archive(tmp_path)
    assert "is damaged" in caplog.text
    assert state.with_name(STATE_FILE + ".bad").exists()
    assert sub.highest == {DEV: 20}
    sub.handle(recs(1, 22))
    sub.flush()
    assert keys(stored(tmp_path)) == [(DEV, s) for s in range(1, 23)]


def test_a_state_file_in_the_old_layout_is_read_and_replaced(tmp_path, caplog):
    sub = archive(tmp_path)
    sub.handle(recs(1, 10))
    sub.flush()
    sub.close()
    state = tmp_path / "subscribers" / "arch" / STATE_FILE
    saved = read_checked_json(state)  # JSON, then its CRC (appliance/durable.py)
    assert saved["highest"] == {DEV: 10} and saved["files"] == {
        "ch-00001/2026-11-27T14.log": (root(tmp_path) / "ch-00001/2026-11-27T14.log").stat().st_size
    }
    # as archives made before durable.py have it: the CRC line first, then the JSON
    body = json.dumps(saved).encode()
    state.write_bytes(b"%08x\n" % zlib.crc32(body) + body)
    sub = archive(tmp_path)
    assert "archive.state" not in caplog.text  # neither damaged nor missing
    assert not state.with_name(STATE_FILE + ".bad").exists()
    assert sub.highest == {DEV: 10}
    sub.handle(recs(5, 10))  # half again, half new
    sub.flush()
    assert (sub.written, sub.skipped) == (4, 6)
    assert read_checked_json(state)["highest"] == {DEV: 14}  # in the new layout now


def test_a_failed_handle_reloads_and_the_retry_writes_each_frame_once(tmp_path):
    sub = archive(tmp_path)
    blocker = root(tmp_path) / "ch-00002"
    blocker.write_text("not a directory")  # the channel directory cannot be made
    batch = [*recs(1, 5), rec(6, channel=2), *recs(7, 5, T0 + 10 * SEC)]
    with pytest.raises(OSError):
        sub.handle(batch)
    blocker.unlink()
    sub.handle(batch)  # the runner hands the same batch again
    sub.flush()
    assert keys(stored(tmp_path)) == [(DEV, s) for s in (1, 2, 3, 4, 5, 7, 8, 9, 10, 11)]
    assert keys(stored(tmp_path, 2)) == [(DEV, 6)]


def test_a_failed_reload_is_tried_again_before_anything_is_written(tmp_path):
    sub = archive(tmp_path)
    sub.handle(recs(1, 5))
    sub.flush()
    blocker = root(tmp_path) / "ch-00002"
    blocker.write_text("not a directory")  # the channel directory cannot be made
    batch = [*recs(6, 3, T0 + 5 * SEC), rec(9, channel=2), *recs(10, 3, T0 + 9 * SEC)]
    with pytest.raises(OSError):
        sub.handle(batch)  # seqs 6..8 were taken in memory, never written
    state = tmp_path / "subscribers" / "arch" / STATE_FILE
    state.unlink()
    state.mkdir()  # and now the state cannot be read back either (say, a read error)
    with pytest.raises(OSError):
        sub.handle(batch)
    state.rmdir()
    blocker.unlink()
    sub.handle(batch)  # the runner hands the same batch again
    sub.flush()
    assert keys(stored(tmp_path)) == [(DEV, s) for s in (1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12)]
    assert keys(stored(tmp_path, 2)) == [(DEV, 9)]


# -- hours, compression, index ---------------------------------------------------------


def test_an_idle_hour_is_compressed_the_hour_being_written_stays_open(tmp_path):
    sub = archive(tmp_path, close_after=0.3, index_every=4)
    sub.handle(recs(1, 60, T0 - 60 * SEC))  # 13:59:00 .. 13:59:59
    sub.flush()
    old = root(tmp_path) / "ch-00001" / "2026-11-27T13.log"
    plain = old.read_bytes()
    seq = iter(range(31, 100_000))

    def compressed():
        sub.handle([rec(next(seq), T0 + 60 * SEC)])  # 14:xx keeps getting frames
        sub.flush()
        return old.with_name(old.name + ".gz").exists()

    wait_for(compressed, what="the idle hour to be compressed")
    assert names(tmp_path) == [
        "2026-11-27T13.log.gz",
        "2026-11-27T13.log.gz.idx",
        "2026-11-27T14.log",
        "2026-11-27T14.log.idx",
    ]
    gz = old.with_name(old.name + ".gz")
    assert gzip.decompress(gz.read_bytes()) == plain  # plain gzip, the .log byte for byte
    lines = read_index(gz.with_name(gz.name + ".idx"), None, gz.stat().st_size)
    assert [b.count for b in lines] == [4] * 15 and lines[-1].end == gz.stat().st_size
    got = keys(stored(tmp_path))
    assert got[:60] == [(DEV, s) for s in range(1, 61)] and len(got) == len(set(got))
    # a late frame for the closed hour goes to part 1 of it, read after part 0
    sub.handle([rec(100_001, T0 - SEC)])
    sub.flush()
    assert "2026-11-27T13.1.log" in names(tmp_path)
    assert keys(stored(tmp_path, end=T0))[-1] == (DEV, 100_001)


def test_a_failed_compression_does_not_fail_the_flush(tmp_path, caplog):
    sub = archive(tmp_path, close_after=0)
    sub.retry_seconds = 0  # no pause between attempts
    blocker = root(tmp_path) / "ch-00001" / "2026-11-27T14.log.gz.tmp"
    blocker.mkdir(parents=True)  # the compressed file cannot be written
    sub.handle(recs(1, 5))
    sub.flush()
    sub.handle(recs(6, 5, T0 + 5 * SEC))
    sub.flush()  # tries again, fails again, says nothing new
    assert caplog.text.count("compression or retention failed") == 1
    assert names(tmp_path) == ["2026-11-27T14.log", "2026-11-27T14.log.gz.tmp"]
    blocker.rmdir()
    sub.handle(recs(11, 5, T0 + 10 * SEC))
    sub.flush()
    assert names(tmp_path) == ["2026-11-27T14.log.gz", "2026-11-27T14.log.gz.idx"]
    assert keys(stored(tmp_path)) == [(DEV, s) for s in range(1, 16)]


def test_a_start_finishes_or_undoes_an_interrupted_compression(tmp_path):
    sub = archive(tmp_path, close_after=0)
    sub.handle(recs(1, 10))
    sub.flush()
    sub.close()
    directory = root(tmp_path) / "ch-00001"
    gz = directory / "2026-11-27T14.log.gz"
    log_copy = gzip.decompress(gz.read_bytes())
    # the crash came after the .gz was renamed, before the .log was removed
    (directory / "2026-11-27T14.log").write_bytes(log_copy)
    (directory / "2026-11-27T15.log.gz.tmp").write_bytes(b"half")  # and during another one
    (directory / "2026-11-27T16.log.gz.idx").write_bytes(b"orphan")
    archive(tmp_path)
    assert names(tmp_path) == ["2026-11-27T14.log.gz", "2026-11-27T14.log.gz.idx"]
    assert keys(stored(tmp_path)) == [(DEV, s) for s in range(1, 11)]


@pytest.mark.parametrize("compress", [False, True])
def test_the_index_lets_a_range_skip_other_blocks(tmp_path, compress):
    sub = archive(tmp_path, index_every=10, close_after=0 if compress else 300)
    sub.handle(recs(1, 100, T0, step=10 * SEC))  # t = 14:00:00 + 10 s * (seq - 1)
    sub.flush()
    sub.close()
    name = "2026-11-27T14.log" + (".gz" if compress else "")
    path = root(tmp_path) / "ch-00001" / name
    lines = read_index(path.with_name(name + ".idx"), None, None)
    assert len(lines) == 10 and all(b.count == 10 for b in lines)
    assert [b.min_t for b in lines] == [T0 + i * 100 * SEC for i in range(10)]
    # damage the first block: a range that does not reach it never reads it
    data = bytearray(path.read_bytes())
    data[lines[0].pos + lines[0].size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    damage: list[str] = []
    got = stored(tmp_path, start=T0 + 500 * SEC, end=T0 + 520 * SEC, damage=damage.append)
    assert keys(got) == [(DEV, 51), (DEV, 52)] and damage == []
    everything = keys(stored(tmp_path, damage=damage.append))
    assert everything[-90:] == [(DEV, s) for s in range(11, 101)] and len(damage) == 1
    # a .log block is read up to the damaged entry, a .gz block is one gzip member
    assert everything[:-90] == ([] if compress else [(DEV, s) for s in range(1, 6)])


@pytest.mark.parametrize("compress", [False, True])
def test_without_its_index_a_file_is_read_whole(tmp_path, compress):
    sub = archive(tmp_path, index_every=3, close_after=0 if compress else 300)
    sub.handle(recs(1, 20))
    sub.flush()
    sub.close()
    for idx in (root(tmp_path) / "ch-00001").glob("*.idx"):
        idx.write_bytes(idx.read_bytes()[: INDEX_SIZE + 5])  # a torn index
    got = stored(tmp_path, start=T0 + 5 * SEC)
    assert keys(got) == [(DEV, s) for s in range(6, 21)]


def test_compression_rebuilds_a_lost_index(tmp_path):
    sub = archive(tmp_path, index_every=4)
    sub.handle(recs(1, 10))
    sub.flush()
    (root(tmp_path) / "ch-00001" / "2026-11-27T14.log.idx").unlink()  # e.g. by hand
    sub.close_after = 0
    sub.flush()
    gz = root(tmp_path) / "ch-00001" / "2026-11-27T14.log.gz"
    lines = read_index(gz.with_name(gz.name + ".idx"), None, gz.stat().st_size)
    assert [b.count for b in lines] == [4, 4, 2] and lines[-1].end == gz.stat().st_size
    assert keys(stored(tmp_path, start=T0 + 9 * SEC)) == [(DEV, 10)]


def test_extreme_sender_clocks_get_their_own_hours(tmp_path):
    sub = archive(tmp_path)
    sub.handle([rec(1, 1), rec(2, 2**64 - 8)])  # recv_ns = ts_ns + 7
    sub.flush()
    assert names(tmp_path) == ["1970-01-01T00.log", "2554-07-21T23.log"]
    assert keys(stored(tmp_path)) == [(DEV, 1), (DEV, 2)]


def test_a_restart_rebuilds_the_block_being_filled(tmp_path):
    sub = archive(tmp_path, index_every=4)
    sub.handle(recs(1, 6))
    sub.flush()
    sub.close()
    sub = archive(tmp_path, index_every=4)
    sub.handle(recs(7, 6, T0 + 6 * SEC))
    sub.flush()
    idx = root(tmp_path) / "ch-00001" / "2026-11-27T14.log.idx"
    lines = read_index(idx, HEADER_SIZE, None)
    assert [b.count for b in lines] == [4, 4, 4]
    assert keys(stored(tmp_path, start=T0 + 4 * SEC)) == [(DEV, s) for s in range(5, 13)]


# -- retention and bounds --------------------------------------------------------------


def test_retention_hours_deletes_closed_hours_past_it(tmp_path):
    now = time.time_ns()
    hour_now = now // HOUR_NS * HOUR_NS
    # the cutoff falls half an hour after the end of the hour 3 h ago: a wide margin
    retention = (now - (hour_now - 2 * HOUR_NS - HOUR_NS // 2)) / HOUR_NS
    sub = archive(tmp_path, close_after=0, retention_hours=retention)
    for h in (5, 4, 3, 2, 1):
        sub.handle([rec(10 - h, hour_now - h * HOUR_NS)])
    sub.flush()
    assert len([n for n in names(tmp_path) if n.endswith(".gz")]) == 3
    assert [e.seq for e in stored(tmp_path)] == [7, 8, 9]  # 3, 2 and 1 h ago
    assert sub.deleted == 2
    sub.handle([rec(5, hour_now - 5 * HOUR_NS)])  # deleted frames are not archived again
    sub.flush()
    assert [e.seq for e in stored(tmp_path)] == [7, 8, 9]


def test_max_bytes_deletes_the_oldest_closed_files_across_channels(tmp_path):
    sub = archive(tmp_path, close_after=0)
    payload = os.urandom(4000)  # does not compress
    seq = 0
    for h in range(6):
        for channel in (1, 2):
            seq += 1
            sub.handle([rec(seq, T0 + h * HOUR_NS, channel=channel, payload=payload)])
    sub.flush()
    sizes = {p: p.stat().st_size for p in root(tmp_path).rglob("*") if p.is_file()}
    per_hour = sum(sizes.values()) / 6
    sub.close()
    sub = archive(tmp_path, close_after=0, max_bytes=int(per_hour * 2.5))
    sub.handle([rec(seq + 1, T0 + 6 * HOUR_NS, channel=3)])  # any flush runs retention
    sub.flush()
    kept = sorted(e.ts_ns for ch in (1, 2) for e in stored(tmp_path, ch))
    assert kept == sorted([T0 + 4 * HOUR_NS, T0 + 5 * HOUR_NS] * 2)
    total = sum(p.stat().st_size for p in root(tmp_path).rglob("*") if p.is_file())
    assert total <= per_hour * 2.5


def open_files() -> list[str]:
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the fd that listed the directory
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
    return targets


def test_open_files_are_capped(tmp_path):
    sub = archive(tmp_path, max_open_files=2)
    base = str(root(tmp_path))
    most = 0
    for round_ in range(5):
        for channel in range(1, 7):
            sub.handle([rec(round_ * 10 + channel, T0 + round_ * SEC, channel=channel)])
            most = max(most, sum(1 for target in open_files() if target.startswith(base)))
    sub.flush()
    assert most == 2
    for channel in range(1, 7):
        assert [e.seq for e in stored(tmp_path, channel)] == [r * 10 + channel for r in range(5)]


# -- export ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, ns",
    [
        ("2026-11-27T14:00:00Z", T0),
        ("2026-11-27T14", T0),
        ("2026-11-27T15:00:00+01:00", T0),
        ("2026-11-27T14:00:00.25", T0 + SEC // 4),
        ("2026-11-27", T0 - 14 * HOUR_NS),
        ("1795788000", T0),
        ("1795788000.000000001", T0 + 1),
        ("1795788000s", T0),
        ("1795788000000000000", T0),
        ("1795788000ns", 1795788000),
        ("0", 0),
    ],
)
def test_times_parse(text, ns):
    assert parse_time(text) == ns


@pytest.mark.parametrize("text", ["", "yesterday", "-5", "1.5ns", "1969-12-31", "2026-13-01"])
def test_bad_times_are_refused(text):
    with pytest.raises(ValueError):
        parse_time(text)


def test_export_jsonl_and_raw(tmp_path, capsys):
    sub = archive(tmp_path, close_after=0)
    sub.handle([*recs(1, 3), rec(1, T0 + 5 * SEC, ident="m-2/core-0", payload=b"\x00\xff")])
    sub.flush()
    code, out, err = run_export(capsys, tmp_path, "--channel", 1)
    assert (code, err) == (0, "")
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[0] == {
        "id": DEV,
        "channel": 1,
        "seq": 1,
        "ts_ns": T0,
        "recv_ns": T0 + 7,
        "payload_b64": base64.b64encode(b"frame 1").decode(),
    }
    assert [(d["id"], d["seq"]) for d in lines] == [(DEV, 1), (DEV, 2), (DEV, 3), ("m-2/core-0", 1)]
    # --from inclusive, --to exclusive, --identity
    code, out, _ = run_export(
        capsys, tmp_path, "--channel", 1, "--from", "2026-11-27T14:00:01Z", "--to", T0 // SEC + 5
    )
    assert [json.loads(line)["seq"] for line in out.splitlines()] == [2, 3]
    code, out, _ = run_export(capsys, tmp_path, "--channel", 1, "--identity", "m-2/core-0")
    assert [json.loads(line)["id"] for line in out.splitlines()] == ["m-2/core-0"]
    # raw: 4-byte big-endian length, then the payload
    result = export_cli_run(tmp_path, "--channel", "1", "--format", "raw")
    assert result.returncode == 0, result.stderr.decode()
    expected = b"".join(len(p).to_bytes(4, "big") + p for p in [b"frame 1", b"frame 2"])
    assert result.stdout == expected + b"\x00\x00\x00\x07frame 3" + b"\x00\x00\x00\x02\x00\xff"


def test_export_reports_damage_and_exits_1(tmp_path, capsys):
    sub = archive(tmp_path, index_every=2, close_after=0)
    sub.handle(recs(1, 6))
    sub.flush()
    gz = root(tmp_path) / "ch-00001" / "2026-11-27T14.log.gz"
    line = read_index(gz.with_name(gz.name + ".idx"), None, None)[1]
    data = bytearray(gz.read_bytes())
    data[line.pos + line.size // 2] ^= 0xFF
    gz.write_bytes(bytes(data))
    code, out, err = run_export(capsys, tmp_path, "--channel", 1)
    assert code == 1
    assert [json.loads(x)["seq"] for x in out.splitlines()] == [1, 2, 5, 6]
    assert err.count("\n") == 1 and err.startswith("module-ingest: export: ")


def test_export_picks_the_archive(tmp_path, capsys):
    for name in ("a", "b"):
        sub = ArchiveSubscriber(context(tmp_path, name))
        sub.handle([rec(1, payload=name.encode())])
        sub.flush()
    code, out, _ = run_export(capsys, tmp_path, "--channel", 1, "--archive", "b")
    assert code == 0 and json.loads(out)["payload_b64"] == base64.b64encode(b"b").decode()
    shutil.rmtree(tmp_path / "subscribers" / "a")
    code, out, _ = run_export(capsys, tmp_path, "--channel", 1)  # the only one
    assert code == 0 and json.loads(out)["payload_b64"] == base64.b64encode(b"b").decode()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--channel", "1"], "export: no archive under"),
        (["--channel", "1", "--archive", "x"], "export: no archive named 'x'"),
        (["--channel", "70000"], "a channel is 0..65535"),
        (
            ["--channel", "1", "--from", "soon"],
            "argument --from: expected Unix seconds or nanoseconds, or ISO-8601",
        ),
        (["--channel", "1", "--from", "2026-11-27", "--to", "2026-11-26"], "--to must be later"),
        (["--from", "0"], "the following arguments are required: --channel"),
        (["--channel", "1", "--format", "csv"], "invalid choice: 'csv'"),
    ],
)
def test_export_errors_are_one_line(tmp_path, argv, message):
    result = export_cli_run(tmp_path, *argv)
    err = result.stderr.decode()
    assert result.returncode == appliance_cli.EXIT_USAGE and message in err, err
    assert err.count("\n") == 1 and err.startswith("module-ingest")
    assert result.stdout == b""


def test_export_with_several_archives_asks_which(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[subscribers.one]\ntype = "archive"\n[subscribers.two]\ntype = "archive"\n')
    result = export_cli_run(tmp_path, "--channel", "1", config=config)
    err = result.stderr.decode()
    assert result.returncode == 2 and "several archives (one, two)" in err, err
    # a configured archive that has written nothing yet: no frames, no error
    result = export_cli_run(tmp_path, "--channel", "1", "--archive", "two", config=config)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")


def test_export_is_a_command_of_the_cli(tmp_path):
    result = cli("export", "--help", data_dir=tmp_path)
    assert result.returncode == 0, "cli.py must add export_cli.add_parser(sub)"
    assert b"--channel" in result.stdout


# -- end to end ------------------------------------------------------------------------


def archived(d, channel: int) -> int:
    return len(list(read_archive(d.data_dir / "subscribers/arch/archive", channel)))


def exported(d, channel: int) -> list[dict]:
    result = export_cli_run(d.data_dir, "--channel", str(channel), config=d.config)
    assert result.returncode == 0, result.stderr.decode()
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_end_to_end_through_the_daemon_with_a_kill_9(daemon_factory):
    d = daemon_factory(
        '[subscribers.arch]\ntype = "archive"\nchannels = [1, 2]\nindex_every = 16\n'
    )
    sent: dict[int, list[bytes]] = {1: [], 2: [], 3: []}
    with Client(d.host, d.port, DEV, d.dev_token) as client:

        def send(count: int) -> None:
            for i in range(count):
                channel = 1 + i % 3
                payload = b"frame %d on %d" % (len(sent[channel]), channel)
                client.send(channel, payload)
                sent[channel].append(payload)

        def caught_up() -> bool:
            return all(archived(d, ch) == len(sent[ch]) for ch in (1, 2))

        def behind() -> str:  # what a failure shows: counts, the subscriber, the log's end
            counts = {ch: f"{archived(d, ch)} of {len(sent[ch])}" for ch in (1, 2)}
            status = stats_json(d.data_dir)["subscribers"]["arch"]
            return f"archived {counts}, subscriber {status}, log:\n{d.log()[-6000:]}"

        # reading the archive back costs ~10 ms: polled gently, so the subscriber (nice 10)
        # gets the CPU; catching up after a restart waits longer on a loaded machine
        until_caught_up = {"interval": 0.05, "explain": behind}

        send(300)
        client.flush()
        wait_for(caught_up, what="the archive to catch up", **until_caught_up)
        pid = wait_for(lambda: subscriber_pid(d, "arch"), what="the subscriber process")
        # kill it while it takes frames in: between handle, flush and the cursor commit
        before = archived(d, 1)
        send(3000)
        wait_for(lambda: archived(d, 1) > before, what="the archive to take frames in")
        os.kill(pid, signal.SIGKILL)
        send(1500)  # while it is down, and while it restarts
        client.flush()
        wait_for(lambda: subscriber_pid(d, "arch") not in (0, pid), what="a restart")
        send(300)
        client.flush()
        wait_for(
            caught_up, 30.0, what="the archive to catch up after the restart", **until_caught_up
        )
        # the archive's own counters reach `stats` through its process's status line
        status = wait_for(
            lambda: (s := stats_json(d.data_dir)["subscribers"]["arch"]).get("written") and s,
            what="the archive's counters in stats",
        )
        assert {"skipped_as_archived", "compressed_files", "deleted_files"} <= set(status)
    assert "exited with -9; restarting" in d.log()
    for channel in (1, 2):
        got = exported(d, channel)  # through the CLI
        assert [base64.b64decode(r["payload_b64"]) for r in got] == sent[channel]
        seqs = [r["seq"] for r in got]
        assert seqs == sorted(set(seqs))  # each frame once, in order
        assert {r["id"] for r in got} == {DEV}
    assert exported(d, 3) == []  # filtered out by the runner
    files = sorted(p.name for p in (d.data_dir / "subscribers/arch/archive").iterdir())
    assert files == ["ch-00001", "ch-00002"]
