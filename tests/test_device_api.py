"""The README's device example, run for real: a user's device in an afternoon."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import trio
from e2e_support import guest

from vmbus import attach
from vmbus.gpadl import GpaRange
from vmbus.guest.vm import SimulatedVm
from vmbus.packet import PacketType, gpa_direct, inband
from vmbus.ring import OutPacket, SendBatch
from vmbus.server import VmSession

README = Path(__file__).resolve().parent.parent / "README.md"


def _readme_code() -> str:
    code = re.search(r"```python\n(import uuid\n.*?)```", README.read_text(), re.S)
    assert code, "the README's device example is missing"
    return code.group(1)


async def test_readme_device_runs_as_printed_from_a_fresh_directory(tmp_path: Path) -> None:
    """Save the example as upper.py, the README's config beside it, run the installed
    `vmbusd serve` there (no PYTHONPATH), and have a guest use the device."""
    (tmp_path / "upper.py").write_text(_readme_code())
    toml = re.search(r"```toml\n(\[\[device\]\]\ntype = \"upper:Upper\"\n)```", README.read_text())
    assert toml, "the README's config for the example is missing"
    (tmp_path / "vm.toml").write_text(toml.group(1))
    sock = tmp_path / "vmbusd.sock"
    vmbusd = Path(sys.executable).with_name("vmbusd")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen(
        [str(vmbusd), "serve", "--listen", str(sock), "--config", "vm.toml"],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
    )
    try:
        with trio.fail_after(20):
            while not sock.exists():
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                await trio.sleep(0.05)
        async with guest(str(sock)) as vm:
            (offer,) = vm.find_offers(uuid.UUID("6d3f1c0a-0000-4000-8000-000000000001"))
            gch = await vm.open_channel(offer, 32 * 1024)
            words = [b"vmbus", b"hello world", b"x" * 3000]
            await gch.channel.send_batch(
                SendBatch([OutPacket(6, 0, i + 1, [w]) for i, w in enumerate(words)])
            )
            got: list[tuple[int, bytes]] = []
            with trio.fail_after(10):
                while len(got) < len(words):
                    batch = await gch.channel.receive()
                    got += [(p.trans_id, bytes(p.payload).rstrip(b"\0")) for p in batch]
            assert got == [(i + 1, w.upper()) for i, w in enumerate(words)]
            await vm.close_channel(gch)
            await vm.unload()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert proc.returncode == 0


def _doc_device() -> type:
    text = (README.parent / "docs" / "devices.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S)
    assert code, "docs/devices.md's example is missing"
    ns: dict[str, object] = {"__name__": "devices_doc"}
    exec(compile(code.group(1), "docs/devices.md", "exec"), ns)
    return ns["KeyValue"]  # type: ignore[return-value]


def _msg(body: bytes) -> bytes:
    return (len(body) + 2).to_bytes(2, "little") + body


def _put(k: bytes, v: bytes) -> bytes:
    return _msg(bytes([2, len(k)]) + k + len(v).to_bytes(2, "little") + v)


def _get(k: bytes) -> bytes:
    return _msg(bytes([1, len(k)]) + k)


async def _call(gch: Any, packets: list[OutPacket]) -> list[bytes]:
    """Send requests with trans_ids 1..n; return the completions' bodies in order."""
    packets = [p._replace(trans_id=i + 1) for i, p in enumerate(packets)]
    await gch.channel.send_batch(SendBatch(packets))
    got: dict[int, bytes] = {}
    with trio.fail_after(10):
        while len(got) < len(packets):
            for pkt in await gch.channel.receive():
                assert pkt.type == PacketType.COMPLETION
                got[pkt.trans_id] = bytes(pkt.payload)
    return [got[i + 1] for i in range(len(packets))]


async def test_devices_doc_example_serves_and_rejects_bad_requests() -> None:
    kv_cls = _doc_device()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    host = attach.AttachConnection(trio.socket.from_stdlib_socket(a))
    vmm = attach.AttachConnection(trio.socket.from_stdlib_socket(b))
    dev = kv_cls()
    session = VmSession(host, [dev], vm_label="doc")
    vm = SimulatedVm(ram_size=16 << 20)
    req = [
        _put(b"color", b"blue"),
        _get(b"color"),
        _get(b"nope"),
        b"\x02",  # shorter than any message
        (100).to_bytes(2, "little") + _put(b"k", b"v")[2:],  # length beyond the packet
        _msg(bytes([2, 1]) + b"k" + (5).to_bytes(2, "little") + b"v"),  # value cut short
        _msg(bytes([2, 200]) + b"x" * 10),  # key length beyond the message
        _msg(bytes([9, 1]) + b"k"),  # unknown op
    ]
    want = [b"\x00", b"\x00blue", b"\x00", b"\x01", b"\x01", b"\x01", b"\x01", b"\x01"]
    try:
        async with trio.open_nursery() as n:
            n.start_soon(session.run)
            await vm.start(vmm, n)
            (offer,) = vm.find_offers(kv_cls.if_type)
            gch = await vm.open_channel(offer, 32 * 1024)
            got = await _call(gch, [inband(r, completion_requested=True) for r in req])
            # replies are padded to 8 bytes: compare what the protocol put there
            assert [g.rstrip(b"\0") for g in got] == [w.rstrip(b"\0") for w in want]
            assert dev.store == {b"color": b"blue"}

            # PUT_GPA: the value is a guest buffer on scattered pages, described by ranges
            pfns = vm.ram.alloc_pages(2)
            value = b"V" * 700
            vm.memory.write((pfns[0] << 12) + 3796, value[:300])
            vm.memory.write(pfns[1] << 12, value[300:])
            rng = GpaRange(700, 3796, pfns)
            hdr = _msg(bytes([3, 3]) + b"big")
            (status,) = await _call(gch, [gpa_direct([rng], hdr)])
            assert status[:1] == b"\x00" and dev.store[b"big"] == value

            # SNAPSHOT into a GPADL the guest made for the device; too small: NO_ROOM
            handle, bpfns = await vm.create_buffer_gpadl(offer.relid, 4096)
            snap = _msg(bytes([4]) + handle.to_bytes(4, "little"))
            (status,) = await _call(gch, [inband(snap, completion_requested=True)])
            image = b"\x03big\x05color"
            assert status[:5] == b"\x00" + len(image).to_bytes(4, "little")
            assert vm.memory.read(bpfns[0] << 12, len(image)) == image
            (status,) = await _call(gch, [inband(_msg(bytes([4, 9, 9, 9, 9])))])
            assert status[:1] == b"\x01"  # an unknown GPADL: the protocol's failure
            await vm.teardown_buffer_gpadl(offer.relid, handle, bpfns)

            # CHANNELS: the sub-channel service, idempotent and capped
            for ask, expect in ((2, 2), (2, 2), (9, 3)):
                (status,) = await _call(gch, [inband(_msg(bytes([5, ask])))])
                assert status[:2] == bytes([0, expect])
            with trio.fail_after(5):
                while len(vm.find_offers(kv_cls.if_type)) < 4:
                    await vm.offer_events.receive()

            # A GPA-direct range outside guest RAM is a malformed packet: channel reset
            bad = GpaRange(16, 0, [1 << 40])
            await gch.channel.send([gpa_direct([bad], hdr, trans_id=99)])
            with trio.fail_after(5):
                await vm.wait_rescind(offer.relid)

            # a guest that reboots finds an empty store
            await vm.reboot()
            with trio.fail_after(5):
                while dev.store:
                    await trio.sleep(0.01)
            (offer,) = vm.find_offers(kv_cls.if_type)
            gch = await vm.open_channel(offer, 32 * 1024)
            (status,) = await _call(gch, [inband(_get(b"color"))])
            assert status.rstrip(b"\0") == b""  # status 0, no value
            await vm.close_channel(gch)
            await vm.unload()
            n.cancel_scope.cancel()
    finally:
        for g in vm.channels.values():
            g.channel.release()
            g.mapping.close()
        vm.close()
