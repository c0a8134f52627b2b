"""The pcap backend: tshark reads what it writes. In-process first (a loopback
wrapped: directions, VLAN tags inline, a second bring-up appended as a new section,
the config's one-line errors), then end to end as root: a simulated VM's NIC on a
pcap-wrapped tap backend, ping through it, and tshark counts exactly the frames
the backend's counters say, each way, with the echo requests and replies.

    namespace g: vg0 10.79.0.2 -- vmbusd vm -- VMBus -- vmbusd serve: netvsc,
                                                        pcap(tap vh0) -> br0 10.79.0.1 (namespace h)
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from conftest import require_tool

from devices.netvsc.backends.base import Frame, NicInfo
from devices.netvsc.backends.loopback import LoopbackBackend
from devices.netvsc.backends.pcap import PcapBackend
from devices.netvsc.backends.tap import TapBackend
from devices.netvsc.rndis import Vlan
from devices.netvsc.vsp import NetvscDevice
from vmbus.config import ConfigError, devices_from_config

VMBUSD = [sys.executable, "-m", "vmbus.cli"]
START_TIMEOUT_S = 30
NIC_MAC = "00:15:5d:00:00:07"
G_ADDR, H_ADDR = "10.79.0.2", "10.79.0.1"
PINGS = 5
OUTBOUND, INBOUND = "2", "1"  # epb_flags direction as tshark shows it (0x00000002 ...)


def _tshark(path: Path, *fields: str, display: str | None = None) -> list[list[str]]:
    """One row per frame tshark reads from the file, the fields asked for."""
    tshark = require_tool("tshark", "tshark")
    cmd = [tshark, "-r", str(path), "-T", "fields", "-E", "separator=/t"]
    if display:
        cmd += ["-Y", display]
    for f in fields:
        cmd += ["-e", f]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [line.split("\t") for line in r.stdout.splitlines()]


def _direction(text: str) -> str:
    return str(int(text, 16)) if text else ""


def _eth(dst: str, src: str, n: int) -> bytes:
    return (
        bytes.fromhex(dst.replace(":", ""))
        + bytes.fromhex(src.replace(":", ""))
        + b"\x88\xb5"
        + n.to_bytes(4, "big").ljust(46, b".")
    )


async def test_pcapng_both_directions_vlan_and_sections(tmp_path: Path) -> None:
    """A loopback wrapped: each frame the guest sends is written outbound, its echo
    inbound, a VLAN tag inline; a second bring-up appends a section, the first kept."""
    path = tmp_path / "nic.pcapng"
    backend = PcapBackend(path=str(path))
    assert isinstance(backend.inner, LoopbackBackend)
    nic = NicInfo(bytes.fromhex("00155d000007"), 1500, 1)
    got: list[Frame] = []
    for run in range(2):
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.run, nic, got.extend)
            backend.transmit(0, [Frame(_eth("ff:ff:ff:ff:ff:ff", NIC_MAC, run))])
            backend.transmit(0, [Frame(_eth("02:00:00:00:00:01", NIC_MAC, 9), Vlan(42, 5, False))])
            nursery.cancel_scope.cancel()
    assert len(got) == 4 and (backend.tx_frames, backend.rx_frames) == (4, 4)
    rows = _tshark(
        path,
        "frame.packet_flags_direction",
        "vlan.id",
        "vlan.priority",
        "eth.dst",
        "frame.len",
        "frame.interface_name",
        "frame.time_epoch",
    )
    seen = [(_direction(r[0]), r[1], r[2], r[3], r[4]) for r in rows]
    one = [
        (OUTBOUND, "", "", "ff:ff:ff:ff:ff:ff", "60"),
        (INBOUND, "", "", "ff:ff:ff:ff:ff:ff", "60"),
        (OUTBOUND, "42", "5", "02:00:00:00:00:01", "64"),
        (INBOUND, "42", "5", "02:00:00:00:00:01", "64"),
    ]
    assert seen == one + one
    assert {r[5] for r in rows} == {f"netvsc {NIC_MAC} (loopback)"}
    times = [float(r[6]) for r in rows]
    assert times == sorted(times) and abs(times[0] - time.time()) < 60


def _nic(**options: object) -> NetvscDevice:
    (dev,) = devices_from_config({"device": [{"type": "netvsc", **options}]}, "nic.toml")
    assert isinstance(dev, NetvscDevice)
    return dev


def test_config_shape_inner_is_a_table(tmp_path: Path) -> None:
    """The TOML shape: `inner` an inline table naming the wrapped backend and its keys."""
    cfg = tomllib.loads(
        f'[[device]]\ntype = "netvsc"\nbackend = "pcap"\npath = "{tmp_path}/c.pcapng"\n'
        'inner = { backend = "tap", ifname = "vh3", bridge = "br0" }\n'
    )
    (dev,) = devices_from_config(cfg, "nic.toml")
    assert isinstance(dev, NetvscDevice) and isinstance(dev.backend, PcapBackend)
    assert isinstance(dev.backend.inner, TapBackend)
    assert (dev.backend.inner.ifname, dev.backend.inner.bridge) == ("vh3", "br0")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "missing 1 required keyword-only argument: 'path'"),
        ({"path": ""}, "pcap backend: path must be a non-empty string"),
        (
            {"path": "/nonexistent-dir/x.pcapng"},
            "directory '/nonexistent-dir' of path '/nonexistent-dir/x.pcapng' does not exist",
        ),
        ({"path": "/tmp"}, "pcap backend: path '/tmp' is a directory"),
        ({"path": "/tmp/x.pcapng", "inner": "tap"}, "pcap backend: inner must be a table like"),
        ({"path": "/tmp/x.pcapng", "inner": {"ifname": "v"}}, 'inner needs backend = "NAME"'),
        (
            {"path": "/tmp/x.pcapng", "inner": {"backend": "tapp"}},
            "pcap backend: inner: unknown net backend 'tapp'",
        ),
        (
            {"path": "/tmp/x.pcapng", "inner": {"backend": "tap"}},
            "pcap backend: inner: tap backend: ",
        ),
        (
            {"path": "/tmp/x.pcapng", "inner": {"backend": "loopback", "x": 1}},
            "pcap backend: inner: loopback backend: unknown option 'x'",
        ),
        ({"path": "/tmp/x.pcapng", "ifname": "v"}, "pcap backend: unknown option 'ifname'"),
    ],
)
def test_pcap_config_errors_are_one_line(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _nic(backend="pcap", **options)
    text = str(info.value)
    assert text.startswith("nic.toml: device #1 (netvsc): "), text
    assert message in text and "\n" not in text, text


# -- end to end (root): ping through a pcap-wrapped tap --------------------------


def _run(*cmd: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {r.returncode}: {r.stderr.strip()}")
    return r


def _ipv6_off(ns: str) -> None:
    """No IPv6 in namespace ns (its links made after this), so ARP and IPv4 are all
    its interfaces send (no procps needed: /proc/sys as the namespace sees it)."""
    off = "for k in all default; do echo 1 > /proc/sys/net/ipv6/conf/$k/disable_ipv6; done"
    _run("ip", "netns", "exec", ns, "sh", "-c", off)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _wait_for(proc: subprocess.Popen[bytes], log: Path, line: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while line not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            why = f"exited {proc.returncode}" if proc.poll() is not None else "timed out"
            pytest.fail(f"{' '.join(map(str, proc.args))}: {why}:\n{log.read_text()}")
        time.sleep(0.05)


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str]]:
    """g and h, IPv6 off (so ARP and the pings are all there is), removed afterwards."""
    require_tool("ip", "iproute2")
    if os.geteuid() != 0:
        pytest.fail("the pcap end-to-end test needs root (namespaces, TAPs)", pytrace=False)
    tag = uuid.uuid4().hex[:6]
    g, h = f"vmbp-g-{tag}", f"vmbp-h-{tag}"
    made = []
    try:
        for ns in (g, h):
            _run("ip", "netns", "add", ns)
            made.append(ns)
            _ipv6_off(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        yield g, h
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_tshark_counts_what_the_backend_counted(
    tmp_path: Path, namespaces: tuple[str, str]
) -> None:
    """ping through vmbusd with the NIC's tap wrapped in pcap; after the service
    stops, tshark's frames each way are exactly the counts the backend logged, and
    the echo requests are outbound, the replies inbound, one each per ping."""
    require_tool("ping", "iputils-ping")
    require_tool("tshark", "tshark")
    g, h = namespaces
    _run("ip", "-n", h, "link", "add", "br0", "type", "bridge")
    _run("ip", "-n", h, "addr", "add", f"{H_ADDR}/24", "dev", "br0")
    _run("ip", "-n", h, "link", "set", "br0", "up")
    _run("ip", "-n", g, "tuntap", "add", "vg0", "mode", "tap", "multi_queue", "vnet_hdr")
    _run("ip", "-n", g, "addr", "add", f"{G_ADDR}/24", "dev", "vg0")
    capture = tmp_path / "nic.pcapng"
    config = tmp_path / "nic.toml"
    config.write_text(
        f'[[device]]\ntype = "netvsc"\nmac = "{NIC_MAC}"\nbackend = "pcap"\npath = "{capture}"\n'
        f'inner = {{ backend = "tap", ifname = "vh0", netns = "{h}", bridge = "br0" }}\n'
    )
    sock, serve_log, vm_log = tmp_path / "s.sock", tmp_path / "serve.log", tmp_path / "vm.log"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with serve_log.open("wb") as out:
            procs.append(
                subprocess.Popen(
                    [*VMBUSD, "serve", "-v", "--listen", str(sock), "--config", str(config)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
        _wait_for(procs[0], serve_log, "listening on")
        with vm_log.open("wb") as out:
            procs.append(
                subprocess.Popen(
                    [*VMBUSD, "vm", "--connect", str(sock), "--nic-tap", "vg0", "--netns", g],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
        _wait_for(procs[1], vm_log, "bridged to TAP vg0")
        ping = ["ip", "netns", "exec", g, "ping", "-c", str(PINGS), "-i", "0.2", "-W", "3", H_ADDR]
        r = subprocess.run(ping, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and f"{PINGS} received" in r.stdout, r.stdout + r.stderr
    finally:
        for proc in reversed(procs):
            _stop(proc)
    log = serve_log.read_text()
    counted = re.search(
        rf"pcap {re.escape(str(capture))}: (\d+) frames from the guest, (\d+) to it", log
    )
    assert counted is not None, log
    sent, received = int(counted.group(1)), int(counted.group(2))
    rows = _tshark(capture, "frame.packet_flags_direction", "icmp.type", "eth.type")
    directions = [_direction(r[0]) for r in rows]
    assert directions.count(OUTBOUND) == sent and directions.count(INBOUND) == received, rows
    assert len(rows) == sent + received
    echo = [(_direction(r[0]), r[1]) for r in rows if r[1]]
    assert echo.count((OUTBOUND, "8")) == PINGS and echo.count((INBOUND, "0")) == PINGS, echo
    assert len(echo) == 2 * PINGS, echo
    arp = [_direction(r[0]) for r in rows if r[2] == "0x0806"]
    assert OUTBOUND in arp and INBOUND in arp, rows  # the guest's request, br0's reply
    print(f"\npcap: {sent} frames from the guest, {received} to it; tshark read {len(rows)}")
