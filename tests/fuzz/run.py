"""Run the atheris targets under tests/fuzz/: every target (or the named ones) for N
executions or T seconds each, one after another, from the committed corpus, writing
what libFuzzer finds (crashes, hangs, allocation blow-ups) as crash files. This is
what scripts/fuzz runs; tests/test_fuzz_targets.py uses `run_target` for its bounded
runs.

Each target's new interesting inputs go to <out>/corpus/<target>/ (the committed
corpus tests/fuzz/corpus/<target>/ is read as a second, read-only corpus directory),
so a long run never rewrites the repo; `--grow` writes them into the committed corpus
instead (then review and commit what is worth keeping). Findings land in
<out>/crashes/<target>-crash-<sha1> (or -timeout-, -oom-, -leak-); each run's libFuzzer
log is <out>/<target>.log. The summary line per target is what FUZZING.md records:
executions, cov (coverage edges of vmbus/ and devices/ Python code), ft (features),
corpus size, exec/s, peak RSS, and the finding if any.

    scripts/fuzz [--runs N] [--time SECONDS] [--out DIR] [--grow] [--nice] [target ...]

Run long ones under `nice -n 19`. `VMBUSD_FUZZ_NATIVE` (native/sanitize.sh --fuzz
sets it) selects an ASan+UBSan build of the extension.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent
CORPUS_DIR = FUZZ_DIR / "corpus"
TIMEOUT_S = 10
"""libFuzzer's -timeout: one input running longer than this is a hang, a finding."""


def targets() -> list[str]:
    """Every target: tests/fuzz/fuzz_<name>.py."""
    return sorted(p.stem.removeprefix("fuzz_") for p in FUZZ_DIR.glob("fuzz_*.py"))


@dataclass
class Result:
    target: str
    returncode: int
    executions: int
    cov: int
    ft: int
    corpus: int
    exec_per_s: int
    peak_rss_mb: int
    seconds: float
    finding: str | None
    log: Path

    def line(self) -> str:
        what = self.finding or "no finding"
        rate = round(self.executions / self.seconds) if self.seconds else self.exec_per_s
        return (
            f"{self.target:8} {self.executions:>10,} execs  cov {self.cov:>5}  ft {self.ft:>6}  "
            f"corpus {self.corpus:>5}  {rate:>6,}/s  rss {self.peak_rss_mb:>4} MB  "
            f"{self.seconds:7.0f} s  {what}"
        )


_STATUS = re.compile(
    r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/\S+.*?exec/s: (\d+) rss: (\d+)Mb", re.M
)
_FINDING = re.compile(r"(Test unit written to|ERROR: libFuzzer:|ERROR: AddressSanitizer|"
                      r"runtime error:|Uncaught Python exception)")  # fmt: skip


def run_target(
    target: str,
    out: Path,
    *,
    runs: int | None = None,
    seconds: int | None = None,
    grow: bool = False,
    seed: int | None = None,
    extra: list[str] | None = None,
    nice: bool = False,
) -> Result:
    """Fuzz one target; parse libFuzzer's last status line and any finding."""
    work = out / "corpus" / target
    crashes = out / "crashes"
    work.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    committed = CORPUS_DIR / target
    committed.mkdir(parents=True, exist_ok=True)
    dirs = [str(committed), str(work)] if grow else [str(work), str(committed)]
    args = [
        sys.executable,
        str(FUZZ_DIR / f"fuzz_{target}.py"),
        f"-artifact_prefix={crashes}/{target}-",
        f"-timeout={TIMEOUT_S}",
        "-print_final_stats=1",
        "-max_len=8192",
    ]
    if runs is not None:
        args.append(f"-runs={runs}")
    if seconds is not None:
        args.append(f"-max_total_time={seconds}")
    if seed is not None:
        args.append(f"-seed={seed}")
    args += [*(extra or []), *dirs]
    if nice:
        args = ["nice", "-n", "19", *args]
    log = out / f"{target}.log"
    start = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, check=False)
    took = time.monotonic() - start
    text = log.read_text(errors="replace")
    return parse(target, proc.returncode, text, took, log)


def parse(target: str, rc: int, text: str, took: float, log: Path) -> Result:
    last = None
    for m in _STATUS.finditer(text):
        last = m
    execs = cov = ft = corp = eps = rss = 0
    if last is not None:
        execs, cov, ft, corp, eps, rss = (int(x) for x in last.groups())
    m = re.search(r"stat::number_of_executed_units:\s*(\d+)", text)
    if m:
        execs = int(m.group(1))
    m = re.search(r"stat::peak_rss_mb:\s*(\d+)", text)
    if m:
        rss = int(m.group(1))
    finding = None
    if rc != 0 or _FINDING.search(text):
        hit = _FINDING.search(text)
        art = re.search(r"Test unit written to (\S+)", text)
        finding = (hit.group(0) if hit else f"exit status {rc}") + (
            f" -> {art.group(1)}" if art else ""
        )
    return Result(target, rc, execs, cov, ft, corp, eps, rss, took, finding, log)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/fuzz", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, help="executions per target")
    ap.add_argument("--time", type=int, help="seconds per target (with --runs: whichever first)")
    ap.add_argument("--out", type=Path, help="work dir (default: a new one under /tmp)")
    ap.add_argument("--grow", action="store_true", help="add new inputs to the committed corpus")
    ap.add_argument("--seed", type=int, help="libFuzzer -seed (default: random)")
    ap.add_argument("--nice", action="store_true", help="run each target under nice -n 19")
    ap.add_argument("target", nargs="*", help=f"default: all of {' '.join(targets())}")
    args = ap.parse_args(argv)
    names = args.target or targets()
    unknown = set(names) - set(targets())
    if unknown:
        ap.error(f"no such target: {' '.join(sorted(unknown))}")
    if args.runs is None and args.time is None:
        args.runs = 100_000
    out = args.out or Path(tempfile.mkdtemp(prefix="vmbusd-fuzz-"))
    native = os.environ.get("VMBUSD_FUZZ_NATIVE")
    print(f"scripts/fuzz: {len(names)} target(s), work dir {out}"
          + (f", native extension {native}" if native else ""), flush=True)  # fmt: skip
    failed = 0
    for name in names:
        res = run_target(name, out, runs=args.runs, seconds=args.time, grow=args.grow,
                         seed=args.seed, nice=args.nice)  # fmt: skip
        print(res.line(), flush=True)
        if res.finding:
            failed += 1
            print(f"  log: {res.log}", flush=True)
    print(f"scripts/fuzz: {failed} target(s) with findings" if failed else "scripts/fuzz: clean")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
