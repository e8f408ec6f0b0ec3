"""Child processes of the daemon (the store's writer, the subscribers) must not outlive it.

A daemon killed with SIGKILL runs no clean-up, so its children cannot be told to
stop; the kernel has to do it. Each child asks for that itself, first thing.
"""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when `parent` (its parent) exits.

    The request only covers a parent alive at the time of the call, so a parent
    that is already gone (we were re-parented) ends this process at once."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if os.getppid() != parent:
        os._exit(1)
