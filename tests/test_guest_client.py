"""VmBusClient on its own: the exact messages a Linux guest posts, and host-error detection."""

from __future__ import annotations

import uuid

import pytest

from vmbus import protocol as p
from vmbus.guest import client as c

NIC = uuid.UUID("f8615163-df3e-46c5-913f-f2d2f965ed0e")


def posts(cl: c.VmBusClient) -> list[tuple[p.Message, int, int]]:
    """(message, connection id, payload size) of every queued post; other events dropped."""
    out = []
    for ev in cl.events():
        if isinstance(ev, c.PostMessage):
            out.append((p.decode(ev.payload), ev.connection_id, len(ev.payload)))
    return out


def connected(version: int = p.VERSION_WIN10_V5_3, msg_conn_id: int = 1) -> c.VmBusClient:
    cl = c.VmBusClient(max_version=version)
    cl.connect()
    cl.receive(p.VersionResponse(1, 0, msg_conn_id).encode())
    list(cl.events())
    return cl


def offer(relid: int, sub: int = 0, inst: int = 1) -> bytes:
    return p.OfferChannel(NIC, uuid.UUID(int=inst), relid, 0x2000 | relid, sub).encode()


def test_connect_newest_first_then_falls_back() -> None:
    cl = c.VmBusClient(target_vcpu=1)
    cl.connect()
    ((msg, conn, size),) = posts(cl)
    assert isinstance(msg, p.InitiateContact) and size == 40
    assert msg.version_requested == p.VERSION_WIN10_V5_3 and conn == 4
    assert (msg.msg_sint, msg.msg_vtl, msg.target_vcpu) == (2, 0, 1)
    assert msg.monitor_page1 and msg.monitor_page2
    tried = [msg.version_requested]
    for _ in range(len(p.LINUX_VERSIONS) - 1):
        cl.receive(p.VersionResponse(0).encode())
        ((msg, conn, _),) = posts(cl)
        tried.append(msg.version_requested)
        assert conn == (4 if msg.version_requested >= p.VERSION_WIN10_V5 else 1)
        if msg.version_requested < p.VERSION_WIN10_V5:
            assert msg.interrupt_page == c.DEFAULT_INTERRUPT_PAGE
    assert tried == list(p.LINUX_VERSIONS)
    cl.receive(p.VersionResponse(0).encode())
    evs = list(cl.events())
    assert evs == [c.VersionRefused(p.VERSION_WIN8), c.ConnectFailed()]
    assert cl.version is None


def test_max_version_caps_the_first_try() -> None:
    cl = c.VmBusClient(max_version=p.VERSION_WIN10)
    cl.connect()
    ((msg, conn, _),) = posts(cl)
    assert msg.version_requested == p.VERSION_WIN10 and conn == 1
    with pytest.raises(p.LocalProtocolError):
        c.VmBusClient(max_version=p.VERSION_WIN7).connect()


def test_msg_conn_id_from_response_is_used() -> None:
    cl = c.VmBusClient()
    cl.connect()
    posts(cl)
    cl.receive(p.VersionResponse(1, 0, 9).encode())
    evs = list(cl.events())
    assert evs[0] == c.VersionAccepted(p.VERSION_WIN10_V5_3, 9)
    assert evs[1] == c.PostMessage(p.RequestOffers().encode(), 9)
    # below 5.0 the field is ignored: always connection id 1
    cl = connected(p.VERSION_WIN10, msg_conn_id=1234)
    assert cl.msg_conn_id == 1


@pytest.mark.parametrize("pages", [1, 26, 27, 54, 55, 56, 8190])
def test_gpadl_split_exactly_like_linux(pages: int) -> None:
    cl = connected()
    cl.receive(offer(1))
    list(cl.events())
    frames = [0x5000 + 2 * i for i in range(pages)]
    handle = cl.create_gpadl(1, frames)
    assert handle == c.FIRST_GPADL_HANDLE
    out = posts(cl)
    head, conn, size = out[0]
    assert isinstance(head, p.GpadlHeader) and conn == 1
    assert (head.child_relid, head.gpadl, head.rangecount) == (1, handle, 1)
    assert head.range_buflen == 8 + 8 * pages
    assert size == 20 + 8 + 8 * min(pages, 26)
    ((rng,),) = [p.parse_gpa_ranges(1, head.range_data + bytes(8 * pages))]
    assert (rng.byte_count, rng.byte_offset) == (pages * 4096, 0)
    bodies = out[1:]
    assert len(bodies) == max(0, -(-(pages - 26) // 28))
    got = list(rng.pfns[: min(pages, 26)])
    for body, conn, size in bodies:
        assert isinstance(body, p.GpadlBody) and body.gpadl == handle and body.msgnumber == 0
        assert conn == 1
        assert size == 16 + 8 * len(body.pfns) and len(body.pfns) <= 28
        got += body.pfns
    assert got == frames
    assert cl.create_gpadl(1, [1]) == handle + 1


def test_gpadl_size_limits() -> None:
    cl = connected()
    cl.receive(offer(1))
    with pytest.raises(p.LocalProtocolError):
        cl.create_gpadl(1, [])
    with pytest.raises(p.LocalProtocolError):
        cl.create_gpadl(1, list(range(8191)))
    with pytest.raises(p.LocalProtocolError):
        cl.create_gpadl(5, [1])  # no such offer


def test_open_close_teardown_messages() -> None:
    cl = connected()
    cl.receive(offer(3))
    list(cl.events())
    h = cl.create_gpadl(3, list(range(8)))
    posts(cl)
    cl.receive(p.GpadlCreated(3, h, 0).encode())
    assert list(cl.events()) == [c.GpadlReady(h, 3, 0)]
    cl.open_channel(3, h, 4, target_vp=1, userdata=b"x")
    ((m, _, size),) = posts(cl)
    assert m == p.OpenChannel(3, 3, h, 1, 4, b"x") and size == 148
    cl.receive(p.OpenChannelResult(3, 3, 0).encode())
    assert list(cl.events()) == [c.OpenResult(3, 0)]
    cl.close_channel(3)
    cl.teardown_gpadl(3, h)
    assert [m for m, _, _ in posts(cl)] == [p.CloseChannel(3), p.GpadlTeardown(3, h)]
    cl.receive(p.GpadlTorndown(h).encode())
    assert list(cl.events()) == [c.GpadlGone(h)]


def test_rescind_then_release() -> None:
    cl = connected()
    cl.receive(offer(2))
    h = cl.create_gpadl(2, [1, 2, 3])
    cl.receive(p.GpadlCreated(2, h, 0).encode())
    list(cl.events())
    cl.receive(p.RescindChannelOffer(2).encode())
    assert list(cl.events()) == [c.Rescinded(2)]
    cl.teardown_gpadl(2, h)  # Linux skips the post after a rescind
    assert posts(cl) == []
    cl.release_relid(2)
    assert [m for m, _, _ in posts(cl)] == [p.RelidReleased(2)]
    cl.receive(offer(2))  # the relid may now be reused
    assert isinstance(next(cl.events()), c.OfferReceived)


def test_modify_and_unload() -> None:
    cl = connected()
    cl.receive(offer(1))
    list(cl.events())
    cl.modify_channel(1, 2)
    assert [m for m, _, _ in posts(cl)] == [p.ModifyChannel(1, 2)]
    cl.receive(p.ModifyChannelResponse(1, 0).encode())
    assert list(cl.events()) == [c.ModifyResult(1, 0)]
    cl.unload()
    assert [m for m, _, _ in posts(cl)] == [p.Unload()]
    cl.receive(p.UnloadResponse().encode())
    assert list(cl.events()) == [c.UnloadComplete()]
    assert cl.version is None and cl.channels == {}
    old = connected(p.VERSION_WIN10)
    with pytest.raises(p.LocalProtocolError):
        old.modify_channel(1, 0)


@pytest.mark.parametrize(
    "host_bytes",
    [
        offer(0),
        offer(2048),
        offer(5, sub=1),  # sub-channel before its primary
        p.OpenChannelResult(1, 1, 0).encode(),
        p.GpadlCreated(1, 0x1234, 0).encode(),
        p.GpadlTorndown(0x1234).encode(),
        p.UnloadResponse().encode(),
        p.RescindChannelOffer(9).encode(),
        p.ModifyChannelResponse(1, 0).encode(),
        p.RequestOffers().encode(),  # guest-to-host type
        b"\x01\x00\x00\x00",
        p.OfferChannel(NIC, NIC, 1, 1).encode()[:195],
    ],
)
def test_host_errors_raise(host_bytes: bytes) -> None:
    cl = connected()
    with pytest.raises(p.ProtocolError):
        cl.receive(host_bytes)


def test_duplicate_relid_and_offer_before_contact() -> None:
    cl = connected()
    cl.receive(offer(1))
    with pytest.raises(p.ProtocolError, match="reuses relid"):
        cl.receive(offer(1, inst=2))
    with pytest.raises(p.ProtocolError, match="duplicate offer"):
        cl.receive(offer(2))
    fresh = c.VmBusClient()
    with pytest.raises(p.ProtocolError):
        fresh.receive(offer(1))
    with pytest.raises(p.ProtocolError):
        fresh.receive(p.VersionResponse(1).encode())
