"""store/reader.py on segment bytes built here: where reading goes on after damage (no intact
record lost), what a gap past the trusted offset means, and that a record hidden in a sender's
payload is never read as a real one."""

from __future__ import annotations

import random

import pytest

from appliance.store.reader import Damage, SegmentReader
from appliance.store.segment import (
    BLOCK,
    DATA_START,
    FRAME_HEAD,
    encode_frame_record,
    encode_header,
    encode_padding,
    padding_to_block,
)

CORE = b"m-1/core-1"
ATTACKER = b"m-6/core-6"
VICTIM = b"m-2/core-2"
T0 = 1_700_000_000_000_000_000


def record(seq: int, size: int = 100, ident: bytes = CORE, payload: bytes | None = None) -> bytes:
    if payload is None:
        payload = random.Random(seq).randbytes(size)
    return encode_frame_record(ident, 1 + seq % 4, seq, T0 + seq, T0 + seq + 7, payload)


def build(*commits: list[bytes], size: int = 64 * BLOCK) -> tuple[bytearray, list[int]]:
    """A segment holding these commits, each padded to a block boundary as the writer does;
    also the offset of every frame record, in order."""
    data = bytearray(encode_header(1, T0, size))
    offsets = []
    for commit in commits:
        for rec in commit:
            offsets.append(len(data))
            data += rec
        pad = padding_to_block(len(data))
        if pad:
            data += encode_padding(pad)
    data += bytes(size - len(data))
    return data, offsets


def read(data, trusted: int | None = None) -> tuple[list, list[Damage]]:
    damages: list[Damage] = []
    reader = SegmentReader(bytes(data), 1, trusted=trusted, report=damages.append)
    return list(reader.records()), damages


def commits(seed: int, n: int = 6) -> list[list[bytes]]:
    rng = random.Random(seed)
    seq = 0
    out = []
    for _ in range(n):
        batch = []
        for _ in range(rng.randrange(3, 30)):
            seq += 1
            batch.append(record(seq, rng.randrange(0, 900)))
        out.append(batch)
    return out


# -- damage: every intact record is read ------------------------------------------------------


@pytest.mark.parametrize("which", ["first of a commit", "middle", "last of a commit"])
def test_any_one_damaged_byte_costs_only_the_record_it_is_in(which):
    """Every byte of one record in turn (its CRC, its length, its type, its fields, identity
    and payload): reading goes on at the next record, whatever the damage."""
    batches = commits(7)
    data, offsets = build(*batches)
    everything, damages = read(data)
    assert damages == [] and [r.offset for r in everything] == offsets
    if which == "first of a commit":
        victim = len(batches[0])
    elif which == "middle":
        victim = len(offsets) // 2
    else:
        victim = len(batches[0]) + len(batches[1]) - 1
    start, end = offsets[victim], everything[victim].end
    rng = random.Random(victim)
    for at in range(start, end):
        damaged = bytearray(data)
        damaged[at] ^= rng.randrange(1, 256)
        got, damages = read(damaged)
        assert [r.offset for r in got] == offsets[:victim] + offsets[victim + 1 :], at - start
        # on at the next record, or at the padding that ends the commit
        assert [(d.offset, d.resumed) for d in damages] == [(start, end)], at - start
        assert got[victim - 1 :] == everything[victim - 1 : victim] + everything[victim + 1 :]


def test_two_damaged_records_in_one_commit_cost_two_records():
    batches = commits(11, n=2)
    data, offsets = build(*batches)
    for victim in (3, 6):
        data[offsets[victim] + FRAME_HEAD + 4] ^= 0x5A
    got, damages = read(data)
    assert [r.offset for r in got] == [o for i, o in enumerate(offsets) if i not in (3, 6)]
    assert [d.offset for d in damages] == [offsets[3], offsets[6]]


def test_a_zeroed_block_in_the_middle_is_damage_and_reading_goes_on():
    """A lost sector reads as zeros, which look like the end of the data: in trusted data
    the reader looks further, says so, and goes on at the next record."""
    batches = commits(3)
    data, offsets = build(*batches)
    hole = (offsets[len(offsets) // 2] // BLOCK) * BLOCK  # a whole block, records cut in it
    data[hole : hole + BLOCK] = bytes(BLOCK)
    everything, _ = read(build(*batches)[0])
    got, damages = read(data)
    survivors = [r for r in everything if r.end <= hole or r.offset >= hole + BLOCK]
    assert [r.offset for r in got] == [r.offset for r in survivors]
    assert len(damages) == 1 and damages[0].resumed == min(
        r.offset for r in survivors if r.offset >= hole
    )


def test_the_zero_tail_is_the_end_and_no_damage():
    data, offsets = build(*commits(5))
    got, damages = read(data)
    assert damages == [] and len(got) == len(offsets)


def test_garbage_reads_as_nothing_and_ends():
    rng = random.Random(1)
    data = bytearray(encode_header(1, T0, 64 * BLOCK)) + rng.randbytes(63 * BLOCK)
    got, damages = read(data)
    assert got == []
    assert [(d.offset, d.resumed) for d in damages] == [(DATA_START, None)]


# -- past the trusted offset -------------------------------------------------------------------


def test_past_the_trusted_offset_a_gap_ends_the_reading_quietly():
    """The newest segment past its checkpoint: a gap may be a commit in flight (its later
    blocks written before its first) or a torn one that recovery will clear, so what
    follows is not read, and nothing is reported."""
    batches = commits(9, n=4)
    data, offsets = build(*batches)
    first_two = len(batches[0]) + len(batches[1])
    checkpoint = offsets[first_two]  # where the third commit starts
    data[checkpoint : checkpoint + BLOCK] = bytes(BLOCK)  # its first block not there yet
    got, damages = read(data, trusted=checkpoint)
    assert [r.offset for r in got] == offsets[:first_two] and damages == []
    # before the checkpoint the same gap is damage: read past, and said
    got, damages = read(data, trusted=None)
    assert len(damages) == 1 and got[-1].offset == offsets[-1]


# -- a record hidden in a payload ------------------------------------------------------------


def hiding(length_after_flip: int, payload_size: int) -> bytes:
    """An attacker's payload holding, where its record's length would point after the flip
    of one bit, a valid record of another identity with a huge seq, followed by a padding
    record that ends exactly where the payload does (so a reader that lands on it is carried
    back into the real records after it)."""
    head = FRAME_HEAD + len(ATTACKER)  # the payload starts this far into the record
    fake = encode_frame_record(VICTIM, 1, 10**15, T0, T0, b"forged")
    junk = 8 + length_after_flip - head
    rest = payload_size - junk - len(fake)
    assert junk > 0 and rest >= 9
    return bytes(junk) + fake + encode_padding(rest)


@pytest.mark.parametrize("damage", ["crc", "length bit", "length byte", "payload", "identity"])
def test_a_record_hidden_in_a_payload_is_never_read_after_damage(damage):
    payload_size = 2000
    length = FRAME_HEAD - 8 + len(ATTACKER) + payload_size
    bit = 1 << 10  # set in `length`: flipping it points the length at the hidden record
    assert length & bit
    attack = record(2, ident=ATTACKER, payload=hiding(length ^ bit, payload_size))
    batch = [record(1), attack, record(3), record(4)]
    data, offsets = build(batch, [record(5)])
    at = offsets[1]
    if damage == "crc":
        data[at] ^= 0xFF
    elif damage == "length bit":
        data[at + 6] ^= bit >> 8  # big-endian: bits 8-15 of the length are its third byte
        assert int.from_bytes(data[at + 4 : at + 8], "big") == length ^ bit
    elif damage == "length byte":
        data[at + 6] = 0x01  # another value in that byte: a shorter length, into the payload
    elif damage == "payload":
        data[offsets[2] - 1] ^= 0x01  # the last byte of the padding hidden in the payload
    else:
        data[at + FRAME_HEAD] ^= 0x20
    got, damages = read(data)
    assert VICTIM.decode() not in {r.identity for r in got}
    assert [r.seq for r in got] == [1, 3, 4, 5]
    assert [(d.offset, d.resumed) for d in damages] == [(at, offsets[2])]
