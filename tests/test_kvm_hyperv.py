"""vmbus.kvm.hyperv: the emulated Hyper-V surface, driven as Linux 6.1 drives it.

Fake RAM is a bytearray behind the SynicRam interface (with a hole, so "outside RAM"
is more than "past the end"); the injector records what it was asked to send. Every
slot test runs on both the C slot operations and their pure-Python twin. The hypercall
stub is checked against GNU as assembling the listing in vmbus/kvm/hypercall_page.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import struct
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import require_tool
from hypothesis import given, settings
from hypothesis import strategies as st

from vmbus import native
from vmbus.kvm import boot, pvm
from vmbus.kvm import hyperv as hv
from vmbus.kvm.hypercall_page import FAST_SIGNAL_EVENT_CONTROL, HypercallStub
from vmbus.kvm.kvmapi import CpuidLeaf
from vmbus.kvm.machine import DebugExit, Machine, StopReason, current_vcpu

PAGE = 4096
RAM_LOW = 0x100000  # RAM is [0, 1 MiB) and [2 MiB, 3 MiB): a hole between
HOLE = 0x100000
RAM_HIGH = 0x200000
RAM_END = 0x300000

HYPERCALL_PAGE = 0x10000
SIMP_PAGE = 0x11000
SIEFP_PAGE = 0x12000
ASSIST_PAGE = 0x13000
INPUT_PAGE = 0x14000
SIMP_PAGE2 = 0x200000
VECTOR = 0xF3  # HYPERVISOR_CALLBACK_VECTOR (irq_vectors.h), what Linux programs into SINT2
SINT = 2  # VMBUS_MESSAGE_SINT
LINUX_OS_ID = 0x8100_0000_0601_0000  # hv_generate_guest_id's shape: open source, Linux
TSC_HZ = 2_500_000_000


class FakeRam:
    """Two RAM regions with a hole between, behind the SynicRam interface."""

    def __init__(self) -> None:
        self.low = bytearray(RAM_LOW)
        self.high = bytearray(RAM_END - RAM_HIGH)

    def _where(self, gpa: int, length: int) -> tuple[bytearray, int]:
        if 0 <= gpa and gpa + length <= RAM_LOW:
            return self.low, gpa
        if RAM_HIGH <= gpa and gpa + length <= RAM_END:
            return self.high, gpa - RAM_HIGH
        raise ValueError(f"GPA {gpa:#x}+{length:#x} outside fake RAM")

    def contains(self, gpa: int, length: int) -> bool:
        try:
            self._where(gpa, length)
        except ValueError:
            return False
        return True

    def read(self, gpa: int, length: int) -> bytes:
        buf, off = self._where(gpa, length)
        return bytes(buf[off : off + length])

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        buf, off = self._where(gpa, len(data))
        buf[off : off + len(data)] = data

    def slice(self, gpa: int, length: int) -> memoryview:
        buf, off = self._where(gpa, length)
        return memoryview(buf)[off : off + length]


class Recorder:
    """The injector, and the two hypercall callbacks, recording every call."""

    def __init__(self) -> None:
        self.irqs: list[tuple[int, int]] = []
        self.posts: list[tuple[int, int, bytes]] = []
        self.signals: list[int] = []
        self.post_status = hv.HV_STATUS_SUCCESS
        self.known_events = {0x2000}

    def inject(self, vcpu: int, vector: int) -> None:
        self.irqs.append((vcpu, vector))

    def on_post(self, connection_id: int, message_type: int, payload: bytes) -> int:
        self.posts.append((connection_id, message_type, payload))
        return self.post_status

    def on_signal(self, connection_id: int) -> int:
        self.signals.append(connection_id)
        if connection_id in self.known_events:
            return hv.HV_STATUS_SUCCESS
        return hv.HV_STATUS_INVALID_CONNECTION_ID


SLOT_IMPLS = ["python", pytest.param("native", marks=pytest.mark.native)]


@pytest.fixture(params=SLOT_IMPLS)
def impl(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Vm:
    """A partition over fake RAM, with helpers that do what Linux does."""

    def __init__(self, impl: str = "python", vcpus: int = 2) -> None:
        self.ram = FakeRam()
        self.rec = Recorder()
        self.p = hv.HyperVPartition(
            self.ram,
            self.rec,
            vcpus=vcpus,
            on_post=self.rec.on_post,
            on_signal=self.rec.on_signal,
            tsc_frequency_hz=TSC_HZ,
            time_scale=10,
            use_native=impl == "native",
        )

    def wr(self, msr: int, value: int, vcpu: int = 0) -> bool:
        return self.p.write_msr(vcpu, msr, value)

    def rd(self, msr: int, vcpu: int = 0) -> int | None:
        return self.p.read_msr(vcpu, msr)

    def hyperv_init(self) -> None:
        """hyperv_init + hv_cpu_init: guest OS id, hypercall page, VP index, assist page."""
        assert self.wr(hv.HV_X64_MSR_GUEST_OS_ID, LINUX_OS_ID)
        msr = self.rd(hv.HV_X64_MSR_HYPERCALL)
        assert msr is not None
        assert self.wr(hv.HV_X64_MSR_HYPERCALL, msr | 1 | HYPERCALL_PAGE)
        assert self.rd(hv.HV_X64_MSR_VP_INDEX) == 0
        assert self.wr(hv.HV_X64_MSR_VP_ASSIST_PAGE, ASSIST_PAGE | 1)

    def synic_enable(self, vcpu: int = 0, simp: int = SIMP_PAGE, siefp: int = SIEFP_PAGE) -> None:
        """hv_synic_enable_regs, step by step as drivers/hv/hv.c does it."""
        for msr, page in ((hv.HV_X64_MSR_SIMP, simp), (hv.HV_X64_MSR_SIEFP, siefp)):
            old = self.rd(msr, vcpu)
            assert old is not None
            assert self.wr(msr, (old & 0xFFE) | page | 1, vcpu)
        sint = self.rd(hv.HV_X64_MSR_SINT0 + SINT, vcpu)
        assert sint is not None
        sint = (sint & ~0xFF & ~hv.HV_SYNIC_SINT_MASKED & ~hv.HV_SYNIC_SINT_AUTO_EOI) | VECTOR
        assert self.wr(hv.HV_X64_MSR_SINT0 + SINT, sint, vcpu)
        sctrl = self.rd(hv.HV_X64_MSR_SCONTROL, vcpu)
        assert sctrl is not None
        assert self.wr(hv.HV_X64_MSR_SCONTROL, sctrl | 1, vcpu)

    def slot(self, sint: int = SINT, page: int = SIMP_PAGE) -> bytes:
        return self.ram.read(page + sint * 256, 256)

    def slot_header(self, sint: int = SINT, page: int = SIMP_PAGE) -> tuple[int, int, int, int]:
        mtype, size, flags, _rsvd, sender = struct.unpack_from("<IBBHQ", self.slot(sint, page))
        return mtype, size, flags, sender

    def guest_takes(self, sint: int = SINT, page: int = SIMP_PAGE, vcpu: int = 0) -> bytes:
        """vmbus_on_msg_dpc + vmbus_signal_eom: copy, clear the type, EOM if pending."""
        msg = self.slot(sint, page)
        assert msg[:4] != bytes(4), "guest found no message"
        self.ram.write(page + sint * 256, bytes(4))
        if msg[5] & hv.HV_MESSAGE_FLAG_PENDING:
            assert self.wr(hv.HV_X64_MSR_EOM, 0, vcpu)
        return msg

    def post_input(self, conn: int, mtype: int, payload: bytes, *, size: int | None = None) -> None:
        n = len(payload) if size is None else size
        body = struct.pack("<IIII", conn, 0, mtype, n) + payload
        self.ram.write(INPUT_PAGE, body + bytes(256 - len(body)))

    def call(self, control: int, rdx: int = INPUT_PAGE, r8: int = 0) -> int:
        return self.p.handle_hypercall(0, control, rdx, r8)


@pytest.fixture
def vm(impl: str) -> Vm:
    v = Vm(impl)
    v.hyperv_init()
    return v


@pytest.fixture
def bus(vm: Vm) -> Vm:
    vm.synic_enable()
    return vm


# --- CPUID ----------------------------------------------------------------------------


def regs_of(leaves: list[tuple[int, int, int, int, int, int]]) -> dict[int, tuple[int, ...]]:
    return {f: (a, b, c, d) for f, i, a, b, c, d in leaves}


def test_cpuid_leaves_are_the_ones_linux_61_accepted() -> None:
    leaves = regs_of(hv.HyperVCpuid().leaves())
    assert sorted(leaves) == list(range(0x40000000, 0x40000006))
    eax, ebx, ecx, edx = leaves[0x40000000]
    assert eax == 0x40000005
    assert struct.pack("<III", ebx, ecx, edx) == b"Microsoft Hv"
    assert struct.pack("<I", leaves[0x40000001][0]) == b"Hv#1"
    assert leaves[0x40000002] == (17763, 0x000A0000, 0, 0)
    assert leaves[0x40000003] == (0x8864, 0x30, 0, 0x100)
    assert leaves[0x40000004] == (0x200, 0xFFFFFFFF, 0, 0)
    assert leaves[0x40000005] == (64, 64, 0, 0)


def test_cpuid_named_bits_make_the_probe_values() -> None:
    assert (
        hv.HV_MSR_SYNIC_AVAILABLE
        | hv.HV_MSR_HYPERCALL_AVAILABLE
        | hv.HV_MSR_VP_INDEX_AVAILABLE
        | hv.HV_ACCESS_FREQUENCY_MSRS
        | hv.HV_ACCESS_TSC_INVARIANT
    ) == 0x8864
    assert hv.HV_POST_MESSAGES | hv.HV_SIGNAL_EVENTS == 0x30
    feats = hv.HyperVCpuid().features
    for off in (
        hv.HV_MSR_TIME_REF_COUNT_AVAILABLE,
        hv.HV_MSR_SYNTIMER_AVAILABLE,
        hv.HV_MSR_APIC_ACCESS_AVAILABLE,
        hv.HV_MSR_REFERENCE_TSC_AVAILABLE,
    ):
        assert not feats & off
    assert not hv.HyperVCpuid().privileges_high & hv.HV_CPU_MANAGEMENT


def test_cpuid_leaf1_gets_the_hypervisor_bit() -> None:
    leaves = hv.HyperVCpuid().leaves((0x906EA, 0x800, 0x7FFAFBBF, 0xBFEBFBFF))
    assert leaves[0] == (1, 0, 0x906EA, 0x800, 0xFFFAFBBF, 0xBFEBFBFF)
    kvm_leaves = [CpuidLeaf(1, 0, 1, 2, 0x1234, 4), CpuidLeaf(7, 0, 1, 2, 3, 4)]
    hv.HyperVCpuid.set_hypervisor_bit(kvm_leaves)
    assert kvm_leaves[0].ecx == 0x1234 | 1 << 31 and kvm_leaves[1].ecx == 3


def test_cpuid_overrides_replace_kvm_signature_leaves() -> None:
    over = hv.HyperVCpuid().overrides()
    assert set(over) == {(f, 0) for f in range(0x40000000, 0x40000006)}
    assert over[(0x40000001, 0)][0] == 0x31237648  # not KVM's feature leaf


# --- the hypercall stub ---------------------------------------------------------------

STUB_ASM = """
.intel_syntax noprefix
.code64
    cmp rcx, 0x1005d
    jne slow
    mov rax, rdx
    shr rax, 32
    jnz slow
    push rcx
    mov eax, edx
    xor ecx, ecx
signal_out:
    out {signal}, eax
    mov rax, rcx
    pop rcx
    ret
slow:
    mov eax, ecx
hypercall_out:
    out {hypercall}, eax
    ret
"""


def assemble(tmp_path: Path, source: str) -> bytes:
    gas = require_tool("as", "binutils")
    objcopy = require_tool("objcopy", "binutils")
    (tmp_path / "s.S").write_text(source)
    subprocess.run([gas, "--64", "-o", str(tmp_path / "s.o"), str(tmp_path / "s.S")], check=True)
    subprocess.run(
        [objcopy, "-O", "binary", "-j", ".text", str(tmp_path / "s.o"), str(tmp_path / "s.bin")],
        check=True,
    )
    return (tmp_path / "s.bin").read_bytes()


@pytest.mark.parametrize("ports", [(0xE4, 0xE5), (0x10, 0xFF)])
def test_stub_bytes_are_what_as_assembles(tmp_path: Path, ports: tuple[int, int]) -> None:
    stub = HypercallStub(*ports)
    code = assemble(tmp_path, STUB_ASM.format(signal=hex(ports[0]), hypercall=hex(ports[1])))
    assert stub.code == code
    assert code[stub.signal_out : stub.signal_out + 2] == bytes([0xE7, ports[0]])
    assert code[stub.hypercall_out : stub.hypercall_out + 2] == bytes([0xE7, ports[1]])
    assert FAST_SIGNAL_EVENT_CONTROL == hv.HVCALL_SIGNAL_EVENT | hv.HV_HYPERCALL_FAST_BIT


@pytest.mark.parametrize("ports", [(0x100, 0xE5), (-1, 0xE5), (0xE4, 0xE4)])
def test_stub_refuses_ports_it_cannot_encode(ports: tuple[int, int]) -> None:
    with pytest.raises(ValueError):
        HypercallStub(*ports)


# --- MSRs -----------------------------------------------------------------------------


def test_linux_61_boot_sequence_of_msr_accesses(impl: str) -> None:
    """Every Hyper-V MSR access Linux 6.1 makes from detection to vmbus_connect, in order."""
    v = Vm(impl)
    # ms_hyperv_init_platform: frequencies (x time_scale), then TSC_INVARIANT_CONTROL
    assert v.rd(hv.HV_X64_MSR_TSC_FREQUENCY) == TSC_HZ * 10
    assert v.rd(hv.HV_X64_MSR_APIC_FREQUENCY) == 1_000_000_000 * 10
    assert v.wr(hv.HV_X64_MSR_TSC_INVARIANT_CONTROL, 1)
    assert v.rd(hv.HV_X64_MSR_TSC_INVARIANT_CONTROL) == 1
    v.hyperv_init()
    assert v.rd(hv.HV_X64_MSR_HYPERCALL) == HYPERCALL_PAGE | 1
    assert v.ram.read(HYPERCALL_PAGE, 35) == HypercallStub().code
    assert v.rd(hv.HV_X64_MSR_VP_INDEX, 1) == 1
    assert v.rd(hv.HV_X64_MSR_SVERSION) == hv.HV_SYNIC_VERSION_1
    v.synic_enable()
    assert v.rd(hv.HV_X64_MSR_SIMP) == SIMP_PAGE | 1
    assert v.rd(hv.HV_X64_MSR_SIEFP) == SIEFP_PAGE | 1
    assert v.rd(hv.HV_X64_MSR_SINT0 + SINT) == VECTOR
    assert v.rd(hv.HV_X64_MSR_SCONTROL) == 1
    for other in range(16):
        if other != SINT:
            assert v.rd(hv.HV_X64_MSR_SINT0 + other) == hv.HV_SYNIC_SINT_MASKED
    assert v.rec.irqs == []


def test_hypercall_msr_waits_for_the_guest_os_id(vm: Vm) -> None:
    v = Vm()
    assert v.wr(hv.HV_X64_MSR_HYPERCALL, HYPERCALL_PAGE | 1)  # accepted, ignored
    assert v.rd(hv.HV_X64_MSR_HYPERCALL) == 0
    assert v.ram.read(HYPERCALL_PAGE, 35) == bytes(35)
    assert v.call(FAST_SIGNAL_EVENT_CONTROL, 0x2000) == hv.HV_STATUS_INVALID_HYPERCALL_CODE
    # and clearing the OS id disables the page again
    assert vm.wr(hv.HV_X64_MSR_GUEST_OS_ID, 0)
    assert vm.rd(hv.HV_X64_MSR_HYPERCALL) == HYPERCALL_PAGE
    assert vm.call(FAST_SIGNAL_EVENT_CONTROL, 0x2000) == hv.HV_STATUS_INVALID_HYPERCALL_CODE
    assert vm.p.signal_port_exit(0, 0x2000) == hv.HV_STATUS_INVALID_HYPERCALL_CODE
    assert vm.rec.signals == []


@pytest.mark.parametrize("page", [HOLE, RAM_HIGH - PAGE, RAM_END, 1 << 52])
def test_pages_outside_ram_are_gp_and_change_nothing(vm: Vm, page: int) -> None:
    for msr in (
        hv.HV_X64_MSR_HYPERCALL,
        hv.HV_X64_MSR_VP_ASSIST_PAGE,
        hv.HV_X64_MSR_SIMP,
        hv.HV_X64_MSR_SIEFP,
    ):
        before = vm.rd(msr)
        assert not vm.wr(msr, page | 1), hex(msr)
        assert vm.rd(msr) == before
        assert vm.wr(msr, page)  # disabled: the GPA is not used, so not checked


def test_enabling_pages_zeroes_them_but_the_hypercall_page_gets_the_stub(vm: Vm) -> None:
    vm.ram.write(0, b"\xee" * PAGE)  # what page 0 holds must not leak into a fresh page
    vm.ram.write(SIMP_PAGE, b"\xff" * PAGE)
    vm.ram.write(SIEFP_PAGE, b"\xff" * PAGE)
    vm.ram.write(ASSIST_PAGE + PAGE, b"\xff" * PAGE)
    vm.synic_enable()
    assert vm.ram.read(SIMP_PAGE, PAGE) == bytes(PAGE)
    assert vm.ram.read(SIEFP_PAGE, PAGE) == bytes(PAGE)
    assert vm.wr(hv.HV_X64_MSR_VP_ASSIST_PAGE, (ASSIST_PAGE + PAGE) | 1)
    assert vm.ram.read(ASSIST_PAGE + PAGE, PAGE) == bytes(PAGE)
    # rewriting the same value does not wipe the page (KVM would)
    vm.ram.write(SIEFP_PAGE, b"\x01")
    assert vm.wr(hv.HV_X64_MSR_SIEFP, SIEFP_PAGE | 1)
    assert vm.ram.read(SIEFP_PAGE, 1) == b"\x01"


@pytest.mark.parametrize(
    "msr",
    [
        hv.HV_X64_MSR_REFERENCE_TSC,
        0x40000020,  # TIME_REF_COUNT
        0x40000003,  # RESET
        0x40000070,  # EOI
        0x40000071,  # ICR
        0x40000072,  # TPR
        0x400000B0,  # STIMER0_CONFIG
        0x400000F0,  # GUEST_IDLE
        0x40000100,  # CRASH_P0
        0x40000105,  # CRASH_CTL
        0x40000106,  # REENLIGHTENMENT_CONTROL
        0x400001FF,
        0x10,  # not even a Hyper-V MSR
    ],
)
def test_msrs_not_offered_are_gp(vm: Vm, msr: int) -> None:
    assert vm.rd(msr) is None
    assert not vm.wr(msr, 0)


@pytest.mark.parametrize(
    "msr",
    [
        hv.HV_X64_MSR_VP_INDEX,
        hv.HV_X64_MSR_SVERSION,
        hv.HV_X64_MSR_TSC_FREQUENCY,
        hv.HV_X64_MSR_APIC_FREQUENCY,
    ],
)
def test_read_only_msrs_refuse_writes(vm: Vm, msr: int) -> None:
    before = vm.rd(msr)
    assert not vm.wr(msr, 5)
    assert vm.rd(msr) == before


def test_tsc_invariant_control_has_one_bit(vm: Vm) -> None:
    assert not vm.wr(hv.HV_X64_MSR_TSC_INVARIANT_CONTROL, 2)
    assert vm.rd(hv.HV_X64_MSR_TSC_INVARIANT_CONTROL) == 0


@pytest.mark.parametrize("vector", [0, 1, 15])
def test_sint_with_a_reserved_vector_is_gp_unless_masked(vm: Vm, vector: int) -> None:
    msr = hv.HV_X64_MSR_SINT0 + SINT
    assert not vm.wr(msr, vector)
    assert vm.rd(msr) == hv.HV_SYNIC_SINT_MASKED
    assert vm.wr(msr, vector | hv.HV_SYNIC_SINT_MASKED)  # what nested Hyper-V writes
    assert vm.wr(msr, 16)
    assert vm.rd(msr) == 16


def test_eom_with_nothing_pending_does_nothing(bus: Vm) -> None:
    page = bus.ram.read(SIMP_PAGE, PAGE)
    for _ in range(3):
        assert bus.wr(hv.HV_X64_MSR_EOM, 0)
    assert bus.rd(hv.HV_X64_MSR_EOM) == 0
    assert bus.ram.read(SIMP_PAGE, PAGE) == page
    assert bus.rec.irqs == []


def test_per_vp_registers_are_per_vp(vm: Vm) -> None:
    vm.synic_enable(vcpu=1, simp=SIMP_PAGE2, siefp=SIEFP_PAGE + 0x10000)
    assert vm.rd(hv.HV_X64_MSR_SIMP, 0) == 0
    assert vm.rd(hv.HV_X64_MSR_SIMP, 1) == SIMP_PAGE2 | 1
    assert vm.rd(hv.HV_X64_MSR_GUEST_OS_ID, 1) == LINUX_OS_ID  # partition-wide
    with pytest.raises(hv.HyperVError):
        vm.rd(hv.HV_X64_MSR_SIMP, 2)


# --- hypercalls: HvPostMessage -----------------------------------------------------------


def test_post_message_reaches_the_callback(vm: Vm) -> None:
    payload = bytes(range(48))
    vm.post_input(4, 1, payload)
    assert vm.call(hv.HVCALL_POST_MESSAGE) == hv.HV_STATUS_SUCCESS
    assert vm.rec.posts == [(4, 1, payload)]
    vm.post_input(1, 1, b"", size=0)
    assert vm.call(hv.HVCALL_POST_MESSAGE, r8=HOLE) == hv.HV_STATUS_SUCCESS  # no output
    vm.post_input(1, 0x7FFFFFFF, b"x" * 240)
    assert vm.call(hv.HVCALL_POST_MESSAGE) == hv.HV_STATUS_SUCCESS
    assert vm.rec.posts[1:] == [(1, 1, b""), (1, 0x7FFFFFFF, b"x" * 240)]


def test_post_message_status_of_the_callback_goes_back(vm: Vm) -> None:
    vm.rec.post_status = hv.HV_STATUS_INSUFFICIENT_BUFFERS
    vm.post_input(4, 1, b"hello")
    assert vm.call(hv.HVCALL_POST_MESSAGE) == hv.HV_STATUS_INSUFFICIENT_BUFFERS
    vm.rec.post_status = -1
    with pytest.raises(hv.HyperVError):
        vm.call(hv.HVCALL_POST_MESSAGE)


@pytest.mark.parametrize(
    ("gpa", "status"),
    [
        (INPUT_PAGE + 4, hv.HV_STATUS_INVALID_ALIGNMENT),  # not 8-aligned
        (INPUT_PAGE + PAGE - 128, hv.HV_STATUS_INVALID_ALIGNMENT),  # spans a page
        (HOLE, hv.HV_STATUS_INVALID_ALIGNMENT),  # not RAM
        (RAM_LOW - 256, hv.HV_STATUS_SUCCESS),  # last 256 bytes below the hole
        (RAM_END, hv.HV_STATUS_INVALID_ALIGNMENT),
        ((1 << 64) - 256, hv.HV_STATUS_INVALID_ALIGNMENT),
    ],
)
def test_post_message_input_gpa(vm: Vm, gpa: int, status: int) -> None:
    if vm.ram.contains(gpa, 256):
        vm.ram.write(gpa, struct.pack("<IIII", 4, 0, 1, 3) + b"abc")
    assert vm.call(hv.HVCALL_POST_MESSAGE, rdx=gpa) == status
    assert len(vm.rec.posts) == (status == hv.HV_STATUS_SUCCESS)


@pytest.mark.parametrize(
    ("conn", "rsvd", "mtype", "size", "status"),
    [
        (4, 0, 0, 4, hv.HV_STATUS_INVALID_PARAMETER),  # type 0
        (4, 0, 0x80000001, 4, hv.HV_STATUS_INVALID_PARAMETER),  # a hypervisor type
        (4, 0, 1, 241, hv.HV_STATUS_INVALID_PARAMETER),  # longer than 240
        (4, 0, 1, 0xFFFFFFFF, hv.HV_STATUS_INVALID_PARAMETER),
        (4, 1, 1, 4, hv.HV_STATUS_INVALID_PARAMETER),  # RsvdZ
        (2, 0, 1, 4, hv.HV_STATUS_INVALID_CONNECTION_ID),
        (0x01000004, 0, 1, 4, hv.HV_STATUS_INVALID_CONNECTION_ID),  # reserved id bits
    ],
)
def test_post_message_bad_input(
    vm: Vm, conn: int, rsvd: int, mtype: int, size: int, status: int
) -> None:
    vm.ram.write(INPUT_PAGE, struct.pack("<IIII", conn, rsvd, mtype, size) + b"x" * 240)
    assert vm.call(hv.HVCALL_POST_MESSAGE) == status
    assert vm.rec.posts == []


def test_post_message_connection_ids_are_a_parameter(vm: Vm) -> None:
    vm.post_input(9, 1, b"hi")
    assert vm.call(hv.HVCALL_POST_MESSAGE) == hv.HV_STATUS_INVALID_CONNECTION_ID
    vm.p.allow_message_connection(9)
    assert vm.call(hv.HVCALL_POST_MESSAGE) == hv.HV_STATUS_SUCCESS
    with pytest.raises(hv.HyperVError):
        vm.p.allow_message_connection(1 << 24)


@pytest.mark.parametrize(
    ("control", "status"),
    [
        (hv.HVCALL_POST_MESSAGE | hv.HV_HYPERCALL_FAST_BIT, hv.HV_STATUS_INVALID_HYPERCALL_INPUT),
        (hv.HVCALL_POST_MESSAGE | 1 << 32, hv.HV_STATUS_INVALID_HYPERCALL_INPUT),  # rep count
        (hv.HVCALL_POST_MESSAGE | 1 << 48, hv.HV_STATUS_INVALID_HYPERCALL_INPUT),  # rep start
        (hv.HVCALL_POST_MESSAGE | 1 << 17, hv.HV_STATUS_INVALID_HYPERCALL_INPUT),  # varhead
        (hv.HVCALL_POST_MESSAGE | 1 << 27, hv.HV_STATUS_INVALID_HYPERCALL_INPUT),  # reserved
        (hv.HVCALL_POST_MESSAGE | 1 << 63, hv.HV_STATUS_INVALID_HYPERCALL_INPUT),
        (hv.HVCALL_SIGNAL_EVENT | 1 << 32 | 1 << 16, hv.HV_STATUS_INVALID_HYPERCALL_INPUT),
        (0x0008, hv.HV_STATUS_INVALID_HYPERCALL_CODE),  # NOTIFY_LONG_SPIN_WAIT
        (0x0046, hv.HV_STATUS_INVALID_HYPERCALL_CODE),  # GET_PARTITION_ID
        (0x8001, hv.HV_STATUS_INVALID_HYPERCALL_CODE),  # EXT_CALL_QUERY_CAPABILITIES
        (0x0000, hv.HV_STATUS_INVALID_HYPERCALL_CODE),
        (0xFFFF | 1 << 32, hv.HV_STATUS_INVALID_HYPERCALL_CODE),
    ],
)
def test_hypercall_control_value(vm: Vm, control: int, status: int) -> None:
    vm.post_input(4, 1, b"hi")
    assert vm.call(control) == status
    assert vm.rec.posts == [] and vm.rec.signals == []


def test_unknown_hypercall_with_gpas_outside_ram(vm: Vm) -> None:
    assert vm.call(0x0002, rdx=HOLE, r8=1 << 60) == hv.HV_STATUS_INVALID_HYPERCALL_CODE


# --- hypercalls: HvSignalEvent -------------------------------------------------------------


def test_fast_signal_event(vm: Vm) -> None:
    assert vm.call(FAST_SIGNAL_EVENT_CONTROL, rdx=0x2000) == hv.HV_STATUS_SUCCESS
    assert vm.call(FAST_SIGNAL_EVENT_CONTROL, rdx=0x2001) == hv.HV_STATUS_INVALID_CONNECTION_ID
    assert vm.p.signal_port_exit(0, 0x2000) == hv.HV_STATUS_SUCCESS
    assert vm.rec.signals == [0x2000, 0x2001, 0x2000]


@pytest.mark.parametrize(
    ("param", "status"),
    [
        (0x2000 | 1 << 32, hv.HV_STATUS_INVALID_PARAMETER),  # flag number 1
        (0x2000 | 0xFFFF << 32, hv.HV_STATUS_INVALID_PARAMETER),
        (0x2000 | 1 << 48, hv.HV_STATUS_INVALID_HYPERCALL_INPUT),  # reserved
        (0x2000 | 1 << 24, hv.HV_STATUS_INVALID_HYPERCALL_INPUT),  # reserved id bits
    ],
)
def test_signal_event_bad_parameter(vm: Vm, param: int, status: int) -> None:
    assert vm.call(FAST_SIGNAL_EVENT_CONTROL, rdx=param) == status
    vm.ram.write(INPUT_PAGE, struct.pack("<Q", param))
    assert vm.call(hv.HVCALL_SIGNAL_EVENT) == status
    assert vm.rec.signals == []


def test_slow_signal_event_reads_its_input_from_ram(vm: Vm) -> None:
    vm.ram.write(INPUT_PAGE, struct.pack("<Q", 0x2000))
    assert vm.call(hv.HVCALL_SIGNAL_EVENT) == hv.HV_STATUS_SUCCESS
    for gpa in (INPUT_PAGE + 4, HOLE, RAM_END - 4):
        assert vm.call(hv.HVCALL_SIGNAL_EVENT, rdx=gpa) == hv.HV_STATUS_INVALID_ALIGNMENT
    assert vm.rec.signals == [0x2000]


# --- host -> guest messages ---------------------------------------------------------


def test_message_lands_in_the_slot_and_interrupts(bus: Vm) -> None:
    payload = bytes(range(1, 41))
    bus.p.post_message(0, SINT, 1, payload, sender=0x1234)
    msg = bus.slot()
    assert bus.slot_header() == (1, 40, 0, 0x1234)
    assert msg[16:56] == payload and msg[56:] == bytes(200)
    assert bus.rec.irqs == [(0, VECTOR)]
    assert bus.ram.read(SIMP_PAGE, SINT * 256) == bytes(SINT * 256)  # other slots untouched


def test_eom_handshake_delivers_the_queue_in_order(bus: Vm) -> None:
    for i in range(4):
        bus.p.post_message(0, SINT, 1, bytes([i]) * 8)
    assert bus.rec.irqs == [(0, VECTOR)]
    assert bus.p.queued(0, SINT) == 3
    assert bus.slot_header()[2] & hv.HV_MESSAGE_FLAG_PENDING  # busy slot: pending set
    got = []
    for _ in range(4):
        got.append(bus.guest_takes()[16])
    assert got == [0, 1, 2, 3]
    assert bus.rec.irqs == [(0, VECTOR)] * 4
    assert bus.p.queued(0, SINT) == 0
    assert bus.slot_header()[0] == hv.HVMSG_NONE
    bus.wr(hv.HV_X64_MSR_EOM, 0)  # a spurious EOM afterwards: nothing
    assert len(bus.rec.irqs) == 4


def test_guest_that_never_eoms_gets_nothing_more(bus: Vm) -> None:
    bus.p.post_message(0, SINT, 1, b"a")
    bus.p.post_message(0, SINT, 1, b"b")
    bus.ram.write(SIMP_PAGE + SINT * 256, bytes(4))  # takes it, ignores msg_pending
    assert bus.p.queued(0, SINT) == 1 and len(bus.rec.irqs) == 1
    bus.p.retry(0)  # what an EOM would do
    assert bus.slot()[16:17] == b"b" and len(bus.rec.irqs) == 2


def test_message_waits_for_simp_scontrol_and_unmask(vm: Vm) -> None:
    vm.p.post_message(0, SINT, 1, b"early")
    assert vm.p.queued(0, SINT) == 1
    vm.synic_enable()  # SIMP, SIEFP, SINT2, then SCONTROL: delivered on the last
    assert vm.slot()[16:21] == b"early" and vm.rec.irqs == [(0, VECTOR)]
    vm.guest_takes()
    sint = hv.HV_X64_MSR_SINT0 + SINT
    assert vm.wr(sint, VECTOR | hv.HV_SYNIC_SINT_MASKED)
    vm.p.post_message(0, SINT, 1, b"masked")
    assert vm.p.queued(0, SINT) == 1 and vm.slot_header()[0] == 0
    assert vm.wr(sint, VECTOR)
    assert vm.slot()[16:22] == b"masked" and vm.rec.irqs == [(0, VECTOR)] * 2
    vm.guest_takes()
    assert vm.wr(hv.HV_X64_MSR_SCONTROL, 0)
    vm.p.post_message(0, SINT, 1, b"off")
    assert vm.p.queued(0, SINT) == 1
    assert vm.wr(hv.HV_X64_MSR_SCONTROL, 1)
    assert vm.slot()[16:19] == b"off" and len(vm.rec.irqs) == 3


def test_polling_sint_gets_the_message_without_an_interrupt(bus: Vm) -> None:
    assert bus.wr(hv.HV_X64_MSR_SINT0 + 5, 0x40 | hv.HV_SYNIC_SINT_POLLING)
    bus.p.post_message(0, 5, 7, b"poll")
    assert bus.slot(5)[:4] == struct.pack("<I", 7) and bus.rec.irqs == []


def test_queue_is_bounded(vm: Vm) -> None:
    for _ in range(hv.MESSAGE_QUEUE_LIMIT):
        vm.p.post_message(0, SINT, 1, b"x")
    with pytest.raises(hv.MessageQueueFull, match="SINT 2"):
        vm.p.post_message(0, SINT, 1, b"x")
    vm.p.post_message(0, 3, 1, b"x")  # another SINT has its own queue
    vm.synic_enable()
    assert vm.p.queued(0, SINT) == hv.MESSAGE_QUEUE_LIMIT - 1


def test_post_message_refuses_what_no_hyper_v_would_send(bus: Vm) -> None:
    with pytest.raises(hv.HyperVError, match="241 bytes"):
        bus.p.post_message(0, SINT, 1, bytes(241))
    for sint, mtype, vcpu in (
        (16, 1, 0),
        (-1, 1, 0),
        (SINT, 0, 0),
        (SINT, 1 << 32, 0),
        (SINT, 1, 5),
    ):
        with pytest.raises(hv.HyperVError):
            bus.p.post_message(vcpu, sint, mtype, b"")
    assert bus.rec.irqs == [] and bus.slot_header()[0] == 0


def test_simp_moved_while_in_use(bus: Vm) -> None:
    """The page's contents move with it (a TLFS overlay); what waits stays queued."""
    bus.p.post_message(0, SINT, 1, b"one")
    bus.p.post_message(0, SINT, 1, b"two")
    assert bus.wr(hv.HV_X64_MSR_SIMP, SIMP_PAGE2 | 1)
    assert bus.slot(page=SIMP_PAGE2)[16:19] == b"one"
    assert bus.guest_takes(page=SIMP_PAGE2)[16:19] == b"one"  # pending flag moved too
    assert bus.slot(page=SIMP_PAGE2)[16:19] == b"two"
    assert len(bus.rec.irqs) == 2


def test_simp_disabled_while_in_use_keeps_the_queue(bus: Vm) -> None:
    bus.p.post_message(0, SINT, 1, b"one")
    bus.p.post_message(0, SINT, 1, b"two")
    assert bus.wr(hv.HV_X64_MSR_SIMP, 0)  # hv_synic_disable_regs
    bus.p.post_message(0, SINT, 1, b"three")
    assert bus.p.queued(0, SINT) == 2
    assert bus.wr(hv.HV_X64_MSR_SIMP, SIMP_PAGE2 | 1)  # fresh page: zeroed, then filled
    assert bus.guest_takes(page=SIMP_PAGE2)[16:19] == b"two"
    assert bus.guest_takes(page=SIMP_PAGE2)[16:21] == b"three"
    assert bus.ram.read(SIMP_PAGE + SINT * 256 + 16, 3) == b"one"  # left in old RAM


# --- host -> guest events ----------------------------------------------------------------


def flags_of(v: Vm, sint: int = SINT, page: int = SIEFP_PAGE) -> set[int]:
    raw = int.from_bytes(v.ram.read(page + sint * 256, 256), "little")
    return {i for i in range(2048) if raw >> i & 1}


def test_event_flag_and_interrupt(bus: Vm) -> None:
    for relid in (1, 63, 64, 2047):
        bus.p.signal_event(0, SINT, relid)
    assert flags_of(bus) == {1, 63, 64, 2047}
    assert bus.rec.irqs == [(0, VECTOR)] * 4
    bus.p.signal_event(0, SINT, 64)  # still set: the guest has not looked yet
    assert len(bus.rec.irqs) == 4
    bus.ram.write(SIEFP_PAGE + SINT * 256 + 8, bytes(8))  # guest clears 64..127
    bus.p.signal_event(0, SINT, 64)
    assert len(bus.rec.irqs) == 5 and flags_of(bus) == {1, 63, 64, 2047}


def test_event_waits_for_siefp_and_unmask(vm: Vm) -> None:
    vm.p.signal_event(0, SINT, 5)
    vm.p.signal_event(0, SINT, 9)
    assert vm.rec.irqs == []
    vm.synic_enable()
    assert flags_of(vm) == {5, 9} and vm.rec.irqs == [(0, VECTOR)]
    assert vm.wr(hv.HV_X64_MSR_SIEFP, 0)
    vm.p.signal_event(0, SINT, 7)
    assert vm.wr(hv.HV_X64_MSR_SIEFP, (SIEFP_PAGE + PAGE) | 1)  # fresh page
    assert flags_of(vm, page=SIEFP_PAGE + PAGE) == {7} and len(vm.rec.irqs) == 2


def test_event_flag_range(bus: Vm) -> None:
    for flag in (-1, 2048):
        with pytest.raises(hv.HyperVError):
            bus.p.signal_event(0, SINT, flag)


# --- both slot implementations agree ----------------------------------------------------


@pytest.mark.native
@settings(max_examples=200, deadline=None)
@given(
    slot=st.binary(min_size=256, max_size=256),
    msg=st.binary(min_size=256, max_size=256),
    flag=st.integers(-5, 2100),
)
def test_native_slots_match_the_twin(slot: bytes, msg: bytes, flag: int) -> None:
    py, c = hv.slot_ops(False), hv.slot_ops(True)
    assert (py.name, c.name) == ("python", "native")
    a, b = bytearray(slot), bytearray(slot)
    assert py.deliver(memoryview(a), msg) == c.deliver(memoryview(b), msg)
    assert a == b
    a, b = bytearray(slot), bytearray(slot)
    assert py.event_set(memoryview(a), flag) == c.event_set(memoryview(b), flag)
    assert a == b


# --- snapshot ------------------------------------------------------------------------------


def test_save_and_restore(bus: Vm, impl: str) -> None:
    bus.p.post_message(0, SINT, 1, b"in slot")
    bus.p.post_message(0, SINT, 1, b"queued")
    assert bus.wr(hv.HV_X64_MSR_SIEFP, 0)
    bus.p.signal_event(0, SINT, 3)
    state = json.loads(json.dumps(bus.p.save()))
    other = Vm(impl)
    other.ram = bus.ram  # guest RAM is restored separately
    other.p._ram = bus.ram
    other.p.restore(state)
    assert other.p.save() == state
    assert other.guest_takes()[16:23] == b"in slot"
    assert other.slot()[16:22] == b"queued"
    assert other.wr(hv.HV_X64_MSR_SIEFP, SIEFP_PAGE | 1)
    assert flags_of(other) == {3}
    with pytest.raises(hv.HyperVError):
        Vm(impl, vcpus=1).p.restore(state)


def test_native_selection_follows_the_environment() -> None:
    assert hv.slot_ops().name == ("native" if native.NATIVE else "python")
    assert Vm("python").p.slot_backend == "python"


# --- against a guest running at the same time ----------------------------------------------

GUEST_C = r"""
#include <stdint.h>
#include <string.h>
#include <time.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* vmbus_on_msg_dpc + vmbus_signal_eom, as Linux 6.1 does them, n times: read the type,
 * copy, cmpxchg the type to NONE, then EOM (here: count it) if msg_pending is set.
 * Returns how many it took before running out of time (< n: a stall). */
int guest_messages(uint8_t *slot, uint32_t n, uint32_t *seq, uint32_t *eoms, double timeout)
{
    double deadline = now() + timeout;
    uint32_t i = 0;
    while (i < n) {
        uint32_t t = __atomic_load_n((uint32_t *)slot, __ATOMIC_ACQUIRE);
        if (t == 0) {
            if (now() > deadline)
                break;
            continue;
        }
        memcpy(&seq[i++], slot + 16, 4);
        uint32_t expect = t;
        __atomic_compare_exchange_n((uint32_t *)slot, &expect, 0, 0, __ATOMIC_SEQ_CST,
                                    __ATOMIC_SEQ_CST);
        if (__atomic_load_n(slot + 5, __ATOMIC_SEQ_CST) & 1)
            __atomic_fetch_add(eoms, 1, __ATOMIC_SEQ_CST);
    }
    return (int)i;
}

/* vmbus_chan_sched: test-and-clear every set flag until *stop, then once more;
 * seen[f] counts the times flag f was found set. */
void guest_events(uint8_t *slot, uint32_t *seen, uint32_t *stop)
{
    int last = 0;
    for (;;) {
        if (__atomic_load_n(stop, __ATOMIC_ACQUIRE))
            last = 1;
        for (int w = 0; w < 32; w++) {
            uint64_t *p = (uint64_t *)(slot + 8 * w);
            uint64_t v = __atomic_load_n(p, __ATOMIC_RELAXED);
            while (v) {
                int b = __builtin_ctzll(v);
                uint64_t bit = (uint64_t)1 << b;
                v &= v - 1;
                if (__atomic_fetch_and(p, ~bit, __ATOMIC_SEQ_CST) & bit)
                    seen[w * 64 + b]++;
            }
        }
        if (last)
            return;
    }
}
"""


@pytest.fixture(scope="module")
def guest_lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    gcc = require_tool("gcc", "gcc")
    d = tmp_path_factory.mktemp("guest")
    (d / "guest.c").write_text(GUEST_C)
    so = d / "guest.so"
    subprocess.run([gcc, "-O2", "-shared", "-fPIC", "-o", str(so), str(d / "guest.c")], check=True)
    lib = ctypes.CDLL(str(so))
    lib.guest_messages.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_double,
    ]
    lib.guest_messages.restype = ctypes.c_int
    lib.guest_events.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.guest_events.restype = None
    return lib


def address_of(buf: bytearray, offset: int) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf, offset))


@pytest.mark.parametrize("impl_name", SLOT_IMPLS)
def test_no_message_is_lost_or_stuck_against_a_concurrent_guest(
    guest_lib: ctypes.CDLL, impl_name: str
) -> None:
    """The C guest takes messages on another core while Python posts them and answers
    its EOMs: every message arrives once, in order, and the handshake never stalls on
    either slot path (no retry: the locked OR closes the msg_pending race; a twin
    without it stalled here, see _PySlots)."""
    n = 30_000
    v = Vm(impl_name)
    v.hyperv_init()
    v.synic_enable()
    seq = (ctypes.c_uint32 * n)()
    eoms = ctypes.c_uint32(0)
    took: list[int] = []
    slot = address_of(v.ram.low, SIMP_PAGE + SINT * 256)
    guest = threading.Thread(
        target=lambda: took.append(
            guest_lib.guest_messages(slot, n, ctypes.addressof(seq), ctypes.addressof(eoms), 30.0)
        )
    )
    guest.start()
    sent = answered = 0
    while guest.is_alive():
        while sent < n and v.p.queued(0, SINT) < 32:
            v.p.post_message(0, SINT, 1, struct.pack("<I", sent))
            sent += 1
        e = eoms.value
        for _ in range(e - answered):
            assert v.wr(hv.HV_X64_MSR_EOM, 0)
        answered = e
    guest.join()
    assert took == [n], f"the guest stalled after {took} messages"
    assert list(seq) == list(range(n))
    assert len(v.rec.irqs) == n


@pytest.mark.parametrize("impl_name", SLOT_IMPLS)
def test_event_flags_against_a_concurrent_guest(guest_lib: ctypes.CDLL, impl_name: str) -> None:
    """Flags set while the guest clears them on another core: none is lost and none
    comes back: the guest finds each flag exactly as often as event_set said it was
    fresh (a read-modify-write twin would bring back flags the guest had just cleared).
    """
    ops = hv.slot_ops(impl_name == "native")
    buf = bytearray(256)
    seen = (ctypes.c_uint32 * 2048)()
    stop = ctypes.c_uint32(0)
    guest = threading.Thread(
        target=guest_lib.guest_events,
        args=(address_of(buf, 0), ctypes.addressof(seen), ctypes.addressof(stop)),
    )
    guest.start()
    fresh = [0] * 2048
    view = memoryview(buf)
    try:
        for i in range(100_000):
            flag = (i * 7919) % 192  # three words, so that set and clear meet
            fresh[flag] += ops.event_set(view, flag)
    finally:
        stop.value = 1
        guest.join()
    view.release()
    assert buf == bytearray(256)
    assert list(seen) == fresh
    assert sum(fresh) > 1000  # the two sides really met


def test_twin_refuses_to_run_without_libatomic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hv, "_load_libatomic", lambda: "libatomic not found")
    with pytest.raises(hv.HyperVError, match="need libatomic"):
        hv.slot_ops(False)


# --- the stub in a real KVM guest ----------------------------------------------------------

HERE = Path(__file__).parent
GUEST_TEXT = 0x200000
needs_kvm = pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="/dev/kvm is absent")


def build_guest(tmp_path: Path) -> tuple[bytes, dict[str, int]]:
    gas = require_tool("as", "binutils")
    ld = require_tool("ld", "binutils")
    nm = require_tool("nm", "binutils")
    obj, elf = tmp_path / "g.o", tmp_path / "g.elf"
    subprocess.run([gas, "--64", "-o", str(obj), str(HERE / "kvm_hyperv_guest.S")], check=True)
    link = [ld, "-m", "elf_x86_64", "-static", f"-Ttext={GUEST_TEXT:#x}", "-e", "_start"]
    subprocess.run([*link, "-o", str(elf), str(obj)], check=True)
    out = subprocess.run([nm, str(elf)], check=True, capture_output=True, text=True).stdout
    syms = {p[2]: int(p[0], 16) for p in (ln.split() for ln in out.splitlines()) if len(p) == 3}
    return elf.read_bytes(), syms


class SignalPort:
    """The stub's SIGNAL_PORT when no ioeventfd matched: the status goes into rcx."""

    def __init__(self, part: hv.HyperVPartition) -> None:
        self.part = part
        self.seen: list[int] = []

    def io_read(self, port: int, size: int) -> int:
        return 0xFFFFFFFF

    def io_write(self, port: int, size: int, value: int) -> None:
        vcpu = current_vcpu()
        self.seen.append(value)
        regs = vcpu.fd.get_regs()
        regs.rcx = self.part.signal_port_exit(vcpu.id, value)
        vcpu.fd.set_regs(regs)


class HypercallPort:
    """The stub's HYPERCALL_PORT: rcx, rdx, r8 as the guest left them; status into rax."""

    def __init__(self, part: hv.HyperVPartition) -> None:
        self.part = part
        self.controls: list[int] = []

    def io_read(self, port: int, size: int) -> int:
        return 0xFFFFFFFF

    def io_write(self, port: int, size: int, value: int) -> None:
        vcpu = current_vcpu()
        regs = vcpu.fd.get_regs()
        self.controls.append(regs.rcx)
        assert value == regs.rcx & 0xFFFFFFFF
        regs.rax = self.part.handle_hypercall(vcpu.id, regs.rcx, regs.rdx, regs.r8)
        vcpu.fd.set_regs(regs)


@needs_kvm
async def test_stub_and_synic_in_a_real_kvm_guest(tmp_path: Path) -> None:
    """The guest enables the hypercall page and SIMP through real MSR exits and calls
    the stub five ways: the ioeventfd takes the known connection inside KVM (no exit),
    the unknown one exits and its status comes back through rcx, HvPostMessage and an
    unknown code exit at the hypercall port with rcx/rdx/r8 intact, a flag number takes
    the slow path; every register but rax comes back as it went in. The VMM's answer
    to the post lands in the guest's SIMP slot and the guest EOMs."""
    image, syms = build_guest(tmp_path)
    cpuid = hv.HyperVCpuid()
    m = Machine(
        64 << 20,
        1,
        cpuid=dict(cpuid.overrides()),
        cpuid_edits=[pvm.hide_features, hv.HyperVCpuid.set_hypervisor_bit],
    )
    rec = Recorder()
    part: hv.HyperVPartition

    def on_post(connection_id: int, message_type: int, payload: bytes) -> int:
        rec.on_post(connection_id, message_type, payload)
        part.post_message(0, SINT, 1, b"reply!!!")
        return hv.HV_STATUS_SUCCESS

    part = hv.HyperVPartition(
        m.ram, rec, vcpus=1, on_post=on_post, on_signal=rec.on_signal, tsc_frequency_hz=TSC_HZ
    )
    m.rdmsr = lambda vcpu, index: part.read_msr(vcpu.id, index)
    m.wrmsr = lambda vcpu, index, value: part.write_msr(vcpu.id, index, value)
    signal, hypercall = SignalPort(part), HypercallPort(part)
    m.add_port_device(part.stub.signal_port, 1, signal)
    m.add_port_device(part.stub.hypercall_port, 1, hypercall)
    m.add_port_device(0xF4, 1, DebugExit(m))
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        m.vm.ioeventfd(efd, part.stub.signal_port, 4, datamatch=0x2000)
        boot.boot_elf(m, image, "")
        reason = await m.run(timeout=60)
        assert reason == StopReason("debug-exit", code=0x31)
        r = struct.unpack("<32Q", m.ram.read(syms["results"], 256))
        assert m.ram.read(syms["hcpage"], 35) == part.stub.code
        assert part.read_msr(0, hv.HV_X64_MSR_SIMP) == syms["simp"] | 1
        calls = [r[4 * k : 4 * k + 4] for k in range(5)]
        assert calls[0] == (hv.HV_STATUS_SUCCESS, 0x1005D, 0x2000, 0x8888)
        assert calls[1] == (hv.HV_STATUS_INVALID_CONNECTION_ID, 0x1005D, 0x2001, 0x8888)
        assert calls[2] == (hv.HV_STATUS_SUCCESS, 0x5C, syms["msgin"], 0x8888)
        assert calls[3] == (hv.HV_STATUS_INVALID_HYPERCALL_CODE, 0x99, 0x1234, 0x8888)
        assert calls[4] == (hv.HV_STATUS_INVALID_PARAMETER, 0x1005D, 0x100002000, 0x8888)
        assert r[22] == 0x9999
        assert os.eventfd_read(efd) == 1  # call 0, inside KVM
        assert signal.seen == [0x2001]
        assert hypercall.controls == [0x5C, 0x99, 0x1005D]
        assert rec.signals == [0x2001]  # 0x2000 never reached user space
        assert rec.posts == [(4, 1, b"hello")]
        assert r[20] == 1 and struct.pack("<Q", r[21]) == b"reply!!!"
        assert rec.irqs == [(0, 0xF3)]
        assert m.unhandled_ports == {}
    finally:
        os.close(efd)
        m.close()


# --- anything the guest does -----------------------------------------------------------------

STATUSES = {
    hv.HV_STATUS_SUCCESS,
    hv.HV_STATUS_INVALID_HYPERCALL_CODE,
    hv.HV_STATUS_INVALID_HYPERCALL_INPUT,
    hv.HV_STATUS_INVALID_ALIGNMENT,
    hv.HV_STATUS_INVALID_PARAMETER,
    hv.HV_STATUS_INVALID_CONNECTION_ID,
}
PAGE_MSRS = (
    hv.HV_X64_MSR_HYPERCALL,
    hv.HV_X64_MSR_VP_ASSIST_PAGE,
    hv.HV_X64_MSR_SIMP,
    hv.HV_X64_MSR_SIEFP,
)
u64s = st.one_of(
    st.integers(0, (1 << 64) - 1),
    st.sampled_from([0, 1, INPUT_PAGE, SIMP_PAGE | 1, HOLE | 1, RAM_END | 1, (1 << 64) - 1]),
)
sints = st.one_of(st.just(SINT), st.integers(0, 15))  # mostly the one Linux unmasks
SETUP_PAGES = [0, SIMP_PAGE, SIEFP_PAGE, RAM_LOW - PAGE, SIMP_PAGE2, RAM_END - PAGE]
guest_ops = st.one_of(
    st.tuples(st.just("wrmsr"), st.integers(0x40000000, 0x400001FF), u64s),
    st.tuples(st.just("wrmsr"), st.sampled_from(PAGE_MSRS), u64s),
    st.tuples(st.just("rdmsr"), st.integers(0x40000000, 0x400001FF), st.just(0)),
    st.tuples(st.just("call"), u64s, u64s),
    st.tuples(st.just("call"), st.sampled_from([0x5C, 0x5D, 0x1005D]), u64s),
    st.tuples(st.just("input"), st.just(0), st.binary(min_size=16, max_size=256)),
    st.tuples(st.just("post"), sints, st.binary(max_size=240)),
    st.tuples(st.just("event"), sints, st.integers(0, 2047)),
    st.tuples(st.just("setup"), st.sampled_from(SETUP_PAGES), st.sampled_from(SETUP_PAGES)),
)


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(guest_ops, max_size=40))
def test_any_guest_behaviour_gets_an_answer_and_touches_only_its_pages(
    ops: list[tuple[str, int | bytes, int | bytes]],
) -> None:
    """Whatever MSR values and hypercalls the guest throws (with the host posting and
    signalling meanwhile): every access gets a value, #GP or an HV status, nothing
    raises, and the core writes guest RAM only in pages the guest enabled as hypercall,
    VP assist, SIMP or SIEFP page."""
    v = Vm()
    v.wr(hv.HV_X64_MSR_GUEST_OS_ID, LINUX_OS_ID)
    v.ram.low[:] = bytes(range(256)) * (RAM_LOW // 256)
    before = bytes(v.ram.low) + bytes(v.ram.high)
    owned: set[int] = set()
    for op, a, b in ops:
        if op == "wrmsr":
            assert isinstance(a, int) and isinstance(b, int)
            if v.wr(a, b) and a in PAGE_MSRS and b & 1:
                owned.add(b & ~0xFFF & ((1 << 64) - 1))
        elif op == "rdmsr":
            assert isinstance(a, int)
            got = v.rd(a)
            assert got is None or 0 <= got < 1 << 64
        elif op == "call":
            assert isinstance(a, int) and isinstance(b, int)
            assert v.call(a, b, b ^ a) in STATUSES
        elif op == "input":
            assert isinstance(b, bytes)
            v.ram.write(INPUT_PAGE, b)
            before = before[:INPUT_PAGE] + b + before[INPUT_PAGE + len(b) :]
        elif op == "setup":  # hv_synic_enable_regs on vCPU 0 with these pages
            assert isinstance(a, int) and isinstance(b, int)
            v.synic_enable(simp=a, siefp=b)
            owned |= {a, b}
        elif op == "post":
            assert isinstance(b, bytes)
            assert isinstance(a, int)
            with contextlib.suppress(hv.MessageQueueFull):
                v.p.post_message(0 if a == SINT else a % 2, a, 1, b)
        else:
            assert isinstance(a, int) and isinstance(b, int)
            v.p.signal_event(0, a, b)
    after = bytes(v.ram.low) + bytes(v.ram.high)
    for gpa in range(0, len(after), PAGE):
        if after[gpa : gpa + PAGE] != before[gpa : gpa + PAGE]:
            real = gpa if gpa < RAM_LOW else gpa - RAM_LOW + RAM_HIGH
            assert real in owned, f"wrote page {real:#x}, not one the guest gave"
    assert all(vec >= 16 for _, vec in v.rec.irqs)
