"""`vmbusd bench disk`: storvsc I/O through a real channel between two processes, against fio.

For each implementation (native, python: `VMBUSD_NATIVE` in the children) the
orchestrator starts two processes, as `bench ring` does: a vmbusd host serving one
storvsc controller with two LUNs (LUN 0 a memory backend, LUN 1 a file backend on
an image file the orchestrator wrote), and a simulated VM whose storvsc driver
initialises and scans the controller as Linux does, then runs each workload on each
LUN. In the same run fio reads and writes the same image file with the same block
size and queue depth, buffered as the file backend opens it (it is not O_DIRECT by
default) and with its I/O model: the file backend runs each request as a blocking
preadv/pwritev in a worker thread, so the baseline is `ioengine=psync` with one job
per request in flight (`numjobs` = queue depth, group reporting).

The guest's load generator is not the storvsc driver's general `execute()` path:
after the scan it keeps `depth` slots (devices/storvsc/vsc.py SrbSlots), each with
its own scattered guest pages and a prebuilt GPA-direct packet; per batch one
native call patches every free slot's LBA and writes them all to the ring, and one
parses every completion a receive took. Its per request work is C, so the host's is
what is measured. The JSON records say what the guest cost: `guest_cpu_us_per_io`
(the VM process's CPU per request, its polling for completions included) and
`guest_busy_us_per_io` (wall time per request from each receive's return to the end
of the resubmission: parse, latencies, submit).

`python -m vmbus.bench_disk host|vm ...` are the two child roles (not a public CLI).
"""

from __future__ import annotations

import argparse
import array
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vmbus.bench import PROGRESS_PREFIX, _Progress, check_options, stopped, write_outputs
from vmbus.cliutil import Interrupted, UserError


@dataclass(frozen=True)
class Workload:
    """One fio-style job: name, block size, queue depth, random or not, read or write."""

    name: str
    block: int
    depth: int
    random: bool
    write: bool


WORKLOADS = [
    Workload("randread-4k-qd1", 4096, 1, True, False),
    Workload("randread-4k-qd32", 4096, 32, True, False),
    Workload("randwrite-4k-qd32", 4096, 32, True, True),
    Workload("read-128k-qd8", 131072, 8, False, False),
    Workload("write-128k-qd8", 131072, 8, False, True),
]
BACKENDS = ["memory", "file"]  # LUN 0, LUN 1
DISK_SIZE = 256 << 20
QUICK_SECONDS = 0.4  # as `bench ring`: the CLI help states both defaults
FULL_SECONDS = 2.0
RING_SIZE = 1 << 20  # per direction: room for QD32 requests and completions many times over
BLOCK_SIZE = 512  # the LUNs' logical block (the backends' default)
_CHILD = [sys.executable, "-m", "vmbus.bench_disk"]
LAT_SAMPLES = 200_000  # latencies kept per point (the first ones; percentiles of those)


def _pct(samples: list[float], p: float) -> float:
    if not samples:
        return 0.0
    s = sorted(samples)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


# -- orchestrator ------------------------------------------------------------------


def _make_image(path: str, size: int) -> None:
    """A fully written image (no holes), so reads cost what a real disk's data costs."""
    chunk = random.Random(1).randbytes(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(chunk)


def fio_baseline(path: str, w: Workload, seconds: float) -> dict[str, Any]:
    """fio on the image with the file backend's I/O model (psync, buffered, QD threads)."""
    rw = ("randwrite" if w.write else "randread") if w.random else ("write" if w.write else "read")
    cmd = [
        "fio",
        "--name=bench",
        f"--filename={path}",
        f"--rw={rw}",
        f"--bs={w.block}",
        "--ioengine=psync",
        "--direct=0",
        f"--numjobs={w.depth}",
        "--group_reporting",
        "--thread",
        "--time_based",
        f"--runtime={max(1, int(seconds * 1000))}ms",
        f"--size={DISK_SIZE}",
        "--randrepeat=0",
        "--norandommap",
        "--output-format=json",
    ]
    out = subprocess.run(cmd, capture_output=True, check=True, timeout=120 + seconds)
    text = out.stdout.decode()
    job = json.loads(text[text.index("{") :])["jobs"][0]
    side = job["write" if w.write else "read"]
    pct = side.get("clat_ns", {}).get("percentile", {})
    return {
        "backend": "file",
        "workload": w.name,
        "impl": "fio",
        "iops": float(side["iops"]),
        "bytes_per_s": float(side["bw_bytes"]),
        "lat_p50_us": pct.get("50.000000", 0) / 1000,
        "lat_p99_us": pct.get("99.000000", 0) / 1000,
        "ios": int(side["total_ios"]),
        "seconds": seconds,
        "command": " ".join(cmd),
    }


def _run_pair(
    impl: str, image: str, seconds: float, progress: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Host + VM children with VMBUSD_NATIVE set for `impl`; the VM's records.

    Their own session: a Ctrl-C reaches only the orchestrator, which stops them."""
    env = dict(os.environ, VMBUSD_NATIVE="1" if impl == "native" else "0")
    children: list[subprocess.Popen[bytes]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="vmbusd-bench-disk-") as tmp:
            path = os.path.join(tmp, "vmbusd.sock")
            host = subprocess.Popen(
                [*_CHILD, "host", "--listen", path, "--image", image],
                env=env,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
            children.append(host)
            deadline = time.monotonic() + 30
            while not os.path.exists(path):
                if host.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("bench disk host did not start")
                time.sleep(0.02)
            vm = subprocess.Popen(
                [*_CHILD, "vm", "--connect", path, "--seconds", str(seconds), "--impl", impl],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            children.append(vm)
            assert vm.stderr is not None
            for raw in vm.stderr:
                line = raw.decode(errors="replace").rstrip("\n")
                if line.startswith(PROGRESS_PREFIX):
                    progress(line[len(PROGRESS_PREFIX) :])
                else:
                    print(line, file=sys.stderr, flush=True)
            vm_out, _ = vm.communicate(timeout=600)
            host.wait(timeout=30)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    if vm.returncode != 0:
        raise RuntimeError(f"bench disk VM ({impl}) failed with status {vm.returncode}")
    records: list[dict[str, Any]] = json.loads(vm_out.decode().strip().splitlines()[-1])
    return records


def _table(records: list[dict[str, Any]]) -> str:
    by = {(r["backend"], r["workload"], r["impl"]): r for r in records}
    lines = [
        f"{'backend':<7} {'workload':<18} {'impl':<7} {'IOPS':>10} {'MB/s':>9}"
        f" {'p50 us':>8} {'p99 us':>9} {'vs fio':>7} {'vs python':>9}"
    ]
    for backend in BACKENDS:
        for w in WORKLOADS:
            for impl in ("native", "python", "fio"):
                r = by.get((backend, w.name, impl))
                if r is None:
                    continue
                fio, py = by.get(("file", w.name, "fio")), by.get((backend, w.name, "python"))

                def ratio(base: dict[str, Any] | None, r: dict[str, Any] = r) -> str:
                    if base is None or base is r or not base["iops"] or r["impl"] == "fio":
                        return "-"
                    return f"{r['iops'] / base['iops']:.2f}x"

                lines.append(
                    f"{backend:<7} {w.name:<18} {impl:<7} {r['iops']:>10,.0f}"
                    f" {r['bytes_per_s'] / 1e6:>9,.1f} {r['lat_p50_us']:>8,.1f}"
                    f" {r['lat_p99_us']:>9,.1f}"
                    f" {ratio(fio if backend == 'file' else None):>7} {ratio(py):>9}"
                )
    return "\n".join(lines)


def write_plot(records: list[dict[str, Any]], path: str) -> None:
    """IOPS and MB/s per workload, one bar per backend/implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [("memory", "native"), ("memory", "python"), ("file", "native")]
    series += [("file", "python"), ("file", "fio")]
    by = {(r["backend"], r["workload"], r["impl"]): r for r in records}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(series)
    xs = range(len(WORKLOADS))
    for i, (backend, impl) in enumerate(series):
        rs = [by.get((backend, w.name, impl)) for w in WORKLOADS]
        pos = [x + (i - len(series) / 2 + 0.5) * width for x in xs]
        ax1.bar(pos, [r["iops"] if r else 0 for r in rs], width, label=f"{backend} {impl}")
        ax2.bar(pos, [r["bytes_per_s"] / 1e6 if r else 0 for r in rs], width)
    for ax, title in ((ax1, "IOPS"), (ax2, "MB/s")):
        ax.set_xticks(list(xs), [w.name for w in WORKLOADS], rotation=20, fontsize=8)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    ax1.legend(fontsize=8)
    fig.suptitle(f"vmbusd bench disk ({os.cpu_count()} CPUs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_bench_disk(
    *,
    quick: bool = False,
    json_path: str | None = None,
    seconds: float | None = None,
    plot_path: str | None = None,
) -> int:
    """The disk benchmark. Bad options are refused before the run (UserError);
    SIGTERM/Ctrl-C stops the children and writes nothing."""
    seconds = check_options(seconds, QUICK_SECONDS if quick else FULL_SECONDS, json_path, plot_path)
    try:
        subprocess.run(["fio", "--version"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise UserError(f"bench disk needs fio on PATH (the baseline): {exc}") from exc
    records: list[dict[str, Any]] = []
    n = len(WORKLOADS)
    progress = _Progress(n + 2 * len(BACKENDS) * n, "bench disk")
    try:
        with tempfile.TemporaryDirectory(prefix="vmbusd-bench-disk-img-", dir="/var/tmp") as tmp:
            image = os.path.join(tmp, "disk.img")
            _make_image(image, DISK_SIZE)
            for w in WORKLOADS:
                progress.step(f"fio file {w.name}")
                records.append(fio_baseline(image, w, seconds))
            for impl in ("native", "python"):
                records.extend(_run_pair(impl, image, seconds, progress.step))
    except (Interrupted, KeyboardInterrupt) as exc:
        raise stopped(exc, progress) from None
    finally:
        progress.close()
    print(_table(records))
    print(
        f"\n(disk {DISK_SIZE >> 20} MiB per LUN, {BLOCK_SIZE}-byte blocks; file backend "
        f"buffered; fio psync, numjobs = queue depth; {seconds} s per point; "
        f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f})"
    )
    write_outputs(records, json_path, plot_path, write_plot)
    return 0


# -- child: host -------------------------------------------------------------------


def host_main(args: argparse.Namespace) -> int:
    import trio

    from devices.storvsc.vsp import StorvscDevice
    from vmbus import attach
    from vmbus.server import VmSession

    async def serve() -> list[dict[str, Any]]:
        listener = await attach.listen(args.listen)
        conn = await listener.accept()
        await listener.aclose()
        dev = StorvscDevice(
            ring_size_hint=RING_SIZE,
            max_subchannels=0,  # one channel: the queue depth is the workload's
            lun=[
                {"backend": "memory", "size": DISK_SIZE},
                {"backend": "file", "path": args.image},
            ],
        )
        session = VmSession(conn, [dev], vm_label="bench")
        try:
            await session.run()
        finally:
            await dev.close()
        return [st for _relid, _d, st in session.closed_stats]

    # The host's channel counters (sends, signals, wake-ups), for profiling by hand.
    print(json.dumps(trio.run(serve)), flush=True)
    return 0


# -- child: VM ---------------------------------------------------------------------


async def _drive(
    hba: Any, lun: int, w: Workload, seconds: float, impl: str, backend: str
) -> dict[str, Any]:
    """Keep w.depth requests in flight on the primary channel for `seconds`.

    Python per batch: one receive, one parse of every completion in it and one
    submit of every slot it freed (devices/storvsc/vsc.py SrbSlots: C, or its
    Python twin under VMBUSD_NATIVE=0, as the host)."""
    from devices.storvsc.protocol import DataIn, encode_srb, srb_request
    from devices.storvsc.vsc import (
        SP_UNTAGGED,
        SRB_FLAGS_DATA_IN,
        SRB_FLAGS_DATA_OUT,
        SRB_FLAGS_DISABLE_SYNCH_TRANSFER,
        SRB_FLAGS_NO_QUEUE_FREEZE,
        SRB_FLAGS_QUEUE_ACTION_ENABLE,
        SRB_SIMPLE_TAG_REQUEST,
        LbaSequence,
        SrbSlots,
        submit_slots,
    )
    from vmbus.gpadl import PAGE_SIZE, GpaRange
    from vmbus.packet import gpa_direct

    channel = hba.queues[0].channel
    disk = hba.disks[lun]
    blocks = w.block // disk.block_size
    op = 0x8A if w.write else 0x88
    flags = SRB_FLAGS_DISABLE_SYNCH_TRANSFER | SRB_FLAGS_QUEUE_ACTION_ENABLE
    flags |= SRB_FLAGS_NO_QUEUE_FREEZE | (SRB_FLAGS_DATA_OUT if w.write else SRB_FLAGS_DATA_IN)
    cdb = bytes([op, 0]) + bytes(8) + blocks.to_bytes(4, "big") + b"\0\0"
    body = encode_srb(
        lun=lun,
        cdb=cdb,
        data_in=DataIn.WRITE if w.write else DataIn.READ,
        data_transfer_length=w.block,
        srb_flags=flags,
        queue_tag=SP_UNTAGGED,
        queue_action=SRB_SIMPLE_TAG_REQUEST,
    )
    payload = srb_request(body)
    packets = []
    pages: list[int] = []
    for i in range(w.depth):
        pfns = hba.vm.ram.alloc_pages(w.block // PAGE_SIZE)
        pages += pfns
        for pfn in pfns:
            hba.vm.ram.page(pfn)[:8] = struct.pack("<Q", pfn)
        packets.append(gpa_direct([GpaRange(w.block, 0, tuple(pfns))], payload, trans_id=i + 1))
    seq = LbaSequence(disk.blocks // blocks, blocks, w.random, rng=7)
    slots = SrbSlots(packets, seq, channel.max_batch)
    lat = array.array("Q")
    ios = 0
    perf_ns = time.perf_counter_ns
    st = channel.stats
    b0, w0, s0 = st.batches_in, st.wakeups, st.signals_sent
    cpu0 = time.process_time()
    busy_ns = 0  # from each receive's return to the resubmission's end
    try:
        t_start = time.perf_counter()
        deadline = t_start + seconds
        await submit_slots(channel, slots, range(1, w.depth + 1), w.depth, perf_ns())
        outstanding = w.depth
        stopping = False
        while outstanding:
            batch = await channel.receive()
            t_got = perf_ns()
            r = slots.parse(batch.buffer, batch.index, batch.n, t_got)
            if r.nfailed:
                k = r.first_failed
                raise RuntimeError(
                    f"{w.name} on LUN {lun}: vstor status {slots.vstor_status[k]:#x},"
                    f" SRB status {slots.srb_status[k]:#x}"
                )
            if len(lat) < LAT_SAMPLES:
                slots.add_latencies(lat, r.n)
            ios += r.n
            if not stopping and time.perf_counter() >= deadline:
                stopping = True  # what completed now is not resubmitted
            if stopping:
                outstanding -= r.n
            else:
                await submit_slots(channel, slots, slots.trans_id, r.n, perf_ns())
            busy_ns += perf_ns() - t_got
        dt = time.perf_counter() - t_start
    finally:
        hba.vm.ram.free_pages(pages)
    cpu = time.process_time() - cpu0
    us = [v / 1000 for v in lat[:LAT_SAMPLES]]
    return {
        "backend": backend,
        "workload": w.name,
        "impl": impl,
        "iops": ios / dt,
        "bytes_per_s": ios * w.block / dt,
        "lat_p50_us": _pct(us, 50),
        "lat_p99_us": _pct(us, 99),
        "ios": ios,
        "seconds": dt,
        # the guest's view of batching: completions per receive, sleeps, kicks it sent
        "guest_batches": st.batches_in - b0,
        "guest_wakeups": st.wakeups - w0,
        "guest_signals": st.signals_sent - s0,
        # the VM process's CPU per request (its polling for completions included)
        "guest_cpu_us_per_io": cpu / ios * 1e6 if ios else 0.0,
        # its own work per request: parse + resubmit, waiting for the host left out
        "guest_busy_us_per_io": busy_ns / ios / 1000 if ios else 0.0,
    }


def vm_main(args: argparse.Namespace) -> int:
    import trio

    from devices.storvsc.protocol import SCSI_IF_TYPE
    from devices.storvsc.vsc import StorvscHba
    from vmbus import attach
    from vmbus.guest.vm import SimulatedVm

    records: list[dict[str, Any]] = []

    async def run() -> None:
        vm = SimulatedVm(ram_size=64 << 20, vm_id="bench", vcpus=1)
        conn = await attach.connect(args.connect)
        async with trio.open_nursery() as nursery:
            await vm.start(conn, nursery)
            offer = vm.find_offers(SCSI_IF_TYPE)[0]
            hba = StorvscHba(vm, offer, RING_SIZE)
            async with trio.open_nursery() as scan:
                await hba.start(scan)  # Linux's init sequence and scan
                # From here on the load generator owns the channel's completions.
                scan.cancel_scope.cancel()
            for lun, backend in enumerate(BACKENDS):
                if lun not in hba.disks:
                    raise RuntimeError(f"the scan found no LUN {lun} ({backend})")
                if args.only and args.only.split(":")[0] != backend:
                    continue
                for w in WORKLOADS:
                    if args.only and args.only.split(":")[1] != w.name:
                        continue
                    what = f"{args.impl} {backend} {w.name}"
                    print(f"{PROGRESS_PREFIX}{what}", file=sys.stderr, flush=True)
                    records.append(await _drive(hba, lun, w, args.seconds, args.impl, backend))
            await hba.close()
            await vm.unload()
            nursery.cancel_scope.cancel()
        vm.close()

    trio.run(run)
    print(json.dumps(records), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vmbus.bench_disk")
    sub = p.add_subparsers(dest="role", required=True)
    h = sub.add_parser("host")
    h.add_argument("--listen", required=True)
    h.add_argument("--image", required=True)
    v = sub.add_parser("vm")
    v.add_argument("--connect", required=True)
    v.add_argument("--seconds", type=float, required=True)
    v.add_argument("--impl", required=True)
    v.add_argument("--only", help="BACKEND:WORKLOAD, one point (profiling)")
    args = p.parse_args(argv)
    return host_main(args) if args.role == "host" else vm_main(args)


if __name__ == "__main__":
    sys.exit(main())
