"""Fuzz target for SCSI CDBs (devices/storvsc/scsi/: ScsiController and ScsiDisk over
the memory backend), what a guest puts in an SRB's CDB and data buffer.

The contract: `execute` returns a ScsiResult, never raises; its status is GOOD or
CHECK CONDITION; CHECK CONDITION carries fixed-format sense (0x70, 18 bytes or more)
and moves no data; GOOD moves no more than the data buffer holds; nothing written
through the buffer goes past it (the buffer is an exact-size bytearray and a sentinel
after it); REQUEST SENSE after a failure returns that failure's sense key; the disk's
capacity never changes through a CDB.

    python tests/fuzz/fuzz_scsi.py [libFuzzer options] [corpus dirs]

Input: a script of up to 8 commands. Each takes a head (LUN 0/1/7, direction, buffer
size selector, split into two views or not, opcode from the handled set or raw) and a
CDB of the length its group code implies; the data buffer is filled from the input.
Seeds: the CDBs of the real Linux 6.1 storvsc capture (tests/data/..., one per file).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness, when imported by path
import harness
import trio

with harness.instrumented():
    from devices.storvsc.backends.memory import MemoryBackend
    from devices.storvsc.scsi import constants as c
    from devices.storvsc.scsi.disk import ScsiController, ScsiResult

MAX_CMDS = 8
_OPS = tuple(sorted(int(op) for op in c.Op))
_SIZES = (0, 0, 8, 18, 36, 96, 252, 255, 512, 4096, 8192, 1, 65536)
_SENTINEL = b"\xa5" * 16


def controller() -> ScsiController:
    ctl = ScsiController()
    ctl.add_lun(0, MemoryBackend(1 << 20, block_size=512, chunk_size=4096, max_transfer=65536))
    ctl.add_lun(1, MemoryBackend(1 << 20, block_size=4096, read_only=True, write_back=True))
    return ctl


def check_result(res: ScsiResult, buf_len: int) -> None:
    assert isinstance(res, ScsiResult)
    assert res.status in (c.Status.GOOD, c.Status.CHECK_CONDITION), res
    if res.status == c.Status.CHECK_CONDITION:
        assert res.transferred == 0 and len(res.sense) >= 18 and res.sense[0] & 0x7F == 0x70
    else:
        assert res.sense == b"" and 0 <= res.transferred <= buf_len, (res, buf_len)


async def run(data: bytes) -> None:
    r = harness.Reader(data)
    ctl = controller()
    sizes = {lun: ctl.disk(lun).blocks for lun in ctl.luns}
    for _ in range(MAX_CMDS):
        if not r.more():
            break
        head = r.byte()
        lun = (0, 0, 1, 7)[head % 4]
        data_in = bool(head & 4)
        op = r.pick(_OPS) if head & 8 else r.byte()
        length = (c.cdb_length_for(op) or 16) if head & 0x10 else r.pick((6, 10, 12, 16, 1, 0, 20))
        cdb = bytes([op]) + r.take(max(0, length - 1))
        disk_op = op != c.Op.REPORT_LUNS  # the controller answers it; the LUN keeps no sense
        size = r.pick(_SIZES)
        backing = bytearray(r.take(min(size, 64)).ljust(size, b"\0") + _SENTINEL)
        view = memoryview(backing)[:size]
        views = [view[: size // 2], view[size // 2 :]] if head & 0x20 else [view]
        res = await ctl.execute(lun, cdb, views, data_in)
        del views, view
        check_result(res, size)
        assert backing[size:] == _SENTINEL, "a command wrote past its data buffer"
        if res.status == c.Status.CHECK_CONDITION and lun in sizes and head & 0x40 and disk_op:
            sense_buf = bytearray(252)
            again = await ctl.execute(lun, bytes([c.Op.REQUEST_SENSE, 0, 0, 0, 252, 0]),
                                      [memoryview(sense_buf)], True)  # fmt: skip
            check_result(again, 252)
            if again.status == c.Status.GOOD and res.sense[2] & 0xF != c.SenseKey.UNIT_ATTENTION:
                assert sense_buf[2] & 0xF == res.sense[2] & 0xF, (res.sense, sense_buf[:18])
    assert {lun: ctl.disk(lun).blocks for lun in ctl.luns} == sizes


def check_one(data: bytes) -> None:
    trio.run(run, data)


main = harness.main_for(check_one)

if __name__ == "__main__":
    main(sys.argv)
