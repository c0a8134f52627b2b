"""Real programs through the VMBus path: two network namespaces the test makes, joined
only through vmbusd.

    namespace g (the guest's)                      namespace h (the host's)
    vg0 10.77.0.2 (a TAP, persistent,              br0 10.77.0.1 (a Linux bridge)
        made here; the VM attaches to it)           `- vh0 (a TAP vmbusd creates)
      |                                                  |
    vmbusd vm --nic-tap vg0 --netns g              vmbusd serve: netvsc, tap backend
      (the simulated guest's netvsc VSC)  == VMBus rings ==  (the VSP)

ping (every size class up to the jumbo MTU, and one that fragments), ARP, IPv6
neighbour discovery, iperf3 TCP and UDP both ways, 802.1Q-tagged frames both ways. Root only;
the namespaces and processes go even when a test fails. Also the config's one-line
errors for a netvsc NIC.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import require_tool

from devices.netvsc.backends.loopback import LoopbackBackend
from devices.netvsc.backends.tap import TapBackend
from devices.netvsc.vsp import NetvscDevice
from vmbus.config import ConfigError, devices_from_config

VMBUSD = [sys.executable, "-m", "vmbus.cli"]
MTU = 9000
G_ADDR, H_ADDR = "10.77.0.2", "10.77.0.1"
G_ADDR6, H_ADDR6 = "fd77::2", "fd77::1"
VLAN = 42
NIC_MAC = "00:15:5d:00:00:05"
START_TIMEOUT_S = 30
UDP_RATE = "100M"  # iperf3 -b: offered, so loss is what the path drops at this rate


def _run(*cmd: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {r.returncode}: {r.stderr.strip()}")
    return r


@dataclass
class Net:
    g: str  # the guest's namespace
    h: str  # the host's namespace
    logs: Path
    sock: Path | None = None

    def in_g(self, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return _run("ip", "netns", "exec", self.g, *cmd, timeout=timeout, check=False)

    def in_h(self, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return _run("ip", "netns", "exec", self.h, *cmd, timeout=timeout, check=False)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
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


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    """Both namespaces, vmbusd serving a netvsc NIC on a tap backend in h, the
    simulated VM bridging it to vg0 in g; everything removed afterwards."""
    require_tool("ip", "iproute2")
    if os.geteuid() != 0:
        pytest.fail("the TAP tests need root (network namespaces, /dev/net/tun)", pytrace=False)
    logs = tmp_path_factory.mktemp("netvsc-tap")
    tag = uuid.uuid4().hex[:6]
    n = Net(f"vmbt-g-{tag}", f"vmbt-h-{tag}", logs)
    procs: list[subprocess.Popen[bytes]] = []
    made: list[str] = []
    try:
        for ns in (n.g, n.h):
            _run("ip", "netns", "add", ns)
            made.append(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        # h: the host network vmbusd's TAP joins
        _run("ip", "-n", n.h, "link", "add", "br0", "mtu", str(MTU), "type", "bridge")
        _run("ip", "-n", n.h, "addr", "add", f"{H_ADDR}/24", "dev", "br0")
        _run("ip", "-n", n.h, "-6", "addr", "add", f"{H_ADDR6}/64", "dev", "br0", "nodad")
        _run("ip", "-n", n.h, "link", "set", "br0", "up")
        # g: the guest's eth0, a persistent multi-queue TAP the VM attaches to by name
        _run("ip", "-n", n.g, "tuntap", "add", "vg0", "mode", "tap", "multi_queue", "vnet_hdr")
        _run("ip", "-n", n.g, "addr", "add", f"{G_ADDR}/24", "dev", "vg0")
        _run("ip", "-n", n.g, "-6", "addr", "add", f"{G_ADDR6}/64", "dev", "vg0", "nodad")
        config = logs / "nic.toml"
        config.write_text(
            f'[[device]]\ntype = "netvsc"\nmac = "{NIC_MAC}"\nmtu = {MTU}\nqueues = 2\n'
            f'backend = "tap"\nifname = "vh0"\nnetns = "{n.h}"\nbridge = "br0"\n'
        )
        sock = n.sock = logs / "vmbusd.sock"
        serve_log, vm_log = logs / "serve.log", logs / "vm.log"
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
                    [*VMBUSD, "vm", "--connect", str(sock), "--nic-tap", "vg0", "--netns", n.g],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
        _wait_for(procs[1], vm_log, "bridged to TAP vg0")
        yield n
    finally:
        for proc in reversed(procs):
            _stop(proc)
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _ping(net: Net, addr: str, *args: str, count: int = 3) -> str:
    require_tool("ping", "iputils-ping")
    r = net.in_g("ping", "-c", str(count), "-i", "0.2", "-W", "3", *args, addr, timeout=60)
    assert r.returncode == 0, f"ping {' '.join(args)} {addr}: {r.stdout}{r.stderr}"
    assert f"{count} received" in r.stdout, r.stdout
    return r.stdout


def test_the_taps_are_where_the_config_says(net: Net) -> None:
    """vh0: made by vmbusd in h, enslaved to br0, up, MTU 9000, one queue per
    channel (queues = 2); vg0 carries the NIC's MAC and MTU."""
    link = net.in_h("ip", "-d", "link", "show", "vh0").stdout
    assert "master br0" in link and f"mtu {MTU}" in link and "UP" in link, link
    assert "multi_queue" in link and "vnet_hdr" in link, link
    queues = net.in_h("ls", "/sys/class/net/vh0/queues").stdout.split()
    assert sorted(queues) == ["rx-0", "rx-1", "tx-0", "tx-1"], queues
    glink = net.in_g("ip", "link", "show", "vg0").stdout
    assert NIC_MAC in glink and f"mtu {MTU}" in glink, glink


@pytest.mark.parametrize("size", [0, 56, 1472, 1500, 4000, MTU - 28])
def test_ping_every_size_class_up_to_the_mtu(net: Net, size: int) -> None:
    """Don't fragment: each echo is one frame through the rings (up to 9014 bytes:
    a GPA-direct send from the guest, one receive section back)."""
    out = _ping(net, H_ADDR, "-s", str(size), "-M", "do")
    assert f"{size + 8} bytes from {H_ADDR}" in out, out


def test_ping_fragmented(net: Net) -> None:
    """20000 bytes of ICMP: three IP fragments each way, reassembled by the peers."""
    out = _ping(net, H_ADDR, "-s", "20000")
    assert f"20008 bytes from {H_ADDR}" in out


def test_jumbo_beyond_the_mtu_is_refused_locally(net: Net) -> None:
    """One byte more than the MTU with don't-fragment: the guest's own stack says so
    (the MTU reached g's interface from the host's RNDIS answer)."""
    r = net.in_g("ping", "-c", "1", "-W", "2", "-s", str(MTU - 27), "-M", "do", H_ADDR)
    assert r.returncode != 0 and f"mtu={MTU}" in (r.stdout + r.stderr).replace(" ", ""), r


def _neighbour(net: Net, addr: str, dev: str) -> str:
    return net.in_g("ip", "neigh", "show", addr, "dev", dev).stdout


def test_arp_resolves_through_vmbus(net: Net) -> None:
    """g's ARP request crosses as a broadcast, br0's reply comes back: g learns br0's
    MAC, and h learns the NIC's."""
    net.in_g("ip", "neigh", "flush", "dev", "vg0")
    _ping(net, H_ADDR, count=1)
    br0_mac = re.search(r"link/ether (\S+)", net.in_h("ip", "link", "show", "br0").stdout)
    assert br0_mac is not None
    assert br0_mac.group(1) in _neighbour(net, H_ADDR, "vg0")
    assert NIC_MAC in net.in_h("ip", "neigh", "show", G_ADDR, "dev", "br0").stdout


def test_ipv6_neighbour_discovery(net: Net) -> None:
    """A solicitation to the solicited-node multicast group, its advertisement back."""
    net.in_g("ip", "-6", "neigh", "flush", "dev", "vg0")
    _ping(net, H_ADDR6, "-6", count=2)
    assert "lladdr" in _neighbour(net, H_ADDR6, "vg0")
    _ping(net, H_ADDR6, "-6", "-s", "1452", "-M", "do", count=1)  # a full 1500-byte packet


RAW = r"""
import socket, struct, sys
mode, dev, vlan, marker = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()
ETH_P_ALL, ETHERTYPE = 3, 0x88B5  # IEEE local experimental
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
s.bind((dev, 0))
if mode == "send":
    tci = vlan | 5 << 13  # priority 5
    s.send(b"\xff" * 6 + bytes.fromhex("020000000001") + struct.pack(">HHH", 0x8100, tci, ETHERTYPE)
           + marker.ljust(46, b"."))
    sys.exit(0)
s.setsockopt(263, 8, 1)  # SOL_PACKET, PACKET_AUXDATA: the tag the kernel took out
s.settimeout(10)
print("ready", flush=True)
while True:
    data, anc, _, _ = s.recvmsg(2048, 256)
    if marker not in data:
        continue
    for level, kind, aux in anc:
        if level == 263 and kind == 8:
            status, _, _, _, _, tci = struct.unpack_from("<IIIHHH", aux)
            print("vlan" if status & 0x10 else "untagged", tci & 0xFFF, tci >> 13, flush=True)
    sys.exit(0)
"""


def _tagged_frame_crosses(net: Net, src: tuple[str, str], dst: tuple[str, str]) -> str:
    """One 802.1Q frame sent raw on src (namespace, device), caught on dst; returns
    what the receiver saw: 'vlan ID PRIORITY' when the tag arrived."""
    marker = uuid.uuid4().hex
    recv = subprocess.Popen(
        ["ip", "netns", "exec", dst[0], sys.executable, "-c", RAW, "recv", dst[1], "0", marker],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert recv.stdout is not None
        assert recv.stdout.readline().strip() == "ready"
        _run(
            "ip",
            "netns",
            "exec",
            src[0],
            sys.executable,
            "-c",
            RAW,
            "send",
            src[1],
            str(VLAN),
            marker,
        )
        out, err = recv.communicate(timeout=15)
        assert recv.returncode == 0, err
        return out.strip()
    finally:
        _stop(recv)  # type: ignore[arg-type]


def test_vlan_tag_crosses_both_ways(net: Net) -> None:
    """802.1Q (this kernel has no VLAN interfaces, so tagged frames are sent raw):
    g's inline tag travels as the VLAN PPI (as hv_netvsc sends it), vmbusd puts it back
    on vh0; h's tag comes to the guest as a PPI and inline again on vg0. The id and
    the priority both survive."""
    assert _tagged_frame_crosses(net, (net.g, "vg0"), (net.h, "vh0")) == f"vlan {VLAN} 5"
    assert _tagged_frame_crosses(net, (net.h, "vh0"), (net.g, "vg0")) == f"vlan {VLAN} 5"


def _iperf(net: Net, *args: str) -> float:
    require_tool("iperf3", "iperf3")
    server = subprocess.Popen(
        ["ip", "netns", "exec", net.h, "iperf3", "-s", "-1", "-B", H_ADDR],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        r = net.in_g("iperf3", "-c", H_ADDR, "-t", "3", "-J", *args, timeout=60)
        result = json.loads(r.stdout)
        assert "error" not in result, result["error"]
        bits = float(result["end"]["sum_received"]["bits_per_second"])
    finally:
        _stop(server)
    assert bits > 0
    return bits


def test_iperf3_tcp_both_ways(net: Net) -> None:
    """Throughput is printed, not asserted (it is what two Python processes manage
    on a shared machine; `vmbusd bench net` measures it against a veth pair)."""
    up = _iperf(net)
    down = _iperf(net, "-R")
    print(
        f"\niperf3 TCP through VMBus: guest->host {up / 1e6:.1f} Mbit/s, "
        f"host->guest {down / 1e6:.1f} Mbit/s"
    )


def _iperf_udp(net: Net, *args: str) -> dict[str, float]:
    """One iperf3 UDP run g -> h (or h -> g with -R) at a fixed offered rate; its
    receiver's figures: bits/s, packets, lost packets and percent, jitter."""
    require_tool("iperf3", "iperf3")
    server = subprocess.Popen(
        ["ip", "netns", "exec", net.h, "iperf3", "-s", "-1", "-B", H_ADDR],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        cmd = ("iperf3", "-c", H_ADDR, "-u", "-b", UDP_RATE, "-l", "1400", "-t", "3", "-J")
        r = net.in_g(*cmd, *args, timeout=60)
        result = json.loads(r.stdout)
        assert "error" not in result, result["error"]
        end = result["end"]
        got = end.get("sum_received") or end["sum"]
        out = {
            "bits": float(got["bits_per_second"]),
            "packets": float(end["sum"]["packets"]),
            "lost": float(end["sum"]["lost_packets"]),
            "lost_percent": float(end["sum"]["lost_percent"]),
            "jitter_ms": float(end["sum"]["jitter_ms"]),
        }
    finally:
        _stop(server)
    return out


def test_iperf3_udp_both_ways(net: Net) -> None:
    """UDP at a fixed offered rate through VMBus each way: the run completes, the
    receiver counted datagrams and reported its loss. Throughput and loss are printed,
    not asserted (a slow simulated guest loses datagrams; that is what UDP reports)."""
    for direction, extra in (("guest->host", ()), ("host->guest", ("-R",))):
        res = _iperf_udp(net, *extra)
        assert res["packets"] > 0, res
        assert 0 <= res["lost"] <= res["packets"] and 0 <= res["lost_percent"] <= 100, res
        assert res["bits"] > 0, res
        print(
            f"\niperf3 UDP through VMBus {direction} at {UDP_RATE}bit/s offered: "
            f"{res['bits'] / 1e6:.1f} Mbit/s received, {res['lost']:.0f}/{res['packets']:.0f} "
            f"lost ({res['lost_percent']:.1f}%), jitter {res['jitter_ms']:.3f} ms"
        )


def test_vm_nic_tap_errors_are_one_line(net: Net) -> None:
    """A namespace that is not there, and --netns alone: one line each, exit 2."""
    assert net.sock is not None
    missing = f"vmbt-none-{uuid.uuid4().hex[:6]}"
    for args, message in (
        (["--nic-tap", "vx0", "--netns", missing], f"network namespace {missing!r} does not exist"),
        (["--netns", net.g], "--netns names the namespace of --nic-tap's TAP"),
    ):
        r = subprocess.run(
            [*VMBUSD, "vm", "--connect", str(net.sock), *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 2 and message in r.stderr, (args, r.returncode, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    # and the bridged VM carries on
    _ping(net, H_ADDR, count=1)


# -- the config's one-line errors (no root needed) --


def _nic(**options: object) -> NetvscDevice:
    (dev,) = devices_from_config({"device": [{"type": "netvsc", **options}]}, "nic.toml")
    assert isinstance(dev, NetvscDevice)
    return dev


def test_config_builds_netvsc_with_its_backend() -> None:
    dev = _nic(mac="00:15:5d:12:34:56", mtu=9000, queues=4)
    assert isinstance(dev.backend, LoopbackBackend)
    assert dev.config.mtu == 9000 and dev.config.max_queues == 4
    assert dev.config.mac == bytes.fromhex("00155d123456")
    tap = _nic(backend="tap", ifname="vh7", netns="elsewhere", bridge="br0").backend
    assert isinstance(tap, TapBackend)
    assert (tap.ifname, tap.netns, tap.bridge) == ("vh7", "elsewhere", "br0")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mac": "00:15:5d:00:01"}, "MAC '00:15:5d:00:01' is not six hex octets"),
        ({"mac": "00:15:5d:00:01:zz"}, "is not six hex octets"),
        ({"mac": "01:00:5e:00:00:01"}, "is a multicast address"),
        ({"mtu": 9001}, "mtu 9001 out of range: 68..9000"),
        ({"mtu": 67}, "mtu 67 out of range"),
        ({"mtu": "1500"}, "option 'mtu' must be an integer"),
        ({"queues": 0}, "queues 0 out of range: 1..64"),
        ({"backend": "tapp"}, "loopback, pcap, switch, tap, or a 'module:Class' path"),
        ({"backend": "tap"}, "missing 1 required keyword-only argument: 'ifname'"),
        ({"backend": "tap", "ifname": "v", "brige": "br0"}, "unknown option 'brige'"),
        ({"backend": "tap", "ifname": "x" * 16}, "longer than 15 bytes"),
        ({"backend": "loopback", "ifname": "v"}, "loopback backend: unknown option 'ifname'"),
    ],
)
def test_config_errors_are_one_line(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _nic(**options)
    text = str(info.value)
    assert text.startswith("nic.toml: device #1 (netvsc): "), text
    assert message in text and "\n" not in text, text


# -- the tap backend's transmit offloads: the kernel segments and checksums --


@pytest.fixture
def offload_ns() -> Iterator[str]:
    """A namespace with br0, and tb: a plain TAP (no vnet header, no offloads) on
    it, so the kernel must finish every frame before tb's reader sees it."""
    require_tool("ip", "iproute2")
    if os.geteuid() != 0:
        pytest.fail("the TAP tests need root (network namespaces, /dev/net/tun)", pytrace=False)
    ns = f"vmbt-o-{uuid.uuid4().hex[:6]}"
    _run("ip", "netns", "add", ns)
    try:
        _run("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", ns, "link", "set", "br0", "up")
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _plain_tap(ns: str, name: str) -> int:
    import fcntl
    import struct as st

    from devices.netvsc.backends import tap as tapmod

    with tapmod.in_netns(ns):
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        flags = tapmod.IFF_TAP | tapmod.IFF_NO_PI
        fcntl.ioctl(fd, tapmod.TUNSETIFF, st.pack("16sH", name.encode(), flags).ljust(40, b"\0"))
    _run("ip", "-n", ns, "link", "set", name, "master", "br0", "up")
    return fd


def _tcp_lso_frame(payload: int) -> bytes:
    """A large TCP send as hv_netvsc hands it over: IPv4 total length and header
    checksum zero, the TCP field the pseudo-header sum over length 0."""
    import struct as st

    from devices.netvsc import offload

    eth = bytes.fromhex("020000000002020000000001") + b"\x08\x00"
    ip = st.pack(
        ">BBHHHBBH4s4s", 0x45, 0, 0, 0x1234, 0x4000, 64, 6, 0, b"\x0a\0\0\x01", b"\x0a\0\0\x02"
    )
    tcp = st.pack(">HHIIBBHHH", 40000, 5201, 1000, 7, 0x50, 0x18, 512, 0, 0)
    frame = bytearray(eth + ip + tcp + bytes(i % 251 for i in range(payload)))
    st.pack_into(">H", frame, 14 + 20 + 16, offload._pseudo(frame, 14, 4, 6, 0))
    return bytes(frame)


async def _read_frames(fd: int, want: int, match: bytes) -> list[bytes]:
    import trio

    got: list[bytes] = []
    with trio.fail_after(10):
        while len(got) < want:
            await trio.lowlevel.wait_readable(fd)
            try:
                data = os.read(fd, 70000)
            except BlockingIOError:
                continue
            if data.startswith(match):
                got.append(data)
    return got


@pytest.mark.parametrize("vlan", [None, 42])
async def test_tap_lso_and_checksum_go_to_the_kernel(offload_ns: str, vlan: int | None) -> None:
    """A 64 KiB LSO send and a checksum-offload UDP frame leave through the vnet
    header; tb receives what offload.py would have made in Python, byte for byte
    (segments with their lengths, IDs, sequence numbers, flags and checksums)."""
    import struct as st

    import trio

    from devices.netvsc import offload
    from devices.netvsc import rndis as rn
    from devices.netvsc.backends.base import NicInfo, partial_frame, vlan_insert

    backend = TapBackend(ifname="ta", netns=offload_ns, bridge="br0")
    tb = _plain_tap(offload_ns, "tb")
    tag = None if vlan is None else rn.Vlan(vlan, 3, False)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.run, NicInfo(b"\x02\0\0\0\0\x09", 1500, 1), lambda f: None)
            frame = _tcp_lso_frame(65000)
            p = rn.TxPacket(0, len(frame), lso=rn.Lso(1448, 34, False), vlan=tag)
            passed = partial_frame(frame, p, backend.offloads)
            assert passed is not None and passed[0].gso is not None
            backend.transmit(0, passed)
            want = offload.segment(frame, rn.Lso(1448, 34, False))
            if tag is not None:
                want = [vlan_insert(w, tag) for w in want]
            got = await _read_frames(tb, len(want), bytes.fromhex("020000000002"))
            assert [len(g) for g in got] == [len(w) for w in want]
            assert got == want
            # UDP with the pseudo-header sum in its field (CHECKSUM_PARTIAL)
            udp = bytearray(_tcp_lso_frame(0)[:34]) + st.pack(">HHHH", 5353, 53, 8 + 300, 0)
            udp += bytes(range(256)) + bytes(44)
            st.pack_into(">BH", udp, 14 + 9, 17, 0)
            st.pack_into(">H", udp, 14 + 2, len(udp) - 14)
            offload.ipv4_header_checksum(udp, 14)
            st.pack_into(">H", udp, 34 + 6, offload._pseudo(udp, 14, 4, 17, 308))
            csum = rn.TxChecksum(True, False, False, True, False, 34)
            passed = partial_frame(
                bytes(udp), rn.TxPacket(0, len(udp), checksum=csum, vlan=tag), backend.offloads
            )
            assert passed is not None and passed[0].csum == (34, 6)
            backend.transmit(0, passed)
            filled = bytearray(udp)
            offload.fill_checksum(filled, csum)
            expect = bytes(filled) if tag is None else vlan_insert(bytes(filled), tag)
            (got_udp,) = await _read_frames(tb, 1, bytes.fromhex("020000000002"))
            assert got_udp == expect and got_udp != (
                udp if tag is None else vlan_insert(bytes(udp), tag)
            )
            assert backend.tx_dropped == 0
            nursery.cancel_scope.cancel()
    finally:
        os.close(tb)


# -- the --nic-tap bridge's offloads: the guest's TAP hands over GSO, sent as LSO --


def _kernel_gso_read(payload: int, *, vlan: int | None = None) -> tuple[bytes, bytes]:
    """What a TAP with TSO4 offered gives its reader for a large TCP send: a
    virtio_net_hdr (NEEDS_CSUM, GSO_TCPV4, mss 1448, TCP header at 34) and the frame
    with its real IPv4 length and header checksum, the TCP field the pseudo-header sum
    over the real length; and the frame as hv_netvsc would hand it to the host."""
    import struct as st

    from devices.netvsc import offload
    from devices.netvsc.backends import tap as tapmod

    linux = _tcp_lso_frame(payload)
    frame = bytearray(linux)
    st.pack_into(">H", frame, 16, len(frame) - 14)
    offload.ipv4_header_checksum(frame, 14)
    st.pack_into(">H", frame, 50, offload._pseudo(frame, 14, 4, 6, len(frame) - 34))
    shift = 0
    if vlan is not None:
        frame[12:12] = st.pack(">HH", 0x8100, vlan | 3 << 13)
        shift = 4
    hdr = st.pack(
        "<BBHHHH",
        tapmod.VIRTIO_NET_HDR_F_NEEDS_CSUM,
        tapmod.VIRTIO_NET_HDR_GSO_TCPV4,
        54 + shift,
        1448,
        34 + shift,
        16,
    )
    return hdr + bytes(frame), linux


@pytest.mark.parametrize("vlan", [None, VLAN])
def test_nic_tap_sends_a_gso_read_as_one_lso_packet(vlan: int | None) -> None:
    """A 64 KiB TCP segment from the guest's TAP becomes one RNDIS PACKET with the
    LSO v2 PPI (mss, TCP offset, IPv4) and the headers as netvsc_xmit leaves them;
    the VSP's parser reads it back as one LSO send the tap backend passes on whole,
    and cut up it is the segments offload.py makes of hv_netvsc's own frame."""
    from devices.netvsc import offload
    from devices.netvsc import rndis as rn
    from devices.netvsc.backends.base import partial_frame
    from devices.netvsc.tap_bridge import tx_frame
    from devices.netvsc.vsc import NicOffloads, rndis_header

    read, linux = _kernel_gso_read(65000, vlan=vlan)
    nic = NicOffloads(True, True, True, True, True, True, rn.LSO_MAX_SIZE)
    tx = tx_frame(read, nic)
    lso = rn.LSO_V2_TYPE << 30 | 34 << 20 | 1448
    want_ppis = ((rn.PpiType.TCP_LARGESEND, lso),)
    if vlan is not None:
        want_ppis = ((rn.PpiType.IEEE_8021Q, rn.Vlan(vlan, 3, False).value()), *want_ppis)
    assert tx.ppis == want_ppis
    assert bytes(tx.data) == linux  # tot_len, IP checksum 0; TCP: pseudo sum, length 0
    msg = rndis_header(len(tx.data), tx.ppis) + bytes(tx.data)
    p = rn.parse_packet(msg, max_frame=1514)
    assert p.lso == rn.Lso(1448, 34, False) and p.data_len == len(linux)
    passed = partial_frame(msg[p.data_start :], p, TapBackend.offloads)
    assert passed is not None and len(passed) == 1 and passed[0].gso is not None
    assert passed[0].gso.mss == 1448
    segs = offload.segment(bytes(tx.data), p.lso)
    assert segs == offload.segment(linux, rn.Lso(1448, 34, False)) and len(segs) == 45
    ok = rn.RXCSUM_IP_SUCCEEDED | rn.RXCSUM_TCP_SUCCEEDED
    assert all(offload.rx_checksum_info(s) == ok for s in segs)


def test_nic_tap_partial_checksums() -> None:
    """A partial UDP checksum goes as the checksum PPI when the NIC negotiated UDP
    checksums, and is finished by the bridge when it did not (skb_checksum_help);
    a GSO read of a kind never offered is refused, not sent."""
    import struct as st

    from devices.netvsc import offload
    from devices.netvsc import rndis as rn
    from devices.netvsc.backends import tap as tapmod
    from devices.netvsc.tap_bridge import Dropped, tx_frame
    from devices.netvsc.vsc import NicOffloads

    udp = bytearray(_tcp_lso_frame(0)[:34]) + st.pack(">HHHH", 5353, 53, 8 + 300, 0)
    udp += bytes(range(256)) + bytes(44)
    st.pack_into(">BH", udp, 14 + 9, 17, 0)
    st.pack_into(">H", udp, 14 + 2, len(udp) - 14)
    offload.ipv4_header_checksum(udp, 14)
    st.pack_into(">H", udp, 34 + 6, offload._pseudo(udp, 14, 4, 17, 308))
    hdr = st.pack("<BBHHHH", tapmod.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 6)
    full = NicOffloads(True, True, True, True, True, True)
    tx = tx_frame(hdr + bytes(udp), full)
    assert tx.ppis == ((rn.PpiType.TCPIP_CHKSUM, rn.TXCSUM_IPV4 | rn.TXCSUM_UDP | 34 << 16),)
    assert bytes(tx.data) == bytes(udp)  # the host fills it
    tx = tx_frame(hdr + bytes(udp), NicOffloads(tcp4_csum=True))
    assert tx.ppis == ()
    ok = rn.RXCSUM_IP_SUCCEEDED | rn.RXCSUM_UDP_SUCCEEDED
    assert offload.rx_checksum_info(bytes(tx.data)) == ok
    ufo = st.pack("<BBHHHH", tapmod.VIRTIO_NET_HDR_F_NEEDS_CSUM, 3, 42, 1400, 34, 6)
    with pytest.raises(Dropped):
        tx_frame(ufo + bytes(udp), full)


def test_nic_tap_offloads_are_negotiated_as_linux_does() -> None:
    """Our VSP's NDIS_OFFLOAD gives what hv_netvsc turns on: the offload parameters
    the real driver sent (tests/data), the TAP offered csum/TSO4/TSO6, GSO capped at
    the host's LSO size; without LSO the TAP is offered checksums only."""
    from devices.netvsc import rndis as rn
    from devices.netvsc.tap_bridge import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, tun_offloads
    from devices.netvsc.vsc import NicOffloads

    caps = rn.RndisDevice(
        rn.NicConfig(mac=bytes.fromhex(NIC_MAC.replace(":", "")))
    ).offload_capabilities(3)
    nic = NicOffloads.from_capabilities(caps)
    assert nic == NicOffloads(True, True, True, True, True, True, rn.LSO_MAX_SIZE)
    real = json.loads(
        (Path(__file__).parent / "data" / "real_linux_6.1_netvsc_init.json").read_text()
    )
    assert nic.parameters().hex() in json.dumps(real)
    assert tun_offloads(nic) == TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
    no_lso = bytearray(caps)
    no_lso[80:108] = bytes(28)
    nic = NicOffloads.from_capabilities(bytes(no_lso))
    assert not (nic.lso4 or nic.lso6) and tun_offloads(nic) == TUN_F_CSUM


def _link_counts(net: Net, ns: str, dev: str) -> tuple[int, int, int, int]:
    """(rx packets, rx bytes, tx packets, tx bytes) of dev in ns."""
    base = f"/sys/class/net/{dev}/statistics/"
    names = ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes")
    run = net.in_g if ns == net.g else net.in_h
    out = run("cat", *(base + n for n in names)).stdout.split()
    return int(out[0]), int(out[1]), int(out[2]), int(out[3])


def test_tcp_from_the_guest_crosses_as_lso_sends(net: Net) -> None:
    """32 MiB of TCP from g (iperf3 -n): the kernel hands vg0's reader segments larger than the
    MTU (TSO was offered), and vh0 takes them still larger than the MTU: the guest
    sent each as one LSO RNDIS packet and the VSP passed it on with a vnet header
    (a frame segmented anywhere on the way would arrive MTU-sized)."""
    require_tool("iperf3", "iperf3")
    g0, h0 = _link_counts(net, net.g, "vg0"), _link_counts(net, net.h, "vh0")
    server = subprocess.Popen(
        ["ip", "netns", "exec", net.h, "iperf3", "-s", "-1", "-B", H_ADDR],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        r = net.in_g("iperf3", "-c", H_ADDR, "-n", "32M", "-J", timeout=120)
        result = json.loads(r.stdout)
        assert "error" not in result, result["error"]
    finally:
        _stop(server)
    g1, h1 = _link_counts(net, net.g, "vg0"), _link_counts(net, net.h, "vh0")
    tx_packets, tx_bytes = g1[2] - g0[2], g1[3] - g0[3]
    rx_packets, rx_bytes = h1[0] - h0[0], h1[1] - h0[1]
    # iperf3 ends when its bytes are written, so the tail may still be on its way
    assert tx_bytes > 16 << 20 and rx_bytes > 16 << 20, (tx_bytes, rx_bytes)
    assert tx_bytes / tx_packets > 2 * MTU, (tx_bytes, tx_packets)
    assert rx_bytes / rx_packets > 2 * MTU, (rx_bytes, rx_packets)
    print(f"\nLSO: vg0 {tx_bytes / tx_packets:.0f}, vh0 {rx_bytes / rx_packets:.0f} bytes a packet")


# -- send_frames, the bridge's transmit: batched as netvsc_send batches --


@pytest.mark.devices.with_args(NetvscDevice)
async def test_send_frames_packs_sections_and_keeps_a_window(
    local_vm: object, open_channel: object
) -> None:
    """64 small frames are 8 NVSP messages (max_pkt_per_msg 8 from INITIALIZE_CMPLT,
    each packet padded to 8 bytes); then 1000 full-size frames in one call, twice
    what the send sections hold, go out as completions free sections (nothing waits
    frame by frame), and an LSO send goes GPA direct: every frame comes back from the
    loopback backend whole, every completion is SUCCESS, every section is free after."""
    import trio

    from devices.netvsc import rndis as rn
    from devices.netvsc.vsc import NetvscGuest, TxFrame

    gch = await open_channel(local_vm, NetvscDevice)  # type: ignore[operator]
    nic = NetvscGuest(local_vm, gch)  # type: ignore[arg-type]
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(nic.receive_loop)
            with trio.fail_after(30):
                await nic.connect()
                await nic.device_add()
                assert (nic.max_pkt, nic.pkt_align) == (rn.MAX_PKT_PER_MSG, 8)
                small = [nic.mac + bytes([i]) * 55 for i in range(64)]  # 61 bytes: padded
                await nic.send_frames([TxFrame(f) for f in small])
                assert (nic.tx_packets, nic.tx_messages) == (64, 8)
                got = [(await nic.frames.receive()).frame for _ in small]
                assert got == small
                big = [nic.mac + i.to_bytes(4, "big") * 377 for i in range(1000)]  # 1514
                assert len(big) // 3 > nic.send_sections  # three a section (6144 bytes)
                received: list[bytes] = []

                async def take() -> None:
                    for _ in big:
                        received.append((await nic.frames.receive()).frame)

                nursery.start_soon(take)
                await nic.send_frames([TxFrame(f) for f in big])
                while len(received) < len(big):
                    await trio.sleep(0.01)
                assert received == big
                payload = bytes(range(256)) * 80
                lso = (1 << 30) | (34 << 20) | 1448
                frame = bytearray(nic.mac + bytes(6) + b"\x08\x00" + bytes(20 + 20) + payload)
                frame[14], frame[23], frame[46] = 0x45, 6, 0x50  # IPv4, TCP, 20-byte header
                direct = nic.tx_direct
                await nic.send_frames([TxFrame(frame, ((rn.PpiType.TCP_LARGESEND, lso),))])
                segs = [(await nic.frames.receive()).frame for _ in range(15)]
                assert b"".join(s[54:] for s in segs) == payload and nic.tx_direct == direct + 1
                while len(nic._free_sections) < nic.send_sections:
                    await trio.sleep(0.01)
                assert nic.tx_failed == 0 and nic.tx_lso == 1
            nursery.cancel_scope.cancel()
    finally:
        nic.release_views()


def test_nic_tap_sends_an_ipv6_gso_read_as_one_lso_packet() -> None:
    """IPv6: the LSO PPI says IPv6, the payload length is zeroed and the TCP field
    holds the pseudo-header sum over length 0 (tcp_v6_gso_csum_prep); the segments
    made of it carry valid TCP checksums."""
    import struct as st

    from devices.netvsc import offload
    from devices.netvsc import rndis as rn
    from devices.netvsc.backends import tap as tapmod
    from devices.netvsc.tap_bridge import tx_frame
    from devices.netvsc.vsc import NicOffloads, rndis_header

    payload = bytes(i % 253 for i in range(30000))
    src, dst = bytes.fromhex("fd77" + "00" * 13 + "02"), bytes.fromhex("fd77" + "00" * 13 + "01")
    tcp = st.pack(">HHIIBBHHH", 40000, 5201, 1000, 7, 0x50, 0x18, 512, 0, 0)
    ip6 = st.pack(">IHBB", 6 << 28, len(tcp) + len(payload), 6, 64) + src + dst
    frame = bytearray(bytes.fromhex("020000000002020000000001") + b"\x86\xdd" + ip6 + tcp + payload)
    st.pack_into(">H", frame, 54 + 16, offload._pseudo(frame, 14, 6, 6, len(tcp) + len(payload)))
    hdr = st.pack(
        "<BBHHHH",
        tapmod.VIRTIO_NET_HDR_F_NEEDS_CSUM,
        tapmod.VIRTIO_NET_HDR_GSO_TCPV6,
        74,
        1428,
        54,
        16,
    )
    tx = tx_frame(hdr + bytes(frame), NicOffloads(True, True, True, True, True, True))
    lso = rn.LSO_IPV6 << 31 | rn.LSO_V2_TYPE << 30 | 54 << 20 | 1428
    assert tx.ppis == ((rn.PpiType.TCP_LARGESEND, lso),)
    data = bytes(tx.data)
    assert data[18:20] == b"\0\0"
    assert st.unpack_from(">H", data, 70)[0] == offload._pseudo(data, 14, 6, 6, 0)
    p = rn.parse_packet(rndis_header(len(data), tx.ppis) + data, max_frame=1514)
    assert p.lso == rn.Lso(1428, 54, True)
    segs = offload.segment(data, p.lso)
    assert len(segs) == 22 and b"".join(s[74:] for s in segs) == payload
    assert all(offload.rx_checksum_info(s) == rn.RXCSUM_TCP_SUCCEEDED for s in segs)
