"""The ring on its own (no writer): batches keep their bytes until durable, and the fleet
shape's small batches keep to the ring's first megabyte."""

from __future__ import annotations

import pytest

from appliance.store.ring import Ring
from appliance.store.segment import DATA_START, encode_frame_record

MiB = 1024 * 1024


def read(ring: Ring, start: int, end: int) -> bytes:
    """What the writer reads of ring bytes [start, end)."""
    a, b = start % ring.size, (end - 1) % ring.size + 1
    if a < b:
        return bytes(ring.memory[a:b])
    return bytes(ring.memory[a:]) + bytes(ring.memory[:b])


def stream(ring: Ring, batches: int, per_batch: int, payload: int) -> list[int]:
    """Append, cut and make durable like the loop and the writer do, one batch in flight
    at a time and the next gathering meanwhile; checks every batch's bytes when it is
    written and the pending count throughout; returns the ring offset of every batch."""
    seq = 0
    inflight = None  # (batch, the bytes it held when it was cut)
    starts = []
    expected_pending = 0
    for _ in range(batches):
        records = []
        for _ in range(per_batch):
            seq += 1
            rec = encode_frame_record(b"core", 1, seq, seq, seq, bytes([seq % 251]) * payload)
            assert ring.append([rec], "core", [seq]) == 1
            records.append(rec)
            expected_pending += len(rec)
        assert ring.pending() == expected_pending
        if inflight is not None:  # the writer finishes the previous batch
            batch, held = inflight
            assert read(ring, batch.start, batch.end) == held  # not overwritten meanwhile
            ring.made_durable(batch.end)
            expected_pending -= batch.end - batch.start
            assert ring.pending() == expected_pending
        batch = ring.cut()
        held = read(ring, batch.start, batch.end)
        assert held.startswith(b"".join(records)) and len(held) % 4096 == 0
        assert batch.marks == {"core": seq} and batch.frames == per_batch
        expected_pending += len(held) - len(b"".join(records))  # its padding
        assert ring.pending() == expected_pending
        inflight = (batch, held)
        starts.append(batch.start % ring.size)
    batch, held = inflight
    assert read(ring, batch.start, batch.end) == held
    ring.made_durable(batch.end)
    assert ring.pending() == 0
    return starts


def test_small_batches_keep_to_the_rings_first_megabyte():
    ring = Ring(16 * MiB, 1 << 40, DATA_START, 4 * MiB)
    starts = stream(ring, 10_000, 14, 64)  # ~40 MiB of blocks through a 16 MiB ring
    assert ring.head > 2 * ring.size
    assert max(starts) < ring.wrap_at + 4 * 4096


@pytest.mark.parametrize("per_batch", [1, 300, 4000])
def test_batches_of_any_size_keep_their_bytes_until_durable(per_batch):
    """From one block to most of the ring's room: a batch starts over at the beginning
    only when the one in flight leaves room, and never overwrites it."""
    ring = Ring(1 * MiB, 1 << 40, DATA_START, 4 * MiB)
    stream(ring, 3000 // per_batch + 40, per_batch, 40)
