"""Snapshot and restore of a stopped KvmVm: what KVM holds (per vCPU: regs, sregs,
xsave, xcrs, MSRs, LAPIC, events, MP state, debug registers; per VM: the two PICs and
the IOAPIC, PIT2, the clock), what the VMM holds (the Hyper-V partition, the UART's
registers) and guest RAM.

The KvmVm takes it at the guest's first SynIC register write, before hv_vmbus posts
INITIATE_CONTACT: nothing has reached vmbusd yet, so a restored guest starts its VMBus
session with any `vmbusd serve`. The machine is stopped first; an exit that was being
handled (that very WRMSR) is completed by one more KVM_RUN with immediate_exit set,
as KVM's API asks before state is read. Restore goes into a fresh VM (same CPUID,
devices and RAM size), in QEMU's order: VM state, then per vCPU regs, xsave, xcrs,
sregs, MSRs, MP state, LAPIC, events, the TSC deadline MSR (a deadline set before the
LAPIC is in TSC-deadline mode is dropped: measured, the restored guest's tick stopped),
debug registers.

File: MAGIC, a little-endian u64 length, that much JSON (everything but RAM), zero
padding to a page, then the RAM with its zero MiBs left as holes (a sparse file).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vmbus.kvm import kvmapi
from vmbus.kvm.kvmapi import ioctl

if TYPE_CHECKING:
    from vmbus.kvm.vmm import KvmVm

MAGIC = b"vmbusd-kvm-snapshot 1\n"
FORMAT_VERSION = 1
PAGE = 4096
CHUNK = 1 << 20

# Structures kvmapi has no type for: moved as raw bytes of their uapi size.
XCRS_SIZE = 8 + 16 * 16 + 16 * 8  # struct kvm_xcrs
DEBUGREGS_SIZE = 16 * 8  # struct kvm_debugregs
IRQCHIP_SIZE = 8 + 512  # struct kvm_irqchip
PIT2_SIZE = 3 * 24 + 4 + 9 * 4  # struct kvm_pit_state2
CLOCK_SIZE = 48  # struct kvm_clock_data

KVM_GET_MSR_INDEX_LIST = kvmapi._iowr(0x02, 4)
KVM_GET_IRQCHIP = kvmapi._iowr(0x62, IRQCHIP_SIZE)
KVM_SET_IRQCHIP = kvmapi._ior(0x63, IRQCHIP_SIZE)
KVM_SET_CLOCK = kvmapi._iow(0x7B, CLOCK_SIZE)
KVM_GET_CLOCK = kvmapi._ior(0x7C, CLOCK_SIZE)
KVM_GET_PIT2 = kvmapi._ior(0x9F, PIT2_SIZE)
KVM_SET_PIT2 = kvmapi._iow(0xA0, PIT2_SIZE)
KVM_GET_DEBUGREGS = kvmapi._ior(0xA1, DEBUGREGS_SIZE)
KVM_SET_DEBUGREGS = kvmapi._iow(0xA2, DEBUGREGS_SIZE)
KVM_GET_XCRS = kvmapi._ior(0xA6, XCRS_SIZE)
KVM_SET_XCRS = kvmapi._iow(0xA7, XCRS_SIZE)

IRQCHIPS = (0, 1, 2)  # PIC master, PIC slave, IOAPIC
SERIAL_FIELDS = ("ier", "lcr", "mcr", "scr", "dll", "dlm", "fcr", "thr_ipending")
MSR_IA32_TSC_DEADLINE = 0x6E0  # restored after the LAPIC, as QEMU does
HV_MSR_FIRST, HV_MSR_END = 0x40000000, 0x40000200  # the VMM's own, in "hyperv"


class SnapshotError(Exception):
    """A snapshot file that is not one, or one this VM cannot take."""


@dataclass(frozen=True)
class Timing:
    seconds: float
    ram_bytes: int  # what was written or read (holes left out)


def _get(fd: int, req: int, size: int, prefix: bytes = b"") -> bytes:
    buf = ctypes.create_string_buffer(prefix, size) if prefix else ctypes.create_string_buffer(size)
    ioctl(fd, req, buf)
    return buf.raw


def _put(fd: int, req: int, data: bytes) -> None:
    buf = ctypes.create_string_buffer(data, len(data))
    ioctl(fd, req, buf)


def msr_indices(kvm: kvmapi.Kvm) -> list[int]:
    """The MSRs KVM saves and restores (KVM_GET_MSR_INDEX_LIST), without the Hyper-V
    range that user space emulates here."""
    head = ctypes.create_string_buffer(4)
    try:
        ioctl(kvm.fd, KVM_GET_MSR_INDEX_LIST, head)
    except OSError as exc:
        if exc.errno != errno.E2BIG:
            raise
    (n,) = struct.unpack_from("<I", head.raw)
    buf = ctypes.create_string_buffer(struct.pack("<I", n), 4 + 4 * n)
    ioctl(kvm.fd, KVM_GET_MSR_INDEX_LIST, buf)
    (n,) = struct.unpack_from("<I", buf.raw)
    found = struct.unpack_from(f"<{n}I", buf.raw, 4)
    return [i for i in found if not HV_MSR_FIRST <= i < HV_MSR_END]


def _complete_pending(vm: KvmVm) -> None:
    """KVM_RUN once with immediate_exit: finishes the exit each vCPU stopped in (the
    WRMSR that triggered the snapshot), then returns EINTR without running the guest."""
    for v in vm.machine.vcpus:
        v.fd.run_struct.immediate_exit = 1
        r = v.fd.run()
        if r < 0 and r not in (-errno.EINTR, -errno.EAGAIN):
            raise SnapshotError(f"vCPU {v.id}: completing its last exit failed: {-r}")


def capture(vm: KvmVm) -> dict[str, Any]:
    """Everything but RAM, from a VM whose vCPU threads have stopped."""
    m = vm.machine
    _complete_pending(vm)
    indices = msr_indices(m.kvm)
    vcpus = []
    for v in m.vcpus:
        fd = v.fd
        msrs: dict[int, int] = {}
        for i in indices:  # one at a time: KVM_GET_MSRS stops at the first it refuses
            msrs.update(fd.get_msrs([i]))
        vcpus.append(
            {
                "regs": bytes(fd.get_regs()).hex(),
                "sregs": bytes(fd.get_sregs()).hex(),
                "xsave": bytes(fd.get_xsave()).hex(),
                "xcrs": _get(fd.fd, KVM_GET_XCRS, XCRS_SIZE).hex(),
                "msrs": {str(k): val for k, val in msrs.items()},
                "lapic": bytes(fd.get_lapic()).hex(),
                "events": bytes(fd.get_vcpu_events()).hex(),
                "mp_state": fd.get_mp_state(),
                "debugregs": _get(fd.fd, KVM_GET_DEBUGREGS, DEBUGREGS_SIZE).hex(),
            }
        )
    vmfd = m.vm.fd
    chips = [
        _get(vmfd, KVM_GET_IRQCHIP, IRQCHIP_SIZE, struct.pack("<I", c)).hex() for c in IRQCHIPS
    ]
    return {
        "format": FORMAT_VERSION,
        "mem_size": m.ram.size,
        "vcpus": len(m.vcpus),
        "tsc_khz": vm.tsc_khz,
        "cmdline": vm.cmdline,
        "irqchips": chips,
        "pit2": _get(vmfd, KVM_GET_PIT2, PIT2_SIZE).hex(),
        "clock": _get(vmfd, KVM_GET_CLOCK, CLOCK_SIZE).hex(),
        "vcpu_state": vcpus,
        "hyperv": vm.part.save(),
        "serial": {f: int(getattr(vm.serial, f)) for f in SERIAL_FIELDS},
    }


def save(vm: KvmVm, path: str) -> Timing:
    """Write the stopped VM to `path` (replaced atomically)."""
    t0 = time.monotonic()
    state = json.dumps(capture(vm)).encode()
    view = vm.machine.ram.view
    tmp = f"{path}.tmp-{os.getpid()}"
    written = 0
    zero = bytes(CHUNK)
    with open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", len(state)) + state)
        base = -(-f.tell() // PAGE) * PAGE
        f.truncate(base + len(view))
        for off in range(0, len(view), CHUNK):
            chunk = view[off : off + CHUNK]
            if chunk != zero[: len(chunk)]:
                f.seek(base + off)
                f.write(chunk)
                written += len(chunk)
    os.replace(tmp, path)
    return Timing(time.monotonic() - t0, written)


def read_header(path: str) -> tuple[dict[str, Any], int]:
    """The JSON part and the file offset of RAM; SnapshotError for anything else."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC) + 8)
            if len(head) < len(MAGIC) + 8 or not head.startswith(MAGIC):
                raise SnapshotError(f"{path} is not a vmbusd kvm snapshot")
            (n,) = struct.unpack_from("<Q", head, len(MAGIC))
            if n > 64 << 20:
                raise SnapshotError(f"{path}: header of {n} bytes")
            state: dict[str, Any] = json.loads(f.read(n))
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"{path}: {exc}") from exc
    if state.get("format") != FORMAT_VERSION:
        raise SnapshotError(f"{path}: format {state.get('format')!r}, not {FORMAT_VERSION}")
    return state, -(-(len(MAGIC) + 8 + n) // PAGE) * PAGE


def restore(vm: KvmVm, path: str) -> Timing:
    """Load `path` into a fresh, not yet run VM built with the snapshot's RAM size and
    vCPU count (KvmVm.from_snapshot does that)."""
    t0 = time.monotonic()
    state, base = read_header(path)
    m = vm.machine
    if state["mem_size"] != m.ram.size or state["vcpus"] != len(m.vcpus):
        raise SnapshotError("the snapshot's RAM size or vCPU count differs from this VM's")
    if state["tsc_khz"] != vm.tsc_khz:
        raise SnapshotError(
            f"the snapshot's guest was told a {state['tsc_khz']} kHz TSC, this host's is "
            f"{vm.tsc_khz} kHz: restore it on the machine that took it"
        )
    view = m.ram.view
    with open(path, "rb") as f:
        f.seek(base)
        got = f.readinto(view)
    if got != len(view):
        raise SnapshotError(f"{path}: RAM truncated ({got} of {len(view)} bytes)")
    vmfd = m.vm.fd
    for data in state["irqchips"]:
        _put(vmfd, KVM_SET_IRQCHIP, bytes.fromhex(data))
    _put(vmfd, KVM_SET_PIT2, bytes.fromhex(state["pit2"]))
    clock = bytearray(bytes.fromhex(state["clock"]))
    struct.pack_into("<I", clock, 8, 0)  # flags: only the clock value is ours to set
    _put(vmfd, KVM_SET_CLOCK, bytes(clock))
    for v, s in zip(m.vcpus, state["vcpu_state"], strict=True):
        fd = v.fd
        fd.set_regs(kvmapi.Regs.from_buffer_copy(bytes.fromhex(s["regs"])))
        fd.set_xsave(kvmapi.Xsave.from_buffer_copy(bytes.fromhex(s["xsave"])))
        _put(fd.fd, KVM_SET_XCRS, bytes.fromhex(s["xcrs"]))
        fd.set_sregs(kvmapi.Sregs.from_buffer_copy(bytes.fromhex(s["sregs"])))
        msrs = {int(k): int(val) for k, val in s["msrs"].items()}
        deadline = msrs.pop(MSR_IA32_TSC_DEADLINE, None)
        fd.set_msrs(msrs)
        fd.set_mp_state(int(s["mp_state"]))
        fd.set_lapic(kvmapi.LapicState.from_buffer_copy(bytes.fromhex(s["lapic"])))
        fd.set_vcpu_events(kvmapi.VcpuEvents.from_buffer_copy(bytes.fromhex(s["events"])))
        if deadline is not None:  # after the LAPIC: KVM ignores it unless the LVT timer
            fd.set_msrs({MSR_IA32_TSC_DEADLINE: deadline})  # is in TSC-deadline mode
        _put(fd.fd, KVM_SET_DEBUGREGS, bytes.fromhex(s["debugregs"]))
    vm.part.restore(state["hyperv"])
    for name, value in state["serial"].items():
        if name in SERIAL_FIELDS:
            setattr(vm.serial, name, type(getattr(vm.serial, name))(value))
    vm.cmdline = state["cmdline"]
    return Timing(time.monotonic() - t0, len(view))
