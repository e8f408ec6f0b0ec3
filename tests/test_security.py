"""Issue 10 on a running daemon: MAC downgrade on the path, users cannot send, the
identity lifecycle (rotate, bind, restore), the private data dir, readable secrets."""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import stat
import struct
import threading
import time

import pytest
from conftest import cli, wait_for

from appliance.client import Client, ClientError
from appliance.config import load as load_config
from appliance.protocol import crypto
from appliance.protocol.client_session import ClientSession
from appliance.protocol.frames import FrameType, encode_frame

WAIT = 10.0
FP_THIEF = "sha256:" + "a" * 64
FP_REAL = "sha256:" + "b" * 64
ALL_MACS = ",".join(crypto.MAC_ALGORITHMS)


def stored(daemon) -> list[bytes]:
    """The payloads in the daemon's log, in order."""
    result = cli("dump", data_dir=daemon.data_dir)
    assert result.returncode == 0, result.stderr.decode()
    return [
        base64.b64decode(json.loads(line)["payload_b64"]) for line in result.stdout.splitlines()
    ]


def identity(daemon, *args: str) -> dict:
    """`identity ARGS` through the CLI beside the running daemon; its JSON output."""
    result = cli("identity", *args, data_dir=daemon.data_dir)
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


def refused(daemon, ident: str, token: str, **kw) -> str | None:
    """The error code the daemon answers a handshake with, or None if it welcomes it."""
    try:
        with Client(daemon.host, daemon.port, ident, token, timeout=WAIT, **kw):
            return None
    except ClientError as exc:
        return exc.code


def connected(daemon, ident: str, token: str, **kw) -> Client:
    """A connected client, once the daemon has picked up a change the CLI just made
    (it re-reads the registry at each HELLO and every quarter second)."""
    return wait_for(lambda: _try_connect(daemon, ident, token, **kw), WAIT, f"{ident} welcome")


def _try_connect(daemon, ident, token, **kw) -> Client | None:
    client = Client(daemon.host, daemon.port, ident, token, timeout=WAIT, **kw)
    try:
        client.connect()
    except ClientError as exc:
        if exc.code != "AUTH_FAILED":
            raise
        return None
    return client


def error_code_of(client: Client) -> str:
    """Send until the daemon's ERROR ends the session; its code."""
    deadline = time.monotonic() + WAIT
    with pytest.raises(ClientError) as info:
        while time.monotonic() < deadline:
            client.send(1, b"still here")
            client.flush()
            time.sleep(0.02)
    return info.value.code


# -- a downgrade proxy on the path -----------------------------------------------------


class DowngradeProxy:
    """A man in the middle on loopback: rewrites `mac` in HELLO to "none", strips the
    MAC from every frame after it and replaces DATA payloads; passes the rest through."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.hellos_rewritten = 0
        self.frames_forged = 0
        self._threads = [threading.Thread(target=self._serve, daemon=True)]
        self._sockets: list[socket.socket] = [self.listener]
        self._threads[0].start()

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()
        for thread in self._threads:
            thread.join(WAIT)

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            server = socket.create_connection(self.upstream)
            self._sockets += [client, server]
            for target, args in ((self._pipe, (server, client)), (self._forge, (client, server))):
                thread = threading.Thread(target=target, args=args, daemon=True)
                self._threads.append(thread)
                thread.start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _forge(self, src: socket.socket, dst: socket.socket) -> None:
        buf = b""
        try:
            while data := src.recv(65536):
                buf += data
                while len(buf) >= 32:
                    _, _, ftype, flags, channel, length, _, seq, ts = struct.unpack_from(
                        ">HBBHHIIQQ", buf
                    )
                    size = 36 + length + (16 if flags & 1 else 0)
                    if len(buf) < size:
                        break
                    frame, buf = buf[:size], buf[size:]
                    dst.sendall(self._rewrite(frame, ftype, channel, length, seq, ts))
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _rewrite(self, frame: bytes, ftype: int, channel: int, length, seq, ts) -> bytes:
        if ftype == FrameType.HELLO:
            hello = json.loads(frame[32 : 32 + length])
            hello["mac"] = "none"
            self.hellos_rewritten += 1
            return encode_frame(FrameType.HELLO, seq, json.dumps(hello).encode())
        if ftype == FrameType.DATA:
            self.frames_forged += 1
            return encode_frame(FrameType.DATA, seq, b"forged", channel=channel, ts_ns=ts)
        return encode_frame(ftype, seq, frame[32 : 32 + length], channel=channel, ts_ns=ts)


@pytest.mark.parametrize("policy", ["default", "allows none"])
def test_a_downgrade_proxy_gets_auth_failed_and_stores_nothing(daemon, policy):
    """The HELLO proof covers `mac` (revision 2): even an identity whose policy allows
    "none" cannot be switched to it on the path."""
    macs = ALL_MACS if policy == "allows none" else "hmac-sha256,blake2s"
    token = daemon.add_identity("m-1/core-0", "--kind", "core", "--module", "m-1",
                                "--channels", "1", "--mac", macs)  # fmt: skip
    with Client(daemon.host, daemon.port, "m-1/core-0", token, timeout=WAIT) as direct:
        direct.send(1, b"genuine")  # the identity works without the proxy
    proxy = DowngradeProxy((daemon.host, daemon.port))
    try:
        host, port = proxy.address
        core = Client(host, port, "m-1/core-0", token, mac="hmac-sha256", timeout=WAIT)
        with pytest.raises(ClientError) as info:
            core.connect()
            for n in range(5):
                core.send(1, f"reading {n}".encode())
            core.flush()
        assert info.value.code == "AUTH_FAILED"
        assert proxy.hellos_rewritten == 1
    finally:
        proxy.close()
    assert stored(daemon) == [b"genuine"]


def test_a_user_identity_cannot_store_a_frame(daemon):
    token = daemon.add_identity("alice", "--kind", "user", "--channels", "1-8", "--admin")
    assert refused(daemon, "alice", token) == "AUTH_FAILED"
    assert refused(daemon, "alice", token, mac="blake2s") == "AUTH_FAILED"
    assert stored(daemon) == []


# -- the identity lifecycle on a running daemon ----------------------------------------


def test_rotate_cuts_the_old_token_and_the_open_connection(daemon):
    old = daemon.add_identity("m-1/core-0", "--kind", "core", "--module", "m-1", "--channels", "1")
    core = connected(daemon, "m-1/core-0", old)
    core.send(1, b"before")
    core.flush()
    new = identity(daemon, "rotate", "m-1/core-0")["token"]
    assert new != old
    assert error_code_of(core) == "REVOKED"
    assert refused(daemon, "m-1/core-0", old) == "AUTH_FAILED"
    with connected(daemon, "m-1/core-0", new) as again:
        again.send(1, b"after")
    payloads = stored(daemon)
    assert payloads[0] == b"before" and payloads[-1] == b"after"


def test_a_large_import_counts_at_once_and_its_revocations_close_connections(daemon, tmp_path):
    """The daemon takes a changed registry of thousands of entries in by parts, one per
    loop iteration; a core of the import that says HELLO at once is welcomed (if the part
    with its line is not in yet, the rest is taken in then), and a revocation made in the
    same moment closes the revoked core's open connection."""
    old = daemon.add_identity("m-0/core-0", "--kind", "core", "--module", "m-0", "--channels", "1")
    core = connected(daemon, "m-0/core-0", old)
    fleet = tmp_path / "fleet.csv"
    fleet.write_text("id,kind,channels\n" + "".join(f"mod-{n:05d},module,1\n" for n in range(3000)))
    result = cli("identity", "import", str(fleet), data_dir=daemon.data_dir)
    assert result.returncode == 0, result.stderr.decode()
    assert (daemon.data_dir / "identities.json").stat().st_size > 4 * 128 * 1024  # parts
    tokens = {t["id"]: t["token"] for t in map(json.loads, result.stdout.splitlines())}
    identity(daemon, "revoke", "m-0/core-0")
    with Client(daemon.host, daemon.port, "mod-02999", tokens["mod-02999"], timeout=WAIT) as new:
        new.send(1, b"provisioned")
        new.flush()
        assert new.rejected == []
    assert error_code_of(core) == "REVOKED"
    assert b"provisioned" in stored(daemon)


def test_bind_clear_undoes_a_thief_s_first_use_binding(daemon_factory):
    d = daemon_factory("[auth]\ntrust_on_first_use = true\n")
    token = d.add_identity("m-1/core-0", "--kind", "core", "--module", "m-1", "--channels", "1")
    with connected(d, "m-1/core-0", token, fingerprint=FP_THIEF):
        pass  # the thief was first: bound to its fingerprint
    assert refused(d, "m-1/core-0", token, fingerprint=FP_REAL) == "AUTH_FAILED"

    assert identity(d, "bind", "m-1/core-0", "--clear") == {"id": "m-1/core-0", "fingerprint": None}
    with connected(d, "m-1/core-0", token, fingerprint=FP_REAL):
        pass  # the real device binds itself now
    assert refused(d, "m-1/core-0", token, fingerprint=FP_THIEF) == "AUTH_FAILED"

    # an explicit binding replaces whatever is bound
    identity(d, "bind", "m-1/core-0", "--fingerprint", FP_THIEF)
    wait_for(lambda: refused(d, "m-1/core-0", token, fingerprint=FP_REAL), WAIT, "refusal")
    listed = cli("identity", "list", data_dir=d.data_dir).stdout.splitlines()
    public = [json.loads(line) for line in listed if b"m-1/core-0" in line]
    assert public[0]["fingerprint"] == FP_THIEF and token.encode() not in b"".join(listed)


def test_cores_connecting_at_once_are_each_bound_to_their_own_fingerprint(daemon_factory, tmp_path):
    """A fleet's first boot with trust on first use: the HELLOs the daemon reads in one
    loop iteration are bound in one registry write (Phase.BINDING), then welcomed; of
    two HELLOs of one id with different fingerprints, exactly one gets in."""
    d = daemon_factory("[auth]\ntrust_on_first_use = true\n")
    rows = tmp_path / "cores.jsonl"
    ids = [f"m-1/core-{n}" for n in range(40)]
    rows.write_text(
        "".join(json.dumps({"id": i, "kind": "core", "module": "m-1", "channels": [1]}) + "\n"
                for i in ids)
    )  # fmt: skip
    imported = cli("identity", "import", str(rows), data_dir=d.data_dir)
    assert imported.returncode == 0, imported.stderr.decode()
    tokens = {r["id"]: r["token"] for r in map(json.loads, imported.stdout.splitlines())}
    wanted = [(ident, f"sha256:{n:064x}") for n, ident in enumerate(ids)]
    wanted.append((ids[0], "sha256:" + "f" * 64))  # the same id, another device
    cores = []
    for ident, fingerprint in wanted:  # every connection past its CHALLENGE first ...
        sock = socket.create_connection((d.host, d.port), timeout=WAIT)
        session = ClientSession(
            ident, crypto.token_to_secret(tokens[ident]), crypto.random_nonce(),
            fingerprint=fingerprint,
        )  # fmt: skip
        while session.server_nonce is None:
            session.receive_data(sock.recv(4096))
        cores.append((ident, fingerprint, sock, session))
    for _, _, sock, session in cores:  # ... then every HELLO at once
        sock.sendall(session.data_to_send())
    answers = {}
    for ident, fingerprint, sock, session in cores:
        events = []
        while not events:
            events = session.receive_data(sock.recv(4096))
        answers[(ident, fingerprint)] = events[0][0]
        sock.close()
    twins = [answers[wanted[0]], answers[wanted[-1]]]
    assert sorted(twins, key=str) == sorted([FrameType.WELCOME, FrameType.ERROR], key=str)
    assert all(answers[w] == FrameType.WELCOME for w in wanted[1:-1])
    exported = cli("identity", "export", "--format", "jsonl", data_dir=d.data_dir)
    rows = [json.loads(line) for line in exported.stdout.splitlines()]
    bound = {r["id"]: r["fingerprint"] for r in rows if r["id"] in tokens}
    winner = wanted[0] if answers[wanted[0]] == FrameType.WELCOME else wanted[-1]
    assert bound == dict(wanted[1:-1]) | dict([winner])


def test_a_revoked_identity_is_restored_with_a_new_token(daemon):
    old = daemon.add_identity("m-1/core-0", "--kind", "core", "--module", "m-1", "--channels", "1")
    core = connected(daemon, "m-1/core-0", old)
    identity(daemon, "revoke", "m-1/core-0")
    assert error_code_of(core) == "REVOKED"

    new = identity(daemon, "restore", "m-1/core-0")["token"]
    with connected(daemon, "m-1/core-0", new) as back:
        back.send(1, b"restored")
    assert refused(daemon, "m-1/core-0", old) == "AUTH_FAILED"  # a revoked token stays dead
    assert stored(daemon)[-1] == b"restored"

    # ... or re-added with other settings
    identity(daemon, "revoke", "m-1/core-0")
    again = daemon.add_identity("m-1/core-0", "--kind", "core", "--module", "m-1",
                                "--channels", "2")  # fmt: skip
    with connected(daemon, "m-1/core-0", again) as readded:
        readded.send(2, b"re-added")  # channel 2: the new settings count
    assert readded.rejected == [] and stored(daemon)[-1] == b"re-added"


# -- local files ---------------------------------------------------------------------


def test_the_data_dir_is_made_private_at_start(daemon_factory):
    d = daemon_factory(start=False)
    d.data_dir.mkdir(mode=0o755)
    os.chmod(d.data_dir, 0o755)  # like the repo's ./data, whatever the umask
    d.start()
    assert stat.S_IMODE(os.stat(d.data_dir).st_mode) == 0o700


def test_a_data_dir_that_cannot_be_made_private_is_refused_in_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = cli("serve", data_dir=blocker / "data")
    err = result.stderr.decode()
    assert result.returncode == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "0700" in err and str(blocker / "data") in err


SECRET_CONFIG = """
[subscribers.up]
type = "cloud"
bucket = "frames"
endpoint = "https://s3.example"
region = "eu-central-1"
access_key_id = "AKIDEXAMPLE"
secret_access_key = "wJalrXUtnFEMI"
"""


OTHER_GID = 65534  # nogroup: a group the daemon (the test) is not running as


@pytest.mark.parametrize(
    ("mode", "group", "warned"),
    [
        (0o644, None, True),
        (0o640, OTHER_GID, True),
        (0o640, None, False),  # the daemon's own group, as the image installs it
        (0o600, None, False),
    ],
)
def test_a_config_holding_secrets_warns_when_others_may_read_it(
    tmp_path, caplog, mode, group, warned
):
    if group is not None and os.geteuid() != 0:
        pytest.skip("giving a file to another group needs root")
    path = tmp_path / "config.toml"
    path.write_text(SECRET_CONFIG)
    os.chmod(path, mode)
    if group is not None:
        os.chown(path, -1, group)
    with caplog.at_level(logging.WARNING, logger="appliance.config"):
        load_config(path, environ={})
    warnings = [r.getMessage() for r in caplog.records if r.name == "appliance.config"]
    assert len(warnings) == (1 if warned else 0)
    if warned:
        assert "subscribers.up.secret_access_key" in warnings[0]
        assert "wJalrXUtnFEMI" not in warnings[0]  # never the secret itself


def test_a_readable_config_without_secrets_does_not_warn(tmp_path, caplog):
    path = tmp_path / "config.toml"
    path.write_text(SECRET_CONFIG.replace('secret_access_key = "wJalrXUtnFEMI"', ""))
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="appliance.config"):
        load_config(path, environ={})
    assert [r for r in caplog.records if r.name == "appliance.config"] == []
