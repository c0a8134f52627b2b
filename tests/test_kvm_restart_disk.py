"""Issue 11 part 1, the real guest's disks: the Linux 6.1 guest under KVM keeps reading
and writing its two file-backed storvsc LUNs (and answers ping on its NIC) while vmbusd
is SIGKILLed at random moments, 20 times, and started again each time; at the end
every byte is where it belongs.

The guest has no user space (kvm_pvm cannot run it), so the load is the kernel's own:
an md RAID1 array assembled at boot from the command line (`md=0,/dev/sda,/dev/sdb`,
0.90 superblocks this test writes at the end of each LUN, marked not clean), whose
resync reads LUN 0 (random bytes) and writes LUN 1 (zeros) until the two are equal,
with little in flight (the kills that caught requests found 1 or 2). The plan was
device-mapper's mirror target from dm-init, but 6.1's dm-init refuses it
(drivers/md/dm-init.c, dm_allowed_targets: crypt, delay, linear, snapshot-origin,
striped, verity): md's boot-time assembly is the kernel's other way to the same resync.

    the host                                        the KVM guest (no user space)
    lun0.img (random) --- storvsc LUN 0 == VMBus == sda --+
    lun1.img (zeros)  --- storvsc LUN 1 == VMBus == sdb --+-- md0 (raid1): resync
    namespace br0 10.99.0.1 --- TAP vh0, netvsc == VMBus == eth0 10.99.0.2 (ip=)

Every kill lands while the resync runs (checked: LUN 1 still differs from LUN 0 at each
one); each new vmbusd must log `resumed:` and the guest must answer a ping before the
next kill. A request lost across a crash would hang the resync (the test times out
naming the first region that differs); one run twice or torn would leave LUN 1 wrong,
or the guest would log an I/O error, a SCSI abort or reset, or a failed mirror leg.
Marked `kvm_linux` (the slow tier); skipped only where /dev/kvm is absent.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_kvm_linux import HAS_KVM
from test_kvm_netvsc import BR_MAC, G_ADDR, H_ADDR, NIC_MAC, _run, tap_backend
from test_kvm_restart import VMBUSD, Vmbusd

KILLS = 20
DISK_BYTES = 256 << 20  # each LUN; a multiple of the 0.90 superblock's 64 KiB
MD_RESERVED = 64 << 10  # 0.90 metadata: the last 64 KiB-aligned 64 KiB of a device
DATA_BYTES = DISK_BYTES - MD_RESERVED  # what the array mirrors (md's size field)
CHUNK = 1 << 20  # the unit in which the test compares the LUNs
BOOT_TIMEOUT_S = 300.0
RESUME_TIMEOUT_S = 60.0
RESYNC_TIMEOUT_S = 900.0
# LUN 1's writes wait 150-450 ms in vmbusd (a `faulty` wrapper of the file: no fault,
# only latency), so most kills find one taken off the ring and not completed: the
# journal's case. (md keeps little resync I/O in flight: at 10-80 ms 4 kills of 20
# caught a request, at 40-200 ms 6.) LUN 0's reads take the C fast path to the file.
WRITE_LATENCY = '{ dist = "uniform", min_ms = 150, max_ms = 450 }'
UP = "Waiting for root device /dev/vmbt"  # after IP-Config and md's start
APPEND = (
    f"ip={G_ADDR}::{H_ADDR}:255.255.255.0::eth0:off md=0,/dev/sda,/dev/sdb "
    "root=/dev/vmbt rootwait"  # no such root: the guest idles, its md threads at work
)
DONE = "md: md0: resync done."
RERUN = re.compile(r"resumed: (\d+) request\(s\) the last vmbusd had not completed")
MIN_CAUGHT = 5  # of the KILLS, at least this many must find requests in flight
# Console lines that must not appear: the SCSI midlayer's error handling, the block
# layer's I/O errors, md failing a leg or cutting the resync short, a rescinded channel.
BAD = re.compile(
    r"I/O error|critical (medium|target|nexus|space|protection)|Disk failure|"
    r"Operation continuing|resync interrupted|rescind|timing out|abort|FAILED|status: scsi|"
    r"host reset|bus reset|device reset|offline|BUG:|WARNING:|Oops|Call Trace|panic",
    re.IGNORECASE,
)


def md090_superblock(size: int, this: int, set_uuid: bytes, ctime: int) -> bytes:
    """A 0.90 md superblock (include/uapi/linux/raid/md_p.h) for member `this` of a
    two-disk RAID1 whose devices are `size` bytes: both active and in sync, the array
    not clean (state 0, no checkpoint), so md resyncs it from its first member."""
    words = [0] * 1024
    uuid0, uuid1, uuid2, uuid3 = struct.unpack("<4I", set_uuid)
    # magic, version 0.90.0, gvalid_words, uuid0, ctime, level, size (KiB), nr_disks,
    # raid_disks, md_minor, not_persistent, uuid1-3
    words[0:9] = [0xA92B4EFC, 0, 90, 0, 0, uuid0, ctime, 1, (size - MD_RESERVED) // 1024]
    words[9:16] = [2, 2, 0, 0, uuid1, uuid2, uuid3]
    # generic state: utime, state, active, working, failed, spare, csum, events_lo/hi
    words[32:41] = [ctime, 0, 2, 2, 0, 0, 0, 1, 0]
    active_sync = (1 << 1) | (1 << 2)
    for n in (0, 1):  # disks[n]: number, major, minor, raid_disk, state
        words[128 + 32 * n : 128 + 32 * n + 5] = [n, 8, 16 * n, n, active_sync]
    words[992:997] = [this, 8, 16 * this, this, active_sync]  # this_disk
    total = sum(words)
    words[38] = ((total & 0xFFFFFFFF) + (total >> 32)) & 0xFFFFFFFF  # calc_sb_csum
    return struct.pack("<1024I", *words)


def superblock_state(img: Path) -> tuple[int, int, int]:
    """(events, state, recovery_cp) of the 0.90 superblock md keeps on `img`."""
    with open(img, "rb") as f:
        f.seek(DATA_BYTES)
        words = struct.unpack("<1024I", f.read(4096))
    assert words[0] == 0xA92B4EFC, f"{img.name}: no md superblock"
    return words[39] | words[40] << 32, words[33], words[43]


def make_disks(tmp: Path, seed: int) -> tuple[Path, Path]:
    """LUN 0 random bytes (seeded), LUN 1 sparse zeros; each ends in its superblock."""
    rng = random.Random(seed)
    set_uuid, ctime = rng.randbytes(16), int(time.time())
    lun0, lun1 = tmp / "lun0.img", tmp / "lun1.img"
    with open(lun0, "wb") as f:
        for _ in range(DATA_BYTES // CHUNK):
            f.write(rng.randbytes(CHUNK))
        f.write(rng.randbytes(DATA_BYTES % CHUNK))
    for n, img in enumerate((lun0, lun1)):
        with open(img, "r+b" if n == 0 else "wb") as f:
            f.truncate(DISK_BYTES)
            f.seek(DATA_BYTES)
            f.write(md090_superblock(DISK_BYTES, n, set_uuid, ctime))
    return lun0, lun1


def differing(a: Path, b: Path, stop_at_first: bool = False) -> list[tuple[int, int]]:
    """The regions [start, end) of the mirrored data where the two LUNs differ, in
    CHUNK units, merged."""
    out: list[tuple[int, int]] = []
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for off in range(0, DATA_BYTES, CHUNK):
            n = min(CHUNK, DATA_BYTES - off)
            if fa.read(n) != fb.read(n):
                if out and out[-1][1] == off:
                    out[-1] = (out[-1][0], off + n)
                else:
                    out.append((off, off + n))
                if stop_at_first:
                    break
    return out


def _mib(regions: list[tuple[int, int]]) -> str:
    return ", ".join(f"[{s / 2**20:.0f}, {e / 2**20:.0f}) MiB" for s, e in regions)


@contextlib.contextmanager
def bridge_namespace() -> Iterator[str]:
    """A network namespace with br0 (BR_MAC, H_ADDR/24), which the NIC's TAP joins."""
    ns = f"vmbt-kd-{uuid.uuid4().hex[:6]}"
    _run("ip", "netns", "add", ns)
    try:
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "-n", ns, "link", "add", "br0", "address", BR_MAC, "type", "bridge")
        _run("ip", "-n", ns, "addr", "add", f"{H_ADDR}/24", "dev", "br0")
        _run("ip", "-n", ns, "link", "set", "br0", "up")
        yield ns
    finally:
        _run("ip", "netns", "del", ns, check=False)


def _ping(ns: str, tries: int = 3) -> int:
    """Pings until one is answered; how many it took (0: none of `tries`)."""
    for n in range(1, tries + 1):
        r = _run("ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "5", G_ADDR, check=False)
        if r.returncode == 0:
            return n
    return 0


def _wait(cond: object, what: str, timeout: float, kvm: subprocess.Popen[bytes]) -> None:
    assert callable(cond)
    deadline = time.monotonic() + timeout
    while not cond():
        assert kvm.poll() is None, f"the VMM exited ({kvm.returncode}) waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.mark.kvm_linux
@pytest.mark.skipif(not HAS_KVM, reason="/dev/kvm is absent")
@pytest.mark.timeout(2400)
def test_md_resync_across_20_vmbusd_sigkills(tmp_path: Path) -> None:
    """The guest's md resync copies LUN 0 to LUN 1 through storvsc while vmbusd is
    SIGKILLed 20 times (each restart resumes; the guest answers a ping after each);
    then LUN 1 equals LUN 0 byte for byte, both superblocks agree, and the guest
    logged no error, reset, abort or rescind."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root (a network namespace, /dev/net/tun)")
    from vmbus.kvm import kernel as kbuild

    vmlinux = kbuild.build(lambda line: print(f"guest-kernel: {line}", file=sys.stderr)).vmlinux
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    lun0, lun1 = make_disks(tmp_path, seed)
    console, kvm_log = tmp_path / "console.txt", tmp_path / "kvm.log"
    kills: list[tuple[float, int, int]] = []  # (wait before, synced MiB, pings needed)
    with contextlib.ExitStack() as stack:
        ns = stack.enter_context(bridge_namespace())
        d = Vmbusd(tmp_path)
        stack.callback(d.close)
        d.cfg.write_text(
            '[[device]]\ntype = "storvsc"\n'
            f'[[device.lun]]\nlun = 0\nbackend = "file"\npath = "{lun0}"\n'
            f'[[device.lun]]\nlun = 1\nbackend = "faulty"\nwrite_latency = {WRITE_LATENCY}\n'
            f'inner = {{ backend = "file", path = "{lun1}" }}\n'
            f'[[device]]\ntype = "netvsc"\nmac = "{NIC_MAC}"\nmtu = 1500\nqueues = 2\n'
            + tap_backend(ns)
        )
        d.start()
        log_file = stack.enter_context(open(kvm_log, "wb"))
        kvm = subprocess.Popen(
            [
                *(VMBUSD, "kvm", "--connect", str(d.sock), "--kernel", str(vmlinux)),
                *("--cpus", "2", "--console", str(console), "--append", APPEND),
                *("--until", "will not match", "--timeout", "2000"),
                *("--reconnect-timeout", str(RESUME_TIMEOUT_S)),
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

        def stop_kvm() -> None:
            if kvm.poll() is None:
                kvm.send_signal(signal.SIGTERM)
                try:
                    kvm.wait(30)
                except subprocess.TimeoutExpired:
                    kvm.kill()
                    kvm.wait()

        stack.callback(stop_kvm)
        t0 = time.monotonic()
        try:
            _wait(lambda: UP in _text(console), "the guest's boot", BOOT_TIMEOUT_S, kvm)
            booted = time.monotonic() - t0
            _wait(
                lambda: differing(lun0, lun1, stop_at_first=True) != [(0, CHUNK)],
                "the resync's first writes to LUN 1",
                BOOT_TIMEOUT_S,
                kvm,
            )
            assert _ping(ns) == 1, "no answer before the first kill"
            t1 = time.monotonic()
            for i in range(1, KILLS + 1):
                pause = rng.uniform(0.0, 0.8)  # the resync must outlast 20 kills
                time.sleep(pause)
                assert kvm.poll() is None, f"the VMM exited ({kvm.returncode}) before kill {i}"
                synced = differing(lun0, lun1, stop_at_first=True)
                assert synced, f"the resync was over before kill {i}: make the disks bigger"
                d.stop(signal.SIGKILL)
                d.start()
                _wait(lambda i=i: ": resumed: " in d.log(i), f"resume {i}", RESUME_TIMEOUT_S, kvm)
                kills.append((pause, synced[0][0] >> 20, _ping(ns)))
                if BAD.search(_text(console)):
                    break  # the guest saw an error: no use going on (asserted below)
            killing = time.monotonic() - t1

            def over() -> bool:  # md is done (or failed): nothing more will come
                text = _text(console)
                return DONE in text or BAD.search(text) is not None

            def settled() -> bool:  # md then marks both superblocks clean
                (e0, s0, _), (e1, s1, _) = superblock_state(lun0), superblock_state(lun1)
                return e0 == e1 and s0 == s1 == 1  # MD_SB_CLEAN

            with contextlib.suppress(AssertionError):
                _wait(over, "the resync's end", RESYNC_TIMEOUT_S, kvm)
                _wait(settled, "clean superblocks", 60, kvm)
            total = time.monotonic() - t0
        finally:
            out = _text(console)
            stop_kvm()
    served = [d.log(i) for i in range(len(d.logs))]
    vmm = _text(kvm_log)
    why = f"seed {seed}; kills {kills}\n{vmm[-1500:]}\n{out[-3000:]}"
    bad = [line for line in out.splitlines() if BAD.search(line)]
    assert not bad, (bad, why)
    diff = differing(lun0, lun1)
    assert not diff, f"LUN 1 differs from LUN 0 at {_mib(diff)}; {why}"
    assert DONE in out, why
    sbs = [superblock_state(lun0), superblock_state(lun1)]
    assert sbs[0][:2] == sbs[1][:2] and sbs[0][1] == 1, (sbs, why)
    assert "md/raid1:md0: not clean -- starting background reconstruction" in out, why
    assert "md: resync of RAID array md0" in out, why
    # the VMM never gave up or stopped: every kill was a resume, on both sides
    assert len(kills) == KILLS and kvm.returncode == 128 + signal.SIGTERM, (kvm.returncode, why)
    for k in range(1, KILLS + 1):
        assert f"session resumed (reconnect {k})" in vmm, (k, why)
        assert ": resumed: " in served[k], (k, served[k][-2000:])
    assert f"{KILLS} reconnect(s)" in vmm, why
    for i, log in enumerate(served):
        for word in ("Traceback", "channel reset", "refused", "ERROR"):
            assert word not in log, (i, word, log[-3000:])
    assert all(p > 0 for _, _, p in kills), ("a ping after a resume went unanswered", why)
    # requests the killed vmbusd had taken and not completed, run again by the next one
    pending = [sum(map(int, RERUN.findall(log))) for log in served[1:]]
    caught = sum(1 for n in pending if n)
    assert caught >= MIN_CAUGHT, (f"only {caught} kill(s) caught requests in flight", pending)
    synced_at = [s for _, s, _ in kills]
    print(
        f"\nseed {seed}: boot {booted:.0f} s, {KILLS} SIGKILLs in {killing:.0f} s with LUN 1 "
        f"synced to {synced_at} MiB; {caught} kill(s) caught requests in flight {pending}; "
        f"pings needed {[p for _, _, p in kills]}; resync done and checked {total:.0f} s "
        "after the start"
    )
