"""Real NBD servers for the tests: qemu-nbd on a qcow2 image, nbdkit's memory plugin.

Each server runs as a subprocess on loopback (a Unix socket, or TCP on 127.0.0.1 with
a free port), is polled until it accepts connections, and is always killed when the
`with` block ends. A server that cannot start fails the test: CI installs both.
"""

from __future__ import annotations

import signal
import socket
import struct
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio
from conftest import require_tool

READY_TIMEOUT = 10.0  # seconds for a server to start accepting
POLL_INTERVAL = 0.01
IMAGE_SIZE = 64 * 1024 * 1024


def free_tcp_port() -> int:
    """A port nobody listens on right now (small race, fine on a test machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_qcow2(path: Path, size: int = IMAGE_SIZE) -> Path:
    subprocess.run(
        [_tool("qemu-img"), "create", "-q", "-f", "qcow2", str(path), str(size)],
        check=True,
        capture_output=True,
    )
    return path


PACKAGES = {"qemu-img": "qemu-utils", "qemu-nbd": "qemu-utils", "nbdkit": "nbdkit"}


def _tool(name: str) -> str:
    """A missing server fails the test naming its package (scripts/test installs it)."""
    return require_tool(name, PACKAGES[name])


class NbdServer:
    """One server process; `address` is what NbdBackend takes."""

    def __init__(self, argv: list[str], unix_path: Path | None, port: int | None) -> None:
        self.argv = argv
        self.unix_path = unix_path
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        return f"tcp:127.0.0.1:{self.port}"

    def _probe(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            raise RuntimeError(f"{self.argv[0]} exited with {self.proc.returncode}: {err}")
        try:
            if self.unix_path is not None:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(self.unix_path))
            else:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def _spawn(self) -> None:
        if self.unix_path is not None and self.unix_path.exists():
            self.unix_path.unlink()  # a killed server leaves its socket behind
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

    def start(self) -> NbdServer:
        self._spawn()
        deadline = time.monotonic() + READY_TIMEOUT
        while not self._probe():
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.argv[0]} did not start listening")
            time.sleep(POLL_INTERVAL)
        return self

    async def start_async(self) -> None:
        """Start (again) without blocking the trio loop: for restarts mid-workload."""
        self._spawn()
        with trio.fail_after(READY_TIMEOUT):
            while not self._probe():
                await trio.sleep(POLL_INTERVAL)

    def kill(self) -> None:
        """SIGKILL: the server gets no chance to flush or say goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()
            if self.proc.stderr:
                self.proc.stderr.close()

    def __enter__(self) -> NbdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


def qemu_nbd(
    image: Path,
    *,
    unix_path: Path | None = None,
    tcp: bool = False,
    read_only: bool = False,
    export: str | None = None,
    cache: str = "writethrough",
) -> NbdServer:
    """qemu-nbd serving a qcow2 image; writethrough so a SIGKILL loses no acked write."""
    argv = [_tool("qemu-nbd"), "-f", "qcow2", "--persistent", "--shared=8", f"--cache={cache}"]
    argv += ["--discard=unmap"]
    port = None
    if tcp:
        port = free_tcp_port()
        argv += ["-b", "127.0.0.1", "-p", str(port)]
    else:
        assert unix_path is not None
        argv += ["-k", str(unix_path)]
    if read_only:
        argv.append("-r")
    if export is not None:
        argv += ["-x", export]
    argv.append(str(image))
    return NbdServer(argv, None if tcp else unix_path, port)


def nbdkit_memory(
    unix_path: Path, size: str = "64M", filters: list[str] | None = None, *params: str
) -> NbdServer:
    """nbdkit's RAM disk (a fresh, zeroed disk every start)."""
    argv = [_tool("nbdkit"), "--foreground", "--exit-with-parent", "-U", str(unix_path)]
    for f in filters or []:
        argv.append(f"--filter={f}")
    argv += ["memory", f"size={size}", *params]
    return NbdServer(argv, unix_path, None)


def short_socket_path(tmp_path: Path, name: str) -> Path:
    """Unix socket paths are limited to ~107 bytes; pytest's tmp paths can be long."""
    path = tmp_path / name
    if len(str(path)) < 100:
        return path
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="nbd"))
    return d / name


__all__ = [
    "IMAGE_SIZE",
    "FakeNbdServer",
    "FakeRequest",
    "NbdServer",
    "chunk",
    "free_tcp_port",
    "make_qcow2",
    "nbdkit_memory",
    "qemu_nbd",
    "short_socket_path",
    "simple_reply",
]


# ======================================================================================
# An in-process NBD server on trio, for behaviour no real server shows on demand:
# broken replies, hangs, dropped connections.
# ======================================================================================

_NBDMAGIC = 0x4E42444D41474943
_IHAVEOPT = 0x49484156454F5054
_REP_MAGIC = 0x0003E889045565A9
_SIMPLE = 0x67446698
_STRUCTURED = 0x668E33EF
_FLAGS = 1 | (1 << 2) | (1 << 3) | (1 << 5) | (1 << 6)  # HAS_FLAGS FLUSH FUA TRIM ZEROES


@dataclass
class FakeRequest:
    conn_no: int  # 0 for the first connection, 1 after the first reconnect, ...
    command: int
    flags: int
    handle: int
    offset: int
    length: int
    payload: bytes = b""


def simple_reply(handle: int, error: int = 0, data: bytes = b"") -> bytes:
    return struct.pack(">IIQ", _SIMPLE, error, handle) + data


def chunk(handle: int, ctype: int, payload: bytes, done: bool = True, length: int | None = None):
    n = len(payload) if length is None else length
    return struct.pack(">IHHQI", _STRUCTURED, 1 if done else 0, ctype, handle, n) + payload


class FakeNbdServer:
    """A tiny RAM-disk NBD server; `misbehave(req, stream)` may take over any request.

    `misbehave` returns True when it handled the request itself (sent something odd,
    closed the stream, or slept forever); False lets the server answer normally.
    """

    def __init__(
        self,
        size: int = 1 << 20,
        *,
        structured: bool = True,
        block_sizes: tuple[int, int, int] | None = None,
        misbehave: Callable[[FakeRequest, trio.SocketStream], Awaitable[bool]] | None = None,
    ) -> None:
        self.disk = bytearray(size)
        self.structured = structured
        self.block_sizes = block_sizes
        self.misbehave = misbehave
        self.requests: list[FakeRequest] = []
        self.connections = 0
        self.port = 0

    @property
    def address(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    async def run(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._serve, listeners)

    async def _serve(self, stream: trio.SocketStream) -> None:
        conn_no = self.connections
        self.connections += 1
        buf = bytearray()

        async def exactly(n: int) -> bytes:
            while len(buf) < n:
                data = await stream.receive_some()
                if not data:
                    raise EOFError
                buf.extend(data)
            out = bytes(buf[:n])
            del buf[:n]
            return out

        structured = False
        try:
            await stream.send_all(struct.pack(">QQH", _NBDMAGIC, _IHAVEOPT, 3))
            await exactly(4)
            while True:
                _, opt, length = struct.unpack(">QII", await exactly(16))
                await exactly(length)  # option data: the export name is not checked
                if opt == 8:  # STRUCTURED_REPLY
                    structured = self.structured
                    rtype = 1 if structured else (1 << 31) | 1
                    await stream.send_all(struct.pack(">QIII", _REP_MAGIC, opt, rtype, 0))
                elif opt == 7:  # GO
                    info = struct.pack(">HQH", 0, len(self.disk), _FLAGS)
                    out = struct.pack(">QIII", _REP_MAGIC, opt, 3, len(info)) + info
                    if self.block_sizes:
                        bs = struct.pack(">HIII", 3, *self.block_sizes)
                        out += struct.pack(">QIII", _REP_MAGIC, opt, 3, len(bs)) + bs
                    out += struct.pack(">QIII", _REP_MAGIC, opt, 1, 0)
                    await stream.send_all(out)
                    break
                else:
                    await stream.send_all(struct.pack(">QIII", _REP_MAGIC, opt, (1 << 31) | 1, 0))
            while True:
                _, flags, cmd, handle, offset, length = struct.unpack(">IHHQQI", await exactly(28))
                payload = await exactly(length) if cmd == 1 else b""
                req = FakeRequest(conn_no, cmd, flags, handle, offset, length, payload)
                self.requests.append(req)
                if cmd == 2:  # DISC
                    return
                if self.misbehave is not None and await self.misbehave(req, stream):
                    continue
                await stream.send_all(self.answer(req, structured))
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()

    def answer(self, req: FakeRequest, structured: bool) -> bytes:
        """The correct reply to a request, applying it to the RAM disk."""
        end = req.offset + req.length
        if end > len(self.disk):
            return simple_reply(req.handle, 22)
        if req.command == 0:
            data = bytes(self.disk[req.offset : end])
            if structured:
                return chunk(req.handle, 1, struct.pack(">Q", req.offset) + data)
            return simple_reply(req.handle, 0, data)
        if req.command == 1:
            self.disk[req.offset : end] = req.payload
        elif req.command in (4, 6):
            self.disk[req.offset : end] = bytes(req.length)
        return simple_reply(req.handle)
