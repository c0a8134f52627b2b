"""Fuzz target for the request journal's recovery (vmbus/journal.py
`RequestJournal.resume`): the in-flight slot is memory the VMM holds and can write,
and the downstream ring resume reads back is guest memory, so both are hostile.

The contract (journal.py's docstrings): `resume` returns (journal, pending) or raises
JournalError, exactly when the header's magic, version, entry size or entry count is
not this journal's; never anything else. On success:
- nothing outside the slot is touched (sentinels around it) and the rings are only
  read (their bytes unchanged);
- the pending requests are exactly the entries the protocol says were taken and not
  completed: TAKEN and REPLY entries that fit; STAGED ones only when the ring's
  read_index equals the batch's noted end (and that end differs from its start);
  COMPLETING ones only when the completions read back from our ring since `w_mark`
  do not hold their transaction id, and none when that span cannot be read ("every
  COMPLETING entry counts as published: never twice"); an entry that does not fit
  (state, flags, length, a request shorter than a descriptor) is dropped;
- each pending request carries its entry's bytes (the packet, or the kept reply), id
  and sequence number, in sequence order, each entry once;
- the slot is rewritten clean: pending entries TAKEN or REPLY, all others FREE, the
  header with nothing staged or completing, the free count the rest; resuming it
  again gives the same requests and logs nothing;
- at most one log line per kind of trouble (staged batch, ring span, bad entries).

    python tests/fuzz/fuzz_journal.py [libFuzzer options] [corpus dirs]

Input: byte 0 bit 0 `copy` (entries hold the packet), bit 1 a doubled ring mapping or
a single one, bit 2 a 1- or 2-page downstream ring, bits 3-7 the entry size (48 + 8 k);
byte 1 the entry count - 1, byte 2 the slot's trailing bytes (mod the entry size);
the upstream read_index and downstream write_index (u32 each, raw); the slot's bytes;
the downstream ring's data (zero-filled). Seeds: journals the real code wrote
(record_seeds.py `journal_seeds`).
"""

from __future__ import annotations

import logging
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness, when imported by path
import harness

with harness.instrumented():
    from vmbus import journal as jn
    from vmbus.gpadl import PAGE_SIZE, Gpadl, GpaRange
    from vmbus.memory import GuestMemory, RingPairMapping, sealed_memfd
    from vmbus.ring import OFF_READ_INDEX, OFF_WRITE_INDEX, VM_PKT_COMP

GUARD = 64
_SENT = 0xA5
RAM = 16 * PAGE_SIZE


def _setup() -> tuple[GuestMemory, int, dict[int, RingPairMapping]]:
    """Real ring pairs (1 upstream page; 1 or 2 downstream pages, doubled) in a guest RAM
    made once: resume reads them as it reads a channel's."""
    fd = sealed_memfd("fuzz-journal", RAM)
    mem = GuestMemory()
    mem.add_region(0, RAM, fd)
    maps: dict[int, RingPairMapping] = {}
    for down, first in ((1, 1), (2, 8)):
        pfns = tuple(range(first, first + 3 + down))  # up hdr, up page, down hdr, down pages
        gp = Gpadl(1, 1, (GpaRange(len(pfns) * PAGE_SIZE, 0, pfns),))
        maps[down] = mem.map_ring_pair(gp, 2)
    return mem, fd, maps


_MEM, _FD, _MAPS = _setup()


class SingleMapping:
    """The same rings through a mapping whose data is not doubled (resume's wrap path)."""

    def __init__(self, m: RingPairMapping) -> None:
        self.m = m
        self.upstream_size = m.upstream_size
        self.downstream_size = m.downstream_size

    @property
    def upstream_hdr(self) -> memoryview:
        return self.m.upstream_hdr

    @property
    def downstream_hdr(self) -> memoryview:
        return self.m.downstream_hdr

    @property
    def downstream_data(self) -> memoryview:
        return self.m.downstream_data[: self.m.downstream_size]


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


_LINES = _Lines()
LOG = logging.getLogger("fuzz_journal")
LOG.addHandler(_LINES)
LOG.setLevel(logging.DEBUG)
LOG.propagate = False


def published_model(w_mark: int, w: int, size: int, ring: bytes) -> set[int] | None:
    """The completions' transaction ids between w_mark and the write_index, as the
    module docstring describes the read-back; None when that span cannot be read."""
    if w >= size or w_mark >= size or w % 8 or w_mark % 8:
        return None
    two = ring + ring
    tids: set[int] = set()
    pos, left = w_mark, (w - w_mark) % size
    while left:
        if left < 16 + 8:
            return None
        typ, _off8, len8, _flags, tid = struct.unpack_from("<HHHHQ", two, pos)
        total = len8 * 8 + 8
        if len8 * 8 < 16 or total > left:
            return None
        if typ == VM_PKT_COMP:
            tids.add(tid)
        pos = (pos + total) % size
        left -= total
    return tids


def expected(
    slot: bytes, esize: int, nent: int, copy: bool, read_index: int, published: set[int] | None
) -> list[tuple[int, int, int, bytes, bool, bool]]:
    """(entry, trans_id, seq, body, is_reply, truncated) of every entry resume must
    return, in entry order (the protocol of the module docstring, entry by entry)."""
    (_m, _v, _es, _n, staged, r_before, r_after, completing, _w, _, _s) = jn.HEADER.unpack_from(
        slot, 0
    )
    keep_staged = bool(staged) and read_index == r_after and r_after != r_before
    out = []
    for e in range(nent):
        base = jn.HEADER_SIZE + e * esize
        state, length, tid, flags, _, seq = jn.ENTRY.unpack_from(slot, base)
        if state == jn.STAGED and not keep_staged:
            continue
        if state == jn.COMPLETING and completing and (published is None or tid in published):
            continue
        if state not in (jn.STAGED, jn.TAKEN, jn.REPLY, jn.COMPLETING):
            continue
        if length > esize - jn.ENTRY_HEADER or flags & ~3:
            continue
        is_reply = state == jn.REPLY or (state == jn.COMPLETING and bool(flags & jn.F_REPLY_DONE))
        if not is_reply and copy and length < 16:
            continue
        body = slot[base + jn.ENTRY_HEADER : base + jn.ENTRY_HEADER + length]
        out.append((e, tid, seq, body, is_reply, bool(flags & jn.F_TRUNCATED)))
    return out


def layout(data: bytes) -> tuple[bool, bool, int, int, int, int, int, bytes, bytes]:
    """(copy, doubled, downstream pages, entry size, entries, read_index, write_index,
    slot bytes, downstream ring bytes) from the input."""
    r = harness.Reader(data)
    sel = r.byte()
    copy, doubled, pages = bool(sel & 1), bool(sel & 2), 1 + (sel >> 2 & 1)
    esize = 48 + 8 * (sel >> 3)
    nent = 1 + r.byte()
    extra = r.byte() % esize
    read_index, write_index = r.u32(), r.u32()
    slot_len = jn.HEADER_SIZE + nent * esize + extra
    slot = r.take(slot_len)
    ring = r.take(pages * PAGE_SIZE)
    return copy, doubled, pages, esize, nent, read_index, write_index, slot, ring


def check_one(data: bytes) -> None:
    copy, doubled, pages, esize, nent, read_index, write_index, slot0, ring0 = layout(data)
    m = _MAPS[pages]
    size = m.downstream_size
    struct.pack_into("<I", m.upstream_hdr, OFF_READ_INDEX, read_index)
    struct.pack_into("<I", m.downstream_hdr, OFF_WRITE_INDEX, write_index)
    m.downstream_data[:size] = ring0  # the second half mirrors it
    rings = m if doubled else SingleMapping(m)
    before = (bytes(m.upstream_hdr), bytes(m.downstream_hdr), bytes(m.downstream_data))

    buf = bytearray([_SENT]) * GUARD + bytearray(slot0) + bytearray([_SENT]) * GUARD
    slot = memoryview(buf)[GUARD : GUARD + len(slot0)]
    magic, version, hesize, hnent = struct.unpack_from("<IIII", slot0, 0)
    fits = magic == jn.MAGIC and version == jn.VERSION and hesize == esize and hnent == nent
    del _LINES.lines[:]
    try:
        j, pending = jn.RequestJournal.resume(slot, rings, entry_size=esize, copy=copy, log=LOG)
    except jn.JournalError:
        assert not fits, "a journal of this shape refused"
        assert bytes(buf[GUARD:-GUARD]) == slot0, "a refused slot was written"
        j = None
    assert buf[:GUARD] == bytes([_SENT]) * GUARD and buf[-GUARD:] == bytes([_SENT]) * GUARD
    assert (bytes(m.upstream_hdr), bytes(m.downstream_hdr), bytes(m.downstream_data)) == before
    if j is None:
        return
    assert fits, "a slot of another shape accepted"
    assert j.capacity == nent
    lines = list(_LINES.lines)
    assert len(lines) <= 3 and all("\n" not in s for s in lines), lines

    w_mark = struct.unpack_from("<I", slot0, 32)[0]
    published = published_model(w_mark, write_index, size, ring0)
    want = expected(slot0, esize, nent, copy, read_index, published)
    got = sorted(pending, key=lambda p: p.entry)
    assert [p.entry for p in got] == [w[0] for w in want], (
        [p.entry for p in got],
        [w[0] for w in want],
    )
    for p, (_e, tid, seq, body, is_reply, truncated) in zip(got, want, strict=True):
        assert (p.trans_id, p.seq, p.truncated) == (tid, seq, truncated)
        if is_reply:
            assert p.reply == body and p.packet is None
        else:
            assert p.reply is None and p.packet == (body if copy else None)
    assert [p.seq for p in pending] == sorted(p.seq for p in pending)

    # the slot rewritten clean
    (m2, v2, es2, n2, staged, rb, ra, compl, wm, _, seq) = jn.HEADER.unpack_from(slot, 0)
    assert (m2, v2, es2, n2, staged, rb, ra, compl, wm) == (jn.MAGIC, jn.VERSION, esize, nent,
                                                             0, 0, 0, 0, 0)  # fmt: skip
    if pending and max(p.seq for p in pending) < 2**64 - 1:
        assert seq > max(p.seq for p in pending)
    kept = {p.entry: p for p in pending}
    for e in range(nent):
        state = struct.unpack_from("<I", slot, jn.HEADER_SIZE + e * esize)[0]
        if e in kept:
            assert state == (jn.REPLY if kept[e].reply is not None else jn.TAKEN)
        else:
            assert state == jn.FREE
    assert j.free == nent - len(pending)
    assert bytes(slot[jn.HEADER_SIZE + nent * esize :]) == slot0[jn.HEADER_SIZE + nent * esize :]

    # a clean journal resumes to the same requests, silently
    del _LINES.lines[:]
    _j2, again = jn.RequestJournal.resume(slot, rings, entry_size=esize, copy=copy, log=LOG)
    assert again == pending and not _LINES.lines, _LINES.lines


main = harness.main_for(check_one)

if __name__ == "__main__":
    main(sys.argv)
