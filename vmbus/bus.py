"""The host's per-VM VMBus control plane, sans-IO (h11 style): bytes in, events out.

One :class:`VmBusServer` per VM.  The driver (trio code, written elsewhere) feeds it
every control message the guest posts and drains :meth:`VmBusServer.next_event`
after each call; every side effect -- a message for the guest, a ring to map, a
ring to stop touching, a GPADL to unmap -- leaves through that one queue, in order.

API
---
``VmBusServer(vcpu_count, *, validate_pfns=None, versions=SUPPORTED_VERSIONS, limits...)``

Device side (local calls; misuse raises :class:`LocalProtocolError`):

* ``add_offer(Offer) -> relid``: relid = lowest free of 1..2047, never reused before
  the guest's RELID_RELEASED.  Recorded until the guest's REQUESTOFFERS; afterwards
  an OFFERCHANNEL goes out at once (hot-add).  A sub-channel (sub_channel_index > 0)
  needs its live primary (same if_type/if_instance) to exist, so primaries always go
  out first.  The channel's signal connection id is ``0x2000 | relid``
  (:func:`channel_connection_id`, OpenVMM's rule for VTL0/SINT2).
* ``rescind(relid)``: RESCIND_CHANNELOFFER; an opening/open channel gets
  ``ChannelClosed``; the channel's GPADLs are freed by the host (Linux sends no
  teardown after a rescind).  ``ChannelRemoved(relid)`` once the guest sent
  RELID_RELEASED and the driver completed the close: the relid is free again.
* ``open_complete(relid, status)``: answers an ``OpenRequest`` after mapping the rings
  and checking their indices; sends OPENCHANNEL_RESULT.  Non-zero: open fails, the
  channel is closed again.  After a ``ChannelClosed`` it is a no-op.
* ``close_complete(relid)``: answers every ``ChannelClosed``: the driver no longer
  touches the rings; the ring GPADL may now be torn down.
* ``gpadl(handle, relid=None) -> Gpadl``, ``gpadl_acquire(handle, relid=None) -> Gpadl``,
  ``gpadl_release(handle | Gpadl)``: look up / pin / unpin a created GPADL (device
  buffers such as netvsc's).  A pinned GPADL's GPADL_TORNDOWN waits for the unpin.
  Unknown, unfinished or dying handles raise :class:`UnknownGpadl` (a LookupError:
  the guest named it, so the device turns it into its own protocol's failure).
* ``reset()``: the VMM says the guest rebooted: as INITIATE_CONTACT would.

Guest side: ``receive(payload, connection_id)`` never raises for guest errors;
they become ``ProtocolViolation`` and, where the protocol has one, a failure reply.

Output: ``next_event() -> Event | None`` (``events()`` drains).  Introspection:
``version``, ``connected``, ``channel_state(relid)``, ``relids()``,
``pending_events``, ``dropped_messages``, ``violations``, ``gpadl_count``,
``gpadls_in_progress``, ``gpadl_pages``, ``check_invariants()`` (for tests).

Events (all frozen dataclasses): ``SendMessage(payload, target_vcpu)``,
``Connected(version, target_vcpu, interrupt_page, monitor_page1, monitor_page2)``,
``BusReset(reason)``, ``OpenRequest(relid, gpadl, downstream_offset, target_vp,
userdata, connection_id)``, ``ChannelClosed(relid, reason)``,
``ChannelModified(relid, target_vp)``, ``GpadlReleased(handle)``,
``GpadlTeardownRequested(handle, relid)`` (a device still pins it),
``ChannelRemoved(relid)``, ``Unloaded()``, ``ProtocolViolation(reason)``.

Rules chosen where the sheet leaves room (spec §4, §8.1; Linux connection.c):

* INITIATE_CONTACT for >= 5.0 must come on connection id 4 and < 5.0 on id 1 (what
  Linux does); the other pairing is refused with version_supported = 0 so the
  guest falls back, plus a violation.  Every later message must come on id 1 (the
  ``msg_conn_id`` we hand out).  INITIATE_CONTACT in any state first resets the bus.
* Unsupported version: version_supported = 0 (how Hyper-V refuses; not a violation).
* GPADL_CREATED / OPENCHANNEL_RESULT failures carry ``STATUS_UNSUCCESSFUL``.
* UNLOAD: every channel is closed and every GPADL dropped; UNLOAD_RESPONSE and
  ``Unloaded`` follow only once the driver completed every close and released every
  pin, so the host holds no guest page when the guest hears it.
* Flood bound: ``receive`` handles a guest message only while fewer than
  ``max_pending_events`` events are queued; beyond that it drops it (one violation
  per overflow episode, counted in ``dropped_messages``).  One message adds at most
  a bounded burst (REQUESTOFFERS: one per channel + 1; a reset: one per channel and
  GPADL + 1).  In-progress GPADLs, GPADLs and their pages have named caps.
"""

from __future__ import annotations

import logging
import struct
import uuid
from array import array
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from vmbus import protocol as p
from vmbus.gpadl import PAGE_SIZE, Gpadl
from vmbus.protocol import LocalProtocolError, ProtocolError

log = logging.getLogger(__name__)

# --- bounds and fixed choices (named, per STYLE.md) ------------------------------------------

# Newest first; what we accept from a guest (every version Linux tries, plus 1.1 and 6.0).
SUPPORTED_VERSIONS: tuple[int, ...] = (
    p.VERSION_COPPER,
    p.VERSION_WIN10_V5_3,
    p.VERSION_WIN10_V5_2,
    p.VERSION_WIN10_V5_1,
    p.VERSION_WIN10_V5,
    p.VERSION_WIN10_V4_1,
    p.VERSION_WIN10,
    p.VERSION_WIN8_1,
    p.VERSION_WIN8,
    p.VERSION_WIN7,
)
SUPPORTED_FEATURES = 0  # 6.0 accepted, but no 6.0 feature offered
CHANNEL_CONNECTION_ID_BASE = 0x2000  # relid | (SINT 2 << 12) | (VTL 0 << 16), as OpenVMM
GPADL_HANDLE_NONE = 0  # Linux: 0 means "no GPADL"
MIN_DOWNSTREAM_OFFSET = 2  # K >= 2: upstream ring = header page + >= 1 data page (QEMU rule)
MIN_DOWNSTREAM_PAGES = 2  # N - K >= 2: the same for the downstream ring

DEFAULT_MAX_PENDING_EVENTS = 1024
DEFAULT_MAX_GPADLS_IN_PROGRESS = 64
DEFAULT_MAX_GPADLS = 4096
DEFAULT_MAX_GPADL_PAGES = 1 << 21  # 8 GiB of guest pages registered at once per VM

PfnValidator = Callable[[Sequence[int]], bool]
_RANGE_HEAD = struct.Struct("<II")  # gpa_range: byte_count, byte_offset (then u64 PFNs)


def _saved_map(v: object, what: str) -> dict[str, Any]:
    if type(v) is not dict:
        raise SavedStateError(f"{what} must be a map")
    return v


def _saved_list(d: dict[str, Any], key: str, most: int) -> list[Any]:
    v = d.get(key)
    if type(v) is not list or len(v) > most:
        raise SavedStateError(f"{key} must be a list of at most {most}")
    return v


def _saved_int(d: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = d.get(key)
    if type(v) is not int or not lo <= v <= hi:
        raise SavedStateError(f"{key} must be an int in [{lo}, {hi}], not {str(v)[:40]!r}")
    return v


def _saved_bool(d: dict[str, Any], key: str) -> bool:
    v = d.get(key)
    if type(v) is not bool:
        raise SavedStateError(f"{key} must be a bool")
    return v


def _saved_bytes(d: dict[str, Any], key: str, lo: int, hi: int) -> bytes:
    v = d.get(key)
    if type(v) is not bytes or not lo <= len(v) <= hi:
        raise SavedStateError(f"{key} must be {lo}..{hi} bytes")
    return v


class SavedStateError(ValueError):
    """A saved bus state (``VmBusServer.restore``) that is malformed or contradicts
    itself, the VM's RAM or the bus's limits: the VMM handed it back, so it is
    untrusted input. The message names the first problem found."""


SAVED_CHANNEL_STATES = ("closed", "open")
SAVED_GPADL_STATES = ("in progress", "created", "tearing down")


class UnknownGpadl(LookupError):
    """A device asked for a GPADL handle that is not a created, live GPADL (of that relid)."""


def channel_connection_id(relid: int) -> int:
    """The connection id the guest signals a channel on (OFFERCHANNEL connection_id)."""
    return CHANNEL_CONNECTION_ID_BASE | relid


# --- public value types and events -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Offer:
    """What a device offers; the bus adds relid and connection id."""

    if_type: uuid.UUID
    if_instance: uuid.UUID
    sub_channel_index: int = 0
    mmio_megabytes: int = 0
    flags: int = 0
    user_def: bytes = b""
    monitor_id: int | None = None
    is_dedicated_interrupt: bool = True


@dataclass(frozen=True, slots=True)
class SendMessage:
    """Post ``payload`` into SINT 2 of ``target_vcpu``'s SynIC message page."""

    payload: bytes
    target_vcpu: int


@dataclass(frozen=True, slots=True)
class Connected:
    """Version negotiated; monitor/interrupt page GPAs are for the driver to validate/map."""

    version: int
    target_vcpu: int
    interrupt_page: int
    monitor_page1: int
    monitor_page2: int


@dataclass(frozen=True, slots=True)
class BusReset:
    """All guest-visible state is gone (INITIATE_CONTACT again, or ``reset()``)."""

    reason: str


@dataclass(frozen=True, slots=True)
class OpenRequest:
    """Map the rings of ``gpadl`` (upstream = pages [0, K), downstream = [K, N)),
    validate their indices, then call ``open_complete(relid, status)``."""

    relid: int
    gpadl: Gpadl
    downstream_offset: int
    target_vp: int
    userdata: bytes
    connection_id: int


@dataclass(frozen=True, slots=True)
class ChannelClosed:
    """Stop touching this channel's rings now; then call ``close_complete(relid)``."""

    relid: int
    reason: str


@dataclass(frozen=True, slots=True)
class ChannelModified:
    """Send this channel's interrupts to ``target_vp`` from now on."""

    relid: int
    target_vp: int


@dataclass(frozen=True, slots=True)
class GpadlReleased:
    """No host reference to this GPADL remains: drop any mapping of it."""

    handle: int


@dataclass(frozen=True, slots=True)
class GpadlTeardownRequested:
    """The guest asked to tear down a GPADL a device still holds: tell the holder to
    let go. GPADL_TORNDOWN goes out (and ``GpadlReleased``) at the last release."""

    handle: int
    relid: int


@dataclass(frozen=True, slots=True)
class ChannelRemoved:
    """A rescinded channel is gone for good; its relid may be handed out again."""

    relid: int


@dataclass(frozen=True, slots=True)
class Unloaded:
    """The guest unloaded VMBus; UNLOAD_RESPONSE has been queued just before this."""


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """The guest broke the protocol; already answered as the protocol says. Log only."""

    reason: str


Event = (
    SendMessage
    | Connected
    | BusReset
    | OpenRequest
    | ChannelClosed
    | ChannelModified
    | GpadlReleased
    | GpadlTeardownRequested
    | ChannelRemoved
    | Unloaded
    | ProtocolViolation
)


# --- internal state --------------------------------------------------------------------------


class ChannelState(Enum):
    CLOSED = "closed"
    OPENING = "opening"  # OpenRequest emitted, waiting for open_complete
    OPEN = "open"
    CLOSING = "closing"  # ChannelClosed emitted, waiting for close_complete


class GpadlState(Enum):
    IN_PROGRESS = "in progress"  # header seen, PFNs still arriving
    CREATED = "created"
    TEARING_DOWN = "tearing down"  # guest asked; TORNDOWN once the last reference goes
    ORPHANED = "orphaned"  # host dropped it (rescind/reset/unload); freed at last reference


@dataclass(eq=False, slots=True)
class _GpadlEntry:
    handle: int
    relid: int
    rangecount: int
    capacity: int  # bytes of range buffer expected (range_buflen rounded down to u64s)
    pages: int  # pages charged against the per-VM cap
    state: GpadlState = GpadlState.IN_PROGRESS
    buf: bytearray = field(default_factory=bytearray)
    gpadl: Gpadl | None = None
    ring_users: int = 0  # channels in OPENING/OPEN/CLOSING using it as their ring
    pins: int = 0  # gpadl_acquire by devices

    @property
    def refs(self) -> int:
        return self.ring_users + self.pins


@dataclass(eq=False, slots=True)
class _Channel:
    relid: int
    offer: Offer
    seq: int  # add order: primaries before their sub-channels
    sent: bool = False  # OFFERCHANNEL sent on the current connection
    state: ChannelState = ChannelState.CLOSED
    rescinded: bool = False
    released: bool = False  # no guest will refer to the relid again
    ring: _GpadlEntry | None = None
    openid: int = 0
    target_vp: int = 0
    reopen: p.OpenChannel | None = None  # OPENCHANNEL that arrived while CLOSING
    open_pending: bool = False  # closed while OPENING: a late open_complete is a no-op
    downstream_offset: int = 0  # of the open ring GPADL (kept for save/restore)
    userdata: bytes = b""  # the OPENCHANNEL's user data (kept for save/restore)
    revoked_gpadls: set[int] = field(default_factory=set)  # freed by rescind, for late teardowns

    @property
    def key(self) -> tuple[uuid.UUID, uuid.UUID, int]:
        return (self.offer.if_type, self.offer.if_instance, self.offer.sub_channel_index)


class VmBusServer:
    """The host's VMBus control-plane state machine for one VM (see module docstring)."""

    def __init__(
        self,
        vcpu_count: int,
        *,
        validate_pfns: PfnValidator | None = None,
        versions: Sequence[int] = SUPPORTED_VERSIONS,
        max_pending_events: int = DEFAULT_MAX_PENDING_EVENTS,
        max_gpadls_in_progress: int = DEFAULT_MAX_GPADLS_IN_PROGRESS,
        max_gpadls: int = DEFAULT_MAX_GPADLS,
        max_gpadl_pages: int = DEFAULT_MAX_GPADL_PAGES,
    ) -> None:
        if vcpu_count < 1:
            raise LocalProtocolError("a VM has at least one vCPU")
        unknown = set(versions) - set(p.ALL_VERSIONS)
        if unknown:
            raise LocalProtocolError(f"unknown versions {sorted(unknown)}")
        self.vcpu_count = vcpu_count
        self.versions = tuple(versions)
        self.max_pending_events = max_pending_events
        self.max_gpadls_in_progress = max_gpadls_in_progress
        self.max_gpadls = max_gpadls
        self.max_gpadl_pages = max_gpadl_pages
        self._validate_pfns = validate_pfns

        self._events: deque[Event] = deque()
        self._overflowing = False
        self.dropped_messages = 0
        self.violations = 0
        self.gpadl_pages_refused = 0  # GPADL_HEADERs refused over max_gpadl_pages

        self.version: int | None = None  # negotiated version, None = not connected
        self._target_vcpu = 0
        self._offers_sent = False
        self._unloading = False

        self._channels: dict[int, _Channel] = {}
        self._seq = 0
        self._gpadls: dict[int, _GpadlEntry] = {}  # the guest-visible handle namespace
        self._orphans: list[_GpadlEntry] = []  # dropped by the host, still referenced
        self._pages = 0  # pages of all entries (live + orphans)

    # --- event queue ----------------------------------------------------------------------

    def next_event(self) -> Event | None:
        """The next side effect, in order, or None when there is nothing to do."""
        if not self._events:
            return None
        ev = self._events.popleft()
        if len(self._events) < self.max_pending_events:
            self._overflowing = False
        return ev

    def events(self) -> Iterator[Event]:
        """Drain the queue (convenience for drivers and tests)."""
        while (ev := self.next_event()) is not None:
            yield ev

    @property
    def pending_events(self) -> int:
        return len(self._events)

    def _emit(self, ev: Event) -> None:
        self._events.append(ev)

    def _send(self, msg: p.Message) -> None:
        self._emit(SendMessage(msg.encode(), self._target_vcpu))

    def _violation(self, reason: str) -> None:
        self.violations += 1
        # The driver logs the ProtocolViolation event once, with the VM's name; a
        # warning here too would be two lines per hostile message.
        log.debug("guest protocol violation: %s", reason)
        self._emit(ProtocolViolation(reason))

    # --- introspection --------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.version is not None and not self._unloading

    def channel_state(self, relid: int) -> ChannelState:
        return self._channel(relid).state

    def relids(self) -> list[int]:
        return sorted(self._channels)

    @property
    def gpadls_in_progress(self) -> int:
        return sum(1 for e in self._gpadls.values() if e.state is GpadlState.IN_PROGRESS)

    @property
    def gpadl_count(self) -> int:
        return len(self._gpadls) + len(self._orphans)

    @property
    def gpadl_pages(self) -> int:
        return self._pages

    def _channel(self, relid: int) -> _Channel:
        try:
            return self._channels[relid]
        except KeyError:
            raise LocalProtocolError(f"no channel with relid {relid}") from None

    # --- device side ----------------------------------------------------------------------

    def add_offer(self, offer: Offer) -> int:
        """Register a channel; returns its relid.  Hot-adds it if offers were already sent."""
        if len(offer.user_def) > p.USER_DEF_SIZE:
            raise LocalProtocolError(f"user_def longer than {p.USER_DEF_SIZE} bytes")
        for name in ("sub_channel_index", "mmio_megabytes", "flags"):
            if not 0 <= getattr(offer, name) <= 0xFFFF:
                raise LocalProtocolError(f"{name} is a u16")
        if offer.monitor_id is not None and not 0 <= offer.monitor_id <= p.MAX_MONITOR_ID:
            raise LocalProtocolError(f"monitor_id must be 0..{p.MAX_MONITOR_ID}")
        live = {ch.key for ch in self._channels.values() if not ch.rescinded}
        key = (offer.if_type, offer.if_instance, offer.sub_channel_index)
        if key in live:
            raise LocalProtocolError(f"{key} is already offered")
        if offer.sub_channel_index and (offer.if_type, offer.if_instance, 0) not in live:
            raise LocalProtocolError("a sub-channel needs its primary offered first")
        relid = next((r for r in range(1, p.MAX_RELID + 1) if r not in self._channels), None)
        if relid is None:
            raise LocalProtocolError("all relids are in use")
        self._seq += 1
        ch = _Channel(relid, offer, self._seq)
        self._channels[relid] = ch
        if self._offers_sent and self.connected:
            self._send_offer(ch)
        return relid

    def rescind(self, relid: int) -> None:
        """Withdraw a channel (hot-remove)."""
        ch = self._channel(relid)
        if ch.rescinded:
            raise LocalProtocolError(f"relid {relid} is already rescinded")
        ch.rescinded = True
        ch.reopen = None
        if not ch.sent:  # the guest never saw it: gone at once
            ch.released = True
            self._maybe_remove(ch)
            return
        self._send(p.RescindChannelOffer(relid))
        self._close(ch, "rescinded")
        for entry in [e for e in self._gpadls.values() if e.relid == relid]:
            if entry.state is GpadlState.IN_PROGRESS:
                self._forget(entry)
            elif entry.state is GpadlState.CREATED:
                ch.revoked_gpadls.add(entry.handle)
                self._orphan(entry)
            # TEARING_DOWN: the guest may still wait; TORNDOWN goes out at the last ref.

    def open_complete(self, relid: int, status: int = p.STATUS_SUCCESS) -> None:
        """The driver mapped the rings (status 0) or could not (status != 0)."""
        ch = self._channel(relid)
        if ch.state is ChannelState.CLOSING and ch.open_pending:
            ch.open_pending = False  # closed meanwhile: the guest gets no result
            return
        if ch.state is not ChannelState.OPENING:
            raise LocalProtocolError(f"relid {relid} has no open in progress ({ch.state.value})")
        ch.open_pending = False
        if status == p.STATUS_SUCCESS:
            ch.state = ChannelState.OPEN
        else:
            ch.state = ChannelState.CLOSED
            self._drop_ring(ch)
        self._send(p.OpenChannelResult(relid, ch.openid, status & p.U32_MAX))

    def close_complete(self, relid: int) -> None:
        """The driver let go of the rings of a channel it was told to close."""
        ch = self._channel(relid)
        if ch.state is not ChannelState.CLOSING:
            raise LocalProtocolError(f"relid {relid} is not closing ({ch.state.value})")
        ch.state = ChannelState.CLOSED
        ch.open_pending = False
        self._drop_ring(ch)
        reopen, ch.reopen = ch.reopen, None
        if ch.released:
            self._maybe_remove(ch)
        elif reopen is not None and self.connected and not ch.rescinded:
            try:
                self._on_open(reopen)
            except ProtocolError as e:
                self._violation(e.reason)
        self._maybe_finish_unload()

    def gpadl(self, handle: int, relid: int | None = None) -> Gpadl:
        """A created GPADL by handle (optionally checking its owner)."""
        entry = self._gpadls.get(handle)
        if entry is None or entry.state is not GpadlState.CREATED or entry.gpadl is None:
            raise UnknownGpadl(f"no created GPADL {handle:#x}")
        if relid is not None and entry.relid != relid:
            raise UnknownGpadl(f"GPADL {handle:#x} belongs to relid {entry.relid}, not {relid}")
        return entry.gpadl

    def finish_teardowns(self) -> int:
        """After `restore`: every GPADL the guest was tearing down and nothing holds
        (device holds do not survive a restart) is freed and its GPADL_TORNDOWN
        queued. Returns how many."""
        dying = [
            e for e in self._gpadls.values() if e.state is GpadlState.TEARING_DOWN and not e.refs
        ]
        for e in dying:
            self._maybe_free(e)
        return len(dying)

    def gpadl_acquire(self, handle: int, relid: int | None = None) -> Gpadl:
        """Pin a created GPADL: its TORNDOWN waits for the matching ``gpadl_release``."""
        gpadl = self.gpadl(handle, relid)
        self._gpadls[handle].pins += 1
        return gpadl

    def gpadl_release(self, gpadl: int | Gpadl) -> None:
        """Unpin.  Pass the Gpadl returned by acquire to be exact across guest resets
        (handles are guest-chosen and Linux restarts them at 0xE1E10 after kexec)."""
        entry = self._find_pinned(gpadl)
        entry.pins -= 1
        self._maybe_free(entry)
        self._maybe_finish_unload()

    def _find_pinned(self, gpadl: int | Gpadl) -> _GpadlEntry:
        candidates = [*self._gpadls.values(), *self._orphans]
        if isinstance(gpadl, Gpadl):
            found = [e for e in candidates if e.gpadl is gpadl and e.pins]
        else:
            found = [e for e in candidates if e.handle == gpadl and e.pins]
        if len(found) != 1:
            raise LocalProtocolError(f"GPADL {gpadl!r}: {len(found)} pinned matches, need 1")
        return found[0]

    def reset(self) -> None:
        """The VMM reports a guest reboot: drop every channel's guest state and GPADL."""
        self._reset("VMM reset")

    # --- save / restore (vmbusd restart under a running guest) -----------------------------

    def save(self) -> dict[str, Any]:
        """The guest-visible bus state as plain msgpack-able data.

        Only between events: every channel closed or open (an open or close in
        progress is finished inside one pump). GPADLs the host already dropped
        (orphans) are not saved: nothing the guest can name refers to them. Pins
        are not saved either: they belong to device tasks, which a restart ends.
        """
        channels = []
        for ch in sorted(self._channels.values(), key=lambda c: c.seq):
            if ch.state not in (ChannelState.CLOSED, ChannelState.OPEN):
                raise LocalProtocolError(f"relid {ch.relid} is {ch.state.value}: not savable")
            o = ch.offer
            channels.append(
                {
                    "relid": ch.relid,
                    "if_type": o.if_type.bytes,
                    "if_instance": o.if_instance.bytes,
                    "sub": o.sub_channel_index,
                    "mmio": o.mmio_megabytes,
                    "flags": o.flags,
                    "user_def": o.user_def,
                    "monitor_id": o.monitor_id,
                    "dedicated": o.is_dedicated_interrupt,
                    "sent": ch.sent,
                    "state": ch.state.value,
                    "rescinded": ch.rescinded,
                    "released": ch.released,
                    "ring": ch.ring.handle if ch.ring is not None else None,
                    "downstream_offset": ch.downstream_offset,
                    "openid": ch.openid,
                    "target_vp": ch.target_vp,
                    "userdata": ch.userdata,
                    "revoked": sorted(ch.revoked_gpadls),
                }
            )
        gpadls = []
        for e in self._gpadls.values():
            raw = bytes(e.buf)
            if e.gpadl is not None:
                raw = b"".join(
                    _RANGE_HEAD.pack(r.byte_count, r.byte_offset) + array("Q", r.pfns).tobytes()
                    for r in e.gpadl.ranges
                )
            gpadls.append(
                {
                    "handle": e.handle,
                    "relid": e.relid,
                    "state": e.state.value,
                    "rangecount": e.rangecount,
                    "capacity": e.capacity,
                    "ranges": raw,
                }
            )
        return {
            "version": self.version,
            "target_vcpu": self._target_vcpu,
            "offers_sent": self._offers_sent,
            "unloading": self._unloading,
            "channels": channels,
            "gpadls": gpadls,
        }

    def restore(self, saved: object) -> None:
        """Take the state ``save`` produced, on a fresh server, without telling the
        guest anything. Every field is checked (types, ranges, cross-references, RAM,
        the limits); the first problem raises SavedStateError and leaves the server
        as it was. Open channels come back OPEN with their ring GPADL: the driver
        maps them and resumes their devices (no OpenRequest is emitted)."""
        if self._channels or self._gpadls or self._events or self.version is not None:
            raise LocalProtocolError("restore needs a fresh server")
        try:
            self._restore(saved)
        except SavedStateError:
            self._channels.clear()
            self._gpadls.clear()
            self._pages = 0
            self._seq = 0
            self.version = None
            self._target_vcpu = 0
            self._offers_sent = self._unloading = False
            raise
        try:
            self.check_invariants()
        except AssertionError as exc:  # pragma: no cover - the checks above cover it
            raise SavedStateError(f"inconsistent saved bus state: {exc}") from None

    @property
    def savable(self) -> bool:
        """``save`` would succeed: no channel is half way through an open or close."""
        return all(
            ch.state in (ChannelState.CLOSED, ChannelState.OPEN) for ch in self._channels.values()
        )

    def offer_of(self, relid: int) -> Offer:
        """The offer behind a relid (for a driver matching restored channels to devices)."""
        return self._channel(relid).offer

    def is_rescinded(self, relid: int) -> bool:
        return self._channel(relid).rescinded

    def open_channels(self) -> list[OpenRequest]:
        """Every OPEN channel as the OpenRequest that opened it: after ``restore``,
        what the driver maps and resumes (nothing is queued for them)."""
        return [
            OpenRequest(
                ch.relid,
                ch.ring.gpadl,
                ch.downstream_offset,
                ch.target_vp,
                ch.userdata,
                channel_connection_id(ch.relid),
            )
            for ch in sorted(self._channels.values(), key=lambda c: c.seq)
            if ch.state is ChannelState.OPEN and ch.ring is not None and ch.ring.gpadl is not None
        ]

    def _restore(self, saved: object) -> None:
        d = _saved_map(saved, "bus")
        version = d.get("version")
        if version is not None and version not in self.versions:
            raise SavedStateError(f"bus: version {version!r} is not one we speak")
        self.version = version
        self._target_vcpu = _saved_int(d, "target_vcpu", 0, self.vcpu_count - 1)
        self._offers_sent = _saved_bool(d, "offers_sent")
        self._unloading = _saved_bool(d, "unloading")
        gpadls = _saved_list(d, "gpadls", self.max_gpadls)
        chans = _saved_list(d, "channels", p.MAX_RELID)
        for raw in gpadls:
            g = _saved_map(raw, "gpadl")
            handle = _saved_int(g, "handle", 1, p.U32_MAX)
            relid = _saved_int(g, "relid", 1, p.MAX_RELID)
            where = f"GPADL {handle:#x}"
            if handle in self._gpadls:
                raise SavedStateError(f"{where} listed twice")
            state = g.get("state")
            if state not in SAVED_GPADL_STATES:
                raise SavedStateError(f"{where}: state {state!r}")
            rangecount = _saved_int(g, "rangecount", 1, p.U32_MAX)
            capacity = _saved_int(
                g, "capacity", 8 * rangecount + 8, 8 * (self.max_gpadl_pages + 2 * rangecount)
            )
            buf = g.get("ranges")
            if type(buf) is not bytes or len(buf) > capacity:
                raise SavedStateError(f"{where}: ranges must be at most {capacity} bytes")
            if capacity % 8:
                raise SavedStateError(f"{where}: capacity {capacity} is not a multiple of 8")
            entry = _GpadlEntry(
                handle, relid, rangecount, capacity, (capacity - 8 * rangecount) // 8
            )
            if state == GpadlState.IN_PROGRESS.value:
                if len(buf) % 8 or len(buf) == capacity:
                    raise SavedStateError(
                        f"{where}: in progress with {len(buf)} of {capacity} bytes"
                    )
                entry.buf = bytearray(buf)
            else:
                try:
                    ranges = p.parse_gpa_ranges(rangecount, buf)
                except ProtocolError as exc:
                    raise SavedStateError(f"{where}: {exc.reason}") from None
                gpadl = Gpadl(handle, relid, ranges)
                if self._validate_pfns is not None and not self._validate_pfns(gpadl.pfns):
                    raise SavedStateError(f"{where}: PFNs outside guest RAM")
                entry.gpadl = gpadl
                entry.pages = gpadl.page_count
                entry.state = GpadlState(state)
            if self._pages + entry.pages > self.max_gpadl_pages:
                raise SavedStateError(f"more than {self.max_gpadl_pages} GPADL pages")
            if (
                entry.state is GpadlState.IN_PROGRESS
                and self.gpadls_in_progress >= self.max_gpadls_in_progress
            ):
                raise SavedStateError(f"more than {self.max_gpadls_in_progress} GPADLs in progress")
            self._gpadls[handle] = entry
            self._pages += entry.pages
        for raw in chans:
            c = _saved_map(raw, "channel")
            relid = _saved_int(c, "relid", 1, p.MAX_RELID)
            where = f"relid {relid}"
            if relid in self._channels:
                raise SavedStateError(f"{where} listed twice")
            try:
                monitor = c.get("monitor_id")
                offer = Offer(
                    if_type=uuid.UUID(bytes=_saved_bytes(c, "if_type", 16, 16)),
                    if_instance=uuid.UUID(bytes=_saved_bytes(c, "if_instance", 16, 16)),
                    sub_channel_index=_saved_int(c, "sub", 0, 0xFFFF),
                    mmio_megabytes=_saved_int(c, "mmio", 0, 0xFFFF),
                    flags=_saved_int(c, "flags", 0, 0xFFFF),
                    user_def=_saved_bytes(c, "user_def", 0, p.USER_DEF_SIZE),
                    monitor_id=None
                    if monitor is None
                    else _saved_int(c, "monitor_id", 0, p.MAX_MONITOR_ID),
                    is_dedicated_interrupt=_saved_bool(c, "dedicated"),
                )
            except SavedStateError as exc:
                raise SavedStateError(f"{where}: {exc}") from None
            self._seq += 1
            ch = _Channel(relid, offer, self._seq)
            ch.sent = _saved_bool(c, "sent")
            ch.rescinded = _saved_bool(c, "rescinded")
            ch.released = _saved_bool(c, "released")
            state = c.get("state")
            if state not in SAVED_CHANNEL_STATES:
                raise SavedStateError(f"{where}: state {state!r}")
            ch.openid = _saved_int(c, "openid", 0, p.U32_MAX)
            ch.target_vp = _saved_int(c, "target_vp", 0, self.vcpu_count - 1)
            ch.userdata = _saved_bytes(c, "userdata", 0, p.USER_DEF_SIZE)
            revoked = c.get("revoked")
            if (
                type(revoked) is not list
                or len(revoked) > self.max_gpadls
                or not all(type(h) is int and 1 <= h <= p.U32_MAX for h in revoked)
            ):
                raise SavedStateError(f"{where}: revoked must be a list of GPADL handles")
            ch.revoked_gpadls = set(revoked)
            if (ch.sent or state == "open") and self.version is None:
                raise SavedStateError(f"{where}: offered or open on a bus that is not connected")
            if ch.released and not ch.rescinded:
                raise SavedStateError(f"{where}: released but not rescinded")
            ring = c.get("ring")
            if state == "open":
                if ch.rescinded or not ch.sent:
                    raise SavedStateError(
                        f"{where}: open but {'rescinded' if ch.rescinded else 'never offered'}"
                    )
                ring_entry = self._gpadls.get(ring) if type(ring) is int else None
                if (
                    ring_entry is None
                    or ring_entry.state is not GpadlState.CREATED
                    or ring_entry.gpadl is None
                ):
                    raise SavedStateError(f"{where}: ring GPADL {ring!r} is not a created GPADL")
                if ring_entry.relid != relid:
                    raise SavedStateError(
                        f"{where}: ring GPADL {ring:#x} belongs to relid {ring_entry.relid}"
                    )
                rngs, pages = ring_entry.gpadl.ranges, ring_entry.gpadl.page_count
                if len(rngs) != 1 or rngs[0].byte_offset or rngs[0].byte_count != pages * PAGE_SIZE:
                    raise SavedStateError(f"{where}: ring GPADL is not one page-aligned range")
                k = _saved_int(
                    c,
                    "downstream_offset",
                    MIN_DOWNSTREAM_OFFSET,
                    max(MIN_DOWNSTREAM_OFFSET, pages - MIN_DOWNSTREAM_PAGES),
                )
                if pages < k + MIN_DOWNSTREAM_PAGES:
                    raise SavedStateError(
                        f"{where}: downstream offset {k} does not split {pages} pages"
                    )
                ch.downstream_offset = k
                ch.state = ChannelState.OPEN
                ch.ring = ring_entry
                ring_entry.ring_users += 1
            elif ring is not None:
                raise SavedStateError(f"{where}: closed but has a ring GPADL")
            live = {x.key for x in self._channels.values() if not x.rescinded}
            if not ch.rescinded and ch.key in live:
                raise SavedStateError(f"{where}: the same offer twice")
            self._channels[relid] = ch
        for e in self._gpadls.values():
            ch_ = self._channels.get(e.relid)
            if ch_ is None or not ch_.sent:
                raise SavedStateError(
                    f"GPADL {e.handle:#x}: relid {e.relid} is not an offered channel"
                )
        if self._unloading and self.version is None:
            raise SavedStateError("unloading on a bus that is not connected")

    # --- guest side -----------------------------------------------------------------------

    def receive(self, payload: bytes, connection_id: int) -> None:
        """Handle one message the guest posted on ``connection_id``.  Never raises for
        guest errors (they become ``ProtocolViolation`` + the protocol's failure reply)."""
        if len(self._events) >= self.max_pending_events:
            self.dropped_messages += 1
            if not self._overflowing:
                self._overflowing = True
                self._violation("event queue full: dropping guest messages")
            return
        try:
            msg = p.decode(payload)
            self._dispatch(msg, connection_id & p.CONNECTION_ID_MASK)
        except ProtocolError as e:
            self._violation(e.reason)

    def _dispatch(self, msg: p.Message, conn_id: int) -> None:
        if isinstance(msg, p.InitiateContact):
            self._on_initiate_contact(msg, conn_id)
            return
        name = msg.TYPE.name
        if msg.TYPE not in p.GUEST_TO_HOST:
            raise ProtocolError(f"{name} is a host-to-guest message")
        if self.version is None:
            raise ProtocolError(f"{name} before a successful INITIATE_CONTACT")
        if self._unloading:
            raise ProtocolError(f"{name} while unloading")
        if conn_id != p.CONNECTION_ID_MESSAGE:
            raise ProtocolError(f"{name} on connection id {conn_id}, expected 1")
        handler = self._HANDLERS.get(type(msg))
        if handler is None:
            raise ProtocolError(f"{name} is not supported")
        handler(self, msg)

    # INITIATE_CONTACT --------------------------------------------------------------------

    def _on_initiate_contact(self, m: p.InitiateContact, conn_id: int) -> None:
        if self.version is not None or self._unloading or self._has_guest_state():
            self._reset("INITIATE_CONTACT")
        v = m.version_requested
        self._target_vcpu = m.target_vcpu if m.target_vcpu < self.vcpu_count else 0

        def refuse(reason: str | None) -> None:
            state = p.CONNECTION_STATE_SUCCESSFUL
            if reason is not None:
                state = p.CONNECTION_STATE_FAILED_UNKNOWN_FAILURE
            self._send(p.VersionResponse(0, state, 0))
            self._target_vcpu = 0
            if reason is not None:
                raise ProtocolError(f"INITIATE_CONTACT {p.version_str(v)}: {reason}")

        if conn_id not in (p.CONNECTION_ID_MESSAGE, p.CONNECTION_ID_MESSAGE_4):
            refuse(f"on connection id {conn_id}")
        if v not in self.versions:
            refuse(None)
            return
        wants_4 = v >= p.VERSION_WIN10_V5
        if wants_4 != (conn_id == p.CONNECTION_ID_MESSAGE_4):
            refuse(f"on connection id {conn_id}; >= 5.0 uses 4, older versions 1")
        if v >= p.VERSION_WIN8_1 and m.target_vcpu >= self.vcpu_count:
            refuse(f"target_vcpu {m.target_vcpu} >= vcpu count {self.vcpu_count}")
        if wants_4 and m.msg_sint != p.VMBUS_MESSAGE_SINT:
            refuse(f"msg_sint {m.msg_sint}, only {p.VMBUS_MESSAGE_SINT} is supported")
        if (m.monitor_page1 == 0) != (m.monitor_page2 == 0):
            refuse("exactly one monitor page is zero")
        if (m.monitor_page1 | m.monitor_page2) % PAGE_SIZE:
            refuse("monitor page not page-aligned")
        interrupt_page = 0  # from 2.4 on, channel interrupts use the SynIC event flags
        if v < p.VERSION_WIN8:
            interrupt_page = m.interrupt_page
            if not interrupt_page or interrupt_page % PAGE_SIZE:
                refuse(f"interrupt page {interrupt_page:#x} is not a page address")
            if self._validate_pfns is not None and not self._validate_pfns(
                [interrupt_page // PAGE_SIZE]
            ):
                refuse(f"interrupt page {interrupt_page:#x} is not guest RAM")
        self.version = v
        if v < p.VERSION_WIN8_1:
            self._target_vcpu = 0  # honoured from 3.0 on
        self._emit(
            Connected(
                v,
                self._target_vcpu,
                interrupt_page,
                m.monitor_page1,
                m.monitor_page2,
            )
        )
        self._send(
            p.VersionResponse(
                1,
                p.CONNECTION_STATE_SUCCESSFUL,
                p.CONNECTION_ID_MESSAGE if wants_4 else v,  # < 5.0: OpenVMM echoes the version
                SUPPORTED_FEATURES if v >= p.VERSION_COPPER else None,
            )
        )

    # REQUESTOFFERS -----------------------------------------------------------------------

    def _on_request_offers(self, m: p.RequestOffers) -> None:
        if self._offers_sent:
            raise ProtocolError("second REQUESTOFFERS on this connection")
        self._offers_sent = True
        for ch in sorted(self._channels.values(), key=lambda c: c.seq):
            if not ch.rescinded:
                self._send_offer(ch)
        self._send(p.AllOffersDelivered())

    def _send_offer(self, ch: _Channel) -> None:
        o = ch.offer
        assert self.version is not None
        sub_index = o.sub_channel_index if self.version >= p.VERSION_WIN8 else 0
        ch.sent = True
        self._send(
            p.OfferChannel(
                if_type=o.if_type,
                if_instance=o.if_instance,
                child_relid=ch.relid,
                connection_id=channel_connection_id(ch.relid),
                sub_channel_index=sub_index,
                flags=o.flags,
                mmio_megabytes=o.mmio_megabytes,
                user_def=o.user_def,
                monitor_id=p.MONITOR_ID_NONE if o.monitor_id is None else o.monitor_id,
                monitor_allocated=o.monitor_id is not None,
                is_dedicated_interrupt=o.is_dedicated_interrupt,
            )
        )

    # GPADLs ------------------------------------------------------------------------------

    def _on_gpadl_header(self, m: p.GpadlHeader) -> None:
        def fail(reason: str) -> None:
            self._send(p.GpadlCreated(m.child_relid, m.gpadl, p.STATUS_UNSUCCESSFUL))
            raise ProtocolError(f"GPADL_HEADER {m.gpadl:#x} relid {m.child_relid}: {reason}")

        ch = self._channels.get(m.child_relid)
        if ch is None or not ch.sent or ch.rescinded:
            fail("not an offered channel")
        if m.gpadl == GPADL_HANDLE_NONE:
            fail("handle 0 is reserved")
        if m.gpadl in self._gpadls:
            fail("handle already in use")
        if m.rangecount < 1:
            fail("rangecount 0")
        if m.range_buflen < 8 * m.rangecount + 8:
            fail(f"range_buflen {m.range_buflen} < 8 * rangecount + 8")
        if self.gpadls_in_progress >= self.max_gpadls_in_progress:
            fail(f"more than {self.max_gpadls_in_progress} GPADLs in progress")
        if self.gpadl_count >= self.max_gpadls:
            fail(f"more than {self.max_gpadls} GPADLs")
        capacity = m.range_buflen // 8 * 8
        pages = (capacity - 8 * m.rangecount) // 8  # at most this many PFNs fit
        if self._pages + pages > self.max_gpadl_pages:
            self.gpadl_pages_refused += 1  # vmbus.limits counts it (limits.gpadl_bytes)
            fail(f"more than {self.max_gpadl_pages} GPADL pages (limits.gpadl_bytes or RAM)")
        entry = _GpadlEntry(m.gpadl, m.child_relid, m.rangecount, capacity, pages)
        self._gpadls[m.gpadl] = entry
        self._pages += pages
        self._append(entry, m.range_data)

    def _on_gpadl_body(self, m: p.GpadlBody) -> None:
        entry = self._gpadls.get(m.gpadl)
        if entry is None:
            raise ProtocolError(f"GPADL_BODY for unknown handle {m.gpadl:#x}")
        if entry.state is not GpadlState.IN_PROGRESS:
            raise ProtocolError(f"GPADL_BODY for complete handle {m.gpadl:#x}")
        data = b"".join(pfn.to_bytes(8, "little") for pfn in m.pfns)
        self._append(entry, data)

    def _append(self, entry: _GpadlEntry, data: bytes) -> None:
        room = entry.capacity - len(entry.buf)
        whole = len(data) // 8 * 8  # the buffer is u64s; a partial one is ignored
        entry.buf += data[: min(room, whole)]  # bytes past the capacity are ignored
        if len(entry.buf) == entry.capacity:
            self._finish_gpadl(entry)

    def _finish_gpadl(self, entry: _GpadlEntry) -> None:
        def fail(reason: str) -> None:
            self._forget(entry)
            self._send(p.GpadlCreated(entry.relid, entry.handle, p.STATUS_UNSUCCESSFUL))
            raise ProtocolError(f"GPADL {entry.handle:#x}: {reason}")

        try:
            ranges = p.parse_gpa_ranges(entry.rangecount, bytes(entry.buf))
        except ProtocolError as e:
            fail(e.reason)
        gpadl = Gpadl(entry.handle, entry.relid, ranges)
        if self._validate_pfns is not None and not self._validate_pfns(gpadl.pfns):
            fail("PFNs outside guest RAM")
        entry.buf = bytearray()
        entry.gpadl = gpadl
        entry.state = GpadlState.CREATED
        self._pages += gpadl.page_count - entry.pages
        entry.pages = gpadl.page_count
        self._send(p.GpadlCreated(entry.relid, entry.handle, p.STATUS_SUCCESS))

    def _on_gpadl_teardown(self, m: p.GpadlTeardown) -> None:
        ch = self._channels.get(m.child_relid)
        if ch is not None and m.gpadl in ch.revoked_gpadls:
            ch.revoked_gpadls.discard(m.gpadl)  # freed by our rescind: acknowledge at once
            self._send(p.GpadlTorndown(m.gpadl))
            return
        entry = self._gpadls.get(m.gpadl)
        what = f"GPADL_TEARDOWN {m.gpadl:#x}"
        if entry is None:
            raise ProtocolError(f"{what}: unknown handle")
        if entry.relid != m.child_relid:
            raise ProtocolError(f"{what}: belongs to relid {entry.relid}, not {m.child_relid}")
        if entry.state is not GpadlState.CREATED:
            raise ProtocolError(f"{what}: {entry.state.value}")
        entry.state = GpadlState.TEARING_DOWN
        if entry.pins:
            self._emit(GpadlTeardownRequested(entry.handle, entry.relid))
        self._maybe_free(entry)

    # channels ----------------------------------------------------------------------------

    def _on_open(self, m: p.OpenChannel) -> None:
        ch = self._channels.get(m.child_relid)

        def fail(reason: str) -> None:
            self._send(p.OpenChannelResult(m.child_relid, m.openid, p.STATUS_UNSUCCESSFUL))
            raise ProtocolError(f"OPENCHANNEL relid {m.child_relid}: {reason}")

        if ch is None or not ch.sent:
            fail("not an offered channel")
        assert ch is not None
        if ch.rescinded:
            return  # Hyper-V silently ignores an open that raced with the rescind
        if ch.state in (ChannelState.OPENING, ChannelState.OPEN):
            fail(f"channel already {ch.state.value}")
        if ch.state is ChannelState.CLOSING:
            if ch.reopen is not None:
                fail("second OPENCHANNEL while closing")
            ch.reopen = m  # OpenVMM ClosingReopen: handled at close_complete
            return
        entry = self._gpadls.get(m.ringbuffer_gpadl)
        if entry is None or entry.state is not GpadlState.CREATED or entry.gpadl is None:
            fail(f"GPADL {m.ringbuffer_gpadl:#x} is not created")
        assert entry is not None and entry.gpadl is not None
        if entry.relid != ch.relid:
            fail(f"GPADL {m.ringbuffer_gpadl:#x} belongs to relid {entry.relid}")
        ranges = entry.gpadl.ranges
        pages = entry.gpadl.page_count
        if len(ranges) != 1 or ranges[0].byte_offset or ranges[0].byte_count != pages * PAGE_SIZE:
            fail("ring GPADL must be one page-aligned range")
        k = m.downstream_offset
        if k < MIN_DOWNSTREAM_OFFSET or pages < k + MIN_DOWNSTREAM_PAGES:
            fail(f"downstream offset {k} does not split {pages} pages into two rings")
        assert self.version is not None
        target_vp = m.target_vp if self.version >= p.VERSION_WIN8 else 0
        if target_vp >= self.vcpu_count:
            fail(f"target_vp {target_vp} >= vcpu count {self.vcpu_count}")
        ch.state = ChannelState.OPENING
        ch.open_pending = True
        ch.ring = entry
        entry.ring_users += 1
        ch.openid = m.openid
        ch.target_vp = target_vp
        ch.downstream_offset = k
        ch.userdata = bytes(m.userdata)
        self._emit(
            OpenRequest(
                ch.relid,
                entry.gpadl,
                k,
                target_vp,
                m.userdata,
                channel_connection_id(ch.relid),
            )
        )

    def _on_close(self, m: p.CloseChannel) -> None:
        ch = self._channels.get(m.child_relid)
        if ch is None or not ch.sent or ch.rescinded:
            return  # unknown, or Linux closing a rescinded channel: ignore
        if ch.state is ChannelState.CLOSING and ch.reopen is not None:
            ch.reopen = None  # close of the queued reopen
            return
        if ch.state not in (ChannelState.OPENING, ChannelState.OPEN):
            raise ProtocolError(f"CLOSECHANNEL relid {ch.relid}: channel is {ch.state.value}")
        self._close(ch, "closed by guest")

    def _on_relid_released(self, m: p.RelidReleased) -> None:
        ch = self._channels.get(m.child_relid)
        if ch is None or not ch.sent:
            raise ProtocolError(f"RELID_RELEASED for unknown relid {m.child_relid}")
        if not ch.rescinded or ch.released:
            raise ProtocolError(f"RELID_RELEASED for relid {ch.relid} that was not rescinded")
        ch.released = True
        self._maybe_remove(ch)

    def _on_modify(self, m: p.ModifyChannel) -> None:
        assert self.version is not None
        if self.version < p.VERSION_WIN10_V4_1:
            raise ProtocolError(
                f"MODIFYCHANNEL needs 4.1, negotiated {p.version_str(self.version)}"
            )
        reply = self.version >= p.VERSION_WIN10_V5_3
        ch = self._channels.get(m.child_relid)
        if ch is None or not ch.sent:
            raise ProtocolError(f"MODIFYCHANNEL for unknown relid {m.child_relid}")

        def fail(reason: str) -> None:
            if reply:
                self._send(p.ModifyChannelResponse(ch.relid, p.STATUS_UNSUCCESSFUL))
            raise ProtocolError(f"MODIFYCHANNEL relid {ch.relid}: {reason}")

        if ch.state is not ChannelState.OPEN or ch.rescinded:
            fail(f"channel is {ch.state.value}")
        if m.target_vp >= self.vcpu_count:
            fail(f"target_vp {m.target_vp} >= vcpu count {self.vcpu_count}")
        ch.target_vp = m.target_vp
        self._emit(ChannelModified(ch.relid, m.target_vp))
        if reply:
            self._send(p.ModifyChannelResponse(ch.relid, p.STATUS_SUCCESS))

    def _on_tl_connect(self, m: p.TlConnectRequest) -> None:
        assert self.version is not None
        if self.version < p.VERSION_WIN10:
            raise ProtocolError("TL_CONNECT_REQUEST needs 4.0")
        # We offer no hv_sock services: refuse (the result exists from 4.1 on).
        if self.version >= p.VERSION_WIN10_V4_1:
            self._send(
                p.TlConnectResult(
                    m.guest_endpoint_id, m.host_service_id, p.STATUS_CONNECTION_REFUSED
                )
            )

    def _on_unload(self, m: p.Unload) -> None:
        self._drop_everything("unload")
        self._unloading = True
        self._maybe_finish_unload()

    # Each handler takes its own message type; _dispatch looks it up by that type.
    _HANDLERS: dict[type[p.Message], Callable[[VmBusServer, Any], None]] = {
        p.RequestOffers: _on_request_offers,
        p.GpadlHeader: _on_gpadl_header,
        p.GpadlBody: _on_gpadl_body,
        p.GpadlTeardown: _on_gpadl_teardown,
        p.OpenChannel: _on_open,
        p.CloseChannel: _on_close,
        p.RelidReleased: _on_relid_released,
        p.ModifyChannel: _on_modify,
        p.TlConnectRequest: _on_tl_connect,
        p.Unload: _on_unload,
    }

    # --- shared transitions ---------------------------------------------------------------

    def _close(self, ch: _Channel, reason: str) -> None:
        """Tell the driver to stop touching the rings (if it had them)."""
        ch.reopen = None
        if ch.state in (ChannelState.OPENING, ChannelState.OPEN):
            ch.open_pending = ch.state is ChannelState.OPENING
            ch.state = ChannelState.CLOSING
            self._emit(ChannelClosed(ch.relid, reason))

    def _drop_ring(self, ch: _Channel) -> None:
        entry, ch.ring = ch.ring, None
        if entry is not None:
            entry.ring_users -= 1
            self._maybe_free(entry)

    def _forget(self, entry: _GpadlEntry) -> None:
        """Remove an unreferenced GPADL that never became usable (in progress / failed)."""
        del self._gpadls[entry.handle]
        self._pages -= entry.pages

    def _orphan(self, entry: _GpadlEntry) -> None:
        """The host drops a created GPADL: out of the guest's namespace, freed at last ref."""
        del self._gpadls[entry.handle]
        entry.state = GpadlState.ORPHANED
        self._orphans.append(entry)
        self._maybe_free(entry)

    def _maybe_free(self, entry: _GpadlEntry) -> None:
        if entry.refs:
            return
        if entry.state is GpadlState.TEARING_DOWN:
            del self._gpadls[entry.handle]
            self._pages -= entry.pages
            self._emit(GpadlReleased(entry.handle))
            self._send(p.GpadlTorndown(entry.handle))
        elif entry.state is GpadlState.ORPHANED:
            self._orphans.remove(entry)
            self._pages -= entry.pages
            self._emit(GpadlReleased(entry.handle))

    def _maybe_remove(self, ch: _Channel) -> None:
        if ch.released and ch.state is ChannelState.CLOSED:
            del self._channels[ch.relid]
            self._emit(ChannelRemoved(ch.relid))

    def _has_guest_state(self) -> bool:
        return bool(self._gpadls) or any(
            ch.sent or ch.state is not ChannelState.CLOSED for ch in self._channels.values()
        )

    def _drop_everything(self, reason: str) -> None:
        """Close every channel and drop every GPADL: the guest forgets the bus."""
        for ch in sorted(self._channels.values(), key=lambda c: c.seq):
            self._close(ch, reason)
            ch.reopen = None
            ch.revoked_gpadls.clear()
            ch.sent = False
            if ch.rescinded:
                ch.released = True  # the guest forgot it; no RELID_RELEASED will come
                self._maybe_remove(ch)
        for entry in list(self._gpadls.values()):
            if entry.state is GpadlState.IN_PROGRESS:
                self._forget(entry)
            else:
                self._orphan(entry)
        self._offers_sent = False

    def _reset(self, reason: str) -> None:
        # Messages queued for the old connection must not reach the new one.
        self._events = deque(ev for ev in self._events if not isinstance(ev, SendMessage))
        self._emit(BusReset(reason))
        self._drop_everything(reason)
        self.version = None
        self._unloading = False
        self._target_vcpu = 0

    def _maybe_finish_unload(self) -> None:
        if not self._unloading:
            return
        if self._gpadls or self._orphans:
            return
        if any(ch.state is not ChannelState.CLOSED for ch in self._channels.values()):
            return
        self._send(p.UnloadResponse())
        self._emit(Unloaded())
        self._unloading = False
        self.version = None
        self._target_vcpu = 0

    # --- invariants (for tests; cheap enough to call after every step) --------------------

    def check_invariants(self) -> None:
        """Assert the internal consistency the state-machine tests rely on."""
        assert all(1 <= r <= p.MAX_RELID for r in self._channels)
        for handle, e in self._gpadls.items():
            assert e.handle == handle and e.state is not GpadlState.ORPHANED
            assert e.state is GpadlState.IN_PROGRESS or e.gpadl is not None
        assert all(e.state is GpadlState.ORPHANED and e.refs for e in self._orphans)
        assert self._pages == sum(e.pages for e in [*self._gpadls.values(), *self._orphans])
        assert self._pages <= self.max_gpadl_pages
        assert self.gpadls_in_progress <= self.max_gpadls_in_progress
        assert self.gpadl_count <= self.max_gpadls
        users: dict[int, int] = {}
        for ch in self._channels.values():
            if ch.state in (ChannelState.OPENING, ChannelState.OPEN, ChannelState.CLOSING):
                # A ring in use is never freed: its entry is alive (live or orphaned).
                assert ch.ring is not None
                assert ch.ring in self._orphans or self._gpadls.get(ch.ring.handle) is ch.ring
                users[id(ch.ring)] = users.get(id(ch.ring), 0) + 1
            else:
                assert ch.ring is None
            if ch.state is ChannelState.OPEN or ch.state is ChannelState.OPENING:
                assert not ch.rescinded
        for e in [*self._gpadls.values(), *self._orphans]:
            assert e.ring_users == users.get(id(e), 0)
        keys = [ch.key for ch in self._channels.values() if not ch.rescinded]
        assert len(keys) == len(set(keys))
