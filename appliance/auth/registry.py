"""The identity registry: who may connect, with which secret, to which channels.

One JSON file in the data dir. It holds every identity's secret (the server
computes HMACs with it, so a hash would not do), hence mode 0600:

    {
      "version": 1,
      "identities": {
        "m-0007/core-2": {
          "kind": "core",                       core | module | user
          "module": "m-0007",                   the module of a core; null otherwise
          "token": "AAECAwQFBgcICQoLDA0ODxAR...",  unpadded base64url of the 32-byte secret
          "channels": [1, 2, 7],                cores, modules: may write; users: may read
          "fingerprint": "sha256:f6298bff...",  bound hardware fingerprint, or null
          "macs": ["blake2s", "hmac-sha256"],   MAC algorithms it may choose in HELLO
          "admin": false,                       users only: may administer
          "revoked": false,
          "created_ns": 1700000000000000000
        }
      }
    }

Identity ids (and module names) are 1-128 printable ASCII characters without
spaces. Fingerprints are 1-256 of the same.

The CLI and the running daemon may both write the file. A writer holds an
exclusive flock on the sibling "<name>.lock" for its read-modify-write, and
re-reads the file under that lock rather than trusting its in-memory copy.
It writes a temp file in the same directory, fsyncs it, renames it over the
old one and fsyncs the directory, so a reader never needs the lock and a power
cut leaves either the old or the new version, never a mix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.protocol import crypto

KINDS = ("core", "module", "user")
FORMAT_VERSION = 1
MAX_CHANNEL = 65535

_NAME = re.compile(r"[\x21-\x7e]{1,128}")
_FINGERPRINT = re.compile(r"[\x21-\x7e]{1,256}")
# Bounded digit count: int() refuses very long strings, and no channel needs more.
_CHANNEL_ITEM = re.compile(r"([0-9]{1,10})(?:-([0-9]{1,10}))?")

# (inode, size, mtime) of the file: every write replaces it, and each change this
# module makes (add, revoke, bind) also changes its size, so a poll cannot miss one
# even when the clock tick is coarse and an inode number is reused.
_Signature = tuple[int, int, int]


class RegistryError(Exception):
    """A registry operation or file that cannot be accepted; the message is one line."""


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


class Registry:
    """The registry file at `path`, cached in memory.

    Reads (`get`, `list`) use the cache and load the file on first use; the
    daemon calls `reload_if_changed` periodically to pick up what the CLI wrote.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._identities: dict[str, Identity] = {}
        self._signature: _Signature | None = None
        self._loaded = False
        # Active ids as last reported by reload_if_changed, and whether the
        # cache may have changed since (a reload, or a write by this instance).
        self._active_seen: set[str] = set()
        self._changed = False

    # -- reading -------------------------------------------------------------

    def load(self) -> None:
        """(Re)read the file; a missing file is an empty registry.

        A bad file raises RegistryError and leaves the last good copy in place
        (empty if there was none): the daemon keeps running, refuses whom it
        does not know, and `reload_if_changed` tries again once the file changes.
        """
        signature = self._stat()
        try:
            identities, signature = self._read()
        except RegistryError:
            self._loaded = True  # get() must not re-read, and re-raise, on every HELLO
            self._signature = signature
            raise
        self._adopt(identities, signature)

    def reload_if_changed(self) -> set[str]:
        """Reload if the file changed; return the ids active at the previous call, but no longer.

        Revocations made through this instance are reported too, so the caller
        has one place to learn which connections to close. If the file became
        unreadable, raises RegistryError once (see `load`).
        """
        if not self._loaded:
            self.load()
            return set()
        if self._stat() != self._signature:
            self.load()
        if not self._changed:
            return set()
        self._changed = False
        active = _active(self._identities)
        gone = self._active_seen - active
        self._active_seen = active
        return gone

    def get(self, ident: str) -> Identity | None:
        if not self._loaded:
            self.load()
        return self._identities.get(ident)

    def list(self) -> list[Identity]:
        if not self._loaded:
            self.load()
        return [self._identities[ident] for ident in sorted(self._identities)]

    # -- writing -------------------------------------------------------------

    def add(
        self,
        ident: str,
        kind: str,
        *,
        module: str | None = None,
        channels: Iterable[int] = (),
        fingerprint: str | None = None,
        macs: Iterable[str] = crypto.MAC_ALGORITHMS,
        admin: bool = False,
    ) -> str:
        """Create an identity with a fresh secret and return its token (shown once)."""
        spec = {"ident": ident, "kind": kind, "module": module, "channels": channels}
        spec |= {"fingerprint": fingerprint, "macs": macs, "admin": admin}
        return self.add_many([spec])[ident]

    def add_many(self, specs: Iterable[dict[str, Any]]) -> dict[str, str]:
        """Create many identities with one locked read-modify-write and one file write.

        Each spec holds the arguments of `add` by name: "ident", "kind" and any of
        its options. Validated like `add`, all or nothing: a bad spec, or an id that
        exists or repeats, raises RegistryError and writes nothing. Returns
        {id: token} in the order of `specs`.
        """
        new: dict[str, Identity] = {}
        for spec in specs:
            if not isinstance(spec, dict):
                raise RegistryError(f"an identity spec is a dict, not {type(spec).__name__}")
            unknown = sorted(set(spec) - _SPEC_KEYS)
            if unknown:
                raise RegistryError(f"unknown identity field {unknown[0]!r}")
            if "ident" not in spec or "kind" not in spec:
                raise RegistryError("an identity needs 'ident' and 'kind'")
            identity = _new_identity(**spec)
            if identity.id in new:
                raise RegistryError(f"identity {identity.id!r} given twice")
            new[identity.id] = identity
        if not new:
            return {}
        with self._update() as identities:
            for ident in new:
                if ident in identities:
                    raise RegistryError(f"identity {ident!r} already exists")
            identities.update(new)
        return {ident: crypto.secret_to_token(identity.secret) for ident, identity in new.items()}

    def revoke(self, ident: str) -> None:
        with self._update() as identities:
            identity = _existing(identities, ident)
            identities[ident] = dataclasses.replace(identity, revoked=True)

    def bind_fingerprint(self, ident: str, fingerprint: str) -> None:
        """Bind `fingerprint` to the identity unless one is bound already (trust on first use)."""
        if not isinstance(fingerprint, str) or not _FINGERPRINT.fullmatch(fingerprint):
            raise RegistryError(f"bad fingerprint {fingerprint!r}")
        with self._update() as identities:
            identity = _existing(identities, ident)
            # Checked under the lock: another process may have bound it since we last read.
            if identity.fingerprint is None:
                identities[ident] = dataclasses.replace(identity, fingerprint=fingerprint)

    # -- file ----------------------------------------------------------------

    def _adopt(self, identities: dict[str, Identity], signature: _Signature | None) -> None:
        if not self._loaded:
            self._loaded = True
            self._active_seen = _active(identities)
        else:
            self._changed = True
        self._identities = identities
        self._signature = signature

    @contextlib.contextmanager
    def _update(self) -> Iterator[dict[str, Identity]]:
        """Read-modify-write under the lock; the caller edits the yielded dict in place."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise RegistryError(f"{self._lock_path}: cannot open: {e.strerror}") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            # The file, not the cache: the CLI or the daemon may have written since.
            current, signature = self._read()
            identities = dict(current)
            yield identities
            if identities != current:
                try:
                    signature = self._write(identities)
                except OSError as e:
                    raise RegistryError(f"{self.path}: cannot write: {e.strerror}") from None
            self._adopt(identities, signature)
        finally:
            os.close(lock)  # releases the flock

    def _stat(self) -> _Signature | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _read(self) -> tuple[dict[str, Identity], _Signature | None]:
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            return {}, None
        except OSError as e:
            raise RegistryError(f"{self.path}: cannot read: {e.strerror}") from None
        signature = (st.st_ino, st.st_size, st.st_mtime_ns)
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise RegistryError(f"{self.path}: not valid JSON: {_one_line(e)}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("identities"), dict):
            raise RegistryError(f"{self.path}: not a registry (no identities object)")
        if doc.get("version") != FORMAT_VERSION:
            raise RegistryError(f"{self.path}: unsupported version {doc.get('version')!r}")
        identities = {}
        for ident, entry in doc["identities"].items():
            try:
                identities[ident] = _from_json(ident, entry)
            except RegistryError as e:
                raise RegistryError(f"{self.path}: identity {ident!r}: {e}") from None
        return identities, signature

    def _write(self, identities: dict[str, Identity]) -> _Signature:
        doc = {
            "version": FORMAT_VERSION,
            "identities": {ident: _to_json(identities[ident]) for ident in sorted(identities)},
        }
        data = (json.dumps(doc, indent=2) + "\n").encode()
        directory = self.path.parent
        # mkstemp creates the file 0600, so the secrets are never readable by others.
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                st = os.fstat(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        # Without this the rename itself may not survive a power cut.
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return (st.st_ino, st.st_size, st.st_mtime_ns)


# -- helpers -------------------------------------------------------------------


_SPEC_KEYS = frozenset({"ident", "kind", "module", "channels", "fingerprint", "macs", "admin"})


def _new_identity(
    ident: str,
    kind: str,
    *,
    module: str | None = None,
    channels: Iterable[int] = (),
    fingerprint: str | None = None,
    macs: Iterable[str] = crypto.MAC_ALGORITHMS,
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
        secret=secrets.token_bytes(crypto.SECRET_SIZE),
        channels=frozenset(channels),
        fingerprint=fingerprint,
        macs=frozenset(macs),
        admin=admin,
        revoked=False,
        created_ns=time.time_ns(),
    )
    _validate(identity)
    return identity


def _active(identities: dict[str, Identity]) -> set[str]:
    return {ident for ident, identity in identities.items() if not identity.revoked}


def _existing(identities: dict[str, Identity], ident: str) -> Identity:
    identity = identities.get(ident)
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
    if identity.fingerprint is not None and (
        not isinstance(identity.fingerprint, str)
        or not _FINGERPRINT.fullmatch(identity.fingerprint)
    ):
        raise RegistryError(f"bad fingerprint {identity.fingerprint!r}")


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
