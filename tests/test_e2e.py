"""The spine end to end: vmbusd as a real process, a simulated VM, echo channels.

Covers the user's commands (demo, serve + vm, vm --listen + attach), the happy
path at both implementations, and every hostile-guest and hostile-VMM case the
spine issue names: each gets its error status or a channel reset plus one log
line, and every other channel and VM carries on.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from conftest import OpenChannel
from e2e_support import ServeProcess, guest, serve_process

from devices.echo import ECHO_IF_TYPE, EchoDevice
from vmbus import attach
from vmbus import protocol as vp
from vmbus.guest.vm import GuestChannel, HostError, SimulatedVm
from vmbus.guest.workloads import echo_mixed
from vmbus.memory import sealed_memfd
from vmbus.ring import OFF_READ_INDEX, OFF_WRITE_INDEX, OutPacket, SendBatch

RING = 64 * 1024
MAXP = RING // 4 - 64

pytestmark = pytest.mark.timeout(120)


def vmbusd(*args: str, env: dict[str, str] | None = None, timeout: float = 90):
    return subprocess.run(
        [sys.executable, "-m", "vmbus.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


# -- the user's commands -----------------------------------------------------------


@pytest.mark.parametrize("native", ["1", "0"])
def test_demo_command(native: str) -> None:
    env = dict(os.environ, VMBUSD_NATIVE=native)
    r = vmbusd("demo", "--packets", "3000", env=env)
    assert r.returncode == 0, r.stderr
    assert "VMBus version negotiated : 5.3" in r.stdout
    assert "3000 packets" in r.stdout
    assert "storvsc relid 2       : VSTOR 0x0602" in r.stdout  # the demo's RAM disk
    assert "RAM disk read back     : all 4194304 bytes written, read, compared" in r.stdout
    # the demo's loopback NIC: the guest's netvsc VSC got NVSP 6.1, sent 2000 frames
    # (min(--packets, MAX_PROBE_FRAMES)) and saw each come back
    assert "netvsc relid 3        : NVSP 0x60001, MTU 1500" in r.stdout
    assert re.search(
        r"loopback NIC, 60 B     : [\d,]+ frames/s \(2000 frames sent, each came back\)", r.stdout
    )
    assert "every byte and the order verified: OK" in r.stdout


def test_help_explains_every_command() -> None:
    r = vmbusd("--help")
    assert r.returncode == 0
    for cmd in ("serve", "attach", "vm", "demo", "bench", "stats"):
        assert cmd in r.stdout
        sub = vmbusd(cmd, "--help")
        assert sub.returncode == 0 and len(sub.stdout) > 200, cmd


def test_serve_then_vm_connect(tmp_path: Path) -> None:
    with serve_process(tmp_path) as sp:
        r = vmbusd("vm", "--connect", sp.path, "--packets", "1500", "--json", "-")
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert out["ok"] and out["version"] == "5.3"
        assert out["channels"][0]["packets"] == 1500
        assert sp.alive()


def test_vm_listens_and_vmbusd_attaches(tmp_path: Path) -> None:
    path = str(tmp_path / "vm.sock")
    out_file = tmp_path / "out.json"
    vm = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vmbus.cli",
            "vm",
            "--listen",
            path,
            "--packets",
            "1000",
            "--json",
            str(out_file),
        ],
    )
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(path):
            assert vm.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        r = vmbusd("attach", path)
        assert r.returncode == 0, r.stderr
        assert vm.wait(timeout=60) == 0
    finally:
        if vm.poll() is None:
            vm.kill()
    out = json.loads(out_file.read_text())
    assert out["ok"] and out["channels"][0]["packets"] == 1000


# -- hostile guest: channels ---------------------------------------------------------


async def test_poisoned_channel_does_not_stop_the_other(tmp_path: Path) -> None:
    with serve_process(tmp_path, ["echo", "echo"]) as sp:
        async with guest(sp.path) as vm:
            a_offer, b_offer = vm.find_offers(ECHO_IF_TYPE)
            a = await vm.open_channel(a_offer, RING)
            b = await vm.open_channel(b_offer, RING)
            # a works first
            await echo_mixed(a.channel, 200, MAXP, seed=1)

            async def traffic_on_b() -> None:
                for seed in range(5):
                    await echo_mixed(b.channel, 400, MAXP, seed=seed)

            async with trio.open_nursery() as n:
                n.start_soon(traffic_on_b)
                await trio.sleep(0.01)
                # Poison a mid-traffic: a write_index beyond the data area.
                hdr = a.mapping.upstream_hdr
                hdr[OFF_WRITE_INDEX : OFF_WRITE_INDEX + 4] = (a.mapping.upstream_size + 8).to_bytes(
                    4, "little"
                )
                del hdr
                a.kick.signal()
            log = sp.wait_log("corrupt ring: ")
            assert log.count("channel reset") == 1
            # b still echoes after a was poisoned
            await echo_mixed(b.channel, 300, MAXP, seed=9)
            # channel reset: a is rescinded; once the guest lets go, the same device
            # comes back on a fresh channel and works
            with trio.fail_after(10):
                await vm.wait_rescind(a_offer.relid)
            await vm.release_offer(a_offer.relid)
            with trio.fail_after(10):
                while True:
                    fresh = [
                        o
                        for o in vm.find_offers(ECHO_IF_TYPE)
                        if o.if_instance == a_offer.if_instance
                    ]
                    if fresh:
                        break
                    await vm.offer_events.receive()
            c = await vm.open_channel(fresh[0], RING)
            await echo_mixed(c.channel, 300, MAXP, seed=10)
            await echo_mixed(b.channel, 300, MAXP, seed=11)
            await vm.close_channel(c)
            await vm.close_channel(b)
        assert sp.alive()


@pytest.mark.devices("echo", "echo")
async def test_guest_that_stops_reading_blocks_only_its_channel(
    service: ServeProcess, vm: SimulatedVm, open_channel: OpenChannel
) -> None:
    a = await open_channel(vm, EchoDevice)
    b = await open_channel(vm, EchoDevice)
    # Fill a in both directions: the guest writes and never reads.
    batch = SendBatch([OutPacket(6, 0, 1, [b"x" * 4000])])
    writes = 0
    for _ in range(200):
        res = a.channel.writer.write(batch)
        if res.signal:
            a.kick.signal()
        writes += res.npkts
        await trio.sleep(0.002)
    assert writes > (RING // 4096), "both rings should have filled"
    assert a.channel.writer.bytes_to_write() < 4096 + 32  # upstream is full
    # b is unaffected
    await echo_mixed(b.channel, 2000, MAXP, seed=3)
    # closing the stuck channel releases the host task blocked on it
    await vm.close_channel(a)
    await echo_mixed(b.channel, 500, MAXP, seed=4)
    await vm.close_channel(b)
    assert service.alive()
    assert "Traceback" not in service.log()


async def test_modifychannel_rebinds_and_traffic_continues(
    service: ServeProcess, vm: SimulatedVm, channel: GuestChannel
) -> None:
    await echo_mixed(channel.channel, 300, MAXP)
    assert await vm.modify_channel(channel, 1) == 0
    assert channel.vcpu == 1
    await echo_mixed(channel.channel, 300, MAXP, seed=2)
    # a vCPU the VM does not have is refused, and the binding stays
    assert await vm.modify_channel(channel, 7) != 0
    assert channel.vcpu == 1
    await echo_mixed(channel.channel, 100, MAXP, seed=3)
    await vm.close_channel(channel)
    assert service.alive()


async def test_open_refused_for_bad_ring_indices(tmp_path: Path) -> None:
    with serve_process(tmp_path) as sp:
        async with guest(sp.path) as vm:
            (offer,) = vm.find_offers(ECHO_IF_TYPE)

            def misalign_upstream_write(mapping) -> None:
                hdr = mapping.upstream_hdr
                hdr[OFF_WRITE_INDEX : OFF_WRITE_INDEX + 4] = (12).to_bytes(4, "little")
                del hdr

            def downstream_read_beyond(mapping) -> None:
                hdr = mapping.downstream_hdr
                bad = mapping.downstream_size + 64
                hdr[OFF_READ_INDEX : OFF_READ_INDEX + 4] = bad.to_bytes(4, "little")
                del hdr

            for corrupt in (misalign_upstream_write, downstream_read_beyond):
                with pytest.raises(HostError, match="refused"):
                    await vm.open_channel(offer, RING, before_open=corrupt)
            log = sp.wait_log("open refused, bad ring indices")
            assert "WINDEX_ALIGN" in log and "RINDEX_RANGE" in log
            # the channel is closed again and opens fine with sane rings
            ch = await vm.open_channel(offer, RING)
            await echo_mixed(ch.channel, 200, MAXP)
            await vm.close_channel(ch)


async def test_bad_opens_get_failure_status(tmp_path: Path) -> None:
    with serve_process(tmp_path) as sp:
        async with guest(sp.path) as vm:
            (offer,) = vm.find_offers(ECHO_IF_TYPE)
            pfns = vm.ram.alloc_pages(16)
            handle = await vm._request(
                "gpadl", None, lambda: vm.client.create_gpadl(offer.relid, pfns)
            )
            assert handle == 0  # the status of GPADL_CREATED
            gp = vm.client._next_handle - 1
            for k in (0, 1, 15, 16, 40):  # downstream offsets that leave no room
                status = await vm._request(
                    "open", offer.relid, lambda k=k: vm.client.open_channel(offer.relid, gp, k)
                )
                assert status != 0, k
            # unknown GPADL handle
            status = await vm._request(
                "open", offer.relid, lambda: vm.client.open_channel(offer.relid, 0x1234, 8)
            )
            assert status != 0
            # unknown relid: the bus answers with a failure result for that relid
            await vm.post_raw(vp.OpenChannel(999, 999, gp, 0, 8, b"").encode())
            sp.wait_log("violation")
            # a good open on the same GPADL still works
            assert (
                await vm._request(
                    "open", offer.relid, lambda: vm.client.open_channel(offer.relid, gp, 8)
                )
                == 0
            )
        assert sp.alive()


async def test_gpadl_outside_guest_ram_refused(service: ServeProcess, vm: SimulatedVm) -> None:
    (offer,) = vm.find_offers(ECHO_IF_TYPE)
    bogus = [vm.ram.alloc_pages(1)[0], (1 << 40) >> 12]  # the second PFN is not RAM
    status = await vm._request("gpadl", None, lambda: vm.client.create_gpadl(offer.relid, bogus))
    assert status == vp.STATUS_UNSUCCESSFUL
    ch = await vm.open_channel(offer, RING)
    await echo_mixed(ch.channel, 100, MAXP)
    await vm.close_channel(ch)
    assert service.alive()


# -- hostile guest: control plane, two VMs -----------------------------------------


async def test_two_vms_one_floods_garbage(tmp_path: Path) -> None:
    with serve_process(tmp_path) as sp:
        async with guest(sp.path, vm_id="good") as good, guest(sp.path, vm_id="bad") as bad:
            (goff,) = good.find_offers(ECHO_IF_TYPE)
            ch = await good.open_channel(goff, RING)

            async def flood() -> None:
                import random

                rng = random.Random(5)
                for i in range(3000):
                    n = rng.randrange(0, 241)
                    payload = rng.randbytes(n)
                    if i % 3 == 0 and n >= 8:  # valid-looking type, garbage body
                        payload = rng.randrange(0, 40).to_bytes(4, "little") + payload[4:]
                    await bad.post_raw(payload)

            async with trio.open_nursery() as n:
                n.start_soon(flood)
                for seed in range(4):
                    await echo_mixed(ch.channel, 500, MAXP, seed=seed)
            await good.close_channel(ch)
            # (the flood's random INITIATE_CONTACTs legitimately reset the bad VM's own bus)
        await _still_serves(sp.path)
        assert "violation" in sp.log()
        assert sp.alive()
        assert "Traceback" not in sp.log()


async def test_unload_then_contact_again(tmp_path: Path) -> None:
    with serve_process(tmp_path) as sp:
        async with guest(sp.path) as vm:
            (offer,) = vm.find_offers(ECHO_IF_TYPE)
            ch = await vm.open_channel(offer, RING)
            await echo_mixed(ch.channel, 100, MAXP)
            await vm.close_channel(ch)
            await vm.unload()
        # a new guest session (kexec-like) on a fresh connection works
        async with guest(sp.path) as vm2:
            (offer,) = vm2.find_offers(ECHO_IF_TYPE)
            ch = await vm2.open_channel(offer, RING)
            await echo_mixed(ch.channel, 100, MAXP)
            await vm2.close_channel(ch)


# -- hostile VMM -----------------------------------------------------------------------


async def _raw_vmm(path: str) -> attach.AttachConnection:
    conn = await attach.connect(path)
    await attach.handshake(
        conn, attach.Hello(version=attach.PROTOCOL_VERSION, role="vmm", vm_id="raw", vcpus=1)
    )
    return conn


async def _expect_error_then_eof(conn: attach.AttachConnection, code: str) -> None:
    with trio.fail_after(10):
        msg = await conn.receive()
        assert isinstance(msg, attach.Error) and msg.code == code, msg
        with pytest.raises(attach.ConnectionClosed):
            await conn.receive()


async def _still_serves(path: str) -> None:
    async with guest(path, vm_id="after") as vm:
        (offer,) = vm.find_offers(ECHO_IF_TYPE)
        ch = await vm.open_channel(offer, RING)
        await echo_mixed(ch.channel, 100, MAXP)
        await vm.close_channel(ch)


async def test_vmm_unmappable_memory_fd(tmp_path: Path) -> None:
    with serve_process(tmp_path) as sp:
        conn = await _raw_vmm(sp.path)
        r, w = os.pipe()
        try:
            await conn.send(attach.MemoryRegions((attach.MemoryRegion(0, 1 << 20, r, 0),)))
        finally:
            os.close(r)
            os.close(w)
        await _expect_error_then_eof(conn, attach.ErrorCode.RESOURCE)
        sp.wait_log("bad memory region")
        await _still_serves(sp.path)


async def test_vmm_overlapping_regions(tmp_path: Path) -> None:
    with serve_process(tmp_path) as sp:
        conn = await _raw_vmm(sp.path)
        fd = sealed_memfd("ram", 4 << 20)
        try:
            await conn.send(attach.MemoryRegions((attach.MemoryRegion(0, 2 << 20, fd, 0),)))
            await conn.send(attach.MemoryRegions((attach.MemoryRegion(1 << 20, 2 << 20, fd, 0),)))
        finally:
            os.close(fd)
        await _expect_error_then_eof(conn, attach.ErrorCode.RESOURCE)
        await _still_serves(sp.path)


@pytest.mark.parametrize(
    "datagram",
    [b"\xc1not msgpack", b"\x93\x01\x02\x03", b"\x81\xa1t\xa4nope", b"\x80" + b"\0" * 70000],
    ids=["not-msgpack", "not-a-map", "unknown-type", "oversized"],
)
async def test_vmm_malformed_datagram(tmp_path: Path, datagram: bytes) -> None:
    with serve_process(tmp_path) as sp:
        conn = await _raw_vmm(sp.path)
        raw = conn.socket
        try:
            await raw.send(datagram)
        except OSError:  # the oversized one may be refused by the kernel itself
            pytest.fail("the kernel refused a 70 KB SEQPACKET datagram")
        await _expect_error_then_eof(conn, attach.ErrorCode.PROTOCOL)
        log = sp.wait_log("rejected")
        assert log.count(" WARNING ") == 1, log  # one clear line per rejection
        await _still_serves(sp.path)


def test_socket_file_is_private(tmp_path: Path) -> None:
    with serve_process(tmp_path) as sp:
        assert (os.stat(sp.path).st_mode & 0o777) == 0o600
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(sp.path)  # root passes SO_PEERCRED (our own uid)
        s.close()


async def test_sigterm_shuts_down_cleanly(tmp_path: Path) -> None:
    with serve_process(tmp_path) as sp:
        conn = await attach.connect(sp.path)
        vm = SimulatedVm(ram_size=16 << 20, vm_id="leaving")
        try:
            async with trio.open_nursery() as n:
                await vm.start(conn, n)
                (offer,) = vm.find_offers(ECHO_IF_TYPE)
                ch = await vm.open_channel(offer, RING)
                await echo_mixed(ch.channel, 100, MAXP)
                sp.proc.send_signal(signal.SIGTERM)
                # the service says goodbye and unbinds before it goes
                with trio.fail_after(10):
                    while sp.alive():
                        await trio.sleep(0.02)
                n.cancel_scope.cancel()
        finally:
            ch.channel.release()
            ch.mapping.close()
            vm.close()
        assert sp.proc.returncode == 0
        assert not os.path.exists(sp.path), "the socket file must be removed"
        log = sp.log()
        assert "shutting down" in log and "Traceback" not in log


def test_many_sessions_over_time_are_not_refused(tmp_path: Path) -> None:
    """The session cap counts VMs attached at once, not VMs ever attached."""
    import vmbus.server as server

    async def main() -> None:
        server_path = str(tmp_path / "s.sock")
        async with trio.open_nursery() as n:
            await n.start(
                lambda **kw: server.serve_listener(
                    server_path, lambda: [EchoDevice()], max_sessions=8, **kw
                )
            )
            for i in range(8 + 3):
                async with guest(server_path, vm_id=f"vm{i}", ram_size=4 << 20) as vm:
                    assert vm.find_offers(ECHO_IF_TYPE)
            n.cancel_scope.cancel()

    trio.run(main)


async def test_gpadl_pages_capped_by_guest_ram(tmp_path: Path) -> None:
    """A guest cannot make vmbusd hold more page lists than it has RAM (plus slack)."""
    from vmbus.server import GPADL_PAGES_SLACK

    with serve_process(tmp_path) as sp:
        ram = 16 << 20
        async with guest(sp.path, ram_size=ram) as vm:
            (offer,) = vm.find_offers(ECHO_IF_TYPE)
            page = vm.ram.alloc_pages(1)[0]
            big = [page] * 8190  # valid RAM, registered over and over
            allowed = (ram >> 12) + GPADL_PAGES_SLACK
            statuses = []
            for _ in range(4):
                statuses.append(
                    await vm._request(
                        "gpadl", None, lambda: vm.client.create_gpadl(offer.relid, big)
                    )
                )
            ok = statuses.count(0)
            assert ok == allowed // 8190, statuses
            assert all(s == vp.STATUS_UNSUCCESSFUL for s in statuses[ok:])
            sp.wait_log("GPADL pages")
        assert sp.alive()


async def test_every_version_end_to_end(tmp_path: Path) -> None:
    """Each version a guest may propose (Linux's eight, WIN7, 6.0) works all the way:
    posts on the right connection id, GPADL, open, echo traffic, MODIFYCHANNEL where
    the version has it, close, unload; and a version we do not speak is refused."""
    versions = (*vp.LINUX_VERSIONS, vp.VERSION_WIN7, vp.VERSION_COPPER)
    with serve_process(tmp_path) as sp:
        for v in versions:
            async with guest(sp.path, client_options={"versions": (v,), "max_version": v}) as vm:
                assert vm.version == v, vp.version_str(v)
                (offer,) = vm.find_offers(ECHO_IF_TYPE)
                ch = await vm.open_channel(offer, RING)
                # below 2.4 the VMM must signal through the guest's interrupt page
                want_page = vm.client.interrupt_page if v < vp.VERSION_WIN8 else 0
                assert vm._binds[offer.relid].interrupt_page == want_page
                await echo_mixed(ch.channel, 200, MAXP)
                if v >= vp.VERSION_WIN10_V4_1:
                    assert await vm.modify_channel(ch, 1) == 0
                    await echo_mixed(ch.channel, 100, MAXP, seed=2)
                await vm.close_channel(ch)
                await vm.unload()
        with pytest.RaisesGroup(pytest.RaisesExc(HostError, match="refused every")):
            async with guest(
                sp.path, client_options={"versions": (vp.VERSION_WS2008,), "max_version": 0xFFFF}
            ):
                pass
        assert sp.alive()
