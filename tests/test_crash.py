"""Crash tests: the real daemon as a subprocess, killed (SIGKILL) or stopped (SIGTERM) while
clients stream; the client library reconnects and resends by itself (PROTOCOL.md §6).

The promise under test: an ACK with seq S means every frame of that identity with seq <= S
is on stable storage. So after any kill, every frame a client saw acknowledged is in the log,
the client never has to resend it, and nothing is stored twice.
"""

from __future__ import annotations

import base64
import json
import time
from collections import Counter

import pytest
from conftest import cli, wait_for
from streaming import Streamer, wait_resumed

from appliance.client import Client
from appliance.store.reader import read_records

DEV = "dev/core-0"
CORE = "m-1/core-1"
CLIENT_TIMEOUT = 20.0  # covers a daemon restart, with room to spare on a slow machine
ROUND_TIMEOUT = 15.0  # for ACKs to advance in one round


def stored(daemon) -> dict[str, list[int]]:
    """The seqs in the log per identity, read straight from the segments (daemon down)."""
    seqs: dict[str, list[int]] = {}
    for record in read_records(daemon.data_dir / "wal"):
        seqs.setdefault(record.identity, []).append(record.seq)
    return seqs


def dump(daemon) -> list[dict]:
    result = cli("dump", data_dir=daemon.data_dir)
    assert result.returncode == 0, result.stderr.decode()
    return [json.loads(line) for line in result.stdout.decode().splitlines()]


def check_dump(daemon, streamers: list[Streamer], acked: dict[str, int]) -> list[dict]:
    """Every ACKed frame is in dump once with what was sent; nothing is there twice or unsent."""
    frames = dump(daemon)
    counts = Counter((f["id"], f["seq"]) for f in frames)
    twice = sorted(key for key, n in counts.items() if n > 1)
    assert not twice, f"stored more than once: {twice[:20]} ({len(twice)} in all)"
    by_key = {(f["id"], f["seq"]): f for f in frames}
    for s in streamers:
        want = s.sent_upto(acked[s.core])
        missing = sorted(seq for seq in want if (s.core, seq) not in by_key)
        assert not missing, (
            f"{s.core}: ACKed (up to {acked[s.core]}) but not in dump: {missing[:20]} "
            f"({len(missing)} in all)"
        )
        with s.lock:
            sent = dict(s.sent)
        for (ident, seq), f in by_key.items():
            if ident != s.core:
                continue
            assert seq in sent, f"{ident} seq {seq} is stored but was never sent"
            channel, ts_ns, payload = sent[seq]
            assert (f["channel"], f["ts_ns"]) == (channel, ts_ns), (ident, seq)
            assert base64.b64decode(f["payload_b64"]) == payload, (ident, seq)
    known = {s.core for s in streamers}
    assert {f["id"] for f in frames} <= known
    return frames


@pytest.fixture
def two_cores(daemon_factory):
    """A stopped daemon with a small segment size (so kills also hit rotations) and one more
    core, added before the start so the daemon knows it from its first HELLO."""
    d = daemon_factory("[storage]\nsegment_bytes = 1048576\n", start=False)
    token = d.add_identity(CORE, "--kind", "core", "--module", "m-1", "--channels", "1-4")
    d.start()
    streamers = [
        Streamer(d, DEV, d.dev_token, list(range(1, 9)), seed=1, timeout=CLIENT_TIMEOUT),
        Streamer(d, CORE, token, [1, 2, 3, 4], seed=2, timeout=CLIENT_TIMEOUT),
    ]
    yield d, streamers
    for s in streamers:
        s.stopping.set()


def test_acked_frames_survive_repeated_sigkill_mid_stream(two_cores):
    daemon, streamers = two_cores
    for s in streamers:
        s.start()
    # how far the ACKs must advance past the previous round before the kill: 0 kills the fresh
    # daemon at once (the clients are still reconnecting), 1 hits the resend burst after the
    # first WELCOME, the rest a few thousand frames into the stream
    steps = [1, 300, 0, 2500, 20, 0, 900, 5000, 3, 150]
    acked_at_kill: dict[str, int] = {s.core: 0 for s in streamers}
    welcomes_at_start = {s.core: 0 for s in streamers}
    for round_, step in enumerate(steps, 1):
        if step:
            for s in streamers:
                # a WELCOME from the daemon started last, then ACKs moving on past the kill
                target = acked_at_kill[s.core] + step
                wait_for(
                    lambda s=s, w=welcomes_at_start[s.core], t=target: (
                        s.acked >= t and s.client.welcomes > w
                    ),
                    ROUND_TIMEOUT,
                    f"round {round_}: {s.core}: a WELCOME and ACKs up to {target}",
                )
        daemon.kill()
        # read at once; ACKs the client reads later from its socket buffer are promises too,
        # and the next round and the final dump check them
        acked_at_kill = {s.core: s.client.acked for s in streamers}
        on_disk = stored(daemon)
        for s in streamers:
            seqs = on_disk.get(s.core, [])
            assert len(seqs) == len(set(seqs)), f"round {round_}: {s.core}: duplicates"
            lost = sorted(s.sent_upto(acked_at_kill[s.core]) - set(seqs))
            assert not lost, (
                f"round {round_}: {s.core}: ACKed up to {acked_at_kill[s.core]} "
                f"but not on disk after SIGKILL: {lost[:20]} ({len(lost)} in all)"
            )
        welcomes_at_start = {s.core: s.client.welcomes for s in streamers}
        daemon.start()

    # the clients resume by themselves after the last restart, too
    wait_resumed(streamers, acked_at_kill, welcomes_at_start, ROUND_TIMEOUT)
    for s in streamers:
        s.finish()
        # the first connection, then at least one per round that waited for a WELCOME
        assert s.client.welcomes >= 1 + sum(1 for st in steps if st), s.client.welcomes
        assert s.client.unacked == 0
        assert s.client.rejected == []
        with s.lock:
            assert s.client.acked == max(s.sent)

    final = {s.core: s.client.acked for s in streamers}
    frames = check_dump(daemon, streamers, final)
    # everything sent is stored: resends filled whatever was in flight at each kill
    assert len(frames) == sum(len(s.sent) for s in streamers)
    for s in streamers:
        assert sorted(f["seq"] for f in frames if f["id"] == s.core) == sorted(s.sent)
    assert daemon.log().count("listening on") == len(steps) + 1


def test_sigterm_while_streaming_exits_0_within_2_s_and_keeps_acked_frames(two_cores):
    daemon, streamers = two_cores
    for s in streamers:
        s.start()
    for s in streamers:
        wait_for(lambda s=s: s.acked >= 500, ROUND_TIMEOUT, f"{s.core}: first ACKs")

    t0 = time.monotonic()
    code = daemon.stop(timeout=10)
    elapsed = time.monotonic() - t0
    acked = {s.core: s.client.acked for s in streamers}
    assert code == 0, daemon.log()[-2000:]
    print(f"SIGTERM while streaming: stopped in {elapsed:.2f} s")  # reported, not asserted
    assert "stop: done" in daemon.log()

    # the daemon is down: dump reads the log it left
    check_dump(daemon, streamers, acked)

    # a clean stop leaves nothing to repair, and the clients resume on the restarted daemon
    daemon.start()
    assert "truncating" not in daemon.log()
    for s in streamers:
        target = acked[s.core] + 100
        wait_for(lambda s=s, t=target: s.acked >= t, ROUND_TIMEOUT, f"{s.core} after restart")
    for s in streamers:
        s.finish()
    final = {s.core: s.client.acked for s in streamers}
    frames = check_dump(daemon, streamers, final)
    assert len(frames) == sum(len(s.sent) for s in streamers)


def test_a_client_at_its_max_unacked_limit_waits_for_acks(daemon):
    """Client docstring: it keeps at most `max_unacked` frames and `send` waits for ACKs beyond
    that. With a limit of 1 every send after the first finds the previous frame unacknowledged
    (an ACK needs a commit with fdatasync first), so this is the path a fast stream takes."""
    with Client(daemon.host, daemon.port, DEV, daemon.dev_token, timeout=10, max_unacked=1) as c:
        seqs = [c.send(1, f"frame {n}".encode()) for n in range(50)]
        assert c.unacked <= 1
        c.flush()
        assert c.acked == seqs[-1] == 50
    frames = dump(daemon)
    assert [f["seq"] for f in frames] == list(range(1, 51))
    assert [base64.b64decode(f["payload_b64"]) for f in frames] == [
        f"frame {n}".encode() for n in range(50)
    ]
