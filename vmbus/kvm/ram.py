"""Guest RAM for the KVM VM: one sealed memfd, mapped once, split around the PCI hole.

Below 3 GiB the RAM starts at GPA 0; what does not fit there goes above 4 GiB, leaving
the 32-bit PCI hole (3-4 GiB: the IOAPIC at 0xFEC00000, the local APIC at 0xFEE00000)
free of RAM, as on a PC. The memfd is sealed against shrinking and growing, which
vmbusd requires of every VMM it shares guest memory with (vmbus/memory.py).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from dataclasses import dataclass

from vmbus.memory import sealed_memfd

PAGE_SIZE = 4096
LOW_RAM_MAX = 3 << 30  # the PCI hole starts here
HIGH_BASE = 1 << 32


@dataclass(frozen=True)
class RamRun:
    """A run of guest RAM: its GPA, size and offset in the memfd."""

    gpa: int
    size: int
    offset: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


class KvmRamError(ValueError):
    """A GPA range that is not (entirely) guest RAM."""


class KvmRam:
    """The guest's RAM as the VMM owns it: the memfd, its mapping, GPA accessors."""

    def __init__(self, size: int, *, name: str = "vmbusd-kvm-ram") -> None:
        if size <= 0 or size % (2 << 20):
            raise ValueError("guest RAM size must be a positive multiple of 2 MiB")
        self.size = size
        self.fd = sealed_memfd(name, size)
        self._map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        anchor = ctypes.c_char.from_buffer(self._map)
        self.host_addr = ctypes.addressof(anchor)
        del anchor
        self.view = memoryview(self._map)
        low = min(size, LOW_RAM_MAX)
        regions = [RamRun(0, low, 0)]
        if size > low:
            regions.append(RamRun(HIGH_BASE, size - low, low))
        self.regions: tuple[RamRun, ...] = tuple(regions)

    def offset_of(self, gpa: int, length: int = 1) -> int:
        """The memfd offset of GPA range [gpa, gpa+length); KvmRamError outside RAM."""
        for r in self.regions:
            if r.gpa <= gpa and gpa + length <= r.end:
                return r.offset + gpa - r.gpa
        raise KvmRamError(f"GPA {gpa:#x}+{length:#x} is not guest RAM")

    def contains(self, gpa: int, length: int = 1) -> bool:
        return any(r.gpa <= gpa and gpa + length <= r.end for r in self.regions)

    def slice(self, gpa: int, length: int) -> memoryview:
        off = self.offset_of(gpa, length)
        return self.view[off : off + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.slice(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.slice(gpa, len(data))[:] = data

    def read_u64(self, gpa: int) -> int:
        v: int = struct.unpack_from("<Q", self.view, self.offset_of(gpa, 8))[0]
        return v

    def write_u64(self, gpa: int, value: int) -> None:
        struct.pack_into("<Q", self.view, self.offset_of(gpa, 8), value)

    def close(self) -> None:
        if self.fd < 0:
            return
        self.view.release()
        try:
            self._map.close()
        except BufferError:
            pass  # a slice is still held somewhere: the mapping goes with the last one
        os.close(self.fd)
        self.fd = -1
