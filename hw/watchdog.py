"""The hardware watchdog device (`[watchdog] device`, e.g. /dev/watchdog).

Opening the device arms the board's watchdog timer; from then on something
must write to it before the hardware timeout runs out, or the board resets.
The daemon writes one keepalive byte each time its health check passes (see
hw/notify.py), so a wedged loop or a commit stuck in the kernel resets the
board even when systemd itself is the thing that hangs.

The kernel watchdog API (Documentation/watchdog/watchdog-api.rst):

- any write is a keepalive; we write b"\\0";
- writing the character "V" and then closing the device is the "magic
  close": the driver disarms the timer instead of resetting the board. We do
  that on a clean stop only, so `systemctl stop` does not reboot the board. A
  crash or a kill closes the device without "V", and the board resets when
  the timeout runs out, which is the point. A kernel built with
  CONFIG_WATCHDOG_NOWAYOUT (or the driver's nowayout=1 parameter) ignores the
  magic close, and then even a clean stop ends in a reset unless something
  else (systemd's RuntimeWatchdogSec=) takes over feeding.

Only one process can hold the device open. If systemd already feeds it
(RuntimeWatchdogSec= in system.conf), the open fails with EBUSY: we log it
once and run without it, since systemd's own WatchdogSec= supervision of the
daemon (sd_notify) still covers the same failures.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct

log = logging.getLogger("hw.watchdog")

KEEPALIVE = b"\0"
MAGIC_CLOSE = b"V"
WDIOC_GETTIMEOUT = 0x80045707  # _IOR('W', 7, int)


class WatchdogDevice:
    """An open watchdog device: `keepalive()` feeds it, `close()` disarms it with "V"."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1
        self._failed = False

    def open(self) -> bool:
        """Open (and so arm) the device; False, after one log line, if that fails."""
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            log.error("watchdog: cannot open %s: %s; not feeding it", self.path, exc.strerror)
            return False
        timeout = self.timeout()
        log.info(
            "watchdog: feeding %s%s",
            self.path,
            f" (hardware timeout {timeout} s)" if timeout is not None else "",
        )
        return True

    def timeout(self) -> int | None:
        """The hardware timeout in seconds, if the driver tells it (a plain file does not)."""
        if self._fd < 0:
            return None
        try:
            buf = fcntl.ioctl(self._fd, WDIOC_GETTIMEOUT, b"\0\0\0\0")
        except OSError:
            return None
        return struct.unpack("i", buf)[0]

    def keepalive(self) -> None:
        if self._fd < 0:
            return
        try:
            os.write(self._fd, KEEPALIVE)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.error("watchdog: writing %s failed: %s", self.path, exc.strerror)

    def close(self, *, disarm: bool = True) -> None:
        """Close the device; with `disarm`, write the magic "V" first (a clean stop)."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            if disarm:
                os.write(fd, MAGIC_CLOSE)
        except OSError as exc:
            log.error("watchdog: magic close of %s failed: %s", self.path, exc.strerror)
        finally:
            os.close(fd)
