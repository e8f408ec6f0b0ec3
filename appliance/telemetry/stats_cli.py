"""`module-ingest stats`: ask the running daemon for its metrics over the stats socket."""

from __future__ import annotations

import argparse
import errno
import socket
import sys
import time
from pathlib import Path

from appliance.telemetry.endpoint import FORMATS, IDENTITIES, socket_path

TIMEOUT = 5.0  # the daemon answers from its loop at once; longer means it is stuck
NO_DAEMON = (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK)


class StatsError(Exception):
    pass


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def add_parser(subparsers) -> None:
    """Add the `stats` subcommand to the CLI's subparsers."""
    p = subparsers.add_parser("stats", help="print the running daemon's metrics")
    p.add_argument(
        "--watch",
        nargs="?",
        type=_interval,
        const=1.0,
        metavar="SECONDS",
        help="repeat every SECONDS (default 1) until Ctrl-C",
    )
    p.add_argument("--format", choices=FORMATS, default="text")
    p.add_argument(
        "--identities",
        action="store_true",
        help="add a row per identity (frames stored, connected); costs the daemon's loop "
        "2-4 ms per 1,000 identities",
    )
    p.add_argument("--socket", help="the stats socket (default: [stats] socket in the data dir)")
    p.set_defaults(func=cmd_stats)


def query(path: Path, request: str, timeout: float = TIMEOUT) -> str:
    """One request line (a format, maybe with "identities"): the daemon's reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if exc.errno in NO_DAEMON:
                raise StatsError(f"no daemon at {path} ({reason})") from None
            raise StatsError(f"cannot connect to {path} ({reason})") from None
        try:
            sock.sendall(request.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            raise StatsError(f"no answer from {path} within {timeout:g} s") from None
        except OSError as exc:
            raise StatsError(f"{path}: {exc.strerror or exc}") from None
    reply = b"".join(chunks).decode("utf-8", "replace")
    if not reply:
        raise StatsError(f"{path}: closed without an answer (too many stats clients?)")
    if reply.startswith("error:"):
        raise StatsError(reply.strip())
    return reply


def cmd_stats(args, config) -> int:
    path = Path(args.socket) if args.socket else socket_path(config)
    clear = args.watch is not None and args.format == "text" and sys.stdout.isatty()
    try:
        while True:
            reply = query(path, f"{args.format} {IDENTITIES}" if args.identities else args.format)
            if clear:
                sys.stdout.write("\x1b[H\x1b[2J")  # redraw in place, like watch(1)
            sys.stdout.write(reply)
            sys.stdout.flush()
            if args.watch is None:
                return 0
            time.sleep(args.watch)
    except StatsError as exc:
        # one line, printed here: raising the CLI's CliError would be an import cycle
        print(f"module-ingest: stats: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.watch is None:
            raise
        return 0  # Ctrl-C is how --watch ends
