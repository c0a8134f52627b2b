"""The netvsc VSP (host side): NVSP and RNDIS cores driven with trio, frames to and
from a network backend (backends/: loopback, tap, any `vmbusd.net_backends` entry).

On the primary channel: NVSP init (protocol.py) with the receive and send buffers
mapped through `ctx.gpadl`, each held by its own task and let go at once on revoke
or GPADL teardown; SEND_RNDIS_PKT from send-buffer sections and from GPA-direct
pages; RNDIS control (rndis.py) answered through receive-buffer sections (16 kept
for control) in transfer-page packets; PACKETs offloaded (offload.py: checksum,
LSO v2, or handed on as partial frames to a backend that takes them, as tap does)
and given to the backend per VMBus packet and queue. SUBCHANNEL is granted through
`ctx.enable_subchannels` and followed by the send indirection table; every channel
carries transmits (completed on that channel) and its own receive path. Frames from
the backend are steered by Toeplitz over the guest's key and indirection table,
written into free receive sections (RNDIS header with checksum, VLAN and hash PPIs,
then the frame) and indicated with `VM_PKT_DATA_USING_XFER_PAGES`; the guest's
completions free the sections. A queue whose guest stops returning sections drops
frames beyond RX_QUEUE_DEPTH, counted (OID_GEN_RCV_NO_BUFFER).

Not yet (issue 10): switch/pcap backends, several RNDIS
packets per transfer-page packet, native per-packet code, link indications from
`vmbusd ctl`, per-queue section partitioning.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import trio

from devices.netvsc import offload
from devices.netvsc import protocol as nv
from devices.netvsc import rndis as rn
from devices.netvsc.backends.base import (
    BackendError,
    Frame,
    NetBackend,
    NicInfo,
    make_backend,
    partial_frame,
)
from devices.netvsc.backends.tap import parse_mac
from vmbus import plugins
from vmbus.channel import Channel, CompletedRequest
from vmbus.device import Device, DeviceContext, DeviceOffer, GpadlMapping, GuestError
from vmbus.packet import (
    PacketType,
    completion_for,
    inband,
    packet_types_mask,
    wants_completion,
    xfer_pages,
)
from vmbus.ring import OutPacket, Packet

NETVSC_IF_TYPE = uuid.UUID("f8615163-df3e-46c5-913f-f2d2f965ed0e")  # HV_NIC_GUID
CONTROL_SECTIONS = 16  # receive sections kept for control replies and indications
RX_QUEUE_DEPTH = 1024  # frames queued towards one guest queue before drops
MAX_RX_IN_FLIGHT = 4096  # transfer-page packets awaiting the guest's completion


MAX_MTU = 9000  # jumbo frames (without the Ethernet header)
MIN_MTU = 68


@dataclass
class _Queue:
    """One receive queue: its channel, the frames steered to it, its wake-up."""

    index: int
    channel: Channel | None = None
    frames: deque[tuple[bytes, rn.Vlan | None, int | None, int]] = field(default_factory=deque)
    wakeup: trio.Event = field(default_factory=trio.Event)
    delivered: int = 0
    dropped: int = 0


@dataclass
class _Nic:
    """One guest's NIC state, shared by its channels."""

    nvsp: nv.NvspServer
    rndis: rn.RndisDevice
    queues: list[_Queue]
    recv: GpadlMapping | None = None
    send: GpadlMapping | None = None
    free_data: list[int] = field(default_factory=list)
    free_control: list[int] = field(default_factory=list)
    ready: trio.Event = field(default_factory=trio.Event)
    release_recv: trio.Event = field(default_factory=trio.Event)
    release_send: trio.Event = field(default_factory=trio.Event)
    control_out: list[bytes] = field(default_factory=list)
    filtered: int = 0  # frames dropped before the guest set a packet filter

    def wake(self) -> None:
        for q in self.queues:
            q.wakeup.set()

    def deliver_batch(self, frames: list[Frame]) -> None:
        """A batch from the backend (its `deliver`)."""
        for f in frames:
            self.deliver(f.data, f.vlan)

    def deliver(self, frame: bytes, vlan: rn.Vlan | None = None) -> None:
        """A frame from the backend: steer it (Toeplitz over the guest's key, then
        its indirection table) to an open queue; a full queue drops it, counted —
        the guest is not returning receive sections there, the others carry on.

        Nothing goes to the guest before RNDIS is initialized and its packet filter
        is set (rndis_filter_open), as on Hyper-V: Linux 6.1's hv_netvsc takes a
        transfer-page packet that arrives while netvsc_init_buf still waits on the
        SEND_RECV_BUF completion with recv_section_size 0 and its receive-completion
        ring not yet allocated, logs "Packet too big" and writes through a NULL
        pointer in its interrupt handler (seen with a bridge's IPv6 multicast)."""
        if self.rndis.state is not rn.State.INITIALIZED or not self.rndis.packet_filter:
            self.filtered += 1
            return
        rss = self.rndis.rss
        q, hash_value, hash_info = self.queues[0], None, 0
        if rss is not None and rss.enabled:
            found = rn.rss_input(frame, rss.hash_info)
            if found is not None:
                data, hash_type = found
                hash_value = rn.toeplitz_hash(rss.key, data)
                hash_info = rn.HASH_FUNC_TOEPLITZ | hash_type
                index = rn.rss_queue(hash_value, rss.table)
                if index < len(self.queues) and self.queues[index].channel is not None:
                    q = self.queues[index]
        if len(q.frames) >= RX_QUEUE_DEPTH:
            q.dropped += 1
            self.rndis.counters.rcv_no_buffer += 1
            return
        q.frames.append((frame, vlan, hash_value, hash_info))
        q.wakeup.set()


async def _set_when(source: trio.Event, target: trio.Event) -> None:
    await source.wait()
    target.set()


class NetvscDevice(Device):
    """A synthetic NIC: `mac`, `mtu` (without Ethernet header, 68..9000), `queues`
    (vRSS channels), `backend` (a `vmbusd.net_backends` entry point or module:Class,
    default loopback) and that backend's options as further keywords."""

    if_type = NETVSC_IF_TYPE
    name = "netvsc"
    packet_types = packet_types_mask(
        PacketType.INBAND, PacketType.GPA_DIRECT, PacketType.COMPLETION
    )

    def __init__(
        self,
        instance: uuid.UUID | None = None,
        *,
        mac: str = "00:15:5d:00:00:01",
        mtu: int = 1500,
        queues: int = 1,
        ring_size_hint: int = 128 * 4096,
        backend: str | NetBackend = "loopback",
        **backend_options: Any,
    ) -> None:
        from vmbus.config import ConfigError

        super().__init__(instance, ring_size_hint=ring_size_hint)
        try:
            mac_bytes = parse_mac(mac)
        except BackendError as exc:
            raise ConfigError(str(exc)) from None
        if isinstance(mtu, bool) or not isinstance(mtu, int) or not MIN_MTU <= mtu <= MAX_MTU:
            raise ConfigError(f"mtu {mtu!r} out of range: {MIN_MTU}..{MAX_MTU} (9000 = jumbo)")
        if isinstance(queues, bool) or not isinstance(queues, int) or not 1 <= queues <= 64:
            raise ConfigError(f"queues {queues!r} out of range: 1..64")
        self.config = rn.NicConfig(mac=mac_bytes, mtu=mtu, max_queues=queues)
        if isinstance(backend, NetBackend):
            if backend_options:
                raise ConfigError("backend options given with a ready backend object")
            self.backend = backend
        else:
            if not isinstance(backend, str):
                raise ConfigError(f"backend must be a string, not {backend!r}")
            cls = plugins.resolve(plugins.NET_BACKENDS, backend)
            try:
                self.backend = make_backend(cls, backend, backend_options)
            except BackendError as exc:
                raise ConfigError(str(exc)) from None
        self._nic: _Nic | None = None

    @property
    def offer(self) -> DeviceOffer:
        return DeviceOffer(
            self.if_type,
            self.instance,
            ring_size_hint=self.ring_size_hint,
            max_subchannels=self.config.max_queues - 1,
        )

    async def reset(self) -> None:
        self._nic = None

    def set_link(self, up: bool) -> bool:
        """Media connect/disconnect (what `vmbusd ctl ... nic link` will call): the
        guest gets an RNDIS INDICATE_STATUS through a control section. Returns
        whether a guest NIC was there to tell (the state is kept either way)."""
        self.config.connected = up
        nic = self._nic
        if nic is None or nic.rndis.state is not rn.State.INITIALIZED:
            return False
        status = rn.Status.MEDIA_CONNECT if up else rn.Status.MEDIA_DISCONNECT
        nic.control_out.append(rn.indicate_status(status))
        nic.queues[0].wakeup.set()
        return True

    async def serve(self, channel: Channel, ctx: DeviceContext) -> None:
        if ctx.sub_channel_index:
            await self._serve_subchannel(channel, ctx)
            return
        nic = _Nic(
            nv.NvspServer(max_subchannels=self.config.max_queues - 1),
            rn.RndisDevice(self.config),
            [_Queue(i) for i in range(self.config.max_queues)],
        )
        self._nic = nic
        info = NicInfo(self.config.mac, self.config.mtu, self.config.max_queues)
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(self.backend.run, info, nic.deliver_batch)
            except BackendError as exc:  # the host side is missing: this NIC cannot serve
                ctx.log.warning("netvsc backend %s: %s", self.backend.name, exc)
                raise
            self._open_queue(nic, 0, channel, nursery)
            while True:
                out: list[OutPacket] = []
                for pkt in await channel.receive():
                    out.extend(await self._handle(pkt, channel, ctx, nic, nursery))
                await channel.send(out)
                nic.queues[0].wakeup.set()

    def _open_queue(self, nic: _Nic, index: int, channel: Channel, nursery: trio.Nursery) -> None:
        channel.track_completions(
            lambda done: self._rx_completions(nic, done), max_in_flight=MAX_RX_IN_FLIGHT
        )
        nic.queues[index].channel = channel
        nursery.start_soon(self._receive_path, nic, nic.queues[index])

    async def _serve_subchannel(self, channel: Channel, ctx: DeviceContext) -> None:
        nic = self._nic
        if nic is None:
            raise GuestError("sub-channel opened before the primary")
        index = ctx.sub_channel_index
        if index >= len(nic.queues):
            raise GuestError(f"sub-channel {index} beyond {len(nic.queues)} queues")
        await nic.ready.wait()
        nvsp = nv.NvspServer.for_subchannel(nic.nvsp)
        queue = nic.queues[index]
        try:
            async with trio.open_nursery() as nursery:
                self._open_queue(nic, index, channel, nursery)
                while True:
                    out: list[OutPacket] = []
                    for pkt in await channel.receive():
                        out.extend(await self._rndis(pkt, nvsp, ctx, nic, primary=False))
                    await channel.send(out)
                    queue.wakeup.set()
        finally:
            queue.channel = None

    # -- guest -> host --

    async def _handle(
        self,
        pkt: Packet,
        channel: Channel,
        ctx: DeviceContext,
        nic: _Nic,
        nursery: trio.Nursery,
    ) -> list[OutPacket]:
        if pkt.type == PacketType.COMPLETION:
            return []  # not one of ours (ours are matched by the channel): ignored
        try:
            ev = nic.nvsp.receive(pkt.payload) if pkt.type == PacketType.INBAND else None
        except nv.NvspError as exc:
            return self._refuse(pkt, exc, ctx)
        if ev is None or isinstance(ev, nv.RndisPacket):
            return await self._rndis(pkt, nic.nvsp, ctx, nic, primary=True, event=ev)
        reply: bytes | None = None
        try:
            if isinstance(ev, nv.MapReceiveBuffer | nv.MapSendBuffer):
                receive = isinstance(ev, nv.MapReceiveBuffer)
                mapping = await self._map(ctx, nic, ev.gpadl_handle, nursery, receive=receive)
                if receive:
                    reply = nic.nvsp.receive_buffer_mapped(mapping.size)
                    nic.recv = mapping
                    layout = nic.nvsp.receive_layout
                    assert layout is not None
                    nic.free_control = list(range(CONTROL_SECTIONS))
                    nic.free_data = list(range(layout.count - 1, CONTROL_SECTIONS - 1, -1))
                else:
                    reply = nic.nvsp.send_buffer_mapped(mapping.size)
                    nic.send = mapping
                    nic.ready.set()
            elif isinstance(ev, nv.AllocateSubchannels):
                relids = await ctx.enable_subchannels(ev.granted)
                reply = nic.nvsp.subchannels_allocated(min(len(relids), ev.granted))
                nic.rndis.queues = 1 + nic.nvsp.subchannels
                if wants_completion(pkt):  # the table after the answer (Linux stores it)
                    table = nv.send_indirection_table(nic.rndis.queues)
                    return [completion_for(pkt, reply), inband(table)]
            elif isinstance(ev, nv.RevokeReceiveBuffer):
                nic.release_recv.set()
            elif isinstance(ev, nv.RevokeSendBuffer):
                nic.release_send.set()
            elif isinstance(ev, nv.Initialized | nv.NdisConfig | nv.SwitchDataPath | nv.OidQueryEx):
                reply = ev.reply
                if isinstance(ev, nv.NdisConfig):
                    nic.rndis.nvsp_version = nic.nvsp.version or 0
        except nv.NvspError as exc:
            return self._refuse(pkt, exc, ctx)
        if reply is not None and wants_completion(pkt):
            return [completion_for(pkt, reply)]
        return []

    async def _map(
        self, ctx: DeviceContext, nic: _Nic, handle: int, nursery: trio.Nursery, *, receive: bool
    ) -> GpadlMapping:
        try:
            mapping: GpadlMapping = await nursery.start(self._hold, ctx, nic, handle, receive)
        except GuestError as exc:
            raise nic.nvsp.buffer_map_failed(exc.reason) from None
        return mapping

    @staticmethod
    async def _hold(
        ctx: DeviceContext,
        nic: _Nic,
        handle: int,
        receive: bool,
        task_status: trio.TaskStatus[GpadlMapping] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Hold a buffer GPADL until the guest revokes the buffer or tears the GPADL
        down (then at once: its GPADL_TORNDOWN waits for us); afterwards the buffer
        is gone for the NIC, and nothing is written into it any more."""
        release = nic.release_recv if receive else nic.release_send
        async with ctx.gpadl(handle) as mapping:
            task_status.started(mapping)
            async with trio.open_nursery() as watch:
                watch.start_soon(_set_when, mapping.teardown_requested, release)
                await release.wait()
                watch.cancel_scope.cancel()
            if receive:
                nic.recv = None
                nic.free_data.clear()
                nic.free_control.clear()
            else:
                nic.send = None

    @staticmethod
    def _refuse(pkt: Packet, exc: nv.NvspError, ctx: DeviceContext) -> list[OutPacket]:
        if exc.reply is None:
            raise exc  # no answer in the protocol: the channel is reset
        ctx.log.info("refused: %s", exc.reason)
        return [completion_for(pkt, exc.reply)] if wants_completion(pkt) else []

    async def _rndis(
        self,
        pkt: Packet,
        nvsp: nv.NvspServer,
        ctx: DeviceContext,
        nic: _Nic,
        *,
        primary: bool,
        event: nv.RndisPacket | None = None,
    ) -> list[OutPacket]:
        """One SEND_RNDIS_PKT (inband with a section, or GPA direct): every RNDIS
        message in it, then its completion."""
        try:
            ev = event if event is not None else nvsp.receive(pkt.payload)
            if not isinstance(ev, nv.RndisPacket):
                raise nv.NvspError(f"{type(ev).__name__} in a GPA-direct packet")
            data = b""
            if ev.section is not None:
                if nic.send is None:
                    raise GuestError("send section without a mapped send buffer")
                data = bytes(nic.send.view[ev.offset : ev.offset + ev.length])
            if pkt.type == PacketType.GPA_DIRECT:
                ranges = ctx.memory.gpa_direct(pkt)  # every PFN checked to be guest RAM
                if ranges.total_bytes > rn.MAX_XFER_SIZE:
                    raise GuestError(f"GPA-direct send of {ranges.total_bytes} bytes")
                data += b"".join(bytes(v) for v in ctx.memory.iovecs_of(ranges))
        except nv.NvspError as exc:
            return self._refuse(pkt, exc, ctx)
        except GuestError as exc:  # the packet is unusable, the channel is fine: FAIL it
            failed = nv.NvspError(exc.reason, reply=nv.rndis_pkt_complete(nv.Status.FAIL))
            return self._refuse(pkt, failed, ctx)
        status = nv.Status.SUCCESS
        out: list[Frame] = []
        try:
            for msg_type, msg in rn.split_messages(data):
                if msg_type == rn.MsgType.PACKET:
                    max_frame = min(nvsp.mtu, self.config.mtu + rn.ETH_HLEN)
                    p = rn.parse_packet(msg, max_frame=max_frame)
                    frame = bytes(msg[p.data_start : p.data_start + p.data_len])
                    passed = partial_frame(frame, p, self.backend.offloads)
                    if passed is not None:  # the backend does the offload (tap: vnet header)
                        out.extend(passed)
                    else:
                        out.extend(Frame(f, p.vlan) for f in self._offload(frame, p))
                    nic.rndis.counters.xmit_ok += 1
                elif not primary:
                    raise rn.RndisError("RNDIS control on a sub-channel")
                else:
                    result = nic.rndis.control(msg)
                    if result.reply is not None:
                        nic.control_out.append(result.reply)
        except offload.OffloadError as exc:
            ctx.log.info("offload refused: %s", exc.reason)
            nic.rndis.counters.xmit_error += 1
            status = nv.Status.FAIL
        except rn.RndisError as exc:
            ctx.log.info("RNDIS refused: %s", exc.reason)
            nic.rndis.counters.xmit_error += 1
            if exc.reply is not None:
                nic.control_out.append(exc.reply)
            else:
                status = nv.Status.FAIL
        if out:
            self.backend.transmit(ctx.sub_channel_index, out)
        if wants_completion(pkt):
            return [completion_for(pkt, nvsp.rndis_complete(status))]
        return []

    @staticmethod
    def _offload(frame: bytes, p: rn.TxPacket) -> list[bytes]:
        """What the guest asked of us before the frame leaves: segmentation (which
        fills every checksum) or the checksums alone (pure Python for now)."""
        if p.lso is not None:
            return offload.segment(frame, p.lso)
        if p.checksum is not None:
            out = bytearray(frame)
            offload.fill_checksum(out, p.checksum)
            return [bytes(out)]
        return [frame]

    # -- host -> guest --

    @staticmethod
    def _rx_completions(nic: _Nic, done: list[CompletedRequest]) -> None:
        """The guest gave receive sections back (its completion's status is not
        ours to act on: Linux reports a bad range as FAIL and drops the frame)."""
        for c in done:
            section, control = cast(tuple[int, bool], c.context)
            (nic.free_control if control else nic.free_data).append(section)
        nic.wake()

    async def _receive_path(self, nic: _Nic, queue: _Queue) -> None:
        """Control replies (queue 0 only), then the frames steered to this queue, into
        free sections, indicated on this queue's channel. Woken by new frames, by each
        batch the channel handled and when sections come back."""
        assert queue.channel is not None
        channel = queue.channel
        while True:
            await queue.wakeup.wait()
            queue.wakeup = trio.Event()
            if queue.index == 0:
                await self._post(channel, nic, queue, control=True)
            await self._post(channel, nic, queue, control=False)

    async def _post(self, channel: Channel, nic: _Nic, queue: _Queue, *, control: bool) -> None:
        layout = nic.nvsp.receive_layout
        if layout is None or nic.recv is None:
            return
        view = nic.recv.view
        pkts: list[OutPacket] = []
        ctxs: list[Any] = []
        free = nic.free_control if control else nic.free_data
        take: Callable[[], bytes | None]
        if control:

            def take() -> bytes | None:
                return nic.control_out.pop(0) if nic.control_out else None

        else:

            def take() -> bytes | None:
                if not queue.frames:
                    return None
                frame, vlan, hash_value, hash_info = queue.frames.popleft()
                head = rn.packet_header(
                    len(frame),
                    rx_checksum=offload.rx_checksum_info(frame),
                    vlan=vlan,
                    hash_value=hash_value,
                    hash_info=hash_info,
                )
                return head + frame

        while free:
            msg = take()
            if msg is None:
                break
            if len(msg) > layout.section_size:
                nic.rndis.counters.rcv_error += 1
                continue
            section = free.pop()
            offset = section * layout.section_size
            view[offset : offset + len(msg)] = msg
            pkts.append(
                xfer_pages(
                    layout.buffer_id,
                    [(len(msg), offset)],
                    nv.rndis_pkt(nv.CHANNEL_TYPE_CONTROL if control else nv.CHANNEL_TYPE_DATA),
                )
            )
            ctxs.append((section, control))
            if not control:
                nic.rndis.counters.rcv_ok += 1
                queue.delivered += 1
        if pkts:
            await channel.post_requests(pkts, ctxs)
