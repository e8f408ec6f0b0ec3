"""The hardware fingerprint: format, stability, the documented combination, each source."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from hw import fingerprint as fp

FORMAT = re.compile(r"sha256:[0-9a-f]{64}")


def test_format_and_sources():
    sources = fp.sources()
    result = fp.fingerprint()
    if not sources:
        assert result == ""
        pytest.skip("no hardware identifier is readable on this machine")
    assert FORMAT.fullmatch(result), result
    assert list(sources) == [name for name in fp.ORDER if name in sources]
    assert all(value and value == value.strip() for value in sources.values())


def test_stable_across_calls_and_processes():
    first = fp.fingerprint()
    assert fp.fingerprint() == first
    other = subprocess.run(
        [sys.executable, "-c", "from hw.fingerprint import fingerprint; print(fingerprint())"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
        check=True,
    )
    assert other.stdout.strip() == first


def test_the_documented_combination():
    values = {"mac": "dc:a6:32:01:02:03", "machine-id": "3d1219c7c4c5404aaa1f6d2a48adfda4"}
    text = (
        "module-ingest-fingerprint-v1\n"
        "mac=dc:a6:32:01:02:03\n"
        "machine-id=3d1219c7c4c5404aaa1f6d2a48adfda4\n"
    )
    assert fp.combine(values) == "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    # the fixed order, not the dict's
    assert fp.combine(dict(reversed(values.items()))) == fp.combine(values)
    # this machine's value follows the same rule
    assert fp.fingerprint() == fp.combine(fp.sources())


def test_missing_sources_never_collide():
    value = "3d1219c7c4c5404aaa1f6d2a48adfda4"
    assert fp.combine({}) == ""
    assert fp.combine({"mac": ""}) == ""  # an empty value is a missing source
    assert fp.combine({"machine-id": value}) != fp.combine({"product-uuid": value})
    both = {"mac": "dc:a6:32:01:02:03", "machine-id": value}
    assert fp.combine(both) != fp.combine({"machine-id": value})


def test_machine_id(tmp_path):
    path = tmp_path / "machine-id"
    assert fp.machine_id(path) == ""  # missing
    path.write_text("3D1219C7C4C5404AAA1F6D2A48ADFDA4\n")
    assert fp.machine_id(path) == "3d1219c7c4c5404aaa1f6d2a48adfda4"
    for placeholder in ("uninitialized\n", "\n", "0" * 32 + "\n", "not an id\n"):
        path.write_text(placeholder)
        assert fp.machine_id(path) == "", placeholder


def test_cpu_serial(tmp_path):
    path = tmp_path / "cpuinfo"
    assert fp.cpu_serial(path) == ""
    path.write_text("processor\t: 0\nflags\t\t: fpu serial\n\n")  # no Serial line
    assert fp.cpu_serial(path) == ""
    path.write_text("processor\t: 0\nHardware\t: BCM2835\nSerial\t\t: 10000000ABCDEF01\n")
    assert fp.cpu_serial(path) == "10000000abcdef01"
    path.write_text("Serial\t\t: 0000000000000000\n")
    assert fp.cpu_serial(path) == ""


def test_product_uuid(tmp_path):
    path = tmp_path / "product_uuid"
    assert fp.product_uuid(path) == ""
    path.write_text("4C4C4544-0042-3510-8051-B7C04F4E3732\n")
    assert fp.product_uuid(path) == "4c4c4544-0042-3510-8051-b7c04f4e3732"
    for placeholder in (
        "00000000-0000-0000-0000-000000000000",
        "FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF",
        "03000200-0400-0500-0006-000700080009",
    ):
        path.write_text(placeholder + "\n")
        assert fp.product_uuid(path) == "", placeholder


def _interface(net: Path, name: str, *, device: bool = True, wireless: bool = False) -> None:
    (net / name).mkdir(parents=True)
    if device:
        (net / name / "device").mkdir()
    if wireless:
        (net / name / "wireless").mkdir()


def test_primary_interface(tmp_path):
    net = tmp_path / "net"
    assert fp.primary_interface(net) is None  # no /sys/class/net
    _interface(net, "lo", device=False)
    _interface(net, "docker0", device=False)
    assert fp.primary_interface(net) is None  # nothing hardware-backed
    _interface(net, "wlan0", wireless=True)
    assert fp.primary_interface(net) == "wlan0"
    _interface(net, "eth1")
    _interface(net, "eth0")
    assert fp.primary_interface(net) == "eth0"  # wired first, then by name


def test_mac_address_format():
    mac = fp.mac_address()
    assert mac == "" or re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", mac)


def test_fingerprint_subcommand(capsys):
    parser = argparse.ArgumentParser(prog="module-ingest")
    fp.add_parser(parser.add_subparsers(dest="command"))
    expected = fp.fingerprint()

    args = parser.parse_args(["fingerprint"])
    code = args.func(args, None)
    out, err = capsys.readouterr()
    if expected:
        assert (code, out, err) == (0, expected + "\n", "")
    else:
        assert code == 1 and out == "" and "no hardware identifier" in err

    args = parser.parse_args(["fingerprint", "--json"])
    code = args.func(args, None)
    out, _ = capsys.readouterr()
    assert json.loads(out) == {"fingerprint": expected, "sources": fp.sources()}
    assert code == (0 if expected else 1)
