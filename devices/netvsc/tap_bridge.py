"""The simulated guest's NIC bridged to a TAP device (`vmbusd vm --nic-tap NAME
[--netns NS]`): the TAP plays the guest's eth0, so real programs in NS send and
receive through guest netvsc VSC -> VMBus rings -> vmbusd's netvsc VSP -> its
backend, and back.

The guest side is the netvsc VSC (vsc.py) doing Linux 6.1's init on the first
netvsc offer; the TAP is the same tap backend vmbusd uses (created or attached by
name, moved into NS by being made there), given the NIC's MAC (the address the
host's RNDIS reports, as hv_netvsc sets it on eth0) and its MTU. Frames the kernel
writes to the TAP go out through send sections (or GPA direct when larger), an
inline 802.1Q tag as the VLAN PPI as hv_netvsc sends it; received frames get their
tag back inline. One queue (the primary channel); the guest asks for MTU 9000 and
takes what the host allows (min of the two, as the MTU limit of hv_netvsc does).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from devices.netvsc import rndis as rn
from devices.netvsc.backends.base import Frame, NicInfo, vlan_insert
from devices.netvsc.backends.tap import TapBackend
from devices.netvsc.vsc import NetvscGuest
from devices.netvsc.vsp import NETVSC_IF_TYPE
from vmbus.cliutil import UserError
from vmbus.gpadl import PAGE_SIZE
from vmbus.guest.vm import SimulatedVm

log = logging.getLogger(__name__)

GUEST_MTU = 9000  # what the guest asks for; the host's MTU bounds it
TX_BACKLOG = 1024  # frames from the TAP waiting for a send section before drops
RING_SIZE = 256 * PAGE_SIZE
CLOSE_TIMEOUT_S = 5.0


def _vlan_of(value: int | None) -> rn.Vlan | None:
    if value is None:
        return None
    return rn.Vlan(value >> 4 & 0xFFF, value & 7, bool(value & 8))


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
    tap = TapBackend(ifname=ifname, netns=netns)
    backlog_in, backlog_out = trio.open_memory_channel[Frame](TX_BACKLOG)
    dropped = 0

    def from_tap(frames: list[Frame]) -> None:
        nonlocal dropped
        for f in frames:
            try:
                backlog_in.send_nowait(f)
            except trio.WouldBlock:
                dropped += 1

    async def to_host() -> None:
        async for f in backlog_out:
            ppis = ((rn.PpiType.IEEE_8021Q, f.vlan.value()),) if f.vlan is not None else ()
            await nic.send_frame(f.data, 0, ppis)

    async def to_tap() -> None:
        async for rx in nic.frames:
            vlan = _vlan_of(rx.vlan)
            tap.transmit(0, [Frame(rx.frame if vlan is None else vlan_insert(rx.frame, vlan))])

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(nic.receive_loop)
            await nic.connect()
            await nic.device_add()
            tap.mac = nic.mac
            info = NicInfo(nic.mac, nic.mtu, 1)
            await nursery.start(tap.run, info, from_tap)
            nursery.start_soon(to_host)
            nursery.start_soon(to_tap)
            where = f" in namespace {netns}" if netns else ""
            mac = ":".join(f"{b:02x}" for b in nic.mac)
            say(f"netvsc NIC {mac} (MTU {nic.mtu}) bridged to TAP {ifname}{where}")
            task_status.started(nic)
    except Exception:  # the TAP or the NIC failed: give the channel back before saying why
        with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
            await vm.close_channel(gch)
        raise
    finally:
        if dropped:
            log.info("--nic-tap: %d frames from %s dropped (no send section free)", dropped, ifname)
