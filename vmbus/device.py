"""The device API: what a VSP declares and how the bus hands it open channels.

A device is a class with an `offer` (what the guest sees in OFFERCHANNEL) and one
async method, `serve(channel)`, run in its own task for every open channel of
the device (primary and sub-channels). `serve` returns or raises when it is done
with the channel; the bus cancels it when the guest closes the channel.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from vmbus.channel import Channel


@dataclass(frozen=True)
class DeviceOffer:
    """What a device declares: its identity, ring size hints and sub-channel count.

    The guest chooses the real ring sizes; the hints are what our simulated guest
    drivers allocate and what a VMM author can read from `vmbusd stats`.
    """

    if_type: uuid.UUID
    if_instance: uuid.UUID
    ring_size_hint: int = 64 * 1024  # bytes per direction, header page included
    sub_channels: int = 0
    mmio_megabytes: int = 0
    user_def: bytes = b""
    flags: int = 0


@dataclass
class ChannelInfo:
    """Facts about one open channel, and the bus services a device may call."""

    relid: int
    sub_channel_index: int
    target_vp: int
    userdata: bytes
    # Offer n more sub-channels of this device now (what a storvsc/netvsc VSP does when
    # the guest asks for them in-band); returns their relids. None where unsupported.
    add_subchannels: Callable[[int], Awaitable[list[int]]] | None = None
    extra: dict[str, object] = field(default_factory=dict)


class Device:
    """Base class for a VSP. Subclasses set `if_type` and implement `serve`."""

    if_type: ClassVar[uuid.UUID]
    name: ClassVar[str] = "device"
    # Packet types the guest may put in this device's rings (bit t = type t); any
    # other type is a corrupt ring. Default: inband, GPA-direct, completion.
    packet_types: ClassVar[int] = (1 << 6) | (1 << 9) | (1 << 0xB)

    def __init__(self, instance: uuid.UUID | None = None, *, ring_size_hint: int = 64 * 1024):
        self.instance = instance or uuid.uuid4()
        self.ring_size_hint = ring_size_hint

    @property
    def offer(self) -> DeviceOffer:
        return DeviceOffer(self.if_type, self.instance, ring_size_hint=self.ring_size_hint)

    async def serve(self, channel: Channel, info: ChannelInfo) -> None:  # pragma: no cover
        raise NotImplementedError
