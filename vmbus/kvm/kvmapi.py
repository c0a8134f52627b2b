"""The KVM ioctls the VMM uses: numbers, struct layouts (ctypes) and thin fd wrappers.

Plain ctypes over libc's ioctl, not cffi: every call here is one syscall, ctypes drops
the GIL around it (so vCPU threads run in parallel with trio), and the per-exit cost
was measured good enough for the console path (see docs in vmbus/kvm/machine.py).
tests/test_kvm_core.py checks every size, offset and ioctl number against
<linux/kvm.h> with the C compiler, so a typo here cannot hide.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

# ---------------------------------------------------------------- ioctl numbers

_IOC_WRITE = 1
_IOC_READ = 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(0, nr, 0)


def _ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, nr, size)


def _iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


u8 = ctypes.c_uint8
u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
u64 = ctypes.c_uint64
s32 = ctypes.c_int32

# ---------------------------------------------------------------- structs


class UserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class Regs(ctypes.Structure):
    _fields_ = [
        (name, u64)
        for name in (
            "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split()
        )
    ]


class Segment(ctypes.Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class Dtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class Sregs(ctypes.Structure):
    _fields_ = [
        ("cs", Segment),
        ("ds", Segment),
        ("es", Segment),
        ("fs", Segment),
        ("gs", Segment),
        ("ss", Segment),
        ("tr", Segment),
        ("ldt", Segment),
        ("gdt", Dtable),
        ("idt", Dtable),
        ("cr0", u64),
        ("cr2", u64),
        ("cr3", u64),
        ("cr4", u64),
        ("cr8", u64),
        ("efer", u64),
        ("apic_base", u64),
        ("interrupt_bitmap", u64 * 4),
    ]


class Fpu(ctypes.Structure):
    _fields_ = [
        ("fpr", (u8 * 16) * 8),
        ("fcw", u16),
        ("fsw", u16),
        ("ftwx", u8),
        ("pad1", u8),
        ("last_opcode", u16),
        ("last_ip", u64),
        ("last_dp", u64),
        ("xmm", (u8 * 16) * 16),
        ("mxcsr", u32),
        ("pad2", u32),
    ]


class MsrEntry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class MsrsHeader(ctypes.Structure):
    _fields_ = [("nmsrs", u32), ("pad", u32)]


class CpuidEntry2(ctypes.Structure):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


class Cpuid2Header(ctypes.Structure):
    _fields_ = [("nent", u32), ("padding", u32)]


class PitConfig(ctypes.Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class IrqLevel(ctypes.Structure):
    _fields_ = [("irq", u32), ("level", u32)]


class Ioeventfd(ctypes.Structure):
    _fields_ = [
        ("datamatch", u64),
        ("addr", u64),
        ("len", u32),
        ("fd", s32),
        ("flags", u32),
        ("pad", u8 * 36),
    ]


class Irqfd(ctypes.Structure):
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32), ("pad", u8 * 16)]


class Msi(ctypes.Structure):
    _fields_ = [
        ("address_lo", u32),
        ("address_hi", u32),
        ("data", u32),
        ("flags", u32),
        ("devid", u32),
        ("pad", u8 * 12),
    ]


class EnableCap(ctypes.Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class MsrFilterRange(ctypes.Structure):
    _fields_ = [
        ("flags", u32),
        ("nmsrs", u32),
        ("base", u32),
        ("pad", u32),
        ("bitmap", ctypes.c_void_p),
    ]


MSR_FILTER_MAX_RANGES = 16


class MsrFilter(ctypes.Structure):
    _fields_ = [("flags", u32), ("pad", u32), ("ranges", MsrFilterRange * MSR_FILTER_MAX_RANGES)]


class Translation(ctypes.Structure):
    _fields_ = [
        ("linear_address", u64),
        ("physical_address", u64),
        ("valid", u8),
        ("writeable", u8),
        ("usermode", u8),
        ("pad", u8 * 5),
    ]


class VcpuEventsException(ctypes.Structure):
    _fields_ = [
        ("injected", u8),
        ("nr", u8),
        ("has_error_code", u8),
        ("pending", u8),
        ("error_code", u32),
    ]


class VcpuEventsInterrupt(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class VcpuEventsNmi(ctypes.Structure):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class VcpuEventsSmi(ctypes.Structure):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class VcpuEvents(ctypes.Structure):
    _fields_ = [
        ("exception", VcpuEventsException),
        ("interrupt", VcpuEventsInterrupt),
        ("nmi", VcpuEventsNmi),
        ("sipi_vector", u32),
        ("flags", u32),
        ("smi", VcpuEventsSmi),
        ("triple_fault_pending", u8),
        ("reserved", u8 * 26),
        ("exception_has_payload", u8),
        ("exception_payload", u64),
    ]


class Xsave(ctypes.Structure):
    """struct kvm_xsave: the legacy FXSAVE area, then the XSAVE header at 512."""

    _fields_ = [("region", u32 * 1024)]


XSAVE_MXCSR = 6  # u32 index of MXCSR in the FXSAVE area
XSAVE_XSTATE_BV = 128  # u32 index of XSTATE_BV (low half) in the XSAVE header
XFEATURE_MASK_SSE = 1 << 1


class LapicState(ctypes.Structure):
    _fields_ = [("regs", u8 * 1024)]


class MpState(ctypes.Structure):
    _fields_ = [("mp_state", u32)]


# kvm_run and its exit union (only the members the VMM reads)


class RunIo(ctypes.Structure):
    _fields_ = [
        ("direction", u8),
        ("size", u8),
        ("port", u16),
        ("count", u32),
        ("data_offset", u64),
    ]


class RunMmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class RunFailEntry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class RunInternal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class RunSystemEvent(ctypes.Structure):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class RunMsr(ctypes.Structure):
    _fields_ = [("error", u8), ("pad", u8 * 7), ("reason", u32), ("index", u32), ("data", u64)]


class RunException(ctypes.Structure):
    _fields_ = [("exception", u32), ("error_code", u32)]


class RunExit(ctypes.Union):
    _fields_ = [
        ("hardware_exit_reason", u64),
        ("fail_entry", RunFailEntry),
        ("ex", RunException),
        ("io", RunIo),
        ("mmio", RunMmio),
        ("internal", RunInternal),
        ("system_event", RunSystemEvent),
        ("msr", RunMsr),
        ("padding", ctypes.c_char * 256),
    ]


class Run(ctypes.Structure):
    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("exit", RunExit),
    ]


# ---------------------------------------------------------------- numbers

KVM_API_VERSION = 12

KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, ctypes.sizeof(Cpuid2Header))
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, ctypes.sizeof(UserspaceMemoryRegion))
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, 8)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, ctypes.sizeof(IrqLevel))
KVM_IRQFD = _iow(0x76, ctypes.sizeof(Irqfd))
KVM_CREATE_PIT2 = _iow(0x77, ctypes.sizeof(PitConfig))
KVM_IOEVENTFD = _iow(0x79, ctypes.sizeof(Ioeventfd))
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, ctypes.sizeof(Regs))
KVM_SET_REGS = _iow(0x82, ctypes.sizeof(Regs))
KVM_GET_SREGS = _ior(0x83, ctypes.sizeof(Sregs))
KVM_SET_SREGS = _iow(0x84, ctypes.sizeof(Sregs))
KVM_TRANSLATE = _iowr(0x85, ctypes.sizeof(Translation))
KVM_GET_MSRS = _iowr(0x88, ctypes.sizeof(MsrsHeader))
KVM_SET_MSRS = _iow(0x89, ctypes.sizeof(MsrsHeader))
KVM_GET_FPU = _ior(0x8C, ctypes.sizeof(Fpu))
KVM_SET_FPU = _iow(0x8D, ctypes.sizeof(Fpu))
KVM_GET_LAPIC = _ior(0x8E, ctypes.sizeof(LapicState))
KVM_SET_LAPIC = _iow(0x8F, ctypes.sizeof(LapicState))
KVM_SET_CPUID2 = _iow(0x90, ctypes.sizeof(Cpuid2Header))
KVM_GET_MP_STATE = _ior(0x98, ctypes.sizeof(MpState))
KVM_SET_MP_STATE = _iow(0x99, ctypes.sizeof(MpState))
KVM_GET_VCPU_EVENTS = _ior(0x9F, ctypes.sizeof(VcpuEvents))
KVM_SET_VCPU_EVENTS = _iow(0xA0, ctypes.sizeof(VcpuEvents))
KVM_GET_XSAVE = _ior(0xA4, ctypes.sizeof(Xsave))
KVM_SET_XSAVE = _iow(0xA5, ctypes.sizeof(Xsave))
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_ENABLE_CAP = _iow(0xA3, ctypes.sizeof(EnableCap))
KVM_SIGNAL_MSI = _iow(0xA5, ctypes.sizeof(Msi))
KVM_X86_SET_MSR_FILTER = _iow(0xC6, ctypes.sizeof(MsrFilter))

# capabilities
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_PIT2 = 33
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_IOEVENTFD = 36
KVM_CAP_IRQFD = 32
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_HYPERV = 44
KVM_CAP_X86_USER_SPACE_MSR = 188
KVM_CAP_X86_MSR_FILTER = 189

# exit reasons
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30

EXIT_NAMES = {
    v: k.removeprefix("KVM_EXIT_")
    for k, v in list(globals().items())
    if k.startswith("KVM_EXIT_") and isinstance(v, int)
}

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

KVM_MSR_EXIT_REASON_INVAL = 1 << 0
KVM_MSR_EXIT_REASON_UNKNOWN = 1 << 1
KVM_MSR_EXIT_REASON_FILTER = 1 << 2

KVM_MSR_FILTER_READ = 1 << 0
KVM_MSR_FILTER_WRITE = 1 << 1
KVM_MSR_FILTER_DEFAULT_ALLOW = 0
KVM_MSR_FILTER_DEFAULT_DENY = 1

KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2

KVM_IRQFD_FLAG_DEASSIGN = 1 << 0

KVM_PIT_SPEAKER_DUMMY = 1

KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4

# ---------------------------------------------------------------- the syscall

_libc = ctypes.CDLL(None, use_errno=True)
_libc_ioctl = _libc.ioctl
_libc_ioctl.restype = ctypes.c_int


class KvmError(OSError):
    """An ioctl on a KVM fd failed; the message names the ioctl."""


_IOCTL_NAMES: dict[int, str] = {}


def _name(req: int) -> str:
    if not _IOCTL_NAMES:
        for k, v in globals().items():
            if k.startswith("KVM_") and isinstance(v, int) and v > 0xFF:
                _IOCTL_NAMES.setdefault(v, k)
    return _IOCTL_NAMES.get(req, f"ioctl {req:#x}")


def ioctl(fd: int, req: int, arg: int | ctypes._CData | ctypes.Array[ctypes.c_char] = 0) -> int:
    """One ioctl; an int argument is passed by value, a ctypes object by reference."""
    if isinstance(arg, int):
        carg: object = ctypes.c_ulong(arg)
    else:
        carg = ctypes.byref(arg)
    ret: int = _libc_ioctl(ctypes.c_int(fd), ctypes.c_ulong(req), carg)
    if ret < 0:
        err = ctypes.get_errno()
        raise KvmError(err, f"{_name(req)}: {os.strerror(err)}")
    return ret


# ---------------------------------------------------------------- CPUID


@dataclass
class CpuidLeaf:
    """One CPUID leaf (function, index) as KVM_SET_CPUID2 takes it."""

    function: int
    index: int
    eax: int
    ebx: int
    ecx: int
    edx: int
    flags: int = 0

    def regs(self) -> tuple[int, int, int, int]:
        return (self.eax, self.ebx, self.ecx, self.edx)


def cpuid_to_struct(leaves: Sequence[CpuidLeaf]) -> ctypes.Array[ctypes.c_char]:
    hdr = ctypes.sizeof(Cpuid2Header)
    ent = ctypes.sizeof(CpuidEntry2)
    buf = ctypes.create_string_buffer(hdr + ent * len(leaves))
    Cpuid2Header.from_buffer(buf).nent = len(leaves)
    for i, leaf in enumerate(leaves):
        e = CpuidEntry2.from_buffer(buf, hdr + i * ent)
        e.function, e.index, e.flags = leaf.function, leaf.index, leaf.flags
        e.eax, e.ebx, e.ecx, e.edx = leaf.regs()
    return buf


def cpuid_from_struct(buf: ctypes.Array[ctypes.c_char]) -> list[CpuidLeaf]:
    hdr = ctypes.sizeof(Cpuid2Header)
    ent = ctypes.sizeof(CpuidEntry2)
    n = Cpuid2Header.from_buffer(buf).nent
    out = []
    for i in range(n):
        e = CpuidEntry2.from_buffer(buf, hdr + i * ent)
        out.append(CpuidLeaf(e.function, e.index, e.eax, e.ebx, e.ecx, e.edx, e.flags))
    return out


# ---------------------------------------------------------------- fd wrappers


class Kvm:
    """/dev/kvm: the system fd."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        version = ioctl(self.fd, KVM_GET_API_VERSION)
        if version != KVM_API_VERSION:
            os.close(self.fd)
            raise KvmError(0, f"KVM API version {version}, expected {KVM_API_VERSION}")

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, KVM_CHECK_EXTENSION, cap)

    def vcpu_mmap_size(self) -> int:
        return ioctl(self.fd, KVM_GET_VCPU_MMAP_SIZE)

    def supported_cpuid(self) -> list[CpuidLeaf]:
        n = 128
        while True:
            buf = ctypes.create_string_buffer(
                ctypes.sizeof(Cpuid2Header) + n * ctypes.sizeof(CpuidEntry2)
            )
            Cpuid2Header.from_buffer(buf).nent = n
            try:
                ioctl(self.fd, KVM_GET_SUPPORTED_CPUID, buf)
            except KvmError as e:
                if e.errno == 7 and n < 4096:  # E2BIG
                    n *= 2
                    continue
                raise
            return cpuid_from_struct(buf)

    def create_vm(self) -> VmFd:
        return VmFd(ioctl(self.fd, KVM_CREATE_VM, 0), self)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class VmFd:
    """A VM fd: memory, irqchip, PIT, eventfds, MSR filter, vCPU creation."""

    def __init__(self, fd: int, kvm: Kvm) -> None:
        self.fd = fd
        self.kvm = kvm
        self._filter_bitmaps: list[ctypes.Array[ctypes.c_char]] = []

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, KVM_CHECK_EXTENSION, cap)

    def set_user_memory_region(
        self, slot: int, gpa: int, size: int, userspace_addr: int, flags: int = 0
    ) -> None:
        r = UserspaceMemoryRegion(slot, flags, gpa, size, userspace_addr)
        ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, r)

    def set_tss_addr(self, gpa: int) -> None:
        ioctl(self.fd, KVM_SET_TSS_ADDR, gpa)

    def set_identity_map_addr(self, gpa: int) -> None:
        ioctl(self.fd, KVM_SET_IDENTITY_MAP_ADDR, u64(gpa))

    def create_irqchip(self) -> None:
        ioctl(self.fd, KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = KVM_PIT_SPEAKER_DUMMY) -> None:
        ioctl(self.fd, KVM_CREATE_PIT2, PitConfig(flags))

    def irq_line(self, irq: int, level: int) -> None:
        ioctl(self.fd, KVM_IRQ_LINE, IrqLevel(irq, level))

    def enable_cap(self, cap: int, *args: int) -> None:
        c = EnableCap(cap, 0)
        for i, a in enumerate(args):
            c.args[i] = a
        ioctl(self.fd, KVM_ENABLE_CAP, c)

    def set_msr_filter(
        self,
        ranges: Iterable[tuple[int, int, int, bytes]],
        default_deny: bool = False,
    ) -> None:
        """ranges: (flags READ|WRITE, base MSR, count, bitmap): a clear bit sends the MSR
        to user space (with KVM_MSR_EXIT_REASON_FILTER enabled), a set bit leaves it to KVM."""
        f = MsrFilter(KVM_MSR_FILTER_DEFAULT_DENY if default_deny else 0)
        bitmaps = []
        for i, (flags, base, count, bitmap) in enumerate(ranges):
            if len(bitmap) * 8 < count:
                raise ValueError("MSR filter bitmap shorter than its range")
            b = ctypes.create_string_buffer(bytes(bitmap), len(bitmap))
            bitmaps.append(b)
            f.ranges[i] = MsrFilterRange(flags, count, base, 0, ctypes.addressof(b))
        ioctl(self.fd, KVM_X86_SET_MSR_FILTER, f)
        self._filter_bitmaps = bitmaps  # KVM copies them, but keep until replaced anyway

    def ioeventfd(
        self,
        fd: int,
        addr: int,
        length: int,
        *,
        datamatch: int | None = None,
        pio: bool = True,
        deassign: bool = False,
    ) -> None:
        """A guest write of `length` bytes to port/MMIO `addr` (matching `datamatch`, if
        given) signals eventfd `fd` inside KVM, with no exit to user space."""
        flags = (KVM_IOEVENTFD_FLAG_PIO if pio else 0) | (
            KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0
        )
        if datamatch is not None:
            flags |= KVM_IOEVENTFD_FLAG_DATAMATCH
        e = Ioeventfd(datamatch or 0, addr, length, fd, flags)
        ioctl(self.fd, KVM_IOEVENTFD, e)

    def irqfd(self, fd: int, gsi: int, *, deassign: bool = False) -> None:
        """Writing eventfd `fd` raises GSI `gsi` on the in-kernel irqchip."""
        ioctl(self.fd, KVM_IRQFD, Irqfd(fd, gsi, KVM_IRQFD_FLAG_DEASSIGN if deassign else 0, 0))

    def signal_msi(self, address: int, data: int) -> int:
        """Deliver one MSI; returns >0 delivered, 0 blocked by the guest."""
        return ioctl(self.fd, KVM_SIGNAL_MSI, Msi(address & 0xFFFFFFFF, address >> 32, data, 0))

    def create_vcpu(self, vcpu_id: int) -> VcpuFd:
        fd = ioctl(self.fd, KVM_CREATE_VCPU, vcpu_id)
        return VcpuFd(fd, vcpu_id, self.kvm.vcpu_mmap_size())

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class VcpuFd:
    """A vCPU fd and its mmapped kvm_run."""

    def __init__(self, fd: int, vcpu_id: int, mmap_size: int) -> None:
        self.fd = fd
        self.id = vcpu_id
        self.mmap = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # by address, not from_buffer: an exported buffer would keep mmap.close() from
        # working while any frame (a traceback's, say) still refers to the struct
        anchor = ctypes.c_char.from_buffer(self.mmap)
        self._run_addr = ctypes.addressof(anchor)
        del anchor
        self.run_struct = Run.from_address(self._run_addr)
        self._run_req = ctypes.c_ulong(KVM_RUN)
        self._fd = ctypes.c_int(fd)
        self._zero = ctypes.c_ulong(0)

    def run(self) -> int:
        """KVM_RUN once; returns 0 or -errno (EINTR/EAGAIN are normal), never raises."""
        if _libc_ioctl(self._fd, self._run_req, self._zero) < 0:
            return -ctypes.get_errno()
        return 0

    def get_regs(self) -> Regs:
        r = Regs()
        ioctl(self.fd, KVM_GET_REGS, r)
        return r

    def set_regs(self, r: Regs) -> None:
        ioctl(self.fd, KVM_SET_REGS, r)

    def get_sregs(self) -> Sregs:
        s = Sregs()
        ioctl(self.fd, KVM_GET_SREGS, s)
        return s

    def set_sregs(self, s: Sregs) -> None:
        ioctl(self.fd, KVM_SET_SREGS, s)

    def get_fpu(self) -> Fpu:
        f = Fpu()
        ioctl(self.fd, KVM_GET_FPU, f)
        return f

    def set_fpu(self, f: Fpu) -> None:
        ioctl(self.fd, KVM_SET_FPU, f)

    def get_msrs(self, indices: Sequence[int]) -> dict[int, int]:
        buf = self._msr_buf([(i, 0) for i in indices])
        n = ioctl(self.fd, KVM_GET_MSRS, buf)
        out = {}
        for k in range(n):
            e = MsrEntry.from_buffer(buf, ctypes.sizeof(MsrsHeader) + k * ctypes.sizeof(MsrEntry))
            out[e.index] = e.data
        return out

    def set_msrs(self, values: Mapping[int, int]) -> None:
        buf = self._msr_buf(list(values.items()))
        n = ioctl(self.fd, KVM_SET_MSRS, buf)
        if n != len(values):
            bad = list(values)[n]
            raise KvmError(0, f"KVM_SET_MSRS: MSR {bad:#x} refused")

    @staticmethod
    def _msr_buf(items: list[tuple[int, int]]) -> ctypes.Array[ctypes.c_char]:
        hdr = ctypes.sizeof(MsrsHeader)
        buf = ctypes.create_string_buffer(hdr + len(items) * ctypes.sizeof(MsrEntry))
        MsrsHeader.from_buffer(buf).nmsrs = len(items)
        for k, (index, data) in enumerate(items):
            e = MsrEntry.from_buffer(buf, hdr + k * ctypes.sizeof(MsrEntry))
            e.index, e.data = index, data
        return buf

    def set_cpuid2(self, leaves: Sequence[CpuidLeaf]) -> None:
        ioctl(self.fd, KVM_SET_CPUID2, cpuid_to_struct(leaves))

    def translate(self, linear: int) -> Translation:
        t = Translation(linear)
        ioctl(self.fd, KVM_TRANSLATE, t)
        return t

    def get_xsave(self) -> Xsave:
        x = Xsave()
        ioctl(self.fd, KVM_GET_XSAVE, x)
        return x

    def set_xsave(self, x: Xsave) -> None:
        ioctl(self.fd, KVM_SET_XSAVE, x)

    def get_mxcsr(self) -> int:
        """MXCSR through KVM_GET_XSAVE: KVM_GET_FPU reports 0 on this host (seen on 6.18
        kvm_pvm), the XSAVE image has the real value."""
        return int(self.get_xsave().region[XSAVE_MXCSR])

    def set_mxcsr(self, value: int) -> None:
        """MXCSR through KVM_SET_XSAVE; XSTATE_BV.SSE must be set or KVM keeps the
        init value (the XMM registers go with it, unchanged from the read)."""
        x = self.get_xsave()
        x.region[XSAVE_MXCSR] = value
        x.region[XSAVE_XSTATE_BV] |= XFEATURE_MASK_SSE
        self.set_xsave(x)

    def get_vcpu_events(self) -> VcpuEvents:
        e = VcpuEvents()
        ioctl(self.fd, KVM_GET_VCPU_EVENTS, e)
        return e

    def set_vcpu_events(self, e: VcpuEvents) -> None:
        ioctl(self.fd, KVM_SET_VCPU_EVENTS, e)

    def get_lapic(self) -> LapicState:
        s = LapicState()
        ioctl(self.fd, KVM_GET_LAPIC, s)
        return s

    def set_lapic(self, s: LapicState) -> None:
        ioctl(self.fd, KVM_SET_LAPIC, s)

    def get_mp_state(self) -> int:
        m = MpState()
        ioctl(self.fd, KVM_GET_MP_STATE, m)
        return int(m.mp_state)

    def set_mp_state(self, state: int) -> None:
        ioctl(self.fd, KVM_SET_MP_STATE, MpState(state))

    def tsc_khz(self) -> int:
        return ioctl(self.fd, KVM_GET_TSC_KHZ)

    def io_data(self, offset: int, length: int) -> memoryview:
        """The kvm_run area KVM_EXIT_IO's data_offset points into."""
        return memoryview(self.mmap)[offset : offset + length]

    def close(self) -> None:
        if self.fd >= 0:
            self.mmap.close()
            os.close(self.fd)
            self.fd = -1
