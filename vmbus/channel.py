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
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from vmbus import eventfd as _eventfd
from vmbus.ring import (
    DEFAULT_ALLOWED_TYPES,
    FLAG_COMPLETION_REQUESTED,
    VM_PKT_COMP,
    Buffer,
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
from vmbus.transactions import TransactionError, TransactionTracker

if TYPE_CHECKING:
    from vmbus.memory import RingPairMapping

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 1024
POLL_NS_MIN = 2_000
POLL_NS_MAX = 200_000
POLL_NS_DEFAULT = 50_000
SPACE_RECHECK_S = 0.1  # a peer that frees room without signalling is still noticed
PACKET_OVERHEAD = 16 + 8  # descriptor + trailer
MAX_IN_FLIGHT_DEFAULT = 1024  # requests awaiting the peer's completion, per channel
_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")


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
    requests_out: int = 0  # packets we sent asking for a completion
    completions_in: int = 0  # ... and the completions that matched one
    bad_completions: int = 0  # completions naming no outstanding request (guest error)

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


def open_ring_pair(
    mapping: RingPairMapping, *, host: bool, allowed_types: int | None = None
) -> tuple[RingReader, RingWriter]:
    """The reader and writer of a channel's ring pair for one end, opened, with the
    indices the peer wrote checked (spec 8.1: r, w < size and 8-aligned). The host
    reads the upstream (guest->host) ring and writes the downstream one; the guest
    the other way round. RingCorrupt if the indices are bad (nothing stays open)."""
    up = (mapping.upstream_hdr, mapping.upstream_data, mapping.upstream_size)
    down = (mapping.downstream_hdr, mapping.downstream_data, mapping.downstream_size)
    rx, tx = (up, down) if host else (down, up)
    reader = RingReader(
        *rx,
        doubled=True,
        allowed_types=DEFAULT_ALLOWED_TYPES if allowed_types is None else allowed_types,
    )
    writer = RingWriter(*tx, doubled=True)
    try:
        reader.open()
        writer.open()
        reader.bytes_to_read()
        writer.bytes_to_write()
    except BaseException:
        reader.release()
        writer.release()
        del up, down, rx, tx  # the traceback keeps this frame: it must not pin the rings
        raise
    return reader, writer


def new_eventfd() -> int:
    """A fresh eventfd for a channel. O_NONBLOCK is set for our own reads' sake, but
    once shared with the VMM it is the VMM's to change: EventFd never depends on it."""
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


class PacketBatch:
    """Packets copied out of the ring by one receive.

    The batch and every `Packet` it yields view the channel's private copy: they
    stay valid until the next `receive()` or `forward()` on the same channel, which
    reuses that memory. Copy (`bytes(pkt.payload)`) what must live longer.
    """

    __slots__ = ("buffer", "index", "n")

    def __init__(self, buffer: mmap.mmap | bytearray, index: array.array[int], n: int) -> None:
        self.buffer = buffer
        self.index = index
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[Packet]:
        return iter_packets(self.buffer, self.index, self.n)


class CompletedRequest:
    """A completion the peer sent for one of our requests: the request's context and
    a private copy of the completion's payload (it outlives the batch)."""

    __slots__ = ("context", "payload", "trans_id")

    def __init__(self, context: object, trans_id: int, payload: bytes) -> None:
        self.context = context
        self.trans_id = trans_id
        self.payload = payload


class _Waiter:
    """The context of a request someone awaits (`Channel.request`)."""

    __slots__ = ("done", "payload")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.payload = b""


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
        self._unconsumed = 0  # bytes of a receive(consume=False) batch still in the ring
        self._masked = False
        self._send_lock = trio.Lock()
        # Requests we sent that want a completion (None until the first request):
        # from then on every VM_PKT_COMP is matched here, never handed to the device.
        self._tracker: TransactionTracker[object] | None = None
        self._on_completions: Callable[[list[CompletedRequest]], None] | None = None
        self._slot_free = trio.lowlevel.ParkingLot()
        self._bad_completion_logged = False

    def release(self) -> None:
        """Drop our views of the shared rings so their mapping can be unmapped."""
        self.reader.release()
        self.writer.release()

    # -- receive ---------------------------------------------------------------

    async def receive(self, max_pkts: int | None = None, *, consume: bool = True) -> PacketBatch:
        """Wait for at least one packet and return every packet available (up to a cap).

        consume=False leaves the batch in the ring (read_index unmoved) until
        `consume()`: a device records it elsewhere first (vmbus/journal.py), so a
        crash in between leaves it in the ring for the next vmbusd. Not with
        tracked completions (they would be matched twice)."""
        if not consume and self._tracker is not None:
            raise ValueError("receive(consume=False) on a channel that tracks completions")
        if self._unconsumed:
            raise RuntimeError("receive() before the previous batch was consumed")
        if self._pending_error is not None:
            err, self._pending_error = self._pending_error, None
            raise RingCorrupt(err)
        n_max = min(max_pkts or self.max_batch, self.max_batch)
        if not self._masked:
            self.reader.mask()
            self._masked = True
        while True:
            res = self.reader.read(self._out, self._index, n_max, peek=not consume)
            if res.signal:
                self._signal()
            if res.npkts:
                if not consume:
                    self._unconsumed = res.consumed
                self._took(res.npkts, res.out_bytes, res.error)
                n = res.npkts if self._tracker is None else self._take_completions(res.npkts)
                await trio.lowlevel.checkpoint()
                if n:
                    return PacketBatch(self._out, self._index, n)
                if self._pending_error is not None:
                    err, self._pending_error = self._pending_error, None
                    raise RingCorrupt(err)
                continue  # only completions: they went to their requests
            if res.error is not None:
                self.stats.errors += 1
                raise RingCorrupt(res.error)
            await self._idle()

    async def wait_readable(self) -> None:
        """Wait until the ring holds a packet (without taking it): a device that must
        hold a budget slot per request it takes asks for slots only then."""
        if self._pending_error is not None:
            return  # receive() raises it
        if not self._masked:
            self.reader.mask()
            self._masked = True
        while not self.reader.bytes_to_read():
            await self._idle()

    @property
    def read_position(self) -> int:
        """The upstream ring offset our next receive starts at."""
        return self.reader.position

    @property
    def unconsumed(self) -> int:
        """Ring bytes of the batch received with consume=False and not yet consumed."""
        return self._unconsumed

    def consume(self) -> None:
        """Move the read_index past the batch received with consume=False."""
        n, self._unconsumed = self._unconsumed, 0
        if n and self.reader.consume(n):
            self._signal()

    def _took(self, npkts: int, nbytes: int, error: RingError | None) -> None:
        """Count a batch taken off the ring; an error behind it is raised next time."""
        st = self.stats
        st.packets_in += npkts
        st.bytes_in += nbytes
        st.batches_in += 1
        if error is not None:
            self._pending_error = error

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
                self._took(res.npkts, res.consumed, res.error)
                dest._account(res.npkts, res.consumed, res.write_signal)
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

    # -- requests and completions ------------------------------------------------

    def track_completions(
        self,
        on_completions: Callable[[list[CompletedRequest]], None] | None = None,
        *,
        max_in_flight: int = MAX_IN_FLIGHT_DEFAULT,
    ) -> None:
        """Match the peer's completions to our requests from now on.

        `on_completions` gets, once per received batch, the completions of requests
        sent with `post_requests` (the ones `request` awaits are not in it). It runs
        inside `receive()`: completions are matched only while someone receives, so
        a device that awaits `request()` keeps a receive loop in another task.
        """
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if self._tracker is None:
            self._tracker = TransactionTracker(max_in_flight)
        self._on_completions = on_completions

    @property
    def in_flight(self) -> int:
        """Requests sent that have not been completed yet."""
        return len(self._tracker) if self._tracker is not None else 0

    async def post_requests(self, packets: Sequence[OutPacket], contexts: Sequence[object]) -> None:
        """Send packets that ask for a completion; each gets a fresh transaction id
        (never 0, never one in flight). Waits while `max_in_flight` are outstanding:
        a peer that stops completing stalls this channel only."""
        if len(packets) != len(contexts):
            raise ValueError("one context per packet")
        if self._tracker is None:
            self.track_completions()
        tracker = self._tracker
        assert tracker is not None
        out: list[OutPacket] = []
        for pkt, ctx in zip(packets, contexts, strict=True):
            while tracker.full:
                if out:  # send what has ids before waiting, or we would wait on ourselves
                    await self.send(out)
                    out = []
                await self._slot_free.park()
            tid = tracker.issue(ctx)
            out.append(pkt._replace(trans_id=tid, flags=pkt.flags | FLAG_COMPLETION_REQUESTED))
        self.stats.requests_out += len(packets)
        await self.send(out)

    async def request(self, packet: OutPacket) -> bytes:
        """Send one packet that asks for a completion and wait for it; returns a
        private copy of the completion's payload."""
        waiter = _Waiter()
        await self.post_requests([packet], [waiter])
        await waiter.done.wait()
        return waiter.payload

    def _take_completions(self, n: int) -> int:
        """Deliver the batch's completions to their requests; compact the index so
        the batch holds only the other packets. Returns how many are left."""
        tracker = self._tracker
        assert tracker is not None
        out, idx = self._out, self._index
        kept = 0
        batch: list[CompletedRequest] = []
        for i in range(n):
            off, ln = idx[2 * i], idx[2 * i + 1]
            if _U16.unpack_from(out, off)[0] != VM_PKT_COMP:
                idx[2 * kept], idx[2 * kept + 1] = off, ln
                kept += 1
                continue
            off8 = _U16.unpack_from(out, off + 2)[0]  # validated by the ring reader
            tid = _U64.unpack_from(out, off + 8)[0]
            try:
                ctx = tracker.complete(tid)
            except TransactionError as exc:
                self.stats.bad_completions += 1
                if not self._bad_completion_logged:  # once per channel: a guest can flood
                    self._bad_completion_logged = True
                    log.warning("%s: %s (further ones only counted)", self.name, exc)
                continue
            self.stats.completions_in += 1
            payload = bytes(out[off + 8 * off8 : off + ln])
            if isinstance(ctx, _Waiter):
                ctx.payload = payload
                ctx.done.set()
            else:
                batch.append(CompletedRequest(ctx, tid, payload))
        self._slot_free.unpark_all()
        if batch and self._on_completions is not None:
            self._on_completions(batch)
        return kept

    # -- send ------------------------------------------------------------------

    def _signal(self) -> None:
        self.signal_fd.signal()
        self.stats.signals_sent += 1

    async def send(
        self, packets: Sequence[OutPacket], *, before: Callable[[], None] | None = None
    ) -> None:
        """Send packets built in Python (control traffic, completions)."""
        if packets:
            await self.send_batch(SendBatch(list(packets)), before=before)

    async def send_batch(
        self, batch: SendBatch, *, before: Callable[[], None] | None = None
    ) -> None:
        """Send a prebuilt batch; blocks (this channel only) while the peer's ring is full.
        `before` runs once with the send lock held, right before the first write (the
        journal notes where the batch starts)."""
        async with self._send_lock:
            if before is not None:
                before()
            start = 0
            total = len(batch)
            while start < total:
                res = self.writer.write(batch, start=start)
                self._account(res.npkts, res.bytes, res.signal)
                start += res.npkts
                if start < total:
                    await self._wait_space(batch.packet_ring_bytes(start))

    async def send_raw(
        self, buf: Buffer, index: Buffer, n: int, *, before: Callable[[], None] | None = None
    ) -> None:
        """Send n packets preformed in buf (descriptors included; index pairs of u32
        offset, length as ring read() makes them): a batch built in C goes out with no
        Python per packet (storvsc's completions). Blocks like send_batch."""
        idx = memoryview(index).cast("B")
        async with self._send_lock:
            if before is not None:
                before()
            start = 0
            while start < n:
                res = self.writer.write_raw(buf, idx[8 * start :], n - start)
                self._account(res.npkts, res.bytes, res.signal)
                start += res.npkts
                if start < n:
                    length = int.from_bytes(idx[8 * start + 4 : 8 * start + 8], "little")
                    await self._wait_space(length + 8)  # len8*8 + the trailer

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
