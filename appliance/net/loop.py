"""The loop's frame: two epolls, the control fds, extension hooks, signals.

Owner: the loop thread. Two levels: the loop waits on `epoll` (every
connection, and `control`); the fds on `control` (the store's writer, the
listeners, the wake-up pipe, the stats socket and the console) are served
first in every iteration, so ACKs, accepts and diagnostics never queue
behind thousands of busy sockets. Extensions (telemetry, the console, the
watchdog, the subscriber manager) run inside the loop through `watch`,
`sweep_hooks` and `stop_hooks`; a failing one is logged and never stops it.
The Server (server.py) is the loop that serves MIP on this frame.
"""

from __future__ import annotations

import logging
import os
import select
import signal
from collections.abc import Callable

log = logging.getLogger("appliance.net")

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLL_FAIL = select.EPOLLERR | select.EPOLLHUP


class Loop:
    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.control = select.epoll()
        self.epoll.register(self.control.fileno(), EPOLLIN)
        # extension points for telemetry, the console and the watchdog: they run in this loop
        self.sweep_hooks: list[Callable[[float], None]] = []
        self.stop_hooks: list[Callable[[], None]] = []
        self.stopping = False
        self.exit_code = 0
        self._tags: dict[int, object] = {}  # control fd -> what it is (the Server's tags)
        self._signals = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def _register(self, fd: int, mask: int, tag: object) -> None:
        self.control.register(fd, mask)
        self._tags[fd] = tag

    def _unregister(self, fd: int) -> None:
        self.control.unregister(fd)
        del self._tags[fd]

    def handle_signals(self) -> None:
        """From now on SIGTERM and SIGINT stop the loop gracefully (call before saying
        that the daemon listens: a stop request may come right after)."""
        if self._signals:
            return
        self._signals = True
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, _signum, _frame) -> None:
        self.stopping = True

    def _run_hooks(self, hooks, *args) -> None:
        """Run extension callbacks; a failing one is logged, never stops the loop."""
        for hook in hooks:
            try:
                hook(*args)
            except Exception:
                log.exception("extension %r failed", hook)

    def watch(self, fileobj, events: int, callback: Callable[[int], None]) -> None:
        """Run `callback(mask)` in the loop when `fileobj` is ready (selectors' masks)."""
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        mask = (EPOLLIN if events & 1 else 0) | (EPOLLOUT if events & 2 else 0)
        self._register(fd, mask, callback)

    def unwatch(self, fileobj) -> None:
        self._unregister(fileobj if isinstance(fileobj, int) else fileobj.fileno())

    def close(self) -> None:
        """Let go of the loop's own descriptors: the end of run(), or a server never run."""
        self.control.close()
        self.epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
