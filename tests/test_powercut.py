"""Power cuts. SIGKILL keeps the page cache, so it cannot show what a power cut does; this test
records the real daemon's file-system calls with strace, builds the on-disk states a power cut
could have left at points along the way (tests/fstrace.py has the model: unsynced writes kept,
dropped, cut at 512 bytes or kept as any subset of their 4 KiB blocks; directory entries before
their directory's fsync, either way), and on each state:

- starts the daemon and reconnects the cores one at a time, with a restart in between (a core
  resends the frames above WELCOME's last_seq with the same seqs, as the client library does);
- checks the log as `dump` reads it: every frame acknowledged before the cut, or covered by a
  WELCOME's last_seq, and in the end every frame sent, is stored exactly once and as sent;
  nothing else is stored; no segment is set aside; no WELCOME is behind a promise.

Two runs are recorded: two cores streaming into an empty store (the first STATES_STREAM
states), then the daemon started on one of those states that holds stale blocks of a torn
commit, recovering it while the cores resend (the rest: power cuts during recovery's own
clearing, and during the first commits after it).

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
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT, Daemon, cli, wait_for
from fstrace import State, Trace, strace_command
from streaming import Streamer

from appliance.client import Client
from appliance.store.reader import SegmentReader, read_records
from appliance.store.segment import QUARANTINE_SUFFIX, list_segments, segment_number
from appliance.telemetry.figures import percentile

SEED = 20261130
STATES_STREAM = 180  # distinct on-disk states from the streaming run
STATES_RECOVERY = 40  # and from the run that recovers a torn commit
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


@dataclass
class Core:
    ident: str
    token: str
    sent: dict[int, tuple[int, int, bytes]]  # seq -> (channel, ts_ns, payload)


@dataclass
class Cut:
    """One on-disk state a power cut could leave, and what the cores had at that moment."""

    name: str
    state: State
    promised: dict[str, int]  # core -> highest seq an ACK or a WELCOME covered
    sent: dict[str, int]  # core -> highest seq the daemon had read (the core sent that much)


def traced(tmp: Path, name: str, config: str) -> tuple[Daemon, Path]:
    d = Daemon(tmp / name / "data", config)
    trace_file = tmp / f"{name}.trace"
    d.command = [*strace_command(trace_file), *d.command]
    return d, trace_file


def stop_traced(d: Daemon) -> None:
    """SIGTERM to the daemon (strace's child), then wait for both; SIGKILL if it failed."""
    if d.proc is None:
        return
    pid = daemon_pid(d.proc.pid)
    try:
        if pid:
            os.kill(pid, signal.SIGTERM)
        assert d.proc.wait(TIMEOUT) == 0, d.log()[-3000:]
    finally:
        if d.proc.poll() is None:
            if pid:
                os.kill(pid, signal.SIGKILL)
            d.kill()
        d.proc = None


def record_stream(tmp: Path) -> tuple[dict[str, Core], Trace, dict[int, str]]:
    """Run 1: two cores stream into an empty store until it has SEGMENTS segments. The
    cores, the trace, and which core each peer port was."""
    (tmp / "stream").mkdir()
    d, trace_file = traced(tmp, "stream", CONFIG)
    cores = {}
    for ident, channels in CORES.items():
        result = cli(
            "identity", "add", ident, "--kind", "core", "--module", ident.split("/")[0],
            "--channels", channels, data_dir=d.data_dir,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr.decode()
        cores[ident] = Core(ident, json.loads(result.stdout)["token"], {})
    trace = Trace(d.data_dir)  # what is there now is durable: the base of every state
    streamers = []
    try:
        d.start()
        for n, (ident, channels) in enumerate(CORES.items()):
            low, high = (int(c) for c in channels.split("-"))
            channels = list(range(low, high + 1))
            streamers.append(
                Streamer(
                    d,
                    ident,
                    cores[ident].token,
                    channels,
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
        ports = {s.client._sock.getsockname()[1]: s.core for s in streamers}
        wal = d.data_dir / "wal"
        wait_for(lambda: len(list_segments(wal)) >= SEGMENTS, 60.0, f"{SEGMENTS} segments")
        for s in streamers:
            s.finish()
            cores[s.core].sent = s.sent
        stop_traced(d)
    finally:
        for s in streamers:
            s.stopping.set()
        stop_traced(d)
    trace.read(trace_file)
    trace_file.unlink()  # tens of MB
    return cores, trace, ports


def record_recovery(tmp: Path, base: Cut, cores: dict[str, Core]) -> tuple[Trace, dict[int, str]]:
    """Run 2: the daemon on `base` (a state with stale blocks of a torn commit): recovery,
    then the cores reconnect and resend what they had sent."""
    (tmp / "recovery").mkdir()
    d, trace_file = traced(tmp, "recovery", STATE_CONFIG)
    base.state.write_to(d.data_dir)
    trace = Trace(d.data_dir)
    ports = {}
    try:
        d.start()
        for core in cores.values():
            with Client(d.host, d.port, core.ident, core.token, timeout=TIMEOUT) as client:
                ports[client._sock.getsockname()[1]] = core.ident
                for seq in range(client.acked + 1, base.sent[core.ident] + 1):
                    channel, ts_ns, payload = core.sent[seq]
                    assert client.send(channel, payload, ts_ns) == seq
                client.flush()
        stop_traced(d)
    finally:
        stop_traced(d)
    trace.read(trace_file)
    trace_file.unlink()
    return trace, ports


def pick_states(trace: Trace, count: int, seed: str) -> list[tuple[int, int, State]]:
    """`count` distinct states (seeded): (number, trace point, state)."""
    rng = random.Random(seed)
    points = trace.points()
    seen: set[str] = set()
    picked = []
    for n in range(50 * count):
        point = rng.choice(points)
        state = trace.state(point, random.Random(f"{seed}/{n}"))
        digest = hashlib.sha256()
        for path, content in sorted(state.files().items()):
            digest.update(f"{path}\0{-1 if content is None else len(content)}\0".encode())
            digest.update(content or b"")
        digest = digest.hexdigest()
        if digest not in seen:
            seen.add(digest)
            picked.append((n, point, state))
            if len(picked) == count:
                break
    return picked


def by_core(found: dict[int, int], ports: dict[int, str]) -> dict[str, int]:
    out = dict.fromkeys(ports.values(), 0)
    for port, seq in found.items():
        if port in ports:
            out[ports[port]] = max(out[ports[port]], seq)
    return out


def has_stale_blocks(state: State) -> bool:
    """Whether the newest segment holds valid records after a gap: what a torn commit that
    lost an earlier block and kept a later one leaves."""
    segments = sorted(
        (segment_number(Path(p)), data)
        for p, data in state.files().items()
        if data and segment_number(Path(p)) is not None
    )
    if not segments:
        return False
    number, data = segments[-1]
    gaps = []
    for _ in SegmentReader(data, number, report=gaps.append).records():
        pass
    return any(g.resumed is not None for g in gaps)


def check_state(zygote: Zygote, tmp: Path, number: int, cut: Cut, cores: dict[str, Core]) -> dict:
    """Run the daemon on one state; returns {"failure": str or None, timings}.

    The cores come back one at a time with a restart in between: the one that comes back
    late finds a daemon that has appended since the cut and restarted, and the first one,
    back once more, finds its replay window rebuilt by that restart."""
    (tmp / f"state{number}").mkdir()
    d = ForkedDaemon(tmp / f"state{number}" / "data", STATE_CONFIG, zygote)
    cut.state.write_to(d.data_dir)
    first, late = list(cores.values())[:: 1 if number % 2 else -1]
    out = {"failure": None}
    try:
        t0 = time.monotonic()
        d.start()
        out["start"] = time.monotonic() - t0
        m = RECOVERED.search(d.log())
        out["recovery"] = float(m.group(1)) if m else None
        for n, core in enumerate((first, late)):
            if n:
                assert d.stop() == 0, "the first stop did not exit 0"
                d.start()
            name, upto = core.ident, cut.sent[core.ident]
            with Client(d.host, d.port, name, core.token, timeout=TIMEOUT) as client:
                last_seq = client.acked  # WELCOME's last_seq
                assert cut.promised[name] <= last_seq <= upto, (
                    f"{name}: WELCOME last_seq {last_seq}, but promised"
                    f" {cut.promised[name]} and sent {upto} before the cut"
                )
                for seq in range(last_seq + 1, upto + 1):  # the same seqs again
                    channel, ts_ns, payload = core.sent[seq]
                    assert client.send(channel, payload, ts_ns) == seq
                client.flush()
                assert client.rejected == [], client.rejected[:5]
        with Client(d.host, d.port, first.ident, first.token, timeout=TIMEOUT) as client:
            assert client.acked == cut.sent[first.ident], f"{first.ident}: WELCOME after restart"
        assert d.stop() == 0, "the last stop did not exit 0"
        wal = d.data_dir / "wal"
        aside = sorted(p.name for p in wal.glob("*" + QUARANTINE_SUFFIX))
        assert not aside, f"set aside: {aside}"
        stored: dict[str, Counter] = {name: Counter() for name in cores}
        for rec in read_records(wal):  # what `dump` prints
            assert rec.identity in cores, f"stored for an unknown identity {rec.identity!r}"
            assert cores[rec.identity].sent.get(rec.seq) == (rec.channel, rec.ts_ns, rec.payload), (
                f"{rec.identity} seq {rec.seq}: stored but never sent like this"
            )
            stored[rec.identity][rec.seq] += 1
        for name, seqs in stored.items():
            upto = cut.sent[name]
            twice = sorted(seq for seq, n in seqs.items() if n > 1)
            missing = sorted(set(range(1, upto + 1)) - set(seqs))
            unsent = sorted(seq for seq in seqs if seq > upto)
            assert not twice, f"{name}: stored twice: {twice[:10]} ({len(twice)} in all)"
            assert not missing, f"{name}: missing: {missing[:10]} ({len(missing)} in all)"
            assert not unsent, f"{name}: stored, never sent: {unsent[:10]} ({len(unsent)})"
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


def test_every_acked_frame_survives_a_power_cut_exactly_once(tmp_path):
    if shutil.which("strace") is None:
        pytest.fail("strace is missing: ./scripts/install-test-packages (.ci/debian-packages)")
    cores, stream, stream_ports = record_stream(tmp_path)

    def stream_cuts(count: int) -> list[Cut]:
        return [
            Cut(
                f"stream state {n} (cut after trace line {point + 1})",
                state,
                by_core(stream.promised(point), stream_ports),
                by_core(stream.received(point), stream_ports),
            )
            for n, point, state in pick_states(stream, count, f"{SEED}/stream")
        ]

    cuts = stream_cuts(STATES_STREAM)
    assert len(cuts) == STATES_STREAM, f"only {len(cuts)} distinct states in the run"
    base = next((c for c in cuts if has_stale_blocks(c.state)), None)
    assert base is not None, "no state with stale blocks of a torn commit to recover from"
    trace, ports = record_recovery(tmp_path, base, cores)
    cuts += [
        Cut(
            f"recovery state {n} (cut after trace line {point + 1})",
            state,
            {k: max(v, base.promised[k]) for k, v in by_core(trace.promised(point), ports).items()},
            base.sent,
        )
        for n, point, state in pick_states(trace, STATES_RECOVERY, f"{SEED}/recovery")
    ]
    # A short recovery run (its length follows the machine's timing) may offer fewer
    # distinct states than STATES_RECOVERY: the streaming run makes up the rest (the same
    # seed draws the same first STATES_STREAM, then more).
    shortfall = STATES_STREAM + STATES_RECOVERY - len(cuts)
    if shortfall:
        cuts += stream_cuts(STATES_STREAM + shortfall)[STATES_STREAM:]
    assert len(cuts) == STATES_STREAM + STATES_RECOVERY, f"{len(cuts)} distinct states in all"

    zygote = Zygote()
    try:
        with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
            results = list(
                pool.map(
                    lambda nc: (nc[1], check_state(zygote, tmp_path, nc[0], nc[1], cores)),
                    enumerate(cuts),
                )
            )
    finally:
        zygote.close()
    failures = [(cut.name, r["failure"]) for cut, r in results if r["failure"]]
    starts = sorted(r["start"] for _, r in results if "start" in r)
    recoveries = sorted(r["recovery"] for _, r in results if r.get("recovery") is not None)
    print(
        f"\npower cut: {len(cuts)} states, {len(failures)} failed; daemon start to listening"
        f" median {percentile(starts, 50):.3f} s, max {max(starts):.3f} s; recovery"
        f" median {percentile(recoveries, 50):.4f} s, max {max(recoveries):.4f} s"
    )
    assert not failures, f"{len(failures)} of {len(cuts)} states fail:\n" + "\n".join(
        f"  {name}: {why}" for name, why in failures
    )
