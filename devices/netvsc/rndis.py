"""RNDIS over NVSP, sans-IO: control messages, PACKET with per-packet info, RSS.

`split_messages(buf)` walks the RNDIS messages one SEND_RNDIS_PKT carries;
`RndisDevice.control(msg)` answers one control message (INITIALIZE, QUERY, SET,
RESET, KEEPALIVE, HALT) with the reply bytes to put in a receive-buffer section and
the state change it made; `parse_packet` reads a guest PACKET (the frame's place and
its PPIs: checksum and LSO requests, VLAN, hash); `packet_header` builds the header of
a host PACKET (rx checksum result, VLAN, hash value and info); `indicate_status`
builds INDICATE_STATUS. `toeplitz_hash` and `rss_queue` steer received frames.

Every offset and length in a guest message is the guest's word (the CVE-2021-28476
class): each is bounded against the message before anything is read through it, and
the OIDs answered are a fixed whitelist. A guest's mistake raises `RndisError`
(a `GuestError`): `status` is an RNDIS status, and `reply` the completion carrying
it when the message was a request with an id (send it back as the answer); with
`reply` None the message is dropped and the NVSP packet completed with failure.

Layouts: Linux 6.1 include/linux/rndis.h, drivers/net/hyperv/hyperv_net.h and
rndis_filter.c, netvsc_drv.c; ../shared/spec/netvsc.md §6, §8, §9, §10, §14.
All RNDIS offsets count from byte 8 of the message (the first field after
type and length).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from vmbus.device import GuestError

# --- message types and statuses ------------------------------------------------------


class MsgType(enum.IntEnum):
    PACKET = 0x00000001
    INITIALIZE = 0x00000002
    HALT = 0x00000003
    QUERY = 0x00000004
    SET = 0x00000005
    RESET = 0x00000006
    INDICATE_STATUS = 0x00000007
    KEEPALIVE = 0x00000008
    INITIALIZE_CMPLT = 0x80000002
    QUERY_CMPLT = 0x80000004
    SET_CMPLT = 0x80000005
    RESET_CMPLT = 0x80000006
    KEEPALIVE_CMPLT = 0x80000008


class Status(enum.IntEnum):
    SUCCESS = 0x00000000
    FAILURE = 0xC0000001
    NOT_SUPPORTED = 0xC00000BB
    NOT_ACCEPTED = 0x00010003
    INVALID_LENGTH = 0xC0010014
    INVALID_DATA = 0xC0010015
    BUFFER_TOO_SHORT = 0xC0010016
    INVALID_OID = 0xC0010017
    MULTICAST_FULL = 0xC0010009
    BAD_VERSION = 0xC0010004
    # INDICATE_STATUS codes
    MEDIA_CONNECT = 0x4001000B
    MEDIA_DISCONNECT = 0x4001000C
    LINK_SPEED_CHANGE = 0x40010013
    NETWORK_CHANGE = 0x40010018
    TASK_OFFLOAD_CURRENT_CONFIG = 0x40020006


class Oid(enum.IntEnum):
    GEN_SUPPORTED_LIST = 0x00010101
    GEN_HARDWARE_STATUS = 0x00010102
    GEN_MEDIA_SUPPORTED = 0x00010103
    GEN_MEDIA_IN_USE = 0x00010104
    GEN_MAXIMUM_LOOKAHEAD = 0x00010105
    GEN_MAXIMUM_FRAME_SIZE = 0x00010106
    GEN_LINK_SPEED = 0x00010107
    GEN_TRANSMIT_BUFFER_SPACE = 0x00010108
    GEN_RECEIVE_BUFFER_SPACE = 0x00010109
    GEN_TRANSMIT_BLOCK_SIZE = 0x0001010A
    GEN_RECEIVE_BLOCK_SIZE = 0x0001010B
    GEN_VENDOR_ID = 0x0001010C
    GEN_VENDOR_DESCRIPTION = 0x0001010D
    GEN_CURRENT_PACKET_FILTER = 0x0001010E
    GEN_CURRENT_LOOKAHEAD = 0x0001010F
    GEN_DRIVER_VERSION = 0x00010110
    GEN_MAXIMUM_TOTAL_SIZE = 0x00010111
    GEN_MAC_OPTIONS = 0x00010113
    GEN_MEDIA_CONNECT_STATUS = 0x00010114
    GEN_MAXIMUM_SEND_PACKETS = 0x00010115
    GEN_NETWORK_LAYER_ADDRESSES = 0x00010118
    GEN_PHYSICAL_MEDIUM = 0x00010202
    GEN_RECEIVE_SCALE_CAPABILITIES = 0x00010203
    GEN_RECEIVE_SCALE_PARAMETERS = 0x00010204
    GEN_MAX_LINK_SPEED = 0x00010206
    GEN_MACHINE_NAME = 0x0001021A
    GEN_RNDIS_CONFIG_PARAMETER = 0x0001021B
    GEN_XMIT_OK = 0x00020101
    GEN_RCV_OK = 0x00020102
    GEN_XMIT_ERROR = 0x00020103
    GEN_RCV_ERROR = 0x00020104
    GEN_RCV_NO_BUFFER = 0x00020105
    GEN_FRIENDLY_NAME = 0x00020216
    E802_3_PERMANENT_ADDRESS = 0x01010101
    E802_3_CURRENT_ADDRESS = 0x01010102
    E802_3_MULTICAST_LIST = 0x01010103
    E802_3_MAXIMUM_LIST_SIZE = 0x01010104
    E802_3_MAC_OPTIONS = 0x01010105
    TCP_OFFLOAD_CURRENT_CONFIG = 0xFC01020B
    TCP_OFFLOAD_PARAMETERS = 0xFC01020C
    TCP_OFFLOAD_HARDWARE_CAPABILITIES = 0xFC01020D


# --- sizes and bounds ----------------------------------------------------------------

RNDIS_HEADER_SIZE: Final = 8
INITIALIZE_SIZE: Final = 24
INITIALIZE_CMPLT_SIZE: Final = 52
REQUEST_ID_SIZE: Final = 12  # HALT, KEEPALIVE, RESET: header + one u32
QUERY_SIZE: Final = 28  # QUERY and SET: info buffer normally follows at 28
QUERY_CMPLT_SIZE: Final = 24
SET_CMPLT_SIZE: Final = 16
RESET_CMPLT_SIZE: Final = 16
KEEPALIVE_CMPLT_SIZE: Final = 16
INDICATE_STATUS_SIZE: Final = 20
PACKET_HEADER_SIZE: Final = 44  # header + struct rndis_packet (36)
RNDIS_PACKET_BODY: Final = 36  # the least data_offset and per_pkt_info_offset
PPI_HEADER_SIZE: Final = 12

MAX_RESPONSE_SIZE: Final = 52 + 4096  # Linux's response buffer (spec §14.5)
MAX_MESSAGES_PER_NVSP: Final = 64  # a bound on one NVSP message's walk
MAX_PKT_PER_MSG: Final = 8  # what we allow the guest to batch (INIT_CMPLT)
PKT_ALIGNMENT_FACTOR: Final = 3  # log2: 8-byte alignment of batched packets
MAX_XFER_SIZE: Final = 0x40000  # one NVSP message's RNDIS bytes, 256 KiB
MAX_INFO_BUFFER: Final = 4096  # an OID request's information buffer
RNDIS_MAJOR: Final = 1
RNDIS_MINOR: Final = 0
DF_CONNECTIONLESS: Final = 0x1
MEDIUM_802_3: Final = 0
MAX_PPI_COUNT: Final = 16  # PPIs in one packet; Linux sends at most 4
MAX_MULTICAST: Final = 32  # OID_802_3_MAXIMUM_LIST_SIZE
MAX_CONFIG_STRING: Final = 512  # CONFIG_PARAMETER name/value bytes (UTF-16)
MAX_FRAME_LSO: Final = 0x10000 + 14 + 4  # 64 KiB of IP + Ethernet header (+VLAN)
LSO_MAX_SIZE: Final = 0xF53C  # what vmswitch and OpenVMM advertise
LSO_MIN_SEGMENTS: Final = 2
LSO_MAX_MSS: Final = 0xFFFFF

ETH_ALEN: Final = 6
ETH_HLEN: Final = 14
VENDOR_ID: Final = 0x0000155D
VENDOR_DESCRIPTION: Final = b"vmbusd netvsc\0"
DRIVER_VERSION: Final = 0x0100
FRIENDLY_NAME: Final = "Network Adapter"  # Linux ignores exactly this name
BUFFER_SPACE: Final = 256 * 1024  # what vmswitch returns (OpenVMM)

MAC_OPTION_COPY_LOOKAHEAD_DATA: Final = 0x01
MAC_OPTION_TRANSFERS_NOT_PEND: Final = 0x04
MAC_OPTION_NO_LOOPBACK: Final = 0x08
MAC_OPTION_FULL_DUPLEX: Final = 0x10
MAC_OPTION_8021P_PRIORITY: Final = 0x40
MAC_OPTIONS: Final = (
    MAC_OPTION_COPY_LOOKAHEAD_DATA
    | MAC_OPTION_TRANSFERS_NOT_PEND
    | MAC_OPTION_NO_LOOPBACK
    | MAC_OPTION_FULL_DUPLEX
    | MAC_OPTION_8021P_PRIORITY
)

# Packet filter bits (rndis.h).
FILTER_DIRECTED: Final = 0x1
FILTER_MULTICAST: Final = 0x2
FILTER_ALL_MULTICAST: Final = 0x4
FILTER_BROADCAST: Final = 0x8
FILTER_PROMISCUOUS: Final = 0x20
FILTER_KNOWN: Final = 0xF0FF  # every bit rndis.h names

# NDIS objects.
NDIS_OBJECT_TYPE_DEFAULT: Final = 0x80
NDIS_OBJECT_TYPE_RSS_CAPABILITIES: Final = 0x88
NDIS_OBJECT_TYPE_RSS_PARAMETERS: Final = 0x89
NDIS_OBJECT_TYPE_OFFLOAD: Final = 0xA7
NDIS_OFFLOAD_SIZES: Final = {1: 112, 2: 144, 3: 156}  # NDIS_OFFLOAD by revision
NDIS_OFFLOAD_SIZE: Final = 156
OFFLOAD_PARAMS_MIN_SIZE: Final = 20
OFFLOAD_PARAMS_MAX_SIZE: Final = 28
ENCAP_802_3: Final = 0x2
# Checksum capability bits (NDIS_OFFLOAD csum fields).
CSUM_IP4_OPTIONS: Final = 0x001
CSUM_TCP_OPTIONS: Final = 0x004
CSUM_TCP: Final = 0x010
CSUM_UDP: Final = 0x040
CSUM_IP4_HEADER: Final = 0x100
CSUM_IP6_EXT_HEADERS: Final = 0x001
LSO_IP6_EXT_HEADERS: Final = 0x001
LSO_TCP_OPTIONS: Final = 0x004

RSS_CAPS_SIZE: Final = 18
RSS_CAPS_REVISION: Final = 2
RSS_CAP_TOEPLITZ: Final = 0x01
RSS_CAP_TCP_IPV4: Final = 0x100
RSS_CAP_TCP_IPV6: Final = 0x200
RSS_PARAMS_SIZE: Final = 40
RSS_FLAG_HASH_INFO_UNCHANGED: Final = 0x02
RSS_FLAG_ITABLE_UNCHANGED: Final = 0x04
RSS_FLAG_HASH_KEY_UNCHANGED: Final = 0x08
RSS_FLAG_DISABLE: Final = 0x10
RSS_KEY_SIZE: Final = 40
ITAB_NUM: Final = 128  # the table size we advertise (Linux's default)
ITAB_NUM_MAX: Final = 256
HASH_FUNC_TOEPLITZ: Final = 0x00000001
HASH_IPV4: Final = 0x00000100
HASH_TCP_IPV4: Final = 0x00000200
HASH_IPV6: Final = 0x00000400
HASH_IPV6_EX: Final = 0x00000800
HASH_TCP_IPV6: Final = 0x00001000
HASH_TCP_IPV6_EX: Final = 0x00002000

CONFIG_PARAM_SIZE: Final = 20
CONFIG_PARAM_TYPE_STRING: Final = 2
NETWORK_ADDRESS: Final = "NetworkAddress"

# --- per-packet info ----------------------------------------------------------------


class PpiType(enum.IntEnum):
    TCPIP_CHKSUM = 0
    IPSEC = 1
    TCP_LARGESEND = 2
    CLASSIFICATION_HANDLE = 3
    SG_LIST = 5
    IEEE_8021Q = 6
    ORIGINAL = 7
    NBL_HASH_VALUE = 8  # also PACKET_CANCEL_ID
    NBL_HASH_INFO = 9  # also ORIGINAL_NET_BUFLIST
    CACHED_NET_BUFLIST = 10
    SHORT_PKT_PADINFO = 11


PPI_INTERNAL: Final = 0x80000000  # the type word's top bit
PPI_INTERNAL_PKTINFO_ID: Final = 1

# TX checksum request (guest -> host) bits.
TXCSUM_IPV4: Final = 0x1
TXCSUM_IPV6: Final = 0x2
TXCSUM_TCP: Final = 0x4
TXCSUM_UDP: Final = 0x8
TXCSUM_IP_HEADER: Final = 0x10
# RX checksum result (host -> guest) bits.
RXCSUM_TCP_FAILED: Final = 0x001
RXCSUM_UDP_FAILED: Final = 0x002
RXCSUM_IP_FAILED: Final = 0x004
RXCSUM_TCP_SUCCEEDED: Final = 0x008
RXCSUM_UDP_SUCCEEDED: Final = 0x010
RXCSUM_IP_SUCCEEDED: Final = 0x020
# LSO info bits.
LSO_V2_TYPE: Final = 1
LSO_IPV6: Final = 1
VLAN_ID_MAX: Final = 4094  # 4095 is reserved

_U32 = struct.Struct("<I")
_HDR = struct.Struct("<II")
_PPI = struct.Struct("<III")


class RndisError(GuestError):
    """The guest broke RNDIS. `reply` is the completion to send, if the message had one."""

    def __init__(
        self, reason: str, *, status: int = Status.INVALID_DATA, reply: bytes | None = None
    ) -> None:
        super().__init__(reason, status=status)
        self.reply = reply


# --- walking one NVSP message's RNDIS bytes -----------------------------------------


def split_messages(buf: bytes | memoryview) -> list[tuple[int, memoryview]]:
    """The RNDIS messages back to back in `buf` as (type, view of exactly msg_len).

    Each msg_len must cover its header and fit what is left; a zero length cannot
    loop because it is refused. A control message must stand alone (Linux sends one
    per NVSP message); PACKETs may be batched up to MAX_PKT_PER_MSG (what we told
    the guest), and trailing zero padding after the last one is ignored."""
    view = memoryview(buf)
    if len(view) > MAX_XFER_SIZE:
        raise RndisError(f"{len(view)} RNDIS bytes in one NVSP message")
    out: list[tuple[int, memoryview]] = []
    pos = 0
    while len(view) - pos >= RNDIS_HEADER_SIZE:
        msg_type, msg_len = _HDR.unpack_from(view, pos)
        if msg_type == 0 and msg_len == 0 and out:
            break  # padding after the last message
        if msg_len < RNDIS_HEADER_SIZE or msg_len > len(view) - pos:
            raise RndisError(f"RNDIS msg_len {msg_len} at {pos} of {len(view)}")
        if out and (msg_type != MsgType.PACKET or out[0][0] != MsgType.PACKET):
            raise RndisError("a control message batched with others")
        if len(out) >= MAX_PKT_PER_MSG:
            raise RndisError(f"more than {MAX_PKT_PER_MSG} RNDIS packets in one NVSP message")
        out.append((msg_type, view[pos : pos + msg_len]))
        pos += msg_len
    if not out:
        raise RndisError(f"no RNDIS message in {len(view)} bytes")
    return out


# --- PACKET ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TxChecksum:
    """The guest asks us to fill a checksum (PPI 0, transmit layout)."""

    ipv4: bool
    ipv6: bool
    tcp: bool
    udp: bool
    ip_header: bool
    l4_offset: int  # the TCP/UDP header's offset from the frame start


@dataclass(frozen=True)
class Lso:
    """LSO v2: segment into `mss`-byte TCP payloads (PPI 2)."""

    mss: int
    tcp_offset: int
    ipv6: bool


@dataclass(frozen=True)
class Vlan:
    """An 802.1Q tag carried beside the frame (PPI 6), never inline."""

    vlan_id: int
    priority: int
    cfi: bool

    def value(self) -> int:
        return (self.priority & 7) | (int(self.cfi) << 3) | ((self.vlan_id & 0xFFF) << 4)


@dataclass(frozen=True)
class TxPacket:
    """A guest PACKET: the frame is msg[data_start : data_start + data_len]."""

    data_start: int
    data_len: int
    checksum: TxChecksum | None = None
    lso: Lso | None = None
    vlan: Vlan | None = None
    hash_value: int | None = None


def walk_ppis(area: memoryview) -> Iterator[tuple[int, memoryview]]:
    """(type word, payload) for each PPI element; every size and offset checked."""
    pos = 0
    count = 0
    while pos < len(area):
        if len(area) - pos < PPI_HEADER_SIZE:
            raise RndisError(f"PPI header at {pos} runs past the PPI area ({len(area)})")
        size, type_word, ppi_offset = _PPI.unpack_from(area, pos)
        if size < PPI_HEADER_SIZE or size % 4 or size > len(area) - pos:
            raise RndisError(f"PPI size {size} at {pos} of {len(area)}")
        if not PPI_HEADER_SIZE <= ppi_offset <= size:
            raise RndisError(f"PPI offset {ppi_offset} in a {size}-byte element")
        count += 1
        if count > MAX_PPI_COUNT:
            raise RndisError(f"more than {MAX_PPI_COUNT} PPIs")
        yield type_word, area[pos + ppi_offset : pos + size]
        pos += size


def _ppi_u32(payload: memoryview, what: str) -> int:
    if len(payload) < 4:
        raise RndisError(f"{what} PPI of {len(payload)} bytes")
    return int(_U32.unpack_from(payload)[0])


def parse_packet(msg: bytes | memoryview, *, max_frame: int) -> TxPacket:
    """Check a guest RNDIS PACKET (one message from split_messages) and read its PPIs.

    `max_frame` is the MTU with Ethernet header: a larger frame needs LSO."""
    view = memoryview(msg)
    if len(view) < PACKET_HEADER_SIZE:
        raise RndisError(f"PACKET of {len(view)} bytes")
    msg_type, msg_len = _HDR.unpack_from(view)
    if msg_type != MsgType.PACKET or msg_len != len(view):
        raise RndisError(f"not a whole PACKET: type {msg_type:#x} length {msg_len}")
    (d_off, d_len, oob_off, oob_len, oob_n, p_off, p_len, vc, _res) = struct.unpack_from(
        "<9I", view, RNDIS_HEADER_SIZE
    )
    body = msg_len - RNDIS_HEADER_SIZE  # offsets count from byte 8
    if oob_off or oob_len or oob_n or vc:
        raise RndisError("PACKET with OOB data or a VC handle")
    if d_len == 0 or d_off < RNDIS_PACKET_BODY or d_off > body or d_len > body - d_off:
        raise RndisError(f"PACKET data {d_off}+{d_len} outside {body} bytes")
    checksum = lso = vlan = None
    hash_value = None
    if p_len or p_off:
        if p_off < RNDIS_PACKET_BODY or p_off % 4 or p_off > body or p_len > body - p_off:
            raise RndisError(f"PACKET PPI area {p_off}+{p_len} outside {body} bytes")
        if p_off < d_off + d_len and d_off < p_off + p_len:
            raise RndisError("PACKET PPI area overlaps the frame")
        area = view[RNDIS_HEADER_SIZE + p_off : RNDIS_HEADER_SIZE + p_off + p_len]
        seen: set[int] = set()
        for type_word, payload in walk_ppis(area):
            if type_word in seen:
                raise RndisError(f"PPI type {type_word:#x} twice")
            seen.add(type_word)
            if type_word == PpiType.TCPIP_CHKSUM:
                checksum = tx_checksum_of(_ppi_u32(payload, "checksum"), d_len)
            elif type_word == PpiType.TCP_LARGESEND:
                lso = lso_of(_ppi_u32(payload, "LSO"), d_len)
            elif type_word == PpiType.IEEE_8021Q:
                vlan = vlan_of(_ppi_u32(payload, "VLAN"))
            elif type_word == PpiType.NBL_HASH_VALUE:
                hash_value = _ppi_u32(payload, "hash")
            # any other PPI (a Windows guest's, an internal one) carries nothing we use
    if lso is None and d_len > max_frame:
        raise RndisError(f"frame of {d_len} bytes above {max_frame} without LSO")
    if lso is not None and d_len > MAX_FRAME_LSO:
        raise RndisError(f"LSO send of {d_len} bytes")
    start = RNDIS_HEADER_SIZE + d_off
    return TxPacket(start, d_len, checksum, lso, vlan, hash_value)


def tx_checksum_of(value: int, frame_len: int) -> TxChecksum | None:
    """A transmit checksum PPI's value read and checked (None: value 0, nothing asked)."""
    if value == 0:
        return None
    ipv4, ipv6 = bool(value & TXCSUM_IPV4), bool(value & TXCSUM_IPV6)
    tcp, udp = bool(value & TXCSUM_TCP), bool(value & TXCSUM_UDP)
    l4 = (value >> 16) & 0x3FF
    if ipv4 == ipv6:
        raise RndisError(f"checksum PPI {value:#x}: neither or both of IPv4/IPv6")
    if tcp and udp:
        raise RndisError(f"checksum PPI {value:#x}: both TCP and UDP")
    if (tcp or udp) and not ETH_HLEN <= l4 < frame_len:
        raise RndisError(f"checksum PPI L4 offset {l4} in a {frame_len}-byte frame")
    return TxChecksum(ipv4, ipv6, tcp, udp, bool(value & TXCSUM_IP_HEADER), l4)


def lso_of(value: int, frame_len: int) -> Lso:
    """An LSO PPI's value read and checked: v2 only, mss, TCP offset inside the frame."""
    mss = value & LSO_MAX_MSS
    tcp_offset = (value >> 20) & 0x3FF
    lso_type = (value >> 30) & 1
    if lso_type != LSO_V2_TYPE:
        raise RndisError("LSO v1 is not offered")
    if mss == 0 or not ETH_HLEN <= tcp_offset < frame_len:
        raise RndisError(f"LSO mss {mss} TCP offset {tcp_offset} in {frame_len} bytes")
    return Lso(mss, tcp_offset, bool(value >> 31))


def vlan_of(value: int) -> Vlan:
    """An 802.1Q PPI's value read and checked (id 0..4094, the upper half zero)."""
    vlan_id = (value >> 4) & 0xFFF
    if vlan_id > VLAN_ID_MAX or value >> 16:
        raise RndisError(f"VLAN PPI {value:#x}")
    return Vlan(vlan_id, value & 7, bool(value & 8))


def _ppi(type_word: int, value: int) -> bytes:
    return _PPI.pack(PPI_HEADER_SIZE + 4, type_word, PPI_HEADER_SIZE) + _U32.pack(value)


def packet_header(
    frame_len: int,
    *,
    rx_checksum: int = 0,
    vlan: Vlan | None = None,
    hash_value: int | None = None,
    hash_info: int = 0,
) -> bytes:
    """The RNDIS PACKET header (with PPIs) to put before a received frame; the whole
    message is header + frame, msg_len counting both."""
    ppis = b""
    if rx_checksum:
        ppis += _ppi(PpiType.TCPIP_CHKSUM, rx_checksum)
    if vlan is not None:
        ppis += _ppi(PpiType.IEEE_8021Q, vlan.value())
    if hash_value is not None:
        ppis += _ppi(PpiType.NBL_HASH_VALUE, hash_value & 0xFFFFFFFF)
        if hash_info:
            ppis += _ppi(PpiType.NBL_HASH_INFO, hash_info)
    d_off = RNDIS_PACKET_BODY + len(ppis)
    p_off = RNDIS_PACKET_BODY if ppis else 0
    head = struct.pack(
        "<II9I",
        MsgType.PACKET,
        PACKET_HEADER_SIZE + len(ppis) + frame_len,
        d_off,
        frame_len,
        0,
        0,
        0,
        p_off,
        len(ppis),
        0,
        0,
    )
    return head + ppis


def indicate_status(status: int, payload: bytes = b"") -> bytes:
    """INDICATE_STATUS (host -> guest): media connect/disconnect, network change,
    link speed (a u32 in 100 bps units)."""
    offset = 12 if payload else 0  # buffer right after the fixed fields
    return (
        struct.pack(
            "<IIIII",
            MsgType.INDICATE_STATUS,
            INDICATE_STATUS_SIZE + len(payload),
            status,
            len(payload),
            offset,
        )
        + payload
    )


# --- control --------------------------------------------------------------------------


class State(enum.Enum):
    UNINITIALIZED = "uninitialized"
    INITIALIZED = "initialized"
    HALTED = "halted"


@dataclass
class NicConfig:
    """What the host says about the NIC."""

    mac: bytes = b"\x00\x15\x5d\x00\x00\x01"
    mtu: int = 1500  # without the Ethernet header
    link_speed: int = 100_000_000  # 100 bps units: 10 Gbit/s
    max_queues: int = 1
    connected: bool = True
    tx_checksum: bool = True  # we fill TCP/UDP checksums for the guest
    lso: bool = True
    allow_mac_change: bool = False

    def __post_init__(self) -> None:
        if len(self.mac) != ETH_ALEN:
            raise ValueError(f"MAC of {len(self.mac)} bytes")
        if not 68 <= self.mtu <= 9216 - ETH_HLEN:
            raise ValueError(f"MTU {self.mtu}")
        if not 1 <= self.max_queues <= 64:
            raise ValueError(f"{self.max_queues} queues")


@dataclass(frozen=True)
class OffloadParams:
    """OID_TCP_OFFLOAD_PARAMETERS as set (fields: 0 no change, 1 off, 2..4 per NDIS)."""

    values: bytes  # the raw byte fields 4..(size), as the guest sent them


@dataclass(frozen=True)
class RssParams:
    """RSS as the guest set it: None table when disabled."""

    enabled: bool
    hash_info: int
    key: bytes
    table: tuple[int, ...]


@dataclass(frozen=True)
class PacketFilterChanged:
    filter: int


@dataclass(frozen=True)
class MulticastListChanged:
    macs: tuple[bytes, ...]


@dataclass(frozen=True)
class MacChangeRequested:
    mac: bytes


@dataclass(frozen=True)
class Halted:
    pass


@dataclass(frozen=True)
class ResetDone:
    pass


ControlEvent = (
    PacketFilterChanged
    | MulticastListChanged
    | MacChangeRequested
    | OffloadParams
    | RssParams
    | Halted
    | ResetDone
)


@dataclass(frozen=True)
class ControlResult:
    """`reply` goes to the guest through a receive section (None: HALT has none)."""

    reply: bytes | None
    event: ControlEvent | None = None


@dataclass
class Counters:
    xmit_ok: int = 0
    rcv_ok: int = 0
    xmit_error: int = 0
    rcv_error: int = 0
    rcv_no_buffer: int = 0
    rcv_filtered: int = 0  # frames the guest's packet filter did not pass (not an error)


def query_cmplt(req_id: int, status: int, info: bytes = b"") -> bytes:
    """QUERY_CMPLT; the info offset is 16 even with no data: Linux refuses less."""
    offset = 16
    return (
        struct.pack(
            "<IIIIII",
            MsgType.QUERY_CMPLT,
            QUERY_CMPLT_SIZE + len(info),
            req_id,
            status,
            len(info),
            offset,
        )
        + info
    )


def set_cmplt(req_id: int, status: int) -> bytes:
    return struct.pack("<IIII", MsgType.SET_CMPLT, SET_CMPLT_SIZE, req_id, status)


class RndisDevice:
    """The RNDIS function of one NIC (its control lives on the primary channel)."""

    def __init__(self, config: NicConfig, *, nvsp_version: int = 0x00060001) -> None:
        self.config = config
        self.nvsp_version = nvsp_version
        self.state = State.UNINITIALIZED
        self.packet_filter = 0
        self.multicast: tuple[bytes, ...] = ()
        self.current_mac = config.mac
        self.queues = 1  # channels open: 1 + granted sub-channels (the VSP sets it)
        self.rss: RssParams | None = None
        self.offload_params: OffloadParams | None = None
        self.counters = Counters()
        self.max_pkt_per_msg = MAX_PKT_PER_MSG

    # -- dispatch --

    def control(self, msg: bytes | memoryview) -> ControlResult:
        """Answer one control message (one item of split_messages)."""
        data = bytes(msg[: RNDIS_HEADER_SIZE + MAX_INFO_BUFFER + QUERY_SIZE])
        if len(data) < REQUEST_ID_SIZE:
            raise RndisError(f"control message of {len(data)} bytes")
        msg_type, msg_len = _HDR.unpack_from(data)
        if msg_len != len(msg) or msg_len > len(data):
            raise RndisError(f"control message length {msg_len} of {len(msg)}")
        (req_id,) = _U32.unpack_from(data, 8)
        if msg_type == MsgType.INITIALIZE:
            return self._initialize(data, req_id)
        if self.state is not State.INITIALIZED:
            raise RndisError(f"RNDIS message {msg_type:#x} while {self.state.value}")
        if msg_type == MsgType.QUERY:
            return self._query(data, req_id)
        if msg_type == MsgType.SET:
            return self._set(data, req_id)
        if msg_type == MsgType.KEEPALIVE:
            return ControlResult(
                struct.pack("<IIII", MsgType.KEEPALIVE_CMPLT, KEEPALIVE_CMPLT_SIZE, req_id, 0)
            )
        if msg_type == MsgType.RESET:
            self.packet_filter = 0
            self.multicast = ()
            reply = struct.pack("<IIII", MsgType.RESET_CMPLT, RESET_CMPLT_SIZE, Status.SUCCESS, 0)
            return ControlResult(reply, ResetDone())
        if msg_type == MsgType.HALT:
            self.state = State.HALTED
            self.packet_filter = 0
            return ControlResult(None, Halted())
        raise RndisError(f"RNDIS message type {msg_type:#x} from the guest")

    def _initialize(self, data: bytes, req_id: int) -> ControlResult:
        fail = self.init_cmplt(req_id, Status.FAILURE)
        if len(data) < INITIALIZE_SIZE:
            raise RndisError(f"INITIALIZE of {len(data)} bytes", reply=fail)
        if self.state is State.INITIALIZED:
            raise RndisError("second INITIALIZE", status=Status.FAILURE, reply=fail)
        major, _minor, _max_xfer = struct.unpack_from("<III", data, 12)
        if major != RNDIS_MAJOR:
            bad = self.init_cmplt(req_id, Status.BAD_VERSION)
            raise RndisError(f"RNDIS version {major}", status=Status.BAD_VERSION, reply=bad)
        self.state = State.INITIALIZED
        return ControlResult(self.init_cmplt(req_id, Status.SUCCESS))

    def init_cmplt(self, req_id: int, status: int) -> bytes:
        return struct.pack(
            "<13I",
            MsgType.INITIALIZE_CMPLT,
            INITIALIZE_CMPLT_SIZE,
            req_id,
            status,
            RNDIS_MAJOR,
            RNDIS_MINOR,
            DF_CONNECTIONLESS,
            MEDIUM_802_3,
            self.max_pkt_per_msg,
            MAX_XFER_SIZE,
            PKT_ALIGNMENT_FACTOR,
            0,
            0,
        )

    @staticmethod
    def _info(data: bytes, what: str, fail: bytes) -> tuple[int, bytes]:
        """(oid, information buffer) of a QUERY or SET, bounded by the message."""
        if len(data) < QUERY_SIZE:
            raise RndisError(
                f"{what} of {len(data)} bytes", status=Status.INVALID_LENGTH, reply=fail
            )
        oid, buflen, offset, vc = struct.unpack_from("<IIII", data, 12)
        body = len(data) - RNDIS_HEADER_SIZE
        if buflen == 0:
            return oid, b""
        if offset < QUERY_SIZE - RNDIS_HEADER_SIZE or offset > body or buflen > body - offset:
            raise RndisError(
                f"{what} OID {oid:#x} info {offset}+{buflen} outside {body} bytes",
                status=Status.INVALID_LENGTH,
                reply=fail,
            )
        if vc:
            raise RndisError(f"{what} with VC handle {vc}", reply=fail)
        start = RNDIS_HEADER_SIZE + offset
        return oid, data[start : start + buflen]

    # -- QUERY --

    def _query(self, data: bytes, req_id: int) -> ControlResult:
        oid, info = self._info(data, "QUERY", query_cmplt(req_id, Status.INVALID_LENGTH))
        answer = self.query(oid, info)
        if answer is None:
            return ControlResult(query_cmplt(req_id, Status.NOT_SUPPORTED))
        return ControlResult(query_cmplt(req_id, Status.SUCCESS, answer))

    def supported_oids(self) -> list[int]:
        return sorted(set(self._query_oids()) | set(_SET_OIDS))

    @staticmethod
    def _query_oids() -> tuple[int, ...]:
        return _QUERY_OIDS

    def query(self, oid: int, info: bytes) -> bytes | None:
        """The answer to OID `oid` (None: not supported). `info` is the guest's input
        buffer (an object header for the offload and RSS capability queries)."""
        c = self.config
        frame = c.mtu + ETH_HLEN
        u32: dict[int, int] = {
            Oid.GEN_HARDWARE_STATUS: 0,
            Oid.GEN_MEDIA_SUPPORTED: MEDIUM_802_3,
            Oid.GEN_MEDIA_IN_USE: MEDIUM_802_3,
            Oid.GEN_PHYSICAL_MEDIUM: 0,
            Oid.GEN_MAXIMUM_LOOKAHEAD: c.mtu,
            Oid.GEN_CURRENT_LOOKAHEAD: c.mtu,
            Oid.GEN_MAXIMUM_FRAME_SIZE: c.mtu,
            Oid.GEN_LINK_SPEED: c.link_speed,
            Oid.GEN_TRANSMIT_BUFFER_SPACE: BUFFER_SPACE,
            Oid.GEN_RECEIVE_BUFFER_SPACE: BUFFER_SPACE,
            Oid.GEN_TRANSMIT_BLOCK_SIZE: frame,
            Oid.GEN_RECEIVE_BLOCK_SIZE: frame,
            Oid.GEN_MAXIMUM_TOTAL_SIZE: frame,
            Oid.GEN_VENDOR_ID: VENDOR_ID,
            Oid.GEN_CURRENT_PACKET_FILTER: self.packet_filter,
            Oid.GEN_MAC_OPTIONS: MAC_OPTIONS,
            Oid.GEN_MEDIA_CONNECT_STATUS: 0 if c.connected else 1,
            Oid.GEN_MAXIMUM_SEND_PACKETS: self.max_pkt_per_msg,
            Oid.GEN_XMIT_OK: self.counters.xmit_ok & 0xFFFFFFFF,
            Oid.GEN_RCV_OK: self.counters.rcv_ok & 0xFFFFFFFF,
            Oid.GEN_XMIT_ERROR: self.counters.xmit_error & 0xFFFFFFFF,
            Oid.GEN_RCV_ERROR: self.counters.rcv_error & 0xFFFFFFFF,
            Oid.GEN_RCV_NO_BUFFER: self.counters.rcv_no_buffer & 0xFFFFFFFF,
            Oid.E802_3_MAXIMUM_LIST_SIZE: MAX_MULTICAST,
            Oid.E802_3_MAC_OPTIONS: 0,
        }
        if oid in u32:
            return _U32.pack(u32[oid])
        if oid == Oid.GEN_SUPPORTED_LIST:
            oids = self.supported_oids()
            return struct.pack(f"<{len(oids)}I", *oids)
        if oid == Oid.GEN_VENDOR_DESCRIPTION:
            return VENDOR_DESCRIPTION
        if oid == Oid.GEN_DRIVER_VERSION:
            return struct.pack("<H", DRIVER_VERSION)
        if oid == Oid.GEN_MAX_LINK_SPEED:
            bps = c.link_speed * 100
            return struct.pack("<QQ", bps, bps)
        if oid == Oid.GEN_FRIENDLY_NAME:
            return (FRIENDLY_NAME + "\0").encode("utf-16-le")
        if oid == Oid.E802_3_PERMANENT_ADDRESS:
            return c.mac
        if oid == Oid.E802_3_CURRENT_ADDRESS:
            return self.current_mac
        if oid == Oid.E802_3_MULTICAST_LIST:
            return b"".join(self.multicast)
        if oid in (Oid.TCP_OFFLOAD_HARDWARE_CAPABILITIES, Oid.TCP_OFFLOAD_CURRENT_CONFIG):
            return self.offload_capabilities(_requested_revision(info))
        if oid == Oid.GEN_RECEIVE_SCALE_CAPABILITIES:
            return self.rss_capabilities()
        return None

    def offload_capabilities(self, revision: int) -> bytes:
        """NDIS_OFFLOAD at `revision` (1: 112, 2: 144, 3: 156 bytes)."""
        size = NDIS_OFFLOAD_SIZES[revision]
        c = self.config
        out = bytearray(NDIS_OFFLOAD_SIZE)
        struct.pack_into("<BBH", out, 0, NDIS_OBJECT_TYPE_OFFLOAD, revision, size)
        tx4 = CSUM_IP4_OPTIONS | CSUM_TCP_OPTIONS | CSUM_TCP | CSUM_UDP if c.tx_checksum else 0
        tx6 = CSUM_IP6_EXT_HEADERS | CSUM_TCP_OPTIONS | CSUM_TCP | CSUM_UDP if c.tx_checksum else 0
        rx4 = CSUM_IP4_OPTIONS | CSUM_TCP_OPTIONS | CSUM_TCP | CSUM_UDP | CSUM_IP4_HEADER
        rx6 = CSUM_IP6_EXT_HEADERS | CSUM_TCP_OPTIONS | CSUM_TCP | CSUM_UDP
        struct.pack_into(
            "<8I", out, 4, ENCAP_802_3, tx4, ENCAP_802_3, rx4, ENCAP_802_3, tx6, ENCAP_802_3, rx6
        )
        if c.lso:
            struct.pack_into(
                "<7I",
                out,
                80,
                ENCAP_802_3,
                LSO_MAX_SIZE,
                LSO_MIN_SEGMENTS,
                ENCAP_802_3,
                LSO_MAX_SIZE,
                LSO_MIN_SEGMENTS,
                LSO_IP6_EXT_HEADERS | LSO_TCP_OPTIONS,
            )
        return bytes(out[:size])

    def rss_capabilities(self) -> bytes:
        """NDIS_RECEIVE_SCALE_CAPABILITIES, 18 bytes packed (rev 2)."""
        flags = RSS_CAP_TOEPLITZ | RSS_CAP_TCP_IPV4 | RSS_CAP_TCP_IPV6
        return struct.pack(
            "<BBHIIIH",
            NDIS_OBJECT_TYPE_RSS_CAPABILITIES,
            RSS_CAPS_REVISION,
            RSS_CAPS_SIZE,
            flags,
            1,
            self.config.max_queues,
            ITAB_NUM,
        )

    # -- SET --

    def _set(self, data: bytes, req_id: int) -> ControlResult:
        oid, info = self._info(data, "SET", set_cmplt(req_id, Status.INVALID_LENGTH))
        handler = _SET_OIDS.get(oid)
        if handler is None:
            return ControlResult(set_cmplt(req_id, Status.NOT_SUPPORTED))
        try:
            event = handler(self, info)
        except RndisError as exc:
            raise RndisError(
                exc.reason,
                status=exc.status or Status.INVALID_DATA,
                reply=set_cmplt(req_id, exc.status or Status.INVALID_DATA),
            ) from None
        if isinstance(event, Status):
            return ControlResult(set_cmplt(req_id, event))
        return ControlResult(set_cmplt(req_id, Status.SUCCESS), event)

    def _set_packet_filter(self, info: bytes) -> ControlEvent:
        if len(info) != 4:
            raise RndisError(f"packet filter of {len(info)} bytes", status=Status.INVALID_LENGTH)
        (value,) = _U32.unpack(info)
        if value & ~FILTER_KNOWN:
            raise RndisError(f"packet filter {value:#x}")
        self.packet_filter = value
        return PacketFilterChanged(value)

    def _set_multicast(self, info: bytes) -> ControlEvent:
        if len(info) % ETH_ALEN:
            raise RndisError(f"multicast list of {len(info)} bytes", status=Status.INVALID_LENGTH)
        if len(info) // ETH_ALEN > MAX_MULTICAST:
            raise RndisError("multicast list too long", status=Status.MULTICAST_FULL)
        macs = tuple(info[i : i + ETH_ALEN] for i in range(0, len(info), ETH_ALEN))
        if any(not m[0] & 1 for m in macs):
            raise RndisError("a unicast address in the multicast list")
        self.multicast = macs
        return MulticastListChanged(macs)

    def _set_lookahead(self, info: bytes) -> ControlEvent | Status:
        if len(info) != 4:
            raise RndisError(f"lookahead of {len(info)} bytes", status=Status.INVALID_LENGTH)
        return Status.SUCCESS

    def _set_ignored(self, info: bytes) -> ControlEvent | Status:
        """Accepted and without effect (network-layer addresses, machine name)."""
        return Status.SUCCESS

    def _set_offload(self, info: bytes) -> ControlEvent:
        if len(info) < OFFLOAD_PARAMS_MIN_SIZE:
            raise RndisError(
                f"offload parameters of {len(info)} bytes", status=Status.INVALID_LENGTH
            )
        obj_type, rev, size = struct.unpack_from("<BBH", info)
        if obj_type != NDIS_OBJECT_TYPE_DEFAULT or rev < 1:
            raise RndisError(f"offload parameters object {obj_type:#x} rev {rev}")
        if not OFFLOAD_PARAMS_MIN_SIZE <= size <= len(info):
            raise RndisError(
                f"offload parameters size {size} of {len(info)}", status=Status.INVALID_LENGTH
            )
        values = info[4 : min(size, OFFLOAD_PARAMS_MAX_SIZE)]
        csum, lso = (
            values[0:5],
            values[5:9],
        )  # ip4, tcp4, udp4, tcp6, udp6 / lsov1, ipsec, lso4, lso6
        if any(v > 4 for v in csum) or any(v > 2 for v in lso[2:4]):
            raise RndisError(f"offload parameter values {values.hex()}")
        if lso[0] == 2:
            raise RndisError("LSOv1 asked for", status=Status.NOT_SUPPORTED)
        params = OffloadParams(bytes(values))
        self.offload_params = params
        return params

    def _set_rss(self, info: bytes) -> ControlEvent:
        if len(info) < RSS_PARAMS_SIZE:
            raise RndisError(f"RSS parameters of {len(info)} bytes", status=Status.INVALID_LENGTH)
        flags, _cpu, hash_info, tab_size, tab_off, key_size, key_off = struct.unpack_from(
            "<HHIH2xIH2xI", info, 4
        )
        if flags & RSS_FLAG_DISABLE or hash_info & 0xFF == 0:
            self.rss = RssParams(False, 0, b"", ())
            return self.rss
        old = self.rss
        key = old.key if old is not None else b""
        table = old.table if old is not None else ()
        if not flags & RSS_FLAG_HASH_KEY_UNCHANGED:
            if key_size != RSS_KEY_SIZE or key_off > len(info) or key_size > len(info) - key_off:
                raise RndisError(f"RSS key {key_off}+{key_size} in {len(info)} bytes")
            key = info[key_off : key_off + key_size]
        if not flags & RSS_FLAG_ITABLE_UNCHANGED:
            if tab_size == 0 or tab_size % 4 or tab_size // 4 > ITAB_NUM_MAX:
                raise RndisError(f"RSS table of {tab_size} bytes")
            if tab_off > len(info) or tab_size > len(info) - tab_off:
                raise RndisError(f"RSS table {tab_off}+{tab_size} in {len(info)} bytes")
            table = struct.unpack_from(f"<{tab_size // 4}I", info, tab_off)
            bad = [q for q in table if q >= self.queues]
            if bad:
                raise RndisError(f"RSS table names queue {bad[0]} of {self.queues}")
        if flags & RSS_FLAG_HASH_INFO_UNCHANGED and old is not None:
            hash_info = old.hash_info
        if hash_info & 0xFF != HASH_FUNC_TOEPLITZ:
            raise RndisError(f"RSS hash function {hash_info & 0xFF}")
        if len(key) != RSS_KEY_SIZE or not table:
            raise RndisError("RSS enabled without a key or table")
        self.rss = RssParams(True, hash_info, bytes(key), tuple(table))
        return self.rss

    def _set_config_parameter(self, info: bytes) -> ControlEvent | Status:
        if len(info) < CONFIG_PARAM_SIZE:
            raise RndisError(f"config parameter of {len(info)} bytes", status=Status.INVALID_LENGTH)
        n_off, n_len, p_type, v_off, v_len = struct.unpack_from("<5I", info)
        for off, ln, what in ((n_off, n_len, "name"), (v_off, v_len, "value")):
            if ln > MAX_CONFIG_STRING or ln % 2 or off > len(info) or ln > len(info) - off:
                raise RndisError(f"config parameter {what} {off}+{ln} in {len(info)} bytes")
        try:
            name = info[n_off : n_off + n_len].decode("utf-16-le")
            value = info[v_off : v_off + v_len].decode("utf-16-le")
        except UnicodeDecodeError:
            raise RndisError("config parameter is not UTF-16") from None
        if name != NETWORK_ADDRESS:
            return Status.SUCCESS  # Windows' offload keywords etc.: accepted, no effect
        if p_type != CONFIG_PARAM_TYPE_STRING or len(value) != 2 * ETH_ALEN:
            raise RndisError(f"NetworkAddress {value!r}")
        try:
            mac = bytes.fromhex(value)
        except ValueError:
            raise RndisError(f"NetworkAddress {value!r}") from None
        if mac[0] & 1 or mac == bytes(ETH_ALEN):
            raise RndisError(f"NetworkAddress {value!r} is not a unicast address")
        if not self.config.allow_mac_change:
            return Status.FAILURE
        self.current_mac = mac
        return MacChangeRequested(mac)


def _requested_revision(info: bytes) -> int:
    """The NDIS_OFFLOAD revision a capabilities query asks for in its input header
    (Linux: 3 with NVSP >= 5, 2 with 4, 1 below); 3 when there is none."""
    if len(info) >= 4 and info[0] == NDIS_OBJECT_TYPE_OFFLOAD and info[1] in NDIS_OFFLOAD_SIZES:
        return info[1]
    return 3


_QUERY_OIDS: Final[tuple[int, ...]] = (
    Oid.GEN_SUPPORTED_LIST,
    Oid.GEN_HARDWARE_STATUS,
    Oid.GEN_MEDIA_SUPPORTED,
    Oid.GEN_MEDIA_IN_USE,
    Oid.GEN_MAXIMUM_LOOKAHEAD,
    Oid.GEN_MAXIMUM_FRAME_SIZE,
    Oid.GEN_LINK_SPEED,
    Oid.GEN_TRANSMIT_BUFFER_SPACE,
    Oid.GEN_RECEIVE_BUFFER_SPACE,
    Oid.GEN_TRANSMIT_BLOCK_SIZE,
    Oid.GEN_RECEIVE_BLOCK_SIZE,
    Oid.GEN_VENDOR_ID,
    Oid.GEN_VENDOR_DESCRIPTION,
    Oid.GEN_CURRENT_PACKET_FILTER,
    Oid.GEN_CURRENT_LOOKAHEAD,
    Oid.GEN_DRIVER_VERSION,
    Oid.GEN_MAXIMUM_TOTAL_SIZE,
    Oid.GEN_MAC_OPTIONS,
    Oid.GEN_MEDIA_CONNECT_STATUS,
    Oid.GEN_MAXIMUM_SEND_PACKETS,
    Oid.GEN_PHYSICAL_MEDIUM,
    Oid.GEN_RECEIVE_SCALE_CAPABILITIES,
    Oid.GEN_MAX_LINK_SPEED,
    Oid.GEN_XMIT_OK,
    Oid.GEN_RCV_OK,
    Oid.GEN_XMIT_ERROR,
    Oid.GEN_RCV_ERROR,
    Oid.GEN_RCV_NO_BUFFER,
    Oid.GEN_FRIENDLY_NAME,
    Oid.E802_3_PERMANENT_ADDRESS,
    Oid.E802_3_CURRENT_ADDRESS,
    Oid.E802_3_MULTICAST_LIST,
    Oid.E802_3_MAXIMUM_LIST_SIZE,
    Oid.E802_3_MAC_OPTIONS,
    Oid.TCP_OFFLOAD_CURRENT_CONFIG,
    Oid.TCP_OFFLOAD_HARDWARE_CAPABILITIES,
)

_SET_OIDS: Final[dict[int, Callable[[RndisDevice, bytes], ControlEvent | Status]]] = {
    Oid.GEN_CURRENT_PACKET_FILTER: RndisDevice._set_packet_filter,
    Oid.E802_3_MULTICAST_LIST: RndisDevice._set_multicast,
    Oid.GEN_CURRENT_LOOKAHEAD: RndisDevice._set_lookahead,
    Oid.GEN_NETWORK_LAYER_ADDRESSES: RndisDevice._set_ignored,
    Oid.GEN_MACHINE_NAME: RndisDevice._set_ignored,
    Oid.TCP_OFFLOAD_PARAMETERS: RndisDevice._set_offload,
    Oid.GEN_RECEIVE_SCALE_PARAMETERS: RndisDevice._set_rss,
    Oid.GEN_RNDIS_CONFIG_PARAMETER: RndisDevice._set_config_parameter,
}


# --- RSS ------------------------------------------------------------------------------

# Linux's default key (netvsc_hash_key) = the Microsoft RSS verification key.
DEFAULT_RSS_KEY: Final = bytes.fromhex(
    "6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c6a42b73bbeac01fa"
)


def toeplitz_hash(key: bytes, data: bytes) -> int:
    """The Toeplitz hash: for every input bit (MSB first) that is set, XOR in the
    32-bit window of the key starting at that bit. The key must cover the input
    plus 32 bits (40 bytes do for IPv6 with ports: 36 bytes)."""
    if len(key) * 8 < len(data) * 8 + 32:
        raise ValueError(f"a {len(key)}-byte key cannot hash {len(data)} bytes")
    k = int.from_bytes(key, "big")
    klen = len(key) * 8
    result = 0
    for i, byte in enumerate(data):
        for bit in range(8):
            if byte & (0x80 >> bit):
                pos = i * 8 + bit
                result ^= (k >> (klen - 32 - pos)) & 0xFFFFFFFF
    return result


ETH_P_IP: Final = 0x0800
ETH_P_IPV6: Final = 0x86DD
ETH_P_8021Q: Final = 0x8100
IPPROTO_TCP: Final = 6


def rss_input(frame: bytes | memoryview, hash_info: int) -> tuple[bytes, int] | None:
    """What NDIS hashes for a received frame, and the hash type to report: the
    addresses, with the TCP ports when the TCP type is enabled and the packet is
    not a fragment (UDP hashes on addresses: Linux enables no UDP types).
    None: not IP, or a type the guest did not enable, or a truncated header."""
    f = memoryview(frame)
    off = ETH_HLEN
    if len(f) < off:
        return None
    (proto,) = struct.unpack_from(">H", f, 12)
    if proto == ETH_P_8021Q and len(f) >= off + 4:
        (proto,) = struct.unpack_from(">H", f, 16)
        off += 4
    if proto == ETH_P_IP and len(f) >= off + 20:
        ihl = (f[off] & 0xF) * 4
        (frag,) = struct.unpack_from(">H", f, off + 6)
        addrs = bytes(f[off + 12 : off + 20])
        l4 = off + ihl
        tcp_ok = f[off + 9] == IPPROTO_TCP and not frag & 0x3FFF and len(f) >= l4 + 4
        if ihl >= 20 and tcp_ok and hash_info & HASH_TCP_IPV4:
            return addrs + bytes(f[l4 : l4 + 4]), HASH_TCP_IPV4
        if hash_info & HASH_IPV4:
            return addrs, HASH_IPV4
        return None
    if proto == ETH_P_IPV6 and len(f) >= off + 40:
        addrs = bytes(f[off + 8 : off + 40])
        l4 = off + 40
        if f[off + 6] == IPPROTO_TCP and len(f) >= l4 + 4 and hash_info & HASH_TCP_IPV6:
            return addrs + bytes(f[l4 : l4 + 4]), HASH_TCP_IPV6
        if hash_info & HASH_IPV6:
            return addrs, HASH_IPV6
    return None


def rss_queue(hash_value: int, table: Sequence[int]) -> int:
    """The queue for a hash: table[hash mod size] (sizes are powers of two in
    practice, so this is the low bits, as NDIS defines it)."""
    if not table:
        return 0
    return table[hash_value % len(table)]
