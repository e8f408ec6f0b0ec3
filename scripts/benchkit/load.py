"""bench load, idle and matrix: the daemon under scripts/flood (the blast shape: a few
connections, each with up to --window frames in flight; paced with --rate).

Each run: a fresh data dir with N core identities (one registry write), a
daemon on 127.0.0.1:0 (idle timeout off), flood as a subprocess, and the
daemon's CPU (utime + stime of it and its children, such as the store's writer,
from /proc/PID/stat over flood's timed phase) and
memory (VmRSS sampled every RSS_EVERY s, VmHWM at the end) measured from
/proc. The daemon is stopped with SIGTERM and the data dir removed (--keep
keeps it). flood and the daemon share the machine's cores: read the CPU
figures beside the throughput.

Every load run also reports the store: commits in the timed phase and the
commit time (write + fdatasync) p50/p99 from the daemon's stats snapshot
(data_dir/stats.sock), and the bytes written per ACKed frame from the start
of the timed phase to the end of flood's drain: write_bytes and wchar from
/proc/PID/io (the daemon's and its children's), the growth of the WAL measured in
its files, and the writes to
the data dir's block device (whole machine, file system journal included).

idle: N connections authenticated and idle; reports the daemon's RSS once
they are all up. matrix: 1, 100 and 1000 connections, hmac-sha256, 64-byte
payloads, one table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _loadlib import summary_lines

from .harness import Daemon, bench_daemon, stats_snapshot
from .loadchild import LoadChild, generator_command, watch
from .procfs import block_device, device_bytes_written, memory_kib, proc_io
from .report import emit, figure, num, table
from .wal import record_bytes, wal_usage

FLOOD = Path(__file__).resolve().parent.parent / "flood"
MATRIX = (1, 100, 1000)


# -- flood -------------------------------------------------------------------------------------


def flood_command(daemon: Daemon, args: argparse.Namespace, *extra: str) -> list[str]:
    cmd = generator_command(
        FLOOD, daemon, args, "--rate", str(args.rate), "--window", str(args.window), *extra
    )
    if args.frames:
        cmd += ["--frames", str(args.frames)]
    if args.idle:
        cmd.append("--idle")
    return cmd


# -- one run -------------------------------------------------------------------------------


def store_probe(daemon: Daemon, device: str | None) -> dict:
    """What the daemon has written so far, and its stats snapshot."""
    return {
        "io": proc_io(daemon.proc.pid),
        "device": device_bytes_written(device),
        "stats": stats_snapshot(daemon.data_dir),
    }


def store_figures(result: dict, probes: dict, wal0: dict, wal1: dict, device: str | None) -> None:
    """result["store"] and result["disk"] from the probes at "start", "end" and after the drain."""
    s0, s1 = probes["start"]["stats"]["wal"], probes["end"]["stats"]["wal"]
    commits = s1["commits"] - s0["commits"]
    timed = max(result["duration_s"], 1e-9)
    result["store"] = {
        "commits": commits,
        "commits_per_s": commits / timed,
        "frames_per_commit": result["frames_acked"] / commits if commits else None,
        # the daemon keeps the times of its last 1024 commits: these are the timed phase's last
        "commit_p50_ms": s1["commit_p50_ms"],
        "commit_p99_ms": s1["commit_p99_ms"],
        "commit_samples": min(s1["commits"], 1024),
    }
    io0, io1, io2 = (probes[k]["io"] for k in ("start", "end", "drained"))
    frames = result["frames_acked_total"]
    dev0, dev2 = probes["start"]["device"], probes["drained"]["device"]

    def per_frame(value: int | None) -> float | None:
        return None if value is None or not frames else value / frames

    disk = {
        "frame_bytes": result["frame_bytes"],
        "record_bytes": record_bytes(result["payload"]),
        "frames": frames,
        "write_bytes": io2["write_bytes"] - io0["write_bytes"],
        "cancelled_write_bytes": io2["cancelled_write_bytes"] - io0["cancelled_write_bytes"],
        "wchar": io2["wchar"] - io0["wchar"],
        "wal_log_bytes": wal1["log_bytes"] - wal0["log_bytes"],
        "device": device,
        "device_bytes": None if dev0 is None else dev2 - dev0,
        # start -> end of the timed phase only; frames still in flight then were already
        # written but not yet ACKed, so per ACKed frame this reads high
        "write_bytes_timed": io1["write_bytes"] - io0["write_bytes"],
        "wchar_timed": io1["wchar"] - io0["wchar"],
    }
    for key in ("write_bytes", "wchar", "wal_log_bytes", "device_bytes"):
        disk[f"{key}_per_frame"] = per_frame(disk[key])
    result["disk"] = disk


def run_flood(daemon: Daemon, args: argparse.Namespace) -> dict:
    """Run flood against the daemon, sampling the daemon's CPU and memory; returns the figures."""
    pid = daemon.proc.pid
    device = block_device(daemon.data_dir)
    # no frame is stored before the timed phase: the WAL read now is its start
    wal0 = None if args.idle else wal_usage(daemon.wal)
    probes: dict[str, dict] = {}

    def probe(word: str) -> None:
        if not args.idle:
            probes[word] = store_probe(daemon, device)

    # set-up (handshakes, pre-building), timed phase, drain, and a margin
    deadline = time.monotonic() + args.duration + 300
    watched = watch(daemon, LoadChild(flood_command(daemon, args), "flood"), deadline, probe)
    result, rss_max, rss_timed_max = watched.result, watched.rss_max_kib, watched.rss_timed_max_kib
    mem = memory_kib(pid)
    start, end = watched.marks["start"], watched.marks["end"]
    t0, cpu0, busy0, rss_up = start.t, start.daemon_cpu, start.busy_s, start.rss_kib
    t1, cpu1, busy1 = end.t, end.daemon_cpu, end.busy_s
    wall = max(t1 - t0, 1e-9)
    user_pct = 100 * (cpu1[0] - cpu0[0]) / wall
    system_pct = 100 * (cpu1[1] - cpu0[1]) / wall
    # with its children: the store's writer process does the writes and fdatasyncs
    daemon_pct = 100 * (end.daemon_tree_s - start.daemon_tree_s) / wall
    # everything else on the machine: another run here skews the figures
    result["others_cpu_pct"] = max(
        0.0, 100 * (busy1 - busy0) / wall - daemon_pct - result["flood_cpu_pct"]
    )
    result["daemon"] = {
        "cpu_pct": daemon_pct,
        "cpu_user_pct": user_pct,
        "cpu_system_pct": system_pct,
        "rss_mib_at_start": rss_up / 1024,
        "rss_mib_timed_max": max(rss_timed_max, rss_up) / 1024,
        "rss_mib_max_sampled": max(rss_max, rss_up) / 1024,
        # VmHWM can lag VmRSS a little (the kernel syncs RSS counters lazily)
        "hwm_mib": max(mem["VmHWM"], rss_max, rss_up) / 1024,
    }
    if not args.idle:
        probes["drained"] = store_probe(daemon, device)  # flood has exited: all is ACKed
        store_figures(result, probes, wal0, wal_usage(daemon.wal), device)
    return result


def one_run(args: argparse.Namespace) -> dict:
    """One complete run: data dir, daemon, flood, stop."""
    with bench_daemon(args, extra=args.config_extra) as daemon:
        result = run_flood(daemon, args)
        code = daemon.stop()
        result["daemon"]["exit_code"] = code
        if code != 0:  # the figures stand; the failed stop is reported beside them
            result["daemon"]["stop_error"] = daemon.last_log_line()
        return result


# -- output ------------------------------------------------------------------------------------


def stop_warning(result: dict) -> str | None:
    d = result["daemon"]
    if d["exit_code"] == 0:
        return None
    return f"warning: the daemon exited with {d['exit_code']} on SIGTERM: {d.get('stop_error')}"


WRITE_BYTES_NOTE = (
    "note: write_bytes is charged when the daemon (any thread, or a child such as the store's\n"
    "  writer) dirties page cache: once per page, or per larger folio, until it is written\n"
    "  back; it is not the block I/O itself.\n"
    "  The file system's journal and extent conversions are written by kernel threads and\n"
    "  are not in it; the device figure has them but counts every process on the machine\n"
    "  (an upper bound). wchar: bytes passed to write(2), pwrite(2) and the like (WAL,\n"
    "  store.meta, log lines), written out or not; send(2) on sockets is not in it."
)


def store_lines(result: dict) -> list[str]:
    st, disk = result["store"], result["disk"]
    lines = [
        f"store: {st['commits']} commits in the timed phase ({st['commits_per_s']:,.0f}/s, "
        f"{num(st['frames_per_commit'], 1)} frames each); commit (write + fdatasync) "
        f"p50 {figure(st['commit_p50_ms'], 'ms')}, p99 {figure(st['commit_p99_ms'], 'ms')} "
        f"(the last {st['commit_samples']} commits)",
        f"written per ACKed frame ({disk['frames']} frames, timed phase + drain): "
        f"write_bytes {figure(disk['write_bytes_per_frame'], 'B', 1)}, "
        f"WAL growth {figure(disk['wal_log_bytes_per_frame'], 'B', 1)}, "
        f"wchar {figure(disk['wchar_per_frame'], 'B', 1)}, "
        f"device {disk['device'] or '-'} {figure(disk['device_bytes_per_frame'], 'B', 1)} "
        "(whole machine); "
        f"the frame is {disk['frame_bytes']} B on the wire, its record {disk['record_bytes']} B",
    ]
    if disk["frames"] and not disk["write_bytes"]:
        lines.append(
            "note: write_bytes is 0 here (no per-process block I/O accounting): "
            "use the WAL growth, measured in the segment files"
        )
    return lines


def summary(result: dict) -> str:
    d = result["daemon"]
    lines = summary_lines(result)
    if result["mode"] == "idle":
        lines.append(
            f"daemon: RSS {d['rss_mib_at_start']:.1f} MiB with all {result['connections']} "
            f"connections up, {d['rss_mib_timed_max']:.1f} MiB max while idle, "
            f"peak (VmHWM) {d['hwm_mib']:.1f} MiB; CPU {d['cpu_pct']:.0f}% while idle"
        )
    else:
        lines.append(
            f"daemon: CPU {d['cpu_pct']:.0f}% over the timed phase (100% = one core; with its "
            f"children; main process user {d['cpu_user_pct']:.0f}%, "
            f"system {d['cpu_system_pct']:.0f}%), "
            f"RSS peak (VmHWM) {d['hwm_mib']:.1f} MiB"
        )
    lines.append(f"other processes on the machine: CPU {result['others_cpu_pct']:.0f}%")
    if result["mode"] != "idle":
        lines += store_lines(result)
        lines.append(WRITE_BYTES_NOTE)
    warning = stop_warning(result)
    if warning:
        lines.append(warning)
    return "\n".join(lines)


def matrix_table(results: list[dict]) -> str:
    head = (
        "conns",
        "frames/s ACKed",
        "ACK p50 ms",
        "ACK p99 ms",
        "commit p50 ms",
        "commit p99 ms",
        "write_bytes/frame",
        "WAL B/frame",
        "daemon CPU%",
        "daemon RSS MiB",
        "flood CPU%",
        "others CPU%",
    )
    rows = [head]
    for r in results:
        lat, st, disk = r["latency_ms"], r["store"], r["disk"]
        rows.append(
            (
                str(r["connections"]),
                f"{r['acked_per_s']:,.0f}",
                num(lat["p50"]) if lat["samples"] else "-",
                num(lat["p99"]) if lat["samples"] else "-",
                num(st["commit_p50_ms"]),
                num(st["commit_p99_ms"]),
                num(disk["write_bytes_per_frame"], 1),
                num(disk["wal_log_bytes_per_frame"], 1),
                f"{r['daemon']['cpu_pct']:.0f}",
                f"{r['daemon']['hwm_mib']:.1f}",
                f"{r['flood_cpu_pct']:.0f}",
                f"{r['others_cpu_pct']:.0f}",
            )
        )
    disk = results[0]["disk"]
    lines = [
        table(rows),
        f"frames are {disk['frame_bytes']} B on the wire, records {disk['record_bytes']} B in the "
        "WAL; bytes per frame from the start of the timed phase to the end of the drain, "
        "over every ACKed frame",
    ]
    for r in results:
        conns = f"{r['connections']} connection{'s' if r['connections'] != 1 else ''}"
        disk = r["disk"]
        lines.append(f"{conns}: " + store_lines(r)[0].removeprefix("store: "))
        lines.append(
            f"{conns}: wchar {figure(disk['wchar_per_frame'], 'B/frame', 1)}, device "
            f"{disk['device'] or '-'} {figure(disk['device_bytes_per_frame'], 'B/frame', 1)} "
            "(whole machine)"
        )
    lines.append(WRITE_BYTES_NOTE)
    return "\n".join(lines)


# -- the subcommands ---------------------------------------------------------------------------


def load(args: argparse.Namespace) -> int:
    """bench load and bench idle: one run, its summary."""
    result = one_run(args)
    emit(result, args.json, summary)
    return 1 if stop_warning(result) else 0


def matrix(args: argparse.Namespace) -> int:
    """bench matrix: a run for each of MATRIX connections, one table."""
    results = []
    for n in MATRIX:
        run_args = argparse.Namespace(
            **dict(vars(args), connections=n, mac="hmac-sha256", payload=64, idle=False)
        )
        results.append(one_run(run_args))
        if not args.json:
            print(f"done: {n} connections", file=sys.stderr)
    emit({"matrix": results}, args.json, lambda r: matrix_table(r["matrix"]))
    warnings = [w for w in map(stop_warning, results) if w]
    for warning in warnings:
        print(f"bench: {warning}", file=sys.stderr)
    return 1 if warnings else 0
