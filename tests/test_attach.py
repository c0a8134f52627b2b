"""The attach protocol: codec round trips, fd passing, rejection without fd leaks,
socket file mode, SO_PEERCRED filtering and the hello handshake."""

from __future__ import annotations

import array
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator

import msgpack
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmbus import attach
from vmbus.attach import (
    MAX_DATAGRAM,
    MAX_FDS_PER_MESSAGE,
    AttachConnection,
    AttachProtocolError,
    Bind,
    ConnectionClosed,
    Error,
    Hello,
    MemoryRegion,
    MemoryRegions,
    PeerError,
    PostFromGuest,
    PostToGuest,
    Reset,
    Unbind,
    decode_message,
    encode_message,
)

VMM_HELLO = Hello(1, "vmm", "vm-7", 4, ("demo",), "testvmm 0.1")
VMBUSD_HELLO = Hello(1, "vmbusd", "", 0, (), "vmbusd test")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
async def pair() -> AsyncIterator[tuple[AttachConnection, AttachConnection]]:
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ca, cb = AttachConnection(a), AttachConnection(b)
    yield ca, cb
    await ca.aclose()
    await cb.aclose()


def fdless_messages() -> list[attach.Message]:
    return [
        VMM_HELLO,
        VMBUSD_HELLO,
        PostFromGuest(1, 0, b"\x01\x00\x00\x00" + bytes(236)),
        PostFromGuest(4, 3, b""),
        PostToGuest(vcpu=2, payload=b"\xaa" * 240, sint=2, epoch=5),
        Unbind(17, epoch=1),
        Reset(1),
        Error("version", "we speak 1"),
    ]


# ------------------------------------------------------------------ sans-IO codec


@pytest.mark.parametrize("msg", fdless_messages(), ids=lambda m: type(m).__name__)
def test_codec_round_trip_without_fds(msg: attach.Message) -> None:
    data, fds = encode_message(msg)
    assert fds == []
    assert len(data) <= MAX_DATAGRAM
    assert decode_message(data, []) == msg


def test_codec_maps_fds_to_indices() -> None:
    mem = os.memfd_create("ram")
    try:
        msg = MemoryRegions((MemoryRegion(0, 8192, mem, 0), MemoryRegion(1 << 32, 4096, mem, 8192)))
        data, fds = encode_message(msg)
        assert fds == [mem, mem]  # one file, attached once per region
        body = msgpack.unpackb(data)
        assert [r["fd"] for r in body["regions"]] == [0, 1]
        dup = [os.dup(mem), os.dup(mem)]
        got = decode_message(data, dup)
        assert got == MemoryRegions(
            (MemoryRegion(0, 8192, dup[0], 0), MemoryRegion(1 << 32, 4096, dup[1], 8192))
        )
        attach.close_fds(got.fds())
    finally:
        os.close(mem)


def test_local_construction_is_checked() -> None:
    with pytest.raises(ValueError):
        PostFromGuest(2, 0, b"")  # vmbusd owns only ids 1 and 4
    with pytest.raises(ValueError):
        PostToGuest(vcpu=0, payload=bytes(241))
    with pytest.raises(TypeError):
        Reset(True)
    with pytest.raises(ValueError):
        Bind(1, 0x2001, 0, 5, 5)
    with pytest.raises(ValueError):
        MemoryRegions((MemoryRegion(0, 8192, 3, 0), MemoryRegion(4096, 4096, 3, 0)))
    with pytest.raises(ValueError):
        MemoryRegion(0, 100, 3, 0)
    with pytest.raises(ValueError):
        Hello(1, "vmm", "", 1)  # a VMM must name its VM
    with pytest.raises(ValueError):
        Error("bad code!", "")
    assert Error.make("internal", "two\nlines").message == "two lines"


def test_decode_closes_fds_on_error() -> None:
    fds = [os.eventfd(0), os.eventfd(0)]
    data = msgpack.packb({"t": "unbind", "relid": 1, "epoch": 0})
    with pytest.raises(AttachProtocolError, match="not used"):
        decode_message(data, fds)
    assert not any(is_open(fd) for fd in fds)


def test_decode_checks_direction() -> None:
    data, _ = encode_message(Reset(1))
    assert decode_message(data, [], sender="vmm") == Reset(1)
    with pytest.raises(AttachProtocolError, match="may not be sent by vmbusd"):
        decode_message(data, [], sender="vmbusd")


def test_extra_keys_are_ignored() -> None:
    data = msgpack.packb({"t": "reset", "epoch": 3, "x-future": [1, 2]})
    assert decode_message(data, []) == Reset(3)


# ------------------------------------------------------------------ over a socket


async def test_round_trip_over_socket(pair: tuple[AttachConnection, AttachConnection]) -> None:
    a, b = pair
    for msg in fdless_messages():
        await a.send(msg)
        assert await b.receive() == msg


async def test_memory_fds_reach_the_same_file(
    pair: tuple[AttachConnection, AttachConnection],
) -> None:
    vmm, vmbusd = pair
    lo, hi = os.memfd_create("lo"), os.memfd_create("hi")
    os.ftruncate(lo, 8192)
    os.ftruncate(hi, 4096)
    try:
        await vmm.send(
            MemoryRegions((MemoryRegion(0, 8192, lo, 0), MemoryRegion(1 << 32, 4096, hi, 0)))
        )
        got = await vmbusd.receive()
        assert isinstance(got, MemoryRegions)
        r0, r1 = got.regions
        assert (r0.gpa, r0.size, r0.offset, r1.gpa) == (0, 8192, 0, 1 << 32)
        assert r0.fd not in (lo, hi) and r1.fd not in (lo, hi)
        os.pwrite(lo, b"guest page", 4096)
        assert os.pread(r0.fd, 10, 4096) == b"guest page"
        os.pwrite(r1.fd, b"from vmbusd", 0)
        assert os.pread(hi, 11, 0) == b"from vmbusd"
        attach.close_fds(got.fds())
    finally:
        os.close(lo)
        os.close(hi)


async def test_bind_eventfds_are_shared(pair: tuple[AttachConnection, AttachConnection]) -> None:
    vmm, vmbusd = pair
    kick, call = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    try:
        await vmbusd.send(Bind(relid=5, connection_id=0x2005, vcpu=1, kick=kick, call=call))
        got = await vmm.receive()
        assert isinstance(got, Bind)
        assert (got.relid, got.connection_id, got.vcpu, got.epoch) == (5, 0x2005, 1, 0)
        os.eventfd_write(got.kick, 3)  # the guest's HvSignalEvent, via the VMM
        assert os.eventfd_read(kick) == 3
        os.eventfd_write(call, 1)  # vmbusd interrupts the guest
        assert os.eventfd_read(got.call) == 1
        attach.close_fds(got.fds())
    finally:
        os.close(kick)
        os.close(call)


async def test_peer_eof(pair: tuple[AttachConnection, AttachConnection]) -> None:
    a, b = pair
    await a.aclose()
    with pytest.raises(ConnectionClosed):
        await b.receive()
    with pytest.raises(ConnectionClosed):
        await b.send(Reset(1))


# ------------------------------------------------------------------ malformed datagrams


async def raw_send(sock: trio.socket.SocketType, data: bytes, fds: list[int]) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    await sock.sendmsg([data], anc)


def pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


BAD: dict[str, tuple[bytes, int]] = {
    "not msgpack": (b"\xc1", 0),
    "truncated msgpack": (pack({"t": "reset", "epoch": 1})[:-1], 0),
    "trailing bytes": (pack({"t": "reset", "epoch": 1}) + b"\x00", 0),
    "not a map": (pack([1, 2, 3]), 1),
    "no t": (pack({"epoch": 1}), 0),
    "t not a string": (pack({"t": 7}), 0),
    "unknown t": (pack({"t": "frobnicate"}), 1),
    "missing field": (pack({"t": "unbind", "relid": 3}), 0),
    "wrong type": (pack({"t": "reset", "epoch": "1"}), 0),
    "bool as int": (pack({"t": "reset", "epoch": True}), 0),
    "float as int": (pack({"t": "reset", "epoch": 1.0}), 0),
    "negative": (pack({"t": "unbind", "relid": -1, "epoch": 0}), 0),
    "relid too big": (pack({"t": "unbind", "relid": 2048, "epoch": 0}), 0),
    "epoch too big": (pack({"t": "reset", "epoch": 1 << 32}), 0),
    "post to unowned id": (pack({"t": "post", "connection_id": 2, "vcpu": 0, "payload": b""}), 0),
    "payload too long": (
        pack({"t": "post", "connection_id": 1, "vcpu": 0, "payload": bytes(241)}),
        0,
    ),
    "payload as str": (pack({"t": "post", "connection_id": 1, "vcpu": 0, "payload": "x"}), 0),
    "post both ways": (
        pack({"t": "post", "connection_id": 1, "sint": 2, "vcpu": 0, "payload": b"", "epoch": 0}),
        0,
    ),
    "vcpu out of range": (
        pack({"t": "post", "connection_id": 1, "vcpu": 4096, "payload": b""}),
        0,
    ),
    "unused fd": (pack({"t": "reset", "epoch": 1}), 2),
    "fd index out of range": (
        pack({"t": "bind", "relid": 1, "connection_id": 17, "vcpu": 0, "kick": 0, "call": 2}),
        2,
    ),
    "fd index twice": (
        pack(
            {
                "t": "bind",
                "relid": 1,
                "connection_id": 17,
                "vcpu": 0,
                "kick": 0,
                "call": 0,
                "epoch": 0,
            }
        ),
        2,
    ),
    "fd index not int": (
        pack({"t": "memory", "regions": [{"gpa": 0, "size": 4096, "fd": "0", "offset": 0}]}),
        1,
    ),
    "unaligned region": (
        pack({"t": "memory", "regions": [{"gpa": 0, "size": 4095, "fd": 0, "offset": 0}]}),
        1,
    ),
    "unaligned gpa": (
        pack({"t": "memory", "regions": [{"gpa": 100, "size": 4096, "fd": 0, "offset": 0}]}),
        1,
    ),
    "overlapping regions": (
        pack(
            {
                "t": "memory",
                "regions": [
                    {"gpa": 0, "size": 8192, "fd": 0, "offset": 0},
                    {"gpa": 4096, "size": 4096, "fd": 1, "offset": 0},
                ],
            }
        ),
        2,
    ),
    "no regions": (pack({"t": "memory", "regions": []}), 0),
    "region not a map": (pack({"t": "memory", "regions": [0]}), 1),
    "hello features not list": (
        pack(
            {
                "t": "hello",
                "version": 1,
                "role": "vmm",
                "vm_id": "x",
                "vcpus": 1,
                "features": "a",
                "software": "",
            }
        ),
        0,
    ),
    "hello control chars": (
        pack(
            {
                "t": "hello",
                "version": 1,
                "role": "vmm",
                "vm_id": "x\n",
                "vcpus": 1,
                "features": [],
                "software": "",
            }
        ),
        0,
    ),
    "hello bad role": (
        pack(
            {
                "t": "hello",
                "version": 1,
                "role": "guest",
                "vm_id": "x",
                "vcpus": 1,
                "features": [],
                "software": "",
            }
        ),
        0,
    ),
    "error code too long": (pack({"t": "error", "code": "x" * 33, "message": ""}), 0),
    "oversized datagram": (pack({"t": "reset", "epoch": 1, "pad": bytes(MAX_DATAGRAM)}), 1),
    "too many fds": (pack({"t": "reset", "epoch": 1}), MAX_FDS_PER_MESSAGE + 1),
    "fds on an empty datagram": (b"", 1),
}


@pytest.mark.parametrize("case", list(BAD))
async def test_malformed_datagram_is_rejected_and_fds_closed(
    case: str, pair: tuple[AttachConnection, AttachConnection], caplog: pytest.LogCaptureFixture
) -> None:
    sender, receiver = pair
    data, nfds = BAD[case]
    mine = [os.eventfd(0) for _ in range(nfds)]
    try:
        before = open_fds()
        await raw_send(sender.socket, data, mine)
        with caplog.at_level(logging.WARNING, logger="vmbus.attach"):
            with pytest.raises(AttachProtocolError):
                await receiver.receive()
        assert open_fds() == before, "a rejected message leaked fds"
        assert len([r for r in caplog.records if "rejected" in r.getMessage()]) == 1
        # The connection is still usable; the session decides whether to close it.
        await sender.send(Reset(2))
        assert await receiver.receive() == Reset(2)
    finally:
        attach.close_fds(mine)


async def test_direction_enforced_after_handshake(
    pair: tuple[AttachConnection, AttachConnection],
) -> None:
    vmm, vmbusd = pair
    async with trio.open_nursery() as n:
        n.start_soon(attach.handshake, vmm, VMM_HELLO)
        assert await attach.handshake(vmbusd, VMBUSD_HELLO) == VMM_HELLO
    assert vmbusd.peer_role == "vmm" and vmm.peer_role == "vmbusd"
    kick, call = os.eventfd(0), os.eventfd(0)
    before = open_fds()
    await vmm.send(Bind(1, 17, 0, kick, call))  # a VMM may not bind
    with pytest.raises(AttachProtocolError, match="may not be sent by vmm"):
        await vmbusd.receive()
    assert open_fds() == before
    attach.close_fds([kick, call])


# ------------------------------------------------------------------ hello handshake


async def test_handshake_version_mismatch(pair: tuple[AttachConnection, AttachConnection]) -> None:
    """A version-2 peer gets ``error`` ``version`` and a close; its own check fails too."""
    vmm, vmbusd = pair
    future = Hello(2, "vmm", "vm-7", 4)
    async with trio.open_nursery() as n:

        async def vmm_side() -> None:
            with pytest.raises(AttachProtocolError, match="version 1") as e:
                await attach.handshake(vmm, future)
            assert e.value.code == "version"

        n.start_soon(vmm_side)
        with pytest.raises(AttachProtocolError, match="version 2") as e:
            await attach.handshake(vmbusd, VMBUSD_HELLO)
        assert e.value.code == "version"


async def test_handshake_peer_error_raises_peer_error(
    pair: tuple[AttachConnection, AttachConnection],
) -> None:
    vmm, vmbusd = pair
    await vmm.send(Error("version", "we speak 2"))
    with pytest.raises(PeerError) as e:
        await attach.handshake(vmbusd, VMBUSD_HELLO)
    assert (e.value.code, e.value.message) == ("version", "we speak 2")


async def test_handshake_role_and_vm_id_mismatch() -> None:
    for theirs, code in [
        (Hello(3, "vmm", "vm-7", 1), "version"),
        (Hello(1, "vmbusd", "", 0), "role"),
        (Hello(1, "vmm", "vm-8", 1), "vm-id"),
    ]:
        a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours, peer = AttachConnection(a), AttachConnection(b)
        await peer.send(theirs)
        with pytest.raises(AttachProtocolError) as e:
            await attach.handshake(ours, Hello(1, "vmbusd", "vm-7", 0))
        assert e.value.code == code
        assert isinstance(await peer.receive(), Hello)
        got = await peer.receive()
        assert isinstance(got, Error) and got.code == code
        with pytest.raises(ConnectionClosed):
            await peer.receive()
        await peer.aclose()


async def test_handshake_rejects_a_non_hello(
    pair: tuple[AttachConnection, AttachConnection],
) -> None:
    vmm, vmbusd = pair
    await vmm.send(Reset(1))
    with pytest.raises(AttachProtocolError, match="expected hello"):
        await attach.handshake(vmbusd, VMBUSD_HELLO)
    assert isinstance(await vmm.receive(), Hello)
    assert (await vmm.receive()).code == "protocol"


# ------------------------------------------------------------------ listen / connect


@pytest.mark.parametrize("listener_role", ["vmbusd", "vmm"])
async def test_listen_and_connect_either_way(tmp_path: object, listener_role: str) -> None:
    path = os.path.join(str(tmp_path), "attach.sock")
    hellos = {"vmm": VMM_HELLO, "vmbusd": VMBUSD_HELLO}
    other = "vmm" if listener_role == "vmbusd" else "vmbusd"
    async with await attach.listen(path) as listener:
        got: dict[str, Hello] = {}

        async def server() -> None:
            async with await listener.accept() as conn:
                got[listener_role] = await attach.handshake(conn, hellos[listener_role])
                await conn.send(Error("shutdown", "bye"))

        async with trio.open_nursery() as n:
            n.start_soon(server)
            async with await attach.connect(path) as conn:
                pid, uid, _ = conn.peer_credentials()
                assert (pid, uid) == (os.getpid(), os.getuid())
                got[other] = await attach.handshake(conn, hellos[other])
                assert await conn.receive() == Error("shutdown", "bye")
                with pytest.raises(ConnectionClosed):
                    await conn.receive()
        assert got == {listener_role: hellos[other], other: hellos[listener_role]}
    assert not os.path.exists(path), "the listener removes its socket file"


async def test_socket_file_is_0600_even_with_umask_0(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "attach.sock")
    old = os.umask(0)
    try:
        listener = await attach.listen(path)
    finally:
        os.umask(old)
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    await listener.aclose()


async def test_stale_socket_is_replaced_live_one_and_files_are_not(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "attach.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(path)
    stale.close()  # the file stays behind, nobody listening
    listener = await attach.listen(path)
    with pytest.raises(OSError, match="in use"):
        await attach.listen(path)
    await listener.aclose()
    with open(path, "w") as f:
        f.write("not a socket")
    with pytest.raises(FileExistsError):
        await attach.listen(path)


async def test_peer_uid_not_allowed(tmp_path: object, caplog: pytest.LogCaptureFixture) -> None:
    path = os.path.join(str(tmp_path), "attach.sock")
    async with await attach.listen(path, allowed_uids={os.getuid() + 1}) as listener:
        with caplog.at_level(logging.WARNING, logger="vmbus.attach"):
            async with trio.open_nursery() as n:
                n.start_soon(listener.accept)  # never returns a connection for us
                conn = await attach.connect(path)
                got = await conn.receive()
                assert isinstance(got, Error) and got.code == "denied"
                assert f"uid {os.getuid()}" in got.message
                with pytest.raises(ConnectionClosed):
                    await conn.receive()
                await conn.aclose()
                n.cancel_scope.cancel()
    denied = [r for r in caplog.records if "denied" in r.getMessage()]
    assert len(denied) == 1


async def test_default_allow_list_is_our_uid(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "attach.sock")
    async with await attach.listen(path) as listener:
        assert listener.allowed_uids == {os.getuid()}


# ------------------------------------------------------------------ fuzzing


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_decode_any_bytes(data: bytes) -> None:
    try:
        msg = decode_message(data, [])
    except AttachProtocolError:
        return
    assert isinstance(msg, attach.Message)


_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=300)
)
_KEYS = st.sampled_from(
    [
        "version",
        "role",
        "vm_id",
        "vcpus",
        "features",
        "software",
        "regions",
        "gpa",
        "size",
        "fd",
        "offset",
        "connection_id",
        "sint",
        "vcpu",
        "payload",
        "epoch",
        "relid",
        "kick",
        "call",
        "code",
        "message",
    ]
)
_VALUES = st.recursive(
    _SCALARS | st.sampled_from([0, 1, 2, 4, 17, 4096, "vmm", "vmbusd", "x"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=5),
    max_leaves=12,
)


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(
    t=st.sampled_from(["hello", "memory", "post", "bind", "unbind", "reset", "error", "?"]),
    body=st.dictionaries(_KEYS, _VALUES, max_size=8),
    nfds=st.integers(min_value=0, max_value=3),
)
def test_decode_any_map(t: str, body: dict[str, object], nfds: int) -> None:
    """Near-valid maps reach the field checks: still parse-or-AttachProtocolError,
    and a rejected message's fds are always closed."""
    fds = [os.eventfd(0) for _ in range(nfds)]
    try:
        msg = decode_message(pack({"t": t, **body}), fds)
    except AttachProtocolError:
        assert not any(is_open(fd) for fd in fds)
        return
    assert sorted(msg.fds()) == sorted(fds)
    attach.close_fds(fds)


async def test_accept_keeps_serving_after_a_denial(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "attach.sock")
    async with await attach.listen(path, allowed_uids={os.getuid() + 1}) as listener:
        async with trio.open_nursery() as n:
            accepted: list[AttachConnection] = []

            async def accept_one() -> None:
                accepted.append(await listener.accept())

            n.start_soon(accept_one)
            denied = await attach.connect(path)
            assert (await denied.receive()).code == "denied"
            await denied.aclose()
            listener.allowed_uids = frozenset({os.getuid()})
            allowed = await attach.connect(path)
        assert len(accepted) == 1
        await allowed.send(Reset(1))
        assert await accepted[0].receive() == Reset(1)
        await allowed.aclose()
        await accepted[0].aclose()


async def test_two_receivers_is_an_error(pair: tuple[AttachConnection, AttachConnection]) -> None:
    a, b = pair
    async with trio.open_nursery() as n:
        n.start_soon(b.receive)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await b.receive()
        await a.send(Reset(1))


# ------------------------------------------------------------------ a hostile peer


async def test_handshake_has_a_deadline(
    pair: tuple[AttachConnection, AttachConnection], autojump_clock: trio.abc.Clock
) -> None:
    """A peer that never says hello gets ``error timeout`` (and we are not stuck)."""
    vmm, vmbusd = pair
    with pytest.raises(AttachProtocolError, match="no hello within 3 s") as e:
        await attach.handshake(vmbusd, VMBUSD_HELLO, timeout=3)
    assert e.value.code == "timeout"
    assert isinstance(await vmm.receive(), Hello)
    assert (await vmm.receive()).code == "timeout"
    with pytest.raises(ConnectionClosed):
        await vmm.receive()


async def test_handshake_deadline_defaults_to_the_named_constant(
    pair: tuple[AttachConnection, AttachConnection], autojump_clock: trio.abc.Clock
) -> None:
    _vmm, vmbusd = pair
    start = trio.current_time()
    with pytest.raises(AttachProtocolError):
        await attach.handshake(vmbusd, VMBUSD_HELLO)
    assert trio.current_time() - start == pytest.approx(attach.HANDSHAKE_TIMEOUT_S, abs=1.5)


async def test_admission_can_refuse_a_good_peer(
    pair: tuple[AttachConnection, AttachConnection],
) -> None:
    vmm, vmbusd = pair
    seen: list[Hello] = []
    vmbusd.admit = lambda hello: seen.append(hello) or "service full"
    await vmm.send(VMM_HELLO)
    with pytest.raises(AttachProtocolError, match="service full") as e:
        await attach.handshake(vmbusd, VMBUSD_HELLO)
    assert e.value.code == "resource" and seen == [VMM_HELLO]
    assert isinstance(await vmm.receive(), Hello)
    got = await vmm.receive()
    assert isinstance(got, Error) and (got.code, got.message) == ("resource", "service full")


async def _handshaken(
    pair: tuple[AttachConnection, AttachConnection],
) -> tuple[AttachConnection, AttachConnection]:
    vmm, vmbusd = pair
    async with trio.open_nursery() as n:
        n.start_soon(attach.handshake, vmm, VMM_HELLO)
        await attach.handshake(vmbusd, VMBUSD_HELLO)
    assert vmm.vcpus == vmbusd.vcpus == VMM_HELLO.vcpus
    return vmm, vmbusd


async def test_a_vcpu_the_vm_lacks_is_refused_both_ways(
    pair: tuple[AttachConnection, AttachConnection],
) -> None:
    """vCPU indices in later messages are below the VMM's hello.vcpus (4 here)."""
    vmm, vmbusd = await _handshaken(pair)
    await vmm.send(PostFromGuest(1, 3, b""))
    assert (await vmbusd.receive()).vcpu == 3
    await vmm.send(PostFromGuest(1, 4, b""))
    with pytest.raises(AttachProtocolError, match="vcpu 4 but the VM has 4 vCPUs"):
        await vmbusd.receive()
    kick, call = os.eventfd(0), os.eventfd(0)
    try:
        before = open_fds()
        await vmbusd.send(Bind(relid=1, connection_id=0x2001, vcpu=4, kick=kick, call=call))
        with pytest.raises(AttachProtocolError, match="vcpu 4"):
            await vmm.receive()
        assert open_fds() == before, "the refused bind's fds were not closed"
    finally:
        attach.close_fds([kick, call])


async def test_an_error_is_never_answered(
    pair: tuple[AttachConnection, AttachConnection],
) -> None:
    vmm, vmbusd = pair
    await vmm.send(Error("internal", "going away"))
    assert isinstance(await vmbusd.receive(), Error)
    await vmbusd.abort("shutdown", "bye")
    with pytest.raises(ConnectionClosed):
        await vmm.receive()


async def test_farewell_is_not_lost_to_unread_data(
    pair: tuple[AttachConnection, AttachConnection],
) -> None:
    """Closing with the peer's messages unread would make its next recv fail with
    ECONNRESET before it reads our ``error``: abort drops them (and their fds) first."""
    vmm, vmbusd = pair
    kick = os.eventfd(0)
    try:
        mem = os.memfd_create("unread")
        await raw_send(vmm.socket, pack({"t": "reset", "epoch": 1}), [])
        await raw_send(vmm.socket, pack({"t": "x"}), [mem, kick])
        os.close(mem)
        before = open_fds()
        await vmbusd.abort("resource", "full")
        assert open_fds() == before - 1  # our socket; the unread fds were closed as well
        got = await vmm.receive()
        assert isinstance(got, Error) and got.code == "resource"
        with pytest.raises(ConnectionClosed):
            await vmm.receive()
    finally:
        os.close(kick)
