"""The diagnostics shell as a sans-IO state machine: bytes in, bytes to write back out.

    shell = Shell(context_for(server, stats=..., log_lines=..., fingerprint=...))
    port.write(shell.greeting())
    port.write(shell.feed(port.read()))     # echo, prompts, command output
    port.write(shell.tick(time.monotonic()))  # idle logout

Two states. LOGIN shows "token: " and does not echo what is typed; a token whose
secret belongs to a user identity that is not revoked logs in. The secret is
compared with every user identity's (hmac.compare_digest, no early exit), so the
time taken says nothing about which one matched. Three failures in a row lock
login for a few seconds, measured with the injected clock; every further failure
locks it again. READY shows "module-ingest> " and runs one command per line.

Line editing is what a serial terminal sends: backspace (0x08 or 0x7f) erases,
Ctrl-U kills the line, Ctrl-C cancels it, CR, LF or CRLF ends it. Escape sequences
(arrow keys) and every other non-printable byte are dropped, and a line stops
growing at MAX_LINE characters (a bell says so). Line noise cannot do more than
produce "unknown command" lines: every command's failure is one line of output.

The shell reaches the daemon only through a `ConsoleContext` of plain callables,
so it runs in tests without sockets; `context_for(server, ...)` builds the real one.
"""

from __future__ import annotations

import hmac
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from appliance import __version__
from appliance.auth.identity import Identity, format_channels
from appliance.auth.registry import Registry
from appliance.protocol import crypto
from appliance.store.segment import list_segments
from appliance.telemetry.figures import duration

if TYPE_CHECKING:
    from appliance.net.server import Server

log = logging.getLogger("appliance.console")

LOGIN = "login"
READY = "ready"
PROMPT_LOGIN = b"token: "
PROMPT_READY = b"module-ingest> "
BANNER = b"\r\nmodule-ingest diagnostics console\r\n"
CRLF = b"\r\n"
BELL = b"\x07"
ERASE = b"\b \b"

MAX_LINE = 256  # characters of input per line; more is dropped with a bell
MAX_FAILURES = 3  # failed logins in a row before the lockout
LOCKOUT_SECONDS = 5.0
LOG_DEFAULT = 20
LOG_MAX = 200
LIST_MAX = 100  # rows of clients or identities shown; the rest is counted
OUT_LINE_MAX = 300  # characters of one output line
ARG_SHOWN = 40  # characters of a bad command name or argument echoed in an error
MAX_ESCAPE = 16  # bytes of one escape sequence before it counts as garbage

# one line of input per byte: 0x20-0x7e printable; the rest are controls
BACKSPACES = (0x08, 0x7F)
CTRL_C = 0x03
CTRL_U = 0x15
ESC = 0x1B
CR = 0x0D
LF = 0x0A


@dataclass
class ConsoleContext:
    """What the shell may see and do in the daemon; each a plain callable or object.

    `registry` needs list(), get(id) and revoke(id) (appliance.auth.registry.Registry).
    `status` and `queue` return (label, value) pairs; `clients` returns
    (identity or None, address, MAC algorithm or None) per connection. The optional
    ones (None) make their command answer "not available".
    """

    registry: Registry
    refresh_identities: Callable[[], None] = lambda: None
    status: Callable[[], list[tuple[str, object]]] = list
    queue: Callable[[], list[tuple[str, object]]] = list
    clients: Callable[[], list[tuple[str | None, str, str | None]]] = list
    kick: Callable[[str], bool] = lambda ident: False
    stats: Callable[[], str] | None = None
    log_lines: Callable[[int], list[str]] | None = None
    fingerprint: Callable[[], str] | None = None
    subscribers: Callable[[], list[str]] | None = None
    version: str = __version__


class Shell:
    def __init__(
        self,
        context: ConsoleContext,
        *,
        idle_logout: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.context = context
        self.idle_logout = idle_logout
        self.clock = clock
        self.state = LOGIN
        self.user: str | None = None
        self.failures = 0  # failed logins in a row
        self.locked_until = 0.0
        self.last_activity = clock()
        self._line = bytearray()
        self._after_cr = False  # an LF right after a CR ends no second line
        self._escape = 0  # bytes of the escape sequence being dropped (0: none)
        self._rang = False  # the bell for this line's overflow has rung
        self._fingerprint: str | None = None
        self._commands: dict[str, Callable[[list[str]], list[str]]] = {
            "help": self._help,
            "status": self._status,
            "stats": self._stats,
            "clients": self._clients,
            "kick": self._kick,
            "identities": self._identities,
            "revoke": self._revoke,
            "log": self._log,
            "queue": self._queue,
            "subscribers": self._subscribers,
            "fingerprint": self._fingerprint_cmd,
            "version": self._version,
            "logout": self._logout_cmd,
            "exit": self._logout_cmd,
        }

    # -- bytes in, bytes out ----------------------------------------------------

    def greeting(self) -> bytes:
        """What to write when the port opens: a banner and the current prompt."""
        return BANNER + self._prompt()

    def feed(self, data: bytes) -> bytes:
        """Take received bytes; return the bytes to write back."""
        out = bytearray()
        now = self.clock()
        for byte in data:
            if self._byte(byte, now, out):
                self.last_activity = now
        return bytes(out)

    def tick(self, now: float) -> bytes:
        """Call now and then: logs an idle session out (and forgets a half-typed token)."""
        if now - self.last_activity < self.idle_logout:
            return b""
        if self.state == READY:
            log.info("console: %s logged out (idle)", self.user)
            self._to_login()
            self.last_activity = now
            return CRLF + b"idle logout" + CRLF + PROMPT_LOGIN
        self._line.clear()
        return b""

    def hangup(self) -> None:
        """The line dropped (port closed or lost): end the session; a lockout stays."""
        if self.state == READY:
            log.info("console: %s logged out (line dropped)", self.user)
        self._to_login()
        self._escape = 0
        self._after_cr = False

    # -- line editing -----------------------------------------------------------

    def _byte(self, byte: int, now: float, out: bytearray) -> bool:
        """Handle one byte; False if it was dropped."""
        if self._escape and self._in_escape(byte):
            return False
        after_cr, self._after_cr = self._after_cr, byte == CR
        if 0x20 <= byte <= 0x7E:
            if len(self._line) >= MAX_LINE:
                if not self._rang:
                    self._rang = True
                    out += BELL
                return False
            self._line.append(byte)
            if self.state == READY:
                out.append(byte)
        elif byte == CR or (byte == LF and not after_cr):
            self._end_line(now, out)
        elif byte in BACKSPACES:
            if self._line:
                self._line.pop()
                self._rang = False
                if self.state == READY:
                    out += ERASE
        elif byte == CTRL_U:
            if self.state == READY:
                out += ERASE * len(self._line)
            self._line.clear()
            self._rang = False
        elif byte == CTRL_C:
            self._line.clear()
            self._rang = False
            out += b"^C" + CRLF + self._prompt()
        elif byte == ESC:
            self._escape = 1
            return False
        else:
            return False
        return True

    def _in_escape(self, byte: int) -> bool:
        """Whether `byte` belongs to the escape sequence being dropped (ESC [ ... final)."""
        if self._escape == 1:
            if byte in b"[O":
                self._escape = 2
                return True
        elif 0x20 <= byte <= 0x7E and self._escape < MAX_ESCAPE:
            # parameters and intermediates (0x20-0x3f) continue it; 0x40-0x7e ends it
            self._escape = self._escape + 1 if byte <= 0x3F else 0
            return True
        self._escape = 0
        return False

    def _end_line(self, now: float, out: bytearray) -> None:
        text = self._line.decode("ascii")
        self._line.clear()
        self._rang = False
        out += CRLF
        if self.state == LOGIN:
            out += self._login(text, now)
        else:
            out += self._run(text)
        out += self._prompt()

    def _prompt(self) -> bytes:
        return PROMPT_READY if self.state == READY else PROMPT_LOGIN

    def _to_login(self) -> None:
        self.state = LOGIN
        self.user = None
        self._line.clear()

    # -- login ------------------------------------------------------------------

    def _login(self, token: str, now: float) -> bytes:
        if now < self.locked_until:
            wait = math.ceil(self.locked_until - now)
            return _lines([f"login locked: try again in {wait} s"])
        if not token.strip():
            return b""
        try:
            identity = self._check_token(token.strip())
        except Exception as exc:
            log.warning("console: login: %s", _one_line(exc))
            return _lines([f"login: identities unavailable: {_one_line(exc)}"])
        if identity is None:
            self.failures += 1
            log.warning("console: login failed (%d in a row)", self.failures)
            if self.failures >= MAX_FAILURES:
                self.locked_until = now + LOCKOUT_SECONDS
                return _lines([f"login failed; locked for {LOCKOUT_SECONDS:g} s"])
            return _lines(["login failed"])
        self.failures = 0
        self.state = READY
        self.user = identity.id
        log.info("console: %s logged in", identity.id)
        role = " (admin)" if identity.admin else ""
        return _lines([f"logged in as {identity.id}{role}; type help for the commands"])

    def _check_token(self, token: str) -> Identity | None:
        """The active user identity whose secret the token carries, or None.

        Every user identity's secret is compared, whether or not one matched already,
        and a malformed token is compared too (against zeros), so the work is the same.
        """
        try:
            secret = crypto.token_to_secret(token)
            valid = True
        except ValueError:
            secret = bytes(crypto.SECRET_SIZE)
            valid = False
        self.context.refresh_identities()
        found = None
        for identity in self.context.registry.list():
            if identity.kind != "user":
                continue
            match = hmac.compare_digest(secret, identity.secret)
            if match and valid and not identity.revoked and found is None:
                found = identity
        return found

    # -- commands -----------------------------------------------------------------

    def _run(self, text: str) -> bytes:
        words = text.split()
        if not words:
            return b""
        name, args = words[0], words[1:]
        try:
            identity = self.context.registry.get(self.user)
        except Exception as exc:
            return _lines([f"{_cut(name)}: identities unavailable: {_one_line(exc)}"])
        if identity is None or identity.revoked:
            log.info("console: %s logged out (identity revoked)", self.user)
            self._to_login()
            return _lines(["session ended: your identity is revoked"])
        command = self._commands.get(name)
        if command is None:
            return _lines([f"unknown command: {_cut(name)} (try help)"])
        try:
            return _lines(command(args))
        except UsageError as exc:
            return _lines([str(exc)])
        except Exception as exc:
            log.warning("console: %s failed", name, exc_info=True)
            return _lines([f"{name}: failed: {_one_line(exc)}"])

    def _help(self, args: list[str]) -> list[str]:
        return [
            "help             this list",
            "status           uptime, connections, frames, pending bytes, commit error",
            "stats            the daemon's metrics",
            "clients          connections: identity, address, MAC algorithm",
            "kick ID          close the connection of identity ID (admins only)",
            "identities       identities (never their secrets)",
            "revoke ID        revoke identity ID and close its connection (admins only)",
            f"log [N]          the last N log lines (default {LOG_DEFAULT}, at most {LOG_MAX})",
            "queue            the store: frames, bytes on disk, pending bytes, segments",
            "subscribers      subscribers and their positions",
            "fingerprint      this board's hardware fingerprint",
            "version          the daemon's version",
            "logout, exit     end the session",
        ]

    def _status(self, args: list[str]) -> list[str]:
        _no_args("status", args)
        return _pairs(self.context.status())

    def _queue(self, args: list[str]) -> list[str]:
        _no_args("queue", args)
        return _pairs(self.context.queue())

    def _stats(self, args: list[str]) -> list[str]:
        _no_args("stats", args)
        if self.context.stats is None:
            return ["stats: not available"]
        return self.context.stats().splitlines() or ["(no metrics)"]

    def _clients(self, args: list[str]) -> list[str]:
        _no_args("clients", args)
        rows = [
            (ident if ident is not None else "(handshake)", addr, mac or "-")
            for ident, addr, mac in self.context.clients()
        ]
        if not rows:
            return ["no clients connected"]
        rows.sort()
        return _table(("ID", "ADDRESS", "MAC"), rows)

    def _kick(self, args: list[str]) -> list[str]:
        ident = _one_arg("kick ID", args)
        if not self._is_admin():
            return ["kick: only an admin user may kick"]
        if self.context.kick(ident):
            log.info("console: %s kicked %s", self.user, ident)
            return [f"kicked {ident}"]
        return [f"kick: no connection for {_cut(ident)}"]

    def _is_admin(self) -> bool:
        """Asked of the registry at each command: an admin flag lost since login counts."""
        me = self.context.registry.get(self.user)
        return me is not None and me.admin and not me.revoked

    def _identities(self, args: list[str]) -> list[str]:
        _no_args("identities", args)
        rows = []
        for identity in self.context.registry.list():
            flags = [name for name in ("admin", "revoked") if getattr(identity, name)]
            rows.append(
                (
                    identity.id,
                    identity.kind,
                    identity.module or "-",
                    format_channels(identity.channels) or "-",
                    ",".join(flags) or "-",
                )
            )
        if not rows:
            return ["no identities"]
        return _table(("ID", "KIND", "MODULE", "CHANNELS", "FLAGS"), rows)

    def _revoke(self, args: list[str]) -> list[str]:
        ident = _one_arg("revoke ID", args)
        if not self._is_admin():
            return ["revoke: only an admin user may revoke"]
        identity = self.context.registry.get(ident)
        if identity is None:
            return [f"revoke: unknown identity {_cut(ident)}"]
        if identity.revoked:
            return [f"{ident} is already revoked"]
        self.context.registry.revoke(ident)
        self.context.refresh_identities()  # closes its connection now
        log.info("console: %s revoked %s", self.user, ident)
        if ident == self.user:
            self._to_login()
            return [f"revoked {ident}; that was you: logged out"]
        return [f"revoked {ident}"]

    def _log(self, args: list[str]) -> list[str]:
        usage = f"usage: log [N] (N from 1 to {LOG_MAX})"
        if len(args) > 1:
            return [usage]
        count = LOG_DEFAULT
        if args:
            if not args[0].isdigit() or len(args[0]) > 6 or int(args[0]) < 1:
                return [usage]
            count = min(int(args[0]), LOG_MAX)
        if self.context.log_lines is None:
            return ["log: not available"]
        lines = list(self.context.log_lines(count))[-count:]
        return lines or ["(no log lines)"]

    def _subscribers(self, args: list[str]) -> list[str]:
        _no_args("subscribers", args)
        if self.context.subscribers is None:
            return ["none configured"]
        return list(self.context.subscribers())[:LIST_MAX] or ["none configured"]

    def _fingerprint_cmd(self, args: list[str]) -> list[str]:
        _no_args("fingerprint", args)
        if self.context.fingerprint is None:
            return ["fingerprint: not available"]
        if self._fingerprint is None:  # the hardware does not change: ask once
            self._fingerprint = self.context.fingerprint()
        return [self._fingerprint]

    def _version(self, args: list[str]) -> list[str]:
        _no_args("version", args)
        return [f"module-ingest {self.context.version}"]

    def _logout_cmd(self, args: list[str]) -> list[str]:
        log.info("console: %s logged out", self.user)
        self._to_login()
        return ["bye"]


class UsageError(Exception):
    pass


def _no_args(name: str, args: list[str]) -> None:
    if args:
        raise UsageError(f"usage: {name} (no arguments)")


def _one_arg(usage: str, args: list[str]) -> str:
    if len(args) != 1:
        raise UsageError(f"usage: {usage}")
    return args[0]


# -- output formatting ----------------------------------------------------------


def _lines(lines: Iterable[str]) -> bytes:
    """Lines as terminal output: CRLF, no control characters, each of bounded length."""
    out = bytearray()
    for line in lines:
        text = "".join(ch if ch.isprintable() else "?" for ch in str(line))
        out += _cut(text, OUT_LINE_MAX).encode("utf-8", "replace") + CRLF
    return bytes(out)


def _cut(text: str, limit: int = ARG_SHOWN) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(exc: BaseException) -> str:
    return _cut(" ".join(str(exc).split()) or type(exc).__name__, 200)


def _pairs(pairs: list[tuple[str, object]]) -> list[str]:
    if not pairs:
        return ["(nothing to show)"]
    width = max(len(label) for label, _ in pairs)
    return [f"{label + ':':<{width + 1}} {value}" for label, value in pairs]


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    shown = [header, *(tuple(_cut(cell) for cell in row) for row in rows[:LIST_MAX])]
    widths = [max(len(row[i]) for row in shown) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in shown
    ]
    if len(rows) > LIST_MAX:
        lines.append(f"... and {len(rows) - LIST_MAX} more")
    return lines


def _address(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)


# -- the real daemon ----------------------------------------------------------------


def context_for(
    server: Server,
    *,
    stats: Callable[[], str] | None = None,
    log_lines: Callable[[int], list[str]] | None = None,
    fingerprint: Callable[[], str] | None = None,
    subscribers: Callable[[], list[str]] | None = None,
) -> ConsoleContext:
    """The context of a running appliance.net.server.Server (called on its loop thread)."""

    def status() -> list[tuple[str, object]]:
        snap = server.snapshot()
        return [
            ("uptime", duration(snap.uptime_seconds)),
            ("connections", f"{snap.connections} ({snap.authenticated} authenticated)"),
            ("frames", f"{snap.counters['frames']} received since start"),
            ("pending bytes", snap.store.pending_bytes),
            ("commit error", snap.store.commit_error or "none"),
        ]

    def queue() -> list[tuple[str, object]]:
        snap = server.snapshot()
        store = snap.store
        segments = list_segments(store.directory)
        rows: list[tuple[str, object]] = [
            ("frames", f"{store.frames} ({snap.counters['frames']} since start)"),
            ("bytes on disk", store.bytes_on_disk),
            ("pending bytes", store.pending_bytes),
            ("segments", f"{len(segments)} in {store.directory}"),
            ("quota bytes", store.quota_bytes or "none"),
        ]
        if store.full:
            rows.append(("full", "yes: frames needing a new segment get BUSY"))
        if store.dropped_frames:
            rows.append(("dropped frames", store.dropped_frames))
        rows.append(("commit error", store.commit_error or "none"))
        return rows

    def clients() -> list[tuple[str | None, str, str | None]]:
        return [(peer.identity, _address(peer.address), peer.mac) for peer in server.clients()]

    return ConsoleContext(
        registry=server.registry,
        refresh_identities=server.refresh_identities,
        status=status,
        queue=queue,
        clients=clients,
        kick=server.disconnect,
        stats=stats,
        log_lines=log_lines,
        fingerprint=fingerprint,
        subscribers=subscribers,
    )
