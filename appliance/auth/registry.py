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
and no JSON parsing: for 10,000 entries about a twentieth of a full parse, and
still 7-14 ms, so the daemon takes a changed file in by parts (`reload_part`),
one per loop iteration, and adopts it whole when the last part is in
(scripts/bench-provisioning measures both).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
from collections.abc import Iterable, Iterator
from itertools import compress, repeat
from operator import itemgetter, methodcaller, ne
from pathlib import Path
from typing import Any

from appliance.auth.identity import (
    Identity,
    RegistryError,
    check_fingerprint,
    encode_line,
    from_json,
    new_secret,
    one_line,
    parse_line,
    spec_identity,
)
from appliance.durable import write_atomic
from appliance.protocol import crypto

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

# (inode, size, mtime) of the file. Every write replaces the file and gives the new
# one an mtime above the old one's, so a poll never takes a new version for the one
# it has, even when the clock tick is coarse and an inode number is reused.
_Signature = tuple[int, int, int]

# The line layout (see the module docstring): entries are joined by ",\n", and JSON
# text never holds a raw newline, so splitting there finds every entry.
_HEAD = b'{"version": 1, "identities": {\n'
_TAIL = b"}}\n"
_SEPARATOR = b",\n"
_WHOLE = 1 << 62  # the part size that takes in any file at once


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
        identity = parse_line(ident, line)
        self.own[ident] = (line, identity)
        return identity

    def set(self, identity: Identity) -> None:
        line = encode_line(identity)
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
        # a reload taken in by parts (reload_part): the file's signature and bytes, its
        # parts still to split, the lines split so far
        self._partial: tuple[_Signature, bytes, Iterator, dict[str, bytes]] | None = None

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
            self._refused(signature)
            raise
        self._adopt(table, signature)

    def reload_if_changed(self) -> set[str]:
        """Reload if the file changed; return the ids to disconnect: identities this
        instance handed out active (from `get`, `list` or its own writes) that are now
        revoked, gone, or hold a new secret (rotated, restored).

        Changes made through this instance are reported too, so the caller has one
        place to learn which connections to close. If the file became unreadable,
        raises RegistryError once (see `load`). A reload by parts under way is finished
        (its parts kept), not begun again.
        """
        while (gone := self.reload_part(_WHOLE)) is None:
            pass  # the parts of a reload begun with smaller ones
        return gone

    def reload_part(self, part_bytes: int) -> set[str] | None:
        """`reload_if_changed` for the daemon's loop, which must not stop for a large
        file: each call splits about `part_bytes` more of a changed file, and the last
        one adopts it and returns what `reload_if_changed` would; None while parts
        remain. Lookups meanwhile see the version before. A write through this instance
        cancels a reload under way (it has read the newer file itself)."""
        if self._partial is None:
            stat = self._stat()
            if self._loaded and stat == self._signature:
                return self._gone()
            try:
                data, signature = self._read_bytes()
            except RegistryError:
                self._refused(stat)
                raise
            if data is None:
                self._adopt(_Table({}, self._known), None)
                return self._gone()
            self._partial = (signature, data, _split_parts(data, part_bytes), {})
        signature, data, parts, lines = self._partial
        part, last = next(parts, ({}, True))  # an empty registry has no parts
        if part is not None:
            lines.update(part)
            if not last:
                return None
        try:
            # not in the line layout (None): the whole parser, at once
            table = _Table(lines, self._known) if part is not None else self._read_document(data)
        except RegistryError:
            self._refused(signature)
            raise
        self._adopt(table, signature)
        return self._gone()

    def _refused(self, signature: _Signature | None) -> None:
        """A version that cannot be read: keep the last good copy, and do not read this
        one again (get() would re-raise on every HELLO) until the file changes."""
        self._loaded = True
        self._signature = signature
        self._partial = None

    def _gone(self) -> set[str]:
        """The identities handed out active that are now revoked, gone or rekeyed."""
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
                identity = spec_identity(spec)
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
            identity = dataclasses.replace(identity, secret=new_secret())
            table.set(identity)
        return crypto.secret_to_token(identity.secret)

    def restore(self, ident: str) -> str:
        """Make a revoked identity active again, with its settings and a new secret;
        return its token (shown once). A revoked token never works again."""
        with self._update() as table:
            identity = _existing(table, ident)
            if not identity.revoked:
                raise RegistryError(f"identity {ident!r} is not revoked")
            identity = dataclasses.replace(identity, secret=new_secret(), revoked=False)
            table.set(identity)
        return crypto.secret_to_token(identity.secret)

    def bind(self, ident: str, fingerprint: str | None) -> None:
        """Bind the identity to `fingerprint`, replacing any binding; None clears it
        (with trust on first use, the next HELLO binds it again)."""
        if fingerprint is not None:
            check_fingerprint(fingerprint)
        with self._update() as table:
            table.set(dataclasses.replace(_existing(table, ident), fingerprint=fingerprint))

    def bind_first_use(self, bindings: dict[str, str]) -> None:
        """Bind each identity of `bindings` (id -> fingerprint) that has no fingerprint yet
        (trust on first use): one locked read-modify-write and one file write for them all,
        since each costs the whole file. Ids that are gone are passed over; the caller
        reads back what each identity holds now. RegistryError for a bad fingerprint
        (before anything is written) or a file that cannot be written."""
        for fingerprint in bindings.values():
            check_fingerprint(fingerprint)
        with self._update() as table:
            for ident, fingerprint in bindings.items():
                identity = table.get(ident)
                # Checked under the lock: another process may have bound it since we last read.
                if identity is not None and identity.fingerprint is None:
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
        self._partial = None

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

    def _read_bytes(self) -> tuple[bytes | None, _Signature | None]:
        """The file's bytes (None: no file) and its signature."""
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            return None, None
        except OSError as e:
            raise RegistryError(f"{self.path}: cannot read: {e.strerror}") from None
        return data, (st.st_ino, st.st_size, st.st_mtime_ns)

    def _read(self) -> tuple[_Table, _Signature | None]:
        data, signature = self._read_bytes()
        if data is None:
            return _Table({}, self._known), None
        lines = _split(data)
        if lines is not None:
            return _Table(lines, self._known), signature
        return self._read_document(data), signature

    def _read_document(self, data: bytes) -> _Table:
        """Any other layout of the JSON: parsed and checked in full, as lines."""
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise RegistryError(f"{self.path}: not valid JSON: {one_line(e)}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("identities"), dict):
            raise RegistryError(f"{self.path}: not a registry (no identities object)")
        if doc.get("version") != FORMAT_VERSION:
            raise RegistryError(f"{self.path}: unsupported version {doc.get('version')!r}")
        table = _Table({}, self._known)
        for ident, entry in doc["identities"].items():
            try:
                identity = from_json(ident, entry)
            except RegistryError as e:
                raise RegistryError(f"{self.path}: identity {ident!r}: {e}") from None
            line = encode_line(identity)
            table.lines[ident] = line
            table.own[ident] = (line, identity)
        return table

    def _write(self, lines: dict[str, bytes], previous: _Signature | None) -> _Signature:
        body = _SEPARATOR.join(lines[ident] for ident in sorted(lines))
        data = _HEAD + body + (b"\n" if lines else b"") + _TAIL

        def later_than_previous(fd: int) -> None:
            # Same clock tick as the version it replaces: a reader polling by signature
            # must still see a change (a rotation keeps the size).
            mtime = os.fstat(fd).st_mtime_ns
            if previous is not None and mtime <= previous[2]:
                os.utime(fd, ns=(previous[2] + 1, previous[2] + 1))

        st = write_atomic(self.path, data, prepare=later_than_previous)  # 0600: secrets
        return (st.st_ino, st.st_size, st.st_mtime_ns)


# -- the file ----------------------------------------------------------------


def _existing(table: _Table, ident: str) -> Identity:
    identity = table.get(ident)
    if identity is None:
        raise RegistryError(f"unknown identity {ident!r}")
    return identity


def _split(data: bytes) -> dict[str, bytes] | None:
    """id -> line of a file in the line layout; None if it is laid out otherwise."""
    lines: dict[str, bytes] = {}
    for part, _ in _split_parts(data, len(data)):
        if part is None:
            return None
        lines.update(part)
    return lines


def _split_parts(data: bytes, part_bytes: int) -> Iterator[tuple[dict[str, bytes] | None, bool]]:
    """(id -> line, whether it is the last part) of a file in the line layout, about
    `part_bytes` of it per part; one None, and no more parts, as soon as it shows
    another layout. An empty registry has no parts.

    The daemon's loop waits while a part is split, so each treats all its lines at
    once with C-level calls (split, map, join) rather than a Python loop over them.
    A raw newline never occurs inside a line (JSON escapes it), so the separator
    found after `part_bytes` ends a whole line.
    """
    if not (data.startswith(_HEAD) and data.endswith(_TAIL)):
        yield None, True
        return
    pos, end = len(_HEAD), len(data) - len(_TAIL) - 1  # and the newline before the tail
    while pos < end:
        cut = data.find(_SEPARATOR, min(pos + part_bytes, end), end)
        cut = end if cut == -1 else cut
        part = _lines_of(data[pos:cut].split(_SEPARATOR))
        yield part, cut == end or part is None
        if part is None:
            return
        pos = cut + len(_SEPARATOR)


def _lines_of(rows: list[bytes]) -> dict[str, bytes] | None:
    """id -> line of these lines of the line layout; None if one is laid out otherwise."""
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
