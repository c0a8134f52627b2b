"""The simulated guest's per-request path (devices/storvsc/vsc.py SrbSlots, C in
native/storvsc_vsc.c): the native and the Python twin driven side by side.

Why: `vmbusd bench disk` picks one or the other with VMBUSD_NATIVE, so both must put
the same bytes on the ring (same LBAs from the same sequence, same trans ids, same
prefix when the ring fills) and read the same fields out of the same completions,
bad ones included. Hypothesis draws the slots, the LBA sequence, a ring small enough
to fill, and batches of completions; the twin is also checked against a model
(each request's LBA and block count, read back off the ring by a ring reader).
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.storvsc import vsc
from devices.storvsc.protocol import DataIn, encode_srb, srb_request
from devices.storvsc.vsc import (
    LbaSequence,
    NativeSrbSlots,
    PySrbSlots,
    SrbSlotsError,
    splitmix64,
)
from vmbus import native, ring
from vmbus.gpadl import PAGE_SIZE, GpaRange
from vmbus.packet import gpa_direct

DESC = struct.Struct("<HHHHQ")
FLAVOURS = (PySrbSlots, NativeSrbSlots)


def _packets(depth: int, npages: int, write: bool) -> list[ring.OutPacket]:
    """depth READ(16)/WRITE(16) slots as bench disk builds them (LBA 0, to be patched)."""
    cdb = bytes([0x8A if write else 0x88, 0]) + bytes(12) + b"\0\0"
    payload = srb_request(
        encode_srb(
            cdb=cdb,
            data_in=DataIn.WRITE if write else DataIn.READ,
            data_transfer_length=npages * PAGE_SIZE,
        )
    )
    return [
        gpa_direct(
            [GpaRange(npages * PAGE_SIZE, 0, tuple(range(100 + i * 8, 100 + i * 8 + npages)))],
            payload,
            trans_id=i + 1,
        )
        for i in range(depth)
    ]


def _ring(size: int, start: int, flavour: type[PySrbSlots]) -> tuple[Any, memoryview]:
    """A writer on fresh memory (header + data) whose indices start at `start`."""
    hdr, data = memoryview(bytearray(ring.HDR_SIZE)), memoryview(bytearray(size))
    ring.init_ring_header(hdr)
    struct.pack_into("<II", hdr, 0, start, start)
    cls = ring.NativeRingWriter if flavour is NativeSrbSlots else ring.PyRingWriter
    w = cls(hdr, data, size)
    w.open()
    return w, hdr


def _outcome(fn: Any, *args: Any) -> Any:
    try:
        return ("ok", fn(*args))
    except SrbSlotsError as exc:
        return ("SrbSlotsError", exc.code)
    except (ring.RingCorrupt, ring.RingArgumentError) as exc:
        return (type(exc).__name__, exc.code)


def test_error_codes_match_native() -> None:
    """The twin's codes are the C header's (the twin runs without the extension)."""
    lib = native.native_module().lib
    assert (vsc.E_BAD_ARG, vsc.E_TRANS_ID) == (lib.VMB_VSC_E_BAD_ARG, lib.VMB_VSC_E_TRANS_ID)
    assert (vsc.E_NOT_COMP, vsc.E_SHORT) == (lib.VMB_VSC_E_NOT_COMP, lib.VMB_VSC_E_SHORT)
    assert vsc.COMP_MIN == lib.VMB_VSC_COMP_MIN
    assert vsc.SRB_STATUS_SUCCESS == lib.VMB_VSC_SRB_SUCCESS


def test_selected_flavour() -> None:
    """VMBUSD_NATIVE picks SrbSlots as it picks the rings (bench disk's `impl`)."""
    assert vsc.SrbSlots is (NativeSrbSlots if native.NATIVE else PySrbSlots)


_step = st.one_of(
    st.tuples(
        st.just("submit"),
        st.permutations(range(1, 9)),
        st.integers(0, 8),
        st.integers(0, 2**63),
    ),
    st.tuples(st.just("drain")),
    st.tuples(st.just("resume")),
    st.tuples(st.just("bad_tid"), st.sampled_from([0, 9, 2**64 - 1])),
    st.tuples(st.just("complete"), st.permutations(range(1, 9)), st.integers(0, 8)),
    st.tuples(st.just("busy_tid"), st.permutations(range(1, 9))),
)


def _completions(tids: list[int]) -> tuple[bytes, bytes]:
    """Successful completions for tids, laid out as ring read() leaves them."""
    buf = b"".join(_completion(0xB, t, 1, 0, 1, 0, 4096, 64) for t in tids)
    n = len(buf) // max(1, len(tids))
    index = [v for i in range(len(tids)) for v in (i * n, n)]
    return buf, struct.pack(f"<{len(index)}I", *index)


@settings(max_examples=150, deadline=None)
@given(
    depth=st.integers(1, 8),
    npages=st.integers(1, 3),
    write=st.booleans(),
    random_lba=st.booleans(),
    seed=st.integers(0, 2**64 - 1),
    start_unit=st.integers(0, 2**64 - 1),
    span=st.one_of(st.integers(1, 64), st.integers(1, 2**64 - 1)),
    blocks=st.integers(1, 2**32 - 1),
    size=st.sampled_from([256, 512, 1024, 4096]),
    start8=st.integers(0, 31),
    steps=st.lists(_step, min_size=1, max_size=12),
)
def test_submit_native_equals_twin_and_model(
    depth: int,
    npages: int,
    write: bool,
    random_lba: bool,
    seed: int,
    start_unit: int,
    span: int,
    blocks: int,
    size: int,
    start8: int,
    steps: list[tuple[Any, ...]],
) -> None:
    """Every submit/resume/parse gives the same result, ring bytes, LBA state, t0,
    busy flags and templates in both; a slot in flight is refused (submitted twice)
    until its completion is parsed; each packet that reached the ring is its slot's
    template with the model's next LBA and block count, in submit order."""
    start = (start8 * 8) % size
    pkts = _packets(depth, npages, write)
    sides = []
    for flavour in FLAVOURS:
        seq = LbaSequence(span, blocks, random_lba, rng=seed, next=start_unit)
        w, hdr = _ring(size, start, flavour)
        sides.append((flavour(pkts, seq, max_batch=8), w, hdr))
    # the model: what the next LBAs are, and what each slot's packet must be
    m_rng, m_next = seed, start_unit
    expect: list[bytes] = []  # packets written since the last drain, in order
    pending: list[bytes] = []  # patched by the last submit, not written yet
    tmpl0 = bytes(sides[0][0].tmpl)
    pkt_len, lba_at = sides[0][0].pkt_len, sides[0][0].lba_at
    busy: set[int] = set()  # the model's slots in flight (by trans id)
    for step in steps:
        if step[0] == "submit":
            _, perm, n, now = step
            tids = [t for t in perm if t <= depth and t not in busy][:n]
            outs = [_outcome(s.submit, w, tids, len(tids), now) for s, w, _ in sides]
            busy |= set(tids)
            pending = []
            for tid in tids:
                if random_lba:
                    m_rng, x = splitmix64(m_rng)
                    unit = x % span
                else:
                    unit, m_next = m_next % span, (m_next + 1) % 2**64
                p = bytearray(tmpl0[(tid - 1) * pkt_len : tid * pkt_len])
                struct.pack_into(">QI", p, lba_at, (unit * blocks) % 2**64, blocks)
                pending.append(bytes(p))
        elif step[0] == "bad_tid":
            free = [t for t in range(1, depth + 1) if t not in busy]
            tids = [*free[: min(1, depth - 1)], step[1]]
            outs = [_outcome(s.submit, w, tids, len(tids), 0) for s, w, _ in sides]
            assert outs[0] == ("SrbSlotsError", vsc.E_TRANS_ID)
        elif step[0] == "busy_tid":
            tids = [t for t in step[1] if t <= depth and t not in busy][:1]
            tids += [t for t in step[1] if t in busy][:1] or tids  # in flight, or twice
            if not tids or len(tids) > depth:
                continue
            outs = [_outcome(s.submit, w, tids, len(tids), 0) for s, w, _ in sides]
            assert outs[0] == ("SrbSlotsError", vsc.E_TRANS_ID)
        elif step[0] == "complete":
            done = [t for t in step[1] if t in busy][: step[2]]
            buf, idx = _completions(done)
            outs = [_outcome(s.parse, buf, idx, len(done), 0) for s, _w, _h in sides]
            assert outs[0][0] == "ok"
            busy -= set(done)
        elif step[0] == "resume":
            outs = [_outcome(s.resume, w) for s, w, _ in sides]
        else:  # the host consumed everything: read_index = write_index
            for _s, _w, hdr in sides:
                hdr[4:8] = hdr[0:4]
            expect = []
            continue
        assert outs[0] == outs[1], step
        if outs[0][0] == "ok" and step[0] in ("submit", "resume"):
            res = outs[0][1]
            expect += pending[: res.npkts]
            pending = pending[res.npkts :]
            assert sides[0][0].unsent == sides[1][0].unsent == len(pending)
        py, nat = sides[0][0], sides[1][0]
        assert bytes(py.tmpl) == bytes(nat.tmpl)
        assert (py.seq.rng, py.seq.next) == (nat.seq.rng, nat.seq.next)
        assert list(py.t0) == list(nat.t0[0 : py.nslots])
        assert list(py.busy) == list(nat.busy[0 : py.nslots])
        assert {i + 1 for i, b in enumerate(py.busy) if b} == busy
        assert bytes(sides[0][1]._data) == bytes(sides[1][1]._data)
        assert bytes(sides[0][2]) == bytes(sides[1][2])
    # read back what the twin wrote since the last drain: the model's packets, in order
    _s, w, hdr = sides[0]
    rd = ring.PyRingReader(hdr, w._data, size)
    rd.open()
    out = bytearray(size)
    index = bytearray(8 * 64)
    got = rd.read(out, index, 64)
    idx = memoryview(index).cast("I")
    assert got.error is None and got.npkts == len(expect)
    got_pkts = [bytes(out[idx[2 * i] : idx[2 * i] + idx[2 * i + 1]]) for i in range(got.npkts)]
    assert got_pkts == expect


def _completion(
    typ: int, tid: int, op: int, status: int, srb: int, scsi: int, xfer: int, plen: int
) -> bytes:
    payload = bytearray(max(plen, 28))
    struct.pack_into("<III", payload, 0, op, 0, status)
    payload[14], payload[15] = srb, scsi
    struct.pack_into("<I", payload, 24, xfer)
    payload = payload[:plen]
    body = bytes(payload) + bytes(-len(payload) % 8)
    return DESC.pack(typ, 2, (16 + len(body)) // 8, 0, tid) + body


_comp = st.builds(
    _completion,
    typ=st.sampled_from([0xB] * 12 + [6, 9]),
    tid=st.one_of(st.integers(1, 8), st.sampled_from([0, 9, 2**64 - 1])),
    op=st.sampled_from([1] * 6 + [3, 11]),
    status=st.sampled_from([0] * 6 + [0xC0000001]),
    srb=st.sampled_from([1] * 6 + [0x04, 0x20, 0x81]),
    scsi=st.sampled_from([0, 0, 2, 8]),
    xfer=st.integers(0, 2**32 - 1),
    plen=st.sampled_from([64] * 12 + [0, 16, 27, 28, 48]),
)


@settings(max_examples=300, deadline=None)
@given(
    comps=st.lists(_comp, min_size=0, max_size=8),
    t0=st.lists(st.integers(0, 2**64 - 1), min_size=8, max_size=8),
    now=st.integers(0, 2**64 - 1),
    gap=st.integers(0, 3),
)
def test_parse_native_equals_twin(comps: list[bytes], t0: list[int], now: int, gap: int) -> None:
    """Same result or error (and where), same arrays and in-flight flags for every
    completion parsed, on completions laid out as ring read() leaves them (8-aligned,
    maybe apart); a second completion for one request is an error."""
    buf = bytearray()
    index: list[int] = []
    for c in comps:
        buf += bytes(8 * gap)
        index += [len(buf), len(c)]
        buf += c
    idx = struct.pack(f"<{len(index)}I", *index)
    sides = [flavour(_packets(8, 1, False), LbaSequence(1, 1, False), 8) for flavour in FLAVOURS]
    for s in sides:
        for i, v in enumerate(t0):
            s.t0[i] = v
            s.busy[i] = 1  # every slot in flight: a second completion for one is refused
    outs = []
    for s in sides:
        try:
            outs.append(("ok", s.parse(buf, idx, len(comps), now), len(comps)))
        except SrbSlotsError as exc:
            outs.append(("error", exc.code, exc.at))
    assert outs[0] == outs[1]
    assert list(sides[0].busy) == list(sides[1].busy[0:8])
    n = outs[0][2]
    names = ("trans_id", "vstor_status", "srb_status", "scsi_status", "xfer_len", "lat_ns")
    for name in names:
        py, nat = getattr(sides[0], name), getattr(sides[1], name)
        assert list(py[:n]) == list(nat[0:n]), name
    # and the twin against the packets themselves
    py = sides[0]
    for k in range(n):
        off = index[2 * k]
        _typ, _o8, _l8, _fl, tid = DESC.unpack_from(buf, off)
        _op, _f, status = struct.unpack_from("<III", buf, off + 16)
        assert py.trans_id[k] == tid and py.vstor_status[k] == status
        assert py.srb_status[k] == buf[off + 16 + 14] and py.scsi_status[k] == buf[off + 16 + 15]
        assert py.lat_ns[k] == max(0, now - t0[tid - 1])
    if outs[0][0] == "ok":
        r = outs[0][1]
        failed = [
            k
            for k in range(n)
            if struct.unpack_from("<I", buf, index[2 * k] + 16)[0] != 1
            or py.vstor_status[k]
            or py.srb_status[k] != 1
        ]
        assert (r.nfailed, r.first_failed) == (len(failed), failed[0] if failed else 0)
        assert r.bytes == sum(py.xfer_len[k] for k in range(n))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_bad_arguments(flavour: type[PySrbSlots]) -> None:
    """A span of 0 and a batch larger than the slots or the parse arrays are the
    caller's mistakes, refused before anything is written."""
    w, hdr = _ring(4096, 0, flavour)
    s = flavour(_packets(2, 1, False), LbaSequence(0, 1, True), 4)
    with pytest.raises(SrbSlotsError) as exc:
        s.submit(w, [1], 1, 0)
    assert exc.value.code == vsc.E_BAD_ARG
    s.seq.span = 1
    with pytest.raises(ValueError):
        s.submit(w, [1, 2, 1], 3, 0)
    with pytest.raises(ValueError):
        s.parse(bytearray(64), bytes(40), 5, 0)
    assert bytes(hdr[:4]) == bytes(4)  # write_index never moved
    with pytest.raises(ValueError):
        flavour(_packets(2, 1, False)[:1] + _packets(2, 2, False)[1:], LbaSequence(1, 1, True), 4)
