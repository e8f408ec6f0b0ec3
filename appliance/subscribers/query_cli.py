"""`module-ingest query`: frames and per-minute statistics from an index subscriber.

    module-ingest query [--index NAME] [--identity ID] [--channel N]
                        [--from T] [--to T] [--stats [summary|minute]] [--limit N]

Reads the SQLite index that the subscriber of `type = "index"` keeps in
DATA_DIR/subscribers/NAME/index.sqlite3, beside the running daemon (read-only;
it never blocks the subscriber). Output is JSON lines on stdout.

Times (--from inclusive, --to exclusive) are the sender's clock (ts_ns), given
as Unix seconds (`1714564800`, `1714564800.25`, down to nanoseconds) or as
ISO-8601 (`2024-05-01T12:00:00Z`, `2024-05-01T14:00:00.5+02:00`,
`2024-05-01`); ISO-8601 without an offset is UTC. Either bound may be left out.

Without --stats, one line per frame, ordered by identity, channel, then time:
    {"id", "channel", "ts_ns", "seq", "recv_ns", "segment", "offset", "bytes"}
(segment, offset) is where the record is in the store (data_dir/wal), bytes its
payload length.

--stats (or --stats summary) answers from the per-minute rollups: one line per
(identity, channel) with data,
    {"id", "channel", "count", "bytes", "first_ns", "last_ns", "first", "last",
     "rate", "minutes"}
--stats minute gives one such line per minute instead ("minute", "minute_ns"
in place of "minutes"). Rollups cover whole minutes: the stats count every
minute that overlaps [--from, --to). `rate` is frames per second between the
first and the last frame, (count - 1) / (last - first), null for fewer than two
frames or no time between them. `first`/`last` are UTC, ISO-8601.

--limit N stops after N lines (default 10000; 0: no limit); when more would
have followed, one line on stderr says so. Errors are one line on stderr; exit
2 for usage errors (a bad time, no such index), 1 if the index cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from pathlib import Path

from appliance.subscribers.index import (
    DB_NAME,
    MINUTE_NS,
    IndexFileError,
    IndexReader,
    unfold_seq,
)
from appliance.subscribers.timeargs import channel_arg, format_time, time_arg

DEFAULT_LIMIT = 10000
EXIT_FAILED = 1
EXIT_USAGE = 2
INDEX_TYPES = ("index", "appliance.subscribers.index:IndexSubscriber")


class QueryError(Exception):
    """One line for the operator; `code` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


# -- times -----------------------------------------------------------------------------


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return int(text)


def add_parser(subparsers) -> None:
    """Add the `query` subcommand to the CLI's subparsers."""
    p = subparsers.add_parser(
        "query",
        help="frames or per-minute stats from the index subscriber",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--index", metavar="NAME", help="the index subscriber, if there are several")
    p.add_argument("--identity", metavar="ID", help="only this identity")
    p.add_argument("--channel", type=channel_arg, metavar="N", help="only this channel")
    p.add_argument(
        "--from",
        dest="start",
        type=time_arg,
        metavar="T",
        help="from this time on (sender clock): Unix seconds or ISO-8601, UTC by default",
    )
    p.add_argument("--to", dest="end", type=time_arg, metavar="T", help="up to (not at) T")
    p.add_argument(
        "--stats",
        nargs="?",
        const="summary",
        choices=("summary", "minute"),
        help="counts, bytes, first/last, rate from the rollups: one line per series "
        "(summary) or per minute",
    )
    p.add_argument(
        "--limit",
        type=_count,
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"at most N lines (default {DEFAULT_LIMIT}; 0: all)",
    )
    p.set_defaults(func=cmd_query)


# -- finding the index -----------------------------------------------------------------


def index_names(config) -> list[str]:
    """The index subscribers: configured ones, and any with a database on disk."""
    names = {name for name, table in config.subscribers.items() if table.get("type") in INDEX_TYPES}
    root = Path(config.data_dir) / "subscribers"
    if root.is_dir():
        names.update(p.parent.name for p in root.glob(f"*/{DB_NAME}"))
    return sorted(names)


def index_path(config, name: str | None) -> Path:
    names = index_names(config)
    if name is None:
        if not names:
            raise QueryError(
                'query: no index subscriber (add [subscribers.NAME] with type = "index")'
            )
        if len(names) > 1:
            raise QueryError(f"query: several indexes ({', '.join(names)}): pick one with --index")
        name = names[0]
    elif name not in names:
        have = f" (there are: {', '.join(names)})" if names else ""
        raise QueryError(f"query: no index subscriber {name!r}{have}")
    path = Path(config.data_dir) / "subscribers" / name / DB_NAME
    if not path.is_file():
        raise QueryError(f"query: index {name!r} has no data yet ({path} does not exist)")
    return path


# -- the command -----------------------------------------------------------------------


def cmd_query(args, config) -> int:
    try:
        if args.start is not None and args.end is not None and args.start >= args.end:
            raise QueryError("query: --from must be before --to")
        path = index_path(config, args.index)
        try:
            reader = IndexReader(path)
        except IndexFileError as exc:
            raise QueryError(f"query: {exc}", EXIT_FAILED) from None
        try:
            more = run_query(reader, args, sys.stdout)
        except sqlite3.Error as exc:
            raise QueryError(f"query: {path}: {exc}", EXIT_FAILED) from None
        finally:
            reader.close()
    except QueryError as exc:
        # one line, printed here (raising the CLI's CliError would be an import cycle)
        print(f"module-ingest: {exc}", file=sys.stderr)
        return exc.code
    sys.stdout.flush()
    if more:
        print(
            f"module-ingest: query: stopped at --limit {args.limit}; more match "
            "(--limit 0 for all)",
            file=sys.stderr,
        )
    return 0


def run_query(reader: IndexReader, args, out) -> bool:
    """Write the answer as JSON lines to `out`; True if --limit cut it short."""
    left = args.limit or -1  # lines still allowed; negative: no limit
    for ident, name, channel in reader.series(args.identity, args.channel):
        head = {"id": name, "channel": channel}
        fetch = left + 1 if left >= 0 else 0  # one more than allowed tells whether more match
        if args.stats == "summary":
            count, size, first, last, minutes = reader.summary(ident, channel, args.start, args.end)
            lines = (
                [{**head, **_stats(count, size, first, last), "minutes": minutes}] if count else []
            )
        elif args.stats == "minute":
            lines = (
                {
                    **head,
                    "minute": format_time(minute * MINUTE_NS)[:-11] + "Z",
                    "minute_ns": minute * MINUTE_NS,
                    **_stats(count, size, first, last),
                }
                for minute, count, size, first, last in reader.minutes(
                    ident, channel, args.start, args.end, fetch
                )
            )
        else:
            lines = (
                {
                    **head,
                    "ts_ns": ts,
                    "seq": unfold_seq(seq),
                    "recv_ns": recv,
                    "segment": segment,
                    "offset": offset,
                    "bytes": size,
                }
                for ts, seq, recv, segment, offset, size in reader.frames(
                    ident, channel, args.start, args.end, fetch
                )
            )
        for line in lines:
            if left == 0:
                return True
            out.write(json.dumps(line) + "\n")
            left -= 1
    return False


def _stats(count: int, size: int, first: int, last: int) -> dict:
    span = (last - first) / 1e9
    return {
        "count": count,
        "bytes": size,
        "first_ns": first,
        "last_ns": last,
        "first": format_time(first),
        "last": format_time(last),
        "rate": round((count - 1) / span, 3) if count > 1 and span > 0 else None,
    }
