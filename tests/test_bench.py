"""scripts/bench's modes at a tiny scale: they run to the end, account for every frame and
leave nothing behind. Behaviour only: the figures themselves depend on the machine."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench"), *args],
        capture_output=True,
        timeout=180,
        check=False,
    )


def bench(*args: str) -> dict:
    proc = run_bench(*args, "--json")
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return json.loads(proc.stdout)


PYTHON_SCRIPTS = sorted(
    p.name
    for p in (ROOT / "scripts").iterdir()
    if p.is_file() and p.read_bytes().startswith(b"#!/usr/bin/env python3")
)


def test_every_python_script_is_found():
    assert {"bench", "bench-subscribers", "fleet", "flood"} <= set(PYTHON_SCRIPTS)


@pytest.mark.parametrize("name", PYTHON_SCRIPTS)
def test_every_python_script_imports_and_prints_its_help(name):
    """What the test suite does not run at full scale must at least start: its imports
    (the benchmark helpers move between modules) and its argument parser."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), "--help"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert b"usage:" in proc.stdout


def test_load_acks_every_frame_and_removes_its_temp_dir(tmp_path):
    r = bench("load", "--connections", "2", "--frames", "500", "--workdir", str(tmp_path))
    assert r["mode"] == "load"
    assert r["frames_sent"] == 500
    assert r["frames_acked_total"] == 500
    assert r["frames_unacked"] == 0
    assert r["disk"]["frames"] == 500
    assert r["daemon"]["exit_code"] == 0
    assert list(tmp_path.iterdir()) == []


def test_the_old_flag_form_fails_with_one_line_naming_the_subcommand():
    for old, new in (
        (["--fleet", "--rate", "200"], "scripts/bench fleet --rate 200"),
        (["--soak", "10"], "scripts/bench soak 10"),
        (["--connections", "100"], "scripts/bench load --connections 100"),
    ):
        proc = run_bench(*old)
        assert proc.returncode == 2
        lines = proc.stderr.decode().splitlines()
        assert len(lines) == 1 and lines[0].endswith(new), lines


def test_fleet_acks_every_frame_and_times_each_one():
    r = bench("fleet", "--connections", "20", "--rate", "200", "--duration", "1")
    assert r["frames_sent"] > 0
    assert r["frames_acked_total"] == r["frames_sent"]
    assert r["frames_unacked"] == 0
    assert r["latency_ms"]["samples"] == r["frames_sent"]
    assert r["lag_ms"]["samples"] == r["frames_sent"]
    assert r["daemon"]["cpu_us_per_frame"] > 0


def test_fleet_restart_loses_nothing_acked_and_stores_nothing_twice():
    r = bench("fleet-restart", "--connections", "20", "--rate", "200", "--duration", "1")
    check = r["check"]
    assert check["frames_acked_before_kill"] > 0
    assert check["lost_acked_before_kill"] == 0
    assert check["lost_acked_after_restart"] == 0
    assert check["stored_twice"] == 0
    assert r["restart"]["cores_welcomed"] == 20
    assert r["frames_unacked"] == 0


def test_the_store_check_finds_a_lost_and_a_doubled_frame(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from benchkit.restart import check_store

    # core "a": seqs 1-3 ACKed before the kill, 4-5 after; seq 3 is missing, seq 2 twice
    cores = [("a", 3, 5, 5, 0.0, 0.0, 0.0)]
    stored = Counter({("a", 1): 1, ("a", 2): 2, ("a", 4): 1, ("a", 5): 1})
    check = check_store(cores, stored)
    assert check["lost_acked_before_kill"] == 1
    assert check["lost_acked_after_restart"] == 0
    assert check["stored_twice"] == 1
