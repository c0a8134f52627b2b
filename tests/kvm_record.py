"""A storvsc that records every packet of its channels, for capturing what the real
Linux driver sends (tests/data/real_linux_6.1_storvsc.json; see capture()).

Used as `type = "kvm_record:RecordingStorvsc"` in a `vmbusd serve` config with
VMBUSD_RECORD=<file>: each packet received or sent is one JSON line. Not product
code: it lives beside the tests and wraps the channel from outside.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

from devices.netvsc.vsp import NetvscDevice
from devices.storvsc.vsp import StorvscDevice
from vmbus.channel import Channel, PacketBatch
from vmbus.device import DeviceContext
from vmbus.ring import OutPacket


def _append(path: str | None, rec: dict[str, Any]) -> None:
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def tap(channel: Channel, sub: int, write: Callable[[dict[str, Any]], None]) -> None:
    """Wrap `channel`'s receive and send so each packet is passed to `write`."""
    receive, send = channel.receive, channel.send

    async def rec_receive(max_pkts: int | None = None) -> PacketBatch:
        batch = await receive(max_pkts)
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
                }
            )
        return batch

    async def rec_send(packets: Sequence[OutPacket]) -> None:
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
                }
            )
        await send(packets)

    channel.receive = rec_receive  # type: ignore[method-assign]
    channel.send = rec_send  # type: ignore[method-assign]


class _Recording:
    """Keeps the records and appends them to $VMBUSD_RECORD."""

    records: list[dict[str, Any]]

    def _tap(self, channel: Channel, ctx: DeviceContext) -> None:
        path = os.environ.get("VMBUSD_RECORD")
        if not hasattr(self, "records"):
            self.records = []

        def write(rec: dict[str, Any]) -> None:
            self.records.append(rec)
            _append(path, rec)

        tap(channel, ctx.sub_channel_index, write)


class RecordingStorvsc(_Recording, StorvscDevice):
    """StorvscDevice whose channels log every packet in and out (raw fields + hex):
    into `records`, and into the file $VMBUSD_RECORD names."""

    async def serve(self, channel: Channel, ctx: DeviceContext) -> None:
        self._tap(channel, ctx)
        await super().serve(channel, ctx)


class RecordingNetvsc(_Recording, NetvscDevice):
    """NetvscDevice recording its channels' packets the same way (NVSP headers and
    range lists; RNDIS bodies are in guest memory, not in the packets)."""

    async def serve(self, channel: Channel, ctx: DeviceContext) -> None:
        self._tap(channel, ctx)
        await super().serve(channel, ctx)
