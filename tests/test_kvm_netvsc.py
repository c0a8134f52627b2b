"""The real Linux 6.1 hv_netvsc through vmbusd (issue 8's netvsc bullet, issue 10's
"Done means"): the KVM guest brings eth0 up from `ip=`, answers ARP and ping from a
network namespace the test made, sends its log there over netconsole, and stops
answering while vmbusd says the link is down.

    namespace vmbt-kn-XXXX                          the KVM guest (no user space)
    br0 10.99.0.1/24, MAC 02:00:00:99:00:01         eth0 10.99.0.2 (ip=, IP-Config)
      `- vh0 (vmbusd's TAP, netvsc tap backend)  == VMBus ==  hv_netvsc
    a UDP listener on 10.99.0.1:6666  <---------- netconsole=6665@10.99.0.2/eth0,...

The guest boots from scratch (not from the Linux tier's shared snapshot): `ip=` and
`netconsole=` are parsed long before the snapshot point, so a restored guest keeps the
snapshot's command line, and giving every restored guest an `ip=` for an eth0 it does
not have would cost each test IP-Config's device wait. One boot (~60 s on kvm_pvm,
most of it netpoll's 4 s carrier wait at a 10x slowed guest clock) serves the module.

Also here, in the main suite: the regression test for what that guest found (frames
before the guest's packet filter), with the simulated VSC now as strict as Linux.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from devices.netvsc import rndis as rn
from devices.netvsc.vsc import NetvscGuest
from devices.netvsc.vsp import NetvscDevice
from vmbus.guest.vm import SimulatedVm

VMBUSD = str(Path(sys.executable).with_name("vmbusd"))
HAS_KVM = os.path.exists("/dev/kvm")
NIC_MAC = "00:15:5d:00:99:02"
BR_MAC = "02:00:00:99:00:01"
H_ADDR, G_ADDR = "10.99.0.1", "10.99.0.2"
NC_PORT = 6666
APPEND = (
    f"ip={G_ADDR}::{H_ADDR}:255.255.255.0::eth0:off "
    f"netconsole=6665@{G_ADDR}/eth0,{NC_PORT}@{H_ADDR}/{BR_MAC} "
    # netdev_dbg on, and msg_enable up to NETIF_MSG_RX_STATUS: every RNDIS message the
    # guest takes is dumped (dump_rndis_message), the link indications among them;
    # no such root: the guest idles, alive
    "hv_netvsc.dyndbg=+p hv_netvsc.debug=12 root=/dev/vmbt rootwait"
)
UP = "Waiting for root device /dev/vmbt"  # IP-Config is done before this line
BOOT_TIMEOUT_S = 240.0

# A listener in the namespace: every datagram to NC_PORT as one line "srcip srcport hex".
LISTENER = f"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("{H_ADDR}", {NC_PORT}))
print("bound", flush=True)
while True:
    data, (ip, port) = s.recvfrom(65536)
    print(ip, port, data.hex(), flush=True)
"""


def _run(*cmd: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {r.returncode}: {r.stderr.strip()}")
    return r


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _wait_text(path: Path, needle: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        if needle in text:
            return text
        if proc.poll() is not None or time.monotonic() > deadline:
            why = f"exited {proc.returncode}" if proc.poll() is not None else "timed out"
            pytest.fail(f"waiting for {needle!r} in {path.name}: {why}:\n{text[-4000:]}")
        time.sleep(0.1)


@dataclass
class Guest:
    ns: str
    console: Path
    serve_log: Path
    netconsole: Path
    control: Path
    vm_name: str
    cpus: int = 1
    kvm: subprocess.Popen[bytes] | None = None
    kvm_log: Path | None = None
    stats: Path | None = None  # vmbusd serve --stats

    def ping(self, *args: str, count: int = 3) -> subprocess.CompletedProcess[str]:
        return _run(
            *("ip", "netns", "exec", self.ns, "ping", "-c", str(count), "-W", "5", *args),
            G_ADDR,
            timeout=60,
            check=False,
        )

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return _run(VMBUSD, "ctl", str(self.control), *args, check=False)


@pytest.fixture(scope="module", params=[1, 2], ids=["1cpu-1queue", "2cpu-2queues"])
def guest(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Guest]:
    """The namespace with br0, `vmbusd serve --control` with a netvsc NIC whose tap
    backend joins br0, the netconsole listener, and the guest booted until IP-Config
    is done; everything stopped and removed afterwards. Twice: one vCPU and queue,
    then two vCPUs and `queues = 2` (hv_netvsc opens a vRSS sub-channel)."""
    with nic_guest(tmp_path_factory.mktemp("kvm-netvsc"), int(request.param)) as g:
        yield g


def tap_backend(ns: str) -> str:
    """The NIC's backend lines: vmbusd's TAP vh0, joined to br0 in namespace `ns`."""
    return f'backend = "tap"\nifname = "vh0"\nnetns = "{ns}"\nbridge = "br0"\n'


@contextlib.contextmanager
def nic_guest(
    tmp: Path,
    cpus: int,
    backend: Callable[[str], str] = tap_backend,
    *,
    append: str = APPEND,
    ipv6: bool = True,
) -> Iterator[Guest]:
    """`guest`'s set-up for any NIC backend (`backend(ns)` gives its TOML lines; it
    must reach br0 in namespace ns): also used by test_kvm_impair. `ipv6=False`
    turns IPv6 off in the namespace, so the host side sends nothing unasked."""
    if not HAS_KVM:
        pytest.skip("/dev/kvm is absent")
    if os.geteuid() != 0:
        pytest.fail("the netvsc guest tests need root (network namespaces, /dev/net/tun)")
    from vmbus.kvm import kernel as kbuild

    vmlinux = kbuild.build(lambda line: print(f"guest-kernel: {line}", file=sys.stderr)).vmlinux
    ns = f"vmbt-kn-{uuid.uuid4().hex[:6]}"
    procs: list[subprocess.Popen[bytes]] = []
    files = []
    _run("ip", "netns", "add", ns)
    try:
        if not ipv6:
            for conf in ("all", "default"):
                _run(
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    "sysctl",
                    "-qw",
                    f"net.ipv6.conf.{conf}.disable_ipv6=1",
                )
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "-n", ns, "link", "add", "br0", "address", BR_MAC, "type", "bridge")
        _run("ip", "-n", ns, "addr", "add", f"{H_ADDR}/24", "dev", "br0")
        _run("ip", "-n", ns, "link", "set", "br0", "up")
        cfg = tmp / "nic.toml"
        cfg.write_text(
            f'[[device]]\ntype = "netvsc"\nmac = "{NIC_MAC}"\nmtu = 1500\nqueues = {cpus}\n'
            + backend(ns)
        )
        sock, control = tmp / "s.sock", tmp / "c.sock"
        g = Guest(
            ns, tmp / "console.txt", tmp / "serve.log", tmp / "netconsole.txt", control, "", cpus
        )
        g.stats = tmp / "st.sock"
        files.append(open(g.netconsole, "wb"))
        procs.append(
            subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-c", LISTENER],
                stdout=files[-1],
                stderr=subprocess.STDOUT,
            )
        )
        _wait_text(g.netconsole, "bound", procs[-1], 20)
        files.append(open(g.serve_log, "wb"))
        procs.append(
            subprocess.Popen(
                [
                    *(VMBUSD, "-v", "serve", "--listen", str(sock), "--control", str(control)),
                    *("--config", str(cfg), "--stats", str(g.stats)),
                ],
                stdout=files[-1],
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        )
        _wait_text(g.serve_log, "listening on", procs[-1], 20)
        kvm_log = tmp / "kvm.log"
        files.append(open(kvm_log, "wb"))
        procs.append(
            subprocess.Popen(
                [
                    *(VMBUSD, "kvm", "--connect", str(sock), "--kernel", str(vmlinux)),
                    *("--cpus", str(cpus)),
                    *("--console", str(g.console), "--append", append),
                    *("--until", "will not match", "--timeout", "900"),
                ],
                stdout=files[-1],
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        )
        attached = _wait_text(kvm_log, "attached to", procs[-1], 30)
        found = re.search(r"attached to \S+ as (\S+);", attached)
        assert found, attached
        g.vm_name = found.group(1)
        g.kvm, g.kvm_log = procs[-1], kvm_log
        _wait_text(g.console, UP, procs[-1], BOOT_TIMEOUT_S)
        yield g
    finally:
        for proc in reversed(procs):
            _stop(proc)
        for f in files:
            f.close()
        _run("ip", "netns", "del", ns, check=False)


@pytest.mark.kvm_linux
@pytest.mark.timeout(400)
def test_hv_netvsc_probes_and_ip_config_brings_eth0_up(guest: Guest) -> None:
    """hv_netvsc negotiated NVSP 6.1 and the receive buffer's sections, got the MAC
    we configured, and IP-Config set eth0 up from `ip=`; vmbusd reset nothing."""
    out = guest.console.read_text(errors="replace")
    assert "hv_vmbus: registering driver hv_netvsc" in out
    assert "Packet too big" not in out and "BUG:" not in out, out[-4000:]
    assert "Negotiated NVSP version:60001" in out, out[-4000:]
    assert re.search(r"hv_netvsc .*Receive sections: 1 sub_allocs: size \d+ count: \d+", out)
    assert "IP-Config: Complete:" in out
    assert f"device=eth0, hwaddr={NIC_MAC}, ipaddr={G_ADDR}, mask=255.255.255.0" in out
    assert "netpoll: netconsole: device eth0 not up yet, forcing it" in out
    served = guest.serve_log.read_text(errors="replace")
    assert "VMBus version 5.3 negotiated" in served
    for bad in ("channel reset", "refused", "Traceback", "ERROR"):
        assert bad not in served, served[-3000:]


# ICMP payload sizes: every IP packet length class up to the 1500-byte MTU (28 bytes of
# IP + ICMP header on top), sent with DF so nothing is fragmented ...
UNFRAGMENTED = (0, 1, 17, 18, 19, 36, 56, 63, 64, 100, 127, 128, 255, 256, 511, 512, 999)
UNFRAGMENTED += (1000, 1024, 1200, 1400, 1450, 1470, 1471, 1472)
# ... and above it, where the host fragments the request and the guest reassembles it
# and fragments its reply (2 to 6 fragments each way, and the last one a small one).
FRAGMENTED = (1473, 1480, 2000, 2952, 2953, 4000, 8000)


@pytest.mark.kvm_linux
@pytest.mark.timeout(400)
def test_guest_answers_arp_and_ping_up_to_the_mtu(guest: Guest) -> None:
    """The guest kernel answers ICMP echo itself, for every size up to the MTU with DF
    and for fragmented ones above it (each reply must come back whole: ping checks
    its payload); its ARP answer carries the configured MAC."""
    failed = []
    for size in UNFRAGMENTED:
        r = guest.ping("-s", str(size), "-M", "do", "-i", "0.2", count=2)
        if " 0% packet loss" not in r.stdout or "wrong data" in r.stdout:
            failed.append((size, r.stdout[-300:], r.stderr))
    for size in FRAGMENTED:
        r = guest.ping("-s", str(size), "-M", "dont", "-i", "0.2", count=2)
        if " 0% packet loss" not in r.stdout or "wrong data" in r.stdout:
            failed.append((size, r.stdout[-300:], r.stderr))
    assert not failed, failed
    # DF above the MTU: the host's own stack refuses it; nothing reaches the guest.
    r = guest.ping("-s", "1473", "-M", "do", count=1)
    assert r.returncode != 0
    r = _run("ip", "-n", guest.ns, "neigh", "show", G_ADDR)
    assert f"lladdr {NIC_MAC}" in r.stdout, r.stdout
    assert "FAILED" not in r.stdout and "INCOMPLETE" not in r.stdout


@pytest.mark.kvm_linux
@pytest.mark.timeout(400)
def test_netconsole_reaches_the_namespace(guest: Guest) -> None:
    """netconsole's UDP datagrams come from 10.99.0.2:6665 to the namespace's
    listener and carry the kernel log: the banner (replayed from the log buffer
    when netconsole registered) and IP-Config's lines printed after it."""
    lines = guest.netconsole.read_text().splitlines()[1:]  # after "bound"
    got = [line.split(" ", 2) for line in lines]
    assert got and all(ip == G_ADDR and port == "6665" for ip, port, _ in got), lines[:3]
    text = b"".join(bytes.fromhex(h) for _, _, h in got).decode(errors="replace")
    assert "Linux version 6.1." in text
    assert "IP-Config: Complete:" in text
    assert UP in text


@pytest.mark.kvm_linux
@pytest.mark.timeout(400)
def test_link_down_then_up_from_vmbusd_ctl(guest: Guest) -> None:
    """`vmbusd ctl nic link down`: hv_netvsc takes the RNDIS MEDIA_DISCONNECT and turns
    its carrier off (the qdisc deactivated), so the guest stops answering ping; `link
    up`: carrier on and it answers again. 6.1's netvsc_link_change prints nothing for
    either (and netdev_notify_peers' gratuitous ARP needs arp_notify, off by default,
    no user space to set it): the console line is rndis_filter's message dump
    (hv_netvsc.debug=12), "RNDIS_MSG_INDICATE (... status 0x4001000c ...)"."""
    assert " 0% packet loss" in guest.ping(count=1).stdout
    r = guest.ctl("nic", "link", "--vm", guest.vm_name, "down")
    assert r.returncode == 0 and "link down; the guest was told" in r.stdout + r.stderr, r
    time.sleep(3)  # the guest's link-watch work runs on its (10x slowed) clock
    r = guest.ping(count=3)
    assert "100% packet loss" in r.stdout, r.stdout
    r = guest.ctl("nic", "link", "--vm", guest.vm_name, "up")
    assert r.returncode == 0 and "link up; the guest was told" in r.stdout + r.stderr, r
    # netvsc_link_change holds a change back until LINKCHANGE_INT (2 guest seconds,
    # ~20 s here) after the previous one
    deadline = time.monotonic() + 120
    while " 0% packet loss" not in guest.ping(count=1).stdout:
        assert time.monotonic() < deadline, "no answer after link up"
    out = guest.console.read_text(errors="replace")
    down, up = (f"RNDIS_MSG_INDICATE (len 20, status {s:#x}," for s in (0x4001000C, 0x4001000B))
    assert down in out and up in out, out[-3000:]
    assert out.index(down) < out.index(up)
    served = guest.serve_log.read_text(errors="replace")
    assert "channel reset" not in served and "Traceback" not in served


@pytest.mark.kvm_linux
@pytest.mark.timeout(400)
def test_every_queue_was_bound(guest: Guest) -> None:
    """Last, as it stops the guest: `vmbusd kvm`'s summary counts one bind per open
    channel: the primary, plus the sub-channel hv_netvsc opened for its second vCPU
    when the NIC offers two queues."""
    assert guest.kvm is not None and guest.kvm_log is not None
    guest.kvm.send_signal(signal.SIGTERM)
    guest.kvm.wait(30)
    text = guest.kvm_log.read_text(errors="replace")
    assert f"{guest.cpus} bind(s)" in text, text[-2000:]
    assert "Traceback" not in text


# --------------------------------------------------------------- the regression


class EarlyNic(NetvscDevice):
    """A loopback NIC the test can reach (the last one built)."""

    last: EarlyNic | None = None

    def __init__(self) -> None:
        super().__init__()
        EarlyNic.last = self


@pytest.mark.devices.with_args(EarlyNic)
async def test_no_frame_before_the_packet_filter(
    local_vm: SimulatedVm, open_channel: object
) -> None:
    """What the real guest found: a frame from the backend (there, the bridge's IPv6
    multicast) sent right after SEND_RECV_BUF_COMPLETE reached Linux 6.1 while
    netvsc_init_buf still waited for that completion: "hv_netvsc ... Packet too big:
    buflen=154 recv_section_size=0", then a NULL write in its interrupt handler
    (Oops, "Fatal exception in interrupt"). The VSP now holds frames back until RNDIS
    is initialized and the guest set a packet filter; the simulated VSC counts a data
    packet before that as the fatal error it is for Linux."""
    gch = await open_channel(local_vm, EarlyNic)  # type: ignore[operator]
    nic = NetvscGuest(local_vm, gch)
    dev = EarlyNic.last
    assert dev is not None
    early = bytes.fromhex("333300000016") + bytes.fromhex(BR_MAC.replace(":", "")) + b"\x86\xdd"
    early += bytes(140 - len(early))  # the size of that IPv6 frame (154 with the RNDIS header)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(nic.receive_loop)
        with trio.fail_after(10):
            await nic.connect()  # NVSP init, receive + send buffers: layout known
            state = dev._nic
            assert state is not None and state.nvsp.receive_layout is not None
            state.deliver(early)  # before RNDIS INITIALIZE
            await trio.sleep(0.05)
            await nic.device_add()  # ends with the packet filter
            assert state.rndis.packet_filter == 0x0D
            state.deliver(b"\xff" * 6 + bytes(54))  # a broadcast, after the filter
            got = await nic.frames.receive()
        nursery.cancel_scope.cancel()
    assert got.frame == b"\xff" * 6 + bytes(54)
    assert state.filtered == 1
    assert nic.received_early == 0 and nic.received_bad == 0
    assert state.rndis.state is rn.State.INITIALIZED
