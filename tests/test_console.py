"""The serial diagnostics console: the sans-IO shell with byte strings, then the real daemon
driven through a real pty pair.

The shell gets real collaborators: a Registry in tmp_path, plain functions for the
callables, and a settable clock. The end-to-end tests run the daemon appliance.app.build
makes (RUNNER: with a fixed fingerprint, the board's being unknown here), its console on
the slave side of a pty; the test types on the master side, as a terminal on a serial
line would.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import select
import sys
import time
import tty
from pathlib import Path

import pytest
from conftest import Daemon, wait_for

from appliance import __version__, app
from appliance.auth.registry import Registry
from appliance.client import Client, ClientError
from appliance.config import load as load_config
from appliance.console import shell as shell_mod
from appliance.console.serial_port import install
from appliance.console.shell import ConsoleContext, Shell, context_for

FP = "sha256:" + "ab" * 32
PROMPT = b"module-ingest> "
TOKEN_PROMPT = b"token: "
WAIT = 5.0  # bound on any single wait for the daemon


class Clock:
    """A clock the test sets: the shell's idea of now."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def registry(tmp_path) -> Registry:
    reg = Registry(tmp_path / "identities.json")
    reg.load()
    return reg


@pytest.fixture
def tokens(registry) -> dict[str, str]:
    return {
        "alice": registry.add("alice", "user", admin=True),
        "bob": registry.add("bob", "user"),
        "carol": registry.add("carol", "user"),
        "m-1/core-1": registry.add("m-1/core-1", "core", module="m-1", channels=[1, 2, 3, 7]),
    }


class Fixture:
    """A shell over a hand-built context; records what the context was asked to do."""

    def __init__(self, registry: Registry, **overrides) -> None:
        self.clock = Clock()
        self.kicked: list[str] = []
        self.refreshed = 0
        self.connected = {"m-1/core-1": ("127.0.0.1:40000", "blake2s")}

        def kick(ident: str) -> bool:
            self.kicked.append(ident)
            return self.connected.pop(ident, None) is not None

        def refresh() -> None:
            self.refreshed += 1

        def log_lines(n: int) -> list[str]:
            return [f"log line {i}" for i in range(1, 501)][-n:]

        values = dict(
            registry=registry,
            refresh_identities=refresh,
            status=lambda: [("uptime", "00:01:02"), ("connections", 2), ("commit error", "none")],
            queue=lambda: [("frames", 12), ("bytes on disk", 4096), ("segments", 1)],
            clients=lambda: [
                *((i, a, m) for i, (a, m) in self.connected.items()),
                (None, "127.0.0.1:40001", None),
            ],
            kick=kick,
            stats=lambda: "frames 12\nbytes_in 3456",
            log_lines=log_lines,
            fingerprint=lambda: FP,
        )
        values.update(overrides)
        self.shell = Shell(ConsoleContext(**values), idle_logout=60.0, clock=self.clock)

    def feed(self, data: bytes) -> str:
        return self.shell.feed(data).decode()

    def login(self, token: str) -> str:
        out = self.feed(token.encode() + b"\r")
        assert self.shell.state == shell_mod.READY, out
        return out

    def run(self, line: str) -> list[str]:
        """Run one command line; returns the output lines between the echo and the prompt."""
        out = self.feed(line.encode() + b"\r")
        assert out.startswith(line + "\r\n"), out
        assert out.endswith(PROMPT.decode()) or out.endswith(TOKEN_PROMPT.decode()), out
        body = out[len(line) + 2 :].rpartition("\r\n")[0]
        return body.split("\r\n") if body else []


@pytest.fixture
def fx(registry, tokens) -> Fixture:
    return Fixture(registry)


# -- login -------------------------------------------------------------------------


def test_greeting_shows_the_token_prompt(fx):
    assert fx.shell.greeting().endswith(b"\r\ntoken: ")
    assert fx.shell.state == shell_mod.LOGIN


def test_login_with_a_user_token_does_not_echo_it(fx, tokens):
    out = fx.login(tokens["alice"])
    assert tokens["alice"] not in out
    assert out == "\r\nlogged in as alice (admin); type help for the commands\r\nmodule-ingest> "
    assert fx.shell.user == "alice"


def test_login_as_a_user_without_admin(fx, tokens):
    assert "logged in as bob;" in fx.login(tokens["bob"])


@pytest.mark.parametrize(
    "token",
    [
        "nope",
        "",
        "A" * 43,  # well-formed, nobody's
        "A" * 44,
        "!" * 43,
        "x" * 256,
    ],
)
def test_login_with_a_bad_token_fails_with_one_line(fx, token):
    out = fx.feed(token.encode() + b"\r")
    assert fx.shell.state == shell_mod.LOGIN
    if token:
        assert out == "\r\nlogin failed\r\ntoken: "
    else:
        assert out == "\r\ntoken: "  # an empty line is not an attempt


def test_a_core_token_or_a_revoked_user_cannot_log_in(fx, registry, tokens):
    assert "login failed" in fx.feed(tokens["m-1/core-1"].encode() + b"\r")
    registry.revoke("carol")
    assert "login failed" in fx.feed(tokens["carol"].encode() + b"\r")
    assert fx.shell.state == shell_mod.LOGIN


def test_three_failures_lock_login_by_the_clock(fx, tokens):
    for _ in range(2):
        assert "login failed\r\n" in fx.feed(b"wrong\r")
    assert "login failed; locked for 5 s" in fx.feed(b"wrong\r")
    # locked: even the right token is not checked
    out = fx.feed(tokens["alice"].encode() + b"\r")
    assert "login locked: try again in 5 s" in out
    assert fx.shell.state == shell_mod.LOGIN
    fx.clock.now += 4.2
    assert "try again in 1 s" in fx.feed(tokens["alice"].encode() + b"\r")
    fx.clock.now += 1.0
    # open again, but one more failure locks it again at once
    assert "locked for 5 s" in fx.feed(b"wrong\r")
    fx.clock.now += 5.0
    fx.login(tokens["alice"])
    assert fx.shell.failures == 0


def test_login_editing_works_without_echo(fx, tokens):
    token = tokens["alice"].encode()
    out = fx.feed(token[:10] + b"XY\x08\x7f" + token[10:] + b"\r")
    assert fx.shell.state == shell_mod.READY
    assert "\b" not in out
    fx.run("logout")
    fx.feed(b"garbage\x15" + token + b"\r")  # Ctrl-U
    assert fx.shell.state == shell_mod.READY


# -- line editing ----------------------------------------------------------------


def test_backspace_and_delete_erase(fx, tokens):
    fx.login(tokens["bob"])
    out = fx.feed(b"versxy\x08\x7fion\r")
    assert out.startswith("versxy\b \b\b \bion\r\n")
    assert f"module-ingest {__version__}\r\n" in out
    # backspace on an empty line does nothing
    assert fx.feed(b"\x7f\x08") == ""


def test_ctrl_u_kills_and_ctrl_c_cancels_the_line(fx, registry, tokens):
    fx.login(tokens["alice"])
    out = fx.feed(b"abc\x15")
    assert out == "abc" + "\b \b" * 3
    assert fx.run("version") == [f"module-ingest {__version__}"]
    out = fx.feed(b"revoke bob\x03")
    assert out == "revoke bob^C\r\nmodule-ingest> "
    assert fx.feed(b"\r") == "\r\nmodule-ingest> "  # the cancelled line is gone
    assert not registry.get("bob").revoked


@pytest.mark.parametrize("end", [b"\r", b"\n", b"\r\n"])
def test_cr_lf_and_crlf_end_one_line(fx, tokens, end):
    fx.login(tokens["bob"])
    out = fx.feed(b"version" + end + b"version" + end)
    assert out.count("module-ingest 0.1.0") == 2
    assert out.count("module-ingest> ") == 2  # CRLF is not two line ends


def test_a_long_line_stops_growing_with_one_bell(fx, tokens):
    fx.login(tokens["bob"])
    out = fx.feed(b"a" * 300)
    assert out == "a" * shell_mod.MAX_LINE + "\a"
    out = fx.feed(b"\x7fb" + b"c" * 10)  # room for one more, then the bell again
    assert out == "\b \bb\a"
    lines = fx.feed(b"\r").split("\r\n")
    assert lines[1].startswith("unknown command: aaa")
    assert lines[2:] == ["module-ingest> "]


def test_a_long_unknown_command_is_cut_in_its_one_line(fx, tokens):
    fx.login(tokens["bob"])
    out = fx.feed(b"z" * 300 + b"\r")
    lines = out.split("\r\n")
    assert lines[1].startswith("unknown command: zzz") and lines[1].endswith("... (try help)")
    assert len(lines[1]) < 80
    assert lines[2] == "module-ingest> "


def test_escape_sequences_and_other_controls_are_dropped(fx, tokens):
    fx.login(tokens["bob"])
    out = fx.feed(b"\x1b[A\x1b[1;5Dver\x00\x01\tsi\x1bOBon\xff\xc3\xa9\r")
    assert out.startswith("version\r\n")
    assert f"module-ingest {__version__}" in out


def test_an_empty_line_just_prompts_again(fx, tokens):
    fx.login(tokens["bob"])
    assert fx.feed(b"   \r") == "   \r\nmodule-ingest> "


# -- commands --------------------------------------------------------------------


def test_help_lists_every_command(fx, tokens):
    fx.login(tokens["bob"])
    text = "\n".join(fx.run("help"))
    for name in (
        "help",
        "status",
        "stats",
        "clients",
        "kick ID",
        "identities",
        "revoke ID",
        "log [N]",
        "queue",
        "subscribers",
        "fingerprint",
        "version",
        "logout",
        "exit",
    ):
        assert name in text


def test_status_queue_stats_fingerprint_version_subscribers(fx, tokens):
    fx.login(tokens["bob"])
    assert fx.run("status") == ["uptime:       00:01:02", "connections:  2", "commit error: none"]
    assert fx.run("queue") == ["frames:        12", "bytes on disk: 4096", "segments:      1"]
    assert fx.run("stats") == ["frames 12", "bytes_in 3456"]
    assert fx.run("fingerprint") == [FP]
    assert fx.run("version") == [f"module-ingest {__version__}"]
    assert fx.run("subscribers") == ["none configured"]
    assert fx.run("status now") == ["usage: status (no arguments)"]


def test_clients_and_kick(fx, tokens):
    fx.login(tokens["bob"])
    assert fx.run("clients") == [
        "ID           ADDRESS          MAC",
        "(handshake)  127.0.0.1:40001  -",
        "m-1/core-1   127.0.0.1:40000  blake2s",
    ]
    # like revoke, kick is for admins: a user who may read must not cut cores off
    assert fx.run("kick m-1/core-1") == ["kick: only an admin user may kick"]
    assert fx.kicked == []
    fx.run("logout")
    fx.login(tokens["alice"])
    assert fx.run("kick m-1/core-1") == ["kicked m-1/core-1"]
    assert fx.run("kick m-1/core-1") == ["kick: no connection for m-1/core-1"]
    assert fx.kicked == ["m-1/core-1", "m-1/core-1"]
    assert fx.run("kick") == ["usage: kick ID"]
    assert fx.run("kick a b") == ["usage: kick ID"]


def test_identities_never_shows_secrets(fx, registry, tokens):
    fx.login(tokens["bob"])
    registry.revoke("carol")
    lines = fx.run("identities")
    assert lines == [
        "ID          KIND  MODULE  CHANNELS  FLAGS",
        "alice       user  -       -         admin",
        "bob         user  -       -         -",
        "carol       user  -       -         revoked",
        "m-1/core-1  core  m-1     1-3,7     -",
    ]
    text = "\n".join(lines)
    for token in tokens.values():
        assert token not in text


def test_revoke_needs_an_admin(fx, registry, tokens):
    fx.login(tokens["bob"])
    assert fx.run("revoke m-1/core-1") == ["revoke: only an admin user may revoke"]
    assert not registry.get("m-1/core-1").revoked
    assert fx.refreshed == 1  # only the login's
    fx.run("exit")
    fx.login(tokens["alice"])
    assert fx.run("revoke m-1/core-1") == ["revoked m-1/core-1"]
    assert registry.get("m-1/core-1").revoked
    assert fx.refreshed == 3  # the login's and the revoke's: it closes the connection now
    assert fx.run("revoke m-1/core-1") == ["m-1/core-1 is already revoked"]
    assert fx.run("revoke nobody") == ["revoke: unknown identity nobody"]
    assert fx.run("revoke") == ["usage: revoke ID"]


def test_a_revoked_user_is_logged_out(fx, registry, tokens):
    fx.login(tokens["alice"])
    assert fx.run("revoke bob") == ["revoked bob"]
    fx.run("logout")
    assert "login failed" in fx.feed(tokens["bob"].encode() + b"\r")
    fx.login(tokens["carol"])
    registry.revoke("carol")  # by someone else, meanwhile
    out = fx.feed(b"status\r")
    assert out == "status\r\nsession ended: your identity is revoked\r\ntoken: "
    assert fx.shell.state == shell_mod.LOGIN


def test_revoking_yourself_logs_you_out(fx, tokens):
    fx.login(tokens["alice"])
    assert fx.run("revoke alice") == ["revoked alice; that was you: logged out"]
    assert fx.shell.state == shell_mod.LOGIN


def test_log_default_count_and_bounds(fx, tokens):
    fx.login(tokens["bob"])
    lines = fx.run("log")
    assert lines == [f"log line {i}" for i in range(481, 501)]
    assert fx.run("log 3") == ["log line 498", "log line 499", "log line 500"]
    assert len(fx.run("log 100000")) == shell_mod.LOG_MAX
    for bad in ("log 0", "log -1", "log x", "log 1 2", "log 99999999999999"):
        assert fx.run(bad) == [f"usage: log [N] (N from 1 to {shell_mod.LOG_MAX})"], bad


def test_logout_and_exit(fx, tokens):
    fx.login(tokens["bob"])
    assert fx.feed(b"logout\r") == "logout\r\nbye\r\ntoken: "
    assert fx.shell.state == shell_mod.LOGIN
    fx.login(tokens["bob"])
    assert fx.feed(b"exit\r") == "exit\r\nbye\r\ntoken: "


def test_unknown_command_is_one_line(fx, tokens):
    fx.login(tokens["bob"])
    assert fx.run("reboot now") == ["unknown command: reboot (try help)"]


def test_missing_callables_say_not_available(registry, tokens):
    fx = Fixture(registry, stats=None, log_lines=None, fingerprint=None)
    fx.login(tokens["bob"])
    assert fx.run("stats") == ["stats: not available"]
    assert fx.run("log") == ["log: not available"]
    assert fx.run("fingerprint") == ["fingerprint: not available"]


def test_a_failing_command_is_one_line_never_a_traceback(registry, tokens):
    def broken(*args):
        raise RuntimeError("the sensor bus\nis on fire")

    fx = Fixture(
        registry, stats=broken, log_lines=broken, fingerprint=broken, status=broken, kick=broken
    )
    fx.login(tokens["alice"])
    assert fx.run("stats") == ["stats: failed: the sensor bus is on fire"]
    assert fx.run("log 5") == ["log: failed: the sensor bus is on fire"]
    assert fx.run("fingerprint") == ["fingerprint: failed: the sensor bus is on fire"]
    assert fx.run("status") == ["status: failed: the sensor bus is on fire"]
    assert fx.run("kick x") == ["kick: failed: the sensor bus is on fire"]
    assert fx.run("version") == [f"module-ingest {__version__}"]  # and the shell goes on


def test_control_characters_in_output_are_neutralised(registry, tokens):
    fx = Fixture(registry, log_lines=lambda n: ["evil \x1b[2J\x07 line", "x" * 1000])
    fx.login(tokens["bob"])
    lines = fx.run("log")
    assert lines[0] == "evil ?[2J? line"
    assert len(lines[1]) == shell_mod.OUT_LINE_MAX


# -- idle logout -----------------------------------------------------------------


def test_idle_logout_by_tick(fx, tokens):
    fx.login(tokens["bob"])
    assert fx.shell.tick(fx.clock.now + 59.0) == b""
    fx.clock.now += 30.0
    fx.feed(b"v")  # activity resets the idle timer
    assert fx.shell.tick(fx.clock.now + 59.0) == b""
    assert fx.shell.tick(fx.clock.now + 60.0) == b"\r\nidle logout\r\ntoken: "
    assert fx.shell.state == shell_mod.LOGIN
    assert fx.shell.tick(fx.clock.now + 1000.0) == b""


def test_idle_forgets_a_half_typed_token(fx, tokens):
    token = tokens["bob"].encode()
    fx.feed(token[:20])
    assert fx.shell.tick(fx.clock.now + 61.0) == b""
    fx.clock.now += 61.0
    fx.feed(token[20:] + b"\r")
    assert fx.shell.state == shell_mod.LOGIN


# -- garbage -----------------------------------------------------------------------


@pytest.mark.parametrize("logged_in", [False, True])
def test_random_binary_garbage_never_raises_and_output_stays_bounded(fx, tokens, logged_in):
    if logged_in:
        fx.login(tokens["bob"])
    rng = random.Random(20240611)
    fed = produced = 0
    for _ in range(2000):
        chunk = rng.randbytes(rng.choice((1, 1, 2, 7, 64, 300)))
        out = fx.shell.feed(chunk)
        fed += len(chunk)
        produced += len(out)
        # no more than a few bytes per input byte, plus one command's output per line
        assert len(out) <= 3 * len(chunk) + (chunk.count(b"\r") + chunk.count(b"\n") + 1) * 2048
        assert fx.shell.state in (shell_mod.LOGIN, shell_mod.READY)
        assert len(fx.shell._line) <= shell_mod.MAX_LINE
        fx.clock.now += 0.01
        fx.shell.tick(fx.clock.now)
    assert produced <= 8 * fed
    # still answering: cancel whatever line the noise left, then a real command
    if logged_in:
        assert fx.shell.state == shell_mod.READY
        assert fx.feed(b"\x03version\r").endswith("module-ingest 0.1.0\r\nmodule-ingest> ")
    else:
        assert fx.shell.state == shell_mod.LOGIN
        fx.clock.now += shell_mod.LOCKOUT_SECONDS
        fx.feed(b"\x03")
        fx.login(tokens["bob"])


def test_printable_noise_runs_only_unknown_commands(fx, tokens):
    fx.login(tokens["bob"])
    rng = random.Random(7)
    alphabet = bytes(range(0x20, 0x7F)) + b"\r\n\x08\x7f\x15\x03"
    noise = bytes(rng.choice(alphabet) for _ in range(20000))
    out = fx.feed(noise)
    assert "Traceback" not in out
    assert fx.shell.state == shell_mod.READY
    assert fx.kicked == []


# -- the context of a real server ------------------------------------------------------


def test_context_for_a_real_server(tmp_path, tokens):
    config_path = tmp_path / "config.toml"
    config_path.write_text(
        "[storage]\nsegment_bytes = 1048576\nring_bytes = 1048576\nquota_bytes = 8388608\n"
        "[auth]\ndev_identity = false\n"
    )
    config = load_config(config_path, environ={"MODULE_INGEST_DATA_DIR": str(tmp_path)})
    daemon = app.assemble(config)  # its registry is the `tokens` one: tmp_path/identities.json
    store = daemon.store
    try:
        ctx = context_for(daemon.server, fingerprint=lambda: FP)
        status = dict(ctx.status())
        assert status["connections"] == "0 (0 authenticated)"
        assert status["frames"] == "0 received since start"
        assert status["pending bytes"] == 0
        assert status["commit error"] == "none"
        assert re.fullmatch(r"\d\d:\d\d:\d\d", status["uptime"])
        queue = dict(ctx.queue())
        assert queue["segments"] == f"1 in {tmp_path / 'wal'}"
        assert queue["frames"] == "0 (0 since start)"
        assert queue["bytes on disk"] == store.bytes_on_disk
        assert queue["quota bytes"] == 8388608
        assert ctx.clients() == []
        assert ctx.kick("alice") is False
        shell = Shell(ctx)
        shell.feed(tokens["alice"].encode() + b"\r")
        assert shell.state == shell_mod.READY
        assert b"no clients connected" in shell.feed(b"clients\r")
        assert b"revoked bob" in shell.feed(b"revoke bob\r")
        assert Registry(tmp_path / "identities.json").get("bob").revoked
    finally:
        daemon.close()


def test_install_without_a_port_is_off(tmp_path):
    config = load_config(environ={"MODULE_INGEST_DATA_DIR": str(tmp_path)})
    assert config.values["console"]["port"] == ""
    assert install(object(), config) is None


# -- end to end: the real daemon on a real pty ----------------------------------------

RUNNER = f"""
import sys

from appliance import app
from appliance.config import load

sys.exit(app.build(load(), fingerprint="{FP}").run())
"""


class Terminal:
    """The master side of the pty: what a terminal emulator on the serial line sees."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self.seen = bytearray()  # everything received
        self.pos = 0  # what `expect` has consumed

    def _pump(self, timeout: float, writing: bytes = b"") -> int:
        """Wait up to `timeout` to read (and write some of `writing`); returns bytes written."""
        wlist = [self.fd] if writing else []
        readable, writable, _ = select.select([self.fd], wlist, [], timeout)
        if readable:
            try:
                self.seen += os.read(self.fd, 65536)
            except BlockingIOError:
                pass
            except OSError as exc:  # EIO: no slave open any more
                seen = bytes(self.seen[-300:])
                raise AssertionError(f"console hung up ({exc}); seen: {seen!r}") from None
        if writable:
            try:
                return os.write(self.fd, writing)
            except BlockingIOError:
                return 0
        return 0

    def send(self, data: bytes, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        view = memoryview(data)
        while view:
            if time.monotonic() > deadline:
                raise AssertionError(f"could not write {len(view)} bytes to the console")
            view = view[self._pump(0.1, bytes(view[:4096])) :]

    def expect(self, needle: bytes, timeout: float = WAIT) -> bytes:
        """Wait for `needle` after what was consumed; return everything up to its end."""
        deadline = time.monotonic() + timeout
        while True:
            at = self.seen.find(needle, self.pos)
            if at >= 0:
                text = bytes(self.seen[self.pos : at + len(needle)])
                self.pos = at + len(needle)
                return text
            left = deadline - time.monotonic()
            if left <= 0:
                tail = bytes(self.seen[self.pos :][-500:])
                raise AssertionError(f"no {needle!r} within {timeout} s; last bytes: {tail!r}")
            self._pump(left)

    def close(self) -> None:
        """Hang up, as a terminal server or a USB host going away does."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def log_in(self, token: str) -> bytes:
        """Wait for the token prompt, type the token; what came back up to the prompt."""
        self.expect(TOKEN_PROMPT)
        self.send(token.encode() + b"\r")
        return self.expect(PROMPT)

    def run(self, line: str) -> str:
        """Type a command line; return its output (without echo and prompt)."""
        self.send(line.encode() + b"\r")
        text = self.expect(PROMPT).decode()
        echo = line + "\r\n"
        assert text.startswith(echo), text
        return text[len(echo) : -len(PROMPT)]


class ConsoleDaemon(Daemon):
    """The daemon with its console on `port`, run by RUNNER (a fixed fingerprint, so the
    console's answers can be checked to the letter)."""

    def __init__(self, tmp_path: Path, port: str, idle_logout: float = 300.0) -> None:
        config = (
            "[storage]\n"
            "segment_bytes = 1048576\n"
            "ring_bytes = 1048576\n"
            "[console]\n"
            f"port = {json.dumps(port)}\n"
            f"idle_logout = {idle_logout}\n"
        )
        super().__init__(tmp_path / "data", config)
        runner = tmp_path / "runner.py"
        runner.write_text(RUNNER)
        self.command = [sys.executable, str(runner)]

    def client(self, token: str | None = None) -> Client:
        return Client("127.0.0.1", self.port, "dev/core-0", token or self.dev_token, timeout=WAIT)


@pytest.fixture
def pty_pair():
    """A pty: the daemon opens the slave (the "serial port"), the test drives the master.

    The line discipline sits on the slave side, so that side must be raw: otherwise the
    kernel would echo, wait for newlines, turn CR into LF and eat Ctrl-C and Ctrl-U before
    the console sees them. pyserial sets raw mode when it opens the port; the test sets it
    too, so bytes typed before the console opened the port are not cooked either.
    """
    master, slave = os.openpty()
    tty.setraw(slave)
    term = Terminal(master)
    try:
        yield term, os.ttyname(slave)
    finally:
        term.close()
        os.close(slave)


@pytest.fixture
def console_factory(tmp_path):
    made: list[ConsoleDaemon] = []

    def make(port: str, **kwargs) -> ConsoleDaemon:
        daemon = ConsoleDaemon(tmp_path, port, **kwargs)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.kill()


def test_console_over_a_pty_against_the_real_daemon(console_factory, pty_pair):
    term, slave_name = pty_pair
    daemon = console_factory(slave_name)
    token = daemon.add_identity("alice", "--kind", "user", "--admin")
    daemon.start()
    term.expect(b"diagnostics console\r\n" + TOKEN_PROMPT)

    term.send(b"not-a-token\r")
    assert term.expect(TOKEN_PROMPT) == b"\r\nlogin failed\r\n" + TOKEN_PROMPT
    term.send(token.encode() + b"\r")
    text = term.expect(PROMPT)
    assert b"logged in as alice (admin)" in text
    assert token.encode() not in term.seen

    with daemon.client() as core:
        core.send(1, b"hello")
        core.flush()
        status = term.run("status")
        assert re.search(r"connections:\s+1 \(1 authenticated\)", status)
        assert re.search(r"frames:\s+1 received since start", status)
        assert re.search(r"commit error:\s+none", status)
        assert re.search(r"dev/core-0\s+127\.0\.0\.1:\d+\s+hmac-sha256", term.run("clients"))
        identities = term.run("identities")
        assert re.search(r"alice\s+user\s+-\s+-\s+admin", identities)
        assert re.search(r"dev/core-0\s+core\s+dev\s+1-8\s+-", identities)
        assert token not in identities and daemon.dev_token not in identities
        stats = term.run("stats")
        assert re.search(r"\r\nframes +1 stored, .*\r\nconnections +1 open, 1 authenticated", stats)
        assert re.search(r"segments:\s+1 in ", term.run("queue"))
        assert term.run("fingerprint") == FP + "\r\n"
        assert term.run("kick dev/core-0") == "kicked dev/core-0\r\n"
        assert term.run("kick dev/core-0") == "kick: no connection for dev/core-0\r\n"
        assert term.run("clients") == "no clients connected\r\n"
    assert "console: alice logged in" in term.run("log 50")

    assert term.run("revoke dev/core-0") == "revoked dev/core-0\r\n"
    with pytest.raises(ClientError):
        daemon.client().connect()
    assert "console: alice revoked dev/core-0" in term.run("log")

    term.send(b"logout\r")
    assert term.expect(TOKEN_PROMPT) == b"logout\r\nbye\r\n" + TOKEN_PROMPT
    assert daemon.stop() == 0


def test_garbage_on_the_line_harms_neither_console_nor_daemon(console_factory, pty_pair):
    term, slave_name = pty_pair
    daemon = console_factory(slave_name)
    token = daemon.add_identity("alice", "--kind", "user")
    daemon.start()
    term.log_in(token)

    rng = random.Random(4242)
    term.send(rng.randbytes(10 * 1024))
    # cancel what the noise left on the line, then ask: the answer is unmistakable
    term.send(b"\x03version\r")
    term.expect(f"module-ingest {__version__}\r\n".encode() + PROMPT)

    with daemon.client() as core:
        for i in range(200):
            core.send(1 + i % 8, b"frame %d" % i)
        core.flush()
        assert core.acked == 200
    assert "200 received since start" in term.run("status")
    assert daemon.alive()
    assert "Traceback" not in daemon.log()
    assert daemon.stop() == 0


def test_idle_logout_over_the_pty(console_factory, pty_pair):
    term, slave_name = pty_pair
    daemon = console_factory(slave_name, idle_logout=1.0)
    token = daemon.add_identity("bob", "--kind", "user")
    daemon.start()
    term.log_in(token)
    started = time.monotonic()
    term.expect(b"\r\nidle logout\r\n" + TOKEN_PROMPT, timeout=30.0)
    assert time.monotonic() - started >= 0.7  # not before the idle time (less a sweep)
    term.send(b"status\r")  # not logged in: this is a (failed) login, not a command
    assert term.expect(TOKEN_PROMPT) == b"\r\nlogin failed\r\n" + TOKEN_PROMPT
    assert daemon.stop() == 0


def test_a_port_that_appears_later_is_opened_by_the_retry(console_factory, pty_pair, tmp_path):
    term, slave_name = pty_pair
    gadget = tmp_path / "ttyGS0"  # like a USB gadget port before the host enumerates it
    daemon = console_factory(str(gadget))
    daemon.start()
    with daemon.client() as core:  # the daemon serves without its console
        core.send(1, b"x")
        core.flush()
    log = daemon.log()
    assert log.count(f"console: cannot open {gadget}") == 1, log
    gadget.symlink_to(slave_name)
    term.expect(TOKEN_PROMPT, timeout=8.0)
    assert daemon.log().count("console: cannot open") == 1  # said once, not every retry
    assert daemon.stop() == 0


def test_a_hangup_closes_the_port_and_the_daemon_goes_on(console_factory, pty_pair):
    term, slave_name = pty_pair
    daemon = console_factory(slave_name)
    token = daemon.add_identity("alice", "--kind", "user")
    daemon.start()
    term.log_in(token)
    term.close()
    wait_for(
        lambda: "alice logged out (line dropped)" in daemon.log(),
        timeout=WAIT,
        what="the hangup noticed",
    )
    assert re.search(r"console: /dev/pts/\d+: hung up; reopening in 3 s", daemon.log())
    with daemon.client() as core:
        core.send(1, b"still here")
        core.flush()
        assert core.acked == 1
    assert daemon.stop() == 0


def test_a_terminal_that_does_not_read_costs_bounded_output(console_factory, pty_pair):
    term, slave_name = pty_pair
    daemon = console_factory(slave_name)
    token = daemon.add_identity("alice", "--kind", "user")
    daemon.start()
    term.log_in(token)
    help_bytes = len(term.run("help"))
    # type 1000 commands without reading a byte of what comes back
    typed = b"help\r" * 1000
    deadline = time.monotonic() + WAIT
    while typed:
        assert time.monotonic() < deadline, "the console stopped reading its input"
        _, writable, _ = select.select([], [term.fd], [], 0.1)
        if writable:
            typed = typed[os.write(term.fd, typed[:512]) :]
    # the oldest output that did not fit was dropped; the newest is there
    start = term.pos
    term.send(b"version\r")
    term.expect(f"module-ingest {__version__}\r\n".encode() + PROMPT, timeout=10.0)
    received = term.pos - start
    assert received < 1000 * help_bytes // 2  # the port's buffer, OUT_MAX and little more
    dropped = re.findall(rb"\[console: (\d+) bytes of output dropped\]", term.seen)
    assert dropped and all(int(n) > 0 for n in dropped)
    assert "Traceback" not in daemon.log()
    assert daemon.stop() == 0


def test_the_console_port_refuses_a_second_open(console_factory, pty_pair):
    """TIOCEXCL: another local user cannot open the tty to read the tokens typed on it."""
    term, slave_name = pty_pair
    os.chmod(slave_name, 0o666)  # the tty lets anyone open it: only TIOCEXCL can refuse

    def second_open() -> int:
        """0 if another user could open the port, else the errno (root passes TIOCEXCL,
        so as root the attempt is made by nobody, in a forked child)."""
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                os.close(os.open(slave_name, os.O_RDWR | os.O_NOCTTY))
            except OSError as e:
                code = e.errno or 1
            finally:
                os._exit(code)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    assert second_open() == 0  # before the console opened it: anyone may
    daemon = console_factory(slave_name)
    daemon.start()
    term.expect(TOKEN_PROMPT)
    assert second_open() == errno.EBUSY
    assert daemon.stop() == 0
    assert second_open() == 0  # the daemon let go of it
