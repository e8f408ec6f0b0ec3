"""The sensor-core client library: connect, authenticate, stream, get durable ACKs.

    from appliance.client import Client
    with Client("127.0.0.1", 7878, "dev/core-0", token) as core:
        core.send(1, b'{"t": 21.5}')
        core.flush()          # returns once the appliance has the frame on flash

The client keeps every frame until it is acknowledged (at most `max_unacked`;
`send` waits for ACKs beyond that). If the connection drops, it reconnects by
itself and resends the frames above WELCOME's `last_seq`; resends are harmless
because the appliance refuses replays. A frame refused with NACK BUSY is sent
again under a new seq after a short pause; other NACKs land in `rejected`.
ERROR TIMEOUT leads to a reconnect; any other ERROR raises ClientError.
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from collections import OrderedDict, deque

from appliance.protocol import crypto
from appliance.protocol.client_session import ClientSession, ProtocolViolation
from appliance.protocol.frames import ErrorCode, FrameType
from hw.fingerprint import fingerprint as hw_fingerprint

RECONNECT_BACKOFF = (0.05, 2.0)  # first and longest pause between reconnect attempts
BUSY_BACKOFF = 0.2
# Reconnecting helps only after TIMEOUT; any other ERROR would come back the same way.
RETRY_ERRORS = {ErrorCode.TIMEOUT}


class ClientError(Exception):
    """The appliance refused us (`code` is the PROTOCOL.md error code) or is unreachable."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class Client:
    def __init__(
        self,
        host: str,
        port: int,
        ident: str,
        token: str,
        *,
        fingerprint: str = "",
        mac: str = "hmac-sha256",
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        timeout: float = 10.0,
        max_unacked: int = 10000,
    ) -> None:
        self.address = (host, port)
        self.ident = ident
        self.secret = crypto.token_to_secret(token)
        # "auto": this board's hardware fingerprint (hw/fingerprint.py)
        self.fingerprint = hw_fingerprint() if fingerprint == "auto" else fingerprint
        self.mac = mac
        self.tls = tls
        self.server_hostname = server_hostname or host
        self.timeout = timeout
        self.max_unacked = max_unacked
        self.acked = 0  # highest seq the appliance has made durable
        self.next_seq = 1
        self.channels: list[int] = []
        self.rejected: list[tuple[int, str, str]] = []  # (seq, code, message)
        self._unacked: OrderedDict[int, tuple[int, int, bytes]] = OrderedDict()
        self._busy: deque[tuple[int, int, bytes]] = deque()
        self._busy_until = 0.0
        self._sock: socket.socket | None = None
        self._session: ClientSession | None = None

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._drop()

    @property
    def unacked(self) -> int:
        return len(self._unacked) + len(self._busy)

    # -- connection ---------------------------------------------------------

    def connect(self) -> None:
        """Connect and authenticate; ClientError if refused or unreachable within the timeout."""
        deadline = time.monotonic() + self.timeout
        pause = RECONNECT_BACKOFF[0]
        while True:
            try:
                self._handshake(deadline)
                return
            except (OSError, ProtocolViolation) as exc:
                self._drop()
                if time.monotonic() + pause > deadline:
                    raise ClientError(f"cannot reach {self.address}: {exc}") from None
            time.sleep(pause)
            pause = min(pause * 2, RECONNECT_BACKOFF[1])

    def _handshake(self, deadline: float) -> None:
        sock = socket.create_connection(
            self.address, timeout=max(0.01, deadline - time.monotonic())
        )
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_hostname=self.server_hostname)
        self._sock = sock
        self._session = ClientSession(
            self.ident,
            self.secret,
            crypto.random_nonce(),
            fingerprint=self.fingerprint,
            mac=self.mac,
        )
        while not self._session.welcomed:
            self._pump(deadline - time.monotonic(), raise_timeout=True)
        self._resend()

    def _on_welcome(self, last_seq: int, channels: list[int]) -> None:
        self.channels = channels
        self.acked = max(self.acked, last_seq)
        self.next_seq = max(self.next_seq, last_seq + 1)
        for seq in [s for s in self._unacked if s <= last_seq]:
            del self._unacked[seq]

    def _resend(self) -> None:
        session = self._session
        for seq, (channel, ts_ns, payload) in self._unacked.items():
            session.send_data(channel, seq, payload, ts_ns)
        self._write()

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        self._session = None

    def _reconnect(self, why: str) -> None:
        self._drop()
        try:
            self.connect()
        except ClientError as exc:
            raise ClientError(f"connection lost ({why}); {exc}") from None

    # -- I/O ----------------------------------------------------------------

    def _write(self) -> None:
        data = self._session.data_to_send()
        if data:
            self._sock.settimeout(self.timeout)
            self._sock.sendall(data)

    def _pump(self, timeout: float, *, raise_timeout: bool = False) -> bool:
        """Read and handle what the appliance sent, waiting up to `timeout`; False if nothing."""
        sock = self._sock
        pending = isinstance(sock, ssl.SSLSocket) and sock.pending()
        if not pending and not select.select([sock], [], [], max(0.0, timeout))[0]:
            if raise_timeout:
                raise TimeoutError("no answer from the appliance")
            return False
        sock.settimeout(self.timeout)
        data = sock.recv(65536)
        if not data:
            raise ConnectionResetError("the appliance closed the connection")
        for event in self._session.receive_data(data):
            self._on_event(event)
        self._write()
        return True

    def _on_event(self, event: tuple) -> None:
        kind = event[0]
        if kind == FrameType.ACK:
            seq = event[1]
            if seq > self.acked:
                self.acked = seq
            unacked = self._unacked
            while unacked:
                first = next(iter(unacked))
                if first > seq:
                    break
                del unacked[first]
        elif kind == FrameType.NACK:
            _, seq, code, message = event
            frame = self._unacked.pop(seq, None)
            if frame is None:
                return
            if code == ErrorCode.BUSY:
                self._busy.append(frame)
                self._busy_until = time.monotonic() + BUSY_BACKOFF
            else:
                self.rejected.append((seq, code, message))
        elif kind == FrameType.WELCOME:
            self._on_welcome(event[1], event[2])
        elif kind == FrameType.ERROR:
            _, code, message = event
            if code in RETRY_ERRORS:
                raise ConnectionResetError(f"{code}: {message}")
            self._drop()
            raise ClientError(f"{code}: {message}", code)

    def _io(self, action, *args, **kwargs):
        """Run an I/O step; on a lost connection reconnect once per failure and retry."""
        while True:
            try:
                if self._sock is None:
                    self._reconnect("not connected")
                return action(*args, **kwargs)
            except (OSError, ProtocolViolation) as exc:
                self._reconnect(str(exc))

    # -- public -------------------------------------------------------------

    def send(self, channel: int, payload: bytes, ts_ns: int | None = None) -> int:
        """Queue and send one DATA frame; returns its seq. Durable once `acked` reaches it."""
        if not 0 <= channel <= 0xFFFF:
            raise ValueError(f"channel {channel} is not 0..65535")
        limit = self._session.max_payload if self._session else 65536
        if len(payload) > limit:
            raise ValueError(f"payload of {len(payload)} bytes exceeds max_payload {limit}")
        if ts_ns is None:
            ts_ns = time.time_ns()
        while len(self._unacked) >= self.max_unacked:
            self._io(self._pump, self.timeout, raise_timeout=True)
        seq = self.next_seq
        self.next_seq += 1
        self._unacked[seq] = (channel, ts_ns, payload)
        if self._sock is None:
            self._io(lambda: None)  # reconnecting resends it
            return seq
        self._session.send_data(channel, seq, payload, ts_ns)
        self._io(self._write_and_poll)
        return seq

    def send_many(self, frames) -> int:
        """Queue and send DATA frames, (channel, payload, ts_ns) each, in one write (or one
        per `max_unacked`); returns the last seq. Durable once `acked` reaches it."""
        seq = self.next_seq - 1
        limit = self._session.max_payload if self._session else 65536
        for channel, payload, ts_ns in frames:
            if not 0 <= channel <= 0xFFFF:
                raise ValueError(f"channel {channel} is not 0..65535")
            if len(payload) > limit:
                raise ValueError(f"payload of {len(payload)} bytes exceeds max_payload {limit}")
            if len(self._unacked) >= self.max_unacked:
                self._io(self._write_and_poll)
                while len(self._unacked) >= self.max_unacked:
                    self._io(self._pump, self.timeout, raise_timeout=True)
            seq = self.next_seq
            self.next_seq += 1
            self._unacked[seq] = (channel, ts_ns, payload)
            if self._sock is not None:
                self._session.send_data(channel, seq, payload, ts_ns)
        self._io(self._write_and_poll)  # (reconnecting resends what is unacknowledged)
        return seq

    def _write_and_poll(self) -> None:
        self._write()
        while self._pump(0):
            pass

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every frame sent is acknowledged or rejected."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while self._unacked or self._busy:
            now = time.monotonic()
            if now > deadline:
                raise ClientError(f"{self.unacked} frames still unacknowledged after the timeout")
            if self._busy and now >= self._busy_until and self._sock is not None:
                while self._busy:
                    channel, ts_ns, payload = self._busy.popleft()
                    seq = self.next_seq
                    self.next_seq += 1
                    self._unacked[seq] = (channel, ts_ns, payload)
                    self._session.send_data(channel, seq, payload, ts_ns)
                self._io(self._write)
            wait = min(deadline, self._busy_until if self._busy else deadline) - now
            self._io(self._pump, max(0.0, wait))

    def ping(self) -> None:
        """Round-trip a PING (keeps an idle connection alive)."""
        self._io(self._session.send, FrameType.PING, 1)
        self._io(self._write)

    def close(self) -> None:
        """Flush, send BYE, wait for the final ACK, close."""
        try:
            if self._sock is not None:
                self.flush()
                self._session.send(FrameType.BYE)
                self._write()
                try:
                    while self._pump(self.timeout):
                        pass
                except (OSError, ProtocolViolation):
                    pass  # the appliance closes after its final ACK
        finally:
            self._drop()
