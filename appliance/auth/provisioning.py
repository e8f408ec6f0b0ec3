"""Bulk provisioning: the file format of `identity import` and `identity export`.

One identity per row, as CSV with a header or as JSON lines, with the keys

    id, kind, module, channels, fingerprint, mac

of which only `id` and `kind` are required. `channels` is a channel list as
`identity add --channels` takes it ("1,2,5-7", quoted in CSV), `mac` the MAC
algorithms as `--mac` takes them ("hmac-sha256,blake2s"; empty: the default
policy), `module` and `fingerprint` may be empty. In JSON lines a value may also
be null, and `channels` and `mac` may be lists. `export` writes the same keys with
string values, so its output is a file `import` reads.

Export never writes a secret, and leaves out revoked identities (re-importing one
must not bring it back) and the admin flag (a file must not grant it).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from appliance.auth.identity import Identity, RegistryError, format_channels, parse_channels
from appliance.protocol import crypto

FIELDS = ("id", "kind", "module", "channels", "fingerprint", "mac")
FORMATS = ("csv", "jsonl")
_EXTENSIONS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


class ProvisioningError(Exception):
    """A file that cannot be imported; the message is one line naming the row."""


def format_for(path: str, given: str | None) -> str:
    """The format named by --format, else by the file's extension."""
    if given is not None:
        return given
    for extension, fmt in _EXTENSIONS.items():
        if path.lower().endswith(extension):
            return fmt
    raise ProvisioningError(f"{path}: cannot tell the format from the name: give --format")


def read_specs(f: TextIO, fmt: str) -> tuple[list[dict[str, Any]], list[int]]:
    """The `Registry.add_many` specs of every row, and the row number of each.

    A row number is the line of the file the row starts on (the CSV header is row 1).
    """
    specs: list[dict[str, Any]] = []
    rows: list[int] = []
    for row, record in _csv_records(f) if fmt == "csv" else _jsonl_records(f):
        try:
            specs.append(_spec(record))
        except (RegistryError, ValueError) as e:
            raise ProvisioningError(f"row {row}: {e}") from None
        rows.append(row)
    return specs, rows


def write_identities(out: TextIO, identities: Iterable[Identity], fmt: str) -> None:
    """Every active identity's settings (never a secret) in `fmt`."""
    records = (_record(identity) for identity in identities if not identity.revoked)
    if fmt == "csv":
        writer = csv.DictWriter(out, FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
    else:
        for record in records:
            out.write(json.dumps(record) + "\n")


# -- reading -------------------------------------------------------------------------


def _csv_records(f: TextIO) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.reader(f, strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise ProvisioningError("row 1: empty file: expected a header naming the keys")
        header = [name.strip() for name in header]
        for name in header:
            if name not in FIELDS:
                raise ProvisioningError(f"row 1: unknown key {name!r} (keys: {', '.join(FIELDS)})")
        if len(set(header)) != len(header):
            raise ProvisioningError("row 1: a key is named twice")
        start = reader.line_num + 1
        for values in reader:
            if values:  # a blank line is no row
                if len(values) != len(header):
                    raise ProvisioningError(
                        f"row {start}: {len(values)} values for {len(header)} keys"
                    )
                yield start, dict(zip(header, values, strict=True))
            start = reader.line_num + 1
    except csv.Error as e:
        raise ProvisioningError(f"row {reader.line_num}: bad CSV: {e}") from None


def _jsonl_records(f: TextIO) -> Iterator[tuple[int, dict[str, Any]]]:
    for row, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise ProvisioningError(f"row {row}: not valid JSON: {e}") from None
        if not isinstance(record, dict):
            raise ProvisioningError(f"row {row}: not a JSON object")
        unknown = sorted(set(record) - set(FIELDS))
        if unknown:
            raise ProvisioningError(
                f"row {row}: unknown key {unknown[0]!r} (keys: {', '.join(FIELDS)})"
            )
        yield row, record


def _spec(record: dict[str, Any]) -> dict[str, Any]:
    """A row as the arguments of Registry.add; ValueError or RegistryError if bad."""
    ident = _text(record, "id")
    kind = _text(record, "kind")
    if not ident or not kind:
        raise ValueError("'id' and 'kind' are required")
    channels = record.get("channels")
    if isinstance(channels, list):
        if not all(type(c) is int for c in channels):
            raise ValueError("'channels' must be a list of integers or a string like 1,2,5-7")
    else:
        channels = parse_channels(_text(record, "channels"))
    macs = record.get("mac")
    if not isinstance(macs, list):
        macs = [m.strip() for m in _text(record, "mac").split(",") if m.strip()]
    unknown = [m for m in macs if m not in crypto.MAC_ALGORITHMS]
    if unknown:
        raise ValueError(f"unknown MAC algorithm {unknown[0]!r}")
    spec = {"ident": ident, "kind": kind, "channels": channels}
    spec["module"] = _text(record, "module") or None
    spec["fingerprint"] = _text(record, "fingerprint") or None
    if macs:
        spec["macs"] = macs
    return spec


def _text(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string")
    return value.strip()


# -- writing -------------------------------------------------------------------------


def _record(identity: Identity) -> dict[str, str]:
    return {
        "id": identity.id,
        "kind": identity.kind,
        "module": identity.module or "",
        "channels": format_channels(identity.channels),
        "fingerprint": identity.fingerprint or "",
        "mac": ",".join(sorted(identity.macs)),
    }
