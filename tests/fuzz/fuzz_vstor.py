"""Fuzz target for the VSTOR packet/SRB parser (devices/storvsc/protocol.py).

The invariant, h11 style: whatever bytes the guest sends, in whatever order and on
whichever channel, `VstorProtocol.receive` returns an event or raises GuestError,
nothing else; a refusal with a status always has a well-formed answer of the
negotiated size; an SRB that was accepted has 1..16 CDB bytes, a sense offer within
the buffer and a data length equal to what the ranges described and within the
advertised maximum; and every completion built for it is the negotiated size, with
a sense length no larger than the guest's offer. An accepted SRB for LUN 0 with at
most 64 KiB of data is then run as the VSP runs it (its CDB on a memory LUN through
ScsiController, a buffer of the described length) and its real completion checked.

Run it under atheris (coverage-guided, libFuzzer):

    python tests/fuzz/fuzz_vstor.py [libFuzzer options, e.g. -runs=100000 -max_len=2048]

or as a plain property test: tests/test_storvsc_protocol.py feeds `check_one` from
hypothesis.

The input is a script of packets: each takes a 4-byte head (size selector,
channel, data_bytes selector, a "valid op" nudge) then up to 64 payload bytes.
The first steps are often the real init sequence so the fuzzer gets past it.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness, when imported by path
import harness
import trio

with harness.instrumented():
    from devices.storvsc.backends.memory import MemoryBackend
    from devices.storvsc.protocol import (
        PACKET_SIZE,
        SENSE_BUFFER_SIZE,
        CreateSubChannels,
        DataIn,
        ExecuteSrb,
        Reply,
        Srb,
        VstorOp,
        VstorProtocol,
        build_packet,
        decode_srb_reply,
    )
    from devices.storvsc.scsi.disk import ScsiController
    from vmbus.device import GuestError

_SIZES = (64, 64, 64, 48, 0, 8, 12, 56, 72)
_DATA = (0, 0, 512, 4096, 0x40000, 0x40001, 0xFFFFFFFF, 4, 8, 10, 12, 32, 36, 64, 96, 255)
_INIT = (
    build_packet(VstorOp.BEGIN_INITIALIZATION, flags=1),
    build_packet(VstorOp.QUERY_PROTOCOL_VERSION, struct.pack("<HH", 0x0602, 0), flags=1),
    build_packet(VstorOp.QUERY_PROPERTIES, flags=1),
    build_packet(VstorOp.END_INITIALIZATION, flags=1),
)
MAX_STEPS = 32


def check_one(data: bytes) -> None:
    """Run one script; assert the invariants (AssertionError is a finding)."""
    proto = VstorProtocol(max_sub_channels=4, max_transfer_bytes=0x40000)
    pos = 0
    if data[:1] and data[0] & 1:
        for p in _INIT:
            assert isinstance(proto.receive(p), Reply)
        pos = 1
    for _ in range(MAX_STEPS):
        head = data[pos : pos + 4]
        if len(head) < 4:
            return
        pos += 4
        size = _SIZES[head[0] % len(_SIZES)]
        primary = not head[1] & 1
        data_bytes = _DATA[head[2] % len(_DATA)]
        body = data[pos : pos + size].ljust(size, b"\0")
        pos += size
        if head[3] & 1 and size >= 4:  # nudge the op into the valid range
            body = bytes([1 + head[3] % 14]) + body[1:4].replace(b"\xff", b"\0") + body[4:]
        check_step(proto, body, primary, data_bytes)


def check_step(proto: VstorProtocol, body: bytes, primary: bool, data_bytes: int) -> None:
    try:
        ev = proto.receive(body, primary=primary, data_bytes=data_bytes)
    except GuestError as exc:
        if exc.status is None:
            return  # the VSP resets the channel
        reply = proto.failure_reply(exc.status)
        assert len(reply) in (48, 64)
        op, status = struct.unpack_from("<II", reply, 0)[0], struct.unpack_from("<I", reply, 8)[0]
        assert op == VstorOp.COMPLETE_IO and status == exc.status
        return
    size = proto.size
    if isinstance(ev, Reply):
        assert len(ev.payload) in (48, 64)
        assert struct.unpack_from("<I", ev.payload)[0] == VstorOp.COMPLETE_IO
    elif isinstance(ev, CreateSubChannels):
        assert primary and 1 <= ev.count <= proto.max_sub_channels
        assert len(proto.subchannels_created()) == size
    else:
        assert isinstance(ev, ExecuteSrb)
        srb = ev.srb
        assert proto.ready and 1 <= len(srb.cdb) <= 16
        assert srb.sense_info_length <= SENSE_BUFFER_SIZE
        assert srb.data_transfer_length == data_bytes <= proto.max_transfer_bytes
        for status, sense in ((0, b""), (2, bytes(range(18))), (8, b"")):
            done = proto.complete_srb(srb, status, sense, data_bytes + 1)
            assert len(done) == size <= PACKET_SIZE
            _op, r = decode_srb_reply(done)
            assert r.sense_info_length <= srb.sense_info_length
            assert r.data_transfer_length <= srb.data_transfer_length
            assert r.srb_status not in (0x00, 0x03)  # FreeBSD panics on these
        if srb.lun == 0 and srb.data_transfer_length <= MAX_EXECUTED:
            check_executed(proto, srb)


MAX_EXECUTED = 65536  # SRBs with more data are checked above but not run on the disk


def check_executed(proto: VstorProtocol, srb: Srb) -> None:
    """The accepted SRB as the VSP runs it: its CDB on a memory LUN with a buffer of
    the length the guest described, the completion built from the SCSI result."""
    buf = bytearray(srb.data_transfer_length)
    data_in = srb.data_in == DataIn.READ
    res = trio.run(_LUNS.execute, 0, srb.cdb, [memoryview(buf)], data_in)
    assert res.transferred <= srb.data_transfer_length
    done = proto.complete_srb(srb, res.status, res.sense, res.transferred)
    assert len(done) == proto.size
    _op, r = decode_srb_reply(done)
    assert r.data_transfer_length == (res.transferred if res.status == 0 else 0)
    assert r.sense_info_length <= min(srb.sense_info_length, len(res.sense))


_LUNS = ScsiController()
_LUNS.add_lun(0, MemoryBackend(1 << 20, chunk_size=4096))


main = harness.main_for(check_one)


if __name__ == "__main__":
    main(sys.argv)
