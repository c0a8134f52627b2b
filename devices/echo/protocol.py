"""The echo device's wire protocol, such as it is.

The guest sends inband packets (PacketType.INBAND); each one comes back as it went:
as a completion (PacketType.COMPLETION) with the same trans_id when the sender asked for one,
as an inband packet otherwise. Payloads are opaque: the host never parses them, so
there is nothing to validate beyond the descriptor, which the ring layer does.
"""

from __future__ import annotations

import uuid

from vmbus.packet import PacketType, packet_types_mask

# A private interface GUID (not a Hyper-V class): vmbusd's test echo device.
ECHO_IF_TYPE = uuid.UUID("7f6b6a4e-9c1d-4f2e-8a53-5e2c0d1b7a10")

# Inband only: any other packet type in the ring is a corrupt ring (channel reset).
ECHO_PACKET_TYPES = packet_types_mask(PacketType.INBAND)
