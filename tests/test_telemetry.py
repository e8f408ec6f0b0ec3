"""Telemetry: log formatting, the log buffer, metrics renderings, and the stats endpoint.

The unit tests use real loggers, a real Store and a real (unbound) Server. The
end-to-end test starts the daemon (`module-ingest serve`), streams frames with the
client library, and reads the stats socket through stats_cli.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from benchkit.daemonproc import NotifySocket, listen_address, notify_env
from conftest import ROOT, wait_for

from appliance import __version__
from appliance.client import Client
from appliance.config import load
from appliance.telemetry import endpoint, logs, metrics, stats_cli
from appliance.telemetry.figures import duration, percentile
from appliance.telemetry.logs import BufferHandler, LogBuffer, StructuredFormatter
from appliance.telemetry.metrics import RateMeter

DEV = "dev/core-0"
WAIT = 5.0

# -- helpers -----------------------------------------------------------------------------

LOGFMT_PAIR = re.compile(r'([^\s=]+)=("(?:[^"\\]|\\.)*"|[^\s"]*)(?: |$)')
LOGFMT_UNESCAPE = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"'}
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def parse_logfmt(line: str) -> dict[str, str]:
    """A strict logfmt reader: the pairs must cover the whole line."""
    assert "\n" not in line, f"multi-line record: {line!r}"
    pairs, pos = {}, 0
    for match in LOGFMT_PAIR.finditer(line):
        assert match.start() == pos, f"unparsable at {pos}: {line!r}"
        key, value = match.groups()
        if value.startswith('"'):
            value = re.sub(
                r"\\(u[0-9a-f]{4}|.)",
                lambda m: chr(int(m[1][1:], 16)) if m[1][0] == "u" else LOGFMT_UNESCAPE[m[1]],
                value[1:-1],
            )
        pairs[key] = value
        pos = match.end()
    assert pos == len(line), f"unparsable at {pos}: {line!r}"
    return pairs


SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(?:,|$)')
TYPES = {"counter", "gauge", "summary", "histogram", "untyped"}


def parse_prometheus(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Text format 0.0.4: HELP and TYPE before each family's samples, labels escaped."""
    assert text.endswith("\n")
    families: dict[str, list[tuple[dict[str, str], float]]] = {}
    helps: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert name not in helps, f"second HELP for {name}"
            helps.add(name)
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in TYPES and name not in families, line
            assert name.startswith("module_ingest_"), name
            families[name] = []
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, raw_labels, value = match.groups()
        assert name in families, f"{name} has no TYPE before its sample"
        assert name in helps, f"{name} has no HELP"
        labels: dict[str, str] = {}
        if raw_labels is not None:
            pos = 0
            for lm in LABEL.finditer(raw_labels):
                assert lm.start() == pos, f"bad labels: {raw_labels!r}"
                labels[lm[1]] = re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], lm[2])
                pos = lm.end()
            assert pos == len(raw_labels), f"bad labels: {raw_labels!r}"
        number = float(value)  # accepts NaN, +Inf, -Inf as the format writes them
        assert not math.isnan(number) or value == "NaN"
        families[name].append((labels, number))
    assert all(families.values()), "a family without samples"
    return families


def value(families, name: str, **labels: str) -> float:
    for got, number in families["module_ingest_" + name]:
        if got == labels:
            return number
    raise AssertionError(f"no sample {name}{labels}")


def emit(fmt: str, msg: str, *args, level=logging.INFO, exc_info=None, extra=None) -> str:
    """Format one real record through a real handler; returns the line.

    The record is handed to the handler directly: pytest attaches its own capture
    handlers to every logger, and those must not see the deliberately bad records."""
    buffer = LogBuffer(4)
    handler = BufferHandler(buffer)
    handler.setFormatter(StructuredFormatter(fmt))
    if exc_info is True:
        exc_info = sys.exc_info()
    name = "appliance.test_telemetry"
    logger = logging.getLogger(name)
    record = logger.makeRecord(name, level, __file__, 1, msg, args, exc_info, extra=extra)
    handler.handle(record)
    (line,) = buffer.lines()
    return line


def boom() -> None:
    raise ValueError("boom\nsecond line")


# -- log formatting ----------------------------------------------------------------------


def test_logfmt_has_the_fixed_keys_first_and_keeps_percent_args():
    line = emit("logfmt", "listening on %s:%d", "127.0.0.1", 7878)
    assert list(parse_logfmt(line)) == ["ts", "level", "logger", "msg"]
    pairs = parse_logfmt(line)
    assert TS.match(pairs["ts"]), pairs["ts"]
    assert pairs["level"] == "info"
    assert pairs["logger"] == "appliance.test_telemetry"
    assert pairs["msg"] == "listening on 127.0.0.1:7878"
    assert 'msg="listening on 127.0.0.1:7878"' in line


@pytest.mark.parametrize(
    "text",
    ["plain", "", "two words", 'say "hi"', "back\\slash", "a=b", "line\nbreak\r\ttab", "nul\0x"],
)
def test_logfmt_quotes_and_escapes_what_needs_it(text):
    line = emit("logfmt", "%s", text, extra={"fields": {"value": text}})
    pairs = parse_logfmt(line)
    assert pairs["msg"] == text and pairs["value"] == text
    if text == "plain":
        assert " msg=plain " in line


def test_logfmt_extra_fields_keep_their_order_and_types():
    fields = {"identity": "dev/core-0", "seq": 7, "ratio": 0.5, "ok": True, "none": None}
    line = emit("logfmt", "stored", extra={"fields": fields})
    assert line.endswith("msg=stored identity=dev/core-0 seq=7 ratio=0.5 ok=true none=null")


def test_logfmt_fields_never_override_the_record_and_bad_keys_are_cleaned():
    try:
        boom()
    except ValueError:
        line = emit(
            "logfmt",
            "real",
            extra={"fields": {"msg": "fake", "exc": "mine", "bad key=": 1}},
            exc_info=True,
        )
    pairs = parse_logfmt(line)
    assert pairs["msg"] == "real" and pairs["exc"].endswith("ValueError: boom\nsecond line")
    assert pairs["fields.msg"] == "fake" and pairs["fields.exc"] == "mine"
    assert pairs["bad_key_"] == "1"


def test_logfmt_exception_is_one_line_with_the_traceback_as_a_field():
    try:
        boom()
    except ValueError:
        line = emit("logfmt", "failed for %s", "x", exc_info=True)
    pairs = parse_logfmt(line)  # asserts there is no newline
    assert pairs["msg"] == "failed for x"
    assert pairs["exc"].startswith("Traceback (most recent call last):\n")
    assert pairs["exc"].endswith("ValueError: boom\nsecond line")


def test_json_is_one_object_per_line_with_fields_and_exception():
    try:
        boom()
    except ValueError:
        line = emit(
            "json",
            "conn %s: %s",
            "1.2.3.4",
            "closing",
            level=logging.WARNING,
            extra={"fields": {"code": "TIMEOUT", "n": 3, "path": Path("/x")}},
            exc_info=True,
        )
    assert "\n" not in line
    obj = json.loads(line)
    assert list(obj)[:4] == ["ts", "level", "logger", "msg"]
    assert TS.match(obj["ts"])
    assert obj["level"] == "warning" and obj["msg"] == "conn 1.2.3.4: closing"
    assert obj["code"] == "TIMEOUT" and obj["n"] == 3 and obj["path"] == "/x"
    assert obj["exc"].endswith("ValueError: boom\nsecond line")


def test_mismatched_percent_args_still_log_the_event(capsys):
    line = emit("logfmt", "%s and %s", "one")
    assert parse_logfmt(line)["msg"] == "%s and %s args=('one',)"
    assert "Logging error" not in capsys.readouterr().err


# -- the log buffer ------------------------------------------------------------------------


def test_log_buffer_keeps_the_newest_lines_newest_last():
    buffer = LogBuffer(3)
    assert buffer.lines() == []
    for i in range(5):
        buffer.append(f"line {i}")
    assert buffer.lines() == ["line 2", "line 3", "line 4"]
    assert buffer.lines(2) == ["line 3", "line 4"]
    assert buffer.lines(10) == ["line 2", "line 3", "line 4"]
    assert buffer.lines(0) == []
    assert len(buffer) == 3
    with pytest.raises(ValueError):
        LogBuffer(0)


def test_log_buffer_can_be_read_while_threads_write():
    buffer = LogBuffer(100)
    stop = threading.Event()

    def write(n: int) -> None:
        for i in range(2000):
            buffer.append(f"{n} {i}")

    def read() -> None:
        while not stop.is_set():
            lines = buffer.lines(50)
            assert len(lines) <= 50

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    reader.join()
    lines = buffer.lines()
    assert len(lines) == 100
    assert {line.split()[0] for line in lines} <= {"0", "1", "2", "3"}


# -- setup() -------------------------------------------------------------------------------


@pytest.fixture
def root_logger():
    """Give the root logger back as it was (pytest's own handlers included)."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    yield root
    for handler in root.handlers[:]:
        root.removeHandler(handler)
        if handler not in saved:
            handler.close()
    for handler in saved:
        root.addHandler(handler)
    root.setLevel(level)


def log_config(tmp_path: Path, section: str):
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    path = tmp_path / "config.toml"
    path.write_text(f"[log]\n{section}\n")
    return load(path, environ={"MODULE_INGEST_DATA_DIR": str(data)})


def test_setup_writes_stdout_file_and_buffer_once_and_is_idempotent(tmp_path, root_logger, capsys):
    config = log_config(tmp_path, 'format = "json"\nfile = "daemon.log"\nbuffer_lines = 5')
    logs.setup(config)
    buffer = logs.setup(config)  # the second call replaces the first one's handlers
    assert len(root_logger.handlers) == 3
    log = logging.getLogger("appliance.net")
    log.debug("not at level info")
    for i in range(7):
        log.info("event %d", i, extra={"fields": {"i": i}})
    out = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["msg"] for line in out] == [f"event {i}" for i in range(7)]
    assert [json.loads(line)["i"] for line in buffer.lines()] == [2, 3, 4, 5, 6]
    file_lines = (config.data_dir / "daemon.log").read_text().splitlines()
    assert file_lines == out


def test_setup_keeps_the_buffer_across_a_second_call(tmp_path, root_logger, capsys):
    config = log_config(tmp_path, "buffer_lines = 10")
    logs.setup(config)
    logging.getLogger("appliance").warning("before")
    buffer = logs.setup(config)
    logging.getLogger("appliance").warning("after")
    assert [parse_logfmt(line)["msg"] for line in buffer.lines(2)] == ["before", "after"]


@pytest.mark.parametrize("backups", [0, 2])
def test_log_file_stays_bounded(tmp_path, root_logger, capsys, backups):
    config = log_config(
        tmp_path, f'file = "d.log"\nfile_max_bytes = 4096\nfile_backups = {backups}'
    )
    logs.setup(config)
    log = logging.getLogger("appliance.store")
    for i in range(300):
        log.info("event %d %s", i, "x" * 60)
    files = sorted(p.name for p in config.data_dir.iterdir())
    assert files == ["d.log"] + [f"d.log.{n}" for n in range(1, backups + 1)]
    for name in files:
        assert (config.data_dir / name).stat().st_size <= 4096
    last = (config.data_dir / "d.log").read_text().splitlines()[-1]
    assert parse_logfmt(last)["msg"].startswith("event 299 ")


def test_an_unopenable_log_file_leaves_stdout_logging(tmp_path, root_logger, capsys):
    config = log_config(tmp_path, 'file = "no/such/dir/d.log"')
    buffer = logs.setup(config)
    logging.getLogger("appliance").info("still here")
    out = capsys.readouterr().out
    assert "cannot open the log file" in out and "still here" in out
    assert [parse_logfmt(line)["msg"] for line in buffer.lines(2)] == [
        f"log: cannot open the log file {config.data_dir / 'no/such/dir/d.log'}: "
        "No such file or directory; logging to stdout only",
        "still here",
    ]


# -- metrics -------------------------------------------------------------------------------


def test_rate_meter_over_its_window():
    meter = RateMeter(window=5.0)
    assert meter.per_second() == 0.0
    meter.sample(100.0, 0)
    assert meter.per_second() == 0.0
    for step in range(1, 41):  # 10 s at 0.25 s, 100 frames/s
        meter.sample(100.0 + step * 0.25, step * 25)
    assert meter.per_second() == pytest.approx(100.0)
    assert meter.span() == pytest.approx(5.0)
    for step in range(41, 70):  # then nothing for ~7 s: the burst leaves the window
        meter.sample(100.0 + step * 0.25, 1000)
    assert meter.per_second() == 0.0
    assert len(meter._samples) <= 64


def test_rate_meter_history_is_bounded():
    meter = RateMeter(window=1e9, maxlen=8)
    for i in range(100):
        meter.sample(float(i), i * 10)
    assert meter.per_second() == pytest.approx(10.0)
    assert len(meter._samples) == 8


def test_percentile_is_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([1.0], 99) == 1.0
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    # always one of the values, never an interpolation between two
    assert percentile([1.0, 2.0], 50) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == 4.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0


def test_duration_is_hours_minutes_seconds_with_days_in_front():
    assert duration(0) == "00:00:00"
    assert duration(62.9) == "00:01:02"
    assert duration(86399) == "23:59:59"
    assert duration(2 * 86400 + 3 * 3600 + 4 * 60 + 5) == "2d 03:04:05"


WEIRD = 'we"ird\\id\nnext'


def figures(server) -> metrics.Metrics:
    return metrics.Metrics(server, server.config)


def test_snapshot_reads_the_server_and_store(server):
    store = server.store
    stats = figures(server)
    assert stats.snapshot()["wal"]["commit_p50_ms"] is None  # no commit yet
    # recent commit times as the committer records them: 98 fast ones, two slow ones
    store.commit_seconds.extend([0.002] * 98 + [0.050, 0.080])
    server.counters.update({"frames": 3, "bytes_in": 400, "replays": 2, "connections": 1})
    server.counters.update({"nack.DENIED": 1, "nack.BUSY": 2, "error.TIMEOUT": 1})
    server.frames_by_identity.update({DEV: 3, WEIRD: 0})
    (hook,) = server.sweep_hooks  # the frame-rate meter's
    hook(10.0)
    server.counters["frames"] += 50
    hook(10.5)

    snap = stats.snapshot(identities=True)
    json.dumps(snap)  # JSON-able
    assert snap["version"] == __version__
    assert snap["board"] == server.config.values["board"]["profile"]
    assert snap["frames"] == 53 and snap["bytes_in"] == 400 and snap["replays"] == 2
    assert snap["rate"] == pytest.approx(100.0) and snap["rate_seconds"] == 0.5
    assert snap["nacks"] == {"BUSY": 2, "DENIED": 1}
    assert snap["errors"] == {"TIMEOUT": 1}
    assert snap["connections"] == {
        "open": 0,
        "authenticated": 0,
        "paused": 0,
        "accepted": 1,
        "evicted": 0,
    }
    assert snap["identities"][DEV] == {"frames": 3, "connected": False}
    assert snap["ring"] == {
        "pending_bytes": 0,
        "capacity_bytes": 1 << 20,
        "fill": 0,
        "pause_bytes": server.pause_bytes,
    }
    wal = snap["wal"]
    assert wal["segments"] == 1
    assert wal["bytes_on_disk"] == store.bytes_on_disk
    assert wal["commit_p50_ms"] == 2.0 and wal["commit_p99_ms"] == 50.0
    assert wal["commit_error"] is None and wal["full"] is False
    assert snap["subscriber_lag_bytes"] == {}
    assert snap["process"]["rss_bytes"] > 1_000_000
    assert snap["process"]["cpu_percent"] >= 0
    assert 0 < snap["disk"]["free_bytes"] <= snap["disk"]["total_bytes"]


def test_prometheus_output_parses_and_escapes_labels(server):
    server.counters.update({"frames": 3, "nack.DENIED": 1, "error.AUTH_FAILED": 4})
    server.frames_by_identity.update({DEV: 3, WEIRD: 1})
    snap = figures(server).snapshot(identities=True)
    text = metrics.prometheus(snap)
    families = parse_prometheus(text)
    assert value(families, "frames_total") == 3
    assert value(families, "nacks_total", code="DENIED") == 1
    assert value(families, "errors_total", code="AUTH_FAILED") == 4
    assert value(families, "identity_frames_total", identity=WEIRD) == 1  # round trip
    assert value(families, "identity_frames_total", identity=DEV) == 3
    assert value(families, "info", version=__version__, board=snap["board"]) == 1
    assert value(families, "process_rss_bytes") > 0
    assert value(families, "ring_capacity_bytes") == server.store.ring_bytes
    # before the first commit there is no latency: no sample rather than a made-up one
    assert "module_ingest_wal_commit_p50_seconds" not in families
    assert "module_ingest_subscriber_lag_bytes" not in families
    # counters are typed as counters
    assert "# TYPE module_ingest_frames_total counter" in text


def test_prometheus_writes_special_floats_and_subscriber_lags(server):
    snap = figures(server).snapshot()
    snap["subscriber_lag_bytes"] = {"archive": 10, "up\nload": 0}
    snap["rate"] = float("nan")
    snap["uptime_seconds"] = float("inf")
    families = parse_prometheus(metrics.prometheus(snap))
    assert value(families, "subscriber_lag_bytes", subscriber="up\nload") == 0
    assert math.isnan(value(families, "frames_per_second"))
    assert value(families, "uptime_seconds") == math.inf


class Subscribers:
    """What metrics reads of the subscriber manager: lags() and status()."""

    def lags(self) -> dict[str, int]:
        return {"archive": 2048, "up": 0}

    def status(self) -> dict[str, dict]:
        archive = {"type": "archive", "pid": 7, "restarts": 1, "lag_bytes": 2048, "records": 5}
        up = {"type": "cloud", "pid": None, "restarts": 0, "lag_bytes": 0}
        return {"archive": archive, "up": {**up, "failing": True, "last_error": "no route"}}


def test_subscribers_in_every_rendering(server):
    snap = metrics.Metrics(server, server.config, Subscribers()).snapshot()
    assert snap["subscriber_lag_bytes"] == {"archive": 2048, "up": 0}
    assert snap["subscribers"]["up"]["last_error"] == "no route"
    families = parse_prometheus(metrics.prometheus(snap))
    assert value(families, "subscriber_lag_bytes", subscriber="archive") == 2048
    assert value(families, "subscriber_records_total", subscriber="archive") == 5
    assert value(families, "subscriber_restarts_total", subscriber="archive") == 1
    assert value(families, "subscriber_failing", subscriber="up") == 1
    # a figure a subscriber does not report gets no sample rather than a made-up one
    assert [labels for labels, _ in families["module_ingest_subscriber_records_total"]] == [
        {"subscriber": "archive"}
    ]
    text = metrics.text(snap)
    assert "\nsubscribers  archive 2.0 KiB behind, up 0 B behind\n" in text
    assert "\n             up failing: no route\n" in text


def test_text_summary_names_the_figures(server):
    server.counters.update({"frames": 12, "nack.DENIED": 1})
    server.frames_by_identity.update({f"core-{i}": i for i in range(25)})
    text = figures(server).text(identities=True)
    assert text.startswith(f"module-ingest {__version__} (board ")
    assert "12 stored" in text and "DENIED=1" in text and "subscribers  none" in text
    assert "core-24" in text and "core-0 " not in text and "... and 5 more" in text
    assert "core-24" not in figures(server).text()


def test_per_identity_rows_only_when_asked_for(server):
    """The rows cost the loop O(identities): a plain snapshot, the Prometheus text and the
    summary made from it have none, and everything else is the same."""
    server.counters.update({"frames": 3})
    server.frames_by_identity.update({DEV: 3})
    plain, full = figures(server).snapshot(), figures(server).snapshot(identities=True)
    assert "identities" not in plain and full["identities"] == {
        DEV: {"frames": 3, "connected": False}
    }
    assert set(full) - set(plain) == {"identities"} and plain["frames"] == full["frames"] == 3
    families = parse_prometheus(metrics.prometheus(plain))
    assert value(families, "frames_total") == 3
    assert not any(name.startswith("module_ingest_identity_") for name in families)
    assert DEV not in metrics.text(plain) and DEV in metrics.text(full)


# -- stats command without a daemon ------------------------------------------------------


def stats_args(*argv: str) -> argparse.Namespace:
    """Parse like the CLI will once stats_cli.add_parser is wired into it."""
    parser = argparse.ArgumentParser(prog="module-ingest")
    stats_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["stats", *argv])


def test_stats_parser_defaults_and_watch_interval():
    args = stats_args()
    assert (args.format, args.watch, args.socket) == ("text", None, None)
    assert args.func is stats_cli.cmd_stats
    assert stats_args("--watch").watch == 1.0
    assert stats_args("--watch", "2.5", "--format", "prometheus").watch == 2.5
    with pytest.raises(SystemExit):
        stats_args("--watch", "0")
    with pytest.raises(SystemExit):
        stats_args("--format", "xml")


def test_stats_without_a_daemon_is_one_line_and_exit_1(tmp_path, capsys):
    config = load(environ={"MODULE_INGEST_DATA_DIR": str(tmp_path)})
    assert stats_cli.cmd_stats(stats_args(), config) == 1
    out, err = capsys.readouterr()
    path = tmp_path / "stats.sock"
    assert out == "" and err.startswith(f"module-ingest: stats: no daemon at {path} (")
    assert err.count("\n") == 1


# -- end to end: the daemon --------------------------------------------------------------

# what `module-ingest stats ...` will run once the CLI has the subcommand
STATS_MAIN = """
import argparse
import sys

from appliance.config import load
from appliance.telemetry import stats_cli

parser = argparse.ArgumentParser(prog="module-ingest")
stats_cli.add_parser(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args()
sys.exit(args.func(args, load()))
"""

CONFIG = """
[server]
handshake_timeout = 2.0
[storage]
segment_bytes = 1048576
ring_bytes = 1048576
[log]
format = "json"
file = "daemon.log"
buffer_lines = 50
[stats]
tcp = "127.0.0.1:0"
"""


class TelemetryDaemon:
    """`module-ingest serve` with its stdout and stderr apart (the log must be JSON lines
    only, and stderr empty)."""

    def __init__(self, tmp_path: Path) -> None:
        self.data = tmp_path / "data"
        self.data.mkdir(mode=0o700)
        self.notify = NotifySocket(tmp_path / "notify.sock")
        self.config_path = tmp_path / "config.toml"
        self.config_path.write_text(CONFIG)
        self.stdout = tmp_path / "stdout"
        self.stderr = tmp_path / "stderr"
        self.config = load(self.config_path, environ={"MODULE_INGEST_DATA_DIR": str(self.data)})
        self.socket = self.data / "stats.sock"
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        return dict(
            notify_env(self.notify.path),
            PYTHONPATH=str(ROOT),
            MODULE_INGEST_DATA_DIR=str(self.data),
            MODULE_INGEST_LISTEN="127.0.0.1:0",
            MODULE_INGEST_CONFIG=str(self.config_path),
        )

    def start(self) -> None:
        env = self.env()
        with open(self.stdout, "wb") as out, open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "appliance", "serve"],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        ready = self.notify.wait_ready(self.proc)
        assert ready is not None, self.stderr.read_text()
        self.port = listen_address(ready)[1]
        self.tcp_port = int(self.logged(r"^stats: serving on .* and 127\.0\.0\.1:(\d+)$"))

    def log_objects(self) -> list[dict]:
        """The JSON log records on stdout (the dev identity notice is a plain print)."""
        lines = self.stdout.read_text().splitlines()
        return [json.loads(line) for line in lines if not line.startswith("development ")]

    def logged(self, pattern: str) -> str:
        def find():
            assert self.proc.poll() is None, self.stderr.read_text()
            for obj in self.log_objects():
                match = re.search(pattern, obj["msg"])
                if match:
                    return match[1]
            return None

        return wait_for(find, WAIT, f"a log line matching {pattern}")

    @property
    def token(self) -> str:
        return json.loads((self.data / "dev-credentials.json").read_text())["token"]

    def stats(self, capsys, *argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = stats_cli.cmd_stats(stats_args(*argv), self.config)
        out, err = capsys.readouterr()
        return code, out, err

    def json(self, capsys) -> dict:
        code, out, err = self.stats(capsys, "--format", "json", "--identities")
        assert code == 0 and err == "", err
        return json.loads(out)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.notify.close()


@pytest.fixture
def telemetry_daemon(tmp_path):
    daemon = TelemetryDaemon(tmp_path)
    yield daemon
    daemon.kill()


def raw_request(path: Path, payload: bytes) -> bytes:
    """Send bytes to the stats socket; everything it answers before closing."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(WAIT)
        sock.connect(str(path))
        chunks = []
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)  # like `printf ... | nc -U`
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed before reading all we sent: a refusal too
        return b"".join(chunks)


def test_end_to_end(telemetry_daemon, capsys):
    d = telemetry_daemon
    # a socket file left by a daemon that was killed: the new one replaces it
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(d.socket))
    stale.close()
    d.start()
    assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o600

    with Client("127.0.0.1", d.port, DEV, d.token, timeout=WAIT) as core:
        for i in range(5):
            core.send(1, b"%03d" % i + b"x" * 97)
        core.send(99, b"out of scope")
        core.flush()
        assert [code for _, code, _ in core.rejected] == ["DENIED"]

        snap = d.json(capsys)  # the core is still connected
        assert snap["frames"] == 5
        assert snap["bytes_in"] >= 5 * 100
        assert snap["identities"] == {DEV: {"frames": 5, "connected": True}}
        assert snap["nacks"] == {"DENIED": 1}
        assert snap["connections"]["open"] == 1 and snap["connections"]["accepted"] == 1
        assert snap["replays"] == 0
        wal = snap["wal"]
        assert wal["commits"] >= 1 and 0 <= wal["commit_p50_ms"] <= wal["commit_p99_ms"]
        assert wal["segments"] == 1 and wal["bytes_on_disk"] > 5 * 100
        assert wal["frames_stored"] == 5
        assert snap["process"]["rss_bytes"] > 1_000_000
        assert snap["disk"]["free_bytes"] > 0
        assert snap["ring"]["capacity_bytes"] == d.config.storage["ring_bytes"]
        assert snap["version"] == __version__

        # the rate: once the meter has samples, frames sent now raise it within a sweep
        wait_for(lambda: d.json(capsys)["rate_seconds"] > 0, WAIT, "rate samples")
        for _ in range(20):
            core.send(2, b"y")
        core.flush()
        snap = wait_for(lambda: (s := d.json(capsys))["rate"] > 0 and s, WAIT, "a rate")
        assert snap["frames"] == 25

    code, out, err = d.stats(capsys, "--format", "prometheus", "--identities")
    assert code == 0 and err == ""
    families = parse_prometheus(out)
    assert value(families, "frames_total") == 25
    assert value(families, "nacks_total", code="DENIED") == 1
    assert value(families, "identity_frames_total", identity=DEV) == 25
    assert value(families, "connections_accepted_total") == 1
    assert value(families, "process_rss_bytes") > 0
    assert value(families, "wal_commit_p99_seconds") >= 0

    code, out, err = d.stats(capsys)  # text by default
    assert code == 0 and "25 stored" in out and "DENIED=1" in out

    # the optional loopback TCP listener answers the same protocol
    with socket.create_connection(("127.0.0.1", d.tcp_port), timeout=WAIT) as sock:
        sock.sendall(b"json\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert json.loads(reply)["frames"] == 25

    # a request without its newline counts at EOF; garbage gets one error line;
    # an over-long line is dropped; none of them hurts the daemon
    assert json.loads(raw_request(d.socket, b"json"))["frames"] == 25
    assert raw_request(d.socket, b"bogus\n").startswith(b"error: unknown request 'bogus'")
    assert raw_request(d.socket, b"json everything\n").startswith(b"error: unknown request")
    assert b'"identities"' in raw_request(d.socket, b"json identities\n")
    assert b'"identities"' not in raw_request(d.socket, b"json\n")
    assert raw_request(d.socket, b"x" * 1000) == b""
    assert raw_request(d.socket, b"\xff\xfe\n").startswith(b"error:")
    code, out, _ = d.stats(capsys, "--format", "json", "--socket", str(d.socket))
    assert code == 0 and json.loads(out)["frames"] == 25

    # --watch repeats until Ctrl-C, which ends it with exit 0
    watch_out = d.data.parent / "watch.out"
    with open(watch_out, "wb") as out:
        watcher = subprocess.Popen(
            [sys.executable, "-c", STATS_MAIN, "stats", "--watch", "0.05", "--format", "json"],
            stdout=out,
            stderr=subprocess.PIPE,
            env=d.env(),
        )
    try:
        wait_for(lambda: watch_out.read_text().count("\n") >= 3, WAIT, "three reports")
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(WAIT) == 0, watcher.stderr.read()
    finally:
        watcher.kill()
        watcher.wait()
        watcher.stderr.close()
    reports = [json.loads(line) for line in watch_out.read_text().splitlines()]
    assert all(r["frames"] == 25 for r in reports)
    assert len({r["time"] for r in reports}) == len(reports)

    # at most MAX_CLIENTS at once; a silent one is dropped after CLIENT_TIMEOUT
    silent = []
    for _ in range(endpoint.MAX_CLIENTS):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(d.socket))
        silent.append(sock)
    wait_for(lambda: raw_request(d.socket, b"json\n") == b"", WAIT, "refusal over the limit")
    for sock in silent:
        sock.settimeout(WAIT)
        assert sock.recv(100) == b""
        sock.close()
    assert d.json(capsys)["frames"] == 25

    # TCP clients (any local user) have a pool of their own: filling it locks no one
    # out of the Unix socket (root and the service user)
    def tcp_request() -> bytes:
        """The reply; b"" if the daemon closed the connection on accept (pool full)."""
        reply = b""
        with socket.create_connection(("127.0.0.1", d.tcp_port), timeout=WAIT) as sock:
            try:
                sock.sendall(b"json\n")
                while chunk := sock.recv(65536):
                    reply += chunk
            except (ConnectionResetError, BrokenPipeError):
                return b""
        return reply

    squatters = [
        socket.create_connection(("127.0.0.1", d.tcp_port), timeout=WAIT)
        for _ in range(endpoint.MAX_CLIENTS)
    ]
    try:
        wait_for(lambda: tcp_request() == b"", WAIT, "the TCP pool full")
        assert d.json(capsys)["frames"] == 25
    finally:
        for sock in squatters:
            sock.close()
    wait_for(lambda: tcp_request() != b"", WAIT, "the TCP pool free again")

    # SIGTERM: the daemon stops cleanly and takes its socket with it
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(WAIT) == 0
    assert not d.socket.exists()
    code, out, err = d.stats(capsys, "--format", "json")
    assert code == 1 and out == ""
    assert err.startswith(f"module-ingest: stats: no daemon at {d.socket} (")
    assert err.count("\n") == 1

    # every log line was one JSON object, to stdout and to the file alike
    assert d.stderr.read_text() == ""
    records = d.log_objects()
    messages = [r["msg"] for r in records]
    assert "stop: done" in messages
    assert all(set(r) >= {"ts", "level", "logger", "msg"} for r in records)
    file_records = [json.loads(line) for line in (d.data / "daemon.log").read_text().splitlines()]
    assert [r["msg"] for r in file_records] == messages
