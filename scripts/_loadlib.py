"""Helpers shared by the load generators (scripts/flood, scripts/fleet) and scripts/bench;
not part of the daemon. How a figure is printed is benchkit.report's."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import resource
import socket

from benchkit.errors import BenchError
from benchkit.report import count_text

from appliance.protocol import crypto


class LoadError(BenchError):
    """A load generator cannot go on; the message is one line."""


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def add_generator_options(p: argparse.ArgumentParser, each: str) -> None:
    """The options flood and fleet share: the daemon, the identities (one `each`), the
    frames, the worker processes, --json."""
    p.add_argument(
        "--connect", required=True, metavar="HOST:PORT", help="the daemon (loopback only)"
    )
    p.add_argument(
        "--identities", required=True, metavar="FILE", help=f"JSON {{id: token}}; one {each} each"
    )
    p.add_argument(
        "--connections", type=int, metavar="N", help="use the first N identities (default: all)"
    )
    p.add_argument(
        "--payload", type=int, default=64, metavar="BYTES", help="DATA payload size (default 64)"
    )
    p.add_argument("--mac", choices=crypto.MAC_ALGORITHMS, default="hmac-sha256")
    p.add_argument("--channel", type=int, default=1, metavar="N", help="DATA channel (default 1)")
    p.add_argument("--procs", type=int, default=1, metavar="P", help="worker processes (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--handshake-timeout", type=float, default=60.0, metavar="S", help="default 60")


def connection_identities(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The identities of --identities to connect with (--connections of them), once the file
    descriptors they need are there."""
    limit = raise_nofile_limit()
    idents = load_identities(args.identities, args.connections)
    if len(idents) + 64 > limit:
        raise LoadError(
            f"{len(idents)} connections need more file descriptors than RLIMIT_NOFILE {limit}"
        )
    return idents


def stop_workers(workers: list) -> None:
    """Wait a little for each (process, pipe) worker to exit, then terminate it."""
    for proc, pipe in workers:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.terminate()
            proc.join()
        pipe.close()


def load_identities(path: str, count: int | None) -> list[tuple[str, str]]:
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        raise LoadError(f"--identities {path}: {exc}") from None
    if not isinstance(doc, dict) or not all(isinstance(v, str) for v in doc.values()):
        raise LoadError(f"--identities {path}: expected a JSON object {{id: token}}")
    items = list(doc.items())
    for ident, token in items:
        try:
            crypto.token_to_secret(token)
        except ValueError as exc:
            raise LoadError(f"--identities {path}: {ident}: {exc}") from None
    if count is not None:
        if count > len(items):
            raise LoadError(f"--connections {count}: {path} holds only {len(items)} identities")
        items = items[:count]
    if not items:
        raise LoadError(f"--identities {path}: no identities")
    return items


def loopback_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit():
        raise LoadError(f"--connect: expected HOST:PORT, got {text!r}")
    try:
        addr = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0][4][0]
    except OSError as exc:
        raise LoadError(f"--connect {text}: {exc}") from None
    if not ipaddress.ip_address(addr).is_loopback:
        raise LoadError(f"--connect {text}: the load generators only target loopback addresses")
    return addr, int(port)


def notify(fd: int | None, word: str) -> None:
    if fd is not None:
        os.write(fd, word.encode() + b"\n")


def summary_lines(result: dict) -> list[str]:
    """A flood result (the --json object) as readable lines; bench adds the daemon's."""
    conns = result["connections"]
    head = f"{conns} connections, {result['procs']} flood process(es)"
    lines = []
    if result["mode"] == "idle":
        lines.append(f"idle: {head}, all authenticated in {result['handshake_s']:.2f} s")
        lines.append(
            f"held {result['duration_s']:.1f} s: {result['connections_open']} still open, "
            f"{result['pings']} PINGs sent, errors: {count_text(result['errors'])}"
        )
    else:
        rate = f"{result['rate']} frames/s" if result["rate"] else "unpaced"
        lines.append(
            f"load: {head}, {result['mac']}, {result['payload']} B payload "
            f"({result['frame_bytes']} B frames), {rate}, window {result['window']}"
        )
        lines.append(
            f"set-up: handshakes {result['handshake_s']:.2f} s, "
            f"{result['prebuilt_frames']} frames pre-built in {result['prebuild_s']:.2f} s"
        )
        lines.append(
            f"timed phase {result['duration_s']:.2f} s: {result['frames_sent']} frames sent, "
            f"{result['frames_acked']} ACKed -> {result['acked_per_s']:,.0f} frames/s ACKed "
            f"({result['acked_mib_per_s']:.2f} MiB/s of frames)"
        )
        lat = result["latency_ms"]
        if lat["samples"]:
            lines.append(
                f"ACK latency: p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms, "
                f"max {lat['max']:.2f} ms ({lat['samples']} samples, every {lat['every']}th frame)"
            )
        else:
            lines.append("ACK latency: no samples")
        lines.append(
            f"after drain: {result['frames_acked_total']} ACKed in all, "
            f"{result['frames_unacked']} never ACKed; NACKs: {count_text(result['nacks'])}; "
            f"errors: {count_text(result['errors'])}"
        )
        each = result["acked_per_connection"]
        if conns > 1:
            lines.append(
                f"frames ACKed per connection: min {each['min']}, median {each['p50']}, "
                f"max {each['max']}"
            )
        if result["late_built_frames"]:
            lines.append(
                f"note: {result['late_built_frames']} frames were built during the timed phase "
                f"({result['late_build_s']:.2f} s of CPU); raise --expect-rate to pre-build them"
            )
    if result["closed_by_server"]:
        lines.append(f"{result['closed_by_server']} connections closed by the server")
    lines.append(f"flood CPU: {result['flood_cpu_pct']:.0f}% (100% = one core)")
    return lines
