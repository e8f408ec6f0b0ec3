"""Crash tests of the store: the real daemon as a subprocess, SIGKILLed at random moments while
two cores stream through appliance.client.Client, and restarted on the same data dir.

Segments are 1 MiB so that kills also land on rotations. The promise under test (an ACK with
seq S means every frame up to S is on stable storage; replays are refused): after every kill
every frame a client has seen acknowledged is in the log exactly once; at the end every frame
sent is there exactly once with what was sent; a replay of an old seq is acknowledged and not
stored again.
"""

from __future__ import annotations

import random
import socket
import time
from collections import Counter

import pytest
from conftest import wait_for
from streaming import Streamer, wait_resumed

from appliance.protocol import crypto
from appliance.protocol.client_session import ClientSession
from appliance.protocol.frames import FrameType
from appliance.store.reader import read_records
from appliance.store.segment import list_segments

DEV = "dev/core-0"
CORE = "m-1/core-1"
SEED = 20261127
ROUNDS = 56
MAX_DELAY = 0.15  # a kill comes 0 to 150 ms after the restart, or after the ACKs moved on
RATE = 800  # frames per second per core: about 1 MB/s in all, a rotation every second or so
CLIENT_TIMEOUT = 30.0  # the clients ride over every restart
PACE = {"timeout": CLIENT_TIMEOUT, "rate": RATE, "max_payload": 1200}
ROUND_TIMEOUT = 15.0  # for a reconnect and ACKs to move on in one round
CONFIG = """
[server]
handshake_timeout = 5.0
[storage]
segment_bytes = 1048576
ring_bytes = 1048576
"""


def on_disk(daemon) -> dict[str, list]:
    """The records per identity, read from the segment files (the daemon is down)."""
    out: dict[str, list] = {}
    for record in read_records(daemon.data_dir / "wal"):
        out.setdefault(record.identity, []).append(record)
    return out


def check_log(daemon, streamers: list[Streamer], acked: dict[str, int], when: str) -> dict:
    """Every ACKed frame is on disk, nothing twice; returns the records per identity."""
    records = on_disk(daemon)
    for s in streamers:
        seqs = [r.seq for r in records.get(s.core, [])]
        twice = sorted(seq for seq, n in Counter(seqs).items() if n > 1)
        assert not twice, f"{when}: {s.core}: stored twice: {twice[:20]} ({len(twice)} in all)"
        lost = sorted(s.sent_upto(acked[s.core]) - set(seqs))
        assert not lost, (
            f"{when}: {s.core}: ACKed up to {acked[s.core]} but not on disk: "
            f"{lost[:20]} ({len(lost)} in all)"
        )
    assert set(records) <= {s.core for s in streamers}
    return records


class RawCore:
    """One MIP/1 connection driven by a ClientSession over a plain socket."""

    def __init__(self, daemon, ident: str, token: str) -> None:
        self.sock = socket.create_connection((daemon.host, daemon.port), timeout=10)
        self.session = ClientSession(
            ident, crypto.token_to_secret(token), crypto.random_nonce(), mac="hmac-sha256"
        )
        self.events: list[tuple] = []

    def _flush(self) -> None:
        out = self.session.data_to_send()
        if out:
            self.sock.sendall(out)

    def next_event(self) -> tuple:
        while not self.events:
            data = self.sock.recv(65536)
            assert data, "the daemon closed the connection"
            self.events += self.session.receive_data(data)
            self._flush()
        return self.events.pop(0)

    def handshake(self) -> int:
        event = self.next_event()
        assert event[0] == FrameType.WELCOME, event
        return event[1]

    def data(self, channel: int, seq: int, payload: bytes) -> tuple:
        """Send one DATA frame; the event that answers it."""
        self.session.send_data(channel, seq, payload, time.time_ns())
        self._flush()
        return self.next_event()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def two_cores(daemon_factory):
    """A daemon with small segments and a second core (added before the start), and one
    streamer per core, not yet started."""
    d = daemon_factory(CONFIG, start=False)
    token = d.add_identity(CORE, "--kind", "core", "--module", "m-1", "--channels", "1-4")
    d.start()
    streamers = [
        Streamer(d, DEV, d.dev_token, list(range(1, 9)), seed=SEED + 1, **PACE),
        Streamer(d, CORE, token, [1, 2, 3, 4], seed=SEED + 2, **PACE),
    ]
    yield d, streamers
    for s in streamers:
        s.stopping.set()


def test_acked_frames_survive_sigkill_at_random_moments(two_cores):
    daemon, streamers = two_cores
    wal = daemon.data_dir / "wal"
    rng = random.Random(SEED)
    for s in streamers:
        s.start()
    acked_at_kill = {s.core: 0 for s in streamers}
    welcomes_at_start = {s.core: 0 for s in streamers}
    modes = Counter()
    for round_ in range(1, ROUNDS + 1):
        # the kill comes a random moment after the restart (the clients are still
        # reconnecting, or resending what was in flight), or after the ACKs from this daemon
        # moved on by a random step, or just after the committer started a new segment
        delay = rng.uniform(0, MAX_DELAY)
        mode = rng.choices(["after restart", "after ACKs", "at rotation"], [4, 4, 1])[0]
        modes[mode] += 1
        if mode == "after ACKs":
            for s in streamers:
                target = acked_at_kill[s.core] + rng.randrange(1, 400)
                wait_for(
                    lambda s=s, w=welcomes_at_start[s.core], t=target: (
                        s.acked >= t and s.client.welcomes > w
                    ),
                    ROUND_TIMEOUT,
                    f"round {round_}: {s.core}: a WELCOME and ACKs up to {target}",
                )
        elif mode == "at rotation":
            newest = list_segments(wal)[-1][0]
            wait_for(
                lambda n=newest: list_segments(wal)[-1][0] > n,
                ROUND_TIMEOUT,
                f"round {round_}: a new segment after {newest}",
            )
            delay = rng.uniform(0, MAX_DELAY / 10)
        time.sleep(delay)  # the random moment of the kill
        daemon.kill()
        # ACKs the client reads later from its socket buffer are promises too: the next round
        # and the final check hold the daemon to them
        acked_at_kill = {s.core: s.client.acked for s in streamers}
        check_log(daemon, streamers, acked_at_kill, f"round {round_}")
        welcomes_at_start = {s.core: s.client.welcomes for s in streamers}
        daemon.start()

    # the clients resume by themselves after the last restart
    wait_resumed(streamers, acked_at_kill, welcomes_at_start, ROUND_TIMEOUT)
    for s in streamers:
        s.finish()
        assert s.client.unacked == 0
        assert s.client.rejected == []
        assert s.client.welcome_behind == [], "a WELCOME's last_seq was behind an ACK"
        with s.lock:
            assert s.client.acked == max(s.sent)

    # a replay after the last restart: acknowledged with the durable seq, not stored again
    dev = streamers[0]
    last = max(dev.sent)
    core = RawCore(daemon, DEV, daemon.dev_token)
    assert core.handshake() == last
    for seq in (1, last // 2, last):
        assert core.data(1, seq, b"replayed") == (FrameType.ACK, last)
    assert core.data(1, last + 1, b"new") == (FrameType.ACK, last + 1)
    core.close()
    daemon.kill()

    # every frame sent is stored exactly once, with what was sent
    final = {s.core: s.client.acked for s in streamers}
    final[DEV] = last + 1
    dev.sent[last + 1] = (1, 0, b"new")
    records = check_log(daemon, streamers, final, "at the end")
    for s in streamers:
        got = records[s.core]
        assert sorted(r.seq for r in got) == sorted(s.sent), f"{s.core}: not what was sent"
        for r in got:
            channel, ts_ns, payload = s.sent[r.seq]
            if r.seq != last + 1:
                assert (r.channel, r.ts_ns, r.payload) == (channel, ts_ns, payload), r.seq
    assert records[DEV][-1].payload == b"new"

    log = daemon.log()
    assert "Traceback" not in log, log[-3000:]
    assert log.count(f"listening on {daemon.host}:") == ROUNDS + 1
    segments = list_segments(daemon.data_dir / "wal")
    assert len(segments) >= 5, f"only {len(segments)} segments: the kills never met a rotation"
    assert min(modes.values()) >= ROUNDS // 10, modes
