"""What the real Linux guest's hv_vmbus sent vmbusd, byte for byte, replayed into
`VmBusServer`: a regression test of the first real-driver session (issue 8).

Recorded by vmbus.kvm.vmm.KvmVm (guest_log / host_log) booting the guest-kernel build
(Debian linux-source-6.1 6.1.192-3, unmodified hv_vmbus) against `vmbusd serve` with its
default config (one echo device), up to the guest's panic for want of a root disk. The
guest posted INITIATE_CONTACT on connection id 4, REQUESTOFFERS on 1 and, from its panic
notifier, UNLOAD on 1; vmbusd answered VERSION_RESPONSE, the echo offer,
ALLOFFERS_DELIVERED and UNLOAD_RESPONSE. With a storvsc controller offered too,
hv_storvsc's ring GPADL (header + two bodies) and OPENCHANNEL. These need no /dev/kvm:
they run everywhere.
"""

from __future__ import annotations

import struct
import uuid

from devices.echo.protocol import ECHO_IF_TYPE
from devices.storvsc.protocol import SCSI_IF_TYPE
from vmbus import bus as b
from vmbus import protocol as p

# INITIATE_CONTACT: msgtype 0x0e, version 5.3 (0x00050003), target_vcpu 0, SINT 2 in the
# msg_sint byte, no interrupt page (5.x), monitor pages at 0x241000 and 0x242000.
LINUX_INITIATE_CONTACT = bytes.fromhex(
    "0e000000000000000300050000000000020000000000000000102400000000000020240000000000"
)
LINUX_REQUESTOFFERS = bytes.fromhex("0300000000000000")
LINUX_UNLOAD = bytes.fromhex("1000000000000000")  # hv_vmbus's panic notifier

# What vmbusd answered in that session (the offer's instance GUID is the device's own).
VMBUSD_VERSION_RESPONSE = bytes.fromhex("0f000000000000000100000001000000")
VMBUSD_ALLOFFERS_DELIVERED = bytes.fromhex("0400000000000000")
VMBUSD_UNLOAD_RESPONSE = bytes.fromhex("1100000000000000")

# hv_storvsc's channel (a storvsc offer at relid 2, after the echo's relid 1): the ring
# GPADL (64 pages: 256 KiB, 128 KiB each way) in a header and two bodies, then
# OPENCHANNEL (downstream_offset 32 pages, target_vp 0). Recorded the same way.
LINUX_STORVSC_GPADL_HEADER = bytes.fromhex(
    "080000000000000002000000101e0e00080201000000040000000000800300000000000081030000"
    "00000000820300000000000083030000000000008403000000000000850300000000000086030000"
    "000000008703000000000000880300000000000089030000000000008a030000000000008b030000"
    "000000008c030000000000008d030000000000008e030000000000008f0300000000000090030000"
    "00000000910300000000000092030000000000009303000000000000940300000000000095030000"
    "000000009603000000000000970300000000000098030000000000009903000000000000"
)
LINUX_STORVSC_GPADL_BODY_1 = bytes.fromhex(
    "090000000000000000000000101e0e009a030000000000009b030000000000009c03000000000000"
    "9d030000000000009e030000000000009f03000000000000a003000000000000a103000000000000"
    "a203000000000000a303000000000000a403000000000000a503000000000000a603000000000000"
    "a703000000000000a803000000000000a903000000000000aa03000000000000ab03000000000000"
    "ac03000000000000ad03000000000000ae03000000000000af03000000000000b003000000000000"
    "b103000000000000b203000000000000b303000000000000b403000000000000b503000000000000"
)
LINUX_STORVSC_GPADL_BODY_2 = bytes.fromhex(
    "090000000000000000000000101e0e00b603000000000000b703000000000000b803000000000000"
    "b903000000000000ba03000000000000bb03000000000000bc03000000000000bd03000000000000"
    "be03000000000000bf03000000000000"
)
LINUX_STORVSC_OPENCHANNEL = bytes.fromhex(
    "05000000000000000200000002000000101e0e000000000020000000000000000000000000000000"
    "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "00000000000000000000000000000000000000000000000000000000"
)

INSTANCE = uuid.UUID("5c12ec7f-484e-40a3-8b85-33a637f265aa")


def _sent(server: b.VmBusServer) -> tuple[list[b.SendMessage], list[object]]:
    sends: list[b.SendMessage] = []
    other: list[object] = []
    for ev in server.events():
        (sends if isinstance(ev, b.SendMessage) else other).append(ev)
    return sends, other


def test_linux_initiate_contact_is_version_5_3_on_connection_4() -> None:
    """The fields as the guest laid them out, decoded by vmbus.protocol."""
    msg = p.decode(LINUX_INITIATE_CONTACT)
    assert isinstance(msg, p.InitiateContact)
    assert (msg.version_requested, msg.target_vcpu) == (0x00050003, 0)
    assert (msg.monitor_page1, msg.monitor_page2) == (0x241000, 0x242000)
    assert len(LINUX_INITIATE_CONTACT) == 40
    sint, vtl = struct.unpack_from("<BB", LINUX_INITIATE_CONTACT, 16)
    assert (sint, vtl) == (2, 0)  # msg_sint: VMBUS_MESSAGE_SINT
    assert msg.msg_sint == 2


def test_linux_session_replayed_into_vmbus_server() -> None:
    """The real guest's three messages get the answers vmbusd gave the real guest, with
    no violation: 5.3 accepted with message connection id 1, the echo offer, all offers
    delivered, and UNLOAD answered."""
    server = b.VmBusServer(1)
    relid = server.add_offer(b.Offer(ECHO_IF_TYPE, INSTANCE))

    server.receive(LINUX_INITIATE_CONTACT, 4)
    sends, other = _sent(server)
    assert [s.payload for s in sends] == [VMBUSD_VERSION_RESPONSE]
    assert sends[0].target_vcpu == 0
    connected = [e for e in other if isinstance(e, b.Connected)]
    assert [(c.version, c.target_vcpu, c.interrupt_page) for c in connected] == [(0x00050003, 0, 0)]

    server.receive(LINUX_REQUESTOFFERS, 1)
    sends, _ = _sent(server)
    assert len(sends) == 2
    offer = p.decode(sends[0].payload)
    assert type(offer).__name__ == "OfferChannel"
    assert getattr(offer, "if_type") == ECHO_IF_TYPE  # noqa: B009
    assert getattr(offer, "child_relid") == relid  # noqa: B009
    assert sends[1].payload == VMBUSD_ALLOFFERS_DELIVERED

    server.receive(LINUX_UNLOAD, 1)
    sends, other = _sent(server)
    assert [s.payload for s in sends] == [VMBUSD_UNLOAD_RESPONSE]
    assert any(isinstance(e, b.Unloaded) for e in other)
    assert server.violations == 0
    server.check_invariants()


def test_linux_storvsc_gpadl_and_open_replayed() -> None:
    """hv_storvsc's ring GPADL and OPENCHANNEL, as the real driver sent them: vmbusd
    creates the GPADL (status 0, one range of 64 pages in the order given) and asks the
    device to open with the ring split Linux chose."""
    server = b.VmBusServer(1)
    server.add_offer(b.Offer(ECHO_IF_TYPE, INSTANCE))
    scsi = server.add_offer(b.Offer(SCSI_IF_TYPE, uuid.UUID(int=2)))
    assert scsi == 2
    server.receive(LINUX_INITIATE_CONTACT, 4)
    server.receive(LINUX_REQUESTOFFERS, 1)
    _sent(server)
    header = p.decode(LINUX_STORVSC_GPADL_HEADER)
    assert isinstance(header, p.GpadlHeader)
    server.receive(LINUX_STORVSC_GPADL_HEADER, 1)
    server.receive(LINUX_STORVSC_GPADL_BODY_1, 1)
    assert _sent(server) == ([], [])  # not complete yet: no answer
    server.receive(LINUX_STORVSC_GPADL_BODY_2, 1)
    sends, _ = _sent(server)
    created = p.decode(sends[0].payload)
    assert isinstance(created, p.GpadlCreated)
    assert (created.child_relid, created.gpadl, created.status) == (2, header.gpadl, 0)
    gpadl = server.gpadl(header.gpadl)
    (rng,) = gpadl.ranges
    assert (rng.byte_count, rng.byte_offset, len(rng.pfns)) == (64 * 4096, 0, 64)
    pfns = list(rng.pfns)
    assert pfns == list(range(pfns[0], pfns[0] + 64))  # contiguous, in order

    server.receive(LINUX_STORVSC_OPENCHANNEL, 1)
    _, other = _sent(server)
    (req,) = [e for e in other if isinstance(e, b.OpenRequest)]
    assert (req.relid, req.gpadl.handle, req.downstream_offset, req.target_vp) == (
        2,
        header.gpadl,
        32,
        0,
    )
    server.open_complete(2, 0)
    sends, _ = _sent(server)
    result = p.decode(sends[0].payload)
    assert isinstance(result, p.OpenChannelResult)
    assert (result.child_relid, result.openid, result.status) == (2, 2, 0)
    assert server.violations == 0
    server.check_invariants()
