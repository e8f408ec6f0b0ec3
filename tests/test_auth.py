"""auth/: the identity registry file and the server's HELLO checks, on real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from appliance.auth import registry as registry_module
from appliance.auth.handshake import bind_first_use, check_hello, to_bind
from appliance.auth.identity import KINDS, Identity, RegistryError, parse_channels
from appliance.auth.registry import Registry
from appliance.protocol import crypto
from appliance.protocol.session import parse_hello

SN = "00112233445566778899aabbccddeeff"
CN = "ffeeddccbbaa99887766554433221100"
FP = "sha256:f6298bff015cb6c58e55e400b8097684422eb3d3c85edc856cb8d1ba2084878f"
OTHER_FP = "sha256:" + "0" * 64


def authenticate(registry, hello, server_nonce, *, trust_on_first_use=False):
    """The server's two steps for one HELLO: every check, then the first-use binding."""
    identity = check_hello(registry, hello, server_nonce)
    if identity is not None and trust_on_first_use and to_bind(identity, hello):
        return bind_first_use(registry, [(identity, hello["fingerprint"])])[0]
    return identity


@pytest.fixture
def writes(monkeypatch) -> list[int]:
    """The registry's file writes, each as its number of identities (the real write runs)."""
    done: list[int] = []
    real_write = Registry._write
    monkeypatch.setattr(
        Registry,
        "_write",
        lambda self, ids, previous: done.append(len(ids)) or real_write(self, ids, previous),
    )
    return done


@pytest.fixture
def path(tmp_path):
    return tmp_path / "data" / "identities.json"


@pytest.fixture
def registry(path):
    return Registry(path)


# -- registry ------------------------------------------------------------------


def test_missing_file_is_an_empty_registry(registry, path):
    registry.load()
    assert registry.list() == []
    assert registry.get("nobody") is None
    assert not path.exists()


def test_add_get_list_revoke_round_trip(registry, path):
    registry.add("m-0007", "module", channels=[1, 2])
    registry.add("m-0007/core-2", "core", module="m-0007", channels=[7], fingerprint=FP)
    registry.add("alice", "user", channels=range(3), macs=["blake2s"], admin=True)

    assert [i.id for i in registry.list()] == ["alice", "m-0007", "m-0007/core-2"]
    core = registry.get("m-0007/core-2")
    assert isinstance(core, Identity)
    assert (core.kind, core.module, core.channels, core.fingerprint) == (
        "core",
        "m-0007",
        frozenset({7}),
        FP,
    )
    assert core.macs == frozenset(crypto.DEFAULT_MACS)  # "none" is opt-in
    assert not core.admin and not core.revoked
    assert abs(core.created_ns - time.time_ns()) < 60 * 10**9
    alice = registry.get("alice")
    assert alice.admin and alice.macs == {"blake2s"} and alice.channels == {0, 1, 2}

    registry.revoke("m-0007/core-2")
    assert registry.get("m-0007/core-2").revoked
    fresh = Registry(path)
    fresh.load()
    assert fresh.list() == registry.list()
    assert fresh.get("m-0007/core-2").revoked
    assert not fresh.get("m-0007").revoked


def test_token_decodes_to_the_stored_secret(registry, path):
    token = registry.add("dev/core-0", "core", module="dev")
    secret = crypto.token_to_secret(token)
    assert len(secret) == 32
    assert registry.get("dev/core-0").secret == secret
    fresh = Registry(path)
    assert fresh.get("dev/core-0").secret == secret
    assert json.loads(path.read_text())["identities"]["dev/core-0"]["token"] == token


def test_secret_stays_out_of_repr(registry):
    token = registry.add("dev/core-0", "core", module="dev")
    assert token not in repr(registry.get("dev/core-0"))
    assert repr(crypto.token_to_secret(token)) not in repr(registry.get("dev/core-0"))


def test_file_is_0600_and_written_without_leftovers(registry, path):
    registry.add("a", "module")
    registry.add("b", "module")
    registry.revoke("a")
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert sorted(os.listdir(path.parent)) == ["identities.json", "identities.json.lock"]
    doc = json.loads(path.read_text())
    assert doc["version"] == 1
    assert sorted(doc["identities"]) == ["a", "b"]
    assert doc["identities"]["a"]["revoked"] is True


def test_duplicate_id_is_refused_and_keeps_the_first(registry):
    token = registry.add("a", "module")
    with pytest.raises(RegistryError, match="already exists"):
        registry.add("a", "user")
    assert registry.get("a").kind == "module"
    assert registry.get("a").secret == crypto.token_to_secret(token)


@pytest.mark.parametrize(
    ("ident", "kind", "options", "message"),
    [
        ("c", "core", {}, "needs a module"),
        ("m", "module", {"module": "x"}, "only a core"),
        ("c", "core", {"module": "has space"}, "bad module"),
        ("m", "module", {"admin": True}, "only a user"),
        ("x", "robot", {}, "bad kind"),
        ("", "module", {}, "bad identity id"),
        ("has space", "module", {}, "bad identity id"),
        ("tab\there", "module", {}, "bad identity id"),
        ("é", "module", {}, "bad identity id"),
        ("x" * 129, "module", {}, "bad identity id"),
        ("m", "module", {"channels": [65536]}, "out of range"),
        ("m", "module", {"channels": [-1]}, "out of range"),
        ("m", "module", {"channels": [True]}, "out of range"),
        ("m", "module", {"macs": ["md5"]}, "unknown MAC"),
        ("m", "module", {"macs": []}, "no MAC"),
        ("m", "module", {"fingerprint": ""}, "bad fingerprint"),
        ("m", "module", {"fingerprint": "two words"}, "bad fingerprint"),
    ],
)
def test_add_refuses_bad_identities(registry, path, ident, kind, options, message):
    with pytest.raises(RegistryError, match=message) as info:
        registry.add(ident, kind, **options)
    assert "\n" not in str(info.value)
    assert not path.exists()


def test_longest_id_and_every_kind_are_accepted(registry):
    registry.add("x" * 128, "module")
    for kind in KINDS:
        registry.add(f"{kind}/1", kind, module="m" if kind == "core" else None)
    assert len(registry.list()) == 4


def test_revoke_unknown_id(registry):
    with pytest.raises(RegistryError, match="unknown identity"):
        registry.revoke("nobody")


def test_bind_first_use_binds_only_identities_without_a_fingerprint(registry, path):
    registry.add("c", "core", module="m")
    registry.add("d", "core", module="m")
    registry.bind_first_use({"c": FP})
    registry.bind_first_use({"c": OTHER_FP, "d": OTHER_FP, "nobody": FP})  # gone: passed over
    assert registry.get("c").fingerprint == FP
    fresh = Registry(path)
    assert (fresh.get("c").fingerprint, fresh.get("d").fingerprint) == (FP, OTHER_FP)
    assert fresh.get("nobody") is None
    registry.add("e", "core", module="m")
    with pytest.raises(RegistryError, match="bad fingerprint"):
        registry.bind_first_use({"e": FP, "c": ""})
    assert Registry(path).get("e").fingerprint is None  # nothing written


@pytest.mark.parametrize(
    ("text", "channels"),
    [
        ("1,2,5-7", [1, 2, 5, 6, 7]),
        ("", []),
        ("  ", []),
        ("7", [7]),
        (" 3 , 1-2 ", [1, 2, 3]),
        ("5-7,6,1-1", [1, 5, 6, 7]),
        ("0", [0]),
        ("65530-65535", [65530, 65531, 65532, 65533, 65534, 65535]),
    ],
)
def test_parse_channels(text, channels):
    assert parse_channels(text) == channels


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1,,2", "bad channel list"),
        ("1,", "bad channel list"),
        ("a", "bad channel list"),
        ("1-", "bad channel list"),
        ("-1", "bad channel list"),
        ("1-2-3", "bad channel list"),
        ("1.5", "bad channel list"),
        ("1 2", "bad channel list"),
        ("\uff11", "bad channel list"),  # a full-width digit
        ("9" * 5000, "bad channel list"),
        ("7-5", "reversed"),
        ("65536", "out of range"),
        ("1-70000", "out of range"),
    ],
)
def test_parse_channels_errors(text, message):
    with pytest.raises(RegistryError, match=message):
        parse_channels(text)


def test_reload_sees_the_cli_and_reports_revocations(path):
    daemon = Registry(path)
    daemon.load()
    cli = Registry(path)  # another instance on the same file, as the CLI beside the daemon
    cli.add("a", "module")
    cli.add("b", "module")
    assert daemon.get("a") is None

    assert daemon.reload_if_changed() == set()
    assert daemon.get("a") is not None and daemon.get("b") is not None
    assert daemon.reload_if_changed() == set()

    cli.revoke("a")
    assert daemon.reload_if_changed() == {"a"}
    assert daemon.get("a").revoked
    assert daemon.reload_if_changed() == set()

    # A hand edit that removes an identity counts as a revocation.
    doc = json.loads(path.read_text())
    del doc["identities"]["b"]
    path.write_text(json.dumps(doc))
    assert daemon.reload_if_changed() == {"b"}
    assert daemon.get("b") is None


def test_reload_reports_revocations_made_through_the_same_instance(registry):
    registry.add("a", "module")
    registry.add("b", "module")
    assert registry.reload_if_changed() == set()
    registry.revoke("b")
    assert registry.reload_if_changed() == {"b"}
    assert registry.reload_if_changed() == set()


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "\xff\xfe",
        "[]",
        '{"version": 2, "identities": {}}',
        '{"version": 1}',
        '{"version": 1, "identities": {"a": {"kind": "module"}}}',
    ],
)
def test_bad_file_gives_a_one_line_registry_error(path, content):
    path.parent.mkdir()
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(RegistryError) as info:
        Registry(path).load()
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_a_bad_file_is_never_overwritten(registry, path):
    path.parent.mkdir()
    path.write_text("{not json")
    with pytest.raises(RegistryError):
        registry.add("a", "module")
    with pytest.raises(RegistryError):
        registry.revoke("a")
    assert path.read_text() == "{not json"


def test_daemon_keeps_the_last_good_copy_when_the_file_goes_bad(path):
    cli = Registry(path)
    cli.add("a", "module")
    daemon = Registry(path)
    daemon.load()
    good = path.read_text()

    path.write_text("{not json")
    with pytest.raises(RegistryError):
        daemon.reload_if_changed()
    assert daemon.reload_if_changed() == set()  # said once, not at every poll
    assert daemon.get("a") is not None

    doc = json.loads(good)
    doc["identities"]["a"]["revoked"] = True
    path.write_text(json.dumps(doc))
    assert daemon.reload_if_changed() == {"a"}


def test_a_bad_file_at_start_leaves_an_empty_registry(path):
    path.parent.mkdir()
    path.write_text("{not json")
    daemon = Registry(path)
    with pytest.raises(RegistryError):
        daemon.load()
    assert daemon.get("a") is None  # refuses everyone, without raising at each HELLO


_ADDER = textwrap.dedent(
    """
    import os, sys, time
    from appliance.auth.registry import Registry
    path, prefix, go, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    while not os.path.exists(go):
        time.sleep(0.001)
    registry = Registry(path)
    for n in range(count):
        registry.add(f"{prefix}-{n}", "module")
    """
)


def test_concurrent_adds_from_two_processes_lose_none(path, tmp_path):
    go = tmp_path / "go"
    count = 40
    procs = [
        subprocess.Popen([sys.executable, "-c", _ADDER, str(path), prefix, str(go), str(count)])
        for prefix in ("cli", "daemon")
    ]
    time.sleep(0.3)  # let both start up, so the adds overlap
    go.touch()
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    ids = {i.id for i in Registry(path).list()}
    expected = {f"{prefix}-{n}" for prefix in ("cli", "daemon") for n in range(count)}
    assert ids == expected
    assert sorted(os.listdir(path.parent)) == ["identities.json", "identities.json.lock"]


# -- authenticate ----------------------------------------------------------------


def hello_for(ident: str, secret: bytes, fingerprint: str = "", mac: str = "hmac-sha256") -> dict:
    """A HELLO as the session hands it over: built as JSON and parsed by parse_hello."""
    proof = crypto.hello_proof(secret, SN, CN, ident, fingerprint, mac)
    payload = {"id": ident, "nonce": CN, "fingerprint": fingerprint, "mac": mac, "proof": proof}
    hello = parse_hello(json.dumps(payload).encode())
    assert hello is not None
    return hello


@pytest.fixture
def core(registry):
    token = registry.add("m-0007/core-2", "core", module="m-0007", channels=[7])
    return "m-0007/core-2", crypto.token_to_secret(token)


def test_good_proof(registry, core):
    ident, secret = core
    identity = authenticate(registry, hello_for(ident, secret), SN)
    assert identity is not None and identity.id == ident and identity.channels == {7}


def test_protocol_test_vector_from_a_hand_written_file(path):
    path.parent.mkdir()
    entry = {
        "kind": "core",
        "module": "m-0007",
        "token": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8",
        "channels": [7],
        "fingerprint": FP,
        "macs": ["hmac-sha256"],
        "admin": False,
        "revoked": False,
        "created_ns": 0,
    }
    path.write_text(json.dumps({"version": 1, "identities": {"m-0007/core-2": entry}}))
    hello = {
        "id": "m-0007/core-2",
        "nonce": CN,
        "fingerprint": FP,
        "mac": "hmac-sha256",
        "proof": "7d5a2f84d47de8a325764f41c7e91c6924fe56aa3abbc84980bd58fbe7fdb281",  # §8, rev. 2
    }
    identity = authenticate(Registry(path), hello, SN)
    assert identity is not None and identity.secret == bytes(range(32))


def test_wrong_proof(registry, core):
    ident, secret = core
    assert authenticate(registry, hello_for(ident, bytes(32)), SN) is None
    hello = hello_for(ident, secret)
    assert authenticate(registry, hello, "0" * 32) is None  # proof for another challenge
    digit = "1" if hello["proof"][-1] == "0" else "0"
    hello["proof"] = hello["proof"][:-1] + digit
    assert authenticate(registry, hello, SN) is None


def test_unknown_id(registry, core):
    _, secret = core
    assert authenticate(registry, hello_for("m-0007/core-3", secret), SN) is None


def test_revoked_id(registry, core):
    ident, secret = core
    registry.revoke(ident)
    assert authenticate(registry, hello_for(ident, secret), SN) is None


def test_bound_fingerprint_must_match(registry, core):
    ident, secret = core
    registry.bind(ident, FP)
    assert authenticate(registry, hello_for(ident, secret, OTHER_FP), SN) is None
    assert authenticate(registry, hello_for(ident, secret, ""), SN) is None
    assert authenticate(registry, hello_for(ident, secret, FP), SN) is not None
    assert authenticate(registry, hello_for(ident, secret, FP), SN, trust_on_first_use=True)


def test_unbound_identity_accepts_any_fingerprint_without_binding(registry, core):
    ident, secret = core
    assert authenticate(registry, hello_for(ident, secret, FP), SN) is not None
    assert authenticate(registry, hello_for(ident, secret, OTHER_FP), SN) is not None
    assert registry.get(ident).fingerprint is None


def test_trust_on_first_use_binds_then_refuses_another_fingerprint(registry, path, core):
    ident, secret = core
    identity = authenticate(registry, hello_for(ident, secret, FP), SN, trust_on_first_use=True)
    assert identity is not None and identity.fingerprint == FP
    assert Registry(path).get(ident).fingerprint == FP  # persisted
    again = hello_for(ident, secret, OTHER_FP)
    assert authenticate(registry, again, SN, trust_on_first_use=True) is None
    assert authenticate(registry, hello_for(ident, secret, FP), SN) is not None


def test_first_use_bindings_of_many_hellos_take_one_registry_write(registry, path, writes):
    tokens = registry.add_many(
        [{"ident": f"m/core-{n}", "kind": "core", "module": "m"} for n in range(3)]
    )
    secrets = {ident: crypto.token_to_secret(token) for ident, token in tokens.items()}
    wanted = [("m/core-0", FP), ("m/core-1", FP), ("m/core-0", OTHER_FP), ("m/core-2", "a b")]
    proven = [
        (check_hello(registry, hello_for(ident, secrets[ident], fp), SN), fp)
        for ident, fp in wanted
    ]
    assert all(identity is not None for identity, _ in proven)  # unbound: any fingerprint
    writes.clear()
    bound = bind_first_use(registry, proven)
    assert writes == [3]  # one write for the whole batch
    # the first HELLO of an id binds; a second with another fingerprint fails, and so
    # does an unbindable fingerprint (which binds nothing)
    assert [b and b.fingerprint for b in bound] == [FP, FP, None, None]
    fresh = Registry(path)
    assert [fresh.get(f"m/core-{n}").fingerprint for n in range(3)] == [FP, FP, None]


def test_trust_on_first_use_binds_only_after_every_check(registry, core):
    ident, _ = core
    token = registry.add("mac-none-only", "module", macs=["none"])
    wrong_proof = hello_for(ident, bytes(32), OTHER_FP)
    assert authenticate(registry, wrong_proof, SN, trust_on_first_use=True) is None
    assert registry.get(ident).fingerprint is None
    hello = hello_for("mac-none-only", crypto.token_to_secret(token), OTHER_FP, mac="blake2s")
    assert authenticate(registry, hello, SN, trust_on_first_use=True) is None
    assert registry.get("mac-none-only").fingerprint is None


def test_trust_on_first_use_with_no_fingerprint_binds_nothing(registry, core):
    ident, secret = core
    assert authenticate(registry, hello_for(ident, secret, ""), SN, trust_on_first_use=True)
    assert registry.get(ident).fingerprint is None


def test_trust_on_first_use_with_an_unbindable_fingerprint_fails(registry, core):
    ident, secret = core
    hello = hello_for(ident, secret, "has space")
    assert authenticate(registry, hello, SN, trust_on_first_use=True) is None
    assert registry.get(ident).fingerprint is None


def test_disallowed_mac(registry):
    token = registry.add("dev/core-0", "core", module="dev", macs=["hmac-sha256", "blake2s"])
    secret = crypto.token_to_secret(token)
    assert authenticate(registry, hello_for("dev/core-0", secret, mac="none"), SN) is None
    assert authenticate(registry, hello_for("dev/core-0", secret, mac="blake2s"), SN) is not None


def test_lone_surrogates_fail_instead_of_raising(registry, core):
    ident, secret = core
    payload = '{"id": "\\ud800", "nonce": "%s", "fingerprint": "", "mac": "none", "proof": "%s"}'
    assert parse_hello((payload % (CN, "0" * 64)).encode()) is None  # refused as malformed
    hello = hello_for(ident, secret)  # authenticate refuses one that gets through anyway
    hello["id"] = "\ud800"
    assert authenticate(registry, hello, SN) is None
    hello = hello_for(ident, secret)
    hello["fingerprint"] = "\udfff"
    assert authenticate(registry, hello, SN, trust_on_first_use=True) is None


# -- add_many --------------------------------------------------------------------


def test_add_many_writes_once_and_returns_every_token(registry, path, writes):
    registry.add("m-1", "module", channels=[1])
    specs = [
        {"ident": f"m-1/core-{n}", "kind": "core", "module": "m-1", "channels": [1, 2]}
        for n in range(500)
    ]
    specs.append({"ident": "bob", "kind": "user", "macs": ["blake2s"], "admin": True})
    tokens = registry.add_many(specs)

    assert writes == [1, 502]  # add, then one write for the whole batch
    assert list(tokens) == [spec["ident"] for spec in specs]
    fresh = Registry(path)
    assert len(fresh.list()) == 502
    for ident, token in tokens.items():
        assert fresh.get(ident).secret == crypto.token_to_secret(token)
    core = fresh.get("m-1/core-7")
    assert (core.kind, core.module, core.channels) == ("core", "m-1", frozenset({1, 2}))
    assert core.macs == frozenset(crypto.DEFAULT_MACS)  # "none" is opt-in
    bob = fresh.get("bob")
    assert bob.admin and bob.macs == {"blake2s"}
    assert len(set(tokens.values())) == len(tokens)
    assert registry.add_many([]) == {}
    assert writes == [1, 502]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"ident": "c", "kind": "core"}, "needs a module"),
        ({"ident": "m", "kind": "module", "channels": [65536]}, "out of range"),
        ({"ident": "m", "kind": "module", "macs": []}, "no MAC"),
        ({"ident": "has space", "kind": "module"}, "bad identity id"),
        ({"ident": "m", "kind": "module", "colour": "red"}, "unknown identity field 'colour'"),
        ({"kind": "module"}, "needs 'ident' and 'kind'"),
        ({"ident": "old", "kind": "module"}, "already exists"),
        ({"ident": "ok-0", "kind": "module"}, "given twice"),
        ("ok-9", "is a dict"),
    ],
)
def test_add_many_is_all_or_nothing(registry, path, spec, message):
    registry.add("old", "module")
    before = path.read_bytes()
    specs = [{"ident": f"ok-{n}", "kind": "module"} for n in range(3)] + [spec]
    with pytest.raises(RegistryError, match=message) as info:
        registry.add_many(specs)
    assert "\n" not in str(info.value)
    assert path.read_bytes() == before
    assert [i.id for i in Registry(path).list()] == ["old"]
    assert [i.id for i in registry.list()] == ["old"]


# -- lifecycle: rotate, restore, bind --------------------------------------------------


def test_rotate_gives_a_new_secret_and_reports_the_identity(path):
    cli = Registry(path)
    old = cli.add("a", "module", channels=[1])
    daemon = Registry(path)
    assert daemon.get("a").secret == crypto.token_to_secret(old)  # handed out, as at a HELLO
    assert daemon.reload_if_changed() == set()

    new = cli.rotate("a")
    assert new != old
    assert daemon.reload_if_changed() == {"a"}  # its open connection must go
    assert daemon.get("a").secret == crypto.token_to_secret(new)
    assert daemon.get("a").channels == {1} and not daemon.get("a").revoked
    assert daemon.reload_if_changed() == set()


def test_rotations_in_one_clock_tick_are_each_seen(path):
    """A rotation keeps the file's size; the writer moves the mtime on, so a reader that
    polls by (inode, size, mtime) cannot take the new file for the one it has."""
    cli = Registry(path)
    cli.add("a", "module")
    daemon = Registry(path)
    daemon.get("a")
    for _ in range(20):
        before = os.stat(path)
        token = cli.rotate("a")
        after = os.stat(path)
        assert after.st_mtime_ns > before.st_mtime_ns and after.st_size == before.st_size
        assert daemon.reload_if_changed() == {"a"}
        assert daemon.get("a").secret == crypto.token_to_secret(token)


def test_rotate_and_restore_refuse_the_wrong_state(registry):
    registry.add("a", "module")
    with pytest.raises(RegistryError, match="not revoked"):
        registry.restore("a")
    registry.revoke("a")
    with pytest.raises(RegistryError, match="revoked: restore it"):
        registry.rotate("a")
    for operation in (registry.rotate, registry.restore, registry.revoke):
        with pytest.raises(RegistryError, match="unknown identity"):
            operation("nobody")


def test_restore_keeps_the_settings_with_a_new_secret(registry, path):
    old = registry.add("c", "core", module="m", channels=[3], fingerprint=FP, macs=["blake2s"])
    registry.revoke("c")
    new = registry.restore("c")
    restored = Registry(path).get("c")
    assert restored.secret == crypto.token_to_secret(new) != crypto.token_to_secret(old)
    assert not restored.revoked
    assert (restored.channels, restored.fingerprint, restored.macs) == ({3}, FP, {"blake2s"})


def test_a_revoked_id_can_be_added_again_but_not_an_active_one(registry):
    registry.add("a", "module", channels=[1])
    registry.revoke("a")
    token = registry.add("a", "user", channels=[2])
    again = registry.get("a")
    assert (again.kind, again.channels, again.revoked) == ("user", {2}, False)
    assert again.secret == crypto.token_to_secret(token)
    with pytest.raises(RegistryError, match="already exists"):
        registry.add("a", "user")
    registry.revoke("a")
    with pytest.raises(RegistryError, match=r"already exists \(revoked\)") as info:
        registry.add_many([{"ident": "b", "kind": "module"}, {"ident": "a", "kind": "module"}])
    assert info.value.index == 1
    assert registry.get("b") is None


def test_bind_sets_replaces_and_clears_a_fingerprint(registry, path):
    registry.add("a", "module")
    registry.bind("a", FP)
    assert Registry(path).get("a").fingerprint == FP
    registry.bind("a", OTHER_FP)
    assert Registry(path).get("a").fingerprint == OTHER_FP
    registry.bind("a", None)
    assert Registry(path).get("a").fingerprint is None
    with pytest.raises(RegistryError, match="bad fingerprint"):
        registry.bind("a", "two words")
    with pytest.raises(RegistryError, match="unknown identity"):
        registry.bind("nobody", FP)


def test_a_user_never_authenticates(registry):
    token = registry.add("alice", "user", channels=[1], admin=True)
    secret = crypto.token_to_secret(token)
    for mac in crypto.DEFAULT_MACS:
        assert authenticate(registry, hello_for("alice", secret, mac=mac), SN) is None


# -- the file: one line per identity, parsed when looked up ------------------------------


def test_the_file_has_one_line_per_identity_and_is_plain_json(registry, path):
    registry.add_many([{"ident": f"m-{n}", "kind": "module"} for n in range(3)])
    registry.add('q"uote\\d', "module")  # an id JSON must escape
    lines = path.read_bytes().splitlines()
    assert lines[0] == b'{"version": 1, "identities": {' and lines[-1] == b"}}"
    assert len(lines) == 2 + 4
    doc = json.loads(path.read_bytes())
    assert sorted(doc["identities"]) == sorted(["m-0", "m-1", "m-2", 'q"uote\\d'])
    assert Registry(path).get('q"uote\\d') is not None


def test_a_bad_line_refuses_that_identity_only(path, caplog):
    cli = Registry(path)
    cli.add("good", "module")
    cli.add("bad", "module")
    path.write_text(path.read_text().replace('"kind": "module"', '"kind": "robot"', 1))
    daemon = Registry(path)
    with caplog.at_level("ERROR", logger="appliance.auth.registry"):
        assert daemon.get("bad") is None  # "bad" sorts first: its line was edited
        assert daemon.get("bad") is None
    assert [r.getMessage().count("bad kind") for r in caplog.records] == [1]  # logged once
    assert daemon.get("good") is not None
    with pytest.raises(RegistryError, match="identity 'bad': bad kind"):
        daemon.list()


def test_an_unchanged_line_is_not_parsed_again(path, monkeypatch):
    cli = Registry(path)
    cli.add_many([{"ident": f"m-{n}", "kind": "module"} for n in range(100)])
    daemon = Registry(path)
    assert len(daemon.list()) == 100
    parsed = []
    real = registry_module.parse_line
    monkeypatch.setattr(
        registry_module, "parse_line", lambda i, line: parsed.append(i) or real(i, line)
    )
    cli.rotate("m-7")
    cli.add("new", "module")
    assert daemon.reload_if_changed() == {"m-7"}
    assert parsed == ["m-7"]  # to learn whether its connection must go
    assert daemon.get("new") is not None and daemon.get("m-8") is not None
    assert parsed == ["m-7", "new"]


# -- reload by parts: the daemon's loop takes a changed file in a part at a time --------


def reload_by_parts(registry: Registry, part_bytes: int) -> tuple[set[str], int]:
    """reload_part until it is done: what it returns then, and how many calls it took."""
    calls = 1
    while (gone := registry.reload_part(part_bytes)) is None:
        calls += 1
    return gone, calls


@pytest.mark.parametrize("part_bytes", [1, 300, 1 << 20])
def test_a_reload_by_parts_sees_what_a_whole_reload_sees(path, part_bytes):
    cli = Registry(path)
    cli.add_many([{"ident": f"m-{n:02d}", "kind": "module"} for n in range(50)])
    whole, daemon = Registry(path), Registry(path)
    ids = [f"m-{n:02d}" for n in range(50)]
    for r in (whole, daemon):
        assert all(r.get(i) is not None for i in ids)  # handed out, as to connected cores
    cli.rotate("m-07")
    cli.revoke("m-09")
    cli.add("new", "module")
    lines = len(path.read_bytes().splitlines()) - 2

    gone, calls = reload_by_parts(daemon, part_bytes)
    assert gone == whole.reload_if_changed() == {"m-07", "m-09"}
    # a part per line, a few lines per part, or all at once; the last part's call adopts
    assert {1: calls == lines, 300: 1 < calls < lines, 1 << 20: calls == 1}[part_bytes]
    assert [daemon.get(i) for i in [*ids, "new"]] == [whole.get(i) for i in [*ids, "new"]]
    assert daemon.reload_part(part_bytes) == set()  # one stat when nothing changed


def test_lookups_during_a_reload_by_parts_see_the_version_before(path):
    cli = Registry(path)
    cli.add("a", "module")
    daemon = Registry(path)
    assert daemon.get("a") is not None
    cli.add_many([{"ident": f"m-{n}", "kind": "module"} for n in range(20)])
    cli.revoke("a")
    assert daemon.reload_part(1) is None
    assert daemon.get("m-3") is None and not daemon.get("a").revoked
    assert reload_by_parts(daemon, 1)[0] == {"a"}
    assert daemon.get("m-3") is not None and daemon.get("a").revoked


def test_a_write_through_the_instance_cancels_a_reload_under_way(path):
    cli = Registry(path)
    cli.add_many([{"ident": f"m-{n}", "kind": "module"} for n in range(10)])
    daemon = Registry(path)
    daemon.load()
    cli.add("late", "module")
    assert daemon.reload_part(1) is None
    daemon.add("own", "module")  # it reads the file itself, "late" included
    assert daemon.reload_part(1) == set()  # nothing under way, nothing changed
    assert daemon.get("late") is not None and daemon.get("own") is not None


def test_a_reload_by_parts_of_a_bad_or_hand_laid_out_file(path):
    cli = Registry(path)
    cli.add_many([{"ident": f"m-{n}", "kind": "module"} for n in range(10)])
    daemon = Registry(path)
    assert daemon.get("m-1") is not None
    good = path.read_text()

    path.write_text(good[:-5])  # cut short: not valid JSON, found after the parts
    with pytest.raises(RegistryError, match="not valid JSON"):
        reload_by_parts(daemon, 1)
    assert daemon.reload_part(1) == set()  # said once, not at every poll
    assert daemon.get("m-1") is not None  # the last good copy

    doc = json.loads(good)
    doc["identities"]["m-1"]["revoked"] = True
    path.write_text(json.dumps(doc))  # one line: the whole parser takes it
    assert reload_by_parts(daemon, 1) == ({"m-1"}, 1)

    cli.add('zz"quote', "module")  # an escaped id, in the last part: the whole parser
    gone, calls = reload_by_parts(daemon, 1)
    assert gone == set() and calls == 11 and daemon.get('zz"quote') is not None


def test_the_loop_takes_a_large_change_in_by_parts_or_whole(server):
    """The server's side: a part per loop iteration while `reloading`; `whole` (a HELLO
    from an identity not in yet, the console's refresh) takes in the rest at once."""
    Registry(server.registry.path).add_many(
        [{"ident": f"mod-{n:05d}", "kind": "module"} for n in range(3000)]
    )
    server._reload_registry()
    assert server.reloading and server.registry.get("mod-02999") is None
    server._reload_registry()
    assert server.reloading  # 3000 entries are several parts
    server._reload_registry(whole=True)
    assert not server.reloading and server.registry.get("mod-02999") is not None
