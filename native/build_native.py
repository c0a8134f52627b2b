"""Build the one native extension, `vmbus._native`, in cffi's out-of-line API mode.

Declarations come from native/cdef/*.h (plain C that cffi can parse), sources from
native/*.c. Each subsystem adds its own pair of files; this script needs no edit.
The ABI version is compiled in so a stale build is caught at import.
"""

from __future__ import annotations

import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
NATIVE_ABI = 5  # bump when any cdef changes; vmbus/native.py checks it at import

ffibuilder = FFI()
_cdefs = sorted((HERE / "cdef").glob("*.h"))
ffibuilder.cdef("#define VMBUSD_NATIVE_ABI ...\n" + "\n".join(p.read_text() for p in _cdefs))
_sources = sorted(str(p.relative_to(HERE.parent)) for p in HERE.glob("*.c"))
_headers = "".join(f'#include "{p.name}"\n' for p in sorted(HERE.glob("*.h")))
ffibuilder.set_source(
    "vmbus._native",
    _headers,
    sources=_sources,
    define_macros=[("VMBUSD_NATIVE_ABI", str(NATIVE_ABI))],
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    # `python native/build_native.py` rebuilds the extension in place for development
    # (the same build that `pip install -e .` runs).
    import os
    import subprocess
    import sys

    os.chdir(HERE.parent)
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], check=True)
