"""The network backend contract: what the netvsc VSP asks of whatever its frames
go to (a loopback, a TAP device, a switch, a capture file...).

A backend is built from its config options when the VM's config is loaded (so a
bad option fails before anything listens) and does nothing until `run`: the VSP
starts it when the guest's NIC comes up and cancels it when the NIC goes (a guest
that reboots runs it again). Frames cross in batches, per queue:

- guest -> backend: `transmit(queue, frames)`, the frames one VMBus packet
  (SEND_RNDIS_PKT) carried on channel `queue`, with the offloads the backend does
  not take already done by the VSP (checksums filled, LSO segmented) and those it
  does take described on the frame (`Frame.csum`, `Frame.gso`). Never blocks: a
  backend that cannot take a frame now drops it and counts it.
- backend -> guest: the `deliver` callable given to `run`, a batch at a time; the
  VSP steers each frame to a guest queue (vRSS) itself.
"""

from __future__ import annotations

import inspect
import struct
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from devices.netvsc import offload
from devices.netvsc import rndis as rn
from devices.netvsc.rndis import Vlan
from vmbus.cliutil import UserError


class BackendError(UserError):
    """A backend's options are wrong, or what it names on the host is not there."""


@dataclass(frozen=True)
class Gso:
    """A TCP send still to be segmented (the frame's IP lengths and header checksum
    are right for the whole frame; its TCP checksum field holds the pseudo-header
    sum, as for `Frame.csum`)."""

    ipv6: bool
    mss: int
    hdr_len: int  # Ethernet + IP + TCP headers


@dataclass(frozen=True)
class Frame:
    """One Ethernet frame (without 802.1Q tag: the tag rides beside it, as in RNDIS).

    Only for a backend whose `offloads` take them: `csum` = (start, offset): the
    ones'-complement sum from `start` to the end goes at start + offset (the field
    holds the pseudo-header sum, as Linux's CHECKSUM_PARTIAL and virtio leave it);
    `gso`: segment it too."""

    data: bytes
    vlan: Vlan | None = None
    csum: tuple[int, int] | None = None
    gso: Gso | None = None


@dataclass(frozen=True)
class Offloads:
    """What a backend can take from the VSP instead of having it done in Python:
    frames whose TCP/UDP checksum is still to be filled, and LSO sends still to be
    segmented. A backend that takes neither gets only finished frames."""

    tx_checksum: bool = False
    tx_lso: bool = False


@dataclass(frozen=True)
class NicInfo:
    """What the backend may want to know of the NIC it serves."""

    mac: bytes
    mtu: int  # without the Ethernet header
    queues: int


Deliver = Callable[[list[Frame]], None]


class NetBackend(ABC):
    """A host-side network for one synthetic NIC."""

    name: str = "?"
    offloads: Offloads = Offloads()
    link_listener: Callable[[bool], object] | None = None
    """Set by the VSP: a backend whose link goes down or up on its own (impair's
    flaps) calls it, and the guest gets the RNDIS media status indication."""

    def __init__(self) -> None:
        self.tx_frames = 0
        self.tx_dropped = 0
        self.rx_frames = 0
        self.rx_dropped = 0

    @abstractmethod
    async def run(
        self,
        nic: NicInfo,
        deliver: Deliver,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Open what the backend needs, call `task_status.started()` when frames
        can flow, carry frames until cancelled, then let everything go."""

    @abstractmethod
    def transmit(self, queue: int, frames: list[Frame]) -> None:
        """Frames the guest sent on `queue` (0-based VMBus channel index)."""

    @property
    def link_up(self) -> bool:
        """Whether the backend's side of the wire is up (media connect)."""
        return True


def make_backend(cls: object, name: str, options: dict[str, Any]) -> NetBackend:
    """Build backend `cls` from config options; an unknown or ill-typed option is a
    one-line BackendError naming what the backend takes."""
    if not (isinstance(cls, type) and issubclass(cls, NetBackend)):
        raise BackendError(f"net backend {name!r} is {cls!r}, not a NetBackend subclass")
    params = inspect.signature(cls).parameters
    takes = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]
    for key in options:
        if key not in takes:
            listed = ", ".join(takes) or "no options"
            raise BackendError(f"{name} backend: unknown option {key!r}; it takes: {listed}")
    try:
        return cls(**options)
    except TypeError as exc:
        raise BackendError(f"{name} backend: {exc}") from exc


ETH_P_8021Q = 0x8100


def vlan_strip(data: bytes) -> tuple[bytes, Vlan | None]:
    """An inline 802.1Q tag taken out of a frame (the NDIS way: beside it, PPI 6)."""
    if len(data) < 18 or struct.unpack_from(">H", data, 12)[0] != ETH_P_8021Q:
        return data, None
    (tci,) = struct.unpack_from(">H", data, 14)
    return data[:12] + data[16:], Vlan(tci & 0xFFF, tci >> 13, bool(tci & 0x1000))


def vlan_insert(data: bytes, vlan: Vlan) -> bytes:
    """The tag put back inline (for a kernel interface, which wants it in the frame)."""
    tci = (vlan.vlan_id & 0xFFF) | int(vlan.cfi) << 12 | (vlan.priority & 7) << 13
    return data[:12] + struct.pack(">HH", ETH_P_8021Q, tci) + data[12:]


def partial_frame(frame: bytes, p: rn.TxPacket, offloads: Offloads) -> list[Frame] | None:
    """The guest's checksum/LSO request handed on as a partial frame (`Frame.csum`,
    `Frame.gso`) when the backend takes it; None when the VSP must do it in Python.
    Checked as offload.py checks it (an OffloadError is the guest's); for LSO the
    IP lengths and IPv4 header checksum Linux zeroed are rebuilt and the TCP field
    gets the pseudo-header sum over the real length (Linux left it over length 0)."""
    if p.lso is not None:
        if not offloads.tx_lso:
            return None
        out = bytearray(frame)
        ip, version = offload._ip_at(out)
        if (version == 6) != p.lso.ipv6:
            raise offload.OffloadError("LSO PPI's IP version does not match the frame")
        l4 = p.lso.tcp_offset
        if l4 < ip + (20 if version == 4 else 40) or len(out) < l4 + 20:
            raise offload.OffloadError(f"LSO TCP offset {l4} in a {len(out)}-byte frame")
        if version == 4 and out[ip + 9] != offload.IPPROTO_TCP:
            raise offload.OffloadError("LSO on a non-TCP IPv4 packet")
        thl = (out[l4 + 12] >> 4) * 4
        if thl < 20 or len(out) <= l4 + thl or not 0 < p.lso.mss <= 0xFFFF:
            raise offload.OffloadError(f"LSO: TCP header {thl}, mss {p.lso.mss}")
        if len(out) - ip > 0xFFFF + (40 if version == 6 else 0):
            raise offload.OffloadError(f"LSO frame of {len(out)} bytes")
        if version == 4:
            struct.pack_into(">H", out, ip + 2, len(out) - ip)
            offload.ipv4_header_checksum(out, ip)
        else:
            struct.pack_into(">H", out, ip + 4, len(out) - ip - 40)
        l4_len = len(out) - l4
        pseudo = offload._pseudo(out, ip, version, offload.IPPROTO_TCP, l4_len)
        struct.pack_into(">H", out, l4 + 16, pseudo)
        gso = Gso(version == 6, p.lso.mss, l4 + thl)
        return [Frame(bytes(out), p.vlan, (l4, 16), gso)]
    csum = p.checksum
    if csum is None or not (csum.tcp or csum.udp) or not offloads.tx_checksum:
        return None
    out = bytearray(frame)
    ip, version = offload._ip_at(out)
    if (version == 4) != csum.ipv4:
        raise offload.OffloadError("checksum PPI's IP version does not match the frame")
    field = 16 if csum.tcp else 6
    l4 = csum.l4_offset
    if l4 < ip + (20 if version == 4 else 40) or l4 + field + 2 > len(out):
        raise offload.OffloadError(f"L4 offset {l4} in a {len(out)}-byte frame")
    if csum.ip_header and version == 4:
        offload.ipv4_header_checksum(out, ip)
    return [Frame(bytes(out), p.vlan, (l4, field))]
