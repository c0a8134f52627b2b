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
import uuid
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
    ) -> None:
        """seal_ram=False plays a VMM that does not seal its RAM (vmbusd refuses it)."""
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

    # -- attach side -------------------------------------------------------------

    async def start(self, conn: attach.AttachConnection, nursery: trio.Nursery) -> None:
        """Hello, hand over RAM, start the receive task, negotiate VMBus, get offers."""
        self.conn = conn
        await attach.handshake(
            conn,
            attach.Hello(
                version=attach.PROTOCOL_VERSION,
                role="vmm",
                vm_id=self.vm_id,
                vcpus=self.vcpus,
            ),
        )
        await conn.send(
            attach.MemoryRegions(
                regions=tuple(
                    attach.MemoryRegion(gpa=r.gpa, size=r.size, fd=self.ram.fd, offset=r.offset)
                    for r in self.ram.regions
                )
            )
        )
        nursery.start_soon(self._receive_loop, name="vmm receive")
        self.client.connect()
        await self._pump()
        with trio.fail_after(CONTROL_TIMEOUT_S):
            await self._all_offers.wait()
        if self.closed_reason is not None:
            raise HostError(f"vmbusd ended the session: {self.closed_reason}")
        if self.connect_failed:
            raise HostError("the host refused every VMBus version this guest proposed")

    async def _receive_loop(self) -> None:
        """Apply vmbusd's messages in order; when it ends the session, say why (and
        wake `start`, which would otherwise wait for offers that never come)."""
        try:
            await self._receive_messages()
        finally:
            if self.closed_reason is None:
                self.closed_reason = "connection closed"
            self._all_offers.set()

    async def _receive_messages(self) -> None:
        assert self.conn is not None
        while True:
            try:
                msg = await self.conn.receive()
            except attach.ConnectionClosed:
                return
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
                log.warning("vmbusd reported error %s: %s", msg.code, msg.message)
                self.closed_reason = f"{msg.code}: {msg.message}"
                return

    async def _pump(self) -> None:
        while (ev := self.client.next_event()) is not None:
            await self._dispatch(ev)

    async def _dispatch(self, ev: Any) -> None:
        if isinstance(ev, gc.PostMessage):
            assert self.conn is not None
            async with self._send_lock:
                await self.conn.send(
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
        await self.conn.send(attach.Reset(epoch=self._reset_epoch))
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
        assert self.conn is not None
        async with self._send_lock:
            await self.conn.send(
                attach.PostFromGuest(connection_id=connection_id, vcpu=0, payload=payload)
            )

    def close(self) -> None:
        self.memory.close()
        self.ram.close()


def _close_quiet(fd: int) -> None:
    import os

    with contextlib.suppress(OSError):
        os.close(fd)
