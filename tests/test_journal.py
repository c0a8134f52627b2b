"""The request journal (vmbus/journal.py) on real rings: every request taken is
completed exactly once whatever the moment the host "dies" (its objects dropped,
the slot and the rings kept, as the VMM keeps them), and a hostile slot is
refused or trimmed, never trusted."""

from __future__ import annotations

import random
import struct

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from test_channel import channel_pair

from vmbus.journal import (
    COMPLETING,
    ENTRY,
    FREE,
    HEADER_SIZE,
    STAGED,
    TAKEN,
    JournalError,
    RequestJournal,
)
from vmbus.packet import completion, inband
from vmbus.ring import FLAG_COMPLETION_REQUESTED, OFF_READ_INDEX, iter_packets

pytestmark = pytest.mark.timeout(60)
ESIZE = 256
SLOT = 64 * 1024


def _requests(first: int, n: int) -> list:
    return [
        inband(struct.pack("<Q", tid) * 3)._replace(trans_id=tid, flags=FLAG_COMPLETION_REQUESTED)
        for tid in range(first, first + n)
    ]


async def _completions(guest, n: int) -> list[int]:  # type: ignore[no-untyped-def]
    got: list[int] = []
    while len(got) < n:
        b = await guest.receive()
        got += [p.trans_id for p in b]
    return got


def _states(slot: memoryview, j: RequestJournal) -> list[int]:
    return [ENTRY.unpack_from(slot, HEADER_SIZE + e * ESIZE)[0] for e in range(j.capacity)]


async def test_normal_flow_frees_every_entry() -> None:
    slot = memoryview(bytearray(SLOT))
    with channel_pair() as (host, guest, rings):
        j = RequestJournal.attach(slot, rings, entry_size=ESIZE)
        await guest.send(_requests(1, 10))
        batch, entries = await j.receive(host, 64)
        assert len(batch) == 10 and len(set(entries)) == 10
        assert set(_states(slot, j)) == {FREE, TAKEN}
        pkts = [completion(p.trans_id, b"ok") for p in batch]
        await j.send_completions(host, entries, pkts)
        assert sorted(await _completions(guest, 10)) == list(range(1, 11))
        assert set(_states(slot, j)) == {FREE} and j.free == j.capacity


async def test_crash_after_taking_reexecutes_each_request_once() -> None:
    slot = memoryview(bytearray(SLOT))
    with channel_pair() as (host, guest, rings):
        j = RequestJournal.attach(slot, rings, entry_size=ESIZE)
        await guest.send(_requests(1, 5))
        batch, entries = await j.receive(host, 64)
        raw = [bytes(p.payload) for p in batch]
        # Two of them completed, then the host dies.
        await j.send_completions(host, entries[:2], [completion(1, b""), completion(2, b"")])
        _j2, pending = RequestJournal.resume(slot, rings, entry_size=ESIZE)
        assert [p.trans_id for p in pending] == [3, 4, 5]
        assert [
            bytes(next(iter_packets(p.packet, struct.pack("<II", 0, len(p.packet)), 1)).payload)
            for p in pending
            if p.packet is not None
        ] == raw[2:]
        # The ring holds nothing more: the batch is not read twice.
        assert rings.upstream_hdr[OFF_READ_INDEX : OFF_READ_INDEX + 4] == struct.pack(
            "<I", host.read_position
        )


async def test_crash_before_consume_leaves_the_batch_in_the_ring() -> None:
    slot = memoryview(bytearray(SLOT))
    with channel_pair() as (host, guest, rings):
        j = RequestJournal.attach(slot, rings, entry_size=ESIZE)
        await guest.send(_requests(1, 4))
        batch = await host.receive(64, consume=False)
        # stage() records and would consume; the host dies before the consume:
        # emulate by staging with no channel.
        entries = j.stage(batch, host.read_position, host.unconsumed, None)
        struct.pack_into("<I", slot, 16, 1)  # staged, as before the consume
        for e in entries:
            struct.pack_into("<I", slot, HEADER_SIZE + e * ESIZE, STAGED)
        _, pending = RequestJournal.resume(slot, rings, entry_size=ESIZE)
        assert pending == []  # the ring still has them; the next reader takes them


async def test_crash_in_the_middle_of_completing() -> None:
    """Some completions of a group published, the host dies: the published are
    not sent again, the rest are."""
    slot = memoryview(bytearray(SLOT))
    with channel_pair() as (host, guest, rings):
        j = RequestJournal.attach(slot, rings, entry_size=ESIZE)
        await guest.send(_requests(1, 6))
        _batch, entries = await j.receive(host, 64)
        j._mark(entries)  # the group starts ...
        await host.send([completion(t, b"") for t in (1, 2, 3)])  # ... half is out
        assert set(_states(slot, j)) == {FREE, COMPLETING}
        _, pending = RequestJournal.resume(slot, rings, entry_size=ESIZE)
        assert [p.trans_id for p in pending] == [4, 5, 6]


async def test_reply_is_kept_instead_of_the_request() -> None:
    slot = memoryview(bytearray(SLOT))
    with channel_pair() as (host, guest, rings):
        j = RequestJournal.attach(slot, rings, entry_size=ESIZE)
        await guest.send(_requests(7, 1))
        _, entries = await j.receive(host, 64)
        j.record_reply(entries[0], b"answer")
        j._mark(entries)  # a crash before anything is published
        _, pending = RequestJournal.resume(slot, rings, entry_size=ESIZE)
        assert [(p.trans_id, p.reply, p.packet) for p in pending] == [(7, b"answer", None)]


async def test_many_crashes_complete_everything_exactly_once() -> None:
    """Random crash points over many rounds: the guest sees each id once."""
    rng = random.Random(5)
    slot = memoryview(bytearray(SLOT))
    with channel_pair(ring_pages=4) as (host, guest, rings):
        j = RequestJournal.attach(slot, rings, entry_size=ESIZE)
        seen: list[int] = []
        tid = 1
        for _ in range(60):
            n = rng.randint(1, 8)
            await guest.send(_requests(tid, n))
            tid += n
            batch, entries = await j.receive(host, 64)
            done = rng.randint(0, len(batch))
            await j.send_completions(
                host, entries[:done], [completion(p.trans_id, b"") for p in list(batch)[:done]]
            )
            if rng.random() < 0.5:  # crash, resume, finish what was left
                j, pending = RequestJournal.resume(slot, rings, entry_size=ESIZE)
                await j.send_completions(
                    host, [p.entry for p in pending], [completion(p.trans_id, b"") for p in pending]
                )
            else:
                rest = list(batch)[done:]
                await j.send_completions(
                    host, entries[done:], [completion(p.trans_id, b"") for p in rest]
                )
            while True:
                with trio.move_on_after(0.05):
                    seen += [p.trans_id for p in await guest.receive()]
                    continue
                break
        assert sorted(seen) == list(range(1, tid))


@pytest.mark.parametrize("seed", range(40))
async def test_hostile_slot_is_refused_or_trimmed(seed: int) -> None:
    rng = random.Random(seed)
    slot = memoryview(bytearray(SLOT))
    with channel_pair() as (host, guest, rings):
        j = RequestJournal.attach(slot, rings, entry_size=ESIZE)
        await guest.send(_requests(1, 3))
        await j.receive(host, 64)
        for _ in range(rng.randint(1, 50)):  # the VMM scribbles
            off = rng.randrange(0, 4096)
            slot[off] = rng.randrange(256)
        try:
            j2, pending = RequestJournal.resume(slot, rings, entry_size=ESIZE)
        except JournalError:
            return
        assert len(pending) <= j2.capacity
        assert len({p.entry for p in pending}) == len(pending)
        assert all(p.packet is None or len(p.packet) <= ESIZE for p in pending)
        assert j2.free + len(pending) == j2.capacity


async def test_consume_refuses_what_was_not_read() -> None:
    """Channel.consume commits exactly the peeked batch; the ring call refuses a count
    that is misaligned or more than the ring holds (C and twin alike)."""
    with channel_pair() as (host, guest, _):
        await guest.send(_requests(1, 2))
        batch = await host.receive(64, consume=False)
        assert len(batch) == 2 and host.unconsumed > 0
        with pytest.raises(RuntimeError):
            await host.receive(64)
        for bad in (4, host.unconsumed + 8):
            with pytest.raises(ValueError):
                host.reader.consume(bad)
        before = host.read_position
        host.consume()
        assert host.read_position != before and host.unconsumed == 0
        assert host.reader.bytes_to_read() == 0


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(2, 120), min_size=1, max_size=12),
    esize=st.sampled_from([48, 64, 256, 1024]),
    copy=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
    state=st.sampled_from([FREE, TAKEN, COMPLETING]),
)
def test_native_and_twin_write_the_same_journal(
    sizes: list[int], esize: int, copy: bool, seed: int, state: int
) -> None:
    """vmb_journal_stage / set_states and their Python twins leave the same bytes,
    and refuse the same caller errors."""
    from vmbus.journal import _NativeJournal, _py_set_states, _py_stage

    rng = random.Random(seed)
    out = bytearray()
    index: list[int] = []
    for n8 in sizes:
        pkt = bytearray(rng.randbytes(8 * n8))
        pkt[4:6] = n8.to_bytes(2, "little")
        index += [len(out), len(pkt)]
        out += pkt
    cap = (4096 - HEADER_SIZE) // esize
    entries = rng.sample(range(cap), min(cap, len(sizes)))
    n = len(entries)
    a, b = memoryview(bytearray(4096)), memoryview(bytearray(4096))
    for e in entries[: n // 2]:  # some were REPLY (set_states COMPLETING flags them)
        struct.pack_into("<I", a, HEADER_SIZE + e * esize, 3)
        struct.pack_into("<I", b, HEADER_SIZE + e * esize, 3)
    c = _NativeJournal()
    _py_stage(a, esize, copy, out, index, n, entries, seed)
    c.stage(b, esize, copy, out, index, n, entries, seed)
    assert a.tobytes() == b.tobytes()
    _py_set_states(a, esize, entries[::2], state)
    c.set_states(b, esize, entries[::2], state)
    assert a.tobytes() == b.tobytes()
    bad = [*entries[:1], cap]
    with pytest.raises(ValueError):
        _py_set_states(a, esize, bad, state)
    with pytest.raises(ValueError):
        c.set_states(b, esize, bad, state)
    outside = [*index[: 2 * n - 2], len(out), 16]  # packet n-1 past the batch
    with pytest.raises(ValueError):
        _py_stage(a, esize, copy, out, outside, n, entries, 0)
    with pytest.raises(ValueError):
        c.stage(b, esize, copy, out, outside, n, entries, 0)
    assert a.tobytes() == b.tobytes()
