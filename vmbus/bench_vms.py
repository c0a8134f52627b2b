"""`vmbusd bench vms`: many simulated VMs on one vmbusd, each with a disk and a NIC
doing I/O at once (issue 11, part 3).

One real `vmbusd serve` (its config: a storvsc controller with one memory LUN and a
netvsc NIC on the loopback backend, which every VM gets its own copy of) and the VMs
spread over a few worker processes (`python -m vmbus.bench_vms vm`), each running its
share of SimulatedVms in one trio loop. Per VM: Linux's storvsc init and scan, then
`depth` concurrent 4 KiB random reads on its LUN; Linux's netvsc init, then `depth`
frames in flight bounced off the loopback backend. The workers set everything up,
say "ready", wait for "go" (so all VMs start together), run for the same seconds and
print their per-VM counts and latency samples.

What it reports per VM count (1, 10, 50, 100 by default): aggregate IOPS and frames/s
and their ratio to one VM alone, Jain's fairness index of the per-VM rates, p50/p99
read latency over all VMs, and vmbusd's own cost: RSS and file descriptors per VM
(measured from /proc before the VMs attach and once they are all set up) and CPU
per operation. The guest side is the pure-Python simulated driver (a request costs
it tens of microseconds): on a 2-CPU machine the VMs' processes and vmbusd share the
CPUs, so the absolute rates are the machine's, the ratios and fairness are vmbusd's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmbus.bench import _Progress, check_options, stopped, write_outputs
from vmbus.cliutil import Interrupted, UserError

COUNTS = (1, 10, 50, 100)
QUICK_COUNTS = (1, 10)
FULL_SECONDS = 5.0
QUICK_SECONDS = 2.0
PROCS = 4  # worker processes hosting the VMs (at most one per VM)
HANDSHAKES_PER_WORKER = 1  # PROCS of them at once: under vmbusd's per-uid cap of 8
DEPTH = 4  # disk reads and frames in flight per VM
DISK_SIZE = 8 << 20  # each VM's memory LUN
IO_SIZE = 4096
FRAME_SIZE = 256
RAM_SIZE = 32 << 20  # each simulated VM's guest RAM
SAMPLES_PER_VM = 500  # latency samples kept per VM (reservoir)
SETUP_TIMEOUT_S = 300.0
ETHERTYPE_LOCAL = b"\x88\xb5"  # IEEE local experimental: nobody else's protocol
VMAS_PER_VM = 2048  # measured ~1,410: the simulated NIC's scattered buffer pages
MAP_COUNT = "/proc/sys/vm/max_map_count"

CONFIG = f"""
[[device]]
type = "storvsc"
[[device.lun]]
backend = "memory"
size = {DISK_SIZE}

[[device]]
type = "netvsc"
backend = "loopback"
"""


def jain(xs: list[float]) -> float:
    """Jain's fairness index: 1.0 when every VM got the same, 1/n when one got all."""
    if not xs or not any(xs):
        return 0.0
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs))


def _pct(samples: list[float], p: float) -> float:
    if not samples:
        return 0.0
    s = sorted(samples)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


# -- the host side: vmbusd's cost from /proc -----------------------------------------


def _proc_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _proc_vmas(pid: int) -> int:
    """Mappings: GPADLs map guest pages into vmbusd, and vm.max_map_count caps them."""
    with open(f"/proc/{pid}/maps", "rb") as f:
        return sum(1 for _ in f)


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_for(path: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise RuntimeError(f"vmbusd serve exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError("vmbusd serve did not start listening")
        time.sleep(0.05)


def _read_line(proc: subprocess.Popen[str], deadline: float) -> dict[str, Any]:
    """The worker's next JSON line (its stderr goes to ours)."""
    assert proc.stdout is not None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError("a VM worker did not answer in time")
        ready, _, _ = select.select([proc.stdout], [], [], min(left, 1.0))
        if ready:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"a VM worker exited ({proc.wait()})")
            msg: dict[str, Any] = json.loads(line)
            return msg


def run_point(n_vms: int, seconds: float, procs: int, depth: int) -> dict[str, Any]:
    """One VM count: a fresh vmbusd, the VMs set up, all run at once, the record."""
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="vmbusd-bench-vms-") as tmp:
        cfg = os.path.join(tmp, "vms.toml")
        Path(cfg).write_text(CONFIG)
        sock = os.path.join(tmp, "s.sock")
        serve = subprocess.Popen(
            [sys.executable, "-m", "vmbus.cli", "serve", "--listen", sock, "--config", cfg],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(tmp, "serve.log"), "wb"),
            env=env,
        )
        workers: list[subprocess.Popen[str]] = []
        try:
            _wait_for(sock, serve, 30)
            time.sleep(0.2)
            rss0, fds0 = _proc_rss_kb(serve.pid), _proc_fds(serve.pid)
            vmas0 = _proc_vmas(serve.pid)
            nproc = max(1, min(procs, n_vms))
            shares = [n_vms // nproc + (1 if i < n_vms % nproc else 0) for i in range(nproc)]
            for i, k in enumerate(shares):
                workers.append(
                    subprocess.Popen(
                        [
                            *(sys.executable, "-m", "vmbus.bench_vms", "vm"),
                            *("--connect", sock, "--vms", str(k), "--prefix", f"w{i}"),
                            *("--depth", str(depth), "--seed", str(i)),
                        ],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        text=True,
                        env=env,
                    )
                )
            deadline = time.monotonic() + SETUP_TIMEOUT_S
            for w in workers:
                msg = _read_line(w, deadline)
                if "ready" not in msg:
                    raise RuntimeError(f"a VM worker failed to set up: {msg}")
            time.sleep(0.5)  # vmbusd settles (its per-VM tasks are all started)
            rss1, fds1 = _proc_rss_kb(serve.pid), _proc_fds(serve.pid)
            vmas1 = _proc_vmas(serve.pid)
            cpu0 = _proc_cpu_s(serve.pid)
            for w in workers:
                assert w.stdin is not None
                w.stdin.write(f"go {seconds}\n")
                w.stdin.flush()
            per_vm: list[dict[str, Any]] = []
            deadline = time.monotonic() + seconds + 120
            for w in workers:
                msg = _read_line(w, deadline)
                if "vms" not in msg:
                    raise RuntimeError(f"a VM worker failed: {msg}")
                per_vm.extend(msg["vms"])
            cpu1 = _proc_cpu_s(serve.pid)
            rss_hwm = _proc_rss_kb(serve.pid)
            for w in workers:
                w.wait(60)
        finally:
            for w in workers:
                if w.poll() is None:
                    w.kill()
                    w.wait()
            serve.terminate()
            try:
                serve.wait(30)
            except subprocess.TimeoutExpired:
                serve.kill()
                serve.wait()
    ios = [v["ios"] / v["seconds"] for v in per_vm]
    frames = [v["frames"] / v["seconds"] for v in per_vm]
    lat = [x for v in per_vm for x in v["lat_us"]]
    total_ops = sum(v["ios"] + v["frames"] for v in per_vm)
    return {
        "vms": n_vms,
        "procs": len(workers),
        "depth": depth,
        "seconds": seconds,
        "iops": sum(ios),
        "frames_per_s": sum(frames),
        "jain_iops": jain(ios),
        "jain_frames": jain(frames),
        "min_vm_iops": min(ios),
        "max_vm_iops": max(ios),
        "lat_p50_us": _pct(lat, 50),
        "lat_p99_us": _pct(lat, 99),
        "vmbusd_rss_kb_idle": rss0,
        "vmbusd_rss_kb": rss1,
        "vmbusd_rss_kb_end": rss_hwm,
        "vmbusd_fds_idle": fds0,
        "vmbusd_fds": fds1,
        "rss_kb_per_vm": (rss1 - rss0) / n_vms,
        "fds_per_vm": (fds1 - fds0) / n_vms,
        "vmbusd_vmas": vmas1,
        "vmas_per_vm": (vmas1 - vmas0) / n_vms,
        "vmbusd_cpu_s": cpu1 - cpu0,
        "vmbusd_cpu_us_per_op": (cpu1 - cpu0) / total_ops * 1e6 if total_ops else 0.0,
        "load_average": os.getloadavg()[0],
    }


def _table(records: list[dict[str, Any]]) -> str:
    one = next((r for r in records if r["vms"] == 1), None)
    head = (
        f"{'VMs':>4} {'IOPS':>9} {'x1VM':>5} {'frames/s':>9} {'x1VM':>5} {'Jain io':>7} "
        f"{'Jain fr':>7} {'p50 us':>7} {'p99 us':>8} {'RSS/VM KiB':>10} {'fds/VM':>6} "
        f"{'CPU us/op':>9}"
    )
    rows = [head]
    for r in records:
        x_io = r["iops"] / one["iops"] if one and one["iops"] else 0.0
        x_fr = r["frames_per_s"] / one["frames_per_s"] if one and one["frames_per_s"] else 0.0
        rows.append(
            f"{r['vms']:>4} {r['iops']:>9.0f} {x_io:>5.2f} {r['frames_per_s']:>9.0f} "
            f"{x_fr:>5.2f} {r['jain_iops']:>7.3f} {r['jain_frames']:>7.3f} "
            f"{r['lat_p50_us']:>7.0f} {r['lat_p99_us']:>8.0f} {r['rss_kb_per_vm']:>10.0f} "
            f"{r['fds_per_vm']:>6.1f} {r['vmbusd_cpu_us_per_op']:>9.1f}"
        )
    return "\n".join(rows)


def write_plot(records: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["vms"] for r in records]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(xs, [r["iops"] for r in records], "o-", label="IOPS")
    a.plot(xs, [r["frames_per_s"] for r in records], "s-", label="frames/s")
    a.set_xlabel("VMs")
    a.set_ylabel("aggregate rate")
    a.legend()
    b.plot(xs, [r["jain_iops"] for r in records], "o-", label="Jain (IOPS)")
    b.plot(xs, [r["jain_frames"] for r in records], "s-", label="Jain (frames)")
    b.set_ylim(0, 1.05)
    b.set_xlabel("VMs")
    b.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _enough_mappings(n_vms: int) -> None:
    """vmbusd maps each GPADL's pages virtually contiguous, one VMA per run of
    consecutive pages, and keeps its runs under 3/4 of vm.max_map_count (a refusal,
    not a crash, past it: memory.MAX_PROCESS_MAPPED_RUNS). The simulated guest's
    buffers are scattered page by page, as a real guest's vmalloc'ed ones may be, so
    a hundred NICs need more than the default 65530: raise it (as root), saying so."""
    need = (n_vms * VMAS_PER_VM + 8192) * 4 // 3
    try:
        have = int(Path(MAP_COUNT).read_text())
    except (OSError, ValueError):
        return
    if have >= need:
        return
    if os.geteuid() != 0:
        raise UserError(
            f"bench vms with {n_vms} VMs needs vm.max_map_count >= {need} (it is {have}): "
            f"run `sysctl -w vm.max_map_count={need}` as root first"
        )
    Path(MAP_COUNT).write_text(str(need))
    print(
        f"bench vms: raised vm.max_map_count from {have} to {need} "
        f"({n_vms} VMs' scattered NIC buffers cost ~{VMAS_PER_VM} mappings each in vmbusd)",
        file=sys.stderr,
    )


def run_bench_vms(
    *,
    quick: bool = False,
    json_path: str | None = None,
    seconds: float | None = None,
    plot_path: str | None = None,
    counts: tuple[int, ...] | None = None,
    procs: int = PROCS,
    depth: int = DEPTH,
) -> int:
    """`vmbusd bench vms`. Bad options are refused before the run (UserError)."""
    seconds = check_options(seconds, QUICK_SECONDS if quick else FULL_SECONDS, json_path, plot_path)
    if counts is None:
        counts = QUICK_COUNTS if quick else COUNTS
    if not counts or any(c < 1 or c > 1000 for c in counts):
        raise UserError(f"--vms takes counts from 1 to 1000, got {counts}")
    _enough_mappings(max(counts))
    records: list[dict[str, Any]] = []
    progress = _Progress(len(counts), "bench vms")
    try:
        for n in counts:
            progress.step(f"{n} VM(s)")
            records.append(run_point(n, seconds, procs, depth))
    except (Interrupted, KeyboardInterrupt) as exc:
        raise stopped(exc, progress) from None
    finally:
        progress.close()
    print(_table(records))
    print(
        f"\n(per VM: a {DISK_SIZE >> 20} MiB memory LUN read {IO_SIZE} B at random, QD {depth}, "
        f"and {depth} {FRAME_SIZE}-byte frames in flight through a loopback NIC; VMs in "
        f"{procs} worker processes; {seconds} s per point; {os.cpu_count()} CPUs; "
        f"load average {os.getloadavg()[0]:.2f})"
    )
    write_outputs(records, json_path, plot_path, write_plot)
    return 0


# -- the VM side -------------------------------------------------------------------


async def _one_vm(
    vm: Any,
    depth: int,
    rng: random.Random,
    ready: Callable[[], None],
    go: Any,
    seconds_box: list[float],
) -> dict[str, Any]:
    """Set up one VM's disk and NIC, say `ready()`, wait for `go`, run, return its
    counts."""
    import trio

    from devices.netvsc.vsc import NetvscGuest
    from devices.netvsc.vsp import NETVSC_IF_TYPE
    from devices.storvsc.protocol import SCSI_IF_TYPE
    from devices.storvsc.vsc import attach_storvsc

    disk_offer = vm.find_offers(SCSI_IF_TYPE)[0]
    nic_offer = vm.find_offers(NETVSC_IF_TYPE)[0]
    out: dict[str, Any] = {"vm": vm.vm_id, "ios": 0, "frames": 0, "lat_us": []}
    async with attach_storvsc(vm, disk_offer) as hba, trio.open_nursery() as nursery:
        gch = await vm.open_channel(nic_offer, 128 * 4096)
        nic = NetvscGuest(vm, gch)
        nursery.start_soon(nic.receive_loop)
        await nic.connect()
        await nic.device_add()
        disk = hba.disks[0]
        blocks_per_io = IO_SIZE // disk.block_size
        n_ios = disk.blocks // blocks_per_io
        frame = nic.mac + nic.mac + ETHERTYPE_LOCAL + bytes(FRAME_SIZE - 14)
        samples: list[float] = out["lat_us"]
        seen = 0
        ready()
        await go.wait()
        seconds = seconds_box[0]
        end = time.monotonic() + seconds

        async def reader() -> None:
            nonlocal seen
            while time.monotonic() < end:
                lba = rng.randrange(n_ios) * blocks_per_io
                t0 = time.perf_counter()
                await hba.read(0, lba, blocks_per_io)
                us = (time.perf_counter() - t0) * 1e6
                out["ios"] += 1
                seen += 1
                if len(samples) < SAMPLES_PER_VM:
                    samples.append(us)
                else:  # reservoir: every request equally likely to be kept
                    j = rng.randrange(seen)
                    if j < SAMPLES_PER_VM:
                        samples[j] = us

        async def bouncer() -> None:
            while time.monotonic() < end:
                await nic.send_frame(frame)
                with trio.move_on_after(5):
                    await nic.frames.receive()
                    out["frames"] += 1

        async with trio.open_nursery() as work:
            for _ in range(depth):
                work.start_soon(reader)
                work.start_soon(bouncer)
        out["seconds"] = seconds
        with trio.fail_after(30):
            await nic.teardown()
        nursery.cancel_scope.cancel()
    await vm.close_channel(gch)
    return out


def vm_main(args: argparse.Namespace) -> int:
    import trio

    from vmbus import attach
    from vmbus.guest.vm import SimulatedVm

    async def run() -> None:
        go = trio.Event()
        seconds_box = [0.0]
        results: list[dict[str, Any]] = []
        n_ready = 0
        all_ready = trio.Event()

        def ready() -> None:
            nonlocal n_ready
            n_ready += 1
            if n_ready == args.vms:
                all_ready.set()

        # vmbusd lets one uid have MAX_PENDING_HANDSHAKES_PER_UID hellos unfinished (a
        # hostile-VMM defence): the workers together stay under it.
        handshakes = trio.Semaphore(HANDSHAKES_PER_WORKER)

        async def one(i: int) -> None:
            vm = SimulatedVm(ram_size=RAM_SIZE, vm_id=f"bench-{args.prefix}-{i}", vcpus=1)
            try:
                async with trio.open_nursery() as nursery:
                    async with handshakes:
                        conn = await attach.connect(args.connect)
                        await vm.start(conn, nursery)
                    rng = random.Random(f"{args.seed}-{i}")
                    results.append(await _one_vm(vm, args.depth, rng, ready, go, seconds_box))
                    await vm.unload()
                    nursery.cancel_scope.cancel()
            finally:
                vm.close()

        async with trio.open_nursery() as nursery:
            for i in range(args.vms):
                nursery.start_soon(one, i)
            with trio.fail_after(SETUP_TIMEOUT_S):
                await all_ready.wait()
            print(json.dumps({"ready": args.vms}), flush=True)
            line = await trio.to_thread.run_sync(sys.stdin.readline)
            word, secs = line.split()
            if word != "go":
                raise RuntimeError(f"expected 'go SECONDS', got {line!r}")
            seconds_box[0] = float(secs)
            go.set()
        print(json.dumps({"vms": results}), flush=True)

    trio.run(run)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vmbus.bench_vms")
    sub = p.add_subparsers(dest="role", required=True)
    v = sub.add_parser("vm")
    v.add_argument("--connect", required=True)
    v.add_argument("--vms", type=int, required=True)
    v.add_argument("--prefix", required=True)
    v.add_argument("--depth", type=int, default=DEPTH)
    v.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    return vm_main(args)


if __name__ == "__main__":
    sys.exit(main())
