"""VmBusServer against VmBusClient, in memory, bytes only: whole control-plane sequences."""

from __future__ import annotations

import struct
import uuid
from typing import Any

import pytest

from vmbus import bus as b
from vmbus import protocol as p
from vmbus.guest import client as c

NIC = uuid.UUID("f8615163-df3e-46c5-913f-f2d2f965ed0e")
SCSI = uuid.UUID("ba6163d9-04a1-4d29-b605-72e2ffb1dc7f")
INST1 = uuid.UUID("00000000-0000-0000-0000-000000000001")
INST2 = uuid.UUID("00000000-0000-0000-0000-000000000002")


class Harness:
    """Pumps messages between a server and a client until both are quiet.

    Host-side driver actions (open_complete / close_complete) are automatic unless
    ``auto`` is False; non-message events are collected for assertions.
    """

    def __init__(
        self, vcpus: int = 4, *, auto: bool = True, client: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        self.server = b.VmBusServer(vcpus, **kw)
        self.client = c.VmBusClient(**(client or {}))
        self.auto = auto
        self.host: list[b.Event] = []
        self.guest: list[c.ClientEvent] = []
        self.sent: list[p.Message] = []  # every host->guest message, decoded
        self.posted: list[tuple[p.Message | bytes, int]] = []  # every guest->host message

    def pump(self) -> None:
        busy = True
        while busy:
            busy = False
            for ev in self.client.events():
                busy = True
                if isinstance(ev, c.PostMessage):
                    try:
                        self.posted.append((p.decode(ev.payload), ev.connection_id))
                    except p.ProtocolError:
                        self.posted.append((ev.payload, ev.connection_id))
                    self.server.receive(ev.payload, ev.connection_id)
                else:
                    self.guest.append(ev)
            busy |= self.drain(deliver=True)

    def drain(self, *, deliver: bool) -> bool:
        """Handle the server's events; host messages reach the client only if ``deliver``."""
        busy = False
        for hev in self.server.events():
            busy = True
            if isinstance(hev, b.SendMessage):
                assert len(hev.payload) <= p.MAX_MESSAGE_SIZE
                self.sent.append(p.decode(hev.payload))
                if deliver:
                    self.client.receive(hev.payload)
                continue
            self.host.append(hev)
            if self.auto and isinstance(hev, b.OpenRequest):
                self.server.open_complete(hev.relid, 0)
            elif self.auto and isinstance(hev, b.ChannelClosed):
                self.server.close_complete(hev.relid)
        self.server.check_invariants()
        return busy

    def connect(self) -> None:
        self.client.connect()
        self.pump()

    def host_of(self, kind: type) -> list[Any]:
        return [e for e in self.host if isinstance(e, kind)]

    def guest_of(self, kind: type) -> list[Any]:
        return [e for e in self.guest if isinstance(e, kind)]

    def sent_of(self, kind: type) -> list[Any]:
        return [m for m in self.sent if isinstance(m, kind)]

    def violations(self) -> list[str]:
        return [e.reason for e in self.host_of(b.ProtocolViolation)]

    def clear(self) -> None:
        self.host.clear()
        self.guest.clear()
        self.sent.clear()
        self.posted.clear()

    def raw(self, msg: p.Message | bytes, conn: int = p.CONNECTION_ID_MESSAGE) -> None:
        """A hand-made guest message, straight to the server."""
        payload = msg if isinstance(msg, bytes) else msg.encode()
        self.server.receive(payload, conn)
        self.drain(deliver=False)

    def open_channel(self, relid: int, pages: int = 8, k: int = 4, base: int = 0x100) -> int:
        handle = self.client.create_gpadl(relid, list(range(base, base + pages)))
        self.pump()
        self.client.open_channel(relid, handle, k)
        self.pump()
        return handle


def pfns(n: int, base: int = 0x1000) -> list[int]:
    # scattered, non-contiguous frames, as a real guest's pages would be
    return [base + 3 * i + (i % 7) * 1000 for i in range(n)]


@pytest.fixture
def h() -> Harness:
    h = Harness()
    h.server.add_offer(b.Offer(NIC, INST1))
    h.connect()
    return h


# --- negotiation -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", p.LINUX_VERSIONS, ids=p.version_str)
def test_negotiate_each_linux_version(version: int) -> None:
    h = Harness(client={"max_version": version})
    h.connect()
    assert h.guest_of(c.VersionAccepted) == [c.VersionAccepted(version, 1)]
    assert h.server.version == version
    (contact, conn), (req, conn2) = h.posted[:2]
    assert isinstance(contact, p.InitiateContact) and contact.version_requested == version
    assert conn == (4 if version >= p.VERSION_WIN10_V5 else 1)
    assert isinstance(req, p.RequestOffers) and conn2 == 1
    (resp,) = h.sent_of(p.VersionResponse)
    assert resp.version_supported == 1 and resp.supported_features is None
    if version >= p.VERSION_WIN10_V5:
        assert resp.msg_conn_id == 1
    assert h.sent_of(p.AllOffersDelivered) == [p.AllOffersDelivered()]
    assert h.host_of(b.Connected)[0].version == version
    assert not h.violations()


def test_negotiate_6_0_and_1_1() -> None:
    h = Harness(client={"versions": [p.VERSION_COPPER], "max_version": p.VERSION_COPPER})
    h.connect()
    assert h.server.version == p.VERSION_COPPER
    raw = p.VersionResponse(1, 0, 1, 0).encode()
    assert len(raw) == 20
    assert h.sent_of(p.VersionResponse) == [p.VersionResponse(1, 0, 1, 0)]

    h = Harness(client={"versions": [p.VERSION_WIN7]})
    h.server.add_offer(b.Offer(NIC, INST1))
    h.connect()
    assert h.server.version == p.VERSION_WIN7
    assert h.host_of(b.Connected)[0].interrupt_page == c.DEFAULT_INTERRUPT_PAGE


def test_server_refuses_unsupported_versions_and_guest_falls_back() -> None:
    h = Harness(versions=(p.VERSION_WIN10, p.VERSION_WIN8))
    h.connect()
    refused = [e.version for e in h.guest_of(c.VersionRefused)]
    assert refused == list(p.LINUX_VERSIONS[:5])
    assert h.server.version == p.VERSION_WIN10
    assert not h.violations()  # an unsupported version is ordinary negotiation


def test_no_common_version() -> None:
    h = Harness(versions=(p.VERSION_WIN7,))
    h.connect()
    assert h.guest_of(c.ConnectFailed) == [c.ConnectFailed()]
    assert h.server.version is None
    assert all(r.version_supported == 0 for r in h.sent_of(p.VersionResponse))


def test_ws2008_refused() -> None:
    h = Harness(client={"versions": [p.VERSION_WS2008]})
    h.connect()
    assert h.guest_of(c.ConnectFailed)


@pytest.mark.parametrize(
    ("version", "conn"),
    [(p.VERSION_WIN10_V5_3, 1), (p.VERSION_WIN10, 4), (p.VERSION_WIN10, 7)],
)
def test_contact_on_wrong_connection_id_is_refused(version: int, conn: int) -> None:
    h = Harness()
    field = p.InitiateContact.sint_field(2) if version >= p.VERSION_WIN10_V5 else 0
    h.raw(p.InitiateContact(version, 0, field, 0, 0), conn)
    assert h.server.version is None
    assert h.sent_of(p.VersionResponse)[0].version_supported == 0
    assert len(h.violations()) == 1


@pytest.mark.parametrize(
    "contact",
    [
        p.InitiateContact(p.VERSION_WIN10_V5_3, 4, p.InitiateContact.sint_field(2)),  # bad vcpu
        p.InitiateContact(p.VERSION_WIN10_V5_3, 0, p.InitiateContact.sint_field(3)),  # bad sint
        p.InitiateContact(p.VERSION_WIN10_V5_3, 0, p.InitiateContact.sint_field(2), 0x1000, 0),
        p.InitiateContact(p.VERSION_WIN10_V5_3, 0, p.InitiateContact.sint_field(2), 0x10, 0x2000),
    ],
    ids=["vcpu", "sint", "one-monitor-page", "unaligned-monitor"],
)
def test_contact_parameter_validation(contact: p.InitiateContact) -> None:
    h = Harness(vcpus=4)
    h.raw(contact, 4)
    (resp,) = h.sent_of(p.VersionResponse)
    assert resp.version_supported == 0
    assert resp.connection_state == p.CONNECTION_STATE_FAILED_UNKNOWN_FAILURE
    assert h.server.version is None and len(h.violations()) == 1


def test_target_vcpu_honoured() -> None:
    h = Harness(vcpus=4, client={"target_vcpu": 3})
    h.server.add_offer(b.Offer(NIC, INST1))
    h.client.connect()
    h.pump()
    assert h.host_of(b.Connected)[0].target_vcpu == 3
    # every control message goes to vCPU 3 from then on
    h.client.create_gpadl(1, pfns(4))
    h.server.receive(h.client.next_event().payload, 1)  # type: ignore[union-attr]
    ev = h.server.next_event()
    assert isinstance(ev, b.SendMessage) and ev.target_vcpu == 3


def test_messages_before_negotiation_are_ignored() -> None:
    h = Harness()
    h.server.add_offer(b.Offer(NIC, INST1))
    h.raw(p.RequestOffers())
    h.raw(p.OpenChannel(1, 1, 5, 0, 2))
    assert h.sent == [] and len(h.violations()) == 2


def test_second_request_offers(h: Harness) -> None:
    h.clear()
    h.raw(p.RequestOffers())
    assert h.sent == [] and "second REQUESTOFFERS" in h.violations()[0]


def test_messages_on_id_4_after_connect_rejected(h: Harness) -> None:
    h.clear()
    h.raw(p.GpadlTeardown(1, 5), conn=4)
    assert "connection id 4" in h.violations()[0]


def test_host_to_guest_type_from_guest(h: Harness) -> None:
    h.clear()
    h.raw(p.OfferChannel(NIC, NIC, 5, 5))
    assert "host-to-guest" in h.violations()[0]


# --- offers -------------------------------------------------------------------------------------


def test_offers_and_sub_channels() -> None:
    h = Harness()
    r1 = h.server.add_offer(b.Offer(NIC, INST1, user_def=b"abc", monitor_id=3))
    r2 = h.server.add_offer(b.Offer(NIC, INST1, sub_channel_index=1))
    r3 = h.server.add_offer(b.Offer(SCSI, INST2, mmio_megabytes=4))
    assert (r1, r2, r3) == (1, 2, 3)
    h.connect()
    offers = h.guest_of(c.OfferReceived)
    assert [(o.relid, o.sub_channel_index) for o in offers] == [(1, 0), (2, 1), (3, 0)]
    assert offers[0].connection_id == 0x2001 == b.channel_connection_id(1)
    assert offers[0].offer.user_def.startswith(b"abc")
    assert offers[0].offer.monitor_allocated and offers[0].offer.monitor_id == 3
    assert not offers[1].offer.monitor_allocated and offers[1].offer.monitor_id == 0xFF
    assert offers[2].offer.mmio_megabytes == 4
    assert all(o.offer.is_dedicated_interrupt for o in offers)
    assert isinstance(h.sent[-1], p.AllOffersDelivered)
    # hot-added sub-channel after ALLOFFERS_DELIVERED
    r4 = h.server.add_offer(b.Offer(NIC, INST1, sub_channel_index=2))
    h.pump()
    assert h.guest_of(c.OfferReceived)[-1].relid == r4 == 4


def test_add_offer_misuse() -> None:
    s = b.VmBusServer(1)
    with pytest.raises(p.LocalProtocolError):
        s.add_offer(b.Offer(NIC, INST1, sub_channel_index=1))  # no primary
    s.add_offer(b.Offer(NIC, INST1))
    with pytest.raises(p.LocalProtocolError):
        s.add_offer(b.Offer(NIC, INST1))  # duplicate
    with pytest.raises(p.LocalProtocolError):
        s.add_offer(b.Offer(NIC, INST2, user_def=bytes(121)))
    with pytest.raises(p.LocalProtocolError):
        s.add_offer(b.Offer(NIC, INST2, flags=0x10000))
    with pytest.raises(p.LocalProtocolError):
        s.add_offer(b.Offer(NIC, INST2, monitor_id=128))
    with pytest.raises(p.LocalProtocolError):
        s.rescind(99)


def test_relids_run_out() -> None:
    s = b.VmBusServer(1)
    for i in range(p.MAX_RELID):
        s.add_offer(b.Offer(NIC, uuid.UUID(int=i)))
    with pytest.raises(p.LocalProtocolError, match="relids"):
        s.add_offer(b.Offer(NIC, uuid.UUID(int=99999)))


def test_rescind_before_request_offers_is_silent() -> None:
    h = Harness()
    relid = h.server.add_offer(b.Offer(NIC, INST1))
    h.server.rescind(relid)
    h.connect()
    assert h.guest_of(c.OfferReceived) == []
    assert h.host_of(b.ChannelRemoved) == [b.ChannelRemoved(relid)]


# --- GPADLs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pages", "messages"), [(1, 1), (26, 1), (27, 2), (54, 2), (55, 3), (8190, 293)]
)
def test_gpadl_sizes(h: Harness, pages: int, messages: int) -> None:
    h.clear()
    frames = pfns(pages)
    handle = h.client.create_gpadl(1, frames)
    h.pump()
    assert handle == c.FIRST_GPADL_HANDLE
    gpadl_msgs = [m for m, _ in h.posted]
    assert len(gpadl_msgs) == messages
    head = gpadl_msgs[0]
    assert isinstance(head, p.GpadlHeader)
    assert head.range_buflen == 8 + 8 * pages and head.rangecount == 1
    assert len(head.encode()) == 20 + 8 + 8 * min(pages, 26)
    assert all(len(m.encode()) <= 240 for m in gpadl_msgs)
    assert h.guest_of(c.GpadlReady) == [c.GpadlReady(handle, 1, 0)]
    # GPADL_CREATED comes only after the last body
    assert len(h.sent) == 1
    g = h.server.gpadl(handle)
    assert tuple(g.pfns) == tuple(frames) and g.relid == 1
    assert g.ranges[0].byte_count == pages * 4096 and g.ranges[0].byte_offset == 0
    assert h.server.gpadl_pages == pages


def test_gpadl_created_only_after_all_bodies(h: Harness) -> None:
    h.clear()
    h.client.create_gpadl(1, pfns(60))
    posts = list(h.client.events())
    assert len(posts) == 3
    for ev in posts[:-1]:
        h.server.receive(ev.payload, ev.connection_id)  # type: ignore[union-attr]
        assert h.server.next_event() is None
    h.server.receive(posts[-1].payload, 1)  # type: ignore[union-attr]
    ev = h.server.next_event()
    assert isinstance(ev, b.SendMessage)
    assert p.decode(ev.payload) == p.GpadlCreated(1, c.FIRST_GPADL_HANDLE, 0)


def test_multi_range_gpadl(h: Harness) -> None:
    from vmbus.gpadl import GpaRange

    ranges = [GpaRange(100, 4000, (7, 8)), GpaRange(4096, 0, (9,))]
    data = p.encode_gpa_ranges(ranges)
    h.clear()
    h.raw(p.GpadlHeader(1, 77, len(data), 2, data))
    assert h.sent == [p.GpadlCreated(1, 77, 0)]
    assert h.server.gpadl(77).ranges == tuple(ranges)
    # not usable as a ring (two ranges)
    h.raw(p.OpenChannel(1, 1, 77, 0, 2))
    assert h.sent[-1] == p.OpenChannelResult(1, 1, p.STATUS_UNSUCCESSFUL)


def test_pfns_outside_ram_fail_the_gpadl() -> None:
    ram_pages = 0x10000
    h = Harness(validate_pfns=lambda frames: all(f < ram_pages for f in frames))
    h.server.add_offer(b.Offer(NIC, INST1))
    h.connect()
    ok = h.client.create_gpadl(1, [1, 2, 3])
    bad = h.client.create_gpadl(1, [1, 2, ram_pages + 5] * 20)
    h.pump()
    assert h.guest_of(c.GpadlReady) == [
        c.GpadlReady(ok, 1, 0),
        c.GpadlReady(bad, 1, p.STATUS_UNSUCCESSFUL),
    ]
    assert "outside guest RAM" in h.violations()[0]
    with pytest.raises(b.UnknownGpadl):
        h.server.gpadl(bad)
    assert h.server.gpadl_pages == 3


def test_range_length_disagreeing_with_page_count(h: Harness) -> None:
    h.clear()
    # range_buflen room for 2 PFNs, but byte_count needs 3 pages
    data = struct.pack("<IIQQ", 3 * 4096, 0, 1, 2)
    h.raw(p.GpadlHeader(1, 5, len(data), 1, data))
    assert h.sent == [p.GpadlCreated(1, 5, p.STATUS_UNSUCCESSFUL)]
    assert "needs 3 PFNs" in h.violations()[0]
    assert h.server.gpadl_count == 0


@pytest.mark.parametrize(
    ("buflen", "count", "why"),
    [(16, 0, "rangecount 0"), (8, 1, "range_buflen"), (16, 2, "range_buflen")],
)
def test_bad_gpadl_header_geometry(h: Harness, buflen: int, count: int, why: str) -> None:
    h.clear()
    h.raw(p.GpadlHeader(1, 5, buflen, count, bytes(buflen)))
    assert h.sent == [p.GpadlCreated(1, 5, p.STATUS_UNSUCCESSFUL)]
    assert why in h.violations()[0]


def test_gpadl_for_unknown_relid(h: Harness) -> None:
    h.clear()
    h.raw(p.GpadlHeader(9, 5, 16, 1, struct.pack("<IIQ", 4096, 0, 1)))
    assert h.sent == [p.GpadlCreated(9, 5, p.STATUS_UNSUCCESSFUL)]


def test_body_for_unknown_handle(h: Harness) -> None:
    h.clear()
    h.raw(p.GpadlBody(0, 0x1234, (1, 2, 3)))
    assert h.sent == [] and "unknown handle" in h.violations()[0]


def test_body_after_completion(h: Harness) -> None:
    handle = h.client.create_gpadl(1, pfns(2))
    h.pump()
    h.clear()
    h.raw(p.GpadlBody(0, handle, (1,)))
    assert "complete handle" in h.violations()[0]


def test_extra_pfns_past_capacity_ignored(h: Harness) -> None:
    h.clear()
    data = struct.pack("<IIQ", 4096, 0, 1)
    h.raw(p.GpadlHeader(1, 5, 24, 1, data))  # capacity 3 u64: one more PFN room
    h.raw(p.GpadlBody(0, 5, (42, 43, 44)))  # 43, 44 ignored
    assert h.sent == [p.GpadlCreated(1, 5, 0)]
    assert tuple(h.server.gpadl(5).pfns) == (1,)


def test_handle_reused_while_in_use(h: Harness) -> None:
    handle = h.client.create_gpadl(1, pfns(3))
    h.pump()
    h.clear()
    h.raw(p.GpadlHeader(1, handle, 16, 1, struct.pack("<IIQ", 4096, 0, 9)))
    assert h.sent == [p.GpadlCreated(1, handle, 0x8000FFFF)]
    assert "already in use" in h.violations()[0]
    assert tuple(h.server.gpadl(handle).pfns) == tuple(pfns(3))  # the original is untouched
    # also while still in progress (BODY carries no relid: handles are per VM)
    h.raw(p.GpadlHeader(1, 99, 800, 1, b""))
    h.raw(p.GpadlHeader(1, 99, 16, 1, struct.pack("<IIQ", 4096, 0, 9)))
    assert h.sent[-1] == p.GpadlCreated(1, 99, p.STATUS_UNSUCCESSFUL)


def test_gpadl_limits() -> None:
    h = Harness(max_gpadls_in_progress=2, max_gpadls=3, max_gpadl_pages=10)
    h.server.add_offer(b.Offer(NIC, INST1))
    h.connect()
    h.clear()
    h.raw(p.GpadlHeader(1, 1, 8 + 8 * 11, 1, b""))  # 11 pages > 10
    assert "GPADL pages" in h.violations()[-1]
    h.raw(p.GpadlHeader(1, 2, 24, 1, b""))
    h.raw(p.GpadlHeader(1, 3, 24, 1, b""))
    h.raw(p.GpadlHeader(1, 4, 24, 1, b""))
    assert "in progress" in h.violations()[-1]
    assert h.server.gpadls_in_progress == 2
    h.raw(p.GpadlBody(0, 2, (0, 0, 0)))  # byte_count 0 -> fails, frees the slot
    h.raw(p.GpadlHeader(1, 5, 16, 1, struct.pack("<IIQ", 4096, 0, 1)))
    h.raw(p.GpadlHeader(1, 6, 16, 1, struct.pack("<IIQ", 4096, 0, 1)))
    h.raw(p.GpadlHeader(1, 7, 16, 1, struct.pack("<IIQ", 4096, 0, 1)))
    assert "more than 3 GPADLs" in h.violations()[-1]


# --- open / close / teardown -------------------------------------------------------------------


def test_open_close_teardown_sequence() -> None:
    h = Harness(auto=False)
    h.server.add_offer(b.Offer(NIC, INST1))
    h.connect()
    handle = h.client.create_gpadl(1, pfns(16))
    h.pump()
    h.client.open_channel(1, handle, 6, target_vp=2, userdata=b"hello")
    h.pump()
    (req,) = h.host_of(b.OpenRequest)
    assert (req.relid, req.downstream_offset, req.target_vp) == (1, 6, 2)
    assert req.gpadl.handle == handle and req.gpadl.page_count == 16
    assert req.userdata.startswith(b"hello") and len(req.userdata) == 120
    assert req.connection_id == 0x2001
    assert h.server.channel_state(1) is b.ChannelState.OPENING
    assert not h.guest_of(c.OpenResult)  # waits for the driver
    h.server.open_complete(1, 0)
    h.pump()
    assert h.guest_of(c.OpenResult) == [c.OpenResult(1, 0)]
    assert h.sent_of(p.OpenChannelResult) == [p.OpenChannelResult(1, 1, 0)]
    # Linux close: CLOSECHANNEL then GPADL_TEARDOWN, waiting for TORNDOWN
    h.client.close_channel(1)
    h.client.teardown_gpadl(1, handle)
    h.pump()
    assert h.host_of(b.ChannelClosed) == [b.ChannelClosed(1, "closed by guest")]
    assert not h.guest_of(c.GpadlGone)  # deferred: the driver still holds the ring
    assert h.server.gpadl_count == 1
    h.server.close_complete(1)
    h.pump()
    assert h.host_of(b.GpadlReleased) == [b.GpadlReleased(handle)]
    assert h.guest_of(c.GpadlGone) == [c.GpadlGone(handle)]
    assert h.server.gpadl_count == 0 and h.server.gpadl_pages == 0
    assert not h.violations()


def test_open_failure_from_driver() -> None:
    h = Harness(auto=False)
    h.server.add_offer(b.Offer(NIC, INST1))
    h.connect()
    handle = h.client.create_gpadl(1, pfns(8))
    h.pump()
    h.client.open_channel(1, handle, 4)
    h.pump()
    h.server.open_complete(1, 0xC0000001)  # e.g. ring indices out of range
    h.pump()
    assert h.guest_of(c.OpenResult) == [c.OpenResult(1, 0xC0000001)]
    assert h.server.channel_state(1) is b.ChannelState.CLOSED
    # the channel can be opened again, and the GPADL torn down at once
    h.client.teardown_gpadl(1, handle)
    h.pump()
    assert h.guest_of(c.GpadlGone) == [c.GpadlGone(handle)]


def test_driver_misuse_raises() -> None:
    s = b.VmBusServer(1)
    s.add_offer(b.Offer(NIC, INST1))
    with pytest.raises(p.LocalProtocolError):
        s.open_complete(1, 0)
    with pytest.raises(p.LocalProtocolError):
        s.close_complete(1)
    with pytest.raises(p.LocalProtocolError):
        s.open_complete(5, 0)
    with pytest.raises(b.UnknownGpadl):
        s.gpadl_acquire(0xE1E10)
    with pytest.raises(p.LocalProtocolError):
        s.gpadl_release(0xE1E10)


@pytest.mark.parametrize(
    ("open_msg", "why"),
    [
        (p.OpenChannel(9, 9, c.FIRST_GPADL_HANDLE, 0, 4), "not an offered channel"),
        (p.OpenChannel(1, 1, 0x4242, 0, 4), "not created"),
        (p.OpenChannel(1, 1, c.FIRST_GPADL_HANDLE, 0, 0), "downstream offset 0"),
        (p.OpenChannel(1, 1, c.FIRST_GPADL_HANDLE, 0, 1), "downstream offset 1"),
        (p.OpenChannel(1, 1, c.FIRST_GPADL_HANDLE, 0, 7), "downstream offset 7"),
        (p.OpenChannel(1, 1, c.FIRST_GPADL_HANDLE, 0, 100), "downstream offset 100"),
        (p.OpenChannel(1, 1, c.FIRST_GPADL_HANDLE, 4, 4), "target_vp 4"),
        (p.OpenChannel(1, 1, c.FIRST_GPADL_HANDLE + 1, 0, 2), "belongs to relid 2"),
    ],
    ids=["unknown-relid", "unknown-gpadl", "k0", "k1", "k-too-big", "k-beyond", "vp", "owner"],
)
def test_bad_open(open_msg: p.OpenChannel, why: str) -> None:
    h = Harness(vcpus=4)
    h.server.add_offer(b.Offer(NIC, INST1))
    h.server.add_offer(b.Offer(SCSI, INST1))
    h.connect()
    h.client.create_gpadl(1, pfns(8))
    h.client.create_gpadl(2, pfns(8))
    h.pump()
    h.clear()
    h.raw(open_msg)
    assert h.sent == [
        p.OpenChannelResult(open_msg.child_relid, open_msg.openid, p.STATUS_UNSUCCESSFUL)
    ]
    assert why in h.violations()[0]
    assert not h.host_of(b.OpenRequest)


def test_in_progress_gpadl_cannot_be_a_ring(h: Harness) -> None:
    h.clear()
    h.raw(p.GpadlHeader(1, 5, 8 + 8 * 8, 1, struct.pack("<IIQ", 8 * 4096, 0, 1)))
    h.raw(p.OpenChannel(1, 1, 5, 0, 4))
    assert h.sent == [p.OpenChannelResult(1, 1, p.STATUS_UNSUCCESSFUL)]


def test_second_open_on_open_channel(h: Harness) -> None:
    handle = h.open_channel(1)
    h.clear()
    h.raw(p.OpenChannel(1, 1, handle, 0, 4))
    assert h.sent == [p.OpenChannelResult(1, 1, p.STATUS_UNSUCCESSFUL)]
    assert "already open" in h.violations()[0]
    assert h.server.channel_state(1) is b.ChannelState.OPEN


def test_close_rules(h: Harness) -> None:
    h.clear()
    h.raw(p.CloseChannel(77))  # unknown: ignored
    assert h.host == [] and h.sent == []
    h.raw(p.CloseChannel(1))  # known, not open: violation
    assert "closed" in h.violations()[0]


def test_reopen_while_closing_waits_for_close_complete() -> None:
    h = Harness(auto=False)
    h.server.add_offer(b.Offer(NIC, INST1))
    h.connect()
    handle = h.client.create_gpadl(1, pfns(8))
    h.pump()
    h.client.open_channel(1, handle, 4)
    h.pump()
    h.server.open_complete(1, 0)
    h.client.close_channel(1)
    h.client.open_channel(1, handle, 4)
    h.pump()
    assert len(h.host_of(b.OpenRequest)) == 1
    h.server.close_complete(1)
    h.pump()
    assert len(h.host_of(b.OpenRequest)) == 2
    assert h.server.channel_state(1) is b.ChannelState.OPENING


def test_teardown_rules(h: Harness) -> None:
    handle = h.client.create_gpadl(1, pfns(3))
    h.pump()
    h.clear()
    h.raw(p.GpadlTeardown(1, 0x999))
    h.raw(p.GpadlTeardown(2, handle))
    assert "unknown handle" in h.violations()[0]
    assert "belongs to relid 1" in h.violations()[1]
    h.raw(p.GpadlTeardown(1, handle))
    h.raw(p.GpadlTeardown(1, handle))
    assert h.sent == [p.GpadlTorndown(handle)]
    assert "unknown handle" in h.violations()[2]


def test_pinned_buffer_gpadl_defers_torndown(h: Harness) -> None:
    ring = h.open_channel(1)
    buf = h.client.create_gpadl(1, pfns(40))
    h.pump()
    g = h.server.gpadl_acquire(buf, relid=1)
    assert g.page_count == 40
    with pytest.raises(b.UnknownGpadl):
        h.server.gpadl_acquire(buf, relid=2)
    h.clear()
    h.client.teardown_gpadl(1, buf)
    h.pump()
    assert h.sent == [] and h.server.gpadl_count == 2
    with pytest.raises(b.UnknownGpadl):
        h.server.gpadl(buf)  # tearing down: no new users
    h.server.gpadl_release(g)
    h.pump()
    assert h.sent == [p.GpadlTorndown(buf)]
    assert h.host_of(b.GpadlReleased) == [b.GpadlReleased(buf)]
    assert h.server.gpadl(ring).handle == ring


# --- rescind / relid release ------------------------------------------------------------------


def test_hot_remove_open_channel_and_relid_reuse(h: Harness) -> None:
    ring = h.open_channel(1)
    buf = h.client.create_gpadl(1, pfns(4, base=0x9000))
    h.pump()
    h.clear()
    h.auto = False
    h.server.rescind(1)
    h.pump()
    assert h.guest_of(c.Rescinded) == [c.Rescinded(1)]
    assert h.host_of(b.ChannelClosed) == [b.ChannelClosed(1, "rescinded")]
    # the unused buffer GPADL is freed by the host at once; the ring waits for close_complete
    assert h.host_of(b.GpadlReleased) == [b.GpadlReleased(buf)]
    # Linux: CLOSECHANNEL is still posted, GPADL_TEARDOWN is not
    h.client.close_channel(1)
    h.client.teardown_gpadl(1, ring)
    h.pump()
    assert not h.violations()
    h.client.release_relid(1)
    h.pump()
    assert not h.host_of(b.ChannelRemoved)  # the driver still holds the ring
    with pytest.raises(p.LocalProtocolError):
        h.server.add_offer(b.Offer(NIC, INST1, sub_channel_index=1))  # primary is gone
    # a new offer meanwhile must not get relid 1
    assert h.server.add_offer(b.Offer(SCSI, INST2)) == 2
    h.server.close_complete(1)
    h.pump()
    assert h.host_of(b.ChannelRemoved) == [b.ChannelRemoved(1)]
    assert b.GpadlReleased(ring) in h.host
    assert not h.guest_of(c.GpadlGone)
    assert h.server.gpadl_count == 0
    # relid 1 is free again; the same device can come back
    assert h.server.add_offer(b.Offer(NIC, INST1)) == 1
    h.pump()
    assert h.guest_of(c.OfferReceived)[-1].relid == 1
    assert not h.violations()


def test_teardown_after_rescind_is_acknowledged(h: Harness) -> None:
    handle = h.client.create_gpadl(1, pfns(2))
    h.pump()
    h.server.rescind(1)
    h.pump()
    h.clear()
    h.raw(p.GpadlTeardown(1, handle))  # a guest that does send it (not Linux)
    assert h.sent == [p.GpadlTorndown(handle)]
    assert not h.violations()


def test_open_on_rescinded_channel_ignored(h: Harness) -> None:
    handle = h.client.create_gpadl(1, pfns(8))
    h.pump()
    h.server.rescind(1)
    h.pump()
    h.clear()
    h.raw(p.OpenChannel(1, 1, handle, 0, 4))
    assert h.sent == [] and h.host == []


def test_relid_released_rules(h: Harness) -> None:
    h.clear()
    h.raw(p.RelidReleased(1))
    h.raw(p.RelidReleased(50))
    assert "not rescinded" in h.violations()[0]
    assert "unknown relid" in h.violations()[1]
    h.server.rescind(1)
    h.pump()
    h.raw(p.RelidReleased(1))
    assert h.host_of(b.ChannelRemoved) == [b.ChannelRemoved(1)]
    h.raw(p.RelidReleased(1))
    assert len(h.violations()) == 3


def test_sub_channels_rescinded_and_primary_closed_last(h: Harness) -> None:
    sub = h.server.add_offer(b.Offer(NIC, INST1, sub_channel_index=1))
    h.pump()
    h.open_channel(1)
    h.open_channel(sub, base=0x5000)
    assert h.server.channel_state(sub) is b.ChannelState.OPEN
    h.client.close_channel(sub)
    h.client.close_channel(1)
    h.pump()
    closed = [e.relid for e in h.host_of(b.ChannelClosed)]
    assert closed == [sub, 1]


# --- modify ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "reply"),
    [(p.VERSION_WIN10_V5_3, True), (p.VERSION_WIN10_V5_2, False), (p.VERSION_WIN10_V4_1, False)],
    ids=p.version_str,
)
def test_modify_channel(version: int, reply: bool) -> None:
    h = Harness(client={"max_version": version})
    h.server.add_offer(b.Offer(NIC, INST1))
    h.connect()
    h.open_channel(1)
    h.clear()
    h.client.modify_channel(1, 3)
    h.pump()
    assert h.host_of(b.ChannelModified) == [b.ChannelModified(1, 3)]
    assert h.guest_of(c.ModifyResult) == ([c.ModifyResult(1, 0)] if reply else [])
    h.client.modify_channel(1, 9)  # no such VP
    h.pump()
    assert "target_vp 9" in h.violations()[0]
    if reply:
        assert h.guest_of(c.ModifyResult)[-1] == c.ModifyResult(1, p.STATUS_UNSUCCESSFUL)


def test_modify_rules() -> None:
    h = Harness(client={"max_version": p.VERSION_WIN10})
    h.server.add_offer(b.Offer(NIC, INST1))
    h.connect()
    h.raw(p.ModifyChannel(1, 0))
    assert "needs 4.1" in h.violations()[0]
    h = Harness()
    h.server.add_offer(b.Offer(NIC, INST1))
    h.connect()
    h.raw(p.ModifyChannel(1, 0))  # not open
    assert h.sent[-1] == p.ModifyChannelResponse(1, p.STATUS_UNSUCCESSFUL)


# --- unload and reset --------------------------------------------------------------------------


def test_unload_waits_for_the_driver() -> None:
    h = Harness(auto=False)
    h.server.add_offer(b.Offer(NIC, INST1))
    h.connect()
    ring = h.client.create_gpadl(1, pfns(8))
    buf = h.client.create_gpadl(1, pfns(4, base=0x7000))
    spare = h.client.create_gpadl(1, pfns(2, base=0x8000))
    h.client.create_gpadl(1, pfns(100))
    h.pump()
    h.client.open_channel(1, ring, 4)
    h.pump()
    h.server.open_complete(1, 0)
    pin = h.server.gpadl_acquire(buf)
    h.pump()
    h.clear()
    h.client.unload()
    h.pump()
    assert h.host_of(b.ChannelClosed) == [b.ChannelClosed(1, "unload")]
    assert b.GpadlReleased(spare) in h.host
    assert not h.sent_of(p.UnloadResponse)
    h.server.close_complete(1)
    h.pump()
    assert not h.sent_of(p.UnloadResponse)  # buffer still pinned
    h.server.gpadl_release(pin)
    h.pump()
    assert h.sent_of(p.UnloadResponse) == [p.UnloadResponse()]
    assert h.guest_of(c.UnloadComplete) == [c.UnloadComplete()]
    assert isinstance(h.host[-1], b.Unloaded)
    assert h.server.gpadl_count == 0 and h.server.version is None
    assert not h.sent_of(p.GpadlTorndown)
    # messages while unloaded are ignored; contact again works and re-offers
    h.raw(p.RequestOffers())
    assert "before a successful INITIATE_CONTACT" in h.violations()[-1]
    h.clear()
    h.connect()
    assert [o.relid for o in h.guest_of(c.OfferReceived)] == [1]


def test_unload_idle_answers_at_once(h: Harness) -> None:
    h.clear()
    h.client.unload()
    h.pump()
    assert h.guest_of(c.UnloadComplete) == [c.UnloadComplete()]


def test_messages_while_unloading_ignored() -> None:
    h = Harness(auto=False)
    h.server.add_offer(b.Offer(NIC, INST1))
    h.connect()
    h.open_channel(1)
    h.server.open_complete(1, 0)
    h.client.unload()
    h.pump()
    h.clear()
    h.raw(p.CloseChannel(1))
    assert "while unloading" in h.violations()[0]


def test_initiate_contact_mid_session_resets(h: Harness) -> None:
    ring = h.open_channel(1)
    buf = h.client.create_gpadl(1, pfns(3, base=0x3000))
    h.pump()
    h.server.add_offer(b.Offer(SCSI, INST2))
    h.pump()
    h.server.rescind(2)
    h.pump()
    h.clear()
    # kexec: a fresh guest client, same host, handles restart at 0xE1E10
    h.client = c.VmBusClient()
    h.connect()
    assert isinstance(h.host[0], b.BusReset)
    assert b.ChannelClosed(1, "INITIATE_CONTACT") in h.host
    assert {e.handle for e in h.host_of(b.GpadlReleased)} == {ring, buf}
    assert b.ChannelRemoved(2) in h.host  # the rescinded channel is gone for good
    assert [o.relid for o in h.guest_of(c.OfferReceived)] == [1]
    handle = h.client.create_gpadl(1, pfns(8))
    assert handle == ring  # same handle value, new GPADL
    h.pump()
    h.client.open_channel(1, handle, 4)
    h.pump()
    assert h.guest_of(c.OpenResult) == [c.OpenResult(1, 0)]
    assert not h.violations()


def test_reset_keeps_pinned_orphans_apart_from_new_handles() -> None:
    h = Harness()
    h.server.add_offer(b.Offer(NIC, INST1))
    h.connect()
    old = h.client.create_gpadl(1, pfns(4))
    h.pump()
    pin = h.server.gpadl_acquire(old)
    h.server.reset()
    h.client = c.VmBusClient()
    h.connect()
    new = h.client.create_gpadl(1, pfns(5))
    h.pump()
    assert new == old and h.server.gpadl(new).page_count == 5
    assert h.server.gpadl_count == 2
    h.server.gpadl_release(pin)
    h.pump()
    assert h.server.gpadl_count == 1 and h.server.gpadl(new).page_count == 5
    assert h.host_of(b.GpadlReleased) == [b.GpadlReleased(old)]


def test_reset_drops_queued_messages_for_the_old_guest() -> None:
    s = b.VmBusServer(2)
    s.add_offer(b.Offer(NIC, INST1))
    s.receive(p.InitiateContact(p.VERSION_WIN10, 0, 0, 0, 0).encode(), 1)
    s.receive(p.RequestOffers().encode(), 1)
    s.reset()
    events = list(s.events())
    assert not any(isinstance(e, b.SendMessage) for e in events)
    assert isinstance(events[-1], b.BusReset)


def test_tl_connect_refused(h: Harness) -> None:
    h.clear()
    ep, svc = uuid.uuid4(), uuid.uuid4()
    h.raw(p.TlConnectRequest(ep, svc))
    assert h.sent == [p.TlConnectResult(ep, svc, p.STATUS_CONNECTION_REFUSED)]
    assert not h.violations()


# --- hostile bytes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x05\x00\x00",
        struct.pack("<II", 5, 0) + bytes(100),  # short OPENCHANNEL
        struct.pack("<II", 8, 0) + bytes(4),  # short GPADL_HEADER
        struct.pack("<II", 0, 0),
        struct.pack("<II", 30, 0) + bytes(40),
        struct.pack("<II", 0xFFFFFFFF, 0),
        struct.pack("<II", 27, 0),  # PAUSE: 6.0 feature, not negotiated
        bytes(241),
    ],
)
def test_malformed_messages(h: Harness, payload: bytes) -> None:
    h.clear()
    h.raw(payload)
    assert h.sent == [] and len(h.violations()) == 1


def test_flood_stays_bounded(h: Harness) -> None:
    """100k guest messages with no driver draining: queue and tables stay within caps."""
    s = h.server
    h.clear()
    cap = s.max_pending_events
    peak = 0
    for i in range(100_000):
        kind = i % 4
        if kind == 0:  # in-progress GPADLs that never complete
            s.receive(p.GpadlHeader(1, 0x100000 + i, 0xFFF8, 1, b"").encode(), 1)
        elif kind == 1:  # replies: failed opens
            s.receive(p.OpenChannel(1, 1, 0xDEAD, 0, 4).encode(), 1)
        elif kind == 2:
            s.receive(b"\x01\x02", 1)
        else:
            s.receive(p.GpadlBody(0, 0x100000 + i - 3, (1,) * 28).encode(), 1)
        peak = max(peak, s.pending_events)
        assert s.gpadls_in_progress <= s.max_gpadls_in_progress
    assert peak <= cap + 1
    assert s.dropped_messages > 90_000
    s.check_invariants()
    # draining lets the guest be heard again
    list(s.events())
    s.receive(p.CloseChannel(77).encode(), 1)
    assert s.dropped_messages < 100_000


def test_a_violation_is_an_event_not_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """The driver logs each ProtocolViolation once, with the VM's name; the bus
    logging it too made two warning lines per hostile message (found by the e2e
    fuzzer's one-line-per-rejection check)."""
    import logging

    server = b.VmBusServer(1)
    with caplog.at_level(logging.DEBUG, logger="vmbus.bus"):
        server.receive(p.GpadlBody(0, 0xBAD, (1,)).encode(), p.CONNECTION_ID_MESSAGE)
    events = list(server.events())
    assert [type(e) for e in events] == [b.ProtocolViolation]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
