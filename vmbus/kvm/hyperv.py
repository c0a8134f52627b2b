"""Hyper-V in user space: the part of the TLFS that Linux 6.1's hv_vmbus needs, as a
sans-IO core that the KVM VMM drives (this KVM has KVM_CAP_HYPERV = 0).

What the guest does, and what answers it here (Linux 6.1 sources named):
- `ms_hyperv_platform` / `ms_hyperv_init_platform` (arch/x86/kernel/cpu/mshyperv.c)
  read CPUID 0x40000000-0x40000005: `HyperVCpuid`. With the frequency MSRs offered they
  read HV_X64_MSR_TSC_FREQUENCY and HV_X64_MSR_APIC_FREQUENCY; with TSC_INVARIANT they
  write HV_X64_MSR_TSC_INVARIANT_CONTROL = 1.
- `hyperv_init` / `hv_cpu_init` (arch/x86/hyperv/hv_init.c, drivers/hv/hv_common.c)
  write the guest OS id, read-modify-write the hypercall MSR (enable + the page's GPA:
  the VMM fills the page with `HypercallStub`), read VP_INDEX, enable the VP assist page.
- `hv_synic_enable_regs` (drivers/hv/hv.c) enables SIMP, SIEFP, SINT2 (vector, unmasked,
  auto-EOI off because 0x40000004 says "deprecating AEOI") and SCONTROL.
- `hv_post_message` (HvPostMessage 0x5c, input page) and `vmbus_set_event` (fast
  HvSignalEvent 0x5d, rdx = connection id): `handle_hypercall`, `signal_port_exit`.
- `vmbus_isr` / `vmbus_on_msg_dpc` / `vmbus_signal_eom` (drivers/hv/vmbus_drv.c,
  include/asm-generic/mshyperv.h) take a message from the SIMP slot, cmpxchg its type to
  HVMSG_NONE and write HV_X64_MSR_EOM if msg_pending was set: `post_message`.
- `vmbus_chan_sched` test-and-clears bits in the SIEFP slot: `signal_event`.

The core touches guest memory only through `SynicRam` and asks for interrupts only
through `Injector`; it takes a lock for its own state, so vCPU threads (MSR exits,
hypercalls) and the VMM's event loop (messages and events from vmbusd) may call it at
once. docs/kvm.md says which TLFS pieces are emulated and which are not.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from vmbus import native as _native_sel
from vmbus.kvm.hypercall_page import HypercallStub

PAGE_SIZE = 4096
_PAGE_MASK = ~(PAGE_SIZE - 1) & 0xFFFF_FFFF_FFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF

# ---------------------------------------------------------------- CPUID (TLFS 2.4)

HYPERV_CPUID_VENDOR_AND_MAX_FUNCTIONS = 0x40000000
HYPERV_CPUID_INTERFACE = 0x40000001
HYPERV_CPUID_VERSION = 0x40000002
HYPERV_CPUID_FEATURES = 0x40000003
HYPERV_CPUID_ENLIGHTMENT_INFO = 0x40000004
HYPERV_CPUID_IMPLEMENT_LIMITS = 0x40000005

CPUID_1_ECX_HYPERVISOR = 1 << 31  # leaf 1 ecx: "running under a hypervisor"

# 0x40000003 eax: partition privileges, low half (the MSRs the guest may use)
HV_MSR_TIME_REF_COUNT_AVAILABLE = 1 << 1  # not offered: no reference counter MSR
HV_MSR_SYNIC_AVAILABLE = 1 << 2
HV_MSR_SYNTIMER_AVAILABLE = 1 << 3  # not offered: no synthetic timers
HV_MSR_APIC_ACCESS_AVAILABLE = 1 << 4  # not offered: EOI/ICR/TPR MSRs
HV_MSR_HYPERCALL_AVAILABLE = 1 << 5  # mandatory for Linux (ms_hyperv_platform)
HV_MSR_VP_INDEX_AVAILABLE = 1 << 6  # mandatory for Linux (ms_hyperv_platform)
HV_MSR_REFERENCE_TSC_AVAILABLE = 1 << 9  # not offered: no TSC page
HV_ACCESS_FREQUENCY_MSRS = 1 << 11
HV_ACCESS_TSC_INVARIANT = 1 << 15  # without it Linux marks the TSC unstable
# 0x40000003 ebx: partition privileges, high half (the hypercalls the guest may make)
HV_POST_MESSAGES = 1 << 4
HV_SIGNAL_EVENTS = 1 << 5
HV_CPU_MANAGEMENT = 1 << 12  # not offered: Linux would think it is the root partition
# 0x40000003 edx: features
HV_FEATURE_FREQUENCY_MSRS_AVAILABLE = 1 << 8
HV_FEATURE_GUEST_CRASH_MSR_AVAILABLE = 1 << 10  # not offered: no crash MSRs
# 0x40000004 eax: recommendations
HV_DEPRECATING_AEOI_RECOMMENDED = 1 << 9  # the guest EOIs through its local APIC
HV_X64_APIC_ACCESS_RECOMMENDED = 1 << 3  # not offered
HV_X64_CLUSTER_IPI_RECOMMENDED = 1 << 10  # not offered: no IPI hypercalls
HV_SPINLOCK_RETRIES_NEVER = 0xFFFFFFFF  # 0x40000004 ebx: never notify long spin waits


def _sig(text: bytes) -> tuple[int, ...]:
    return struct.unpack("<" + "I" * (len(text) // 4), text)


_L = TypeVar("_L", bound="_CpuidLeaf")


class _CpuidLeaf(Protocol):
    function: int
    ecx: int


@dataclass(frozen=True)
class HyperVCpuid:
    """The Hyper-V CPUID leaves that make Linux 6.1 accept the platform (the values the
    feasibility probe found, each bit named above), and no KVM signature leaves."""

    build: int = 17763  # 0x40000002: shown by Linux as "Hyper-V: Host Build 10.0.17763.0"
    major: int = 10
    minor: int = 0
    max_vps: int = 64
    max_lps: int = 64

    features: int = (
        HV_MSR_SYNIC_AVAILABLE
        | HV_MSR_HYPERCALL_AVAILABLE
        | HV_MSR_VP_INDEX_AVAILABLE
        | HV_ACCESS_FREQUENCY_MSRS
        | HV_ACCESS_TSC_INVARIANT
    )  # 0x8864
    privileges_high: int = HV_POST_MESSAGES | HV_SIGNAL_EVENTS  # 0x30
    features_edx: int = HV_FEATURE_FREQUENCY_MSRS_AVAILABLE  # 0x100
    recommendations: int = HV_DEPRECATING_AEOI_RECOMMENDED  # 0x200

    def leaves(
        self, leaf1: tuple[int, int, int, int] | None = None
    ) -> list[tuple[int, int, int, int, int, int]]:
        """(function, index, eax, ebx, ecx, edx) for 0x40000000-0x40000005; with the
        host's leaf 1 given, also leaf 1 with the hypervisor bit set."""
        vendor = _sig(b"Microsoft Hv")
        spin_retries = HV_SPINLOCK_RETRIES_NEVER
        out = [
            (HYPERV_CPUID_VENDOR_AND_MAX_FUNCTIONS, 0, HYPERV_CPUID_IMPLEMENT_LIMITS, *vendor),
            (HYPERV_CPUID_INTERFACE, 0, *_sig(b"Hv#1"), 0, 0, 0),
            (HYPERV_CPUID_VERSION, 0, self.build, (self.major << 16) | self.minor, 0, 0),
            (HYPERV_CPUID_FEATURES, 0, self.features, self.privileges_high, 0, self.features_edx),
            (HYPERV_CPUID_ENLIGHTMENT_INFO, 0, self.recommendations, spin_retries, 0, 0),
            (HYPERV_CPUID_IMPLEMENT_LIMITS, 0, self.max_vps, self.max_lps, 0, 0),
        ]
        if leaf1 is not None:
            eax, ebx, ecx, edx = leaf1
            out.insert(0, (1, 0, eax, ebx, ecx | CPUID_1_ECX_HYPERVISOR, edx))
        return [(f, i, a, b, c, d) for f, i, a, b, c, d in out]

    def overrides(self) -> dict[tuple[int, int], tuple[int, int, int, int]]:
        """The leaves as machine.apply_cpuid takes them: they replace KVM's own
        0x40000000/0x40000001 ("KVMKVMKVM"), which Linux would otherwise detect first."""
        return {(f, i): (a, b, c, d) for f, i, a, b, c, d in self.leaves()}

    @staticmethod
    def set_hypervisor_bit(leaves: list[_L]) -> None:
        """A machine.CpuidEdit: set the hypervisor bit in leaf 1 (ms_hyperv_platform
        looks at no other leaf unless it is set)."""
        for leaf in leaves:
            if leaf.function == 1:
                leaf.ecx |= CPUID_1_ECX_HYPERVISOR


# ---------------------------------------------------------------- MSRs (TLFS 2.4, 11)

HV_X64_MSR_GUEST_OS_ID = 0x40000000
HV_X64_MSR_HYPERCALL = 0x40000001
HV_X64_MSR_VP_INDEX = 0x40000002
HV_X64_MSR_REFERENCE_TSC = 0x40000021  # not emulated (#GP): feature bit 9 is off
HV_X64_MSR_TSC_FREQUENCY = 0x40000022
HV_X64_MSR_APIC_FREQUENCY = 0x40000023
HV_X64_MSR_VP_ASSIST_PAGE = 0x40000073
HV_X64_MSR_SCONTROL = 0x40000080
HV_X64_MSR_SVERSION = 0x40000081
HV_X64_MSR_SIEFP = 0x40000082
HV_X64_MSR_SIMP = 0x40000083
HV_X64_MSR_EOM = 0x40000084
HV_X64_MSR_SINT0 = 0x40000090
HV_X64_MSR_SINT15 = 0x4000009F
HV_X64_MSR_TSC_INVARIANT_CONTROL = 0x40000118
HV_MSR_RANGE = (0x40000000, 0x200)  # what the VMM's MSR filter sends to user space

HV_HYPERCALL_ENABLE = 1 << 0  # hypercall, VP assist, SIMP, SIEFP MSRs: bit 0 enables
HV_SYNIC_CONTROL_ENABLE = 1 << 0
HV_SYNIC_VERSION_1 = 1
HV_SYNIC_SINT_COUNT = 16
HV_SYNIC_FIRST_VALID_VECTOR = 16  # a SINT vector below this is refused with #GP
HV_SYNIC_SINT_VECTOR_MASK = 0xFF
HV_SYNIC_SINT_MASKED = 1 << 16
HV_SYNIC_SINT_AUTO_EOI = 1 << 17  # stored, not honoured: an MSI always needs an EOI
HV_SYNIC_SINT_POLLING = 1 << 18  # the message/flag lands, no interrupt is sent
HV_EXPOSE_INVARIANT_TSC = 1 << 0  # HV_X64_MSR_TSC_INVARIANT_CONTROL's only bit
SINT_INITIAL = HV_SYNIC_SINT_MASKED  # every SINT starts masked, vector 0

DEFAULT_APIC_FREQUENCY_HZ = 1_000_000_000  # KVM's in-kernel LAPIC timer: 1 ns per tick

# ---------------------------------------------------------------- hypercalls (TLFS 3)

HVCALL_POST_MESSAGE = 0x005C
HVCALL_SIGNAL_EVENT = 0x005D

HV_HYPERCALL_CODE_MASK = 0xFFFF
HV_HYPERCALL_FAST_BIT = 1 << 16
HV_HYPERCALL_VARHEAD_MASK = 0x3FF << 17
HV_HYPERCALL_REP_COMP_MASK = 0xFFF << 32
HV_HYPERCALL_REP_START_MASK = 0xFFF << 48
HV_HYPERCALL_RSVD_MASK = (0x1F << 27) | (0xF << 44) | (0xF << 60)

HV_STATUS_SUCCESS = 0
HV_STATUS_INVALID_HYPERCALL_CODE = 2
HV_STATUS_INVALID_HYPERCALL_INPUT = 3
HV_STATUS_INVALID_ALIGNMENT = 4
HV_STATUS_INVALID_PARAMETER = 5
HV_STATUS_ACCESS_DENIED = 6
HV_STATUS_INVALID_PORT_ID = 17
HV_STATUS_INVALID_CONNECTION_ID = 18
HV_STATUS_INSUFFICIENT_BUFFERS = 19

HV_CONNECTION_ID_MASK = 0x00FFFFFF
VMBUS_MESSAGE_CONNECTION_ID = 1
VMBUS_MESSAGE_CONNECTION_ID_4 = 4  # INITIATE_CONTACT for VMBus >= 5.0 (connection.c)
DEFAULT_MESSAGE_CONNECTION_IDS = frozenset(
    {VMBUS_MESSAGE_CONNECTION_ID, VMBUS_MESSAGE_CONNECTION_ID_4}
)

# ---------------------------------------------------------------- messages (TLFS 11.8)

HV_MESSAGE_SIZE = 256
HV_MESSAGE_HEADER_SIZE = 16
HV_MESSAGE_PAYLOAD_BYTE_COUNT = 240
HV_POST_MESSAGE_INPUT_SIZE = 256  # connection id, rsvd, type, size, 240-byte payload
HVMSG_NONE = 0
HV_MESSAGE_TYPE_HYPERVISOR = 1 << 31  # types with this bit are the hypervisor's own
HV_MESSAGE_FLAG_PENDING = 1 << 0  # message_flags.msg_pending
HV_EVENT_FLAGS_COUNT = 2048  # flags per SIEFP slot (256 bytes)

MESSAGE_QUEUE_LIMIT = 1024  # host->guest messages waiting per (vCPU, SINT)

_HEADER = struct.Struct("<IBBHQ")  # message_type, payload_size, flags, reserved, sender
_POST_INPUT = struct.Struct("<IIII")  # connection id, reserved, message_type, payload_size


class HyperVError(Exception):
    """The VMM (not the guest) misused the core: a bad vCPU, SINT, flag or payload."""


class MessageQueueFull(HyperVError):
    """MESSAGE_QUEUE_LIMIT messages already wait for this SINT: the guest is not taking
    them (SIMP or SCONTROL disabled, the SINT masked, or no EOM). The VMM should stop
    reading from vmbusd until `queued()` drops."""


class SynicRam(Protocol):
    """Guest memory as the core needs it (vmbus.kvm.ram.KvmRam fits). `slice` returns a
    writable view of a range inside one page, for the atomic slot operations."""

    def contains(self, gpa: int, length: int) -> bool: ...

    def read(self, gpa: int, length: int) -> bytes: ...

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None: ...

    def slice(self, gpa: int, length: int) -> memoryview: ...


class Injector(Protocol):
    """Sends `vector` to vCPU `vcpu`'s local APIC as a fixed, edge interrupt (the VMM:
    KVM_SIGNAL_MSI to that vCPU's APIC id)."""

    def inject(self, vcpu: int, vector: int) -> None: ...


# (connection_id, message_type, payload) -> HV status; the VMM forwards it to vmbusd
PostHandler = Callable[[int, int, bytes], int]
# (connection_id) -> HV status (HV_STATUS_INVALID_CONNECTION_ID for an unknown one)
SignalHandler = Callable[[int], int]


# ---------------------------------------------------------------- slot operations


_ACQUIRE, _RELEASE, _SEQ_CST = 2, 3, 5  # C11 memory_order values (GCC's __ATOMIC_*)
_LE32 = ctypes.c_uint32.__ctype_le__
_LE64 = ctypes.c_uint64.__ctype_le__


def _load_libatomic() -> tuple[Any, Any, Any] | str:
    """libatomic's fetch_or (1 and 8 bytes) and atomic_thread_fence, or why not.
    PyDLL: the calls keep the GIL (they never block), which saves a GIL round trip."""
    why = "libatomic not found"
    for name in ("libatomic.so.1", None):
        name = name or ctypes.util.find_library("atomic")  # slow (runs ldconfig): last
        if not name:
            continue
        try:
            dll = ctypes.PyDLL(name)
            or1, or8, fence = (
                dll.__atomic_fetch_or_1,
                dll.__atomic_fetch_or_8,
                dll.atomic_thread_fence,
            )
        except (OSError, AttributeError) as exc:
            why = f"{name}: {exc}"
            continue
        or1.argtypes, or1.restype = [ctypes.c_void_p, ctypes.c_uint8, ctypes.c_int], ctypes.c_uint8
        or8.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int]
        or8.restype = ctypes.c_uint64
        fence.argtypes, fence.restype = [ctypes.c_int], None
        return or1, or8, fence
    return why


class _PySlots:
    """The twin of native/hyperv.c (VMBUSD_NATIVE=0), same contract, same atomics.

    Python has no atomic read-modify-write and no fence of its own, and both matter
    here. A first twin without them lost the race it was warned about: against a guest
    running on another core (tests/test_kvm_hyperv.py) its msg_pending store waited in
    the store buffer while its second look at message_type went ahead, the guest cleared
    the slot and read msg_pending = 0, skipped its EOM, and delivery stalled after 8070
    of 30000 messages; its read-modify-write of an event-flag word brought back flags
    the guest had just cleared. So, as vmbus/ring.py's twin does for its fences, this
    one calls libatomic (GCC's runtime, installed with the compiler that builds
    vmbus._native) through ctypes: __atomic_fetch_or_1/_8 are the same locked ORs the C
    uses, and message_type is one 4-byte load or store. Without libatomic it refuses
    to work rather than run with the race."""

    name = "python"

    def __init__(self) -> None:
        got = _load_libatomic()
        if isinstance(got, str):
            raise HyperVError(f"the pure-Python SynIC slots need libatomic: {got}")
        self._or1, self._or8, self._fence = got

    def deliver(self, slot: memoryview, msg: bytes) -> bool:
        head = _LE32.from_buffer(slot)  # message_type: each .value is one 4-byte access
        try:
            if head.value != HVMSG_NONE:
                # a full barrier between this store and the load below; see hyperv.h
                self._or1(ctypes.addressof(head) + 5, HV_MESSAGE_FLAG_PENDING, _SEQ_CST)
                if head.value != HVMSG_NONE:
                    return False
            slot[4:HV_MESSAGE_SIZE] = msg[4:HV_MESSAGE_SIZE]
            self._fence(_RELEASE)  # the message before its type, as vmb_st32_release
            head.value = int.from_bytes(msg[0:4], "little")
            return True
        finally:
            del head  # let the caller release the view

    def event_set(self, slot: memoryview, flag: int) -> int:
        if not 0 <= flag < HV_EVENT_FLAGS_COUNT:
            return -1
        word = _LE64.from_buffer(slot, (flag // 64) * 8)
        try:
            bit = 1 << (flag % 64)
            return 0 if self._or8(ctypes.addressof(word), bit, _SEQ_CST) & bit else 1
        finally:
            del word


class _NativeSlots:
    """native/hyperv.c behind the `_PySlots` interface."""

    name = "native"

    def __init__(self, ffi: Any, lib: Any) -> None:
        if (lib.VMB_HV_MESSAGE_SIZE, lib.VMB_HV_EVENT_FLAGS) != (
            HV_MESSAGE_SIZE,
            HV_EVENT_FLAGS_COUNT,
        ):
            raise ImportError("vmbus._native SynIC sizes disagree with vmbus/kvm/hyperv.py")
        self._ffi, self._lib = ffi, lib

    def deliver(self, slot: memoryview, msg: bytes) -> bool:
        ffi = self._ffi
        dst = ffi.from_buffer("uint8_t[]", slot, require_writable=True)
        return bool(self._lib.vmb_hv_msg_deliver(dst, ffi.from_buffer("uint8_t[]", msg)))

    def event_set(self, slot: memoryview, flag: int) -> int:
        if not 0 <= flag < HV_EVENT_FLAGS_COUNT:
            return -1
        dst = self._ffi.from_buffer("uint8_t[]", slot, require_writable=True)
        return int(self._lib.vmb_hv_event_set(dst, flag))


def slot_ops(use_native: bool | None = None) -> _PySlots | _NativeSlots:
    """The C slot operations or their twin (default: as VMBUSD_NATIVE says)."""
    if use_native is None:
        use_native = _native_sel.NATIVE
    if not use_native:
        return _PySlots()
    if _native_sel.NATIVE:
        return _NativeSlots(_native_sel.ffi, _native_sel.lib)
    mod = _native_sel.native_module()
    return _NativeSlots(mod.ffi, mod.lib)


# ---------------------------------------------------------------- per-VP state


@dataclass
class SynIc:
    """One virtual processor's Hyper-V registers and its undelivered host->guest
    traffic (messages per SINT; event flags whose slot was not usable yet)."""

    index: int
    vp_assist: int = 0
    scontrol: int = 0
    simp: int = 0
    siefp: int = 0
    sints: list[int] = field(default_factory=lambda: [SINT_INITIAL] * HV_SYNIC_SINT_COUNT)
    queues: list[deque[bytes]] = field(
        default_factory=lambda: [deque() for _ in range(HV_SYNIC_SINT_COUNT)]
    )
    deferred_flags: list[set[int]] = field(
        default_factory=lambda: [set() for _ in range(HV_SYNIC_SINT_COUNT)]
    )

    @property
    def enabled(self) -> bool:
        return bool(self.scontrol & HV_SYNIC_CONTROL_ENABLE)

    def sint_open(self, sint: int) -> bool:
        """SCONTROL on and the SINT unmasked (its vector then is >= 16)."""
        return self.enabled and not self.sints[sint] & HV_SYNIC_SINT_MASKED


def _page(value: int) -> int:
    return value & _PAGE_MASK


# ---------------------------------------------------------------- the partition


class HyperVPartition:
    """The emulated hypervisor for one VM: partition-wide MSRs, one `SynIc` per vCPU,
    hypercalls, and host->guest message and event delivery.

    tsc_frequency_hz / apic_frequency_hz are the real rates (KVM_GET_TSC_KHZ; KVM's
    LAPIC timer runs at 1 GHz); the guest reads them multiplied by time_scale (the probe
    used 10: guest time then runs 10x slower than wall time, and the emulated tick costs
    10x less). message_connection_ids are the HvPostMessage connection ids the guest may
    use (VMBus: 1, and 4 for INITIATE_CONTACT from 5.0 on; vmbusd may name another in
    VERSION_RESPONSE, then add it with `allow_message_connection`)."""

    def __init__(
        self,
        ram: SynicRam,
        injector: Injector,
        *,
        vcpus: int,
        on_post: PostHandler,
        on_signal: SignalHandler,
        tsc_frequency_hz: int,
        apic_frequency_hz: int = DEFAULT_APIC_FREQUENCY_HZ,
        time_scale: int = 1,
        message_connection_ids: frozenset[int] = DEFAULT_MESSAGE_CONNECTION_IDS,
        stub: HypercallStub | None = None,
        use_native: bool | None = None,
    ) -> None:
        if vcpus < 1:
            raise ValueError("a partition needs at least one vCPU")
        if time_scale < 1 or tsc_frequency_hz < 1 or apic_frequency_hz < 1:
            raise ValueError("frequencies and time_scale must be positive")
        self._ram = ram
        self._injector = injector
        self._on_post = on_post
        self._on_signal = on_signal
        self.tsc_frequency_hz = tsc_frequency_hz
        self.apic_frequency_hz = apic_frequency_hz
        self.time_scale = time_scale
        self._message_ids = set(message_connection_ids)
        self.stub = stub or HypercallStub()
        self._slots = slot_ops(use_native)
        self._lock = threading.RLock()
        self.guest_os_id = 0
        self.hypercall = 0
        self.tsc_invariant_control = 0
        self.vps = [SynIc(i) for i in range(vcpus)]

    # ------------------------------------------------------------ MSRs

    def read_msr(self, vcpu: int, msr: int) -> int | None:
        """The value of a Hyper-V MSR for RDMSR on `vcpu`; None means #GP (an MSR this
        partition does not offer)."""
        with self._lock:
            vp = self._vp(vcpu)
            if msr == HV_X64_MSR_GUEST_OS_ID:
                return self.guest_os_id
            if msr == HV_X64_MSR_HYPERCALL:
                return self.hypercall
            if msr == HV_X64_MSR_VP_INDEX:
                return vp.index
            if msr == HV_X64_MSR_TSC_FREQUENCY:
                return self.tsc_frequency_hz * self.time_scale
            if msr == HV_X64_MSR_APIC_FREQUENCY:
                return self.apic_frequency_hz * self.time_scale
            if msr == HV_X64_MSR_TSC_INVARIANT_CONTROL:
                return self.tsc_invariant_control
            if msr == HV_X64_MSR_VP_ASSIST_PAGE:
                return vp.vp_assist
            if msr == HV_X64_MSR_SCONTROL:
                return vp.scontrol
            if msr == HV_X64_MSR_SVERSION:
                return HV_SYNIC_VERSION_1
            if msr == HV_X64_MSR_SIEFP:
                return vp.siefp
            if msr == HV_X64_MSR_SIMP:
                return vp.simp
            if msr == HV_X64_MSR_EOM:
                return 0
            if HV_X64_MSR_SINT0 <= msr <= HV_X64_MSR_SINT15:
                return vp.sints[msr - HV_X64_MSR_SINT0]
            return None

    def write_msr(self, vcpu: int, msr: int, value: int) -> bool:
        """WRMSR of a Hyper-V MSR on `vcpu`; False means #GP (an MSR not offered, a
        read-only one, a reserved value, or a page outside guest RAM)."""
        value &= _U64
        with self._lock:
            vp = self._vp(vcpu)
            if msr == HV_X64_MSR_GUEST_OS_ID:
                self.guest_os_id = value
                if value == 0:  # as KVM: clearing the OS id disables hypercalls
                    self.hypercall &= ~HV_HYPERCALL_ENABLE
                return True
            if msr == HV_X64_MSR_HYPERCALL:
                return self._write_hypercall(value)
            if msr == HV_X64_MSR_TSC_INVARIANT_CONTROL:
                if value & ~HV_EXPOSE_INVARIANT_TSC:
                    return False
                self.tsc_invariant_control = value
                return True
            if msr == HV_X64_MSR_VP_ASSIST_PAGE:
                return self._write_overlay(vp, "vp_assist", value, carry=False)
            if msr == HV_X64_MSR_SCONTROL:
                vp.scontrol = value
                self._flush(vp)
                return True
            if msr == HV_X64_MSR_SIEFP:
                ok = self._write_overlay(vp, "siefp", value, carry=True)
                self._flush(vp)
                return ok
            if msr == HV_X64_MSR_SIMP:
                ok = self._write_overlay(vp, "simp", value, carry=True)
                self._flush(vp)
                return ok
            if msr == HV_X64_MSR_EOM:
                self._flush(vp)  # any value; with nothing pending it does nothing
                return True
            if HV_X64_MSR_SINT0 <= msr <= HV_X64_MSR_SINT15:
                vector = value & HV_SYNIC_SINT_VECTOR_MASK
                if vector < HV_SYNIC_FIRST_VALID_VECTOR and not value & HV_SYNIC_SINT_MASKED:
                    return False  # TLFS: vectors 0-15 are reserved; KVM also allows masked
                vp.sints[msr - HV_X64_MSR_SINT0] = value
                self._flush(vp)
                return True
            return False  # read-only (VP_INDEX, SVERSION, frequencies) or not offered

    def _write_hypercall(self, value: int) -> bool:
        if self.guest_os_id == 0:
            return True  # TLFS/KVM: ignored until the guest has said who it is
        if value & HV_HYPERCALL_ENABLE:
            gpa = _page(value)
            if not self._ram.contains(gpa, PAGE_SIZE):
                return False
            self._ram.write(gpa, self.stub.code)
        self.hypercall = value
        return True

    def _write_overlay(self, vp: SynIc, name: str, value: int, *, carry: bool) -> bool:
        """An MSR naming a page (bit 0 enable, bits 12-63 the GPA): a page outside RAM
        is #GP and changes nothing (as KVM). A page newly enabled is zeroed; a SIMP or
        SIEFP moved from one enabled page to another takes the old page's contents
        with it, as a TLFS overlay page would (undelivered messages stay queued)."""
        old: int = getattr(vp, name)
        if value & HV_HYPERCALL_ENABLE:
            gpa = _page(value)
            if not self._ram.contains(gpa, PAGE_SIZE):
                return False
            was_on = bool(old & HV_HYPERCALL_ENABLE)
            if not was_on:
                self._ram.write(gpa, bytes(PAGE_SIZE))
            elif _page(old) != gpa:
                src = _page(old)
                keep = carry and self._ram.contains(src, PAGE_SIZE)  # (after a bad restore)
                self._ram.write(gpa, self._ram.read(src, PAGE_SIZE) if keep else bytes(PAGE_SIZE))
        setattr(vp, name, value)
        return True

    # ------------------------------------------------------------ hypercalls

    def handle_hypercall(self, vcpu: int, control: int, input_value: int, output_value: int) -> int:
        """A hypercall made through the stub's hypercall port: control = rcx, input_value
        = rdx (input GPA, or the first input for a fast call: control bit 16),
        output_value = r8. Returns the status for rax (rep count completed 0: no rep
        hypercall is offered). Neither call offered has output, so output_value is
        ignored, as the TLFS says of a hypercall without output parameters."""
        control &= _U64
        with self._lock:
            self._vp(vcpu)
            if not self.hypercall & HV_HYPERCALL_ENABLE:
                return HV_STATUS_INVALID_HYPERCALL_CODE  # no page: Hyper-V would #UD
        code = control & HV_HYPERCALL_CODE_MASK
        fast = bool(control & HV_HYPERCALL_FAST_BIT)
        if control & HV_HYPERCALL_RSVD_MASK:
            return HV_STATUS_INVALID_HYPERCALL_INPUT
        if code not in (HVCALL_POST_MESSAGE, HVCALL_SIGNAL_EVENT):
            return HV_STATUS_INVALID_HYPERCALL_CODE
        if control & (
            HV_HYPERCALL_VARHEAD_MASK | HV_HYPERCALL_REP_COMP_MASK | HV_HYPERCALL_REP_START_MASK
        ):
            return HV_STATUS_INVALID_HYPERCALL_INPUT  # both are simple calls, no varhead
        if code == HVCALL_POST_MESSAGE:
            if fast:
                return HV_STATUS_INVALID_HYPERCALL_INPUT  # 256 bytes of input: never fast
            return self._post_message_call(input_value & _U64)
        if not fast:
            gpa = input_value & _U64
            if gpa % 8 or not self._ram.contains(gpa, 8):
                return HV_STATUS_INVALID_ALIGNMENT
            (param,) = struct.unpack("<Q", self._ram.read(gpa, 8))
            return self._signal(param)
        return self._signal(input_value & _U64)

    def signal_port_exit(self, vcpu: int, connection_id: int) -> int:
        """The stub's fast HvSignalEvent reached the VMM (no ioeventfd matched this
        connection id): the status for rcx."""
        with self._lock:
            self._vp(vcpu)
            if not self.hypercall & HV_HYPERCALL_ENABLE:
                return HV_STATUS_INVALID_HYPERCALL_CODE
        return self._signal(connection_id & 0xFFFFFFFF)

    def _post_message_call(self, gpa: int) -> int:
        # TLFS common status codes: a GPA not 8-aligned, a parameter list that spans a
        # page, or one outside the GPA space is HV_STATUS_INVALID_ALIGNMENT.
        if gpa % 8 or gpa % PAGE_SIZE + HV_POST_MESSAGE_INPUT_SIZE > PAGE_SIZE:
            return HV_STATUS_INVALID_ALIGNMENT
        if not self._ram.contains(gpa, HV_POST_MESSAGE_INPUT_SIZE):
            return HV_STATUS_INVALID_ALIGNMENT
        raw = self._ram.read(gpa, HV_POST_MESSAGE_INPUT_SIZE)  # untrusted: one private copy
        connection_id, reserved, message_type, size = _POST_INPUT.unpack_from(raw)
        if message_type == HVMSG_NONE or message_type & HV_MESSAGE_TYPE_HYPERVISOR:
            return HV_STATUS_INVALID_PARAMETER
        if size > HV_MESSAGE_PAYLOAD_BYTE_COUNT or reserved:
            return HV_STATUS_INVALID_PARAMETER
        with self._lock:
            known = connection_id in self._message_ids
        if not known:
            return HV_STATUS_INVALID_CONNECTION_ID
        start = _POST_INPUT.size
        return self._status(self._on_post(connection_id, message_type, raw[start : start + size]))

    def _signal(self, param: int) -> int:
        # HvSignalEvent input: connection id (bits 0-23, 24-31 reserved), flag number
        # (bits 32-47), reserved (48-63). VMBus uses flag 0 only; so does this emulation.
        if param & ~(HV_CONNECTION_ID_MASK | (0xFFFF << 32)):
            return HV_STATUS_INVALID_HYPERCALL_INPUT
        if param >> 32:
            return HV_STATUS_INVALID_PARAMETER  # a flag beyond the connection's one flag
        return self._status(self._on_signal(param))

    @staticmethod
    def _status(status: int) -> int:
        if not isinstance(status, int) or not 0 <= status <= 0xFFFF:
            raise HyperVError(f"a hypercall handler returned {status!r}, not an HV status")
        return status

    def allow_message_connection(self, connection_id: int) -> None:
        """Accept HvPostMessage on one more connection id (VERSION_RESPONSE's)."""
        if not 0 <= connection_id <= HV_CONNECTION_ID_MASK:
            raise HyperVError(f"connection id {connection_id:#x} is not 24 bits")
        with self._lock:
            self._message_ids.add(connection_id)

    # ------------------------------------------------------------ host -> guest

    def post_message(
        self, vcpu: int, sint: int, message_type: int, payload: bytes, *, sender: int = 0
    ) -> None:
        """Queue a message for `vcpu`'s SINT and deliver what its slot can take: into the
        SIMP slot when free (then the SINT's vector is injected), else it waits with
        msg_pending set in the slot so the guest writes EOM. It also waits while the
        SIMP or SCONTROL is disabled or the SINT masked, and goes out when they are not.
        Raises MessageQueueFull at MESSAGE_QUEUE_LIMIT waiting messages."""
        if len(payload) > HV_MESSAGE_PAYLOAD_BYTE_COUNT:
            raise HyperVError(f"message payload of {len(payload)} bytes (at most 240)")
        if not 0 < message_type <= 0xFFFFFFFF:
            raise HyperVError(f"message type {message_type:#x} (1..0xffffffff)")
        self._check_sint(sint)
        header = _HEADER.pack(message_type, len(payload), 0, 0, sender & _U64)
        msg = header + payload + bytes(HV_MESSAGE_PAYLOAD_BYTE_COUNT - len(payload))
        with self._lock:
            vp = self._vp(vcpu)
            queue = vp.queues[sint]
            if len(queue) >= MESSAGE_QUEUE_LIMIT:
                raise MessageQueueFull(
                    f"vCPU {vcpu} SINT {sint}: {len(queue)} messages wait already"
                )
            queue.append(msg)
            self._flush_messages(vp, sint)

    def signal_event(self, vcpu: int, sint: int, flag: int) -> None:
        """Set event flag `flag` (a VMBus channel's relid) in `vcpu`'s SIEFP slot for
        `sint` and inject the SINT's vector if the flag was clear. While the SIEFP or
        SCONTROL is disabled or the SINT masked, the flag is remembered and set (with
        its interrupt) when they are not."""
        self._check_sint(sint)
        if not 0 <= flag < HV_EVENT_FLAGS_COUNT:
            raise HyperVError(f"event flag {flag} (0..{HV_EVENT_FLAGS_COUNT - 1})")
        with self._lock:
            vp = self._vp(vcpu)
            vp.deferred_flags[sint].add(flag)
            self._flush_flags(vp, sint)

    def queued(self, vcpu: int, sint: int) -> int:
        """Messages waiting for `vcpu`'s SINT (not yet in its slot)."""
        self._check_sint(sint)
        with self._lock:
            return len(self._vp(vcpu).queues[sint])

    @property
    def slot_backend(self) -> str:
        """ "native" or "python": with the twin (VMBUSD_NATIVE=0) the VMM must call
        `retry` now and then (say every 10 ms while `queued` > 0), see `_PySlots`."""
        return self._slots.name

    def retry(self, vcpu: int) -> None:
        """Try again to deliver what waits for `vcpu` (what an EOM does); the twin's
        race (see `_PySlots`) heals with this, the C path never needs it."""
        with self._lock:
            self._flush(self._vp(vcpu))

    def _flush(self, vp: SynIc) -> None:
        for sint in range(HV_SYNIC_SINT_COUNT):
            if vp.queues[sint]:
                self._flush_messages(vp, sint)
            if vp.deferred_flags[sint]:
                self._flush_flags(vp, sint)

    def _flush_messages(self, vp: SynIc, sint: int) -> None:
        queue = vp.queues[sint]
        if not queue or not vp.sint_open(sint) or not vp.simp & HV_HYPERCALL_ENABLE:
            return
        base = _page(vp.simp) + sint * HV_MESSAGE_SIZE
        if not self._ram.contains(base, HV_MESSAGE_SIZE):
            return  # only a bad restore gets here: MSR writes check the page
        msg = queue[0]
        if len(queue) > 1:  # more behind it: ask for an EOM when this one is taken
            msg = msg[:5] + bytes([msg[5] | HV_MESSAGE_FLAG_PENDING]) + msg[6:]
        slot = self._ram.slice(base, HV_MESSAGE_SIZE)
        try:
            delivered = self._slots.deliver(slot, msg)
        finally:
            slot.release()
        if delivered:
            queue.popleft()
            self._interrupt(vp, sint)

    def _flush_flags(self, vp: SynIc, sint: int) -> None:
        flags = vp.deferred_flags[sint]
        if not flags or not vp.sint_open(sint) or not vp.siefp & HV_HYPERCALL_ENABLE:
            return
        base = _page(vp.siefp) + sint * HV_MESSAGE_SIZE
        if not self._ram.contains(base, HV_MESSAGE_SIZE):
            return
        slot = self._ram.slice(base, HV_MESSAGE_SIZE)
        try:
            fresh = [self._slots.event_set(slot, f) for f in sorted(flags)]
        finally:
            slot.release()
        flags.clear()
        if 1 in fresh:
            self._interrupt(vp, sint)

    def _interrupt(self, vp: SynIc, sint: int) -> None:
        reg = vp.sints[sint]
        if reg & (HV_SYNIC_SINT_MASKED | HV_SYNIC_SINT_POLLING):
            return
        self._injector.inject(vp.index, reg & HV_SYNIC_SINT_VECTOR_MASK)

    # ------------------------------------------------------------ snapshot

    def save(self) -> dict[str, Any]:
        """The whole emulated state (registers and waiting traffic), JSON-ready."""
        with self._lock:
            return {
                "guest_os_id": self.guest_os_id,
                "hypercall": self.hypercall,
                "tsc_invariant_control": self.tsc_invariant_control,
                "message_connection_ids": sorted(self._message_ids),
                "vps": [
                    {
                        "vp_assist": vp.vp_assist,
                        "scontrol": vp.scontrol,
                        "simp": vp.simp,
                        "siefp": vp.siefp,
                        "sints": list(vp.sints),
                        "queues": [[m.hex() for m in q] for q in vp.queues],
                        "deferred_flags": [sorted(f) for f in vp.deferred_flags],
                    }
                    for vp in self.vps
                ],
            }

    def restore(self, state: dict[str, Any]) -> None:
        """Load what `save` returned (guest RAM is restored separately: the pages are
        not touched here)."""
        vps = state["vps"]
        if len(vps) != len(self.vps):
            raise HyperVError(f"state for {len(vps)} vCPUs, partition has {len(self.vps)}")
        with self._lock:
            self.guest_os_id = int(state["guest_os_id"])
            self.hypercall = int(state["hypercall"])
            self.tsc_invariant_control = int(state["tsc_invariant_control"])
            self._message_ids = {int(c) for c in state["message_connection_ids"]}
            for vp, s in zip(self.vps, vps, strict=True):
                vp.vp_assist, vp.scontrol = int(s["vp_assist"]), int(s["scontrol"])
                vp.simp, vp.siefp = int(s["simp"]), int(s["siefp"])
                vp.sints = [int(v) for v in s["sints"]]
                vp.queues = [deque(bytes.fromhex(m) for m in q) for q in s["queues"]]
                vp.deferred_flags = [{int(f) for f in fl} for fl in s["deferred_flags"]]

    # ------------------------------------------------------------ helpers

    def _vp(self, vcpu: int) -> SynIc:
        if not 0 <= vcpu < len(self.vps):
            raise HyperVError(f"vCPU {vcpu} (the partition has {len(self.vps)})")
        return self.vps[vcpu]

    @staticmethod
    def _check_sint(sint: int) -> None:
        if not 0 <= sint < HV_SYNIC_SINT_COUNT:
            raise HyperVError(f"SINT {sint} (0..15)")
