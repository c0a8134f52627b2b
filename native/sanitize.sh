#!/usr/bin/env bash
# Build native/ with AddressSanitizer + UBSan in a scratch copy of HEAD and run the
# tests that exercise C (ring, forward, concurrent ring ends, packets, memory, checks,
# channels, end to end, fuzz), vmbusd subprocesses included. Slower than CI; run it
# after changing native/.
#   usage: native/sanitize.sh [pytest args...]
set -euo pipefail
top=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
py=${PYTHON:-$top/.venv/bin/python}
work=$(mktemp -d /tmp/vmbusd-asan.XXXXXX)
trap 'rm -rf "$work"' EXIT
git -C "$top" archive HEAD | tar -x -C "$work"
cd "$work"
sed -i 's/extra_compile_args=\[[^]]*\]/extra_compile_args=["-O1", "-g", "-fno-omit-frame-pointer", "-std=gnu11", "-fsanitize=address,undefined"], extra_link_args=["-fsanitize=address,undefined"]/' native/build_native.py
"$py" setup.py -q build_ext --inplace --force
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export PYTHONPATH="$work"
# test_guard_pages_catch_overruns expects a raw SIGSEGV, which ASan reports as exit 1.
"$py" -m pytest -q -p no:cacheprovider -o addopts= \
    -k "not test_guard_pages_catch_overruns" \
    tests/test_ring.py tests/test_ring_bad_input.py tests/test_ring_forward.py \
    tests/test_ring_concurrency.py tests/test_packet.py tests/test_kvm_hyperv.py \
    tests/test_memory.py tests/test_check.py tests/test_channel.py \
    tests/test_e2e.py tests/test_fuzz_e2e.py "$@"
if grep -rl -E "Sanitizer|runtime error" /tmp/pytest-of-"$(id -un)"/pytest-current/ 2>/dev/null; then
    echo "sanitizer reports in vmbusd logs above" >&2
    exit 1
fi
