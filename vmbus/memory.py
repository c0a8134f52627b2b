"""Guest RAM as the host sees it: regions, GPA-range iovecs, and GPADL mappings.

The VMM hands each guest RAM region over as an fd (memfd or shared file) with its
guest-physical base; we map each region once, MAP_SHARED. Everything the guest
names (GPAs, PFNs, lengths, ring offsets) is untrusted: it is validated here, and
every rejection is one `GuestMemoryError`, never an access outside guest RAM.

Two ways in:
- per request (storvsc data buffers, page-buffer sends): a GPA or a `GpaRange`
  becomes a list of memoryviews into the region mappings (`iovecs`,
  `iovecs_for_range`), ready for `os.preadv`/`os.pwritev`: zero copies;
- per GPADL (rings, netvsc buffers): the pages are made virtually contiguous in a
  reserved VA range, each run of physically consecutive pages mapped with
  mmap(MAP_FIXED|MAP_SHARED) from the region's fd (`map_linear`), ring data pages
  twice back to back so a wrapping packet is one span (`map_ring_pair`).

Reference safety: every VA range (region or GPADL mapping) is owned by a stdlib
`mmap.mmap` object, and every memoryview we hand out is derived from it, so
CPython counts the exports. `close()` refuses (raises `GuestMemoryError`, leaves
everything mapped and usable) while any view, slice of a view, or
`ffi.from_buffer` of a view is still alive; release them first (`del`,
`memoryview.release()`, `ffi.release()`). A closed mapping therefore has no
views left that could dangle.

Not thread-safe for mutation (add_region, map_*, close): call those from one
thread (the trio loop). Lookups (`iovecs*`, `read`, `write`) read one immutable
snapshot of the region table and may run in worker threads meanwhile.

Sealed files only: a region's file must carry F_SEAL_SHRINK (a memfd created with
MFD_ALLOW_SEALING, hugetlb or not). A VMM that could shrink the file under our
mapping would turn our next access into SIGBUS, which kills the whole process and
every VM it serves; a seal cannot be removed, so checking it once is enough.
`sealed_memfd` makes such a file (docs/attach-protocol.md explains the choice).

Backends: the PFN walk and the batched MAP_FIXED have a C fast path
(native/memory.c) and a pure-Python twin (`_PyOps`, ctypes on libc mmap) with the
same contract; `VMBUSD_NATIVE=0` selects the twin.
"""

from __future__ import annotations

import bisect
import ctypes
import fcntl
import mmap
import os
import platform
import stat
import struct
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vmbus import native as _native_sel
from vmbus.gpadl import PAGE_SHIFT, PAGE_SIZE, Gpadl, GpaRange

# --- limits (every bound on guest input is a named constant) -----------------------

MAX_REGIONS = 64
"""Guest RAM regions per VM (memory hot-plug adds regions)."""

MAX_GPA = 1 << 52
"""Regions must end at or below the x86-64 architectural physical address limit."""

MAX_GPADL_PAGES = 8190
"""Pages in one GPADL: range_buflen is a u16, so (65535 - 8) // 8 PFNs (spec §4.4)."""

MAX_MAPPED_PAGES = 1 << 20
"""VA pages reserved by the live linear/ring mappings of one VM (4 GiB of VA)."""

MAX_MAPPED_RUNS = 16384
"""VMAs (page runs) created by the live mappings of one VM: scattered pages cost one
VMA each, and vm.max_map_count (65530 by default) is per process."""


def _process_run_budget() -> int:
    """Three quarters of vm.max_map_count (the kernel's per-process VMA limit), the
    rest left for malloc, libraries and the region mappings. An administrator who
    serves many VMs with scattered device buffers raises the sysctl; this follows."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
    except (OSError, ValueError):
        limit = 65530  # the kernel's default
    return max(4096, limit * 3 // 4)


MAX_PROCESS_MAPPED_RUNS = _process_run_budget()
"""The same across every VM served by this process (49,147 with the default sysctl)."""

REQUIRED_SEALS = fcntl.F_SEAL_SHRINK
"""Seals a region's file must carry: nobody can shrink it under our mappings (SIGBUS).
Growing is harmless (our mappings cover only pages that already exist), so it is
not required: a VMM may grow one memfd for hot-plugged RAM."""

FORBIDDEN_SEALS = fcntl.F_SEAL_WRITE | getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10)
"""Seals that make a writable shared mapping impossible: vmbusd writes guest RAM."""


def sealed_memfd(name: str, size: int, *, seals: int = REQUIRED_SEALS | fcntl.F_SEAL_GROW) -> int:
    """A memfd of ``size`` bytes that GuestMemory accepts: sealed against shrinking
    (and, by default, growing), close-on-exec. What a VMM should hand vmbusd."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except BaseException:
        os.close(fd)
        raise
    return fd


def file_seals(fd: int) -> int:
    """The seals of fd's file; 0 for a file that cannot be sealed (not shmem/hugetlbfs)."""
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:  # EINVAL: a file system without seals
        return 0


U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
MAX_PFN = U64_MAX >> PAGE_SHIFT

# Return codes shared with native/memory.h; below -4095, so never a -errno.
E_BAD_ARG = -4097
E_RANGE = -4098
E_PFN = -4099
E_OUT_SMALL = -4100

_MAP_FIXED = 0x10  # the same on every Linux architecture we run on
_MAP_NORESERVE = getattr(
    mmap, "MAP_NORESERVE", 0x4000 if platform.machine() in ("x86_64", "aarch64") else 0
)


class GuestMemoryError(Exception):
    """A guest-supplied address, length or layout, or a region, was rejected."""


@dataclass(frozen=True, slots=True)
class Region:
    """One guest RAM region: [gpa, gpa + size) backed by its fd at file_offset."""

    gpa: int
    size: int
    file_offset: int


# --- backends ---------------------------------------------------------------------

Seg = tuple[int, int, int]  # (region index, byte offset in region, length)
_SEG = struct.Struct("=IIQQ")  # struct vmb_iov_seg, native layout


def _walk_error(code: int) -> GuestMemoryError:
    if code == E_PFN:
        return GuestMemoryError("PFN outside guest RAM")
    if code == E_RANGE:
        return GuestMemoryError(
            "bad GPA range: byte_offset >= 4096, byte_count 0, u32 overflow, "
            "or PFN count != ceil((byte_offset + byte_count) / 4096)"
        )
    return GuestMemoryError(f"GPA range walk failed ({code})")


class _PyOps:
    """Pure-Python twin of native/memory.c (same contract, same return codes)."""

    name = "python"

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = getattr(libc, "mmap64", None) or libc.mmap
        fn.restype = ctypes.c_void_p
        fn.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int64,
        ]
        self._mmap = fn

    def table(self, regions: Sequence[Region]) -> Any:
        return ([r.gpa for r in regions], [r.size for r in regions])

    def map_runs(self, base: int, reserved_pages: int, runs: Sequence[tuple[int, int, int]]) -> int:
        """Map (fd, file_offset, npages) runs back to back from base; 0 or -errno."""
        if base <= 0 or base & (PAGE_SIZE - 1) or not 0 <= reserved_pages <= MAX_PFN:
            return E_BAD_ARG
        total = 0
        for fd, file_offset, npages in runs:
            if not 0 <= fd <= 0x7FFFFFFF or not 0 < npages <= U32_MAX:
                return E_BAD_ARG
            if file_offset & (PAGE_SIZE - 1) or not 0 <= file_offset < 1 << 63:
                return E_BAD_ARG
            total += npages
            if total > reserved_pages:
                return E_BAD_ARG
        at = base
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        for fd, file_offset, npages in runs:
            length = npages << PAGE_SHIFT
            p = self._mmap(at, length, prot, mmap.MAP_SHARED | _MAP_FIXED, fd, file_offset)
            if p is None or p == U64_MAX:  # MAP_FAILED
                return -ctypes.get_errno()
            if p != at:
                return E_BAD_ARG
            at += length
        return 0

    def walk(
        self, table: Any, byte_offset: int, byte_count: int, pfns: Sequence[int]
    ) -> list[Seg] | int:
        """Validate a GPA range (untrusted) and split it into coalesced segments."""
        gpas, sizes = table
        if not 0 <= byte_offset < PAGE_SIZE or not 0 < byte_count <= U32_MAX:
            return E_RANGE
        end = byte_offset + byte_count
        if end > U32_MAX or len(pfns) != (end + PAGE_SIZE - 1) >> PAGE_SHIFT:
            return E_RANGE
        out: list[list[int]] = []
        last = -1
        lgpa = lsize = 0
        for i, pfn in enumerate(pfns):
            if not 0 <= pfn <= MAX_PFN:
                return E_PFN
            gpa = pfn << PAGE_SHIFT
            if last < 0 or not 0 <= gpa - lgpa < lsize:
                ri = bisect.bisect_right(gpas, gpa) - 1
                if ri < 0 or gpa - gpas[ri] >= sizes[ri]:
                    return E_PFN
                last, lgpa, lsize = ri, gpas[ri], sizes[ri]
            page_start = i << PAGE_SHIFT
            start = byte_offset if i == 0 else page_start
            length = min(page_start + PAGE_SIZE, end) - start
            off = gpa - lgpa + start - page_start
            if out and out[-1][0] == last and out[-1][1] + out[-1][2] == off:
                out[-1][2] += length
            else:
                out.append([last, off, length])
        return [(s[0], s[1], s[2]) for s in out]


class _NativeOps:
    """The C fast path (native/memory.c) behind the same interface as `_PyOps`."""

    name = "native"

    def __init__(self, ffi: Any, lib: Any) -> None:
        self._ffi, self._lib = ffi, lib
        if (lib.VMB_MEM_E_PFN, lib.VMB_MEM_E_RANGE) != (E_PFN, E_RANGE) or ffi.sizeof(
            "struct vmb_iov_seg"
        ) != _SEG.size:
            raise ImportError("vmbus._native memory codes disagree with vmbus/memory.py")

    def table(self, regions: Sequence[Region]) -> Any:
        arr = self._ffi.new("struct vmb_mem_region[]", len(regions))
        for i, r in enumerate(regions):
            arr[i].gpa = r.gpa
            arr[i].size = r.size
        return (arr, len(regions))

    def map_runs(self, base: int, reserved_pages: int, runs: Sequence[tuple[int, int, int]]) -> int:
        ffi = self._ffi
        arr = ffi.new("struct vmb_map_run[]", len(runs))
        try:
            for i, (fd, file_offset, npages) in enumerate(runs):
                arr[i].fd = fd
                arr[i].npages = npages
                arr[i].file_offset = file_offset
        except OverflowError:
            return E_BAD_ARG
        if not 0 <= reserved_pages <= U64_MAX:
            return E_BAD_ARG
        return int(
            self._lib.vmb_va_map_runs(ffi.cast("void *", base), reserved_pages, arr, len(runs))
        )

    def walk(
        self, table: Any, byte_offset: int, byte_count: int, pfns: Sequence[int]
    ) -> list[Seg] | int:
        ffi = self._ffi
        if not (0 <= byte_offset <= U64_MAX and 0 <= byte_count <= U64_MAX):
            return E_RANGE
        try:
            # array('Q') (how the bus keeps page lists) is not a list to cffi: copy it
            parr = ffi.new("uint64_t[]", pfns if isinstance(pfns, list | tuple) else list(pfns))
        except OverflowError:  # a negative or > u64 PFN: not from the wire
            return E_PFN
        n = len(pfns)
        out = ffi.new("struct vmb_iov_seg[]", n or 1)
        arr, nregions = table
        rc = self._lib.vmb_gpa_range_walk(arr, nregions, byte_offset, byte_count, parr, n, out, n)
        if rc < 0:
            return int(rc)
        # One bulk unpack instead of 3 cdata field reads per segment (4x faster).
        return [(r, o, n) for r, _, o, n in _SEG.iter_unpack(ffi.buffer(out, rc * _SEG.size))]


_py_ops: _PyOps | None = None


def _ops(use_native: bool | None) -> _PyOps | _NativeOps:
    global _py_ops
    if use_native is None:
        use_native = _native_sel.NATIVE
    if use_native:
        if _native_sel.NATIVE:
            return _NativeOps(_native_sel.ffi, _native_sel.lib)
        mod = _native_sel.native_module()
        return _NativeOps(mod.ffi, mod.lib)
    if _py_ops is None:
        _py_ops = _PyOps()
    return _py_ops


# --- process-wide VMA accounting ---------------------------------------------------

_process_lock = threading.Lock()
_process_runs = 0


def _take_process_runs(n: int) -> None:
    global _process_runs
    with _process_lock:
        if _process_runs + n > MAX_PROCESS_MAPPED_RUNS:
            raise GuestMemoryError(
                f"too many mapped page runs in this process ({_process_runs} + {n} > "
                f"{MAX_PROCESS_MAPPED_RUNS})"
            )
        _process_runs += n


def _give_process_runs(n: int) -> None:
    global _process_runs
    with _process_lock:
        _process_runs -= n


def _libc_mmap(addr: int, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    """mmap(2) at a fixed address (the stdlib's mmap cannot); returns the address."""
    fn = _PyOps()._mmap
    res = fn(addr, length, prot, flags, fd, offset)
    return -1 if res is None or res == U64_MAX else int(res)


def _address_of(mm: mmap.mmap) -> int:
    """The start address of an mmap object (the temporary export is released at once)."""
    buf = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(buf)
    finally:
        del buf


class _Resources:
    """What must be given back even if a GuestMemory is dropped without close()."""

    __slots__ = ("fds", "runs")

    def __init__(self) -> None:
        self.fds: set[int] = set()
        self.runs = 0

    def release(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        _give_process_runs(self.runs)
        self.runs = 0


# --- mappings ----------------------------------------------------------------------


class _Mapping:
    """A reserved VA range with guest pages MAP_FIXED into it; owned by an mmap."""

    __slots__ = ("_mm", "_mv", "_owner", "_pages", "_runs")

    def __init__(self, owner: GuestMemory, mm: mmap.mmap, pages: int, runs: int) -> None:
        self._owner = owner
        self._mm: mmap.mmap | None = mm
        self._mv = memoryview(mm)
        self._pages = pages
        self._runs = runs

    @property
    def closed(self) -> bool:
        return self._mm is None

    def _slice(self, start: int, stop: int) -> memoryview:
        if self._mm is None:
            raise GuestMemoryError("mapping is closed")
        return self._mv[start:stop]

    def close(self) -> None:
        """Unmap. Raises GuestMemoryError, and stays mapped, while views are alive."""
        if self._mm is None:
            return
        self._mv.release()  # never handed out, so it has no exports of its own
        try:
            self._mm.close()  # munmap of the whole range, the MAP_FIXED runs included
        except BufferError:
            self._mv = memoryview(self._mm)
            raise GuestMemoryError(
                "mapping still has exported views: release them before close()"
            ) from None
        self._mm = None
        self._owner._forget(self)

    def revoke(self) -> None:
        """Cut the mapping off from guest RAM even though views of it are alive: every
        page is replaced (MAP_FIXED) by a private zero page, so a holder that kept a
        view past its release reads zeros and writes into memory of its own. The
        range is unmapped when the last of those views goes."""
        if self._mm is None:
            return
        base, length = _address_of(self._mm), len(self._mm)
        addr = _libc_mmap(
            base,
            length,
            mmap.PROT_READ | mmap.PROT_WRITE,
            mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED | _MAP_NORESERVE,
            -1,
            0,
        )
        if addr != base:  # cannot happen for a range we own; never leave it mapped
            raise GuestMemoryError(f"cannot revoke mapping: errno {ctypes.get_errno()}")
        self._mv.release()
        self._mm = None  # the views keep the mmap object (and so the range) alive
        self._owner._forget(self)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LinearMapping(_Mapping):
    """All pages of a GPADL, in GPADL order, virtually contiguous and writable."""

    __slots__ = ()

    @property
    def size(self) -> int:
        return self._pages << PAGE_SHIFT

    @property
    def view(self) -> memoryview:
        """A fresh writable view over all `size` bytes (it pins the mapping open)."""
        return self._slice(0, self._pages << PAGE_SHIFT)


class RingPairMapping(_Mapping):
    """The two rings of a channel's ring GPADL, data pages mapped twice (spec §1.3).

    VA layout: [up hdr][up data][up data][down hdr][down data][down data].
    """

    __slots__ = ("downstream_size", "upstream_size")

    def __init__(
        self, owner: GuestMemory, mm: mmap.mmap, pages: int, runs: int, up: int, down: int
    ) -> None:
        super().__init__(owner, mm, pages, runs)
        self.upstream_size = up
        self.downstream_size = down

    @property
    def upstream_hdr(self) -> memoryview:
        """Guest->host ring header page (4096 bytes)."""
        return self._slice(0, PAGE_SIZE)

    @property
    def upstream_data(self) -> memoryview:
        """Guest->host data, 2*upstream_size bytes; the second half mirrors the first."""
        return self._slice(PAGE_SIZE, PAGE_SIZE + 2 * self.upstream_size)

    @property
    def downstream_hdr(self) -> memoryview:
        """Host->guest ring header page (4096 bytes)."""
        start = PAGE_SIZE + 2 * self.upstream_size
        return self._slice(start, start + PAGE_SIZE)

    @property
    def downstream_data(self) -> memoryview:
        """Host->guest data, 2*downstream_size bytes; the second half mirrors the first."""
        start = 2 * PAGE_SIZE + 2 * self.upstream_size
        return self._slice(start, start + 2 * self.downstream_size)


# --- guest memory ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Table:
    """An immutable snapshot of the regions, swapped whole on add_region."""

    regions: tuple[Region, ...]
    gpas: tuple[int, ...]
    views: tuple[memoryview, ...]
    fds: tuple[int, ...]
    backend: Any


class GuestMemory:
    """One VM's guest RAM: its regions, and the GPADL mappings made from them.

    After `close()` every view obtained from it is gone (close refuses otherwise)
    and every method raises GuestMemoryError.
    """

    def __init__(
        self,
        *,
        native: bool | None = None,
        max_mapped_pages: int = MAX_MAPPED_PAGES,
        max_mapped_runs: int = MAX_MAPPED_RUNS,
        require_sealed: bool = True,
    ) -> None:
        """require_sealed=False only for a process mapping RAM it owns itself (the
        simulated VM's view of its own memfd): never for fds from a peer."""
        self._ops = _ops(native)
        self._require_sealed = require_sealed
        self._max_pages = max_mapped_pages
        self._max_runs = max_mapped_runs
        self._mms: list[mmap.mmap] = []  # parallel to the table's regions
        self._table = _Table((), (), (), (), self._ops.table(()))
        self._mappings: dict[int, _Mapping] = {}
        self._mapped_pages = 0
        self._mapped_runs = 0
        self._closed = False
        # The mmaps unmap themselves when collected; our fd dups and the process-wide
        # run count need this.
        self._res = _Resources()
        weakref.finalize(self, self._res.release)

    @property
    def backend(self) -> str:
        """'native' or 'python'."""
        return self._ops.name

    @property
    def regions(self) -> tuple[Region, ...]:
        """The regions, sorted by GPA (read-only)."""
        return self._table.regions

    @property
    def mapped_pages(self) -> int:
        """VA pages reserved by live GPADL mappings (bounded by max_mapped_pages)."""
        return self._mapped_pages

    def _check_open(self) -> None:
        if self._closed:
            raise GuestMemoryError("guest memory is closed")

    # --- regions

    def add_region(self, gpa: int, size: int, fd: int, offset: int = 0) -> None:
        """Map [gpa, gpa+size) from fd at offset, MAP_SHARED. The caller keeps fd.

        fd's file must be sealed with F_SEAL_SHRINK (unless require_sealed=False)."""
        self._check_open()
        for name, v in (("gpa", gpa), ("size", size), ("offset", offset)):
            if not isinstance(v, int) or v < 0 or v & (PAGE_SIZE - 1):
                raise GuestMemoryError(f"region {name} {v!r} is not a page-aligned integer")
        if size == 0 or gpa + size > MAX_GPA:
            raise GuestMemoryError(f"region [{gpa:#x}, +{size:#x}) is empty or above MAX_GPA")
        t = self._table
        if len(t.regions) >= MAX_REGIONS:
            raise GuestMemoryError(f"more than {MAX_REGIONS} regions")
        i = bisect.bisect_right(t.gpas, gpa)
        if (i > 0 and t.regions[i - 1].gpa + t.regions[i - 1].size > gpa) or (
            i < len(t.regions) and gpa + size > t.regions[i].gpa
        ):
            raise GuestMemoryError(f"region [{gpa:#x}, +{size:#x}) overlaps another")
        if not isinstance(fd, int) or fd < 0:
            raise GuestMemoryError(f"bad fd {fd!r}")
        try:
            dfd = os.dup(fd)  # non-inheritable: not leaked into children
        except OSError as exc:
            raise GuestMemoryError(f"bad fd {fd}: {exc.strerror}") from None
        self._res.fds.add(dfd)
        try:
            st = os.fstat(dfd)
            if not stat.S_ISREG(st.st_mode):
                raise GuestMemoryError(f"fd {fd} is not a regular file or memfd")
            if self._require_sealed:
                self._check_seals(fd, dfd)
                st = os.fstat(dfd)  # the size now that it can no longer shrink
            if st.st_size < offset + size:
                raise GuestMemoryError(
                    f"fd {fd} is {st.st_size:#x} bytes, shorter than offset+size {offset + size:#x}"
                )
            prot = mmap.PROT_READ | mmap.PROT_WRITE
            mm = mmap.mmap(dfd, size, flags=mmap.MAP_SHARED, prot=prot, offset=offset)
        except GuestMemoryError:
            self._close_fd(dfd)
            raise
        except (OSError, ValueError) as exc:
            self._close_fd(dfd)
            raise GuestMemoryError(f"cannot map fd {fd}: {exc}") from None
        region = Region(gpa, size, offset)
        regions = (*t.regions[:i], region, *t.regions[i:])
        self._mms.insert(i, mm)
        self._table = _Table(
            regions,
            (*t.gpas[:i], gpa, *t.gpas[i:]),
            (*t.views[:i], memoryview(mm), *t.views[i:]),
            (*t.fds[:i], dfd, *t.fds[i:]),
            self._ops.table(regions),
        )

    @staticmethod
    def _check_seals(fd: int, dfd: int) -> None:
        """Refuse a file its owner could still shrink under our mapping (SIGBUS).

        Checked before the size: seals are never removed, so a size read after this
        stays true for as long as the file exists.
        """
        seals = file_seals(dfd)
        if seals & REQUIRED_SEALS != REQUIRED_SEALS:
            raise GuestMemoryError(
                f"fd {fd} is not sealed against shrinking: guest RAM must be a memfd "
                "created with MFD_ALLOW_SEALING and sealed with F_SEAL_SHRINK "
                "(a file that can shrink under vmbusd's mapping would crash it)"
            )
        if seals & FORBIDDEN_SEALS:
            raise GuestMemoryError(
                f"fd {fd} is sealed against writes (F_SEAL_WRITE/F_SEAL_FUTURE_WRITE): "
                "vmbusd must write guest RAM"
            )

    def _close_fd(self, fd: int) -> None:
        self._res.fds.discard(fd)
        os.close(fd)

    # --- per-request access

    def _segments(self, t: _Table, gpa: int, length: int) -> list[Seg]:
        if not isinstance(gpa, int) or not isinstance(length, int):
            raise GuestMemoryError("gpa and length must be integers")
        if gpa < 0 or length < 0 or gpa + length > U64_MAX + 1:
            raise GuestMemoryError(f"GPA range [{gpa:#x}, +{length:#x}) overflows a u64")
        if length == 0:
            return []
        ri = bisect.bisect_right(t.gpas, gpa) - 1
        out: list[Seg] = []
        while True:
            if ri < 0 or ri >= len(t.regions):
                raise GuestMemoryError(f"GPA range [{gpa:#x}, +{length:#x}) not in guest RAM")
            r = t.regions[ri]
            off = gpa - r.gpa
            if not 0 <= off < r.size:
                raise GuestMemoryError(f"GPA range [{gpa:#x}, +{length:#x}) not in guest RAM")
            n = min(length, r.size - off)
            out.append((ri, off, n))
            length -= n
            if length == 0:
                return out
            gpa += n
            ri += 1  # only a region starting exactly at gpa continues the range

    def contains(self, gpa: int, length: int) -> bool:
        """Whether [gpa, gpa+length) is all guest RAM (an empty range always is)."""
        self._check_open()
        try:
            self._segments(self._table, gpa, length)
        except GuestMemoryError:
            return False
        return True

    def iovecs(self, gpa: int, length: int) -> list[memoryview]:
        """Views of [gpa, gpa+length), one per region crossed (regions are separate
        mappings, so adjacent regions still give two views); [] for length 0."""
        self._check_open()
        t = self._table
        return [t.views[ri][off : off + n] for ri, off, n in self._segments(t, gpa, length)]

    def iovecs_for_range(self, rng: GpaRange) -> list[memoryview]:
        """Views of a GPA-direct range (untrusted): physically adjacent PFNs coalesce."""
        self._check_open()
        t = self._table
        segs = self._ops.walk(t.backend, rng.byte_offset, rng.byte_count, rng.pfns)
        if isinstance(segs, int):
            raise _walk_error(segs)
        return [t.views[ri][off : off + n] for ri, off, n in segs]

    def read(self, gpa: int, length: int) -> bytes:
        """A private copy of guest memory (the guest may change it right after)."""
        return b"".join(self.iovecs(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copy data into guest memory at gpa."""
        src = memoryview(data).cast("B")
        pos = 0
        for v in self.iovecs(gpa, len(src)):
            v[:] = src[pos : pos + len(v)]
            pos += len(v)

    # --- GPADL mappings

    def _map(self, flat: Sequence[int]) -> tuple[mmap.mmap, int, int]:
        """Reserve len(flat) pages of VA and map page flat[i] at page i."""
        t = self._table
        npages = len(flat)
        if npages == 0:
            raise GuestMemoryError("empty GPADL")
        if self._mapped_pages + npages > self._max_pages:
            raise GuestMemoryError(
                f"mapping {npages} pages would exceed the per-VM cap of {self._max_pages}"
            )
        segs = self._ops.walk(t.backend, 0, npages << PAGE_SHIFT, flat)
        if isinstance(segs, int):
            raise _walk_error(segs)
        nruns = len(segs)
        if self._mapped_runs + nruns > self._max_runs:
            raise GuestMemoryError(
                f"mapping {nruns} page runs would exceed the per-VM cap of {self._max_runs}"
            )
        runs = [
            (t.fds[ri], t.regions[ri].file_offset + off, n >> PAGE_SHIFT) for ri, off, n in segs
        ]
        _take_process_runs(nruns)
        # The reservation is an anonymous private NORESERVE mapping owned by a stdlib
        # mmap, so CPython counts the views exported from it (see the module doc).
        # It is PROT_READ|PROT_WRITE rather than PROT_NONE only because CPython makes
        # the buffer of a mapping without PROT_WRITE read-only; every page of it is
        # replaced by a MAP_FIXED guest run before any view exists, and on a partial
        # failure it is unmapped whole.
        try:
            mm = mmap.mmap(
                -1,
                npages << PAGE_SHIFT,
                flags=mmap.MAP_PRIVATE | _MAP_NORESERVE,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
            )
        except OSError as exc:
            _give_process_runs(nruns)
            raise GuestMemoryError(f"cannot reserve {npages} pages of VA: {exc}") from None
        rc = self._ops.map_runs(_address_of(mm), npages, runs)
        if rc != 0:
            mm.close()
            _give_process_runs(nruns)
            msg = os.strerror(-rc) if -4096 < rc < 0 else f"code {rc}"
            raise GuestMemoryError(f"cannot map GPADL pages: {msg}")
        self._mapped_pages += npages
        self._mapped_runs += nruns
        self._res.runs += nruns
        return mm, npages, nruns

    def _forget(self, m: _Mapping) -> None:
        if self._mappings.pop(id(m), None) is not None:
            self._mapped_pages -= m._pages
            self._mapped_runs -= m._runs
            self._res.runs -= m._runs
            _give_process_runs(m._runs)

    def map_linear(self, gpadl: Gpadl) -> LinearMapping:
        """Map all pages of a GPADL (in order) into one contiguous writable view."""
        self._check_open()
        for rng in gpadl.ranges:
            _check_gpadl_range(rng)
        pfns = gpadl.pfns
        if len(pfns) > MAX_GPADL_PAGES:
            raise GuestMemoryError(f"GPADL of {len(pfns)} pages > {MAX_GPADL_PAGES}")
        mm, npages, nruns = self._map(pfns)
        m = LinearMapping(self, mm, npages, nruns)
        self._mappings[id(m)] = m
        return m

    def map_ring_pair(self, gpadl: Gpadl, downstream_offset: int) -> RingPairMapping:
        """Map a channel's ring GPADL: pages [0,K) upstream, [K,N) downstream (§1.2)."""
        self._check_open()
        if len(gpadl.ranges) != 1:
            raise GuestMemoryError("ring GPADL must have exactly one range")
        rng = gpadl.ranges[0]
        pfns = rng.pfns
        n = len(pfns)
        if rng.byte_offset != 0 or rng.byte_count != n * PAGE_SIZE:
            raise GuestMemoryError("ring GPADL range must be offset 0, whole pages")
        if n > MAX_GPADL_PAGES:
            raise GuestMemoryError(f"GPADL of {n} pages > {MAX_GPADL_PAGES}")
        k = downstream_offset
        if not isinstance(k, int) or k < 2 or n < k + 2:
            raise GuestMemoryError(
                f"downstream ring offset {k!r} of {n} pages: need 2 <= K and K + 2 <= N"
            )
        up, down = pfns[1:k], pfns[k + 1 :]
        flat = (pfns[0], *up, *up, pfns[k], *down, *down)
        mm, npages, nruns = self._map(flat)
        m = RingPairMapping(self, mm, npages, nruns, len(up) << PAGE_SHIFT, len(down) << PAGE_SHIFT)
        self._mappings[id(m)] = m
        return m

    # --- teardown

    def close(self) -> None:
        """Unmap every mapping and region and close our fd dups.

        Whatever still has exported views stays mapped (so those views stay valid)
        and close raises GuestMemoryError; the object is closed for new use either
        way, and calling close() again retries.
        """
        self._closed = True
        busy = 0
        for m in list(self._mappings.values()):
            try:
                m.close()
            except GuestMemoryError:
                busy += 1
        t = self._table
        keep: list[int] = []
        for i, (mm, mv, fd) in enumerate(zip(self._mms, t.views, t.fds, strict=True)):
            mv.release()
            try:
                mm.close()
            except BufferError:
                keep.append(i)
                continue
            self._close_fd(fd)
        regions = tuple(t.regions[i] for i in keep)
        self._table = _Table(
            regions,
            tuple(t.gpas[i] for i in keep),
            tuple(memoryview(self._mms[i]) for i in keep),
            tuple(t.fds[i] for i in keep),
            self._ops.table(regions),
        )
        self._mms = [self._mms[i] for i in keep]
        if busy or keep:
            raise GuestMemoryError(
                f"{busy} mappings and {len(keep)} regions still have exported views"
            )

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_gpadl_range(rng: GpaRange) -> None:
    """A GPADL range must be self-consistent (spec §8.1 'each gpa_range')."""
    off, count = rng.byte_offset, rng.byte_count
    if not 0 <= off < PAGE_SIZE or not 0 < count <= U32_MAX or off + count > U32_MAX:
        raise GuestMemoryError(f"bad GPADL range: byte_offset {off}, byte_count {count}")
    if len(rng.pfns) != (off + count + PAGE_SIZE - 1) >> PAGE_SHIFT:
        raise GuestMemoryError(
            f"GPADL range has {len(rng.pfns)} PFNs for byte_offset {off} + byte_count {count}"
        )
