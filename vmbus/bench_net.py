"""`vmbusd bench net`: netvsc frames through a real channel between two processes, with
baselines measured in the same run.

For each implementation (native, python: `VMBUSD_NATIVE` in both children) the
orchestrator starts two processes, as `bench ring` and `bench disk` do: a vmbusd
host serving two netvsc NICs on the loopback backend (one with 1 queue, one with 4:
vRSS sub-channels), and a simulated VM whose netvsc VSC (devices/netvsc/vsc.py)
brings each NIC up as Linux does (NVSP init, 16 MiB receive and 1 MiB send buffers
as Linux 6.1 allocates them, RNDIS init, vRSS), then sends frames of 64, 512 and
1500 bytes and 64 KiB LSO sends and takes them back. The native pair also runs the
socketpair baseline: the same frames over an AF_UNIX SOCK_SEQPACKET socketpair
between the same two processes, the same window in flight, one datagram per frame
(an LSO send comes back as its MSS-sized pieces). Then iperf3 TCP over a veth pair
between two namespaces the run creates (`veth-iperf3`), and iperf3 TCP between two
namespaces joined only through vmbusd (`vmbus-iperf3`: `vmbusd vm --nic-tap` in one,
the tap backend on a bridge in the other, as docs/netvsc.md describes).

The guest's load generator is batch per call, as Linux's netvsc with xmit_more is:
the frames are written into the send-buffer sections once per point, up to the
host's RNDIS max-packets-per-message (8) aggregated in one section, and one raw ring
write sends every free section (one prebuilt SEND_RNDIS_PKT each). Every receive
takes all the packets waiting: send completions free their sections, transfer-page
packets (up to 64 RNDIS packets each) are counted by their ranges and completed with
one raw ring write. Its Python runs per VMBus packet (a descriptor unpack, a
transaction id patched into the completion), not per frame; the first frame back
of each queue is compared with the one sent, and every frame's length is counted.

`python -m vmbus.bench_net host|vm ...` are the two child roles (not a public CLI).
"""

from __future__ import annotations

import argparse
import array
import ctypes
import json
import mmap
import os
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vmbus.bench import (
    PROGRESS_PREFIX,
    _big_buffers,
    _Progress,
    check_options,
    stopped,
    write_outputs,
)
from vmbus.cliutil import Interrupted, UserError

if TYPE_CHECKING:
    from devices.netvsc.vsc import NetvscGuest
    from vmbus.channel import Channel
    from vmbus.ring import OutPacket

LSO_SIZE = 65536  # a 64 KiB LSO send: Ethernet + IPv4 + TCP + payload
SIZES = [64, 512, 1500, LSO_SIZE]
QUEUES = [1, 4]
MTU = 1500
MSS = MTU - 40  # IPv4 + TCP headers
QUICK_SECONDS = 0.4  # as `bench ring` and `bench disk`
FULL_SECONDS = 2.0
RING_SIZE = 1 << 20  # the primary channel's rings, per direction
RECV_BUFFER = 16 << 20  # Linux 6.1's NETVSC_RECEIVE_BUFFER_DEFAULT
SEND_BUFFER = 1 << 20  # ... and NETVSC_SEND_BUFFER_DEFAULT
WINDOW = 512  # frames in flight per queue (the VSP queues 1024 per queue before drops)
LSO_SLOTS = 8  # LSO sends in flight per queue (45 segments each)
STALL_S = 5.0  # no frame back for this long: lost (the bench fails naming the queue)
NIC_INSTANCES = {
    1: uuid.UUID("6e657476-7363-4265-6e63-680000000001"),
    4: uuid.UUID("6e657476-7363-4265-6e63-680000000004"),
}
RSS_HASH_INFO = 0x1701  # what the VSC's rss_params asks for (IPv4/IPv6, TCP ports)
IPERF_MTU = 1500
IPERF_NETS = ("10.78.0.1", "10.78.0.2")  # the host-side and guest-side addresses
_CHILD = [sys.executable, "-m", "vmbus.bench_net"]
_VMBUSD = [sys.executable, "-m", "vmbus.cli"]

# A transfer-page packet as the ring reader copies it out: descriptor and the
# vmtransfer_page_packet_header; its ranges (count, offset) follow at byte 24.
_XFER = struct.Struct("<HHHHQHBBI")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_COMP_LEN = 24  # descriptor + NVSP SEND_RNDIS_PKT_COMPLETE (type, status)


def _lso_segments(size: int) -> int:
    return -(-(size - 54) // MSS)


def _frames_back(size: int) -> int:
    """Frames the guest gets back per frame it sends (an LSO send: its segments)."""
    return _lso_segments(size) if size == LSO_SIZE else 1


# -- frames ------------------------------------------------------------------------


def _ipv4(frame: bytearray, proto: int, src: bytes) -> None:
    from devices.netvsc.offload import ipv4_header_checksum

    head = (0x45, 0, len(frame) - 14, 0, 0x4000, 64, proto, 0, src, bytes((10, 0, 0, 1)))
    struct.pack_into(">BBHHHBBH4s4s", frame, 14, *head)
    ipv4_header_checksum(frame, 14)


def make_frame(size: int, src: bytes, mac: bytes) -> bytes:
    """A UDP/IPv4 frame of `size` bytes (or, at LSO_SIZE, a TCP/IPv4 send to segment),
    from address `src`, its payload a byte pattern."""
    frame = bytearray(size)
    frame[0:14] = mac + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00"
    frame[54:] = (bytes(range(256)) * (size // 256 + 1))[54:size]  # byte i is i & 0xFF
    if size == LSO_SIZE:
        _ipv4(frame, 6, src)
        struct.pack_into(">HHIIBBHHH", frame, 34, 40000, 5001, 1, 0, 5 << 4, 0x18, 65535, 0, 0)
    else:
        _ipv4(frame, 17, src)
        struct.pack_into(">HHHH", frame, 34, 40000, 5001, size - 34, 0)
    return bytes(frame)


def steered_frame(size: int, queue: int, table: list[int], mac: bytes) -> bytes:
    """A frame the VSP's vRSS steers to `queue` (Toeplitz over the key the VSC set,
    then its indirection table): each queue's frames come back on that queue."""
    from devices.netvsc import rndis as rn

    for i in range(1, 65536):
        frame = make_frame(size, bytes((10, 1, i >> 8, i & 0xFF)), mac)
        if not table:
            return frame
        found = rn.rss_input(frame, RSS_HASH_INFO)
        assert found is not None
        if rn.rss_queue(rn.toeplitz_hash(rn.DEFAULT_RSS_KEY, found[0]), table) == queue:
            return frame
    raise RuntimeError(f"no source address steers to queue {queue}")


def rndis_packet(frame: bytes, ppis: tuple[tuple[int, int], ...] = (), pad_to: int = 1) -> bytes:
    """netvsc_xmit's RNDIS PACKET (PPIs as init_ppi_data lays them); msg_len padded
    to `pad_to` as netvsc_copy_to_send_buf pads every packet batched before another."""
    area = b"".join(struct.pack("<IIII", 16, t, 12, v) for t, v in ppis)
    length = 44 + len(area) + len(frame)
    padded = -(-length // pad_to) * pad_to
    head = struct.pack("<II9I", 1, padded, 36 + len(area), len(frame), 0, 0, 0, 36, len(area), 0, 0)
    return (head + area + frame).ljust(padded, b"\0")


def _send_rndis_pkt(section: int, length: int) -> bytes:
    """NVSP SEND_RNDIS_PKT for a data frame in send section `section` (or GPA direct)."""
    from devices.netvsc import protocol as nv

    msg = struct.pack("<IIII", nv.Msg.SEND_RNDIS_PKT, nv.CHANNEL_TYPE_DATA, section, length)
    return msg.ljust(nv.NVSP_MESSAGE_SIZE, b"\0")


# -- orchestrator ------------------------------------------------------------------


def _run_pair(
    impl: str, seconds: float, socketpair: bool, progress: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Host + VM children with VMBUSD_NATIVE set for `impl`; the VM's records.

    Their own session: a Ctrl-C reaches only the orchestrator, which stops them."""
    env = dict(os.environ, VMBUSD_NATIVE="1" if impl == "native" else "0")
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        _big_buffers(s)
    children: list[subprocess.Popen[bytes]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="vmbusd-bench-net-") as tmp:
            path = os.path.join(tmp, "vmbusd.sock")
            stats_path = os.path.join(tmp, "stats.sock")
            host = subprocess.Popen(
                [
                    *_CHILD,
                    "host",
                    "--listen",
                    path,
                    "--stats",
                    stats_path,
                    "--sockfd",
                    str(a.fileno()),
                ],
                env=env,
                pass_fds=[a.fileno()],
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
            children.append(host)
            deadline = time.monotonic() + 30
            while not (os.path.exists(path) and os.path.exists(stats_path)):
                if host.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("bench net host did not start")
                time.sleep(0.02)
            vm = subprocess.Popen(
                [
                    *(*_CHILD, "vm", "--connect", path, "--stats", stats_path),
                    *("--seconds", str(seconds), "--impl", impl),
                    *("--sockfd", str(b.fileno()), "--socketpair", "1" if socketpair else "0"),
                    *("--host-pid", str(host.pid)),
                ],
                env=env,
                pass_fds=[b.fileno()],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            children.append(vm)
            a.close()
            b.close()
            assert vm.stderr is not None
            for raw in vm.stderr:
                line = raw.decode(errors="replace").rstrip("\n")
                if line.startswith(PROGRESS_PREFIX):
                    progress(line[len(PROGRESS_PREFIX) :])
                else:
                    print(line, file=sys.stderr, flush=True)
            vm_out, _ = vm.communicate(timeout=600)
            host.wait(timeout=30)
    finally:
        a.close()
        b.close()
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    if vm.returncode != 0:
        raise RuntimeError(f"bench net VM ({impl}) failed with status {vm.returncode}")
    records: list[dict[str, Any]] = json.loads(vm_out.decode().strip().splitlines()[-1])
    return records


# -- iperf3 baselines (namespaces through pyroute2, as the tap backend does) ---------


@contextmanager
def _namespaces(*names: str) -> Iterator[None]:
    """Fresh network namespaces with lo up, removed (with all they hold) afterwards."""
    from pyroute2 import IPRoute, netns

    from devices.netvsc.backends.tap import in_netns

    made: list[str] = []
    try:
        for name in names:
            netns.create(name)
            made.append(name)
            with in_netns(name), IPRoute() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        yield
    finally:
        for name in made:
            netns.remove(name)


def _address(ns: str, ifname: str, addr: str, **link: Any) -> None:
    """`addr`/24 on `ifname` in `ns`, the link set up (with `link`'s settings)."""
    from pyroute2 import IPRoute

    from devices.netvsc.backends.tap import in_netns

    with in_netns(ns), IPRoute() as ipr:
        (index,) = ipr.link_lookup(ifname=ifname)
        ipr.addr("add", index=index, address=addr, prefixlen=24)
        ipr.link("set", index=index, state="up", **link)


def _rx_packets(ns: str, ifname: str) -> int:
    from pyroute2 import IPRoute

    from devices.netvsc.backends.tap import in_netns

    with in_netns(ns), IPRoute() as ipr:
        (index,) = ipr.link_lookup(ifname=ifname)
        return int(ipr.get_links(index)[0].get_attr("IFLA_STATS64")["rx_packets"])


def _iperf3(client_ns: str, server_ns: str, seconds: float) -> tuple[float, float, str]:
    """iperf3 TCP from client_ns to the server in server_ns: (bits/s received, the
    seconds iperf3 measured over, command)."""
    from devices.netvsc.backends.tap import in_netns

    with in_netns(server_ns):
        server = subprocess.Popen(
            ["iperf3", "-s", "-1", "-B", IPERF_NETS[0]],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    try:
        cmd = ["iperf3", "-c", IPERF_NETS[0], "-t", str(max(1, round(seconds))), "-J"]
        deadline = time.monotonic() + 10
        while True:  # the server listens within a moment; until then the client is refused
            with in_netns(client_ns):
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=60 + seconds)
            result = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}
            if "error" not in result and r.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(cmd)}: {result.get('error', r.stderr.strip())}")
            time.sleep(0.2)
    finally:
        server.kill()
        server.wait()
    got = result["end"]["sum_received"]
    return float(got["bits_per_second"]), float(got["seconds"]), " ".join(cmd)


def _iperf_record(impl: str, bits: float, packets: int, seconds: float, cmd: str) -> dict[str, Any]:
    """packets/s: what the receiving interface counted (the whole run, set-up included)
    over the seconds iperf3 measured."""
    return {
        "size": IPERF_MTU,
        "queues": 1,
        "impl": impl,
        "lso": False,
        "packets_per_s": packets / seconds,
        "bits_per_s": bits,
        "wakeups_per_packet": None,  # not observable for a veth pair
        "seconds": seconds,
        "command": cmd,
    }


def veth_iperf3(seconds: float, tag: str) -> dict[str, Any]:
    """iperf3 TCP over a veth pair between two fresh namespaces (MTU 1500, the
    kernel's offloads as they come)."""
    from pyroute2 import IPRoute

    from devices.netvsc.backends.tap import in_netns

    c, s = f"vmbn-vc-{tag}", f"vmbn-vs-{tag}"
    with _namespaces(c, s):
        with in_netns(c), IPRoute() as ipr:
            peer = {"ifname": "vs0", "net_ns_fd": f"/run/netns/{s}"}
            ipr.link("add", ifname="vc0", kind="veth", peer=peer)
        _address(c, "vc0", IPERF_NETS[1], mtu=IPERF_MTU)
        _address(s, "vs0", IPERF_NETS[0], mtu=IPERF_MTU)
        p0 = _rx_packets(s, "vs0")
        bits, dt, cmd = _iperf3(c, s, seconds)
        packets = _rx_packets(s, "vs0") - p0
    return _iperf_record("veth-iperf3", bits, packets, dt, cmd)


def _wait_line(proc: subprocess.Popen[bytes], log: str, line: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        with open(log, errors="replace") as f:
            text = f.read()
        if line in text:
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            why = f"exited {proc.returncode}" if proc.poll() is not None else "timed out"
            raise RuntimeError(f"{proc.args!r}: {why}:\n{text[-2000:]}")
        time.sleep(0.05)


def _host_counters(stats_path: str) -> tuple[int, int]:
    """(wakeups, signals) summed over the service's netvsc channels."""
    from vmbus import stats

    snap = json.loads(stats.fetch(stats_path))
    wake = sig = 0
    for vm in snap.get("vms", []):
        for ch in vm["channels"]:
            if ch["device"] == "netvsc":
                wake += ch["stats"]["wakeups"]
                sig += ch["stats"]["signals_sent"]
    return wake, sig


def vmbus_iperf3(seconds: float, tag: str) -> dict[str, Any]:
    """iperf3 TCP between namespace g (the simulated guest's NIC as TAP vg0: `vmbusd vm
    --nic-tap vg0 --netns g`) and namespace h (vmbusd's tap backend, enslaved to bridge
    br0 there): joined only through vmbusd. The guest here is `vmbusd vm`, whose
    channel counters are not exported: the wake-ups counted are the host's."""
    from pyroute2 import IPRoute

    from devices.netvsc.backends.tap import in_netns

    g, h = f"vmbn-g-{tag}", f"vmbn-h-{tag}"
    procs: list[subprocess.Popen[bytes]] = []
    with _namespaces(g, h), tempfile.TemporaryDirectory(prefix="vmbusd-bench-net-") as tmp:
        try:
            with in_netns(h), IPRoute() as ipr:
                ipr.link("add", ifname="br0", kind="bridge")
            _address(h, "br0", IPERF_NETS[0], mtu=IPERF_MTU)
            config = os.path.join(tmp, "nic.toml")
            with open(config, "w") as f:
                f.write(
                    f'[[device]]\ntype = "netvsc"\nmtu = {IPERF_MTU}\nqueues = 1\n'
                    f'backend = "tap"\nifname = "vh0"\nnetns = "{h}"\nbridge = "br0"\n'
                )
            sock, stats_path = os.path.join(tmp, "vmbusd.sock"), os.path.join(tmp, "stats.sock")
            serve_log, vm_log = os.path.join(tmp, "serve.log"), os.path.join(tmp, "vm.log")
            with open(serve_log, "wb") as out:
                procs.append(
                    subprocess.Popen(
                        [
                            *_VMBUSD,
                            "serve",
                            "--listen",
                            sock,
                            "--config",
                            config,
                            "--stats",
                            stats_path,
                        ],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            _wait_line(procs[0], serve_log, "listening on")
            with open(vm_log, "wb") as out:
                procs.append(
                    subprocess.Popen(
                        [*_VMBUSD, "vm", "--connect", sock, "--nic-tap", "vg0", "--netns", g],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            _wait_line(procs[1], vm_log, "bridged to TAP vg0")
            _address(g, "vg0", IPERF_NETS[1])
            p0, w0 = _rx_packets(h, "vh0"), _host_counters(stats_path)
            bits, dt, cmd = _iperf3(g, h, seconds)
            packets, w1 = _rx_packets(h, "vh0") - p0, _host_counters(stats_path)
        finally:
            for p in reversed(procs):
                if p.poll() is None:
                    p.terminate()
                    try:
                        p.wait(10)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
    rec = _iperf_record("vmbus-iperf3", bits, packets, dt, cmd)
    rec["host_wakeups"], rec["host_signals"] = w1[0] - w0[0], w1[1] - w0[1]
    rec["wakeups_per_packet"] = rec["host_wakeups"] / max(1, packets)  # the host's only
    return rec


# -- the table ------------------------------------------------------------------------


def _size_name(size: int) -> str:
    return "64K LSO" if size == LSO_SIZE else f"{size} B"


def _ratio(r: dict[str, Any], base: dict[str, Any] | None, key: str = "packets_per_s") -> str:
    if base is None or base is r or not base[key]:
        return "-"
    return f"{r[key] / base[key]:.2f}x"


def _table(records: list[dict[str, Any]]) -> str:
    by = {(r["size"], r["queues"], r["impl"]): r for r in records}
    lines = [
        f"{'size':>8} {'queues':>6} {'impl':<12} {'packets/s':>12} {'Gbit/s':>8}"
        f" {'wakeups/pkt':>11} {'host us/pkt':>11} {'vs socketpair':>13} {'vs python':>9}"
        f" {'vs veth':>8}"
    ]
    for size in SIZES:
        for q in QUEUES:
            for impl in ("native", "python", "socketpair"):
                r = by.get((size, q, impl))
                if r is None:
                    continue
                w = r.get("wakeups_per_packet")
                cpu = r["host_cpu_us_per_frame"]
                lines.append(
                    f"{_size_name(size):>8} {q:>6} {impl:<12} {r['packets_per_s']:>12,.0f}"
                    f" {r['bits_per_s'] / 1e9:>8.3f} {'-' if w is None else f'{w:.4f}':>11}"
                    f" {cpu:>11.2f}"
                    f" {_ratio(r, by.get((size, 1, 'socketpair'))):>13}"
                    f" {_ratio(r, by.get((size, q, 'python'))):>9} {'-':>8}"
                )
    veth = by.get((IPERF_MTU, 1, "veth-iperf3"))
    for impl in ("veth-iperf3", "vmbus-iperf3"):
        r = by.get((IPERF_MTU, 1, impl))
        if r is None:
            continue
        lines.append(
            f"{'TCP':>8} {1:>6} {impl:<12} {r['packets_per_s']:>12,.0f}"
            f" {r['bits_per_s'] / 1e9:>8.3f} {'-':>11} {'-':>11} {'-':>13} {'-':>9}"
            f" {_ratio(r, veth, 'bits_per_s'):>8}"
        )
    return "\n".join(lines)


def targets(records: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """The issue's targets as (what, measured / target): 1.0 or more is met."""
    by = {(r["size"], r["queues"], r["impl"]): r for r in records}
    out: list[tuple[str, float]] = []

    def get(size: int, q: int, impl: str) -> dict[str, Any] | None:
        return by.get((size, q, impl))

    if (n64 := get(64, 1, "native")) is not None:
        out.append((">= 1,000,000 frames/s at 64 B, 1 queue", n64["packets_per_s"] / 1e6))
        if (sp := get(64, 1, "socketpair")) is not None:
            ratio = n64["packets_per_s"] / sp["packets_per_s"]
            out.append((">= 5x socketpair at 64 B (native)", ratio / 5))
    if (n1500 := get(1500, 1, "native")) is not None:
        out.append((">= 10 Gbit/s at 1500 B, 1 queue", n1500["bits_per_s"] / 10e9))
    veth, vmb = get(IPERF_MTU, 1, "veth-iperf3"), get(IPERF_MTU, 1, "vmbus-iperf3")
    if veth is not None and vmb is not None:
        out.append(
            (">= 50% of veth-iperf3 (vmbus-iperf3)", vmb["bits_per_s"] / veth["bits_per_s"] / 0.5)
        )
    return out


def write_plot(records: list[dict[str, Any]], path: str) -> None:
    """Packets/s and Gbit/s per size, one bar per queues/implementation, the iperf3
    pair beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [(1, "native"), (1, "python"), (1, "socketpair"), (4, "native"), (4, "python")]
    by = {(r["size"], r["queues"], r["impl"]): r for r in records}
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.5), width_ratios=[3, 3, 1])
    width = 0.8 / len(series)
    xs = range(len(SIZES))
    for i, (q, impl) in enumerate(series):
        rs = [by.get((s, q, impl)) for s in SIZES]
        pos = [x + (i - len(series) / 2 + 0.5) * width for x in xs]
        ax1.bar(pos, [r["packets_per_s"] if r else 0 for r in rs], width, label=f"{impl} {q}q")
        ax2.bar(pos, [r["bits_per_s"] / 1e9 if r else 0 for r in rs], width)
    for ax, title in ((ax1, "packets/s (LSO: sends/s)"), (ax2, "Gbit/s (frame bytes)")):
        ax.set_xticks(list(xs), [_size_name(s) for s in SIZES])
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    ax1.legend(fontsize=8)
    names = ["veth-iperf3", "vmbus-iperf3"]
    ip = [by.get((IPERF_MTU, 1, n)) for n in names]
    ax3.bar(range(2), [r["bits_per_s"] / 1e9 if r else 0 for r in ip], 0.6)
    ax3.set_xticks(range(2), ["veth", "vmbus"])
    ax3.set_yscale("log")
    ax3.set_title("iperf3 TCP Gbit/s")
    ax3.grid(True, axis="y", which="both", alpha=0.3)
    fig.suptitle(f"vmbusd bench net ({os.cpu_count()} CPUs, loopback backend)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_bench_net(
    *,
    quick: bool = False,
    json_path: str | None = None,
    seconds: float | None = None,
    plot_path: str | None = None,
) -> int:
    """The network benchmark. Bad options and missing tools are refused before the
    run (UserError); SIGTERM/Ctrl-C stops the children and writes nothing."""
    seconds = check_options(seconds, QUICK_SECONDS if quick else FULL_SECONDS, json_path, plot_path)
    if shutil.which("iperf3") is None:
        raise UserError(
            "bench net needs iperf3 on PATH (the veth-iperf3 and vmbus-iperf3 baselines): "
            "apt-get install iperf3"
        )
    if os.geteuid() != 0:
        raise UserError("bench net needs root: its iperf3 baselines run in network namespaces")
    records: list[dict[str, Any]] = []
    points = len(SIZES) * len(QUEUES)
    progress = _Progress(len(SIZES) + 2 * points + 2, "bench net")
    iperf_seconds = max(1.0, seconds * (2.5 if quick else 1.5))
    tag = uuid.uuid4().hex[:6]
    try:
        records.extend(_run_pair("native", seconds, True, progress.step))
        records.extend(_run_pair("python", seconds, False, progress.step))
        progress.step("veth-iperf3")
        records.append(veth_iperf3(iperf_seconds, tag))
        progress.step("vmbus-iperf3")
        records.append(vmbus_iperf3(iperf_seconds, tag))
    except (Interrupted, KeyboardInterrupt) as exc:
        raise stopped(exc, progress) from None
    finally:
        progress.close()
    print(_table(records))
    print(
        f"\n(loopback backend, MTU {MTU}; packets/s = frames back in the guest per second "
        f"(LSO: 64 KiB sends, each back as {_lso_segments(LSO_SIZE)} segments); Gbit/s of "
        f"frame bytes one way; host us/pkt = the host process's CPU time per frame back "
        f"(LSO: per segment); {seconds} s per point, iperf3 {round(iperf_seconds)} s; "
        f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f})"
    )
    print("\ntargets (measured / target; 1.00 or more is met):")
    for what, ratio in targets(records):
        print(f"  {what:<44} {ratio:6.3f}")
    write_outputs(records, json_path, plot_path, write_plot)
    return 0


# -- child: host -------------------------------------------------------------------


_libc = ctypes.CDLL(None, use_errno=True)
MSG_WAITFORONE = 0x10000
_MMSG_WORDS = 8  # struct mmsghdr on 64-bit Linux: msghdr (7 words) + msg_len, in u64s


class _Datagrams:
    """Up to `n` datagrams per system call (recvmmsg/sendmmsg): the socketpair
    baseline batched as the ring path is, so that it pays per batch what a ring
    write or read pays, not a system call per frame. Receive slots are `slot` bytes
    of one anonymous mapping (touched only as used); a datagram to send is `per`
    iovecs. The iovecs and mmsghdrs are plain u64 arrays, written through memoryviews."""

    def __init__(self, fd: int, n: int, slot: int, per: int = 1) -> None:
        self.fd, self.n, self.slot, self.per = fd, n, slot, per
        self.mem = mmap.mmap(-1, max(1, n * slot))
        self._anchor = ctypes.c_char.from_buffer(self.mem)
        self.base = ctypes.addressof(self._anchor)
        self._iov = (ctypes.c_uint64 * (2 * n * per))()
        self._hdrs = (ctypes.c_uint64 * (_MMSG_WORDS * n))()
        self.iov = memoryview(self._iov).cast("B").cast("Q")  # (base, len) pairs
        self.hdr = memoryview(self._hdrs).cast("B").cast("Q")
        lens = memoryview(self._hdrs).cast("B").cast("I")
        self.lens = lens[14::16]  # msg_len of each mmsghdr
        iov0 = ctypes.addressof(self._iov)
        for i in range(n):
            self.hdr[_MMSG_WORDS * i + 2] = iov0 + 16 * per * i  # msg_iov
            self.hdr[_MMSG_WORDS * i + 3] = 1  # msg_iovlen
            self.iov[2 * per * i] = self.base + i * slot
            self.iov[2 * per * i + 1] = slot

    def recv(self, flags: int = MSG_WAITFORONE) -> int:
        """Every datagram waiting (at least one), into the slots; their lengths in
        `lens`. 0: the peer closed its end."""
        got = int(_libc.recvmmsg(self.fd, self._hdrs, self.n, flags, None))
        if got < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return got

    def send(self, count: int) -> None:
        """Datagrams 0..count-1 as their iovecs say, all of them (blocking)."""
        done = 0
        while done < count:
            at = ctypes.byref(self._hdrs, 8 * _MMSG_WORDS * done)
            sent = int(_libc.sendmmsg(self.fd, at, count - done, 0))
            if sent < 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            done += sent

    def close(self) -> None:
        self.lens.release()
        self.iov.release()
        self.hdr.release()
        del self._anchor
        self.mem.close()


def _sockpair_echo(fd: int) -> None:
    """Host side of the socketpair baseline, until EOF: every datagram waiting taken
    with one recvmmsg and sent back with sendmmsg, an LSO-sized one as its MSS-sized
    pieces (its headers + a slice each, as the segments come back)."""
    rx = _Datagrams(fd, 512, LSO_SIZE + 64)
    tx = _Datagrams(fd, 1024, 0, per=2)
    iov, hdr, lens = tx.iov, tx.hdr, rx.lens
    try:
        while True:
            got = rx.recv()
            if not got:
                return
            k = 0
            for i in range(got):
                n, base = lens[i], rx.base + i * rx.slot
                if n == 0:
                    return  # EOF
                if n <= MTU + 14:
                    iov[4 * k], iov[4 * k + 1] = base, n
                    hdr[_MMSG_WORDS * k + 3] = 1
                    k += 1
                    if k == tx.n:
                        tx.send(k)
                        k = 0
                    continue
                for at in range(54, n, MSS):
                    iov[4 * k], iov[4 * k + 1] = base, 54
                    iov[4 * k + 2], iov[4 * k + 3] = base + at, min(MSS, n - at)
                    hdr[_MMSG_WORDS * k + 3] = 2
                    k += 1
                    if k == tx.n:
                        tx.send(k)
                        k = 0
            tx.send(k)
    except OSError:
        return
    finally:
        del iov, hdr, lens
        rx.close()
        tx.close()
        os.close(fd)


def host_main(args: argparse.Namespace) -> int:
    import trio

    from devices.netvsc.vsp import NetvscDevice
    from vmbus import attach
    from vmbus.server import VmSession
    from vmbus.stats import serve_stats

    threading.Thread(target=_sockpair_echo, args=(args.sockfd,), daemon=True).start()

    async def serve() -> None:
        listener = await attach.listen(args.listen)
        devices = [
            NetvscDevice(
                NIC_INSTANCES[q],
                mac=f"00:15:5d:00:00:{q:02x}",
                mtu=MTU,
                queues=q,
                ring_size_hint=RING_SIZE,
            )
            for q in QUEUES
        ]
        session: VmSession | None = None

        def snapshot() -> dict[str, Any]:
            return {"vms": [session.snapshot()] if session is not None else []}

        async with trio.open_nursery() as nursery:
            await nursery.start(serve_stats, args.stats, snapshot)
            conn = await listener.accept()
            await listener.aclose()
            session = VmSession(conn, list(devices), vm_label="bench")
            await session.run()
            nursery.cancel_scope.cancel()

    trio.run(serve)
    return 0


# -- child: VM ---------------------------------------------------------------------


def _sockpair_client(fd: int, size: int, seconds: float, host_pid: int) -> dict[str, Any]:
    """Guest side of the socketpair baseline: WINDOW frames (or LSO_SLOTS sends) in
    flight; every free slot sent with one sendmmsg, every datagram waiting taken with
    one recvmmsg."""
    msg = ctypes.create_string_buffer(
        make_frame(size, bytes((10, 1, 0, 1)), b"\x00\x15\x5d\x00\x00\x01"), size
    )
    back = _frames_back(size)
    window = LSO_SLOTS * back if size == LSO_SIZE else WINDOW
    tx = _Datagrams(fd, window // back, 0)
    for i in range(tx.n):
        tx.iov[2 * i], tx.iov[2 * i + 1] = ctypes.addressof(msg), size
    rx = _Datagrams(fd, window, 2048)
    expect = got = nbytes = 0
    c0 = _cpu_seconds(host_pid), _cpu_seconds(None)
    t0 = time.perf_counter()
    deadline = t0 + seconds
    stopping = False
    try:
        while not stopping or got < expect:
            k = 0 if stopping else (window - (expect - got)) // back
            if k:
                tx.send(k)
                expect += k * back
            n = rx.recv()
            got += n
            nbytes += sum(rx.lens[:n])
            if not stopping and time.perf_counter() >= deadline:
                stopping = True
        dt = time.perf_counter() - t0
        c1 = _cpu_seconds(host_pid), _cpu_seconds(None)
    finally:
        tx.close()
        rx.close()
    sends = got // back
    want = sends * size + (got - sends) * 54  # an LSO send's segments each repeat its headers
    if nbytes != want:
        raise RuntimeError(f"socketpair baseline: {nbytes} bytes back, {want} sent")
    return {
        "size": size,
        "queues": 1,
        "impl": "socketpair",
        "lso": size == LSO_SIZE,
        "frames": got,
        "packets_per_s": sends / dt,
        "bits_per_s": sends * size * 8 / dt,
        "segments_per_s": got / dt,
        "wakeups_per_packet": None,  # not observable for a socket
        "host_cpu_us_per_frame": (c1[0] - c0[0]) * 1e6 / max(1, got),
        "guest_cpu_us_per_frame": (c1[1] - c0[1]) * 1e6 / max(1, got),
        "bytes_back": nbytes,
        "seconds": dt,
        "window": window,
    }


def _cpu_seconds(pid: int | None) -> float:
    """CPU time (user + system) used so far by process `pid`, or by this one."""
    if pid is None:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class _Queue:
    """One queue of a NIC under load: its channel, and where its frames come back."""

    index: int
    channel: Channel
    relid: int


def _raw_packet(pkt: OutPacket, trans_id: int) -> bytes:
    """`pkt` as a ring holds it (descriptor, body padded to 8), asking for a completion
    with `trans_id`: the load generator sends many with one send_raw call."""
    from vmbus.ring import FLAG_COMPLETION_REQUESTED

    body = b"".join(bytes(b) for b in pkt.body)
    pkt_len = 16 + (len(body) + 7 & ~7)
    flags = pkt.flags | FLAG_COMPLETION_REQUESTED
    desc = struct.pack("<HHHHQ", pkt.type, (16 + pkt.ext_len) // 8, pkt_len // 8, flags, trans_id)
    return desc + body.ljust(pkt_len - 16, b"\0")


class _Pump:
    """One queue's load for one point: sends prebuilt as raw ring packets (a send
    section holding `per_slot` RNDIS packets, or a GPA-direct LSO send), transaction
    id = slot + 1; a window of frames in flight. Per batch, not per frame: the free
    slots go out with one send_raw, every packet waiting comes in with one receive,
    the transfer-page packets' completions go back with one send_raw."""

    def __init__(
        self,
        q: _Queue,
        pkts: list[OutPacket],
        per_slot: int,
        window: int,
        check: Callable[[int], int],
    ) -> None:
        raw = [_raw_packet(p, i + 1) for i, p in enumerate(pkts)]
        self.q = q
        self.buf = b"".join(raw)
        offsets = [sum(len(r) for r in raw[:i]) for i in range(len(raw))]
        self.idx = array.array(
            "I", [v for o, r in zip(offsets, raw, strict=True) for v in (o, len(r))]
        )
        self.per_slot = per_slot  # frames back per send
        self.window = window
        self.check = check  # the first frame back: (byte offset) -> its RNDIS header length
        self.got = 0
        self.bytes = 0

    async def run(self, deadline: float) -> None:
        import trio

        from devices.netvsc import protocol as nv

        ch = self.q.channel
        # From here on this pump takes the channel's completions itself, raw, per
        # batch: the tracker the VSC's requests used during init is dropped (every
        # one of them was answered), or it would take ours as unknown ids.
        ch._tracker = None
        ch._on_completions = None
        comp = bytearray(_COMP_LEN * ch.max_batch)
        for i in range(ch.max_batch):
            struct.pack_into("<HHHHQII", comp, _COMP_LEN * i, 0xB, 2, 3, 0, 0, 108, 1)
        comp_idx = array.array("I", [v for i in range(ch.max_batch) for v in (_COMP_LEN * i, 24)])
        comp_v, comp_iv = memoryview(comp), memoryview(comp_idx).cast("B")
        buf_v, idx_v = memoryview(self.buf), memoryview(self.idx).cast("B")
        unpack, u32, pack_tid = _XFER.unpack_from, _U32.unpack_from, _U64.pack_into
        data_type = nv.CHANNEL_TYPE_DATA
        ok = struct.pack("<II", nv.Msg.SEND_RNDIS_PKT_COMPLETE, nv.Status.SUCCESS)
        nslots = len(self.idx) // 2
        free = [True] * nslots
        head = 0
        expect = got = nbytes = 0
        hdr = -1  # the RNDIS header length of this queue's frames (from the first back)
        stopping = False
        per_slot, window = self.per_slot, self.window
        while True:
            if not stopping:
                k = 0
                room = min(nslots - head, (window - (expect - got)) // per_slot)
                while k < room and free[head + k]:
                    k += 1
                if k:
                    await ch.send_raw(buf_v, idx_v[8 * head : 8 * (head + k)], k)
                    for s in range(head, head + k):
                        free[s] = False
                    head = (head + k) % nslots
                    expect += k * per_slot
            elif got >= expect:
                break
            with trio.move_on_after(STALL_S) as wait:
                batch = await ch.receive()
            if wait.cancelled_caught:
                raise RuntimeError(f"queue {self.q.index}: {expect - got} frames not back")
            rbuf, idx = batch.buffer, batch.index
            view = memoryview(rbuf)
            n = 0
            for i in range(batch.n):
                off = idx[2 * i]
                typ, off8, len8, _fl, tid, _set, _own, _res, ranges = unpack(rbuf, off)
                if typ == 0xB:  # a send completed: its section is free again
                    if view[off + 8 * off8 : off + 8 * off8 + 8] != ok:
                        raise RuntimeError(f"queue {self.q.index}: a send failed")
                    free[tid - 1] = True
                    continue
                if typ != 7:
                    continue  # inband from the host (an indirection table): nothing to do
                pack_tid(comp, _COMP_LEN * n + 8, tid)
                n += 1
                if u32(rbuf, off + 8 * off8 + 4)[0] != data_type:
                    continue  # a control message (a status indication)
                # one RNDIS PACKET per range (Linux's netvsc_receive walks them all)
                ranges = min(ranges, len8 - 3)
                if hdr < 0:
                    hdr = self.check(u32(rbuf, off + 28)[0])
                counts = view[off + 24 : off + 24 + 8 * ranges].cast("I")
                nbytes += sum(counts[0::2]) - hdr * ranges
                counts.release()
                got += ranges
            view.release()
            if n:
                await ch.send_raw(comp_v, comp_iv, n)
            if not stopping and time.perf_counter() >= deadline:
                stopping = True
        self.got, self.bytes = got, nbytes


class _Nic:
    """One NIC brought up by the VSC, its queues, and the guest memory it reads."""

    def __init__(self, guest: NetvscGuest, queues: list[_Queue], table: list[int]) -> None:
        self.guest = guest
        self.queues = queues
        self.table = table
        self.max_pkt = 1

    def _recv_bytes(self, offset: int, length: int) -> bytes:
        return self.guest._read(self.guest._recv[1], offset, length)


async def _bring_up(vm: Any, queues: int) -> _Nic:
    """Linux's netvsc init on the NIC with `queues` queues (vRSS when more than one),
    then two queries Linux does not send (it keeps the indirection table's size and
    the packets per message from INITIALIZE_CMPLT, which the VSC does not); the
    VSC's receive loops are stopped afterwards: the pumps own the channels."""
    import trio

    from devices.netvsc import rndis as rn
    from devices.netvsc.vsc import NetvscGuest
    from devices.netvsc.vsp import NETVSC_IF_TYPE

    offer = next(
        o
        for o in vm.find_offers(NETVSC_IF_TYPE)
        if o.if_instance == NIC_INSTANCES[queues] and not o.sub_channel_index
    )
    gch = await vm.open_channel(offer, RING_SIZE)
    guest = NetvscGuest(vm, gch, recv_size=RECV_BUFFER, send_size=SEND_BUFFER, mtu=MTU)
    table: list[int] = []
    async with trio.open_nursery() as init:
        init.start_soon(guest.receive_loop)
        await guest.connect()
        n = await guest.device_add(queues, init)  # vRSS (when queues > 1), then the filter
        if n > 1:
            caps = await guest.query(
                rn.Oid.GEN_RECEIVE_SCALE_CAPABILITIES,
                struct.pack("<BBH", 0x88, 2, 18).ljust(18, b"\0"),
                expect=18,
            )
            n_tab = struct.unpack_from("<H", caps, 16)[0]
            table = [i % n for i in range(n_tab if 1 <= n_tab <= 256 else 128)]
        (max_pkt,) = struct.unpack(
            "<I", await guest.query(rn.Oid.GEN_MAXIMUM_SEND_PACKETS, expect=4)
        )
        init.cancel_scope.cancel()
    qs = [_Queue(0, gch.channel, gch.offer.relid)]
    qs += [_Queue(i, c.channel, c.offer.relid) for i, c in sorted(guest.subchannels.items())]
    nic = _Nic(guest, qs, table)
    nic.max_pkt = max(1, max_pkt)
    return nic


async def _drive(
    nic: _Nic, size: int, seconds: float, impl: str, stats_path: str, host_pid: int
) -> dict[str, Any]:
    """One point: every queue pumped for `seconds`, then drained; the record."""
    import trio

    from devices.netvsc import protocol as nv
    from devices.netvsc import rndis as rn
    from vmbus.gpadl import GpaRange
    from vmbus.packet import gpa_direct, inband
    from vmbus.stats import fetch

    guest = nic.guest
    vm = guest.vm
    nq = len(nic.queues)
    allocated: list[int] = []
    pumps: list[_Pump] = []
    lso = size == LSO_SIZE
    sections = guest.send_sections // nq
    per_section = 1
    for q in nic.queues:
        frame = steered_frame(size, q.index, nic.table, guest.mac)
        pkts: list[OutPacket] = []
        if lso:
            value = MSS | (34 << 20) | (rn.LSO_V2_TYPE << 30)
            head = rndis_packet(frame, ((rn.PpiType.TCP_LARGESEND, value),))[: -len(frame)]
            for _ in range(LSO_SLOTS):
                hpfn = vm.ram.alloc_pages(1)
                fpfns = vm.ram.alloc_pages(-(-size // 4096))
                allocated += hpfn + fpfns
                guest._write(hpfn, 0, head)
                guest._write(fpfns, 0, frame)
                ranges = [GpaRange(len(head), 0, tuple(hpfn)), GpaRange(size, 0, tuple(fpfns))]
                nvsp = _send_rndis_pkt(nv.NO_SECTION, 0)
                pkts.append(gpa_direct(ranges, nvsp))
            window = LSO_SLOTS * _frames_back(size)
        else:
            one = rndis_packet(frame, pad_to=8)
            per_section = max(1, min(nic.max_pkt, guest.send_section // len(one)))
            batch = one * (per_section - 1) + rndis_packet(frame)
            for k in range(sections):
                section = q.index * sections + k
                guest._write(guest._send[1], section * guest.send_section, batch)
                nvsp = _send_rndis_pkt(section, len(batch))
                pkts.append(inband(nvsp))
            window = min(WINDOW, sections * per_section)

        def check(offset: int, frame: bytes = frame) -> int:
            """The first frame back is the one sent (an LSO send's: its first segment,
            MSS-sized); returns its RNDIS header length (data_offset + 8)."""
            d_off, d_len = struct.unpack("<II", nic._recv_bytes(offset + 8, 8))
            got = nic._recv_bytes(offset + 8 + d_off, d_len)
            want = frame if not lso else None
            if (want is not None and got != want) or (want is None and d_len != 54 + MSS):
                raise RuntimeError(f"{_size_name(size)}: a frame came back wrong: {got[:40].hex()}")
            return int(8 + d_off)

        pumps.append(_Pump(q, pkts, per_section if not lso else _frames_back(size), window, check))
    relids = {q.relid for q in nic.queues}

    def host_counters() -> tuple[int, int]:
        snap = json.loads(fetch(stats_path))
        wake = sig = 0
        for v in snap["vms"]:
            for ch in v["channels"]:
                if ch["relid"] in relids:
                    wake += ch["stats"]["wakeups"]
                    sig += ch["stats"]["signals_sent"]
        return wake, sig

    g0 = [(q.channel.stats.wakeups, q.channel.stats.signals_sent) for q in nic.queues]
    h0 = await trio.to_thread.run_sync(host_counters)
    c0 = _cpu_seconds(host_pid), _cpu_seconds(None)
    try:
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for p in pumps:
                nursery.start_soon(p.run, t0 + seconds)
        dt = time.perf_counter() - t0
        c1 = _cpu_seconds(host_pid), _cpu_seconds(None)
    finally:
        vm.ram.free_pages(allocated)
    h1 = await trio.to_thread.run_sync(host_counters)
    g_wake = sum(q.channel.stats.wakeups - w for q, (w, _) in zip(nic.queues, g0, strict=True))
    g_sig = sum(q.channel.stats.signals_sent - s for q, (_, s) in zip(nic.queues, g0, strict=True))
    frames = sum(p.got for p in pumps)
    back = _frames_back(size)
    sends = frames // back
    return {
        "size": size,
        "queues": nq,
        "impl": impl,
        "lso": lso,
        "frames": frames,
        "packets_per_s": sends / dt,
        "bits_per_s": sends * size * 8 / dt,
        "segments_per_s": frames / dt,
        "wakeups_per_packet": (h1[0] - h0[0] + g_wake) / max(1, frames),
        "host_wakeups": h1[0] - h0[0],
        "guest_wakeups": g_wake,
        "host_signals": h1[1] - h0[1],
        "guest_signals": g_sig,
        # CPU time per frame back: the host's (/proc, 10 ms ticks) and this guest's;
        # both include the channels' adaptive polling (a receiver spins up to 200 us
        # on an empty ring before it sleeps), so the side that waits looks busier
        "host_cpu_us_per_frame": (c1[0] - c0[0]) * 1e6 / max(1, frames),
        "guest_cpu_us_per_frame": (c1[1] - c0[1]) * 1e6 / max(1, frames),
        "frames_per_vmbus_packet": per_section,
        "window": pumps[0].window,
        "bytes_back": sum(p.bytes for p in pumps),
        "seconds": dt,
    }


def vm_main(args: argparse.Namespace) -> int:
    import trio

    from vmbus import attach
    from vmbus.guest.vm import SimulatedVm

    records: list[dict[str, Any]] = []
    if args.socketpair == "1":
        for size in SIZES:
            print(f"{PROGRESS_PREFIX}socketpair {_size_name(size)}", file=sys.stderr, flush=True)
            records.append(_sockpair_client(args.sockfd, size, args.seconds, args.host_pid))
    os.close(args.sockfd)

    async def run() -> None:
        vm = SimulatedVm(ram_size=128 << 20, vm_id="bench", vcpus=max(QUEUES))
        conn = await attach.connect(args.connect)
        async with trio.open_nursery() as nursery:
            await vm.start(conn, nursery)
            only = tuple(int(x) for x in args.only.split(":")) if args.only else None
            for queues in QUEUES:
                if only is not None and only[1] != queues:
                    continue
                nic = await _bring_up(vm, queues)
                if len(nic.queues) != queues:
                    raise RuntimeError(f"{len(nic.queues)} queues open, {queues} wanted")
                for size in SIZES:
                    if only is not None and only[0] != size:
                        continue
                    what = f"{args.impl} {queues}q {_size_name(size)}"
                    print(f"{PROGRESS_PREFIX}{what}", file=sys.stderr, flush=True)
                    records.append(
                        await _drive(nic, size, args.seconds, args.impl, args.stats, args.host_pid)
                    )
                for gch in [*nic.guest.subchannels.values(), nic.guest.gch]:
                    await vm.close_channel(gch)
            await vm.unload()
            nursery.cancel_scope.cancel()
        vm.close()

    trio.run(run)
    print(json.dumps(records), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vmbus.bench_net")
    sub = p.add_subparsers(dest="role", required=True)
    h = sub.add_parser("host")
    h.add_argument("--listen", required=True)
    h.add_argument("--stats", required=True)
    h.add_argument("--sockfd", type=int, required=True)
    v = sub.add_parser("vm")
    v.add_argument("--connect", required=True)
    v.add_argument("--stats", required=True)
    v.add_argument("--seconds", type=float, required=True)
    v.add_argument("--impl", required=True)
    v.add_argument("--sockfd", type=int, required=True)
    v.add_argument("--socketpair", default="1")
    v.add_argument("--host-pid", type=int, required=True)
    v.add_argument("--only", help="SIZE:QUEUES, one point (profiling)")
    args = p.parse_args(argv)
    return host_main(args) if args.role == "host" else vm_main(args)


if __name__ == "__main__":
    sys.exit(main())
