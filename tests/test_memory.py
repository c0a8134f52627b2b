"""Guest memory: regions, GPA-range iovecs, linear and ring GPADL mappings.

Real memfds stand in for guest RAM; the "guest's view" is pread/pwrite (or the
test's own mmap) on the same memfd, so coherence with our mappings is real.
Every test runs on both backends (C fast path and the pure-Python twin).
"""

from __future__ import annotations

import errno
import itertools
import mmap
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmbus import memory as M
from vmbus import native as native_sel
from vmbus.gpadl import PAGE_SIZE, Gpadl, GpaRange
from vmbus.memory import (
    MAX_GPADL_PAGES,
    MAX_REGIONS,
    GuestMemory,
    GuestMemoryError,
    LinearMapping,
    Region,
)


def _native_ok() -> bool:
    if not native_sel.native_available():
        return False
    lib = native_sel.native_module().lib
    return hasattr(lib, "vmb_gpa_range_walk") and lib.VMB_MEM_E_PFN == M.E_PFN  # not stale


BACKENDS = [
    pytest.param(False, id="python"),
    pytest.param(
        True,
        id="native",
        marks=pytest.mark.native,  # a missing or stale extension fails these, never skips
    ),
]

A_GPA = 0x100000  # region A: 256 pages at 1 MiB, file offset 2 pages into its memfd
A_PAGES = 256
A_OFF = 2 * PAGE_SIZE
A_PFN = A_GPA // PAGE_SIZE
B_GPA = 1 << 32  # region B: 64 pages at 4 GiB
B_PAGES = 64
B_PFN = B_GPA // PAGE_SIZE
C_GPA = A_GPA + A_PAGES * PAGE_SIZE  # region C: 16 pages right after A, other memfd
C_PAGES = 16
C_PFN = C_GPA // PAGE_SIZE


class Ram:
    """Guest RAM in memfds, with the guest's own access to it (pread/pwrite)."""

    def __init__(self, name: str = "vmbusd-test-ram") -> None:
        rnd = random.Random(1)
        self.fds: dict[str, int] = {}
        self.layout = {"A": (A_GPA, A_PAGES, A_OFF), "B": (B_GPA, B_PAGES, 0)}
        self.layout["C"] = (C_GPA, C_PAGES, 0)
        for key, (_, pages, off) in self.layout.items():
            fd = M.sealed_memfd(f"{name}-{key}", off + pages * PAGE_SIZE)
            os.pwrite(fd, rnd.randbytes(off + pages * PAGE_SIZE), 0)
            self.fds[key] = fd

    def _where(self, gpa: int) -> tuple[int, int]:
        for key, (base, pages, off) in self.layout.items():
            if base <= gpa < base + pages * PAGE_SIZE:
                return self.fds[key], off + gpa - base
        raise AssertionError(hex(gpa))

    def gread(self, gpa: int, n: int) -> bytes:
        fd, pos = self._where(gpa)
        return os.pread(fd, n, pos)

    def gwrite(self, gpa: int, data: bytes) -> None:
        fd, pos = self._where(gpa)
        os.pwrite(fd, data, pos)

    def page(self, pfn: int) -> bytes:
        return self.gread(pfn * PAGE_SIZE, PAGE_SIZE)

    def add_to(self, gm: GuestMemory, keys: str = "ABC") -> None:
        for key in keys:
            gpa, pages, off = self.layout[key]
            gm.add_region(gpa, pages * PAGE_SIZE, self.fds[key], off)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


@pytest.fixture
def ram():
    r = Ram()
    yield r
    r.close()


@pytest.fixture(params=BACKENDS)
def gm(request, ram):
    g = GuestMemory(native=request.param)
    ram.add_to(g)
    yield g
    g.close()


def gpadl_of(pfns: list[int], byte_offset: int = 0, byte_count: int | None = None) -> Gpadl:
    if byte_count is None:
        byte_count = len(pfns) * PAGE_SIZE - byte_offset
    return Gpadl(handle=0xE1E10, relid=1, ranges=(GpaRange(byte_count, byte_offset, tuple(pfns)),))


# --- regions and per-request access --------------------------------------------------


def test_default_backend_follows_vmbusd_native():
    g = GuestMemory()
    assert g.backend == ("native" if native_sel.NATIVE else "python")
    g.close()


def test_regions_sorted_and_read_only(ram):
    g = GuestMemory()
    ram.add_to(g, "BCA")
    assert g.regions == (
        Region(A_GPA, A_PAGES * PAGE_SIZE, A_OFF),
        Region(C_GPA, C_PAGES * PAGE_SIZE, 0),
        Region(B_GPA, B_PAGES * PAGE_SIZE, 0),
    )
    assert isinstance(g.regions, tuple)
    g.close()


def test_read_write_high_gpa_base(gm, ram):
    gpa = B_GPA + 5 * PAGE_SIZE + 10
    gm.write(gpa, b"hello from the host")
    assert ram.gread(gpa, 19) == b"hello from the host"
    ram.gwrite(gpa + 100, b"guest")
    assert gm.read(gpa + 100, 5) == b"guest"
    assert gm.read(B_GPA, B_PAGES * PAGE_SIZE) == ram.gread(B_GPA, B_PAGES * PAGE_SIZE)


def test_iovecs_split_only_at_region_boundaries(gm, ram):
    start = C_GPA - 3 * PAGE_SIZE - 7
    views = gm.iovecs(start, 5 * PAGE_SIZE)
    assert [len(v) for v in views] == [3 * PAGE_SIZE + 7, 2 * PAGE_SIZE - 7]
    assert b"".join(views) == ram.gread(start, 3 * PAGE_SIZE + 7) + ram.gread(C_GPA, 8185)
    assert gm.iovecs(A_GPA + 5, 3 * PAGE_SIZE) == [ram.gread(A_GPA + 5, 3 * PAGE_SIZE)]
    assert gm.iovecs(A_GPA, 0) == []
    assert gm.iovecs(0, 0) == []
    assert gm.contains(A_GPA, (A_PAGES + C_PAGES) * PAGE_SIZE)
    assert not gm.contains(A_GPA, (A_PAGES + C_PAGES) * PAGE_SIZE + 1)  # runs into a gap
    views[0][0:4] = b"\x01\x02\x03\x04"  # writable, and it is guest RAM
    assert ram.gread(start, 4) == b"\x01\x02\x03\x04"
    del views


@pytest.mark.parametrize(
    ("gpa", "length"),
    [
        (A_GPA - 1, 2),  # starts before RAM
        (C_GPA + C_PAGES * PAGE_SIZE - 1, 2),  # ends in the gap after C
        (B_GPA + B_PAGES * PAGE_SIZE, 1),
        (0, 1),
        ((1 << 64) - PAGE_SIZE, 2 * PAGE_SIZE),  # u64 overflow of gpa + length
        ((1 << 64) - 1, 2),
        (-1, 2),
        (A_GPA, -1),
    ],
)
def test_iovecs_rejects_outside_ram_and_overflow(gm, gpa, length):
    with pytest.raises(GuestMemoryError):
        gm.iovecs(gpa, length)
    with pytest.raises(GuestMemoryError):
        gm.read(gpa, length)
    assert not gm.contains(gpa, length)


def test_iovecs_for_range_scattered_coalesces(gm, ram):
    rel = [7, 3, 100, 4, 5, 6]
    pfns = [A_PFN + p for p in rel]
    off, count = 100, 6 * PAGE_SIZE - 100 - 50
    views = gm.iovecs_for_range(GpaRange(count, off, tuple(pfns)))
    want = b"".join(ram.page(p) for p in pfns)[off : off + count]
    assert b"".join(views) == want
    # 7 | 3 | 100 | 4,5,6 coalesced
    assert [len(v) for v in views] == [PAGE_SIZE - 100, PAGE_SIZE, PAGE_SIZE, 3 * PAGE_SIZE - 50]


def test_iovecs_for_range_does_not_coalesce_across_regions(gm):
    last_a, first_c = C_PFN - 1, C_PFN  # adjacent GPAs, different mappings
    views = gm.iovecs_for_range(GpaRange(2 * PAGE_SIZE, 0, (last_a, first_c)))
    assert [len(v) for v in views] == [PAGE_SIZE, PAGE_SIZE]


@pytest.mark.parametrize(
    "rng",
    [
        GpaRange(PAGE_SIZE, 0, (A_PFN - 1,)),  # PFN below RAM
        GpaRange(PAGE_SIZE, 0, (C_PFN + C_PAGES,)),  # PFN in the gap after C
        GpaRange(PAGE_SIZE, 0, (B_PFN + B_PAGES,)),  # PFN just past the end
        GpaRange(2 * PAGE_SIZE, 0, (A_PFN, 1 << 63)),  # PFN whose GPA overflows a u64
        GpaRange(PAGE_SIZE, 0, (A_PFN, A_PFN + 1)),  # more PFNs than the length needs
        GpaRange(2 * PAGE_SIZE, 0, (A_PFN,)),  # fewer PFNs than the length needs
        GpaRange(PAGE_SIZE, 1, (A_PFN,)),  # ... offset included
        GpaRange(1, PAGE_SIZE, (A_PFN, A_PFN + 1)),  # byte_offset >= 4096
        GpaRange(0, 0, ()),  # byte_count 0
        GpaRange((1 << 32) - 1, 4095, tuple(range(A_PFN, A_PFN + (1 << 20) + 1))),  # u32 overflow
        GpaRange(1 << 32, 0, tuple(range(A_PFN, A_PFN + (1 << 20)))),  # byte_count > u32
    ],
)
def test_iovecs_for_range_rejects(gm, rng):
    with pytest.raises(GuestMemoryError):
        gm.iovecs_for_range(rng)


# --- region validation -------------------------------------------------------------


@pytest.mark.parametrize(
    ("gpa", "size", "off"),
    [
        (A_GPA - PAGE_SIZE, 2 * PAGE_SIZE, 0),  # overlaps A's start
        (A_GPA + PAGE_SIZE, PAGE_SIZE, 0),  # inside A
        (A_GPA - PAGE_SIZE, 400 * PAGE_SIZE, 0),  # covers A and C
        (C_GPA + C_PAGES * PAGE_SIZE - PAGE_SIZE, 2 * PAGE_SIZE, 0),  # overlaps C's end
        (A_GPA, A_PAGES * PAGE_SIZE, 0),  # identical
        (0x1001, PAGE_SIZE, 0),  # misaligned gpa
        (0, PAGE_SIZE + 1, 0),  # misaligned size
        (0, PAGE_SIZE, 512),  # misaligned offset
        (0, 0, 0),  # empty
        ((1 << 52) - PAGE_SIZE, 2 * PAGE_SIZE, 0),  # above MAX_GPA
        (-PAGE_SIZE, PAGE_SIZE, 0),
    ],
)
def test_add_region_rejects_bad_or_overlapping(gm, ram, gpa, size, off):
    with pytest.raises(GuestMemoryError):
        gm.add_region(gpa, size, ram.fds["B"], off)
    assert len(gm.regions) == 3


def test_add_region_rejects_unmappable_fds(gm, ram, tmp_path):
    r, w = os.pipe()
    try:
        with pytest.raises(GuestMemoryError):
            gm.add_region(0, PAGE_SIZE, r)
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(GuestMemoryError):  # file shorter than offset + size
        gm.add_region(0, B_PAGES * PAGE_SIZE, ram.fds["B"], PAGE_SIZE)
    ro = os.open(f"/proc/self/fd/{ram.fds['B']}", os.O_RDONLY)
    try:
        with pytest.raises(GuestMemoryError):  # MAP_SHARED + PROT_WRITE needs O_RDWR
            gm.add_region(0, PAGE_SIZE, ro)
    finally:
        os.close(ro)
    with pytest.raises(GuestMemoryError):
        gm.add_region(0, PAGE_SIZE, 1 << 20)  # not an open fd
    d = os.open(tmp_path, os.O_RDONLY)
    try:
        with pytest.raises(GuestMemoryError):  # a directory
            gm.add_region(0, PAGE_SIZE, d)
    finally:
        os.close(d)
    assert len(gm.regions) == 3


def test_region_count_is_capped(ram):
    g = GuestMemory()
    fd = M.sealed_memfd("vmbusd-test-many", PAGE_SIZE)
    try:
        for i in range(MAX_REGIONS):
            g.add_region(i * PAGE_SIZE, PAGE_SIZE, fd)
        with pytest.raises(GuestMemoryError):
            g.add_region(MAX_REGIONS * PAGE_SIZE, PAGE_SIZE, fd)
    finally:
        g.close()
        os.close(fd)


def test_caller_keeps_its_fd(ram):
    fd = M.sealed_memfd("vmbusd-test-own", 4 * PAGE_SIZE)
    nfds = len(os.listdir("/proc/self/fd"))
    g = GuestMemory()
    g.add_region(0, 4 * PAGE_SIZE, fd)
    os.pwrite(fd, b"abc", PAGE_SIZE)
    os.close(fd)  # our dup keeps the region usable, and GPADL maps still work
    assert g.read(PAGE_SIZE, 3) == b"abc"
    with g.map_linear(gpadl_of([1, 0])) as m:
        assert bytes(m.view[:3]) == b"abc"
    g.close()
    assert len(os.listdir("/proc/self/fd")) == nfds - 1  # ours closed, no dup leaked

    fd2 = M.sealed_memfd("vmbusd-test-own2", PAGE_SIZE)
    g2 = GuestMemory()
    g2.add_region(0, PAGE_SIZE, fd2)
    g2.close()
    os.fstat(fd2)  # still the caller's
    os.close(fd2)


# --- linear and ring mappings ------------------------------------------------------


def test_map_linear_scattered_pages_show_through(gm, ram):
    pfns = [A_PFN + p for p in (7, 3, 100, 4, 5, 6, 255)] + [C_PFN, B_PFN + 9, A_PFN + 7]
    with gm.map_linear(gpadl_of(pfns)) as m:
        assert isinstance(m, LinearMapping)
        assert m.size == len(pfns) * PAGE_SIZE
        view = m.view
        assert bytes(view) == b"".join(ram.page(p) for p in pfns)
        # guest -> host
        ram.gwrite((A_PFN + 100) * PAGE_SIZE + 4000, b"G" * 96)
        assert bytes(view[2 * PAGE_SIZE + 4000 : 3 * PAGE_SIZE]) == b"G" * 96
        # host -> guest, across a page boundary in the view (pages 3 -> 100)
        view[2 * PAGE_SIZE - 4 : 2 * PAGE_SIZE + 4] = b"HOSTHOST"
        assert ram.gread((A_PFN + 3) * PAGE_SIZE + PAGE_SIZE - 4, 4) == b"HOST"
        assert ram.gread((A_PFN + 100) * PAGE_SIZE, 4) == b"HOST"
        # the same guest page mapped twice (pfn A+7 at 0 and at the end) aliases
        view[0:4] = b"same"
        assert bytes(view[9 * PAGE_SIZE : 9 * PAGE_SIZE + 4]) == b"same"
        del view


def test_map_linear_multi_range_and_guest_mmap_view(gm, ram):
    g = Gpadl(
        1,
        1,
        (
            GpaRange(PAGE_SIZE, 0, (A_PFN + 9,)),
            GpaRange(2 * PAGE_SIZE - 10, 10, (B_PFN, B_PFN + 1)),
        ),
    )
    guest = mmap.mmap(ram.fds["B"], B_PAGES * PAGE_SIZE)  # the guest's own mapping
    try:
        with gm.map_linear(g) as m:
            assert m.size == 3 * PAGE_SIZE
            guest[PAGE_SIZE + 1 : PAGE_SIZE + 3] = b"zz"
            assert bytes(m.view[2 * PAGE_SIZE + 1 : 2 * PAGE_SIZE + 3]) == b"zz"
            m.view[PAGE_SIZE : PAGE_SIZE + 2] = b"yy"
            assert guest[0:2] == b"yy"
    finally:
        guest.close()


def test_map_ring_pair_mirrors_data(gm, ram):
    up = [A_PFN + 50, A_PFN + 7, A_PFN + 3, A_PFN + 100]  # K = 4: header + 3 data pages
    down = [C_PFN + 9, B_PFN + 20, B_PFN + 21, B_PFN + 22, A_PFN + 23]
    with gm.map_ring_pair(gpadl_of(up + down), 4) as r:
        assert r.upstream_size == 3 * PAGE_SIZE and r.downstream_size == 4 * PAGE_SIZE
        assert bytes(r.upstream_hdr) == ram.page(up[0])
        assert bytes(r.downstream_hdr) == ram.page(down[0])
        for data, pages in ((r.upstream_data, up[1:]), (r.downstream_data, down[1:])):
            d = len(pages) * PAGE_SIZE
            assert len(data) == 2 * d
            assert bytes(data[:d]) == bytes(data[d:]) == b"".join(ram.page(p) for p in pages)
            data[d - 8 : d + 8] = b"ABCDEFGHIJKLMNOP"  # wraps to the start
            assert bytes(data[:8]) == b"IJKLMNOP"
            assert bytes(data[2 * d - 8 :]) == b"ABCDEFGH"
            assert ram.gread(pages[-1] * PAGE_SIZE + PAGE_SIZE - 8, 8) == b"ABCDEFGH"
            assert ram.gread(pages[0] * PAGE_SIZE, 8) == b"IJKLMNOP"
            ram.gwrite(pages[1] * PAGE_SIZE, b"guest!")  # guest writes the 2nd data page
            assert bytes(data[PAGE_SIZE : PAGE_SIZE + 6]) == b"guest!"
            assert bytes(data[d + PAGE_SIZE : d + PAGE_SIZE + 6]) == b"guest!"
            del data  # a live view would (rightly) make close() refuse
        ram.gwrite(up[0] * PAGE_SIZE, b"\x08\x00\x00\x00")  # guest's write_index
        assert bytes(r.upstream_hdr[:4]) == b"\x08\x00\x00\x00"
        r.downstream_hdr[4:8] = b"\x10\x00\x00\x00"
        assert ram.gread(down[0] * PAGE_SIZE + 4, 4) == b"\x10\x00\x00\x00"


def test_map_ring_pair_contiguous_guest_pages(gm, ram):
    pfns = list(range(A_PFN + 10, A_PFN + 10 + 8))  # how Linux allocates rings
    with gm.map_ring_pair(gpadl_of(pfns), 2) as r:
        assert r.upstream_size == PAGE_SIZE and r.downstream_size == 5 * PAGE_SIZE
        d = r.downstream_data
        assert bytes(d[: 5 * PAGE_SIZE]) == bytes(d[5 * PAGE_SIZE :])
        del d


@pytest.mark.parametrize("k", [0, 1, 9, 8, -1, 2**32])
def test_map_ring_pair_rejects_bad_k(gm, k):
    pfns = [A_PFN + i for i in range(9)]  # N = 9: K = 8 and K = 9 leave no downstream data
    with pytest.raises(GuestMemoryError):
        gm.map_ring_pair(gpadl_of(pfns), k)
    assert gm.mapped_pages == 0


@pytest.mark.parametrize(
    "gpadl",
    [
        gpadl_of([A_PFN + i for i in range(6)], byte_offset=8),  # offset != 0
        gpadl_of([A_PFN + i for i in range(6)], byte_count=5 * PAGE_SIZE + 1),  # count != N*4K
        Gpadl(1, 1, (GpaRange(2 * PAGE_SIZE, 0, (A_PFN, A_PFN + 1)),) * 3),  # three ranges
        gpadl_of([A_PFN, A_PFN + 1, A_PFN - 1, A_PFN + 2, A_PFN + 3]),  # a PFN outside RAM
    ],
)
def test_map_ring_pair_rejects_bad_gpadl(gm, gpadl):
    with pytest.raises(GuestMemoryError):
        gm.map_ring_pair(gpadl, 2)


@pytest.mark.parametrize(
    "gpadl",
    [
        gpadl_of([A_PFN, 5]),  # PFN outside guest RAM
        gpadl_of([A_PFN, (1 << 64) - 1]),  # PFN whose GPA overflows
        gpadl_of([A_PFN, A_PFN + 1], byte_count=PAGE_SIZE),  # count disagrees with PFNs
        gpadl_of([A_PFN], byte_offset=PAGE_SIZE, byte_count=1),  # byte_offset >= 4096
        gpadl_of([A_PFN + 1] * (MAX_GPADL_PAGES + 1)),  # over the page cap
        Gpadl(1, 1, ()),  # no pages
    ],
)
def test_map_linear_rejects(gm, gpadl):
    with pytest.raises(GuestMemoryError):
        gm.map_linear(gpadl)
    assert gm.mapped_pages == 0


def test_ring_over_page_cap(gm):
    with pytest.raises(GuestMemoryError):
        gm.map_ring_pair(gpadl_of([A_PFN + 1] * (MAX_GPADL_PAGES + 1)), 4)


@pytest.mark.parametrize("native", BACKENDS)
def test_per_vm_caps(ram, native):
    g = GuestMemory(native=native, max_mapped_pages=10, max_mapped_runs=4)
    ram.add_to(g)
    try:
        m = g.map_linear(gpadl_of([A_PFN + i for i in range(8)]))  # 8 pages, 1 run
        with pytest.raises(GuestMemoryError):
            g.map_linear(gpadl_of([A_PFN + i for i in range(3)]))  # 11 pages
        m.close()
        assert g.mapped_pages == 0
        with pytest.raises(GuestMemoryError):  # 5 runs
            g.map_linear(gpadl_of([A_PFN + 2 * i for i in range(5)]))
        g.map_linear(gpadl_of([A_PFN + 2 * i for i in range(4)]))
        assert g.mapped_pages == 4
    finally:
        g.close()


# --- teardown and reference safety --------------------------------------------------


def _maps_with(name: str) -> int:
    with open("/proc/self/maps") as f:
        return sum(name in line for line in f)


@pytest.mark.parametrize("native", BACKENDS)
def test_close_unmaps_and_refuses_while_views_exported(native):
    ram = Ram("vmbusd-teardown")
    g = GuestMemory(native=native)
    ram.add_to(g, "AC")
    try:
        assert _maps_with("vmbusd-teardown") == 2
        lin = g.map_linear(gpadl_of([A_PFN + 7, A_PFN + 3, C_PFN]))  # 3 runs
        ring = g.map_ring_pair(gpadl_of([A_PFN + i for i in range(6)]), 3)
        assert _maps_with("vmbusd-teardown") > 2

        v = lin.view
        part = v[10:20]
        del v  # a slice alone still pins the mapping
        with pytest.raises(GuestMemoryError):
            lin.close()
        assert not lin.closed and bytes(part) == bytes(lin.view[10:20])  # still usable
        part.release()
        lin.close()
        assert lin.closed
        with pytest.raises(GuestMemoryError):
            lin.view  # noqa: B018
        lin.close()  # idempotent

        data = ring.upstream_data
        io = g.iovecs(A_GPA, 10)
        with pytest.raises(GuestMemoryError):
            g.close()  # ring and region A pinned; region C is unmapped
        with pytest.raises(GuestMemoryError):
            g.iovecs(A_GPA, 1)  # closed for new use
        assert bytes(data[:4]) == ram.gread((A_PFN + 1) * PAGE_SIZE, 4)  # still valid
        assert bytes(io[0]) == ram.gread(A_GPA, 10)
        del data, io
        g.close()  # retry succeeds
        assert ring.closed
        assert _maps_with("vmbusd-teardown") == 0
        assert g.mapped_pages == 0
    finally:
        ram.close()


def test_ffi_from_buffer_pins_mapping(ram):
    assert _native_ok(), "vmbus._native is missing or stale (pip install -e .)"
    ffi = native_sel.native_module().ffi
    g = GuestMemory(native=True)
    ram.add_to(g)
    r = g.map_ring_pair(gpadl_of([A_PFN + i for i in range(6)]), 3)
    p = ffi.from_buffer(r.downstream_data)  # what a C ring would hold
    with pytest.raises(GuestMemoryError):
        r.close()
    ffi.release(p)
    r.close()
    g.close()


# --- differential: the C fast path and the Python twin agree --------------------------
# Hypothesis drives the GPA-range walk (valid and hostile ranges) and the batched
# MAP_FIXED (random scattered page lists): both backends must return the same
# segments or error code, and map the same guest bytes.

needs_native = pytest.mark.native


@pytest.fixture(scope="module")
def diff_ram():
    r = Ram("vmbusd-diff")
    yield r
    r.close()


@pytest.fixture(scope="module")
def pair(diff_ram):
    gms = (M.GuestMemory(native=True), M.GuestMemory(native=False))
    for g in gms:
        diff_ram.add_to(g)
    yield gms
    for g in gms:
        g.close()


VALID_PFNS = (
    st.integers(A_PFN, A_PFN + A_PAGES - 1)
    | st.integers(C_PFN, C_PFN + C_PAGES - 1)
    | st.integers(B_PFN, B_PFN + B_PAGES - 1)
)
HOSTILE_PFNS = st.sampled_from(
    [0, A_PFN - 1, C_PFN + C_PAGES, B_PFN - 1, B_PFN + B_PAGES, 1 << 40, M.MAX_PFN, 1 << 63]
)


def _in_ram(pfn: int) -> bool:
    return any(b <= pfn < b + n for b, n in ((A_PFN, A_PAGES), (B_PFN, B_PAGES), (C_PFN, C_PAGES)))


@st.composite
def page_lists(draw, hostile: bool, max_size: int = 24) -> list[int]:
    """Scattered pages with some physically consecutive runs, like a vmalloc buffer."""
    out: list[int] = []
    n = draw(st.integers(1, max_size))
    while len(out) < n:
        start = draw(VALID_PFNS | HOSTILE_PFNS if hostile else VALID_PFNS)
        run = draw(st.integers(1, 4))
        out.extend(p for p in range(start, start + run) if hostile or _in_ram(p))
    return out[:n]


@st.composite
def gpa_ranges(draw) -> GpaRange:
    pfns = draw(page_lists(hostile=draw(st.booleans())))
    n = len(pfns)
    off = draw(st.integers(0, PAGE_SIZE - 1) | st.sampled_from([PAGE_SIZE, 1 << 32]))
    lo, hi = max(1, (n - 1) * PAGE_SIZE - off + 1), n * PAGE_SIZE - off
    count = draw(
        st.integers(max(lo, 1), max(hi, 1))
        | st.integers(0, 2 * n * PAGE_SIZE)
        | st.sampled_from([0, M.U32_MAX, M.U32_MAX - off + 1, 1 << 40])
    )
    return GpaRange(count, off, tuple(pfns))


@needs_native
@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rng=gpa_ranges())
def test_walk_agrees(pair, diff_ram, rng):
    nat, py = pair
    t_n, t_p = nat._table, py._table
    got_n = nat._ops.walk(t_n.backend, rng.byte_offset, rng.byte_count, rng.pfns)
    got_p = py._ops.walk(t_p.backend, rng.byte_offset, rng.byte_count, rng.pfns)
    assert got_n == got_p
    if isinstance(got_n, int):
        with pytest.raises(M.GuestMemoryError):
            nat.iovecs_for_range(rng)
        return
    # an independent model: the range's bytes from the guest's side
    want = b"".join(diff_ram.page(p) for p in rng.pfns)[
        rng.byte_offset : rng.byte_offset + rng.byte_count
    ]
    assert b"".join(nat.iovecs_for_range(rng)) == want == b"".join(py.iovecs_for_range(rng))
    # coalescing is maximal: no two neighbouring segments could have been one
    for (r1, o1, n1), (r2, o2, _) in itertools.pairwise(got_n):
        assert not (r1 == r2 and o1 + n1 == o2)


@needs_native
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(pfns=page_lists(hostile=False, max_size=40))
def test_linear_mapping_agrees(pair, diff_ram, pfns):
    want = b"".join(diff_ram.page(p) for p in pfns)
    maps = [g.map_linear(gpadl_of(pfns)) for g in pair]
    try:
        for m in maps:
            v = m.view
            assert bytes(v) == want
            del v
    finally:
        for m in maps:
            m.close()


@needs_native
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(pfns=page_lists(hostile=False, max_size=30), data=st.data())
def test_ring_mapping_agrees(pair, diff_ram, pfns, data):
    if len(pfns) < 4:
        pfns = pfns + [A_PFN] * (4 - len(pfns))
    k = data.draw(st.integers(2, len(pfns) - 2))
    rings = [g.map_ring_pair(gpadl_of(pfns), k) for g in pair]
    try:
        up = b"".join(diff_ram.page(p) for p in pfns[1:k])
        down = b"".join(diff_ram.page(p) for p in pfns[k + 1 :])
        for r in rings:
            assert bytes(r.upstream_hdr) == diff_ram.page(pfns[0])
            assert bytes(r.downstream_hdr) == diff_ram.page(pfns[k])
            assert bytes(r.upstream_data) == up + up
            assert bytes(r.downstream_data) == down + down
    finally:
        for r in rings:
            r.close()


def _reservation(pages: int) -> mmap.mmap:
    return mmap.mmap(-1, pages * PAGE_SIZE, flags=mmap.MAP_PRIVATE)


@needs_native
@pytest.mark.parametrize(
    ("reserved", "runs", "want"),
    [
        (2, [("A", 0, 3)], M.E_BAD_ARG),  # runs do not fit the reservation
        (4, [("A", 0, 2), ("A", 0, 3)], M.E_BAD_ARG),  # ... only in sum
        (2, [("A", 0, 0)], M.E_BAD_ARG),  # empty run
        (2, [("A", 100, 1)], M.E_BAD_ARG),  # misaligned file offset
        (2, [(-1, 0, 1)], M.E_BAD_ARG),  # negative fd
        (2, [(1 << 20, 0, 1)], -errno.EBADF),  # not an open fd
        (2, [("A", 0, 1), ("A", PAGE_SIZE, 1)], 0),
    ],
)
def test_map_runs_contract_agrees(ram, reserved, runs, want):
    ops = (M._ops(True), M._ops(False))
    runs = [(ram.fds[fd] if isinstance(fd, str) else fd, off, n) for fd, off, n in runs]
    for o in ops:
        mm = _reservation(reserved)
        try:
            assert o.map_runs(M._address_of(mm), reserved, runs) == want
            if want != 0:
                assert mm[:] == bytes(reserved * PAGE_SIZE)  # nothing was mapped over it
            else:
                assert mm[:] == os.pread(ram.fds["A"], reserved * PAGE_SIZE, 0)
        finally:
            mm.close()
