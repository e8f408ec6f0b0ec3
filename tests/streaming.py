"""A sensor core streaming through the real client library, for the crash tests."""

from __future__ import annotations

import random
import threading
import time

from conftest import wait_for

from appliance.client import Client


class CountingClient(Client):
    """The real client, counting its WELCOMEs (one per successful (re)connection) and
    noting any WELCOME whose last_seq is behind an ACK it already had."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.welcomes = 0
        self.welcome_behind: list[tuple[int, int]] = []  # (last_seq in a WELCOME, acked before)

    def _on_welcome(self, last_seq: int, channels: list[int]) -> None:
        self.welcomes += 1
        if last_seq < self.acked:
            self.welcome_behind.append((last_seq, self.acked))
        super()._on_welcome(last_seq, channels)


class Streamer(threading.Thread):
    """One core sending DATA until stopped (as fast as it can, or `rate` frames/s in bursts
    of 10), with random payloads of up to `max_payload` bytes (or all of `payload_size`
    bytes, like a sensor's fixed-size frames); remembers what it sent."""

    def __init__(
        self,
        daemon,
        ident: str,
        token: str,
        channels: list[int],
        seed: int,
        *,
        timeout: float,
        max_payload: int = 300,
        payload_size: int | None = None,
        rate: float | None = None,
    ) -> None:
        super().__init__(name=f"streamer-{ident}", daemon=True)
        self.core = ident
        self.timeout = timeout
        # max_unacked far above what can be in flight: the limit has a test of its own
        self.client = CountingClient(
            daemon.host, daemon.port, ident, token, timeout=timeout, max_unacked=10**7
        )
        self.channels = channels
        self.rng = random.Random(seed)
        self.max_payload = max_payload
        self.payload_size = payload_size
        self.rate = rate
        self.lock = threading.Lock()
        self.sent: dict[int, tuple[int, int, bytes]] = {}  # seq -> (channel, ts_ns, payload)
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.finished = False

    def run(self) -> None:
        client, rng = self.client, self.rng
        try:
            client.connect()
            n = 0
            next_burst = time.monotonic()
            while not self.stopping.is_set():
                if self.rate:
                    pause = next_burst - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)
                    next_burst = max(next_burst + 10 / self.rate, time.monotonic())
                for _ in range(10):
                    n += 1
                    channel = rng.choice(self.channels)
                    size = self.payload_size or rng.randrange(self.max_payload)
                    payload = f"{self.core}#{n}#".encode() + rng.randbytes(size)
                    if self.payload_size:
                        payload = payload[:size]
                    ts_ns = time.time_ns()
                    # noted before send(): it may block reconnecting, and the daemon may
                    # store and ACK the frame before send() returns
                    seq = client.next_seq
                    with self.lock:
                        assert seq not in self.sent, f"seq {seq} handed out twice"
                        self.sent[seq] = (channel, ts_ns, payload)
                    assert client.send(channel, payload, ts_ns=ts_ns) == seq
            client.flush(self.timeout)
            client.close()
            self.finished = True
        except BaseException as exc:
            self.error = exc

    @property
    def acked(self) -> int:
        if self.error is not None:
            raise AssertionError(f"{self.core}: the client failed: {self.error!r}")
        return self.client.acked

    def sent_upto(self, seq: int) -> set[int]:
        with self.lock:
            return {s for s in self.sent if s <= seq}

    def finish(self) -> None:
        self.stopping.set()
        self.join(self.timeout + 10)
        assert not self.is_alive(), f"{self.core}: the client thread did not finish"
        if self.error is not None:
            raise AssertionError(f"{self.core}: the client failed: {self.error!r}")
        assert self.finished


def wait_resumed(
    streamers: list[Streamer], acked_at_kill: dict[str, int], welcomes: dict[str, int], timeout
) -> None:
    """Each client reconnected by itself (a WELCOME after `welcomes`) and got ACKs well past
    what it had when the daemon was killed."""
    for s in streamers:
        target = acked_at_kill[s.core] + 50
        wait_for(
            lambda s=s, w=welcomes[s.core], t=target: s.acked >= t and s.client.welcomes > w,
            timeout,
            f"{s.core}: resumed after the last restart",
        )
