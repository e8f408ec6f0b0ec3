"""Operator tools for the store: `recover-dump` and `worker`.

recover-dump PATH [--salvage OUT]
    Inspects one segment (`NNN.wal`, `NNN.wal.quarantined`) or meta file
    (`store.meta`, `NAME.cursor`), damaged or not, and prints JSON lines. For a
    segment: a header line, one line per good record, one line per damaged
    stretch (its offset, the reason, and where reading went on), and a summary
    line. For a meta file: one line with its content and whether its CRC holds.
    Exit 0 if clean, 1 if damage was found, 2 for usage errors and unreadable
    files. `--salvage OUT` also writes every good record into a new clean
    segment OUT that the daemon can load (see SALVAGE_HELP).

worker --cursor NAME (--exec CMD | --out DIR) [--once]
    A consumer in its own process: reads the segment files from its cursor
    (`NAME.cursor` beside the segments, so the daemon's retention keeps what it
    has not read), hands each batch on, and commits the cursor only after the
    batch was handled: data first, then the pointer. Delivery is at least once:
    a crash between handling and commit delivers the batch again; (id, seq)
    identifies a frame.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import errno
import fcntl
import json
import logging
import mmap
import os
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO

from appliance.durable import fsync_dir, make_dirs
from appliance.store import meta, wal_dir
from appliance.store.cursor import Cursor
from appliance.store.reader import Damage, SegmentReader, read_segment_records
from appliance.store.recovery import write_segment
from appliance.store.segment import (
    BLOCK,
    QUARANTINE_SUFFIX,
    SEGMENT_HEADER,
    SEGMENT_MAGIC,
    SUFFIX,
    Record,
    SegmentError,
    check_header,
    segment_name,
    segment_number,
)

log = logging.getLogger("appliance.tools")

EXIT_CLEAN = 0
EXIT_DAMAGED = 1  # recover-dump found damage; worker --once: the batch was not handled
EXIT_USAGE = 2

MiB = 1024 * 1024
RETRY_MAX = 30.0  # longest pause before a failed batch is tried again
READ_ATTEMPTS = 5  # --once gives up after this many failed reads in a row

RECOVER_DUMP_HELP = """\
Print a segment (NNN.wal, NNN.wal.quarantined) or a meta file (store.meta,
NAME.cursor), damaged or not, as JSON lines. A segment gives a header line, one
line per good record (offset and the keys of dump), a line per damaged stretch
({"offset", "bad": reason, "skipped_to": where reading went on, or null}) and
a summary line. Exit 0 if clean, 1 if damage was found, 2 on usage errors.
Best run on a stopped daemon or on a copy: the tail of the segment being
written can read as torn."""

SALVAGE_HELP = """\
Loading a salvaged segment: stop the daemon; name OUT after an unused segment
number above the newest in data/wal/ (if the newest is 000000000007.wal, write
--salvage data/wal/000000000008.wal, or write it elsewhere under that name and
move it there); start the daemon. Recovery reads it as the newest segment: dump
and the readers get its records after everything already stored, and new
frames are appended after them. The records keep their seqs, older than the
replay window; that is fine, they are not frames arriving again. The number
in the file name must match the one inside: OUT named NNNNNNNNNNNN.wal gets
that number, any other name gets the source's number. Never add a segment
while the daemon runs: it could create the same number when it rotates."""


class ToolError(Exception):
    """A failure the CLI prints as one line (exit 2)."""


# -- the CLI -------------------------------------------------------------------------


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


def add_parsers(subparsers) -> None:
    """Add `recover-dump` and `worker` to the CLI's subparsers."""
    p = subparsers.add_parser(
        "recover-dump",
        help="inspect a segment or meta file, even a damaged one; --salvage its good records",
        description=RECOVER_DUMP_HELP,
        epilog=SALVAGE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", metavar="PATH", help="a segment or meta file")
    p.add_argument(
        "--salvage",
        metavar="OUT",
        help="write every good record into a new clean segment OUT (never overwrites)",
    )
    p.set_defaults(func=cmd_recover_dump)

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


# -- records as JSON -----------------------------------------------------------------


def record_json(rec: Record) -> dict:
    """A record with the keys of `dump`."""
    return {
        "id": rec.identity,
        "channel": rec.channel,
        "seq": rec.seq,
        "ts_ns": rec.ts_ns,
        "recv_ns": rec.recv_ns,
        "payload_b64": base64.b64encode(rec.payload).decode(),
    }


def _line(obj: dict) -> str:
    return json.dumps(obj) + "\n"


# -- recover-dump --------------------------------------------------------------------


def cmd_recover_dump(args, config) -> int:
    path = Path(args.path)
    out = Path(args.salvage) if args.salvage else None
    if out is not None:
        if out.exists() or out.is_symlink():
            raise ToolError(f"recover-dump: {out} exists; not overwriting it")
        if not out.parent.is_dir():
            raise ToolError(f"recover-dump: {out.parent} is not a directory")
    try:
        with open(path, "rb") as f:
            head = f.read(len(SEGMENT_MAGIC))
    except OSError as exc:
        raise ToolError(f"recover-dump: {path}: {exc.strerror or exc}") from None
    if _is_segment(path, head):
        return dump_segment(path, sys.stdout, salvage=out)
    if _is_meta(path, head):
        if out is not None:
            raise ToolError(f"recover-dump: --salvage takes a segment, {path.name} is a meta file")
        return dump_meta(path, sys.stdout)
    raise ToolError(
        f"recover-dump: {path}: neither a segment (NNN.wal, NNN.wal.quarantined)"
        " nor a meta file (store.meta, NAME.cursor)"
    )


def _is_segment(path: Path, head: bytes) -> bool:
    return path.name.endswith((SUFFIX, QUARANTINE_SUFFIX)) or head == SEGMENT_MAGIC


def _is_meta(path: Path, head: bytes) -> bool:
    name = path.name
    return name == meta.STORE_META or name.endswith(meta.CURSOR_SUFFIX) or head.startswith(b"{")


def _number_in_name(path: Path) -> int | None:
    for suffix in (QUARANTINE_SUFFIX, SUFFIX):
        if path.name.endswith(suffix):
            stem = path.name[: -len(suffix)]
            return int(stem) if stem.isdigit() else None
    return None


def dump_segment(path: Path, out: IO[str], salvage: Path | None = None) -> int:
    """Print a segment as JSON lines; with `salvage`, copy its good records into a new
    segment there. EXIT_CLEAN or EXIT_DAMAGED."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    except (OSError, ValueError) as exc:  # ValueError: not a file mmap can map
        raise ToolError(f"recover-dump: {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        return _dump_segment_data(path, data, size, out, salvage)
    finally:
        if isinstance(data, mmap.mmap):
            data.close()


def _dump_segment_data(path: Path, data, size: int, out: IO[str], salvage: Path | None) -> int:
    named = _number_in_name(path)
    header: dict = {"file": path.name, "kind": "segment", "file_bytes": size}
    number = named
    segment_bytes = 0
    header_ok = truncated = False
    try:
        number = check_header(data)
        _, version, _, _, _, created_ns, segment_bytes, _ = SEGMENT_HEADER.unpack_from(data)
        header.update(
            segment=number, version=version, created_ns=created_ns, segment_bytes=segment_bytes
        )
        if named is not None and named != number:
            raise SegmentError(f"header says segment {number}, file name says {named}")
        header["header"] = "ok"
        header_ok = True
        truncated = size < segment_bytes
        header["truncated"] = truncated
    except SegmentError as exc:
        header.setdefault("segment", named)
        header["header"] = str(exc)
    target = None
    if salvage is not None:
        target = segment_number(salvage)
        if target is None:
            target = number
        if target is None:
            raise ToolError(
                f"recover-dump: cannot tell {path.name}'s segment number;"
                " name OUT after one: NNNNNNNNNNNN.wal"
            )
    out.write(_line(header))

    records = bad = 0

    def damaged(damage: Damage) -> None:
        nonlocal bad
        bad += 1
        stretch = {"offset": damage.offset, "bad": damage.reason, "skipped_to": damage.resumed}
        out.write(_line(stretch))

    reader = SegmentReader(data, number or 0, report=damaged)
    for rec in reader.records():
        records += 1
        out.write(_line({"offset": rec.offset, **record_json(rec)}))
    end = min(reader.end, size)
    clean = header_ok and not truncated and not bad
    out.write(_line({"records": records, "bad_stretches": bad, "end_offset": end, "clean": clean}))
    if salvage is not None:
        room = segment_bytes if header_ok else size - size % BLOCK
        kept = salvage_segment(data, number or 0, salvage, target, max(room, MiB))
        out.write(_line({"salvaged": kept, "to": str(salvage), "segment": target}))
    out.flush()
    return EXIT_CLEAN if clean else EXIT_DAMAGED


def salvage_segment(data, source: int, out: Path, number: int, segment_bytes: int) -> int:
    """Write every intact record of segment data into a new segment `out` numbered `number`;
    returns how many records it holds. Never replaces a file nor writes through a link:
    the copy is made under a fresh temporary name (O_EXCL, O_NOFOLLOW, 0600) and linked
    to `out`, which fails if anything, a symbolic link included, is there."""
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.salvage-tmp")  # not *.wal
    good = SegmentReader(data, source).records()
    try:
        write_segment(tmp, number, good, segment_bytes)  # iterated once: any iterable will do
        try:
            os.link(tmp, out)
        except FileExistsError:
            raise ToolError(f"recover-dump: {out} exists; not overwriting it") from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP):
                raise
            # a file system without hard links (a FAT stick): a rename does not follow a
            # link either, though it could replace a file that appeared since the check
            os.rename(tmp, out)
    except OSError as exc:
        raise ToolError(f"recover-dump: cannot write {out}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_dir(out.parent)
    return sum(1 for _ in read_segment_records(out, number))


def dump_meta(path: Path, out: IO[str]) -> int:
    """Print a meta file's content and whether it is intact as one JSON line."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ToolError(f"recover-dump: {path}: {exc.strerror or exc}") from None
    is_cursor = path.name.endswith(meta.CURSOR_SUFFIX)
    problems: list[str] = []
    body, newline, crc_line = raw.rstrip(b"\n").rpartition(b"\n")
    if not newline:
        body, crc_line = crc_line, b""
    crc = "missing"
    if not raw:
        problems.append("empty file")
    elif crc_line:
        try:
            crc = "ok" if int(crc_line, 16) == zlib.crc32(body) else "mismatch"
        except ValueError:
            crc = "unreadable"
        if crc != "ok":
            problems.append(f"CRC {crc}")
    else:
        problems.append("no CRC line")
    content = None
    try:
        content = json.loads(body)
    except ValueError as exc:  # UnicodeDecodeError is one
        if raw:
            problems.append(f"not JSON ({exc})")
    if content is not None:
        if not isinstance(content, dict):
            problems.append("not a JSON object")
        else:
            # a file under another name (a copy, a .tmp) is told by its fields
            is_cursor = is_cursor or (path.name != meta.STORE_META and "position" in content)
            problems += _meta_field_problems(content, path, is_cursor)
    report = {
        "file": path.name,
        "kind": "cursor" if is_cursor else meta.STORE_META,
        "crc": crc,
        "content": content,
    }
    if content is None:
        report["text"] = body.decode("utf-8", "replace")
    report["problems"] = problems
    report["clean"] = not problems
    out.write(_line(report))
    out.flush()
    return EXIT_DAMAGED if problems else EXIT_CLEAN


def _is_position(value) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    )


def _meta_field_problems(obj: dict, path: Path, is_cursor: bool) -> list[str]:
    problems = []
    if obj.get("version") != 1:
        problems.append(f"version is {obj.get('version')!r}, not 1")
    if is_cursor:
        if not _is_position(obj.get("position")):
            problems.append("position is not [segment, offset]")
        name = path.name.removesuffix(meta.CURSOR_SUFFIX)
        if path.name.endswith(meta.CURSOR_SUFFIX) and obj.get("name") != name:
            problems.append(f"name is {obj.get('name')!r}, the file says {name!r}")
        return problems
    if not _is_position(obj.get("checkpoint")):
        problems.append("checkpoint is not [segment, offset]")
    if not isinstance(obj.get("frames"), int):
        problems.append("frames is not a number")
    last_seq = obj.get("last_seq")
    if not isinstance(last_seq, dict) or not all(isinstance(v, int) for v in last_seq.values()):
        problems.append("last_seq is not {identity: seq}")
    return problems


# -- worker --------------------------------------------------------------------------


Handler = Callable[[list[Record]], bool | tuple[int, int]]
IDLE_FLUSH = 1.0  # seconds between idle calls of a consumer that holds records


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


@contextlib.contextmanager
def cursor_lock(directory: Path, name: str):
    """One worker per cursor: two would deliver the same frames and move it backwards."""
    path = directory / f"{name}{meta.CURSOR_SUFFIX}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise ToolError(f"worker: {path}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ToolError(f"worker: cursor {name} is in use by another worker") from None
        yield
    finally:
        os.close(fd)  # the lock goes with it; the file stays (removing it would race)


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event):
    """SIGTERM and SIGINT set `stop`: the worker finishes its batch, commits and exits."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in saved:
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def run_consumer(
    cursor: Cursor,
    handle: Handler,
    stop: threading.Event,
    *,
    batch: int,
    poll: float,
    once: bool,
    idle: Callable[[], tuple[int, int] | bool | None] | None = None,
) -> int:
    """Read, hand on, commit, until stopped. A handler may return a (segment, offset)
    instead of True: it handled the batch but still holds the records from there on
    (a subscriber gathering a larger object), so the cursor commits only up to there.
    `idle`, called about once a second while there is nothing new, flushes such held
    records and answers the same way (None: nothing held any more)."""
    delivered = batches = errors = 0
    idle_at = time.monotonic()
    status = EXIT_CLEAN
    log.info("worker %s: reading from %s", cursor.name, list(cursor.position))
    while not stop.is_set():
        try:
            records = cursor.read(batch)
            errors = 0
        except (OSError, ValueError) as exc:
            # e.g. a segment the daemon is creating this moment (still empty)
            errors += 1
            cursor.position = cursor.committed  # what was read before the error comes again
            if once and errors >= READ_ATTEMPTS:
                raise ToolError(f"worker: cannot read the store: {exc}") from None
            log.warning("worker %s: reading: %s; trying again", cursor.name, exc)
            stop.wait(poll)
            continue
        if not records:
            if once:
                break
            if idle is not None and time.monotonic() - idle_at >= IDLE_FLUSH:
                idle_at = time.monotonic()
                held = idle()  # False: it failed, commit nothing
                if held is None:
                    cursor.commit()
                elif held:
                    cursor.commit_at(held)
            stop.wait(poll)
            continue
        # The cursor will point past these records, so they must be on flash before
        # anyone sees them: the daemon may not have finished its fdatasync yet.
        _sync_segments(cursor.directory, records)
        result = _handle(cursor.name, handle, records, stop, poll=poll, once=once)
        if not result:
            status = EXIT_DAMAGED if once else EXIT_CLEAN  # stopping: it comes again next time
            break
        if isinstance(result, tuple):
            cursor.commit_at(result)
        else:
            cursor.commit()
        delivered += len(records)
        batches += 1
        if once and len(records) < batch:
            break  # caught up
    summary = {
        "cursor": cursor.name,
        "delivered": delivered,
        "batches": batches,
        "position": list(cursor.committed or cursor.position),
    }
    sys.stdout.write(_line(summary))
    sys.stdout.flush()
    return status


def _handle(
    name: str, handle: Handler, records: list[Record], stop: threading.Event, *, poll, once
) -> bool | tuple[int, int]:
    """Hand a batch on until it is handled (the handler's answer); False with --once or
    when stopping."""
    where = f"{records[0].segment}:{records[0].offset}"
    pause = poll
    while not (result := handle(records)):
        if once:
            log.error("worker %s: batch at %s not handled; not committed", name, where)
            return False
        log.error("worker %s: batch at %s not handled; trying again in %.1f s", name, where, pause)
        if stop.wait(pause):
            return False
        pause = min(pause * 2, RETRY_MAX)
    return result


def _sync_segments(directory: Path, records: list[Record]) -> None:
    for number in sorted({rec.segment for rec in records}):
        try:
            fd = os.open(directory / segment_name(number), os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)


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
        batch = "".join(_line(record_json(rec)) for rec in records).encode()
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
                _append_lines(path, "".join(_line(record_json(r)) for r in recs).encode())
        except OSError as exc:
            log.error("worker: --out %s: %s", directory, exc.strerror or exc)
            return False
        return True

    return handle


def _append_lines(path: Path, data: bytes) -> None:
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
            keep = _last_line_end(fd, size)
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


def _last_line_end(fd: int, size: int) -> int:
    """The offset just past the last newline before `size` (0 if there is none)."""
    pos = size
    while pos > 0:
        start = max(0, pos - 65536)
        at = os.pread(fd, pos - start, start).rfind(b"\n")
        if at >= 0:
            return start + at + 1
        pos = start
    return 0
