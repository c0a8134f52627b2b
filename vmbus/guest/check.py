"""Echo verification for load generators, native and pure-Python twins.

`check_echo` returns -1 when packet i of the batch carries trans_id expect_tid + i
and a payload of its sender's length (padding excluded) equal to the first bytes of
`pattern` (compared only when check_bytes), else the index of the first packet that
does not.
"""

from __future__ import annotations

import array
import struct
from collections.abc import Sequence

from vmbus import native

_DESC = struct.Struct("<HHHHQ")


def py_check_echo(
    buf: bytes | bytearray | memoryview,
    index: Sequence[int],
    n: int,
    expect_tid: int,
    pattern: bytes,
    lens: Sequence[int] | None = None,
    payload_len: int = 0,
    check_bytes: bool = True,
) -> int:
    mv = memoryview(buf)
    for i in range(n):
        start, plen = index[2 * i], index[2 * i + 1]
        _type, off8, len8, _flags, tid = _DESC.unpack_from(mv, start)
        want = lens[i] if lens is not None else payload_len
        off, end = off8 * 8, len8 * 8
        if tid != expect_tid + i:
            return i
        if end > plen or off > end or want > len(pattern) or not want <= end - off < want + 8:
            return i
        if check_bytes and mv[start + off : start + off + want] != pattern[:want]:
            return i
    return -1


def native_check_echo(
    buf: bytes | bytearray | memoryview,
    index: array.array[int],
    n: int,
    expect_tid: int,
    pattern: bytes,
    lens: array.array[int] | None = None,
    payload_len: int = 0,
    check_bytes: bool = True,
) -> int:
    mod = native.native_module()  # the C side, whatever VMBUSD_NATIVE selects (tests)
    ffi, lib = mod.ffi, mod.lib
    if n > len(index) // 2 or (lens is not None and len(lens) < n):
        raise ValueError("index/lens shorter than n")
    c_lens = ffi.from_buffer("uint32_t[]", lens) if lens is not None else ffi.NULL
    return int(
        lib.vmb_check_echo(
            ffi.from_buffer(buf),
            ffi.from_buffer("uint32_t[]", index),
            n,
            expect_tid,
            pattern,
            len(pattern),
            c_lens,
            payload_len,
            lib.VMB_CHECK_BYTES if check_bytes else 0,
        )
    )


check_echo = native_check_echo if native.NATIVE else py_check_echo


def py_bench_memcpy(dst: bytearray, src: bytes, size: int, count: int) -> None:
    """Twin of vmb_bench_memcpy: count packets of size bytes at 8-aligned advancing offsets."""
    step = (size + 7) & ~7
    if step == 0 or step > len(dst):
        return
    off = 0
    mv = memoryview(dst)
    for _ in range(count):
        if off + step > len(dst):
            off = 0
        mv[off : off + size] = src[:size]
        off += step


def native_bench_memcpy(dst: bytearray, src: bytes, size: int, count: int) -> None:
    if len(src) < size:
        raise ValueError("src shorter than size")
    native.native_module().lib.vmb_bench_memcpy(
        native.native_module().ffi.from_buffer(dst), len(dst), src, size, count
    )
