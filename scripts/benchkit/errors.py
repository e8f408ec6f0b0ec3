"""How a benchmark fails: BenchError carries the one line to print, and `guarded` turns it
(or Ctrl-C) into the script's exit code once the run has cleaned up after itself."""

from __future__ import annotations

import sys
from collections.abc import Callable


class BenchError(Exception):
    """A run could not be done; the message is one line."""


def guarded(prog: str, run: Callable[[], int]) -> int:
    """`run()`'s exit code; 1 with "PROG: why" on stderr for a BenchError, 130 on Ctrl-C."""
    try:
        return run()
    except BenchError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
