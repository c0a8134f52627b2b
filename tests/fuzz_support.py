"""Helpers for the end-to-end hostile-guest fuzzer (tests/test_fuzz_e2e.py).

Everything here is seeded: a `random.Random` goes in, the same hostile bytes come
out, so a failing seed reproduces. Three kinds of tools:

* `ControlFuzzer`: VMBus control messages, valid ones built from `vmbus.protocol`
  around the relids and GPADL handles the guest really has, then mutated (fields
  set to edge values, truncation, extra bytes, flipped bytes, another msgtype);
* ring abuse on an open guest channel (`RingAbuser`): the guest-writable header
  fields, garbage descriptors and data, kicks;
* `Resources`: what the vmbusd process holds (RSS, fds, VMAs), from /proc.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import trio

from vmbus import attach
from vmbus import protocol as vp
from vmbus.gpadl import PAGE_SIZE, GpaRange
from vmbus.ring import (
    OFF_FEATURE_BITS,
    OFF_INTERRUPT_MASK,
    OFF_PENDING_SEND_SZ,
    OFF_READ_INDEX,
    OFF_WRITE_INDEX,
)

U32 = 0xFFFFFFFF
U64 = (1 << 64) - 1

# msgtypes that reset or unload the guest's bus: after one, the hostile guest's own
# client no longer agrees with the host, and the fuzzer re-syncs it.
BUS_RESETTING_TYPES = frozenset({vp.MessageType.INITIATE_CONTACT, vp.MessageType.UNLOAD})


# --- vmbusd's resources ----------------------------------------------------------------


@dataclass(frozen=True)
class Resources:
    rss_kb: int
    fds: int
    vmas: int

    @classmethod
    def of(cls, pid: int) -> Resources:
        status = Path(f"/proc/{pid}/status").read_text()
        m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        assert m is not None, status
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        vmas = sum(1 for _ in Path(f"/proc/{pid}/maps").open())
        return cls(int(m.group(1)), fds, vmas)


# --- control messages ------------------------------------------------------------------


def u32_edges(rng: random.Random, near: list[int]) -> int:
    """A u32 worth trying: edges, values around real ones, or random."""
    r = rng.random()
    if r < 0.3 and near:
        return (rng.choice(near) + rng.choice((-1, 0, 0, 1, 2048, 1 << 16))) & U32
    if r < 0.7:
        return rng.choice(
            (
                0,
                1,
                2,
                3,
                4,
                7,
                8,
                26,
                28,
                2046,
                2047,
                2048,
                0x7FFF,
                0xFFFF,
                0x10000,
                0x7FFFFFFF,
                0x80000000,
                U32 - 1,
                U32,
            )
        )
    return rng.getrandbits(32)


def pfn_edges(rng: random.Random, ram_pfns: list[int]) -> int:
    r = rng.random()
    if r < 0.5 and ram_pfns:
        return rng.choice(ram_pfns)
    return rng.choice(
        (
            0,
            1,
            0x7FFFF,
            0x80000,
            0xFFFFF,
            0x100000,
            0x100FFF,
            0x101000,
            (1 << 40) - 1,
            (1 << 52) >> 12,
            (U64 >> 12),
            (U64 >> 12) + 1,
            U64,
            rng.getrandbits(64),
            rng.getrandbits(24),
        )
    )


@dataclass
class ControlFuzzer:
    """Builds hostile control messages around what the guest really has."""

    rng: random.Random
    relids: list[int]
    handles: list[int] = field(default_factory=list)
    ram_pfns: list[int] = field(default_factory=list)

    def valid(self) -> vp.Message:
        """A well-formed message of a random guest-to-host type, with plausible fields."""
        rng = self.rng
        relid = (
            rng.choice(self.relids)
            if self.relids and rng.random() < 0.7
            else u32_edges(rng, self.relids)
        )
        handle = (
            rng.choice(self.handles)
            if self.handles and rng.random() < 0.6
            else u32_edges(rng, self.handles)
        )
        kind = rng.randrange(13)
        if kind == 0:
            return vp.OpenChannel(
                relid,
                relid,
                handle,
                rng.choice((0, 0, 1, 2, 7, U32)),
                rng.choice((0, 1, 2, 3, 8, 16, 17, 0xFFFF, U32)),
                rng.randbytes(rng.randrange(121)),
            )
        if kind in (1, 2):
            n = rng.choice((1, 2, 3, 8, 26, 27, 100, 8190, 8191))
            pfns = [pfn_edges(rng, self.ram_pfns) for _ in range(min(n, vp.GPADL_HEADER_MAX_PFNS))]
            rangecount = rng.choice((1, 1, 1, 0, 2, 3, 0xFFFF))
            byte_count = rng.choice((n * PAGE_SIZE, n * PAGE_SIZE - 1, 0, U32, 1))
            byte_offset = rng.choice((0, 0, 1, 0xFFF, 0x1000, U32))
            buflen = rng.choice((8 + 8 * n, 8 + 8 * n, 0, 8, 16, 0xFFFF, rng.getrandbits(16)))
            data = struct.pack("<II", byte_count, byte_offset) + b"".join(
                struct.pack("<Q", p) for p in pfns
            )
            return vp.GpadlHeader(relid, handle, buflen & 0xFFFF, rangecount, data[: 240 - 20])
        if kind == 3:
            pfns = tuple(
                pfn_edges(rng, self.ram_pfns)
                for _ in range(rng.randrange(vp.GPADL_BODY_MAX_PFNS + 1))
            )
            return vp.GpadlBody(rng.choice((0, 0, 1, U32)), handle, pfns)
        if kind == 4:
            return vp.GpadlTeardown(relid, handle)
        if kind == 5:
            return vp.CloseChannel(relid)
        if kind == 6:
            return vp.RelidReleased(relid)
        if kind == 7:
            return vp.ModifyChannel(relid, rng.choice((0, 1, 2, 63, 64, 4095, 4096, U32)))
        if kind == 8:
            v = rng.choice((*vp.ALL_VERSIONS, 0, 1, vp.make_version(5, 4), U32))
            sint = rng.choice((2, 2, 0, 1, 15, 0xFF))
            return vp.InitiateContact(
                v,
                rng.choice((0, 1, 2, U32)),
                sint | rng.choice((0, 0, 1 << 8, 1 << 32)),
                rng.choice((0, 0x7000, 0x7001, U64 & ~0xFFF)),
                rng.choice((0, 0x8000, 0x8008, 1 << 51)),
            )
        if kind == 9:
            return vp.RequestOffers()
        if kind == 10:
            return vp.Unload()
        if kind == 11:
            return vp.TlConnectRequest(*(uuid.UUID(int=rng.getrandbits(128)) for _ in range(2)))
        return vp.CloseChannel(relid)

    def mutate(self, payload: bytes) -> bytes:
        """Zero or more mutations of an encoded message."""
        rng = self.rng
        b = bytearray(payload)
        for _ in range(rng.choice((0, 1, 1, 2, 3))):
            op = rng.randrange(6)
            if op == 0 and b:  # truncate
                del b[rng.randrange(len(b)) :]
            elif op == 1:  # extra bytes
                b += rng.randbytes(rng.randrange(1, 33))
            elif op == 2 and b:  # flip bytes
                for _ in range(rng.randrange(1, 5)):
                    b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            elif op == 3 and len(b) >= 4:  # another msgtype
                b[0:4] = struct.pack(
                    "<I",
                    rng.choice(
                        (
                            0,
                            1,
                            2,
                            4,
                            6,
                            10,
                            12,
                            15,
                            17,
                            18,
                            19,
                            20,
                            21,
                            23,
                            24,
                            25,
                            26,
                            27,
                            28,
                            29,
                            30,
                            31,
                            255,
                            U32,
                        )
                    ),
                )
            elif op == 4 and len(b) >= 12:  # a u32 field at a 4-aligned offset
                off = rng.randrange(8, len(b) - 3, 4) if len(b) > 11 else 8
                b[off : off + 4] = struct.pack("<I", u32_edges(rng, self.relids + self.handles))
            elif op == 5 and len(b) > 8:  # random body, same header
                b[8:] = rng.randbytes(len(b) - 8)
        return bytes(b[: vp.MAX_MESSAGE_SIZE])

    def message(self) -> bytes:
        r = self.rng.random()
        if r < 0.08:  # pure noise
            return self.rng.randbytes(self.rng.randrange(0, vp.MAX_MESSAGE_SIZE + 1))
        payload = self.valid().encode()
        if r < 0.35:
            return payload
        return self.mutate(payload)


def msgtype_of(payload: bytes) -> int | None:
    return struct.unpack_from("<I", payload)[0] if len(payload) >= 4 else None


def resets_bus(payload: bytes) -> bool:
    return msgtype_of(payload) in BUS_RESETTING_TYPES


def gpadl_messages_raw(
    relid: int,
    handle: int,
    pfns: list[int],
    *,
    range_buflen: int | None = None,
    byte_count: int | None = None,
    byte_offset: int = 0,
) -> list[bytes]:
    """A single-range GPADL split as Linux does, with overridable header fields."""
    n = len(pfns)
    head = pfns[: vp.GPADL_HEADER_MAX_PFNS]
    data = struct.pack("<II", n * PAGE_SIZE if byte_count is None else byte_count, byte_offset)
    data += struct.pack(f"<{len(head)}Q", *head)
    buflen = (8 + 8 * n) & 0xFFFF if range_buflen is None else range_buflen
    out = [vp.GpadlHeader(relid, handle, buflen, 1, data).encode()]
    for start in range(vp.GPADL_HEADER_MAX_PFNS, n, vp.GPADL_BODY_MAX_PFNS):
        out.append(
            vp.GpadlBody(0, handle, tuple(pfns[start : start + vp.GPADL_BODY_MAX_PFNS])).encode()
        )
    return out


# --- ring abuse ------------------------------------------------------------------------


def poke_u32(view: Any, off: int, value: int) -> None:
    view[off : off + 4] = struct.pack("<I", value & U32)


class RingAbuser:
    """Random writes into the guest-writable parts of an open channel's rings."""

    def __init__(self, rng: random.Random, gch: Any) -> None:
        self.rng = rng
        self.gch = gch
        self.up_size = gch.mapping.upstream_size
        self.down_size = gch.mapping.downstream_size

    def _index_value(self, size: int) -> int:
        rng = self.rng
        return rng.choice(
            (
                0,
                8,
                size - 8,
                size - 16,
                size,
                size + 8,
                U32,
                4,
                12,
                size - 4,
                rng.randrange(0, size, 8),
                rng.randrange(0, size, 8),
                rng.getrandbits(32),
            )
        )

    def step(self) -> str:
        """One abuse; returns its name (for the failure message)."""
        rng = self.rng
        m = self.gch.mapping
        op = rng.randrange(9)
        if op == 0:
            with held(m.upstream_hdr) as h:
                poke_u32(h, OFF_WRITE_INDEX, self._index_value(self.up_size))
            what = "upstream write_index"
        elif op == 1:
            with held(m.downstream_hdr) as h:
                poke_u32(h, OFF_READ_INDEX, self._index_value(self.down_size))
            what = "downstream read_index"
        elif op == 2:
            with held(m.downstream_hdr) as h:
                poke_u32(h, OFF_INTERRUPT_MASK, rng.choice((0, 1, U32)))
            what = "downstream interrupt_mask"
        elif op == 3:
            with held(m.upstream_hdr) as h:
                poke_u32(
                    h,
                    OFF_PENDING_SEND_SZ,
                    rng.choice(
                        (
                            0,
                            1,
                            7,
                            8,
                            4096,
                            self.up_size - 8,
                            self.up_size,
                            self.up_size + 8,
                            U32,
                            rng.getrandbits(32),
                        )
                    ),
                )
            what = "upstream pending_send_sz"
        elif op == 4:
            hdr = m.upstream_hdr if rng.random() < 0.5 else m.downstream_hdr
            with held(hdr) as h:
                poke_u32(h, OFF_FEATURE_BITS, rng.choice((0, 1, 2, U32, rng.getrandbits(32))))
            what = "feature_bits"
        elif op in (5, 6):
            # garbage (or half-valid) descriptors at the current write index, published
            with held(m.upstream_hdr) as h:
                w = struct.unpack_from("<I", h, OFF_WRITE_INDEX)[0]
                if w >= self.up_size or w % 8:
                    w = 0
                n = rng.choice((8, 16, 24, 64, 256, 4096))
                n = min(n, self.up_size - 8)
                if op == 5:
                    body = bytearray(rng.randbytes(n))
                else:  # plausible descriptor: type/offset8/len8 near valid
                    n = max(n, 16)
                    body = bytearray(n)
                    struct.pack_into(
                        "<HHHHQ",
                        body,
                        0,
                        rng.choice((6, 6, 0, 7, 9, 0xB, 0xFFFF)),
                        rng.choice((0, 1, 2, 3, 0xFFFF)),
                        rng.choice((0, 1, 2, n // 8, n // 8 + 1, 0xFFFF)),
                        rng.choice((0, 1, 2, 0xFFFF)),
                        rng.getrandbits(64),
                    )
                with held(m.upstream_data) as d:
                    d[w : w + n] = body  # the data area is mapped twice: no wrap needed
                poke_u32(h, OFF_WRITE_INDEX, (w + n) % self.up_size)
            what = "garbage descriptors" if op == 5 else "bad descriptor"
        elif op == 7:
            with held(m.downstream_data) as d:
                off = rng.randrange(0, self.down_size, 8)
                d[off : off + 64] = rng.randbytes(64)
            what = "scribble on downstream data"
        else:
            what = "kick only"
        for _ in range(rng.choice((0, 1, 1, 5))):
            self.gch.kick.signal()
        return what


class held:
    """`with held(v) as v:` releases a memoryview on exit, so the guest's
    mapping can be closed later (SimulatedVm refuses while views are alive)."""

    def __init__(self, view: memoryview) -> None:
        self.view = view

    def __enter__(self) -> memoryview:
        return self.view

    def __exit__(self, *exc: object) -> None:
        self.view.release()


# --- VMM-level abuse on a raw attach connection ------------------------------------------


async def raw_vmm(path: str, vcpus: int = 1, vm_id: str = "raw") -> attach.AttachConnection:
    conn = await attach.connect(path)
    await attach.handshake(
        conn, attach.Hello(version=attach.PROTOCOL_VERSION, role="vmm", vm_id=vm_id, vcpus=vcpus)
    )
    return conn


async def send_raw_datagram(
    conn: attach.AttachConnection, obj: Any, fds: list[int] | None = None
) -> None:
    import array
    import socket

    data = obj if isinstance(obj, bytes) else msgpack.packb(obj, use_bin_type=True)
    anc = []
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
    with contextlib.suppress(OSError):
        await conn.socket.sendmsg([data], anc, socket.MSG_NOSIGNAL)


async def drain_until_closed(conn: attach.AttachConnection, timeout: float) -> list[Any]:
    """Read what vmbusd says until it closes the connection; returns the messages.

    Fails when vmbusd has not closed it within `timeout` seconds (a session left
    hanging is exactly what the VMM cases look for), and when vmbusd itself sends
    something that is not a valid attach message.
    """
    got: list[Any] = []
    with trio.move_on_after(timeout):
        while True:
            try:
                msg = await conn.receive()
            except attach.ConnectionClosed:
                return got
            got.append(msg)
            for fd in msg.fds():
                with contextlib.suppress(OSError):
                    os.close(fd)
    raise AssertionError(f"vmbusd did not close the connection within {timeout} s; sent {got}")


def gpa_ranges_pfns(ranges: list[GpaRange]) -> list[int]:
    return [p for r in ranges for p in r.pfns]
