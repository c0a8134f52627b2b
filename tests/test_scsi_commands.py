"""Each SCSI command against a known disk: the exact response bytes and every boundary.

The known disk: LUN 0, a 1 MiB memory backend (2048 blocks of 512 bytes), identity
disk_id "disk-0", serial "SER0001". The NAA id is a literal here on purpose: it
must not change between releases (Linux names /dev/disk/by-id/wwn-* after it).
"""

from __future__ import annotations

import pytest
from disk_model import (
    CHECK_CONDITION,
    GOOD,
    be,
    read10,
    read16,
    read_capacity16,
    scsi,
    sense_key_asc,
    sync10,
    unmap_cdb,
    unmap_params,
    write10,
    write16,
    write_same16,
)

from devices.storvsc.backends.memory import MemoryBackend
from devices.storvsc.scsi import DiskIdentity, ScsiController
from devices.storvsc.scsi.constants import MAX_TRANSFER_BYTES, MAX_WRITE_SAME_BYTES

BLOCKS = 2048
BS = 512
NAA = bytes.fromhex("3b7478b0d79da825")
ILLEGAL, INVALID_OPCODE, LBA_RANGE, INVALID_CDB = (
    0x5,
    (0x5, 0x20, 0),
    (0x5, 0x21, 0),
    (0x5, 0x24, 0),
)
INVALID_PARAM, PARAM_LEN = (0x5, 0x26, 0), (0x5, 0x1A, 0)


def make(**backend_opts: object) -> tuple[ScsiController, MemoryBackend]:
    opts = {"size": BLOCKS * BS, **backend_opts}
    backend = MemoryBackend(**opts)  # type: ignore[arg-type]
    ctrl = ScsiController()
    ctrl.add_lun(0, backend, DiskIdentity(disk_id="disk-0", serial="SER0001"))
    return ctrl, backend


@pytest.fixture
def ctrl() -> ScsiController:
    return make()[0]


def inquiry(alloc: int, evpd: int = 0, page: int = 0) -> bytes:
    return bytes([0x12, evpd, page]) + be(alloc, 2) + b"\0"


STD_INQUIRY_36 = (
    bytes([0x00, 0x00, 0x05, 0x02, 91, 0x00, 0x00, 0x02]) + b"Msft    Virtual Disk    1.0 "
)


# ---- INQUIRY ----


async def test_standard_inquiry_36(ctrl):
    res, data = await scsi(ctrl, inquiry(36), data_in_len=36)
    assert res.status == GOOD and res.sense == b"" and res.transferred == 36
    assert data == STD_INQUIRY_36


async def test_standard_inquiry_full_and_truncated(ctrl):
    res, data = await scsi(ctrl, inquiry(255), data_in_len=255)
    assert res.transferred == 96 and data == STD_INQUIRY_36 + bytes(60)
    res, data = await scsi(ctrl, inquiry(5), data_in_len=255)  # allocation < data
    assert res.transferred == 5 and data == STD_INQUIRY_36[:5]
    res, data = await scsi(ctrl, inquiry(36), data_in_len=10, pieces=3)  # buffer < allocation
    assert res.transferred == 10 and data == STD_INQUIRY_36[:10]
    res, data = await scsi(ctrl, inquiry(0), data_in_len=36)
    assert res.status == GOOD and res.transferred == 0


@pytest.mark.parametrize("cdb1, page", [(0x02, 0), (0x00, 0x80), (0x04, 0)])
async def test_inquiry_invalid_fields(ctrl, cdb1, page):
    res, _ = await scsi(ctrl, bytes([0x12, cdb1, page, 0, 36, 0]), data_in_len=36)
    assert sense_key_asc(res) == INVALID_CDB


async def test_inquiry_absent_lun_is_pq3(ctrl):
    res, data = await scsi(ctrl, inquiry(36), lun=5, data_in_len=36)
    assert res.status == GOOD and data == bytes([0x7F]) + STD_INQUIRY_36[1:]
    res, _ = await scsi(ctrl, inquiry(255, 1, 0), lun=5, data_in_len=255)
    assert sense_key_asc(res) == INVALID_CDB
    res, _ = await scsi(ctrl, bytes(6), lun=5)  # TEST UNIT READY
    assert sense_key_asc(res) == (0x5, 0x25, 0x00)
    res, data = await scsi(ctrl, bytes([0x03, 0, 0, 0, 18, 0]), lun=5, data_in_len=18)
    assert res.status == GOOD and data[2] == 0x5 and data[12] == 0x25


VPD = {
    0x00: bytes.fromhex("00000006 00 80 83 b0 b1 b2".replace(" ", "")),
    0x80: bytes([0, 0x80, 0, 7]) + b"SER0001",
    0x83: bytes([0, 0x83, 0, 12 + 4 + 15])
    + bytes([0x01, 0x03, 0x00, 0x08])
    + NAA
    + bytes([0x02, 0x01, 0x00, 15])
    + b"Msft    SER0001",
    0xB0: bytes([0, 0xB0, 0, 0x3C, 0x01, 0, 0, 1])
    + be(MAX_TRANSFER_BYTES // BS, 4)
    + bytes(8)
    + be(0x0040_0000, 4)  # max unmap LBA count
    + be(256, 4)  # max unmap descriptors
    + be(1, 4)  # optimal unmap granularity
    + be(0x8000_0000, 4)  # UGAVALID, alignment 0
    + be(MAX_WRITE_SAME_BYTES // BS, 8)
    + bytes(20),
    0xB1: bytes([0, 0xB1, 0, 0x3C, 0, 1]) + bytes(58),
    0xB2: bytes([0, 0xB2, 0, 4, 0, 0xE4, 0x02, 0]),
}


@pytest.mark.parametrize("page", sorted(VPD))
async def test_vpd_pages(ctrl, page):
    res, data = await scsi(ctrl, inquiry(255, 1, page), data_in_len=255)
    assert res.status == GOOD and data == VPD[page]
    # Linux first reads the 4-byte header, then the whole page.
    res, data = await scsi(ctrl, inquiry(4, 1, page), data_in_len=255)
    assert res.transferred == 4 and data == VPD[page][:4]


async def test_vpd_unsupported_page(ctrl):
    res, _ = await scsi(ctrl, inquiry(255, 1, 0x89), data_in_len=255)
    assert sense_key_asc(res) == INVALID_CDB


async def test_naa_is_stable_and_distinct():
    a, _ = make()
    b = ScsiController()
    b.add_lun(0, MemoryBackend(size=BLOCKS * BS), DiskIdentity(disk_id="disk-0"))
    c = ScsiController()
    c.add_lun(0, MemoryBackend(size=BLOCKS * BS), DiskIdentity(disk_id="disk-1"))
    ids = []
    for ctl in (a, b, c):
        _, data = await scsi(ctl, inquiry(255, 1, 0x83), data_in_len=255)
        ids.append(data[8:16])
    assert ids[0] == ids[1] == NAA and ids[2] != NAA


async def test_vpd_without_unmap_and_4k_physical():
    ctrl = ScsiController()
    backend = MemoryBackend(size=BLOCKS * BS, read_only=True, physical_block_exponent=3)
    ctrl.add_lun(0, backend, DiskIdentity(disk_id="ro"))
    _, b0 = await scsi(ctrl, inquiry(255, 1, 0xB0), data_in_len=255)
    assert b0[6:8] == be(8, 2) and b0[20:36] == bytes(16)
    _, b2 = await scsi(ctrl, inquiry(255, 1, 0xB2), data_in_len=255)
    assert b2 == bytes([0, 0xB2, 0, 4, 0, 0, 0, 0])
    _, rc = await scsi(ctrl, read_capacity16(), data_in_len=32)
    assert rc[13] == 3 and rc[14] == 0


# ---- REPORT LUNS ----


def report_luns(alloc: int, select: int = 0) -> bytes:
    return bytes([0xA0, 0, select, 0, 0, 0]) + be(alloc, 4) + b"\0\0"


async def test_report_luns():
    ctrl, _ = make()
    ctrl.add_lun(3, MemoryBackend(size=BS * 8))
    want = be(16, 4) + bytes(4) + bytes([0, 0]) + bytes(6) + bytes([0, 3]) + bytes(6)
    for lun in (0, 3, 7):  # answered at any address, even one with no LUN
        res, data = await scsi(ctrl, report_luns(4096), lun=lun, data_in_len=4096)
        assert res.status == GOOD and data == want
    res, data = await scsi(ctrl, report_luns(16), data_in_len=4096)
    assert res.transferred == 16 and data == want[:16]
    res, data = await scsi(ctrl, report_luns(4096, select=1), data_in_len=4096)
    assert data == bytes(8)
    res, _ = await scsi(ctrl, report_luns(4096, select=5), data_in_len=4096)
    assert sense_key_asc(res) == INVALID_CDB


# ---- READ CAPACITY ----


async def test_read_capacity_10(ctrl):
    res, data = await scsi(ctrl, bytes([0x25] + [0] * 9), data_in_len=8)
    assert res.status == GOOD and data == be(BLOCKS - 1, 4) + be(BS, 4)
    res, data = await scsi(ctrl, bytes([0x25] + [0] * 9), data_in_len=4)
    assert res.transferred == 4
    res, _ = await scsi(ctrl, bytes([0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0]), data_in_len=8)
    assert sense_key_asc(res) == INVALID_CDB  # LBA without PMI


async def test_read_capacity_huge_disk():
    ctrl = ScsiController()
    blocks = (3 << 40) // BS  # sparse: costs nothing
    ctrl.add_lun(0, MemoryBackend(size=blocks * BS))
    _, data = await scsi(ctrl, bytes([0x25] + [0] * 9), data_in_len=8)
    assert data == be(0xFFFF_FFFF, 4) + be(BS, 4)
    _, data = await scsi(ctrl, read_capacity16(), data_in_len=32)
    assert data[:8] == be(blocks - 1, 8)
    res, _ = await scsi(ctrl, read10(0, 1), data_in_len=BS)
    assert res.status == GOOD
    res, _ = await scsi(ctrl, read16(blocks - 1, 1), data_in_len=BS)
    assert res.status == GOOD


async def test_read_capacity_16(ctrl):
    want = be(BLOCKS - 1, 8) + be(BS, 4) + bytes([0, 0, 0xC0, 0]) + bytes(16)
    res, data = await scsi(ctrl, read_capacity16(32), data_in_len=32)
    assert res.status == GOOD and data == want
    res, data = await scsi(ctrl, read_capacity16(12), data_in_len=32)
    assert res.transferred == 12 and data == want[:12]
    bad_sa = bytes([0x9E, 0x12]) + bytes(8) + be(32, 4) + b"\0\0"
    res, _ = await scsi(ctrl, bad_sa, data_in_len=32)
    assert sense_key_asc(res) == INVALID_CDB


# ---- MODE SENSE / MODE SELECT ----

CACHING = bytes([0x08, 0x12]) + bytes(18)
CACHING_WCE = bytes([0x08, 0x12, 0x04]) + bytes(17)
CONTROL = bytes([0x0A, 0x0A, 0x00, 0x10]) + bytes(8)
BLOCK_DESC = be(BLOCKS, 4) + b"\0" + be(BS, 3)


def mode_sense6(page: int, alloc: int, dbd: bool = False, pc: int = 0, sub: int = 0) -> bytes:
    return bytes([0x1A, 0x08 if dbd else 0, (pc << 6) | page, sub, alloc, 0])


def mode_sense10(page: int, alloc: int, dbd: bool = False, llbaa: bool = False) -> bytes:
    return (
        bytes([0x5A, (0x08 if dbd else 0) | (0x10 if llbaa else 0), page, 0, 0, 0, 0])
        + be(alloc, 2)
        + b"\0"
    )


async def test_mode_sense6_all_pages(ctrl):
    res, data = await scsi(ctrl, mode_sense6(0x3F, 255), data_in_len=255)
    assert res.status == GOOD
    assert data == bytes([43, 0, 0x10, 8]) + BLOCK_DESC + CACHING + CONTROL
    res, data = await scsi(ctrl, mode_sense6(0x3F, 4), data_in_len=255)  # Linux: WP probe
    assert data == bytes([43, 0, 0x10, 8])
    res, data = await scsi(ctrl, mode_sense6(0x3F, 255, dbd=True), data_in_len=255)
    assert data == bytes([35, 0, 0x10, 0]) + CACHING + CONTROL
    res, data = await scsi(ctrl, mode_sense6(0x3F, 255, sub=0xFF), data_in_len=255)
    assert res.transferred == 44
    res, data = await scsi(ctrl, mode_sense6(0x3F, 0), data_in_len=255)
    assert res.status == GOOD and res.transferred == 0


async def test_mode_sense6_caching_reflects_write_back():
    ctrl, _ = make(write_back=True)
    _, data = await scsi(ctrl, mode_sense6(0x08, 255), data_in_len=255)
    assert data == bytes([31, 0, 0x10, 8]) + BLOCK_DESC + CACHING_WCE
    ctrl, _ = make(read_only=True)
    _, data = await scsi(ctrl, mode_sense6(0x08, 255, dbd=True), data_in_len=255)
    assert data == bytes([23, 0, 0x90, 0]) + CACHING  # WP set


async def test_mode_sense_control_changeable_saved_and_unknown():
    ctrl, _ = make(write_back=True)
    _, data = await scsi(ctrl, mode_sense6(0x0A, 255, dbd=True), data_in_len=255)
    assert data == bytes([15, 0, 0x10, 0]) + CONTROL
    _, data = await scsi(ctrl, mode_sense6(0x3F, 255, dbd=True, pc=1), data_in_len=255)
    assert data == bytes([35, 0, 0x10, 0]) + CACHING + bytes([0x0A, 0x0A]) + bytes(10)
    _, data = await scsi(ctrl, mode_sense6(0x08, 255, dbd=True, pc=2), data_in_len=255)
    assert data[4:] == CACHING_WCE
    res, _ = await scsi(ctrl, mode_sense6(0x08, 255, pc=3), data_in_len=255)
    assert sense_key_asc(res) == (0x5, 0x39, 0x00)
    for page, sub in ((0x1C, 0), (0x08, 1), (0x3F, 1)):
        res, _ = await scsi(ctrl, mode_sense6(page, 255, sub=sub), data_in_len=255)
        assert sense_key_asc(res) == INVALID_CDB


async def test_mode_sense10(ctrl):
    res, data = await scsi(ctrl, mode_sense10(0x08, 512), data_in_len=512)
    assert data == be(34, 2) + bytes([0, 0x10, 0, 0]) + be(8, 2) + BLOCK_DESC + CACHING
    res, data = await scsi(ctrl, mode_sense10(0x08, 512, llbaa=True), data_in_len=512)
    long_desc = be(BLOCKS, 8) + bytes(4) + be(BS, 4)
    assert data == be(42, 2) + bytes([0, 0x10, 1, 0]) + be(16, 2) + long_desc + CACHING
    res, data = await scsi(ctrl, mode_sense10(0x08, 512, dbd=True, llbaa=True), data_in_len=512)
    assert data == be(26, 2) + bytes([0, 0x10, 0, 0]) + be(0, 2) + CACHING
    res, data = await scsi(ctrl, mode_sense10(0x3F, 6), data_in_len=512)
    assert res.transferred == 6


def mode_select6(length: int, pf: bool = True, sp: bool = False) -> bytes:
    return bytes([0x15, (0x10 if pf else 0) | (0x01 if sp else 0), 0, 0, length, 0])


def mode_select10(length: int) -> bytes:
    return bytes([0x55, 0x10, 0, 0, 0, 0, 0]) + be(length, 2) + b"\0"


async def test_mode_select_accepts_unchanged():
    ctrl, _ = make(write_back=True)
    params = bytes(4) + CACHING_WCE
    res, _ = await scsi(ctrl, mode_select6(len(params)), data_out=params)
    assert res.status == GOOD and res.transferred == len(params)
    params = bytes([0, 0, 0, 8]) + BLOCK_DESC + bytes([0x88]) + CACHING_WCE[1:] + CONTROL
    res, _ = await scsi(ctrl, mode_select6(len(params)), data_out=params)  # PS bit ignored
    assert res.status == GOOD
    params = bytes(8) + CACHING_WCE
    res, _ = await scsi(ctrl, mode_select10(len(params)), data_out=params)
    assert res.status == GOOD
    res, _ = await scsi(ctrl, mode_select6(0), data_out=b"")
    assert res.status == GOOD
    res, _ = await scsi(ctrl, mode_select6(4), data_out=bytes(4))  # header only
    assert res.status == GOOD


async def test_mode_select_rejects_changes_and_lies():
    ctrl, _ = make(write_back=True)
    cases = [
        (mode_select6(24), bytes(4) + CACHING, INVALID_PARAM),  # turning WCE off
        (mode_select6(24, sp=True), bytes(4) + CACHING_WCE, INVALID_CDB),
        (mode_select6(24, pf=False), bytes(4) + CACHING_WCE, INVALID_CDB),
        (mode_select6(24), bytes(4) + CACHING_WCE[:10], PARAM_LEN),  # buffer shorter than list
        (mode_select6(14), bytes(4) + CACHING_WCE[:10], PARAM_LEN),  # page runs past the end
        (mode_select6(3), bytes(3), PARAM_LEN),  # shorter than a header
        (mode_select6(24), bytes(4) + bytes([0x1C, 0x12]) + bytes(18), INVALID_PARAM),
        (mode_select6(24), bytes(4) + bytes([0x48, 0x12]) + bytes(18), INVALID_PARAM),  # SPF
        (mode_select6(12), bytes([0, 0, 0, 8]) + be(0, 4) + b"\0" + be(4096, 3), INVALID_PARAM),
        (mode_select6(12), bytes([0, 0, 0, 9]) + bytes(8), PARAM_LEN),
        (mode_select6(12), bytes([0, 5, 0, 0]) + bytes(8), INVALID_PARAM),  # medium type
        (mode_select6(5), bytes(4) + b"\x08", PARAM_LEN),
    ]
    for cdb, params, want in cases:
        res, _ = await scsi(ctrl, cdb, data_out=params)
        assert sense_key_asc(res) == want, (cdb.hex(), params.hex())


# ---- READ / WRITE ----


def pattern(blocks: int, seed: int = 1) -> bytes:
    return bytes((seed + i) & 0xFF for i in range(blocks * BS))


@pytest.mark.parametrize(
    "rd, wr",
    [
        (read10, write10),
        (read16, write16),
        (
            lambda lba, n: bytes([0xA8, 0]) + be(lba, 4) + be(n, 4) + b"\0\0",
            lambda lba, n: bytes([0xAA, 0]) + be(lba, 4) + be(n, 4) + b"\0\0",
        ),
        (
            lambda lba, n: bytes([0x08]) + be(lba, 3) + bytes([n & 0xFF, 0]),
            lambda lba, n: bytes([0x0A]) + be(lba, 3) + bytes([n & 0xFF, 0]),
        ),
    ],
    ids=["10", "16", "12", "6"],
)
async def test_read_write_boundaries(ctrl, rd, wr):
    for lba, n in ((0, 1), (BLOCKS - 1, 1), (BLOCKS - 4, 4), (7, 3)):
        data = pattern(n, lba)
        res, _ = await scsi(ctrl, wr(lba, n), data_out=data)
        assert res.status == GOOD and res.transferred == n * BS
        res, got = await scsi(ctrl, rd(lba, n), data_in_len=n * BS, pieces=3)
        assert res.status == GOOD and got == data
    for lba, n in ((BLOCKS, 1), (BLOCKS - 1, 2)):  # one past the end
        res, _ = await scsi(ctrl, rd(lba, n), data_in_len=2 * BS)
        assert sense_key_asc(res) == LBA_RANGE
        res, _ = await scsi(ctrl, wr(lba, n), data_out=bytes(2 * BS))
        assert sense_key_asc(res) == LBA_RANGE


async def test_transfer_length_zero(ctrl):
    res, _ = await scsi(ctrl, read10(0, 0), data_in_len=BS)
    assert res.status == GOOD and res.transferred == 0
    res, _ = await scsi(ctrl, write16(BLOCKS, 0), data_out=b"")  # LBA == capacity: nothing
    assert res.status == GOOD and res.transferred == 0
    res, _ = await scsi(ctrl, write16(BLOCKS + 1, 0), data_out=b"")
    assert sense_key_asc(res) == LBA_RANGE


async def test_read6_zero_means_256_blocks_and_21_bit_lba(ctrl):
    await scsi(ctrl, write10(300, 1), data_out=pattern(1, 9))
    res, data = await scsi(ctrl, bytes([0x08, 0, 0, 100, 0, 0]), data_in_len=256 * BS)
    assert res.status == GOOD and res.transferred == 256 * BS
    assert data[200 * BS : 201 * BS] == pattern(1, 9)
    res, _ = await scsi(ctrl, bytes([0x08, 0xE0, 0, 0, 1, 0]), data_in_len=BS)
    assert sense_key_asc(res) == INVALID_CDB  # the top 3 bits of byte 1 are reserved
    res, _ = await scsi(ctrl, bytes([0x08, 0x1F, 0xFF, 0xFF, 1, 0]), data_in_len=BS)
    assert sense_key_asc(res) == LBA_RANGE


async def test_lba_overflow_and_huge_lengths(ctrl):
    res, _ = await scsi(ctrl, read16(2**64 - 1, 2), data_in_len=BS)
    assert sense_key_asc(res) == LBA_RANGE
    res, _ = await scsi(ctrl, read16(0, 2**32 - 1), data_in_len=BS)
    assert sense_key_asc(res) == LBA_RANGE


async def test_max_transfer_is_enforced():
    ctrl, _ = make(size=8 << 20)
    n = MAX_TRANSFER_BYTES // BS
    res, _ = await scsi(ctrl, read10(0, n), data_in_len=n * BS)
    assert res.status == GOOD
    res, _ = await scsi(ctrl, read10(0, n + 1), data_in_len=(n + 1) * BS)
    assert sense_key_asc(res) == INVALID_CDB


async def test_short_buffer_moves_nothing(ctrl):
    await scsi(ctrl, write10(10, 2), data_out=pattern(2, 3))
    res, _ = await scsi(ctrl, write10(10, 2), data_out=bytes(2 * BS - 1))
    assert sense_key_asc(res) == INVALID_CDB and res.transferred == 0
    _, got = await scsi(ctrl, read10(10, 2), data_in_len=2 * BS)
    assert got == pattern(2, 3)  # not one byte written
    res, _ = await scsi(ctrl, read10(10, 2), data_in_len=BS)
    assert sense_key_asc(res) == INVALID_CDB


async def test_wrong_direction_and_reserved_bits(ctrl):
    buf = bytearray(BS)
    res = await ctrl.execute(0, write10(0, 1), [memoryview(buf)], True)
    assert sense_key_asc(res) == INVALID_CDB
    res = await ctrl.execute(0, read10(0, 1), [memoryview(buf)], False)
    assert sense_key_asc(res) == INVALID_CDB
    res = await ctrl.execute(0, read10(0, 1), [memoryview(bytes(BS))], True)  # read-only view
    assert sense_key_asc(res) == INVALID_CDB
    for flags in (0x20, 0x01):  # RDPROTECT, RELADR
        res, _ = await scsi(ctrl, read10(0, 1, flags), data_in_len=BS)
        assert sense_key_asc(res) == INVALID_CDB
    res, _ = await scsi(ctrl, read10(0, 1)[:9] + b"\x04", data_in_len=BS)  # NACA
    assert sense_key_asc(res) == INVALID_CDB
    res, _ = await scsi(ctrl, read10(0, 1)[:6], data_in_len=BS)  # CDB too short for group
    assert sense_key_asc(res) == INVALID_CDB
    res, _ = await scsi(ctrl, b"", data_in_len=BS)
    assert sense_key_asc(res) == INVALID_CDB


class Recorder(MemoryBackend):
    """Records what the SCSI layer hands the backend."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.calls: list[tuple] = []

    async def readv(self, offset, buffers):
        self.calls.append(("readv", offset, list(buffers)))
        await super().readv(offset, buffers)

    async def writev(self, offset, buffers, fua=False):
        self.calls.append(("writev", offset, list(buffers), fua))
        await super().writev(offset, buffers, fua)

    async def flush(self):
        self.calls.append(("flush",))

    async def unmap(self, ranges):
        self.calls.append(("unmap", list(ranges)))
        await super().unmap(ranges)

    async def write_zeroes(self, offset, length):
        self.calls.append(("write_zeroes", offset, length))
        await super().write_zeroes(offset, length)


def recorded() -> tuple[ScsiController, Recorder]:
    backend = Recorder(size=BLOCKS * BS, write_back=True)
    ctrl = ScsiController()
    ctrl.add_lun(0, backend)
    return ctrl, backend


async def test_fua_and_zero_copy():
    ctrl, backend = recorded()
    guest = bytearray(pattern(2))
    res = await ctrl.execute(0, write10(4, 2, flags=0x08), [memoryview(guest)], False)
    assert res.status == GOOD
    kind, offset, views, fua = backend.calls[-1]
    assert (kind, offset, fua) == ("writev", 4 * BS, True)
    assert all(v.obj is guest for v in views)  # the guest's own memory, not a copy
    out = bytearray(4 * BS)  # longer than needed: exactly 2 blocks are handed down
    res = await ctrl.execute(0, read16(4, 2), [memoryview(out)], True)
    assert res.transferred == 2 * BS and out[: 2 * BS] == guest and out[2 * BS :] == bytes(2 * BS)
    _, _, views = backend.calls[-1]
    assert sum(v.nbytes for v in views) == 2 * BS and all(v.obj is out for v in views)
    await scsi(ctrl, write16(0, 1), data_out=bytes(BS))
    assert backend.calls[-1][3] is False


# ---- WRITE SAME / UNMAP ----


async def test_write_same16_pattern_and_zero(ctrl):
    block = pattern(1, 77)
    res, _ = await scsi(ctrl, write_same16(100, 5), data_out=block)
    assert res.status == GOOD and res.transferred == BS
    _, got = await scsi(ctrl, read10(99, 7), data_in_len=7 * BS)
    assert got == bytes(BS) + block * 5 + bytes(BS)
    res, _ = await scsi(ctrl, write_same16(101, 2), data_out=bytes(BS))
    _, got = await scsi(ctrl, read10(100, 5), data_in_len=5 * BS)
    assert got == block + bytes(2 * BS) + block * 2
    res, _ = await scsi(ctrl, write_same16(100, 5, flags=0x01), data_out=b"")  # NDOB
    assert res.status == GOOD and res.transferred == 0
    _, got = await scsi(ctrl, read10(100, 5), data_in_len=5 * BS)
    assert got == bytes(5 * BS)


async def test_write_same10_and_unmap_bit():
    ctrl, backend = recorded()
    ws10 = bytes([0x41, 0x08]) + be(0, 4) + b"\0" + be(BLOCKS, 2) + b"\0"
    res, _ = await scsi(ctrl, ws10, data_out=bytes(BS))
    assert res.status == GOOD and backend.calls[-1] == ("unmap", [(0, BLOCKS * BS)])
    res, _ = await scsi(ctrl, write_same16(1, 1), data_out=bytes(BS))
    assert backend.calls[-1] == ("write_zeroes", BS, BS)
    res, _ = await scsi(ctrl, write_same16(1, 2, flags=0x08), data_out=pattern(1))
    assert backend.calls[-1][0] == "writev"  # a non-zero pattern is written, UNMAP or not


async def test_write_same_errors(ctrl):
    cases = [
        (write_same16(0, 0), bytes(BS), INVALID_CDB),  # WSNZ
        (write_same16(BLOCKS - 1, 2), bytes(BS), LBA_RANGE),
        (write_same16(0, 1), bytes(BS - 1), INVALID_CDB),
        (write_same16(0, 1, flags=0x10), bytes(BS), INVALID_CDB),  # ANCHOR
        (write_same16(0, 1, flags=0x20), bytes(BS), INVALID_CDB),  # WRPROTECT
        (bytes([0x41, 0x01]) + bytes(8), bytes(BS), INVALID_CDB),  # NDOB is (16) only
    ]
    for cdb, data, want in cases:
        res, _ = await scsi(ctrl, cdb, data_out=data)
        assert sense_key_asc(res) == want, cdb.hex()
    big, _ = make(size=2 * MAX_WRITE_SAME_BYTES)
    res, _ = await scsi(big, write_same16(0, MAX_WRITE_SAME_BYTES // BS + 1), data_out=bytes(BS))
    assert sense_key_asc(res) == INVALID_CDB
    res, _ = await scsi(big, write_same16(0, MAX_WRITE_SAME_BYTES // BS), data_out=pattern(1))
    assert res.status == GOOD


async def test_unmap():
    ctrl, backend = make(chunk_size=4096)
    await scsi(ctrl, write10(0, 64), data_out=pattern(64))
    assert backend.allocated_bytes == 64 * BS
    params = unmap_params([(0, 16), (40, 0), (17, 3)])
    res, _ = await scsi(ctrl, unmap_cdb(len(params)), data_out=params)
    assert res.status == GOOD and res.transferred == len(params)
    _, got = await scsi(ctrl, read10(0, 64), data_in_len=64 * BS)
    want = bytearray(pattern(64))
    want[0 : 16 * BS] = bytes(16 * BS)
    want[17 * BS : 20 * BS] = bytes(3 * BS)
    assert got == want
    assert backend.allocated_bytes == 48 * BS  # whole chunks dropped
    res, _ = await scsi(ctrl, unmap_cdb(0), data_out=b"")
    assert res.status == GOOD


async def test_unmap_errors_change_nothing():
    ctrl, _ = make()
    await scsi(ctrl, write10(0, 4), data_out=pattern(4))
    good = unmap_params([(0, 4)])
    too_many = be(6 + 16 * 257, 2) + be(16 * 257, 2) + bytes(4) + bytes(16 * 257)
    cases = [
        (unmap_cdb(4), bytes(4), PARAM_LEN),
        (unmap_cdb(24), good[:20], PARAM_LEN),  # buffer shorter than the list
        (unmap_cdb(24), be(40, 2) + good[2:], PARAM_LEN),  # data length lies
        (unmap_cdb(24), good[:2] + be(32, 2) + good[4:], PARAM_LEN),  # descriptors lie
        (unmap_cdb(24), good[:2] + be(12, 2) + good[4:], PARAM_LEN),  # partial descriptor
        (unmap_cdb(len(too_many)), too_many, INVALID_PARAM),
        (unmap_cdb(40), unmap_params([(0, 4), (BLOCKS, 1)]), LBA_RANGE),
        (bytes([0x42, 0x01]) + unmap_cdb(24)[2:], good, INVALID_CDB),  # ANCHOR
    ]
    for cdb, params, want in cases:
        res, _ = await scsi(ctrl, cdb, data_out=params)
        assert sense_key_asc(res) == want, params[:8].hex()
    _, got = await scsi(ctrl, read10(0, 4), data_in_len=4 * BS)
    assert got == pattern(4)


async def test_unmap_unsupported():
    class NoUnmap(MemoryBackend):
        can_unmap = False

    ctrl = ScsiController()
    ctrl.add_lun(0, NoUnmap(size=BLOCKS * BS))
    params = unmap_params([(0, 1)])
    res, _ = await scsi(ctrl, unmap_cdb(24), data_out=params)
    assert sense_key_asc(res) == INVALID_OPCODE
    res, _ = await scsi(ctrl, write_same16(0, 1, flags=0x08), data_out=bytes(BS))
    assert sense_key_asc(res) == INVALID_CDB
    _, rc = await scsi(ctrl, read_capacity16(), data_in_len=32)
    assert rc[14] == 0


# ---- cache, verify, start/stop, prevent/allow, request sense, unknown ----


async def test_synchronize_cache():
    ctrl, backend = recorded()
    res, _ = await scsi(ctrl, sync10())
    assert res.status == GOOD and backend.calls[-1] == ("flush",)
    sync16 = bytes([0x91, 0x02]) + be(BLOCKS - 1, 8) + be(1, 4) + b"\0\0"
    res, _ = await scsi(ctrl, sync16)
    assert res.status == GOOD and len(backend.calls) == 2
    res, _ = await scsi(ctrl, bytes([0x35, 0]) + be(BLOCKS + 1, 4) + bytes(4))
    assert sense_key_asc(res) == LBA_RANGE and len(backend.calls) == 2


async def test_verify(ctrl):
    v10 = bytes([0x2F, 0]) + be(BLOCKS - 1, 4) + b"\0" + be(1, 2) + b"\0"
    v16 = bytes([0x8F, 0]) + be(0, 8) + be(BLOCKS, 4) + b"\0\0"
    for cdb in (v10, v16):
        res, _ = await scsi(ctrl, cdb)
        assert res.status == GOOD and res.transferred == 0
    res, _ = await scsi(ctrl, bytes([0x2F, 0x02]) + v10[2:])  # BYTCHK=1
    assert sense_key_asc(res) == INVALID_CDB
    res, _ = await scsi(ctrl, bytes([0x8F, 0]) + be(1, 8) + be(BLOCKS, 4) + b"\0\0")
    assert sense_key_asc(res) == LBA_RANGE


async def test_start_stop_and_prevent_allow():
    ctrl, backend = recorded()
    res, _ = await scsi(ctrl, bytes([0x1B, 1, 0, 0, 1, 0]))  # IMMED start
    assert res.status == GOOD and backend.calls == []
    res, _ = await scsi(ctrl, bytes([0x1B, 0, 0, 0, 0, 0]))  # stop: flush first
    assert res.status == GOOD and backend.calls == [("flush",)]
    for prevent in (0, 1):
        res, _ = await scsi(ctrl, bytes([0x1E, 0, 0, 0, prevent, 0]))
        assert res.status == GOOD
    res, _ = await scsi(ctrl, bytes([0x1E, 0, 0, 0, 4, 0]))
    assert sense_key_asc(res) == INVALID_CDB


def request_sense(alloc: int, desc: int = 0) -> bytes:
    return bytes([0x03, desc, 0, 0, alloc, 0])


NO_SENSE = bytes([0x70, 0, 0, 0, 0, 0, 0, 10]) + bytes(10)


async def test_request_sense(ctrl):
    res, data = await scsi(ctrl, request_sense(252), data_in_len=252)
    assert res.status == GOOD and data == NO_SENSE
    bad, _ = await scsi(ctrl, read10(BLOCKS, 1), data_in_len=BS)
    res, data = await scsi(ctrl, request_sense(252), data_in_len=252)
    assert data == bad.sense
    res, data = await scsi(ctrl, request_sense(8), data_in_len=252)
    assert data == NO_SENSE[:8]
    res, _ = await scsi(ctrl, request_sense(18, desc=1), data_in_len=18)
    assert sense_key_asc(res) == INVALID_CDB


@pytest.mark.parametrize("op", [0x04, 0x16, 0x17, 0x1D, 0x24, 0x2E, 0x5E, 0x85, 0xA1, 0xA3, 0xC0])
async def test_unknown_opcodes(ctrl, op):
    res, _ = await scsi(ctrl, bytes([op]) + bytes(15), data_in_len=64)
    assert res.status == CHECK_CONDITION
    assert res.sense == bytes([0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0])


async def test_lba_out_of_range_sense_bytes(ctrl):
    res, _ = await scsi(ctrl, read16(BLOCKS, 1), data_in_len=BS)
    assert res.sense == bytes([0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x21, 0, 0, 0, 0, 0])
    assert res.transferred == 0


# ---- every range-checked command at LBA 0, the last LBA, one past, and length 0 ----


def ws10(lba: int, n: int, flags: int = 0) -> bytes:
    return bytes([0x41, flags]) + be(lba, 4) + b"\0" + be(n, 2) + b"\0"


def verify10(lba: int, n: int) -> bytes:
    return bytes([0x2F, 0]) + be(lba, 4) + b"\0" + be(n, 2) + b"\0"


def verify12(lba: int, n: int) -> bytes:
    return bytes([0xAF, 0]) + be(lba, 4) + be(n, 4) + b"\0\0"


def verify16(lba: int, n: int) -> bytes:
    return bytes([0x8F, 0]) + be(lba, 8) + be(n, 4) + b"\0\0"


def sync16(lba: int, n: int) -> bytes:
    return bytes([0x91, 0]) + be(lba, 8) + be(n, 4) + b"\0\0"


def sync10_range(lba: int, n: int) -> bytes:
    return bytes([0x35, 0]) + be(lba, 4) + b"\0" + be(n, 2) + b"\0"


GOOD_RESULT = (GOOD, 0, 0)


# VERIFY of 0 blocks verifies nothing (not an error); SYNCHRONIZE CACHE of 0 = to the end.
@pytest.mark.parametrize(
    "cdb_for",
    [verify10, verify12, verify16, sync10_range, sync16],
    ids=["verify10", "verify12", "verify16", "sync10", "sync16"],
)
async def test_no_data_commands_at_every_boundary(ctrl, cdb_for):
    for lba, n in ((0, 1), (0, BLOCKS), (BLOCKS - 1, 1), (BLOCKS - 1, 0), (0, 0)):
        res, _ = await scsi(ctrl, cdb_for(lba, n))
        assert (res.status, res.transferred, len(res.sense)) == GOOD_RESULT, (lba, n)
    for lba, n in ((BLOCKS - 1, 2), (BLOCKS, 1), (0, BLOCKS + 1), (BLOCKS + 1, 0)):
        res, _ = await scsi(ctrl, cdb_for(lba, n))
        assert sense_key_asc(res) == LBA_RANGE, (lba, n)


@pytest.mark.parametrize("ws", [ws10, write_same16], ids=["ws10", "ws16"])
async def test_write_same_at_every_boundary(ctrl, ws):
    block = pattern(1, 5)
    for lba, n in ((0, 1), (BLOCKS - 1, 1), (BLOCKS - 4, 4)):
        res, _ = await scsi(ctrl, ws(lba, n), data_out=block)
        assert res.status == GOOD and res.transferred == BS, (lba, n)
        _, got = await scsi(ctrl, read10(lba, n), data_in_len=n * BS)
        assert got == block * n
    res, _ = await scsi(ctrl, ws(BLOCKS - 3, 3, flags=0x08), data_out=bytes(BS))  # discard
    assert res.status == GOOD
    _, got = await scsi(ctrl, read10(BLOCKS - 4, 4), data_in_len=4 * BS)
    assert got == block + bytes(3 * BS)  # LBPRZ: unmapped blocks read as zeros
    for lba, n in ((BLOCKS - 1, 2), (BLOCKS, 1)):
        res, _ = await scsi(ctrl, ws(lba, n), data_out=block)
        assert sense_key_asc(res) == LBA_RANGE, (lba, n)
    res, _ = await scsi(ctrl, ws(0, 0), data_out=block)  # WSNZ=1 in VPD 0xB0
    assert sense_key_asc(res) == INVALID_CDB
    res, _ = await scsi(ctrl, ws(0, 1), data_out=b"")  # no data block
    assert sense_key_asc(res) == INVALID_CDB


async def test_unmap_at_every_boundary():
    ctrl, _ = make()
    await scsi(ctrl, write10(BLOCKS - 2, 2), data_out=pattern(2))
    await scsi(ctrl, write10(0, 2), data_out=pattern(2))
    for ranges in ([(0, 1)], [(BLOCKS - 1, 1)], [(5, 0)], [(BLOCKS, 0)]):
        params = unmap_params(ranges)
        res, _ = await scsi(ctrl, unmap_cdb(len(params)), data_out=params)
        assert res.status == GOOD and res.transferred == len(params), ranges
    _, got = await scsi(ctrl, read10(0, 2), data_in_len=2 * BS)
    assert got == bytes(BS) + pattern(2)[BS:]
    _, got = await scsi(ctrl, read10(BLOCKS - 2, 2), data_in_len=2 * BS)
    assert got == pattern(2)[:BS] + bytes(BS)
    for ranges in ([(BLOCKS - 1, 2)], [(BLOCKS, 1)], [(BLOCKS + 1, 0)]):
        params = unmap_params(ranges)
        res, _ = await scsi(ctrl, unmap_cdb(len(params)), data_out=params)
        assert sense_key_asc(res) == LBA_RANGE, ranges


@pytest.mark.parametrize(
    "cdb",
    [
        bytes([0x03, 0, 0, 0, 0, 0]),  # REQUEST SENSE
        bytes([0x12, 0, 0, 0, 0, 0]),  # INQUIRY
        bytes([0x12, 1, 0xB0, 0, 0, 0]),  # INQUIRY VPD
        bytes([0x1A, 0, 0x3F, 0, 0, 0]),  # MODE SENSE(6)
        bytes([0x5A, 0, 0x3F, 0, 0, 0, 0, 0, 0, 0]),  # MODE SENSE(10)
        read_capacity16(0),
        bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),  # REPORT LUNS
    ],
    ids=["request-sense", "inquiry", "vpd", "mode-sense6", "mode-sense10", "rc16", "report-luns"],
)
async def test_allocation_length_zero_moves_nothing(ctrl, cdb):
    res, data = await scsi(ctrl, cdb, data_in_len=64)
    assert (res.status, res.transferred, data) == (GOOD, 0, b"")


async def test_allocation_length_above_the_buffer_is_truncated_to_it(ctrl):
    """Allocation lengths up to 0xFFFFFFFF: the data is cut at the buffer, never past it."""
    rc16 = read_capacity16(0xFFFF_FFFF)
    res, data = await scsi(ctrl, rc16, data_in_len=20, pieces=3)
    assert res.transferred == 20 and data == be(BLOCKS - 1, 8) + be(BS, 4) + b"\0\0\xc0" + bytes(5)
    luns = bytes([0xA0, 0, 0, 0, 0, 0]) + be(0xFFFF_FFFF, 4) + b"\0\0"
    res, data = await scsi(ctrl, luns, data_in_len=12)
    assert res.transferred == 12 and data == be(8, 4) + bytes(8)
