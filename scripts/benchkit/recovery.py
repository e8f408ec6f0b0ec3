"""bench recovery: fill the store with --fill-gib GiB of frames (100 connections,
1 KiB payloads unless given), SIGKILL the daemon while flood is still
sending, restart it and time the restart up to its "listening on" line;
checks that every ACKed frame was recovered and that the restarted daemon
stores and ACKs new frames.
"""

from __future__ import annotations

import argparse
import math
import re
import tempfile
import time
from pathlib import Path

from appliance.store import meta

from .errors import BenchError
from .harness import RECOVERED, Daemon, bench_daemon, stats_snapshot
from .load import flood_command
from .loadchild import LoadChild
from .procfs import free_bytes, machine_busy_seconds, tree_cpu_seconds
from .report import GiB, MiB, emit
from .wal import FREE_FACTOR, evict_wal, log_between, record_bytes, wal_usage

FRAMES_STORED = re.compile(r"listening on .*?(\d+) frames stored\)")
CONNECTIONS = 100  # the default --connections
PAYLOAD = 1024  # the default --payload
MAX_S = 300.0  # the whole run, by default (--max-seconds)
RESTART_RESERVE = 60.0  # of which the restart and the check after it may take this much
FILL_POLL = 0.1  # how often the fill looks at the store
CHECK_FRAMES = 10  # frames sent to the restarted daemon


def main(args: argparse.Namespace) -> int:
    """bench recovery: the run, its summary; 1 if an ACKed frame was lost or the restarted
    daemon did not take new frames."""
    result = recovery(args)
    emit(result, args.json, recovery_summary)
    bad = result["acked_check"]["identities_short"] or not result["accepts"]["ok"]
    return 1 if bad or result["exit_code"] != 0 else 0


def fill_and_kill(daemon: Daemon, args: argparse.Namespace, fill: int, deadline: float) -> dict:
    """Load the daemon until its WAL holds `fill` bytes of durable records, then SIGKILL it
    while flood is still sending; returns the figures of the fill."""
    pid = daemon.proc.pid
    record = record_bytes(args.payload)
    prebuilt_mib = max(16, min(1024, math.ceil(1.1 * fill / MiB)))
    fill_args = argparse.Namespace(
        **dict(vars(args), duration=round(deadline - time.monotonic() - 10, 1), rate=0, frames=0)
    )
    if fill_args.duration < 10:
        raise BenchError("no time left for the fill")
    flood = LoadChild(
        flood_command(daemon, fill_args, "--acked-seqs", "--max-prebuilt-mib", str(prebuilt_mib)),
        "flood",
    )

    def mark() -> tuple[float, float, float, float]:
        return (
            time.monotonic(),
            tree_cpu_seconds(pid),
            tree_cpu_seconds(flood.proc.pid),
            machine_busy_seconds(),
        )

    try:
        marks = {}
        snap = None
        while "kill" not in marks:
            if time.monotonic() > deadline:
                stored = 0 if snap is None else snap["wal"]["frames_stored"] * record
                raise BenchError(
                    f"the fill reached {stored / GiB:.2f} of {fill / GiB:.2f} GiB in time"
                )
            daemon.check_alive()
            for word in flood.words(FILL_POLL if "start" in marks else 0.05):
                marks[word] = mark()
            if flood.closed or "end" in marks:
                raise BenchError("flood stopped before the fill was done")
            if "start" not in marks:
                continue
            snap = stats_snapshot(daemon.data_dir)
            durable = snap["wal"]["frames_stored"] * record - snap["ring"]["pending_bytes"]
            if durable >= fill:
                marks["kill"] = mark()
                daemon.proc.kill()  # SIGKILL, mid-stream
                daemon.proc.wait()
        # flood ends by itself once the daemon has closed all its connections
        result = flood.result(60)
    except BaseException:
        flood.kill()
        raise
    (t0, cpu0, flood0, busy0), (t1, cpu1, flood1, busy1) = marks["start"], marks["kill"]
    wall = t1 - t0
    daemon_pct = 100 * (cpu1 - cpu0) / wall
    flood_pct = 100 * (flood1 - flood0) / wall
    frames = snap["wal"]["frames_stored"]
    return {
        "frame_bytes": result["frame_bytes"],
        "seconds": wall,
        "frames_stored": frames,
        "record_bytes_stored": frames * record,
        "pending_bytes": snap["ring"]["pending_bytes"],
        "mib_per_s": frames * record / wall / MiB,
        "frames_per_s": frames / wall,
        "rate_at_kill": snap["rate"],  # the daemon's frames/s over its last seconds
        "flood_sending_at_kill": "end" not in marks,
        "daemon_cpu_pct": daemon_pct,
        "flood_cpu_pct": flood_pct,
        "others_cpu_pct": max(0.0, 100 * (busy1 - busy0) / wall - daemon_pct - flood_pct),
        "prebuilt_mib": prebuilt_mib,
        "flood": {
            k: result[k]
            for k in (
                "frames_sent",
                "frames_acked_total",
                "closed_by_server",
                "prebuilt_frames",
                "late_built_frames",
                "handshake_s",
                "prebuild_s",
            )
        },
        "acked_seqs": result["acked_seqs"],
    }


def recovery(args: argparse.Namespace) -> dict:
    """Fill, SIGKILL, restart: the --recovery run."""
    fill = int(args.fill_gib * GiB)
    base = Path(args.workdir or tempfile.gettempdir())
    free = free_bytes(base)
    if free < FREE_FACTOR * fill:
        raise BenchError(
            f"{base} has {free / GiB:.1f} GiB free; a {args.fill_gib} GiB fill needs "
            f"{FREE_FACTOR * fill / GiB:.1f} GiB ({FREE_FACTOR}x)"
        )
    deadline = time.monotonic() + args.max_seconds
    with bench_daemon(args, extra=args.config_extra) as daemon:
        segment_bytes = stats_snapshot(daemon.data_dir)["wal"]["bytes_on_disk"]  # one, empty
        out = {
            "mode": "recovery",
            "fill_bytes": fill,
            "connections": args.connections,
            "payload": args.payload,
            "mac": args.mac,
            "window": args.window,
            "procs": args.procs,
            "frame_bytes": None,
            "record_bytes": record_bytes(args.payload),
            "segment_bytes": segment_bytes,
        }
        out["fill"] = fill_and_kill(daemon, args, fill, deadline - RESTART_RESERVE)
        acked = out["fill"].pop("acked_seqs")
        out["frame_bytes"] = out["fill"].pop("frame_bytes")
        killed = meta.read(daemon.wal / meta.STORE_META)  # the killed daemon's last checkpoint
        if args.cold_cache:
            out["evicted_mib"] = evict_wal(daemon.wal) / 1024
        t = time.monotonic()
        daemon.start("daemon-restart.log", max(1.0, deadline - time.monotonic() - 10))
        out["restart_s"] = time.monotonic() - t
        log = daemon.log()
        logged = RECOVERED.search(log)
        out["recovered_in_logged_s"] = float(logged[1]) if logged else None
        listening = FRAMES_STORED.search(log)
        out["frames_in_listening_line"] = int(listening[1]) if listening else None
        out["cold_cache"] = args.cold_cache
        # e.g. a torn tail: SIGKILL can cut the committer's pwrite short at a page boundary
        out["restart_warnings"] = [
            line for line in log.splitlines() if re.search(r"level=(warning|error)", line)
        ]
        state = meta.read(daemon.wal / meta.STORE_META)  # rewritten by the restarted daemon
        snap = stats_snapshot(daemon.data_dir)
        out["recovered"] = dict(
            wal_usage(daemon.wal),
            frames=state["frames"],
            checkpoint=state["checkpoint"],
            recovery_seconds=snap["wal"]["recovery_seconds"],
            rss_mib=snap["process"]["rss_bytes"] / MiB,
        )
        out["recovered"]["record_bytes"] = state["frames"] * out["record_bytes"]
        out["recovered"]["checkpoint_at_kill"] = killed["checkpoint"]
        out["recovered"]["frames_at_checkpoint"] = killed["frames"]
        out["recovered"]["scanned_bytes"] = log_between(
            daemon.wal, killed["checkpoint"], state["checkpoint"]
        )
        # every frame ACKed before the kill must be in the recovered replay window
        last_seq = state["last_seq"]
        lost = {i: (s, last_seq.get(i, 0)) for i, s in acked.items() if last_seq.get(i, 0) < s}
        out["acked_check"] = {
            "identities": len(acked),
            "frames_acked": out["fill"]["flood"]["frames_acked_total"],
            "identities_short": len(lost),
            "examples": dict(list(lost.items())[:5]),
        }
        out["accepts"] = check_accepts(daemon, args, last_seq)
        code = daemon.stop()
        out["exit_code"] = code
        if code != 0:
            out["stop_error"] = daemon.last_log_line()
        return out


def check_accepts(daemon: Daemon, args: argparse.Namespace, last_seq: dict[str, int]) -> dict:
    """One connection to the restarted daemon: WELCOME, CHECK_FRAMES frames sent and ACKed."""
    check_args = argparse.Namespace(
        **dict(vars(args), connections=1, frames=CHECK_FRAMES, duration=5, rate=0, idle=False)
    )
    flood = LoadChild(flood_command(daemon, check_args, "--acked-seqs"), "flood")
    try:
        result = flood.result(30)
    except BaseException:
        flood.kill()
        raise
    ident, seq = next(iter(result["acked_seqs"].items()))
    return {
        "identity": ident,
        "handshake_s": result["handshake_s"],
        "frames_acked": result["frames_acked_total"],
        "recovered_last_seq": last_seq.get(ident, 0),
        "last_acked_seq": seq,
        "ok": result["frames_acked_total"] == CHECK_FRAMES
        and seq == last_seq.get(ident, 0) + CHECK_FRAMES,
    }


# -- output ------------------------------------------------------------------------------------


def recovery_summary(r: dict) -> str:
    f, rec, acc, chk = r["fill"], r["recovered"], r["accepts"], r["acked_check"]
    fl = f["flood"]
    lines = [
        f"recovery: {r['connections']} connections, {r['mac']}, {r['payload']} B payloads "
        f"({r['record_bytes']} B records), window {r['window']}, "
        f"segments of {r['segment_bytes'] / MiB:.0f} MiB",
        f"fill: the daemon took {f['frames_stored']} frames "
        f"({f['record_bytes_stored'] / GiB:.3f} GiB of records, all but the ring's last "
        f"{f['pending_bytes'] / MiB:.1f} MiB durable) in {f['seconds']:.1f} s "
        f"({f['frames_per_s']:,.0f} frames/s, {f['mib_per_s']:.0f} MiB/s; "
        f"daemon CPU {f['daemon_cpu_pct']:.0f}%, flood {f['flood_cpu_pct']:.0f}%, "
        f"others {f['others_cpu_pct']:.0f}%)",
        f"SIGKILL while flood was {'still sending' if f['flood_sending_at_kill'] else 'DONE'} "
        f"(the daemon's rate then: {f['rate_at_kill']:,.0f} frames/s); flood had sent "
        f"{fl['frames_sent']} frames, {fl['frames_acked_total']} ACKed "
        f"({fl['prebuilt_frames']} pre-built, {fl['late_built_frames']} built while sending)",
    ]
    if r.get("evicted_mib") is not None:
        lines.append(
            f"cold cache: the segments were written out and dropped from the page cache "
            f"(the machine's page cache shrank by {r['evicted_mib']:.0f} MiB)"
        )
    logged = r["recovered_in_logged_s"]
    lines += [
        f"restart -> 'listening on': {r['restart_s']:.3f} s; the daemon logged "
        f"'store: recovered in {logged:.3f} s'"
        if logged is not None
        else f"restart -> 'listening on': {r['restart_s']:.3f} s (no 'recovered in' line)",
        *(f"the restarted daemon logged: {line}" for line in r["restart_warnings"]),
        f"recovered: {rec['frames']} frames ({rec['record_bytes'] / GiB:.3f} GiB of records), "
        f"{rec['segments']} segments, {rec['bytes_on_disk'] / GiB:.3f} GiB on disk, "
        f"{rec['log_bytes'] / GiB:.3f} GiB of log in them; RSS {rec['rss_mib']:.1f} MiB",
        f"recovery read from the killed daemon's last checkpoint {rec['checkpoint_at_kill']} "
        f"({rec['frames_at_checkpoint']} frames) to the tail {rec['checkpoint']}: "
        f"{rec['scanned_bytes'] / MiB:.1f} MiB, "
        f"{rec['frames'] - rec['frames_at_checkpoint']} frames",
        f"ACKed before the kill: {chk['frames_acked']} frames over {chk['identities']} "
        f"identities; recovered {rec['frames'] - chk['frames_acked']} more than ACKed; "
        + (
            "every identity's ACKed seq is in the recovered replay window"
            if not chk["identities_short"]
            else f"LOST: {chk['identities_short']} identities short, e.g. {chk['examples']}"
        ),
        f"after the restart: a connection was accepted (handshake {acc['handshake_s']:.3f} s), "
        f"{acc['frames_acked']} of {CHECK_FRAMES} new frames ACKed, seqs "
        f"{acc['recovered_last_seq'] + 1}..{acc['last_acked_seq']} "
        + ("(continuing the recovered last_seq): ok" if acc["ok"] else "NOT as expected"),
    ]
    if r["exit_code"] != 0:
        lines.append(f"warning: the restarted daemon exited with {r['exit_code']} on SIGTERM")
    return "\n".join(lines)
