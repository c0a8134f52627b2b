"""Fuzz target for the KVM VMM's Hyper-V emulation (vmbus/kvm/hyperv.py): what a guest
controls there — MSR writes and reads, hypercall inputs (control word, input GPA or
fast input, the HvPostMessage input page), and the SynIC message and event-flag slots
in its own RAM (native/hyperv.c's slot operations and their Python twin).

The contract: for a valid vCPU, `write_msr` returns a bool (False = #GP),
`read_msr` an int or None, `handle_hypercall` and `signal_port_exit` a 16-bit HV
status, and none of them raises whatever the values and RAM contents; a post reaches
the VMM's handler only with a known connection id, a non-hypervisor type and at most
240 bytes; the host-side `post_message`/`signal_event` (valid arguments) raise at most
MessageQueueFull; interrupts go only to valid vCPUs with vectors >= 16; C slots and
the Python twin leave guest RAM byte-identical and make the same calls; save() then
restore() into a fresh partition gives the same save().

    python tests/fuzz/fuzz_hyperv.py [libFuzzer options] [corpus dirs]

Input: byte 0 is the vCPU count (1-2 used); then up to 24 operations, each an opcode
byte and its operands (MSR index and value from pools of the real MSRs and of page
GPAs inside, at the edge of and outside the fake RAM, or raw; a hypercall's control
word shaped or raw, its input page written first; guest writes into the SIMP/SIEFP
slots as a guest handling a message would; host posts and event flags).
Seeds: Linux 6.1's Hyper-V bring-up as the KVM tier sees it (hv_common / hv_synic_enable
/ vmbus_post_msg / vmbus_set_event; tests/fuzz/record_seeds.py).
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness, when imported by path
import harness

with harness.instrumented():
    from vmbus import native
    from vmbus.kvm import hyperv as hv

RAM_LOW = 0x10000  # RAM is [0, 64 KiB) and [1 MiB, 1 MiB + 32 KiB): a hole between
RAM_HIGH = 0x100000
RAM_END = 0x108000
MAX_OPS = 24
_MSRS = (
    hv.HV_X64_MSR_GUEST_OS_ID,
    hv.HV_X64_MSR_HYPERCALL,
    hv.HV_X64_MSR_VP_INDEX,
    hv.HV_X64_MSR_SCONTROL,
    hv.HV_X64_MSR_SIEFP,
    hv.HV_X64_MSR_SIMP,
    hv.HV_X64_MSR_EOM,
    hv.HV_X64_MSR_SINT0 + 2,
    hv.HV_X64_MSR_SINT0,
    hv.HV_X64_MSR_SINT15,
    hv.HV_X64_MSR_VP_ASSIST_PAGE,
    hv.HV_X64_MSR_TSC_INVARIANT_CONTROL,
    hv.HV_X64_MSR_TSC_FREQUENCY,
    hv.HV_X64_MSR_REFERENCE_TSC,
    hv.HV_X64_MSR_SVERSION,
    0x40000100,
)
_PAGES = (0x1000, 0x2000, 0x3000, 0x4000, 0xF000, RAM_LOW, RAM_HIGH, RAM_END - 0x1000, RAM_END,
          0x80000, 0xFFFF_FFFF_FFFF_F000)  # fmt: skip
_LINUX_OS_ID = 0x8100_0000_0601_0000
_CONTROLS = (
    hv.HVCALL_POST_MESSAGE,
    hv.HVCALL_SIGNAL_EVENT | hv.HV_HYPERCALL_FAST_BIT,
    hv.HVCALL_SIGNAL_EVENT,
    hv.HVCALL_POST_MESSAGE | hv.HV_HYPERCALL_FAST_BIT,
    hv.HVCALL_POST_MESSAGE | 1 << 32,
    0x0002,
)


class FakeRam:
    """Two RAM regions with a hole between, behind the SynicRam interface."""

    def __init__(self) -> None:
        self.low = bytearray(RAM_LOW)
        self.high = bytearray(RAM_END - RAM_HIGH)

    def _where(self, gpa: int, length: int) -> tuple[bytearray, int] | None:
        if 0 <= gpa and gpa + length <= RAM_LOW:
            return self.low, gpa
        if RAM_HIGH <= gpa and gpa + length <= RAM_END:
            return self.high, gpa - RAM_HIGH
        return None

    def contains(self, gpa: int, length: int) -> bool:
        return self._where(gpa, length) is not None

    def _at(self, gpa: int, length: int) -> tuple[bytearray, int]:
        got = self._where(gpa, length)
        assert got is not None, f"the core touched GPA {gpa:#x}+{length:#x} outside RAM"
        return got

    def read(self, gpa: int, length: int) -> bytes:
        buf, off = self._at(gpa, length)
        return bytes(buf[off : off + length])

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        buf, off = self._at(gpa, len(data))
        buf[off : off + len(data)] = data

    def slice(self, gpa: int, length: int) -> memoryview:
        buf, off = self._at(gpa, length)
        return memoryview(buf)[off : off + length]


class Vmm:
    """Injector and hypercall handlers, recording every call."""

    def __init__(self, vcpus: int) -> None:
        self.vcpus = vcpus
        self.calls: list[Any] = []

    def inject(self, vcpu: int, vector: int) -> None:
        assert 0 <= vcpu < self.vcpus and 16 <= vector <= 255, (vcpu, vector)
        self.calls.append(("irq", vcpu, vector))

    def on_post(self, connection_id: int, message_type: int, payload: bytes) -> int:
        assert connection_id in hv.DEFAULT_MESSAGE_CONNECTION_IDS
        assert message_type and not message_type & hv.HV_MESSAGE_TYPE_HYPERVISOR
        assert len(payload) <= hv.HV_MESSAGE_PAYLOAD_BYTE_COUNT
        self.calls.append(("post", connection_id, message_type, payload))
        return hv.HV_STATUS_SUCCESS if payload[:1] != b"\xff" else hv.HV_STATUS_INSUFFICIENT_BUFFERS

    def on_signal(self, connection_id: int) -> int:
        self.calls.append(("signal", connection_id))
        return (
            hv.HV_STATUS_SUCCESS if connection_id == 0x2000 else hv.HV_STATUS_INVALID_CONNECTION_ID
        )


def partition(vcpus: int, use_native: bool) -> tuple[hv.HyperVPartition, FakeRam, Vmm]:
    ram, vmm = FakeRam(), Vmm(vcpus)
    part = hv.HyperVPartition(ram, vmm, vcpus=vcpus, on_post=vmm.on_post,
                              on_signal=vmm.on_signal, tsc_frequency_hz=2_500_000_000,
                              use_native=use_native)  # fmt: skip
    return part, ram, vmm


def value(r: harness.Reader) -> int:
    k = r.byte() % 6
    if k == 0:
        return r.u64()
    if k == 1:
        return _LINUX_OS_ID
    if k == 2:  # a vector, masked or not, polling or not
        return r.byte() | r.pick((0, 0, hv.HV_SYNIC_SINT_MASKED, hv.HV_SYNIC_SINT_POLLING)) << 0
    return r.pick(_PAGES) | (1 if k != 5 else 0)


def operation(r: harness.Reader, vcpus: int) -> tuple[Any, ...]:
    """One operation, decoded once so that both partitions get exactly the same one."""
    op = r.byte() % 9
    vcpu = r.byte() % vcpus
    if op in (0, 1):
        msr = r.pick(_MSRS) if r.byte() & 0x7F else 0x40000000 + r.u16() % 0x200
        return ("wrmsr" if op == 0 else "rdmsr", vcpu, msr, value(r))
    if op == 2:
        control = r.pick(_CONTROLS) if r.byte() & 0x3F else r.u64()
        gpa = r.pick(_PAGES) + r.pick((0, 0, 8, 3, 4096 - 256, 4096 - 248, 1 << 40))
        post = struct.pack(
            "<IIII",
            r.pick((1, 4, 1, 2, 0x1000000)),
            r.pick((0, 0, 1)),
            r.pick((1, 1, 0, 0x80000001)),
            r.pick((0, 8, 240, 241, 0xFFFFFFFF)),
        )
        page = post + r.take(r.byte() % 64)  # fmt: skip
        fast_input = r.pick((0x2000, 0x2001, 1 << 32, 1 << 24, 0xFFFFFFFFFFFFFFFF))
        return ("hypercall", vcpu, control, gpa, page, fast_input)
    if op == 3:  # the guest takes the message in a slot: clear its type, maybe EOM
        return ("take", vcpu, r.byte() % 16, r.byte() & 1)
    if op == 4:  # the guest scribbles on a slot (or anywhere in its SIMP/SIEFP page)
        return ("scribble", vcpu, r.byte() % 2, r.u16() % 4096, r.take(r.byte() % 16))
    if op == 5:
        payload = r.take(r.pick((0, 8, 240, 16)))
        return ("post", vcpu, r.pick((2, 2, 0, 15)), r.pick((1, 0x80000000, 0xFFFFFFFF)), payload)
    if op == 6:
        return ("event", vcpu, r.pick((2, 2, 0, 15)), r.u16() % hv.HV_EVENT_FLAGS_COUNT)
    if op == 7:
        return ("port", vcpu, r.u32())
    return ("retry", vcpu)


def apply(part: hv.HyperVPartition, ram: FakeRam, o: tuple[Any, ...]) -> Any:
    kind, vcpu = o[0], o[1]
    if kind == "wrmsr":
        got = part.write_msr(vcpu, o[2], o[3])
        assert isinstance(got, bool)
        return got
    if kind == "rdmsr":
        got = part.read_msr(vcpu, o[2])
        assert got is None or 0 <= got < 1 << 64
        return got
    if kind == "hypercall":
        _, _, control, gpa, page, fast_input = o
        if ram.contains(gpa, len(page)):
            ram.write(gpa, page)
        fast = control & hv.HV_HYPERCALL_FAST_BIT
        status = part.handle_hypercall(vcpu, control, fast_input if fast else gpa, 0)
        assert 0 <= status <= 0xFFFF
        return status
    if kind in ("take", "scribble"):
        vp = part.vps[vcpu]
        reg = vp.simp if kind == "take" or o[2] == 0 else vp.siefp
        if not reg & 1:
            return None
        base = reg & ~0xFFF
        if kind == "take":
            ram.write(base + o[2] * hv.HV_MESSAGE_SIZE, bytes(4))
            if o[3]:
                assert part.write_msr(vcpu, hv.HV_X64_MSR_EOM, 0)
        elif ram.contains(base + o[3], len(o[4])):
            ram.write(base + o[3], o[4])
        return None
    if kind == "post":
        try:
            part.post_message(vcpu, o[2], o[3], o[4])
        except hv.MessageQueueFull:
            return "full"
        return None
    if kind == "event":
        part.signal_event(vcpu, o[2], o[3])
        return None
    if kind == "port":
        status = part.signal_port_exit(vcpu, o[2])
        assert 0 <= status <= 0xFFFF
        return status
    part.retry(vcpu)
    return None


def check_one(data: bytes) -> None:
    r = harness.Reader(data)
    vcpus = 1 + r.byte() % 2
    flavours = [False, True] if native.native_available() else [False]
    runs = [partition(vcpus, use_native) for use_native in flavours]
    ops = [operation(r, vcpus) for _ in range(MAX_OPS) if r.more()]
    outcomes = []
    for part, ram, vmm in runs:
        results = [apply(part, ram, o) for o in ops]
        state = part.save()
        again, _, _ = partition(vcpus, False)
        again.restore(state)
        assert again.save() == state
        outcomes.append((results, vmm.calls, bytes(ram.low), bytes(ram.high), state))
    if len(outcomes) == 2:
        assert outcomes[0] == outcomes[1], "C slots and the Python twin disagree"


main = harness.main_for(check_one)

if __name__ == "__main__":
    main(sys.argv)
