"""sd_notify over $NOTIFY_SOCKET with the standard library, and the watchdog health check.

systemd's notification protocol (sd_notify(3)) is one AF_UNIX datagram per
message, holding newline-separated `NAME=value` assignments, sent to the
socket named by $NOTIFY_SOCKET: a path, or an abstract address written with a
leading "@". With `Type=notify` the daemon says:

    READY=1       recovery is done and the listeners are open (`Notifier.ready`)
    STATUS=...    one line for `systemctl status`: connections, frames/s, trouble
    WATCHDOG=1    "still alive", at least once per WatchdogSec ($WATCHDOG_USEC)
    STOPPING=1    shutting down (the commit of what is in flight comes first)

`install` hooks this into the server loop. WATCHDOG=1 (and the keepalive of
the `[watchdog] device`, see hw/watchdog.py) is sent only while both halves of
the data path make progress:

- the selector loop: the ping is sent from a sweep hook, so a wedged loop
  sends nothing; no separate check is needed;
- the commit path: the commit in flight (the server's snapshot, `store.stalled_seconds`)
  younger than `[watchdog] stall_seconds`.

When either stops, the pings stop, and systemd kills and restarts the daemon
after WatchdogSec (Restart=on-failure covers the watchdog), or the hardware
watchdog resets the board.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from hw.watchdog import WatchdogDevice

if TYPE_CHECKING:
    from appliance.net.snapshot import Snapshot

log = logging.getLogger("hw.notify")

STATUS_INTERVAL = 2.0  # seconds between STATUS= updates (and the frames/s averaging window)


class Notifier:
    """A sender of sd_notify messages; does nothing when there is no $NOTIFY_SOCKET."""

    def __init__(self, address: str | None = None) -> None:
        if address is None:
            address = os.environ.get("NOTIFY_SOCKET", "")
        self.address = address
        # what `ready` puts in STATUS=; `install` sets it
        self.describe: Callable[[], str] | None = None
        self._target: str | None = None
        self._sock: socket.socket | None = None
        self._failed = False
        if not address:
            return
        if address.startswith("@"):
            self._target = "\0" + address[1:]  # Linux abstract namespace
        elif address.startswith("/"):
            self._target = address
        else:
            log.warning("sd_notify: unsupported NOTIFY_SOCKET %r; not notifying", address)
            return
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send_raw(self, text: str) -> bool:
        """Send one message as is; never blocks or raises. False if it was not sent."""
        if self._sock is None:
            return False
        try:
            self._sock.sendto(text.encode(), self._target)
        except OSError as exc:  # includes BlockingIOError: systemd's queue is full
            if not self._failed:
                self._failed = True
                log.warning("sd_notify: sending to %s failed: %s (not logged again)", self, exc)
            return False
        return True

    def send(self, **fields: object) -> bool:
        """`send(READY=1, STATUS="...")`: one message with these assignments."""
        lines = []
        for name, value in fields.items():
            text = str(value).replace("\n", " ")  # a newline would start another assignment
            lines.append(f"{name}={text}")
        return self.send_raw("\n".join(lines))

    def ready(self, **fields: object) -> bool:
        """READY=1 with the current STATUS= and `fields` (custom ones start with X_, as
        sd_notify(3) asks): call once recovery is done and the listeners listen."""
        if self.describe is None:
            return self.send(READY=1, **fields)
        return self.send(READY=1, STATUS=self.describe(), **fields)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __str__(self) -> str:
        return self.address or "(no NOTIFY_SOCKET)"


def watchdog_interval() -> float | None:
    """systemd's watchdog timeout in seconds ($WATCHDOG_USEC), or None if none is for us.

    $WATCHDOG_PID, when set, names the process the watchdog is meant for; in a
    child that inherited the environment it does not match, and then it is None.
    """
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    usec = os.environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    return int(usec) / 1e6


def commit_healthy(snapshot: Snapshot, stall_seconds: float) -> bool:
    """Whether the commit path makes progress, for the watchdog.

    A commit that has not returned for `stall_seconds` is wedged: the committer
    thread sits in write() or fdatasync() and the kernel does not give it back
    (a dying SD card, an eMMC that stopped answering, a hung I/O controller).
    Nothing inside the process can undo that, and every frame behind it waits
    unacknowledged, so the pings stop and systemd (or the hardware watchdog)
    restarts us.

    A commit that fails is a different case: `store.commit_error` is set only
    after write()/fdatasync() *returned* an error (ENOSPC on a full disk, EIO), so
    the committer thread is alive and retries the batch every RETRY_DELAY. The
    loop NACKs new frames BUSY meanwhile, keeps every acknowledged frame, and
    stays reachable for the operator who frees space. A restart would not free a
    single byte: it would only drop every core's connection and replay recovery,
    again and again. The store clears `commit_started` while it waits to retry
    and sets it again for each attempt, so `stalled_seconds` counts only a write
    that has not returned: a failing disk keeps the pings going, a hung one
    stops them.
    """
    return snapshot.store.stalled_seconds < stall_seconds


class _Supervisor:
    """The sweep and stop hooks `install` adds: health, pings, status."""

    def __init__(
        self,
        server,
        notifier: Notifier,
        *,
        stall_seconds: float,
        interval: float | None,
        device: WatchdogDevice | None,
    ) -> None:
        self.server = server
        self.notifier = notifier
        self.stall_seconds = stall_seconds
        self.ping_every = interval / 2 if interval else None
        self.device = device
        now = time.monotonic()
        self.last_ping = float("-inf")
        self.next_status = now + STATUS_INTERVAL
        self.rate_since = now
        self.rate_frames = server.snapshot().counters["frames"]
        self.rate = 0.0
        self.healthy = True
        self.stopping_sent = False

    def status(self, snap: Snapshot | None = None) -> str:
        """The STATUS= line, from `snap` (the server's snapshot) or one taken now."""
        if snap is None:
            snap = self.server.snapshot()
        now = time.monotonic()
        frames = snap.counters["frames"]
        if now - self.rate_since >= 0.5:  # a shorter window says more about noise than rate
            self.rate = (frames - self.rate_frames) / (now - self.rate_since)
            self.rate_since, self.rate_frames = now, frames
        text = f"{snap.connections} connections, {self.rate:.1f} frames/s"
        store = snap.store
        if store.commit_error is not None:
            text += f"; storage error: {store.commit_error}, retrying (new frames get BUSY)"
        elif not self.healthy:
            text += f"; commit stalled for {store.stalled_seconds:.1f} s, watchdog pings withheld"
        if snap.stopping:
            text += "; stopping"
        return text

    def sweep(self, now: float) -> None:
        # This hook runs in the loop: its running at all is the loop's half of the health check.
        snap = self.server.snapshot()
        healthy = commit_healthy(snap, self.stall_seconds)
        fields: dict[str, object] = {}
        if healthy != self.healthy:
            self.healthy = healthy
            if healthy:
                log.warning("watchdog: the commit path is moving again; pings resume")
            else:
                log.error(
                    "watchdog: a commit has not returned for %.1f s (stall_seconds %.1f); "
                    "withholding watchdog pings",
                    snap.store.stalled_seconds,
                    self.stall_seconds,
                )
            self.next_status = now  # say so in STATUS= at once
        if healthy:
            if self.device is not None:
                self.device.keepalive()
            if self.ping_every is not None and now - self.last_ping >= self.ping_every:
                fields["WATCHDOG"] = 1
                self.last_ping = now
        if snap.stopping and not self.stopping_sent:
            fields["STOPPING"] = 1
            self.stopping_sent = True
            self.next_status = now
        if now >= self.next_status:
            fields["STATUS"] = self.status(snap)
            self.next_status = now + STATUS_INTERVAL
        if fields:
            self.notifier.send(**fields)

    def stop(self) -> None:
        """A clean stop: STOPPING=1 (unless sent already) and the watchdog's magic close."""
        if not self.stopping_sent:
            self.stopping_sent = True
            self.notifier.send(STOPPING=1, STATUS="stopping")
        if self.device is not None:
            self.device.close(disarm=True)


def install(server, config) -> Notifier:
    """Add the sd_notify and watchdog hooks to `server`; call `ready()` on the result
    once the listeners are open."""
    watchdog = config.values["watchdog"]
    notifier = Notifier()
    device = None
    if watchdog["device"]:
        device = WatchdogDevice(watchdog["device"])
        if not device.open():
            device = None
    if not notifier.enabled and device is None:
        return notifier
    interval = watchdog_interval() if notifier.enabled else None
    supervisor = _Supervisor(
        server,
        notifier,
        stall_seconds=watchdog["stall_seconds"],
        interval=interval,
        device=device,
    )
    if interval is not None:
        log.info(
            "watchdog: systemd expects a ping every %.1f s; pinging every %.1f s while healthy",
            interval,
            interval / 2,
        )
    notifier.describe = supervisor.status
    server.sweep_hooks.append(supervisor.sweep)
    server.stop_hooks.append(supervisor.stop)
    return notifier
