"""Shared helpers for the ring tests: guest-like memory and a hostile fuzz loop.

Memory comes in three kinds: a plain bytearray; an mmap with PROT_NONE pages on
both sides (an out-of-bounds access by C faults instead of going unnoticed); and a
real double mapping of a memfd (data pages mapped twice back to back, also between
guard pages), which is what `doubled=True` assumes. Regions are cached and never
unmapped: stale views from earlier examples then stay harmless.

Run as a script (`python ring_support.py SEED N`) it fuzzes the native ring
with garbage on guarded memory and compares it with the twin; the tests start it
in a subprocess so that a segfault fails one test instead of killing pytest.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import struct
import sys
from array import array
from dataclasses import dataclass
from typing import Any

from vmbus import ring

PAGE = mmap.PAGESIZE
PROT_NONE = 0
MAP_FIXED = 0x10  # Linux, all architectures we run on
HDR = ring.HDR_SIZE
DESC = struct.Struct("<HHHHQ")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value


def _mmap(addr: int | None, length: int, prot: int, flags: int, fd: int = -1) -> int:
    p = _libc.mmap(addr, length, prot, flags, fd, 0)
    if p is None or p == _MAP_FAILED:
        raise OSError(ctypes.get_errno(), "mmap failed")
    return int(p)


def _view(addr: int, length: int) -> memoryview:
    return memoryview((ctypes.c_char * length).from_address(addr)).cast("B")


def _guarded(length: int) -> memoryview:
    """`length` (page multiple) read-write bytes with a PROT_NONE page on each side."""
    base = _mmap(None, length + 2 * PAGE, PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if _libc.mprotect(base + PAGE, length, mmap.PROT_READ | mmap.PROT_WRITE):
        raise OSError(ctypes.get_errno(), "mprotect failed")
    return _view(base + PAGE, length)


def _double(size: int) -> memoryview:
    """A memfd of `size` bytes mapped twice back to back, between guard pages."""
    fd = os.memfd_create("vmbusd-ring-test")
    try:
        os.ftruncate(fd, size)
        base = _mmap(None, 2 * size + 2 * PAGE, PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        rw = mmap.PROT_READ | mmap.PROT_WRITE
        for k in range(2):
            _mmap(base + PAGE + k * size, size, rw, mmap.MAP_SHARED | MAP_FIXED, fd)
    finally:
        os.close(fd)
    return _view(base + PAGE, 2 * size)


@dataclass
class Mem:
    """One ring's memory: header page and data area (2*size long when doubled)."""

    hdr: memoryview
    data: memoryview
    size: int
    doubled: bool

    def snapshot(self) -> bytes:
        """Header and the data area once (the mirror is checked separately)."""
        return bytes(self.hdr) + bytes(self.data[: self.size])

    def mirror_ok(self) -> bool:
        return not self.doubled or self.data[: self.size] == self.data[self.size :]

    def reset(self, r: int = 0, w: int = 0, fill: bytes | None = None) -> None:
        """Linux-style header (feature bit set) with chosen indices; data filled."""
        ring.init_ring_header(self.hdr)
        struct.pack_into("<II", self.hdr, 0, w, r)
        self.data[: self.size] = fill if fill is not None else bytes(self.size)

    def set32(self, off: int, v: int) -> None:
        struct.pack_into("<I", self.hdr, off, v & 0xFFFFFFFF)

    def get32(self, off: int) -> int:
        return struct.unpack_from("<I", self.hdr, off)[0]


_CACHE: dict[tuple[str, int, int], Mem] = {}


def mem(kind: str, size: int, slot: int = 0) -> Mem:
    """A cached region: kind 'plain' (bytearray), 'guarded' (PROT_NONE neighbours,
    page-multiple size) or 'double' (real double mapping with guards)."""
    key = (kind, size, slot)
    m = _CACHE.get(key)
    if m is None:
        if kind == "plain":
            m = Mem(memoryview(bytearray(HDR)), memoryview(bytearray(size)), size, False)
        elif kind == "guarded":
            m = Mem(_guarded(HDR), _guarded(size), size, False)
        elif kind == "double":
            m = Mem(_guarded(HDR), _double(size), size, True)
        else:
            raise ValueError(kind)
        _CACHE[key] = m
    return m


IMPLS = ("py", "native")


def classes(impl: str) -> tuple[Any, Any, Any]:
    """(Reader, Writer, SendBatch) of one flavour."""
    if impl == "py":
        return ring.PyRingReader, ring.PyRingWriter, ring.PySendBatch
    return ring.NativeRingReader, ring.NativeRingWriter, ring.NativeSendBatch


def outcome(fn: Any, *args: Any, **kw: Any) -> Any:
    """A call's result or its exception as a comparable value."""
    try:
        return ("ok", fn(*args, **kw))
    except (ring.RingCorrupt, ring.RingArgumentError) as exc:
        return (type(exc).__name__, exc.code)


def raw_packet(typ: int, flags: int, off8: int, len8: int, tid: int = 0, fill: int = 0) -> bytes:
    """A packet as a hostile guest might lay it out: any descriptor, len8*8 bytes."""
    body = bytes([fill]) * max(0, len8 * 8 - 16)
    return DESC.pack(typ, off8, len8, flags, tid) + body


def put_ring(m: Mem, pos: int, blob: bytes) -> int:
    """Write blob into the data area at pos with wrap (what a guest producer does)."""
    for b in blob:
        m.data[pos] = b  # a real double mapping mirrors it by itself
        pos = (pos + 1) % m.size
    return pos


# ----------------------------------------------------------------- fuzz script


def fuzz(seed: int, rounds: int) -> int:
    """Garbage headers and data against both flavours on guarded memory; returns the
    number of mismatches between them (a fault kills the process instead)."""
    rng = random.Random(seed)
    bad = 0
    for it in range(rounds):
        kind = rng.choice(("guarded", "double"))
        size = PAGE * rng.choice((1, 2))
        mems = [mem(kind, size, slot) for slot in (0, 1)]
        fill = rng.randbytes(size) if rng.random() < 0.5 else None
        r0 = rng.randrange(0, size, 8)
        for m in mems:
            m.reset(r0, r0, fill)
        blob = b""
        if fill is None:  # plausible packets, some of them broken
            parts = []
            for _ in range(rng.randrange(1, 6)):
                len8 = rng.choice(
                    (rng.randrange(2, 40), rng.randrange(2, 40), rng.randrange(0x10000))
                )
                pkt = raw_packet(
                    rng.choice((6, 6, 7, 9, 0xB, 0xB, rng.randrange(0x10000))),
                    rng.choice((0, 1, 1, rng.randrange(0x10000))),
                    rng.choice((2, 2, 3, 3, rng.randrange(0, 6), rng.randrange(0x10000))),
                    len8,
                    fill=rng.randrange(256),
                )
                parts.append(pkt[: rng.choice((len(pkt), len(pkt), rng.randrange(len(pkt) + 1)))])
                parts.append(bytes(8))
            blob = b"".join(parts)[: size - 8]
            blob = blob[: len(blob) & ~7]
            for m in mems:
                put_ring(m, r0, blob)
        w0 = (r0 + len(blob)) % size
        hdr_vals = [
            (
                ring.OFF_WRITE_INDEX,
                rng.choice((w0, w0, w0, rng.randrange(0, size, 8), rng.randrange(2**32))),
            ),
            (
                ring.OFF_READ_INDEX,
                rng.choice((r0, r0, r0, rng.randrange(0, size, 8), rng.randrange(2**32))),
            ),
            (ring.OFF_PENDING_SEND_SZ, rng.choice((0, rng.randrange(2**32), rng.randrange(size)))),
            (ring.OFF_FEATURE_BITS, rng.randrange(4)),
        ]
        results = []
        for impl, m in zip(IMPLS, mems, strict=True):
            for off, v in hdr_vals:
                m.set32(off, v)
            reader_cls, writer_cls, batch_cls = classes(impl)
            rd = reader_cls(m.hdr, m.data, size, doubled=m.doubled)
            wr = writer_cls(m.hdr, m.data, size, doubled=m.doubled)
            res: list[Any] = [outcome(rd.open), outcome(wr.open)]
            rr = random.Random(seed * 1000 + it)  # same choices for both flavours
            out = bytearray(rr.choice((size, rr.randrange(size + 1))))
            idx = array("I", bytes(8 * 64))
            for _ in range(4):
                res.append(rd.read(out, idx, rr.randrange(64), peek=rr.random() < 0.3))
                res.append(bytes(out))
                res.append(outcome(rd.bytes_to_read))
                res.append(rd.unmask())
                body = rr.randbytes(rr.randrange(size))
                res.append(outcome(wr.write, batch_cls([ring.OutPacket(6, 0, 1, [body])])))
                res.append(outcome(wr.request_space, rr.randrange(1, size)))
            res.append(m.snapshot())
            res.append(m.mirror_ok())
            results.append(res)
        if results[0] != results[1]:
            bad += 1
            print(f"mismatch at round {it}", file=sys.stderr)
    return bad


if __name__ == "__main__":
    sys.exit(1 if fuzz(int(sys.argv[1]), int(sys.argv[2])) else 0)
