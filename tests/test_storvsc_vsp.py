"""The storvsc VSP end to end: a real session (`local_service`), the simulated VM and
its storvsc driver (devices/storvsc/vsc.py) doing what Linux 6.1's hv_storvsc does;
then the bad-input list of the storvsc issue, one test each."""

from __future__ import annotations

import logging
import os
import random
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from devices.storvsc.backends.memory import MemoryBackend
from devices.storvsc.protocol import (
    PACKET_SIZE,
    SCSI_IF_TYPE,
    SENSE_BUFFER_SIZE,
    VMBUS_RQST_INIT,
    VMBUS_RQST_RESET,
    DataIn,
    NtStatus,
    SrbStatus,
    VstorOp,
    build_packet,
    decode_reply,
    decode_srb_reply,
    encode_srb,
    init_request,
    srb_request,
    sub_channels_request,
)
from devices.storvsc.vsc import Disk, StorvscHba, attach_storvsc
from devices.storvsc.vsp import StorvscDevice
from vmbus.config import ConfigError, devices_from_config
from vmbus.gpadl import PAGE_SIZE, GpaRange
from vmbus.guest.vm import GuestOffer, SimulatedVm
from vmbus.packet import PacketType, gpa_direct, inband
from vmbus.ring import OutPacket

READ_16, WRITE_16 = 0x88, 0x8A


def _rw(op: int, lba: int, n: int) -> bytes:
    return bytes([op, 0]) + lba.to_bytes(8, "big") + n.to_bytes(4, "big") + b"\0\0"


class ThreeLuns(StorvscDevice):
    """LUN 0: 8 MiB/512, LUN 3: 4 MiB/4096, LUN 5: 1 MiB read-only; 2 sub-channels."""

    def __init__(self) -> None:
        super().__init__(
            max_subchannels=2,
            lun=[
                {"size": "8M"},
                {"lun": 3, "size": "4M", "block_size": 4096, "serial": "SER-3"},
                {"lun": 5, "size": "1M", "readonly": True},
            ],
        )


class SlowBackend(MemoryBackend):
    """A memory disk whose reads of LBA 0 take long: later requests overtake them."""

    def __init__(self) -> None:
        super().__init__(size="1M")
        self.order: list[int] = []

    async def readv(self, offset: int, buffers: Any) -> None:
        if offset == 0:
            await trio.sleep(0.3)
        await super().readv(offset, buffers)
        self.order.append(offset)


class ThreadedSlowBackend(MemoryBackend):
    """Reads in a worker thread that cannot be cancelled (as the file backend's
    preadv): 0.3 s, then the bytes land (0x77)."""

    def __init__(self) -> None:
        super().__init__(size="1M")

    async def readv(self, offset: int, buffers: Any) -> None:
        def slow() -> None:
            time.sleep(0.3)
            for b in buffers:
                b[:] = b"\x77" * len(b)

        await trio.to_thread.run_sync(slow)


class ThreadedSlowDisk(StorvscDevice):
    def __init__(self) -> None:
        super().__init__(lun=[{"backend": "test_storvsc_vsp:ThreadedSlowBackend"}])


class SlowDisk(StorvscDevice):
    """One slow LUN, queue depth 4 per channel."""

    def __init__(self) -> None:
        super().__init__(lun=[{"backend": "test_storvsc_vsp:SlowBackend"}], queue_depth=4)


def _offer(vm: SimulatedVm) -> GuestOffer:
    (offer,) = [o for o in vm.find_offers(SCSI_IF_TYPE) if o.sub_channel_index == 0]
    return offer


def _device(svc: Any) -> StorvscDevice:
    dev = [d for d in svc.session().devices if isinstance(d, StorvscDevice)]
    return dev[0]


# --- the happy path --------------------------------------------------------------------


@pytest.mark.devices.with_args(ThreeLuns)
async def test_init_scan_and_io(local_vm: SimulatedVm, local_service: Any) -> None:
    async with attach_storvsc(local_vm, _offer(local_vm)) as hba:
        assert hba.version == 0x0602  # the first version Linux 6.1 proposes
        assert hba.properties is not None
        assert hba.properties.max_channel_cnt == 2
        assert hba.properties.max_transfer_bytes == 0x40000
        # vcpus=2 in the simulated VM: Linux asks for min(2 - 1, 2) = 1 sub-channel
        assert len(hba.queues) == 2
        assert sorted(hba.disks) == [0, 3, 5]
        d0, d3, d5 = hba.disks[0], hba.disks[3], hba.disks[5]
        assert (d0.size, d0.block_size, d0.read_only) == (8 << 20, 512, False)
        assert (d3.size, d3.block_size, d3.read_only) == (4 << 20, 4096, False)
        assert (d5.size, d5.read_only) == (1 << 20, True)
        assert d3.serial == "SER-3" and d0.naa and d0.naa != d3.naa
        rnd = random.Random(1)
        for lun in (0, 3):
            bs = hba.disks[lun].block_size
            for lba, n, off in ((0, 1, 0), (7, 9, 512), (100, 64, 0)):
                data = rnd.randbytes(n * bs)
                await hba.write(lun, lba, data, offset=off)
                assert await hba.read(lun, lba, n, offset=off) == data
        await hba.flush()
        # every channel carried I/O, and no reply broke Linux's rules
        for q in hba.queues:
            assert q.channel.stats.packets_out > 0
            assert q.errors == []
        with pytest.raises(
            Exception, match="srb 0x84 scsi 0x2 sense 700007000000000a00000000270000000000"
        ):
            await hba.write(5, 0, bytes(512))  # DATA PROTECT / WRITE PROTECTED


async def test_file_backend_every_byte(tmp_path: Path, nursery: trio.Nursery) -> None:
    """A file LUN through a config, as `vmbusd serve --config` builds it."""
    from conftest import attached_vm

    from vmbus.server import serve_listener

    img = tmp_path / "disk.img"
    cfg = {
        "device": [
            {"type": "storvsc", "lun": [{"backend": "file", "path": str(img), "create_size": "2M"}]}
        ]
    }
    sock = str(tmp_path / "s.sock")
    await nursery.start(lambda **kw: serve_listener(sock, lambda: devices_from_config(cfg), **kw))
    async with attached_vm(sock) as vm:
        async with attach_storvsc(vm, _offer(vm)) as hba:
            assert hba.disks[0].size == 2 << 20
            data = random.Random(2).randbytes(2 << 20)
            for lba in range(0, 4096, 128):
                await hba.write(0, lba, data[lba * 512 : (lba + 128) * 512])
            await hba.flush()
            for lba in range(0, 4096, 256):
                assert await hba.read(0, lba, 256) == data[lba * 512 : (lba + 256) * 512]
    assert img.read_bytes() == data  # the backend's bytes, read directly
    nursery.cancel_scope.cancel()


@pytest.mark.devices.with_args(SlowDisk)
async def test_out_of_order_and_flow_control(local_vm: SimulatedVm, local_service: Any) -> None:
    async with attach_storvsc(local_vm, _offer(local_vm)) as hba:
        dev = _device(local_service)
        backend = dev.controller.disk(0).backend
        assert isinstance(backend, SlowBackend)
        backend.order.clear()
        dev.max_in_flight_seen = 0
        done: list[int] = []

        async def one(lba: int) -> None:
            await hba.read(0, lba, 1, offset=0)
            done.append(lba)

        async with trio.open_nursery() as n:
            for lba in range(12):  # 12 outstanding against a cap of 4 per channel
                n.start_soon(one, lba)
                await trio.sleep(0)
        assert done.index(0) > 0  # LBA 0 was overtaken
        assert backend.order.index(0) > 0
        assert sorted(done) == list(range(12))
        assert 1 <= dev.max_in_flight_seen <= 4


@pytest.mark.devices.with_args(ThreeLuns)
async def test_enumerate_bus_on_lun_change(local_vm: SimulatedVm, local_service: Any) -> None:
    """A LUN added at runtime: the VSP sends ENUMERATE_BUS (in-band, id 0, no
    completion wanted) on the primary, and the guest's rescan finds the new disk."""
    async with attach_storvsc(local_vm, _offer(local_vm)) as hba:
        dev = _device(local_service)
        assert sorted(hba.disks) == [0, 3, 5]
        dev.controller.add_lun(9, MemoryBackend(size="2M"))
        dev.bus_changed()
        dev.bus_changed()  # coalesced while the first is pending
        with trio.fail_after(5):
            while hba.queues[0].enumerate_bus == 0:
                await trio.sleep(0.01)
        await trio.sleep(0.05)
        assert hba.queues[0].enumerate_bus == 1
        assert all(q.enumerate_bus == 0 for q in hba.queues[1:])
        await hba.scan()
        assert sorted(hba.disks) == [0, 3, 5, 9] and hba.disks[9].size == 2 << 20
        dev.controller.remove_lun(9)
        dev.bus_changed()
        reply, _ = await hba.execute(bytes(6), lun=9)  # Linux's TEST UNIT READY
        assert reply.srb_status == SrbStatus.INVALID_LUN  # "the LUN is gone"
        assert hba.queues[0].errors == []


# --- the init handshake as Linux does it, and its refusals ------------------------------


@pytest.mark.devices.with_args(ThreeLuns)
async def test_linux_init_bytes(local_vm: SimulatedVm) -> None:
    async with attach_storvsc(local_vm, _offer(local_vm), scan=False) as hba:
        q = hba.queues[0]
        # The host mirrors each reply's size and the trans id; after init the
        # negotiated size. A second BEGIN is refused (INVALID_DEVICE_STATE).
        op, status, _ = await hba.control(init_request(VstorOp.BEGIN_INITIALIZATION))
        assert (op, status) == (VstorOp.COMPLETE_IO, NtStatus.INVALID_DEVICE_STATE)
        # CREATE_SUB_CHANNELS twice (the driver did it once already)
        op, status, _ = await hba.control(sub_channels_request(1))
        assert status == NtStatus.INVALID_DEVICE_STATE
        # reset during I/O: RESET_BUS with Linux's reset id; I/O still completes
        async with trio.open_nursery() as n:
            n.start_soon(hba.execute, bytes(6))  # TEST UNIT READY
            pkt = inband(
                init_request(VstorOp.RESET_BUS),
                trans_id=VMBUS_RQST_RESET,
                completion_requested=True,
            )
            raw = await q.call(pkt, VMBUS_RQST_RESET, 5)
            assert decode_reply(raw)[:2] == (VstorOp.COMPLETE_IO, 0)
        assert q.errors == []


@pytest.mark.devices.with_args(ThreeLuns)
async def test_sub_channels_zero_and_too_many(local_vm: SimulatedVm) -> None:
    hba = StorvscHba(local_vm, _offer(local_vm))
    async with trio.open_nursery() as n:
        hba._nursery = n
        await hba._open_queue(hba.offer)
        for op in (VstorOp.BEGIN_INITIALIZATION,):
            await hba._step(op)
        await hba.control(
            build_packet(VstorOp.QUERY_PROTOCOL_VERSION, struct.pack("<HH", 0x0602, 0), flags=1)
        )
        # SRB before END_INITIALIZATION
        reply, _ = await hba.execute(bytes(6))
        assert reply.status == NtStatus.INVALID_DEVICE_STATE
        assert reply.srb_status == SrbStatus.INVALID_REQUEST | 0x80
        await hba._step(VstorOp.QUERY_PROPERTIES)
        for count, status in ((0, NtStatus.INVALID_PARAMETER), (3, NtStatus.INVALID_PARAMETER)):
            _, st, _ = await hba.control(sub_channels_request(count))
            assert st == status
        await hba._step(VstorOp.END_INITIALIZATION)
        # an unknown version is refused with REVISION_MISMATCH (state then is Ready,
        # so a fresh primary would be needed; here only the status matters)
        _, st, _ = await hba.control(build_packet(VstorOp.FCHBA_DATA, flags=1))
        assert st == NtStatus.INVALID_DEVICE_REQUEST  # a SCSI controller is not FC
        _, st, _ = await hba.control(build_packet(99, flags=1))
        assert st == NtStatus.INVALID_DEVICE_REQUEST
        await hba.close()
        n.cancel_scope.cancel()


# --- bad SRBs ---------------------------------------------------------------------------


async def _raw(hba: StorvscHba, pkt: Any, tid: int = 7) -> Any:
    raw = await hba.queues[0].call(pkt, tid, 5)
    return decode_srb_reply(raw)[1]


@pytest.mark.devices.with_args(ThreeLuns)
async def test_bad_srbs(local_vm: SimulatedVm) -> None:
    async with attach_storvsc(local_vm, _offer(local_vm)) as hba:
        # cdb_length > 16
        srb = encode_srb(cdb=bytes(16), cdb_length=17)
        r = await _raw(hba, inband(srb_request(srb), trans_id=7, completion_requested=True))
        assert r.srb_status == SrbStatus.INVALID_REQUEST | 0x80 and r.scsi_status == 2
        assert r.sense[2] == 5 and r.sense[12] == 0x24
        # sense_info_length bigger than the buffer: clamped, never more than 20
        srb = encode_srb(cdb=bytes([0x12, 1, 0x42, 0, 4, 0]), sense_info_length=255)
        r = await _raw(hba, inband(srb_request(srb), trans_id=7, completion_requested=True))
        assert r.sense_info_length <= SENSE_BUFFER_SIZE and r.scsi_status == 2
        # ... and capped by a smaller offer
        srb = encode_srb(cdb=bytes([0x12, 1, 0x42, 0, 4, 0]), sense_info_length=8)
        r = await _raw(hba, inband(srb_request(srb), trans_id=7, completion_requested=True))
        assert r.sense_info_length == 8
        # data_transfer_length disagreeing with the ranges
        pfns = local_vm.ram.alloc_pages(2)
        srb = encode_srb(cdb=_rw(READ_16, 0, 8), data_in=DataIn.READ, data_transfer_length=8192)
        pkt = gpa_direct([GpaRange(4096, 0, tuple(pfns[:1]))], srb_request(srb), trans_id=7)
        r = await _raw(hba, pkt)
        assert r.status == NtStatus.INVALID_PARAMETER and r.srb_status == 0x86
        # an inband SRB claiming data
        srb = encode_srb(cdb=_rw(READ_16, 0, 1), data_in=DataIn.READ, data_transfer_length=512)
        r = await _raw(hba, inband(srb_request(srb), trans_id=7, completion_requested=True))
        assert r.status == NtStatus.INVALID_PARAMETER
        # a READ whose SRB says WRITE: the buffer is read-only to the device
        srb = encode_srb(cdb=_rw(READ_16, 0, 8), data_in=DataIn.WRITE, data_transfer_length=4096)
        pkt = gpa_direct([GpaRange(4096, 0, tuple(pfns[:1]))], srb_request(srb), trans_id=7)
        local_vm.ram.page(pfns[0])[:] = b"\xaa" * PAGE_SIZE
        r = await _raw(hba, pkt)
        assert r.scsi_status == 2 and r.sense[12] == 0x24
        assert bytes(local_vm.ram.page(pfns[0])) == b"\xaa" * PAGE_SIZE  # untouched
        # ... and a WRITE whose SRB says READ: refused, the disk keeps its bytes
        srb = encode_srb(cdb=_rw(WRITE_16, 0, 8), data_in=DataIn.READ, data_transfer_length=4096)
        pkt = gpa_direct([GpaRange(4096, 0, tuple(pfns[:1]))], srb_request(srb), trans_id=7)
        r = await _raw(hba, pkt)
        assert r.scsi_status == 2 and r.sense[12] == 0x24
        assert await hba.read(0, 0, 8) == bytes(4096)
        # a GPA range outside guest RAM (well-formed packet): refused with a status
        srb = encode_srb(cdb=_rw(READ_16, 0, 8), data_in=DataIn.READ, data_transfer_length=4096)
        pkt = gpa_direct([GpaRange(4096, 0, (1 << 30,))], srb_request(srb), trans_id=7)
        r = await _raw(hba, pkt)
        assert r.status == NtStatus.INVALID_PARAMETER and r.scsi_status == 2
        # path/target/LUN out of range: INQUIRY says "no LUN", others INVALID_LUN
        reply, data = await hba.execute(
            bytes([0x12, 0, 0, 0, 36, 0]), lun=200, data_in=1, length=36
        )
        assert reply.success and data[0] == 0x7F
        addrs: list[dict[str, Any]] = [{"lun": 200}, {"path_id": 9}, {"target_id": 7}]
        for addr in addrs:
            reply, _ = await hba.execute(bytes(6), **addr)
            assert reply.srb_status == SrbStatus.INVALID_LUN and reply.scsi_status == 0
        # REPORT LUNS on another target: an empty list
        reply, data = await hba.execute(
            bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]), target_id=1, data_in=1, length=256
        )
        assert reply.success and data[:4] == bytes(4)
        local_vm.ram.free_pages(pfns)
        assert hba.queues[0].errors == []
        # the channel still works
        assert await hba.read(0, 0, 1)


# --- bad packets that reset the channel --------------------------------------------------


async def _expect_reset(vm: SimulatedVm, hba: StorvscHba, pkt: Any, caplog: Any) -> None:
    relid = hba.queues[0].gch.offer.relid
    with caplog.at_level(logging.INFO):
        await hba.queues[0].channel.send([pkt])
        with trio.fail_after(5):
            await vm.wait_rescind(relid)
    lines = [
        r.getMessage()
        for r in caplog.records
        if f"relid {relid} (storvsc)" in r.getMessage() and "channel reset" in r.getMessage()
    ]
    assert len(lines) == 1, lines  # one log line names the channel and why


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: inband(b"\0" * 56, trans_id=7, completion_requested=True), id="short"),
        pytest.param(lambda: inband(b"\0" * 72, trans_id=7, completion_requested=True), id="long"),
        pytest.param(
            lambda: inband(init_request(VstorOp.RESET_LUN), trans_id=7), id="no-completion"
        ),
        pytest.param(lambda: _raw_gpa(struct.pack("<IIIIQ", 0, 1, 4096, 4096, 1)), id="offset"),
        pytest.param(
            lambda: _raw_gpa(struct.pack("<IIIIQ", 0, 1, 0xFFFFFFFF, 4095, 1)), id="overflow"
        ),
        pytest.param(lambda: _raw_gpa(struct.pack("<IIIIQ", 0, 3, 4096, 0, 1)), id="more-ranges"),
    ],
)
@pytest.mark.devices.with_args(ThreeLuns)
async def test_reset_on_broken_packets(local_vm: SimulatedVm, make: Any, caplog: Any) -> None:
    async with attach_storvsc(local_vm, _offer(local_vm), scan=False) as hba:
        await _expect_reset(local_vm, hba, make(), caplog)


def _raw_gpa(ext: bytes) -> OutPacket:
    """A GPA-direct packet with a hand-made (broken) range list."""
    srb = encode_srb(cdb=_rw(READ_16, 0, 8), data_in=DataIn.READ, data_transfer_length=4096)
    return OutPacket(PacketType.GPA_DIRECT, 1, 7, (ext, srb_request(srb)), len(ext))


@pytest.mark.devices.with_args(SlowDisk)
async def test_close_with_io_in_flight(local_vm: SimulatedVm, local_service: Any) -> None:
    """The guest closes the channel while a slow READ is in flight: the READ is
    finished or cancelled, and nothing lands in the pages afterwards."""
    hba = StorvscHba(local_vm, _offer(local_vm))
    async with trio.open_nursery() as n:
        await hba.start(n, scan=False)
        q = hba.queues[0]
        pfns = local_vm.ram.alloc_pages(1)
        srb = encode_srb(cdb=_rw(READ_16, 0, 1), data_in=DataIn.READ, data_transfer_length=512)
        await q.channel.send(
            [gpa_direct([GpaRange(512, 0, tuple(pfns))], srb_request(srb), trans_id=9)]
        )
        await trio.sleep(0.05)  # the slow read (0.3 s) is in flight
        await hba.close()
        local_vm.ram.page(pfns[0])[:] = b"\x55" * PAGE_SIZE
        await trio.sleep(0.5)
        assert bytes(local_vm.ram.page(pfns[0])) == b"\x55" * PAGE_SIZE
        n.cancel_scope.cancel()
    # the device serves the next open
    async with attach_storvsc(local_vm, _offer(local_vm)) as hba2:
        assert await hba2.read(0, 1, 1) == bytes(512)


async def _manual_init(ch: Any) -> None:
    """Linux's init sequence on a raw guest channel (no driver reading for us)."""
    steps = [
        init_request(VstorOp.BEGIN_INITIALIZATION),
        build_packet(VstorOp.QUERY_PROTOCOL_VERSION, struct.pack("<HH", 0x0602, 0), flags=1),
        init_request(VstorOp.QUERY_PROPERTIES),
        init_request(VstorOp.END_INITIALIZATION),
    ]
    for p in steps:
        await ch.send([inband(p, trans_id=VMBUS_RQST_INIT, completion_requested=True)])
        with trio.fail_after(5):
            (reply,) = list(await ch.receive())
        # a completion (0x0B), flags 0, the id echoed, a 64-byte vstor_packet
        assert (reply.type, reply.flags, reply.trans_id) == (0x0B, 0, VMBUS_RQST_INIT)
        assert len(reply.payload) == PACKET_SIZE
        assert decode_reply(bytes(reply.payload))[:2] == (VstorOp.COMPLETE_IO, 0)


@pytest.mark.devices.with_args(ThreadedSlowDisk)
async def test_close_waits_for_uncancellable_io(local_vm: SimulatedVm) -> None:
    """A READ in a worker thread cannot be cancelled: the close is answered only
    after it finished, so its bytes land while the guest still owns the pages and
    never after."""
    hba = StorvscHba(local_vm, _offer(local_vm))
    async with trio.open_nursery() as n:
        await hba.start(n, scan=False)
        q = hba.queues[0]
        pfns = local_vm.ram.alloc_pages(1)
        srb = encode_srb(cdb=_rw(READ_16, 0, 1), data_in=DataIn.READ, data_transfer_length=512)
        pkt = gpa_direct([GpaRange(512, 0, tuple(pfns))], srb_request(srb), trans_id=9)
        await q.channel.send([pkt])
        await trio.sleep(0.05)
        t0 = time.monotonic()
        await hba.close()
        assert time.monotonic() - t0 >= 0.2  # the close waited for the read
        assert bytes(local_vm.ram.page(pfns[0])[:512]) == b"\x77" * 512
        local_vm.ram.page(pfns[0])[:] = b"\x55" * PAGE_SIZE
        await trio.sleep(0.5)
        assert bytes(local_vm.ram.page(pfns[0])) == b"\x55" * PAGE_SIZE
        n.cancel_scope.cancel()


@pytest.mark.devices.with_args(SlowDisk)
async def test_reset_during_io(local_vm: SimulatedVm) -> None:
    """RESET_BUS (Linux's eh_host_reset, id VMBUS_RQST_RESET) while a READ is in
    flight: the reset is answered at once and the READ still completes, as Linux
    waits for it to drain."""
    async with attach_storvsc(local_vm, _offer(local_vm), scan=False) as hba:
        hba.disks = {0: Disk(0, 0, 0, 2048, 512, False, "", "", None, None)}
        q = hba.queues[0]
        results: list[str] = []

        async def slow_read() -> None:
            assert await hba.read(0, 0, 1, queue=0) == bytes(512)
            results.append("read")

        async with trio.open_nursery() as n:
            n.start_soon(slow_read)
            await trio.sleep(0.05)
            pkt = inband(
                init_request(VstorOp.RESET_BUS),
                trans_id=VMBUS_RQST_RESET,
                completion_requested=True,
            )
            raw = await q.call(pkt, VMBUS_RQST_RESET, 5)
            assert decode_reply(raw)[:2] == (VstorOp.COMPLETE_IO, 0)
            results.append("reset")
        assert results == ["reset", "read"]


@pytest.mark.devices.with_args(SlowDisk)
async def test_guest_never_reads_completions(local_vm: SimulatedVm, local_service: Any) -> None:
    """A guest that stops reading its completions: that channel's completions wait
    in a full ring, the host takes no more than queue_depth requests off it, and the
    sub-channel carries on."""
    gch = await local_vm.open_channel(_offer(local_vm), 2 * PAGE_SIZE)
    ch = gch.channel
    await _manual_init(ch)
    await ch.send(
        [inband(sub_channels_request(1), trans_id=VMBUS_RQST_INIT, completion_requested=True)]
    )
    with trio.fail_after(5):
        (reply,) = list(await ch.receive())
    assert decode_reply(bytes(reply.payload))[1] == 0
    dev = _device(local_service)
    dev.max_in_flight_seen = 0
    srb = srb_request(encode_srb(cdb=bytes(6)))  # TEST UNIT READY
    # 60 requests; completions (88 ring bytes each) overflow the one-page ring
    with trio.move_on_after(1):
        for i in range(60):
            await ch.send([inband(srb, trans_id=100 + i, completion_requested=True)])
    await trio.sleep(0.2)
    assert dev.max_in_flight_seen == dev.queue_depth  # reached, never passed
    # the sub-channel still carries I/O
    with trio.fail_after(5):
        while True:
            subs = [o for o in local_vm.find_offers(SCSI_IF_TYPE) if o.sub_channel_index == 1]
            if subs:
                break
            await local_vm.offer_events.receive()
    sub = await local_vm.open_channel(subs[0], 4 * PAGE_SIZE)
    await sub.channel.send([inband(srb, trans_id=1, completion_requested=True)])
    with trio.fail_after(5):
        (reply,) = list(await sub.channel.receive())
    assert decode_srb_reply(bytes(reply.payload))[1].success
    # the stalled guest reads at last: everything it sent is answered
    got: set[int] = set()
    with trio.fail_after(5):
        while len(got) < 60:
            got.update(p.trans_id for p in await ch.receive())
    assert got == set(range(100, 160))


# --- configuration ----------------------------------------------------------------------


def test_config_errors(tmp_path: Path) -> None:
    def build(*luns: dict[str, Any]) -> Any:
        return devices_from_config({"device": [{"type": "storvsc", "lun": list(luns)}]})

    with pytest.raises(ConfigError, match="does not exist"):
        build({"backend": "file", "path": str(tmp_path / "nope.img")})
    with pytest.raises(ConfigError, match="multiple of 512"):
        build({"size": 1000})
    with pytest.raises(ConfigError, match="LUN 1 is configured twice"):
        build({"lun": 1, "size": "1M"}, {"lun": 1, "size": "1M"})
    with pytest.raises(ConfigError, match=r"unknown backend .tape.*file, memory, nbd"):
        build({"backend": "tape"})
    with pytest.raises(ConfigError, match=r"\[\[device.lun\]\] table"):
        devices_from_config({"device": [{"type": "storvsc", "lun": 3}]})
    with pytest.raises(ConfigError, match="lun must be an integer"):
        build({"lun": 300, "size": "1M"})
    (dev,) = build({"size": "1M", "serial": "S1"}, {"lun": 2, "size": "2M", "block_size": 4096})
    assert isinstance(dev, StorvscDevice)
    assert dev.controller.luns == [0, 2]
    assert dev.controller.disk(2).block_size == 4096
    img = tmp_path / "ro.img"
    img.write_bytes(bytes(1 << 20))
    (dev,) = build({"backend": "file", "path": str(img), "readonly": True})
    assert dev.controller.disk(0).backend.read_only
    os.unlink(img)


def test_config_file(tmp_path: Path) -> None:
    """The TOML a user writes, through `vmbusd serve --config`'s loader."""
    from vmbus.config import load_devices

    img = tmp_path / "d.img"
    img.write_bytes(bytes(2 << 20))
    cfg = tmp_path / "vm.toml"
    cfg.write_text(
        f"""
[[device]]
type = "storvsc"
instance = "6ab0b0c1-2d3e-4f50-8a6b-7c8d9e0f1a2b"

[[device.lun]]
size = "4M"
serial = "MEM0"

[[device.lun]]
lun = 2
backend = "file"
path = "{img}"
readonly = true
wwn = "disk-two"
"""
    )
    (dev,) = load_devices(str(cfg))
    assert isinstance(dev, StorvscDevice) and dev.controller.luns == [0, 2]
    assert dev.controller.disk(2).backend.read_only
    (again,) = load_devices(str(cfg))  # stable identifiers across restarts
    assert isinstance(again, StorvscDevice)
    assert again.controller.disk(0).naa == dev.controller.disk(0).naa
    assert again.controller.disk(2).naa != dev.controller.disk(0).naa
    cfg.write_text('[[device]]\ntype = "storvsc"\n[[device.lun]]\nsize = "1M"\nbogus = 1\n')
    with pytest.raises(ConfigError, match="bogus"):
        load_devices(str(cfg))


# --- the real guest ---------------------------------------------------------------------

LINUX_CONFIG = """\
[[device]]
type = "storvsc"
instance = "6ab0b0c1-2d3e-4f50-8a6b-7c8d9e0f1a2b"

[[device.lun]]
size = "64M"
serial = "VMBUSD-0"

[[device.lun]]
lun = 3
size = "32M"
block_size = 4096

[[device.lun]]
lun = 7
backend = "file"
path = "{img}"
readonly = true
"""


def _boot_real_linux(
    tmp_path: Path, config: str, until: str, append: str = ""
) -> tuple[subprocess.CompletedProcess[str], str, str]:
    """`vmbusd serve --config` + `vmbusd kvm` (2 vCPUs) to `until`: (kvm run,
    console, vmbusd's log)."""
    from vmbus.kvm import kernel as kbuild

    vmlinux = kbuild.build(lambda line: print(f"guest-kernel: {line}", file=sys.stderr)).vmlinux
    exe = str(Path(sys.executable).with_name("vmbusd"))
    cfg = tmp_path / "vm.toml"
    cfg.write_text(config)
    sock, log = tmp_path / "s.sock", tmp_path / "vmbusd.log"
    with open(log, "wb") as f:
        serve = subprocess.Popen(
            [exe, "-v", "serve", "--listen", str(sock), "--config", str(cfg)],
            stdout=f,
            stderr=f,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 20
        while "listening on" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline and serve.poll() is None, log.read_text()
            time.sleep(0.05)
        console = tmp_path / "console.log"
        args = [exe, "kvm", "--connect", str(sock), "--kernel", str(vmlinux), "--cpus", "2"]
        args += ["--console", str(console), "--timeout", "170", "--until", until]
        if append:
            args += ["--append", append]
        kvm = subprocess.run(args, capture_output=True, text=True, timeout=200)
    finally:
        serve.terminate()
        serve.wait(10)
    return kvm, console.read_text(errors="replace"), log.read_text(errors="replace")


@pytest.mark.kvm_linux
@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="/dev/kvm is absent")
def test_real_linux_scans_the_luns(tmp_path: Path) -> None:
    """Linux 6.1's hv_storvsc on KVM against `vmbusd serve`: it negotiates, opens a
    sub-channel (2 vCPUs), scans and attaches every LUN with the configured size,
    block size and write protection, reads their partition tables, and vmbusd
    refuses nothing and resets no channel."""
    img = tmp_path / "ro.img"
    img.write_bytes(bytes(16 << 20))
    until = r"sdc\] Attached SCSI disk|Kernel panic"
    kvm, out, served = _boot_real_linux(tmp_path, LINUX_CONFIG.format(img=img), until)
    assert kvm.returncode == 0, kvm.stdout + kvm.stderr + out[-3000:]
    assert "2 bind(s)" in kvm.stdout + kvm.stderr  # primary + one sub-channel
    assert "scsi host0: storvsc_host_t" in out
    for line in (
        "scsi 0:0:0:0: Direct-Access     Msft     Virtual Disk     1.0  PQ: 0 ANSI: 5",
        "[sda] 131072 512-byte logical blocks: (67.1 MB/64.0 MiB)",
        "[sda] Write Protect is off",
        "[sdb] 8192 4096-byte logical blocks: (33.6 MB/32.0 MiB)",
        "[sdc] 32768 512-byte logical blocks: (16.8 MB/16.0 MiB)",
        "[sdc] Write Protect is on",
        "sd 0:0:0:3: [sdb] Attached SCSI disk",
        "sd 0:0:0:7: [sdc] Attached SCSI disk",
    ):
        assert line in out, line
    assert "storvsc" not in "".join(x for x in out.splitlines() if "rror" in x)
    assert "channel reset" not in served and "refused" not in served, served[-3000:]


@pytest.mark.kvm_linux
@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="/dev/kvm is absent")
def test_real_linux_mounts_ext4_read_write(tmp_path: Path) -> None:
    """Linux 6.1 mounts an ext4 file-backed LUN read-write as its root (then panics:
    the image has no init). The guest's writes reach the file (the superblock's
    mount count goes 0 -> 1) and e2fsck finds the file system consistent."""
    from conftest import require_tool

    mkfs = require_tool("mkfs.ext4", "e2fsprogs")
    e2fsck = require_tool("e2fsck", "e2fsprogs")
    dumpe2fs = require_tool("dumpe2fs", "e2fsprogs")
    img = tmp_path / "root.img"
    img.write_bytes(b"")
    os.truncate(img, 64 << 20)
    subprocess.run([mkfs, "-q", "-F", str(img)], check=True)

    def mount_count() -> int:
        out = subprocess.run([dumpe2fs, "-h", str(img)], capture_output=True, text=True).stdout
        (line,) = [x for x in out.splitlines() if x.startswith("Mount count:")]
        return int(line.split(":")[1])

    assert mount_count() == 0
    config = f'[[device]]\ntype = "storvsc"\n[[device.lun]]\nbackend = "file"\npath = "{img}"\n'
    kvm, out, served = _boot_real_linux(
        tmp_path, config, "Kernel panic", append="root=/dev/sda rw rootfstype=ext4"
    )
    assert kvm.returncode == 0, kvm.stdout + kvm.stderr + out[-3000:]
    assert "EXT4-fs (sda): mounted filesystem with ordered data mode" in out, out[-3000:]
    assert "VFS: Mounted root (ext4 filesystem) on device 8:0." in out
    assert "channel reset" not in served and "refused" not in served, served[-3000:]
    assert mount_count() == 1  # the guest's superblock write is in the file
    # the guest died with its journal open: replay it, then a forced check is clean
    fix = subprocess.run([e2fsck, "-fy", str(img)], capture_output=True, text=True)
    assert fix.returncode in (0, 1), fix.stdout + fix.stderr
    check = subprocess.run([e2fsck, "-fn", str(img)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.kvm_linux
@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="/dev/kvm is absent")
def test_real_linux_mounts_ext4_from_a_partition(tmp_path: Path) -> None:
    """Linux 6.1 reads an MBR partition table from a file LUN and mounts ext4 from
    partition 1 read-write as root (`root=/dev/sda1`): the partition's superblock
    mount count goes 0 -> 1 in the file and e2fsck finds it consistent."""
    from conftest import require_tool

    mkfs = require_tool("mkfs.ext4", "e2fsprogs")
    e2fsck = require_tool("e2fsck", "e2fsprogs")
    dumpe2fs = require_tool("dumpe2fs", "e2fsprogs")
    img, part = tmp_path / "disk.img", tmp_path / "part1.img"
    start, sectors = 2048, (64 << 20) // 512
    # MBR: one Linux (0x83) partition from sector 2048 to the end (CHS unused: 0xFFFFFE)
    entry = struct.pack(
        "<B3sB3sII", 0, b"\xfe\xff\xff", 0x83, b"\xfe\xff\xff", start, sectors - start
    )
    img.write_bytes(bytes(446) + entry + bytes(48) + b"\x55\xaa")
    os.truncate(img, sectors * 512)
    size_k = f"{(sectors - start) // 2}k"
    subprocess.run([mkfs, "-q", "-F", "-E", f"offset={start * 512}", str(img), size_k], check=True)

    def partition() -> Path:
        """Partition 1's bytes as a file of their own, for the e2fsprogs tools."""
        with open(img, "rb") as f:
            f.seek(start * 512)
            part.write_bytes(f.read())
        return part

    def mount_count() -> int:
        out = subprocess.run([dumpe2fs, "-h", str(partition())], capture_output=True, text=True)
        (line,) = [x for x in out.stdout.splitlines() if x.startswith("Mount count:")]
        return int(line.split(":")[1])

    assert mount_count() == 0
    config = f'[[device]]\ntype = "storvsc"\n[[device.lun]]\nbackend = "file"\npath = "{img}"\n'
    kvm, out, served = _boot_real_linux(
        tmp_path, config, "Kernel panic", append="root=/dev/sda1 rw rootfstype=ext4"
    )
    assert kvm.returncode == 0, kvm.stdout + kvm.stderr + out[-3000:]
    assert " sda: sda1\n" in out, out[-3000:]  # the guest read the partition table
    assert "EXT4-fs (sda1): mounted filesystem with ordered data mode" in out, out[-3000:]
    assert "VFS: Mounted root (ext4 filesystem) on device 8:1." in out
    assert "channel reset" not in served and "refused" not in served, served[-3000:]
    assert mount_count() == 1  # the guest's superblock write is in the partition
    fix = subprocess.run([e2fsck, "-fy", str(partition())], capture_output=True, text=True)
    assert fix.returncode in (0, 1), fix.stdout + fix.stderr  # journal replay
    check = subprocess.run([e2fsck, "-fn", str(part)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


# --- a seeded hostile guest ---------------------------------------------------------------

_OPS = (0x00, 0x03, 0x12, 0x1A, 0x25, 0x28, 0x2A, 0x35, 0x88, 0x8A, 0x9E, 0xA0, 0x42, 0x41, 0xFF)


_VALID = (
    (bytes(6), DataIn.NONE, 0),  # TEST UNIT READY
    (bytes([0x12, 0, 0, 0, 36, 0]), DataIn.READ, 36),  # INQUIRY
    (_rw(READ_16, 5, 1), DataIn.READ, 512),
    (_rw(WRITE_16, 9, 2), DataIn.WRITE, 1024),
    (bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]), DataIn.READ, 256),  # REPORT LUNS
)


def _hostile_packet(rng: random.Random, tid: int, ram_pfns: list[int]) -> OutPacket:
    """A valid SRB with one field mutated (or none, a quarter of the time): edge
    values, wrong lengths and directions, addresses outside RAM, garbage."""
    cdb, data_in, dtl = rng.choice(_VALID)
    fields: dict[str, Any] = {
        "lun": rng.choice([0, 0, 3]),
        "cdb": cdb,
        "data_in": data_in,
        "data_transfer_length": dtl,
    }
    count, offset, outside, garbage = dtl, 0, False, False
    what = rng.randrange(12) if rng.random() < 0.75 else -1
    if what == 0:
        fields["cdb"] = bytes([rng.choice(_OPS)]) + rng.randbytes(15)
    elif what == 1:
        fields["cdb_length"] = rng.choice([0, 17, 255, 1, 5])
    elif what == 2:
        fields["data_in"] = rng.choice([0, 1, 2, 3, 255])
    elif what == 3:
        fields["data_transfer_length"] = rng.choice([0, 1, dtl + 512, 0x40001, 0xFFFFFFFF])
    elif what == 4:
        count = rng.choice([dtl + 512, max(1, dtl - 1), 0x40000])
    elif what == 5:
        offset = rng.choice([512, 4095])
    elif what == 6:
        outside = True
    elif what == 7:
        fields["sense_info_length"] = rng.choice([0, 1, 255])
    elif what == 8:
        fields.update(path_id=rng.choice([1, 7, 255]), target_id=rng.choice([0, 1, 255]))
    elif what == 9:
        fields["lun"] = rng.choice([1, 7, 254, 255])
    elif what == 10:
        garbage = True
    elif what == 11:
        fields["cdb"] = cdb[:1] + rng.randbytes(len(cdb) - 1)
    payload = srb_request(encode_srb(**fields))
    if garbage:
        payload = payload[:12] + rng.randbytes(52)
    if count == 0:
        return inband(payload, trans_id=tid, completion_requested=True)
    npfns = (offset + count + PAGE_SIZE - 1) // PAGE_SIZE
    pfns = [rng.choice(ram_pfns) for _ in range(npfns)]
    if outside:
        pfns[-1] = rng.choice([1 << 40, 0xFFFFFFFFFFFFF, 1 << 20])
    return gpa_direct([GpaRange(count, offset, tuple(pfns))], payload, trans_id=tid)


@pytest.mark.devices.with_args(ThreeLuns)
async def test_hostile_srbs_get_answers(local_vm: SimulatedVm, caplog: Any) -> None:
    """400 mutated SRBs: each is answered with its own trans id (or, for a packet the
    protocol cannot answer, the channel is reset and re-offered); never a device
    bug, never a hang; the disk still reads and writes afterwards."""
    rng = random.Random(0x5C51)
    ram_pfns = local_vm.ram.alloc_pages(64)
    answered = resets = 0
    kinds: dict[int, int] = {}
    gch = await local_vm.open_channel(_offer(local_vm), 8 * PAGE_SIZE)
    await _manual_init(gch.channel)
    with caplog.at_level(logging.INFO):
        for i in range(400):
            tid = 1000 + i
            await gch.channel.send([_hostile_packet(rng, tid, ram_pfns)])
            got = None
            with trio.move_on_after(3):
                got = list(await gch.channel.receive())
            if got:
                assert [p.trans_id for p in got] == [tid]
                assert len(got[0].payload) == PACKET_SIZE
                op, reply = decode_srb_reply(bytes(got[0].payload))
                assert op == VstorOp.COMPLETE_IO and reply.srb_status not in (0x00, 0x03)
                assert reply.sense_info_length <= SENSE_BUFFER_SIZE
                kinds[reply.srb_status] = kinds.get(reply.srb_status, 0) + 1
                answered += 1
                continue
            relid = gch.offer.relid
            assert local_vm.offers[relid].rescinded, f"packet {i}: no answer and no reset"
            resets += 1
            await local_vm.release_offer(relid)
            with trio.fail_after(5):
                while not [
                    o for o in local_vm.find_offers(SCSI_IF_TYPE) if o.sub_channel_index == 0
                ]:
                    await local_vm.offer_events.receive()
            gch = await local_vm.open_channel(_offer(local_vm), 8 * PAGE_SIZE)
            await _manual_init(gch.channel)
    print(f"hostile: {answered} answered, {resets} resets, srb statuses {kinds}")
    assert answered > 300
    assert kinds.get(SrbStatus.SUCCESS, 0) > 20  # some commands really ran
    bugs = [r.getMessage() for r in caplog.records if "device bug" in r.getMessage()]
    assert bugs == []
    # the controller is fine: a clean driver can use it
    await local_vm.close_channel(gch)
    async with attach_storvsc(local_vm, _offer(local_vm)) as hba:
        await hba.write(0, 10, b"\x42" * 512)
        assert await hba.read(0, 10, 1) == b"\x42" * 512
    local_vm.ram.free_pages(ram_pfns)


def test_config_check_leaks_no_descriptor(tmp_path: Path) -> None:
    """`vmbusd serve` builds the devices once to check the config and drops them:
    the file backend's descriptor goes with them."""
    import gc

    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    cfg = {"device": [{"type": "storvsc", "lun": [{"backend": "file", "path": str(img)}]}]}
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        devices_from_config(cfg)
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) <= before


async def test_nbd_lun(tmp_path: Path, nursery: trio.Nursery, caplog: Any) -> None:
    """An NBD LUN (nbdkit's RAM disk, `uri = "nbd+unix:///?socket=..."`) opens on the
    first channel open and carries I/O; a LUN whose server is not there stays absent
    with one log line while the other LUNs work."""
    from conftest import attached_vm
    from nbd_servers import nbdkit_memory, short_socket_path

    from vmbus.server import serve_listener

    up = short_socket_path(tmp_path, "up.sock")
    down = short_socket_path(tmp_path, "down.sock")
    luns = [
        {"backend": "nbd", "uri": f"nbd+unix:///?socket={up}"},
        {"lun": 1, "backend": "nbd", "uri": f"nbd+unix:///?socket={down}", "give_up_after": 1},
        {"lun": 2, "size": "1M"},
    ]
    cfg = {"device": [{"type": "storvsc", "lun": luns}]}
    sock = str(tmp_path / "s.sock")
    with nbdkit_memory(up, "8M"):
        await nursery.start(
            lambda **kw: serve_listener(sock, lambda: devices_from_config(cfg), **kw)
        )
        with caplog.at_level(logging.WARNING):
            async with attached_vm(sock) as vm, attach_storvsc(vm, _offer(vm)) as hba:
                assert sorted(hba.disks) == [0, 2]
                assert hba.disks[0].size == 8 << 20
                data = random.Random(3).randbytes(64 * 512)
                await hba.write(0, 100, data)
                await hba.flush(0)
                assert await hba.read(0, 100, 64) == data
        lines = [r.getMessage() for r in caplog.records if "did not open" in r.getMessage()]
        assert len(lines) == 1 and "LUN 1" in lines[0]
    nursery.cancel_scope.cancel()
