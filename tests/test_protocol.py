"""vmbus.protocol: exact wire sizes, round trips, and the h11-style fuzz invariant."""

from __future__ import annotations

import struct
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmbus import protocol as p
from vmbus.gpadl import GpaRange

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 2**64 - 1)
guids = st.uuids()
blob120 = st.binary(max_size=p.USER_DEF_SIZE)

MESSAGES: dict[type[p.Message], st.SearchStrategy[p.Message]] = {
    p.OfferChannel: st.builds(
        p.OfferChannel,
        if_type=guids,
        if_instance=guids,
        child_relid=u32,
        connection_id=u32,
        sub_channel_index=u16,
        flags=u16,
        mmio_megabytes=u16,
        user_def=blob120,
        monitor_id=u8,
        monitor_allocated=st.booleans(),
        is_dedicated_interrupt=st.booleans(),
        mmio_megabytes_optional=u16,
    ),
    p.RescindChannelOffer: st.builds(p.RescindChannelOffer, u32),
    p.RequestOffers: st.just(p.RequestOffers()),
    p.AllOffersDelivered: st.just(p.AllOffersDelivered()),
    p.OpenChannel: st.builds(p.OpenChannel, u32, u32, u32, u32, u32, blob120),
    p.OpenChannelResult: st.builds(p.OpenChannelResult, u32, u32, u32),
    p.CloseChannel: st.builds(p.CloseChannel, u32),
    p.GpadlHeader: st.builds(
        p.GpadlHeader, u32, u32, u16, u16, st.binary(max_size=p.MAX_MESSAGE_SIZE - 20)
    ),
    p.GpadlBody: st.builds(
        p.GpadlBody, u32, u32, st.lists(u64, max_size=p.GPADL_BODY_MAX_PFNS).map(tuple)
    ),
    p.GpadlCreated: st.builds(p.GpadlCreated, u32, u32, u32),
    p.GpadlTeardown: st.builds(p.GpadlTeardown, u32, u32),
    p.GpadlTorndown: st.builds(p.GpadlTorndown, u32),
    p.RelidReleased: st.builds(p.RelidReleased, u32),
    p.InitiateContact: st.builds(p.InitiateContact, u32, u32, u64, u64, u64),
    p.VersionResponse: st.builds(p.VersionResponse, u8, u8, u32, st.none() | u32),
    p.Unload: st.just(p.Unload()),
    p.UnloadResponse: st.just(p.UnloadResponse()),
    p.OpenReservedChannel: st.builds(p.OpenReservedChannel, u32, u32, u32, u32, u32),
    p.CloseReservedChannel: st.builds(p.CloseReservedChannel, u32, u32, u32),
    p.CloseReservedResponse: st.builds(p.CloseReservedResponse, u32),
    p.TlConnectRequest: st.builds(p.TlConnectRequest, guids, guids, st.none() | guids),
    p.ModifyChannel: st.builds(p.ModifyChannel, u32, u32),
    p.TlConnectResult: st.builds(p.TlConnectResult, guids, guids, u32),
    p.ModifyChannelResponse: st.builds(p.ModifyChannelResponse, u32, u32),
    p.ModifyConnection: st.builds(p.ModifyConnection, u64, u64),
    p.ModifyConnectionResponse: st.builds(p.ModifyConnectionResponse, u8),
    p.Pause: st.just(p.Pause()),
    p.PauseResponse: st.just(p.PauseResponse()),
    p.Resume: st.just(p.Resume()),
}

any_message = st.one_of(*MESSAGES.values())


def test_every_type_has_a_class_and_a_strategy() -> None:
    assert set(p.MESSAGE_CLASSES) == {t for t in p.MessageType if t != p.MessageType.INVALID}
    assert set(MESSAGES) == set(p.MESSAGE_CLASSES.values())


# Sizes Linux posts / checks (spec §4.3 min_payload, §4.4 layouts).
SIZES = [
    (p.OfferChannel(uuid.uuid4(), uuid.uuid4(), 1, 0x2001), 196),
    (p.RescindChannelOffer(1), 12),
    (p.RequestOffers(), 8),
    (p.AllOffersDelivered(), 8),
    (p.OpenChannel(1, 1, 0xE1E10, 0, 2), 148),
    (p.OpenChannelResult(1, 1, 0), 20),
    (p.CloseChannel(1), 12),
    (p.GpadlHeader(1, 2, 16, 1, bytes(16)), 36),
    (p.GpadlBody(0, 2, (1, 2)), 32),
    (p.GpadlCreated(1, 2, 0), 20),
    (p.GpadlTeardown(1, 2), 16),
    (p.GpadlTorndown(2), 12),
    (p.RelidReleased(1), 12),
    (p.InitiateContact(p.VERSION_WIN10_V5_3, 0), 40),
    (p.VersionResponse(1), 16),
    (p.VersionResponse(1, supported_features=0), 20),
    (p.Unload(), 8),
    (p.UnloadResponse(), 8),
    (p.TlConnectRequest(uuid.uuid4(), uuid.uuid4()), 40),
    (p.TlConnectRequest(uuid.uuid4(), uuid.uuid4(), uuid.uuid4()), 56),
    (p.ModifyChannel(1, 0), 16),
    (p.TlConnectResult(uuid.uuid4(), uuid.uuid4(), 1), 44),
    (p.ModifyChannelResponse(1, 0), 16),
    (p.ModifyConnectionResponse(0), 9),
]


@pytest.mark.parametrize(("msg", "size"), SIZES, ids=lambda v: type(v).__name__)
def test_exact_sizes(msg: p.Message, size: int) -> None:
    raw = msg.encode()
    assert len(raw) == size
    assert struct.unpack_from("<I", raw)[0] == msg.TYPE
    assert p.decode(raw) == msg


def test_offer_layout_matches_linux() -> None:
    nic = uuid.UUID("f8615163-df3e-46c5-913f-f2d2f965ed0e")
    raw = p.OfferChannel(nic, nic, 7, 0x2007, sub_channel_index=3, monitor_id=5).encode()
    assert raw[8:24] == bytes.fromhex("635161f83edfc546913ff2d2f965ed0e")
    assert struct.unpack_from("<H", raw, 180)[0] == 3
    assert struct.unpack_from("<I", raw, 184)[0] == 7
    assert raw[188] == 5
    assert struct.unpack_from("<H", raw, 190)[0] == 1
    assert struct.unpack_from("<I", raw, 192)[0] == 0x2007


def test_initiate_contact_views() -> None:
    field = p.InitiateContact.sint_field(2, 1, 0xABCD)
    msg = p.InitiateContact(p.VERSION_COPPER, 3, field)
    assert (msg.msg_sint, msg.msg_vtl, msg.feature_flags) == (2, 1, 0xABCD)
    assert msg.encode()[16:18] == b"\x02\x01"


@given(any_message)
def test_round_trip(msg: p.Message) -> None:
    raw = msg.encode()
    assert 8 <= len(raw) <= p.MAX_MESSAGE_SIZE
    assert p.decode(raw) == msg


@given(any_message, st.binary(max_size=32))
def test_trailing_bytes_accepted(msg: p.Message, extra: bytes) -> None:
    raw = msg.encode() + extra
    if len(raw) > p.MAX_MESSAGE_SIZE:
        return
    out = p.decode(raw)
    assert type(out) is type(msg)


@given(st.binary(max_size=p.MAX_MESSAGE_SIZE + 16))
def test_fuzz_decodes_or_protocol_error(raw: bytes) -> None:
    try:
        msg = p.decode(raw)
    except p.ProtocolError as e:
        assert e.reason
        return
    assert isinstance(msg, p.Message)
    # A decoded message re-encodes to a prefix-compatible message of the same type.
    assert type(p.decode(msg.encode())) is type(msg)


@given(st.sampled_from(sorted(p.MESSAGE_CLASSES)), st.binary(max_size=300))
def test_fuzz_with_valid_type(msgtype: int, body: bytes) -> None:
    raw = struct.pack("<II", msgtype, 0) + body
    try:
        p.decode(raw)
    except p.ProtocolError:
        pass


@pytest.mark.parametrize("msgtype", [0, 30, 31, 0xFFFFFFFF])
def test_unknown_types_rejected(msgtype: int) -> None:
    with pytest.raises(p.ProtocolError, match="unknown message type"):
        p.decode(struct.pack("<II", msgtype, 0) + bytes(200))


@pytest.mark.parametrize("cls", sorted(p.MESSAGE_CLASSES.values(), key=lambda c: c.TYPE))
def test_short_payload_rejected(cls: type[p.Message]) -> None:
    short = (struct.pack("<II", cls.TYPE, 0) + bytes(cls.min_size()))[: cls.min_size() - 1]
    with pytest.raises(p.ProtocolError):
        p.decode(short)


def test_oversized_rejected() -> None:
    with pytest.raises(p.ProtocolError):
        p.decode(p.RequestOffers().encode() + bytes(p.MAX_MESSAGE_SIZE))


def test_encode_refuses_bad_fields() -> None:
    with pytest.raises(p.LocalProtocolError):
        p.CloseChannel(-1).encode()
    with pytest.raises(p.LocalProtocolError):
        p.OpenChannel(1, 1, 1, 0, 2, bytes(121))
    with pytest.raises(p.LocalProtocolError):
        p.GpadlBody(0, 1, tuple(range(29))).encode()


def test_linux_geometry() -> None:
    assert p.GPADL_HEADER_MAX_PFNS == 26
    assert p.GPADL_BODY_MAX_PFNS == 28
    assert p.MAX_SINGLE_RANGE_PAGES == 8190


@given(
    st.lists(
        st.builds(
            lambda cnt, off, seed: GpaRange(
                cnt, off, tuple(range(seed, seed + p.range_pfn_count(cnt, off)))
            ),
            st.integers(1, 5 * 4096),
            st.integers(0, 4095),
            st.integers(0, 2**40),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_gpa_ranges_round_trip(ranges: list[GpaRange]) -> None:
    buf = p.encode_gpa_ranges(ranges)
    assert p.parse_gpa_ranges(len(ranges), buf) == tuple(ranges)
    assert p.parse_gpa_ranges(len(ranges), buf + bytes(16)) == tuple(ranges)


@given(st.integers(0, 8), st.binary(max_size=512))
def test_gpa_ranges_fuzz(count: int, buf: bytes) -> None:
    try:
        ranges = p.parse_gpa_ranges(count, buf)
    except p.ProtocolError:
        return
    for r in ranges:
        assert r.byte_count and r.byte_offset < 4096
        assert len(r.pfns) == p.range_pfn_count(r.byte_count, r.byte_offset)


@pytest.mark.parametrize(
    ("count", "buf", "why"),
    [
        (0, b"", "rangecount 0"),
        (1, struct.pack("<II", 0, 0), "byte_count 0"),
        (1, struct.pack("<IIQ", 1, 4096, 0), "byte_offset"),
        (1, struct.pack("<IIQ", 0xFFFFFFFF, 1, 0), "overflow"),
        (1, struct.pack("<IIQ", 8192, 0, 0), "needs 2 PFNs"),
        (2, struct.pack("<IIQ", 4096, 0, 0), "beyond range_buflen"),
    ],
)
def test_gpa_range_rejections(count: int, buf: bytes, why: str) -> None:
    with pytest.raises(p.ProtocolError, match=why):
        p.parse_gpa_ranges(count, buf)
