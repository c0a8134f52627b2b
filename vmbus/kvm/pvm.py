"""Workarounds for kvm_pvm, the software virtualiser /dev/kvm is on some machines.

PVM emulates guest kernel code that runs with interrupts off, and its emulator lacks a
few instructions: each stops the guest with KVM_EXIT_INTERNAL_ERROR (suberror
emulation). Some we avoid by hiding the CPUID feature (and the matching kernel command
line options, PVM_CMDLINE), the rest the VMM emulates when it meets them:

- `int3` (the kernel's boot self-test): step past it and inject #BP, which is what the
  CPU would have done (a trap: the saved rip is after the int3);
- `fwait`: nothing to wait for (the VMM never leaves an x87 exception pending): skip it;
- `ldmxcsr`/`stmxcsr` (kernel_fpu_begin_mask): decode the memory operand, walk the
  guest page tables to it, and move MXCSR with KVM_GET_XSAVE/KVM_SET_XSAVE
  (KVM_GET_FPU reads MXCSR as 0
  on this host's kernel).

On hardware KVM none of this is installed: `is_pvm()` says which machine this is.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from vmbus.kvm import kvmapi
from vmbus.kvm.kvmapi import CpuidLeaf
from vmbus.kvm.machine import Machine, Vcpu

# CPUID leaf 1 ECX bits PVM's emulator cannot run (or that lead to code it cannot run).
# Measured (tests/test_kvm_core.py): kvm_pvm shows the guest the host's value for the
# bits KVM does not manage (POPCNT, SSSE3, SSE4.x, PCLMUL, AES...), whatever
# KVM_SET_CPUID2 says; only managed ones such as CX16 and the hypervisor bit follow the
# table. Hence PVM_CMDLINE's clearcpuid= for the rest; hiding them here too is right
# for any KVM that honours the table.
LEAF1_ECX_HIDDEN = {
    "pclmulqdq": 1,
    "ssse3": 9,
    "cx16": 13,  # lock cmpxchg16b
    "sse4_1": 19,
    "sse4_2": 20,
    "popcnt": 23,
    "aes": 25,
    "xsave": 26,  # xrstor; the kernel also needs `noxsave`
    "osxsave": 27,
    "avx": 28,  # needs XSAVE anyway
}
# CPUID leaf 7.0 EBX
LEAF7_EBX_HIDDEN = {"smap": 20, "sha_ni": 29}  # clac; SHA-NI in the crypto self-tests

# CPUID 0x40000001 EAX (KVM's paravirt features, seen while the KVM signature is shown):
# keep only kvmclock and NOP_IO_DELAY. Measured: with PV_UNHALT & co. a 2-vCPU Linux
# hangs at "x86: Booting SMP configuration" (vCPU 0 sits on a `vmcall`, the AP spins on
# a lock); with this mask it prints "smp: Brought up 1 node, 2 CPUs" and boots on.
KVM_PV_KEPT = (1 << 0) | (1 << 1) | (1 << 3) | (1 << 24)  # CLOCKSOURCE(2), NOP_IO_DELAY, STABLE

# the kernel command line that goes with it (the probe's; clearcpuid numbers are
# X86_FEATURE words*32+bit: 151 popcnt, 308 smap, 129 pclmul, 137 ssse3, 147 sse4.1,
# 148 sse4.2, 153 aes, 317 sha_ni)
PVM_CMDLINE = "noxsave nosmap clearcpuid=151,308,129,137,147,148,153,317"

VECTOR_BP = 3
VECTOR_GP = 13


def is_pvm(sys_module: str = "/sys/module") -> bool:
    """True when /dev/kvm is served by kvm_pvm rather than VMX or SVM."""
    if not os.path.isdir(os.path.join(sys_module, "kvm_pvm")):
        return False
    return not any(os.path.isdir(os.path.join(sys_module, m)) for m in ("kvm_intel", "kvm_amd"))


def hide_features(leaves: list[CpuidLeaf]) -> None:
    """A Machine cpuid_edit: clear the feature bits listed above."""
    mask1 = sum(1 << b for b in LEAF1_ECX_HIDDEN.values())
    mask7 = sum(1 << b for b in LEAF7_EBX_HIDDEN.values())
    for leaf in leaves:
        if leaf.function == 1:
            leaf.ecx &= ~mask1
        elif leaf.function == 7 and leaf.index == 0:
            leaf.ebx &= ~mask7
        elif leaf.function == 0x40000001:
            leaf.eax &= KVM_PV_KEPT


# ---------------------------------------------------------------- ldmxcsr/stmxcsr

_REGS = "rax rcx rdx rbx rsp rbp rsi rdi r8 r9 r10 r11 r12 r13 r14 r15".split()


@dataclass(frozen=True)
class MxcsrInsn:
    """A decoded ldmxcsr ('ld') or stmxcsr ('st') with its effective linear address."""

    op: str
    address: int
    length: int


def decode_mxcsr(
    code: bytes, regs: kvmapi.Regs, fs_base: int = 0, gs_base: int = 0
) -> MxcsrInsn | None:
    """Decode [prefixes] [REX] 0F AE /2|/3 (or VEX vldmxcsr/vstmxcsr) at code[0] in 64-bit
    mode; None when it is something else."""
    i = 0
    seg = 0
    addr32 = False
    while i < len(code) and code[i] in (0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x67):
        if code[i] == 0x64:
            seg = fs_base
        elif code[i] == 0x65:
            seg = gs_base
        elif code[i] == 0x67:
            addr32 = True
        i += 1
    rex = 0
    if i < len(code) and code[i] == 0xC5 and len(code) > i + 1:  # 2-byte VEX, map 0F
        vex = code[i + 1]
        rex = 0 if vex & 0x80 else 4  # R, stored inverted
        i += 2
        if code[i : i + 1] != b"\xae":
            return None
        i += 1
    elif i < len(code) and code[i] == 0xC4 and len(code) > i + 2:  # 3-byte VEX
        b1 = code[i + 1]
        if b1 & 0x1F != 1:
            return None
        rex = (~b1 >> 5) & 7  # R X B, stored inverted, in REX's bit order
        i += 3
        if code[i : i + 1] != b"\xae":
            return None
        i += 1
    else:
        if i < len(code) and 0x40 <= code[i] <= 0x4F:
            rex = code[i] & 0xF
            i += 1
        if code[i : i + 2] != b"\x0f\xae":
            return None
        i += 2
    if i >= len(code):
        return None
    modrm = code[i]
    i += 1
    mod, reg, rm = modrm >> 6, (modrm >> 3) & 7, modrm & 7
    if mod == 3 or reg not in (2, 3):
        return None
    op = "ld" if reg == 2 else "st"

    def r(n: int) -> int:
        v: int = getattr(regs, _REGS[n])
        return v

    ea = 0
    rip_relative = False
    if rm == 4:
        sib = code[i]
        i += 1
        scale, index, base = (
            sib >> 6,
            ((sib >> 3) & 7) | ((rex & 2) << 2),
            (sib & 7) | ((rex & 1) << 3),
        )
        if index != 4:
            ea += r(index) << scale
        if (base & 7) == 5 and mod == 0:
            ea += struct.unpack_from("<i", code, i)[0]
            i += 4
        else:
            ea += r(base)
    elif rm == 5 and mod == 0:
        rip_relative = True
        ea += struct.unpack_from("<i", code, i)[0]
        i += 4
    else:
        ea += r(rm | ((rex & 1) << 3))
    if mod == 1:
        ea += struct.unpack_from("<b", code, i)[0]
        i += 1
    elif mod == 2:
        ea += struct.unpack_from("<i", code, i)[0]
        i += 4
    if rip_relative:
        ea += regs.rip + i
    if addr32:
        ea &= 0xFFFFFFFF
    return MxcsrInsn(op, (seg + ea) & 0xFFFF_FFFF_FFFF_FFFF, i)


# ---------------------------------------------------------------- the hook


@dataclass
class PvmWorkarounds:
    """The INTERNAL_ERROR hook; `counts` says which gaps the guest met, and how often."""

    counts: dict[str, int] = field(default_factory=dict)

    def __call__(self, vcpu: Vcpu) -> bool:
        run = vcpu.fd.run_struct
        if run.exit.internal.suberror != kvmapi.KVM_INTERNAL_ERROR_EMULATION:
            return False
        regs = vcpu.fd.get_regs()
        sregs = vcpu.fd.get_sregs()
        try:
            code = vcpu.read_virt(sregs.cs.base + regs.rip, 15)
        except (LookupError, ValueError):
            return False
        if code[0] == 0xCC:  # int3: a trap, so #BP is delivered with rip past it
            regs.rip += 1
            vcpu.fd.set_regs(regs)
            vcpu.inject_exception(VECTOR_BP)
            return self._met("int3")
        if code[0] == 0x9B:  # fwait
            regs.rip += 1
            vcpu.fd.set_regs(regs)
            return self._met("fwait")
        insn = decode_mxcsr(code, regs, sregs.fs.base, sregs.gs.base)
        if insn is None:
            return False
        try:
            if insn.op == "ld":
                (value,) = struct.unpack("<I", vcpu.read_virt(insn.address, 4))
                if value & ~0xFFFF:  # reserved MXCSR bits: the CPU raises #GP(0)
                    vcpu.inject_exception(VECTOR_GP, 0)
                    return self._met("ldmxcsr")
                vcpu.fd.set_mxcsr(value)
            else:
                vcpu.write_virt(insn.address, struct.pack("<I", vcpu.fd.get_mxcsr()))
        except (LookupError, ValueError):
            return False  # an unmapped operand: let the fault report it
        regs.rip += insn.length
        vcpu.fd.set_regs(regs)
        return self._met(insn.op + "mxcsr")

    def _met(self, what: str) -> bool:
        self.counts[what] = self.counts.get(what, 0) + 1
        return True


def install(machine: Machine, *, force: bool = False) -> PvmWorkarounds | None:
    """Add the emulation hook when on kvm_pvm (or when forced); None otherwise."""
    if not (force or is_pvm()):
        return None
    hook = PvmWorkarounds()
    machine.internal_error_hooks.append(hook)
    return hook
