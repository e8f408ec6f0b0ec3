"""Errors the command-line tools print as one line, and their exit codes."""

from __future__ import annotations

EXIT_CLEAN = 0
EXIT_DAMAGED = 1  # recover-dump found damage; worker --once: the batch was not handled
EXIT_USAGE = 2


class ToolError(Exception):
    """A failure the CLI prints as one line (exit EXIT_USAGE)."""
