"""The `module-ingest` command line, run as a subprocess against real data dirs and daemons."""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from conftest import ROOT, cli, wait_for

from appliance.client import Client, ClientError
from appliance.config import SCHEMA
from appliance.protocol import crypto
from hw.profiles import PROFILES, detect

TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")
DUMP_KEYS = {"id", "channel", "seq", "ts_ns", "recv_ns", "payload_b64"}
DEV = "dev/core-0"
ALL_MACS = ",".join(crypto.MAC_ALGORITHMS)  # "none" too: an identity must opt in to it


def run(
    *args: str, env: dict[str, str] | None = None, stdin: bytes | None = None, timeout: float = 60
):
    """`python -m appliance ARGS` with exactly the MODULE_INGEST_* variables given in `env`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MODULE_INGEST_")}
    full = dict(base, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        input=stdin,
        capture_output=True,
        env=full,
        timeout=timeout,
        check=False,
    )


def ok(result) -> str:
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def one_line_error(result, *needles: str) -> str:
    """A failure: non-zero exit, exactly one line on stderr, no traceback, nothing on stdout."""
    err = result.stderr.decode()
    assert result.returncode != 0, f"exit 0; stdout={result.stdout!r}"
    assert "Traceback" not in err, err
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line:\n{err}"
    assert err.startswith("module-ingest"), err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    assert result.stdout == b"", result.stdout
    return err


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def dump(data_dir: Path, *args: str) -> list[dict]:
    return json_lines(ok(cli("dump", *args, data_dir=data_dir)))


def show(result) -> dict:
    text = ok(result)
    assert text.startswith("# effective configuration (from ")
    return tomllib.loads(text)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def connect(daemon, ident: str, token: str, *, timeout: float = 5.0) -> Client:
    """A connected Client. The daemon re-reads the registry every sweep (0.25 s), so an
    identity the CLI just added is refused (AUTH_FAILED) until then: retry until a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        client = Client(daemon.host, daemon.port, ident, token, timeout=timeout)
        try:
            client.connect()
            return client
        except ClientError as exc:
            if exc.code != "AUTH_FAILED" or time.monotonic() > deadline:
                raise
        time.sleep(0.02)


# -- identity -------------------------------------------------------------------------


def test_identity_add_prints_one_json_object_with_id_and_token(tmp_path):
    data = tmp_path / "data"
    out = ok(
        cli(
            "identity",
            "add",
            "m-0007/core-2",
            "--kind",
            "core",
            "--module",
            "m-0007",
            "--channels",
            "1,2,5-7",
            data_dir=data,
        )
    )
    assert out.count("\n") == 1
    obj = json.loads(out)
    assert isinstance(obj, dict)
    assert obj["id"] == "m-0007/core-2"
    assert TOKEN.fullmatch(obj["token"]), obj["token"]
    assert "=" not in obj["token"]
    assert len(crypto.token_to_secret(obj["token"])) == 32
    assert obj["kind"] == "core" and obj["module"] == "m-0007"
    assert obj["channels"] == [1, 2, 5, 6, 7]
    assert mode(data / "identities.json") == 0o600

    # every add gets a fresh secret
    other = json.loads(ok(cli("identity", "add", "u", "--kind", "user", data_dir=data)))
    assert TOKEN.fullmatch(other["token"]) and other["token"] != obj["token"]


def test_identity_list_never_prints_tokens_or_secrets(tmp_path):
    data = tmp_path / "data"
    tokens = [
        json.loads(ok(cli("identity", "add", ident, *opts, data_dir=data)))["token"]
        for ident, opts in [
            ("m-1", ("--kind", "module", "--channels", "1-3")),
            ("m-1/core-1", ("--kind", "core", "--module", "m-1", "--channels", "2")),
            ("alice", ("--kind", "user", "--admin", "--mac", "blake2s")),
        ]
    ]
    result = cli("identity", "list", data_dir=data)
    out = ok(result)
    listed = json_lines(out)
    assert [i["id"] for i in listed] == ["alice", "m-1", "m-1/core-1"]
    for entry in listed:
        assert not {"token", "secret"} & set(entry), entry
    alice = listed[0]
    assert alice["admin"] is True and alice["mac"] == ["blake2s"] and alice["revoked"] is False
    everything = out + result.stderr.decode()
    for token in tokens:
        assert token not in everything
        secret = crypto.token_to_secret(token)
        assert secret.hex() not in everything
        assert base64.b64encode(secret).decode() not in everything


def test_identity_list_of_an_empty_registry_prints_nothing(tmp_path):
    assert ok(cli("identity", "list", data_dir=tmp_path / "data")) == ""


def test_identity_revoke(tmp_path):
    data = tmp_path / "data"
    ok(cli("identity", "add", "u1", "--kind", "user", data_dir=data))
    ok(cli("identity", "add", "u2", "--kind", "user", data_dir=data))
    assert json.loads(ok(cli("identity", "revoke", "u1", data_dir=data))) == {
        "id": "u1",
        "revoked": True,
    }
    listed = {i["id"]: i for i in json_lines(ok(cli("identity", "list", data_dir=data)))}
    assert listed["u1"]["revoked"] is True
    assert listed["u2"]["revoked"] is False
    # revoking again is harmless; an active id stays taken, a revoked one can be re-added
    ok(cli("identity", "revoke", "u1", data_dir=data))
    one_line_error(cli("identity", "add", "u2", "--kind", "user", data_dir=data), "u2")
    readded = json.loads(ok(cli("identity", "add", "u1", "--kind", "module", data_dir=data)))
    assert (readded["kind"], readded["revoked"]) == ("module", False)


def test_revoke_closes_the_connection_and_refuses_the_next(daemon):
    token = daemon.add_identity(
        "m-1/core-1", "--kind", "core", "--module", "m-1", "--channels", "1"
    )
    client = connect(daemon, "m-1/core-1", token)
    try:
        client.send(1, b"before")
        client.flush()
        ok(cli("identity", "revoke", "m-1/core-1", data_dir=daemon.data_dir))

        def revoked() -> bool:
            try:
                client.send(1, b"tick")
                client.flush(2.0)
            except ClientError as exc:
                assert exc.code == "REVOKED", exc
                return True
            return False

        wait_for(revoked, what="ERROR REVOKED")
    finally:
        client.close()
    with pytest.raises(ClientError) as info:
        Client(daemon.host, daemon.port, "m-1/core-1", token, timeout=2).connect()
    assert info.value.code == "AUTH_FAILED"


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("add", "x", "--kind", "bogus"), ("bogus",)),
        (("add", "x", "--kind", "core", "--module", "m", "--channels", "5-2"), ("5-2",)),
        (("add", "x", "--kind", "core", "--module", "m", "--channels", "1,,x"), ("channel",)),
        (("add", "x", "--kind", "core", "--module", "m", "--channels", "70000"), ("70000",)),
        (("add", "x", "--kind", "core"), ("module",)),
        (("add", "has space", "--kind", "user"), ("identity id",)),
        (("add", "x", "--kind", "module", "--admin"), ("admin",)),
        (("add", "x", "--kind", "user", "--mac", "md5"), ("--mac",)),
        (("add", "taken", "--kind", "user"), ("taken", "exists")),
        (("revoke", "nobody"), ("nobody",)),
        (("add",), ()),
        (("frobnicate",), ()),
    ],
    ids=[
        "unknown-kind",
        "reversed-channels",
        "bad-channel-list",
        "channel-out-of-range",
        "core-without-module",
        "bad-id",
        "admin-not-user",
        "unknown-mac",
        "duplicate-id",
        "revoke-unknown",
        "missing-argument",
        "unknown-subcommand",
    ],
)
def test_identity_bad_input_is_a_one_line_error(tmp_path, args, needles):
    data = tmp_path / "data"
    ok(cli("identity", "add", "taken", "--kind", "user", data_dir=data))
    before = (data / "identities.json").read_bytes()
    one_line_error(cli("identity", *args, data_dir=data), *needles)
    assert (data / "identities.json").read_bytes() == before  # nothing half-written


def test_a_corrupt_registry_file_is_a_one_line_error(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "identities.json").write_text('{"version": 1, "identities": ')
    one_line_error(cli("identity", "list", data_dir=data), "identities.json")
    one_line_error(cli("identity", "add", "x", "--kind", "user", data_dir=data), "identities.json")


# -- config ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("[server]\nbogus = 1\n", ("server.bogus",)),
        ("[nonsense]\nx = 1\n", ("nonsense",)),
        ("[server\nlisten = 1\n", ("invalid TOML",)),
        ("[server]\nlisten = \n", ("invalid TOML",)),
        ('[server]\nbacklog = "many"\n', ("server.backlog", "int")),
        ("[server]\nbacklog = true\n", ("server.backlog",)),
        ("[server]\nbacklog = 0\n", ("server.backlog", ">=")),
        ("[server]\nhandshake_timeout = 'soon'\n", ("server.handshake_timeout",)),
        ("[server]\nkeepalive = 1\n", ("server.keepalive", "bool")),
        ("[server]\nlisten = 'nowhere'\n", ("server.listen",)),
        ("[storage]\ndata_dir = 7\n", ("storage.data_dir", "str")),
        ("[storage]\nsegment_bytes = 10\n", ("storage.segment_bytes",)),
        ("server = 1\n", ("server",)),
        ("[tls]\nenabled = true\n", ("tls.enabled",)),
    ],
    ids=[
        "unknown-key",
        "unknown-section",
        "bad-toml-table",
        "bad-toml-value",
        "str-for-int",
        "bool-for-int",
        "below-bound",
        "str-for-float",
        "int-for-bool",
        "bad-address",
        "int-for-str",
        "segment-too-small",
        "section-not-a-table",
        "tls-without-cert",
    ],
)
def test_bad_config_is_a_one_line_error_naming_key_and_file(tmp_path, text, needles):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    for command in (("config", "show"), ("identity", "list"), ("dump",)):
        result = cli(*command, data_dir=tmp_path / "data", config=config)
        one_line_error(result, str(config), *needles)
    # the same through the environment variable
    result = run("config", "show", env={"MODULE_INGEST_CONFIG": str(config)})
    one_line_error(result, str(config), *needles)


def test_unreadable_config_file_is_a_one_line_error(tmp_path):
    missing = tmp_path / "missing.toml"
    one_line_error(cli("config", "show", data_dir=tmp_path, config=missing), str(missing))
    one_line_error(run("config", "show", env={"MODULE_INGEST_CONFIG": str(missing)}), str(missing))
    directory = tmp_path / "a-directory.toml"
    directory.mkdir()
    one_line_error(cli("config", "show", data_dir=tmp_path, config=directory), str(directory))


def test_config_file_that_is_not_utf8_is_a_one_line_error(tmp_path):
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    one_line_error(cli("config", "show", data_dir=tmp_path, config=binary), str(binary))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode 000 file anyway")
def test_config_file_without_read_permission_is_a_one_line_error(tmp_path):
    config = tmp_path / "secret.toml"
    config.write_text("[server]\n")
    config.chmod(0)
    one_line_error(cli("config", "show", data_dir=tmp_path, config=config), str(config))


@pytest.mark.parametrize(
    ("var", "value", "needles"),
    [
        ("MODULE_INGEST_LISTEN", "no-port", ("MODULE_INGEST_LISTEN", "server.listen")),
        ("MODULE_INGEST_LISTEN", "127.0.0.1:99999", ("MODULE_INGEST_LISTEN",)),
    ],
)
def test_bad_environment_override_is_a_one_line_error(var, value, needles):
    one_line_error(run("config", "show", env={var: value}), *needles)


def test_config_show_prints_the_defaults(tmp_path):
    values = show(run("config", "show"))
    assert values["server"]["listen"] == "127.0.0.1:7878"
    assert values["server"]["max_payload"] == 65536
    assert values["storage"]["data_dir"] == "./data"
    assert values["auth"]["dev_identity"] is True
    assert set(values) == set(SCHEMA)


def test_a_board_profile_sits_between_defaults_and_the_file(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[board]\nprofile = "rpi4"\n')
    values = show(run("config", "show", env={"MODULE_INGEST_CONFIG": str(config)}))
    assert values["board"]["profile"] == "rpi4"
    assert values["storage"]["segment_bytes"] == PROFILES["rpi4"]["storage"]["segment_bytes"]
    config.write_text('[board]\nprofile = "rpi4"\n[storage]\nsegment_bytes = 1048576\n')
    values = show(run("config", "show", env={"MODULE_INGEST_CONFIG": str(config)}))
    assert values["storage"]["segment_bytes"] == 1048576
    config.write_text('[board]\nprofile = "toaster"\n')
    result = run("config", "show", env={"MODULE_INGEST_CONFIG": str(config)})
    assert result.returncode == 2
    err = result.stderr.decode()
    assert err.count("\n") == 1 and "board.profile" in err and str(config) in err, err


def test_profile_detection_reads_the_device_tree_model(tmp_path):
    model = tmp_path / "model"
    model.write_bytes(b"Raspberry Pi 5 Model B Rev 1.0\0")
    assert detect(model) == "rpi5"
    model.write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\0")
    assert detect(model) == "jetson-orin"
    assert detect(tmp_path / "missing") in ("generic-x86", "generic")


def test_config_show_reflects_the_environment(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(
        '[server]\nname = "board-7"\nlisten = "127.0.0.1:1111"\nidle_timeout = 5\n'
        '[storage]\ndata_dir = "/from/file"\n'
    )
    values = show(run("config", "show", env={"MODULE_INGEST_CONFIG": str(config)}))
    assert values["server"]["name"] == "board-7"
    assert values["server"]["listen"] == "127.0.0.1:1111"
    assert values["server"]["idle_timeout"] == 5.0
    assert values["storage"]["data_dir"] == "/from/file"

    result = run(
        "config",
        "show",
        env={
            "MODULE_INGEST_CONFIG": str(config),
            "MODULE_INGEST_LISTEN": "127.0.0.2:2222",
            "MODULE_INGEST_DATA_DIR": str(tmp_path / "env-data"),
        },
    )
    values = show(result)
    assert values["server"]["name"] == "board-7"  # the file still counts
    assert values["server"]["listen"] == "127.0.0.2:2222"  # the environment wins
    assert values["storage"]["data_dir"] == str(tmp_path / "env-data")
    header = result.stdout.decode().splitlines()[0]
    assert str(config) in header
    assert "MODULE_INGEST_LISTEN" in header and "MODULE_INGEST_DATA_DIR" in header

    # --config beats $MODULE_INGEST_CONFIG
    other = tmp_path / "other.toml"
    other.write_text('[server]\nname = "other"\n')
    values = show(
        run("--config", str(other), "config", "show", env={"MODULE_INGEST_CONFIG": str(config)})
    )
    assert values["server"]["name"] == "other"
    assert values["server"]["listen"] == "127.0.0.1:7878"


def test_config_show_output_loads_back_as_the_same_config(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(
        '[server]\nname = "q\\"uote\\\\"\nbacklog = 7\n[auth]\ndev_identity = false\n'
    )
    first = show(run("config", "show", env={"MODULE_INGEST_CONFIG": str(config)}))
    assert first["server"]["name"] == 'q"uote\\'
    again = tmp_path / "again.toml"
    again.write_bytes(run("config", "show", env={"MODULE_INGEST_CONFIG": str(config)}).stdout)
    assert show(run("config", "show", env={"MODULE_INGEST_CONFIG": str(again)})) == first


def test_config_show_hides_credentials_unless_asked(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(
        '[subscribers.up]\ntype = "cloud"\nbucket = "b"\naccess_key_id = "AKID"\n'
        'secret_access_key = "s3cr3t-value"\nsession_token = ""\n'
    )
    config.chmod(0o600)
    env = {"MODULE_INGEST_CONFIG": str(config)}
    shown = run("config", "show", env=env)
    assert b"s3cr3t-value" not in shown.stdout
    values = show(shown)["subscribers"]["up"]
    assert values["secret_access_key"] == "(hidden)"
    assert values["access_key_id"] == "AKID"  # a name, not a credential
    assert values["session_token"] == ""  # nothing set: nothing to hide
    assert "# hidden: subscribers.up.secret_access_key (--secrets prints them)" in ok(shown)
    full = show(run("config", "show", "--secrets", env=env))["subscribers"]["up"]
    assert full["secret_access_key"] == "s3cr3t-value"


# -- serve ----------------------------------------------------------------------------


def test_first_start_prints_the_dev_token_once_and_saves_it_privately(daemon_factory):
    d = daemon_factory("", start=False)
    assert not d.data_dir.exists()
    d.start()
    creds_path = d.data_dir / "dev-credentials.json"
    creds = json.loads(creds_path.read_text())
    token = creds["token"]
    assert creds["id"] == DEV
    assert creds["channels"] == list(range(1, 9))
    assert TOKEN.fullmatch(token)
    assert mode(creds_path) == 0o600
    assert mode(d.data_dir / "identities.json") == 0o600
    assert mode(d.data_dir) & 0o077 == 0
    log = d.log()
    assert log.count(token) == 1
    assert log.count("development identity created") == 1

    # the dev identity works, with channels 1-8
    with Client(d.host, d.port, DEV, token, timeout=5) as client:
        assert client.channels == list(range(1, 9))
        client.send(8, b"hello")
        client.flush()

    assert d.stop() == 0
    d.start()
    log = d.log()
    assert log.count(token) == 1, "the token was printed again on the second start"
    assert log.count("development identity created") == 1
    assert json.loads(creds_path.read_text())["token"] == token
    listed = json_lines(ok(cli("identity", "list", data_dir=d.data_dir)))
    assert [i["id"] for i in listed] == [DEV]


def test_no_dev_identity_when_disabled(daemon_factory):
    d = daemon_factory("[auth]\ndev_identity = false\n")
    assert not (d.data_dir / "dev-credentials.json").exists()
    assert "development identity" not in d.log()
    assert ok(cli("identity", "list", data_dir=d.data_dir)) == ""


def test_serve_with_a_bad_config_is_a_one_line_error(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[server]\nmax_payload = -1\n")
    result = run(
        "serve",
        env={"MODULE_INGEST_CONFIG": str(config), "MODULE_INGEST_DATA_DIR": str(tmp_path / "d")},
    )
    one_line_error(result, "server.max_payload", str(config))
    assert not (tmp_path / "d").exists()


# -- send -----------------------------------------------------------------------------


def send(daemon, *args: str, ident: str = DEV, token: str | None = None, stdin=None):
    """`send` with the token in a --token-file, never on the command line."""
    token_file = daemon.data_dir.parent / "token"
    token_file.write_text((token or daemon.dev_token) + "\n")
    return cli(
        "send",
        "--id",
        ident,
        "--token-file",
        str(token_file),
        "--connect",
        f"{daemon.host}:{daemon.port}",
        *args,
        data_dir=daemon.data_dir,
        stdin=stdin,
    )


def test_send_reads_stdin_lines_and_prints_a_summary(daemon):
    summary = json.loads(ok(send(daemon, "--channel", "3", stdin=b"one\ntwo\r\nthree")))
    assert summary == {"sent": 3, "acked_seq": 3, "rejected": 0}
    frames = dump(daemon.data_dir)
    assert [(f["id"], f["channel"], f["seq"]) for f in frames] == [(DEV, 3, s) for s in (1, 2, 3)]
    assert [base64.b64decode(f["payload_b64"]) for f in frames] == [b"one", b"two", b"three"]

    # a second run continues above the durable seq (WELCOME last_seq)
    summary = json.loads(ok(send(daemon, "--channel", "4", stdin=b"four\n")))
    assert summary == {"sent": 1, "acked_seq": 4, "rejected": 0}
    assert [f["seq"] for f in dump(daemon.data_dir)] == [1, 2, 3, 4]


def test_send_reads_a_file(daemon, tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_bytes(b"".join(f'{{"t": {i}}}\n'.encode() for i in range(100)))
    summary = json.loads(ok(send(daemon, "--channel", "8", "--file", str(lines))))
    assert summary == {"sent": 100, "acked_seq": 100, "rejected": 0}
    frames = dump(daemon.data_dir, "--channel", "8")
    assert [base64.b64decode(f["payload_b64"]) for f in frames] == [
        f'{{"t": {i}}}'.encode() for i in range(100)
    ]


@pytest.mark.parametrize("mac", ["hmac-sha256", "blake2s", "none"])
def test_send_with_each_mac(daemon, mac):
    token = daemon.add_identity("m-1", "--kind", "module", "--channels", "1", "--mac", ALL_MACS)
    result = send(daemon, "--channel", "1", "--mac", mac, ident="m-1", token=token, stdin=b"x\n")
    summary = json.loads(ok(result))
    assert summary["rejected"] == 0 and summary["acked_seq"] == 1
    assert len(dump(daemon.data_dir)) == 1


def test_mac_none_is_opt_in(daemon):
    """The default policy (the dev identity's too) is hmac-sha256 and blake2s."""
    one_line_error(send(daemon, "--channel", "1", "--mac", "none", stdin=b"x\n"), "AUTH_FAILED")
    assert dump(daemon.data_dir) == []


def test_send_reports_rejected_frames(daemon):
    result = send(daemon, "--channel", "9", stdin=b"a\nb\n")  # dev may write 1-8
    assert result.returncode != 0
    summary = json.loads(result.stdout)
    assert summary["sent"] == 2 and summary["rejected"] == 2
    err = result.stderr.decode()
    assert err.count("DENIED") == 2 and "Traceback" not in err
    assert dump(daemon.data_dir) == []


def test_send_errors_are_one_line(daemon, tmp_path):
    one_line_error(
        cli("send", "--id", DEV, "--channel", "1", data_dir=daemon.data_dir, stdin=b"x\n"),
        "token",
    )
    for token_file in (tmp_path / "missing", tmp_path):
        one_line_error(
            cli("send", "--id", DEV, "--channel", "1", "--token-file", str(token_file),
                data_dir=daemon.data_dir, stdin=b"x\n"),
            "--token-file",
        )  # fmt: skip
    wrong = crypto.secret_to_token(b"\x01" * 32)
    one_line_error(send(daemon, "--channel", "1", token=wrong, stdin=b"x\n"), "AUTH_FAILED")
    one_line_error(send(daemon, "--channel", "1", "--file", str(tmp_path / "nope")), "nope")
    assert dump(daemon.data_dir) == []


def test_send_to_nothing_listening_is_a_one_line_error(tmp_path, daemon):
    port = daemon.port
    assert daemon.stop() == 0
    result = send(
        daemon,
        "--connect",
        f"127.0.0.1:{port}",
        "--timeout",
        "0.5",
        "--channel",
        "1",
        stdin=b"x\n",
    )
    one_line_error(result, "cannot reach")


@pytest.mark.parametrize("channel", ["70000", "-1"])
def test_send_to_a_channel_outside_0_65535_is_a_one_line_error(daemon, channel):
    one_line_error(send(daemon, "--channel", channel, stdin=b"x\n"), "channel")
    assert dump(daemon.data_dir) == []


def test_send_of_a_line_longer_than_max_payload_ends_with_an_error(daemon_factory):
    """The server answers ERROR TOO_LARGE and closes (PROTOCOL.md §7). The sender must give up
    (or refuse the frame up front) within its timeout, not reconnect and resend it forever."""
    d = daemon_factory("[server]\nmax_payload = 1024\n")
    env = {"MODULE_INGEST_DATA_DIR": str(d.data_dir), "MODULE_INGEST_TOKEN": d.dev_token}
    args = ["send", "--id", DEV, "--channel", "1", "--connect", f"{d.host}:{d.port}"]
    try:
        result = run(*args, "--timeout", "2", env=env, stdin=b"x" * 2000 + b"\n", timeout=8)
    except subprocess.TimeoutExpired:
        floods = d.log().count("TOO_LARGE")
        pytest.fail(f"send still running after 8 s; the daemon logged TOO_LARGE {floods} times")
    assert result.returncode != 0
    err = result.stderr.decode()
    assert "Traceback" not in err, err
    assert d.log().count("TOO_LARGE") < 10
    # the daemon still serves a frame that fits
    ok(run(*args, env=env, stdin=b"small\n"))


def test_send_takes_the_token_from_the_environment_or_a_file_never_the_command_line(
    daemon, tmp_path
):
    """A command line is readable by every local user (ps); the environment and a 0600
    file are not. A credentials file like dev-credentials.json works as a token file."""
    address = ["--connect", f"{daemon.host}:{daemon.port}", "--channel", "1"]
    env = {"MODULE_INGEST_DATA_DIR": str(daemon.data_dir), "MODULE_INGEST_TOKEN": daemon.dev_token}
    ok(run("send", "--id", DEV, *address, env=env, stdin=b"from the environment\n"))
    creds = daemon.data_dir / "dev-credentials.json"
    result = cli("send", "--id", DEV, "--token-file", str(creds), *address,
                 data_dir=daemon.data_dir, stdin=b"from a file\n")  # fmt: skip
    assert json.loads(ok(result)) == {"sent": 1, "acked_seq": 2, "rejected": 0}
    result = cli("send", "--id", DEV, "--token", daemon.dev_token, *address,
                 data_dir=daemon.data_dir, stdin=b"x\n")  # fmt: skip
    assert result.returncode == 2 and b"--token" in result.stderr
    assert [f["seq"] for f in dump(daemon.data_dir)] == [1, 2]


def test_send_with_a_malformed_token_is_a_one_line_error(daemon):
    one_line_error(send(daemon, "--channel", "1", token="not-a-token", stdin=b"x\n"), "token")


def test_send_with_a_bad_connect_address_is_a_one_line_error(daemon):
    result = send(
        daemon,
        "--connect",
        "nowhere",
        "--channel",
        "1",
        stdin=b"x\n",
    )
    one_line_error(result, "nowhere")


# -- dump -----------------------------------------------------------------------------


@pytest.fixture
def stocked(daemon):
    """A daemon holding frames of two identities on several channels, sent with the Client."""
    other = daemon.add_identity(
        "m-1/core-1", "--kind", "core", "--module", "m-1", "--channels", "1-3"
    )
    sent: dict[tuple[str, int], tuple[int, int, bytes]] = {}
    for ident, token, frames in [
        (
            DEV,
            daemon.dev_token,
            [(1, b"\xfb\xff"), (2, b"\x00"), (1, b"ab"), (2, b""), (1, b"x" * 70)],
        ),
        ("m-1/core-1", other, [(1, b"\xff\xfe\xfd"), (3, b"m1")]),
    ]:
        with connect(daemon, ident, token) as client:
            for n, (channel, payload) in enumerate(frames):
                ts = 1_700_000_000_000_000_000 + n
                seq = client.send(channel, payload, ts_ns=ts)
                sent[(ident, seq)] = (channel, ts, payload)
            client.flush()
    return daemon, sent


def test_dump_prints_every_frame_with_exactly_the_documented_keys(stocked):
    daemon, sent = stocked
    started = time.time_ns() - 120 * 10**9
    frames = dump(daemon.data_dir)
    assert len(frames) == len(sent)
    for f in frames:
        assert set(f) == DUMP_KEYS
        text = f["payload_b64"]
        assert len(text) % 4 == 0 and "-" not in text and "_" not in text
        payload = base64.b64decode(text, validate=True)
        assert sent[(f["id"], f["seq"])] == (f["channel"], f["ts_ns"], payload)
        assert started < f["recv_ns"] <= time.time_ns()
    by_key = {(f["id"], f["seq"]): f for f in frames}
    assert by_key[(DEV, 1)]["payload_b64"] == "+/8="  # standard alphabet, padded
    assert by_key[(DEV, 2)]["payload_b64"] == "AA=="
    assert by_key[(DEV, 4)]["payload_b64"] == ""


def test_dump_filters(stocked):
    daemon, _ = stocked
    data = daemon.data_dir

    def ids(*args: str) -> list[tuple[str, int]]:
        return [(f["id"], f["seq"]) for f in dump(data, *args)]

    assert ids("--identity", DEV) == [(DEV, s) for s in range(1, 6)]
    assert ids("--identity", "m-1/core-1") == [("m-1/core-1", 1), ("m-1/core-1", 2)]
    assert ids("--identity", "nobody") == []
    assert ids("--channel", "2") == [(DEV, 2), (DEV, 4)]
    assert ids("--channel", "1") == [(DEV, 1), (DEV, 3), (DEV, 5), ("m-1/core-1", 1)]
    assert ids("--since-seq", "3") == [(DEV, 3), (DEV, 4), (DEV, 5)]
    assert ids("--identity", DEV, "--channel", "1", "--since-seq", "2") == [(DEV, 3), (DEV, 5)]
    assert ids("--since-seq", "6") == []


def test_dump_works_while_running_and_after_stop(stocked):
    daemon, sent = stocked
    running = ok(cli("dump", data_dir=daemon.data_dir))
    assert len(running.splitlines()) == len(sent)
    assert daemon.stop() == 0
    assert ok(cli("dump", data_dir=daemon.data_dir)) == running


def test_dump_of_an_empty_store_prints_nothing(daemon):
    assert ok(cli("dump", data_dir=daemon.data_dir)) == ""


def test_dump_on_a_missing_store_is_a_one_line_error(tmp_path):
    one_line_error(cli("dump", data_dir=tmp_path / "nothing-here"), "no store")
    (tmp_path / "empty").mkdir()
    one_line_error(cli("dump", data_dir=tmp_path / "empty"), "no store")
    assert not (tmp_path / "nothing-here").exists()  # dump creates nothing


def test_dump_bad_arguments_are_one_line_errors(tmp_path):
    one_line_error(cli("dump", "--channel", "two", data_dir=tmp_path), "--channel")


def test_serve_on_a_port_in_use_fails_with_one_line_and_no_traceback(daemon, tmp_path):
    result = run(
        "serve",
        env={
            "MODULE_INGEST_LISTEN": f"{daemon.host}:{daemon.port}",
            "MODULE_INGEST_DATA_DIR": str(tmp_path / "second"),
        },
    )
    err = result.stderr.decode()
    assert result.returncode != 0
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("module-ingest: ") and "in use" in last, err
    # the first daemon is unharmed
    assert daemon.proc.poll() is None


# -- identity import / export ---------------------------------------------------------

FLEET_CSV = """id,kind,module,channels,fingerprint,mac
m-1,module,,,,
m-1/core-0,core,m-1,"1,2,5-7",sha256:abc,hmac-sha256
m-1/core-1,core,m-1,3,,"blake2s,none"
ops,user,,1-8,,
"""


def registry_bytes(data: Path) -> bytes:
    path = data / "identities.json"
    return path.read_bytes() if path.exists() else b""


def test_import_csv_prints_the_tokens_and_the_identities_work(daemon, tmp_path):
    fleet = tmp_path / "fleet.csv"
    fleet.write_text(FLEET_CSV)
    tokens = json_lines(ok(cli("identity", "import", str(fleet), data_dir=daemon.data_dir)))
    assert [t["id"] for t in tokens] == ["m-1", "m-1/core-0", "m-1/core-1", "ops"]
    assert all(set(t) == {"id", "token"} for t in tokens)
    listed = {i["id"]: i for i in json_lines(ok(cli("identity", "list", data_dir=daemon.data_dir)))}
    core = listed["m-1/core-0"]
    assert (core["kind"], core["module"], core["channels"]) == ("core", "m-1", [1, 2, 5, 6, 7])
    assert (core["fingerprint"], core["mac"]) == ("sha256:abc", ["hmac-sha256"])
    assert listed["m-1"]["mac"] == ["blake2s", "hmac-sha256"]  # the default policy
    assert listed["m-1/core-1"]["mac"] == ["blake2s", "none"]
    # the running daemon picks them up like any other change
    token = {t["id"]: t["token"] for t in tokens}["m-1"]
    with connect(daemon, "m-1", token) as module:
        module.send(0, b"provisioned")


def test_import_jsonl_to_a_private_tokens_file_that_is_never_overwritten(tmp_path):
    data = tmp_path / "data"
    fleet = tmp_path / "fleet.jsonl"
    rows = [
        {"id": "m-2/core-0", "kind": "core", "module": "m-2", "channels": "1-3"},
        {"id": "m-2/core-1", "kind": "core", "module": "m-2", "channels": [4, 5], "mac": None},
    ]
    fleet.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "tokens.jsonl"
    summary = json.loads(ok(cli("identity", "import", str(fleet), "--tokens-out", str(out),
                                data_dir=data)))  # fmt: skip
    assert summary == {"imported": 2, "tokens": str(out)}
    assert mode(out) == 0o600
    tokens = json_lines(out.read_text())
    assert [t["id"] for t in tokens] == ["m-2/core-0", "m-2/core-1"]

    before, written = registry_bytes(data), out.read_bytes()
    fleet.write_text(json.dumps({"id": "m-3", "kind": "module"}) + "\n")
    one_line_error(cli("identity", "import", str(fleet), "--tokens-out", str(out), data_dir=data),
                   str(out))  # fmt: skip
    link = tmp_path / "link.jsonl"
    link.symlink_to(tmp_path / "victim")
    one_line_error(cli("identity", "import", str(fleet), "--tokens-out", str(link), data_dir=data),
                   str(link))  # fmt: skip
    assert not (tmp_path / "victim").exists()
    assert out.read_bytes() == written and registry_bytes(data) == before


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("id,kind,colour\nm,module,red\n", "row 1: unknown key 'colour'"),
        ("id,kind,channels\na,module,1\nb,module,9-3\n", "row 3: reversed channel range"),
        ("id,kind,channels\na,module,70000\n", "row 2: channel 70000 out of range"),
        ("id,kind\na,module\nb,module\na,module\n", "row 4: identity 'a' given twice"),
        ("id,kind,module\na,module,\ndev/core-0,core,dev\n", "row 3: identity 'dev/core-0'"),
        ("id,kind\na,robot\n", "row 2: bad kind"),
        ("id,kind,mac\na,module,md5\n", "row 2: unknown MAC algorithm 'md5'"),
        ("id,kind\na,module,extra\n", "row 2: 3 values for 2 keys"),
        ("id,kind\n,module\n", "row 2: 'id' and 'kind' are required"),
        ("", "row 1: empty file"),
    ],
)
def test_import_is_all_or_nothing_with_one_line_naming_the_row(tmp_path, text, needle):
    data = tmp_path / "data"
    ok(cli("identity", "add", "dev/core-0", "--kind", "core", "--module", "dev", data_dir=data))
    before = registry_bytes(data)
    fleet = tmp_path / "fleet.csv"
    fleet.write_text(text)
    out = tmp_path / "tokens.jsonl"
    result = cli("identity", "import", str(fleet), "--tokens-out", str(out), data_dir=data)
    assert result.returncode == 2
    one_line_error(result, needle, str(fleet))
    assert registry_bytes(data) == before and not out.exists()


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("{not json", "row 2: not valid JSON"),
        ("[1, 2]", "row 2: not a JSON object"),
        ('{"id": "b", "kind": "module", "admin": true}', "row 2: unknown key 'admin'"),
        ('{"id": "b", "kind": "module", "channels": [1, "2"]}', "row 2: 'channels' must be"),
        ('{"id": 7, "kind": "module"}', "row 2: 'id' must be a string"),
    ],
)
def test_import_jsonl_errors_name_the_row(tmp_path, line, needle):
    data = tmp_path / "data"
    fleet = tmp_path / "fleet.txt"  # no telling extension: --format says it
    fleet.write_text('{"id": "a", "kind": "module"}\n' + line + "\n")
    one_line_error(cli("identity", "import", str(fleet), "--format", "jsonl", data_dir=data),
                   needle)  # fmt: skip
    assert registry_bytes(data) == b""


def test_import_of_a_file_it_cannot_read_or_tell_is_one_line(tmp_path):
    data = tmp_path / "data"
    one_line_error(cli("identity", "import", str(tmp_path / "nope.csv"), data_dir=data), "nope")
    (tmp_path / "fleet.txt").write_text("id,kind\n")
    one_line_error(cli("identity", "import", str(tmp_path / "fleet.txt"), data_dir=data),
                   "--format")  # fmt: skip


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_export_never_shows_a_secret_and_round_trips_through_import(tmp_path, fmt):
    first, second = tmp_path / "first", tmp_path / "second"
    fleet = tmp_path / "fleet.csv"
    fleet.write_text(FLEET_CSV)
    tokens = json_lines(ok(cli("identity", "import", str(fleet), data_dir=first)))
    ok(cli("identity", "add", "gone", "--kind", "module", data_dir=first))
    ok(cli("identity", "revoke", "gone", data_dir=first))
    exported = ok(cli("identity", "export", "--format", fmt, data_dir=first))
    for token in tokens:
        assert token["token"] not in exported
    assert "gone" not in exported  # a revoked identity is not provisioned again
    again = tmp_path / f"again.{fmt}"
    again.write_text(exported)
    new_tokens = json_lines(ok(cli("identity", "import", str(again), data_dir=second)))
    assert [t["id"] for t in new_tokens] == [t["id"] for t in tokens]
    assert {t["token"] for t in new_tokens}.isdisjoint(t["token"] for t in tokens)
    assert ok(cli("identity", "export", "--format", fmt, data_dir=second)) == exported
    if fmt == "csv":
        assert exported.splitlines()[0] == "id,kind,module,channels,fingerprint,mac"
        assert 'm-1/core-0,core,m-1,"1-2,5-7",sha256:abc,hmac-sha256' in exported


def test_import_reads_a_spreadsheet_export_with_a_bom_and_crlf(tmp_path):
    fleet = tmp_path / "fleet.csv"
    fleet.write_bytes(b"\xef\xbb\xbf" + FLEET_CSV.replace("\n", "\r\n").encode())
    tokens = json_lines(ok(cli("identity", "import", str(fleet), data_dir=tmp_path / "data")))
    assert len(tokens) == 4
