"""Guest virtual to physical translation by walking the guest's own page tables.

Used to show the instruction bytes at a faulting rip (what makes an emulation gap
debuggable) and to reach the memory operand of an instruction the VMM emulates. A
walk in Python needs no vCPU ioctl, so it also works on a stopped guest's RAM.
"""

from __future__ import annotations

from typing import Protocol

CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
EFER_LMA = 1 << 10

PTE_P = 1 << 0
PTE_PS = 1 << 7
ADDR_MASK = 0x000F_FFFF_FFFF_F000


class PhysReader(Protocol):
    def read_u64(self, gpa: int) -> int: ...


class PageFault(LookupError):
    """The address is not mapped (or a table lies outside guest RAM)."""


def translate(mem: PhysReader, cr0: int, cr3: int, cr4: int, efer: int, va: int) -> int:
    """The GPA of linear address va, for 64-bit paging (4 or 5 levels) or paging off."""
    if not cr0 & CR0_PG:
        return va & 0xFFFF_FFFF
    if not efer & EFER_LMA:
        raise PageFault("32-bit paging is not supported by this walker")
    levels = 5 if cr4 & CR4_LA57 else 4
    table = cr3 & ADDR_MASK
    for level in range(levels, 0, -1):
        shift = 12 + 9 * (level - 1)
        idx = (va >> shift) & 0x1FF
        try:
            entry = mem.read_u64(table + idx * 8)
        except ValueError as e:
            raise PageFault(f"page table at {table:#x} is outside guest RAM") from e
        if not entry & PTE_P:
            raise PageFault(f"{va:#x} not present at level {level}")
        if level in (2, 3) and entry & PTE_PS:
            base = entry & ADDR_MASK & ~((1 << shift) - 1)
            return base | (va & ((1 << shift) - 1))
        table = entry & ADDR_MASK
    return table | (va & 0xFFF)
