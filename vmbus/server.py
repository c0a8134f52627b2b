"""The service: one attach session per VM, one nursery per VM, one task per channel.

`VmSession` is the thin trio layer over the sans-IO bus (`vmbus.bus.VmBusServer`):
it feeds the guest's posted messages in, carries the bus's events out (control
messages to the VMM, ring mappings, channel tasks), and keeps a misbehaving
channel or VM from touching any other.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import mmap
import os
import signal
import stat
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

import msgpack
import trio

from vmbus import __version__, attach, bus
from vmbus import protocol as vp
from vmbus.channel import Channel, EventFd, new_eventfd, open_ring_pair
from vmbus.device import (
    INFLIGHT_SLOT_SIZE,
    Device,
    DeviceContext,
    DeviceMemory,
    GpadlMapping,
    GuestError,
    LabelledLog,
)
from vmbus.limits import VmLimiter, VmLimits
from vmbus.memory import GuestMemory, GuestMemoryError, LinearMapping, RingPairMapping
from vmbus.ring import RingCorrupt

log = logging.getLogger(__name__)

MAX_SESSIONS = 256  # VMs attached at once by default (`serve --max-vms`): hello done only
GPADL_PAGES_SLACK = 8190  # one maximal GPADL beyond the VM's RAM
SHUTDOWN_GRACE_S = 5.0  # how long a session's teardown may take once cancelled
PREDECESSOR_WAIT_S = 5.0  # a VM's new session waits this long for its old one to end
GPADL_RELEASE_GRACE_S = 5.0  # a device told to let go of a GPADL has this long

# Restart under a running guest (attach feature "saved-state", docs/attach-protocol.md).
SAVED_STATE_VERSION = 1  # the blob's "v"; a blob of another version is refused
MAX_SAVED_STATE = 16 << 20  # bytes of one saved-state blob, either way
MAX_OUTBOX = 4096  # messages for the VMM saved after one state (one pump's worth)
INFLIGHT_REGION_SIZE = (attach.MAX_RELID + 1) * INFLIGHT_SLOT_SIZE  # sparse: pages on use
STATE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE  # immutable blob
INFLIGHT_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW  # fixed size, still writable
ERROR_SAVED_STATE = "saved-state"  # `error` code: a resume whose state we cannot take
SETTLE_PUMPS = 8  # extra pump rounds to reach a savable state before a `state` goes out
STATE_EVERY_POSTS = 64  # a `state` at least this often, so the VMM can forget its posts


@dataclass
class _ChannelTask:
    """Host-side state of one open channel and its device task; owned by the session."""

    relid: int
    connection_id: int
    vcpu: int
    device: Device
    mapping: RingPairMapping
    channel: Channel
    kick: EventFd
    call: EventFd
    cancel: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    failed: str | None = None


@dataclass(eq=False)
class _HeldGpadl:
    """A GPADL a device holds through `ctx.gpadl`."""

    relid: int
    handle: int
    teardown: trio.Event = field(default_factory=trio.Event)


class VmSession:
    """Serves one VM's VMBus over one attach connection."""

    def __init__(
        self,
        conn: attach.AttachConnection,
        devices: Sequence[Device],
        *,
        vm_label: str = "vm",
        on_channel_event: Callable[[str, int, str], None] | None = None,
        devices_for: Callable[[str], Sequence[Device]] | None = None,
        limits_for: Callable[[str], VmLimits] | None = None,
        others: Callable[[], Iterable[VmSession]] | None = None,
    ) -> None:
        """`devices_for`, when given, picks the devices by the VM's name once the
        hello has named it (added to `devices`); `limits_for` its limits likewise;
        `others` gives the service's sessions, for the one-session-per-VM guard."""
        self._others = others
        self.ending = False  # left its receive loop: tearing down
        self.ended = trio.Event()  # torn down: nothing of it touches the VM any more
        self.superseded = False  # ended by a new session on its RAM: its socket is dead
        self._ram_ids: set[tuple[int, int]] = set()  # (st_dev, st_ino) of its RAM's files
        self._limits_for = limits_for
        self.limits = VmLimiter(VmLimits(), vm_label)  # vmbus.limits; the VM's once named
        self.conn = conn
        self.devices = list(devices)
        self._devices_for = devices_for
        self.label = vm_label
        self.session_id = uuid.uuid4().hex[:8]  # tells apart VMs that share a name
        self.memory = GuestMemory()
        self.bus: bus.VmBusServer | None = None
        self.device_of: dict[int, tuple[Device, int]] = {}  # relid -> (device, sub index)
        self.open: dict[int, _ChannelTask] = {}
        self.peer: attach.Hello | None = None
        self._nursery: trio.Nursery | None = None
        self._send_lock = trio.Lock()
        self._pump_lock = trio.Lock()  # bus events are carried out in order, one pump at a time
        self._reoffer: dict[int, tuple[Device, int]] = {}  # reset channels awaiting release
        self._on_channel_event = on_channel_event
        self.failed_channels: dict[int, str] = {}
        self._peer_gone = False  # the VMM closed or broke the connection (no farewell)
        self.interrupt_page = 0  # pre-2.4 sessions: the guest's interrupt page GPA
        self.epoch = 0  # the VMM's reset count; fences our messages sent before a reset
        self.closed_stats: list[tuple[int, str, dict[str, int]]] = []  # (relid, device, stats)
        self._held: list[_HeldGpadl] = []  # GPADLs devices hold (ctx.gpadl)
        self._runtime_subs: dict[int, list[int]] = {}  # id(device) -> relids it enabled
        self._pump_wanted = trio.Event()  # a pump from where we must not wait for one
        self._devices_reset_pending = False
        # Restart support (feature "saved-state"), see docs/attach-protocol.md#restart.
        self.saved_state = False  # both ends named the feature
        self.resumed = False  # this session took over from an earlier vmbusd
        self._inflight_fd: int | None = None  # the in-flight region (a sealed memfd)
        self._inflight_map: mmap.mmap | None = None
        self._inflight_sent = False
        self._outbox: list[attach.Message] | None = None  # a pump's messages, held back
        self._last_blob: bytes | None = None
        self._state_posts = 0  # `posts` of the last state sent
        self._state_wanted = False  # a device (or a planned stop) asked for a state
        self._posts_done = 0  # guest posts handled over the VM's life (VMM's numbering)
        self._resumable = True  # a resume may come until the first post

    def snapshot(self) -> dict[str, object]:
        """This VM's part of `vmbusd stats`: plain data, safe to serialise."""
        from vmbus.stats import fault_snapshot, switch_snapshot

        version = self.bus.version if self.bus is not None else None
        return {
            "vm": self.label,
            "vcpus": self.peer.vcpus if self.peer else 0,
            "version": vp.version_str(version) if version else "none",
            "resets": len(self.failed_channels),
            "channels": [
                {
                    "relid": oc.relid,
                    "device": oc.device.name,
                    "sub_channel": self.device_of.get(oc.relid, (None, 0))[1],
                    "vcpu": oc.vcpu,
                    "stats": oc.channel.stats.as_dict(),
                }
                for oc in sorted(self.open.values(), key=lambda o: o.relid)
            ],
            "faults": fault_snapshot(self.devices),
            "switch_ports": switch_snapshot(self.devices),
            "limits": self.limits.snapshot(self.bus.gpadl_pages_refused if self.bus else 0),
        }

    # -- lifecycle -------------------------------------------------------------

    async def run(self) -> None:
        """Serve until the VMM disconnects or breaks the protocol; always cleans up."""
        try:
            self.peer = await attach.handshake(
                self.conn,
                attach.Hello(
                    version=attach.PROTOCOL_VERSION,
                    role="vmbusd",
                    vm_id="",
                    vcpus=0,
                    features=(attach.FEATURE_SAVED_STATE,),
                    software=f"vmbusd {__version__}",
                ),
            )  # bounded by the connection's handshake deadline; conn.admit may refuse
            self.label = self.peer.vm_id or self.label
            refusal = await self._after_predecessors(self._ending_namesakes())
            if refusal is not None:
                log.warning("%s: %s", self.label, refusal)
                self._peer_gone = True
                await self.conn.abort(attach.ErrorCode.RESOURCE, refusal, quiet=True)
                return
            if self._limits_for is not None:
                self.limits = VmLimiter(self._limits_for(self.label), self.label)
            refusal = self.pick_devices(self.label)  # serve_listener's admit did it
            if refusal is not None:
                self._peer_gone = True
                await self.conn.abort(attach.ErrorCode.RESOURCE, refusal)
                return
            self.saved_state = attach.FEATURE_SAVED_STATE in self.peer.features
            stuck = [
                d.restart_blocker or f"{d.name} cannot save its state yet"
                for d in self.devices
                if not d.restartable
            ]
            if self.saved_state and stuck:
                self.saved_state = False
                log.info(
                    "%s: no restart support for this VM: %s",
                    self.label,
                    "; ".join(sorted(set(stuck))),
                )
            if self.saved_state:
                self._new_inflight_region()
            self.bus = bus.VmBusServer(
                vcpu_count=max(1, self.peer.vcpus), validate_pfns=self._pfns_in_ram
            )
            for dev in self.devices:
                self._offer(dev)
            log.info("%s: attached (%d vCPUs)", self.label, self.peer.vcpus)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._pump_worker)
                try:
                    await self._receive_loop()
                except attach.ConnectionClosed:
                    self._peer_gone = True
                    log.info("%s: VMM disconnected", self.label)
                except attach.AttachProtocolError as exc:
                    self._peer_gone = True
                    if exc.code in (attach.ErrorCode.RESOURCE, ERROR_SAVED_STATE):
                        # not logged by attach itself
                        log.warning("%s: %s", self.label, exc)
                    await self.conn.abort(exc.code, str(exc), quiet=True)
                finally:
                    self.ending = True
                    for oc in list(self.open.values()):
                        oc.cancel.cancel()
                    nursery.cancel_scope.cancel()  # the pump worker and GPADL watchdogs
        except attach.ConnectionClosed:
            self._peer_gone = True
            log.info("%s: VMM disconnected during hello", self.label)
        except (attach.AttachProtocolError, attach.PeerError) as exc:
            self._peer_gone = True
            log.warning("%s: attach handshake failed: %s", self.label, exc)
        finally:
            # Runs even when the service is shutting down (cancelled): shielded, bounded.
            self.ending = True
            with trio.move_on_after(SHUTDOWN_GRACE_S) as cs:
                cs.shield = True
                await self._teardown()
            self.ended.set()

    def pick_devices(self, name: str) -> str | None:
        """Build the devices `devices_for` gives the VM called `name` (once); the
        refusal to send its VMM when they cannot be built (a [vm.NAME] list that is
        missing, a backend that cannot open now). Called from the handshake's admit
        (no checkpoint), so the VMM reads the refusal as its hello's answer."""
        if self._devices_for is None:
            return None
        pick, self._devices_for = self._devices_for, None
        try:
            self.devices += list(pick(name))
        except Exception as exc:
            log.error("%s: no devices for this VM: %s", name, exc)
            return f"no devices: {exc}"
        return None

    # -- one session per VM: the guard against two on the same rings --------------

    def _ending_namesakes(self) -> list[VmSession]:
        """The service's other sessions of this VM's name that are tearing down."""
        others = self._others() if self._others is not None else ()
        return [
            s
            for s in others
            if s is not self and s.label == self.label and s.ending and not s.ended.is_set()
        ]

    def waits_for_predecessor(self, name: str) -> bool:
        """A session of VM `name` is still tearing down: build our devices only after
        it has closed its own (serve_listener's admit leaves them to `run`)."""
        others = self._others() if self._others is not None else ()
        return any(s is not self and s.label == name and s.ending for s in others)

    async def _after_predecessors(self, olds: list[VmSession]) -> str | None:
        """Wait (PREDECESSOR_WAIT_S at most) until `olds` have ended, so no two
        sessions ever serve one VM's rings; the refusal for the VMM if they did not."""
        if not olds:
            return None
        log.info(
            "%s: waiting for its previous session(s) %s to end",
            self.label,
            ", ".join(s.session_id for s in olds),
        )
        with trio.move_on_after(PREDECESSOR_WAIT_S):
            for s in olds:
                await s.ended.wait()
            return None
        return "this VM's previous session is still ending; try again later"

    async def _supersede_same_ram(self) -> None:
        """A session on the same guest RAM (the same memfd) is this VM's old one: its
        VMM has connected again, so its connection is dead even if we saw no EOF
        (another process holds the VMM's end). End it, and wait for the end."""
        others = self._others() if self._others is not None else ()
        olds = [
            s
            for s in others
            if s is not self and s._ram_ids & self._ram_ids and not s.ended.is_set()
        ]
        for s in olds:
            if not s.ending and s._nursery is not None:
                log.warning(
                    "%s: its VMM connected again: ending its old session %s",
                    self.label,
                    s.session_id,
                )
                s.superseded = s._peer_gone = True
                s._nursery.cancel_scope.cancel()
        refusal = await self._after_predecessors(olds)
        if refusal is not None:
            raise attach.AttachProtocolError(refusal, attach.ErrorCode.RESOURCE)

    def _offer(self, dev: Device) -> None:
        for sub in range(dev.offer.sub_channels + 1):
            self._offer_one(dev, sub)

    def _offer_one(self, dev: Device, sub: int) -> int:
        assert self.bus is not None
        o = dev.offer
        relid = self.bus.add_offer(
            bus.Offer(
                if_type=o.if_type,
                if_instance=o.if_instance,
                sub_channel_index=sub,
                mmio_megabytes=o.mmio_megabytes,
                flags=o.flags,
                user_def=o.user_def,
            )
        )
        self.device_of[relid] = (dev, sub)
        return relid

    async def add_device(self, dev: Device) -> None:
        """Hot-add: offer a new device to a running guest."""
        self.devices.append(dev)
        if self.saved_state and not dev.restartable:
            # The VMM's saved state stops being usable: a restart now ends the session.
            self.saved_state = False
            log.info(
                "%s: no restart support from now on: %s",
                self.label,
                dev.restart_blocker or f"{dev.name} cannot save its state yet",
            )
        self._offer(dev)
        await self._pump()

    async def enable_subchannels(self, dev: Device, count: int) -> list[int]:
        """Make `count` sub-channels of `dev` exist on this guest session (capped by
        its offer's maximum); returns the relids of all of them. Idempotent: only a
        larger count than what exists offers anything (the difference)."""
        if not any(d is dev for d, _sub in self.device_of.values()):
            raise ValueError(f"{dev.name} is not offered on this VM")
        offer = dev.offer
        want = max(0, min(count, offer.subchannel_cap))
        added = self._runtime_subs.setdefault(id(dev), [])
        have = offer.sub_channels + len(added)
        if want > have:  # the VM's channel limit may cut it (one log line)
            want = self.limits.subchannels_allowed(dev.name, len(self.device_of), have, want)
        for sub in range(have + 1, want + 1):
            added.append(self._offer_one(dev, sub))
        if want > have:
            await self._pump()
        return sorted(r for r, (d, sub) in self.device_of.items() if d is dev and sub > 0)

    async def remove_device(self, dev: Device) -> None:
        """Hot-remove: rescind every channel of the device."""
        assert self.bus is not None
        for relid, (d, _sub) in list(self.device_of.items()):
            if d is dev:
                self.bus.rescind(relid)
        await self._pump()

    async def _teardown(self) -> None:
        keep = self.saved_state and not self._peer_gone and self.bus is not None
        if keep:
            # A planned stop (SIGTERM, upgrade): stop the device tasks, hand the VMM a
            # last saved state, and leave the guest's channels bound -- the next
            # vmbusd resumes them. Nothing reaches the guest.
            await self._quiesce()
        for relid in list(self.open):
            await self._close_channel(relid, notify_bus=False, unbind=not (keep or self.superseded))
        await self._reset_devices("VM detached")
        for dev in self.devices:
            await self._device_hook(dev, dev.close, "close")
        try:
            self.memory.close()
        except GuestMemoryError as exc:  # a view still held: a bug, never a crash
            log.error("%s: guest memory not fully released: %s", self.label, exc)
        self._close_inflight_region()
        if not self._peer_gone:
            # With saved-state the VMM keeps the bindings and may resume (the docs'
            # restart section): the code says so, the words stay the same.
            await self.conn.abort(attach.ErrorCode.SHUTDOWN, "vmbusd is detaching from this VM")
        else:
            with contextlib.suppress(Exception):
                await self.conn.aclose()

    # -- attach messages in --------------------------------------------------

    async def _receive_loop(self) -> None:
        while True:
            assert self.bus is not None
            msg = await self.conn.receive()
            if isinstance(msg, attach.PostFromGuest):
                await self.limits.control_message()  # over its rate: its posts wait unread
                self._resumable = False
                self._posts_done += 1  # counted before the pump: its state says "done"
                self.bus.receive(msg.payload, msg.connection_id)
                await self._pump()
            elif isinstance(msg, attach.MemoryRegions):
                self._add_memory(msg)
                await self._supersede_same_ram()
            elif isinstance(msg, attach.Resume):
                await self._resume(msg)
                assert self.bus is not None  # a new one
            elif isinstance(msg, attach.Reset):
                self._resumable = False
                self._posts_done += 1  # resets are numbered with the posts
                log.info("%s: guest reset", self.label)
                self.epoch = msg.epoch
                self.bus.reset()
                await self._pump()
            elif isinstance(msg, attach.Error):
                log.warning("%s: VMM reported error %s: %s", self.label, msg.code, msg.message)
                self._peer_gone = True  # the VMM is closing: an error is never answered
                return
            else:
                raise attach.AttachProtocolError(f"unexpected {type(msg).__name__} from the VMM")

    def _add_memory(self, msg: attach.MemoryRegions) -> None:
        """Map the regions (GuestMemory keeps its own dups). Every fd the message
        carried is closed, whether its region was added, refused, or never tried
        because an earlier one was refused."""
        try:
            for r in msg.regions:
                self.memory.add_region(r.gpa, r.size, r.fd, r.offset)
                st = os.fstat(r.fd)
                self._ram_ids.add((st.st_dev, st.st_ino))
        except GuestMemoryError as exc:
            raise attach.AttachProtocolError(
                f"bad memory region: {exc}", code=attach.ErrorCode.RESOURCE
            ) from exc
        finally:
            attach.close_fds(msg.fds())
        if self.bus is not None:
            # A guest registers its own pages: more GPADL pages than it has RAM (with
            # room for one more maximal GPADL) is a guest trying to make us hoard.
            ram_pages = sum(reg.size for reg in self.memory.regions) >> 12
            self.bus.max_gpadl_pages = self.limits.gpadl_pages(ram_pages, GPADL_PAGES_SLACK)

    def _pfns_in_ram(self, pfns: Sequence[int]) -> bool:
        return all(self.memory.contains(p << 12, 4096) for p in pfns)

    # -- bus events out ----------------------------------------------------------

    async def _pump(self) -> None:
        """Carry out everything the bus asked for, in order (from any task).

        With restart support, the messages for the VMM are held back and go out after
        a `state` that lists them (its outbox): a vmbusd that dies half way through
        sending them leaves the VMM a state from which the next one sends the rest.
        """
        async with self._pump_lock:
            if not self.saved_state:
                await self._pump_locked()
                return
            self._outbox = []
            try:
                await self._pump_locked()
                for _ in range(SETTLE_PUMPS):
                    # A channel closing (a rescind from a device task or the control
                    # socket, outside this lock) is not savable: pump until settled.
                    if self._settled():
                        break
                    await self._pump_locked()
            except BaseException:
                self._outbox = None
                raise
            out, self._outbox = self._outbox, None
            await self._flush(out)

    async def _save_state_now(self) -> None:
        """`ctx.save_state()`: a device's own state changed; send a state now."""
        self._state_wanted = True
        await self._pump()

    def _pump_soon(self) -> None:
        """Ask the pump worker to pump: for code that must not wait for the pump lock
        (a device task letting go of a GPADL while the pump waits for that task)."""
        self._pump_wanted.set()

    async def _pump_worker(self) -> None:
        while True:
            await self._pump_wanted.wait()
            self._pump_wanted = trio.Event()
            await self._pump()

    async def _pump_locked(self) -> None:
        assert self.bus is not None
        while (ev := self.bus.next_event()) is not None:
            if isinstance(ev, bus.SendMessage):
                await self._send(
                    attach.PostToGuest(vcpu=ev.target_vcpu, payload=ev.payload, epoch=self.epoch)
                )
            elif isinstance(ev, bus.OpenRequest):
                status = await self._open_channel(ev)
                self.bus.open_complete(ev.relid, status)
            elif isinstance(ev, bus.ChannelClosed):
                await self._close_channel(ev.relid)
            elif isinstance(ev, bus.ProtocolViolation):
                log.warning("%s: guest protocol violation: %s", self.label, ev.reason)
            elif isinstance(ev, bus.ChannelRemoved):
                self.device_of.pop(ev.relid, None)  # hot-remove finished: relid is free
                log.info("%s: relid %d removed", self.label, ev.relid)
                again = self._reoffer.pop(ev.relid, None)
                if again is not None:  # the second half of a channel reset
                    self._offer_one(*again)
            elif isinstance(ev, bus.ChannelModified):
                await self._rebind(ev.relid, ev.target_vp)
            elif isinstance(ev, bus.GpadlTeardownRequested):
                self._gpadl_teardown_requested(ev.handle, ev.relid)
            elif isinstance(ev, bus.BusReset | bus.Unloaded):
                reason = ev.reason if isinstance(ev, bus.BusReset) else "guest unloaded VMBus"
                log.info("%s: guest session ended: %s", self.label, reason)
                self._forget_runtime_subchannels()
                self._devices_reset_pending = True  # once the closes queued with it are done
            elif isinstance(ev, bus.Connected):
                # Below 2.4 the guest gets channel interrupts through its interrupt page.
                self.interrupt_page = ev.interrupt_page if ev.version < vp.VERSION_WIN8 else 0
                log.info("%s: VMBus version %s negotiated", self.label, vp.version_str(ev.version))
            else:
                log.debug("%s: bus event %r", self.label, ev)
        if self._devices_reset_pending:
            await self._reset_devices("guest session ended")

    async def _send(self, msg: attach.Message) -> None:
        if self._outbox is not None and isinstance(
            msg, attach.PostToGuest | attach.Bind | attach.Unbind
        ):
            self._outbox.append(msg)
            return
        async with self._send_lock:
            await self.conn.send(msg)

    # -- device lifetime ------------------------------------------------------------

    def _forget_runtime_subchannels(self) -> None:
        """Guest reset: the sub-channels devices enabled at runtime go away with it
        (the guest never saw them on its new session; they are removed at once)."""
        assert self.bus is not None
        for relids in self._runtime_subs.values():
            for relid in relids:
                with contextlib.suppress(LookupError, vp.LocalProtocolError):
                    self.bus.rescind(relid)
                self._reoffer.pop(relid, None)
        self._runtime_subs.clear()

    async def _reset_devices(self, why: str) -> None:
        """Every device forgets its guest session (its channels have all stopped)."""
        self._devices_reset_pending = False
        for dev in self.devices:
            await self._device_hook(dev, dev.reset, "reset")
        log.debug("%s: devices reset (%s)", self.label, why)

    async def _device_hook(
        self, dev: Device, hook: Callable[[], Awaitable[None]], what: str
    ) -> None:
        try:
            with trio.move_on_after(SHUTDOWN_GRACE_S) as cs:
                await hook()
            if cs.cancelled_caught:
                log.error("%s: %s: %s() took too long; abandoned", self.label, dev.name, what)
        except Exception as exc:  # a device bug: never take the session down
            log.error("%s: %s: device bug in %s(): %s", self.label, dev.name, what, _describe(exc))

    # -- restart: saved state and the in-flight region -------------------------------

    def _new_inflight_region(self) -> None:
        """The session's in-flight region: a sparse memfd the VMM keeps for us."""
        fd = os.memfd_create(f"vmbusd-inflight-{self.label}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, INFLIGHT_REGION_SIZE)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, INFLIGHT_SEALS)
            self._inflight_map = mmap.mmap(fd, INFLIGHT_REGION_SIZE)
        except BaseException:
            os.close(fd)
            raise
        self._inflight_fd = fd
        self._inflight_sent = False

    def _close_inflight_region(self) -> None:
        if self._inflight_map is not None:
            with contextlib.suppress(BufferError):  # a device still holds a slot view
                self._inflight_map.close()
            self._inflight_map = None
        if self._inflight_fd is not None:
            attach.close_fds([self._inflight_fd])
            self._inflight_fd = None

    def _inflight_slot(self, relid: int) -> memoryview | None:
        if self._inflight_map is None:
            return None
        start = relid * INFLIGHT_SLOT_SIZE
        return memoryview(self._inflight_map)[start : start + INFLIGHT_SLOT_SIZE]

    def _clear_inflight_slot(self, relid: int) -> None:
        slot = self._inflight_slot(relid)
        if slot is not None:
            with slot:
                slot[:64] = bytes(64)  # a record's header: enough to make it invalid

    def _save(self, outbox: Sequence[attach.Message]) -> dict[str, object]:
        """Everything a new vmbusd needs to carry on with this VM (the blob's content)."""
        assert self.bus is not None and self.peer is not None
        index = {id(d): i for i, d in enumerate(self.devices)}
        entries: list[object] = []
        for m in outbox:
            if isinstance(m, attach.PostToGuest):
                entries.append(["post", m.vcpu, m.payload])
            elif isinstance(m, attach.Bind):
                entries.append(["bind", m.relid])
            elif isinstance(m, attach.Unbind):
                entries.append(["unbind", m.relid])
        return {
            "v": SAVED_STATE_VERSION,
            "vm": self.label,
            "vcpus": self.peer.vcpus,
            "epoch": self.epoch,
            "posts": self._posts_done,
            "interrupt_page": self.interrupt_page,
            "bus": self.bus.save(),
            "devices": [
                {"name": d.name, "if_type": d.if_type.bytes, "state": d.save()}
                for d in self.devices
            ],
            "relids": [[r, index[id(d)], sub] for r, (d, sub) in sorted(self.device_of.items())],
            "reoffer": [[r, index[id(d)], sub] for r, (d, sub) in sorted(self._reoffer.items())],
            "runtime": [
                [i, sorted(self._runtime_subs.get(id(d), []))]
                for i, d in enumerate(self.devices)
                if self._runtime_subs.get(id(d))
            ],
            "outbox": entries,
        }

    def _settled(self) -> bool:
        """No bus work is queued and every channel is closed or open: savable."""
        assert self.bus is not None
        return self.bus.pending_events == 0 and self.bus.savable

    async def _flush(self, out: list[attach.Message]) -> None:
        """Send a `state` naming `out`, then `out` itself (restart support only).

        A state is needed before anything reaches the VMM (and so the guest): the
        next vmbusd must know what the guest was told. Guest messages that made no
        message go out (a GPADL_BODY, say) need none: the VMM keeps them and posts
        them again after a crash, and the bus, a state machine, does the same with
        them again. So a state goes out with every outbox, when asked, and every
        STATE_EVERY_POSTS posts (to let the VMM forget them) -- not per post, which
        for a large GPADL's bodies would copy its growing page list hundreds of times.
        """
        behind = self._posts_done - self._state_posts >= STATE_EVERY_POSTS
        if not (out or self._state_wanted or behind):
            return
        self._state_wanted = False
        try:
            blob = msgpack.packb(self._save(out), use_bin_type=True)
        except Exception as exc:  # a device's save() bug: no state, but serve on
            log.error("%s: no saved state sent: %s", self.label, _describe(exc))
            blob = None
            self._last_blob = None
        if blob is not None and len(blob) > MAX_SAVED_STATE:
            log.error(
                "%s: saved state of %d bytes is over %d: not sent",
                self.label,
                len(blob),
                MAX_SAVED_STATE,
            )
            blob = None
        if blob is not None and (out or blob != self._last_blob):
            await self._send_state(blob)
        for m in out:
            async with self._send_lock:
                await self.conn.send(m)

    async def _send_state(self, blob: bytes) -> None:
        fd = os.memfd_create(f"vmbusd-state-{self.label}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view) :]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, STATE_SEALS)
            inflight = None if self._inflight_sent else self._inflight_fd
            async with self._send_lock:
                await self.conn.send(
                    attach.State(blob=fd, posts=self._posts_done, inflight=inflight)
                )
            self._inflight_sent = True
            self._last_blob = blob
            self._state_posts = self._posts_done
        finally:
            os.close(fd)

    async def _quiesce(self) -> None:
        """A planned stop with restart support: every device task stops (its in-flight
        record and ring indices consistent), then one last state reaches the VMM."""
        for oc in list(self.open.values()):
            oc.cancel.cancel()
        for oc in list(self.open.values()):
            await oc.done.wait()
        self._state_wanted = True
        with contextlib.suppress(Exception):
            await self._pump()

    async def _resume(self, msg: attach.Resume) -> None:
        """Take over from the vmbusd that served this VM before (crash or restart).

        The blob and everything else in `resume` come from the VMM: checked like any
        input from it. On the first problem the VMM gets `error saved-state` naming
        it (one log line, by `run`) and every fd of the message is closed. Nothing reaches the
        guest: its channels carry on where the last vmbusd left them.
        """
        taken: set[int] = set()
        try:
            if not self.saved_state:
                raise ValueError("the saved-state feature was not negotiated")
            if not self._resumable or self.resumed:
                raise ValueError("resume must come once, before any post or reset")
            if not self.memory.regions:
                raise ValueError("resume before any memory")
            saved = _load_blob(msg.blob)
            _check_inflight(msg.inflight)
            async with self._pump_lock:
                await self._restore(saved, msg, taken)
        except (ValueError, bus.SavedStateError, GuestMemoryError, OSError) as exc:
            attach.close_fds([fd for fd in msg.fds() if fd not in taken])
            raise attach.AttachProtocolError(f"resume refused: {exc}", ERROR_SAVED_STATE) from None
        attach.close_fds([fd for fd in msg.fds() if fd not in taken])

    async def _restore(self, saved: dict[str, object], msg: attach.Resume, taken: set[int]) -> None:
        assert self.peer is not None
        vcpus = self.peer.vcpus
        if saved.get("v") != SAVED_STATE_VERSION:
            raise ValueError(
                f"blob version {str(saved.get('v'))[:20]!r}, we read {SAVED_STATE_VERSION}"
            )
        if saved.get("vm") != self.label:
            raise ValueError(f"blob is for VM {str(saved.get('vm'))[:64]!r}, not {self.label!r}")
        if saved.get("vcpus") != vcpus:
            raise ValueError("blob's vCPU count differs from the hello's")
        epoch = _blob_int(saved, "epoch", 0, attach.MAX_EPOCH)
        posts = _blob_int(saved, "posts", 0, msg.posts)
        interrupt_page = _blob_int(saved, "interrupt_page", 0, attach.MAX_GPA - 4096)
        if interrupt_page % 4096 or (
            interrupt_page and not self.memory.contains(interrupt_page, 4096)
        ):
            raise ValueError(f"interrupt_page {interrupt_page:#x} is not a page of guest RAM")
        devs = saved.get("devices")
        if type(devs) is not list or len(devs) != len(self.devices):
            raise ValueError(
                f"blob has {len(devs) if type(devs) is list else 'no'} devices, "
                f"this VM {len(self.devices)}"
            )
        states: list[object] = []
        for i, (d, dev) in enumerate(zip(devs, self.devices, strict=True)):
            if (
                type(d) is not dict
                or d.get("name") != dev.name
                or d.get("if_type") != dev.if_type.bytes
            ):
                raise ValueError(f"device {i} is not a {dev.name} as in the blob (config changed?)")
            states.append(d.get("state"))
        newbus = bus.VmBusServer(vcpu_count=max(1, vcpus), validate_pfns=self._pfns_in_ram)
        ram_pages = sum(reg.size for reg in self.memory.regions) >> 12
        newbus.max_gpadl_pages = self.limits.gpadl_pages(ram_pages, GPADL_PAGES_SLACK)
        newbus.restore(saved.get("bus"))
        relids = set(newbus.relids())

        def triples(key: str) -> dict[int, tuple[Device, int]]:
            raw = saved.get(key)
            if type(raw) is not list or len(raw) > attach.MAX_RELID:
                raise ValueError(f"{key} must be a list")
            out: dict[int, tuple[Device, int]] = {}
            for t in raw:
                if (
                    type(t) is not list
                    or len(t) != 3
                    or not all(type(x) is int for x in t)
                    or t[0] not in relids
                    or t[0] in out
                    or not 0 <= t[1] < len(self.devices)
                ):
                    raise ValueError(f"{key}: bad entry {str(t)[:60]}")
                dev = self.devices[t[1]]
                offer = newbus.offer_of(t[0])
                if offer.if_type != dev.if_type or offer.sub_channel_index != t[2]:
                    raise ValueError(f"{key}: relid {t[0]} is not {dev.name} sub-channel {t[2]}")
                out[t[0]] = (dev, t[2])
            return out

        device_of = triples("relids")
        if set(device_of) != relids:
            raise ValueError("relids do not cover the bus's channels")
        reoffer = triples("reoffer")
        if not all(newbus.is_rescinded(r) for r in reoffer):
            raise ValueError("reoffer names a channel that is not rescinded")
        runtime: dict[int, list[int]] = {}
        raw_rt = saved.get("runtime")
        if type(raw_rt) is not list or len(raw_rt) > len(self.devices):
            raise ValueError("runtime must be a list")
        for t in raw_rt:
            if (
                type(t) is not list
                or len(t) != 2
                or type(t[0]) is not int
                or not 0 <= t[0] < len(self.devices)
                or type(t[1]) is not list
                or not all(
                    type(r) is int and device_of.get(r, (None, 0))[0] is self.devices[t[0]]
                    for r in t[1]
                )
            ):
                raise ValueError(f"runtime: bad entry {str(t)[:60]}")
            runtime[id(self.devices[t[0]])] = list(t[1])
        opened = {ev.relid: ev for ev in newbus.open_channels()}
        outbox = _check_outbox(saved.get("outbox"), vcpus, msg.applied)
        fds: dict[int, tuple[int, int]] = {}
        stale: list[int] = []
        for c in msg.channels:
            if c.relid not in opened:
                if c.relid not in device_of:
                    raise ValueError(f"eventfds for relid {c.relid}, which is not open")
                # An offered channel the state has closed: the old vmbusd died between
                # that state and its unbind. Its fds are closed below (not taken) and
                # the VMM is told to unbind it again.
                stale.append(c.relid)
                continue
            for fd in (c.kick, c.call):
                if not _is_eventfd(fd):
                    raise ValueError(f"relid {c.relid}: fd is not an eventfd")
            fds[c.relid] = (c.kick, c.call)
        for dev, state in zip(self.devices, states, strict=True):
            try:
                dev.restore(state)
            except ValueError as exc:
                raise ValueError(f"{dev.name}: {exc}") from None
            except Exception as exc:  # a device bug: refuse rather than serve half a device
                raise ValueError(f"{dev.name}: device bug in restore(): {_describe(exc)}") from None
        # Everything checked: take over.
        self.bus = newbus
        self.device_of = device_of
        self._reoffer = reoffer
        self._runtime_subs = runtime
        self.epoch = epoch
        self._posts_done = posts
        self.interrupt_page = interrupt_page
        self.resumed = True
        self._resumable = False
        self._close_inflight_region()
        self._inflight_map = mmap.mmap(msg.inflight, INFLIGHT_REGION_SIZE)
        self._inflight_fd = msg.inflight
        self._inflight_sent = True
        taken.add(msg.inflight)
        broken: list[int] = []
        need_bind: list[int] = []
        for relid, ev in opened.items():
            pair = fds.get(relid)
            if pair is not None:
                taken.update(pair)
            if not self._resume_channel(ev, pair):
                broken.append(relid)
            elif pair is None:
                need_bind.append(relid)
        log.info(
            "%s: resumed: %d channel(s) open, %d GPADL(s), VMBus %s",
            self.label,
            len(self.open),
            newbus.gpadl_count,
            vp.version_str(newbus.version) if newbus.version else "not connected",
        )
        # What the VMM had not applied of the old outbox goes out again, under a new
        # state; channels whose eventfds did not come back get fresh ones (bind).
        self._outbox = []
        for entry in outbox[msg.applied :]:
            if entry[0] == "post":
                await self._send(
                    attach.PostToGuest(vcpu=entry[1], payload=entry[2], epoch=self.epoch)
                )
            elif entry[0] == "unbind":
                await self._send(attach.Unbind(relid=entry[1], epoch=self.epoch))
            elif entry[1] in need_bind:
                need_bind.remove(entry[1])
                await self._send(self._bind_of(self.open[entry[1]]))
        for relid in need_bind:
            await self._send(self._bind_of(self.open[relid]))
        resent = {e[1] for e in outbox[msg.applied :] if e[0] == "unbind"}
        for relid in stale:
            if relid not in resent:
                await self._send(attach.Unbind(relid=relid, epoch=self.epoch))
        out, self._outbox = self._outbox, None
        self._last_blob = None
        self._state_wanted = True
        await self._flush(out)
        for oc in self.open.values():
            oc.call.signal()  # the last vmbusd may have published without signalling
        for relid in broken:
            self._pump_soon_reset(relid)
        # A GPADL the guest was tearing down while a device held it: holds do not
        # survive a restart (and a dying GPADL cannot be taken again), so its
        # TORNDOWN is owed now; the pump sends it under a state.
        if self.bus.finish_teardowns():
            self._pump_soon()

    def _bind_of(self, oc: _ChannelTask) -> attach.Bind:
        return attach.Bind(
            relid=oc.relid,
            connection_id=oc.connection_id,
            vcpu=oc.vcpu,
            kick=oc.kick.fd,
            call=oc.call.fd,
            epoch=self.epoch,
            interrupt_page=self.interrupt_page,
        )

    def _pump_soon_reset(self, relid: int) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._reset_channel, relid)

    def _device_context(
        self, dev: Device, sub: int, ev: bus.OpenRequest, mapping: RingPairMapping, *, resumed: bool
    ) -> DeviceContext:
        """The DeviceContext of an open channel, fresh or resumed (one builder for both)."""
        assert self.bus is not None and self.bus.version is not None
        label = f"{self.label}/{ev.relid}"
        return DeviceContext(
            vm_name=self.label,
            session_id=self.session_id,
            version=self.bus.version,
            relid=ev.relid,
            sub_channel_index=sub,
            target_vp=ev.target_vp,
            userdata=ev.userdata,
            memory=DeviceMemory(self.memory),
            log=LabelledLog(logging.getLogger(f"vmbus.device.{dev.name}"), {"label": label}),
            _gpadl=functools.partial(self._device_gpadl, ev.relid),
            _enable_subchannels=functools.partial(self.enable_subchannels, dev),
            resumed=resumed,
            inflight=self._inflight_slot(ev.relid),
            rings=mapping,
            requests=self.limits.requests,  # the VM-wide budget (vmbus.limits)
            _save_state=self._save_state_now if resumed or self.saved_state else None,
        )

    def _resume_channel(self, ev: bus.OpenRequest, fds: tuple[int, int] | None) -> bool:
        """Map a restored open channel's rings and start its device task again; False
        when its rings are not usable any more (the channel is then reset)."""
        dev, sub = self.device_of[ev.relid]
        try:
            mapping = self.memory.map_ring_pair(ev.gpadl, ev.downstream_offset)
        except GuestMemoryError as exc:
            log.warning("%s: relid %d: cannot resume: %s", self.label, ev.relid, exc)
            return False
        ctx = self._device_context(dev, sub, ev, mapping, resumed=True)
        problem = None
        try:
            dev.resume_rings(ctx)
            reader, writer = open_ring_pair(mapping, host=True, allowed_types=dev.packet_types)
        except RingCorrupt as exc:
            problem = f"bad ring indices: {exc}"
        except Exception as exc:
            problem = f"device bug in resume_rings(): {_describe(exc)}"
        if problem is not None:
            log.warning("%s: relid %d: cannot resume: %s", self.label, ev.relid, problem)
            ctx.rings = ctx.inflight = None
            del ctx
            mapping.close()
            return False
        if fds is None:
            kick, call = EventFd(new_eventfd()), EventFd(new_eventfd())
        else:
            kick, call = EventFd(fds[0]), EventFd(fds[1])
        channel = Channel(reader, writer, kick, call, name=f"{self.label}/{ev.relid}")
        oc = _ChannelTask(
            ev.relid, ev.connection_id, ev.target_vp, dev, mapping, channel, kick, call
        )
        self.open[ev.relid] = oc
        assert self._nursery is not None
        self._nursery.start_soon(self._serve_channel, oc, ctx, name=f"channel {ev.relid}")
        return True

    # -- GPADLs held by devices -------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _device_gpadl(self, relid: int, handle: int) -> AsyncIterator[GpadlMapping]:
        """`ctx.gpadl(handle)`: pin, map, hand out; on exit unmap (or cut off), unpin."""
        assert self.bus is not None
        try:
            gpadl = self.bus.gpadl_acquire(handle, relid)
        except bus.UnknownGpadl as exc:
            raise GuestError(str(exc)) from None
        try:
            mapping = self.memory.map_linear(gpadl)
        except GuestMemoryError as exc:
            self.bus.gpadl_release(gpadl)
            self._pump_soon()
            raise GuestError(f"GPADL {handle:#x}: {exc}") from None
        held = _HeldGpadl(relid, handle)
        self._held.append(held)
        try:
            yield GpadlMapping(handle, mapping, held.teardown)
        finally:
            self._held.remove(held)
            self._unmap_device_buffer(relid, handle, mapping)
            self.bus.gpadl_release(gpadl)
            self._pump_soon()  # may be the last ref: GPADL_TORNDOWN goes out

    def _unmap_device_buffer(self, relid: int, handle: int, mapping: LinearMapping) -> None:
        try:
            mapping.close()
        except GuestMemoryError:
            # The device kept a view past the block: cut it off from the guest's
            # pages so that nothing it does later can reach them.
            mapping.revoke()
            log.error(
                "%s: relid %d: device bug: a view of GPADL %#x outlived ctx.gpadl(); "
                "its pages were replaced by private zero pages",
                self.label,
                relid,
                handle,
            )

    def _gpadl_teardown_requested(self, handle: int, relid: int) -> None:
        holders = [h for h in self._held if h.handle == handle and h.relid == relid]
        for h in holders:
            h.teardown.set()
        if holders and self._nursery is not None:
            self._nursery.start_soon(self._enforce_gpadl_release, holders)

    async def _enforce_gpadl_release(self, holders: list[_HeldGpadl]) -> None:
        """A guest waits for GPADL_TORNDOWN (Linux without a timeout): a device that
        does not let go in time gets its channel reset, which makes it let go."""
        await trio.sleep(GPADL_RELEASE_GRACE_S)
        for h in holders:
            if h in self._held:
                log.warning(
                    "%s: relid %d: device held GPADL %#x %.0f s after the guest tore it "
                    "down; channel reset",
                    self.label,
                    h.relid,
                    h.handle,
                    GPADL_RELEASE_GRACE_S,
                )
                oc = self.open.get(h.relid)
                if oc is not None:
                    oc.cancel.cancel()
                    oc.failed = oc.failed or "held a GPADL past its teardown"
                    return

    # -- channels -------------------------------------------------------------------

    async def _open_channel(self, ev: bus.OpenRequest) -> int:
        """Map the rings, validate their indices, bind eventfds, start the device task."""
        dev, sub = self.device_of[ev.relid]
        if not self.limits.may_open(len(self.open), ev.relid):  # logs its one line
            return vp.STATUS_UNSUCCESSFUL
        try:
            mapping = self.memory.map_ring_pair(ev.gpadl, ev.downstream_offset)
        except GuestMemoryError as exc:
            log.warning("%s: relid %d: open refused: %s", self.label, ev.relid, exc)
            return vp.STATUS_UNSUCCESSFUL
        try:
            reader, writer = open_ring_pair(mapping, host=True, allowed_types=dev.packet_types)
        except RingCorrupt as exc:
            log.warning(
                "%s: relid %d: open refused, bad ring indices: %s", self.label, ev.relid, exc
            )
            refused = True
        else:
            refused = False
        if refused:  # outside the handler: its traceback's frames viewed the rings
            mapping.close()
            return vp.STATUS_UNSUCCESSFUL
        kick, call = EventFd(new_eventfd()), EventFd(new_eventfd())
        channel = Channel(reader, writer, kick, call, name=f"{self.label}/{ev.relid}")
        oc = _ChannelTask(
            ev.relid, ev.connection_id, ev.target_vp, dev, mapping, channel, kick, call
        )
        await self._send(
            attach.Bind(
                relid=ev.relid,
                connection_id=ev.connection_id,
                vcpu=ev.target_vp,
                kick=kick.fd,
                call=call.fd,
                epoch=self.epoch,
                interrupt_page=self.interrupt_page,
            )
        )
        self.open[ev.relid] = oc
        ctx = self._device_context(dev, sub, ev, mapping, resumed=False)
        self._clear_inflight_slot(ev.relid)  # a fresh channel: no record of an older one
        assert self._nursery is not None
        self._nursery.start_soon(self._serve_channel, oc, ctx, name=f"channel {ev.relid}")
        return 0

    async def _serve_channel(self, oc: _ChannelTask, ctx: DeviceContext) -> None:
        """One channel's task: the boundary where whatever escapes a device stops this
        channel only, with one log line that says whose fault it was."""
        guest_fault = True
        try:
            with oc.cancel:
                await oc.device.serve(oc.channel, ctx)
        except Exception as exc:
            guest_fault, oc.failed = _blame(exc, oc.device.name)
            if not guest_fault:  # the traceback as text: a record must not pin the frames
                log.debug("%s: %s", ctx.log.extra, "".join(traceback.format_exception(exc)))
            del exc
        finally:
            oc.done.set()
        if oc.failed:
            self.failed_channels[oc.relid] = oc.failed
            (log.warning if guest_fault else log.error)(
                "%s: relid %d (%s): %s; channel reset",
                self.label,
                oc.relid,
                oc.device.name,
                oc.failed,
            )
            if self._on_channel_event:
                self._on_channel_event(self.label, oc.relid, oc.failed)
            await self._reset_channel(oc.relid)

    async def _reset_channel(self, relid: int) -> None:
        """Channel reset: rescind the broken channel; once the guest has released it,
        the same device is offered again on a fresh channel (the guest's driver
        re-probes, as after a hot-remove and hot-add)."""
        if self.bus is None or relid not in self.device_of:
            return
        dev, sub = self.device_of[relid]
        relids = [relid]
        if sub == 0:
            # A primary takes its sub-channels with it (Linux removes the whole device);
            # the ones enabled at runtime are forgotten, the device asks again.
            runtime = set(self._runtime_subs.pop(id(dev), []))
            relids += [r for r, (d, s) in self.device_of.items() if d is dev and s > 0]
        else:
            runtime = set()
        for r in relids:
            if r not in runtime:
                self._reoffer[r] = self.device_of[r]
            with contextlib.suppress(vp.LocalProtocolError):  # already rescinded
                self.bus.rescind(r)
        await self._pump()

    async def _rebind(self, relid: int, vcpu: int) -> None:
        """MODIFYCHANNEL: the guest moved the channel's interrupts to another vCPU."""
        oc = self.open.get(relid)
        if oc is None:
            return
        oc.vcpu = vcpu
        await self._send(attach.Unbind(relid=relid, epoch=self.epoch))
        await self._send(
            attach.Bind(
                relid=relid,
                connection_id=oc.connection_id,
                vcpu=vcpu,
                kick=oc.kick.fd,
                call=oc.call.fd,
                epoch=self.epoch,
                interrupt_page=self.interrupt_page,
            )
        )

    async def _close_channel(
        self, relid: int, *, notify_bus: bool = True, unbind: bool = True
    ) -> None:
        oc = self.open.pop(relid, None)
        if oc is not None:
            oc.cancel.cancel()
            await oc.done.wait()
            if unbind:
                with contextlib.suppress(Exception):
                    await self._send(attach.Unbind(relid=relid, epoch=self.epoch))
            oc.kick.close()
            oc.call.close()
            oc.channel.release()
            oc.mapping.close()
            self.closed_stats.append((relid, oc.device.name, oc.channel.stats.as_dict()))
        if notify_bus and self.bus is not None:
            # Called from inside the pump: its loop carries out what this queues.
            self.bus.close_complete(relid)


def _load_blob(fd: int) -> dict[str, object]:
    """Read a saved-state blob the VMM gave back: a sealed, immutable memfd of at most
    MAX_SAVED_STATE bytes holding one msgpack map (ValueError otherwise)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError("blob fd is not a memfd")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise ValueError("blob fd is not a sealed memfd") from None
    if seals & STATE_SEALS != STATE_SEALS:
        raise ValueError("blob memfd is not sealed against writes, shrinking and growing")
    if not 0 < st.st_size <= MAX_SAVED_STATE:
        raise ValueError(f"blob of {st.st_size} bytes (1..{MAX_SAVED_STATE})")
    data = os.pread(fd, st.st_size, 0)
    if len(data) != st.st_size:
        raise ValueError("blob shorter than its size")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises a zoo of types for bad input
        raise ValueError(f"blob is not msgpack: {type(exc).__name__}") from None
    if type(obj) is not dict:
        raise ValueError("blob is not a msgpack map")
    return obj


def _check_inflight(fd: int) -> None:
    """The in-flight region given back: a memfd of exactly our size, sealed against
    shrinking and growing (so our mapping can never fault), still writable."""
    st = os.fstat(fd)
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS) if stat.S_ISREG(st.st_mode) else 0
    except OSError:
        seals = 0
    if seals & INFLIGHT_SEALS != INFLIGHT_SEALS or seals & fcntl.F_SEAL_WRITE:
        raise ValueError("in-flight fd is not a memfd sealed against shrinking and growing")
    if st.st_size != INFLIGHT_REGION_SIZE:
        raise ValueError(f"in-flight region of {st.st_size} bytes, not {INFLIGHT_REGION_SIZE}")
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if flags & os.O_ACCMODE != os.O_RDWR:
        raise ValueError("in-flight fd is not open read/write")


def _is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


def _blob_int(d: dict[str, object], key: str, lo: int, hi: int) -> int:
    v = d.get(key)
    if type(v) is not int or not lo <= v <= hi:
        raise ValueError(f"{key} must be an int in [{lo}, {hi}]")
    return v


def _check_outbox(raw: object, vcpus: int, applied: int) -> list[tuple[str, int, bytes]]:
    """The saved outbox: messages the VMM may not have applied yet."""
    if type(raw) is not list or len(raw) > MAX_OUTBOX:
        raise ValueError(f"outbox must be a list of at most {MAX_OUTBOX}")
    if applied > len(raw):
        raise ValueError(f"applied {applied} but the outbox holds {len(raw)}")
    out: list[tuple[str, int, bytes]] = []
    for e in raw:
        ok = type(e) is list and len(e) >= 2 and type(e[1]) is int
        if ok and e[0] == "post":
            ok = (
                len(e) == 3
                and 0 <= e[1] < vcpus
                and type(e[2]) is bytes
                and len(e[2]) <= attach.MAX_PAYLOAD
            )
        elif ok and e[0] in ("bind", "unbind"):
            ok = len(e) == 2 and 1 <= e[1] <= attach.MAX_RELID
        else:
            ok = False
        if not ok:
            raise ValueError(f"outbox: bad entry {str(e)[:60]}")
        out.append((e[0], e[1], e[2] if e[0] == "post" else b""))
    return out


def _describe(exc: BaseException) -> str:
    """`Type: message (at file:line)` of where it was raised: one log line's worth."""
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno})" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) groups: a device that runs a nursery raises
    ExceptionGroups, and the blame goes to what is inside."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _blame(exc: BaseException, device: str) -> tuple[bool, str]:
    """(guest's fault?, one-line reason) for an exception that escaped a device.

    Guest misbehaviour: a GuestError, a corrupt ring, a malformed packet. Anything
    else among the leaves is a device bug, and a bug wins over guest faults."""
    from vmbus.packet import PacketError

    leaves = [e for e in _leaves(exc) if not isinstance(e, trio.Cancelled)] or [exc]
    for leaf in leaves:
        if not isinstance(leaf, GuestError | RingCorrupt | PacketError):
            return False, f"device bug in {device}: {_describe(leaf)}"
    leaf = leaves[0]
    if isinstance(leaf, RingCorrupt):
        return True, f"corrupt ring: {leaf}"
    if isinstance(leaf, GuestError):
        return True, f"guest broke the {device} protocol: {leaf.reason}"
    return True, f"malformed packet from the guest: {leaf}"


async def serve_listener(
    path: str,
    devices_factory: Callable[[], Sequence[Device]],
    *,
    allowed_uids: set[int] | None = None,
    sessions: set[VmSession] | None = None,
    handshake_timeout: float | None = None,
    max_sessions: int | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """`vmbusd serve --listen PATH`: accept VMMs, one isolated session each (kept in
    `sessions`, when given, for the stats servers).

    Only established sessions (hello exchanged) count toward `max_sessions`
    (default MAX_SESSIONS); a connection still in its handshake costs a slot of its
    uid's `attach.MAX_PENDING_HANDSHAKES_PER_UID` and has `handshake_timeout`
    (default `attach.HANDSHAKE_TIMEOUT_S`) to say hello. So silent connections can
    neither fill the service nor stay forever.

    Cancelling it is a clean shutdown: every session tells its VMM `error shutdown`,
    lets go of guest memory, and the socket file is removed.
    """
    limit = MAX_SESSIONS if max_sessions is None else max_sessions
    async with await attach.listen(
        path, allowed_uids=allowed_uids, handshake_timeout=handshake_timeout
    ) as listener:
        task_status.started()
        live: set[VmSession] = sessions if sessions is not None else set()
        established: set[VmSession] = set()
        count = 0

        def admit(session: VmSession, hello: attach.Hello) -> str | None:
            # Called by the handshake with no checkpoint before the session is
            # counted, so concurrent handshakes cannot overshoot the limit.
            if len(established) >= limit:
                return f"{limit} VMs already attached"
            name = hello.vm_id or session.label
            if not session.waits_for_predecessor(name):  # else `run` picks them later
                refusal = session.pick_devices(name)
                if refusal is not None:
                    return refusal
            established.add(session)
            return None

        async with trio.open_nursery() as nursery:
            while True:
                conn = await listener.accept()
                if len(established) >= limit:  # refuse at once rather than after hello
                    await conn.abort(attach.ErrorCode.RESOURCE, f"{limit} VMs already attached")
                    continue
                count += 1
                # Devices are built once the hello names the VM: a config's
                # [vm.NAME] list (`for_vm`), else the factory's one list.
                for_vm = getattr(devices_factory, "for_vm", None)
                session = VmSession(
                    conn,
                    [],
                    vm_label=f"vm{count}",
                    devices_for=for_vm or (lambda _name, f=devices_factory: f()),
                    limits_for=getattr(devices_factory, "limits_for", None),
                    others=lambda: live,
                )
                conn.admit = lambda hello, s=session: admit(s, hello)
                live.add(session)
                nursery.start_soon(_run_isolated, session, live, established)


async def _run_isolated(
    session: VmSession, live: set[VmSession], established: set[VmSession] | None = None
) -> None:
    try:
        await session.run()
    except Exception:
        log.exception("%s: session failed", session.label)
    finally:
        live.discard(session)
        if established is not None:
            established.discard(session)


def service_snapshot(sessions: set[VmSession]) -> dict[str, object]:
    return {"vms": [s.snapshot() for s in sorted(sessions, key=lambda s: s.label)]}


async def serve_until_signalled(
    path: str,
    devices_factory: Callable[[], Sequence[Device]],
    *,
    allowed_uids: set[int] | None = None,
    stats_path: str | None = None,
    control_path: str | None = None,
    metrics: tuple[str, int] | None = None,
    announce: Callable[[str], None] = log.warning,
    max_sessions: int | None = None,
) -> str:
    """Serve until SIGTERM or SIGINT, then shut down cleanly; returns a one-line summary.

    `announce` gets one line once every socket and port is bound (never before). A path
    or port that cannot be used raises UserError; a stale socket file is replaced, a
    live service's socket is refused. Every socket file is removed on the way out.
    """
    from vmbus import stats
    from vmbus.cliutil import UserError, claim_socket_path, describe_bind_error

    sessions: set[VmSession] = set()

    def snap() -> dict[str, object]:
        # `session` tells apart VMs that share a name (the VMM picks the name).
        ordered = sorted(sessions, key=lambda s: (s.label, s.session_id))
        return {"vms": [dict(s.snapshot(), session=s.session_id) for s in ordered]}

    claim_socket_path(path, what="attach socket")
    bound = False

    async def listener(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await serve_listener(
                path,
                devices_factory,
                allowed_uids=allowed_uids,
                sessions=sessions,
                max_sessions=max_sessions,
                task_status=task_status,
            )
        except OSError as exc:
            if bound:
                raise
            raise UserError(describe_bind_error(path, exc, what="attach socket")) from exc

    stopped_by = ""
    attached = 0
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(listener)
            bound = True
            ready = [f"listening on {path}"]
            if stats_path:
                await nursery.start(
                    lambda **kw: stats.serve_stats(
                        stats_path, snap, allowed_uids=allowed_uids, **kw
                    )
                )
                ready.append(f"stats on {stats_path}")
            if control_path:
                from vmbus import control

                await nursery.start(
                    lambda **kw: control.serve_control(
                        control_path, sessions, allowed_uids=allowed_uids, **kw
                    )
                )
                ready.append(f"control on {control_path}")
            if metrics:
                port = await nursery.start(
                    lambda **kw: stats.serve_metrics(metrics[0], metrics[1], snap, **kw)
                )
                ready.append(f"metrics on http://{metrics[0]}:{port}/metrics")
            announce("; ".join(ready))
            async for signum in signals:
                stopped_by = signal.Signals(signum).name
                attached = len(sessions)
                log.info("%s: shutting down", stopped_by)
                nursery.cancel_scope.cancel()
                break
    return f"{stopped_by}: stopped; {attached} VM(s) were attached and told 'shutdown'"


async def attach_to(
    path: str,
    devices: Sequence[Device],
    devices_for: Callable[[str], Sequence[Device]] | None = None,
) -> str:
    """`vmbusd attach PATH`: connect to a VMM that listens, serve its VM until it leaves
    or SIGTERM/SIGINT; returns a one-line summary. Nobody listening is a UserError.
    `devices_for` picks (more) devices by the VM's name once its hello names it."""
    from vmbus.cliutil import Stopped, UserError, describe_connect_error, run_until_signalled

    try:
        conn = await attach.connect(path)
    except OSError as exc:
        raise UserError(describe_connect_error(path, exc)) from exc
    session = VmSession(conn, devices, vm_label=str(uuid.uuid4())[:8], devices_for=devices_for)
    stopped = Stopped()
    await run_until_signalled(session.run, stopped)
    served = f"{len(session.closed_stats) + len(session.open)} channel(s) served"
    if stopped.signum is not None:
        return f"{stopped.name}: detached from VM {session.label} ({served}); VMM told 'shutdown'"
    if session.peer is None:
        raise UserError(f"{path}: the attach handshake failed (is it a VMM's attach socket?)")
    return f"VM {session.label} ended the session ({served})"
