"""/proc and /sys probes for the benchmarks: CPU, memory and I/O of a process, the machine's
CPU and block devices. Linux only; every figure is read, nothing is written."""

from __future__ import annotations

import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    """Fields 3 ... of /proc/PID/stat (after the command name)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime, stime) of every thread of process `pid`, in seconds."""
    fields = _stat_fields(pid)
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK  # fields 14 and 15 of proc(5)


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid`, of its children it reaped and of those still running."""
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fields = _stat_fields(int(name))
        except OSError:
            continue  # exited meanwhile
        if int(name) == pid:
            total += sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
        elif int(fields[1]) == pid:  # ppid
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def children(pid: int) -> list[int]:
    """The running children of process `pid`."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if int(_stat_fields(int(name))[1]) == pid:
                    out.append(int(name))
            except OSError:
                continue  # exited meanwhile
    return out


def cpu_wait_seconds(pid: int) -> float:
    """How long the main thread of process `pid` was runnable but waiting for a CPU
    (/proc/PID/schedstat): what other processes on the machine cost it."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except OSError:
        return 0.0  # exited meanwhile


def tcp_counters() -> dict[str, int]:
    """The kernel's TCP extension counters (/proc/net/netstat, TcpExt): machine-wide."""
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        if head.startswith("TcpExt:"):
            return dict(zip(head.split()[1:], map(int, values.split()[1:]), strict=True))
    return {}


def machine_busy_seconds() -> float:
    """CPU time spent by every core on anything but idle and iowait, in seconds."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / CLK_TCK  # user ... steal, minus idle, iowait


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of process `pid`, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def proc_io(pid: int) -> dict[str, int]:
    """/proc/PID/io of process `pid` and its running children (the store's writer process
    writes the WAL): rchar, wchar, syscr, syscw, read_bytes, write_bytes,
    cancelled_write_bytes."""
    out: dict[str, int] = {}
    for each in (pid, *children(pid)):
        try:
            with open(f"/proc/{each}/io") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    out[key] = out.get(key, 0) + int(value)
        except OSError:
            continue  # a child that exited meanwhile
    return out


def block_device(path: Path) -> str | None:
    """MAJOR:MINOR of the block device holding `path`, None if it is not on one (tmpfs ...)."""
    dev = os.stat(path).st_dev
    name = f"{os.major(dev)}:{os.minor(dev)}"
    return name if os.path.exists(f"/sys/dev/block/{name}/stat") else None


def device_bytes_written(device: str | None) -> int | None:
    """Bytes written to a block device since boot, by anyone (field 7 of its stat: sectors)."""
    if device is None:
        return None
    with open(f"/sys/dev/block/{device}/stat") as f:
        return int(f.read().split()[6]) * 512


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def page_cache_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1])
    return 0
