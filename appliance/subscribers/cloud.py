"""The cloud uploader: frames from the log into gzip'd JSON-lines objects on S3.

    [subscribers.up]
    type = "cloud"
    bucket = "sensor-frames"
    endpoint = "https://s3.eu-central-1.amazonaws.com"   # or MinIO, GCS, moto: http(s)://host:port
    region = "eu-central-1"
    prefix = "plant-7/board-3"
    # credentials: access_key_id / secret_access_key [/ session_token] here, or the
    # standard AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, or the
    # shared credentials file (AWS_SHARED_CREDENTIALS_FILE, profile / AWS_PROFILE)

Objects. One line per frame, the keys of `module-ingest dump` (id, channel,
seq, ts_ns, recv_ns, payload_b64), in log order, gzip'd; the key is

    PREFIX/YYYY/MM/DD/HH/YYYYMMDDTHHMMSSZ_SEGMENT_OFFSET.jsonl.gz

with the time (UTC) the appliance received the object's first frame and that
frame's place in the log (12-digit segment and byte offset). The key depends
only on the first frame, so an object sent again after a crash (uploaded, but
the cursor not yet committed) replaces itself instead of adding a copy (cut
shorter the second time, the frames past it are behind the cursor too and come
in the next object); the times sort the objects in an hour, and the log place
makes keys unique on one appliance (give each appliance its own prefix).
x-amz-meta-* headers say how many frames, and the first and last (identity, seq).

Delivery. The runner commits the cursor after `flush()` returns, so `flush()`
uploads whatever is pending and returns only once the store has confirmed
every PUT (HTTP 200; multipart: the completion). A failed request is retried
with exponential backoff and jitter for up to `retry_for` seconds (a refusal
that will not mend by itself, such as 403 SignatureDoesNotMatch, at once); then
`flush()` raises, the cursor stays, and the runner tries again after its own
pause, exponential with jitter up to a minute (the records already held are
recognised by their log place and not added twice). The last error is in
`module-ingest stats` (subscribers.NAME.last_error) while it lasts. After a
crash or a restart, reading resumes at the cursor: what was not confirmed is
read again and uploaded, at least once.

Batching. The runner commits partially (`Context.partial_commit`): `flush()`
returns the log position of the first record it still holds, the cursor
commits only up to there, and `flush()` also runs about once a second while
nothing new arrives. So records are held across batches in memory (at most
`max_bytes` of gzip, 8 MiB) and an object is cut at `max_bytes` or when its
first record is `max_age` seconds (60) old; what is held is still in the log
behind the cursor, so nothing is written to flash a second time. Bodies above
`part_size` (16 MiB) go up as multipart uploads, so an outage costs a part,
not the object. Without partial commits (another runner), every flush uploads
everything.

Options (all but bucket optional): endpoint (else AWS_ENDPOINT_URL_S3 or
AWS_ENDPOINT_URL, else AWS), region (else AWS_REGION or AWS_DEFAULT_REGION,
else us-east-1; "auto" for GCS), prefix ("{host}" becomes the host name),
addressing (auto/path/virtual), payload (hashed/unsigned), max_bytes,
max_age, part_size (at least 5 MiB), retry_for (30 s), retry_base (0.2 s),
retry_max (60 s), timeout (30 s per socket operation), create_bucket (create
a missing bucket: MinIO, tests), storage_class, gzip_level (6), profile,
access_key_id, secret_access_key, session_token, allow_insecure_http (an
http:// endpoint is refused without it: frames and signatures in clear). The
daemon checks them when it starts (runner.check_subscriber), credentials
included.
"""

from __future__ import annotations

import configparser
import logging
import os
import socket
import time
import zlib
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from appliance.config import REQUIRED, OptionError
from appliance.store.segment import Record
from appliance.subscribers.backoff import Backoff
from appliance.subscribers.base import Context, Subscriber
from appliance.subscribers.lines import frame_line
from appliance.subscribers.s3 import MIN_PART_SIZE, S3Client, S3Config, S3Error
from appliance.subscribers.sigv4 import Credentials

log = logging.getLogger("appliance.subscribers.cloud")

SLICE = 64 * 1024  # bytes of records compressed in one call


class ConfigurationError(ValueError):
    pass


def endpoint_of(options: dict, environ=os.environ) -> str | None:
    """The table's endpoint, else AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, else None (AWS)."""
    return (
        options.get("endpoint")
        or environ.get("AWS_ENDPOINT_URL_S3")
        or environ.get("AWS_ENDPOINT_URL")
        or None
    )


def resolve_credentials(options: dict, environ=os.environ) -> Credentials:
    """The config's keys, else the AWS environment variables, else the shared file."""
    key = options.get("access_key_id")
    secret = options.get("secret_access_key")
    token = options.get("session_token")
    if key and secret:
        return Credentials(key, secret, token)
    key, secret = environ.get("AWS_ACCESS_KEY_ID"), environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        return Credentials(key, secret, environ.get("AWS_SESSION_TOKEN") or None)
    path = Path(
        environ.get("AWS_SHARED_CREDENTIALS_FILE") or Path.home() / ".aws" / "credentials"
    ).expanduser()
    profile = options.get("profile") or environ.get("AWS_PROFILE") or "default"
    parser = configparser.ConfigParser()
    if parser.read(path) and parser.has_section(profile):
        section = parser[profile]
        if section.get("aws_access_key_id") and section.get("aws_secret_access_key"):
            return Credentials(
                section["aws_access_key_id"],
                section["aws_secret_access_key"],
                section.get("aws_session_token") or None,
            )
    raise ConfigurationError(
        "no credentials: set access_key_id and secret_access_key in the table, or "
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a shared credentials file"
    )


def object_key(prefix: str, first: Record) -> str:
    t = datetime.fromtimestamp(first.recv_ns / 1e9, UTC)
    name = f"{t:%Y%m%dT%H%M%S}Z_{first.segment:012d}_{first.offset:012d}.jsonl.gz"
    return f"{prefix.strip('/')}/{t:%Y/%m/%d/%H}/{name}".lstrip("/")


class Batch:
    """One object being built: gzip'd JSON lines, and the records' bounds."""

    def __init__(self, level: int) -> None:
        self._gzip = zlib.compressobj(level, zlib.DEFLATED, 31)  # 31: gzip container
        self.chunks: list[bytes] = []
        self.size = 0  # gzip bytes so far (deflate holds back up to a block)
        self.count = 0
        self.first: Record | None = None
        self.last: Record | None = None
        self.started = 0.0  # monotonic time of the first record
        self.body: bytes | None = None  # once sealed

    def add(self, records: list[Record]) -> None:
        if not records:
            return
        if self.first is None:
            self.first = records[0]
            self.started = time.monotonic()
        self.last = records[-1]
        self.count += len(records)
        out = self._gzip.compress(b"".join(map(frame_line, records)))
        if out:
            self.chunks.append(out)
            self.size += len(out)

    def seal(self) -> bytes:
        if self.body is None:
            self.chunks.append(self._gzip.flush())
            self.body = b"".join(self.chunks)
            self.chunks = []
        return self.body


class CloudSubscriber(Subscriber):
    OPTIONS = {
        "bucket": (str, REQUIRED, None),
        "endpoint": (str, "", None),
        "region": (str, "", None),
        "prefix": (str, "module-ingest", None),
        "addressing": (str, "auto", None),
        "payload": (str, "hashed", None),
        "max_bytes": (int, 8 * 1024 * 1024, 1),
        "max_age": (float, 60.0, 0),
        "part_size": (int, 16 * 1024 * 1024, MIN_PART_SIZE),
        "retry_for": (float, 30.0, 0),
        "retry_base": (float, 0.2, 0.001),
        "retry_max": (float, 60.0, 0.001),
        "timeout": (float, 30.0, 0.1),
        "create_bucket": (bool, False, None),
        "storage_class": (str, "", None),
        "gzip_level": (int, 6, 1),
        "profile": (str, "", None),
        "access_key_id": (str, "", None),
        "secret_access_key": (str, "", None),
        "session_token": (str, "", None),
        "allow_insecure_http": (bool, False, None),
    }
    CHOICES = {
        "addressing": ("auto", "path", "virtual"),
        "payload": ("hashed", "unsigned"),
        "gzip_level": tuple(range(1, 10)),
    }

    @classmethod
    def check(cls, options: dict, config_dir: Path) -> None:
        endpoint = endpoint_of(options)
        if endpoint and not endpoint.startswith(("http://", "https://")):
            raise OptionError("endpoint", f"expected http(s)://host[:port], got {endpoint!r}")
        if endpoint and endpoint.startswith("http://") and not options["allow_insecure_http"]:
            raise OptionError(
                "endpoint",
                "http:// sends the frames in clear; use https:// or set allow_insecure_http = true",
            )
        try:
            resolve_credentials(options)
        except ConfigurationError as exc:
            raise OptionError("access_key_id", str(exc)) from None

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        opts = self.options
        self.check(opts, context.config_dir)  # also when built without the daemon's check
        env = os.environ
        endpoint = endpoint_of(opts)
        region = opts["region"] or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        self.prefix = str(opts["prefix"]).strip("/")
        if "{host}" in self.prefix:
            self.prefix = self.prefix.replace("{host}", socket.gethostname())
        self.max_bytes = int(opts["max_bytes"])
        self.max_age = float(opts["max_age"])
        self.retry_for = float(opts["retry_for"])
        self.retry = (opts["retry_base"], opts["retry_max"])
        self.create_bucket = bool(opts["create_bucket"])
        self.level = int(opts["gzip_level"])
        # partial commit: hold records across batches (see the module doc)
        self.hold = context.partial_commit
        # set when the process is told to stop: retries end early (the cursor stays)
        self.stopping = context.stopping
        extra = {"x-amz-storage-class": opts["storage_class"]} if opts["storage_class"] else {}
        self.client = S3Client(
            S3Config(
                bucket=str(opts["bucket"]),
                credentials=resolve_credentials(opts),
                endpoint=endpoint,
                region=region or "us-east-1",
                addressing=str(opts["addressing"]),
                timeout=float(opts["timeout"]),
                payload=str(opts["payload"]),
                part_size=int(opts["part_size"]),
                extra_headers=extra,
            )
        )
        self.pending = Batch(self.level)
        self.ready: list[Batch] = []  # cut, not yet confirmed: uploaded first, in order
        self.last_position: tuple[int, int] | None = None  # of the last record taken
        self.uploaded_objects = 0
        self.uploaded_records = 0
        self.uploaded_bytes = 0
        self.retries = 0
        self.last_error: str | None = None  # of the last failed request, while failing
        self.last_error_time: float | None = None

    # -- the Subscriber interface ----------------------------------------------------------

    def handle(self, records: list[Record]) -> None:
        last = self.last_position
        if last is not None and records and (records[0].segment, records[0].offset) <= last:
            # handed over again after a failed flush: what is already held is skipped
            records = [r for r in records if (r.segment, r.offset) > last]
        # Compressed in slices of about SLICE bytes of payload, so that an object is cut
        # close to max_bytes and no slice is compressed in more than one call per record.
        start = size = 0
        for i, rec in enumerate(records):
            size += len(rec.payload) + 100
            if size >= SLICE or i == len(records) - 1:
                if self.pending.size >= self.max_bytes:
                    self._cut()
                self.pending.add(records[start : i + 1])
                start, size = i + 1, 0
        if records:
            self.last_position = (records[-1].segment, records[-1].offset)

    def flush(self) -> tuple[int, int] | None:
        """Upload what is due; None when everything handled is confirmed, else (with
        partial commit) the log position of the first record still held."""
        due = not self.hold or self.pending.size >= self.max_bytes
        if self.pending.count and (due or time.monotonic() - self.pending.started >= self.max_age):
            self._cut()
        while self.ready:
            self._upload(self.ready[0])
            self.ready.pop(0)
        if self.pending.count:
            return (self.pending.first.segment, self.pending.first.offset)
        return None

    def close(self) -> None:
        # Whatever is held was not committed: the next start reads it again.
        self.client.close()

    # -- uploading -------------------------------------------------------------------------

    def _cut(self) -> None:
        if self.pending.count:
            self.ready.append(self.pending)
            self.pending = Batch(self.level)

    def _upload(self, batch: Batch) -> None:
        body = batch.seal()
        first, last = batch.first, batch.last
        key = object_key(self.prefix, first)
        headers = {
            "Content-Type": "application/gzip",
            "x-amz-meta-records": str(batch.count),
            "x-amz-meta-first": quote(f"{first.identity} {first.seq}"),
            "x-amz-meta-last": quote(f"{last.identity} {last.seq}"),
        }
        started = time.monotonic()
        self.client.upload(key, body, headers=headers, call=self._retrying)
        self.uploaded_objects += 1
        self.uploaded_records += batch.count
        self.uploaded_bytes += len(body)
        log.debug(
            "cloud %s: %s: %d records, %d bytes in %.2f s",
            self.name, key, batch.count, len(body), time.monotonic() - started,
        )  # fmt: skip

    def _retrying(self, request):
        """Run one request; retry what may pass later, with exponential backoff and
        jitter, for up to retry_for seconds; then raise (the batch comes again)."""
        deadline = time.monotonic() + self.retry_for
        backoff = Backoff(*self.retry)
        attempt = 0
        created = False
        while True:
            try:
                answer = request()
                self.last_error = None
                return answer
            except S3Error as exc:
                attempt += 1
                self.last_error = str(exc)
                self.last_error_time = round(time.time(), 3)
                if exc.code == "NoSuchBucket" and self.create_bucket and not created:
                    try:
                        self.client.create_bucket()
                        created = True
                        log.warning("cloud %s: created the missing bucket", self.name)
                        continue
                    except S3Error as again:
                        exc = again
                # a missing bucket may be created meanwhile; a bad key or signature will not mend
                if not (exc.retryable or exc.code == "NoSuchBucket"):
                    raise
                pause = backoff.pause()
                stopping = self.stopping is not None and self.stopping.is_set()
                if stopping or time.monotonic() + pause > deadline:
                    log.error(
                        "cloud %s: giving up for now after %d tries: %s", self.name, attempt, exc
                    )
                    raise
                self.retries += 1
                log.warning(
                    "cloud %s: %s; try %d again in %.2f s", self.name, exc, attempt + 1, pause
                )
                if self.stopping is not None:
                    self.stopping.wait(pause)
                else:
                    time.sleep(pause)

    def stats(self) -> dict:
        out = {
            "uploaded_objects": self.uploaded_objects,
            "uploaded_records": self.uploaded_records,
            "uploaded_bytes": self.uploaded_bytes,
            "retries": self.retries,
            "held_records": self.pending.count + sum(b.count for b in self.ready),
        }
        if self.last_error:
            out.update(failing=True, last_error=self.last_error)
            out["last_error_time"] = self.last_error_time
        return out
