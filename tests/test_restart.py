"""vmbusd restarts under a running guest (issue 11 part 1, docs/attach-protocol.md#restart).

Real processes: `vmbusd serve` is killed (SIGKILL) or stopped (SIGTERM) and started
again on the same socket while `vmbusd vm --workload soak` keeps echoing verified,
sequence-numbered packets on two echo channels. The simulated VM never exits, its
guest never sees a rescind or an error, and at the end every packet it sent came
back exactly once and in order (the soak's last round is finished after SIGTERM,
so a packet lost at a crash would stall it and fail the run).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

START_TIMEOUT_S = 30.0
VMBUSD = (sys.executable, "-m", "vmbus.cli", "-v")
CONFIG = '[[device]]\ntype = "echo"\n[[device]]\ntype = "echo"\n'


class Service:
    """`vmbusd serve` on one socket, started again and again; every run's log kept."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.path = str(tmp / "vmbusd.sock")
        self.cfg = tmp / "vms.toml"
        self.cfg.write_text(CONFIG)
        self.runs = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []

    def start(self) -> None:
        self.runs += 1
        log_path = self.tmp / f"vmbusd-{self.runs}.log"
        self.logs.append(log_path)
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*VMBUSD, "serve", "--listen", self.path, "--config", str(self.cfg)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(lambda: f"listening on {self.path}" in log_path.read_text(), "vmbusd start")

    def stop(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=30)
        self.proc = None

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs)


def wait_for(cond: object, what: str, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@contextmanager
def service_and_vm(
    tmp: Path, *vm_args: str
) -> Iterator[tuple[Service, subprocess.Popen[bytes], Path, Path]]:
    svc = Service(tmp)
    svc.start()
    out, err = tmp / "vm.json", tmp / "vm.log"
    with open(err, "wb") as errf:
        vm = subprocess.Popen(
            [*VMBUSD, "vm", "--connect", svc.path, "--json", str(out), *vm_args],
            stdout=subprocess.DEVNULL,
            stderr=errf,
        )
    try:
        yield svc, vm, out, err
    finally:
        if vm.poll() is None:
            vm.kill()
            vm.wait()
        if svc.proc is not None:
            svc.proc.kill()
            svc.proc.wait()


def soak_until_stopped(vm: subprocess.Popen[bytes], out: Path, err: Path) -> dict[str, object]:
    """SIGTERM the soaking VM: it finishes its round; every packet must have come back."""
    vm.send_signal(signal.SIGTERM)
    rc = vm.wait(timeout=60)
    text = err.read_text(errors="replace")
    assert rc == 0, text[-3000:]
    summary: dict[str, object] = json.loads(out.read_text())
    assert summary["ok"] is True, summary
    assert summary["rescinds"] == 0, summary
    assert "MISMATCH" not in text
    return summary


def restart_loop(tmp: Path, kills: int, seed: int, sig: int) -> None:
    rng = random.Random(seed)
    with service_and_vm(tmp, "--workload", "soak", "--reconnect-timeout", "60") as (
        svc,
        vm,
        out,
        err,
    ):
        wait_for(lambda: "soak until" in err.read_text(), "the VM's soak")
        for i in range(kills):
            time.sleep(rng.uniform(0.05, 0.6))
            assert vm.poll() is None, f"the VM exited at kill {i}: {err.read_text()[-2000:]}"
            svc.stop(sig)
            if rng.random() < 0.3:
                time.sleep(rng.uniform(0.0, 0.5))  # the VM finds nobody listening
            svc.start()
            # the next kill only once the VM is back (on a loaded machine a start plus
            # the VM's backoff can outlast the random gap, and the kill hit nobody)
            wait_for(
                lambda: "resumed:" in svc.logs[-1].read_text(errors="replace"),
                f"the resume after kill {i}",
                30,
            )
        # The last vmbusd serves the VM for a while: traffic flows again.
        wait_for(lambda: svc.log().count("resumed:") >= 1, "a resume")
        marker = err.read_text().count("session resumed")
        time.sleep(1.0)
        assert vm.poll() is None
        summary = soak_until_stopped(vm, out, err)
        log = svc.log()
        reconnects = summary["reconnects"]
        assert isinstance(reconnects, int) and marker <= reconnects <= kills
        assert reconnects == kills, (reconnects, log[-3000:])  # every kill hit a session
        assert "resume refused" not in log
        assert "channel reset" not in log
        assert "Traceback" not in log
        channels = summary["channels"]
        assert isinstance(channels, list) and len(channels) == 2
        assert all(c["packets"] > 0 for c in channels)


@pytest.mark.parametrize("seed", [11])
def test_sigkill_at_random_moments(tmp_path: Path, seed: int) -> None:
    """20 SIGKILLs of vmbusd under a soaking VM (the main suite's share)."""
    restart_loop(tmp_path, kills=20, seed=seed, sig=signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("seed", [12])
def test_sigkill_at_random_moments_long(tmp_path: Path, seed: int) -> None:
    restart_loop(tmp_path, kills=100, seed=seed, sig=signal.SIGKILL)


def test_sigterm_restart(tmp_path: Path) -> None:
    """A planned restart: vmbusd hands over a last state and leaves the channels bound;
    the VM hears `shutdown`, reconnects and resumes."""
    restart_loop(tmp_path, kills=4, seed=5, sig=signal.SIGTERM)


def test_gives_up_after_reconnect_timeout(tmp_path: Path) -> None:
    """A vmbusd that never comes back: one clear line and exit status 2, not a hang."""
    with service_and_vm(tmp_path, "--workload", "soak", "--reconnect-timeout", "1.5") as (
        svc,
        vm,
        _out,
        err,
    ):
        wait_for(lambda: "soak until" in err.read_text(), "the VM's soak")
        svc.stop(signal.SIGKILL)
        t0 = time.monotonic()
        rc = vm.wait(timeout=30)
        waited = time.monotonic() - t0
        text = err.read_text()
        assert rc == 2, text[-2000:]
        assert 1.0 <= waited <= 10, waited  # the VM starts counting as vmbusd dies
        lines = [ln for ln in text.splitlines() if ln.startswith("vmbusd vm: error:")]
        assert len(lines) == 1, text[-2000:]
        assert "vmbusd did not come back within 1.5 s" in lines[0]
        assert "Traceback" not in text


def test_control_plane_churn_across_kills(tmp_path: Path) -> None:
    """SIGKILLs while the guest opens and closes channels (GPADLs built and torn
    down, OPENCHANNEL, CLOSECHANNEL): a guest message the dead vmbusd had not handled
    (or the VMM's `reset` of a rebooting guest) is posted again, a reply it had not
    sent comes from the next one, none twice --
    every request of the guest is answered, no violation is logged, no rescind."""
    import trio

    from devices.echo.protocol import ECHO_IF_TYPE
    from vmbus import attach
    from vmbus.guest.vm import SimulatedVm
    from vmbus.guest.workloads import echo_mixed

    svc = Service(tmp_path)
    svc.start()
    rng = random.Random(3)
    kills = 15

    async def main() -> int:
        async def again() -> attach.AttachConnection:
            return await attach.connect(svc.path)

        vm = SimulatedVm(vm_id="churn", reconnect=again, reconnect_timeout=60)
        cycles = reboots = 0
        try:
            async with trio.open_nursery() as nursery:
                await vm.start(await again(), nursery)
                offers = vm.find_offers(ECHO_IF_TYPE)
                done = trio.Event()

                async def killer() -> None:
                    for _ in range(kills):
                        await trio.sleep(rng.uniform(0.05, 0.5))
                        before = vm.reconnects
                        await trio.to_thread.run_sync(svc.stop, signal.SIGKILL)
                        await trio.to_thread.run_sync(svc.start)
                        # the next kill only once the VM is back (on a loaded machine a
                        # start plus the backoff can outlast the random gap)
                        with trio.fail_after(30):
                            while vm.reconnects == before:
                                await trio.sleep(0.01)
                    done.set()

                nursery.start_soon(killer)
                while not done.is_set():
                    for offer in offers:
                        gch = await vm.open_channel(offer, 64 * 1024)
                        await echo_mixed(gch.channel, 50, 1024, seed=cycles)
                        await vm.close_channel(gch)
                        cycles += 1
                    if cycles % 10 == 0:  # now and then the guest reboots (VMM `reset`)
                        await vm.reboot()
                        offers = vm.find_offers(ECHO_IF_TYPE)
                        reboots += 1
                assert vm.reconnects == kills  # every kill hit a live session
                assert reboots >= 1
                assert not any(o.rescinded for o in vm.offers.values())
                await vm.unload()
                nursery.cancel_scope.cancel()
        finally:
            for gch in vm.channels.values():
                gch.channel.release()
                gch.mapping.close()
            vm.close()
        return cycles

    try:
        cycles = trio.run(main)
    finally:
        if svc.proc is not None:
            svc.stop(signal.SIGTERM)
    assert cycles > kills
    log = svc.log()
    assert "violation" not in log, log[-3000:]
    assert "resume refused" not in log
    assert "Traceback" not in log


def test_vm_with_a_device_that_cannot_restart_gets_no_state(tmp_path: Path) -> None:
    """A storvsc with a memory disk cannot restart (the disk would come back empty):
    vmbusd says so once and sends no saved state, so a crash ends that VM's session
    at once, as before restart support (not a resume into a blank disk)."""
    svc = Service(tmp_path)
    svc.cfg.write_text(
        '[[device]]\ntype = "echo"\n[[device]]\ntype = "storvsc"\n'
        'lun = [{backend = "memory", size = 1048576}]\n'
    )
    svc.start()
    err = tmp_path / "vm.log"
    with open(err, "wb") as errf:
        vm = subprocess.Popen(
            [
                *VMBUSD,
                "vm",
                "--connect",
                svc.path,
                "--workload",
                "idle",
                "--reconnect-timeout",
                "30",
            ],
            stdout=subprocess.DEVNULL,
            stderr=errf,
        )
    try:
        wait_for(lambda: "idle until" in err.read_text(), "the VM's channels")
        assert (
            "no restart support for this VM: storvsc LUN 0 (MemoryBackend) would come back empty"
            in svc.log()
        )
        svc.stop(signal.SIGKILL)
        assert vm.wait(timeout=10) == 0  # long before the 30 s reconnect timeout
        text = err.read_text()
        assert "vmbusd ended the session (connection closed)" in text
        assert "session resumed" not in text
    finally:
        if vm.poll() is None:
            vm.kill()
            vm.wait()
        if svc.proc is not None:
            svc.stop(signal.SIGKILL)


def test_resume_refused_after_a_config_change(tmp_path: Path) -> None:
    """A vmbusd that comes back with other devices cannot take the state: it refuses
    the resume with one line, and the VM ends with one line (status 1), not a hang
    and not a guest resumed into the wrong devices."""
    with service_and_vm(tmp_path, "--workload", "soak") as (svc, vm, _out, err):
        wait_for(lambda: "soak until" in err.read_text(), "the VM's soak")
        svc.stop(signal.SIGKILL)
        svc.cfg.write_text(CONFIG + '[[device]]\ntype = "echo"\n')
        svc.start()
        assert vm.wait(timeout=30) == 1
        text = err.read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith("vmbusd vm: error:")]
        assert len(lines) == 1, text[-2000:]
        assert "resume refused: blob has 2 devices, this VM 3" in lines[0]
        assert svc.log().count("resume refused") == 1
        assert svc.proc is not None and svc.proc.poll() is None
