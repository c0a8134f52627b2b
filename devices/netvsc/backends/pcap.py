"""The pcap backend: another backend wrapped, every frame both ways written to a
pcapng file (what tshark, Wireshark and tcpdump read).

Options: `path` (the capture file, relative to vmbusd's working directory; its
directory must exist; made or truncated when the NIC first comes up, a new pcapng
section appended each later time, so a guest reboot keeps what came before) and
`inner` (the wrapped backend as a table: `inner = { backend = "tap", ifname =
"vh0" }`, its keys those of that backend; default `{ backend = "loopback" }`).

The file is one pcapng section per NIC bring-up: a Section Header Block, an
Interface Description Block (LINKTYPE_ETHERNET, no snap length, microsecond
timestamps, the NIC's MAC as its name), then an Enhanced Packet Block per frame
with its time and the epb_flags direction option — outbound for what the guest
sent, inbound for what it is given, as a capture on the guest's own eth0 shows
them. An 802.1Q tag (beside the frame in RNDIS) is written inline.

Frames are captured as they cross, finished: `offloads` is empty, so the VSP
fills checksums and segments LSO sends (in Python) before the frame gets here and
the capture holds wire frames — the wrapped backend's own offloads (tap's vnet
header) go unused. Writes go through a buffered file
flushed per batch, from the trio thread (a page-cache write); `tx_frames` and
`rx_frames` count the frames written each way, logged at info when the NIC goes.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from typing import IO, Any

import trio

from devices.netvsc.backends.base import (
    BackendError,
    Deliver,
    Frame,
    NetBackend,
    NicInfo,
    Offloads,
    make_backend,
    vlan_insert,
)
from vmbus import plugins
from vmbus.cliutil import UserError

log = logging.getLogger(__name__)

SHB_TYPE = 0x0A0D0D0A
IDB_TYPE = 0x00000001
EPB_TYPE = 0x00000006
BYTE_ORDER_MAGIC = 0x1A2B3C4D
LINKTYPE_ETHERNET = 1
OPT_ENDOFOPT = 0
OPT_SHB_USERAPPL = 4
OPT_IF_NAME = 2
OPT_IF_TSRESOL = 9
OPT_EPB_FLAGS = 2
INBOUND = 1  # epb_flags bits 0-1: to the guest
OUTBOUND = 2  # from the guest


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + bytes(-len(value) % 4)


def _block(kind: int, body: bytes) -> bytes:
    """A pcapng block: type, total length, body (padded to 4), total length again."""
    body += bytes(-len(body) % 4)
    length = len(body) + 12
    return struct.pack("<II", kind, length) + body + struct.pack("<I", length)


def section_header(application: str) -> bytes:
    """SHB: little-endian, version 1.0, section length unknown (-1)."""
    opts = _option(OPT_SHB_USERAPPL, application.encode()) + _option(OPT_ENDOFOPT, b"")
    return _block(SHB_TYPE, struct.pack("<IHHq", BYTE_ORDER_MAGIC, 1, 0, -1) + opts)


def interface_description(name: str) -> bytes:
    """IDB: Ethernet, snap length 0 (none), timestamps in microseconds (10^-6)."""
    opts = (
        _option(OPT_IF_NAME, name.encode())
        + _option(OPT_IF_TSRESOL, bytes([6]))
        + _option(OPT_ENDOFOPT, b"")
    )
    return _block(IDB_TYPE, struct.pack("<HHI", LINKTYPE_ETHERNET, 0, 0) + opts)


def enhanced_packet(data: bytes, micros: int, direction: int) -> bytes:
    """EPB on interface 0 with its timestamp and the epb_flags direction."""
    head = struct.pack("<IIIII", 0, micros >> 32, micros & 0xFFFFFFFF, len(data), len(data))
    opts = _option(OPT_EPB_FLAGS, struct.pack("<I", direction)) + _option(OPT_ENDOFOPT, b"")
    return _block(EPB_TYPE, head + data + bytes(-len(data) % 4) + opts)


class PcapBackend(NetBackend):
    """Another backend, with every frame it carries written to a pcapng file."""

    name = "pcap"
    offloads = Offloads()  # captured as on the wire: the VSP finishes every frame

    def __init__(self, *, path: str, inner: dict[str, Any] | None = None) -> None:
        super().__init__()
        if not isinstance(path, str) or not path:
            raise BackendError("pcap backend: path must be a non-empty string (the capture file)")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise BackendError(
                f"pcap backend: directory {folder!r} of path {path!r} does not exist"
            )
        if os.path.isdir(path):
            raise BackendError(f"pcap backend: path {path!r} is a directory")
        if inner is None:
            inner = {"backend": "loopback"}
        if not isinstance(inner, dict):
            raise BackendError(
                f'pcap backend: inner must be a table like {{ backend = "tap", ifname = '
                f'"vh0" }}, not {inner!r}'
            )
        options = dict(inner)
        kind = options.pop("backend", None)
        if not isinstance(kind, str) or not kind:
            raise BackendError('pcap backend: inner needs backend = "NAME" (the wrapped backend)')
        try:
            cls = plugins.resolve(plugins.NET_BACKENDS, kind)
            self.inner = make_backend(cls, kind, options)
        except UserError as exc:
            raise BackendError(f"pcap backend: inner: {exc}") from None
        self.path = path
        self._file: IO[bytes] | None = None
        self._sections = 0

    def _write(self, frames: list[Frame], direction: int) -> None:
        out = self._file
        if out is None:
            return
        for f in frames:
            data = f.data if f.vlan is None else vlan_insert(f.data, f.vlan)
            out.write(enhanced_packet(data, time.time_ns() // 1000, direction))
        out.flush()

    def _open(self, nic: NicInfo) -> IO[bytes]:
        try:
            out = open(self.path, "ab" if self._sections else "wb")
        except OSError as exc:
            raise BackendError(f"pcap backend: cannot write {self.path}: {exc.strerror}") from None
        mac = ":".join(f"{b:02x}" for b in nic.mac)
        out.write(section_header("vmbusd netvsc pcap backend"))
        out.write(interface_description(f"netvsc {mac} ({self.inner.name})"))
        out.flush()
        self._sections += 1
        return out

    async def run(
        self,
        nic: NicInfo,
        deliver: Deliver,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        def captured(frames: list[Frame]) -> None:
            self._write(frames, INBOUND)
            if self._file is not None:
                self.rx_frames += len(frames)
            deliver(frames)

        self._file = self._open(nic)
        tx, rx = self.tx_frames, self.rx_frames
        try:
            await self.inner.run(nic, captured, task_status=task_status)
        finally:
            out, self._file = self._file, None
            out.close()
            log.info(
                "pcap %s: %d frames from the guest, %d to it (this section; %s backend inside)",
                self.path,
                self.tx_frames - tx,
                self.rx_frames - rx,
                self.inner.name,
            )

    def transmit(self, queue: int, frames: list[Frame]) -> None:
        if self._file is None:
            self.tx_dropped += len(frames)
            return
        self._write(frames, OUTBOUND)
        self.tx_frames += len(frames)
        self.inner.transmit(queue, frames)

    @property
    def link_up(self) -> bool:
        return self.inner.link_up
