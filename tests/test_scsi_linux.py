"""Linux's probe of a storvsc disk (spec 9.1), parsed the way scsi_scan.c and sd.c parse it.

Each step sends what Linux sends (allocation lengths included) and decodes the
answer with Linux's own offsets, so a field in the wrong byte shows up as a wrong
decision (no discard, write-through, wrong physical block size), not just as a
byte mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from disk_model import GOOD, be, scsi

from devices.storvsc.backends.memory import MemoryBackend
from devices.storvsc.scsi import DiskIdentity, ScsiController


@dataclass
class LinuxView:
    scsi_level: int = 0
    luns: list[int] = field(default_factory=list)
    vpd_pages: list[int] = field(default_factory=list)
    capacity: int = 0
    sector_size: int = 0
    physical_block_size: int = 0
    alignment: int = 0
    lbpme: bool = False
    lbprz: bool = False
    max_xfer_blocks: int = 0
    max_ws_blocks: int = 0
    max_unmap_blocks: int = 0
    unmap_granularity: int = 0
    lbpu: bool = False
    lbpws: bool = False
    lbpws10: bool = False
    discard_mode: str = "disabled"
    nonrot: bool = False
    write_protect: bool = False
    wce: bool = False
    rcd: bool = False
    dpofua: bool = False
    wwid: str = ""


async def linux_probe(ctrl: ScsiController, lun: int = 0) -> LinuxView:
    v = LinuxView()
    # scsi_probe_lun: INQUIRY 36, then again with ADDITIONAL LENGTH + 5 if longer.
    res, inq = await scsi(ctrl, bytes([0x12, 0, 0, 0, 36, 0]), lun=lun, data_in_len=36)
    assert res.status == GOOD and res.transferred == 36
    full = inq[4] + 5
    if full > 36:
        res, inq = await scsi(ctrl, bytes([0x12, 0, 0, 0, full, 0]), lun=lun, data_in_len=full)
        assert res.transferred == full
    assert inq[0] >> 5 == 0 and inq[0] & 0x1F == 0  # PQ 0, direct access
    version = inq[2] & 0x0F
    v.scsi_level = version + 1 if version >= 2 else version
    # scsi_report_lun_scan: REPORT LUNS, allocation 4096; 2-byte LUN decode.
    res, rl = await scsi(ctrl, bytes([0xA0, 0, 0, 0, 0, 0]) + be(4096, 4) + b"\0\0", lun=lun,
                         data_in_len=4096)  # fmt: skip
    n = int.from_bytes(rl[0:4], "big") // 8
    for i in range(n):
        e = rl[8 + 8 * i : 16 + 8 * i]
        v.luns.append(e[1] | e[0] << 8 | e[3] << 16 | e[2] << 24)
    # scsi_attach_vpd (SCSI_SPC_2 and up): page 0, then header then whole page.
    vpd = {}
    res, p0 = await scsi(ctrl, bytes([0x12, 1, 0, 0, 255, 0]), lun=lun, data_in_len=255)
    v.vpd_pages = list(p0[4 : 4 + int.from_bytes(p0[2:4], "big")])
    for page in v.vpd_pages:
        res, hdr = await scsi(ctrl, bytes([0x12, 1, page, 0, 4, 0]), lun=lun, data_in_len=4)
        assert hdr[1] == page and int.from_bytes(hdr[2:4], "big") != 0
        size = int.from_bytes(hdr[2:4], "big") + 4
        res, data = await scsi(ctrl, bytes([0x12, 1, page]) + be(size, 2) + b"\0", lun=lun,
                               data_in_len=size)  # fmt: skip
        assert res.transferred == size and data[1] == page
        vpd[page] = data
    d83 = vpd[0x83]
    pos = 4
    while pos < len(d83):
        if d83[pos + 1] & 0x0F == 3 and not v.wwid:  # NAA
            v.wwid = "naa." + d83[pos + 4 : pos + 4 + d83[pos + 3]].hex()
        pos += 4 + d83[pos + 3]
    # sd_revalidate_disk: TEST UNIT READY, READ CAPACITY(16) with 32 bytes.
    res, _ = await scsi(ctrl, bytes(6), lun=lun)
    assert res.status == GOOD
    res, rc = await scsi(ctrl, bytes([0x9E, 0x10]) + bytes(8) + be(32, 4) + b"\0\0", lun=lun,
                         data_in_len=32)  # fmt: skip
    assert res.transferred == 32
    v.sector_size = int.from_bytes(rc[8:12], "big")
    v.capacity = int.from_bytes(rc[0:8], "big") + 1
    assert not rc[12] & 1  # PROT_EN
    v.physical_block_size = (1 << (rc[13] & 0x0F)) * v.sector_size
    v.lbpme, v.lbprz = bool(rc[14] & 0x80), bool(rc[14] & 0x40)
    v.alignment = ((rc[14] & 0x3F) << 8 | rc[15]) * v.sector_size
    # sd_read_block_limits (len >= 64 for the unmap fields).
    b0 = vpd[0xB0]
    v.max_xfer_blocks = int.from_bytes(b0[8:12], "big")
    assert len(b0) >= 64
    v.max_ws_blocks = int.from_bytes(b0[36:44], "big")
    if v.lbpme:
        lba_count, desc_count = int.from_bytes(b0[20:24], "big"), int.from_bytes(b0[24:28], "big")
        if lba_count and desc_count:
            v.max_unmap_blocks = lba_count
        v.unmap_granularity = int.from_bytes(b0[28:32], "big")
        b2 = vpd[0xB2]  # sd_read_block_provisioning
        v.lbpu, v.lbpws, v.lbpws10 = bool(b2[5] & 0x80), bool(b2[5] & 0x40), bool(b2[5] & 0x20)
        if v.lbpu and v.max_unmap_blocks:
            v.discard_mode = "unmap"
        elif v.lbpws:
            v.discard_mode = "ws16"
        elif v.lbpws10:
            v.discard_mode = "ws10"
    v.nonrot = int.from_bytes(vpd[0xB1][4:6], "big") == 1
    # sd_read_write_protect_flag: MODE SENSE(6) page 0x3F, allocation 4.
    res, ms = await scsi(ctrl, bytes([0x1A, 0, 0x3F, 0, 4, 0]), lun=lun, data_in_len=4)
    assert res.transferred == 4
    v.write_protect = bool(ms[2] & 0x80)
    # sd_read_cache_type: page 8, DBD 0, allocation 4, then the whole length.
    res, ms = await scsi(ctrl, bytes([0x1A, 0, 0x08, 0, 4, 0]), lun=lun, data_in_len=4)
    length = ms[0] + 1
    res, ms = await scsi(ctrl, bytes([0x1A, 0, 0x08, 0, length, 0]), lun=lun,
                         data_in_len=length)  # fmt: skip
    offset = 4 + ms[3]
    while offset < length and ms[offset] & 0x3F != 8:
        offset += 2 + ms[offset + 1]
    assert length - offset > 2, "no caching page: Linux would assume write through"
    v.wce, v.rcd = bool(ms[offset + 2] & 0x04), bool(ms[offset + 2] & 0x01)
    v.dpofua = bool(ms[2] & 0x10)
    return v


async def test_linux_sees_a_thin_write_back_disk_with_4k_physical_blocks():
    ctrl = ScsiController()
    backend = MemoryBackend(size=1 << 30, write_back=True, physical_block_exponent=3)
    ctrl.add_lun(0, backend, DiskIdentity(disk_id="vm1-disk0"))
    ctrl.add_lun(2, MemoryBackend(size=1 << 20))
    v = await linux_probe(ctrl)
    assert v.scsi_level == 6  # SPC-3: VPD pages and READ CAPACITY(16) first
    assert v.luns == [0, 2]
    assert v.vpd_pages == [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]
    assert (v.capacity, v.sector_size, v.physical_block_size, v.alignment) == (
        (1 << 30) // 512,
        512,
        4096,
        0,
    )
    assert v.lbpme and v.lbprz and v.discard_mode == "unmap"
    assert (v.lbpu, v.lbpws, v.lbpws10) == (True, True, True)
    assert v.max_unmap_blocks > 0 and v.unmap_granularity == 8
    assert v.max_xfer_blocks * 512 == 2 << 20 and v.max_ws_blocks > 0
    assert v.nonrot and not v.write_protect
    assert v.wce and not v.rcd and v.dpofua  # SYNCHRONIZE CACHE and FUA get used
    assert v.wwid.startswith("naa.3") and len(v.wwid) == 4 + 16
    again = ScsiController()
    again.add_lun(0, MemoryBackend(size=1 << 20), DiskIdentity(disk_id="vm1-disk0"))
    assert (await linux_probe(again)).wwid == v.wwid  # stable across restarts


async def test_linux_sees_a_read_only_disk_without_discard():
    ctrl = ScsiController()
    ctrl.add_lun(0, MemoryBackend(size=1 << 20, block_size=4096, read_only=True))
    v = await linux_probe(ctrl)
    assert (v.sector_size, v.physical_block_size) == (4096, 4096)
    assert not v.lbpme and v.discard_mode == "disabled" and v.max_unmap_blocks == 0
    assert v.write_protect and not v.wce
    assert v.max_xfer_blocks * 4096 == 2 << 20
