"""The echo device: the spine's end-to-end proof and the ring benchmark's peer.

Each inband packet comes back as it went: as VM_PKT_COMP with the same trans_id
when the sender asked for a completion, as VM_PKT_DATA_INBAND otherwise. Packets
move ring to ring in one native call per batch (`Channel.forward`): descriptors
are copied and validated, payloads are opaque to echo and never parsed.
"""

from __future__ import annotations

import logging
import uuid

from vmbus.channel import Channel
from vmbus.device import ChannelInfo, Device

log = logging.getLogger(__name__)

# A private interface GUID (not a Hyper-V class): vmbusd's test echo device.
ECHO_IF_TYPE = uuid.UUID("7f6b6a4e-9c1d-4f2e-8a53-5e2c0d1b7a10")


class EchoDevice(Device):
    if_type = ECHO_IF_TYPE
    name = "echo"
    packet_types = 1 << 6  # inband only: anything else poisons the channel

    async def serve(self, channel: Channel, info: ChannelInfo) -> None:
        while True:
            await channel.forward(complete=True)
