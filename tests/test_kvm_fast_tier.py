"""The fast tier (issue 8 part 4, and its "Bad input"): a tiny guest of our own, run by
the real KvmVm against a real `vmbusd serve` subprocess, walks the emulated Hyper-V
surface the way hv_vmbus does, in seconds. tests/kvm_fast_guest.S sets up its own IDT and
enables the in-kernel LAPIC, so every host -> guest message and event arrives by a
real interrupt (`sti; hlt`), not by polling:

CPUID leaves and MSRs; the hypercall page; every bad input of the issue's list, each
answered with its TLFS status or #GP; INITIATE_CONTACT -> VERSION_RESPONSE in SIMP slot
2; REQUESTOFFERS with the SIMP moved while a message sits in its slot; GPADL + OPENCHANNEL
for the echo offer's ring; a packet and a fast HvSignalEvent that reaches vmbusd's kick
eventfd inside KVM (no exit), and the echo coming back with its relid's SIEFP bit.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import require_tool

from devices.echo.protocol import ECHO_IF_TYPE
from vmbus import attach
from vmbus import protocol as p
from vmbus.gpadl import GpaRange
from vmbus.kvm import hyperv as hv
from vmbus.kvm import vmm
from vmbus.kvm.machine import StopReason
from vmbus.packet import PacketType
from vmbus.ring import init_ring_header

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="/dev/kvm is absent")

HERE = Path(__file__).parent
TEXT = 0x1000000  # where vmlinux's text goes: the guest is loaded like it
MEM = 64 << 20
OUTSIDE = 0x80000000  # what the guest uses for "outside RAM" (above 64 MiB, below 4 GiB)
MONITOR_PAGES = (0x3000000, 0x3001000)  # in RAM, unused by the guest
GPADL = 0xE1E1
PAGE = 4096
FINISHED = 0x31

# results slots (kvm_fast_guest.S)
CPUID0, GUEST_OS_ID, VP_INDEX, TSC_FREQ, APIC_FREQ, SVERSION, HYPERCALL = 0, 24, 25, 26, 27, 28, 29
BAD = {  # slot: (what, TLFS status in rax)
    32: ("HvPostMessage input outside RAM", hv.HV_STATUS_INVALID_ALIGNMENT),
    33: ("HvPostMessage input above the GPA space", hv.HV_STATUS_INVALID_ALIGNMENT),
    34: ("HvPostMessage input crossing a page", hv.HV_STATUS_INVALID_ALIGNMENT),
    35: ("a message of 241 bytes", hv.HV_STATUS_INVALID_PARAMETER),
    36: ("an unknown hypercall code", hv.HV_STATUS_INVALID_HYPERCALL_CODE),
    37: ("HvPostMessage as a fast call", hv.HV_STATUS_INVALID_HYPERCALL_INPUT),
    38: ("a reserved control bit", hv.HV_STATUS_INVALID_HYPERCALL_INPUT),
    39: ("slow HvSignalEvent input outside RAM", hv.HV_STATUS_INVALID_ALIGNMENT),
    40: ("an unknown connection, output GPA outside RAM", hv.HV_STATUS_INVALID_CONNECTION_ID),
}
GP = {  # slot: (what, 1 = #GP)
    41: ("SIMP outside RAM", 1),
    43: ("SIEFP outside RAM", 1),
    45: ("SINT2 with reserved vector 5", 1),
    47: ("SINT3 masked with vector 5 (allowed, as KVM)", 0),
    48: ("EOM with nothing pending", 0),
    49: ("VP_INDEX written (read-only)", 1),
    50: ("an MSR not offered, read", 1),
    51: ("the hypercall page outside RAM", 1),
    52: ("an MSR not offered, written", 1),
    60: ("the SIMP moved while its slot holds a message", 0),
    53: ("the SIEFP moved while a flag is set", 0),
}
SIMP_AFTER, SIEFP_AFTER, SINT2_AFTER, MOVED_SLOT_TYPE, MOVED_FLAGS = 42, 44, 46, 61, 54
POST_INITIATE, POST_REQUEST, POST_GPADL, POST_OPEN, SIGNAL, SIGNAL2 = 56, 57, 58, 59, 62, 63
IRQS, MSGS, SPURIOUS, STAGE = 64, 65, 66, 67


@dataclass
class Guest:
    image: bytes
    sym: dict[str, int]


@pytest.fixture(scope="module")
def g(tmp_path_factory: pytest.TempPathFactory) -> Guest:
    gas = require_tool("as", "binutils")
    ld = require_tool("ld", "binutils")
    nm = require_tool("nm", "binutils")
    d = tmp_path_factory.mktemp("fast")
    obj, elf = d / "g.o", d / "g.elf"
    subprocess.run([gas, "--64", "-o", str(obj), str(HERE / "kvm_fast_guest.S")], check=True)
    link = [ld, "-m", "elf_x86_64", "-static", f"-Ttext={TEXT:#x}", "-e", "_start"]
    subprocess.run([*link, "-o", str(elf), str(obj)], check=True)
    out = subprocess.run([nm, str(elf)], check=True, capture_output=True, text=True).stdout
    sym = {q[2]: int(q[0], 16) for q in (ln.split() for ln in out.splitlines()) if len(q) == 3}
    return Guest(elf.read_bytes(), sym)


def post_input(connection_id: int, payload: bytes, *, size: int | None = None) -> bytes:
    """An HvPostMessage input page: connection id, reserved, type 1 (VMBus), size, payload."""
    n = len(payload) if size is None else size
    body = struct.pack("<IIII", connection_id, 0, vmm.HVMSG_VMBUS, n) + payload
    assert len(body) <= 256
    return body + bytes(256 - len(body))


ECHO_BODIES = (b"ping!!!!", b"pong????")
TRANS_ID = 0x77


def echo_packet(body: bytes, start: int) -> bytes:
    """One inband packet as the ring holds it: descriptor, body, trailer (its start)."""
    desc = struct.pack("<HHHHQ", PacketType.INBAND, 2, (16 + len(body)) // 8, 0, TRANS_ID)
    return desc + body + struct.pack("<Q", start << 32)


class RecordingExit:
    """Port 0xf4: the guest's last word (0x31 finished, 0xee an unexpected exception)."""

    def __init__(self, vm: vmm.KvmVm) -> None:
        self.vm = vm
        self.codes: list[int] = []

    def io_read(self, port: int, size: int) -> int:
        return 0xFF

    def io_write(self, port: int, size: int, value: int) -> None:
        self.codes.append(value)
        self.vm.machine.request_stop(StopReason("debug-exit", code=value))


def prepare(vm: vmm.KvmVm, g: Guest) -> None:
    """What the guest cannot build itself: the message inputs and the ring."""
    ram, s = vm.machine.ram, g.sym
    contact = p.InitiateContact(
        p.VERSION_WIN10_V5_3, 0, p.InitiateContact.sint_field(2), *MONITOR_PAGES
    )
    ring = s["ring"]
    pfns = tuple((ring >> 12) + i for i in range(4))
    ranges = p.encode_gpa_ranges([GpaRange(4 * PAGE, 0, pfns)])
    posts = [
        post_input(hv.VMBUS_MESSAGE_CONNECTION_ID_4, contact.encode()),
        post_input(1, p.RequestOffers().encode()),
        post_input(1, p.GpadlHeader(0, GPADL, len(ranges), 1, ranges).encode()),
        post_input(1, p.OpenChannel(0, 1, GPADL, 0, 2).encode()),
        post_input(1, bytes(240), size=241),
        post_input(0x77, p.RequestOffers().encode()),
    ]
    ram.write(s["posts"], b"".join(posts))
    hdr = bytearray(PAGE)
    init_ring_header(hdr)
    ram.write(ring, bytes(hdr))
    ram.write(ring + 2 * PAGE, bytes(hdr))
    one = echo_packet(ECHO_BODIES[0], 0)
    two = echo_packet(ECHO_BODIES[1], len(one))
    ram.write(ring + PAGE, one + two)
    ram.write(s["pktlen"], struct.pack("<Q", len(one)))
    ram.write(s["pktlen2"], struct.pack("<Q", len(one) + len(two)))


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    sock: Path
    log: Path


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """`vmbusd serve` with its default configuration (one echo device)."""
    exe = str(Path(sys.executable).with_name("vmbusd"))
    sock, log = tmp_path / "s.sock", tmp_path / "vmbusd.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [exe, "-v", "serve", "--listen", str(sock)],
            stdout=f,
            stderr=f,
            stdin=subprocess.DEVNULL,
        )
    deadline = time.monotonic() + 20
    while "listening on" not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
        time.sleep(0.05)
    yield Served(proc, sock, log)
    proc.terminate()
    proc.wait(10)


async def test_hyperv_surface_and_bad_input_against_vmbusd(g: Guest, served: Served) -> None:
    """The whole chain in one guest run (each step a check, in the order it happens);
    the guest records what it saw, the test compares it with the TLFS and vmbusd."""
    vm = vmm.KvmVm(g.image, mem_size=MEM, vcpus=1, vm_id="kvm-fast")
    exit_port = RecordingExit(vm)
    vm.machine.add_port_device(0xF4, 1, exit_port)
    try:
        prepare(vm, g)
        conn = await attach.connect(str(served.sock))
        try:
            await vm.start_session(conn)
            t0 = time.monotonic()
            result = await vm.run(timeout=30)
            elapsed = time.monotonic() - t0
        finally:
            await conn.aclose()
        ram, s = vm.machine.ram, g.sym
        r = struct.unpack("<512Q", ram.read(s["results"], 4096))
        log = served.log.read_text(errors="replace")
        where = f"stage {r[STAGE]}, {result}, exit {exit_port.codes}\n{log[-3000:]}"
        assert exit_port.codes == [FINISHED], where
        assert r[STAGE] == 10 and elapsed < 20, where

        # CPUID: every Hyper-V leaf the VMM defines, as the guest saw it
        leaves = hv.HyperVCpuid().overrides()
        for i, leaf in enumerate(range(0x40000000, 0x40000006)):
            if (leaf, 0) in leaves:
                assert r[4 * i : 4 * i + 4] == leaves[(leaf, 0)], hex(leaf)
        assert struct.pack("<III", *r[1:4]) == b"Microsoft Hv"
        assert r[4] == int.from_bytes(b"Hv#1", "little")

        # the MSRs
        assert r[GUEST_OS_ID] == 0x8100_0000_0601_0000
        assert r[VP_INDEX] == 0
        assert r[TSC_FREQ] == vm.tsc_khz * 1000 * vmm.TIME_SCALE
        assert r[APIC_FREQ] == vm.part.apic_frequency_hz * vmm.TIME_SCALE
        assert r[SVERSION] == 1
        assert r[HYPERCALL] == s["hcpage"] | 1
        assert ram.read(s["hcpage"], len(vm.stub.code)) == vm.stub.code

        # bad input: the TLFS statuses and #GPs, and nothing changed by a refused write
        got = {slot: (what, r[slot]) for slot, (what, _) in (BAD | GP).items()}
        assert got == BAD | GP
        assert r[SIMP_AFTER] == s["simp"] | 1
        assert r[SIEFP_AFTER] == s["siefp"] | 1
        assert r[SINT2_AFTER] == 0xF3

        # the bus: every post accepted; the message moved with the SIMP
        assert [r[POST_INITIATE], r[POST_REQUEST], r[POST_GPADL], r[POST_OPEN]] == [0] * 4
        assert r[MOVED_SLOT_TYPE] == vmm.HVMSG_VMBUS
        msgs = []
        for k in range(r[MSGS]):
            raw = ram.read(s["msglog"] + 256 * k, 256)
            mtype, size = struct.unpack_from("<IB", raw)
            assert mtype == vmm.HVMSG_VMBUS
            msgs.append(p.decode(raw[16 : 16 + size]))
        assert [type(m) for m in msgs] == [
            p.VersionResponse,
            p.OfferChannel,
            p.AllOffersDelivered,
            p.GpadlCreated,
            p.OpenChannelResult,
        ], msgs
        version, offer, _, created, opened = msgs
        assert isinstance(version, p.VersionResponse) and version.version_supported == 1
        assert isinstance(offer, p.OfferChannel) and offer.if_type == ECHO_IF_TYPE
        assert isinstance(created, p.GpadlCreated) and created.status == 0
        assert (created.child_relid, created.gpadl) == (offer.child_relid, GPADL)
        assert isinstance(opened, p.OpenChannelResult) and opened.status == 0
        assert vm.counters.binds == 1

        # the signals: taken by the ioeventfd inside KVM; each echo back in the receive
        # ring, and the relid's SIEFP bit raised the interrupt (the second one's flag
        # moved with the SIEFP)
        assert r[SIGNAL] == r[SIGNAL2] == hv.HV_STATUS_SUCCESS
        assert vm.counters.unmatched_signals == 0
        ring = s["ring"]
        write_index, read_index = struct.unpack("<II", ram.read(ring + 2 * PAGE, 8))
        size = len(echo_packet(ECHO_BODIES[0], 0))
        assert (write_index, read_index) == (2 * size, size)
        back = ram.read(ring + 3 * PAGE, write_index)
        for k, body in enumerate(ECHO_BODIES):
            assert struct.unpack_from("<H", back, k * size)[0] == PacketType.INBAND
            assert back[k * size + 16 : k * size + 16 + len(body)] == body
        relid = offer.child_relid
        bit = 1 << relid
        assert r[MOVED_FLAGS] == bit
        events = ram.read(s["events"], 256)
        assert int.from_bytes(events, "little") == bit, events.hex()
        assert vm.counters.calls >= 2
        assert ram.read(s["siefp2"] + 512, 256) == bytes(256)  # the handler took it

        # interrupts: the messages' and the event's came, and no stray vector
        assert r[SPURIOUS] == 0
        assert r[IRQS] >= 2
        # vmbusd lives on, and refused nothing but what the guest got statuses for
        assert served.proc.poll() is None
        assert "Traceback" not in log
    finally:
        vm.close()
