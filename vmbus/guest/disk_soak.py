"""`vmbusd vm --workload disk-soak`: the storage restart test's guest, and its checker.

The guest writes sequence-numbered, checksummed 4 KiB blocks through its storvsc
driver while vmbusd is killed and restarted under it (tests/test_restart_storvsc.py).
What it is told completed it appends to an ack log, one line per request, written
with one `write(2)` before the next request is issued, so the log outlives the VM.
`check_image` then judges the backend file against that log: every acknowledged
block is on it intact, with that write or a later one of the same block.

Block format (BLOCK bytes): magic, request seq, block number, index in the request,
blocks in the request, a payload derived from (seq, block), CRC32 of all before it.
Where request `seq` goes is a pure function of (seed, seq, span) -- `plan` -- so the
checker can tell a misdirected or invented block from one this workload wrote there.
The plan often revisits a block written a few requests before, so a stale write
re-executed after a newer one was acknowledged shows up as an older seq on disk.

The guest never has two requests on one block at once (a later request waits), as a
file system never does: so a read of an acknowledged block must return exactly the
last acknowledged write of it, and the disk's final state is well defined. Besides
reading back a recent request every few steps, when the guest sees its session
resumed it reads back the requests acknowledged last before vmbusd went and those
in flight across it, ahead of any new request on their blocks -- so a write lost or
left half done at the crash is found before a later write could hide it.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import random
import struct
import time
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from devices.storvsc.protocol import DataIn, SrbReply
from devices.storvsc.vsc import StorvscError
from vmbus.guest.workloads import EchoMismatch

if TYPE_CHECKING:
    from devices.storvsc.vsc import StorvscHba
    from vmbus.guest.vm import SimulatedVm

log = logging.getLogger(__name__)

BLOCK = 4096
MAGIC = b"VMBDSOAK"
_HEAD = struct.Struct("<8sQQHH4x")  # magic, seq, block, index in request, blocks, pad
_CRC_AT = BLOCK - 4
_PAYLOAD = _CRC_AT - _HEAD.size
ZERO = bytes(BLOCK)
LOG_HEADER = "# vmbusd disk-soak v1"

DEPTH = 8  # requests in flight at once (the brief's QD 4-8)
MAX_BLOCKS = 4  # blocks per request, at most
FUA_EVERY = 7  # every 7th write is FUA
FLUSH_EVERY = 50  # every 50th step also issues a SYNCHRONIZE CACHE
VERIFY_EVERY = 4  # every 4th step also reads back a recently acknowledged request
RECENT = 64  # acknowledged requests the read-backs choose from
WATCH_S = 0.1  # how often the guest looks for a rescind, a rescan or a driver error
_M64 = (1 << 64) - 1


class DiskSoakError(EchoMismatch):
    """The guest saw what a restart must never show it: an error status, a lost or
    torn block, a rescind, a bus rescan, a reset. (`vmbusd vm` reports it as a
    MISMATCH, status 1, as it does an echo that came back wrong.)"""


# -- the block format and the plan: shared by the guest and the checker ----------------


def _mix(x: int) -> int:
    """splitmix64's output function: a well-spread 64-bit hash of x."""
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def plan(seq: int, span: int, seed: int = 0) -> tuple[int, int, bool]:
    """(first block, blocks, FUA) of request `seq` (from 1) on a disk of `span` blocks:
    mostly one block, a quarter of requests 1-4; a quarter revisit the block where one
    of the 16 requests before went (so stale re-executions would be caught)."""
    if span < MAX_BLOCKS:
        raise ValueError(f"a disk of {span} blocks is too small for the soak")
    r = _mix(seed ^ (seq * 0xD1B54A32D192ED03 & _M64))
    n = 1 + ((r >> 2) & 3) if r & 3 == 0 else 1
    at, s, hops = 0, seq, 0
    while True:
        rs = _mix(seed ^ (s * 0xD1B54A32D192ED03 & _M64))
        back = 1 + ((rs >> 12) & 15)
        if (rs >> 8) & 3 == 0 and s - back >= 1 and hops < 8:
            s -= back  # go where an earlier request went
            hops += 1
            continue
        at = (rs >> 16) % span
        break
    return min(at, span - n), n, seq % FUA_EVERY == 0


def _payload(seq: int, block: int) -> bytes:
    d = hashlib.sha256(struct.pack("<QQ", seq, block)).digest()
    return (d * (_PAYLOAD // len(d) + 1))[:_PAYLOAD]


def encode_block(seq: int, block: int, index: int, count: int) -> bytes:
    """Block `index` of `count` of request `seq`, written to `block`."""
    body = _HEAD.pack(MAGIC, seq, block, index, count) + _payload(seq, block)
    return body + struct.pack("<I", zlib.crc32(body))


def encode_request(seq: int, start: int, count: int) -> bytes:
    return b"".join(encode_block(seq, start + i, i, count) for i in range(count))


@dataclass(frozen=True)
class BlockHeader:
    seq: int
    block: int
    index: int
    count: int


class BadBlock(ValueError):
    """A block that is not whole: torn, corrupt or never this workload's."""


def decode_block(data: bytes) -> BlockHeader | None:
    """The header of an intact block; None for a never-written (all-zero) one;
    BadBlock saying why for anything else."""
    if len(data) != BLOCK:
        raise BadBlock(f"{len(data)} bytes, not {BLOCK}")
    if data == ZERO:
        return None
    magic, seq, block, index, count = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise BadBlock(f"no magic ({data[:8].hex()})")
    (crc,) = struct.unpack_from("<I", data, _CRC_AT)
    if zlib.crc32(data[:_CRC_AT]) != crc:
        raise BadBlock(f"checksum mismatch (torn or corrupt; header says seq {seq})")
    if data[_HEAD.size : _CRC_AT] != _payload(seq, block):
        raise BadBlock(f"payload is not seq {seq}'s")
    return BlockHeader(seq, block, index, count)


# -- the checker ------------------------------------------------------------------------


@dataclass
class AckLog:
    """What the guest was told completed: per block the newest acknowledged seq."""

    span: int
    seed: int
    sector: int  # the disk's logical block size: block b is at byte b * BLOCK
    acked: dict[int, int] = field(default_factory=dict)
    requests: int = 0
    max_seq: int = 0
    problems: list[str] = field(default_factory=list)


def read_ack_log(path: str | Path) -> AckLog:
    """Parse the guest's ack log (header, then `seq start count` per request)."""
    lines = Path(path).read_text().splitlines()
    if not lines or not lines[0].startswith(LOG_HEADER):
        raise ValueError(f"{path}: not a disk-soak ack log")
    opts = dict(kv.split("=", 1) for kv in lines[0][len(LOG_HEADER) :].split())
    ack = AckLog(span=int(opts["span"]), seed=int(opts["seed"]), sector=int(opts["sector"]))
    seen: set[int] = set()
    for n, line in enumerate(lines[1:], 2):
        parts = line.split()
        if len(parts) != 3:
            # a partial last line: the VM died mid-write (never after a clean stop)
            ack.problems.append(f"ack log line {n}: {line!r} is not 'seq start count'")
            continue
        seq, start, count = map(int, parts)
        if seq in seen:
            ack.problems.append(f"request {seq} acknowledged twice")
        seen.add(seq)
        want = plan(seq, ack.span, ack.seed)[:2]
        if (start, count) != want:
            ack.problems.append(f"request {seq}: logged at {start}+{count}, planned {want}")
        for b in range(start, start + count):
            if seq > ack.acked.get(b, 0):
                ack.acked[b] = seq
        ack.requests += 1
        ack.max_seq = max(ack.max_seq, seq)
    return ack


@dataclass
class CheckResult:
    blocks: int  # blocks on the image looked at
    written: int  # of them, not all zero
    acked: int  # blocks the guest was told are written
    requests: int  # acknowledged requests in the log
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def check_blocks(ack: AckLog, blocks: Iterable[tuple[int, bytes]]) -> CheckResult:
    """Judge (block number, BLOCK bytes) pairs against the ack log: an acknowledged
    block must be intact, be that block, hold a write the plan sent there, with a seq
    at least the acknowledged one; an unacknowledged one may be empty, else the same."""
    problems = list(ack.problems)
    n = written = 0
    for b, data in blocks:
        n += 1
        want = ack.acked.get(b)
        try:
            head = decode_block(data)
        except BadBlock as exc:
            problems.append(f"block {b}: {exc}" + (f" (acked seq {want})" if want else ""))
            continue
        if head is None:
            if want is not None:
                problems.append(f"block {b}: acked seq {want}, found never written (lost)")
            continue
        written += 1
        start, count, _fua = plan(head.seq, ack.span, ack.seed)
        if head.block != b:
            problems.append(f"block {b}: holds block {head.block} of seq {head.seq} (misplaced)")
        elif not (start <= b < start + count and head.index == b - start and head.count == count):
            problems.append(f"block {b}: seq {head.seq} was never written here")
        elif want is not None and head.seq < want:
            problems.append(f"block {b}: seq {head.seq} found, seq {want} was acked (stale)")
    if n < ack.span:
        problems.append(f"image holds {n} blocks, the guest's disk had {ack.span}")
    return CheckResult(n, written, len(ack.acked), ack.requests, problems)


def image_blocks(path: str | Path, span: int) -> Iterator[tuple[int, bytes]]:
    """(block number, bytes) of the first `span` blocks of a backend file."""
    with open(path, "rb") as f:
        for b in range(span):
            data = f.read(BLOCK)
            if len(data) < BLOCK:
                return
            yield b, data


def check_image(image: str | Path, ack_log: str | Path) -> CheckResult:
    """The test's verdict on a file LUN after the soak (see `check_blocks`)."""
    ack = read_ack_log(ack_log)
    if ack.sector <= 0 or BLOCK % ack.sector:
        raise ValueError(f"sector size {ack.sector} does not divide {BLOCK}")
    return check_blocks(ack, image_blocks(image, ack.span))


# -- the guest's workload ----------------------------------------------------------------


@dataclass
class SoakCounts:
    writes: int = 0
    blocks: int = 0
    fua: int = 0
    flushes: int = 0
    reads: int = 0  # read-backs verified
    restart_checks: int = 0  # times the guest saw vmbusd come back and read back
    restart_reads: int = 0  # requests read back after a restart (acked before, in flight)
    waits: int = 0  # requests that waited for an earlier one on the same block


class DiskSoak:
    """DEPTH tasks issue requests in seq order; each request first waits until no
    request in flight touches its blocks. An ack goes to the log before the blocks
    are released, so the log never misses a write a later request depends on."""

    def __init__(
        self,
        vm: SimulatedVm,
        hba: StorvscHba,
        lun: int,
        ack_fd: int | None,
        seed: int,
        depth: int = DEPTH,
    ) -> None:
        disk = hba.disks[lun]
        self.vm = vm
        self.hba = hba
        self.lun = lun
        self.sector = disk.block_size
        if BLOCK % self.sector:
            raise DiskSoakError(
                f"disk-soak: LUN {lun}'s {self.sector}-byte blocks do not fit 4 KiB"
            )
        self.per_block = BLOCK // self.sector
        self.span = disk.size // BLOCK
        self.seed = seed
        self.depth = depth
        self.ack_fd = ack_fd
        self.acked: dict[int, int] = {}  # block -> newest acknowledged seq
        self.recent: deque[tuple[int, int, int]] = deque(maxlen=RECENT)  # (seq, start, n)
        # Per block, the tickets of the requests on it, oldest first: a request goes
        # when it heads the line of each of its blocks, so requests on one block run
        # one at a time and in the order they were made (seq order for writes).
        self.lines: dict[int, deque[int]] = {}
        self._tickets = itertools.count()
        self._released = trio.Event()
        self.next_seq = 1
        self._steps = itertools.count()
        self.writing: dict[int, tuple[int, int, int]] = {}  # seq -> (seq, start, n) in flight
        self._reconnects = vm.reconnects
        self._checks: trio.Nursery | None = None  # where read-backs after a restart run
        self.counts = SoakCounts()
        self.failure: str | None = None

    def header(self) -> str:
        return (
            f"{LOG_HEADER} span={self.span} seed={self.seed} sector={self.sector} lun={self.lun}\n"
        )

    # -- per request --

    def _queue_up(self, start: int, n: int) -> int:
        """Join the line of each block (no checkpoint: called as the request is made)."""
        ticket = next(self._tickets)
        for b in range(start, start + n):
            self.lines.setdefault(b, deque()).append(ticket)
        return ticket

    async def _claim(self, ticket: int, start: int, n: int) -> None:
        blocks = range(start, start + n)
        if any(self.lines[b][0] != ticket for b in blocks):
            self.counts.waits += 1
            while any(self.lines[b][0] != ticket for b in blocks):
                await self._released.wait()

    def _release(self, start: int, n: int) -> None:
        for b in range(start, start + n):
            line = self.lines[b]
            line.popleft()
            if not line:
                del self.lines[b]
        self._released.set()
        self._released = trio.Event()

    async def _write(self, seq: int) -> None:
        start, n, fua = plan(seq, self.span, self.seed)
        ticket = self._queue_up(start, n)  # in seq order: no checkpoint before this
        self.writing[seq] = (seq, start, n)
        await self._claim(ticket, start, n)
        try:
            data = encode_request(seq, start, n)
            lba = start * self.per_block
            cdb = (
                bytes([0x8A, 0x08 if fua else 0])
                + lba.to_bytes(8, "big")
                + (n * self.per_block).to_bytes(4, "big")
                + b"\0\0"
            )
            what = f"WRITE(16) seq {seq} at block {start}+{n}{' FUA' if fua else ''}"
            reply, _ = await self._srb(what, cdb, data_in=DataIn.WRITE, data=data)
            if not reply.success:
                sense = reply.sense.hex() if reply.sense else "-"
                raise DiskSoakError(
                    f"disk-soak: {what}: srb {reply.srb_status:#x} scsi "
                    f"{reply.scsi_status:#x} sense {sense}"
                )
            if reply.data_transfer_length != len(data):
                raise DiskSoakError(
                    f"disk-soak: {what}: {reply.data_transfer_length} of {len(data)} bytes moved"
                )
            if self.ack_fd is not None:
                os.write(self.ack_fd, f"{seq} {start} {n}\n".encode())
            for b in range(start, start + n):
                self.acked[b] = seq
            self.recent.append((seq, start, n))
            self.counts.writes += 1
            self.counts.blocks += n
            self.counts.fua += fua
        finally:
            self.writing.pop(seq, None)
            self._release(start, n)

    async def _srb(
        self, what: str, cdb: bytes, *, data_in: int = DataIn.NONE, **kw: Any
    ) -> tuple[SrbReply, bytes]:
        """One SRB to our LUN; the driver giving up (a timeout) is a DiskSoakError
        saying what the queues looked like at that moment."""
        try:
            return await self.hba.execute(cdb, lun=self.lun, data_in=data_in, **kw)
        except StorvscError as exc:
            raise DiskSoakError(f"disk-soak: {what}: {exc}; {self.queue_state()}") from None

    async def _flush(self) -> None:
        reply, _ = await self._srb("SYNCHRONIZE CACHE", bytes([0x35]) + bytes(9))
        if not reply.success:
            raise DiskSoakError(
                f"disk-soak: SYNCHRONIZE CACHE: srb {reply.srb_status:#x} "
                f"scsi {reply.scsi_status:#x}"
            )
        self.counts.flushes += 1

    async def verify(self, start: int, n: int, ticket: int | None = None) -> None:
        """Read back an acknowledged request's blocks: each must be whole and hold the
        newest acknowledged write of it (no request on it is in flight meanwhile).
        `ticket`: its place in the blocks' lines, taken earlier (else now)."""
        if ticket is None:
            ticket = self._queue_up(start, n)
        await self._claim(ticket, start, n)
        try:
            lba, count = start * self.per_block, n * self.per_block
            cdb = bytes([0x88, 0]) + lba.to_bytes(8, "big") + count.to_bytes(4, "big") + b"\0\0"
            what = f"READ(16) of block {start}+{n}"
            reply, data = await self._srb(what, cdb, data_in=DataIn.READ, length=n * BLOCK)
            if not reply.success or len(data) != n * BLOCK:
                raise DiskSoakError(
                    f"disk-soak: {what}: srb {reply.srb_status:#x} scsi "
                    f"{reply.scsi_status:#x}, {len(data)} of {n * BLOCK} bytes"
                )
            for i in range(n):
                b = start + i
                want = self.acked.get(b)
                if want is None:
                    raise DiskSoakError(f"disk-soak: block {b} read back, never acknowledged")
                try:
                    head = decode_block(data[i * BLOCK : (i + 1) * BLOCK])
                except BadBlock as exc:
                    raise DiskSoakError(
                        f"disk-soak: read of block {b} (acked seq {want}): {exc}"
                    ) from None
                if head is None or head.block != b or head.seq != want:
                    got = "nothing" if head is None else f"block {head.block} seq {head.seq}"
                    raise DiskSoakError(
                        f"disk-soak: read of block {b} returned {got}, acked seq {want}"
                    )
            self.counts.reads += 1
        finally:
            self._release(start, n)

    # -- the loop --

    def _after_restart(self) -> None:
        """vmbusd came back (the VM resumed its session): read back the requests
        acknowledged last before it went and those in flight across it, before any
        new request may touch their blocks (their tickets are taken now, in line
        behind the in-flight writes, ahead of every later one)."""
        self._reconnects = self.vm.reconnects
        assert self._checks is not None
        self.counts.restart_checks += 1
        for _seq, start, n in [*self.recent, *self.writing.values()]:
            ticket = self._queue_up(start, n)
            self._checks.start_soon(self._restart_read, start, n, ticket)

    async def _restart_read(self, start: int, n: int, ticket: int) -> None:
        await self.verify(start, n, ticket)
        self.counts.restart_reads += 1

    async def _worker(self, stop: trio.Event, rng: random.Random) -> None:
        while not stop.is_set():
            if self.vm.reconnects != self._reconnects:
                self._after_restart()  # before this worker makes its next request
            step = next(self._steps)
            if step % FLUSH_EVERY == FLUSH_EVERY - 1:
                await self._flush()
            if step % VERIFY_EVERY == VERIFY_EVERY - 1 and self.recent:
                _seq, start, n = rng.choice(self.recent)
                await self.verify(start, n)
            if stop.is_set():
                break
            seq = self.next_seq  # _write queues it up before its first checkpoint
            self.next_seq += 1
            await self._write(seq)

    def check_guest(self, baseline: dict[int, tuple[Any, ...]], rescans: list[int]) -> None:
        """What a restart must not show the guest: a rescind, an offer that was not
        there, a lost session, a driver error, a host-asked rescan (ENUMERATE_BUS)."""
        vm = self.vm
        if vm.closed_reason is not None:
            raise DiskSoakError(f"disk-soak: the session ended: {vm.closed_reason}")
        for relid, offer in vm.offers.items():
            if offer.rescinded:
                raise DiskSoakError(f"disk-soak: relid {relid} was rescinded")
            if relid not in baseline:
                raise DiskSoakError(f"disk-soak: new offer relid {relid} ({offer.if_type})")
        for q, before in zip(self.hba.queues, rescans, strict=True):
            if q.errors:
                raise DiskSoakError(f"disk-soak: storvsc queue {q.index}: {q.errors[0]}")
            if q.enumerate_bus != before:
                raise DiskSoakError(
                    f"disk-soak: the host asked for a bus rescan on queue {q.index}"
                )

    async def run(self, stop: trio.Event) -> None:
        """Until `stop`: DEPTH writers, then every request in flight finished and the
        newest acknowledged requests read back. A failure is a DiskSoakError."""
        baseline = {r: (o.if_type, o.if_instance) for r, o in self.vm.offers.items()}
        rescans = [q.enumerate_bus for q in self.hba.queues]
        rng = random.Random(self.seed)

        async def watch() -> None:
            while True:
                self.check_guest(baseline, rescans)
                await trio.sleep(WATCH_S)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                async with trio.open_nursery() as writers:
                    self._checks = writers
                    for _ in range(self.depth):
                        writers.start_soon(self._worker, stop, rng)
                for _seq, start, n in list(self.recent):
                    await self.verify(start, n)
                self.check_guest(baseline, rescans)
                nursery.cancel_scope.cancel()
        except* Exception as group:  # also StorvscError, HostError: the driver gave up
            raise _first_failure(group) from None

    def queue_state(self) -> str:
        """Per queue: requests waiting for a completion, and completion bytes in the
        ring unread (> 0 with requests waiting: the guest missed an interrupt; 0: the
        host never answered). For the line a timed-out request is reported with."""
        parts = []
        for q in self.hba.queues:
            try:
                unread: object = q.channel.reader.bytes_to_read()
            except Exception as exc:  # a corrupt ring says so here
                unread = exc
            parts.append(
                f"queue {q.index} (relid {q.gch.offer.relid}): {len(q.waiters)} waiting, "
                f"{unread} bytes unread, {q.channel.stats.wakeups} wake-ups"
            )
        return "; ".join(parts)


def _first_failure(group: BaseExceptionGroup[Exception]) -> DiskSoakError:
    """One exception for `vmbusd vm` to report: the soak's own verdict if there is
    one, else the first error (a timeout, the driver giving up) as a DiskSoakError."""
    leaves = list(_leaves(group))
    for exc in leaves:
        if isinstance(exc, DiskSoakError):
            return exc
    exc = leaves[0]
    return DiskSoakError(f"disk-soak: {type(exc).__name__}: {exc}")


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for e in exc.exceptions:
            yield from _leaves(e)
    else:
        yield exc


async def disk_soak(
    vm: SimulatedVm,
    stop: trio.Event,
    *,
    ack_log: str | None,
    seconds: float | None = None,
    seed: int = 1,
) -> dict[str, Any]:
    """The `disk-soak` workload on the first storvsc controller's first writable LUN;
    returns the summary, raises DiskSoakError (logged loudly) on anything wrong."""
    from devices.storvsc.protocol import SCSI_IF_TYPE
    from devices.storvsc.vsc import attach_storvsc

    offers = vm.find_offers(SCSI_IF_TYPE)
    if not offers:
        raise DiskSoakError("disk-soak: the host offered no storvsc controller")
    ack_fd = None
    if ack_log is not None:
        ack_fd = os.open(ack_log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    t0 = time.monotonic()
    soak: DiskSoak | None = None
    try:
        async with attach_storvsc(vm, offers[0]) as hba:
            for q in hba.queues:  # blk-mq hands tags out round robin: a late duplicate
                q.round_robin_tags = True  # completion hits no waiter and is an error
            luns = [lun for lun, d in sorted(hba.disks.items()) if not d.read_only]
            if not luns:
                raise DiskSoakError("disk-soak: the controller has no writable LUN")
            soak = DiskSoak(vm, hba, luns[0], ack_fd, seed)
            if ack_fd is not None:
                os.write(ack_fd, soak.header().encode())

            async def timer() -> None:
                if seconds is not None:
                    await trio.sleep(seconds)
                    stop.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(timer)
                await soak.run(stop)
                nursery.cancel_scope.cancel()
    except* Exception as group:
        failure = _first_failure(group)
        log.error("%s", failure)
        raise failure from None
    finally:
        if ack_fd is not None:
            os.close(ack_fd)
    assert soak is not None
    c = soak.counts
    return {
        "lun": soak.lun,
        "span_blocks": soak.span,
        "writes": c.writes,
        "blocks": c.blocks,
        "fua": c.fua,
        "flushes": c.flushes,
        "reads_verified": c.reads,
        "restart_checks": c.restart_checks,
        "restart_reads": c.restart_reads,
        "waits": c.waits,
        "seconds": round(time.monotonic() - t0, 3),
    }


def main(argv: list[str] | None = None) -> int:
    """`python -m vmbus.guest.disk_soak IMAGE ACK_LOG`: the checker by hand; exit 1
    and one line per problem when the image is not what the guest was told."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("image", help="the LUN's backend file")
    p.add_argument("ack_log", help="the guest's --ack-log")
    args = p.parse_args(argv)
    result = check_image(args.image, args.ack_log)
    for problem in result.problems:
        print(problem)
    print(
        f"{result.blocks} blocks, {result.written} written, {result.acked} acknowledged "
        f"by {result.requests} requests: {'OK' if result.ok else 'FAILED'}"
    )
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
