"""`module-ingest export`: frames read back from a disk archive (subscribers/archive/).

export --channel N [--from T] [--to T] [--identity ID] [--format jsonl|raw] [--archive NAME]

Prints the archived frames of one channel whose time t (the frame's ts_ns, or
its recv_ns when ts_ns is 0: the time the archive files it by) satisfies
FROM <= t < TO, hour by hour, each hour in arrival order (so not strictly
sorted by t when senders' clocks disagree).

Times (T) are one of:
  - ISO-8601: 2026-11-27, 2026-11-27T14, 2026-11-27T14:05:00Z,
    2026-11-27T14:05:00.25+01:00; without an offset the time is UTC
  - Unix seconds: 1795788000 or 1795788000.25 (or with the suffix s)
  - Unix nanoseconds: an integer of 16 digits or more, or any integer with the
    suffix ns (1795788000000000000, 1795788000ns)

Formats:
  jsonl  one JSON object per frame, the keys of `dump`: id, channel, seq,
         ts_ns, recv_ns, payload_b64 (the default)
  raw    each payload as it was received, preceded by its length as a 4-byte
         unsigned big-endian integer

The archive is read under data_dir/subscribers/NAME/ for an archive subscriber
NAME (a `[subscribers.NAME]` table with type = "archive", or a directory that
holds an archive); with several, --archive NAME chooses. Reading is safe beside
the running daemon. Damaged stretches are skipped with one line each on stderr,
and the exit status is then 1; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from appliance.errors import ToolError
from appliance.store.segment import record_json
from appliance.subscribers.archive.format import ARCHIVE_DIR, STATE_FILE
from appliance.subscribers.archive.reader import read_archive
from appliance.subscribers.timeargs import channel_arg, time_arg

ARCHIVE_TYPES = (  # the ways a [subscribers.NAME] table can name the archive
    "archive",
    "appliance.subscribers.archive:ArchiveSubscriber",
    "appliance.subscribers.archive.subscriber:ArchiveSubscriber",
)
EXIT_DAMAGED = 1


def add_parser(subparsers) -> None:
    """Add `export` to the CLI's subparsers."""
    doc = __doc__.split("\n\n", 2)[2]
    p = subparsers.add_parser(
        "export",
        help="print archived frames of a channel and time range (jsonl or raw)",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--channel", type=channel_arg, required=True, help="the channel (0..65535)")
    p.add_argument("--from", dest="start", metavar="T", type=time_arg, help="from T (inclusive)")
    p.add_argument("--to", dest="end", metavar="T", type=time_arg, help="up to T (exclusive)")
    p.add_argument("--identity", metavar="ID", help="only frames of this identity")
    p.add_argument(
        "--format", choices=("jsonl", "raw"), default="jsonl", help="output (default jsonl)"
    )
    p.add_argument("--archive", metavar="NAME", help="the archive subscriber (default: the one)")
    p.set_defaults(func=cmd_export)


def configured_archives(config) -> set[str]:
    """Names of the `[subscribers.NAME]` tables whose type is the archive."""
    tables = getattr(config, "subscribers", None) or {}
    return {name for name, table in tables.items() if table.get("type") in ARCHIVE_TYPES}


def archives_on_disk(data_dir: Path) -> set[str]:
    base = data_dir / "subscribers"
    if not base.is_dir():
        return set()
    return {
        d.name for d in base.iterdir() if (d / ARCHIVE_DIR).is_dir() or (d / STATE_FILE).is_file()
    }


def find_archive(config, name: str | None) -> Path:
    """The archive directory to read; ToolError naming the choices when it is unclear."""
    data_dir = Path(config.data_dir)
    configured = configured_archives(config)
    on_disk = archives_on_disk(data_dir)
    known = sorted(configured | on_disk)
    if name is None:
        if not known:
            raise ToolError(
                f"export: no archive under {data_dir / 'subscribers'}"
                ' (add a [subscribers.NAME] table with type = "archive")'
            )
        if len(known) > 1:
            raise ToolError(
                f"export: several archives ({', '.join(known)}): choose one with --archive NAME"
            )
        name = known[0]
    elif name not in known:
        choices = ", ".join(known) if known else "none"
        raise ToolError(f"export: no archive named {name!r} (archives: {choices})")
    return data_dir / "subscribers" / name / ARCHIVE_DIR


def cmd_export(args, config) -> int:
    start = args.start or 0
    if args.end is not None and args.end <= start:
        raise ToolError("export: --to must be later than --from")
    root = find_archive(config, args.archive)
    damaged = []

    def on_damage(message: str) -> None:
        damaged.append(message)
        print(f"module-ingest: export: {message}", file=sys.stderr, flush=True)

    entries = read_archive(root, args.channel, start, args.end, args.identity, on_damage)
    if args.format == "raw":
        out = sys.stdout.buffer
        for entry in entries:
            out.write(len(entry.payload).to_bytes(4, "big"))
            out.write(entry.payload)
    else:
        out = sys.stdout
        for entry in entries:
            out.write(json.dumps(record_json(entry)) + "\n")
    out.flush()
    return EXIT_DAMAGED if damaged else 0
