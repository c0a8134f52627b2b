"""The README's device example, run for real: a user's device in an afternoon."""

from __future__ import annotations

import re
import socket
import uuid
from pathlib import Path

import trio

from vmbus import attach
from vmbus.guest.vm import SimulatedVm
from vmbus.ring import OutPacket, SendBatch
from vmbus.server import VmSession

README = Path(__file__).resolve().parent.parent / "README.md"


def _readme_device() -> type:
    text = README.read_text()
    code = re.search(r"```python\n(import uuid\n.*?)```", text, re.S)
    assert code, "the README's device example is missing"
    ns: dict[str, object] = {}
    exec(compile(code.group(1), "README.md", "exec"), ns)
    return ns["Upper"]  # type: ignore[return-value]


async def test_readme_device_serves_a_guest() -> None:
    upper_cls = _readme_device()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    host = attach.AttachConnection(trio.socket.from_stdlib_socket(a))
    vmm = attach.AttachConnection(trio.socket.from_stdlib_socket(b))
    session = VmSession(host, [upper_cls()], vm_label="readme")
    vm = SimulatedVm(ram_size=16 << 20)
    try:
        async with trio.open_nursery() as n:
            n.start_soon(session.run)
            await vm.start(vmm, n)
            (offer,) = vm.find_offers(uuid.UUID("6d3f1c0a-0000-4000-8000-000000000001"))
            gch = await vm.open_channel(offer, 32 * 1024)
            words = [b"vmbus", b"hello world", b"x" * 3000]
            await gch.channel.send_batch(
                SendBatch([OutPacket(6, 0, i + 1, [w]) for i, w in enumerate(words)])
            )
            got: list[tuple[int, bytes]] = []
            while len(got) < len(words):
                batch = await gch.channel.receive()
                got += [(p.trans_id, bytes(p.payload).rstrip(b"\0")) for p in batch]
            assert got == [(i + 1, w.upper()) for i, w in enumerate(words)]
            await vm.close_channel(gch)
            await vm.unload()
            n.cancel_scope.cancel()
    finally:
        vm.close()


def _doc_device() -> type:
    text = (README.parent / "docs" / "devices.md").read_text()
    code = re.search(r"```python\n(import uuid\n.*?)```", text, re.S)
    assert code, "docs/devices.md's example is missing"
    ns: dict[str, object] = {"__name__": "devices_doc"}
    exec(compile(code.group(1), "docs/devices.md", "exec"), ns)
    return ns["KeyValue"]  # type: ignore[return-value]


async def test_devices_doc_example_serves_and_rejects_bad_requests() -> None:
    kv_cls = _doc_device()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    host = attach.AttachConnection(trio.socket.from_stdlib_socket(a))
    vmm = attach.AttachConnection(trio.socket.from_stdlib_socket(b))
    dev = kv_cls()
    session = VmSession(host, [dev], vm_label="doc")
    vm = SimulatedVm(ram_size=16 << 20)

    def msg(body: bytes) -> bytes:
        return (len(body) + 2).to_bytes(2, "little") + body

    def put(k: bytes, v: bytes) -> bytes:
        return msg(bytes([2, len(k)]) + k + len(v).to_bytes(2, "little") + v)

    def get(k: bytes) -> bytes:
        return msg(bytes([1, len(k)]) + k)

    requests = [
        put(b"color", b"blue"),
        get(b"color"),
        get(b"nope"),
        b"\x02",  # shorter than any message
        (100).to_bytes(2, "little") + put(b"k", b"v")[2:],  # length beyond the packet
        msg(bytes([2, 1]) + b"k" + (5).to_bytes(2, "little") + b"v"),  # value cut short
        msg(bytes([2, 200]) + b"x" * 10),  # key length beyond the message
        msg(bytes([9, 1]) + b"k"),  # unknown op
    ]
    want = [b"\x00", b"\x00blue", b"\x00", b"\x01", b"\x01", b"\x01", b"\x01", b"\x01"]
    try:
        async with trio.open_nursery() as n:
            n.start_soon(session.run)
            await vm.start(vmm, n)
            (offer,) = vm.find_offers(kv_cls.if_type)
            gch = await vm.open_channel(offer, 32 * 1024)
            await gch.channel.send_batch(
                SendBatch([OutPacket(6, 0, i + 1, [r]) for i, r in enumerate(requests)])
            )
            got: list[tuple[int, bytes]] = []
            while len(got) < len(requests):
                batch = await gch.channel.receive()
                got += [(p.trans_id, bytes(p.payload).rstrip(b"\0")) for p in batch]
            # replies are padded to 8 bytes: compare what the protocol put there
            assert [t for t, _ in got] == list(range(1, len(requests) + 1))
            for (_, body), expect in zip(got, want, strict=True):
                assert body == expect.rstrip(b"\0")
            assert dev.store == {b"color": b"blue"}
            await vm.close_channel(gch)
            await vm.unload()
            n.cancel_scope.cancel()
    finally:
        vm.close()
