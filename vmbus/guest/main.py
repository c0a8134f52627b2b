"""`vmbusd vm`: run the simulated VM with a workload, print or write a summary.

SIGTERM or Ctrl-C stops it the way a guest shuts down: its open channels are closed
and VMBus is unloaded (bounded in time), a --listen socket file is removed, and one
line says what was cut short.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import uuid
from collections.abc import Callable
from typing import Any

import trio

from vmbus import attach
from vmbus.cliutil import (
    STOP_SIGNALS,
    Stopped,
    UserError,
    check_writable,
    claim_socket_path,
    describe_bind_error,
    describe_connect_error,
)
from vmbus.guest.drivers import GuestDriver, driver_for
from vmbus.guest.vm import RECONNECT_TIMEOUT_S, GuestChannel, HostError, SimulatedVm
from vmbus.guest.workloads import EchoMismatch, echo_mixed

log = logging.getLogger(__name__)

LEAVE_TIMEOUT_S = 2.0  # closing channels and unloading on a signal, at most
SOAK_ROUND = 2000  # soak: packets per verified round on each channel
SOAK_DRAIN_S = 10.0  # soak: after SIGTERM, the round in flight must finish within this
IDLE_POLL_S = 0.2  # how often an idle VM looks whether vmbusd has left


def version_str(v: int | None) -> str:
    return "none" if v is None else f"{v >> 16}.{v & 0xFFFF}"


async def _connection(listen: str | None, connect: str | None) -> attach.AttachConnection:
    """Connect to a listening vmbusd, or listen for one; a bad path is a UserError."""
    if connect:
        try:
            return await attach.connect(connect)
        except OSError as exc:
            raise UserError(describe_connect_error(connect, exc)) from exc
    assert listen
    claim_socket_path(listen, what="attach socket")
    try:
        listener = await attach.listen(listen)
    except OSError as exc:
        raise UserError(describe_bind_error(listen, exc, what="attach socket")) from exc
    try:
        return await listener.accept()
    finally:
        await listener.aclose()  # removes the socket file before its checkpoint


async def run_drivers(vm: SimulatedVm, packets: int, ring_size: int) -> dict[str, Any]:
    """Probe the registered guest driver of every offer, one after another."""
    import devices.echo.vsc  # noqa: F401  (registers the echo VSC)
    from devices.netvsc import vsc as _netvsc_vsc  # noqa: F401  (registers the netvsc VSC)
    from devices.storvsc import vsc as _storvsc_vsc  # noqa: F401  (registers the storvsc VSC)

    results = []
    for offer in sorted(vm.offers.values(), key=lambda o: o.relid):
        drv = driver_for(offer.if_type)
        if drv is None:
            log.info("no guest driver for %s (relid %d)", offer.if_type, offer.relid)
            continue
        make: Callable[..., GuestDriver] = drv  # drivers take their workload's knobs
        results.append(await make(packets=packets, ring_size=ring_size).probe(vm, offer))
    if not results:
        raise EchoMismatch("the host offered no device this guest has a driver for")
    return {"channels": results}


async def _open_all(
    vm: SimulatedVm, ring_size: int, skip: frozenset[uuid.UUID] = frozenset()
) -> list[GuestChannel]:
    """The idle workload: open every channel the host offered, as a guest's drivers would
    (but those of interface types in `skip`, which a driver already has)."""
    opened = []
    for offer in sorted(vm.offers.values(), key=lambda o: o.relid):
        if not offer.rescinded and offer.if_type not in skip:
            opened.append(await vm.open_channel(offer, ring_size))
    return opened


def _drop_channels(vm: SimulatedVm) -> None:
    """Let go of our side of every channel without telling anyone (the peer is gone)."""
    for gch in list(vm.channels.values()):
        gch.channel.release()
        gch.mapping.close()
    vm.channels.clear()


async def _leave(vm: SimulatedVm) -> int:
    """A guest shutting down: close what is open, unload VMBus. Bounded; returns how
    many channels were closed. With vmbusd gone (or away, while we would reconnect),
    only our side is released."""
    closed = 0
    try:
        with trio.move_on_after(LEAVE_TIMEOUT_S):
            for gch in list(vm.channels.values()):
                if vm.closed_reason is not None or not vm.link_up:
                    break
                await vm.close_channel(gch)
                closed += 1
            if vm.version is not None and vm.closed_reason is None and vm.link_up:
                await vm.unload()
    except (attach.AttachError, HostError, OSError) as exc:
        log.info("leaving: vmbusd went away first: %s", exc)
    _drop_channels(vm)
    return closed


async def _watch_lost(vm: SimulatedVm, work: trio.CancelScope, workload: str) -> None:
    """Stop the workload when the session is over for good (vmbusd did not come
    back, or ended it): an echo workload would otherwise wait on its rings forever.
    The idle workload watches `closed_reason` itself, but a give-up stops it too."""
    await vm.lost.wait()
    if workload in ("echo", "soak", "disk-soak") or vm.gave_up:
        work.cancel()


async def _watch(
    signals: Any, work: trio.CancelScope, stopped: Stopped, drain: trio.Event | None = None
) -> None:
    """A stop signal cancels the work; with `drain` (soak) it first asks the work to
    finish its round, and cancels only after SOAK_DRAIN_S."""
    async for signum in signals:
        stopped.signum = signum
        if drain is not None:
            drain.set()
            await trio.sleep(SOAK_DRAIN_S)
        work.cancel()
        return


async def soak(vm: SimulatedVm, ring_size: int, stop: trio.Event) -> dict[str, Any]:
    """The restart tests' load: every echo channel at once, rounds of SOAK_ROUND
    sequence-numbered (trans_id 1..n), mixed-size packets with a new byte pattern each
    round, every echo checked for order and bytes, until `stop`; then the round in
    flight is finished, so every packet sent came back exactly once and in order."""
    from devices.echo.protocol import ECHO_IF_TYPE

    offers = vm.find_offers(ECHO_IF_TYPE)
    if not offers:
        raise EchoMismatch("the host offered no echo device")
    chans = [await vm.open_channel(o, ring_size) for o in offers]
    out: list[dict[str, Any]] = []

    async def one(gch: GuestChannel) -> None:
        rounds = packets = 0
        while not stop.is_set():
            res = await echo_mixed(gch.channel, SOAK_ROUND, ring_size // 4 - 64, seed=rounds)
            rounds += 1
            packets += res.packets
        out.append({"relid": gch.offer.relid, "rounds": rounds, "packets": packets})

    async with trio.open_nursery() as nursery:
        for gch in chans:
            nursery.start_soon(one, gch)
    for gch in chans:
        await vm.close_channel(gch)
    return {"channels": sorted(out, key=lambda c: c["relid"])}


def _echo_line(summary: dict[str, Any]) -> str:
    chans = "; ".join(
        f"{ch['driver']} relid {ch['relid']}: {ch['packets']} packets, {ch['bytes']} bytes each way"
        for ch in summary["channels"]
    )
    return f"VMBus {summary['version']}, {summary['offers']} offer(s); {chans}; all verified"


async def run_vm(
    *,
    listen: str | None,
    connect: str | None,
    workload: str,
    packets: int,
    ring_size: int,
    json_out: str | None,
    say: Callable[[str], None] | None = None,
    nic_tap: str | None = None,
    netns: str | None = None,
    export_nbd: str | None = None,
    vm_id: str = "sim",
    reconnect_timeout: float = RECONNECT_TIMEOUT_S,
    ack_log: str | None = None,
    seconds: float | None = None,
) -> int:
    """Exit status: 0 done (or idle stopped by a signal), 1 the workload failed,
    2 vmbusd went away and did not come back within `reconnect_timeout` (with
    --connect the VM outlives its vmbusd: it reconnects and resumes), 128+signal
    when a signal cut the echo workload short; a bad path raises UserError."""
    if say is None:

        def say(line: str) -> None:
            print(f"vmbusd vm: {line}", file=sys.stderr, flush=True)

    if json_out and json_out != "-":
        check_writable(json_out, "--json")  # before the run, not after it
    if ack_log is not None:
        check_writable(ack_log, "--ack-log")
    if export_nbd is not None:
        from devices.storvsc.nbd_export import NbdExports, check_export_dir

        check_export_dir(export_nbd)
    exports: NbdExports | None = None

    async def again() -> attach.AttachConnection:
        assert connect is not None
        return await attach.connect(connect)

    vm = SimulatedVm(
        vm_id=vm_id,
        reconnect=again if connect else None,
        reconnect_timeout=reconnect_timeout,
    )
    summary: dict[str, Any] = {"ok": False}
    status = 1
    stopped = Stopped()
    problem: UserError | None = None
    try:
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            async with trio.open_nursery() as nursery:
                work = trio.CancelScope()
                drain = trio.Event() if workload in ("soak", "disk-soak") else None
                nursery.start_soon(_watch, signals, work, stopped, drain)
                nursery.start_soon(_watch_lost, vm, work, workload)
                try:
                    with work:
                        conn = await _connection(listen, connect)
                        await vm.start(conn, nursery)
                        summary["restartable"] = vm.saved_state
                        summary["version"] = version_str(vm.version)
                        summary["offers"] = len(vm.offers)
                        if workload == "echo":
                            summary.update(await run_drivers(vm, packets, ring_size))
                            await vm.unload()
                            summary["ok"] = True
                            status = 0
                            say(_echo_line(summary))
                        elif workload == "soak":
                            assert drain is not None
                            say(f"VMBus {summary['version']}: soak until SIGTERM or Ctrl-C")
                            summary.update(await soak(vm, ring_size, drain))
                            await vm.unload()
                            summary["ok"] = True
                            status = 0
                            total = sum(c["packets"] for c in summary["channels"])
                            say(f"soak: {total} packets echoed, each exactly once, in order")
                        elif workload == "disk-soak":
                            from vmbus.guest.disk_soak import disk_soak

                            assert drain is not None
                            say(f"VMBus {summary['version']}: disk-soak until SIGTERM or Ctrl-C")
                            summary.update(
                                await disk_soak(vm, drain, ack_log=ack_log, seconds=seconds)
                            )
                            await vm.unload()
                            summary["ok"] = True
                            status = 0
                            say(
                                f"disk-soak: {summary['writes']} writes acknowledged, "
                                f"{summary['reads_verified']} read back, all verified"
                            )
                        else:
                            skip: frozenset[uuid.UUID] = frozenset()
                            if nic_tap is not None:  # the NIC bridged to a TAP, then idle
                                from devices.netvsc.tap_bridge import bridge_nic_to_tap
                                from devices.netvsc.vsp import NETVSC_IF_TYPE

                                await nursery.start(bridge_nic_to_tap, vm, nic_tap, netns, say)
                                skip = frozenset({NETVSC_IF_TYPE})
                            if export_nbd is not None:  # the guest's disks as NBD servers
                                from devices.storvsc.nbd_export import export_disks
                                from devices.storvsc.protocol import SCSI_IF_TYPE

                                exports = await nursery.start(export_disks, vm, export_nbd, say)
                                skip |= {SCSI_IF_TYPE}
                            opened = await _open_all(vm, ring_size, skip)
                            summary["channels_open"] = len(opened)
                            say(
                                f"VMBus {summary['version']}, {len(vm.offers)} offer(s), "
                                f"{len(opened)} channel(s) open; idle until SIGTERM or Ctrl-C"
                            )
                            # SimulatedVm has no event for "vmbusd ended the session":
                            # look a few times a second (idle is idle).
                            while vm.closed_reason is None:
                                await trio.sleep(IDLE_POLL_S)
                            _drop_channels(vm)
                            status = 0
                            summary["ok"] = True
                            say(f"vmbusd ended the session ({vm.closed_reason})")
                    summary["reconnects"] = vm.reconnects
                    summary["rescinds"] = sum(o.rescinded for o in vm.offers.values())
                    if vm.gave_up:
                        summary["error"] = vm.closed_reason
                        say(f"error: {vm.closed_reason}")
                        status = 2
                    elif work.cancelled_caught and stopped.signum is None:
                        summary["error"] = f"vmbusd ended the session ({vm.closed_reason})"
                        say(f"error: {summary['error']}")
                        status = 1
                    if exports is not None:  # sockets gone, HBAs closed, before leaving
                        await exports.aclose()
                    if stopped.signum is not None and not summary["ok"]:
                        closed = await _leave(vm)
                        name = signal.Signals(stopped.signum).name
                        if workload == "idle" and vm.version is not None:
                            status = 0
                            summary["ok"] = True
                            say(f"{name}: closed {closed} channel(s), unloaded VMBus, detached")
                        else:
                            status = 128 + stopped.signum
                            summary["error"] = f"stopped by {name} before the workload ended"
                            say(f"{name}: stopped before the workload ended; detached")
                except EchoMismatch as exc:
                    summary["error"] = str(exc)
                    print(f"vmbusd vm: MISMATCH: {exc}", file=sys.stderr)
                except UserError as exc:
                    summary["error"] = str(exc)
                    problem = exc
                except (attach.AttachError, HostError, OSError, trio.TooSlowError) as exc:
                    summary["error"] = f"{type(exc).__name__}: {exc}"
                    print(f"vmbusd vm: error: {summary['error']}", file=sys.stderr)
                nursery.cancel_scope.cancel()
    finally:
        _drop_channels(vm)  # a workload cut short (vmbusd gone for good) left some open
        vm.close()
    if json_out:
        text = json.dumps(summary)
        if json_out == "-":
            print(text)
        else:
            with open(json_out, "w") as f:
                f.write(text)
    if problem is not None:
        raise problem
    return status
