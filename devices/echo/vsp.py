"""The echo VSP: the spine's end-to-end proof and the ring benchmark's peer.

Packets move ring to ring in one native call per batch (`Channel.forward`):
descriptors are copied and validated, payloads are opaque and never copied into
vmbusd's memory.
"""

from __future__ import annotations

from devices.echo.protocol import ECHO_IF_TYPE, ECHO_PACKET_TYPES
from vmbus.channel import Channel
from vmbus.device import Device, DeviceContext


class EchoDevice(Device):
    if_type = ECHO_IF_TYPE
    name = "echo"
    packet_types = ECHO_PACKET_TYPES

    async def serve(self, channel: Channel, ctx: DeviceContext) -> None:
        while True:
            await channel.forward(complete=True)
