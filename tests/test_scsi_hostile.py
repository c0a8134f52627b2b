"""Hostile CDBs and buffer shapes: whatever the guest sends, the disk answers in SCSI.

The invariant, stated once: every (CDB, buffers, direction) ends in GOOD or CHECK
CONDITION with valid fixed-format sense; a healthy backend never sees an I/O
outside the disk, unaligned, longer than its `max_transfer`, or a write to a
read-only disk; no byte outside the buffers we were given changes; a data-out
buffer is never written; a data-in buffer changes only in its first
`transferred` bytes. The backend below *records* violations instead of raising,
because a raising backend would be turned into MEDIUM ERROR and hide the bug.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.storvsc.backends.memory import MemoryBackend
from devices.storvsc.scsi import ScsiController
from devices.storvsc.scsi.constants import Op

BS = 512
BLOCKS = 64
MAX_TRANSFER = 8 * BS
CANARY = 16  # bytes of known junk around every buffer piece
SENSE_KEYS = {0x0, 0x2, 0x3, 0x4, 0x5, 0x6, 0x7, 0xB}


class StrictDisk(MemoryBackend):
    """A memory disk that notes every request the SCSI layer should never make."""

    def __init__(self, **kw: object) -> None:
        super().__init__(size=BLOCKS * BS, max_transfer=MAX_TRANSFER, **kw)  # type: ignore[arg-type]
        self.violations: list[tuple] = []

    def _note(self, what: str, offset: int, length: int, write: bool) -> None:
        if offset < 0 or length <= 0 or offset + length > self.capacity:
            self.violations.append((what, "outside the disk", offset, length))
        if offset % self.block_size or length % self.block_size:
            self.violations.append((what, "unaligned", offset, length))
        if what in ("readv", "writev") and length > self.max_transfer:
            self.violations.append((what, "over max_transfer", offset, length))
        if write and self.read_only:
            self.violations.append((what, "write to a read-only disk", offset, length))

    async def readv(self, offset, buffers):
        self._note("readv", offset, sum(memoryview(b).nbytes for b in buffers), False)
        await super().readv(offset, buffers)

    async def writev(self, offset, buffers, fua=False):
        self._note("writev", offset, sum(memoryview(b).nbytes for b in buffers), True)
        await super().writev(offset, buffers, fua)

    async def unmap(self, ranges):
        for offset, length in ranges:
            self._note("unmap", offset, length, True)
        await super().unmap(ranges)

    async def write_zeroes(self, offset, length):
        self._note("write_zeroes", offset, length, True)
        await super().write_zeroes(offset, length)


# Field values that sit on the boundaries: LBA 0, last, one past, far past, overflow.
LBAS = [0, 1, BLOCKS - 1, BLOCKS, BLOCKS + 1, 2**32 - 1, 2**63, 2**64 - 1]
COUNTS = [0, 1, 2, 8, 9, BLOCKS, 256, 0xFFFF, 2**32 - 1]
# (LBA, blocks) pairs at the edges of the disk and of max_transfer.
EDGES = [
    (0, 0),
    (0, 1),
    (BLOCKS - 1, 1),
    (BLOCKS - 1, 2),
    (BLOCKS, 0),
    (BLOCKS, 1),
    (BLOCKS + 1, 0),
    (0, BLOCKS),
    (0, BLOCKS + 1),
    (BLOCKS - 8, 8),
    (BLOCKS - 8, 9),
    (0, MAX_TRANSFER // BS),
    (0, MAX_TRANSFER // BS + 1),
    (2**64 - 1, 2),
    (2**32 - 1, 1),
]
BLOCK_OPS = {  # the commands that reach the backend: drawn twice as often
    Op.READ_6,
    Op.READ_10,
    Op.READ_12,
    Op.READ_16,
    Op.WRITE_6,
    Op.WRITE_10,
    Op.WRITE_12,
    Op.WRITE_16,
    Op.WRITE_SAME_10,
    Op.WRITE_SAME_16,
    Op.UNMAP,
}
DATA_IN_OPS = {
    Op.INQUIRY,
    Op.REQUEST_SENSE,
    Op.READ_CAPACITY_10,
    Op.SERVICE_ACTION_IN_16,
    Op.MODE_SENSE_6,
    Op.MODE_SENSE_10,
    Op.REPORT_LUNS,
    Op.READ_6,
    Op.READ_10,
    Op.READ_12,
    Op.READ_16,
}


def _be(value: int, n: int) -> bytes:
    return (value % (1 << (8 * n))).to_bytes(n, "big")


def allocation_length(cdb: bytes) -> int | None:
    """The CDB's ALLOCATION LENGTH, for the commands that have one (None otherwise)."""
    fields = {
        Op.INQUIRY: (3, 5),
        Op.REQUEST_SENSE: (4, 5),
        Op.MODE_SENSE_6: (4, 5),
        Op.MODE_SENSE_10: (7, 9),
        Op.SERVICE_ACTION_IN_16: (10, 14),
        Op.REPORT_LUNS: (6, 10),
        Op.READ_CAPACITY_10: None,
    }
    if not cdb or cdb[0] not in fields:
        return None
    span = fields[cdb[0]]
    if span is None:
        return 8
    start, end = span
    return int.from_bytes(cdb[start:end], "big") if len(cdb) >= end else 0


@dataclass
class Request:
    cdb: bytes
    data_in: bool
    wanted: int  # bytes the CDB implies, to size the buffer around


@st.composite
def requests(draw: st.DrawFn) -> Request:
    """Mostly well-formed CDBs of every opcode we serve, with hostile field values."""
    if draw(st.integers(0, 9)) == 0:  # anything at all
        return Request(draw(st.binary(max_size=20)), draw(st.booleans()), draw(st.integers(0, 600)))
    op = draw(st.sampled_from(sorted(Op)) | st.sampled_from(sorted(BLOCK_OPS)))
    length = {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}[op >> 5]
    cdb = bytearray(length)
    cdb[0] = op
    flags = draw(st.sampled_from([0] * 6 + [0x08, 0x08, 0x01, 0x02, 0x10, 0x11, 0x09, 0x04, 0xFF]))
    cdb[1] = flags
    lba, count = draw(
        st.sampled_from(EDGES)
        | st.tuples(st.sampled_from(LBAS), st.sampled_from(COUNTS))
        | st.tuples(st.integers(0, BLOCKS + 2), st.integers(0, 12))
    )
    if length == 6:
        cdb[1] = (flags & 0xE0) | ((lba >> 16) & 0x1F)
        cdb[2:4] = _be(lba, 2)
        cdb[4] = count & 0xFF
    elif length == 10:
        cdb[2:6] = _be(lba, 4)
        cdb[7:9] = _be(count, 2)
    elif length == 12:
        cdb[2:6] = _be(lba, 4)
        cdb[6:10] = _be(count, 4)
    else:
        cdb[2:10] = _be(lba, 8)
        cdb[10:14] = _be(count, 4)
    if op == Op.SERVICE_ACTION_IN_16 and draw(st.booleans()):
        cdb[1] = 0x10
    if op in (Op.INQUIRY, Op.MODE_SENSE_6, Op.MODE_SENSE_10):
        cdb[1] &= draw(st.sampled_from([0, 0x01, 0x08, 0xFF]))
        cdb[2] = draw(st.sampled_from([0, 0, 0x80, 0x83, 0xB0, 0xB1, 0xB2, 0x08, 0x3F, 0x4A]))
        cdb[3] = draw(st.sampled_from([0, 0, 0, 0xFF, 1]))
        if op == Op.INQUIRY:
            cdb[3:5] = _be(draw(st.sampled_from([0, 4, 5, 36, 255, 0xFFFF])), 2)
    # Occasionally any byte may be anything (reserved fields, the control byte).
    for _ in range(draw(st.integers(0, 3)) // 3 * draw(st.integers(1, 2))):
        cdb[draw(st.integers(1, length - 1))] = draw(st.integers(0, 255))
    extra = draw(st.binary(max_size=2)) if draw(st.integers(0, 7)) == 0 else b""
    cut = draw(st.integers(1, length)) if draw(st.integers(0, 15)) == 0 else length
    data_in = op in DATA_IN_OPS
    if draw(st.integers(0, 7)) == 0:
        data_in = not data_in  # the wrong direction, now and then
    blocks = (count or 256) if length == 6 else count
    wanted = min(blocks, 2 * MAX_TRANSFER // BS) * BS if op not in DATA_IN_OPS else 0
    if op in (Op.WRITE_SAME_10, Op.WRITE_SAME_16):
        wanted = BS
    if op in (Op.UNMAP, Op.MODE_SELECT_6, Op.MODE_SELECT_10):
        wanted = count & 0xFF
    if op in DATA_IN_OPS and op not in (Op.READ_6, Op.READ_10, Op.READ_12, Op.READ_16):
        wanted = draw(st.sampled_from([0, 4, 8, 18, 36, 255, 600]))
    elif op in DATA_IN_OPS:
        wanted = min(blocks, 2 * MAX_TRANSFER // BS) * BS
    return Request(bytes(cdb[:cut]) + extra, data_in, wanted)


@st.composite
def parameter_lists(draw: st.DrawFn) -> bytes:
    """UNMAP / MODE SELECT style lists whose lengths may lie, and plain junk."""
    kind = draw(st.integers(0, 2))
    if kind == 0:
        n = draw(st.integers(0, 3))
        descs = b"".join(
            _be(lba, 8) + _be(count, 4) + bytes(4)
            for lba, count in draw(st.lists(st.sampled_from(EDGES), min_size=n, max_size=n))
        )
        data_len = draw(st.sampled_from([len(descs) + 6, len(descs) + 6, 0, 0xFFFF, 22]))
        desc_len = draw(st.sampled_from([len(descs), len(descs), 0, 0xFFF0, 12]))
        return _be(data_len, 2) + _be(desc_len, 2) + bytes(4) + descs
    if kind == 1:
        page = bytes([0x08, 0x12]) + bytes(18)
        return bytes([0, 0, 0, draw(st.sampled_from([0, 8, 255]))]) + page
    return draw(st.binary(max_size=600))


@st.composite
def shapes(draw: st.DrawFn, wanted: int) -> tuple[list[int], bool]:
    """Piece lengths around what the CDB implies (short by one, exact, longer), read-only?"""
    total = max(0, wanted + draw(st.sampled_from([0, 0, 0, -1, 1, BS, -BS])))
    if draw(st.integers(0, 9)) == 0:
        total = draw(st.integers(0, 5000))
    cuts = sorted(draw(st.lists(st.integers(0, total), max_size=3)))
    lengths = [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]
    return lengths, draw(st.integers(0, 9)) == 0


@settings(
    max_examples=1500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    data=st.data(),
    req=requests(),
    fill=parameter_lists(),
    lun=st.sampled_from([0, 0, 0, 0, 7]),
    read_only=st.integers(0, 2).map(lambda n: n == 0),
    write_back=st.booleans(),
)
async def test_hostile_cdb_and_buffers_keep_every_invariant(
    data, req, fill, lun, read_only, write_back
):
    lengths, readonly_views = data.draw(shapes(req.wanted))
    disk = StrictDisk(read_only=read_only, write_back=write_back)
    ctrl = ScsiController()
    ctrl.add_lun(0, disk)
    # One backing array: [canary][piece 0][canary][piece 1]...[canary]
    total = sum(lengths)
    backing = bytearray()
    spans = []
    for n in lengths:
        backing += b"\xc5" * CANARY
        start = len(backing)
        backing += (fill * (n // max(len(fill), 1) + 1))[:n].ljust(n, b"\x5c")
        spans.append((start, start + n))
    backing += b"\xc5" * CANARY
    before = bytes(backing)
    mv = memoryview(backing)
    views = [mv[a:b] for a, b in spans]
    if readonly_views:
        views = [memoryview(bytes(v)) for v in views]

    res = await ctrl.execute(lun, req.cdb, views, req.data_in)

    assert not disk.violations, disk.violations
    assert res.status in (0x00, 0x02)
    assert 0 <= res.transferred <= total
    alloc = allocation_length(req.cdb)
    if req.data_in and alloc is not None:
        assert res.transferred <= alloc, "allocation length not honoured"
    if res.status == 0x00:
        assert res.sense == b""
    else:
        s = res.sense
        assert len(s) == 18 and s[0] in (0x70, 0xF0) and s[7] == 10, s.hex()
        assert s[2] & 0x0F in SENSE_KEYS and s[2] & 0xF0 == 0, s.hex()
        # A healthy backend never yields MEDIUM or HARDWARE ERROR.
        assert s[2] & 0x0F not in (0x3, 0x4), s.hex()
        assert res.transferred == 0
    # Outside the pieces nothing moves; data-out is never written; data-in only
    # in its first `transferred` bytes (counted across the scatter list).
    allowed = res.transferred if req.data_in else 0
    for a, b in spans:
        take = min(allowed, b - a)
        allowed -= take
        assert backing[a + take : b] == before[a + take : b], "wrote past `transferred`"
    for (_, b), (a2, _) in zip([(0, 0), *spans], [*spans, (len(backing), 0)], strict=True):
        assert backing[b:a2] == before[b:a2], "canary overwritten"
