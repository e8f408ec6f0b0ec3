"""Handshake proofs, session keys and frame MACs (PROTOCOL.md §4, §5)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Callable

MAC_ALGORITHMS = ("hmac-sha256", "blake2s", "none")
# What an identity may choose unless it is given a policy: "none" is opt-in.
DEFAULT_MACS = ("hmac-sha256", "blake2s")
SECRET_SIZE = 32

MacFn = Callable[[bytes], bytes]


def random_nonce() -> str:
    """A fresh hex32 nonce (16 random bytes)."""
    return secrets.token_hex(16)


def token_to_secret(token: str) -> bytes:
    """Decode a token (unpadded base64url of a 32-byte secret); ValueError if malformed."""
    if not token or "=" in token or len(token) != 43:
        raise ValueError("a token is 43 characters of unpadded base64url")
    secret = base64.urlsafe_b64decode(token + "=")
    if base64.urlsafe_b64encode(secret).rstrip(b"=").decode() != token:
        raise ValueError("a token is 43 characters of unpadded base64url")
    return secret


def secret_to_token(secret: bytes) -> str:
    return base64.urlsafe_b64encode(secret).rstrip(b"=").decode()


def _hmac_hex(secret: bytes, text: str) -> str:
    return hmac.new(secret, text.encode(), hashlib.sha256).hexdigest()


# Revision 2 (PROTOCOL.md §9): both proofs and the session key cover `mac`, so a
# HELLO whose `mac` was rewritten in transit fails its proof.


def hello_proof(secret: bytes, sn: str, cn: str, ident: str, fingerprint: str, mac: str) -> str:
    return _hmac_hex(secret, f"MIP1-HELLO|{sn}|{cn}|{ident}|{fingerprint}|{mac}")


def welcome_proof(secret: bytes, sn: str, cn: str, ident: str, mac: str) -> str:
    return _hmac_hex(secret, f"MIP1-WELCOME|{sn}|{cn}|{ident}|{mac}")


def session_key(secret: bytes, sn: str, cn: str, ident: str, mac: str) -> bytes:
    text = f"MIP1-SESSION|{sn}|{cn}|{ident}|{mac}"
    return hmac.new(secret, text.encode(), hashlib.sha256).digest()


def make_mac(algorithm: str, key: bytes) -> MacFn | None:
    """The 16-byte frame MAC for a session, or None for "none".

    HMAC-SHA256 is computed from inner and outer SHA-256 states keyed once per
    session: copying a prepared state costs about half of `hmac.digest` per frame.
    """
    if algorithm == "none":
        return None
    if algorithm == "blake2s":
        blake2s = hashlib.blake2s

        def blake(data: bytes) -> bytes:
            return blake2s(data, key=key, digest_size=16).digest()

        return blake
    if algorithm != "hmac-sha256":
        raise ValueError(f"unknown MAC algorithm {algorithm!r}")
    block = key.ljust(64, b"\0")  # a 32-byte key never needs hashing first
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
    outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))
    inner_copy = inner.copy
    outer_copy = outer.copy

    def hmac_sha256(data: bytes) -> bytes:
        h = inner_copy()
        h.update(data)
        o = outer_copy()
        o.update(h.digest())
        return o.digest()[:16]

    return hmac_sha256
