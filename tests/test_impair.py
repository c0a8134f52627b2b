"""The `impair` network backend around a recording inner backend: each impairment with
exact, seeded counts, per direction; delay, jitter, reordering and link flaps on trio's
mock clock; one-line config errors."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from conftest import require_tool
from prometheus_client.parser import text_string_to_metric_families

from devices.netvsc import rndis as rn
from devices.netvsc.backends.base import BackendError, Deliver, Frame, NetBackend, NicInfo
from devices.netvsc.backends.impair import ImpairBackend
from devices.netvsc.backends.loopback import LoopbackBackend
from devices.netvsc.vsc import NetvscGuest
from devices.netvsc.vsp import NetvscDevice
from vmbus.config import load_devices
from vmbus.guest.vm import SimulatedVm

VMBUSD = [sys.executable, "-m", "vmbus.cli"]
NIC = NicInfo(b"\x00\x15\x5d\x00\x00\x01", 1500, 1)


class Recorder(NetBackend):
    """An inner backend that keeps what it is given and sends what the test asks."""

    name = "recorder"

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[float, bytes]] = []
        self.deliver: Deliver | None = None

    async def run(
        self,
        nic: NicInfo,
        deliver: Deliver,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self.deliver = deliver
        task_status.started()
        await trio.sleep_forever()

    def transmit(self, queue: int, frames: list[Frame]) -> None:
        self.sent += [(trio.current_time(), f.data) for f in frames]


def frame(i: int) -> Frame:
    return Frame(b"\xff" * 12 + b"\x08\x00" + i.to_bytes(4, "big") + bytes(60))


def idx(data: bytes) -> int:
    return int.from_bytes(data[14:18], "big")


class Guest:
    """What the VSP would be: frames delivered to the guest, with their times."""

    def __init__(self) -> None:
        self.got: list[tuple[float, bytes]] = []

    def __call__(self, frames: list[Frame]) -> None:
        self.got += [(trio.current_time(), f.data) for f in frames]


async def started(nursery: trio.Nursery, **keys: object) -> tuple[ImpairBackend, Recorder, Guest]:
    inner = Recorder()
    imp = ImpairBackend(inner=inner, **keys)  # type: ignore[arg-type]
    guest = Guest()
    await nursery.start(imp.run, NIC, guest)
    return imp, inner, guest


def draws(seed: int, direction: str, kind: str, p: float, n: int) -> list[int]:
    rng = random.Random(f"{seed}/{direction}/{kind}")
    return [i for i in range(n) if rng.random() < p]


async def test_loss_is_seeded_exact_and_per_direction() -> None:
    n = 1000
    async with trio.open_nursery() as nursery:
        imp, inner, guest = await started(nursery, seed=5, loss=0.02, to_guest={"loss": 0.1})
        imp.transmit(0, [frame(i) for i in range(n)])
        assert inner.deliver is not None
        inner.deliver([frame(i) for i in range(n)])
        await trio.testing.wait_all_tasks_blocked()
        lost_out = draws(5, "from_guest", "lost", 0.02, n)
        lost_in = draws(5, "to_guest", "lost", 0.1, n)
        assert [idx(d) for _, d in inner.sent] == [i for i in range(n) if i not in lost_out]
        assert [idx(d) for _, d in guest.got] == [i for i in range(n) if i not in lost_in]
        assert imp.counters[("from_guest", "lost")] == len(lost_out) > 0
        assert imp.counters[("to_guest", "lost")] == len(lost_in) > len(lost_out)
        assert imp.tx_frames == n and imp.rx_frames == n
        nursery.cancel_scope.cancel()


async def test_duplicate_and_corrupt_exact() -> None:
    n = 500
    async with trio.open_nursery() as nursery:
        imp, inner, _ = await started(nursery, seed=1, duplicate=0.05, corrupt=0.03)
        imp.transmit(0, [frame(i) for i in range(n)])
        dup = draws(1, "from_guest", "duplicated", 0.05, n)
        bad = draws(1, "from_guest", "corrupted", 0.03, n)
        assert len(inner.sent) == n + len(dup)
        assert imp.counters[("from_guest", "duplicated")] == len(dup) > 0
        assert imp.counters[("from_guest", "corrupted")] == len(bad) > 0
        copies = [(i, 2 if i in dup else 1) for i in range(n)]
        sent = iter(d for _, d in inner.sent)
        for i, k in copies:
            for _ in range(k):
                got, want = next(sent), frame(i).data
                bits = sum(bin(x ^ y).count("1") for x, y in zip(got, want, strict=True))
                assert bits == (1 if i in bad else 0), i
                assert got[:14] == want[:14]  # never in the Ethernet header
        nursery.cancel_scope.cancel()


async def test_delay_with_jitter_keeps_order(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        imp, inner, _ = await started(nursery, from_guest={"delay_ms": 20, "jitter_ms": 5})
        t0 = trio.current_time()
        for i in range(50):
            imp.transmit(0, [frame(i)])
            await trio.sleep(0.001)
        await trio.sleep(1)
        assert [idx(d) for _, d in inner.sent] == list(range(50))
        rng = random.Random("0/from_guest/jitter")
        for i, (t, _) in enumerate(inner.sent):
            due = t0 + i * 0.001 + (20 + rng.uniform(-5, 5)) / 1000
            assert t >= due - 1e-9
        assert imp.counters[("from_guest", "delayed")] == 50
        assert imp.counters[("to_guest", "delayed")] == 0
        nursery.cancel_scope.cancel()


async def test_reorder_holds_frames_back(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        imp, inner, _ = await started(nursery, seed=2, reorder=0.1, reorder_gap_ms=3)
        for i in range(200):
            imp.transmit(0, [frame(i)])
            await trio.sleep(0.001)
        await trio.sleep(1)
        order = [idx(d) for _, d in inner.sent]
        held = draws(2, "from_guest", "reordered", 0.1, 200)
        assert sorted(order) == list(range(200))
        assert [i for i in order if i not in held] == [i for i in range(200) if i not in held]
        for h in held:  # overtaken by the frames sent within the gap
            if h + 2 < 200 and h + 1 not in held and h + 2 not in held:
                assert order.index(h) > order.index(h + 2)
        assert imp.counters[("from_guest", "reordered")] == len(held) > 0
        nursery.cancel_scope.cancel()


async def test_link_flaps_drop_both_ways_and_tell_the_listener(
    autojump_clock: trio.testing.MockClock,
) -> None:
    told: list[tuple[float, bool]] = []
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        imp, inner, guest = await started(nursery, flap_up_s=1.0, flap_down_s=0.5)
        imp.link_listener = lambda up: told.append((trio.current_time() - t0, up))
        await trio.sleep(1.2)
        assert not imp.link_up
        imp.transmit(0, [frame(1), frame(2)])
        assert inner.deliver is not None
        inner.deliver([frame(3)])
        await trio.sleep(0.5)
        assert imp.link_up
        imp.transmit(0, [frame(4)])
        assert imp.counters[("from_guest", "link_down")] == 2
        assert imp.counters[("to_guest", "link_down")] == 1
        assert [idx(d) for _, d in inner.sent] == [4] and guest.got == []
        assert [(round(t, 6), up) for t, up in told] == [(1.0, False), (1.5, True)]
        imp.configure(flap_up_s=0)  # flapping off: the link stays up
        await trio.sleep(10)
        assert imp.link_up and imp.flaps == 1
        nursery.cancel_scope.cancel()


async def test_runtime_changes_per_direction() -> None:
    async with trio.open_nursery() as nursery:
        imp, inner, guest = await started(nursery)
        assert imp.configure(**{"from_guest.loss": 1.0}) == ["from_guest.loss=1.0"]
        imp.transmit(0, [frame(1)])
        assert inner.deliver is not None
        inner.deliver([frame(2)])
        assert inner.sent == [] and len(guest.got) == 1
        with pytest.raises(BackendError, match=r"sideways\.loss"):
            imp.configure(loss=0.0, **{"sideways.loss": 0.5})
        assert imp.settings("from_guest").loss == 1.0  # nothing applied
        imp.configure(loss=0.0)
        imp.transmit(0, [frame(3)])
        assert [idx(d) for _, d in inner.sent] == [3]
        nursery.cancel_scope.cancel()


async def test_wraps_loopback_by_default() -> None:
    async with trio.open_nursery() as nursery:
        imp = ImpairBackend()
        assert isinstance(imp.inner, LoopbackBackend)
        guest = Guest()
        await nursery.start(imp.run, NIC, guest)
        imp.transmit(0, [frame(i) for i in range(5)])
        assert [idx(d) for _, d in guest.got] == list(range(5))
        nursery.cancel_scope.cancel()


def test_config_errors_are_one_line_naming_the_key(tmp_path: Path) -> None:
    base = '[[device]]\ntype = "netvsc"\nbackend = "impair"\n'
    good = tmp_path / "good.toml"
    good.write_text(base + 'inner = { backend = "loopback" }\nloss = 0.02\nseed = 9\n')
    (dev,) = load_devices(str(good))
    imp = dev.backend  # type: ignore[attr-defined]
    assert isinstance(imp, ImpairBackend) and imp.settings("to_guest").loss == 0.02
    bad = [
        ("los = 0.1", "'los'"),
        ("loss = 2", "loss must be a fraction 0..1"),
        ("delay_ms = -1", "delay_ms must be a number >= 0"),
        ("to_guest = { jitter = 1 }", "to_guest.jitter"),
        ('inner = { backend = "nosuch" }', "inner"),
        ('inner = { backend = "loopback", ifname = "x" }', "ifname"),
        ('inner = { backend = "impair" }', "impair inside an impair"),
        ('seed = "x"', "seed must be an integer"),
    ]
    for line, needle in bad:
        cfg = tmp_path / "bad.toml"
        cfg.write_text(base + line + "\n")
        with pytest.raises(Exception) as exc:
            load_devices(str(cfg))
        msg = str(exc.value)
        assert needle in msg and "\n" not in msg, (line, msg)


# ---- TCP through an impaired wire: real programs, the simulated VM's NIC ----------
#
#   namespace g: vg0 10.78.0.2 (a TAP)  -- vmbusd vm --nic-tap vg0 --netns g
#        == VMBus rings ==  vmbusd serve: netvsc, impair backend around a tap backend
#   namespace h: br0 10.78.0.1 `- vh0 (the TAP vmbusd creates)

G_ADDR, H_ADDR = "10.78.0.2", "10.78.0.1"
LOSS = 0.02


def _run(*cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _must(*cmd: str) -> None:
    r = _run(*cmd)
    assert r.returncode == 0, f"{' '.join(cmd)} -> {r.returncode}: {r.stderr.strip()}"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _wait_for(proc: subprocess.Popen[bytes], log: Path, line: str) -> None:
    deadline = time.monotonic() + 30
    while line not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{' '.join(map(str, proc.args))}: no {line!r}:\n{log.read_text()}")
        time.sleep(0.05)


def _nic_faults(stats_sock: Path) -> dict[tuple[str, str], float]:
    r = _run(*VMBUSD, "stats", str(stats_sock), "--prometheus")
    out = {}
    for fam in text_string_to_metric_families(r.stdout):
        if fam.name == "vmbusd_nic_faults":
            for s in fam.samples:
                out[(s.labels["direction"], s.labels["kind"])] = s.value
    return out


def _iperf3(g: str, h: str, *args: str) -> dict[str, Any]:
    server = subprocess.Popen(
        ["ip", "netns", "exec", h, "iperf3", "-s", "-1", "-B", H_ADDR],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        r = _run("ip", "netns", "exec", g, "iperf3", "-c", H_ADDR, "-t", "3", "-J", *args)
        result: dict[str, Any] = json.loads(r.stdout)
    finally:
        _stop(server)
    assert "error" not in result, result["error"]
    return result


@pytest.mark.timeout(180)
def test_iperf3_tcp_recovers_from_injected_loss(tmp_path: Path) -> None:
    """2% loss both ways (seeded): iperf3 TCP completes each way, the sender
    retransmits, and the counters show the drops; a runtime change to 100% loss
    stops ping, and back to 0 it flows again."""
    require_tool("ip", "iproute2")
    require_tool("iperf3", "iperf3")
    require_tool("ping", "iputils-ping")
    if os.geteuid() != 0:
        pytest.fail("the TAP tests need root (network namespaces, /dev/net/tun)", pytrace=False)
    tag = uuid.uuid4().hex[:6]
    g, h = f"vmbi-g-{tag}", f"vmbi-h-{tag}"
    procs: list[subprocess.Popen[bytes]] = []
    made: list[str] = []
    try:
        for ns in (g, h):
            _must("ip", "netns", "add", ns)
            made.append(ns)
            _must("ip", "-n", ns, "link", "set", "lo", "up")
        _must("ip", "-n", h, "link", "add", "br0", "type", "bridge")
        _must("ip", "-n", h, "addr", "add", f"{H_ADDR}/24", "dev", "br0")
        _must("ip", "-n", h, "link", "set", "br0", "up")
        _must("ip", "-n", g, "tuntap", "add", "vg0", "mode", "tap", "multi_queue", "vnet_hdr")
        _must("ip", "-n", g, "addr", "add", f"{G_ADDR}/24", "dev", "vg0")
        config = tmp_path / "nic.toml"
        config.write_text(
            '[[device]]\ntype = "netvsc"\nmac = "00:15:5d:00:00:07"\nbackend = "impair"\n'
            f"seed = 3\nloss = {LOSS}\n"
            f'inner = {{ backend = "tap", ifname = "vh0", netns = "{h}", bridge = "br0" }}\n'
        )
        sock, ctl, stats = tmp_path / "s.sock", tmp_path / "ctl.sock", tmp_path / "st.sock"
        serve_log, vm_log = tmp_path / "serve.log", tmp_path / "vm.log"
        with serve_log.open("wb") as out:
            procs.append(
                subprocess.Popen(
                    [*VMBUSD, "serve", "-v", "--listen", str(sock), "--config", str(config),
                     "--control", str(ctl), "--stats", str(stats)],
                    stdout=out, stderr=subprocess.STDOUT,
                )
            )  # fmt: skip
        _wait_for(procs[0], serve_log, "listening on")
        with vm_log.open("wb") as out:
            procs.append(
                subprocess.Popen(
                    [*VMBUSD, "vm", "--connect", str(sock), "--nic-tap", "vg0", "--netns", g],
                    stdout=out, stderr=subprocess.STDOUT,
                )
            )  # fmt: skip
        _wait_for(procs[1], vm_log, "bridged to TAP vg0")

        up = _iperf3(g, h)
        down = _iperf3(g, h, "-R")
        for result in (up, down):
            assert result["end"]["sum_received"]["bytes"] > 0
        assert up["end"]["sum_sent"]["retransmits"] > 0  # the guest's TCP saw the loss
        faults = _nic_faults(stats)
        assert faults[("from_guest", "lost")] > 0 and faults[("to_guest", "lost")] > 0
        assert faults[("from_guest", "corrupted")] == 0 and faults[("link", "flaps")] == 0
        print(
            f"\niperf3 TCP with {LOSS:.0%} loss: guest->host "
            f"{up['end']['sum_received']['bits_per_second'] / 1e6:.1f} Mbit/s "
            f"({up['end']['sum_sent']['retransmits']} retransmits), host->guest "
            f"{down['end']['sum_received']['bits_per_second'] / 1e6:.1f} Mbit/s; "
            f"dropped {faults[('from_guest', 'lost')]:.0f} out, "
            f"{faults[('to_guest', 'lost')]:.0f} in"
        )

        ping = ("ip", "netns", "exec", g, "ping", "-c", "3", "-i", "0.2", "-W", "1", H_ADDR)
        vm_name = "sim"  # vmbusd vm's default --name
        r = _run(*VMBUSD, "ctl", str(ctl), "nic", "impair", "--vm", vm_name, "from_guest.loss=1.0")
        assert r.returncode == 0 and "from_guest.loss=1.0" in r.stdout, r.stderr
        before = _nic_faults(stats)[("from_guest", "lost")]
        assert " 0% packet loss" not in _run(*ping).stdout
        assert _nic_faults(stats)[("from_guest", "lost")] >= before + 3
        r = _run(*VMBUSD, "ctl", str(ctl), "nic", "impair", "--vm", vm_name, "loss=0")
        assert r.returncode == 0, r.stderr
        assert " 0% packet loss" in _run(*ping).stdout
        r = _run(*VMBUSD, "ctl", str(ctl), "nic", "impair", "--vm", vm_name, "los=1")
        assert r.returncode == 2 and "unknown setting 'los'" in r.stderr, r.stderr
        assert len(r.stderr.splitlines()) == 1
    finally:
        for proc in reversed(procs):
            _stop(proc)
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


class ImpairNic(NetvscDevice):
    """A NIC on impair(loopback) the test can reach (the last one built)."""

    last: ImpairNic | None = None

    def __init__(self) -> None:
        super().__init__(backend=ImpairBackend(inner=LoopbackBackend()))
        ImpairNic.last = self


@pytest.mark.devices.with_args(ImpairNic)
async def test_link_flaps_reach_the_guest(local_vm: SimulatedVm, open_channel: Any) -> None:
    """A flap is not only dropped frames: the VSP listens to the backend's link, so the
    guest gets RNDIS MEDIA_DISCONNECT, then MEDIA_CONNECT, as a real cable pull."""
    gch = await open_channel(local_vm, ImpairNic)
    nic = NetvscGuest(local_vm, gch)
    dev = ImpairNic.last
    assert dev is not None and isinstance(dev.backend, ImpairBackend)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(nic.receive_loop)
        with trio.fail_after(20):
            await nic.connect()
            await nic.device_add()
            dev.backend.configure(flap_up_s=0.3, flap_down_s=0.3)
            while len(nic.indications) < 2:
                await trio.sleep(0.01)
            dev.backend.configure(flap_up_s=0)
        assert nic.indications[:2] == [rn.Status.MEDIA_DISCONNECT, rn.Status.MEDIA_CONNECT]
        nursery.cancel_scope.cancel()
