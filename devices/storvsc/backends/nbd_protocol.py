"""The NBD protocol, client side, with no I/O (h11-shaped): bytes in, events and bytes out.

Two machines live here:

- `NbdHandshake`: the fixed newstyle handshake (client flags, NBD_OPT_STRUCTURED_REPLY,
  NBD_OPT_GO asking for NBD_INFO_BLOCK_SIZE, with an NBD_OPT_EXPORT_NAME fallback for
  servers without NBD_OPT_GO). Feed it with `receive_data`, send what `data_to_send`
  returns; when `done`, `result` is the export's `ExportInfo`.
- `NbdClientConnection`: the transmission phase. `send_request` registers a request
  and returns its 28-byte header (a write's payload follows it on the wire, sent by
  the caller straight from its own buffers). Replies are received zero-copy:
  `recv_buffer()` says where the next bytes should land -- a slice of a read
  request's own buffer when payload is due, else a small internal buffer -- and
  `bytes_received(n)` says how many did. `next_event()` then yields one
  `ReplyDone` per finished request. `receive_data(bytes)` is the copying
  convenience for tests and fuzzers.

The server is untrusted: every length is checked against a named bound or against
the request it claims to answer before anything is allocated or copied. Whatever
the server sends either parses or raises `NbdProtocolError`, nothing else
(tests/test_backend_nbd_protocol.py fuzzes exactly that).
"""

from __future__ import annotations

import bisect
import enum
import struct
from collections import deque
from collections.abc import Generator, Sequence
from dataclasses import dataclass

# --- magic numbers -------------------------------------------------------------------
NBD_MAGIC = 0x4E42444D41474943  # "NBDMAGIC"
NBD_OPTS_MAGIC = 0x49484156454F5054  # "IHAVEOPT"
NBD_CLISERV_MAGIC = 0x00420281861253  # oldstyle negotiation: not supported
NBD_REP_MAGIC = 0x0003E889045565A9
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF

# --- handshake flags -----------------------------------------------------------------
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1

# --- transmission flags --------------------------------------------------------------
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8

# --- options and option replies ------------------------------------------------------
NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8

NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_FLAG_ERROR = 1 << 31
NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR | 1
NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR | 2
NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR | 3
NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR | 4
NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR | 5
NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR | 6
NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR | 7
NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR | 8

NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_DESCRIPTION = 2
NBD_INFO_BLOCK_SIZE = 3

# --- commands, command flags ---------------------------------------------------------
NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_WRITE_ZEROES = 6

NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1

# --- structured replies --------------------------------------------------------------
NBD_REPLY_FLAG_DONE = 1 << 0
NBD_REPLY_TYPE_NONE = 0
NBD_REPLY_TYPE_OFFSET_DATA = 1
NBD_REPLY_TYPE_OFFSET_HOLE = 2
NBD_REPLY_TYPE_BLOCK_STATUS = 5
NBD_REPLY_TYPE_ERROR_BIT = 1 << 15
NBD_REPLY_TYPE_ERROR = NBD_REPLY_TYPE_ERROR_BIT | 1
NBD_REPLY_TYPE_ERROR_OFFSET = NBD_REPLY_TYPE_ERROR_BIT | 2

# --- error numbers (the protocol's own, not the host's errno) ------------------------
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108
NBD_ERROR_NAMES = {
    NBD_EPERM: "EPERM",
    NBD_EIO: "EIO",
    NBD_ENOMEM: "ENOMEM",
    NBD_EINVAL: "EINVAL",
    NBD_ENOSPC: "ENOSPC",
    NBD_EOVERFLOW: "EOVERFLOW",
    NBD_ENOTSUP: "ENOTSUP",
    NBD_ESHUTDOWN: "ESHUTDOWN",
}

# --- wire layouts --------------------------------------------------------------------
_GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
_CLIENT_FLAGS = struct.Struct(">I")
_OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length
_OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
_EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags
_INFO_EXPORT = struct.Struct(">HQH")  # info type, size, flags
_INFO_BLOCK_SIZE = struct.Struct(">HIII")  # info type, minimum, preferred, maximum
_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
_SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle
_CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, handle, payload length
_U64 = struct.Struct(">Q")
_HOLE = struct.Struct(">QI")  # offset, hole size
_ERROR = struct.Struct(">IH")  # error, message length

REQUEST_SIZE = _REQUEST.size
SIMPLE_REPLY_SIZE = _SIMPLE_REPLY.size
CHUNK_HEADER_SIZE = _CHUNK.size
EXPORT_NAME_ZEROES = 124  # padding after the NBD_OPT_EXPORT_NAME reply without NO_ZEROES

# --- bounds on what we accept or send ------------------------------------------------
MAX_STRING = 4096  # the spec's limit on export names and error messages
MAX_OPTION_REPLY_LENGTH = 64 * 1024  # one option reply's payload; real ones are tiny
MAX_OPTION_REPLIES = 64  # NBD_REP_INFO replies to one NBD_OPT_GO before we call it abuse
MAX_ERROR_CHUNK_LENGTH = 6 + MAX_STRING + 8  # error, msg length, message, offset
MAX_BLOCK_SIZE_MINIMUM = 64 * 1024  # the spec's upper limit on the minimum block size
DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024  # max block size to assume when none is advertised
MAX_REQUEST_LENGTH = 0xFFFFFFFF  # the request's length field is 32 bits
MAX_OFFSET = 0xFFFFFFFFFFFFFFFF  # the request's offset field is 64 bits
MAX_REPLY_FRAGMENTS = 4096  # disjoint content ranges in one read reply we track
RECV_BUFFER_SIZE = 64 * 1024  # internal buffer for headers and small payloads

assert RECV_BUFFER_SIZE >= CHUNK_HEADER_SIZE + MAX_ERROR_CHUNK_LENGTH


class NbdProtocolError(Exception):
    """The server broke the protocol; the connection cannot be trusted any more."""


class NbdLocalProtocolError(Exception):
    """We misused the protocol core (a bug on our side, not the server's)."""


class NbdOptionError(Exception):
    """The server refused an option it was entitled to refuse (unknown export, policy)."""

    def __init__(self, option: int, reply_type: int, message: str) -> None:
        super().__init__(
            f"option {option} refused with reply type {reply_type:#x}"
            + (f": {message}" if message else "")
        )
        self.option = option
        self.reply_type = reply_type
        self.message = message


def error_name(error: int) -> str:
    """A readable name for an NBD error number."""
    return NBD_ERROR_NAMES.get(error, f"error {error}")


def _decode_text(raw: bytes | memoryview) -> str:
    return bytes(raw[:MAX_STRING]).decode("utf-8", errors="replace")


# ======================================================================================
# Handshake
# ======================================================================================


@dataclass(frozen=True)
class ExportInfo:
    """What the handshake learned about the export."""

    size: int
    flags: int  # transmission flags
    min_block: int  # 0 when the server sent no NBD_INFO_BLOCK_SIZE
    preferred_block: int
    max_block: int
    structured_replies: bool

    @property
    def read_only(self) -> bool:
        return bool(self.flags & NBD_FLAG_READ_ONLY)

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)


class _Need:
    """A request, yielded by the handshake's step generator, for exactly n bytes."""

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n


class NbdHandshake:
    """The client side of fixed newstyle negotiation, as a byte-fed state machine."""

    def __init__(
        self,
        export_name: str = "",
        *,
        structured_replies: bool = True,
        request_block_size: bool = True,
    ) -> None:
        name = export_name.encode("utf-8")
        if len(name) > MAX_STRING or "\0" in export_name:
            raise NbdLocalProtocolError("export name too long or contains NUL")
        self._name = name
        self._want_structured = structured_replies
        self._request_block_size = request_block_size
        self._in = bytearray()
        self._out = bytearray()
        self._result: ExportInfo | None = None
        self._steps = self._run()
        self._need: _Need = next(self._steps)

    @property
    def done(self) -> bool:
        return self._result is not None

    @property
    def result(self) -> ExportInfo:
        if self._result is None:
            raise NbdLocalProtocolError("handshake not finished")
        return self._result

    @property
    def trailing_data(self) -> bytes:
        """Bytes received past the end of the handshake (a well-behaved server sends none)."""
        return bytes(self._in)

    @property
    def bytes_wanted(self) -> int:
        """How many more bytes the handshake needs before it can move on (0 when done)."""
        if self._result is not None:
            return 0
        return max(self._need.n - len(self._in), 1)

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the server; raises NbdProtocolError / NbdOptionError."""
        self._in += data
        while self._result is None and len(self._in) >= self._need.n:
            chunk = bytes(self._in[: self._need.n])
            del self._in[: self._need.n]
            try:
                self._need = self._steps.send(chunk)
            except StopIteration:
                break

    # -- the steps, in order; each `yield _Need(n)` returns exactly n bytes ------------

    def _send_option(self, option: int, data: bytes = b"") -> None:
        self._out += _OPTION.pack(NBD_OPTS_MAGIC, option, len(data)) + data

    def _read_option_reply(self, option: int) -> Generator[_Need, bytes, tuple[int, bytes]]:
        """Generator step: one option reply header + payload, validated."""
        raw = yield _Need(_OPTION_REPLY.size)
        magic, echoed, reply_type, length = _OPTION_REPLY.unpack(raw)
        if magic != NBD_REP_MAGIC:
            raise NbdProtocolError(f"bad option reply magic {magic:#x}")
        if echoed != option:
            raise NbdProtocolError(f"option reply for option {echoed}, expected {option}")
        if length > MAX_OPTION_REPLY_LENGTH:
            raise NbdProtocolError(f"option reply length {length} over the limit")
        payload = (yield _Need(length)) if length else b""
        return reply_type, payload

    def _run(self) -> Generator[_Need, bytes, None]:
        raw = yield _Need(_GREETING.size)
        magic, opts_magic, hflags = _GREETING.unpack(raw)
        if magic != NBD_MAGIC:
            raise NbdProtocolError(f"bad server magic {magic:#x}")
        if opts_magic == NBD_CLISERV_MAGIC:
            raise NbdProtocolError("oldstyle negotiation is not supported")
        if opts_magic != NBD_OPTS_MAGIC:
            raise NbdProtocolError(f"bad newstyle magic {opts_magic:#x}")
        fixed = bool(hflags & NBD_FLAG_FIXED_NEWSTYLE)
        no_zeroes = bool(hflags & NBD_FLAG_NO_ZEROES)
        cflags = (NBD_FLAG_C_FIXED_NEWSTYLE if fixed else 0) | (
            NBD_FLAG_C_NO_ZEROES if no_zeroes else 0
        )
        self._out += _CLIENT_FLAGS.pack(cflags)

        structured = False
        if fixed and self._want_structured:
            self._send_option(NBD_OPT_STRUCTURED_REPLY)
            reply_type, _ = yield from self._read_option_reply(NBD_OPT_STRUCTURED_REPLY)
            if reply_type == NBD_REP_ACK:
                structured = True
            elif not reply_type & NBD_REP_FLAG_ERROR:
                raise NbdProtocolError(f"unexpected reply {reply_type} to STRUCTURED_REPLY")

        if fixed:
            infos = [NBD_INFO_BLOCK_SIZE] if self._request_block_size else []
            data = (
                struct.pack(">I", len(self._name))
                + self._name
                + struct.pack(f">H{len(infos)}H", len(infos), *infos)
            )
            self._send_option(NBD_OPT_GO, data)
            export: tuple[int, int] | None = None
            sizes = (0, 0, 0)
            for _ in range(MAX_OPTION_REPLIES):
                reply_type, payload = yield from self._read_option_reply(NBD_OPT_GO)
                if reply_type == NBD_REP_INFO:
                    if len(payload) < 2:
                        raise NbdProtocolError("NBD_REP_INFO shorter than its type")
                    (info,) = struct.unpack_from(">H", payload)
                    if info == NBD_INFO_EXPORT:
                        if len(payload) != _INFO_EXPORT.size:
                            raise NbdProtocolError("NBD_INFO_EXPORT of the wrong length")
                        _, size, tflags = _INFO_EXPORT.unpack(payload)
                        export = (size, tflags)
                    elif info == NBD_INFO_BLOCK_SIZE:
                        if len(payload) != _INFO_BLOCK_SIZE.size:
                            raise NbdProtocolError("NBD_INFO_BLOCK_SIZE of the wrong length")
                        sizes = _check_block_sizes(*_INFO_BLOCK_SIZE.unpack(payload)[1:])
                    # NBD_INFO_NAME, NBD_INFO_DESCRIPTION and unknown infos: ignored
                elif reply_type == NBD_REP_ACK:
                    if export is None:
                        raise NbdProtocolError("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT")
                    self._result = _export_info(*export, *sizes, structured)
                    return
                elif reply_type == NBD_REP_ERR_UNSUP:
                    break  # an old server: fall back to NBD_OPT_EXPORT_NAME below
                elif reply_type & NBD_REP_FLAG_ERROR:
                    raise NbdOptionError(NBD_OPT_GO, reply_type, _decode_text(payload))
                else:
                    raise NbdProtocolError(f"unexpected reply {reply_type} to NBD_OPT_GO")
            else:
                raise NbdProtocolError("too many replies to NBD_OPT_GO")

        # NBD_OPT_EXPORT_NAME: no reply header; an unknown export just closes the socket.
        self._send_option(NBD_OPT_EXPORT_NAME, self._name)
        raw = yield _Need(_EXPORT_NAME_REPLY.size)
        size, tflags = _EXPORT_NAME_REPLY.unpack(raw)
        if not no_zeroes:
            yield _Need(EXPORT_NAME_ZEROES)
        self._result = _export_info(size, tflags, 0, 0, 0, structured)


def _check_block_sizes(minimum: int, preferred: int, maximum: int) -> tuple[int, int, int]:
    """Validate NBD_INFO_BLOCK_SIZE: powers of two, ordered, minimum within the spec."""

    def power_of_two(v: int) -> bool:
        return v > 0 and v & (v - 1) == 0

    if not power_of_two(minimum) or minimum > MAX_BLOCK_SIZE_MINIMUM:
        raise NbdProtocolError(f"bad minimum block size {minimum}")
    if not power_of_two(preferred) or preferred < minimum:
        raise NbdProtocolError(f"bad preferred block size {preferred}")
    if maximum < minimum or (maximum != 0xFFFFFFFF and maximum % minimum):
        raise NbdProtocolError(f"bad maximum block size {maximum}")
    return minimum, preferred, maximum


def _export_info(
    size: int, tflags: int, minimum: int, preferred: int, maximum: int, structured: bool
) -> ExportInfo:
    if not tflags & NBD_FLAG_HAS_FLAGS:
        tflags = 0  # without HAS_FLAGS no other bit means anything
    return ExportInfo(size, tflags, minimum, preferred, maximum, structured)


def encode_abort() -> bytes:
    """NBD_OPT_ABORT: leave option haggling politely."""
    return _OPTION.pack(NBD_OPTS_MAGIC, NBD_OPT_ABORT, 0)


# ======================================================================================
# Transmission
# ======================================================================================


@dataclass(frozen=True)
class ReplyDone:
    """A request has its complete reply: error 0 means success."""

    handle: int
    error: int
    message: str = ""
    error_offset: int | None = None  # from NBD_REPLY_TYPE_ERROR_OFFSET, when given


class _Scatter:
    """A request's buffers seen as one byte range: where does relative offset r live?"""

    __slots__ = ("bufs", "starts", "total")

    def __init__(self, bufs: Sequence[memoryview]) -> None:
        self.bufs = [b for b in bufs if b.nbytes]  # empty views would confuse bisect
        self.starts: list[int] = []
        pos = 0
        for b in self.bufs:
            self.starts.append(pos)
            pos += b.nbytes
        self.total = pos

    def view(self, rel: int, maxlen: int) -> memoryview:
        """The longest contiguous slice at rel, at most maxlen bytes (maxlen > 0)."""
        i = bisect.bisect_right(self.starts, rel) - 1
        inner = rel - self.starts[i]
        return self.bufs[i][inner : inner + min(maxlen, self.bufs[i].nbytes - inner)]

    def write(self, rel: int, data: memoryview) -> None:
        pos = 0
        while pos < len(data):
            dst = self.view(rel + pos, len(data) - pos)
            dst[:] = data[pos : pos + len(dst)]
            pos += len(dst)

    def zero(self, rel: int, length: int) -> None:
        pos = 0
        while pos < length:
            dst = self.view(rel + pos, length - pos)
            dst[:] = bytes(len(dst))
            pos += len(dst)


class _Coverage:
    """Disjoint byte ranges a structured read reply has described so far."""

    __slots__ = ("covered", "ranges")

    def __init__(self) -> None:
        self.ranges: list[list[int]] = []  # sorted, merged [start, end)
        self.covered = 0

    def add(self, start: int, end: int) -> None:
        i = bisect.bisect_right(self.ranges, [start, MAX_OFFSET + 1])
        if i and self.ranges[i - 1][1] > start:
            raise NbdProtocolError("read reply chunks overlap")
        if i < len(self.ranges) and self.ranges[i][0] < end:
            raise NbdProtocolError("read reply chunks overlap")
        self.covered += end - start
        if i and self.ranges[i - 1][1] == start:
            self.ranges[i - 1][1] = end
            if i < len(self.ranges) and self.ranges[i][0] == end:
                self.ranges[i - 1][1] = self.ranges.pop(i)[1]
        elif i < len(self.ranges) and self.ranges[i][0] == end:
            self.ranges[i][0] = start
        else:
            if len(self.ranges) >= MAX_REPLY_FRAGMENTS:
                raise NbdProtocolError("read reply split into too many fragments")
            self.ranges.insert(i, [start, end])


class _Pending:
    """One request awaiting its reply."""

    __slots__ = (
        "abandoned",
        "command",
        "coverage",
        "error",
        "error_offset",
        "length",
        "message",
        "offset",
    )

    def __init__(self, command: int, offset: int, length: int) -> None:
        self.command = command
        self.offset = offset
        self.length = length
        self.error = 0
        self.message = ""
        self.error_offset: int | None = None
        self.abandoned = False
        self.coverage: _Coverage | None = None


class _PendingRead(_Pending):
    __slots__ = ("scatter",)

    def __init__(self, offset: int, length: int, scatter: _Scatter) -> None:
        super().__init__(NBD_CMD_READ, offset, length)
        self.scatter = scatter


class _State(enum.Enum):
    HEADER = enum.auto()  # waiting for a reply magic + header
    PAYLOAD = enum.auto()  # waiting for a chunk's whole (small) payload in the buffer
    DATA = enum.auto()  # read payload streaming into a request's buffers
    BROKEN = enum.auto()  # a protocol error happened; nothing more is parsed


class NbdClientConnection:
    """The transmission phase: requests out, replies in, matched by handle."""

    def __init__(self, structured_replies: bool) -> None:
        self.structured = structured_replies
        self._pending: dict[int, _Pending] = {}
        self._buf = bytearray(RECV_BUFFER_SIZE)
        self._view = memoryview(self._buf)
        self._start = 0  # unparsed bytes are _buf[_start:_end]
        self._end = 0
        self._state = _State.HEADER
        self._events: deque[ReplyDone] = deque()
        # the reply being parsed
        self._handle = 0
        self._chunk_flags = 0
        self._chunk_type = 0
        self._chunk_length = 0
        self._data_rel = 0  # DATA: where the next byte goes, relative to the request
        self._data_left = 0  # DATA: bytes still to come
        self._data_done = False  # DATA: the reply ends when the data does
        self._data_count = 0  # PAYLOAD of an OFFSET_DATA chunk: data bytes after the offset
        # what recv_buffer() last handed out: None = internal buffer
        self._target_direct = False
        self._target_given = False

    # -- requests ------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def send_request(
        self,
        handle: int,
        command: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        buffers: Sequence[memoryview] | None = None,
    ) -> bytes:
        """Register a request and return its header; READ needs `buffers` to fill."""
        if handle in self._pending:
            raise NbdLocalProtocolError(f"handle {handle} is already in flight")
        if not 0 <= handle <= MAX_OFFSET or not 0 <= offset <= MAX_OFFSET:
            raise NbdLocalProtocolError("handle or offset out of range")
        if not 0 <= length <= MAX_REQUEST_LENGTH or offset + length > MAX_OFFSET + 1:
            raise NbdLocalProtocolError("length out of range")
        header = _REQUEST.pack(NBD_REQUEST_MAGIC, flags, command, handle, offset, length)
        if command == NBD_CMD_DISC:
            return header  # no reply ever comes
        if command == NBD_CMD_READ:
            scatter = _Scatter(buffers or ())
            if scatter.total != length:
                raise NbdLocalProtocolError("read buffers do not match the length")
            self._pending[handle] = _PendingRead(offset, length, scatter)
        else:
            self._pending[handle] = _Pending(command, offset, length)
        return header

    def abandon(self, handle: int) -> None:
        """The caller stopped waiting: its reply will be drained but never touch its buffers."""
        req = self._pending.get(handle)
        if req is not None:
            req.abandoned = True

    def pending_handles(self) -> list[int]:
        return list(self._pending)

    # -- receiving -----------------------------------------------------------------

    def recv_buffer(self) -> memoryview:
        """Where the next received bytes should go: a request's buffer, or ours."""
        if self._state is _State.BROKEN:
            raise NbdLocalProtocolError("the connection is broken")
        self._target_given = True
        if self._state is _State.DATA and self._start == self._end:
            req = self._pending[self._handle]
            if not req.abandoned:
                assert isinstance(req, _PendingRead)
                self._target_direct = True
                return req.scatter.view(self._data_rel, self._data_left)
        self._target_direct = False
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf):
            # compact: move the unparsed tail to the front (at most one header's worth
            # or one small payload, bounded by RECV_BUFFER_SIZE)
            n = self._end - self._start
            self._buf[:n] = self._buf[self._start : self._end]
            self._start, self._end = 0, n
        return self._view[self._end :]

    def bytes_received(self, n: int) -> None:
        """n bytes landed in the last recv_buffer(); parse what can be parsed."""
        if not self._target_given:
            raise NbdLocalProtocolError("bytes_received without recv_buffer")
        self._target_given = False
        if n < 0:
            raise NbdLocalProtocolError("negative byte count")
        try:
            if self._target_direct:
                self._data_rel += n
                self._data_left -= n
                if self._data_left == 0:
                    self._finish_data()  # may find the reply bad too (fuzz_nbd finding)
            else:
                self._end += n
            self._parse()
        except NbdProtocolError:
            self._state = _State.BROKEN
            raise

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Copying convenience: feed bytes as if the socket had delivered them."""
        src = memoryview(data).cast("B")
        while len(src):
            dst = self.recv_buffer()
            n = min(len(dst), len(src))
            dst[:n] = src[:n]
            src = src[n:]
            self.bytes_received(n)

    def next_event(self) -> ReplyDone | None:
        return self._events.popleft() if self._events else None

    # -- the parser ----------------------------------------------------------------

    def _avail(self) -> int:
        return self._end - self._start

    def _take(self, n: int) -> memoryview:
        mv = self._view[self._start : self._start + n]
        self._start += n
        return mv

    def _parse(self) -> None:
        while True:
            if self._state is _State.HEADER:
                if not self._parse_header():
                    return
            elif self._state is _State.PAYLOAD:
                if self._avail() < self._chunk_length:
                    return
                self._parse_chunk_payload(self._take(self._chunk_length))
            elif self._state is _State.DATA:
                n = min(self._avail(), self._data_left)
                if n == 0:
                    return
                req = self._pending[self._handle]
                chunk = self._take(n)
                if not req.abandoned:
                    assert isinstance(req, _PendingRead)
                    req.scatter.write(self._data_rel, chunk)
                self._data_rel += n
                self._data_left -= n
                if self._data_left == 0:
                    self._finish_data()
            else:
                return

    def _lookup(self, handle: int) -> _Pending:
        req = self._pending.get(handle)
        if req is None:
            raise NbdProtocolError(f"reply for unknown handle {handle:#x}")
        return req

    def _parse_header(self) -> bool:
        if self._avail() < 4:
            return False
        (magic,) = struct.unpack_from(">I", self._buf, self._start)
        if magic == NBD_SIMPLE_REPLY_MAGIC:
            if self._avail() < SIMPLE_REPLY_SIZE:
                return False
            _, error, handle = _SIMPLE_REPLY.unpack(self._take(SIMPLE_REPLY_SIZE))
            req = self._lookup(handle)
            if req.command == NBD_CMD_READ and error == 0:
                if self.structured:
                    raise NbdProtocolError("simple reply with data to a structured read")
                self._handle = handle
                self._start_data(0, req.length, done=True)
            else:
                self._complete(handle, error, "")
            return True
        if magic == NBD_STRUCTURED_REPLY_MAGIC:
            if not self.structured:
                raise NbdProtocolError("structured reply that was never negotiated")
            if self._avail() < CHUNK_HEADER_SIZE:
                return False
            _, flags, ctype, handle, length = _CHUNK.unpack(self._take(CHUNK_HEADER_SIZE))
            req = self._lookup(handle)
            self._handle = handle
            self._chunk_flags = flags
            self._chunk_type = ctype
            self._chunk_length = length
            if ctype == NBD_REPLY_TYPE_OFFSET_DATA:
                if req.command != NBD_CMD_READ:
                    raise NbdProtocolError("data chunk in reply to a non-read")
                if length < _U64.size + 1 or length - _U64.size > req.length:
                    raise NbdProtocolError(f"data chunk length {length} does not fit the read")
                self._chunk_length = _U64.size  # the offset first, then the data streams
                self._data_count = length - _U64.size
            elif ctype == NBD_REPLY_TYPE_OFFSET_HOLE:
                if req.command != NBD_CMD_READ:
                    raise NbdProtocolError("hole chunk in reply to a non-read")
                if length != _HOLE.size:
                    raise NbdProtocolError(f"hole chunk length {length}")
            elif ctype == NBD_REPLY_TYPE_NONE:
                if length != 0:
                    raise NbdProtocolError("NONE chunk with a payload")
                if not flags & NBD_REPLY_FLAG_DONE:
                    raise NbdProtocolError("NONE chunk without the DONE flag")
            elif ctype & NBD_REPLY_TYPE_ERROR_BIT:
                if not _ERROR.size <= length <= MAX_ERROR_CHUNK_LENGTH:
                    raise NbdProtocolError(f"error chunk length {length}")
            else:
                raise NbdProtocolError(f"unexpected chunk type {ctype}")
            self._state = _State.PAYLOAD
            return True
        raise NbdProtocolError(f"bad reply magic {magic:#x}")

    def _parse_chunk_payload(self, payload: memoryview) -> None:
        req = self._pending[self._handle]
        ctype = self._chunk_type
        done = bool(self._chunk_flags & NBD_REPLY_FLAG_DONE)
        self._state = _State.HEADER
        if ctype == NBD_REPLY_TYPE_OFFSET_DATA:
            (offset,) = _U64.unpack(payload)
            count = self._data_count
            rel = self._claim(req, offset, count)
            self._start_data(rel, count, done=done)
            return
        if ctype == NBD_REPLY_TYPE_OFFSET_HOLE:
            offset, size = _HOLE.unpack(payload)
            if size == 0:
                raise NbdProtocolError("empty hole chunk")
            rel = self._claim(req, offset, size)
            if not req.abandoned:
                assert isinstance(req, _PendingRead)
                req.scatter.zero(rel, size)
        elif ctype & NBD_REPLY_TYPE_ERROR_BIT:
            error, msg_len = _ERROR.unpack_from(payload)
            if msg_len > len(payload) - _ERROR.size:
                raise NbdProtocolError("error message longer than its chunk")
            if error == 0:
                raise NbdProtocolError("error chunk with error 0")
            offset = None
            if ctype == NBD_REPLY_TYPE_ERROR_OFFSET:
                if len(payload) != _ERROR.size + msg_len + _U64.size:
                    raise NbdProtocolError("error offset chunk of the wrong length")
                (offset,) = _U64.unpack_from(payload, _ERROR.size + msg_len)
                if req.length and not req.offset <= offset < req.offset + req.length:
                    raise NbdProtocolError("error offset outside the request")
            if req.error_offset is None or (offset is not None and offset < req.error_offset):
                req.error_offset = offset
            if req.error == 0:
                req.error = error
                req.message = _decode_text(payload[_ERROR.size : _ERROR.size + msg_len])
        if done:
            self._finish_structured(req)

    def _claim(self, req: _Pending, offset: int, count: int) -> int:
        """Check a content chunk lies inside the read and overlaps nothing; its rel offset."""
        if offset < req.offset or offset + count > req.offset + req.length:
            raise NbdProtocolError("content chunk outside the read")
        if req.coverage is None:
            req.coverage = _Coverage()
        req.coverage.add(offset - req.offset, offset - req.offset + count)
        return offset - req.offset

    def _start_data(self, rel: int, count: int, done: bool) -> None:
        self._data_rel = rel
        self._data_left = count
        self._data_done = done
        self._state = _State.DATA
        if count == 0:
            self._finish_data()  # a zero-length simple read: nothing streams

    def _finish_data(self) -> None:
        self._state = _State.HEADER
        req = self._pending[self._handle]
        if not self.structured:
            self._complete(self._handle, 0, "")
        elif self._data_done:
            self._finish_structured(req)

    def _finish_structured(self, req: _Pending) -> None:
        if req.command == NBD_CMD_READ and req.error == 0:
            covered = req.coverage.covered if req.coverage else 0
            if covered != req.length:
                raise NbdProtocolError("read reply finished without covering the request")
        self._complete(self._handle, req.error, req.message, req.error_offset)

    def _complete(
        self, handle: int, error: int, message: str, error_offset: int | None = None
    ) -> None:
        del self._pending[handle]
        self._events.append(ReplyDone(handle, error, message, error_offset))


def encode_disconnect() -> bytes:
    """NBD_CMD_DISC: the soft disconnect; no reply comes."""
    return _REQUEST.pack(NBD_REQUEST_MAGIC, 0, NBD_CMD_DISC, 0, 0, 0)
