"""What every atheris target under tests/fuzz/ shares: import paths, instrumentation of
vmbusd's own packages only, the sanitized native build, the allocation bound, and
the libFuzzer entry point.

Each target is `fuzz_<name>.py` with a `check_one(data: bytes) -> None` that states
the parser's contract (only its documented exceptions, bounded results, native ==
twin where both exist) and `main = harness.main_for(check_one)`. scripts/fuzz runs
them; tests/test_fuzz_targets.py runs each for a bounded number of executions and
replays every corpus file through `check_one`.

Instrumenting only `vmbus` and `devices` (atheris.instrument_imports) instead of
`instrument_all` keeps a target's start-up under a second instead of ~14 s, and keeps
`cov:` about our code, not the standard library's.

VMBUSD_FUZZ_NATIVE=<path to a built _native*.so> loads that extension as
`vmbus._native` instead of the installed one: native/sanitize.sh --fuzz builds one
with -fsanitize=address,undefined and runs scripts/fuzz with it (libasan preloaded).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import resource
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

FUZZ_DIR = Path(__file__).resolve().parent
TESTS_DIR = FUZZ_DIR.parent
ROOT = TESTS_DIR.parent
CORPUS_DIR = FUZZ_DIR / "corpus"

for _p in (str(ROOT), str(TESTS_DIR), str(FUZZ_DIR)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

ADDRESS_SPACE_LIMIT = 6 << 30
"""RLIMIT_AS a fuzzing process gets (outside ASan, whose shadow needs terabytes of
address space): an allocation sized from a hostile length field fails with
MemoryError, which is an uncaught exception, which is a finding."""

RSS_LIMIT_MB = 1024
"""libFuzzer's -rss_limit_mb for scripts/fuzz and the tests: a target whose resident
set grows past it is a finding (leak or unbounded growth across inputs)."""


def _load_native_override() -> None:
    path = os.environ.get("VMBUSD_FUZZ_NATIVE")
    if not path or "vmbus._native" in sys.modules:
        return
    import vmbus  # the package only (its __init__ imports nothing)

    spec = importlib.util.spec_from_file_location("vmbus._native", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"VMBUSD_FUZZ_NATIVE={path}: not an extension module")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules["vmbus._native"] = mod
    vmbus._native = mod  # type: ignore[attr-defined]


_load_native_override()


@contextlib.contextmanager
def instrumented() -> Iterator[None]:
    """Import the parsers inside this block: atheris instruments vmbus.* and devices.*
    as they load (a no-op for modules already imported, as under pytest)."""
    try:
        import atheris  # type: ignore[import-untyped]
    except ImportError:  # plain property-test use without atheris installed
        yield
        return
    with atheris.instrument_imports(include=["vmbus", "devices"]):
        yield


def native_override() -> str | None:
    """The sanitized extension in use, if any (scripts/fuzz prints it)."""
    return os.environ.get("VMBUSD_FUZZ_NATIVE") or None


def _limit_address_space() -> None:
    if "libasan" in os.environ.get("LD_PRELOAD", "") or native_override():
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    want = ADDRESS_SPACE_LIMIT if hard == resource.RLIM_INFINITY else min(hard, ADDRESS_SPACE_LIMIT)
    if soft == resource.RLIM_INFINITY or soft > want:
        resource.setrlimit(resource.RLIMIT_AS, (want, hard))


def main_for(check_one: Callable[[bytes], None]) -> Callable[[list[str]], None]:
    """The libFuzzer entry point of a target: `main(sys.argv)`."""

    def main(argv: list[str]) -> None:
        import atheris

        _limit_address_space()
        args = list(argv)
        if not any(a.startswith("-rss_limit_mb=") for a in args):
            args.insert(1, f"-rss_limit_mb={RSS_LIMIT_MB}")
        atheris.Setup(args, check_one)
        atheris.Fuzz()

    return main


def corpus_files(target: str) -> list[Path]:
    """The committed corpus of one target (seeds and regression inputs), sorted."""
    d = CORPUS_DIR / target
    return sorted(p for p in d.iterdir() if p.is_file()) if d.is_dir() else []


def write_seed(target: str, name: str, data: bytes) -> Path:
    """Put one seed into a target's corpus (the recording scripts use this)."""
    d = CORPUS_DIR / target
    d.mkdir(parents=True, exist_ok=True)
    p = d / name
    p.write_bytes(data)
    return p


def u32(data: bytes, pos: int) -> int:
    """Four input bytes as a little-endian number (zero-filled past the end)."""
    return int.from_bytes(data[pos : pos + 4].ljust(4, b"\0"), "little")


class Reader:
    """Consume fuzz input front to back; past its end everything reads as zero, so
    every input is a valid script (libFuzzer's shrinking then works well)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def more(self) -> bool:
        return self.pos < len(self.data)

    def take(self, n: int) -> bytes:
        raw = self.data[self.pos : self.pos + n]
        self.pos += n
        return raw.ljust(n, b"\0")

    def byte(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "little")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "little")

    def u64(self) -> int:
        return int.from_bytes(self.take(8), "little")

    def pick(self, options: Any) -> Any:
        return options[self.byte() % len(options)]
