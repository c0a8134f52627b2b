"""vmbus.kvm.vmm.KvmVm's attach side against a scripted vmbusd peer, on a real KVM VM
whose vCPU never runs (no kernel): hello and the sealed RAM regions; a `post` into the
SIMP slot; a `bind` that puts a datamatch ioeventfd in KVM and a call watcher that
turns a burst of vmbusd signals into one SIEFP bit and one interrupt; `unbind` taking
the ioeventfd out again; `error` ending the session with vmbusd's words; and a
snapshot's round trip. Fast (no guest boot): the main suite runs it on any KVM. The
real guest is tests/test_kvm_linux.py.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import struct
from pathlib import Path

import pytest
import trio

from vmbus import attach
from vmbus.kvm import hyperv as hv
from vmbus.kvm import snapshot, vmm

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="/dev/kvm is absent")

SIEFP_GPA = 0x100000
SIMP_GPA = 0x101000
VECTOR = 0xF3
RELID = 7
CONNECTION = 0x1234

F_GET_SEALS = 1034
F_SEAL_SHRINK, F_SEAL_GROW = 0x2, 0x4


class Recorder:
    """hyperv.Injector: what the VMM would send as MSIs."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, int]] = []

    def inject(self, vcpu: int, vector: int) -> None:
        self.sent.append((vcpu, vector))


async def _until(cond: object, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not callable(cond) or not cond():
            await trio.sleep(0.01)


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


async def test_attach_side_against_a_scripted_vmbusd() -> None:
    vm = vmm.KvmVm(None, mem_size=64 << 20, vcpus=1, vm_id="kvm-test")
    rec = Recorder()
    vm.part._injector = rec  # the seam: count MSIs instead of sending them
    part = vm.part
    assert part.write_msr(0, hv.HV_X64_MSR_SCONTROL, 1)
    assert part.write_msr(0, hv.HV_X64_MSR_SIEFP, SIEFP_GPA | 1)
    assert part.write_msr(0, hv.HV_X64_MSR_SIMP, SIMP_GPA | 1)
    assert part.write_msr(0, hv.HV_X64_MSR_SINT0 + 2, VECTOR)
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    peer, conn = attach.AttachConnection(a), attach.AttachConnection(b)
    ended: list[str] = []
    kick, call = _eventfd(), _eventfd()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vm.start_session, conn)
            hello = await attach.handshake(
                peer, attach.Hello(attach.PROTOCOL_VERSION, "vmbusd", "", 0)
            )
            assert (hello.role, hello.vm_id, hello.vcpus) == ("vmm", "kvm-test", 1)
            mem = await peer.receive()
            assert isinstance(mem, attach.MemoryRegions)
            (region,) = mem.regions
            assert (region.gpa, region.size, region.offset) == (0, 64 << 20, 0)
            seals = fcntl.fcntl(region.fd, F_GET_SEALS)
            assert seals & (F_SEAL_SHRINK | F_SEAL_GROW) == F_SEAL_SHRINK | F_SEAL_GROW
            os.close(region.fd)

            vm.start_attach_tasks(nursery, ended.append)

            # post -> SIMP slot 2 as message type 1, with the SINT's interrupt
            await peer.send(attach.PostToGuest(vcpu=0, payload=b"\x0f" + bytes(15)))
            await _until(lambda: vm.counters.host_posts == 1)
            slot = vm.machine.ram.read(SIMP_GPA + 2 * 256, 32)
            assert slot[0:4] == (1).to_bytes(4, "little") and slot[4] == 16
            assert slot[16:32] == b"\x0f" + bytes(15)
            assert rec.sent == [(0, VECTOR)]

            # bind -> the ioeventfd is in KVM (a second one with that datamatch: EEXIST)
            await peer.send(attach.Bind(RELID, CONNECTION, 0, kick, call))
            await _until(lambda: vm.counters.binds == 1)
            probe = _eventfd()
            with pytest.raises(OSError) as exc:
                vm.machine.vm.ioeventfd(probe, vm.stub.signal_port, 4, datamatch=CONNECTION)
            assert exc.value.errno == errno.EEXIST

            # a burst of 500 signals: one SIEFP bit, one MSI (the bit stays set: no guest)
            for _ in range(500):
                os.eventfd_write(call, 1)
            await _until(lambda: vm.counters.calls >= 1)
            await trio.sleep(0.1)
            flags = vm.machine.ram.read(SIEFP_GPA + 2 * 256, 256)
            assert flags[RELID // 8] == 1 << (RELID % 8)
            assert flags.count(0) == 255
            assert rec.sent == [(0, VECTOR), (0, VECTOR)]
            assert 1 <= vm.counters.calls < 500

            # unbind -> the ioeventfd is gone: the same datamatch registers again
            await peer.send(attach.Unbind(RELID))
            await _until(lambda: vm.counters.unbinds == 1)
            vm.machine.vm.ioeventfd(probe, vm.stub.signal_port, 4, datamatch=CONNECTION)
            vm.machine.vm.ioeventfd(
                probe, vm.stub.signal_port, 4, datamatch=CONNECTION, deassign=True
            )
            os.close(probe)
            os.eventfd_write(call, 1)  # nobody watches it any more
            await trio.sleep(0.05)
            assert vm.counters.calls < 500 and len(rec.sent) == 2

            # error -> the session ends with vmbusd's words
            await peer.send(attach.Error("protocol", "scripted peer says no"))
            await _until(lambda: bool(ended))
            assert ended == ["vmbusd reported error protocol: scripted peer says no"]
            nursery.cancel_scope.cancel()
    finally:
        vm.close()
        for fd in (kick, call):
            os.close(fd)
        await peer.aclose()
        await conn.aclose()


def test_snapshot_round_trip_and_bad_files(tmp_path: Path) -> None:
    """save -> from_snapshot on a VM that never ran: RAM (holes included), registers, the
    LAPIC, MSRs, the Hyper-V partition and the UART come back; a file that is not a
    snapshot, one cut short, and one from a host with another TSC rate are refused."""
    vm = vmm.KvmVm(None, mem_size=64 << 20, vcpus=2, vm_id="kvm-snap")
    path = str(tmp_path / "vm.snap")
    try:
        vm.machine.ram.write(0x200000, b"guest bytes" * 100)
        vm.machine.ram.write((64 << 20) - 16, b"the last page...")
        regs = vm.machine.vcpus[1].fd.get_regs()
        regs.rip, regs.rbx = 0x1234, 0xDEADBEEF
        vm.machine.vcpus[1].fd.set_regs(regs)
        assert vm.part.write_msr(0, hv.HV_X64_MSR_GUEST_OS_ID, 0x8100)
        assert vm.part.write_msr(1, hv.HV_X64_MSR_SIMP, SIMP_GPA | 1)
        vm.serial.lcr = 0x1B
        saved = vm.save_snapshot(path)
        assert saved.ram_bytes < 64 << 20  # holes for the zero MiBs
        hv_state = vm.part.save()
    finally:
        vm.close()
    vm2, timing = vmm.KvmVm.from_snapshot(path)
    try:
        assert timing.ram_bytes == 64 << 20 and len(vm2.machine.vcpus) == 2
        assert vm2.machine.ram.read(0x200000, 1100) == b"guest bytes" * 100
        assert vm2.machine.ram.read((64 << 20) - 16, 16) == b"the last page..."
        assert vm2.machine.ram.read(0x300000, 4096) == bytes(4096)
        r = vm2.machine.vcpus[1].fd.get_regs()
        assert (r.rip, r.rbx) == (0x1234, 0xDEADBEEF)
        assert vm2.part.save() == hv_state
        assert vm2.serial.lcr == 0x1B
    finally:
        vm2.close()

    def refused(data: bytes, needle: str) -> None:
        bad = tmp_path / "bad.snap"
        bad.write_bytes(data)
        with pytest.raises(snapshot.SnapshotError, match=needle):
            vmm.KvmVm.from_snapshot(str(bad))

    raw = Path(path).read_bytes()
    refused(b"nope" * 100, "not a vmbusd kvm snapshot")
    refused(raw[: len(raw) - 4096], "RAM truncated")
    (n,) = struct.unpack_from("<Q", raw, len(snapshot.MAGIC))
    start = len(snapshot.MAGIC) + 8
    state = json.loads(raw[start : start + n])
    state["tsc_khz"] += 1
    head = json.dumps(state).encode()
    pad = -(-(start + len(head)) // snapshot.PAGE) * snapshot.PAGE - start - len(head)
    ram = raw[-(-(start + n) // snapshot.PAGE) * snapshot.PAGE :]
    refused(
        snapshot.MAGIC + struct.pack("<Q", len(head)) + head + bytes(pad) + ram,
        "restore it on the machine that took it",
    )
