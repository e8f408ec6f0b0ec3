"""Before a core has proved anything: handshake slots, per-source caps, bounded HELLOs.

Real daemons on loopback; idle attackers are plain sockets that connect and say
nothing, slow ones send half a HELLO. Cost figures (CPU, RSS, log) are read from
/proc and the log file, with the bounds the security review set.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from conftest import cli, wait_for
from test_net_protocol import ERROR, WAIT, Peer, assert_healthy

from appliance.protocol.frames import FrameType

CLK_TCK = 100  # os.sysconf("SC_CLK_TCK") on Linux


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def idle_sockets(d, count: int, source: str = "127.0.0.1") -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind((source, 0))
        sock.connect((d.host, d.port))
        socks.append(sock)
    return socks


def closed_by_daemon(sock: socket.socket, timeout: float = WAIT) -> bool:
    """Whether the daemon closes this connection (after its CHALLENGE and an ERROR)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


def test_idle_sockets_at_max_connections_do_not_keep_an_honest_core_out(daemon_factory):
    d = daemon_factory("[server]\nmax_connections = 64\nhandshake_timeout = 30.0\n")
    attackers = idle_sockets(d, 200)
    try:
        peer = Peer(d)
        # well before the 30 s handshake timeout of the idle sockets that hold the slots
        assert peer.handshake()[0] == FrameType.WELCOME
        peer.data(1, 1)
        peer.expect_ack(1)
        assert sum(closed_by_daemon(s, 0.5) for s in attackers) >= 200 - 64
    finally:
        for sock in attackers:
            sock.close()
    assert_healthy(d)


def test_one_source_cannot_take_every_handshake_slot(daemon_factory):
    d = daemon_factory("[server]\nmax_handshakes_per_source = 8\nhandshake_timeout = 30.0\n")
    noisy = idle_sockets(d, 20, "127.0.0.1")
    try:
        # the oldest twelve of that source were let go; the newest eight wait on
        assert [closed_by_daemon(s, 1.0) for s in noisy] == [True] * 12 + [False] * 8
        # another address is not affected, and the noisy one can still get in
        other = Peer(d, source="127.0.0.2")
        assert other.handshake()[0] == FrameType.WELCOME
        same = Peer(d)
        assert same.handshake()[0] == FrameType.WELCOME
    finally:
        for sock in noisy:
            sock.close()
    assert_healthy(d)


def test_bad_hellos_cost_little_cpu_memory_and_log(daemon_factory):
    d = daemon_factory("[server]\nhandshake_timeout = 5.0\n")
    pid = d.proc.pid
    cpu0, rss0, log0 = cpu_seconds(pid), rss_bytes(pid), d.log_path.stat().st_size
    started = time.monotonic()
    for i in range(300):
        # 60,000-character ids: refused from the frame header, never parsed
        peer = Peer(d)
        peer.hello(lambda h: {**h, "id": "x" * 60_000})
        assert peer.until_closed()[-1][:2] == (ERROR, "TOO_LARGE")
        peer.close()
        # ids within the bound that nobody has: AUTH_FAILED, and a rate-limited log line
        peer = Peer(d, f"m-{i:04d}/" + "y" * 100)
        peer.hello()
        assert peer.until_closed()[-1][:2] == (ERROR, "AUTH_FAILED")
        peer.close()
    elapsed = time.monotonic() - started
    cpu = cpu_seconds(pid) - cpu0
    rss = rss_bytes(pid) - rss0
    log = d.log_path.stat().st_size - log0
    print(f"600 bad HELLOs: {cpu:.2f} s CPU, RSS {rss / 2**20:+.1f} MiB, log +{log} B")
    assert cpu < 1.5, f"{cpu:.2f} s of CPU"
    assert rss < 10 * 2**20 and log < 10 * 2**20
    unproven = [
        line
        for line in d.log().splitlines()
        if "auth: failed" in line or "before authentication" in line
    ]
    assert 1 <= len(unproven) <= elapsed + 2, "one line a second at most"
    assert all(len(line) < 400 for line in unproven), "identities are cut short in log lines"
    assert_healthy(d)


def still_open(sock: socket.socket) -> bool:
    """Whether the daemon has not closed this connection (yet); reads what is there."""
    sock.setblocking(False)
    try:
        while data := sock.recv(65536):
            del data
    except BlockingIOError:
        return True
    except ConnectionResetError:
        return False
    return False


def test_a_stats_snapshot_counts_the_evictions(daemon_factory):
    d = daemon_factory("[server]\nmax_handshakes = 4\nhandshake_timeout = 30.0\n")
    socks = idle_sockets(d, 10)
    try:
        # each newcomer pushes out the oldest once that had its grace; the one that found
        # every slot young waits beside them (one over the limit), the rest in the kernel
        wait_for(lambda: sum(map(still_open, socks)) == 5, WAIT, "evictions")
        assert [still_open(s) for s in socks] == [False] * 5 + [True] * 5
    finally:
        for sock in socks:
            sock.close()
    result = cli("stats", "--format", "json", data_dir=d.data_dir)
    assert json.loads(result.stdout)["connections"]["evicted"] == 5
