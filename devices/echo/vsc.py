"""The echo device's guest side (VSC) for the simulated VM: mixed traffic, verified."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from devices.echo.protocol import ECHO_IF_TYPE
from vmbus.guest.drivers import register
from vmbus.guest.workloads import echo_mixed

if TYPE_CHECKING:
    from vmbus.guest.vm import GuestOffer, SimulatedVm


@register
@dataclass
class EchoVsc:
    """Opens the channel, pushes `packets` mixed-size packets, checks every echo."""

    if_type: ClassVar = ECHO_IF_TYPE
    name: ClassVar[str] = "echo"
    packets: int = 20000
    ring_size: int = 256 * 1024

    async def probe(self, vm: SimulatedVm, offer: GuestOffer) -> dict[str, Any]:
        gch = await vm.open_channel(offer, self.ring_size)
        try:
            res = await echo_mixed(gch.channel, self.packets, self.ring_size // 4 - 64)
        finally:
            await vm.close_channel(gch)
        st = gch.channel.stats
        return {
            "driver": self.name,
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
