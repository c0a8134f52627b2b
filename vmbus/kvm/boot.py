"""The Linux x86-64 64-bit boot protocol (Documentation/x86/boot.rst, "64-bit BOOT PROTOCOL").

We load the `vmlinux` ELF (not the bzImage: its decompressor is very slow under PVM) at
its physical addresses and enter its startup_64 (the ELF entry is physical) in long
mode: paging on with an identity map of the low 4 GiB, a GDT whose __BOOT_CS (0x10) and
__BOOT_DS (0x18) are flat, interrupts off, and %rsi pointing at the zero page
(struct boot_params) that carries the e820 map, the command line and the ACPI RSDP.
Any 64-bit ELF that expects the same state (the tests' tiny guest) boots the same way.

Low memory layout (GPA):
  0x0500  GDT            0x7000  boot_params (zero page)   0x8ff0  initial stack
  0x9000  PML4           0xa000  PDPT   0xb000-0xefff  four page directories (2 MiB pages)
  0x20000 command line   [acpi_gpa, +len) the ACPI tables blob (default 0xe0000)
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vmbus.kvm import kvmapi
from vmbus.kvm.ram import HIGH_BASE, KvmRam

if TYPE_CHECKING:
    from vmbus.kvm.machine import Machine

GDT_GPA = 0x500
BOOT_PARAMS_GPA = 0x7000
STACK_TOP = 0x8FF0
PML4_GPA = 0x9000
PDPT_GPA = 0xA000
PD_GPA = 0xB000
IDENTITY_MAP_GIB = 4
CMDLINE_GPA = 0x20000
CMDLINE_MAX = 2048  # COMMAND_LINE_SIZE on x86
ACPI_GPA = 0xE0000
EBDA_START = 0x9FC00
HIGH_MEMORY = 0x100000

BOOT_CS = 0x10
BOOT_DS = 0x18
BOOT_TSS = 0x20

E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_MAX_ZEROPAGE = 128

# boot_params / setup_header offsets (arch/x86/include/uapi/asm/bootparam.h)
BP_ACPI_RSDP_ADDR = 0x070
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_SENTINEL = 0x1EF
HDR_BOOT_FLAG = 0x1FE
HDR_HEADER = 0x202
HDR_VERSION = 0x206
HDR_TYPE_OF_LOADER = 0x210
HDR_LOADFLAGS = 0x211
HDR_CMD_LINE_PTR = 0x228
HDR_KERNEL_ALIGNMENT = 0x230
HDR_CMDLINE_SIZE = 0x238
BP_E820_TABLE = 0x2D0
LOADED_HIGH = 0x01
BOOT_PROTOCOL_VERSION = 0x020F

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
EFER_LME = 1 << 8
EFER_LMA = 1 << 10


class BootError(ValueError):
    """The kernel image or the boot layout is unusable; the message says why."""


# ---------------------------------------------------------------- ELF


@dataclass(frozen=True)
class ElfSegment:
    paddr: int
    data: bytes
    memsz: int


@dataclass(frozen=True)
class ElfImage:
    entry: int
    segments: tuple[ElfSegment, ...]

    @property
    def end(self) -> int:
        return max(s.paddr + s.memsz for s in self.segments)


def parse_elf(image: bytes) -> ElfImage:
    """The PT_LOAD segments (at p_paddr) and entry of a 64-bit little-endian x86 ELF."""
    if image[:4] != b"\x7fELF":
        raise BootError("not an ELF file (a bzImage? pass the vmlinux)")
    if image[4] != 2 or image[5] != 1:
        raise BootError("not a 64-bit little-endian ELF")
    (e_machine,) = struct.unpack_from("<H", image, 18)
    if e_machine != 62:
        raise BootError(f"ELF machine {e_machine}, not x86-64 (62)")
    e_entry, e_phoff = struct.unpack_from("<QQ", image, 24)
    e_phentsize, e_phnum = struct.unpack_from("<HH", image, 54)
    segs = []
    for i in range(e_phnum):
        off = e_phoff + i * e_phentsize
        p_type, _flags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz = struct.unpack_from(
            "<IIQQQQQ", image, off
        )
        if p_type != 1 or p_memsz == 0:
            continue
        if p_offset + p_filesz > len(image) or p_filesz > p_memsz:
            raise BootError(f"PT_LOAD {i} lies outside the file")
        segs.append(ElfSegment(p_paddr, image[p_offset : p_offset + p_filesz], p_memsz))
    if not segs:
        raise BootError("ELF has no PT_LOAD segment")
    return ElfImage(e_entry, tuple(segs))


def load_elf(ram: KvmRam, image: bytes) -> ElfImage:
    """Copy every PT_LOAD segment to its physical address, zero-filling its bss."""
    elf = parse_elf(image)
    for s in elf.segments:
        if not ram.contains(s.paddr, s.memsz):
            raise BootError(
                f"segment at {s.paddr:#x}+{s.memsz:#x} does not fit in guest RAM "
                f"({ram.size >> 20} MiB)"
            )
        ram.write(s.paddr, s.data)
        ram.slice(s.paddr + len(s.data), s.memsz - len(s.data))[:] = bytes(s.memsz - len(s.data))
    if not any(s.paddr <= elf.entry < s.paddr + s.memsz for s in elf.segments):
        raise BootError(f"ELF entry {elf.entry:#x} is not in a loaded segment (not physical?)")
    return elf


# ---------------------------------------------------------------- e820


def e820_map(ram: KvmRam, acpi: tuple[int, int] | None = None) -> list[tuple[int, int, int]]:
    """(addr, size, type) entries: RAM, the legacy EBDA/BIOS area reserved, the ACPI blob
    as ACPI (type 3). The 3-4 GiB PCI hole is left out, which is how Linux finds the gap
    it may give to PCI ("[mem ...] available for PCI devices")."""
    holes: list[tuple[int, int, int]] = [(EBDA_START, HIGH_MEMORY, E820_RESERVED)]
    if acpi is not None:
        start, end = acpi[0], acpi[0] + ((acpi[1] + 0xFFF) & ~0xFFF)
        if not ram.contains(start, end - start):
            raise BootError(f"ACPI area {start:#x}-{end:#x} is not guest RAM")
        holes = [*_carve(holes, start, end), (start, end, E820_ACPI)]
    ranges = [(r.gpa, r.end, E820_RAM) for r in ram.regions]
    for start, end, _ in holes:
        ranges = _carve(ranges, start, end)
    out = sorted(ranges + holes)
    return [(s, e - s, t) for s, e, t in out if e > s]


def _carve(ranges: list[tuple[int, int, int]], start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    for s, e, t in ranges:
        if e <= start or s >= end:
            out.append((s, e, t))
            continue
        if s < start:
            out.append((s, start, t))
        if e > end:
            out.append((end, e, t))
    return out


# ---------------------------------------------------------------- the zero page


def build_boot_params(
    cmdline_gpa: int,
    cmdline_len: int,
    e820: Sequence[tuple[int, int, int]],
    rsdp_gpa: int | None = None,
) -> bytes:
    """struct boot_params with the setup_header fields the 64-bit entry reads."""
    if len(e820) > E820_MAX_ZEROPAGE:
        raise BootError("too many e820 entries for the zero page")
    bp = bytearray(4096)
    struct.pack_into("<H", bp, HDR_BOOT_FLAG, 0xAA55)
    bp[HDR_HEADER : HDR_HEADER + 4] = b"HdrS"
    struct.pack_into("<H", bp, HDR_VERSION, BOOT_PROTOCOL_VERSION)
    bp[HDR_TYPE_OF_LOADER] = 0xFF  # "undefined" boot loader
    bp[HDR_LOADFLAGS] = LOADED_HIGH
    struct.pack_into("<I", bp, HDR_CMD_LINE_PTR, cmdline_gpa & 0xFFFFFFFF)
    struct.pack_into("<I", bp, BP_EXT_CMD_LINE_PTR, cmdline_gpa >> 32)
    struct.pack_into("<I", bp, HDR_KERNEL_ALIGNMENT, 0x1000000)
    struct.pack_into("<I", bp, HDR_CMDLINE_SIZE, cmdline_len)
    if rsdp_gpa is not None:
        struct.pack_into("<Q", bp, BP_ACPI_RSDP_ADDR, rsdp_gpa)
    bp[BP_E820_ENTRIES] = len(e820)
    for i, (addr, size, kind) in enumerate(e820):
        struct.pack_into("<QQI", bp, BP_E820_TABLE + 20 * i, addr, size, kind)
    return bytes(bp)


# ---------------------------------------------------------------- long mode


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """A segment descriptor from the 16-bit flags word (access byte | G/D/L nibble << 12)."""
    return (
        ((base & 0xFF000000) << 32)
        | ((base & 0x00FFFFFF) << 16)
        | (limit & 0xFFFF)
        | (((limit >> 16) & 0xF) << 48)
        | ((flags & 0xF0FF) << 40)
    )


GDT = (
    0,
    0,
    gdt_entry(0xA09B, 0, 0xFFFFF),  # 0x10 __BOOT_CS: 64-bit code, present, exec/read
    gdt_entry(0xC093, 0, 0xFFFFF),  # 0x18 __BOOT_DS: flat data, read/write
    gdt_entry(0x808B, 0, 0xFFFFF),  # 0x20 a busy TSS, only for KVM's TR
)


def segment_from_gdt(selector: int) -> kvmapi.Segment:
    entry = GDT[selector >> 3]
    flags = (entry >> 40) & 0xF0FF
    return kvmapi.Segment(
        base=0,
        limit=0xFFFFFFFF if flags & 0x8000 else 0xFFFFF,
        selector=selector,
        type=flags & 0xF,
        present=(flags >> 7) & 1,
        dpl=(flags >> 5) & 3,
        db=(flags >> 14) & 1,
        s=(flags >> 4) & 1,
        l=(flags >> 13) & 1,
        g=(flags >> 15) & 1,
        avl=(flags >> 12) & 1,
    )


def write_gdt(ram: KvmRam) -> None:
    ram.write(GDT_GPA, b"".join(struct.pack("<Q", e) for e in GDT))


def write_identity_map(ram: KvmRam) -> int:
    """PML4 -> PDPT -> 2 MiB pages covering [0, 4 GiB), MMIO (IOAPIC, LAPIC) included.
    Returns CR3. The boot protocol only needs the kernel, zero page and command line
    mapped; the kernel builds its own tables at once."""
    ram.write_u64(PML4_GPA, PDPT_GPA | 0x3)
    for g in range(IDENTITY_MAP_GIB):
        pd = PD_GPA + g * 0x1000
        ram.write_u64(PDPT_GPA + 8 * g, pd | 0x3)
        ram.write(
            pd,
            b"".join(
                struct.pack("<Q", ((g << 30) + (i << 21)) | 0x83) for i in range(512)
            ),  # present, writable, 2 MiB page
        )
    return PML4_GPA


def long_mode_sregs(sregs: kvmapi.Sregs, cr3: int) -> None:
    """Edit sregs (from KVM_GET_SREGS) into 64-bit mode with the boot GDT."""
    code = segment_from_gdt(BOOT_CS)
    data = segment_from_gdt(BOOT_DS)
    sregs.cs = code
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    tss = segment_from_gdt(BOOT_TSS)
    tss.limit = 0x67
    tss.g = 0
    sregs.tr = tss
    sregs.gdt.base = GDT_GPA
    sregs.gdt.limit = len(GDT) * 8 - 1
    sregs.idt.base = 0
    sregs.idt.limit = 0
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG
    sregs.cr3 = cr3
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    sregs.efer = EFER_LME | EFER_LMA


@dataclass(frozen=True)
class BootInfo:
    """What boot_elf placed, for logs and tests."""

    entry: int
    kernel_end: int
    boot_params: int
    cmdline: int
    rsdp: int | None
    e820: tuple[tuple[int, int, int], ...]


def place_boot_data(
    ram: KvmRam,
    image: bytes,
    cmdline: str = "",
    *,
    acpi: bytes | None = None,
    acpi_gpa: int = ACPI_GPA,
    rsdp_gpa: int | None = None,
) -> BootInfo:
    """Everything in guest RAM for the 64-bit entry: the ELF, GDT, page tables, command
    line, the ACPI blob (if any) and the zero page. rsdp_gpa defaults to acpi_gpa."""
    raw = cmdline.encode()
    if len(raw) >= CMDLINE_MAX:
        raise BootError(f"command line longer than {CMDLINE_MAX - 1} bytes")
    elf = parse_elf(image)
    if elf.end > HIGH_BASE:
        raise BootError("kernel image above 4 GiB")
    busy = [(GDT_GPA, CMDLINE_GPA + CMDLINE_MAX, "the boot data")]
    if acpi is not None:
        busy.append((acpi_gpa, acpi_gpa + len(acpi), "the ACPI tables"))
    for s in elf.segments:
        for start, end, what in busy:
            if s.paddr < end and s.paddr + s.memsz > start:
                raise BootError(f"ELF segment at {s.paddr:#x} overlaps {what}")
    load_elf(ram, image)
    write_gdt(ram)
    write_identity_map(ram)
    ram.write(CMDLINE_GPA, raw + b"\0")
    acpi_range = None
    if acpi is not None:
        acpi_range = (acpi_gpa, len(acpi))
        ram.write(acpi_gpa, acpi)
        if rsdp_gpa is None:
            rsdp_gpa = acpi_gpa
    e820 = e820_map(ram, acpi_range)
    ram.write(BOOT_PARAMS_GPA, build_boot_params(CMDLINE_GPA, len(raw), e820, rsdp_gpa))
    return BootInfo(elf.entry, elf.end, BOOT_PARAMS_GPA, CMDLINE_GPA, rsdp_gpa, tuple(e820))


def set_boot_cpu_state(vcpu: kvmapi.VcpuFd, entry: int, *, rsi: int = BOOT_PARAMS_GPA) -> None:
    """The boot vCPU's registers for the 64-bit entry: long mode, rip=entry, rsi=zero page."""
    sregs = vcpu.get_sregs()
    long_mode_sregs(sregs, PML4_GPA)
    vcpu.set_sregs(sregs)
    regs = kvmapi.Regs()
    regs.rflags = 0x2  # reserved bit 1; IF clear: interrupts off
    regs.rip = entry
    regs.rsi = rsi
    regs.rsp = regs.rbp = STACK_TOP
    vcpu.set_regs(regs)
    fpu = kvmapi.Fpu()
    fpu.fcw = 0x37F
    fpu.mxcsr = 0x1F80
    vcpu.set_fpu(fpu)


def boot_elf(
    machine: Machine,
    image: bytes,
    cmdline: str = "",
    *,
    acpi: bytes | None = None,
    acpi_gpa: int = ACPI_GPA,
    rsdp_gpa: int | None = None,
) -> BootInfo:
    """place_boot_data into the machine's RAM, then point vCPU 0 at the entry (the APs
    wait for the guest's INIT/SIPI, as on a PC)."""
    info = place_boot_data(
        machine.ram, image, cmdline, acpi=acpi, acpi_gpa=acpi_gpa, rsdp_gpa=rsdp_gpa
    )
    set_boot_cpu_state(machine.vcpus[0].fd, info.entry)
    return info


def linux_cmdline(
    tsc_khz: int, *, hz: int = 250, tsc_scale: int = 1, on_pvm: bool = False, extra: str = ""
) -> str:
    """The command line the probe booted with: serial console, no PCI, no calibration
    loops (lpj from the TSC as the guest will see it: tsc_khz * tsc_scale), and on
    kvm_pvm the options that steer Linux around its emulation gaps (pvm.PVM_CMDLINE)."""
    from vmbus.kvm.pvm import PVM_CMDLINE

    lpj = tsc_khz * tsc_scale * 1000 // hz
    parts = [
        "console=ttyS0 earlyprintk=ttyS0 pci=off",
        PVM_CMDLINE if on_pvm else "",
        "mitigations=off nokaslr tsc=reliable no_timer_check nowatchdog nosoftlockup",
        f"lpj={lpj}",
        extra,
    ]
    return " ".join(p for p in parts if p)
