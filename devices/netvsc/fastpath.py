"""netvsc per-packet work, one call per batch: native/netvsc.c, or its pure-Python
twins here (`VMBUSD_NATIVE=0`, through vmbus/native.py).

Python decides per batch, the per-frame loops are C:
- `tx_parse`: the RNDIS messages of a batch of SEND_RNDIS_PKTs checked and read (the
  frames' places, checksum/LSO/VLAN/hash PPIs). OK means the reference parsers
  (rndis.split_messages + rndis.parse_packet) accept it with the same result;
  control messages (SLOW) and whatever they refuse (BAD) go to the VSP's Python slow
  path, whose answer to the guest is unchanged.
- `csum_fill`, `lso_segment`: offload.fill_checksum and offload.segment; a frame
  they refuse returns False/None and the caller asks offload.py for the exact error.
- `rx_classify`: the packet filter the guest set (directed/multicast/broadcast/
  promiscuous) and vRSS (Toeplitz over its key, its indirection table) for a batch.
- `rx_build`: host RNDIS PACKETs (checksum result, VLAN, hash PPIs, then the frame)
  written into receive-buffer sections.

The twins are the reference code of rndis.py and offload.py, so the differential
tests (tests/test_netvsc_fastpath.py) hold the C to the behaviour the rest of the
suite checks. All input is our own copy of guest bytes (copied once by the VSP).
"""

from __future__ import annotations

import array
import itertools
import struct
from collections.abc import Sequence
from typing import Any, Final, NamedTuple

from devices.netvsc import offload
from devices.netvsc import rndis as rn
from vmbus import native

OK: Final = 0
SLOW: Final = 1
BAD: Final = -1
HAS_VLAN: Final = 0x1
HAS_HASH: Final = 0x2
PPI_SIZE: Final = 16  # one host PPI: header + u32

_TX_MSG = struct.Struct("<iIII")
_TX_PKT = struct.Struct("<8I")
_U32 = struct.Struct("<I")
_RX_FRAME_SIZE = 32  # struct vmb_nv_rx_frame


class TxPkt(NamedTuple):
    """One checked guest PACKET: the frame is buf[data_off : data_off + data_len];
    csum and lso are the PPI values (0: not asked for); vlan/hash_value when flags say."""

    data_off: int
    data_len: int
    csum: int
    lso: int
    vlan: int
    hash_value: int
    flags: int


class TxMsg(NamedTuple):
    """One NVSP message: OK with its PACKETs, SLOW (control) or BAD (no packets)."""

    status: int
    pkts: list[TxPkt]


class RxIn(NamedTuple):
    """A received frame as classified: filter verdict, queue, hash value and info."""

    accept: bool
    queue: int
    hash_value: int | None
    hash_info: int


class RxFrame(NamedTuple):
    """A frame to indicate: vlan is the 802.1Q PPI value or None."""

    data: bytes
    vlan: int | None
    hash_value: int | None
    hash_info: int


_PASS = RxIn(True, 0, None, 0)
_DROP = RxIn(False, 0, None, 0)


# --- pure-Python twins ------------------------------------------------------------------


def py_tx_parse(buf: bytes, index: Sequence[tuple[int, int]], max_frame: int) -> list[TxMsg]:
    out: list[TxMsg] = []
    view = memoryview(buf)
    for start, length in index:
        if start > len(buf) or length > len(buf) - start:
            raise ValueError(f"index entry {start}+{length} outside {len(buf)} bytes")
        try:
            msgs = rn.split_messages(view[start : start + length])
            if msgs[0][0] != rn.MsgType.PACKET:
                out.append(TxMsg(SLOW, []))
                continue
            pkts = []
            pos = start
            for _, msg in msgs:
                p = rn.parse_packet(msg, max_frame=max_frame)
                pkts.append(_tx_pkt_of(msg, p, pos))
                pos += len(msg)
        except rn.RndisError:
            out.append(TxMsg(BAD, []))
            continue
        out.append(TxMsg(OK, pkts))
    return out


def _tx_pkt_of(msg: memoryview, p: rn.TxPacket, base: int) -> TxPkt:
    """The PPI values as the guest wrote them (parse_packet has checked each)."""
    csum = lso = vlan = 0
    flags = 0
    if p.checksum is not None or p.lso is not None or p.vlan is not None:
        p_off, p_len = struct.unpack_from("<II", msg, 28)
        area = msg[rn.RNDIS_HEADER_SIZE + p_off : rn.RNDIS_HEADER_SIZE + p_off + p_len]
        for type_word, payload in rn.walk_ppis(area):
            if type_word == rn.PpiType.TCPIP_CHKSUM:
                csum = int(_U32.unpack_from(payload)[0])
            elif type_word == rn.PpiType.TCP_LARGESEND:
                lso = int(_U32.unpack_from(payload)[0])
            elif type_word == rn.PpiType.IEEE_8021Q:
                vlan = int(_U32.unpack_from(payload)[0])
    if p.vlan is not None:
        flags |= HAS_VLAN
    if p.hash_value is not None:
        flags |= HAS_HASH
    hash_value = p.hash_value or 0
    return TxPkt(base + p.data_start, p.data_len, csum, lso, vlan, hash_value, flags)


def py_csum_fill(frame: bytearray, csum: int) -> bool:
    if csum == 0:
        return True
    try:
        c = rn.tx_checksum_of(csum, len(frame))
        if c is not None:
            offload.fill_checksum(frame, c)
    except (rn.RndisError, offload.OffloadError):
        return False
    return True


def py_lso_segment(frame: bytes, lso: int) -> list[bytes] | None:
    try:
        return offload.segment(frame, rn.lso_of(lso, len(frame)))
    except (rn.RndisError, offload.OffloadError):
        return None


def py_rx_csum(frame: bytes) -> int:
    return offload.rx_checksum_info(frame)


def py_toeplitz(key: bytes, data: bytes) -> int:
    return rn.toeplitz_hash(key, data)


def passes_filter(frame: bytes, packet_filter: int, mac: bytes, mcast: Sequence[bytes]) -> bool:
    """The RNDIS packet filter on receive, as NDIS applies it."""
    if packet_filter & rn.FILTER_PROMISCUOUS:
        return True
    if len(frame) < rn.ETH_ALEN:
        return False
    dst = frame[: rn.ETH_ALEN]
    if dst == b"\xff" * rn.ETH_ALEN:
        return bool(packet_filter & rn.FILTER_BROADCAST)
    if dst[0] & 1:
        if packet_filter & rn.FILTER_ALL_MULTICAST:
            return True
        return bool(packet_filter & rn.FILTER_MULTICAST) and dst in mcast
    return bool(packet_filter & rn.FILTER_DIRECTED) and dst == mac


def py_rx_classify(
    frames: Sequence[bytes],
    packet_filter: int,
    mac: bytes,
    mcast: Sequence[bytes],
    rss: rn.RssParams | None,
) -> list[RxIn]:
    out = []
    hash_info = rss.hash_info if rss is not None and rss.enabled else 0
    for f in frames:
        if not passes_filter(f, packet_filter, mac, mcast):
            out.append(RxIn(False, 0, None, 0))
            continue
        found = rn.rss_input(f, hash_info) if hash_info and rss is not None else None
        if found is None or rss is None:
            out.append(RxIn(True, 0, None, 0))
            continue
        data, hash_type = found
        h = rn.toeplitz_hash(rss.key, data)
        out.append(RxIn(True, rn.rss_queue(h, rss.table), h, rn.HASH_FUNC_TOEPLITZ | hash_type))
    return out


def py_rx_build(
    view: memoryview, frames: Sequence[RxFrame], offsets: Sequence[int], max_len: int
) -> list[int]:
    lens = []
    for f, offset in zip(frames, offsets, strict=True):
        if offset > len(view) or max_len > len(view) - offset:
            raise ValueError(f"section at {offset} + {max_len} outside {len(view)} bytes")
        head = rn.packet_header(
            len(f.data),
            rx_checksum=offload.rx_checksum_info(f.data),
            vlan=None if f.vlan is None else rn.vlan_of(f.vlan),
            hash_value=f.hash_value,
            hash_info=f.hash_info,
        )
        n = len(head) + len(f.data)
        if n > max_len:
            lens.append(0)
            continue
        view[offset : offset + len(head)] = head
        view[offset + len(head) : offset + n] = f.data
        lens.append(n)
    return lens


# --- native -----------------------------------------------------------------------------


class _Native:
    """The C functions behind the same signatures; scratch arrays kept and grown."""

    def __init__(self, ffi: Any, lib: Any) -> None:
        if (
            ffi.sizeof("struct vmb_nv_tx_pkt") != _TX_PKT.size
            or ffi.sizeof("struct vmb_nv_tx_msg") != _TX_MSG.size
            or ffi.sizeof("struct vmb_nv_rx_frame") != _RX_FRAME_SIZE
            or lib.VMB_NV_MAX_PKT_PER_MSG != rn.MAX_PKT_PER_MSG
            or lib.VMB_NV_MAX_XFER != rn.MAX_XFER_SIZE
            or lib.VMB_NV_MAX_PPI != rn.MAX_PPI_COUNT
            or lib.VMB_NV_MAX_FRAME_LSO != rn.MAX_FRAME_LSO
            or lib.VMB_NV_MAX_SEGMENTS != offload.MAX_SEGMENTS
        ):
            raise ImportError("vmbus._native netvsc layouts disagree with devices/netvsc")
        self.ffi, self.lib = ffi, lib
        self._cap = 0
        self._msgs: Any = None
        self._pkts: Any = None
        self._lens = ffi.new("uint32_t[]", offload.MAX_SEGMENTS)
        self._need = ffi.new("uint32_t *")

    def tx_parse(self, buf: bytes, index: Sequence[tuple[int, int]], max_frame: int) -> list[TxMsg]:
        ffi, n = self.ffi, len(index)
        if n > self._cap:
            self._cap = max(n, 64)
            self._msgs = ffi.new("struct vmb_nv_tx_msg[]", self._cap)
            self._pkts = ffi.new("struct vmb_nv_tx_pkt[]", self._cap * rn.MAX_PKT_PER_MSG)
        flat = [v for pair in index for v in pair]
        idx = ffi.new("uint32_t[]", flat) if flat else ffi.NULL
        np = self.lib.vmb_nv_tx_parse(buf, len(buf), idx, n, max_frame, self._msgs, self._pkts)
        if np < 0:
            raise ValueError(f"vmb_nv_tx_parse: {np} (an index entry outside the buffer)")
        recs = [
            TxPkt(*r[:7]) for r in _TX_PKT.iter_unpack(ffi.buffer(self._pkts, np * _TX_PKT.size))
        ]
        out = []
        for status, first, count, _ in _TX_MSG.iter_unpack(
            ffi.buffer(self._msgs, n * _TX_MSG.size)
        ):
            out.append(TxMsg(status, recs[first : first + count]))
        return out

    def csum_fill(self, frame: bytearray, csum: int) -> bool:
        return bool(self.lib.vmb_nv_csum_fill(self.ffi.from_buffer(frame), len(frame), csum) == 0)

    def lso_segment(self, frame: bytes, lso: int) -> list[bytes] | None:
        ffi, lib = self.ffi, self.lib
        cap = len(frame) * 2 + 256
        while True:
            out = ffi.new("uint8_t[]", cap)
            n = lib.vmb_nv_lso_segment(
                frame, len(frame), lso, out, cap, self._lens, offload.MAX_SEGMENTS, self._need
            )
            if n == lib.VMB_NV_E_SPACE:
                cap = int(self._need[0])
                continue
            if n < 0:
                return None
            data = ffi.buffer(out, cap)
            segs, pos = [], 0
            for i in range(n):
                ln = int(self._lens[i])
                segs.append(data[pos : pos + ln])
                pos += ln
            return segs

    def rx_csum(self, frame: bytes) -> int:
        return int(self.lib.vmb_nv_rx_csum(frame, len(frame)))

    def toeplitz(self, key: bytes, data: bytes) -> int:
        if len(key) * 8 < len(data) * 8 + 32:
            raise ValueError(f"a {len(key)}-byte key cannot hash {len(data)} bytes")
        return int(self.lib.vmb_nv_toeplitz(key, len(key), data, len(data)))

    @staticmethod
    def _records(frames: Sequence[bytes]) -> tuple[bytes, array.array[int]]:
        """The batch buffer and its struct vmb_nv_rx_frame records (8 u32 each) as
        one array, filled a column at a time (no per-frame cffi attribute access)."""
        n = len(frames)
        lens = array.array("I", map(len, frames))
        offs = array.array("I", itertools.accumulate(lens, initial=0))
        recs = array.array("I", bytes(_RX_FRAME_SIZE * max(1, n)))
        recs[0 : 8 * n : 8] = offs[:n]
        recs[1 : 8 * n : 8] = lens
        return b"".join(frames), recs

    def rx_classify(
        self,
        frames: Sequence[bytes],
        packet_filter: int,
        mac: bytes,
        mcast: Sequence[bytes],
        rss: rn.RssParams | None,
    ) -> list[RxIn]:
        ffi, n = self.ffi, len(frames)
        buf, recs = self._records(frames)
        enabled = rss is not None and rss.enabled and len(rss.key) == rn.RSS_KEY_SIZE
        hash_info = rss.hash_info if enabled and rss is not None else 0
        key = rss.key if enabled and rss is not None else bytes(rn.RSS_KEY_SIZE)
        table = list(rss.table) if enabled and rss is not None else []
        tab = ffi.new("uint32_t[]", table) if table else ffi.NULL
        m = b"".join(mcast)
        arr = ffi.from_buffer("struct vmb_nv_rx_frame[]", recs)
        r = self.lib.vmb_nv_rx_classify(
            buf, len(buf), arr, n, packet_filter, mac, m, len(mcast), hash_info, key, tab,
            len(table),
        )  # fmt: skip
        ffi.release(arr)
        if r < 0:
            raise ValueError(f"vmb_nv_rx_classify: {r}")
        if r == n and not hash_info:
            return [_PASS] * n
        out = []
        for accept, hashed, queue, value, info in zip(
            recs[7 : 8 * n : 8],
            recs[6 : 8 * n : 8],
            recs[5 : 8 * n : 8],
            recs[3 : 8 * n : 8],
            recs[4 : 8 * n : 8],
            strict=True,
        ):
            if not accept:
                out.append(_DROP)
            elif hashed & HAS_HASH:
                out.append(RxIn(True, queue, value, info))
            else:
                out.append(_PASS)
        return out

    def rx_build(
        self, view: memoryview, frames: Sequence[RxFrame], offsets: Sequence[int], max_len: int
    ) -> list[int]:
        ffi, n = self.ffi, len(frames)
        buf, recs = self._records([f.data for f in frames])
        if any(f.vlan is not None or f.hash_value is not None for f in frames):
            for i, f in enumerate(frames):
                flags = 0
                if f.vlan is not None:
                    recs[8 * i + 2] = f.vlan
                    flags |= HAS_VLAN
                if f.hash_value is not None:
                    recs[8 * i + 3] = f.hash_value & 0xFFFFFFFF
                    recs[8 * i + 4] = f.hash_info
                    flags |= HAS_HASH
                recs[8 * i + 6] = flags
        lens = array.array("I", bytes(4 * max(1, n)))
        offs = array.array("I", offsets) if n else array.array("I", [0])
        target = ffi.from_buffer(view)
        arr = ffi.from_buffer("struct vmb_nv_rx_frame[]", recs)
        try:
            r = self.lib.vmb_nv_rx_build(
                target, len(view), buf, len(buf), arr, n,
                ffi.from_buffer("uint32_t[]", offs), max_len, ffi.from_buffer("uint32_t[]", lens),
            )  # fmt: skip
        finally:
            ffi.release(target)
            ffi.release(arr)
        if r < 0:
            raise ValueError(f"vmb_nv_rx_build: {r} (a section outside the receive buffer)")
        return lens.tolist()[:n]


class _Twins:
    """The pure-Python reference behind the same signatures."""

    tx_parse = staticmethod(py_tx_parse)
    csum_fill = staticmethod(py_csum_fill)
    lso_segment = staticmethod(py_lso_segment)
    rx_csum = staticmethod(py_rx_csum)
    toeplitz = staticmethod(py_toeplitz)
    rx_classify = staticmethod(py_rx_classify)
    rx_build = staticmethod(py_rx_build)


def native_impl() -> _Native:
    """The C implementation whatever VMBUSD_NATIVE says (for differential tests)."""
    mod = native.native_module()
    return _Native(mod.ffi, mod.lib)


def twin_impl() -> _Twins:
    return _Twins()


IMPL: _Native | _Twins = _Native(native.ffi, native.lib) if native.NATIVE else _Twins()
tx_parse = IMPL.tx_parse
csum_fill = IMPL.csum_fill
lso_segment = IMPL.lso_segment
rx_csum = IMPL.rx_csum
rx_classify = IMPL.rx_classify
rx_build = IMPL.rx_build
