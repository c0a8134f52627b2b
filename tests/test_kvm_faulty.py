"""The real Linux 6.1 guest on KVM against a `faulty` LUN: what its SCSI stack does
with injected errors, read from its console.

A MEDIUM ERROR (11/00 UNRECOVERED READ ERROR) on the first read of sector 0: hv_storvsc
logs the failed command, sd prints the sense (key 0x3 = Medium Error, ASC 0x11; this
kernel has no CONFIG_SCSI_CONSTANTS, so the names are numbers), the block layer says
"critical medium error", the page read fails ("Buffer I/O error ... async page read"),
and the partition scan reads the sector again, which succeeds: "sda: sda1". The SCSI
layer itself does not retry an unrecovered read error (scsi_check_sense: SUCCESS).

ABORTED COMMAND three times on another LUN: the SCSI midlayer retries it by itself
(NEEDS_RETRY, up to 5 tries) and the partition scan never sees an error.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import pytest
from test_storvsc_vsp import _boot_real_linux


def _mbr_image(path: Path, size: int = 16 << 20) -> None:
    """A disk with one Linux partition from sector 2048 (so the scan has a table to read)."""
    start, sectors = 2048, size // 512
    entry = struct.pack(
        "<B3sB3sII", 0, b"\xfe\xff\xff", 0x83, b"\xfe\xff\xff", start, sectors - start
    )
    path.write_bytes(bytes(446) + entry + bytes(48) + b"\x55\xaa")
    os.truncate(path, size)


@pytest.mark.kvm_linux
@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="/dev/kvm is absent")
def test_real_linux_sees_a_medium_error_and_an_aborted_command(tmp_path: Path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    _mbr_image(a)
    _mbr_image(b)
    config = f"""\
[[device]]
type = "storvsc"
[[device.lun]]
backend = "faulty"
read_fail_next = 1
lba_range = [0, 1]
inner = {{ backend = "file", path = "{a}" }}
[[device.lun]]
lun = 1
backend = "faulty"
read_fail_next = 3
read_sense = "aborted"
lba_range = [0, 1]
inner = {{ backend = "file", path = "{b}" }}
"""
    until = r"(sda: sda1[\s\S]*sdb: sdb1|sdb: sdb1[\s\S]*sda: sda1)|Kernel panic"
    kvm, out, served = _boot_real_linux(tmp_path, config, until)
    assert kvm.returncode == 0, kvm.stdout + kvm.stderr + out[-3000:]
    # vmbusd injected exactly what was asked: one medium error, three aborted commands
    assert served.count("injected read error (medium)") == 1, served[-3000:]
    assert served.count("injected read error (aborted)") == 3, served[-3000:]
    assert "channel reset" not in served and "refused" not in served, served[-3000:]

    # hv_storvsc saw four failed READ(10)s: CHECK CONDITION (scsi 0x2), SRB_STATUS_ERROR
    # with autosense valid (srb 0x84)
    tags = re.findall(r"hv_storvsc .*: tag#(\d+) cmd 0x28 status: scsi 0x2 srb 0x84", out)
    assert len(tags) == 4, out[-4000:]
    # the medium error once; the aborted READ three times under one tag: the same
    # command, requeued by the midlayer
    assert len(set(tags)) == 2 and tags.count(tags[-1]) == 3, tags
    # sd printed the medium error's sense once, for the LUN 0 disk only
    (dev,) = set(re.findall(r"sd 0:0:0:0: \[(sd[a-z])\]", out))
    sense = re.findall(r"\[(sd[a-z])\] tag#\d+ Sense Key : 0x3 \[current\]", out)
    assert sense == [dev], out[-4000:]
    assert re.search(rf"\[{dev}\] tag#\d+ ASC=0x11 ASCQ=0x0", out)
    assert re.search(rf"\[{dev}\] tag#\d+ CDB: opcode=0x28 28 00 00 00 00 00 ", out)
    assert f"critical medium error, dev {dev}, sector 0 op 0x0:(READ)" in out
    assert f"Buffer I/O error on dev {dev}, logical block 0, async page read" in out
    # ... then the partition scan read sector 0 again, and that read succeeded
    assert out.index(f" {dev}: {dev}1") > out.index("critical medium error")
    # the aborted commands were retried by the SCSI layer: no error reached the block layer
    assert out.count("critical medium error") == 1
    assert out.count("Buffer I/O error") == 1
    assert "Sense Key : 0xb" not in out  # a retried command's sense is not printed
