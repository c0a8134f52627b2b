"""The simulated VM: a process that plays VMM and guest kernel.

It owns guest RAM (a memfd), speaks the VMM side of the attach protocol, and runs
the sans-IO guest VMBus client (`vmbus.guest.client.VmBusClient`, modelled on
Linux hv_vmbus) plus guest drivers found by interface GUID. Guest channels use the
same `Channel` class as the host, with the rings' roles swapped, so the load
generator's hot loops are the native ring functions too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from vmbus import attach
from vmbus.channel import Channel, EventFd, open_ring_pair
from vmbus.gpadl import PAGE_SIZE, Gpadl, GpaRange
from vmbus.guest import client as gc
from vmbus.guest.ram import GuestRam
from vmbus.memory import GuestMemory
from vmbus.protocol import ProtocolError
from vmbus.ring import init_ring_header

log = logging.getLogger(__name__)

CONTROL_TIMEOUT_S = 10.0
RECONNECT_TIMEOUT_S = 10.0  # default: how long to wait for a vmbusd that went away
MAX_UNACKED_POSTS = 4096  # posts kept for a resume; beyond, vmbusd sends no states


class HostError(Exception):
    """The host refused or did not answer a guest request."""


@dataclass
class GuestOffer:
    relid: int
    if_type: uuid.UUID
    if_instance: uuid.UUID
    sub_channel_index: int
    connection_id: int
    rescinded: bool = False


@dataclass
class GuestChannel:
    """A guest-side open channel: its pages, GPADL, mapping and Channel."""

    offer: GuestOffer
    pfns: list[int]
    gpadl: int
    mapping: Any
    channel: Channel
    kick: EventFd
    call: EventFd
    vcpu: int = 0
    stale_fds: list[int] = field(default_factory=list)  # replaced by a rebind; closed at close


Driver = Callable[["SimulatedVm", GuestOffer], Awaitable[None]]


class SimulatedVm:
    """VMM + guest VMBus client over one attach connection."""

    def __init__(
        self,
        *,
        ram_size: int = 256 << 20,
        vcpus: int = 2,
        vm_id: str = "sim",
        client_options: dict[str, Any] | None = None,
        seal_ram: bool = True,
        reconnect: Callable[[], Awaitable[attach.AttachConnection]] | None = None,
        reconnect_timeout: float = RECONNECT_TIMEOUT_S,
        restartable: bool = True,
    ) -> None:
        """seal_ram=False plays a VMM that does not seal its RAM (vmbusd refuses it).

        `reconnect` opens a new connection to the same vmbusd socket: with it (and the
        saved-state feature, which `restartable` announces) the VM outlives its
        vmbusd -- guest RAM, eventfds and guest state stay, and the session resumes
        when vmbusd is back. After `reconnect_timeout` seconds without one the VM
        gives up: `gave_up` is set and `closed_reason` says so."""
        self.ram = GuestRam(ram_size, seal=seal_ram)
        self.vcpus = vcpus
        self.vm_id = vm_id
        # The guest's own view, to build wrap-free ring mappings: RAM this process owns.
        self.memory = GuestMemory(require_sealed=False)
        for r in self.ram.regions:
            self.memory.add_region(r.gpa, r.size, self.ram.fd, r.offset)
        self._client_options = dict(client_options or {})  # e.g. max_version, versions
        self.client = gc.VmBusClient(**self._client_options)
        self.conn: attach.AttachConnection | None = None
        self.offers: dict[int, GuestOffer] = {}
        self.version: int | None = None
        self._waiters: dict[tuple[str, int], trio.MemorySendChannel[Any]] = {}
        self._binds: dict[int, attach.Bind] = {}
        self._all_offers = trio.Event()
        self._connected = trio.Event()
        self._offer_added: trio.MemorySendChannel[GuestOffer]
        self._offer_added, self.offer_events = trio.open_memory_channel[GuestOffer](1024)
        self._send_lock = trio.Lock()
        self.channels: dict[int, GuestChannel] = {}
        self._reset_epoch = 0
        self.connect_failed = False
        self.closed_reason: str | None = None  # why vmbusd ended the session, once it has
        # Restart support (attach feature saved-state): what we hold for vmbusd.
        self._reconnect = reconnect
        self.reconnect_timeout = reconnect_timeout
        self.restartable = restartable
        self.saved_state = False  # negotiated on the current connection
        self._state_fd: int | None = None  # the newest saved-state blob
        self._inflight_fd: int | None = None  # vmbusd's in-flight region
        self._applied = 0  # post/bind/unbind applied since that state
        self._posts_sent = 0  # posts sent over the VM's life (vmbusd counts them too)
        self._unacked: deque[tuple[int, attach.PostFromGuest | attach.Reset]] = deque()
        self._dropped_posts = 0  # posts below this number were forgotten unacknowledged
        self._acked_posts = 0  # the newest state's `posts`
        self._link_up = False  # sends go out (else posts wait for the reconnect)
        self._last_error: attach.Error | None = None
        self.reconnects = 0
        self.gave_up = False
        self.lost = trio.Event()  # set when the session is over for good

    # -- attach side -------------------------------------------------------------

    async def start(self, conn: attach.AttachConnection, nursery: trio.Nursery) -> None:
        """Hello, hand over RAM, start the receive task, negotiate VMBus, get offers."""
        await self._attach(conn)
        self._link_up = True
        nursery.start_soon(self._receive_loop, name="vmm receive")
        self.client.connect()
        await self._pump()
        with trio.fail_after(CONTROL_TIMEOUT_S):
            await self._all_offers.wait()
        if self.closed_reason is not None:
            raise HostError(f"vmbusd ended the session: {self.closed_reason}")
        if self.connect_failed:
            raise HostError("the host refused every VMBus version this guest proposed")

    async def _attach(self, conn: attach.AttachConnection) -> None:
        """Hello and guest RAM on a (new) connection; it becomes `self.conn`."""
        self.conn = conn
        peer = await attach.handshake(
            conn,
            attach.Hello(
                version=attach.PROTOCOL_VERSION,
                role="vmm",
                vm_id=self.vm_id,
                vcpus=self.vcpus,
                features=(attach.FEATURE_SAVED_STATE,) if self.restartable else (),
            ),
        )
        self.saved_state = attach.FEATURE_SAVED_STATE in peer.features and self.restartable
        await conn.send(
            attach.MemoryRegions(
                regions=tuple(
                    attach.MemoryRegion(gpa=r.gpa, size=r.size, fd=self.ram.fd, offset=r.offset)
                    for r in self.ram.regions
                )
            )
        )

    async def _receive_loop(self) -> None:
        """Apply vmbusd's messages in order. When vmbusd goes away and we hold its
        saved state, reconnect and resume; when the session ends for good, say why
        (and wake `start`, which would otherwise wait for offers that never come)."""
        try:
            while True:
                self._last_error = None
                await self._receive_messages()
                self._link_up = False
                if not self._resumable() or not await self._reconnect_and_resume():
                    break
        finally:
            self._link_up = False
            if self.closed_reason is None:
                err = self._last_error
                self.closed_reason = f"{err.code}: {err.message}" if err else "connection closed"
            self._all_offers.set()
            self.lost.set()

    def _resumable(self) -> bool:
        """vmbusd went away, and the next one can take over from its saved state: it
        crashed or stopped (`shutdown`), not refused us."""
        err = self._last_error
        return (
            self._reconnect is not None
            and self._state_fd is not None
            and self._inflight_fd is not None
            and self._acked_posts >= self._dropped_posts
            and (err is None or err.code == attach.ErrorCode.SHUTDOWN)
        )

    async def _reconnect_and_resume(self) -> bool:
        """Connect again (backoff) until `reconnect_timeout`; then `resume` and the
        posts vmbusd had not handled. False when giving up (closed_reason says why)."""
        assert self._reconnect is not None and self._state_fd is not None
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await self.conn.aclose()

        async def take_over(conn: attach.AttachConnection) -> bool:
            await self._attach(conn)
            if not self.saved_state:
                await conn.abort(attach.ErrorCode.PROTOCOL, attach.NO_SAVED_STATE)
                return False
            await self._resume(conn)
            return True

        why, gave_up = await attach.reconnect_with_backoff(
            self._reconnect, take_over, self.reconnect_timeout
        )
        if why is not None:
            self.gave_up = gave_up
            self.closed_reason = why
            return False
        self.reconnects += 1
        log.info("vmbusd is back: session resumed (reconnect %d)", self.reconnects)
        return True

    async def _resume(self, conn: attach.AttachConnection) -> None:
        """`resume` with the state we hold and the bindings we keep, then the posts
        vmbusd had not handled, in order; from then on sends go out again."""
        assert self._state_fd is not None and self._inflight_fd is not None
        keep = sorted(self._binds)[: attach.MAX_RESUME_CHANNELS]
        for relid in set(self._binds) - set(keep):  # vmbusd binds these afresh
            b = self._binds.pop(relid)
            if relid not in self.channels:
                _close_quiet(b.kick)
                _close_quiet(b.call)
        async with self._send_lock:
            await conn.send(
                attach.Resume(
                    blob=self._state_fd,
                    inflight=self._inflight_fd,
                    applied=self._applied,
                    posts=self._posts_sent,
                    channels=tuple(
                        attach.ResumeChannel(r, self._binds[r].kick, self._binds[r].call)
                        for r in keep
                    ),
                )
            )
            # `applied` stays: it counts against the state we still hold, until the
            # new vmbusd's first `state` replaces it.
            for _idx, post in self._unacked:
                await conn.send(post)
            self._link_up = True

    def _take_state(self, msg: attach.State) -> None:
        """Hold the newest saved state (and the in-flight region, sent once)."""
        if self._state_fd is not None:
            _close_quiet(self._state_fd)
        self._state_fd = msg.blob
        if msg.inflight is not None:
            if self._inflight_fd is not None:
                _close_quiet(self._inflight_fd)
            self._inflight_fd = msg.inflight
        self._applied = 0
        self._acked_posts = msg.posts
        while self._unacked and self._unacked[0][0] < msg.posts:
            self._unacked.popleft()

    async def _receive_messages(self) -> None:
        assert self.conn is not None
        while True:
            try:
                msg = await self.conn.receive()
            except (attach.ConnectionClosed, OSError, trio.ClosedResourceError):
                return
            if isinstance(msg, attach.State):
                self._take_state(msg)
                continue
            if isinstance(msg, attach.PostToGuest | attach.Bind | attach.Unbind):
                self._applied += 1  # applied (or fenced off) before the next one is read
            epoch = getattr(msg, "epoch", None)
            if epoch is not None and epoch < self._reset_epoch:
                # Sent before vmbusd saw our reset: it belongs to the old guest.
                if isinstance(msg, attach.Bind):
                    _close_quiet(msg.kick)
                    _close_quiet(msg.call)
                continue
            if isinstance(msg, attach.PostToGuest):
                try:
                    self.client.receive(msg.payload)
                except ProtocolError as exc:
                    log.warning("host sent a bad control message: %s", exc)
                await self._pump()
            elif isinstance(msg, attach.Bind):
                self._binds[msg.relid] = msg
                gch = self.channels.get(msg.relid)
                if gch is not None:
                    # A rebind (MODIFYCHANNEL) of an open channel: switch to the new fds;
                    # the old ones stay open until the channel closes, since a task may
                    # be waiting on them right now.
                    gch.stale_fds += [gch.kick.fd, gch.call.fd]
                    gch.kick.fd, gch.call.fd, gch.vcpu = msg.kick, msg.call, msg.vcpu
            elif isinstance(msg, attach.Unbind):
                b = self._binds.pop(msg.relid, None)
                if b is not None and msg.relid not in self.channels:
                    _close_quiet(b.kick)
                    _close_quiet(b.call)
            elif isinstance(msg, attach.Error):
                level = logging.INFO if msg.code == attach.ErrorCode.SHUTDOWN else logging.WARNING
                log.log(level, "vmbusd reported error %s: %s", msg.code, msg.message)
                self._last_error = msg
                return

    async def _pump(self) -> None:
        while (ev := self.client.next_event()) is not None:
            await self._dispatch(ev)

    async def _dispatch(self, ev: Any) -> None:
        if isinstance(ev, gc.PostMessage):
            await self._post(
                attach.PostFromGuest(connection_id=ev.connection_id, vcpu=0, payload=ev.payload)
            )
        elif isinstance(ev, gc.VersionAccepted):
            self.version = ev.version
            self._connected.set()
        elif isinstance(ev, gc.OfferReceived):
            go = GuestOffer(
                ev.relid, ev.if_type, ev.if_instance, ev.sub_channel_index, ev.connection_id
            )
            self.offers[go.relid] = go
            self._offer_added.send_nowait(go)
        elif isinstance(ev, gc.OffersComplete):
            self._all_offers.set()
        elif isinstance(ev, gc.ConnectFailed):
            self.connect_failed = True
            self._all_offers.set()
        elif isinstance(ev, gc.Rescinded):
            if ev.relid in self.offers:
                self.offers[ev.relid].rescinded = True
            self._wake("rescind", ev.relid, True)
        elif isinstance(ev, gc.GpadlReady):
            self._wake("gpadl", ev.handle, ev.status)
        elif isinstance(ev, gc.GpadlGone):
            self._wake("torndown", ev.handle, True)
        elif isinstance(ev, gc.OpenResult):
            self._wake("open", ev.relid, ev.status)
        elif isinstance(ev, gc.ModifyResult):
            self._wake("modify", ev.relid, ev.status)
        elif isinstance(ev, gc.UnloadComplete):
            self._wake("unload", 0, True)

    @property
    def link_up(self) -> bool:
        """vmbusd is there: not gone for good, not away while we reconnect."""
        return self._link_up

    async def _post(self, msg: attach.PostFromGuest | attach.Reset) -> None:
        """The guest's HvPostMessage (or our `reset`: both are numbered as `posts`).
        With saved state, kept until a `state` says vmbusd handled it, and sent again
        after a reconnect if it had not; while vmbusd is away it waits (the guest's
        hypercall already succeeded)."""
        assert self.conn is not None
        async with self._send_lock:
            if self.saved_state:
                if len(self._unacked) >= MAX_UNACKED_POSTS:
                    # vmbusd sends no states (a device of this VM cannot restart):
                    # what we keep could never be replayed. Resume needs a newer state.
                    self._dropped_posts = self._posts_sent
                    self._unacked.clear()
                self._unacked.append((self._posts_sent, msg))
                self._posts_sent += 1
                if not self._link_up:
                    return
                try:
                    await self.conn.send(msg)
                except (attach.ConnectionClosed, OSError, trio.ClosedResourceError):
                    pass  # the receive task reconnects and sends it again
                return
            await self.conn.send(msg)

    def _wake(self, kind: str, key: int, value: Any) -> None:
        ch = self._waiters.pop((kind, key), None)
        if ch is not None:
            ch.send_nowait(value)

    async def _request(self, kind: str, key: int | None, start: Callable[[], Any]) -> Any:
        """Queue a control request, then wait for its answer (with a timeout).

        The client is sans-IO: `start` only queues messages, so the waiter is in place
        before anything reaches the host. key None: the key is what `start` returns.
        """
        ret = start()
        key = ret if key is None else key
        send, recv = trio.open_memory_channel[Any](1)
        self._waiters[(kind, key)] = send
        await self._pump()
        try:
            with trio.fail_after(CONTROL_TIMEOUT_S):
                return await recv.receive()
        except trio.TooSlowError:
            self._waiters.pop((kind, key), None)
            raise HostError(f"no answer from the host for {kind} {key:#x}") from None

    # -- guest kernel services ------------------------------------------------------

    def find_offers(self, if_type: uuid.UUID) -> list[GuestOffer]:
        return [o for o in self.offers.values() if o.if_type == if_type and not o.rescinded]

    async def open_channel(
        self,
        offer: GuestOffer,
        ring_size: int = 64 * 1024,
        *,
        target_vp: int = 0,
        before_open: Callable[[Any], None] | None = None,
    ) -> GuestChannel:
        """What Linux vmbus_open does: ring GPADL, init headers, OPENCHANNEL.

        `before_open(mapping)` runs after the headers are initialised (hostile-guest tests).
        """
        if ring_size % PAGE_SIZE or ring_size < 2 * PAGE_SIZE:
            raise ValueError("ring size must be a page multiple of at least 2 pages")
        pages = ring_size // PAGE_SIZE
        pfns = self.ram.alloc_pages(2 * pages)  # outbound ring first, then inbound
        handle = 0

        def create() -> int:
            nonlocal handle
            handle = self.client.create_gpadl(offer.relid, pfns)
            return handle

        status = await self._request("gpadl", None, create)
        if status != 0:
            self.ram.free_pages(pfns)
            raise HostError(f"GPADL {handle:#x} refused with status {status:#x}")
        gpadl = Gpadl(handle, offer.relid, (GpaRange(len(pfns) * PAGE_SIZE, 0, tuple(pfns)),))
        mapping = self.memory.map_ring_pair(gpadl, pages)
        # Linux zeroes both headers and sets feature_bits after the GPADL, before the open.
        init_ring_header(mapping.upstream_hdr)
        init_ring_header(mapping.downstream_hdr)
        if before_open is not None:
            before_open(mapping)
        status = await self._request(
            "open",
            offer.relid,
            lambda: self.client.open_channel(offer.relid, handle, pages, target_vp=target_vp),
        )
        if status != 0:
            mapping.close()
            await self._teardown_gpadl(offer.relid, handle)
            self.ram.free_pages(pfns)
            raise HostError(f"OPENCHANNEL relid {offer.relid} refused with status {status:#x}")
        bind = self._binds.get(offer.relid)
        if bind is None:
            raise HostError(f"relid {offer.relid} opened without a bind")
        kick, call = EventFd(bind.kick), EventFd(bind.call)
        reader, writer = open_ring_pair(mapping, host=False)
        ch = Channel(reader, writer, call, kick, name=f"guest/{offer.relid}")
        gch = GuestChannel(offer, pfns, handle, mapping, ch, kick, call)
        self.channels[offer.relid] = gch
        return gch

    async def close_channel(self, gch: GuestChannel) -> None:
        """What Linux vmbus_close does: CLOSECHANNEL, then GPADL teardown."""
        relid = gch.offer.relid
        self.channels.pop(relid, None)
        self.client.close_channel(relid)
        await self._pump()
        gch.channel.release()
        gch.mapping.close()
        for fd in gch.stale_fds:
            _close_quiet(fd)
        await self._teardown_gpadl(relid, gch.gpadl)
        self.ram.free_pages(gch.pfns)
        self._binds.pop(relid, None)

    async def create_buffer_gpadl(self, relid: int, size: int) -> tuple[int, list[int]]:
        """A GPADL over fresh scattered pages for a device buffer (netvsc's receive and
        send buffers): returns (handle, pfns). The pages stay the guest's until
        `teardown_buffer_gpadl`."""
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError("buffer size must be a positive page multiple")
        pfns = self.ram.alloc_pages(size // PAGE_SIZE)
        handle = 0

        def create() -> int:
            nonlocal handle
            handle = self.client.create_gpadl(relid, pfns)
            return handle

        status = await self._request("gpadl", None, create)
        if status != 0:
            self.ram.free_pages(pfns)
            raise HostError(f"GPADL {handle:#x} refused with status {status:#x}")
        return handle, pfns

    async def teardown_buffer_gpadl(self, relid: int, handle: int, pfns: list[int]) -> None:
        """GPADL_TEARDOWN and wait for GPADL_TORNDOWN (as Linux does, but bounded)."""
        await self._teardown_gpadl(relid, handle)
        self.ram.free_pages(pfns)

    def _new_kernel(self) -> None:
        """The old guest kernel's channels, offers and client are gone."""
        for gch in list(self.channels.values()):
            gch.channel.release()
            gch.mapping.close()
            self.ram.free_pages(gch.pfns)
        self.channels.clear()
        self.offers.clear()
        self._all_offers = trio.Event()
        self.client = gc.VmBusClient(**self._client_options)

    async def reconnect(self) -> None:
        """A new guest kernel without a VMM reset (kexec after UNLOAD): INITIATE_CONTACT
        again, REQUESTOFFERS, wait for ALLOFFERS_DELIVERED."""
        self._new_kernel()
        self.client.connect()
        await self._pump()
        with trio.fail_after(CONTROL_TIMEOUT_S):
            await self._all_offers.wait()

    async def _teardown_gpadl(self, relid: int, handle: int) -> None:
        offer = self.offers.get(relid)
        if offer is not None and offer.rescinded:
            # Linux posts no GPADL_TEARDOWN after a rescind: the host frees it itself.
            self.client.teardown_gpadl(relid, handle)
            return
        await self._request("torndown", handle, lambda: self.client.teardown_gpadl(relid, handle))

    async def wait_rescind(self, relid: int) -> None:
        """Wait until the host rescinds `relid` (hot-remove)."""
        if self.offers.get(relid) is not None and self.offers[relid].rescinded:
            return
        await self._request("rescind", relid, lambda: None)

    async def release_offer(self, relid: int) -> None:
        """What Linux does once a rescinded device is gone: close if open, RELID_RELEASED."""
        gch = self.channels.get(relid)
        if gch is not None:
            await self.close_channel(gch)
        self.client.release_relid(relid)
        self.offers.pop(relid, None)
        await self._pump()

    async def reboot(self) -> None:
        """The guest rebooted: the VMM says `reset`, the new kernel negotiates afresh."""
        assert self.conn is not None
        self._reset_epoch = self._reset_epoch + 1
        self._new_kernel()
        await self._post(attach.Reset(epoch=self._reset_epoch))
        self.client.connect()
        await self._pump()
        with trio.fail_after(CONTROL_TIMEOUT_S):
            await self._all_offers.wait()

    async def modify_channel(self, gch: GuestChannel, target_vp: int) -> int:
        """MODIFYCHANNEL: move the channel's interrupts to another vCPU (>= 4.1).

        Returns the host's status (5.3 answers; before that 0 is assumed) once the
        VMM side has seen the rebind for the new vCPU.
        """
        relid = gch.offer.relid
        if self.version is not None and self.version >= 0x00050003:
            status = int(
                await self._request(
                    "modify", relid, lambda: self.client.modify_channel(relid, target_vp)
                )
            )
        else:
            self.client.modify_channel(relid, target_vp)
            await self._pump()
            status = 0
        if status == 0:
            with trio.fail_after(CONTROL_TIMEOUT_S):
                while gch.vcpu != target_vp:
                    await trio.sleep(0.001)
        return status

    async def unload(self) -> None:
        await self._request("unload", 0, self.client.unload)

    async def post_raw(self, payload: bytes, connection_id: int = 1) -> None:
        """Post arbitrary bytes as a control message: for hostile-guest tests."""
        await self._post(attach.PostFromGuest(connection_id=connection_id, vcpu=0, payload=payload))

    def close(self) -> None:
        for fd in (self._state_fd, self._inflight_fd):
            if fd is not None:
                _close_quiet(fd)
        self._state_fd = self._inflight_fd = None
        self.memory.close()
        self.ram.close()


def _close_quiet(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
