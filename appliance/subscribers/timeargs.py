"""Times and channels on the command line of `export` and `query`.

A time is Unix seconds (`1714564800`, `1714564800.5`, `1714564800s`),
Unix nanoseconds (`1714564800000000000ns`, or a bare integer of 16 digits or
more), or ISO-8601 (`2024-05-01T12:00:00.000000001Z`, `2024-05-01 12:00`,
`2024-05-01T14`, `2024-05-01`; no offset means UTC). Before 1970 is refused.
"""

from __future__ import annotations

import argparse
import re
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation

NS_DIGITS = 16  # a bare integer this long is nanoseconds (seconds reach 16 digits in 3e8 years)
NUMBER = re.compile(r"(\d+(?:\.\d+)?)(s|ns)?")
ISO = re.compile(
    r"(?P<date>\d{4}-\d\d-\d\d)"
    r"(?:[T ](?P<h>\d\d)(?::(?P<m>\d\d)(?::(?P<s>\d\d)(?:[.,](?P<frac>\d+))?)?)?)?"
    r"(?P<tz>Z|[+-]\d\d:?\d\d)?",
    re.IGNORECASE,
)


def parse_time(text: str) -> int:
    """A time (the forms above) as nanoseconds since the Unix epoch; ValueError if not one."""
    text = text.strip()
    number = NUMBER.fullmatch(text)
    if number:
        value, unit = number.groups()
        if unit == "ns" or (unit is None and "." not in value and len(value) >= NS_DIGITS):
            if "." in value:
                raise ValueError(f"nanoseconds are a whole number, got {text!r}")
            return int(value)
        try:
            return int(Decimal(value) * 10**9)
        except InvalidOperation:
            pass
    match = ISO.fullmatch(text)
    if match:
        frac = match["frac"] or ""
        tz = (match["tz"] or "Z").upper().replace("Z", "+00:00")
        hms = f"{match['h'] or '00'}:{match['m'] or '00'}:{match['s'] or '00'}"
        try:
            base = datetime.fromisoformat(f"{match['date']}T{hms}{tz}")
        except ValueError as exc:
            raise ValueError(f"{text!r}: {exc}") from None
        seconds = int(base.timestamp())  # whole seconds: no float rounding
        if seconds >= 0:
            return seconds * 10**9 + int(frac[:9].ljust(9, "0"))
        raise ValueError(f"{text!r} is before 1970")
    raise ValueError(
        f"expected Unix seconds or nanoseconds, or ISO-8601 (2024-05-01T12:00:00Z), got {text!r}"
    )


def format_time(ns: int) -> str:
    """Nanoseconds since the epoch as ISO-8601 UTC, e.g. 2024-05-01T12:00:00.000000001Z."""
    seconds, rest = divmod(ns, 10**9)
    day = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{day}.{rest:09d}Z"


def time_arg(text: str) -> int:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def channel_arg(text: str) -> int:
    if not text.isdigit() or int(text) > 0xFFFF:
        raise argparse.ArgumentTypeError(f"a channel is 0..65535, got {text!r}")
    return int(text)
