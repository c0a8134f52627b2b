"""What the real Linux guest's hv_vmbus sent vmbusd, byte for byte, replayed into
`VmBusServer`: a regression test of the first real-driver session (issue 8).

Recorded by vmbus.kvm.vmm.KvmVm (guest_log / host_log) booting the guest-kernel build
(Debian linux-source-6.1 6.1.192-3, unmodified hv_vmbus) against `vmbusd serve` with its
default config (one echo device), up to the guest's panic for want of a root disk. The
guest posted INITIATE_CONTACT on connection id 4, REQUESTOFFERS on 1 and, from its panic
notifier, UNLOAD on 1; vmbusd answered VERSION_RESPONSE, the echo offer,
ALLOFFERS_DELIVERED and UNLOAD_RESPONSE. These need no /dev/kvm: they run everywhere.
"""

from __future__ import annotations

import struct
import uuid

from devices.echo.protocol import ECHO_IF_TYPE
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
