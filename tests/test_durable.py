"""durable.py: atomic replacement, CRC-checked JSON, durable mkdir -p."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys

import pytest
from conftest import ROOT

from appliance.durable import (
    ChecksumError,
    make_dirs,
    read_checked_json,
    write_atomic,
    write_checked_json,
)


def test_write_atomic_replaces_the_file_whole_with_mode_0600_and_leaves_no_temp(tmp_path):
    path = tmp_path / "state"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    write_atomic(path, b"new" * 100_000)
    assert path.read_bytes() == b"new" * 100_000
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["state"]


def test_write_atomic_replaces_a_planted_link_instead_of_writing_through_it(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link = tmp_path / "state"
    link.symlink_to(victim)
    write_atomic(link, b"ours")
    assert victim.read_bytes() == b"precious"
    assert not link.is_symlink() and link.read_bytes() == b"ours"


def test_write_atomic_crashes_leave_one_temp_that_the_next_write_takes_over(tmp_path):
    path = tmp_path / "state"
    write_atomic(path, b"first")
    crash = (
        "import os, signal, sys\n"
        "from appliance.durable import write_atomic\n"
        "write_atomic(sys.argv[1], b'torn' * 1000, prepare=lambda fd: os.kill(os.getpid(), 9))\n"
    )
    for _ in range(3):  # killed after writing its temp file, before the rename
        done = subprocess.run([sys.executable, "-c", crash, str(path)], cwd=ROOT, check=False)
        assert done.returncode == -signal.SIGKILL
        assert path.read_bytes() == b"first"
    assert sorted(os.listdir(tmp_path)) == [".state.tmp", "state"]  # one, not three
    write_atomic(path, b"second")
    assert path.read_bytes() == b"second"
    assert os.listdir(tmp_path) == ["state"]


def test_write_atomic_refuses_a_link_planted_as_its_temp_file(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / ".state.tmp").symlink_to(victim)
    with pytest.raises(OSError):
        write_atomic(tmp_path / "state", b"ours")
    assert victim.read_bytes() == b"precious"
    assert not (tmp_path / "state").exists()


def test_checked_json_round_trips_and_refuses_any_damage(tmp_path):
    path = tmp_path / "x.meta"
    write_checked_json(path, {"version": 1, "position": [3, 4096]})
    assert read_checked_json(path) == {"version": 1, "position": [3, 4096]}
    good = path.read_bytes()
    for i in range(len(good) - 1):  # every byte but the final newline
        damaged = bytearray(good)
        damaged[i] ^= 0x01
        path.write_bytes(bytes(damaged))
        with pytest.raises(ChecksumError):
            read_checked_json(path)
    path.write_bytes(good[: len(good) // 2])  # torn
    with pytest.raises(ChecksumError):
        read_checked_json(path)


def test_make_dirs_creates_every_missing_level_0700_and_keeps_existing_ones(tmp_path):
    (tmp_path / "a").mkdir(mode=0o755)
    made = make_dirs(tmp_path / "a" / "b" / "c")
    assert made.is_dir()
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o755  # existed: left alone
    for level in ("a/b", "a/b/c"):
        assert stat.S_IMODE((tmp_path / level).stat().st_mode) == 0o700
    assert make_dirs(made) == made  # already there
