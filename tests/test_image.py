"""Packaging: scripts/build-image's .deb and rootfs overlay, and the systemd unit.

The image test builds both artifacts into tmp_path (a wheel, then the wheel and
its dependencies from PyPI installed with pip --target; no pip cache; the .deb
by debhelper), reads the .deb with dpkg-deb and lintian, unpacks the overlay
into a temporary root and runs the installed `module-ingest` from there with
the board's interpreter (/usr/bin/python3). Installing the .deb with dpkg and
running it under systemd is tests/test_rootfs.py's part.

`systemd-analyze verify` checks that the program in ExecStart= exists and is
executable, and loads the unit's dependencies (sysinit.target,
multi-user.target, ...). With --root=DIR both are looked up inside DIR, so the
test gives it a root holding the unit, an executable at /usr/bin/module-ingest
(the real launcher from the overlay, or a stand-in script) and a copy of this
machine's stock units. verify exits 0 on mere warnings (an unknown key, a bad
value), so the test also requires it to print nothing.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import ROOT

from appliance.cli import build_parser

UNIT = ROOT / "systemd/module-ingest.service"
PROVISION_UNIT = ROOT / "systemd/module-ingest-provision.service"
CONFIG = ROOT / "systemd/config.toml"
BOARD_PYTHON = Path("/usr/bin/python3")  # what the launcher runs
HOST_UNITS = next(
    (p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()),
    None,
)

BUILD_TOOLS = ("dpkg", "dpkg-deb", "dpkg-buildpackage", "dh", "dh_python3")  # .ci/debian-packages
needs_dpkg = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in BUILD_TOOLS),
    reason="needs " + ", ".join(BUILD_TOOLS),
)
needs_verify = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None or HOST_UNITS is None,
    reason="needs systemd-analyze and the stock units",
)


def run(*cmd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=120, check=False, **kwargs
    )


def board_python_ok() -> bool:
    if not BOARD_PYTHON.exists():
        return False
    result = run(BOARD_PYTHON, "-c", "import sys; print(sys.version_info >= (3, 11))")
    return result.stdout.strip() == "True"


def systemd_verify(root: Path) -> subprocess.CompletedProcess:
    """`systemd-analyze verify --root=root module-ingest.service` with the stock units added."""
    units = root / "usr/lib/systemd/system"
    units.mkdir(parents=True, exist_ok=True)
    for unit in HOST_UNITS.iterdir():
        if not unit.name.startswith("module-ingest") and not (units / unit.name).exists():
            if unit.is_symlink():
                (units / unit.name).symlink_to(os.readlink(unit))
            elif unit.is_file():
                shutil.copy(unit, units / unit.name)
    # --man=no: verify would run the host's man(1) for Documentation=man:module-ingest(1),
    # which is installed in `root` at most
    return run(
        "systemd-analyze",
        "verify",
        "--man=no",
        f"--root={root}",
        "module-ingest.service",
        "module-ingest-provision.service",
    )


@needs_verify
def test_unit_verifies(tmp_path):
    units = tmp_path / "usr/lib/systemd/system"
    units.mkdir(parents=True)
    shutil.copy(UNIT, units / "module-ingest.service")
    shutil.copy(PROVISION_UNIT, units / "module-ingest-provision.service")
    for program in ("usr/bin/module-ingest", "usr/libexec/module-ingest/provision"):
        (tmp_path / program).parent.mkdir(parents=True)
        (tmp_path / program).write_text("#!/bin/sh\n")
        (tmp_path / program).chmod(0o755)
    result = systemd_verify(tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_unit_settings():
    text = UNIT.read_text()
    settings = dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and line[0] != "#"
    )
    assert settings["Type"] == "notify"
    assert settings["Restart"] == "on-failure"
    assert settings["StateDirectory"] == "module-ingest"
    assert int(settings["LimitNOFILE"]) >= 16384 + 64  # the largest profile's max_connections
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert settings[key] == "yes", key
    assert settings["ProtectSystem"] == "strict"
    # pings stop after stall_seconds; systemd must not give up before that could happen
    watchdog_sec = float(settings["WatchdogSec"].removesuffix("s"))
    with open(CONFIG, "rb") as f:
        shipped = tomllib.load(f)
    assert shipped["watchdog"]["stall_seconds"] < watchdog_sec
    assert shipped["storage"]["data_dir"] == "/var/lib/module-ingest"
    assert shipped["auth"]["dev_identity"] is False


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> dict[str, Path]:
    if any(shutil.which(tool) is None for tool in BUILD_TOOLS):
        pytest.skip("needs " + ", ".join(BUILD_TOOLS))
    out = tmp_path_factory.mktemp("image")
    result = run(sys.executable, ROOT / "scripts/build-image", "--out", out, cwd=out)
    assert result.returncode == 0, result.stderr
    deb, overlay = (Path(line) for line in result.stdout.split())
    assert deb.parent == out and overlay.parent == out
    assert sorted(p.name for p in out.iterdir()) == sorted([deb.name, overlay.name])
    return {"deb": deb, "overlay": overlay, "out": out}


def project_version() -> str:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]


@needs_dpkg
def test_deb(image, tmp_path):
    deb = image["deb"]
    arch = run("dpkg", "--print-architecture").stdout.strip()
    fields = {}
    for name in ("Package", "Version", "Architecture", "Maintainer", "Depends", "Description"):
        fields[name] = run("dpkg-deb", "--field", deb, name).stdout.strip()
    assert fields["Package"] == "module-ingest"
    assert fields["Version"] == project_version()
    assert fields["Architecture"] == arch
    depends = [d.strip() for d in fields["Depends"].split(",")]
    assert "python3 (>= 3.11)" in depends
    assert any(re.fullmatch(r"libc6 \(>= [\d.]+\)", d) for d in depends), depends  # shlibs
    assert not [d for d in depends if d.startswith("python3-")], depends  # bundled, not Debian's
    assert fields["Maintainer"] and fields["Description"]
    assert deb.name == f"module-ingest_{project_version()}_{arch}.deb"

    conffiles = run("dpkg-deb", "--info", deb, "conffiles").stdout.split()
    assert conffiles == ["/etc/module-ingest/config.toml"]

    listing = run("dpkg-deb", "--contents", deb).stdout.splitlines()
    entries = {}
    for line in listing:
        mode, owner, *_, path = line.split(None, 5)
        entries[path.split(" -> ")[0]] = (mode, owner)
    expect = {
        "./usr/bin/module-ingest": "-rwxr-xr-x",
        "./lib/systemd/system/module-ingest.service": "-rw-r--r--",
        "./lib/systemd/system/module-ingest-provision.service": "-rw-r--r--",
        "./usr/libexec/module-ingest/provision": "-rwxr-xr-x",
        "./etc/module-ingest/identities.d/": "drwxr-xr-x",
        "./usr/lib/sysusers.d/module-ingest.conf": "-rw-r--r--",
        "./usr/lib/tmpfiles.d/module-ingest.conf": "-rw-r--r--",
        "./etc/module-ingest/config.toml": "-rw-r-----",
        "./usr/share/man/man1/module-ingest.1.gz": "-rw-r--r--",
        "./usr/share/doc/module-ingest/changelog.gz": "-rw-r--r--",
        "./usr/share/doc/module-ingest/copyright": "-rw-r--r--",
        "./usr/share/module-ingest/models/tiny.tflite": "-rw-r--r--",
        "./usr/lib/module-ingest/appliance/cli.py": "-rw-r--r--",
        "./usr/lib/module-ingest/hw/notify.py": "-rw-r--r--",
        "./usr/lib/module-ingest/psutil/__init__.py": "-rw-r--r--",
        "./usr/lib/module-ingest/getmac/__init__.py": "-rw-r--r--",
        "./usr/lib/module-ingest/serial/__init__.py": "-rw-r--r--",
    }
    for path, mode in expect.items():
        assert entries.get(path) == (mode, "root/root"), path
    assert all(owner == "root/root" for _, owner in entries.values())
    # bytecode is made at install (py3compile), the state dir by systemd-tmpfiles
    assert not [p for p in entries if "__pycache__" in p or p.endswith(".pyc")]
    assert not [p for p in entries if p.startswith("./var/")]

    data = tmp_path / "data"
    assert run("dpkg-deb", "--extract", deb, data).returncode == 0
    # the files are the checkout's, byte for byte
    units = data / "lib/systemd/system"
    assert (units / "module-ingest.service").read_bytes() == UNIT.read_bytes()
    assert (units / "module-ingest-provision.service").read_bytes() == PROVISION_UNIT.read_bytes()
    assert (data / "etc/module-ingest/config.toml").read_bytes() == CONFIG.read_bytes()
    # the example model, also where a relative `model = "models/..."` in the config looks
    models = "/usr/share/module-ingest/models"
    assert (data / models.lstrip("/") / "tiny.tflite").read_bytes() == (
        ROOT / "models/tiny.tflite"
    ).read_bytes()
    assert os.readlink(data / "etc/module-ingest/models") == models
    # psutil's extension is stripped (dh_strip): no symbol table left
    (extension,) = (data / "usr/lib/module-ingest/psutil").glob("_psutil_linux*.so")
    assert ".symtab" not in run("readelf", "--section-headers", extension).stdout
    tmpfiles = (data / "usr/lib/tmpfiles.d/module-ingest.conf").read_text().splitlines()
    assert "d /var/lib/module-ingest 0700 module-ingest module-ingest -" in tmpfiles
    assert "z /etc/module-ingest/config.toml 0640 root module-ingest -" in tmpfiles

    # maintainer scripts: debhelper's, valid sh, no systemctl but daemon-reload
    control = tmp_path / "control"
    assert run("dpkg-deb", "--control", deb, control).returncode == 0
    for script in ("postinst", "prerm", "postrm"):
        assert os.access(control / script, os.X_OK), script
        syntax = run("sh", "-n", control / script)
        assert syntax.returncode == 0, (script, syntax.stderr)
        for line in (control / script).read_text().splitlines():
            assert "systemctl" not in line or "daemon-reload" in line, (script, line)
    postinst = (control / "postinst").read_text()
    for step in ("systemd-sysusers", "py3compile", "systemd-tmpfiles", "deb-systemd-helper"):
        assert step in postinst, step
    assert "py3clean" in (control / "prerm").read_text()


@needs_dpkg
@pytest.mark.skipif(shutil.which("lintian") is None, reason="needs lintian")
def test_lintian_finds_no_error_or_warning(image):
    result = run("lintian", "--fail-on", "error,warning", "--tag-display-limit", "0", image["deb"])
    tags = [line for line in result.stdout.splitlines() if line[:2] in ("E:", "W:")]
    assert (result.returncode, tags) == (0, []), result.stdout + result.stderr


def leaf_commands(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """'module-ingest identity add', ...: every command line that ends in a leaf subparser."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += leaf_commands(sub, f"{path} {name}") or [f"{path} {name}"]
    return out


@needs_dpkg
@pytest.mark.skipif(shutil.which("man") is None, reason="needs man-db")
def test_manpage_covers_every_command(image, tmp_path):
    assert run("dpkg-deb", "--extract", image["deb"], tmp_path).returncode == 0
    page = tmp_path / "usr/share/man/man1/module-ingest.1.gz"
    source = gzip.decompress(page.read_bytes()).decode()
    sections = set(re.findall(r'^\.SS "(.*)"$', source, re.MULTILINE))
    commands = leaf_commands(build_parser(), "module-ingest")
    assert {c.replace("-", "\\-") for c in commands} <= sections, sections
    shown = run("man", "--warnings", "-l", page, env={**os.environ, "MANWIDTH": "80"})
    assert (shown.returncode, shown.stderr) == (0, ""), shown.stderr
    assert "module-ingest identity add" in shown.stdout


def test_build_is_reproducible(image, tmp_path):
    """Two builds of the same tree give the same bytes (the rootfs cache is keyed by them)."""
    again = run(sys.executable, ROOT / "scripts/build-image", "--out", tmp_path, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    for first, second in zip([image["deb"], image["overlay"]], again.stdout.split(), strict=True):
        assert Path(second).read_bytes() == first.read_bytes(), second


@needs_dpkg
def test_overlay_runs_the_installed_cli(image, tmp_path):
    overlay = image["overlay"]
    listing = run("tar", "-tvzf", overlay, "--numeric-owner").stdout.splitlines()
    names = [line.split()[5] for line in listing]
    assert all(line.split()[1] == "0/0" for line in listing), listing[:5]
    # own entries only: unpacking must not touch shared directories or merged-/usr links
    for shared in ("usr/", "usr/lib/", "usr/bin/", "etc/", "var/", "var/lib/", "lib/"):
        assert shared not in names, shared
    assert "etc/systemd/system/multi-user.target.wants/module-ingest.service" in names

    root = tmp_path / "root"
    root.mkdir()
    result = run("tar", "-xpzf", overlay, "-C", root)
    assert result.returncode == 0, result.stderr
    # the .deb's files; the user, the state dir and the config's group come at first boot
    assert (root / "etc/module-ingest/config.toml").stat().st_mode & 0o777 == 0o640
    assert (root / "usr/lib/sysusers.d/module-ingest.conf").is_file()
    assert (root / "usr/lib/tmpfiles.d/module-ingest.conf").is_file()
    wants = root / "etc/systemd/system/multi-user.target.wants/module-ingest.service"
    assert os.readlink(wants) == "/lib/systemd/system/module-ingest.service"

    if not board_python_ok():
        pytest.skip(f"the launcher runs {BOARD_PYTHON}, which is missing or older than 3.11")
    launcher = root / "usr/bin/module-ingest"
    config = root / "etc/module-ingest/config.toml"
    # nothing from this environment: no PYTHONPATH, no MODULE_INGEST_*; run from the checkout,
    # whose appliance/ must not shadow the installed one (the launcher runs python3 -P)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LC_ALL": "C.UTF-8"}

    version = run(launcher, "--version", env=env, cwd=ROOT)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"module-ingest {project_version()}"

    for args in (["--config", config], []):  # explicit, then the launcher's default
        shown = run(launcher, *args, "config", "show", env=env, cwd=ROOT)
        assert shown.returncode == 0, shown.stderr
        first = shown.stdout.splitlines()[0]
        assert re.fullmatch(r"# effective configuration \(from (.*)\)", first), first
        assert Path(first[len("# effective configuration (from ") : -1]).resolve() == config
        effective = tomllib.loads(shown.stdout)
        assert effective["storage"]["data_dir"] == "/var/lib/module-ingest"
        assert effective["server"]["listen"] == "0.0.0.0:7878"
        assert effective["auth"]["dev_identity"] is False
        assert effective["log"]["format"] == "logfmt"

    # the code and its dependencies come from the overlay, for the board's interpreter
    probe = run(
        BOARD_PYTHON,
        "-P",
        "-s",
        "-c",
        "import appliance, getmac, psutil, serial; print(appliance.__file__)",
        env={**env, "PYTHONPATH": str(root / "usr/lib/module-ingest")},
        cwd=ROOT,
    )
    assert probe.returncode == 0, probe.stderr
    assert Path(probe.stdout.strip()).is_relative_to(root)

    if shutil.which("systemd-analyze") and HOST_UNITS is not None:
        verified = systemd_verify(root)  # the installed unit, with the real launcher
        assert (verified.returncode, verified.stdout, verified.stderr) == (0, "", "")
