"""Fuzz target for the ring buffer: guest-written indices, descriptors and batches
(vmbus/ring.py's reader and writer, and their C twins in native/ring.c).

The contract: whatever the guest put in the ring header and data area, `open`,
`bytes_to_read` and `request_space` succeed or raise RingCorrupt (with a RingError
code), `read` reports corruption as `ReadResult.error`, never by raising; every packet
a read delivers lies inside the output buffer with 2 <= offset8 <= len8; the C reader
and writer and the Python twin agree on every result, every byte they wrote and every
index they moved; neither touches memory outside the ring (the ring lives between
PROT_NONE guard pages, so a stray access kills the process: a crash is a finding), and
a doubled mapping stays mirrored.

    python tests/fuzz/fuzz_ring.py [libFuzzer options] [corpus dirs]

Input: byte 0 picks guarded/doubled memory and 1 or 2 pages; then the start index,
a run of packets (type, flags, offset8, len8 from pools or raw, a transaction id and
a fill byte each, some cut short),
the four header words (each either the consistent value or one from the input), and
the host's operations (read/peek with an output size and packet limit, a peek then
committed with `consume` of what it read or of a wrong count, a write of some bytes,
request_space) that both flavours then perform. `consume` commits or refuses
(ValueError, RingCorrupt) without moving anything.
"""

from __future__ import annotations

import sys
from array import array
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness, when imported by path
import harness

with harness.instrumented():
    import ring_support as rs

    from vmbus import native, ring

MAX_OPS = 6
_TYPES = (6, 6, 7, 9, 0xB, 0xB)


def _outcome(fn: Any, *args: Any, **kw: Any) -> Any:
    try:
        return ("ok", fn(*args, **kw))
    except ring.RingCorrupt as exc:
        assert isinstance(exc.code, int) and exc.code != 0
        return ("RingCorrupt", exc.code)
    except ring.RingArgumentError as exc:
        return ("RingArgumentError", exc.code)
    except ValueError:  # consume's refusal of a count it was not given by a peek
        return ("ValueError",)


def layout(r: harness.Reader, size: int) -> tuple[int, bytes]:
    """(start index, packet bytes) the guest wrote."""
    r0 = (r.u16() * 8) % size
    parts = []
    for _ in range(r.byte() % 6):
        if r.byte() & 1:  # fields from pools of likely and edge values
            typ = r.pick(_TYPES)
            flags = r.pick((0, 1, 1, 0xFFFF))
            off8 = r.pick((2, 2, 3, 0, 1, 5, 0xFFFF))
            len8 = r.pick((2, 3, 4, 8, 39, 0, 1, 0x1FF, 0xFFFF))
        else:  # raw descriptor fields (the recorded seeds use this)
            typ, flags, off8, len8 = r.u16(), r.u16(), r.u16(), r.u16()
        pkt = rs.raw_packet(typ, flags, off8, len8, tid=r.u32(), fill=r.byte())
        cut = r.byte()
        if cut < 32:
            pkt = pkt[: (cut * 8) % (len(pkt) + 1)]
        parts.append(pkt + bytes(8))
    blob = b"".join(parts)[: size - 8]
    return r0, blob[: len(blob) & ~7]


def check_one(data: bytes) -> None:
    r = harness.Reader(data)
    sel = r.byte()
    kind = ("guarded", "double")[sel & 1]
    size = rs.PAGE * (1 + (sel >> 1) % 2)
    impls = list(rs.IMPLS) if native.native_available() else ["py"]
    mems = [rs.mem(kind, size, slot) for slot in range(len(impls))]
    r0, blob = layout(r, size)
    w0 = (r0 + len(blob)) % size
    hdr = []
    for off, good in (
        (ring.OFF_WRITE_INDEX, w0),
        (ring.OFF_READ_INDEX, r0),
        (ring.OFF_PENDING_SEND_SZ, 0),
        (ring.OFF_FEATURE_BITS, 1),
    ):
        pick = r.byte()
        hdr.append((off, good if pick < 0xC0 else r.u32()))
    ops = r.take(6 * MAX_OPS)
    results = []
    for impl, m in zip(impls, mems, strict=True):
        m.reset(r0, r0)
        rs.put_ring(m, r0, blob)
        for off, v in hdr:
            m.set32(off, v)
        reader_cls, writer_cls, batch_cls = rs.classes(impl)
        rd = reader_cls(m.hdr, m.data, size, doubled=m.doubled)
        wr = writer_cls(m.hdr, m.data, size, doubled=m.doubled)
        res: list[Any] = [_outcome(rd.open), _outcome(wr.open)]
        for k in range(MAX_OPS):
            op = ops[6 * k : 6 * k + 6]
            out = bytearray(size if op[1] & 1 else (op[2] | op[3] << 8) % (size + 1))
            idx = array("I", bytes(8 * 16))
            max_pkts = op[4] % 17
            if op[0] % 3 == 0:
                got = rd.read(out, idx, max_pkts, peek=bool(op[0] & 4))
                res += [got, bytes(out), bytes(idx)]
                check_read(got, out, idx)
                if op[0] & 4 and op[5] & 1:  # commit the peek (Channel.receive(consume=False))
                    n = got.consumed + (4 * (op[5] >> 2) if op[5] & 2 else 0)  # or a wrong count
                    before = m.snapshot()
                    done = _outcome(rd.consume, n)
                    res.append(done)
                    if done[0] != "ok":  # refused: nothing moved
                        assert m.snapshot() == before, "a refused consume moved the ring"
            elif op[0] % 3 == 1:
                body = bytes([op[5]]) * ((op[2] | op[3] << 8) % size)
                res.append(_outcome(wr.write, batch_cls([ring.OutPacket(6, 0, 1, [body])])))
            else:
                res.append(_outcome(wr.request_space, 1 + (op[2] | op[3] << 8) % size))
            res += [_outcome(rd.bytes_to_read), rd.unmask()]
        res.append(m.snapshot())
        assert m.mirror_ok()
        results.append(res)
    if len(results) == 2:
        assert results[0] == results[1], "C and the Python twin disagree"


def check_read(got: ring.ReadResult, out: bytearray, idx: array[int]) -> None:
    """Every delivered packet lies inside `out`, its descriptor consistent."""
    assert 0 <= got.npkts and got.out_bytes <= len(out)
    for i in range(got.npkts):
        start, length = idx[2 * i], idx[2 * i + 1]
        assert start + length <= got.out_bytes
        _typ, off8, len8, _flags, _tid = rs.DESC.unpack_from(out, start)
        assert 2 <= off8 <= len8 and 8 * len8 == length


main = harness.main_for(check_one)

if __name__ == "__main__":
    main(sys.argv)
