"""Signal and drain eventfds a peer shares, without ever blocking on them.

An eventfd's O_NONBLOCK lives on its open file description, which SCM_RIGHTS
shares: the VMM that received a channel's kick and call in ``bind`` can clear it
on vmbusd's copy too. Then a write(2) of 1 blocks while the counter is saturated
(0xfffffffffffffffe, which the VMM can write itself), and a read(2) blocks while
it is zero: vmbusd's one thread, and every VM it serves, would stop. What this
kernel offers instead (probed on 6.18; see docs/attach-protocol.md):

* an independent open file description is impossible: reopening
  /proc/self/fd/N of an eventfd (an anonymous inode) fails with ENXIO;
* reads: ``preadv2(RWF_NOWAIT)`` is non-blocking per call, whatever the file's
  flags (eventfd reads honour IOCB_NOWAIT since Linux 5.12): ``drain``;
* writes: ``pwritev2(RWF_NOWAIT)`` fails with EOPNOTSUPP (eventfd has no
  write_iter), and "check F_GETFL, then write" leaves a window in which the peer
  clears the flag. So ``signal`` does not write(2) at all: it submits a 0-byte
  Linux AIO write to /dev/null with IOCB_FLAG_RESFD set to the eventfd. The
  write completes inside io_submit, and the kernel then signals the eventfd with
  eventfd_signal(), which takes a spinlock, adds 1 (saturating at 2^64-1) and
  never sleeps, whatever the flags or the counter. Completions are reaped in
  bulk when the AIO ring fills (one io_getevents per ~250 signals).

Where AIO is missing (CONFIG_AIO=n, or io_setup refused) ``signal`` falls back to
a checked write: O_NONBLOCK cleared is refused as the peer's fault
(``PeerTampered``), and a saturated counter is skipped (the peer has a pending
signal anyway). That leaves the check-then-write race; it is logged once.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import platform
import struct
import threading

log = logging.getLogger(__name__)

AIO_EVENTS = 256
"""io_setup(nr_events) of the process's AIO context (the kernel rounds it up)."""

_SYSCALLS = {  # io_setup, io_getevents, io_submit
    "x86_64": (206, 208, 209),
    "aarch64": (0, 4, 2),
}
_IOCB = struct.Struct("<QIiHhIQQqQII")  # struct iocb, linux/aio_abi.h (64 bytes)
_IOCB_CMD_PWRITE = 1
_IOCB_FLAG_RESFD = 1 << 0
_RESFD = struct.Struct("<I")
_RESFD_OFFSET = _IOCB.size - 4  # aio_resfd is the iocb's last field
_IO_EVENT_SIZE = 32
_U64 = struct.Struct("<Q")


class PeerTampered(OSError):
    """The peer cleared O_NONBLOCK on a shared eventfd (fallback path only)."""


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Aio:
    """One AIO context per process; thread-safe (per-thread iocb buffers)."""

    def __init__(self) -> None:
        nrs = _SYSCALLS.get(platform.machine())
        if nrs is None:
            raise OSError(errno.ENOSYS, f"no AIO syscall numbers for {platform.machine()}")
        self._setup_nr, self._getevents_nr, self._submit_nr = nrs
        libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = libc.syscall
        self._syscall.restype = ctypes.c_long
        ctx = ctypes.c_ulong(0)
        if self._syscall(
            ctypes.c_long(self._setup_nr), ctypes.c_long(AIO_EVENTS), ctypes.byref(ctx)
        ):
            err = ctypes.get_errno()
            raise OSError(err, f"io_setup: {os.strerror(err)}")
        self._ctx = ctx
        # io_submit's arguments, built once: ctypes converts nothing per call (3x faster).
        self._submit_args = (ctypes.c_long(self._submit_nr), ctx, ctypes.c_long(1))
        self._null = os.open("/dev/null", os.O_WRONLY | os.O_CLOEXEC)
        self._byte = ctypes.create_string_buffer(1)
        self._events = ctypes.create_string_buffer(_IO_EVENT_SIZE * AIO_EVENTS)
        self._zero = _Timespec(0, 0)
        self._local = threading.local()
        self._reap_lock = threading.Lock()

    def _iocb(self) -> tuple[ctypes.Array[ctypes.c_char], ctypes.Array[ctypes.c_void_p]]:
        """This thread's iocb and its one-element pointer array. The kernel copies the
        iocb during io_submit, so it is reusable at once, but not by two threads at
        once; only aio_resfd changes between signals."""
        mine = getattr(self._local, "iocb", None)
        if mine is None:
            buf = ctypes.create_string_buffer(_IOCB.size)
            _IOCB.pack_into(
                buf,
                0,
                0,  # aio_data
                0,  # aio_key
                0,  # aio_rw_flags
                _IOCB_CMD_PWRITE,
                0,  # aio_reqprio
                self._null,
                ctypes.addressof(self._byte),
                0,  # aio_nbytes: nothing is written anywhere
                0,  # aio_offset
                0,  # aio_reserved2
                _IOCB_FLAG_RESFD,
                0,  # aio_resfd: set per signal
            )
            ptrs = (ctypes.c_void_p * 1)(ctypes.addressof(buf))
            mine = self._local.iocb = (buf, ptrs)
        return mine

    def signal(self, fd: int) -> None:
        buf, ptrs = self._iocb()
        _RESFD.pack_into(buf, _RESFD_OFFSET, fd)  # the eventfd the kernel signals
        for _ in range(3):
            if self._syscall(*self._submit_args, ptrs) == 1:
                return
            err = ctypes.get_errno()
            if err != errno.EAGAIN:  # EBADF or EINVAL: fd is not an open eventfd
                raise OSError(err, f"signalling eventfd {fd}: {os.strerror(err)}")
            self._reap()  # the completion ring is full: empty it and retry
        raise OSError(errno.EAGAIN, "AIO completion ring stays full")

    def _reap(self) -> None:
        with self._reap_lock:
            self._syscall(
                ctypes.c_long(self._getevents_nr),
                self._ctx,
                ctypes.c_long(0),
                ctypes.c_long(AIO_EVENTS),
                self._events,
                ctypes.byref(self._zero),
            )


_aio: _Aio | None = None
_aio_failed = False
_lock = threading.Lock()


def _reset_after_fork() -> None:
    """An AIO context belongs to the process that made it: a child makes its own."""
    global _aio, _aio_failed, _lock
    _aio, _aio_failed, _lock = None, False, threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)


def _get_aio() -> _Aio | None:
    global _aio, _aio_failed
    if _aio is not None or _aio_failed:
        return _aio
    with _lock:
        if _aio is None and not _aio_failed:
            try:
                _aio = _Aio()
            except OSError as exc:
                _aio_failed = True
                log.warning(
                    "eventfd: no Linux AIO (%s): signals use a checked write(2), which a "
                    "VMM racing F_SETFL against it could still block",
                    exc,
                )
    return _aio


def signal(fd: int) -> None:
    """Add 1 to eventfd ``fd``, never blocking, whatever its flags or counter."""
    aio = _get_aio()
    if aio is not None:
        aio.signal(fd)
    else:
        checked_write(fd)


def checked_write(fd: int) -> None:
    """The fallback: refuse a cleared O_NONBLOCK, skip a saturated counter."""
    if not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK:
        raise PeerTampered(errno.EPERM, f"eventfd {fd} lost O_NONBLOCK (cleared by the peer)")
    with contextlib.suppress(BlockingIOError):  # saturated: the peer has a signal pending
        os.eventfd_write(fd, 1)


def drain(fd: int) -> int:
    """Read and reset eventfd ``fd``'s counter (0 if it was zero), never blocking."""
    buf = bytearray(8)
    try:
        os.preadv(fd, [buf], -1, os.RWF_NOWAIT)
    except BlockingIOError:
        return 0
    except OSError as exc:
        if exc.errno != errno.EOPNOTSUPP:  # before Linux 5.12: a plain non-blocking read
            raise
        try:
            return os.eventfd_read(fd)
        except BlockingIOError:
            return 0
    return int(_U64.unpack(buf)[0])
