"""`vmbusd bench disk --quick --json` runs end to end and writes the records it promises.

No speed is asserted (BENCHMARKS.md claims speed, from a real run): every backend,
workload and implementation has a record with the promised fields, all positive.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_tool

from vmbus.bench_disk import BACKENDS, WORKLOADS

pytestmark = pytest.mark.timeout(240)

FIELDS = ("iops", "bytes_per_s", "lat_p50_us", "lat_p99_us")


def test_bench_disk_quick_writes_every_record(tmp_path: Path) -> None:
    require_tool("fio", "fio")  # the baseline: missing, the test fails naming it
    out = tmp_path / "disk.json"
    r = subprocess.run(
        [
            *(sys.executable, "-m", "vmbus.cli", "bench", "disk", "--quick"),
            *("--json", str(out), "--plot", str(tmp_path / "disk.png")),
        ],
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert r.returncode == 0, r.stderr
    assert "vs fio" in r.stdout
    png = (tmp_path / "disk.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    recs = json.loads(out.read_text())
    want = {(b, w.name, i) for b in BACKENDS for w in WORKLOADS for i in ("native", "python")}
    want |= {("file", w.name, "fio") for w in WORKLOADS}
    assert {(rec["backend"], rec["workload"], rec["impl"]) for rec in recs} == want
    assert len(recs) == len(want)
    for rec in recs:
        for key in FIELDS:
            assert isinstance(rec[key], float | int) and rec[key] > 0, (rec, key)
        assert rec["lat_p99_us"] >= rec["lat_p50_us"]
        block = 4096 if "-4k-" in rec["workload"] else 131072
        assert rec["bytes_per_s"] == pytest.approx(rec["iops"] * block, rel=1e-6)
        if rec["impl"] != "fio":  # the simulated guest says what its requests cost it
            assert rec["guest_cpu_us_per_io"] > 0 and rec["ios"] > 0, rec
            assert rec["guest_busy_us_per_io"] > 0, rec


def test_bench_disk_refuses_bad_seconds() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "vmbus.cli", "bench", "disk", "--seconds", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert "seconds" in r.stderr
