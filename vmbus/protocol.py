"""VMBus control messages: constants and wire layouts (spec §4), no state, no I/O.

Every message of spec §4.4 is a frozen dataclass with ``encode() -> bytes`` (the
exact size Linux and Hyper-V use) and the module-level :func:`decode` turns one
SynIC payload into the matching dataclass.  ``decode`` is the single gate for
untrusted bytes: it accepts trailing bytes (Linux posts ``sizeof(struct)``, UEFI
posts full 240-byte messages) and raises :class:`ProtocolError` -- and nothing
else -- for anything it cannot parse.  Semantic checks (state, relids, limits)
belong to ``vmbus.bus``; this module only knows shapes.

GUIDs travel in Microsoft mixed-endian form (``uuid.UUID.bytes_le``, spec §7).
Both sides use this module: the host (``vmbus.bus``) and the simulated guest
(``vmbus.guest.client``), so direction is not checked here.
"""

from __future__ import annotations

import array
import struct
import sys
import uuid
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import ClassVar, Self

from vmbus.gpadl import PAGE_SIZE, GpaRange


class ProtocolError(Exception):
    """The peer broke the protocol (h11's RemoteProtocolError): bad bytes or bad state.

    ``reason`` is a human-readable line fit for one log line / violation event.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LocalProtocolError(Exception):
    """We (the caller of this package) misused the API; never caused by the peer."""


# --- transport constants (spec §4.1, §4.2) ---------------------------------------------------

MAX_MESSAGE_SIZE = 240  # HV_MESSAGE_PAYLOAD_BYTE_COUNT: the whole VMBus message, header included
HEADER_SIZE = 8  # vmbus_channel_message_header: msgtype u32, padding u32
VMBUS_MESSAGE_SINT = 2
SYNIC_MESSAGE_TYPE_VMBUS = 1
CONNECTION_ID_MASK = 0x00FFFFFF

CONNECTION_ID_MESSAGE = 1  # VMBUS_MESSAGE_CONNECTION_ID: control messages (< 5.0, and >= 5.0 after)
CONNECTION_ID_EVENT = 2  # VMBUS_EVENT_CONNECTION_ID: shared pre-2.4 interrupt-page signal
CONNECTION_ID_MONITOR = 3  # defined by Linux/QEMU, unused
CONNECTION_ID_MESSAGE_4 = 4  # VMBUS_MESSAGE_CONNECTION_ID_4: INITIATE_CONTACT for >= 5.0

# --- versions (spec §4.5): (major << 16) | minor -------------------------------------------


def make_version(major: int, minor: int) -> int:
    return (major << 16) | minor


VERSION_WS2008 = make_version(0, 13)
VERSION_WIN7 = make_version(1, 1)
VERSION_WIN8 = make_version(2, 4)
VERSION_WIN8_1 = make_version(3, 0)
VERSION_WIN10 = make_version(4, 0)
VERSION_WIN10_V4_1 = make_version(4, 1)
VERSION_WIN10_V5 = make_version(5, 0)
VERSION_WIN10_V5_1 = make_version(5, 1)
VERSION_WIN10_V5_2 = make_version(5, 2)
VERSION_WIN10_V5_3 = make_version(5, 3)
VERSION_COPPER = make_version(6, 0)

ALL_VERSIONS = (
    VERSION_WS2008,
    VERSION_WIN7,
    VERSION_WIN8,
    VERSION_WIN8_1,
    VERSION_WIN10,
    VERSION_WIN10_V4_1,
    VERSION_WIN10_V5,
    VERSION_WIN10_V5_1,
    VERSION_WIN10_V5_2,
    VERSION_WIN10_V5_3,
    VERSION_COPPER,
)

# What a Linux guest tries, newest first (drivers/hv/connection.c vmbus_versions[]).
LINUX_VERSIONS = (
    VERSION_WIN10_V5_3,
    VERSION_WIN10_V5_2,
    VERSION_WIN10_V5_1,
    VERSION_WIN10_V5,
    VERSION_WIN10_V4_1,
    VERSION_WIN10,
    VERSION_WIN8_1,
    VERSION_WIN8,
)


def version_str(version: int) -> str:
    return f"{version >> 16}.{version & 0xFFFF}"


# --- statuses ---------------------------------------------------------------------------------

STATUS_SUCCESS = 0
# What OpenVMM sends for a failed GPADL / open (spec §4.4); Linux only tests "!= 0".
STATUS_UNSUCCESSFUL = 0x8000FFFF
STATUS_CONNECTION_REFUSED = 0xC0000236  # NTSTATUS, for TL_CONNECT_RESULT

CONNECTION_STATE_SUCCESSFUL = 0
CONNECTION_STATE_FAILED_LOW_RESOURCES = 1
CONNECTION_STATE_FAILED_UNKNOWN_FAILURE = 2

# --- offer fields (spec §4.4) -----------------------------------------------------------------

MAX_RELID = 2047  # Linux MAX_CHANNEL_RELIDS = 2048, relid 0 reserved
USER_DEF_SIZE = 120  # MAX_USER_DEFINED_BYTES
MONITOR_ID_NONE = 0xFF  # what OpenVMM sends when no monitor id is assigned
MAX_MONITOR_ID = 127

OFFER_FLAG_ENUMERATE_DEVICE_INTERFACE = 0x1
OFFER_FLAG_NAMED_PIPE_MODE = 0x10
OFFER_FLAG_TLNPI_PROVIDER = 0x2000

# --- GPADL message geometry (Linux create_gpadl_header) ---------------------------------------

GPADL_HEADER_FIXED_SIZE = 20
GPADL_BODY_FIXED_SIZE = 16
GPA_RANGE_HEADER_SIZE = 8
GPADL_HEADER_MAX_PFNS = (MAX_MESSAGE_SIZE - GPADL_HEADER_FIXED_SIZE - GPA_RANGE_HEADER_SIZE) // 8
GPADL_BODY_MAX_PFNS = (MAX_MESSAGE_SIZE - GPADL_BODY_FIXED_SIZE) // 8
MAX_RANGE_BUFLEN = 0xFFFF  # range_buflen is a u16
# One single-range GPADL can describe at most this many pages (u16 range_buflen, derived).
MAX_SINGLE_RANGE_PAGES = (MAX_RANGE_BUFLEN - GPA_RANGE_HEADER_SIZE) // 8
MAX_BYTE_OFFSET = PAGE_SIZE - 1
U32_MAX = 0xFFFFFFFF


class MessageType(IntEnum):
    INVALID = 0
    OFFERCHANNEL = 1
    RESCIND_CHANNELOFFER = 2
    REQUESTOFFERS = 3
    ALLOFFERS_DELIVERED = 4
    OPENCHANNEL = 5
    OPENCHANNEL_RESULT = 6
    CLOSECHANNEL = 7
    GPADL_HEADER = 8
    GPADL_BODY = 9
    GPADL_CREATED = 10
    GPADL_TEARDOWN = 11
    GPADL_TORNDOWN = 12
    RELID_RELEASED = 13
    INITIATE_CONTACT = 14
    VERSION_RESPONSE = 15
    UNLOAD = 16
    UNLOAD_RESPONSE = 17
    OPEN_RESERVED_CHANNEL = 18
    CLOSE_RESERVED_CHANNEL = 19
    CLOSE_RESERVED_RESPONSE = 20
    TL_CONNECT_REQUEST = 21
    MODIFYCHANNEL = 22
    TL_CONNECT_RESULT = 23
    MODIFYCHANNEL_RESPONSE = 24
    MODIFY_CONNECTION = 25
    MODIFY_CONNECTION_RESPONSE = 26
    PAUSE = 27
    PAUSE_RESPONSE = 28
    RESUME = 29


MESSAGE_TYPE_COUNT = 30

# Direction of each type: True = guest -> host.  Messages a guest may post.
GUEST_TO_HOST = frozenset(
    {
        MessageType.REQUESTOFFERS,
        MessageType.OPENCHANNEL,
        MessageType.CLOSECHANNEL,
        MessageType.GPADL_HEADER,
        MessageType.GPADL_BODY,
        MessageType.GPADL_TEARDOWN,
        MessageType.RELID_RELEASED,
        MessageType.INITIATE_CONTACT,
        MessageType.UNLOAD,
        MessageType.OPEN_RESERVED_CHANNEL,
        MessageType.CLOSE_RESERVED_CHANNEL,
        MessageType.TL_CONNECT_REQUEST,
        MessageType.MODIFYCHANNEL,
        MessageType.MODIFY_CONNECTION,
        MessageType.PAUSE,
        MessageType.RESUME,
    }
)

_HEADER = struct.Struct("<II")


def _pack(fmt: struct.Struct, *values: object) -> bytes:
    try:
        return fmt.pack(*values)
    except struct.error as e:
        raise LocalProtocolError(f"cannot encode field: {e}") from None


def _guid(raw: bytes) -> uuid.UUID:
    return uuid.UUID(bytes_le=bytes(raw))


def _fix_bytes(obj: object, name: str, size: int) -> None:
    """Pad an opaque byte field to its wire size (so decode(encode(m)) == m)."""
    value = bytes(getattr(obj, name))
    if len(value) > size:
        raise LocalProtocolError(f"{name} is {len(value)} bytes, at most {size}")
    object.__setattr__(obj, name, value.ljust(size, b"\0"))


@dataclass(frozen=True, slots=True)
class Message:
    """Base: simple messages are a header plus the fixed little-endian fields in ``_BODY``."""

    TYPE: ClassVar[MessageType]
    _BODY: ClassVar[struct.Struct] = struct.Struct("<")

    def encode(self) -> bytes:
        values = [getattr(self, f.name) for f in fields(self)]
        return _pack(_HEADER, self.TYPE, 0) + _pack(self._BODY, *values)

    @classmethod
    def min_size(cls) -> int:
        return HEADER_SIZE + cls._BODY.size

    @classmethod
    def _decode(cls, payload: bytes) -> Self:
        return cls(*cls._BODY.unpack_from(payload, HEADER_SIZE))


@dataclass(frozen=True, slots=True)
class OfferChannel(Message):
    """OFFERCHANNEL (1), 196 bytes: host announces a channel."""

    TYPE = MessageType.OFFERCHANNEL
    _BODY = struct.Struct("<16s16s8s8sHH120sHHIBBHI")

    if_type: uuid.UUID
    if_instance: uuid.UUID
    child_relid: int
    connection_id: int
    sub_channel_index: int = 0
    flags: int = 0
    mmio_megabytes: int = 0
    user_def: bytes = b""
    monitor_id: int = MONITOR_ID_NONE
    monitor_allocated: bool = False
    is_dedicated_interrupt: bool = True
    mmio_megabytes_optional: int = 0

    def __post_init__(self) -> None:
        _fix_bytes(self, "user_def", USER_DEF_SIZE)

    def encode(self) -> bytes:
        return _pack(_HEADER, self.TYPE, 0) + _pack(
            self._BODY,
            self.if_type.bytes_le,
            self.if_instance.bytes_le,
            b"",
            b"",
            self.flags,
            self.mmio_megabytes,
            self.user_def,
            self.sub_channel_index,
            self.mmio_megabytes_optional,
            self.child_relid,
            self.monitor_id,
            1 if self.monitor_allocated else 0,
            1 if self.is_dedicated_interrupt else 0,
            self.connection_id,
        )

    @classmethod
    def _decode(cls, payload: bytes) -> Self:
        (
            if_type,
            if_instance,
            _r1,
            _r2,
            flags,
            mmio,
            user_def,
            sub_index,
            mmio_opt,
            relid,
            monitor_id,
            monitor_flags,
            dedicated,
            conn_id,
        ) = cls._BODY.unpack_from(payload, HEADER_SIZE)
        return cls(
            if_type=_guid(if_type),
            if_instance=_guid(if_instance),
            child_relid=relid,
            connection_id=conn_id,
            sub_channel_index=sub_index,
            flags=flags,
            mmio_megabytes=mmio,
            user_def=user_def,
            monitor_id=monitor_id,
            monitor_allocated=bool(monitor_flags & 1),
            is_dedicated_interrupt=bool(dedicated & 1),
            mmio_megabytes_optional=mmio_opt,
        )


@dataclass(frozen=True, slots=True)
class RescindChannelOffer(Message):
    """RESCIND_CHANNELOFFER (2), 12 bytes."""

    TYPE = MessageType.RESCIND_CHANNELOFFER
    _BODY = struct.Struct("<I")
    child_relid: int


@dataclass(frozen=True, slots=True)
class RequestOffers(Message):
    """REQUESTOFFERS (3), header only."""

    TYPE = MessageType.REQUESTOFFERS


@dataclass(frozen=True, slots=True)
class AllOffersDelivered(Message):
    """ALLOFFERS_DELIVERED (4), header only."""

    TYPE = MessageType.ALLOFFERS_DELIVERED


@dataclass(frozen=True, slots=True)
class OpenChannel(Message):
    """OPENCHANNEL (5), 148 bytes (the 6.0 OpenChannel2 tail is not negotiated, so ignored)."""

    TYPE = MessageType.OPENCHANNEL
    _BODY = struct.Struct("<IIIII120s")
    child_relid: int
    openid: int
    ringbuffer_gpadl: int
    target_vp: int
    downstream_offset: int
    userdata: bytes = b""

    def __post_init__(self) -> None:
        _fix_bytes(self, "userdata", USER_DEF_SIZE)


@dataclass(frozen=True, slots=True)
class OpenChannelResult(Message):
    """OPENCHANNEL_RESULT (6), 20 bytes; status 0 = success."""

    TYPE = MessageType.OPENCHANNEL_RESULT
    _BODY = struct.Struct("<III")
    child_relid: int
    openid: int
    status: int


@dataclass(frozen=True, slots=True)
class CloseChannel(Message):
    """CLOSECHANNEL (7), 12 bytes; no reply."""

    TYPE = MessageType.CLOSECHANNEL
    _BODY = struct.Struct("<I")
    child_relid: int


@dataclass(frozen=True, slots=True)
class GpadlHeader(Message):
    """GPADL_HEADER (8): 20 fixed bytes then the first part of the range buffer.

    ``range_data`` is kept raw: the range buffer spans header and bodies, so it is
    only parsed once assembled (:func:`parse_gpa_ranges`).
    """

    TYPE = MessageType.GPADL_HEADER
    _BODY = struct.Struct("<IIHH")
    child_relid: int
    gpadl: int
    range_buflen: int
    rangecount: int
    range_data: bytes = b""

    def encode(self) -> bytes:
        out = (
            _pack(_HEADER, self.TYPE, 0)
            + _pack(self._BODY, self.child_relid, self.gpadl, self.range_buflen, self.rangecount)
            + bytes(self.range_data)
        )
        if len(out) > MAX_MESSAGE_SIZE:
            raise LocalProtocolError(f"GPADL_HEADER of {len(out)} bytes > {MAX_MESSAGE_SIZE}")
        return out

    @classmethod
    def _decode(cls, payload: bytes) -> Self:
        relid, handle, buflen, count = cls._BODY.unpack_from(payload, HEADER_SIZE)
        return cls(relid, handle, buflen, count, bytes(payload[GPADL_HEADER_FIXED_SIZE:]))


@dataclass(frozen=True, slots=True)
class GpadlBody(Message):
    """GPADL_BODY (9): msgnumber, gpadl, then PFNs (u64) continuing the range buffer."""

    TYPE = MessageType.GPADL_BODY
    _BODY = struct.Struct("<II")
    msgnumber: int
    gpadl: int
    pfns: tuple[int, ...] = ()

    def encode(self) -> bytes:
        if len(self.pfns) > GPADL_BODY_MAX_PFNS:
            raise LocalProtocolError(f"GPADL_BODY with {len(self.pfns)} PFNs")
        return (
            _pack(_HEADER, self.TYPE, 0)
            + _pack(self._BODY, self.msgnumber, self.gpadl)
            + _pack(struct.Struct(f"<{len(self.pfns)}Q"), *self.pfns)
        )

    @classmethod
    def _decode(cls, payload: bytes) -> Self:
        msgnumber, handle = cls._BODY.unpack_from(payload, HEADER_SIZE)
        count = (len(payload) - GPADL_BODY_FIXED_SIZE) // 8  # a partial u64 is ignored
        pfns = struct.unpack_from(f"<{count}Q", payload, GPADL_BODY_FIXED_SIZE)
        return cls(msgnumber, handle, tuple(pfns))


@dataclass(frozen=True, slots=True)
class GpadlCreated(Message):
    """GPADL_CREATED (10), 20 bytes; status 0 = success."""

    TYPE = MessageType.GPADL_CREATED
    _BODY = struct.Struct("<III")
    child_relid: int
    gpadl: int
    status: int


@dataclass(frozen=True, slots=True)
class GpadlTeardown(Message):
    """GPADL_TEARDOWN (11), 16 bytes."""

    TYPE = MessageType.GPADL_TEARDOWN
    _BODY = struct.Struct("<II")
    child_relid: int
    gpadl: int


@dataclass(frozen=True, slots=True)
class GpadlTorndown(Message):
    """GPADL_TORNDOWN (12), 12 bytes: the host no longer references the pages."""

    TYPE = MessageType.GPADL_TORNDOWN
    _BODY = struct.Struct("<I")
    gpadl: int


@dataclass(frozen=True, slots=True)
class RelidReleased(Message):
    """RELID_RELEASED (13), 12 bytes: the guest forgot a rescinded channel."""

    TYPE = MessageType.RELID_RELEASED
    _BODY = struct.Struct("<I")
    child_relid: int


@dataclass(frozen=True, slots=True)
class InitiateContact(Message):
    """INITIATE_CONTACT (14), 40 bytes.

    The u64 at offset 16 is the interrupt page GPA before 5.0, and
    {msg_sint u8, msg_vtl u8, ...; feature_flags u32 at 20 for 6.0} from 5.0 on;
    it is kept raw as ``interrupt_page`` with views below.
    """

    TYPE = MessageType.INITIATE_CONTACT
    _BODY = struct.Struct("<IIQQQ")
    version_requested: int
    target_vcpu: int
    interrupt_page: int = 0
    monitor_page1: int = 0
    monitor_page2: int = 0

    @property
    def msg_sint(self) -> int:
        return self.interrupt_page & 0xFF

    @property
    def msg_vtl(self) -> int:
        return (self.interrupt_page >> 8) & 0xFF

    @property
    def feature_flags(self) -> int:
        return self.interrupt_page >> 32

    @staticmethod
    def sint_field(msg_sint: int, msg_vtl: int = 0, feature_flags: int = 0) -> int:
        """The raw u64 at offset 16 for a >= 5.0 request."""
        return (msg_sint & 0xFF) | ((msg_vtl & 0xFF) << 8) | ((feature_flags & U32_MAX) << 32)


@dataclass(frozen=True, slots=True)
class VersionResponse(Message):
    """VERSION_RESPONSE (15), 16 bytes; 20 with ``supported_features`` (6.0)."""

    TYPE = MessageType.VERSION_RESPONSE
    _BODY = struct.Struct("<BBHI")
    _FEATURES: ClassVar[struct.Struct] = struct.Struct("<I")
    version_supported: int
    connection_state: int = CONNECTION_STATE_SUCCESSFUL
    msg_conn_id: int = 0
    supported_features: int | None = None

    def encode(self) -> bytes:
        out = _pack(_HEADER, self.TYPE, 0) + _pack(
            self._BODY, self.version_supported, self.connection_state, 0, self.msg_conn_id
        )
        if self.supported_features is not None:
            out += _pack(self._FEATURES, self.supported_features)
        return out

    @classmethod
    def _decode(cls, payload: bytes) -> Self:
        supported, state, _pad, conn_id = cls._BODY.unpack_from(payload, HEADER_SIZE)
        features = None
        end = HEADER_SIZE + cls._BODY.size
        if len(payload) >= end + 4:
            (features,) = cls._FEATURES.unpack_from(payload, end)
        return cls(supported, state, conn_id, features)


@dataclass(frozen=True, slots=True)
class Unload(Message):
    """UNLOAD (16), header only."""

    TYPE = MessageType.UNLOAD


@dataclass(frozen=True, slots=True)
class UnloadResponse(Message):
    """UNLOAD_RESPONSE (17), header only."""

    TYPE = MessageType.UNLOAD_RESPONSE


@dataclass(frozen=True, slots=True)
class OpenReservedChannel(Message):
    """OPEN_RESERVED_CHANNEL (18), OpenVMM only, 28 bytes."""

    TYPE = MessageType.OPEN_RESERVED_CHANNEL
    _BODY = struct.Struct("<IIIII")
    channel_id: int
    target_vp: int
    target_sint: int
    ring_buffer_gpadl: int
    downstream_offset: int


@dataclass(frozen=True, slots=True)
class CloseReservedChannel(Message):
    """CLOSE_RESERVED_CHANNEL (19), OpenVMM only, 20 bytes."""

    TYPE = MessageType.CLOSE_RESERVED_CHANNEL
    _BODY = struct.Struct("<III")
    channel_id: int
    target_vp: int
    target_sint: int


@dataclass(frozen=True, slots=True)
class CloseReservedResponse(Message):
    """CLOSE_RESERVED_RESPONSE (20), OpenVMM only, 12 bytes."""

    TYPE = MessageType.CLOSE_RESERVED_RESPONSE
    _BODY = struct.Struct("<I")
    channel_id: int


@dataclass(frozen=True, slots=True)
class TlConnectRequest(Message):
    """TL_CONNECT_REQUEST (21), 40 bytes; 56 with ``silo_id`` (v2, >= 5.2)."""

    TYPE = MessageType.TL_CONNECT_REQUEST
    _BODY = struct.Struct("<16s16s")
    guest_endpoint_id: uuid.UUID
    host_service_id: uuid.UUID
    silo_id: uuid.UUID | None = None

    def encode(self) -> bytes:
        out = _pack(_HEADER, self.TYPE, 0) + _pack(
            self._BODY, self.guest_endpoint_id.bytes_le, self.host_service_id.bytes_le
        )
        if self.silo_id is not None:
            out += self.silo_id.bytes_le
        return out

    @classmethod
    def _decode(cls, payload: bytes) -> Self:
        ep, svc = cls._BODY.unpack_from(payload, HEADER_SIZE)
        end = HEADER_SIZE + cls._BODY.size
        silo = _guid(payload[end : end + 16]) if len(payload) >= end + 16 else None
        return cls(_guid(ep), _guid(svc), silo)


@dataclass(frozen=True, slots=True)
class ModifyChannel(Message):
    """MODIFYCHANNEL (22), 16 bytes, >= 4.1."""

    TYPE = MessageType.MODIFYCHANNEL
    _BODY = struct.Struct("<II")
    child_relid: int
    target_vp: int


@dataclass(frozen=True, slots=True)
class TlConnectResult(Message):
    """TL_CONNECT_RESULT (23), 44 bytes; sent on failure."""

    TYPE = MessageType.TL_CONNECT_RESULT
    _BODY = struct.Struct("<16s16sI")
    endpoint_id: uuid.UUID
    service_id: uuid.UUID
    status: int

    def encode(self) -> bytes:
        return _pack(_HEADER, self.TYPE, 0) + _pack(
            self._BODY, self.endpoint_id.bytes_le, self.service_id.bytes_le, self.status
        )

    @classmethod
    def _decode(cls, payload: bytes) -> Self:
        ep, svc, status = cls._BODY.unpack_from(payload, HEADER_SIZE)
        return cls(_guid(ep), _guid(svc), status)


@dataclass(frozen=True, slots=True)
class ModifyChannelResponse(Message):
    """MODIFYCHANNEL_RESPONSE (24), 16 bytes, mandatory from 5.3."""

    TYPE = MessageType.MODIFYCHANNEL_RESPONSE
    _BODY = struct.Struct("<II")
    child_relid: int
    status: int


@dataclass(frozen=True, slots=True)
class ModifyConnection(Message):
    """MODIFY_CONNECTION (25), OpenVMM 6.0 feature, 24 bytes."""

    TYPE = MessageType.MODIFY_CONNECTION
    _BODY = struct.Struct("<QQ")
    parent_to_child_monitor_page: int
    child_to_parent_monitor_page: int


@dataclass(frozen=True, slots=True)
class ModifyConnectionResponse(Message):
    """MODIFY_CONNECTION_RESPONSE (26), OpenVMM 6.0 feature, 9 bytes."""

    TYPE = MessageType.MODIFY_CONNECTION_RESPONSE
    _BODY = struct.Struct("<B")
    connection_state: int


@dataclass(frozen=True, slots=True)
class Pause(Message):
    """PAUSE (27), OpenVMM 6.0 feature, header only."""

    TYPE = MessageType.PAUSE


@dataclass(frozen=True, slots=True)
class PauseResponse(Message):
    """PAUSE_RESPONSE (28), OpenVMM 6.0 feature, header only."""

    TYPE = MessageType.PAUSE_RESPONSE


@dataclass(frozen=True, slots=True)
class Resume(Message):
    """RESUME (29), OpenVMM 6.0 feature, header only."""

    TYPE = MessageType.RESUME


MESSAGE_CLASSES: dict[MessageType, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        OfferChannel,
        RescindChannelOffer,
        RequestOffers,
        AllOffersDelivered,
        OpenChannel,
        OpenChannelResult,
        CloseChannel,
        GpadlHeader,
        GpadlBody,
        GpadlCreated,
        GpadlTeardown,
        GpadlTorndown,
        RelidReleased,
        InitiateContact,
        VersionResponse,
        Unload,
        UnloadResponse,
        OpenReservedChannel,
        CloseReservedChannel,
        CloseReservedResponse,
        TlConnectRequest,
        ModifyChannel,
        TlConnectResult,
        ModifyChannelResponse,
        ModifyConnection,
        ModifyConnectionResponse,
        Pause,
        PauseResponse,
        Resume,
    )
}


def decode(payload: bytes) -> Message:
    """Parse one VMBus control message; raise ProtocolError for anything unparseable."""
    payload = bytes(payload)  # one private copy: never parse bytes the guest can still change
    if len(payload) > MAX_MESSAGE_SIZE:
        raise ProtocolError(f"message of {len(payload)} bytes > {MAX_MESSAGE_SIZE}")
    if len(payload) < HEADER_SIZE:
        raise ProtocolError(f"message of {len(payload)} bytes is shorter than the header")
    (msgtype, _padding) = _HEADER.unpack_from(payload)
    if msgtype == MessageType.INVALID or msgtype >= MESSAGE_TYPE_COUNT:
        raise ProtocolError(f"unknown message type {msgtype}")
    cls = MESSAGE_CLASSES[MessageType(msgtype)]
    if len(payload) < cls.min_size():
        raise ProtocolError(
            f"{MessageType(msgtype).name} of {len(payload)} bytes < {cls.min_size()}"
        )
    return cls._decode(payload)


# --- GPA ranges (the GPADL range buffer, spec §8.1 "each gpa_range") --------------------------

_RANGE_HEAD = struct.Struct("<II")


def range_pfn_count(byte_count: int, byte_offset: int) -> int:
    """PFNs a gpa_range needs: ceil((offset + count) / 4096)."""
    return (byte_offset + byte_count + PAGE_SIZE - 1) // PAGE_SIZE


def encode_gpa_ranges(ranges: tuple[GpaRange, ...] | list[GpaRange]) -> bytes:
    """Serialize ranges into a range buffer (header + bodies carry it in pieces)."""
    out = bytearray()
    for r in ranges:
        out += _pack(_RANGE_HEAD, r.byte_count, r.byte_offset)
        out += _pack(struct.Struct(f"<{len(r.pfns)}Q"), *r.pfns)
    return bytes(out)


def pfn_array(raw: bytes | memoryview) -> array.array[int]:
    """Little-endian u64 PFNs as an array('Q'): 8 bytes a page, not a tuple of ints
    (about 36), since a guest may register millions of pages."""
    a = array.array("Q")
    a.frombytes(raw)
    if sys.byteorder != "little":
        a.byteswap()
    return a


def parse_gpa_ranges(rangecount: int, buf: bytes) -> tuple[GpaRange, ...]:
    """Validate and parse ``rangecount`` gpa_ranges from an assembled range buffer.

    Bytes after the last range are ignored (OpenVMM ``validate_gpa_ranges``).
    """
    if rangecount < 1:
        raise ProtocolError("GPADL with rangecount 0")
    ranges = []
    pos = 0
    for i in range(rangecount):
        if pos + _RANGE_HEAD.size > len(buf):
            raise ProtocolError(f"gpa_range {i} header lies beyond range_buflen")
        byte_count, byte_offset = _RANGE_HEAD.unpack_from(buf, pos)
        pos += _RANGE_HEAD.size
        if byte_count == 0:
            raise ProtocolError(f"gpa_range {i} has byte_count 0")
        if byte_offset > MAX_BYTE_OFFSET:
            raise ProtocolError(f"gpa_range {i} byte_offset {byte_offset:#x} > 0xfff")
        if byte_count + byte_offset > U32_MAX:
            raise ProtocolError(f"gpa_range {i} offset + count overflows u32")
        n = range_pfn_count(byte_count, byte_offset)
        if pos + 8 * n > len(buf):
            raise ProtocolError(
                f"gpa_range {i} needs {n} PFNs but range_buflen holds {(len(buf) - pos) // 8}"
            )
        pos += 8 * n
        ranges.append(GpaRange(byte_count, byte_offset, pfn_array(buf[pos - 8 * n : pos])))
    return tuple(ranges)
