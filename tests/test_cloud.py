"""The S3 client and the cloud uploader against a real S3-compatible server.

The server is moto's server mode (`python -m moto.server`), started here as a
subprocess on a free loopback port and stopped at the end. One instance runs
with IAM authentication on (INITIAL_NO_AUTH_ACTION_COUNT): it checks every
signature, so the client's requests are verified by a server, not only by the
published vectors. moto keeps everything in memory, so a restarted server has
no buckets and no multipart uploads: the outage tests restart it on the same
port and let the uploader recreate the bucket (create_bucket = true) and start
an interrupted multipart upload over.
"""

from __future__ import annotations

import base64
import gzip
import http.client
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import urlencode

import pytest
from benchkit.daemonproc import free_port
from conftest import cli, stats_json, subscriber_pid, wait_for

from appliance.client import Client
from appliance.config import ConfigError
from appliance.store import meta
from appliance.store.segment import Record
from appliance.subscribers import sigv4
from appliance.subscribers.base import Context
from appliance.subscribers.cloud import (
    CloudSubscriber,
    ConfigurationError,
    object_key,
    resolve_credentials,
)
from appliance.subscribers.s3 import S3Client, S3Config, S3Error

pytest.importorskip("moto", reason="needs moto[server] (the dev extra)")

MiB = 1024 * 1024
KEYS = sigv4.Credentials("testing", "testing")


class Moto:
    """`python -m moto.server` on 127.0.0.1:port; start() again after stop() keeps the port."""

    def __init__(self, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.env = env or {}
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Moto:
        env = dict(os.environ, **self.env)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        wait_for(self._up, timeout=20, what="moto to listen")
        return self

    def _up(self) -> bool:
        assert self.proc.poll() is None, self.log_path.read_text()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
            conn.request("GET", "/moto-api/")
            conn.getresponse().read()
            conn.close()
            return True
        except OSError:
            time.sleep(0.05)
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    server = Moto(tmp_path_factory.mktemp("moto") / "moto.log").start()
    yield server
    server.stop()


@pytest.fixture
def own_moto(tmp_path):
    """A server of the test's own, to stop and restart."""
    server = Moto(tmp_path / "moto.log").start()
    yield server
    server.stop()


# -- reading the bucket back: what the tests need, not the uploader -----------------------

S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


def head_object(client: S3Client, key: str) -> dict[str, str] | None:
    """The object's headers (lower-case names), or None when there is no such object."""
    try:
        return client.request("HEAD", key).headers
    except S3Error as exc:
        if exc.status == 404:
            return None
        raise


def get_object(client: S3Client, key: str) -> bytes:
    return client.request("GET", key).body


def list_objects(client: S3Client, prefix: str = "") -> list[tuple[str, int]]:
    """(key, size) of every object under prefix, ListObjectsV2 page by page."""
    out = []
    token = None
    while True:
        params = [("list-type", "2"), ("prefix", prefix)]
        if token:
            params.append(("continuation-token", token))
        root = ET.fromstring(client.request("GET", "", params=params).body)
        for item in root.iter(f"{S3_NS}Contents"):
            out.append(
                (item.findtext(f"{S3_NS}Key") or "", int(item.findtext(f"{S3_NS}Size") or 0))
            )
        if root.findtext(f"{S3_NS}IsTruncated") != "true":
            return out
        token = root.findtext(f"{S3_NS}NextContinuationToken")


def bucket_exists(client: S3Client) -> bool:
    try:
        client.request("HEAD", "")
        return True
    except S3Error as exc:
        if exc.status == 404:
            return False
        raise


def new_bucket(moto: Moto, **config) -> S3Client:
    """A client on a new bucket of its own."""
    credentials = config.pop("credentials", KEYS)
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    client = S3Client(S3Config(bucket, credentials, moto.endpoint, **config))
    client.create_bucket()
    return client


def records(count: int, *, seq: int = 1, size: int = 40, start=(1, 4096), random_payload=False):
    """Records as the log hands them over: increasing places, one identity."""
    segment, offset = start
    out = []
    for i in range(count):
        payload = os.urandom(size) if random_payload else (b"%08d" % (seq + i)) * (size // 8)
        length = 40 + len(payload)
        out.append(
            Record(
                segment,
                offset,
                "m-1/core-0",
                1,
                seq + i,
                1_700_000_000_000_000_000 + i,
                1_800_000_000_000_000_000 + i,
                payload,
                offset + length,
            )
        )
        offset += length
    return out


def uploaded(client: S3Client, prefix: str = "") -> list[dict]:
    """Every line of every object under prefix, in key order."""
    lines = []
    try:
        objects = sorted(list_objects(client, prefix))
    except S3Error as exc:
        if exc.code != "NoSuchBucket":  # a restarted moto has none until the uploader makes it
            raise
        objects = []
    for key, _size in objects:
        body = gzip.decompress(get_object(client, key))
        lines += [json.loads(line) for line in body.splitlines()]
    return lines


def as_lines(recs: list[Record]) -> list[dict]:
    return [
        {
            "id": r.identity,
            "channel": r.channel,
            "seq": r.seq,
            "ts_ns": r.ts_ns,
            "recv_ns": r.recv_ns,
            "payload_b64": base64.b64encode(r.payload).decode(),
        }
        for r in recs
    ]


def subscriber(tmp_path, client: S3Client, **options) -> CloudSubscriber:
    """The uploader on `client`'s bucket; with max_age 0 unless given, so that every
    flush uploads what it holds."""
    host = client.host_header
    options = {
        "endpoint": f"http://{host}",
        "allow_insecure_http": True,  # moto on loopback
        "bucket": client.config.bucket,
        "access_key_id": "testing",
        "secret_access_key": "testing",
        "prefix": "t",
        "max_age": 0.0,
        **options,
    }
    context = Context(
        name="up", data_dir=tmp_path, state_dir=tmp_path / "up", config=None, options=options
    )
    return CloudSubscriber(context)


# -- the client, with signatures checked by the server ------------------------------------


def iam(port: int, **params) -> str:
    """One IAM query-API call (moto lets the first few through unauthenticated)."""
    body = urlencode({**params, "Version": "2010-05-08"}).encode()
    headers = {"Host": f"127.0.0.1:{port}", "Content-Type": "application/x-www-form-urlencoded"}
    signed = sigv4.sign(
        "POST", "/", [], headers, sigv4.payload_hash(body), KEYS, "us-east-1", "iam"
    )
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/", body, dict(signed.headers))
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    assert resp.status == 200, text
    return text


def iam_user(server: Moto) -> sigv4.Credentials:
    """A user allowed everything on S3, on a server that checks signatures."""
    iam(server.port, Action="CreateUser", UserName="uploader")
    made = iam(server.port, Action="CreateAccessKey", UserName="uploader")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*",
                                                        "Resource": "*"}]}  # fmt: skip
    iam(server.port, Action="PutUserPolicy", UserName="uploader", PolicyName="s3",
        PolicyDocument=json.dumps(policy))  # fmt: skip
    return sigv4.Credentials(
        re.search("<AccessKeyId>(.+?)</AccessKeyId>", made).group(1),
        re.search("<SecretAccessKey>(.+?)</SecretAccessKey>", made).group(1),
    )


def test_client_against_a_server_that_checks_signatures(tmp_path):
    server = Moto(tmp_path / "moto.log", {"INITIAL_NO_AUTH_ACTION_COUNT": "3"}).start()
    try:
        creds = iam_user(server)
        client = new_bucket(server, credentials=creds, part_size=5 * MiB)
        assert client.addressing == "path" and bucket_exists(client)

        # keys that need encoding: space, plus, tilde, non-ASCII, "//" and "./" kept as they are
        for key in ["plain.txt", "dir/a b+c~d.txt", "\u00e9t\u00e9/\u1234.bin", "x//./y"]:
            etag = client.put_object(key, key.encode() * 3)
            assert etag.strip('"')
            assert get_object(client, key) == key.encode() * 3
            assert int(head_object(client, key)["content-length"]) == len(key.encode()) * 3
        assert head_object(client, "nothing/here") is None
        assert {k for k, _ in list_objects(client, "dir/")} == {"dir/a b+c~d.txt"}

        # multipart: 11 MiB in parts of 5 MiB
        big = os.urandom(11 * MiB)
        calls = []
        client.observer = lambda method, key, status: calls.append((method, status))
        assert client.upload("big/object", big, headers={"x-amz-meta-note": "big"}).endswith('-3"')
        assert calls == [("POST", 200), ("PUT", 200), ("PUT", 200), ("PUT", 200), ("POST", 200)]
        assert get_object(client, "big/object") == big
        assert head_object(client, "big/object")["x-amz-meta-note"] == "big"

        # an aborted multipart upload leaves no object
        upload_id = client.create_multipart_upload("gone")
        client.upload_part("gone", upload_id, 1, b"x" * 100)
        client.abort_multipart_upload("gone", upload_id)
        assert head_object(client, "gone") is None

        # UNSIGNED-PAYLOAD is accepted too
        unsigned = S3Client(
            S3Config(client.config.bucket, creds, server.endpoint, payload="unsigned")
        )
        unsigned.put_object("unsigned", b"body")
        assert get_object(client, "unsigned") == b"body"

        # a wrong secret: refused, and not worth retrying
        wrong = S3Client(
            S3Config(
                client.config.bucket, sigv4.Credentials(creds.access_key, "nope"), server.endpoint
            )
        )
        with pytest.raises(S3Error) as err:
            wrong.put_object("denied", b"x")
        assert err.value.status == 403 and err.value.code == "SignatureDoesNotMatch"
        assert not err.value.retryable
    finally:
        server.stop()


def test_no_answer_is_a_retryable_error():
    client = S3Client(S3Config("bucket-x", KEYS, f"http://127.0.0.1:{free_port()}", timeout=2))
    with pytest.raises(S3Error) as err:
        client.put_object("k", b"v")
    assert err.value.status == 0 and err.value.retryable


def test_addressing_styles():
    aws = S3Client(S3Config("frames", KEYS, region="eu-central-1"))
    assert (aws.addressing, aws.host, aws._path("a/b")) == (
        "virtual",
        "frames.s3.eu-central-1.amazonaws.com",
        "/a/b",
    )
    dotted = S3Client(S3Config("my.frames", KEYS, region="eu-central-1"))
    assert (dotted.addressing, dotted.host, dotted._path("a")) == (
        "path",
        "s3.eu-central-1.amazonaws.com",
        "/my.frames/a",
    )
    minio = S3Client(S3Config("frames", KEYS, "http://nas.local:9000"))
    assert (minio.addressing, minio.host_header, minio._path("")) == (
        "path",
        "nas.local:9000",
        "/frames",
    )
    gcs = S3Client(S3Config("frames", KEYS, "https://storage.googleapis.com", "auto",
                            addressing="virtual"))  # fmt: skip
    assert (gcs.host_header, gcs.port, gcs.scheme) == (
        "frames.storage.googleapis.com",
        None,
        "https",
    )
    with pytest.raises(ValueError):
        S3Client(S3Config("frames", KEYS, "ftp://x"))


# -- the subscriber --------------------------------------------------------------------------


def test_credentials_from_config_environment_or_shared_file(tmp_path):
    assert resolve_credentials({"access_key_id": "a", "secret_access_key": "s"}, {}) == (
        sigv4.Credentials("a", "s")
    )
    env = {"AWS_ACCESS_KEY_ID": "ea", "AWS_SECRET_ACCESS_KEY": "es", "AWS_SESSION_TOKEN": "t"}
    assert resolve_credentials({}, env) == sigv4.Credentials("ea", "es", "t")
    shared = tmp_path / "credentials"
    shared.write_text("[default]\naws_access_key_id = fa\naws_secret_access_key = fs\n"
                      "[edge]\naws_access_key_id = pa\naws_secret_access_key = ps\n")  # fmt: skip
    env = {"AWS_SHARED_CREDENTIALS_FILE": str(shared)}
    assert resolve_credentials({}, env) == sigv4.Credentials("fa", "fs")
    assert resolve_credentials({"profile": "edge"}, env) == sigv4.Credentials("pa", "ps")
    with pytest.raises(ConfigurationError):
        resolve_credentials({}, {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")})


def test_object_keys_follow_the_first_record():
    rec = records(1, start=(3, 8192))[0]
    assert object_key("plant-7/board-3/", rec) == (
        "plant-7/board-3/2027/01/15/08/20270115T080000Z_000000000003_000000008192.jsonl.gz"
    )


def test_every_record_lands_once_per_flush(moto, tmp_path):
    client = new_bucket(moto)
    sub = subscriber(tmp_path, client)
    batches = [records(50, seq=1), records(70, seq=51, start=(1, 100_000)), records(5, seq=121,
               start=(2, 4096))]  # fmt: skip
    for batch in batches:
        sub.handle(batch)
        assert sub.flush() is None  # everything handled is confirmed
    keys = [k for k, _ in list_objects(client, "t/")]
    assert len(keys) == 3 and all(k.endswith(".jsonl.gz") for k in keys)
    assert uploaded(client, "t/") == as_lines([r for b in batches for r in b])
    head = head_object(client, sorted(keys)[0])
    assert head["x-amz-meta-records"] == "50"
    assert head["x-amz-meta-first"] == "m-1/core-0%201"
    assert head["x-amz-meta-last"] == "m-1/core-0%2050"
    assert head["content-type"] == "application/gzip"
    sub.close()


def test_a_batch_handed_over_again_is_not_added_twice(moto, tmp_path):
    """What the runner does after a failed flush: the same records once more."""
    client = new_bucket(moto)
    sub = subscriber(tmp_path, client)
    batch = records(20)
    sub.handle(batch[:10])
    sub.handle(batch)  # the first ten again, then ten new
    sub.flush()
    assert uploaded(client) == as_lines(batch)


def test_max_bytes_cuts_objects_and_large_ones_go_multipart(moto, tmp_path):
    client = new_bucket(moto)
    sub = subscriber(tmp_path, client, max_bytes=6 * MiB, part_size=5 * MiB)
    batch = records(200, size=64 * 1024, random_payload=True)  # ~17 MiB of JSON lines
    sub.handle(batch)
    sub.flush()
    objects = sorted(list_objects(client, "t/"))
    assert len(objects) >= 2
    assert any(size > 5 * MiB for _, size in objects)
    multipart = [k for k, size in objects if size > 5 * MiB]
    assert all(re.search(r'-\d+"$', head_object(client, k)["etag"]) for k in multipart)
    assert uploaded(client, "t/") == as_lines(batch)


def test_an_outage_in_the_middle_of_a_multipart_upload(own_moto, tmp_path, caplog):
    """The server dies after the first part: the uploader retries with growing, jittered
    pauses, flush() does not return (so the runner does not commit), and once the server
    is back (empty: moto keeps nothing) the bucket is recreated and the upload completes."""
    caplog.set_level(logging.WARNING, logger="appliance.subscribers.cloud")
    client = new_bucket(own_moto)
    sub = subscriber(tmp_path, client, part_size=5 * MiB, max_bytes=64 * MiB, create_bucket=True,
                     retry_base=0.1, retry_max=0.8, retry_for=30)  # fmt: skip
    batch = records(200, size=64 * 1024, random_payload=True)  # one object, 3 parts
    down = threading.Event()
    back = threading.Event()

    def restart():
        time.sleep(2.0)
        own_moto.start()
        back.set()

    def observe(method, key, status):
        if method == "PUT" and status == 200 and not down.is_set():
            own_moto.stop()  # after the first part: the next request finds no server
            down.set()
            threading.Thread(target=restart, daemon=True).start()

    sub.client.observer = observe
    sub.handle(batch)
    result = {}
    flusher = threading.Thread(target=lambda: result.setdefault("ret", sub.flush()))
    flusher.start()
    wait_for(down.is_set, timeout=20, what="the first part")
    time.sleep(1.0)
    assert flusher.is_alive() and not back.is_set()  # no confirmation, no commit
    flusher.join(40)
    assert not flusher.is_alive() and result == {"ret": None}

    pauses = [float(m) for m in re.findall(r"again in ([0-9.]+) s", caplog.text)]
    assert len(pauses) >= 3 and sub.retries >= 3
    expected = 0.1
    for pause in pauses[:4]:  # exponential, each with jitter in [d/2, d]
        assert expected / 2 <= pause <= expected + 1e-9
        expected = min(expected * 2, 0.8)
    assert len(set(pauses)) > 1
    assert "created the missing bucket" in caplog.text
    objects = list(list_objects(client, "t/"))
    assert len(objects) == 1
    assert head_object(client, objects[0][0])["etag"].endswith('-3"')
    assert uploaded(client, "t/") == as_lines(batch)


def test_flush_raises_when_the_outage_outlasts_retry_for(own_moto, tmp_path):
    client = new_bucket(own_moto)
    sub = subscriber(tmp_path, client, retry_base=0.05, retry_max=0.2, retry_for=0.6,
                     create_bucket=True)  # fmt: skip
    first = records(10)
    sub.handle(first)
    sub.flush()
    own_moto.stop()
    batch = records(10, seq=11, start=(1, first[-1].end))
    sub.handle(batch)
    started = time.monotonic()
    with pytest.raises(S3Error):
        sub.flush()  # the runner logs it, keeps the cursor, and hands the batch over again
    assert time.monotonic() - started > 0.3  # it retried, with a pause, before giving up
    own_moto.start()  # empty again
    sub.handle(batch)
    assert sub.flush() is None
    assert uploaded(client, "t/") == as_lines(batch)


def test_records_are_held_until_size_or_age(moto, tmp_path):
    """The runner commits only up to the position flush() returns, so objects span
    batches; what is held is never behind the commit."""
    client = new_bucket(moto)
    sub = subscriber(tmp_path, client, max_age=0.5, max_bytes=64 * 1024)
    committed = None
    batches = [records(10, seq=1 + 10 * i, start=(1, 4096 + 1000 * i)) for i in range(3)]
    for batch in batches:
        sub.handle(batch)
        position = sub.flush()
        committed = position or (batch[-1].segment, batch[-1].end)
        assert committed == (1, 4096)  # the first record held: nothing uploaded yet
    assert list(list_objects(client, "t/")) == []
    time.sleep(0.6)
    assert sub.flush() is None  # the idle call after max_age uploads
    assert uploaded(client, "t/") == as_lines([r for b in batches for r in b])
    big = records(300, seq=31, size=1024, random_payload=True, start=(2, 4096))
    sub.handle(big)
    position = sub.flush()  # cut at max_bytes: the full objects go, the rest is held
    assert len(list(list_objects(client, "t/"))) >= 3
    held = next(r for r in big if (r.segment, r.offset) == position)
    assert uploaded(client, "t/") == as_lines(
        [r for b in batches for r in b] + big[: big.index(held)]
    )


def test_bad_options_are_refused(tmp_path):
    context = Context("up", tmp_path, tmp_path, None, options={"bucket": "b", "max_byte": 1})
    with pytest.raises(ConfigError, match=r"unknown key subscribers\.up\.max_byte"):
        CloudSubscriber(context)
    with pytest.raises(ConfigError, match=r"subscribers\.up\.bucket is required"):
        CloudSubscriber(Context("up", tmp_path, tmp_path, None, options={}))
    plain = {"bucket": "b", "endpoint": "http://127.0.0.1:9", "access_key_id": "k",
             "secret_access_key": "s"}  # fmt: skip
    with pytest.raises(ConfigError, match="allow_insecure_http"):
        CloudSubscriber(Context("up", tmp_path, tmp_path, None, options=plain))


# -- through the daemon ----------------------------------------------------------------------


def stream(d, count: int) -> None:
    with Client(d.host, d.port, "dev/core-0", d.dev_token) as client:
        for i in range(count):
            client.send(1, b"frame %d " % i + os.urandom(24))
        client.flush()


def logged(d) -> set[tuple[str, int]]:
    result = cli("dump", data_dir=d.data_dir)
    assert result.returncode == 0, result.stderr.decode()
    return {(r["id"], r["seq"]) for r in map(json.loads, result.stdout.splitlines())}


def frames_up(client: S3Client) -> set[tuple[str, int]]:
    return {(line["id"], line["seq"]) for line in uploaded(client)}


def cloud_table(client: S3Client, extra: str = "") -> str:
    return (
        f'[subscribers.up]\ntype = "cloud"\nendpoint = "http://{client.host_header}"\n'
        f'bucket = "{client.config.bucket}"\ncreate_bucket = true\nallow_insecure_http = true\n'
        f"retry_base = 0.05\nretry_max = 0.5\nretry_for = 3.0\nmax_age = 0.3\n{extra}"
    )


def test_daemon_uploads_every_frame_through_kill_9_and_a_restart(moto, daemon_factory):
    client = new_bucket(moto)
    d = daemon_factory(
        cloud_table(client, 'access_key_id = "testing"\nsecret_access_key = "testing"\n')
    )
    stream(d, 300)
    wait_for(lambda: frames_up(client) >= logged(d), timeout=15, what="the first upload")
    pid = wait_for(lambda: subscriber_pid(d, "up"), what="the uploader process")
    os.kill(pid, signal.SIGKILL)
    stream(d, 300)
    wait_for(
        lambda: subscriber_pid(d, "up") not in (0, pid), timeout=10, what="a restarted uploader"
    )
    wait_for(lambda: frames_up(client) >= logged(d), timeout=15, what="uploads after kill -9")
    assert d.stop() == 0
    d.start()
    stream(d, 200)
    wait_for(lambda: frames_up(client) >= logged(d), timeout=15, what="uploads after restart")
    everything = logged(d)
    assert len(everything) == 800
    assert frames_up(client) == everything  # at least once, nothing missing, nothing else
    seqs = sorted(seq for _, seq in everything)
    assert seqs == list(range(seqs[0], seqs[0] + 800))  # no gaps
    assert "exited with -9; restarting" in d.log()


def test_daemon_outage_keeps_the_cursor_until_the_store_is_back(own_moto, daemon_factory):
    """Credentials from the AWS environment; the server goes away and comes back empty."""
    client = new_bucket(own_moto)
    d = daemon_factory(cloud_table(client), start=False)
    d.extra_env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    d.start()
    wal = d.data_dir / "wal"
    stream(d, 100)
    wait_for(lambda: frames_up(client) >= logged(d), timeout=15, what="the first upload")
    before = logged(d)
    wait_for(lambda: meta.read_cursor(wal, "sub-up"), what="a committed cursor")
    own_moto.stop()
    stream(d, 200)
    wait_for(lambda: "again in" in d.log(), timeout=10, what="the uploader to retry")
    # the cursor may have moved up to the first record held back (partial commit), and
    # from then on it stays there while the uploads fail
    committed = meta.read_cursor(wal, "sub-up")
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:  # retrying: the cursor stays where it was
        assert meta.read_cursor(wal, "sub-up") == committed
        time.sleep(0.1)
    own_moto.start()
    wait_for(
        lambda: frames_up(client) >= logged(d) - before, timeout=20, what="uploads after the outage"
    )
    wait_for(lambda: meta.read_cursor(wal, "sub-up") > committed, what="the cursor to move")


def test_a_refused_upload_backs_off_and_shows_in_stats(tmp_path, daemon_factory):
    """403 SignatureDoesNotMatch will not mend by itself: one log line per try, no
    traceback, pauses that double (with jitter) up to a minute, the error in stats."""
    server = Moto(tmp_path / "moto.log", {"INITIAL_NO_AUTH_ACTION_COUNT": "3"}).start()
    try:
        creds = iam_user(server)
        client = new_bucket(server, credentials=creds)
        wrong = "0123456789-wrong-secret"
        d = daemon_factory(
            cloud_table(client, f'access_key_id = "{creds.access_key}"\n'
                        f'secret_access_key = "{wrong}"\n')
        )  # fmt: skip
        stream(d, 20)
        failed = re.compile(r"flush failed: .*SignatureDoesNotMatch.*trying again in ([\d.]+) s")
        pauses = lambda: [float(p) for p in failed.findall(d.log())]  # noqa: E731
        wait_for(lambda: len(pauses()) >= 4, timeout=20, what="four refused uploads")
        first, fourth = pauses()[0], pauses()[3]
        assert first <= 0.5 < 2.0 <= fourth <= 4.0  # 0.25-0.5 s, then 0.5-1, 1-2, 2-4 s
        status = stats_json(d.data_dir)["subscribers"]["up"]
        assert "SignatureDoesNotMatch" in status["last_error"] and status["failing"]
        assert status["lag_bytes"] > 0 and status["uploaded_records"] == 0
        text = d.log() + json.dumps(stats_json(d.data_dir))
        assert "Traceback" not in text and wrong not in text
        assert d.stop() == 0
    finally:
        server.stop()
