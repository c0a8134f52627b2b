"""The storvsc VSP: a synthetic SCSI controller on VMBus, over `scsi/` and `backends/`.

`StorvscDevice` drives `protocol.py` on every channel the guest opens. The
primary carries the init handshake; every channel carries EXECUTE_SRBs. An SRB's
data buffer is the GPA-direct ranges of its packet, turned into memoryviews of
guest RAM (zero copy) and handed to `ScsiController.execute`, so a READ lands in
the guest's pages straight from the backend and a WRITE leaves from them.

Per channel: one receive loop. The hot case, READ/WRITE to a memory or file LUN,
takes the fast path (`fastpath.py`): per received batch one call decodes every
such SRB, one executes them (memcpy; preadv2/pwritev2 RWF_NOWAIT), one builds
their completions, sent with `Channel.send_raw`; file requests that would block
go to one worker thread per batch (C again, on private copies). Everything else
(and any request the fast path is not sure of) takes the general path: one task
per SRB in a nursery (completed out of order, as backends finish), completions
batched by a sender task onto the channel the request came in on. At most
`queue_depth` requests per channel are taken off the ring and not yet completed
(fast or not): beyond that the loop stops reading (the
guest's ring fills, flow control, not memory). A guest that never reads its
completions fills its own inbound ring: that channel's sender waits, its cap is
reached, and only that channel stops.

What a hostile or confused guest gets:
- an answer with the protocol's status: out-of-order or unknown operations, SRBs
  before END_INITIALIZATION, bad cdb_length/data_in, data_transfer_length that is
  not what the ranges describe (or over max_transfer_bytes), ranges naming memory
  that is not RAM, CREATE_SUB_CHANNELS for 0, too many or twice; SRBs are refused
  as CHECK CONDITION / ILLEGAL REQUEST 24/00 (SRB INVALID_REQUEST|AUTOSENSE);
- a channel reset (one log line at the session boundary): a packet of the wrong
  size for the negotiated version, one that asks for no completion, a range list
  whose shape is broken (offset >= page size, count overflow, more ranges than fit);
- decisions: the direction is the SRB's `data_in` (the ranges are just memory, so
  a non-READ SRB's buffer is read-only to the device and a READ CDB with it is
  refused); a sense offer larger than the sense area is clamped, never refused;
  an absent LUN or any other path/target answers INQUIRY (PQ 3), REPORT LUNS
  (its list, empty elsewhere) and SRB INVALID_LUN to everything else.

Configured as `[[device]] type = "storvsc"` with `[[device.lun]]` tables (see
`StorvscDevice.__init__`).
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import struct
import uuid
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import trio

from devices.storvsc import fastpath
from devices.storvsc.backends.base import (
    BackendConfigError,
    DiskBackend,
    load_backend,
    open_backend,
)
from devices.storvsc.backends.file import FileBackend
from devices.storvsc.backends.memory import MemoryBackend
from devices.storvsc.fastpath import LunSpec, SrbFastPath
from devices.storvsc.protocol import (
    SCSI_IF_TYPE,
    CreateSubChannels,
    DataIn,
    ExecuteSrb,
    NtStatus,
    Reply,
    Srb,
    SrbStatus,
    VstorOp,
    VstorProtocol,
)
from devices.storvsc.scsi import DiskIdentity, ScsiController
from devices.storvsc.scsi.constants import MAX_LUN, Op
from devices.storvsc.scsi.disk import ScsiDisk
from vmbus.channel import Channel, PacketBatch
from vmbus.cliutil import UserError
from vmbus.device import Device, DeviceContext, DeviceOffer, GuestError, guest_error
from vmbus.journal import JournalError, Pending, RequestJournal
from vmbus.packet import (
    GpaDirectBatch,
    GpaStatus,
    PacketType,
    completion,
    inband,
    packet_types_mask,
    wants_completion,
)
from vmbus.ring import OutPacket, Packet, iter_packets

log = logging.getLogger(__name__)

DEFAULT_QUEUE_DEPTH = 256  # per channel, as OpenVMM's io_queue_depth
DEFAULT_MAX_TRANSFER = 0x40000  # 256 KiB, OpenVMM's value
DEFAULT_MAX_SUBCHANNELS = 8
DEFAULT_RING = 128 * 1024  # Linux's storvsc_ringbuffer_size
MAX_LUNS = 256
OPEN_TIMEOUT_S = 3.0  # a backend's async open, inside Linux's 5 s init step
REFUSALS_LOGGED = 8  # per channel; later refusals are only counted
SAVE_VERSION = 1  # of StorvscDevice.save()
_PROTO_SNAP = struct.Struct("<6q")  # VstorProtocol.save() before a journalled reply


def journal_entry_size(max_transfer_bytes: int) -> int:
    """Bytes per journal entry: the entry header and the largest EXECUTE_SRB packet
    a guest can send within max_transfer_bytes (descriptor, GPA-direct header, one
    range per page plus one, the vstor packet), with room to spare; 8-aligned."""
    pages = max_transfer_bytes // 4096 + 1
    return (32 + 16 + 8 + 8 + 8 * pages + 64 + 64 + 7) // 8 * 8


# VMBUSD_STORVSC_FAST=0 sends every request down the general path (A/B runs, tests).
FAST_PATH = os.environ.get("VMBUSD_STORVSC_FAST", "1") != "0"

_LUN_KEYS = ("backend", "lun", "serial", "wwn")  # ours; the rest goes to the backend
_RENAMED = {"readonly": "read_only", "uri": "address"}


class ConfigError(UserError):
    """A [[device.lun]] table is invalid (config.py prefixes where)."""


def _backend_names() -> list[str]:
    from importlib.metadata import entry_points

    return sorted(ep.name for ep in entry_points(group="vmbusd.disk_backends"))


def build_lun(
    index: int, entry: object, instance: uuid.UUID | None
) -> tuple[int, DiskBackend, DiskIdentity]:
    """One `[[device.lun]]` table -> (LUN number, backend, identity); ConfigError
    naming the table and the fix."""
    where = f"lun #{index + 1}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be a table ([[device.lun]])")
    lun = entry.get("lun", index)
    if not isinstance(lun, int) or isinstance(lun, bool) or not 0 <= lun < MAX_LUNS:
        raise ConfigError(f"{where}: lun must be an integer 0..{MAX_LUNS - 1}, not {lun!r}")
    where = f"lun #{index + 1} (LUN {lun})"
    name = entry.get("backend", "memory")
    if not isinstance(name, str):
        raise ConfigError(f"{where}: backend must be a string, not {name!r}")
    opts: dict[str, Any] = {}
    for k, v in entry.items():
        if k not in _LUN_KEYS:
            opts[_RENAMED.get(str(k), str(k))] = v
    if name == "file" and "path" in opts and "create_size" not in opts:
        if not os.path.exists(str(opts["path"])):
            raise ConfigError(
                f"{where}: file {opts['path']} does not exist (set create_size to create it)"
            )
    if ":" not in name and name not in _backend_names():
        raise ConfigError(
            f"{where}: unknown backend {name!r}; installed: {', '.join(_backend_names())} "
            "(or module:Class)"
        )
    try:
        backend = load_backend(name, opts)
    except (BackendConfigError, ValueError) as exc:
        raise ConfigError(f"{where} ({name}): {exc}") from exc
    except TypeError as exc:  # an option the backend does not take
        raise ConfigError(f"{where} ({name}): {exc}") from exc
    serial, wwn = entry.get("serial"), entry.get("wwn")
    for key, val in (("serial", serial), ("wwn", wwn)):
        if val is not None and not isinstance(val, str):
            raise ConfigError(f"{where}: {key} must be a string")
    # The NAA identifier (Linux's wwn-0x... name) is derived from disk_id: the
    # configured wwn, else the controller's instance GUID + LUN when the config
    # pins the instance, so it is stable across restarts exactly when asked.
    disk_id = wwn or (f"{instance}/lun-{lun}" if instance is not None else None)
    try:
        identity = DiskIdentity(serial=serial, disk_id=disk_id)
    except BackendConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return lun, backend, identity


class StorvscDevice(Device):
    """The synthetic SCSI controller (storvsp): LUNs at path 0, target 0."""

    if_type = SCSI_IF_TYPE
    name = "storvsc"
    # No completions from the guest: we never ask for any (ENUMERATE_BUS does not).
    packet_types = packet_types_mask(PacketType.INBAND, PacketType.GPA_DIRECT)

    def __init__(
        self,
        instance: uuid.UUID | None = None,
        *,
        ring_size_hint: int = DEFAULT_RING,
        lun: list[dict[str, Any]] | None = None,
        max_subchannels: int = DEFAULT_MAX_SUBCHANNELS,
        max_transfer_bytes: int = DEFAULT_MAX_TRANSFER,
        queue_depth: int = DEFAULT_QUEUE_DEPTH,
        controller: ScsiController | None = None,
    ) -> None:
        """`lun`: the `[[device.lun]]` tables: `backend` ("memory", "file", "nbd",
        any `vmbusd.disk_backends` entry point or module:Class; default memory),
        `lun` (default: its position), `serial`, `wwn`; every other key is the
        backend's option (`size`, `path`, `readonly`, `create_size`, `uri`,
        `block_size`, ...). `controller` gives a ready ScsiController instead."""
        pinned = instance
        super().__init__(instance, ring_size_hint=ring_size_hint)
        if not 0 <= max_subchannels <= 64:
            raise ConfigError("max_subchannels must be 0..64")
        if not 1 <= queue_depth <= 4096:
            raise ConfigError("queue_depth must be 1..4096")
        self.controller = controller or ScsiController()
        self._backends: list[DiskBackend] = []
        # Backends with an async open step (NBD: capacity and block size come from
        # the server) become LUNs once opened, on the first channel open.
        self._unopened: list[tuple[int, DiskBackend, DiskIdentity]] = []
        if lun is not None and not isinstance(lun, list):
            raise ConfigError("lun: write each LUN as a [[device.lun]] table")
        seen: set[int] = set()
        for i, entry in enumerate(lun or []):
            n, backend, identity = build_lun(i, entry, pinned)
            if n in seen or n in self.controller:
                raise ConfigError(f"lun #{i + 1}: LUN {n} is configured twice")
            if n > MAX_LUN:
                raise ConfigError(f"lun #{i + 1}: LUN {n} > {MAX_LUN}")
            seen.add(n)
            self._backends.append(backend)
            if getattr(backend, "open", None) is not None:
                self._unopened.append((n, backend, identity))
                continue
            try:
                self.controller.add_lun(n, backend, identity)
            except BackendConfigError as exc:
                raise ConfigError(f"lun #{i + 1} (LUN {n}): {exc}") from exc
        try:
            self.proto = VstorProtocol(
                max_sub_channels=max_subchannels, max_transfer_bytes=max_transfer_bytes
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        self.max_subchannels = max_subchannels
        self.queue_depth = queue_depth
        self._absent = ScsiController()  # other path/target: no LUNs (scan sees none)
        self._open_lock: trio.Lock | None = None
        self._rescan: trio.Event | None = None
        # Restart keeps the guest's disks only where their contents outlive vmbusd.
        self.restart_blocker = _restart_blocker(self.controller, self._unopened)
        self.restartable = self.restart_blocker is None
        self.max_in_flight_seen = 0  # per channel high-water mark (tests, stats)
        self.fast_completed = 0  # requests the fast path completed, every channel (tests)
        # `vmbusd serve` builds one device set just to check the config and drops
        # it without close(): a file backend's descriptor would leak. Whatever
        # close() did not release is released when the device is collected.
        weakref.finalize(self, _release_fds, self._backends)

    @property
    def offer(self) -> DeviceOffer:
        return DeviceOffer(
            self.if_type,
            self.instance,
            ring_size_hint=self.ring_size_hint,
            max_subchannels=self.max_subchannels,
        )

    async def reset(self) -> None:
        self.proto.reset()

    def save(self) -> object:
        """What the guest negotiated (docs/attach-protocol.md, "Restart"); the LUNs
        are the configuration's, the requests in flight are in each channel's journal."""
        return {"v": SAVE_VERSION, "vstor": self.proto.save()}

    def restore(self, state: object) -> None:
        if not isinstance(state, dict) or state.get("v") != SAVE_VERSION:
            raise ValueError(f"storvsc state: not version {SAVE_VERSION}")
        self.proto.restore(state.get("vstor"))

    async def close(self) -> None:
        for b in self._backends:  # every one, even when another fails
            try:
                await b.close()
            except Exception as exc:
                log.warning("storvsc: closing a %s failed: %s", type(b).__name__, exc)

    def bus_changed(self) -> None:
        """LUNs were added or removed: tell the guest (ENUMERATE_BUS, coalesced)."""
        if self._rescan is not None:
            self._rescan.set()

    async def hot_add_lun(self, entry: dict[str, Any]) -> int:
        """`vmbusd ctl ... disk add`: one `[[device.lun]]` table (validated as the
        config's), its backend opened, attached, and the guest told. ConfigError
        (one line) when the LUN is taken or the table is wrong."""
        n = entry.get("lun")
        if isinstance(n, int) and n in self.controller:
            raise ConfigError(f"LUN {n} is in use (remove it first)")
        if isinstance(n, int) and not isinstance(n, bool) and n > MAX_LUN:
            raise ConfigError(f"LUN {n} > {MAX_LUN}")
        try:
            n, backend, identity = build_lun(0, entry, self.instance)
        except ConfigError as exc:
            msg = str(exc).replace(f"lun #1 (LUN {n})", f"LUN {n}").replace("lun #1", "lun")
            raise ConfigError(msg) from exc
        try:
            if getattr(backend, "open", None) is not None:
                with trio.fail_after(OPEN_TIMEOUT_S):
                    await open_backend(backend)
            if n in self.controller:  # taken while the backend opened
                raise ConfigError(f"LUN {n} is in use (remove it first)")
            self.controller.add_lun(n, backend, identity)
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                with contextlib.suppress(Exception):
                    await backend.close()
            if isinstance(exc, (trio.TooSlowError, OSError, BackendConfigError)):
                raise ConfigError(f"LUN {n} ({entry.get('backend', 'memory')}): {exc}") from exc
            raise
        self._backends.append(backend)
        self.bus_changed()
        return n

    async def hot_remove_lun(self, lun: int) -> None:
        """`vmbusd ctl ... disk remove`: detach and tell the guest; later SRBs to it
        get INVALID_LUN. The backend is closed with the device (a request still
        running on it must never meet a closed, reused descriptor)."""
        if lun not in self.controller:
            raise ConfigError(f"no LUN {lun} (LUNs: {self.controller.luns or 'none'})")
        self.controller.remove_lun(lun)
        self.bus_changed()

    async def _open_backends(self, ctx: DeviceContext) -> None:
        """Open the backends that have an async open step and attach their LUNs,
        within Linux's 5 s per init step. One that fails (its server is down)
        stays absent, with one log line; the next primary open tries again."""
        if not self._unopened:
            return
        if self._open_lock is None:
            self._open_lock = trio.Lock()
        async with self._open_lock:
            for item in list(self._unopened):
                n, backend, identity = item
                try:
                    with trio.fail_after(OPEN_TIMEOUT_S):
                        await open_backend(backend)
                    self.controller.add_lun(n, backend, identity)
                except Exception as exc:  # its error, or TooSlowError
                    ctx.log.warning("LUN %d: backend did not open (%s); it stays absent", n, exc)
                    continue
                self._unopened.remove(item)

    async def serve(self, channel: Channel, ctx: DeviceContext) -> None:
        primary = ctx.sub_channel_index == 0
        if primary and not ctx.resumed:
            self.proto.reset()  # a new primary open starts the handshake again
        if primary or ctx.resumed:
            # Resumed, a sub-channel carries the guest's I/O (journalled requests
            # first) to LUNs the primary may still be opening: wait for them (the
            # lock), or they get INVALID_LUN and Linux fails the I/O.
            await self._open_backends(ctx)
        await _ChannelWorker(self, channel, ctx, primary).run()


class _ChannelWorker:
    """One open channel: receive loop, SRB tasks, completion sender."""

    def __init__(
        self, dev: StorvscDevice, channel: Channel, ctx: DeviceContext, primary: bool
    ) -> None:
        self.dev = dev
        self.channel = channel
        self.ctx = ctx
        self.primary = primary
        self.proto = dev.proto
        self.in_flight = 0
        self._pending: list[OutPacket] = []
        self._pending_requests = 0
        self._wake = trio.Event()
        self._room = trio.Event()
        self._refusals = 0
        self._fast = SrbFastPath()
        self._lun_sig: object = None
        self._fast_luns = 0
        self._file_backends: dict[int, FileBackend] = {}  # the fast path's file LUNs
        self.fast_completed = 0  # requests completed by the fast path (tests)
        self.leftovers: dict[int, int] = {}  # fast requests that had to block, by errno
        self._pending_entries: list[int] = []  # each _pending packet's journal entry, or -1
        self._dirty = False  # the negotiation moved on: save before sending its replies
        self.journal: RequestJournal | None = None
        # The VM's outstanding-request budget (vmbus.limits): a slot per request from
        # the ring to its completion, so one VM's disks cannot hold every request.
        self._budget = ctx.requests
        self._held = 0

    async def _acquire(self, want: int) -> int:
        """Up to `want` slots of the VM's budget (at least one; waits for one)."""
        if self._budget is None:
            return want
        got = await self._budget.acquire(want)
        self._held += got
        return got

    def _give_back(self, n: int) -> None:
        if self._budget is not None and n > 0:
            n = min(n, self._held)
            self._held -= n
            self._budget.release(n)

    def _open_journal(self) -> list[Pending]:
        """The channel's request journal, when the session can restart; after a
        restart, what the last vmbusd took and did not complete."""
        ctx = self.ctx
        if ctx.inflight is None or ctx.rings is None or not self.dev.restartable:
            return []
        size = journal_entry_size(self.proto.max_transfer_bytes)
        if ctx.resumed:
            try:
                self.journal, pending = RequestJournal.resume(
                    ctx.inflight, ctx.rings, entry_size=size, log=ctx.log
                )
                return pending
            except JournalError as exc:
                ctx.log.warning("resumed with no journal (%s): nothing to finish", exc)
        self.journal = RequestJournal.attach(ctx.inflight, ctx.rings, entry_size=size)
        return []

    async def run(self) -> None:
        pending = self._open_journal()
        for _ in pending:
            await self._acquire(1)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._sender)
                if self.primary:
                    self.dev._rescan = trio.Event()
                    nursery.start_soon(self._notifier)
                if pending:
                    self._finish(pending, nursery)
                await self._receive_loop(nursery)
        finally:
            self._give_back(self._held)  # a reset channel's requests are gone
            self._fast.release()  # its views of guest RAM and of memory disks
            if self.leftovers:
                self.ctx.log.debug(
                    "fast path: %d completed, leftovers by errno %s",
                    self.fast_completed,
                    self.leftovers,
                )

    def _finish(self, pending: list[Pending], nursery: trio.Nursery) -> None:
        """Complete, exactly once, what the last vmbusd took and did not complete:
        its replies again, its requests run again (READ and WRITE are idempotent,
        SYNCHRONIZE CACHE and FUA are issued again), in the order it took them."""
        snaps = [p for p in pending if p.reply is not None]
        if snaps and self.primary:
            try:  # the negotiation as it stood after the newest journalled reply
                self.proto.restore(list(_PROTO_SNAP.unpack_from(snaps[-1].reply or b"")))
            except (ValueError, struct.error) as exc:
                self.ctx.log.warning("journal: a reply's vstor state is unusable: %s", exc)
        decoder = self.ctx.memory.gpa_direct_decoder()
        done = 0
        for p in pending:
            tid, e = p.trans_id, p.entry
            if p.reply is not None:
                self.in_flight += 1
                self._queue(completion(tid, p.reply[_PROTO_SNAP.size :]), e)
                done += 1
                continue
            packet = p.packet or b""
            index = array.array("I", [0, len(packet)])
            try:
                if p.truncated:
                    raise ValueError("the packet was longer than its journal entry")
                (pkt,) = iter_packets(packet, index, 1)
                op = int.from_bytes(bytes(pkt.payload[:4]), "little")
                if op == VstorOp.CREATE_SUB_CHANNELS and self.proto.sub_channels_requested:
                    # Granted before the crash (the bus offered them): say so again.
                    self.in_flight += 1
                    self._queue(completion(tid, self.proto.subchannels_created(True)), e)
                    continue
                gpa = decoder.decode(packet, index, 1)
                self._take(pkt, nursery, gpa, 0, e)
            except (GuestError, ValueError) as exc:
                self.ctx.log.warning("journal: request %#x not run again: %s", tid, exc)
                self.in_flight += 1
                self._queue(
                    completion(tid, self.proto.failure_reply(NtStatus.INVALID_PARAMETER)), e
                )
            done += 1
        self.ctx.log.info("resumed: %d request(s) the last vmbusd had not completed", done)

    async def _receive_loop(self, nursery: trio.Nursery) -> None:
        journal = self.journal
        cap = self.dev.queue_depth
        if journal is not None:
            cap = min(cap, journal.capacity)
        decoder = self.ctx.memory.gpa_direct_decoder()
        fp = self._fast
        entries: list[int] | None = None
        while True:
            while self.in_flight >= cap:
                self._room = trio.Event()
                await self._room.wait()
            # A slot of the VM's budget per request taken, asked for once requests
            # are there (an idle channel holds none); run() gives back what a reset
            # channel held.
            if self._budget is not None:
                await self.channel.wait_readable()
            want = await self._acquire(cap - self.in_flight)
            if journal is None:
                batch = await self.channel.receive(max_pkts=want)
            else:
                batch, entries = await journal.receive(self.channel, want)
            self._give_back(want - len(batch))
            # Every GPA-direct range list of the batch in one (native) call.
            ranges = decoder.decode_batch(batch)
            n = len(batch)
            nfast = 0
            if FAST_PATH and self.proto.ready and self._sync_luns():
                nfast = fp.decode(
                    batch.buffer,
                    batch.index,
                    n,
                    ranges,
                    ready=True,
                    size=self.proto.size,
                    max_transfer=self.proto.max_transfer_bytes,
                )
            if nfast < n:
                kinds = fp.kinds() if nfast else None
                for i, pkt in enumerate(batch):
                    if kinds is None or kinds[i] == fastpath.SLOW:
                        self._take(pkt, nursery, ranges, i, -1 if entries is None else entries[i])
            if nfast:
                await self._run_fast(batch, ranges, nfast, nursery, entries)

    # -- the fast path --

    def _sync_luns(self) -> bool:
        """Give the fast path the LUNs it may serve (memory and file disks with no
        unit attention pending); rebuilt only when what it depends on changed.
        False when no LUN qualifies."""
        ctl = self.dev.controller
        disks: list[tuple[int, ScsiDisk, MemoryBackend | FileBackend]] = []
        sig: list[object] = []
        for n in ctl.luns:
            disk = ctl.disk(n)
            b = disk.backend
            state: object
            # Exactly these classes: a subclass or a wrapper may do its I/O its own way.
            if type(b) is MemoryBackend and isinstance(b, MemoryBackend):
                state = (b.generation, b.fast_storage() is not None)
            elif type(b) is FileBackend and isinstance(b, FileBackend):
                state = (b.fast_file(), b.nowait_writes)
            else:
                continue
            disks.append((n, disk, b))
            sig.append((n, disk, b, b.capacity, disk._capacity, disk._unit_attention, state))
        if sig == self._lun_sig:
            return self._fast_luns > 0
        self._lun_sig = sig
        specs: dict[int, LunSpec] = {}
        for n, disk, b in disks:
            if disk._unit_attention or b.capacity != disk._capacity:
                continue  # the general path raises the UNIT ATTENTION first
            common = (b.read_only, b.block_size, disk.blocks, disk.max_transfer_bytes)
            if isinstance(b, MemoryBackend):
                st = b.fast_storage()
                if st is None:
                    continue
                specs[n] = LunSpec(
                    fastpath.LUN_MEMORY,
                    *common,
                    storage=memoryview(st[0]),
                    chunk_map=memoryview(st[1]),
                    chunk_size=b.chunk_size,
                )
            else:
                ff = b.fast_file()
                if ff is None:
                    continue
                specs[n] = LunSpec(
                    fastpath.LUN_FILE,
                    *common,
                    direct_align=ff[1],
                    fd=ff[0],
                    blocking_writes=not b.nowait_writes,
                )
        self._fast.set_luns(specs)
        self._fast_luns = len(specs)
        self._file_backends = {
            n: b for n, _, b in disks if n in specs and isinstance(b, FileBackend)
        }
        return bool(specs)

    async def _run_fast(
        self,
        batch: PacketBatch,
        ranges: GpaDirectBatch,
        nfast: int,
        nursery: trio.Nursery,
        entries: list[int] | None,
    ) -> None:
        """Execute the batch's FAST requests and send their completions; what would
        block goes to one worker thread (`_leftovers`)."""
        fp = self._fast
        done = fp.execute(ranges)
        if done < nfast:
            self._take_leftovers(batch, ranges, nursery, entries)
        if done:
            buf, idx, k = fp.completions()
            self.in_flight += k
            self.dev.max_in_flight_seen = max(self.dev.max_in_flight_seen, self.in_flight)
            try:
                if entries is not None and self.journal is not None:
                    kinds = fp.kinds()
                    ents = [entries[i] for i, kind in enumerate(kinds) if kind == fastpath.DONE]
                    await self.journal.send_completions_raw(self.channel, ents, buf, idx, k)
                else:
                    await self.channel.send_raw(buf, idx, k)
            finally:
                self._completed(k)
            self.fast_completed += k
            self.dev.fast_completed += k

    def _take_leftovers(
        self,
        batch: PacketBatch,
        ranges: GpaDirectBatch,
        nursery: trio.Nursery,
        entries: list[int] | None,
    ) -> None:
        """Hand the batch's LEFTOVER requests (file I/O that would block) to one
        worker thread: private copies of their records, the batch's segments and
        packets (for a retry), the file backends held open meanwhile."""
        fp = self._fast
        recs = bytearray(fp.records())
        held: dict[int, FileBackend] = {}
        count = 0
        for i, kind in enumerate(fp.kinds()):
            if kind != fastpath.LEFTOVER:
                fastpath.set_kind(recs, i, fastpath.SLOW)  # answered already, or not ours
                continue
            r = fp.record(i)
            count += 1
            self.leftovers[r.reason] = self.leftovers.get(r.reason, 0) + 1
            b = self._file_backends.get(r.lun)
            if b is None:
                continue  # not a file: the job leaves it to the retry
            if r.reason == errno.EOPNOTSUPP and r.flags & fastpath.F_WRITE:
                b.nowait_writes = False  # this file system never takes them
            if id(b) not in held:
                b.hold()  # close() waits for the job as for its own I/O
                held[id(b)] = b
        n = len(batch)
        index = array.array("I", batch.index[: 2 * n])
        end = max(index[2 * i] + index[2 * i + 1] for i in range(n))
        packets = bytes(memoryview(batch.buffer)[:end])
        job = fp.leftover_job(recs, fp.segments(ranges))
        self.in_flight += count
        self.dev.max_in_flight_seen = max(self.dev.max_in_flight_seen, self.in_flight)
        nursery.start_soon(
            self._leftovers,
            job,
            recs,
            self.proto.size,
            packets,
            index,
            list(held.values()),
            entries,
        )

    async def _leftovers(
        self,
        job: Callable[[], int],
        recs: bytearray,
        size: int,
        packets: bytes,
        index: array.array[int],
        held: list[FileBackend],
        entries: list[int] | None,
    ) -> None:
        """One worker thread runs the batch's blocking file I/O (in C); the requests
        that fail take the general path (which retries them and answers with the
        sense data it always gave)."""
        try:
            try:
                await trio.to_thread.run_sync(job)
            finally:
                self._fast.finish_job()
        finally:
            for b in held:
                b.unhold()
        buf, idx, k = self._fast.complete_copy(recs, size)
        kinds = [kind for (kind,) in struct.iter_unpack("=i52x", recs)]
        if k:
            try:
                if entries is not None and self.journal is not None:
                    ents = [entries[i] for i, kind in enumerate(kinds) if kind == fastpath.DONE]
                    await self.journal.send_completions_raw(self.channel, ents, buf, idx, k)
                else:
                    await self.channel.send_raw(buf, idx, k)
            finally:
                self._completed(k)
            self.fast_completed += k
            self.dev.fast_completed += k
        failed = [i for i, kind in enumerate(kinds) if kind == fastpath.LEFTOVER]
        if not failed:
            return
        n = len(index) // 2
        gpa = self.ctx.memory.gpa_direct_decoder().decode(packets, index, n)
        pkts = list(iter_packets(packets, index, n))
        for i in failed:
            await self._retry(pkts[i], gpa.iovecs(i), -1 if entries is None else entries[i])

    async def _retry(self, pkt: Packet, iov: list[memoryview], entry: int) -> None:
        """A fast request whose I/O failed, run again by the general path: the SCSI
        layer retries it and answers with its sense data, exactly as it always did."""
        tid = pkt.trans_id
        try:
            ev = self.proto.receive(
                pkt.payload, primary=self.primary, data_bytes=sum(v.nbytes for v in iov)
            )
        except GuestError as exc:  # the protocol was reset meanwhile
            status = exc.status if exc.status is not None else NtStatus.UNSUCCESSFUL
            self._queue(completion(tid, self.proto.failure_reply(status)), entry)
            return
        assert isinstance(ev, ExecuteSrb)
        await self._execute(tid, ev.srb, iov, entry)

    # -- intake (synchronous: packets are views valid until the next receive) --

    def _take(
        self, pkt: Packet, nursery: trio.Nursery, ranges: GpaDirectBatch, i: int, entry: int
    ) -> None:
        if not wants_completion(pkt):
            guest_error("a vstor request that asks for no completion")
        tid = pkt.trans_id
        iov: list[memoryview] = []
        data_bytes = 0
        bad_pfn = False
        if pkt.type == PacketType.GPA_DIRECT:
            err = ranges.error(i)
            if err is None:
                data_bytes = ranges.total_bytes(i)
                iov = ranges.iovecs(i)
            elif err.status != GpaStatus.PFN:
                raise err  # a malformed range list: the channel is reset
            else:
                bad_pfn = True  # well-formed, but names memory that is not RAM
                data_bytes = _declared_bytes(pkt)
        self.in_flight += 1
        self.dev.max_in_flight_seen = max(self.dev.max_in_flight_seen, self.in_flight)
        journal = self.journal if entry >= 0 else None
        before = self.proto.save() if journal is not None else None
        try:
            ev = self.proto.receive(pkt.payload, primary=self.primary, data_bytes=data_bytes)
            if bad_pfn:
                guest_error("GPA range outside guest RAM", status=NtStatus.INVALID_PARAMETER)
        except GuestError as exc:
            if exc.status is None:
                self.in_flight -= 1
                raise
            self._refused(exc.reason)
            self._queue(completion(tid, self.proto.failure_reply(exc.status)), entry)
            return
        if isinstance(ev, Reply):
            if journal is not None:
                # The answer and the negotiation it leaves, kept together: a restarted
                # vmbusd sends this answer and stands where it left the guest.
                after = self.proto.save()
                journal.record_reply(entry, _PROTO_SNAP.pack(*after) + ev.payload)
                self._dirty = self._dirty or after != before
            self._queue(completion(tid, ev.payload), entry)
        elif isinstance(ev, ExecuteSrb):
            nursery.start_soon(self._execute, tid, ev.srb, iov, entry)
        elif isinstance(ev, CreateSubChannels):
            nursery.start_soon(self._create_sub_channels, tid, ev.count, entry)

    def _refused(self, reason: str) -> None:
        self._refusals += 1
        if self._refusals <= REFUSALS_LOGGED:
            self.ctx.log.info("refused: %s", reason)
        elif self._refusals == REFUSALS_LOGGED + 1:
            self.ctx.log.info("refused: further refusals on this channel are not logged")

    # -- work --

    async def _execute(self, tid: int, srb: Srb, iov: Sequence[memoryview], entry: int) -> None:
        dev = self.dev
        present = srb.path_id == 0 and srb.target_id == 0 and srb.lun in dev.controller
        op = srb.cdb[0]
        if not present and op not in (Op.INQUIRY, Op.REPORT_LUNS):
            # What Linux's scan and its "LUN is gone" handling expect (spec 9.3, 4.2).
            self._queue(completion(tid, self.proto.srb_failure(srb, SrbStatus.INVALID_LUN)), entry)
            return
        ctl = dev.controller if srb.path_id == 0 and srb.target_id == 0 else dev._absent
        # Direction is the SRB's: only a READ's buffer may be written by the device.
        bufs = list(iov) if srb.data_in == DataIn.READ else [v.toreadonly() for v in iov]
        res = await ctl.execute(srb.lun, srb.cdb, bufs, srb.data_in == DataIn.READ)
        self._queue(
            completion(tid, self.proto.complete_srb(srb, res.status, res.sense, res.transferred)),
            entry,
        )

    async def _create_sub_channels(self, tid: int, count: int, entry: int) -> None:
        try:
            relids = await self.ctx.enable_subchannels(count)
        except GuestError as exc:
            self._refused(f"CREATE_SUB_CHANNELS: {exc.reason}")
            relids = []
        self._queue(completion(tid, self.proto.subchannels_created(len(relids) >= count)), entry)

    async def _notifier(self) -> None:
        while True:
            event = self.dev._rescan
            assert event is not None
            await event.wait()
            self.dev._rescan = trio.Event()
            payload = self.proto.enumerate_bus()
            if payload is not None:
                self._pending.append(inband(payload))
                self._pending_entries.append(-1)
                self._wake.set()

    # -- completions out --

    def _queue(self, pkt: OutPacket, entry: int) -> None:
        """A completion to send; `entry` is its request's journal entry (or -1)."""
        self._pending.append(pkt)
        self._pending_entries.append(entry)
        self._pending_requests += 1
        self._wake.set()

    async def _sender(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            if self._dirty:  # the VMM holds the negotiation before the guest hears of it
                self._dirty = False
                await self.ctx.save_state()
            out, self._pending = self._pending, []
            ents, self._pending_entries = self._pending_entries, []
            done, self._pending_requests = self._pending_requests, 0
            # Each waits (this channel only) while the ring is full.
            if self.journal is not None:
                await self.journal.send_completions(self.channel, ents, out)
            else:
                await self.channel.send(out)
            self._completed(done)

    def _completed(self, k: int) -> None:
        """k requests' completions are in the ring: their room (and their share of
        the VM's request budget) is free again."""
        if not k:
            return
        self.in_flight -= k
        if self._budget is not None:
            k = min(k, self._held)
            if k:
                self._held -= k
                self._budget.release(k)
        self._room.set()


def _restart_blocker(
    controller: ScsiController, unopened: list[tuple[int, DiskBackend, DiskIdentity]]
) -> str | None:
    """Why this controller cannot be restarted under a running guest, or None: a LUN
    whose contents die with vmbusd (a memory disk) would come back empty."""
    backends = [(n, controller.disk(n).backend) for n in controller.luns]
    backends += [(n, b) for n, b, _ in unopened]
    for n, b in backends:
        if not getattr(b, "survives_restart", False):
            return f"storvsc LUN {n} ({type(b).__name__}) would come back empty"
    return None


def _release_fds(backends: list[DiskBackend]) -> None:
    """Close the descriptor of a backend that was never closed (a file backend's
    `_fd`; -1 once its close() ran), looking inside wrappers (`inner`: faulty)."""
    for outer in backends:
        b: object = outer
        for _ in range(8):  # a wrapper of a wrapper ..., never a loop forever
            fd = getattr(b, "_fd", None)
            if isinstance(fd, int) and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                b._fd = -1  # type: ignore[attr-defined]
            b = getattr(b, "inner", None)
            if b is None:
                break


def _declared_bytes(pkt: Packet) -> int:
    """Sum of the byte counts of a GPA-direct packet whose shape checked out."""
    import struct

    ext = pkt.ext
    (count,) = struct.unpack_from("<I", ext, 4)
    pos, total = 8, 0
    for _ in range(count):
        byte_count, byte_offset = struct.unpack_from("<II", ext, pos)
        total += byte_count
        pos += 8 + 8 * ((byte_offset + byte_count + 4095) >> 12)
    return total
