"""The service: one attach session per VM, one nursery per VM, one task per channel.

`VmSession` is the thin trio layer over the sans-IO bus (`vmbus.bus.VmBusServer`):
it feeds the guest's posted messages in, carries the bus's events out (control
messages to the VMM, ring mappings, channel tasks), and keeps a misbehaving
channel or VM from touching any other.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio

from vmbus import __version__, attach, bus
from vmbus import protocol as vp
from vmbus.channel import Channel, EventFd, new_eventfd
from vmbus.device import ChannelInfo, Device
from vmbus.memory import GuestMemory, GuestMemoryError
from vmbus.ring import RingCorrupt, RingReader, RingWriter

log = logging.getLogger(__name__)

MAX_SESSIONS = 64  # VMs attached at once: established sessions (hello done) only
GPADL_PAGES_SLACK = 8190  # one maximal GPADL beyond the VM's RAM
MAX_SUBCHANNELS = 64  # per device, on top of its primary channel
SHUTDOWN_GRACE_S = 5.0  # how long a session's teardown may take once cancelled


@dataclass
class OpenChannel:
    """Host-side state of one open channel; owned by the session."""

    relid: int
    connection_id: int
    vcpu: int
    device: Device
    mapping: object
    channel: Channel
    kick: EventFd
    call: EventFd
    cancel: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    failed: str | None = None


class VmSession:
    """Serves one VM's VMBus over one attach connection."""

    def __init__(
        self,
        conn: attach.AttachConnection,
        devices: Sequence[Device],
        *,
        vm_label: str = "vm",
        on_channel_event: Callable[[str, int, str], None] | None = None,
    ) -> None:
        self.conn = conn
        self.devices = list(devices)
        self.label = vm_label
        self.session_id = uuid.uuid4().hex[:8]  # tells apart VMs that share a name
        self.memory = GuestMemory()
        self.bus: bus.VmBusServer | None = None
        self.device_of: dict[int, tuple[Device, int]] = {}  # relid -> (device, sub index)
        self.open: dict[int, OpenChannel] = {}
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

    def snapshot(self) -> dict[str, object]:
        """This VM's part of `vmbusd stats`: plain data, safe to serialise."""
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
                    software=f"vmbusd {__version__}",
                ),
            )  # bounded by the connection's handshake deadline; conn.admit may refuse
            self.label = self.peer.vm_id or self.label
            self.bus = bus.VmBusServer(
                vcpu_count=max(1, self.peer.vcpus), validate_pfns=self._pfns_in_ram
            )
            for dev in self.devices:
                self._offer(dev)
            log.info("%s: attached (%d vCPUs)", self.label, self.peer.vcpus)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    await self._receive_loop()
                except attach.ConnectionClosed:
                    self._peer_gone = True
                    log.info("%s: VMM disconnected", self.label)
                except attach.AttachProtocolError as exc:
                    self._peer_gone = True
                    if exc.code == attach.ErrorCode.RESOURCE:  # not logged by attach itself
                        log.warning("%s: %s", self.label, exc)
                    await self.conn.abort(exc.code, str(exc), quiet=True)
                finally:
                    for oc in list(self.open.values()):
                        oc.cancel.cancel()
        except attach.ConnectionClosed:
            self._peer_gone = True
            log.info("%s: VMM disconnected during hello", self.label)
        except (attach.AttachProtocolError, attach.PeerError) as exc:
            self._peer_gone = True
            log.warning("%s: attach handshake failed: %s", self.label, exc)
        finally:
            # Runs even when the service is shutting down (cancelled): shielded, bounded.
            with trio.move_on_after(SHUTDOWN_GRACE_S) as cs:
                cs.shield = True
                await self._teardown()

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
        self._offer(dev)
        await self._pump()

    async def add_subchannels(self, dev: Device, n: int) -> list[int]:
        """Offer n more sub-channels of `dev` (after its primary); returns their relids.

        Bounded by MAX_SUBCHANNELS per device: a guest asking for more gets fewer.
        """
        have = [sub for d, sub in self.device_of.values() if d is dev]
        if not have:
            raise ValueError(f"{dev.name} is not offered on this VM")
        start = max(have) + 1
        n = max(0, min(n, MAX_SUBCHANNELS + 1 - start))
        relids = [self._offer_one(dev, start + i) for i in range(n)]
        await self._pump()
        return relids

    async def remove_device(self, dev: Device) -> None:
        """Hot-remove: rescind every channel of the device."""
        assert self.bus is not None
        for relid, (d, _sub) in list(self.device_of.items()):
            if d is dev:
                self.bus.rescind(relid)
        await self._pump()

    async def _teardown(self) -> None:
        for relid in list(self.open):
            await self._close_channel(relid, notify_bus=False)
        try:
            self.memory.close()
        except GuestMemoryError as exc:  # a view still held: a bug, never a crash
            log.error("%s: guest memory not fully released: %s", self.label, exc)
        if not self._peer_gone:
            await self.conn.abort(attach.ErrorCode.SHUTDOWN, "vmbusd is detaching from this VM")
        else:
            with contextlib.suppress(Exception):
                await self.conn.aclose()

    # -- attach messages in --------------------------------------------------

    async def _receive_loop(self) -> None:
        assert self.bus is not None
        while True:
            msg = await self.conn.receive()
            if isinstance(msg, attach.PostFromGuest):
                self.bus.receive(msg.payload, msg.connection_id)
                await self._pump()
            elif isinstance(msg, attach.MemoryRegions):
                self._add_memory(msg)
            elif isinstance(msg, attach.Reset):
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
            self.bus.max_gpadl_pages = min(
                bus.DEFAULT_MAX_GPADL_PAGES, ram_pages + GPADL_PAGES_SLACK
            )

    def _pfns_in_ram(self, pfns: Sequence[int]) -> bool:
        return all(self.memory.contains(p << 12, 4096) for p in pfns)

    # -- bus events out ----------------------------------------------------------

    async def _pump(self) -> None:
        """Carry out everything the bus asked for, in order (from any task)."""
        async with self._pump_lock:
            await self._pump_locked()

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
            elif isinstance(ev, bus.BusReset):
                log.info("%s: VMBus reset: %s", self.label, ev.reason)
            elif isinstance(ev, bus.Connected):
                # Below 2.4 the guest gets channel interrupts through its interrupt page.
                self.interrupt_page = ev.interrupt_page if ev.version < vp.VERSION_WIN8 else 0
                log.info("%s: VMBus version %s negotiated", self.label, vp.version_str(ev.version))
            else:
                log.debug("%s: bus event %r", self.label, ev)

    async def _send(self, msg: attach.Message) -> None:
        async with self._send_lock:
            await self.conn.send(msg)

    async def _open_channel(self, ev: bus.OpenRequest) -> int:
        """Map the rings, validate their indices, bind eventfds, start the device task."""
        dev, sub = self.device_of[ev.relid]
        try:
            mapping = self.memory.map_ring_pair(ev.gpadl, ev.downstream_offset)
        except GuestMemoryError as exc:
            log.warning("%s: relid %d: open refused: %s", self.label, ev.relid, exc)
            return vp.STATUS_UNSUCCESSFUL
        reader = writer = None
        try:
            reader = RingReader(
                mapping.upstream_hdr,
                mapping.upstream_data,
                mapping.upstream_size,
                doubled=True,
                allowed_types=dev.packet_types,
            )
            writer = RingWriter(
                mapping.downstream_hdr,
                mapping.downstream_data,
                mapping.downstream_size,
                doubled=True,
            )
            reader.open()
            writer.open()
            # The guest's own indices too (spec 8.1: r, w < D and 8-aligned at open).
            reader.bytes_to_read()
            writer.bytes_to_write()
        except RingCorrupt as exc:
            log.warning(
                "%s: relid %d: open refused, bad ring indices: %s", self.label, ev.relid, exc
            )
            for ring in (reader, writer):
                if ring is not None:
                    ring.release()
            mapping.close()
            return vp.STATUS_UNSUCCESSFUL
        kick, call = EventFd(new_eventfd()), EventFd(new_eventfd())
        channel = Channel(reader, writer, kick, call, name=f"{self.label}/{ev.relid}")
        oc = OpenChannel(
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
        info = ChannelInfo(
            ev.relid,
            sub,
            ev.target_vp,
            ev.userdata,
            add_subchannels=lambda n, dev=dev: self.add_subchannels(dev, n),
        )
        assert self._nursery is not None
        self._nursery.start_soon(self._serve_channel, oc, info, name=f"channel {ev.relid}")
        return 0

    async def _serve_channel(self, oc: OpenChannel, info: ChannelInfo) -> None:
        """One channel's task. A failure stops this channel only, with one log line."""
        try:
            with oc.cancel:
                await oc.device.serve(oc.channel, info)
        except RingCorrupt as exc:
            oc.failed = f"corrupt ring: {exc}"
        except Exception as exc:  # a device bug or bad guest data: isolate it
            oc.failed = f"{type(exc).__name__}: {exc}"
            log.debug("channel failure", exc_info=True)
        finally:
            oc.done.set()
        if oc.failed:
            self.failed_channels[oc.relid] = oc.failed
            log.warning(
                "%s: relid %d (%s): channel stopped: %s",
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
        self._reoffer[relid] = self.device_of[relid]
        self.bus.rescind(relid)
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

    async def _close_channel(self, relid: int, *, notify_bus: bool = True) -> None:
        oc = self.open.pop(relid, None)
        if oc is not None:
            oc.cancel.cancel()
            await oc.done.wait()
            with contextlib.suppress(Exception):
                await self._send(attach.Unbind(relid=relid, epoch=self.epoch))
            oc.kick.close()
            oc.call.close()
            oc.channel.release()
            oc.mapping.close()  # type: ignore[attr-defined]
            self.closed_stats.append((relid, oc.device.name, oc.channel.stats.as_dict()))
        if notify_bus and self.bus is not None:
            # Called from inside the pump: its loop carries out what this queues.
            self.bus.close_complete(relid)


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

        def admit(session: VmSession) -> str | None:
            # Called by the handshake with no checkpoint before the session is
            # counted, so concurrent handshakes cannot overshoot the limit.
            if len(established) >= limit:
                return f"{limit} VMs already attached"
            established.add(session)
            return None

        async with trio.open_nursery() as nursery:
            while True:
                conn = await listener.accept()
                if len(established) >= limit:  # refuse at once rather than after hello
                    await conn.abort(attach.ErrorCode.RESOURCE, f"{limit} VMs already attached")
                    continue
                count += 1
                session = VmSession(conn, devices_factory(), vm_label=f"vm{count}")
                conn.admit = lambda _hello, s=session: admit(s)
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
    metrics: tuple[str, int] | None = None,
    announce: Callable[[str], None] = log.warning,
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


async def attach_to(path: str, devices: Sequence[Device]) -> str:
    """`vmbusd attach PATH`: connect to a VMM that listens, serve its VM until it leaves
    or SIGTERM/SIGINT; returns a one-line summary. Nobody listening is a UserError."""
    from vmbus.cliutil import Stopped, UserError, describe_connect_error, run_until_signalled

    try:
        conn = await attach.connect(path)
    except OSError as exc:
        raise UserError(describe_connect_error(path, exc)) from exc
    session = VmSession(conn, devices, vm_label=str(uuid.uuid4())[:8])
    stopped = Stopped()
    await run_until_signalled(session.run, stopped)
    served = f"{len(session.closed_stats) + len(session.open)} channel(s) served"
    if stopped.signum is not None:
        return f"{stopped.name}: detached from VM {session.label} ({served}); VMM told 'shutdown'"
    if session.peer is None:
        raise UserError(f"{path}: the attach handshake failed (is it a VMM's attach socket?)")
    return f"VM {session.label} ended the session ({served})"
