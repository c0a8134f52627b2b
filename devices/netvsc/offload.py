"""Checksum and segmentation offload for netvsc, in pure Python: the reference the
C in native/netvsc.c is compared with (devices/netvsc/fastpath.py picks one).

- `fill_checksum`: the guest asked (checksum PPI) for its TCP/UDP (and perhaps IPv4
  header) checksum: Linux leaves the pseudo-header sum in the field
  (CHECKSUM_PARTIAL); we compute the whole checksum before the frame leaves.
- `segment`: LSO v2: cut a large TCP send into MSS-sized segments with correct IP
  lengths, IDs, TCP sequence numbers, flags and checksums. Linux zeroes the IPv4
  total length and header checksum of the large send (netvsc_xmit); we rebuild them.
- `rx_checksum_info`: what we validated on a frame for the guest (the receive
  checksum PPI): IPv4 header, TCP, UDP — succeeded or failed bits.

Everything is bounded by the frame: a header that does not fit is the guest's
error (`OffloadError`, a GuestError) on transmit and "no information" on receive.
"""

from __future__ import annotations

import struct
from typing import Final

from devices.netvsc import rndis as rn
from vmbus.device import GuestError

ETH_HLEN: Final = 14
IPPROTO_TCP: Final = 6
IPPROTO_UDP: Final = 17
TCP_FLAG_FIN: Final = 0x01
TCP_FLAG_PSH: Final = 0x08
TCP_FLAG_CWR: Final = 0x80
MAX_SEGMENTS: Final = 1024  # 64 KiB / 64-byte MSS: a bound on one LSO send


class OffloadError(GuestError):
    """The guest asked for an offload its frame cannot carry."""


def ones_sum(data: bytes | bytearray | memoryview, start: int = 0) -> int:
    """The 16-bit ones'-complement sum (RFC 1071), folded, not inverted."""
    b = bytes(data)
    if len(b) % 2:
        b += b"\0"
    total: int = start + sum(struct.unpack(f">{len(b) // 2}H", b))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _finish(total: int) -> int:
    return ~total & 0xFFFF


def _ip_at(frame: bytes | bytearray) -> tuple[int, int]:
    """(IP header offset, IP version) after the Ethernet (and an inline 802.1Q) header."""
    if len(frame) < ETH_HLEN:
        raise OffloadError("frame shorter than an Ethernet header")
    (proto,) = struct.unpack_from(">H", frame, 12)
    off = ETH_HLEN
    if proto == rn.ETH_P_8021Q:
        if len(frame) < off + 4:
            raise OffloadError("truncated 802.1Q header")
        (proto,) = struct.unpack_from(">H", frame, 16)
        off += 4
    if proto == rn.ETH_P_IP:
        return off, 4
    if proto == rn.ETH_P_IPV6:
        return off, 6
    raise OffloadError(f"offload asked for ethertype {proto:#06x}")


def _pseudo(frame: bytes | bytearray, ip: int, version: int, proto: int, l4_len: int) -> int:
    if version == 4:
        return ones_sum(bytes(frame[ip + 12 : ip + 20]) + struct.pack(">HH", proto, l4_len))
    return ones_sum(bytes(frame[ip + 8 : ip + 40]) + struct.pack(">IxxxB", l4_len, proto))


def _l4_len(frame: bytes | bytearray, ip: int, version: int, l4: int) -> int:
    """The L4 length from the IP header (not the frame: Ethernet may be padded)."""
    if version == 4:
        (total,) = struct.unpack_from(">H", frame, ip + 2)
        end = ip + int(total)
    else:
        (payload,) = struct.unpack_from(">H", frame, ip + 4)
        end = ip + 40 + int(payload)
    if end > len(frame) or end < l4:
        raise OffloadError(f"IP length ends at {end}, frame {len(frame)}, L4 at {l4}")
    return end - l4


def ipv4_header_checksum(frame: bytearray, ip: int) -> None:
    ihl = (frame[ip] & 0xF) * 4
    if ihl < 20 or ip + ihl > len(frame):
        raise OffloadError(f"IPv4 header length {ihl}")
    frame[ip + 10 : ip + 12] = b"\0\0"
    struct.pack_into(">H", frame, ip + 10, _finish(ones_sum(frame[ip : ip + ihl])))


def fill_checksum(frame: bytearray, csum: rn.TxChecksum) -> None:
    """Fill the checksums the guest asked for, in place."""
    ip, version = _ip_at(frame)
    if (version == 4) != csum.ipv4:
        raise OffloadError("checksum PPI's IP version does not match the frame")
    if len(frame) < ip + (20 if version == 4 else 40):
        raise OffloadError("truncated IP header")
    if csum.ip_header and version == 4:
        ipv4_header_checksum(frame, ip)
    if not (csum.tcp or csum.udp):
        return
    l4 = csum.l4_offset
    proto, field = (IPPROTO_TCP, 16) if csum.tcp else (IPPROTO_UDP, 6)
    if l4 < ip + (20 if version == 4 else 40) or l4 + field + 2 > len(frame):
        raise OffloadError(f"L4 offset {l4} in a {len(frame)}-byte frame")
    l4_len = _l4_len(frame, ip, version, l4)
    frame[l4 + field : l4 + field + 2] = b"\0\0"
    total = ones_sum(frame[l4 : l4 + l4_len], _pseudo(frame, ip, version, proto, l4_len))
    value = _finish(total)
    if proto == IPPROTO_UDP and value == 0:
        value = 0xFFFF  # RFC 768: zero means "no checksum"
    struct.pack_into(">H", frame, l4 + field, value)


def segment(frame: bytes, lso: rn.Lso) -> list[bytes]:
    """LSO v2: the large TCP send as MSS-sized frames, every checksum filled."""
    ip, version = _ip_at(frame)
    if (version == 6) != lso.ipv6:
        raise OffloadError("LSO PPI's IP version does not match the frame")
    l4 = lso.tcp_offset
    if version == 4:
        if len(frame) < ip + 20 or frame[ip + 9] != IPPROTO_TCP:
            raise OffloadError("LSO on a non-TCP IPv4 packet")
    elif len(frame) < ip + 40 or (frame[ip + 6] != IPPROTO_TCP and l4 == ip + 40):
        raise OffloadError("LSO on a non-TCP IPv6 packet")
    if l4 < ip + (20 if version == 4 else 40) or len(frame) < l4 + 20:
        raise OffloadError(f"LSO TCP offset {l4} in a {len(frame)}-byte frame")
    thl = (frame[l4 + 12] >> 4) * 4
    if thl < 20 or len(frame) < l4 + thl:
        raise OffloadError(f"TCP header length {thl}")
    head = bytes(frame[: l4 + thl])
    payload = memoryview(frame)[l4 + thl :]
    if not payload:
        raise OffloadError("LSO with no payload")
    nseg = (len(payload) + lso.mss - 1) // lso.mss
    if nseg > MAX_SEGMENTS:
        raise OffloadError(f"LSO into {nseg} segments")
    biggest = len(head) + min(lso.mss, len(payload)) - ip - (0 if version == 4 else 40)
    if biggest > 0xFFFF:
        raise OffloadError(f"LSO segment with {biggest} bytes of IP length")
    (seq,) = struct.unpack_from(">I", head, l4 + 4)
    flags = head[l4 + 13]
    ip_id = struct.unpack_from(">H", head, ip + 4)[0] if version == 4 else 0
    out = []
    for i in range(nseg):
        chunk = payload[i * lso.mss : (i + 1) * lso.mss]
        seg = bytearray(head) + chunk
        struct.pack_into(">I", seg, l4 + 4, (seq + i * lso.mss) & 0xFFFFFFFF)
        f = flags
        if i != nseg - 1:
            f &= ~(TCP_FLAG_FIN | TCP_FLAG_PSH)
        if i:
            f &= ~TCP_FLAG_CWR
        seg[l4 + 13] = f
        if version == 4:
            struct.pack_into(">HH", seg, ip + 2, len(seg) - ip, (ip_id + i) & 0xFFFF)
            ipv4_header_checksum(seg, ip)
        else:
            struct.pack_into(">H", seg, ip + 4, len(seg) - ip - 40)
        fill_checksum(seg, rn.TxChecksum(version == 4, version == 6, True, False, False, l4))
        out.append(bytes(seg))
    return out


def rx_checksum_info(frame: bytes) -> int:
    """The receive checksum PPI for a frame: which checksums we verified."""
    try:
        ip, version = _ip_at(frame)
    except OffloadError:
        return 0
    bits = 0
    if version == 4:
        if len(frame) < ip + 20:
            return 0
        ihl = (frame[ip] & 0xF) * 4
        if ihl < 20 or len(frame) < ip + ihl:
            return 0
        ok = ones_sum(frame[ip : ip + ihl]) == 0xFFFF
        bits |= rn.RXCSUM_IP_SUCCEEDED if ok else rn.RXCSUM_IP_FAILED
        (frag,) = struct.unpack_from(">H", frame, ip + 6)
        if frag & 0x3FFF:
            return bits
        proto, l4 = frame[ip + 9], ip + ihl
    else:
        if len(frame) < ip + 40:
            return 0
        proto, l4 = frame[ip + 6], ip + 40  # extension headers: not looked into
    if proto not in (IPPROTO_TCP, IPPROTO_UDP):
        return bits
    try:
        l4_len = _l4_len(frame, ip, version, l4)
    except OffloadError:
        return bits
    if l4_len < (20 if proto == IPPROTO_TCP else 8):
        return bits
    if proto == IPPROTO_UDP and version == 4 and frame[l4 + 6 : l4 + 8] == b"\0\0":
        return bits  # no UDP checksum sent
    ok = ones_sum(frame[l4 : l4 + l4_len], _pseudo(frame, ip, version, proto, l4_len)) == 0xFFFF
    if proto == IPPROTO_TCP:
        bits |= rn.RXCSUM_TCP_SUCCEEDED if ok else rn.RXCSUM_TCP_FAILED
    else:
        bits |= rn.RXCSUM_UDP_SUCCEEDED if ok else rn.RXCSUM_UDP_FAILED
    return bits
