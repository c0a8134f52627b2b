"""The typed packet layer (vmbus/packet.py, native/packet.c).

Layouts are checked against bytes built by hand from the spec (§2.3-2.5) and
Linux's struct definitions (include/linux/hyperv.h: vmpacket_descriptor,
vmtransfer_page_packet_header, vmbus_channel_packet_multipage_buffer /
gpa_range), after a trip through a real ring. Every GPA-direct rule of spec §8.1
and §8.2 has a case that breaks it, run against the single-packet parser and both
batch decoders; hypothesis then compares the C decoder with its twin record for
record on random valid and hostile batches, and runs the fuzz target.
"""

from __future__ import annotations

import array
import importlib.util
import mmap
import os
import pathlib
import struct
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmbus import native as native_sel
from vmbus.gpadl import PAGE_SIZE, GpaRange
from vmbus.memory import GuestMemory, GuestMemoryError
from vmbus.packet import (
    GpaDirect,
    GpaDirectDecoder,
    GpaStatus,
    PacketError,
    PacketFlags,
    PacketType,
    XferRange,
    completion,
    completion_for,
    expect_type,
    gpa_direct,
    inband,
    packet_types_mask,
    parse_completion,
    parse_gpa_direct,
    parse_xfer_pages,
    wants_completion,
    xfer_pages,
)
from vmbus.ring import (
    DEFAULT_ALLOWED_TYPES,
    FLAG_COMPLETION_REQUESTED,
    VM_PKT_COMP,
    VM_PKT_DATA_INBAND,
    VM_PKT_DATA_USING_GPA_DIRECT,
    VM_PKT_DATA_USING_XFER_PAGES,
    OutPacket,
    Packet,
    PyRingReader,
    PyRingWriter,
    PySendBatch,
    init_ring_header,
    iter_packets,
)

HERE = pathlib.Path(__file__).resolve().parent


def _load_fuzz() -> Any:
    spec = importlib.util.spec_from_file_location("fuzz_packet", HERE / "fuzz" / "fuzz_packet.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


fuzz = _load_fuzz()


NATIVE = pytest.mark.native  # fails, never skips, without the extension (conftest.py)
DECODERS = [pytest.param(False, id="twin"), pytest.param(True, id="native", marks=NATIVE)]

# Guest RAM: region A, 32 pages at 1 MiB; region B, 8 pages at 4 GiB; a gap between.
A_GPA, A_PAGES = 0x100000, 32
B_GPA, B_PAGES = 1 << 32, 8
A_PFN, B_PFN = A_GPA // PAGE_SIZE, B_GPA // PAGE_SIZE
OUTSIDE = (A_PFN - 1, A_PFN + A_PAGES, B_PFN - 1, B_PFN + B_PAGES, 1 << 40, (1 << 64) - 1)
DESC = struct.Struct("<HHHHQ")


def page_pattern(pfn: int) -> bytes:
    """What guest page pfn holds: its PFN repeated, so a wrong page is obvious."""
    return struct.pack("<Q", pfn) * (PAGE_SIZE // 8)


class Ram:
    """Guest RAM in sealed memfds; the guest's own access to it is pread/pwrite."""

    def __init__(self, native: bool) -> None:
        self.fds = {}
        self.memory = GuestMemory(native=native)
        for gpa, pages in ((A_GPA, A_PAGES), (B_GPA, B_PAGES)):
            fd = fuzz.sealed_ram_fd(pages)
            base = gpa // PAGE_SIZE
            os.pwrite(fd, b"".join(page_pattern(base + i) for i in range(pages)), 0)
            self.memory.add_region(gpa, pages * PAGE_SIZE, fd)
            self.fds[gpa] = fd

    def pread(self, pfn: int, offset: int, n: int) -> bytes:
        gpa = pfn * PAGE_SIZE
        base = A_GPA if gpa < B_GPA else B_GPA
        return os.pread(self.fds[base], n, gpa - base + offset)

    def expected(self, ranges: Sequence[GpaRange]) -> bytes:
        """The bytes a GPA-direct buffer covers, read the guest's way."""
        out = []
        for r in ranges:
            data = b"".join(self.pread(p, 0, PAGE_SIZE) for p in r.pfns)
            out.append(data[r.byte_offset : r.byte_offset + r.byte_count])
        return b"".join(out)

    def close(self) -> None:
        self.memory.close()
        for fd in self.fds.values():
            os.close(fd)


@pytest.fixture(params=[False, pytest.param(True, marks=NATIVE)], ids=["py-mem", "native-mem"])
def ram(request: pytest.FixtureRequest) -> Iterator[Ram]:
    r = Ram(request.param)
    yield r
    r.close()


# --- packets by hand and through a ring ---------------------------------------------


def raw_packet(
    typ: int, ext: bytes, payload: bytes = b"", *, flags: int = 0, trans_id: int = 0
) -> bytes:
    """A packet as ring read() copies it out: descriptor, extension, padded payload."""
    assert len(ext) % 8 == 0
    off8 = 2 + len(ext) // 8
    len8 = off8 + (len(payload) + 7) // 8
    pad = bytes(8 * len8 - 16 - len(ext) - len(payload))
    return DESC.pack(typ, off8, len8, flags, trans_id) + ext + payload + pad


def batch_of(raws: Sequence[bytes]) -> tuple[mmap.mmap, array.array[int], int]:
    """Packets back to back in a private-copy-like mapping, with read()'s index."""
    buf = mmap.mmap(-1, max(PAGE_SIZE, sum(len(r) for r in raws)))
    index = array.array("I")
    pos = 0
    for r in raws:
        buf[pos : pos + len(r)] = r
        index.extend((pos, len(r)))
        pos += len(r)
    return buf, index, len(raws)


def packets(raws: Sequence[bytes]) -> list[Packet]:
    buf, index, n = batch_of(raws)
    return list(iter_packets(buf, index, n))


def through_ring(out: Sequence[OutPacket], size: int = 1 << 16) -> list[bytes]:
    """Write packets with the ring writer and read them back with the ring reader
    (which validates every descriptor): the bytes each packet is on the wire."""
    hdr, data = bytearray(PAGE_SIZE), bytearray(size)
    init_ring_header(hdr)
    hv, dv = memoryview(hdr), memoryview(data)
    writer, reader = PyRingWriter(hv, dv, size), PyRingReader(hv, dv, size)
    writer.open()
    reader.open()
    assert writer.write(PySendBatch(out)).npkts == len(out)
    copy, index = bytearray(size), array.array("I", bytes(8 * len(out)))
    res = reader.read(copy, index, len(out))
    assert res.error is None and res.npkts == len(out)
    return [bytes(copy[index[2 * i] : index[2 * i] + index[2 * i + 1]]) for i in range(len(out))]


def gpa_ext(ranges: Sequence[tuple[int, int, Sequence[int]]], count: int | None = None) -> bytes:
    """A GPA-direct extension by hand: reserved, range_cnt, then each gpa_range."""
    parts = [struct.pack("<II", 0xDEADBEEF, len(ranges) if count is None else count)]
    for byte_count, byte_offset, pfns in ranges:
        parts.append(struct.pack(f"<II{len(pfns)}Q", byte_count, byte_offset, *pfns))
    return b"".join(parts)


# --- constants and builders ---------------------------------------------------------


def test_packet_types_are_the_spec_values_and_the_ring_constants() -> None:
    assert [int(t) for t in PacketType] == list(range(0xE))
    assert PacketType.INBAND == VM_PKT_DATA_INBAND == 6
    assert PacketType.XFER_PAGES == VM_PKT_DATA_USING_XFER_PAGES == 7
    assert PacketType.GPA_DIRECT == VM_PKT_DATA_USING_GPA_DIRECT == 9
    assert PacketType.COMPLETION == VM_PKT_COMP == 0xB
    assert PacketFlags.COMPLETION_REQUESTED == FLAG_COMPLETION_REQUESTED == 1


def test_packet_types_mask() -> None:
    assert packet_types_mask() == 0
    assert packet_types_mask(PacketType.INBAND) == 1 << 6
    assert packet_types_mask(PacketType.INBAND, PacketType.GPA_DIRECT, 0xB) == 0xA40
    assert (
        packet_types_mask(
            PacketType.INBAND, PacketType.XFER_PAGES, PacketType.GPA_DIRECT, PacketType.COMPLETION
        )
        == DEFAULT_ALLOWED_TYPES
    )
    for bad in (-1, 32, "6", 6.0):
        with pytest.raises(ValueError):
            packet_types_mask(bad)  # type: ignore[arg-type]


def test_packet_error_is_a_plain_exception_with_a_reason() -> None:
    err = PacketError("range count 0")
    assert type(err).__mro__[1] is Exception
    assert err.reason == "range count 0" and str(err) == "range count 0"
    assert err.status is None and err.range_index is None


def test_inband_and_completion_on_the_wire() -> None:
    wire = through_ring(
        [
            inband(b"abc", b"de", trans_id=7, completion_requested=True),
            inband(b"12345678"),
            completion(7, b"ok"),
            completion(8),
        ]
    )
    assert wire[0] == DESC.pack(6, 2, 3, 1, 7) + b"abcde" + bytes(3)
    assert wire[1] == DESC.pack(6, 2, 3, 0, 0) + b"12345678"
    assert wire[2] == DESC.pack(0xB, 2, 3, 0, 7) + b"ok" + bytes(6)
    assert wire[3] == DESC.pack(0xB, 2, 2, 0, 8)
    req, plain, comp, empty = packets(wire)
    assert wants_completion(req) and not wants_completion(plain)
    assert completion_for(req, b"x") == OutPacket(0xB, 0, 7, (b"x",))
    assert parse_completion(comp).trans_id == 7
    assert bytes(parse_completion(comp).payload) == b"ok" + bytes(6)  # padded to 8
    assert parse_completion(empty).payload.nbytes == 0
    with pytest.raises(PacketError, match="INBAND, expected COMPLETION"):
        parse_completion(req)


def test_expect_type_names_unknown_types() -> None:
    (pkt,) = packets([raw_packet(0x1F, b"")])
    with pytest.raises(PacketError, match="0x1f"):
        expect_type(pkt, PacketType.INBAND)
    expect_type(pkt, 0x1F, PacketType.INBAND)


def test_xfer_pages_layout_is_vmtransfer_page_packet_header() -> None:
    nvsp = bytes(range(1, 13))
    (wire,) = through_ring(
        [xfer_pages(0xCAFE, [(1500, 0), (60, 0x1000)], nvsp, trans_id=9, sender_owns_set=True)]
    )
    # desc; xfer_pageset_id u16, sender_owns_set u8, reserved u8, range_cnt u32; ranges
    ext = struct.pack("<HBBI", 0xCAFE, 1, 0, 2) + struct.pack("<IIII", 1500, 0, 60, 0x1000)
    off8 = (16 + len(ext)) // 8
    assert off8 == 5
    assert wire == DESC.pack(7, off8, off8 + 2, 1, 9) + ext + nvsp + bytes(4)
    (pkt,) = packets([wire])
    x = parse_xfer_pages(pkt)
    assert (x.set_id, x.sender_owns_set) == (0xCAFE, 1)
    assert x.ranges == (XferRange(1500, 0), XferRange(60, 0x1000))
    assert bytes(pkt.payload) == nvsp + bytes(4)
    (wire,) = through_ring([xfer_pages(1, [], completion_requested=False)])
    assert wire == DESC.pack(7, 3, 3, 0, 0) + struct.pack("<HBBI", 1, 0, 0, 0)


def test_xfer_pages_builder_refuses_what_does_not_fit_the_layout() -> None:
    with pytest.raises(ValueError):
        xfer_pages(0x10000, [])
    with pytest.raises(ValueError):
        xfer_pages(1, [(1 << 32, 0)])
    with pytest.raises(ValueError):
        xfer_pages(1, [(1, -1)])


def test_parse_xfer_pages_checks_the_range_area() -> None:
    hdr = struct.pack("<HBBI", 3, 0, 0xFF, 2)
    fits = hdr + struct.pack("<IIII", 10, 0, 20, 100)
    short, over, huge, no_hdr, wrong = packets(
        [
            raw_packet(7, fits),
            raw_packet(7, hdr + struct.pack("<II", 10, 0)),  # 2 declared, room for 1
            raw_packet(7, struct.pack("<HBBI", 3, 0, 0, 0xFFFFFFFF) + bytes(64)),
            raw_packet(7, b""),  # offset8 2: no header at all
            raw_packet(6, fits),
        ]
    )
    assert parse_xfer_pages(short).ranges == (XferRange(10, 0), XferRange(20, 100))
    for pkt, msg in (
        (over, "2 ranges do not fit"),
        (huge, "4294967295 ranges"),
        (no_hdr, "shorter than its header"),
        (wrong, "INBAND"),
    ):
        with pytest.raises(PacketError, match=msg):
            parse_xfer_pages(pkt)


def test_xfer_pages_views_stay_inside_the_transfer_page_set() -> None:
    recv = bytearray(range(256)) * 4  # a 1 KiB "receive buffer"
    ok, bad_end, bad_wrap = packets(
        [
            raw_packet(7, struct.pack("<HBBIIIII", 1, 0, 0, 2, 4, 1020, 16, 0)),
            raw_packet(7, struct.pack("<HBBIII", 1, 0, 0, 1, 5, 1020)),
            raw_packet(7, struct.pack("<HBBIII", 1, 0, 0, 1, 0xFFFFFFFF, 2)),
        ]
    )
    views = parse_xfer_pages(ok).views(recv)
    assert [bytes(v) for v in views] == [bytes(recv[1020:1024]), bytes(recv[0:16])]
    for pkt in (bad_end, bad_wrap):
        with pytest.raises(PacketError, match="leaves the 0x400-byte transfer page set 1"):
            parse_xfer_pages(pkt).views(recv)


def test_gpa_direct_layout_is_linux_multipage_buffer() -> None:
    srb = bytes(range(40))
    pfns = (A_PFN + 1, A_PFN + 2, A_PFN + 3)
    (wire,) = through_ring(
        [gpa_direct([GpaRange(3 * PAGE_SIZE - 100, 100, pfns)], srb, trans_id=5)]
    )
    # struct vmbus_channel_packet_multipage_buffer with pfncount 3: descsize =
    # 16 + reserved 4 + rangecount 4 + len 4 + offset 4 + 3 PFNs = 56, dataoffset8 7.
    ext = struct.pack("<IIII3Q", 0, 1, 3 * PAGE_SIZE - 100, 100, *pfns)
    assert wire == DESC.pack(9, 7, 12, 1, 5) + ext + srb
    # Linux's page-buffer form: one single-PFN gpa_range per page (16 bytes each).
    pb = [GpaRange(1000, 3000, (A_PFN,)), GpaRange(PAGE_SIZE, 0, (B_PFN,))]
    (wire,) = through_ring([gpa_direct(pb, b"rndis", trans_id=6, completion_requested=False)])
    ext = struct.pack("<IIIIQIIQ", 0, 2, 1000, 3000, A_PFN, PAGE_SIZE, 0, B_PFN)
    assert wire == DESC.pack(9, 7, 8, 0, 6) + ext + b"rndis" + bytes(3)


def test_gpa_direct_builder_refuses_inconsistent_ranges() -> None:
    for ranges in (
        [],
        [GpaRange(0, 0, (1,))],
        [GpaRange(1, PAGE_SIZE, (1,))],
        [GpaRange(PAGE_SIZE + 1, 0, (1,))],
        [GpaRange(10, 0, (1, 2))],
        [GpaRange(0xFFFFFFFF, 1, (1,))],
    ):
        with pytest.raises(ValueError):
            gpa_direct(ranges)


# --- GPA direct: parsing valid packets ----------------------------------------------


def test_parse_gpa_direct_gives_ranges_and_zero_copy_iovecs(ram: Ram) -> None:
    ranges = [
        GpaRange(2 * PAGE_SIZE + 50, 4000, (A_PFN + 5, A_PFN + 6, A_PFN + 9)),
        GpaRange(1, 4095, (B_PFN + 7,)),
        GpaRange(PAGE_SIZE, 0, (A_PFN + 31,)),
    ]
    (wire,) = through_ring([gpa_direct(ranges, b"srb", trans_id=1)])
    (pkt,) = packets([wire])
    got = parse_gpa_direct(pkt, ram.memory)
    assert got == GpaDirect(tuple(ranges), 2 * PAGE_SIZE + 50 + 1 + PAGE_SIZE)
    assert [list(r.pfns) for r in got.ranges] == [list(r.pfns) for r in ranges]
    views = got.iovecs(ram.memory)
    assert b"".join(views) == ram.expected(ranges)
    # Zero copy: a write through the view is in guest RAM at once.
    views[-1][:4] = b"host"
    assert ram.pread(A_PFN + 31, 0, 4) == b"host"
    del views


def test_parse_gpa_direct_takes_a_predicate_for_ram() -> None:
    (pkt,) = packets([raw_packet(9, gpa_ext([(10, 0, (1,)), (10, 0, (2,))]))])
    seen = []

    def contains(gpa: int, length: int) -> bool:
        seen.append((gpa, length))
        return gpa < 2 * PAGE_SIZE

    with pytest.raises(PacketError, match="range 1: PFN outside guest RAM") as exc:
        parse_gpa_direct(pkt, contains)
    assert exc.value.status is GpaStatus.PFN and exc.value.range_index == 1
    assert seen == [(PAGE_SIZE, PAGE_SIZE), (2 * PAGE_SIZE, PAGE_SIZE)]
    assert parse_gpa_direct(pkt, lambda gpa, n: True).total_bytes == 20


def test_trailing_extension_bytes_after_the_last_range_are_allowed(ram: Ram) -> None:
    (pkt,) = packets([raw_packet(9, gpa_ext([(10, 0, (A_PFN,))]) + bytes(16))])
    assert parse_gpa_direct(pkt, ram.memory).total_bytes == 10


# --- GPA direct: every rule, in every parser ----------------------------------------

RULES = [
    # (id, extension, status, range_index)
    ("truncated-ext", b"", GpaStatus.SHORT_EXT, None),
    ("range-count-0", gpa_ext([(10, 0, (A_PFN,))], count=0), GpaStatus.NO_RANGES, None),
    ("more-ranges-than-room", gpa_ext([(10, 0, (A_PFN,))], count=2),
     GpaStatus.TOO_MANY_RANGES, None),
    ("range-count-u32-max", gpa_ext([(10, 0, (A_PFN,))] * 3, count=0xFFFFFFFF),
     GpaStatus.TOO_MANY_RANGES, None),
    ("pfns-past-ext", gpa_ext([(PAGE_SIZE + 1, 0, (A_PFN,))]), GpaStatus.TRUNCATED, 0),
    ("header-past-ext", gpa_ext([(3 * PAGE_SIZE, 0, (A_PFN,) * 3)], count=2),
     GpaStatus.TRUNCATED, 1),
    ("count-0", gpa_ext([(0, 0, (A_PFN,))]), GpaStatus.COUNT_ZERO, 0),
    ("count-0-second", gpa_ext([(1, 0, (A_PFN,)), (0, 0, (A_PFN,))]), GpaStatus.COUNT_ZERO, 1),
    ("offset-page-size", gpa_ext([(1, PAGE_SIZE, (A_PFN,))]), GpaStatus.OFFSET, 0),
    ("offset-u32-max", gpa_ext([(1, 0xFFFFFFFF, (A_PFN,))]), GpaStatus.OFFSET, 0),
    ("offset-plus-count-overflows", gpa_ext([(0xFFFFFFFF, 1, (A_PFN,))]), GpaStatus.OVERFLOW, 0),
    # 2**20 pages declared: the page count is far beyond what the extension holds.
    ("page-count-overflow", gpa_ext([(0xFFFFFFFF - 4095, 4095, (A_PFN,) * 2)]),
     GpaStatus.TRUNCATED, 0),
    ("page-count-one-short", gpa_ext([(2 * PAGE_SIZE, 1, (A_PFN, A_PFN + 1))]),
     GpaStatus.TRUNCATED, 0),
    *[
        (f"pfn-outside-{i}", gpa_ext([(10, 0, (A_PFN,)), (2 * PAGE_SIZE, 0, (A_PFN, pfn))]),
         GpaStatus.PFN, 1)
        for i, pfn in enumerate(OUTSIDE)
    ],
    # Structure before RAM: a bad PFN in range 0 and a bad offset in range 1 is OFFSET.
    ("structure-first", gpa_ext([(10, 0, (A_PFN - 1,)), (10, PAGE_SIZE, (A_PFN,))]),
     GpaStatus.OFFSET, 1),
]  # fmt: skip

VALID = [
    ("offset-4095-count-1", gpa_ext([(1, 4095, (A_PFN,))])),
    ("offset-4095-count-2", gpa_ext([(2, 4095, (A_PFN, B_PFN))])),
    ("last-page-of-each-region", gpa_ext([(10, 0, (A_PFN + A_PAGES - 1,)), (9, 1, (B_PFN + 7,))])),
    ("one-full-page", gpa_ext([(PAGE_SIZE, 0, (A_PFN,))])),
]


@pytest.mark.parametrize(
    ("ext", "status", "where"), [r[1:] for r in RULES], ids=[r[0] for r in RULES]
)
def test_every_rule_single_packet(
    ram: Ram, ext: bytes, status: GpaStatus, where: int | None
) -> None:
    (pkt,) = packets([raw_packet(9, ext, b"payload")])
    with pytest.raises(PacketError) as exc:
        parse_gpa_direct(pkt, ram.memory)
    assert exc.value.status is status
    assert exc.value.range_index == where
    assert "GPA-direct" in exc.value.reason


@pytest.mark.parametrize("native", DECODERS)
def test_every_rule_batch(ram: Ram, native: bool) -> None:
    """All cases in one batch, each between two valid packets, so a bad packet is
    seen not to disturb its neighbours' records."""
    good = raw_packet(9, gpa_ext([(PAGE_SIZE + 1, 7, (A_PFN + 1, A_PFN + 2))]))
    raws = [good]
    for _, ext, _, _ in RULES:
        raws += [raw_packet(9, ext, b"payload"), good]
    buf, index, n = batch_of(raws)
    dec = GpaDirectDecoder(ram.memory, native=native)
    batch = dec.decode(buf, index, n)
    assert dec.backend == ("native" if native else "python")
    for k, (_, _, status, where) in enumerate(RULES):
        i = 1 + 2 * k
        assert batch.status(i) is status
        err = batch.error(i)
        assert err is not None and err.status is status and err.range_index == where
        with pytest.raises(PacketError):
            batch.get(i)
        with pytest.raises(PacketError):
            batch.iovecs(i)
    expect = ram.expected([GpaRange(PAGE_SIZE + 1, 7, (A_PFN + 1, A_PFN + 2))])
    for i in range(0, n, 2):
        assert batch.status(i) is GpaStatus.OK and batch.error(i) is None
        assert b"".join(batch.iovecs(i)) == expect
        assert batch.total_bytes(i) == PAGE_SIZE + 1


@pytest.mark.parametrize("native", DECODERS)
@pytest.mark.parametrize("ext", [v[1] for v in VALID], ids=[v[0] for v in VALID])
def test_boundaries_that_are_valid(ram: Ram, native: bool, ext: bytes) -> None:
    buf, index, n = batch_of([raw_packet(9, ext)])
    (pkt,) = iter_packets(buf, index, n)
    single = parse_gpa_direct(pkt, ram.memory)
    batch = GpaDirectDecoder(ram.memory, native=native).decode(buf, index, n)
    assert batch.get(0) == single
    assert b"".join(batch.iovecs(0)) == ram.expected(single.ranges)


# --- the batch decoder --------------------------------------------------------------


@pytest.mark.parametrize("native", DECODERS)
def test_batch_through_a_ring(ram: Ram, native: bool) -> None:
    io = [GpaRange(3 * PAGE_SIZE, 512, (A_PFN + 3, A_PFN + 4, A_PFN + 20, A_PFN + 21))]
    wire = through_ring(
        [
            inband(b"hello", trans_id=1, completion_requested=True),
            gpa_direct(io, b"srb-1", trans_id=2),
            gpa_direct([GpaRange(10, 0, (B_PFN + B_PAGES,))], b"srb-2", trans_id=3),
            completion(4, b"done"),
            xfer_pages(1, [(100, 0)], b"nvsp"),
        ]
    )
    buf, index, n = batch_of(wire)
    batch = GpaDirectDecoder(ram.memory, native=native).decode(buf, index, n)
    assert len(batch) == 5
    assert [batch.status(i) for i in range(5)] == [
        GpaStatus.SKIPPED,
        GpaStatus.OK,
        GpaStatus.PFN,
        GpaStatus.SKIPPED,
        GpaStatus.SKIPPED,
    ]
    assert batch.error(0) is None and batch.error(1) is None
    pkts = list(iter_packets(buf, index, n))
    assert batch.get(1) == parse_gpa_direct(pkts[1], ram.memory) == GpaDirect(tuple(io), 3 * 4096)
    views = batch.iovecs(1)
    # Pages 3-4 and 20-21 are physically adjacent pairs: two segments, not four.
    assert [v.nbytes for v in views] == [2 * PAGE_SIZE - 512, PAGE_SIZE + 512]
    assert b"".join(views) == ram.expected(io)
    views[0][:3] = b"dma"
    assert ram.pread(A_PFN + 3, 512, 3) == b"dma"
    del views
    with pytest.raises(PacketError, match="not a GPA-direct packet"):
        batch.get(0)
    with pytest.raises(PacketError, match="range 0: PFN outside guest RAM"):
        batch.total_bytes(2)
    with pytest.raises(IndexError):
        batch.status(5)


@pytest.mark.parametrize("native", DECODERS)
def test_batch_grows_its_record_arrays(ram: Ram, native: bool) -> None:
    scattered = [(3 * PAGE_SIZE, 0, (A_PFN + 1, A_PFN + 3, B_PFN + 5))] * 4
    raws = [raw_packet(9, gpa_ext(scattered), b"x" * k) for k in range(6)]
    buf, index, n = batch_of(raws)
    small = GpaDirectDecoder(ram.memory, native=native, max_ranges=1, max_segs=1)
    big = GpaDirectDecoder(ram.memory, native=native, max_ranges=1024, max_segs=1024)
    a, b = small.decode(buf, index, n), big.decode(buf, index, n)
    for i in range(n):
        assert a.get(i) == b.get(i)
        assert [bytes(v) for v in a.iovecs(i)] == [bytes(v) for v in b.iovecs(i)]
        assert len(a.iovecs(i)) == 12
    assert small._be.max_ranges >= 24 and small._be.max_segs >= 72
    assert small._be.state() == big._be.state() == (n, 24, 72, 0)


@pytest.mark.parametrize("native", DECODERS)
def test_batch_refuses_what_ring_read_never_makes(ram: Ram, native: bool) -> None:
    good = raw_packet(9, gpa_ext([(10, 0, (A_PFN,))]))
    dec = GpaDirectDecoder(ram.memory, native=native)
    buf, index, _ = batch_of([good])
    cases = {
        "outside buf": array.array("I", [len(buf) - 8, 32]),
        "shorter than a descriptor": array.array("I", [0, 8]),
        "unaligned": array.array("I", [4, 32]),
        "len8 disagrees": array.array("I", [0, 24]),
    }
    for what, idx in cases.items():
        with pytest.raises(ValueError, match="not what ring read"):
            dec.decode(buf, idx, 1)
        assert what
    bad_off8 = bytearray(good)
    struct.pack_into("<H", bad_off8, 2, 9)  # offset8 > len8
    buf2, index2, _ = batch_of([bytes(bad_off8)])
    with pytest.raises(ValueError, match="not what ring read"):
        dec.decode(buf2, index2, 1)
    with pytest.raises(ValueError, match="pairs of u32"):
        dec.decode(buf, index, 2)
    # After a refusal the decoder still works.
    assert dec.decode(buf, index, 1).status(0) is GpaStatus.OK


@NATIVE
def test_native_batch_refuses_a_misaligned_buffer(ram: Ram) -> None:
    good = raw_packet(9, gpa_ext([(10, 0, (A_PFN,))]))
    buf = bytearray(1) + good
    with pytest.raises(ValueError, match="not what ring read"):
        GpaDirectDecoder(ram.memory, native=True).decode(
            memoryview(buf)[1:], array.array("I", [0, len(good)]), 1
        )


@pytest.mark.parametrize("native", DECODERS)
def test_batch_follows_hot_plugged_ram(native: bool) -> None:
    r = Ram(native=False)
    try:
        new_gpa = 1 << 33
        buf, index, n = batch_of([raw_packet(9, gpa_ext([(10, 0, (new_gpa // PAGE_SIZE,))]))])
        dec = GpaDirectDecoder(r.memory, native=native)
        assert dec.decode(buf, index, n).status(0) is GpaStatus.PFN
        fd = fuzz.sealed_ram_fd(1)
        os.pwrite(fd, b"hot-plugged", 0)
        r.memory.add_region(new_gpa, PAGE_SIZE, fd)
        os.close(fd)
        batch = dec.decode(buf, index, n)
        assert bytes(batch.iovecs(0)[0]) == b"hot-plugged"[:10]
    finally:
        r.close()


def test_decode_refuses_closed_guest_memory() -> None:
    r = Ram(native=False)
    dec = GpaDirectDecoder(r.memory, native=False)
    buf, index, n = batch_of([raw_packet(9, gpa_ext([(10, 0, (A_PFN,))]))])
    assert dec.decode(buf, index, n).status(0) is GpaStatus.OK
    r.close()
    with pytest.raises(GuestMemoryError, match="closed"):
        dec.decode(buf, index, n)


def test_vmbusd_native_picks_the_default_backend() -> None:
    r = Ram(native=False)
    try:
        dec = GpaDirectDecoder(r.memory)
        assert dec.backend == ("native" if native_sel.NATIVE else "python")
    finally:
        r.close()


def test_an_empty_batch() -> None:
    r = Ram(native=False)
    try:
        buf, index, _ = batch_of([])
        assert len(GpaDirectDecoder(r.memory, native=False).decode(buf, index, 0)) == 0
    finally:
        r.close()


# --- twin vs native, property based -------------------------------------------------

_PFN_CHOICES = st.one_of(
    st.integers(A_PFN, A_PFN + A_PAGES - 1),
    st.integers(B_PFN, B_PFN + B_PAGES - 1),
    st.sampled_from(OUTSIDE),
    st.integers(0, (1 << 64) - 1),
)


@st.composite
def gpa_range_strategy(draw: st.DrawFn) -> tuple[int, int, list[int]]:
    offset = draw(st.integers(0, PAGE_SIZE - 1))
    count = draw(st.integers(1, 5 * PAGE_SIZE - offset))
    npfns = (offset + count + PAGE_SIZE - 1) // PAGE_SIZE
    if draw(st.booleans()):  # mostly inside RAM, often physically adjacent
        start = draw(st.integers(A_PFN, A_PFN + A_PAGES - npfns))
        pfns = [start + i for i in range(npfns)]
        if draw(st.booleans()):
            pfns[draw(st.integers(0, npfns - 1))] = draw(_PFN_CHOICES)
    else:
        pfns = draw(st.lists(_PFN_CHOICES, min_size=npfns, max_size=npfns))
    return count, offset, pfns


@st.composite
def hostile_packet(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["valid", "mutated", "random", "other"]))
    payload = draw(st.binary(max_size=24))
    if kind == "other":
        typ = draw(st.sampled_from([6, 7, 0xB, 0, 0x1F]))
        return raw_packet(typ, bytes(8 * draw(st.integers(0, 3))), payload)
    if kind == "random":
        junk = draw(st.binary(max_size=160))
        return raw_packet(9, junk + bytes(-len(junk) % 8), payload)
    ext = bytearray(gpa_ext(draw(st.lists(gpa_range_strategy(), min_size=1, max_size=4))))
    if kind == "mutated":
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(ext) - 1))
            ext[at] = draw(st.integers(0, 255))
        ext = ext[: 8 * draw(st.integers(0, len(ext) // 8))]
    return raw_packet(9, bytes(ext), payload)


def _records(dec: GpaDirectDecoder, n: int) -> tuple[Any, ...]:
    state = dec._be.state()
    pkts, ranges, segs = dec._be.views()
    return (
        state,
        bytes(pkts[: 24 * n]),
        bytes(ranges[: 24 * state[1]]),
        bytes(segs[: 24 * state[2]]),
    )


_RAM: Ram | None = None


def _shared_ram() -> Ram:
    global _RAM
    if _RAM is None:
        _RAM = Ram(native=False)
    return _RAM


@NATIVE
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raws=st.lists(hostile_packet(), min_size=1, max_size=12),
    max_ranges=st.integers(1, 8),
    max_segs=st.integers(1, 16),
)
def test_twin_and_native_agree_record_for_record(
    raws: list[bytes], max_ranges: int, max_segs: int
) -> None:
    ram = _shared_ram()
    buf, index, n = batch_of(raws)
    twin = GpaDirectDecoder(ram.memory, native=False, max_ranges=max_ranges, max_segs=max_segs)
    nat = GpaDirectDecoder(ram.memory, native=True, max_ranges=max_ranges, max_segs=max_segs)
    tb, nb = twin.decode(buf, index, n), nat.decode(buf, index, n)
    assert _records(twin, n) == _records(nat, n)
    for i, pkt in enumerate(iter_packets(buf, index, n)):
        try:
            single = parse_gpa_direct(pkt, ram.memory)
        except PacketError as exc:
            want = exc.status if exc.status is not None else GpaStatus.SKIPPED
            assert tb.status(i) is nb.status(i) is want
        else:
            assert tb.status(i) is nb.status(i) is GpaStatus.OK
            assert tb.get(i) == nb.get(i) == single
            expect = ram.expected(single.ranges)
            assert b"".join(tb.iovecs(i)) == b"".join(nb.iovecs(i)) == expect
    del tb, nb


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_target_as_a_property(data: bytes) -> None:
    """Every input parses or raises PacketError, and the decoders agree."""
    fuzz.check_one(data)


def test_fuzz_target_runs_under_atheris(tmp_path: pathlib.Path) -> None:
    """The libFuzzer harness itself, for a few thousand inputs (atheris is in the
    test extra; a missing atheris fails here with its name)."""
    import atheris  # type: ignore[import-untyped]  # noqa: F401

    proc = subprocess.run(
        [sys.executable, str(HERE / "fuzz" / "fuzz_packet.py"), "-runs=3000", "-seed=1"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,  # where libFuzzer writes a crash reproducer
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done 3000 runs" in proc.stderr
