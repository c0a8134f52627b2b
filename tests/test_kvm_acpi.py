"""vmbus.kvm.acpi: every table parsed back by a parser written here, not the encoder's.

Checked as Linux 6.1 reads them: the RSDP's two checksums and its XSDT pointer, every
table's header checksum and length, XSDT pointers landing on FACP and APIC, the FADT's
reduced-hardware flags and X_DSDT, the MADT's entries, and the DSDT's AML down to
VMBS's _HID and the IRQ in its _CRS.  Then ACPICA itself (acpica-tools: iasl's
disassembler, and acpiexec, the interpreter Linux runs) as a second opinion.
"""

from __future__ import annotations

import itertools
import re
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import require_tool
from hypothesis import given
from hypothesis import strategies as st

from vmbus.kvm import acpi

BASE = 0x000F_F000  # any page-aligned GPA; not 0 so that a missing base shows
PAGE = 4096


# --- an independent reader ------------------------------------------------------------


def sums_to_zero(data: bytes) -> bool:
    return sum(data) % 256 == 0


@dataclass
class Table:
    signature: str
    revision: int
    data: bytes  # the whole table, header included
    gpa: int

    @property
    def body(self) -> bytes:
        return self.data[36:]


class Guest:
    """Reads the blob as the guest would: by physical address, from the RSDP on."""

    def __init__(self, tables: acpi.AcpiTables) -> None:
        self.blob = tables.blob
        self.base = tables.base_gpa

    def read(self, gpa: int, size: int) -> bytes:
        off = gpa - self.base
        assert 0 <= off and off + size <= len(self.blob), f"{gpa:#x}+{size} outside the blob"
        return self.blob[off : off + size]

    def table(self, gpa: int) -> Table:
        sig, length, revision = struct.unpack("<4sIB", self.read(gpa, 9))
        assert length >= 36
        data = self.read(gpa, length)
        assert sums_to_zero(data), f"{sig!r} checksum"
        oem_id, oem_table, _, creator = struct.unpack_from("<6s8sI4s", data, 10)
        assert oem_id == b"VMBUSD"
        assert len(oem_table) == 8 and len(creator) == 4
        return Table(sig.decode("ascii"), revision, data, gpa)

    def rsdp(self, gpa: int) -> int:
        """Checks the RSDP, returns the XSDT's address."""
        raw = self.read(gpa, 36)
        sig, _, _, revision, rsdt, length, xsdt = struct.unpack_from("<8sB6sBIIQ", raw)
        assert sig == b"RSD PTR "
        assert sums_to_zero(raw[:20]), "RSDP 20-byte checksum"
        assert revision == 2 and length == 36
        assert sums_to_zero(raw[:length]), "RSDP extended checksum"
        assert raw[33:36] == b"\0\0\0"
        assert rsdt == 0  # Linux uses the XSDT with revision 2; no RSDT at all
        return int(xsdt)

    def xsdt_entries(self, xsdt: Table) -> list[int]:
        assert xsdt.signature == "XSDT"
        assert len(xsdt.body) % 8 == 0
        return [a for (a,) in struct.iter_unpack("<Q", xsdt.body)]


def walk(tables: acpi.AcpiTables) -> dict[str, Table]:
    g = Guest(tables)
    xsdt = g.table(g.rsdp(tables.rsdp_addr))
    found = {"XSDT": xsdt}
    for addr in g.xsdt_entries(xsdt):
        t = g.table(addr)
        assert t.signature not in found
        found[t.signature] = t
    fadt = found["FACP"]
    (x_dsdt,) = struct.unpack_from("<Q", fadt.data, 140)
    found["DSDT"] = g.table(x_dsdt)
    return found


# --- an independent AML reader (just the opcodes a DSDT of names and devices needs) ---


def decode_pkg_length(data: bytes, at: int) -> tuple[int, int]:
    """(value, bytes used) of the PkgLength at data[at]."""
    lead = data[at]
    follow = lead >> 6
    if follow == 0:
        return lead & 0x3F, 1
    assert lead & 0x30 == 0, "PkgLength reserved bits"
    value = lead & 0x0F
    for i in range(follow):
        value |= data[at + 1 + i] << (4 + 8 * i)
    return value, 1 + follow


def read_name(data: bytes, at: int) -> tuple[str, int]:
    prefix = ""
    while data[at] in b"\\^":
        prefix += chr(data[at])
        at += 1
    if data[at] == 0x00:
        return prefix, at + 1
    if data[at] == 0x2E:
        count, at = 2, at + 1
    elif data[at] == 0x2F:
        count, at = data[at + 1], at + 2
    else:
        count = 1
    segs = [data[at + 4 * i : at + 4 * i + 4].decode("ascii") for i in range(count)]
    for s in segs:
        assert re.fullmatch(r"[A-Z_][A-Z0-9_]{3}", s), s
    return prefix + ".".join(segs), at + 4 * count


Value = int | str | bytes


def read_data(data: bytes, at: int) -> tuple[Value, int]:
    op = data[at]
    if op == 0x00:
        return 0, at + 1
    if op == 0x01:
        return 1, at + 1
    if op == 0xFF:
        return 2**64 - 1, at + 1
    sizes = {0x0A: 1, 0x0B: 2, 0x0C: 4, 0x0E: 8}
    if op in sizes:
        n = sizes[op]
        return int.from_bytes(data[at + 1 : at + 1 + n], "little"), at + 1 + n
    if op == 0x0D:
        end = data.index(0, at + 1)
        return data[at + 1 : end].decode("ascii"), end + 1
    if op == 0x11:
        length, used = decode_pkg_length(data, at + 1)
        end = at + 1 + length
        size, inner = read_data(data, at + 1 + used)
        assert isinstance(size, int)
        content = data[inner:end]
        assert len(content) == size, "Buffer size vs its package"
        return content, end
    raise AssertionError(f"unexpected data opcode {op:#x} at {at}")


@dataclass
class Node:
    kind: str  # "scope" or "device"
    names: dict[str, Value] = field(default_factory=dict)
    children: dict[str, Node] = field(default_factory=dict)


def read_terms(data: bytes, at: int, end: int, node: Node) -> None:
    while at < end:
        op = data[at]
        if op == 0x08:  # Name
            n, at = read_name(data, at + 1)
            node.names[n], at = read_data(data, at)
        elif op == 0x10 or data[at : at + 2] == b"\x5b\x82":  # Scope, Device
            kind, start = ("scope", at + 1) if op == 0x10 else ("device", at + 2)
            length, used = decode_pkg_length(data, start)
            n, body = read_name(data, start + used)
            child = node.children.setdefault(n.lstrip("\\"), Node(kind))
            read_terms(data, body, start + length, child)
            at = start + length
        else:
            raise AssertionError(f"unexpected AML opcode {op:#x} at {at}")
    assert at == end, "a package ran past its PkgLength"


def namespace(dsdt: Table) -> Node:
    root = Node("scope")
    read_terms(dsdt.data, 36, len(dsdt.data), root)
    return root


def resources(template: bytes) -> list[tuple[int, bytes]]:
    """(item name, data) of each resource descriptor; checks the End Tag's checksum."""
    out = []
    at = 0
    while True:
        tag = template[at]
        if tag & 0x80:
            (length,) = struct.unpack_from("<H", template, at + 1)
            item, data, at = tag, template[at + 3 : at + 3 + length], at + 3 + length
        else:
            length = tag & 7
            item, data, at = (tag >> 3) & 0x0F, template[at + 1 : at + 1 + length], at + 1 + length
        out.append((item, data))
        if item == 0x0F:  # End Tag
            assert at == len(template), "bytes after the End Tag"
            assert data[0] == 0 or sums_to_zero(template), "End Tag checksum"
            return out


def vmbs(tables: acpi.AcpiTables) -> Node:
    return namespace(walk(tables)["DSDT"]).children["_SB_"].children["VMOD"].children["VMBS"]


# --- the tables -----------------------------------------------------------------------


@pytest.mark.parametrize("vcpus", [1, 2, 7, 64, acpi.MAX_VCPUS])
def test_every_table_found_from_the_rsdp(vcpus: int) -> None:
    t = acpi.build_acpi(BASE, vcpus)
    assert t.base_gpa == BASE and t.reserve_start == BASE
    assert len(t.blob) % PAGE == 0 and t.reserve_size == len(t.blob)
    assert t.rsdp_addr % 16 == 0
    assert t.e820_type == 3  # ACPI tables: Linux keeps it busy and never reclaims it
    found = walk(t)
    assert sorted(found) == ["APIC", "DSDT", "FACP", "XSDT"]
    assert {s: tab.gpa for s, tab in found.items()} == {s: t.tables[s] for s in found}
    spans = sorted((t.tables[s] - BASE, len(found[s].data)) for s in found)
    spans.append((t.rsdp_addr - BASE, 36))
    spans.sort()
    for (a, alen), (b, _) in itertools.pairwise(spans):
        assert a + alen <= b, "tables overlap"


def test_fadt_is_hardware_reduced_with_x_dsdt_only() -> None:
    t = acpi.build_acpi(BASE, 1)
    found = walk(t)
    fadt = found["FACP"].data
    assert len(fadt) == 276 and found["FACP"].revision == 6
    facs, dsdt32 = struct.unpack_from("<II", fadt, 36)
    (sci,) = struct.unpack_from("<H", fadt, 46)
    (boot_arch,) = struct.unpack_from("<H", fadt, 109)
    (flags,) = struct.unpack_from("<I", fadt, 112)
    minor = fadt[131]
    x_facs, x_dsdt = struct.unpack_from("<QQ", fadt, 132)
    assert facs == 0 and x_facs == 0  # hardware-reduced: no FACS
    assert dsdt32 == 0 and x_dsdt == t.tables["DSDT"]
    assert flags & (1 << 20), "HW_REDUCED_ACPI"
    assert flags & (1 << 4) and flags & (1 << 5), "no fixed power/sleep buttons"
    assert boot_arch & (1 << 2), "no VGA"
    assert boot_arch & (1 << 5), "no CMOS RTC"
    assert not boot_arch & (1 << 1), "no 8042"
    assert minor == 3
    # SCI_INT is ignored in reduced mode, but Linux would read an override of that IRQ
    # as the SCI's: it must not be the source of any override in the MADT
    assert sci not in {src for src, _, _ in madt_entries(found["APIC"])["override"]}
    # all the fixed-hardware register blocks are absent
    assert fadt[48:108] == bytes(60) and fadt[148:244] == bytes(96)


def madt_entries(madt: Table) -> dict[str, list[tuple[int, int, int]]]:
    out: dict[str, list[tuple[int, int, int]]] = {
        "lapic": [],
        "ioapic": [],
        "override": [],
        "nmi": [],
    }
    at = 44
    while at < len(madt.data):
        kind, length = madt.data[at], madt.data[at + 1]
        assert length >= 2 and at + length <= len(madt.data)
        e = madt.data[at : at + length]
        if kind == 0:
            assert length == 8
            uid, apic_id, flags = struct.unpack_from("<BBI", e, 2)
            out["lapic"].append((uid, apic_id, flags))
        elif kind == 1:
            assert length == 12
            ioapic_id, _, addr, gsi_base = struct.unpack_from("<BBII", e, 2)
            out["ioapic"].append((ioapic_id, addr, gsi_base))
        elif kind == 2:
            assert length == 10
            bus, src, gsi, flags = struct.unpack_from("<BBIH", e, 2)
            assert bus == 0
            out["override"].append((src, gsi, flags))
        elif kind == 4:
            assert length == 6
            uid, flags, lint = struct.unpack_from("<BHB", e, 2)
            out["nmi"].append((uid, flags, lint))
        else:
            raise AssertionError(f"unexpected MADT entry type {kind}")
        at += length
    assert at == len(madt.data)
    return out


@pytest.mark.parametrize("vcpus", [1, 4, acpi.MAX_VCPUS])
def test_madt_one_enabled_lapic_per_vcpu_and_the_ioapic(vcpus: int) -> None:
    madt = walk(acpi.build_acpi(BASE, vcpus))["APIC"]
    lapic_addr, flags = struct.unpack_from("<II", madt.data, 36)
    assert lapic_addr == 0xFEE0_0000
    assert flags & 1  # PCAT_COMPAT: KVM's in-kernel irqchip has the 8259s
    e = madt_entries(madt)
    assert [(uid, apic) for uid, apic, _ in e["lapic"]] == [(i, i) for i in range(vcpus)]
    assert all(f & 1 for _, _, f in e["lapic"]), "every LAPIC enabled"
    assert 0xFF not in {apic for _, apic, _ in e["lapic"]}
    assert e["ioapic"] == [(0, 0xFEC0_0000, 0)]
    assert e["override"] == [(0, 2, 0)]  # IRQ0 -> GSI2, bus-conforming
    assert e["nmi"] == [(0xFF, 0, 1)]  # LINT1 on every CPU


def test_madt_without_the_irq0_override() -> None:
    madt = walk(acpi.build_acpi(BASE, 2, irq0_override=False))["APIC"]
    assert madt_entries(madt)["override"] == []


@pytest.mark.parametrize("irq", [5, 1, 7, 15])
def test_dsdt_holds_vmbs_with_its_hid_and_irq(irq: int) -> None:
    t = acpi.build_acpi(BASE, 1, vmbus_irq=irq)
    dsdt = walk(t)["DSDT"]
    assert dsdt.revision >= 2  # 64-bit AML integers
    sb = namespace(dsdt).children["_SB_"]
    assert sb.kind == "scope"
    vmod = sb.children["VMOD"]
    assert vmod.kind == "device" and vmod.names["_HID"] == "ACPI0004"
    dev = vmod.children["VMBS"]
    assert dev.kind == "device"
    assert dev.names["_HID"] == "VMBus"
    assert dev.names["_UID"] == 0
    crs = dev.names["_CRS"]
    assert isinstance(crs, bytes)
    items = resources(crs)
    assert [k for k, _ in items] == [0x04, 0x0F]  # IRQ, End Tag
    irq_data = items[0][1]
    mask, flags = struct.unpack("<HB", irq_data)
    assert mask == 1 << irq
    assert flags == 0x01  # edge, active-high, exclusive: the ISA default
    assert items[1][1][0] != 0 and sums_to_zero(crs), "a real End Tag checksum"


def test_end_tag_checksum_covers_the_template() -> None:
    crs = vmbs(acpi.build_acpi(BASE, 1)).names["_CRS"]
    assert isinstance(crs, bytes)
    broken = bytearray(crs)
    broken[1] ^= 0x01
    with pytest.raises(AssertionError, match="End Tag checksum"):
        resources(bytes(broken))


def test_the_reader_catches_a_broken_checksum() -> None:
    """The parser above is what the other tests trust: one flipped bit must fail it."""
    t = acpi.build_acpi(BASE, 2)
    for sig in ("XSDT", "FACP", "APIC", "DSDT"):
        blob = bytearray(t.blob)
        blob[t.tables[sig] - BASE + 20] ^= 0x40
        with pytest.raises(AssertionError, match="checksum"):
            walk(acpi.AcpiTables(bytes(blob), BASE, t.rsdp_addr, t.tables))
    for at, what in ((9, "20-byte"), (24, "extended")):
        blob = bytearray(t.blob)
        blob[t.rsdp_addr - BASE + at] ^= 0x40
        with pytest.raises(AssertionError, match=what):
            walk(acpi.AcpiTables(bytes(blob), BASE, t.rsdp_addr, t.tables))


def test_tables_move_with_the_base() -> None:
    high = 0x1_0000_0000 - 0x10_0000  # just under 4 GiB
    a, b = acpi.build_acpi(BASE, 3), acpi.build_acpi(high, 3)
    assert {s: v - BASE for s, v in a.tables.items()} == {s: v - high for s, v in b.tables.items()}
    assert walk(b)["DSDT"].data == walk(a)["DSDT"].data
    above = acpi.build_acpi(0x10_0000_0000, 1)  # above 4 GiB: only 64-bit pointers
    assert walk(above)["FACP"].data[140:148] == struct.pack("<Q", above.tables["DSDT"])


@pytest.mark.parametrize(
    ("base", "vcpus", "irq"),
    [(BASE + 16, 1, 5), (BASE, 0, 5), (BASE, 256, 5), (BASE, 1, 0), (BASE, 1, 2), (BASE, 1, 16)],
)
def test_bad_arguments_refused(base: int, vcpus: int, irq: int) -> None:
    with pytest.raises(ValueError):
        acpi.build_acpi(base, vcpus, vmbus_irq=irq)


# --- the AML encoder's pieces ---------------------------------------------------------

BOUNDARIES = [0, 1, 62, 63, 64, 65, 4093, 4094, 4095, 4096, 4097, 1 << 20, (1 << 20) - 1]
BOUNDARIES += [(1 << 20) - 3, (1 << 20) + 1, acpi.PKG_LENGTH_MAX - 4, acpi.PKG_LENGTH_MAX]
values = st.one_of(
    st.sampled_from(BOUNDARIES),
    st.sampled_from(BOUNDARIES).flatmap(lambda b: st.integers(max(0, b - 5), b + 5)),
    st.integers(0, acpi.PKG_LENGTH_MAX),
).filter(lambda v: v <= acpi.PKG_LENGTH_MAX)


def shortest_size(value: int) -> int:
    return 1 if value < 64 else 2 if value < 1 << 12 else 3 if value < 1 << 20 else 4


@given(values)
def test_pkg_length_round_trip(value: int) -> None:
    enc = acpi.encode_pkg_length(value)
    assert decode_pkg_length(enc + b"\xaa\xaa\xaa", 0) == (value, len(enc))
    assert len(enc) == shortest_size(value)


body_sizes = st.one_of(
    st.sampled_from([0, 61, 62, 63, 64, 4092, 4093, 4094, 4095, 4096, (1 << 20) - 3]),
    st.integers(0, (1 << 20) + 8),
)


@given(body_sizes)
def test_pkg_covers_itself_and_its_body(size: int) -> None:
    """PkgLength counts its own bytes: the value is the whole encoding's length."""
    out = acpi.pkg(b"\x5a" * size)
    value, used = decode_pkg_length(out, 0)
    assert value == len(out) == used + size
    assert used == shortest_size(value)


def test_pkg_length_out_of_range() -> None:
    with pytest.raises(ValueError):
        acpi.encode_pkg_length(acpi.PKG_LENGTH_MAX + 1)
    with pytest.raises(ValueError):
        acpi.encode_pkg_length(-1)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("VMBS", b"VMBS"),
        ("_SB", b"_SB_"),
        ("\\_SB", b"\\_SB_"),
        ("\\_SB.VMOD", b"\\\x2e_SB_VMOD"),
        ("\\_SB.VMOD.VMBS", b"\\\x2f\x03_SB_VMODVMBS"),
        ("^^X1", b"^^X1__"),
        ("\\", b"\\\x00"),
    ],
)
def test_name_strings(path: str, expected: bytes) -> None:
    assert acpi.name_string(path) == expected
    assert read_name(expected, 0)[1] == len(expected)


@pytest.mark.parametrize("bad", ["", "vmbs", "1ABC", "ABCDE", "A.B-", "\\_SB..X"])
def test_bad_names_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        acpi.name_string(bad)


@given(st.integers(0, 2**64 - 1))
def test_integers_round_trip_in_the_shortest_form(value: int) -> None:
    enc = acpi.integer(value)
    assert read_data(enc, 0) == (value, len(enc))
    want = 1 if value <= 1 else 2 if value < 1 << 8 else 3 if value < 1 << 16 else 5
    if value >= 1 << 32:
        want = 9
    assert len(enc) == want


@given(st.text(st.characters(min_codepoint=1, max_codepoint=0x7F), max_size=80))
def test_strings_round_trip(text: str) -> None:
    enc = acpi.string(text)
    assert read_data(enc, 0) == (text, len(enc))


@given(st.binary(max_size=300))
def test_buffers_round_trip(data: bytes) -> None:
    enc = acpi.buffer(data)
    assert read_data(enc, 0) == (data, len(enc))


# --- ACPICA's opinion -----------------------------------------------------------------


def dump_tables(t: acpi.AcpiTables, where: Path) -> dict[str, Path]:
    found = walk(t)
    paths = {}
    for sig, table in found.items():
        paths[sig] = where / f"{sig.lower()}.dat"
        paths[sig].write_bytes(table.data)
    return paths


def test_iasl_disassembles_every_table_cleanly(tmp_path: Path) -> None:
    iasl = require_tool("iasl", "acpica-tools")
    paths = dump_tables(acpi.build_acpi(BASE, 4), tmp_path)
    for sig, path in paths.items():
        proc = subprocess.run(
            [iasl, "-d", path.name], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        dsl = path.with_suffix(".dsl").read_text()
        report = proc.stdout + proc.stderr + dsl
        assert proc.returncode == 0, report
        assert not re.search(r"incorrect checksum|error|warning", report, re.I), (sig, report)
        assert f'"{sig}"' in dsl
    dsdt = paths["DSDT"].with_suffix(".dsl").read_text()
    assert re.search(r"Device \(VMOD\)\s*\{\s*Name \(_HID, \"ACPI0004\"", dsdt), dsdt
    assert 'Name (_HID, "VMBus")' in dsdt
    assert re.search(r"IRQ \(Edge, ActiveHigh, Exclusive, \)\s*\{5\}", dsdt), dsdt
    fadt = paths["FACP"].with_suffix(".dsl").read_text()
    assert re.search(r"Hardware Reduced \(V5\) : 1", fadt), fadt
    madt = paths["APIC"].with_suffix(".dsl").read_text()
    assert madt.count("[Processor Local APIC]") == 4


def test_iasl_would_see_a_bad_checksum(tmp_path: Path) -> None:
    """So that the clean disassembly above means something."""
    iasl = require_tool("iasl", "acpica-tools")
    path = dump_tables(acpi.build_acpi(BASE, 1), tmp_path)["APIC"]
    data = bytearray(path.read_bytes())
    data[9] ^= 1
    path.write_bytes(data)
    subprocess.run([iasl, "-d", path.name], cwd=tmp_path, capture_output=True, timeout=60)
    assert "Incorrect checksum" in path.with_suffix(".dsl").read_text()


def test_acpica_interpreter_evaluates_vmbs(tmp_path: Path) -> None:
    """acpiexec runs ACPICA, the interpreter Linux uses, over our FADT, MADT and DSDT:
    it must take the FADT as hardware-reduced (no GPE blocks), and evaluating VMBS
    must give Linux's id (ACPICA upper-cases _HID: "VMBUS", which vmbus_drv.c lists)
    and IRQ 5 from _CRS."""
    acpiexec = require_tool("acpiexec", "acpica-tools")
    paths = dump_tables(acpi.build_acpi(BASE, 2), tmp_path)
    commands = "; ".join(
        [
            r"evaluate \_SB.VMOD._HID",
            r"evaluate \_SB.VMOD.VMBS._HID",
            r"evaluate \_SB.VMOD.VMBS._UID",
            r"resources \_SB.VMOD.VMBS",
        ]
    )
    tables = [paths[s].name for s in ("FACP", "APIC", "DSDT")]
    proc = subprocess.run(
        [acpiexec, "-b", commands, *tables],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "1 ACPI AML tables successfully acquired and loaded" in out, out
    assert "GPE" not in out, out  # reduced hardware: ACPICA sets up no GPE blocks
    assert '[String] Length 08 = "ACPI0004"' in out, out
    assert '[String] Length 05 = "VMBUS"' in out, out
    assert "[Integer] = 0000000000000000" in out, out
    assert re.search(r"IRQ Resource.*?Triggering : Edge.*?Polarity : ActiveHigh", out, re.S)
    assert re.search(r"Interrupt List : 5\b", out), out
    assert not re.search(r"\bAE_(?!NOT_FOUND)[A-Z_]+", out), out  # _SRS is absent: fine
