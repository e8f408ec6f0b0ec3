"""A small S3 client on http.client: what the uploader needs, signed with sigv4.py.

    client = S3Client(S3Config(bucket="frames", endpoint="http://127.0.0.1:9000",
                               credentials=Credentials("key", "secret")))
    client.put_object("a/b.jsonl.gz", body)                 # -> ETag
    client.upload("big.jsonl.gz", body)                     # multipart above part_size

Works with AWS S3, MinIO, moto, Ceph RGW and GCS's XML API (HMAC keys,
endpoint https://storage.googleapis.com, region "auto"). Addressing:
"virtual" (bucket.host/key), "path" (host/bucket/key) or "auto": virtual for
AWS's own endpoint when the bucket name is DNS-safe, path for any custom
endpoint (MinIO and moto want path style). http and https; one keep-alive
connection, reopened after any error.

Every call makes one attempt: a network error, or an error status, raises
S3Error with `retryable` set for what is worth retrying (no answer, 5xx, 429,
RequestTimeout, SlowDown). Retrying, with backoff, is the caller's business
(cloud.py) — except inside `upload`, which only sequences the multipart calls.
A multipart upload that fails is aborted (best effort: when the store is away
the abort fails too; a lifecycle rule AbortIncompleteMultipartUpload on the
bucket removes such leftover parts).
"""

from __future__ import annotations

import contextlib
import http.client
import ssl
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from appliance.subscribers import sigv4

MIN_PART_SIZE = 5 * 1024 * 1024  # S3's smallest part (all but the last)
MAX_PARTS = 10000
RETRYABLE_CODES = {
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "SlowDown",
    "InternalError",
    "ServiceUnavailable",
    "OperationAborted",
}
_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
# what a request on a keep-alive connection the server has closed meanwhile runs into
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


class S3Error(Exception):
    """A request failed: `status` 0 when there was no HTTP answer at all."""

    def __init__(self, message: str, *, status: int = 0, code: str = "", retryable: bool = True):
        super().__init__(message)
        self.status = status
        self.code = code
        self.retryable = retryable


@dataclass
class S3Config:
    bucket: str
    credentials: sigv4.Credentials
    endpoint: str | None = None  # scheme://host[:port]; None: AWS's regional endpoint
    region: str = "us-east-1"
    addressing: str = "auto"  # "auto", "path" or "virtual"
    timeout: float = 30.0
    payload: str = "hashed"  # "hashed": SHA-256 of the body is signed; "unsigned": UNSIGNED-PAYLOAD
    part_size: int = 16 * 1024 * 1024  # upload() goes multipart above this
    ssl_context: ssl.SSLContext | None = None
    service: str = "s3"
    extra_headers: dict[str, str] = field(default_factory=dict)  # e.g. x-amz-storage-class


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


def _dns_safe(bucket: str) -> bool:
    return (
        3 <= len(bucket) <= 63
        and "." not in bucket
        and bucket == bucket.lower()
        and all(c.isalnum() or c == "-" for c in bucket)
        and bucket[0].isalnum()
        and bucket[-1].isalnum()
    )


def _error_from(resp: Response, what: str) -> S3Error:
    code = message = ""
    if resp.body:
        try:
            root = ET.fromstring(resp.body)
            code = root.findtext("Code") or ""
            message = root.findtext("Message") or ""
        except ET.ParseError:
            message = " ".join(resp.body[:300].decode("utf-8", "replace").split())
    retryable = resp.status >= 500 or resp.status == 429 or code in RETRYABLE_CODES
    text = f"{what}: HTTP {resp.status} {code} {message}".rstrip()
    return S3Error(text, status=resp.status, code=code, retryable=retryable)


class S3Client:
    def __init__(
        self,
        config: S3Config,
        *,
        observer: Callable[[str, str, int], None] | None = None,
    ) -> None:
        self.config = config
        # observer(method, key or "", status): called after every answer (metrics, tests)
        self.observer = observer
        endpoint = config.endpoint or f"https://s3.{config.region}.amazonaws.com"
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"endpoint must be http(s)://host[:port], not {endpoint!r}")
        self.scheme = parts.scheme
        self.port = parts.port
        self.base_path = parts.path.rstrip("/")
        addressing = config.addressing
        if addressing == "auto":
            aws = config.endpoint is None or parts.hostname.endswith(".amazonaws.com")
            addressing = "virtual" if aws and _dns_safe(config.bucket) else "path"
        if addressing not in ("path", "virtual"):
            raise ValueError(f"addressing must be auto, path or virtual, not {addressing!r}")
        self.addressing = addressing
        self.host = (
            f"{config.bucket}.{parts.hostname}" if addressing == "virtual" else parts.hostname
        )
        default_port = 443 if self.scheme == "https" else 80
        self.host_header = (
            self.host if self.port in (None, default_port) else f"{self.host}:{self.port}"
        )
        self._conn: http.client.HTTPConnection | None = None

    # -- plumbing ------------------------------------------------------------------------

    def _path(self, key: str) -> str:
        """The decoded request path for an object key ("" for the bucket)."""
        if self.addressing == "virtual":
            return f"{self.base_path}/{key}"
        return f"{self.base_path}/{self.config.bucket}" + (f"/{key}" if key else "")

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self.scheme == "https":
                context = self.config.ssl_context or ssl.create_default_context()
                self._conn = http.client.HTTPSConnection(
                    self.host, self.port, timeout=self.config.timeout, context=context
                )
            else:
                self._conn = http.client.HTTPConnection(
                    self.host, self.port, timeout=self.config.timeout
                )
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(
        self,
        method: str,
        key: str = "",
        *,
        params: list[tuple[str, str]] | None = None,
        headers: dict[str, str] | None = None,
        body: bytes | memoryview = b"",
        what: str = "",
    ) -> Response:
        """One signed request; S3Error for no answer or any status >= 300."""
        params = params or []
        path = self._path(key)
        if self.config.payload == "unsigned":
            body_hash = sigv4.UNSIGNED_PAYLOAD
        else:
            body_hash = sigv4.payload_hash(body) if body else sigv4.EMPTY_SHA256
        send = {"Host": self.host_header, "x-amz-content-sha256": body_hash}
        if body or method in ("PUT", "POST"):
            send["Content-Length"] = str(len(body))
        send.update(headers or {})
        signed = sigv4.sign(
            method, path, params, send, body_hash, self.config.credentials,
            self.config.region, self.config.service,
        )  # fmt: skip
        target = sigv4.uri_encode(path, keep_slash=True)
        if params:
            target += "?" + sigv4.canonical_query(params)
        what = what or f"{method} {key or self.config.bucket}"
        for attempt in (1, 2):
            reused = self._conn is not None
            conn = self._connection()
            try:
                conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
                for name, value in signed.headers:
                    conn.putheader(name, value)
                conn.endheaders(body if body else None)
                raw = conn.getresponse()
                data = raw.read()
                break
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if reused and attempt == 1 and isinstance(exc, _STALE):
                    continue  # the server closed the idle keep-alive connection: once more
                if self.observer:
                    self.observer(method, key, 0)
                raise S3Error(f"{what}: {type(exc).__name__}: {exc}") from exc
        resp = Response(raw.status, {k.lower(): v for k, v in raw.getheaders()}, data)
        if raw.will_close:
            self.close()
        if self.observer:
            self.observer(method, key, resp.status)
        if resp.status >= 300:
            raise _error_from(resp, what)
        return resp

    # -- objects -------------------------------------------------------------------------

    def put_object(self, key: str, body: bytes, *, headers: dict[str, str] | None = None) -> str:
        """PUT one object; returns its ETag once the store has confirmed it (200)."""
        send = {**self.config.extra_headers, **(headers or {})}
        resp = self.request("PUT", key, headers=send, body=body)
        return resp.headers.get("etag", "")

    # -- buckets -------------------------------------------------------------------------

    def create_bucket(self) -> None:
        """Create the bucket; an existing bucket we own is not an error."""
        body = b""
        if self.config.region not in ("us-east-1", "auto"):
            body = (
                '<CreateBucketConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                f"<LocationConstraint>{self.config.region}</LocationConstraint>"
                "</CreateBucketConfiguration>"
            ).encode()
        try:
            self.request("PUT", "", body=body, what=f"create bucket {self.config.bucket}")
        except S3Error as exc:
            if exc.code != "BucketAlreadyOwnedByYou":
                raise

    # -- multipart -----------------------------------------------------------------------

    def create_multipart_upload(self, key: str, *, headers: dict[str, str] | None = None) -> str:
        send = {**self.config.extra_headers, **(headers or {})}
        resp = self.request("POST", key, params=[("uploads", "")], headers=send)
        upload_id = ET.fromstring(resp.body).findtext(f"{_NS}UploadId")
        if not upload_id:
            raise S3Error(f"create multipart {key}: no UploadId in the answer", retryable=True)
        return upload_id

    def upload_part(self, key: str, upload_id: str, number: int, body: bytes | memoryview) -> str:
        resp = self.request(
            "PUT",
            key,
            params=[("partNumber", str(number)), ("uploadId", upload_id)],
            body=body,
            what=f"upload part {number} of {key}",
        )
        etag = resp.headers.get("etag")
        if not etag:
            raise S3Error(f"upload part {number} of {key}: no ETag", retryable=True)
        return etag

    def complete_multipart_upload(
        self, key: str, upload_id: str, parts: list[tuple[int, str]]
    ) -> str:
        items = "".join(
            f"<Part><PartNumber>{n}</PartNumber><ETag>{etag}</ETag></Part>" for n, etag in parts
        )
        body = f"<CompleteMultipartUpload>{items}</CompleteMultipartUpload>".encode()
        resp = self.request(
            "POST", key, params=[("uploadId", upload_id)], body=body, what=f"complete {key}"
        )
        # S3 may answer 200 and still fail: the error is then in the body
        root = ET.fromstring(resp.body) if resp.body.strip() else None
        if root is not None and root.tag in ("Error", f"{_NS}Error"):
            raise _error_from(Response(500, resp.headers, resp.body), f"complete {key}")
        return (root.findtext(f"{_NS}ETag") if root is not None else None) or ""

    def list_parts(self, key: str, upload_id: str) -> list[tuple[int, str]]:
        """(number, ETag) of the parts the store has (first 1000); S3Error NoSuchUpload
        when it has no such upload."""
        resp = self.request("GET", key, params=[("uploadId", upload_id)], what=f"parts of {key}")
        root = ET.fromstring(resp.body)
        return [
            (int(part.findtext(f"{_NS}PartNumber") or 0), part.findtext(f"{_NS}ETag") or "")
            for part in root.iter(f"{_NS}Part")
        ]

    def abort_multipart_upload(self, key: str, upload_id: str) -> None:
        self.request("DELETE", key, params=[("uploadId", upload_id)], what=f"abort {key}")

    def upload(
        self,
        key: str,
        body: bytes,
        *,
        headers: dict[str, str] | None = None,
        call: Callable[[Callable[[], object]], object] | None = None,
    ) -> str:
        """PUT `body`, as one request up to part_size, else as a multipart upload.

        `call(fn)` runs each request (cloud.py passes its retry loop, so an outage
        costs one part, not the object). If a part or the completion meets
        NoSuchUpload (the store lost the upload), the upload starts over once."""
        run = call or (lambda fn: fn())
        part_size = max(self.config.part_size, MIN_PART_SIZE)
        if len(body) <= part_size:
            return str(run(lambda: self.put_object(key, body, headers=headers)))
        part_size = max(part_size, -(-len(body) // MAX_PARTS))
        try:
            return self._multipart(key, body, part_size, headers, run)
        except S3Error as exc:
            if exc.code != "NoSuchUpload":
                raise
            return self._multipart(key, body, part_size, headers, run)

    def _multipart(self, key, body, part_size, headers, run) -> str:
        upload_id = str(run(lambda: self.create_multipart_upload(key, headers=headers)))

        def checked(request):
            """Before trying a request of this upload again, make sure the store still has
            the upload (a restarted MinIO or moto may not): else NoSuchUpload, start over."""
            tries = 0

            def call():
                nonlocal tries
                tries += 1
                if tries > 1:
                    self.list_parts(key, upload_id)
                return request()

            return call

        try:
            parts = []
            view = memoryview(body)
            for number, start in enumerate(range(0, len(body), part_size), start=1):
                chunk = view[start : start + part_size]
                etag = run(
                    checked(lambda n=number, c=chunk: self.upload_part(key, upload_id, n, c))
                )
                parts.append((number, str(etag)))
            return str(run(checked(lambda: self.complete_multipart_upload(key, upload_id, parts))))
        except BaseException:
            with contextlib.suppress(S3Error):  # the store may be away: see the module doc
                self.abort_multipart_upload(key, upload_id)
            raise
