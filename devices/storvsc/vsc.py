"""The simulated guest's storvsc driver (what Linux 6.1's hv_storvsc does).

Byte for byte where the host can see it: every packet is a 64-byte vstor_packet;
init packets go one at a time on the primary with transaction id VMBUS_RQST_INIT
(0xFFFF_FFFF_FFFF_FFFD); I/O trans ids are blk-mq unique tags + 1 (hardware queue
<< 16 | tag, never 0); QUERY_PROTOCOL_VERSION tries 0x0602, 0x0600, 0x0501 in that
order; after END_INITIALIZATION it asks for min(vCPUs - 1, max_channel_cnt)
sub-channels when the host sets the multi-channel flag (storvsc_drv.c
handle_multichannel_storage; storvsc_vcpus_per_sub_channel only sizes can_queue),
opens each one offered, and spreads I/O over all of them. An SRB with data is a
GPA-direct packet with one range over scattered guest pages (`vmbus.packet.
gpa_direct`), exactly ceil((offset + len) / 4096) PFNs as Linux >= 6.1.y sends.

The scan is Linux's (scsi_scan.c __scsi_scan_target, checked against the real
driver's capture): per channel 0..7 x target 0..1, LUN 0 is probed first (INQUIRY
36, again with the length its data gives) and, if present, added (VPD 0x00, 0x80,
0x83, then READ CAPACITY(16) and MODE SENSE(6) for the write-protect bit); only
then REPORT LUNS where a target answered, and every other LUN it lists likewise.
An ENUMERATE_BUS from the host (LUNs added or removed) makes it do what Linux's
storvsc_host_scan does: TEST UNIT READY to every LUN it knows (INVALID_LUN: gone),
then the scan again (`hba.rescans` counts them, `hba.rescanned` is set after each).

Use: `async with attach_storvsc(vm, offer) as hba:` then `hba.disks`,
`await hba.read(lun, lba, n)`, `await hba.write(lun, lba, data)`, `await hba.flush()`.

A load generator (`vmbusd bench disk`) uses `SrbSlots` instead of `execute()`: a
fixed set of prebuilt requests whose per-request work (next LBA, patch, ring write;
completion parse) is one C call per batch (native/storvsc_vsc.c), or its Python twin
under VMBUSD_NATIVE=0, so the guest costs the benchmark little next to the host.
"""

from __future__ import annotations

import array
import contextlib
import itertools
import logging
import struct
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, cast

import trio

from devices.storvsc.protocol import (
    HEADER_SIZE,
    LINUX_VERSIONS,
    SCSI_IF_TYPE,
    STORAGE_CHANNEL_SUPPORTS_MULTI_CHANNEL,
    VMBUS_RQST_INIT,
    DataIn,
    Properties,
    SrbReply,
    SrbStatus,
    VstorOp,
    decode_properties,
    decode_reply,
    decode_srb_reply,
    encode_srb,
    init_request,
    srb_request,
    sub_channels_request,
    version_request,
)
from vmbus import native as _native_sel
from vmbus.gpadl import PAGE_SIZE, GpaRange
from vmbus.guest.drivers import register
from vmbus.packet import PacketType, gpa_direct, inband
from vmbus.ring import (
    DESC_SIZE,
    TRAILER_SIZE,
    VM_PKT_COMP,
    OutPacket,
    PyRingWriter,
    WriteResult,
)
from vmbus.ring import _raise as _ring_raise

if TYPE_CHECKING:
    from vmbus.channel import Channel
    from vmbus.guest.vm import GuestChannel, GuestOffer, SimulatedVm

log = logging.getLogger(__name__)

RING_SIZE = 128 * 1024  # storvsc_ringbuffer_size
INIT_TIMEOUT_S = 5.0  # Linux 6.1's storvsc_timeout per init step
IO_TIMEOUT_S = 30.0
MAX_CHANNELS = 8  # STORVSC_MAX_CHANNELS: scsi channels (path ids) scanned
MAX_TARGETS = 2
TAGS_PER_QUEUE = 1024
SRB_FLAGS_DISABLE_SYNCH_TRANSFER = 0x08
SRB_FLAGS_DATA_IN = 0x40
SRB_FLAGS_DATA_OUT = 0x80
SRB_FLAGS_QUEUE_ACTION_ENABLE = 0x02
SRB_FLAGS_NO_QUEUE_FREEZE = 0x100
SP_UNTAGGED = 0xFF
SRB_SIMPLE_TAG_REQUEST = 0x20


class StorvscError(Exception):
    """The host answered the guest driver wrongly (or not at all)."""


class ScsiCommandError(StorvscError):
    """A SCSI command failed: the reply says how."""

    def __init__(self, what: str, reply: SrbReply) -> None:
        sense = reply.sense.hex() if reply.sense else "-"
        super().__init__(
            f"{what}: srb {reply.srb_status:#x} scsi {reply.scsi_status:#x} sense {sense}"
        )
        self.reply = reply


@dataclass
class Disk:
    """A LUN as the guest's scan saw it."""

    path_id: int
    target_id: int
    lun: int
    blocks: int
    block_size: int
    read_only: bool
    vendor: str
    product: str
    serial: str | None
    naa: bytes | None

    @property
    def size(self) -> int:
        return self.blocks * self.block_size


@dataclass
class _Waiter:
    done: trio.Event = field(default_factory=trio.Event)
    payload: bytes = b""


class _Queue:
    """One open channel: a hardware queue with its tags and the completions for them."""

    def __init__(self, index: int, gch: GuestChannel) -> None:
        self.index = index
        self.gch = gch
        self.channel = gch.channel
        self.waiters: dict[int, _Waiter] = {}
        self.free_tags = list(range(TAGS_PER_QUEUE - 1, -1, -1))
        # Hand out the longest-free tag (blk-mq's sbitmap hint moves on) rather than the
        # newest: a duplicate completion then finds no waiter instead of a new request.
        self.round_robin_tags = False
        self.tag_free = trio.Event()
        self.errors: list[str] = []
        self.enumerate_bus = 0
        self.on_enumerate: trio.Event | None = None  # the HBA's rescan request

    async def receive_loop(self) -> None:
        while True:
            for pkt in await self.channel.receive():
                payload = bytes(pkt.payload)
                tid = pkt.trans_id
                # storvsc_on_channel_callback: a reply to a request must be a whole
                # vstor_packet; an unsolicited one (id 0) at least an operation.
                if len(payload) < (64 if tid else 4):
                    self.errors.append(f"short packet id={tid} len={len(payload)}")
                    continue
                if tid == 0:
                    op = struct.unpack_from("<I", payload)[0]
                    if op in (VstorOp.ENUMERATE_BUS, VstorOp.REMOVE_DEVICE):
                        self.enumerate_bus += 1
                        if self.on_enumerate is not None:
                            self.on_enumerate.set()  # storvsc_host_scan, queued as work
                    else:
                        self.errors.append(f"unsolicited op {op} with id 0")
                    continue
                if pkt.type != PacketType.COMPLETION:
                    self.errors.append(f"packet type {pkt.type} id={tid}")
                    continue
                w = self.waiters.pop(tid, None)
                if w is None:
                    self.errors.append(f"incorrect transaction id {tid:#x}")
                    continue
                w.payload = payload
                w.done.set()

    async def call(self, pkt: Any, tid: int, timeout: float) -> bytes:
        w = _Waiter()
        self.waiters[tid] = w
        try:
            await self.channel.send([pkt])
            with trio.fail_after(timeout):
                await w.done.wait()
        finally:
            self.waiters.pop(tid, None)
        return w.payload

    async def take_tag(self) -> int:
        while not self.free_tags:
            self.tag_free = trio.Event()
            await self.tag_free.wait()
        return self.free_tags.pop(0 if self.round_robin_tags else -1)

    def give_tag(self, tag: int) -> None:
        self.free_tags.append(tag)
        self.tag_free.set()


class StorvscHba:
    """One attached synthetic SCSI controller in the simulated guest."""

    def __init__(self, vm: SimulatedVm, offer: GuestOffer, ring_size: int = RING_SIZE) -> None:
        self.vm = vm
        self.offer = offer
        self.ring_size = ring_size
        self.queues: list[_Queue] = []
        self.version = 0
        self.properties: Properties | None = None
        self.sub_channel_status: int | None = None
        self.disks: dict[int, Disk] = {}
        # (path, target, lun) whose INQUIRY said CmdQue: Linux's sdev->tagged_supported.
        # Until then its SRBs go untagged (no queue tag/action, flags 0x48 for a read).
        self.tagged: set[tuple[int, int, int]] = set()
        self._rr = itertools.count()
        self._nursery: trio.Nursery | None = None
        self._rescan_wanted = trio.Event()
        self.rescans = 0  # host scans done for ENUMERATE_BUS (tests wait on it)
        self.rescanned = trio.Event()  # set after each; replaced by a fresh one

    # -- init --

    async def start(self, nursery: trio.Nursery, *, scan: bool = True) -> None:
        """storvsc_probe: open, storvsc_channel_init, sub-channels, scan."""
        self._nursery = nursery
        await self._open_queue(self.offer)
        await self.init_sequence()
        if scan:
            await self.scan()
            nursery.start_soon(self._host_scan_worker, name="storvsc host scan")

    async def _host_scan_worker(self) -> None:
        """storvsc_host_scan: on ENUMERATE_BUS, TEST UNIT READY to every known LUN
        (one that answers INVALID_LUN is gone and removed), then scsi_scan_host
        (new LUNs appear). Requests that come while a scan runs make one more."""
        while True:
            await self._rescan_wanted.wait()
            self._rescan_wanted = trio.Event()
            for q in self.queues:
                q.on_enumerate = self._rescan_wanted
            try:
                for lun in sorted(self.disks):
                    reply, _ = await self.execute(bytes(6), lun=lun)
                    if reply.srb_status & 0x3F == SrbStatus.INVALID_LUN:
                        log.info("storvsc: LUN %d is gone", lun)
                        self.disks.pop(lun, None)
                await self.scan()
            except (StorvscError, trio.TooSlowError) as exc:  # Linux logs and goes on
                log.warning("storvsc: host scan failed: %s", exc)
            self.rescans += 1
            done, self.rescanned = self.rescanned, trio.Event()
            done.set()

    async def _open_queue(self, offer: GuestOffer) -> _Queue:
        gch = await self.vm.open_channel(offer, self.ring_size)
        q = _Queue(len(self.queues), gch)
        q.on_enumerate = self._rescan_wanted
        self.queues.append(q)
        assert self._nursery is not None
        self._nursery.start_soon(q.receive_loop, name=f"storvsc vsc {offer.relid}")
        return q

    async def control(self, payload: bytes) -> tuple[int, int, bytes]:
        """storvsc_execute_vstor_op: one init packet, 64 bytes, id VMBUS_RQST_INIT."""
        q = self.queues[0]
        pkt = inband(payload, trans_id=VMBUS_RQST_INIT, completion_requested=True)
        try:
            reply = await q.call(pkt, VMBUS_RQST_INIT, INIT_TIMEOUT_S)
        except trio.TooSlowError:
            raise StorvscError(f"vstor operation {payload[0]} timed out") from None
        return decode_reply(reply)

    async def _step(self, op: int, body: bytes = b"") -> bytes:
        rop, status, rbody = await self.control(init_request(op, body))
        if rop != VstorOp.COMPLETE_IO or status != 0:
            raise StorvscError(f"vstor operation {op}: op={rop}, status={status:#x}")
        return rbody

    async def init_sequence(self) -> None:
        await self._step(VstorOp.BEGIN_INITIALIZATION)
        for v in LINUX_VERSIONS:
            rop, status, _ = await self.control(version_request(v))
            if rop != VstorOp.COMPLETE_IO:
                raise StorvscError(f"QUERY_PROTOCOL_VERSION answered with op {rop}")
            if status == 0:
                self.version = v
                break
        else:
            raise StorvscError("Obsolete Hyper-V version")
        self.properties = decode_properties(await self._step(VstorOp.QUERY_PROPERTIES))
        await self._step(VstorOp.END_INITIALIZATION)
        props = self.properties
        if props.flags & STORAGE_CHANNEL_SUPPORTS_MULTI_CHANNEL:
            await self._sub_channels(min(self.vm.vcpus - 1, props.max_channel_cnt))

    async def _sub_channels(self, num_sc: int) -> None:
        if num_sc <= 0:
            return
        rop, status, _ = await self.control(sub_channels_request(num_sc))
        self.sub_channel_status = status
        if rop != VstorOp.COMPLETE_IO or status != 0:
            log.warning("Failed to create sub-channel: op=%d, sts=%#x", rop, status)
            return
        want = set(range(1, num_sc + 1))
        with trio.fail_after(INIT_TIMEOUT_S):
            while want:
                for o in self.vm.find_offers(SCSI_IF_TYPE):
                    if (
                        o.if_instance == self.offer.if_instance
                        and o.sub_channel_index in want
                        and o.relid not in self.vm.channels
                    ):
                        want.discard(o.sub_channel_index)
                        await self._open_queue(o)
                if want:
                    await self.vm.offer_events.receive()

    # -- SRBs --

    async def execute(
        self,
        cdb: bytes,
        *,
        lun: int = 0,
        path_id: int = 0,
        target_id: int = 0,
        data_in: int = DataIn.NONE,
        length: int = 0,
        data: bytes = b"",
        offset: int = 0,
        queue: int | None = None,
        srb: bytes | None = None,
    ) -> tuple[SrbReply, bytes]:
        """storvsc_queuecommand: one SRB; `length` bytes read or `data` written
        through scattered guest pages (first page at `offset`). `srb` replaces the
        vmscsi_request built here (hostile-guest tests). Returns (reply, data read)."""
        if data:
            length = len(data)
        q = self.queues[next(self._rr) % len(self.queues) if queue is None else queue]
        # storvsc_queuecommand: tag fields only once the device is known to queue
        # (the real driver's first INQUIRYs are untagged, 0x48; later ones 0x14a).
        tagged = (path_id, target_id, lun) in self.tagged
        flags = SRB_FLAGS_DISABLE_SYNCH_TRANSFER
        if tagged:
            flags |= SRB_FLAGS_QUEUE_ACTION_ENABLE | SRB_FLAGS_NO_QUEUE_FREEZE
        flags |= {DataIn.READ: SRB_FLAGS_DATA_IN, DataIn.WRITE: SRB_FLAGS_DATA_OUT}.get(
            DataIn(data_in), 0
        )
        body = srb or encode_srb(
            path_id=path_id,
            target_id=target_id,
            lun=lun,
            cdb=cdb,
            data_in=data_in,
            data_transfer_length=length,
            srb_flags=flags,
            queue_tag=SP_UNTAGGED if tagged else 0,
            queue_action=SRB_SIMPLE_TAG_REQUEST if tagged else 0,
        )
        payload = srb_request(body)
        tag = await q.take_tag()
        tid = ((q.index << 16) | tag) + 1
        pfns: list[int] = []
        try:
            if length:
                npages = (offset + length + PAGE_SIZE - 1) // PAGE_SIZE
                pfns = self.vm.ram.alloc_pages(npages)
                if data:
                    self._scatter(pfns, offset, data)
                rng = GpaRange(length, offset, tuple(pfns))
                pkt = gpa_direct([rng], payload, trans_id=tid)
            else:
                pkt = inband(payload, trans_id=tid, completion_requested=True)
            try:
                raw = await q.call(pkt, tid, IO_TIMEOUT_S)
            except trio.TooSlowError:
                raise StorvscError(f"SRB {cdb[:1].hex()} timed out") from None
            op, reply = decode_srb_reply(raw)
            if op != VstorOp.COMPLETE_IO:
                raise StorvscError(f"SRB answered with op {op}")
            got = b""
            if length and data_in == DataIn.READ:
                n = min(reply.data_transfer_length, length)
                got = self._gather(pfns, offset, n)
            return reply, got
        finally:
            q.give_tag(tag)
            if pfns:
                self.vm.ram.free_pages(pfns)

    def _scatter(self, pfns: list[int], offset: int, data: bytes) -> None:
        mv = memoryview(data)
        pos = 0
        for i, pfn in enumerate(pfns):
            start = offset if i == 0 else 0
            take = min(PAGE_SIZE - start, len(mv) - pos)
            self.vm.ram.page(pfn)[start : start + take] = mv[pos : pos + take]
            pos += take

    def _gather(self, pfns: list[int], offset: int, n: int) -> bytes:
        parts = []
        left = n
        for i, pfn in enumerate(pfns):
            if left <= 0:
                break
            start = offset if i == 0 else 0
            take = min(PAGE_SIZE - start, left)
            parts.append(bytes(self.vm.ram.page(pfn)[start : start + take]))
            left -= take
        return b"".join(parts)

    async def command(self, what: str, cdb: bytes, **kw: Any) -> bytes:
        """execute() that raises ScsiCommandError unless GOOD."""
        reply, got = await self.execute(cdb, **kw)
        if not reply.success:
            raise ScsiCommandError(what, reply)
        return got

    # -- scan --

    async def scan(self) -> dict[int, Disk]:
        """scsi_scan_host as Linux does it for storvsc (spec 9.1), per channel x target
        (__scsi_scan_target): probe LUN 0 and add it if present
        (scsi_probe_and_add_lun), and only then REPORT LUNS (scsi_report_lun_scan)
        and probe every other LUN it lists; a target whose REPORT LUNS fails has
        LUN 0 only, as the sequential scan of a one-LUN target finds."""
        found: dict[int, Disk] = {}
        for path in range(MAX_CHANNELS):
            for target in range(MAX_TARGETS):
                addr: dict[str, Any] = {"path_id": path, "target_id": target}
                inq = await self._probe_lun(0, **addr)
                if not inq:
                    continue  # no target here
                disks: dict[int, Disk] = {}
                if inq[0] >> 5 == 0:
                    disk = await self._add_lun(0, inq, **addr)
                    if disk is not None:
                        disks[0] = disk
                for lun in await self._report_luns(**addr) or []:
                    if lun in disks:
                        continue  # scsi_probe_and_add_lun: already there, no INQUIRY
                    inq = await self._probe_lun(lun, **addr)
                    if len(inq) >= 36 and inq[0] >> 5 == 0:
                        disk = await self._add_lun(lun, inq, **addr)
                        if disk is not None:
                            disks[lun] = disk
                if path == 0 and target == 0:
                    found = disks
        self.disks = found
        return found

    async def _report_luns(self, **addr: Any) -> list[int] | None:
        alloc = 4096
        reply, data = await self.execute(
            bytes([0xA0, 0, 0, 0, 0, 0]) + alloc.to_bytes(4, "big") + b"\0\0",
            data_in=DataIn.READ,
            length=alloc,
            **addr,
        )
        if not reply.success or len(data) < 8:
            return None
        n = int.from_bytes(data[:4], "big") // 8
        return [int.from_bytes(data[8 + 8 * i : 10 + 8 * i], "big") & 0x3FFF for i in range(n)]

    async def _probe_lun(self, lun: int, **addr: Any) -> bytes:
        """scsi_probe_lun: INQUIRY 36, then again with the length the data says (at
        most 255) whatever its peripheral qualifier; the data, b"" for no target."""
        kw: dict[str, Any] = {"lun": lun, "data_in": DataIn.READ, **addr}
        _reply, inq = await self.execute(_inquiry(36), length=36, **kw)
        if len(inq) >= 5 and inq[4] + 5 > 36:
            n = min(inq[4] + 5, 255)
            _reply, again = await self.execute(_inquiry(n), length=n, **kw)
            if len(again) >= 36:
                inq = again
        return inq

    async def _add_lun(self, lun: int, inq: bytes, **addr: Any) -> Disk | None:
        """scsi_add_lun (tagged queueing, scsi_attach_vpd: VPD 0x00, 0x80, 0x83), then
        what sd's probe asks (READ CAPACITY(16), MODE SENSE(6) for write protect)."""
        if len(inq) < 36:
            return None
        kw: dict[str, Any] = {"lun": lun, "data_in": DataIn.READ, **addr}
        if inq[2] >= 2 and inq[7] & 2:  # scsi_add_lun: SCSI-2 or later with CmdQue
            self.tagged.add((addr.get("path_id", 0), addr.get("target_id", 0), lun))
        serial = naa = None
        pages = await self._vpd(0x00, **kw)
        if pages is not None and 0x80 in pages[4:]:
            p80 = await self._vpd(0x80, **kw)
            serial = p80[4:].decode("ascii", "replace").strip() if p80 else None
        if pages is not None and 0x83 in pages[4:]:
            p83 = await self._vpd(0x83, **kw)
            naa = _naa_of(p83) if p83 else None
        rc = await self.command(
            "READ CAPACITY(16)",
            bytes([0x9E, 0x10]) + bytes(8) + (32).to_bytes(4, "big") + b"\0\0",
            length=32,
            **kw,
        )
        blocks, bs = int.from_bytes(rc[:8], "big") + 1, int.from_bytes(rc[8:12], "big")
        ms = await self.command("MODE SENSE(6)", bytes([0x1A, 0, 0x3F, 0, 4, 0]), length=4, **kw)
        return Disk(
            addr.get("path_id", 0),
            addr.get("target_id", 0),
            lun,
            blocks,
            bs,
            bool(ms[2] & 0x80),
            inq[8:16].decode("ascii").strip(),
            inq[16:32].decode("ascii").strip(),
            serial,
            naa,
        )

    async def _vpd(self, page: int, **kw: Any) -> bytes | None:
        reply, head = await self.execute(_inquiry(4, page), length=4, **kw)
        if not reply.success or len(head) < 4 or head[1] != page:
            return None
        n = 4 + int.from_bytes(head[2:4], "big")
        reply, data = await self.execute(_inquiry(n, page), length=n, **kw)
        return data if reply.success else None

    # -- block I/O --

    def _disk(self, lun: int) -> Disk:
        disk = self.disks.get(lun)
        if disk is None:
            raise StorvscError(f"no LUN {lun} (scan found {sorted(self.disks)})")
        return disk

    async def read(
        self, lun: int, lba: int, n: int, *, offset: int = 0, queue: int | None = None
    ) -> bytes:
        """READ(16) of n blocks."""
        bs = self._disk(lun).block_size
        cdb = bytes([0x88, 0]) + lba.to_bytes(8, "big") + n.to_bytes(4, "big") + b"\0\0"
        return await self.command(
            "READ(16)",
            cdb,
            lun=lun,
            data_in=DataIn.READ,
            length=n * bs,
            offset=offset,
            queue=queue,
        )

    async def write(
        self, lun: int, lba: int, data: bytes, *, fua: bool = False, offset: int = 0
    ) -> None:
        """WRITE(16) of whole blocks."""
        bs = self._disk(lun).block_size
        if not data or len(data) % bs:
            raise ValueError(f"write of {len(data)} bytes: not whole {bs}-byte blocks")
        n = len(data) // bs
        cdb = bytes([0x8A, 0x08 if fua else 0]) + lba.to_bytes(8, "big") + n.to_bytes(4, "big")
        await self.command(
            "WRITE(16)", cdb + b"\0\0", lun=lun, data_in=DataIn.WRITE, data=data, offset=offset
        )

    async def flush(self, lun: int | None = None) -> None:
        """SYNCHRONIZE CACHE(10) on one LUN or all."""
        for n in [lun] if lun is not None else sorted(self.disks):
            await self.command("SYNCHRONIZE CACHE(10)", bytes([0x35]) + bytes(9), lun=n)

    async def close(self) -> None:
        for q in reversed(self.queues):
            if q.gch.offer.relid in self.vm.channels:
                await self.vm.close_channel(q.gch)
        self.queues.clear()


def _inquiry(alloc: int, page: int | None = None) -> bytes:
    evpd = 0 if page is None else 1
    return bytes([0x12, evpd, page or 0]) + alloc.to_bytes(2, "big") + b"\0"


def _naa_of(page83: bytes) -> bytes | None:
    """The first NAA designator of VPD page 0x83 (what Linux names wwn-0x... after)."""
    pos = 4
    while pos + 4 <= len(page83):
        dtype, dlen = page83[pos + 1] & 0x0F, page83[pos + 3]
        if dtype == 3:
            return page83[pos + 4 : pos + 4 + dlen]
        pos += 4 + dlen
    return None


@contextlib.asynccontextmanager
async def attach_storvsc(
    vm: SimulatedVm, offer: GuestOffer, *, ring_size: int = RING_SIZE, scan: bool = True
) -> AsyncIterator[StorvscHba]:
    """Probe a storvsc offer; the controller is closed (channels too) on exit."""
    async with trio.open_nursery() as nursery:
        hba = StorvscHba(vm, offer, ring_size)
        try:
            await hba.start(nursery, scan=scan)
            yield hba
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                nursery.cancel_scope.cancel()
                await hba.close()


@register
@dataclass
class StorvscVsc:
    """The `vmbusd vm` driver: probe, scan, write and read back every LUN."""

    if_type: ClassVar = SCSI_IF_TYPE
    name: ClassVar[str] = "storvsc"
    packets: int = 64  # write+read pairs per LUN in the probe's check (at most)
    ring_size: int = RING_SIZE

    async def probe(self, vm: SimulatedVm, offer: GuestOffer) -> dict[str, Any]:
        async with attach_storvsc(vm, offer, ring_size=max(self.ring_size, 2 * PAGE_SIZE)) as hba:
            t0 = time.perf_counter()
            ios = moved = 0
            for lun, disk in sorted(hba.disks.items()):
                if disk.read_only:
                    continue
                n = max(1, min(8, disk.blocks))
                for i in range(min(self.packets, max(1, disk.blocks // n))):
                    data = bytes([(lun + i) & 0xFF]) * (n * disk.block_size)
                    await hba.write(lun, i * n, data)
                    if await hba.read(lun, i * n, n) != data:
                        raise StorvscError(f"LUN {lun}: read back differs at block {i * n}")
                    ios += 2
                    moved += len(data)
            secs = time.perf_counter() - t0
            return {
                "driver": self.name,
                "relid": offer.relid,
                "version": f"{hba.version:#06x}",
                "channels": len(hba.queues),
                "disks": {
                    lun: {"size": d.size, "block_size": d.block_size, "read_only": d.read_only}
                    for lun, d in sorted(hba.disks.items())
                },
                "packets": ios,  # what `vmbusd vm`'s summary line prints
                "bytes": moved,
                "seconds": secs,
            }


# -- the load generator's per-request path ------------------------------------------
#
# `vmbusd bench disk` measures the host. Its guest keeps `depth` requests in flight
# through SrbSlots: per batch one call submits every free slot (LBA, block count,
# trans id patched, packets written to the ring) and one call parses every
# completion received into arrays, in C (native/storvsc_vsc.c) or in the
# pure-Python twin below (VMBUSD_NATIVE=0), same contract: native/storvsc_vsc.h.

E_BAD_ARG = -100  # VMB_VSC_E_*: the tests check these against the build
E_TRANS_ID = -101
E_NOT_COMP = -102
E_SHORT = -103
COMP_MIN = 28  # vstor header + vmscsi_request up to data_transfer_length
SRB_STATUS_SUCCESS = 0x01
LBA_IN_PAYLOAD = HEADER_SIZE + 16 + 2  # vstor header, vmscsi_request before the CDB, op+flags
_M64 = (1 << 64) - 1
_DESC = struct.Struct("<HHHHQ")
_U32 = struct.Struct("<I")
_BE_LBA = struct.Struct(">QI")  # READ(16)/WRITE(16): LBA, then the block count


class SrbSlotsError(StorvscError):
    """The load generator's packets or completions are not what it expects."""

    NAMES: ClassVar[dict[int, str]] = {
        E_BAD_ARG: "bad argument",
        E_TRANS_ID: "trans id of no slot in flight (or submitted twice)",
        E_NOT_COMP: "not a completion",
        E_SHORT: "completion too short",
    }

    def __init__(self, code: int, what: str, at: int = 0) -> None:
        super().__init__(f"{what}: {self.NAMES.get(code, str(code))}")
        self.code = code
        self.at = at  # parse: the index of the bad completion


def splitmix64(state: int) -> tuple[int, int]:
    """(new state, output): the load generator's random LBA source (as the C)."""
    state = (state + 0x9E3779B97F4A7C15) & _M64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return state, z ^ (z >> 31)


@dataclass
class LbaSequence:
    """Where requests go: unit k (`blocks` blocks) is LBA k * blocks; random units
    are splitmix64 % span, sequential ones next % span (then next + 1)."""

    span: int
    blocks: int
    random: bool
    rng: int = 0
    next: int = 0


class ParseResult(NamedTuple):
    """One parsed batch: how many, how many failed (op, vstor or SRB status), the
    first failed one's index, and the bytes the completions say were moved."""

    n: int
    nfailed: int
    first_failed: int
    bytes: int


def _templates(packets: Sequence[OutPacket]) -> tuple[bytearray, int, int]:
    """Preformed packets (descriptor, body, zero pad) back to back, as write_raw takes
    them; (buffer, packet length, offset of the payload in a packet)."""
    out = bytearray()
    pkt_len = off8 = 0
    for i, p in enumerate(packets):
        body = b"".join(bytes(b) for b in p.body)
        length = DESC_SIZE + ((len(body) + 7) & ~7)
        o8 = (DESC_SIZE + p.ext_len) // 8
        if i and (length, o8) != (pkt_len, off8):
            raise ValueError("every slot's packet must have the same shape")
        if p.trans_id != i + 1:
            raise ValueError(f"slot {i} must have trans id {i + 1}")
        pkt_len, off8 = length, o8
        out += _DESC.pack(p.type, o8, length // 8, p.flags, p.trans_id) + body
        out += bytes(length - DESC_SIZE - len(body))
    if not packets:
        raise ValueError("no slots")
    return out, pkt_len, off8 * 8


class PySrbSlots:
    """`depth` prebuilt EXECUTE_SRB packets (slot s has trans id s + 1), in Python:
    the reference for NativeSrbSlots. Parse outputs (trans_id, vstor_status,
    srb_status, scsi_status, xfer_len, lat_ns) hold one batch of up to `max_batch`."""

    def __init__(self, packets: Sequence[OutPacket], seq: LbaSequence, max_batch: int) -> None:
        tmpl, self.pkt_len, payload_at = _templates(packets)
        self.tmpl = tmpl
        self.nslots = len(packets)
        self.lba_at = payload_at + LBA_IN_PAYLOAD
        if self.lba_at + 12 > self.pkt_len:
            raise ValueError("the packets' payload holds no CDB")
        self.seq = seq
        self.max_batch = max_batch
        self.unsent = 0  # packets of the last submit still to write (ring was full)
        self._sent = 0
        self._n = 0
        self._init_arrays()

    def _init_arrays(self) -> None:
        n, b = self.nslots, self.max_batch
        self.t0: Any = array.array("Q", bytes(8 * n))
        self.busy: Any = bytearray(n)  # slot in flight: submitted, not completed
        self.index: Any = array.array("I", bytes(8 * n))
        self.trans_id: Any = array.array("Q", bytes(8 * b))
        self.vstor_status: Any = array.array("I", bytes(4 * b))
        self.srb_status: Any = bytearray(b)
        self.scsi_status: Any = bytearray(b)
        self.xfer_len: Any = array.array("I", bytes(4 * b))
        self.lat_ns: Any = array.array("Q", bytes(8 * b))

    @property
    def unsent_need(self) -> int:
        """Ring bytes the next unsent packet takes (request_space's `need`)."""
        return self.pkt_len + TRAILER_SIZE

    def _check_n(self, n: int, cap: int) -> None:
        if not 0 <= n <= cap:
            raise ValueError(f"{n} packets, room for {cap}")

    def submit(self, writer: PyRingWriter, tids: Sequence[int], n: int, now_ns: int) -> WriteResult:
        """Patch slots tids[:n] with the next LBAs and write them; what did not fit
        stays patched (`unsent`), for resume()."""
        self._check_n(n, self.nslots)
        seq, tmpl, pkt_len, lba_at = self.seq, self.tmpl, self.pkt_len, self.lba_at
        if seq.span <= 0:
            raise SrbSlotsError(E_BAD_ARG, "submit")
        busy = self.busy
        for k in range(n):
            if not 1 <= tids[k] <= self.nslots or busy[tids[k] - 1]:
                for j in range(k):  # undo: nothing changes on an error
                    busy[tids[j] - 1] = 0
                raise SrbSlotsError(E_TRANS_ID, "submit")
            busy[tids[k] - 1] = 1
        index, t0 = self.index, self.t0
        for k in range(n):
            tid = tids[k]
            slot = tid - 1
            p = slot * pkt_len
            if seq.random:
                seq.rng, x = splitmix64(seq.rng)
                unit = x % seq.span
            else:
                unit = seq.next % seq.span
                seq.next = (seq.next + 1) & _M64
            struct.pack_into("<Q", tmpl, p + 8, tid)
            _BE_LBA.pack_into(tmpl, p + lba_at, (unit * seq.blocks) & _M64, seq.blocks)
            t0[slot] = now_ns
            index[2 * k], index[2 * k + 1] = p, pkt_len
        self._sent, self._n = 0, n
        return self._write(writer)

    def resume(self, writer: PyRingWriter) -> WriteResult:
        """Write what the last submit left unsent (as many as fit now)."""
        return self._write(writer)

    def _write(self, writer: PyRingWriter) -> WriteResult:
        k = self._sent
        res = writer.write_raw(self.tmpl, memoryview(self.index)[2 * k :], self._n - k)
        self._sent += res.npkts
        self.unsent = self._n - self._sent
        return res

    def parse(self, buf: Any, index: Any, n: int, now_ns: int) -> ParseResult:
        """The completions of one received batch (PacketBatch's buffer and index)."""
        self._check_n(n, self.max_batch)
        view = memoryview(buf).cast("B")
        idx = memoryview(index).cast("B").cast("I")
        nfailed = first = total = 0
        for k in range(n):
            off, ln = idx[2 * k], idx[2 * k + 1]
            if off + ln > len(view) or ln < DESC_SIZE:
                raise SrbSlotsError(E_BAD_ARG, f"completion {k}", k)
            typ, off8, _len8, _flags, tid = _DESC.unpack_from(view, off)
            if off8 * 8 > ln or off8 < 2:
                raise SrbSlotsError(E_BAD_ARG, f"completion {k}", k)
            if typ != VM_PKT_COMP:
                raise SrbSlotsError(E_NOT_COMP, f"completion {k}", k)
            pl = off + off8 * 8
            if ln - off8 * 8 < COMP_MIN:
                raise SrbSlotsError(E_SHORT, f"completion {k}", k)
            if not 1 <= tid <= self.nslots or not self.busy[tid - 1]:
                raise SrbSlotsError(E_TRANS_ID, f"completion {k}", k)
            self.busy[tid - 1] = 0
            op, _fl, status = struct.unpack_from("<III", view, pl)
            srb, scsi = view[pl + 14], view[pl + 15]
            xfer = _U32.unpack_from(view, pl + 24)[0]
            sent = self.t0[tid - 1]
            self.trans_id[k] = tid
            self.vstor_status[k] = status
            self.srb_status[k] = srb
            self.scsi_status[k] = scsi
            self.xfer_len[k] = xfer
            self.lat_ns[k] = now_ns - sent if now_ns >= sent else 0
            if op != VstorOp.COMPLETE_IO or status or srb != SRB_STATUS_SUCCESS:
                if not nfailed:
                    first = k
                nfailed += 1
            total += xfer
        return ParseResult(n, nfailed, first, total)

    def add_latencies(self, samples: array.array[int], n: int) -> None:
        """Append the last parse's n latencies (ns) to samples."""
        samples.extend(self.lat_ns[:n])


class NativeSrbSlots(PySrbSlots):
    """SrbSlots in C: one native call per batch each way (native/storvsc_vsc.h)."""

    def _init_arrays(self) -> None:
        mod = _native_sel.native_module()
        self._ffi = ffi = mod.ffi
        self._lib = mod.lib
        n, b = self.nslots, self.max_batch
        self._c_tmpl = ffi.from_buffer("uint8_t[]", self.tmpl, require_writable=True)
        self.t0 = ffi.new("uint64_t[]", n)
        self.busy = ffi.new("uint8_t[]", n)
        self.index = ffi.new("uint32_t[]", 2 * n)
        self.trans_id = ffi.new("uint64_t[]", b)
        self.vstor_status = ffi.new("uint32_t[]", b)
        self.srb_status = ffi.new("uint8_t[]", b)
        self.scsi_status = ffi.new("uint8_t[]", b)
        self.xfer_len = ffi.new("uint32_t[]", b)
        self.lat_ns = ffi.new("uint64_t[]", b)
        self._gen = ffi.new("struct vmb_vsc_gen *")
        self._wres = ffi.new("struct vmb_write_result *")
        self._pres = ffi.new("struct vmb_vsc_parse_result *")

    def submit(self, writer: PyRingWriter, tids: Sequence[int], n: int, now_ns: int) -> WriteResult:
        """Patch slots tids[:n] with the next LBAs and write them; what did not fit
        stays patched (`unsent`), for resume()."""
        self._check_n(n, self.nslots)
        ffi, seq, g = self._ffi, self.seq, self._gen
        if seq.span <= 0:
            raise SrbSlotsError(E_BAD_ARG, "submit")
        c_tids = tids if isinstance(tids, ffi.CData) else ffi.new("uint64_t[]", list(tids[:n]))
        g.rng, g.next, g.span, g.blocks = seq.rng, seq.next, seq.span, seq.blocks
        g.random = int(seq.random)
        res = self._wres
        rc = self._lib.vmb_vsc_submit(
            cast(Any, writer)._r,
            self._c_tmpl,
            len(self.tmpl),
            self.pkt_len,
            self.nslots,
            self.lba_at,
            c_tids,
            n,
            g,
            now_ns,
            self.t0,
            self.busy,
            self.index,
            res,
        )
        self._raise(rc, "submit")
        seq.rng, seq.next = int(g.rng), int(g.next)
        self._n, self._sent = n, int(res.npkts)
        self.unsent = n - self._sent
        return WriteResult(int(res.npkts), int(res.bytes), bool(res.signal))

    def _write(self, writer: PyRingWriter) -> WriteResult:
        k = self._sent
        rest = self._ffi.buffer(self.index + 2 * k, 8 * (self._n - k))
        res = writer.write_raw(self.tmpl, rest, self._n - k)
        self._sent += res.npkts
        self.unsent = self._n - self._sent
        return res

    def parse(self, buf: Any, index: Any, n: int, now_ns: int) -> ParseResult:
        """The completions of one received batch (PacketBatch's buffer and index)."""
        self._check_n(n, self.max_batch)
        ffi, r = self._ffi, self._pres
        c_buf = ffi.from_buffer("uint8_t[]", buf)
        c_idx = ffi.from_buffer("uint32_t[]", index)
        if len(c_idx) < 2 * n:
            raise ValueError(f"index holds {len(c_idx) // 2} pairs, n is {n}")
        rc = self._lib.vmb_vsc_parse(
            c_buf,
            len(c_buf),
            c_idx,
            n,
            self.nslots,
            self.t0,
            self.busy,
            now_ns,
            self.trans_id,
            self.vstor_status,
            self.srb_status,
            self.scsi_status,
            self.xfer_len,
            self.lat_ns,
            r,
        )
        if rc:
            self._raise(rc, f"completion {r.n}", int(r.n))
        return ParseResult(int(r.n), int(r.nfailed), int(r.first_failed), int(r.bytes))

    def add_latencies(self, samples: array.array[int], n: int) -> None:
        """Append the last parse's n latencies (ns) to samples."""
        samples.frombytes(self._ffi.buffer(self.lat_ns, 8 * n))

    @staticmethod
    def _raise(rc: int, what: str, at: int = 0) -> None:
        if rc <= E_BAD_ARG:
            raise SrbSlotsError(rc, what, at)
        if rc:
            _ring_raise(rc, what)


if TYPE_CHECKING:
    SrbSlots = PySrbSlots
else:
    SrbSlots = NativeSrbSlots if _native_sel.NATIVE else PySrbSlots


async def submit_slots(
    channel: Channel, slots: PySrbSlots, tids: Sequence[int], n: int, now_ns: int
) -> None:
    """Submit n slots on a channel; waits (this channel only) while its ring is full.

    The send lock is taken without a checkpoint when free (the caller's receive has
    just been one): a scheduler pass per batch is most of what the guest costs."""
    lock = channel._send_lock
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()
    try:
        res = slots.submit(channel.writer, tids, n, now_ns)
        channel._account(res.npkts, res.bytes, res.signal)
        while slots.unsent:
            await channel._wait_space(slots.unsent_need)
            res = slots.resume(channel.writer)
            channel._account(res.npkts, res.bytes, res.signal)
    finally:
        lock.release()
