"""The load generator's native helpers against their twins (hypothesis)."""

from __future__ import annotations

import array
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmbus.guest import check

pytestmark = pytest.mark.native  # fails, never skips, without the extension (conftest.py)

DESC = struct.Struct("<HHHHQ")


@st.composite
def echoed_batch(draw: st.DrawFn):
    pattern = draw(st.binary(min_size=1, max_size=300))
    n = draw(st.integers(0, 12))
    buf = bytearray()
    index = array.array("I")
    lens = array.array("I")
    base = draw(st.integers(0, 2**40))
    for i in range(n):
        want = draw(st.integers(0, len(pattern)))
        off8 = draw(st.integers(2, 4))
        len8 = off8 + (want + 7) // 8
        tid = base + i if draw(st.integers(0, 9)) else draw(st.integers(0, 2**64 - 1))
        payload = bytearray(pattern[:want])
        if want and not draw(st.integers(0, 9)):
            payload[draw(st.integers(0, want - 1))] ^= 0xFF
        pkt = DESC.pack(6, off8, len8, 0, tid) + bytes(off8 * 8 - 16) + payload
        pkt += bytes(len8 * 8 - len(pkt))
        index.extend([len(buf), len(pkt)])
        buf += pkt
        lens.append(want if draw(st.integers(0, 9)) else draw(st.integers(0, len(pattern))))
    return bytes(buf), index, n, base, bytes(pattern), lens


@settings(max_examples=400, deadline=None)
@given(echoed_batch(), st.booleans(), st.booleans())
def test_check_echo_twins_agree(b, per_packet_lens: bool, check_bytes: bool) -> None:
    buf, index, n, base, pattern, lens = b
    fixed = lens[0] if n else 0
    args = (buf, index, n, base, pattern, lens if per_packet_lens else None, fixed)
    assert check.native_check_echo(*args, check_bytes=check_bytes) == check.py_check_echo(
        *args, check_bytes=check_bytes
    )


def test_check_echo_finds_a_flipped_byte() -> None:
    pattern = bytes(range(64))
    pkt = DESC.pack(6, 2, 2 + 8, 0, 7) + pattern
    bad = bytearray(pkt)
    bad[40] ^= 1
    idx = array.array("I", [0, len(pkt)])
    for fn in (check.native_check_echo, check.py_check_echo):
        assert fn(pkt, idx, 1, 7, pattern, None, 64) == -1
        assert fn(bytes(bad), idx, 1, 7, pattern, None, 64) == 0
        assert fn(bytes(bad), idx, 1, 7, pattern, None, 64, check_bytes=False) == -1
        assert fn(pkt, idx, 1, 8, pattern, None, 64) == 0  # wrong order


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 300), st.integers(0, 50), st.integers(8, 2048))
def test_bench_memcpy_twins_agree(size: int, count: int, dst_size: int) -> None:
    src = bytes((i * 7) % 256 for i in range(size))
    a, b = bytearray(dst_size), bytearray(dst_size)
    check.native_bench_memcpy(a, src, size, count)
    check.py_bench_memcpy(b, src, size, count)
    assert a == b
