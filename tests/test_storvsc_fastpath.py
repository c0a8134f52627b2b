"""storvsc's per-request fast path (devices/storvsc/fastpath.py, native/storvsc.c).

- the C and the pure-Python twin agree byte for byte on random and hostile
  batches: decode records, execute (disk and guest RAM bytes after), completions;
- what the fast path takes, the general path (VstorProtocol + ScsiController)
  would have answered GOOD with the same bytes moved and the same completion;
- a file LUN: inline RWF_NOWAIT reads, writes that refuse it are LEFTOVER;
- end to end: the simulated guest's I/O goes through it, and the same I/O with
  the fast path off leaves the same bytes.
"""

from __future__ import annotations

import array
import errno
import mmap
import os
import random
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.storvsc import fastpath, vsp
from devices.storvsc.backends.file import FileBackend
from devices.storvsc.backends.memory import MemoryBackend
from devices.storvsc.fastpath import LunSpec, SrbFastPath
from devices.storvsc.protocol import (
    VERSION_WIN7,
    VERSION_WIN10,
    DataIn,
    ExecuteSrb,
    VstorProtocol,
    VstorState,
    encode_srb,
    srb_request,
)
from devices.storvsc.scsi import ScsiController
from vmbus.memory import GuestMemory, sealed_memfd
from vmbus.native import native_available
from vmbus.packet import GpaDirectDecoder
from vmbus.ring import iter_packets


def _require_native() -> None:
    """CI builds the extension: its absence is a failure here, never a skip."""
    if not native_available():
        pytest.fail("vmbus._native is not built (pip install -e .): the C side cannot run")


@pytest.fixture(scope="module")
def native_built() -> None:
    _require_native()


NATIVE = pytest.mark.usefixtures("native_built")
PAGE = 4096
RAM_GPA = 0x100000
RAM_PAGES = 32
RAM_PFNS = list(range(RAM_GPA // PAGE, RAM_GPA // PAGE + RAM_PAGES))
BS = 512
BLOCKS = 64  # memory LUNs: 32 KiB
DESC = struct.Struct("<HHHHQ")
OPS = [0x08, 0x0A, 0x28, 0x2A, 0xA8, 0xAA, 0x88, 0x8A]  # READ/WRITE 6/10/12/16


# --- guest RAM, disks, packets -------------------------------------------------------


class Ram:
    """One guest RAM region in a sealed memfd, seeded, and its GuestMemory."""

    def __init__(self, seed: bytes) -> None:
        self.fd = sealed_memfd("test-ram", RAM_PAGES * PAGE)
        os.pwrite(self.fd, seed, 0)
        self.memory = GuestMemory(native=False)
        self.memory.add_region(RAM_GPA, RAM_PAGES * PAGE, self.fd)

    def bytes(self) -> bytes:
        return os.pread(self.fd, RAM_PAGES * PAGE, 0)

    def close(self) -> None:
        self.memory.close()
        os.close(self.fd)


def cdb_for(op: int, lba: int, blocks: int, byte1: int = 0, control: int = 0) -> bytes:
    if op in (0x08, 0x0A):
        return bytes(
            [op, (byte1 & 0xE0) | ((lba >> 16) & 0x1F), (lba >> 8) & 0xFF, lba & 0xFF]
        ) + bytes([blocks & 0xFF, control])
    if op in (0x28, 0x2A):
        return struct.pack(">BBIBHB", op, byte1, lba & 0xFFFFFFFF, 0, blocks & 0xFFFF, control)
    if op in (0xA8, 0xAA):
        return struct.pack(">BBIIBB", op, byte1, lba & 0xFFFFFFFF, blocks & 0xFFFFFFFF, 0, control)
    return struct.pack(
        ">BBQIBB", op, byte1, lba & 0xFFFFFFFFFFFFFFFF, blocks & 0xFFFFFFFF, 0, control
    )


def gpa_ext(ranges: list[tuple[int, int, list[int]]], count: int | None = None) -> bytes:
    parts = [struct.pack("<II", 0, len(ranges) if count is None else count)]
    for byte_count, byte_offset, pfns in ranges:
        parts.append(struct.pack(f"<II{len(pfns)}Q", byte_count, byte_offset, *pfns))
    return b"".join(parts)


def raw_packet(typ: int, ext: bytes, payload: bytes, flags: int, tid: int) -> bytes:
    """A packet as ring read() copies it out: descriptor, extension, padded payload."""
    ext += bytes(-len(ext) % 8)
    off8 = 2 + len(ext) // 8
    len8 = off8 + (len(payload) + 7) // 8
    pad = bytes(8 * len8 - 16 - len(ext) - len(payload))
    return DESC.pack(typ, off8, len8, flags, tid) + ext + payload + pad


def batch_of(raws: list[bytes]) -> tuple[mmap.mmap, array.array[int], int]:
    buf = mmap.mmap(-1, max(PAGE, sum(len(r) for r in raws)))
    index = array.array("I")
    pos = 0
    for r in raws:
        buf[pos : pos + len(r)] = r
        index.extend((pos, len(r)))
        pos += len(r)
    return buf, index, len(raws)


HOSTILE = (
    "lba",
    "lun",
    "path",
    "target",
    "byte1",
    "control",
    "cdb_length",
    "data_in",
    "dtl",
    "op",
    "size",
    "ranges",
    "pfn",
    "type",
    "flags",
    "byte",
)


@st.composite
def srb_packet(draw: st.DrawFn, size: int) -> bytes:
    """A READ/WRITE EXECUTE_SRB: well formed half the time, else wrong in one way
    (or, now and then, in two)."""
    bad = {draw(st.sampled_from((None,) * len(HOSTILE) + HOSTILE)) for _ in range(2)}

    def pick(what: str, good: Any, hostile: Any) -> Any:
        return draw(hostile) if what in bad else draw(good)

    op = draw(st.sampled_from(OPS))
    write = op in (0x0A, 0x2A, 0xAA, 0x8A)
    blocks = draw(st.integers(1, 8))
    lba = pick("lba", st.integers(0, BLOCKS - blocks), st.integers(BLOCKS - blocks, 2**32))
    lun = pick("lun", st.sampled_from([0, 0, 1]), st.sampled_from([2, 3, 7, 255]))
    length = blocks * BS
    offset = draw(st.sampled_from([0, 0, 512, 4095, 100]))
    npages = -(-(offset + length) // PAGE)
    pfns = [draw(st.sampled_from(RAM_PFNS)) for _ in range(npages)]
    if "pfn" in bad:
        pfns[-1] = draw(st.sampled_from([0, RAM_PFNS[-1] + 1, 2**52 - 1]))
    ranges = [(length, offset, pfns)]
    if draw(st.booleans()) and length >= 2 * BS:  # the buffer as two ranges
        half = length // 2
        ranges = [
            (half, 0, pfns[: -(-half // PAGE)]),
            (length - half, 0, pfns[: -(-(length - half) // PAGE)]),
        ]
    srb = encode_srb(
        lun=lun,
        path_id=pick("path", st.just(0), st.integers(1, 255)),
        target_id=pick("target", st.just(0), st.integers(1, 255)),
        port=draw(st.integers(0, 255)),
        cdb=cdb_for(
            op,
            lba,
            blocks,
            byte1=pick("byte1", st.sampled_from([0, 0x08, 0x10]), st.sampled_from([0x01, 0x20])),
            control=pick("control", st.sampled_from([0, 0x80]), st.sampled_from([0x01, 0x04])),
        ),
        cdb_length=pick("cdb_length", st.just(None), st.sampled_from([0, 17, 6, 10, 255])),
        data_in=pick(
            "data_in",
            st.just(DataIn.WRITE if write else DataIn.READ),
            st.sampled_from([0, 1, 2, 7]),
        ),
        data_transfer_length=pick(
            "dtl", st.just(length), st.sampled_from([0, length - 1, length + 512])
        ),
        sense_info_length=draw(st.integers(0, 255)),
        win8=size == 64,
    )
    payload = srb_request(srb, size=size)
    if "op" in bad:
        payload = struct.pack("<I", draw(st.integers(0, 20))) + payload[4:]
    if "size" in bad:
        payload = payload[: draw(st.sampled_from([40, 48, 56, 64]))] + bytes(
            draw(st.sampled_from([0, 8]))
        )
    ext = gpa_ext(ranges)
    if "ranges" in bad:
        ext = gpa_ext(ranges, count=draw(st.sampled_from([0, 2, 1000])))
    typ = 6 if "type" in bad else 9
    flags = draw(st.sampled_from([0, 3])) if "flags" in bad else 1
    raw = raw_packet(typ, ext if typ == 9 else b"", payload, flags, draw(st.integers(0, 2**64 - 1)))
    if "byte" in bad:  # any byte after the descriptor changed
        pos = draw(st.integers(16, len(raw) - 1))
        raw = raw[:pos] + bytes([draw(st.integers(0, 255))]) + raw[pos + 1 :]
    return raw


class Side:
    """Everything one implementation runs on: its own guest RAM and disks."""

    def __init__(self, native: bool, seed: bytes, disk_seed: bytes) -> None:
        self.ram = Ram(seed)
        self.decoder = GpaDirectDecoder(self.ram.memory, native=native_available())
        self.fp = SrbFastPath(native=native)
        self.disks = [MemoryBackend(size=BLOCKS * BS, chunk_size=2048) for _ in range(2)]
        for d in self.disks:
            d._mm[:] = disk_seed
        specs = {}
        for lun, d in enumerate(self.disks):
            mm, bitmap = d.fast_storage() or (None, None)
            assert mm is not None and bitmap is not None
            specs[lun] = LunSpec(
                fastpath.LUN_MEMORY,
                lun == 1,  # LUN 1 is read-only
                BS,
                BLOCKS,
                8 * BS,
                storage=memoryview(mm),
                chunk_map=memoryview(bitmap),
                chunk_size=d.chunk_size,
            )
        self.fp.set_luns(specs)

    def run(
        self, raws: list[bytes], ready: bool, size: int
    ) -> tuple[int, bytes, int, bytes, bytes, bytes, bytes]:
        buf, index, n = batch_of(raws)
        gpa = self.decoder.decode(buf, index, n)
        nfast = self.fp.decode(buf, index, n, gpa, ready=ready, size=size, max_transfer=6 * BS)
        decoded = self.fp.records()
        done = self.fp.execute(gpa)
        out, idx, k = self.fp.completions()
        completions = bytes(out) + bytes(idx) + bytes([k])
        after = self.fp.records()
        disks = b"".join(bytes(d._mm) + bytes(d._map) for d in self.disks)
        return nfast, decoded, done, after, completions, disks, self.ram.bytes()

    def close(self) -> None:
        self.fp.release()
        self.ram.close()


@pytest.fixture(scope="module")
def seeds() -> Iterator[tuple[bytes, bytes]]:
    """Guest RAM and disk contents (read-only: each example copies them)."""
    rnd = random.Random(9)
    yield rnd.randbytes(RAM_PAGES * PAGE), rnd.randbytes(BLOCKS * BS)


# --- native and twin ----------------------------------------------------------------


@NATIVE
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(), size=st.sampled_from([64, 64, 48]), ready=st.sampled_from([True] * 5 + [False])
)
def test_native_and_twin_agree(
    seeds: tuple[bytes, bytes], data: Any, size: int, ready: bool
) -> None:
    raws = data.draw(st.lists(srb_packet(size), min_size=1, max_size=12))
    sides = [Side(native, *seeds) for native in (True, False)]
    try:
        native, twin = (s.run(raws, ready, size) for s in sides)
        assert native == twin
    finally:
        for s in sides:
            s.close()


@NATIVE
@settings(max_examples=100, deadline=None)
@given(raws=st.lists(st.binary(min_size=0, max_size=120), min_size=1, max_size=8))
def test_native_and_twin_agree_on_garbage(seeds: tuple[bytes, bytes], raws: list[bytes]) -> None:
    """Any bytes after a well-formed descriptor: the same records, mostly SLOW."""
    packets = [raw_packet(9, b[:40], b[40:], 1, 5) for b in raws]
    sides = [Side(native, *seeds) for native in (True, False)]
    try:
        native, twin = (s.run(packets, True, 64) for s in sides)
        assert native == twin
    finally:
        for s in sides:
            s.close()


# --- the fast path answers only what the general path answers GOOD ------------------------


def ready_protocol(version: int) -> VstorProtocol:
    proto = VstorProtocol(max_transfer_bytes=4096)
    proto.state, proto.version = VstorState.READY, version
    return proto


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), version=st.sampled_from([VERSION_WIN10, VERSION_WIN7]))
def test_fast_is_what_the_general_path_answers_good(
    seeds: tuple[bytes, bytes], data: Any, version: int
) -> None:
    size = 64 if version == VERSION_WIN10 else 48
    raw = data.draw(srb_packet(size))
    fast = Side(native_available(), *seeds)
    slow = Side(False, *seeds)
    try:
        nfast, _, done, _, completions, fast_disks, fast_ram = fast.run([raw], True, size)
        if not nfast:
            return  # SLOW: the general path answers it, as it always did
        assert done == 1
        rec = fast.fp.record(0)
        # The general path, on its own copy of RAM and disks.
        proto = ready_protocol(version)
        buf, index, n = batch_of([raw])
        gpa = slow.decoder.decode(buf, index, n)
        pkt = next(iter_packets(buf, index, n))
        ev = proto.receive(pkt.payload, data_bytes=gpa.total_bytes(0))
        assert isinstance(ev, ExecuteSrb)
        srb = ev.srb
        ctl = ScsiController()
        for lun, d in enumerate(slow.disks):
            if lun == 1:
                d.read_only = True
            ctl.add_lun(lun, d)
        iov = gpa.iovecs(0)
        bufs = iov if srb.data_in == DataIn.READ else [v.toreadonly() for v in iov]
        res = trio.run(ctl.execute, srb.lun, srb.cdb, bufs, srb.data_in == DataIn.READ)
        assert (res.status, res.transferred) == (0, rec.length)
        del iov, bufs, gpa
        want = proto.complete_srb(srb, res.status, res.sense, res.transferred)
        assert completions[16 : 16 + size] == want
        assert DESC.unpack(completions[:16]) == (0xB, 2, (16 + size) // 8, 0, pkt.trans_id)
        del pkt
        assert slow.ram.bytes() == fast_ram
        assert b"".join(bytes(d._mm) + bytes(d._map) for d in slow.disks) == fast_disks
    finally:
        fast.close()
        slow.close()


def test_every_slow_reason(seeds: tuple[bytes, bytes]) -> None:
    """One packet per rule, each SLOW for its reason (a good one is FAST)."""
    side = Side(native_available(), *seeds)

    def one(
        *,
        op: int = 0x28,
        lba: int = 0,
        blocks: int = 1,
        lun: int = 0,
        data_in: int = DataIn.READ,
        dtl: int | None = None,
        typ: int = 9,
        flags: int = 1,
        byte1: int = 0,
        control: int = 0,
        ready: bool = True,
        payload_op: int | None = None,
        count: int | None = None,
        cdb_length: int | None = None,
    ) -> tuple[int, int]:
        length = blocks * BS
        srb = encode_srb(
            lun=lun,
            cdb=cdb_for(op, lba, blocks, byte1, control),
            data_in=data_in,
            data_transfer_length=length if dtl is None else dtl,
            cdb_length=cdb_length,
        )
        payload = srb_request(srb)
        if payload_op is not None:
            payload = struct.pack("<I", payload_op) + payload[4:]
        ext = gpa_ext([(length, 0, RAM_PFNS[: -(-length // PAGE)])], count)
        buf, index, n = batch_of([raw_packet(typ, ext, payload, flags, 1)])
        gpa = side.decoder.decode(buf, index, n)
        side.fp.decode(buf, index, n, gpa, ready=ready, size=64, max_transfer=4 * BS)
        r = side.fp.record(0)
        return r.kind, r.reason

    try:
        assert one() == (fastpath.FAST, 0)
        assert one(op=0x2A, data_in=DataIn.WRITE, byte1=0x08)[0] == fastpath.FAST
        assert one(typ=6) == (0, fastpath.R_TYPE)
        assert one(flags=0) == (0, fastpath.R_TYPE)
        assert one(count=0) == (0, fastpath.R_RANGES)
        assert one(payload_op=9) == (0, fastpath.R_OP)
        assert one(ready=False) == (0, fastpath.R_OP)
        assert one(lun=2) == (0, fastpath.R_ADDRESS)
        assert one(op=0x12) == (0, fastpath.R_CDB)  # INQUIRY
        assert one(cdb_length=9) == (0, fastpath.R_CDB)
        assert one(cdb_length=17) == (0, fastpath.R_CDB)
        assert one(control=0x04) == (0, fastpath.R_CDB)  # NACA
        assert one(byte1=0x01) == (0, fastpath.R_CDB)  # RELADR in a READ(10)
        assert one(byte1=0x20) == (0, fastpath.R_CDB)  # RDPROTECT
        assert one(data_in=DataIn.WRITE) == (0, fastpath.R_DIRECTION)
        assert one(lba=BLOCKS) == (0, fastpath.R_RANGE)
        assert one(blocks=0, dtl=0)[0] == fastpath.SLOW
        assert one(blocks=5) == (0, fastpath.R_RANGE)  # over max_transfer (4 blocks)
        assert one(dtl=BS * 2) == (0, fastpath.R_LENGTH)
        assert one(op=0x2A, data_in=DataIn.WRITE, lun=1) == (0, fastpath.R_READ_ONLY)
    finally:
        side.close()


# --- a file LUN ------------------------------------------------------------------------------


@pytest.mark.parametrize("native", [True, False], ids=["native", "py"])
def test_file_reads_inline_and_writes_that_would_block_are_leftovers(
    tmp_path: Path, seeds: tuple[bytes, bytes], native: bool
) -> None:
    if native:
        _require_native()
    img = tmp_path / "disk.img"
    content = random.Random(3).randbytes(BLOCKS * BS)
    img.write_bytes(content)
    backend = FileBackend(img)
    side = Side(native, *seeds)
    try:
        ff = backend.fast_file()
        assert ff is not None
        side.fp.set_luns({0: LunSpec(fastpath.LUN_FILE, False, BS, BLOCKS, 8 * BS, fd=ff[0])})
        read = encode_srb(cdb=cdb_for(0x88, 3, 2), data_in=DataIn.READ, data_transfer_length=1024)
        write = encode_srb(cdb=cdb_for(0x8A, 9, 1), data_in=DataIn.WRITE, data_transfer_length=512)
        fua = encode_srb(
            cdb=cdb_for(0x8A, 10, 1, byte1=0x08), data_in=DataIn.WRITE, data_transfer_length=512
        )
        raws = [
            raw_packet(9, gpa_ext([(1024, 0, [RAM_PFNS[0]])]), srb_request(read), 1, 1),
            raw_packet(9, gpa_ext([(512, 0, [RAM_PFNS[1]])]), srb_request(write), 1, 2),
            raw_packet(9, gpa_ext([(512, 0, [RAM_PFNS[2]])]), srb_request(fua), 1, 3),
        ]
        buf, index, n = batch_of(raws)
        gpa = side.decoder.decode(buf, index, n)
        assert side.fp.decode(buf, index, n, gpa, ready=True, size=64, max_transfer=4096) == 3
        side.fp.execute(gpa)
        r0, r1, r2 = (side.fp.record(i) for i in range(3))
        # A page-cache hit is read inline (the file was just written).
        assert r0.kind == fastpath.DONE
        assert side.ram.bytes()[:1024] == content[3 * BS : 5 * BS]
        # ext4 refuses RWF_NOWAIT buffered writes (EOPNOTSUPP); a file system that
        # takes them writes inline. Either way the bytes or the leftover are right.
        if r1.kind == fastpath.DONE:
            assert img.read_bytes()[9 * BS : 10 * BS] == seeds[0][PAGE : PAGE + BS]
        else:
            assert (r1.kind, r1.reason in (0, errno.EOPNOTSUPP, errno.EAGAIN)) == (3, True)
        assert (r2.kind, r2.reason) == (fastpath.LEFTOVER, 0)  # FUA: the blocking path
        _, _, k = side.fp.completions()
        assert k == (2 if r1.kind == fastpath.DONE else 1)
        # With writes marked blocking they are leftovers without a syscall.
        side.fp.set_luns(
            {
                0: LunSpec(
                    fastpath.LUN_FILE, False, BS, BLOCKS, 8 * BS, fd=ff[0], blocking_writes=True
                )
            }
        )
        side.fp.decode(buf, index, n, gpa, ready=True, size=64, max_transfer=4096)
        side.fp.execute(gpa)
        assert (side.fp.record(1).kind, side.fp.record(1).reason) == (fastpath.LEFTOVER, 0)
        del gpa
    finally:
        side.close()
        trio.run(backend.close)


@pytest.mark.parametrize("native", [True, False], ids=["native", "py"])
def test_leftover_job_blocks_in_a_thread_and_keeps_failures(
    tmp_path: Path, seeds: tuple[bytes, bytes], native: bool
) -> None:
    """The worker thread's job: a read, a FUA write (RWF_DSYNC) and a write on a
    descriptor that refuses it (EBADF: stays LEFTOVER for the general path)."""
    if native:
        _require_native()
    img, ro_img = tmp_path / "disk.img", tmp_path / "ro.img"
    content = random.Random(5).randbytes(BLOCKS * BS)
    img.write_bytes(content)
    ro_img.write_bytes(content)
    backend = FileBackend(img)
    ro = os.open(ro_img, os.O_RDONLY)
    side = Side(native, *seeds)
    try:
        ff = backend.fast_file()
        assert ff is not None
        side.fp.set_luns(
            {
                0: LunSpec(
                    fastpath.LUN_FILE, False, BS, BLOCKS, 8 * BS, fd=ff[0], blocking_writes=True
                ),
                1: LunSpec(
                    fastpath.LUN_FILE, False, BS, BLOCKS, 8 * BS, fd=ro, blocking_writes=True
                ),
            }
        )
        fua = encode_srb(
            cdb=cdb_for(0x2A, 4, 2, byte1=0x08), data_in=DataIn.WRITE, data_transfer_length=1024
        )
        bad = encode_srb(
            lun=1, cdb=cdb_for(0x2A, 0, 1), data_in=DataIn.WRITE, data_transfer_length=512
        )
        read = encode_srb(
            lun=1, cdb=cdb_for(0x28, 8, 1), data_in=DataIn.READ, data_transfer_length=512
        )
        raws = [
            raw_packet(9, gpa_ext([(1024, 512, [RAM_PFNS[3]])]), srb_request(fua), 1, 1),
            raw_packet(9, gpa_ext([(512, 0, [RAM_PFNS[4]])]), srb_request(bad), 1, 2),
            raw_packet(9, gpa_ext([(512, 0, [RAM_PFNS[5]])]), srb_request(read), 1, 3),
        ]
        buf, index, n = batch_of(raws)
        gpa = side.decoder.decode(buf, index, n)
        assert side.fp.decode(buf, index, n, gpa, ready=True, size=64, max_transfer=4096) == 3
        side.fp.execute(gpa)  # the read may be a page-cache hit, done inline
        kinds = side.fp.kinds()
        assert kinds[:2] == [fastpath.LEFTOVER, fastpath.LEFTOVER]
        recs = bytearray(side.fp.records())
        job = side.fp.leftover_job(recs, side.fp.segments(gpa))
        del gpa
        try:
            done = trio.run(trio.to_thread.run_sync, job)
        finally:
            side.fp.finish_job()
        after = [
            fastpath.SrbRec(*fastpath.REC.unpack_from(recs, fastpath.REC.size * i))
            for i in range(3)
        ]
        assert (after[0].kind, after[1].kind, after[1].reason) == (
            fastpath.DONE,
            fastpath.LEFTOVER,
            errno.EBADF,
        )
        assert after[2].kind == fastpath.DONE
        assert done == (2 if kinds[2] == fastpath.LEFTOVER else 1)
        assert img.read_bytes()[4 * BS : 6 * BS] == seeds[0][3 * PAGE + 512 : 3 * PAGE + 1536]
        assert ro_img.read_bytes() == content
        assert side.ram.bytes()[5 * PAGE : 5 * PAGE + 512] == content[8 * BS : 9 * BS]
        _, _, k = side.fp.complete_copy(recs, 64)
        assert k == 2
    finally:
        side.close()
        os.close(ro)
        trio.run(backend.close)


# --- end to end ------------------------------------------------------------------------------


class TwoLuns(vsp.StorvscDevice):
    def __init__(self, instance: Any = None, **kw: Any) -> None:
        super().__init__(instance, lun=[{"size": "1M"}, {"size": "1M", "block_size": 4096}], **kw)


@pytest.mark.devices.with_args(TwoLuns)
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "general"])
async def test_guest_io_through_the_fast_path(
    local_vm: Any, local_service: Any, monkeypatch: pytest.MonkeyPatch, fast: bool
) -> None:
    from devices.storvsc.protocol import SCSI_IF_TYPE
    from devices.storvsc.vsc import attach_storvsc

    monkeypatch.setattr(vsp, "FAST_PATH", fast)
    (offer,) = [o for o in local_vm.find_offers(SCSI_IF_TYPE) if o.sub_channel_index == 0]
    (dev,) = [d for d in local_service.session().devices if isinstance(d, vsp.StorvscDevice)]
    rnd = random.Random(4)
    async with attach_storvsc(local_vm, offer) as hba:
        for lun in (0, 1):
            bs = hba.disks[lun].block_size
            for lba, n, off in (
                (0, 1, 0),
                (7, 9, 512),
                (100, 64, 0),
                (255 if bs == 4096 else 2047, 1, 0),
            ):
                data = rnd.randbytes(n * bs)
                await hba.write(lun, lba, data, offset=off)
                assert await hba.read(lun, lba, n, offset=off) == data
        with pytest.raises(Exception, match="scsi 0x2"):  # past the end: the general path's sense
            await hba.read(0, 2048, 1)
    if fast:
        assert dev.fast_completed >= 16
    else:
        assert dev.fast_completed == 0


async def test_a_failed_leftover_gets_the_general_paths_sense(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A file write that fails in the fast path's thread is retried by the general
    path, which answers MEDIUM ERROR / WRITE ERROR as it always did; reads go on."""
    from conftest import attached_vm

    from devices.storvsc.protocol import SCSI_IF_TYPE
    from devices.storvsc.vsc import attach_storvsc
    from vmbus.config import devices_from_config
    from vmbus.server import serve_listener

    img = tmp_path / "disk.img"
    data = random.Random(6).randbytes(1 << 20)
    img.write_bytes(data)
    cfg = {"device": [{"type": "storvsc", "lun": [{"backend": "file", "path": str(img)}]}]}
    sock = str(tmp_path / "s.sock")
    await nursery.start(lambda **kw: serve_listener(sock, lambda: devices_from_config(cfg), **kw))
    async with attached_vm(sock) as vm:
        (offer,) = [o for o in vm.find_offers(SCSI_IF_TYPE) if o.sub_channel_index == 0]
        async with attach_storvsc(vm, offer) as hba:
            assert await hba.read(0, 8, 8) == data[8 * BS : 16 * BS]
            # The backend's descriptor now names a read-only file: every write fails.
            (fd,) = [
                int(f)
                for f in os.listdir("/proc/self/fd")
                if os.path.realpath(f"/proc/self/fd/{f}") == str(img)
            ]
            ro = os.open(img, os.O_RDONLY)
            os.dup2(ro, fd)
            os.close(ro)
            with pytest.raises(Exception, match=r"scsi 0x2 sense [7f]00003"):  # MEDIUM ERROR
                await hba.write(0, 3, bytes(BS))
            assert await hba.read(0, 3, 1) == data[3 * BS : 4 * BS]
    assert img.read_bytes() == data
    nursery.cancel_scope.cancel()
