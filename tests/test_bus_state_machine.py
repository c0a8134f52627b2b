"""h2-style: hypothesis drives VmBusServer with random guest messages and driver actions.

Whatever the guest sends (valid, invalid, garbage) and whenever the driver answers,
``receive`` never raises, the server's invariants hold, relids the guest still knows
are never offered again, and one guest message grows the event queue by a bounded
burst only while the queue is under its cap.
"""

from __future__ import annotations

import struct
import uuid

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from test_protocol import any_message

from vmbus import bus as b
from vmbus import protocol as p

TYPES = [uuid.UUID(int=1), uuid.UUID(int=2)]
INSTANCES = [uuid.UUID(int=10), uuid.UUID(int=11), uuid.UUID(int=12)]
HANDLES = st.sampled_from([0, 1, 2, 3, 0xE1E10, 0xE1E11])
RELIDS = st.integers(0, 6)
VCPUS = 2
CAP = 48


def gpadl_header(relid: int, handle: int, pages: int, *, buflen_delta: int = 0) -> bytes:
    frames = [0x100 + i for i in range(pages)]
    data = struct.pack(f"<II{min(pages, 26)}Q", pages * 4096, 0, *frames[:26])
    return p.GpadlHeader(relid, handle, 8 + 8 * pages + buflen_delta, 1, data).encode()


class BusMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.s = b.VmBusServer(
            VCPUS,
            max_pending_events=CAP,
            max_gpadls_in_progress=3,
            max_gpadls=6,
            max_gpadl_pages=300,
            validate_pfns=lambda frames: all(f < 0x10000 for f in frames),
        )
        self.pending_open: set[int] = set()
        self.pending_close: set[int] = set()
        self.pins: list[object] = []
        self.guest_known: set[int] = set()  # relids the guest may still refer to
        # two devices, one with a sub-channel: relids 1, 2, 3
        self.s.add_offer(b.Offer(TYPES[0], INSTANCES[0]))
        self.s.add_offer(b.Offer(TYPES[0], INSTANCES[0], sub_channel_index=1))
        self.s.add_offer(b.Offer(TYPES[1], INSTANCES[1]))

    @initialize(version=st.sampled_from(p.LINUX_VERSIONS))
    def start(self, version: int) -> None:
        self.good_contact(version)

    # --- guest messages ------------------------------------------------------------------

    def guest(self, payload: bytes, conn: int = 1) -> None:
        before = self.s.pending_events
        burst = len(self.s.relids()) + self.s.gpadl_count + 4
        self.s.receive(payload, conn)  # must never raise
        after = self.s.pending_events
        if before >= CAP:
            assert after <= before + 1
        else:
            assert after <= before + burst

    def contact(
        self, version: int, conn: int, vcpu: int, sint: int, monitors: tuple[int, int]
    ) -> None:
        field = p.InitiateContact.sint_field(sint) if version >= p.VERSION_WIN10_V5 else 0x3000
        self.guest(p.InitiateContact(version, vcpu, field, *monitors).encode(), conn)

    def good_contact(self, version: int) -> None:
        conn = 4 if version >= p.VERSION_WIN10_V5 else 1
        self.guest(p.InitiateContact(version, 0, p.InitiateContact.sint_field(2)).encode(), conn)
        self.guest(p.RequestOffers().encode())

    @rule(
        relid=st.integers(1, 3),
        handle=HANDLES,
        pages=st.integers(4, 70),
        k=st.integers(2, 68),
        vp=st.integers(0, 1),
    )
    def valid_open(self, relid: int, handle: int, pages: int, k: int, vp: int) -> None:
        """What Linux does: a whole ring GPADL, then OPENCHANNEL (makes deep states likely)."""
        self.guest(gpadl_header(relid, handle, pages))
        frames = [0x100 + i for i in range(26, pages)]
        for i in range(0, len(frames), 28):
            self.guest(p.GpadlBody(0, handle, tuple(frames[i : i + 28])).encode())
        self.guest(p.OpenChannel(relid, relid, handle, vp, min(k, pages - 2)).encode())

    @rule()
    def request_offers(self) -> None:
        self.guest(p.RequestOffers().encode())

    @rule(
        relid=RELIDS, handle=HANDLES, pages=st.integers(1, 60), delta=st.sampled_from([0, 0, -8, 8])
    )
    def header(self, relid: int, handle: int, pages: int, delta: int) -> None:
        self.guest(gpadl_header(relid, handle, pages, buflen_delta=delta))

    @rule(handle=HANDLES, n=st.integers(0, 28), high=st.booleans())
    def body(self, handle: int, n: int, high: bool) -> None:
        base = 0x20000 if high else 0x200
        self.guest(p.GpadlBody(0, handle, tuple(range(base, base + n))).encode())

    @rule(relid=RELIDS, handle=HANDLES, k=st.integers(0, 12), vp=st.integers(0, 3))
    def open(self, relid: int, handle: int, k: int, vp: int) -> None:
        self.guest(p.OpenChannel(relid, relid, handle, vp, k).encode())

    @rule(relid=st.integers(1, 3), handle=HANDLES, pages=st.integers(4, 40))
    def linux_lifecycle(self, relid: int, handle: int, pages: int) -> None:
        """A whole Linux open/close with a prompt driver, amid whatever state we are in."""
        self.valid_open(relid, handle, pages, pages // 2, 0)
        self.drain(10_000, True)
        self.guest(p.ModifyChannel(relid, 1).encode())
        self.linux_close(relid, handle)
        self.drain(10_000, True)

    @rule(relid=st.integers(1, 3), handle=HANDLES)
    def linux_close(self, relid: int, handle: int) -> None:
        """Linux's close: CLOSECHANNEL, then GPADL_TEARDOWN of the ring."""
        self.guest(p.CloseChannel(relid).encode())
        self.guest(p.GpadlTeardown(relid, handle).encode())

    @rule(relid=RELIDS)
    def close(self, relid: int) -> None:
        self.guest(p.CloseChannel(relid).encode())

    @rule(relid=RELIDS, handle=HANDLES)
    def gpadl_teardown(self, relid: int, handle: int) -> None:
        self.guest(p.GpadlTeardown(relid, handle).encode())

    @rule(relid=RELIDS)
    def relid_released(self, relid: int) -> None:
        self.guest(p.RelidReleased(relid).encode())

    @rule(relid=RELIDS, vp=st.integers(0, 3))
    def modify(self, relid: int, vp: int) -> None:
        self.guest(p.ModifyChannel(relid, vp).encode())

    def unload(self) -> None:
        self.guest(p.Unload().encode())

    @rule(msg=any_message, conn=st.sampled_from([1, 1, 4]))
    def any_valid_shape(self, msg: p.Message, conn: int) -> None:
        self.guest(msg.encode(), conn)

    @rule(raw=st.binary(max_size=260), conn=st.integers(0, 2**32 - 1))
    def garbage(self, raw: bytes, conn: int) -> None:
        self.guest(raw, conn)

    # --- host / driver actions --------------------------------------------------------------

    @rule(t=st.sampled_from(TYPES), i=st.sampled_from(INSTANCES), sub=st.integers(0, 2))
    def add_offer(self, t: uuid.UUID, i: uuid.UUID, sub: int) -> None:
        try:
            self.s.add_offer(b.Offer(t, i, sub_channel_index=sub))
        except p.LocalProtocolError:
            pass

    @rule(relid=RELIDS)
    def rescind(self, relid: int) -> None:
        try:
            self.s.rescind(relid)
        except p.LocalProtocolError:
            pass

    @rule(n=st.integers(1, 200), driver=st.booleans())
    def drain(self, n: int, driver: bool) -> None:
        """Handle up to n events; with ``driver``, also answer every open/close at once."""
        for _ in range(n):
            ev = self.s.next_event()
            if ev is None:
                break
            self.observe(ev)
        if driver:
            for relid in sorted(self.pending_open):
                self.s.open_complete(relid, 0)
            for relid in sorted(self.pending_close):
                self.s.close_complete(relid)
            self.pending_open.clear()
            self.pending_close.clear()
            for ev in self.s.events():
                self.observe(ev)

    def observe(self, ev: b.Event) -> None:
        event(type(ev).__name__)
        if isinstance(ev, b.SendMessage):
            assert len(ev.payload) <= p.MAX_MESSAGE_SIZE
            assert 0 <= ev.target_vcpu < VCPUS
            msg = p.decode(ev.payload)
            event(f"sent {msg.TYPE.name}")
            if isinstance(msg, p.OfferChannel):
                assert 1 <= msg.child_relid <= p.MAX_RELID
                assert msg.child_relid not in self.guest_known, "relid reused too early"
                self.guest_known.add(msg.child_relid)
            elif isinstance(msg, p.RescindChannelOffer):
                assert msg.child_relid in self.guest_known
        elif isinstance(ev, b.OpenRequest):
            self.pending_open.add(ev.relid)
            n = ev.gpadl.page_count
            assert 2 <= ev.downstream_offset and ev.downstream_offset + 2 <= n
            assert ev.target_vp < VCPUS
        elif isinstance(ev, b.ChannelClosed):
            self.pending_open.discard(ev.relid)
            self.pending_close.add(ev.relid)
        elif isinstance(ev, b.ChannelRemoved):
            self.guest_known.discard(ev.relid)
        elif isinstance(ev, (b.BusReset, b.Unloaded)):
            self.guest_known.clear()

    @precondition(lambda self: self.pending_open)
    @rule(data=st.data(), ok=st.booleans())
    def open_complete(self, data: st.DataObject, ok: bool) -> None:
        relid = data.draw(st.sampled_from(sorted(self.pending_open)))
        self.pending_open.discard(relid)
        self.s.open_complete(relid, 0 if ok else 0xC0000001)

    @precondition(lambda self: self.pending_close)
    @rule(data=st.data())
    def close_complete(self, data: st.DataObject) -> None:
        relid = data.draw(st.sampled_from(sorted(self.pending_close)))
        self.pending_close.discard(relid)
        self.s.close_complete(relid)

    @rule(data=st.data())
    def acquire(self, data: st.DataObject) -> None:
        """A device pins a buffer GPADL (a live handle, or any handle at all)."""
        live = sorted(self.s._gpadls)
        handle = data.draw(st.sampled_from(live) if live else HANDLES)
        try:
            self.pins.append(self.s.gpadl_acquire(handle))
        except b.UnknownGpadl:
            pass

    @precondition(lambda self: self.pins)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        g = self.pins.pop(data.draw(st.integers(0, len(self.pins) - 1)))
        self.s.gpadl_release(g)  # type: ignore[arg-type]

    def vmm_reset(self) -> None:
        self.s.reset()

    @rule(
        kind=st.sampled_from(["contact", "good", "unload", "reset"]),
        version=st.sampled_from([*p.ALL_VERSIONS, 0, 0x00070000]),
        conn=st.sampled_from([1, 4, 7]),
        vcpu=st.integers(0, 3),
        sint=st.sampled_from([2, 2, 3]),
        monitors=st.sampled_from([(0, 0), (0x1000, 0x2000), (0x1000, 0), (0x1001, 0x2000)]),
    )
    def disrupt(
        self, kind: str, version: int, conn: int, vcpu: int, sint: int, monitors: tuple[int, int]
    ) -> None:
        """Whole-bus events, one rule so they do not drown the per-channel ones."""
        if kind == "contact":
            self.contact(version, conn, vcpu, sint, monitors)
        elif kind == "good":
            self.good_contact(p.LINUX_VERSIONS[version % len(p.LINUX_VERSIONS)])
        elif kind == "unload":
            self.unload()
        else:
            self.vmm_reset()

    @invariant()
    def consistent(self) -> None:
        self.s.check_invariants()

    @invariant()
    def pinned_gpadls_alive(self) -> None:
        """No GPADL is freed while a device pins it."""
        alive = [*self.s._gpadls.values(), *self.s._orphans]
        for g in self.pins:
            assert any(e.gpadl is g and e.pins for e in alive)


BusMachine.TestCase.settings = settings(max_examples=400, stateful_step_count=60, deadline=None)
test_bus_state_machine = BusMachine.TestCase


def test_flood_of_every_kind_never_raises() -> None:
    """Deterministic companion: the machine's rules, many times, without draining."""
    m = BusMachine()
    m.good_contact(p.VERSION_WIN10_V5_3)
    for i in range(20_000):
        m.header(1, i % 7, 1 + i % 50, 0)
        m.open(i % 6, 0xE1E10, i % 12, 0)
        m.garbage(bytes([i % 256]) * (i % 200), 1)
    assert m.s.pending_events <= CAP + 3  # cap + one message's burst + the overflow note
    m.s.check_invariants()
