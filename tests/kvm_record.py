"""A storvsc that records every packet of its channels, for capturing what the real
Linux driver sends (tests/data/real_linux_6.1_storvsc.json; see capture()).

Used as `type = "kvm_record:RecordingStorvsc"` in a `vmbusd serve` config with
VMBUSD_RECORD=<file>: each packet received or sent is one JSON line. Not product
code: it lives beside the tests and wraps the channel from outside.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Sequence
from typing import Any

from devices.netvsc.vsp import NetvscDevice
from devices.storvsc.vsp import StorvscDevice
from vmbus.channel import Channel, PacketBatch
from vmbus.device import DeviceContext
from vmbus.packet import PacketType
from vmbus.ring import OutPacket

Extra = Callable[[Any], dict[str, Any]]
"""Per packet, more fields for its record (e.g. the RNDIS bytes it points at)."""


def _append(path: str | None, rec: dict[str, Any]) -> None:
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def tap(
    channel: Channel,
    sub: int,
    write: Callable[[dict[str, Any]], None],
    extra_in: Extra | None = None,
    extra_out: Extra | None = None,
) -> None:
    """Wrap `channel`'s receive and send so each packet is passed to `write`."""
    receive, send = channel.receive, channel.send

    async def rec_receive(max_pkts: int | None = None, **kw: Any) -> PacketBatch:
        batch = await receive(max_pkts, **kw)  # consume=False: the netvsc journal
        for p in batch:
            write(
                {
                    "dir": "in",
                    "sub": sub,
                    "type": p.type,
                    "flags": p.flags,
                    "trans_id": p.trans_id,
                    "offset8": p.offset8,
                    "len8": p.len8,
                    "ext": bytes(p.ext).hex(),
                    "payload": bytes(p.payload).hex(),
                    **(extra_in(p) if extra_in else {}),
                }
            )
        return batch

    async def rec_send(packets: Sequence[OutPacket], **kw: Any) -> None:
        for p in packets:
            body = b"".join(bytes(b) for b in p.body)
            write(
                {
                    "dir": "out",
                    "sub": sub,
                    "type": p.type,
                    "flags": p.flags,
                    "trans_id": p.trans_id,
                    "ext": body[: p.ext_len].hex(),
                    "payload": body[p.ext_len :].hex(),
                    **(extra_out(body[: p.ext_len]) if extra_out and p.type == 7 else {}),
                }
            )
        await send(packets, **kw)

    channel.receive = rec_receive  # type: ignore[method-assign]
    channel.send = rec_send  # type: ignore[method-assign]


class _Recording:
    """Keeps the records and appends them to $VMBUSD_RECORD."""

    records: list[dict[str, Any]]

    def _tap(
        self,
        channel: Channel,
        ctx: DeviceContext,
        extra_in: Extra | None = None,
        extra_out: Extra | None = None,
    ) -> None:
        path = os.environ.get("VMBUSD_RECORD")
        if not hasattr(self, "records"):
            self.records = []

        def write(rec: dict[str, Any]) -> None:
            self.records.append(rec)
            _append(path, rec)

        tap(channel, ctx.sub_channel_index, write, extra_in, extra_out)


class RecordingStorvsc(_Recording, StorvscDevice):
    """StorvscDevice whose channels log every packet in and out (raw fields + hex):
    into `records`, and into the file $VMBUSD_RECORD names."""

    async def serve(self, channel: Channel, ctx: DeviceContext) -> None:
        self._tap(channel, ctx)
        await super().serve(channel, ctx)


NVSP_SEND_RNDIS_PKT = 107
RNDIS_BYTES_KEPT = 2048  # a recorded RNDIS message (data frames are cut here)


class RecordingNetvsc(_Recording, NetvscDevice):
    """NetvscDevice recording its channels' packets the same way, and with each packet
    the RNDIS bytes it carries, which live in guest memory, not in the packet: field
    "rndis" (hex, cut at RNDIS_BYTES_KEPT), read from the GPA-direct ranges or the
    send-buffer section of a SEND_RNDIS_PKT the guest sent, and from the receive-buffer
    ranges of a transfer-page packet vmbusd sent (read when it is sent, so before the
    guest can reuse the section)."""

    async def serve(self, channel: Channel, ctx: DeviceContext) -> None:
        def rndis_in(p: Any) -> dict[str, Any]:
            payload = bytes(p.payload)
            if len(payload) < 12 or struct.unpack_from("<I", payload)[0] != NVSP_SEND_RNDIS_PKT:
                return {}
            if p.type == PacketType.GPA_DIRECT:
                data = b"".join(bytes(v) for v in ctx.memory.iovecs_of(ctx.memory.gpa_direct(p)))
                return {"rndis": data[:RNDIS_BYTES_KEPT].hex()}
            section, size = struct.unpack_from("<II", payload, 8)
            nic = getattr(self, "_nic", None)
            send = getattr(nic, "send", None)
            if section == 0xFFFFFFFF or send is None:
                return {}
            layout = getattr(getattr(nic, "nvsp", None), "send_layout", None)
            if layout is None or size > layout.section_size:
                return {}
            start = section * layout.section_size
            if start + size > send.size:
                return {}
            return {"rndis": bytes(send.view[start : start + min(size, RNDIS_BYTES_KEPT)]).hex()}

        def rndis_out(ext: bytes) -> dict[str, Any]:
            nic = getattr(self, "_nic", None)
            recv = getattr(nic, "recv", None)
            if recv is None or len(ext) < 8:
                return {}
            (count,) = struct.unpack_from("<I", ext, 4)
            parts = []
            for i in range(min(count, (len(ext) - 8) // 8)):
                n, off = struct.unpack_from("<II", ext, 8 + 8 * i)
                if off + n <= recv.size:
                    parts.append(bytes(recv.view[off : off + min(n, RNDIS_BYTES_KEPT)]).hex())
            return {"rndis": parts}

        self._tap(channel, ctx, rndis_in, rndis_out)
        await super().serve(channel, ctx)
