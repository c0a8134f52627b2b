"""Ring buffer: the C path and the Python twin driven side by side.

The state machine runs random operation sequences on two copies of identical
memory, one per flavour, and compares every result and every byte of the ring
after each step. In "clean" runs (no guest scribbling) it also checks both against
a model: packets come out FIFO and byte-exact, the writer takes exactly the prefix
that fits (free == cost is refused), and both signal decisions follow spec §3.
"""

from __future__ import annotations

import random
import struct
from array import array
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from vmbus import native, ring

try:
    from tests.ring_support import DESC, IMPLS, Mem, classes, mem, outcome
except ImportError:  # pytest's rootdir-relative import mode
    from ring_support import DESC, IMPLS, Mem, classes, mem, outcome  # type: ignore

needs_native = pytest.mark.native  # fails, never skips, without the extension (conftest.py)


def expected_packet(typ: int, flags: int, tid: int, ext_len: int, body: bytes) -> bytes:
    """The bytes a reader must return for a packet we wrote (descriptor + padded body)."""
    n = ring.DESC_SIZE + ((len(body) + 7) & ~7)
    desc = DESC.pack(typ, (16 + ext_len) // 8, n // 8, flags, tid)
    return desc + body + bytes(n - 16 - len(body))


def free_bytes(w: int, r: int, size: int) -> int:
    return size - (w - r) if w >= r else r - w


# ------------------------------------------------------------------ state machine

CONFIGS = [("plain", 32), ("plain", 40), ("plain", 128), ("plain", 512), ("guarded", 4096)]
CONFIGS_DOUBLED = [("double", 4096)]


class RingPair(RuleBasedStateMachine):
    """One ring written and read by us, in both flavours at once."""

    configs: list[tuple[str, int]] = CONFIGS

    @initialize(data=st.data())
    def setup(self, data: st.DataObject) -> None:
        kind, size = data.draw(st.sampled_from(self.configs), label="config")
        self.size = size
        start = data.draw(st.integers(0, size // 8 - 1), label="start") * 8
        self.clean = data.draw(st.booleans(), label="clean")
        choices = [ring.DEFAULT_ALLOWED_TYPES, 0xFFFFFFFF]
        allowed = data.draw(st.sampled_from(choices + ([] if self.clean else [1 << 6])))
        self.allowed = allowed
        self.mems: list[Mem] = [mem(kind, size, slot) for slot in (0, 1)]
        self.readers: list[Any] = []
        self.writers: list[Any] = []
        self.batches: list[list[Any]] = []  # per batch: [py batch, native batch, specs]
        self.model: list[bytes] = []
        self.last_out: list[tuple[bytearray, array]] = []
        self.last_n = 0
        results = []
        for impl, m in zip(IMPLS, self.mems, strict=True):
            m.reset(start, start)
            reader_cls, writer_cls, _ = classes(impl)
            rd = reader_cls(m.hdr, m.data, size, doubled=m.doubled, allowed_types=allowed)
            wr = writer_cls(m.hdr, m.data, size, doubled=m.doubled)
            results.append((outcome(rd.open), outcome(wr.open)))
            self.readers.append(rd)
            self.writers.append(wr)
        assert results[0] == results[1] == (("ok", None), ("ok", None))

    def both(self, fn: Any) -> Any:
        """Run fn(impl_index) for both flavours; the outcomes must agree."""
        res = [fn(i) for i in range(2)]
        assert res[0] == res[1], res
        return res[0]

    @invariant()
    def same_bytes(self) -> None:
        if not hasattr(self, "mems"):
            return
        a, b = self.mems
        assert a.snapshot() == b.snapshot()
        assert a.mirror_ok() and b.mirror_ok()
        assert self.readers[0]._priv == self.readers[1]._priv
        assert self.writers[0]._priv == self.writers[1]._priv

    # -- producer ---------------------------------------------------------------

    def _packets(self, data: st.DataObject) -> list[tuple[int, int, int, int, bytes]]:
        size = self.size
        body_len = st.one_of(
            st.integers(0, 24),
            st.integers(0, max(0, (size - 32) // 4)),
            st.integers(0, max(0, size - 32)),
            st.sampled_from([max(0, size - 32), size - 31]),
        )
        specs = []
        for _ in range(data.draw(st.integers(1, 5), label="npkts")):
            n = data.draw(body_len, label="body_len")
            typ = data.draw(st.sampled_from([6, 0xB, 7, 9]), label="type")
            # clean runs write only what a reader accepts: 7 and 9 carry an extension
            lo = 1 if self.clean and typ in (7, 9) else 0
            n = max(n, 8 * lo)
            if n + 32 > size and lo:
                typ = 6
                lo = 0
            ext = data.draw(st.integers(lo, min(n, 24) // 8), label="ext8") * 8
            flags = data.draw(st.integers(0, 1), label="flags")
            tid = data.draw(st.integers(0, 2**64 - 1), label="tid")
            specs.append((typ, flags, tid, ext, random.Random(n).randbytes(n)))
        return specs

    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        if self.batches and data.draw(st.booleans(), label="reuse"):
            entry = data.draw(st.sampled_from(self.batches), label="batch")
        else:
            specs = self._packets(data)
            pkts = [
                ring.OutPacket(t, f, i, [b[: len(b) // 2], b[len(b) // 2 :]], e)
                for (t, f, i, e, b) in specs
            ]
            entry = [classes(impl)[2](pkts) for impl in IMPLS] + [specs]
            self.batches.append(entry)
        specs = entry[2]
        start = data.draw(st.integers(0, len(specs)), label="start")
        base = data.draw(st.one_of(st.none(), st.integers(0, 2**64 - 1)), label="base")
        hdr = self.mems[0]
        imask, r_now = hdr.get32(ring.OFF_INTERRUPT_MASK), hdr.get32(ring.OFF_READ_INDEX)
        old_w = self.writers[0]._priv
        res = self.both(lambda i: outcome(self.writers[i].write, entry[i], start, base))
        partial = res[0] == "ok" and res[1].npkts < len(specs) - start
        event(f"write {res[0]}{' partial' if partial else ''}")
        if not self.clean or res[0] != "ok":
            return
        wres = res[1]
        # The writer takes exactly the prefix that fits: free must exceed the cost.
        free = free_bytes(old_w, r_now, self.size)
        todo = specs[start:]
        for k, (t, f, tid, e, b) in enumerate(todo[: wres.npkts]):
            cost = ring.packet_ring_bytes(len(b))
            assert free > cost
            free -= cost
            tid = tid if base is None else (base + k) & (2**64 - 1)
            self.model.append(expected_packet(t, f, tid, e, b))
        if wres.npkts < len(todo):
            assert free <= ring.packet_ring_bytes(len(todo[wres.npkts][4]))
        assert wres.signal == (wres.npkts > 0 and imask == 0 and r_now == old_w)

    @rule(data=st.data())
    def write_raw(self, data: st.DataObject) -> None:
        if not self.last_n:
            return
        n = data.draw(st.integers(0, self.last_n), label="n")
        complete = data.draw(st.booleans(), label="complete")
        res = self.both(
            lambda i: outcome(self.writers[i].write_raw, *self.last_out[i], n, complete)
        )
        if self.clean and res[0] == "ok":
            out, idx = self.last_out[0]
            for k in range(res[1].npkts):
                p = bytearray(out[idx[2 * k] : idx[2 * k] + idx[2 * k + 1]])
                _typ, off8, len8, flags, tid = DESC.unpack_from(p)
                if complete and flags & 1:
                    DESC.pack_into(p, 0, ring.VM_PKT_COMP, off8, len8, 0, tid)
                self.model.append(bytes(p))

    @rule(data=st.data())
    def request_space(self, data: st.DataObject) -> None:
        need = data.draw(
            st.one_of(st.integers(0, self.size + 8), st.integers(0, 2**32 - 1)), label="need"
        )
        self.both(lambda i: outcome(self.writers[i].request_space, need))

    @rule()
    def bytes_to_write(self) -> None:
        self.both(lambda i: outcome(self.writers[i].bytes_to_write))

    # -- consumer ---------------------------------------------------------------

    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        max_pkts = data.draw(st.integers(0, 8), label="max_pkts")
        cap = data.draw(st.one_of(st.just(self.size), st.integers(0, self.size)), label="cap")
        peek = data.draw(st.booleans(), label="peek")
        m = self.mems[0]
        feat, pend = m.get32(ring.OFF_FEATURE_BITS), m.get32(ring.OFF_PENDING_SEND_SZ)
        outs = [(bytearray(cap), array("I", bytes(8 * max_pkts))) for _ in IMPLS]
        res = self.both(lambda i: self.readers[i].read(outs[i][0], outs[i][1], max_pkts, peek))
        assert outs[0] == outs[1]
        event(f"read npkts>0={res.npkts > 0} error={res.error!r} signal={res.signal}")
        self.last_out, self.last_n = outs, res.npkts
        if not self.clean:
            return
        out, idx = outs[0]
        got = [bytes(out[idx[2 * k] : idx[2 * k] + idx[2 * k + 1]]) for k in range(res.npkts)]
        assert got == self.model[: res.npkts]
        pkts = list(ring.iter_packets(out, idx, res.npkts))
        assert [p.len8 * 8 for p in pkts] == [len(g) for g in got]
        if res.error is not None:
            assert res.error == ring.RingError.OUT_TOO_SMALL
        if not peek:
            del self.model[: res.npkts]
            w = m.get32(ring.OFF_WRITE_INDEX)
            wfree = free_bytes(w, self.readers[0]._priv, self.size)
            b = res.consumed
            want = bool(b and feat & 1 and pend and not (wfree - b > pend) and wfree > pend)
            assert res.signal == want

    @rule()
    def bytes_to_read(self) -> None:
        self.both(lambda i: outcome(self.readers[i].bytes_to_read))

    @rule()
    def mask(self) -> None:
        self.both(lambda i: self.readers[i].mask())

    @rule()
    def unmask(self) -> None:
        r = self.both(lambda i: self.readers[i].unmask())
        if self.clean:
            assert r == bool(self.model)

    @rule(which=st.sampled_from(["reader", "writer"]))
    def reopen(self, which: str) -> None:
        ends = self.readers if which == "reader" else self.writers
        self.both(lambda i: outcome(ends[i].open))

    # -- the guest, hostile -----------------------------------------------------

    @precondition(lambda self: not self.clean)
    @rule(data=st.data())
    def scribble_header(self, data: st.DataObject) -> None:
        off = data.draw(
            st.sampled_from(
                [
                    ring.OFF_WRITE_INDEX,
                    ring.OFF_READ_INDEX,
                    ring.OFF_INTERRUPT_MASK,
                    ring.OFF_PENDING_SEND_SZ,
                    ring.OFF_FEATURE_BITS,
                ]
            ),
            label="field",
        )
        v = data.draw(
            st.one_of(
                st.integers(0, self.size // 8 - 1).map(lambda x: x * 8),
                st.integers(0, self.size + 16),
                st.integers(0, 2**32 - 1),
            ),
            label="value",
        )
        for m in self.mems:
            m.set32(off, v)

    @precondition(lambda self: not self.clean)
    @rule(data=st.data())
    def scribble_data(self, data: st.DataObject) -> None:
        pos = data.draw(st.integers(0, self.size - 1), label="pos")
        blob = data.draw(st.binary(min_size=1, max_size=24), label="blob")
        for m in self.mems:
            for k, b in enumerate(blob):
                m.data[(pos + k) % self.size] = b

    @precondition(lambda self: not self.clean)
    @rule(data=st.data())
    def guest_consumes(self, data: st.DataObject) -> None:
        """The peer catches up (read_index = write_index), as a live guest would."""
        for m in self.mems:
            m.set32(ring.OFF_READ_INDEX, m.get32(ring.OFF_WRITE_INDEX))


class RingPairDoubled(RingPair):
    configs = CONFIGS_DOUBLED


_settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

TestRingPair = needs_native(RingPair.TestCase)
TestRingPair.settings = _settings
TestRingPairDoubled = needs_native(RingPairDoubled.TestCase)
TestRingPairDoubled.settings = settings(_settings, max_examples=150)


# ------------------------------------------------------------------ plain tests


@needs_native
def test_error_codes_match_native() -> None:
    lib = native.native_module().lib
    for name, value in ring._CODES.items():
        assert getattr(lib, "VMB_E_" + name) == value
        assert ring.RingError[name] == value
    assert len(set(ring._CODES.values())) == len(ring._CODES)
    assert all(v < 0 for v in ring._CODES.values())
    assert {e.name for e in ring.RingError} == set(ring._CODES)
    assert lib.VMB_RING_DEFAULT_TYPES == ring.DEFAULT_ALLOWED_TYPES
    assert lib.VMB_RING_HDR_SIZE == ring.HDR_SIZE
    assert lib.VMB_RING_MAX_SIZE == ring.MAX_RING_SIZE


def test_selected_flavour() -> None:
    want = (ring.NativeRingReader, ring.NativeRingWriter, ring.NativeSendBatch)
    if not native.NATIVE:
        want = (ring.PyRingReader, ring.PyRingWriter, ring.PySendBatch)
    assert (ring.RingReader, ring.RingWriter, ring.SendBatch) == want


def _impls() -> list[str]:
    return list(IMPLS) if native.native_available() else ["py"]


def _open(impl: str, m: Mem, **kw: Any) -> tuple[Any, Any, Any]:
    reader_cls, writer_cls, batch_cls = classes(impl)
    rd = reader_cls(m.hdr, m.data, m.size, doubled=m.doubled, **kw)
    wr = writer_cls(m.hdr, m.data, m.size, doubled=m.doubled)
    rd.open()
    wr.open()
    return rd, wr, batch_cls


@pytest.mark.parametrize("impl", _impls())
def test_init_ring_header(impl: str) -> None:
    m = mem("plain", 64, 7)
    m.hdr[:] = b"\xff" * ring.HDR_SIZE
    ring.init_ring_header(m.hdr)
    assert m.get32(ring.OFF_FEATURE_BITS) == 1
    assert bytes(m.hdr[:0x40]) == bytes(0x40) and bytes(m.hdr[0x44:]) == bytes(4096 - 0x44)


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("kind", ["guarded", "double"])
def test_roundtrip_every_offset(impl: str, kind: str) -> None:
    """A wrapping packet at every 8-aligned start gives the same bytes, doubled or not."""
    size = 4096
    m = mem(kind, size)
    body = random.Random(5).randbytes(300)
    for start in range(0, size, 8):
        m.reset(start, start)
        rd, wr, batch_cls = _open(impl, m)
        res = wr.write(batch_cls([ring.OutPacket(6, 1, start, [body[:7], body[7:]], 8)]))
        assert res == ring.WriteResult(1, 16 + 304 + 8, True)
        out, idx = bytearray(size), array("I", [0, 0])
        rr = rd.read(out, idx, 1)
        assert rr == ring.ReadResult(1, 320, 328, False, None)
        assert bytes(out[:320]) == expected_packet(6, 1, start, 8, body)
        (p,) = ring.iter_packets(out, idx, 1)
        assert (p.type, p.flags, p.trans_id, p.offset8, p.len8) == (6, 1, start, 3, 40)
        assert bytes(p.ext) == body[:8] and bytes(p.payload) == body[8:] + bytes(4)
        # trailer: start offset in the high half
        tpos = (start + 320) % size
        assert struct.unpack_from("<Q", m.data, tpos)[0] == start << 32
        assert m.get32(ring.OFF_READ_INDEX) == m.get32(ring.OFF_WRITE_INDEX) == (start + 328) % size


@pytest.mark.parametrize("impl", _impls())
def test_full_ring_exact_fit_refused(impl: str) -> None:
    """free == cost is refused (a full ring would look empty); free == cost + 8 is not."""
    size = 256
    m = mem("plain", size, 3)
    m.reset(0, 0)
    rd, wr, batch_cls = _open(impl, m)
    assert wr.bytes_to_write() == size
    # a packet costing the whole ring can never fit
    with pytest.raises(ring.RingArgumentError):
        wr.write(batch_cls([ring.OutPacket(6, 0, 1, [bytes(232)])]))
    # the maximal packet (cost size - 8) fits in an empty ring
    assert wr.write(batch_cls([ring.OutPacket(6, 0, 1, [bytes(224)])])).npkts == 1
    assert wr.bytes_to_write() == 8
    # a zero-length packet costs 24 > 8
    assert wr.write(batch_cls([ring.OutPacket(6, 0, 2, [])])).npkts == 0
    out, idx = bytearray(size), array("I", [0, 0] * 4)
    assert rd.read(out, idx, 4).npkts == 1
    # free == cost is refused: 24 used, 232 free, a 232-byte packet (body 208) waits
    assert wr.write(batch_cls([ring.OutPacket(6, 0, 3, [])])).npkts == 1
    assert wr.bytes_to_write() == 232
    assert wr.write(batch_cls([ring.OutPacket(6, 0, 4, [bytes(208)])])).npkts == 0
    assert wr.write(batch_cls([ring.OutPacket(6, 0, 4, [bytes(200)])])).npkts == 1
    assert wr.bytes_to_write() == 8
    # exactly fill to 8 free with zero-length packets, then the next is refused
    m.reset(0, 0)
    rd, wr, batch_cls = _open(impl, m)
    zero = batch_cls([ring.OutPacket(6, 0, k, []) for k in range(20)])
    res = wr.write(zero)
    assert res.npkts == (size - 8) // 24 and wr.bytes_to_write() == size - 24 * res.npkts
    with pytest.raises(ring.RingArgumentError) as ei:
        wr.write(batch_cls([ring.OutPacket(6, 0, 1, [bytes(225)])]))
    assert ei.value.code == ring.RingError.PKT_TOO_BIG
    assert wr.bytes_to_write() == size - 24 * res.npkts  # nothing written on error


@pytest.mark.parametrize("impl", _impls())
def test_write_signal_rules(impl: str) -> None:
    m = mem("plain", 512, 3)
    m.reset(64, 64)
    rd, wr, batch_cls = _open(impl, m)
    b = batch_cls([ring.OutPacket(6, 0, 1, [b"x"])])
    assert wr.write(b).signal  # empty -> non-empty
    assert not wr.write(b).signal  # reader has not caught up: no signal
    out, idx = bytearray(512), array("I", [0, 0] * 8)
    rd.read(out, idx, 8)
    rd.mask()
    assert not wr.write(b).signal  # mask set: no signal even though it was empty
    assert rd.unmask() is not False  # data arrived while masked: re-check says drain
    rd.read(out, idx, 8)
    assert rd.unmask() is False
    assert wr.write(batch_cls([])) == ring.WriteResult(0, 0, False)


@pytest.mark.parametrize("impl", _impls())
def test_pending_send_sz_signal(impl: str) -> None:
    """The consumer signals once the blocked producer's request fits, not before."""
    size = 256
    m = mem("plain", size, 3)
    m.reset(0, 0)
    rd, wr, batch_cls = _open(impl, m)
    small = batch_cls([ring.OutPacket(6, 0, k, [bytes(8)]) for k in range(10)])  # 32 each
    assert wr.write(small).npkts == 7  # 224 used, 32 free (32 > 32 refused)
    need = 96
    assert wr.request_space(need) is False
    assert m.get32(ring.OFF_PENDING_SEND_SZ) == need
    out, idx = bytearray(size), array("I", [0, 0] * 8)
    r1 = rd.read(out, idx, 1)  # free 64: still <= 96
    assert not r1.signal
    r2 = rd.read(out, idx, 2)  # free 128 > 96, and before it was 64 <= 96: signal
    assert r2.signal
    r3 = rd.read(out, idx, 1)  # already had room before this batch: no signal
    assert not r3.signal
    assert wr.request_space(need) is True
    assert m.get32(ring.OFF_PENDING_SEND_SZ) == 0
    # a write clears a pending_send_sz we set
    assert wr.request_space(size - 8) is False
    assert wr.write(small).npkts >= 1
    assert m.get32(ring.OFF_PENDING_SEND_SZ) == 0
    # without the feature bit the producer polls: never signalled
    m.reset(0, 0)
    rd, wr, batch_cls = _open(impl, m)
    wr.write(small)
    m.set32(ring.OFF_FEATURE_BITS, 0)
    m.set32(ring.OFF_PENDING_SEND_SZ, 96)
    assert not any(rd.read(out, idx, 1).signal for _ in range(7))


@pytest.mark.parametrize("impl", _impls())
def test_trans_id_base_and_write_raw_complete(impl: str) -> None:
    m = mem("plain", 1024, 3)
    m.reset(0, 0)
    rd, wr, batch_cls = _open(impl, m)
    b = batch_cls([ring.OutPacket(9, 1, 0, [bytes(8), b"gpa"], 8), ring.OutPacket(6, 0, 0, [b"q"])])
    assert wr.write(b, trans_id_base=2**64 - 1).npkts == 2
    out, idx = bytearray(1024), array("I", [0, 0] * 4)
    res = rd.read(out, idx, 4)
    pk = list(ring.iter_packets(out, idx, res.npkts))
    assert [p.trans_id for p in pk] == [2**64 - 1, 0]
    assert wr.write(b, start=1).npkts == 1
    assert wr.write_raw(out, idx, 2, complete=True).npkts == 2
    res = rd.read(out, idx, 4)
    pk = list(ring.iter_packets(out, idx, res.npkts))
    assert [(p.type, p.flags, p.trans_id) for p in pk] == [
        (6, 0, 0),
        (0xB, 0, 2**64 - 1),
        (6, 0, 0),
    ]
    assert bytes(pk[1].ext) == bytes(8) and bytes(pk[1].payload[:3]) == b"gpa"


@pytest.mark.parametrize("impl", _impls())
def test_argument_checks(impl: str) -> None:
    m = mem("plain", 64, 3)
    m.reset(0, 0)
    rd, wr, batch_cls = _open(impl, m)
    reader_cls = classes(impl)[0]
    with pytest.raises(ValueError):
        reader_cls(m.hdr, m.data, 60)  # not a multiple of 8
    with pytest.raises(ValueError):
        reader_cls(m.hdr, m.data, 128)  # larger than the buffer
    with pytest.raises(ValueError):
        reader_cls(m.hdr, m.data, 64, doubled=True)  # needs 2 * size
    with pytest.raises(TypeError):
        reader_cls(bytes(4096), m.data, 64)  # read-only header
    with pytest.raises(ValueError):
        rd.read(bytearray(64), array("I", [0, 0]), 2)  # index too short
    with pytest.raises(TypeError):
        rd.read(b"readonly", array("I", [0, 0]), 1)
    with pytest.raises(ring.RingArgumentError):
        batch_cls([ring.OutPacket(6, 0, 0, [bytes(4)], ext_len=8)])  # ext beyond body
    with pytest.raises(ring.RingArgumentError):
        batch_cls([ring.OutPacket(6, 0, 0, [bytes(4)], ext_len=4)])  # ext not 8-aligned
    with pytest.raises(ValueError):
        batch_cls([ring.OutPacket(6, 0, -1, [])])
    with pytest.raises(ring.RingArgumentError):
        wr.request_space(0)
    with pytest.raises(ring.RingArgumentError):
        wr.request_space(64)
    with pytest.raises(ring.RingArgumentError):
        wr.write_raw(bytearray(16), array("I", [8, 16]), 1)  # outside buf
    with pytest.raises(ValueError):
        wr.write(batch_cls([]), start=1)
    assert rd.read(bytearray(8), array("I", [0, 0]), 1) == ring.ReadResult(0, 0, 0, False, None)


@needs_native
def test_out_too_small_same_in_both() -> None:
    size = 512
    for impl in IMPLS:
        m = mem("plain", size, 4)
        m.reset(0, 0)
        rd, wr, batch_cls = _open(impl, m)
        wr.write(
            batch_cls([ring.OutPacket(6, 0, 1, [bytes(40)]), ring.OutPacket(6, 0, 2, [bytes(80)])])
        )
        idx = array("I", [0, 0] * 4)
        assert rd.read(bytearray(40), idx, 4) == ring.ReadResult(
            0, 0, 0, False, ring.RingError.OUT_TOO_SMALL
        )
        assert rd.read(bytearray(100), idx, 4) == ring.ReadResult(1, 56, 64, False, None)
        assert rd.read(bytearray(96), idx, 4) == ring.ReadResult(1, 96, 104, False, None)


@needs_native
@pytest.mark.parametrize("seed", range(6))
def test_long_random_sequences(seed: int) -> None:
    """Long producer/consumer runs (what short hypothesis examples rarely reach):
    both flavours agree byte for byte and deliver every packet FIFO, at any start."""
    rng = random.Random(seed)
    kind, size = rng.choice([("plain", 64), ("plain", 256), ("guarded", 4096), ("double", 4096)])
    start = rng.randrange(0, size, 8)
    mems = [mem(kind, size, slot) for slot in (0, 1)]
    ends = []
    for impl, m in zip(IMPLS, mems, strict=True):
        m.reset(start, start)
        ends.append(_open(impl, m))
    model: list[bytes] = []
    for _ in range(400):
        if rng.random() < 0.5:
            specs = []
            for _ in range(rng.randrange(1, 6)):
                n = rng.choice((rng.randrange(0, 25), rng.randrange(0, size - 31)))
                specs.append((rng.choice((6, 0xB)), rng.randrange(2), rng.randrange(2**64), n))
            pkts = [
                ring.OutPacket(t, f, i, [random.Random(n).randbytes(n)]) for t, f, i, n in specs
            ]
            res = [e[1].write(e[2](pkts)) for e in ends]
            assert res[0] == res[1]
            for t, f, i, n in specs[: res[0].npkts]:
                model.append(expected_packet(t, f, i, 0, random.Random(n).randbytes(n)))
        else:
            k = rng.randrange(1, 9)
            cap = rng.choice((size, rng.randrange(size)))
            outs = [(bytearray(cap), array("I", bytes(8 * k))) for _ in IMPLS]
            res = [e[0].read(o, ix, k) for e, (o, ix) in zip(ends, outs, strict=True)]
            assert res[0] == res[1] and outs[0] == outs[1]
            out, idx = outs[0]
            got = [
                bytes(out[idx[2 * j] : idx[2 * j] + idx[2 * j + 1]]) for j in range(res[0].npkts)
            ]
            assert got == model[: len(got)]
            del model[: len(got)]
        assert mems[0].snapshot() == mems[1].snapshot()
        assert mems[0].mirror_ok()


# ------------------------------------------------------------------ the twin's header access


def test_twin_release_lets_the_mapping_close() -> None:
    """The twin sees the header through a ctypes array (one 32-bit access per field),
    which holds its own export of the shared mapping: release() must drop it, or the
    guest memory could never be unmapped. Unreleased ends keep the mapping open."""
    import mmap

    size = 4096
    m = mmap.mmap(-1, ring.HDR_SIZE + size)
    mv = memoryview(m)
    ring.init_ring_header(mv[: ring.HDR_SIZE])
    ends = [
        cls(mv[: ring.HDR_SIZE], mv[ring.HDR_SIZE :], size)
        for cls in (ring.PyRingReader, ring.PyRingWriter)
    ]
    mv.release()
    for e in ends:
        e.open()
    with pytest.raises(BufferError):
        m.close()
    for e in ends:
        e.release()
    m.close()


def test_twin_header_fields_are_single_words() -> None:
    """Each field the twin stores lands as one little-endian u32 at its offset, and a
    misaligned header is refused (an unaligned access could tear)."""
    m = mem("plain", 64)
    m.reset()
    wr = ring.PyRingWriter(m.hdr, m.data, 64)
    wr.open()
    assert wr.write(ring.PySendBatch([ring.OutPacket(6, 0, 1, [bytes(16)])])).npkts == 1
    assert m.get32(ring.OFF_WRITE_INDEX) == 40
    assert wr.request_space(32) is False  # 24 bytes free
    assert m.get32(ring.OFF_PENDING_SEND_SZ) == 32
    rd = ring.PyRingReader(m.hdr, m.data, 64)
    rd.open()
    rd.mask()
    assert m.get32(ring.OFF_INTERRUPT_MASK) == 1
    rd.release()
    wr.release()
    buf = bytearray(ring.HDR_SIZE + 8)
    with pytest.raises(ValueError, match="aligned"):
        ring.PyRingReader(memoryview(buf)[1 : 1 + ring.HDR_SIZE], bytearray(64), 64)


# ------------------------------------------------------------------ the native build


def _build_script() -> Any:
    """native/build_native.py as a module (it declares, it does not compile, on import)."""
    import importlib.util
    from pathlib import Path

    path = Path(native.__file__).resolve().parent.parent / "native" / "build_native.py"
    spec = importlib.util.spec_from_file_location("build_native_under_test", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cdef_comes_from_the_marked_spans(tmp_path: Any) -> None:
    """Only what sits between the marker lines reaches cffi, each #define's value
    becomes `...` (the compiler's value wins), and broken markers are refused."""
    build = _build_script()
    h = tmp_path / "x.h"
    h.write_text(
        "/* mentions cffi:begin in prose */\n#define HIDDEN 1\nstatic inline int f(void);\n"
        "/* cffi:begin */\n#define SHOWN (-4)  /* a comment\n   over two lines */\n"
        "struct s { int a; };  // trailing\nint g(int);\n/* cffi:end */\n"
    )
    cdef = build.cdef_of(h)
    assert "#define SHOWN ..." in cdef and "int g(int);" in cdef and "struct s" in cdef
    assert "HIDDEN" not in cdef and "inline" not in cdef and "comment" not in cdef
    h.write_text("/* cffi:begin */\nint g(int);\n")
    with pytest.raises(ValueError, match="unbalanced"):
        build.cdef_of(h)
    h.write_text("/* cffi:begin */\n#define F(x) (x)\n/* cffi:end */\n")
    with pytest.raises(ValueError, match="function-like"):
        build.cdef_of(h)


def test_abi_number_has_one_source(tmp_path: Any) -> None:
    """The ABI is written once (native/vmbusd.h): the build reports what it compiled,
    and a build from other sources is refused at import."""
    expected = native.source_abi()
    assert expected is not None  # tests run from the source tree
    if native.native_available():
        assert int(native.native_module().lib.VMBUSD_NATIVE_ABI) == expected
    native.check_abi(expected, expected)
    native.check_abi(expected, None)  # an installed wheel: nothing to compare with
    with pytest.raises(ImportError, match="stale"):
        native.check_abi(expected - 1, expected)
    assert native.source_abi(tmp_path / "missing.h") is None
    (tmp_path / "vmbusd.h").write_text("#define VMBUSD_NATIVE_ABI  42\n")
    assert native.source_abi(tmp_path / "vmbusd.h") == 42
