"""The tap backend: a Linux TAP device, created or attached by name.

Options: `ifname` (the TAP's name), `netns` (optional: the name of an existing
network namespace, under /run/netns, to have the TAP in), `bridge` (optional: an
existing Linux bridge in that namespace to enslave the TAP to — how a NIC joins a
host network, or an Open vSwitch/VXLAN fabric). A TAP that does not exist is
created (and goes when vmbusd lets go of it); a persistent one made beforehand
(`ip tuntap add NAME mode tap multi_queue vnet_hdr`) is attached to.

The TAP is opened IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE, one queue
(file descriptor) per VMBus channel, non-blocking, read in batches from trio
(`wait_readable`); netlink (pyroute2, never `ip`) sets its MTU and brings it up,
and enslaves it to the bridge. Everything is done from a worker thread that has
entered the namespace (setns on that thread only), so the TAP is made inside it.

Offloads, transmit: the guest's checksum and LSO v2 PPIs become the frame's
virtio_net_hdr (NEEDS_CSUM with csum_start/offset; GSO_TCPV4/TCPV6 with gso_size
and hdr_len), so the kernel fills checksums and segments, not Python. Receive: the
kernel is not told (TUNSETOFFLOAD) that we take partial checksums or GSO, so it
finishes and segments every frame it gives us, and the VSP computes the receive
checksum PPI itself; handing the guest coalesced (RSC) receives is not done.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import trio

from devices.netvsc.backends.base import (
    BackendError,
    Deliver,
    Frame,
    NetBackend,
    NicInfo,
    Offloads,
    vlan_insert,
    vlan_strip,
)

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
CLONE_NEWNET = 0x40000000
IFNAMSIZ = 16
VNET_HDR_LEN = 10  # struct virtio_net_hdr (TUNSETVNETHDRSZ not set: the default)
NO_OFFLOAD_HDR = bytes(VNET_HDR_LEN)  # flags 0, GSO_NONE
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_TCPV6 = 4
READ_BATCH = 64  # frames read from one queue before handing them over
READ_SIZE = VNET_HDR_LEN + 65536 + 18

_libc = ctypes.CDLL(None, use_errno=True)


@contextmanager
def in_netns(name: str | None) -> Iterator[None]:
    """This thread inside network namespace `name` (an /run/netns entry), then back.
    Only the calling thread moves; call it from a worker thread."""
    if name is None:
        yield
        return
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BackendError(f"network namespace {name!r} does not exist") from None
    except OSError as exc:
        raise BackendError(f"network namespace {name!r}: {exc.strerror}") from None
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise BackendError(f"cannot enter network namespace {name!r}: {os.strerror(err)}")
        try:
            yield
        finally:
            if _libc.setns(home, CLONE_NEWNET) != 0:  # pragma: no cover (cannot happen as root)
                raise OSError(ctypes.get_errno(), "setns back to our own network namespace")
    finally:
        os.close(target)
        os.close(home)


def _open_queue(ifname: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", ifname.encode(), flags).ljust(40, b"\0"))
    except OSError as exc:
        os.close(fd)
        why = exc.strerror
        if exc.errno == errno.EINVAL:
            why = "exists and is not a multi-queue TAP (ip tuntap add ... multi_queue)"
        elif exc.errno == errno.EBUSY:
            why = "is in use by another program"
        raise BackendError(f"TAP {ifname!r}: {why}") from None
    return fd


def open_tap(
    ifname: str, queues: int, netns: str | None, *, mtu: int, mac: bytes | None, bridge: str | None
) -> list[int]:
    """The TAP's queue fds, the link configured and up (blocking: run it in a thread)."""
    from pyroute2 import IPRoute  # imported here: netlink only when a TAP is used

    with in_netns(netns):
        fds: list[int] = []
        try:
            for _ in range(queues):
                fds.append(_open_queue(ifname))
            with IPRoute() as ipr:
                (index,) = ipr.link_lookup(ifname=ifname)
                settings: dict[str, Any] = {"mtu": mtu}
                if mac is not None:
                    settings["address"] = ":".join(f"{b:02x}" for b in mac)
                if bridge is not None:
                    found = ipr.link_lookup(ifname=bridge)
                    if not found:
                        where = f" in namespace {netns!r}" if netns else ""
                        raise BackendError(f"bridge {bridge!r} does not exist{where}")
                    settings["master"] = found[0]
                ipr.link("set", index=index, **settings)
                ipr.link("set", index=index, state="up")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds


class TapBackend(NetBackend):
    """A TAP device: one queue per VMBus channel, frames with a virtio_net_hdr."""

    name = "tap"
    offloads = Offloads(tx_checksum=True, tx_lso=True)  # through the vnet header

    def __init__(
        self,
        *,
        ifname: str,
        netns: str | None = None,
        bridge: str | None = None,
        mac: str | None = None,
    ) -> None:
        """`mac` sets the TAP's own address (the simulated guest's TAP takes its
        NIC's); by default the kernel's random one is kept."""
        super().__init__()
        for key, value in (("ifname", ifname), ("netns", netns), ("bridge", bridge)):
            if value is None:
                continue
            if not isinstance(value, str) or not value:
                raise BackendError(f"tap backend: {key} must be a non-empty string")
            if len(value.encode()) >= IFNAMSIZ and key != "netns":
                raise BackendError(f"tap backend: {key} {value!r} longer than 15 bytes")
            if "/" in value or value in (".", ".."):
                raise BackendError(f"tap backend: {key} {value!r} is not a valid name")
        self.ifname = ifname
        self.netns = netns
        self.bridge = bridge
        self.mac = None if mac is None else parse_mac(mac)
        self._fds: list[int] = []

    async def run(
        self,
        nic: NicInfo,
        deliver: Deliver,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        fds = await trio.to_thread.run_sync(
            lambda: open_tap(
                self.ifname,
                nic.queues,
                self.netns,
                mtu=nic.mtu,
                mac=self.mac,
                bridge=self.bridge,
            )
        )
        self._fds = fds
        try:
            async with trio.open_nursery() as nursery:
                for fd in fds:
                    nursery.start_soon(self._reader, fd, deliver)
                task_status.started()
        finally:
            self._fds = []
            for fd in fds:
                os.close(fd)

    async def _reader(self, fd: int, deliver: Deliver) -> None:
        while True:
            await trio.lowlevel.wait_readable(fd)
            batch: list[Frame] = []
            while len(batch) < READ_BATCH:
                try:
                    data = os.read(fd, READ_SIZE)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno == errno.EBADFD:  # the TAP was deleted under us
                        return
                    raise
                if len(data) <= VNET_HDR_LEN or data[1] != VIRTIO_NET_HDR_GSO_NONE:
                    self.rx_dropped += 1  # GSO was never offered to the kernel
                    continue
                frame, vlan = vlan_strip(data[VNET_HDR_LEN:])
                batch.append(Frame(frame, vlan))
            if batch:
                self.rx_frames += len(batch)
                deliver(batch)

    def transmit(self, queue: int, frames: list[Frame]) -> None:
        if not self._fds:
            self.tx_dropped += len(frames)
            return
        fd = self._fds[queue % len(self._fds)]
        for f in frames:
            data = f.data if f.vlan is None else vlan_insert(f.data, f.vlan)
            try:
                os.write(fd, vnet_header(f) + data)
                self.tx_frames += 1
            except (BlockingIOError, OSError):
                self.tx_dropped += 1  # the TAP's queue is full or the link is down


def vnet_header(f: Frame) -> bytes:
    """The virtio_net_hdr for a frame: NEEDS_CSUM with where the checksum goes, and
    the GSO type, size and header length for an LSO send (offsets moved by the
    802.1Q tag when it goes inline)."""
    if f.csum is None:
        return NO_OFFLOAD_HDR
    shift = 4 if f.vlan is not None else 0
    start, offset = f.csum
    if f.gso is None:
        return struct.pack("<BBHHHH", VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, start + shift, offset)
    kind = VIRTIO_NET_HDR_GSO_TCPV6 if f.gso.ipv6 else VIRTIO_NET_HDR_GSO_TCPV4
    return struct.pack(
        "<BBHHHH",
        VIRTIO_NET_HDR_F_NEEDS_CSUM,
        kind,
        f.gso.hdr_len + shift,
        f.gso.mss,
        start + shift,
        offset,
    )


def parse_mac(text: str) -> bytes:
    """'00:15:5d:00:00:01' -> 6 bytes; a unicast address, or a one-line BackendError."""
    parts = text.split(":") if isinstance(text, str) else []
    try:
        if len(parts) != 6 or any(len(p) != 2 for p in parts):
            raise ValueError
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise BackendError(f"MAC {text!r} is not six hex octets like 00:15:5d:00:00:01") from None
    if mac[0] & 1:
        raise BackendError(f"MAC {text!r} is a multicast address (its first octet is odd)")
    return mac
