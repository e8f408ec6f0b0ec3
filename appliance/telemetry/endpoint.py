"""The stats endpoint: a Unix socket in the data dir (and optionally TCP on loopback).

Protocol: the client sends one line naming a format (`json`, `text` or
`prometheus`), optionally followed by ` identities`; the daemon replies with the
snapshot in that format and closes. The per-identity rows come only when asked
for: with 10,000 cores they take the loop tens of milliseconds to build and
encode, a stall every connected core would see in its ACK latency if a
monitoring scrape brought them each time.
An unknown request gets one line starting with `error:`. Everything runs in
the server's selector loop and never blocks it: sockets are non-blocking, a
request line is at most REQUEST_MAX bytes, a client that is silent or does not
read its reply for CLIENT_TIMEOUT seconds is dropped, and at most MAX_CLIENTS
are served at once per listener (more are closed on accept): the Unix socket
(0600, so root and the service user) and the TCP port (any local user) have
separate pools, so local TCP clients cannot lock the Unix socket's users out.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import selectors
import socket
import stat
import time
from pathlib import Path

from appliance.config import Address, parse_address
from appliance.telemetry import metrics

log = logging.getLogger("appliance.telemetry")

REQUEST_MAX = 256  # bytes in a request line, newline included
CLIENT_TIMEOUT = 2.0  # seconds to send the request, and between reads of the reply
MAX_CLIENTS = 16
ACCEPT_BATCH = 16  # accepts per readiness event, so a connect storm cannot hog the loop
FORMATS = ("json", "text", "prometheus")
IDENTITIES = "identities"  # after the format: add a row per identity

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE


def socket_path(config) -> Path:
    """The Unix socket's path: [stats] socket, relative to the data dir unless absolute."""
    path = Path(config.values["stats"]["socket"])
    return path if path.is_absolute() else Path(config.data_dir) / path


def render(figures: metrics.Metrics, fmt: str, identities: bool = False) -> bytes:
    snap = figures.snapshot(identities)
    if fmt == "json":
        return (json.dumps(snap) + "\n").encode()
    if fmt == "prometheus":
        return metrics.prometheus(snap).encode()
    return metrics.text(snap).encode()


class _Client:
    __slots__ = ("deadline", "inbuf", "listener", "out", "sock")

    def __init__(self, sock: socket.socket, listener: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.listener = listener  # whose pool it counts in
        self.deadline = deadline
        self.inbuf = bytearray()
        self.out: memoryview | None = None  # the reply still to send, once there is one


class StatsEndpoint:
    def __init__(
        self, server, figures: metrics.Metrics, path: Path, tcp: Address | None = None
    ) -> None:
        self.server = server  # whose loop runs the endpoint
        self.figures = figures
        self.path = Path(path)
        self.tcp = tcp
        self.listeners: list[socket.socket] = []
        self.clients: dict[socket.socket, _Client] = {}
        self.pools: dict[socket.socket, int] = {}  # listener -> clients it serves now
        self.tcp_address: tuple[str, int] | None = None  # bound address (port 0 picks one)
        self._inode: int | None = None  # of the socket file we bound, to unlink only ours
        self._closed = False

    # -- start and stop ---------------------------------------------------------------

    def start(self) -> None:
        """Bind the listeners and hook them into the server's loop."""
        try:
            self.listeners.append(self._bind_unix())
            if self.tcp is not None:
                self.listeners.append(self._bind_tcp(self.tcp))
        except BaseException:
            self.close()
            raise
        for lsock in self.listeners:
            self.server.watch(lsock, READ, self._accept_callback(lsock))
        self.server.sweep_hooks.append(self._expire)
        self.server.stop_hooks.append(self.close)
        where = str(self.path)
        if self.tcp_address is not None:
            where += " and {}:{}".format(*self.tcp_address)
        log.info("stats: serving on %s", where)

    def _bind_unix(self) -> socket.socket:
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # the umask makes the socket 0600 from the start: no window where others connect
            old = os.umask(0o177)
            try:
                sock.bind(str(self.path))
            finally:
                os.umask(old)
            os.chmod(self.path, 0o600)
            self._inode = os.stat(self.path).st_ino
            sock.listen(MAX_CLIENTS)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def _remove_stale(self) -> None:
        """Unlink a socket left by a daemon that died; refuse to steal a live one."""
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise OSError(f"{self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(0.5)
        try:
            probe.connect(str(self.path))
        except ConnectionRefusedError:
            os.unlink(self.path)  # nobody listens: stale
            return
        except TimeoutError:
            pass  # a listener with a full backlog: alive
        finally:
            probe.close()
        raise OSError(f"{self.path} is in use by another process")

    def _bind_tcp(self, address: Address) -> socket.socket:
        # the endpoint has no authentication: it must not be reachable from the network
        try:
            loopback = address.host == "localhost" or ipaddress.ip_address(address.host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise OSError(f"stats.tcp must be a loopback address, got {address}")
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        sock = socket.create_server((address.host, address.port), family=family)
        sock.setblocking(False)
        self.tcp_address = sock.getsockname()[:2]
        return sock

    def close(self) -> None:
        """Close everything and unlink the socket file (the server's stop hook)."""
        if self._closed:
            return
        self._closed = True
        for sock in list(self.clients):
            self._drop(sock)
        for lsock in self.listeners:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.server.unwatch(lsock)
            lsock.close()
        self.listeners = []
        if self._inode is not None:
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == self._inode:  # not a newer daemon's socket
                    os.unlink(self.path)
            self._inode = None

    # -- the loop's callbacks ---------------------------------------------------------

    def _accept_callback(self, lsock: socket.socket):
        def on_ready(mask: int) -> None:
            try:
                self._accept(lsock)
            except Exception:
                log.exception("stats: accept failed")  # the loop must survive anything here

        return on_ready

    def _accept(self, lsock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("stats: accept: %s", exc.strerror or exc)
                return
            if self.pools.get(lsock, 0) >= MAX_CLIENTS:
                sock.close()  # a stuck tool must not tie up more of the loop
                continue
            sock.setblocking(False)
            client = _Client(sock, lsock, time.monotonic() + CLIENT_TIMEOUT)
            self.clients[sock] = client
            self.pools[lsock] = self.pools.get(lsock, 0) + 1
            self.server.watch(sock, READ, self._client_callback(client))

    def _client_callback(self, client: _Client):
        def on_ready(mask: int) -> None:
            try:
                if client.out is None:
                    self._read(client)
                else:
                    self._write(client)
            except Exception:
                log.exception("stats: request failed")
                self._drop(client.sock)

        return on_ready

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(REQUEST_MAX + 1 - len(client.inbuf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client.sock)
            return
        client.inbuf += data
        line, newline, _ = client.inbuf.partition(b"\n")
        if not newline:
            if len(client.inbuf) > REQUEST_MAX:
                self._drop(client.sock)  # no line within the bound: not a stats client
                return
            if data:
                return  # wait for the rest of the line
            if not client.inbuf:
                self._drop(client.sock)
                return
            # EOF after a line without its newline (`printf json | nc -U`): take it
        self._reply(client, bytes(line).strip().decode("ascii", "replace").lower())

    def _reply(self, client: _Client, request: str) -> None:
        fmt, _, rest = request.partition(" ")
        if fmt in FORMATS and rest.strip() in ("", IDENTITIES):
            body = render(self.figures, fmt, identities=bool(rest.strip()))
        else:
            shown = request[:40]
            body = (
                f"error: unknown request {shown!r}; send one of {', '.join(FORMATS)}, "
                f"optionally followed by {IDENTITIES!r}\n"
            ).encode()
        client.out = memoryview(body)
        client.deadline = time.monotonic() + CLIENT_TIMEOUT
        self.server.unwatch(client.sock)
        self.server.watch(client.sock, WRITE, self._client_callback(client))
        self._write(client)

    def _write(self, client: _Client) -> None:
        try:
            sent = client.sock.send(client.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client.sock)  # the reader went away
            return
        client.out = client.out[sent:]
        client.deadline = time.monotonic() + CLIENT_TIMEOUT  # progress: a slow reader is fine
        if not client.out:
            self._drop(client.sock)

    def _drop(self, sock: socket.socket) -> None:
        client = self.clients.pop(sock, None)
        if client is None:
            return
        self.pools[client.listener] -= 1
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.server.unwatch(sock)
        sock.close()

    def _expire(self, now: float) -> None:
        for client in [c for c in self.clients.values() if now >= c.deadline]:
            self._drop(client.sock)


def install(server, config, figures: metrics.Metrics) -> StatsEndpoint:
    """Start the stats endpoint from [stats], serving `figures`; returns it.

    If the endpoint cannot listen, the daemon serves on without it and says so once."""
    section = config.values["stats"]
    tcp = parse_address(section["tcp"]) if section["tcp"] else None
    endpoint = StatsEndpoint(server, figures, socket_path(config), tcp)
    try:
        endpoint.start()
    except OSError as exc:
        log.error("stats: cannot listen: %s; serving without the stats endpoint", exc)
    return endpoint
