"""A hostile VMM: the attach socket's peer is as untrusted as the guest.

Each test plays a VMM that breaks a rule on purpose and checks that vmbusd loses
nothing (no fd, no thread, no other VM) over it. Where vmbusd's own process state
matters (open fds), the service runs in this process (a `VmSession` or
`serve_listener` in the test's trio run); where a failure would take the service
down or hang it (SIGBUS, a blocked write), it runs as `vmbusd serve` in its own
process, so the test fails instead of dying or hanging with it.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgpack
import pytest
import trio
from conftest import attached_vm
from e2e_support import serve_process

from devices.echo import ECHO_IF_TYPE, EchoDevice
from vmbus import attach, eventfd, server
from vmbus import protocol as vp
from vmbus.guest.vm import HostError, SimulatedVm
from vmbus.guest.workloads import echo_mixed
from vmbus.memory import MAX_REGIONS, sealed_memfd
from vmbus.ring import VM_PKT_DATA_INBAND, OutPacket
from vmbus.server import VmSession

RING = 64 * 1024
MAXP = RING // 4 - 64
PAGE = 4096
SATURATED = 0xFFFF_FFFF_FFFF_FFFE  # the largest value write(2) can leave in an eventfd

pytestmark = pytest.mark.timeout(120)


# --------------------------------------------------------------------------- helpers


def fds_named(name: str) -> int:
    """How many of this process's fds are the memfd(s) called ``name``."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:{name} "):
                n += 1
    return n


@contextlib.asynccontextmanager
async def session_and_vmm(
    vcpus: int = 2, *, hello: bool = True
) -> AsyncIterator[tuple[VmSession, attach.AttachConnection]]:
    """A VmSession running in this process, and the raw VMM end of its socket."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    host = attach.AttachConnection(trio.socket.from_stdlib_socket(a))
    vmm = attach.AttachConnection(trio.socket.from_stdlib_socket(b))
    session = VmSession(host, [EchoDevice()], vm_label="hostile")
    try:
        async with trio.open_nursery() as n:
            n.start_soon(session.run)
            try:
                if hello:
                    await attach.handshake(
                        vmm, attach.Hello(attach.PROTOCOL_VERSION, "vmm", "hostile", vcpus)
                    )
                yield session, vmm
            finally:
                # No await here: a Cancelled raised in this finally would be caught
                # by the nursery's scope and take the test's own failure with it.
                n.cancel_scope.cancel()
    finally:
        vmm.socket.close()


async def expect_error_then_eof(conn: attach.AttachConnection, code: str) -> attach.Error:
    """The session's farewell: one ``error`` with ``code``, then the close."""
    with trio.fail_after(10):
        msg = await conn.receive()
        assert isinstance(msg, attach.Error) and msg.code == code, msg
        with pytest.raises(attach.ConnectionClosed):
            await conn.receive()
    return msg


async def still_serves(path: str, vm_id: str = "after") -> None:
    async with attached_vm(path, vm_id=vm_id) as vm:
        (offer,) = vm.find_offers(ECHO_IF_TYPE)
        ch = await vm.open_channel(offer, RING)
        with trio.fail_after(10):
            await echo_mixed(ch.channel, 100, MAXP)
        await vm.close_channel(ch)


# --------------------------------------------------------------------------- 1. fds


async def test_refused_region_closes_the_fds_of_every_region() -> None:
    """Region 0 is too short for its size: regions 1 and 2 were never tried, and
    their fds must be closed all the same (they used to stay open for good)."""
    name = "hostile-short"
    fds = [sealed_memfd(name, PAGE), sealed_memfd(name, 4 * PAGE), sealed_memfd(name, 4 * PAGE)]
    try:
        async with session_and_vmm() as (_session, vmm):
            regions = (
                attach.MemoryRegion(0, 2 * PAGE, fds[0], 0),  # the file holds only one page
                attach.MemoryRegion(1 << 20, 4 * PAGE, fds[1], 0),
                attach.MemoryRegion(2 << 20, 4 * PAGE, fds[2], 0),
            )
            await vmm.send(attach.MemoryRegions(regions))
            err = await expect_error_then_eof(vmm, attach.ErrorCode.RESOURCE)
            assert "shorter than" in err.message
            assert fds_named(name) == len(fds), "vmbusd kept fds of a rejected message"
    finally:
        attach.close_fds(fds)
    assert fds_named(name) == 0


async def test_one_region_too_many_closes_the_fds_of_every_region() -> None:
    """The per-VM region cap is hit by the first region of a later message."""
    ram = sealed_memfd("hostile-ram", MAX_REGIONS * PAGE)
    name = "hostile-extra"
    extra = [sealed_memfd(name, PAGE) for _ in range(3)]
    try:
        async with session_and_vmm() as (session, vmm):
            full = tuple(
                attach.MemoryRegion(i * PAGE, PAGE, ram, i * PAGE) for i in range(MAX_REGIONS)
            )
            await vmm.send(attach.MemoryRegions(full))
            more = tuple(
                attach.MemoryRegion((1 << 30) + i * PAGE, PAGE, fd, 0) for i, fd in enumerate(extra)
            )
            await vmm.send(attach.MemoryRegions(more))
            err = await expect_error_then_eof(vmm, attach.ErrorCode.RESOURCE)
            assert f"more than {MAX_REGIONS} regions" in err.message
            assert len(session.memory.regions) == MAX_REGIONS
            assert fds_named(name) == len(extra), "vmbusd kept fds of a rejected message"
    finally:
        attach.close_fds([ram, *extra])


async def test_fds_sent_instead_of_hello_are_closed() -> None:
    """Rejected at the attach layer, before any session state: fds closed too."""
    name = "hostile-early"
    fd = sealed_memfd(name, PAGE)
    try:
        async with session_and_vmm(hello=False) as (_session, vmm):
            await vmm.send(attach.MemoryRegions((attach.MemoryRegion(0, PAGE, fd, 0),)))
            with trio.fail_after(10):
                assert isinstance(await vmm.receive(), attach.Hello)
            err = await expect_error_then_eof(vmm, attach.ErrorCode.PROTOCOL)
            assert "expected hello" in err.message
            assert fds_named(name) == 1
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- 2. eventfds


def _returns_within(fn: Callable[[], object], seconds: float = 5.0) -> object:
    """Run fn in a daemon thread: its result, or a test failure if it blocks."""
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn} blocked"
    return out[0]


def _blocking_eventfd(value: int) -> int:
    """An eventfd as a hostile VMM leaves it: O_NONBLOCK cleared, counter at value."""
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    if value:
        os.eventfd_write(fd, value)
    return fd


def test_signal_never_blocks_on_a_saturated_blocking_eventfd() -> None:
    fd = _blocking_eventfd(SATURATED)
    try:
        _returns_within(lambda: eventfd.signal(fd))
        _returns_within(lambda: eventfd.signal(fd))
        assert eventfd.drain(fd) == (1 << 64) - 1  # saturated, and still readable
        _returns_within(lambda: eventfd.signal(fd))
        assert eventfd.drain(fd) == 1  # and an ordinary signal again
    finally:
        os.close(fd)


def test_drain_never_blocks_on_an_empty_blocking_eventfd() -> None:
    fd = _blocking_eventfd(0)
    try:
        assert _returns_within(lambda: eventfd.drain(fd)) == 0
    finally:
        os.close(fd)


def test_fallback_refuses_a_cleared_o_nonblock() -> None:
    """Without AIO, a signal checks the flag first: cleared is the peer's fault."""
    fd = _blocking_eventfd(SATURATED)
    try:
        with pytest.raises(eventfd.PeerTampered):
            eventfd.checked_write(fd)
        fcntl.fcntl(fd, fcntl.F_SETFL, os.O_NONBLOCK)
        eventfd.checked_write(fd)  # saturated but non-blocking: skipped, no error
        assert eventfd.drain(fd) == SATURATED
    finally:
        os.close(fd)


async def test_vmm_that_blocks_the_call_eventfd_stops_only_its_own_vm(tmp_path: Path) -> None:
    """The VMM clears O_NONBLOCK on the call eventfd it got in `bind` (the flag is
    shared with vmbusd's copy) and saturates the counter: a write(2) there would
    block vmbusd's only thread. Another VM must keep working."""
    with serve_process(tmp_path) as sp:
        async with attached_vm(sp.path, vm_id="bystander") as good:
            (offer,) = good.find_offers(ECHO_IF_TYPE)
            good_ch = await good.open_channel(offer, RING)
            with trio.fail_after(10):
                await echo_mixed(good_ch.channel, 50, MAXP)
            async with attached_vm(sp.path, vm_id="saboteur") as bad:
                (bad_offer,) = bad.find_offers(ECHO_IF_TYPE)
                bad_ch = await bad.open_channel(bad_offer, RING)
                call = bad_ch.call.fd  # the VMM's copy: same open file description
                fcntl.fcntl(call, fcntl.F_SETFL, fcntl.fcntl(call, fcntl.F_GETFL) & ~os.O_NONBLOCK)
                os.eventfd_write(call, SATURATED)
                # Make vmbusd signal it: packets to echo, while the guest is not
                # reading (its interrupt mask is clear, so each echo is signalled).
                for i in range(8):
                    await bad_ch.channel.send([OutPacket(VM_PKT_DATA_INBAND, 0, i, [b"x" * 64])])
                await trio.sleep(0.5)
                assert not fcntl.fcntl(call, fcntl.F_GETFL) & os.O_NONBLOCK
                with trio.fail_after(10):  # the other VM is served all the same
                    await echo_mixed(good_ch.channel, 200, MAXP)
                assert sp.alive()
                # vmbusd did signal the saboteur: its counter went past write(2)'s limit.
                assert eventfd.drain(call) == (1 << 64) - 1
            await still_serves(sp.path)
            with trio.fail_after(10):
                await echo_mixed(good_ch.channel, 50, MAXP)
            await good.close_channel(good_ch)


# --------------------------------------------------------------------------- 3. handshakes


async def _silent(path: str) -> trio.socket.SocketType:
    """A connection that never says hello (a blocking connect, in a thread: it waits
    for room in the listen backlog instead of failing while vmbusd catches up)."""

    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(path)
        return sock

    return trio.socket.from_stdlib_socket(await trio.to_thread.run_sync(connect))


async def _farewell(sock: trio.socket.SocketType) -> attach.Error:
    """What vmbusd tells a silent connection before closing it (its hello first)."""
    conn = attach.AttachConnection(sock)
    with trio.fail_after(10):
        msg = await conn.receive()
        if isinstance(msg, attach.Hello):
            msg = await conn.receive()
        assert isinstance(msg, attach.Error), msg
        with pytest.raises(attach.ConnectionClosed):
            await conn.receive()
    await conn.aclose()
    return msg


async def test_silent_connections_do_not_lock_vms_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """64 connections that never send hello used to fill MAX_SESSIONS for good."""
    monkeypatch.setattr(attach, "HANDSHAKE_TIMEOUT_S", 0.5)
    path = str(tmp_path / "vmbusd.sock")
    async with trio.open_nursery() as n:
        await n.start(lambda **kw: server.serve_listener(path, lambda: [EchoDevice()], **kw))
        silent = [await _silent(path) for _ in range(server.MAX_SESSIONS)]
        codes = [(await _farewell(s)).code for s in silent]
        # The uid's first few wait for their deadline; the rest are refused at once.
        pending = attach.MAX_PENDING_HANDSHAKES_PER_UID
        assert codes.count(attach.ErrorCode.TIMEOUT) == pending, codes
        assert codes.count(attach.ErrorCode.RESOURCE) == len(codes) - pending, codes
        await still_serves(path)
        n.cancel_scope.cancel()


async def test_only_established_sessions_count_toward_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "MAX_SESSIONS", 2)
    path = str(tmp_path / "vmbusd.sock")
    async with trio.open_nursery() as n:
        await n.start(lambda **kw: server.serve_listener(path, lambda: [EchoDevice()], **kw))
        silent = [await _silent(path) for _ in range(2)]  # within their deadline
        async with attached_vm(path, vm_id="one"), attached_vm(path, vm_id="two"):
            third = SimulatedVm(ram_size=16 << 20, vm_id="three")
            try:
                conn = await attach.connect(path)
                refused: list[attach.PeerError] = []
                try:
                    async with trio.open_nursery() as vn:
                        await third.start(conn, vn)
                except* attach.PeerError as group:  # vmbusd's farewell
                    refused = [e for e in group.exceptions if isinstance(e, attach.PeerError)]
                assert [e.code for e in refused] == [attach.ErrorCode.RESOURCE]
                assert "2 VMs already attached" in refused[0].message
            finally:
                third.close()
        for s in silent:
            s.close()
        n.cancel_scope.cancel()


def _connect_as(uid: int, path: str) -> subprocess.Popen[str]:
    """A process of another uid that connects, sends hello and prints what it gets."""
    hello, _ = attach.encode_message(attach.Hello(1, "vmm", "other-uid", 1))
    script = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
        "s.connect(sys.argv[1])\n"
        "s.send(bytes.fromhex(sys.argv[2]))\n"
        "print(s.recv(65536).hex(), flush=True)\n"
        "sys.stdin.read()\n"  # stay connected until told to go
    )
    python = shutil.which("python3", path="/usr/bin:/bin")  # one that uid can run
    assert python is not None, "no /usr/bin/python3 to run as another uid"
    return subprocess.Popen(
        [python, "-I", "-c", script, path, hello.hex()],
        user=uid,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


async def test_unfinished_handshakes_are_capped_per_uid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attach, "HANDSHAKE_TIMEOUT_S", 60.0)  # none expires in this test
    cap = attach.MAX_PENDING_HANDSHAKES_PER_UID
    with tempfile.TemporaryDirectory(prefix="vmbusd-uid-") as tmp:
        os.chmod(tmp, 0o755)
        path = os.path.join(tmp, "vmbusd.sock")
        other = 65534  # nobody
        async with trio.open_nursery() as n:
            await n.start(
                lambda **kw: server.serve_listener(
                    path, lambda: [EchoDevice()], allowed_uids={os.getuid(), other}, **kw
                )
            )
            silent = [await _silent(path) for _ in range(cap)]
            refused = await _farewell(await _silent(path))
            assert refused.code == attach.ErrorCode.RESOURCE
            assert f"{cap} unfinished attach handshakes" in refused.message
            # Another uid is not affected (needs root to be another uid).
            if os.getuid() == 0:
                os.chmod(path, 0o666)
                proc = await trio.to_thread.run_sync(_connect_as, other, path)
                try:
                    assert proc.stdout is not None
                    line = await trio.to_thread.run_sync(proc.stdout.readline)
                    got = attach.decode_message(bytes.fromhex(line.strip()), [])
                    assert isinstance(got, attach.Hello) and got.role == "vmbusd", got
                finally:
                    proc.communicate("", timeout=10)
            # One silent connection goes away: its slot is free again.
            silent.pop().close()
            with trio.fail_after(10):
                while True:
                    await trio.sleep(0.02)
                    async with await attach.connect(path) as conn:
                        hello = attach.Hello(1, "vmm", "late", 1)
                        try:
                            await attach.handshake(conn, hello)
                            break
                        except attach.AttachProtocolError as exc:  # not yet noticed
                            assert exc.code == attach.ErrorCode.RESOURCE
            for s in silent:
                s.close()
            n.cancel_scope.cancel()


# --------------------------------------------------------------------------- 4. sealed RAM


def test_sealed_guest_ram_cannot_change_size() -> None:
    """What the simulated VM hands vmbusd: a memfd whose size is fixed for good."""
    vm = SimulatedVm(ram_size=2 << 20)
    try:
        for size in (0, 1 << 20, 4 << 20):
            with pytest.raises(PermissionError) as e:
                os.ftruncate(vm.ram.fd, size)
            assert e.value.errno == errno.EPERM
    finally:
        vm.close()


async def test_unsealed_ram_is_refused_and_truncation_cannot_kill_vmbusd(tmp_path: Path) -> None:
    """A VMM that truncates its RAM file under vmbusd's mapping would make vmbusd's
    next access fault (SIGBUS), killing every VM's session. An unsealed memfd is
    therefore refused when it arrives; if it were not, the attack is carried out."""
    with serve_process(tmp_path) as sp:
        async with attached_vm(sp.path, vm_id="bystander") as good:
            (offer,) = good.find_offers(ECHO_IF_TYPE)
            good_ch = await good.open_channel(offer, RING)
            vm = SimulatedVm(ram_size=16 << 20, vm_id="truncator", seal_ram=False)
            refusal = ""
            try:
                conn = await attach.connect(sp.path)
                async with trio.open_nursery() as n:
                    try:
                        await vm.start(conn, n)
                    except HostError as exc:
                        refusal = str(exc)
                    else:  # accepted: shrink the file under vmbusd, then make it look
                        (bad_offer,) = vm.find_offers(ECHO_IF_TYPE)
                        bad_ch = await vm.open_channel(bad_offer, RING)
                        os.ftruncate(vm.ram.fd, 0)
                        os.eventfd_write(bad_ch.kick.fd, 1)  # vmbusd reads the ring header
                        await trio.sleep(1)
                        vm.channels.clear()  # the guest's side: drop our views unread
                        bad_ch.channel.release()
                        bad_ch.mapping.close()
                    n.cancel_scope.cancel()
                await conn.aclose()
            finally:
                vm.close()
            assert sp.alive(), f"vmbusd died (SIGBUS?):\n{sp.log()[-2000:]}"
            assert "resource" in refusal and "F_SEAL_SHRINK" in refusal, refusal
            with trio.fail_after(10):
                await echo_mixed(good_ch.channel, 100, MAXP)
            await good.close_channel(good_ch)
        sp.wait_log("not sealed against shrinking")


# --------------------------------------------------------------------------- 5. docs vs code


async def test_post_naming_a_vcpu_the_vm_lacks_is_refused() -> None:
    contact = vp.InitiateContact(vp.VERSION_WIN10_V5_3, 0, interrupt_page=2).encode()  # SINT 2
    async with session_and_vmm(vcpus=2) as (_session, vmm):
        await vmm.send(attach.PostFromGuest(4, 1, contact))  # vCPU 1 exists
        with trio.fail_after(10):
            got = await vmm.receive()
        assert isinstance(got, attach.PostToGuest)  # VERSION_RESPONSE
        await vmm.send(attach.PostFromGuest(1, 2, vp.RequestOffers().encode()))  # vCPU 2 does not
        err = await expect_error_then_eof(vmm, attach.ErrorCode.PROTOCOL)
        assert "vcpu 2" in err.message


async def test_overlap_inside_one_message_is_protocol_across_messages_resource() -> None:
    """Across messages an overlap is a request vmbusd cannot honour (`resource`);
    inside one message the message contradicts itself (`protocol`), as the docs say."""
    fd = sealed_memfd("hostile-overlap", 8 * PAGE)
    try:
        async with session_and_vmm() as (_session, vmm):
            await vmm.send(attach.MemoryRegions((attach.MemoryRegion(0, 4 * PAGE, fd, 0),)))
            await vmm.send(attach.MemoryRegions((attach.MemoryRegion(2 * PAGE, 4 * PAGE, fd, 0),)))
            err = await expect_error_then_eof(vmm, attach.ErrorCode.RESOURCE)
            assert "overlaps" in err.message
        async with session_and_vmm() as (_session, vmm):
            # MemoryRegions refuses to build such a message, so send the bytes.
            regions = [
                {"gpa": 0, "size": 4 * PAGE, "fd": 0, "offset": 0},
                {"gpa": 2 * PAGE, "size": 4 * PAGE, "fd": 1, "offset": 0},
            ]
            data = msgpack.packb({"t": "memory", "regions": regions}, use_bin_type=True)
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd, fd]))]
            await vmm.socket.sendmsg([data], anc)
            err = await expect_error_then_eof(vmm, attach.ErrorCode.PROTOCOL)
            assert "overlap" in err.message
    finally:
        os.close(fd)


async def test_an_error_from_the_vmm_is_not_answered() -> None:
    async with session_and_vmm() as (_session, vmm):
        await vmm.send(attach.Error("internal", "the VMM is going away"))
        with trio.fail_after(10), pytest.raises(attach.ConnectionClosed):
            got = await vmm.receive()
            pytest.fail(f"vmbusd answered an error with {got}")


async def test_vmbusd_says_who_it_is() -> None:
    """The worked example's D→V hello names vmbusd's version in `software`."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    host = attach.AttachConnection(trio.socket.from_stdlib_socket(a))
    vmm = attach.AttachConnection(trio.socket.from_stdlib_socket(b))
    session = VmSession(host, [EchoDevice()], vm_label="who")
    async with trio.open_nursery() as n:
        n.start_soon(session.run)
        theirs = await attach.handshake(vmm, attach.Hello(1, "vmm", "who", 1))
        assert theirs.software.startswith("vmbusd ") and theirs.vcpus == 0
        n.cancel_scope.cancel()
    await vmm.aclose()
