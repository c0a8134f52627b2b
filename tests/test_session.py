"""Session features driven from inside vmbusd: hot-add, hot-remove, guest reset.

These need the service's own API (a device added or removed at runtime), so the
service (`local_service`: `serve_listener` on a real socket) and the simulated VM
share this process.
"""

from __future__ import annotations

import pytest
import trio
from conftest import LocalService, OpenChannel

from devices.echo import ECHO_IF_TYPE, EchoDevice
from vmbus.guest.vm import SimulatedVm
from vmbus.guest.workloads import echo_mixed

RING = 64 * 1024
MAXP = RING // 4 - 64

pytestmark = pytest.mark.timeout(60)


async def test_hot_add_and_hot_remove(local_service: LocalService, local_vm: SimulatedVm) -> None:
    vm = local_vm
    session = local_service.session()
    (first,) = session.devices
    assert len(vm.find_offers(ECHO_IF_TYPE)) == 1
    # hot-add: a new OFFERCHANNEL reaches the running guest
    second = EchoDevice()
    await session.add_device(second)
    with trio.fail_after(5):
        while len(vm.find_offers(ECHO_IF_TYPE)) < 2:
            await vm.offer_events.receive()
    new = next(o for o in vm.find_offers(ECHO_IF_TYPE) if o.if_instance == second.instance)
    ch = await vm.open_channel(new, RING)
    await echo_mixed(ch.channel, 300, MAXP)
    # hot-remove while open: rescind, the guest closes and releases the relid
    await session.remove_device(second)
    with trio.fail_after(5):
        await vm.wait_rescind(new.relid)
    await vm.release_offer(new.relid)
    with trio.fail_after(5):
        while new.relid in session.open or new.relid in session.bus.relids():
            await trio.sleep(0.01)
    # the other device is untouched
    (old,) = vm.find_offers(ECHO_IF_TYPE)
    assert old.if_instance == first.instance
    ch2 = await vm.open_channel(old, RING)
    await echo_mixed(ch2.channel, 300, MAXP)
    await vm.close_channel(ch2)
    # and the released relid can be used again by a new hot-add
    third = EchoDevice()
    await session.add_device(third)
    with trio.fail_after(5):
        while len(vm.find_offers(ECHO_IF_TYPE)) < 2:
            await vm.offer_events.receive()
    await vm.unload()


async def test_guest_reset_drops_channels_and_renegotiates(
    local_service: LocalService, local_vm: SimulatedVm, open_channel: OpenChannel
) -> None:
    vm = local_vm
    session = local_service.session()
    ch = await open_channel(vm, EchoDevice)
    await echo_mixed(ch.channel, 200, MAXP)
    assert session.open
    await vm.reboot()
    assert not session.open, "a reset must drop every channel"
    ch = await open_channel(vm, EchoDevice)
    await echo_mixed(ch.channel, 200, MAXP)
    await vm.close_channel(ch)
    await vm.unload()
