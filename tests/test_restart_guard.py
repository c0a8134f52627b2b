"""One session per VM's rings: a VMM that reconnects to a vmbusd which still runs
its old session (issue 11 part 1, docs/attach-protocol.md#restart).

The connection can break while vmbusd lives (the VMM's side closed, a namespace
hiccup), and the VMM reconnects and resumes at once. vmbusd's old session of that
VM may then still be tearing down (a device finishing in-flight work as it stops),
or may not have noticed at all (its socket is dead but not closed: another process
holds the VMM's end). Either way its device tasks may still touch the rings, so the
new session must not serve them until the old one has ended:

* a resume (and a fresh hello) for a VM whose old session is ending waits for it;
* an old session on the same guest RAM that did not notice is ended by the resume;
* the wait is bounded: then one log line and `error resource`;
* two live VMs that merely share a name are left alone.

Real sockets and memfds: `serve_listener` and the simulated VM run in this trio
run, so the test device can count how many serve() calls run per relid at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from devices.echo.protocol import ECHO_IF_TYPE
from devices.echo.vsp import EchoDevice
from vmbus import attach, server
from vmbus.channel import Channel
from vmbus.device import Device, DeviceContext
from vmbus.guest.main import _drop_channels, soak
from vmbus.guest.vm import SimulatedVm
from vmbus.guest.workloads import echo_mixed
from vmbus.server import VmSession

pytestmark = pytest.mark.timeout(120)

RING = 64 * 1024
INSTANCE = uuid.UUID("0d9c2c4e-6b1f-4f0e-8a57-3b2f6a1c9e11")  # the same device in every session


@dataclass
class Tracker:
    """What every LingeringEcho of a test did, across sessions."""

    active: Counter[int] = field(default_factory=Counter)  # relid -> serve() calls running
    most: Counter[int] = field(default_factory=Counter)  # relid -> most at once
    serves: int = 0
    built: list[float] = field(default_factory=list)  # trio time each device was built
    closed: list[float] = field(default_factory=list)  # ... and closed


class LingeringEcho(EchoDevice):
    """Echo whose serve() keeps running `linger` seconds after it is cancelled, as a
    device finishing its in-flight work would (a disk completing the requests it
    took), and counts the serve() calls running per relid."""

    def __init__(self, tracker: Tracker, linger: float) -> None:
        super().__init__(INSTANCE)
        self.tracker = tracker
        self.linger = linger
        tracker.built.append(trio.current_time())

    async def serve(self, channel: Channel, ctx: DeviceContext) -> None:
        t = self.tracker
        t.serves += 1
        t.active[ctx.relid] += 1
        t.most[ctx.relid] = max(t.most[ctx.relid], t.active[ctx.relid])
        try:
            await super().serve(channel, ctx)
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(self.linger)
            t.active[ctx.relid] -= 1

    async def close(self) -> None:
        self.tracker.closed.append(trio.current_time())


@contextlib.asynccontextmanager
async def _service(
    path: str, factory: Callable[[], Sequence[Device]]
) -> AsyncIterator[set[VmSession]]:
    sessions: set[VmSession] = set()
    async with trio.open_nursery() as n:
        await n.start(lambda **kw: server.serve_listener(path, factory, sessions=sessions, **kw))
        yield sessions
        n.cancel_scope.cancel()


def _vm(path: str, name: str = "guarded", **kw: Any) -> SimulatedVm:
    async def again() -> attach.AttachConnection:
        return await attach.connect(path)

    return SimulatedVm(ram_size=32 << 20, vm_id=name, reconnect=again, reconnect_timeout=20, **kw)


async def _until(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.01)
    assert cond(), what


def _close(vm: SimulatedVm) -> None:
    """Let go of the VM's side of its channels (no goodbye: the test is over), then
    of its RAM."""
    _drop_channels(vm)
    vm.close()


def _lines(caplog: pytest.LogCaptureFixture, needle: str) -> list[str]:
    """vmbusd's log lines (not the simulated VM's) that contain `needle`."""
    return [
        r.getMessage()
        for r in caplog.records
        if needle in r.getMessage() and not r.name.startswith("vmbus.guest")
    ]


async def _soak_across_break(
    path: str,
    sessions: set[VmSession],
    tracker: Tracker,
    *,
    keep_socket: bool,
) -> tuple[SimulatedVm, VmSession, dict[str, Any]]:
    """A VM soaks its echo channel; its connection breaks on the VMM's side (with
    `keep_socket`, another fd of the VMM's end stays open, so vmbusd sees no EOF);
    it reconnects and resumes; the soak ends. Returns the VM, the old session and
    the soak's summary (every packet checked once and in order by `soak`)."""
    vm = _vm(path)
    result: dict[str, Any] = {}
    held = -1
    try:
        async with trio.open_nursery() as n:
            await vm.start(await attach.connect(path), n)
            stop = trio.Event()

            async def run() -> None:
                result.update(await soak(vm, RING, stop))

            n.start_soon(run)
            await _until(lambda: tracker.serves == 1, "the echo channel served")
            await trio.sleep(0.3)  # a few rounds on the first session
            (old,) = sessions
            assert vm.conn is not None
            if keep_socket:  # as a forked child that inherited the socket would
                held = os.dup(vm.conn.socket.fileno())
            await vm.conn.aclose()
            await _until(lambda: vm.reconnects == 1 or vm.lost.is_set(), "the reconnect")
            assert vm.reconnects == 1, vm.closed_reason
            # The VM counts a reconnect once its resume is sent; vmbusd takes it later.
            await _until(lambda: any(s.resumed for s in sessions), "vmbusd's resume")
            assert old.ended.is_set(), "the resume was taken while the old session ran"
            await trio.sleep(0.3)  # rounds on the new session
            stop.set()
            with trio.fail_after(30):
                while not result:
                    await trio.sleep(0.01)
            n.cancel_scope.cancel()
    finally:
        if held >= 0:
            os.close(held)
        _close(vm)
    return vm, old, result


def test_resume_waits_for_the_old_sessions_slow_teardown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The old session saw EOF but its device still finishes work for 2 s: the
    resume waits for it, so one serve() at a time, and the soak goes on intact."""
    caplog.set_level(logging.INFO, logger="vmbus")
    path = str(tmp_path / "vmbusd.sock")
    tracker = Tracker()

    async def main() -> None:
        async with _service(path, lambda: [LingeringEcho(tracker, 2.0)]) as sessions:
            _, _old, summary = await _soak_across_break(path, sessions, tracker, keep_socket=False)
            assert summary["channels"][0]["packets"] > 0, summary

    trio.run(main)
    assert tracker.serves == 2, tracker
    assert max(tracker.most.values()) == 1, tracker.most
    assert _lines(caplog, "guarded: waiting for its previous session"), "no wait: nothing tested"
    assert len(_lines(caplog, "guarded: resumed")) == 1


def test_resume_ends_an_old_session_stuck_on_a_dead_socket(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """vmbusd never sees the old connection close (the VMM's end is still open
    elsewhere) and its session keeps serving the rings: the resume, on the same
    guest RAM, ends that session first."""
    caplog.set_level(logging.INFO, logger="vmbus")
    path = str(tmp_path / "vmbusd.sock")
    tracker = Tracker()

    async def main() -> None:
        async with _service(path, lambda: [LingeringEcho(tracker, 0.3)]) as sessions:
            _, old, _summary = await _soak_across_break(path, sessions, tracker, keep_socket=True)
            assert old.label == "guarded"

    trio.run(main)
    assert tracker.serves == 2, tracker
    assert max(tracker.most.values()) == 1, tracker.most
    ended = _lines(caplog, "ending its old session")
    assert len(ended) == 1, ended
    assert len(_lines(caplog, "guarded: resumed")) == 1


@pytest.mark.parametrize("stuck", [False, True], ids=["ending", "stuck-on-dead-socket"])
def test_a_predecessor_that_will_not_end_gets_the_resume_refused(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    stuck: bool,
) -> None:
    """The old session's device does not stop within the bound: the resume is
    refused with one log line and `error resource` (never a second session); once
    the old one has ended, the VM's name attaches again. Either way in: the old
    session saw EOF (the hello waits), or it did not (the memory ends it, waits)."""
    caplog.set_level(logging.INFO, logger="vmbus")
    monkeypatch.setattr(server, "PREDECESSOR_WAIT_S", 0.5)
    path = str(tmp_path / "vmbusd.sock")
    tracker = Tracker()

    async def main() -> None:
        async with _service(path, lambda: [LingeringEcho(tracker, 3.0)]) as sessions:
            vm = _vm(path)
            held: list[int] = []
            try:
                async with trio.open_nursery() as n:
                    await vm.start(await attach.connect(path), n)
                    await vm.open_channel(vm.find_offers(ECHO_IF_TYPE)[0], RING)
                    await _until(lambda: tracker.serves == 1, "the echo channel served")
                    (old,) = sessions
                    assert vm.conn is not None
                    if stuck:
                        held.append(os.dup(vm.conn.socket.fileno()))
                    await vm.conn.aclose()
                    await _until(vm.lost.is_set, "the VM gives up")
                    assert not old.ended.is_set()  # it was still there all along
                    n.cancel_scope.cancel()
            finally:
                _close(vm)
                for fd in held:
                    os.close(fd)
            assert not any(s.resumed for s in sessions)  # nobody took its state
            assert (vm.closed_reason or "").startswith("resource: "), vm.closed_reason
            assert "still ending" in (vm.closed_reason or "")
            await _until(old.ended.is_set, "the old session's end")
            again = _vm(path)
            try:
                async with trio.open_nursery() as n:
                    await again.start(await attach.connect(path), n)
                    gch = await again.open_channel(again.find_offers(ECHO_IF_TYPE)[0], RING)
                    await echo_mixed(gch.channel, 200, RING // 4 - 64)
                    n.cancel_scope.cancel()
            finally:
                _close(again)

    trio.run(main)
    assert max(tracker.most.values()) == 1, tracker.most
    refused = _lines(caplog, "still ending")
    assert len(refused) == 1, refused
    assert len(_lines(caplog, "ending its old session")) == (1 if stuck else 0)


def test_fresh_hello_waits_and_builds_its_devices_after_the_old_ones_closed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A VMM without restart support (a new boot of the same VM name) arrives while
    the old session still tears down: its devices are built only once the old
    session's are closed (a TAP or a file the old one holds is free again)."""
    caplog.set_level(logging.INFO, logger="vmbus")
    path = str(tmp_path / "vmbusd.sock")
    tracker = Tracker()

    async def main() -> None:
        async with _service(path, lambda: [LingeringEcho(tracker, 2.0)]) as sessions:
            first = SimulatedVm(ram_size=32 << 20, vm_id="guarded", restartable=False)
            try:
                async with trio.open_nursery() as n:
                    await first.start(await attach.connect(path), n)
                    await first.open_channel(first.find_offers(ECHO_IF_TYPE)[0], RING)
                    await _until(lambda: tracker.serves == 1, "the echo channel served")
                    (old,) = sessions
                    assert first.conn is not None
                    await first.conn.aclose()
                    n.cancel_scope.cancel()
            finally:
                _close(first)
            await _until(lambda: old.ending, "the old session notices")
            second = SimulatedVm(ram_size=32 << 20, vm_id="guarded", restartable=False)
            try:
                async with trio.open_nursery() as n:
                    await second.start(await attach.connect(path), n)
                    gch = await second.open_channel(second.find_offers(ECHO_IF_TYPE)[0], RING)
                    await echo_mixed(gch.channel, 200, RING // 4 - 64)
                    n.cancel_scope.cancel()
            finally:
                _close(second)

    trio.run(main)
    assert len(tracker.built) == 2 and tracker.closed, tracker
    assert tracker.built[1] >= tracker.closed[0], tracker
    assert max(tracker.most.values()) == 1, tracker.most
    assert _lines(caplog, "guarded: waiting for its previous session")


def test_two_live_vms_sharing_a_name_are_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Names are the VMMs' to pick and may repeat: only the same guest RAM makes a
    new session the successor of a live one."""
    caplog.set_level(logging.INFO, logger="vmbus")
    path = str(tmp_path / "vmbusd.sock")
    tracker = Tracker()

    async def main() -> None:
        async with _service(path, lambda: [LingeringEcho(tracker, 0.0)]) as sessions:
            a, b = _vm(path, "twin"), _vm(path, "twin")
            try:
                async with trio.open_nursery() as n:
                    await a.start(await attach.connect(path), n)
                    await b.start(await attach.connect(path), n)
                    chans = [
                        await vm.open_channel(vm.find_offers(ECHO_IF_TYPE)[0], RING)
                        for vm in (a, b)
                    ]
                    for gch in chans:
                        await echo_mixed(gch.channel, 200, RING // 4 - 64)
                    assert len(sessions) == 2
                    assert not any(s.ending for s in sessions)
                    n.cancel_scope.cancel()
            finally:
                _close(a)
                _close(b)

    trio.run(main)
    assert not _lines(caplog, "ending its old session")
    assert not _lines(caplog, "waiting for its previous session")
