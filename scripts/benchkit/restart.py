"""bench fleet-restart: the cores stream in the fleet shape for --duration; the daemon
is killed (SIGKILL) and started again on the same data dir and port; once it
listens, every core reconnects at once and resends what WELCOME's last_seq does
not cover. Reports when each core had its WELCOME again (from the restart), and
checks the stopped daemon's WAL: every frame ACKed before the kill is stored,
none twice.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

from appliance.store.reader import read_records
from appliance.telemetry.figures import percentile

from .errors import BenchError
from .fleet import (
    SET_UP_S,
    behind_text,
    cpu_text,
    fleet_command,
    fleet_daemon,
    head_text,
    latency_text,
    phase_cpu,
)
from .harness import RECOVERED, Daemon
from .loadchild import LoadChild, mark
from .procfs import tcp_counters
from .report import count_text, emit, quantiles

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
    """One run: stream, SIGKILL, restart, reconnect, check the WAL."""
    with fleet_daemon(args) as daemon:
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
    result["before"] = phase_cpu(marks["start"], marks["kill"])
    result["storm"] = phase_cpu(marks["listening"], marks["welcomed"])
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

    recovered = rs["recovered_in_logged_s"]
    lines = [
        f"fleet restart: {head_text(r)}",
        f"before the kill ({b['seconds']:.1f} s of streaming): ACK latency "
        f"{latency_text(r['latency_before_ms'])}; {cpu_text(b)}",
        f"SIGKILL, restart on the same data dir and port: 'listening on' after "
        f"{rs['listening_s']:.3f} s"
        + (f" (the store recovered in {recovered:.3f} s)" if recovered is not None else "")
        + "; then every core reconnected at once",
        f"WELCOME again, per core, from the restart: {quantiles(w, 's', 3)} "
        f"({rs['cores_welcomed']} of {r['connections']} cores)",
        f"  first byte (CHALLENGE) from the restart: {quantiles(ch, 's', 3)}; "
        f"connect() -> WELCOME: {quantiles(cw, 's', 3)}; failed attempts (retried): "
        f"{count_text(rs['retries'])}",
        f"  listening -> last WELCOME ({s['seconds']:.2f} s): {cpu_text(s)}",
        "  the kernel meanwhile (machine-wide, /proc/net/netstat): "
        + ", ".join(f"{k} {v}" for k, v in rs["tcp"].items()),
        f"resent {rs['resent']} frames above WELCOME's last_seq; {rs['durable_by_welcome']} "
        "frames unACKed at the kill were already stored (covered by last_seq)",
        f"after the restart (incl. resends, {AFTER_S:.0f} s past the last WELCOME): ACK latency "
        f"{latency_text(r['latency_ms'])}",
        f"after the drain: {r['frames_acked_total']} frames ACKed after the restart, "
        f"{r['frames_unacked']} never ACKed; NACKs: {count_text(r['nacks'])}; "
        f"errors: {count_text(r['errors'])}",
        f"generator: before the kill {behind_text(r['lag_before_ms'])}; after the restart "
        f"{behind_text(r['lag_ms'])}",
        f"WAL of the stopped daemon: {c['records']} records; "
        f"{c['frames_acked_before_kill']} frames ACKed before the kill, "
        f"{c['lost_acked_before_kill']} of them missing; "
        f"{c['lost_acked_after_restart']} ACKed after the restart missing; "
        f"{c['stored_twice']} stored twice",
    ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """bench fleet-restart: the run and its summary; 1 (with the reason on stderr) if the
    check of the WAL, the WELCOMEs or the drain failed."""
    result = fleet_restart(args)
    emit(result, args.json, restart_summary)
    failure = restart_failure(result)
    if failure:
        print(f"bench: {failure}", file=sys.stderr)
    return 1 if failure else 0
