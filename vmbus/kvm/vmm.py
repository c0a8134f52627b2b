"""The KVM VMM for the real Linux guest: a `Machine` with Hyper-V emulated in user space,
booting a `vmlinux`, speaking the VMM side of the attach protocol to `vmbusd serve`.

What is wired to what (docs/kvm.md, docs/attach-protocol.md "Mapping onto KVM"):
- CPUID: the Hyper-V leaves ("Microsoft Hv" at 0x40000000, no KVM signature), the
  hypervisor bit, and on kvm_pvm what vmbus.kvm.pvm hides;
- RDMSR/WRMSR of 0x40000000-0x400001ff (the machine's MSR filter) -> `HyperVPartition`;
- the hypercall page's stub ports: HYPERCALL_PORT exits -> `handle_hypercall`
  (HvPostMessage -> attach `post`); SIGNAL_PORT carries the guest's fast HvSignalEvent:
  a PIO ioeventfd per bound channel (datamatch = its connection id) fires the channel's
  kick eventfd inside KVM; a write no ioeventfd took exits -> `signal_port_exit`;
- attach `post` -> `post_message(vcpu, sint, HVMSG 1, payload)` into the SIMP slot;
  attach `bind` -> the ioeventfd plus a trio task per call eventfd that turns a readable
  call (however many signals it counted) into one SIEFP bit + one MSI (`signal_event`);
  `unbind` -> deassign, stop watching, close; `error` -> the VM stops, saying why;
- restart (feature saved-state, docs/attach-protocol.md "Restart"): when vmbusd goes away
  (EOF, or `error shutdown`) the guest runs on with every binding, its kick/call eventfds
  and ioeventfds as they are (signals count up in the kick eventfds meanwhile); guest posts
  queue up to POST_QUEUE, then HV_STATUS_INSUFFICIENT_BUFFERS (the guest retries); the VMM
  reconnects with backoff, sends `resume` with the newest `state` and the bindings, replays
  the posts vmbusd had not handled, or gives up after `reconnect_timeout`;
- ACPI with the VMBus device, the 16550 console on COM1, vmlinux loaded at its 64-bit
  entry with the command line of `kernel_cmdline`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from vmbus import attach
from vmbus import eventfd as _eventfd
from vmbus.kvm import boot, pvm, snapshot
from vmbus.kvm import hyperv as hv
from vmbus.kvm.acpi import build_acpi
from vmbus.kvm.hypercall_page import HypercallStub
from vmbus.kvm.machine import LAPIC_GPA, Machine, StopReason, Vcpu, VcpuFault, current_vcpu
from vmbus.kvm.serial import COM1_IRQ, COM1_PORT, Console, Serial16550

log = logging.getLogger(__name__)

VMBUS_SINT = attach.VMBUS_MESSAGE_SINT  # 2: Linux's VMBUS_MESSAGE_SINT
HVMSG_VMBUS = 1  # the message type of a VMBus channel message (Linux: vmbus_post_msg)
TIME_SCALE = 10  # the guest sees a 10x faster TSC/APIC: its time runs 10x slower
GUEST_HZ = 250  # CONFIG_HZ of the guest-kernel build (lpj is per tick)
ACPI_GPA = boot.ACPI_GPA
LOG_LIMIT = 256  # control messages kept each way (KvmVm.guest_log / host_log) for tests
POST_QUEUE = 16  # unsent guest posts before HV_STATUS_INSUFFICIENT_BUFFERS (Hyper-V: 16)
PYTHON_SLOTS_RETRY_S = 0.01  # the twin slot path's retry() period (see hyperv._PySlots)
QUEUE_FULL_WAIT_S = 0.01
# Restart (as the simulated VM, vmbus/guest/vm.py): how long to wait for a vmbusd that went
# away, the backoff between connection attempts (doubling), and the posts kept for a resume.
RECONNECT_TIMEOUT_S = 10.0
MAX_UNACKED_POSTS = 4096  # beyond, vmbusd sends no states (a device that cannot restart)

# the SynIC registers hv_synic_enable_regs writes (SIMP first), before INITIATE_CONTACT
SYNIC_MSRS = frozenset(
    {hv.HV_X64_MSR_SCONTROL, hv.HV_X64_MSR_SIEFP, hv.HV_X64_MSR_SIMP}
    | set(range(hv.HV_X64_MSR_SINT0, hv.HV_X64_MSR_SINT15 + 1))
)

# 8250.nr_uarts=1: without it Linux spends ~15 s of emulated time probing three absent
# 16550s. loglevel=8: pr_debug is KERN_DEBUG, which the default console level (7) keeps
# off the console, so without it `hv_vmbus.dyndbg=+p` shows nothing there. (6.1's
# hv_vmbus has no pr_debug on the offer path; an offer shows as "Unknown GUID" for a
# class Linux has no driver for, or as the driver's own probe lines.)
BASE_APPEND = "8250.nr_uarts=1 loglevel=8 hv_vmbus.dyndbg=+p"


def kernel_cmdline(tsc_khz: int, *, on_pvm: bool, append: str = "") -> str:
    """The guest's command line: boot.linux_cmdline (serial console, no PCI, lpj from the
    TSC the guest sees, the PVM workarounds on kvm_pvm), VMBus dynamic debug, then the
    user's --append."""
    extra = f"{BASE_APPEND} {append}".strip()
    return boot.linux_cmdline(
        tsc_khz, hz=GUEST_HZ, tsc_scale=TIME_SCALE, on_pvm=on_pvm, extra=extra
    )


class KvmVmError(Exception):
    """The VM could not be built or run (a bad kernel image, KVM refusing a step)."""


@dataclass
class RunResult:
    """How a run ended: 'until' (the console matched), 'timeout', 'vmbusd' (vmbusd
    ended the session), 'fault' (the guest did something the VMM cannot handle),
    'stopped' (the guest or a signal stopped it)."""

    outcome: str
    detail: str = ""
    elapsed: float = 0.0
    match: str | None = None


class _MsiInjector:
    """hyperv.Injector: a fixed, edge MSI to the vCPU's local APIC (APIC id = index)."""

    def __init__(self, machine: Machine) -> None:
        self._vm = machine.vm

    def inject(self, vcpu: int, vector: int) -> None:
        self._vm.signal_msi(LAPIC_GPA | (vcpu << 12), vector)


class _SignalPort:
    """The stub's SIGNAL_PORT when no ioeventfd took the write: the status into rcx."""

    def __init__(self, part: hv.HyperVPartition) -> None:
        self._part = part

    def io_read(self, port: int, size: int) -> int:
        return 0xFFFFFFFF

    def io_write(self, port: int, size: int, value: int) -> None:
        vcpu = current_vcpu()
        regs = vcpu.fd.get_regs()
        regs.rcx = self._part.signal_port_exit(vcpu.id, value)
        vcpu.fd.set_regs(regs)


class _HypercallPort:
    """The stub's HYPERCALL_PORT: rcx/rdx/r8 as the guest left them, the status into rax."""

    def __init__(self, part: hv.HyperVPartition) -> None:
        self._part = part

    def io_read(self, port: int, size: int) -> int:
        return 0xFFFFFFFF

    def io_write(self, port: int, size: int, value: int) -> None:
        vcpu = current_vcpu()
        regs = vcpu.fd.get_regs()
        regs.rax = self._part.handle_hypercall(vcpu.id, regs.rcx, regs.rdx, regs.r8)
        vcpu.fd.set_regs(regs)


@dataclass
class _Binding:
    bind: attach.Bind
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    ioeventfd: bool = False


@dataclass
class Counters:
    """What crossed the VMM, for the summary line and tests."""

    guest_posts: int = 0
    host_posts: int = 0
    binds: int = 0
    unbinds: int = 0
    calls: int = 0  # call-eventfd wake-ups (each one SIEFP set + at most one MSI)
    unmatched_signals: int = 0
    reconnects: int = 0  # sessions resumed with a new vmbusd
    replayed_posts: int = 0  # guest posts sent again to a new vmbusd after a resume
    refused_posts: int = 0  # HV_STATUS_INSUFFICIENT_BUFFERS answers (queue full)


class KvmVm:
    """One KVM VM running a Linux vmlinux whose hv_vmbus talks to vmbusd."""

    def __init__(
        self,
        vmlinux: bytes | None,
        *,
        mem_size: int = 256 << 20,
        vcpus: int = 1,
        append: str = "",
        console_sink: Callable[[bytes], None] | None = None,
        vm_id: str | None = None,
        snapshot_at_synic: bool = False,
        reconnect: Callable[[], Awaitable[attach.AttachConnection]] | None = None,
        reconnect_timeout: float = RECONNECT_TIMEOUT_S,
    ) -> None:
        """vmlinux None: nothing is loaded (a snapshot is restored into it next).
        snapshot_at_synic: stop at the guest's first SynIC register write (run()
        returns outcome 'snapshot'; then `save_snapshot`).
        reconnect: opens a new connection to the same vmbusd socket; with it the VMM
        names feature saved-state and the guest outlives its vmbusd (restart), giving
        up after `reconnect_timeout` seconds without one (`gave_up`)."""
        self.snapshot_at_synic = snapshot_at_synic
        self.reconnect = reconnect
        self.reconnect_timeout = reconnect_timeout
        self.vcpus = vcpus
        self.vm_id = vm_id or f"kvm-{os.getpid()}"
        self.on_pvm = pvm.is_pvm()
        cpuid = hv.HyperVCpuid()
        edits = [pvm.hide_features] if self.on_pvm else []
        edits.append(hv.HyperVCpuid.set_hypervisor_bit)
        self.machine = Machine(
            mem_size,
            vcpus,
            cpuid=dict(cpuid.overrides()),
            cpuid_edits=edits,
            user_msr_ranges=(hv.HV_MSR_RANGE,),
        )
        try:
            self._setup(vmlinux, append, console_sink)
        except BaseException:
            self.machine.close()
            raise

    def _setup(
        self, vmlinux: bytes | None, append: str, console_sink: Callable[[bytes], None] | None
    ) -> None:
        m = self.machine
        self.pvm_hook = pvm.install(m)
        self.console = Console(console_sink)
        self.serial = Serial16550(self.console.write, lambda level: m.irq_line(COM1_IRQ, level))
        m.add_port_device(COM1_PORT, 8, self.serial)
        self.tsc_khz = m.vcpus[0].fd.tsc_khz()
        self.stub = HypercallStub()
        self.part = hv.HyperVPartition(
            m.ram,
            _MsiInjector(m),
            vcpus=self.vcpus,
            on_post=self._on_guest_post,
            on_signal=self._on_unmatched_signal,
            tsc_frequency_hz=self.tsc_khz * 1000,
            time_scale=TIME_SCALE,
            stub=self.stub,
        )
        m.rdmsr = lambda vcpu, index: self.part.read_msr(vcpu.id, index)
        m.wrmsr = self._wrmsr
        m.add_port_device(self.stub.signal_port, 1, _SignalPort(self.part))
        m.add_port_device(self.stub.hypercall_port, 1, _HypercallPort(self.part))
        tables = build_acpi(ACPI_GPA, self.vcpus)
        self.cmdline = kernel_cmdline(self.tsc_khz, on_pvm=self.on_pvm, append=append)
        self.boot_info: boot.BootInfo | None = None
        if vmlinux is not None:
            try:
                self.boot_info = boot.boot_elf(
                    m,
                    vmlinux,
                    self.cmdline,
                    acpi=tables.blob,
                    acpi_gpa=tables.base_gpa,
                    rsdp_gpa=tables.rsdp_addr,
                )
            except boot.BootError as exc:
                raise KvmVmError(f"cannot boot this kernel: {exc}") from exc
        self.counters = Counters()
        # the first LOG_LIMIT VMBus control messages each way: (connection id or vCPU, bytes)
        self.guest_log: list[tuple[int, bytes]] = []
        self.host_log: list[tuple[int, bytes]] = []
        self.conn: attach.AttachConnection | None = None
        self._bindings: dict[int, _Binding] = {}
        self._by_connection: dict[int, int] = {}  # connection id -> kick fd
        self._post_send, self._post_recv = trio.open_memory_channel[attach.PostFromGuest](
            POST_QUEUE
        )
        self._nursery: trio.Nursery | None = None
        self.ended: str | None = None  # why the attach session ended, once it has
        # Restart support (feature saved-state): what we hold for the next vmbusd.
        self.saved_state = False  # negotiated on the current connection
        self._state_fd: int | None = None  # the newest `state`'s blob
        self._inflight_fd: int | None = None  # the session's in-flight region
        self._applied = 0  # post/bind/unbind applied since that state
        self._posts_sent = 0  # posts numbered over the VM's life (vmbusd counts them too)
        self._unacked: deque[tuple[int, attach.PostFromGuest]] = deque()
        self._acked_posts = 0  # the newest state's `posts`
        self._dropped_posts = 0  # posts below this number were forgotten unacknowledged
        self._send_lock = trio.Lock()  # the post sender vs a resume's replay
        self._link_up = False  # posts go out; else they wait (and the queue fills)
        self._link_event = trio.Event()  # set while the link is up
        self._resumed = False  # resumed once: a bind replacing a kept binding is expected
        self.gave_up = False  # vmbusd did not come back within reconnect_timeout

    # ---------------------------------------------------------------- vCPU side

    def _wrmsr(self, vcpu: Vcpu, index: int, value: int) -> bool:
        ok = self.part.write_msr(vcpu.id, index, value)
        if self.snapshot_at_synic and ok and index in SYNIC_MSRS:
            self.snapshot_at_synic = False  # the first one only
            self.machine.request_stop(StopReason("snapshot", vcpu.id, index))
        return ok

    def _on_guest_post(self, connection_id: int, message_type: int, payload: bytes) -> int:
        """HvPostMessage on connection 1 or 4 (the partition refused the rest), on a vCPU
        thread: queue it for the sender task without waiting for the socket."""
        if message_type != HVMSG_VMBUS:
            return hv.HV_STATUS_INVALID_HYPERCALL_INPUT  # docs/attach-protocol.md
        vcpu = current_vcpu()
        msg = attach.PostFromGuest(connection_id=connection_id, vcpu=vcpu.id, payload=payload)
        token = self.machine.trio_token
        if token is None:
            return hv.HV_STATUS_INSUFFICIENT_BUFFERS
        try:
            trio.from_thread.run_sync(self._post_send.send_nowait, msg, trio_token=token)
        except (trio.WouldBlock, trio.RunFinishedError, trio.BrokenResourceError):
            # full (vmbusd slow, or away while we reconnect), or the VMM is shutting down
            self.counters.refused_posts += 1
            return hv.HV_STATUS_INSUFFICIENT_BUFFERS
        self.counters.guest_posts += 1
        if len(self.guest_log) < LOG_LIMIT:
            self.guest_log.append((connection_id, payload))
        return hv.HV_STATUS_SUCCESS

    def _on_unmatched_signal(self, param: int) -> int:
        """A fast HvSignalEvent no ioeventfd took: for a bound channel (a write KVM did
        not match, which should not happen) kick it from here; else the TLFS status."""
        connection_id = param & hv.HV_CONNECTION_ID_MASK
        self.counters.unmatched_signals += 1
        kick = self._by_connection.get(connection_id)
        if kick is None:
            return hv.HV_STATUS_INVALID_CONNECTION_ID
        _eventfd.signal(kick)
        return hv.HV_STATUS_SUCCESS

    # ---------------------------------------------------------------- attach side

    async def start_session(self, conn: attach.AttachConnection) -> None:
        """hello (role vmm), then the guest RAM regions with the memfd."""
        await self._attach(conn)
        self._set_link(True)

    async def _attach(self, conn: attach.AttachConnection) -> None:
        """hello and guest RAM on a (new) connection; it becomes `self.conn`."""
        self.conn = conn
        peer = await attach.handshake(
            conn,
            attach.Hello(
                version=attach.PROTOCOL_VERSION,
                role="vmm",
                vm_id=self.vm_id,
                vcpus=self.vcpus,
                features=(attach.FEATURE_SAVED_STATE,) if self.reconnect else (),
                software="vmbusd kvm",
            ),
        )
        self.saved_state = self.reconnect is not None and (
            attach.FEATURE_SAVED_STATE in peer.features
        )
        ram = self.machine.ram
        await conn.send(
            attach.MemoryRegions(
                regions=tuple(
                    attach.MemoryRegion(gpa=r.gpa, size=r.size, fd=ram.fd, offset=r.offset)
                    for r in ram.regions
                )
            )
        )

    def _set_link(self, up: bool) -> None:
        self._link_up = up
        if up:
            self._link_event.set()
        elif self._link_event.is_set():
            self._link_event = trio.Event()

    def bindings(self) -> dict[int, attach.Bind]:
        """The channels bound now, by relid (their eventfds are the VMM's until unbind)."""
        return {relid: b.bind for relid, b in self._bindings.items()}

    @property
    def holds_state(self) -> bool:
        """A `state` from vmbusd is held: a crash from now on can be resumed."""
        return self._state_fd is not None and self._inflight_fd is not None

    @property
    def link_up(self) -> bool:
        """vmbusd is there: not gone for good, not away while we reconnect."""
        return self._link_up

    def start_attach_tasks(self, nursery: trio.Nursery, on_end: Callable[[str], None]) -> None:
        """The attach session's tasks (run() starts them): the post sender, the receive
        loop (which starts a call watcher per bind in `nursery`, and reconnects when
        vmbusd goes away), and on the twin slot path the retry timer. on_end(why) when
        the session ends for good."""
        self._nursery = nursery
        nursery.start_soon(self._send_posts, name="vmm posts")
        nursery.start_soon(self._receive, on_end, name="vmm receive")
        if self.part.slot_backend == "python":
            nursery.start_soon(self._retry_slots)

    async def _send_posts(self) -> None:
        """The guest's posts, in order. With saved state each is numbered and kept until
        a `state` says vmbusd handled it. While vmbusd is away nothing is taken off the
        queue, so it fills and the guest gets HV_STATUS_INSUFFICIENT_BUFFERS."""
        while True:
            await self._link_event.wait()
            msg = await self._post_recv.receive()
            async with self._send_lock:
                assert self.conn is not None
                if not self.saved_state:
                    if self._link_up:
                        try:
                            await self.conn.send(msg)
                        except (attach.ConnectionClosed, OSError, trio.ClosedResourceError):
                            pass  # the receive task sees the end and says why
                    continue
                if len(self._unacked) >= MAX_UNACKED_POSTS:
                    # vmbusd sends no states (a device of this VM cannot restart): what
                    # we keep could never be replayed. A resume needs a newer state.
                    self._dropped_posts = self._posts_sent
                    self._unacked.clear()
                self._unacked.append((self._posts_sent, msg))
                self._posts_sent += 1
                if not self._link_up:
                    continue  # replayed by the resume
                try:
                    await self.conn.send(msg)
                except (attach.ConnectionClosed, OSError, trio.ClosedResourceError):
                    pass  # the receive task reconnects; the resume sends it again

    async def _receive(self, stop: Callable[[str], None]) -> None:
        """Apply vmbusd's messages in order. When vmbusd goes away and we hold its saved
        state, reconnect and resume; when the session ends for good, stop(why)."""
        while True:
            why, final = await self._receive_messages()
            self._set_link(False)
            if not final and self._resumable():
                log.warning("%s: the guest runs on; reconnecting", why)
                gave_up = await self._reconnect_and_resume()
                if gave_up is None:
                    continue
                why = gave_up
            self.ended = why
            log.info("%s", why)  # `vmbusd kvm` says it once, in its last line
            stop(why)
            return

    async def _receive_messages(self) -> tuple[str, bool]:
        """Until the connection ends: (why, final). Final: vmbusd refused us on purpose
        (an `error` other than `shutdown`) or broke the protocol, so no resume."""
        assert self.conn is not None and self._nursery is not None
        while True:
            try:
                msg = await self.conn.receive()
            except (attach.ConnectionClosed, OSError, trio.ClosedResourceError) as exc:
                return f"vmbusd closed the connection ({exc})", False
            except attach.AttachProtocolError as exc:
                return f"vmbusd sent a bad message: {exc}", True
            if isinstance(msg, attach.State):
                self._take_state(msg)
                continue
            if isinstance(msg, attach.PostToGuest):
                await self._deliver(msg)
            elif isinstance(msg, attach.Bind):
                self._bind(msg)
            elif isinstance(msg, attach.Unbind):
                self._unbind(msg.relid)
            elif isinstance(msg, attach.Error):
                why = f"vmbusd reported error {msg.code}: {msg.message}"
                return why, msg.code != attach.ErrorCode.SHUTDOWN
            else:
                continue
            self._applied += 1  # applied before the next one is read

    def _take_state(self, msg: attach.State) -> None:
        """Hold the newest saved state (and the in-flight region, sent once); forget
        the posts it says vmbusd handled."""
        if self._state_fd is not None:
            _close_quiet(self._state_fd)
        self._state_fd = msg.blob
        if msg.inflight is not None:
            if self._inflight_fd is not None:
                _close_quiet(self._inflight_fd)
            self._inflight_fd = msg.inflight
        self._applied = 0
        self._acked_posts = msg.posts
        while self._unacked and self._unacked[0][0] < msg.posts:
            self._unacked.popleft()

    def _resumable(self) -> bool:
        """A new vmbusd can take over from the state we hold."""
        return (
            self.reconnect is not None
            and self.saved_state
            and self._state_fd is not None
            and self._inflight_fd is not None
            and self._acked_posts >= self._dropped_posts
        )

    async def _reconnect_and_resume(self) -> str | None:
        """Connect again (backoff) until `reconnect_timeout`, then resume. None when
        resumed; else why we gave up (`gave_up` set when vmbusd did not come back)."""
        assert self.reconnect is not None
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await self.conn.aclose()

        async def take_over(conn: attach.AttachConnection) -> bool:
            await self._attach(conn)
            if not self.saved_state:
                await conn.abort(attach.ErrorCode.PROTOCOL, attach.NO_SAVED_STATE)
                return False
            await self._resume(conn)
            return True

        why, gave_up = await attach.reconnect_with_backoff(
            self.reconnect, take_over, self.reconnect_timeout
        )
        if why is not None:
            self.gave_up = gave_up
            return why
        self.counters.reconnects += 1
        log.warning("vmbusd is back: session resumed (reconnect %d)", self.counters.reconnects)
        return None

    async def _resume(self, conn: attach.AttachConnection) -> None:
        """`resume` with the state we hold and the bindings we keep (their eventfds and
        ioeventfds stay wired in KVM), then the posts vmbusd had not handled, in order;
        from then on posts go out again. A binding past MAX_RESUME_CHANNELS gets a fresh
        `bind` from vmbusd, which replaces it."""
        assert self._state_fd is not None and self._inflight_fd is not None
        keep = sorted(self._bindings)[: attach.MAX_RESUME_CHANNELS]
        async with self._send_lock:
            await conn.send(
                attach.Resume(
                    blob=self._state_fd,
                    inflight=self._inflight_fd,
                    applied=self._applied,
                    posts=self._posts_sent,
                    channels=tuple(
                        attach.ResumeChannel(
                            r, self._bindings[r].bind.kick, self._bindings[r].bind.call
                        )
                        for r in keep
                    ),
                )
            )
            # `applied` stays: it counts against the state we still hold, until the new
            # vmbusd's first `state` replaces it.
            for _idx, post in self._unacked:
                await conn.send(post)
                self.counters.replayed_posts += 1
            self._resumed = True
            self._set_link(True)

    async def _deliver(self, msg: attach.PostToGuest) -> None:
        """Into the SIMP slot; while the guest leaves MESSAGE_QUEUE_LIMIT messages
        untaken we stop reading from vmbusd (its back-pressure)."""
        while True:
            try:
                self.part.post_message(msg.vcpu, msg.sint, HVMSG_VMBUS, msg.payload)
            except hv.MessageQueueFull:
                await trio.sleep(QUEUE_FULL_WAIT_S)
                continue
            self.counters.host_posts += 1
            if len(self.host_log) < LOG_LIMIT:
                self.host_log.append((msg.vcpu, msg.payload))
            return

    def _bind(self, b: attach.Bind) -> None:
        old = self._bindings.get(b.relid)
        if old is not None:  # after a resume: a channel we did not list; else not sent
            if not self._resumed:
                log.warning("bind of relid %d that is bound already: replacing it", b.relid)
            self._unbind(b.relid, count=False)
        binding = _Binding(b)
        if b.interrupt_page:
            # Linux 6.1 negotiates 5.3; a pre-2.4 interrupt page is not emulated here.
            log.warning(
                "relid %d: the guest negotiated VMBus < 2.4 (interrupt page %#x), "
                "which this VMM does not emulate: the channel gets no interrupts",
                b.relid,
                b.interrupt_page,
            )
        try:
            self.machine.vm.ioeventfd(
                b.kick, self.stub.signal_port, 4, datamatch=b.connection_id, pio=True
            )
            binding.ioeventfd = True
        except OSError as exc:  # the unmatched-signal path still kicks it, with an exit
            log.warning("relid %d: KVM_IOEVENTFD failed (%s); signals exit instead", b.relid, exc)
        self._bindings[b.relid] = binding
        self._by_connection[b.connection_id] = b.kick
        self.counters.binds += 1
        assert self._nursery is not None
        self._nursery.start_soon(self._watch_call, binding, name=f"call relid {b.relid}")

    async def _watch_call(self, binding: _Binding) -> None:
        """One wake-up per readable call eventfd: drain the count, set the relid's SIEFP
        bit, one MSI if the bit was clear (signal_event)."""
        b = binding.bind
        with binding.scope:
            while True:
                try:
                    await trio.lowlevel.wait_readable(b.call)
                except (trio.ClosedResourceError, OSError):
                    return
                if _eventfd.drain(b.call) == 0:
                    continue
                self.counters.calls += 1
                self.part.signal_event(b.vcpu, VMBUS_SINT, b.relid)

    def _unbind(self, relid: int, *, count: bool = True) -> None:
        binding = self._bindings.pop(relid, None)
        if binding is None:
            return  # the protocol: ignored
        b = binding.bind
        self._by_connection.pop(b.connection_id, None)
        if binding.ioeventfd:
            try:
                self.machine.vm.ioeventfd(
                    b.kick,
                    self.stub.signal_port,
                    4,
                    datamatch=b.connection_id,
                    pio=True,
                    deassign=True,
                )
            except OSError as exc:
                log.warning("relid %d: KVM_IOEVENTFD deassign failed: %s", relid, exc)
        binding.scope.cancel()
        trio.lowlevel.notify_closing(b.call)
        for fd in (b.kick, b.call):
            try:
                os.close(fd)
            except OSError:
                pass
        if count:
            self.counters.unbinds += 1

    async def _retry_slots(self) -> None:
        """The pure-Python slot path can lose an EOM race; retry() heals it."""
        while True:
            await trio.sleep(PYTHON_SLOTS_RETRY_S)
            for vp in range(self.vcpus):
                if self.part.queued(vp, VMBUS_SINT):
                    self.part.retry(vp)

    # ---------------------------------------------------------------- running

    async def run(self, *, until: str | None = None, timeout: float | None = None) -> RunResult:
        """Run the guest (attached first, if `start_session` was called) until the console
        matches `until`, `timeout` seconds pass, vmbusd ends the session or the guest
        stops. A VcpuFault comes back as outcome 'fault'."""
        pattern = until or None  # Console.search compiles it with re.MULTILINE
        result: RunResult | None = None
        t0 = time.monotonic()

        def stop(outcome: str, detail: str = "", match: str | None = None) -> None:
            nonlocal result
            if result is None:
                result = RunResult(outcome, detail, time.monotonic() - t0, match)
            self.machine.request_stop(StopReason("requested", detail=detail))

        async def watch_console() -> None:
            assert pattern is not None
            found = await self.console.until(pattern)
            if found is not None:
                stop("until", match=found.group(0))

        try:
            async with trio.open_nursery() as nursery:
                if self.conn is not None:
                    self.start_attach_tasks(nursery, lambda why: stop("vmbusd", why))
                if pattern is not None:
                    nursery.start_soon(watch_console)
                try:
                    reason = await self.machine.run(timeout=timeout)
                except VcpuFault as exc:
                    stop("fault", str(exc))
                else:
                    if reason.kind == "snapshot":
                        stop("snapshot", f"first SynIC write: MSR {reason.code:#x}")
                    elif reason.kind == "timeout":
                        stop("timeout", f"no match after {timeout:g} s" if until else "")
                    else:
                        stop("stopped", f"{reason.kind} {reason.detail}".strip())
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            for relid in list(self._bindings):
                self._unbind(relid)
        assert result is not None
        return result

    # ---------------------------------------------------------------- snapshots

    def save_snapshot(self, path: str) -> snapshot.Timing:
        """After run() returned outcome 'snapshot': the whole VM to `path`."""
        return snapshot.save(self, path)

    @classmethod
    def from_snapshot(
        cls,
        path: str,
        *,
        console_sink: Callable[[bytes], None] | None = None,
        vm_id: str | None = None,
        reconnect: Callable[[], Awaitable[attach.AttachConnection]] | None = None,
        reconnect_timeout: float = RECONNECT_TIMEOUT_S,
    ) -> tuple[KvmVm, snapshot.Timing]:
        """A fresh VM with the snapshot's RAM size and vCPUs, its state restored: run()
        it (after start_session) and the guest goes on from its first SynIC write."""
        t0 = time.monotonic()
        state, _ = snapshot.read_header(path)
        vm = cls(
            None,
            mem_size=int(state["mem_size"]),
            vcpus=int(state["vcpus"]),
            console_sink=console_sink,
            vm_id=vm_id,
            reconnect=reconnect,
            reconnect_timeout=reconnect_timeout,
        )
        try:
            timing = snapshot.restore(vm, path)
        except BaseException:
            vm.close()
            raise
        return vm, snapshot.Timing(time.monotonic() - t0, timing.ram_bytes)

    def close(self) -> None:
        for relid in list(self._bindings):
            self._unbind(relid)
        for fd in (self._state_fd, self._inflight_fd):
            if fd is not None:
                _close_quiet(fd)
        self._state_fd = self._inflight_fd = None
        self.machine.close()


def _close_quiet(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


# -------------------------------------------------------------------- `vmbusd kvm`

KVM_DEVICE = "/dev/kvm"
TAIL_LINES = 40  # printed at the end when the console went to --console FILE
EXIT_MATCHED, EXIT_NOT_MATCHED, EXIT_GAVE_UP = 0, 1, 2


def parse_size(text: str) -> int:
    """`256M`, `1G`, `262144K` or bytes; a multiple of 2 MiB (what KvmRam takes)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text, re.IGNORECASE)
    if m is None:
        raise ValueError(f"{text!r} is not a size (say 256M or 1G)")
    size = int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2).upper()]
    if size < 32 << 20 or size % (2 << 20):
        raise ValueError(f"{text!r}: guest RAM must be at least 32M and a multiple of 2M")
    return size


def default_kernel() -> str:
    """The cached `vmbusd guest-kernel` build's vmlinux, or a UserError saying to run it."""
    from vmbus.cliutil import UserError
    from vmbus.kvm import kernel

    root = kernel.cache_root() / "guest-kernel"
    path = root / kernel.cache_key(kernel.PINNED_VERSION, kernel.fragment_text()) / "vmlinux"
    if not path.is_file():
        raise UserError(f"no guest kernel built yet ({path}): run `vmbusd guest-kernel` first")
    return str(path)


def check_kvm(path: str = KVM_DEVICE) -> None:
    """A missing or unusable /dev/kvm is the user's to fix: one line."""
    from vmbus.cliutil import UserError

    if not os.path.exists(path):
        raise UserError(f"{path} does not exist: this machine offers no KVM")
    if not os.access(path, os.R_OK | os.W_OK):
        raise UserError(f"{path}: permission denied (join the kvm group or run as root)")


async def run_kvm(
    *,
    connect: str | None,
    kernel_path: str | None,
    mem_size: int,
    vcpus: int,
    console_path: str | None,
    append: str,
    until: str | None,
    timeout: float | None,
    say: Callable[[str], None],
    snapshot_path: str | None = None,
    restore_path: str | None = None,
    reconnect_timeout: float = RECONNECT_TIMEOUT_S,
) -> int:
    """`vmbusd kvm`: 0 when the console matched --until (or, with --snapshot, the
    snapshot was written), 1 otherwise (the timeout, vmbusd ending the session, a guest
    fault), 2 when vmbusd went away and did not come back within `reconnect_timeout`
    (until then the guest runs on and the VMM reconnects to resume the session),
    128+signal when SIGTERM/SIGINT stopped it; a user's mistake raises UserError.
    Prints the console as it comes (or, with --console FILE, writes it there and prints
    its last lines at the end)."""
    import sys

    from vmbus.cliutil import STOP_SIGNALS, UserError, check_writable, describe_connect_error

    check_kvm()
    if snapshot_path is not None and restore_path is not None:
        raise UserError("--snapshot and --restore exclude each other")
    if snapshot_path is not None:
        if connect is not None:
            raise UserError("--snapshot stops before VMBus starts: it takes no --connect")
        check_writable(snapshot_path, "--snapshot")
    elif connect is None:
        raise UserError("--connect SOCK is needed (`vmbusd serve --listen SOCK`)")
    if until is not None:
        try:
            re.compile(until)
        except re.error as exc:
            raise UserError(f"--until {until!r} is not a regular expression: {exc}") from None
    image: bytes | None = None
    path = restore_path or kernel_path or default_kernel()
    if restore_path is None:
        try:
            with open(path, "rb") as f:
                image = f.read()
        except OSError as exc:
            raise UserError(f"--kernel {path}: {exc.strerror or exc}") from None
    console_file = None
    if console_path is not None:
        try:
            console_file = open(console_path, "wb")
        except OSError as exc:
            raise UserError(f"--console {console_path}: {exc.strerror or exc}") from None

    def sink(data: bytes) -> None:
        if console_file is not None:
            console_file.write(data)
            console_file.flush()
        else:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()

    stopped_by: list[int] = []
    conn: attach.AttachConnection | None = None
    again: Callable[[], Awaitable[attach.AttachConnection]] | None = None
    if connect is not None:
        sock_path = connect

        async def again() -> attach.AttachConnection:
            return await attach.connect(sock_path)

    vm: KvmVm | None = None
    try:
        if connect is not None:
            try:
                conn = await attach.connect(connect)
            except OSError as exc:
                raise UserError(describe_connect_error(connect, exc)) from exc
        if restore_path is not None:
            try:
                vm, timing = KvmVm.from_snapshot(
                    restore_path,
                    console_sink=sink,
                    reconnect=again,
                    reconnect_timeout=reconnect_timeout,
                )
            except snapshot.SnapshotError as exc:
                raise UserError(f"--restore {exc}") from None
            say(f"restored {restore_path} in {timing.seconds:.2f} s")
        else:
            assert image is not None
            try:
                vm = KvmVm(
                    image,
                    mem_size=mem_size,
                    vcpus=vcpus,
                    append=append,
                    console_sink=sink,
                    snapshot_at_synic=snapshot_path is not None,
                    reconnect=again,
                    reconnect_timeout=reconnect_timeout,
                )
            except KvmVmError as exc:
                raise UserError(f"--kernel {path}: {exc}") from None
        if conn is not None:
            await vm.start_session(conn)
        n = vm.vcpus
        say(
            f"{'attached to ' + connect if connect else 'not attached'} as {vm.vm_id}; "
            f"{'resuming' if restore_path else 'booting'} {path} "
            f"({vm.machine.ram.size >> 20} MiB, {n} vCPU{'s' if n > 1 else ''}"
            f"{', kvm_pvm' if vm.on_pvm else ''})"
        )
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            async with trio.open_nursery() as nursery:

                async def on_signal(machine: Machine) -> None:
                    async for signum in signals:
                        stopped_by.append(signum)
                        machine.request_stop()
                        return

                nursery.start_soon(on_signal, vm.machine)
                result = await vm.run(until=until, timeout=timeout)
                nursery.cancel_scope.cancel()
        if result.outcome == "snapshot" and snapshot_path is not None and not stopped_by:
            timing = vm.save_snapshot(snapshot_path)
            say(
                f"snapshot at the guest's {result.detail}, {result.elapsed:.1f} s after start: "
                f"wrote {snapshot_path} in {timing.seconds:.2f} s "
                f"({timing.ram_bytes >> 20} MiB of RAM not zero)"
            )
            return EXIT_MATCHED
    finally:
        if vm is not None:
            vm.close()
            if vm.conn is not None and vm.conn is not conn:  # a reconnect's
                await vm.conn.aclose()
        if conn is not None:
            await conn.aclose()
        if console_file is not None:
            console_file.close()
    if console_path is not None:
        tail = vm.console.text().splitlines()[-TAIL_LINES:]
        print("\n".join(tail), flush=True)
    elif vm.console.text() and not vm.console.text().endswith("\n"):
        print(flush=True)
    c = vm.counters
    traffic = (
        f"{c.guest_posts} guest post(s), {c.host_posts} host post(s), {c.binds} bind(s), "
        f"{c.calls} interrupt(s)"
    )
    if c.reconnects:
        traffic += f", {c.reconnects} reconnect(s)"
    if stopped_by:
        name = signal.Signals(stopped_by[0]).name
        say(f"{name}: stopped after {result.elapsed:.1f} s; {traffic}")
        return 128 + stopped_by[0]  # as every command cut short by a signal
    if result.outcome == "until":
        say(f"console matched {result.match!r} after {result.elapsed:.1f} s; {traffic}")
        return EXIT_MATCHED
    if result.outcome == "timeout":
        what = "no SynIC write" if snapshot_path else "timeout"
        if until:
            what = f"no match for --until {until!r}"
        say(f"{what} after {result.elapsed:.1f} s; {traffic}")
    elif result.outcome == "vmbusd" and vm.gave_up:
        say(f"gave up: {result.detail}; {traffic}")
        return EXIT_GAVE_UP
    elif result.outcome == "vmbusd":
        say(f"stopped: {result.detail}; {traffic}")
    else:
        say(f"guest {result.outcome}: {result.detail}; {traffic}")
    return EXIT_NOT_MATCHED
