"""The console's serial port, run by the server's selector loop.

pyserial opens the port and configures it (baud, 8N1, raw: no echo, no line
editing, no CR/LF translation by the kernel; the shell does all of that), and
TIOCEXCL makes the open exclusive: a port that is not a tty is refused. The
port's file descriptor then joins the server's loop through `Server.watch`, and
reads and writes go straight to it with os.read/os.write, which never block on a
non-blocking descriptor. (pyserial 3.5's `write` with write_timeout=0 retries
EAGAIN in a busy loop, which would stall the loop while the peer is not reading.)

Output waits in a buffer of at most OUT_MAX bytes while the port cannot take it;
beyond that the oldest is dropped and a line in its place says how much, so a
terminal that never reads costs no memory and still sees the latest output. A port
that cannot be opened, or that goes away (a USB gadget whose host unplugged),
is tried again every RETRY_SECONDS from a sweep hook: the daemon never waits for it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import selectors
import termios
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import serial

from appliance.config import Config
from appliance.console.shell import Shell, context_for

if TYPE_CHECKING:
    from appliance.net.server import Server

log = logging.getLogger("appliance.console")

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE
RETRY_SECONDS = 3.0
READ_BYTES = 4096  # per loop iteration: a flood on the port cannot starve the sockets
OUT_MAX = 64 * 1024


class SerialConsole:
    def __init__(self, server: Server, config: Config, shell_factory: Callable[[], Shell]) -> None:
        settings = config.values["console"]
        self.server = server
        self.port_name: str = settings["port"]
        self.baud: int = settings["baud"]
        self.shell = shell_factory()
        self.serial: serial.Serial | None = None
        self.out = bytearray()
        self.dropped = 0  # output bytes dropped because the buffer was full
        self._unreported = 0  # of those, not yet reported on the port
        self._fd = -1
        self._events = 0  # interest registered with the server's loop (0: none)
        self._next_open = 0.0
        self._failing = False  # an open failure was logged; not again until it opens
        # a port that hangs up before anyone typed is opened again quietly: a line that
        # keeps dropping says so once, not every RETRY_SECONDS
        self._received = False
        self._quiet = False

    def start(self) -> None:
        """Hook into the server's loop and open the port (or schedule the retry)."""
        self.server.sweep_hooks.append(self._on_sweep)
        self.server.stop_hooks.append(self.close)
        self._open(time.monotonic())

    def close(self) -> None:
        """Write what is buffered if the port takes it now, then close the port."""
        try:
            if self.serial is not None and self.out:
                with contextlib.suppress(OSError):
                    os.write(self._fd, self.out)
            self._close_port()
        except Exception:
            log.exception("console: error while closing %s", self.port_name)

    # -- the port -------------------------------------------------------------------

    def _open(self, now: float) -> None:
        try:
            port = serial.Serial(self.port_name, self.baud, timeout=0, write_timeout=0)
            try:
                # The kernel refuses every later open of the tty (but root's): another
                # local user cannot read the tokens typed at the login prompt.
                fcntl.ioctl(port.fileno(), termios.TIOCEXCL)
            except OSError:
                port.close()
                raise
        except Exception as exc:  # SerialException mostly; whatever it is, retry later
            self._next_open = now + RETRY_SECONDS
            if not self._failing:
                self._failing = True
                log.error(
                    "console: cannot open %s: %s; retrying every %g s",
                    self.port_name,
                    _reason(exc),
                    RETRY_SECONDS,
                )
            return
        self._failing = False
        self.serial = port
        self._fd = port.fileno()
        self.out.clear()
        self._received = False
        if not self._quiet:
            log.info("console: on %s at %d baud", self.port_name, self.baud)
        try:
            self._emit(self.shell.greeting())
        except Exception:
            log.exception("console: internal error")
            self._lost("internal error")

    def _close_port(self) -> None:
        port, self.serial = self.serial, None
        if port is None:
            return
        if self._events:
            self._events = 0
            with contextlib.suppress(Exception):  # closing must not fail half-way
                self.server.unwatch(self._fd)
        self._fd = -1
        self.out.clear()
        self._unreported = 0
        with contextlib.suppress(Exception):
            # the flag outlives our descriptor while anyone else holds the tty open
            fcntl.ioctl(port.fileno(), termios.TIOCNXCL)
        with contextlib.suppress(Exception):
            port.close()

    def _lost(self, why: str) -> None:
        if not self._quiet:
            log.warning("console: %s: %s; reopening in %g s", self.port_name, why, RETRY_SECONDS)
        self._quiet = not self._received
        self._close_port()
        self.shell.hangup()
        self._next_open = time.monotonic() + RETRY_SECONDS

    def _want(self, events: int) -> None:
        if events == self._events:
            return
        if self._events:
            self.server.unwatch(self._fd)
            self._events = 0
        self.server.watch(self._fd, events, self._on_event)
        self._events = events

    # -- loop callbacks (never raise: an exception here would end the daemon's loop) ------

    def _on_event(self, mask: int) -> None:
        try:
            if mask & WRITE:
                self._flush()
            if mask & READ and self.serial is not None:
                self._read()
        except Exception:
            log.exception("console: internal error")
            self._lost("internal error")

    def _on_sweep(self, now: float) -> None:
        try:
            if self.serial is None:
                if now >= self._next_open:
                    self._open(now)
                return
            self._emit(self.shell.tick(now))
        except Exception:
            log.exception("console: internal error")
            self._lost("internal error")

    # -- I/O --------------------------------------------------------------------------

    def _read(self) -> None:
        try:
            data = os.read(self._fd, READ_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(f"read failed: {exc.strerror or exc}")
            return
        if not data:
            self._lost("hung up")
            return
        self._received = True
        self._quiet = False
        self._emit(self.shell.feed(data))

    def _emit(self, data: bytes) -> None:
        if self.serial is None or not data:
            return
        out = self.out
        if len(data) >= OUT_MAX:
            excess = len(out) + len(data) - OUT_MAX
            out[:] = data[-OUT_MAX:]
        else:
            out += data
            excess = len(out) - OUT_MAX
            if excess > 0:
                del out[:excess]  # the oldest goes: the newest output is what matters
        if excess > 0:
            self.dropped += excess
            self._unreported += excess
        self._flush()

    def _flush(self) -> None:
        out = self.out
        while out or self._unreported:
            if self._unreported:
                # the gap is here: after what the port took, before what is buffered
                chunk = f"\r\n[console: {self._unreported} bytes of output dropped]\r\n".encode()
            else:
                chunk = out
            try:
                sent = os.write(self._fd, chunk)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._lost(f"write failed: {exc.strerror or exc}")
                return
            if sent <= 0:
                break
            if chunk is out:
                del out[:sent]
            else:
                self._unreported = 0
                out[:0] = chunk[sent:]  # the rest of the notice, if the port took only part
        self._want(READ | (WRITE if out or self._unreported else 0))


def _reason(exc: Exception) -> str:
    """One line: "No such file or directory" rather than pyserial's doubled message."""
    if isinstance(exc, OSError) and isinstance(exc.errno, int) and exc.errno > 0:
        return os.strerror(exc.errno)
    return " ".join(str(exc).split()) or type(exc).__name__


def install(
    server: Server,
    config: Config,
    *,
    stats: Callable[[], str] | None = None,
    log_lines: Callable[[int], list[str]] | None = None,
    fingerprint: Callable[[], str] | None = None,
    subscribers: Callable[[], list[str]] | None = None,
) -> SerialConsole | None:
    """Start the console on [console] port, or return None when the port is "" (off).

    Call after `server.bind()` and before `server.run()`. The callables feed the
    commands of the same name; each one left out makes its command say "not available"
    (subscribers: "none configured").
    """
    settings = config.values["console"]
    if not settings["port"]:
        return None
    context = context_for(
        server, stats=stats, log_lines=log_lines, fingerprint=fingerprint, subscribers=subscribers
    )
    idle = settings["idle_logout"]
    console = SerialConsole(server, config, lambda: Shell(context, idle_logout=idle))
    console.start()
    return console
