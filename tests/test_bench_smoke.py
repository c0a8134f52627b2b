"""`vmbusd bench ring` runs end to end and writes the records it promises.

No speed is asserted here (speed is claimed in BENCHMARKS.md, from the real run);
this checks the command works: every size, every implementation, sane records.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vmbus.bench import SIZES

pytestmark = pytest.mark.timeout(240)


def test_bench_ring_writes_every_record(tmp_path: Path) -> None:
    out = tmp_path / "ring.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "vmbus.cli",
            "bench",
            "ring",
            "--seconds",
            "0.05",
            "--json",
            str(out),
            "--plot",
            str(tmp_path / "ring.png"),
        ],
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert r.returncode == 0, r.stderr
    assert "vs socketpair" in r.stdout
    png = (tmp_path / "ring.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    recs = json.loads(out.read_text())
    seen = {(rec["size"], rec["impl"]) for rec in recs}
    assert seen == {(s, i) for s in SIZES for i in ("native", "python", "socketpair", "memcpy")}
    for rec in recs:
        assert rec["packets_per_s"] > 0 and rec["bytes_per_s"] > 0
        assert rec["bytes_per_s"] == pytest.approx(rec["packets_per_s"] * rec["size"])
        if rec["impl"] in ("native", "python"):
            assert rec["wakeups_per_packet"] >= 0
        if rec["impl"] == "socketpair":
            assert rec["wakeups_per_packet"] is None
