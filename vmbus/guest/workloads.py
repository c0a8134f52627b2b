"""Guest-side traffic generators: the demo's mixed-size echo and the ring benchmark.

Both keep a bounded window of bytes in flight (less than either ring holds), so
the generator never blocks on its own ring; every echoed packet is checked for
order (trans_id) and bytes in C.
"""

from __future__ import annotations

import array
import random
import time
from dataclasses import dataclass

from vmbus.channel import PACKET_OVERHEAD, Channel
from vmbus.guest.check import check_echo
from vmbus.packet import PacketFlags, PacketType
from vmbus.ring import OutPacket, SendBatch

BYTES_CHECK_EVERY = 64
MIXED_CHUNK = 4096  # packets built ahead of the traffic at a time


class EchoMismatch(Exception):
    """An echoed packet came back out of order or with different bytes."""


@dataclass
class TrafficResult:
    packets: int
    bytes: int  # payload bytes, each direction
    seconds: float
    completions: int

    @property
    def packets_per_s(self) -> float:
        return self.packets / self.seconds if self.seconds else 0.0

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / self.seconds if self.seconds else 0.0


def _ring_cost(payload: int) -> int:
    return PACKET_OVERHEAD + ((payload + 7) & ~7)


def mixed_sizes(n: int, max_payload: int, seed: int) -> list[int]:
    """Sizes from 1 byte to max_payload, log-uniform, with both ends always present."""
    rng = random.Random(seed)
    sizes = [
        max(1, min(max_payload, int(2 ** rng.uniform(0, max_payload.bit_length()))))
        for _ in range(n)
    ]
    if n >= 2:
        sizes[0], sizes[-1] = 1, max_payload
    return sizes


def _want_type(i: int) -> int:
    return PacketType.COMPLETION if i % 3 == 2 else PacketType.INBAND


async def echo_mixed(
    ch: Channel, packets: int, max_payload: int, *, seed: int = 7
) -> TrafficResult:
    """Send `packets` packets of mixed sizes, every third asking for a completion.

    Packets are built MIXED_CHUNK at a time, ahead of the traffic; each round writes
    whatever the ring has room for (the ring itself is the window) and then drains
    every echo that came back.
    """
    rng = random.Random(seed)
    pattern = rng.randbytes(max_payload)
    sizes = mixed_sizes(packets, max_payload, seed)
    lens = array.array("I", sizes)

    def chunk(first: int) -> SendBatch:
        return SendBatch(
            [
                OutPacket(
                    PacketType.INBAND,
                    PacketFlags.COMPLETION_REQUESTED
                    if _want_type(i) == PacketType.COMPLETION
                    else 0,
                    i + 1,
                    [pattern[: sizes[i]]],
                )
                for i in range(first, min(packets, first + MIXED_CHUNK))
            ]
        )

    base = 0
    batch = chunk(0)
    sent = recvd = completions = total_bytes = 0
    t0 = time.perf_counter()
    while recvd < packets:
        if sent < packets:
            if sent - base == len(batch):
                base = sent
                batch = chunk(base)
            res = ch.writer.write(batch, start=sent - base)
            ch._account(res.npkts, res.bytes, res.signal)
            sent += res.npkts
        if recvd == sent:
            await ch._wait_space(batch.packet_ring_bytes(sent - base) + 8)
            continue
        got = await ch.receive()
        bad = check_echo(memoryview(got.buffer), got.index, got.n, recvd + 1, pattern, lens[recvd:])
        if bad >= 0:
            i = recvd + bad
            raise EchoMismatch(
                f"echoed packet {i} (trans_id {i + 1}, {sizes[i]} bytes) came back wrong "
                "or out of order"
            )
        buf, idx = got.buffer, got.index
        for k in range(got.n):
            typ = buf[idx[2 * k]]  # low byte of the descriptor's type (types are < 256)
            want = _want_type(recvd + k)
            if typ != want:
                raise EchoMismatch(f"packet {recvd + k}: type {typ:#x}, expected {want:#x}")
            total_bytes += sizes[recvd + k]
            completions += want == PacketType.COMPLETION
        recvd += got.n
    return TrafficResult(packets, total_bytes, time.perf_counter() - t0, completions)


async def echo_fixed(
    ch: Channel, size: int, *, seconds: float, batch: int = 256, seed: int = 3
) -> TrafficResult:
    """Saturate the channel with `size`-byte packets for about `seconds` (the benchmark)."""
    pattern = random.Random(seed).randbytes(max(size, 1))
    cost = _ring_cost(size)
    window = min(ch.reader.size, ch.writer.size) // 2
    per_batch = max(1, min(batch, window // (2 * cost)))
    sb = SendBatch([OutPacket(PacketType.INBAND, 0, 0, [pattern[:size]])] * per_batch)
    writer = ch.writer
    sent = recvd = 0
    deadline = time.perf_counter() + seconds
    t0 = time.perf_counter()
    stop_at: int | None = None
    batches = 0
    while stop_at is None or recvd < stop_at:
        while stop_at is None and (sent - recvd + per_batch) * cost <= window:
            res = writer.write(sb, trans_id_base=sent + 1)
            sent += res.npkts
            ch._account(res.npkts, res.bytes, res.signal)
            if res.npkts < per_batch:
                break
        if stop_at is None and time.perf_counter() >= deadline:
            stop_at = sent
        if recvd >= sent:
            continue
        got = await ch.receive()
        batches += 1
        # Order and length of every packet; the bytes of every BYTES_CHECK_EVERY-th batch
        # (the socketpair baseline compares none; the demo and tests compare all).
        bad = check_echo(
            memoryview(got.buffer),
            got.index,
            got.n,
            recvd + 1,
            pattern,
            None,
            size,
            check_bytes=batches % BYTES_CHECK_EVERY == 1,
        )
        if bad >= 0:
            raise EchoMismatch(f"packet {recvd + bad} of {size} bytes came back wrong")
        recvd += got.n
    dt = time.perf_counter() - t0
    return TrafficResult(recvd, recvd * size, dt, 0)
