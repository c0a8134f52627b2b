"""The netvsc VSP end to end with the simulated VM: the guest driver (vsc.py) does
Linux 6.1's init over real VMBus rings, the host maps the buffers through the
GPADL seam, answers RNDIS control through receive sections, and the loopback
backend sends every frame back into the guest's receive buffer."""

from __future__ import annotations

import struct

import pytest
import trio

from devices.netvsc import protocol as nv
from devices.netvsc import rndis as rn
from devices.netvsc.backends.base import Frame
from devices.netvsc.backends.loopback import LoopbackBackend
from devices.netvsc.vsc import NetvscGuest, NetvscVsc
from devices.netvsc.vsp import NetvscDevice
from vmbus.guest.vm import SimulatedVm
from vmbus.packet import PacketType
from vmbus.ring import Packet

pytestmark = pytest.mark.devices.with_args(NetvscDevice)


async def _nic(vm: SimulatedVm, open_channel: object) -> NetvscGuest:
    gch = await open_channel(vm, NetvscDevice)  # type: ignore[operator]
    return NetvscGuest(vm, gch)


async def test_linux_init_then_frames_come_back(
    local_vm: SimulatedVm, open_channel: object
) -> None:
    nic = await _nic(local_vm, open_channel)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(nic.receive_loop)
        with trio.fail_after(10):
            await nic.connect()
            assert nic.version == nv.NVSP_PROTOCOL_VERSION_61
            assert nic.recv_section == nv.receive_section_size(1514)
            await nic.device_add()
            assert nic.mac == bytes.fromhex("00155d000001") and nic.mtu == 1500
            # to the NIC's MAC (the packet filter passes them): 60 .. 1514 bytes
            sent = [nic.mac + bytes([i]) * (54 + 97 * i) for i in range(16)]
            sent[-1] = sent[-1][:1514]
            for frame in sent:
                await nic.send_frame(frame)
            got = [(await nic.frames.receive()).frame for _ in sent]
        assert got == sent and nic.received_bad == 0
        nursery.cancel_scope.cancel()


async def test_unknown_oid_and_bad_info_buffer_are_answered(
    local_vm: SimulatedVm, open_channel: object
) -> None:
    nic = await _nic(local_vm, open_channel)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(nic.receive_loop)
        with trio.fail_after(10):
            await nic.connect()
            await nic.device_add()
            reply = await nic.rndis_request(
                rn.MsgType.QUERY, struct.pack("<IIII", 0xFD010100, 0, 20, 0)
            )
            assert struct.unpack_from("<I", reply, 12) == (rn.Status.NOT_SUPPORTED,)
            # info buffer pointing past the message: the CVE-2021-28476 class
            reply = await nic.rndis_request(
                rn.MsgType.SET, struct.pack("<IIII", rn.Oid.GEN_CURRENT_PACKET_FILTER, 4, 2000, 0)
            )
            assert struct.unpack_from("<I", reply, 12) == (rn.Status.INVALID_LENGTH,)
            # the NIC still works
            await nic.send_frame(b"\xff" * 64)
            assert (await nic.frames.receive()).frame == b"\xff" * 64
        nursery.cancel_scope.cancel()


async def test_vsc_probe(local_vm: SimulatedVm) -> None:
    (offer,) = local_vm.find_offers(NetvscDevice.if_type)
    with trio.fail_after(20):
        summary = await NetvscVsc(frames=50).probe(local_vm, offer)
    assert summary["frames"] == 50 and summary["mac"] == "00155d000001"


async def test_revoke_then_gpadl_teardown_is_prompt(
    local_vm: SimulatedVm, open_channel: object
) -> None:
    """Linux on pre-Win10 hosts tears the buffer GPADLs down before closing the
    channel: the VSP must let go at once (holding on past the grace resets it)."""
    nic = await _nic(local_vm, open_channel)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(nic.receive_loop)
        with trio.fail_after(10):
            await nic.connect()
            await nic.device_add()
            await nic.teardown()
        relid = nic.gch.offer.relid
        with trio.fail_after(2):  # well inside GPADL_RELEASE_GRACE_S
            await local_vm.teardown_buffer_gpadl(relid, *nic._recv)
            await local_vm.teardown_buffer_gpadl(relid, *nic._send)
        nursery.cancel_scope.cancel()


async def test_gpadl_torn_down_while_in_use(local_vm: SimulatedVm, open_channel: object) -> None:
    """A guest tearing the send buffer's GPADL down without revoking it: the host
    lets go, and a later send from a section is refused with FAIL, not a crash."""
    nic = await _nic(local_vm, open_channel)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(nic.receive_loop)
        with trio.fail_after(10):
            await nic.connect()
            await nic.device_add()
        relid = nic.gch.offer.relid
        with trio.fail_after(2):
            await local_vm.teardown_buffer_gpadl(relid, *nic._send)
        nvsp = struct.pack("<IIII", nv.Msg.SEND_RNDIS_PKT, 0, 0, 64).ljust(40, b"\0")
        from vmbus.packet import inband

        with trio.fail_after(5):
            done = await nic.gch.channel.request(inband(nvsp))
        assert struct.unpack_from("<II", done) == (108, nv.Status.FAIL)
        nursery.cancel_scope.cancel()


class MultiQueueNic(NetvscDevice):
    """Four queues (vRSS): three sub-channels on request."""

    def __init__(self) -> None:
        super().__init__(queues=4)


def tcp_frame(src: str, sport: int, dst: str, dport: int, payload: bytes = b"x" * 20) -> bytes:
    ip = struct.pack(
        ">BBHHHBBH4s4s",
        0x45,
        0,
        20 + 20 + len(payload),
        0,
        0x4000,
        64,
        6,
        0,
        bytes(map(int, src.split("."))),
        bytes(map(int, dst.split("."))),
    )
    tcp = struct.pack(">HHIIBBHHH", sport, dport, 0, 0, 0x50, 0x18, 65535, 0, 0)
    words = sum(int.from_bytes(ip[i : i + 2], "big") for i in range(0, 20, 2)) % 0xFFFF
    ip = ip[:10] + struct.pack(">H", 0xFFFF - words) + ip[12:]  # as Linux fills it
    eth = bytes.fromhex("00155d000001") + bytes.fromhex("00155d000002") + b"\x08\x00"
    return eth + ip + tcp + payload


@pytest.mark.devices.with_args(MultiQueueNic)
async def test_vrss_steers_frames_by_toeplitz(local_vm: SimulatedVm, open_channel: object) -> None:
    """Linux's vRSS bring-up; every frame comes back on the queue its Toeplitz hash
    picks from the guest's indirection table, with the hash in its PPI, and the
    receive completions go back on that queue's channel."""
    gch = await open_channel(local_vm, MultiQueueNic)  # type: ignore[operator]
    nic = NetvscGuest(local_vm, gch)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(nic.receive_loop)
        with trio.fail_after(10):
            await nic.connect()
            assert await nic.device_add(4, nursery) == 4
            assert nic.send_table == [i % 4 for i in range(16)]
            flows = [("10.0.0.1", 1000 + i, "10.0.0.2", 80) for i in range(32)]
            for i, flow in enumerate(flows):
                await nic.send_frame(tcp_frame(*flow), queue=i % 4)  # tx on every channel
            got = [await nic.frames.receive() for _ in flows]
        table = [i % 4 for i in range(128)]
        by_frame = {rx.frame: rx for rx in got}
        queues_seen = set()
        for flow in flows:
            frame = tcp_frame(*flow)
            data, _ = rn.rss_input(frame, 0x1701) or (b"", 0)
            h = rn.toeplitz_hash(rn.DEFAULT_RSS_KEY, data)
            rx = by_frame[frame]
            assert rx.hash_value == h and rx.queue == rn.rss_queue(h, table)
            queues_seen.add(rx.queue)
        assert len(queues_seen) > 1 and nic.received_bad == 0
        nursery.cancel_scope.cancel()


async def test_guest_that_never_returns_sections(
    local_vm: SimulatedVm, open_channel: object
) -> None:
    """Frames beyond the free sections and the queue's depth are dropped and counted;
    the guest's sends and its control path keep working."""
    from devices.netvsc.vsp import RX_QUEUE_DEPTH

    nic = await _nic(local_vm, open_channel)
    nic.withhold_data_completions = True
    async with trio.open_nursery() as nursery:
        nursery.start_soon(nic.receive_loop)
        with trio.fail_after(30):
            await nic.connect()
            await nic.device_add()
            data_sections = nic.recv_size // nic.recv_section - 16
            extra = 50
            for _ in range(data_sections + RX_QUEUE_DEPTH + extra):
                await nic.send_frame(b"\x01" * 60)
            (no_buffer,) = struct.unpack("<I", await nic.query(rn.Oid.GEN_RCV_NO_BUFFER))
            (rcv_ok,) = struct.unpack("<I", await nic.query(rn.Oid.GEN_RCV_OK))
        assert rcv_ok == data_sections
        assert no_buffer == extra
        nursery.cancel_scope.cancel()


async def test_offloads_end_to_end(local_vm: SimulatedVm, open_channel: object) -> None:
    """An LSO send comes back as MSS-sized segments, a checksum-offload send with its
    checksum filled, a VLAN PPI comes back as a PPI; the receive checksum PPI says
    what the host verified; a bad offload request is completed with FAIL."""
    nic = await _nic(local_vm, open_channel)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(nic.receive_loop)
        with trio.fail_after(10):
            await nic.connect()
            await nic.device_add()
            payload = bytes(range(256)) * 16  # 4096 bytes
            big = tcp_frame("10.1.0.1", 5000, "10.1.0.2", 80, payload)
            big = big[:16] + b"\0\0" + big[18:24] + b"\0\0" + big[26:]  # Linux zeroes both
            lso = (1 << 30) | (34 << 20) | 1448
            vlan = 3 | (42 << 4)
            await nic.send_frame(big, ppis=((rn.PpiType.TCP_LARGESEND, lso), (6, vlan)))
            segs = [await nic.frames.receive() for _ in range(3)]
            small = tcp_frame("10.1.0.1", 5001, "10.1.0.2", 80, b"partial")
            csum = 0x1 | 0x4 | (34 << 16)
            await nic.send_frame(small, ppis=((rn.PpiType.TCPIP_CHKSUM, csum),))
            filled = await nic.frames.receive()
            # LSO asked for on an ARP frame: the host refuses it with FAIL
            arp = bytes(12) + b"\x08\x06" + bytes(46)
            with pytest.raises(Exception, match="send completed with 6c00000002000000"):
                await nic.send_frame(arp, ppis=((rn.PpiType.TCP_LARGESEND, lso),))
        ok = rn.RXCSUM_IP_SUCCEEDED | rn.RXCSUM_TCP_SUCCEEDED
        assert b"".join(s.frame[54:] for s in segs) == payload
        assert [len(s.frame) for s in segs] == [54 + 1448, 54 + 1448, 54 + 1200]
        assert all(s.checksum == ok and s.vlan == vlan for s in segs)
        assert filled.checksum == ok and filled.frame[:50] == small[:50]
        assert filled.frame[50:52] != small[50:52]  # the host wrote the TCP checksum
        nursery.cancel_scope.cancel()


class LinkNic(NetvscDevice):
    """A NIC the test can reach: the last one built is `LinkNic.last`."""

    last: LinkNic | None = None

    def __init__(self) -> None:
        super().__init__()
        LinkNic.last = self


@pytest.mark.devices.with_args(LinkNic)
async def test_link_down_and_up_reach_the_guest(
    local_vm: SimulatedVm, open_channel: object
) -> None:
    gch = await open_channel(local_vm, LinkNic)  # type: ignore[operator]
    nic = NetvscGuest(local_vm, gch)
    dev = LinkNic.last
    assert dev is not None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(nic.receive_loop)
        with trio.fail_after(10):
            await nic.connect()
            await nic.device_add()
            assert dev.set_link(False)
            while not nic.indications:
                await trio.sleep(0.005)
            (status,) = struct.unpack("<I", await nic.query(rn.Oid.GEN_MEDIA_CONNECT_STATUS))
            assert status == 1  # disconnected
            assert dev.set_link(True)
            while len(nic.indications) < 2:
                await trio.sleep(0.005)
        assert nic.indications == [rn.Status.MEDIA_DISCONNECT, rn.Status.MEDIA_CONNECT]
        nursery.cancel_scope.cancel()


async def test_64k_lso_send_goes_gpa_direct(local_vm: SimulatedVm, open_channel: object) -> None:
    """A 64 KiB LSO send does not fit a send section: the guest sends it GPA direct
    and it comes back as MSS segments carrying the whole payload."""
    nic = await _nic(local_vm, open_channel)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(nic.receive_loop)
        with trio.fail_after(10):
            await nic.connect()
            await nic.device_add()
            payload = bytes(i * 7 & 0xFF for i in range(62780 - 40))  # LSO_MAX_SIZE of IP
            big = tcp_frame("10.2.0.1", 6000, "10.2.0.2", 443, payload)
            lso = (1 << 30) | (34 << 20) | 1448
            await nic.send_frame(big, ppis=((rn.PpiType.TCP_LARGESEND, lso),))
            n = (len(payload) + 1447) // 1448
            segs = [await nic.frames.receive() for _ in range(n)]
        assert b"".join(s.frame[54:] for s in segs) == payload
        assert all(len(s.frame) <= 1514 for s in segs)
        nursery.cancel_scope.cancel()


class _SinkBackend(LoopbackBackend):
    """A backend whose peer never answers (as a TAP usually is): frames go nowhere."""

    def transmit(self, queue: int, frames: list[Frame]) -> None:
        self.tx_frames += len(frames)


class SinkNic(NetvscDevice):
    def __init__(self, **kw: object) -> None:
        super().__init__(backend=_SinkBackend(), **kw)  # type: ignore[arg-type]


@pytest.mark.devices.with_args(SinkNic)
async def test_vsc_probe_against_a_backend_that_does_not_echo(local_vm: SimulatedVm) -> None:
    """`vmbusd vm` against a NIC whose backend is not a loopback: the probe reports no
    frames back instead of failing the VM (it used to wait 10 s and fail)."""
    (offer,) = local_vm.find_offers(NetvscDevice.if_type)
    with trio.fail_after(20):
        summary = await NetvscVsc(frames=50).probe(local_vm, offer)
    assert summary["frames"] == 0 and summary["mac"] == "00155d000001"


class FilterNic(NetvscDevice):
    """A NIC the test can reach (its RNDIS counters): the last one built."""

    last: FilterNic | None = None

    def __init__(self) -> None:
        super().__init__()
        FilterNic.last = self


@pytest.mark.devices.with_args(FilterNic)
async def test_packet_filter_and_multicast_list_apply_on_receive(
    local_vm: SimulatedVm, open_channel: object
) -> None:
    """With Linux's filter (directed, all-multicast, broadcast) a frame to another
    unicast MAC is dropped and counted; directed-only plus a multicast list passes
    only the listed group; promiscuous passes everything."""
    gch = await open_channel(local_vm, FilterNic)  # type: ignore[operator]
    nic = NetvscGuest(local_vm, gch)
    dev = FilterNic.last
    assert dev is not None
    other = b"\x02\x00\x00\x00\x00\x09" + b"o" * 54
    listed = b"\x01\x00\x5e\x00\x00\x01" + b"l" * 54
    unlisted = b"\x01\x00\x5e\x00\x00\x02" + b"u" * 54
    async with trio.open_nursery() as nursery:
        nursery.start_soon(nic.receive_loop)
        with trio.fail_after(10):
            await nic.connect()
            await nic.device_add()
            ours = nic.mac + b"m" * 54
            for frame in (other, ours):
                await nic.send_frame(frame)
            assert (await nic.frames.receive()).frame == ours
            assert dev._nic is not None and dev._nic.rndis.counters.rcv_filtered == 1
            filt = rn.FILTER_DIRECTED | rn.FILTER_MULTICAST
            assert await nic.set(rn.Oid.GEN_CURRENT_PACKET_FILTER, struct.pack("<I", filt)) == 0
            assert await nic.set(rn.Oid.E802_3_MULTICAST_LIST, listed[:6]) == 0
            for frame in (unlisted, b"\xff" * 60, listed):
                await nic.send_frame(frame)
            assert (await nic.frames.receive()).frame == listed
            assert dev._nic.rndis.counters.rcv_filtered == 3
            promisc = struct.pack("<I", rn.FILTER_PROMISCUOUS)
            assert await nic.set(rn.Oid.GEN_CURRENT_PACKET_FILTER, promisc) == 0
            await nic.send_frame(other)
            assert (await nic.frames.receive()).frame == other
        assert nic.received_bad == 0
        nursery.cancel_scope.cancel()


async def test_several_rndis_messages_per_transfer_page_packet(
    local_vm: SimulatedVm, open_channel: object
) -> None:
    """A batch from the backend goes to the guest as transfer-page packets of several
    ranges, one RNDIS message per range (what Linux's netvsc_receive walks)."""
    from vmbus.packet import parse_xfer_pages

    nic = await _nic(local_vm, open_channel)
    ranges_seen: list[int] = []
    on_xfer = nic._on_xfer

    def spy(pkt: Packet, queue: int) -> int:
        ranges_seen.append(len(parse_xfer_pages(pkt).ranges))
        return on_xfer(pkt, queue)

    nic._on_xfer = spy  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(nic.receive_loop)
        with trio.fail_after(10):
            await nic.connect()
            await nic.device_add()
            sent = [nic.mac + struct.pack("<I", i).ljust(54, b"b") for i in range(40)]
            for i in range(0, len(sent), 8):  # 8 PACKETs per NVSP message
                chunk = b"".join(_rndis_packet(f) for f in sent[i : i + 8])
                await _send_raw(nic, chunk)
            got = [(await nic.frames.receive()).frame for _ in sent]
        assert sorted(got) == sorted(sent)
        assert max(ranges_seen) > 1 and nic.received_bad == 0
        nursery.cancel_scope.cancel()


def _rndis_packet(frame: bytes) -> bytes:
    head = struct.pack("<II9I", 1, 44 + len(frame), 36, len(frame), 0, 0, 0, 0, 0, 0, 0)
    return head + frame


async def _send_raw(nic: NetvscGuest, rndis: bytes) -> None:
    """Several RNDIS PACKETs in one send section, one SEND_RNDIS_PKT (as Linux batches
    when the host's INIT_CMPLT allows it)."""
    from vmbus.packet import inband

    section = nic._free_sections.pop()
    try:
        nic._write(nic._send[1], section * nic.send_section, rndis)
        nvsp = struct.pack(
            "<IIII", nv.Msg.SEND_RNDIS_PKT, nv.CHANNEL_TYPE_DATA, section, len(rndis)
        )
        done = await nic.gch.channel.request(inband(nvsp.ljust(40, b"\0")))
        assert struct.unpack_from("<II", done) == (108, nv.Status.SUCCESS)
    finally:
        nic._free_sections.append(section)


class _WithholdingGuest(NetvscGuest):
    """A guest whose queue 1 takes frames but never returns their sections."""

    stuck_queue = 1

    async def receive_loop(self, queue: int = 0) -> None:
        if queue != self.stuck_queue:
            await super().receive_loop(queue)
            return
        ch = self.subchannels[queue].channel
        while True:
            for pkt in await ch.receive():
                if pkt.type == PacketType.XFER_PAGES:
                    self._on_xfer(pkt, queue)  # read, never completed


class TwoQueueNic(NetvscDevice):
    def __init__(self) -> None:
        super().__init__(queues=2)


@pytest.mark.devices.with_args(TwoQueueNic)
async def test_a_queue_that_keeps_its_sections_starves_only_itself(
    local_vm: SimulatedVm, open_channel: object
) -> None:
    """Queue 1's guest never completes: it gets its share of the receive sections,
    then RX_QUEUE_DEPTH frames wait, the rest are dropped and counted — and frames
    steered to queue 0 still come back (the sections are partitioned per queue)."""
    from devices.netvsc.vsp import CONTROL_SECTIONS, RX_QUEUE_DEPTH

    gch = await open_channel(local_vm, TwoQueueNic)  # type: ignore[operator]
    nic = _WithholdingGuest(local_vm, gch)
    table = [i % 2 for i in range(128)]

    def queue_of(frame: bytes) -> int:
        data, _ = rn.rss_input(frame, 0x1701) or (b"", 0)
        return rn.rss_queue(rn.toeplitz_hash(rn.DEFAULT_RSS_KEY, data), table)

    flows = [tcp_frame("10.3.0.1", 1000 + i, "10.3.0.2", 80) for i in range(64)]
    q0 = [f for f in flows if queue_of(f) == 0][:8]
    q1 = next(f for f in flows if queue_of(f) == 1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(nic.receive_loop)
        with trio.fail_after(60):
            await nic.connect()
            assert await nic.device_add(2, nursery) == 2
            data = nic.recv_size // nic.recv_section - CONTROL_SECTIONS
            share = data - data // 2  # queue 1: the second run
            extra = 20
            for _ in range(share + RX_QUEUE_DEPTH + extra):
                await nic.send_frame(q1)
            for f in q0:
                await nic.send_frame(f)
            got: list[bytes] = []
            while len(got) < len(q0):
                rx = await nic.frames.receive()
                if rx.queue == 0:
                    got.append(rx.frame)
            (no_buffer,) = struct.unpack("<I", await nic.query(rn.Oid.GEN_RCV_NO_BUFFER))
        assert got == q0
        assert no_buffer == extra
        nursery.cancel_scope.cancel()


async def test_bad_packets_in_a_batch_fail_alone(
    local_vm: SimulatedVm, open_channel: object
) -> None:
    """SEND_RNDIS_PKTs written to the ring in one go (one batch for the host): each
    hostile one is completed with FAIL by the slow path, the good ones around it
    succeed and their frames come back, the NIC carries on."""
    from vmbus.channel import _Waiter
    from vmbus.packet import inband

    nic = await _nic(local_vm, open_channel)
    good = [nic_frame(i) for i in range(4)]
    bad = [
        struct.pack("<II9I", 1, 44 + 60, 36, 61, 0, 0, 0, 0, 0, 0, 0) + bytes(60),  # data past
        struct.pack("<II9I", 1, 44 + 60 + 12, 36 + 12, 60, 0, 0, 0, 36, 12, 0, 0)
        + struct.pack("<III", 0, 0, 12)  # a PPI of size 0: a loop for a naive walker
        + bytes(60),
    ]
    msgs = [_rndis_packet(good[0]), bad[0], _rndis_packet(good[1]), bad[1]]
    msgs += [_rndis_packet(good[2]) + _rndis_packet(good[3])]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(nic.receive_loop)
        with trio.fail_after(10):
            await nic.connect()
            await nic.device_add()
            sections = [nic._free_sections.pop() for _ in msgs]
            pkts = []
            for section, rndis in zip(sections, msgs, strict=True):
                nic._write(nic._send[1], section * nic.send_section, rndis)
                msg = struct.pack(
                    "<IIII", nv.Msg.SEND_RNDIS_PKT, nv.CHANNEL_TYPE_DATA, section, len(rndis)
                )
                pkts.append(inband(msg.ljust(40, b"\0")))
            waiters = [_Waiter() for _ in msgs]
            await nic.gch.channel.post_requests(pkts, waiters)  # one ring write
            for w in waiters:
                await w.done.wait()
            got = sorted([(await nic.frames.receive()).frame for _ in good])
        statuses = [struct.unpack_from("<II", w.payload)[1] for w in waiters]
        ok, fail = nv.Status.SUCCESS, nv.Status.FAIL
        assert statuses == [ok, fail, ok, fail, ok]
        assert got == sorted(good) and nic.received_bad == 0
        nursery.cancel_scope.cancel()


def nic_frame(i: int) -> bytes:
    return bytes.fromhex("00155d000001") + struct.pack("<I", i).ljust(54, b"g")
