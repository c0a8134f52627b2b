"""A disk that fails on chosen LBAs, to test how a guest handles bad sectors."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from devices.storvsc.backends.base import BackendIOError
from devices.storvsc.backends.memory import MemoryBackend


class FaultyDisk:
    """A RAM disk whose `bad_lbas` fail every read (and, if asked, every write)."""

    physical_block_exponent = 0
    read_only = False
    write_back = False  # RAM: a completed write is as durable as it gets
    can_unmap = True
    can_write_zeroes = True
    unmap_zeroes = True

    def __init__(
        self,
        size: int | str,
        bad_lbas: Iterable[int] = (),
        block_size: int = 512,
        fail_writes: bool = True,
    ) -> None:
        self._disk = MemoryBackend(size, block_size=block_size)
        self.block_size = block_size
        self.capacity = self._disk.capacity
        self.max_transfer = self._disk.max_transfer
        self.bad_lbas = set(bad_lbas)
        self.fail_writes = fail_writes

    def _fail_if_bad(self, offset: int, length: int) -> None:
        first = offset // self.block_size
        last = first + length // self.block_size
        hit = [lba for lba in self.bad_lbas if first <= lba < last]
        if hit:
            # offset= lets the SCSI layer put the failing LBA in the sense data.
            bad = min(hit)
            raise BackendIOError(f"bad sector {bad}", offset=bad * self.block_size)

    async def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self._fail_if_bad(offset, sum(memoryview(b).nbytes for b in buffers))
        await self._disk.readv(offset, buffers)

    async def writev(self, offset: int, buffers: Sequence[memoryview], fua: bool = False) -> None:
        if self.fail_writes:
            self._fail_if_bad(offset, sum(memoryview(b).nbytes for b in buffers))
        await self._disk.writev(offset, buffers, fua)

    async def flush(self) -> None:
        await self._disk.flush()

    async def unmap(self, ranges: Sequence[tuple[int, int]]) -> None:
        await self._disk.unmap(ranges)

    async def write_zeroes(self, offset: int, length: int) -> None:
        await self._disk.write_zeroes(offset, length)

    async def close(self) -> None:
        await self._disk.close()
