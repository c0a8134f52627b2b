"""Build the one native extension, `vmbus._native`, in cffi's out-of-line API mode.

One source for every declaration: each native/*.h marks what Python sees between a
`/* cffi:begin */` line and a `/* cffi:end */` line (constants, structs, function
prototypes, with their contracts). This script hands those spans to cffi, comments
dropped and each #define's value replaced by `...`, so cffi takes every value from
the compiler and checks every struct against it: the C and the Python view cannot
drift apart. Sources are native/*.c; a new subsystem adds its own .c/.h pair and
this script needs no edit. The ABI number is VMBUSD_NATIVE_ABI in native/vmbusd.h.
"""

from __future__ import annotations

import pathlib
import re

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent

_BEGIN = r"^[ \t]*/\*[ \t]*cffi:begin[ \t]*\*/[ \t]*$"
_END = r"^[ \t]*/\*[ \t]*cffi:end[ \t]*\*/[ \t]*$"
_SPAN = re.compile(_BEGIN + r"\n(.*?)" + _END, re.M | re.S)
_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_DEFINE = re.compile(r"^[ \t]*#[ \t]*define[ \t]+(\w+)(\(?)[^\n]*$", re.M)


def cdef_of(path: pathlib.Path) -> str:
    """The cffi declarations of one header: its marked spans, comments dropped,
    `#define NAME value` turned into `#define NAME ...`."""
    text = path.read_text()
    spans = _SPAN.findall(text)
    begins, ends = (len(re.findall(m, text, re.M)) for m in (_BEGIN, _END))
    if not len(spans) == begins == ends:
        raise ValueError(f"{path.name}: unbalanced cffi:begin / cffi:end markers")
    out = []
    for span in spans:
        code = _COMMENT.sub(" ", span)
        if "\\\n" in code:
            raise ValueError(f"{path.name}: no line continuations between cffi markers")
        for m in _DEFINE.finditer(code):
            if m.group(2):
                raise ValueError(f"{path.name}: function-like macro {m.group(1)} for cffi")
        out.append(_DEFINE.sub(lambda m: f"#define {m.group(1)} ...", code))
    return "\n".join(out)


_headers = sorted(HERE.glob("*.h"))
CDEF = "\n".join(cdef_of(p) for p in _headers)

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
_sources = sorted(str(p.relative_to(HERE.parent)) for p in HERE.glob("*.c"))
ffibuilder.set_source(
    "vmbus._native",
    "".join(f'#include "{p.name}"\n' for p in _headers),
    sources=_sources,
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    # `python native/build_native.py` rebuilds the extension in place for development
    # (the same build that `pip install -e .` runs); `--cdef` prints what cffi sees.
    import os
    import subprocess
    import sys

    if sys.argv[1:] == ["--cdef"]:
        print(CDEF)
        sys.exit(0)
    os.chdir(HERE.parent)
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], check=True)
