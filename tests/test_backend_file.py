"""The file backend: sparse creation, zero-copy I/O, durability, holes, fallbacks."""

from __future__ import annotations

import errno
import mmap
import os
import subprocess
import sys

import pytest
from conftest import require_tool
from disk_model import (
    GOOD,
    disk_ops,
    read10,
    run_disk_model,
    scsi,
    sync10,
    unmap_cdb,
    unmap_params,
    write10,
    write16,
)
from hypothesis import HealthCheck, given, settings

from devices.storvsc.backends import file as file_mod
from devices.storvsc.backends.base import BackendConfigError, BackendIOError, DiskBackend
from devices.storvsc.backends.file import FileBackend
from devices.storvsc.scsi import ScsiController

BS = 512
MIB = 1 << 20


def allocated(path) -> int:
    return os.stat(path).st_blocks * 512


def direct_io_supported(path) -> bool:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    return True


async def test_create_sparse_image_and_reopen(tmp_path):
    path = tmp_path / "disk.img"
    disk = FileBackend(path, create_size="4M")
    assert isinstance(disk, DiskBackend)
    assert os.path.getsize(path) == 4 * MIB and allocated(path) == 0 and disk.capacity == 4 * MIB
    await disk.close()
    again = FileBackend(path, create_size=4 * MIB)  # same size: reused, not truncated
    await again.close()
    with pytest.raises(BackendConfigError):
        FileBackend(path, create_size="8M")
    with pytest.raises(BackendConfigError):
        FileBackend(tmp_path / "missing.img")
    with pytest.raises(BackendConfigError):
        FileBackend(tmp_path / "x.img", create_size="1M", read_only=True)
    with pytest.raises(BackendConfigError):
        FileBackend(tmp_path)  # a directory


async def test_odd_sized_image_exposes_whole_blocks(tmp_path):
    path = tmp_path / "odd.img"
    path.write_bytes(b"\x07" * (10 * BS + 100))
    disk = FileBackend(path, read_only=True)
    assert disk.capacity == 10 * BS and not disk.can_unmap
    out = bytearray(BS)
    await disk.readv(9 * BS, [memoryview(out)])
    assert out == b"\x07" * BS
    with pytest.raises(BackendIOError):
        await disk.writev(0, [memoryview(out)])
    await disk.flush()
    await disk.close()


async def test_readv_writev_scatter_gather(tmp_path):
    disk = FileBackend(tmp_path / "d.img", create_size="1M")
    data = os.urandom(8 * BS)
    views = [memoryview(data)[:700], memoryview(data)[700:3000], memoryview(data)[3000:]]
    await disk.writev(BS * 3, views)
    with open(tmp_path / "d.img", "rb") as f:
        f.seek(BS * 3)
        assert f.read(8 * BS) == data
    out = bytearray(8 * BS)
    await disk.readv(BS * 3, [memoryview(out)[:1], memoryview(out)[1:]])
    assert out == data
    with pytest.raises(BackendIOError):
        await disk.readv(MIB, [memoryview(out)[:BS]])
    await disk.close()
    with pytest.raises(BackendIOError):
        await disk.readv(0, [memoryview(out)[:BS]])


async def test_short_reads_and_writes_are_continued(tmp_path, monkeypatch):
    disk = FileBackend(tmp_path / "d.img", create_size="1M")
    real_preadv, real_pwritev = os.preadv, os.pwritev
    calls = {"r": 0, "w": 0}

    def short_preadv(fd, views, offset):  # at most 100 bytes per call
        calls["r"] += 1
        v = memoryview(views[0])
        return real_preadv(fd, [v[:100]], offset)

    def short_pwritev(fd, views, offset, flags=0):
        calls["w"] += 1
        v = memoryview(views[0])
        return real_pwritev(fd, [v[:100]], offset, flags)

    monkeypatch.setattr(file_mod.os, "preadv", short_preadv)
    monkeypatch.setattr(file_mod.os, "pwritev", short_pwritev)
    data = os.urandom(2 * BS)
    await disk.writev(0, [memoryview(data)[:300], memoryview(data)[300:]])
    out = bytearray(2 * BS)
    await disk.readv(0, [memoryview(out)])
    assert out == data and calls["r"] >= 11 and calls["w"] >= 11

    monkeypatch.setattr(file_mod.os, "preadv", lambda fd, views, offset: 0)  # EOF
    with pytest.raises(BackendIOError):
        await disk.readv(0, [memoryview(out)])
    await disk.close()


async def test_durability_seen_by_another_process(tmp_path, monkeypatch):
    """Written + SYNCHRONIZE CACHE'd data is in the file for a separate process.

    The page cache is shared, so another process would see the data even without
    a sync: the spies make sure the sync really reaches the disk's fd.
    """
    path = tmp_path / "durable.img"
    ctrl = ScsiController()
    disk = FileBackend(path, create_size="1M")
    ctrl.add_lun(0, disk)
    synced: list[int] = []
    dsync_writes: list[int] = []
    real_fdatasync, real_pwritev = os.fdatasync, os.pwritev

    def spy_fdatasync(fd):
        synced.append(fd)
        real_fdatasync(fd)

    def spy_pwritev(fd, views, offset, flags=0):
        if flags & getattr(os, "RWF_DSYNC", 0):
            dsync_writes.append(offset)
        return real_pwritev(fd, views, offset, flags)

    monkeypatch.setattr(file_mod.os, "fdatasync", spy_fdatasync)
    monkeypatch.setattr(file_mod.os, "pwritev", spy_pwritev)
    data = os.urandom(4 * BS)
    res, _ = await scsi(ctrl, write10(100, 4), data_out=data)
    assert res.status == GOOD and synced == [] and dsync_writes == []  # write-back: cached
    res, _ = await scsi(ctrl, sync10())
    assert res.status == GOOD and synced == [disk._fd]
    fua_data = os.urandom(BS)
    res, _ = await scsi(ctrl, write16(7, 1, flags=0x08), data_out=fua_data)  # FUA
    assert res.status == GOOD
    assert dsync_writes == [7 * BS] or synced == [disk._fd] * 2  # RWF_DSYNC, or write+sync
    reader = (
        "import sys; f = open(sys.argv[1], 'rb'); f.seek(int(sys.argv[2])); "
        "sys.stdout.write(f.read(int(sys.argv[3])).hex())"
    )
    for offset, want in ((100 * BS, data), (7 * BS, fua_data)):
        out = subprocess.run(
            [sys.executable, "-c", reader, str(path), str(offset), str(len(want))],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        assert bytes.fromhex(out) == want
    await ctrl.disk(0).backend.close()


async def test_fua_uses_dsync_or_falls_back_to_fdatasync(tmp_path, monkeypatch):
    disk = FileBackend(tmp_path / "d.img", create_size="1M")
    real_pwritev = os.pwritev
    seen: list[int] = []
    synced: list[int] = []

    def no_dsync(fd, views, offset, flags=0):
        seen.append(flags)
        if flags:
            raise OSError(errno.EOPNOTSUPP, "no RWF_DSYNC here")
        return real_pwritev(fd, views, offset, flags)

    monkeypatch.setattr(file_mod.os, "pwritev", no_dsync)
    monkeypatch.setattr(file_mod.os, "fdatasync", lambda fd: synced.append(fd))
    await disk.writev(0, [memoryview(bytes(BS))], fua=True)
    assert seen == [os.RWF_DSYNC, 0] and len(synced) == 1
    await disk.writev(0, [memoryview(bytes(BS))], fua=True)  # remembered: no retry
    assert seen[-1] == 0 and len(synced) == 2
    await disk.writev(0, [memoryview(bytes(BS))])  # no FUA: no sync
    assert len(synced) == 2
    await disk.flush()
    assert len(synced) == 3
    await disk.close()


async def test_write_through_mode_opens_dsync(tmp_path):
    disk = FileBackend(tmp_path / "d.img", create_size="1M", write_back=False)
    assert file_mod.fcntl.fcntl(disk._fd, file_mod.fcntl.F_GETFL) & os.O_DSYNC
    ctrl = ScsiController()
    ctrl.add_lun(0, disk)
    _, data = await scsi(ctrl, bytes([0x1A, 0x08, 0x08, 0, 255, 0]), data_in_len=255)
    assert data[6] & 0x04 == 0  # WCE = 0: honest, every write is durable on completion
    await disk.close()


async def test_unmap_punches_holes(tmp_path):
    path = tmp_path / "holes.img"
    disk = FileBackend(path, create_size="1M")
    assert disk.can_unmap and disk.unmap_zeroes
    ctrl = ScsiController()
    ctrl.add_lun(0, disk)
    await scsi(ctrl, write10(0, 256), data_out=b"\xaa" * 256 * BS)
    before = allocated(path)
    assert before >= 128 * 1024
    params = unmap_params([(0, 256)])
    res, _ = await scsi(ctrl, unmap_cdb(len(params)), data_out=params)
    assert res.status == GOOD and allocated(path) < before
    _, got = await scsi(ctrl, read10(0, 256), data_in_len=256 * BS)
    assert got == bytes(256 * BS)
    await disk.write_zeroes(0, 8 * BS)
    assert os.path.getsize(path) == MIB  # KEEP_SIZE
    await disk.close()


async def test_no_hole_punching_falls_back_to_zeros(tmp_path, monkeypatch):
    def unsupported(fd, mode, offset, length):
        raise OSError(errno.EOPNOTSUPP, "not on this file system")

    monkeypatch.setattr(file_mod, "fallocate", unsupported)
    disk = FileBackend(tmp_path / "d.img", create_size="1M")
    assert not disk.can_unmap  # the probe past EOF found out
    await disk.writev(0, [memoryview(b"\x55" * 4 * BS)])
    await disk.write_zeroes(BS, 2 * BS)
    out = bytearray(4 * BS)
    await disk.readv(0, [memoryview(out)])
    assert out == b"\x55" * BS + bytes(2 * BS) + b"\x55" * BS
    assert disk._zero_modes == []
    await disk.close()

    monkeypatch.undo()
    disk = FileBackend(tmp_path / "d.img")
    assert disk.can_unmap
    monkeypatch.setattr(file_mod, "fallocate", unsupported)  # e.g. the fs changed under us
    await disk.writev(0, [memoryview(b"\x55" * 4 * BS)])
    await disk.unmap([(0, 2 * BS)])
    assert not disk.can_unmap  # no longer advertised; the unmap still zeroed the range
    await disk.readv(0, [memoryview(out)])
    assert out == bytes(2 * BS) + b"\x55" * 2 * BS
    await disk.close()


async def test_fallocate_errors_are_io_errors(tmp_path, monkeypatch):
    disk = FileBackend(tmp_path / "d.img", create_size="1M")

    def broken(fd, mode, offset, length):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(file_mod, "fallocate", broken)
    with pytest.raises(BackendIOError):
        await disk.unmap([(0, BS)])
    with pytest.raises(BackendIOError):
        await disk.write_zeroes(0, BS)
    await disk.close()


async def test_direct_io_aligned_and_bounced(tmp_path):
    if not direct_io_supported(tmp_path / "probe"):
        pytest.skip("O_DIRECT not supported on this file system")
    path = tmp_path / "direct.img"
    disk = FileBackend(path, create_size="1M", direct=True)
    data = os.urandom(8 * BS)
    aligned = mmap.mmap(-1, 8 * BS)  # page-aligned: straight to the file
    aligned[:] = data
    await disk.writev(0, [memoryview(aligned)])
    assert not disk._needs_bounce([memoryview(aligned)])
    odd = bytearray(8 * BS + 1)  # unaligned by one byte: bounced
    view = memoryview(odd)[1:]
    assert disk._needs_bounce([view])
    await disk.readv(0, [view[:100], view[100:]])
    assert bytes(view) == data
    await disk.writev(8 * BS, [view], fua=True)
    with open(path, "rb") as f:
        f.seek(8 * BS)
        assert f.read(8 * BS) == data
    await disk.close()


def test_direct_alignment_must_divide_block_size(tmp_path):
    if not direct_io_supported(tmp_path / "probe"):
        pytest.skip("O_DIRECT not supported on this file system")
    with pytest.raises(BackendConfigError):
        FileBackend(tmp_path / "a.img", create_size="1M", direct=True, direct_alignment=4096)


async def test_direct_alignment_follows_a_larger_device_block(tmp_path, monkeypatch):
    """A file on a 4096-byte-sector device cannot serve 512-byte O_DIRECT I/O."""
    if not direct_io_supported(tmp_path / "probe"):
        pytest.skip("O_DIRECT not supported on this file system")
    monkeypatch.setattr(file_mod, "_device_logical_block", lambda st: 4096)
    with pytest.raises(BackendConfigError, match="block_size=4096"):
        FileBackend(tmp_path / "a.img", create_size="1M", direct=True)
    disk = FileBackend(tmp_path / "a.img", create_size="1M", direct=True, block_size=4096)
    assert disk.direct_alignment == 4096
    odd = memoryview(mmap.mmap(-1, 3 * 4096))[512 : 512 + 4096]  # 512- but not 4096-aligned
    assert disk._needs_bounce([odd])
    plain = FileBackend(tmp_path / "b.img", create_size="1M")  # buffered I/O: any block size
    assert plain.block_size == 512
    await disk.close()
    await plain.close()


@pytest.fixture
def fs_on_4k_device(tmp_path):
    """An ext4 file system on a loop device with 4096-byte logical sectors (root only)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices, mount)")
    for tool, package in (("losetup", "mount"), ("mkfs.ext4", "e2fsprogs"), ("mount", "mount")):
        require_tool(tool, package)  # CI runs as root: a missing tool fails, never skips
    image = tmp_path / "fs.img"
    with open(image, "wb") as f:
        f.truncate(32 * MIB)
    run = lambda *cmd: subprocess.run(cmd, capture_output=True, text=True)  # noqa: E731
    proc = run("losetup", "--find", "--show", "--sector-size", "4096", str(image))
    if proc.returncode != 0:
        pytest.fail(f"losetup failed: {proc.stderr.strip()}")  # root has loop devices
    dev = proc.stdout.strip()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        if run("mkfs.ext4", "-q", dev).returncode or run("mount", dev, str(mnt)).returncode:
            pytest.fail("cannot make or mount a file system here (root, e2fsprogs, mount)")
        try:
            yield mnt
        finally:
            run("umount", "--lazy", str(mnt))  # lazy: a leaked fd must not pin the device
    finally:
        run("losetup", "--detach", dev)


async def test_direct_on_a_4k_sector_file_system(fs_on_4k_device):
    """Found on a real 4Kn device: 512-byte O_DIRECT writes failed with EINVAL."""
    path = fs_on_4k_device / "disk.img"
    with pytest.raises(BackendConfigError, match="O_DIRECT needs 4096"):
        FileBackend(path, create_size="1M", direct=True)
    disk = FileBackend(path, create_size="1M", direct=True, block_size=4096)
    ctrl = ScsiController()
    ctrl.add_lun(0, disk)
    data = os.urandom(2 * 4096)
    guest = memoryview(bytearray(3 * 4096))[512 : 512 + 2 * 4096]  # not 4096-aligned
    guest[:] = data
    res = await ctrl.execute(0, write10(1, 2, flags=0x08), [guest], False)
    assert res.status == GOOD
    _, got = await scsi(ctrl, read10(1, 2), data_in_len=2 * 4096)
    assert got == data
    await disk.close()


async def test_resize_regular_file(tmp_path):
    path = tmp_path / "grow.img"
    ctrl = ScsiController()
    ctrl.add_lun(0, FileBackend(path, create_size="1M"))
    await ctrl.resize(0, 2 * MIB)
    assert os.path.getsize(path) == 2 * MIB and allocated(path) == 0
    res, _ = await scsi(ctrl, bytes(6))
    assert res.status == 0x02 and res.sense[12:14] == b"\x2a\x09"
    await ctrl.disk(0).backend.close()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=disk_ops(blocks=256))
async def test_file_backend_matches_model(tmp_path, ops):
    disk = FileBackend(tmp_path / "model.img", create_size=256 * BS, max_transfer=16 * BS)
    try:
        await run_disk_model(disk, ops)
    finally:
        await disk.close()


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=disk_ops(blocks=64, max_blocks=8))
async def test_file_backend_direct_4k_matches_model(tmp_path, ops):
    if not direct_io_supported(tmp_path / "probe"):
        pytest.skip("O_DIRECT not supported on this file system")
    disk = FileBackend(
        tmp_path / "model4k.img", create_size=64 * 4096, block_size=4096, direct=True
    )
    try:
        await run_disk_model(disk, ops)
    finally:
        await disk.close()


@pytest.fixture
def loop_device(tmp_path):
    """A real block device: a loop device over a sparse file (needs root and losetup)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices)")
    require_tool("losetup", "mount")  # CI runs as root: a missing tool fails, never skips
    image = tmp_path / "loop.img"
    with open(image, "wb") as f:
        f.truncate(4 * MIB)
    proc = subprocess.run(
        ["losetup", "--find", "--show", str(image)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.fail(f"losetup failed: {proc.stderr.strip()}")  # root has loop devices
    dev = proc.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "--detach", dev], check=False)


async def test_block_device(loop_device):
    disk = FileBackend(loop_device, direct=True)
    assert disk.is_block_device and disk.capacity == 4 * MIB and disk.can_unmap
    ctrl = ScsiController()
    ctrl.add_lun(0, disk)
    data = os.urandom(8 * BS)
    res, _ = await scsi(ctrl, write10(1, 8, flags=0x08), data_out=data)  # FUA, bounced
    assert res.status == GOOD
    _, got = await scsi(ctrl, read10(1, 8), data_in_len=8 * BS)
    assert got == data
    params = unmap_params([(0, 16)])
    res, _ = await scsi(ctrl, unmap_cdb(len(params)), data_out=params)
    assert res.status == GOOD
    _, got = await scsi(ctrl, read10(1, 8), data_in_len=8 * BS)
    assert got == bytes(8 * BS)
    res, _ = await scsi(ctrl, sync10())
    assert res.status == GOOD
    with pytest.raises(BackendConfigError):
        await disk.resize(8 * MIB)
    await disk.close()


async def test_close_waits_for_io_in_flight(tmp_path) -> None:
    """close() during a read must not close (or let the kernel reuse) the fd under it."""
    import threading

    import trio

    from devices.storvsc.backends.base import BackendIOError
    from devices.storvsc.backends.file import FileBackend

    disk = FileBackend(tmp_path / "d.img", create_size=1 << 20)
    started, release = threading.Event(), threading.Event()
    real_read = disk._read

    def slow_read(offset, views):
        started.set()
        release.wait(5)
        return real_read(offset, views)

    disk._read = slow_read  # type: ignore[method-assign]
    buf = bytearray(4096)
    order: list[str] = []

    async def reader() -> None:
        await disk.readv(0, [memoryview(buf)])
        order.append("read done")

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        await trio.to_thread.run_sync(started.wait)

        async def closer() -> None:
            await disk.close()
            order.append("closed")

        n.start_soon(closer)
        await trio.sleep(0.05)
        assert order == [] and disk._fd >= 0, "close must wait for the read in flight"
        release.set()
    assert order == ["read done", "closed"]
    with pytest.raises(BackendIOError):
        await disk.readv(0, [memoryview(buf)])
