"""NVSP, the netvsc control protocol on VMBus, sans-IO (h11 style).

`NvspServer` is the host side of one channel: `receive(payload)` takes one NVSP
message (the payload of an inband packet, or the NVSP part of a GPA-direct one) and
returns one event; events that answer carry the reply's bytes, which the VSP sends
as the packet's completion when the guest asked for one. Nothing here does I/O:
mapping a buffer GPADL is the VSP's (`ctx.gpadl`), so SEND_RECV_BUF yields a
`MapReceiveBuffer` event and the VSP hands the mapped size back with
`receive_buffer_mapped` (or `buffer_map_failed`), which returns the answer.

Wire facts are Linux 6.1's (drivers/net/hyperv/hyperv_net.h, netvsc.c) and
../shared/spec/netvsc.md §2-5, §9, §14. Every message Linux sends is a whole
`struct nvsp_message`, 40 bytes (4-byte header + 36-byte union, the largest member
being the v6 PD_API completion), except its receive completions (8 bytes). We accept
any message holding the fields we read and always emit 40-byte messages: Linux
5.11-6.6 silently drops an INIT_COMPLETE shorter than a receive-buffer completion
and then waits forever (spec §14.1).

A guest's mistake raises `NvspError` (a `GuestError`): `status` is the NVSP status,
and `reply` the whole failure answer when the message has one (send it as the
completion); with `reply` None the channel cannot be trusted and is reset.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from vmbus.device import GuestError

# --- versions (hyperv_net.h) -------------------------------------------------------

NVSP_PROTOCOL_VERSION_1: Final = 0x00000002
NVSP_PROTOCOL_VERSION_2: Final = 0x00030002
NVSP_PROTOCOL_VERSION_4: Final = 0x00040000
NVSP_PROTOCOL_VERSION_5: Final = 0x00050000
NVSP_PROTOCOL_VERSION_6: Final = 0x00060000
NVSP_PROTOCOL_VERSION_61: Final = 0x00060001
NVSP_INVALID_PROTOCOL_VERSION: Final = 0xFFFFFFFF

# What we accept. Linux 6.1 proposes 6.1, 6, 5, 4, 2, 1 (min = max, newest first,
# netvsc_connect_vsp); we answer everything from 2 up, so it settles on 6.1.
SUPPORTED_VERSIONS: Final = frozenset(
    {
        NVSP_PROTOCOL_VERSION_2,
        NVSP_PROTOCOL_VERSION_4,
        NVSP_PROTOCOL_VERSION_5,
        NVSP_PROTOCOL_VERSION_6,
        NVSP_PROTOCOL_VERSION_61,
    }
)

# NDIS versions Linux announces: 6.1 up to NVSP 4, 6.30 from NVSP 5.
NDIS_VERSION_6_1: Final = (6, 1)
NDIS_VERSION_6_30: Final = (6, 30)

# --- message types -------------------------------------------------------------------


class Msg(enum.IntEnum):
    """NVSP message types (hyperv_net.h's enum; spec §3)."""

    NONE = 0
    INIT = 1
    INIT_COMPLETE = 2
    SEND_NDIS_VER = 100
    SEND_RECV_BUF = 101
    SEND_RECV_BUF_COMPLETE = 102
    REVOKE_RECV_BUF = 103
    SEND_SEND_BUF = 104
    SEND_SEND_BUF_COMPLETE = 105
    REVOKE_SEND_BUF = 106
    SEND_RNDIS_PKT = 107
    SEND_RNDIS_PKT_COMPLETE = 108
    SEND_NDIS_CONFIG = 125
    SEND_VF_ASSOCIATION = 128
    SWITCH_DATA_PATH = 129
    UPLINK_CONNECT_STATE_DEPRECATED = 130
    OID_QUERY_EX = 131
    OID_QUERY_EX_COMP = 132
    SUBCHANNEL = 133
    SEND_INDIRECTION_TABLE = 134


class Status(enum.IntEnum):
    """NVSP status codes; guests test `== SUCCESS`."""

    NONE = 0
    SUCCESS = 1
    FAIL = 2
    PROTOCOL_TOO_NEW = 3
    PROTOCOL_TOO_OLD = 4
    INVALID_RNDIS_PKT = 5
    BUSY = 6
    PROTOCOL_UNSUPPORTED = 7


# The highest message type each version defines (OpenVMM protocol.rs; spec §3).
_MAX_MSG_FOR_VERSION: Final = {
    NVSP_PROTOCOL_VERSION_1: 108,
    NVSP_PROTOCOL_VERSION_2: 127,
    NVSP_PROTOCOL_VERSION_4: 130,
    NVSP_PROTOCOL_VERSION_5: 134,
    NVSP_PROTOCOL_VERSION_6: 136,
    NVSP_PROTOCOL_VERSION_61: 136,
}

# --- sizes and bounds ----------------------------------------------------------------

NVSP_HEADER_SIZE: Final = 4
NVSP_MESSAGE_SIZE: Final = 40  # sizeof(struct nvsp_message) in Linux 6.1; what we emit
NVSP_RECV_COMPLETION_SIZE: Final = 8  # Linux's receive completion: header + status

NETVSC_RECEIVE_BUFFER_ID: Final = 0xCAFE
NETVSC_SEND_BUFFER_ID: Final = 0
NO_SECTION: Final = 0xFFFFFFFF  # SEND_RNDIS_PKT: no send-buffer section (GPA direct)

CHANNEL_TYPE_DATA: Final = 0  # RMC_DATA
CHANNEL_TYPE_CONTROL: Final = 1  # RMC_CONTROL

PAGE_SIZE: Final = 4096
MAX_RECV_BUFFER: Final = 31 * 1024 * 1024  # NETVSC_RECEIVE_BUFFER_SIZE, Linux's max
MAX_RECV_BUFFER_LEGACY: Final = 15 * 1024 * 1024  # NVSP <= 2
MAX_SEND_BUFFER: Final = 15 * 1024 * 1024  # NETVSC_SEND_BUFFER_SIZE
SEND_SECTION_SIZE: Final = 6144  # what we answer SEND_SEND_BUF with (as OpenVMM)
MIN_SECTION_SIZE: Final = 68  # ETH_MIN_MTU: Linux refuses smaller sections
MIN_RECV_SECTIONS: Final = 16  # fewer cannot hold control replies beside traffic
MIN_SEND_SECTIONS: Final = 1

# The receive sub-allocation: room for the RNDIS header and every PPI we send, the
# frame (MTU incl. Ethernet header), and 36 bytes newer Windows netvsc cannot use
# (OpenVMM buffers.rs), rounded to 8 so each section starts aligned.
RX_HEADER_ROOM: Final = 256
RX_TAIL_SLACK: Final = 36

# NDIS_CONFIG mtu includes the 14-byte Ethernet header; a value outside these bounds
# is replaced by the default, as vmswitch and OpenVMM do.
ETH_HLEN: Final = 14
NDIS_MTU_MIN: Final = 68 + ETH_HLEN
NDIS_MTU_MAX: Final = 9216
NDIS_MTU_DEFAULT: Final = 1500 + ETH_HLEN

# NDIS_CONFIG capability bits (struct ndis_config capability).
CAP_VMQ: Final = 0x01
CAP_CHIMNEY: Final = 0x02
CAP_SRIOV: Final = 0x04
CAP_IEEE8021Q: Final = 0x08
CAP_CORRELATION_ID: Final = 0x10
CAP_TEAMING: Final = 0x20
CAP_VIRTUAL_SUBNET_ID: Final = 0x40
CAP_RSC: Final = 0x80

SUBCHANNEL_ALLOCATE: Final = 1
MAX_SUBCHANNELS: Final = 63  # VRSS_CHANNEL_MAX (64) minus the primary
VRSS_SEND_TAB_SIZE: Final = 16
SEND_TABLE_OFFSET: Final = NVSP_MESSAGE_SIZE  # Linux forces 40 for NVSP <= 6 (§9)

DATAPATH_SYNTHETIC: Final = 0
DATAPATH_VF: Final = 1

_U32 = struct.Struct("<I")
_HDR_STATUS = struct.Struct("<II")


def _pad(msg: bytes) -> bytes:
    """Pad a host message to a whole nvsp_message (spec §14.1: a must)."""
    return msg.ljust(NVSP_MESSAGE_SIZE, b"\0")


class NvspError(GuestError):
    """The guest broke NVSP. `reply` is the failure answer to send, if any."""

    def __init__(self, reason: str, *, status: int = Status.FAIL, reply: bytes | None = None):
        super().__init__(reason, status=status)
        self.reply = reply


# --- events --------------------------------------------------------------------------


@dataclass(frozen=True)
class Initialized:
    """INIT answered: `version` is the negotiated NVSP version, or None when the
    proposal was refused (Linux then tries the next older one)."""

    version: int | None
    reply: bytes


@dataclass(frozen=True)
class NdisVersion:
    major: int
    minor: int


@dataclass(frozen=True)
class NdisConfig:
    """The guest's MTU (with the Ethernet header; replaced by the default when out of
    bounds) and capability bits. `reply` is b"" (an empty completion) — only sent
    if the guest asked, as the UEFI client does."""

    mtu: int
    capabilities: int
    reply: bytes = b""


@dataclass(frozen=True)
class MapReceiveBuffer:
    """Map GPADL `gpadl_handle` as the receive buffer, then call
    `receive_buffer_mapped(size)` or `buffer_map_failed(...)` for the answer."""

    gpadl_handle: int
    buffer_id: int


@dataclass(frozen=True)
class MapSendBuffer:
    """Map GPADL `gpadl_handle` as the send buffer, then `send_buffer_mapped(size)`."""

    gpadl_handle: int
    buffer_id: int


@dataclass(frozen=True)
class RevokeReceiveBuffer:
    buffer_id: int


@dataclass(frozen=True)
class RevokeSendBuffer:
    buffer_id: int


@dataclass(frozen=True)
class RndisPacket:
    """SEND_RNDIS_PKT: the RNDIS bytes are send-buffer bytes [offset, offset+length)
    (when `section` is not None) followed by the packet's GPA ranges, if any.
    Answer with `rndis_complete(status)`."""

    channel_type: int
    section: int | None
    offset: int
    length: int


@dataclass(frozen=True)
class AllocateSubchannels:
    """SUBCHANNEL ALLOCATE: `granted` = min(requested, our max). Make them exist
    (ctx.enable_subchannels), then answer with `subchannels_allocated(n)`."""

    requested: int
    granted: int


@dataclass(frozen=True)
class SwitchDataPath:
    """The guest asks for the VF (or synthetic) data path. We have no VF: the data
    path stays synthetic; `reply` is the empty completion Linux accepts."""

    to_vf: bool
    reply: bytes = b""


@dataclass(frozen=True)
class OidQueryEx:
    oid: int
    reply: bytes


NvspEvent = (
    Initialized
    | NdisVersion
    | NdisConfig
    | MapReceiveBuffer
    | MapSendBuffer
    | RevokeReceiveBuffer
    | RevokeSendBuffer
    | RndisPacket
    | AllocateSubchannels
    | SwitchDataPath
    | OidQueryEx
)


@dataclass(frozen=True)
class ReceiveLayout:
    """The receive buffer as we cut it: `count` sections of `section_size` bytes."""

    buffer_id: int
    size: int
    section_size: int
    count: int


@dataclass(frozen=True)
class SendLayout:
    buffer_id: int
    size: int
    section_size: int
    count: int


class Phase(enum.Enum):
    AWAIT_INIT = "await-init"
    NEGOTIATED = "negotiated"  # INIT done; collecting NDIS version/config and buffers
    READY = "ready"  # the receive buffer is set: RNDIS may flow
    REVOKED = "revoked"  # the guest revoked a buffer: teardown, nothing more flows


# --- builders (host -> guest) --------------------------------------------------------


def init_complete(status: int, *, version: int | None = None) -> bytes:
    """INIT_COMPLETE {negotiated version (deprecated), max MDL chain length, status}."""
    field = NVSP_INVALID_PROTOCOL_VERSION if version is None else version
    return _pad(struct.pack("<IIII", Msg.INIT_COMPLETE, field, MAX_MDL_CHAIN_LEN, status))


MAX_MDL_CHAIN_LEN: Final = 34  # what vmswitch/OpenVMM answer; Linux ignores it


def recv_buf_complete(status: int, layout: ReceiveLayout | None = None) -> bytes:
    """SEND_RECV_BUF_COMPLETE: one section at offset 0 covering the whole buffer
    (Linux refuses anything else, netvsc_init_buf)."""
    if layout is None or status != Status.SUCCESS:
        return _pad(struct.pack("<III", Msg.SEND_RECV_BUF_COMPLETE, status, 0))
    end = layout.section_size * layout.count
    return _pad(
        struct.pack(
            "<IIIIIII",
            Msg.SEND_RECV_BUF_COMPLETE,
            status,
            1,
            0,
            layout.section_size,
            layout.count,
            end,
        )
    )


def send_buf_complete(status: int, section_size: int = 0) -> bytes:
    return _pad(struct.pack("<III", Msg.SEND_SEND_BUF_COMPLETE, status, section_size))


def rndis_pkt_complete(status: int) -> bytes:
    """SEND_RNDIS_PKT_COMPLETE, the answer to a guest's SEND_RNDIS_PKT."""
    return _pad(_HDR_STATUS.pack(Msg.SEND_RNDIS_PKT_COMPLETE, status))


def rndis_pkt(channel_type: int) -> bytes:
    """SEND_RNDIS_PKT host -> guest: the body of a transfer-page packet whose ranges
    are receive-buffer sections (no send-buffer section: index 0xFFFFFFFF, size 0)."""
    return _pad(struct.pack("<IIII", Msg.SEND_RNDIS_PKT, channel_type, NO_SECTION, 0))


def subchannel_complete(status: int, granted: int) -> bytes:
    return _pad(struct.pack("<III", Msg.SUBCHANNEL, status, granted))


def oid_query_ex_complete(status: int) -> bytes:
    return _pad(struct.pack("<III", Msg.OID_QUERY_EX_COMP, status, 0))


def send_indirection_table(queues: int) -> bytes:
    """SEND_INDIRECTION_TABLE (host -> guest, inband, no completion): which channel
    the guest transmits on for each of 16 hash buckets, entries i mod queues. The
    table sits after a whole nvsp_message (offset 40, 104 bytes), which is where
    Linux looks for it with NVSP <= 6 whatever the offset says (spec §9)."""
    if not 1 <= queues <= MAX_SUBCHANNELS + 1:
        raise ValueError(f"{queues} queues: 1..{MAX_SUBCHANNELS + 1}")
    head = _pad(
        struct.pack("<III", Msg.SEND_INDIRECTION_TABLE, VRSS_SEND_TAB_SIZE, SEND_TABLE_OFFSET)
    )
    table = struct.pack(f"<{VRSS_SEND_TAB_SIZE}I", *(i % queues for i in range(VRSS_SEND_TAB_SIZE)))
    return head + table


def parse_rndis_pkt_complete(payload: bytes | memoryview) -> int:
    """The guest's completion of one of our transfer-page packets: its status.
    Linux sends 8 bytes, DPDK 40; payloads arrive padded to 8."""
    if len(payload) < NVSP_RECV_COMPLETION_SIZE:
        raise NvspError(f"receive completion of {len(payload)} bytes")
    msg_type, status = _HDR_STATUS.unpack_from(payload)
    if msg_type != Msg.SEND_RNDIS_PKT_COMPLETE:
        raise NvspError(f"receive completion of NVSP type {msg_type}")
    return int(status)


# --- the state machine ---------------------------------------------------------------


def receive_section_size(mtu: int) -> int:
    """The receive sub-allocation for a guest MTU (with Ethernet header)."""
    return (RX_HEADER_ROOM + mtu + RX_TAIL_SLACK + 7) & ~7


class NvspServer:
    """The host side of NVSP on one channel (primary, or a sub-channel made by
    `for_subchannel`). Feed it each guest message with `receive`."""

    def __init__(
        self,
        *,
        versions: frozenset[int] = SUPPORTED_VERSIONS,
        max_subchannels: int = 0,
        primary: bool = True,
    ) -> None:
        if not 0 <= max_subchannels <= MAX_SUBCHANNELS:
            raise ValueError(f"max_subchannels {max_subchannels}: 0..{MAX_SUBCHANNELS}")
        if not versions <= set(_MAX_MSG_FOR_VERSION):
            raise ValueError(
                f"unknown NVSP versions {sorted(versions - set(_MAX_MSG_FOR_VERSION))}"
            )
        self.versions = versions
        self.max_subchannels = max_subchannels
        self.primary = primary
        self.phase = Phase.AWAIT_INIT
        self.version: int | None = None
        self.ndis_version: tuple[int, int] | None = None
        self.mtu = NDIS_MTU_DEFAULT
        self.capabilities = 0
        self._ndis_config_seen = False
        self.receive_layout: ReceiveLayout | None = None
        self.send_layout: SendLayout | None = None
        self.subchannels = 0
        self._pending: MapReceiveBuffer | MapSendBuffer | None = None

    @property
    def ndis_config_seen(self) -> bool:
        """SEND_NDIS_CONFIG came (a restarted vmbusd must know: it comes once)."""
        return self._ndis_config_seen

    @ndis_config_seen.setter
    def ndis_config_seen(self, seen: bool) -> None:
        self._ndis_config_seen = seen

    @classmethod
    def for_subchannel(cls, primary: NvspServer) -> NvspServer:
        """A sub-channel's server: no NVSP init happens there (Linux goes straight to
        RNDIS packets), so it starts READY with the primary's version and buffers."""
        if primary.phase is not Phase.READY:
            raise RuntimeError("sub-channel before the primary is ready")
        sub = cls(versions=primary.versions, primary=False)
        sub.phase = Phase.READY
        sub.version = primary.version
        sub.ndis_version = primary.ndis_version
        sub.mtu = primary.mtu
        sub.capabilities = primary.capabilities
        sub._ndis_config_seen = primary._ndis_config_seen
        sub.receive_layout = primary.receive_layout
        sub.send_layout = primary.send_layout
        return sub

    # -- input --

    def receive(self, data: bytes | memoryview) -> NvspEvent:
        """One guest NVSP message -> one event. Raises NvspError."""
        if self._pending is not None:
            raise RuntimeError("receive() while a buffer mapping is pending (VSP bug)")
        if len(data) < NVSP_HEADER_SIZE:
            raise NvspError(f"NVSP message of {len(data)} bytes")
        msg = bytes(data[:NVSP_MESSAGE_SIZE])  # copy once: nothing we read lies beyond
        (msg_type,) = _U32.unpack_from(msg)
        if msg_type == Msg.INIT:
            return self._init(msg)
        if self.phase is Phase.AWAIT_INIT or self.version is None:
            raise NvspError(f"NVSP message type {msg_type} before INIT")
        if msg_type > _MAX_MSG_FOR_VERSION[self.version]:
            raise NvspError(f"NVSP message type {msg_type} above version {self.version:#x}")
        handler = _HANDLERS.get(msg_type)
        if handler is None:
            raise NvspError(f"NVSP message type {msg_type} not supported")
        return handler(self, msg)

    def _need(self, msg: bytes, size: int, what: str, reply: bytes | None = None) -> None:
        if len(msg) < size:
            raise NvspError(f"{what} of {len(msg)} bytes (needs {size})", reply=reply)

    def _init(self, msg: bytes) -> Initialized:
        refuse = init_complete(Status.FAIL)
        self._need(msg, 12, "INIT", refuse)
        if self.phase is not Phase.AWAIT_INIT:
            raise NvspError("INIT after negotiation", reply=refuse)
        if not self.primary:
            raise NvspError("INIT on a sub-channel", reply=refuse)
        lo, hi = struct.unpack_from("<II", msg, 4)
        # Linux sends min == max; a range is accepted at its newest version we know.
        best = max((v for v in self.versions if lo <= v <= hi), default=None)
        if best is None:
            too = Status.PROTOCOL_TOO_NEW if lo > max(self.versions) else Status.PROTOCOL_TOO_OLD
            return Initialized(None, init_complete(too))
        self.version = best
        self.phase = Phase.NEGOTIATED
        return Initialized(best, init_complete(Status.SUCCESS, version=best))

    def _before_buffers(self, what: str) -> None:
        if self.phase is not Phase.NEGOTIATED or self.receive_layout is not None:
            raise NvspError(f"{what} after the buffers were set")

    def _ndis_ver(self, msg: bytes) -> NdisVersion:
        self._need(msg, 12, "SEND_NDIS_VER")
        self._before_buffers("SEND_NDIS_VER")
        if self.ndis_version is not None:
            raise NvspError("second SEND_NDIS_VER")
        major, minor = struct.unpack_from("<II", msg, 4)
        if major != 6 and major != 5:
            raise NvspError(f"NDIS version {major}.{minor}")
        self.ndis_version = (major, minor)
        return NdisVersion(major, minor)

    def _ndis_config(self, msg: bytes) -> NdisConfig:
        self._need(msg, 20, "SEND_NDIS_CONFIG")
        self._before_buffers("SEND_NDIS_CONFIG")
        if self._ndis_config_seen:
            raise NvspError("second SEND_NDIS_CONFIG")
        mtu, _reserved, caps = struct.unpack_from("<IIQ", msg, 4)
        self._ndis_config_seen = True
        self.mtu = mtu if NDIS_MTU_MIN <= mtu <= NDIS_MTU_MAX else NDIS_MTU_DEFAULT
        self.capabilities = caps
        return NdisConfig(self.mtu, caps)

    def _send_recv_buf(self, msg: bytes) -> MapReceiveBuffer:
        fail = recv_buf_complete(Status.FAIL)
        self._need(msg, 10, "SEND_RECV_BUF", fail)
        if not self.primary:
            raise NvspError("SEND_RECV_BUF on a sub-channel", reply=fail)
        if self.phase is not Phase.NEGOTIATED or self.receive_layout is not None:
            raise NvspError("SEND_RECV_BUF twice or out of order", reply=fail)
        assert self.version is not None
        if self.version >= NVSP_PROTOCOL_VERSION_2 and not self._ndis_config_seen:
            raise NvspError("SEND_RECV_BUF before SEND_NDIS_CONFIG", reply=fail)
        handle, buf_id = struct.unpack_from("<IH", msg, 4)
        ev = MapReceiveBuffer(handle, buf_id)
        self._pending = ev
        return ev

    def _send_send_buf(self, msg: bytes) -> MapSendBuffer:
        fail = send_buf_complete(Status.FAIL)
        self._need(msg, 10, "SEND_SEND_BUF", fail)
        if not self.primary:
            raise NvspError("SEND_SEND_BUF on a sub-channel", reply=fail)
        if self.receive_layout is None or self.send_layout is not None:
            raise NvspError("SEND_SEND_BUF twice or before the receive buffer", reply=fail)
        if self.phase is not Phase.READY:
            raise NvspError("SEND_SEND_BUF after revoke", reply=fail)
        handle, buf_id = struct.unpack_from("<IH", msg, 4)
        ev = MapSendBuffer(handle, buf_id)
        self._pending = ev
        return ev

    # -- the VSP's answers to Map* events --

    def receive_buffer_mapped(self, size: int) -> bytes:
        """The receive buffer GPADL is mapped with `size` bytes: check it, cut it into
        sections and return the SEND_RECV_BUF_COMPLETE answer."""
        ev = self._pending
        if not isinstance(ev, MapReceiveBuffer):
            raise RuntimeError("receive_buffer_mapped without MapReceiveBuffer")
        self._pending = None
        fail = recv_buf_complete(Status.FAIL)
        assert self.version is not None
        cap = MAX_RECV_BUFFER_LEGACY if self.version <= NVSP_PROTOCOL_VERSION_2 else MAX_RECV_BUFFER
        if size % PAGE_SIZE or not 0 < size <= cap:
            raise NvspError(f"receive buffer of {size} bytes (page multiple <= {cap})", reply=fail)
        section = receive_section_size(self.mtu)
        count = size // section
        if count < MIN_RECV_SECTIONS:
            raise NvspError(f"receive buffer of {size} bytes holds {count} sections", reply=fail)
        self.receive_layout = ReceiveLayout(ev.buffer_id, size, section, count)
        self.phase = Phase.READY
        return recv_buf_complete(Status.SUCCESS, self.receive_layout)

    def send_buffer_mapped(self, size: int) -> bytes:
        ev = self._pending
        if not isinstance(ev, MapSendBuffer):
            raise RuntimeError("send_buffer_mapped without MapSendBuffer")
        self._pending = None
        fail = send_buf_complete(Status.FAIL)
        if size % PAGE_SIZE or not 0 < size <= MAX_SEND_BUFFER:
            raise NvspError(f"send buffer of {size} bytes", reply=fail)
        count = size // SEND_SECTION_SIZE
        if count < MIN_SEND_SECTIONS:
            raise NvspError(f"send buffer of {size} bytes holds no section", reply=fail)
        self.send_layout = SendLayout(ev.buffer_id, size, SEND_SECTION_SIZE, count)
        return send_buf_complete(Status.SUCCESS, SEND_SECTION_SIZE)

    def buffer_map_failed(self, reason: str) -> NvspError:
        """The GPADL could not be mapped (unknown handle, ...): the guest's error, with
        the failure answer for whichever buffer it was."""
        ev = self._pending
        self._pending = None
        if isinstance(ev, MapReceiveBuffer):
            return NvspError(f"receive buffer: {reason}", reply=recv_buf_complete(Status.FAIL))
        if isinstance(ev, MapSendBuffer):
            return NvspError(f"send buffer: {reason}", reply=send_buf_complete(Status.FAIL))
        raise RuntimeError("buffer_map_failed without a pending mapping")

    # -- the rest --

    def _revoke_recv(self, msg: bytes) -> RevokeReceiveBuffer:
        self._need(msg, 6, "REVOKE_RECV_BUF")
        (buf_id,) = struct.unpack_from("<H", msg, 4)
        if self.receive_layout is None or buf_id != self.receive_layout.buffer_id:
            raise NvspError(f"REVOKE_RECV_BUF of unknown id {buf_id:#x}")
        self.receive_layout = None
        self.phase = Phase.REVOKED
        return RevokeReceiveBuffer(buf_id)

    def _revoke_send(self, msg: bytes) -> RevokeSendBuffer:
        self._need(msg, 6, "REVOKE_SEND_BUF")
        (buf_id,) = struct.unpack_from("<H", msg, 4)
        if self.send_layout is None or buf_id != self.send_layout.buffer_id:
            raise NvspError(f"REVOKE_SEND_BUF of unknown id {buf_id:#x}")
        self.send_layout = None
        self.phase = Phase.REVOKED
        return RevokeSendBuffer(buf_id)

    def _rndis_pkt(self, msg: bytes) -> RndisPacket:
        fail = rndis_pkt_complete(Status.FAIL)
        self._need(msg, 16, "SEND_RNDIS_PKT", fail)
        if self.phase is not Phase.READY:
            raise NvspError(f"SEND_RNDIS_PKT in phase {self.phase.value}", reply=fail)
        channel_type, index, size = struct.unpack_from("<III", msg, 4)
        if channel_type not in (CHANNEL_TYPE_DATA, CHANNEL_TYPE_CONTROL):
            raise NvspError(f"SEND_RNDIS_PKT channel type {channel_type}", reply=fail)
        if index == NO_SECTION:
            return RndisPacket(channel_type, None, 0, 0)
        layout = self.send_layout
        if layout is None:
            raise NvspError(f"send section {index} without a send buffer", reply=fail)
        if index >= layout.count:
            raise NvspError(f"send section {index} of {layout.count}", reply=fail)
        offset = index * layout.section_size
        # Bounded by the buffer, not the section: Linux packs only within a section,
        # but nothing breaks if a guest spans two (OpenVMM does the same).
        if size == 0 or size > layout.size - offset:
            raise NvspError(f"send section {index}: {size} bytes past the buffer", reply=fail)
        return RndisPacket(channel_type, index, offset, size)

    def rndis_complete(self, status: int = Status.SUCCESS) -> bytes:
        """The completion of a guest's SEND_RNDIS_PKT."""
        return rndis_pkt_complete(status)

    def _subchannel(self, msg: bytes) -> AllocateSubchannels:
        fail = subchannel_complete(Status.FAIL, 0)
        self._need(msg, 12, "SUBCHANNEL", fail)
        if not self.primary:
            raise NvspError("SUBCHANNEL on a sub-channel", reply=fail)
        if self.phase is not Phase.READY:
            raise NvspError(f"SUBCHANNEL in phase {self.phase.value}", reply=fail)
        op, count = struct.unpack_from("<II", msg, 4)
        if op != SUBCHANNEL_ALLOCATE or count == 0:
            raise NvspError(f"SUBCHANNEL op {op} count {count}", reply=fail)
        return AllocateSubchannels(count, min(count, self.max_subchannels))

    def subchannels_allocated(self, granted: int) -> bytes:
        """The SUBCHANNEL answer once `granted` sub-channels exist (never more than
        asked: Linux then falls back to one queue)."""
        if not 0 <= granted <= self.max_subchannels:
            raise ValueError(f"granted {granted} above max {self.max_subchannels}")
        self.subchannels = granted
        return subchannel_complete(Status.SUCCESS, granted)

    def _switch_data_path(self, msg: bytes) -> SwitchDataPath:
        self._need(msg, 8, "SWITCH_DATA_PATH")
        (path,) = struct.unpack_from("<I", msg, 4)
        if path not in (DATAPATH_SYNTHETIC, DATAPATH_VF):
            raise NvspError(f"SWITCH_DATA_PATH to {path}")
        return SwitchDataPath(path == DATAPATH_VF)

    def _oid_query_ex(self, msg: bytes) -> OidQueryEx:
        reply = oid_query_ex_complete(Status.FAIL)
        self._need(msg, 12, "OID_QUERY_EX", reply)
        (oid,) = struct.unpack_from("<I", msg, 8)
        return OidQueryEx(oid, reply)


_HANDLERS: Final[dict[int, Callable[[NvspServer, bytes], NvspEvent]]] = {
    Msg.SEND_NDIS_VER: NvspServer._ndis_ver,
    Msg.SEND_NDIS_CONFIG: NvspServer._ndis_config,
    Msg.SEND_RECV_BUF: NvspServer._send_recv_buf,
    Msg.SEND_SEND_BUF: NvspServer._send_send_buf,
    Msg.REVOKE_RECV_BUF: NvspServer._revoke_recv,
    Msg.REVOKE_SEND_BUF: NvspServer._revoke_send,
    Msg.SEND_RNDIS_PKT: NvspServer._rndis_pkt,
    Msg.SUBCHANNEL: NvspServer._subchannel,
    Msg.SWITCH_DATA_PATH: NvspServer._switch_data_path,
    Msg.OID_QUERY_EX: NvspServer._oid_query_ex,
}
