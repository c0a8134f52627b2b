"""The trio channel on its own: both ends of one ring pair in this process.

Real guest memory (a memfd, scattered pages, rings mapped twice) and real
eventfds; the "guest" end uses the same Channel class with the rings swapped.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import trio

from vmbus.channel import POLL_NS_MIN, Channel, EventFd, new_eventfd
from vmbus.gpadl import PAGE_SIZE, Gpadl, GpaRange
from vmbus.memory import GuestMemory, sealed_memfd
from vmbus.ring import (
    OFF_WRITE_INDEX,
    OutPacket,
    RingCorrupt,
    RingReader,
    RingWriter,
    SendBatch,
    init_ring_header,
)

pytestmark = pytest.mark.timeout(60)


@contextmanager
def channel_pair(ring_pages: int = 8) -> Iterator[tuple[Channel, Channel, object]]:
    fd = sealed_memfd("ram", 4 << 20)
    mem = GuestMemory()
    mem.add_region(0, 4 << 20, fd)
    pfns = random.Random(1).sample(range(1, 1024), 2 * ring_pages)
    gp = Gpadl(1, 1, (GpaRange(len(pfns) * PAGE_SIZE, 0, tuple(pfns)),))
    host_map = mem.map_ring_pair(gp, ring_pages)
    guest_map = mem.map_ring_pair(gp, ring_pages)
    init_ring_header(guest_map.upstream_hdr)
    init_ring_header(guest_map.downstream_hdr)
    kick, call = EventFd(new_eventfd()), EventFd(new_eventfd())
    m = host_map
    host = Channel(
        RingReader(m.upstream_hdr, m.upstream_data, m.upstream_size, doubled=True),
        RingWriter(m.downstream_hdr, m.downstream_data, m.downstream_size, doubled=True),
        kick,
        call,
        name="host",
    )
    g = guest_map
    guest = Channel(
        RingReader(g.downstream_hdr, g.downstream_data, g.downstream_size, doubled=True),
        RingWriter(g.upstream_hdr, g.upstream_data, g.upstream_size, doubled=True),
        call,
        kick,
        name="guest",
    )
    for ch in (host, guest):
        ch.reader.open()
        ch.writer.open()
    try:
        yield host, guest, guest_map
    finally:
        host.release()
        guest.release()
        host_map.close()
        guest_map.close()
        kick.close()
        call.close()
        mem.close()
        os.close(fd)


async def test_backpressure_delivers_everything_in_order() -> None:
    with channel_pair(ring_pages=4) as (host, guest, _):
        n = 3000
        got: list[int] = []

        async def slow_reader() -> None:
            while len(got) < n:
                batch = await host.receive()
                got.extend(p.trans_id for p in batch)
                await trio.sleep(0.0005)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_reader)
            for base in range(0, n, 50):
                await guest.send([OutPacket(6, 0, base + i + 1, [b"y" * 2000]) for i in range(50)])
        assert got == list(range(1, n + 1))
        assert guest.stats.space_waits > 0, "the sender should have had to wait for room"


async def test_batches_cost_far_less_than_one_wakeup_per_packet() -> None:
    with channel_pair() as (host, guest, _):
        batches, per = 200, 100
        received = 0

        async def reader() -> None:
            nonlocal received
            while received < batches * per:
                received += len(await host.receive())

        batch = SendBatch([OutPacket(6, 0, 0, [b"z" * 40])] * per)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            for _ in range(batches):
                await guest.send_batch(batch)
                await trio.sleep(0)
        assert received == batches * per
        # at most one wake-up per batch the guest published
        assert host.stats.wakeups <= batches
        assert host.stats.packets_in == batches * per


async def test_corrupt_ring_reported_after_the_good_packets() -> None:
    with channel_pair() as (host, guest, gmap):
        await guest.send([OutPacket(6, 0, 1, [b"ok"]), OutPacket(6, 0, 2, [b"ok"])])
        batch = await host.receive()
        assert [p.trans_id for p in batch] == [1, 2]
        hdr = gmap.upstream_hdr
        hdr[OFF_WRITE_INDEX : OFF_WRITE_INDEX + 4] = (12345).to_bytes(4, "little")
        del hdr
        guest.signal_fd.signal()
        with trio.fail_after(5), pytest.raises(RingCorrupt):
            await host.receive()


def _rss_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_private_copy_of_a_huge_ring_costs_no_memory_up_front() -> None:
    """The guest picks the ring size (an 8190-page GPADL: a 32 MiB ring). The host's
    private copy of it must not be resident before packets use it (found by the
    e2e fuzzer: a zero-filled bytearray per channel, kept by malloc after close)."""
    fd = sealed_memfd("ram", 16 * PAGE_SIZE)
    mem = GuestMemory()
    mem.add_region(0, 16 * PAGE_SIZE, fd)
    pfns = tuple(1 + i % 15 for i in range(8190))  # duplicated pages: legal, and cheap
    gp = Gpadl(1, 1, (GpaRange(len(pfns) * PAGE_SIZE, 0, pfns),))
    m = mem.map_ring_pair(gp, 8188)  # upstream: 8187 data pages = 32 MiB
    kick, call = EventFd(new_eventfd()), EventFd(new_eventfd())
    before = _rss_kb()
    ch = Channel(
        RingReader(m.upstream_hdr, m.upstream_data, m.upstream_size, doubled=True),
        RingWriter(m.downstream_hdr, m.downstream_data, m.downstream_size, doubled=True),
        kick,
        call,
    )
    try:
        assert ch.reader.size == 8187 * PAGE_SIZE
        assert _rss_kb() - before < 8 * 1024, "the private copy is resident up front"
    finally:
        ch.release()
        m.close()
        kick.close()
        call.close()
        mem.close()
        os.close(fd)


async def test_kick_storm_with_an_empty_ring_does_not_teach_polling() -> None:
    """A guest may kick at will; wake-ups that find nothing must not grow the poll
    budget (or a kick storm would make vmbusd spin), and real traffic still flows."""
    with channel_pair() as (host, guest, _):
        got: list[int] = []

        async def reader() -> None:
            while len(got) < 3:
                got.extend(p.trans_id for p in await host.receive())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.sleep(0.05)  # the reader polls, finds nothing, sleeps
            host._poll.ns = floor = POLL_NS_MIN  # an idle channel's budget, at its floor
            for _ in range(300):
                guest.signal_fd.signal()  # HvSignalEvent with an empty ring
                await trio.sleep(0)
            assert host.stats.spurious_wakeups > 0
            assert host._poll.ns <= floor, "spurious wake-ups must not raise the poll budget"
            await guest.send([OutPacket(6, 0, i, [b"ok"]) for i in (1, 2, 3)])
        assert got == [1, 2, 3]
