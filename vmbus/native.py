"""Pick the C fast path or the pure-Python twins.

`VMBUSD_NATIVE=0` selects the twins (as python-zstandard picks its backend);
anything else requires the compiled extension and fails loudly if it is missing
or stale, so a benchmark never silently measures the slow path.

Stale means built from other native sources than the checkout beside this file:
the ABI number is written once, as VMBUSD_NATIVE_ABI in native/vmbusd.h; the
extension reports the value it was compiled with, and `_load` compares it with the
header it finds in the source tree. An installed wheel carries no native/ sources;
its extension was built with its Python files, so there is nothing to compare.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

ABI_HEADER = Path(__file__).resolve().parent.parent / "native" / "vmbusd.h"

ffi: Any = None
lib: Any = None


def source_abi(header: Path = ABI_HEADER) -> int | None:
    """VMBUSD_NATIVE_ABI as the source tree's native/vmbusd.h says, or None without one."""
    try:
        text = header.read_text()
    except OSError:
        return None
    m = re.search(r"^[ \t]*#[ \t]*define[ \t]+VMBUSD_NATIVE_ABI[ \t]+(\d+)", text, re.M)
    if m is None:
        raise ImportError(f"{header}: no VMBUSD_NATIVE_ABI line")
    return int(m.group(1))


def check_abi(built: int, expected: int | None) -> None:
    """Refuse an extension built from other sources than the checkout's."""
    if expected is not None and built != expected:
        raise ImportError(
            f"stale vmbus._native (ABI {built}, native/vmbusd.h says {expected}): rebuild "
            "with `pip install -e .`"
        )


def _load() -> bool:
    global ffi, lib
    if os.environ.get("VMBUSD_NATIVE", "1") == "0":
        return False
    try:
        from vmbus import _native  # type: ignore[attr-defined]
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "vmbus._native is not built: run `pip install -e .` (or set VMBUSD_NATIVE=0 "
            "for the pure-Python twins)"
        ) from exc
    check_abi(int(_native.lib.VMBUSD_NATIVE_ABI), source_abi())
    ffi, lib = _native.ffi, _native.lib
    return True


NATIVE: bool = _load()


def native_available() -> bool:
    """True when the extension can be imported, whatever VMBUSD_NATIVE says (for tests)."""
    try:
        from vmbus import _native  # type: ignore[attr-defined]  # noqa: F401
    except ImportError:
        return False
    return True


def native_module() -> Any:
    """The extension module itself, for differential tests that run both paths."""
    from vmbus import _native  # type: ignore[attr-defined]

    return _native
