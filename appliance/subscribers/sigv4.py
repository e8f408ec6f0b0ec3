"""AWS Signature Version 4, header-based, for S3 and S3-compatible stores.

    creds = Credentials("AKID...", "secret")
    signed = sign("PUT", "/bucket/key", [], {"host": "s3.example", ...},
                  payload_hash(body), creds, "us-east-1", "s3")
    headers = signed.headers        # what was given plus x-amz-date and authorization

The steps are the ones AWS documents, each its own function so the tests can
check them against AWS's published test-suite vectors (canonical request,
string to sign, Authorization header):

1. canonical request: method, canonical URI (each path segment URI-encoded,
   RFC 3986 unreserved characters kept, "/" kept; S3 paths are never
   normalized, other services may ask for dot-segment and double-slash removal),
   canonical query (each name and value encoded the same way, sorted by name
   then value, "name=" for an empty value), canonical headers (lower-case names
   sorted, values trimmed with inner runs of spaces collapsed, repeated headers
   joined by ","), the signed-header list, and the payload hash (hex SHA-256 of
   the body, or the literal UNSIGNED-PAYLOAD);
2. string to sign: algorithm, request time, credential scope
   (date/region/service/aws4_request), hex SHA-256 of the canonical request;
3. signing key: HMAC-SHA256 chain over "AWS4" + secret, date, region, service,
   "aws4_request";
4. signature: hex HMAC-SHA256 of the string to sign under the signing key.

Paths and query values go in *decoded* (the raw key "a b/ሴ"); the encoding
happens here, once. Standard library only.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~")

Headers = Mapping[str, str] | Iterable[tuple[str, str]]


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Signed:
    canonical_request: str
    string_to_sign: str
    signature: str
    authorization: str
    headers: list[tuple[str, str]]  # the request's headers, x-amz-date and Authorization added


def payload_hash(body: bytes | memoryview) -> str:
    return hashlib.sha256(body).hexdigest()


def uri_encode(text: str, *, keep_slash: bool = False) -> str:
    """Percent-encode UTF-8 bytes except A-Z a-z 0-9 - _ . ~ (and "/" if keep_slash)."""
    out = []
    for byte in text.encode("utf-8"):
        if byte in _UNRESERVED or (keep_slash and byte == 0x2F):
            out.append(chr(byte))
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


def normalize_path(path: str) -> str:
    """Remove "." and ".." segments and empty segments (double slashes); keep a trailing "/".

    Not for S3: S3 keys may contain "//" and "./" and are signed as they are."""
    out: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if out:
                out.pop()
            continue
        out.append(segment)
    result = "/" + "/".join(out)
    if out and (path.endswith("/") or path.endswith("/.") or path.endswith("/..")):
        result += "/"
    return result


def canonical_uri(path: str, *, normalize: bool = False) -> str:
    if not path:
        return "/"
    if normalize:
        path = normalize_path(path)
    return uri_encode(path, keep_slash=True)


def canonical_query(params: Iterable[tuple[str, str]]) -> str:
    pairs = sorted((uri_encode(name), uri_encode(value)) for name, value in params)
    return "&".join(f"{name}={value}" for name, value in pairs)


def _header_items(headers: Headers) -> Iterable[tuple[str, str]]:
    return headers.items() if isinstance(headers, Mapping) else headers


def canonical_headers(headers: Headers) -> tuple[str, str]:
    """(canonical header block with its final newline, signed-header list)."""
    merged: dict[str, list[str]] = {}
    for name, value in _header_items(headers):
        merged.setdefault(name.strip().lower(), []).append(" ".join(str(value).split()))
    names = sorted(merged)
    block = "".join(f"{name}:{','.join(merged[name])}\n" for name in names)
    return block, ";".join(names)


def canonical_request(
    method: str,
    path: str,
    params: Iterable[tuple[str, str]],
    headers: Headers,
    payload_sha256: str,
    *,
    normalize: bool = False,
) -> str:
    block, signed = canonical_headers(headers)
    return "\n".join(
        [
            method.upper(),
            canonical_uri(path, normalize=normalize),
            canonical_query(params),
            block,
            signed,
            payload_sha256,
        ]
    )


def credential_scope(date: str, region: str, service: str) -> str:
    return f"{date}/{region}/{service}/aws4_request"


def string_to_sign(amz_date: str, scope: str, canonical: str) -> str:
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    return f"{ALGORITHM}\n{amz_date}\n{scope}\n{digest}"


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode("utf-8"), hashlib.sha256).digest()


@lru_cache(maxsize=16)
def signing_key(secret_key: str, date: str, region: str, service: str) -> bytes:
    key = _hmac(("AWS4" + secret_key).encode("utf-8"), date)
    key = _hmac(key, region)
    key = _hmac(key, service)
    return _hmac(key, "aws4_request")


def amz_date(when: datetime | None = None) -> str:
    when = datetime.now(UTC) if when is None else when.astimezone(UTC)
    return when.strftime(AMZ_DATE_FORMAT)


def sign(
    method: str,
    path: str,
    params: Iterable[tuple[str, str]],
    headers: Headers,
    payload_sha256: str,
    credentials: Credentials,
    region: str,
    service: str,
    when: datetime | str | None = None,
    *,
    normalize: bool = False,
) -> Signed:
    """Sign a request; every header given is signed (so give only what will be sent).

    x-amz-date is taken from the headers when present, else from `when` (default:
    now) and added; so is x-amz-security-token for temporary credentials."""
    items = list(_header_items(headers))
    present = {name.lower(): value for name, value in items}
    if "x-amz-date" in present:
        stamp = present["x-amz-date"]
    else:
        stamp = when if isinstance(when, str) else amz_date(when)
        items.append(("X-Amz-Date", stamp))
    if credentials.session_token and "x-amz-security-token" not in present:
        items.append(("X-Amz-Security-Token", credentials.session_token))
    canonical = canonical_request(
        method, path, list(params), items, payload_sha256, normalize=normalize
    )
    scope = credential_scope(stamp[:8], region, service)
    to_sign = string_to_sign(stamp, scope, canonical)
    key = signing_key(credentials.secret_key, stamp[:8], region, service)
    signature = hmac.new(key, to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
    _, signed_headers = canonical_headers(items)
    authorization = (
        f"{ALGORITHM} Credential={credentials.access_key}/{scope}, "
        f"SignedHeaders={signed_headers}, Signature={signature}"
    )
    return Signed(
        canonical, to_sign, signature, authorization, [*items, ("Authorization", authorization)]
    )
