"""Checksum and LSO offload (devices/netvsc/offload.py) on frames shaped as Linux
sends them: CHECKSUM_PARTIAL leaves the pseudo-header sum in the field; an LSO
send has a zeroed IPv4 total length and header checksum (netvsc_xmit). Checked
against an independently written checksum (sum of words mod 0xFFFF)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.netvsc import offload as off
from devices.netvsc import rndis as rn

SRC4, DST4 = ipaddress.ip_address("192.0.2.1").packed, ipaddress.ip_address("198.51.100.7").packed
SRC6, DST6 = ipaddress.ip_address("2001:db8::1").packed, ipaddress.ip_address("2001:db8::2").packed
ETH4 = bytes.fromhex("00155d00000200155d0000010800")
ETH6 = bytes.fromhex("00155d00000200155d00000186dd")


def ref_sum(data: bytes) -> int:
    """Ones'-complement sum the other way round: the words' sum mod 0xFFFF."""
    if len(data) % 2:
        data += b"\0"
    s = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)) % 0xFFFF
    return s if s or not any(data) else 0xFFFF


def verifies(pseudo: bytes, segment: bytes) -> bool:
    return ref_sum(pseudo + segment) == 0xFFFF


def tcp4(payload: bytes, *, seq: int = 1000, flags: int = 0x18, lso: bool = False) -> bytes:
    tcp = struct.pack(">HHIIBBHHH", 40000, 80, seq, 7, 0x50, flags, 65535, 0, 0)
    total = 0 if lso else 20 + len(tcp) + len(payload)
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, total, 0x1234, 0x4000, 64, 6, 0, SRC4, DST4)
    return ETH4 + ip + tcp + payload


def udp6(payload: bytes) -> bytes:
    udp = struct.pack(">HHHH", 5353, 53, 8 + len(payload), 0)
    ip = struct.pack(">IHBB16s16s", 6 << 28, 8 + len(payload), 17, 64, SRC6, DST6)
    return ETH6 + ip + udp + payload


def pseudo4(proto: int, length: int) -> bytes:
    return SRC4 + DST4 + struct.pack(">HH", proto, length)


def test_tcp4_checksum_from_partial() -> None:
    frame = bytearray(tcp4(b"hello, world!"))
    l4 = 34
    # Linux leaves ~pseudo in the field (CHECKSUM_PARTIAL); any value is overwritten
    struct.pack_into(">H", frame, l4 + 16, 0xBEEF)
    csum = rn.TxChecksum(True, False, True, False, True, l4)
    frame[24:26] = b"\xff\xff"  # a wrong IP header checksum: the guest asked for it too
    off.fill_checksum(frame, csum)
    assert verifies(pseudo4(6, len(frame) - l4), bytes(frame[l4:]))
    assert ref_sum(bytes(frame[14:34])) == 0xFFFF
    assert off.rx_checksum_info(bytes(frame)) == rn.RXCSUM_IP_SUCCEEDED | rn.RXCSUM_TCP_SUCCEEDED
    frame[-1] ^= 1
    assert off.rx_checksum_info(bytes(frame)) == rn.RXCSUM_IP_SUCCEEDED | rn.RXCSUM_TCP_FAILED


def test_udp6_checksum() -> None:
    frame = bytearray(udp6(b"\x00" * 11))
    l4 = 54
    off.fill_checksum(frame, rn.TxChecksum(False, True, False, True, False, l4))
    pseudo = SRC6 + DST6 + struct.pack(">IxxxB", len(frame) - l4, 17)
    assert verifies(pseudo, bytes(frame[l4:]))
    assert struct.unpack_from(">H", frame, l4 + 6)[0] != 0
    assert off.rx_checksum_info(bytes(frame)) == rn.RXCSUM_UDP_SUCCEEDED


def test_lso_segments_like_a_nic() -> None:
    payload = bytes(range(256)) * 20  # 5120 bytes
    frame = tcp4(payload, flags=0x18 | 0x01 | 0x80, lso=True)  # PSH FIN CWR
    segs = off.segment(frame, rn.Lso(1448, 34, False))
    assert [len(s) - 54 for s in segs] == [1448, 1448, 1448, 776]
    assert b"".join(s[54:] for s in segs) == payload
    for i, s in enumerate(segs):
        total, ip_id = struct.unpack_from(">HH", s, 16)
        (seq,) = struct.unpack_from(">I", s, 38)
        flags = s[47]
        assert total == len(s) - 14 and ip_id == 0x1234 + i and seq == 1000 + 1448 * i
        assert ref_sum(s[14:34]) == 0xFFFF
        assert verifies(pseudo4(6, len(s) - 34), s[34:])
        last, first = i == len(segs) - 1, i == 0
        assert bool(flags & 0x09) == last and bool(flags & 0x80) == first
        assert off.rx_checksum_info(s) == rn.RXCSUM_IP_SUCCEEDED | rn.RXCSUM_TCP_SUCCEEDED


def test_lso_ipv6() -> None:
    tcp = struct.pack(">HHIIBBHHH", 1, 2, 5, 0, 0x50, 0x10, 100, 0, 0)
    ip = struct.pack(">IHBB16s16s", 6 << 28, 0, 6, 64, SRC6, DST6)
    frame = ETH6 + ip + tcp + b"z" * 3000
    segs = off.segment(frame, rn.Lso(1000, 54, True))
    assert len(segs) == 3
    for s in segs:
        (plen,) = struct.unpack_from(">H", s, 18)
        assert plen == len(s) - 54
        assert off.rx_checksum_info(s) == rn.RXCSUM_TCP_SUCCEEDED


@pytest.mark.parametrize(
    ("frame", "what"),
    [
        (b"\0" * 10, "shorter than Ethernet"),
        (ETH4[:12] + b"\x08\x06" + bytes(28), "ARP"),
        (tcp4(b"x")[:40], "truncated TCP"),
    ],
)
def test_bad_offload_requests(frame: bytes, what: str) -> None:
    with pytest.raises(off.OffloadError):
        off.fill_checksum(bytearray(frame), rn.TxChecksum(True, False, True, False, False, 34))
    with pytest.raises(off.OffloadError):
        off.segment(frame, rn.Lso(100, 34, False))


def test_lso_version_mismatch_and_no_payload() -> None:
    with pytest.raises(off.OffloadError):
        off.segment(tcp4(b"x" * 100), rn.Lso(10, 34, True))
    with pytest.raises(off.OffloadError):
        off.segment(tcp4(b""), rn.Lso(10, 34, False))
    with pytest.raises(off.OffloadError):
        off.segment(tcp4(b"x" * 5000), rn.Lso(1, 34, False))  # too many segments


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 80), st.integers(1, 2000))
def test_any_frame_is_handled_or_refused(data: bytes, l4: int, mss: int) -> None:
    for frame in (data, ETH4 + data, ETH6 + data):
        try:
            off.fill_checksum(bytearray(frame), rn.TxChecksum(True, False, True, False, True, l4))
        except off.OffloadError:
            pass
        try:
            for s in off.segment(frame, rn.Lso(mss, l4, False)):
                assert len(s) <= len(frame) + 60
        except off.OffloadError:
            pass
        off.rx_checksum_info(frame)
