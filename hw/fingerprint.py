"""The hardware fingerprint: one stable `sha256:<64 hex>` string per machine.

A core sends it in HELLO (PROTOCOL.md §4), and an identity bound to it
(`identity add --fingerprint`, or trust on first use) authenticates only from
this hardware. It is computed from up to four sources, in this fixed order:

    mac           the primary network interface's MAC (via getmac), lowercase
    machine-id    /etc/machine-id, the OS installation's id (systemd)
    cpu-serial    the `Serial` line of /proc/cpuinfo (Raspberry Pi and other SoCs)
    product-uuid  /sys/class/dmi/id/product_uuid, the firmware's id (x86; root only)

Only the sources that exist and are readable count, and values that are known
placeholders rather than identities (all zeros, systemd's "uninitialized",
common firmware defaults) count as missing. The fingerprint is "sha256:" and
the lowercase hex SHA-256 of this UTF-8 text:

    module-ingest-fingerprint-v1
    NAME=VALUE                      one line per present source
    ...                             (every line, the first too, ends in "\\n")

with the sources in the order above. The order is fixed, never the order a
source was found in, so the same values always give the same string; each
value carries its name, so a missing source can never make two different
machines' lists read alike (a MAC missing here and a machine-id missing there
are different texts). A source that appears or disappears changes the
fingerprint; that is the intended trade (a board whose NIC was swapped, or a
reinstall with a new machine-id, must be bound again), and `sources()` shows
which values went in. product_uuid is readable only by root: run
`module-ingest fingerprint` as the user the client runs as, or the two differ.
With no source at all, `fingerprint()` is "" (PROTOCOL.md: empty if none).

The primary interface is the first hardware-backed interface (one with a
/sys/class/net/IF/device link: not lo, bridges, veth, tunnels), wired ones
before wireless ones, then by name; where there is none (a container), the
interface of the default route.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import getmac

VERSION_LINE = "module-ingest-fingerprint-v1\n"
ORDER = ("mac", "machine-id", "cpu-serial", "product-uuid")

NET = Path("/sys/class/net")
MACHINE_ID = Path("/etc/machine-id")
CPUINFO = Path("/proc/cpuinfo")
PRODUCT_UUID = Path("/sys/class/dmi/id/product_uuid")

_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
# firmware that never set a real UUID ships one of these
_PLACEHOLDER_UUIDS = {
    "00000000-0000-0000-0000-000000000000",
    "ffffffff-ffff-ffff-ffff-ffffffffffff",
    "03000200-0400-0500-0006-000700080009",
}


def _first_line(path: Path) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.readline().strip()
    except OSError:
        return ""


def _placeholder(value: str) -> bool:
    """All zeros (ignoring separators), or all f."""
    digits = value.replace("-", "").replace(":", "")
    return not digits.strip("0") or not digits.strip("f")


def primary_interface(net: Path = NET) -> str | None:
    """The hardware-backed interface the MAC is taken from (see the module docstring)."""
    try:
        names = os.listdir(net)
    except OSError:
        return None
    physical = [n for n in names if (net / n / "device").exists()]
    if not physical:
        return None
    return min(physical, key=lambda n: ((net / n / "wireless").exists(), n))


def mac_address(net: Path = NET) -> str:
    interface = primary_interface(net)
    try:
        mac = getmac.get_mac_address(interface=interface) if interface else None
        mac = mac or getmac.get_mac_address()  # the default route's interface
    except Exception:  # getmac probes several ways; any failure means "no MAC"
        return ""
    mac = (mac or "").lower()
    return mac if _MAC.fullmatch(mac) and not _placeholder(mac) else ""


def machine_id(path: Path = MACHINE_ID) -> str:
    value = _first_line(path).lower()
    # "uninitialized": systemd's first boot, before the id is committed
    return value if re.fullmatch(r"[0-9a-f]{32}", value) and not _placeholder(value) else ""


def cpu_serial(path: Path = CPUINFO) -> str:
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "Serial":
            value = value.strip().lower()
            return "" if not value or _placeholder(value) else value
    return ""


def product_uuid(path: Path = PRODUCT_UUID) -> str:
    value = _first_line(path).lower()
    if not value or _placeholder(value) or value in _PLACEHOLDER_UUIDS:
        return ""
    return value


def sources() -> dict[str, str]:
    """The sources present on this machine, name -> normalized value, in ORDER."""
    values = {
        "mac": mac_address(),
        "machine-id": machine_id(),
        "cpu-serial": cpu_serial(),
        "product-uuid": product_uuid(),
    }
    return {name: values[name] for name in ORDER if values[name]}


def combine(values: Mapping[str, str]) -> str:
    """The fingerprint of these source values (the rule in the module docstring); "" if none."""
    present = [(name, values[name]) for name in ORDER if values.get(name)]
    if not present:
        return ""
    text = VERSION_LINE + "".join(f"{name}={value}\n" for name, value in present)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def fingerprint() -> str:
    """This machine's fingerprint, "sha256:" + 64 hex digits ("" if no source is readable)."""
    return combine(sources())


# -- `module-ingest fingerprint` ------------------------------------------------


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("fingerprint", help="print this machine's hardware fingerprint")
    p.add_argument("--json", action="store_true", help="the fingerprint and its sources as JSON")
    p.set_defaults(func=cmd_fingerprint)


def cmd_fingerprint(args, config) -> int:
    values = sources()
    result = combine(values)
    if args.json:
        print(json.dumps({"fingerprint": result, "sources": values}))
    elif result:
        print(result)
    if not result:
        print(
            "module-ingest: fingerprint: no hardware identifier is readable here "
            f"({', '.join(ORDER)})",
            file=sys.stderr,
        )
        return 1
    return 0
