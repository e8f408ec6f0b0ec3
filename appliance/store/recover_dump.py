"""`module-ingest recover-dump PATH [--salvage OUT]`: look into a segment or meta file.

Inspects one segment (`NNN.wal`, `NNN.wal.quarantined`) or meta file
(`store.meta`, `NAME.cursor`), damaged or not, and prints JSON lines. For a
segment: a header line, one line per good record, one line per damaged
stretch (its offset, the reason, and where reading went on), and a summary
line. For a meta file: one line with its content and whether its CRC holds.
Exit 0 if clean, 1 if damage was found, 2 for usage errors and unreadable
files. `--salvage OUT` also writes every good record into a new clean
segment OUT that the daemon can load (see SALVAGE_HELP).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import mmap
import os
import secrets
import sys
import zlib
from pathlib import Path
from typing import IO

from appliance.durable import fsync_dir
from appliance.errors import EXIT_CLEAN, EXIT_DAMAGED, ToolError
from appliance.store import meta
from appliance.store.reader import Damage, SegmentReader, read_segment_records
from appliance.store.recovery import write_segment
from appliance.store.segment import (
    BLOCK,
    QUARANTINE_SUFFIX,
    SEGMENT_HEADER,
    SEGMENT_MAGIC,
    SUFFIX,
    SegmentError,
    check_header,
    json_line,
    record_json,
    segment_number,
)

MiB = 1024 * 1024

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


def add_parser(subparsers) -> None:
    """Add `recover-dump` to the CLI's subparsers."""
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
    out.write(json_line(header))

    records = bad = 0

    def damaged(damage: Damage) -> None:
        nonlocal bad
        bad += 1
        stretch = {"offset": damage.offset, "bad": damage.reason, "skipped_to": damage.resumed}
        out.write(json_line(stretch))

    reader = SegmentReader(data, number or 0, report=damaged)
    for rec in reader.records():
        records += 1
        out.write(json_line({"offset": rec.offset, **record_json(rec)}))
    end = min(reader.end, size)
    clean = header_ok and not truncated and not bad
    out.write(
        json_line({"records": records, "bad_stretches": bad, "end_offset": end, "clean": clean})
    )
    if salvage is not None:
        room = segment_bytes if header_ok else size - size % BLOCK
        kept = salvage_segment(data, number or 0, salvage, target, max(room, MiB))
        out.write(json_line({"salvaged": kept, "to": str(salvage), "segment": target}))
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
            problems += meta.field_problems(content, path, is_cursor)
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
    out.write(json_line(report))
    out.flush()
    return EXIT_DAMAGED if problems else EXIT_CLEAN
