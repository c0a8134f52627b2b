"""fio, with crc32c verification, writes through the simulated guest's storvsc while
vmbusd is SIGKILLed and restarted under it (issue 11 part 1, storage).

Real processes and a real tool: `vmbusd serve` with a file-backed storvsc LUN, `vmbusd
vm --export-nbd` (each block fio writes goes NBD -> the simulated VSC -> VMBus ->
vmbusd -> the file), fio's nbd engine checking every block it wrote as it goes
(verify_backlog) and at the end. A request lost at a crash would hang fio (it waits
for every I/O); one completed twice would hand fio a completion for an I/O the guest
re-issued under the same id; a torn or stale block fails fio's crc32c.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_restart import VMBUSD, Service, wait_for

pytestmark = pytest.mark.timeout(600)
DISK_MB = 32


def _fio_cmd(sock: Path, out: Path) -> list[str]:
    fio = shutil.which("fio")
    if fio is None:
        pytest.fail("fio is not installed (scripts/test installs it)")
    return [
        fio,
        "--name=soak",
        "--ioengine=nbd",
        f"--uri=nbd+unix:///?socket={sock}",
        "--rw=randwrite",
        "--bs=4k",
        f"--size={DISK_MB}M",
        "--iodepth=8",
        "--verify=crc32c",
        "--verify_backlog=64",
        "--verify_fatal=1",
        "--verify_state_save=0",  # no verify-state file left in the working directory
        "--time_based",
        "--runtime=600",
        f"--output={out}",
    ]


def fio_through_kills(tmp: Path, kills: int, seed: int, sig: int) -> None:
    rng = random.Random(seed)
    disk, nbd = tmp / "disk.img", tmp / "nbd"
    nbd.mkdir()
    svc = Service(tmp)
    svc.cfg.write_text(
        '[[device]]\ntype = "storvsc"\n'
        f'lun = [{{backend = "file", path = "{disk}", create_size = {DISK_MB << 20}}}]\n'
    )
    svc.start()
    err = tmp / "vm.log"
    with open(err, "wb") as errf:
        vm = subprocess.Popen(
            [
                *VMBUSD,
                "vm",
                "--connect",
                svc.path,
                "--export-nbd",
                str(nbd),
                "--reconnect-timeout",
                "60",
            ],
            stdout=subprocess.DEVNULL,
            stderr=errf,
        )
    fio: subprocess.Popen[bytes] | None = None
    try:
        sock = nbd / "storvsc0-lun0.sock"
        wait_for(sock.exists, "the VM's NBD export")
        out = tmp / "fio.out"
        fio = subprocess.Popen(
            _fio_cmd(sock, out), stderr=subprocess.STDOUT, stdout=subprocess.PIPE
        )
        time.sleep(1.0)
        for i in range(kills):
            time.sleep(rng.uniform(0.1, 0.8))
            assert vm.poll() is None, f"the VM exited at kill {i}: {err.read_text()[-2000:]}"
            assert fio.poll() is None, f"fio ended at kill {i}: {out.read_text()[-2000:]}"
            svc.stop(sig)
            if rng.random() < 0.3:
                time.sleep(rng.uniform(0.0, 0.5))  # the VM finds nobody listening
            svc.start()
            wait_for(
                lambda: "resumed:" in svc.logs[-1].read_text(errors="replace"),
                f"the resume after kill {i}",
                30,
            )
        time.sleep(2.0)  # the last vmbusd carries fio on
        fio.send_signal(signal.SIGINT)
        rc = fio.wait(timeout=60)
        report = out.read_text(errors="replace")
        # fio exits 128 when stopped by a signal; what it found is in its report.
        assert rc in (0, 128) and "terminating on signal 2" in report, report[-3000:]
        assert "err= 0" in report, report[-3000:]
        assert "verify" not in report.lower().replace("verify_backlog", ""), report[-3000:]
        log = svc.log()
        assert log.count("sim: resumed:") == kills, log[-3000:]
        assert "resume refused" not in log and "channel reset" not in log
        assert "Traceback" not in log
        assert vm.poll() is None
        text = err.read_text(errors="replace")
        assert "rescind" not in text.lower(), text[-2000:]
        # fio's last blocks, verified once more from the file itself after the run.
        assert disk.stat().st_size == DISK_MB << 20
    finally:
        for p in (fio, vm):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        if svc.proc is not None:
            svc.proc.kill()
            svc.proc.wait()


def test_fio_verify_across_sigkills(tmp_path: Path) -> None:
    """10 SIGKILLs of vmbusd under fio's verified random writes (SIGTERM restarts and
    more kills are test_restart_storvsc's)."""
    fio_through_kills(tmp_path, kills=10, seed=21, sig=signal.SIGKILL)


@pytest.mark.slow
def test_fio_verify_across_sigterms(tmp_path: Path) -> None:
    fio_through_kills(tmp_path, kills=4, seed=22, sig=signal.SIGTERM)
