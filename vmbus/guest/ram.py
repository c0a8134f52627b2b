"""Guest RAM for the simulated VM: one memfd, split into two GPA regions.

Real guests have RAM below and above the 4 GiB hole, and their driver buffers
come from scattered pages; we do the same (a seeded shuffle of the free pages) so
every GPADL the simulated guest builds is deliberately non-contiguous.

The memfd is sealed against shrinking and growing, as vmbusd requires of every
VMM (docs/attach-protocol.md, "memory"): its size can never change under a mapping.
"""

from __future__ import annotations

import mmap
import os
import random
from dataclasses import dataclass

from vmbus.gpadl import PAGE_SHIFT, PAGE_SIZE
from vmbus.memory import sealed_memfd

HIGH_BASE = 1 << 32


@dataclass(frozen=True)
class RamRegion:
    gpa: int
    size: int
    offset: int  # in the memfd


class GuestRam:
    """The guest's physical memory, as the VMM owns it."""

    def __init__(
        self, size: int = 256 << 20, *, seed: int = 1, split: bool = True, seal: bool = True
    ) -> None:
        """seal=False: an unsealed memfd, as a careless or hostile VMM would send."""
        if size <= 0 or size % (2 * PAGE_SIZE):
            raise ValueError("guest RAM size must be a positive multiple of 8 KiB")
        self.size = size
        self.sealed = seal
        if seal:
            self.fd = sealed_memfd("vmbusd-guest-ram", size)
        else:
            self.fd = os.memfd_create("vmbusd-guest-ram", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, size)
        self._map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self._map)
        self.regions: tuple[RamRegion, ...]
        if split:
            half = size // 2
            self.regions = (RamRegion(0, half, 0), RamRegion(HIGH_BASE, half, half))
        else:
            self.regions = (RamRegion(0, size, 0),)
        free = [
            (r.gpa >> PAGE_SHIFT) + i
            for r in self.regions
            for i in range(1 if r.gpa == 0 else 0, r.size // PAGE_SIZE)  # keep GPA 0 unused
        ]
        random.Random(seed).shuffle(free)
        self._free = free

    def offset_of(self, gpa: int, length: int = 1) -> int:
        """The memfd offset of a guest physical address (raises on a GPA outside RAM)."""
        for r in self.regions:
            if r.gpa <= gpa and gpa + length <= r.gpa + r.size:
                return r.offset + gpa - r.gpa
        raise ValueError(f"GPA {gpa:#x}+{length:#x} is not guest RAM")

    def page(self, pfn: int) -> memoryview:
        off = self.offset_of(pfn << PAGE_SHIFT, PAGE_SIZE)
        return self.view[off : off + PAGE_SIZE]

    def alloc_pages(self, n: int) -> list[int]:
        """n scattered pages (PFNs), zeroed."""
        if n > len(self._free):
            raise MemoryError(f"guest RAM exhausted ({n} pages wanted)")
        pfns = [self._free.pop() for _ in range(n)]
        for pfn in pfns:
            self.page(pfn)[:] = bytes(PAGE_SIZE)
        return pfns

    def free_pages(self, pfns: list[int]) -> None:
        self._free.extend(pfns)

    def close(self) -> None:
        self.view.release()
        self._map.close()
        os.close(self.fd)
