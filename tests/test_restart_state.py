"""The saved state a VMM holds for vmbusd, and what vmbusd does with one handed back.

* echo's in-flight record closes the one window where a crash would echo a batch
  twice (the downstream write_index published, the upstream read_index not yet);
* a real blob's bus state survives save -> restore -> save unchanged;
* hostile blobs (fuzzed fields, bad fds) handed back by a VMM are refused with one
  log line and `error saved-state`; the service stays up and another VM's soak
  carries on, every packet echoed once and in order.
"""

from __future__ import annotations

import copy
import fcntl
import logging
import os
import random
import signal
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from test_restart import VMBUSD, Service, soak_until_stopped, wait_for

from devices.echo.protocol import ECHO_IF_TYPE
from devices.echo.vsp import RECORD, RECORD_MAGIC, EchoDevice
from vmbus import attach, bus
from vmbus.device import INFLIGHT_SLOT_SIZE, DeviceContext, LabelledLog
from vmbus.gpadl import PAGE_SIZE, Gpadl, GpaRange
from vmbus.guest.ram import GuestRam
from vmbus.guest.vm import SimulatedVm
from vmbus.memory import GuestMemory, sealed_memfd
from vmbus.packet import PacketType
from vmbus.ring import (
    OFF_READ_INDEX,
    OFF_WRITE_INDEX,
    OutPacket,
    SendBatch,
    forward,
    init_ring_header,
)
from vmbus.server import INFLIGHT_REGION_SIZE, STATE_SEALS

pytestmark = pytest.mark.timeout(300)
U32 = struct.Struct("<I")

# --------------------------------------------------------------------------- echo record


def _ctx(inflight: memoryview, rings: Any) -> DeviceContext:
    return DeviceContext(
        vm_name="t",
        session_id="s",
        version=0,
        relid=1,
        sub_channel_index=0,
        target_vp=0,
        userdata=b"",
        memory=None,  # type: ignore[arg-type]  # resume_rings never touches it
        log=LabelledLog(logging.getLogger("test"), {"label": "t/1"}),
        _gpadl=None,  # type: ignore[arg-type]
        _enable_subchannels=None,  # type: ignore[arg-type]
        resumed=True,
        inflight=inflight,
        rings=rings,
    )


def test_echo_record_finishes_a_half_done_forward() -> None:
    """Forward a batch, then put the upstream read_index back as a crash between the
    two stores leaves it: without the record the batch would be read (and echoed)
    again; resume_rings consumes it. Records that do not describe that window, or
    do not fit the rings, change nothing."""
    from vmbus import channel as chmod

    pages = 8  # 4 upstream, 4 downstream
    fd = sealed_memfd("ram", 64 * PAGE_SIZE)
    mem = GuestMemory()
    mem.add_region(0, 64 * PAGE_SIZE, fd)
    os.close(fd)
    gpadl = Gpadl(1, 1, (GpaRange(pages * PAGE_SIZE, 0, tuple(range(10, 10 + pages))),))
    mapping = mem.map_ring_pair(gpadl, pages // 2)
    init_ring_header(mapping.upstream_hdr)
    init_ring_header(mapping.downstream_hdr)
    region = bytearray(INFLIGHT_SLOT_SIZE)
    slot = memoryview(region)
    guest_r, guest_w = chmod.open_ring_pair(mapping, host=False)
    host_r, host_w = chmod.open_ring_pair(mapping, host=True)
    up, down = mapping.upstream_hdr, mapping.downstream_hdr
    try:
        batch = SendBatch(
            [OutPacket(PacketType.INBAND, 0, i + 1, [bytes([i]) * (8 + 24 * i)]) for i in range(5)]
        )
        assert guest_w.write(batch).npkts == 5
        r0, w0 = U32.unpack_from(up, OFF_READ_INDEX)[0], U32.unpack_from(down, OFF_WRITE_INDEX)[0]
        RECORD.pack_into(slot, 0, RECORD_MAGIC, r0, w0)  # what echo writes before forward
        res = forward(host_r, host_w, 64, True)
        assert res.npkts == 5
        r1 = U32.unpack_from(up, OFF_READ_INDEX)[0]
        w1 = U32.unpack_from(down, OFF_WRITE_INDEX)[0]
        assert (r1 - r0) % mapping.upstream_size == (w1 - w0) % mapping.downstream_size > 0

        def crash_between_stores() -> None:
            U32.pack_into(up, OFF_READ_INDEX, r0)

        dev = EchoDevice()
        # Records that must change nothing: another device's slot, a batch not yet
        # published (write_index at the record), indices beyond the rings, unaligned.
        for rec in [
            (0, r0, w0),
            (RECORD_MAGIC, r0, w1),
            (RECORD_MAGIC, r0, 1 << 20),
            (RECORD_MAGIC, r0, w0 + 4),
            (RECORD_MAGIC, (r0 + 8) % mapping.upstream_size, w0),
        ]:
            crash_between_stores()
            RECORD.pack_into(slot, 0, *rec)
            dev.resume_rings(_ctx(slot, mapping))
            assert U32.unpack_from(up, OFF_READ_INDEX)[0] == r0, rec
        # The crash window: the batch would be read again by a new vmbusd...
        crash_between_stores()
        RECORD.pack_into(slot, 0, RECORD_MAGIC, r0, w0)
        fresh_r, fresh_w = chmod.open_ring_pair(mapping, host=True)
        assert fresh_r.bytes_to_read() == (r1 - r0) % mapping.upstream_size
        fresh_r.release()
        fresh_w.release()
        # ...unless the record finishes the consumption first.
        dev.resume_rings(_ctx(slot, mapping))
        assert U32.unpack_from(up, OFF_READ_INDEX)[0] == r1
        fresh_r, fresh_w = chmod.open_ring_pair(mapping, host=True)
        assert fresh_r.bytes_to_read() == 0
        fresh_r.release()
        fresh_w.release()
    finally:
        for x in (guest_r, guest_w, host_r, host_w):
            x.release()
        up.release()
        down.release()
        mapping.close()
        mem.close()


# --------------------------------------------------------------------------- real blobs


def _memfd_of(data: bytes, seals: int = STATE_SEALS) -> int:
    fd = os.memfd_create("blob", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


async def _victim_blob(path: str) -> tuple[bytes, int]:
    """A real saved state: a VM named `victim` with an echo channel open."""
    vm = SimulatedVm(vm_id="victim")
    async with trio.open_nursery() as nursery:
        await vm.start(await attach.connect(path), nursery)
        offer = vm.find_offers(ECHO_IF_TYPE)[0]
        await vm.open_channel(offer, 64 * 1024)
        await trio.sleep(0.2)
        assert vm._state_fd is not None
        size = os.fstat(vm._state_fd).st_size
        blob = os.pread(vm._state_fd, size, 0)
        assert vm.conn is not None
        await vm.conn.aclose()
        nursery.cancel_scope.cancel()
    for gch in vm.channels.values():
        gch.channel.release()
        gch.mapping.close()
    vm.close()
    return blob, offer.relid


async def _closed_channel_blob(path: str) -> tuple[bytes, int]:
    """A saved state of a VM `victim` whose echo channel was opened and closed again."""
    vm = SimulatedVm(vm_id="victim")
    async with trio.open_nursery() as nursery:
        await vm.start(await attach.connect(path), nursery)
        offer = vm.find_offers(ECHO_IF_TYPE)[0]
        gch = await vm.open_channel(offer, 64 * 1024)
        await vm.close_channel(gch)
        await trio.sleep(0.2)
        assert vm._state_fd is not None
        blob = os.pread(vm._state_fd, os.fstat(vm._state_fd).st_size, 0)
        assert vm.conn is not None
        await vm.conn.aclose()
        nursery.cancel_scope.cancel()
    vm.close()
    return blob, offer.relid


def test_eventfds_of_a_closed_offered_channel_are_dropped_not_refused(tmp_path: Path) -> None:
    """vmbusd can die between the state that closed a channel and its unbind: the VMM
    then hands back the eventfds of a channel the state has closed. That is no hostile
    VMM (the relid is offered): the resume is taken, those fds dropped (the VMM is told
    to unbind again). Eventfds for a relid that was never offered stay refused (the
    hostile test above). test_restart's churn hit this as 'resume refused'."""
    svc = Service(tmp_path)
    svc.start()
    try:
        blob, relid = trio.run(_closed_channel_blob, svc.path)
        assert not bus_open_relids(blob)
        assert trio.run(lambda: _try_resume(svc.path, blob, relids=[relid])) == "resumed"
        assert "resume refused" not in svc.log()
    finally:
        svc.stop(signal.SIGTERM)


def bus_open_relids(blob: bytes) -> list[int]:
    b = bus.VmBusServer(vcpu_count=2)
    b.restore(msgpack.unpackb(blob, raw=False)["bus"])
    return [ev.relid for ev in b.open_channels()]


async def _try_resume(
    path: str,
    blob: bytes,
    *,
    relids: list[int],
    blob_seals: int = STATE_SEALS,
    inflight_size: int = INFLIGHT_REGION_SIZE,
    kick_is_pipe: bool = False,
    posts: int = 1 << 20,
) -> str:
    """Play a VMM that hands `blob` back: 'refused' (error saved-state) or 'resumed'."""
    conn = await attach.connect(path)
    ram = GuestRam(256 << 20)  # the victim's layout: RAM below and above 4 GiB
    fl = sealed_memfd("inflight", inflight_size)
    bfd = _memfd_of(blob, blob_seals)
    evs: list[int] = []
    try:
        await attach.handshake(
            conn,
            attach.Hello(
                version=attach.PROTOCOL_VERSION,
                role="vmm",
                vm_id="victim",
                vcpus=2,
                features=(attach.FEATURE_SAVED_STATE,),
            ),
        )
        await conn.send(
            attach.MemoryRegions(
                tuple(attach.MemoryRegion(r.gpa, r.size, ram.fd, r.offset) for r in ram.regions)
            )
        )
        chans = []
        for r in relids:
            if kick_is_pipe:
                a, b = os.pipe()
                evs += [a, b]
            else:
                a, b = os.eventfd(0), os.eventfd(0)
                evs += [a, b]
            chans.append(attach.ResumeChannel(r, a, b))
        await conn.send(
            attach.Resume(blob=bfd, inflight=fl, applied=0, posts=posts, channels=tuple(chans))
        )
        with trio.fail_after(10):
            while True:
                msg = await conn.receive()
                if isinstance(msg, attach.Error):
                    assert msg.code == "saved-state", msg
                    assert msg.message.startswith("resume refused: ")
                    return "refused"
                attach.close_fds(msg.fds())
                if isinstance(msg, attach.State):
                    return "resumed"
                # a post or bind from the outbox may come first: keep reading
    finally:
        attach.close_fds([fl, bfd, *evs])
        ram.close()
        await conn.aclose()


Mutation = Callable[[dict[str, Any]], None]


def _set(*path_and_value: Any) -> Mutation:
    *path, value = path_and_value

    def mutate(d: dict[str, Any]) -> None:
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value

    return mutate


def _huge_pfn(d: dict[str, Any]) -> None:
    g = d["bus"]["gpadls"][0]
    raw = bytearray(g["ranges"])
    struct.pack_into("<Q", raw, 8, 1 << 40)  # the first PFN: far outside RAM
    g["ranges"] = bytes(raw)


MUTATIONS: dict[str, Mutation] = {
    "version": _set("v", 2),
    "vm name": _set("vm", "someone-else"),
    "vcpus": _set("vcpus", 64),
    "epoch type": _set("epoch", "1"),
    "posts beyond the VMM's": _set("posts", 1 << 40),
    "no devices": _set("devices", []),
    "device type": _set("devices", [{"name": "storvsc", "if_type": b"\0" * 16, "state": None}] * 2),
    "echo state": lambda d: d["devices"][0].__setitem__("state", {"x": 1}),
    "relid map": _set("relids", [[1, 7, 0]]),
    "bus version": _set("bus", "version", 0x12345),
    "bus not a map": _set("bus", [1, 2, 3]),
    "relid range": lambda d: d["bus"]["channels"][0].__setitem__("relid", 5000),
    "relid twice": lambda d: d["bus"]["channels"].append(copy.deepcopy(d["bus"]["channels"][0])),
    "target_vp": lambda d: d["bus"]["channels"][0].__setitem__("target_vp", 99),
    "ring not a GPADL": lambda d: d["bus"]["channels"][0].__setitem__("ring", 0x999),
    "downstream offset": lambda d: d["bus"]["channels"][0].__setitem__("downstream_offset", 1),
    "if_instance length": lambda d: d["bus"]["channels"][0].__setitem__("if_instance", b"x"),
    "PFN outside RAM": _huge_pfn,
    "GPADL ranges truncated": lambda d: d["bus"]["gpadls"][0].__setitem__("ranges", b"\1" * 8),
    "GPADL capacity": lambda d: d["bus"]["gpadls"][0].__setitem__("capacity", 1 << 62),
    "GPADL of no channel": lambda d: d["bus"]["gpadls"][0].__setitem__("relid", 77),
    "outbox oversized post": _set("outbox", [["post", 0, b"x" * 300]]),
    "outbox unknown kind": _set("outbox", [["reboot", 1]]),
    "interrupt page": _set("interrupt_page", 4095),
}


def test_hostile_blobs_refused_service_and_other_vm_carry_on(tmp_path: Path) -> None:
    svc = Service(tmp_path)
    svc.start()
    err, out = tmp_path / "vm.log", tmp_path / "vm.json"
    with open(err, "wb") as errf:
        good = subprocess.Popen(
            [*VMBUSD, "vm", "--connect", svc.path, "--json", str(out), "--workload", "soak"],
            stdout=subprocess.DEVNULL,
            stderr=errf,
        )
    try:
        wait_for(lambda: "soak until" in err.read_text(), "the good VM's soak")
        blob, relid = trio.run(_victim_blob, svc.path)
        saved = msgpack.unpackb(blob, raw=False)
        assert saved["v"] == 1 and saved["vm"] == "victim"

        # The bus part survives a round trip unchanged.
        b = bus.VmBusServer(vcpu_count=2)
        b.restore(saved["bus"])
        assert b.save() == saved["bus"]
        assert [ev.relid for ev in b.open_channels()] == [relid]

        results: dict[str, str] = {}
        for name, mutate in MUTATIONS.items():
            d = copy.deepcopy(saved)
            mutate(d)
            data = msgpack.packb(d, use_bin_type=True)
            results[name] = trio.run(lambda data=data: _try_resume(svc.path, data, relids=[relid]))
        fd_cases: dict[str, dict[str, Any]] = {
            "blob not sealed": {"blob_seals": fcntl.F_SEAL_SHRINK},
            "in-flight size": {"inflight_size": 4096},
            "kick not an eventfd": {"kick_is_pipe": True},
            "posts below the blob's": {"posts": 0},
            "eventfds of a closed relid": {"relids": [relid + 40]},
        }
        for name, kw in fd_cases.items():
            kw.setdefault("relids", [relid])
            results[name] = trio.run(lambda kw=kw: _try_resume(svc.path, blob, **kw))
        results["not msgpack"] = trio.run(lambda: _try_resume(svc.path, b"\xc1junk", relids=[]))
        results["not a map"] = trio.run(
            lambda: _try_resume(svc.path, msgpack.packb([1, 2]), relids=[])
        )
        refused = [n for n, r in results.items() if r == "refused"]
        assert refused == list(results), results
        # One line per refusal in vmbusd's log, naming the problem.
        wait_for(lambda: svc.log().count("resume refused") >= len(refused), "the log lines")
        assert svc.log().count("resume refused") == len(refused)
        # The untouched blob is taken: this is what a good VMM gets back.
        assert trio.run(lambda: _try_resume(svc.path, blob, relids=[relid])) == "resumed"

        # Byte-level fuzz: every variant is refused or (where the bytes still make a
        # consistent state) taken -- never anything else; the service lives on.
        rng = random.Random(2026)
        outcomes = {"refused": 0, "resumed": 0}
        for _ in range(40):
            data = bytearray(blob)
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            outcomes[trio.run(lambda d=bytes(data): _try_resume(svc.path, d, relids=[relid]))] += 1
        assert outcomes["refused"] > 0
        assert svc.proc is not None and svc.proc.poll() is None
        assert "Traceback" not in svc.log()
        assert "session failed" not in svc.log()
        time.sleep(0.5)
        assert good.poll() is None
        summary = soak_until_stopped(good, out, err)
        assert summary["reconnects"] == 0
    finally:
        if good.poll() is None:
            good.send_signal(signal.SIGKILL)
            good.wait()
        if svc.proc is not None:
            svc.stop(signal.SIGTERM)


# --------------------------------------------------------------------------- codec


def _fds(n: int) -> list[int]:
    return [os.eventfd(0) for _ in range(n)]


def test_state_and_resume_codec() -> None:
    """`state` and `resume` round-trip with their fds; malformed ones are refused
    with every fd closed; each goes one way only."""
    for msg in [
        attach.State(blob=0, posts=7),
        attach.State(blob=0, posts=0, inflight=1),
        attach.Resume(
            blob=0,
            inflight=1,
            applied=3,
            posts=9,
            channels=(attach.ResumeChannel(1, 2, 3), attach.ResumeChannel(5, 4, 5)),
        ),
    ]:
        data, order = attach.encode_message(msg)
        fds = _fds(len(order))
        try:
            got = attach.decode_message(data, fds, sender="vmbusd" if msg.T == "state" else "vmm")
            assert got.fds() == fds
            assert type(got) is type(msg)
        finally:
            attach.close_fds(fds)
    good = msgpack.packb(
        {
            "t": "resume",
            "blob": 0,
            "inflight": 1,
            "applied": 0,
            "posts": 0,
            "channels": [{"relid": 1, "kick": 2, "call": 3}],
        }
    )
    bad: list[tuple[dict[str, Any], int]] = [
        ({"channels": [{"relid": 1, "kick": 2, "call": 2}]}, 4),  # one fd used twice
        ({"channels": [{"relid": 1, "kick": 2, "call": 9}]}, 4),  # no such fd
        ({"channels": [{"relid": 0, "kick": 2, "call": 3}]}, 4),  # relid 0
        ({"channels": [{"relid": 1, "kick": 2, "call": 3}] * 2}, 4),  # relid twice
        ({"channels": [{"kick": 2, "call": 3}]}, 4),  # no relid
        ({"applied": -1}, 4),
        ({"posts": True}, 4),
        ({"channels": "x"}, 4),
        ({}, 5),  # an fd nothing refers to
        ({"channels": [{"relid": r, "kick": 2, "call": 3} for r in range(1, 40)]}, 4),
    ]
    base = msgpack.unpackb(good)
    for change, nfds in bad:
        fds = _fds(nfds)
        with pytest.raises(attach.AttachProtocolError):
            attach.decode_message(msgpack.packb({**base, **change}), fds, sender="vmm")
        for fd in fds:
            with pytest.raises(OSError):
                os.fstat(fd)  # closed by the refusal
    fds = _fds(4)
    with pytest.raises(attach.AttachProtocolError, match="may not be sent by vmbusd"):
        attach.decode_message(good, fds, sender="vmbusd")
    fds = _fds(1)
    with pytest.raises(attach.AttachProtocolError, match="may not be sent by vmm"):
        attach.decode_message(
            msgpack.packb({"t": "state", "blob": 0, "posts": 1}), fds, sender="vmm"
        )
