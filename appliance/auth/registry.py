"""The identity registry: who may connect, with which secret, to which channels.

One JSON file in the data dir. It holds every identity's secret (the server
computes HMACs with it, so a hash would not do), hence mode 0600. One identity
per line, so a reader can tell which entries changed without parsing the rest:

    {"version": 1, "identities": {
    "m-0007/core-2": {"kind": "core", "module": "m-0007", "token": "AAEC...", ...},
    "m-0008/core-0": {...}
    }}

with, in each entry:

    "kind": "core",                       core | module | user
    "module": "m-0007",                   the module of a core; null otherwise
    "token": "AAECAwQFBgcICQoLDA0ODxAR...",  unpadded base64url of the 32-byte secret
    "channels": [1, 2, 7],                cores, modules: may write; users: may read
    "fingerprint": "sha256:f6298bff...",  bound hardware fingerprint, or null
    "macs": ["blake2s", "hmac-sha256"],   MAC algorithms it may choose in HELLO
    "admin": false,                       users only: may administer
    "revoked": false,
    "created_ns": 1700000000000000000

Any other layout of the same JSON (a hand edit, an older version of this module)
is read too, in full, and written back in this one.

Identity ids (and module names) are 1-128 printable ASCII characters without
spaces. Fingerprints are 1-256 of the same.

The CLI and the running daemon may both write the file. A writer holds an
exclusive flock on the sibling "<name>.lock" for its read-modify-write, and
re-reads the file under that lock rather than trusting its in-memory copy.
It writes a temp file in the same directory, fsyncs it, renames it over the
old one and fsyncs the directory, so a reader never needs the lock and a power
cut leaves either the old or the new version, never a mix.

The daemon reloads the file while it serves, in its event loop, so a reload
costs work in proportion to what changed, not to the size of the fleet: an
entry is parsed and checked when it is first looked up (a HELLO for it), and
lines that did not change keep their parsed identity. A reload splits the file
into lines and compares those of the identities handed out, with C-level calls
and no JSON parsing: for 10,000 entries about a twentieth of a full parse
(scripts/bench-provisioning measures it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import itemgetter, methodcaller, ne
from pathlib import Path
from typing import Any

from appliance.durable import fsync_dir
from appliance.protocol import crypto

log = logging.getLogger(__name__)

KINDS = ("core", "module", "user")
FORMAT_VERSION = 1
MAX_CHANNEL = 65535

_NAME = re.compile(r"[\x21-\x7e]{1,128}")
_FINGERPRINT = re.compile(r"[\x21-\x7e]{1,256}")
# Bounded digit count: int() refuses very long strings, and no channel needs more.
_CHANNEL_ITEM = re.compile(r"([0-9]{1,10})(?:-([0-9]{1,10}))?")

# (inode, size, mtime) of the file. Every write replaces the file and gives the new
# one an mtime above the old one's, so a poll never takes a new version for the one
# it has, even when the clock tick is coarse and an inode number is reused.
_Signature = tuple[int, int, int]

# The line layout (see the module docstring): entries are joined by ",\n", and JSON
# text never holds a raw newline, so splitting there finds every entry.
_HEAD = b'{"version": 1, "identities": {\n'
_TAIL = b"}}\n"
_SEPARATOR = b",\n"


class RegistryError(Exception):
    """A registry operation or file that cannot be accepted; the message is one line.

    `index`: from `add_many`, the position of the spec at fault (None otherwise).
    """

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


@dataclass(frozen=True)
class Identity:
    id: str
    kind: str
    module: str | None
    # repr=False: an Identity may end up in a log line or a traceback.
    secret: bytes = field(repr=False)
    channels: frozenset[int]
    fingerprint: str | None
    macs: frozenset[str]
    admin: bool
    revoked: bool
    created_ns: int


def parse_channels(text: str) -> list[int]:
    """Parse a channel list: "1,2,5-7" -> [1, 2, 5, 6, 7], sorted, no repeats; "" -> []."""
    if not text.strip():
        return []
    channels: set[int] = set()
    for item in text.split(","):
        item = item.strip()
        match = _CHANNEL_ITEM.fullmatch(item)
        if match is None:
            raise RegistryError(f"bad channel list {text!r}: expected e.g. 1,2,5-7")
        low = int(match[1])
        high = int(match[2]) if match[2] is not None else low
        for value in (low, high):
            if value > MAX_CHANNEL:
                raise RegistryError(f"channel {value} out of range 0-{MAX_CHANNEL}")
        if low > high:
            raise RegistryError(f"reversed channel range {item!r}")
        channels.update(range(low, high + 1))
    return sorted(channels)


def format_channels(channels: Iterable[int]) -> str:
    """The inverse of parse_channels: {1, 2, 3, 7} -> "1-3,7"; none -> ""."""
    ranges: list[list[int]] = []
    for channel in sorted(channels):
        if ranges and channel == ranges[-1][1] + 1:
            ranges[-1][1] = channel
        else:
            ranges.append([channel, channel])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


# id -> (its line, the identity parsed from it): each identity looked up or written
_Known = dict[str, tuple[bytes, Identity]]


class _Table:
    """One version of the file: id -> its line, each parsed when first looked up.

    `known` holds the registry's parsed identities (kept across versions, so an
    unchanged line is parsed once); what this table parses or sets goes to `own`
    until the registry adopts the table.
    """

    def __init__(self, lines: dict[str, bytes], known: _Known) -> None:
        self.lines = lines
        self.known = known
        self.own: _Known = {}
        self.dirty = False

    def get(self, ident: str) -> Identity | None:
        """The identity, or None if absent; RegistryError if its entry is bad."""
        line = self.lines.get(ident)
        if line is None:
            return None
        for cache in (self.own, self.known):
            entry = cache.get(ident)
            if entry is not None and entry[0] == line:
                return entry[1]
        identity = _parse_line(ident, line)
        self.own[ident] = (line, identity)
        return identity

    def set(self, identity: Identity) -> None:
        line = _line(identity)
        self.lines[identity.id] = line
        self.own[identity.id] = (line, identity)
        self.dirty = True


class Registry:
    """The registry file at `path`, cached in memory.

    Reads (`get`, `list`) use the cache and load the file on first use; the
    daemon calls `reload_if_changed` periodically to pick up what the CLI wrote.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._lines: dict[str, bytes] = {}
        self._known: _Known = {}
        self._bad: dict[str, bytes] = {}  # lines refused at lookup (each logged once)
        self._signature: _Signature | None = None
        self._loaded = False
        # Identities that were handed out active but whose entry has changed since the
        # last reload_if_changed, with the secret they had: revoked, rotated or gone?
        self._suspects: dict[str, bytes] = {}

    # -- reading -------------------------------------------------------------

    def load(self) -> None:
        """(Re)read the file; a missing file is an empty registry.

        A bad file raises RegistryError and leaves the last good copy in place
        (empty if there was none): the daemon keeps running, refuses whom it
        does not know, and `reload_if_changed` tries again once the file changes.
        In the line layout an entry is checked when it is first looked up: a bad
        one is refused (and logged) by `get`, and raises from `list`.
        """
        signature = self._stat()
        try:
            table, signature = self._read()
        except RegistryError:
            self._loaded = True  # get() must not re-read, and re-raise, on every HELLO
            self._signature = signature
            raise
        self._adopt(table, signature)

    def reload_if_changed(self) -> set[str]:
        """Reload if the file changed; return the ids to disconnect: identities this
        instance handed out active (from `get`, `list` or its own writes) that are now
        revoked, gone, or hold a new secret (rotated, restored).

        Changes made through this instance are reported too, so the caller has one
        place to learn which connections to close. If the file became unreadable,
        raises RegistryError once (see `load`).
        """
        if not self._loaded:
            self.load()
            return set()
        if self._stat() != self._signature:
            self.load()
        suspects, self._suspects = self._suspects, {}
        gone = set()
        for ident, secret in suspects.items():
            identity = self.get(ident)
            if identity is None or identity.revoked or identity.secret != secret:
                gone.add(ident)
        return gone

    def get(self, ident: str) -> Identity | None:
        """The identity, or None if unknown (or its entry in the file is bad)."""
        if not self._loaded:
            self.load()
        table = _Table(self._lines, self._known)
        try:
            identity = table.get(ident)
        except RegistryError as e:
            line = self._lines[ident]
            if self._bad.get(ident) != line:
                self._bad[ident] = line
                log.error("identities: %s: identity %r refused: %s", self.path, ident, e)
            return None
        self._known.update(table.own)
        return identity

    def list(self) -> list[Identity]:
        """Every identity, sorted by id; RegistryError names the first bad entry."""
        if not self._loaded:
            self.load()
        table = _Table(self._lines, self._known)
        out = []
        for ident in sorted(self._lines):
            try:
                out.append(table.get(ident))
            except RegistryError as e:
                raise RegistryError(f"{self.path}: identity {ident!r}: {e}") from None
        self._known.update(table.own)
        return out

    # -- writing -------------------------------------------------------------

    def add(
        self,
        ident: str,
        kind: str,
        *,
        module: str | None = None,
        channels: Iterable[int] = (),
        fingerprint: str | None = None,
        macs: Iterable[str] = crypto.DEFAULT_MACS,
        admin: bool = False,
    ) -> str:
        """Create an identity with a fresh secret and return its token (shown once).

        A revoked identity of the same id is replaced: re-adding it is how a revoked
        id comes back with new settings (its old token never works again).
        """
        spec = {"ident": ident, "kind": kind, "module": module, "channels": channels}
        spec |= {"fingerprint": fingerprint, "macs": macs, "admin": admin}
        return self.add_many([spec], replace_revoked=True)[ident]

    def add_many(
        self, specs: Iterable[dict[str, Any]], *, replace_revoked: bool = False
    ) -> dict[str, str]:
        """Create many identities with one locked read-modify-write and one file write.

        Each spec holds the arguments of `add` by name: "ident", "kind" and any of
        its options. Validated like `add`, all or nothing: a bad spec, or an id that
        exists (unless it is revoked and `replace_revoked`) or repeats, raises
        RegistryError (its `index` says which spec) and writes nothing. Returns
        {id: token} in the order of `specs`.
        """
        new: dict[str, Identity] = {}
        for index, spec in enumerate(specs):
            try:
                identity = _spec_identity(spec)
            except RegistryError as e:
                raise RegistryError(str(e), index) from None
            if identity.id in new:
                raise RegistryError(f"identity {identity.id!r} given twice", index)
            new[identity.id] = identity
        if not new:
            return {}
        with self._update() as table:
            for index, ident in enumerate(new):
                old = table.get(ident)
                if old is not None and not (old.revoked and replace_revoked):
                    state = " (revoked)" if old.revoked else ""
                    raise RegistryError(f"identity {ident!r} already exists{state}", index)
                table.set(new[ident])
        return {ident: crypto.secret_to_token(identity.secret) for ident, identity in new.items()}

    def revoke(self, ident: str) -> None:
        with self._update() as table:
            table.set(dataclasses.replace(_existing(table, ident), revoked=True))

    def rotate(self, ident: str) -> str:
        """Give an active identity a new secret and return its token (shown once).

        The old token fails from the moment the file is replaced; the daemon closes
        the identity's open connection with ERROR REVOKED (see `reload_if_changed`).
        """
        with self._update() as table:
            identity = _existing(table, ident)
            if identity.revoked:
                raise RegistryError(f"identity {ident!r} is revoked: restore it instead")
            identity = dataclasses.replace(identity, secret=_new_secret())
            table.set(identity)
        return crypto.secret_to_token(identity.secret)

    def restore(self, ident: str) -> str:
        """Make a revoked identity active again, with its settings and a new secret;
        return its token (shown once). A revoked token never works again."""
        with self._update() as table:
            identity = _existing(table, ident)
            if not identity.revoked:
                raise RegistryError(f"identity {ident!r} is not revoked")
            identity = dataclasses.replace(identity, secret=_new_secret(), revoked=False)
            table.set(identity)
        return crypto.secret_to_token(identity.secret)

    def bind(self, ident: str, fingerprint: str | None) -> None:
        """Bind the identity to `fingerprint`, replacing any binding; None clears it
        (with trust on first use, the next HELLO binds it again)."""
        if fingerprint is not None:
            _check_fingerprint(fingerprint)
        with self._update() as table:
            table.set(dataclasses.replace(_existing(table, ident), fingerprint=fingerprint))

    def bind_fingerprint(self, ident: str, fingerprint: str) -> None:
        """Bind `fingerprint` to the identity unless one is bound already (trust on first use)."""
        _check_fingerprint(fingerprint)
        with self._update() as table:
            identity = _existing(table, ident)
            # Checked under the lock: another process may have bound it since we last read.
            if identity.fingerprint is None:
                table.set(dataclasses.replace(identity, fingerprint=fingerprint))

    # -- file ----------------------------------------------------------------

    def _adopt(self, table: _Table, signature: _Signature | None) -> None:
        known = self._known
        if known:
            # Identities handed out whose line this version changed or dropped: compared
            # with C-level calls, since the daemon's loop waits (no hashing of lines).
            ids = list(known)
            now = map(table.lines.get, ids)
            changed = list(compress(ids, map(ne, now, map(itemgetter(0), known.values()))))
            for ident in changed:
                old = known.pop(ident)[1]
                if not old.revoked:
                    self._suspects.setdefault(ident, old.secret)
        known.update(table.own)
        self._lines = table.lines
        self._loaded = True
        self._signature = signature

    @contextlib.contextmanager
    def _update(self) -> Iterator[_Table]:
        """Read-modify-write under the lock; the caller edits the yielded table."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise RegistryError(f"{self._lock_path}: cannot open: {e.strerror}") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            # The file, not the cache: the CLI or the daemon may have written since.
            table, signature = self._read()
            yield table
            if table.dirty:
                try:
                    signature = self._write(table.lines, signature)
                except OSError as e:
                    raise RegistryError(f"{self.path}: cannot write: {e.strerror}") from None
            self._adopt(table, signature)
        finally:
            os.close(lock)  # releases the flock

    def _stat(self) -> _Signature | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _read(self) -> tuple[_Table, _Signature | None]:
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            return _Table({}, self._known), None
        except OSError as e:
            raise RegistryError(f"{self.path}: cannot read: {e.strerror}") from None
        signature = (st.st_ino, st.st_size, st.st_mtime_ns)
        lines = _split(data)
        if lines is not None:
            return _Table(lines, self._known), signature
        return self._read_document(data), signature

    def _read_document(self, data: bytes) -> _Table:
        """Any other layout of the JSON: parsed and checked in full, as lines."""
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise RegistryError(f"{self.path}: not valid JSON: {_one_line(e)}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("identities"), dict):
            raise RegistryError(f"{self.path}: not a registry (no identities object)")
        if doc.get("version") != FORMAT_VERSION:
            raise RegistryError(f"{self.path}: unsupported version {doc.get('version')!r}")
        table = _Table({}, self._known)
        for ident, entry in doc["identities"].items():
            try:
                identity = _from_json(ident, entry)
            except RegistryError as e:
                raise RegistryError(f"{self.path}: identity {ident!r}: {e}") from None
            line = _line(identity)
            table.lines[ident] = line
            table.own[ident] = (line, identity)
        return table

    def _write(self, lines: dict[str, bytes], previous: _Signature | None) -> _Signature:
        body = _SEPARATOR.join(lines[ident] for ident in sorted(lines))
        data = _HEAD + body + (b"\n" if lines else b"") + _TAIL
        directory = self.path.parent
        # mkstemp creates the file 0600, so the secrets are never readable by others.
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                st = os.fstat(f.fileno())
                if previous is not None and st.st_mtime_ns <= previous[2]:
                    # Same clock tick as the version it replaces: a reader polling by
                    # signature must still see a change (rotate keeps the size).
                    mtime = previous[2] + 1
                    os.utime(f.fileno(), ns=(mtime, mtime))
                    st = os.fstat(f.fileno())
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fsync_dir(directory)  # without it the rename itself may not survive a power cut
        return (st.st_ino, st.st_size, st.st_mtime_ns)


# -- helpers -------------------------------------------------------------------


_SPEC_KEYS = frozenset({"ident", "kind", "module", "channels", "fingerprint", "macs", "admin"})


def _spec_identity(spec: object) -> Identity:
    if not isinstance(spec, dict):
        raise RegistryError(f"an identity spec is a dict, not {type(spec).__name__}")
    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown:
        raise RegistryError(f"unknown identity field {unknown[0]!r}")
    if "ident" not in spec or "kind" not in spec:
        raise RegistryError("an identity needs 'ident' and 'kind'")
    return _new_identity(**spec)


def _new_secret() -> bytes:
    return secrets.token_bytes(crypto.SECRET_SIZE)


def _check_fingerprint(fingerprint: object) -> None:
    if not isinstance(fingerprint, str) or not _FINGERPRINT.fullmatch(fingerprint):
        raise RegistryError(f"bad fingerprint {fingerprint!r}")


def _new_identity(
    ident: str,
    kind: str,
    *,
    module: str | None = None,
    channels: Iterable[int] = (),
    fingerprint: str | None = None,
    macs: Iterable[str] = crypto.DEFAULT_MACS,
    admin: bool = False,
) -> Identity:
    """A validated identity with a fresh secret (for `add` and `add_many`)."""
    channels = tuple(channels)
    for channel in channels:
        if not _is_channel(channel):
            raise RegistryError(f"channel {channel!r} out of range 0-{MAX_CHANNEL}")
    identity = Identity(
        id=ident,
        kind=kind,
        module=module,
        secret=_new_secret(),
        channels=frozenset(channels),
        fingerprint=fingerprint,
        macs=frozenset(macs),
        admin=admin,
        revoked=False,
        created_ns=time.time_ns(),
    )
    _validate(identity)
    return identity


def _existing(table: _Table, ident: str) -> Identity:
    identity = table.get(ident)
    if identity is None:
        raise RegistryError(f"unknown identity {ident!r}")
    return identity


def _is_channel(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_CHANNEL


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _validate(identity: Identity) -> None:
    """The rules for an identity, both for `add` and for every entry read from the file."""
    if not isinstance(identity.id, str) or not _NAME.fullmatch(identity.id):
        raise RegistryError(
            f"bad identity id {identity.id!r}: 1-128 printable ASCII characters, no spaces"
        )
    kind = identity.kind
    if kind not in KINDS:
        raise RegistryError(f"bad kind {kind!r}: one of {', '.join(KINDS)}")
    if kind == "core":
        if identity.module is None:
            raise RegistryError(f"core {identity.id!r} needs a module")
        if not isinstance(identity.module, str) or not _NAME.fullmatch(identity.module):
            raise RegistryError(f"bad module name {identity.module!r}")
    elif identity.module is not None:
        raise RegistryError(f"only a core belongs to a module, not a {kind}")
    if identity.admin and kind != "user":
        raise RegistryError(f"only a user can be an admin, not a {kind}")
    unknown = sorted(identity.macs - set(crypto.MAC_ALGORITHMS))
    if unknown:
        raise RegistryError(
            f"unknown MAC algorithm {unknown[0]!r}: one of {', '.join(crypto.MAC_ALGORITHMS)}"
        )
    if not identity.macs:
        raise RegistryError("no MAC algorithm allowed: it could never connect")
    if identity.fingerprint is not None:
        _check_fingerprint(identity.fingerprint)


def _to_json(identity: Identity) -> dict:
    return {
        "kind": identity.kind,
        "module": identity.module,
        "token": crypto.secret_to_token(identity.secret),
        "channels": sorted(identity.channels),
        "fingerprint": identity.fingerprint,
        "macs": sorted(identity.macs),
        "admin": identity.admin,
        "revoked": identity.revoked,
        "created_ns": identity.created_ns,
    }


def _from_json(ident: str, entry: object) -> Identity:
    if not isinstance(entry, dict):
        raise RegistryError("not an object")

    def get(key: str, kind: type | tuple[type, ...]) -> Any:
        value = entry.get(key)
        # bool is an int to isinstance; a channel or a timestamp must not be true.
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise RegistryError(f"{key!r} missing or of the wrong type")
        return value

    try:
        secret = crypto.token_to_secret(get("token", str))
    except ValueError:
        raise RegistryError("'token' is not a valid token") from None
    channels = get("channels", list)
    if not all(_is_channel(c) for c in channels):
        raise RegistryError(f"'channels' must be integers 0-{MAX_CHANNEL}")
    macs = get("macs", list)
    if not all(isinstance(m, str) for m in macs):
        raise RegistryError("'macs' must be strings")
    identity = Identity(
        id=ident,
        kind=get("kind", str),
        module=get("module", (str, type(None))),
        secret=secret,
        channels=frozenset(channels),
        fingerprint=get("fingerprint", (str, type(None))),
        macs=frozenset(macs),
        admin=get("admin", bool),
        revoked=get("revoked", bool),
        created_ns=get("created_ns", int),
    )
    _validate(identity)
    return identity


# -- the line layout -------------------------------------------------------------


def _line(identity: Identity) -> bytes:
    """The identity's entry as one line of the file (without the separator)."""
    return (json.dumps(identity.id) + ": " + json.dumps(_to_json(identity))).encode()


def _split(data: bytes) -> dict[str, bytes] | None:
    """id -> line of a file in the line layout; None if it is laid out otherwise.

    The daemon's loop waits while this runs, so it treats all lines at once with
    C-level calls (split, map, join) rather than a Python loop over them.
    """
    if not (data.startswith(_HEAD) and data.endswith(_TAIL)):
        return None
    if len(data) == len(_HEAD) + len(_TAIL):
        return {}
    rows = data.split(_SEPARATOR)
    rows[0] = rows[0][len(_HEAD) :]
    rows[-1] = rows[-1][: -len(_TAIL) - 1]  # and the newline before the tail
    # An id has no spaces, so the first '": ' ends the key. A key with an escape (an
    # id holding a quote or a backslash) is left to the full parser. Whatever else a
    # hand edit did is found when the line is parsed: its JSON, and its key again.
    ends = list(map(methodcaller("find", b'": '), rows))
    if -1 in ends:
        return None
    keys = b"\n" + b"\n".join(map(bytes.__getitem__, rows, map(slice, repeat(0), ends)))
    if b"\\" in keys or keys.count(b'\n"') != len(rows):
        return None
    try:
        ids = keys.decode("ascii").split('\n"')  # ["", id0, id1, ...]
    except UnicodeDecodeError:
        return None
    return dict(zip(ids[1:], rows, strict=True))


def _parse_line(ident: str, line: bytes) -> Identity:
    try:
        entry = json.loads(b"{" + line + b"}")
    except (ValueError, UnicodeDecodeError) as e:
        raise RegistryError(f"not valid JSON: {_one_line(e)}") from None
    if list(entry) != [ident]:
        raise RegistryError("its line holds another key")
    return _from_json(ident, entry[ident])
