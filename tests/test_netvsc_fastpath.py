"""native/netvsc.c against its pure-Python twins (devices/netvsc/fastpath.py, which are
the reference parsers of rndis.py and offload.py), on random and hostile input:
RNDIS PACKET parsing with PPIs, checksum fill, LSO v2 segmentation, the receive
checksum result, Toeplitz, the packet filter with vRSS, and host PACKET building.
The two must agree on every input; the hostile cases of issue 10 (message length,
data and PPI offsets, PPI chains) must be refused by both."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.netvsc import fastpath as fp
from devices.netvsc import rndis as rn
from vmbus.native import native_available


@pytest.fixture(scope="module", autouse=True)
def native_built() -> None:
    """CI builds the extension: its absence is a failure here, never a skip."""
    if not native_available():
        pytest.fail("vmbus._native is not built (pip install -e .): the C side cannot run")


NATIVE = fp.native_impl() if native_available() else None
TWIN = fp.twin_impl()
MAC = bytes.fromhex("00155d000001")
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _native() -> fp._Native:
    assert NATIVE is not None
    return NATIVE


# --- frames -----------------------------------------------------------------------------


def ipv4_frame(proto: int, payload: bytes, *, vlan: bool = False, ihl: int = 5) -> bytes:
    l4 = _l4(proto, payload)
    opts = b"\x01" * (4 * (ihl - 5))
    ip = struct.pack(
        ">BBHHHBBH4s4s", 0x40 | ihl, 0, 4 * ihl + len(l4), 0x1234, 0, 64, proto, 0,
        b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02",
    ) + opts  # fmt: skip
    return _eth(0x0800, vlan) + ip + l4


def ipv6_frame(proto: int, payload: bytes, *, vlan: bool = False) -> bytes:
    l4 = _l4(proto, payload)
    ip = struct.pack(">IHBB16s16s", 0x60000000, len(l4), proto, 64, b"\x20" * 16, b"\x21" * 16)
    return _eth(0x86DD, vlan) + ip + l4


def _eth(ethertype: int, vlan: bool) -> bytes:
    if vlan:
        return MAC + b"\x02" * 6 + struct.pack(">HHH", 0x8100, 5, ethertype)
    return MAC + b"\x02" * 6 + struct.pack(">H", ethertype)


def _l4(proto: int, payload: bytes) -> bytes:
    if proto == 6:
        return struct.pack(">HHIIBBHHH", 1000, 80, 0xFFFFFF00, 1, 0x50, 0x99, 500, 0, 0) + payload
    if proto == 17:
        return struct.pack(">HHHH", 53, 5353, 8 + len(payload), 0) + payload
    return payload


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """IPv4/IPv6 TCP/UDP/other frames, VLAN-tagged or not, then perhaps damaged."""
    version = draw(st.sampled_from([4, 6]))
    proto = draw(st.sampled_from([6, 17, 1]))
    payload = draw(st.binary(min_size=0, max_size=3000))
    vlan = draw(st.booleans())
    if version == 4:
        f = ipv4_frame(proto, payload, vlan=vlan, ihl=draw(st.sampled_from([5, 5, 6, 15])))
    else:
        f = ipv6_frame(proto, payload, vlan=vlan)
    b = bytearray(f)
    for _ in range(draw(st.integers(0, 3))):
        b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.one_of(st.none(), st.integers(0, len(b))))
    return bytes(b if cut is None else b[:cut])


# --- transmit: RNDIS PACKET parsing -----------------------------------------------------


def ppi(t: int, value: int, *, size: int = 16, offset: int = 12) -> bytes:
    """One 16-byte PPI element whose size and offset fields say what the test wants."""
    return struct.pack("<IIII", size, t, offset, value)


def packet(frame: bytes, ppis: bytes = b"", **over: int) -> bytes:
    """A guest RNDIS PACKET as netvsc_xmit lays it out; `over` replaces header fields."""
    f = {
        "type": 1,
        "len": 44 + len(ppis) + len(frame),
        "d_off": 36 + len(ppis),
        "d_len": len(frame),
        "oob_off": 0,
        "oob_len": 0,
        "oob_n": 0,
        "p_off": 36 if ppis else 0,
        "p_len": len(ppis),
        "vc": 0,
        "res": 0,
    }
    f.update(over)
    return struct.pack("<II9I", *f.values()) + ppis + frame


def both_parse(buf: bytes, index: list[tuple[int, int]], max_frame: int = 1514) -> list[fp.TxMsg]:
    a = _native().tx_parse(buf, index, max_frame)
    b = TWIN.tx_parse(buf, index, max_frame)
    assert a == b
    return a


_FIELDS = ["type", "len", "d_off", "d_len", "oob_off", "oob_len", "oob_n", "p_off", "p_len", "vc"]
_INTERESTING = st.one_of(
    st.integers(0, 64), st.integers(0, 0xFFFFFFFF), st.sampled_from([0xFFFFFFFF, 0x80000000, 36])
)


@st.composite
def ppi_areas(draw: st.DrawFn) -> bytes:
    out = b""
    for _ in range(draw(st.integers(0, 5))):
        t = draw(st.sampled_from([0, 2, 6, 8, 9, 1, 0x80000001]))
        if t == 0:
            v = draw(
                st.one_of(
                    st.integers(0, 0xFFFFFFFF),
                    st.sampled_from([0x220015, 0x220005, 0x360006, 0x22000A, 0x3, 0xC, 0]),
                )
            )
        elif t == 2:
            v = draw(st.one_of(st.integers(0, 0xFFFFFFFF), st.just((1 << 30) | (34 << 20) | 1448)))
        elif t == 6:
            v = draw(st.one_of(st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF)))
        else:
            v = draw(st.integers(0, 0xFFFFFFFF))
        size = draw(st.one_of(st.just(16), st.sampled_from([0, 4, 12, 13, 20, 0xFFFFFFF0])))
        offset = draw(st.one_of(st.just(12), st.sampled_from([0, 11, 16, 20])))
        out += struct.pack("<III", size, t, offset) + struct.pack("<I", v)
    return out


@st.composite
def nvsp_messages(draw: st.DrawFn) -> bytes:
    """One NVSP message's RNDIS bytes: 1..9 PACKETs (or a control message) with random
    PPIs, header fields perhaps replaced by hostile values, perhaps trailing bytes."""
    if draw(st.integers(0, 9)) == 0:
        req = draw(st.sampled_from([2, 3, 4, 5, 6, 8, 0x80000002, 0]))
        return struct.pack("<III", req, 12 + 16, 7) + b"\0" * 16
    out = b""
    for _ in range(draw(st.integers(1, 9))):
        frame = draw(st.binary(min_size=0, max_size=200)) or b"\0"
        over = {}
        if draw(st.integers(0, 3)) == 0:
            over[draw(st.sampled_from(_FIELDS))] = draw(_INTERESTING)
        out += packet(frame, draw(ppi_areas()), **over)
    return out + draw(st.sampled_from([b"", b"\0" * 8, b"\0" * 4, b"\x01\0\0\0\x08\0\0\0"]))


@FAST
@given(st.lists(nvsp_messages(), min_size=1, max_size=6), st.sampled_from([1514, 60, 9014]))
def test_tx_parse_native_equals_twin(msgs: list[bytes], max_frame: int) -> None:
    buf, index = b"", []
    for m in msgs:
        index.append((len(buf), len(m)))
        buf += m + b"\xee" * 3  # unaligned starts too
    both_parse(buf, index, max_frame)


@FAST
@given(st.binary(min_size=0, max_size=600))
def test_tx_parse_random_bytes(data: bytes) -> None:
    both_parse(data, [(0, len(data))])


def test_tx_parse_reads_what_linux_sends() -> None:
    frame = ipv4_frame(6, b"x" * 100)
    csum = rn.TXCSUM_IPV4 | rn.TXCSUM_TCP | (34 << 16)
    msg = packet(frame, ppi(0, csum) + ppi(6, 5 << 4) + ppi(8, 0xABCD))
    (res,) = both_parse(msg, [(0, len(msg))])
    assert res.status == fp.OK
    (p,) = res.pkts
    assert msg[p.data_off : p.data_off + p.data_len] == frame
    assert (p.csum, p.lso, p.vlan, p.hash_value) == (csum, 0, 5 << 4, 0xABCD)
    assert p.flags == fp.HAS_VLAN | fp.HAS_HASH
    # batched PACKETs in one NVSP message, each frame found at its place
    two = msg + packet(b"\x01" * 60)
    (res,) = both_parse(two, [(0, len(two))])
    assert res.status == fp.OK and [p.data_len for p in res.pkts] == [len(frame), 60]


@pytest.mark.parametrize(
    "msg",
    [
        packet(b"\x01" * 60, len=44 + 61),  # message_length past the packet
        packet(b"\x01" * 60, len=7),  # smaller than its header
        packet(b"\x01" * 60, d_off=30),  # data inside the header
        packet(b"\x01" * 60, d_len=61),  # data past the message
        packet(b"\x01" * 60, d_off=0xFFFFFFF0),  # offset + length wraps
        packet(b"\x01" * 60, d_len=0),
        packet(b"\x01" * 60, ppi(0, 0x220015), p_off=38),  # PPI area not 4-aligned
        packet(b"\x01" * 60, ppi(0, 0x220015), p_len=17 + 60),  # PPI area past the message
        packet(b"\x01" * 60, ppi(0, 0x220015), p_off=36 + 16),  # PPI area over the frame
        packet(b"\x01" * 60, ppi(0, 0x220015, size=0)),  # a PPI of size 0: a loop
        packet(b"\x01" * 60, ppi(0, 0x220015, size=32)),  # a PPI past its area
        packet(b"\x01" * 60, ppi(0, 0x220015, offset=20)),  # payload past its PPI
        packet(b"\x01" * 60, ppi(6, 1 << 4) + ppi(6, 2 << 4)),  # one PPI twice
        packet(b"\x01" * 60, b"".join(ppi(0x100 + i, 0) for i in range(17))),  # too many
        packet(b"\x01" * 60, ppi(6, 4095 << 4)),  # VLAN id out of range
        packet(b"\x01" * 60, ppi(2, 1448 | (14 << 20))),  # LSO v1
        packet(b"\x01" * 60, ppi(0, 0x3)),  # IPv4 and IPv6
        packet(b"\x01" * 1515),  # above the MTU without LSO
        packet(b"\x01" * 60, oob_n=1),
        struct.pack("<II", 1, 0),  # a zero length cannot loop
    ],
)
def test_hostile_packets_are_refused_by_both(msg: bytes) -> None:
    (res,) = both_parse(msg, [(0, len(msg))])
    assert res.status == fp.BAD and res.pkts == []


def test_control_messages_go_to_the_slow_path() -> None:
    init = struct.pack("<IIIIII", 2, 24, 1, 1, 0, 0x4000)
    (res,) = both_parse(init, [(0, len(init))])
    assert res.status == fp.SLOW
    mixed = init + packet(b"\x01" * 60)  # control batched with a PACKET: refused
    (res,) = both_parse(mixed, [(0, len(mixed))])
    assert res.status == fp.BAD


def test_tx_parse_index_outside_the_buffer_is_a_caller_error() -> None:
    for impl in (_native(), TWIN):
        with pytest.raises(ValueError):
            impl.tx_parse(b"\0" * 16, [(8, 9)], 1514)


# --- offloads ---------------------------------------------------------------------------


@FAST
@given(frames(), st.one_of(st.integers(0, 0xFFFFFFFF), st.builds(
    lambda v4, tcp, iph, l4: (1 if v4 else 2) | (4 if tcp else 8) | (0x10 if iph else 0) | l4 << 16,
    st.booleans(), st.booleans(), st.booleans(), st.sampled_from([34, 38, 54, 58, 62, 14, 1023]),
)))  # fmt: skip
def test_csum_fill_native_equals_twin(frame: bytes, csum: int) -> None:
    a, b = bytearray(frame), bytearray(frame)
    ok_a, ok_b = _native().csum_fill(a, csum), TWIN.csum_fill(b, csum)
    assert ok_a == ok_b
    if ok_a:
        assert a == b


@FAST
@given(
    frames(),
    st.integers(1, 3000),
    st.sampled_from([34, 38, 54, 58, 14, 40, 1023]),
    st.booleans(),
    st.sampled_from([1, 1, 0]),
)
def test_lso_segment_native_equals_twin(
    frame: bytes, mss: int, tcp_offset: int, ipv6: bool, v2: int
) -> None:
    lso = mss | tcp_offset << 20 | v2 << 30 | int(ipv6) << 31
    assert _native().lso_segment(frame, lso) == TWIN.lso_segment(frame, lso)


def test_lso_segments_a_large_send() -> None:
    payload = bytes(range(256)) * 16
    frame = ipv4_frame(6, payload)
    segs = _native().lso_segment(frame, 1448 | 34 << 20 | 1 << 30)
    assert segs is not None and segs == TWIN.lso_segment(frame, 1448 | 34 << 20 | 1 << 30)
    assert [len(s) for s in segs] == [54 + 1448, 54 + 1448, 54 + 4096 - 2896]
    assert b"".join(s[54:] for s in segs) == payload
    assert all(
        _native().rx_csum(s) == rn.RXCSUM_IP_SUCCEEDED | rn.RXCSUM_TCP_SUCCEEDED for s in segs
    )
    seqs = [struct.unpack_from(">I", s, 38)[0] for s in segs]
    assert seqs == [0xFFFFFF00, (0xFFFFFF00 + 1448) & 0xFFFFFFFF, (0xFFFFFF00 + 2896) & 0xFFFFFFFF]
    assert [struct.unpack_from(">H", s, 18)[0] for s in segs] == [0x1234, 0x1235, 0x1236]
    assert [s[47] & 0x89 for s in segs] == [0x80, 0, 0x09]  # CWR first, FIN+PSH last


def test_lso_whose_segment_overflows_the_ip_length_is_refused() -> None:
    # Linux zeroes the large send's total length; the segment alone would be > 64 KiB
    frame = ipv4_frame(6, b"z" * 1000)
    frame = frame[:16] + b"\0\0" + frame[18:] + b"z" * (0xFFFF - 1040 + 1)
    lso = 0xFFFFF | 34 << 20 | 1 << 30
    assert _native().lso_segment(frame, lso) is None and TWIN.lso_segment(frame, lso) is None


@FAST
@given(frames())
def test_rx_csum_native_equals_twin(frame: bytes) -> None:
    assert _native().rx_csum(frame) == TWIN.rx_csum(frame)


@FAST
@given(st.binary(min_size=40, max_size=40), st.binary(min_size=0, max_size=36))
def test_toeplitz_native_equals_twin(key: bytes, data: bytes) -> None:
    assert _native().toeplitz(key, data) == TWIN.toeplitz(key, data)


def test_toeplitz_microsoft_vector() -> None:
    # Microsoft's RSS verification vector (source address, destination, ports)
    data = bytes([66, 9, 149, 187, 161, 142, 100, 80]) + struct.pack(">HH", 2794, 1766)
    assert _native().toeplitz(rn.DEFAULT_RSS_KEY, data) == 0x51CCC178


# --- receive ----------------------------------------------------------------------------


@st.composite
def rx_frames(draw: st.DrawFn) -> bytes:
    dst = draw(
        st.sampled_from(
            [
                MAC,
                b"\xff" * 6,
                b"\x01\x00\x5e\x00\x00\x01",
                b"\x33\x33\x00\x00\x00\x01",
                b"\x02" * 6,
            ]
        )
    )
    return (dst + draw(frames())[6:])[: draw(st.integers(0, 4000))]


@FAST
@given(
    st.lists(rx_frames(), max_size=12),
    st.integers(0, 0x3F),
    st.lists(
        st.sampled_from([b"\x01\x00\x5e\x00\x00\x01", b"\x33\x33\x00\x00\x00\x02"]), max_size=2
    ),
    st.one_of(
        st.none(),
        st.builds(
            rn.RssParams,
            st.booleans(),
            st.sampled_from([0x1701, 0x0101, 0x0201, 0x0401, 0x1001, 0x1501]),
            st.binary(min_size=40, max_size=40),
            st.lists(st.integers(0, 3), min_size=1, max_size=128).map(tuple),
        ),
    ),
)
def test_rx_classify_native_equals_twin(
    batch: list[bytes], packet_filter: int, mcast: list[bytes], rss: rn.RssParams | None
) -> None:
    a = _native().rx_classify(batch, packet_filter, MAC, mcast, rss)
    assert a == TWIN.rx_classify(batch, packet_filter, MAC, mcast, rss)


def test_packet_filter_semantics() -> None:
    ours, other = MAC + b"x" * 54, b"\x02" * 6 + b"x" * 54
    bcast, listed, unlisted = b"\xff" * 60, b"\x01\x00\x5e\x00\x00\x01" * 10, b"\x33\x33" * 30
    batch = [ours, other, bcast, listed, unlisted]
    mcast = [b"\x01\x00\x5e\x00\x00\x01"]
    for f, want in [
        (rn.FILTER_DIRECTED, [1, 0, 0, 0, 0]),
        (rn.FILTER_BROADCAST, [0, 0, 1, 0, 0]),
        (rn.FILTER_MULTICAST, [0, 0, 0, 1, 0]),
        (rn.FILTER_ALL_MULTICAST, [0, 0, 0, 1, 1]),
        (rn.FILTER_PROMISCUOUS, [1, 1, 1, 1, 1]),
        (0x0D, [1, 0, 1, 1, 1]),  # what Linux sets
        (0, [0, 0, 0, 0, 0]),
    ]:
        for impl in (_native(), TWIN):
            got = [int(r.accept) for r in impl.rx_classify(batch, f, MAC, mcast, None)]
            assert got == want, (hex(f), impl)


@FAST
@given(
    st.lists(
        st.builds(
            fp.RxFrame,
            frames(),
            st.one_of(st.none(), st.integers(0, 0xFFFF).filter(lambda v: (v >> 4) <= 4094)),
            st.one_of(st.none(), st.integers(0, 0xFFFFFFFF)),
            st.sampled_from([0, 0x201, 0x1001]),
        ),
        max_size=8,
    ),
    st.sampled_from([1600, 2048, 4096]),
)
def test_rx_build_native_equals_twin(batch: list[fp.RxFrame], max_len: int) -> None:
    size = 4096 * (len(batch) + 1)
    a, b = bytearray(b"\xaa" * size), bytearray(b"\xaa" * size)
    offsets = [4096 * i + 8 for i in range(len(batch))]
    la = _native().rx_build(memoryview(a), batch, offsets, max_len)
    lb = TWIN.rx_build(memoryview(b), batch, offsets, max_len)
    assert la == lb and a == b
    for f, n, off in zip(batch, la, offsets, strict=True):
        if n:  # what the guest reads back: the frame at data_offset
            d_off, d_len = struct.unpack_from("<II", a, off + 8)
            assert a[off + 8 + d_off : off + 8 + d_off + d_len] == f.data


def test_rx_build_refuses_a_section_outside_the_buffer() -> None:
    frame = fp.RxFrame(b"\x01" * 60, None, None, 0)
    for impl in (_native(), TWIN):
        with pytest.raises(ValueError):
            impl.rx_build(memoryview(bytearray(4096)), [frame], [4000], 2000)
