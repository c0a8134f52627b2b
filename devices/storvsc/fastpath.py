"""storvsc's per-request fast path: Python per batch, C per request.

The READ/WRITE SRBs of one received batch that go to a memory or file LUN are
decoded (`decode`), executed (`execute`: memcpy for a memory disk,
preadv2/pwritev2 with RWF_NOWAIT for a file) and completed (`completions`:
the completion packets, ready for `Channel.send_raw`) in one call each, with
no trio task and no Python per request. Every other packet is SLOW and goes to
the VSP's general path (VstorProtocol + ScsiController), which answers it as it
always did; so do file requests that would block (LEFTOVER).

The contract is native/storvsc.h; this module holds the C wrapper and its
pure-Python twin (`VMBUSD_NATIVE=0`), which tests compare byte for byte.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple

from vmbus import native as _native_sel
from vmbus.packet import PKT_REC, RANGE_REC, SEG_REC, GpaDirectBatch, GpaStatus

SLOW, FAST, DONE, LEFTOVER = 0, 1, 2, 3

# why a record is SLOW (native/storvsc.h VMB_SRB_R_*)
R_NONE, R_TYPE, R_RANGES, R_SIZE, R_OP, R_ADDRESS, R_CDB = 0, 1, 2, 3, 4, 5, 6
R_DIRECTION, R_LENGTH, R_RANGE, R_READ_ONLY, R_SEGS = 7, 8, 9, 10, 11

F_WRITE, F_FUA = 1, 2
LUN_NONE, LUN_MEMORY, LUN_FILE = 0, 1, 2
LUN_READ_ONLY = 1
LUN_BLOCKING_WRITES = 2
MAX_SEGS = 1024
X_BLOCKING = 1
MAX_LUNS = 256
E_BAD_ARG = -100

REC = struct.Struct("=iIIIIIBBB5xQQQ")
"""struct vmb_srb_rec: kind, reason, lun, flags, first_seg, seg_count, port,
cdb_length, data_in, trans_id, offset, length."""

_DESC = struct.Struct("<HHHHQ")
_U32 = struct.Struct("<I")
_TYPE_GPA_DIRECT = 9
_TYPE_COMPLETION = 0xB
_EXECUTE_SRB = 3
_COMPLETE_IO = 1
_SIZES = (64, 48)
_RW = {  # opcode -> (CDB length, write)
    0x08: (6, False),
    0x0A: (6, True),
    0x28: (10, False),
    0x2A: (10, True),
    0xA8: (12, False),
    0xAA: (12, True),
    0x88: (16, False),
    0x8A: (16, True),
}
assert REC.size == 56


class SrbRec(NamedTuple):
    kind: int
    reason: int
    lun: int
    flags: int
    first_seg: int
    seg_count: int
    port: int
    cdb_length: int
    data_in: int
    trans_id: int
    offset: int
    length: int


class LunSpec(NamedTuple):
    """One LUN as the fast path sees it (struct vmb_srb_lun). `storage` and
    `chunk_map` are a memory disk's bytes and its written-chunk bitmap."""

    kind: int
    read_only: bool
    block_size: int
    blocks: int
    max_transfer: int
    direct_align: int = 0
    fd: int = -1
    storage: memoryview | None = None
    chunk_map: memoryview | None = None
    chunk_size: int = 0
    blocking_writes: bool = False  # a file whose writes refuse RWF_NOWAIT (EOPNOTSUPP)


def _be(b: bytes, start: int, n: int) -> int:
    return int.from_bytes(b[start : start + n], "big")


def set_kind(recs: bytearray, i: int, kind: int) -> None:
    """Change record i's kind in a copy made with `SrbFastPath.records()`."""
    struct.pack_into("=i", recs, REC.size * i, kind)


# --------------------------------------------------------------------- the twin


def _py_decide(
    pkt: memoryview,
    gpa: tuple[int, int, int, int, int],
    ranges: memoryview,
    ready: bool,
    size: int,
    max_transfer: int,
    luns: Sequence[LunSpec | None],
) -> tuple[int, tuple[int, int, int, int, int, int, int, int, int] | None]:
    """(reason, (lun, flags, first_seg, seg_count, port, cdb_len, data_in, offset,
    length) when FAST): the twin of storvsc.c decide()."""
    typ, off8, _len8, flags, _tid = _DESC.unpack_from(pkt, 0)
    if typ != _TYPE_GPA_DIRECT or flags != 1:
        return R_TYPE, None
    status, range_count, first_range, _bad, total = gpa
    if status != GpaStatus.OK:
        return R_RANGES, None
    off = 8 * off8
    if off > len(pkt) or len(pkt) - off != size or size not in _SIZES:
        return R_SIZE, None
    v = bytes(pkt[off : off + 64])
    if _U32.unpack_from(v, 0)[0] != _EXECUTE_SRB or not ready:
        return R_OP, None
    s = v[12:]
    port, path, target, lun, cdb_len, data_in = s[4], s[5], s[6], s[7], s[8], s[10]
    dtl = _U32.unpack_from(s, 12)[0]
    cdb = s[16:32]
    spec = luns[lun] if lun < len(luns) else None
    if path or target or spec is None or spec.kind == LUN_NONE:
        return R_ADDRESS, None
    need, write = _RW.get(cdb[0], (0, False))
    if not 1 <= cdb_len <= 16 or need == 0 or cdb_len < need:
        return R_CDB, None
    if cdb[need - 1] & 0x05:
        return R_CDB, None
    fua = 0
    if need == 6:
        if cdb[1] & 0xE0:
            return R_CDB, None
        lba = ((cdb[1] & 0x1F) << 16) | _be(cdb, 2, 2)
        blocks = cdb[4] or 256
    else:
        if cdb[1] & 0xE0 or (need != 16 and cdb[1] & 0x01):
            return R_CDB, None
        fua = F_FUA if cdb[1] & 0x08 else 0
        if need == 10:
            lba, blocks = _be(cdb, 2, 4), _be(cdb, 7, 2)
        elif need == 12:
            lba, blocks = _be(cdb, 2, 4), _be(cdb, 6, 4)
        else:
            lba, blocks = _be(cdb, 2, 8), _be(cdb, 10, 4)
    if data_in != (0 if write else 1):
        return R_DIRECTION, None
    if blocks == 0 or lba > spec.blocks or blocks > spec.blocks - lba:
        return R_RANGE, None
    bs = spec.block_size
    if bs == 0 or blocks > 0xFFFFFFFF:
        return R_RANGE, None
    length = blocks * bs
    if length > max_transfer or length > spec.max_transfer:
        return R_RANGE, None
    if dtl != total or dtl != length:
        return R_LENGTH, None
    if write and spec.read_only:
        return R_READ_ONLY, None
    if range_count == 0:
        return R_LENGTH, None
    r0 = RANGE_REC.unpack_from(ranges, RANGE_REC.size * first_range)
    rl = RANGE_REC.unpack_from(ranges, RANGE_REC.size * (first_range + range_count - 1))
    nseg = rl[4] + rl[5] - r0[4]
    if nseg == 0 or nseg > MAX_SEGS:
        return R_SEGS, None
    return R_NONE, (
        lun,
        (F_WRITE if write else 0) | fua,
        r0[4],
        nseg,
        port,
        cdb_len,
        data_in,
        lba * bs,
        length,
    )


class _PyImpl:
    """The pure-Python twin: record arrays are bytearrays in the C layout."""

    name = "python"

    def __init__(self) -> None:
        self.recs = bytearray()
        self.luns: list[LunSpec | None] = []
        self.regions: tuple[memoryview, ...] = ()
        self.out = bytearray()
        self.index = bytearray()

    def set_luns(self, luns: list[LunSpec | None]) -> None:
        self.luns = luns

    def set_regions(self, views: tuple[memoryview, ...]) -> None:
        self.regions = views

    def release(self) -> None:
        self.luns, self.regions = [], ()

    def decode(
        self,
        buf: memoryview,
        idx: memoryview,
        n: int,
        gpa: GpaDirectBatch,
        ready: bool,
        size: int,
        max_transfer: int,
    ) -> int:
        if len(self.recs) < REC.size * n:
            self.recs = bytearray(REC.size * n)
        buf = memoryview(buf).cast("B")
        pkts, ranges = gpa._pkts, gpa._ranges
        fast = 0
        for i in range(n):
            off, ln = idx[2 * i], idx[2 * i + 1]
            if off > buf.nbytes or ln > buf.nbytes - off or ln < 16:
                return E_BAD_ARG
            pkt = buf[off : off + ln]
            tid = _DESC.unpack_from(pkt, 0)[4]
            g = PKT_REC.unpack_from(pkts, PKT_REC.size * i)
            why, f = _py_decide(pkt, g, ranges, ready, size, max_transfer, self.luns)
            if f is None:
                REC.pack_into(self.recs, REC.size * i, SLOW, why, 0, 0, 0, 0, 0, 0, 0, tid, 0, 0)
                continue
            lun, flags, first, nseg, port, cdb_len, data_in, offset, length = f
            REC.pack_into(
                self.recs,
                REC.size * i,
                FAST,
                0,
                lun,
                flags,
                first,
                nseg,
                port,
                cdb_len,
                data_in,
                tid,
                offset,
                length,
            )
            fast += 1
        return fast

    def _iov(
        self, r: SrbRec, segs: memoryview, regions: tuple[memoryview, ...] | None = None
    ) -> list[memoryview] | None:
        regions = self.regions if regions is None else regions
        nsegs = segs.nbytes // SEG_REC.size
        if not 0 < r.seg_count <= MAX_SEGS or r.first_seg > nsegs:
            return None
        if r.seg_count > nsegs - r.first_seg:
            return None
        out = []
        for k in range(r.first_seg, r.first_seg + r.seg_count):
            region, _, offset, ln = SEG_REC.unpack_from(segs, SEG_REC.size * k)
            if region >= len(regions):
                return None
            view = regions[region]
            if offset > view.nbytes or ln > view.nbytes - offset or ln == 0:
                return None
            out.append(view[offset : offset + ln])
        return out

    def execute(self, n: int, gpa: GpaDirectBatch) -> int:
        done = 0
        for i in range(n):
            r = SrbRec(*REC.unpack_from(self.recs, REC.size * i))
            if r.kind != FAST:
                continue
            spec = self.luns[r.lun] if r.lun < len(self.luns) else None
            write = bool(r.flags & F_WRITE)
            iov = self._iov(r, gpa._segs)
            if (
                spec is None
                or spec.kind == LUN_NONE
                or iov is None
                or sum(v.nbytes for v in iov) != r.length
            ):
                self._set(i, LEFTOVER, errno.EINVAL)
                continue
            if spec.kind == LUN_MEMORY:
                disk = spec.storage
                if disk is None or r.offset > disk.nbytes or r.length > disk.nbytes - r.offset:
                    self._set(i, LEFTOVER, errno.EINVAL)
                    continue
                pos = r.offset
                for v in iov:
                    if write:
                        disk[pos : pos + v.nbytes] = v
                    else:
                        v[:] = disk[pos : pos + v.nbytes]
                    pos += v.nbytes
                if write and spec.chunk_map is not None and spec.chunk_size:
                    cm = spec.chunk_map
                    for c in range(
                        r.offset // spec.chunk_size,
                        (r.offset + r.length - 1) // spec.chunk_size + 1,
                    ):
                        cm[c >> 3] |= 1 << (c & 7)
                self._set(i, DONE, 0)
                done += 1
                continue
            if write and (r.flags & F_FUA or spec.blocking_writes):
                self._set(i, LEFTOVER, 0)
                continue
            a = spec.direct_align
            if a and (
                r.offset % a or any(v.nbytes % a or _address(v) % a for v in iov)
            ):  # pragma: no cover - O_DIRECT with guest pages that are not aligned
                self._set(i, LEFTOVER, 0)
                continue
            try:
                if write:
                    got = os.pwritev(spec.fd, iov, r.offset, os.RWF_NOWAIT)
                else:
                    got = os.preadv(spec.fd, iov, r.offset, os.RWF_NOWAIT)
            except OSError as err:
                self._set(i, LEFTOVER, err.errno or 0)
                continue
            if got == r.length:
                self._set(i, DONE, 0)
                done += 1
            else:
                self._set(i, LEFTOVER, 0)
        return done

    def _set(self, i: int, kind: int, reason: int, recs: bytearray | None = None) -> None:
        struct.pack_into("=iI", self.recs if recs is None else recs, REC.size * i, kind, reason)

    def job(self, recs: bytearray, segs: bytes) -> Callable[[], int]:
        return partial(self._blocking, recs, memoryview(segs), list(self.luns), self.regions)

    def finish(self) -> None:
        pass

    def _blocking(
        self,
        recs: bytearray,
        segs: memoryview,
        luns: list[LunSpec | None],
        regions: tuple[memoryview, ...],
    ) -> int:
        done = 0
        for i in range(len(recs) // REC.size):
            r = SrbRec(*REC.unpack_from(recs, REC.size * i))
            if r.kind != LEFTOVER:
                continue
            spec = luns[r.lun] if r.lun < len(luns) else None
            iov = self._iov(r, segs, regions)
            if (
                spec is None
                or spec.kind != LUN_FILE
                or iov is None
                or sum(v.nbytes for v in iov) != r.length
            ):
                self._set(i, LEFTOVER, errno.EINVAL, recs)
                continue
            a = spec.direct_align
            if a and (r.offset % a or any(v.nbytes % a or _address(v) % a for v in iov)):
                self._set(i, LEFTOVER, errno.EINVAL, recs)  # pragma: no cover - O_DIRECT
                continue
            try:
                _blocking_rw(spec.fd, r, iov)
            except OSError as err:
                self._set(i, LEFTOVER, err.errno or errno.EIO, recs)
                continue
            self._set(i, DONE, 0, recs)
            done += 1
        return done

    def complete(
        self, n: int, want: int, size: int, recs: Any = None
    ) -> tuple[int, memoryview, memoryview]:
        if size not in _SIZES:
            return E_BAD_ARG, memoryview(b""), memoryview(b"")
        fresh = recs is not None
        recs = self.recs if recs is None else recs
        plen = 16 + size
        need = sum(1 for i in range(n) if REC.unpack_from(recs, REC.size * i)[0] == want)
        out, index = (bytearray(), bytearray()) if fresh else (self.out, self.index)
        if len(out) < plen * need:
            out = bytearray(plen * need)
        if len(index) < 8 * need:
            index = bytearray(8 * need)
        if not fresh:
            self.out, self.index = out, index
        k = 0
        for i in range(n):
            r = SrbRec(*REC.unpack_from(recs, REC.size * i))
            if r.kind != want:
                continue
            pos = plen * k
            p = bytearray(plen)
            _DESC.pack_into(p, 0, _TYPE_COMPLETION, 2, plen // 8, 0, r.trans_id)
            p[16] = _COMPLETE_IO
            s = 16 + 12
            struct.pack_into("<H", p, s, 0x34 if size == 64 else 0x24)
            p[s + 2] = 1  # SRB SUCCESS
            p[s + 4] = r.port
            p[s + 7] = r.lun & 0xFF
            p[s + 8] = r.cdb_length
            p[s + 10] = r.data_in
            _U32.pack_into(p, s + 12, r.length & 0xFFFFFFFF)
            out[pos : pos + plen] = p
            struct.pack_into("=II", index, 8 * k, pos, plen)
            k += 1
        return k, memoryview(out)[: plen * k], memoryview(index)[: 8 * k]

    def recs_view(self, n: int) -> memoryview:
        return memoryview(self.recs)[: REC.size * n]


def _blocking_rw(fd: int, r: SrbRec, iov: list[memoryview]) -> None:
    """The twin of storvsc.c blocking_rw(): the whole request or OSError."""
    write = bool(r.flags & F_WRITE)
    flags = os.RWF_DSYNC if write and r.flags & F_FUA else 0
    done = 0
    while done < r.length:
        try:
            if write:
                got = os.pwritev(fd, iov, r.offset + done, flags)
            else:
                got = os.preadv(fd, iov, r.offset + done, 0)
        except InterruptedError:  # pragma: no cover - Python retries EINTR itself
            continue
        if got == 0:
            raise OSError(errno.EIO, "no progress")
        done += got
        while iov and got >= iov[0].nbytes:
            got -= iov[0].nbytes
            iov = iov[1:]
        if iov and got:
            iov = [iov[0][got:], *iov[1:]]


def _address(view: memoryview) -> int:
    import cffi

    ffi = cffi.FFI()
    return int(ffi.cast("uintptr_t", ffi.from_buffer(view, require_writable=False)))


# ------------------------------------------------------------------- the C one


class _NativeImpl:
    """The C fast path: record arrays are cffi arrays."""

    name = "native"

    def __init__(self, ffi: Any, lib: Any) -> None:
        if ffi.sizeof("struct vmb_srb_rec") != REC.size or lib.VMB_SRB_DONE != DONE:
            raise ImportError("vmbus._native storvsc records disagree with fastpath.py")
        self.ffi, self.lib = ffi, lib
        self.cap = 0
        self.recs: Any = ffi.new("struct vmb_srb_rec[]", 1)
        self.luns: Any = ffi.new("struct vmb_srb_lun[]", 1)
        self.nluns = 0
        self.regions: Any = ffi.new("struct vmb_srb_region[]", 1)
        self.nregions = 0
        self._keep_luns: list[Any] = []
        self._keep_regions: list[Any] = []
        self._busy = 0  # jobs running in worker threads
        self._deferred: list[Any] = []  # views to release once they are done
        self.out: Any = ffi.new("uint8_t[]", 1)
        self.out_cap = 0
        self.index: Any = ffi.new("uint32_t[]", 2)

    def set_luns(self, luns: list[LunSpec | None]) -> None:
        ffi = self.ffi
        self._release(self._keep_luns)
        arr = ffi.new("struct vmb_srb_lun[]", max(1, len(luns)))
        for i, s in enumerate(luns):
            if s is None:
                continue
            c = arr[i]
            c.kind = s.kind
            c.flags = (LUN_READ_ONLY if s.read_only else 0) | (
                LUN_BLOCKING_WRITES if s.blocking_writes else 0
            )
            c.block_size, c.direct_align = s.block_size, s.direct_align
            c.blocks, c.max_transfer, c.fd = s.blocks, s.max_transfer, s.fd
            if s.storage is not None:
                base = ffi.from_buffer("uint8_t[]", s.storage, require_writable=True)
                self._keep_luns.append(base)
                c.base, c.len = base, s.storage.nbytes
            if s.chunk_map is not None and s.chunk_size:
                cm = ffi.from_buffer("uint8_t[]", s.chunk_map, require_writable=True)
                self._keep_luns.append(cm)
                c.chunk_map, c.chunk_size = cm, s.chunk_size
        self.luns, self.nluns = arr, len(luns)

    def set_regions(self, views: tuple[memoryview, ...]) -> None:
        ffi = self.ffi
        self._release(self._keep_regions)
        arr = ffi.new("struct vmb_srb_region[]", max(1, len(views)))
        for i, v in enumerate(views):
            base = ffi.from_buffer("uint8_t[]", v, require_writable=True)
            self._keep_regions.append(base)
            arr[i].base, arr[i].len = base, v.nbytes
        self.regions, self.nregions = arr, len(views)

    def _release(self, keep: list[Any]) -> None:
        if self._busy:  # a worker thread still runs on them: later, in finish()
            self._deferred.extend(keep)
        else:
            for c in keep:
                self.ffi.release(c)
        keep.clear()

    def job(self, recs: bytearray, segs: bytes) -> Callable[[], int]:
        ffi = self.ffi
        self._busy += 1
        return partial(
            self.lib.vmb_srb_execute,
            ffi.from_buffer("struct vmb_srb_rec[]", recs, require_writable=True),
            len(recs) // REC.size,
            self.luns,  # the arrays stay alive with the partial
            self.nluns,
            ffi.from_buffer("struct vmb_iov_seg[]", segs),
            len(segs) // SEG_REC.size,
            self.regions,
            self.nregions,
            X_BLOCKING,
        )

    def finish(self) -> None:
        self._busy -= 1
        if not self._busy:
            deferred, self._deferred = self._deferred, []
            for c in deferred:
                self.ffi.release(c)

    def release(self) -> None:
        """Give back every view of guest RAM and disk storage (GuestMemory.close and a
        memory disk's resize need that)."""
        self.luns, self.nluns = self.ffi.new("struct vmb_srb_lun[]", 1), 0
        self.regions, self.nregions = self.ffi.new("struct vmb_srb_region[]", 1), 0
        self._release(self._keep_luns)
        self._release(self._keep_regions)

    def decode(
        self,
        buf: Any,
        idx: Any,
        n: int,
        gpa: GpaDirectBatch,
        ready: bool,
        size: int,
        max_transfer: int,
    ) -> int:
        ffi = self.ffi
        if self.cap < n:
            self.recs = ffi.new("struct vmb_srb_rec[]", n)
            self.cap = n
        return int(
            self.lib.vmb_srb_decode(
                ffi.from_buffer("uint8_t[]", buf),
                len(buf),
                ffi.from_buffer("uint32_t[]", idx),
                n,
                ffi.from_buffer("struct vmb_gpa_pkt[]", gpa._pkts),
                ffi.from_buffer("struct vmb_gpa_range_rec[]", gpa._ranges),
                1 if ready else 0,
                size,
                max_transfer,
                self.luns,
                self.nluns,
                self.recs,
            )
        )

    def execute(self, n: int, gpa: GpaDirectBatch) -> int:
        segs = gpa._segs
        return int(
            self.lib.vmb_srb_execute(
                self.recs,
                n,
                self.luns,
                self.nluns,
                self.ffi.from_buffer("struct vmb_iov_seg[]", segs),
                segs.nbytes // SEG_REC.size,
                self.regions,
                self.nregions,
                0,
            )
        )

    def complete(
        self, n: int, want: int, size: int, recs: Any = None
    ) -> tuple[int, memoryview, memoryview]:
        ffi = self.ffi
        cap = (16 + 64) * max(1, n)
        if recs is not None:  # a private copy: its own output, the cached one may be in use
            c_recs = ffi.from_buffer("struct vmb_srb_rec[]", recs)
            out, index = ffi.new("uint8_t[]", cap), ffi.new("uint32_t[]", 2 * max(1, n))
        else:
            c_recs = self.recs
            if self.out_cap < cap:
                self.out_cap = cap
                self.out = ffi.new("uint8_t[]", cap)
                self.index = ffi.new("uint32_t[]", 2 * max(1, n))
            out, index = self.out, self.index
        k = int(self.lib.vmb_srb_complete(c_recs, n, want, size, out, cap, index))
        if k < 0:
            return k, memoryview(b""), memoryview(b"")
        return (
            k,
            memoryview(ffi.buffer(out, (16 + size) * k)),
            memoryview(ffi.buffer(index, 8 * k)),
        )

    def recs_view(self, n: int) -> memoryview:
        return memoryview(self.ffi.buffer(self.recs, REC.size * n))


class SrbFastPath:
    """One channel's fast path (not thread-safe: one per channel task).

    Per batch: `decode` (after the channel's GpaDirectDecoder decoded the same
    batch), `execute`, `completions`; `record(i)` for what became of packet i.
    Call `release()` when the channel ends: the object holds views of guest RAM
    and of memory disks' storage.
    """

    def __init__(self, *, native: bool | None = None) -> None:
        if native is None:
            native = _native_sel.NATIVE
        self._impl: _PyImpl | _NativeImpl
        if native:
            if _native_sel.NATIVE:
                ffi, lib = _native_sel.ffi, _native_sel.lib
            else:
                mod = _native_sel.native_module()
                ffi, lib = mod.ffi, mod.lib
            self._impl = _NativeImpl(ffi, lib)
        else:
            self._impl = _PyImpl()
        self._regions_of: object = None
        self.n = 0
        self.size = 64

    @property
    def backend(self) -> str:
        """'native' or 'python'."""
        return self._impl.name

    def set_luns(self, luns: Mapping[int, LunSpec]) -> None:
        """The LUNs that may take the fast path (any other LUN's SRBs are SLOW)."""
        table: list[LunSpec | None] = [None] * (max(luns) + 1 if luns else 0)
        for n, spec in luns.items():
            if not 0 <= n < MAX_LUNS:
                raise ValueError(f"LUN {n} outside 0..{MAX_LUNS - 1}")
            table[n] = spec
        self._impl.set_luns(table)

    def release(self) -> None:
        self._impl.release()
        self._regions_of = None

    def decode(
        self,
        buffer: Any,
        index: Any,
        n: int,
        gpa: GpaDirectBatch,
        *,
        ready: bool,
        size: int,
        max_transfer: int,
    ) -> int:
        """Decide every packet of a received batch; returns the FAST count.
        ValueError if buffer/index are not what ring read() makes."""
        if gpa.n != n:
            raise ValueError("the GPA-direct batch is not this batch")
        views = gpa._views
        if views is not self._regions_of:  # a new region table snapshot
            self._impl.set_regions(views)
            self._regions_of = views
        idx = memoryview(index).cast("B")[: 8 * n].cast("I")
        rc = self._impl.decode(buffer, idx, n, gpa, ready, size, max_transfer)
        if rc < 0:
            raise ValueError("buffer or index entry is not what ring read() makes")
        self.n, self.size = n, size
        return rc

    def execute(self, gpa: GpaDirectBatch) -> int:
        """Run every FAST request's I/O; returns how many are DONE (the others are
        LEFTOVER, for the blocking path)."""
        return self._impl.execute(self.n, gpa)

    def leftover_job(self, recs: bytearray, segs: bytes) -> Callable[[], int]:
        """A job for ONE worker thread: every LEFTOVER record of `recs` (a copy made
        with `records()`) run with blocking I/O on the segments `segs` (a copy of
        the batch's, `segments()`); each becomes DONE or stays LEFTOVER with its
        errno. Returns the DONE count. Call `finish_job()` in the trio thread when
        it returned: until then the views it uses are kept."""
        return self._impl.job(recs, segs)

    def finish_job(self) -> None:
        self._impl.finish()

    @staticmethod
    def segments(gpa: GpaDirectBatch) -> bytes:
        """A copy of a decoded batch's segment records (they are reused per batch)."""
        return bytes(gpa._segs)

    def completions(self, want: int = DONE) -> tuple[memoryview, memoryview, int]:
        """(buffer, index, count): the completions of every record of kind `want`,
        preformed for Channel.send_raw. Valid until the next call."""
        k, buf, idx = self._impl.complete(self.n, want, self.size)
        if k < 0:
            raise ValueError("completion buffer too small")
        return buf, idx, k

    def complete_copy(
        self, recs: bytearray, size: int, want: int = DONE
    ) -> tuple[memoryview, memoryview, int]:
        """completions() of a private copy of records (`records()`, kinds changed
        by the caller), into a buffer of its own: a batch's leftovers, completed
        while later batches go on."""
        k, buf, idx = self._impl.complete(len(recs) // REC.size, want, size, recs)
        if k < 0:
            raise ValueError("completion buffer too small")
        return buf, idx, k

    def record(self, i: int) -> SrbRec:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return SrbRec(*REC.unpack_from(self._impl.recs_view(self.n), REC.size * i))

    def records(self) -> bytes:
        """Every record of the last decode, as bytes (tests compare the twins)."""
        return bytes(self._impl.recs_view(self.n))

    def kinds(self) -> list[int]:
        """The kind of every record of the last decode."""
        view = self._impl.recs_view(self.n)
        return [k for (k,) in struct.iter_unpack("=i52x", view)]
