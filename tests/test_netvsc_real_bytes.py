"""The NVSP messages the real Linux 6.1 hv_netvsc sent (tests/data/real_linux_6.1_netvsc_init.json,
captured on the KVM tier with tests/kvm_record.py), replayed into NvspServer.

Why: pins the real driver's order (INIT, NDIS_CONFIG then NDIS_VERSION without
completions, the receive and send buffers, RNDIS control messages as GPA-direct
packets, SUBCHANNEL), its trans ids and sizes, and that the answers vmbusd gave it
(which it accepted: eth0 came up) stay byte-identical.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import trio
from kvm_record import RecordingNetvsc

from devices.netvsc import rndis as rn
from devices.netvsc.protocol import (
    AllocateSubchannels,
    Initialized,
    MapReceiveBuffer,
    MapSendBuffer,
    NdisConfig,
    NdisVersion,
    NvspServer,
    RndisPacket,
)
from devices.netvsc.vsc import NetvscGuest
from vmbus.guest.vm import SimulatedVm
from vmbus.packet import PacketType

DATA = Path(__file__).parent / "data" / "real_linux_6.1_netvsc_init.json"
RECV_BUF = 16 << 20  # Linux 6.1: min(NETVSC_DEFAULT_RX * 1728, NETVSC_RECEIVE_BUFFER_SIZE)
SEND_BUF = 192 * 6144  # NETVSC_DEFAULT_TX * NETVSC_SEND_SECTION_SIZE
VMBUS_RQST_INIT = 0xFFFFFFFFFFFFFFFD


def _packets() -> list[dict[str, Any]]:
    packets: list[dict[str, Any]] = json.loads(DATA.read_text())["packets"]
    return packets


def _msg(p: dict[str, Any]) -> int:
    msg_type: int = struct.unpack_from("<I", bytes.fromhex(p["payload"]))[0]
    return msg_type


def test_order_and_shape_as_the_real_driver_sent_them() -> None:
    ins = [p for p in _packets() if p["dir"] == "in"]
    assert [_msg(p) for p in ins[:5]] == [1, 125, 100, 101, 104]  # INIT .. SEND_SEND_BUF
    # NDIS_CONFIG and NDIS_VERSION ask for no completion, with id VMBUS_RQST_INIT
    assert [(p["flags"], p["trans_id"]) for p in ins[1:3]] == [(0, VMBUS_RQST_INIT)] * 2
    for p in ins:
        assert len(bytes.fromhex(p["payload"])) == 40  # sizeof(struct nvsp_message)
        if p["type"] == PacketType.GPA_DIRECT:  # an RNDIS control message
            ext = bytes.fromhex(p["ext"])
            reserved, count, length, offset = struct.unpack_from("<IIII", ext)
            npfn = (offset + length + 4095) // 4096
            assert (reserved, count, len(ext)) == (0, 1, 16 + 8 * npfn)
            assert p["offset8"] == (16 + len(ext)) // 8 and offset < 4096
            channel_type, section, size = struct.unpack_from("<III", bytes.fromhex(p["payload"]), 4)
            assert (channel_type, section, size) == (1, 0xFFFFFFFF, 0)
        else:
            assert (p["type"], p["offset8"], p["ext"]) == (PacketType.INBAND, 2, "")
    assert any(_msg(p) == 133 for p in ins)  # SUBCHANNEL (2 vCPUs, 2 queues)


def test_replayed_into_nvsp_server_gives_the_accepted_answers() -> None:
    pkts = _packets()
    srv = NvspServer(max_subchannels=1)
    answers = {
        p["trans_id"]: p for p in pkts if p["dir"] == "out" and p["type"] == PacketType.COMPLETION
    }
    seen = 0
    # Each trans id may be reused after its completion: walk in order.
    pending: dict[int, bytes] = {}
    for p in pkts:
        if p["dir"] == "out":
            if p["type"] == PacketType.COMPLETION and p["trans_id"] in pending:
                assert pending.pop(p["trans_id"]).hex() == p["payload"], _msg(p)
                seen += 1
            continue
        ev = srv.receive(bytes.fromhex(p["payload"]))
        if isinstance(ev, Initialized):
            reply = ev.reply
        elif isinstance(ev, MapReceiveBuffer):
            reply = srv.receive_buffer_mapped(RECV_BUF)
        elif isinstance(ev, MapSendBuffer):
            reply = srv.send_buffer_mapped(SEND_BUF)
        elif isinstance(ev, RndisPacket):
            reply = srv.rndis_complete()
        elif isinstance(ev, AllocateSubchannels):
            assert (ev.requested, ev.granted) == (1, 1)
            reply = srv.subchannels_allocated(ev.granted)
        else:
            assert isinstance(ev, NdisConfig | NdisVersion)
            assert p["flags"] == 0  # no completion asked, none sent
            continue
        assert p["flags"] == 1
        pending[p["trans_id"]] = reply
    assert not pending and seen == sum(1 for p in pkts if p["dir"] == "in" and p["flags"] == 1)
    assert answers  # the capture holds completions at all
    assert srv.version == 0x60001 and srv.ndis_version == (6, 30)
    assert srv.mtu == 1514 and srv.subchannels == 1  # NDIS_CONFIG: ETH_DATA_LEN + ETH_HLEN


class _Recorded(RecordingNetvsc):
    """A loopback NIC recording what the simulated VSC sends; the last one built."""

    last: _Recorded | None = None

    def __init__(self) -> None:
        super().__init__()
        _Recorded.last = self


def _key(p: dict[str, Any]) -> tuple[Any, ...]:
    """What must match, modulo the GPADL handle (bytes 4..8 of SEND_RECV/SEND_BUF)."""
    payload = bytearray(bytes.fromhex(p["payload"]))
    if _msg(p) in (101, 104):
        payload[4:8] = bytes(4)
    return (p["type"], p["flags"], p["trans_id"], p["offset8"], p["len8"], payload.hex())


@pytest.mark.devices.with_args(_Recorded)
async def test_simulated_vsc_connect_sends_the_real_nvsp_bytes(
    local_vm: SimulatedVm, open_channel: Any
) -> None:
    """devices/netvsc/vsc.py's connect() on the wire: INIT, NDIS_CONFIG, NDIS_VERSION,
    SEND_RECV_BUF, SEND_SEND_BUF with the real driver's types, flags, trans ids,
    sizes and bytes (the GPADL handles aside)."""
    gch = await open_channel(local_vm, _Recorded)
    nic = NetvscGuest(local_vm, gch)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(nic.receive_loop)
        with trio.fail_after(10):
            await nic.connect()
        nursery.cancel_scope.cancel()
    dev = _Recorded.last
    assert dev is not None
    ours = [r for r in dev.records if r["dir"] == "in"]
    real = [p for p in _packets() if p["dir"] == "in"][:5]
    assert [_key(r) for r in ours[:5]] == [_key(p) for p in real]


# ----------------------------------------------------------- the RNDIS bytes


def _rndis_requests(records: list[dict[str, Any]]) -> list[bytes]:
    """The RNDIS control messages (not data packets) the guest sent, in order."""
    out = []
    for r in records:
        if r["dir"] == "in" and isinstance(r.get("rndis"), str):
            msg = bytes.fromhex(r["rndis"])
            if struct.unpack_from("<I", msg)[0] != rn.MsgType.PACKET:
                out.append(msg)
    return out


def _rndis_replies(records: list[dict[str, Any]]) -> list[bytes]:
    """What vmbusd put in the receive buffer for those: each transfer-page range's
    bytes that are not a data packet."""
    out = []
    for r in records:
        if r["dir"] == "out" and isinstance(r.get("rndis"), list):
            for part in r["rndis"]:
                msg = bytes.fromhex(part)
                if struct.unpack_from("<I", msg)[0] != rn.MsgType.PACKET:
                    out.append(msg)
    return out


def _nic_config() -> rn.NicConfig:
    return rn.NicConfig(mac=bytes.fromhex("00155d009902"), mtu=1500, max_queues=2)


class _RecordedAsCaptured(RecordingNetvsc):
    """The capture's NIC (its MAC, MTU 1500, 2 queues), recording; the last one built."""

    last: _RecordedAsCaptured | None = None

    def __init__(self) -> None:
        super().__init__(mac="00:15:5d:00:99:02", mtu=1500, queues=2)
        _RecordedAsCaptured.last = self


def test_real_rndis_control_sequence() -> None:
    """What Linux 6.1's rndis_filter_device_add and rndis_filter_open sent: INITIALIZE
    (RNDIS 1.0, 16 KiB max transfer), the queries, offload parameters, link state and
    speed, RSS capabilities, (NVSP SUBCHANNEL between), RSS parameters twice (disable,
    then enable) and the packet filter last; request ids 1, 2, 3, ..."""
    reqs = _rndis_requests(_packets())
    shape = []
    for i, msg in enumerate(reqs, start=1):
        msg_type, length, req_id = struct.unpack_from("<III", msg)
        assert (length, req_id) == (len(msg), i)
        oid = struct.unpack_from("<I", msg, 12)[0] if msg_type != rn.MsgType.INITIALIZE else None
        shape.append((msg_type, oid))
    Q, S = rn.MsgType.QUERY, rn.MsgType.SET
    assert shape == [
        (rn.MsgType.INITIALIZE, None),
        (Q, rn.Oid.GEN_MAXIMUM_FRAME_SIZE),
        (Q, rn.Oid.E802_3_PERMANENT_ADDRESS),
        (Q, rn.Oid.GEN_FRIENDLY_NAME),
        (Q, rn.Oid.TCP_OFFLOAD_HARDWARE_CAPABILITIES),
        (S, rn.Oid.TCP_OFFLOAD_PARAMETERS),
        (Q, rn.Oid.GEN_MEDIA_CONNECT_STATUS),
        (Q, rn.Oid.GEN_LINK_SPEED),
        (Q, rn.Oid.GEN_RECEIVE_SCALE_CAPABILITIES),
        (S, rn.Oid.GEN_RECEIVE_SCALE_PARAMETERS),
        (S, rn.Oid.GEN_RECEIVE_SCALE_PARAMETERS),
        (S, rn.Oid.GEN_CURRENT_PACKET_FILTER),
    ]
    assert reqs[0][12:24] == struct.pack("<III", 1, 0, 0x4000)
    assert reqs[-1][28:] == struct.pack("<I", 0x0D)  # directed, multicast, broadcast


def test_real_rndis_requests_replayed_give_the_accepted_answers() -> None:
    """Each RNDIS request the real driver sent, replayed into RndisDevice, gives
    byte for byte the reply it got then (and accepted: eth0 came up)."""
    records = _packets()
    reqs, replies = _rndis_requests(records), _rndis_replies(records)
    assert len(reqs) == len(replies) == 12
    dev = rn.RndisDevice(_nic_config())
    for req, reply in zip(reqs, replies, strict=True):
        msg_type, _, _, oid = struct.unpack_from("<IIII", req)
        if msg_type == rn.MsgType.SET and oid == rn.Oid.GEN_RECEIVE_SCALE_PARAMETERS:
            dev.queues = 2  # the VSP's doing once SUBCHANNEL granted one
        result = dev.control(req)
        assert result.reply == reply, (hex(msg_type), hex(oid))
    assert dev.packet_filter == 0x0D and dev.rss is not None


@pytest.mark.devices.with_args(_RecordedAsCaptured)
async def test_simulated_vsc_sends_the_real_rndis_requests(
    local_vm: SimulatedVm, open_channel: Any
) -> None:
    """devices/netvsc/vsc.py's connect() + device_add(2 queues): the same RNDIS
    control messages, byte for byte, in the same order as the real driver (the
    data packet at the end of the capture aside)."""
    gch = await open_channel(local_vm, _RecordedAsCaptured)
    nic = NetvscGuest(local_vm, gch)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(nic.receive_loop)
        with trio.fail_after(10):
            await nic.connect()
            assert await nic.device_add(2, nursery) == 2
        nursery.cancel_scope.cancel()
    dev = _RecordedAsCaptured.last
    assert dev is not None
    ours = [m.hex() for m in _rndis_requests(dev.records)]
    real = [m.hex() for m in _rndis_requests(_packets())]
    assert ours == real
    assert [m.hex() for m in _rndis_replies(dev.records)] == [
        m.hex() for m in _rndis_replies(_packets())
    ]
