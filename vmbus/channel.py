"""An open VMBus channel driven by trio: a ring pair plus two eventfds.

The same class serves both ends. On the host, `reader` is the guest->host ring,
`writer` the host->guest ring, we wait on *kick* and signal *call*; the simulated
guest swaps them. Python runs once per batch; the ring work per packet is in C.

Wake-ups are the expensive part (about 30 us to wake a process on the other
core), so a receiver keeps the ring's interrupt mask set while it drains, polls
for a short, adaptive while when the ring runs dry, and only then unmasks,
re-checks and sleeps. At saturation that means far fewer than one wake-up per
packet.
"""

from __future__ import annotations

import array
import logging
import mmap
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import trio

from vmbus import eventfd as _eventfd
from vmbus.ring import (
    OutPacket,
    Packet,
    RingCorrupt,
    RingError,
    RingReader,
    RingWriter,
    SendBatch,
    forward,
    iter_packets,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 1024
POLL_NS_MIN = 2_000
POLL_NS_MAX = 200_000
POLL_NS_DEFAULT = 50_000
SPACE_RECHECK_S = 0.1  # a peer that frees room without signalling is still noticed
PACKET_OVERHEAD = 16 + 8  # descriptor + trailer


@dataclass
class ChannelStats:
    """Per-channel counters, exported by `vmbusd stats` and the benchmarks."""

    packets_in: int = 0
    bytes_in: int = 0
    batches_in: int = 0
    packets_out: int = 0
    bytes_out: int = 0
    signals_sent: int = 0
    signals_suppressed: int = 0
    wakeups: int = 0
    spurious_wakeups: int = 0
    polls_hit: int = 0
    space_waits: int = 0
    errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class EventFd:
    """An eventfd that several tasks may wait on; exactly one of them sits in epoll.

    trio re-arms an fd on every wait, so tasks share one waiter and are released
    together when it fires (the signal means "look at the rings", not "one item").

    The peer holds the same open file description and may clear its O_NONBLOCK:
    `signal` and `clear` therefore never rely on it (vmbus/eventfd.py says how).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._waiting = False
        self._lot = trio.lowlevel.ParkingLot()

    def signal(self) -> None:
        _eventfd.signal(self.fd)  # never blocks, even if the peer saturated the counter

    def clear(self) -> None:
        _eventfd.drain(self.fd)  # RWF_NOWAIT: never blocks, whatever the file's flags

    async def wait(self) -> None:
        if self._waiting:
            await self._lot.park()
            return
        self._waiting = True
        try:
            await trio.lowlevel.wait_readable(self.fd)
            self.clear()
        finally:
            self._waiting = False
            self._lot.unpark_all()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def new_eventfd() -> int:
    """A fresh eventfd for a channel. O_NONBLOCK is set for our own reads' sake, but
    once shared with the VMM it is the VMM's to change: EventFd never depends on it."""
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


class PacketBatch:
    """Packets copied out of the ring by one receive; valid until the next receive."""

    __slots__ = ("buffer", "index", "n")

    def __init__(self, buffer: bytearray, index: array.array, n: int) -> None:
        self.buffer = buffer
        self.index = index
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[Packet]:
        return iter_packets(self.buffer, self.index, self.n)


@dataclass
class _Poller:
    """Adaptive poll budget, learnt from how long the channel actually sat idle.

    A sleep that ended sooner than the longest budget means polling that long would
    have saved the wake-up, so the budget grows to cover it; polls that find nothing
    shrink it, down to a floor (never zero, or it could not learn again).
    """

    ns: int = POLL_NS_DEFAULT
    max_ns: int = POLL_NS_MAX
    min_ns: int = POLL_NS_MIN
    misses: int = field(default=0)

    def hit(self) -> None:
        self.misses = 0

    def miss(self) -> None:
        self.misses += 1
        if self.misses >= 4:
            self.ns = max(self.min_ns, self.ns // 2)
            self.misses = 0

    def slept(self, ns: int) -> None:
        if ns < self.max_ns:
            self.ns = min(self.max_ns, max(self.ns, 2 * ns))


class Channel:
    """One open channel end: batched receive, backpressured send, interrupt suppression."""

    def __init__(
        self,
        reader: RingReader,
        writer: RingWriter,
        wait: EventFd,
        signal: EventFd,
        *,
        name: str = "channel",
        max_batch: int = DEFAULT_MAX_BATCH,
        poll_ns: int = POLL_NS_DEFAULT,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.wait_fd = wait
        self.signal_fd = signal
        self.name = name
        self.stats = ChannelStats()
        self.max_batch = max_batch
        self._poll = _Poller(ns=poll_ns, max_ns=max(poll_ns, POLL_NS_MAX))
        size = reader.size
        # A whole ring's worth of packets always fits in the private copy. The guest
        # picks the ring size (up to 32 MiB), so the copy is an anonymous mapping:
        # pages cost memory only once packets touch them, and go back to the system
        # when the channel does (a bytearray would be zero-filled, so resident, up
        # front, and freed into malloc's heap, which keeps its high-water mark).
        self._out = mmap.mmap(-1, size)
        self._index = array.array("I", bytes(8 * max_batch))
        self._pending_error: RingError | None = None
        self._masked = False
        self._send_lock = trio.Lock()

    def release(self) -> None:
        """Drop our views of the shared rings so their mapping can be unmapped."""
        self.reader.release()
        self.writer.release()

    # -- receive ---------------------------------------------------------------

    async def receive(self, max_pkts: int | None = None) -> PacketBatch:
        """Wait for at least one packet and return every packet available (up to a cap)."""
        if self._pending_error is not None:
            err, self._pending_error = self._pending_error, None
            raise RingCorrupt(err)
        n_max = min(max_pkts or self.max_batch, self.max_batch)
        if not self._masked:
            self.reader.mask()
            self._masked = True
        while True:
            res = self.reader.read(self._out, self._index, n_max)
            if res.signal:
                self._signal()
            if res.npkts:
                st = self.stats
                st.packets_in += res.npkts
                st.bytes_in += res.out_bytes
                st.batches_in += 1
                if res.error is not None:
                    self._pending_error = res.error
                await trio.lowlevel.checkpoint()
                return PacketBatch(self._out, self._index, res.npkts)
            if res.error is not None:
                self.stats.errors += 1
                raise RingCorrupt(res.error)
            await self._idle()

    async def _idle(self) -> None:
        """The ring is empty: poll briefly with the mask set, then unmask, re-check, sleep."""
        poll_ns = self._poll.ns
        if poll_ns:
            deadline = time.perf_counter_ns() + poll_ns
            reader = self.reader
            while time.perf_counter_ns() < deadline:
                if reader.bytes_to_read():
                    self._poll.hit()
                    self.stats.polls_hit += 1
                    return
            self._poll.miss()
        self._masked = False
        if self.reader.unmask():
            self.reader.mask()
            self._masked = True
            return
        t0 = time.perf_counter_ns()
        await self.wait_fd.wait()
        slept = time.perf_counter_ns() - t0
        self.stats.wakeups += 1
        self.reader.mask()
        self._masked = True
        try:
            useful = self.reader.bytes_to_read() > 0
        except RingCorrupt:
            useful = True  # the next read reports it
        if useful:
            self._poll.slept(slept)
        else:
            # A kick with nothing in the ring (a guest may send them at will): it must
            # not teach us to spin, or kick storms would buy a guest our CPU.
            self.stats.spurious_wakeups += 1

    async def forward(
        self, dest: Channel | None = None, *, complete: bool = False, max_pkts: int | None = None
    ) -> int:
        """Move packets from this channel's incoming ring straight into `dest`'s outgoing
        ring (default: back to the sender), for pass-through devices. Waits for at least
        one packet and for room; returns how many moved. Descriptors are validated as
        by receive(); payloads are opaque and never copied into our memory.
        """
        dest = dest or self
        n_max = min(max_pkts or self.max_batch, self.max_batch)
        if not self._masked:
            self.reader.mask()
            self._masked = True
        while True:
            async with dest._send_lock:
                res = forward(self.reader, dest.writer, n_max, complete)
            if res.read_signal:
                self._signal()
            if res.npkts:
                st = self.stats
                st.packets_in += res.npkts
                st.bytes_in += res.consumed
                st.batches_in += 1
                dest._account(res.npkts, res.consumed, res.write_signal)
                if res.error is not None:
                    self._pending_error = res.error
                await trio.lowlevel.checkpoint()
                return res.npkts
            if res.error is not None:
                self.stats.errors += 1
                raise RingCorrupt(res.error)
            if self._pending_error is not None:
                err, self._pending_error = self._pending_error, None
                raise RingCorrupt(err)
            if self.reader.bytes_to_read():
                # A packet is waiting but dest has no room: ask for exactly its size.
                peek = self.reader.read(self._out, self._index, 1, peek=True)
                if peek.npkts:
                    await dest._wait_space(self._index[1] + 8)
                    continue
                if peek.error is not None:
                    raise RingCorrupt(peek.error)
            await self._idle()

    # -- send ------------------------------------------------------------------

    def _signal(self) -> None:
        self.signal_fd.signal()
        self.stats.signals_sent += 1

    async def send(self, packets: Sequence[OutPacket]) -> None:
        """Send packets built in Python (control traffic, completions)."""
        if packets:
            await self.send_batch(SendBatch(list(packets)))

    async def send_batch(self, batch: SendBatch) -> None:
        """Send a prebuilt batch; blocks (this channel only) while the peer's ring is full."""
        async with self._send_lock:
            start = 0
            total = len(batch)
            while start < total:
                res = self.writer.write(batch, start=start)
                self._account(res.npkts, res.bytes, res.signal)
                start += res.npkts
                if start < total:
                    await self._wait_space(batch.packet_ring_bytes(start))

    async def send_raw(
        self, buffer: bytes | bytearray | memoryview, index: array.array, n: int, *, complete=False
    ) -> None:
        """Send packets preformed in `buffer` (as a receive returns them): the echo path."""
        async with self._send_lock:
            start = 0
            idx = memoryview(index)
            while start < n:
                res = self.writer.write_raw(buffer, idx[2 * start :], n - start, complete=complete)
                self._account(res.npkts, res.bytes, res.signal)
                start += res.npkts
                if start < n:
                    await self._wait_space(index[2 * start + 1] + 8)

    def _account(self, npkts: int, nbytes: int, signal: bool) -> None:
        st = self.stats
        st.packets_out += npkts
        st.bytes_out += nbytes
        if npkts:
            if signal:
                self._signal()
            else:
                st.signals_suppressed += 1

    async def _wait_space(self, need: int) -> None:
        """Ask the peer for a signal once `need` bytes are free (pending_send_sz), then wait."""
        self.stats.space_waits += 1
        while not self.writer.request_space(need):
            with trio.move_on_after(SPACE_RECHECK_S):
                await self.wait_fd.wait()
                self.stats.wakeups += 1
