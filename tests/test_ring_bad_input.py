"""A hostile guest: every malformed index or descriptor gets its own error code,
in both flavours, and nothing is read or written outside the ring's memory."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from array import array
from pathlib import Path
from typing import Any

import pytest

from vmbus import native, ring
from vmbus.ring import RingError as E

try:
    from tests.ring_support import DESC, IMPLS, Mem, classes, mem, put_ring, raw_packet
except ImportError:  # pytest's rootdir-relative import mode
    from ring_support import DESC, IMPLS, Mem, classes, mem, put_ring, raw_packet  # type: ignore

SIZE = 4096
IMPL_LIST = list(IMPLS) if native.native_available() else ["py"]
HERE = Path(__file__).resolve().parent


@pytest.fixture(params=IMPL_LIST)
def impl(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def ends(impl: str, m: Mem, **kw: Any) -> tuple[Any, Any, Any]:
    reader_cls, writer_cls, batch_cls = classes(impl)
    return (
        reader_cls(m.hdr, m.data, m.size, doubled=m.doubled, **kw),
        writer_cls(m.hdr, m.data, m.size, doubled=m.doubled),
        batch_cls,
    )


def guest_ring(start: int, *pkts: bytes, kind: str = "guarded") -> Mem:
    """A guest->host ring holding the given raw packets (each followed by a trailer)."""
    m = mem(kind, SIZE, 9)
    m.reset(start, start)
    pos = start
    for p in pkts:
        pos = put_ring(m, pos, p + bytes(8))
    m.set32(ring.OFF_WRITE_INDEX, pos)
    return m


def read_all(rd: Any, max_pkts: int = 8) -> tuple[ring.ReadResult, bytearray, array]:
    out, idx = bytearray(SIZE), array("I", bytes(8 * max_pkts))
    return rd.read(out, idx, max_pkts), out, idx


GOOD = raw_packet(6, 0, 2, 4, fill=0x11)


def expect_read_error(impl: str, bad: bytes, code: E, *, start: int = SIZE - 8, **kw: Any) -> None:
    """One good packet, then the bad one: the good one is delivered and consumed,
    the bad one reported, and nothing moves on a retry."""
    m = guest_ring(start, GOOD, bad)
    rd, _, _ = ends(impl, m, **kw)
    rd.open()
    res, out, _ = read_all(rd)
    assert (res.npkts, res.error) == (1, code)
    assert bytes(out[:32]) == GOOD
    after = (start + 40) % SIZE
    assert m.get32(ring.OFF_READ_INDEX) == after
    res2, _, _ = read_all(rd)
    assert res2 == ring.ReadResult(0, 0, 0, False, code)
    assert m.get32(ring.OFF_READ_INDEX) == after


# ---------------------------------------------------------------- indices


@pytest.mark.parametrize(
    ("w", "code"),
    [
        (SIZE, E.WINDEX_RANGE),
        (0xFFFFFFF8, E.WINDEX_RANGE),
        (12, E.WINDEX_ALIGN),
        (1, E.WINDEX_ALIGN),
    ],
)
def test_write_index_corrupt(impl: str, w: int, code: E) -> None:
    m = guest_ring(0, GOOD)
    rd, _, _ = ends(impl, m)
    rd.open()
    m.set32(ring.OFF_WRITE_INDEX, w)
    before = m.snapshot()
    res, _, _ = read_all(rd)
    assert res == ring.ReadResult(0, 0, 0, False, code)
    with pytest.raises(ring.RingCorrupt) as ei:
        rd.bytes_to_read()
    assert ei.value.code == code
    assert rd.unmask() is True  # "look again": the next read reports it
    m.set32(ring.OFF_INTERRUPT_MASK, 0)
    assert m.snapshot() == before
    # the host's writer end refuses such a ring at open
    _, wr, _ = ends(impl, m)
    with pytest.raises(ring.RingCorrupt) as ei:
        wr.open()
    assert ei.value.code == code


@pytest.mark.parametrize(
    ("r", "code"),
    [
        (SIZE, E.RINDEX_RANGE),
        (0xFFFFFFFF, E.RINDEX_RANGE),
        (4, E.RINDEX_ALIGN),
        (7, E.RINDEX_ALIGN),
    ],
)
def test_read_index_corrupt(impl: str, r: int, code: E) -> None:
    m = mem("guarded", SIZE, 9)
    m.reset(64, 64)
    rd, wr, batch_cls = ends(impl, m)
    wr.open()
    m.set32(ring.OFF_READ_INDEX, r)
    before = m.snapshot()
    for call in (
        lambda: wr.write(batch_cls([ring.OutPacket(6, 0, 1, [b"x"])])),
        lambda: wr.write_raw(GOOD, array("I", [0, 32]), 1),
        wr.bytes_to_write,
        lambda: wr.request_space(64),
    ):
        with pytest.raises(ring.RingCorrupt) as ei:
            call()
        assert ei.value.code == code
    m.set32(ring.OFF_PENDING_SEND_SZ, 0)  # request_space published its need first
    assert m.snapshot() == before  # nothing written
    with pytest.raises(ring.RingCorrupt) as ei:
        rd.open()
    assert ei.value.code == code


def test_partial_descriptor(impl: str) -> None:
    for avail in (8,):
        m = guest_ring(SIZE - 8, GOOD)
        m.set32(ring.OFF_WRITE_INDEX, (SIZE - 8 + 40 + avail) % SIZE)
        rd, _, _ = ends(impl, m)
        rd.open()
        res, _, _ = read_all(rd)
        assert (res.npkts, res.error) == (1, E.AVAIL_PARTIAL)


# ---------------------------------------------------------------- descriptors


@pytest.mark.parametrize(("typ", "off8"), [(6, 0), (6, 1), (0xB, 1), (9, 2), (7, 2), (9, 0)])
def test_offset8_too_small(impl: str, typ: int, off8: int) -> None:
    expect_read_error(impl, raw_packet(typ, 0, off8, 6), E.OFFSET8_SMALL)


def test_offset8_minimum_accepted(impl: str) -> None:
    m = guest_ring(0, raw_packet(9, 1, 3, 3), raw_packet(7, 0, 3, 5), raw_packet(6, 0, 2, 2))
    rd, _, _ = ends(impl, m)
    rd.open()
    res, out, idx = read_all(rd)
    assert (res.npkts, res.error) == (3, None)
    assert [p.payload.nbytes for p in ring.iter_packets(out, idx, 3)] == [0, 16, 0]


def test_len8_below_offset8(impl: str) -> None:
    expect_read_error(impl, raw_packet(6, 0, 5, 4), E.LEN8_LT_OFFSET8)


def test_len8_beyond_available(impl: str) -> None:
    bad = raw_packet(6, 0, 2, 10)
    m = guest_ring(0, GOOD, bad)
    m.set32(ring.OFF_WRITE_INDEX, 40 + 80)  # the trailer of the bad packet is missing
    rd, _, _ = ends(impl, m)
    rd.open()
    res, _, _ = read_all(rd)
    assert (res.npkts, res.error) == (1, E.LEN8_GT_AVAIL)


@pytest.mark.parametrize("len8", [(SIZE - 8) // 8, 0xFFFF, 4000])
def test_len8_beyond_ring(impl: str, len8: int) -> None:
    bad = DESC.pack(6, 2, len8, 0, 0) + bytes(64)
    m = guest_ring(SIZE - 8, GOOD, bad)
    m.set32(ring.OFF_WRITE_INDEX, (SIZE - 8 + 40 + 80) % SIZE)
    rd, _, _ = ends(impl, m)
    rd.open()
    res, _, _ = read_all(rd)
    assert (res.npkts, res.error) == (1, E.LEN8_GT_RING)


@pytest.mark.parametrize("typ", [0, 1, 5, 8, 0xA, 0xC, 0xD, 0x1F, 0x20, 0xFFFF])
def test_bad_type(impl: str, typ: int) -> None:
    expect_read_error(impl, raw_packet(typ, 0, 3, 6), E.BAD_TYPE)


def test_type_outside_device_mask(impl: str) -> None:
    """A device that only expects in-band and completions refuses GPA-direct."""
    mask = (1 << 6) | (1 << 0xB)
    expect_read_error(impl, raw_packet(9, 1, 3, 6), E.BAD_TYPE, allowed_types=mask)


@pytest.mark.parametrize("flags", [2, 3, 0x100, 0x8000, 0xFFFF])
def test_bad_flags(impl: str, flags: int) -> None:
    expect_read_error(impl, raw_packet(6, flags, 2, 6), E.BAD_FLAGS)


def test_doubled_and_split_give_the_same_errors(impl: str) -> None:
    """A descriptor wrapping at the end of the ring is checked identically in both modes."""
    for kind in ("guarded", "double"):
        m = guest_ring(SIZE - 8, raw_packet(6, 0, 1, 4), kind=kind)
        rd, _, _ = ends(impl, m)
        rd.open()
        res, _, _ = read_all(rd)
        assert res.error == E.OFFSET8_SMALL


# ---------------------------------------------------------------- copy once


def test_copy_once_twin_rewritten_descriptor() -> None:
    """The guest rewrites the descriptor between our descriptor read and the body
    copy: the copy keeps the descriptor that was validated, and the ring advances
    by the validated length."""
    m = guest_ring(SIZE - 8, raw_packet(6, 1, 2, 8, tid=7, fill=0x22))

    class Racy(ring.PyRingReader):
        calls = 0

        def _get(self, pos: int, n: int) -> bytes:
            got = super()._get(pos, n)
            Racy.calls += 1
            if Racy.calls == 1:  # right after the descriptor copy
                put_ring(m, SIZE - 8, DESC.pack(0xB, 0x40, 0xFFFF, 0xFF, 99))
            return got

    rd = Racy(m.hdr, m.data, SIZE)
    rd.open()
    res, out, idx = read_all(rd)
    assert (res.npkts, res.error, res.consumed) == (1, None, 72)
    assert DESC.unpack_from(out, 0) == (6, 2, 8, 1, 7)
    assert idx[1] == 64 and bytes(out[16:64]) == bytes([0x22]) * 48
    assert m.get32(ring.OFF_READ_INDEX) == (SIZE - 8 + 72) % SIZE


@pytest.mark.native
def test_copy_once_native_concurrent_rewrites() -> None:
    """A forked process (a second CPU, no GIL) flips the shared descriptor between two
    valid shapes while C reads: every copy must be one self-consistent shape, never a
    validated length with re-read descriptor bytes. Probabilistic, but cheap."""
    a = DESC.pack(6, 2, 8, 0, 1)
    b = DESC.pack(0xB, 3, 4, 1, 2)
    m = guest_ring(SIZE - 8, raw_packet(6, 0, 2, 8) + bytes(8) + bytes(24), kind="double")
    m.set32(ring.OFF_WRITE_INDEX, (SIZE - 8 + 104) % SIZE)
    rd = ring.NativeRingReader(m.hdr, m.data, SIZE, doubled=True)
    rd.open()
    pid = os.fork()
    if pid == 0:  # the guest: MAP_SHARED memfd pages are shared across fork
        try:
            end = time.monotonic() + 0.6
            data = m.data
            while time.monotonic() < end:
                for _ in range(1000):
                    data[SIZE - 8 : SIZE + 8] = a
                    data[SIZE - 8 : SIZE + 8] = b
        finally:
            os._exit(0)
    out, idx = bytearray(SIZE), array("I", [0, 0])
    seen = set()
    try:
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            for _ in range(500):
                res = rd.read(out, idx, 1, peek=True)
                if res.npkts:
                    d = DESC.unpack_from(out, 0)
                    assert idx[1] == d[2] * 8 == res.out_bytes, d
                    assert 2 <= d[1] <= d[2]
                    seen.add(d[0])
    finally:
        os.waitpid(pid, 0)
    assert seen  # at least one shape was read


# ---------------------------------------------------------------- bounds


def _run(code: str) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    )
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


def test_guard_pages_catch_overruns() -> None:
    """The harness itself: touching the byte after a guarded area kills the process."""
    p = _run(
        "import ctypes, ring_support as s\n"
        "m = s.mem('guarded', 4096)\n"
        "a = ctypes.addressof(ctypes.c_char.from_buffer(m.data))\n"
        "ctypes.string_at(a + 4096, 1)\n"
    )
    assert p.returncode < 0, p.stderr  # killed by SIGSEGV


@pytest.mark.native
@pytest.mark.parametrize("seed", [1, 2])
def test_fuzz_on_guarded_memory(seed: int) -> None:
    """Garbage indices and descriptors on guarded, doubled and split rings: C never
    faults, and agrees with the twin on every result and every byte."""
    p = _run(f"import sys, ring_support as s; sys.exit(1 if s.fuzz({seed}, 1500) else 0)")
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
