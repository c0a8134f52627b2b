"""Pick the C fast path or the pure-Python twins.

`VMBUSD_NATIVE=0` selects the twins (as python-zstandard picks its backend);
anything else requires the compiled extension and fails loudly if it is missing
or stale, so a benchmark never silently measures the slow path.
"""

from __future__ import annotations

import os
from typing import Any

EXPECTED_ABI = 5  # keep equal to NATIVE_ABI in native/build_native.py

ffi: Any = None
lib: Any = None


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
    abi = _native.lib.vmb_native_abi()
    if abi != EXPECTED_ABI:
        raise ImportError(f"stale vmbus._native (ABI {abi}, expected {EXPECTED_ABI}): rebuild")
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
