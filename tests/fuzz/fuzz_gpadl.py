"""Fuzz target for GPADL assembly: GPADL_HEADER + GPADL_BODY messages into a range
buffer, parsed into gpa_ranges (vmbus/bus.py `_on_gpadl_*`, vmbus/protocol.py
`parse_gpa_ranges`, vmbus/gpadl.py).

The contract: nothing the guest sends raises out of `VmBusServer.receive`; every
GPADL_HEADER gets exactly one GPADL_CREATED (success or failure) once its buffer is
whole or refused; a created GPADL's ranges are exactly `parse_gpa_ranges` of the bytes
the guest sent (cut at the header's range_buflen), each range has
ceil((offset+count)/4096) PFNs, every PFN passed the RAM check, and the pages charged
never exceed what range_buflen could hold nor the bus's limit (check_invariants).
`parse_gpa_ranges` on its own returns ranges or raises ProtocolError, nothing else.

    python tests/fuzz/fuzz_gpadl.py [libFuzzer options] [corpus dirs]

Input: byte 0 is the range count the header claims (1-4, or 0/255 sometimes); then
each range's (byte_count, byte_offset) and PFN count are drawn from the input, the PFNs
from a pool straddling the fake RAM's end; a few bytes perturb the buffer and
range_buflen; then the buffer is cut into a header and bodies of sizes the input
picks, each body with a msgnumber and (sometimes wrong) handle; between pieces a
teardown, a second header on the same handle, or a reset may come.
"""

from __future__ import annotations

import struct
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness, when imported by path
import harness

with harness.instrumented():
    from vmbus import bus as b
    from vmbus import protocol as p
    from vmbus.protocol import ProtocolError

RAM_PAGES = 0x400
_PFNS = (0, 1, 0x3FF, 0x400, 0x401, 0x123, (1 << 64) - 1, 1 << 40)
HANDLE = 0xE1E10
_IF = uuid.UUID("0fe3f3a5-0a2d-4d57-9d1c-1a7a3c8c1e02")


def _in_ram(pfns: object) -> bool:
    return all(0 <= int(x) < RAM_PAGES for x in pfns)  # type: ignore[attr-defined]


def range_buffer(r: harness.Reader) -> tuple[int, bytes]:
    """(rangecount claimed, a range buffer) from the input."""
    claimed = r.pick((1, 1, 2, 3, 4, 0, 255))
    parts = []
    for _ in range(max(1, min(claimed, 4))):
        count = r.pick((4096, 8192, 1, 4095, 4097, 0, 0xFFFFFFFF)) if r.byte() & 1 else r.u32()
        offset = r.pick((0, 0, 1, 0xFFF, 0x1000, 100))
        n = p.range_pfn_count(count, offset) if count < 1 << 20 else 1
        n = min(n + r.pick((0, 0, 0, -1, 1)), 64)
        base = r.pick(_PFNS)
        pfns = [(base + i) & ((1 << 64) - 1) for i in range(max(n, 0))]
        parts.append(struct.pack(f"<II{len(pfns)}Q", count, offset, *pfns))
    buf = bytearray(b"".join(parts))
    flips = r.byte() % 3
    for _ in range(flips):
        if buf:
            at = r.u16() % len(buf)
            buf[at] ^= r.byte()
    return claimed, bytes(buf)


def check_parse(rangecount: int, buf: bytes) -> None:
    try:
        ranges = p.parse_gpa_ranges(rangecount, buf)
    except ProtocolError:
        return
    assert len(ranges) == rangecount
    used = 0
    for rg in ranges:
        assert rg.byte_count > 0 and rg.byte_offset <= p.MAX_BYTE_OFFSET
        assert len(rg.pfns) == p.range_pfn_count(rg.byte_count, rg.byte_offset)
        used += 8 + 8 * len(rg.pfns)
    assert used <= len(buf)


def connected() -> tuple[b.VmBusServer, int]:
    s = b.VmBusServer(1, validate_pfns=_in_ram, max_gpadls=8, max_gpadl_pages=256)
    relid = s.add_offer(b.Offer(_IF, uuid.UUID(int=7)))
    s.receive(p.InitiateContact(p.VERSION_WIN10, 0, 0, 0x3000, 0x4000).encode(), 1)
    s.receive(p.RequestOffers().encode(), 1)
    list(s.events())
    return s, relid


def created(s: b.VmBusServer) -> list[p.GpadlCreated]:
    out = []
    for ev in s.events():
        if isinstance(ev, b.SendMessage):
            msg = p.decode(ev.payload)
            if isinstance(msg, p.GpadlCreated):
                out.append(msg)
    return out


def check_one(data: bytes) -> None:
    r = harness.Reader(data)
    rangecount, buf = range_buffer(r)
    check_parse(rangecount, buf)
    s, relid = connected()
    buflen = max(0, min(0xFFFF, len(buf) + r.pick((0, 0, 0, 8, -8, 1, -1, 0x7FF0))))
    capacity = buflen // 8 * 8
    head_room = p.GPADL_HEADER_MAX_PFNS * 8 + 8
    first = min(len(buf), head_room, r.pick((head_room, head_room, 8, 16, 0, 24)))
    first -= first % 8 if r.byte() & 1 else 0
    header = p.GpadlHeader(relid, HANDLE, buflen, rangecount, buf[:first])
    sent = bytearray(buf[: first // 8 * 8])  # the bus keeps whole u64s only
    s.receive(header.encode(), 1)
    answers = created(s)
    pos, msgnumber, clean = first, 1, True
    while pos < len(buf) and len(answers) == 0 and r.more():
        step = r.pick((p.GPADL_BODY_MAX_PFNS, p.GPADL_BODY_MAX_PFNS, 1, 2, 7))
        chunk = buf[pos : pos + 8 * step]
        pfns = struct.unpack(f"<{len(chunk) // 8}Q", chunk[: len(chunk) // 8 * 8])
        pos += len(pfns) * 8 or 8
        twist = r.byte()
        handle = HANDLE if twist % 8 else r.pick((0, HANDLE + 1, 0xFFFFFFFF))
        clean = clean and handle == HANDLE and twist % 16 not in (3, 5)
        if twist % 16 == 3:
            s.receive(p.GpadlTeardown(relid, HANDLE).encode(), 1)
        elif twist % 16 == 5:
            s.receive(header.encode(), 1)  # the same handle again while in progress
        s.receive(p.GpadlBody(msgnumber, handle, pfns).encode(), 1)
        sent += b"".join(x.to_bytes(8, "little") for x in pfns)
        msgnumber += 1
        answers += created(s)
        s.check_invariants()
    s.check_invariants()
    ok = [a for a in answers if a.status == p.STATUS_SUCCESS]
    assert len(ok) <= 1 and (clean or len(answers) <= 2), answers
    if ok:
        assert ok[0].gpadl == HANDLE and ok[0].child_relid == relid
        gp = s.gpadl(HANDLE, relid)
        if clean:  # only this GPADL's bytes went to its handle, in order
            assert gp.ranges == p.parse_gpa_ranges(rangecount, bytes(sent[:capacity]))
        for rg in gp.ranges:
            assert len(rg.pfns) == p.range_pfn_count(rg.byte_count, rg.byte_offset)
        assert _in_ram(gp.pfns)
        assert gp.page_count <= (capacity - 8 * rangecount) // 8
    elif clean and len(sent) >= capacity and buflen >= 8 * rangecount + 8 and rangecount:
        # the guest sent the whole buffer, so it must have been answered one way or the other
        assert answers, (answers, pos, capacity)


main = harness.main_for(check_one)

if __name__ == "__main__":
    main(sys.argv)
