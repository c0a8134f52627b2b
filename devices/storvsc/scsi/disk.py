"""SCSI disk emulation: a controller of LUNs, each a direct-access disk over a backend.

Sans-IO apart from awaiting the backend. The storvsc VSP calls one entry point,
`ScsiController.execute(lun, cdb, buffers, data_in)`, and gets a `ScsiResult`
(status byte, fixed-format sense, bytes moved). The CDB is guest input: it is
copied once, every field is checked before use, and no length in it is trusted
past the data buffer we were actually given. READ and WRITE hand slices of the
caller's buffers straight to the backend, so data moves once, between the
backend and (later) guest RAM.

What the guest sees follows spec section 9 (Linux sd/scsi_scan/storvsc) and
SBC-4/SPC-5 where the sheet is silent; the choices that differ from OpenVMM are
noted where they are made.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial

from devices.storvsc.backends.base import BackendConfigError, BackendIOError, DiskBackend
from devices.storvsc.scsi.buffers import DataBuffer
from devices.storvsc.scsi.constants import (
    BLOCK_CHARACTERISTICS_PAGE_LEN,
    BLOCK_LIMITS_PAGE_LEN,
    CACHING_PAGE_LEN,
    CACHING_WCE,
    CAPACITY_DATA_HAS_CHANGED,
    CONTROL_LINK,
    CONTROL_NACA,
    CONTROL_PAGE_LEN,
    DEFAULT_PRODUCT,
    DEFAULT_REVISION,
    DEFAULT_VENDOR,
    DEVSPEC_DPOFUA,
    DEVSPEC_WP,
    INQUIRY_CMDQUE,
    INQUIRY_RESPONSE_FORMAT,
    INQUIRY_VERSION_SPC3,
    INTERNAL_TARGET_FAILURE,
    INVALID_COMMAND_OPERATION_CODE,
    INVALID_FIELD_IN_CDB,
    INVALID_FIELD_IN_PARAMETER_LIST,
    LBA_OUT_OF_RANGE,
    LOGICAL_UNIT_NOT_SUPPORTED,
    LONG_BLOCK_DESCRIPTOR_LEN,
    MAX_CDB_LEN,
    MAX_LUN,
    MAX_MODE_SELECT_LEN,
    MAX_SERIAL_LEN,
    MAX_TRANSFER_BYTES,
    MAX_UNMAP_BLOCKS,
    MAX_UNMAP_DESCRIPTORS,
    MAX_WRITE_SAME_BYTES,
    MODE_HEADER_6_LEN,
    MODE_HEADER_10_LEN,
    NO_ADDITIONAL_SENSE,
    PAGE_ALL,
    PAGE_CACHING,
    PAGE_CONTROL,
    PARAMETER_LIST_LENGTH_ERROR,
    PC_CHANGEABLE,
    PC_SAVED,
    PDT_DISK,
    PQ3_NO_LUN,
    PRODUCT_LEN,
    PROVISIONING_PAGE_LEN,
    PROVISIONING_THIN,
    RC16_LBPME,
    RC16_LBPRZ,
    READ_CAPACITY_10_LEN,
    READ_CAPACITY_16_LEN,
    REPORT_LUNS_SELECT,
    REVISION_LEN,
    ROTATION_NON_ROTATING,
    SA_READ_CAPACITY_16,
    SAVING_PARAMETERS_NOT_SUPPORTED,
    SHORT_BLOCK_DESCRIPTOR_LEN,
    STD_INQUIRY_LEN,
    SUBPAGE_ALL,
    UNMAP_DESCRIPTOR_LEN,
    UNMAP_HEADER_LEN,
    UNRECOVERED_READ_ERROR,
    VENDOR_LEN,
    VPD_BLOCK_CHARACTERISTICS,
    VPD_BLOCK_LIMITS,
    VPD_DEVICE_ID,
    VPD_LOGICAL_BLOCK_PROVISIONING,
    VPD_PAGES,
    VPD_SUPPORTED_PAGES,
    VPD_UNIT_SERIAL,
    WRITE_ERROR,
    WRITE_PROTECTED,
    WRITE_SAME_CHUNK_BYTES,
    Op,
    SenseKey,
    Status,
    cdb_length_for,
)
from devices.storvsc.scsi.sense import SenseError, fixed_sense, illegal

log = logging.getLogger(__name__)

_U32_MAX = 0xFFFF_FFFF


@dataclass(frozen=True, slots=True)
class ScsiResult:
    """What the VSP puts in the completion: status byte, sense, and bytes moved (residual)."""

    status: int
    sense: bytes = b""
    transferred: int = 0


GOOD_NO_DATA = ScsiResult(Status.GOOD)


def _be(data: bytes, start: int, end: int) -> int:
    return int.from_bytes(data[start:end], "big")


def _ascii_field(text: str, width: int, what: str) -> bytes:
    """Left-aligned, space-padded printable ASCII (SPC-5 4.3.1); config errors raise."""
    raw = text.encode("ascii", errors="strict") if text.isascii() else None
    if raw is None or len(raw) > width or any(c < 0x20 or c > 0x7E for c in raw):
        raise BackendConfigError(f"{what} must be at most {width} printable ASCII characters")
    return raw.ljust(width, b" ")


@dataclass(frozen=True)
class DiskIdentity:
    """Who the disk says it is. `disk_id` (or else `serial`) seeds the NAA identifier.

    Give every disk a stable `disk_id` (e.g. from the VM config): Linux names the
    disk /dev/disk/by-id/wwn-0x... after the NAA id, so it must survive restarts
    and differ between disks.
    """

    vendor: str = DEFAULT_VENDOR
    product: str = DEFAULT_PRODUCT
    revision: str = DEFAULT_REVISION
    serial: str | None = None
    disk_id: str | None = None

    def __post_init__(self) -> None:
        _ascii_field(self.vendor, VENDOR_LEN, "vendor")
        _ascii_field(self.product, PRODUCT_LEN, "product")
        _ascii_field(self.revision, REVISION_LEN, "revision")
        if self.serial is not None:
            _ascii_field(self.serial, MAX_SERIAL_LEN, "serial")
            if not self.serial.strip():
                # VPD 0x80 would have page length 0, which Linux rejects as a bad page.
                raise BackendConfigError("serial must not be empty (leave it unset instead)")


def standard_inquiry(byte0: int, identity: DiskIdentity) -> bytes:
    """Standard INQUIRY data (spec 9.3): SPC-3, CMDQUE, identity strings."""
    data = bytearray(STD_INQUIRY_LEN)
    data[0] = byte0
    data[2] = INQUIRY_VERSION_SPC3
    data[3] = INQUIRY_RESPONSE_FORMAT
    data[4] = STD_INQUIRY_LEN - 5
    data[7] = INQUIRY_CMDQUE
    data[8:16] = _ascii_field(identity.vendor, VENDOR_LEN, "vendor")
    data[16:32] = _ascii_field(identity.product, PRODUCT_LEN, "product")
    data[32:36] = _ascii_field(identity.revision, REVISION_LEN, "revision")
    return bytes(data)


def _check_control(cdb: bytes, length: int) -> None:
    """The CONTROL byte ends every CDB: NACA and LINK are unsupported."""
    if cdb[length - 1] & (CONTROL_NACA | CONTROL_LINK):
        raise illegal(INVALID_FIELD_IN_CDB)


def _decode_cdb(cdb: bytes) -> tuple[int, int]:
    """Validate opcode presence and CDB length for the opcode's group; returns (op, length)."""
    if not cdb:
        raise illegal(INVALID_FIELD_IN_CDB)
    op = cdb[0]
    length = cdb_length_for(op)
    if length is None:
        raise illegal(INVALID_COMMAND_OPERATION_CODE)
    if len(cdb) < length:
        raise illegal(INVALID_FIELD_IN_CDB)
    return op, length


def _inquiry_fields(cdb: bytes) -> tuple[bool, int, int]:
    """INQUIRY byte 1 (EVPD only; CMDDT and reserved bits rejected), page, allocation."""
    if cdb[1] & 0xFE:
        raise illegal(INVALID_FIELD_IN_CDB)
    evpd = bool(cdb[1] & 0x01)
    page = cdb[2]
    if not evpd and page:
        raise illegal(INVALID_FIELD_IN_CDB)
    return evpd, page, _be(cdb, 3, 5)


def _send(buf: DataBuffer, data_in: bool, payload: bytes, alloc: int) -> int:
    """Data-in: truncate to allocation length and buffer, never overrun; returns bytes moved."""
    n = min(len(payload), alloc, buf.length)
    if n == 0:
        return 0
    if not data_in or not buf.writable:
        raise illegal(INVALID_FIELD_IN_CDB)
    return buf.scatter(payload[:n])


class ScsiDisk:
    """One LUN: a SCSI direct-access block device (SBC-4) over a `DiskBackend`.

    Commands may run concurrently (one task per request); all state changes
    (pending unit attention, last sense) happen between awaits, so they are atomic.
    """

    def __init__(
        self, backend: DiskBackend, identity: DiskIdentity | None = None, *, default_id: str = ""
    ) -> None:
        if backend.block_size not in (512, 1024, 2048, 4096):
            raise BackendConfigError(f"unsupported logical block size {backend.block_size}")
        if backend.capacity <= 0 or backend.capacity % backend.block_size:
            raise BackendConfigError("capacity must be a positive multiple of the block size")
        self.backend = backend
        self.identity = identity or DiskIdentity()
        key = self.identity.disk_id or self.identity.serial or default_id
        digest = hashlib.sha256(b"vmbusd-scsi-disk\0" + key.encode()).digest()
        # NAA 3 (locally assigned, SPC-5 7.7.6.6.3): 60 bits we own, no IEEE OUI to borrow.
        self.naa = bytes([0x30 | (digest[0] & 0x0F)]) + digest[1:8]
        serial = self.identity.serial
        self.serial = serial if serial is not None else digest[8:18].hex().upper()
        self._capacity = backend.capacity
        self._unit_attention = False
        self._last_sense: bytes | None = None
        self._handlers: dict[int, Callable[[bytes, DataBuffer, bool], Awaitable[int]]] = {
            Op.TEST_UNIT_READY: self._test_unit_ready,
            Op.REQUEST_SENSE: self._request_sense,
            Op.INQUIRY: self._inquiry,
            Op.READ_CAPACITY_10: self._read_capacity_10,
            Op.SERVICE_ACTION_IN_16: self._service_action_in_16,
            Op.MODE_SENSE_6: self._mode_sense,
            Op.MODE_SENSE_10: self._mode_sense,
            Op.MODE_SELECT_6: self._mode_select,
            Op.MODE_SELECT_10: self._mode_select,
            Op.READ_6: self._read_write,
            Op.READ_10: self._read_write,
            Op.READ_12: self._read_write,
            Op.READ_16: self._read_write,
            Op.WRITE_6: self._read_write,
            Op.WRITE_10: self._read_write,
            Op.WRITE_12: self._read_write,
            Op.WRITE_16: self._read_write,
            Op.VERIFY_10: self._verify,
            Op.VERIFY_12: self._verify,
            Op.VERIFY_16: self._verify,
            Op.SYNCHRONIZE_CACHE_10: self._synchronize_cache,
            Op.SYNCHRONIZE_CACHE_16: self._synchronize_cache,
            Op.WRITE_SAME_10: self._write_same,
            Op.WRITE_SAME_16: self._write_same,
            Op.UNMAP: self._unmap,
            Op.START_STOP_UNIT: self._start_stop_unit,
            Op.PREVENT_ALLOW_MEDIUM_REMOVAL: self._prevent_allow,
        }

    # ---- derived properties (read from the backend each time: they may change) ----

    @property
    def block_size(self) -> int:
        return self.backend.block_size

    @property
    def blocks(self) -> int:
        return self._capacity // self.backend.block_size

    @property
    def max_transfer_bytes(self) -> int:
        """Largest READ/WRITE we accept: our bound and the backend's, in whole blocks."""
        bs = self.backend.block_size
        limit = min(MAX_TRANSFER_BYTES, self.backend.max_transfer)
        return max(bs, limit - limit % bs)

    @property
    def unmap_supported(self) -> bool:
        return bool(self.backend.can_unmap) and not self.backend.read_only

    @property
    def unmap_zeroes(self) -> bool:
        return self.unmap_supported and bool(getattr(self.backend, "unmap_zeroes", False))

    # ---- entry point ----

    async def execute(self, cdb: bytes, buffers: Sequence[memoryview], data_in: bool) -> ScsiResult:
        """Run one command; every failure becomes CHECK CONDITION with fixed sense."""
        cdb = bytes(cdb[:MAX_CDB_LEN])  # guest memory: one copy, then only the copy is read
        buf = DataBuffer(buffers)
        try:
            op, length = _decode_cdb(cdb)
            handler = self._handlers.get(op)
            if handler is None:
                raise illegal(INVALID_COMMAND_OPERATION_CODE)
            _check_control(cdb, length)
            self._poll_capacity()
            if self._unit_attention and op not in (Op.INQUIRY, Op.REQUEST_SENSE):
                self._unit_attention = False
                raise SenseError(SenseKey.UNIT_ATTENTION, CAPACITY_DATA_HAS_CHANGED)
            transferred = await handler(cdb, buf, data_in)
        except SenseError as err:
            sense = err.sense
            self._last_sense = sense
            return ScsiResult(Status.CHECK_CONDITION, sense, 0)
        return ScsiResult(Status.GOOD, b"", transferred)

    async def resize(self, new_capacity: int) -> None:
        """Change the capacity through the backend; the next command sees UNIT ATTENTION."""
        bs = self.backend.block_size
        if new_capacity <= 0 or new_capacity % bs:
            raise BackendConfigError("capacity must be a positive multiple of the block size")
        resizer = getattr(self.backend, "resize", None)
        if resizer is None:
            raise BackendConfigError(f"{type(self.backend).__name__} cannot resize")
        await resizer(new_capacity)
        self._poll_capacity()

    def _poll_capacity(self) -> None:
        """A capacity change seen by any path (resize, NBD reconnect, ...) raises UA once."""
        cap = self.backend.capacity
        if cap != self._capacity:
            self._capacity = cap
            self._unit_attention = True

    # ---- shared checks ----

    def _check_range(self, lba: int, blocks: int) -> None:
        """LBA OUT OF RANGE unless [lba, lba+blocks) fits; Python ints cannot overflow."""
        if lba > self.blocks or blocks > self.blocks - lba:
            raise illegal(LBA_OUT_OF_RANGE)

    def _check_writable(self) -> None:
        if self.backend.read_only:
            raise SenseError(SenseKey.DATA_PROTECT, WRITE_PROTECTED)

    def _failed_lba(self, err: BackendIOError) -> int | None:
        offset = getattr(err, "offset", None)
        return None if offset is None else offset // self.backend.block_size

    async def _backend_call(
        self, call: Callable[[], Awaitable[None]], asc_ascq: tuple[int, int]
    ) -> None:
        """Run one backend I/O; its failure is the guest's MEDIUM ERROR, never our crash."""
        try:
            await call()
        except BackendIOError as err:
            log.warning("backend I/O error: %s", err)
            key = getattr(err, "sense_key", None)
            key = SenseKey.MEDIUM_ERROR if key is None else key
            asc = getattr(err, "asc_ascq", None) or asc_ascq
            raise SenseError(key, asc, self._failed_lba(err)) from None
        except OSError as err:
            log.warning("backend OS error: %s", err)
            raise SenseError(SenseKey.MEDIUM_ERROR, asc_ascq) from None
        except Exception:
            log.exception("backend %s failed unexpectedly", type(self.backend).__name__)
            raise SenseError(SenseKey.HARDWARE_ERROR, INTERNAL_TARGET_FAILURE) from None

    async def _flush(self) -> None:
        await self._backend_call(self.backend.flush, WRITE_ERROR)

    # ---- commands ----

    async def _test_unit_ready(self, cdb: bytes, buf: DataBuffer, data_in: bool) -> int:
        return 0

    async def _request_sense(self, cdb: bytes, buf: DataBuffer, data_in: bool) -> int:
        """Pending UA first, then the last CHECK CONDITION's sense (spec 9.2), else NO SENSE."""
        if cdb[1]:  # DESC=1: we only produce fixed format (SPC-5 6.39)
            raise illegal(INVALID_FIELD_IN_CDB)
        if self._unit_attention:
            self._unit_attention = False
            sense = fixed_sense(SenseKey.UNIT_ATTENTION, CAPACITY_DATA_HAS_CHANGED)
        elif self._last_sense is not None:
            sense, self._last_sense = self._last_sense, None
        else:
            sense = fixed_sense(SenseKey.NO_SENSE, NO_ADDITIONAL_SENSE)
        return _send(buf, data_in, sense, cdb[4])

    async def _inquiry(self, cdb: bytes, buf: DataBuffer, data_in: bool) -> int:
        evpd, page, alloc = _inquiry_fields(cdb)
        payload = self._vpd_page(page) if evpd else standard_inquiry(PDT_DISK, self.identity)
        return _send(buf, data_in, payload, alloc)

    def _vpd_page(self, page: int) -> bytes:
        if page == VPD_SUPPORTED_PAGES:
            body = bytes(VPD_PAGES)
        elif page == VPD_UNIT_SERIAL:
            body = self.serial.encode("ascii")
        elif page == VPD_DEVICE_ID:
            body = self._device_identification()
        elif page == VPD_BLOCK_LIMITS:
            body = self._block_limits()
        elif page == VPD_BLOCK_CHARACTERISTICS:
            page_body = bytearray(BLOCK_CHARACTERISTICS_PAGE_LEN)
            page_body[0:2] = ROTATION_NON_ROTATING.to_bytes(2, "big")
            body = bytes(page_body)
        elif page == VPD_LOGICAL_BLOCK_PROVISIONING:
            body = self._provisioning()
        else:
            raise illegal(INVALID_FIELD_IN_CDB)
        return bytes([PDT_DISK, page]) + len(body).to_bytes(2, "big") + body

    def _device_identification(self) -> bytes:
        """VPD 0x83: NAA (binary, LU association) then T10 vendor id (ASCII: vendor + serial)."""
        naa = bytes([0x01, 0x03, 0x00, len(self.naa)]) + self.naa
        t10_id = _ascii_field(self.identity.vendor, VENDOR_LEN, "vendor") + self.serial.encode()
        t10 = bytes([0x02, 0x01, 0x00, len(t10_id)]) + t10_id
        return naa + t10

    def _block_limits(self) -> bytes:
        """VPD 0xB0 (SBC-4 6.6.4): the bounds we enforce, so the guest never hits them."""
        bs = self.block_size
        granularity = 1 << self.backend.physical_block_exponent
        body = bytearray(BLOCK_LIMITS_PAGE_LEN)
        body[0] = 0x01  # WSNZ: WRITE SAME with 0 blocks is rejected, not "to the end"
        body[2:4] = granularity.to_bytes(2, "big")
        body[4:8] = (self.max_transfer_bytes // bs).to_bytes(4, "big")
        if self.unmap_supported:
            body[16:20] = MAX_UNMAP_BLOCKS.to_bytes(4, "big")
            body[20:24] = MAX_UNMAP_DESCRIPTORS.to_bytes(4, "big")
            body[24:28] = granularity.to_bytes(4, "big")
            body[28:32] = (0x8000_0000).to_bytes(4, "big")  # UGAVALID, alignment 0
        body[32:40] = (MAX_WRITE_SAME_BYTES // bs).to_bytes(8, "big")
        return bytes(body)

    def _provisioning(self) -> bytes:
        """VPD 0xB2: UNMAP and WRITE SAME(10/16)+UNMAP when the backend can unmap."""
        body = bytearray(PROVISIONING_PAGE_LEN)
        if self.unmap_supported:
            body[1] = 0x80 | 0x40 | 0x20  # LBPU, LBPWS, LBPWS10
            if self.unmap_zeroes:
                body[1] |= 0x04  # LBPRZ = 001b: unmapped blocks read as zeros
            body[2] = PROVISIONING_THIN
        return bytes(body)

    async def _read_capacity_10(self, cdb: bytes, buf: DataBuffer, data_in: bool) -> int:
        """READ CAPACITY(10): last LBA (0xFFFFFFFF when it does not fit) and block length."""
        pmi = cdb[8] & 0x01
        if cdb[1] or cdb[6] or cdb[7] or cdb[8] & 0xFE or (not pmi and _be(cdb, 2, 6)):
            raise illegal(INVALID_FIELD_IN_CDB)
        last = min(self.blocks - 1, _U32_MAX)
        payload = last.to_bytes(4, "big") + self.block_size.to_bytes(4, "big")
        return _send(buf, data_in, payload, READ_CAPACITY_10_LEN)

    async def _service_action_in_16(self, cdb: bytes, buf: DataBuffer, data_in: bool) -> int:
        """SERVICE ACTION IN(16): only READ CAPACITY(16) (LBPME, LBPRZ, physical exponent)."""
        if cdb[1] != SA_READ_CAPACITY_16:  # other service actions, reserved bits
            raise illegal(INVALID_FIELD_IN_CDB)
        pmi = cdb[14] & 0x01
        if cdb[14] & 0xFE or (not pmi and _be(cdb, 2, 10)):
            raise illegal(INVALID_FIELD_IN_CDB)
        data = bytearray(READ_CAPACITY_16_LEN)
        data[0:8] = (self.blocks - 1).to_bytes(8, "big")
        data[8:12] = self.block_size.to_bytes(4, "big")
        data[13] = self.backend.physical_block_exponent & 0x0F
        if self.unmap_supported:
            data[14] = RC16_LBPME | (RC16_LBPRZ if self.unmap_zeroes else 0)
        return _send(buf, data_in, bytes(data), _be(cdb, 10, 14))

    # ---- mode pages ----

    def _caching_page(self, changeable: bool) -> bytes:
        page = bytearray(2 + CACHING_PAGE_LEN)
        page[0], page[1] = PAGE_CACHING, CACHING_PAGE_LEN
        if not changeable and self.backend.write_back:
            page[2] = CACHING_WCE  # Linux then sends SYNCHRONIZE CACHE: never claim 0 falsely
        return bytes(page)

    def _control_page(self, changeable: bool) -> bytes:
        page = bytearray(2 + CONTROL_PAGE_LEN)
        page[0], page[1] = PAGE_CONTROL, CONTROL_PAGE_LEN
        if not changeable:
            page[3] = 0x10  # queue algorithm modifier 1: unrestricted reordering; D_SENSE 0
        return bytes(page)

    def _block_descriptor(self, long_lba: bool) -> bytes:
        if long_lba:
            return self.blocks.to_bytes(8, "big") + bytes(4) + self.block_size.to_bytes(4, "big")
        count = min(self.blocks, _U32_MAX)
        return count.to_bytes(4, "big") + bytes(1) + self.block_size.to_bytes(3, "big")

    def _devspec(self) -> int:
        return (DEVSPEC_WP if self.backend.read_only else 0) | DEVSPEC_DPOFUA

    async def _mode_sense(self, cdb: bytes, buf: DataBuffer, data_in: bool) -> int:
        """MODE SENSE(6/10): caching (WCE = backend write-back), control, 0x3F; DBD honoured."""
        ten = cdb[0] == Op.MODE_SENSE_10
        if ten:
            if cdb[1] & ~0x18 or any(cdb[4:7]):
                raise illegal(INVALID_FIELD_IN_CDB)
            alloc = _be(cdb, 7, 9)
        else:
            if cdb[1] & ~0x08:
                raise illegal(INVALID_FIELD_IN_CDB)
            alloc = cdb[4]
        dbd = bool(cdb[1] & 0x08)
        long_lba = ten and bool(cdb[1] & 0x10)
        pc, page, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
        if pc == PC_SAVED:
            raise illegal(SAVING_PARAMETERS_NOT_SUPPORTED)
        changeable = pc == PC_CHANGEABLE
        if page == PAGE_ALL and subpage in (0, SUBPAGE_ALL):
            pages = self._caching_page(changeable) + self._control_page(changeable)
        elif page == PAGE_CACHING and subpage == 0:
            pages = self._caching_page(changeable)
        elif page == PAGE_CONTROL and subpage == 0:
            pages = self._control_page(changeable)
        else:
            raise illegal(INVALID_FIELD_IN_CDB)
        desc = b"" if dbd else self._block_descriptor(long_lba)
        if ten:
            total = MODE_HEADER_10_LEN + len(desc) + len(pages)
            header = (
                (total - 2).to_bytes(2, "big")
                + bytes([0, self._devspec(), 0x01 if long_lba and desc else 0, 0])
                + len(desc).to_bytes(2, "big")
            )
        else:
            total = MODE_HEADER_6_LEN + len(desc) + len(pages)
            header = bytes([total - 1, 0, self._devspec(), len(desc)])
        return _send(buf, data_in, header + desc + pages, alloc)

    async def _mode_select(self, cdb: bytes, buf: DataBuffer, data_in: bool) -> int:
        """MODE SELECT(6/10): accepted only when it repeats current values (none changeable)."""
        ten = cdb[0] == Op.MODE_SELECT_10
        if ten:
            reserved = any(cdb[2:7])
            length = _be(cdb, 7, 9)
            hdr_len = MODE_HEADER_10_LEN
        else:
            reserved = any(cdb[2:4])
            length = cdb[4]
            hdr_len = MODE_HEADER_6_LEN
        # PF must be 1 (SPC page format), SP 0 (we cannot save), the rest reserved.
        if reserved or cdb[1] & ~0x11 or not cdb[1] & 0x10 or cdb[1] & 0x01:
            raise illegal(INVALID_FIELD_IN_CDB)
        if length == 0:
            return 0
        if data_in:
            raise illegal(INVALID_FIELD_IN_CDB)
        if length < hdr_len or length > MAX_MODE_SELECT_LEN or length > buf.length:
            raise illegal(PARAMETER_LIST_LENGTH_ERROR)
        data = buf.gather(length)  # one snapshot of guest memory, then parse only it
        if ten:
            medium, long_lba, bd_len = data[2], bool(data[4] & 0x01), _be(data, 6, 8)
        else:
            medium, long_lba, bd_len = data[1], False, data[3]
        if medium:
            raise illegal(INVALID_FIELD_IN_PARAMETER_LIST)
        pos = hdr_len
        if pos + bd_len > length:
            raise illegal(PARAMETER_LIST_LENGTH_ERROR)
        if bd_len:
            want = LONG_BLOCK_DESCRIPTOR_LEN if long_lba else SHORT_BLOCK_DESCRIPTOR_LEN
            if bd_len != want:
                raise illegal(INVALID_FIELD_IN_PARAMETER_LIST)
            self._check_block_descriptor(data[pos : pos + bd_len], long_lba)
            pos += bd_len
        while pos < length:
            if length - pos < 2:
                raise illegal(PARAMETER_LIST_LENGTH_ERROR)
            code, page_len = data[pos], data[pos + 1]
            end = pos + 2 + page_len
            if end > length:
                raise illegal(PARAMETER_LIST_LENGTH_ERROR)
            if code & 0x40:  # SPF: we have no subpages
                raise illegal(INVALID_FIELD_IN_PARAMETER_LIST)
            current = {
                PAGE_CACHING: self._caching_page(False),
                PAGE_CONTROL: self._control_page(False),
            }.get(code & 0x3F)
            # PS (bit 7) is reserved in MODE SELECT; compare everything after the code byte.
            if current is None or data[pos + 1 : end] != current[1:]:
                raise illegal(INVALID_FIELD_IN_PARAMETER_LIST)
            pos = end
        return length

    def _check_block_descriptor(self, desc: bytes, long_lba: bool) -> None:
        """A block descriptor may only restate the block length (count 0 or current)."""
        if long_lba:
            count, block_len = _be(desc, 0, 8), _be(desc, 12, 16)
            current = self.blocks
        else:
            count, block_len = _be(desc, 0, 4), _be(desc, 5, 8)
            current = min(self.blocks, _U32_MAX)
        if block_len != self.block_size or count not in (0, current):
            raise illegal(INVALID_FIELD_IN_PARAMETER_LIST)

    # ---- data transfer ----

    async def _read_write(self, cdb: bytes, buf: DataBuffer, data_in: bool) -> int:
        """READ/WRITE 6/10/12/16: range, bounds and buffer checked before any byte moves."""
        op = cdb[0]
        write = op in (Op.WRITE_6, Op.WRITE_10, Op.WRITE_12, Op.WRITE_16)
        fua = False
        if op in (Op.READ_6, Op.WRITE_6):
            if cdb[1] & 0xE0:
                raise illegal(INVALID_FIELD_IN_CDB)
            lba = ((cdb[1] & 0x1F) << 16) | _be(cdb, 2, 4)
            blocks = cdb[4] or 256  # SBC-4: a 6-byte transfer length of 0 means 256 blocks
        else:
            flags = cdb[1]
            # RD/WRPROTECT need protection information we do not have; bit 0 was RELADR.
            if flags & 0xE0 or (op not in (Op.READ_16, Op.WRITE_16) and flags & 0x01):
                raise illegal(INVALID_FIELD_IN_CDB)
            fua = bool(flags & 0x08)
            if op in (Op.READ_10, Op.WRITE_10):
                lba, blocks = _be(cdb, 2, 6), _be(cdb, 7, 9)
            elif op in (Op.READ_12, Op.WRITE_12):
                lba, blocks = _be(cdb, 2, 6), _be(cdb, 6, 10)
            else:
                lba, blocks = _be(cdb, 2, 10), _be(cdb, 10, 14)
        self._check_range(lba, blocks)
        if blocks == 0:
            return 0  # SBC: no transfer, not an error
        bs = self.block_size
        nbytes = blocks * bs
        if nbytes > self.max_transfer_bytes:
            raise illegal(INVALID_FIELD_IN_CDB)  # over VPD 0xB0's MAXIMUM TRANSFER LENGTH
        if buf.length < nbytes or data_in == write or (not write and not buf.writable):
            # Short buffer or wrong direction: refuse before a single byte moves.
            raise illegal(INVALID_FIELD_IN_CDB)
        views = buf.views(nbytes)
        offset = lba * bs
        if write:
            self._check_writable()
            await self._backend_call(
                partial(self.backend.writev, offset, views, fua=fua), WRITE_ERROR
            )
        else:
            await self._backend_call(
                partial(self.backend.readv, offset, views), UNRECOVERED_READ_ERROR
            )
        return nbytes

    async def _verify(self, cdb: bytes, buf: DataBuffer, data_in: bool) -> int:
        """VERIFY 10/12/16 with BYTCHK=0: a range check; our media have nothing else to verify."""
        op = cdb[0]
        flags = cdb[1]
        if flags & 0xE0 or flags & 0x06 or (op != Op.VERIFY_16 and flags & 0x01):
            raise illegal(INVALID_FIELD_IN_CDB)
        if op == Op.VERIFY_10:
            lba, blocks = _be(cdb, 2, 6), _be(cdb, 7, 9)
        elif op == Op.VERIFY_12:
            lba, blocks = _be(cdb, 2, 6), _be(cdb, 6, 10)
        else:
            lba, blocks = _be(cdb, 2, 10), _be(cdb, 10, 14)
        self._check_range(lba, blocks)
        return 0

    async def _synchronize_cache(self, cdb: bytes, buf: DataBuffer, data_in: bool) -> int:
        """SYNCHRONIZE CACHE 10/16: range checked, then the whole backend is flushed."""
        if cdb[1] & ~0x06:  # IMMED and obsolete SYNC_NV only
            raise illegal(INVALID_FIELD_IN_CDB)
        if cdb[0] == Op.SYNCHRONIZE_CACHE_10:
            lba, blocks = _be(cdb, 2, 6), _be(cdb, 7, 9)
        else:
            lba, blocks = _be(cdb, 2, 10), _be(cdb, 10, 14)
        self._check_range(lba, blocks)  # blocks 0 = to the end: only the LBA is checked
        await self._flush()
        return 0

    async def _write_same(self, cdb: bytes, buf: DataBuffer, data_in: bool) -> int:
        """WRITE SAME 10/16: zeros go to write_zeroes/unmap, other patterns are written."""
        sixteen = cdb[0] == Op.WRITE_SAME_16
        flags = cdb[1]
        # WRPROTECT, ANCHOR, obsolete PBDATA/LBDATA rejected; bit 0 is NDOB only in (16).
        if flags & 0xF6 or (not sixteen and flags & 0x01):
            raise illegal(INVALID_FIELD_IN_CDB)
        unmap = bool(flags & 0x08)
        ndob = bool(flags & 0x01)
        if sixteen:
            lba, blocks = _be(cdb, 2, 10), _be(cdb, 10, 14)
        else:
            lba, blocks = _be(cdb, 2, 6), _be(cdb, 7, 9)
        if blocks == 0:
            raise illegal(INVALID_FIELD_IN_CDB)  # WSNZ=1
        self._check_range(lba, blocks)
        bs = self.block_size
        if blocks * bs > MAX_WRITE_SAME_BYTES or (unmap and blocks > MAX_UNMAP_BLOCKS):
            raise illegal(INVALID_FIELD_IN_CDB)
        # A read-only LUN is write protected whatever the bits ask (as UNMAP answers);
        # only a writable LUN without LBPWS refuses the UNMAP bit itself.
        self._check_writable()
        if unmap and not self.unmap_supported:
            raise illegal(INVALID_FIELD_IN_CDB)
        if ndob:
            pattern, moved = bytes(bs), 0
        else:
            if data_in or buf.length < bs:
                raise illegal(INVALID_FIELD_IN_CDB)
            pattern, moved = buf.gather(bs), bs
        offset, length = lba * bs, blocks * bs
        zero = pattern.count(0) == bs
        backend = self.backend
        if zero and unmap and self.unmap_zeroes:
            await self._backend_call(partial(backend.unmap, [(offset, length)]), WRITE_ERROR)
        elif zero and backend.can_write_zeroes:
            await self._backend_call(partial(backend.write_zeroes, offset, length), WRITE_ERROR)
        else:
            await self._write_pattern(offset, length, pattern)
        return moved

    async def _write_pattern(self, offset: int, length: int, pattern: bytes) -> None:
        """Write one block's pattern repeatedly, in bounded chunks built once."""
        bs = len(pattern)
        chunk_blocks = max(1, min(WRITE_SAME_CHUNK_BYTES, self.max_transfer_bytes) // bs)
        chunk = memoryview(pattern * min(chunk_blocks, length // bs))
        end = offset + length
        while offset < end:
            n = min(chunk.nbytes, end - offset)
            await self._backend_call(partial(self.backend.writev, offset, [chunk[:n]]), WRITE_ERROR)
            offset += n

    async def _unmap(self, cdb: bytes, buf: DataBuffer, data_in: bool) -> int:
        """UNMAP: the whole parameter list is copied and validated before anything is unmapped."""
        if cdb[1] or any(cdb[2:6]):  # ANCHOR unsupported, rest reserved
            raise illegal(INVALID_FIELD_IN_CDB)
        self._check_writable()
        if not self.unmap_supported:
            raise illegal(INVALID_COMMAND_OPERATION_CODE)  # LBPU=0: the command is not there
        length = _be(cdb, 7, 9)
        if length == 0:
            return 0
        if data_in:
            raise illegal(INVALID_FIELD_IN_CDB)
        max_len = UNMAP_HEADER_LEN + MAX_UNMAP_DESCRIPTORS * UNMAP_DESCRIPTOR_LEN
        if length < UNMAP_HEADER_LEN or length > buf.length:
            raise illegal(PARAMETER_LIST_LENGTH_ERROR)
        data = buf.gather(min(length, max_len + UNMAP_DESCRIPTOR_LEN))
        data_len, desc_len = _be(data, 0, 2), _be(data, 2, 4)
        # The list may not claim more than was sent, nor a partial descriptor.
        if data_len + 2 > length or desc_len + UNMAP_HEADER_LEN > length:
            raise illegal(PARAMETER_LIST_LENGTH_ERROR)
        if desc_len % UNMAP_DESCRIPTOR_LEN:
            raise illegal(PARAMETER_LIST_LENGTH_ERROR)
        count = desc_len // UNMAP_DESCRIPTOR_LEN
        if count > MAX_UNMAP_DESCRIPTORS:
            raise illegal(INVALID_FIELD_IN_PARAMETER_LIST)
        bs = self.block_size
        ranges: list[tuple[int, int]] = []
        total = 0
        for i in range(count):
            at = UNMAP_HEADER_LEN + i * UNMAP_DESCRIPTOR_LEN
            lba, blocks = _be(data, at, at + 8), _be(data, at + 8, at + 12)
            self._check_range(lba, blocks)
            total += blocks
            if total > MAX_UNMAP_BLOCKS:
                raise illegal(INVALID_FIELD_IN_PARAMETER_LIST)
            if blocks:
                ranges.append((lba * bs, blocks * bs))
        if ranges:
            await self._backend_call(partial(self.backend.unmap, ranges), WRITE_ERROR)
        return length

    async def _start_stop_unit(self, cdb: bytes, buf: DataBuffer, data_in: bool) -> int:
        """Accepted (we have no motor); a stop without NO_FLUSH flushes like a real disk."""
        if cdb[1] & 0xFE or cdb[2] or cdb[3] & 0xF0 or cdb[4] & 0x08:
            raise illegal(INVALID_FIELD_IN_CDB)
        start, no_flush, power = cdb[4] & 0x01, cdb[4] & 0x04, cdb[4] >> 4
        if power == 0 and not start and not no_flush:
            await self._flush()
        return 0

    async def _prevent_allow(self, cdb: bytes, buf: DataBuffer, data_in: bool) -> int:
        if cdb[1] or cdb[2] or cdb[3] or cdb[4] & 0xFC:
            raise illegal(INVALID_FIELD_IN_CDB)
        return 0


class ScsiController:
    """A set of LUNs behind one storvsc target: the VSP's single entry point.

    Answers REPORT LUNS itself, and INQUIRY for LUNs that do not exist (peripheral
    qualifier 3, as Linux's scan expects); everything else goes to the LUN's disk.
    """

    def __init__(self, identity: DiskIdentity | None = None) -> None:
        self._luns: dict[int, ScsiDisk] = {}
        self._absent_identity = identity or DiskIdentity()

    def add_lun(
        self, lun: int, backend: DiskBackend, identity: DiskIdentity | None = None
    ) -> ScsiDisk:
        """Attach a backend as `lun`; identity's disk_id should be stable across restarts."""
        if not 0 <= lun <= MAX_LUN:
            raise BackendConfigError(f"LUN {lun} outside 0..{MAX_LUN}")
        if lun in self._luns:
            raise BackendConfigError(f"LUN {lun} already attached")
        disk = ScsiDisk(backend, identity, default_id=f"lun-{lun}")
        self._luns[lun] = disk
        return disk

    def remove_lun(self, lun: int) -> ScsiDisk:
        return self._luns.pop(lun)

    @property
    def luns(self) -> list[int]:
        return sorted(self._luns)

    def __contains__(self, lun: object) -> bool:
        return lun in self._luns

    def disk(self, lun: int) -> ScsiDisk:
        return self._luns[lun]

    async def resize(self, lun: int, new_capacity: int) -> None:
        """Resize a LUN's backend; the LUN answers UNIT ATTENTION 2A/09 once, then serves."""
        await self._luns[lun].resize(new_capacity)

    async def execute(
        self, lun: int, cdb: bytes, buffers: Sequence[memoryview], data_in: bool
    ) -> ScsiResult:
        """Run one SCSI command addressed to `lun`."""
        cdb = bytes(cdb[:MAX_CDB_LEN])
        disk = self._luns.get(lun)
        if cdb[:1] != bytes([Op.REPORT_LUNS]) and disk is not None:
            return await disk.execute(cdb, buffers, data_in)
        buf = DataBuffer(buffers)
        try:
            op, length = _decode_cdb(cdb)
            _check_control(cdb, length)
            if op == Op.REPORT_LUNS:
                return ScsiResult(Status.GOOD, b"", self._report_luns(cdb, buf, data_in))
            if op == Op.INQUIRY:
                evpd, _page, alloc = _inquiry_fields(cdb)
                if evpd:
                    raise illegal(INVALID_FIELD_IN_CDB)
                data = standard_inquiry(PQ3_NO_LUN, self._absent_identity)
                return ScsiResult(Status.GOOD, b"", _send(buf, data_in, data, alloc))
            if op == Op.REQUEST_SENSE:
                if cdb[1]:
                    raise illegal(INVALID_FIELD_IN_CDB)
                sense = fixed_sense(SenseKey.ILLEGAL_REQUEST, LOGICAL_UNIT_NOT_SUPPORTED)
                return ScsiResult(Status.GOOD, b"", _send(buf, data_in, sense, cdb[4]))
            raise illegal(LOGICAL_UNIT_NOT_SUPPORTED)
        except SenseError as err:
            return ScsiResult(Status.CHECK_CONDITION, err.sense, 0)

    def _report_luns(self, cdb: bytes, buf: DataBuffer, data_in: bool) -> int:
        """REPORT LUNS: single-level peripheral addressing (b0 = 0, b1 = LUN), sorted."""
        if cdb[1] or cdb[2] not in REPORT_LUNS_SELECT or any(cdb[3:6]) or cdb[10]:
            raise illegal(INVALID_FIELD_IN_CDB)
        luns = [] if cdb[2] == 0x01 else self.luns  # 0x01: well-known LUNs only; we have none
        body = b"".join(bytes([0, lun]) + bytes(6) for lun in luns)
        payload = len(body).to_bytes(4, "big") + bytes(4) + body
        return _send(buf, data_in, payload, _be(cdb, 6, 10))
