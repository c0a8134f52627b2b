"""`vmbusd vm`: run the simulated VM with a workload, print or write a summary."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import trio

from vmbus import attach
from vmbus.guest.drivers import driver_for
from vmbus.guest.vm import SimulatedVm
from vmbus.guest.workloads import EchoMismatch

log = logging.getLogger(__name__)


def version_str(v: int | None) -> str:
    return "none" if v is None else f"{v >> 16}.{v & 0xFFFF}"


async def _connection(listen: str | None, connect: str | None) -> attach.AttachConnection:
    if connect:
        return await attach.connect(connect)
    assert listen
    listener = await attach.listen(listen)
    try:
        return await listener.accept()
    finally:
        await listener.aclose()


async def run_drivers(vm: SimulatedVm, packets: int, ring_size: int) -> dict[str, Any]:
    """Probe the registered guest driver of every offer, one after another."""
    import devices.echo.vsc  # noqa: F401  (registers the echo VSC)

    results = []
    for offer in sorted(vm.offers.values(), key=lambda o: o.relid):
        drv = driver_for(offer.if_type)
        if drv is None:
            log.info("no guest driver for %s (relid %d)", offer.if_type, offer.relid)
            continue
        results.append(await drv(packets=packets, ring_size=ring_size).probe(vm, offer))
    if not results:
        raise EchoMismatch("the host offered no device this guest has a driver for")
    return {"channels": results}


async def run_vm(
    *,
    listen: str | None,
    connect: str | None,
    workload: str,
    packets: int,
    ring_size: int,
    json_out: str | None,
) -> int:
    vm = SimulatedVm()
    summary: dict[str, Any] = {"ok": False}
    status = 1
    try:
        conn = await _connection(listen, connect)
        async with trio.open_nursery() as nursery:
            await vm.start(conn, nursery)
            summary["version"] = version_str(vm.version)
            summary["offers"] = len(vm.offers)
            if workload == "echo":
                summary.update(await run_drivers(vm, packets, ring_size))
                await vm.unload()
                summary["ok"] = True
                status = 0
            else:
                print(
                    f"vm: VMBus {summary['version']}, {len(vm.offers)} offers; idle",
                    file=sys.stderr,
                )
                await trio.sleep_forever()
            nursery.cancel_scope.cancel()
    except EchoMismatch as exc:
        summary["error"] = str(exc)
        print(f"vm: MISMATCH: {exc}", file=sys.stderr)
    except (attach.AttachError, OSError, trio.TooSlowError) as exc:
        summary["error"] = f"{type(exc).__name__}: {exc}"
        print(f"vm: error: {summary['error']}", file=sys.stderr)
    finally:
        vm.close()
    if json_out:
        text = json.dumps(summary)
        if json_out == "-":
            print(text)
        else:
            with open(json_out, "w") as f:
                f.write(text)
    return status
