"""scripts/bench --fleet and --fleet-restart: the daemon under scripts/fleet.

--fleet: a daemon on a temp data dir with N identities, scripts/fleet against it
for --duration, and the daemon measured over the timed phase from /proc: CPU of
the daemon with its threads and children (in all and per ACKed frame), RSS, and
its commits from the stats snapshot; beside them the generator's CPU and the rest
of the machine's.

--fleet-restart: the cores stream in the fleet shape for --duration; the daemon
is killed (SIGKILL) and started again on the same data dir and port; once it
listens, every core reconnects at once and resends what WELCOME's last_seq does
not cover. Reports when each core had its WELCOME again (from the restart), and
checks the stopped daemon's WAL: every frame ACKed before the kill is stored,
none twice.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from _harness import (
    CHANNEL,
    RECOVERED,
    BenchError,
    Daemon,
    LoadChild,
    Mark,
    cleanup,
    mark,
    stats_snapshot,
    watch,
)
from _loadlib import count_text
from _procfs import children, memory_kib, tcp_counters

from appliance.store.recovery import read_records
from appliance.telemetry.figures import percentile

FLEET = Path(__file__).resolve().parent / "fleet"
SET_UP_S = 300.0  # handshakes and pre-building, at most
AFTER_S = 2.0  # --fleet-restart: streaming after the last WELCOME, before the drain
LOST_WAIT_S = 60.0  # --fleet-restart: for the generator to see every connection dropped
STORM_WAIT_S = 200.0  # --fleet-restart: for every WELCOME, the drain and the result
# what the kernel did with the connections it could not queue for accept()
LISTEN_COUNTERS = (
    "ListenOverflows",
    "ListenDrops",
    "SyncookiesSent",
    "SyncookiesRecv",
    "SyncookiesFailed",
)


def fleet_command(daemon: Daemon, args: argparse.Namespace, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(FLEET),
        "--connect",
        daemon.address,
        "--identities",
        str(daemon.identities),
        "--connections",
        str(args.connections),
        "--rate",
        str(args.rate),
        "--duration",
        str(args.duration),
        "--payload",
        str(args.payload),
        "--mac",
        args.mac,
        "--channel",
        str(CHANNEL),
        "--procs",
        str(args.procs),
        "--json",
        *extra,
    ]


def _new_daemon(args: argparse.Namespace) -> tuple[Path, Daemon]:
    workdir = Path(tempfile.mkdtemp(prefix="module-ingest-bench-", dir=args.workdir))
    return workdir, Daemon(workdir, args.connections, args.python, extra=args.config_extra or "")


def _phase(a: Mark, b: Mark) -> dict:
    """CPU over the phase from mark a to mark b, in % of one core."""
    wall = max(b.t - a.t, 1e-9)
    daemon = 100 * (b.daemon_tree_s - a.daemon_tree_s) / wall
    generator = 100 * (b.child_s - a.child_s) / wall
    return {
        "seconds": wall,
        "daemon_cpu_pct": daemon,
        "daemon_user_pct": 100 * (b.daemon_cpu[0] - a.daemon_cpu[0]) / wall,
        "daemon_system_pct": 100 * (b.daemon_cpu[1] - a.daemon_cpu[1]) / wall,
        "generator_cpu_pct": generator,
        # everything else on the machine: another run here skews the figures
        "others_cpu_pct": max(0.0, 100 * (b.busy_s - a.busy_s) / wall - daemon - generator),
        # ... and this is how much: time runnable but without a CPU
        "daemon_wait_pct": 100 * (b.daemon_wait_s - a.daemon_wait_s) / wall,
        "generator_wait_pct": 100 * (b.child_wait_s - a.child_wait_s) / wall,
    }


def _commits(before: dict, after: dict, frames: int) -> dict:
    commits = after["wal"]["commits"] - before["wal"]["commits"]
    return {
        "commits": commits,
        "frames_per_commit": frames / commits if commits else None,
        # the daemon keeps the times of its last 1024 commits: these are the phase's last
        "commit_p50_ms": after["wal"]["commit_p50_ms"],
        "commit_p99_ms": after["wal"]["commit_p99_ms"],
    }


# -- --fleet ----------------------------------------------------------------------------------


def fleet(args: argparse.Namespace) -> dict:
    """One --fleet run: data dir, daemon, scripts/fleet, stop."""
    workdir, daemon = _new_daemon(args)
    try:
        daemon.prepare()
        daemon.start()
        snaps: dict[str, dict] = {}

        def snapshot(word: str) -> None:
            snaps[word] = stats_snapshot(daemon.data_dir)

        child = LoadChild(fleet_command(daemon, args), "fleet")
        watched = watch(daemon, child, time.monotonic() + SET_UP_S + args.duration, snapshot)
        hwm = memory_kib(daemon.proc.pid)["VmHWM"]
        # e.g. the store's writer process: forked, so the pages it shares count in both
        children_hwm = sum(memory_kib(pid)["VmHWM"] for pid in children(daemon.proc.pid))
        result = watched.result
        start, end = watched.marks["start"], watched.marks["end"]
        phase = _phase(start, end)
        # its workers may have exited by the "end" mark: their own figure over the phase
        phase["generator_wait_pct"] = result["generator_wait_pct"]
        frames = result["frames_acked"]
        result["machine"] = phase
        result["daemon"] = {
            "cpu_pct": phase["daemon_cpu_pct"],
            "cpu_us_per_frame": 1e6 * (end.daemon_tree_s - start.daemon_tree_s) / frames
            if frames
            else None,
            "rss_mib_at_start": start.rss_kib / 1024,
            # VmHWM can lag VmRSS a little (the kernel syncs RSS counters lazily)
            "hwm_mib": max(hwm, watched.rss_max_kib) / 1024,
            "children_hwm_mib": children_hwm / 1024,
            **_commits(snaps["start"], snaps["end"], frames),
        }
        result["daemon"]["exit_code"] = daemon.stop()
        return result
    finally:
        daemon.stop()
        cleanup(workdir, args.keep)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _latency(lat: dict) -> str:
    return (
        f"p50 {_ms(lat['p50'])} ms, p99 {_ms(lat['p99'])} ms, p999 {_ms(lat['p999'])} ms, "
        f"max {_ms(lat['max'])} ms ({lat['samples']} frames)"
    )


def _head(r: dict) -> str:
    return (
        f"{r['connections']} cores, {r['rate']:,.0f} frames/s in all (one frame every "
        f"{1000 * r['period_s']:.1f} ms per core, phases spread), {r['mac']}, "
        f"{r['payload']} B payload ({r['frame_bytes']} B frames), "
        f"{r['procs']} generator process(es)"
    )


def _behind(lag: dict) -> str:
    """How far the generator's sends fell behind their schedule."""
    return (
        f"behind its schedule p50 {_ms(lag['p50'])} ms, p99 {_ms(lag['p99'])} ms, "
        f"max {_ms(lag['max'])} ms, {lag['late']} of {lag['samples']} frames more than "
        f"{lag['late_ms']:.0f} ms late"
    )


def _cpu(phase: dict) -> str:
    """The CPU split of a phase (100% = one core), with how long the daemon's loop thread
    and the generator were runnable but had no CPU: the noise from the rest of the machine."""
    return (
        f"CPU: daemon {phase['daemon_cpu_pct']:.0f}% (its loop waited for a CPU "
        f"{phase['daemon_wait_pct']:.0f}% of the time), generator "
        f"{phase['generator_cpu_pct']:.0f}% (waited {phase['generator_wait_pct']:.0f}%), "
        f"other processes {phase['others_cpu_pct']:.0f}%"
    )


def fleet_summary(r: dict) -> str:
    d, m = r["daemon"], r["machine"]
    lines = [
        f"fleet: {_head(r)}",
        f"set-up: handshakes {r['handshake_s']:.2f} s, {r['prebuilt_frames']} frames pre-built "
        f"in {r['prebuild_s']:.2f} s",
        f"timed phase {r['duration_s']:.2f} s: {r['frames_sent_timed']} frames sent, "
        f"{r['frames_acked']} ACKed -> {r['acked_per_s']:,.0f} frames/s ACKed",
        f"ACK latency, every frame from its send to the ACK covering it: "
        f"{_latency(r['latency_ms'])}",
        f"after the drain: {r['frames_acked_total']} of {r['frames_sent']} frames ACKed, "
        f"{r['frames_unacked']} never ACKed; NACKs: {count_text(r['nacks'])}; "
        f"errors: {count_text(r['errors'])}; connections lost: {count_text(r['connections_lost'])}",
        "daemon: "
        + (f"{d['cpu_us_per_frame']:.1f}" if d["cpu_us_per_frame"] else "-")
        + " µs of CPU per ACKed frame (with its threads and children; main process user "
        f"{m['daemon_user_pct']:.0f}%, system {m['daemon_system_pct']:.0f}%); "
        f"RSS {d['rss_mib_at_start']:.1f} MiB with every core connected, "
        f"peak (VmHWM) {d['hwm_mib']:.1f} MiB"
        + (
            f", its children's {d['children_hwm_mib']:.1f} MiB (forked: shared pages count twice)"
            if d["children_hwm_mib"]
            else ""
        ),
        f"store: {d['commits']} commits in the timed phase "
        f"({d['commits'] / m['seconds']:,.0f}/s, "
        + (f"{d['frames_per_commit']:.1f}" if d["frames_per_commit"] else "-")
        + f" frames each); commit (write + fdatasync) p50 {_ms(d['commit_p50_ms'])} ms, "
        f"p99 {_ms(d['commit_p99_ms'])} ms (its last 1024 commits)",
        f"generator: {_behind(r['lag_ms'])}"
        + (f"; {r['frames_blocked']} waited for a full send buffer" if r["frames_blocked"] else ""),
        _cpu(m),
    ]
    if d["exit_code"] != 0:
        lines.append(f"warning: the daemon exited with {d['exit_code']} on SIGTERM")
    return "\n".join(lines)


# -- --fleet-restart ---------------------------------------------------------------------------


def _await(child: LoadChild, daemon: Daemon | None, words: tuple[str, ...], timeout: float) -> str:
    """Wait for one of `words` from the generator (checking the daemon meanwhile, if given);
    returns the one that came."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon is not None:
            daemon.check_alive()
        if child.closed:
            child.result(10)  # raises the generator's own error
            break
        for word in child.words(0.05):
            if word in words:
                return word
    raise BenchError(f"the generator did not say {' or '.join(words)} within {timeout:.0f} s")


def fleet_restart(args: argparse.Namespace) -> dict:
    """One --fleet-restart run: stream, SIGKILL, restart, reconnect, check the WAL."""
    workdir, daemon = _new_daemon(args)
    try:
        daemon.prepare()
        daemon.start()
        cmd = fleet_command(daemon, args, "--restart", "--after", str(AFTER_S))
        child = LoadChild(cmd, "fleet", control=True)
        try:
            _await(child, daemon, ("start",), SET_UP_S)
            marks = {"start": mark(daemon.proc.pid, child.proc.pid)}
            while time.monotonic() < marks["start"].t + args.duration:
                daemon.check_alive()
                if child.closed or child.words(0.05):
                    raise BenchError("the generator stopped before the kill")
            # no stats snapshot here: a daemon under load may take seconds to answer one,
            # and the kill must come on time
            marks["kill"] = mark(daemon.proc.pid, child.proc.pid)
            daemon.proc.kill()  # SIGKILL: a power blip, as far as the process can tell
            daemon.proc.wait()
            _await(child, None, ("lost",), LOST_WAIT_S)
            tcp0 = tcp_counters()
            spawned = time.monotonic()
            daemon.start("daemon-restart.log", same_port=True)
            marks["listening"] = mark(daemon.proc.pid, child.proc.pid)
            child.tell("reconnect")
            # "end" first: some cores never had their WELCOME again (the check says so)
            _await(child, daemon, ("welcomed", "end"), STORM_WAIT_S)
            marks["welcomed"] = mark(daemon.proc.pid, child.proc.pid)
            tcp1 = tcp_counters()
            result = child.result(STORM_WAIT_S)
        except BaseException:
            child.kill()
            raise
        code = daemon.stop()
        stored = _stored(daemon)
        logged = RECOVERED.search(daemon.log())
    finally:
        daemon.stop()
        cleanup(workdir, args.keep)
    restart = result["restart"]
    cores = restart.pop("cores")
    restart.update(
        listening_s=marks["listening"].t - spawned,
        recovered_in_logged_s=float(logged[1]) if logged else None,
        welcome_s=_spread([c[6] - spawned for c in cores if c[6] > spawned]),
        challenge_s=_spread([c[5] - spawned for c in cores if c[5] > spawned]),
        connect_to_welcome_s=_spread([c[6] - c[4] for c in cores if c[6] > spawned]),
        cores_welcomed=sum(1 for c in cores if c[6] > spawned),
        tcp={k: tcp1.get(k, 0) - tcp0.get(k, 0) for k in LISTEN_COUNTERS},
        exit_code=code,
    )
    result["before"] = _phase(marks["start"], marks["kill"])
    result["storm"] = _phase(marks["listening"], marks["welcomed"])
    result["check"] = check_store(cores, stored)
    return result


def _spread(values: list[float]) -> dict:
    values.sort()
    if not values:
        return {"p50": None, "p99": None, "max": None}
    return {"p50": percentile(values, 50), "p99": percentile(values, 99), "max": values[-1]}


def _stored(daemon: Daemon) -> Counter:
    """How often each (identity, seq) is in the stopped daemon's WAL."""
    return Counter((rec.identity, rec.seq) for rec in read_records(daemon.wal))


def check_store(cores: list, stored: Counter) -> dict:
    """Every seq up to each core's ACK (before the kill, and at the end) is stored once."""
    lost_before = lost_after = 0
    examples = []
    for ident, acked_at_loss, acked, _sent, *_times in cores:
        missing = [s for s in range(1, acked + 1) if (ident, s) not in stored]
        before = sum(1 for s in missing if s <= (acked_at_loss or 0))
        lost_before += before
        lost_after += len(missing) - before
        if missing and len(examples) < 3:
            examples.append(f"{ident} seq {missing[0]}")
    twice = {key: n for key, n in stored.items() if n > 1}
    return {
        "records": sum(stored.values()),
        "frames_acked_before_kill": sum(c[1] or 0 for c in cores),
        "lost_acked_before_kill": lost_before,
        "lost_acked_after_restart": lost_after,
        "stored_twice": len(twice),
        "examples": examples + [f"{i} seq {s} x{n}" for (i, s), n in list(twice.items())[:3]],
    }


def restart_failure(r: dict) -> str | None:
    """The one line that says why a --fleet-restart run failed, or None."""
    c, rs = r["check"], r["restart"]
    problems = []
    if c["lost_acked_before_kill"] or c["lost_acked_after_restart"]:
        problems.append(
            f"{c['lost_acked_before_kill'] + c['lost_acked_after_restart']} ACKed frames "
            "are not in the WAL"
        )
    if c["stored_twice"]:
        problems.append(f"{c['stored_twice']} frames are stored twice")
    if rs["cores_welcomed"] < r["connections"]:
        problems.append(f"{r['connections'] - rs['cores_welcomed']} cores got no WELCOME")
    if r["frames_unacked"]:
        problems.append(f"{r['frames_unacked']} frames never ACKed after the drain")
    if rs["welcome_behind"]:
        problems.append(f"{rs['welcome_behind']} WELCOMEs had a last_seq below an ACK")
    if rs["exit_code"] != 0:
        problems.append(f"the restarted daemon exited with {rs['exit_code']} on SIGTERM")
    if not problems:
        return None
    return (
        "fleet restart check failed: "
        + "; ".join(problems)
        + (f" (e.g. {', '.join(c['examples'])})" if c["examples"] else "")
    )


def restart_summary(r: dict) -> str:
    rs, c, b, s = r["restart"], r["check"], r["before"], r["storm"]
    w, ch, cw = rs["welcome_s"], rs["challenge_s"], rs["connect_to_welcome_s"]

    def sec(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f} s"

    recovered = rs["recovered_in_logged_s"]
    lines = [
        f"fleet restart: {_head(r)}",
        f"before the kill ({b['seconds']:.1f} s of streaming): ACK latency "
        f"{_latency(r['latency_before_ms'])}; {_cpu(b)}",
        f"SIGKILL, restart on the same data dir and port: 'listening on' after "
        f"{rs['listening_s']:.3f} s"
        + (f" (the store recovered in {recovered:.3f} s)" if recovered is not None else "")
        + "; then every core reconnected at once",
        f"WELCOME again, per core, from the restart: p50 {sec(w['p50'])}, p99 {sec(w['p99'])}, "
        f"max {sec(w['max'])} ({rs['cores_welcomed']} of {r['connections']} cores)",
        f"  first byte (CHALLENGE) from the restart: p50 {sec(ch['p50'])}, p99 {sec(ch['p99'])}, "
        f"max {sec(ch['max'])}; connect() -> WELCOME: p50 {sec(cw['p50'])}, "
        f"p99 {sec(cw['p99'])}, max {sec(cw['max'])}; failed attempts (retried): "
        f"{count_text(rs['retries'])}",
        f"  listening -> last WELCOME ({s['seconds']:.2f} s): {_cpu(s)}",
        "  the kernel meanwhile (machine-wide, /proc/net/netstat): "
        + ", ".join(f"{k} {v}" for k, v in rs["tcp"].items()),
        f"resent {rs['resent']} frames above WELCOME's last_seq; {rs['durable_by_welcome']} "
        "frames unACKed at the kill were already stored (covered by last_seq)",
        f"after the restart (incl. resends, {AFTER_S:.0f} s past the last WELCOME): ACK latency "
        f"{_latency(r['latency_ms'])}",
        f"after the drain: {r['frames_acked_total']} frames ACKed after the restart, "
        f"{r['frames_unacked']} never ACKed; NACKs: {count_text(r['nacks'])}; "
        f"errors: {count_text(r['errors'])}",
        f"generator: before the kill {_behind(r['lag_before_ms'])}; after the restart "
        f"{_behind(r['lag_ms'])}",
        f"WAL of the stopped daemon: {c['records']} records; "
        f"{c['frames_acked_before_kill']} frames ACKed before the kill, "
        f"{c['lost_acked_before_kill']} of them missing; "
        f"{c['lost_acked_after_restart']} ACKed after the restart missing; "
        f"{c['stored_twice']} stored twice",
    ]
    return "\n".join(lines)
