"""Fuzz target for the typed packet layer (vmbus/packet.py).

The invariant, h11 style: whatever the guest put in a packet, parsing it either
succeeds or raises PacketError, nothing else; and the three GPA-direct decoders
(single-packet parse, batch twin, batch C) give the same answer, record for record.

Run it under atheris (coverage-guided, libFuzzer):

    python tests/fuzz/fuzz_packet.py [libFuzzer options, e.g. -runs=100000 -max_len=4096]

or as a plain property test: tests/test_packet.py feeds `check_one` from hypothesis.

The fuzz input is a batch of packets. Each packet takes a 4-byte head from the
input (type selector, extension length, payload length, flags and mode) and then
its extension and payload bytes (zero-filled when the input runs out), or a
well-formed GPA-direct range list shaped from the input (`shaped_ext`); the
descriptor's offset8/len8 are made consistent with those lengths, as ring read()
guarantees. Guest RAM starts at GPA 0, so the small PFNs fuzzers produce often
(0, 1, ...) land in RAM and the walk is exercised past its first PFN.
"""

from __future__ import annotations

import array
import fcntl
import mmap
import os
import struct
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness, when imported by path
import harness

with harness.instrumented():
    from vmbus import native as native_sel
    from vmbus.memory import GuestMemory
    from vmbus.packet import (
        GpaDirectDecoder,
        GpaStatus,
        PacketError,
        PacketType,
        parse_completion,
        parse_gpa_direct,
        parse_xfer_pages,
    )
    from vmbus.ring import iter_packets

PAGE = 4096
RAM_LAYOUT = ((0, 16), (0x100000, 4))  # (gpa, pages): PFNs 0-15 and 256-259
MAX_PACKETS = 8
MAX_EXT8 = 64  # extension up to 64 * 8 bytes beyond the descriptor
_TYPES = (
    PacketType.GPA_DIRECT,
    PacketType.GPA_DIRECT,
    PacketType.GPA_DIRECT,
    PacketType.INBAND,
    PacketType.XFER_PAGES,
    PacketType.COMPLETION,
)
_DESC = struct.Struct("<HHHHQ")


def sealed_ram_fd(pages: int) -> int:
    """A memfd sealed against shrinking, as guest RAM must be."""
    fd = os.memfd_create("vmbusd-fuzz-packet", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, pages * PAGE)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


class _Env:
    """Guest RAM and one decoder per backend, built once per process."""

    def __init__(self) -> None:
        self.memory = GuestMemory(native=False)
        for gpa, pages in RAM_LAYOUT:
            fd = sealed_ram_fd(pages)
            self.memory.add_region(gpa, pages * PAGE, fd)
            os.close(fd)  # GuestMemory keeps its own dup
        # Tiny record arrays, so that growth (VMB_GPA_MORE) is exercised too.
        self.decoders = [GpaDirectDecoder(self.memory, native=False, max_ranges=1, max_segs=1)]
        if native_sel.native_available():
            self.decoders.append(
                GpaDirectDecoder(self.memory, native=True, max_ranges=1, max_segs=1)
            )
        self.buf = mmap.mmap(-1, MAX_PACKETS * (16 + 8 * MAX_EXT8 + 256))


_env: _Env | None = None


def env() -> _Env:
    global _env
    if _env is None:
        _env = _Env()
    return _env


# PFNs in RAM and just outside it, for well-formed range lists.
_PFN_POOL = (0, 1, 2, 14, 15, 16, 255, 256, 257, 259, 260, 1 << 40, (1 << 52) - 1)


def shaped_ext(data: bytes, pos: int, *, perturb: bool) -> tuple[bytes, int]:
    """A GPA-direct extension whose structure is valid (1-4 ranges of 1-3 pages,
    PFNs from _PFN_POOL and their neighbours), so the walk and the segment records
    are reached far more often than from raw bytes; `perturb` changes one byte."""
    raw = data[pos : pos + 27].ljust(27, b"\0")
    count = 1 + raw[0] % 4
    parts = [struct.pack("<II", raw[1], count)]
    for k in range(count):
        r = raw[3 + 6 * k : 9 + 6 * k]
        offset = (r[0] | r[1] << 8) % PAGE
        nbytes = 1 + (r[2] | r[3] << 8) % (3 * PAGE - offset)
        npfns = (offset + nbytes + PAGE - 1) // PAGE
        base, step = _PFN_POOL[r[4] % len(_PFN_POOL)], r[5] % 3
        pfns = [(base + i * step) & ((1 << 64) - 1) for i in range(npfns)]
        parts.append(struct.pack(f"<II{npfns}Q", nbytes, offset, *pfns))
    ext = bytearray(b"".join(parts))
    if perturb:
        ext[raw[2] % len(ext)] ^= 1 << (raw[1] % 8)
    return bytes(ext), pos + 27


def build_batch(data: bytes, buf: Any) -> tuple[array.array[int], int]:
    """Lay packets from fuzz bytes into buf back to back; returns (index, n)."""
    index = array.array("I")
    pos = used = 0
    n = 1 + (data[0] % MAX_PACKETS if data else 0)
    pos = 1
    for _ in range(n):
        head = data[pos : pos + 4].ljust(4, b"\0")
        pos += 4
        typ = _TYPES[head[0] % len(_TYPES)]
        ext_len = 8 * (head[1] % (MAX_EXT8 + 1))
        pay_len = head[2]
        flags = head[3] & 1
        if head[3] & 2:  # a well-formed range list, perhaps with one byte changed
            typ = PacketType.GPA_DIRECT
            ext, pos = shaped_ext(data, pos, perturb=bool(head[3] & 4))
            ext_len = len(ext)
            body = ext + data[pos : pos + pay_len].ljust(pay_len, b"\0")
            pos += pay_len
        else:
            body = data[pos : pos + ext_len + pay_len].ljust(ext_len + pay_len, b"\0")
            pos += ext_len + pay_len
        off8 = 2 + ext_len // 8
        len8 = off8 + (pay_len + 7) // 8
        _DESC.pack_into(buf, used, typ, off8, len8, flags, pos)
        buf[used + 16 : used + 16 + len(body)] = body
        buf[used + 16 + len(body) : used + 8 * len8] = bytes(8 * len8 - 16 - len(body))
        index.extend((used, 8 * len8))
        used += 8 * len8
    return index, n


def check_one(data: bytes) -> None:
    """Every packet parses or raises PacketError, and every decoder agrees."""
    e = env()
    index, n = build_batch(data, e.buf)
    batches = [d.decode(e.buf, index, n) for d in e.decoders]
    if len(e.decoders) == 2:
        twin, nat = (d._be for d in e.decoders)
        assert twin.state() == nat.state()
        _, nranges, nsegs, _ = twin.state()
        (tp, tr, ts), (np_, nr, ns) = twin.views(), nat.views()
        assert tp[: 24 * n] == np_[: 24 * n]
        assert tr[: 24 * nranges] == nr[: 24 * nranges]
        assert ts[: 24 * nsegs] == ns[: 24 * nsegs]
    for i, pkt in enumerate(iter_packets(e.buf, index, n)):
        try:
            single = parse_gpa_direct(pkt, e.memory)
        except PacketError as exc:
            single_status = exc.status if exc.status is not None else GpaStatus.SKIPPED
        else:
            single_status = GpaStatus.OK
        for b in batches:
            assert b.status(i) == single_status, (i, b.status(i), single_status)
            try:
                got = b.get(i)
                views = b.iovecs(i)
            except PacketError:
                assert single_status != GpaStatus.OK
            else:
                assert single_status == GpaStatus.OK
                assert got == single
                assert sum(v.nbytes for v in views) == single.total_bytes
                del views
        if pkt.type == PacketType.XFER_PAGES:
            try:
                parse_xfer_pages(pkt).views(e.buf)
            except PacketError:
                pass
        if pkt.type == PacketType.COMPLETION:
            parse_completion(pkt)
    del batches


main = harness.main_for(check_one)


if __name__ == "__main__":
    main(sys.argv)
