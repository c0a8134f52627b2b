"""The netvsc VSP (host side): NVSP and RNDIS cores driven with trio, frames to and
from a network backend (backends/: loopback, tap, any `vmbusd.net_backends` entry).

On the primary channel: NVSP init (protocol.py) with the receive and send buffers
mapped through `ctx.gpadl`, each held by its own task and let go at once on revoke
or GPADL teardown; SEND_RNDIS_PKT from send-buffer sections and from GPA-direct
pages; RNDIS control (rndis.py) answered through receive-buffer sections (16 kept
for control) in transfer-page packets. SUBCHANNEL is granted through
`ctx.enable_subchannels` and followed by the send indirection table; every channel
carries transmits (completed on that channel) and its own receive path.

Python per batch, C per packet (fastpath.py: native/netvsc.c or its pure-Python
twins). Transmit: the RNDIS bytes of a whole ring batch are copied once and checked
and read in one call; each PACKET's frame is offloaded (checksum fill, LSO v2
segmentation) or handed on as a partial frame to a backend that takes them (tap),
and the batch goes to the backend in one `transmit`. Control messages and anything
the fast path does not accept take the Python slow path (rndis.py, offload.py),
which answers the guest as before. Receive: a backend batch is classified in one
call (the packet filter and multicast list the guest set, Toeplitz over its key and
indirection table), queued per queue, and written into receive sections in one call
(RNDIS header with checksum, VLAN and hash PPIs, then the frame); up to
RX_RANGES_PER_PACKET sections go in one `VM_PKT_DATA_USING_XFER_PAGES` packet (Linux
netvsc_receive walks every range, one RNDIS message per range of at most
recv_section_size bytes). The data sections are partitioned between the queues, as
Hyper-V does, so a queue whose guest stops returning sections drops its own frames
beyond RX_QUEUE_DEPTH (counted, OID_GEN_RCV_NO_BUFFER) and the others carry on.

The backend's own link changes (the impair backend's flaps) reach the guest as RNDIS
media status indications, as `vmbusd ctl ... nic link` does (`NetBackend.link_listener`).

Not yet (issue 10): receive segment coalescing (RSC), link indications from
`vmbusd ctl` in the same transfer-page packets as data.
"""

from __future__ import annotations

import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, cast

import trio

from devices.netvsc import fastpath, offload
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
RX_RANGES_PER_PACKET = 64  # RNDIS messages (ranges) in one transfer-page packet


MAX_MTU = 9000  # jumbo frames (without the Ethernet header)
MIN_MTU = 68


@dataclass
class _Queue:
    """One receive queue: its channel, its own receive sections, the frames steered
    to it, its wake-up."""

    index: int
    channel: Channel | None = None
    free: list[int] = field(default_factory=list)
    frames: deque[fastpath.RxFrame] = field(default_factory=deque)
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
    free_control: list[int] = field(default_factory=list)
    ready: trio.Event = field(default_factory=trio.Event)
    release_recv: trio.Event = field(default_factory=trio.Event)
    release_send: trio.Event = field(default_factory=trio.Event)
    control_out: list[bytes] = field(default_factory=list)
    filtered: int = 0  # frames dropped before the guest set a packet filter

    def wake(self) -> None:
        for q in self.queues:
            q.wakeup.set()

    run: int = 1  # data sections per queue (partition sets it)
    runs: int = 1  # queues the data sections are cut between

    def owner(self, section: int) -> _Queue:
        """The queue a data section belongs to: the data sections cut into one run
        per channel the guest has (1 + sub-channels granted), the last run taking
        the remainder."""
        return self.queues[min(self.runs - 1, (section - CONTROL_SECTIONS) // self.run)]

    def partition(self) -> None:
        """Hand the free data sections to their queues (after the receive buffer is
        mapped, and again when sub-channels are granted); sections in flight go to
        their owner when the guest returns them."""
        layout = self.nvsp.receive_layout
        self.runs = max(1, min(self.rndis.queues, len(self.queues)))
        data = (layout.count if layout is not None else CONTROL_SECTIONS) - CONTROL_SECTIONS
        self.run = max(1, data // self.runs)
        free = [s for q in self.queues for s in q.free]
        for q in self.queues:
            q.free = []
        for s in sorted(free, reverse=True):
            self.owner(s).free.append(s)

    def deliver_batch(self, frames: list[Frame]) -> None:
        """A batch from the backend (its `deliver`): the packet filter and steering
        for all of it in one call (fastpath.rx_classify), then each frame queued.

        Nothing goes to the guest before RNDIS is initialized and its packet filter
        is set (rndis_filter_open), as on Hyper-V: Linux 6.1's hv_netvsc takes a
        transfer-page packet that arrives while netvsc_init_buf still waits on the
        SEND_RECV_BUF completion with recv_section_size 0 and its receive-completion
        ring not yet allocated, logs "Packet too big" and writes through a NULL
        pointer in its interrupt handler (seen with a bridge's IPv6 multicast).
        Afterwards frames the filter does not pass (not to our MAC, a multicast not
        listed, ...) are dropped and counted (counters.rcv_filtered). Steering is
        Toeplitz over the guest's key, then its indirection table, to an open queue;
        a full queue drops, counted: that guest queue is not returning receive
        sections, the others carry on."""
        if not frames:
            return
        rndis = self.rndis
        if rndis.state is not rn.State.INITIALIZED or not rndis.packet_filter:
            self.filtered += len(frames)
            return
        verdicts = fastpath.rx_classify(
            [f.data for f in frames], rndis.packet_filter, rndis.current_mac, rndis.multicast,
            rndis.rss,
        )  # fmt: skip
        queues = self.queues
        for f, v in zip(frames, verdicts, strict=True):
            if not v.accept:
                rndis.counters.rcv_filtered += 1
                continue
            q = queues[0]
            if v.hash_value is not None and v.queue < len(queues):
                if queues[v.queue].channel is not None:
                    q = queues[v.queue]
            if len(q.frames) >= RX_QUEUE_DEPTH:
                q.dropped += 1
                rndis.counters.rcv_no_buffer += 1
                continue
            vlan = None if f.vlan is None else f.vlan.value()
            q.frames.append(fastpath.RxFrame(f.data, vlan, v.hash_value, v.hash_info))
            q.wakeup.set()

    def deliver(self, frame: bytes, vlan: rn.Vlan | None = None) -> None:
        """One frame from the backend (deliver_batch of one)."""
        self.deliver_batch([Frame(frame, vlan)])


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
        self.backend.link_listener = self.set_link
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
                sends: list[_Send] = []
                for pkt in await channel.receive():
                    done = await self._handle(pkt, channel, ctx, nic, nursery)
                    if isinstance(done, _Send):
                        sends.append(done)
                    else:
                        out.extend(done)
                if sends:
                    out.extend(self._transmit(sends, nic.nvsp, ctx, nic, primary=True))
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
                    sends: list[_Send] = []
                    for pkt in await channel.receive():
                        done = self._gather(pkt, nvsp, ctx, nic)
                        if isinstance(done, _Send):
                            sends.append(done)
                        else:
                            out.extend(done)
                    if sends:
                        out.extend(self._transmit(sends, nvsp, ctx, nic, primary=False))
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
    ) -> list[OutPacket] | _Send:
        if pkt.type == PacketType.COMPLETION:
            return []  # not one of ours (ours are matched by the channel): ignored
        try:
            ev = nic.nvsp.receive(pkt.payload) if pkt.type == PacketType.INBAND else None
        except nv.NvspError as exc:
            return self._refuse(pkt, exc, ctx)
        if ev is None or isinstance(ev, nv.RndisPacket):
            return self._gather(pkt, nic.nvsp, ctx, nic, event=ev)
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
                    for q in nic.queues:
                        q.free = []
                    nic.queues[0].free = list(range(CONTROL_SECTIONS, layout.count))
                    nic.partition()
                else:
                    reply = nic.nvsp.send_buffer_mapped(mapping.size)
                    nic.send = mapping
                    nic.ready.set()
            elif isinstance(ev, nv.AllocateSubchannels):
                relids = await ctx.enable_subchannels(ev.granted)
                reply = nic.nvsp.subchannels_allocated(min(len(relids), ev.granted))
                nic.rndis.queues = 1 + nic.nvsp.subchannels
                nic.partition()  # each queue its own receive sections
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
                for q in nic.queues:
                    q.free.clear()
                nic.free_control.clear()
            else:
                nic.send = None

    @staticmethod
    def _refuse(pkt: Packet, exc: nv.NvspError, ctx: DeviceContext) -> list[OutPacket]:
        if exc.reply is None:
            raise exc  # no answer in the protocol: the channel is reset
        ctx.log.info("refused: %s", exc.reason)
        return [completion_for(pkt, exc.reply)] if wants_completion(pkt) else []

    def _gather(
        self,
        pkt: Packet,
        nvsp: nv.NvspServer,
        ctx: DeviceContext,
        nic: _Nic,
        *,
        event: nv.RndisPacket | None = None,
    ) -> list[OutPacket] | _Send:
        """One SEND_RNDIS_PKT (inband with a section, or GPA direct): its RNDIS bytes
        copied once out of guest memory (from here on nothing reads the guest's pages),
        or the NVSP answer refusing it."""
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
        return _Send(pkt, data)

    def _transmit(
        self,
        sends: list[_Send],
        nvsp: nv.NvspServer,
        ctx: DeviceContext,
        nic: _Nic,
        *,
        primary: bool,
    ) -> list[OutPacket]:
        """A batch of SEND_RNDIS_PKTs: every RNDIS message checked and read in one
        fastpath call; the frames of the NVSP messages it accepts offloaded here, the
        others (control, or refused) through the Python slow path; all the batch's
        frames to the backend in one `transmit`; the completions."""
        index: list[tuple[int, int]] = []
        pos = 0
        for snd in sends:
            index.append((pos, len(snd.data)))
            pos += len(snd.data)
        buf = b"".join(snd.data for snd in sends)
        max_frame = min(nvsp.mtu, self.config.mtu + rn.ETH_HLEN)
        results = fastpath.tx_parse(buf, index, max_frame)
        frames: list[Frame] = []
        out: list[OutPacket] = []
        view = memoryview(buf)
        counters = nic.rndis.counters
        for snd, res, (start, length) in zip(sends, results, index, strict=True):
            fast = self._fast_frames(buf, res.pkts) if res.status == fastpath.OK else None
            status: int = nv.Status.SUCCESS
            if fast is not None:
                frames.extend(fast)
                counters.xmit_ok += len(res.pkts)
            else:
                status = self._rndis_slow(
                    view[start : start + length], max_frame, ctx, nic, frames, primary=primary
                )
            if wants_completion(snd.pkt):
                out.append(completion_for(snd.pkt, nvsp.rndis_complete(status)))
        if frames:
            self.backend.transmit(ctx.sub_channel_index, frames)
        return out

    def _fast_frames(self, buf: bytes, pkts: list[fastpath.TxPkt]) -> list[Frame] | None:
        """The frames of one NVSP message's checked PACKETs, offloads done (native
        checksum fill and segmentation) or handed to a backend that takes them; None
        when an offload is refused: the slow path then gives the guest its answer."""
        offloads = self.backend.offloads
        partial_ok = offloads.tx_checksum or offloads.tx_lso
        out: list[Frame] = []
        for p in pkts:
            frame = buf[p.data_off : p.data_off + p.data_len]
            vlan = rn.vlan_of(p.vlan) if p.flags & fastpath.HAS_VLAN else None
            if partial_ok and (p.lso or p.csum):
                tx = rn.TxPacket(
                    0,
                    p.data_len,
                    rn.tx_checksum_of(p.csum, p.data_len),
                    rn.lso_of(p.lso, p.data_len) if p.lso else None,
                    vlan,
                )
                try:
                    passed = partial_frame(frame, tx, offloads)
                except offload.OffloadError:
                    return None
                if passed is not None:  # the backend does the offload (tap: vnet header)
                    out.extend(passed)
                    continue
            if p.lso:
                segs = fastpath.lso_segment(frame, p.lso)
                if segs is None:
                    return None
                out.extend(Frame(seg, vlan) for seg in segs)
            elif p.csum:
                filled = bytearray(frame)
                if not fastpath.csum_fill(filled, p.csum):
                    return None
                out.append(Frame(bytes(filled), vlan))
            else:
                out.append(Frame(frame, vlan))
        return out

    def _rndis_slow(
        self,
        data: memoryview,
        max_frame: int,
        ctx: DeviceContext,
        nic: _Nic,
        frames: list[Frame],
        *,
        primary: bool,
    ) -> int:
        """One NVSP message's RNDIS bytes through the reference code (rndis.py,
        offload.py): control messages, and everything the fast path refused, which
        gets the guest's answer and the log line it always got. Frames before a
        refused PACKET still leave (as they always did). Returns the NVSP status."""
        status = nv.Status.SUCCESS
        try:
            for msg_type, msg in rn.split_messages(data):
                if msg_type == rn.MsgType.PACKET:
                    p = rn.parse_packet(msg, max_frame=max_frame)
                    frame = bytes(msg[p.data_start : p.data_start + p.data_len])
                    passed = partial_frame(frame, p, self.backend.offloads)
                    if passed is not None:  # the backend does the offload (tap: vnet header)
                        frames.extend(passed)
                    else:
                        frames.extend(Frame(f, p.vlan) for f in self._offload(frame, p))
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
        return status

    @staticmethod
    def _offload(frame: bytes, p: rn.TxPacket) -> list[bytes]:
        """What the guest asked of us before the frame leaves, in the reference code:
        segmentation (which fills every checksum) or the checksums alone."""
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
        ours to act on: Linux reports a bad range as FAIL and drops the frame); each
        data section goes back to the queue that owns it now."""
        for c in done:
            sections, control = cast(tuple[tuple[int, ...], bool], c.context)
            if control:
                nic.free_control.extend(sections)
            else:
                for section in sections:
                    nic.owner(section).free.append(section)
        nic.wake()

    async def _receive_path(self, nic: _Nic, queue: _Queue) -> None:
        """Control replies (queue 0 only), then the frames steered to this queue, into
        its free sections, indicated on this queue's channel. Woken by new frames, by
        each batch the channel handled and when sections come back."""
        assert queue.channel is not None
        channel = queue.channel
        while True:
            await queue.wakeup.wait()
            queue.wakeup = trio.Event()
            if queue.index == 0:
                await self._post_control(channel, nic)
            await self._post_data(channel, nic, queue)

    async def _post_control(self, channel: Channel, nic: _Nic) -> None:
        """RNDIS control replies and indications, one per transfer-page packet (as
        Linux's rndis_filter_receive expects a completion per request)."""
        layout = nic.nvsp.receive_layout
        if layout is None or nic.recv is None:
            return
        view = nic.recv.view
        pkts: list[OutPacket] = []
        ctxs: list[Any] = []
        while nic.free_control and nic.control_out:
            msg = nic.control_out.pop(0)
            if len(msg) > layout.section_size:
                nic.rndis.counters.rcv_error += 1
                continue
            section = nic.free_control.pop()
            offset = section * layout.section_size
            view[offset : offset + len(msg)] = msg
            rndis = nv.rndis_pkt(nv.CHANNEL_TYPE_CONTROL)
            pkts.append(xfer_pages(layout.buffer_id, [(len(msg), offset)], rndis))
            ctxs.append(((section,), True))
        if pkts:
            await channel.post_requests(pkts, ctxs)

    async def _post_data(self, channel: Channel, nic: _Nic, queue: _Queue) -> None:
        """As many queued frames as the queue has free sections, built in one
        fastpath call, RX_RANGES_PER_PACKET sections to a transfer-page packet."""
        layout = nic.nvsp.receive_layout
        recv = nic.recv
        if layout is None or recv is None:
            return
        n = min(len(queue.free), len(queue.frames))
        if not n:
            return
        size = layout.section_size
        batch = [queue.frames.popleft() for _ in range(n)]
        sections = [queue.free.pop() for _ in range(n)]
        lens = fastpath.rx_build(recv.view, batch, [s * size for s in sections], size)
        ranges: list[tuple[int, int]] = []
        used: list[int] = []
        for section, length in zip(sections, lens, strict=True):
            if length:
                ranges.append((length, section * size))
                used.append(section)
            else:  # larger than a section: never the case for frames within the MTU
                nic.rndis.counters.rcv_error += 1
                queue.free.append(section)
        if not used:
            return
        rndis = nv.rndis_pkt(nv.CHANNEL_TYPE_DATA)
        pkts: list[OutPacket] = []
        ctxs: list[Any] = []
        for i in range(0, len(used), RX_RANGES_PER_PACKET):
            pkts.append(xfer_pages(layout.buffer_id, ranges[i : i + RX_RANGES_PER_PACKET], rndis))
            ctxs.append((tuple(used[i : i + RX_RANGES_PER_PACKET]), False))
        nic.rndis.counters.rcv_ok += len(used)
        queue.delivered += len(used)
        await channel.post_requests(pkts, ctxs)


@dataclass(frozen=True)
class _Send:
    """One SEND_RNDIS_PKT's RNDIS bytes, copied out of guest memory, and its packet."""

    pkt: Packet
    data: bytes
