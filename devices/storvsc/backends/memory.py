"""The RAM disk: sparse, so a large disk costs only the chunks the guest has written.

Storage is a dict of fixed-size chunks; a chunk that was never written (or was
wholly unmapped / zeroed) is absent and reads as zeros. Data is copied once,
between a chunk and the caller's buffer.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import trio

from devices.storvsc.backends.base import BackendConfigError, BackendIOError

DEFAULT_CHUNK_SIZE = 64 * 1024  # allocation unit; also the unit an unmap can free
DEFAULT_MAX_TRANSFER = 8 * 1024 * 1024  # per readv/writev; the SCSI layer bounds it further
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


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
        self._chunks: dict[int, bytearray] = {}
        self._closed = False

    @property
    def allocated_bytes(self) -> int:
        """What the disk costs in RAM right now (tests and stats)."""
        return len(self._chunks) * self.chunk_size

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

    async def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        await trio.lowlevel.checkpoint()
        total = sum(memoryview(b).nbytes for b in buffers)
        self._check(offset, total, write=False)
        for buf in buffers:
            view = memoryview(buf).cast("B")
            pos = 0
            for index, start, n in self._spans(offset, view.nbytes):
                chunk = self._chunks.get(index)
                if chunk is None:
                    view[pos : pos + n] = bytes(n)
                else:
                    view[pos : pos + n] = chunk[start : start + n]
                pos += n
            offset += view.nbytes

    async def writev(self, offset: int, buffers: Sequence[memoryview], fua: bool = False) -> None:
        await trio.lowlevel.checkpoint()
        total = sum(memoryview(b).nbytes for b in buffers)
        self._check(offset, total, write=True)
        for buf in buffers:
            view = memoryview(buf).cast("B")
            pos = 0
            for index, start, n in self._spans(offset, view.nbytes):
                chunk = self._chunks.get(index)
                if chunk is None:
                    chunk = self._chunks[index] = bytearray(self.chunk_size)
                chunk[start : start + n] = view[pos : pos + n]
                pos += n
            offset += view.nbytes

    async def flush(self) -> None:
        await trio.lowlevel.checkpoint()

    def _zero(self, offset: int, length: int) -> None:
        """Drop whole chunks, zero partial ones: either way the range reads as zeros."""
        for index, start, n in self._spans(offset, length):
            if n == self.chunk_size:
                self._chunks.pop(index, None)
            elif (chunk := self._chunks.get(index)) is not None:
                chunk[start : start + n] = bytes(n)

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
        """Grow or shrink; blocks past a shrink are forgotten, so a regrow reads zeros."""
        await trio.lowlevel.checkpoint()
        check_geometry(new_capacity, self.block_size, self.physical_block_exponent)
        if new_capacity < self.capacity:
            self._zero(new_capacity, self.capacity - new_capacity)
        self.capacity = new_capacity

    async def close(self) -> None:
        await trio.lowlevel.checkpoint()
        self._closed = True
        self._chunks.clear()
