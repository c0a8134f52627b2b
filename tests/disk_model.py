"""Drive any disk backend through SCSI CDBs and compare it with a model of the disk.

Reusable by every backend's tests (memory, file, nbd)::

    from disk_model import disk_ops, run_disk_model   # tests/ is on sys.path

    @settings(max_examples=40, deadline=None)
    @given(ops=disk_ops(blocks=512))
    async def test_model(ops):
        backend = make_backend()          # capacity: 512 blocks here
        await run_disk_model(backend, ops)

The model starts as a copy of the disk (read through SCSI first), so a backend
need not start zeroed. Blocks unmapped on a disk without LBPRZ are "undefined"
until written again. Ops that run past the end must fail with LBA OUT OF RANGE
and change nothing. The run ends with a checksum of the whole disk.

Also the CDB builders and the `scsi()` call helper the SCSI tests use.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from hypothesis import strategies as st

from devices.storvsc.backends.base import DiskBackend
from devices.storvsc.scsi import ScsiController, ScsiResult

GOOD, CHECK_CONDITION = 0x00, 0x02


# ---- CDB builders ----


def be(value: int, n: int) -> bytes:
    return value.to_bytes(n, "big")


def read16(lba: int, blocks: int, flags: int = 0) -> bytes:
    return bytes([0x88, flags]) + be(lba, 8) + be(blocks, 4) + b"\0\0"


def write16(lba: int, blocks: int, flags: int = 0) -> bytes:
    return bytes([0x8A, flags]) + be(lba, 8) + be(blocks, 4) + b"\0\0"


def read10(lba: int, blocks: int, flags: int = 0) -> bytes:
    return bytes([0x28, flags]) + be(lba, 4) + b"\0" + be(blocks, 2) + b"\0"


def write10(lba: int, blocks: int, flags: int = 0) -> bytes:
    return bytes([0x2A, flags]) + be(lba, 4) + b"\0" + be(blocks, 2) + b"\0"


def write_same16(lba: int, blocks: int, flags: int = 0) -> bytes:
    return bytes([0x93, flags]) + be(lba, 8) + be(blocks, 4) + b"\0\0"


def unmap_cdb(param_len: int) -> bytes:
    return bytes([0x42, 0, 0, 0, 0, 0, 0]) + be(param_len, 2) + b"\0"


def unmap_params(ranges: list[tuple[int, int]]) -> bytes:
    """An UNMAP parameter list as Linux builds it."""
    descs = b"".join(be(lba, 8) + be(n, 4) + bytes(4) for lba, n in ranges)
    return be(len(descs) + 6, 2) + be(len(descs), 2) + bytes(4) + descs


def sync10() -> bytes:
    return bytes([0x35] + [0] * 9)


def read_capacity16(alloc: int = 32) -> bytes:
    return bytes([0x9E, 0x10]) + bytes(8) + be(alloc, 4) + b"\0\0"


async def scsi(
    ctrl: ScsiController,
    cdb: bytes,
    *,
    lun: int = 0,
    data_in_len: int = 0,
    data_out: bytes | None = None,
    pieces: int = 1,
) -> tuple[ScsiResult, bytes]:
    """Run one command; returns the result and the data-in bytes actually transferred.

    `pieces` splits the buffer into that many memoryviews (a scatter/gather list).
    """
    if data_out is not None:
        buf = bytearray(data_out)
        data_in = False
    else:
        buf = bytearray(data_in_len)
        data_in = True
    mv = memoryview(buf)
    cuts = sorted({len(buf) * i // pieces for i in range(1, pieces)})
    views, start = [], 0
    for cut in [*cuts, len(buf)]:
        views.append(mv[start:cut])
        start = cut
    result = await ctrl.execute(lun, cdb, views, data_in)
    return result, bytes(buf[: result.transferred]) if data_in else b""


def sense_key_asc(result: ScsiResult) -> tuple[int, int, int]:
    assert result.status == CHECK_CONDITION and len(result.sense) == 18, result
    return result.sense[2] & 0x0F, result.sense[12], result.sense[13]


# ---- the model ----


@dataclass(frozen=True)
class Op:
    kind: str  # read | write | unmap | zero | same | flush
    lba: int = 0
    blocks: int = 0
    seed: int = 0


def disk_ops(blocks: int, max_blocks: int = 32, max_ops: int = 25) -> st.SearchStrategy[list[Op]]:
    """Random op sequences for a disk of `blocks` blocks, a few running past the end."""
    lba = st.integers(0, blocks + 2)
    count = st.integers(1, max_blocks)
    seed = st.integers(0, 2**32 - 1)
    op = st.one_of(
        st.builds(Op, st.just("write"), lba, count, seed),
        st.builds(Op, st.just("read"), lba, count),
        st.builds(Op, st.just("unmap"), lba, count),
        st.builds(Op, st.just("zero"), lba, count),
        st.builds(Op, st.just("same"), lba, count, seed),
        st.just(Op("flush")),
    )
    return st.lists(op, max_size=max_ops)


def _fill(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


class DiskModel:
    """The bytes a correct disk must hold, plus which blocks are undefined (unmapped)."""

    def __init__(self, data: bytes, block_size: int) -> None:
        self.data = bytearray(data)
        self.bs = block_size
        self.undefined: set[int] = set()

    def put(self, lba: int, payload: bytes) -> None:
        self.data[lba * self.bs : lba * self.bs + len(payload)] = payload
        self.undefined -= set(range(lba, lba + len(payload) // self.bs))

    def check(self, lba: int, got: bytes) -> None:
        for i in range(len(got) // self.bs):
            if lba + i in self.undefined:
                continue
            want = self.data[(lba + i) * self.bs : (lba + i + 1) * self.bs]
            assert got[i * self.bs : (i + 1) * self.bs] == want, f"block {lba + i} differs"


async def _read_all(ctrl: ScsiController, lun: int, blocks: int, bs: int, step: int) -> bytes:
    out = bytearray()
    for lba in range(0, blocks, step):
        n = min(step, blocks - lba)
        res, data = await scsi(ctrl, read16(lba, n), lun=lun, data_in_len=n * bs)
        assert res.status == GOOD and res.transferred == n * bs, res
        out += data
    return bytes(out)


async def run_disk_model(backend: DiskBackend, ops: list[Op], *, lun: int = 0) -> None:
    """Play `ops` as CDBs against `backend` behind a ScsiController; assert it matches."""
    ctrl = ScsiController()
    disk = ctrl.add_lun(lun, backend)
    bs, blocks = disk.block_size, disk.blocks
    step = disk.max_transfer_bytes // bs
    res, cap = await scsi(ctrl, read_capacity16(), lun=lun, data_in_len=32)
    assert res.status == GOOD
    assert int.from_bytes(cap[0:8], "big") == blocks - 1
    lbpme, lbprz = bool(cap[14] & 0x80), bool(cap[14] & 0x40)
    model = DiskModel(await _read_all(ctrl, lun, blocks, bs, step), bs)

    for op in ops:
        fits = op.lba + op.blocks <= blocks
        # READ/WRITE over VPD 0xB0's maximum transfer length: INVALID FIELD IN CDB.
        too_long = op.kind in ("read", "write") and op.blocks > step
        ok = fits and not too_long
        if op.kind == "flush":
            res, _ = await scsi(ctrl, sync10(), lun=lun)
            assert res.status == GOOD, res
            continue
        if op.kind == "write":
            payload = _fill(op.seed, op.blocks * bs)
            res, _ = await scsi(ctrl, write16(op.lba, op.blocks), lun=lun, data_out=payload)
            if ok:
                model.put(op.lba, payload)
        elif op.kind == "read":
            res, got = await scsi(
                ctrl, read16(op.lba, op.blocks), lun=lun, data_in_len=op.blocks * bs
            )
            if ok and res.status == GOOD:
                model.check(op.lba, got)
        elif op.kind == "unmap":
            if not lbpme:
                continue
            params = unmap_params([(op.lba, op.blocks)])
            res, _ = await scsi(ctrl, unmap_cdb(len(params)), lun=lun, data_out=params)
            if fits:
                if lbprz:
                    model.put(op.lba, bytes(op.blocks * bs))
                else:
                    model.undefined |= set(range(op.lba, op.lba + op.blocks))
        elif op.kind in ("zero", "same"):
            pattern = bytes(bs) if op.kind == "zero" else _fill(op.seed, bs)
            res, _ = await scsi(ctrl, write_same16(op.lba, op.blocks), lun=lun, data_out=pattern)
            if fits:
                model.put(op.lba, pattern * op.blocks)
        else:  # pragma: no cover - the strategy makes no other kinds
            raise AssertionError(op.kind)
        if ok:
            assert res.status == GOOD, (op, res)
        elif not fits:
            assert sense_key_asc(res) == (0x5, 0x21, 0x00), (op, res)
        else:
            assert sense_key_asc(res) == (0x5, 0x24, 0x00), (op, res)

    final = await _read_all(ctrl, lun, blocks, bs, step)
    model.check(0, final)
    defined = bytearray(final)
    for b in model.undefined:
        defined[b * bs : (b + 1) * bs] = model.data[b * bs : (b + 1) * bs]
    assert hashlib.sha256(defined).digest() == hashlib.sha256(model.data).digest()
