"""Every atheris target under tests/fuzz/, as CI runs them (issue 11, part 2).

Per target: every committed corpus file (seeds recorded from real traffic and the
inputs of fixed findings, `regress-*`) through `check_one` in this process, so a
regression fails with its traceback; then the target under atheris/libFuzzer for a
bounded number of executions from that corpus (VMBUSD_FUZZ_RUNS, default 10 000 each:
about 45 s of CPU for all eleven), which must end without a finding.
Long runs: scripts/fuzz; their record: FUZZING.md.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

HERE = Path(__file__).resolve().parent
FUZZ = HERE / "fuzz"
sys.path.insert(0, str(FUZZ))

import harness  # noqa: E402
import run  # noqa: E402

TARGETS = run.targets()
FUZZ_RUNS = int(os.environ.get("VMBUSD_FUZZ_RUNS", "10000"))


def load(target: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"fuzz_{target}", FUZZ / f"fuzz_{target}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_target_has_a_corpus() -> None:
    """Each target is seeded (record_seeds.py) and run by scripts/fuzz."""
    assert set(TARGETS) >= {"attach", "control", "gpadl", "hyperv", "journal", "nbd", "nvsp",
                            "packet", "ring", "rndis", "scsi", "vstor"}  # fmt: skip
    for target in TARGETS:
        assert harness.corpus_files(target), f"tests/fuzz/corpus/{target}/ is empty"


@pytest.mark.parametrize("target", TARGETS)
def test_corpus_replays_clean(target: str) -> None:
    """The seeds and every fixed finding's input hold the target's contract."""
    mod = load(target)
    for path in harness.corpus_files(target):
        try:
            mod.check_one(path.read_bytes())
        except Exception as exc:
            raise AssertionError(f"{path.relative_to(HERE.parent)}: {exc!r}") from exc


REGRESSIONS = [
    pytest.param(t, f, id=f"{t}/{f.name}")
    for t in TARGETS
    for f in harness.corpus_files(t)
    if f.name.startswith("regress-")
]


@pytest.mark.parametrize(("target", "path"), REGRESSIONS)
def test_fixed_finding(target: str, path: Path) -> None:
    """Each fixed finding by name: its input (kept in the corpus) holds the contract.
    nbd/regress-direct-read-error-not-broken: a structured READ reply ending without
    covering the request, met on the zero-copy path, must leave the connection broken.
    journal/regress-completing-span-unreadable: a COMPLETING group whose completions
    cannot be read back from our ring (a write_index the guest misaligned) counts as
    published, not completed a second time."""
    load(target).check_one(path.read_bytes())


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_bounded(target: str, tmp_path: Path) -> None:
    """FUZZ_RUNS coverage-guided executions from the corpus: no crash, hang, uncaught
    exception or RSS past the limit (libFuzzer's -rss_limit_mb)."""
    res = run.run_target(target, tmp_path, runs=FUZZ_RUNS, seed=1)
    print(res.line())
    assert res.finding is None, f"{res.finding}\n{res.log.read_text()[-4000:]}"
    assert res.returncode == 0
    assert res.executions >= FUZZ_RUNS
    assert res.cov > 0 and res.ft > 0
