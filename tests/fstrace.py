"""Power cuts from a trace: what a process tree wrote and synced, recorded by strace, replayed
into the on-disk states a power cut at any moment could have left.

The model of a power cut (the one FORMAT.md's commit invariants are written against):

- A file's content is durable as of its last completed fsync or fdatasync: every write that
  had completed before that sync began.
- A later write, or one still in flight, persists wholly, not at all, only up to a 512-byte
  boundary, or as any subset of its 4 KiB blocks. A later size change (truncate, fallocate)
  persists or not.
- A directory entry (a create, mkdir, link, rename or unlink) is durable once its directory
  was fsynced after it; before that it may or may not have happened, either way.
- What existed under the root before the trace began is durable as it was.

Only the root's subtree is modelled. Bytes a traced process sent and received on TCP sockets
are kept per peer port, so a test can tell which MIP/1 frames had come in and which
acknowledgements had gone out before the cut.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

CALLS = (
    "openat,open,creat,write,pwrite64,writev,pwritev,pwritev2,sendto,sendmsg,recvfrom,recvmsg,"
    "fdatasync,fsync,"
    "rename,renameat,renameat2,mkdir,mkdirat,unlink,unlinkat,rmdir,link,linkat,fallocate,"
    "ftruncate,truncate,close,dup,dup2,dup3,fcntl,clone,clone3,fork,vfork"
)
MAX_STRING = 4 * 1024 * 1024  # longer writes would be cut short in the trace: refused
SECTOR = 512
BLOCK = 4096
O_FLAGS = {"O_CREAT", "O_TRUNC", "O_APPEND", "O_DIRECTORY", "O_EXCL"}
FALLOC_FL_KEEP_SIZE = "FALLOC_FL_KEEP_SIZE"

LINE = re.compile(r"^(\d+) +(.*)$")
CALL = re.compile(r"^(\w+)\((.*)\) += (-?(?:0x[0-9a-f]+|\d+))(?:<(.*)>)?(?: .*)?$", re.S)
RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$", re.S)
HEX = re.compile(r"(?:\\x[0-9a-f]{2})+")
TCP_PEER = re.compile(r"TCP:\[[^\]]*->[^\]]*:(\d+)\]")
FRAME_HEAD, MAC = 32, 16  # MIP/1: header, MAC trailer
WELCOME, DATA, ACK = 0x03, 0x10, 0x11  # MIP/1 frame types


class TraceError(Exception):
    """The trace holds something this model does not cover: refuse rather than guess."""


def strace_command(out: Path) -> list[str]:
    """The strace prefix that records what this module reads (children followed, fds shown
    with their paths and socket ends, data in full as hex)."""
    return [
        "strace", "-f", "--seccomp-bpf", "-yy", "-xx", "-s", str(MAX_STRING),
        "-o", str(out), "-e", f"trace={CALLS}",
    ]  # fmt: skip


def _unhex(text: str) -> str:
    return HEX.sub(lambda m: bytes.fromhex(m.group(0).replace("\\x", "")).decode("latin-1"), text)


def _bytes(arg: str) -> bytes:
    if not (arg.startswith('"') and arg.endswith('"')):
        raise TraceError(f"expected a string, got {arg[:60]!r} (cut short by strace -s?)")
    return bytes.fromhex(arg[1:-1].replace("\\x", ""))


def _path(arg: str) -> str:
    return _bytes(arg).decode("utf-8", "surrogateescape")


def _split(args: str) -> list[str]:
    """Top-level arguments of a call: commas inside quotes, [], {} and () do not split (fd
    decorations need no care: paths are hex, socket ends are in brackets)."""
    out, depth, quoted, start = [], 0, False, 0
    for i, ch in enumerate(args):
        if quoted:
            quoted = ch != '"'
        elif ch == '"':
            quoted = True
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(args[start:i].strip())
            start = i + 1
    out.append(args[start:].strip())
    return out


def _fd(arg: str) -> tuple[int | None, str]:
    """An fd argument with its strace decoration: (number or None for AT_FDCWD, what it is)."""
    number, _, rest = arg.partition("<")
    decoration = _unhex(rest[:-1]) if rest.endswith(">") else ""
    return (None if number == "AT_FDCWD" else int(number)), decoration


# -- operations, in trace order ---------------------------------------------------------------


@dataclass
class Op:
    start: int  # trace line where the call began
    end: int  # where it returned (the same line for a call strace printed whole)


@dataclass
class Write(Op):
    inode: int
    offset: int
    data: bytes


@dataclass
class Resize(Op):
    inode: int
    size: int
    grow_only: bool  # fallocate: never shrinks


@dataclass
class Sync(Op):
    inode: int


@dataclass
class Entry(Op):
    """One directory change: `name` in `dir` comes to point at `inode` (None: removed); a
    rename is a pair applied together."""

    changes: list[tuple[int, str, int | None]]


@dataclass
class Sent(Op):
    port: int
    data: bytes


@dataclass
class Received(Op):
    port: int
    data: bytes


@dataclass
class _File:
    inode: int
    offset: int = 0
    append: bool = False


@dataclass
class Inode:
    number: int
    is_dir: bool
    base: bytes = b""
    entries: dict[str, int] = field(default_factory=dict)  # directories: before the trace


class Trace:
    """The base (what was under `root` before the traced run) and the run's operations."""

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.inodes: dict[int, Inode] = {}
        self.live: dict[str, int] = {}  # path -> inode, as the run goes
        self.ops: list[Op] = []
        self.root_inode = self._snapshot(root)
        self._files: dict[tuple[int, int], _File] = {}
        self._tgid: dict[int, int] = {}

    def _new(self, is_dir: bool, base: bytes = b"") -> int:
        number = len(self.inodes)
        self.inodes[number] = Inode(number, is_dir, base)
        return number

    def _snapshot(self, path: Path) -> int:
        if path.is_dir():
            number = self._new(True)
            for child in sorted(path.iterdir()):
                if child.is_dir() or child.is_file():
                    self.inodes[number].entries[child.name] = self._snapshot(child)
        else:
            number = self._new(False, path.read_bytes())
        self.live[str(path)] = number
        return number

    # -- reading the trace ------------------------------------------------------------------

    def read(self, trace: Path) -> None:
        lines = trace.read_text(encoding="latin-1").splitlines()
        calls: list[tuple[int, int, int, str]] = []  # (start, end, tid, text)
        pending: dict[int, tuple[int, str]] = {}
        for number, line in enumerate(lines):
            m = LINE.match(line)
            if not m:
                continue
            tid, text = int(m.group(1)), m.group(2)
            if text.startswith(("+++", "---")):
                continue
            if text.endswith("<unfinished ...>"):
                pending[tid] = (number, text[: -len("<unfinished ...>")].rstrip())
                continue
            resumed = RESUMED.match(text)
            if resumed:
                start, head = pending.pop(tid)
                calls.append((start, number, tid, head + resumed.group(2)))
            else:
                calls.append((number, number, tid, text))
        for _, _, tid, text in calls:  # threads and processes first: children may print early
            self._note_clone(tid, text)
        calls.sort(key=lambda c: c[1])
        for start, end, tid, text in calls:
            m = CALL.match(text)
            if not m:
                raise TraceError(f"cannot read trace line {end + 1}: {text[:120]}")
            name, args, ret, ret_decoration = m.groups()
            ret = int(ret, 0)
            if ret < 0:
                continue
            handler = getattr(self, f"_call_{name}", None)
            if handler is not None:
                handler(start, end, self._tgid.get(tid, tid), _split(args), ret, ret_decoration)

    def _note_clone(self, tid: int, text: str) -> None:
        m = CALL.match(text)
        if not m or m.group(1) not in ("clone", "clone3", "fork", "vfork"):
            return
        child = int(m.group(3), 0)
        if child > 0:
            thread = "CLONE_THREAD" in m.group(2)
            self._tgid[child] = self._tgid.get(tid, tid) if thread else child
            if not thread:  # a forked child inherits the fd table (the offsets are shared)
                parent = self._tgid.get(tid, tid)
                for (pid, fd), f in list(self._files.items()):
                    if pid == parent:
                        self._files[(child, fd)] = f

    def _under_root(self, path: str) -> bool:
        return path == self.root or path.startswith(self.root + "/")

    def _resolve(self, dirfd: str | None, path: str) -> str:
        if not path.startswith("/"):
            base = _fd(dirfd)[1] if dirfd is not None else ""
            path = os.path.join(base, path)
        return os.path.normpath(path)

    def _file(self, pid: int, arg: str) -> _File | None:
        number, decoration = _fd(arg)
        f = self._files.get((pid, number))
        if f is None and self._under_root(decoration):
            raise TraceError(f"fd {number} of {decoration} was opened out of sight of the trace")
        return f

    def _entry(self, start: int, end: int, changes: list[tuple[str, int | None]]) -> None:
        resolved = []
        for path, inode in changes:
            parent = self.live.get(os.path.dirname(path))
            if parent is None:
                raise TraceError(f"{path}: its directory is not known to the trace")
            resolved.append((parent, os.path.basename(path), inode))
        self.ops.append(Entry(start, end, resolved))

    # -- one handler per call that matters ----------------------------------------------------

    def _open(self, start, end, pid, dirfd, path_arg, flags, ret):
        path = self._resolve(dirfd, _path(path_arg))
        if not self._under_root(path):
            return
        names = set(flags.split("|"))
        inode = self.live.get(path)
        if inode is None:
            if "O_CREAT" not in names:
                return
            inode = self._new(False)
            self.live[path] = inode
            self._entry(start, end, [(path, inode)])
        elif "O_TRUNC" in names:
            self.ops.append(Resize(start, end, inode, 0, False))
        self._files[(pid, ret)] = _File(inode, append="O_APPEND" in names)

    def _call_openat(self, start, end, pid, args, ret, _):
        self._open(start, end, pid, args[0], args[1], args[2], ret)

    def _call_open(self, start, end, pid, args, ret, _):
        self._open(start, end, pid, None, args[0], args[1], ret)

    def _call_creat(self, start, end, pid, args, ret, _):
        self._open(start, end, pid, None, args[0], "O_CREAT|O_TRUNC", ret)

    def _call_close(self, start, end, pid, args, ret, _):
        self._files.pop((pid, _fd(args[0])[0]), None)

    def _dup(self, pid, old, new):
        f = self._files.get((pid, _fd(old)[0]))
        if f is not None:
            self._files[(pid, new)] = f

    def _call_dup(self, start, end, pid, args, ret, _):
        self._dup(pid, args[0], ret)

    _call_dup2 = _call_dup3 = _call_dup

    def _call_fcntl(self, start, end, pid, args, ret, _):
        if args[1].startswith("F_DUPFD"):
            self._dup(pid, args[0], ret)

    def _sent(self, start, end, args, data):
        m = TCP_PEER.search(_fd(args[0])[1])
        if m:
            self.ops.append(Sent(start, end, int(m.group(1)), data))

    def _call_write(self, start, end, pid, args, ret, _):
        f = self._file(pid, args[0])
        data = _bytes(args[1])[:ret]
        if f is None:
            self._sent(start, end, args, data)
            return
        offset = self._size_now(f.inode) if f.append else f.offset
        self.ops.append(Write(start, end, f.inode, offset, data))
        f.offset = offset + ret

    def _call_pwrite64(self, start, end, pid, args, ret, _):
        f = self._file(pid, args[0])
        if f is not None:
            self.ops.append(Write(start, end, f.inode, int(args[3]), _bytes(args[1])[:ret]))

    def _call_sendto(self, start, end, pid, args, ret, _):
        self._sent(start, end, args, _bytes(args[1])[:ret])

    def _call_recvfrom(self, start, end, pid, args, ret, _):
        m = TCP_PEER.search(_fd(args[0])[1])
        if m and ret:
            self.ops.append(Received(start, end, int(m.group(1)), _bytes(args[1])[:ret]))

    def _unsupported(self, start, end, pid, args, ret, _):
        if self._under_root(_fd(args[0])[1]) or TCP_PEER.search(_fd(args[0])[1]):
            raise TraceError(f"trace line {end + 1}: a vectored write, not modelled")

    _call_writev = _call_pwritev = _call_pwritev2 = _call_sendmsg = _call_recvmsg = _unsupported

    def _call_fsync(self, start, end, pid, args, ret, _):
        f = self._file(pid, args[0])
        if f is not None:
            self.ops.append(Sync(start, end, f.inode))

    _call_fdatasync = _call_fsync

    def _call_fallocate(self, start, end, pid, args, ret, _):
        f = self._file(pid, args[0])
        if f is None:
            return
        if args[1] not in ("0", FALLOC_FL_KEEP_SIZE):
            raise TraceError(f"trace line {end + 1}: fallocate mode {args[1]} not modelled")
        if args[1] == "0":
            self.ops.append(Resize(start, end, f.inode, int(args[2]) + int(args[3]), True))

    def _call_ftruncate(self, start, end, pid, args, ret, _):
        f = self._file(pid, args[0])
        if f is not None:
            self.ops.append(Resize(start, end, f.inode, int(args[1]), False))

    def _call_truncate(self, start, end, pid, args, ret, _):
        inode = self.live.get(self._resolve(None, _path(args[0])))
        if inode is not None:
            self.ops.append(Resize(start, end, inode, int(args[1]), False))

    def _mkdir(self, start, end, path):
        if self._under_root(path):
            inode = self._new(True)
            self.live[path] = inode
            self._entry(start, end, [(path, inode)])

    def _call_mkdir(self, start, end, pid, args, ret, _):
        self._mkdir(start, end, self._resolve(None, _path(args[0])))

    def _call_mkdirat(self, start, end, pid, args, ret, _):
        self._mkdir(start, end, self._resolve(args[0], _path(args[1])))

    def _unlink(self, start, end, path):
        if self._under_root(path) and path in self.live:
            del self.live[path]
            self._entry(start, end, [(path, None)])

    def _call_unlink(self, start, end, pid, args, ret, _):
        self._unlink(start, end, self._resolve(None, _path(args[0])))

    _call_rmdir = _call_unlink

    def _call_unlinkat(self, start, end, pid, args, ret, _):
        self._unlink(start, end, self._resolve(args[0], _path(args[1])))

    def _link(self, start, end, old, new):
        if self._under_root(new) and old in self.live:
            self.live[new] = self.live[old]
            self._entry(start, end, [(new, self.live[old])])

    def _call_link(self, start, end, pid, args, ret, _):
        self._link(start, end, self._resolve(None, _path(args[0])), _path(args[1]))

    def _call_linkat(self, start, end, pid, args, ret, _):
        old = self._resolve(args[0], _path(args[1]))
        self._link(start, end, old, self._resolve(args[2], _path(args[3])))

    def _rename(self, start, end, old, new):
        if not (self._under_root(old) or self._under_root(new)):
            return
        if not (self._under_root(old) and self._under_root(new)):
            raise TraceError(f"trace line {end + 1}: a rename across the root, not modelled")
        inode = self.live.get(old)
        if inode is None:
            return
        for path in [p for p in self.live if p == old or p.startswith(old + "/")]:
            self.live[new + path[len(old) :]] = self.live.pop(path)
        self._entry(start, end, [(old, None), (new, inode)])

    def _call_rename(self, start, end, pid, args, ret, _):
        self._rename(start, end, self._resolve(None, _path(args[0])), _path(args[1]))

    def _call_renameat(self, start, end, pid, args, ret, _):
        self._rename(
            start,
            end,
            self._resolve(args[0], _path(args[1])),
            self._resolve(args[2], _path(args[3])),
        )

    _call_renameat2 = _call_renameat

    def _size_now(self, inode: int) -> int:
        size = len(self.inodes[inode].base)
        for op in self.ops:
            if isinstance(op, Write) and op.inode == inode:
                size = max(size, op.offset + len(op.data))
            elif isinstance(op, Resize) and op.inode == inode:
                size = max(size, op.size) if op.grow_only else op.size
        return size

    # -- what the run had done at a point -------------------------------------------------------

    def points(self) -> list[int]:
        """Trace lines after which a power cut can leave a different state."""
        return sorted({op.end for op in self.ops if isinstance(op, (Write, Resize, Sync, Entry))})

    def promised(self, point: int) -> dict[int, int]:
        """Per peer port, the highest seq an ACK or a WELCOME (its last_seq) sent before the
        cut promised to be durable (MIP/1)."""
        return self._highest(Sent, point, ACK)

    def received(self, point: int) -> dict[int, int]:
        """Per peer port, the highest seq of a DATA frame (MIP/1) read before the cut."""
        return self._highest(Received, point, DATA)

    def _highest(self, kind: type, point: int, frame_type: int) -> dict[int, int]:
        streams: dict[int, bytearray] = defaultdict(bytearray)
        best: dict[int, int] = {}
        for op in self.ops:
            # what was sent counts from the call's start, what was read once it returned
            if not isinstance(op, kind) or (op.start if kind is Sent else op.end) > point:
                continue
            buf = streams[op.port]
            buf += op.data
            while len(buf) >= FRAME_HEAD + 4:
                size = FRAME_HEAD + 4 + int.from_bytes(buf[8:12], "big") + MAC * (buf[5] & 1)
                if len(buf) < size:
                    break
                if buf[3] == frame_type:
                    seq = int.from_bytes(buf[16:24], "big")
                    best[op.port] = max(best.get(op.port, 0), seq)
                elif buf[3] == WELCOME and frame_type == ACK:
                    last_seq = json.loads(bytes(buf[FRAME_HEAD : size - 4]))["last_seq"]
                    best[op.port] = max(best.get(op.port, 0), last_seq)
                del buf[:size]
        return best

    def state(self, point: int, rng: random.Random) -> State:
        """One on-disk state a power cut right after trace line `point` could leave."""
        done = [op for op in self.ops if op.start <= point and not isinstance(op, (Sent, Received))]
        synced: dict[int, int] = {}  # inode -> start of its last completed sync
        for op in done:
            if isinstance(op, Sync) and op.end <= point:
                synced[op.inode] = max(synced.get(op.inode, -1), op.start)

        def durable(op: Op, inode: int) -> bool:
            return op.end <= point and op.end < synced.get(inode, -1)

        entries = {n: dict(i.entries) for n, i in self.inodes.items() if i.is_dir}
        content = {n: bytearray(i.base) for n, i in self.inodes.items() if not i.is_dir}
        choices = []
        for op in done:
            if isinstance(op, Entry):
                if all(durable(op, d) for d, _, _ in op.changes) or rng.random() < 0.5:
                    for directory, name, inode in op.changes:
                        if inode is None:
                            entries[directory].pop(name, None)
                        else:
                            entries[directory][name] = inode
                    choices.append("entry")
                else:
                    choices.append("no entry")
            elif isinstance(op, Write):
                how = "all" if durable(op, op.inode) else _how(rng, op)
                _apply_write(content[op.inode], op, how, rng)
                choices.append(how)
            elif isinstance(op, Resize) and (durable(op, op.inode) or rng.random() < 0.5):
                data = content[op.inode]
                size = max(len(data), op.size) if op.grow_only else op.size
                data[size:] = b""
                data.extend(bytes(size - len(data)))
        return State(self, entries, content, tuple(choices))


def _how(rng: random.Random, op: Write) -> str:
    return rng.choices(["all", "none", "cut", "blocks"], [3, 3, 2, 3])[0]


def _apply_write(data: bytearray, op: Write, how: str, rng: random.Random) -> None:
    start, end = op.offset, op.offset + len(op.data)
    keep: list[tuple[int, int]] = []
    if how == "all":
        keep = [(start, end)]
    elif how == "cut":
        cuts = range((start // SECTOR + 1) * SECTOR, end, SECTOR)
        if cuts:
            keep = [(start, rng.choice(cuts))]
    elif how == "blocks":
        for block in range(start // BLOCK * BLOCK, end, BLOCK):
            if rng.random() < 0.5:
                keep.append((max(start, block), min(end, block + BLOCK)))
    for a, b in keep:
        if len(data) < b:
            data.extend(bytes(b - len(data)))
        data[a:b] = op.data[a - start : b - start]


@dataclass
class State:
    trace: Trace
    entries: dict[int, dict[str, int]]
    content: dict[int, bytearray]
    choices: tuple[str, ...]

    def files(self) -> dict[str, bytes | None]:
        """Relative path -> content (None for a directory) of what is reachable from the root."""
        out: dict[str, bytes | None] = {}

        def walk(inode: int, rel: str) -> None:
            for name, child in sorted(self.entries[inode].items()):
                path = f"{rel}/{name}" if rel else name
                if child in self.entries:
                    out[path] = None
                    walk(child, path)
                else:
                    out[path] = bytes(self.content[child])

        walk(self.trace.root_inode, "")
        return out

    def write_to(self, target: Path) -> None:
        """Lay the state out under `target` (which must not exist), files 0600, dirs 0700;
        runs of zero blocks stay holes, as unwritten preallocated blocks read as zeros."""
        target.mkdir(mode=0o700)
        for rel, data in self.files().items():
            path = target / rel
            if data is None:
                path.mkdir(mode=0o700)
                continue
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, len(data))
                for at in range(0, len(data), BLOCK):
                    chunk = data[at : at + BLOCK]
                    if chunk.count(0) != len(chunk):
                        os.pwrite(fd, chunk, at)
            finally:
                os.close(fd)
