"""ACPI tables for the KVM guest, built in Python: RSDP, XSDT, FADT, MADT and a DSDT.

Why Python and not iasl: Linux's hv_vmbus binds to an ACPI device whose ``_HID`` is
``"VMBus"`` (``vmbus_acpi_device_ids`` in drivers/hv/vmbus_drv.c: "VMBUS" or "VMBus"),
which is not a valid PNP or ACPI id, so iasl refuses to compile it.  The AML needed
is tiny (Scope, Device, Name, String, Integer, Buffer), so a small encoder here is
simpler than working around the compiler.

Sans-IO: :func:`build_acpi` returns one page-aligned blob of bytes to copy into guest
RAM at ``base_gpa``, the RSDP's address (for ``boot_params.acpi_rsdp_addr``) and the
e820 range to reserve.  What Linux 6.1 needs, read from its source:

- RSDP revision 2 with an XSDT address; Linux takes the XSDT when revision > 1, so
  the RSDT address is 0.  Both RSDP checksums are verified (acpi_tb_validate_rsdp).
- FADT revision 6 (ACPI 6.3), full 276-byte length, ``HW_REDUCED_ACPI``: ACPICA then
  skips the FACS (tbfadt.c) and the SCI/GPE/fixed-event hardware, and x86 switches to
  the reduced model (acpi_generic_reduced_hw_init: no legacy PIC, no PIT timer setup,
  so the LAPIC timer runs off the Hyper-V frequency MSRs).  The DSDT is given only in
  X_DSDT (the 32-bit DSDT field is 0, so ACPICA has no two addresses to choose from).
  IAPC_BOOT_ARCH: no VGA, no CMOS RTC, and (8042 bit clear) no i8042 to probe.
  POWER_BUTTON and SLEEP_BUTTON are set so Linux adds no fixed-hardware buttons.
- SCI_INT is 9, not 0, although a reduced-hardware OS ignores it (ACPI 6.3 5.2.9):
  Linux's acpi_parse_int_src_ovr treats any interrupt source override whose source
  IRQ equals SCI_INT as the SCI's, so with SCI_INT 0 the IRQ0 -> GSI2 override
  would be taken for the SCI (made level, active-low).
- MADT: one enabled Processor Local APIC per vCPU (APIC id = vCPU index, which is
  KVM's default), one I/O APIC (id 0, as KVM's in-kernel IOAPIC resets to) at GSI
  base 0, the ISA IRQ0 -> GSI2 override of a PC, and LINT1 as NMI on every CPU.
  With HW_REDUCED Linux registers no legacy (ISA) IRQs, so the override changes
  nothing there; it describes where a VMM that routes the PIT like QEMU puts it.
- DSDT: ``\\_SB.VMOD`` (``_HID "ACPI0004"``, a module device) holding ``VMBS``
  (``_HID "VMBus"``, ``_UID 0``, ``_CRS`` with one IRQ descriptor).  vmbus_acpi_add
  fails unless VMBS has a ``_CRS`` (acpi_walk_resources returns AE_NOT_FOUND
  otherwise); it ignores a plain IRQ descriptor on x86 (only Extended IRQ, which
  ARM64 uses; x86 takes HYPERVISOR_CALLBACK_VECTOR).  It then walks the ancestors'
  ``_CRS`` for MMIO windows and skips any ancestor without one, so VMOD needs none:
  the windows only serve vmbus_allocate_mmio (hv_pci, the synthetic framebuffer),
  which storvsc and netvsc do not use.  The IRQ is edge, active-high: the ISA
  default, so no override is needed for it.
- e820: type 3 (ACPI tables).  Linux keeps such a range out of memblock, marks it
  busy as "ACPI Tables", maps tables from it on demand and never reclaims it.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

PAGE_SIZE = 4096

OEM_ID = b"VMBUSD"  # 6 bytes
OEM_TABLE_ID = b"VMBUSKVM"  # 8 bytes
OEM_REVISION = 1
CREATOR_ID = b"VMBD"  # 4 bytes
CREATOR_REVISION = 1

E820_ACPI = 3  # "ACPI Tables" (reclaimable); what Linux wants for this blob
E820_RESERVED = 2

LAPIC_ADDRESS = 0xFEE0_0000
IOAPIC_ADDRESS = 0xFEC0_0000
IOAPIC_ID = 0  # KVM's in-kernel IOAPIC resets its ID register to 0
MAX_VCPUS = 255  # APIC ids 0..254 fit the 8-bit MADT entry; 0xff means "invalid"
SCI_IRQ = 9  # ignored in reduced hardware, but must differ from any override's source

# FADT fields (ACPI 6.3 table 5-34)
FADT_REVISION = 6
FADT_MINOR_REVISION = 3
FADT_LENGTH = 276
FADT_FLAG_WBINVD = 1 << 0
FADT_FLAG_POWER_BUTTON = 1 << 4  # no fixed-hardware power button
FADT_FLAG_SLEEP_BUTTON = 1 << 5  # no fixed-hardware sleep button
FADT_FLAG_HW_REDUCED_ACPI = 1 << 20
FADT_FLAGS = (
    FADT_FLAG_WBINVD | FADT_FLAG_POWER_BUTTON | FADT_FLAG_SLEEP_BUTTON | FADT_FLAG_HW_REDUCED_ACPI
)
IAPC_BOOT_ARCH_NO_VGA = 1 << 2
IAPC_BOOT_ARCH_NO_CMOS_RTC = 1 << 5
IAPC_BOOT_ARCH = IAPC_BOOT_ARCH_NO_VGA | IAPC_BOOT_ARCH_NO_CMOS_RTC

# MADT (ACPI 6.3 5.2.12)
MADT_REVISION = 5
MADT_FLAG_PCAT_COMPAT = 1  # KVM_CREATE_IRQCHIP does include the dual 8259
MADT_LOCAL_APIC = 0
MADT_IO_APIC = 1
MADT_INTERRUPT_OVERRIDE = 2
MADT_LOCAL_APIC_NMI = 4
MADT_LAPIC_ENABLED = 1
MPS_INTI_CONFORMING = 0  # polarity and trigger "conform to the bus" (ISA: edge, high)
MPS_INTI_EDGE_HIGH = 0b0101  # polarity 01 active high, trigger 01 edge

DSDT_REVISION = 2  # >= 2: AML integers are 64 bits wide
XSDT_REVISION = 1
RSDP_REVISION = 2
RSDP_LENGTH = 36
TABLE_ALIGN = 16  # RSDP must be 16-byte aligned; the other tables need less

HEADER = struct.Struct("<4sIBB6s8sI4sI")  # the 36-byte System Description Table Header


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes `data` (with that byte at 0) sum to zero modulo 256."""
    return -sum(data) & 0xFF


# --- AML encoding (ACPI 6.3 chapter 20) ------------------------------------------------

ZERO_OP = 0x00
ONE_OP = 0x01
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82  # after EXT_OP_PREFIX
ROOT_CHAR = 0x5C  # '\'
PARENT_PREFIX = 0x5E  # '^'
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
NULL_NAME = 0x00

PKG_LENGTH_MAX = (1 << 28) - 1  # 4 bytes: 4 bits in the lead byte + 3 * 8
_PKG_LENGTH_LIMITS = (0x3F, 0xFFF, 0xFFFFF, PKG_LENGTH_MAX)  # largest value per byte count

_NAME_SEG = re.compile(r"[A-Z_][A-Z0-9_]{0,3}")


def encode_pkg_length(value: int) -> bytes:
    """A PkgLength holding `value` (which counts the PkgLength's own bytes), shortest form.

    One byte holds 0..63 in bits 0-5; otherwise bits 6-7 of the lead byte count the
    following bytes (1-3), the lead byte's bits 0-3 hold the low nibble and each
    following byte the next 8 bits.
    """
    if not 0 <= value <= PKG_LENGTH_MAX:
        raise ValueError(f"PkgLength {value} out of range 0..{PKG_LENGTH_MAX}")
    if value <= 0x3F:
        return bytes([value])
    follow = 1 if value <= 0xFFF else 2 if value <= 0xFFFFF else 3
    rest = value >> 4
    return bytes([(follow << 6) | (value & 0x0F)]) + rest.to_bytes(follow, "little")


def pkg(body: bytes) -> bytes:
    """`body` prefixed with the PkgLength that covers it and itself."""
    for size, limit in enumerate(_PKG_LENGTH_LIMITS, start=1):
        if len(body) + size <= limit:
            return encode_pkg_length(len(body) + size) + body
    raise ValueError(f"AML package body of {len(body)} bytes is too long")


def name_seg(seg: str) -> bytes:
    """A 4-character NameSeg; shorter names are padded with '_' as iasl does."""
    if not _NAME_SEG.fullmatch(seg):
        raise ValueError(f"invalid AML NameSeg {seg!r}")
    return seg.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    r"""A NameString: optional root '\' or parent '^' prefixes, then dotted segments."""
    i = 0
    prefix = b""
    if path.startswith("\\"):
        prefix, i = bytes([ROOT_CHAR]), 1
    else:
        while i < len(path) and path[i] == "^":
            i += 1
        prefix = bytes([PARENT_PREFIX]) * i
    rest = path[i:]
    segs = [name_seg(s) for s in rest.split(".")] if rest else []
    if not segs:
        if not prefix:
            raise ValueError("empty AML name")
        return prefix + bytes([NULL_NAME])
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + segs[0] + segs[1]
    if len(segs) > 255:
        raise ValueError(f"AML name with {len(segs)} segments")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


def integer(value: int) -> bytes:
    """The shortest integer term: Zero, One, or a Byte/Word/DWord/QWord constant."""
    if not 0 <= value < 1 << 64:
        raise ValueError(f"AML integer {value} out of range")
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    for prefix, size in ((BYTE_PREFIX, 1), (WORD_PREFIX, 2), (DWORD_PREFIX, 4)):
        if value < 1 << (8 * size):
            return bytes([prefix]) + value.to_bytes(size, "little")
    return bytes([QWORD_PREFIX]) + value.to_bytes(8, "little")


def string(text: str) -> bytes:
    """A String term: ASCII 0x01-0x7F, NUL terminated."""
    data = text.encode("ascii")
    if 0 in data:
        raise ValueError("AML strings cannot hold NUL")
    return bytes([STRING_PREFIX]) + data + b"\x00"


def buffer(data: bytes) -> bytes:
    """A Buffer term of exactly `data`."""
    return bytes([BUFFER_OP]) + pkg(integer(len(data)) + data)


def name(path: str, value: bytes) -> bytes:
    """Name(path, value): `value` is an already encoded data term."""
    return bytes([NAME_OP]) + name_string(path) + value


def scope(path: str, *terms: bytes) -> bytes:
    """Scope(path) { terms }."""
    return bytes([SCOPE_OP]) + pkg(name_string(path) + b"".join(terms))


def device(path: str, *terms: bytes) -> bytes:
    """Device(path) { terms }."""
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg(name_string(path) + b"".join(terms))


# --- resource descriptors (ACPI 6.3 6.4) ----------------------------------------------

IRQ_DESCRIPTOR = 0x23  # small item 0x04, 3 bytes of data (mask + flags)
END_TAG = 0x79  # small item 0x0F, 1 byte of data (checksum)
IRQ_EDGE = 1 << 0
IRQ_ACTIVE_LOW = 1 << 3
IRQ_SHARED = 1 << 4


def irq_descriptor(
    irqs: Iterable[int], *, edge: bool = True, active_low: bool = False, shared: bool = False
) -> bytes:
    """An IRQ descriptor with its flags byte: IRQ (Edge, ActiveHigh, Exclusive) {irqs}."""
    mask = 0
    for irq in irqs:
        if not 0 <= irq <= 15:
            raise ValueError(f"IRQ descriptor holds IRQs 0-15, not {irq}")
        mask |= 1 << irq
    flags = (IRQ_EDGE if edge else 0) | (IRQ_ACTIVE_LOW if active_low else 0)
    flags |= IRQ_SHARED if shared else 0
    return struct.pack("<BHB", IRQ_DESCRIPTOR, mask, flags)


def resource_template(*descriptors: bytes) -> bytes:
    """A ResourceTemplate buffer: the descriptors, then an End Tag whose checksum
    makes the whole template sum to zero."""
    body = b"".join(descriptors) + bytes([END_TAG])
    return buffer(body + bytes([checksum(body)]))


# --- tables ---------------------------------------------------------------------------


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A System Description Table: the 36-byte header (checksum filled in) and `body`."""
    if len(signature) != 4:
        raise ValueError(f"table signature {signature!r} is not 4 bytes")
    length = HEADER.size + len(body)
    header = HEADER.pack(
        signature,
        length,
        revision,
        0,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        CREATOR_ID,
        CREATOR_REVISION,
    )
    table = bytearray(header + body)
    table[9] = checksum(table)
    return bytes(table)


def build_dsdt(vmbus_irq: int = 5) -> bytes:
    r"""The DSDT: \_SB.VMOD (ACPI0004) holding VMBS (_HID "VMBus", _UID 0, _CRS IRQ)."""
    vmbs = device(
        "VMBS",
        name("_HID", string("VMBus")),
        name("_UID", integer(0)),
        name("_CRS", resource_template(irq_descriptor([vmbus_irq]))),
    )
    vmod = device("VMOD", name("_HID", string("ACPI0004")), name("_UID", integer(0)), vmbs)
    return sdt(b"DSDT", DSDT_REVISION, scope("\\_SB", vmod))


def build_fadt(dsdt_addr: int) -> bytes:
    """A revision 6 (ACPI 6.3) hardware-reduced FADT pointing at the DSDT by X_DSDT only."""
    body = bytearray(FADT_LENGTH - HEADER.size)

    def put(offset: int, fmt: str, value: int) -> None:  # offsets as in the spec's table
        struct.pack_into("<" + fmt, body, offset - HEADER.size, value)

    put(46, "H", SCI_IRQ)
    put(109, "H", IAPC_BOOT_ARCH)
    put(112, "I", FADT_FLAGS)
    put(131, "B", FADT_MINOR_REVISION)
    put(140, "Q", dsdt_addr)  # X_DSDT
    return sdt(b"FACP", FADT_REVISION, bytes(body))


def build_madt(vcpus: int, *, irq0_override: bool = True) -> bytes:
    """The MADT: a LAPIC per vCPU, one IOAPIC at GSI 0, the PC's overrides, LINT1 NMI."""
    if not 1 <= vcpus <= MAX_VCPUS:
        raise ValueError(f"vcpus must be 1..{MAX_VCPUS}, not {vcpus}")
    entries = [
        struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, cpu, cpu, MADT_LAPIC_ENABLED)
        for cpu in range(vcpus)
    ]
    entries.append(struct.pack("<BBBBII", MADT_IO_APIC, 12, IOAPIC_ID, 0, IOAPIC_ADDRESS, 0))
    if irq0_override:  # ISA bus 0, IRQ0 (the PIT) -> GSI 2
        entries.append(
            struct.pack("<BBBBIH", MADT_INTERRUPT_OVERRIDE, 10, 0, 0, 2, MPS_INTI_CONFORMING)
        )
    # LINT1 is NMI on every processor (UID 0xff = all)
    entries.append(struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, 0xFF, MPS_INTI_CONFORMING, 1))
    body = struct.pack("<II", LAPIC_ADDRESS, MADT_FLAG_PCAT_COMPAT) + b"".join(entries)
    return sdt(b"APIC", MADT_REVISION, body)


def build_xsdt(table_addrs: Iterable[int]) -> bytes:
    """The XSDT: 64-bit addresses of the tables other than the DSDT (the FADT holds it)."""
    return sdt(b"XSDT", XSDT_REVISION, b"".join(struct.pack("<Q", a) for a in table_addrs))


def build_rsdp(xsdt_addr: int) -> bytes:
    """The 36-byte ACPI 2.0+ RSDP: both its 20-byte and its extended checksum set."""
    rsdp = bytearray(
        struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, OEM_ID, RSDP_REVISION, 0, 36, xsdt_addr, 0)
    )
    rsdp[8] = checksum(rsdp[:20])
    rsdp[32] = checksum(rsdp)
    return bytes(rsdp)


@dataclass(frozen=True)
class AcpiTables:
    """What the boot code needs: copy `blob` to `base_gpa`, put `rsdp_addr` in
    boot_params.acpi_rsdp_addr, and give [`reserve_start`, + `reserve_size`) the e820
    type `e820_type`."""

    blob: bytes
    base_gpa: int
    rsdp_addr: int
    tables: Mapping[str, int]  # signature ("RSD PTR ", "XSDT", "FACP", ...) -> GPA
    e820_type: int = E820_ACPI

    @property
    def reserve_start(self) -> int:
        return self.base_gpa

    @property
    def reserve_size(self) -> int:
        return len(self.blob)


def _align(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def build_acpi(
    base_gpa: int, vcpus: int, *, vmbus_irq: int = 5, irq0_override: bool = True
) -> AcpiTables:
    """All the tables in one page-aligned blob for guest RAM at `base_gpa`.

    Layout: RSDP at `base_gpa` (16-byte aligned since `base_gpa` is page aligned),
    then XSDT, FADT, MADT and DSDT, each 16-byte aligned; the blob is padded to whole
    pages.  `vmbus_irq` is the ISA IRQ in VMBS's _CRS (1-15, not the cascade IRQ 2).
    """
    if base_gpa % PAGE_SIZE:
        raise ValueError(f"ACPI base {base_gpa:#x} is not page aligned")
    if not 1 <= vmbus_irq <= 15 or vmbus_irq == 2:
        raise ValueError(f"VMBus IRQ must be an ISA IRQ 1-15 other than 2, not {vmbus_irq}")
    dsdt = build_dsdt(vmbus_irq)
    madt = build_madt(vcpus, irq0_override=irq0_override)
    xsdt_len = HEADER.size + 8 * 2  # FADT and MADT; lengths do not depend on addresses
    offsets: dict[str, int] = {}
    at = 0
    for sig, length in (
        ("RSD PTR ", RSDP_LENGTH),
        ("XSDT", xsdt_len),
        ("FACP", FADT_LENGTH),
        ("APIC", len(madt)),
        ("DSDT", len(dsdt)),
    ):
        offsets[sig] = at
        at = _align(at + length, TABLE_ALIGN)
    addr = {sig: base_gpa + off for sig, off in offsets.items()}
    if base_gpa + at > 1 << 64:
        raise ValueError(f"ACPI tables at {base_gpa:#x} run past the 64-bit space")
    parts = {
        "RSD PTR ": build_rsdp(addr["XSDT"]),
        "XSDT": build_xsdt([addr["FACP"], addr["APIC"]]),
        "FACP": build_fadt(addr["DSDT"]),
        "APIC": madt,
        "DSDT": dsdt,
    }
    if len(parts["XSDT"]) != xsdt_len:
        raise AssertionError("XSDT length changed")  # the layout above assumed it
    blob = bytearray(_align(at, PAGE_SIZE))
    for sig, data in parts.items():
        blob[offsets[sig] : offsets[sig] + len(data)] = data
    return AcpiTables(bytes(blob), base_gpa, addr["RSD PTR "], addr)
