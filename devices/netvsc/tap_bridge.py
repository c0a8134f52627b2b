"""The simulated guest's NIC bridged to a TAP device (`vmbusd vm --nic-tap NAME
[--netns NS]`): the TAP plays the guest's eth0, so real programs in NS send and
receive through guest netvsc VSC -> VMBus rings -> vmbusd's netvsc VSP -> its
backend, and back.

The guest side is the netvsc VSC (vsc.py) doing Linux 6.1's init on the first
netvsc offer; the TAP is opened as the tap backend opens it (created or attached by
name, made inside NS; `open_tap`), given the NIC's MAC (the address the host's RNDIS
reports, as hv_netvsc sets it on eth0) and its MTU. One queue (the primary
channel); the guest asks for MTU 9000 and takes what the host allows (min of the
two, as the MTU limit of hv_netvsc does).

It moves frames as hv_netvsc does, not one at a time. Transmit: every frame the
TAP has (non-blocking reads until EAGAIN, up to READ_BATCH) goes out in one
`send_frames` call (several RNDIS packets a send section, one ring write, the
completions taken asynchronously). Offloads: the TAP is told (TUNSETOFFLOAD) to
hand over what the NIC negotiated with the host (checksum, TSO4, TSO6), so the
namespace's kernel gives us 64 KiB TCP segments with a virtio_net_hdr, which
become netvsc_xmit's PPIs: GSO -> LSO v2 (IPv4 total length and header checksum
zeroed, the TCP field the pseudo-header sum over length 0, as Linux leaves
them), NEEDS_CSUM on TCP/UDP -> the checksum PPI, any other partial checksum
finished here (skb_checksum_help). An inline 802.1Q tag goes as the VLAN PPI.
Receive: each ring batch's frames are written to the TAP from the receive loop
itself (`NetvscGuest.on_frames`: no task switch a frame), each tag put
back inline, with VIRTIO_NET_HDR_F_DATA_VALID when the host's checksum PPI says
TCP or UDP was validated (netvsc_recv's CHECKSUM_UNNECESSARY).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
from collections.abc import Callable

import trio

from devices.netvsc import offload
from devices.netvsc import rndis as rn
from devices.netvsc.backends.base import vlan_insert, vlan_strip
from devices.netvsc.backends.tap import (
    READ_SIZE,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VNET_HDR_LEN,
    in_netns,
    open_tap,
)
from devices.netvsc.vsc import NetvscGuest, NicOffloads, RxFrame, TxFrame
from devices.netvsc.vsp import NETVSC_IF_TYPE
from vmbus.cliutil import UserError
from vmbus.gpadl import PAGE_SIZE
from vmbus.guest.vm import SimulatedVm

log = logging.getLogger(__name__)

GUEST_MTU = 9000  # what the guest asks for; the host's MTU bounds it
RING_SIZE = 256 * PAGE_SIZE
CLOSE_TIMEOUT_S = 5.0
READ_BATCH = 256  # frames read from the TAP before they go out in one batch
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int)
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
VIRTIO_NET_HDR_F_DATA_VALID = 2
RX_VALID = rn.RXCSUM_TCP_SUCCEEDED | rn.RXCSUM_UDP_SUCCEEDED
DATA_VALID_HDR = bytes([VIRTIO_NET_HDR_F_DATA_VALID]) + bytes(VNET_HDR_LEN - 1)
PLAIN_HDR = bytes(VNET_HDR_LEN)
_VNET = struct.Struct("<BBHHHH")
_U16 = struct.Struct(">H")
TPID_8021Q = _U16.pack(rn.ETH_P_8021Q)


class Dropped(Exception):
    """A frame from the TAP that cannot be sent (an offload we never offered)."""


def _vlan_of(value: int | None) -> rn.Vlan | None:
    if value is None:
        return None
    return rn.Vlan(value >> 4 & 0xFFF, value & 7, bool(value & 8))


def tun_offloads(nic: NicOffloads) -> int:
    """TUNSETOFFLOAD flags for what the NIC negotiated (hw_features): partial
    checksums when the host takes TCP checksums, TSO per IP version with LSO v2."""
    flags = TUN_F_CSUM if nic.tcp4_csum or nic.tcp6_csum else 0
    if nic.lso4:
        flags |= TUN_F_TSO4
    if nic.lso6:
        flags |= TUN_F_TSO6
    return flags


def open_guest_tap(ifname: str, netns: str | None, mtu: int, mac: bytes, nic: NicOffloads) -> int:
    """The TAP as the guest's eth0 (blocking: run it in a thread): opened as the tap
    backend opens it, told which offloads to hand over, and its GSO size capped at
    the host's LSO limit (netif_set_tso_max_size)."""
    from pyroute2 import IPRoute

    (fd,) = open_tap(ifname, 1, netns, mtu=mtu, mac=mac, bridge=None)
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, tun_offloads(nic))
        if nic.lso4 or nic.lso6:
            with in_netns(netns), IPRoute() as ipr:
                (index,) = ipr.link_lookup(ifname=ifname)
                ipr.link("set", index=index, gso_max_size=nic.gso_max_size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _l3(frame: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(IP version, L4 protocol) of an untagged Ethernet frame; (0, 0) if neither."""
    if len(frame) < 14:
        return 0, 0
    (proto,) = _U16.unpack_from(frame, 12)
    if proto == rn.ETH_P_IP and len(frame) >= 34:
        return 4, frame[23]
    if proto == rn.ETH_P_IPV6 and len(frame) >= 54:
        return 6, frame[20]
    return 0, 0


def _finish_checksum(frame: bytearray, start: int, field: int) -> None:
    """skb_checksum_help: the ones' sum from `start` (the field holds the
    pseudo-header sum) stored inverted at start + field."""
    if start + field + 2 > len(frame):
        raise Dropped(f"checksum at {start}+{field} in a {len(frame)}-byte frame")
    value = ~offload.ones_sum(frame[start:]) & 0xFFFF
    struct.pack_into(">H", frame, start + field, value or 0xFFFF)


def tx_frame(data: bytes, nic: NicOffloads) -> TxFrame:
    """A TAP read (virtio_net_hdr + frame) as netvsc_xmit sends it: the tag as the
    VLAN PPI, GSO as LSO v2 (headers prepared as Linux does), a partial TCP/UDP
    checksum as the checksum PPI when the NIC negotiated it, else finished here."""
    if len(data) <= VNET_HDR_LEN:
        raise Dropped(f"{len(data)}-byte read")
    flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = _VNET.unpack_from(data)
    frame: bytes | bytearray | memoryview = memoryview(data)[VNET_HDR_LEN:]  # no copy
    vlan = None
    if data[VNET_HDR_LEN + 12 : VNET_HDR_LEN + 14] == TPID_8021Q:
        frame, vlan = vlan_strip(data[VNET_HDR_LEN:])
    ppis: list[tuple[int, int]] = []
    if vlan is not None:
        ppis.append((rn.PpiType.IEEE_8021Q, vlan.value()))
        csum_start -= 4  # the offsets counted the inline tag
    partial = bool(flags & VIRTIO_NET_HDR_F_NEEDS_CSUM)
    if gso_type != VIRTIO_NET_HDR_GSO_NONE:
        version, proto = _l3(frame)
        want = {VIRTIO_NET_HDR_GSO_TCPV4: 4, VIRTIO_NET_HDR_GSO_TCPV6: 6}.get(gso_type)
        if want is None or want != version or not partial or not gso_size:
            raise Dropped(f"GSO type {gso_type:#x} on an IPv{version} frame")
        if csum_start < 34 or csum_start + 20 > len(frame):
            raise Dropped(f"GSO TCP header at {csum_start} of {len(frame)}")
        out = bytearray(frame)
        if version == 4:  # netvsc_xmit: tot_len and check 0, TCP: pseudo sum, length 0
            out[16:18] = out[24:26] = b"\0\0"
            pseudo = offload.ones_sum(out[26:34] + struct.pack(">HH", offload.IPPROTO_TCP, 0))
        else:  # tcp_v6_gso_csum_prep
            out[18:20] = b"\0\0"
            pseudo = offload.ones_sum(out[22:54] + struct.pack(">IxxxB", 0, offload.IPPROTO_TCP))
        struct.pack_into(">H", out, csum_start + 16, pseudo)
        lso = rn.LSO_V2_TYPE << 30 | csum_start << 20 | gso_size
        if version == 6:
            lso |= rn.LSO_IPV6 << 31
        ppis.append((rn.PpiType.TCP_LARGESEND, lso))
        return TxFrame(out, tuple(ppis))
    if partial:
        version, proto = _l3(frame)
        tcp = proto == offload.IPPROTO_TCP and csum_offset == 16
        udp = proto == offload.IPPROTO_UDP and csum_offset == 6
        if version == 4:
            host = (tcp and nic.tcp4_csum) or (udp and nic.udp4_csum)
        else:
            host = version == 6 and ((tcp and nic.tcp6_csum) or (udp and nic.udp6_csum))
        if host and 14 <= csum_start <= 0x3FF:
            value = (rn.TXCSUM_IPV4 if version == 4 else rn.TXCSUM_IPV6) | csum_start << 16
            value |= rn.TXCSUM_TCP if tcp else rn.TXCSUM_UDP
            ppis.append((rn.PpiType.TCPIP_CHKSUM, value))
        else:
            out = bytearray(frame)
            _finish_checksum(out, csum_start, csum_offset)
            frame = bytes(out)
    return TxFrame(frame, tuple(ppis))


def rx_bytes(rx: RxFrame) -> bytes:
    """A received frame as the TAP takes it: virtio_net_hdr (DATA_VALID when the
    host validated TCP/UDP), then the frame with its tag inline."""
    vlan = _vlan_of(rx.vlan)
    frame = rx.frame if vlan is None else vlan_insert(rx.frame, vlan)
    valid = rx.checksum is not None and rx.checksum & RX_VALID
    return (DATA_VALID_HDR if valid else PLAIN_HDR) + frame


async def bridge_nic_to_tap(
    vm: SimulatedVm,
    ifname: str,
    netns: str | None,
    say: Callable[[str], None],
    *,
    task_status: trio.TaskStatus[NetvscGuest] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Bring the first netvsc NIC up and carry frames between it and the TAP until
    cancelled; `task_status.started(nic)` once both are up."""
    offers = [o for o in vm.find_offers(NETVSC_IF_TYPE) if not o.sub_channel_index]
    if not offers:
        raise UserError('--nic-tap: vmbusd offers no netvsc NIC (add [[device]] type = "netvsc")')
    gch = await vm.open_channel(offers[0], RING_SIZE)
    nic = NetvscGuest(vm, gch, mtu=GUEST_MTU)
    fds: list[int] = []
    dropped = {"tx": 0, "rx": 0}

    async def to_host(fd: int) -> None:
        """TAP -> NIC: all the TAP has, one batch."""
        while True:
            await trio.lowlevel.wait_readable(fd)
            batch: list[TxFrame] = []
            while len(batch) < READ_BATCH:
                try:
                    data = os.read(fd, READ_SIZE)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno == errno.EBADFD:  # the TAP was deleted under us
                        return
                    raise
                try:
                    batch.append(tx_frame(data, nic.offloads))
                except Dropped as exc:
                    if not dropped["tx"]:
                        log.info("--nic-tap: frame from %s dropped: %s", ifname, exc)
                    dropped["tx"] += 1
            if batch:
                await nic.send_frames(batch)

    def to_tap(batch: list[RxFrame]) -> None:
        """NIC -> TAP: a ring batch's frames, written from the receive loop itself."""
        if not fds:
            dropped["rx"] += len(batch)
            return
        for rx in batch:
            try:
                os.write(fds[0], rx_bytes(rx))
            except OSError:  # the TAP is down or its queue full: the frame is lost
                dropped["rx"] += 1

    nic.on_frames = to_tap  # frames before the TAP is open are dropped (counted)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(nic.receive_loop)
            await nic.connect()
            await nic.device_add()
            mtu, mac, offloads = nic.mtu, nic.mac, nic.offloads
            fds.append(
                await trio.to_thread.run_sync(
                    lambda: open_guest_tap(ifname, netns, mtu, mac, offloads)
                )
            )
            nursery.start_soon(to_host, fds[0])
            where = f" in namespace {netns}" if netns else ""
            text = ":".join(f"{b:02x}" for b in nic.mac)
            say(f"netvsc NIC {text} (MTU {nic.mtu}) bridged to TAP {ifname}{where}")
            task_status.started(nic)
    except Exception:  # the TAP or the NIC failed: give the channel back before saying why
        with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
            await vm.close_channel(gch)
        raise
    finally:
        nic.release_views()
        for fd in fds:
            os.close(fd)
        fds.clear()
        if dropped["tx"] or dropped["rx"] or nic.tx_failed:
            log.info(
                "--nic-tap: %s: %d frames from the TAP dropped, %d to it lost, %d sends failed",
                ifname, dropped["tx"], dropped["rx"], nic.tx_failed,
            )  # fmt: skip
