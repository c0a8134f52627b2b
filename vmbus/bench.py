"""`vmbusd bench ring`: guest -> host -> guest echo between two processes, with baselines.

For each implementation (native, python) the orchestrator starts two processes: a
vmbusd host serving one echo device, and a simulated VM that opens a fresh echo
channel per payload size and saturates it. The same two processes also run the
socketpair baseline (the same messages over an AF_UNIX SOCK_SEQPACKET socketpair
whose ends the orchestrator hands them), so the comparison shares every cost but
the transport. memcpy is measured inside the orchestrator.

`python -m vmbus.bench host|vm ...` are the two child roles (not a public CLI).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from vmbus.cliutil import Interrupted, UserError, check_writable

SIZES = [64, 256, 1024, 4096, 16384, 65536]
RING_SIZE = 4 << 20  # per direction: room for a window of 64 KiB packets
QUICK_SECONDS = 0.4
FULL_SECONDS = 2.0
SOCKPAIR_BUF = 65536 + 64
SOCKPAIR_INFLIGHT = RING_SIZE // 2
SOCKPAIR_SOCKBUF = 4 * RING_SIZE  # per socket, with room for per-message overhead
SOCKPAIR_MSG_OVERHEAD = 1024  # kernel bookkeeping per queued datagram (skb truesize)
PROGRESS_PREFIX = "progress: "  # a VM child's stderr line that announces a point


# -- orchestrator ------------------------------------------------------------------


def _log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def memcpy_baseline(size: int, seconds: float) -> dict[str, Any]:
    """Bytes per second of C memcpy of `size`-byte packets into a ring-sized buffer.

    Always the C copy (whatever VMBUSD_NATIVE says): it is the yardstick, not a path
    under test.
    """
    from vmbus.guest.check import native_bench_memcpy

    src = bytes(range(256)) * (size // 256 + 1)
    dst = bytearray(RING_SIZE)
    count = 1
    while True:  # grow the count until one call takes long enough to time
        t0 = time.perf_counter()
        native_bench_memcpy(dst, src, size, count)
        dt = time.perf_counter() - t0
        if dt >= seconds / 4 or count > 1 << 34:
            break
        count *= 4
    pps = count / dt
    return {
        "size": size,
        "impl": "memcpy",
        "packets_per_s": pps,
        "bytes_per_s": pps * size,
        "wakeups_per_packet": 0.0,
        "seconds": dt,
    }


def _big_buffers(s: socket.socket) -> None:
    """Socket buffers that hold the whole window (SO_*BUFFORCE passes wmem_max as root)."""
    for force, plain in ((33, socket.SO_SNDBUF), (32, socket.SO_RCVBUF)):  # SO_*BUFFORCE
        try:
            s.setsockopt(socket.SOL_SOCKET, force, SOCKPAIR_SOCKBUF)
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, plain, SOCKPAIR_SOCKBUF)


def _run_pair(
    impl: str, sizes: list[int], seconds: float, progress: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Start host + VM children with VMBUSD_NATIVE set for `impl`; collect their records.

    The children run in their own session, so a Ctrl-C on the terminal reaches only
    this orchestrator, which stops them (whatever stops it, they never outlive it)."""
    env = dict(os.environ, VMBUSD_NATIVE="1" if impl == "native" else "0")
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        _big_buffers(s)
    children: list[subprocess.Popen[bytes]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="vmbusd-bench-") as tmp:
            path = os.path.join(tmp, "vmbusd.sock")
            host = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "vmbus.bench",
                    "host",
                    "--listen",
                    path,
                    "--sockfd",
                    str(a.fileno()),
                ],
                env=env,
                pass_fds=[a.fileno()],
                stdout=subprocess.PIPE,
                start_new_session=True,
            )
            children.append(host)
            deadline = time.monotonic() + 30
            while not os.path.exists(path):
                if host.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("bench host did not start")
                time.sleep(0.02)
            vm = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "vmbus.bench",
                    "vm",
                    "--connect",
                    path,
                    "--sockfd",
                    str(b.fileno()),
                    "--seconds",
                    str(seconds),
                    "--sizes",
                    ",".join(map(str, sizes)),
                    "--impl",
                    impl,
                    "--socketpair",
                    "1" if impl == "native" else "0",
                ],
                env=env,
                pass_fds=[b.fileno()],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            children.append(vm)
            a.close()
            b.close()
            assert vm.stderr is not None
            for raw in vm.stderr:  # progress lines; anything else is passed through
                line = raw.decode(errors="replace").rstrip("\n")
                if line.startswith(PROGRESS_PREFIX):
                    progress(line[len(PROGRESS_PREFIX) :])
                else:
                    print(line, file=sys.stderr, flush=True)
            vm_out, _ = vm.communicate(timeout=600)
            host_out, _ = host.communicate(timeout=60)
    finally:
        a.close()
        b.close()
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    if vm.returncode != 0:
        raise RuntimeError(f"bench VM ({impl}) failed with status {vm.returncode}")
    guest = json.loads(vm_out.decode().strip().splitlines()[-1])
    host_stats = json.loads(host_out.decode().strip().splitlines()[-1]) if host_out.strip() else []
    ring_runs = iter(host_stats)  # the host closed one channel per ring run, in order
    records = []
    for rec in guest["records"]:
        hst: dict[str, Any] = next(ring_runs, {}) if rec["impl"] != "socketpair" else {}
        host_wake = hst.get("wakeups", 0)
        guest_wake = rec.pop("guest_wakeups", 0)
        if rec["impl"] != "socketpair":
            rec["wakeups_per_packet"] = (host_wake + guest_wake) / max(1, rec["packets"])
            rec["host_wakeups"] = host_wake
            rec["guest_wakeups"] = guest_wake
        records.append(rec)
    return records


def _wake(r: dict[str, Any]) -> str:
    w = r.get("wakeups_per_packet")
    return "-" if w is None else f"{w:.4f}"


def _table(records: list[dict[str, Any]]) -> str:
    by = {(r["size"], r["impl"]): r for r in records}
    lines = [
        f"{'size':>6} {'impl':<10} {'packets/s':>12} {'MB/s':>10} {'wakeups/pkt':>11}"
        f" {'vs socketpair':>13} {'vs python':>9} {'vs memcpy':>9}"
    ]
    for size in sorted({r["size"] for r in records}):
        for impl in ("native", "python", "socketpair", "memcpy"):
            r = by.get((size, impl))
            if r is None:
                continue
            sp, py, mc = (
                by.get((size, "socketpair")),
                by.get((size, "python")),
                by.get((size, "memcpy")),
            )

            def ratio(base: dict[str, Any] | None, key: str, r: dict[str, Any] = r) -> str:
                if base is None or base is r or not base[key]:
                    return "-"
                return f"{r[key] / base[key]:.2f}x"

            lines.append(
                f"{size:>6} {impl:<10} {r['packets_per_s']:>12,.0f} "
                f"{r['bytes_per_s'] / 1e6:>10,.1f} {_wake(r):>11}"
                f" {ratio(sp, 'packets_per_s'):>13} {ratio(py, 'packets_per_s'):>9}"
                f" {ratio(mc, 'bytes_per_s'):>9}"
            )
    return "\n".join(lines)


def write_plot(records: list[dict[str, Any]], path: str) -> None:
    """Round trips/s and MB/s against payload size, one line per implementation."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install -e '.[bench]'") from exc
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl, style in (
        ("native", "o-"),
        ("python", "s-"),
        ("socketpair", "^-"),
        ("memcpy", "x--"),
    ):
        rs = sorted((r for r in records if r["impl"] == impl), key=lambda r: r["size"])
        if not rs:
            continue
        sizes = [r["size"] for r in rs]
        ax1.plot(sizes, [r["packets_per_s"] for r in rs], style, label=impl)
        ax2.plot(sizes, [r["bytes_per_s"] / 1e6 for r in rs], style, label=impl)
    for ax, title in ((ax1, "packets/s (round trips)"), (ax2, "MB/s (round-trip payload)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("payload bytes")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend()
    fig.suptitle(f"vmbusd bench ring ({os.cpu_count()} CPUs, ring {RING_SIZE >> 10} KiB)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class _Progress:
    """A progress bar (rich) on a terminal; plain `bench: ...` lines otherwise."""

    def __init__(self, total: int, label: str = "bench ring") -> None:
        self.total = total
        self.done = 0
        self._bar: Any = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._bar = Progress(
                TextColumn(label),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.description}"),
                console=Console(file=sys.stderr),
                transient=True,
            )
            self._task = self._bar.add_task("", total=total)
            self._bar.start()

    def step(self, what: str) -> None:
        """One point starts (each is announced as it starts)."""
        if self.done:
            self._advance()
        self.done += 1
        if self._bar is not None:
            self._bar.update(self._task, description=what)
        else:
            _log(f"[{self.done}/{self.total}] {what}")

    def _advance(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)

    def close(self) -> None:
        if self._bar is not None:
            self._advance()
            self._bar.stop()


def run_bench(
    what: str,
    *,
    quick: bool = False,
    json_path: str | None = None,
    seconds: float | None = None,
    plot_path: str | None = None,
) -> int:
    """The ring benchmark. Bad options are refused before the run (UserError);
    SIGTERM/Ctrl-C stops the children and writes nothing."""
    if what != "ring":
        raise UserError(f"unknown benchmark {what!r}; there is: ring")
    seconds = check_options(seconds, QUICK_SECONDS if quick else FULL_SECONDS, json_path, plot_path)
    records: list[dict[str, Any]] = []
    # memcpy per size; native: socketpair + ring per size; python: ring per size
    progress = _Progress(4 * len(SIZES))
    try:
        for size in SIZES:
            progress.step(f"memcpy {size} B")
            records.append(memcpy_baseline(size, seconds))
        for impl in ("native", "python"):
            records.extend(_run_pair(impl, SIZES, seconds, progress.step))
    except (Interrupted, KeyboardInterrupt) as exc:
        raise stopped(exc, progress) from None
    finally:
        progress.close()
    print(_table(records))
    print(
        f"\n(ring: {RING_SIZE // 1024} KiB per direction; {seconds} s per point; "
        f"{os.cpu_count()} CPUs; round-trip payload rates)"
    )
    write_outputs(records, json_path, plot_path, write_plot)
    return 0


# -- child: host -------------------------------------------------------------------


def _sockpair_echo(fd: int) -> None:
    """Host side of the socketpair baseline: echo every message until EOF."""
    s = socket.socket(fileno=fd)
    try:
        while True:
            m = s.recv(SOCKPAIR_BUF)
            if not m:
                return
            s.send(m)
    except OSError:
        return
    finally:
        s.close()


def host_main(args: argparse.Namespace) -> int:
    import trio

    from devices.echo import EchoDevice
    from vmbus import attach
    from vmbus.server import VmSession

    t = threading.Thread(target=_sockpair_echo, args=(args.sockfd,), daemon=True)
    t.start()

    async def serve() -> list[dict[str, Any]]:
        listener = await attach.listen(args.listen)
        conn = await listener.accept()
        await listener.aclose()
        session = VmSession(conn, [EchoDevice(ring_size_hint=RING_SIZE)], vm_label="bench")
        await session.run()
        return [st for _relid, _d, st in session.closed_stats]  # one per channel, in order

    stats: list[dict[str, Any]] = trio.run(serve)
    print(json.dumps(stats), flush=True)
    return 0


# -- child: VM ---------------------------------------------------------------------


def _sockpair_client(fd: int, size: int, seconds: float) -> dict[str, Any]:
    """Guest side of the socketpair baseline: a window of messages in flight, echoed back."""
    s = socket.socket(fileno=fd)
    msg = bytes(range(256)) * (size // 256) + bytes(size % 256)
    # The same bytes in flight as the ring workload allows (half a ring); both socket
    # buffers are sized to hold them (or both ends would block in send()).
    window = max(1, min(256, SOCKPAIR_INFLIGHT // (size + SOCKPAIR_MSG_OVERHEAD)))
    sent = recvd = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    stop_at: int | None = None
    while stop_at is None or recvd < stop_at:
        while stop_at is None and sent - recvd < window:
            s.send(msg)
            sent += 1
        if stop_at is None and time.perf_counter() >= deadline:
            stop_at = sent
        if recvd < sent:
            m = s.recv(SOCKPAIR_BUF)
            if len(m) != size:
                raise RuntimeError("socketpair baseline: short message")
            recvd += 1
    dt = time.perf_counter() - t0
    s.detach()
    return {
        "size": size,
        "impl": "socketpair",
        "packets": recvd,
        "packets_per_s": recvd / dt,
        "bytes_per_s": recvd * size / dt,
        "wakeups_per_packet": None,  # not observable for a socket
        "seconds": dt,
    }


def vm_main(args: argparse.Namespace) -> int:
    import trio

    from devices.echo import ECHO_IF_TYPE
    from vmbus import attach
    from vmbus.guest.vm import SimulatedVm
    from vmbus.guest.workloads import echo_fixed

    sizes = [int(x) for x in args.sizes.split(",")]
    records: list[dict[str, Any]] = []
    if args.socketpair == "1":
        for size in sizes:
            print(f"{PROGRESS_PREFIX}socketpair {size} B", file=sys.stderr, flush=True)
            records.append(_sockpair_client(args.sockfd, size, args.seconds))
    os.close(args.sockfd)

    async def run() -> None:
        vm = SimulatedVm(ram_size=64 << 20, vm_id="bench")
        conn = await attach.connect(args.connect)
        async with trio.open_nursery() as nursery:
            await vm.start(conn, nursery)
            offer = vm.find_offers(ECHO_IF_TYPE)[0]
            for size in sizes:
                print(f"{PROGRESS_PREFIX}{args.impl} {size} B", file=sys.stderr, flush=True)
                gch = await vm.open_channel(offer, RING_SIZE)
                res = await echo_fixed(gch.channel, size, seconds=args.seconds)
                await vm.close_channel(gch)
                records.append(
                    {
                        "size": size,
                        "impl": args.impl,
                        "packets": res.packets,
                        "packets_per_s": res.packets_per_s,
                        "bytes_per_s": res.bytes_per_s,
                        "seconds": res.seconds,
                        "guest_wakeups": gch.channel.stats.wakeups,
                    }
                )
            await vm.unload()
            nursery.cancel_scope.cancel()
        vm.close()

    trio.run(run)
    print(json.dumps({"records": records}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vmbus.bench")
    sub = p.add_subparsers(dest="role", required=True)
    h = sub.add_parser("host")
    h.add_argument("--listen", required=True)
    h.add_argument("--sockfd", type=int, required=True)
    v = sub.add_parser("vm")
    v.add_argument("--connect", required=True)
    v.add_argument("--sockfd", type=int, required=True)
    v.add_argument("--seconds", type=float, required=True)
    v.add_argument("--sizes", required=True)
    v.add_argument("--impl", required=True)
    v.add_argument("--socketpair", default="1")
    args = p.parse_args(argv)
    return host_main(args) if args.role == "host" else vm_main(args)


if __name__ == "__main__":
    sys.exit(main())


def check_options(
    seconds: float | None, default_seconds: float, json_path: str | None, plot_path: str | None
) -> float:
    """Every benchmark's options, refused before the run (UserError, one line):
    seconds per point (the default when None), --json and --plot writable, and
    matplotlib there for --plot. Returns the seconds."""
    if seconds is None:
        seconds = default_seconds
    if not seconds > 0:
        raise UserError(f"--seconds must be more than 0, got {seconds}")
    if json_path:
        check_writable(json_path, "--json")
    if plot_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            raise UserError("--plot needs matplotlib: pip install -e '.[bench]'") from exc
        check_writable(plot_path, "--plot")
    return seconds


def stopped(exc: BaseException, progress: _Progress) -> Interrupted:
    """The Interrupted a signal (or Ctrl-C) mid-benchmark ends with, its summary said."""
    stop = exc if isinstance(exc, Interrupted) else Interrupted(signal.SIGINT)
    stop.summary = (
        f"stopped at point {progress.done} of {progress.total}; children stopped, nothing written"
    )
    return stop


def write_outputs(
    records: list[dict[str, Any]],
    json_path: str | None,
    plot_path: str | None,
    plot: Callable[[list[dict[str, Any]], str], None],
) -> None:
    """--json and --plot of a finished benchmark."""
    if json_path:
        with open(json_path, "w") as f:
            json.dump(records, f, indent=1)
        _log(f"wrote {json_path}")
    if plot_path:
        plot(records, plot_path)
        _log(f"wrote {plot_path}")
