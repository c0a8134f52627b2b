"""Fuzz target for the RNDIS core and its PPI parser (devices/netvsc/rndis.py).

The invariant, h11 style: whatever RNDIS bytes the guest sends, `split_messages`,
`parse_packet` and `RndisDevice.control` either succeed or raise RndisError, nothing
else; a parsed frame lies inside its message; every reply is a whole RNDIS message
(msg_len = its length) no larger than Linux's response buffer, and a refusal with
an answer carries a non-success status.

Run it under atheris (coverage-guided, libFuzzer):

    python tests/fuzz/fuzz_rndis.py [libFuzzer options, e.g. -runs=100000 -max_len=2048]

or as a plain property test: tests/test_netvsc_rndis.py feeds `check_one` from hypothesis.

Byte 0 picks the mode. Raw (0-3 mod 8): the rest is one NVSP message's RNDIS bytes,
walked and each message parsed (after an INITIALIZE when bit 3 is set). Shaped
packet (4-5): a PACKET whose header fields are consistent, with well-formed PPI
elements and a frame from the input, and (bit 3) one word overwritten, so the PPI
walk and the per-PPI checks are reached; with bit 7 of the next byte set the frame
is a consistent Ethernet + IPv4/IPv6 + TCP/UDP one, so what the PPIs ask for
(checksum filling, LSO segmentation: offload.py) runs past its header checks. Every
NVSP message's bytes also go through the batch parser of the fast path
(devices/netvsc/fastpath.py: native/netvsc.c and its twin), which must agree with the
twin on every verdict, PPI value, checksum and segment. Shaped request (6-7): an initialized
device gets a QUERY or SET for an OID from `_OIDS` with the rest of the input as
its information buffer, and perhaps a corrupted length or offset.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness, when imported by path
import harness

with harness.instrumented():
    from devices.netvsc import fastpath as fp
    from devices.netvsc import offload
    from devices.netvsc import rndis as r
    from vmbus import native

_IMPLS: list[object] = [fp.twin_impl()]
if native.native_available():
    _IMPLS.append(fp.native_impl())

MAX_FRAME = 1514
_OIDS = (
    r.Oid.GEN_CURRENT_PACKET_FILTER,
    r.Oid.E802_3_MULTICAST_LIST,
    r.Oid.TCP_OFFLOAD_PARAMETERS,
    r.Oid.TCP_OFFLOAD_HARDWARE_CAPABILITIES,
    r.Oid.GEN_RECEIVE_SCALE_PARAMETERS,
    r.Oid.GEN_RECEIVE_SCALE_CAPABILITIES,
    r.Oid.GEN_RNDIS_CONFIG_PARAMETER,
    r.Oid.GEN_SUPPORTED_LIST,
    r.Oid.E802_3_PERMANENT_ADDRESS,
    r.Oid.GEN_CURRENT_LOOKAHEAD,
    0xFD010100,  # a switch-internal OID: must never be honoured
)
_WORDS = (0, 1, 12, 16, 36, 44, 0xFFFFFFFF, 0x80000000, 0xFFFFFFFC)


def _device() -> r.RndisDevice:
    dev = r.RndisDevice(r.NicConfig(max_queues=4, allow_mac_change=True))
    dev.queues = 4
    dev.control(struct.pack("<6I", r.MsgType.INITIALIZE, 24, 1, 1, 0, 0x4000))
    return dev


def _check_reply(reply: bytes | None) -> None:
    if reply is None:
        return
    assert len(reply) >= 12 and len(reply) <= r.MAX_RESPONSE_SIZE
    msg_type, msg_len = struct.unpack_from("<II", reply)
    assert msg_len == len(reply) and msg_type & 0x80000000


def _control(dev: r.RndisDevice, msg: memoryview) -> None:
    try:
        result = dev.control(msg)
    except r.RndisError as exc:
        _check_reply(exc.reply)
        if exc.reply is not None:
            t = struct.unpack_from("<I", exc.reply)[0]
            status_at = 8 if t == r.MsgType.RESET_CMPLT else 12
            assert struct.unpack_from("<I", exc.reply, status_at)[0] != r.Status.SUCCESS
        return
    _check_reply(result.reply)


def _packet(msg: memoryview) -> None:
    try:
        p = r.parse_packet(msg, max_frame=MAX_FRAME)
    except r.RndisError:
        return
    assert r.PACKET_HEADER_SIZE <= p.data_start and p.data_start + p.data_len <= len(msg)
    assert p.data_len <= MAX_FRAME or p.lso is not None
    if p.vlan is not None:
        assert p.vlan.vlan_id <= r.VLAN_ID_MAX
    _offload(bytes(msg[p.data_start : p.data_start + p.data_len]), p)


def _offload(frame: bytes, p: r.TxPacket) -> None:
    """What the VSP does with the PPIs' requests (NetvscDevice._offload): segment or
    fill checksums; a refusal is OffloadError (a GuestError), nothing else."""
    try:
        if p.lso is not None:
            segs = offload.segment(frame, p.lso)
            assert 1 <= len(segs) <= offload.MAX_SEGMENTS
            assert all(len(s) <= 0xFFFF + 18 for s in segs)
        elif p.checksum is not None:
            out = bytearray(frame)
            offload.fill_checksum(out, p.checksum)
            assert len(out) == len(frame)
    except offload.OffloadError:
        pass


def _fastpath(buf: bytes) -> None:
    """One NVSP message's RNDIS bytes through the batch parser (native/netvsc.c and
    its twin): the same verdicts and PPI values, frames inside the buffer, and the same
    checksums and segments from both for every frame that asked for them."""
    index = [(0, len(buf))]
    got = [impl.tx_parse(buf, index, MAX_FRAME) for impl in _IMPLS]  # type: ignore[attr-defined]
    assert all(g == got[0] for g in got), got
    for msg in got[0]:
        assert msg.status in (fp.OK, fp.SLOW, fp.BAD)
        for pkt in msg.pkts:
            assert 0 <= pkt.data_off and pkt.data_off + pkt.data_len <= len(buf)
            frame = buf[pkt.data_off : pkt.data_off + pkt.data_len]
            if pkt.lso:
                segs = [impl.lso_segment(frame, pkt.lso) for impl in _IMPLS]  # type: ignore[attr-defined]
                assert all(s == segs[0] for s in segs), "LSO: C and twin disagree"
            elif pkt.csum:
                frames = [bytearray(frame) for _ in _IMPLS]
                oks = [impl.csum_fill(f, pkt.csum) for impl, f in zip(_IMPLS, frames, strict=True)]  # type: ignore[attr-defined]
                assert all(o == oks[0] for o in oks) and all(f == frames[0] for f in frames)


def _walk(dev: r.RndisDevice, data: bytes) -> None:
    _fastpath(bytes(data))
    try:
        msgs = r.split_messages(data)
    except r.RndisError:
        return
    assert sum(len(m) for _, m in msgs) <= len(data)
    for msg_type, msg in msgs:
        if msg_type == r.MsgType.PACKET:
            _packet(msg)
        else:
            _control(dev, msg)


_PPI_TYPES = (0, 2, 6, 8, 9, 0x80000001, 11, 0)
_PPI_VALUES = (0, 0x5, 0x00220005, 0x00220009, 0x4220_05A8, 0xC220_05A8, 0x0640, 0xFFF0, 7,
               0x00220011, 0x00220012, 0x8220_0100, 0x4220_0010)  # fmt: skip


def _shaped_frame(rest: bytes) -> bytes:
    """An Ethernet frame with an IPv4 or IPv6 header and a TCP or UDP header whose
    lengths agree (perhaps behind an inline 802.1Q tag), payload from the input, so
    checksum filling and LSO get past their header checks."""
    sel = rest[:1] or b"\0"
    payload = rest[1:]
    tcp = bool(sel[0] & 1)
    l4 = (struct.pack(">HHIIBBHHH", 1234, 80, 7, 0, 0x50, 0x18, 512, 0, 0) if tcp
          else struct.pack(">HHHH", 53, 53, 8 + len(payload), 0))  # fmt: skip
    proto = 6 if tcp else 17
    if sel[0] & 2:
        ip = struct.pack(">IHBB16s16s", 0x60000000, len(l4) + len(payload), proto, 64,
                         bytes(16), bytes(16))  # fmt: skip
        eth = b"\xff" * 12 + b"\x86\xdd"
    else:
        total = 20 + len(l4) + len(payload)
        ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, total & 0xFFFF, 1, 0, 64, proto, 0,
                         bytes(4), bytes(4))  # fmt: skip
        eth = b"\xff" * 12 + b"\x08\x00"
    if sel[0] & 4:
        eth = eth[:12] + b"\x81\x00\x00\x05" + eth[12:]
    return eth + ip + l4 + payload


def _shaped_packet(rest: bytes, *, corrupt: bool) -> bytes:
    """A PACKET with well-formed PPI elements (types and values mostly meaningful)
    and a frame from the input; `corrupt` overwrites one word of the result."""
    count = rest[0] % 6 if rest else 0
    pos = 1
    area = b""
    for _ in range(count):
        sel = rest[pos : pos + 5].ljust(5, b"\0")
        pos += 5
        value = (
            _PPI_VALUES[sel[1] % len(_PPI_VALUES)]
            if sel[0] & 0x80
            else int.from_bytes(sel[1:5], "little")
        )
        area += struct.pack("<IIII", 16, _PPI_TYPES[sel[0] % len(_PPI_TYPES)], 12, value)
    frame = _shaped_frame(rest[pos:]) if rest[:1] and rest[0] & 0x80 else rest[pos:] or b"\0"
    words = [1, 44 + len(area) + len(frame), 36 + len(area), len(frame), 0, 0, 0, 36, len(area)]
    msg = bytearray(struct.pack("<11I", *words, 0, 0) + area + frame)
    if corrupt and len(rest) >= 2:
        at = 4 * (rest[-1] % ((len(msg) - 4) // 4 + 1))
        struct.pack_into("<I", msg, min(at, len(msg) - 4), _WORDS[rest[-2] % len(_WORDS)])
    return bytes(msg)


def check_one(data: bytes) -> None:
    """One input: raw RNDIS bytes, a shaped PACKET or a shaped OID request."""
    mode = data[0] if data else 0
    rest = data[1:]
    if mode % 8 < 4:
        dev = _device() if mode & 8 else r.RndisDevice(r.NicConfig())
        _walk(dev, rest)
    elif mode % 8 < 6:
        msg = _shaped_packet(rest, corrupt=bool(mode & 8))
        _walk(_device(), msg)
        _packet(memoryview(msg))
    else:
        head = rest[:2].ljust(2, b"\0")
        info = rest[2:]
        words = [
            r.MsgType.SET if head[0] & 1 else r.MsgType.QUERY,
            28 + len(info),
            7,
            _OIDS[(head[0] >> 1) % len(_OIDS)],
            len(info),
            20,
            0,
        ]
        if head[1] & 0x80:
            words[1 + head[1] % 6] = _WORDS[(head[1] >> 3) % len(_WORDS)]
        msg = struct.pack("<7I", *words) + info
        _walk(_device(), msg)
        _control(_device(), memoryview(msg))


main = harness.main_for(check_one)


if __name__ == "__main__":
    main(sys.argv)
