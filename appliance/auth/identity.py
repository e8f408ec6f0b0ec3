"""One identity: its fields, their bounds, and its entry in the registry's file.

Identity ids (and module names) are 1-128 printable ASCII characters without
spaces; fingerprints are 1-256 of the same; channels 0-65535. registry.py
keeps the file; this module says what one entry is.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from appliance.protocol import crypto

KINDS = ("core", "module", "user")
MAX_CHANNEL = 65535

_NAME = re.compile(r"[\x21-\x7e]{1,128}")
_FINGERPRINT = re.compile(r"[\x21-\x7e]{1,256}")
# Bounded digit count: int() refuses very long strings, and no channel needs more.
_CHANNEL_ITEM = re.compile(r"([0-9]{1,10})(?:-([0-9]{1,10}))?")


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


SPEC_KEYS = frozenset({"ident", "kind", "module", "channels", "fingerprint", "macs", "admin"})


def spec_identity(spec: object) -> Identity:
    if not isinstance(spec, dict):
        raise RegistryError(f"an identity spec is a dict, not {type(spec).__name__}")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise RegistryError(f"unknown identity field {unknown[0]!r}")
    if "ident" not in spec or "kind" not in spec:
        raise RegistryError("an identity needs 'ident' and 'kind'")
    return new_identity(**spec)


def new_secret() -> bytes:
    return secrets.token_bytes(crypto.SECRET_SIZE)


def check_fingerprint(fingerprint: object) -> None:
    if not isinstance(fingerprint, str) or not _FINGERPRINT.fullmatch(fingerprint):
        raise RegistryError(f"bad fingerprint {fingerprint!r}")


def new_identity(
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
        if not is_channel(channel):
            raise RegistryError(f"channel {channel!r} out of range 0-{MAX_CHANNEL}")
    identity = Identity(
        id=ident,
        kind=kind,
        module=module,
        secret=new_secret(),
        channels=frozenset(channels),
        fingerprint=fingerprint,
        macs=frozenset(macs),
        admin=admin,
        revoked=False,
        created_ns=time.time_ns(),
    )
    validate(identity)
    return identity


def is_channel(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_CHANNEL


def one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def validate(identity: Identity) -> None:
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
        check_fingerprint(identity.fingerprint)


def to_json(identity: Identity) -> dict:
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


def from_json(ident: str, entry: object) -> Identity:
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
    if not all(is_channel(c) for c in channels):
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
    validate(identity)
    return identity


# -- the line layout -------------------------------------------------------------


def encode_line(identity: Identity) -> bytes:
    """The identity's entry as one line of the file (without the separator)."""
    return (json.dumps(identity.id) + ": " + json.dumps(to_json(identity))).encode()


def parse_line(ident: str, line: bytes) -> Identity:
    try:
        entry = json.loads(b"{" + line + b"}")
    except (ValueError, UnicodeDecodeError) as e:
        raise RegistryError(f"not valid JSON: {one_line(e)}") from None
    if list(entry) != [ident]:
        raise RegistryError("its line holds another key")
    return from_json(ident, entry[ident])
