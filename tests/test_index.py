"""The index subscriber and `module-ingest query`: unit tests on records built directly,
then end to end through the daemon."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import cli as run_cli
from conftest import wait_for

from appliance import cli
from appliance.client import Client
from appliance.config import load as load_config
from appliance.store.segment import Record, scan
from appliance.subscribers import query_cli
from appliance.subscribers.base import Context
from appliance.subscribers.index import (
    DB_NAME,
    HOUR_NS,
    MINUTE_NS,
    IndexReader,
    IndexSubscriber,
)
from appliance.subscribers.timeargs import format_time, parse_time

T0 = 1_714_564_800 * 10**9  # 2024-05-01T12:00:00Z, a whole minute
ME = "m-1/core-0"


def rec(seq: int, ts_ns: int, *, ident: str = ME, channel: int = 1, size: int = 10) -> Record:
    offset = 4096 + 64 * (seq % 10**6)
    return Record(7, offset, ident, channel, seq, ts_ns, ts_ns + 5, b"x" * size, offset + 64)


def index(data_dir: Path, name: str = "idx", **options) -> IndexSubscriber:
    state = data_dir / "subscribers" / name
    state.mkdir(parents=True, exist_ok=True)
    return IndexSubscriber(Context(name, data_dir, state, None, options=options))


def feed(sub: IndexSubscriber, *batches: list[Record]) -> None:
    """What the runner does: handle() per batch, then flush()."""
    for batch in batches:
        sub.handle(batch)
        sub.flush()


def query(
    data_dir: Path, capsys, *argv: str, config: Path | None = None
) -> tuple[int, list[dict], str]:
    """`module-ingest query ARGV` in this process: (exit status, JSON lines, stderr)."""
    parser = cli._Parser(prog="module-ingest")
    query_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    config = load_config(config, environ={"MODULE_INGEST_DATA_DIR": str(data_dir)})
    capsys.readouterr()
    code = query_cli.cmd_query(parser.parse_args(["query", *argv]), config)
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


def usage_error(data_dir: Path, capsys, *argv: str) -> str:
    """The one line that argparse prints for a bad argument (exit 2)."""
    with pytest.raises(SystemExit) as exc:
        query(data_dir, capsys, *argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def rollups(sub: IndexSubscriber) -> list[tuple]:
    return sub.db.execute("SELECT minute, count, bytes, first_ns, last_ns FROM rollups").fetchall()


# -- inserting and querying -------------------------------------------------------------


def test_frames_are_found_by_time_with_their_location(tmp_path, capsys):
    sub = index(tmp_path)
    feed(sub, [rec(s, T0 + s * 10**6, size=s) for s in range(1, 101)])
    assert sub.inserted == 100
    code, lines, err = query(tmp_path, capsys, "--identity", ME, "--channel", "1")
    assert code == 0 and err == ""
    assert [x["seq"] for x in lines] == list(range(1, 101))
    assert lines[4] == {
        "id": ME,
        "channel": 1,
        "ts_ns": T0 + 5 * 10**6,
        "seq": 5,
        "recv_ns": T0 + 5 * 10**6 + 5,
        "segment": 7,
        "offset": 4096 + 64 * 5,
        "bytes": 5,
    }
    # --from inclusive, --to exclusive; Unix seconds down to the nanosecond
    start, end = f"{T0 // 10**9}.010", f"{T0 // 10**9}.020"
    _, lines, _ = query(tmp_path, capsys, "--from", start, "--to", end)
    assert [x["seq"] for x in lines] == list(range(10, 20))
    _, lines, _ = query(tmp_path, capsys, "--from", "2024-05-01T12:00:00.0995Z")
    assert [x["seq"] for x in lines] == [100]
    sub.close()


def test_series_are_filtered_and_ordered_by_identity_channel_time(tmp_path, capsys):
    sub = index(tmp_path)
    batch = [rec(s, T0 - s, ident="b", channel=2 - s % 2) for s in range(1, 7)]
    batch += [rec(s, T0 + s, ident="a", channel=3) for s in range(1, 4)]
    feed(sub, batch)
    _, lines, _ = query(tmp_path, capsys)
    assert [(x["id"], x["channel"], x["seq"]) for x in lines] == [
        ("a", 3, 1),
        ("a", 3, 2),
        ("a", 3, 3),
        ("b", 1, 5),
        ("b", 1, 3),
        ("b", 1, 1),
        ("b", 2, 6),
        ("b", 2, 4),
        ("b", 2, 2),
    ]
    _, lines, _ = query(tmp_path, capsys, "--channel", "2")
    assert [x["seq"] for x in lines] == [6, 4, 2]
    _, lines, _ = query(tmp_path, capsys, "--identity", "a", "--channel", "1")
    assert lines == []
    _, lines, _ = query(tmp_path, capsys, "--identity", "nobody")
    assert lines == []
    sub.close()


def test_limit_stops_and_says_so_on_stderr(tmp_path, capsys):
    sub = index(tmp_path)
    feed(sub, [rec(s, T0 + s, ident="a") for s in range(1, 6)])
    feed(sub, [rec(s, T0 + s, ident="b") for s in range(1, 4)])
    code, lines, err = query(tmp_path, capsys, "--limit", "8")
    assert code == 0 and len(lines) == 8 and err == ""  # exactly all: nothing cut
    code, lines, err = query(tmp_path, capsys, "--identity", "a", "--limit", "5")
    assert code == 0 and len(lines) == 5 and err == ""
    code, lines, err = query(tmp_path, capsys, "--limit", "6")
    assert code == 0 and len(lines) == 6
    assert err == "module-ingest: query: stopped at --limit 6; more match (--limit 0 for all)\n"
    _, lines, err = query(tmp_path, capsys, "--limit", "0")
    assert len(lines) == 8 and err == ""
    _, lines, err = query(tmp_path, capsys, "--stats", "--limit", "1")
    assert [x["id"] for x in lines] == ["a"] and "stopped at --limit 1" in err
    sub.close()


# -- at least once in, exactly once indexed ----------------------------------------------


def test_a_batch_delivered_again_is_not_counted_twice(tmp_path, capsys):
    sub = index(tmp_path)
    first = [rec(s, T0 + s * 10**6) for s in range(1, 11)]
    feed(sub, first)
    # the runner died after flush() but before its cursor commit: the batch comes again,
    # now with more behind it, to a new process
    sub.close()
    sub = index(tmp_path)
    feed(sub, first[5:] + [rec(s, T0 + s * 10**6) for s in range(11, 16)])
    assert (sub.inserted, sub.duplicates) == (5, 5)
    assert rollups(sub) == [(T0 // MINUTE_NS, 15, 150, T0 + 10**6, T0 + 15 * 10**6)]
    feed(sub, first)  # and once more, all of it old
    assert rollups(sub)[0][1] == 15
    _, lines, _ = query(tmp_path, capsys)
    assert [x["seq"] for x in lines] == list(range(1, 16))
    sub.close()


def test_what_was_not_flushed_is_not_kept(tmp_path):
    sub = index(tmp_path)
    sub.handle([rec(1, T0), rec(2, T0 + 1)])
    sub.close()  # killed before flush: the cursor did not move either
    sub = index(tmp_path)
    assert sub.db.execute("SELECT count(*) FROM frames").fetchone() == (0,)
    feed(sub, [rec(1, T0), rec(2, T0 + 1)])
    assert rollups(sub)[0][1] == 2
    sub.close()


def test_a_failed_batch_leaves_nothing_behind(tmp_path):
    sub = index(tmp_path)
    feed(sub, [rec(1, T0)])
    bad = [rec(2, T0 + 1, ident="new"), rec(3, T0 + 2, ident="new"), rec(4, T0 + 3)]
    bad.append(Record(7, 9999, ME, object(), 5, T0 + 4, T0, b"", 0))  # cannot be stored
    with pytest.raises(sqlite3.Error):
        sub.handle(bad)
    # the runner hands it again (fixed, here), and this time it goes in
    feed(sub, bad[:3])
    sub.flush()
    count = "SELECT count(*) FROM frames"
    assert sub.db.execute(count).fetchone() == (4,)
    assert sum(r[1] for r in rollups(sub)) == 4
    assert [r[0] for r in sub.db.execute("SELECT name FROM identities ORDER BY id")] == [ME, "new"]
    sub.close()


def test_u64_seq_and_time_are_kept_and_still_deduplicated(tmp_path, capsys):
    sub = index(tmp_path)
    big = [rec(2**64 - 1, 2**64 - 1), rec(2**63, T0)]
    feed(sub, big, big)
    assert (sub.inserted, sub.duplicates) == (2, 2)
    _, lines, _ = query(tmp_path, capsys)
    assert [(x["seq"], x["ts_ns"]) for x in lines] == [(2**63, T0), (2**64 - 1, 2**63 - 1)]
    sub.close()


# -- rollups and --stats ---------------------------------------------------------------------


def test_rollups_per_minute_and_the_stats_output(tmp_path, capsys):
    sub = index(tmp_path)
    # minute 0: 3 frames; minute 1: 2 frames; minute 3: 1 frame (none in minute 2)
    times = [T0 + 10**9, T0 + 2 * 10**9, T0 + 31 * 10**9, T0 + 61 * 10**9, T0 + 119 * 10**9]
    batch = [rec(i + 1, t, size=100 + i) for i, t in enumerate(times)]
    feed(sub, batch[3:], batch[:3], [rec(6, T0 + 200 * 10**9, size=1)])  # out of order
    m = T0 // MINUTE_NS
    assert sorted(rollups(sub)) == [
        (m, 3, 303, times[0], times[2]),
        (m + 1, 2, 207, times[3], times[4]),
        (m + 3, 1, 1, T0 + 200 * 10**9, T0 + 200 * 10**9),
    ]
    code, lines, _ = query(tmp_path, capsys, "--stats")
    assert code == 0
    assert lines == [
        {
            "id": ME,
            "channel": 1,
            "count": 6,
            "bytes": 511,
            "first_ns": times[0],
            "last_ns": T0 + 200 * 10**9,
            "first": "2024-05-01T12:00:01.000000000Z",
            "last": "2024-05-01T12:03:20.000000000Z",
            "rate": round(5 / 199, 3),
            "minutes": 3,
        }
    ]
    _, lines, _ = query(tmp_path, capsys, "--stats", "minute")
    assert [(x["minute"], x["count"], x["bytes"], x["rate"]) for x in lines] == [
        ("2024-05-01T12:00:00Z", 3, 303, round(2 / 30, 3)),
        ("2024-05-01T12:01:00Z", 2, 207, round(1 / 58, 3)),
        ("2024-05-01T12:03:00Z", 1, 1, None),
    ]
    assert lines[1]["minute_ns"] == (m + 1) * MINUTE_NS
    # stats cover whole minutes: every minute that overlaps [from, to)
    _, lines, _ = query(tmp_path, capsys, "--stats", "--from", "2024-05-01T12:01:59Z")
    assert (lines[0]["count"], lines[0]["minutes"]) == (3, 2)
    _, lines, _ = query(
        tmp_path, capsys, "--stats", "--from", "2024-05-01T12:00:30Z", "--to", "2024-05-01T12:01Z"
    )
    assert lines[0]["count"] == 3
    _, lines, _ = query(
        tmp_path, capsys, "--stats", "--from", "2024-05-01T12:02:00Z", "--to", "2024-05-01T12:03Z"
    )
    assert lines == []  # no data in range: no line
    sub.close()


# -- times ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("1714564800", T0),
        ("1714564800.5", T0 + 500_000_000),
        ("1714564800.123456789", T0 + 123_456_789),
        ("0", 0),
        ("2024-05-01T12:00:00Z", T0),
        ("2024-05-01t12:00:00z", T0),
        ("2024-05-01T12:00Z", T0),
        ("2024-05-01 12:00:00", T0),  # no offset: UTC
        ("2024-05-01T14:00:00+02:00", T0),
        ("2024-05-01T07:00:00-0500", T0),
        ("2024-05-01T12:00:00.000000001Z", T0 + 1),
        ("2024-05-01T12:00:00,25Z", T0 + 250_000_000),
        ("2024-05-01", T0 - 12 * HOUR_NS),
    ],
)
def test_times_are_unix_seconds_or_iso_8601(text, ns):
    assert parse_time(text) == ns


@pytest.mark.parametrize(
    "text",
    [
        "",
        "noon",
        "-5",
        "1e9",
        "2024-13-01",
        "2024-05-01T25:00Z",
        "2024-05-01T12:00.5Z",
        "1969-12-31",
    ],
)
def test_bad_times_are_refused(text):
    with pytest.raises(ValueError):
        parse_time(text)


def test_times_print_as_utc_with_nanoseconds():
    assert format_time(T0 + 1) == "2024-05-01T12:00:00.000000001Z"
    assert parse_time(format_time(T0 + 123)) == T0 + 123


# -- errors: one line, non-zero exit ------------------------------------------------------------


def test_usage_errors_are_one_line(tmp_path, capsys):
    err = usage_error(tmp_path, capsys, "--from", "noon")
    assert err.startswith("module-ingest query: argument --from: expected Unix seconds or")
    assert "--channel: a channel is 0..65535" in usage_error(tmp_path, capsys, "--channel", "x")
    assert "--limit" in usage_error(tmp_path, capsys, "--limit", "-1")
    assert "--stats: invalid choice" in usage_error(tmp_path, capsys, "--stats", "hourly")


def test_errors_about_the_index_are_one_line(tmp_path, capsys):
    code, _, err = query(tmp_path, capsys)
    assert code == 2
    assert err == (
        'module-ingest: query: no index subscriber (add [subscribers.NAME] with type = "index")\n'
    )
    index(tmp_path, "one").close()
    code, _, err = query(tmp_path, capsys, "--index", "two")
    assert (code, err) == (2, "module-ingest: query: no index subscriber 'two' (there are: one)\n")
    index(tmp_path, "two").close()
    code, _, err = query(tmp_path, capsys)
    assert code == 2
    assert err == "module-ingest: query: several indexes (one, two): pick one with --index\n"
    code, _, err = query(tmp_path, capsys, "--index", "two", "--from", "2", "--to", "1")
    assert (code, err) == (2, "module-ingest: query: --from must be before --to\n")
    assert query(tmp_path, capsys, "--index", "two")[:2] == (0, [])
    (tmp_path / "subscribers" / "two" / DB_NAME).write_bytes(b"not a database" * 1000)
    code, _, err = query(tmp_path, capsys, "--index", "two")
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("module-ingest: query: ") and "not a database" in err


def test_the_configured_index_without_data_yet(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text(f'[storage]\ndata_dir = "{tmp_path}"\n[subscribers.idx]\ntype = "index"\n')
    parser = cli._Parser(prog="module-ingest")
    query_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    code = query_cli.cmd_query(parser.parse_args(["query"]), load_config(config, environ={}))
    assert code == 2
    assert capsys.readouterr().err == (
        f"module-ingest: query: index 'idx' has no data yet "
        f"({tmp_path}/subscribers/idx/{DB_NAME} does not exist)\n"
    )


# -- retention and damage ------------------------------------------------------------------------


def test_retention_deletes_old_rows_in_bounded_chunks(tmp_path, capsys):
    now = T0 + 10 * HOUR_NS
    sub = index(tmp_path, retention_hours=1, rollup_retention_hours=5, retention_chunk=100)
    old = [rec(s, T0 + s * 10**9) for s in range(1, 251)]  # 10 h old, over 5 minutes
    new = [rec(1000 + s, now - s * 10**9) for s in range(1, 51)]  # this last minute
    other = [rec(s, T0 + 2 * HOUR_NS + s, ident="gone", channel=9) for s in range(1, 21)]
    for batch in (old, new, other):
        sub.handle(batch)
    sub.db.execute("COMMIT")  # flush() without its own retention pass
    counts = []
    while deleted := sub.expire(now):
        assert deleted <= 100
        counts.append(deleted)
    assert sum(counts) == 250 + 20 + 5 + 1  # frames; rollups of the old 5 minutes and "gone"
    _, lines, _ = query(tmp_path, capsys, "--limit", "0")
    assert sorted(x["seq"] for x in lines) == list(range(1001, 1051))
    _, lines, _ = query(tmp_path, capsys, "--stats")
    assert [(x["id"], x["count"]) for x in lines] == [(ME, 50)]
    # "gone" (8 h old) lost its rows and its rollup: the series is forgotten
    assert sub.db.execute("SELECT count(*) FROM series").fetchone() == (1,)
    sub.handle([rec(21, now, ident="gone", channel=9)])  # and comes back when it sends again
    sub.db.execute("COMMIT")
    _, lines, _ = query(tmp_path, capsys, "--identity", "gone")
    assert [x["seq"] for x in lines] == [21]
    sub.close()


def test_rollups_outlive_frames_when_told_to(tmp_path, capsys):
    sub = index(tmp_path, retention_hours=1, rollup_retention_hours=24)
    feed(sub, [rec(s, T0 + s) for s in range(1, 11)])  # flush() ran retention: T0 is years ago
    assert sub.db.execute("SELECT count(*) FROM frames").fetchone() == (0,)
    _, lines, _ = query(tmp_path, capsys, "--stats")
    assert lines == []  # 24 h of rollups are long gone too, by the wall clock
    sub.close()
    sub = index(tmp_path, retention_hours=1, rollup_retention_hours=1e6)
    feed(sub, [rec(s, T0 + s) for s in range(11, 21)])
    assert sub.db.execute("SELECT count(*) FROM frames").fetchone() == (0,)
    _, lines, _ = query(tmp_path, capsys, "--stats")
    assert [x["count"] for x in lines] == [10]
    sub.close()


def test_a_damaged_index_is_set_aside_and_a_new_one_starts(tmp_path, caplog):
    state = tmp_path / "subscribers" / "idx"
    state.mkdir(parents=True)
    (state / DB_NAME).write_bytes(b"\xff" * 8192)
    sub = index(tmp_path)
    feed(sub, [rec(1, T0)])
    aside = [p.name for p in state.iterdir() if ".damaged-" in p.name]
    assert len(aside) == 1 and aside[0].startswith(f"{DB_NAME}.damaged-")
    assert "is damaged" in caplog.text and "starting a new index" in caplog.text
    assert sub.inserted == 1
    sub.close()


def test_a_reader_sees_only_what_was_flushed(tmp_path):
    sub = index(tmp_path)
    feed(sub, [rec(1, T0)])
    sub.handle([rec(2, T0 + 1)])
    reader = IndexReader(tmp_path / "subscribers" / "idx" / DB_NAME)
    ((ident, _, channel),) = reader.series()
    assert [r[1] for r in reader.frames(ident, channel, None, None, 0)] == [1]
    sub.flush()
    assert [r[1] for r in reader.frames(ident, channel, None, None, 0)] == [1, 2]
    reader.close()
    sub.close()


# -- end to end: frames in over TCP, the index through `query` ----------------------------------

QUERY_IN_CLI = "query" in cli.build_parser()._subparsers._group_actions[0].choices


def subscriber_pid(d, name: str) -> int:
    """The daemon's child running `module-ingest subscriber NAME`, or 0."""
    found = subprocess.run(
        ["pgrep", "-P", str(d.proc.pid), "-f", f"subscriber {name}$"],
        capture_output=True,
        text=True,
        check=False,
    )
    pids = found.stdout.split()
    return int(pids[0]) if len(pids) == 1 else 0


def test_every_frame_is_indexed_once_through_a_kill_9(daemon_factory, capsys):
    d = daemon_factory('[subscribers.idx]\ntype = "index"\n')

    def indexed() -> int:
        code, lines, err = query(d.data_dir, capsys, "--stats", config=d.config)
        if "has no data yet" in err:
            return 0  # the subscriber process is starting
        assert code == 0, err
        return sum(x["count"] for x in lines)

    total = 3000
    sent = threading.Event()

    def stream() -> None:
        with Client(d.host, d.port, "dev/core-0", d.dev_token) as client:
            for i in range(total):
                client.send(1 + i % 2, b"frame %d" % i)
                if i % 100 == 99:
                    client.flush()  # paced: the kill lands while frames still come in
        sent.set()

    streamer = threading.Thread(target=stream)
    streamer.start()
    try:
        wait_for(lambda: indexed() >= 300, what="the index to have some frames")
        pid = wait_for(lambda: subscriber_pid(d, "idx"), what="the subscriber process")
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: subscriber_pid(d, "idx") not in (0, pid), what="a restart")
    finally:
        streamer.join()
    assert sent.is_set()
    wait_for(lambda: indexed() >= total, timeout=15, what="every frame in the index")
    assert "exited with -9; restarting" in d.log()
    code, lines, _ = query(d.data_dir, capsys, "--limit", "0", config=d.config)
    assert code == 0
    assert sorted(x["seq"] for x in lines) == list(range(1, total + 1))  # each exactly once
    assert {x["channel"] for x in lines} == {1, 2}
    code, stats, _ = query(d.data_dir, capsys, "--stats", config=d.config)
    assert [(x["channel"], x["count"]) for x in stats] == [(1, total // 2), (2, total // 2)]
    assert sum(x["bytes"] for x in stats) == sum(len(b"frame %d" % i) for i in range(total))
    # the location is the record in the store: `dump` finds the same frame there
    dumped = run_cli("dump", "--channel", "2", data_dir=d.data_dir)
    by_seq = {r["seq"]: r for r in map(json.loads, dumped.stdout.splitlines())}
    one = next(x for x in lines if x["seq"] == total)
    assert by_seq[total]["ts_ns"] == one["ts_ns"] and one["bytes"] == len(b"frame %d" % (total - 1))
    segment = d.data_dir / "wal" / f"{one['segment']:012d}.wal"
    data = segment.read_bytes()
    found = next(scan(data, one["segment"], one["offset"]))
    assert (found.identity, found.seq, found.payload) == ("dev/core-0", total, b"frame 2999")


@pytest.mark.skipif(not QUERY_IN_CLI, reason="cli.py does not register query_cli yet")
def test_the_query_command_through_the_cli(daemon_factory):
    d = daemon_factory('[subscribers.idx]\ntype = "index"\n')
    with Client(d.host, d.port, "dev/core-0", d.dev_token) as client:
        for i in range(50):
            client.send(3, b"%d" % i)
        client.flush()

    def count() -> int:
        out = run_cli("query", "--stats", data_dir=d.data_dir, config=d.config)
        if b"has no data yet" in out.stderr:
            return 0  # the subscriber has not created its database yet
        assert out.returncode == 0, out.stderr.decode()
        return sum(json.loads(line)["count"] for line in out.stdout.splitlines())

    wait_for(lambda: count() == 50, what="50 frames in the index")
    out = run_cli("query", "--channel", "3", "--limit", "10", data_dir=d.data_dir, config=d.config)
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 10
    assert out.stderr.decode().endswith("more match (--limit 0 for all)\n")
    out = run_cli("query", "--from", "noon", data_dir=d.data_dir, config=d.config)
    assert out.returncode == 2 and out.stderr.count(b"\n") == 1 and not out.stdout
