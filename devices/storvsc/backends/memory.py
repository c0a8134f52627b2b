"""The RAM disk: sparse, so a large disk costs only the pages the guest has written.

Storage is one private anonymous mapping of the whole capacity (MAP_NORESERVE):
the kernel gives a page memory only when it is first written, and an untouched
page reads as zeros. A bitmap of `chunk_size` chunks says which chunks were ever
written (`allocated_bytes`); unmapping a whole chunk zeroes it (giving its pages
back where it covers whole pages) and clears its bit. Data is copied once,
between the mapping and the caller's buffer; storvsc's fast path
(devices/storvsc/fastpath.py) copies straight between it and guest RAM in C,
through `fast_storage()`.
"""

from __future__ import annotations

import mmap
import re
from collections.abc import Iterator, Sequence

import trio

from devices.storvsc.backends.base import BackendConfigError, BackendIOError

DEFAULT_CHUNK_SIZE = 64 * 1024  # allocation unit; also the unit an unmap can free
DEFAULT_MAX_TRANSFER = 8 * 1024 * 1024  # per readv/writev; the SCSI layer bounds it further
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux's value; Python < 3.12 lacks it
_ZEROS = bytes(1 << 20)
_NONZERO = re.compile(rb"[^\x00]")


def _anonymous(size: int) -> mmap.mmap:
    """Private anonymous memory of `size` bytes that costs nothing until written."""
    return mmap.mmap(-1, max(1, size), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)


def parse_size(size: int | str) -> int:
    """Accept 1048576, "1M", "64MiB", "2G" (binary units): sizes come from TOML configs."""
    if isinstance(size, bool):
        raise BackendConfigError(f"invalid size {size!r}")
    if isinstance(size, int):
        return size
    m = _SIZE_RE.match(str(size))
    if not m:
        raise BackendConfigError(f"invalid size {size!r}")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]


def check_geometry(size: int, block_size: int, physical_block_exponent: int) -> None:
    """The geometry rules every built-in backend shares."""
    if block_size not in (512, 4096):
        raise BackendConfigError(f"block_size must be 512 or 4096, not {block_size}")
    if size <= 0 or size % block_size:
        raise BackendConfigError(f"size {size} must be a positive multiple of {block_size}")
    if not 0 <= physical_block_exponent <= 15:
        raise BackendConfigError("physical_block_exponent must be 0..15")


class MemoryBackend:
    """A sparse RAM disk. `write_back` only changes what MODE SENSE reports (WCE)."""

    can_unmap = True
    can_write_zeroes = True
    unmap_zeroes = True  # an unmapped block is an absent chunk region: zeros (LBPRZ)

    def __init__(
        self,
        size: int | str,
        block_size: int = 512,
        read_only: bool = False,
        write_back: bool = False,
        physical_block_exponent: int = 0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        max_transfer: int = DEFAULT_MAX_TRANSFER,
    ) -> None:
        capacity = parse_size(size)
        check_geometry(capacity, block_size, physical_block_exponent)
        if chunk_size <= 0 or chunk_size % block_size:
            raise BackendConfigError("chunk_size must be a positive multiple of block_size")
        if max_transfer < block_size:
            raise BackendConfigError("max_transfer must be at least one block")
        self.block_size = block_size
        self.physical_block_exponent = physical_block_exponent
        self.capacity = capacity
        self.read_only = read_only
        self.write_back = write_back
        self.max_transfer = max_transfer
        self.chunk_size = chunk_size
        self._closed = False
        self._mm, self._map = self._allocate(capacity)
        self.generation = 0  # bumped whenever the storage mapping is replaced

    def _allocate(self, capacity: int) -> tuple[mmap.mmap, mmap.mmap]:
        try:
            chunks = -(-capacity // self.chunk_size)
            return _anonymous(capacity), _anonymous(-(-chunks // 8))
        except OSError as err:
            raise BackendConfigError(
                f"cannot reserve {capacity} bytes for a RAM disk: {err}"
            ) from err

    @property
    def allocated_bytes(self) -> int:
        """What the disk's written chunks cost in RAM at most (tests and stats)."""
        if self._closed:
            return 0
        return int.from_bytes(self._map, "little").bit_count() * self.chunk_size

    def fast_storage(self) -> tuple[mmap.mmap, mmap.mmap] | None:
        """(the disk's bytes, the written-chunk bitmap) for storvsc's fast path, which
        copies in place and sets the bits of the chunks it writes; None once closed.
        Valid until `generation` changes."""
        return None if self._closed else (self._mm, self._map)

    def _check(self, offset: int, length: int, write: bool) -> None:
        if self._closed:
            raise BackendIOError("memory disk is closed", offset=offset)
        if write and self.read_only:
            raise BackendIOError("memory disk is read-only", offset=offset)
        if offset % self.block_size or length % self.block_size:
            raise BackendIOError("unaligned I/O", offset=offset)
        if offset < 0 or length < 0 or offset + length > self.capacity:
            raise BackendIOError("I/O beyond the end of the disk", offset=offset)

    def _spans(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """Yield (chunk index, start in chunk, n) pieces covering [offset, offset+length)."""
        cs = self.chunk_size
        while length > 0:
            index, start = divmod(offset, cs)
            n = min(cs - start, length)
            yield index, start, n
            offset += n
            length -= n

    def _has(self, index: int) -> bool:
        return bool(self._map[index >> 3] & (1 << (index & 7)))

    def _mark(self, offset: int, length: int) -> None:
        cs = self.chunk_size
        for index in range(offset // cs, (offset + length - 1) // cs + 1):
            self._map[index >> 3] |= 1 << (index & 7)

    async def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        await trio.lowlevel.checkpoint()
        total = sum(memoryview(b).nbytes for b in buffers)
        self._check(offset, total, write=False)
        mm = self._mm
        for buf in buffers:
            view = memoryview(buf).cast("B")
            n = view.nbytes
            view[:] = mm[offset : offset + n]
            offset += n

    async def writev(self, offset: int, buffers: Sequence[memoryview], fua: bool = False) -> None:
        await trio.lowlevel.checkpoint()
        total = sum(memoryview(b).nbytes for b in buffers)
        self._check(offset, total, write=True)
        mm = self._mm
        if total:
            self._mark(offset, total)
        for buf in buffers:
            view = memoryview(buf).cast("B")
            n = view.nbytes
            mm[offset : offset + n] = view
            offset += n

    async def flush(self) -> None:
        await trio.lowlevel.checkpoint()

    def _clear(self, offset: int, length: int) -> None:
        """Zero [offset, offset+length) of the mapping; whole pages go back to the system."""
        page = mmap.PAGESIZE
        start = -(-offset // page) * page
        end = (offset + length) // page * page
        if end > start:
            self._mm.madvise(mmap.MADV_DONTNEED, start, end - start)  # reads zeros again
            self._fill(offset, start - offset)
            self._fill(end, offset + length - end)
        else:
            self._fill(offset, length)

    def _fill(self, offset: int, length: int) -> None:
        while length > 0:
            n = min(length, len(_ZEROS))
            self._mm[offset : offset + n] = _ZEROS[:n]
            offset += n
            length -= n

    def _zero(self, offset: int, length: int) -> None:
        """Drop whole chunks, zero partial ones: either way the range reads as zeros.
        A chunk never written is zeros already and stays absent."""
        for index, start, n in self._spans(offset, length):
            if not self._has(index):
                continue
            self._clear(index * self.chunk_size + start, n)
            if n == self.chunk_size:
                self._map[index >> 3] &= ~(1 << (index & 7)) & 0xFF

    async def unmap(self, ranges: Sequence[tuple[int, int]]) -> None:
        await trio.lowlevel.checkpoint()
        for offset, length in ranges:
            self._check(offset, length, write=True)
        for offset, length in ranges:
            self._zero(offset, length)

    async def write_zeroes(self, offset: int, length: int) -> None:
        await trio.lowlevel.checkpoint()
        self._check(offset, length, write=True)
        self._zero(offset, length)

    async def resize(self, new_capacity: int) -> None:
        """Grow or shrink; blocks past a shrink are forgotten, so a regrow reads zeros.
        Growing past the mapping copies the written chunks into a larger one."""
        await trio.lowlevel.checkpoint()
        check_geometry(new_capacity, self.block_size, self.physical_block_exponent)
        if new_capacity < self.capacity:
            self._zero(new_capacity, self.capacity - new_capacity)
        elif new_capacity > len(self._mm):
            mm, bitmap = self._allocate(new_capacity)
            bitmap[: len(self._map)] = self._map
            cs = self.chunk_size
            for m in _NONZERO.finditer(self._map):  # whole bytes of the bitmap: 8 chunks
                lo = m.start() * 8 * cs
                hi = min(lo + 8 * cs, self.capacity)
                mm[lo:hi] = self._mm[lo:hi]
            old, self._mm, self._map = self._mm, mm, bitmap
            self.generation += 1
            _close_quietly(old)
        self.capacity = new_capacity

    async def close(self) -> None:
        await trio.lowlevel.checkpoint()
        self._closed = True
        self.generation += 1
        for m in (self._mm, self._map):
            _close_quietly(m)


def _close_quietly(m: mmap.mmap) -> None:
    """Unmap now, or (while storvsc's fast path still holds a view of it) when the
    last view goes."""
    try:
        m.close()
    except BufferError:
        pass
