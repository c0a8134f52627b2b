"""GPADLs: guest page lists registered for host access.

This module holds the value types shared by the control plane (which assembles a
GPADL from GPADL_HEADER + GPADL_BODY messages) and guest memory (which maps one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

PAGE_SIZE = 4096
PAGE_SHIFT = 12


@dataclass(frozen=True, slots=True, eq=False)
class GpaRange:
    """One `gpa_range`: byte_count bytes starting byte_offset into the first PFN.

    `pfns` is any int sequence: the bus stores guest page lists as array('Q').
    """

    byte_count: int
    byte_offset: int
    pfns: Sequence[int]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GpaRange):
            return NotImplemented
        return (
            self.byte_count == other.byte_count
            and self.byte_offset == other.byte_offset
            and tuple(self.pfns) == tuple(other.pfns)
        )

    def __hash__(self) -> int:
        return hash((self.byte_count, self.byte_offset, tuple(self.pfns)))


@dataclass(frozen=True, slots=True)
class Gpadl:
    """A fully received, validated GPADL (every PFN present, ranges consistent)."""

    handle: int
    relid: int
    ranges: tuple[GpaRange, ...]

    @property
    def pfns(self) -> Sequence[int]:
        """All PFNs of all ranges, in order (for ring and buffer GPADLs: one range)."""
        if len(self.ranges) == 1:
            return self.ranges[0].pfns
        return tuple(p for r in self.ranges for p in r.pfns)

    @property
    def page_count(self) -> int:
        return sum(len(r.pfns) for r in self.ranges)
