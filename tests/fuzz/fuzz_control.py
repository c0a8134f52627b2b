"""Fuzz target for VMBus control messages: vmbus/protocol.py's decoder and the bus
state machine behind it (vmbus/bus.py, VmBusServer).

The contract, h11 style: `protocol.decode` returns a Message or raises ProtocolError,
nothing else, and a decoded guest message encodes back to a prefix-equal payload;
`VmBusServer.receive` never raises for anything the guest posts (its mistakes become
a ProtocolViolation and the protocol's failure reply); every message it queues for
the guest fits a SynIC slot (<= 240 bytes) and decodes; the event queue, the GPADL
counts and pages stay within their limits (check_invariants after every step).

    python tests/fuzz/fuzz_control.py [libFuzzer options] [corpus dirs]

The input is a script. Byte 0 is the vCPU count - 1 (mod 4). Each step's head byte
picks: a raw message (below 0x80: a length byte, then the message, on connection id
4 if the head is odd, else 1), a shaped guest message (a real type with fields drawn from
small pools, so relids and GPADL handles collide with live ones), or a host action
answering an earlier event (open_complete with a status, close_complete,
gpadl_release, rescind, a hot-added offer, a VMM reset). Seeds: the simulated guest's
control messages (tests/fuzz/record_seeds.py), one per step as raw messages.
"""

from __future__ import annotations

import struct
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness, when imported by path
import harness

with harness.instrumented():
    from vmbus import bus as b
    from vmbus import protocol as p
    from vmbus.protocol import LocalProtocolError, ProtocolError

MAX_STEPS = 48
_RELIDS = (1, 2, 3, 4, 0, 5, 0xFFFFFFFF, p.MAX_RELID, p.MAX_RELID + 1)
_HANDLES = (0xE1E10, 0xE1E11, 0xE1E12, 0, 1, 0xFFFFFFFF)
_VERSIONS = (*p.ALL_VERSIONS, 0, 0xFFFFFFFF, p.make_version(5, 4))
_VPS = (0, 1, 2, 0xFFFFFFFF)
_CONN = (p.CONNECTION_ID_MESSAGE, p.CONNECTION_ID_MESSAGE, 4, 0, 0xFFFFFFFF)
_IF = uuid.UUID("0fe3f3a5-0a2d-4d57-9d1c-1a7a3c8c1e01")


def shaped(r: harness.Reader) -> bytes:
    """One guest message of a real type, fields from the pools or the input."""
    kind = r.byte() % 12
    relid = r.pick(_RELIDS)
    handle = r.pick(_HANDLES)
    if kind == 0:
        version = r.pick(_VERSIONS)
        page = r.pick((0, 0x1000, 0x2, p.InitiateContact.sint_field(2, 0, 1), r.u64()))
        return p.InitiateContact(version, r.pick(_VPS), page, 0x3000, 0x4000).encode()
    if kind == 1:
        return p.RequestOffers().encode()
    if kind == 2:
        return p.OpenChannel(
            relid, r.u32(), handle, r.pick(_VPS), r.pick((1, 2, 8, 0, 9, 0xFFFFFFFF)), r.take(8)
        ).encode()
    if kind == 3:
        return p.CloseChannel(relid).encode()
    if kind == 4:  # a small header: 1 range of n pages, all PFNs in the header or not
        n = 1 + r.byte() % 40
        cut = min(r.byte() % (n + 1), p.GPADL_HEADER_MAX_PFNS)
        buf = struct.pack("<II", n * 4096 - r.byte() % 3, r.pick((0, 0, 1, 0xFFF, 0x1000)))
        buf += struct.pack(f"<{n}Q", *(0x100 + i for i in range(n)))
        data = buf[: 8 + 8 * cut]
        return p.GpadlHeader(relid, handle, len(buf) + r.pick((0, 0, 8, -8)), 1, data).encode()
    if kind == 5:
        count = r.byte() % (p.GPADL_BODY_MAX_PFNS + 1)
        return p.GpadlBody(r.pick((0, 1, 2, 0xFFFFFFFF)), handle, tuple(range(count))).encode()
    if kind == 6:
        return p.GpadlTeardown(relid, handle).encode()
    if kind == 7:
        return p.RelidReleased(relid).encode()
    if kind == 8:
        return p.Unload().encode()
    if kind == 9:
        return p.ModifyChannel(relid, r.pick(_VPS)).encode()
    if kind == 10:  # a type with any body
        msgtype = r.byte() % (p.MESSAGE_TYPE_COUNT + 2)
        return struct.pack("<II", msgtype, 0) + r.take(r.byte() % 64)
    return p.Pause().encode() if r.byte() & 1 else p.Resume().encode()


class Host:
    """The device side, answering the bus's events as a driver would (or not)."""

    def __init__(self, server: b.VmBusServer) -> None:
        self.server = server
        self.opening: list[int] = []
        self.closing: list[int] = []
        self.pinned: list[object] = []
        self.teardown: list[int] = []

    def drain(self) -> None:
        for ev in self.server.events():
            if isinstance(ev, b.SendMessage):
                assert len(ev.payload) <= p.MAX_MESSAGE_SIZE, ev
                assert 0 <= ev.target_vcpu < self.server.vcpu_count, ev
                p.decode(ev.payload)  # what we send must itself parse
            elif isinstance(ev, b.OpenRequest):
                self.opening.append(ev.relid)
                assert 0 < ev.downstream_offset < ev.gpadl.page_count, ev
            elif isinstance(ev, b.ChannelClosed):
                self.closing.append(ev.relid)
            elif isinstance(ev, b.GpadlTeardownRequested):
                self.teardown.append(ev.handle)
            elif isinstance(ev, b.BusReset):
                self.opening.clear()
            elif isinstance(ev, b.Connected):
                assert ev.version in self.server.versions

    def act(self, r: harness.Reader) -> None:
        s = self.server
        what = r.byte() % 7
        try:
            if what == 0 and self.opening:
                relid = self.opening.pop(0)
                s.open_complete(relid, r.pick((0, 0, 0xC0000001)))
            elif what == 1 and self.closing:
                s.close_complete(self.closing.pop(0))
            elif what == 2:
                relid = r.pick(_RELIDS)
                gp = s.gpadl_acquire(r.pick(_HANDLES), relid if r.byte() & 1 else None)
                self.pinned.append(gp)
            elif what == 3 and self.pinned:
                s.gpadl_release(self.pinned.pop(0))  # type: ignore[arg-type]
            elif what == 4:
                s.rescind(r.pick(_RELIDS))
            elif what == 5:
                s.add_offer(b.Offer(_IF, uuid.UUID(int=r.byte()), sub_channel_index=r.byte() % 3))
            elif what == 6:
                s.reset()
                self.opening.clear()
                self.closing.clear()
        except (LocalProtocolError, b.UnknownGpadl):
            pass  # the host misused the bus: documented refusals, not guest-reachable


def check_decode(payload: bytes) -> None:
    """decode() parses or raises ProtocolError; a guest message re-encodes to a prefix."""
    try:
        msg = p.decode(payload)
    except ProtocolError:
        return
    assert isinstance(msg, p.Message)
    try:
        again = msg.encode()
    except LocalProtocolError:
        return  # e.g. a field a host message cannot carry back; decode still held
    assert p.decode(again) == msg or msg.TYPE in (
        p.MessageType.GPADL_BODY,  # a partial trailing u64 is dropped on decode
        p.MessageType.OFFERCHANNEL,
        p.MessageType.VERSION_RESPONSE,
        p.MessageType.TL_CONNECT_REQUEST,
    ), msg


def check_one(data: bytes) -> None:
    """Run one script against a fresh bus with two offers; check after every step."""
    r = harness.Reader(data)
    vcpus = 1 + r.byte() % 4
    server = b.VmBusServer(vcpus, max_pending_events=64, max_gpadls=16, max_gpadl_pages=1 << 14)
    host = Host(server)
    for instance, sub in ((1, 0), (1, 1), (2, 0), (2, 1), (3, 0)):  # relids 1-5
        server.add_offer(b.Offer(_IF, uuid.UUID(int=instance), sub_channel_index=sub))
    for _ in range(MAX_STEPS):
        if not r.more():
            break
        head = r.byte()
        if head < 0x80:  # a raw message: length byte, bytes (the recorded seeds use this)
            size = r.byte()
            payload = r.data[r.pos : r.pos + size]
            r.pos += size
            conn = p.CONNECTION_ID_MESSAGE_4 if head & 1 else p.CONNECTION_ID_MESSAGE
        elif head < 0xE0:
            payload = shaped(r)
            conn = _CONN[head % len(_CONN)]
        else:
            host.act(r)
            host.drain()
            server.check_invariants()
            continue
        check_decode(payload)
        server.receive(payload, conn)  # never raises for a guest's bytes
        host.drain()
        server.check_invariants()


main = harness.main_for(check_one)

if __name__ == "__main__":
    main(sys.argv)
