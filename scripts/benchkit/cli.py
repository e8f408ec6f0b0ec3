"""scripts/bench's command line: one subcommand per mode, each with only its own options;
an option several modes share is defined once, in a parent parser."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from _loadlib import raise_nofile_limit

from appliance.protocol.crypto import MAC_ALGORITHMS

from . import fleet, load, recovery, restart, soak
from .errors import guarded
from .harness import DEFAULT_PYTHON

DESCRIPTION = """\
bench: run module-ingest on a temp data dir, load it with scripts/flood or scripts/fleet,
measure the daemon. Each mode is a subcommand (`scripts/bench MODE --help`); every run
talks to loopback only, stops by itself and removes its temp dir."""

# the flags of the single-parser bench, and the subcommand each became
OLD_MODES = {
    "--fleet-restart": "fleet-restart",
    "--fleet": "fleet",
    "--recovery": "recovery",
    "--matrix": "matrix",
    "--idle": "idle",
    "--soak": "soak",
}


def _in_range(kind: type, low: float, high: float, closed_low: bool = True) -> Callable:
    """An argparse type: `kind` within [low, high] (or (low, high] if not closed_low)."""

    def parse(text: str) -> float:
        value = kind(text)
        if value < low or (value == low and not closed_low) or value > high:
            if high == float("inf"):
                bound = f"at least {low}" if closed_low else f"more than {low}"
            else:
                bound = f"in {'[' if closed_low else '('}{low}, {high}]"
            raise argparse.ArgumentTypeError(f"{text}: must be {bound}")
        return value

    parse.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return parse


def _parents() -> dict[str, argparse.ArgumentParser]:
    """The options several modes share, each defined once."""

    def parent() -> argparse.ArgumentParser:
        return argparse.ArgumentParser(add_help=False)

    out = {name: parent() for name in ("run", "config", "mac", "duration", "procs", "flood")}
    run = out["run"]
    run.add_argument("--json", action="store_true", help="print one JSON object")
    run.add_argument(
        "--workdir", metavar="DIR", help="where the temp data dir goes (default: $TMPDIR)"
    )
    run.add_argument("--keep", action="store_true", help="keep the temp data dir and daemon log")
    run.add_argument(
        "--python",
        default=DEFAULT_PYTHON,
        help="interpreter for the daemon (default: .venv/bin/python if present, else this one)",
    )
    out["config"].add_argument(
        "--config-extra",
        metavar="FILE",
        type=lambda path: "\n" + Path(path).read_text(),
        help="append this TOML to the daemon's config (e.g. [subscribers.NAME] tables)",
    )
    out["mac"].add_argument("--mac", choices=MAC_ALGORITHMS, default="hmac-sha256")
    out["duration"].add_argument(
        "--duration",
        type=_in_range(float, 0, 3600, closed_low=False),
        default=10.0,
        metavar="S",
        help="timed phase (default 10)",
    )
    out["procs"].add_argument(
        "--procs", type=int, default=1, metavar="P", help="load generator (flood, fleet) processes"
    )
    flood = out["flood"]  # flood's own knobs, for the modes that run it timed
    flood.add_argument(
        "--rate", type=float, default=0, metavar="FRAMES_PER_S", help="0 = as fast as possible"
    )
    flood.add_argument(
        "--frames", type=int, default=0, metavar="N", help="stop after N frames (0 = no cap)"
    )
    return out


def _connections(p: argparse.ArgumentParser, default: int) -> None:
    p.add_argument(
        "--connections",
        type=_in_range(int, 1, 100_000),
        default=default,
        metavar="N",
        help=f"default {default}",
    )


def _payload(p: argparse.ArgumentParser, default: int) -> None:
    p.add_argument(
        "--payload", type=int, default=default, metavar="BYTES", help=f"default {default}"
    )


def _window(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--window",
        type=int,
        default=1000,
        metavar="N",
        help="flood's unacked frames per connection",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="mode", required=True, metavar="MODE")
    par = _parents()

    def mode(name: str, run: Callable, text: str, *parents: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name, help=text, description=text, parents=[par[k] for k in (*parents, "run")]
        )
        p.set_defaults(run=run, idle=False)
        return p

    p = mode("load", load.load, "flood against the daemon", "config", "mac", "duration", "procs",
             "flood")  # fmt: skip
    _connections(p, 1)
    _payload(p, 64)
    _window(p)

    p = mode("idle", load.load, "N idle authenticated connections; report RSS", "config", "mac",
             "duration", "procs")  # fmt: skip
    _connections(p, 1)
    # what flood is told besides: these do not matter to idle connections
    p.set_defaults(idle=True, payload=64, rate=0, frames=0, window=1000)

    p = mode("matrix", load.matrix, "1, 100, 1000 connections, hmac-sha256, 64 B", "config",
             "duration", "procs", "flood")  # fmt: skip
    _window(p)
    p.set_defaults(connections=max(load.MATRIX))  # for the file descriptor check

    for name, run, text in (
        ("fleet", fleet.main, "N cores, one frame per send each, --rate in all, phases spread"),
        ("fleet-restart", restart.main,
         "the cores stream for --duration, SIGKILL, restart; time every core's WELCOME"),
    ):  # fmt: skip
        p = mode(name, run, text, "config", "mac", "duration", "procs")
        _connections(p, 1)
        _payload(p, 64)
        p.add_argument(
            "--rate",
            type=_in_range(float, 0, float("inf"), closed_low=False),
            required=True,
            metavar="FRAMES_PER_S",
            help="frames/s of the whole fleet",
        )
        p.add_argument(
            "--first-use",
            action="store_true",
            help="the daemon trusts on first use and every core sends a fingerprint: the "
            "handshakes are a fleet's first boot, each core's binding written to the registry",
        )

    p = mode("recovery", recovery.main,
             "fill the store, SIGKILL the daemon mid-stream, time its restart",
             "config", "mac", "procs")  # fmt: skip
    _connections(p, recovery.CONNECTIONS)
    _payload(p, recovery.PAYLOAD)
    _window(p)
    p.add_argument(
        "--fill-gib",
        type=_in_range(float, 0, 64, closed_low=False),
        default=1.0,
        metavar="GIB",
        help="GiB of records to store before the kill (default 1.0)",
    )
    p.add_argument(
        "--max-seconds",
        type=_in_range(float, 60, float("inf")),
        default=recovery.MAX_S,
        metavar="S",
        help=f"cap on the whole run (default {recovery.MAX_S:.0f})",
    )
    p.add_argument(
        "--cold-cache",
        action="store_true",
        help="drop the segments from the page cache before the restart",
    )

    p = mode("soak", soak.main, f"full load for MINUTES; RSS and frames/s every "
             f"{soak.EVERY:.0f} s", "mac", "procs")  # fmt: skip
    p.add_argument("minutes", type=_in_range(float, 0, 59, closed_low=False), metavar="MINUTES")
    _connections(p, soak.CONNECTIONS)
    _payload(p, 64)
    _window(p)
    return parser


def old_form(argv: list[str]) -> str | None:
    """For a command line of the single-parser bench (a mode flag, or none for load; no
    arguments ran a load too), its subcommand form; None for any other."""
    if argv and (not argv[0].startswith("-") or argv[0] in ("-h", "--help")):
        return None
    words = list(argv)
    new = ["load"]
    for i, word in enumerate(words):
        flag, eq, value = word.partition("=")
        if flag in OLD_MODES:
            new = [OLD_MODES[flag]]
            if flag == "--soak":
                new.append(value if eq else (words[i + 1] if i + 1 < len(words) else "MINUTES"))
                del words[i : i + (1 if eq else 2)]
            else:
                del words[i]
            break
    return " ".join(["scripts/bench", *new, *words])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    new = old_form(argv)
    if new is not None:
        print(f"bench: the modes are subcommands now (see --help): {new}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    limit = raise_nofile_limit()
    needed = args.connections + 64
    if needed > limit:
        print(
            f"bench: {needed} file descriptors needed, RLIMIT_NOFILE hard limit is {limit}",
            file=sys.stderr,
        )
        return 1
    return guarded("bench", lambda: args.run(args))
