"""End-to-end helpers: vmbusd as a real separate process, the simulated VM in the test.

The test process plays the guest (and its VMM), so a test can misbehave exactly
as it wants; vmbusd runs as `python -m vmbus.cli serve`, as a user would run it,
and its log is kept so tests can check the one line each rejection must leave.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import trio

from vmbus import attach
from vmbus.guest.vm import SimulatedVm

SERVE_START_TIMEOUT_S = 20.0


@dataclass
class ServeProcess:
    proc: subprocess.Popen[bytes]
    path: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_log(self, needle: str, timeout: float = 10.0) -> str:
        """Wait until `needle` appears in vmbusd's log (lines are written asynchronously)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            if needle in text:
                return text
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not in vmbusd's log:\n{self.log()[-3000:]}")


@contextlib.contextmanager
def serve_process(
    tmp_path: Path, devices: list[str] | None = None, extra_args: tuple[str, ...] = ()
) -> Iterator[ServeProcess]:
    """Start `vmbusd serve` with the given device types (default: one echo)."""
    cfg = tmp_path / "vm.toml"
    cfg.write_text("".join(f'[[device]]\ntype = "{d}"\n' for d in (devices or ["echo"])))
    path = str(tmp_path / "vmbusd.sock")
    log_path = tmp_path / "vmbusd.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vmbus.cli",
                "-v",
                "serve",
                "--listen",
                path,
                "--config",
                str(cfg),
                *extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    sp = ServeProcess(proc, path, log_path)
    try:
        deadline = time.monotonic() + SERVE_START_TIMEOUT_S
        # the line vmbusd says once it listens (the socket file exists a moment before:
        # bind, then listen; a connect in between is refused)
        while f"listening on {path}" not in sp.log():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vmbusd serve did not start:\n{sp.log()}")
            time.sleep(0.02)
        yield sp
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.asynccontextmanager
async def guest(
    path: str,
    *,
    vm_id: str = "test-vm",
    ram_size: int = 64 << 20,
    client_options: dict[str, object] | None = None,
) -> AsyncIterator[SimulatedVm]:
    """A simulated VM connected to vmbusd, VMBus negotiated and offers received."""
    vm = SimulatedVm(ram_size=ram_size, vm_id=vm_id, client_options=client_options)
    try:
        conn = await attach.connect(path)
        async with trio.open_nursery() as nursery:
            await vm.start(conn, nursery)
            yield vm
            nursery.cancel_scope.cancel()
        with contextlib.suppress(Exception):
            await conn.aclose()
    finally:
        vm.close()
