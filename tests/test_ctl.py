"""`vmbusd ctl` against a real `vmbusd serve --control` process, and per-VM device
lists: the simulated guest's storvsc sees a hot-added disk (it rescans on
ENUMERATE_BUS, as Linux's storvsc_host_scan does), does I/O on it, and sees it go."""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from conftest import attached_vm, open_channel_of
from test_cli import one_line_error, running, vmbusd

from devices.echo.vsp import EchoDevice
from devices.netvsc import rndis as rn
from devices.netvsc.vsc import NetvscGuest
from devices.netvsc.vsp import NETVSC_IF_TYPE
from devices.storvsc.protocol import SCSI_IF_TYPE, SrbStatus
from devices.storvsc.vsc import StorvscHba, attach_storvsc
from vmbus.config import ConfigError, devices_factory, devices_from_config
from vmbus.guest.vm import GuestOffer, SimulatedVm

pytestmark = pytest.mark.timeout(120)

VMBUSD = str(Path(sys.executable).with_name("vmbusd"))

CONFIG = """
[[device]]
type = "echo"

[vm.db1]
[[vm.db1.device]]
type = "storvsc"
[[vm.db1.device.lun]]
backend = "memory"
size = "1M"

[vm.net1]
[[vm.net1.device]]
type = "netvsc"
"""


def _storvsc(vm: SimulatedVm) -> GuestOffer:
    (offer,) = [o for o in vm.find_offers(SCSI_IF_TYPE) if o.sub_channel_index == 0]
    return offer


async def ctl(*args: str) -> tuple[int, str, str]:
    """`vmbusd ctl ...` as its own process (the test's trio loop keeps serving)."""
    r = await trio.run_process(
        [VMBUSD, "ctl", *args], capture_stdout=True, capture_stderr=True, check=False
    )
    return r.returncode, r.stdout.decode(), r.stderr.decode()


def _one_line(rc: int, err: str, *needles: str) -> None:
    lines = err.splitlines()
    assert rc == 2 and len(lines) == 1, (rc, err)
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


async def _wait_rescan(hba: StorvscHba, before: int) -> None:
    with trio.fail_after(10):
        while hba.rescans <= before:
            await hba.rescanned.wait()


async def test_ctl_disk_add_io_remove(tmp_path: Path) -> None:
    cfg = tmp_path / "vmbusd.toml"
    cfg.write_text(CONFIG)
    sock, ctl_sock = str(tmp_path / "s.sock"), str(tmp_path / "ctl.sock")
    args = ["serve", "--listen", sock, "--config", str(cfg), "--control", ctl_sock]
    with running(args, tmp_path / "serve.log") as serve:
        serve.wait_for("control on")
        assert stat.S_IMODE(os.stat(ctl_sock).st_mode) == 0o600
        async with attached_vm(sock, vm_id="db1") as vm:
            async with attach_storvsc(vm, _storvsc(vm)) as hba:
                assert sorted(hba.disks) == [0]
                seen = hba.rescans
                rc, out, err = await ctl(
                    ctl_sock, "disk", "add", "--vm", "db1", "--lun", "3", "--size", "2M"
                )
                assert rc == 0, err
                assert "LUN 3 added (2,097,152 bytes)" in out
                await _wait_rescan(hba, seen)
                assert sorted(hba.disks) == [0, 3] and hba.disks[3].size == 2 << 20
                data = os.urandom(64 * 512)
                await hba.write(3, 100, data)
                assert await hba.read(3, 100, 64) == data

                # a file LUN, created by the command, bytes checked in the file
                img = tmp_path / "hot.img"
                rc, out, err = await ctl(
                    ctl_sock, "disk", "add", "--vm", "db1", "--lun", "4",
                    "--backend", "file", "--path", str(img), "--create-size", "1M",
                )  # fmt: skip
                assert rc == 0, err
                await _wait_rescan(hba, seen + 1)
                await hba.write(4, 8, data[:4096])
                await hba.flush(4)
                assert img.read_bytes()[8 * 512 : 8 * 512 + 4096] == data[:4096]

                # mistakes: one line, exit 2, nothing changed
                add = [ctl_sock, "disk", "add", "--lun"]
                _one_line(*(await ctl(*add, "3", "--vm", "db1", "--size", "1M"))[::2], "in use")
                _one_line(
                    *(await ctl(*add, "5", "--vm", "nosuch", "--size", "1M"))[::2],
                    "no VM named 'nosuch'",
                    "db1",
                )
                _one_line(
                    *(await ctl(*add, "5", "--vm", "db1", "--size", "12x"))[::2], "invalid size"
                )
                _one_line(
                    *(await ctl(*add, "5", "--vm", "db1", "--backend", "nope"))[::2],
                    "unknown backend 'nope'",
                    "memory",
                )
                _one_line(
                    *(
                        await ctl(
                            *add, "5", "--vm", "db1", "--backend", "file",
                            "--path", str(tmp_path / "missing.img"),
                        )
                    )[::2],
                    "does not exist",
                )  # fmt: skip
                _one_line(
                    *(await ctl(*add, "5", "--vm", "db1", "--device", "1", "--size", "1M"))[::2],
                    "1 storvsc device(s)",
                )
                assert sorted(hba.disks) == [0, 3, 4]

                rc, out, err = await ctl(ctl_sock, "disk", "remove", "--vm", "db1", "--lun", "3")
                assert rc == 0 and "LUN 3 removed" in out, err
                await _wait_rescan(hba, seen + 2)
                assert sorted(hba.disks) == [0, 4]
                reply, _ = await hba.execute(bytes(6), lun=3)  # TEST UNIT READY
                assert reply.srb_status & 0x3F == SrbStatus.INVALID_LUN
                _one_line(
                    *(await ctl(ctl_sock, "disk", "remove", "--vm", "db1", "--lun", "3"))[::2],
                    "no LUN 3",
                )
                assert all(q.errors == [] for q in hba.queues)
        assert serve.stop() == 0
    log = serve.text()
    assert "Traceback" not in log


def test_ctl_without_service(tmp_path: Path) -> None:
    r = vmbusd("ctl", str(tmp_path / "none.sock"), "disk", "remove", "--vm", "x", "--lun", "0")
    one_line_error(r, "vmbusd serve --control")


async def test_per_vm_device_lists(tmp_path: Path) -> None:
    """[vm.NAME] lists go to the VM of that name; every other VM gets [[device]]."""
    cfg = tmp_path / "vmbusd.toml"
    cfg.write_text(CONFIG)
    sock = str(tmp_path / "s.sock")
    with running(["serve", "--listen", sock, "--config", str(cfg)], tmp_path / "s.log") as serve:
        serve.wait_for("listening on")
        echo = EchoDevice.if_type
        async with attached_vm(sock, vm_id="db1") as a, attached_vm(sock, vm_id="other") as b:
            assert {o.if_type for o in a.offers.values()} == {SCSI_IF_TYPE}
            assert {o.if_type for o in b.offers.values()} == {echo}
        async with attached_vm(sock, vm_id="net1") as c:
            assert {o.if_type for o in c.offers.values()} == {NETVSC_IF_TYPE}
        assert serve.stop() == 0


async def test_ctl_nic_link(tmp_path: Path) -> None:
    cfg = tmp_path / "vmbusd.toml"
    cfg.write_text(CONFIG)
    sock, ctl_sock = str(tmp_path / "s.sock"), str(tmp_path / "ctl.sock")
    args = ["serve", "--listen", sock, "--config", str(cfg), "--control", ctl_sock]
    with running(args, tmp_path / "serve.log") as serve:
        serve.wait_for("control on")
        async with attached_vm(sock, vm_id="net1") as vm:
            gch = await open_channel_of(vm, NETVSC_IF_TYPE)
            nic = NetvscGuest(vm, gch)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(nic.receive_loop)
                with trio.fail_after(20):
                    await nic.connect()
                    await nic.device_add()
                    rc, out, err = await ctl(ctl_sock, "nic", "link", "down", "--vm", "net1")
                    assert rc == 0 and "link down; the guest was told" in out, err
                    while not nic.indications:
                        await trio.sleep(0.01)
                    (status,) = struct.unpack(
                        "<I", await nic.query(rn.Oid.GEN_MEDIA_CONNECT_STATUS)
                    )
                    assert status == 1  # disconnected
                    rc, out, err = await ctl(ctl_sock, "nic", "link", "up", "--vm", "net1")
                    assert rc == 0, err
                    while len(nic.indications) < 2:
                        await trio.sleep(0.01)
                assert nic.indications == [rn.Status.MEDIA_DISCONNECT, rn.Status.MEDIA_CONNECT]
                _one_line(
                    *(await ctl(ctl_sock, "nic", "link", "up", "--vm", "db1"))[::2],
                    "no VM named 'db1'",
                )
                nursery.cancel_scope.cancel()
        assert serve.stop() == 0


@pytest.mark.parametrize(
    ("cfg", "needle"),
    [
        ({"vm": {"a": {"devices": []}}}, "[vm.a]: unknown key 'devices' (did you mean 'device'?)"),
        ({"vm": {"a": {"device": {"type": "echo"}}}}, "write [[vm.a.device]]"),
        ({"vm": {"a": {"device": []}}}, "no devices"),
        ({"vm": {"a": 3}}, "[vm.a]: must be a table"),
        ({"vm": [1]}, "'vm' must be tables"),
        ({"vm": {"a": {"device": [{"type": "nosuch"}]}}}, "[vm.a] device #1"),
        ({"vms": {}}, "unknown key 'vms' (did you mean 'vm'?)"),
    ],
)
def test_per_vm_config_errors(cfg: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        devices_from_config(cfg, "f.toml", "a")
    assert needle in str(info.value)


def test_per_vm_without_default(tmp_path: Path) -> None:
    """Only [vm.NAME] lists: that VM is served, any other is told why in one line."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('[vm.a]\n[[vm.a.device]]\ntype = "echo"\n')
    factory = devices_factory(str(cfg))
    assert [d.name for d in factory.for_vm("a")] == ["echo"]
    with pytest.raises(ConfigError, match=r"no \[vm.b\] section and no default"):
        factory.for_vm("b")
    bad = tmp_path / "bad.toml"
    bad.write_text('[[device]]\ntype = "echo"\n[vm.a]\n[[vm.a.device]]\ntype = "nosuch"\n')
    r = vmbusd("serve", "--listen", str(tmp_path / "s.sock"), "--config", str(bad))
    one_line_error(r, "[vm.a] device #1", "nosuch")


async def test_control_socket_access_rules(tmp_path: Path, nursery: trio.Nursery) -> None:
    """0600, a peer whose uid is not allowed gets nothing, a request is one bounded
    line, nonsense gets a one-line error (in process: the same serve_control)."""
    from vmbus import control
    from vmbus.stats import MAX_REQUEST

    path = str(tmp_path / "c.sock")
    await nursery.start(lambda **kw: control.serve_control(path, set(), **kw))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    def ask(req: object) -> dict[str, object]:
        return control.request(path, req)  # type: ignore[arg-type]

    answer = await trio.to_thread.run_sync(ask, {"cmd": "disk-add", "vm": "x", "lun": 0})
    assert answer == {"ok": False, "error": "no VM named 'x' is attached (attached: none)"}
    answer = await trio.to_thread.run_sync(ask, {"cmd": "format-disk"})
    assert answer["ok"] is False and "unknown command 'format-disk'" in str(answer["error"])
    answer = await trio.to_thread.run_sync(ask, {"cmd": "x", "pad": "y" * MAX_REQUEST})
    assert answer == {"ok": False, "error": f"the request is over {MAX_REQUEST} bytes"}
    # the server's own bound: it reads MAX_REQUEST bytes, answers and closes (the
    # unread rest makes the kernel reset the connection, which may drop the answer)
    raw = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await raw.connect(path)
    with raw:
        await raw.send(b"{" + b" " * (2 * MAX_REQUEST))
        reply = b""
        with trio.fail_after(10):
            try:
                while chunk := await raw.recv(4096):
                    reply += chunk
            except ConnectionResetError:
                pass
    refusal = {"ok": False, "error": f"the request must be one line of at most {MAX_REQUEST} bytes"}
    assert reply in (b"", json.dumps(refusal).encode() + b"\n")
    # not JSON
    raw = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await raw.connect(path)
    with raw:
        await raw.send(b"disk add\n")
        with trio.fail_after(10):
            reply = await raw.recv(4096)
    assert b"not one JSON object" in reply

    other = str(tmp_path / "other.sock")
    await nursery.start(
        lambda **kw: control.serve_control(other, set(), allowed_uids={os.getuid() + 1}, **kw)
    )
    answer = await trio.to_thread.run_sync(
        lambda: control.request(other, {"cmd": "disk-remove", "vm": "x", "lun": 0})
    )
    assert answer["ok"] is False and "closed without an answer" in str(answer["error"])
    nursery.cancel_scope.cancel()


async def test_vm_with_no_list_is_refused_at_attach(tmp_path: Path) -> None:
    """Only [vm.a]: a VM named b is told why (error resource) and the service goes on."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('[vm.a]\n[[vm.a.device]]\ntype = "echo"\n')
    sock = str(tmp_path / "s.sock")
    with running(["serve", "--listen", sock, "--config", str(cfg)], tmp_path / "s.log") as serve:
        serve.wait_for("listening on")
        with pytest.raises(Exception) as info:
            async with attached_vm(sock, vm_id="b"):
                pass
        # The refusal answers its hello; a VMM already sending its RAM may meet the
        # close first (the attach handshake is symmetric), so either is right here.
        why = repr(info.value)
        assert "vmbusd ended the session: resource: no devices:" in why or (
            "ConnectionClosed" in why
        ), why
        async with attached_vm(sock, vm_id="a") as a:
            assert [o.if_type for o in a.offers.values()] == [EchoDevice.if_type]
        assert serve.stop() == 0
    log = serve.text()
    assert "b: no devices for this VM: " in log
    assert "no [vm.b] section and no default [[device]] list (VMs configured: a)" in log


def _wait_for(path: Path, needle: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        if needle in text:
            return text
        assert time.monotonic() < deadline and proc.poll() is None, (needle, text[-3000:])
        time.sleep(0.1)


@pytest.mark.kvm_linux
@pytest.mark.timeout(400)
@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="/dev/kvm is absent")
def test_real_linux_sees_a_lun_come_and_go(tmp_path: Path) -> None:
    """Linux 6.1's hv_storvsc on KVM: `vmbusd ctl disk add` makes the new LUN a
    SCSI disk in the guest (ENUMERATE_BUS -> storvsc_host_scan), `disk remove`
    makes the guest delete it (its TEST UNIT READY gets INVALID_LUN)."""
    from vmbus.kvm import kernel as kbuild

    vmlinux = kbuild.build(lambda line: print(f"guest-kernel: {line}", file=sys.stderr)).vmlinux
    cfg = tmp_path / "vm.toml"
    cfg.write_text('[[device]]\ntype = "storvsc"\n[[device.lun]]\nsize = "16M"\n')
    sock, ctl_sock = str(tmp_path / "s.sock"), str(tmp_path / "ctl.sock")
    args = ["-v", "serve", "--listen", sock, "--config", str(cfg), "--control", ctl_sock]
    console = tmp_path / "console.log"
    with running(args, tmp_path / "serve.log") as serve:
        serve.wait_for("control on")
        kvm_args = [VMBUSD, "kvm", "--connect", sock, "--kernel", str(vmlinux), "--cpus", "2"]
        kvm_args += ["--console", str(console), "--timeout", "300", "--until", "never-printed"]
        kvm_args += ["--append", "root=/dev/sdz rootwait"]  # waits for it: no panic
        with open(tmp_path / "kvm.log", "wb") as f:
            kvm = subprocess.Popen(kvm_args, stdout=f, stderr=f, stdin=subprocess.DEVNULL)
        try:
            _wait_for(console, "sd 0:0:0:0: [sda] Attached SCSI disk", kvm, 200)
            vm = f"kvm-{kvm.pid}"
            img = tmp_path / "hot.img"
            add = ["ctl", ctl_sock, "disk", "add", "--vm", vm, "--lun", "5"]
            r = vmbusd(*add, "--backend", "file", "--path", str(img), "--create-size", "8M")
            assert r.returncode == 0, r.stderr
            out = _wait_for(console, "sd 0:0:0:5: [sdb] Attached SCSI disk", kvm, 60)
            assert "[sdb] 16384 512-byte logical blocks: (8.39 MB/8.00 MiB)" in out
            r = vmbusd("ctl", ctl_sock, "disk", "remove", "--vm", vm, "--lun", "5")
            assert r.returncode == 0, r.stderr
            # sd_remove's cache flush: the LUN is being deleted, and the host
            # answers its SYNCHRONIZE CACHE with SRB_STATUS_INVALID_LUN (0x20).
            _wait_for(console, "sd 0:0:0:5: [sdb] Synchronizing SCSI cache", kvm, 60)
            out = _wait_for(console, "[sdb] Synchronize Cache(10) failed", kvm, 30)
            assert "cmd 0x35 status: scsi 0x0 srb 0x20" in out
            assert "sd 0:0:0:0: [sda]" in out and "sda] Synchronizing" not in out
        finally:
            kvm.terminate()
            kvm.wait(30)
        assert serve.stop() == 0
    served = serve.text()
    assert "channel reset" not in served, served[-3000:]


def test_attach_picks_the_vms_list(tmp_path: Path) -> None:
    """`vmbusd attach --config`: the VMM's VM ("sim") gets its [vm.sim] list."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[[device]]\ntype = "echo"\n[vm.sim]\n[[vm.sim.device]]\ntype = "storvsc"\n'
        '[[vm.sim.device.lun]]\nsize = "1M"\n'
    )
    path = str(tmp_path / "vm.sock")
    out = tmp_path / "vm.json"
    args = ["vm", "--listen", path, "--packets", "100", "--json", str(out)]
    with running(args, tmp_path / "vm.log") as vm:
        deadline = time.monotonic() + 20
        while not os.path.exists(path):
            assert time.monotonic() < deadline and vm.proc.poll() is None, vm.text()
            time.sleep(0.02)
        r = vmbusd("attach", path, "--config", str(cfg))
        assert r.returncode == 0, r.stderr
        assert vm.proc.wait(30) == 0, vm.text()
    summary = json.loads(out.read_text())
    assert [ch["driver"] for ch in summary["channels"]] == ["storvsc"]
    assert summary["channels"][0]["disks"] == {
        "0": {"size": 1 << 20, "block_size": 512, "read_only": False}
    }
