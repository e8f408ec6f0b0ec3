"""The subscriber manager through the real daemon: processes, restarts, lag, filters."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from conftest import cli, subscriber_pid, wait_for

from appliance.client import Client
from appliance.config import REQUIRED, ConfigError, check_table
from appliance.config import load as load_config
from appliance.store.cursor import Cursor
from appliance.store.recovery import write_segment
from appliance.store.segment import Record, segment_name
from appliance.subscribers import runner
from appliance.subscribers.reader import LogReader

TAP = 'type = "appliance.subscribers.example:JsonlFile"\n'


def tapped(d, name="tap") -> list[dict]:
    path = d.data_dir / "subscribers" / name / "records.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def stream(d, seqs_from: int, count: int, channel: int = 1) -> None:
    with Client(d.host, d.port, "dev/core-0", d.dev_token) as client:
        for i in range(count):
            client.send(channel, b"frame %d" % (seqs_from + i))
        client.flush()


def test_a_subscriber_gets_every_frame_and_survives_kill_9(daemon_factory):
    d = daemon_factory(f"[subscribers.tap]\n{TAP}channels = [1]\n")
    stream(d, 0, 200)
    stream(d, 200, 20, channel=2)  # filtered out
    wait_for(lambda: len(tapped(d)) >= 200, what="the tap to catch up")
    pid = wait_for(lambda: subscriber_pid(d, "tap"), what="the subscriber process")
    nice = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
    assert nice == 10  # below the daemon's 0: ingestion gets the CPU first
    os.kill(pid, signal.SIGKILL)
    stream(d, 1000, 300)
    wait_for(lambda: subscriber_pid(d, "tap") not in (0, pid), timeout=10, what="a restart")
    wait_for(
        lambda: {r["payload_b64"] for r in tapped(d)} >= {r["payload_b64"] for r in dumped(d, 1)},
        what="every channel-1 frame in the tap",
    )
    got = tapped(d)
    assert {r["channel"] for r in got} == {1}
    assert "exited with -9; restarting" in d.log()
    # at least once: nothing missing; a kill between handle and commit may repeat some
    assert {(r["id"], r["seq"]) for r in got} == {(r["id"], r["seq"]) for r in dumped(d, 1)}
    stats = cli("stats", "--format", "json", data_dir=d.data_dir)
    assert stats.returncode == 0, stats.stderr.decode()
    lags = json.loads(stats.stdout)["subscriber_lag_bytes"]
    assert set(lags) == {"tap"} and lags["tap"] >= 0
    pid = subscriber_pid(d, "tap")
    assert d.stop() == 0
    assert not Path(f"/proc/{pid}").exists()  # the daemon stopped its subscriber


def dumped(d, channel: int) -> list[dict]:
    result = cli("dump", "--channel", str(channel), data_dir=d.data_dir)
    assert result.returncode == 0, result.stderr.decode()
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_an_unknown_subscriber_type_stops_the_start_in_one_line(daemon_factory):
    d = daemon_factory('[subscribers.x]\ntype = "nosuch"\n', start=False)
    with pytest.raises(RuntimeError) as err:
        d.start()
    assert "unknown subscriber type 'nosuch'" in str(err.value)
    assert "Traceback" not in str(err.value)


@pytest.mark.parametrize(
    "table, key",
    [
        ("[subscribers.a]\nchannels = [1]\n", "subscribers.a.type"),
        ('[subscribers.a]\ntype = "index"\nchannels = ["x"]\n', "subscribers.a.channels"),
        ('[subscribers.a]\ntype = "index"\nidentities = "m"\n', "subscribers.a.identities"),
        ('[subscribers."a b"]\ntype = "index"\n', "subscribers.a b"),
    ],
)
def test_bad_subscriber_tables_name_the_key(tmp_path, table, key):
    path = tmp_path / "c.toml"
    path.write_text(table)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert key in str(err.value) and str(path) in str(err.value)


MODEL = Path(__file__).resolve().parent.parent / "models" / "tiny.tflite"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('type = "archive"\nretention_hour = 1\n', "unknown key subscribers.s.retention_hour"),
        ('type = "archive"\nmax_bytes = -1\n', "subscribers.s.max_bytes must be >= 0"),
        ('type = "archive"\ncompress_level = 10\n', "subscribers.s.compress_level must be one"),
        ('type = "archive"\nindex_every = 2.5\n', "subscribers.s.index_every must be int"),
        ('type = "archive"\nclose_after = "5m"\n', "subscribers.s.close_after must be float"),
        ('type = "index"\nsynchronous = "off"\n', "subscribers.s.synchronous must be one of"),
        ('type = "index"\ncache_mib = 0\n', "subscribers.s.cache_mib must be >= 1"),
        ('type = "cloud"\nbucket = "b"\naws_access_key_id = "k"\n',
         "unknown key subscribers.s.aws_access_key_id"),
        ('type = "cloud"\nregion = "x"\n', "subscribers.s.bucket is required"),
        ('type = "cloud"\nbucket = "b"\nendpoint = "http://127.0.0.1:9"\n'
         'access_key_id = "k"\nsecret_access_key = "s"\n',
         "subscribers.s.endpoint: http:// sends the frames in clear"),
        ('type = "inference"\noutput_channel = 100\nmodel = "models/nope.tflite"\n',
         "subscribers.s.model: model file"),
        ('type = "inference"\noutput_channel = 70000\n', "subscribers.s.output_channel: a channel"),
        ('type = "inference"\noutput_channel = 1\nwindow = "4"\n',
         "subscribers.s.window must be int"),
        ('type = "inference"\nbackend = "gpu"\noutput_channel = 1\n',
         "subscribers.s.backend must be one of tflite, fpga"),
        ('type = "inference"\noutput_channel = 1\nlabels = "a"\n',
         "subscribers.s.labels must be a list of str"),
        ('type = "mqtt"\nbroker = "mqtt://example.org"\n', "subscribers.s.broker: mqtt://"),
        ('type = "mqtt"\nbroker = "ftp://example.org"\n', "subscribers.s.broker: expected"),
        ('type = "mqtt"\nbroker = "mqtts://b"\npassword_file = "/nonexistent"\n',
         "subscribers.s.password_file: /nonexistent is not a readable file"),
        ('type = "mqtt"\nbroker = "mqtts://b"\ntopic = "a/{device}"\n',
         "subscribers.s.topic: fields are id, module, core, channel"),
        ('type = "mqtt"\nbroker = "mqtts://b"\nqos = 0\n', "subscribers.s.qos must be one of 1"),
        ('type = "appliance.subscribers.example:JsonlFile"\npath = "x"\n',
         "unknown key subscribers.s.path"),
        ('type = "nosuch"\n', "subscribers.s.type: unknown subscriber type 'nosuch'"),
    ],
)  # fmt: skip
def test_a_bad_subscriber_table_stops_the_start_in_one_line(tmp_path, table, message):
    """Checked before anything starts, by the schema its type declares: the file, the
    table and the key in one line, exit 2, for `serve --config F` and `--config F serve`."""
    config = tmp_path / "c.toml"
    config.write_text(f"[subscribers.s]\n{table}")
    config.chmod(0o600)  # (one with secrets readable by others is also warned about)
    for args in (["serve", "--config", str(config)], ["--config", str(config), "serve"]):
        result = cli(*args, data_dir=tmp_path / "data")
        err = result.stderr.decode()
        assert result.returncode == 2 and err.count("\n") == 1, err
        assert err.startswith(f"module-ingest: {config}: ") and message in err, err
    assert not (tmp_path / "data" / "wal").exists()  # refused before the store opened


def test_a_relative_model_path_starts_at_the_config_files_folder(tmp_path):
    folder = tmp_path / "etc"
    (folder / "models").mkdir(parents=True)
    (folder / "models" / "tiny.tflite").write_bytes(MODEL.read_bytes())
    config = folder / "c.toml"
    config.write_text(
        '[subscribers.ai]\ntype = "inference"\noutput_channel = 100\n'
        'model = "models/tiny.tflite"\nshape = [4]\nwindow = 4\n'
    )
    result = cli("--config", str(config), "config", "show", data_dir=tmp_path / "data")
    assert result.returncode == 0, result.stderr.decode()
    (folder / "models" / "tiny.tflite").unlink()
    result = cli("--config", str(config), "config", "show", data_dir=tmp_path / "data")
    assert f"model file {folder}/models/tiny.tflite not found" in result.stderr.decode()


@pytest.mark.parametrize("kind", sorted(runner.BUILTIN))
def test_each_built_in_schema_takes_its_own_defaults(kind):
    """Options filled with defaults pass the same check again (each process checks them)."""
    cls = runner.load_class(kind)
    given = {str: "x", int: 1}
    required = {k: given[spec[0]] for k, spec in cls.OPTIONS.items() if spec[1] is REQUIRED}
    filled = check_table("subscribers.s", required, cls.OPTIONS, "test", cls.CHOICES)
    assert check_table("subscribers.s", filled, cls.OPTIONS, "test", cls.CHOICES) == filled
    assert set(filled) == set(cls.OPTIONS)


def test_subscriber_processes_log_like_the_daemon(daemon_factory, tmp_path):
    """logfmt, one line per event with subscriber=NAME, no traceback below debug, no raw
    JSON line at stop; a failing batch is one error line with a pause that grows."""
    d = daemon_factory(
        f"[subscribers.tap]\n{TAP}channels = [1]\n"
        '[subscribers.bad]\ntype = "tests.failing:Failing"\n'
    )
    stream(d, 0, 10)
    wait_for(lambda: len(tapped(d)) >= 10, what="the tap")
    state = d.data_dir / "subscribers" / "tap"
    assert state.stat().st_mode & 0o777 == 0o700  # what a subscriber keeps is its own
    assert (state / "records.jsonl").stat().st_mode & 0o777 == 0o600
    wait_for(lambda: d.log().count("subscriber bad: batch failed") >= 3, what="three failures")
    assert d.stop() == 0
    lines = [line for line in d.log().splitlines() if "subscriber=" in line]
    assert lines and all(line.startswith("ts=") and " level=" in line for line in lines)
    assert not any(line.lstrip().startswith("{") for line in d.log().splitlines())
    assert "Traceback" not in d.log()
    failures = [line for line in lines if "batch failed" in line]
    assert all("level=error" in line and "subscriber=bad" in line for line in failures)
    assert "boom on purpose" in failures[0]


# -- the fast reader ---------------------------------------------------------------------

FIELDS = ("segment", "offset", "identity", "channel", "seq", "ts_ns", "recv_ns", "payload", "end")


def fields(records) -> list[tuple]:
    return [tuple(getattr(r, f) for f in FIELDS) for r in records]


def make_log(wal: Path) -> None:
    """Segment 1 (sealed): 300 frames of 3 cores on channels 1-3; segment 2: 100 more."""
    wal.mkdir()
    for number, count in ((1, 300), (2, 100)):
        records = [
            Record(number, 0, f"m-{i % 3}/core", 1 + i % 3, number * 1000 + i, i, i,
                   b"p%05d" % i * (1 + i % 5), 0)
            for i in range(count)
        ]  # fmt: skip
        write_segment(wal / segment_name(number), number, records, 1 << 20)


def read_all(wal: Path, name: str, fast: bool, **filters) -> list:
    cursor = Cursor(wal, name)
    out = []
    if not fast:
        while got := cursor.read(64):
            out += [
                r
                for r in got
                if r.channel in filters.get("channels", {r.channel})
                and r.identity in filters.get("identities", {r.identity})
            ]
        return out
    reader = LogReader(cursor, **filters)
    while True:
        got, moved = reader.read(64)
        if not moved:
            break
        out += got
    reader.close()
    return out


@pytest.mark.parametrize(
    "filters", [{}, {"channels": [2]}, {"identities": ["m-1/core"]}, {"channels": [1, 3]}]
)
def test_the_fast_reader_reads_what_the_cursor_reads(tmp_path, filters):
    wal = tmp_path / "wal"
    make_log(wal)
    want = read_all(wal, "slow", False, **filters)
    assert want and fields(read_all(wal, "fast", True, **filters)) == fields(want)


def test_the_fast_reader_leaves_damage_and_torn_tails_to_the_cursor(tmp_path, caplog):
    wal = tmp_path / "wal"
    make_log(wal)
    first = wal / segment_name(1)
    records = read_all(wal, "probe", False)
    hit = records[150]  # damage in the sealed segment: skipped to the next good block
    with open(first, "r+b") as f:
        f.seek(hit.end - 2)
        f.write(b"\xff\xff")
    newest = wal / segment_name(2)
    tail = [r for r in records if r.segment == 2][-1].end
    with open(newest, "r+b") as f:  # a torn record after the last one of the newest
        f.seek(tail)
        f.write(b"\x12\x34\x56\x78\x00\x00\x00\x40garbage")
    want = read_all(wal, "slow", False)
    got = read_all(wal, "fast", True)
    assert fields(got) == fields(want)
    assert len(got) < len(records) and fields(got[-1:]) == fields(records[-1:])
    assert "CRC mismatch" in caplog.text


def test_the_fast_reader_reads_past_a_zeroed_block_in_a_sealed_segment(tmp_path, caplog):
    """A lost sector reads as zeros, which look like the end of the data; in a sealed
    segment the data goes on after it (issue 9), and what the cursor reads past the gap
    the fast reader must not leave behind for the next segment."""
    wal = tmp_path / "wal"
    make_log(wal)
    records = read_all(wal, "probe", False)
    hole = records[150].offset  # zeros where a record starts: they read as the end
    with open(wal / segment_name(1), "r+b") as f:
        f.seek(hole)
        f.write(bytes(4096))
    want = read_all(wal, "slow", False)
    got = read_all(wal, "fast", True)
    assert fields(got) == fields(want)
    assert any(r.segment == 1 and r.offset > hole + 4096 for r in got)
    assert "zeros before more data" in caplog.text
