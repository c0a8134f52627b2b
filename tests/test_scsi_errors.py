"""Errors as SCSI says: media errors, write protection, capacity changes, hostile CDBs."""

from __future__ import annotations

import trio
from disk_model import (
    CHECK_CONDITION,
    GOOD,
    read10,
    read_capacity16,
    scsi,
    sense_key_asc,
    unmap_cdb,
    unmap_params,
    write10,
    write16,
    write_same16,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.storvsc.backends.base import BackendIOError
from devices.storvsc.backends.memory import MemoryBackend
from devices.storvsc.scsi import ScsiController
from devices.storvsc.scsi.constants import Op

BS = 512
BLOCKS = 1024
MEDIUM_READ, MEDIUM_WRITE = (0x3, 0x11, 0x00), (0x3, 0x0C, 0x00)
WRITE_PROTECTED = (0x7, 0x27, 0x00)
CAPACITY_CHANGED = (0x6, 0x2A, 0x09)


class Flaky(MemoryBackend):
    """Fails the next N calls, then works: the disk must recover by itself."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.fail_next = 0
        self.exc: Exception = BackendIOError("boom", offset=5 * BS)

    def _maybe_fail(self) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise self.exc

    async def readv(self, offset, buffers):
        self._maybe_fail()
        await super().readv(offset, buffers)

    async def writev(self, offset, buffers, fua=False):
        self._maybe_fail()
        await super().writev(offset, buffers, fua)

    async def flush(self):
        self._maybe_fail()


def flaky() -> tuple[ScsiController, Flaky]:
    backend = Flaky(size=BLOCKS * BS)
    ctrl = ScsiController()
    ctrl.add_lun(0, backend)
    return ctrl, backend


async def test_backend_error_is_medium_error_then_recovers():
    ctrl, backend = flaky()
    backend.fail_next = 1
    res, _ = await scsi(ctrl, read10(5, 2), data_in_len=2 * BS)
    assert sense_key_asc(res) == MEDIUM_READ and res.transferred == 0
    assert res.sense[0] == 0xF0 and res.sense[3:7] == (5).to_bytes(4, "big")  # VALID + LBA
    res, _ = await scsi(ctrl, read10(5, 2), data_in_len=2 * BS)
    assert res.status == GOOD

    backend.fail_next = 1
    res, _ = await scsi(ctrl, write10(5, 1), data_out=bytes(BS))
    assert sense_key_asc(res) == MEDIUM_WRITE
    res, _ = await scsi(ctrl, write10(5, 1), data_out=bytes(BS))
    assert res.status == GOOD

    backend.fail_next = 1
    res, _ = await scsi(ctrl, bytes([0x35] + [0] * 9))
    assert sense_key_asc(res) == MEDIUM_WRITE
    res, _ = await scsi(ctrl, bytes([0x35] + [0] * 9))
    assert res.status == GOOD


async def test_backend_error_without_offset_and_unexpected_exceptions():
    ctrl, backend = flaky()
    backend.exc = BackendIOError("no offset")
    backend.fail_next = 1
    res, _ = await scsi(ctrl, read10(0, 1), data_in_len=BS)
    assert sense_key_asc(res) == MEDIUM_READ and res.sense[0] == 0x70  # INFORMATION not valid
    backend.exc = OSError(5, "EIO")
    backend.fail_next = 1
    res, _ = await scsi(ctrl, read10(0, 1), data_in_len=BS)
    assert sense_key_asc(res) == MEDIUM_READ
    backend.exc = RuntimeError("a plug-in bug")
    backend.fail_next = 1
    res, _ = await scsi(ctrl, read10(0, 1), data_in_len=BS)
    assert sense_key_asc(res) == (0x4, 0x44, 0x00)  # HARDWARE ERROR, INTERNAL TARGET FAILURE
    res, _ = await scsi(ctrl, read10(0, 1), data_in_len=BS)
    assert res.status == GOOD


async def test_read_only_lun():
    backend = MemoryBackend(size=BLOCKS * BS, read_only=True)
    ctrl = ScsiController()
    ctrl.add_lun(0, backend)
    writes = [
        (write10(0, 1), bytes(BS)),
        (write16(BLOCKS - 1, 1), bytes(BS)),
        (bytes([0x0A, 0, 0, 0, 1, 0]), bytes(BS)),
        (bytes([0xAA, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0]), bytes(BS)),
        (write_same16(0, 4), bytes(BS)),
        (write_same16(0, 4, flags=0x08), bytes(BS)),  # UNMAP bit: still a write
        (bytes([0x41, 0x08, 0, 0, 0, 0, 0, 0, 4, 0]), bytes(BS)),  # WRITE SAME(10)+UNMAP
        (write_same16(0, 4, flags=0x01), b""),  # NDOB
        (unmap_cdb(24), unmap_params([(0, 1)])),
    ]
    for cdb, data in writes:
        res, _ = await scsi(ctrl, cdb, data_out=data)
        assert sense_key_asc(res) == WRITE_PROTECTED, cdb.hex()
    assert backend.allocated_bytes == 0
    res, data = await scsi(ctrl, read10(0, 1), data_in_len=BS)
    assert res.status == GOOD and data == bytes(BS)
    res, _ = await scsi(ctrl, bytes([0x35] + [0] * 9))
    assert res.status == GOOD


async def test_resize_unit_attention_once():
    ctrl, _ = flaky()
    await ctrl.resize(0, 2 * BLOCKS * BS)
    # INQUIRY is exempt and does not consume the unit attention.
    res, _ = await scsi(ctrl, bytes([0x12, 0, 0, 0, 36, 0]), data_in_len=36)
    assert res.status == GOOD
    res, _ = await scsi(ctrl, bytes(6))
    assert sense_key_asc(res) == CAPACITY_CHANGED
    res, _ = await scsi(ctrl, bytes(6))
    assert res.status == GOOD
    res, data = await scsi(ctrl, read_capacity16(), data_in_len=32)
    assert int.from_bytes(data[:8], "big") == 2 * BLOCKS - 1
    res, _ = await scsi(ctrl, read10(2 * BLOCKS - 1, 1), data_in_len=BS)
    assert res.status == GOOD


async def test_unit_attention_via_request_sense_and_external_change():
    ctrl, backend = flaky()
    backend.capacity = BLOCKS * BS // 2  # changed under us (e.g. an NBD export re-sized)
    res, data = await scsi(ctrl, bytes([0x03, 0, 0, 0, 18, 0]), data_in_len=18)
    assert res.status == GOOD and (data[2], data[12], data[13]) == CAPACITY_CHANGED
    res, _ = await scsi(ctrl, read10(BLOCKS // 2, 1), data_in_len=BS)
    assert sense_key_asc(res) == (0x5, 0x21, 0x00)  # consumed: now the new size applies


async def test_resize_without_backend_support():
    class Fixed(MemoryBackend):
        resize = None  # type: ignore[assignment]

    ctrl = ScsiController()
    ctrl.add_lun(0, Fixed(size=BS * 8))
    try:
        await ctrl.resize(0, BS * 16)
    except Exception as err:
        assert "cannot resize" in str(err)
    else:  # pragma: no cover
        raise AssertionError("resize should fail")


async def test_concurrent_commands():
    """Many requests in flight at once (one task each, as the VSP will run them)."""
    ctrl, _ = flaky()

    async def one(i: int) -> None:
        data = bytes([i]) * BS * 2
        res, _ = await scsi(ctrl, write10(i * 2, 2), data_out=data)
        assert res.status == GOOD
        res, got = await scsi(ctrl, read10(i * 2, 2), data_in_len=2 * BS)
        assert got == data

    async with trio.open_nursery() as nursery:
        for i in range(64):
            nursery.start_soon(one, i)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cdb=st.one_of(
        st.binary(max_size=20),
        st.tuples(
            st.sampled_from(sorted(Op)),
            st.binary(min_size=5, max_size=15),
        ).map(lambda t: bytes([t[0]]) + t[1]),
    ),
    buf_len=st.integers(0, 4096),
    data_in=st.booleans(),
    lun=st.sampled_from([0, 0, 0, 1]),
)
async def test_any_cdb_gets_a_scsi_answer(cdb, buf_len, data_in, lun):
    """The invariant: every CDB ends in GOOD or CHECK CONDITION with 18 bytes of sense."""
    ctrl = ScsiController()
    ctrl.add_lun(0, MemoryBackend(size=64 * BS, max_transfer=4096))
    buf = bytearray(buf_len)
    res = await ctrl.execute(lun, cdb, [memoryview(buf)], data_in)
    assert 0 <= res.transferred <= buf_len
    if res.status == GOOD:
        assert res.sense == b""
    else:
        assert res.status == CHECK_CONDITION and len(res.sense) == 18
        assert res.transferred == 0


def test_configuration_errors():
    import pytest

    from devices.storvsc.backends.base import BackendConfigError
    from devices.storvsc.scsi import DiskIdentity

    ctrl = ScsiController()
    ctrl.add_lun(0, MemoryBackend(size=BS * 8))
    for lun in (0, -1, 256):  # duplicate, out of storvsc's 0..255
        with pytest.raises(BackendConfigError):
            ctrl.add_lun(lun, MemoryBackend(size=BS * 8))
    bad_identities = (
        {"vendor": "TooLongVendor"},
        {"product": "Ünïcode"},
        {"serial": "a\nb"},
        {"serial": ""},  # VPD 0x80 of length 0: Linux discards the page
        {"serial": "   "},
    )
    for bad in bad_identities:
        with pytest.raises(BackendConfigError):
            DiskIdentity(**bad)
    assert ctrl.luns == [0] and 0 in ctrl and 1 not in ctrl
    ctrl.remove_lun(0)
    assert ctrl.luns == []
