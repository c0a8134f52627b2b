"""VMBus ring buffers, both ends: the C fast path and its pure-Python twin.

A ring is a 4096-byte header page plus a circular data area of `size` bytes, both
in guest memory (spec §1, §3). The host reads the guest->host ring and writes the
host->guest ring; the simulated guest does the opposite with the same classes.

Everything the peer can write is read once, validated, then used: packets are
copied into the caller's private buffer (`read`), and only that copy is parsed
(`iter_packets`). A corrupt ring is reported as a `RingError` code, never a crash.

`PyRingReader`/`PyRingWriter` are the reference semantics; `NativeRingReader`/
`NativeRingWriter` call native/ring.c (contract: native/ring.h). Tests run
both on identical memory and compare every result and every byte of the ring.
`RingReader`, `RingWriter` and `SendBatch` name the flavour `VMBUSD_NATIVE` picks.

The twin runs against a peer that is truly concurrent (the guest's vCPUs, or a
native end in another process), so its header accesses and barriers follow the
same memory model as native/ring.c: see "Shared memory" below.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import struct
from collections.abc import Iterator, Sequence
from enum import IntEnum
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

from vmbus import native as _native_sel

Buffer: TypeAlias = "bytes | bytearray | memoryview | Any"

HDR_SIZE = 4096
OFF_WRITE_INDEX = 0x00
OFF_READ_INDEX = 0x04
OFF_INTERRUPT_MASK = 0x08
OFF_PENDING_SEND_SZ = 0x0C
OFF_FEATURE_BITS = 0x40
FEAT_PENDING_SEND_SZ = 1

DESC_SIZE = 16
TRAILER_SIZE = 8
MIN_RING_SIZE = 32
MAX_RING_SIZE = 1 << 30  # bounds every index sum, also in the doubled mapping
MAX_LEN8 = 0xFFFF

VM_PKT_DATA_INBAND = 0x6
VM_PKT_DATA_USING_XFER_PAGES = 0x7
VM_PKT_DATA_USING_GPA_DIRECT = 0x9
VM_PKT_COMP = 0xB
FLAG_COMPLETION_REQUESTED = 1
DEFAULT_ALLOWED_TYPES = (
    (1 << VM_PKT_DATA_INBAND)
    | (1 << VM_PKT_DATA_USING_XFER_PAGES)
    | (1 << VM_PKT_DATA_USING_GPA_DIRECT)
    | (1 << VM_PKT_COMP)
)

_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF
_DESC = struct.Struct("<HHHHQ")
_TRAILER = struct.Struct("<Q")

# The twin's numbers; the native build defines the same (a test checks they agree).
_CODES: dict[str, int] = {
    "WINDEX_RANGE": -1,
    "WINDEX_ALIGN": -2,
    "RINDEX_RANGE": -3,
    "RINDEX_ALIGN": -4,
    "AVAIL_PARTIAL": -5,
    "OFFSET8_SMALL": -6,
    "LEN8_LT_OFFSET8": -7,
    "LEN8_GT_AVAIL": -8,
    "LEN8_GT_RING": -9,
    "BAD_TYPE": -10,
    "BAD_FLAGS": -11,
    "OUT_TOO_SMALL": -12,
    "PKT_TOO_BIG": -13,
    "BAD_ARG": -14,
}


# --------------------------------------------------------------------- shared memory
#
# The header page is shared with a peer running at the same time (a guest vCPU, or
# the native end in another process). Two rules make the twin safe there, the same
# two that native/ring.c follows:
#
# 1. Every header field (write_index, read_index, interrupt_mask, pending_send_sz,
#    feature_bits) is loaded and stored as ONE aligned 32-bit access. struct's "<I"
#    does not do that: CPython assembles and splits a little-endian value a byte at a
#    time, so a concurrent peer could read half an index we were storing and we
#    could read half of one it was storing. A torn write_index is a plausible offset
#    in the middle of a packet: the twin reported BAD_TYPE on valid traffic (issue 7;
#    tests/test_ring_concurrency.py catches it). The twin therefore sees the header
#    through a ctypes array of little-endian uint32: ctypes reads and writes an
#    element with one fixed-size 4-byte memcpy, which is one 32-bit mov (checked in
#    CPython 3.11's I_get/I_set on x86-64), and the page is 4-aligned (checked in
#    _PyRing), so each access is single-copy atomic, like vmb_ld32/vmb_st32.
# 2. The barriers sit where native/ring.c has them, with the same names ([B1] to
#    [B5] and their partners [B1'] to [B5']; the legend is at the top of ring.c).
#    Python has no fence of its own, and the many instructions CPython runs between
#    our store and our next load order nothing: on x86 a store waits in the store
#    buffer while later loads go ahead. That is the lost wake-up of the
#    store-then-load handshakes in request_space, unmask and _publish, which would
#    leave Channel._idle asleep (it waits without a timeout). So the twin calls C11
#    atomic_thread_fence from libatomic (GCC's runtime, installed with the compiler
#    that builds vmbus._native) through ctypes: a real fence (`lock or` on x86-64,
#    `dmb ish` on arm64), what vmb_mb/vmb_rmb/vmb_wmb compile to. An acquire load
#    is a load then an acquire fence; every release store already follows a full
#    fence. Without libatomic the twin refuses to build a ring rather than run
#    without barriers.

_LE32 = ctypes.c_uint32.__ctype_le__  # c_uint32 itself on a little-endian host
_HDR_WORDS = _LE32 * (HDR_SIZE // 4)
_ACQUIRE, _RELEASE, _SEQ_CST = 2, 3, 5  # C11 memory_order values (GCC's __ATOMIC_*)
_TSO = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def _load_fence() -> tuple[Any, str]:
    """libatomic's atomic_thread_fence(memory_order), or None and why not. PyDLL: the
    call keeps the GIL (a fence never blocks), which saves a GIL round trip."""
    why = "libatomic not found"
    for name in ("libatomic.so.1", None):
        name = name or ctypes.util.find_library("atomic")  # slow (runs ldconfig): last
        if not name:
            continue
        try:
            fn = ctypes.PyDLL(name).atomic_thread_fence
        except (OSError, AttributeError) as exc:
            why = f"{name}: {exc}"
            continue
        fn.argtypes = [ctypes.c_int]
        fn.restype = None
        return fn, ""
    return None, why


_thread_fence, _FENCE_MISSING = _load_fence()


def _mb() -> None:
    """Full barrier (vmb_mb): no load or store crosses it, store-then-load included."""
    _thread_fence(_SEQ_CST)


if _TSO:
    # x86 is TSO: a load is never reordered with a later load or store, nor a store
    # with a later store, so acquire and release fences emit no instruction there
    # (vmb_rmb/vmb_wmb compile to nothing on x86 either). Only the full barrier,
    # store-then-load, needs the locked instruction; the ctypes call would be waste.

    def _rmb() -> None:
        """Acquire fence (vmb_rmb): free on x86 (TSO)."""

    def _wmb() -> None:
        """Release fence (vmb_wmb): free on x86 (TSO)."""

else:

    def _rmb() -> None:
        """Acquire fence (vmb_rmb): loads before it are done before anything after it."""
        _thread_fence(_ACQUIRE)

    def _wmb() -> None:
        """Release fence (vmb_wmb): anything before it is done before stores after it."""
        _thread_fence(_RELEASE)


def _code(name: str) -> int:
    """The value from the selected native build when there is one, else the twin's."""
    if _native_sel.lib is not None:
        return int(getattr(_native_sel.lib, "VMB_E_" + name))
    return _CODES[name]


class RingError(IntEnum):
    """Why a ring operation failed: one value per VMB_E_* code in native/ring.h."""

    WINDEX_RANGE = _code("WINDEX_RANGE")
    WINDEX_ALIGN = _code("WINDEX_ALIGN")
    RINDEX_RANGE = _code("RINDEX_RANGE")
    RINDEX_ALIGN = _code("RINDEX_ALIGN")
    AVAIL_PARTIAL = _code("AVAIL_PARTIAL")
    OFFSET8_SMALL = _code("OFFSET8_SMALL")
    LEN8_LT_OFFSET8 = _code("LEN8_LT_OFFSET8")
    LEN8_GT_AVAIL = _code("LEN8_GT_AVAIL")
    LEN8_GT_RING = _code("LEN8_GT_RING")
    BAD_TYPE = _code("BAD_TYPE")
    BAD_FLAGS = _code("BAD_FLAGS")
    OUT_TOO_SMALL = _code("OUT_TOO_SMALL")
    PKT_TOO_BIG = _code("PKT_TOO_BIG")
    BAD_ARG = _code("BAD_ARG")


# Caller mistakes (ours, not the peer's): raised as RingArgumentError, a ValueError.
_CALLER_ERRORS = frozenset({RingError.OUT_TOO_SMALL, RingError.PKT_TOO_BIG, RingError.BAD_ARG})


class RingCorrupt(Exception):
    """The peer broke the ring (bad index or descriptor): fatal to this channel only."""

    def __init__(self, code: RingError | int, detail: str = "") -> None:
        self.code = RingError(code)
        super().__init__(f"{self.code.name}{': ' + detail if detail else ''}")


class RingArgumentError(ValueError):
    """We asked for something impossible (packet larger than the ring, bad lengths)."""

    def __init__(self, code: RingError | int, detail: str = "") -> None:
        self.code = RingError(code)
        super().__init__(f"{self.code.name}{': ' + detail if detail else ''}")


def _raise(code: int, what: str) -> None:
    err = RingError(code)
    if err in _CALLER_ERRORS:
        raise RingArgumentError(err, what)
    raise RingCorrupt(err, what)


class ReadResult(NamedTuple):
    """One batch read: packets before a bad one are still returned (`error` set)."""

    npkts: int
    out_bytes: int
    consumed: int
    signal: bool
    error: RingError | None


class WriteResult(NamedTuple):
    """One batch written: a prefix of the packets (the rest did not fit)."""

    npkts: int
    bytes: int
    signal: bool


class ForwardResult(NamedTuple):
    """One forward call: packets moved from a reader's ring straight into a writer's."""

    npkts: int
    consumed: int
    read_signal: bool  # the reader ring's producer was waiting for room and now has it
    write_signal: bool  # the writer ring's consumer should be signalled
    error: RingError | None


class OutPacket(NamedTuple):
    """A packet to send: the body's first ext_len bytes are the descriptor extension."""

    type: int
    flags: int
    trans_id: int
    body: Sequence[Buffer]
    ext_len: int = 0


def packet_ring_bytes(body_len: int) -> int:
    """Ring bytes a packet with this body takes: descriptor + padded body + trailer."""
    return DESC_SIZE + ((body_len + 7) & ~7) + TRAILER_SIZE


def init_ring_header(hdr: Buffer) -> None:
    """Set up a header page as Linux does before OPENCHANNEL (for the simulated guest)."""
    v = _bytes_view(hdr, "hdr", writable=True)
    if v.nbytes < HDR_SIZE:
        raise ValueError(f"ring header needs {HDR_SIZE} bytes, got {v.nbytes}")
    # Before OPENCHANNEL nobody else looks at the page; the feature bits still go
    # through one 32-bit store, like every other header store of the twin.
    v[:HDR_SIZE] = bytes(HDR_SIZE)  # read = write = interrupt_mask = pending = 0
    words = _HDR_WORDS.from_buffer(v)
    words[OFF_FEATURE_BITS >> 2] = FEAT_PENDING_SEND_SZ
    del words  # drop its export of v


def _bytes_view(obj: Buffer, what: str, *, writable: bool = False) -> memoryview:
    """A flat byte view of a buffer, or TypeError (checked before any C call)."""
    try:
        v = memoryview(obj)
    except TypeError:
        raise TypeError(f"{what} must support the buffer protocol") from None
    if writable and v.readonly:
        raise TypeError(f"{what} must be writable")
    if not v.c_contiguous:
        raise TypeError(f"{what} must be contiguous")
    return v if v.format == "B" and v.ndim == 1 else v.cast("B")


def _check_u32(value: int, what: str) -> int:
    if not isinstance(value, int) or not 0 <= value <= _U32:
        raise ValueError(f"{what} must be an int in [0, 2**32)")
    return value


def _read_args(out: Buffer, index: Buffer, max_pkts: int) -> tuple[memoryview, memoryview]:
    """Validate read() arguments: out bytes, and room for max_pkts uint32 pairs in index."""
    _check_u32(max_pkts, "max_pkts")
    out_v = _bytes_view(out, "out", writable=True)
    idx_v = _bytes_view(index, "index", writable=True)
    if idx_v.nbytes < 8 * max_pkts:
        raise ValueError(f"index holds {idx_v.nbytes // 8} pairs, max_pkts is {max_pkts}")
    if out_v.nbytes > _U32:
        out_v = out_v[:_U32]
    return out_v, idx_v[: 8 * max_pkts]


def _raw_args(buf: Buffer, index: Buffer, n: int) -> tuple[memoryview, memoryview]:
    """Validate write_raw() arguments: n uint32 pairs in index."""
    _check_u32(n, "n")
    buf_v = _bytes_view(buf, "buf")
    idx_v = _bytes_view(index, "index")
    if idx_v.nbytes < 8 * n:
        raise ValueError(f"index holds {idx_v.nbytes // 8} pairs, n is {n}")
    return buf_v, idx_v[: 8 * n]


# --------------------------------------------------------------------- batches


class PySendBatch:
    """Packets checked once and reusable across writes (bodies are read at write time)."""

    __slots__ = ("_items", "packets")

    def __init__(self, packets: Sequence[OutPacket]) -> None:
        self.packets: list[OutPacket] = list(packets)
        # (type, flags, trans_id, ext_len, views, body_len, pkt_len) per packet
        self._items: list[tuple[int, int, int, int, tuple[memoryview, ...], int, int]] = []
        for i, p in enumerate(self.packets):
            if not isinstance(p.type, int) or not 0 <= p.type <= 0xFFFF:
                raise ValueError(f"packet {i}: type must fit in 16 bits")
            if not isinstance(p.flags, int) or not 0 <= p.flags <= 0xFFFF:
                raise ValueError(f"packet {i}: flags must fit in 16 bits")
            if not isinstance(p.trans_id, int) or not 0 <= p.trans_id <= _U64:
                raise ValueError(f"packet {i}: trans_id must fit in 64 bits")
            views = tuple(_bytes_view(b, f"packet {i} body") for b in p.body)
            body_len = sum(v.nbytes for v in views)
            if not isinstance(p.ext_len, int) or p.ext_len % 8 or not 0 <= p.ext_len <= body_len:
                raise RingArgumentError(
                    RingError.BAD_ARG, f"packet {i}: ext_len must be a multiple of 8 within body"
                )
            pkt_len = DESC_SIZE + ((body_len + 7) & ~7)
            if pkt_len // 8 > MAX_LEN8:
                raise RingArgumentError(RingError.PKT_TOO_BIG, f"packet {i}: {body_len} bytes")
            self._items.append((p.type, p.flags, p.trans_id, p.ext_len, views, body_len, pkt_len))

    def __len__(self) -> int:
        return len(self._items)

    def packet_ring_bytes(self, i: int) -> int:
        """Ring bytes packet i takes (len8*8 + 8): the `need` for request_space."""
        return self._items[i][6] + TRAILER_SIZE


class NativeSendBatch(PySendBatch):
    """A batch with its C arrays prebuilt, so a write is one C call (buffers kept alive)."""

    __slots__ = ("_c_iov", "_c_pkts", "_keep")

    def __init__(self, packets: Sequence[OutPacket]) -> None:
        super().__init__(packets)
        ffi = _native_mod().ffi
        n_iov = sum(len(it[4]) for it in self._items)
        self._c_pkts = ffi.new("struct vmb_send[]", max(1, len(self._items)))
        self._c_iov = ffi.new("struct vmb_iov[]", max(1, n_iov))
        self._keep: list[Any] = []
        k = 0
        for i, (typ, flags, tid, ext_len, views, _body, _pkt) in enumerate(self._items):
            s = self._c_pkts[i]
            s.type, s.flags, s.ext_len, s.trans_id = typ, flags, ext_len, tid
            s.iov_start, s.iov_cnt = k, len(views)
            for v in views:
                c = ffi.from_buffer("uint8_t[]", v)
                self._keep.append(c)
                self._c_iov[k].base = c
                self._c_iov[k].len = v.nbytes
                k += 1


# --------------------------------------------------------------------- rings


def _check_index(v: int, size: int, e_range: RingError, e_align: RingError) -> RingError | None:
    if v >= size:
        return e_range
    if v & 7:
        return e_align
    return None


def _avail(w: int, r: int, size: int) -> int:
    """Linux hv_get_bytes_to_read."""
    return w - r if w >= r else size - r + w


def _free(w: int, r: int, size: int) -> int:
    """Linux hv_get_bytes_to_write (raw free space)."""
    return size - (w - r) if w >= r else r - w


class _RingBase:
    """Argument checks and memory views shared by all four ring classes."""

    def __init__(
        self,
        hdr: memoryview,
        data: memoryview,
        size: int,
        *,
        doubled: bool = False,
        allowed_types: int = DEFAULT_ALLOWED_TYPES,
    ) -> None:
        if not isinstance(size, int) or size % 8 or not MIN_RING_SIZE <= size <= MAX_RING_SIZE:
            raise ValueError(f"ring size {size!r}: multiple of 8 in [32, 2**30] required")
        _check_u32(allowed_types, "allowed_types")
        hdr_v = _bytes_view(hdr, "hdr", writable=True)
        data_v = _bytes_view(data, "data", writable=True)
        span = size * 2 if doubled else size
        if hdr_v.nbytes < HDR_SIZE:
            raise ValueError(f"ring header needs {HDR_SIZE} bytes, got {hdr_v.nbytes}")
        if data_v.nbytes < span:
            raise ValueError(f"ring data needs {span} bytes, got {data_v.nbytes}")
        self.size = size
        self.doubled = bool(doubled)
        self.allowed_types = allowed_types
        self._hdr = hdr_v[:HDR_SIZE]
        self._data = data_v[:span]


class _PyRing(_RingBase):
    """The twin's shared-memory accessors: each header field access is one aligned
    32-bit load or store, and _mb/_rmb/_wmb are real fences (see "Shared memory")."""

    def __init__(
        self,
        hdr: memoryview,
        data: memoryview,
        size: int,
        *,
        doubled: bool = False,
        allowed_types: int = DEFAULT_ALLOWED_TYPES,
    ) -> None:
        if _thread_fence is None:
            raise RuntimeError(
                "the pure-Python ring needs libatomic for its memory barriers "
                f"({_FENCE_MISSING}); install libatomic1 or use the native build"
            )
        super().__init__(hdr, data, size, doubled=doubled, allowed_types=allowed_types)
        words = _HDR_WORDS.from_buffer(self._hdr)
        if ctypes.addressof(words) % 4:
            del words  # its export of the header view
            raise ValueError("ring header must be 4-byte aligned (one access per field)")
        # The header as 32-bit words; holds an export of the view until release().
        self._words: Any = words
        self._priv = 0
        self._pending = 0

    def _ld(self, off: int) -> int:
        """One aligned 32-bit load of the header field at off (relaxed)."""
        return self._words[off >> 2]  # type: ignore[no-any-return]

    def _st(self, off: int, v: int) -> None:
        """One aligned 32-bit store of the header field at off (relaxed)."""
        self._words[off >> 2] = v

    def _get(self, pos: int, n: int) -> bytes:
        """Copy n bytes out at pos, wrapping at size (one slice when doubled)."""
        end = pos + n
        if self.doubled or end <= self.size:
            return bytes(self._data[pos:end])
        return bytes(self._data[pos : self.size]) + bytes(self._data[: end - self.size])

    def _put(self, pos: int, src: Buffer) -> int:
        """Copy src in at pos, wrapping at size; returns the next position."""
        n = len(src) if not isinstance(src, memoryview) else src.nbytes
        if not n:
            return pos
        first = self.size - pos
        if self.doubled or n <= first:
            self._data[pos : pos + n] = src
        else:
            self._data[pos : self.size] = src[:first]
            self._data[: n - first] = src[first:]
        return (pos + n) % self.size

    def release(self) -> None:
        """Drop the views of shared memory (so its mmap can be closed). The ctypes
        array holds its own export of the header; it has to go first, or the guest
        memory's close() would still see a live view."""
        self._words = None
        self._hdr.release()
        self._data.release()


class _NativeRing(_RingBase):
    """Holds the C `struct vmb_ring` and keeps the shared buffers pinned."""

    _RESULT: str  # the C result struct each call fills, allocated once per ring

    def __init__(
        self,
        hdr: memoryview,
        data: memoryview,
        size: int,
        *,
        doubled: bool = False,
        allowed_types: int = DEFAULT_ALLOWED_TYPES,
    ) -> None:
        super().__init__(hdr, data, size, doubled=doubled, allowed_types=allowed_types)
        mod = _native_mod()
        self._ffi, self._lib = mod.ffi, mod.lib
        ffi = self._ffi
        self._c_hdr = ffi.from_buffer("uint8_t[]", self._hdr, require_writable=True)
        self._c_data = ffi.from_buffer("uint8_t[]", self._data, require_writable=True)
        r = ffi.new("struct vmb_ring *")
        r.hdr, r.data, r.size = self._c_hdr, self._c_data, size
        r.doubled, r.allowed_types = int(self.doubled), allowed_types
        self._r = r
        self._res = ffi.new(self._RESULT)
        self._fwd_res: Any = None  # vmb_ring_forward's result, allocated on first use

    @property
    def _priv(self) -> int:
        return int(self._r.priv)

    def release(self) -> None:
        """Drop the pinned buffers (so the guest memory's mmap can be closed)."""
        self._ffi.release(self._c_hdr)
        self._ffi.release(self._c_data)
        self._hdr.release()
        self._data.release()


def _native_mod() -> Any:
    """The compiled extension, whatever VMBUSD_NATIVE says (tests compare both)."""
    return _native_sel.native_module()


# --------------------------------------------------------------------- readers


class PyRingReader(_PyRing):
    """Consumer end in pure Python: the reference for NativeRingReader."""

    def open(self) -> None:
        """Take the peer-initialised read_index as our private index (validated)."""
        ri = self._ld(OFF_READ_INDEX)
        err = _check_index(ri, self.size, RingError.RINDEX_RANGE, RingError.RINDEX_ALIGN)
        if err is not None:
            raise RingCorrupt(err, f"read_index {ri:#x} at open")
        self._priv = ri
        self._pending = 0

    def _check_desc(
        self, typ: int, off8: int, len8: int, flags: int, avail: int
    ) -> RingError | None:
        if typ >= 32 or not self.allowed_types & (1 << typ):
            return RingError.BAD_TYPE
        if flags & ~FLAG_COMPLETION_REQUESTED:
            return RingError.BAD_FLAGS
        min_off8 = 3 if typ in (VM_PKT_DATA_USING_XFER_PAGES, VM_PKT_DATA_USING_GPA_DIRECT) else 2
        if off8 < min_off8:
            return RingError.OFFSET8_SMALL
        if len8 < off8:
            return RingError.LEN8_LT_OFFSET8
        total = len8 * 8 + TRAILER_SIZE
        if total >= self.size:
            return RingError.LEN8_GT_RING
        if total > avail:
            return RingError.LEN8_GT_AVAIL
        return None

    def _fetch_desc(
        self, pos: int, avail: int
    ) -> tuple[bytes, tuple[int, int, int, int, int], RingError | None]:
        """The one read of the descriptor at pos (a private copy), then its validation."""
        if avail < DESC_SIZE:
            return b"", (0, 0, 0, 0, 0), RingError.AVAIL_PARTIAL
        raw = self._get(pos, DESC_SIZE)
        d = _DESC.unpack(raw)
        return raw, d, self._check_desc(d[0], d[1], d[2], d[3], avail)

    def read(self, out: Buffer, index: Buffer, max_pkts: int, peek: bool = False) -> ReadResult:
        """Copy up to max_pkts whole packets into out; index gets (offset, length) pairs."""
        out_v, idx_b = _read_args(out, index, max_pkts)
        idx_v = idx_b.cast("I")
        size, pos = self.size, self._priv
        w = self._ld(OFF_WRITE_INDEX)  # untrusted, loaded once
        _rmb()  # [B1'] acquire: the packet bytes we copy are at least as new as w
        err = _check_index(w, size, RingError.WINDEX_RANGE, RingError.WINDEX_ALIGN)
        if err is not None:
            return ReadResult(0, 0, 0, False, err)
        avail = _avail(w, pos, size)
        out_cap = out_v.nbytes
        used = consumed = npkts = 0
        while npkts < max_pkts and avail:
            raw, (_typ, _off8, len8, _flags, _tid), err = self._fetch_desc(pos, avail)
            if err is not None:
                break
            n = len8 * 8
            if n > out_cap - used:
                if not npkts:
                    err = RingError.OUT_TOO_SMALL
                break
            out_v[used : used + DESC_SIZE] = raw  # the validated copy, not a re-read
            out_v[used + DESC_SIZE : used + n] = self._get((pos + DESC_SIZE) % size, n - DESC_SIZE)
            idx_v[2 * npkts] = used
            idx_v[2 * npkts + 1] = n
            used += n
            consumed += n + TRAILER_SIZE
            avail -= n + TRAILER_SIZE
            pos = (pos + n + TRAILER_SIZE) % size
            npkts += 1
        signal = False
        if not peek and consumed:
            _mb()  # [B2] every packet read is done before the peer may reuse the space
            self._st(OFF_READ_INDEX, pos)
            self._priv = pos
            _mb()  # [B4'] read_index is visible before we look at pending_send_sz
            signal = self._pending_signal(consumed)
        return ReadResult(npkts, used, consumed, signal, err)

    def consume(self, nbytes: int) -> bool:
        """Commit nbytes a peek read returned as `consumed`; True: signal the producer.
        ValueError (nothing moves) when nbytes is not 8-aligned or more than is there."""
        size, pos = self.size, self._priv
        w = self._ld(OFF_WRITE_INDEX)
        _rmb()  # [B1']
        err = _check_index(w, size, RingError.WINDEX_RANGE, RingError.WINDEX_ALIGN)
        if err is not None:
            raise RingCorrupt(err, f"write_index {w:#x}")
        if nbytes % 8 or not 0 <= nbytes <= _avail(w, pos, size):
            raise ValueError(f"consume({nbytes}): not 8-aligned or more than is available")
        if not nbytes:
            return False
        pos = (pos + nbytes) % size
        _mb()  # [B2]
        self._st(OFF_READ_INDEX, pos)
        self._priv = pos
        _mb()  # [B4']
        return self._pending_signal(nbytes)

    @property
    def position(self) -> int:
        """Our read position (the read_index as we last stored it)."""
        return self._priv

    def _pending_signal(self, consumed: int) -> bool:
        """Spec §3.4: wake the producer only on its blocked -> unblocked edge."""
        if not self._ld(OFF_FEATURE_BITS) & FEAT_PENDING_SEND_SZ:
            return False
        _mb()  # unpaired, as Linux hv_pkt_iter_close
        pending = self._ld(OFF_PENDING_SEND_SZ)
        if not pending:
            return False
        _rmb()  # [B5'] pairs with [B5] in _publish: w is at least as new as pending
        w = self._ld(OFF_WRITE_INDEX)
        if _check_index(w, self.size, RingError.WINDEX_RANGE, RingError.WINDEX_ALIGN):
            return False
        free_now = _free(w, self._priv, self.size)
        if free_now - consumed > pending:
            return False
        return free_now > pending

    def bytes_to_read(self) -> int:
        """Bytes the peer has published and we have not consumed."""
        w = self._ld(OFF_WRITE_INDEX)
        _rmb()  # [B1'] acquire, as vmb_ring_bytes_to_read
        err = _check_index(w, self.size, RingError.WINDEX_RANGE, RingError.WINDEX_ALIGN)
        if err is not None:
            raise RingCorrupt(err, f"write_index {w:#x}")
        return _avail(w, self._priv, self.size)

    def mask(self) -> None:
        """Tell the producer not to signal: we are draining."""
        self._st(OFF_INTERRUPT_MASK, 1)
        _mb()  # unpaired: the producer sees the mask before we start draining

    def unmask(self) -> bool:
        """Clear the mask and re-check: True if data arrived (drain again), else sleep."""
        self._st(OFF_INTERRUPT_MASK, 0)
        # [B3'] store-then-load: pairs with [B3] in the producer's _publish. Either it
        # sees the mask clear and signals, or we see its new write_index here.
        _mb()
        w = self._ld(OFF_WRITE_INDEX)
        _rmb()  # [B1']
        if _check_index(w, self.size, RingError.WINDEX_RANGE, RingError.WINDEX_ALIGN):
            return True  # the next read reports the corruption
        return w != self._priv


class NativeRingReader(_NativeRing):
    """Consumer end in C: one native call per batch."""

    _RESULT = "struct vmb_read_result *"

    def open(self) -> None:
        """Take the peer-initialised read_index as our private index (validated)."""
        rc = self._lib.vmb_ring_reader_open(self._r)
        if rc:
            _raise(rc, "read_index at open")

    def read(self, out: Buffer, index: Buffer, max_pkts: int, peek: bool = False) -> ReadResult:
        """Copy up to max_pkts whole packets into out; index gets (offset, length) pairs."""
        out_v, idx_b = _read_args(out, index, max_pkts)
        ffi, res = self._ffi, self._res
        c_out = ffi.from_buffer("uint8_t[]", out_v, require_writable=True)
        c_idx = ffi.from_buffer("uint32_t[]", idx_b, require_writable=True)
        rc = self._lib.vmb_ring_read(
            self._r, c_out, out_v.nbytes, c_idx, max_pkts, 1 if peek else 0, res
        )
        return ReadResult(
            res.npkts, res.out_bytes, res.consumed, bool(res.signal), RingError(rc) if rc else None
        )

    def consume(self, nbytes: int) -> bool:
        """Commit nbytes a peek read returned as `consumed`; True: signal the producer.
        ValueError (nothing moves) when nbytes is not 8-aligned or more than is there."""
        _check_u32(nbytes, "nbytes")
        sig = self._ffi.new("uint32_t *")
        rc = self._lib.vmb_ring_consume(self._r, nbytes, sig)
        if rc == RingError.BAD_ARG:
            raise ValueError(f"consume({nbytes}): not 8-aligned or more than is available")
        if rc:
            _raise(rc, "write_index")
        return bool(sig[0])

    @property
    def position(self) -> int:
        """Our read position (the read_index as we last stored it)."""
        return self._priv

    def bytes_to_read(self) -> int:
        """Bytes the peer has published and we have not consumed."""
        n = self._lib.vmb_ring_bytes_to_read(self._r)
        if n < 0:
            _raise(n, "write_index")
        return int(n)

    def mask(self) -> None:
        """Tell the producer not to signal: we are draining."""
        self._lib.vmb_ring_mask(self._r)

    def unmask(self) -> bool:
        """Clear the mask and re-check: True if data arrived (drain again), else sleep."""
        return bool(self._lib.vmb_ring_unmask(self._r))


# --------------------------------------------------------------------- writers


def _check_trans_id_base(trans_id_base: int | None) -> None:
    if trans_id_base is not None and (
        not isinstance(trans_id_base, int) or not 0 <= trans_id_base <= _U64
    ):
        raise ValueError("trans_id_base must fit in 64 bits")


def _check_start(batch: PySendBatch, start: int) -> None:
    if not isinstance(batch, PySendBatch):
        raise TypeError("write() takes a SendBatch; build one from OutPackets")
    if not isinstance(start, int) or not 0 <= start <= len(batch):
        raise ValueError(f"start {start!r} outside the batch of {len(batch)}")


class PyRingWriter(_PyRing):
    """Producer end in pure Python: the reference for NativeRingWriter."""

    def open(self) -> None:
        """Take the current write_index (validated) and announce pending_send_sz support."""
        w = self._ld(OFF_WRITE_INDEX)
        err = _check_index(w, self.size, RingError.WINDEX_RANGE, RingError.WINDEX_ALIGN)
        if err is not None:
            raise RingCorrupt(err, f"write_index {w:#x} at open")
        self._priv = w
        self._pending = 0
        self._st(OFF_FEATURE_BITS, self._ld(OFF_FEATURE_BITS) | FEAT_PENDING_SEND_SZ)

    def _read_free(self) -> int:
        ri = self._ld(OFF_READ_INDEX)  # untrusted, read once
        err = _check_index(ri, self.size, RingError.RINDEX_RANGE, RingError.RINDEX_ALIGN)
        if err is not None:
            raise RingCorrupt(err, f"read_index {ri:#x}")
        return _free(self._priv, ri, self.size)

    def _publish(self, old_w: int, pos: int) -> bool:
        """One write_index store, drop our pending_send_sz, then the signal decision."""
        _mb()  # [B1] packet bytes (and, forwarding, payload reads) before write_index
        self._st(OFF_WRITE_INDEX, pos)
        self._priv = pos
        if self._pending:
            _wmb()  # [B5] pairs with [B5'] in the consumer's _pending_signal
            self._st(OFF_PENDING_SEND_SZ, 0)
            self._pending = 0
        # [B3] store-then-load: write_index is visible before we read interrupt_mask
        # and read_index (pairs with [B3'] in the consumer's unmask).
        _mb()
        if self._ld(OFF_INTERRUPT_MASK):
            return False
        _rmb()  # unpaired: interrupt_mask before read_index, as Linux hv_signal_on_write
        return self._ld(OFF_READ_INDEX) == old_w

    def _trailer(self, pos: int, start: int) -> int:
        return self._put(pos, _TRAILER.pack(start << 32))

    def write(
        self, batch: PySendBatch, start: int = 0, trans_id_base: int | None = None
    ) -> WriteResult:
        """Write the longest prefix of batch[start:] that fits; packet k of this call
        gets trans_id_base + k when a base is given (load generators)."""
        _check_start(batch, start)
        _check_trans_id_base(trans_id_base)
        items = batch._items[start:]
        for k, it in enumerate(items):
            if it[6] + TRAILER_SIZE >= self.size:
                raise RingArgumentError(
                    RingError.PKT_TOO_BIG, f"packet {start + k}: {it[6]} bytes, ring {self.size}"
                )
        free_b = self._read_free()
        _mb()  # [B2'] read_index is read before we overwrite the space it freed
        old_w = pos = self._priv
        npkts = nbytes = 0
        for k, (typ, flags, tid, ext_len, views, body_len, pkt_len) in enumerate(items):
            t = pkt_len + TRAILER_SIZE
            if free_b <= t:
                break
            if trans_id_base is not None:
                tid = (trans_id_base + k) & _U64
            p0 = pos
            desc = _DESC.pack(typ, (DESC_SIZE + ext_len) // 8, pkt_len // 8, flags, tid)
            pos = self._put(pos, desc)
            for v in views:
                pos = self._put(pos, v)
            pos = self._put(pos, bytes(pkt_len - DESC_SIZE - body_len))
            pos = self._trailer(pos, p0)
            free_b -= t
            nbytes += t
            npkts += 1
        signal = self._publish(old_w, pos) if npkts else False
        return WriteResult(npkts, nbytes, signal)

    def write_raw(self, buf: Buffer, index: Buffer, n: int, complete: bool = False) -> WriteResult:
        """Write packets preformed as read() returns them; `complete` turns each packet
        that requested a completion into VM_PKT_COMP with flags 0 (the echo path)."""
        buf_v, idx_b = _raw_args(buf, index, n)
        idx = idx_b.cast("I")
        for i in range(n):
            off, ln = idx[2 * i], idx[2 * i + 1]
            if off + ln > buf_v.nbytes or ln < DESC_SIZE or ln & 7:
                raise RingArgumentError(RingError.BAD_ARG, f"packet {i}: bad offset/length")
            _typ, off8, len8, _fl, _tid = _DESC.unpack_from(buf_v, off)
            if len8 * 8 != ln or off8 < 2 or off8 > len8:
                raise RingArgumentError(RingError.BAD_ARG, f"packet {i}: bad descriptor")
            if ln + TRAILER_SIZE >= self.size:
                raise RingArgumentError(RingError.PKT_TOO_BIG, f"packet {i}: {ln} bytes")
        free_b = self._read_free()
        _mb()  # [B2'] read_index is read before we overwrite the space it freed
        old_w = pos = self._priv
        npkts = nbytes = 0
        for i in range(n):
            off, ln = idx[2 * i], idx[2 * i + 1]
            t = ln + TRAILER_SIZE
            if free_b <= t:
                break
            typ, off8, len8, flags, tid = _DESC.unpack_from(buf_v, off)
            if complete and flags & FLAG_COMPLETION_REQUESTED:
                typ, flags = VM_PKT_COMP, 0
            p0 = pos
            pos = self._put(pos, _DESC.pack(typ, off8, len8, flags, tid))
            pos = self._put(pos, buf_v[off + DESC_SIZE : off + ln])
            pos = self._trailer(pos, p0)
            free_b -= t
            nbytes += t
            npkts += 1
        signal = self._publish(old_w, pos) if npkts else False
        return WriteResult(npkts, nbytes, signal)

    def bytes_to_write(self) -> int:
        """Raw free space as Linux counts it (a packet fits only if this exceeds its size)."""
        return self._read_free()

    def request_space(self, need: int) -> bool:
        """Blocked writer: publish pending_send_sz = need, then re-check. True if it fits
        now (pending cleared); False means wait for the consumer's signal."""
        _check_u32(need, "need")
        if not need:
            raise RingArgumentError(RingError.BAD_ARG, "need must be > 0")
        if need >= self.size:
            raise RingArgumentError(RingError.PKT_TOO_BIG, f"need {need}, ring {self.size}")
        self._st(OFF_PENDING_SEND_SZ, need)
        self._pending = need
        # [B4] store-then-load: pending_send_sz is visible before we re-read read_index
        # (pairs with [B4'] in the consumer's read: it stores read_index, then loads
        # pending_send_sz). Either it sees our need and signals, or we see its room.
        _mb()
        if self._read_free() > need:
            self._st(OFF_PENDING_SEND_SZ, 0)
            self._pending = 0
            return True
        return False


class NativeRingWriter(_NativeRing):
    """Producer end in C: one native call per batch."""

    _RESULT = "struct vmb_write_result *"

    def open(self) -> None:
        """Take the current write_index (validated) and announce pending_send_sz support."""
        rc = self._lib.vmb_ring_writer_open(self._r)
        if rc:
            _raise(rc, "write_index at open")

    def write(
        self, batch: PySendBatch, start: int = 0, trans_id_base: int | None = None
    ) -> WriteResult:
        """Write the longest prefix of batch[start:] that fits; packet k of this call
        gets trans_id_base + k when a base is given (load generators)."""
        _check_start(batch, start)
        _check_trans_id_base(trans_id_base)
        if not isinstance(batch, NativeSendBatch):
            batch = NativeSendBatch(batch.packets)  # O(n): prebuild one for hot loops
        res = self._res
        rc = self._lib.vmb_ring_write(
            self._r,
            batch._c_pkts + start,
            len(batch) - start,
            batch._c_iov,
            0 if trans_id_base is None else 1,
            trans_id_base or 0,
            res,
        )
        if rc:
            _raise(rc, "write")
        return WriteResult(res.npkts, res.bytes, bool(res.signal))

    def write_raw(self, buf: Buffer, index: Buffer, n: int, complete: bool = False) -> WriteResult:
        """Write packets preformed as read() returns them; `complete` turns each packet
        that requested a completion into VM_PKT_COMP with flags 0 (the echo path)."""
        buf_v, idx_b = _raw_args(buf, index, n)
        ffi, res = self._ffi, self._res
        c_buf = ffi.from_buffer("uint8_t[]", buf_v)
        c_idx = ffi.from_buffer("uint32_t[]", idx_b)
        rc = self._lib.vmb_ring_write_raw(
            self._r, c_buf, buf_v.nbytes, c_idx, n, 1 if complete else 0, res
        )
        if rc:
            _raise(rc, "write_raw")
        return WriteResult(res.npkts, res.bytes, bool(res.signal))

    def bytes_to_write(self) -> int:
        """Raw free space as Linux counts it (a packet fits only if this exceeds its size)."""
        n = self._lib.vmb_ring_bytes_to_write(self._r)
        if n < 0:
            _raise(n, "read_index")
        return int(n)

    def request_space(self, need: int) -> bool:
        """Blocked writer: publish pending_send_sz = need, then re-check. True if it fits
        now (pending cleared); False means wait for the consumer's signal."""
        _check_u32(need, "need")
        rc = self._lib.vmb_ring_request_space(self._r, need)
        if rc < 0:
            _raise(rc, "request_space")
        return bool(rc)


# --------------------------------------------------------------------- parsing


class Packet:
    """A view of one packet in the private copy made by read(): nothing is re-read
    from guest memory. ext and payload are memoryviews into that copy."""

    __slots__ = ("ext", "flags", "len8", "offset8", "payload", "trans_id", "type")

    def __init__(
        self,
        type: int,
        flags: int,
        trans_id: int,
        offset8: int,
        len8: int,
        ext: memoryview,
        payload: memoryview,
    ) -> None:
        self.type = type
        self.flags = flags
        self.trans_id = trans_id
        self.offset8 = offset8
        self.len8 = len8
        self.ext = ext
        self.payload = payload

    def __repr__(self) -> str:
        return (
            f"Packet(type={self.type:#x}, flags={self.flags:#x}, trans_id={self.trans_id}, "
            f"ext={self.ext.nbytes}B, payload={self.payload.nbytes}B)"
        )


def iter_packets(out: Buffer, index: Buffer, n: int) -> Iterator[Packet]:
    """Yield the n packets a read() put into out (index as read() filled it)."""
    out_v = _bytes_view(out, "out")
    idx_b = _bytes_view(index, "index")
    if idx_b.nbytes < 8 * n:
        raise ValueError(f"index holds {idx_b.nbytes // 8} pairs, n is {n}")
    idx = idx_b[: 8 * n].cast("I")
    for i in range(n):
        off, ln = idx[2 * i], idx[2 * i + 1]
        if off + ln > out_v.nbytes or ln < DESC_SIZE:
            raise ValueError(f"packet {i}: index entry outside out")
        typ, off8, len8, flags, tid = _DESC.unpack_from(out_v, off)
        if len8 * 8 != ln or not 2 <= off8 <= len8:
            raise ValueError(f"packet {i}: descriptor does not match its index entry")
        p = off + off8 * 8
        yield Packet(typ, flags, tid, off8, len8, out_v[off + DESC_SIZE : p], out_v[p : off + ln])


def py_forward(
    reader: PyRingReader, writer: PyRingWriter, max_pkts: int, complete: bool = False
) -> ForwardResult:
    """Twin of vmb_ring_forward: descriptors copied once and validated, payload ring to
    ring, as many packets as the writer's ring has room for."""
    _check_u32(max_pkts, "max_pkts")
    rsize, wsize = reader.size, writer.size
    w = reader._ld(OFF_WRITE_INDEX)  # untrusted, loaded once
    _rmb()  # [B1'] acquire, as in read
    err = _check_index(w, rsize, RingError.WINDEX_RANGE, RingError.WINDEX_ALIGN)
    if err is not None:
        return ForwardResult(0, 0, False, False, err)
    ri = writer._ld(OFF_READ_INDEX)  # untrusted, read once
    err = _check_index(ri, wsize, RingError.RINDEX_RANGE, RingError.RINDEX_ALIGN)
    if err is not None:
        return ForwardResult(0, 0, False, False, err)
    rpos, wpos = reader._priv, writer._priv
    old_w = wpos
    avail = _avail(w, rpos, rsize)
    free_b = _free(wpos, ri, wsize)
    _mb()  # [B2'] the reader's read_index is read before we overwrite the space
    consumed = npkts = 0
    while npkts < max_pkts and avail:
        raw, (_typ, off8, len8, flags, tid), err = reader._fetch_desc(rpos, avail)
        if err is not None:
            break
        n = len8 * 8
        if n + TRAILER_SIZE >= wsize:
            err = RingError.PKT_TOO_BIG
            break
        if free_b <= n + TRAILER_SIZE:
            break
        if complete and flags & FLAG_COMPLETION_REQUESTED:
            raw = _DESC.pack(VM_PKT_COMP, off8, len8, 0, tid)
        p0 = wpos
        wpos = writer._put(wpos, raw)
        wpos = writer._put(wpos, reader._get((rpos + DESC_SIZE) % rsize, n - DESC_SIZE))
        wpos = writer._trailer(wpos, p0)
        free_b -= n + TRAILER_SIZE
        consumed += n + TRAILER_SIZE
        avail -= n + TRAILER_SIZE
        rpos = (rpos + n + TRAILER_SIZE) % rsize
        npkts += 1
    wsig = rsig = False
    if npkts:
        wsig = writer._publish(old_w, wpos)  # writer's [B1] is reader's [B2]
        reader._st(OFF_READ_INDEX, rpos)
        reader._priv = rpos
        _mb()  # [B4'] read_index is visible before we look at pending_send_sz
        rsig = reader._pending_signal(consumed)
    return ForwardResult(npkts, consumed, rsig, wsig, err)


def native_forward(
    reader: NativeRingReader, writer: NativeRingWriter, max_pkts: int, complete: bool = False
) -> ForwardResult:
    """One vmb_ring_forward call (see py_forward for the contract)."""
    _check_u32(max_pkts, "max_pkts")
    lib, ffi = reader._lib, reader._ffi
    res = reader._fwd_res
    if res is None:  # once per reader, not once per batch
        res = reader._fwd_res = ffi.new("struct vmb_fwd_result *")
    rc = lib.vmb_ring_forward(
        reader._r, writer._r, max_pkts, lib.VMB_RAW_COMPLETE if complete else 0, res
    )
    if rc == RingError.BAD_ARG:
        raise RingArgumentError(rc, "forward flags")
    err = RingError(rc) if rc else None
    return ForwardResult(
        int(res.npkts), int(res.consumed), bool(res.read_signal), bool(res.write_signal), err
    )


def forward(reader: Any, writer: Any, max_pkts: int, complete: bool = False) -> ForwardResult:
    """Forward with whichever flavour the two rings are (both must be the same)."""
    if isinstance(reader, NativeRingReader) and isinstance(writer, NativeRingWriter):
        return native_forward(reader, writer, max_pkts, complete)
    if isinstance(reader, PyRingReader) and isinstance(writer, PyRingWriter):
        return py_forward(reader, writer, max_pkts, complete)
    raise TypeError("forward needs a reader and a writer of the same flavour")


if TYPE_CHECKING:  # one interface, two flavours: type-check against the twin
    RingReader = PyRingReader
    RingWriter = PyRingWriter
    SendBatch = PySendBatch
else:
    RingReader = NativeRingReader if _native_sel.NATIVE else PyRingReader
    RingWriter = NativeRingWriter if _native_sel.NATIVE else PyRingWriter
    SendBatch = NativeSendBatch if _native_sel.NATIVE else PySendBatch
