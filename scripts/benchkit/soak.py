"""bench soak MINUTES: full load (unpaced, 100 connections unless given) against one
daemon for that long; its RSS, frames/s, commit time and the CPU split are
sampled every EVERY s. One flood run covers the whole soak: it pre-builds
PREBUILT_MIB of frames and builds the rest in small chunks as it goes,
so its memory stays flat and the load has no gaps.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

from .errors import BenchError
from .harness import bench_daemon, stats_snapshot
from .load import flood_command
from .loadchild import LoadChild
from .procfs import free_bytes, machine_busy_seconds, memory_kib, tree_cpu_seconds
from .report import GiB, MiB, emit, num, table
from .wal import FREE_FACTOR

CONNECTIONS = 100  # the default --connections
EVERY = 10.0
PREBUILT_MIB = 64
RETENTION = GiB  # the soak's daemon deletes the oldest segments beyond this


def main(args: argparse.Namespace) -> int:
    """bench soak: the run and its summary; 1 if the daemon did not stop cleanly."""
    result = soak(args)
    emit(result, args.json, soak_summary)
    return 1 if result["exit_code"] != 0 else 0


def soak(args: argparse.Namespace) -> dict:
    """Full load for args.minutes minutes against one daemon, sampled every EVERY s."""
    duration = args.minutes * 60
    base = Path(args.workdir or tempfile.gettempdir())
    need = FREE_FACTOR * (RETENTION + 2 * 64 * MiB)
    if free_bytes(base) < need:
        raise BenchError(f"{base} has less than {need / GiB:.1f} GiB free")
    with bench_daemon(args, storage=f"retention_bytes = {RETENTION}\n") as daemon:
        pid = daemon.proc.pid
        run_args = argparse.Namespace(**dict(vars(args), duration=duration, rate=0, frames=0))
        flood = LoadChild(
            flood_command(daemon, run_args, "--max-prebuilt-mib", str(PREBUILT_MIB)), "flood"
        )
        samples = []
        deadline = time.monotonic() + duration + 600

        def sample(t0: float) -> None:
            snap = stats_snapshot(daemon.data_dir)
            samples.append(
                {
                    "t": time.monotonic() - t0,
                    "rss_kib": memory_kib(pid)["VmRSS"],
                    "frames": snap["frames"],
                    "commit_p50_ms": snap["wal"]["commit_p50_ms"],
                    "commit_p99_ms": snap["wal"]["commit_p99_ms"],
                    "segments": snap["wal"]["segments"],
                    "daemon_cpu_s": tree_cpu_seconds(pid),
                    "flood_cpu_s": tree_cpu_seconds(flood.proc.pid),
                    "busy_s": machine_busy_seconds(),
                }
            )

        try:
            t0 = None
            ended = False
            while not flood.closed:
                if time.monotonic() > deadline:
                    raise BenchError("flood did not finish in time")
                daemon.check_alive()
                due = None if t0 is None or ended else t0 + len(samples) * EVERY
                wait = 0.5 if due is None else max(0.0, due - time.monotonic())
                words = flood.words(min(wait, 0.5))
                if "start" in words:
                    t0 = time.monotonic()
                    sample(t0)
                if "end" in words:
                    ended = True
                    if time.monotonic() - t0 - samples[-1]["t"] > 1.0:  # a last, short interval
                        sample(t0)
                elif due is not None and time.monotonic() >= due:
                    sample(t0)
                    if not args.json and len(samples) % 6 == 1:
                        print(
                            f"soak: {samples[-1]['t']:.0f} s, "
                            f"RSS {samples[-1]['rss_kib'] / 1024:.1f} MiB",
                            file=sys.stderr,
                        )
            result = flood.result(120)
        except BaseException:
            flood.kill()
            raise
        hwm = memory_kib(pid)["VmHWM"]
        final = stats_snapshot(daemon.data_dir)
        code = daemon.stop()
    series = []
    for a, b in itertools.pairwise(samples):
        dt = b["t"] - a["t"]
        daemon_pct = 100 * (b["daemon_cpu_s"] - a["daemon_cpu_s"]) / dt
        flood_pct = 100 * (b["flood_cpu_s"] - a["flood_cpu_s"]) / dt
        busy_pct = 100 * (b["busy_s"] - a["busy_s"]) / dt
        series.append(
            {
                "t": b["t"],
                "rss_mib": b["rss_kib"] / 1024,
                "frames_per_s": (b["frames"] - a["frames"]) / dt,
                "frames_per_daemon_cpu_s": (b["frames"] - a["frames"])
                / max(b["daemon_cpu_s"] - a["daemon_cpu_s"], 1e-9),
                "commit_p50_ms": b["commit_p50_ms"],
                "commit_p99_ms": b["commit_p99_ms"],
                "segments": b["segments"],
                "daemon_cpu_pct": daemon_pct,
                "flood_cpu_pct": flood_pct,
                "others_cpu_pct": max(0.0, busy_pct - daemon_pct - flood_pct),
            }
        )
    rss = [s["rss_mib"] for s in series]
    half = series[len(series) // 2 :]
    return {
        "mode": "soak",
        "minutes": args.minutes,
        "connections": args.connections,
        "payload": args.payload,
        "mac": args.mac,
        "window": args.window,
        "procs": args.procs,
        "every_s": EVERY,
        "retention_bytes": RETENTION,
        "rss_mib_at_load_start": samples[0]["rss_kib"] / 1024,
        "rss_mib": {
            "first": rss[0] if rss else None,
            "last": rss[-1] if rss else None,
            "min": min(rss, default=None),
            "max": max(rss, default=None),
            "hwm": hwm / 1024,
            # least squares over the second half: what growth would look like once warm
            "slope_mib_per_min_second_half": slope(
                [s["t"] / 60 for s in half], [s["rss_mib"] for s in half]
            ),
        },
        "frames_stored": final["wal"]["frames_stored"],
        "commits": final["wal"]["commits"],
        "flood": {
            k: result[k]
            for k in (
                "frames_sent",
                "frames_acked_total",
                "frames_unacked",
                "acked_per_s",
                "duration_s",
                "flood_cpu_pct",
                "prebuilt_frames",
                "late_built_frames",
                "late_build_s",
                "nacks",
                "errors",
                "closed_by_server",
            )
        },
        "series": series,
        "exit_code": code,
    }


def slope(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else None


# -- output ------------------------------------------------------------------------------------


def soak_summary(r: dict) -> str:
    head = (
        "t s",
        "RSS MiB",
        "frames/s",
        "per daemon CPU-s",
        "commit p50 ms",
        "commit p99 ms",
        "segments",
        "daemon CPU%",
        "flood CPU%",
        "others CPU%",
    )
    rows = [head]
    for s in r["series"]:
        rows.append(
            (
                f"{s['t']:.0f}",
                f"{s['rss_mib']:.1f}",
                f"{s['frames_per_s']:,.0f}",
                f"{s['frames_per_daemon_cpu_s']:,.0f}",
                num(s["commit_p50_ms"]),
                num(s["commit_p99_ms"]),
                str(s["segments"]),
                f"{s['daemon_cpu_pct']:.0f}",
                f"{s['flood_cpu_pct']:.0f}",
                f"{s['others_cpu_pct']:.0f}",
            )
        )
    rss, fl = r["rss_mib"], r["flood"]
    rates = [s["frames_per_s"] for s in r["series"]]
    slope_text = rss["slope_mib_per_min_second_half"]
    return "\n".join(
        [
            f"soak: {r['minutes']} min, {r['connections']} connections, {r['mac']}, "
            f"{r['payload']} B payloads, unpaced, window {r['window']}; the daemon keeps "
            f"{r['retention_bytes'] / GiB:.0f} GiB of WAL (retention_bytes); "
            f"one sample every {r['every_s']:.0f} s (frames/s: the daemon's stored-frame "
            "counter over the interval)",
            table(rows),
            f"RSS: {r['rss_mib_at_load_start']:.1f} MiB when the load started; under load "
            f"first {rss['first']:.1f}, last {rss['last']:.1f}, min {rss['min']:.1f}, "
            f"max {rss['max']:.1f} MiB, peak (VmHWM) {rss['hwm']:.1f} MiB; "
            + (
                f"slope over the second half {slope_text:+.3f} MiB/min"
                if slope_text is not None
                else "too short for a slope"
            ),
            f"frames/s per interval: min {min(rates, default=0):,.0f}, "
            f"max {max(rates, default=0):,.0f}; flood: {fl['frames_acked_total']} frames ACKed "
            f"in {fl['duration_s']:.0f} s ({fl['acked_per_s']:,.0f}/s), "
            f"{fl['frames_unacked']} never ACKed, NACKs {fl['nacks'] or 'none'}, "
            f"errors {fl['errors'] or 'none'}; {fl['prebuilt_frames']} frames pre-built, "
            f"{fl['late_built_frames']} built while sending ({fl['late_build_s']:.0f} s of CPU)",
        ]
        + (
            [f"warning: the daemon exited with {r['exit_code']} on SIGTERM"]
            if r["exit_code"] != 0
            else []
        )
    )
