"""Sub-channels: declared up front in the offer, and added at the device's request."""

from __future__ import annotations

import socket
import uuid

import trio

from devices.echo import EchoDevice
from vmbus import attach
from vmbus.channel import Channel
from vmbus.device import MAX_SUBCHANNELS, Device, DeviceContext, DeviceOffer
from vmbus.guest.vm import SimulatedVm
from vmbus.ring import OutPacket
from vmbus.server import VmSession

RING = 32 * 1024
SUB_IF = uuid.UUID("0c3f2a10-5b1e-4d7e-9a44-2f6e8d1c0b01")


class SubEcho(Device):
    """Echoes; on the primary, a packet b'sub:N' asks for N sub-channels in all
    (as storvsc's CREATE_SUB_CHANNELS does) and is answered with how many exist."""

    if_type = SUB_IF
    name = "subecho"
    packet_types = 1 << 6

    def __init__(self, sub_channels: int = 0) -> None:
        super().__init__()
        self._static = sub_channels

    @property
    def offer(self) -> DeviceOffer:
        return DeviceOffer(
            self.if_type,
            self.instance,
            sub_channels=self._static,
            max_subchannels=MAX_SUBCHANNELS,
        )

    async def serve(self, channel: Channel, ctx: DeviceContext) -> None:
        while True:
            batch = await channel.receive()
            out = []
            for pkt in batch:
                body = bytes(pkt.payload).rstrip(b"\0")
                if ctx.sub_channel_index == 0 and body.startswith(b"sub:"):
                    relids = await ctx.enable_subchannels(int(body[4:]))
                    body = b"got:%d" % len(relids)
                out.append(OutPacket(6, 0, pkt.trans_id, [body]))
            await channel.send(out)


async def _session(dev: Device):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    host = attach.AttachConnection(trio.socket.from_stdlib_socket(a))
    vmm = attach.AttachConnection(trio.socket.from_stdlib_socket(b))
    return VmSession(host, [dev], vm_label="sub"), vmm


async def _ask(ch: Channel, text: bytes) -> bytes:
    await ch.send([OutPacket(6, 0, 1, [text])])
    batch = await ch.receive()
    (pkt,) = list(batch)
    return bytes(pkt.payload).rstrip(b"\0")


async def test_subchannels_on_request_and_up_front() -> None:
    dev = SubEcho(sub_channels=1)
    session, vmm = await _session(dev)
    vm = SimulatedVm(ram_size=32 << 20)
    try:
        async with trio.open_nursery() as n:
            n.start_soon(session.run)
            await vm.start(vmm, n)
            offers = sorted(vm.find_offers(SUB_IF), key=lambda o: o.sub_channel_index)
            assert [o.sub_channel_index for o in offers] == [0, 1]  # declared up front
            primary = await vm.open_channel(offers[0], RING)
            assert await _ask(primary.channel, b"sub:3") == b"got:3"
            with trio.fail_after(5):
                while len(vm.find_offers(SUB_IF)) < 4:
                    await vm.offer_events.receive()
            subs = sorted(vm.find_offers(SUB_IF), key=lambda o: o.sub_channel_index)[1:]
            assert [o.sub_channel_index for o in subs] == [1, 2, 3]
            assert {o.if_instance for o in subs} == {dev.instance}
            opened = [await vm.open_channel(o, RING) for o in subs]
            for k, gch in enumerate(opened):
                for word in (b"a", b"bb" * k, b"sub:5"):  # 'sub:' only means something on 0
                    assert await _ask(gch.channel, word) == word
            # a guest asking for more than the cap gets what is left
            assert await _ask(primary.channel, b"sub:1000") == b"got:%d" % MAX_SUBCHANNELS
            for gch in opened:  # sub-channels close before the primary, as Linux does
                await vm.close_channel(gch)
            await vm.close_channel(primary)
            await vm.unload()
            n.cancel_scope.cancel()
    finally:
        vm.close()


async def test_plain_device_gets_no_surprise_subchannels() -> None:
    session, vmm = await _session(EchoDevice())
    vm = SimulatedVm(ram_size=16 << 20)
    try:
        async with trio.open_nursery() as n:
            n.start_soon(session.run)
            await vm.start(vmm, n)
            assert len(vm.offers) == 1
            n.cancel_scope.cancel()
    finally:
        vm.close()
