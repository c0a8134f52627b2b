"""The device API: what a VSP declares, and the context it is handed per open channel.

A device is a class with an `offer` (what the guest sees in OFFERCHANNEL) and one
async method, `serve(channel, ctx)`, run in its own task for every open channel of
the device (primary and sub-channels). `serve` returns or raises when it is done
with the channel; the session cancels it when the guest closes the channel.

Everything a real VSP needs reaches it through the `DeviceContext`: guest memory
(bounds-checked), GPADL mappings, the negotiated version, the sub-channel service
and a labelled logger. Nothing else of the session is reachable from a device.

One device object lives for one attach session (one VM). Its state belongs to the
guest session inside it: when the guest reboots (UNLOAD, or a new INITIATE_CONTACT,
or the VMM's `reset`) every channel of the device stops and `reset()` is called,
so the device forgets what the old guest negotiated. `close()` is called once,
when the VM detaches.

Errors, h11 style: a guest that breaks the device's protocol is a
:class:`GuestError` (raise it with :func:`guest_error`, which is typed NoReturn).
It carries what to do: with a `status`, the device's protocol has a failure answer
and the device is expected to catch it and send that status; without one, the
channel is reset. Whatever escapes `serve` is handled at the channel boundary: a
GuestError, a corrupt ring or a malformed packet is logged once as guest
misbehaviour, any other exception once as a device bug; either way that channel
is reset (rescinded, then offered again) and every other channel and VM carries on.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

from vmbus.packet import (
    GpaDirect,
    GpaDirectDecoder,
    PacketType,
    packet_types_mask,
    parse_gpa_direct,
)

if TYPE_CHECKING:
    import trio

    from vmbus.channel import Channel
    from vmbus.limits import RequestBudget
    from vmbus.memory import GuestMemory, LinearMapping, RingPairMapping
    from vmbus.ring import Packet

MAX_SUBCHANNELS = 64  # what any device may declare, on top of its primary channel
INFLIGHT_SLOT_SIZE = 256 * 1024  # a storvsc channel journals ~340 requests of 256 KiB
"""Bytes of the in-flight region per relid (`ctx.inflight`); slot n is at n * this."""


class GuestError(Exception):
    """The guest broke a device protocol.

    `status` is the protocol's failure status to answer with, when the protocol
    has one (the device catches the error and sends it); None means the channel
    can no longer be trusted and is reset.
    """

    def __init__(self, reason: str, *, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


def guest_error(reason: str, *, status: int | None = None) -> NoReturn:
    """Raise a GuestError (a helper so that checks read as one line)."""
    raise GuestError(reason, status=status)


@dataclass(frozen=True)
class DeviceOffer:
    """What a device declares: its identity, ring size hint and sub-channels.

    `sub_channels` are offered up front with the primary; `max_subchannels` caps
    what the device may enable later with `ctx.enable_subchannels` (as storvsc and
    netvsc do when the guest asks in-band). The guest chooses the real ring sizes;
    the hint is what our simulated guest drivers allocate.
    """

    if_type: uuid.UUID
    if_instance: uuid.UUID
    ring_size_hint: int = 64 * 1024  # bytes per direction, header page included
    sub_channels: int = 0
    max_subchannels: int = 0
    mmio_megabytes: int = 0
    user_def: bytes = b""
    flags: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.sub_channels <= MAX_SUBCHANNELS:
            raise ValueError(f"sub_channels must be 0..{MAX_SUBCHANNELS}")
        if not 0 <= self.max_subchannels <= MAX_SUBCHANNELS:
            raise ValueError(f"max_subchannels must be 0..{MAX_SUBCHANNELS}")

    @property
    def subchannel_cap(self) -> int:
        """The most sub-channels this device can ever have on one guest session."""
        return max(self.sub_channels, self.max_subchannels)


class DeviceMemory:
    """A device's window on the VM's RAM: bounds-checked GPA reads, writes, iovecs.

    Every call checks the whole range against the VM's RAM regions; a range the
    guest named that is not all RAM raises GuestError (never an access outside).
    iovecs are memoryviews straight into guest RAM (zero copy): the guest may change
    the bytes at any time, so copy before you validate. Release the views (drop
    them) before your `serve` returns.
    """

    __slots__ = ("_mem",)

    def __init__(self, memory: GuestMemory) -> None:
        self._mem = memory

    def contains(self, gpa: int, length: int) -> bool:
        return self._mem.contains(gpa, length)

    def _check(self, gpa: int, length: int) -> None:
        if length < 0 or not self._mem.contains(gpa, length):
            guest_error(f"GPA range {gpa:#x}+{length:#x} is not guest RAM")

    def read(self, gpa: int, length: int) -> bytes:
        """A private copy of [gpa, gpa+length)."""
        self._check(gpa, length)
        return self._mem.read(gpa, length)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self._check(gpa, memoryview(data).nbytes)
        self._mem.write(gpa, data)

    def iovecs(self, gpa: int, length: int) -> list[memoryview]:
        """Views of [gpa, gpa+length), one per RAM region crossed."""
        self._check(gpa, length)
        return self._mem.iovecs(gpa, length)

    def gpa_direct(self, pkt: Packet) -> GpaDirect:
        """Parse and check a GPA-direct packet (every PFN inside guest RAM); a
        malformed one raises PacketError (the channel is reset)."""
        return parse_gpa_direct(pkt, self._mem)

    def iovecs_of(self, ranges: GpaDirect) -> list[memoryview]:
        """Views of guest RAM for a parsed GPA-direct packet's ranges, in order."""
        return ranges.iovecs(self._mem)

    def gpa_direct_decoder(self) -> GpaDirectDecoder:
        """A decoder of whole received batches (one native call per batch instead of
        gpa_direct() per packet); one per channel task."""
        return GpaDirectDecoder(self._mem)


class GpadlMapping:
    """A GPADL the guest created for this device, mapped contiguously.

    `view` is valid inside the `async with ctx.gpadl(handle)` block only. When the
    guest asks to tear the GPADL down while it is held, `teardown_requested` is set:
    let go promptly (leave the block). The guest's teardown completes only once
    every holder has let go; a holder that keeps it longer than the grace period
    gets its channel reset. A view still alive after the block is cut off from the
    guest's pages (they are replaced by private zero pages), so a late write can
    never reach guest memory after the teardown completed.
    """

    def __init__(self, handle: int, mapping: LinearMapping, teardown: trio.Event) -> None:
        self.handle = handle
        self._mapping = mapping
        self.teardown_requested = teardown

    @property
    def size(self) -> int:
        return self._mapping.size

    @property
    def view(self) -> memoryview:
        return self._mapping.view


@dataclass
class DeviceContext:
    """What one open channel's `serve` gets: everything a VSP needs, nothing more."""

    vm_name: str
    session_id: str
    version: int  # the negotiated VMBus version (vmbus.protocol.VERSION_*)
    relid: int
    sub_channel_index: int
    target_vp: int
    userdata: bytes
    memory: DeviceMemory
    log: logging.LoggerAdapter[logging.Logger]
    _gpadl: Callable[[int], AbstractAsyncContextManager[GpadlMapping]]
    _enable_subchannels: Callable[[int], Awaitable[list[int]]]
    resumed: bool = False
    """This channel was open under a vmbusd that went away (crash or restart): the
    guest never saw it close. Its rings, GPADLs and `Device.restore`d state carry
    over; do not expect the guest to negotiate again (docs/attach-protocol.md#restart)."""
    inflight: memoryview | None = None
    """This channel's slot (INFLIGHT_SLOT_SIZE bytes) of the session's in-flight
    region: memory the VMM keeps across a vmbusd crash, for a device's record of
    requests taken off the ring but not yet completed. None: no restart support.
    Written by vmbusd only, but the VMM can write it too: validate what you read."""
    rings: RingPairMapping | None = None
    """The channel's ring pair as mapped, for a device whose in-flight record is
    about ring positions (echo). Take header views with `with` and never write
    the data areas: the Channel owns them."""
    _save_state: Callable[[], Awaitable[None]] | None = None
    requests: RequestBudget | None = None
    """The VM's outstanding-request budget (vmbus.limits), shared by all its channels:
    `n = await ctx.requests.acquire(want)` before taking up to n requests off the ring,
    `ctx.requests.release(k)` as k of them complete. Out of slots, acquire waits (the
    ring stays unread: back-pressure). For devices that hold requests across an await
    (a backend's I/O); None outside a session."""

    async def save_state(self) -> None:
        """Hand the VMM a fresh saved state now (with `Device.save()` in it), before
        telling the guest something a restarted vmbusd must remember (storvsc: before
        completing the last negotiation packet). No-op without restart support."""
        if self._save_state is not None:
            await self._save_state()

    def gpadl(self, handle: int) -> AbstractAsyncContextManager[GpadlMapping]:
        """`async with ctx.gpadl(handle) as m:` map a GPADL the guest created on this
        channel (netvsc's receive and send buffers). An unknown, unfinished or dying
        handle, or one of another channel, raises GuestError (no status: the device
        turns it into its protocol's failure)."""
        return self._gpadl(handle)

    async def enable_subchannels(self, count: int) -> list[int]:
        """Make `count` sub-channels exist (capped by the offer's maximum).

        Idempotent: asking for what exists does nothing, a larger count offers the
        difference, a smaller one keeps what exists. Returns the relids of all the
        device's sub-channels. All are rescinded and forgotten on guest reset.
        """
        return await self._enable_subchannels(count)


class LabelledLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every line with the VM and relid (`vm1/3: ...`)."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"{self.extra['label'] if self.extra else ''}: {msg}", kwargs


class Device:
    """Base class for a VSP. Subclasses set `if_type` and implement `serve`."""

    if_type: ClassVar[uuid.UUID]
    name: ClassVar[str] = "device"
    # Packet types the guest may put in this device's rings; any other type is a
    # corrupt ring (channel reset). Default: inband, GPA-direct, completion.
    packet_types: ClassVar[int] = packet_types_mask(
        PacketType.INBAND, PacketType.GPA_DIRECT, PacketType.COMPLETION
    )
    # The device survives a vmbusd restart under a running guest: its `save`,
    # `restore` and `resume_rings` carry everything the guest negotiated with it and
    # every request in flight (docs/attach-protocol.md#restart). A VM with any device
    # that is not gets no saved state: a vmbusd restart ends its session, as before.
    # A device may decide per instance (storvsc: not with a memory disk), saying why
    # in `restart_blocker`.
    restartable: bool = False
    restart_blocker: str | None = None

    def __init__(self, instance: uuid.UUID | None = None, *, ring_size_hint: int = 64 * 1024):
        self.instance = instance or uuid.uuid4()
        self.ring_size_hint = ring_size_hint

    @property
    def offer(self) -> DeviceOffer:
        return DeviceOffer(self.if_type, self.instance, ring_size_hint=self.ring_size_hint)

    async def serve(self, channel: Channel, ctx: DeviceContext) -> None:  # pragma: no cover
        raise NotImplementedError

    async def reset(self) -> None:
        """The guest session ended (reboot, UNLOAD): forget negotiated state.

        Called every time, after every channel of the device has stopped."""

    async def close(self) -> None:
        """The VM detached: release backends. Called once, after the last reset."""

    def save(self) -> object:
        """This device's guest-session state for a vmbusd restart: plain msgpack data
        (None, bool, int, str, bytes, lists, maps with str keys), small (it travels in
        the saved-state blob, bounded by MAX_SAVED_STATE). Called after every control-
        plane change and on `ctx.save_state()`. Default: nothing to save."""
        return None

    def restore(self, state: object) -> None:
        """Take back what `save()` returned, in a new vmbusd, before any channel of the
        device is resumed. The VMM handed it back: raise ValueError on anything
        malformed (the resume is refused, with that reason). Default: expects None."""
        if state is not None:
            raise ValueError(f"{self.name} saved no state, got {type(state).__name__}")

    def resume_rings(self, ctx: DeviceContext) -> None:
        """A resumed channel, before its rings are opened: finish from `ctx.inflight`
        what the last vmbusd left half done in `ctx.rings` (echo: a batch published
        to the guest whose read_index store the crash cut off). Default: nothing."""


def check_device_class(cls: object, where: str) -> type[Device]:
    """Refuse a class that cannot be a device, naming it (for config and plug-ins)."""
    if not (isinstance(cls, type) and issubclass(cls, Device)):
        raise TypeError(f"{where} is not a vmbus.device.Device subclass")
    if not isinstance(getattr(cls, "if_type", None), uuid.UUID):
        raise TypeError(f"{where} ({cls.__name__}) has no if_type (a uuid.UUID class attribute)")
    return cls
