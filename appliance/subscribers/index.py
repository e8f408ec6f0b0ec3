"""The index subscriber: where every frame is in the log, by identity, channel and time.

    [subscribers.idx]
    type = "index"
    retention_hours = 48            # frames older than this go; 0 (default) keeps them
    rollup_retention_hours = 720    # per-minute rollups; default: retention_hours
    synchronous = "full"            # or "normal": fewer fsyncs, see below
    cache_mib = 8                   # SQLite page cache of the subscriber process
    retention_chunk = 10000         # rows deleted per transaction at most

One SQLite database (stdlib sqlite3, WAL journal), STATE_DIR/index.sqlite3,
that `module-ingest query` reads beside the running subscriber:

    identities(id, name)            each identity string once (id INTEGER PRIMARY KEY)
    series(identity, channel)       every (identity, channel) pair with data
    frames(identity, channel, ts_ns, seq, recv_ns, wal_segment, wal_offset, bytes)
                                    one row per frame, clustered on its key
                                    (identity, channel, ts_ns, seq): a time range of
                                    one series is one contiguous B-tree range
    rollups(identity, channel, minute, count, bytes, first_ns, last_ns)
                                    one row per series and minute with data:
                                    minute = ts_ns // 60e9, bytes = payload bytes
    meta(key, value)                schema version

ts_ns is the sender's clock (the frame header), recv_ns the appliance's. The
location (wal_segment, wal_offset) is where the record starts in segment file
segment_name(wal_segment) of the store (data_dir/wal): `segment.scan(data,
wal_segment, wal_offset)` yields it first, payload included. The store's own
retention may delete a segment before the index forgets its rows.

Exactly once from at-least-once delivery: a redelivered frame has the same
(identity, channel, ts_ns, seq), so INSERT OR IGNORE on that key drops it, and
the rollups add only the rows actually inserted. The daemon refuses replays, so
two frames never share (identity, seq) and the key needs no second index.
Values that do not fit SQLite's signed 64 bits are folded: ts_ns and recv_ns
are capped at 2**63 - 1, a seq of 2**63 or more is stored as seq - 2**64.

Durability: the rows of the batches handled since the last flush() are one
transaction, committed by flush(). With synchronous = "full" (the default) the
commit is on flash before the runner moves the cursor: data first, then the
pointer. "normal" skips that fsync (SQLite syncs at checkpoints); a kill loses
nothing, but a power cut may lose the last commits the cursor has already
passed.

Retention runs after a flush, every RETENTION_EVERY seconds, and sooner while
there is a backlog: at most `retention_chunk` rows per transaction, judged by
ts_ns against the appliance's wall clock. A damaged database (power cut on a
bad card) is set aside as index.sqlite3.damaged-STAMP, said once in the log,
and a new index starts; the failed batch comes again into the new one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from appliance.config import OptionError
from appliance.durable import fsync_dir
from appliance.store.segment import Record
from appliance.subscribers.base import Context, Subscriber

log = logging.getLogger("appliance.subscribers.index")

DB_NAME = "index.sqlite3"
SCHEMA_VERSION = 1
MINUTE_NS = 60 * 10**9
HOUR_NS = 60 * MINUTE_NS
I64_MIN = -(2**63)
I64_MAX = 2**63 - 1
RETENTION_EVERY = 10.0  # seconds between retention passes that found nothing (much) to do
IDS_CACHE_MAX = 65536  # identity names cached in memory; cleared beyond (bounded memory)
CORRUPT_CODES = (11, 26)  # SQLITE_CORRUPT, SQLITE_NOTADB
JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024  # the -wal file is truncated to this after a checkpoint

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS identities(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS series(
    identity INTEGER NOT NULL,
    channel INTEGER NOT NULL,
    PRIMARY KEY (identity, channel)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS frames(
    identity INTEGER NOT NULL,
    channel INTEGER NOT NULL,
    ts_ns INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    recv_ns INTEGER NOT NULL,
    wal_segment INTEGER NOT NULL,
    wal_offset INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (identity, channel, ts_ns, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rollups(
    identity INTEGER NOT NULL,
    channel INTEGER NOT NULL,
    minute INTEGER NOT NULL,
    count INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    first_ns INTEGER NOT NULL,
    last_ns INTEGER NOT NULL,
    PRIMARY KEY (identity, channel, minute)
) WITHOUT ROWID;
"""

INSERT_FRAME = "INSERT OR IGNORE INTO frames VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
UPSERT_ROLLUP = """
INSERT INTO rollups VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (identity, channel, minute) DO UPDATE SET
    count = count + excluded.count,
    bytes = bytes + excluded.bytes,
    first_ns = min(first_ns, excluded.first_ns),
    last_ns = max(last_ns, excluded.last_ns)
"""

Row = tuple[int, int, int, int, int, int, int, int]  # a frames row, in column order


class IndexFileError(Exception):
    """The index file cannot be used (missing, from a newer version); one line."""


def is_corrupt(exc: BaseException) -> bool:
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF in CORRUPT_CODES


# -- the database ----------------------------------------------------------------------


def open_writer(path: Path, synchronous: str = "full", cache_mib: int = 8) -> sqlite3.Connection:
    """The index at `path`, created if missing, in WAL mode, outside any transaction."""
    if not path.exists():
        _create(path)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise IndexFileError(f"{path}: cannot use WAL journal mode (got {mode})")
        db.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        db.execute(f"PRAGMA cache_size = {-1024 * cache_mib}")
        db.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
        db.executescript(SCHEMA)
        db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        version = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]
        if version != SCHEMA_VERSION:
            raise IndexFileError(f"{path}: index schema {version}, this version knows only 1")
    except BaseException:
        db.close()
        raise
    return db


def _create(path: Path) -> None:
    """A new, empty index, made under another name and renamed into place: a reader
    never finds the file without its tables."""
    tmp = path.with_name(path.name + ".new")
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{tmp}{suffix}").unlink(missing_ok=True)
    db = sqlite3.connect(tmp, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.executescript(SCHEMA)
        db.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
    finally:
        db.close()  # the last connection: checkpoints and removes tmp-wal
    os.replace(tmp, path)
    fsync_dir(path.parent)


def set_aside(path: Path, why: object) -> Path:
    """Rename a damaged index (and its -wal, -shm) out of the way; the new name of the file."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        src = Path(f"{path}{suffix}")
        if src.exists():
            src.rename(f"{target}{suffix}")
    log.error("index: %s is damaged (%s); set aside as %s, starting a new index", path, why, target)
    return target


def _fit(row: Row) -> Row:
    """A row whose u64 values are folded into SQLite's signed 64 bits (see the docstring)."""
    ident, channel, ts, seq, recv, segment, offset, size = row
    if seq > I64_MAX:
        seq -= 2**64
    return (ident, channel, min(ts, I64_MAX), seq, min(recv, I64_MAX), segment, offset, size)


def unfold_seq(seq: int) -> int:
    return seq + 2**64 if seq < 0 else seq


class IndexSubscriber(Subscriber):
    """Index every frame of the batches: location by (identity, channel, ts), minute rollups."""

    OPTIONS = {  # documented in the module docstring
        "retention_hours": (float, 0.0, 0),
        "rollup_retention_hours": (float, -1.0, None),  # -1: as retention_hours
        "synchronous": (str, "full", None),
        "cache_mib": (int, 8, 1),
        "retention_chunk": (int, 10000, 100),
    }
    CHOICES = {"synchronous": ("full", "normal")}

    @classmethod
    def check(cls, options: dict[str, Any], config_dir: Path) -> None:
        if options["rollup_retention_hours"] < 0 and options["rollup_retention_hours"] != -1:
            raise OptionError("rollup_retention_hours", "hours >= 0 (or -1: as retention_hours)")

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        opts = self.options
        rollup_hours = opts["rollup_retention_hours"]
        self.retention_ns = int(opts["retention_hours"] * HOUR_NS)
        self.rollup_retention_ns = int(
            (opts["retention_hours"] if rollup_hours < 0 else rollup_hours) * HOUR_NS
        )
        self.chunk = opts["retention_chunk"]
        self.synchronous = opts["synchronous"]
        self.cache_mib = opts["cache_mib"]
        self.path = Path(context.state_dir) / DB_NAME
        self._ids: dict[str, int] = {}
        self._series: set[tuple[int, int]] = set()
        self._next_expire = 0.0
        self._expire_from = 0  # retention goes round the series from here
        self.inserted = 0  # counters, in stats
        self.duplicates = 0
        self.expired = 0
        self.db = self._open()

    def _open(self) -> sqlite3.Connection:
        try:
            return open_writer(self.path, self.synchronous, self.cache_mib)
        except sqlite3.DatabaseError as exc:
            if not is_corrupt(exc):
                raise
            set_aside(self.path, exc)
            return open_writer(self.path, self.synchronous, self.cache_mib)

    def _start_over(self, exc: BaseException) -> None:
        """The database is damaged: set it aside and open a new one."""
        self._ids.clear()
        self._series.clear()
        with contextlib.suppress(sqlite3.Error):
            self.db.close()
        set_aside(self.path, exc)
        self.db = open_writer(self.path, self.synchronous, self.cache_mib)

    # -- the plug-in interface -----------------------------------------------------

    def handle(self, records: list[Record]) -> None:
        if not records:
            return
        db = self.db
        try:
            if not db.in_transaction:
                db.execute("BEGIN")
            db.execute("SAVEPOINT batch")
            self._add(records)
            db.execute("RELEASE batch")
        except BaseException as exc:
            self._ids.clear()  # they may name rows that the rollback removes
            self._series.clear()
            try:
                if db.in_transaction:  # (SQLite ends it by itself after some errors)
                    db.execute("ROLLBACK TO batch")
                    db.execute("RELEASE batch")
            except sqlite3.Error:
                pass
            if is_corrupt(exc):
                self._start_over(exc)
            raise  # the runner hands the batch again

    def flush(self) -> None:
        if self.db.in_transaction:
            try:
                self.db.execute("COMMIT")
            except BaseException as exc:
                self._ids.clear()
                self._series.clear()
                try:
                    if self.db.in_transaction:
                        self.db.execute("ROLLBACK")  # the cursor stays: it all comes again
                except sqlite3.Error:
                    pass
                if is_corrupt(exc):
                    self._start_over(exc)
                raise
        retention = self.retention_ns or self.rollup_retention_ns
        if retention and time.monotonic() >= self._next_expire:
            try:
                deleted = self.expire()
            except sqlite3.Error as exc:
                log.warning("index %s: retention failed: %s; trying again later", self.name, exc)
                deleted = 0
            pause = 0.0 if deleted >= self.chunk else RETENTION_EVERY  # a backlog: on it goes
            self._next_expire = time.monotonic() + pause

    def stats(self) -> dict[str, Any]:
        return {"inserted": self.inserted, "duplicates": self.duplicates, "expired": self.expired}

    def close(self) -> None:
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")  # not flushed: the cursor did not pass it either
        self.db.close()

    # -- inserting -------------------------------------------------------------------

    def _identity_ids(self, names: Iterable[str]) -> dict[str, int]:
        ids = self._ids
        missing = [n for n in names if n not in ids]
        if missing and len(ids) + len(missing) > IDS_CACHE_MAX:
            ids.clear()
            missing = list(names)
        for name in missing:
            self.db.execute("INSERT OR IGNORE INTO identities (name) VALUES (?)", (name,))
            ids[name] = self.db.execute(
                "SELECT id FROM identities WHERE name = ?", (name,)
            ).fetchone()[0]
        return ids

    def _add(self, records: list[Record]) -> None:
        db = self.db
        ids = self._identity_ids({r.identity for r in records})
        rows = [
            (ids[r.identity], r.channel, r.ts_ns, r.seq, r.recv_ns, r.segment, r.offset,
             len(r.payload))
            for r in records
        ]  # fmt: skip
        series = {(row[0], row[1]) for row in rows} - self._series
        if series:
            db.executemany("INSERT OR IGNORE INTO series VALUES (?, ?)", series)
            self._series |= series
        inserted = self._insert(rows)
        self.inserted += len(inserted)
        self.duplicates += len(rows) - len(inserted)
        self._roll_up(inserted)

    def _insert(self, rows: list[Row]) -> list[Row]:
        """Insert the new rows; the ones actually inserted (not there before)."""
        db = self.db
        db.execute("SAVEPOINT frames")
        try:
            try:
                if db.executemany(INSERT_FRAME, rows).rowcount == len(rows):
                    return rows  # the usual case: all new
            except OverflowError:
                pass  # a u64 beyond SQLite's integers: fold them, below
            # some are there already (a batch delivered again): find which, row by row
            db.execute("ROLLBACK TO frames")
            inserted = []
            for row in rows:
                row = _fit(row)
                if db.execute(INSERT_FRAME, row).rowcount:
                    inserted.append(row)
            return inserted
        finally:
            db.execute("RELEASE frames")

    def _roll_up(self, rows: list[Row]) -> None:
        buckets: dict[tuple[int, int, int], list[int]] = {}
        for ident, channel, ts, _seq, _recv, _segment, _offset, size in rows:
            key = (ident, channel, ts // MINUTE_NS)
            b = buckets.get(key)
            if b is None:
                buckets[key] = [1, size, ts, ts]
            else:
                b[0] += 1
                b[1] += size
                if ts < b[2]:
                    b[2] = ts
                elif ts > b[3]:
                    b[3] = ts
        if buckets:
            self.db.executemany(UPSERT_ROLLUP, [(*k, *v) for k, v in buckets.items()])

    # -- retention -------------------------------------------------------------------

    def expire(self, now_ns: int | None = None) -> int:
        """One retention pass, in its own transaction: deletes at most `retention_chunk`
        frames and as many rollups older than the retention; the number of rows deleted."""
        if self.db.in_transaction:
            raise RuntimeError("expire() between handle() and flush()")
        now_ns = time.time_ns() if now_ns is None else now_ns
        db = self.db
        series = db.execute("SELECT identity, channel FROM series ORDER BY 1, 2").fetchall()
        if not series:
            return 0
        start = self._expire_from % len(series)
        order = series[start:] + series[:start]
        frames_cut = now_ns - self.retention_ns if self.retention_ns else None
        minute_cut = (
            (now_ns - self.rollup_retention_ns) // MINUTE_NS if self.rollup_retention_ns else None
        )
        budget = self.chunk
        deleted = 0
        db.execute("BEGIN")
        try:
            for i, (ident, channel) in enumerate(order):
                if budget <= 0:
                    self._expire_from = start + i  # the rest get their turn first next time
                    break
                n = 0
                if frames_cut is not None:
                    n += self._delete_frames(ident, channel, frames_cut, budget)
                if minute_cut is not None and n < budget:
                    n += self._delete_rollups(ident, channel, minute_cut, budget - n)
                budget -= n
                deleted += n
                if n:
                    self._forget_if_empty(ident, channel)
            else:
                self._expire_from = 0
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self._series.clear()
            raise
        self.expired += deleted
        if deleted:
            log.debug("index %s: retention deleted %d rows", self.name, deleted)
        return deleted

    def _delete_frames(self, ident: int, channel: int, cut: int, limit: int) -> int:
        key = (ident, channel, cut)
        last = self.db.execute(
            "SELECT ts_ns, seq FROM frames WHERE identity = ? AND channel = ? AND ts_ns < ?"
            " ORDER BY ts_ns, seq LIMIT 1 OFFSET ?",
            (*key, limit - 1),
        ).fetchone()
        if last is None:  # fewer than `limit` to go: all of them
            sql = "DELETE FROM frames WHERE identity = ? AND channel = ? AND ts_ns < ?"
            return self.db.execute(sql, key).rowcount
        sql = "DELETE FROM frames WHERE identity = ? AND channel = ? AND (ts_ns, seq) <= (?, ?)"
        return self.db.execute(sql, (ident, channel, *last)).rowcount

    def _delete_rollups(self, ident: int, channel: int, cut_minute: int, limit: int) -> int:
        key = (ident, channel, cut_minute)
        last = self.db.execute(
            "SELECT minute FROM rollups WHERE identity = ? AND channel = ? AND minute < ?"
            " ORDER BY minute LIMIT 1 OFFSET ?",
            (*key, limit - 1),
        ).fetchone()
        sql = "DELETE FROM rollups WHERE identity = ? AND channel = ? AND minute "
        if last is None:
            return self.db.execute(sql + "< ?", key).rowcount
        return self.db.execute(sql + "<= ?", (ident, channel, last[0])).rowcount

    def _forget_if_empty(self, ident: int, channel: int) -> None:
        key = (ident, channel)
        for table in ("frames", "rollups"):
            sql = f"SELECT 1 FROM {table} WHERE identity = ? AND channel = ? LIMIT 1"
            if self.db.execute(sql, key).fetchone():
                return
        self.db.execute("DELETE FROM series WHERE identity = ? AND channel = ?", key)
        self._series.discard(key)


# -- reading ---------------------------------------------------------------------------


class IndexReader:
    """Read-only access to an index, safe beside the subscriber writing it (WAL readers
    see the last commit and never block the writer)."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise IndexFileError(f"no index at {path}")
        self.path = path
        try:
            self.db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
            version = self.db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise IndexFileError(f"{path}: {exc}") from None
        if version is None or version[0] != SCHEMA_VERSION:
            raise IndexFileError(f"{path}: not an index of this version")

    def close(self) -> None:
        self.db.close()

    def series(self, identity: str | None = None, channel: int | None = None):
        """[(identity id, identity name, channel)] with data, by name and channel."""
        sql = (
            "SELECT s.identity, i.name, s.channel FROM series s"
            " JOIN identities i ON i.id = s.identity WHERE 1"
        )
        args: list[Any] = []
        if identity is not None:
            sql += " AND i.name = ?"
            args.append(identity)
        if channel is not None:
            sql += " AND s.channel = ?"
            args.append(channel)
        return self.db.execute(sql + " ORDER BY i.name, s.channel", args).fetchall()

    def frames(
        self, ident: int, channel: int, start: int | None, end: int | None, limit: int
    ) -> Iterator[tuple[int, int, int, int, int, int]]:
        """(ts_ns, seq, recv_ns, segment, offset, bytes) of one series with
        start <= ts_ns < end, in time order; at most `limit` (0: all), streamed."""
        return self.db.execute(
            "SELECT ts_ns, seq, recv_ns, wal_segment, wal_offset, bytes FROM frames"
            " WHERE identity = ? AND channel = ? AND ts_ns BETWEEN ? AND ?"
            " ORDER BY ts_ns, seq LIMIT ?",
            (ident, channel, *_bounds(start, end), limit or -1),
        )

    def minutes(
        self, ident: int, channel: int, start: int | None, end: int | None, limit: int
    ) -> Iterator[tuple[int, int, int, int, int]]:
        """(minute, count, bytes, first_ns, last_ns) of the minutes that overlap
        [start, end), in order; at most `limit` (0: all)."""
        return self.db.execute(
            "SELECT minute, count, bytes, first_ns, last_ns FROM rollups"
            " WHERE identity = ? AND channel = ? AND minute BETWEEN ? AND ?"
            " ORDER BY minute LIMIT ?",
            (ident, channel, *_minute_bounds(start, end), limit or -1),
        )

    def summary(
        self, ident: int, channel: int, start: int | None, end: int | None
    ) -> tuple[int, int, int | None, int | None, int]:
        """(count, bytes, first_ns, last_ns, minutes with data) over the minutes that
        overlap [start, end)."""
        row = self.db.execute(
            "SELECT total(count), total(bytes), min(first_ns), max(last_ns), count(*)"
            " FROM rollups WHERE identity = ? AND channel = ? AND minute BETWEEN ? AND ?",
            (ident, channel, *_minute_bounds(start, end)),
        ).fetchone()
        return int(row[0]), int(row[1]), row[2], row[3], row[4]


def _bounds(start: int | None, end: int | None) -> tuple[int, int]:
    """[start, end) as inclusive SQLite integers (None: unbounded)."""
    lo = I64_MIN if start is None else max(I64_MIN, min(start, I64_MAX))
    hi = I64_MAX if end is None else max(I64_MIN, min(end - 1, I64_MAX))
    return lo, hi


def _minute_bounds(start: int | None, end: int | None) -> tuple[int, int]:
    """The first and last minute that overlap [start, end)."""
    lo, hi = _bounds(start, end)
    return lo // MINUTE_NS, hi // MINUTE_NS
