"""Power cuts. SIGKILL keeps the page cache, so it cannot show what a power cut does; this test
records the real daemon's file-system calls with strace while two cores stream to it, builds
the on-disk states a power cut could have left at points along the way (tests/fstrace.py has
the model: unsynced writes kept, dropped, cut at 512 bytes or kept as any subset of their 4 KiB
blocks; directory entries before their directory's fsync, either way), and on each state:

- starts the daemon, reconnects the cores (a client resends the frames above WELCOME's
  last_seq with the same seqs, as the client library does), stops it, starts and stops it again;
- checks the log as `dump` reads it: every frame acknowledged before the cut, or covered by a
  WELCOME's last_seq, and in the end every frame sent, is stored exactly once and as sent;
  nothing else is stored; no segment is set aside; no WELCOME is behind an ACK.

The points of the cut and what each unsynced write keeps are drawn from a seeded generator, so a
failure names a state (its number and trace line); the recorded run itself, where its batches
begin and end, follows the machine's timing. Restart times are printed (run with -s), not
asserted.

Hundreds of daemon starts would spend most of their time importing the application, so the
daemons of the states are forked from a process that imported it once (`Zygote`); each then
runs `module-ingest serve` as the command line would.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import queue
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import ROOT, Daemon, cli, wait_for
from fstrace import Trace, strace_command
from streaming import Streamer

from appliance.client import Client
from appliance.store.reader import read_records
from appliance.store.segment import QUARANTINE_SUFFIX, list_segments

SEED = 20261130
STATES = int(os.environ.get("PC_STATES", 220))  # distinct on-disk states
WORKERS = 2  # states checked side by side (each has its own daemon)
CORES = {"m-1/core-1": "1-4", "m-2/core-1": "5-8"}
RATE = 400  # frames per second per core: about 0.4 MB/s in all
# Fixed-size frames, as many sensors send: 40 bytes of record head, a 10-byte identity and
# this make 512-byte records, so every 4 KiB block of a commit starts with a record.
PAYLOAD = 462
SEGMENTS = 3  # the recorded run goes on until this many segments exist (two rotations)
TIMEOUT = 20.0
CONFIG = """
[auth]
dev_identity = false
[server]
handshake_timeout = 5.0
recv_bytes = 16384
[storage]
segment_bytes = 1048576
ring_bytes = 1048576
commit_max_bytes = 65536
commit_delay = 0.05
"""
# The recorded run gathers commits of several blocks (commit_delay); the daemons on the states
# commit at once, which changes nothing in the format or in recovery and saves time.
STATE_CONFIG = CONFIG.replace("commit_delay = 0.05", "")
RECOVERED = re.compile(r"store: recovered in ([0-9.]+) s")

# One request per line on stdin: [environment, log path]; answers "pid N" at once and
# "exit N STATUS" when that child ends. The children reaped here, so their exit codes are known.
ZYGOTE = r"""
import json, os, selectors, signal, sys
from appliance import children, cli  # imported once, before the forks

children.die_with_parent(int(sys.argv[1]))
wake_r, wake_w = os.pipe()
os.set_blocking(wake_w, False)
signal.set_wakeup_fd(wake_w)
signal.signal(signal.SIGCHLD, lambda *_: None)
sel = selectors.DefaultSelector()
sel.register(0, selectors.EVENT_READ)
sel.register(wake_r, selectors.EVENT_READ)
requests = b""
while True:
    for key, _ in sel.select():
        if key.fd == wake_r:
            os.read(wake_r, 512)
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if not pid:
                    break
                os.write(1, b"exit %d %d\n" % (pid, os.waitstatus_to_exitcode(status)))
            continue
        data = os.read(0, 65536)
        if not data:
            sys.exit(0)
        requests += data
        while b"\n" in requests:
            line, requests = requests.split(b"\n", 1)
            env, log = json.loads(line)
            parent = os.getpid()
            pid = os.fork()
            if pid == 0:
                children.die_with_parent(parent)
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                out = os.open(log, os.O_WRONLY | os.O_APPEND)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.dup2(out, 1)
                os.dup2(out, 2)
                for fd in (out, null, wake_r, wake_w):
                    os.close(fd)
                sys.stdout = open(1, "w", closefd=False)
                sys.stderr = open(2, "w", closefd=False)
                os.environ.clear()
                os.environ.update(env)
                code = 1
                try:
                    code = cli.main(["serve"])
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 1
                finally:
                    sys.stdout.flush()
                    os._exit(code)
            os.write(1, b"pid %d\n" % pid)
"""


class Zygote:
    """The process the states' daemons are forked from."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE, str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        self.lock = threading.Lock()
        self.cond = threading.Condition()
        self.exits: dict[int, int] = {}
        self.pids: queue.Queue[int] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            kind, pid, *status = line.split()
            if kind == b"pid":
                self.pids.put(int(pid))
            else:
                with self.cond:
                    self.exits[int(pid)] = int(status[0])
                    self.cond.notify_all()

    def fork(self, env: dict[str, str], log: Path) -> Forked:
        with self.lock:
            self.proc.stdin.write(json.dumps([env, str(log)]).encode() + b"\n")
            self.proc.stdin.flush()
            return Forked(self, self.pids.get(timeout=TIMEOUT))

    def close(self) -> None:
        self.proc.stdin.close()  # it exits, and its children with it (die_with_parent)
        self.proc.wait(TIMEOUT)
        self.reader.join(TIMEOUT)


class Forked:
    """A forked daemon, with the part of Popen's interface that conftest's Daemon uses."""

    def __init__(self, zygote: Zygote, pid: int) -> None:
        self.zygote = zygote
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        with self.zygote.cond:
            self.returncode = self.zygote.exits.get(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        with self.zygote.cond:
            if not self.zygote.cond.wait_for(lambda: self.pid in self.zygote.exits, timeout):
                raise subprocess.TimeoutExpired(f"daemon {self.pid}", timeout)
            self.returncode = self.zygote.exits[self.pid]
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkedDaemon(Daemon):
    def __init__(self, data_dir: Path, config_text: str, zygote: Zygote) -> None:
        super().__init__(data_dir, config_text)
        self.zygote = zygote

    def spawn(self, env: dict[str, str], log) -> Forked:
        return self.zygote.fork(env, self.log_path)


def daemon_pid(tracer: int) -> int:
    """The process strace started (its only child)."""
    children = Path(f"/proc/{tracer}/task/{tracer}/children").read_text().split()
    return int(children[0]) if children else 0


@pytest.fixture
def recorded(tmp_path):
    """One traced run: the trace model and what each core sent, by peer port."""
    if shutil.which("strace") is None:
        pytest.fail("strace is missing: ./scripts/install-test-packages (.ci/debian-packages)")
    (tmp_path / "run").mkdir()
    d = Daemon(tmp_path / "run" / "data", CONFIG)
    tokens = {}
    for ident, channels in CORES.items():
        result = cli(
            "identity", "add", ident, "--kind", "core", "--module", ident.split("/")[0],
            "--channels", channels, data_dir=d.data_dir,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr.decode()
        tokens[ident] = json.loads(result.stdout)["token"]
    trace = Trace(d.data_dir)  # what is there now is durable: the base of every state
    trace_file = tmp_path / "trace.txt"
    d.command = [*strace_command(trace_file), *d.command]
    streamers = []
    try:
        d.start()
        for n, (ident, channels) in enumerate(CORES.items()):
            low, high = (int(c) for c in channels.split("-"))
            streamers.append(
                Streamer(
                    d,
                    ident,
                    tokens[ident],
                    list(range(low, high + 1)),
                    seed=SEED + n,
                    timeout=TIMEOUT,
                    rate=RATE,
                    payload_size=PAYLOAD,
                )
            )
        for s in streamers:
            s.start()
        wait = [s.client for s in streamers]
        wait_for(lambda: all(c.welcomes for c in wait), TIMEOUT, "the cores' WELCOMEs")
        ports = {s.client._sock.getsockname()[1]: s for s in streamers}
        wal = d.data_dir / "wal"
        wait_for(lambda: len(list_segments(wal)) >= SEGMENTS, 60.0, f"{SEGMENTS} segments")
        for s in streamers:
            s.finish()
        os.kill(daemon_pid(d.proc.pid), signal.SIGTERM)  # the daemon, not strace
        assert d.proc.wait(TIMEOUT) == 0, d.log()[-3000:]
        d.proc = None
    finally:
        for s in streamers:
            s.stopping.set()
        if d.proc is not None:
            pid = daemon_pid(d.proc.pid)
            if pid:
                os.kill(pid, signal.SIGKILL)
            d.kill()
    trace.read(trace_file)
    trace_file.unlink()  # tens of MB
    return trace, ports, tokens


def pick_states(trace: Trace) -> list[tuple[int, int, object]]:
    """STATES distinct states (seeded): (number, trace point, state)."""
    rng = random.Random(SEED)
    points = trace.points()
    seen: set[str] = set()
    picked = []
    for n in range(50 * STATES):
        point = rng.choice(points)
        state = trace.state(point, random.Random(f"{SEED}/{n}"))
        digest = hashlib.sha256()
        for path, content in sorted(state.files().items()):
            digest.update(f"{path}\0{-1 if content is None else len(content)}\0".encode())
            digest.update(content or b"")
        digest = digest.hexdigest()
        if digest not in seen:
            seen.add(digest)
            picked.append((n, point, state))
            if len(picked) == STATES:
                break
    return picked


def check_state(zygote, tmp: Path, number: int, point: int, state, trace, ports, tokens) -> dict:
    """Run the daemon on one state; returns {"failure": str or None, timings}.

    The cores come back one at a time with a restart in between: the one that comes back
    late finds a daemon that has appended since the cut and restarted, and the first one,
    back once more, finds its replay window rebuilt by that restart."""
    (tmp / f"state{number}").mkdir()
    d = ForkedDaemon(tmp / f"state{number}" / "data", STATE_CONFIG, zygote)
    state.write_to(d.data_dir)
    acked, received = trace.acked(point), trace.received(point)
    # what each core had sent by the cut: at least what the daemon had read of it
    upto = {s.core: received.get(port, 0) for port, s in ports.items()}
    first, late = list(ports.items())[:: 1 if number % 2 else -1]
    out = {"failure": None}
    try:
        t0 = time.monotonic()
        d.start()
        out["start"] = time.monotonic() - t0
        m = RECOVERED.search(d.log())
        out["recovery"] = float(m.group(1)) if m else None
        for n, (port, streamer) in enumerate((first, late)):
            if n:
                assert d.stop() == 0, "the first stop did not exit 0"
                d.start()
            core, sent = streamer.core, streamer.sent
            with Client(d.host, d.port, core, tokens[core], timeout=TIMEOUT) as client:
                last_seq = client.acked  # WELCOME's last_seq
                assert acked.get(port, 0) <= last_seq <= upto[core], (
                    f"{core}: WELCOME last_seq {last_seq}, but ACKed {acked.get(port, 0)}"
                    f" and sent {upto[core]} before the cut"
                )
                for seq in range(last_seq + 1, upto[core] + 1):  # the same seqs again
                    channel, ts_ns, payload = sent[seq]
                    assert client.send(channel, payload, ts_ns) == seq
                client.flush()
                assert client.rejected == [], client.rejected[:5]
        core = first[1].core
        with Client(d.host, d.port, core, tokens[core], timeout=TIMEOUT) as client:
            assert client.acked == upto[core], f"{core}: WELCOME after the restart"
        assert d.stop() == 0, "the last stop did not exit 0"
        wal = d.data_dir / "wal"
        aside = sorted(p.name for p in wal.glob("*" + QUARANTINE_SUFFIX))
        assert not aside, f"set aside: {aside}"
        by_core: dict[str, Counter] = {s.core: Counter() for s in ports.values()}
        for rec in read_records(wal):  # what `dump` prints
            sent = next((s.sent for s in ports.values() if s.core == rec.identity), None)
            assert sent is not None, f"stored for an unknown identity {rec.identity!r}"
            assert sent.get(rec.seq) == (rec.channel, rec.ts_ns, rec.payload), (
                f"{rec.identity} seq {rec.seq}: stored but never sent like this"
            )
            by_core[rec.identity][rec.seq] += 1
        for s in ports.values():
            twice = sorted(seq for seq, n in by_core[s.core].items() if n > 1)
            missing = sorted(set(range(1, upto[s.core] + 1)) - set(by_core[s.core]))
            unsent = sorted(seq for seq in by_core[s.core] if seq > upto[s.core])
            assert not twice, f"{s.core}: stored twice: {twice[:10]} ({len(twice)} in all)"
            assert not missing, f"{s.core}: missing: {missing[:10]} ({len(missing)} in all)"
            assert not unsent, f"{s.core}: stored, never sent: {unsent[:10]} ({len(unsent)})"
        assert "Traceback" not in d.log(), d.log()[-2000:]
        shutil.rmtree(d.data_dir.parent)
    except Exception as exc:  # every state is reported, not just the first
        lines = [x for x in d.log().splitlines() if "level=warning" in x or "level=error" in x]
        out["failure"] = f"{type(exc).__name__}: {exc}".strip()[:300] + "".join(
            f"\n      {x[:200]}" for x in lines[:3]
        )
    finally:
        d.kill()
    return out


def test_every_acked_frame_survives_a_power_cut_exactly_once(recorded, tmp_path):
    trace, ports, tokens = recorded
    states = pick_states(trace)
    assert len(states) == STATES, f"only {len(states)} distinct states in the trace"
    zygote = Zygote()
    try:
        with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
            results = list(
                pool.map(
                    lambda s: (s, check_state(zygote, tmp_path, *s, trace, ports, tokens)),
                    states,
                )
            )
    finally:
        zygote.close()
    failures = [(n, point, r["failure"]) for (n, point, _), r in results if r["failure"]]
    starts = [r["start"] for _, r in results if "start" in r]
    recoveries = [r["recovery"] for _, r in results if r.get("recovery") is not None]
    print(
        f"\npower cut: {len(states)} states, {len(failures)} failed; daemon start to listening"
        f" median {statistics.median(starts):.3f} s, max {max(starts):.3f} s; recovery"
        f" median {statistics.median(recoveries):.4f} s, max {max(recoveries):.4f} s"
    )
    assert not failures, f"{len(failures)} of {len(states)} states fail:\n" + "\n".join(
        f"  state {n} (cut after trace line {point + 1}): {why}" for n, point, why in failures
    )
