"""The echo VSP: the spine's end-to-end proof and the ring benchmark's peer.

Packets move ring to ring in one native call per batch (`Channel.forward`):
descriptors are copied and validated, payloads are opaque and never copied into
vmbusd's memory.

Across a vmbusd crash (docs/attach-protocol.md#restart) every packet is echoed
exactly once: a forward publishes the echoes (the downstream write_index) and
only then consumes the requests (the upstream read_index). A crash between those
two stores would echo the batch twice after a restart. So after every batch the
device records both indices in its in-flight slot (`ctx.inflight`, memory the
VMM keeps); a resumed channel whose downstream write_index moved on from the
record while its upstream read_index did not finishes that consumption first
(`resume_rings`): each echoed packet took exactly as many bytes from the one
ring as it put in the other.
"""

from __future__ import annotations

import logging
import struct

from devices.echo.protocol import ECHO_IF_TYPE, ECHO_PACKET_TYPES
from vmbus.channel import Channel
from vmbus.device import Device, DeviceContext
from vmbus.ring import OFF_READ_INDEX, OFF_WRITE_INDEX

log = logging.getLogger(__name__)

RECORD = struct.Struct("<III")  # magic, upstream read_index, downstream write_index
RECORD_MAGIC = 0x4F484345  # "ECHO": a record written by this device
_INDEX = struct.Struct("<I")


class EchoDevice(Device):
    if_type = ECHO_IF_TYPE
    name = "echo"
    packet_types = ECHO_PACKET_TYPES
    restartable = True

    async def serve(self, channel: Channel, ctx: DeviceContext) -> None:
        rec, rings = ctx.inflight, ctx.rings
        if rec is None or rings is None:  # no restart support on this session
            while True:
                await channel.forward(complete=True)
        with rings.upstream_hdr as up, rings.downstream_hdr as down:
            while True:
                RECORD.pack_into(
                    rec,
                    0,
                    RECORD_MAGIC,
                    _INDEX.unpack_from(up, OFF_READ_INDEX)[0],
                    _INDEX.unpack_from(down, OFF_WRITE_INDEX)[0],
                )
                await channel.forward(complete=True)

    def resume_rings(self, ctx: DeviceContext) -> None:
        """Finish the consumption of a batch the last vmbusd echoed but died before
        it stored the upstream read_index. The record comes from memory the VMM can
        write: a value that does not fit the rings changes nothing."""
        rec, rings = ctx.inflight, ctx.rings
        if rec is None or rings is None:
            return
        magic, r0, w0 = RECORD.unpack_from(rec, 0)
        if magic != RECORD_MAGIC:
            return
        up_size, down_size = rings.upstream_size, rings.downstream_size
        with rings.upstream_hdr as up, rings.downstream_hdr as down:
            r = _INDEX.unpack_from(up, OFF_READ_INDEX)[0]
            w = _INDEX.unpack_from(down, OFF_WRITE_INDEX)[0]
            guest_w = _INDEX.unpack_from(up, OFF_WRITE_INDEX)[0]
            if r != r0 or w == w0:
                return  # the batch was consumed too, or never published
            if r0 >= up_size or guest_w >= up_size or w0 >= down_size or w >= down_size:
                ctx.log.warning("in-flight record does not fit the rings: ignored")
                return
            if (r0 | w0 | w) % 8:
                ctx.log.warning("in-flight record is not 8-byte aligned: ignored")
                return
            moved = (w - w0) % down_size
            if moved > (guest_w - r0) % up_size:
                ctx.log.warning("in-flight record names more than the guest wrote: ignored")
                return
            _INDEX.pack_into(up, OFF_READ_INDEX, (r0 + moved) % up_size)
        ctx.log.info("resumed: %d bytes the last vmbusd echoed are now consumed", moved)
