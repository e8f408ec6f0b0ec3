"""Structured logging: one logfmt line or one JSON object per event.

Every record goes to stdout (journald picks it up), optionally to a rotating
file, and always into a bounded in-memory buffer the console can show. A
record is always exactly one line: newlines in the message, in extra fields
and in tracebacks are escaped, so a line-oriented reader never sees half an
event.

    log.info("frame stored", extra={"fields": {"identity": ident, "seq": 7}})
    ts=2026-11-27T14:00:00.123Z level=info logger=appliance.net msg="frame stored" identity=...

%-style arguments keep working: `log.info("listening on %s", addr)`.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import threading
import time
from collections import deque
from logging.handlers import RotatingFileHandler, WatchedFileHandler
from pathlib import Path
from typing import Any

# keys of the record itself; extra fields with these names are written as fields.NAME
RESERVED = ("ts", "level", "logger", "msg", "exc", "stack")


class LogBuffer:
    """The last `capacity` formatted lines; safe to read from any thread."""

    def __init__(self, capacity: int, lines: list[str] | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._lines: deque[str] = deque(lines or (), maxlen=capacity)
        self._lock = threading.Lock()

    def append(self, line: str) -> None:
        with self._lock:
            self._lines.append(line)

    def lines(self, n: int | None = None) -> list[str]:
        """The newest `n` lines (all when None), newest last."""
        with self._lock:
            if n is None:
                return list(self._lines)
            if n <= 0:
                return []
            newest_first = list(itertools.islice(reversed(self._lines), n))
        return newest_first[::-1]

    def __len__(self) -> int:
        with self._lock:
            return len(self._lines)


class BufferHandler(logging.Handler):
    """Feeds formatted records into a LogBuffer."""

    def __init__(self, buffer: LogBuffer) -> None:
        super().__init__()
        self.buffer = buffer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.buffer.append(self.format(record))
        except Exception:
            self.handleError(record)


class RotatingFile(RotatingFileHandler):
    """RotatingFileHandler that stays bounded with no backups too."""

    def doRollover(self) -> None:
        if self.backupCount > 0:
            super().doRollover()
            return
        # the stdlib reopens in append mode and the file grows forever; start it over instead
        if self.stream:
            self.stream.close()
            self.stream = None
        os.truncate(self.baseFilename, 0)
        self.stream = self._open()


class StructuredFormatter(logging.Formatter):
    """Formats a record as one logfmt line or one JSON object (`fmt` "logfmt" or "json")."""

    def __init__(self, fmt: str = "logfmt") -> None:
        super().__init__()
        if fmt not in ("logfmt", "json"):
            raise ValueError(f"log format must be logfmt or json, got {fmt!r}")
        self.kind = fmt

    def format(self, record: logging.LogRecord) -> str:
        pairs = self.pairs(record)
        if self.kind == "json":
            return json.dumps(dict(pairs), default=str)
        return " ".join(f"{_logfmt_key(k)}={_logfmt_value(v)}" for k, v in pairs)

    def pairs(self, record: logging.LogRecord) -> list[tuple[str, Any]]:
        pairs: list[tuple[str, Any]] = [
            ("ts", _timestamp(record)),
            ("level", record.levelname.lower()),
            ("logger", record.name),
            ("msg", _message(record)),
        ]
        seen = set(RESERVED)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                key = str(key)
                if key in seen:
                    key = "fields." + key  # never overwrite the record's own keys
                seen.add(key)
                pairs.append((key, value))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            pairs.append(("exc", record.exc_text))
        if record.stack_info:
            pairs.append(("stack", self.formatStack(record.stack_info)))
        return pairs


def _timestamp(record: logging.LogRecord) -> str:
    # UTC with milliseconds: boards often have no RTC and no time zone set
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except (TypeError, ValueError):
        # a log call with mismatched %-args must not cost the event
        return f"{record.msg} args={record.args!r}"


def _logfmt_key(key: str) -> str:
    cleaned = "".join(c if c.isprintable() and c not in ' ="\\' else "_" for c in key)
    return cleaned or "_"


_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _logfmt_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = value if isinstance(value, str) else str(value)
    if text and all(c.isprintable() and c not in ' ="\\' for c in text):
        return text
    out = []
    for c in text:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif not c.isprintable() and c != " ":
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


# what the last setup() installed, so a second setup() replaces it
_installed: list[logging.Handler] = []
_buffer: LogBuffer | None = None
_setup_lock = threading.Lock()


def _resolve(path: str, config) -> Path:
    p = Path(path)
    return p if p.is_absolute() else Path(config.data_dir) / p


class Fields(logging.Filter):
    """Adds fields to every record that passes (say subscriber=NAME in a child process)."""

    def __init__(self, fields: dict[str, Any]) -> None:
        super().__init__()
        self.fields = fields

    def filter(self, record: logging.LogRecord) -> bool:
        own = getattr(record, "fields", None)
        record.fields = {**self.fields, **own} if isinstance(own, dict) else self.fields
        return True


def setup(config, *, child: dict[str, Any] | None = None) -> LogBuffer:
    """Configure the root logger from config.log; returns the in-memory buffer.

    Idempotent: a second call replaces what the first installed. Like
    logging.basicConfig(force=True), it also removes other handlers on the root
    logger (the CLI's basicConfig one), so no event is written twice.

    `child`: this is a process the daemon started (a subscriber), these fields go on
    each of its lines. It appends to `log.file` but leaves rotating it to the daemon
    (it reopens the file when the daemon has rotated it)."""
    global _buffer
    section = config.values["log"]
    formatter = StructuredFormatter(section["format"])
    root = logging.getLogger()
    with _setup_lock:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in _installed:
            handler.close()
        _installed.clear()
        # keep what the previous buffer held: a reload must not blank the console's view
        old = _buffer.lines() if _buffer is not None else None
        _buffer = LogBuffer(section["buffer_lines"], old)
        handlers: list[logging.Handler] = [
            logging.StreamHandler(sys.stdout),
            BufferHandler(_buffer),
        ]
        file_error = None
        if section["file"]:
            path = _resolve(section["file"], config)
            try:
                if child is not None:
                    handlers.append(WatchedFileHandler(path, encoding="utf-8"))
                else:
                    handlers.append(
                        RotatingFile(
                            path,
                            maxBytes=section["file_max_bytes"],
                            backupCount=section["file_backups"],
                            encoding="utf-8",
                        )
                    )
            except OSError as exc:
                file_error = f"{path}: {exc.strerror or exc}"
        for handler in handlers:
            handler.setFormatter(formatter)
            if child:
                handler.addFilter(Fields(child))
            root.addHandler(handler)
            _installed.append(handler)
        root.setLevel(section["level"].upper())
    if file_error:
        # stdout still reaches journald: serve on, and say so once
        logging.getLogger("appliance.telemetry").error(
            "log: cannot open the log file %s; logging to stdout only", file_error
        )
    return _buffer
