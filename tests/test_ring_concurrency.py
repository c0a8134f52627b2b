"""Ring buffer under a real concurrent peer: one end native, the other the Python twin.

Every other ring test runs both ends in one thread, so it cannot see what only a
concurrent peer sees: a header index loaded or stored in pieces (torn), or a
store-then-load handshake reordered without a full barrier. Here the writer and
the reader are two processes sharing an 8 KiB ring in a memfd, each running flat
out on its own CPU, and the reader checks every packet (order, length, bytes):

- "spin": the writer follows Linux's guest rules, one packet per call, written as
  soon as room frees up, spinning on "ring full"; the reader takes at most 2
  packets per call and spins on "empty". A torn write_index or read_index shows
  up as a packet out of place or a descriptor read from the middle of a packet
  (BAD_TYPE and friends). With the old twin (struct "<I", a byte at a time), the
  twin writer failed within 2 s in 12 of 12 runs; the twin reader in about half
  of the 6 s runs and in 3 of 3 runs of 30 s (after 1.6, 8.6 and 15 s): hence the
  longer slow variant. With one 32-bit access per field: no failure.
- "signal": both ends sleep on eventfds instead of spinning, with the full
  protocol (interrupt mask, unmask and re-check, pending_send_sz): a lost wake-up
  is a wait that times out while the ring holds what the sleeper waits for. The
  old twin had no fence in those store-then-load handshakes, yet no lost wake-up
  was ever seen here: CPython runs far too long between the store and the load
  for a store buffer to reorder them in practice. This mode is the detector; the
  fence is there because the memory model requires it, not because it was seen.

Run as a script, this file is one end of a pair (the tests start two of them);
`--ring-file` loads the ring classes from another copy of vmbus/ring.py. To see
the tests fail on the old twin:
    git show ed7a550~1:vmbus/ring.py > /tmp/old_ring.py
    RING_FILE_UNDER_TEST=/tmp/old_ring.py pytest tests/test_ring_concurrency.py
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import mmap
import os
import random
import select
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from vmbus import native, ring

SIZE = 8192  # the data area: small, so the ring wraps and fills all the time
KINDS = 257  # distinct packets the writer cycles through (sizes 1 .. SIZE/4)
END_TID = (1 << 64) - 1  # the writer's last packet: "no more"
WAIT_S = 5.0  # a sleeper that waits this long while its condition holds lost a wake-up

needs_native = pytest.mark.native  # fails, never skips, without the extension (conftest.py)
HERE = Path(__file__).resolve()


def _pattern() -> bytes:
    return random.Random(7).randbytes(4096)


def _lengths() -> list[int]:
    """Payload lengths by kind: two thirds small, the rest 256 bytes up to a quarter ring."""
    rng = random.Random(11)
    # Small packets let the reader catch up with the writer (where a torn write_index
    # does the most harm); big ones move an index across a 256-byte boundary, so that
    # an index loaded or stored a byte at a time tears into a wrong value.
    small, big = (1, 64), (256, SIZE // 4)
    return [rng.randrange(*rng.choice((small, small, big))) for _ in range(KINDS)]


def _payload(pattern: bytes, lengths: list[int], seq: int) -> bytes:
    k = seq % KINDS
    return pattern[k : k + lengths[k]]


def _ring_module(ring_file: str | None) -> ModuleType:
    if ring_file is None:
        return ring
    spec = importlib.util.spec_from_file_location("vmbus_ring_under_test", ring_file)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _wait(fd: int, timeout: float) -> bool:
    """Wait for an eventfd (consume it): True if it fired, False on timeout."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    if not p.poll(timeout * 1000):
        return False
    with contextlib.suppress(BlockingIOError):
        os.eventfd_read(fd)
    return True


def _open(mod: ModuleType, impl: str, role: str, fd: int) -> tuple[Any, mmap.mmap]:
    m = mmap.mmap(fd, mmap.PAGESIZE + SIZE)
    mv = memoryview(m)
    hdr, data = mv[: ring.HDR_SIZE], mv[mmap.PAGESIZE :]
    name = {"reader": "RingReader", "writer": "RingWriter"}[role]
    cls = getattr(mod, ("Py" if impl == "py" else "Native") + name)
    end = cls(hdr, data, SIZE)
    del hdr, data, mv
    end.open()
    return end, m


def run_writer(args: argparse.Namespace) -> dict[str, Any]:
    """Write packets 0, 1, ... one per call until the deadline, then the END packet."""
    mod = _ring_module(args.ring_file)
    wr, _m = _open(mod, args.impl, "writer", args.mem_fd)
    batch_cls = mod.PySendBatch if args.impl == "py" else mod.NativeSendBatch
    pattern, lengths = _pattern(), _lengths()
    batches = [
        batch_cls([mod.OutPacket(6, 0, 0, [_payload(pattern, lengths, k)])]) for k in range(KINDS)
    ]
    end = batch_cls([mod.OutPacket(6, 0, END_TID, [b"end"])])
    deadline = time.monotonic() + args.seconds
    seq = spins = waits = 0
    while True:
        last = seq >= args.max_pkts or (seq % 64 == 0 and time.monotonic() > deadline)
        b = end if last else batches[seq % KINDS]
        res = wr.write(b, 0, None if last else seq)
        if res.npkts:
            if res.signal and args.mode == "signal":
                os.eventfd_write(args.kick_fd, 1)
            if last:
                break
            seq += 1
            continue
        if args.mode == "spin":
            spins += 1  # Linux's guest: try again at once
            continue
        if wr.request_space(b.packet_ring_bytes(0)):
            continue
        waits += 1
        while not _wait(args.call_fd, WAIT_S):
            if wr.bytes_to_write() > b.packet_ring_bytes(0):
                return {"sent": seq, "error": "writer lost a wake-up (room, no signal)"}
    return {"sent": seq, "spins": spins, "waits": waits, "error": None}


def run_reader(args: argparse.Namespace) -> dict[str, Any]:
    """Read at most 2 packets per call and check each one, up to the END packet."""
    mod = _ring_module(args.ring_file)
    rd, _m = _open(mod, args.impl, "reader", args.mem_fd)
    pattern, lengths = _pattern(), _lengths()
    out = bytearray(SIZE)
    idx = bytearray(8 * 2)
    seq = waits = 0
    deadline = time.monotonic() + args.seconds + 30
    if args.mode == "signal":
        rd.mask()
    while time.monotonic() < deadline:
        res = rd.read(out, idx, 2)
        if res.error is not None:
            return {"got": seq, "error": f"{res.error.name} after {seq} packets"}
        if res.signal and args.mode == "signal":
            os.eventfd_write(args.call_fd, 1)
        for pkt in mod.iter_packets(out, idx, res.npkts):
            if pkt.trans_id == END_TID:
                return {"got": seq, "waits": waits, "error": None}
            want = _payload(pattern, lengths, seq)  # the ring pads it to 8 bytes with zeros
            if pkt.trans_id != seq or bytes(pkt.payload) != want + bytes(-len(want) % 8):
                return {"got": seq, "error": f"packet {seq}: wrong trans_id or bytes"}
            seq += 1
        if res.npkts or args.mode == "spin":
            continue
        if rd.unmask():  # data arrived while we were unmasking: drain again
            rd.mask()
            continue
        waits += 1
        while not _wait(args.kick_fd, WAIT_S):
            if rd.bytes_to_read():
                return {"got": seq, "error": "reader lost a wake-up (data, no signal)"}
        rd.mask()
    return {"got": seq, "error": "reader deadline: no END packet"}


# ------------------------------------------------------------------------- the test


def run_pair(
    writer_impl: str,
    reader_impl: str,
    mode: str,
    seconds: float,
    max_pkts: int = 1 << 62,
    ring_file: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start a writer and a reader process on one fresh ring; their two reports."""
    fd = os.memfd_create("vmbusd-ring-concurrency")
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    call = os.eventfd(0, os.EFD_NONBLOCK)
    procs: list[subprocess.Popen[str]] = []
    try:
        os.ftruncate(fd, mmap.PAGESIZE + SIZE)
        with mmap.mmap(fd, mmap.PAGESIZE) as hdr:
            ring.init_ring_header(hdr)
        common = [
            f"--mode={mode}",
            f"--seconds={seconds}",
            f"--max-pkts={max_pkts}",
            f"--mem-fd={fd}",
            f"--kick-fd={kick}",
            f"--call-fd={call}",
        ] + ([f"--ring-file={ring_file}"] if ring_file else [])
        env = dict(os.environ, VMBUSD_NATIVE="1" if native.native_available() else "0")
        for role, impl in (("reader", reader_impl), ("writer", writer_impl)):
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(HERE), role, impl, *common],
                    pass_fds=(fd, kick, call),
                    stdout=subprocess.PIPE,
                    text=True,
                    env=env,
                )
            )
        reader, writer = procs
        out_r, _ = reader.communicate(timeout=seconds + 60)
        if writer.poll() is None:  # a failed reader leaves the writer spinning: stop it
            time.sleep(0.5)
            writer.kill()
        out_w, _ = writer.communicate(timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in (fd, kick, call):
            os.close(f)
    rep_r = json.loads(out_r) if out_r.strip() else {"error": f"reader exit {reader.returncode}"}
    rep_w = json.loads(out_w) if out_w.strip() else {"error": f"writer exit {writer.returncode}"}
    return rep_w, rep_r


PAIRS = [("native", "py"), ("py", "native")]


def _check(writer_impl: str, reader_impl: str, mode: str, seconds: float) -> None:
    ring_file = os.environ.get("RING_FILE_UNDER_TEST")  # another copy of vmbus/ring.py
    rep_w, rep_r = run_pair(writer_impl, reader_impl, mode, seconds, ring_file=ring_file)
    assert rep_r["error"] is None, (rep_w, rep_r)
    assert rep_w["error"] is None, (rep_w, rep_r)
    assert rep_r["got"] == rep_w["sent"] > 1000, (rep_w, rep_r)


@needs_native
@pytest.mark.parametrize(("writer_impl", "reader_impl"), PAIRS)
@pytest.mark.parametrize("mode", ["spin", "signal"])
def test_twin_against_concurrent_native_peer(writer_impl: str, reader_impl: str, mode: str) -> None:
    """A few seconds flat out against a peer on another CPU: every packet intact. The
    twin reader tore less often than the twin writer, so it gets longer."""
    seconds = {"spin": 6.0 if reader_impl == "py" else 3.0, "signal": 1.5}[mode]
    _check(writer_impl, reader_impl, mode, seconds)


LONG = {("spin", "native", "py"): 25.0, ("spin", "py", "native"): 10.0}


@needs_native
@pytest.mark.slow
@pytest.mark.parametrize(("writer_impl", "reader_impl"), PAIRS)
@pytest.mark.parametrize("mode", ["spin", "signal"])
def test_twin_against_concurrent_peer_long(writer_impl: str, reader_impl: str, mode: str) -> None:
    """The same for longer: 25 s of the twin reader, whose old torn loads needed up
    to 15 s to show (the old twin writer failed within 2 s, every run)."""
    _check(writer_impl, reader_impl, mode, LONG.get((mode, writer_impl, reader_impl), 8.0))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one end of a concurrent ring pair")
    p.add_argument("role", choices=("reader", "writer"))
    p.add_argument("impl", choices=("py", "native"))
    p.add_argument("--mode", choices=("spin", "signal"), default="spin")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--max-pkts", type=int, default=1 << 62)
    p.add_argument("--mem-fd", type=int, required=True)
    p.add_argument("--kick-fd", type=int, required=True)
    p.add_argument("--call-fd", type=int, required=True)
    p.add_argument("--ring-file")
    args = p.parse_args(argv)
    report = run_reader(args) if args.role == "reader" else run_writer(args)
    print(json.dumps(report))
    return 0 if report["error"] is None else 1


if __name__ == "__main__":
    sys.exit(main())
