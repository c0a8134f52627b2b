"""`vmbusd bench net --quick --json` runs end to end and writes the records it promises.

No speed is asserted (BENCHMARKS.md claims speed, from a real run): every size, queue
count and implementation has a record with the promised fields, all positive, and
the rates agree with each other. Root only (the iperf3 baselines run in namespaces
the benchmark makes); a missing iperf3 is refused before anything runs, naming it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_tool

from vmbus.bench_net import IPERF_MTU, LSO_SIZE, QUEUES, SIZES, _frames_back

pytestmark = pytest.mark.timeout(300)

VMBUSD = [sys.executable, "-m", "vmbus.cli"]
VMBUS_IMPLS = ("native", "python")


def test_bench_net_quick_writes_every_record(tmp_path: Path) -> None:
    require_tool("iperf3", "iperf3")  # the baselines: missing, the test fails naming it
    if os.geteuid() != 0:
        pytest.fail("bench net needs root (network namespaces for iperf3)", pytrace=False)
    out, png = tmp_path / "net.json", tmp_path / "net.png"
    r = subprocess.run(
        [*VMBUSD, "bench", "net", "--quick", "--json", str(out), "--plot", str(png)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr
    assert "vs socketpair" in r.stdout and "targets" in r.stdout
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 10_000
    recs = json.loads(out.read_text())
    want = {(s, q, i) for s in SIZES for q in QUEUES for i in VMBUS_IMPLS}
    want |= {(s, 1, "socketpair") for s in SIZES}
    want |= {(IPERF_MTU, 1, "veth-iperf3"), (IPERF_MTU, 1, "vmbus-iperf3")}
    assert {(rec["size"], rec["queues"], rec["impl"]) for rec in recs} == want
    assert len(recs) == len(want)
    for rec in recs:
        for key in ("packets_per_s", "bits_per_s", "seconds"):
            assert isinstance(rec[key], float | int) and rec[key] > 0, (rec, key)
        if "iperf3" not in rec["impl"]:  # the host process's CPU, counted in 10 ms ticks
            assert rec["host_cpu_us_per_frame"] > 0 and rec["guest_cpu_us_per_frame"] > 0, rec
        wake = rec["wakeups_per_packet"]
        if rec["impl"] in ("socketpair", "veth-iperf3"):
            assert wake is None, rec  # not observable there: absent, not made up
            continue
        assert isinstance(wake, float) and wake >= 0, rec
        if rec["impl"] == "vmbus-iperf3":
            continue
        # the rates agree with the counts: frames back, sends, frame bytes
        back = _frames_back(rec["size"])
        assert rec["frames"] % back == 0, rec
        sends = rec["frames"] // back
        assert rec["packets_per_s"] == pytest.approx(sends / rec["seconds"], rel=1e-9)
        assert rec["bits_per_s"] == pytest.approx(rec["packets_per_s"] * rec["size"] * 8)
        counted = rec["host_wakeups"] + rec["guest_wakeups"]
        assert wake == pytest.approx(counted / rec["frames"]), rec
        # the host sleeps between points, so each point's first send must wake it
        assert rec["guest_signals"] > 0 and rec["host_signals"] >= 0, rec
        if rec["size"] == LSO_SIZE:  # every segment back, whole (MSS-sized but the last)
            assert rec["bytes_back"] == rec["frames"] * 54 + sends * (LSO_SIZE - 54), rec
        else:
            assert rec["bytes_back"] == rec["frames"] * rec["size"], rec
            assert 1 <= rec["frames_per_vmbus_packet"] <= 8, rec


def test_bench_net_missing_iperf3_fails_naming_it(tmp_path: Path) -> None:
    """No iperf3 on PATH: one line naming it and the package, exit 2, nothing run."""
    env = dict(os.environ, PATH=str(tmp_path))  # an empty directory: no iperf3 there
    r = subprocess.run(
        [*VMBUSD, "bench", "net", "--quick", "--json", str(tmp_path / "n.json")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert r.returncode == 2, r.stderr
    assert "iperf3" in r.stderr and "apt-get install iperf3" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "n.json").exists()


def test_bench_net_refuses_bad_seconds() -> None:
    r = subprocess.run(
        [*VMBUSD, "bench", "net", "--seconds", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert "seconds" in r.stderr
