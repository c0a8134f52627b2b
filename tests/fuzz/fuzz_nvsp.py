"""Fuzz target for the NVSP core (devices/netvsc/protocol.py).

The invariant, h11 style: whatever the guest sends, `NvspServer.receive` returns an
event or raises NvspError, nothing else; a failure answer is a whole 40-byte NVSP
message; and whatever state the guest drove the server into is consistent (buffer
layouts inside their buffers, READY only with a receive buffer).

Run it under atheris (coverage-guided, libFuzzer):

    python tests/fuzz/fuzz_nvsp.py [libFuzzer options, e.g. -runs=100000 -max_len=1024]

or as a plain property test: tests/test_netvsc_nvsp.py feeds `check_one` from hypothesis.

The input is a script. Byte 0 picks the server: its newest version, its
sub-channel cap, and (bit 3) whether Linux's init runs first, so that the script
starts READY. Each message then takes a head byte. From 0x20 up the message is
shaped: a real message type (`_TYPES`) with fields from the input, so the state
machine is reached past INIT far more often than from raw bytes; below 0x20 the
next `head` bytes are the raw message (head 0: the next 40 bytes, a whole message, as
the seeds recorded from the real guest are). A buffer-mapping event is answered with a
size from `_SIZES` (picked by the next input byte), or the mapping fails.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness, when imported by path
import harness

with harness.instrumented():
    from devices.netvsc import protocol as nv

MAX_MESSAGES = 24
_VERSIONS = sorted(nv.SUPPORTED_VERSIONS)
_TYPES = (
    nv.Msg.INIT,
    nv.Msg.INIT,
    nv.Msg.SEND_NDIS_CONFIG,
    nv.Msg.SEND_NDIS_VER,
    nv.Msg.SEND_RECV_BUF,
    nv.Msg.SEND_SEND_BUF,
    nv.Msg.SEND_RNDIS_PKT,
    nv.Msg.SEND_RNDIS_PKT,
    nv.Msg.SUBCHANNEL,
    nv.Msg.SWITCH_DATA_PATH,
    nv.Msg.REVOKE_RECV_BUF,
    nv.Msg.REVOKE_SEND_BUF,
    nv.Msg.OID_QUERY_EX,
    nv.Msg.SEND_RNDIS_PKT_COMPLETE,
)
_SIZES = (
    16 << 20,
    1 << 20,
    0,
    4096,
    5000,
    65536,
    1 << 20,
    16 << 20,
    nv.MAX_RECV_BUFFER,
    nv.MAX_RECV_BUFFER + 4096,
)
_FIELDS = (0, 1, 2, 0xCAFE, 0x60001, 0x50000, 0x30002, 1514, 6144, 0xFFFFFFFF, 0x7FFFFFFF)


def _shaped(data: bytes, pos: int) -> tuple[bytes, int]:
    raw = data[pos : pos + 8].ljust(8, b"\0")
    msg_type = _TYPES[raw[0] % len(_TYPES)]
    fields = [b if b < 0x20 else _FIELDS[b % len(_FIELDS)] for b in raw[1:6]]
    if msg_type == nv.Msg.INIT and raw[7] & 1:
        fields[1] = fields[0]  # Linux's min == max
    size = (4, 8, 12, 16, 20, 28, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40)[raw[6] % 16]
    msg = struct.pack("<6I", msg_type, *fields)
    if msg_type == nv.Msg.SEND_NDIS_CONFIG:  # mtu, reserved, 64-bit caps
        msg = struct.pack("<IIIQ", msg_type, fields[0], 0, fields[1])
    return msg.ljust(40, b"\0")[:size], pos + 8


def check_one(data: bytes) -> None:
    """Feed one script to a fresh server and check the invariant after each step."""
    head = data[0] if data else 0
    newest = _VERSIONS[head % len(_VERSIONS)]
    server = nv.NvspServer(
        versions=frozenset(v for v in _VERSIONS if v <= newest), max_subchannels=(head >> 4) % 8
    )
    if head & 0x08:
        _linux_init(server)
    pos = 1
    for _ in range(MAX_MESSAGES):
        if pos >= len(data):
            break
        h = data[pos]
        pos += 1
        if h >= 0x20:
            msg, pos = _shaped(data, pos)
        else:
            size = h or nv.NVSP_MESSAGE_SIZE  # 0: a whole message (the recorded seeds)
            msg = data[pos : pos + size]
            pos += size
        try:
            ev = server.receive(msg)
        except nv.NvspError as exc:
            assert exc.reply is None or len(exc.reply) == nv.NVSP_MESSAGE_SIZE
            continue
        if isinstance(ev, nv.MapReceiveBuffer | nv.MapSendBuffer):
            pick = data[pos] if pos < len(data) else 0
            pos += 1
            try:
                if pick & 0x80:
                    raise server.buffer_map_failed("fuzz")
                mapped = (
                    server.receive_buffer_mapped
                    if isinstance(ev, nv.MapReceiveBuffer)
                    else server.send_buffer_mapped
                )
                reply = mapped(_SIZES[pick % len(_SIZES)])
                assert len(reply) == nv.NVSP_MESSAGE_SIZE
            except nv.NvspError as exc:
                assert exc.reply is not None and len(exc.reply) == nv.NVSP_MESSAGE_SIZE
        elif isinstance(ev, nv.AllocateSubchannels):
            assert 0 <= ev.granted <= min(ev.requested, server.max_subchannels)
            assert len(server.subchannels_allocated(ev.granted)) == nv.NVSP_MESSAGE_SIZE
        elif isinstance(ev, nv.RndisPacket):
            layout = server.send_layout
            if ev.section is not None:
                assert layout is not None and ev.offset + ev.length <= layout.size
        _check_state(server)


def _linux_init(server: nv.NvspServer) -> None:
    """Linux's init (as far as the server's versions allow), so a script starts READY."""
    version = max(server.versions)
    server.receive(struct.pack("<III", nv.Msg.INIT, version, version).ljust(40, b"\0"))
    server.receive(struct.pack("<IIIQ", nv.Msg.SEND_NDIS_CONFIG, 1514, 0, 8).ljust(40, b"\0"))
    server.receive(struct.pack("<III", nv.Msg.SEND_NDIS_VER, 6, 30).ljust(40, b"\0"))
    server.receive(struct.pack("<IIH", nv.Msg.SEND_RECV_BUF, 1, 0xCAFE).ljust(40, b"\0"))
    server.receive_buffer_mapped(2 << 20)
    server.receive(struct.pack("<IIH", nv.Msg.SEND_SEND_BUF, 2, 0).ljust(40, b"\0"))
    server.send_buffer_mapped(1 << 20)


def _check_state(server: nv.NvspServer) -> None:
    rx, tx = server.receive_layout, server.send_layout
    if rx is not None:
        assert rx.section_size >= nv.MIN_SECTION_SIZE
        assert rx.section_size * rx.count <= rx.size <= nv.MAX_RECV_BUFFER
    if tx is not None:
        assert tx.section_size * tx.count <= tx.size <= nv.MAX_SEND_BUFFER
    if server.phase is nv.Phase.READY:
        assert rx is not None and server.version is not None


main = harness.main_for(check_one)


if __name__ == "__main__":
    main(sys.argv)
