"""bench fleet: the daemon under scripts/fleet, the fleet shape (N cores, one frame per
send each, --rate in all, phases spread).

A daemon on a temp data dir with N identities, scripts/fleet against it
for --duration, and the daemon measured over the timed phase from /proc: CPU of
the daemon with its threads and children (in all and per ACKed frame), RSS, and
its commits from the stats snapshot; beside them the generator's CPU and the rest
of the machine's. What both fleet modes share (the generator's command, the CPU
split of a phase, the head of the summary) is here too.
"""

from __future__ import annotations

import argparse
import time
from contextlib import AbstractContextManager
from pathlib import Path

from .harness import Daemon, bench_daemon, stats_snapshot
from .loadchild import LoadChild, Mark, generator_command, watch
from .procfs import children, memory_kib
from .report import P999, count_text, emit, figure, quantiles

FLEET = Path(__file__).resolve().parent.parent / "fleet"
SET_UP_S = 300.0  # handshakes and pre-building, at most


FIRST_USE = "trust_on_first_use = true\n"  # --first-use: the daemon's [auth]


def fleet_daemon(args: argparse.Namespace) -> AbstractContextManager[Daemon]:
    """bench_daemon for the fleet modes: --config-extra, and with --first-use a daemon
    that trusts on first use (fleet_command has the cores send fingerprints)."""
    return bench_daemon(args, extra=args.config_extra, auth=FIRST_USE if args.first_use else "")


def fleet_command(daemon: Daemon, args: argparse.Namespace, *extra: str) -> list[str]:
    if args.first_use:
        extra += ("--fingerprints",)
    return generator_command(FLEET, daemon, args, "--rate", str(args.rate), *extra)


def phase_cpu(a: Mark, b: Mark) -> dict:
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


def _kib(n: int | None) -> str:
    return figure(None if n is None else n / 1024, "KiB", 0)


def _subscribers(before: dict, after: dict, seconds: float) -> dict:
    """Each subscriber's records/s over the timed phase and how far behind the log it was
    at its end (with --config-extra [subscribers.*] tables): does it keep up?"""
    out = {}
    for name, sub in after.get("subscribers", {}).items():
        start = before.get("subscribers", {}).get(name, {})
        out[name] = {
            "records_per_s": (sub.get("records", 0) - start.get("records", 0)) / seconds,
            "lag_bytes_at_start": start.get("lag_bytes"),
            "lag_bytes": sub.get("lag_bytes"),
        }
    return out


# -- the run ------------------------------------------------------------------------------------


def fleet(args: argparse.Namespace) -> dict:
    """One run: data dir, daemon, scripts/fleet, stop."""
    with fleet_daemon(args) as daemon:
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
        phase = phase_cpu(start, end)
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
        result["subscribers"] = _subscribers(snaps["start"], snaps["end"], phase["seconds"])
        result["daemon"]["exit_code"] = daemon.stop()
        return result


def latency_text(lat: dict) -> str:
    return f"{quantiles(lat, 'ms', keys=P999)} ({lat['samples']} frames)"


def head_text(r: dict) -> str:
    return (
        f"{r['connections']} cores, {r['rate']:,.0f} frames/s in all (one frame every "
        f"{1000 * r['period_s']:.1f} ms per core, phases spread), {r['mac']}, "
        f"{r['payload']} B payload ({r['frame_bytes']} B frames), "
        f"{r['procs']} generator process(es)"
    )


def behind_text(lag: dict) -> str:
    """How far the generator's sends fell behind their schedule."""
    return (
        f"behind its schedule {quantiles(lag, 'ms')}, {lag['late']} of {lag['samples']} "
        f"frames more than {lag['late_ms']:.0f} ms late"
    )


def cpu_text(phase: dict) -> str:
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
        f"fleet: {head_text(r)}",
        f"set-up: handshakes {r['handshake_s']:.2f} s, {r['prebuilt_frames']} frames pre-built "
        f"in {r['prebuild_s']:.2f} s",
        f"timed phase {r['duration_s']:.2f} s: {r['frames_sent_timed']} frames sent, "
        f"{r['frames_acked']} ACKed -> {r['acked_per_s']:,.0f} frames/s ACKed",
        f"ACK latency, every frame from its send to the ACK covering it: "
        f"{latency_text(r['latency_ms'])}",
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
        + f" frames each); commit (write + fdatasync) p50 {figure(d['commit_p50_ms'], 'ms')}, "
        f"p99 {figure(d['commit_p99_ms'], 'ms')} (its last 1024 commits)",
        f"generator: {behind_text(r['lag_ms'])}"
        + (f"; {r['frames_blocked']} waited for a full send buffer" if r["frames_blocked"] else ""),
        cpu_text(m),
    ]
    if r["subscribers"]:
        lines.append(
            "subscribers (their CPU is in the daemon's): "
            + "; ".join(
                f"{name} {s['records_per_s']:,.0f} records/s, "
                f"{_kib(s['lag_bytes_at_start'])} -> {_kib(s['lag_bytes'])} behind"
                for name, s in r["subscribers"].items()
            )
        )
    if d["exit_code"] != 0:
        lines.append(f"warning: the daemon exited with {d['exit_code']} on SIGTERM")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """bench fleet: the run and its summary; 1 if the daemon did not stop cleanly."""
    result = fleet(args)
    emit(result, args.json, fleet_summary)
    return 1 if result["daemon"]["exit_code"] != 0 else 0
