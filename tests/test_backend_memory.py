"""The sparse RAM disk: costs only what was written, reads zeros elsewhere, model-checked."""

from __future__ import annotations

import pytest
from disk_model import disk_ops, run_disk_model
from hypothesis import given, settings

from devices.storvsc.backends.base import (
    BackendConfigError,
    BackendIOError,
    DiskBackend,
    load_backend,
    open_backend,
)
from devices.storvsc.backends.memory import MemoryBackend, parse_size

BS = 512


async def test_sparse_reads_zeros_and_allocates_on_write():
    disk = MemoryBackend(size="1T", chunk_size=4096)  # a terabyte costs nothing
    assert isinstance(disk, DiskBackend) and disk.capacity == 1 << 40
    out = bytearray(3 * BS)
    await disk.readv((1 << 40) - 3 * BS, [memoryview(out)])
    assert out == bytes(3 * BS) and disk.allocated_bytes == 0
    data = bytes(range(256)) * 4 * 3
    await disk.writev(4096 - BS, [memoryview(data)[: 100 * 5 + 12], memoryview(data)[512:]])
    assert disk.allocated_bytes == 2 * 4096  # the write straddles two chunks
    back = bytearray(len(data))
    await disk.readv(4096 - BS, [memoryview(back)[: 7 * 64], memoryview(back)[7 * 64 :]])
    assert back == data


async def test_unmap_and_write_zeroes_drop_whole_chunks():
    disk = MemoryBackend(size=64 * 1024, chunk_size=4096)
    await disk.writev(0, [memoryview(b"\xff" * 65536)])
    assert disk.allocated_bytes == 65536
    await disk.unmap([(0, 4096), (8192, 512)])
    assert disk.allocated_bytes == 65536 - 4096
    await disk.write_zeroes(4096 * 4, 4096 * 2 + 512)
    assert disk.allocated_bytes == 65536 - 3 * 4096
    out = bytearray(65536)
    await disk.readv(0, [memoryview(out)])
    want = bytearray(b"\xff" * 65536)
    for off, n in ((0, 4096), (8192, 512), (4096 * 4, 4096 * 2 + 512)):
        want[off : off + n] = bytes(n)
    assert out == want


async def test_bounds_and_read_only():
    disk = MemoryBackend(size=8 * BS)
    buf = memoryview(bytearray(BS))
    with pytest.raises(BackendIOError):
        await disk.readv(8 * BS, [buf])
    with pytest.raises(BackendIOError):
        await disk.readv(100, [buf])  # unaligned
    ro = MemoryBackend(size=8 * BS, read_only=True)
    with pytest.raises(BackendIOError):
        await ro.writev(0, [buf])
    with pytest.raises(BackendIOError):
        await ro.unmap([(0, BS)])
    await disk.close()
    with pytest.raises(BackendIOError):
        await disk.readv(0, [buf])


async def test_resize_forgets_the_cut_tail():
    disk = MemoryBackend(size=16 * BS, chunk_size=4 * BS)
    await disk.writev(0, [memoryview(b"\x01" * 16 * BS)])
    await disk.resize(6 * BS)
    assert disk.capacity == 6 * BS and disk.allocated_bytes == 2 * 4 * BS
    await disk.resize(16 * BS)
    out = bytearray(16 * BS)
    await disk.readv(0, [memoryview(out)])
    assert out == b"\x01" * 6 * BS + bytes(10 * BS)


def test_config_validation():
    assert parse_size("64MiB") == 64 << 20 and parse_size("2G") == 2 << 30
    assert parse_size(4096) == 4096
    for bad in ({"size": "lots"}, {"size": 1000}, {"size": 0}, {"size": 4096, "block_size": 1024}):
        with pytest.raises(BackendConfigError):
            MemoryBackend(**bad)  # type: ignore[arg-type]


async def test_load_by_entry_point_and_path():
    disk = await open_backend(load_backend("memory", {"size": "1M", "block_size": 4096}))
    assert isinstance(disk, MemoryBackend) and disk.block_size == 4096
    disk = load_backend("devices.storvsc.backends.memory:MemoryBackend", {"size": 4096})
    assert disk.capacity == 4096
    with pytest.raises(BackendConfigError):
        load_backend("no-such-backend", {})


@settings(max_examples=60, deadline=None)
@given(ops=disk_ops(blocks=256))
async def test_memory_backend_matches_model(ops):
    await run_disk_model(MemoryBackend(size=256 * BS, chunk_size=2048, max_transfer=8 * BS), ops)


@settings(max_examples=20, deadline=None)
@given(ops=disk_ops(blocks=64, max_blocks=8))
async def test_memory_backend_4k_matches_model(ops):
    await run_disk_model(MemoryBackend(size=64 * 4096, block_size=4096), ops)
