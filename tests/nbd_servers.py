"""Real NBD servers for the tests: qemu-nbd on a qcow2 image, nbdkit's memory plugin.

Each server runs as a subprocess on loopback (a Unix socket, or TCP on 127.0.0.1 with
a free port), is polled until it accepts connections, and is always killed when the
`with` block ends. A server that cannot start fails the test: CI installs both.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import trio

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
        ["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
        check=True,
        capture_output=True,
    )
    return path


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed (apt-get install qemu-utils nbdkit)")
    return path


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
    "NbdServer",
    "free_tcp_port",
    "make_qcow2",
    "nbdkit_memory",
    "qemu_nbd",
    "short_socket_path",
]
