"""Counters out of a running service: a snapshot, its renderings, and two small servers.

The snapshot is plain data (VMs, their open channels and counters); `render_table` and
`render_prometheus` are pure functions of it (the latter through prometheus-client, so
the exposition is the library's, not ours). `serve_stats` answers one document per
connection on a private unix socket (`vmbusd stats PATH` reads it); `serve_metrics`
is a minimal HTTP endpoint for Prometheus (`GET /metrics`), meant for loopback.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket as _stdsocket
import struct
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry

from vmbus.cliutil import UserError, claim_socket_path, describe_bind_error, os_reason

log = logging.getLogger(__name__)

MAX_REQUEST = 4096  # bytes of a stats or HTTP request we read at most
REQUEST_TIMEOUT_S = 5.0
FORMATS = ("json", "prometheus")

Snapshot = dict[str, Any]

# (snapshot key, Prometheus name, help); all per-channel counters only go up.
CHANNEL_COUNTERS = (
    ("packets_in", "vmbusd_channel_packets_in_total", "Packets received from the guest"),
    ("bytes_in", "vmbusd_channel_bytes_in_total", "Ring bytes received from the guest"),
    ("batches_in", "vmbusd_channel_batches_in_total", "Receive batches (one per wake-up or poll)"),
    ("packets_out", "vmbusd_channel_packets_out_total", "Packets sent to the guest"),
    ("bytes_out", "vmbusd_channel_bytes_out_total", "Ring bytes sent to the guest"),
    ("signals_sent", "vmbusd_channel_signals_sent_total", "Signals (interrupts) sent to the guest"),
    (
        "signals_suppressed",
        "vmbusd_channel_signals_suppressed_total",
        "Writes that needed no signal (ring not empty or guest masked)",
    ),
    ("wakeups", "vmbusd_channel_wakeups_total", "Times the channel task slept and was woken"),
    (
        "spurious_wakeups",
        "vmbusd_channel_spurious_wakeups_total",
        "Wake-ups that found the ring empty (a guest kicking for nothing)",
    ),
    ("polls_hit", "vmbusd_channel_polls_hit_total", "Idle polls that found work (wake-ups saved)"),
    ("space_waits", "vmbusd_channel_space_waits_total", "Sends that waited for ring space"),
    ("errors", "vmbusd_channel_errors_total", "Ring errors (the channel was reset)"),
)


class SnapshotCollector(Collector):
    """A prometheus-client collector over our snapshot: built at scrape time, so the
    series are exactly the VMs and channels open now (a closed channel's go away).

    Every series carries `vm` (the VMM's name for its VM, which need not be unique)
    and `session` (unique per attach session), so two VMs both called "sim" never
    collide."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        yield GaugeMetricFamily("vmbusd_vms", "Attached VMs", value=len(snap["vms"]))
        vm_labels = ["vm", "session"]
        open_ = GaugeMetricFamily("vmbusd_channels_open", "Open channels", labels=vm_labels)
        resets = CounterMetricFamily(
            "vmbusd_channel_resets_total",
            "Channels reset after a ring error or a device failure",
            labels=vm_labels,
        )
        for vm in snap["vms"]:
            ident = [str(vm["vm"]), str(vm.get("session", ""))]
            open_.add_metric(ident, len(vm["channels"]))
            resets.add_metric(ident, vm["resets"])
        yield open_
        yield resets
        hits = CounterMetricFamily(
            "vmbusd_limit_hits_total",
            "Times a VM hit one of its limits (vmbus.limits): refusals and back-pressure waits",
            labels=[*vm_labels, "limit"],
        )
        for vm in snap["vms"]:
            for limit, n in vm.get("limits", {}).get("hits", {}).items():
                hits.add_metric([str(vm["vm"]), str(vm.get("session", "")), limit], n)
        yield hits
        ch_labels = [*vm_labels, "relid", "device", "sub"]
        for key, name, help_ in CHANNEL_COUNTERS:
            fam = CounterMetricFamily(name, help_, labels=ch_labels)
            for vm in snap["vms"]:
                for ch in vm["channels"]:
                    fam.add_metric(
                        [
                            str(vm["vm"]),
                            str(vm.get("session", "")),
                            str(ch["relid"]),
                            str(ch["device"]),
                            str(ch["sub_channel"]),
                        ],
                        ch["stats"].get(key, 0),
                    )
            yield fam
        yield from _fault_families(snap)
        yield from _switch_families(snap)


def fault_snapshot(devices: Iterable[object]) -> list[dict[str, Any]]:
    """The counters of a VM's fault injectors (faulty disks, impair NICs): every
    backend with a `fault_counters()`, found as a NIC's `backend` or a storvsc
    controller's LUN backend; `index` counts devices of one kind from 0."""
    out: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for dev in devices:
        kind = str(getattr(dev, "name", "?"))
        index = seen[kind] = seen.get(kind, -1) + 1
        found: list[tuple[int | None, object]] = [(None, getattr(dev, "backend", None))]
        controller = getattr(dev, "controller", None)
        luns = getattr(controller, "luns", None)  # a storvsc ScsiController
        if controller is not None and isinstance(luns, list):
            found += [(lun, controller.disk(lun).backend) for lun in luns]
        for lun, backend in found:
            counters = getattr(backend, "fault_counters", None)
            if callable(counters):
                out.append({"device": kind, "index": index, "lun": lun, "counters": counters()})
    return out


def switch_snapshot(devices: Iterable[object]) -> list[dict[str, Any]]:
    """The switch ports of a VM's NICs: every backend with a `switch_counters()` (the
    switch backend), found as a NIC's `backend` or inside it (`inner`: an impair NIC
    in front of a switch); `index` counts devices of one kind from 0, as in
    fault_snapshot. A NIC that has not joined its switch yet gives nothing."""
    out: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for dev in devices:
        kind = str(getattr(dev, "name", "?"))
        index = seen[kind] = seen.get(kind, -1) + 1
        backend = getattr(dev, "backend", None)
        for _ in range(8):  # wrappers in front of wrappers, but never a cycle
            if backend is None:
                break
            counters = getattr(backend, "switch_counters", None)
            port = counters() if callable(counters) else None
            if port is not None:
                out.append({"device": kind, "index": index, **port})
            backend = getattr(backend, "inner", None)
    return out


# (PortCounters field, Prometheus name, help) of the switch ports' counters
SWITCH_PORT_COUNTERS = (
    ("rx_frames", "vmbusd_switch_port_frames_in_total", "Frames from the guest into the switch"),
    (
        "tx_frames",
        "vmbusd_switch_port_frames_out_total",
        "Frames the switch delivered to the guest",
    ),
    (
        "flooded",
        "vmbusd_switch_port_flooded_total",
        "Frames from the guest flooded to every other port of their VLAN",
    ),
    (
        "learned",
        "vmbusd_switch_port_learned_total",
        "Source MACs learned on the port (new, or moved to it)",
    ),
)
# (PortCounters field, `reason` label) of vmbusd_switch_port_dropped_total
SWITCH_PORT_DROPS = (
    ("dropped_queue", "queue"),  # towards the guest: its queue was full (or not running)
    ("dropped_mtu", "mtu"),  # towards the guest: bigger than its MTU
    ("dropped_vlan", "vlan"),  # from the guest: a VLAN the port does not carry
    ("dropped_local", "local"),  # from the guest: to a MAC learned on its own port
    ("dropped_runt", "runt"),  # from the guest: shorter than an Ethernet header
)


def _switch_families(snap: Snapshot) -> Iterator[Metric]:
    """vmbusd_switch_port_*{switch,port}: each NIC's port on its switch backend."""
    labels = ["vm", "session", "device", "index", "switch", "port"]
    counters = {
        key: CounterMetricFamily(name, help_, labels=labels)
        for key, name, help_ in SWITCH_PORT_COUNTERS
    }
    drops = CounterMetricFamily(
        "vmbusd_switch_port_dropped_total",
        "Frames the switch dropped at the port, by reason",
        labels=[*labels, "reason"],
    )
    macs = GaugeMetricFamily(
        "vmbusd_switch_port_macs", "MACs the switch's table has on the port now", labels=labels
    )
    for vm in snap["vms"]:
        for p in vm.get("switch_ports", []):
            ident = [
                str(vm["vm"]),
                str(vm.get("session", "")),
                p["device"],
                str(p["index"]),
                p["switch"],
                p["port"],
            ]
            for key, fam in counters.items():
                fam.add_metric(ident, p["counters"].get(key, 0))
            for key, reason in SWITCH_PORT_DROPS:
                drops.add_metric([*ident, reason], p["counters"].get(key, 0))
            macs.add_metric(ident, p["macs"])
    yield from counters.values()
    yield drops
    yield macs


def _fault_families(snap: Snapshot) -> Iterator[Metric]:
    """vmbusd_disk_faults_total{lun,kind} and vmbusd_nic_faults_total{direction,kind}."""
    labels = ["vm", "session", "device", "index"]
    disk = CounterMetricFamily(
        "vmbusd_disk_faults_total",
        "Faults a faulty disk backend injected, by kind",
        labels=[*labels, "lun", "kind"],
    )
    nic = CounterMetricFamily(
        "vmbusd_nic_faults_total",
        "Frames an impair network backend dropped, delayed, reordered, duplicated or "
        "corrupted (and link flaps), by direction and kind",
        labels=[*labels, "direction", "kind"],
    )
    for vm in snap["vms"]:
        for f in vm.get("faults", []):
            ident = [str(vm["vm"]), str(vm.get("session", "")), f["device"], str(f["index"])]
            for key, n in f["counters"].items():
                if f["lun"] is not None:
                    disk.add_metric([*ident, str(f["lun"]), key], n)
                else:
                    direction, _, kind = key.partition(".")
                    nic.add_metric([*ident, direction, kind], n)
    yield disk
    yield nic


def _registry(snap: Callable[[], Snapshot]) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SnapshotCollector(snap))
    return reg


def render_prometheus(snap: Snapshot, accept: str = "") -> str:
    """The Prometheus exposition of a snapshot (text 0.0.4 unless `accept` asks for
    OpenMetrics), written by prometheus-client."""
    encoder, _ctype = choose_encoder(accept)
    return encoder(_registry(lambda: snap)).decode()


def render_table(snap: Snapshot) -> str:
    """A human table: one line per open channel."""
    lines = [f"{len(snap['vms'])} VM(s) attached"]
    for vm in snap["vms"]:
        session = f", session {vm['session']}" if vm.get("session") else ""
        lines.append(
            f"\n{vm['vm']}: VMBus {vm['version']}, {vm['vcpus']} vCPU(s), "
            f"{len(vm['channels'])} open channel(s), {vm['resets']} reset(s){session}"
        )
        if not vm["channels"]:
            continue
        lines.append(
            f"  {'relid':>5} {'device':<10} {'sub':>3} {'pkts in':>12} {'pkts out':>12}"
            f" {'MB in':>9} {'MB out':>9} {'wakeups':>9} {'signals':>9} {'waits':>7}"
        )
        for ch in vm["channels"]:
            st = ch["stats"]
            lines.append(
                f"  {ch['relid']:>5} {ch['device']:<10} {ch['sub_channel']:>3}"
                f" {st['packets_in']:>12,} {st['packets_out']:>12,}"
                f" {st['bytes_in'] / 1e6:>9.1f} {st['bytes_out'] / 1e6:>9.1f}"
                f" {st['wakeups']:>9,} {st['signals_sent']:>9,} {st['space_waits']:>7,}"
            )
    return "\n".join(lines)


def render(snap: Snapshot, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(snap, indent=1)
    if fmt == "prometheus":
        return render_prometheus(snap)
    raise ValueError(f"unknown stats format {fmt!r}")


# -- servers -------------------------------------------------------------------------


async def _read_request(stream: trio.SocketStream, end: bytes = b"\n") -> bytes:
    """Up to MAX_REQUEST bytes, until `end` or EOF, bounded in time."""
    buf = b""
    with trio.move_on_after(REQUEST_TIMEOUT_S):
        while len(buf) < MAX_REQUEST and end not in buf:
            chunk = await stream.receive_some(MAX_REQUEST - len(buf))
            if not chunk:
                break
            buf += chunk
    return buf


def _peer_uid(sock: trio.socket.SocketType) -> int:
    raw = sock.getsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_PEERCRED, struct.calcsize("3i"))
    uid: int = struct.unpack("3i", raw)[1]
    return uid


async def serve_stats(
    path: str,
    snapshot: Callable[[], Snapshot],
    *,
    allowed_uids: Iterable[int] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A private unix socket: a client writes 'json' or 'prometheus' and a newline, and
    gets that document, then EOF. Same access rule as the attach socket.

    A stale socket file at `path` is replaced; a live one (another service's) or any
    other file is refused with a UserError. The file is removed when this ends."""
    await serve_unix(
        path,
        "stats socket",
        lambda stream, allowed: _answer_stats(stream, snapshot, allowed),
        allowed_uids,
        task_status,
    )


async def serve_unix(
    path: str,
    what: str,
    answer: Callable[[trio.SocketStream, set[int]], Awaitable[None]],
    allowed_uids: Iterable[int] | None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A 0600 Unix stream socket whose connections `answer` serves (with the allowed
    uids), for the stats and control sockets: a stale file is replaced, a live one
    refused with a UserError, and the file is removed when this ends if still ours."""
    allowed = set(allowed_uids) if allowed_uids is not None else {os.getuid()}
    claim_socket_path(path, _stdsocket.SOCK_STREAM, what=what)
    sock = trio.socket.socket(_stdsocket.AF_UNIX, _stdsocket.SOCK_STREAM)
    try:
        os.fchmod(sock.fileno(), 0o600)  # the file is born 0600 (see attach.listen)
        await sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(16)
    except OSError as exc:
        sock.close()
        raise UserError(describe_bind_error(path, exc, what=what)) from exc
    st = os.stat(path)
    ours = (st.st_dev, st.st_ino)
    listener = trio.SocketListener(sock)
    task_status.started()
    try:
        async with trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                nursery.start_soon(answer, stream, allowed)
    finally:
        # No await here: this runs cancelled (shutdown), and a checkpoint would raise
        # before the file is gone. Remove it only while it is still ours.
        sock.close()
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) == ours:
                os.unlink(path)
        except OSError:
            pass


async def _answer_stats(
    stream: trio.SocketStream, snapshot: Callable[[], Snapshot], allowed: set[int]
) -> None:
    async with stream:
        try:
            if _peer_uid(stream.socket) not in allowed:
                log.warning("stats: refused a peer whose uid is not allowed")
                return
            fmt = (await _read_request(stream)).strip().decode("ascii", "replace") or "json"
            if fmt not in FORMATS:
                await stream.send_all(f"error: format must be one of {FORMATS}\n".encode())
                return
            await stream.send_all(render(snapshot(), fmt).encode())
        except (trio.BrokenResourceError, OSError):
            pass


async def serve_metrics(
    host: str,
    port: int,
    snapshot: Callable[[], Snapshot],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """GET /metrics in the Prometheus format; anything else is 404. Started: the port.

    A port that cannot be bound (in use, privileged) is a UserError naming it."""
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        hint = " (another process uses it: choose another port, or 0 for any)"
        raise UserError(
            f"cannot serve metrics on {host}:{port}: {os_reason(exc)}"
            + (hint if exc.errno == errno.EADDRINUSE else "")
        ) from exc
    task_status.started(listeners[0].socket.getsockname()[1])

    async def handler(stream: trio.SocketStream) -> None:
        await _answer_http(stream, snapshot)

    await trio.serve_listeners(handler, listeners)


async def _answer_http(stream: trio.SocketStream, snapshot: Callable[[], Snapshot]) -> None:
    async with stream:
        try:
            req = await _read_request(stream, b"\r\n\r\n")
            head_lines = req.split(b"\r\n")
            line = head_lines[0].split(b" ")
            accept = ""
            for h in head_lines[1:]:
                name, _, value = h.partition(b":")
                if name.strip().lower() == b"accept":
                    accept = value.strip().decode("latin-1")
            if len(line) >= 2 and line[0] == b"GET" and line[1].split(b"?")[0] == b"/metrics":
                encoder, ctype = choose_encoder(accept)
                body = encoder(_registry(snapshot))
                head = (
                    "HTTP/1.1 200 OK\r\n"
                    f"Content-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                )
            else:
                body = b"not found\n"
                head = (
                    "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                )
            await stream.send_all(head.encode() + body)
        except (trio.BrokenResourceError, OSError):
            pass


def fetch(path: str, fmt: str = "json") -> str:
    """Client side of the stats socket (`vmbusd stats`)."""
    with _stdsocket.socket(_stdsocket.AF_UNIX, _stdsocket.SOCK_STREAM) as s:
        s.settimeout(REQUEST_TIMEOUT_S)
        s.connect(path)
        s.sendall(fmt.encode() + b"\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()
