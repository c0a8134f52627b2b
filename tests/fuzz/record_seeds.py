"""Write the fuzz targets' seed corpora (tests/fuzz/corpus/<target>/) from real traffic.

Two sources, both kept in the repo or reproducible from it:

- the real Linux 6.1 guest's bytes captured on the KVM tier
  (tests/data/real_linux_6.1_{storvsc,netvsc}_init.json): its VSTOR packets and SRBs,
  their CDBs, its NVSP messages and RNDIS messages, and the ring descriptors and
  GPA-direct extensions of both, each re-encoded into the input format of the target
  that parses it (`real-*` files);
- the simulated guest: `vmbusd demo` run in this process (vmbusd's side) with the
  attach codec wrapped, so every attach datagram vmbusd received or sent and every
  VMBus control message the guest posted is recorded (`sim-*` files); its GPADLs'
  geometry seeds fuzz_gpadl;
- for targets no captured traffic reaches: the Hyper-V bring-up Linux 6.1 performs
  (the MSR writes and hypercalls of hv_common_init / hv_synic_enable_regs /
  vmbus_post_msg / vmbus_set_event, values as the KVM tier logs them), and NBD
  handshakes and replies recorded from a real nbdkit (memory plugin) when nbdkit is
  installed (`nbdkit-*`).

    python tests/fuzz/record_seeds.py [--no-demo]

Rerunning rewrites only the `real-*`, `sim-*`, `linux-*` and `nbdkit-*` files; the
`regress-*` files (inputs of fixed findings) are never touched.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

DATA = harness.TESTS_DIR / "data"
PREFIXES = ("real-", "sim-", "linux-", "nbdkit-")


def packets(kind: str) -> list[dict[str, Any]]:
    doc = json.loads((DATA / f"real_linux_6.1_{kind}_init.json").read_text())
    return list(doc["packets"])


def clear(target: str) -> None:
    d = harness.CORPUS_DIR / target
    if d.is_dir():
        for p in d.iterdir():
            if p.name.startswith(PREFIXES):
                p.unlink()


def ext_byte_count(ext_hex: str) -> int:
    ext = bytes.fromhex(ext_hex)
    return struct.unpack_from("<I", ext, 8)[0] if len(ext) >= 12 else 0


# ------------------------------------------------------------------ real guest: storvsc


def storvsc_seeds() -> int:
    import fuzz_scsi
    import fuzz_vstor

    from devices.storvsc.protocol import ExecuteSrb, VstorProtocol
    from devices.storvsc.scsi.constants import cdb_length_for

    clear("vstor")
    clear("scsi")
    ins = [p for p in packets("storvsc") if p["dir"] == "in"]
    steps = []
    for p in ins:
        payload = bytes.fromhex(p["payload"])
        size = fuzz_vstor._SIZES.index(len(payload)) if len(payload) in fuzz_vstor._SIZES else 0
        data_bytes = ext_byte_count(p["ext"])
        dsel = fuzz_vstor._DATA.index(data_bytes) if data_bytes in fuzz_vstor._DATA else 0
        steps.append(bytes([size, 1 if p["sub"] else 0, dsel, 0]) + payload[:64])
    # the whole init and scan as one script (the harness takes 32 steps), then windows of it
    harness.write_seed("vstor", "real-storvsc-init", b"".join(steps[:32]))  # byte 0 even: no init
    for k in range(4, len(steps), 8):
        harness.write_seed("vstor", f"real-storvsc-{k:03d}", b"".join(steps[:4] + steps[k : k + 8]))
    # each SRB's CDB as the SCSI target's input (LUN 0, direction, its CDB, a buffer size)
    proto = VstorProtocol(max_sub_channels=4, max_transfer_bytes=0x40000)
    n = 0
    for p in ins:
        try:
            ev = proto.receive(bytes.fromhex(p["payload"]), primary=not p["sub"],
                               data_bytes=ext_byte_count(p["ext"]))  # fmt: skip
        except Exception:
            continue
        if not isinstance(ev, ExecuteSrb):
            continue
        srb = ev.srb
        data_in = srb.data_in == 1
        head = 0x10 | (0x04 if data_in else 0)  # LUN 0, length from the opcode
        sizes = fuzz_scsi._SIZES
        fit = [i for i, s in enumerate(sizes) if s >= srb.data_transfer_length]
        pick = min(fit, key=lambda i: sizes[i]) if fit else len(sizes) - 1
        length = cdb_length_for(srb.cdb[0]) or 16
        seed = bytes([head]) + srb.cdb[:length].ljust(length, b"\0") + bytes([pick])
        harness.write_seed("scsi", f"real-storvsc-cdb-{n:03d}-{srb.cdb[0]:02x}", seed)
        n += 1
    return len(steps) + n


# ------------------------------------------------------------------ real guest: netvsc


def netvsc_seeds() -> int:
    import fuzz_nvsp

    from devices.netvsc import protocol as nv

    clear("nvsp")
    clear("rndis")
    ins = [p for p in packets("netvsc") if p["dir"] == "in"]
    head = fuzz_nvsp._VERSIONS.index(max(fuzz_nvsp._VERSIONS))  # newest, no synthetic init
    script = bytearray([head])
    for p in ins:
        msg = bytes.fromhex(p["payload"])
        script += bytes([0]) + msg  # head 0: a whole 40-byte message
        msg_type = struct.unpack_from("<I", msg)[0]
        if msg_type == nv.Msg.SEND_RECV_BUF:
            script.append(0)  # mapped: 16 MiB, as Linux's receive buffer
        elif msg_type == nv.Msg.SEND_SEND_BUF:
            script.append(1)  # 1 MiB
    harness.write_seed("nvsp", "real-netvsc-init", bytes(script))
    n = 0
    for p in ins:
        raw = p.get("rndis")
        if not isinstance(raw, str) or not raw:
            continue
        rndis = bytes.fromhex(raw)
        first = struct.unpack_from("<I", rndis)[0] if len(rndis) >= 4 else 0
        mode = 0 if first == 2 else 8  # INITIALIZE on a fresh device, the rest initialized
        harness.write_seed("rndis", f"real-netvsc-rndis-{n:03d}", bytes([mode]) + rndis)
        n += 1
    return len(ins) + n


# ------------------------------------------------------------------ real guest: rings and packets


def ring_seeds() -> int:
    import fuzz_packet

    from vmbus.packet import PacketType

    clear("ring")
    clear("packet")
    pk = [p for kind in ("storvsc", "netvsc") for p in packets(kind) if p["dir"] == "in"]
    n = 0
    for k in range(0, len(pk), 5):
        group = pk[k : k + 5]
        body = bytearray([0, 0, 0, len(group)])  # guarded, 1 page, start 0, count
        for p in group:
            len8 = p.get("len8") or 2
            body += bytes([0]) + struct.pack(
                "<HHHH", p["type"], p["flags"], p.get("offset8", 2), len8
            )
            body += struct.pack("<I", p["trans_id"] & 0xFFFFFFFF) + bytes([0x11, 0xFF])
        body += bytes([0, 0, 0, 0])  # header words as the guest left them
        body += bytes([0, 1, 0, 0, 8, 0]) * 2  # read all, then read again
        harness.write_seed("ring", f"real-ring-{n:03d}", bytes(body))
        # the same packets as a GPA-direct batch for fuzz_packet (type, ext, payload)
        batch = bytearray([len(group) - 1])
        for p in group:
            ext = bytes.fromhex(p["ext"])
            payload = bytes.fromhex(p["payload"])
            if p["type"] == PacketType.GPA_DIRECT:
                sel = fuzz_packet._TYPES.index(PacketType.GPA_DIRECT)
            else:
                sel = fuzz_packet._TYPES.index(PacketType.INBAND)
            batch += bytes([sel, len(ext) // 8, min(len(payload), 255), p["flags"] & 1])
            batch += ext + payload[:255]
        harness.write_seed("packet", f"real-packets-{n:03d}", bytes(batch))
        n += 1
    return 2 * n


# ------------------------------------------------------------------ simulated guest


def record_demo() -> tuple[list[tuple[bytes, int, str]], list[tuple[bytes, int]]]:
    """Run `vmbusd demo` (vmbusd here, the simulated VM as its subprocess) with the
    attach codec wrapped: (datagrams with their fd count and sender, guest posts)."""
    from vmbus import attach, demo

    datagrams: list[tuple[bytes, int, str]] = []
    posts: list[tuple[bytes, int]] = []
    decode, encode = attach.decode_message, attach.encode_message

    def rec_decode(data: bytes, fds: list[int], **kw: Any) -> Any:
        msg = decode(data, fds, **kw)
        datagrams.append((bytes(data), len(fds), "vmm"))
        if isinstance(msg, attach.PostFromGuest):
            posts.append((bytes(msg.payload), msg.connection_id))
        return msg

    def rec_encode(msg: Any) -> tuple[bytes, list[int]]:
        data, fds = encode(msg)
        datagrams.append((data, len(fds), "vmbusd"))
        return data, fds

    attach.decode_message = rec_decode  # type: ignore[assignment]
    attach.encode_message = rec_encode  # type: ignore[assignment]
    try:
        rc = demo.run_demo(packets=200, ring_size=64 * 1024)
    finally:
        attach.decode_message, attach.encode_message = decode, encode  # type: ignore[assignment]
    if rc != 0 and not posts:  # (a short demo fails its RAM-disk size check: harmless)
        raise SystemExit(f"vmbusd demo failed ({rc}): no simulated-guest seeds")
    return datagrams, posts


def sim_seeds() -> int:
    import fuzz_attach

    from vmbus import protocol as p

    clear("attach")
    clear("control")
    clear("gpadl")
    datagrams, posts = record_demo()
    n = 0
    seen: set[bytes] = set()
    for data, nfds, sender in datagrams:
        key = data[:64] if b"payload" in data else data
        if nfds > 3 or key in seen:
            continue
        seen.add(key)
        role = fuzz_attach._ROLES.index(sender)
        harness.write_seed("attach", f"sim-attach-{n:04d}", bytes([nfds | role << 2]) + data)
        n += 1
    steps = [
        bytes([1 if conn == p.CONNECTION_ID_MESSAGE_4 else 0, len(payload)]) + payload
        for payload, conn in posts
    ]
    # scripts of <= 40 messages (the harness runs 48 steps); each later one starts with
    # the guest's INITIATE_CONTACT and REQUEST_OFFERS so it is past negotiation
    scripts = [b"\0" + b"".join(steps[:40])]
    for k in range(40, len(steps), 38):
        scripts.append(b"\0" + b"".join(steps[:2] + steps[k : k + 38]))
    for k, s in enumerate(scripts):
        harness.write_seed("control", f"sim-control-{k:03d}", s)
    # each GPADL the guest built, as fuzz_gpadl's range-buffer description
    g = 0
    for payload, _conn in posts:
        try:
            msg = p.decode(payload)
        except p.ProtocolError:
            continue
        if isinstance(msg, p.GpadlHeader) and msg.rangecount == 1 and len(msg.range_data) >= 8:
            count, _offset = struct.unpack_from("<II", msg.range_data)
            # claimed 1 range; raw byte_count; offset, PFN-count nudge, base PFN, no flips;
            # range_buflen as sent, the header as full as it goes; bodies of full size
            seed = bytes([0, 0]) + struct.pack("<I", count) + bytes([0, 0, 0, 0])
            harness.write_seed("gpadl", f"sim-gpadl-{g:03d}", seed + bytes(3) + bytes([0, 1]) * 40)
            g += 1
    return n + len(scripts) + g


# ------------------------------------------------------------------ Linux's Hyper-V bring-up


def linux_hyperv_seeds() -> int:
    """Linux 6.1's MSR writes and hypercalls as fuzz_hyperv input: hv_common_init
    (GUEST_OS_ID, HYPERCALL), hv_synic_enable_regs (SIMP, SIEFP, SINT2 = vector 0xF3,
    SCONTROL), vmbus_post_msg (HvPostMessage of INITIATE_CONTACT on connection 4),
    the host's VERSION_RESPONSE taken and EOM'd, vmbus_set_event (fast HvSignalEvent)."""
    import fuzz_hyperv as fh

    from vmbus import protocol as p
    from vmbus.kvm import hyperv as hv

    clear("hyperv")

    def wrmsr(vcpu: int, msr: int, value: int) -> bytes:
        return bytes([0, vcpu, 1, fh._MSRS.index(msr), 0]) + struct.pack("<Q", value)

    def post(vcpu: int, payload: bytes, conn_idx: int) -> bytes:
        page_idx = fh._PAGES.index(0x4000)
        return (
            bytes([2, vcpu, 1, 0, page_idx, 0, conn_idx, 0, 0, 2, len(payload)]) + payload + b"\0"
        )

    version = max(p.ALL_VERSIONS)
    contact = p.InitiateContact(version, 0, p.InitiateContact.sint_field(2), 0, 0).encode()
    ops = [
        wrmsr(0, hv.HV_X64_MSR_GUEST_OS_ID, fh._LINUX_OS_ID),
        wrmsr(0, hv.HV_X64_MSR_HYPERCALL, 0x1000 | 1),
        wrmsr(0, hv.HV_X64_MSR_SIMP, 0x2000 | 1),
        wrmsr(0, hv.HV_X64_MSR_SIEFP, 0x3000 | 1),
        wrmsr(0, hv.HV_X64_MSR_SINT0 + 2, 0xF3),
        wrmsr(0, hv.HV_X64_MSR_SCONTROL, 1),
        post(0, contact, 1),
        bytes([5, 0, 1]) + bytes(8) + bytes([0, 0]),  # host posts 8 bytes, SINT 2, type 1
        bytes([5, 0, 1]) + bytes(8) + bytes([0, 0]),  # a second waits: msg_pending
        bytes([3, 0, 2, 1]),  # the guest takes the slot and writes EOM
        bytes([2, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]),  # fast HvSignalEvent(0x2000)
        bytes([6, 0, 0, 5, 0]),  # host sets event flag 5 in SIEFP slot 2
    ]
    harness.write_seed("hyperv", "linux-bringup-1cpu", bytes([0]) + b"".join(ops))
    ops2 = [o[:1] + bytes([1]) + o[2:] for o in ops]
    harness.write_seed("hyperv", "linux-bringup-2cpu", bytes([1]) + b"".join(ops + ops2))
    return 2


# ------------------------------------------------------------------ nbdkit


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def _nbdkit(sock_path: str) -> Iterator[subprocess.Popen[bytes]]:
    cmd = ["nbdkit", "--foreground", "--exit-with-parent", "-U", sock_path, "memory", "1M"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock_path) and time.monotonic() < deadline:
            time.sleep(0.02)
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def nbdkit_seeds() -> int:
    """A real nbdkit's handshake bytes and replies to READ/WRITE/FLUSH, recorded."""
    from devices.storvsc.backends import nbd_protocol as n

    if shutil.which("nbdkit") is None:
        print("record_seeds: nbdkit not installed: no nbdkit-* seeds", file=sys.stderr)
        return 0
    clear("nbd")
    written = 0
    for structured in (True, False):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "nbd.sock")
            for _ in _nbdkit(path):
                sock = socket.socket(socket.AF_UNIX)
                sock.connect(path)
                sock.settimeout(10)
                hs = n.NbdHandshake("", structured_replies=structured)
                got = bytearray()
                while not hs.done:
                    out = hs.data_to_send()
                    if out:
                        sock.sendall(out)
                    chunk = sock.recv(hs.bytes_wanted)
                    if not chunk:
                        raise SystemExit("nbdkit closed during the handshake")
                    got += chunk
                    hs.receive_data(chunk)
                sock.sendall(hs.data_to_send())
                conn = n.NbdClientConnection(structured)
                two = [memoryview(bytearray(1000)), memoryview(bytearray(3096))]
                reqs = [
                    conn.send_request(2, n.NBD_CMD_WRITE, 4096, 512) + bytes([7]) * 512,
                    conn.send_request(1, n.NBD_CMD_READ, 0, 4096, buffers=two),
                    conn.send_request(3, n.NBD_CMD_READ, 512, 512,
                                      buffers=[memoryview(bytearray(512))]),
                    conn.send_request(4, n.NBD_CMD_FLUSH),
                ]  # fmt: skip
                replies = bytearray()
                for req in reqs:
                    sock.sendall(req)
                want = 16 * 4 + 4096 + 512 if not structured else 0
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    try:
                        chunk = sock.recv(65536)
                    except TimeoutError:
                        break
                    if not chunk:
                        break
                    replies += chunk
                    if want and len(replies) >= want:
                        break
                    sock.settimeout(0.5)
                sock.close()
            flag = 2 if structured else 0
            # handshake: bit 0 set, the recorded server bytes delivered 8 at a time
            harness.write_seed("nbd", f"nbdkit-handshake-{'sr' if structured else 'simple'}",
                               bytes([1 | flag | 4 | (7 << 3)]) + bytes(got))  # fmt: skip
            # replies: bit 0 clear; raw pieces of <= 0x3f bytes carry the recorded stream
            pieces = bytearray([flag])
            for k in range(0, len(replies), 0x3F):
                chunk = bytes(replies[k : k + 0x3F])
                pieces += bytes([len(chunk)]) + chunk
            harness.write_seed("nbd", f"nbdkit-replies-{'sr' if structured else 'simple'}",
                               bytes(pieces))  # fmt: skip
            written += 2
    return written


# ------------------------------------------------------------------ request journal


def journal_seeds() -> int:
    """Journals the real code wrote (vmbus/journal.py on a real ring pair, the
    simulated guest's requests), at the crash points tests/test_journal.py takes:
    fresh, requests taken, a batch staged before and after the ring consume, a group
    half completed (also across the ring's wrap), a reply kept, a truncated request,
    entries without the packet (copy=False). Encoded as fuzz_journal's input."""
    import trio
    from test_channel import channel_pair

    from vmbus import journal as jn
    from vmbus.packet import completion, inband
    from vmbus.ring import FLAG_COMPLETION_REQUESTED, OFF_READ_INDEX, OFF_WRITE_INDEX

    clear("journal")
    esize, nent = 128, 8
    slot_len = jn.HEADER_SIZE + nent * esize

    def requests(first: int, n: int, size: int = 24) -> list[Any]:
        return [
            inband(struct.pack("<Q", tid) * (size // 8))._replace(
                trans_id=tid, flags=FLAG_COMPLETION_REQUESTED
            )
            for tid in range(first, first + n)
        ]

    def encode(slot: memoryview, rings: Any, copy: bool) -> bytes:
        sel = int(copy) | 2 | ((esize - 48) // 8) << 3  # doubled, 1 downstream page
        head = bytes([sel, nent - 1, 0])
        head += bytes(rings.upstream_hdr[OFF_READ_INDEX : OFF_READ_INDEX + 4])
        head += bytes(rings.downstream_hdr[OFF_WRITE_INDEX : OFF_WRITE_INDEX + 4])
        ring = bytes(rings.downstream_data[: rings.downstream_size]).rstrip(b"\0")
        return head + bytes(slot) + ring

    seeds: dict[str, bytes] = {}

    async def scenario(name: str, copy: bool = True) -> None:
        slot = memoryview(bytearray(slot_len))
        with channel_pair(ring_pages=2) as (host, guest, rings):
            j = jn.RequestJournal.attach(slot, rings, entry_size=esize, copy=copy)
            if name == "wrap":  # move our ring's write_index near its end first
                tid = 100
                while rings.downstream_hdr[OFF_WRITE_INDEX + 1] < 0x0E:  # ~3.5 KiB of 4
                    await guest.send(requests(tid, 4))
                    batch, entries = await j.receive(host, 8)
                    await j.send_completions(
                        host, entries, [completion(p.trans_id, bytes(64)) for p in batch]
                    )
                    await guest.receive()
                    tid += 4
            if name != "fresh":
                size = 200 if name == "truncated" else 24
                await guest.send(requests(1, 6, size))
            if name in ("staged-before-consume", "staged-after-consume"):
                batch = await host.receive(64, consume=False)
                entries = j.stage(batch, host.read_position, host.unconsumed, None)
                if name == "staged-after-consume":
                    host.consume()
                struct.pack_into("<I", slot, 16, 1)  # the crash left the batch staged
                for e in entries:
                    struct.pack_into("<I", slot, jn.HEADER_SIZE + e * esize, jn.STAGED)
            elif name in ("taken", "truncated"):
                batch, entries = await j.receive(host, 64)
                await j.send_completions(
                    host, entries[:2], [completion(p.trans_id, b"") for p in list(batch)[:2]]
                )
            elif name in ("completing", "wrap"):
                batch, entries = await j.receive(host, 64)
                j._mark(entries)  # the group starts, half of it is published
                pad = bytes(120 if name == "wrap" else 40)  # (wrap: the group crosses the end)
                await host.send([completion(p.trans_id, pad) for p in list(batch)[:3]])
            elif name == "reply":
                batch, entries = await j.receive(host, 64)
                j.record_reply(entries[0], b"answer")
                j.record_reply(entries[1], b"another answer")
                j._mark(entries[:1])
            seeds[f"sim-journal-{name}{'' if copy else '-nocopy'}"] = encode(slot, rings, copy)

    async def all_scenarios() -> None:
        for name in ("fresh", "taken", "staged-before-consume", "staged-after-consume",
                     "completing", "wrap", "reply", "truncated"):  # fmt: skip
            await scenario(name)
        await scenario("taken", copy=False)

    trio.run(all_scenarios)
    for name, data in seeds.items():
        harness.write_seed("journal", name, data)
    return len(seeds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-demo", action="store_true", help="skip the simulated-guest run")
    args = ap.parse_args()
    counts = {
        "storvsc": storvsc_seeds(),
        "netvsc": netvsc_seeds(),
        "rings": ring_seeds(),
        "hyperv": linux_hyperv_seeds(),
        "nbdkit": nbdkit_seeds(),
        "journal": journal_seeds(),
    }
    if not args.no_demo:
        counts["simulated guest"] = sim_seeds()
    for name, k in counts.items():
        print(f"{name}: {k} seeds")


if __name__ == "__main__":
    main()
