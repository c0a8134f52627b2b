"""The VMM core: one KVM VM, its RAM, devices on the port/MMIO buses, one thread per vCPU.

Each vCPU runs KVM_RUN in its own OS thread (ctypes drops the GIL for the ioctl) and
dispatches exits there: port and MMIO accesses to the device registered for the
address, RDMSR/WRMSR exits (the MSRs sent to user space by the filter) to the
machine's MSR handlers, and INTERNAL_ERROR to the hooks that work around emulation
gaps (vmbus/kvm/pvm.py). Everything else in the VMM runs in trio; an exit that needs
async work uses `Vcpu.call_in_trio`. `Machine.run()` returns when a vCPU stops the
machine (guest shutdown, a debug-exit port write, `request_stop`) and raises
`VcpuFault` with the exit, rip and the instruction bytes at rip when the guest hit
something the VMM cannot handle.

Exit cost, measured with tests/test_kvm_core.py's UART LSR loop under kvm_pvm on this
machine (2 vCPUs, Python 3.11): 17,000-65,000 exits/s through this loop (it varies with
the host's load), of which ~86%
of the time is spent inside KVM_RUN itself (~40 us per round trip under PVM) and
~7 us in the Python dispatch. A C loop could win at most ~15%, so there is none.
"""

from __future__ import annotations

import errno
import signal
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import trio

from vmbus.kvm import kvmapi, paging
from vmbus.kvm.kvmapi import CpuidLeaf
from vmbus.kvm.ram import KvmRam

T = TypeVar("T")

HV_MSR_BASE = 0x40000000
HV_MSR_COUNT = 0x200
IOAPIC_GPA = 0xFEC00000
LAPIC_GPA = 0xFEE00000
TSS_GPA = 0xFFFBD000  # 3 pages below the BIOS area, as QEMU and kvmtool use
IDENTITY_MAP_GPA = 0xFFFBC000
DEBUG_EXIT_PORT = 0xF4

# sent to a vCPU thread to make its KVM_RUN return EINTR (with immediate_exit set);
# run() installs a no-op handler for it while the machine runs, then restores the old one
_KICK_SIGNAL = signal.SIGUSR2


_current = threading.local()


def current_vcpu() -> Vcpu:
    """The vCPU whose exit is being handled on this thread: for a device that needs the
    guest's registers (a hypercall trapped through a port reads rcx/rdx/r8)."""
    vcpu: Vcpu | None = getattr(_current, "vcpu", None)
    if vcpu is None:
        raise RuntimeError("not on a vCPU thread")
    return vcpu


class PortDevice(Protocol):
    """A device on the I/O port bus; gets the absolute port and the access size."""

    def io_read(self, port: int, size: int) -> int: ...

    def io_write(self, port: int, size: int, value: int) -> None: ...


class MmioDevice(Protocol):
    def mmio_read(self, addr: int, size: int) -> int: ...

    def mmio_write(self, addr: int, size: int, value: int) -> None: ...


RdmsrHandler = Callable[["Vcpu", int], "int | None"]  # None: inject #GP
WrmsrHandler = Callable[["Vcpu", int, int], bool]  # False: inject #GP
InternalErrorHook = Callable[["Vcpu"], bool]  # True: handled, resume the guest
CpuidEdit = Callable[[list[CpuidLeaf]], None]


@dataclass(frozen=True)
class StopReason:
    """Why the machine stopped: kind is 'requested', 'debug-exit', 'hlt', 'shutdown' or
    'system-event'; code is the debug-exit value or the system event type."""

    kind: str
    vcpu: int = -1
    code: int = 0
    detail: str = ""


class VcpuFault(RuntimeError):
    """The guest did something the VMM cannot handle; the message names the exit, rip
    and the instruction bytes there."""

    def __init__(self, message: str, *, exit_reason: int = -1, rip: int = 0) -> None:
        super().__init__(message)
        self.exit_reason = exit_reason
        self.rip = rip


class DebugExit:
    """Port 0xf4 (QEMU's isa-debug-exit convention): a write stops the machine with
    that value; how the tests' tiny guest ends."""

    def __init__(self, machine: Machine) -> None:
        self._machine = machine

    def io_read(self, port: int, size: int) -> int:
        return 0xFF

    def io_write(self, port: int, size: int, value: int) -> None:
        self._machine.request_stop(StopReason("debug-exit", code=value))


def apply_cpuid(
    leaves: list[CpuidLeaf],
    overrides: Mapping[tuple[int, int], tuple[int, int, int, int] | None],
) -> list[CpuidLeaf]:
    """Leaves with overrides applied: (function, index) -> (eax, ebx, ecx, edx) replaces
    or adds a leaf, -> None removes it."""
    out = [leaf for leaf in leaves if (leaf.function, leaf.index) not in overrides]
    for (function, index), regs in sorted(overrides.items()):
        if regs is None:
            continue
        flags = 0
        for leaf in leaves:
            if leaf.function == function:
                flags = leaf.flags
                break
        out.append(CpuidLeaf(function, index, *regs, flags=flags))
    return out


def cpuid_for_vcpu(leaves: Sequence[CpuidLeaf], vcpu_id: int) -> list[CpuidLeaf]:
    """Per-vCPU copies: the initial APIC ID in leaf 1 and the x2APIC ID in 0xb/0x1f."""
    out = []
    for leaf in leaves:
        leaf = CpuidLeaf(**leaf.__dict__)
        if leaf.function == 1:
            leaf.ebx = (leaf.ebx & 0x00FFFFFF) | (vcpu_id << 24)
        elif leaf.function in (0xB, 0x1F):
            leaf.edx = vcpu_id
        out.append(leaf)
    return out


class Vcpu:
    """One vCPU: its fd, its thread and its exit loop."""

    def __init__(self, machine: Machine, fd: kvmapi.VcpuFd) -> None:
        self.machine = machine
        self.fd = fd
        self.id = fd.id
        self.thread: threading.Thread | None = None
        self.exits = [0] * 64  # by exit reason
        self.run_time = 0.0

    # ---- helpers for exit handlers

    def regs(self) -> kvmapi.Regs:
        return self.fd.get_regs()

    def translate(self, va: int) -> int:
        """The GPA of a guest linear address, walking the guest's page tables."""
        s = self.fd.get_sregs()
        return paging.translate(self.machine.ram, s.cr0, s.cr3, s.cr4, s.efer, va)

    def read_virt(self, va: int, length: int) -> bytes:
        out = b""
        while len(out) < length:
            here = min(length - len(out), 0x1000 - (va & 0xFFF))
            out += self.machine.ram.read(self.translate(va), here)
            va += here
        return out

    def write_virt(self, va: int, data: bytes) -> None:
        done = 0
        while done < len(data):
            here = min(len(data) - done, 0x1000 - (va & 0xFFF))
            self.machine.ram.write(self.translate(va), data[done : done + here])
            va += here
            done += here

    def inject_exception(self, vector: int, error_code: int | None = None) -> None:
        ev = self.fd.get_vcpu_events()
        ev.exception.injected = 1
        ev.exception.nr = vector
        ev.exception.has_error_code = 1 if error_code is not None else 0
        ev.exception.error_code = error_code or 0
        ev.exception.pending = 0
        ev.flags = 0
        self.fd.set_vcpu_events(ev)

    def call_in_trio(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run an async function in the machine's trio loop; blocks this vCPU until done."""
        token = self.machine.trio_token
        if token is None:
            raise RuntimeError("the machine is not running under trio")
        return trio.from_thread.run(fn, trio_token=token)

    def describe(self) -> str:
        """rip, the instruction bytes at rip, and the mode, for fault messages."""
        try:
            r = self.fd.get_regs()
            s = self.fd.get_sregs()
        except OSError as e:
            return f"(registers unreadable: {e})"
        try:
            insn = self.read_virt(s.cs.base + r.rip, 16).hex(" ")
        except (LookupError, ValueError) as e:
            insn = f"unreadable ({e})"
        return (
            f"rip={r.rip:#x} bytes at rip: {insn}; rsp={r.rsp:#x} rflags={r.rflags:#x} "
            f"cs={s.cs.selector:#x} cr0={s.cr0:#x} cr3={s.cr3:#x} cr4={s.cr4:#x} efer={s.efer:#x}"
        )

    # ---- the loop

    def _thread_main(self) -> None:
        _current.vcpu = self
        try:
            reason = self._loop()
        except BaseException as e:  # reported to trio by the machine
            self.machine._vcpu_done(self, None, e)
        else:
            self.machine._vcpu_done(self, reason, None)

    def _loop(self) -> StopReason | None:
        run = self.fd.run_struct
        m = self.machine
        exits = self.exits
        io_data = self.fd.mmap
        ports = m._ports
        t0 = time.monotonic()
        try:
            while not m._stopping:
                r = self.fd.run()
                if r < 0:
                    if r in (-errno.EINTR, -errno.EAGAIN):
                        continue
                    raise VcpuFault(f"vCPU {self.id}: KVM_RUN failed: {errno.errorcode[-r]}")
                reason = run.exit_reason
                exits[reason & 63] += 1
                if reason == kvmapi.KVM_EXIT_IO:
                    io = run.exit.io
                    port, size, count, off = io.port, io.size, io.count, io.data_offset
                    dev = ports.get(port)
                    if io.direction == kvmapi.KVM_EXIT_IO_OUT:
                        if dev is None:
                            m.unhandled_ports[port] = m.unhandled_ports.get(port, 0) + 1
                            continue
                        for k in range(count):
                            value = int.from_bytes(
                                io_data[off + k * size : off + (k + 1) * size], "little"
                            )
                            dev.io_write(port, size, value)
                    else:
                        for k in range(count):
                            if dev is None:
                                m.unhandled_ports[port] = m.unhandled_ports.get(port, 0) + 1
                                value = (1 << (8 * size)) - 1
                            else:
                                value = dev.io_read(port, size)
                            io_data[off + k * size : off + (k + 1) * size] = value.to_bytes(
                                size, "little"
                            )
                elif reason == kvmapi.KVM_EXIT_MMIO:
                    self._mmio(run.exit.mmio)
                elif reason == kvmapi.KVM_EXIT_X86_RDMSR:
                    msr = run.exit.msr
                    got = m.rdmsr(self, msr.index)
                    if got is None:
                        msr.error = 1
                    else:
                        msr.error = 0
                        msr.data = got
                elif reason == kvmapi.KVM_EXIT_X86_WRMSR:
                    msr = run.exit.msr
                    msr.error = 0 if m.wrmsr(self, msr.index, msr.data) else 1
                elif reason == kvmapi.KVM_EXIT_INTR:
                    continue
                elif reason == kvmapi.KVM_EXIT_HLT:
                    return StopReason("hlt", self.id)
                elif reason == kvmapi.KVM_EXIT_SHUTDOWN:
                    return StopReason("shutdown", self.id, detail=self.describe())
                elif reason == kvmapi.KVM_EXIT_SYSTEM_EVENT:
                    ev = run.exit.system_event
                    return StopReason("system-event", self.id, code=ev.type)
                elif reason == kvmapi.KVM_EXIT_INTERNAL_ERROR:
                    if any(hook(self) for hook in m.internal_error_hooks):
                        continue
                    raise self._fault(reason)
                else:
                    raise self._fault(reason)
            return None
        finally:
            self.run_time += time.monotonic() - t0

    def _mmio(self, mmio: kvmapi.RunMmio) -> None:
        addr, length = mmio.phys_addr, mmio.len
        hit = self.machine._mmio_device(addr)
        if mmio.is_write:
            value = int.from_bytes(bytes(mmio.data)[:length], "little")
            if hit is not None:
                hit.mmio_write(addr, length, value)
        else:
            value = hit.mmio_read(addr, length) if hit is not None else (1 << (8 * length)) - 1
            for k in range(length):
                mmio.data[k] = (value >> (8 * k)) & 0xFF

    def _fault(self, reason: int) -> VcpuFault:
        run = self.fd.run_struct
        name = kvmapi.EXIT_NAMES.get(reason, str(reason))
        extra = ""
        if reason == kvmapi.KVM_EXIT_INTERNAL_ERROR:
            i = run.exit.internal
            data = " ".join(f"{i.data[k]:#x}" for k in range(min(i.ndata, 16)))
            sub = {1: "emulation", 2: "simultaneous exceptions", 3: "event delivery"}.get(
                i.suberror, str(i.suberror)
            )
            extra = f" suberror={sub} data=[{data}]"
        elif reason == kvmapi.KVM_EXIT_FAIL_ENTRY:
            f = run.exit.fail_entry
            extra = f" hardware_entry_failure_reason={f.hardware_entry_failure_reason:#x}"
        try:
            rip = self.fd.get_regs().rip
        except OSError:
            rip = 0
        return VcpuFault(
            f"vCPU {self.id}: KVM_EXIT_{name}{extra}; {self.describe()}",
            exit_reason=reason,
            rip=rip,
        )


class Machine:
    """A KVM VM: RAM (a sealed memfd, split around the PCI hole), the in-kernel irqchip
    and PIT, vCPUs with the CPUID the caller shapes, the Hyper-V MSR range sent to user
    space, and port/MMIO buses for user-space devices."""

    def __init__(
        self,
        mem_size: int = 256 << 20,
        vcpus: int = 1,
        *,
        irqchip: bool = True,
        pit: bool = True,
        cpuid: Mapping[tuple[int, int], tuple[int, int, int, int] | None] | None = None,
        cpuid_edits: Sequence[CpuidEdit] = (),
        user_msr_ranges: Sequence[tuple[int, int]] = ((HV_MSR_BASE, HV_MSR_COUNT),),
        kvm: kvmapi.Kvm | None = None,
    ) -> None:
        """cpuid: leaves to override/add/remove; cpuid_edits: functions that edit the
        list in place before the overrides (pvm.hide_features is one)."""
        self.kvm = kvm or kvmapi.Kvm()
        self._own_kvm = kvm is None
        self.vm = self.kvm.create_vm()
        self.ram = KvmRam(mem_size)
        self.irqchip = irqchip
        self._ports: dict[int, PortDevice] = {}
        self._mmio: list[tuple[int, int, MmioDevice]] = []
        self.unhandled_ports: dict[int, int] = {}
        self.rdmsr: RdmsrHandler = lambda vcpu, index: None
        self.wrmsr: WrmsrHandler = lambda vcpu, index, value: False
        self.internal_error_hooks: list[InternalErrorHook] = []
        self.trio_token: trio.lowlevel.TrioToken | None = None
        self._stopping = False
        self._reason: StopReason | None = None
        self._error: BaseException | None = None
        self._done: trio.Event | None = None
        self._lock = threading.Lock()
        try:
            self._setup(vcpus, irqchip, pit, cpuid or {}, cpuid_edits, user_msr_ranges)
        except BaseException:
            self.close()
            raise

    def _setup(
        self,
        nvcpus: int,
        irqchip: bool,
        pit: bool,
        cpuid: Mapping[tuple[int, int], tuple[int, int, int, int] | None],
        cpuid_edits: Sequence[CpuidEdit],
        user_msr_ranges: Sequence[tuple[int, int]],
    ) -> None:
        for slot, r in enumerate(self.ram.regions):
            self.vm.set_user_memory_region(slot, r.gpa, r.size, self.ram.host_addr + r.offset)
        # VMX needs a TSS and identity-map page for real mode; kvm_pvm and SVM don't mind
        if self.vm.check_extension(kvmapi.KVM_CAP_SET_TSS_ADDR):
            self.vm.set_tss_addr(TSS_GPA)
        if irqchip:
            self.vm.create_irqchip()
            if pit:
                self.vm.create_pit2()
        if user_msr_ranges:
            self.vm.enable_cap(kvmapi.KVM_CAP_X86_USER_SPACE_MSR, kvmapi.KVM_MSR_EXIT_REASON_FILTER)
            rw = kvmapi.KVM_MSR_FILTER_READ | kvmapi.KVM_MSR_FILTER_WRITE
            self.vm.set_msr_filter(
                [(rw, base, count, bytes((count + 7) // 8)) for base, count in user_msr_ranges]
            )
        leaves = self.kvm.supported_cpuid()
        for edit in cpuid_edits:
            edit(leaves)
        self.cpuid = apply_cpuid(leaves, cpuid)
        self.vcpus: list[Vcpu] = []
        for i in range(nvcpus):
            fd = self.vm.create_vcpu(i)
            vcpu = Vcpu(self, fd)
            self.vcpus.append(vcpu)
            fd.set_cpuid2(cpuid_for_vcpu(self.cpuid, i))
            if irqchip:
                _set_lint(fd)

    # ---- buses

    def add_port_device(self, base: int, count: int, device: PortDevice) -> None:
        for port in range(base, base + count):
            if port in self._ports:
                raise ValueError(f"port {port:#x} already has a device")
        for port in range(base, base + count):
            self._ports[port] = device

    def add_mmio_device(self, base: int, size: int, device: MmioDevice) -> None:
        for b, s, _ in self._mmio:
            if base < b + s and b < base + size:
                raise ValueError(f"MMIO {base:#x}+{size:#x} overlaps a device at {b:#x}")
        self._mmio.append((base, size, device))

    def _mmio_device(self, addr: int) -> MmioDevice | None:
        for b, s, dev in self._mmio:
            if b <= addr < b + s:
                return dev
        return None

    def irq_line(self, irq: int, level: int) -> None:
        if self.irqchip:
            self.vm.irq_line(irq, level)

    # ---- running

    def request_stop(self, reason: StopReason | None = None) -> None:
        """Stop every vCPU (from any thread); run() returns `reason`."""
        self._finish(reason or StopReason("requested"), None)

    def _vcpu_done(
        self, vcpu: Vcpu, reason: StopReason | None, error: BaseException | None
    ) -> None:
        if reason is None and error is None:
            return  # stopped because another vCPU (or the host) stopped the machine
        self._finish(reason, error)

    def _finish(self, reason: StopReason | None, error: BaseException | None) -> None:
        with self._lock:
            if self._reason is None and self._error is None:
                self._reason, self._error = reason, error
            self._stopping = True
        for v in self.vcpus:
            v.fd.run_struct.immediate_exit = 1
            _kick(v.thread)
        token, done = self.trio_token, self._done
        if token is not None and done is not None:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

    async def run(self, timeout: float | None = None) -> StopReason:
        """Run the vCPUs (already set up: see boot.py) until the machine stops.
        Raises VcpuFault (or a device's exception) from the vCPU that failed;
        a timeout returns StopReason('timeout')."""
        if any(v.thread is not None for v in self.vcpus):
            raise RuntimeError("a Machine runs once")
        old_handler = None
        if threading.current_thread() is threading.main_thread():
            # a handler (not SIG_DFL) so the kick interrupts KVM_RUN instead of killing us
            old_handler = signal.signal(_KICK_SIGNAL, _ignore_signal)
        self.trio_token = trio.lowlevel.current_trio_token()
        self._done = trio.Event()
        for v in self.vcpus:
            v.thread = threading.Thread(target=v._thread_main, name=f"vcpu{v.id}", daemon=True)
            v.thread.start()
        try:
            with trio.move_on_after(timeout if timeout is not None else float("inf")):
                await self._done.wait()
            if self._reason is None and self._error is None:
                self._finish(StopReason("timeout"), None)
        finally:
            if not self._stopping:
                self._finish(StopReason("requested"), None)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._join)
            if old_handler is not None:
                signal.signal(_KICK_SIGNAL, old_handler)
        if self._error is not None:
            raise self._error
        assert self._reason is not None
        return self._reason

    def _join(self) -> None:
        for v in self.vcpus:
            if v.thread is not None:
                while v.thread.is_alive():
                    _kick(v.thread)
                    v.thread.join(0.05)

    def exit_counts(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for v in self.vcpus:
            for reason, n in enumerate(v.exits):
                if n:
                    name = kvmapi.EXIT_NAMES.get(reason, str(reason))
                    total[name] = total.get(name, 0) + n
        return total

    def close(self) -> None:
        for v in getattr(self, "vcpus", []):
            v.fd.close()
        self.ram.close()
        self.vm.close()
        if self._own_kvm:
            self.kvm.close()


def _ignore_signal(signum: int, frame: object) -> None:
    """The vCPU kick: its only job is to make KVM_RUN return EINTR."""


def _kick(thread: threading.Thread | None) -> None:
    """Interrupt a vCPU thread's KVM_RUN. Only while a handler is installed (run() on
    the main thread does it): the default action of the signal would kill the process.
    Without one, a stop waits for the vCPU's next exit (immediate_exit is already set)."""
    if thread is None or thread.ident is None or thread is threading.current_thread():
        return
    if signal.getsignal(_KICK_SIGNAL) in (signal.SIG_DFL, signal.SIG_IGN, None):
        return
    try:
        signal.pthread_kill(thread.ident, _KICK_SIGNAL)
    except ProcessLookupError:
        pass


APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_EXTINT = 0x7
APIC_MODE_NMI = 0x4


def _set_lint(fd: kvmapi.VcpuFd) -> None:
    """LINT0 = ExtINT (the PIC, for virtual-wire mode), LINT1 = NMI, as a PC's BIOS
    leaves them; without it the PIT timer check before the IOAPIC is up goes nowhere."""
    raw = bytearray(bytes(fd.get_lapic()))
    for reg, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
        (value,) = struct.unpack_from("<I", raw, reg)
        value = (value & ~0x700) | (mode << 8)
        struct.pack_into("<I", raw, reg, value)
    fd.set_lapic(kvmapi.LapicState.from_buffer_copy(raw))
