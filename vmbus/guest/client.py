"""The guest's VMBus control client, sans-IO: what Linux hv_vmbus does, message for message.

Used by the simulated VM and by tests, against ``vmbus.bus.VmBusServer``.  Same
shape as the server: calls (``connect``, ``create_gpadl``, ``open_channel`` ...) and
``receive(payload)`` (a message the host put in our SINT 2 slot) queue events;
``next_event()`` drains them.  Every message to post comes out as
``PostMessage(payload, connection_id)`` -- the HvPostMessage the guest would make.

Behaviour copied from Linux (drivers/hv/connection.c, channel.c, channel_mgmt.c):

* ``connect()``: INITIATE_CONTACT newest version first (5.3 ... 2.4, capped by
  ``max_version``); >= 5.0 goes to connection id 4 with msg_sint = 2 and afterwards
  every message uses the ``msg_conn_id`` of VERSION_RESPONSE; < 5.0 goes to id 1
  with the interrupt page GPA.  On version_supported = 0 the next version is tried.
  Once accepted: REQUESTOFFERS.
* ``create_gpadl``: one range, byte_offset 0, byte_count = pages * 4096,
  range_buflen = 8 + 8 * pages; GPADL_HEADER with up to 26 PFNs, then GPADL_BODY
  messages of up to 28 PFNs back to back; handles count up from 0xE1E10.
* ``open_channel``: openid = relid.  ``teardown_gpadl`` on a rescinded channel
  posts nothing (Linux skips the post after a rescind).

The host is not trusted either: a host message that is malformed or does not fit
the client's state raises :class:`vmbus.protocol.ProtocolError` from ``receive``.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum

from vmbus import protocol as p
from vmbus.gpadl import PAGE_SIZE, GpaRange
from vmbus.protocol import LocalProtocolError, ProtocolError

FIRST_GPADL_HANDLE = 0xE1E10  # Linux next_gpadl_handle initial value
DEFAULT_MONITOR_PAGE1 = 0x7000  # where our simulated guest keeps its pages (any aligned GPA)
DEFAULT_MONITOR_PAGE2 = 0x8000
DEFAULT_INTERRUPT_PAGE = 0x9000


# --- events ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PostMessage:
    """HvPostMessage(connection_id, payload)."""

    payload: bytes
    connection_id: int


@dataclass(frozen=True, slots=True)
class VersionAccepted:
    version: int
    msg_conn_id: int


@dataclass(frozen=True, slots=True)
class VersionRefused:
    """The host refused ``version``; the next lower one is tried (if any)."""

    version: int


@dataclass(frozen=True, slots=True)
class ConnectFailed:
    """Every version was refused."""


@dataclass(frozen=True, slots=True)
class OfferReceived:
    offer: p.OfferChannel
    relid: int
    connection_id: int
    if_type: uuid.UUID
    if_instance: uuid.UUID
    sub_channel_index: int


@dataclass(frozen=True, slots=True)
class OffersComplete:
    pass


@dataclass(frozen=True, slots=True)
class Rescinded:
    relid: int


@dataclass(frozen=True, slots=True)
class GpadlReady:
    handle: int
    relid: int
    status: int


@dataclass(frozen=True, slots=True)
class OpenResult:
    relid: int
    status: int


@dataclass(frozen=True, slots=True)
class GpadlGone:
    handle: int


@dataclass(frozen=True, slots=True)
class ModifyResult:
    relid: int
    status: int


@dataclass(frozen=True, slots=True)
class UnloadComplete:
    pass


ClientEvent = (
    PostMessage
    | VersionAccepted
    | VersionRefused
    | ConnectFailed
    | OfferReceived
    | OffersComplete
    | Rescinded
    | GpadlReady
    | OpenResult
    | GpadlGone
    | ModifyResult
    | UnloadComplete
)


class _Gpadl(Enum):
    CREATING = "creating"
    CREATED = "created"
    TEARING_DOWN = "tearing down"


class _Chan(Enum):
    CLOSED = "closed"
    OPENING = "opening"
    OPEN = "open"


@dataclass(slots=True)
class _ChannelInfo:
    offer: p.OfferChannel
    rescinded: bool = False
    state: _Chan = _Chan.CLOSED
    gpadls: dict[int, _Gpadl] = field(default_factory=dict)


def gpadl_messages(relid: int, handle: int, pfns: Sequence[int]) -> list[p.Message]:
    """Split one single-range GPADL the way Linux create_gpadl_header does."""
    pages = len(pfns)
    if not 1 <= pages <= p.MAX_SINGLE_RANGE_PAGES:
        raise LocalProtocolError(f"a GPADL has 1..{p.MAX_SINGLE_RANGE_PAGES} pages, not {pages}")
    head = pfns[: p.GPADL_HEADER_MAX_PFNS]
    range_data = p.encode_gpa_ranges([GpaRange(pages * PAGE_SIZE, 0, tuple(head))])
    msgs: list[p.Message] = [p.GpadlHeader(relid, handle, 8 + 8 * pages, 1, range_data)]
    for start in range(p.GPADL_HEADER_MAX_PFNS, pages, p.GPADL_BODY_MAX_PFNS):
        chunk = tuple(pfns[start : start + p.GPADL_BODY_MAX_PFNS])
        msgs.append(p.GpadlBody(0, handle, chunk))
    return msgs


class VmBusClient:
    """Guest-side VMBus control state machine (see module docstring)."""

    def __init__(
        self,
        *,
        max_version: int = p.VERSION_WIN10_V5_3,
        versions: Sequence[int] = p.LINUX_VERSIONS,
        target_vcpu: int = 0,
        msg_vtl: int = 0,
        monitor_page1: int = DEFAULT_MONITOR_PAGE1,
        monitor_page2: int = DEFAULT_MONITOR_PAGE2,
        interrupt_page: int = DEFAULT_INTERRUPT_PAGE,
    ) -> None:
        self._to_try = [v for v in versions if v <= max_version]
        self.target_vcpu = target_vcpu
        self.msg_vtl = msg_vtl
        self.monitor_page1 = monitor_page1
        self.monitor_page2 = monitor_page2
        self.interrupt_page = interrupt_page
        self._events: deque[ClientEvent] = deque()
        self._trying: int | None = None  # index into _to_try while negotiating
        self.version: int | None = None
        self.msg_conn_id = p.CONNECTION_ID_MESSAGE
        self._offers_requested = False
        self._unloading = False
        self.channels: dict[int, _ChannelInfo] = {}
        self._next_handle = FIRST_GPADL_HANDLE
        self._gpadl_owner: dict[int, int] = {}  # handle -> relid
        self._modify_pending: set[int] = set()

    # --- events ---------------------------------------------------------------------------

    def next_event(self) -> ClientEvent | None:
        return self._events.popleft() if self._events else None

    def events(self) -> Iterator[ClientEvent]:
        while (ev := self.next_event()) is not None:
            yield ev

    def _post(self, msg: p.Message, connection_id: int | None = None) -> None:
        conn = self.msg_conn_id if connection_id is None else connection_id
        self._events.append(PostMessage(msg.encode(), conn))

    def _require_connected(self) -> None:
        if self.version is None or self._unloading:
            raise LocalProtocolError("not connected")

    def _channel(self, relid: int) -> _ChannelInfo:
        ch = self.channels.get(relid)
        if ch is None:
            raise LocalProtocolError(f"no offer for relid {relid}")
        return ch

    # --- calls ----------------------------------------------------------------------------

    def connect(self) -> None:
        """Start version negotiation (again: the host treats it as a bus reset)."""
        if not self._to_try:
            raise LocalProtocolError("no version to try")
        self._forget_bus()
        self._trying = 0
        self._send_contact()

    def _send_contact(self) -> None:
        assert self._trying is not None
        v = self._to_try[self._trying]
        if v >= p.VERSION_WIN10_V5:
            page_field = p.InitiateContact.sint_field(p.VMBUS_MESSAGE_SINT, self.msg_vtl)
            conn = p.CONNECTION_ID_MESSAGE_4
        else:
            page_field = self.interrupt_page
            conn = p.CONNECTION_ID_MESSAGE
        msg = p.InitiateContact(
            v, self.target_vcpu, page_field, self.monitor_page1, self.monitor_page2
        )
        self._post(msg, conn)

    def create_gpadl(self, relid: int, pfns: Sequence[int]) -> int:
        """Register ``pfns`` (4 KiB frames) for ``relid``; GpadlReady(handle) follows."""
        self._require_connected()
        ch = self._channel(relid)
        if ch.rescinded:
            raise LocalProtocolError(f"relid {relid} was rescinded")
        handle = self._next_handle
        msgs = gpadl_messages(relid, handle, pfns)
        self._next_handle += 1
        ch.gpadls[handle] = _Gpadl.CREATING
        self._gpadl_owner[handle] = relid
        for msg in msgs:
            self._post(msg)
        return handle

    def open_channel(
        self,
        relid: int,
        gpadl: int,
        downstream_offset: int,
        target_vp: int = 0,
        userdata: bytes = b"",
    ) -> None:
        """OPENCHANNEL with openid = relid; OpenResult follows."""
        self._require_connected()
        ch = self._channel(relid)
        if ch.state is not _Chan.CLOSED:
            raise LocalProtocolError(f"relid {relid} is {ch.state.value}")
        ch.state = _Chan.OPENING
        self._post(p.OpenChannel(relid, relid, gpadl, target_vp, downstream_offset, userdata))

    def close_channel(self, relid: int) -> None:
        """CLOSECHANNEL (no reply).  Linux posts it even for a rescinded channel."""
        self._require_connected()
        ch = self._channel(relid)
        if ch.state is _Chan.CLOSED:
            raise LocalProtocolError(f"relid {relid} is not open")
        ch.state = _Chan.CLOSED
        self._post(p.CloseChannel(relid))

    def teardown_gpadl(self, relid: int, handle: int) -> None:
        """GPADL_TEARDOWN; GpadlGone follows.  After a rescind: local only, no post."""
        self._require_connected()
        ch = self._channel(relid)
        if ch.gpadls.get(handle) is not _Gpadl.CREATED:
            raise LocalProtocolError(f"GPADL {handle:#x} of relid {relid} is not created")
        if ch.rescinded:
            del ch.gpadls[handle]
            self._gpadl_owner.pop(handle, None)
            return
        ch.gpadls[handle] = _Gpadl.TEARING_DOWN
        self._post(p.GpadlTeardown(relid, handle))

    def release_relid(self, relid: int) -> None:
        """RELID_RELEASED for a rescinded channel: we forgot it."""
        self._require_connected()
        ch = self._channel(relid)
        if not ch.rescinded:
            raise LocalProtocolError(f"relid {relid} was not rescinded")
        for handle in ch.gpadls:
            self._gpadl_owner.pop(handle, None)
        del self.channels[relid]
        self._post(p.RelidReleased(relid))

    def modify_channel(self, relid: int, target_vp: int) -> None:
        """MODIFYCHANNEL (>= 4.1); ModifyResult follows from 5.3 on."""
        self._require_connected()
        assert self.version is not None
        if self.version < p.VERSION_WIN10_V4_1:
            raise LocalProtocolError("MODIFYCHANNEL needs 4.1")
        self._channel(relid)
        if self.version >= p.VERSION_WIN10_V5_3:
            self._modify_pending.add(relid)
        self._post(p.ModifyChannel(relid, target_vp))

    def unload(self) -> None:
        """UNLOAD; UnloadComplete follows once the host dropped everything."""
        self._require_connected()
        self._unloading = True
        self._post(p.Unload())

    def post_raw(self, payload: bytes, connection_id: int | None = None) -> None:
        """Post arbitrary bytes (tests of a hostile guest)."""
        conn = self.msg_conn_id if connection_id is None else connection_id
        self._events.append(PostMessage(bytes(payload), conn))

    # --- host messages --------------------------------------------------------------------

    def receive(self, payload: bytes) -> None:
        """One message from the host; raises ProtocolError if the host broke the protocol."""
        msg = p.decode(payload)
        if msg.TYPE in p.GUEST_TO_HOST:
            raise ProtocolError(f"host sent guest-to-host message {msg.TYPE.name}")
        if isinstance(msg, p.VersionResponse):
            self._on_version_response(msg)
            return
        if self.version is None:
            raise ProtocolError(f"{msg.TYPE.name} before VERSION_RESPONSE")
        match msg:
            case p.OfferChannel():
                self._on_offer(msg)
            case p.AllOffersDelivered():
                self._events.append(OffersComplete())
            case p.RescindChannelOffer():
                ch = self.channels.get(msg.child_relid)
                if ch is None or ch.rescinded:
                    raise ProtocolError(f"rescind of unknown relid {msg.child_relid}")
                ch.rescinded = True
                self._events.append(Rescinded(msg.child_relid))
            case p.GpadlCreated():
                self._on_gpadl_created(msg)
            case p.GpadlTorndown():
                self._on_torndown(msg)
            case p.OpenChannelResult():
                ch = self.channels.get(msg.child_relid)
                if ch is None or ch.state is not _Chan.OPENING or msg.openid != msg.child_relid:
                    raise ProtocolError(f"unexpected OPENCHANNEL_RESULT for {msg.child_relid}")
                ch.state = _Chan.OPEN if msg.status == 0 else _Chan.CLOSED
                self._events.append(OpenResult(msg.child_relid, msg.status))
            case p.ModifyChannelResponse():
                if msg.child_relid not in self._modify_pending:
                    raise ProtocolError(f"unexpected MODIFYCHANNEL_RESPONSE {msg.child_relid}")
                self._modify_pending.discard(msg.child_relid)
                self._events.append(ModifyResult(msg.child_relid, msg.status))
            case p.UnloadResponse():
                if not self._unloading:
                    raise ProtocolError("UNLOAD_RESPONSE without UNLOAD")
                self._forget_bus()
                self._events.append(UnloadComplete())
            case p.TlConnectResult():
                pass  # Linux has no handler for it
            case _:
                raise ProtocolError(f"unexpected {msg.TYPE.name}")

    def _on_version_response(self, msg: p.VersionResponse) -> None:
        if self._trying is None:
            raise ProtocolError("VERSION_RESPONSE without INITIATE_CONTACT")
        v = self._to_try[self._trying]
        if msg.version_supported:
            self._trying = None
            self.version = v
            self.msg_conn_id = msg.msg_conn_id if v >= p.VERSION_WIN10_V5 else 1
            self._events.append(VersionAccepted(v, self.msg_conn_id))
            self._offers_requested = True
            self._post(p.RequestOffers())
            return
        self._events.append(VersionRefused(v))
        self._trying += 1
        if self._trying == len(self._to_try):
            self._trying = None
            self._events.append(ConnectFailed())
        else:
            self._send_contact()

    def _on_offer(self, o: p.OfferChannel) -> None:
        if not self._offers_requested:
            raise ProtocolError("OFFERCHANNEL before REQUESTOFFERS")
        if not 1 <= o.child_relid <= p.MAX_RELID:
            raise ProtocolError(f"offer with relid {o.child_relid}")
        if o.child_relid in self.channels:
            raise ProtocolError(f"offer reuses relid {o.child_relid} before RELID_RELEASED")
        live = {
            (c.offer.if_type, c.offer.if_instance, c.offer.sub_channel_index)
            for c in self.channels.values()
            if not c.rescinded
        }
        if (o.if_type, o.if_instance, o.sub_channel_index) in live:
            raise ProtocolError(f"duplicate offer {o.if_instance} #{o.sub_channel_index}")
        if o.sub_channel_index and (o.if_type, o.if_instance, 0) not in live:
            raise ProtocolError("sub-channel offered before its primary")
        self.channels[o.child_relid] = _ChannelInfo(o)
        self._events.append(
            OfferReceived(
                o, o.child_relid, o.connection_id, o.if_type, o.if_instance, o.sub_channel_index
            )
        )

    def _on_gpadl_created(self, msg: p.GpadlCreated) -> None:
        relid = self._gpadl_owner.get(msg.gpadl)
        ch = self.channels.get(msg.child_relid)
        if (
            relid != msg.child_relid
            or ch is None
            or ch.gpadls.get(msg.gpadl) is not _Gpadl.CREATING
        ):
            raise ProtocolError(f"unexpected GPADL_CREATED {msg.gpadl:#x} relid {msg.child_relid}")
        if msg.status == 0:
            ch.gpadls[msg.gpadl] = _Gpadl.CREATED
        else:
            del ch.gpadls[msg.gpadl]
            del self._gpadl_owner[msg.gpadl]
        self._events.append(GpadlReady(msg.gpadl, msg.child_relid, msg.status))

    def _on_torndown(self, msg: p.GpadlTorndown) -> None:
        relid = self._gpadl_owner.get(msg.gpadl)
        ch = self.channels.get(relid) if relid is not None else None
        if ch is None or ch.gpadls.get(msg.gpadl) is not _Gpadl.TEARING_DOWN:
            raise ProtocolError(f"unexpected GPADL_TORNDOWN {msg.gpadl:#x}")
        del ch.gpadls[msg.gpadl]
        del self._gpadl_owner[msg.gpadl]
        self._events.append(GpadlGone(msg.gpadl))

    def _forget_bus(self) -> None:
        self.version = None
        self.msg_conn_id = p.CONNECTION_ID_MESSAGE
        self._offers_requested = False
        self._unloading = False
        self._trying = None
        self.channels.clear()
        self._gpadl_owner.clear()
        self._modify_pending.clear()
