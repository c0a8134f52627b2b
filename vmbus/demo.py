"""`vmbusd demo`: vmbusd and a simulated VM as two processes, echo traffic, a RAM
disk (a storvsc controller with one memory LUN, written whole and read back through
the VMBus storvsc path) and a loopback NIC (a netvsc device whose backend sends every
frame back: the guest's netvsc VSC brings it up, sends frames, checks each one
returns), a summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from functools import partial
from typing import Any

import trio

from devices.echo import EchoDevice
from devices.netvsc.vsp import NetvscDevice
from devices.storvsc.vsp import StorvscDevice
from vmbus import attach
from vmbus.cliutil import Stopped, run_until_signalled
from vmbus.server import VmSession

DEMO_TIMEOUT_S = 120
DISK_SIZE = 4 << 20  # the RAM disk: the guest writes all of it in 4 KiB requests


def vm_command(path: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vmbus.cli", "-q", "vm", "--connect", path, *extra]


async def _demo(packets: int, ring_size: int) -> int:
    with tempfile.TemporaryDirectory(prefix="vmbusd-demo-") as tmp:
        path = os.path.join(tmp, "vmbusd.sock")
        listener = await attach.listen(path)
        out_path = os.path.join(tmp, "vm.json")
        cmd = vm_command(
            path, "--packets", str(packets), "--ring-size", str(ring_size), "--json", out_path
        )
        out: dict[str, Any] = {}
        session: VmSession | None = None
        try:
            with trio.fail_after(DEMO_TIMEOUT_S):
                async with trio.open_nursery() as nursery:
                    # Its own session: a Ctrl-C reaches the demo only, which stops the VM
                    # (SIGTERM, trio's run_process on cancel) and reports once.
                    proc = await nursery.start(
                        lambda **kw: trio.run_process(
                            cmd,
                            capture_stdout=True,
                            capture_stderr=True,
                            check=False,
                            start_new_session=True,
                            **kw,
                        )
                    )
                    conn = await listener.accept()
                    await listener.aclose()
                    disk = StorvscDevice(lun=[{"backend": "memory", "size": DISK_SIZE}])
                    nic = NetvscDevice(backend="loopback")
                    session = VmSession(conn, [EchoDevice(), disk, nic], vm_label="demo-vm")
                    await session.run()
        finally:
            await listener.aclose()
        try:
            with open(out_path) as f:
                out = json.load(f)
        except (OSError, json.JSONDecodeError):
            out = {}
    assert session is not None
    if proc.returncode != 0 and proc.stderr:
        sys.stderr.write(proc.stderr.decode(errors="replace"))
    return _report(out, proc.returncode, session)


def _report(out: dict[str, Any], rc: int, session: VmSession) -> int:
    if rc != 0 or not out.get("ok"):
        msg = out.get("error") or f"simulated VM exited with status {rc}"
        print(f"vmbusd demo: FAILED: {msg}", file=sys.stderr)
        return 1
    if session.failed_channels:
        print(
            f"vmbusd demo: FAILED: host channel errors {session.failed_channels}", file=sys.stderr
        )
        return 1
    host = {relid: st for relid, _dev, st in session.closed_stats}
    print(f"VMBus version negotiated : {out['version']}")
    print(f"channels offered/opened  : {out['offers']}/{len(out['channels'])}")
    echo = [ch for ch in out["channels"] if ch.get("driver", "echo") == "echo"]
    disks = [ch for ch in out["channels"] if ch.get("driver") == "storvsc"]
    nics = [ch for ch in out["channels"] if ch.get("driver") == "netvsc"]
    for ch in echo:
        hst = host.get(ch["relid"], {})
        wake = ch["guest_wakeups"] + hst.get("wakeups", 0)
        print(
            f"  echo relid {ch['relid']:<4}       : {ch['packets']} packets, "
            f"{ch['bytes']} payload bytes each way, {ch['completions']} completions"
        )
        print(
            f"  throughput             : {ch['packets_per_s']:,.0f} packets/s, "
            f"{ch['bytes_per_s'] / 1e6:,.1f} MB/s round trip"
        )
        print(
            f"  wake-ups per packet    : {wake / max(1, ch['packets']):.4f} "
            f"(host {hst.get('wakeups', 0)}, guest {ch['guest_wakeups']})"
        )
    for ch in disks:
        sizes = ", ".join(
            f"LUN {lun} {d['size'] >> 20} MiB" for lun, d in sorted(ch["disks"].items())
        )
        secs = max(ch["seconds"], 1e-9)
        print(
            f"  storvsc relid {ch['relid']:<4}    : VSTOR {ch['version']}, "
            f"{ch['channels']} channel(s), {sizes}"
        )
        print(
            f"  RAM disk, 4 KiB QD1    : {ch['packets'] / secs:,.0f} IOPS "
            f"({ch['packets']} writes+reads, {ch['bytes'] / secs / 1e6:,.1f} MB/s each way)"
        )
        print(f"  RAM disk read back     : all {ch['bytes']} bytes written, read, compared")
    for ch in nics:
        secs = max(ch["seconds"], 1e-9)
        print(
            f"  netvsc relid {ch['relid']:<4}     : NVSP {ch['version']}, MTU {ch['mtu']}, "
            f"MAC {':'.join(ch['mac'][i : i + 2] for i in range(0, 12, 2))}, loopback backend"
        )
        print(
            f"  loopback NIC, 60 B     : {ch['frames'] / secs:,.0f} frames/s "
            f"({ch['frames']} frames sent, each came back)"
        )
    if not disks or not any(ch["bytes"] >= DISK_SIZE for ch in disks):
        print("vmbusd demo: FAILED: the guest did not write and read the RAM disk", file=sys.stderr)
        return 1
    if not nics or not all(ch["frames"] > 0 for ch in nics):
        print("vmbusd demo: FAILED: no frame came back through the NIC", file=sys.stderr)
        return 1
    print("every byte and the order verified: OK")
    return 0


def run_demo(packets: int = 20000, ring_size: int = 256 * 1024) -> int:
    """Exit status: 0 verified, 1 failed, 128+signal when SIGTERM/Ctrl-C cut it short
    (the simulated VM is stopped and the temporary socket directory removed)."""
    stopped = Stopped()
    try:
        status = trio.run(run_until_signalled, partial(_demo, packets, ring_size), stopped)
    except trio.TooSlowError:
        print(f"vmbusd demo: FAILED: no result within {DEMO_TIMEOUT_S} s", file=sys.stderr)
        return 1
    except (attach.AttachError, OSError, subprocess.SubprocessError) as exc:
        print(f"vmbusd demo: FAILED: {exc}", file=sys.stderr)
        return 1
    if stopped.signum is not None:
        print(
            f"vmbusd demo: {stopped.name}: stopped before the end; nothing verified",
            file=sys.stderr,
        )
        return 128 + stopped.signum
    assert status is not None
    return status
