"""Reading the log fast, for subscriber processes: the segment mapped once, walked in
large steps, and a record built only for the frames the table's filters keep.

The store's Cursor decodes every frame and lists the segment directory and maps
the file again on every read: about 3 us a frame here, which four subscribers
pay four times over at the ingest rate. This reader walks the same format
(store/FORMAT.md) with one struct read and one CRC per record, skips frames the
filters drop before decoding their identity and payload, and hands on
`segment.Record`s. Anything unusual (a CRC mismatch, an unknown record type, a
missing or damaged segment) is left to the Cursor's own reading, which knows
how to skip damage and says so: the fast path only ever reads clean records.
"""

from __future__ import annotations

import mmap
import os
import zlib
from pathlib import Path

from appliance.store.cursor import Cursor
from appliance.store.segment import (
    DATA_START,
    FRAME_FIELDS,
    FRAME_HEAD,
    PREFIX,
    SEGMENT_HEADER,
    TYPE_FRAME,
    TYPE_PAD,
    Record,
    SegmentError,
    check_header,
    list_segments,
    segment_name,
)

CHUNK = 4 * 1024 * 1024  # bytes of log walked per read at most
IDS_MAX = 65536  # identity strings kept (bytes -> str), cleared beyond


class LogReader:
    """Reads after `cursor.position`, moves it on; the cursor's owner commits."""

    def __init__(
        self, cursor: Cursor, channels=frozenset(), identities=frozenset(), chunk: int = CHUNK
    ) -> None:
        self.cursor = cursor
        self.channels = frozenset(channels) or None
        self.identities = frozenset(identities) or None
        self.chunk = chunk
        self._number = 0  # the segment mapped
        self._map: mmap.mmap | None = None
        self._ids: dict[bytes, str] = {}

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None

    def read(self, limit: int) -> tuple[list, bool]:
        """(the kept frames after the position, at most `limit`; whether the position moved)."""
        start = self.cursor.position
        out: list = []
        while len(out) < limit:
            if not self._read_once(out, limit):
                break
        return out, self.cursor.position != start

    def _read_once(self, out: list, limit: int) -> bool:
        """Walk from the position; False when nothing more is there for now."""
        seg, off = self.cursor.position
        data = self._mapped(seg)
        if data is None:
            return self._slow(out, limit)
        pos = max(off, DATA_START)
        size = len(data)
        stop = min(size, pos + self.chunk)
        channels, identities, ids = self.channels, self.identities, self._ids
        unpack_prefix, unpack_fields = PREFIX.unpack_from, FRAME_FIELDS.unpack_from
        crc32 = zlib.crc32
        view = memoryview(data)
        try:
            while pos + 8 <= stop and len(out) < limit:
                crc, length = unpack_prefix(data, pos)
                nxt = pos + 8 + length
                if length == 0 or nxt > size or crc32(view[pos + 4 : nxt]) != crc:
                    break
                kind = data[pos + 8]
                if kind == TYPE_FRAME:
                    _, _, _, channel, id_len, _, recv_ns, ts_ns, seq = unpack_fields(data, pos + 4)
                    if channels is None or channel in channels:
                        id_end = pos + FRAME_HEAD + id_len
                        raw = data[pos + FRAME_HEAD : id_end]
                        ident = ids.get(raw)
                        if ident is None:
                            if len(ids) >= IDS_MAX:
                                ids.clear()
                            ident = ids[raw] = raw.decode("utf-8", "replace")
                        if identities is None or ident in identities:
                            out.append(
                                Record(seg, pos, ident, channel, seq, ts_ns, recv_ns,
                                       data[id_end:nxt], nxt)
                            )  # fmt: skip
                elif kind != TYPE_PAD:
                    break
                pos = nxt
        finally:
            view.release()
        moved = pos > max(off, DATA_START)
        if moved:
            self.cursor.position = (seg, pos)
            return True
        if pos + 8 <= size and data[pos : pos + 8] != bytes(8):
            return self._slow(out, limit)  # a bad record: the cursor skips it and says so
        if not any(n > seg for n, _ in list_segments(self.cursor.directory)):
            return False  # the newest segment: more may come
        # Zeros in a sealed segment are its end, or a lost sector with data after it: the
        # cursor tells the two apart, and goes on to the next segment itself.
        return self._slow(out, limit)

    def _mapped(self, seg: int) -> mmap.mmap | None:
        """The segment's file, mapped (once per segment); None when it cannot be read
        this way (missing, empty, a bad header): the slow path decides."""
        if self._map is not None and self._number == seg:
            return self._map
        self.close()
        path: Path = self.cursor.directory / segment_name(seg)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            if os.fstat(fd).st_size < SEGMENT_HEADER.size:
                return None
            data = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)
        try:
            check_header(data, seg)
        except SegmentError:
            data.close()
            return None
        self._map, self._number = data, seg
        return data

    def _slow(self, out: list, limit: int) -> bool:
        """The Cursor's reading for what the fast path does not handle."""
        got = self.cursor.read(limit - len(out)) if len(out) < limit else []
        for rec in got:
            if (self.channels is None or rec.channel in self.channels) and (
                self.identities is None or rec.identity in self.identities
            ):
                out.append(rec)
        return bool(got)
