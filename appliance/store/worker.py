"""`module-ingest worker --cursor NAME (--exec CMD | --out DIR) [--once]`.

A consumer in its own process (consumer.py): hands each batch to a command
on its stdin, or appends it to files, and commits its cursor after that.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shlex
import shutil
import stat
import subprocess
import threading
from pathlib import Path

from appliance.durable import fsync_dir, make_dirs
from appliance.errors import ToolError
from appliance.store import meta, wal_dir
from appliance.store.consumer import Handler, cursor_lock, run_consumer, stop_on_signals
from appliance.store.cursor import Cursor
from appliance.store.segment import Record, json_line, record_json

log = logging.getLogger("appliance.tools")


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


def add_parser(subparsers) -> None:
    """Add `worker` to the CLI's subparsers."""
    p = subparsers.add_parser(
        "worker",
        help="consume the stored frames from a named cursor, beside the daemon or alone",
        description=(
            "Read the stored frames after cursor NAME in batches and hand each batch on:"
            " --exec runs CMD (no shell) with the batch as JSON lines on stdin (the keys"
            " of dump) and commits only if CMD exits 0; --out appends it to"
            " DIR/NAME-<segment>.jsonl, fsynced before the commit. Delivery is at least"
            " once. Safe beside the running daemon: it reads segments and writes only"
            " NAME.cursor (and NAME.cursor.lock); the daemon keeps segments the cursor"
            " has not passed. Use a name no other reader uses."
        ),
    )
    p.add_argument("--cursor", metavar="NAME", required=True, help="the reader's name")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--exec", metavar="CMD", help="command run once per batch, batch on stdin")
    how.add_argument("--out", metavar="DIR", help="append batches to DIR/NAME-<segment>.jsonl")
    p.add_argument(
        "--once", action="store_true", help="drain what is stored now and exit (else keep polling)"
    )
    p.add_argument(
        "--batch",
        metavar="N",
        type=_positive_int,
        default=1000,
        help="frames per batch (default 1000)",
    )
    p.add_argument(
        "--poll",
        metavar="SECONDS",
        type=_positive_float,
        default=1.0,
        help="seconds between reads when caught up, first retry pause (default 1)",
    )
    p.set_defaults(func=cmd_worker)


def cmd_worker(args, config) -> int:
    directory = wal_dir(config.data_dir)
    if not directory.is_dir():
        raise ToolError(f"worker: no store at {directory}")
    try:
        name = meta.check_cursor_name(args.cursor)
    except meta.MetaError as exc:
        raise ToolError(f"worker: {exc}") from None
    if args.exec is not None:
        handle = _exec_handler(args.exec)
    else:
        handle = _out_handler(Path(args.out), name)
    stop = threading.Event()
    with stop_on_signals(stop), cursor_lock(directory, name):
        cursor = Cursor(directory, name)
        return run_consumer(cursor, handle, stop, batch=args.batch, poll=args.poll, once=args.once)


def _exec_handler(command: str) -> Handler:
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise ToolError(f"worker: --exec: {exc}") from None
    if not argv:
        raise ToolError("worker: --exec: empty command")
    if shutil.which(argv[0]) is None:
        raise ToolError(f"worker: --exec: {argv[0]}: command not found or not executable")

    def handle(records: list[Record]) -> bool:
        batch = "".join(json_line(record_json(rec)) for rec in records).encode()
        try:
            done = subprocess.run(argv, input=batch, check=False)
        except OSError as exc:
            log.error("worker: --exec %s: %s", argv[0], exc.strerror or exc)
            return False
        if done.returncode != 0:
            log.error("worker: --exec %s exited %d", argv[0], done.returncode)
        return done.returncode == 0

    return handle


def _out_handler(directory: Path, name: str) -> Handler:
    try:
        make_dirs(directory)
    except OSError as exc:
        raise ToolError(f"worker: --out {directory}: {exc.strerror or exc}") from None

    def handle(records: list[Record]) -> bool:
        by_segment: dict[int, list[Record]] = {}
        for rec in records:
            by_segment.setdefault(rec.segment, []).append(rec)
        try:
            for number, recs in by_segment.items():
                path = directory / f"{name}-{number:012d}.jsonl"
                append_lines(path, "".join(json_line(record_json(r)) for r in recs).encode())
        except OSError as exc:
            log.error("worker: --out %s: %s", directory, exc.strerror or exc)
            return False
        return True

    return handle


def append_lines(path: Path, data: bytes) -> None:
    """Append whole lines and fsync; a torn last line (a crash mid-write, so a batch that
    was never committed and comes again) is cut off first.

    The file is created 0600 and exclusively, and an existing one is appended to only if
    it is a regular file reached without a symbolic link: someone who can write to the
    output directory must not make the worker write into another file."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        created = True
    except FileExistsError:
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                msg = f"worker: {path} is a symbolic link; not writing through it"
                raise ToolError(msg) from None
            raise
        created = False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ToolError(f"worker: {path} is not a regular file; not writing to it")
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o600)  # one an older version made readable by others
        size = st.st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            keep = last_line_end(fd, size)
            log.warning("worker: %s: cutting a torn last line (%d bytes)", path, size - keep)
            os.ftruncate(fd, keep)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(path.parent)


def last_line_end(fd: int, size: int) -> int:
    """The offset just past the last newline before `size` (0 if there is none)."""
    pos = size
    while pos > 0:
        start = max(0, pos - 65536)
        at = os.pread(fd, pos - start, start).rfind(b"\n")
        if at >= 0:
            return start + at + 1
        pos = start
    return 0
