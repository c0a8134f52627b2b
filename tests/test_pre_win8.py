"""Sessions below VMBus 2.4 (WIN7): channel interrupts go through the guest's
interrupt page, so the bus validates it and the VMM is told where it is."""

from __future__ import annotations

import os

import pytest

from vmbus import attach, bus
from vmbus import protocol as p

RAM_PFNS = range(0x10, 0x100)


def _connect(interrupt_page: int, version: int = p.VERSION_WIN7) -> list[object]:
    server = bus.VmBusServer(2, validate_pfns=lambda pfns: all(x in RAM_PFNS for x in pfns))
    msg = p.InitiateContact(version, 0, interrupt_page, 0x20000, 0x21000)
    server.receive(msg.encode(), p.CONNECTION_ID_MESSAGE)
    return list(server.events())


def _accepted(events: list[object]) -> bool:
    for ev in events:
        if isinstance(ev, bus.SendMessage):
            m = p.decode(ev.payload)
            if isinstance(m, p.VersionResponse):
                return bool(m.version_supported)
    raise AssertionError("no VERSION_RESPONSE")


def test_win7_interrupt_page_in_ram_is_accepted_and_reported() -> None:
    events = _connect(0x20000)
    assert _accepted(events)
    (conn,) = [e for e in events if isinstance(e, bus.Connected)]
    assert conn.interrupt_page == 0x20000


@pytest.mark.parametrize("page", [0, 0x20010, 0x999000], ids=["zero", "unaligned", "not-ram"])
def test_win7_bad_interrupt_page_refuses_the_version(page: int) -> None:
    events = _connect(page)
    assert not _accepted(events)
    assert any(isinstance(e, bus.ProtocolViolation) for e in events)
    assert not any(isinstance(e, bus.Connected) for e in events)


def test_from_win8_on_the_interrupt_page_is_ignored() -> None:
    events = _connect(0x999123, version=p.VERSION_WIN8)  # garbage, but unused from 2.4
    assert _accepted(events)
    (conn,) = [e for e in events if isinstance(e, bus.Connected)]
    assert conn.interrupt_page == 0


def test_bind_carries_the_interrupt_page_only_when_set() -> None:
    kick, call = os.eventfd(0), os.eventfd(0)
    try:
        plain = attach.Bind(1, 0x2001, 0, kick, call)
        data, _ = attach.encode_message(plain)
        assert b"interrupt_page" not in data  # VMMs that predate it see nothing new
        win7 = attach.Bind(1, 0x2001, 0, kick, call, interrupt_page=0x20000)
        data, fds = attach.encode_message(win7)
        got = attach.decode_message(data, [os.dup(fd) for fd in fds])
        assert isinstance(got, attach.Bind) and got.interrupt_page == 0x20000
        attach.close_fds(got.fds())
        with pytest.raises(ValueError):
            attach.Bind(1, 0x2001, 0, kick, call, interrupt_page=0x20010)
    finally:
        os.close(kick)
        os.close(call)
