"""The `faulty` disk backend under the real SCSI disk emulation: each fault kind with
exact, seeded counts, the sense each one maps to, latency and stalls on trio's mock
clock, a power cut tearing in-flight writes, and one-line config errors."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.testing
from conftest import attached_vm, require_tool
from disk_model import CHECK_CONDITION, GOOD, read10, scsi, sense_key_asc, write10
from prometheus_client.parser import text_string_to_metric_families
from test_cli import running, vmbusd

from devices.storvsc.backends.faulty import FaultConfigError, FaultyBackend
from devices.storvsc.backends.memory import MemoryBackend
from devices.storvsc.protocol import SCSI_IF_TYPE, DataIn, SrbReply
from devices.storvsc.scsi import ScsiController
from devices.storvsc.vsc import StorvscHba, attach_storvsc
from devices.storvsc.vsp import ConfigError, build_lun
from vmbus.config import load_devices

BS = 512
VMBUSD = str(Path(sys.executable).with_name("vmbusd"))
BLOCKS = 2048
MEDIUM_READ, MEDIUM_WRITE = (0x3, 0x11, 0x00), (0x3, 0x0C, 0x00)
NOT_READY = (0x2, 0x04, 0x00)


def faulty(**keys: object) -> tuple[ScsiController, FaultyBackend]:
    backend = FaultyBackend(inner={"backend": "memory", "size": BLOCKS * BS}, **keys)  # type: ignore[arg-type]
    ctrl = ScsiController()
    ctrl.add_lun(0, backend)
    return ctrl, backend


def pattern(tag: int, blocks: int) -> bytes:
    return bytes([tag & 0xFF]) * (blocks * BS)


async def test_read_fail_next_gives_exactly_n_medium_errors_with_the_lba() -> None:
    ctrl, b = faulty(read_fail_next=3)
    seen = []
    for _ in range(6):
        res, _ = await scsi(ctrl, read10(40, 4), data_in_len=4 * BS)
        seen.append(res.status)
        if res.status == CHECK_CONDITION:
            assert sense_key_asc(res) == MEDIUM_READ
            assert res.sense[0] == 0xF0 and res.sense[3:7] == (40).to_bytes(4, "big")
    assert seen == [CHECK_CONDITION] * 3 + [GOOD] * 3
    assert b.counters["read_error"] == 3 and b.ops["read"].fail_next == 0
    assert sum(b.counters.values()) == 3


@pytest.mark.parametrize(
    ("sense", "want"),
    [
        ("medium", MEDIUM_WRITE),
        ("not_ready", NOT_READY),
        ("hardware", (0x4, 0x44, 0x00)),
        ("aborted", (0xB, 0x00, 0x00)),
    ],
)
async def test_each_sense_name_maps_to_its_sense(sense: str, want: tuple[int, int, int]) -> None:
    ctrl, b = faulty(write_fail_next=1, write_sense=sense, flush_fail_next=1, flush_sense=sense)
    res, _ = await scsi(ctrl, write10(1, 1), data_out=pattern(1, 1))
    assert sense_key_asc(res) == want
    res, _ = await scsi(ctrl, bytes([0x35] + [0] * 9))  # SYNCHRONIZE CACHE (10)
    assert sense_key_asc(res) == want
    assert b.counters["write_error"] == 1 and b.counters["flush_error"] == 1
    res, _ = await scsi(ctrl, write10(1, 1), data_out=pattern(1, 1))
    assert res.status == GOOD


def _expected_failures(seed: int, op: str, rate: float, n: int) -> list[int]:
    """The draws the backend makes: its stream for `op` is Random(f"{seed}/{op}")."""
    rng = random.Random(f"{seed}/{op}")
    return [i for i in range(n) if rng.random() < rate]


async def test_error_rate_is_seeded_and_exact() -> None:
    n, rate = 400, 0.05
    runs = []
    for seed in (7, 7, 8):
        ctrl, b = faulty(seed=seed, read_error_rate=rate)
        failed = []
        for i in range(n):
            res, _ = await scsi(ctrl, read10(i, 1), data_in_len=BS)
            if res.status != GOOD:
                assert sense_key_asc(res) == MEDIUM_READ
                failed.append(i)
        assert failed == _expected_failures(seed, "read", rate, n)
        assert b.counters["read_error"] == len(failed) > 0
        runs.append(failed)
    assert runs[0] == runs[1] != runs[2]


async def test_lba_range_limits_where_errors_land() -> None:
    ctrl, b = faulty(read_fail_next=2, lba_range=[100, 110])
    for lba in (0, 90, 110, 500):  # outside: no error, fail_next not used up
        res, _ = await scsi(ctrl, read10(lba, 8), data_in_len=8 * BS)
        assert res.status == GOOD
    res, _ = await scsi(ctrl, read10(96, 8), data_in_len=8 * BS)  # 96..103 touches it
    assert sense_key_asc(res) == MEDIUM_READ
    res, _ = await scsi(ctrl, read10(109, 1), data_in_len=BS)
    assert sense_key_asc(res) == MEDIUM_READ
    res, _ = await scsi(ctrl, read10(105, 1), data_in_len=BS)
    assert res.status == GOOD
    assert b.counters["read_error"] == 2


async def test_fail_after_writes_wears_the_disk_out() -> None:
    ctrl, b = faulty(fail_after_writes=5)
    statuses = []
    for i in range(9):
        res, _ = await scsi(ctrl, write10(i, 1), data_out=pattern(i + 1, 1))
        statuses.append(res.status)
    assert statuses == [GOOD] * 5 + [CHECK_CONDITION] * 4
    assert b.counters["write_limit"] == 4
    res, data = await scsi(ctrl, read10(0, 9), data_in_len=9 * BS)  # reads still work
    assert data == b"".join(pattern(i + 1, 1) for i in range(5)) + bytes(4 * BS)


async def test_latency_distributions(autojump_clock: trio.testing.MockClock) -> None:
    ctrl, b = faulty(read_latency=10, write_latency={"dist": "uniform", "min_ms": 2, "max_ms": 4})
    t0 = trio.current_time()
    await scsi(ctrl, read10(0, 1), data_in_len=BS)
    assert trio.current_time() - t0 == pytest.approx(0.010)
    for _ in range(20):
        t0 = trio.current_time()
        await scsi(ctrl, write10(0, 1), data_out=pattern(1, 1))
        assert 0.002 <= trio.current_time() - t0 <= 0.004
    assert b.counters["delayed"] == 21
    for lat in (
        {"dist": "exponential", "mean_ms": 50, "cap_ms": 60},
        {"dist": "normal", "mean_ms": 50, "stddev_ms": 30, "cap_ms": 60},
    ):
        b.configure(read_latency=lat)
        took = []
        for _ in range(200):
            t0 = trio.current_time()
            await scsi(ctrl, read10(0, 1), data_in_len=BS)
            took.append(trio.current_time() - t0)
        assert max(took) == pytest.approx(0.060)  # the cap is hit, never passed
        assert min(took) < 0.040


async def test_stall_until_cleared_and_for_n_seconds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ctrl, b = faulty()
    b.configure(stall="forever")
    done = trio.Event()

    async def read() -> None:
        res, _ = await scsi(ctrl, read10(0, 1), data_in_len=BS)
        assert res.status == GOOD
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.sleep(1000)
        assert not done.is_set()
        b.configure(stall="off")
        await done.wait()
    assert b.counters["stalled"] == 1
    b.configure(stall=2.5)
    t0 = trio.current_time()
    await scsi(ctrl, read10(0, 1), data_in_len=BS)
    await scsi(ctrl, read10(0, 1), data_in_len=BS)
    assert trio.current_time() - t0 == pytest.approx(2.5)
    assert b.counters["stalled"] == 2  # the second read came after the stall ended


async def test_power_cut_tears_in_flight_writes_and_keeps_acknowledged_ones(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ctrl, b = faulty(seed=3, write_latency=10)
    inner = b.inner
    assert isinstance(inner, MemoryBackend)
    for i in range(4):  # acknowledged before the cut
        res, _ = await scsi(ctrl, write10(i * 16, 16), data_out=pattern(0x10 + i, 16))
        assert res.status == GOOD
    results: dict[int, int] = {}

    async def write(i: int) -> None:
        res, _ = await scsi(ctrl, write10(i * 16, 16), data_out=pattern(0x80 + i, 16))
        results[i] = res.status
        if res.status != GOOD:
            assert sense_key_asc(res) == NOT_READY

    async with trio.open_nursery() as nursery:
        for i in range(2, 10):  # two of them overwrite acknowledged blocks
            nursery.start_soon(write, i)
        await trio.sleep(0.005)
        b.configure(power="cut")
    assert results == dict.fromkeys(range(2, 10), CHECK_CONDITION)
    assert b.counters["torn_write"] == 8 and b.counters["power_cut"] == 1
    res, _ = await scsi(ctrl, read10(0, 1), data_in_len=BS)
    assert sense_key_asc(res) == NOT_READY and b.counters["power_off"] == 1
    b.configure(power="restore")
    res, data = await scsi(ctrl, read10(0, 160), data_in_len=160 * BS)
    assert res.status == GOOD
    assert data[: 32 * BS] == pattern(0x10, 16) + pattern(0x11, 16)  # acknowledged: intact
    kept = []
    for i in range(2, 10):  # each in-flight write: a seeded prefix of its sectors landed
        keep = random.Random(f"3/torn/1/{i * 16 * BS}").randint(0, 16)
        kept.append(keep)
        old = pattern(0x10 + i, 16) if i < 4 else bytes(16 * BS)
        want = pattern(0x80 + i, keep) + old[keep * BS :]
        assert data[i * 16 * BS : (i + 1) * 16 * BS] == want, i
    assert 0 < sum(kept) < 8 * 16  # torn, not all-or-nothing, with this seed


async def test_volatile_cache_power_cut_keeps_only_what_was_made_durable() -> None:
    """WCE=1: after a cut the disk holds the last flush plus later FUA writes."""
    ctrl, b = faulty(volatile_cache=True)
    assert b.write_back
    res, _ = await scsi(ctrl, write10(0, 8), data_out=pattern(1, 8))  # A, then flushed
    assert res.status == GOOD
    res, _ = await scsi(ctrl, bytes([0x35] + [0] * 9))
    assert res.status == GOOD
    for cdb, data in (
        (write10(4, 8), pattern(2, 8)),  # B, over half of A
        (write10(20, 4), pattern(3, 4)),  # C
        (write10(30, 2, flags=0x08), pattern(4, 2)),  # D, FUA
    ):
        res, _ = await scsi(ctrl, cdb, data_out=data)
        assert res.status == GOOD
    res, data = await scsi(ctrl, read10(0, 32), data_in_len=32 * BS)
    assert data[4 * BS : 12 * BS] == pattern(2, 8)  # the cache serves reads meanwhile
    b.power_cut()
    b.power_restore()
    res, data = await scsi(ctrl, read10(0, 32), data_in_len=32 * BS)
    assert res.status == GOOD
    want = pattern(1, 8) + bytes(12 * BS) + bytes(4 * BS) + bytes(6 * BS) + pattern(4, 2)
    assert data == want
    assert b.counters["cache_lost"] == 8 + 4  # B's sectors (4 back to A, 4 to zeros), C's
    assert b.counters["power_cut"] == 1


def test_config_errors_are_one_line_naming_the_key() -> None:
    good = {"backend": "faulty", "inner": {"backend": "memory", "size": "1M"}}
    _lun, backend, _ = build_lun(0, good, None)
    assert isinstance(backend, FaultyBackend) and backend.capacity == 1 << 20
    bad = [
        ({"read_eror_rate": 0.1}, "read_eror_rate"),
        ({"read_error_rate": 1.5}, "read_error_rate must be a number 0..1"),
        ({"write_sense": "smoke"}, "write_sense must be one of medium, not_ready"),
        ({"read_latency": {"dist": "pareto"}}, "read_latency.dist must be one of"),
        ({"read_latency": {"dist": "uniform", "mean_ms": 3}}, "read_latency.mean_ms"),
        ({"lba_range": [5, 2]}, "lba_range end 2"),
        ({"stall": -1}, "stall must be seconds"),
        ({"inner": {"backend": "memory"}}, "inner (memory)"),
        ({"inner": {"backend": "faulty"}}, "faulty disk inside a faulty disk"),
        ({"inner": None}, "inner is required"),
    ]
    for extra, needle in bad:
        with pytest.raises(ConfigError) as exc:
            build_lun(0, {**good, **extra}, None)
        msg = str(exc.value)
        assert needle in msg and "\n" not in msg, (extra, msg)


def test_configure_applies_nothing_when_one_key_is_bad() -> None:
    b = FaultyBackend(inner={"backend": "memory", "size": "1M"})
    with pytest.raises(FaultConfigError, match="read_sense"):
        b.configure(read_error_rate=0.5, read_sense="bogus")
    assert b.ops["read"].error_rate == 0.0
    assert b.configure(read_error_rate=0.5, power="cut") == ["read_error_rate=0.5", "power=cut"]
    assert not b.powered


def test_toml_config_builds_a_faulty_lun(tmp_path: Path) -> None:
    cfg = tmp_path / "vm.toml"
    cfg.write_text(
        '[[device]]\ntype = "storvsc"\n[[device.lun]]\nbackend = "faulty"\n'
        'inner = { backend = "memory", size = "64M" }\nread_error_rate = 0.01\n'
        'write_latency = { dist = "exponential", mean_ms = 2, cap_ms = 20 }\n'
    )
    (dev,) = load_devices(str(cfg))
    (backend,) = dev._backends  # type: ignore[attr-defined]  # attached when the channel opens
    assert isinstance(backend, FaultyBackend) and backend.capacity == 64 << 20
    assert backend.ops["read"].error_rate == 0.01


# ---- the simulated guest against a real `vmbusd serve` ----------------------------

E2E_CONFIG = """
[vm.f1]
[[vm.f1.device]]
type = "storvsc"
[[vm.f1.device.lun]]
backend = "faulty"
seed = 11
inner = { backend = "memory", size = "4M" }
[[vm.f1.device.lun]]
lun = 1
backend = "memory"
size = "1M"
"""


async def _ctl(*args: str) -> tuple[int, str, str]:
    r = await trio.run_process(
        [VMBUSD, "ctl", *args], capture_stdout=True, capture_stderr=True, check=False
    )
    return r.returncode, r.stdout.decode(), r.stderr.decode()


def _sense(reply: SrbReply) -> tuple[int, int, int]:
    assert reply.scsi_status == CHECK_CONDITION and len(reply.sense) >= 14, reply
    return reply.sense[2] & 0x0F, reply.sense[12], reply.sense[13]


async def _read(hba: StorvscHba, lba: int, n: int) -> tuple[SrbReply, bytes]:
    cdb = bytes([0x88, 0]) + lba.to_bytes(8, "big") + n.to_bytes(4, "big") + b"\0\0"
    return await hba.execute(cdb, lun=0, data_in=DataIn.READ, length=n * BS)


async def _write(hba: StorvscHba, lba: int, data: bytes) -> SrbReply:
    n = len(data) // BS
    cdb = bytes([0x8A, 0]) + lba.to_bytes(8, "big") + n.to_bytes(4, "big") + b"\0\0"
    reply, _ = await hba.execute(cdb, lun=0, data_in=DataIn.WRITE, data=data)
    return reply


def _prometheus_faults(stats_sock: str, vm_name: str = "f1") -> dict[str, float]:
    text = vmbusd("stats", stats_sock, "--prometheus").stdout
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "vmbusd_disk_faults":
            for s in fam.samples:
                if s.labels["vm"] == vm_name and s.labels["lun"] == "0":
                    out[s.labels["kind"]] = s.value
    return out


@pytest.mark.timeout(120)
async def test_simulated_guest_sees_exactly_the_injected_faults(tmp_path: Path) -> None:
    cfg = tmp_path / "vmbusd.toml"
    cfg.write_text(E2E_CONFIG)
    sock, ctl, st = (str(tmp_path / n) for n in ("s.sock", "ctl.sock", "stats.sock"))
    args = ["serve", "--listen", sock, "--config", str(cfg), "--control", ctl, "--stats", st]
    with running(args, tmp_path / "serve.log") as serve:
        serve.wait_for("control on")
        async with attached_vm(sock, vm_id="f1") as vm:
            (offer,) = [o for o in vm.find_offers(SCSI_IF_TYPE) if o.sub_channel_index == 0]
            async with attach_storvsc(vm, offer) as hba:
                assert sorted(hba.disks) == [0, 1]
                data = bytes(range(256)) * 32  # 16 blocks
                assert (await _write(hba, 64, data)).scsi_status == GOOD

                rc, out, err = await _ctl(ctl, "disk", "fault", "--vm", "f1", "--lun", "0",
                                          "read_fail_next=5")  # fmt: skip
                assert rc == 0 and "read_fail_next=5" in out, err
                statuses = []
                for _ in range(10):
                    reply, got = await _read(hba, 64, 16)
                    if reply.scsi_status == GOOD:
                        assert got == data
                    else:  # MEDIUM ERROR, UNRECOVERED READ ERROR, the LBA in INFORMATION
                        assert _sense(reply) == (0x3, 0x11, 0x00)
                        assert reply.sense[0] & 0x80 and reply.sense[3:7] == (64).to_bytes(4, "big")
                    statuses.append(reply.scsi_status)
                assert statuses == [CHECK_CONDITION] * 5 + [GOOD] * 5

                rc, out, err = await _ctl(ctl, "disk", "fault", "--vm", "f1", "--lun", "0",
                                          "read_sense=not_ready", "read_fail_next=2")  # fmt: skip
                assert rc == 0, err
                senses = [_sense(r) for r, _ in [await _read(hba, 0, 1), await _read(hba, 0, 1)]]
                assert senses == [(0x2, 0x04, 0x00)] * 2
                assert (await _read(hba, 0, 1))[0].scsi_status == GOOD

                rate, n = 0.1, 200  # seeded: the failures are the stream's draws
                rc, out, err = await _ctl(ctl, "disk", "fault", "--vm", "f1", "--lun", "0",
                                          "seed=4", f"write_error_rate={rate}")  # fmt: skip
                assert rc == 0, err
                failed = []
                for i in range(n):
                    reply = await _write(hba, 1000 + i, bytes([i]) * BS)
                    if reply.scsi_status != GOOD:
                        assert _sense(reply) == (0x3, 0x0C, 0x00)
                        failed.append(i)
                assert failed == _expected_failures(4, "write", rate, n)

                # LUN 1 (memory) never saw a fault
                await hba.write(1, 0, data)
                assert await hba.read(1, 0, 16) == data

                faults = _prometheus_faults(st)
                assert faults["read_error"] == 7 and faults["write_error"] == len(failed)
                assert faults["torn_write"] == 0

                # mistakes: one line, exit 2
                fault = [ctl, "disk", "fault", "--vm", "f1", "--lun"]
                cases = [
                    (["1", "read_error_rate=0.1"], "not a faulty disk"),
                    (["0", "read_eror_rate=0.1"], "unknown fault setting 'read_eror_rate'"),
                    (["0", "read_error_rate=2"], "read_error_rate must be a number 0..1"),
                    (["0", "power=off"], 'power must be "cut" or "restore"'),
                    (["0", "read_error_rate"], "KEY=VALUE"),
                    (["7", "seed=1"], "no LUN 7"),
                ]
                for extra, needle in cases:
                    rc, out, err = await _ctl(*fault, *extra)
                    assert rc == 2 and len(err.splitlines()) == 1 and needle in err, (extra, err)
                assert all(q.errors == [] for q in hba.queues)
        assert serve.stop() == 0
    assert "Traceback" not in serve.text()


@pytest.mark.timeout(120)
async def test_power_cut_only_acknowledged_writes_survive(tmp_path: Path) -> None:
    cfg = tmp_path / "vmbusd.toml"
    cfg.write_text(E2E_CONFIG)
    sock, ctl = str(tmp_path / "s.sock"), str(tmp_path / "ctl.sock")
    args = ["serve", "--listen", sock, "--config", str(cfg), "--control", ctl]
    blocks = 16  # per write
    with running(args, tmp_path / "serve.log") as serve:
        serve.wait_for("control on")
        async with attached_vm(sock, vm_id="f1") as vm:
            (offer,) = [o for o in vm.find_offers(SCSI_IF_TYPE) if o.sub_channel_index == 0]
            async with attach_storvsc(vm, offer) as hba:
                acked: dict[int, bytes] = {}
                for i in range(8):  # acknowledged before the cut
                    acked[i] = pattern(0x10 + i, blocks)
                    assert (await _write(hba, i * blocks, acked[i])).scsi_status == GOOD
                rc, _, err = await _ctl(ctl, "disk", "fault", "--vm", "f1", "--lun", "0",
                                        "write_latency=3000")  # fmt: skip
                assert rc == 0, err
                replies: dict[int, SrbReply] = {}

                async def write(i: int) -> None:
                    replies[i] = await _write(hba, i * blocks, pattern(0x80 + i, blocks))

                async with trio.open_nursery() as nursery:
                    for i in range(4, 12):  # 4..7 overwrite acknowledged blocks
                        nursery.start_soon(write, i)
                    await trio.sleep(0.5)  # all eight are waiting out their latency
                    rc, out, err = await _ctl(ctl, "disk", "fault", "--vm", "f1", "--lun", "0",
                                              "power=cut")  # fmt: skip
                    assert rc == 0, err
                assert sorted(replies) == list(range(4, 12))
                assert all(_sense(r) == (0x2, 0x04, 0x00) for r in replies.values())
                assert _sense((await _read(hba, 0, 1))[0]) == (0x2, 0x04, 0x00)  # still off
                rc, out, err = await _ctl(ctl, "disk", "fault", "--vm", "f1", "--lun", "0",
                                          "power=restore", "write_latency=0")  # fmt: skip
                assert rc == 0 and "torn_write 8" in out and "power_off 1" in out, out
                reply, disk = await _read(hba, 0, 12 * blocks)
                assert reply.scsi_status == GOOD
                size = blocks * BS
                for i in range(4):  # acknowledged and untouched since: intact
                    assert disk[i * size : (i + 1) * size] == acked[i]
                for i in range(4, 12):  # in flight: a prefix of its sectors, seeded
                    keep = random.Random(f"11/torn/1/{i * size}").randint(0, blocks)
                    old = acked[i] if i in acked else bytes(size)
                    want = pattern(0x80 + i, keep) + old[keep * BS :]
                    assert disk[i * size : (i + 1) * size] == want, i
        assert serve.stop() == 0


@pytest.mark.timeout(120)
def test_qemu_io_through_vmbusd_vm_sees_exactly_the_injected_errors(tmp_path: Path) -> None:
    """`vmbusd serve` and `vmbusd vm --export-nbd` as real processes: qemu-io reads and
    writes the guest's view of a faulty LUN over NBD; after `disk fault
    read_fail_next=3 write_fail_next=2` (on LBAs 800..807 only) exactly three reads
    and two writes fail with EIO (the guest's CHECK CONDITION, as the export maps it),
    the rest pass their pattern checks, and the metrics count 3 and 2."""
    qemu_io = require_tool("qemu-io", "qemu-utils")
    cfg = tmp_path / "vmbusd.toml"
    cfg.write_text(
        '[[device]]\ntype = "storvsc"\n[[device.lun]]\nbackend = "faulty"\n'
        'inner = { backend = "memory", size = "4M" }\n'
    )
    sock, ctl, st = tmp_path / "s.sock", tmp_path / "ctl.sock", tmp_path / "st.sock"
    exports = tmp_path / "exports"
    exports.mkdir()
    uri = f"nbd+unix:///?socket={exports}/storvsc0-lun0.sock"
    off = 800 * BS
    serve_args = ["serve", "--listen", str(sock), "--config", str(cfg)]
    serve_args += ["--control", str(ctl), "--stats", str(st)]
    with running(serve_args, tmp_path / "serve.log") as serve:
        serve.wait_for("control on")
        vm_args = ["vm", "--connect", str(sock), "--export-nbd", str(exports)]
        with running(vm_args, tmp_path / "vm.log") as vm:
            vm.wait_for("NBD exports in")
            r = vmbusd("ctl", str(ctl), "disk", "fault", "--vm", "sim", "--lun", "0",
                       "lba_range=[800, 808]", "read_fail_next=3", "write_fail_next=2")  # fmt: skip
            assert r.returncode == 0, r.stderr
            cmds = ["-c", f"write -P 0 {off} 4096"] * 2 + ["-c", f"write -P 0x5a {off} 4096"]
            cmds += ["-c", f"read -P 0x5a {off} 4096"] * 5 + ["-c", "read -P 0 0 4096"]
            out = subprocess.run(
                [qemu_io, "-f", "raw", *cmds, uri], capture_output=True, text=True, timeout=60
            )
            text = out.stdout + out.stderr
            assert text.count("write failed: Input/output error") == 2, text
            assert text.count("read failed: Input/output error") == 3, text
            assert text.count("wrote 4096/4096 bytes") == 1, text
            assert text.count("read 4096/4096 bytes") == 3, text  # 2 at 800, 1 at 0
            assert "Pattern verification failed" not in text, text
            faults = _prometheus_faults(str(st), vm_name="sim")
            assert faults["read_error"] == 3 and faults["write_error"] == 2, faults
            assert vm.stop() == 0, vm.text()
        assert serve.stop() == 0
    assert "Traceback" not in serve.text() + vm.text()


def test_a_dropped_device_releases_the_file_inside_a_faulty_lun(tmp_path: Path) -> None:
    """`vmbusd serve` builds a device set only to check the config and drops it: the
    file descriptor of a file LUN wrapped by `faulty` is released with it, as a bare
    file LUN's is (the VSP's finalizer looks inside wrappers)."""
    import gc

    from devices.storvsc.vsp import StorvscDevice

    image = tmp_path / "d.img"
    image.write_bytes(bytes(1 << 20))
    gc.collect()  # earlier tests' garbage must not close its fds in the middle
    before = len(os.listdir("/proc/self/fd"))
    dev = StorvscDevice(
        lun=[{"backend": "faulty", "inner": {"backend": "file", "path": str(image)}}]
    )
    assert len(os.listdir("/proc/self/fd")) == before + 1  # the file is open
    del dev
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before
