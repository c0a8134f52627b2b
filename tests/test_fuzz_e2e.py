"""End-to-end hostile-guest fuzzer: seeded random abuse against a real `vmbusd serve`.

One vmbusd process (2 echo devices) serves every seed of this module. Per seed, while
a well-behaved "bystander" VM echoes traffic the whole time (it must never see an
error: VM isolation), hostile simulated VMs
  (a) post random and mutated VMBus control messages, interleaved with legitimate
      GPADLs, opens, echoes and closes (and reboots / reconnects after the ones that
      reset their own bus);
  (b) abuse the rings of an open channel: the guest-writable header fields (upstream
      write_index and pending_send_sz, downstream read_index and interrupt_mask,
      feature_bits), garbage descriptors and data, spurious kicks, and a guest that
      stops reading, while their other channel must keep echoing exactly
      (channel isolation);
  (c) build GPADLs with PFNs outside RAM, duplicated PFNs, 8190 pages, unfinished
      headers, bodies for unknown or complete handles, and bad teardowns;
  (d) abuse the attach protocol on separate connections: bad memory regions, a
      VMM sending bind/unbind, posts on connection ids vmbusd does not own, resets
      with odd epochs, garbage maps, disconnects mid-hello, mid-open, mid-traffic.
After each seed: vmbusd is alive, its log has no traceback, a fresh VM opens an
echo channel and echoes 200 mixed packets exactly, the log grew by a bounded number
of lines per hostile action, and vmbusd's RSS, fd count and VMA count stay within
a fixed bound of what they were after the first seed: fds +4, VMAs +64, RSS
+24 MiB (FD_SLACK, VMA_SLACK, RSS_SLACK_KB). Observed over the 8 seeds: fds 9 -> 9,
VMAs 238 -> 239, RSS 33.7 -> 34.9 MiB (before the channel.py fix, RSS climbed by
16 MiB per seed after a 32 MiB ring). Two more seeds run against a vmbusd using the
pure-Python twins (VMBUSD_NATIVE=0). About 40 s in all.
"""

from __future__ import annotations

import contextlib
import os
import random
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
from e2e_support import ServeProcess, guest, serve_process
from fuzz_support import (
    ControlFuzzer,
    Resources,
    RingAbuser,
    drain_until_closed,
    gpadl_messages_raw,
    held,
    poke_u32,
    raw_vmm,
    resets_bus,
    send_raw_datagram,
)

import vmbus.guest.vm as guest_vm
from devices.echo import ECHO_IF_TYPE
from vmbus import attach
from vmbus import protocol as vp
from vmbus.guest.vm import SimulatedVm
from vmbus.guest.workloads import echo_mixed
from vmbus.memory import sealed_memfd
from vmbus.ring import OFF_INTERRUPT_MASK, OutPacket, SendBatch

RING = 64 * 1024
MAXP = RING // 4 - 64
SEEDS = [11, 22, 33, 44, 55, 66, 77, 88]
TWIN_SEEDS = [101, 202]  # vmbusd with VMBUSD_NATIVE=0
SEED_BUDGET_S = 14.0  # trio.fail_after for one seed's hostile phases

CONTROL_MESSAGES = 1500  # hostile control messages per seed (plus the GPADL phase's)
RING_STEPS = 60
RING_ROUNDS = 4
HOSTILE_CONTROL_TIMEOUT_S = 1.0  # SimulatedVm's wait for an answer, for hostile VMs

# Resource bounds, relative to the snapshot after the first seed. vmbusd keeps no
# per-VM state once a VM is gone, so fds and VMAs must come back to (nearly) the
# same count; RSS may wobble with the allocator (arenas, freelists) but must not
# grow with the number of seeds.
FD_SLACK = 4
VMA_SLACK = 64
RSS_SLACK_KB = 24 * 1024
LOG_LINES_PER_ACTION = 3  # "one clear log line" (plus session start/stop lines)
LOG_LINES_FIXED = 400

pytestmark = pytest.mark.timeout(60)


@dataclass
class Ledger:
    baseline: Resources | None = None
    samples: list[tuple[int, Resources]] = field(default_factory=list)


@pytest.fixture(scope="module")
def vmbusd(tmp_path_factory: pytest.TempPathFactory) -> ServeProcess:
    with serve_process(tmp_path_factory.mktemp("fuzz"), ["echo", "echo"]) as sp:
        yield sp


@pytest.fixture(scope="module")
def ledger() -> Ledger:
    return Ledger()


@pytest.fixture(scope="module")
def vmbusd_twin(tmp_path_factory: pytest.TempPathFactory) -> ServeProcess:
    saved = os.environ.get("VMBUSD_NATIVE")
    os.environ["VMBUSD_NATIVE"] = "0"  # read by the child only (copied at spawn)
    try:
        cm = serve_process(tmp_path_factory.mktemp("fuzz-twin"), ["echo", "echo"])
        sp = cm.__enter__()
    finally:
        if saved is None:
            del os.environ["VMBUSD_NATIVE"]
        else:
            os.environ["VMBUSD_NATIVE"] = saved
    try:
        yield sp
    finally:
        cm.__exit__(None, None, None)


@pytest.fixture(scope="module")
def ledger_twin() -> Ledger:
    return Ledger()


@dataclass
class Tally:
    actions: int = 0  # hostile actions that may each leave a log line
    guest_failures: dict[str, int] = field(default_factory=dict)

    def failed(self, what: str, exc: BaseException) -> None:
        key = f"{what}: {type(exc).__name__}"
        self.guest_failures[key] = self.guest_failures.get(key, 0) + 1


async def attempt(tally: Tally, what: str, fn, *args, timeout: float = 2.0, **kw):
    """A hostile guest's own request: may fail (its state is whatever it broke)."""
    with trio.move_on_after(timeout) as cs:
        try:
            return await fn(*args, **kw)
        except Exception as exc:  # the guest's side of things only
            tally.failed(what, exc)
            return None
    if cs.cancelled_caught:
        tally.failed(what, TimeoutError())
    return None


@contextlib.asynccontextmanager
async def hostile(path: str, vm_id: str) -> AsyncIterator[SimulatedVm]:
    """A simulated VM that will misbehave; on exit its views are dropped and its
    socket closed with no UNLOAD or CLOSECHANNEL (an abrupt disconnect)."""
    async with guest(path, vm_id=vm_id, ram_size=16 << 20) as vm:
        try:
            yield vm
        finally:
            for gch in list(vm.channels.values()):
                gch.channel.release()
                gch.mapping.close()
            vm.channels.clear()


async def close_quietly(vm: SimulatedVm, gch, tally: Tally) -> None:
    relid = gch.offer.relid
    offer = vm.offers.get(relid)
    if offer is not None and offer.rescinded:
        await attempt(tally, "release", vm.release_offer, relid)
    else:
        await attempt(tally, "close", vm.close_channel, gch)
    if relid in vm.channels:  # the close failed half-way: drop our views anyway
        vm.channels.pop(relid)
        gch.channel.release()
        gch.mapping.close()


# --- (a) control messages ---------------------------------------------------------------


async def phase_control(sp: ServeProcess, rng: random.Random, tally: Tally) -> None:
    sent = 0
    session = 0
    while sent < CONTROL_MESSAGES:
        session += 1
        async with hostile(sp.path, f"ctl{session}") as vm:
            fz = ControlFuzzer(
                rng,
                relids=[o.relid for o in vm.find_offers(ECHO_IF_TYPE)],
                ram_pfns=vm.ram.alloc_pages(16),
            )
            while sent < CONTROL_MESSAGES:
                if sent % 30 == 0:
                    await legit_op(vm, fz, rng, tally)
                payload = fz.message()
                conn_id = 1 if rng.random() < 0.9 else 4
                await vm.post_raw(payload, conn_id)
                sent += 1
                tally.actions += 1
                if rng.random() < 0.1:
                    await trio.sleep(0.002)  # let some answers come back in between
                if resets_bus(payload):
                    if rng.random() < 0.5:
                        break  # abrupt disconnect, new session
                    await trio.sleep(0.01)
                    if await attempt(tally, "reboot", vm.reboot, timeout=3.0) is None and (
                        not vm._all_offers.is_set()
                    ):
                        break
                    fz.relids = [o.relid for o in vm.find_offers(ECHO_IF_TYPE)] or fz.relids


async def legit_op(vm: SimulatedVm, fz: ControlFuzzer, rng: random.Random, tally: Tally) -> None:
    """Interleaved well-formed work: open, echo, close, or a plain GPADL."""
    offers = [o for o in vm.find_offers(ECHO_IF_TYPE) if o.relid not in vm.channels]
    r = rng.random()
    if r < 0.4 and offers:
        gch = await attempt(tally, "open", vm.open_channel, rng.choice(offers), RING)
        if gch is not None:
            fz.handles.append(gch.gpadl)
            await attempt(tally, "echo", echo_mixed, gch.channel, 20, MAXP, timeout=1.0)
    elif r < 0.5 and vm.channels:
        # CLOSECHANNEL and OPENCHANNEL back to back (the ClosingReopen path), then a
        # proper close
        gch = rng.choice(list(vm.channels.values()))
        relid, pages = gch.offer.relid, RING // 4096
        for _ in range(rng.randrange(1, 4)):
            await vm.post_raw(vp.CloseChannel(relid).encode())
            await vm.post_raw(vp.OpenChannel(relid, relid, gch.gpadl, 0, pages).encode())
            tally.actions += 2
        await close_quietly(vm, gch, tally)
    elif r < 0.7 and vm.channels:
        gch = rng.choice(list(vm.channels.values()))
        await attempt(tally, "echo", echo_mixed, gch.channel, 20, MAXP, timeout=1.0)
        await close_quietly(vm, gch, tally)
    elif vm.offers:
        relid = rng.choice(list(vm.offers))
        pfns = vm.ram.alloc_pages(rng.randrange(1, 60))
        handle = vm.client._next_handle
        fz.handles.append(handle)
        await attempt(
            tally,
            "gpadl",
            vm._request,
            "gpadl",
            None,
            lambda: vm.client.create_gpadl(relid, pfns),
        )


# --- (b) ring abuse -----------------------------------------------------------------------


async def phase_ring(sp: ServeProcess, rng: random.Random, tally: Tally) -> None:
    async with hostile(sp.path, "ring") as vm:
        for rnd in range(RING_ROUNDS):
            await ring_round(sp, vm, rng, tally, rnd)


async def ring_round(
    sp: ServeProcess, vm: SimulatedVm, rng: random.Random, tally: Tally, rnd: int
) -> None:
    """Open both channels, abuse one, check the other all along, close both."""
    with trio.fail_after(5):  # a reset channel comes back once the guest released it
        while len(offers := vm.find_offers(ECHO_IF_TYPE)) < 2:
            await trio.sleep(0.01)
    gchs = [await vm.open_channel(o, RING) for o in offers]
    for g in gchs:
        await echo_mixed(g.channel, 30, MAXP, seed=rng.randrange(1000))
    rng.shuffle(gchs)
    victim, other = gchs
    abuser = RingAbuser(rng, victim)
    if rng.random() < 0.4:
        # A guest that stops reading: fill both directions, mask, never read.
        batch = SendBatch([OutPacket(6, 1, 1, [b"s" * 3000])])
        for _ in range(60):
            res = victim.channel.writer.write(batch)
            if res.signal:
                victim.kick.signal()
            await trio.sleep(0.0005)
        with held(victim.mapping.downstream_hdr) as h:
            poke_u32(h, OFF_INTERRUPT_MASK, 1)
    for step in range(RING_STEPS):
        abuser.step()
        tally.actions += 1
        if rng.random() < 0.3:
            await trio.sleep(0.001)
        if step % 20 == 19:
            # the VM's other channel must be untouched by the victim's state
            for _ in range(rng.randrange(3)):
                other.kick.signal()  # spurious kicks are harmless
            with trio.fail_after(5):
                await echo_mixed(other.channel, 40, MAXP, seed=step)
    with trio.fail_after(5):
        await echo_mixed(other.channel, 200, MAXP, seed=rnd)
    await close_quietly(vm, victim, tally)
    await close_quietly(vm, other, tally)


# --- (c) GPADLs ---------------------------------------------------------------------------

HOLE_PFN = (8 << 20) >> 12  # the guest's RAM is [0, 8 MiB) and [4 GiB, 4 GiB + 8 MiB)


async def phase_gpadl(sp: ServeProcess, rng: random.Random, tally: Tally) -> None:
    async with hostile(sp.path, "gpadl") as vm:
        offers = vm.find_offers(ECHO_IF_TYPE)
        relid = rng.choice(offers).relid
        ram = vm.ram.alloc_pages(64)

        async def create(pfns: list[int]) -> tuple[int, int | None]:
            handle = vm.client._next_handle
            status = await attempt(
                tally,
                "gpadl",
                vm._request,
                "gpadl",
                None,
                lambda: vm.client.create_gpadl(relid, pfns),
                timeout=5.0,
            )
            tally.actions += 1
            return handle, status

        # PFNs outside RAM: refused with the failure status.
        for bad in (HOLE_PFN, (1 << 40) >> 12, (1 << 52) >> 12, (1 << 64) - 1 >> 12):
            pfns = rng.sample(ram, 5)
            pfns.insert(rng.randrange(6), bad)
            _, status = await create(pfns)
            assert status == vp.STATUS_UNSUCCESSFUL, (hex(bad), status)

        # Duplicated PFNs (even every page the same): the guest's own business; an open
        # on them must not hurt vmbusd.
        same = [rng.choice(ram)] * rng.choice((4, 8, 16))
        handle, status = await create(same)
        assert status == 0
        k = rng.choice((2, len(same) // 2, len(same) - 2))
        st = await attempt(
            tally,
            "open-dup",
            vm._request,
            "open",
            relid,
            lambda: vm.client.open_channel(relid, handle, k),
        )
        tally.actions += 1
        if st != 0:
            vm.client.channels[relid].state = guest_vm.gc._Chan.CLOSED
        else:
            bind = vm._binds.get(relid)
            page = vm.ram.page(same[0])
            for _ in range(40):
                # header fields and data are the same bytes here: write an index or
                # a descriptor-looking thing, then kick
                off = rng.choice((0, 4, 8, 12, 16, 24, rng.randrange(0, 4096, 8)))
                page[off : off + 8] = rng.randbytes(8)
                if rng.random() < 0.5:
                    page[0:4] = struct.pack("<I", rng.randrange(0, 4096 * 4, 8))
                if bind is not None:
                    with contextlib.suppress(OSError):  # closed once vmbusd unbinds
                        os.eventfd_write(bind.kick, 1)
                await trio.sleep(0.001)
            page.release()
            vm.client.close_channel(relid)
            await vm._pump()
        await attempt(tally, "teardown", vm._teardown_gpadl, relid, handle)
        if vm.offers[relid].rescinded:  # the aliased ring was reset: let it come back
            await attempt(tally, "release", vm.release_offer, relid)
            with trio.fail_after(5):
                while len(offers := vm.find_offers(ECHO_IF_TYPE)) < 2:
                    await trio.sleep(0.01)
            relid = rng.choice(offers).relid

        # The biggest GPADL there is (8190 pages, duplicates allowed), then a ring on it.
        big = [rng.choice(ram) for _ in range(vp.MAX_SINGLE_RANGE_PAGES)]
        handle, status = await create(big)
        assert status == 0
        k = rng.choice((2, 4095, 8188))
        st = await attempt(
            tally,
            "open-big",
            vm._request,
            "open",
            relid,
            lambda: vm.client.open_channel(relid, handle, k),
            timeout=5.0,
        )
        tally.actions += 1
        if st == 0:
            vm.client.close_channel(relid)
            await vm._pump()
        else:
            vm.client.channels[relid].state = guest_vm.gc._Chan.CLOSED
        await attempt(tally, "teardown", vm._teardown_gpadl, relid, handle, timeout=5.0)

        # Raw abuse: unfinished headers (past the in-progress cap), bad ranges, bodies
        # for unknown and complete handles, bad teardowns.
        base = 0x5EED0000 + rng.randrange(1 << 12) * 16
        for i in range(rng.choice((10, 70))):
            msgs = gpadl_messages_raw(relid, base + i, [rng.choice(ram) for _ in range(100)])
            await vm.post_raw(msgs[0])  # header only: never completed
            tally.actions += 1
        odd = [
            dict(byte_offset=1),
            dict(byte_offset=4096),
            dict(byte_count=0),
            dict(byte_count=(1 << 32) - 1),
            dict(range_buflen=0),
            dict(range_buflen=9),
            dict(range_buflen=0xFFFF),
        ]
        for j, kw in enumerate(odd):
            for payload in gpadl_messages_raw(relid, base + 0x100 + j, rng.sample(ram, 30), **kw):
                await vm.post_raw(payload)
                tally.actions += 1
        unknown = 0xBAD00000 | rng.randrange(1 << 16)
        await vm.post_raw(vp.GpadlBody(0, unknown, (1, 2, 3)).encode())
        await vm.post_raw(vp.GpadlBody(0, unknown + 2, (1,)).encode()[:17])  # a partial u64
        await vm.post_raw(vp.GpadlTeardown(relid, unknown).encode())
        await vm.post_raw(vp.GpadlTeardown(relid + 1000, base).encode())
        await vm.post_raw(vp.GpadlHeader(9999, unknown + 1, 16, 1, bytes(16)).encode())
        tally.actions += 5
        text = sp.wait_log(f"GPADL_BODY for unknown handle {unknown:#x}", timeout=5)
        lines = [ln for ln in text.splitlines() if f"unknown handle {unknown:#x}" in ln]
        assert len(lines) == 1, f"one log line per rejection, got {lines}"


# --- (d) VMM-level abuse --------------------------------------------------------------------


async def expect_closed(conn: attach.AttachConnection) -> None:
    got = await drain_until_closed(conn, 5.0)
    errors = [m for m in got if isinstance(m, attach.Error)]
    assert errors, f"vmbusd closed without an error message: {got}"
    with contextlib.suppress(Exception):
        await conn.aclose()


def _memfd(size: int) -> int:
    return sealed_memfd("fuzz-ram", size)


async def vmm_bad_region(sp: ServeProcess, rng: random.Random) -> None:
    conn = await raw_vmm(sp.path)
    kind = rng.randrange(6)
    fds: list[int] = []
    try:
        if kind == 0:
            r, w = os.pipe()
            fds = [r, w]
            region = {"gpa": 0, "size": 1 << 20, "fd": 0, "offset": 0}
            await send_raw_datagram(conn, {"t": "memory", "regions": [region]}, [r])
        elif kind == 1:  # longer than the file
            fds = [_memfd(1 << 20)]
            region = {"gpa": 0, "size": 4 << 20, "fd": 0, "offset": 0}
            await send_raw_datagram(conn, {"t": "memory", "regions": [region]}, fds)
        elif kind == 2:  # /dev/null is not a regular file
            fds = [os.open("/dev/null", os.O_RDWR)]
            region = {"gpa": 0, "size": 1 << 20, "fd": 0, "offset": 0}
            await send_raw_datagram(conn, {"t": "memory", "regions": [region]}, fds)
        elif kind == 3:  # unaligned / zero / huge fields
            fds = [_memfd(1 << 20)]
            region = {
                "gpa": rng.choice((1, 4095, (1 << 52), -4096)),
                "size": rng.choice((0, 1, 1 << 20)),
                "fd": 0,
                "offset": rng.choice((0, 7, -1)),
            }
            await send_raw_datagram(conn, {"t": "memory", "regions": [region]}, fds)
        elif kind == 4:  # 60 fds, one region: the rest are "attached but not used"
            fds = [_memfd(1 << 16) for _ in range(60)]
            region = {"gpa": 0, "size": 1 << 16, "fd": 0, "offset": 0}
            await send_raw_datagram(conn, {"t": "memory", "regions": [region]}, fds)
        else:  # good, then hot-plug overlapping
            fds = [_memfd(2 << 20)]
            for gpa in (0, 1 << 20):
                region = {"gpa": gpa, "size": 2 << 20, "fd": 0, "offset": 0}
                await send_raw_datagram(conn, {"t": "memory", "regions": [region]}, fds)
    finally:
        for fd in fds:
            os.close(fd)
    await expect_closed(conn)


async def vmm_wrong_direction(sp: ServeProcess, rng: random.Random) -> None:
    conn = await raw_vmm(sp.path)
    kind = rng.randrange(4)
    fds: list[int] = []
    if kind == 0:
        fds = [os.eventfd(0), os.eventfd(0)]
        msg = {
            "t": "bind",
            "relid": 1,
            "connection_id": 0x2001,
            "vcpu": 0,
            "kick": 0,
            "call": 1,
            "epoch": 0,
        }
    elif kind == 1:
        msg = {"t": "unbind", "relid": rng.randrange(1, 2048), "epoch": 0}
    elif kind == 2:
        msg = {"t": "post", "vcpu": 0, "sint": 2, "payload": b"\x01" + bytes(7), "epoch": 0}
    else:
        msg = {
            "t": "hello",
            "version": 1,
            "role": "vmm",
            "vm_id": "again",
            "vcpus": 1,
            "features": [],
            "software": "",
        }
    await send_raw_datagram(conn, msg, fds)
    for fd in fds:
        os.close(fd)
    await expect_closed(conn)


async def vmm_bad_post(sp: ServeProcess, rng: random.Random) -> None:
    """A post with one bad field: a connection id vmbusd does not own (the VMM must
    answer those itself), a vCPU out of range, or a payload that is not <= 240 bytes."""
    conn = await raw_vmm(sp.path)
    msg = {"t": "post", "connection_id": 1, "vcpu": 0, "payload": b"\x03" + bytes(7)}
    field_, value = rng.choice(
        [
            ("connection_id", rng.choice((0, 2, 3, 5, 0x2001, 0xFFFFFF, 1 << 24, -1, 1.0, "1"))),
            ("vcpu", rng.choice((4096, -1, None))),
            ("payload", rng.choice((bytes(241), "text", None, 5))),
        ]
    )
    msg[field_] = value
    await send_raw_datagram(conn, msg)
    await expect_closed(conn)


CLOSE_DEADLINE_S = 5.0  # vmbusd's answer to a bad VMM message: error (if any) and close


async def vmm_garbage(sp: ServeProcess, rng: random.Random) -> None:
    """A message after hello that is not a valid one (fields of the wrong type or range,
    unknown or missing types, random bytes): vmbusd answers `error protocol` and closes.
    A well-formed `error` from the VMM ends the session too, unanswered (the attach
    docs: "neither side answers an error")."""
    conn = await raw_vmm(sp.path)
    t = rng.choice(("memory", "post", "reset", "bind", "error", "nope", 7, None))
    msg: dict[str, object] = {"t": t}
    for _ in range(rng.randrange(4)):
        key = rng.choice(("epoch", "regions", "payload", "relid", "x", "fd"))
        # every value is out of range or of the wrong type for every field it can land
        # in: (1 << 64) - 1 is the largest integer msgpack carries, no field takes it
        msg[key] = rng.choice((0, -1, (1 << 64) - 1, "s", b"b", [], {}, None, True, 1.5))
    if t == "error":
        msg = {"t": "error", "code": "fuzz", "message": "bye"}
    if rng.random() < 0.9:
        await send_raw_datagram(conn, msg)
        farewell = t == "error"
    else:
        await send_raw_datagram(conn, rng.randbytes(50))
        farewell = False
    got = await drain_until_closed(conn, CLOSE_DEADLINE_S)
    errors = [m for m in got if isinstance(m, attach.Error)]
    if farewell:
        assert got == [], f"vmbusd answered the VMM's error: {got}"
    else:
        assert got == errors and [e.code for e in errors] == [attach.ErrorCode.PROTOCOL], (
            msg,
            got,
        )
    with contextlib.suppress(Exception):
        await conn.aclose()


async def vmm_bad_hello(sp: ServeProcess, rng: random.Random) -> None:
    """A hello vmbusd must refuse: it sends its own hello, then `error` with the code
    the attach docs give for the problem, and closes."""
    conn = await attach.connect(sp.path)
    kind = rng.randrange(4)
    if kind == 0:
        # gone before hello: nothing to read; the seed's end checks vmbusd is alive and
        # holds no more fds than before
        await conn.aclose()
        return
    hello: dict[str, object] = {
        "t": "hello",
        "version": 1,
        "role": "vmm",
        "vm_id": "h",
        "vcpus": 1,
        "features": [],
        "software": "",
    }
    if kind == 1:
        version = rng.choice((0, 2, 1 << 40))
        hello["version"] = version
        # a version vmbusd does not speak vs. a field out of its range
        code = attach.ErrorCode.VERSION if version <= 0xFFFF else attach.ErrorCode.PROTOCOL
    elif kind == 2:
        hello["vcpus"] = rng.choice((0, 4097, -1))  # a VMM has 1..4096
        code = attach.ErrorCode.PROTOCOL
    else:
        hello["role"] = "vmbusd"
        code = attach.ErrorCode.ROLE
    await send_raw_datagram(conn, hello)
    got = await drain_until_closed(conn, CLOSE_DEADLINE_S)
    assert [type(m) for m in got] == [attach.Hello, attach.Error], (hello, got)
    assert got[0].role == "vmbusd" and got[1].code == code, (hello, got)
    with contextlib.suppress(Exception):
        await conn.aclose()


async def vmm_resets(sp: ServeProcess, rng: random.Random, tally: Tally) -> None:
    """Resets with odd (but valid) epochs, some mid-open and mid-traffic; afterwards the
    VM reboots once more and must work; a bad epoch ends the session."""
    async with hostile(sp.path, "resets") as vm:
        (offer, *_) = vm.find_offers(ECHO_IF_TYPE)
        gch = await vm.open_channel(offer, RING)
        async with trio.open_nursery() as n:
            n.start_soon(attempt, tally, "echo", echo_mixed, gch.channel, 400, MAXP)
            await trio.sleep(0.005)
            for epoch in rng.sample((1, 2, 3, 7, 7, 100, (1 << 32) - 1), 4):
                await vm.conn.send(attach.Reset(epoch=epoch))
                tally.actions += 1
                if rng.random() < 0.5:
                    for payload in gpadl_messages_raw(offer.relid, 0x77, [5, 6, 7]):
                        await vm.post_raw(payload)
                    await vm.post_raw(vp.OpenChannel(offer.relid, offer.relid, 0x77, 0, 2).encode())
            n.cancel_scope.cancel()
        vm._reset_epoch = (1 << 32) - 2
        await vm.reboot()
        (offer, *_) = vm.find_offers(ECHO_IF_TYPE)
        gch2 = await vm.open_channel(offer, RING)
        with trio.fail_after(5):
            await echo_mixed(gch2.channel, 100, MAXP)
        gch.channel.release()
        with contextlib.suppress(Exception):
            gch.mapping.close()
        needle = "attach: rejected message from"  # the one line a rejection leaves
        before = sp.log().count(needle)
        bad = rng.choice((0, -1, 1 << 32, "1", None))
        await send_raw_datagram(vm.conn, {"t": "reset", "epoch": bad})
        tally.actions += 1
        with trio.fail_after(5):
            while sp.log().count(needle) == before:
                await trio.sleep(0.02)


async def vmm_disconnect_mid_open(sp: ServeProcess, rng: random.Random, tally: Tally) -> None:
    async with hostile(sp.path, "midopen") as vm:
        offers = vm.find_offers(ECHO_IF_TYPE)
        if rng.random() < 0.5:
            # everything posted back to back, then gone before any answer is read
            o = rng.choice(offers)
            pfns = vm.ram.alloc_pages(32)
            for payload in gpadl_messages_raw(o.relid, 0x99, pfns):
                await vm.post_raw(payload)
            await vm.post_raw(vp.OpenChannel(o.relid, o.relid, 0x99, 0, 16).encode())
            tally.actions += 2
            if rng.random() < 0.5:
                await trio.sleep(0.001)
        else:
            # open channels with traffic in flight both ways, host blocked on a full ring
            gchs = [await vm.open_channel(o, RING) for o in offers]
            batch = SendBatch([OutPacket(6, 1, 9, [b"m" * 2000])])
            for g in gchs:
                for _ in range(40):
                    if g.channel.writer.write(batch).signal:
                        g.kick.signal()
            await trio.sleep(rng.choice((0, 0.001, 0.01)))


async def vmm_stops_reading(sp: ServeProcess, rng: random.Random, tally: Tally) -> None:
    """A VMM that never reads: vmbusd's replies back up in the socket, so its session
    blocks; it must block only itself, and go away cleanly with the connection."""
    async with hostile(sp.path, "deaf") as vm:
        offers = vm.find_offers(ECHO_IF_TYPE)
        gch = await vm.open_channel(rng.choice(offers), RING)
        # Stop the VMM's receive task: from now on nobody reads vmbusd's messages.
        vm.conn._receiving = True  # (the task is parked in recvmsg; leave it there)
        contact = vp.InitiateContact(vp.VERSION_WIN10, 0, 0, 0x7000, 0x8000).encode()
        request = vp.RequestOffers().encode()
        with trio.move_on_after(1.0):
            for _ in range(3000):  # each pair queues ~4 replies for the deaf VMM
                await vm.post_raw(contact)
                await vm.post_raw(request)
                tally.actions += 2
        gch.kick.signal()
        await trio.sleep(0.05)


VmmCase = Callable[[ServeProcess, random.Random], Awaitable[None]]
VMM_CASES: list[VmmCase] = [
    vmm_bad_region,
    vmm_wrong_direction,
    vmm_bad_post,
    vmm_garbage,
    vmm_bad_hello,
]


async def phase_vmm(sp: ServeProcess, rng: random.Random, tally: Tally) -> None:
    for _ in range(6):
        case = rng.choice(VMM_CASES)
        await case(sp, rng)
        tally.actions += 1
    await vmm_disconnect_mid_open(sp, rng, tally)
    await vmm_resets(sp, rng, tally)
    await vmm_stops_reading(sp, rng, tally)


# --- the seeds ------------------------------------------------------------------------------


async def bystander(path: str, stop: trio.Event, seed: int) -> int:
    """A well-behaved VM echoing the whole time: any error here is an isolation bug."""
    rounds = 0
    async with guest(path, vm_id=f"bystander{seed}") as vm:
        (offer, *_) = vm.find_offers(ECHO_IF_TYPE)
        gch = await vm.open_channel(offer, RING)
        try:
            while not stop.is_set():
                with trio.fail_after(10):
                    await echo_mixed(gch.channel, 100, MAXP, seed=seed + rounds)
                rounds += 1
                await trio.sleep(0.005)
            await vm.close_channel(gch)
        finally:
            if vm.channels:  # failed or cancelled: drop the views so the VM can close
                gch.channel.release()
                gch.mapping.close()
    return rounds


async def fresh_vm_echoes(path: str, seed: int) -> None:
    async with guest(path, vm_id=f"fresh{seed}") as vm:
        offers = vm.find_offers(ECHO_IF_TYPE)
        assert len(offers) == 2
        gch = await vm.open_channel(offers[seed % 2], RING)
        await echo_mixed(gch.channel, 200, MAXP, seed=seed)
        await vm.close_channel(gch)


async def settle(pid: int, ledger: Ledger) -> Resources:
    """vmbusd tears sessions down asynchronously: wait until its fd count is back."""
    res = Resources.of(pid)
    if ledger.baseline is None:
        await trio.sleep(0.3)
        return Resources.of(pid)
    with trio.move_on_after(3):
        while (
            res.fds > ledger.baseline.fds + FD_SLACK or res.vmas > ledger.baseline.vmas + VMA_SLACK
        ):
            await trio.sleep(0.05)
            res = Resources.of(pid)
    return res


# Each seed takes about 3.5 s. `-m "not slow"` (a developer's quick run) keeps the
# first two native seeds and the first twin seed; CI runs them all.


def seed_params(seeds: list[int], fast: int) -> list[Any]:
    """The first `fast` seeds as they are, the rest marked slow."""
    return [
        pytest.param(s, marks=pytest.mark.slow) if i >= fast else s for i, s in enumerate(seeds)
    ]


@pytest.mark.parametrize("seed", seed_params(SEEDS, fast=2))
async def test_fuzz_seed(
    seed: int, vmbusd: ServeProcess, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guest_vm, "CONTROL_TIMEOUT_S", HOSTILE_CONTROL_TIMEOUT_S)
    await run_seed(vmbusd, ledger, seed)


@pytest.mark.parametrize("seed", seed_params(TWIN_SEEDS, fast=1))
async def test_fuzz_seed_python_twin(
    seed: int, vmbusd_twin: ServeProcess, ledger_twin: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same abuse against vmbusd running the pure-Python twins (VMBUSD_NATIVE=0)."""
    monkeypatch.setattr(guest_vm, "CONTROL_TIMEOUT_S", HOSTILE_CONTROL_TIMEOUT_S)
    await run_seed(vmbusd_twin, ledger_twin, seed)


async def _run_phases(
    sp: ServeProcess, rng: random.Random, tally: Tally, seed: int, phases
) -> None:
    """The hostile phases while a bystander VM echoes; then vmbusd must serve a fresh VM."""
    stop = trio.Event()
    rounds: list[int] = []

    async def run_bystander() -> None:
        rounds.append(await bystander(sp.path, stop, seed))

    with trio.fail_after(SEED_BUDGET_S + 15):
        async with trio.open_nursery() as n:
            n.start_soon(run_bystander)
            with trio.fail_after(SEED_BUDGET_S):
                for phase in phases:
                    await phase(sp, random.Random(rng.getrandbits(64)), tally)
            stop.set()
        assert rounds and rounds[0] > 0, "the bystander VM never completed a round"
        assert sp.alive(), sp.log()[-3000:]
        await fresh_vm_echoes(sp.path, seed)


async def run_seed(sp: ServeProcess, ledger: Ledger, seed: int) -> None:
    lines_before = len(sp.log().splitlines())
    rng = random.Random(seed)
    tally = Tally()
    phases = [phase_control, phase_ring, phase_gpadl, phase_vmm]
    rng.shuffle(phases)
    try:
        await _run_phases(sp, rng, tally, seed, phases)
    except BaseException:
        log = sp.log()  # what vmbusd said is the first thing to read on a failure
        at = log.find("Traceback")
        excerpt = log[max(0, at - 2000) : at + 6000] if at >= 0 else log[-4000:]
        print(f"seed {seed}: vmbusd log:\n{excerpt}")
        raise
    log = sp.log()
    assert "Traceback" not in log, log[max(0, log.index("Traceback") - 2000) :][:6000]
    assert "session failed" not in log and " ERROR " not in log

    added = len(log.splitlines()) - lines_before
    bound = LOG_LINES_PER_ACTION * tally.actions + LOG_LINES_FIXED
    assert added <= bound, f"log storm: {added} lines for {tally.actions} hostile actions"

    res = await settle(sp.proc.pid, ledger)
    ledger.samples.append((seed, res))
    if ledger.baseline is None:
        ledger.baseline = res
    else:
        b = ledger.baseline
        assert res.fds <= b.fds + FD_SLACK, (b, res)
        assert res.vmas <= b.vmas + VMA_SLACK, (b, res)
        assert res.rss_kb <= b.rss_kb + RSS_SLACK_KB, (b, res)
    print(
        f"seed {seed}: {tally.actions} hostile actions, {added} log lines, {res}, "
        f"guest-side failures {tally.guest_failures}"
    )


@pytest.mark.parametrize("case", [vmm_garbage, vmm_bad_hello], ids=lambda c: c.__name__)
async def test_vmm_rejections(case: VmmCase, vmbusd: ServeProcess) -> None:
    """Every branch of the two VMM cases above, whatever the seeds happen to draw: each
    gets its exact answer from vmbusd within the deadline."""
    for seed in range(40):
        await case(vmbusd, random.Random(seed))
    assert vmbusd.alive(), vmbusd.log()[-3000:]
