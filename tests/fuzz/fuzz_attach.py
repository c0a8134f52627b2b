"""Fuzz target for attach-protocol datagrams (vmbus/attach.py `decode_message`): the
msgpack maps and SCM_RIGHTS fds a VMM (or a peer claiming to be vmbusd) sends.

The contract: `decode_message` returns a message or raises AttachProtocolError,
nothing else; on an error every fd that came with the datagram is closed, on success
the message holds exactly the fds that came (none leaked, none foreign); a message
that decoded encodes again (`encode_message`) into a datagram that decodes to the same
message type with the same fields apart from fd numbers.

    python tests/fuzz/fuzz_attach.py [libFuzzer options] [corpus dirs]

Input: byte 0 picks the number of fds attached (0-3), the sender role vmbusd knows
(None, vmm, vmbusd) and the vCPU count; bit 7 picks the shape: raw (the rest is the
datagram, as the recorded seeds are) or shaped (a msgpack map with a real "t" and
keys and values drawn from pools: the real field names, edge integers, wrong types,
nested maps and lists), so the per-type field checks are reached.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness, when imported by path
import harness
import msgpack

with harness.instrumented():
    from vmbus import attach

_ROLES = (None, "vmm", "vmbusd")
_TYPES = ("hello", "memory", "post", "bind", "unbind", "reset", "error", "state", "resume", "x")
_KEYS = (
    "version", "role", "vm_id", "vcpus", "features", "software", "regions", "gpa", "size",
    "fd", "offset", "connection_id", "vcpu", "payload", "sint", "epoch", "relid", "kick",
    "call", "interrupt_page", "code", "message", "blob", "inflight", "applied", "posts",
    "channels",
)  # fmt: skip
_INTS = (0, 1, 2, 3, -1, 4095, 4096, 0x1000, 1 << 20, 0xFFFFFF, 1 << 24, 0xFFFFFFFF, 1 << 32,
         (1 << 63) - 1, (1 << 64) - 1, -(1 << 63))  # fmt: skip
_STRS = ("", "vmm", "vmbusd", "x" * 129, "protocol", "ü", "a b", "vm-1")


def value(r: harness.Reader, depth: int = 0) -> Any:
    k = r.byte() % 10
    if k < 4:
        return r.pick(_INTS)
    if k == 4:
        return r.pick(_STRS)
    if k == 5:
        return r.take(r.byte() % 250)
    if k == 6 and depth < 3:
        return [value(r, depth + 1) for _ in range(r.byte() % 4)]
    if k == 7 and depth < 3:
        return {r.pick(_KEYS): value(r, depth + 1) for _ in range(r.byte() % 5)}
    if k == 8:
        return r.pick((None, True, False, 1.5))
    return r.u32()


def shaped(r: harness.Reader) -> bytes:
    body: dict[Any, Any] = {"t": r.pick(_TYPES)}
    for _ in range(r.byte() % 9):
        body[r.pick(_KEYS)] = value(r)
    if r.byte() & 1:  # the region / channel list shapes the codec knows
        body["regions" if r.byte() & 1 else "channels"] = [
            {"gpa": r.pick(_INTS), "size": r.pick(_INTS), "fd": r.byte() % 4,
             "offset": r.pick(_INTS), "relid": r.pick(_INTS), "kick": r.byte() % 4,
             "call": r.byte() % 4}
            for _ in range(1 + r.byte() % 3)
        ]  # fmt: skip
    return bytes(msgpack.packb(body, use_bin_type=True))


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def _fields(msg: Any, fds: list[int]) -> Any:
    """The message's fields with each fd replaced by its index into `fds`."""
    if dataclasses.is_dataclass(msg) and not isinstance(msg, type):
        out = {}
        for f in dataclasses.fields(msg):
            v = getattr(msg, f.name)
            if f.name in ("fd", "kick", "call", "blob", "inflight") and isinstance(v, int):
                v = ("fd", fds.index(v)) if v in fds else v
            out[f.name] = _fields(v, fds)
        return (type(msg).__name__, out)
    if isinstance(msg, tuple | list):
        return [_fields(x, fds) for x in msg]
    return msg


def check_one(data: bytes) -> None:
    r = harness.Reader(data)
    head = r.byte()
    nfds = head % 4
    sender = _ROLES[(head >> 2) % 3]
    vcpus = (None, 1, 4, attach.MAX_VCPUS)[(head >> 4) % 4]
    datagram = shaped(r) if head & 0x80 else data[1:]
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)]
    try:
        msg = attach.decode_message(datagram, list(fds), sender=sender, vcpus=vcpus)
    except attach.AttachProtocolError:
        assert all(_closed(fd) for fd in fds), "an fd of a refused datagram was left open"
        return
    try:
        assert sorted(msg.fds()) == sorted(fds), (msg, fds)
        again, out_fds = attach.encode_message(msg)
        assert len(again) <= attach.MAX_DATAGRAM
        dups = [os.dup(fd) for fd in out_fds]
        msg2 = attach.decode_message(again, dups, sender=sender, vcpus=vcpus)
        try:
            assert _fields(msg2, dups) == _fields(msg, out_fds), (msg, msg2)
        finally:
            attach.close_fds(msg2.fds())
    finally:
        attach.close_fds(fds)


main = harness.main_for(check_one)

if __name__ == "__main__":
    main(sys.argv)
