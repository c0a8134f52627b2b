"""The bytes the real Linux 6.1 hv_storvsc sent (tests/data/real_linux_6.1_storvsc_init.json,
captured on the KVM tier with tests/kvm_record.py), replayed into the VSTOR core.

Why: the protocol was written from the spec and our simulated VSC; these tests pin
what the real driver sends (init order, trans ids, sizes, SRB fields, range-list
shape) and that the answers vmbusd gave it (which it accepted: it scanned and
attached the disk) stay byte-identical. And the simulated VSC must send what the
real driver sends.
"""

from __future__ import annotations

import json
import struct
import tomllib
import uuid
from pathlib import Path
from typing import Any

import pytest
from kvm_record import RecordingStorvsc

from devices.storvsc.protocol import (
    LINUX_VERSIONS,
    SCSI_IF_TYPE,
    VMBUS_RQST_INIT,
    CreateSubChannels,
    DataIn,
    ExecuteSrb,
    Reply,
    SrbStatus,
    VstorOp,
    init_request,
    sub_channels_request,
    version_request,
)
from devices.storvsc.vsc import (
    attach_storvsc,
)
from devices.storvsc.vsp import StorvscDevice
from vmbus.guest.vm import SimulatedVm
from vmbus.packet import PacketType

DATA = Path(__file__).parent / "data" / "real_linux_6.1_storvsc_init.json"
PAGE = 4096


def _capture() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DATA.read_text())
    return data


def _packets(direction: str | None = None) -> list[dict[str, Any]]:
    return [p for p in _capture()["packets"] if direction in (None, p["dir"])]


def _device() -> StorvscDevice:
    """The controller the capture ran against (same instance, LUNs, serial)."""
    (dev_cfg,) = tomllib.loads(_capture()["config"])["device"]
    return StorvscDevice(uuid.UUID(dev_cfg["instance"]), lun=dev_cfg["lun"])


def _ranges(ext: bytes) -> list[tuple[int, int, list[int]]]:
    """A GPA-direct extension: reserved u32, count u32, then (len, offset, pfns)."""
    reserved, count = struct.unpack_from("<II", ext, 0)
    assert reserved == 0
    out, pos = [], 8
    for _ in range(count):
        length, offset = struct.unpack_from("<II", ext, pos)
        n = (offset + length + PAGE - 1) // PAGE
        pfns = list(struct.unpack_from(f"<{n}Q", ext, pos + 8))
        out.append((length, offset, pfns))
        pos += 8 + 8 * n
    assert pos == len(ext)  # nothing after the ranges
    return out


def test_init_sequence_as_the_real_driver_sent_it() -> None:
    """BEGIN, QUERY_PROTOCOL_VERSION 6.2 (accepted first), QUERY_PROPERTIES, END,
    CREATE_SUB_CHANNELS(1) (2 vCPUs): inband 64-byte packets asking for a completion,
    trans id VMBUS_RQST_INIT, each answered before the next; the answers are the
    bytes the driver accepted."""
    pkts = [p for p in _packets() if p["trans_id"] == VMBUS_RQST_INIT]
    ins = [p for p in pkts if p["dir"] == "in"]
    outs = [p for p in pkts if p["dir"] == "out"]
    assert [p["dir"] for p in pkts] == ["in", "out"] * 5  # strictly one at a time
    assert all(p["sub"] == 0 for p in pkts)
    ops = [bytes.fromhex(p["payload"])[0] for p in ins]
    assert ops == [
        VstorOp.BEGIN_INITIALIZATION,
        VstorOp.QUERY_PROTOCOL_VERSION,
        VstorOp.QUERY_PROPERTIES,
        VstorOp.END_INITIALIZATION,
        VstorOp.CREATE_SUB_CHANNELS,
    ]
    for p in ins:
        assert (p["type"], p["flags"], p["offset8"], p["len8"]) == (PacketType.INBAND, 1, 2, 10)
        assert len(bytes.fromhex(p["payload"])) == 64 and p["ext"] == ""

    dev = _device()
    proto = dev.proto
    for i, o in zip(ins, outs, strict=True):
        ev = proto.receive(bytes.fromhex(i["payload"]))
        if isinstance(ev, CreateSubChannels):
            assert ev.count == 1
            answer = proto.subchannels_created()
        else:
            assert isinstance(ev, Reply)
            answer = ev.payload
        assert answer.hex() == o["payload"]
        assert (o["type"], o["flags"], o["ext"]) == (PacketType.COMPLETION, 0, "")
    assert proto.ready and proto.version == 0x602 and proto.multi_channel


def test_the_simulated_vsc_sends_the_real_init_bytes() -> None:
    """The builders devices/storvsc/vsc.py's init_sequence uses make exactly the
    payloads the real driver sent, in the same order and with the same id."""
    ins = [p for p in _packets("in") if p["trans_id"] == VMBUS_RQST_INIT]
    ours = [
        init_request(VstorOp.BEGIN_INITIALIZATION),
        version_request(LINUX_VERSIONS[0]),
        init_request(VstorOp.QUERY_PROPERTIES),
        init_request(VstorOp.END_INITIALIZATION),
        sub_channels_request(1),
    ]
    assert [b.hex() for b in ours] == [p["payload"] for p in ins]


@pytest.mark.parametrize("sub", [0, 1])
async def test_scan_srbs_replayed(sub: int) -> None:
    """Every EXECUTE_SRB of the scan (both channels): its range list has Linux's
    shape (one range, offset < page, exactly the pages it spans, length ==
    data_transfer_length), data-less ones are inband; replayed into the protocol
    and the SCSI controller, each answer is the bytes the driver accepted."""
    pkts = _packets()
    dev = _device()
    proto = dev.proto
    for p in pkts:
        if p["trans_id"] == VMBUS_RQST_INIT and p["dir"] == "in":
            ev = proto.receive(bytes.fromhex(p["payload"]))
    assert isinstance(ev, CreateSubChannels)
    proto.subchannels_created()
    answers = {p["trans_id"]: p for p in pkts if p["dir"] == "out" and p["sub"] == sub}
    srbs = [p for p in pkts if p["dir"] == "in" and p["sub"] == sub and p["trans_id"] in answers]
    srbs = [p for p in srbs if p["trans_id"] != VMBUS_RQST_INIT]
    assert len(srbs) >= 2
    for p in srbs:
        payload = bytes.fromhex(p["payload"])
        assert payload[0] == VstorOp.EXECUTE_SRB and len(payload) == 64
        data_bytes = 0
        if p["type"] == PacketType.GPA_DIRECT:
            ext = bytes.fromhex(p["ext"])
            assert p["offset8"] == (16 + len(ext)) // 8
            ((length, offset, _pfns),) = _ranges(ext)
            assert 0 < length and offset < PAGE
            data_bytes = length
        else:
            assert (p["type"], p["ext"], p["offset8"]) == (PacketType.INBAND, "", 2)
        assert p["len8"] == p["offset8"] + 8  # the 64-byte vstor packet follows
        ev = proto.receive(payload, primary=sub == 0, data_bytes=data_bytes)
        assert isinstance(ev, ExecuteSrb)
        srb = ev.srb
        assert srb.data_transfer_length == data_bytes and srb.sense_info_length == 0x14
        # As vsp._execute: other paths/targets are an empty controller that
        # answers INQUIRY/REPORT LUNS; anything else to an absent LUN is INVALID_LUN.
        here = srb.path_id == 0 and srb.target_id == 0
        if not (here and srb.lun in dev.controller) and srb.cdb[0] not in (0x12, 0xA0):
            answer = proto.srb_failure(srb, SrbStatus.INVALID_LUN)
        else:
            ctl = dev.controller if here else dev._absent
            buf = memoryview(bytearray(data_bytes))
            res = await ctl.execute(srb.lun, srb.cdb, [buf], srb.data_in == DataIn.READ)
            answer = proto.complete_srb(srb, res.status, res.sense, res.transferred)
        assert answer.hex() == answers[p["trans_id"]]["payload"], srb


class CapturedController(RecordingStorvsc):
    """The capture's controller (instance, LUNs), recording what the simulated VSC sends."""

    def __init__(self) -> None:
        (dev_cfg,) = tomllib.loads(_capture()["config"])["device"]
        super().__init__(uuid.UUID(dev_cfg["instance"]), lun=dev_cfg["lun"])


@pytest.mark.devices.with_args(CapturedController)
async def test_simulated_vsc_on_the_wire_matches_the_real_driver(
    local_vm: SimulatedVm, local_service: Any
) -> None:
    """What devices/storvsc/vsc.py actually puts on the ring against the same
    controller: the init packets (type, flags, trans id, sizes, bytes) and the
    scan's first SRB (INQUIRY 36 to LUN 0, untagged: flags 0x48, no queue tag,
    as the real driver before it knows the LUN queues) are the real driver's bytes;
    the range list has the same shape (one range, the pages it spans)."""
    (offer,) = [o for o in local_vm.find_offers(SCSI_IF_TYPE) if o.sub_channel_index == 0]
    async with attach_storvsc(local_vm, offer) as hba:
        assert 0 in hba.disks
    (dev,) = [d for d in local_service.session().devices if isinstance(d, CapturedController)]
    ours = [r for r in dev.records if r["dir"] == "in"]
    real = _packets("in")
    n_init = 4 + (local_vm.vcpus > 1)
    key = ("type", "flags", "trans_id", "offset8", "len8", "ext", "payload")
    assert [tuple(r[k] for k in key) for r in ours[:n_init]] == [
        tuple(r[k] for k in key) for r in real[:n_init]
    ]
    srb_ours = next(r for r in ours if r["trans_id"] != VMBUS_RQST_INIT)
    srb_real = next(r for r in real if r["trans_id"] != VMBUS_RQST_INIT)
    assert srb_ours["payload"] == srb_real["payload"]
    assert (srb_ours["type"], srb_ours["flags"]) == (srb_real["type"], srb_real["flags"])
    ((length, _, pfns),) = _ranges(bytes.fromhex(srb_ours["ext"]))
    ((rlength, _, rpfns),) = _ranges(bytes.fromhex(srb_real["ext"]))
    assert (length, len(pfns)) == (rlength, len(rpfns))
    # Once LUN 0 is attached its SRBs are tagged, as the real driver's READ CAPACITY(16).
    (tagged, *_) = [
        r
        for r in ours
        if bytes.fromhex(r["payload"])[16:20] == bytes(4)
        and bytes.fromhex(r["payload"])[28] == 0x9E
    ]
    assert bytes.fromhex(tagged["payload"])[50:56] == bytes.fromhex("ff204a010000")
