"""Raw image file or block device as a disk, zero-copy.

readv/writev are os.preadv/os.pwritev on the caller's own buffers (later: iovecs
into guest RAM), run in a worker thread so trio never blocks; short transfers
are continued, never mistaken for success. Details that matter for data safety:

- flush() is fdatasync(); a FUA write is a pwritev with RWF_DSYNC (one syscall,
  durable on return) or, where the kernel/fs refuses that flag, a write followed
  by fdatasync.
- `write_back=False` opens the file O_DSYNC: every write is durable when it
  completes, so MODE SENSE may honestly report WCE=0.
- `direct=True` opens O_DIRECT. The kernel then wants buffer addresses, lengths
  and offsets aligned to the device's logical block size; offsets and lengths
  are always whole blocks here, and a request whose buffers are not aligned is
  bounced through one page-aligned buffer (one extra copy, only for that request).
- unmap() punches holes (FALLOC_FL_PUNCH_HOLE|KEEP_SIZE), so unmapped blocks read
  as zeros; write_zeroes() tries ZERO_RANGE, then PUNCH_HOLE, then writes zeros.
  A file system without hole punching is detected when opening (a probe past the
  end of the file, which changes nothing) or on first use: `can_unmap` turns False
  and the unmap that found out is completed by writing zeros.
- storvsc's fast path (devices/storvsc/fastpath.py) reads and writes the fd
  itself (`fast_file()`): inline with RWF_NOWAIT, and what would block in one
  worker thread per batch (`hold()`/`unhold()` so close() waits for it), with
  readv/writev's semantics (a FUA write is RWF_DSYNC; where the kernel refuses
  that, the general path's writev does its fdatasync fallback).
- `create_size` creates a sparse image (ftruncate) if the file does not exist;
  an existing file of another size is a configuration error, never truncated.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cffi
import trio

from devices.storvsc.backends.base import BackendConfigError, BackendIOError
from devices.storvsc.backends.memory import check_geometry, parse_size

DEFAULT_MAX_TRANSFER = 8 * 1024 * 1024  # per readv/writev; the SCSI layer bounds it further
ZERO_CHUNK_BYTES = 1024 * 1024  # zeros written per call when fallocate cannot zero a range
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024

BLKGETSIZE64 = 0x80081272  # <linux/fs.h> _IOR(0x12, 114, size_t)
BLKSSZGET = 0x1268  # <linux/fs.h> _IO(0x12, 104): logical sector size
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS)

_ffi = cffi.FFI()  # ABI level only: the address of a buffer, for O_DIRECT alignment checks
_libc = ctypes.CDLL(None, use_errno=True)
_libc_fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate
_libc_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with any mode (os.posix_fallocate cannot punch holes)."""
    if _libc_fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _address(view: memoryview) -> int:
    return int(_ffi.cast("uintptr_t", _ffi.from_buffer(view, require_writable=False)))


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """Drop the first n bytes from a list of views (after a short transfer)."""
    while n and views:
        first = views[0]
        if n >= first.nbytes:
            n -= first.nbytes
            views = views[1:]
        else:
            views = [first[n:], *views[1:]]
            n = 0
    return views


def _device_logical_block(st: os.stat_result) -> int | None:
    """Logical block size of the device a regular file lives on, from sysfs."""
    base = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    for candidate in (base / "queue/logical_block_size", base / "../queue/logical_block_size"):
        try:
            return int(candidate.read_text())
        except (OSError, ValueError):
            continue
    return None


class FileBackend:
    """A disk backed by a raw image file or a block device."""

    can_write_zeroes = True
    survives_restart = True  # what vmbusd wrote is in the file (or the page cache)
    unmap_zeroes = True  # punched holes read as zeros (LBPRZ); fallbacks write zeros

    def __init__(
        self,
        path: str | os.PathLike[str],
        read_only: bool = False,
        direct: bool = False,
        create_size: int | str | None = None,
        block_size: int = 512,
        physical_block_exponent: int = 0,
        write_back: bool = True,
        max_transfer: int = DEFAULT_MAX_TRANSFER,
        direct_alignment: int | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.block_size = block_size
        self.physical_block_exponent = physical_block_exponent
        self.read_only = read_only
        self.write_back = write_back
        self.direct = direct
        if max_transfer < block_size:
            raise BackendConfigError("max_transfer must be at least one block")
        self.max_transfer = max_transfer
        self._inflight = 0  # blocking calls running in worker threads
        self._closing = False
        self._idle = trio.Event()
        self._fd = self._open(create_size)
        try:
            self._setup(direct_alignment)
        except BaseException:
            os.close(self._fd)
            raise
        self._rwf_dsync = hasattr(os, "RWF_DSYNC")
        # Cleared by the fast path when this file system refuses RWF_NOWAIT writes
        # (EOPNOTSUPP: ext4 buffered), so it stops trying them.
        self.nowait_writes = True
        self._zero_modes = [
            FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
            FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
        ]

    # ---- opening ----

    def _open(self, create_size: int | str | None) -> int:
        flags = os.O_CLOEXEC | (os.O_RDONLY if self.read_only else os.O_RDWR)
        if self.direct:
            flags |= os.O_DIRECT
        if not self.write_back and not self.read_only:
            flags |= os.O_DSYNC
        try:
            if create_size is None:
                return os.open(self.path, flags)
            if self.read_only:
                raise BackendConfigError("create_size makes no sense with read_only")
            size = parse_size(create_size)
            check_geometry(size, self.block_size, self.physical_block_exponent)
            try:
                fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                fd = os.open(self.path, flags)
                if os.fstat(fd).st_size != size:
                    os.close(fd)
                    raise BackendConfigError(
                        f"{self.path} exists with another size than create_size={size}"
                    ) from None
                return fd
            os.ftruncate(fd, size)  # sparse: no block is allocated until written
            return fd
        except OSError as err:
            raise BackendConfigError(f"cannot open {self.path}: {err}") from err

    def _setup(self, direct_alignment: int | None) -> None:
        st = os.fstat(self._fd)
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        if not (self.is_block_device or stat.S_ISREG(st.st_mode)):
            raise BackendConfigError(f"{self.path} is neither a regular file nor a block device")
        device_block: int | None
        if self.is_block_device:
            try:
                raw = fcntl.ioctl(self._fd, BLKGETSIZE64, b"\0" * 8)
                size = struct.unpack("=Q", raw)[0]
            except OSError:
                size = os.lseek(self._fd, 0, os.SEEK_END)
            try:
                device_block = struct.unpack("=i", fcntl.ioctl(self._fd, BLKSSZGET, b"\0" * 4))[0]
            except OSError:
                device_block = None
            if device_block and device_block > self.block_size:
                raise BackendConfigError(
                    f"{self.path} has {device_block}-byte sectors: use block_size={device_block}"
                )
        else:
            size = st.st_size
            device_block = _device_logical_block(st)
        self.capacity = size - size % self.block_size  # a partial last block is not exposed
        check_geometry(self.capacity, self.block_size, self.physical_block_exponent)
        # O_DIRECT offsets and lengths must be multiples of the device's logical block
        # (a regular file's too: the file system checks against its block device), so a
        # 512-byte disk on a 4096-byte device would fail every I/O with EINVAL.
        align = direct_alignment or device_block or self.block_size
        if self.direct and (align > self.block_size or self.block_size % align):
            raise BackendConfigError(
                f"{self.path}: O_DIRECT needs {align}-byte alignment, which does not divide "
                f"block_size {self.block_size} (use block_size={max(align, 512)} or direct=false)"
            )
        self.direct_alignment = align
        self.can_unmap = not self.read_only and self._probe_punch_hole(st)

    def _probe_punch_hole(self, st: os.stat_result) -> bool:
        """Ask the file system about hole punching without touching data: past EOF."""
        if self.is_block_device:
            return True  # the block layer zeroes or discards; failures fall back at runtime
        page = mmap.PAGESIZE
        past_end = (st.st_size + page - 1) // page * page + page
        try:
            fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, past_end, page)
        except OSError as err:
            return err.errno not in _UNSUPPORTED
        return True

    # ---- helpers run in worker threads ----

    def _check(self, offset: int, length: int, write: bool) -> None:
        if self._fd < 0:
            raise BackendIOError(f"{self.path} is closed", offset=offset)
        if write and self.read_only:
            raise BackendIOError(f"{self.path} is read-only", offset=offset)
        if offset % self.block_size or length % self.block_size:
            raise BackendIOError("unaligned I/O", offset=offset)
        if offset < 0 or length < 0 or offset + length > self.capacity:
            raise BackendIOError("I/O beyond the end of the disk", offset=offset)

    def _needs_bounce(self, views: Sequence[memoryview]) -> bool:
        if not self.direct:
            return False
        a = self.direct_alignment
        return any(v.nbytes % a or _address(v) % a for v in views)

    def _preadv_all(self, offset: int, views: list[memoryview]) -> None:
        start = offset
        try:
            while views:
                n = os.preadv(self._fd, views[:IOV_MAX], offset)
                if n == 0:
                    raise BackendIOError(f"{self.path}: unexpected end of file", offset=offset)
                offset += n
                views = _advance(views, n)
        except OSError as err:
            raise BackendIOError(f"{self.path}: read failed: {err}", offset=start) from err

    def _pwritev_all(self, offset: int, views: list[memoryview], dsync: bool) -> bool:
        """Write everything; True if it was all written RWF_DSYNC (durable on return)."""
        start = offset
        try:
            while views:
                flags = os.RWF_DSYNC if dsync else 0
                try:
                    n = os.pwritev(self._fd, views[:IOV_MAX], offset, flags)
                except OSError as err:
                    if not (dsync and err.errno in (*_UNSUPPORTED, errno.EINVAL)):
                        raise
                    self._rwf_dsync = dsync = False  # this kernel/fs: write, then fdatasync
                    continue
                if n == 0:
                    raise BackendIOError(f"{self.path}: write made no progress", offset=offset)
                offset += n
                views = _advance(views, n)
        except OSError as err:
            raise BackendIOError(f"{self.path}: write failed: {err}", offset=start) from err
        return dsync

    def _read(self, offset: int, views: list[memoryview]) -> None:
        if not self._needs_bounce(views):
            self._preadv_all(offset, views)
            return
        total = sum(v.nbytes for v in views)
        bounce = memoryview(mmap.mmap(-1, total))  # page-aligned
        self._preadv_all(offset, [bounce])
        pos = 0
        for v in views:
            v[:] = bounce[pos : pos + v.nbytes]
            pos += v.nbytes

    def _write(self, offset: int, views: list[memoryview], fua: bool) -> None:
        if self._needs_bounce(views):
            total = sum(v.nbytes for v in views)
            bounce = memoryview(mmap.mmap(-1, total))
            pos = 0
            for v in views:
                bounce[pos : pos + v.nbytes] = v
                pos += v.nbytes
            views = [bounce]
        durable = self._pwritev_all(offset, views, fua and self._rwf_dsync)
        if fua and not durable and self.write_back:
            self._fdatasync()  # no RWF_DSYNC here; O_DSYNC (write_back=False) needs nothing

    def _fdatasync(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as err:
            raise BackendIOError(f"{self.path}: fdatasync failed: {err}") from err

    def _zero_range(self, offset: int, length: int) -> None:
        """Make a range read as zeros, with the cheapest way this file system offers."""
        for mode in list(self._zero_modes):
            try:
                fallocate(self._fd, mode, offset, length)
                return
            except OSError as err:
                if err.errno not in _UNSUPPORTED:
                    raise BackendIOError(
                        f"{self.path}: fallocate failed: {err}", offset=offset
                    ) from err
                self._zero_modes = [m for m in self._zero_modes if m != mode]
        self._write_zeros(offset, length)

    def _write_zeros(self, offset: int, length: int) -> None:
        zeros = memoryview(mmap.mmap(-1, min(length, ZERO_CHUNK_BYTES)))  # aligned, zero-filled
        end = offset + length
        while offset < end:
            n = min(zeros.nbytes, end - offset)
            self._pwritev_all(offset, [zeros[:n]], dsync=False)
            offset += n

    def _unmap(self, ranges: Sequence[tuple[int, int]]) -> None:
        for offset, length in ranges:
            if self.can_unmap:
                try:
                    fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                    continue
                except OSError as err:
                    if err.errno not in _UNSUPPORTED:
                        raise BackendIOError(
                            f"{self.path}: punch hole failed: {err}", offset=offset
                        ) from err
                    self.can_unmap = False  # stop advertising; keep the zeros promise below
            self._zero_range(offset, length)

    # ---- the DiskBackend interface ----

    async def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        views = [memoryview(b).cast("B") for b in buffers]
        self._check(offset, sum(v.nbytes for v in views), write=False)
        await self._io(self._read, offset, views)

    async def writev(self, offset: int, buffers: Sequence[memoryview], fua: bool = False) -> None:
        views = [memoryview(b).cast("B") for b in buffers]
        self._check(offset, sum(v.nbytes for v in views), write=True)
        await self._io(self._write, offset, views, fua)

    def fast_file(self) -> tuple[int, int] | None:
        """(fd, O_DIRECT alignment or 0) for storvsc's fast path; None once closing.
        The fd stays open until close(), which the fast path checks every batch."""
        if self._fd < 0 or self._closing:
            return None
        return self._fd, self.direct_alignment if self.direct else 0

    def hold(self) -> None:
        """Count I/O that a caller runs on the fd itself (storvsc's fast path, in a
        worker thread): close() waits for it as for readv/writev. Pair with unhold()."""
        self._inflight += 1

    def unhold(self) -> None:
        self._inflight -= 1
        if not self._inflight:
            self._idle.set()

    async def flush(self) -> None:
        if self._fd < 0:
            raise BackendIOError(f"{self.path} is closed")
        if self.read_only:
            await trio.lowlevel.checkpoint()
            return
        await self._io(self._fdatasync)

    async def unmap(self, ranges: Sequence[tuple[int, int]]) -> None:
        ranges = list(ranges)
        for offset, length in ranges:
            self._check(offset, length, write=True)
        await self._io(self._unmap, ranges)

    async def write_zeroes(self, offset: int, length: int) -> None:
        self._check(offset, length, write=True)
        await self._io(self._zero_range, offset, length)

    async def resize(self, new_capacity: int) -> None:
        """Regular files only: ftruncate (growing stays sparse)."""
        if self.is_block_device or self.read_only:
            raise BackendConfigError(f"{self.path} cannot be resized")
        check_geometry(new_capacity, self.block_size, self.physical_block_exponent)
        try:
            await self._io(os.ftruncate, self._fd, new_capacity)
        except OSError as err:
            raise BackendIOError(f"{self.path}: resize failed: {err}") from err
        self.capacity = new_capacity

    async def _io(self, fn: Any, *args: Any) -> Any:
        """Run one blocking call off the trio thread, counted so close() can wait for it."""
        if self._fd < 0 or self._closing:
            raise BackendIOError(f"{self.path}: backend is closed")
        self._inflight += 1
        try:
            return await trio.to_thread.run_sync(fn, *args)
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()

    async def close(self) -> None:
        """Refuse new I/O, wait for what is in flight, then close the fd once: a worker
        thread never finds its fd closed (or reused) under it."""
        self._closing = True
        while self._inflight:
            self._idle = trio.Event()
            await self._idle.wait()
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
        await trio.lowlevel.checkpoint()
