"""The simulated guest's disks served over NBD (`vmbusd vm --export-nbd DIR`).

Once the guest's storvsc driver (vsc.py) has scanned its LUNs, each one becomes an
NBD server on a Unix socket `DIR/storvsc<N>-lun<L>.sock` (N counts the VM's SCSI
controllers in relid order), so that qemu-img, qemu-io, fio's nbd engine or nbdfuse
reach the guest's view of the disk: every byte goes tool -> NBD -> guest VSC ->
VMBus ring -> vmbusd's storvsc VSP -> backend, and back.

Two layers, h11-shaped like the client in backends/nbd_protocol.py:

- `NbdServerConnection` (sans-IO): fixed newstyle negotiation (NBD_OPT_GO/INFO with
  NBD_INFO_BLOCK_SIZE, NBD_OPT_EXPORT_NAME, NBD_OPT_LIST, NBD_OPT_ABORT; structured
  replies and everything else refused with NBD_REP_ERR_UNSUP) and the transmission
  phase with simple replies. Bytes in, `Request`s out; a request the server can
  answer without the disk (bad flags, out of range, unaligned, read-only) is
  answered here. The client is untrusted: every field is checked before anything is
  allocated; what cannot be resynchronised (a bad magic, an option or payload over
  the named bounds) raises `NbdClientError` and the connection is dropped.
- `export_disks` (trio): the listeners, one task per connection reading, up to
  `MAX_IN_FLIGHT` requests per connection running concurrently on the guest's HBA
  (the VSC takes concurrent SRBs and spreads them over its channels), replies
  written as they finish (out of order, as NBD allows).

Mapping: READ -> READ(16), WRITE -> WRITE(16) (FUA bit for NBD_CMD_FLAG_FUA), FLUSH
-> SYNCHRONIZE CACHE, TRIM -> UNMAP (advertised only when READ CAPACITY(16) says
the LUN is thin provisioned), WRITE_ZEROES -> WRITE SAME(16) with NDOB (plus a
SYNCHRONIZE CACHE for FUA). Requests larger than the host's max transfer are split.
Requests must be aligned to the LUN's block size (advertised as the minimum block
size); others get EINVAL, as the NBD spec allows.
"""

from __future__ import annotations

import enum
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from devices.storvsc.backends.nbd_protocol import (
    EXPORT_NAME_ZEROES,
    MAX_STRING,
    NBD_CMD_DISC,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLAG_NO_HOLE,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_EINVAL,
    NBD_EIO,
    NBD_ENOMEM,
    NBD_ENOSPC,
    NBD_EPERM,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_FIXED_NEWSTYLE,
    NBD_FLAG_HAS_FLAGS,
    NBD_FLAG_NO_ZEROES,
    NBD_FLAG_READ_ONLY,
    NBD_FLAG_SEND_FLUSH,
    NBD_FLAG_SEND_FUA,
    NBD_FLAG_SEND_TRIM,
    NBD_FLAG_SEND_WRITE_ZEROES,
    NBD_INFO_BLOCK_SIZE,
    NBD_INFO_EXPORT,
    NBD_MAGIC,
    NBD_OPT_ABORT,
    NBD_OPT_EXPORT_NAME,
    NBD_OPT_GO,
    NBD_OPTS_MAGIC,
    NBD_REP_ACK,
    NBD_REP_ERR_INVALID,
    NBD_REP_ERR_UNKNOWN,
    NBD_REP_ERR_UNSUP,
    NBD_REP_INFO,
    NBD_REP_MAGIC,
    NBD_REP_SERVER,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
)
from devices.storvsc.protocol import SCSI_IF_TYPE, DataIn
from vmbus.cliutil import UserError, claim_socket_path

if TYPE_CHECKING:
    from devices.storvsc.vsc import Disk, StorvscHba
    from vmbus.guest.vm import SimulatedVm

log = logging.getLogger(__name__)

NBD_OPT_INFO = 6
NBD_OPT_LIST = 3

_GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
_OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length
_OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
_SIMPLE_REPLY = struct.Struct(">IIQ")

MAX_OPTION_LENGTH = 8 + 2 * MAX_STRING  # NBD_OPT_GO: name + info requests, generously
MAX_OPTIONS = 256  # options before transmission: more is a client going round in circles
MAX_PAYLOAD = 32 * 1024 * 1024  # largest READ/WRITE (advertised as the maximum block size)
MAX_IN_FLIGHT = 32  # requests per connection running at once; the rest wait unread
MAX_ZERO_CHUNK = 1024 * 1024  # WRITE SAME range per SRB
MAX_UNMAP_CHUNK_BLOCKS = 0x0040_0000  # UNMAP blocks per SRB (the VSP's limit)
_KNOWN_FLAGS = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE
CLOSE_TIMEOUT_S = 5.0


class NbdClientError(Exception):
    """The client broke the protocol in a way the stream cannot recover from."""


@dataclass(frozen=True)
class ExportSpec:
    """What a connection tells the client about its export."""

    name: str
    size: int
    block_size: int
    read_only: bool
    can_trim: bool

    @property
    def transmission_flags(self) -> int:
        flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH
        if self.read_only:
            return flags | NBD_FLAG_READ_ONLY
        flags |= NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_WRITE_ZEROES
        return flags | (NBD_FLAG_SEND_TRIM if self.can_trim else 0)


@dataclass(frozen=True)
class Request:
    """A validated transmission request the disk must carry out."""

    handle: int
    command: int
    flags: int
    offset: int
    length: int
    data: bytes = b""  # a WRITE's payload

    @property
    def fua(self) -> bool:
        return bool(self.flags & NBD_CMD_FLAG_FUA)


class Disconnect:
    """NBD_CMD_DISC, NBD_OPT_ABORT or a clean end: no more requests."""


class _Phase(enum.Enum):
    CLIENT_FLAGS = enum.auto()
    OPTIONS = enum.auto()
    TRANSMISSION = enum.auto()
    DONE = enum.auto()


class NbdServerConnection:
    """The server side of one NBD connection, with no I/O.

    `receive_data` feeds bytes; `next_event` returns a `Request`, a `Disconnect` or
    None (more bytes needed); `data_to_send` drains what must go to the client
    (handshake replies and the answers to refused requests); `reply` builds the
    answer to a `Request`."""

    def __init__(self, export: ExportSpec) -> None:
        self.export = export
        self._in = bytearray()
        self._out = bytearray(_GREETING.pack(NBD_MAGIC, NBD_OPTS_MAGIC, self._handshake_flags()))
        self._phase = _Phase.CLIENT_FLAGS
        self._no_zeroes = False
        self._options = 0

    @staticmethod
    def _handshake_flags() -> int:
        return NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES

    @property
    def transmitting(self) -> bool:
        return self._phase is _Phase.TRANSMISSION

    def receive_data(self, data: bytes) -> None:
        self._in += data

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_event(self) -> Request | Disconnect | None:
        while True:
            if self._phase is _Phase.DONE:
                return Disconnect()
            if self._phase is _Phase.CLIENT_FLAGS:
                if len(self._in) < 4:
                    return None
                (flags,) = struct.unpack_from(">I", self._in)
                del self._in[:4]
                if not flags & NBD_FLAG_C_FIXED_NEWSTYLE or flags & ~(
                    NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES
                ):
                    raise NbdClientError(f"client flags {flags:#x} (fixed newstyle only)")
                self._no_zeroes = bool(flags & NBD_FLAG_C_NO_ZEROES)
                self._phase = _Phase.OPTIONS
            elif self._phase is _Phase.OPTIONS:
                if not self._option():
                    return None
            else:
                return self._request()

    # -- negotiation --

    def _option(self) -> bool:
        """Handle one option if it is all here; False when more bytes are needed."""
        if len(self._in) < _OPTION.size:
            return False
        magic, opt, length = _OPTION.unpack_from(self._in)
        if magic != NBD_OPTS_MAGIC:
            raise NbdClientError(f"option magic {magic:#x}")
        if length > MAX_OPTION_LENGTH:
            raise NbdClientError(f"option {opt} of {length} bytes (at most {MAX_OPTION_LENGTH})")
        if len(self._in) < _OPTION.size + length:
            return False
        data = bytes(self._in[_OPTION.size : _OPTION.size + length])
        del self._in[: _OPTION.size + length]
        self._options += 1
        if self._options > MAX_OPTIONS:
            raise NbdClientError(f"more than {MAX_OPTIONS} options")
        if opt == NBD_OPT_EXPORT_NAME:
            if not self._name_ok(data.decode("utf-8", "replace")):
                raise NbdClientError("NBD_OPT_EXPORT_NAME of an unknown export")
            self._out += struct.pack(">QH", self.export.size, self.export.transmission_flags)
            if not self._no_zeroes:
                self._out += bytes(EXPORT_NAME_ZEROES)
            self._phase = _Phase.TRANSMISSION
        elif opt == NBD_OPT_ABORT:
            self._option_reply(opt, NBD_REP_ACK)
            self._phase = _Phase.DONE
        elif opt == NBD_OPT_LIST:
            if data:
                self._option_reply(opt, NBD_REP_ERR_INVALID)
            else:
                name = self.export.name.encode()
                self._option_reply(opt, NBD_REP_SERVER, struct.pack(">I", len(name)) + name)
                self._option_reply(opt, NBD_REP_ACK)
        elif opt in (NBD_OPT_GO, NBD_OPT_INFO):
            self._go(opt, data)
        else:  # STARTTLS, STRUCTURED_REPLY, meta contexts, ...: simple replies only
            self._option_reply(opt, NBD_REP_ERR_UNSUP)
        return True

    def _name_ok(self, name: str) -> bool:
        return name in ("", self.export.name)

    def _go(self, opt: int, data: bytes) -> None:
        if len(data) < 4:
            self._option_reply(opt, NBD_REP_ERR_INVALID)
            return
        (nlen,) = struct.unpack_from(">I", data)
        if nlen > MAX_STRING or 4 + nlen + 2 > len(data):
            self._option_reply(opt, NBD_REP_ERR_INVALID)
            return
        name = data[4 : 4 + nlen].decode("utf-8", "replace")
        (ninfo,) = struct.unpack_from(">H", data, 4 + nlen)
        if 4 + nlen + 2 + 2 * ninfo != len(data):
            self._option_reply(opt, NBD_REP_ERR_INVALID)
            return
        if not self._name_ok(name):
            self._option_reply(opt, NBD_REP_ERR_UNKNOWN)
            return
        e = self.export
        self._option_reply(
            opt,
            NBD_REP_INFO,
            _INFO_EXPORT.pack(NBD_INFO_EXPORT, e.size, e.transmission_flags),
        )
        preferred = max(e.block_size, 4096)
        self._option_reply(
            opt,
            NBD_REP_INFO,
            _INFO_BLOCK_SIZE.pack(NBD_INFO_BLOCK_SIZE, e.block_size, preferred, MAX_PAYLOAD),
        )
        self._option_reply(opt, NBD_REP_ACK)
        if opt == NBD_OPT_GO:
            self._phase = _Phase.TRANSMISSION

    def _option_reply(self, opt: int, rtype: int, data: bytes = b"") -> None:
        self._out += _OPTION_REPLY.pack(NBD_REP_MAGIC, opt, rtype, len(data)) + data

    # -- transmission --

    def _request(self) -> Request | Disconnect | None:
        while True:
            if len(self._in) < _REQUEST.size:
                return None
            magic, flags, cmd, handle, offset, length = _REQUEST.unpack_from(self._in)
            if magic != NBD_REQUEST_MAGIC:
                raise NbdClientError(f"request magic {magic:#x}")
            payload = 0
            if cmd == NBD_CMD_WRITE:
                if length > MAX_PAYLOAD:
                    raise NbdClientError(f"write of {length} bytes (at most {MAX_PAYLOAD})")
                payload = length
                if len(self._in) < _REQUEST.size + payload:
                    return None
            data = bytes(self._in[_REQUEST.size : _REQUEST.size + payload])
            del self._in[: _REQUEST.size + payload]
            if cmd == NBD_CMD_DISC:
                self._phase = _Phase.DONE
                return Disconnect()
            error = self._check(cmd, flags, offset, length)
            if error:
                self._out += self.reply(handle, error)
                continue
            return Request(handle, cmd, flags, offset, length, data)

    def _check(self, cmd: int, flags: int, offset: int, length: int) -> int:
        """0, or the NBD error a request gets without reaching the disk."""
        e = self.export
        if flags & ~_KNOWN_FLAGS:
            return NBD_EINVAL
        if cmd == NBD_CMD_FLUSH:
            return NBD_EINVAL if flags else 0
        if cmd not in (NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES):
            return NBD_EINVAL
        if flags & NBD_CMD_FLAG_NO_HOLE and cmd != NBD_CMD_WRITE_ZEROES:
            return NBD_EINVAL
        if flags & NBD_CMD_FLAG_FUA and (cmd == NBD_CMD_READ or e.read_only):
            return NBD_EINVAL
        if cmd != NBD_CMD_READ and e.read_only:
            return NBD_EPERM
        if cmd == NBD_CMD_TRIM and not e.can_trim:
            return NBD_EINVAL
        if cmd == NBD_CMD_READ and length > MAX_PAYLOAD:
            return NBD_EINVAL
        if length == 0 or offset % e.block_size or length % e.block_size:
            return NBD_EINVAL
        if offset > e.size or length > e.size - offset:
            return NBD_ENOSPC if cmd in (NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES) else NBD_EINVAL
        return 0

    @staticmethod
    def reply(handle: int, error: int, data: bytes = b"") -> bytes:
        """A simple reply (with a successful READ's data)."""
        return _SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, error, handle) + (b"" if error else data)


# ======================================================================================
# Carrying requests out on the guest's HBA
# ======================================================================================


def _sense_key(sense: bytes) -> int | None:
    if len(sense) >= 3 and sense[0] & 0x7F in (0x70, 0x71):
        return sense[2] & 0x0F
    if len(sense) >= 2 and sense[0] & 0x7F in (0x72, 0x73):
        return sense[1] & 0x0F
    return None


def _nbd_error(exc: Exception) -> int:
    """The NBD error a failed SCSI command (or a broken VSC) becomes."""
    from devices.storvsc.vsc import ScsiCommandError

    if isinstance(exc, ScsiCommandError):
        key = _sense_key(exc.reply.sense)
        if key == 0x7:  # DATA PROTECT
            return NBD_EPERM
        if key == 0x5:  # ILLEGAL REQUEST
            return NBD_EINVAL
    if isinstance(exc, MemoryError):
        return NBD_ENOMEM
    return NBD_EIO


class DiskExport:
    """One LUN of one HBA, as NBD commands."""

    def __init__(self, hba: StorvscHba, disk: Disk, name: str, can_trim: bool) -> None:
        self.hba = hba
        self.disk = disk
        self.spec = ExportSpec(name, disk.size, disk.block_size, disk.read_only, can_trim)
        props = hba.properties
        max_xfer = props.max_transfer_bytes if props is not None else 65536
        self.chunk_blocks = max(1, min(max_xfer, MAX_PAYLOAD) // disk.block_size)

    async def run(self, req: Request) -> bytes:
        """Carry out one request; returns its READ data. Raises on a failed command."""
        bs, lun = self.disk.block_size, self.disk.lun
        lba, blocks = req.offset // bs, req.length // bs
        if req.command == NBD_CMD_READ:
            parts = []
            for at in range(0, blocks, self.chunk_blocks):
                n = min(self.chunk_blocks, blocks - at)
                parts.append(await self.hba.read(lun, lba + at, n))
            return b"".join(parts)
        if req.command == NBD_CMD_WRITE:
            step = self.chunk_blocks * bs
            for at in range(0, req.length, step):
                await self.hba.write(lun, lba + at // bs, req.data[at : at + step], fua=req.fua)
        elif req.command == NBD_CMD_WRITE_ZEROES:
            zblocks = max(1, MAX_ZERO_CHUNK // bs)
            for at in range(0, blocks, zblocks):
                n = min(zblocks, blocks - at)
                cdb = bytes([0x93, 0x01]) + (lba + at).to_bytes(8, "big") + n.to_bytes(4, "big")
                await self.hba.command("WRITE SAME(16)", cdb + b"\0\0", lun=lun)
            if req.fua:
                await self.hba.flush(lun)
        elif req.command == NBD_CMD_TRIM:
            for at in range(0, blocks, MAX_UNMAP_CHUNK_BLOCKS):
                n = min(MAX_UNMAP_CHUNK_BLOCKS, blocks - at)
                params = struct.pack(">HH4xQI4x", 6 + 16, 16, lba + at, n)
                cdb = bytes([0x42]) + bytes(6) + len(params).to_bytes(2, "big") + b"\0"
                await self.hba.command("UNMAP", cdb, lun=lun, data_in=DataIn.WRITE, data=params)
            if req.fua:
                await self.hba.flush(lun)
        elif req.command == NBD_CMD_FLUSH:
            await self.hba.flush(lun)
        return b""


async def _thin_provisioned(hba: StorvscHba, lun: int) -> bool:
    """READ CAPACITY(16)'s LBPME bit: the LUN takes UNMAP."""
    cdb = bytes([0x9E, 0x10]) + bytes(8) + (32).to_bytes(4, "big") + b"\0\0"
    try:
        rc = await hba.command("READ CAPACITY(16)", cdb, lun=lun, data_in=DataIn.READ, length=32)
    except Exception as exc:  # the scan read it a moment ago; say so and do without
        log.info("LUN %d: READ CAPACITY(16) failed (%s): no TRIM", lun, exc)
        return False
    return len(rc) > 14 and bool(rc[14] & 0x80)


async def _serve_connection(stream: trio.SocketStream, export: DiskExport) -> None:
    """One client: read requests, run up to MAX_IN_FLIGHT at once, reply as they end."""
    conn = NbdServerConnection(export.spec)
    send_lock = trio.Lock()
    slots = trio.Semaphore(MAX_IN_FLIGHT)

    async def send(data: bytes) -> None:
        if data:
            async with send_lock:
                await stream.send_all(data)

    async def carry_out(req: Request) -> None:
        try:
            try:
                data = await export.run(req)
                error = 0
            except Exception as exc:  # a failed command is the client's EIO, not our crash
                log.info(
                    "%s: NBD command %d at %d: %s", export.spec.name, req.command, req.offset, exc
                )
                data, error = b"", _nbd_error(exc)
            try:
                await send(conn.reply(req.handle, error, data))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client left; its reply has nowhere to go
        finally:
            slots.release()

    async def read_requests(nursery: trio.Nursery) -> None:
        """Until the client ends or breaks the protocol; errors end here, inside the
        nursery, so the requests already running still get their replies."""
        name = export.spec.name
        try:
            await send(conn.data_to_send())
            while True:
                data = await stream.receive_some(256 * 1024)
                if not data:
                    return
                conn.receive_data(data)
                while True:
                    event = conn.next_event()
                    await send(conn.data_to_send())
                    if event is None:
                        break
                    if isinstance(event, Disconnect):
                        return
                    await slots.acquire()
                    nursery.start_soon(carry_out, event)
        except NbdClientError as exc:
            log.info("%s: client dropped: %s", name, exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.info("%s: client connection lost: %s", name, exc)

    try:
        async with trio.open_nursery() as nursery:
            await read_requests(nursery)
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


async def _serve_listener(listener: trio.SocketListener, export: DiskExport) -> None:
    async with trio.open_nursery() as nursery:
        while True:
            stream = await listener.accept()
            nursery.start_soon(_serve_connection, stream, export)


def check_export_dir(directory: str) -> None:
    """A DIR that cannot hold the sockets is a UserError, said before connecting."""
    if not os.path.isdir(directory):
        raise UserError(f"--export-nbd {directory}: not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UserError(f"--export-nbd {directory}: directory not writable")


async def _listen(path: str) -> trio.SocketListener:
    if len(os.fsencode(path)) >= 108:
        raise UserError(f"--export-nbd: socket path {path} is too long for a unix socket")
    claim_socket_path(path, socket.SOCK_STREAM, what="NBD export socket")
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise UserError(f"--export-nbd: cannot listen on {path}: {exc.strerror or exc}") from exc
    return trio.SocketListener(sock)


class NbdExports:
    """The running exports; `aclose` stops them, removes the sockets, closes the HBAs."""

    def __init__(self, scope: trio.CancelScope, finished: trio.Event) -> None:
        self.paths: list[str] = []
        self._scope = scope
        self._finished = finished

    async def aclose(self) -> None:
        self._scope.cancel()
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S + 1):
            await self._finished.wait()


async def export_disks(
    vm: SimulatedVm,
    directory: str,
    say: Callable[[str], None],
    *,
    task_status: trio.TaskStatus[NbdExports] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Attach every SCSI controller the host offers, serve each LUN it found on
    `DIR/storvsc<N>-lun<L>.sock` until cancelled; the sockets are removed on the way out."""
    import contextlib

    from devices.storvsc.vsc import attach_storvsc

    check_export_dir(directory)
    offers = sorted(
        (o for o in vm.find_offers(SCSI_IF_TYPE) if not o.sub_channel_index),
        key=lambda o: o.relid,
    )
    if not offers:
        raise UserError(
            '--export-nbd: vmbusd offers no SCSI controller (add [[device]] type = "storvsc")'
        )
    finished = trio.Event()
    scope = trio.CancelScope()
    handle = NbdExports(scope, finished)
    listeners: list[trio.SocketListener] = []
    try:
        with scope:
            async with contextlib.AsyncExitStack() as stack:
                exports: list[tuple[trio.SocketListener, DiskExport]] = []
                for n, offer in enumerate(offers):
                    hba = await stack.enter_async_context(attach_storvsc(vm, offer))
                    for lun, disk in sorted(hba.disks.items()):
                        name = f"storvsc{n}-lun{lun}"
                        path = os.path.join(directory, name + ".sock")
                        trim = not disk.read_only and await _thin_provisioned(hba, lun)
                        listener = await _listen(path)
                        listeners.append(listener)
                        handle.paths.append(path)
                        exports.append((listener, DiskExport(hba, disk, name, trim)))
                async with trio.open_nursery() as nursery:
                    for listener, export in exports:
                        nursery.start_soon(_serve_listener, listener, export)
                    names = ", ".join(os.path.basename(p) for p in handle.paths) or "none"
                    say(f"NBD exports in {directory}: {names}")
                    task_status.started(handle)
                    await trio.sleep_forever()
    finally:
        for listener in listeners:
            with contextlib.suppress(OSError):
                listener.socket.close()
        for path in handle.paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        finished.set()
