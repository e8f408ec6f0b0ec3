"""The server's HELLO checks (PROTOCOL.md §4 step 3) once the session found the HELLO well formed.

Every failure looks the same to the caller (None, answered with ERROR
AUTH_FAILED), and the work done does not depend on which check failed: an
unknown identity is checked against a dummy secret, and every check runs
before the verdict, so response times do not tell a prober which ids exist.

Two steps: check_hello writes nothing; with trust on first use the daemon then
binds the fingerprints of every HELLO it read in one loop iteration together
(bind_first_use), since each registry write is the whole file.
"""

from __future__ import annotations

import hmac
import logging
import secrets

from appliance.auth.identity import Identity, RegistryError, check_fingerprint
from appliance.auth.registry import Registry
from appliance.protocol import crypto

log = logging.getLogger(__name__)

# Random per process, so no client can hold a valid proof for it.
_DUMMY_SECRET = secrets.token_bytes(crypto.SECRET_SIZE)
_NO_MACS: frozenset[str] = frozenset()
SENDERS = frozenset({"core", "module"})


def check_hello(registry: Registry, hello: dict, server_nonce: str) -> Identity | None:
    """The identity the HELLO proves, or None if any check fails; writes nothing. An
    identity with no fingerprint bound passes whatever fingerprint the HELLO gives."""
    ident = hello["id"]
    fingerprint = hello["fingerprint"]
    # JSON may carry lone surrogates, which cannot be encoded for the HMAC. No
    # registered id contains one, and this test does not consult the registry.
    if not (_encodable(ident) and _encodable(fingerprint)):
        return None

    identity = registry.get(ident)
    if identity is None:
        secret, bound, macs, active = _DUMMY_SECRET, None, _NO_MACS, False
    else:
        secret, bound, macs = identity.secret, identity.fingerprint, identity.macs
        # A user reads; it never sends DATA (revision 2), so it never gets a session.
        active = not identity.revoked and identity.kind in SENDERS

    mac = hello["mac"]
    expected = crypto.hello_proof(secret, server_nonce, hello["nonce"], ident, fingerprint, mac)
    proof_ok = hmac.compare_digest(expected.encode(), hello["proof"].lower().encode())
    fingerprint_ok = bound is None or bound == fingerprint
    mac_ok = mac in macs
    # `&`, not `and`: no check is skipped because an earlier one failed.
    if not (active & proof_ok & fingerprint_ok & mac_ok):
        return None
    assert identity is not None
    return identity


def to_bind(identity: Identity, hello: dict) -> bool:
    """Whether trust on first use binds the HELLO's fingerprint to this proven identity."""
    return identity.fingerprint is None and bool(hello["fingerprint"])


def bind_first_use(registry: Registry, proven: list[tuple[Identity, str]]) -> list[Identity | None]:
    """Bind each proven identity to its HELLO's fingerprint, in one registry write; per
    pair, the identity as bound, or None when it cannot be had (a bad fingerprint, a
    registry that cannot be written, or the identity changed meanwhile). When two HELLOs
    of one id give different fingerprints, the first binds and the second fails."""
    bindings: dict[str, str] = {}
    for identity, fingerprint in proven:
        if _bindable(identity.id, fingerprint):
            bindings.setdefault(identity.id, fingerprint)
    try:
        if bindings:  # none left: not even the locked read of the file
            registry.bind_first_use(bindings)
    except RegistryError as e:
        log.warning("cannot bind fingerprints on first use (%d cores): %s", len(bindings), e)
        return [None] * len(proven)
    return [_bound(registry, identity, fingerprint) for identity, fingerprint in proven]


def _bindable(ident: str, fingerprint: str) -> bool:
    try:
        check_fingerprint(fingerprint)
    except RegistryError as e:
        log.warning("cannot bind a fingerprint to %s on first use: %s", ident, e)
        return False
    return True


def _bound(registry: Registry, identity: Identity, fingerprint: str) -> Identity | None:
    current = registry.get(identity.id)
    # The binding is made under the registry lock from the file, not from our
    # copy: another process may have bound a different fingerprint, revoked the
    # identity or replaced it since we read it.
    if (
        current is None
        or current.revoked
        or current.secret != identity.secret
        or current.fingerprint != fingerprint
    ):
        return None
    log.info("bound fingerprint %s to %s on first use", fingerprint, identity.id)
    return current


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
