"""The device seam: context, per-guest-session lifetime, sub-channels, GPADLs held by a
device, requests with completions, and the error boundary — against a real session
and the simulated guest."""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from vmbus import attach, server
from vmbus import protocol as vp
from vmbus.channel import Channel, CompletedRequest
from vmbus.device import (
    MAX_SUBCHANNELS,
    Device,
    DeviceContext,
    DeviceOffer,
    GuestError,
    guest_error,
)
from vmbus.guest.vm import GuestChannel, SimulatedVm
from vmbus.packet import PacketType, packet_types_mask
from vmbus.ring import VM_PKT_COMP, VM_PKT_DATA_INBAND, OutPacket

RING = 32 * 1024
SEAM_IF = uuid.UUID("5e0a7c3d-1b2a-4c3d-8e9f-0a1b2c3d4e5f")


class Probe(Device):
    """A device scripted by the guest: each inband packet is a command word.

    'sub N'      enable_subchannels(N), answer with the relid count
    'info'       answer with what the context says
    'map H'      hold GPADL H until told to drop it; answer with its first 8 bytes
    'poke X'     write X at the start of the held GPADL (via the view)
    'drop'       let go of the held GPADL
    'keep'       keep a view of the held GPADL past the block (a device bug)
    'stubborn'   hold and ignore teardown requests
    'req N'      send N requests that want completions, answer 'sent'
    'read G L'   ctx.memory.read(G, L)
    'bug'        raise an ordinary exception (a device bug)
    'guest'      raise GuestError (guest misbehaviour)
    """

    if_type = SEAM_IF
    name = "probe"
    packet_types = packet_types_mask(PacketType.INBAND, PacketType.COMPLETION)

    def __init__(self, *, up_front: int = 0, max_subs: int = 4) -> None:
        super().__init__()
        self._up_front = up_front
        self._max_subs = max_subs
        self.resets = 0
        self.closes = 0
        self.negotiated: dict[str, Any] = {}  # per guest session state
        self.completions: list[CompletedRequest] = []
        self.kept: list[memoryview] = []
        self.keep = False
        self.teardown_seen = trio.Event()
        self.release = trio.Event()
        self.mapping: Any = None

    @property
    def offer(self) -> DeviceOffer:
        return DeviceOffer(
            self.if_type,
            self.instance,
            sub_channels=self._up_front,
            max_subchannels=self._max_subs,
        )

    async def reset(self) -> None:
        self.resets += 1
        self.negotiated.clear()

    async def close(self) -> None:
        self.closes += 1

    async def serve(self, channel: Channel, ctx: DeviceContext) -> None:
        channel.track_completions(self.completions.extend, max_in_flight=4)
        async with trio.open_nursery() as n:
            cmds, recv = trio.open_memory_channel[tuple[int, bytes]](100)
            n.start_soon(self._commands, channel, ctx, recv, n)
            while True:
                for pkt in await channel.receive():
                    await cmds.send((pkt.trans_id, bytes(pkt.payload).rstrip(b"\0")))

    async def _hold(
        self, ctx: DeviceContext, handle: int, stubborn: bool, ready: trio.Event, out: list[bytes]
    ) -> None:
        self.release = trio.Event()
        try:
            async with ctx.gpadl(handle) as m:
                out.append(bytes(m.view[:8]))
                self.mapping = m
                ready.set()
                if stubborn:
                    await trio.sleep_forever()
                async with trio.open_nursery() as nn:

                    async def on_teardown() -> None:
                        await m.teardown_requested.wait()
                        self.teardown_seen.set()
                        self.release.set()

                    nn.start_soon(on_teardown)
                    await self.release.wait()
                    nn.cancel_scope.cancel()
                if self.keep:
                    self.kept.append(m.view)  # a device bug: the view outlives the block
        except GuestError as exc:
            out.append(b"refused " + exc.reason.encode())
            ready.set()

    async def _commands(
        self,
        channel: Channel,
        ctx: DeviceContext,
        recv: trio.MemoryReceiveChannel[tuple[int, bytes]],
        nursery: trio.Nursery,
    ) -> None:
        async for tid, body in recv:
            word, _, arg = body.partition(b" ")
            reply = b"ok"
            if word == b"sub":
                reply = b"%d" % len(await ctx.enable_subchannels(int(arg)))
            elif word == b"info":
                self.negotiated["seen"] = True
                reply = f"{ctx.vm_name} {ctx.session_id} {ctx.version:#x} {ctx.relid}".encode()
            elif word in (b"map", b"stubborn"):
                ready, out = trio.Event(), []
                nursery.start_soon(self._hold, ctx, int(arg), word == b"stubborn", ready, out)
                await ready.wait()
                reply = out[0]
            elif word == b"poke":
                self.mapping.view[: len(arg)] = arg
            elif word in (b"keep", b"drop"):
                self.keep = word == b"keep"
                self.release.set()
            elif word == b"req":
                await channel.post_requests(
                    [OutPacket(VM_PKT_DATA_INBAND, 0, 0, [b"q%d" % i]) for i in range(int(arg))],
                    [f"ctx{i}" for i in range(int(arg))],
                )
                reply = b"sent"
            elif word == b"read":
                gpa, length = (int(x) for x in arg.split())
                try:
                    reply = ctx.memory.read(gpa, length)[:16]
                except GuestError as exc:
                    reply = b"refused " + exc.reason.encode()
            elif word == b"bug":
                raise ValueError("deliberate device bug")
            elif word == b"guest":
                guest_error("deliberate guest error")
            await channel.send([OutPacket(VM_PKT_DATA_INBAND, 0, tid, [reply])])


@asynccontextmanager
async def running(dev: Probe, **vm_kw: Any) -> AsyncIterator[tuple[SimulatedVm, server.VmSession]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    host = attach.AttachConnection(trio.socket.from_stdlib_socket(a))
    vmm = attach.AttachConnection(trio.socket.from_stdlib_socket(b))
    session = server.VmSession(host, [dev], vm_label="seam")
    vm = SimulatedVm(ram_size=32 << 20, **vm_kw)
    try:
        async with trio.open_nursery() as n:
            n.start_soon(session.run)
            await vm.start(vmm, n)
            yield vm, session
            n.cancel_scope.cancel()
    finally:
        for gch in vm.channels.values():  # the guest's own views of its rings
            gch.channel.release()
            gch.mapping.close()
        vm.close()


async def ask(gch: GuestChannel, text: bytes, tid: int = 7) -> bytes:
    await gch.channel.send([OutPacket(VM_PKT_DATA_INBAND, 0, tid, [text])])
    with trio.fail_after(10):
        while True:
            for pkt in await gch.channel.receive():
                if pkt.type == VM_PKT_DATA_INBAND and pkt.trans_id == tid:
                    return bytes(pkt.payload).rstrip(b"\0")


async def open_primary(vm: SimulatedVm) -> GuestChannel:
    (offer,) = [o for o in vm.find_offers(SEAM_IF) if o.sub_channel_index == 0]
    return await vm.open_channel(offer, RING)


async def wait_offers(vm: SimulatedVm, n: int) -> None:
    with trio.fail_after(5):
        while len(vm.find_offers(SEAM_IF)) < n:
            await vm.offer_events.receive()


# --- context ---------------------------------------------------------------------------


async def test_context_carries_vm_session_and_version() -> None:
    dev = Probe()
    async with running(dev, vm_id="ctxvm") as (vm, session):
        gch = await open_primary(vm)
        name, sid, version, relid = (await ask(gch, b"info")).decode().split()
        assert name == "ctxvm" and sid == session.session_id and len(sid) == 8
        assert int(version, 16) == vm.version == vp.VERSION_WIN10_V5_3
        assert int(relid) == gch.offer.relid


async def test_guest_memory_reads_are_bounds_checked() -> None:
    dev = Probe()
    async with running(dev) as (vm, _session):
        gch = await open_primary(vm)
        ram = vm.ram.regions[0]
        vm.memory.write(ram.gpa + 4096, b"hello, host")
        assert await ask(gch, b"read %d 11" % (ram.gpa + 4096)) == b"hello, host"
        end = max(r.gpa + r.size for r in vm.ram.regions)
        got = await ask(gch, b"read %d 16" % (end - 8))
        assert got.startswith(b"refused GPA range")
        assert (await ask(gch, b"read %d 1" % (1 << 62))).startswith(b"refused")


# --- sub-channels -----------------------------------------------------------------------


async def test_enable_subchannels_is_idempotent_capped_and_grows_by_the_difference() -> None:
    dev = Probe(up_front=1, max_subs=3)
    async with running(dev) as (vm, _session):
        assert len(vm.find_offers(SEAM_IF)) == 2  # primary + the one declared up front
        gch = await open_primary(vm)
        assert await ask(gch, b"sub 1") == b"1"  # exists already: nothing new
        assert await ask(gch, b"sub 2") == b"2"
        await wait_offers(vm, 3)
        assert await ask(gch, b"sub 2") == b"2"  # same count again: nothing new
        assert await ask(gch, b"sub 1") == b"2"  # smaller: keeps what exists
        assert await ask(gch, b"sub 100") == b"3"  # capped by the offer's maximum
        await wait_offers(vm, 4)
        await trio.sleep(0.05)
        subs = sorted(o.sub_channel_index for o in vm.find_offers(SEAM_IF))
        assert subs == [0, 1, 2, 3]  # never more than the cap, no duplicates


async def test_runtime_subchannels_are_forgotten_on_guest_reset() -> None:
    dev = Probe(up_front=1, max_subs=3)
    async with running(dev) as (vm, _session):
        gch = await open_primary(vm)
        assert await ask(gch, b"sub 3") == b"3"
        await wait_offers(vm, 4)
        await vm.close_channel(gch)
        await vm.unload()
        await vm.reconnect()
        subs = sorted(o.sub_channel_index for o in vm.find_offers(SEAM_IF))
        assert subs == [0, 1]  # the runtime ones went with the old guest session
        gch = await open_primary(vm)
        assert await ask(gch, b"sub 2") == b"2"  # and can be enabled again
        await wait_offers(vm, 3)


async def test_offer_refuses_more_subchannels_than_the_bus_allows() -> None:
    with pytest.raises(ValueError):
        DeviceOffer(SEAM_IF, uuid.uuid4(), max_subchannels=MAX_SUBCHANNELS + 1)


# --- per guest session lifetime ---------------------------------------------------------


async def test_device_is_reset_on_unload_reconnect_and_vmm_reset_and_closed_once() -> None:
    dev = Probe()
    async with running(dev) as (vm, _session):
        gch = await open_primary(vm)
        await ask(gch, b"info")
        assert dev.negotiated == {"seen": True} and dev.resets == 0
        await vm.unload()
        assert dev.resets == 1 and dev.negotiated == {}
        await vm.reconnect()  # a new session after UNLOAD: the old one was reset already
        assert dev.resets == 1
        gch = await open_primary(vm)
        await ask(gch, b"info")
        await vm.reconnect()  # INITIATE_CONTACT with the channel still open
        with trio.fail_after(5):
            while dev.resets < 2:
                await trio.sleep(0.01)
        assert dev.negotiated == {}
        gch = await open_primary(vm)
        await ask(gch, b"info")
        await vm.reboot()  # the VMM's reset
        with trio.fail_after(5):
            while dev.resets < 3:
                await trio.sleep(0.01)
        assert dev.closes == 0
    with trio.fail_after(5):
        while dev.closes == 0:
            await trio.sleep(0.01)
    assert dev.closes == 1


# --- GPADLs a device holds --------------------------------------------------------------


async def test_device_maps_a_guest_gpadl_and_teardown_waits_for_it() -> None:
    dev = Probe()
    async with running(dev) as (vm, session):
        gch = await open_primary(vm)
        relid = gch.offer.relid
        handle, pfns = await vm.create_buffer_gpadl(relid, 5 * 4096)
        vm.memory.write(pfns[0] << 12, b"SENDBUF!")
        assert await ask(gch, b"map %d" % handle) == b"SENDBUF!"
        await ask(gch, b"poke HOSTDATA")
        assert vm.memory.read(pfns[0] << 12, 8) == b"HOSTDATA"  # same pages, not a copy
        # The guest tears it down while the device holds it: the device is told, lets
        # go, and only then does GPADL_TORNDOWN arrive.
        with trio.fail_after(5):
            await vm.teardown_buffer_gpadl(relid, handle, pfns)
        assert dev.teardown_seen.is_set()
        assert session.bus is not None and session.bus.gpadl_count == 1  # the ring only


async def test_unknown_or_foreign_gpadl_is_refused_as_guest_error() -> None:
    dev = Probe(up_front=1)
    async with running(dev) as (vm, _session):
        gch = await open_primary(vm)
        sub = next(o for o in vm.find_offers(SEAM_IF) if o.sub_channel_index == 1)
        assert (await ask(gch, b"map 12345")).startswith(b"refused no created GPADL")
        handle, _pfns = await vm.create_buffer_gpadl(sub.relid, 4096)  # another channel's
        assert b"belongs to relid" in await ask(gch, b"map %d" % handle)


async def test_device_that_keeps_a_gpadl_past_teardown_gets_its_channel_reset(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(server, "GPADL_RELEASE_GRACE_S", 0.2)
    dev = Probe()
    async with running(dev) as (vm, _session):
        gch = await open_primary(vm)
        relid = gch.offer.relid
        handle, pfns = await vm.create_buffer_gpadl(relid, 4096)
        await ask(gch, b"stubborn %d" % handle)
        with caplog.at_level(logging.WARNING), trio.fail_after(5):
            await vm.teardown_buffer_gpadl(relid, handle, pfns)  # completes: bounded
            await vm.wait_rescind(relid)  # the channel was reset
        assert any(
            "past" in r.message or "after the guest tore it down" in r.message
            for r in caplog.records
        )


async def test_view_kept_past_the_block_no_longer_reaches_guest_memory(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dev = Probe()
    async with running(dev) as (vm, _session):
        gch = await open_primary(vm)
        relid = gch.offer.relid
        handle, pfns = await vm.create_buffer_gpadl(relid, 4096)
        vm.memory.write(pfns[0] << 12, b"GUESTPG!")
        await ask(gch, b"map %d" % handle)
        with caplog.at_level(logging.ERROR):
            await ask(gch, b"keep")
            with trio.fail_after(5):
                await vm.teardown_buffer_gpadl(relid, handle, pfns)
        (view,) = dev.kept
        assert bytes(view[:8]) == b"\0" * 8  # cut off: private zero pages
        view[:8] = b"LATEWRIT"  # a late write lands in private memory ...
        assert vm.memory.read(pfns[0] << 12, 8) == b"GUESTPG!"  # ... never in the guest's
        assert any("outlived ctx.gpadl()" in r.message for r in caplog.records)
        view.release()


# --- requests and completions -----------------------------------------------------------


async def test_requests_complete_and_bad_completions_are_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dev = Probe()
    async with running(dev) as (vm, session):
        gch = await open_primary(vm)
        await gch.channel.send([OutPacket(VM_PKT_DATA_INBAND, 0, 9, [b"req 3"])])
        reqs = []
        with trio.fail_after(5):
            while len(reqs) < 4:
                for pkt in await gch.channel.receive():
                    reqs.append((pkt.trans_id, bytes(pkt.payload).rstrip(b"\0")))
                    assert bool(pkt.flags & 1) == (reqs[-1][1] != b"sent")  # COMPLETION_REQ.
        assert reqs.pop() == (9, b"sent")
        assert [b for _, b in reqs] == [b"q0", b"q1", b"q2"]
        assert len({t for t, _ in reqs}) == 3 and all(t for t, _ in reqs)
        good = [OutPacket(VM_PKT_COMP, 0, t, [b"done:" + b]) for t, b in reqs]
        bad = [OutPacket(VM_PKT_COMP, 0, t, [b"x"]) for t in (0, 999_999, reqs[0][0])]
        with caplog.at_level(logging.WARNING):
            await gch.channel.send(good + bad)
            assert await ask(gch, b"info") != b""  # the channel lives on
        assert [(c.context, c.payload.rstrip(b"\0")) for c in dev.completions] == [
            ("ctx0", b"done:q0"),
            ("ctx1", b"done:q1"),
            ("ctx2", b"done:q2"),
        ]
        (oc,) = session.open.values()
        assert oc.channel.stats.bad_completions == 3
        assert oc.channel.stats.completions_in == 3
        assert sum("transaction id" in r.message for r in caplog.records) == 1  # logged once


async def test_in_flight_cap_stalls_only_the_requests() -> None:
    dev = Probe()  # max_in_flight=4
    async with running(dev) as (vm, session):
        gch = await open_primary(vm)
        await gch.channel.send([OutPacket(VM_PKT_DATA_INBAND, 0, 9, [b"req 6"])])
        seen: list[int] = []
        with trio.move_on_after(0.5):
            while True:
                for pkt in await gch.channel.receive():
                    seen.append(pkt.trans_id)
        assert len(seen) == 4  # the cap: two requests wait for room
        (oc,) = session.open.values()
        assert oc.channel.in_flight == 4
        await gch.channel.send([OutPacket(VM_PKT_COMP, 0, t, [b""]) for t in seen])
        with trio.fail_after(5):
            while len(seen) < 6:
                for pkt in await gch.channel.receive():
                    if pkt.trans_id != 9:
                        seen.append(pkt.trans_id)


# --- the error boundary ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("cmd", "level", "words"),
    [
        (b"bug", logging.ERROR, "device bug in probe: ValueError: deliberate device bug (at "),
        (b"guest", logging.WARNING, "guest broke the probe protocol: deliberate guest error"),
    ],
)
async def test_escaping_exception_resets_only_that_channel_with_one_line(
    cmd: bytes, level: int, words: str, caplog: pytest.LogCaptureFixture
) -> None:
    dev = Probe(up_front=1)
    async with running(dev) as (vm, _session):
        gch = await open_primary(vm)
        sub = next(o for o in vm.find_offers(SEAM_IF) if o.sub_channel_index == 1)
        sgch = await vm.open_channel(sub, RING)
        with caplog.at_level(logging.DEBUG, logger="vmbus"):
            await sgch.channel.send([OutPacket(VM_PKT_DATA_INBAND, 0, 1, [cmd])])
            with trio.fail_after(5):
                await vm.wait_rescind(sub.relid)
        lines = [r for r in caplog.records if r.levelno >= logging.WARNING and "relid" in r.message]
        assert len(lines) == 1, [r.message for r in lines]
        assert lines[0].levelno == level and words in lines[0].message
        assert lines[0].exc_info is None  # one line, no traceback at that level
        assert await ask(gch, b"info") != b""  # the primary carries on
        await vm.release_offer(sub.relid)
        await wait_offers(vm, 2)  # the sub-channel comes back


def test_guest_error_carries_status() -> None:
    exc = GuestError("bad field", status=0xC0000001)
    assert exc.status == 0xC0000001 and exc.reason == "bad field"
    with pytest.raises(GuestError) as info:
        guest_error("x")
    assert info.value.status is None
