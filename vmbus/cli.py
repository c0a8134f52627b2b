"""`vmbusd`: the one command (serve, attach, vm, demo, bench)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import trio

DESCRIPTION = """\
vmbusd serves Hyper-V VMBus devices to a VM's guest: it attaches to the VM's VMM
over the attach protocol (docs/attach-protocol.md), offers synthetic devices and
serves their channels, ring buffers in guest memory, with Python device backends.
"""

EPILOG = """\
examples:
  vmbusd demo                          simulated VM + vmbusd, echo traffic, summary
  vmbusd serve --listen /run/vmbusd.sock
  vmbusd vm --connect /run/vmbusd.sock --workload echo
  vmbusd vm --listen /tmp/vm.sock & vmbusd attach /tmp/vm.sock
  vmbusd bench ring --quick --json ring.json
  vmbusd serve --listen /run/vmbusd.sock --stats /run/vmbusd.stats & vmbusd stats /run/vmbusd.stats
"""


def _devices_factory(config: str | None):
    """A fresh set of devices per VM session, from --config or the default."""
    from vmbus.config import load_devices

    load_devices(config)  # fail early, before listening, on a bad file
    return lambda: load_devices(config)


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(
        level=max(level, logging.DEBUG),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from vmbus.server import serve_until_signalled

    uids = set(args.allow_uid) if args.allow_uid else None
    factory = _devices_factory(args.config)
    metrics = None
    if args.metrics:
        host, _, port = args.metrics.rpartition(":")
        metrics = (host or "127.0.0.1", int(port))
    print(f"vmbusd: listening on {args.listen}", file=sys.stderr)
    trio.run(
        lambda: serve_until_signalled(
            args.listen, factory, allowed_uids=uids, stats_path=args.stats, metrics=metrics
        )
    )
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    import json

    from vmbus import stats

    fmt = "prometheus" if args.prometheus else "json"
    try:
        text = stats.fetch(args.path, fmt)
    except OSError as exc:
        print(f"vmbusd stats: cannot reach {args.path}: {exc}", file=sys.stderr)
        return 1
    if args.json or args.prometheus:
        print(text, end="" if text.endswith("\n") else "\n")
    else:
        print(stats.render_table(json.loads(text)))
    return 0


def cmd_attach(args: argparse.Namespace) -> int:
    from vmbus.server import attach_to

    trio.run(attach_to, args.path, _devices_factory(args.config)())
    return 0


def cmd_vm(args: argparse.Namespace) -> int:
    from vmbus.guest.main import run_vm

    return trio.run(
        lambda: run_vm(
            listen=args.listen,
            connect=args.connect,
            workload=args.workload,
            packets=args.packets,
            ring_size=args.ring_size,
            json_out=args.json,
        )
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from vmbus.demo import run_demo

    return run_demo(packets=args.packets, ring_size=args.ring_size)


def cmd_bench(args: argparse.Namespace) -> int:
    from vmbus.bench import run_bench

    return run_bench(
        args.what, quick=args.quick, json_path=args.json, seconds=args.seconds, plot_path=args.plot
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vmbusd",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the service and accept VMMs on a socket")
    s.description = (
        "Listen on an AF_UNIX SOCK_SEQPACKET socket (created 0600) and serve every VMM that "
        "connects, each as one isolated VM session with the default devices."
    )
    s.add_argument("--listen", required=True, metavar="PATH", help="socket path to create")
    s.add_argument(
        "--stats",
        metavar="PATH",
        help="also answer `vmbusd stats PATH` on this socket (0600, same allowed uids)",
    )
    s.add_argument(
        "--metrics",
        metavar="[HOST:]PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default host 127.0.0.1)",
    )
    s.add_argument(
        "--allow-uid",
        action="append",
        type=int,
        metavar="UID",
        help="peer uid allowed to connect (repeatable; default: our own uid)",
    )
    s.add_argument("--config", metavar="FILE", help="TOML file listing each VM's devices")
    s.set_defaults(func=cmd_serve)

    a = sub.add_parser("attach", help="connect to a VMM that listens and serve its VM")
    a.description = "Connect to a VM's attach socket and serve it until the VMM disconnects."
    a.add_argument("path", metavar="PATH", help="the VMM's attach socket")
    a.add_argument("--config", metavar="FILE", help="TOML file listing the VM's devices")
    a.set_defaults(func=cmd_attach)

    v = sub.add_parser("vm", help="run the simulated VM (VMM + guest VMBus client)")
    v.description = (
        "Start a simulated VM: guest RAM in a memfd, the VMM side of the attach protocol, and "
        "a guest VMBus client that behaves like Linux hv_vmbus. Exactly one of --listen or "
        "--connect."
    )
    g = v.add_mutually_exclusive_group(required=True)
    g.add_argument("--listen", metavar="PATH", help="listen for vmbusd (`vmbusd attach PATH`)")
    g.add_argument("--connect", metavar="PATH", help="connect to `vmbusd serve --listen PATH`")
    v.add_argument(
        "--workload",
        choices=["echo", "idle"],
        default="echo",
        help="echo: push mixed-size traffic through every echo channel and verify it; "
        "idle: negotiate, open channels, wait for Ctrl-C",
    )
    v.add_argument("--packets", type=int, default=20000, help="echo packets to send")
    v.add_argument("--ring-size", type=int, default=256 * 1024, help="bytes per ring direction")
    v.add_argument("--json", metavar="FILE", help="write the summary as JSON ('-' = stdout)")
    v.set_defaults(func=cmd_vm)

    d = sub.add_parser("demo", help="vmbusd and a simulated VM as two processes, echo traffic")
    d.description = (
        "Build-free end-to-end check: start the service and a simulated VM as two processes "
        "joined by the attach protocol, negotiate VMBus, open an echo channel, push traffic of "
        "mixed sizes (1 byte to a quarter of the ring) both ways, verify every byte and the "
        "order, print a summary. Exit status 0 only if everything matched."
    )
    d.add_argument("--packets", type=int, default=20000, help="packets to echo")
    d.add_argument("--ring-size", type=int, default=256 * 1024, help="bytes per ring direction")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("stats", help="show a running service's per-channel counters")
    t.description = (
        "Read the counters of `vmbusd serve --stats PATH`: every attached VM and open "
        "channel with packets, bytes, wake-ups, signals and ring-space waits."
    )
    t.add_argument("path", metavar="PATH", help="the service's --stats socket")
    g2 = t.add_mutually_exclusive_group()
    g2.add_argument("--json", action="store_true", help="print the raw JSON snapshot")
    g2.add_argument("--prometheus", action="store_true", help="print Prometheus text format")
    t.set_defaults(func=cmd_stats)

    b = sub.add_parser("bench", help="benchmarks (ring)")
    b.description = (
        "ring: guest -> host -> guest echo through a real channel between two processes at "
        "64 B..64 KiB, native and pure-Python, with memcpy and AF_UNIX socketpair baselines "
        "measured in the same run."
    )
    b.add_argument("what", choices=["ring"], help="which benchmark")
    b.add_argument("--quick", action="store_true", help="short run (under 30 s)")
    b.add_argument("--json", metavar="FILE", help="write the records as JSON")
    b.add_argument(
        "--seconds", type=float, metavar="S", help="seconds per point (overrides --quick)"
    )
    b.add_argument("--plot", metavar="PNG", help="also draw the results (needs the bench extra)")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
