"""Typed VMBus packets: parse and build the kinds devices use, sans-IO.

The ring layer hands a device `Packet`s: views into the channel's private copy of
the guest's ring (already copied out, descriptors validated; spec §2, §8.2). This
module reads the type-specific descriptor extension of those packets, and builds
`OutPacket`s for the other direction, so devices never write `OutPacket(6, ...)`
or `1 << 6`:

- inband (type 6): `inband(...)`; the payload is the device protocol's business;
- GPA direct (type 9, guest->host: storvsc I/O, netvsc page-buffer sends):
  `parse_gpa_direct(pkt, ram)` for one packet, `GpaDirectDecoder` for a whole
  received batch in one native call; `gpa_direct(...)` builds one (the simulated
  guest's drivers);
- transfer pages (type 7, host->guest: the netvsc receive path):
  `xfer_pages(...)` builds one, `parse_xfer_pages(pkt)` reads one (the simulated
  netvsc VSC);
- completions (type 0xB): `completion(...)`, `completion_for(pkt)`,
  `parse_completion(pkt)`.

Everything from the guest is untrusted: every count, offset and PFN is checked
against the extension it sits in and against guest RAM (spec §8.2 and the
`gpa_range` rules of §8.1), and a malformed packet is one `PacketError`, never an
IndexError, struct.error or an access outside guest RAM. The channel maps
PacketError to a channel reset.

How long things stay valid:
- Views into the private copy (`Packet.ext`/`payload`, `GpaRange.pfns` of a
  parsed packet, `Completion.payload`, `GpaDirectBatch` results) are valid until
  the channel's next `receive()`, which overwrites the copy. Copy what you keep.
- `XferPages.ranges` and `GpaDirect.total_bytes` are plain values: keep them.
- iovecs (`GpaDirect.iovecs`, `GpaDirectBatch.iovecs`) are views of guest RAM,
  not of the copy: they stay valid across receives and pin the guest memory
  mapping until released (see vmbus/memory.py); the guest can change the bytes
  at any time, so read them once.

The batch decode has a C fast path (native/packet.c, contract in
native/packet.h) and a pure-Python twin (`_py_gpa_direct_batch`) with the
same contract; tests compare them byte for byte. `VMBUSD_NATIVE=0` selects the twin.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Any, NamedTuple, TypeAlias

from vmbus import native as _native_sel
from vmbus.gpadl import PAGE_SHIFT, PAGE_SIZE, GpaRange
from vmbus.memory import E_PFN, MAX_PFN, GuestMemory, _ops
from vmbus.ring import (
    DESC_SIZE,
    FLAG_COMPLETION_REQUESTED,
    VM_PKT_COMP,
    VM_PKT_DATA_INBAND,
    VM_PKT_DATA_USING_GPA_DIRECT,
    VM_PKT_DATA_USING_XFER_PAGES,
    Buffer,
    OutPacket,
    Packet,
)

# --- constants -----------------------------------------------------------------------


class PacketType(IntEnum):
    """`enum vmbus_packet_type` (spec §2.3); the ring layer's VM_PKT_* are the same."""

    INVALID = 0x0
    SYNCH = 0x1
    ADD_XFER_PAGESET = 0x2
    RM_XFER_PAGESET = 0x3
    ESTABLISH_GPADL = 0x4
    TEARDOWN_GPADL = 0x5
    INBAND = VM_PKT_DATA_INBAND
    XFER_PAGES = VM_PKT_DATA_USING_XFER_PAGES
    GPADL = 0x8
    GPA_DIRECT = VM_PKT_DATA_USING_GPA_DIRECT
    CANCEL_REQUEST = 0xA
    COMPLETION = VM_PKT_COMP
    ADDITIONAL_PKT = 0xC
    ADDITIONAL_DATA = 0xD


class PacketFlags(IntFlag):
    """Descriptor flags (spec §2.2): bit 0 is the only one defined."""

    NONE = 0
    COMPLETION_REQUESTED = FLAG_COMPLETION_REQUESTED


GPA_DIRECT_HDR_SIZE = 8
"""GPA-direct extension header: reserved u32 (may be garbage, ignored), range_cnt u32."""

GPA_RANGE_MIN_SIZE = 16
"""The smallest `gpa_range`: byte_count, byte_offset and one PFN."""

XFER_PAGES_HDR_SIZE = 8
"""Transfer-page extension header: set id u16, sender_owns_set u8, reserved u8, range_cnt u32."""

XFER_RANGE_SIZE = 8
"""One `vmtransfer_page_range`: byte_count u32, byte_offset u32."""

U32_MAX = 0xFFFFFFFF
_U16_MAX = 0xFFFF
_GPA_HDR = struct.Struct("<II")
_XFER_HDR = struct.Struct("<HBBI")
_RANGE = struct.Struct("<II")
_DESC_HEAD = struct.Struct("<HHH")  # type, offset8, len8

Ram: TypeAlias = "GuestMemory | Callable[[int, int], bool]"
"""Guest RAM as parse_gpa_direct checks it: a GuestMemory, or `contains(gpa, length)`."""


def packet_types_mask(*types: int) -> int:
    """The `Device.packet_types` bit mask for these packet types (one bit per type)."""
    mask = 0
    for t in types:
        if not isinstance(t, int) or not 0 <= t < 32:
            raise ValueError(f"packet type {t!r} out of range [0, 32)")
        mask |= 1 << t
    return mask


# --- errors --------------------------------------------------------------------------


class GpaStatus(IntEnum):
    """Per-packet result of the GPA-direct decode: one value per VMB_GPA_* code."""

    OK = 0
    SKIPPED = 1  # not a GPA-direct packet
    SHORT_EXT = -1
    NO_RANGES = -2
    TOO_MANY_RANGES = -3
    TRUNCATED = -4
    COUNT_ZERO = -5
    OFFSET = -6
    OVERFLOW = -7
    PFN = -8


_REASONS = {
    GpaStatus.SHORT_EXT: "descriptor extension shorter than its 8-byte header",
    GpaStatus.NO_RANGES: "range count 0",
    GpaStatus.TOO_MANY_RANGES: "more ranges than the descriptor extension can hold",
    GpaStatus.TRUNCATED: "range runs past the descriptor extension",
    GpaStatus.COUNT_ZERO: "byte_count 0",
    GpaStatus.OFFSET: f"byte_offset >= page size ({PAGE_SIZE})",
    GpaStatus.OVERFLOW: "byte_offset + byte_count overflows 32 bits",
    GpaStatus.PFN: "PFN outside guest RAM",
}

_BATCH_DONE = 0
_BATCH_MORE = 1
_BATCH_BAD_ARG = -100


class PacketError(Exception):
    """A malformed packet from the guest: the channel cannot trust its peer any more.

    `reason` is one line for the log. GPA-direct failures also carry `status` (what
    was wrong) and `range_index` (which range); otherwise they are None.
    """

    def __init__(
        self, reason: str, *, status: GpaStatus | None = None, range_index: int | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.range_index = range_index


def _gpa_error(status: int, declared: int, bad: int) -> PacketError:
    st = GpaStatus(status)
    if st in (GpaStatus.SHORT_EXT, GpaStatus.NO_RANGES, GpaStatus.TOO_MANY_RANGES):
        where = f"{declared} ranges" if st is GpaStatus.TOO_MANY_RANGES else "packet"
        return PacketError(f"GPA-direct {where}: {_REASONS[st]}", status=st)
    return PacketError(f"GPA-direct range {bad}: {_REASONS[st]}", status=st, range_index=bad)


def expect_type(pkt: Packet, *types: int) -> None:
    """Raise PacketError unless pkt is of one of these types."""
    if pkt.type not in types:
        names = ", ".join(_type_name(t) for t in types)
        raise PacketError(f"packet type {_type_name(pkt.type)}, expected {names}")


def _type_name(t: int) -> str:
    try:
        return PacketType(t).name
    except ValueError:
        return f"{t:#x}"


# --- building ------------------------------------------------------------------------


def _flags(completion_requested: bool) -> int:
    return int(PacketFlags.COMPLETION_REQUESTED if completion_requested else PacketFlags.NONE)


def inband(*body: Buffer, trans_id: int = 0, completion_requested: bool = False) -> OutPacket:
    """An inband packet (type 6) whose payload is the concatenation of body."""
    return OutPacket(PacketType.INBAND, _flags(completion_requested), trans_id, body)


def completion(trans_id: int, *body: Buffer) -> OutPacket:
    """A completion (type 0xB, flags 0) echoing trans_id (spec §8.3)."""
    return OutPacket(PacketType.COMPLETION, 0, trans_id, body)


def completion_for(pkt: Packet, *body: Buffer) -> OutPacket:
    """The completion answering pkt (same trans_id)."""
    return completion(pkt.trans_id, *body)


def wants_completion(pkt: Packet) -> bool:
    """Whether the sender set COMPLETION_REQUESTED."""
    return bool(pkt.flags & PacketFlags.COMPLETION_REQUESTED)


def xfer_pages(
    set_id: int,
    ranges: Sequence[tuple[int, int]],
    *body: Buffer,
    trans_id: int = 0,
    completion_requested: bool = True,
    sender_owns_set: bool = False,
) -> OutPacket:
    """A transfer-page packet (type 7, `vmtransfer_page_packet_header`, spec §2.4).

    ranges are (byte_count, byte_offset) pairs in transfer page set `set_id` (for
    netvsc, the receive buffer's id). Hyper-V asks for a completion, which is how
    the guest gives the receive-buffer sections back, hence the default.
    """
    if not isinstance(set_id, int) or not 0 <= set_id <= _U16_MAX:
        raise ValueError(f"transfer page set id {set_id!r} must fit in 16 bits")
    parts = [_XFER_HDR.pack(set_id, int(bool(sender_owns_set)), 0, len(ranges))]
    for i, (count, offset) in enumerate(ranges):
        if not (0 <= count <= U32_MAX and 0 <= offset <= U32_MAX):
            raise ValueError(f"transfer page range {i}: count and offset must fit in 32 bits")
        parts.append(_RANGE.pack(count, offset))
    ext = b"".join(parts)
    return OutPacket(
        PacketType.XFER_PAGES, _flags(completion_requested), trans_id, (ext, *body), len(ext)
    )


def gpa_direct(
    ranges: Sequence[GpaRange],
    *body: Buffer,
    trans_id: int = 0,
    completion_requested: bool = True,
) -> OutPacket:
    """A GPA-direct packet (type 9, spec §2.5), as Linux's storvsc and netvsc send
    them (always with COMPLETION_REQUESTED, hence the default). For the simulated
    guest's drivers; the host never sends one (OpenVMM does not either)."""
    if not ranges:
        raise ValueError("a GPA-direct packet needs at least one range")
    parts = [_GPA_HDR.pack(0, len(ranges))]
    for i, r in enumerate(ranges):
        end = r.byte_offset + r.byte_count
        if not 0 <= r.byte_offset < PAGE_SIZE or not 0 < r.byte_count or end > U32_MAX:
            raise ValueError(f"GPA range {i}: byte_offset {r.byte_offset}, count {r.byte_count}")
        if len(r.pfns) != (end + PAGE_SIZE - 1) >> PAGE_SHIFT:
            raise ValueError(f"GPA range {i}: {len(r.pfns)} PFNs for {end} bytes")
        parts.append(_RANGE.pack(r.byte_count, r.byte_offset))
        parts.append(struct.pack(f"<{len(r.pfns)}Q", *r.pfns))
    ext = b"".join(parts)
    return OutPacket(
        PacketType.GPA_DIRECT, _flags(completion_requested), trans_id, (ext, *body), len(ext)
    )


# --- parsing: completions and transfer pages ----------------------------------------


class Completion(NamedTuple):
    """A completion's trans_id and payload (a view into the private copy)."""

    trans_id: int
    payload: memoryview


def parse_completion(pkt: Packet) -> Completion:
    """The trans_id and payload of a completion; PacketError for another type."""
    expect_type(pkt, PacketType.COMPLETION)
    return Completion(pkt.trans_id, pkt.payload)


class XferRange(NamedTuple):
    """One `vmtransfer_page_range`, relative to the transfer page set."""

    byte_count: int
    byte_offset: int


@dataclass(frozen=True, slots=True)
class XferPages:
    """A parsed transfer-page packet (values, safe to keep)."""

    set_id: int
    sender_owns_set: int
    ranges: tuple[XferRange, ...]

    def views(self, buffer: Buffer) -> list[memoryview]:
        """Each range as a view of the transfer page set's buffer; PacketError for a
        range that leaves it (the ranges are the sender's word)."""
        buf = memoryview(buffer).cast("B")
        size = buf.nbytes
        out = []
        for i, (count, offset) in enumerate(self.ranges):
            if offset > size or count > size - offset:
                raise PacketError(
                    f"transfer page range {i} [{offset:#x}, +{count:#x}) leaves the "
                    f"{size:#x}-byte transfer page set {self.set_id}"
                )
            out.append(buf[offset : offset + count])
        return out


def parse_xfer_pages(pkt: Packet) -> XferPages:
    """Read a type-7 packet's header and range list (spec §2.4, §8.2 area check)."""
    expect_type(pkt, PacketType.XFER_PAGES)
    ext = pkt.ext
    if ext.nbytes < XFER_PAGES_HDR_SIZE:
        raise PacketError("transfer-page packet: descriptor extension shorter than its header")
    set_id, owns, _reserved, count = _XFER_HDR.unpack_from(ext, 0)
    if count > (ext.nbytes - XFER_PAGES_HDR_SIZE) // XFER_RANGE_SIZE:
        raise PacketError(
            f"transfer-page packet: {count} ranges do not fit in a "
            f"{ext.nbytes}-byte descriptor extension"
        )
    ranges = tuple(
        XferRange(*_RANGE.unpack_from(ext, XFER_PAGES_HDR_SIZE + XFER_RANGE_SIZE * i))
        for i in range(count)
    )
    return XferPages(set_id, owns, ranges)


# --- parsing: GPA direct -------------------------------------------------------------


class _Shape(NamedTuple):
    """The structure pass over a GPA-direct range list (shared by both parsers)."""

    status: int
    declared: int
    bad: int
    total_bytes: int
    total_pfns: int


def _check_ranges(ext: memoryview, base: int, elen: int) -> _Shape:
    """Twin of check_ranges() in native/packet.c: ext[base : base + elen] is the
    extension; same checks, same order, same results."""
    if elen < GPA_DIRECT_HDR_SIZE:
        return _Shape(GpaStatus.SHORT_EXT, 0, 0, 0, 0)
    count = _GPA_HDR.unpack_from(ext, base)[1]  # [0] is `reserved`: may be garbage
    if count == 0:
        return _Shape(GpaStatus.NO_RANGES, 0, 0, 0, 0)
    if count > (elen - GPA_DIRECT_HDR_SIZE) // GPA_RANGE_MIN_SIZE:
        return _Shape(GpaStatus.TOO_MANY_RANGES, count, 0, 0, 0)
    pos = GPA_DIRECT_HDR_SIZE
    total_bytes = total_pfns = 0
    for i in range(count):
        if elen - pos < 8:
            return _Shape(GpaStatus.TRUNCATED, count, i, 0, 0)
        byte_count, byte_offset = _RANGE.unpack_from(ext, base + pos)
        if byte_count == 0:
            return _Shape(GpaStatus.COUNT_ZERO, count, i, 0, 0)
        if byte_offset >= PAGE_SIZE:
            return _Shape(GpaStatus.OFFSET, count, i, 0, 0)
        end = byte_offset + byte_count
        if end > U32_MAX:
            return _Shape(GpaStatus.OVERFLOW, count, i, 0, 0)
        npfns = (end + PAGE_SIZE - 1) >> PAGE_SHIFT
        pos += 8
        if (elen - pos) // 8 < npfns:
            return _Shape(GpaStatus.TRUNCATED, count, i, 0, 0)
        pos += 8 * npfns
        total_bytes += byte_count
        total_pfns += npfns
    return _Shape(GpaStatus.OK, count, 0, total_bytes, total_pfns)


def _iter_ranges(ext: memoryview, base: int, count: int) -> Any:
    """(byte_count, byte_offset, offset of the PFN array, PFN count) of a list that
    passed _check_ranges."""
    pos = base + GPA_DIRECT_HDR_SIZE
    for _ in range(count):
        byte_count, byte_offset = _RANGE.unpack_from(ext, pos)
        npfns = (byte_offset + byte_count + PAGE_SIZE - 1) >> PAGE_SHIFT
        yield byte_count, byte_offset, pos + 8, npfns
        pos += 8 + 8 * npfns


@dataclass(frozen=True, slots=True)
class GpaDirect:
    """The validated ranges of one GPA-direct packet.

    `ranges[i].pfns` are views into the private copy (valid until the next receive);
    `total_bytes` is the sum of the ranges' byte counts, to bound against the
    device's limits. Whether the host reads or writes the buffer is the device
    protocol's business (the packet does not say).
    """

    ranges: tuple[GpaRange, ...]
    total_bytes: int

    def iovecs(self, memory: GuestMemory) -> list[memoryview]:
        """Views of guest RAM covering every range in order (zero copy)."""
        out: list[memoryview] = []
        for r in self.ranges:
            out.extend(memory.iovecs_for_range(r))
        return out


def parse_gpa_direct(pkt: Packet, ram: Ram) -> GpaDirect:
    """Check a GPA-direct packet (type 9) completely and return its ranges.

    ram is the VM's GuestMemory, or any `contains(gpa, length) -> bool`: every PFN
    must name a page of guest RAM. Raises PacketError (with `status` and
    `range_index`) for anything else, in the order native/packet.h lists.
    """
    expect_type(pkt, PacketType.GPA_DIRECT)
    ext = pkt.ext
    shape = _check_ranges(ext, 0, ext.nbytes)
    if shape.status != GpaStatus.OK:
        raise _gpa_error(shape.status, shape.declared, shape.bad)
    contains = ram.contains if isinstance(ram, GuestMemory) else ram
    ranges = []
    for k, (byte_count, byte_offset, pfn_at, npfns) in enumerate(
        _iter_ranges(ext, 0, shape.declared)
    ):
        pfns = ext[pfn_at : pfn_at + 8 * npfns].cast("Q")
        for pfn in pfns:
            if pfn > MAX_PFN or not contains(pfn << PAGE_SHIFT, PAGE_SIZE):
                raise _gpa_error(GpaStatus.PFN, shape.declared, k)
        ranges.append(GpaRange(byte_count, byte_offset, pfns))
    return GpaDirect(tuple(ranges), shape.total_bytes)


# --- batch decode: the twin ----------------------------------------------------------

PKT_REC = struct.Struct("=iIIIQ")
"""struct vmb_gpa_pkt: status, range_count, first_range, bad_range, total_bytes."""

RANGE_REC = struct.Struct("=6I")
"""struct vmb_gpa_range_rec: byte_count, byte_offset, pfn_offset, pfn_count,
first_seg, seg_count."""

SEG_REC = struct.Struct("=IIQQ")
"""struct vmb_iov_seg: region, pad, offset in region, length."""

BATCH_STATE = struct.Struct("=IIII")
"""struct vmb_gpa_batch: next_pkt, nranges, nsegs, pad."""


def _py_gpa_direct_batch(
    buf: memoryview,
    index: memoryview,
    n: int,
    table: Any,
    pkts: memoryview,
    ranges: memoryview,
    max_ranges: int,
    segs: memoryview,
    max_segs: int,
    st: memoryview,
) -> int:
    """Twin of vmb_gpa_direct_batch (native/packet.h): the same arguments as
    flat byte views (index as u32 pairs, table as memory._PyOps takes it), the
    same records written, the same return codes."""
    walk = _ops(False).walk
    next_pkt, nranges, nsegs, _ = BATCH_STATE.unpack_from(st, 0)
    if nranges > max_ranges or nsegs > max_segs:
        return _BATCH_BAD_ARG
    buflen = min(buf.nbytes, U32_MAX)
    idx = index.cast("I")
    try:
        for i in range(next_pkt, n):
            next_pkt = i
            off, length = idx[2 * i], idx[2 * i + 1]
            if length < DESC_SIZE or off & 7 or off > buflen or length > buflen - off:
                return _BATCH_BAD_ARG
            typ, off8, len8 = _DESC_HEAD.unpack_from(buf, off)
            if len8 * 8 != length or off8 < 2 or off8 > len8:
                return _BATCH_BAD_ARG
            if typ != PacketType.GPA_DIRECT:
                PKT_REC.pack_into(pkts, PKT_REC.size * i, GpaStatus.SKIPPED, 0, nranges, 0, 0)
                continue
            shape = _check_ranges(buf, off + DESC_SIZE, off8 * 8 - DESC_SIZE)
            if shape.status != GpaStatus.OK:
                PKT_REC.pack_into(
                    pkts, PKT_REC.size * i, shape.status, shape.declared, nranges, shape.bad, 0
                )
                continue
            if shape.declared > max_ranges - nranges or shape.total_pfns > max_segs - nsegs:
                return _BATCH_MORE
            s = nsegs
            status = GpaStatus.OK
            bad = 0
            for k, (byte_count, byte_offset, pfn_at, npfns) in enumerate(
                _iter_ranges(buf, off + DESC_SIZE, shape.declared)
            ):
                pfns = buf[pfn_at : pfn_at + 8 * npfns].cast("Q")
                got = walk(table, byte_offset, byte_count, pfns)
                if isinstance(got, int):
                    if got != E_PFN:
                        return _BATCH_BAD_ARG  # cannot happen: checked above
                    status, bad = GpaStatus.PFN, k
                    break
                RANGE_REC.pack_into(
                    ranges,
                    RANGE_REC.size * (nranges + k),
                    byte_count,
                    byte_offset,
                    pfn_at,
                    npfns,
                    s,
                    len(got),
                )
                for seg in got:
                    SEG_REC.pack_into(segs, SEG_REC.size * s, seg[0], 0, seg[1], seg[2])
                    s += 1
            if status != GpaStatus.OK:
                PKT_REC.pack_into(pkts, PKT_REC.size * i, status, shape.declared, nranges, bad, 0)
                continue
            PKT_REC.pack_into(
                pkts, PKT_REC.size * i, status, shape.declared, nranges, 0, shape.total_bytes
            )
            nranges += shape.declared
            nsegs = s
        next_pkt = n
        return _BATCH_DONE
    finally:
        BATCH_STATE.pack_into(st, 0, next_pkt, nranges, nsegs, 0)


# --- batch decode: the API -----------------------------------------------------------


class _PyBackend:
    name = "python"

    def __init__(self, max_ranges: int, max_segs: int) -> None:
        self.max_ranges, self.max_segs = max_ranges, max_segs
        self.pkts = bytearray()
        self.ranges = bytearray(RANGE_REC.size * max_ranges)
        self.segs = bytearray(SEG_REC.size * max_segs)
        self.st = bytearray(BATCH_STATE.size)

    def table(self, regions: Sequence[Any]) -> Any:
        return ([r.gpa for r in regions], [r.size for r in regions])

    def ensure_pkts(self, n: int) -> None:
        if len(self.pkts) < PKT_REC.size * n:
            self.pkts = bytearray(PKT_REC.size * n)

    def grow(self, max_ranges: int, max_segs: int) -> None:
        self.ranges += bytes(RANGE_REC.size * (max_ranges - self.max_ranges))
        self.segs += bytes(SEG_REC.size * (max_segs - self.max_segs))
        self.max_ranges, self.max_segs = max_ranges, max_segs

    def reset(self) -> None:
        self.st[:] = bytes(BATCH_STATE.size)

    def state(self) -> tuple[int, int, int, int]:
        return BATCH_STATE.unpack_from(self.st, 0)

    def call(self, buf: memoryview, idx: memoryview, n: int, table: Any) -> int:
        return _py_gpa_direct_batch(
            buf,
            idx,
            n,
            table,
            memoryview(self.pkts),
            memoryview(self.ranges),
            self.max_ranges,
            memoryview(self.segs),
            self.max_segs,
            memoryview(self.st),
        )

    def views(self) -> tuple[memoryview, memoryview, memoryview]:
        return memoryview(self.pkts), memoryview(self.ranges), memoryview(self.segs)


class _NativeBackend:
    name = "native"

    def __init__(self, ffi: Any, lib: Any, max_ranges: int, max_segs: int) -> None:
        if (
            ffi.sizeof("struct vmb_gpa_pkt") != PKT_REC.size
            or ffi.sizeof("struct vmb_gpa_range_rec") != RANGE_REC.size
            or lib.VMB_GPA_E_PFN != GpaStatus.PFN
            or lib.VMB_GPA_MORE != _BATCH_MORE
        ):
            raise ImportError("vmbus._native packet codes disagree with vmbus/packet.py")
        self.ffi, self.lib = ffi, lib
        self.npkts = 0
        self.pkts = ffi.new("struct vmb_gpa_pkt[]", 1)
        self.max_ranges, self.max_segs = max_ranges, max_segs
        self.ranges = ffi.new("struct vmb_gpa_range_rec[]", max_ranges)
        self.segs = ffi.new("struct vmb_iov_seg[]", max_segs)
        self.st = ffi.new("struct vmb_gpa_batch *")

    def table(self, regions: Sequence[Any]) -> Any:
        arr = self.ffi.new("struct vmb_mem_region[]", max(1, len(regions)))
        for i, r in enumerate(regions):
            arr[i].gpa = r.gpa
            arr[i].size = r.size
        return (arr, len(regions))

    def ensure_pkts(self, n: int) -> None:
        if self.npkts < n:
            self.pkts = self.ffi.new("struct vmb_gpa_pkt[]", n)
            self.npkts = n

    def grow(self, max_ranges: int, max_segs: int) -> None:
        ffi = self.ffi
        ranges = ffi.new("struct vmb_gpa_range_rec[]", max_ranges)
        ffi.memmove(ranges, self.ranges, RANGE_REC.size * self.max_ranges)
        segs = ffi.new("struct vmb_iov_seg[]", max_segs)
        ffi.memmove(segs, self.segs, SEG_REC.size * self.max_segs)
        self.ranges, self.segs = ranges, segs
        self.max_ranges, self.max_segs = max_ranges, max_segs

    def reset(self) -> None:
        self.st.next_pkt = self.st.nranges = self.st.nsegs = 0

    def state(self) -> tuple[int, int, int, int]:
        return (self.st.next_pkt, self.st.nranges, self.st.nsegs, 0)

    def call(self, buf: memoryview, idx: memoryview, n: int, table: Any) -> int:
        ffi = self.ffi
        arr, nregions = table
        return int(
            self.lib.vmb_gpa_direct_batch(
                ffi.from_buffer("uint8_t[]", buf),
                buf.nbytes,
                ffi.from_buffer("uint32_t[]", idx),
                n,
                arr,
                nregions,
                self.pkts,
                self.ranges,
                self.max_ranges,
                self.segs,
                self.max_segs,
                self.st,
            )
        )

    def views(self) -> tuple[memoryview, memoryview, memoryview]:
        ffi = self.ffi
        return (
            memoryview(ffi.buffer(self.pkts)),
            memoryview(ffi.buffer(self.ranges)),
            memoryview(ffi.buffer(self.segs)),
        )


class GpaDirectBatch:
    """The GPA-direct packets of one received batch, decoded: packet i of the batch
    is entry i here. Valid until the decoder's next decode (its record arrays are
    reused) and the channel's next receive (PFN views are into the private copy)."""

    __slots__ = ("_buf", "_pkts", "_ranges", "_segs", "_views", "n")

    def __init__(
        self,
        buf: memoryview,
        n: int,
        recs: tuple[memoryview, memoryview, memoryview],
        views: tuple[memoryview, ...],
    ) -> None:
        self._buf = buf
        self.n = n
        self._pkts, self._ranges, self._segs = recs
        self._views = views

    def __len__(self) -> int:
        return self.n

    def _rec(self, i: int) -> tuple[int, int, int, int, int]:
        if not 0 <= i < self.n:
            raise IndexError(f"packet {i} not in a batch of {self.n}")
        return PKT_REC.unpack_from(self._pkts, PKT_REC.size * i)

    def status(self, i: int) -> GpaStatus:
        """OK, SKIPPED (not a GPA-direct packet) or what was wrong with packet i."""
        return GpaStatus(self._rec(i)[0])

    def error(self, i: int) -> PacketError | None:
        """The PacketError for a malformed GPA-direct packet i, else None."""
        status, declared, _first, bad, _total = self._rec(i)
        return _gpa_error(status, declared, bad) if status < 0 else None

    def _ok(self, i: int) -> tuple[int, int, int]:
        status, count, first, bad, total = self._rec(i)
        if status == GpaStatus.SKIPPED:
            raise PacketError(f"packet {i} of the batch is not a GPA-direct packet")
        if status != GpaStatus.OK:
            raise _gpa_error(status, count, bad)
        return count, first, total

    def total_bytes(self, i: int) -> int:
        """Sum of packet i's byte counts; PacketError if it is malformed."""
        return self._ok(i)[2]

    def get(self, i: int) -> GpaDirect:
        """Packet i's ranges (PFNs as views into the private copy); PacketError if
        it is malformed or not GPA-direct."""
        count, first, total = self._ok(i)
        ranges = []
        for k in range(first, first + count):
            byte_count, byte_offset, pfn_at, npfns, _, _ = RANGE_REC.unpack_from(
                self._ranges, RANGE_REC.size * k
            )
            pfns = self._buf[pfn_at : pfn_at + 8 * npfns].cast("Q")
            ranges.append(GpaRange(byte_count, byte_offset, pfns))
        return GpaDirect(tuple(ranges), total)

    def iovecs(self, i: int) -> list[memoryview]:
        """Views of guest RAM covering packet i's ranges in order (zero copy, no
        second walk); PacketError if it is malformed or not GPA-direct."""
        count, first, _ = self._ok(i)
        if not count:
            return []
        _, _, _, _, seg0, _ = RANGE_REC.unpack_from(self._ranges, RANGE_REC.size * first)
        _, _, _, _, segl, nl = RANGE_REC.unpack_from(
            self._ranges, RANGE_REC.size * (first + count - 1)
        )
        # A packet's segments are consecutive: its ranges were walked in order.
        views = self._views
        return [
            views[ri][off : off + ln]
            for ri, _, off, ln in SEG_REC.iter_unpack(
                self._segs[SEG_REC.size * seg0 : SEG_REC.size * (segl + nl)]
            )
        ]


class GpaDirectDecoder:
    """Decodes the GPA-direct packets of one channel's received batches against one
    VM's guest RAM: one native call per batch (or the twin, per `VMBUSD_NATIVE`).

    Not thread-safe: one decoder per channel task. The guest RAM region table is
    taken from `memory` at each decode, so hot-plugged regions count at once.
    """

    def __init__(
        self,
        memory: GuestMemory,
        *,
        native: bool | None = None,
        max_ranges: int = 64,
        max_segs: int = 256,
    ) -> None:
        self.memory = memory
        if native is None:
            native = _native_sel.NATIVE
        max_ranges, max_segs = max(1, max_ranges), max(1, max_segs)
        self._be: _PyBackend | _NativeBackend
        if native:
            if _native_sel.NATIVE:
                ffi, lib = _native_sel.ffi, _native_sel.lib
            else:
                mod = _native_sel.native_module()
                ffi, lib = mod.ffi, mod.lib
            self._be = _NativeBackend(ffi, lib, max_ranges, max_segs)
        else:
            self._be = _PyBackend(max_ranges, max_segs)
        self._snapshot: Any = None
        self._table: Any = None

    @property
    def backend(self) -> str:
        """'native' or 'python'."""
        return self._be.name

    def decode_batch(self, batch: Any) -> GpaDirectBatch:
        """decode() of a channel's PacketBatch (its buffer, index and n)."""
        return self.decode(batch.buffer, batch.index, batch.n)

    def decode(self, buffer: Buffer, index: Buffer, n: int) -> GpaDirectBatch:
        """Decode every GPA-direct packet of what ring read() put in buffer/index.

        A malformed packet does not raise here: its status says what is wrong, and
        `get`/`iovecs` of it raise PacketError. ValueError means the arguments are
        not what ring read() produces (our bug, not the guest's).
        """
        buf = memoryview(buffer).cast("B") if not isinstance(buffer, memoryview) else buffer
        if buf.format != "B" or buf.ndim != 1:
            buf = buf.cast("B")
        idx = memoryview(index).cast("B")
        if not isinstance(n, int) or not 0 <= n <= U32_MAX or idx.nbytes < 8 * n:
            raise ValueError(f"index must hold n={n!r} pairs of u32")
        idx = idx[: 8 * n]
        self.memory._check_open()  # GuestMemoryError once the VM's memory is closed
        # One immutable snapshot of the regions: the table the walk checks PFNs
        # against and the views the iovecs come from must be the same.
        snap = self.memory._table
        if snap is not self._snapshot:
            self._table = self._be.table(snap.regions)
            self._snapshot = snap
        be = self._be
        be.ensure_pkts(n)
        be.reset()
        while True:
            rc = be.call(buf, idx, n, self._table)
            if rc == _BATCH_DONE:
                break
            if rc != _BATCH_MORE:
                raise ValueError(
                    f"packet {be.state()[0]}: buffer or index entry is not what ring read() makes"
                )
            # Records never outnumber the PFNs in buf (8 bytes each), so doubling
            # ends, with the arrays a few times the size of the private copy at most.
            if be.max_segs > buf.nbytes // 8 and be.max_ranges > buf.nbytes // 16:
                raise AssertionError("GPA-direct decode made no progress")  # pragma: no cover
            be.grow(2 * be.max_ranges, 2 * be.max_segs)
        return GpaDirectBatch(buf, n, be.views(), snap.views)
