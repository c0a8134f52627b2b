"""The `nbd` disk backend: a guest disk served by qemu-nbd, nbdkit, or any NBD server.

This is the trio driver around the sans-IO core in `nbd_protocol.py`: sockets,
timeouts, reconnects. Usage::

    disk = NbdBackend("unix:/run/disk.sock", export="disk0", request_timeout=10)
    await disk.open()            # or: disk = await NbdBackend.connect(...)
    await disk.readv(0, [memoryview(buf)])
    await disk.close()           # waits for in-flight requests, sends NBD_CMD_DISC

Addresses: ``unix:PATH``, ``tcp:HOST:PORT`` (``tcp:[::1]:10809`` for IPv6), or the
NBD URI forms ``nbd://HOST[:PORT][/EXPORT]`` and ``nbd+unix:///EXPORT?socket=PATH``.
An explicit `export` option wins over the URI's.

Many requests share one connection, matched by a 64-bit handle; at most
`max_in_flight` are outstanding. There is no background task (the backend API gives
backends no nursery): whichever caller is waiting for a reply reads the socket for
everyone -- straight into the waiting readers' buffers -- and hands the job to
another waiter when its own reply has come.

Replay policy when the connection drops (EOF, socket error, a protocol violation by
the server, or a request that got no reply within `request_timeout`): we reconnect
with exponential backoff and re-send
- READ, WRITE (with or without FUA), TRIM and WRITE_ZEROES: all idempotent, and a
  request not yet completed to the caller has no ordering promise relative to others
  in flight, so sending it again is indistinguishable from a slow first attempt;
- FLUSH: never. It must cover the writes completed before it, and the server may
  have lost them with its cache, so an interrupted flush fails with BackendIOError.
  For the same reason, if the connection died while writes acknowledged on it were
  not yet covered by a flush (and the server has a cache: NBD_FLAG_SEND_FLUSH), the
  next flush fails once: the disk tells the guest that its cache was lost, the way a
  disk with a volatile cache would after a power loss.
A request gives up with BackendIOError `give_up_after` seconds after its first
failure; no call waits forever. An error the server reports (EIO, ENOSPC, ...) is
not retried: it fails that request only, and the connection carries on. A caller
cancelled mid-request leaves its reply to be drained without touching its buffers.

Options (keyword arguments, so they can come from the TOML config): `export`,
`connect_timeout`, `request_timeout`, `give_up_after`, `reconnect_delay` and
`reconnect_max_delay` (seconds), `max_in_flight`, `structured_replies` (ask for
them; on by default), `block_size` (force 512 or 4096), `read_only`.

Not done: TLS, several connections per export (NBD_FLAG_CAN_MULTI_CONN is read and
exposed as `can_multi_conn`, nothing more), NBD_CMD_BLOCK_STATUS.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import socket
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from .base import BackendConfigError, BackendIOError
from .nbd_protocol import (
    DEFAULT_MAX_PAYLOAD,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_ESHUTDOWN,
    NBD_FLAG_CAN_MULTI_CONN,
    NBD_FLAG_SEND_FLUSH,
    NBD_FLAG_SEND_FUA,
    NBD_FLAG_SEND_TRIM,
    NBD_FLAG_SEND_WRITE_ZEROES,
    NBD_REP_ERR_SHUTDOWN,
    ExportInfo,
    NbdClientConnection,
    NbdHandshake,
    NbdOptionError,
    NbdProtocolError,
    encode_disconnect,
    error_name,
)

log = logging.getLogger(__name__)

DEFAULT_PORT = 10809  # IANA's NBD port
DEFAULT_CONNECT_TIMEOUT = 5.0  # seconds for one connect + handshake
DEFAULT_REQUEST_TIMEOUT = 20.0  # seconds for one reply; then the connection is dead
DEFAULT_GIVE_UP_AFTER = 25.0  # seconds of retrying; under Linux's 30 s SCSI timeout
DEFAULT_RECONNECT_DELAY = 0.05  # first backoff step, seconds
DEFAULT_RECONNECT_MAX_DELAY = 2.0  # backoff ceiling, seconds
DEFAULT_MAX_IN_FLIGHT = 64
MAX_IN_FLIGHT_LIMIT = 4096
MAX_TIMEOUT = 24 * 3600.0  # any timeout option above a day is a typo
SUPPORTED_BLOCK_SIZES = (512, 4096)
MAX_PHYSICAL_BLOCK = 4096  # cap for the physical block size we derive from "preferred"
MAX_ZEROES_REQUEST = 1 << 30  # bytes per TRIM / WRITE_ZEROES request (length is 32-bit)
ZERO_BUFFER_SIZE = 1 << 20  # shared zeros for emulating WRITE_ZEROES with WRITE
HANDSHAKE_RECV_SIZE = 4096
IOV_MAX = 1024  # Linux's limit on iovecs per sendmsg
DISCONNECT_TIMEOUT = 1.0  # seconds to send NBD_CMD_DISC on close

_SOCKET_ERRORS = (OSError, trio.ClosedResourceError, trio.BrokenResourceError)


@dataclass(frozen=True)
class NbdAddress:
    """Where the server is: a Unix socket path, or a TCP host and port."""

    unix_path: str | None = None
    host: str | None = None
    port: int = DEFAULT_PORT
    export: str | None = None  # from a URI; None = not given

    def __str__(self) -> str:
        return f"unix:{self.unix_path}" if self.unix_path else f"tcp:{self.host}:{self.port}"


def parse_address(address: str) -> NbdAddress:
    """Parse ``unix:PATH``, ``tcp:HOST:PORT``, ``nbd://...`` or ``nbd+unix://...``."""
    if not isinstance(address, str) or not address:
        raise BackendConfigError("nbd: address must be a non-empty string")
    if address.startswith("unix:") and not address.startswith("unix://"):
        path = address[len("unix:") :]
        if not path:
            raise BackendConfigError(f"nbd: no socket path in {address!r}")
        return NbdAddress(unix_path=path)
    if address.startswith("tcp:"):
        host, sep, port_text = address[len("tcp:") :].rpartition(":")
        if not sep or not host:
            raise BackendConfigError(f"nbd: expected tcp:HOST:PORT, got {address!r}")
        return NbdAddress(host=host.strip("[]"), port=_port(port_text, address))
    url = urllib.parse.urlsplit(address)
    export = urllib.parse.unquote(url.path[1:]) if url.path.startswith("/") else None
    if url.scheme == "nbd":
        if not url.hostname:
            raise BackendConfigError(f"nbd: no host in {address!r}")
        try:
            port = url.port or DEFAULT_PORT
        except ValueError as e:
            raise BackendConfigError(f"nbd: bad port in {address!r}") from e
        return NbdAddress(host=url.hostname, port=port, export=export)
    if url.scheme == "nbd+unix":
        sockets = urllib.parse.parse_qs(url.query).get("socket")
        if not sockets:
            raise BackendConfigError(f"nbd: nbd+unix URI without ?socket= in {address!r}")
        return NbdAddress(unix_path=sockets[0], export=export)
    raise BackendConfigError(
        f"nbd: unknown address {address!r} (use unix:PATH, tcp:HOST:PORT or nbd://...)"
    )


def _port(text: str, address: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise BackendConfigError(f"nbd: bad port in {address!r}")
    return port


def _byte_view(buf: Any, writable: bool) -> memoryview:
    """A flat unsigned-byte view of one caller buffer (no copy)."""
    mv = memoryview(buf)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    if writable and mv.readonly:
        raise BackendIOError("nbd: read into a read-only buffer")
    return mv


def _split(views: Sequence[memoryview], piece: int) -> list[tuple[int, list[memoryview]]]:
    """Cut a scatter list into (relative offset, views) pieces of at most `piece` bytes."""
    pieces: list[tuple[int, list[memoryview]]] = []
    current: list[memoryview] = []
    room = piece
    rel = 0
    start = 0
    for v in views:
        while len(v):
            take = v[:room]
            current.append(take)
            v = v[len(take) :]
            room -= len(take)
            rel += len(take)
            if room == 0:
                pieces.append((start, current))
                current, room, start = [], piece, rel
    if current:
        pieces.append((start, current))
    return pieces


async def _send_all(sock: trio.socket.SocketType, buffers: Sequence[memoryview]) -> None:
    """Scatter-send every byte of buffers (the caller's own memory, no joining copy)."""
    views = [b for b in buffers if len(b)]
    i = 0
    while i < len(views):
        sent = await sock.sendmsg(views[i : i + IOV_MAX])
        while sent:
            if sent >= len(views[i]):
                sent -= len(views[i])
                i += 1
            else:
                views[i] = views[i][sent:]
                sent = 0


class _ConnectionLost(Exception):
    """The connection a request was on died before its reply came."""


class _Waiter:
    """A caller waiting for one reply (and, when asked, reading the socket for all)."""

    __slots__ = ("command", "flush_mark", "fua", "reply", "wake")

    def __init__(self, command: int, fua: bool) -> None:
        self.command = command
        self.fua = fua
        self.flush_mark = 0
        self.reply: Any = None
        self.wake = trio.Event()


class _Connection:
    """One TCP/Unix connection in the transmission phase."""

    def __init__(self, sock: trio.socket.SocketType, info: ExportInfo) -> None:
        self.sock = sock
        self.info = info
        self.core = NbdClientConnection(info.structured_replies)
        self.send_lock = trio.Lock()
        self.waiters: dict[int, _Waiter] = {}
        self.receiving = False
        self.dead = False
        self.why = ""
        self.replies = 0  # replies received: a connection that never gets one is flapping
        self.acked_writes = 0  # cached (non-FUA) writes acknowledged on this connection
        self.flushed_upto = 0  # acked_writes count covered by a successful flush


class NbdBackend:
    """A disk on an NBD server. Attributes are valid after `open()`."""

    survives_restart = True  # the server keeps what was written

    def __init__(
        self,
        address: str,
        export: str | None = None,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        give_up_after: float = DEFAULT_GIVE_UP_AFTER,
        reconnect_delay: float = DEFAULT_RECONNECT_DELAY,
        reconnect_max_delay: float = DEFAULT_RECONNECT_MAX_DELAY,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        structured_replies: bool = True,
        block_size: int | None = None,
        read_only: bool = False,
    ) -> None:
        self.address = parse_address(address)
        name = export if export is not None else self.address.export
        self.export = name or ""
        for opt, value in (
            ("connect_timeout", connect_timeout),
            ("request_timeout", request_timeout),
            ("give_up_after", give_up_after),
            ("reconnect_delay", reconnect_delay),
            ("reconnect_max_delay", reconnect_max_delay),
        ):
            if not isinstance(value, int | float) or not 0 < value <= MAX_TIMEOUT:
                raise BackendConfigError(f"nbd: {opt} must be in (0, {MAX_TIMEOUT}] seconds")
        if not isinstance(max_in_flight, int) or not 1 <= max_in_flight <= MAX_IN_FLIGHT_LIMIT:
            raise BackendConfigError(f"nbd: max_in_flight must be 1..{MAX_IN_FLIGHT_LIMIT}")
        if block_size is not None and block_size not in SUPPORTED_BLOCK_SIZES:
            raise BackendConfigError(f"nbd: block_size must be one of {SUPPORTED_BLOCK_SIZES}")
        self._connect_timeout = float(connect_timeout)
        self._request_timeout = float(request_timeout)
        self._give_up_after = float(give_up_after)
        self._reconnect_delay = float(reconnect_delay)
        self._reconnect_max_delay = float(max(reconnect_max_delay, reconnect_delay))
        self._max_in_flight = max_in_flight
        self._structured = bool(structured_replies)
        self._forced_block_size = block_size
        self._forced_read_only = bool(read_only)

        # DiskBackend attributes, filled in by open()
        self.block_size = block_size or SUPPORTED_BLOCK_SIZES[0]
        self.physical_block_exponent = 0
        self.capacity = 0
        self.read_only = True
        self.write_back = False
        self.can_unmap = False
        self.can_write_zeroes = False
        self.unmap_zeroes = False  # NBD promises nothing about trimmed blocks' contents
        self.max_transfer = 0
        self.can_multi_conn = False
        self.export_info: ExportInfo | None = None

        self._conn: _Connection | None = None
        self._handles = itertools.count(1)
        self._slots: trio.Semaphore | None = None
        self._connect_lock: trio.Lock | None = None
        self._opened = False
        self._closed = False
        self._active = 0
        self._idle: trio.Event | None = None
        self._cache_lost = False
        self._flap_delay = 0.0  # backoff before redialing after a useless connection
        self.reconnects = 0  # counters, for stats and tests
        self.replays = 0

    # -- lifecycle -----------------------------------------------------------------

    @classmethod
    async def connect(cls, address: str, export: str | None = None, **options: Any) -> NbdBackend:
        """Construct and open in one step."""
        backend = cls(address, export, **options)
        await backend.open()
        return backend

    async def __aenter__(self) -> NbdBackend:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Connect and negotiate; the attributes describe the export afterwards."""
        if self._opened:
            return
        if self._closed:
            raise BackendIOError("nbd: backend is closed")
        self._slots = trio.Semaphore(self._max_in_flight)
        self._connect_lock = trio.Lock()
        self._idle = trio.Event()
        conn = await self._dial_with_backoff(trio.current_time() + self._give_up_after, True)
        try:
            self._apply_info(conn.info)
        except BackendConfigError:
            conn.sock.close()
            raise
        self._conn = conn
        self._opened = True

    async def close(self) -> None:
        """Let in-flight requests finish (bounded), then disconnect politely."""
        if self._closed:
            return
        self._closed = True
        if self._active and self._idle is not None:
            with trio.move_on_after(self._request_timeout):
                await self._idle.wait()
        conn, self._conn = self._conn, None
        if conn is not None and not conn.dead:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + DISCONNECT_TIMEOUT):
                try:
                    async with conn.send_lock:
                        await _send_all(conn.sock, [memoryview(encode_disconnect())])
                except _SOCKET_ERRORS:
                    pass
            conn.dead, conn.why = True, "closed"
            conn.sock.close()
            for w in conn.waiters.values():
                w.wake.set()

    def _apply_info(self, info: ExportInfo) -> None:
        minimum = info.min_block or 1
        if self._forced_block_size is not None:
            bs = self._forced_block_size
            if bs < minimum:
                raise BackendConfigError(
                    f"nbd: block_size {bs} below the server's minimum {minimum}"
                )
        else:
            fitting = [b for b in SUPPORTED_BLOCK_SIZES if b >= minimum]
            if not fitting:
                raise BackendConfigError(f"nbd: server's minimum block size {minimum} too big")
            bs = fitting[0]
        preferred = min(max(info.preferred_block or bs, bs), MAX_PHYSICAL_BLOCK)
        max_payload = info.max_block or DEFAULT_MAX_PAYLOAD
        max_transfer = min(max_payload, DEFAULT_MAX_PAYLOAD) // bs * bs
        if max_transfer < bs:
            raise BackendConfigError(f"nbd: server's maximum block size {max_payload} too small")
        self.export_info = info
        self.block_size = bs
        self.physical_block_exponent = int(math.log2(max(preferred // bs, 1)))
        self.capacity = info.size // bs * bs
        self.read_only = info.read_only or self._forced_read_only
        self.write_back = info.has(NBD_FLAG_SEND_FLUSH)
        self.can_unmap = info.has(NBD_FLAG_SEND_TRIM) and not self.read_only
        self.can_write_zeroes = info.has(NBD_FLAG_SEND_WRITE_ZEROES) and not self.read_only
        self.can_multi_conn = info.has(NBD_FLAG_CAN_MULTI_CONN)
        self.max_transfer = max_transfer

    # -- the DiskBackend API ---------------------------------------------------------

    async def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        views = [_byte_view(b, writable=True) for b in buffers]
        total = sum(len(v) for v in views)
        self._check_range(offset, total)
        await self._pieces(
            [
                functools.partial(self._request, NBD_CMD_READ, offset + rel, piece)
                for rel, piece in _split(views, self.max_transfer)
            ]
        )

    async def writev(self, offset: int, buffers: Sequence[memoryview], fua: bool = False) -> None:
        views = [_byte_view(b, writable=False) for b in buffers]
        total = sum(len(v) for v in views)
        self._check_range(offset, total, write=True)
        native_fua = (
            fua and self.export_info is not None and self.export_info.has(NBD_FLAG_SEND_FUA)
        )
        flags = NBD_CMD_FLAG_FUA if native_fua else 0
        await self._pieces(
            [
                functools.partial(self._request, NBD_CMD_WRITE, offset + rel, piece, flags)
                for rel, piece in _split(views, self.max_transfer)
            ]
        )
        if fua and not native_fua and self.write_back:
            await self.flush()  # FUA emulated: the write, then a flush

    async def flush(self) -> None:
        self._check_open()
        if self.write_back:  # without a server cache, every acknowledged write is stable
            await self._request(NBD_CMD_FLUSH, 0, None)

    async def unmap(self, ranges: Sequence[tuple[int, int]]) -> None:
        """TRIM is a hint: without server support the data simply stays."""
        for offset, length in ranges:
            self._check_range(offset, length, write=True)
        if not self.can_unmap:
            return
        await self._pieces(
            [
                functools.partial(self._request, NBD_CMD_TRIM, o, None, length=n)
                for offset, length in ranges
                for o, n in self._zero_pieces(offset, length)
            ]
        )

    async def write_zeroes(self, offset: int, length: int) -> None:
        self._check_range(offset, length, write=True)
        if self.can_write_zeroes:
            calls = [
                functools.partial(self._request, NBD_CMD_WRITE_ZEROES, o, None, length=n)
                for o, n in self._zero_pieces(offset, length)
            ]
        else:  # emulate with plain writes of a shared zero buffer
            zeros = memoryview(bytes(min(ZERO_BUFFER_SIZE, self.max_transfer)))
            calls = [
                functools.partial(self._request, NBD_CMD_WRITE, o, [zeros[:n]])
                for o in range(offset, offset + length, len(zeros))
                for n in [min(len(zeros), offset + length - o)]
            ]
        await self._pieces(calls)

    def _zero_pieces(self, offset: int, length: int) -> list[tuple[int, int]]:
        step = MAX_ZEROES_REQUEST // self.block_size * self.block_size
        return [(o, min(step, offset + length - o)) for o in range(offset, offset + length, step)]

    def _check_open(self) -> None:
        if not self._opened:
            raise BackendIOError("nbd: backend is not open")
        if self._closed:
            raise BackendIOError("nbd: backend is closed")

    def _check_range(self, offset: int, length: int, write: bool = False) -> None:
        self._check_open()
        if write and self.read_only:
            raise BackendIOError("nbd: export is read-only")
        bs = self.block_size
        if offset < 0 or length < 0 or offset % bs or length % bs:
            raise BackendIOError(f"nbd: unaligned I/O at {offset}+{length} (block {bs})")
        if offset + length > self.capacity:
            raise BackendIOError(f"nbd: I/O at {offset}+{length} beyond {self.capacity}")

    async def _pieces(self, calls: Sequence[Callable[[], Awaitable[None]]]) -> None:
        """Run request pieces concurrently; the first failure cancels the rest."""
        if len(calls) <= 1:
            for call in calls:
                await call()
            return
        errors: list[BackendIOError] = []

        async def run(call: Callable[[], Awaitable[None]]) -> None:
            try:
                await call()
            except BackendIOError as e:
                errors.append(e)
                nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            for call in calls:
                nursery.start_soon(run, call)
        if errors:
            raise errors[0]

    # -- one request, with replays -----------------------------------------------------

    async def _request(
        self,
        command: int,
        offset: int,
        buffers: list[memoryview] | None,
        flags: int = 0,
        length: int | None = None,
    ) -> None:
        self._check_open()
        if length is None:
            length = sum(len(b) for b in buffers) if buffers else 0
        assert self._slots is not None and self._idle is not None
        self._active += 1
        try:
            give_up_at: float | None = None
            async with self._slots:
                while True:
                    conn = self._conn
                    if conn is None or conn.dead:
                        if give_up_at is None:
                            give_up_at = trio.current_time() + self._give_up_after
                        conn = await self._reconnect(give_up_at)
                    if command == NBD_CMD_FLUSH and self._cache_lost:
                        self._cache_lost = False
                        raise BackendIOError(
                            "nbd: the connection dropped before acknowledged writes were "
                            "flushed; the server may have lost them"
                        )
                    try:
                        reply = await self._attempt(conn, command, offset, length, flags, buffers)
                    except _ConnectionLost as e:
                        if command == NBD_CMD_FLUSH:
                            self._cache_lost = False  # this failure is the one report of it
                            raise BackendIOError(f"nbd: flush interrupted: {e}") from None
                        now = trio.current_time()
                        if give_up_at is None:
                            give_up_at = now + self._give_up_after
                        if now >= give_up_at or self._closed:
                            raise BackendIOError(f"nbd: giving up: {e}") from None
                        self.replays += 1
                        continue
                    if reply.error:
                        where = offset if reply.error_offset is None else reply.error_offset
                        raise BackendIOError(
                            f"nbd: {_COMMAND_NAMES.get(command, command)} at {offset}+{length} "
                            f"failed: {error_name(reply.error)}"
                            + (f" ({reply.message})" if reply.message else ""),
                            offset=where // self.block_size * self.block_size,
                        )
                    return
        finally:
            self._active -= 1
            if self._active == 0 and self._closed:
                self._idle.set()

    async def _attempt(
        self,
        conn: _Connection,
        command: int,
        offset: int,
        length: int,
        flags: int,
        buffers: list[memoryview] | None,
    ) -> Any:
        """Send one request on conn and wait for its reply (raises _ConnectionLost)."""
        handle = next(self._handles)
        waiter = _Waiter(command, bool(flags & NBD_CMD_FLAG_FUA))
        async with conn.send_lock:
            if conn.dead:
                raise _ConnectionLost(conn.why)
            header = conn.core.send_request(
                handle,
                command,
                offset,
                length,
                flags,
                buffers if command == NBD_CMD_READ else None,
            )
            if command == NBD_CMD_FLUSH:
                waiter.flush_mark = conn.acked_writes
            conn.waiters[handle] = waiter
            payload = buffers if command == NBD_CMD_WRITE and buffers else []
            deadline = trio.current_time() + self._request_timeout
            # A half-sent request would corrupt the stream: no caller cancellation here.
            with trio.CancelScope(shield=True, deadline=deadline) as scope:
                try:
                    await _send_all(conn.sock, [memoryview(header), *payload])
                except _SOCKET_ERRORS as e:
                    self._kill(conn, f"send failed: {e!r}")
            if scope.cancelled_caught:
                self._kill(conn, "send timed out")
            if conn.dead:
                raise _ConnectionLost(conn.why)
        try:
            return await self._wait(conn, waiter, trio.current_time() + self._request_timeout)
        finally:
            if waiter.reply is None:
                # cancelled or lost: the reply, if it ever comes, must not touch our buffers
                conn.core.abandon(handle)
                conn.waiters.pop(handle, None)
                if not conn.receiving:
                    self._hand_over(conn)

    async def _wait(self, conn: _Connection, waiter: _Waiter, deadline: float) -> Any:
        with trio.move_on_at(deadline):
            while waiter.reply is None:
                if conn.dead:
                    raise _ConnectionLost(conn.why)
                if not conn.receiving:
                    conn.receiving = True
                    try:
                        await self._receive(conn, waiter)
                    finally:
                        conn.receiving = False
                        self._hand_over(conn, exclude=waiter)
                else:
                    waiter.wake = trio.Event()
                    await waiter.wake.wait()
        if waiter.reply is None:
            if not conn.dead:
                self._kill(conn, f"no reply within {self._request_timeout} s")
            raise _ConnectionLost(conn.why)
        return waiter.reply

    async def _receive(self, conn: _Connection, waiter: _Waiter) -> None:
        """Read and dispatch replies until ours is in (or the connection dies)."""
        core = conn.core
        while waiter.reply is None and not conn.dead:
            target = core.recv_buffer()
            try:
                n = await conn.sock.recv_into(target)
            except _SOCKET_ERRORS as e:
                self._kill(conn, f"receive failed: {e!r}")
                return
            if n == 0:
                self._kill(conn, "server closed the connection")
                return
            try:
                core.bytes_received(n)
            except NbdProtocolError as e:
                self._dispatch(conn)  # replies completed before the bad bytes still count
                log.warning("nbd %s: protocol error from server: %s", self.address, e)
                self._kill(conn, f"protocol error: {e}")
                return
            self._dispatch(conn)

    def _dispatch(self, conn: _Connection) -> None:
        shutting_down = False
        while (event := conn.core.next_event()) is not None:
            conn.replies += 1
            waiter = conn.waiters.pop(event.handle, None)
            if waiter is None:
                continue  # abandoned by its caller
            if event.error == NBD_ESHUTDOWN:
                # the server is going away: like a dropped connection (so replayable)
                conn.waiters[event.handle] = waiter
                shutting_down = True
                continue
            if event.error == 0:
                if waiter.command in (NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES) and not waiter.fua:
                    conn.acked_writes += 1
                elif waiter.command == NBD_CMD_FLUSH:
                    conn.flushed_upto = max(conn.flushed_upto, waiter.flush_mark)
            waiter.reply = event
            waiter.wake.set()
        if shutting_down:
            self._kill(conn, "server is shutting down")

    def _hand_over(self, conn: _Connection, exclude: _Waiter | None = None) -> None:
        """Wake one waiter so someone keeps reading the socket."""
        for w in conn.waiters.values():
            if w is not exclude and w.reply is None:
                w.wake.set()
                return

    def _kill(self, conn: _Connection, why: str) -> None:
        if conn.dead:
            return
        conn.dead, conn.why = True, why
        if self.write_back and conn.acked_writes > conn.flushed_upto:
            self._cache_lost = True
        # A server that accepts connections and then breaks every one must not be
        # hammered: back off before the next dial until a connection proves useful.
        if conn.replies:
            self._flap_delay = 0.0
        else:
            self._flap_delay = min(
                max(self._flap_delay * 2, self._reconnect_delay), self._reconnect_max_delay
            )
        log.warning("nbd %s: connection lost: %s", self.address, why)
        conn.sock.close()
        for w in conn.waiters.values():
            w.wake.set()
        conn.waiters.clear()

    # -- connecting ----------------------------------------------------------------

    async def _reconnect(self, give_up_at: float) -> _Connection:
        assert self._connect_lock is not None
        with trio.move_on_at(give_up_at):
            async with self._connect_lock:
                conn = self._conn
                if conn is not None and not conn.dead:
                    return conn  # another request reconnected meanwhile
                if self._closed:
                    raise BackendIOError("nbd: backend is closed")
                if self._flap_delay:
                    await trio.sleep(self._flap_delay)
                conn = await self._dial_with_backoff(give_up_at, False)
                info, old = conn.info, self.export_info
                assert old is not None
                if self._closed:  # close() ran while we were dialing: do not leak this one
                    conn.sock.close()
                    raise BackendIOError("nbd: backend is closed")
                if info.size != old.size or (info.min_block or 1) > self.block_size:
                    conn.sock.close()
                    raise BackendIOError(
                        f"nbd: export changed across reconnect (size {old.size} -> {info.size})"
                    )
                self._conn = conn
                self.reconnects += 1
                return conn
        raise BackendIOError(f"nbd: giving up reconnecting to {self.address}")

    async def _dial_with_backoff(self, give_up_at: float, at_open: bool) -> _Connection:
        delay = self._reconnect_delay
        while True:
            now = trio.current_time()
            try:
                return await self._dial(min(give_up_at, now + self._connect_timeout))
            except NbdOptionError as e:
                if at_open and e.reply_type != NBD_REP_ERR_SHUTDOWN:
                    raise BackendConfigError(f"nbd: {self.address}: {e}") from None
                last: Exception = e
            except (*_SOCKET_ERRORS, NbdProtocolError, trio.TooSlowError) as e:
                last = e
            if trio.current_time() + delay >= give_up_at or self._closed:
                raise BackendIOError(f"nbd: cannot connect to {self.address}: {last!r}")
            log.info("nbd %s: connect failed (%r); retrying in %.2f s", self.address, last, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, self._reconnect_max_delay)

    async def _dial(self, deadline: float) -> _Connection:
        """One connection attempt: socket, handshake, nothing else."""
        sock: trio.socket.SocketType | None = None
        try:
            with trio.fail_at(deadline):
                if self.address.unix_path is not None:
                    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    await sock.connect(self.address.unix_path)
                else:
                    assert self.address.host is not None  # parse_address: TCP has a host
                    stream = await trio.open_tcp_stream(self.address.host, self.address.port)
                    sock = stream.socket  # TCP_NODELAY already set by trio
                hs = NbdHandshake(self.export, structured_replies=self._structured)
                while True:
                    out = hs.data_to_send()
                    if out:
                        await _send_all(sock, [memoryview(out)])
                    if hs.done:
                        break
                    data = await sock.recv(HANDSHAKE_RECV_SIZE)
                    if not data:
                        raise NbdProtocolError("server closed the connection during handshake")
                    hs.receive_data(data)
                if hs.trailing_data:
                    raise NbdProtocolError("unexpected data after the handshake")
                return _Connection(sock, hs.result)
        except BaseException:
            if sock is not None:
                sock.close()
            raise


_COMMAND_NAMES = {
    NBD_CMD_READ: "read",
    NBD_CMD_WRITE: "write",
    NBD_CMD_FLUSH: "flush",
    NBD_CMD_TRIM: "trim",
    NBD_CMD_WRITE_ZEROES: "write-zeroes",
}
