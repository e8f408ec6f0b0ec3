"""The board image under real systemd: `scripts/build-image --rootfs`, booted with systemd-nspawn.

Needs root and the Debian packages in .ci/debian-packages (mmdebstrap,
systemd-container, debhelper, ...); skipped without them. The root file
system (bookworm minbase + systemd + the .deb, board profile zynq for its
small segments) takes about 40 s to build; it is cached in build/rootfs-cache/
under the SHA-256 of the .deb and of scripts/build-image (the .deb is
reproducible, so an unchanged tree reuses it) and older entries are removed.

Each test boots its own container from the cache:

    systemd-nspawn -D ROOTFS -b --register=no --keep-unit --volatile=overlay --private-network

--volatile=overlay keeps every write in a tmpfs, so the cached tree stays
pristine and every boot is a first boot; --private-network gives the
container its own loopback, where the daemon listens on 0.0.0.0:7878 and the
test's core (`module-ingest send`, the client library) connects from inside.
Commands run inside through `nsenter -t PID_OF_ITS_SYSTEMD -a`; the
container's systemd, journald and systemd-analyze are the judges. A drop-in
bound into the container sets SystemCallErrorNumber=kill, so a system call
the unit's filter refuses kills the daemon (status=31/SYS) instead of
failing quietly with EPERM. Every container is shut down (SIGTERM to nspawn,
SIGKILL after a deadline) when its test ends, pass or fail.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, wait_for

from appliance.cli import build_parser

CACHE = ROOT / "build/rootfs-cache"
BOARD = "zynq"  # 8 MiB segments: the container's tmpfs holds less than with 64 MiB
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
UNIT = "module-ingest.service"
SYSCALL_KILL = """\
[Service]
# test only: a call the system-call filter refuses kills the process (SIGSYS)
# instead of returning EPERM, so no refused call goes unnoticed
SystemCallErrorNumber=kill
"""
BOOT_TIMEOUT = 60.0
EXPOSURE = 2.0  # the most `systemd-analyze security` may report (1.8 when last measured)
LOGFMT = re.compile(r'ts=\S+ level=(debug|info|warning|error) logger=\S+ msg=("[^"]*"|\S+)')

TOOLS = ("mmdebstrap", "systemd-nspawn", "nsenter", "dpkg-buildpackage", "dh_python3", "zstd")
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or any(shutil.which(tool) is None for tool in TOOLS),
    reason="needs root and " + ", ".join(TOOLS),
)


def run(*cmd, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kwargs,
    )


def build_image(*args) -> list[Path]:
    result = run(sys.executable, ROOT / "scripts/build-image", *args, timeout=900)
    assert result.returncode == 0, result.stderr
    return [Path(line) for line in result.stdout.split()]


@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    return build_image("--out", out)[0]


@pytest.fixture(scope="module")
def image(deb) -> Path:
    """CACHE/KEY/ with rootfs/ and rootfs.tar.zst, built from `deb` if not cached. The key is
    the SHA-256 of the .deb and of build-image, which makes the rest of the tree."""
    key = hashlib.sha256(deb.read_bytes() + (ROOT / "scripts/build-image").read_bytes()).hexdigest()
    cached = CACHE / key
    if not cached.is_dir():
        building = CACHE / f".building-{key}-{os.getpid()}"
        building.mkdir(parents=True)
        try:
            build_image(
                *("--deb", deb, "--board", BOARD, "--out", deb.parent),
                *("--rootfs", building / "rootfs", "--rootfs-tar", building / "rootfs.tar.zst"),
            )
            building.rename(cached)  # whole or not at all
        finally:
            shutil.rmtree(building, ignore_errors=True)
    for old in CACHE.iterdir():  # older trees, and builds whose process is gone
        building_pid = old.name.rsplit("-", 1)[-1] if old.name.startswith(".building-") else ""
        if old != cached and not (building_pid and Path(f"/proc/{building_pid}").exists()):
            shutil.rmtree(old)
    return cached


@pytest.fixture(scope="module")
def rootfs(image) -> Path:
    return image / "rootfs"


class Container:
    """A booted systemd-nspawn container of the root file system."""

    def __init__(self, rootfs: Path, workdir: Path, binds: dict[Path, str]) -> None:
        self.workdir = workdir
        self.console = workdir / "console.log"
        dropin = workdir / "dropin"
        dropin.mkdir()
        (dropin / "test-syscall-kill.conf").write_text(SYSCALL_KILL)
        binds = {dropin: f"/etc/systemd/system/{UNIT}.d", **binds}
        cmd = [
            "systemd-nspawn",
            f"--directory={rootfs}",
            "--boot",
            "--register=no",
            "--keep-unit",
            "--volatile=overlay",
            "--private-network",
            f"--machine=mi-test-{os.getpid()}-{workdir.name[-20:]}",
            *(f"--bind={src}:{dst}" for src, dst in binds.items()),
        ]
        with open(self.console, "wb") as console:
            self.nspawn = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT
            )
        self.init = 0
        try:
            self.init = wait_for(self._find_init, 30, "the container's systemd", interval=0.05)
            wait_for(self._booted, BOOT_TIMEOUT, "the container to boot", interval=0.1)
        except BaseException:
            self.stop()
            raise

    def _find_init(self) -> int:
        """The container's PID 1 (pid 1 in its own namespace, running systemd), or 0."""
        for entry in os.listdir("/proc"):
            try:
                status = Path(f"/proc/{entry}/status").read_text()
                comm = Path(f"/proc/{entry}/comm").read_text().strip()
            except OSError:
                continue
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            pid1 = fields.get("NSpid", "").split()[-1:] == ["1"]
            if fields.get("PPid") == str(self.nspawn.pid) and comm == "systemd" and pid1:
                return int(entry)
        if self.nspawn.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited: {self.console.read_text()[-2000:]}")
        return 0

    def _booted(self) -> bool:
        state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
        return state in ("running", "degraded")

    def run(self, *cmd, user: str | None = None, input: str | None = None, check: bool = True):
        """`cmd` inside the container (as `user` when given), with a clean environment."""
        prefix = ["nsenter", "-t", self.init, "-a", "env", "-i", f"PATH={PATH}", "LANG=C.UTF-8"]
        if user:
            prefix += ["runuser", "-u", user, "--"]
        result = run(*prefix, *cmd, input=input, timeout=120)
        if check:
            assert result.returncode == 0, (cmd, result.stdout, result.stderr)
        return result

    def show(self, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", UNIT, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self) -> list[dict]:
        out = self.run("journalctl", f"--unit={UNIT}", "--output=json", "--no-pager").stdout
        entries = [json.loads(line) for line in out.splitlines() if line]
        for entry in entries:  # journald gives a non-UTF-8 message as a list of bytes
            if isinstance(entry.get("MESSAGE"), list):
                entry["MESSAGE"] = bytes(entry["MESSAGE"]).decode(errors="replace")
        return entries

    def stop(self) -> None:
        """Shut the container down (nspawn turns SIGTERM into a clean poweroff)."""
        if self.nspawn.poll() is None:
            self.nspawn.send_signal(signal.SIGTERM)
            try:
                self.nspawn.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait()
        if self.init and Path(f"/proc/{self.init}").exists():
            os.kill(self.init, signal.SIGKILL)  # its pid namespace, and all in it, goes too


@pytest.fixture
def boot(rootfs, tmp_path):
    """boot(binds={host_dir: container_path}) -> a booted Container; all stopped at the end."""
    containers = []

    def start(binds: dict[Path, str] | None = None) -> Container:
        workdir = tmp_path / f"container-{len(containers)}"
        workdir.mkdir()
        containers.append(Container(rootfs, workdir, binds or {}))
        return containers[-1]

    yield start
    for container in containers:
        container.stop()


def seconds(timespan: str) -> float:
    """A systemd timespan as `systemctl show` prints it ("20s", "1min 30s", "500ms")."""
    units = {"min": 60.0, "s": 1.0, "ms": 0.001, "us": 0.000001}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(min|ms|us|s)", timespan))


def wait_running(box: Container, timeout: float = 30, restarts: int = 0) -> dict[str, str]:
    """The unit's state once it is active (running) after at least `restarts` restarts."""

    def running():
        state = box.show("ActiveState", "SubState", "MainPID", "NRestarts", "StatusText")
        up = (state["ActiveState"], state["SubState"]) == ("active", "running")
        return state if up and int(state["NRestarts"]) >= restarts else {}

    return wait_for(running, timeout, f"{UNIT} active (running)", interval=0.2)


def add_core(box: Container, ident: str) -> str:
    out = box.run(
        "module-ingest",
        "identity",
        "add",
        ident,
        "--kind=core",
        "--module=m-test",
        "--channels=1",
        user="module-ingest",
    ).stdout
    return json.loads(out)["token"]


def send(box: Container, ident: str, token: str, payloads: list[str]) -> dict:
    """`module-ingest send` inside: a core on the container's loopback, the client library."""
    result = box.run(
        "env",
        f"MODULE_INGEST_TOKEN={token}",
        "module-ingest",
        "send",
        f"--id={ident}",
        "--channel=1",
        "--connect=127.0.0.1:7878",
        input="".join(p + "\n" for p in payloads),
    )
    return json.loads(result.stdout)


def stored(box: Container, ident: str) -> list[str]:
    """The payloads stored for `ident`, read from the log files by `module-ingest dump`."""
    out = box.run("module-ingest", "dump", f"--identity={ident}", user="module-ingest").stdout
    return [base64.b64decode(json.loads(line)["payload_b64"]).decode() for line in out.splitlines()]


def daemon_lines(box: Container) -> list[str]:
    """What the daemon wrote to stdout (journald), not systemd's lines about the unit."""
    return [e["MESSAGE"] for e in box.journal() if e.get("SYSLOG_IDENTIFIER") == "module-ingest"]


def assert_no_syscall_kill(box: Container) -> None:
    killed = [e["MESSAGE"] for e in box.journal() if "status=31/SYS" in e["MESSAGE"]]
    assert not killed, f"the system-call filter refused a call: {killed}"


def test_ready_streams_and_stats(boot):
    box = boot()
    state = wait_running(box)
    # the image boots clean: no failed unit anywhere
    assert box.run("systemctl", "is-system-running", check=False).stdout.strip() == "running"
    assert box.show("Type")["Type"] == "notify"  # so active (running) came with READY=1
    status = box.run("systemctl", "status", UNIT, "--no-pager", check=False).stdout
    assert re.search(r'Status: "\d+ connections, [\d.]+ frames/s', status), status

    # the daemon runs from the installed files, as the service user
    main = state["MainPID"]
    assert box.run("stat", "-c", "%U", f"/proc/{main}").stdout.strip() == "module-ingest"
    cmdline = box.run("cat", f"/proc/{main}/cmdline").stdout.split("\0")
    assert cmdline[:5] == ["/usr/bin/python3", "-P", "-s", "-m", "appliance"], cmdline
    # no development identity; the config 0640 root:module-ingest
    assert box.run("module-ingest", "identity", "list", user="module-ingest").stdout == ""
    assert box.run("ls", "/var/lib/module-ingest").stdout.split().count("dev-credentials.json") == 0
    mode = box.run("stat", "-c", "%a %U:%G", "/etc/module-ingest/config.toml").stdout.strip()
    assert mode == "640 root:module-ingest"

    token = add_core(box, "m-test/core-0")
    payloads = [f"frame-{i}" for i in range(200)]
    assert send(box, "m-test/core-0", token, payloads) == {
        "sent": 200,
        "acked_seq": 200,
        "rejected": 0,
    }
    stats = json.loads(box.run("module-ingest", "stats", "--format=json", "--identities").stdout)
    assert stats["identities"]["m-test/core-0"]["frames"] == 200
    assert stats["board"] == BOARD
    human = box.run("module-ingest", "stats", "--identities").stdout
    assert re.search(r"m-test/core-0\s+200 frames", human), human
    assert "m-test/core-0" not in box.run("module-ingest", "stats").stdout
    assert stored(box, "m-test/core-0") == payloads
    assert box.show("NRestarts")["NRestarts"] == "0"
    assert_no_syscall_kill(box)


def test_watchdog_restarts_a_stopped_daemon_and_keeps_the_frames(boot):
    box = boot()
    before = wait_running(box)
    limits = box.show("WatchdogUSec", "RestartUSec")
    watchdog, restart = seconds(limits["WatchdogUSec"]), seconds(limits["RestartUSec"])
    assert watchdog > 0
    token = add_core(box, "m-test/core-1")
    payloads = [f"before-stop-{i}" for i in range(100)]
    assert send(box, "m-test/core-1", token, payloads)["acked_seq"] == 100

    box.run("sh", "-c", 'kill -STOP "$1"', "sh", before["MainPID"])  # minbase has no kill(1)
    # the timeout comes at most WatchdogSec after the last ping, then RestartSec; the new
    # process gets a few seconds more for its start-up on a loaded machine
    after = wait_running(box, watchdog + restart + 10, restarts=1)
    assert after["MainPID"] != before["MainPID"]
    messages = [e["MESSAGE"] for e in box.journal()]
    assert any("Watchdog timeout" in m for m in messages), messages[-20:]
    assert stored(box, "m-test/core-1") == payloads  # every ACKed frame survived the kill
    assert_no_syscall_kill(box)


def test_stop_is_clean_and_the_journal_holds_logfmt(boot):
    box = boot()
    wait_running(box)
    token = add_core(box, "m-test/core-2")
    assert send(box, "m-test/core-2", token, ["a", "b", "c"])["acked_seq"] == 3
    box.run("systemctl", "stop", UNIT)
    state = box.show(
        "ActiveState",
        "Result",
        "ExecMainCode",
        "ExecMainStatus",
        "ActiveExitTimestampMonotonic",
        "InactiveEnterTimestampMonotonic",
        "TimeoutStopUSec",
    )
    assert (state["ActiveState"], state["Result"]) == ("inactive", "success"), state
    assert (state["ExecMainCode"], state["ExecMainStatus"]) == ("1", "0"), state  # exited 0
    took = int(state["InactiveEnterTimestampMonotonic"]) - int(
        state["ActiveExitTimestampMonotonic"]
    )
    assert took / 1e6 < seconds(state["TimeoutStopUSec"]), state

    lines = daemon_lines(box)
    assert any("listening on" in line for line in lines), lines
    assert all(LOGFMT.match(line) for line in lines), [x for x in lines if not LOGFMT.match(x)]
    everything = "\n".join(e["MESSAGE"] for e in box.journal())
    assert "Traceback" not in everything
    assert_no_syscall_kill(box)


def test_hardening_exposure(boot):
    box = boot()
    wait_running(box)
    report = box.run("systemd-analyze", "security", UNIT, "--no-pager").stdout
    level = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", report)
    assert level, report[-500:]
    # README ("systemd and the watchdog") states the figure; keep it there when this changes
    assert float(level[1]) <= EXPOSURE, level[0]
    assert_no_syscall_kill(box)


def test_dpkg_purge_and_reinstall_under_systemd(boot, deb):
    box = boot(binds={deb.parent: "/mnt/deb"})
    wait_running(box)
    lib = "/usr/lib/module-ingest"
    pycache = box.run("find", lib, "-name", "*.pyc").stdout.split()
    assert pycache, "py3compile made no bytecode at install"

    box.run("dpkg", "--purge", "module-ingest")
    assert box.show("LoadState")["LoadState"] == "not-found"
    assert box.run("test", "-e", lib, check=False).returncode != 0  # bytecode and all gone
    wants = "/etc/systemd/system/multi-user.target.wants/module-ingest.service"
    assert box.run("test", "-L", wants, check=False).returncode != 0
    box.run("test", "-d", "/var/lib/module-ingest")  # the frames stay

    box.run("dpkg", "--install", f"/mnt/deb/{deb.name}")
    state = wait_running(box)  # the postinst started it (deb-systemd-invoke)
    assert box.run("stat", "-c", "%U", f"/proc/{state['MainPID']}").stdout.strip() == (
        "module-ingest"
    )
    box.run("test", "-L", wants)
    assert box.run("find", lib, "-name", "*.pyc").stdout.split()
    assert_no_syscall_kill(box)


def test_rootfs_tar_holds_the_tree(image):
    tar = ("tar", "--zstd", "--numeric-owner", "--quoting-style=literal", "--file")
    listing = run(*tar, image / "rootfs.tar.zst", "--list")
    assert listing.returncode == 0, listing.stderr
    names = {line.removeprefix("./").rstrip("/") for line in listing.stdout.splitlines()}
    tree = image / "rootfs"
    walked = set()
    for dirpath, dirnames, filenames in os.walk(tree):
        rel = Path(dirpath).relative_to(tree)
        walked |= {str(rel / name) for name in dirnames + filenames}
    assert names - {""} == walked

    def entry(name: str) -> list[str]:
        shown = run(*tar, image / "rootfs.tar.zst", "--list", "--verbose", f"./{name}")
        return shown.stdout.split()

    gid = (tree / "etc/module-ingest/config.toml").stat().st_gid
    assert entry("etc/module-ingest/config.toml")[:2] == ["-rw-r-----", f"0/{gid}"]
    wants = entry("etc/systemd/system/multi-user.target.wants/module-ingest.service")
    assert wants[0].startswith("l") and wants[-1] == "/lib/systemd/system/module-ingest.service"


def has_identity_import() -> bool:
    """`module-ingest identity import` (issue 11, part 1), which provisioning is built on."""
    (identity,) = [
        sub
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
        for name, sub in action.choices.items()
        if name == "identity"
    ]
    return any(
        "import" in action.choices
        for action in identity._actions
        if isinstance(action, argparse._SubParsersAction)
    )


@pytest.mark.skipif(not has_identity_import(), reason="needs `module-ingest identity import`")
def test_first_start_imports_the_identity_files_once(boot, tmp_path):
    drop = tmp_path / "identities.d"
    drop.mkdir()
    (drop / "cores.csv").write_text(
        'id,kind,module,channels,fingerprint,mac\nm-9,module,,,,\nm-9/core-0,core,m-9,"1,2",,\n'
    )
    (drop / "more.jsonl").write_text(
        json.dumps({"id": "m-9/core-1", "kind": "core", "module": "m-9", "channels": "1"}) + "\n"
    )
    (drop / "bad.csv").write_text("id,kind,colour\nm-9/core-2,core,red\n")  # an unknown key
    box = boot(binds={drop: "/etc/module-ingest/identities.d"})
    wait_running(box)

    listed = box.run("module-ingest", "identity", "list", user="module-ingest").stdout
    assert sorted(json.loads(line)["id"] for line in listed.splitlines()) == [
        "m-9",
        "m-9/core-0",
        "m-9/core-1",
    ]
    # imported files are moved aside; the bad one stays (all or nothing), and says why
    assert sorted(p.name for p in drop.iterdir()) == [
        "bad.csv",
        "cores.csv.imported",
        "more.jsonl.imported",
    ]
    provision = "module-ingest-provision.service"
    assert box.run("systemctl", "show", provision, "--property=Result").stdout.strip() == (
        "Result=exit-code"
    )
    log = box.run("journalctl", f"--unit={provision}", "--no-pager", "--output=cat").stdout
    assert "bad.csv not imported" in log and "colour" in log, log

    tokens_file = "/var/lib/module-ingest/provisioned/cores.csv.tokens.jsonl"
    assert box.run("stat", "-c", "%a %U", tokens_file).stdout.strip() == "600 module-ingest"
    tokens = {
        t["id"]: t["token"]
        for t in map(json.loads, box.run("cat", tokens_file).stdout.splitlines())
    }
    assert sorted(tokens) == ["m-9", "m-9/core-0"]
    assert send(box, "m-9/core-0", tokens["m-9/core-0"], ["provisioned"])["acked_seq"] == 1

    # once: the next start finds nothing new to import
    (drop / "bad.csv").unlink()
    box.run("systemctl", "restart", UNIT)
    wait_running(box)
    shown = box.run("systemctl", "show", provision, "--property=ConditionResult").stdout
    assert shown.strip() == "ConditionResult=no"
    log = box.run("journalctl", f"--unit={provision}", "--no-pager", "--output=cat").stdout
    assert log.count("provision: imported") == 2
