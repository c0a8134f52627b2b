"""The simulated guest's netvsc driver (VSC), a first cut modelled on Linux 6.1's
hv_netvsc: netvsc_connect_vsp (INIT newest first, NDIS config, NDIS version, the
receive and send buffers as GPADLs) and rndis_filter_device_add (INITIALIZE, then
the OID queries and sets in Linux's order), with every message the size Linux sends
(40-byte nvsp_messages, 8-byte receive completions). Frames go out copied into
send-buffer sections (inband SEND_RNDIS_PKT), RNDIS control as one GPA-direct page;
received transfer-page packets are read from the receive buffer, checked as Linux
checks them, and completed on the channel they came in on.

Multi-queue as Linux does it (`enable_multiqueue`: RSS capabilities, SUBCHANNEL,
open the sub-channels, RSS parameters); each queue's receives are completed on
their own channel and the hash PPI is read. Frames too big for a section go GPA
direct (header page + the frame as one multi-page range).

`send_frames` is netvsc_send with xmit_more: a batch of frames packed several
RNDIS packets to a section (up to max_pkt_per_msg from INITIALIZE_CMPLT, each
padded to its packet alignment), large ones GPA direct from a pool of page
buffers, all of it posted with one ring write; completions come back
asynchronously (the receive loop matches them) and free the sections. Offloads
are negotiated as rndis_netdev_set_hwcaps does: OID_TCP_OFFLOAD_PARAMETERS from
the host's hardware capabilities, kept in `offloads`. Not yet: the Linux buffer
sizes (the tests use small buffers to keep the simulated VM's RAM small).
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, cast

import trio

from devices.netvsc import protocol as nv
from devices.netvsc import rndis as rn
from devices.netvsc.vsp import NETVSC_IF_TYPE
from vmbus.gpadl import PAGE_SIZE, GpaRange
from vmbus.guest.drivers import register
from vmbus.packet import (
    PacketType,
    completion_for,
    gpa_direct,
    inband,
    parse_xfer_pages,
)

if TYPE_CHECKING:
    from vmbus.channel import Channel, CompletedRequest
    from vmbus.guest.vm import GuestChannel, GuestOffer, SimulatedVm
    from vmbus.ring import OutPacket, Packet

log = logging.getLogger(__name__)

LINUX_VERSIONS = (
    nv.NVSP_PROTOCOL_VERSION_61,
    nv.NVSP_PROTOCOL_VERSION_6,
    nv.NVSP_PROTOCOL_VERSION_5,
    nv.NVSP_PROTOCOL_VERSION_4,
    nv.NVSP_PROTOCOL_VERSION_2,
    nv.NVSP_PROTOCOL_VERSION_1,
)
RNDIS_TIMEOUT_S = 5.0  # Linux's RNDIS control timeout
GSO_LEGACY_MAX_SIZE = 65536  # Linux's gso_max_size before the host's LSO limit
MAX_PKT_ALIGN = 4096  # a bound on the host's packet alignment (1 << factor)
DIRECT_BUFFERS = 32  # GPA-direct sends in flight at once (each a pool buffer)
DIRECT_MAX_PAGES = 17  # a 64 KiB LSO frame plus headers, in pages
NVSP_DATA_DIRECT = struct.pack(
    "<IIII", nv.Msg.SEND_RNDIS_PKT, nv.CHANNEL_TYPE_DATA, nv.NO_SECTION, 0
).ljust(nv.NVSP_MESSAGE_SIZE, b"\0")
NVSP_COMPLETE_OK = struct.pack("<II", nv.Msg.SEND_RNDIS_PKT_COMPLETE, nv.Status.SUCCESS)
# NDIS offload capability bits Linux tests (hyperv_net.h)
TXCSUM_ALL_TCP4 = rn.CSUM_TCP | rn.CSUM_TCP_OPTIONS
TXCSUM_ALL_TCP6 = rn.CSUM_TCP | rn.CSUM_TCP_OPTIONS | rn.CSUM_IP6_EXT_HEADERS
LSOV2_CAP_IP6 = rn.LSO_IP6_EXT_HEADERS | rn.LSO_TCP_OPTIONS
OFFLOAD_TX_RX_DISABLED = 1
OFFLOAD_TX_RX_ENABLED = 4
OFFLOAD_LSOV2_ENABLED = 2


class NetvscGuestError(Exception):
    """The host answered something Linux would refuse."""


@dataclass(frozen=True)
class RxFrame:
    """A received frame, the queue (channel) it came in on and its hash PPI."""

    queue: int
    frame: bytes
    hash_value: int | None = None
    checksum: int | None = None  # the receive checksum PPI
    vlan: int | None = None  # the 802.1Q PPI's value


@dataclass(frozen=True)
class TxFrame:
    """A frame to send and the PPIs netvsc_xmit puts before it ((type, u32 value))."""

    data: bytes | bytearray | memoryview
    ppis: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class NicOffloads:
    """What rndis_netdev_set_hwcaps turns on from the host's NDIS_OFFLOAD: transmit
    checksums Linux asks the host for, LSO v2 per IP version and its size limit
    (netif_set_tso_max_size). Linux always checksums IPv4 headers itself."""

    tcp4_csum: bool = False
    udp4_csum: bool = False
    tcp6_csum: bool = False
    udp6_csum: bool = False
    lso4: bool = False
    lso6: bool = False
    gso_max_size: int = GSO_LEGACY_MAX_SIZE

    @classmethod
    def from_capabilities(cls, caps: bytes) -> NicOffloads:
        """rndis_netdev_set_hwcaps's decisions over the queried capabilities."""
        tx4, tx6 = struct.unpack_from("<I12xI", caps, 8)
        enc4, max4, _min4, enc6, max6, _min6, opts6 = struct.unpack_from("<7I", caps, 80)
        tcp4 = tx4 & TXCSUM_ALL_TCP4 == TXCSUM_ALL_TCP4
        tcp6 = tx6 & TXCSUM_ALL_TCP6 == TXCSUM_ALL_TCP6
        lso4 = tcp4 and bool(enc4 & rn.ENCAP_802_3)
        lso6 = tcp6 and bool(enc6 & rn.ENCAP_802_3) and opts6 & LSOV2_CAP_IP6 == LSOV2_CAP_IP6
        gso = GSO_LEGACY_MAX_SIZE
        if lso4:
            gso = min(gso, max4)
        if lso6:
            gso = min(gso, max6)
        udp4, udp6 = tcp4 and bool(tx4 & rn.CSUM_UDP), tcp6 and bool(tx6 & rn.CSUM_UDP)
        return cls(tcp4, udp4, tcp6, udp6, lso4, lso6, gso)

    def parameters(self) -> bytes:
        """The NDIS_OFFLOAD_PARAMETERS (revision 3) that turn them on."""

        def on(flag: bool, value: int) -> int:
            return value if flag else 0

        return struct.pack(
            "<BBH9B",
            0x80,
            3,
            28,
            OFFLOAD_TX_RX_DISABLED,
            on(self.tcp4_csum, OFFLOAD_TX_RX_ENABLED),
            on(self.udp4_csum, OFFLOAD_TX_RX_ENABLED),
            on(self.tcp6_csum, OFFLOAD_TX_RX_ENABLED),
            on(self.udp6_csum, OFFLOAD_TX_RX_ENABLED),
            0,
            0,
            on(self.lso4, OFFLOAD_LSOV2_ENABLED),
            on(self.lso6, OFFLOAD_LSOV2_ENABLED),
        ).ljust(28, b"\0")


def rndis_header(frame_len: int, ppis: tuple[tuple[int, int], ...] = ()) -> bytes:
    """netvsc_xmit's RNDIS PACKET header with the PPIs as init_ppi_data lays them;
    the frame follows it."""
    area = b"".join(struct.pack("<IIII", 16, t, 12, v) for t, v in ppis)
    head = struct.pack(
        "<II9I", 1, 44 + len(area) + frame_len, 36 + len(area), frame_len, 0, 0, 0, 36,
        len(area), 0, 0,
    )  # fmt: skip
    return head + area


@dataclass
class _PageBuffer:
    """A GPA-direct send's pages (Linux's skb pages): one for the RNDIS header, the
    frame's after it, and views of them so a frame is written a slice a page."""

    head: list[int]
    pages: list[int]
    head_view: memoryview
    views: list[memoryview]

    def write(self, head: bytes, frame: bytes | bytearray | memoryview) -> int:
        """Header and frame into the pages; returns how many frame pages it took."""
        self.head_view[: len(head)] = head
        src = memoryview(frame)
        n = len(src)
        for i, v in enumerate(self.views):
            pos = i * PAGE_SIZE
            if pos >= n:
                return i
            k = min(PAGE_SIZE, n - pos)
            v[:k] = src[pos : pos + k]
        return len(self.views)

    def release(self) -> None:
        self.head_view.release()
        for v in self.views:
            v.release()


def _msg(msg_type: int, fmt: str = "", *fields: int) -> bytes:
    return struct.pack("<I" + fmt, msg_type, *fields).ljust(nv.NVSP_MESSAGE_SIZE, b"\0")


@dataclass
class NetvscGuest:
    """One guest NIC on an open primary channel; `start` runs its receive loop."""

    vm: SimulatedVm
    gch: GuestChannel
    recv_size: int = 2 << 20
    send_size: int = 1 << 20
    mtu: int = 1500
    version: int = 0
    recv_section: int = 0
    send_section: int = 0
    send_sections: int = 0
    mac: bytes = b""
    frames: trio.MemoryReceiveChannel[RxFrame] = field(init=False)
    received_bad: int = 0
    # data packets that came before the packet filter was set: the real 6.1 hv_netvsc
    # oopses on one that beats its SEND_RECV_BUF completion (see vsp._Nic.deliver)
    received_early: int = 0
    filter_set: bool = False
    withhold_data_completions: bool = False  # a guest that stops returning sections
    send_table: list[int] = field(default_factory=list)
    indications: list[int] = field(default_factory=list)  # INDICATE_STATUS codes
    subchannels: dict[int, GuestChannel] = field(default_factory=dict)
    _frames_in: trio.MemorySendChannel[RxFrame] = field(init=False)
    _replies: dict[int, trio.MemorySendChannel[bytes]] = field(default_factory=dict)
    _req_id: int = 0
    _recv: tuple[int, list[int]] = (0, [])
    _send: tuple[int, list[int]] = (0, [])
    _free_sections: list[int] = field(default_factory=list)
    # from INITIALIZE_CMPLT (rndis_filter_init_device): packets per send section
    max_pkt: int = 1
    pkt_align: int = 1
    offloads: NicOffloads = field(default_factory=NicOffloads)
    # send_frames' counters: RNDIS packets, NVSP messages (sections or GPA direct),
    # LSO packets among them, and completions that came back other than SUCCESS
    tx_packets: int = 0
    tx_messages: int = 0
    tx_direct: int = 0
    tx_lso: int = 0
    tx_failed: int = 0
    _direct_free: list[_PageBuffer] = field(default_factory=list)
    _direct_made: int = 0
    _tx_space: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)
    _tracked: set[int] = field(default_factory=set)
    _views: dict[int, memoryview] = field(default_factory=dict)
    # set: each ring batch's received frames go to it in one call, from the receive
    # loop (no task switch a frame), instead of to `frames`
    on_frames: Callable[[list[RxFrame]], None] | None = None
    _rx_batch: list[RxFrame] = field(default_factory=list)
    _direct_all: list[_PageBuffer] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._frames_in, self.frames = trio.open_memory_channel[RxFrame](4096)

    # -- memory helpers --

    def _write(self, pfns: list[int], offset: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            page, off = divmod(offset + pos, PAGE_SIZE)
            n = min(PAGE_SIZE - off, len(data) - pos)
            self.vm.memory.write(pfns[page] * PAGE_SIZE + off, data[pos : pos + n])
            pos += n

    def _fast_write(
        self, pfns: list[int], offset: int, data: bytes | bytearray | memoryview
    ) -> None:
        """_write through cached views of the pages (a slice assignment a page, a
        sixth of GuestMemory.write's cost): send_frames' sections and page buffers.
        `release_views` must run before the VM's RAM is closed."""
        src = memoryview(data)
        views = self._views
        pos, n = 0, len(src)
        while pos < n:
            page, off = divmod(offset + pos, PAGE_SIZE)
            k = min(PAGE_SIZE - off, n - pos)
            pfn = pfns[page]
            v = views.get(pfn)
            if v is None:
                v = views[pfn] = self.vm.ram.page(pfn)
            v[off : off + k] = src[pos : pos + k]
            pos += k

    def release_views(self) -> None:
        """Let go of the page views send_frames cached (the RAM cannot close with them)."""
        for v in self._views.values():
            v.release()
        self._views.clear()
        for buf in self._direct_all:
            buf.release()
        self._direct_all.clear()
        self._direct_free.clear()  # their pages stay allocated: the VM is going
        self._direct_made = 0

    def _read(self, pfns: list[int], offset: int, length: int) -> bytes:
        out = []
        pos = 0
        while pos < length:
            page, off = divmod(offset + pos, PAGE_SIZE)
            n = min(PAGE_SIZE - off, length - pos)
            out.append(self.vm.memory.read(pfns[page] * PAGE_SIZE + off, n))
            pos += n
        return b"".join(out)

    # -- netvsc_connect_vsp --

    async def connect(self) -> None:
        """Linux's init, byte for byte; raises NetvscGuestError where Linux fails."""
        ch = self.gch.channel
        for ver in LINUX_VERSIONS:
            reply = await ch.request(inband(_msg(nv.Msg.INIT, "II", ver, ver)))
            if len(reply) < 4 + 24 or struct.unpack_from("<I", reply)[0] != nv.Msg.INIT_COMPLETE:
                raise NetvscGuestError(f"INIT_COMPLETE of {len(reply)} bytes")
            if struct.unpack_from("<I", reply, 12)[0] == nv.Status.SUCCESS:
                self.version = ver
                break
        else:
            raise NetvscGuestError("no NVSP version accepted")
        if self.version != nv.NVSP_PROTOCOL_VERSION_1:
            caps = nv.CAP_IEEE8021Q
            if self.version >= nv.NVSP_PROTOCOL_VERSION_5:
                caps |= nv.CAP_SRIOV | nv.CAP_TEAMING
            if self.version >= nv.NVSP_PROTOCOL_VERSION_61:
                caps |= nv.CAP_RSC
            cfg = _msg(nv.Msg.SEND_NDIS_CONFIG, "IIQ", self.mtu + 14, 0, caps)
            await ch.send([inband(cfg, trans_id=nv_no_response())])
        ndis = 0x00060001 if self.version <= nv.NVSP_PROTOCOL_VERSION_4 else 0x0006001E
        ver_msg = _msg(nv.Msg.SEND_NDIS_VER, "II", ndis >> 16, ndis & 0xFFFF)
        await ch.send([inband(ver_msg, trans_id=nv_no_response())])
        relid = self.gch.offer.relid
        self._recv = await self.vm.create_buffer_gpadl(relid, self.recv_size)
        reply = await ch.request(
            inband(_msg(nv.Msg.SEND_RECV_BUF, "IH", self._recv[0], nv.NETVSC_RECEIVE_BUFFER_ID))
        )
        if len(reply) < 4 + 24:
            raise NetvscGuestError(f"SEND_RECV_BUF_COMPLETE of {len(reply)} bytes")
        _, status, nsec, offset, sub, count, _end = struct.unpack_from("<7I", reply)
        if status != nv.Status.SUCCESS or nsec != 1 or offset != 0:
            raise NetvscGuestError(f"receive buffer refused: status {status} sections {nsec}")
        if sub < 68 or sub * count > self.recv_size:
            raise NetvscGuestError(f"invalid recv_section_size {sub} x {count}")
        self.recv_section = sub
        self._send = await self.vm.create_buffer_gpadl(relid, self.send_size)
        reply = await ch.request(
            inband(_msg(nv.Msg.SEND_SEND_BUF, "IH", self._send[0], nv.NETVSC_SEND_BUFFER_ID))
        )
        _, status, section = struct.unpack_from("<3I", reply)
        if status != nv.Status.SUCCESS or section < 68:
            raise NetvscGuestError(f"send buffer refused: status {status} section {section}")
        self.send_section = section
        self.send_sections = self.send_size // section
        self._free_sections = list(range(self.send_sections - 1, -1, -1))

    # -- the receive loop --

    async def receive_loop(self, queue: int = 0) -> None:
        """Transfer-page packets: read each range, complete on the channel it came
        in on (spec §14.4); inband: the send indirection table (netvsc_send_table)."""
        ch = (self.gch if queue == 0 else self.subchannels[queue]).channel
        while True:
            out = []
            for pkt in await ch.receive():
                if pkt.type == PacketType.XFER_PAGES:
                    status = self._on_xfer(pkt, queue)
                    control = pkt.payload[4] == nv.CHANNEL_TYPE_CONTROL
                    if control or not self.withhold_data_completions:
                        out.append(completion_for(pkt, struct.pack("<II", 108, status)))
                elif pkt.type == PacketType.INBAND:
                    self._on_inband(bytes(pkt.payload))
            if self._rx_batch and self.on_frames is not None:
                batch, self._rx_batch = self._rx_batch, []
                self.on_frames(batch)
            await ch.send(out)

    def _on_inband(self, msg: bytes) -> None:
        if len(msg) < 12 or struct.unpack_from("<I", msg)[0] != nv.Msg.SEND_INDIRECTION_TABLE:
            return
        count, offset = struct.unpack_from("<II", msg, 4)
        if count != nv.VRSS_SEND_TAB_SIZE:
            self.received_bad += 1
            return
        if self.version <= nv.NVSP_PROTOCOL_VERSION_6 and len(msg) >= 40 + 4 * count:
            offset = 40  # Linux's fix for the Windows host's offset bug
        if len(msg) < 4 * count or offset > len(msg) - 4 * count:
            self.received_bad += 1
            return
        self.send_table = list(struct.unpack_from(f"<{count}I", msg, offset))

    def _on_xfer(self, pkt: Packet, queue: int) -> int:
        xp = parse_xfer_pages(pkt)
        body = bytes(pkt.payload[: 4 + 12])
        if len(body) < 4 or struct.unpack_from("<I", body)[0] != nv.Msg.SEND_RNDIS_PKT:
            self.received_bad += 1
            return nv.Status.FAIL
        if xp.set_id != nv.NETVSC_RECEIVE_BUFFER_ID:
            self.received_bad += 1
            return nv.Status.FAIL
        if pkt.payload[4] != nv.CHANNEL_TYPE_CONTROL and not self.filter_set:
            self.received_early += 1
            self.received_bad += 1
            return nv.Status.FAIL
        status = nv.Status.SUCCESS
        for rng in xp.ranges:
            count, offset = rng.byte_count, rng.byte_offset
            if (
                offset > self.recv_size
                or count > self.recv_size - offset
                or count > self.recv_section
            ):
                status = nv.Status.FAIL
                continue
            self._on_rndis(self._read(self._recv[1], offset, count), queue)
        return status

    def _on_rndis(self, msg: bytes, queue: int) -> None:
        if len(msg) < 8:
            self.received_bad += 1
            return
        msg_type, msg_len = struct.unpack_from("<II", msg)
        if msg_len < 8 or msg_len > len(msg):
            self.received_bad += 1
            return
        if msg_type == rn.MsgType.PACKET:
            d_off, d_len = struct.unpack_from("<II", msg, 8)
            if d_off >= len(msg) - 8 or len(msg) - 8 - d_off < d_len:
                self.received_bad += 1
                return
            frame = RxFrame(
                queue,
                msg[8 + d_off : 8 + d_off + d_len],
                self._ppi(msg, rn.PpiType.NBL_HASH_VALUE),
                self._ppi(msg, rn.PpiType.TCPIP_CHKSUM),
                self._ppi(msg, rn.PpiType.IEEE_8021Q),
            )
            if self.on_frames is not None:
                self._rx_batch.append(frame)
                return
            try:
                self._frames_in.send_nowait(frame)
            except trio.WouldBlock:
                self.received_bad += 1
        elif msg_type == rn.MsgType.INDICATE_STATUS and msg_len >= rn.INDICATE_STATUS_SIZE:
            self.indications.append(struct.unpack_from("<I", msg, 8)[0])
        elif msg_type in (
            rn.MsgType.INITIALIZE_CMPLT,
            rn.MsgType.QUERY_CMPLT,
            rn.MsgType.SET_CMPLT,
        ):
            (req_id,) = struct.unpack_from("<I", msg, 8)
            waiter = self._replies.pop(req_id, None)
            if waiter is not None:
                waiter.send_nowait(msg[:msg_len])

    def _ppi(self, msg: bytes, want: int) -> int | None:
        """rndis_get_ppi, with its checks (a bad element ends the walk here; Linux's
        own loop would spin on it)."""
        p_off, p_len = struct.unpack_from("<II", msg, 8 + 20)
        if not p_len:
            return None
        rpkt_len = len(msg) - 8
        if p_off < 36 or p_off > rpkt_len or p_len < 12 or p_len > rpkt_len - p_off:
            self.received_bad += 1
            return None
        pos, left = 8 + p_off, p_len
        while left > 0:
            size, type_word, ppi_off = struct.unpack_from("<III", msg, pos)
            if size > left or ppi_off >= size or size < 12:
                self.received_bad += 1
                return None
            if type_word == want and size - ppi_off >= 4:
                return int(struct.unpack_from("<I", msg, pos + ppi_off)[0])
            left -= size
            pos += size
        return None

    # -- vRSS (rndis_set_subchannel, one per queue) --

    async def enable_multiqueue(self, queues: int, nursery: trio.Nursery | None) -> int:
        """Linux's vRSS bring-up: RSS capabilities, SUBCHANNEL, open the offered
        sub-channels, then RSS parameters (disable, then table and key). Returns the
        number of queues now open. device_add runs it in Linux's place; called after
        it, the packet filter is already set (not Linux's order)."""
        caps = await self.query(
            rn.Oid.GEN_RECEIVE_SCALE_CAPABILITIES,
            struct.pack("<BBH", 0x88, 2, 18).ljust(18, b"\0"),
            expect=18,
        )
        n_queues, n_tab = struct.unpack_from("<IH", caps, 12)
        want = min(queues, n_queues, 64)
        if want < 2:
            return 1
        if nursery is None:
            raise ValueError("more than one queue needs a nursery for their receive loops")
        reply = await self.gch.channel.request(
            inband(_msg(nv.Msg.SUBCHANNEL, "II", nv.SUBCHANNEL_ALLOCATE, want - 1))
        )
        msg_type, status, granted = struct.unpack_from("<3I", reply)
        if msg_type != nv.Msg.SUBCHANNEL or status != nv.Status.SUCCESS or granted > want - 1:
            raise NetvscGuestError(f"SUBCHANNEL answered {status} granting {granted}")
        with trio.fail_after(RNDIS_TIMEOUT_S):
            while True:
                offers = {
                    o.sub_channel_index: o
                    for o in self.vm.find_offers(NETVSC_IF_TYPE)
                    if o.if_instance == self.gch.offer.if_instance and o.sub_channel_index
                }
                if all(i in offers for i in range(1, granted + 1)):
                    break
                await self.vm.offer_events.receive()
        for i in range(1, granted + 1):
            self.subchannels[i] = await self.vm.open_channel(offers[i], 128 * PAGE_SIZE)
            nursery.start_soon(self.receive_loop, i)
        n = int(granted) + 1
        table_size = n_tab if 1 <= n_tab <= 256 else 128
        table = [i % n for i in range(table_size)]
        for flags in (rn.RSS_FLAG_DISABLE, 0):
            await self.set(rn.Oid.GEN_RECEIVE_SCALE_PARAMETERS, rss_params(table, flags))
        return n

    # -- RNDIS control (rndis_filter_send_request: one GPA-direct buffer) --

    async def rndis_request(self, msg_type: int, body: bytes) -> bytes:
        self._req_id += 1
        req_id = self._req_id
        msg = struct.pack("<III", msg_type, 12 + len(body), req_id) + body
        if len(msg) > PAGE_SIZE:
            raise ValueError("an RNDIS request larger than a page")
        pfns = self.vm.ram.alloc_pages(1)
        send, recv = trio.open_memory_channel[bytes](1)
        self._replies[req_id] = send
        try:
            self._write(pfns, 0, msg)
            nvsp = _msg(nv.Msg.SEND_RNDIS_PKT, "III", nv.CHANNEL_TYPE_CONTROL, nv.NO_SECTION, 0)
            done = await self.gch.channel.request(
                gpa_direct([GpaRange(len(msg), 0, tuple(pfns))], nvsp)
            )
            if struct.unpack_from("<II", done) != (108, nv.Status.SUCCESS):
                raise NetvscGuestError(f"RNDIS request completed with {done[:8].hex()}")
            with trio.fail_after(RNDIS_TIMEOUT_S):
                return await recv.receive()
        finally:
            self._replies.pop(req_id, None)
            self.vm.ram.free_pages(pfns)

    async def query(self, oid: int, info: bytes = b"", expect: int = 4096) -> bytes:
        """rndis_filter_query_device with Linux's checks of the answer."""
        reply = await self.rndis_request(
            rn.MsgType.QUERY, struct.pack("<IIII", oid, len(info), 20, 0) + info
        )
        msg_len = len(reply)
        _, _, _, status, buflen, offset = struct.unpack_from("<6I", reply)
        if status != rn.Status.SUCCESS:
            raise NetvscGuestError(f"QUERY {oid:#x}: status {status:#x}")
        if buflen > expect or offset < 16 or msg_len - 8 < offset or msg_len - 8 - offset < buflen:
            raise NetvscGuestError(f"QUERY {oid:#x}: answer {offset}+{buflen} of {msg_len}")
        return reply[8 + offset : 8 + offset + buflen]

    async def set(self, oid: int, info: bytes) -> int:
        reply = await self.rndis_request(
            rn.MsgType.SET, struct.pack("<IIII", oid, len(info), 20, 0) + info
        )
        return int(struct.unpack_from("<I", reply, 12)[0])

    async def device_add(self, queues: int = 1, nursery: trio.Nursery | None = None) -> int:
        """rndis_filter_device_add up to rndis_filter_open, in Linux's order (the real
        driver's bytes are in tests/data/real_linux_6.1_netvsc_init.json): INITIALIZE,
        the queries, offload parameters, link state and speed, the vRSS bring-up
        (RSS capabilities always; SUBCHANNEL and RSS parameters for more than one
        queue, whose receive loops go into `nursery`), and last the packet filter.
        Returns the number of queues open."""
        init = await self.rndis_request(rn.MsgType.INITIALIZE, struct.pack("<III", 1, 0, 0x4000))
        if struct.unpack_from("<I", init, 12)[0] != rn.Status.SUCCESS:
            raise NetvscGuestError("RNDIS INITIALIZE refused")
        if len(init) >= 44:  # max_pkt_per_msg and pkt_alignment_factor, as Linux keeps them
            max_pkt, _max_xfer, factor = struct.unpack_from("<3I", init, 32)
            self.max_pkt = max(1, max_pkt)
            self.pkt_align = min(1 << min(factor, 31), MAX_PKT_ALIGN)
        (mtu,) = struct.unpack("<I", await self.query(rn.Oid.GEN_MAXIMUM_FRAME_SIZE, expect=4))
        self.mtu = min(self.mtu, mtu)
        self.mac = await self.query(rn.Oid.E802_3_PERMANENT_ADDRESS, expect=6)
        await self.query(rn.Oid.GEN_FRIENDLY_NAME, expect=512)
        rev, size = (3, 156) if self.version >= nv.NVSP_PROTOCOL_VERSION_5 else (2, 144)
        hdr = struct.pack("<BBH", 0xA7, rev, size).ljust(size, b"\0")
        caps = await self.query(rn.Oid.TCP_OFFLOAD_HARDWARE_CAPABILITIES, hdr, expect=156)
        if caps[0] != 0xA7 or not 112 <= struct.unpack_from("<H", caps, 2)[0] <= len(caps):
            raise NetvscGuestError("invalid NDIS offload object")
        self.offloads = NicOffloads.from_capabilities(caps)
        params = self.offloads.parameters()
        if await self.set(rn.Oid.TCP_OFFLOAD_PARAMETERS, params) != rn.Status.SUCCESS:
            raise NetvscGuestError("offload parameters refused")
        await self.query(rn.Oid.GEN_MEDIA_CONNECT_STATUS, expect=4)
        if self.version >= nv.NVSP_PROTOCOL_VERSION_5:
            await self.query(rn.Oid.GEN_LINK_SPEED, expect=4)
        n = await self.enable_multiqueue(queues, nursery)
        self.filter_set = True  # rndis_filter_open: frames may come from now on
        await self.set(rn.Oid.GEN_CURRENT_PACKET_FILTER, struct.pack("<I", 0x0D))
        return n

    # -- transmit (netvsc_send: copied into a send-buffer section) --

    async def send_frame(
        self, frame: bytes, queue: int = 0, ppis: tuple[tuple[int, int], ...] = ()
    ) -> None:
        """netvsc_xmit's RNDIS packet (PPIs as init_ppi_data lays them) copied into a
        free send section, SEND_RNDIS_PKT on the queue's channel, wait for the
        completion."""
        head = rndis_header(len(frame), ppis)
        msg = head + frame
        if len(msg) + 8 >= self.send_section:  # netvsc_send: too big to copy, go direct
            await self._send_direct(head, frame, queue)
            return
        while not self._free_sections:
            await trio.sleep(0.001)
        section = self._free_sections.pop()
        try:
            self._write(self._send[1], section * self.send_section, msg)
            nvsp = _msg(nv.Msg.SEND_RNDIS_PKT, "III", nv.CHANNEL_TYPE_DATA, section, len(msg))
            ch = (self.gch if queue == 0 else self.subchannels[queue]).channel
            done = await ch.request(inband(nvsp))
            if struct.unpack_from("<II", done) != (108, nv.Status.SUCCESS):
                raise NetvscGuestError(f"send completed with {done[:8].hex()}")
        finally:
            self._free_sections.append(section)
            self._tx_space.unpark_all()

    # -- batched transmit (netvsc_send with xmit_more) --

    def _channel(self, queue: int) -> Channel:
        return (self.gch if queue == 0 else self.subchannels[queue]).channel

    def _sent(self, done: list[CompletedRequest]) -> None:
        """send_frames' completions (matched in the receive loop): each gives its
        section or page buffer back; a status other than SUCCESS is counted."""
        for c in done:
            if c.payload[:8] != NVSP_COMPLETE_OK:
                self.tx_failed += 1
            if isinstance(c.context, int):
                self._free_sections.append(c.context)
            else:
                self._direct_free.append(cast(_PageBuffer, c.context))
        self._tx_space.unpark_all()

    def _grow_direct(self) -> bool:
        """One more GPA-direct page buffer (header page + frame pages), up to
        DIRECT_BUFFERS; False when there may be no more (wait for a completion)."""
        if self._direct_made >= DIRECT_BUFFERS:
            return False
        try:
            pages = self.vm.ram.alloc_pages(1 + DIRECT_MAX_PAGES)
        except MemoryError:
            if not self._direct_made:
                raise
            return False
        self._direct_made += 1
        ram = self.vm.ram
        buf = _PageBuffer(
            pages[:1], pages[1:], ram.page(pages[0]), [ram.page(p) for p in pages[1:]]
        )
        self._direct_free.append(buf)
        self._direct_all.append(buf)
        return True

    async def send_frames(self, frames: Sequence[TxFrame], queue: int = 0) -> None:
        """netvsc_send over a batch (xmit_more until its last frame): frames packed
        into send sections, up to max_pkt RNDIS packets a section, each packet padded
        to pkt_align before the next; a frame too big for a section goes GPA direct
        from a page buffer. Everything is posted with one ring write (earlier only
        when sections or buffers run out: what is built goes out, then we wait for
        completions). Returns once posted: the completions, taken by the receive loop,
        free the sections (a failed one is counted in tx_failed). Call
        `release_views` when done with the NIC."""
        ch = self._channel(queue)
        if id(ch) not in self._tracked:
            ch.track_completions(self._sent)
            self._tracked.add(id(ch))
        pkts: list[OutPacket] = []
        ctxs: list[object] = []
        section = -1
        buf = bytearray()
        count = last = 0

        def close() -> None:
            nonlocal section
            if section >= 0:
                self._fast_write(self._send[1], section * self.send_section, buf)
                nvsp = _msg(nv.Msg.SEND_RNDIS_PKT, "III", nv.CHANNEL_TYPE_DATA, section, len(buf))
                pkts.append(inband(nvsp))
                ctxs.append(section)
                section = -1

        async def post() -> None:
            close()
            if pkts:
                self.tx_messages += len(pkts)
                await ch.post_requests(pkts, ctxs)
                pkts.clear()
                ctxs.clear()

        for f in frames:
            head = rndis_header(len(f.data), f.ppis)
            size = len(head) + len(f.data)
            self.tx_packets += 1
            if any(t == rn.PpiType.TCP_LARGESEND for t, _ in f.ppis):
                self.tx_lso += 1
            if size + self.pkt_align >= self.send_section:  # too big to copy: direct
                if len(head) > PAGE_SIZE or len(f.data) > DIRECT_MAX_PAGES * PAGE_SIZE:
                    raise ValueError("frame too large for one GPA-direct packet")
                while not self._direct_free and not self._grow_direct():
                    await post()
                    await self._tx_space.park()
                pbuf = self._direct_free.pop()
                pages = pbuf.write(head, f.data)
                ranges = [
                    GpaRange(len(head), 0, tuple(pbuf.head)),
                    GpaRange(len(f.data), 0, tuple(pbuf.pages[:pages])),
                ]
                pkts.append(gpa_direct(ranges, NVSP_DATA_DIRECT))
                ctxs.append(pbuf)
                self.tx_direct += 1
                continue
            pad = -len(buf) % self.pkt_align
            if section >= 0 and count < self.max_pkt and len(buf) + pad + size <= self.send_section:
                if pad:  # the previous packet's msg_len covers the padding (Linux's way)
                    struct.pack_into("<I", buf, last + 4, len(buf) - last + pad)
                    buf += bytes(pad)
                last = len(buf)
                buf += head
                buf += f.data
                count += 1
                continue
            close()
            while not self._free_sections:
                await post()
                await self._tx_space.park()
            section = self._free_sections.pop()
            buf = bytearray(head)
            buf += f.data
            count, last = 1, 0
        await post()

    async def _send_direct(self, head: bytes, frame: bytes, queue: int) -> None:
        """A GPA-direct send: the RNDIS header (with PPIs) in one page, the frame in
        scattered pages as one multi-page range (Linux's mpb form); no section."""
        pages = (len(frame) + PAGE_SIZE - 1) // PAGE_SIZE
        if len(head) > PAGE_SIZE or pages > 32:
            raise ValueError("frame too large for one GPA-direct packet")
        hpfn = self.vm.ram.alloc_pages(1)
        fpfns = self.vm.ram.alloc_pages(pages)
        try:
            self._write(hpfn, 0, head)
            self._write(fpfns, 0, frame)
            ranges = [GpaRange(len(head), 0, tuple(hpfn)), GpaRange(len(frame), 0, tuple(fpfns))]
            nvsp = _msg(nv.Msg.SEND_RNDIS_PKT, "III", nv.CHANNEL_TYPE_DATA, nv.NO_SECTION, 0)
            ch = (self.gch if queue == 0 else self.subchannels[queue]).channel
            done = await ch.request(gpa_direct(ranges, nvsp))
            if struct.unpack_from("<II", done) != (108, nv.Status.SUCCESS):
                raise NetvscGuestError(f"send completed with {done[:8].hex()}")
        finally:
            self.vm.ram.free_pages(hpfn + fpfns)

    async def teardown(self) -> None:
        """netvsc_device_remove: HALT, revoke both buffers, tear the GPADLs down."""
        ch = self.gch.channel
        halt = struct.pack("<III", rn.MsgType.HALT, 12, self._req_id + 1)
        pfns = self.vm.ram.alloc_pages(1)
        self._write(pfns, 0, halt)
        nvsp = _msg(nv.Msg.SEND_RNDIS_PKT, "III", nv.CHANNEL_TYPE_CONTROL, nv.NO_SECTION, 0)
        await ch.request(gpa_direct([GpaRange(len(halt), 0, tuple(pfns))], nvsp))
        self.vm.ram.free_pages(pfns)
        for msg in (
            _msg(nv.Msg.REVOKE_RECV_BUF, "H", nv.NETVSC_RECEIVE_BUFFER_ID),
            _msg(nv.Msg.REVOKE_SEND_BUF, "H", nv.NETVSC_SEND_BUFFER_ID),
        ):
            await ch.send([inband(msg, trans_id=nv_no_response())])


def rss_params(table: list[int], flags: int, key: bytes = rn.DEFAULT_RSS_KEY) -> bytes:
    """rndis_set_rss_param_msg's object: header, table at 40, key after it."""
    n = len(table)
    head = struct.pack(
        "<BBHHHIH2xIH2xIIII",
        rn.NDIS_OBJECT_TYPE_RSS_PARAMETERS,
        2,
        rn.RSS_PARAMS_SIZE,
        flags,
        0,
        0x1701,
        4 * n,
        rn.RSS_PARAMS_SIZE,
        len(key),
        rn.RSS_PARAMS_SIZE + 4 * n,
        0,
        0,
        0,
    )
    return head + struct.pack(f"<{n}I", *table) + key


def nv_no_response() -> int:
    """VMBUS_RQST_ID_NO_RESPONSE: the id Linux gives packets it wants no answer to."""
    return (1 << 64) - 3


MAX_PROBE_FRAMES = 2000  # `vmbusd vm --packets N` bounces min(N, this) frames
FRAME_TIMEOUT_S = 10.0  # a frame not back by then was lost
FIRST_FRAME_TIMEOUT_S = 2.0  # none back by then: the backend is not a loopback (a TAP)
SENDERS = 32  # sends in flight at once (each awaits its completion, as netvsc_xmit's callers)


@register
@dataclass
class NetvscVsc:
    """Probe: connect, bring the NIC up and bounce `frames` frames off the host (the
    loopback backend sends each back): every one must come back once and whole (frame
    i carries i; SENDERS sends in flight, so not necessarily in order).
    `packets` is the workload's knob (`vmbusd vm --packets`, the demo): when given, it
    sets `frames` (at most MAX_PROBE_FRAMES, so the NIC costs the demo little time)."""

    if_type: ClassVar = NETVSC_IF_TYPE
    name: ClassVar[str] = "netvsc"
    frames: int = 100
    ring_size: int = 128 * PAGE_SIZE
    packets: int | None = None

    async def probe(self, vm: SimulatedVm, offer: GuestOffer) -> dict[str, Any]:
        count = self.frames if self.packets is None else min(self.packets, MAX_PROBE_FRAMES)
        size = 60  # ETH_ZLEN: the smallest frame, the packet rate's worst case
        gch = await vm.open_channel(offer, max(self.ring_size, 2 * PAGE_SIZE))
        got = 0
        seconds = 0.0
        try:
            async with trio.open_nursery() as nursery:
                nic = NetvscGuest(vm, gch)
                nursery.start_soon(nic.receive_loop)
                await nic.connect()
                await nic.device_add()
                frames = [  # to the NIC's MAC: the VSP applies the packet filter
                    nic.mac + struct.pack("<I", i).ljust(size - 6, bytes([i & 0xFF]))
                    for i in range(count)
                ]
                t0 = time.perf_counter()
                seen = bytearray(count)
                async with trio.open_nursery() as pump:  # sends in flight while frames return
                    todo = iter(frames)
                    for _ in range(SENDERS):
                        pump.start_soon(_send_all, nic, todo)
                    while got < count:
                        timeout = FRAME_TIMEOUT_S if got else FIRST_FRAME_TIMEOUT_S
                        with trio.move_on_after(timeout) as wait:
                            rx = await nic.frames.receive()
                        if wait.cancelled_caught and not got:
                            # Nothing bounces: a backend that is not a loopback (a TAP
                            # whose peer does not echo). Not an error of the NIC's.
                            log.info("no frame came back: the NIC's backend is not a loopback")
                            pump.cancel_scope.cancel()
                            break
                        if wait.cancelled_caught:
                            raise NetvscGuestError(
                                f"{count - got} of {count} frames did not come back"
                            )
                        (i,) = struct.unpack_from("<I", rx.frame, 6)
                        if i >= count or seen[i] or rx.frame != frames[i]:
                            raise NetvscGuestError(
                                f"frame came back wrong: {rx.frame[:8].hex()}..."
                            )
                        seen[i] = 1
                        got += 1
                seconds = time.perf_counter() - t0
                nursery.cancel_scope.cancel()
        finally:
            await vm.close_channel(gch)
        return {
            "driver": self.name,
            "relid": offer.relid,
            "frames": got,
            "mac": nic.mac.hex(),
            "version": f"{nic.version:#x}",
            "mtu": nic.mtu,
            "packets": got,  # what `vmbusd vm`'s summary line prints
            "bytes": got * size,
            "seconds": seconds,
        }


async def _send_all(nic: NetvscGuest, frames: Iterator[bytes]) -> None:
    """One of the probe's senders: takes the next frame until there are none."""
    for frame in frames:
        await nic.send_frame(frame)
