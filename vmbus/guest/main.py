"""`vmbusd vm`: run the simulated VM with a workload, print or write a summary."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import trio

from devices.echo import ECHO_IF_TYPE
from vmbus import attach
from vmbus.guest.vm import SimulatedVm
from vmbus.guest.workloads import EchoMismatch, echo_mixed

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


async def run_echo(vm: SimulatedVm, packets: int, ring_size: int) -> dict[str, Any]:
    offers = vm.find_offers(ECHO_IF_TYPE)
    if not offers:
        raise EchoMismatch("the host offered no echo channel")
    max_payload = ring_size // 4 - 64
    results = []
    for offer in offers:
        gch = await vm.open_channel(offer, ring_size)
        try:
            res = await echo_mixed(gch.channel, packets, max_payload)
        finally:
            await vm.close_channel(gch)
        st = gch.channel.stats
        results.append(
            {
                "relid": offer.relid,
                "packets": res.packets,
                "bytes": res.bytes,
                "seconds": res.seconds,
                "completions": res.completions,
                "packets_per_s": res.packets_per_s,
                "bytes_per_s": res.bytes_per_s,
                "guest_wakeups": st.wakeups,
                "guest_signals": st.signals_sent,
            }
        )
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
                summary.update(await run_echo(vm, packets, ring_size))
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
