"""The nbd backend against real servers (qemu-nbd, nbdkit) and a misbehaving fake one.

Real servers run on loopback as subprocesses (tests/nbd_servers.py); a server that
cannot start fails the test. The fake server (same file) injects what real servers
do not do on demand: bad magic, unknown handles, oversized lengths, hangs, drops.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import random
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
from disk_model import disk_ops, run_disk_model
from hypothesis import HealthCheck, given, settings
from nbd_servers import (
    FakeNbdServer,
    FakeRequest,
    NbdServer,
    chunk,
    make_qcow2,
    nbdkit_memory,
    qemu_nbd,
    short_socket_path,
    simple_reply,
)

from devices.storvsc.backends import nbd_protocol as p
from devices.storvsc.backends.base import (
    BackendConfigError,
    BackendIOError,
    DiskBackend,
    load_backend,
    open_backend,
)
from devices.storvsc.backends.nbd import NbdBackend, parse_address

MIB = 1 << 20
# Small timeouts so failure paths finish in well under a second or two.
FAST = dict(
    connect_timeout=1.0,
    request_timeout=1.0,
    give_up_after=2.0,
    reconnect_delay=0.01,
    reconnect_max_delay=0.1,
)
# For tests that must run into the give-up limit.
IMPATIENT = {**FAST, "request_timeout": 0.3, "give_up_after": 0.6}
NO_HANG = 10.0  # seconds: any test step past this is a hang


def views(buf: bytearray, pieces: int) -> list[memoryview]:
    """Split a buffer into a scatter list of `pieces` memoryviews."""
    mv = memoryview(buf)
    cuts = [len(buf) * i // pieces for i in range(pieces + 1)]
    return [mv[a:b] for a, b in itertools.pairwise(cuts)]


@contextlib.asynccontextmanager
async def running(server: FakeNbdServer) -> AsyncIterator[FakeNbdServer]:
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        yield server
        nursery.cancel_scope.cancel()


@pytest.fixture
def sock_dir(tmp_path: Path) -> Path:
    return short_socket_path(tmp_path, "s").parent


@pytest.fixture
def nbdkit(sock_dir: Path) -> Iterator[NbdServer]:
    with nbdkit_memory(sock_dir / "nbdkit.sock") as server:
        yield server


@pytest.fixture
def qemu_image(tmp_path: Path) -> Path:
    return make_qcow2(tmp_path / "disk.qcow2")


@pytest.fixture
def qemu_unix(qemu_image: Path, sock_dir: Path) -> Iterator[NbdServer]:
    with qemu_nbd(qemu_image, unix_path=sock_dir / "qemu.sock") as server:
        yield server


# --- addresses and options ---------------------------------------------------------------


def test_address_forms() -> None:
    assert parse_address("unix:/run/x.sock").unix_path == "/run/x.sock"
    a = parse_address("tcp:127.0.0.1:10810")
    assert (a.host, a.port, a.export) == ("127.0.0.1", 10810, None)
    assert parse_address("tcp:[::1]:5").host == "::1"
    a = parse_address("nbd://example.org/disk%201")
    assert (a.host, a.port, a.export) == ("example.org", 10809, "disk 1")
    a = parse_address("nbd+unix:///d0?socket=/tmp/s")
    assert (a.unix_path, a.export) == ("/tmp/s", "d0")
    for bad in ["", "unix:", "tcp:host", "tcp:h:99999", "nbd+unix:///x", "http://x", "nbd://h:x/"]:
        with pytest.raises(BackendConfigError):
            parse_address(bad)


def test_option_validation() -> None:
    with pytest.raises(BackendConfigError):
        NbdBackend("unix:/x", request_timeout=0)
    with pytest.raises(BackendConfigError):
        NbdBackend("unix:/x", max_in_flight=0)
    with pytest.raises(BackendConfigError):
        NbdBackend("unix:/x", block_size=1024)
    b = load_backend("nbd", {"address": "nbd://h/e1", "max_in_flight": 4})
    assert isinstance(b, NbdBackend) and b.export == "e1"
    assert NbdBackend("nbd://h/e1", export="e2").export == "e2"


async def test_not_open_and_closed_raise() -> None:
    b = NbdBackend("unix:/nonexistent")
    with pytest.raises(BackendIOError):
        await b.readv(0, [memoryview(bytearray(512))])
    await b.close()
    with pytest.raises(BackendIOError):
        await b.open()


async def test_no_server_gives_up_in_time(sock_dir: Path) -> None:
    with trio.fail_after(NO_HANG):
        with pytest.raises(BackendIOError, match="cannot connect"):
            await NbdBackend.connect(f"unix:{sock_dir / 'nobody.sock'}", **IMPATIENT)


# --- handshake against real servers --------------------------------------------------------


async def test_nbdkit_memory_export(nbdkit: NbdServer) -> None:
    async with NbdBackend(nbdkit.address) as b:
        assert isinstance(b, DiskBackend)
        assert b.capacity == 64 * MIB and b.block_size == 512
        assert not b.read_only and b.write_back and b.can_unmap and b.can_write_zeroes
        assert b.max_transfer == 32 * MIB and not b.unmap_zeroes
        assert b.export_info is not None and b.export_info.structured_replies
        assert b.export_info.has(p.NBD_FLAG_SEND_FUA) and b.can_multi_conn


async def test_qemu_nbd_tcp_export_name_and_block_sizes(qemu_image: Path) -> None:
    with qemu_nbd(qemu_image, tcp=True, export="disk0") as server:
        async with NbdBackend(server.address, "disk0") as b:
            info = b.export_info
            assert info is not None and info.size == 64 * MIB
            assert (info.min_block, info.preferred_block, info.max_block) == (1, 4096, 32 * MIB)
            assert b.block_size == 512 and b.physical_block_exponent == 3  # 4096 / 512
            assert b.max_transfer == 32 * MIB and b.write_back and b.can_unmap
        async with NbdBackend(f"nbd://127.0.0.1:{server.port}/disk0") as b:
            assert b.capacity == 64 * MIB
        with pytest.raises(BackendConfigError, match="not present"):
            await NbdBackend.connect(server.address, "nope", **FAST)


async def test_open_backend_helper_and_structured_replies_off(qemu_unix: NbdServer) -> None:
    b = await open_backend(load_backend("nbd", {"address": qemu_unix.address}))
    b2 = await NbdBackend.connect(qemu_unix.address, structured_replies=False)
    try:
        assert b2.export_info is not None and not b2.export_info.structured_replies
        data = os.urandom(MIB)
        await b.writev(MIB, [memoryview(data)])
        out = bytearray(MIB)
        await b2.readv(MIB, views(out, 3))  # simple replies, scattered buffers
        assert out == data
    finally:
        await b.close()
        await b2.close()


async def test_block_size_constraints_split_requests(sock_dir: Path) -> None:
    server = nbdkit_memory(
        sock_dir / "bs.sock",
        "16M",
        ["blocksize-policy"],
        "blocksize-minimum=4096",
        "blocksize-preferred=65536",
        "blocksize-maximum=65536",
        "blocksize-error-policy=error",  # an unsplit large request would fail
    )
    with server:
        async with NbdBackend(server.address) as b:
            assert b.block_size == 4096 and b.max_transfer == 65536
            assert b.physical_block_exponent == 0 and b.capacity == 16 * MIB
            data = os.urandom(MIB + 8192)
            await b.writev(4096, views(bytearray(data), 7))
            out = bytearray(len(data))
            await b.readv(4096, views(out, 5))
            assert out == data
            with pytest.raises(BackendIOError, match="unaligned"):
                await b.readv(512, [memoryview(bytearray(4096))])
            with pytest.raises(BackendIOError, match="beyond"):
                await b.readv(16 * MIB, [memoryview(bytearray(4096))])


# --- data ---------------------------------------------------------------------------------


async def test_random_writes_then_checksummed_readback(qemu_unix: NbdServer) -> None:
    rng = random.Random(1)
    model = bytearray(64 * MIB)
    async with NbdBackend(qemu_unix.address) as b:
        for _ in range(150):
            n = rng.randrange(1, 512) * 512
            off = rng.randrange(0, (b.capacity - n) // 512) * 512
            data = rng.randbytes(n)
            model[off : off + n] = data
            await b.writev(off, views(bytearray(data), rng.randrange(1, 5)))
        await b.write_zeroes(5 * MIB, 3 * MIB)
        model[5 * MIB : 8 * MIB] = bytes(3 * MIB)
        await b.flush()
        step = 4 * MIB
        out = bytearray(step)
        for off in range(0, b.capacity, step):
            await b.readv(off, views(out, 4))
            got, want = hashlib.sha256(out).hexdigest(), hashlib.sha256(model[off : off + step])
            assert got == want.hexdigest(), f"chunk at {off} differs"


async def test_many_requests_in_flight(sock_dir: Path) -> None:
    """64 requests at once on one connection: a 50 ms server delay each, not 64 x 50 ms."""
    delay = 0.05
    server = nbdkit_memory(
        sock_dir / "slow.sock",
        "16M",
        ["delay"],
        f"delay-read={int(delay * 1000)}ms",
        f"delay-write={int(delay * 1000)}ms",
    )
    server.argv[1:1] = ["--threads=64"]
    rng = random.Random(2)
    blobs = [rng.randbytes(64 * 1024) for _ in range(64)]
    with server:
        async with NbdBackend(server.address, max_in_flight=64) as b:
            assert b._conn is not None
            core = b._conn.core
            peak = 0
            real_send = core.send_request

            def counting_send(*args, **kwargs):
                nonlocal peak
                header = real_send(*args, **kwargs)
                peak = max(peak, core.in_flight)
                return header

            core.send_request = counting_send  # type: ignore[method-assign]
            start = trio.current_time()
            with trio.fail_after(NO_HANG):
                async with trio.open_nursery() as nursery:
                    for i, blob in enumerate(blobs):
                        nursery.start_soon(b.writev, i * 128 * 1024, [memoryview(blob)])
                outs = [bytearray(64 * 1024) for _ in blobs]
                async with trio.open_nursery() as nursery:
                    for i, out in enumerate(outs):
                        nursery.start_soon(b.readv, i * 128 * 1024, [memoryview(out)])
            elapsed = trio.current_time() - start
            assert outs == [bytearray(x) for x in blobs]
            assert peak == 64, peak  # every request was out at once
            assert elapsed < 64 * delay, elapsed  # so the server worked on them in parallel


async def test_random_caller_cancellations_do_not_wedge_or_corrupt(nbdkit: NbdServer) -> None:
    """Callers giving up mid-request (their reply still in flight) leave the rest intact."""
    rng = random.Random(3)
    region = MIB
    cancelled = 0
    async with NbdBackend(nbdkit.address) as b:

        async def worker(w: int) -> None:
            nonlocal cancelled
            model = bytearray(region)
            for _ in range(30):
                n = rng.randrange(1, 64) * 4096
                off = rng.randrange(0, (region - n) // 4096) * 4096
                if rng.random() < 0.5:
                    data = rng.randbytes(n)
                    await b.writev(w * region + off, [memoryview(data)])
                    model[off : off + n] = data
                    continue
                out = bytearray(n)
                with trio.move_on_after(rng.choice([0.0002, 0.001, NO_HANG])) as scope:
                    await b.readv(w * region + off, [memoryview(out)])
                if scope.cancelled_caught:
                    cancelled += 1
                else:
                    assert out == model[off : off + n]

        with trio.fail_after(NO_HANG * 2):
            async with trio.open_nursery() as nursery:
                for w in range(16):
                    nursery.start_soon(worker, w)
        assert cancelled > 0 and b.reconnects == 0


async def test_in_flight_is_bounded() -> None:
    server = FakeNbdServer()
    async with running(server), NbdBackend(server.address, max_in_flight=4) as b:
        assert b._conn is not None
        core = b._conn.core
        peak = 0
        real_send = core.send_request

        def counting_send(*args, **kwargs):
            nonlocal peak
            header = real_send(*args, **kwargs)
            peak = max(peak, core.in_flight)
            return header

        core.send_request = counting_send  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            for i in range(32):
                nursery.start_soon(b.readv, i * 4096, [memoryview(bytearray(4096))])
        assert 1 <= peak <= 4


async def test_fua_and_flush_accepted(qemu_unix: NbdServer) -> None:
    async with NbdBackend(qemu_unix.address) as b:
        await b.writev(0, [memoryview(b"f" * 4096)], fua=True)
        await b.flush()
        await b.unmap([(MIB, MIB), (4 * MIB, 512)])
        out = bytearray(4096)
        await b.readv(0, [memoryview(out)])
        assert out == b"f" * 4096


async def test_fua_flush_trim_zeroes_on_the_wire() -> None:
    server = FakeNbdServer()
    async with running(server), NbdBackend(server.address) as b:
        await b.writev(512, [memoryview(b"x" * 512)], fua=True)
        await b.flush()
        await b.unmap([(0, 1024)])
        await b.write_zeroes(4096, 8192)
    wire = [(r.command, r.flags, r.offset, r.length) for r in server.requests]
    assert wire == [
        (p.NBD_CMD_WRITE, p.NBD_CMD_FLAG_FUA, 512, 512),
        (p.NBD_CMD_FLUSH, 0, 0, 0),
        (p.NBD_CMD_TRIM, 0, 0, 1024),
        (p.NBD_CMD_WRITE_ZEROES, 0, 4096, 8192),
        (p.NBD_CMD_DISC, 0, 0, 0),  # close() disconnects politely
    ]


async def test_read_only_export(qemu_image: Path, sock_dir: Path) -> None:
    with qemu_nbd(qemu_image, unix_path=sock_dir / "ro.sock", read_only=True) as server:
        async with NbdBackend(server.address) as b:
            assert b.read_only and not b.can_unmap and not b.can_write_zeroes
            out = bytearray(4096)
            await b.readv(0, [memoryview(out)])
            for call in (
                b.writev(0, [memoryview(bytes(512))]),
                b.write_zeroes(0, 512),
                b.unmap([(0, 512)]),
            ):
                with pytest.raises(BackendIOError, match="read-only"):
                    await call
            await b.flush()


async def test_server_error_fails_the_request_not_the_connection() -> None:
    async def eio_on_big_offsets(req: FakeRequest, stream: trio.SocketStream) -> bool:
        if req.offset >= 8192 and req.command == p.NBD_CMD_READ:
            msg = b"bad sector"
            payload = struct.pack(">IH", p.NBD_EIO, len(msg)) + msg + struct.pack(">Q", 9216)
            await stream.send_all(
                chunk(req.handle, p.NBD_REPLY_TYPE_ERROR_OFFSET, payload, done=False)
                + chunk(req.handle, p.NBD_REPLY_TYPE_NONE, b"")
            )
            return True
        if req.command == p.NBD_CMD_WRITE and req.offset == 0:
            await stream.send_all(simple_reply(req.handle, p.NBD_ENOSPC))
            return True
        return False

    server = FakeNbdServer(misbehave=eio_on_big_offsets)
    async with running(server), NbdBackend(server.address, **FAST) as b:
        with pytest.raises(BackendIOError, match=r"EIO.*bad sector") as info:
            await b.readv(8192, [memoryview(bytearray(4096))])
        assert info.value.offset == 9216
        with pytest.raises(BackendIOError, match="ENOSPC") as info:
            await b.writev(0, [memoryview(bytes(512))])
        assert info.value.offset == 0
        await b.readv(0, [memoryview(bytearray(4096))])
    assert server.connections == 1


async def test_simple_replies_only_server() -> None:
    server = FakeNbdServer(structured=False, block_sizes=(512, 4096, 65536))
    data = os.urandom(256 * 1024)
    async with running(server), NbdBackend(server.address) as b:
        assert b.max_transfer == 65536
        await b.writev(0, views(bytearray(data), 3))
        out = bytearray(len(data))
        await b.readv(0, views(out, 9))
        assert out == data
        await b.write_zeroes(0, 512)
        await b.readv(0, [memoryview(out)[:512]])
        assert out[:512] == bytes(512)


async def test_cancelled_read_never_touches_its_buffer_later() -> None:
    slow = trio.Event()

    async def delay_first_read(req: FakeRequest, stream: trio.SocketStream) -> bool:
        if req.command == p.NBD_CMD_READ and req.offset == 0:
            await slow.wait()  # answered only after the caller gave up
            await stream.send_all(chunk(req.handle, 1, struct.pack(">Q", 0) + b"L" * req.length))
            return True
        return False

    server = FakeNbdServer(misbehave=delay_first_read)
    server.disk[:] = b"D" * len(server.disk)
    async with running(server), NbdBackend(server.address, **FAST) as b:
        abandoned = bytearray(4096)
        with trio.move_on_after(0.05) as scope:
            await b.readv(0, [memoryview(abandoned)])
        assert scope.cancelled_caught
        slow.set()
        out = bytearray(4096)
        await b.readv(8192, [memoryview(out)])  # drains the late reply first
        assert out == b"D" * 4096 and abandoned == bytes(4096)
    assert server.connections == 1


async def test_close_waits_for_in_flight_requests_then_disconnects() -> None:
    async def slow_reads(req: FakeRequest, stream: trio.SocketStream) -> bool:
        if req.command == p.NBD_CMD_READ:
            await trio.sleep(0.1)
        return False

    server = FakeNbdServer(misbehave=slow_reads)
    server.disk[:512] = b"q" * 512
    out = bytearray(512)
    async with running(server):
        b = await NbdBackend.connect(server.address, **FAST)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(b.readv, 0, [memoryview(out)])
            await trio.sleep(0.02)
            await b.close()
        with pytest.raises(BackendIOError, match="closed"):
            await b.readv(0, [memoryview(out)])
    assert out == b"q" * 512
    assert [r.command for r in server.requests] == [p.NBD_CMD_READ, p.NBD_CMD_DISC]


# --- broken servers ------------------------------------------------------------------------


def _bad_magic(req: FakeRequest) -> bytes:
    return struct.pack(">IIQ", 0xDEADBEEF, 0, req.handle)


def _unknown_handle(req: FakeRequest) -> bytes:
    return simple_reply(req.handle ^ 0xFFFF)


def _oversized(req: FakeRequest) -> bytes:
    return chunk(req.handle, 1, struct.pack(">Q", req.offset), length=0xFFFFFFFF)


def _overrun(req: FakeRequest) -> bytes:
    return chunk(req.handle, 1, struct.pack(">Q", req.offset) + bytes(req.length + 512))


@pytest.mark.parametrize("reply", [_bad_magic, _unknown_handle, _oversized, _overrun])
async def test_broken_reply_once_then_reconnect_and_replay(reply) -> None:
    async def first_connection_broken(req: FakeRequest, stream: trio.SocketStream) -> bool:
        if req.conn_no == 0 and req.command == p.NBD_CMD_READ:
            await stream.send_all(reply(req))
            return True
        return False

    server = FakeNbdServer(misbehave=first_connection_broken)
    server.disk[:4096] = b"R" * 4096
    async with running(server), NbdBackend(server.address, **FAST) as b:
        out = bytearray(4096)
        with trio.fail_after(NO_HANG):
            await b.readv(0, [memoryview(out)])
        assert out == b"R" * 4096 and b.reconnects == 1 and b.replays == 1


@pytest.mark.parametrize("reply", [_bad_magic, _unknown_handle, _oversized])
async def test_always_broken_server_gives_up(reply) -> None:
    async def broken(req: FakeRequest, stream: trio.SocketStream) -> bool:
        await stream.send_all(reply(req))
        return True

    server = FakeNbdServer(misbehave=broken)
    async with running(server), NbdBackend(server.address, **IMPATIENT) as b:
        with trio.fail_after(NO_HANG), pytest.raises(BackendIOError, match="giving up"):
            await b.readv(0, [memoryview(bytearray(4096))])
        assert 2 < server.connections < 30  # it kept trying, with backoff


async def test_hung_server_times_out() -> None:
    async def hang(req: FakeRequest, stream: trio.SocketStream) -> bool:
        await trio.sleep_forever()
        return True  # pragma: no cover

    server = FakeNbdServer(misbehave=hang)
    async with running(server), NbdBackend(server.address, **IMPATIENT) as b:
        start = trio.current_time()
        with trio.fail_after(NO_HANG), pytest.raises(BackendIOError):
            await b.readv(0, [memoryview(bytearray(4096))])
        limit = IMPATIENT["request_timeout"] + IMPATIENT["give_up_after"] + 0.5
        assert trio.current_time() - start < limit


async def test_dropped_connection_replay_policy() -> None:
    """Reads, writes, trims, zeroes are replayed; a flush in flight is failed back."""
    dropped: set[int] = set()

    async def drop_each_command_once(req: FakeRequest, stream: trio.SocketStream) -> bool:
        if req.command not in dropped:
            dropped.add(req.command)
            await stream.aclose()
            return True
        return False

    server = FakeNbdServer(misbehave=drop_each_command_once)
    async with running(server), NbdBackend(server.address, **FAST) as b:
        with pytest.raises(BackendIOError, match="flush interrupted"):
            await b.flush()
        await b.flush()
        await b.writev(0, [memoryview(b"w" * 4096)])
        out = bytearray(4096)
        await b.readv(0, [memoryview(out)])
        assert out == b"w" * 4096
        await b.unmap([(0, 512)])
        await b.write_zeroes(1024, 512)
        assert b.replays == 4
        # the write was acknowledged on a connection that then dropped, unflushed:
        with pytest.raises(BackendIOError, match="may have lost"):
            await b.flush()
        await b.flush()  # the loss is reported once
        await b.readv(0, [memoryview(out)])
        assert out == bytes(512) + b"w" * 512 + bytes(512) + b"w" * 2560


async def test_lost_cache_fails_the_next_flush_once() -> None:
    server = FakeNbdServer()
    async with running(server), NbdBackend(server.address, **FAST) as b:
        await b.writev(0, [memoryview(b"a" * 512)])  # acknowledged, not yet flushed
        assert b._conn is not None
        b._kill(b._conn, "test: the server went away")
        await b.readv(0, [memoryview(bytearray(512))])  # reconnects
        with pytest.raises(BackendIOError, match="may have lost"):
            await b.flush()
        await b.flush()
        await b.writev(0, [memoryview(b"a" * 512)], fua=True)  # FUA writes are not at risk
        await b.flush()
        b._kill(b._conn, "test: again, nothing unflushed")
        await b.flush()


async def test_shutdown_error_is_a_reconnect() -> None:
    async def shutting_down_once(req: FakeRequest, stream: trio.SocketStream) -> bool:
        if req.conn_no == 0:
            await stream.send_all(simple_reply(req.handle, p.NBD_ESHUTDOWN))
            return True
        return False

    server = FakeNbdServer(misbehave=shutting_down_once)
    async with running(server), NbdBackend(server.address, **FAST) as b:
        await b.writev(0, [memoryview(b"s" * 512)])
        assert b.reconnects == 1 and server.disk[:512] == b"s" * 512


# --- a server killed and restarted mid-workload ----------------------------------------------


async def test_qemu_nbd_killed_and_restarted_mid_workload(tmp_path: Path, sock_dir: Path) -> None:
    image = make_qcow2(tmp_path / "restart.qcow2", 16 * MIB)
    server = qemu_nbd(image, unix_path=sock_dir / "restart.sock")  # writethrough: no acked loss
    region = 2 * MIB
    workers = 8
    model = bytearray(workers * region)
    done_ops = 0
    kills = 0
    with server:
        b = await NbdBackend.connect(
            server.address,
            request_timeout=2.0,
            give_up_after=20.0,
            reconnect_delay=0.02,
            reconnect_max_delay=0.2,
        )

        async def worker(w: int) -> None:
            nonlocal done_ops
            rng = random.Random(w)
            base = w * region
            for _ in range(60):
                n = rng.randrange(1, 128) * 512
                off = base + rng.randrange(0, (region - n) // 512) * 512
                data = rng.randbytes(n)
                await b.writev(off, views(bytearray(data), rng.randrange(1, 4)))
                model[off : off + n] = data
                n = rng.randrange(1, 128) * 512
                off = base + rng.randrange(0, (region - n) // 512) * 512
                out = bytearray(n)
                await b.readv(off, [memoryview(out)])
                assert out == model[off : off + n]
                done_ops += 1

        async def killer() -> None:
            nonlocal kills
            for threshold in (60, 240):
                while done_ops < threshold:
                    await trio.sleep(0.005)
                server.kill()
                kills += 1
                await trio.sleep(0.2)  # requests fail and back off meanwhile
                await server.start_async()

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(killer)
                for w in range(workers):
                    nursery.start_soon(worker, w)
            assert kills == 2 and b.reconnects >= 2
            with pytest.raises(BackendIOError, match="may have lost"):
                await b.flush()  # acknowledged cached writes died with the server
            await b.flush()
            out = bytearray(len(model))
            await b.readv(0, views(out, 16))
            assert hashlib.sha256(out).digest() == hashlib.sha256(model).digest()
        await b.close()


# --- random sequences against a model of the disk ---------------------------------------------


@pytest.fixture(scope="module")
def small_nbdkit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NbdServer]:
    path = short_socket_path(tmp_path_factory.mktemp("nbdkit"), "m.sock")
    with nbdkit_memory(path, "1M") as server:
        yield server


@pytest.fixture(scope="module")
def small_qemu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NbdServer]:
    d = tmp_path_factory.mktemp("qemu")
    image = make_qcow2(d / "m.qcow2", MIB)
    with qemu_nbd(image, unix_path=short_socket_path(d, "m.sock")) as server:
        yield server


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=disk_ops(blocks=2048, max_blocks=64))
async def test_model_nbdkit(small_nbdkit: NbdServer, ops) -> None:
    async with NbdBackend(small_nbdkit.address, max_in_flight=8) as b:
        with trio.fail_after(NO_HANG):
            await run_disk_model(b, ops)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=disk_ops(blocks=2048, max_blocks=64))
async def test_model_qemu_nbd(small_qemu: NbdServer, ops) -> None:
    async with NbdBackend(small_qemu.address) as b:
        with trio.fail_after(NO_HANG):
            await run_disk_model(b, ops)
