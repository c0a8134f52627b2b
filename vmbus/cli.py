"""`vmbusd`: the one command (serve, attach, vm, demo, bench, stats, ctl, plugins, kvm).

Errors a user can fix are `UserError`s raised where they are found; `main` is the one
place that turns them into a single line on stderr and exit status 2 (unwrapping
trio's ExceptionGroups), and SIGTERM/SIGINT into a one-line summary.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import textwrap
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import NoReturn

import trio

from vmbus.cliutil import (
    Interrupted,
    UserError,
    raise_interrupted,
    stop_signal,
    user_message,
)

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
  vmbusd plugins                       devices and backends installed as plug-ins

Mistakes (a bad config, a busy socket, a port in use) exit with status 2 and one line
on stderr. SIGTERM or Ctrl-C stops any command cleanly with a one-line summary.
"""

EXIT_USAGE = 2  # the user's mistake: one line on stderr says which


def _version() -> str:
    try:
        return version("vmbusd")
    except PackageNotFoundError:  # run from a tree that was never installed
        return "unknown (not installed)"


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps our paragraphs as written and shows every option's default.

    An option whose default is None or False says what that means in its own help
    (`default: ...`), which this formatter then leaves alone."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS:
            return text
        if action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (and exit 2), like every other mistake."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


MAX_PACKETS = 10_000_000  # the echo workload plans its packets up front (~30 B each)


def _packet_count(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_PACKETS:
        raise argparse.ArgumentTypeError(f"at most {MAX_PACKETS:,}, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def parse_hostport(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """`[HOST:]PORT` as --metrics takes it; a bad one is a UserError saying the form."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or default_host
    try:
        num = int(port)
    except ValueError:
        num = -1
    if not 0 <= num <= 65535:
        raise UserError(
            f"--metrics {text!r}: expected [HOST:]PORT with PORT 0..65535, "
            "e.g. 9464 or 127.0.0.1:9464"
        )
    return host, num


def _setup_logging(verbosity: int) -> None:
    """0: warnings and errors; -v: info; -vv: debug; -q: errors only; -qq: nothing."""
    level = {-2: logging.CRITICAL + 10, -1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}
    logging.basicConfig(
        level=level.get(verbosity, logging.DEBUG if verbosity > 0 else logging.CRITICAL + 10),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


class _Say:
    """Status lines for the user (on stderr): shown unless -q."""

    def __init__(self, prog: str, quiet: bool) -> None:
        self.prog = prog
        self.quiet = quiet

    def __call__(self, line: str) -> None:
        if not self.quiet:
            print(f"{self.prog}: {line}", file=sys.stderr, flush=True)


# -- commands ------------------------------------------------------------------------


def _raise_fd_limit() -> None:
    """A service holds a dozen descriptors per VM (socket, eventfds, RAM, backends):
    the common 1024 soft limit would stop it near 80 VMs, so take the hard limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):  # the kernel's nr_open caps it
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def cmd_serve(args: argparse.Namespace, say: _Say) -> int:
    from vmbus.config import devices_factory
    from vmbus.server import serve_until_signalled

    uids = set(args.allow_uid) if args.allow_uid else None
    factory = devices_factory(args.config)  # a bad file fails here, before any socket
    _raise_fd_limit()
    metrics = parse_hostport(args.metrics) if args.metrics else None
    summary = trio.run(
        lambda: serve_until_signalled(
            args.listen,
            factory,
            allowed_uids=uids,
            stats_path=args.stats,
            control_path=args.control,
            metrics=metrics,
            announce=say,
            max_sessions=args.max_vms,
        )
    )
    say(summary)
    return 0


def cmd_stats(args: argparse.Namespace, say: _Say) -> int:
    import json

    from vmbus import stats
    from vmbus.cliutil import describe_connect_error

    fmt = "prometheus" if args.prometheus else "json"
    try:
        text = stats.fetch(args.path, fmt)
    except OSError as exc:
        raise UserError(
            f"{describe_connect_error(args.path, exc)} (is `vmbusd serve --stats PATH` running?)"
        ) from exc
    if args.json or args.prometheus:
        print(text, end="" if text.endswith("\n") else "\n")
    else:
        print(stats.render_table(json.loads(text)))
    return 0


def _key_values(pairs: Sequence[str]) -> dict[str, object]:
    """`KEY=VALUE` words; VALUE is read as a TOML value (0.01, "x", [1, 2], { ... }),
    else taken as a bare string (medium, cut)."""
    import tomllib

    out: dict[str, object] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise UserError(f"{pair!r}: settings are KEY=VALUE (such as read_error_rate=0.01)")
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = value
    return out


def cmd_ctl(args: argparse.Namespace, say: _Say) -> int:
    from vmbus import control
    from vmbus.cliutil import describe_connect_error

    req: dict[str, object] = {"vm": args.vm, "device": args.device}
    if args.what == "disk":
        req["lun"] = args.lun
        if args.action == "add":
            req.update(
                cmd="disk-add",
                backend=args.backend,
                size=args.size,
                path=args.path,
                readonly=args.readonly or None,
                create_size=args.create_size,
                uri=args.uri,
                serial=args.serial,
            )
        elif args.action == "fault":
            req.update(cmd="disk-fault", set=_key_values(args.settings))
        else:
            req["cmd"] = "disk-remove"
    elif args.action == "impair":
        req.update(cmd="nic-impair", set=_key_values(args.settings))
    else:
        req.update(cmd="nic-link", up=args.state == "up")
    try:
        answer = control.request(args.sock, req)
    except OSError as exc:
        raise UserError(
            f"{describe_connect_error(args.sock, exc)} (is `vmbusd serve --control PATH` running?)"
        ) from exc
    if not answer.get("ok"):
        raise UserError(str(answer.get("error")))
    print(answer.get("message"))
    return 0


def cmd_attach(args: argparse.Namespace, say: _Say) -> int:
    from vmbus.config import devices_factory
    from vmbus.server import attach_to

    factory = devices_factory(args.config)  # the VM's [vm.NAME] list, else the default
    say(trio.run(attach_to, args.path, [], factory.for_vm))
    return 0


def cmd_vm(args: argparse.Namespace, say: _Say) -> int:
    from vmbus.guest.main import run_vm

    if args.netns and not args.nic_tap:
        raise UserError("--netns names the namespace of --nic-tap's TAP: give --nic-tap NAME too")

    return trio.run(
        lambda: run_vm(
            listen=args.listen,
            connect=args.connect,
            workload="idle" if args.nic_tap or args.export_nbd else args.workload,
            packets=args.packets,
            ring_size=args.ring_size,
            json_out=args.json,
            say=say,
            nic_tap=args.nic_tap,
            netns=args.netns,
            export_nbd=args.export_nbd,
            vm_id=args.name,
            reconnect_timeout=args.reconnect_timeout,
            ack_log=args.ack_log,
            seconds=args.seconds,
        )
    )


def cmd_demo(args: argparse.Namespace, say: _Say) -> int:
    from vmbus.demo import run_demo

    return run_demo(packets=args.packets, ring_size=args.ring_size)


def _vm_counts(text: str) -> tuple[int, ...]:
    """--vms: comma-separated counts from 1 to 1000."""
    try:
        counts = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not counts or any(not 1 <= c <= 1000 for c in counts):
        raise argparse.ArgumentTypeError(f"counts must be 1..1000: {text!r}")
    return counts


def cmd_bench(args: argparse.Namespace, say: _Say) -> int:
    from vmbus.bench import run_bench

    if args.what == "net":
        from vmbus.bench_net import run_bench_net

        return run_bench_net(
            quick=args.quick, json_path=args.json, seconds=args.seconds, plot_path=args.plot
        )
    if args.what == "vms":
        from vmbus.bench_vms import run_bench_vms

        return run_bench_vms(
            quick=args.quick,
            json_path=args.json,
            seconds=args.seconds,
            plot_path=args.plot,
            counts=args.vms,
        )
    if args.what == "disk":
        from vmbus.bench_disk import run_bench_disk

        return run_bench_disk(
            quick=args.quick, json_path=args.json, seconds=args.seconds, plot_path=args.plot
        )
    return run_bench(
        args.what, quick=args.quick, json_path=args.json, seconds=args.seconds, plot_path=args.plot
    )


def cmd_plugins(args: argparse.Namespace, say: _Say) -> int:
    from vmbus import plugins

    found = plugins.installed()
    rows = [("GROUP", "NAME", "TARGET", "PACKAGE")]
    rows += [(p.group, p.name, p.target, p.package) for p in found]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}")
    empty = [g for g in plugins.GROUPS if not any(p.group == g for p in found)]
    if empty:
        print(f"(nothing installed in: {', '.join(empty)})")
    return 0


def cmd_guest_kernel(args: argparse.Namespace, say: _Say) -> int:
    from pathlib import Path

    from vmbus.kvm import kernel

    out = Path(args.out) if args.out else None
    deb = Path(args.source_deb) if args.source_deb else None
    return kernel.command(say, out=out, source_deb=deb)


def cmd_kvm(args: argparse.Namespace, say: _Say) -> int:
    from vmbus.kvm import vmm

    try:
        mem = vmm.parse_size(args.mem)
    except ValueError as exc:
        raise UserError(f"--mem {exc}") from None
    return trio.run(
        lambda: vmm.run_kvm(
            connect=args.connect,
            kernel_path=args.kernel,
            mem_size=mem,
            vcpus=args.cpus,
            console_path=args.console,
            append=args.append,
            until=args.until,
            timeout=args.timeout,
            say=say,
            snapshot_path=args.snapshot,
            restore_path=args.restore,
            reconnect_timeout=args.reconnect_timeout,
        )
    )


# -- the parser ------------------------------------------------------------------------


def _loudness() -> _Parser:
    """-v/-q, accepted before or after the command (SUPPRESS: the sub-command's own
    default must not undo a -v given before it)."""
    p = _Parser(add_help=False)
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="more logging: -v info, -vv debug (default: warnings and errors)",
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="count",
        default=argparse.SUPPRESS,
        help="less: -q errors only and no status lines, -qq nothing (default: off)",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    loud = _loudness()
    p = _Parser(
        prog="vmbusd",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=_Formatter,
        parents=[loud],
    )
    p.add_argument("--version", action="version", version=f"vmbusd {_version()}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND", parser_class=_Parser)

    def add(name: str, help_: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_,
            description=textwrap.fill(description, 88),
            formatter_class=_Formatter,
            parents=[loud],
        )

    s = add(
        "serve",
        "run the service and accept VMMs on a socket",
        "Listen on an AF_UNIX SOCK_SEQPACKET socket (created 0600) and serve every VMM that "
        "connects, each as one isolated VM session. A stale socket file at PATH is replaced; "
        "a live service's is refused. SIGTERM or Ctrl-C detaches every VM cleanly and "
        "removes the sockets.",
    )
    s.add_argument("--listen", required=True, metavar="PATH", help="socket path to create")
    s.add_argument(
        "--stats",
        metavar="PATH",
        help="also answer `vmbusd stats PATH` on this socket (0600, same allowed uids) "
        "(default: no stats socket)",
    )
    s.add_argument(
        "--max-vms",
        type=_positive_int,
        metavar="N",
        help="VMs attached at once; one more is refused with `error resource` (default: 256)",
    )
    s.add_argument(
        "--control",
        metavar="PATH",
        help="also take `vmbusd ctl PATH ...` changes (disks, NIC link) on this socket "
        "(0600, same allowed uids) (default: no control socket)",
    )
    s.add_argument(
        "--metrics",
        metavar="[HOST:]PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics; HOST defaults to "
        "127.0.0.1, PORT 0 picks a free one (default: no metrics endpoint)",
    )
    s.add_argument(
        "--allow-uid",
        action="append",
        type=int,
        metavar="UID",
        help="peer uid allowed to connect, repeatable (default: our own uid)",
    )
    s.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file listing each VM's devices (default: one echo device)",
    )
    s.set_defaults(func=cmd_serve)

    a = add(
        "attach",
        "connect to a VMM that listens and serve its VM",
        "Connect to a VM's attach socket and serve it until the VMM disconnects, or until "
        "SIGTERM/Ctrl-C (then the VMM is told 'shutdown').",
    )
    a.add_argument("path", metavar="PATH", help="the VMM's attach socket")
    a.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file listing the VM's devices (default: one echo device)",
    )
    a.set_defaults(func=cmd_attach)

    v = add(
        "vm",
        "run the simulated VM (VMM + guest VMBus client)",
        "Start a simulated VM: guest RAM in a memfd, the VMM side of the attach protocol, and "
        "a guest VMBus client that behaves like Linux hv_vmbus. Exactly one of --listen or "
        "--connect. Prints a one-line summary when done.",
    )
    g = v.add_mutually_exclusive_group(required=True)
    g.add_argument("--listen", metavar="PATH", help="listen for vmbusd (`vmbusd attach PATH`)")
    g.add_argument("--connect", metavar="PATH", help="connect to `vmbusd serve --listen PATH`")
    v.add_argument(
        "--workload",
        choices=["echo", "idle", "soak", "disk-soak"],
        default="echo",
        help="echo: push mixed-size traffic through every echo channel, verify it, exit; "
        "idle: negotiate, open every offered channel, wait for SIGTERM or Ctrl-C; "
        "soak: echo verified rounds on every echo channel at once until SIGTERM or Ctrl-C, "
        "finish the round, exit 0 if every packet came back once and in order; "
        "disk-soak: write sequence-numbered, checksummed 4 KiB blocks (QD 8, FUA and "
        "SYNCHRONIZE CACHE among them) to the first storvsc disk and read some back, until "
        "SIGTERM, Ctrl-C or --seconds; exit 1 on any error status, bad read, rescind or "
        "rescan (vmbus/guest/disk_soak.py)",
    )
    v.add_argument(
        "--ack-log",
        metavar="FILE",
        help="disk-soak: append 'seq block count' for every acknowledged write to FILE "
        "(for vmbus.guest.disk_soak.check_image; default: none)",
    )
    v.add_argument(
        "--seconds",
        type=_positive_float,
        metavar="S",
        help="disk-soak: stop after S seconds (default: at SIGTERM or Ctrl-C)",
    )
    v.add_argument("--packets", type=_packet_count, default=20000, help="echo packets to send")
    v.add_argument(
        "--name",
        default="sim",
        help="the VM's name in its attach hello: a config's [vm.NAME] list picks its devices",
    )
    v.add_argument(
        "--ring-size", type=_positive_int, default=256 * 1024, help="bytes per ring direction"
    )
    v.add_argument(
        "--json",
        metavar="FILE",
        help="also write the summary as JSON, '-' = stdout (default: no JSON)",
    )
    v.add_argument(
        "--nic-tap",
        metavar="NAME",
        help="bridge the VM's netvsc NIC to TAP device NAME (created, or attached if it "
        "exists) and stay idle: programs using NAME talk through VMBus to vmbusd's NIC "
        "backend (default: no TAP; implies --workload idle)",
    )
    v.add_argument(
        "--netns",
        metavar="NS",
        help="with --nic-tap: the existing network namespace (/run/netns/NS) the TAP is in "
        "(default: vmbusd vm's own)",
    )
    v.add_argument(
        "--export-nbd",
        metavar="DIR",
        help="serve each disk the guest's storvsc driver finds as an NBD server on "
        "DIR/storvsc<N>-lun<L>.sock (tools' I/O goes through VMBus to vmbusd's backends) "
        "and stay idle; the sockets are removed on exit (default: none; implies --workload idle)",
    )
    v.add_argument(
        "--reconnect-timeout",
        type=_positive_float,
        default=10.0,
        metavar="S",
        help="with --connect: when vmbusd goes away (crash or restart), keep the guest "
        "running and reconnect to the same socket, resuming the session; give up with "
        "exit status 2 after S seconds without vmbusd (default: 10)",
    )
    v.set_defaults(func=cmd_vm)

    d = add(
        "demo",
        "vmbusd and a simulated VM as two processes, echo traffic",
        "Build-free end-to-end check: start the service and a simulated VM as two processes "
        "joined by the attach protocol, negotiate VMBus, open an echo channel, push traffic of "
        "mixed sizes (1 byte to a quarter of the ring) both ways, verify every byte and the "
        "order; write and read back a 4 MiB RAM disk through storvsc; send frames through a "
        "netvsc NIC with the loopback backend (min(--packets, 2000)) and check each comes "
        "back; print a summary. Exit status 0 only if everything matched.",
    )
    d.add_argument("--packets", type=_packet_count, default=20000, help="packets to echo")
    d.add_argument(
        "--ring-size", type=_positive_int, default=256 * 1024, help="bytes per ring direction"
    )
    d.set_defaults(func=cmd_demo)

    t = add(
        "stats",
        "show a running service's per-channel counters",
        "Read the counters of `vmbusd serve --stats PATH`: every attached VM and open "
        "channel with packets, bytes, wake-ups, signals and ring-space waits.",
    )
    t.add_argument("path", metavar="PATH", help="the service's --stats socket")
    g2 = t.add_mutually_exclusive_group()
    g2.add_argument(
        "--json", action="store_true", help="print the raw JSON snapshot (default: a table)"
    )
    g2.add_argument(
        "--prometheus",
        action="store_true",
        help="print Prometheus text format (default: a table)",
    )
    t.set_defaults(func=cmd_stats)

    c = add(
        "ctl",
        "change a running service's VMs (add/remove a disk, NIC link, injected faults)",
        "Ask `vmbusd serve --control SOCK` to change an attached VM: `disk add` attaches a "
        "LUN to its storvsc controller (the same keys and checks as a [[device.lun]] table) "
        "and `disk remove` detaches one, the guest told with ENUMERATE_BUS; `nic link up|down` "
        "tells its netvsc NIC's guest the link state; `disk fault` and `nic impair` change a "
        "faulty LUN's or impair NIC's injected faults (docs/backends.md). "
        "One line out; exit 2 with the reason.",
    )
    c.add_argument("sock", metavar="SOCK", help="the service's --control socket")
    cw = c.add_subparsers(dest="what", required=True, metavar="WHAT", parser_class=_Parser)

    def target(q: argparse.ArgumentParser, kind: str) -> None:
        q.add_argument("--vm", required=True, metavar="NAME", help="the VM's name (or session id)")
        q.add_argument(
            "--device",
            type=int,
            default=0,
            metavar="N",
            help=f"which of the VM's {kind} devices, counted from 0",
        )

    disk = cw.add_parser("disk", help="add or remove a LUN", formatter_class=_Formatter)
    da = disk.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    dadd = da.add_parser("add", help="attach a LUN", formatter_class=_Formatter)
    target(dadd, "storvsc")
    dadd.add_argument("--lun", type=int, required=True, metavar="L", help="LUN number")
    dadd.add_argument(
        "--backend", default="memory", help="memory, file, nbd or a vmbusd.disk_backends name"
    )
    dadd.add_argument("--size", help="memory: size such as 64M (default: none)")
    dadd.add_argument("--path", help="file: the image (default: none)")
    dadd.add_argument("--readonly", action="store_true", help="file: read-only LUN")
    dadd.add_argument("--create-size", help="file: create it this big if missing (default: no)")
    dadd.add_argument("--uri", help="nbd: nbd+unix:///export?socket=PATH or nbd://host:port/export")
    dadd.add_argument("--serial", help="the unit serial number (default: derived)")
    drm = da.add_parser("remove", help="detach a LUN", formatter_class=_Formatter)
    target(drm, "storvsc")
    drm.add_argument("--lun", type=int, required=True, metavar="L", help="LUN number")
    dfault = da.add_parser(
        "fault",
        help="change a faulty LUN's injected faults (KEY=VALUE ...; none: show its counts)",
        formatter_class=_Formatter,
    )
    target(dfault, "storvsc")
    dfault.add_argument("--lun", type=int, required=True, metavar="L", help="LUN number")
    dfault.add_argument(
        "settings",
        nargs="*",
        metavar="KEY=VALUE",
        help="read_error_rate=0.01, read_fail_next=3, read_sense=not_ready, "
        "write_latency=5, power=cut|restore, stall=2|forever|off, ... (docs/backends.md)",
    )
    nic = cw.add_parser("nic", help="NIC link state, impairments", formatter_class=_Formatter)
    na = nic.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    link = na.add_parser("link", help="link up or down", formatter_class=_Formatter)
    link.add_argument("state", choices=("up", "down"))
    target(link, "netvsc")
    impair = na.add_parser(
        "impair",
        help="change an impair NIC's impairments (KEY=VALUE ...; none: show its counts)",
        formatter_class=_Formatter,
    )
    target(impair, "netvsc")
    impair.add_argument(
        "settings",
        nargs="*",
        metavar="KEY=VALUE",
        help="loss=0.02, delay_ms=10, jitter_ms=2, to_guest.loss=0.1, flap_up_s=5, ... "
        "(docs/backends.md)",
    )
    c.set_defaults(func=cmd_ctl)

    b = add(
        "bench",
        "benchmarks (ring, disk, net)",
        "ring: guest -> host -> guest echo through a real channel between two processes at "
        "64 B..64 KiB, native and pure-Python, with memcpy and AF_UNIX socketpair baselines "
        "measured in the same run. disk: storvsc 4K random / 128K sequential I/O on a memory "
        "and a file LUN through a real channel, native and pure-Python, with fio on the same "
        "file. net: netvsc frames (64/512/1500 B, 64 KiB LSO; 1 and 4 queues) through a "
        "loopback NIC, native and pure-Python, with AF_UNIX socketpair, veth iperf3 and "
        "vmbusd-path iperf3 baselines (root, iperf3). vms: 1, 10, 50 and 100 simulated VMs "
        "on one vmbusd, each reading its disk and bouncing frames off its NIC at once: "
        "aggregate rates, Jain's fairness, p99 latency, vmbusd's memory, fds and CPU per VM. "
        "A progress bar on a terminal, plain lines otherwise.",
    )
    b.add_argument("what", choices=["ring", "disk", "net", "vms"], help="which benchmark")
    b.add_argument(
        "--vms",
        type=_vm_counts,
        metavar="N,N,...",
        help="vms: the VM counts to measure (default: 1,10,50,100; 1,10 with --quick)",
    )
    b.add_argument(
        "--quick", action="store_true", help="short run, under 30 s (default: full, 2 s a point)"
    )
    b.add_argument("--json", metavar="FILE", help="write the records as JSON (default: print only)")
    b.add_argument(
        "--seconds",
        type=_positive_float,
        metavar="S",
        help="seconds per point, overrides --quick (default: 2, or 0.4 with --quick)",
    )
    b.add_argument(
        "--plot",
        metavar="PNG",
        help="also draw the results, needs the bench extra (default: no plot)",
    )
    b.set_defaults(func=cmd_bench)

    pl = add(
        "plugins",
        "list the devices and backends installed as plug-ins",
        "Every entry point in the groups vmbusd loads plug-ins from (vmbusd.devices, "
        "vmbusd.disk_backends, vmbusd.net_backends): group, name, the module:object it "
        "names, and the package that registered it. A config's `type = NAME` picks one.",
    )
    pl.set_defaults(func=cmd_plugins)

    gk = add(
        "guest-kernel",
        "build (or reuse) the Linux guest kernel for the KVM tier",
        "Fetch Debian's linux-source-6.1 at the pinned version with `apt-get download` "
        "(checked by SHA256), build a small x86-64 kernel from vmbus/kvm/guest-kernel.config "
        "on top of tinyconfig (Hyper-V drivers built in, unmodified), and cache vmlinux, "
        ".config and System.map under $XDG_CACHE_HOME/vmbusd (default ~/.cache/vmbusd) keyed "
        "by source version and config; a second run is instant. Prints vmlinux's path. "
        "Build tools missing: installed with apt-get as root, named (exit 2) otherwise.",
    )
    gk.add_argument(
        "--out", metavar="DIR", help="also copy vmlinux, .config, System.map here (default: no)"
    )
    gk.add_argument(
        "--source-deb",
        metavar="PATH",
        help="build from this linux-source-6.1 .deb instead of downloading the pinned "
        "version (for when apt no longer has it); at the pinned version its hash must match "
        "(default: apt-get download the pin)",
    )
    gk.set_defaults(func=cmd_guest_kernel)

    k = add(
        "kvm",
        "boot the real Linux guest on KVM against `vmbusd serve`",
        "Start a KVM VM (guest RAM a sealed memfd, Hyper-V emulated in user space, ACPI with "
        "the VMBus device, a 16550 console) that boots the guest kernel's vmlinux and speaks "
        "the attach protocol's VMM side to `vmbusd serve --listen SOCK`, so the guest's "
        "unmodified hv_vmbus finds every device vmbusd offers. Prints the console. Exit 0 "
        "when the console matches --until, 1 at the timeout or any other end.",
    )
    k.add_argument(
        "--connect",
        metavar="SOCK",
        help="`vmbusd serve`'s socket (default: none, which only --snapshot accepts)",
    )
    k.add_argument(
        "--kernel",
        metavar="VMLINUX",
        help="the guest's vmlinux (default: the cached `vmbusd guest-kernel` build)",
    )
    k.add_argument("--mem", default="256M", help="guest RAM, a multiple of 2M")
    k.add_argument("--cpus", type=_positive_int, default=1, help="vCPUs")
    k.add_argument(
        "--console",
        metavar="FILE",
        help="write the console here and print only its last lines (default: print it all)",
    )
    k.add_argument("--append", default="", help="more kernel command line (default: none)")
    k.add_argument(
        "--until",
        metavar="REGEX",
        help="stop with exit 0 when the console matches (default: run until the timeout)",
    )
    k.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="S",
        help="stop with exit 1 after S seconds (default: none)",
    )
    ks = k.add_mutually_exclusive_group()
    ks.add_argument(
        "--snapshot",
        metavar="FILE",
        help="boot to the guest's first SynIC register write (before VMBus starts), save the "
        "VM there and exit; no --connect (default: no snapshot)",
    )
    ks.add_argument(
        "--restore",
        metavar="FILE",
        help="resume a --snapshot instead of booting (its RAM, vCPUs and command line; "
        "--kernel, --mem, --cpus, --append are not used) (default: boot)",
    )
    k.add_argument(
        "--reconnect-timeout",
        type=_positive_float,
        default=10.0,
        metavar="S",
        help="when vmbusd goes away (crash or restart), keep the guest running and "
        "reconnect to the same socket, resuming the session; give up with exit status 2 "
        "after S seconds without vmbusd (default: 10)",
    )
    k.set_defaults(func=cmd_kvm)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Exit 0 on success, 2 on a user's mistake (one line on stderr),
    128+signal when SIGTERM/SIGINT cut a finite job short; a bug keeps its traceback."""
    args = build_parser().parse_args(argv)
    verbose, quiet = getattr(args, "verbose", 0), getattr(args, "quiet", 0)
    _setup_logging(verbose - quiet)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    prog = f"vmbusd {args.cmd}"
    say = _Say(prog, quiet=quiet > 0)
    # SIGTERM outside trio (bench, start-up) stops like Ctrl-C: `finally` blocks run.
    signal.signal(signal.SIGTERM, raise_interrupted)
    try:
        return int(args.func(args, say) or 0)
    except BaseException as exc:
        msg = user_message(exc)
        if msg is not None:
            print(f"{prog}: {msg}", file=sys.stderr, flush=True)
            return EXIT_USAGE
        stop = stop_signal(exc)
        if stop is None:
            raise
        signum = stop.signum if isinstance(stop, Interrupted) else signal.SIGINT
        summary = (stop.summary if isinstance(stop, Interrupted) else "") or "stopped"
        print(f"{prog}: {signal.Signals(signum).name}: {summary}", file=sys.stderr, flush=True)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
