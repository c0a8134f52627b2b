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

import secrets
import struct
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

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
from devices.netvsc.restart import (
    MASK_BITS,
    POST_GROUP,
    PostRecord,
    Sections,
    check_state,
    journal_offset,
    load_nic,
    open_nonce,
    save_nic,
    section_id,
    set_open_nonce,
)
from vmbus import plugins
from vmbus.channel import Channel
from vmbus.device import (
    INFLIGHT_SLOT_SIZE,
    Device,
    DeviceContext,
    DeviceOffer,
    GpadlMapping,
    GuestError,
)
from vmbus.journal import JournalError, Pending, RequestJournal
from vmbus.packet import (
    PacketType,
    completion,
    completion_for,
    inband,
    packet_types_mask,
    wants_completion,
    xfer_pages,
)
from vmbus.ring import OutPacket, Packet, packet_ring_bytes

NETVSC_IF_TYPE = uuid.UUID("f8615163-df3e-46c5-913f-f2d2f965ed0e")  # HV_NIC_GUID
CONTROL_SECTIONS = 16  # receive sections kept for control replies and indications
RX_QUEUE_DEPTH = 1024  # frames queued towards one guest queue before drops
RX_RANGES_PER_PACKET = MASK_BITS  # RNDIS messages (ranges) in one transfer-page packet
JOURNAL_ENTRY = 192  # a journal entry: 160 bytes of the packet (a control GPA-direct fits)
_DESC = struct.Struct("<HHHHQ")
_U32 = struct.Struct("<I")


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
    recv_handle: int | None = None  # the buffers' GPADLs (saved: a resume maps them again)
    send_handle: int | None = None
    # The receive sections in the guest's hands (restart.Sections), in `slot`: the
    # primary channel's in-flight slot, or private memory without restart support.
    sections: Sections | None = None
    slot: memoryview | bytearray | None = None
    changes: int = 0  # negotiation steps taken (NVSP, RNDIS control, link) ...
    saved: int = 0  # ... and how many of them a saved state holds
    replaying: bool = False  # running a dead vmbusd's requests again (resume)
    nonce: int = 0  # this open of the primary channel (restart.open_nonce)
    sections_bad_logged: bool = False

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

    @property
    def section_count(self) -> int:
        """Receive sections in use (the layout's, capped by the in-flight bitmap)."""
        return self.sections.count if self.sections is not None else CONTROL_SECTIONS

    def init_free(self, busy: set[int]) -> None:
        """Every section of the receive buffer free but `busy` (the guest holds them:
        they come back with its completions), partitioned between the queues."""
        count = self.section_count
        self.free_control = [s for s in range(CONTROL_SECTIONS) if s not in busy]
        for q in self.queues:
            q.free = []
        self.queues[0].free = [s for s in range(CONTROL_SECTIONS, count) if s not in busy]
        self.partition()

    def release(self, trans_ids: Iterable[int]) -> int:
        """The guest completed these transfer-page packets: their sections go back
        (control ones to the control pool, data ones to the queue that owns them
        now). Returns how many ids named no section in the guest's hands."""
        bad = 0
        for tid in trans_ids:
            secs = self.sections.release(tid) if self.sections is not None else None
            if secs is None:
                bad += 1
                continue
            for s in secs:
                if s < CONTROL_SECTIONS:
                    self.free_control.append(s)
                else:
                    self.owner(s).free.append(s)
        self.wake()
        return bad

    def partition(self) -> None:
        """Hand the free data sections to their queues (after the receive buffer is
        mapped, and again when sub-channels are granted); sections in flight go to
        their owner when the guest returns them."""
        self.runs = max(1, min(self.rndis.queues, len(self.queues)))
        data = self.section_count - CONTROL_SECTIONS
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
    restartable = True  # save/restore, the receive sections' bitmap, the journal

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

    # -- restart (docs/attach-protocol.md#restart; devices/netvsc/restart.py) --

    def save(self) -> object:
        """The link state and everything the guest negotiated (restart.save_nic)."""
        out: dict[str, object] = {"v": 1, "link": self.config.connected}
        nic = self._nic
        if nic is not None:
            # the handles, not the mappings: a resumed NIC saved before its task has
            # mapped them again still has them
            out["nic"] = save_nic(nic.nvsp, nic.rndis, nic.recv_handle, nic.send_handle, nic.nonce)
        return out

    def restore(self, state: object) -> None:
        """Take the state back (checked as hostile: restart.load_nic); the primary
        channel's `serve` then maps the buffers again instead of waiting for the
        guest to negotiate."""
        link, nic_state = check_state(state, self.config)
        nic = None
        if nic_state is not None:
            nvsp, rndis, recv, send, nonce = load_nic(nic_state, self.config)
            nic = _Nic(nvsp, rndis, [_Queue(i) for i in range(self.config.max_queues)])
            nic.recv_handle, nic.send_handle, nic.nonce = recv, send, nonce
        self.config.connected = link
        self._nic = nic

    def set_link(self, up: bool) -> bool:
        """Media connect/disconnect (what `vmbusd ctl ... nic link` will call): the
        guest gets an RNDIS INDICATE_STATUS through a control section (after a saved
        state holds the new link state). Returns whether a guest NIC was there to
        tell (the state is kept either way)."""
        self.config.connected = up
        nic = self._nic
        if nic is None or nic.rndis.state is not rn.State.INITIALIZED:
            return False
        status = rn.Status.MEDIA_CONNECT if up else rn.Status.MEDIA_DISCONNECT
        nic.changes += 1
        nic.control_out.append(rn.indicate_status(status))
        nic.queues[0].wakeup.set()
        return True

    @staticmethod
    async def _persist(nic: _Nic, ctx: DeviceContext) -> None:
        """Before the guest hears of a negotiation step: a saved state holding it
        (one for all the steps taken so far; nothing when none is new)."""
        gen = nic.changes
        if nic.saved >= gen:
            return
        await ctx.save_state()
        nic.saved = max(nic.saved, gen)

    def _journal(self, ctx: DeviceContext) -> tuple[RequestJournal | None, list[Pending]]:
        """The channel's request journal (restart support only): fresh for a channel
        the guest just opened, the last vmbusd's with what it left undone otherwise."""
        slot, rings = ctx.inflight, ctx.rings
        if slot is None or rings is None:
            return None, []
        area = slot[journal_offset(len(slot)) :]
        if ctx.resumed:
            try:
                return RequestJournal.resume(
                    area, rings, entry_size=JOURNAL_ENTRY, copy=True, log=ctx.log
                )
            except JournalError as exc:
                ctx.log.warning("netvsc: %s: a fresh journal", exc)
        return RequestJournal.attach(area, rings, entry_size=JOURNAL_ENTRY, copy=True), []

    async def serve(self, channel: Channel, ctx: DeviceContext) -> None:
        """One channel: the primary negotiates (or, resumed, maps the buffers the
        guest negotiated with the last vmbusd), every channel transmits and
        receives. Packets are taken through the channel's journal when the session
        has restart support, so each SEND_RNDIS_PKT is completed exactly once."""
        index = ctx.sub_channel_index
        slot: memoryview | bytearray = (
            ctx.inflight if ctx.inflight is not None else bytearray(INFLIGHT_SLOT_SIZE)
        )
        nic = self._nic if index else self._primary_nic(ctx, slot)
        if nic is None:
            raise GuestError("sub-channel opened before the primary")
        if index >= len(nic.queues):
            raise GuestError(f"sub-channel {index} beyond {len(nic.queues)} queues")
        post = PostRecord(slot, ctx.rings if ctx.inflight is not None else None)
        if not ctx.resumed:
            post.clear()
        journal, pending = self._journal(ctx)
        queue = nic.queues[index]
        try:
            async with trio.open_nursery() as nursery:
                if not index:
                    nic.slot = slot
                    info = NicInfo(self.config.mac, self.config.mtu, self.config.max_queues)
                    try:
                        await nursery.start(self.backend.run, info, nic.deliver_batch)
                    except BackendError as exc:  # the host side is missing: cannot serve
                        ctx.log.warning("netvsc backend %s: %s", self.backend.name, exc)
                        raise
                    if ctx.resumed:
                        await self._resume_buffers(ctx, nic, post, nursery)
                    nvsp = nic.nvsp
                else:
                    await nic.ready.wait()
                    if nic.nvsp.phase is not nv.Phase.READY:  # revoked: the guest is leaving
                        await trio.sleep_forever()
                    nvsp = nv.NvspServer.for_subchannel(nic.nvsp)
                    if ctx.resumed:
                        nic.release(post.unpublished(ctx.log))
                queue.channel = channel
                nursery.start_soon(self._receive_path, nic, queue, ctx, post)
                if pending:
                    await self._replay(pending, channel, ctx, nic, nvsp, journal, post, nursery)
                while True:
                    if journal is None:
                        batch = await channel.receive()
                        entries = [-1] * len(batch)
                    else:
                        batch, entries = await journal.receive(channel, channel.max_batch)
                    await self._batch(
                        list(zip(batch, entries, strict=True)),
                        channel,
                        ctx,
                        nic,
                        nvsp,
                        journal,
                        post,
                        nursery,
                    )
        finally:
            if index:
                queue.channel = None

    def _primary_nic(self, ctx: DeviceContext, slot: memoryview | bytearray) -> _Nic:
        """The NIC state the primary channel serves: the restored one when it belongs
        to this open of the channel (the slot's nonce says so), else a fresh one (a
        state saved between the guest's open and its task's start is an earlier
        open's, which the guest closed)."""
        nic = self._nic
        if ctx.resumed and nic is not None and nic.nonce and nic.nonce == open_nonce(slot):
            return nic
        if ctx.resumed and nic is not None:
            ctx.log.info("netvsc: the saved NIC state is an earlier open's: not used")
        nic = _Nic(
            nv.NvspServer(max_subchannels=self.config.max_queues - 1),
            rn.RndisDevice(self.config),
            [_Queue(i) for i in range(self.config.max_queues)],
        )
        nic.nonce = secrets.randbits(32) or 1
        set_open_nonce(slot, nic.nonce)
        self._nic = nic
        return nic

    async def _resume_buffers(
        self, ctx: DeviceContext, nic: _Nic, post: PostRecord, nursery: trio.Nursery
    ) -> None:
        """A resumed primary: hold the buffers' GPADLs again; the receive sections
        the guest still holds (the slot's bitmap, less what the last vmbusd never
        published) stay out of use until the guest completes them."""
        layout = nic.nvsp.receive_layout
        if nic.recv_handle is not None and layout is not None:
            try:
                nic.recv = await nursery.start(self._hold, ctx, nic, nic.recv_handle, True)
            except GuestError as exc:  # the guest was tearing it down: gone, as it would be
                ctx.log.info("netvsc resumed without its receive buffer: %s", exc.reason)
                nic.recv_handle = None
                layout = None
        if nic.recv_handle is not None and layout is not None:
            assert nic.slot is not None
            nic.sections = Sections(nic.slot, layout.count)
            if nic.sections.matches(nic.recv_handle):
                busy = nic.sections.busy()
            else:
                ctx.log.warning("netvsc: no record of the receive sections: all taken as free")
                nic.sections.reset(nic.recv_handle)
                busy = set()
            nic.init_free(busy)
            unpublished = post.unpublished(ctx.log)
            nic.release(unpublished)
            ctx.log.info(
                "netvsc resumed: %d receive section(s) in the guest's hands, %d never sent",
                len(busy),
                len(unpublished),
            )
        if nic.send_handle is not None and nic.nvsp.send_layout is not None:
            try:
                nic.send = await nursery.start(self._hold, ctx, nic, nic.send_handle, False)
            except GuestError as exc:
                ctx.log.info("netvsc resumed without its send buffer: %s", exc.reason)
                nic.send_handle = None
                return
            nic.ready.set()

    async def _replay(
        self,
        pending: list[Pending],
        channel: Channel,
        ctx: DeviceContext,
        nic: _Nic,
        nvsp: nv.NvspServer,
        journal: RequestJournal | None,
        post: PostRecord,
        nursery: trio.Nursery,
    ) -> None:
        """What the last vmbusd took off the ring and did not complete, each
        completed once now: a kept answer is sent as it is; a control request runs
        again (idempotently: the saved state may already hold its effect); a data
        send is completed without its frames (frames may be lost at a crash)."""
        items: list[tuple[Packet, int]] = []
        out: list[OutPacket] = []
        out_e: list[int] = []
        for p in pending:
            if p.reply is not None:
                out.append(completion(p.trans_id, p.reply))
                out_e.append(p.entry)
                continue
            pkt = _packet_of(p.packet or b"")
            if pkt is None or p.truncated:
                # Only a data send has packets this long (a GPA-direct frame): lost.
                done = _packet_desc(p.packet or b"")
                if done is not None and done[1] & 1 and done[0] == PacketType.GPA_DIRECT:
                    out.append(completion(p.trans_id, nv.rndis_pkt_complete(nv.Status.SUCCESS)))
                    out_e.append(p.entry)
                elif journal is not None:
                    journal.drop(p.entry)
                continue
            if _is_data_send(pkt):
                if wants_completion(pkt):
                    out.append(completion_for(pkt, nv.rndis_pkt_complete(nv.Status.SUCCESS)))
                    out_e.append(p.entry)
                elif journal is not None:
                    journal.drop(p.entry)
                continue
            items.append((pkt, p.entry))
        ctx.log.info(
            "netvsc resumed: %d request(s) the last vmbusd left: %d completed, %d run again",
            len(pending),
            len(out),
            len(items),
        )
        if out:
            await self._complete(channel, journal, out_e, out)
        nic.replaying = True
        try:
            await self._batch(items, channel, ctx, nic, nvsp, journal, post, nursery)
        finally:
            nic.replaying = False

    @staticmethod
    async def _complete(
        channel: Channel,
        journal: RequestJournal | None,
        entries: list[int],
        packets: list[OutPacket],
    ) -> None:
        if journal is None:
            await channel.send(packets)
        else:
            await journal.send_completions(channel, entries, packets)

    async def _batch(
        self,
        items: list[tuple[Packet, int]],
        channel: Channel,
        ctx: DeviceContext,
        nic: _Nic,
        nvsp: nv.NvspServer,
        journal: RequestJournal | None,
        post: PostRecord,
        nursery: trio.Nursery,
    ) -> None:
        """One ring batch (packet, journal entry): receive completions give sections
        back, NVSP control is answered, sends are transmitted together. Then a saved
        state if the guest negotiated something, RNDIS replies into control sections,
        and last the completions (exactly once, through the journal)."""
        primary = not ctx.sub_channel_index
        out: list[OutPacket] = []
        out_e: list[int] = []
        sends: list[_Send] = []
        send_e: list[int] = []
        drops: list[int] = []
        bad = 0
        for pkt, e in items:
            if pkt.type == PacketType.COMPLETION:  # the guest gave receive sections back
                # Forget the entry first, then free the sections: a crash in between
                # loses them (never completed again), the other order could free
                # sections a resumed vmbusd has handed out again since.
                if journal is not None and e >= 0:
                    journal.drop(e)
                bad += nic.release((pkt.trans_id,))
                continue
            if primary:
                done = await self._handle(pkt, channel, ctx, nic, nursery)
            else:
                done = self._gather(pkt, nvsp, ctx, nic)
            if isinstance(done, _Send):
                sends.append(done)
                send_e.append(e)
                continue
            used = False
            for op in done:
                mine = not used and op.type == PacketType.COMPLETION and op.trans_id == pkt.trans_id
                used = used or mine
                out.append(op)
                out_e.append(e if mine else -1)
            if not used:
                drops.append(e)
        if bad and not nic.sections_bad_logged:
            nic.sections_bad_logged = True
            ctx.log.warning(
                "netvsc: %d receive completion(s) named sections the guest does not "
                "hold: ignored (further ones only counted)",
                bad,
            )
        frames: list[Frame] = []
        if sends:
            replies = self._transmit(sends, nvsp, ctx, nic, frames, primary=primary)
            for e, reply in zip(send_e, replies, strict=True):
                if reply is None:
                    drops.append(e)
                else:
                    out.append(reply)
                    out_e.append(e)
        await self._persist(nic, ctx)
        if journal is not None:
            for e in drops:
                if e >= 0:
                    journal.drop(e)
        if primary and nic.control_out:  # the RNDIS reply before the NVSP completion
            await self._post_control(channel, nic, post)
        if out:
            await self._complete(channel, journal, out_e, out)
        if frames:  # after the completions: a bounced frame never overtakes its send's
            self.backend.transmit(ctx.sub_channel_index, frames)
        nic.queues[ctx.sub_channel_index].wakeup.set()

    # -- guest -> host --

    async def _handle(
        self,
        pkt: Packet,
        channel: Channel,
        ctx: DeviceContext,
        nic: _Nic,
        nursery: trio.Nursery,
    ) -> list[OutPacket] | _Send:
        if nic.replaying and pkt.type == PacketType.INBAND:
            again = self._answered_before(pkt, nic)
            if again is not None:
                return again
        try:
            ev = nic.nvsp.receive(pkt.payload) if pkt.type == PacketType.INBAND else None
        except nv.NvspError as exc:
            return self._refuse(pkt, exc, ctx)
        if ev is None or isinstance(ev, nv.RndisPacket):
            return self._gather(pkt, nic.nvsp, ctx, nic, event=ev)
        nic.changes += 1  # a negotiation step: saved before the guest hears of it
        reply: bytes | None = None
        try:
            if isinstance(ev, nv.MapReceiveBuffer | nv.MapSendBuffer):
                receive = isinstance(ev, nv.MapReceiveBuffer)
                mapping = await self._map(ctx, nic, ev.gpadl_handle, nursery, receive=receive)
                if receive:
                    reply = nic.nvsp.receive_buffer_mapped(mapping.size)
                    nic.recv = mapping
                    nic.recv_handle = ev.gpadl_handle
                    layout = nic.nvsp.receive_layout
                    assert layout is not None and nic.slot is not None
                    nic.sections = Sections(nic.slot, layout.count)
                    nic.sections.reset(ev.gpadl_handle)
                    nic.init_free(set())
                else:
                    reply = nic.nvsp.send_buffer_mapped(mapping.size)
                    nic.send = mapping
                    nic.send_handle = ev.gpadl_handle
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

    @staticmethod
    def _answered_before(pkt: Packet, nic: _Nic) -> list[OutPacket] | None:
        """Resume: a request the last vmbusd may have applied (and saved) without
        completing: the answer it gave, where running it again would be refused as a
        repeat (INIT, the NDIS messages, the buffers); None: run it as usual."""
        data = bytes(pkt.payload[: nv.NVSP_MESSAGE_SIZE])
        if len(data) < 4:
            return None
        (msg_type,) = _U32.unpack_from(data)
        n = nic.nvsp
        reply: bytes | None
        if msg_type == nv.Msg.INIT and n.phase is not nv.Phase.AWAIT_INIT:
            reply = nv.init_complete(nv.Status.SUCCESS, version=n.version)
        elif msg_type == nv.Msg.SEND_NDIS_VER and n.ndis_version is not None:
            reply = None
        elif msg_type == nv.Msg.SEND_NDIS_CONFIG and n.ndis_config_seen:
            reply = None
        elif msg_type == nv.Msg.SEND_RECV_BUF and n.receive_layout is not None:
            reply = nv.recv_buf_complete(nv.Status.SUCCESS, n.receive_layout)
        elif msg_type == nv.Msg.SEND_SEND_BUF and n.send_layout is not None:
            reply = nv.send_buf_complete(nv.Status.SUCCESS, n.send_layout.section_size)
        elif msg_type == nv.Msg.REVOKE_RECV_BUF and n.receive_layout is None:
            reply = None
        elif msg_type == nv.Msg.REVOKE_SEND_BUF and n.send_layout is None:
            reply = None
        else:
            return None
        return [completion_for(pkt, reply)] if reply is not None and wants_completion(pkt) else []

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
                nic.recv = nic.recv_handle = None
                for q in nic.queues:
                    q.free.clear()
                nic.free_control.clear()
            else:
                nic.send = nic.send_handle = None

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
        frames: list[Frame],
        *,
        primary: bool,
    ) -> list[OutPacket | None]:
        """A batch of SEND_RNDIS_PKTs: every RNDIS message checked and read in one
        fastpath call; the frames of the NVSP messages it accepts offloaded here, the
        others (control, or refused) through the Python slow path; all the batch's
        frames into `frames` (for the backend, in one `transmit`); each send's
        completion (None for a send that asked for none)."""
        index: list[tuple[int, int]] = []
        pos = 0
        for snd in sends:
            index.append((pos, len(snd.data)))
            pos += len(snd.data)
        buf = b"".join(snd.data for snd in sends)
        max_frame = min(nvsp.mtu, self.config.mtu + rn.ETH_HLEN)
        results = fastpath.tx_parse(buf, index, max_frame)
        out: list[OutPacket | None] = []
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
            wanted = wants_completion(snd.pkt)
            out.append(completion_for(snd.pkt, nvsp.rndis_complete(status)) if wanted else None)
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
                    nic.changes += 1  # saved before the guest hears the reply
                    again = self._initialized_before(msg, nic)
                    result = nic.rndis.control(msg) if again is None else again
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
    def _initialized_before(msg: memoryview, nic: _Nic) -> rn.ControlResult | None:
        """Resume: an INITIALIZE (or HALT) the last vmbusd applied (and saved)
        without answering gets the answer it would have had, not a refusal."""
        if not nic.replaying or len(msg) < 12:
            return None
        msg_type, _len, req_id = struct.unpack_from("<III", msg)
        state = nic.rndis.state
        if msg_type == rn.MsgType.INITIALIZE and state is rn.State.INITIALIZED:
            return rn.ControlResult(nic.rndis.init_cmplt(req_id, rn.Status.SUCCESS))
        if msg_type == rn.MsgType.HALT and state is rn.State.HALTED:
            return rn.ControlResult(None)
        return None

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

    async def _receive_path(
        self, nic: _Nic, queue: _Queue, ctx: DeviceContext, post: PostRecord
    ) -> None:
        """Control replies (queue 0 only: after a saved state holds what they
        answer), then the frames steered to this queue, into its free sections,
        indicated on this queue's channel. Woken by new frames, by each batch the
        channel handled and when sections come back."""
        assert queue.channel is not None
        channel = queue.channel
        while True:
            await queue.wakeup.wait()
            queue.wakeup = trio.Event()
            if queue.index == 0 and nic.control_out:
                await self._persist(nic, ctx)
                await self._post_control(channel, nic, post)
            await self._post_data(channel, nic, queue, post)

    @staticmethod
    async def _publish(
        channel: Channel, nic: _Nic, post: PostRecord, pkts: list[OutPacket]
    ) -> None:
        """Transfer-page packets to the guest, POST_GROUP at a time (and at most half
        the ring, so the span a resume reads back never wraps): each group's
        sections marked in the guest's hands and its ids recorded, with the send
        lock held, right before it is written (restart.PostRecord)."""
        sections = nic.sections
        assert sections is not None
        limit = post.rings.downstream_size // 2 if post.rings is not None else 1 << 62
        i = 0
        while i < len(pkts):
            j, size = i, 0
            while j < len(pkts) and j - i < POST_GROUP:
                size += packet_ring_bytes(sum(memoryview(b).nbytes for b in pkts[j].body))
                if j > i and size > limit:
                    break
                j += 1
            group, i = pkts[i:j], j
            ids = [p.trans_id for p in group]

            def before(ids: list[int] = ids) -> None:
                post.before(ids)
                sections.mark(ids)

            await channel.send(group, before=before)
            post.done(ids)

    async def _post_control(self, channel: Channel, nic: _Nic, post: PostRecord) -> None:
        """RNDIS control replies and indications, one per transfer-page packet (as
        Linux's rndis_filter_receive expects a completion per request)."""
        layout = nic.nvsp.receive_layout
        if layout is None or nic.recv is None:
            return
        view = nic.recv.view
        pkts: list[OutPacket] = []
        while nic.free_control and nic.control_out:
            msg = nic.control_out.pop(0)
            if len(msg) > layout.section_size:
                nic.rndis.counters.rcv_error += 1
                continue
            section = nic.free_control.pop()
            offset = section * layout.section_size
            view[offset : offset + len(msg)] = msg
            rndis = nv.rndis_pkt(nv.CHANNEL_TYPE_CONTROL)
            base, bit = section_id(section)
            tid = base << MASK_BITS | bit
            pkts.append(xfer_pages(layout.buffer_id, [(len(msg), offset)], rndis, trans_id=tid))
        if pkts:
            await self._publish(channel, nic, post, pkts)

    async def _post_data(
        self, channel: Channel, nic: _Nic, queue: _Queue, post: PostRecord
    ) -> None:
        """As many queued frames as the queue has free sections, built in one
        fastpath call, in ascending sections; a transfer-page packet takes the
        sections within MASK_BITS of its first (its id names them: restart.py)."""
        layout = nic.nvsp.receive_layout
        recv = nic.recv
        if layout is None or recv is None:
            return
        n = min(len(queue.free), len(queue.frames))
        if not n:
            return
        size = layout.section_size
        batch = [queue.frames.popleft() for _ in range(n)]
        sections = sorted(queue.free.pop() for _ in range(n))
        lens = fastpath.rx_build(recv.view, batch, [s * size for s in sections], size)
        rndis = nv.rndis_pkt(nv.CHANNEL_TYPE_DATA)
        pkts: list[OutPacket] = []
        ranges: list[tuple[int, int]] = []
        base = mask = 0
        used = 0
        for section, length in zip(sections, lens, strict=True):
            if not length:  # larger than a section: never the case for frames within the MTU
                nic.rndis.counters.rcv_error += 1
                queue.free.append(section)
                continue
            if ranges and section >= base * 8 + MASK_BITS:
                pkts.append(
                    xfer_pages(layout.buffer_id, ranges, rndis, trans_id=base << MASK_BITS | mask)
                )
                ranges = []
            if not ranges:
                base, mask = section >> 3, 0
            mask |= 1 << (section - base * 8)
            ranges.append((length, section * size))
            used += 1
        if ranges:
            pkts.append(
                xfer_pages(layout.buffer_id, ranges, rndis, trans_id=base << MASK_BITS | mask)
            )
        if not pkts:
            return
        nic.rndis.counters.rcv_ok += used
        queue.delivered += used
        await self._publish(channel, nic, post, pkts)


def _packet_desc(data: bytes) -> tuple[int, int, int] | None:
    """(type, flags, trans_id) of a journalled packet, when its descriptor is there."""
    if len(data) < 16:
        return None
    typ, _off8, _len8, flags, tid = _DESC.unpack_from(data)
    return typ, flags, tid


def _packet_of(data: bytes) -> Packet | None:
    """A journalled packet (descriptor included) as the ring reader gives it; None
    when the bytes do not hold a whole one (the slot is memory the VMM can write)."""
    if len(data) < 16:
        return None
    typ, off8, len8, flags, tid = _DESC.unpack_from(data)
    if not 2 <= off8 <= len8 or len8 * 8 > len(data):
        return None
    if typ not in (PacketType.INBAND, PacketType.GPA_DIRECT, PacketType.COMPLETION):
        return None
    view = memoryview(data)
    return Packet(typ, flags, tid, off8, len8, view[16 : off8 * 8], view[off8 * 8 : len8 * 8])


def _is_data_send(pkt: Packet) -> bool:
    """A SEND_RNDIS_PKT of the data channel type (frames, no RNDIS control)."""
    if pkt.type not in (PacketType.INBAND, PacketType.GPA_DIRECT):
        return False
    head = bytes(pkt.payload[:8])
    return len(head) == 8 and struct.unpack("<II", head) == (
        nv.Msg.SEND_RNDIS_PKT,
        nv.CHANNEL_TYPE_DATA,
    )


@dataclass(frozen=True)
class _Send:
    """One SEND_RNDIS_PKT's RNDIS bytes, copied out of guest memory, and its packet."""

    pkt: Packet
    data: bytes
