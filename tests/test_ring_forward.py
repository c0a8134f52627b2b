"""vmb_ring_forward against its twin: the pass-through path (echo, loopback).

Both flavours start from identical memory (a source ring with random packets,
some hostile, and a destination ring with random free space) and must return the
same result and leave every byte of both rings the same.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmbus import ring

try:
    from tests.ring_support import DESC, Mem, classes, mem, put_ring
except ImportError:  # pytest's rootdir-relative import mode
    from ring_support import DESC, Mem, classes, mem, put_ring  # type: ignore

pytestmark = pytest.mark.native  # compares with the twin: fails without the extension

SIZES = (256, 512, 4096)


def _setup(
    m_src: Mem,
    m_dst: Mem,
    r0: int,
    pkts: list[bytes],
    corrupt_at: int | None,
    dst_r: int,
    dst_w: int,
) -> None:
    """The guest's side: packets in the source ring, the destination ring partly full."""
    pos = r0
    m_src.reset(r=r0, w=r0)
    for i, p in enumerate(pkts):
        if corrupt_at == i:
            p = DESC.pack(6, 1, 2, 0, 0) + p[16:]  # offset8 < 2: the forwarder must stop here
        pos = put_ring(m_src, pos, p + struct.pack("<Q", 0))
    m_src.set32(ring.OFF_WRITE_INDEX, pos)
    m_dst.reset(r=dst_r, w=dst_w)


def _run(impl: str, kind: str, size: int, args: tuple, max_pkts: int, complete: bool):
    reader_cls, writer_cls, _ = classes(impl)
    slot = 10 if impl == "py" else 20
    m_src, m_dst = mem(kind, size, slot), mem(kind, size, slot + 1)
    _setup(m_src, m_dst, *args)
    rd = reader_cls(m_src.hdr, m_src.data, size, doubled=m_src.doubled)
    wr = writer_cls(m_dst.hdr, m_dst.data, size, doubled=m_dst.doubled)
    rd.open()
    wr.open()
    res = ring.forward(rd, wr, max_pkts, complete)
    snap = (m_src.snapshot(), m_dst.snapshot(), rd._priv, wr._priv)
    rd.release()
    wr.release()
    return res, snap


@st.composite
def scenario(draw: st.DrawFn):
    size = draw(st.sampled_from(SIZES))
    r0 = draw(st.integers(0, size // 8 - 1)) * 8
    pkts: list[bytes] = []
    room = size - 16
    while draw(st.booleans()) and room > 40:
        body = draw(st.integers(0, min(room - 40, size // 3)))
        flags = draw(st.sampled_from([0, 1]))
        off8 = 2 + draw(st.integers(0, body // 8))
        len8 = 2 + (body + 7) // 8
        off8 = min(off8, len8)
        raw = DESC.pack(6, off8, len8, flags, draw(st.integers(0, 2**64 - 1)))
        raw += bytes([len(pkts) + 1]) * (len8 * 8 - 16)
        pkts.append(raw)
        room -= len8 * 8 + 8
    corrupt_at = draw(st.one_of(st.none(), st.integers(0, max(0, len(pkts) - 1))))
    dst_r = draw(st.integers(0, size // 8 - 1)) * 8
    dst_w = draw(st.integers(0, size // 8 - 1)) * 8
    return size, (r0, pkts, corrupt_at if pkts else None, dst_r, dst_w)


@settings(max_examples=300, deadline=None)
@given(scenario(), st.integers(0, 40), st.booleans(), st.sampled_from(["plain", "double"]))
def test_forward_matches_twin(sc, max_pkts: int, complete: bool, kind: str) -> None:
    size, args = sc
    if kind == "double" and size < 4096:
        kind = "plain"  # real double mappings are page-sized
    py = _run("py", kind, size, args, max_pkts, complete)
    nat = _run("native", kind, size, args, max_pkts, complete)
    assert py == nat


def test_forward_moves_packets_and_completes() -> None:
    for impl in ("py", "native"):
        reader_cls, writer_cls, batch_cls = classes(impl)
        src, dst = mem("plain", 4096, 30), mem("plain", 4096, 31)
        src.reset()
        dst.reset()
        w_src = writer_cls(src.hdr, src.data, 4096)
        w_src.open()
        w_src.write(
            batch_cls([ring.OutPacket(6, 0, 5, [b"a" * 100]), ring.OutPacket(6, 1, 6, [b"b" * 8])])
        )
        rd = reader_cls(src.hdr, src.data, 4096)
        wr = writer_cls(dst.hdr, dst.data, 4096)
        rd.open()
        wr.open()
        res = ring.forward(rd, wr, 10, complete=True)
        assert res.npkts == 2 and res.error is None and res.write_signal
        out, idx = bytearray(4096), bytearray(80)
        r_dst = reader_cls(dst.hdr, dst.data, 4096)
        r_dst.open()
        got = r_dst.read(out, idx, 10)
        pk = list(ring.iter_packets(out, idx, got.npkts))
        assert [(p.type, p.flags, p.trans_id) for p in pk] == [(6, 0, 5), (0xB, 0, 6)]
        assert bytes(pk[0].payload[:100]) == b"a" * 100
        for r in (rd, wr, r_dst, w_src):
            r.release()
