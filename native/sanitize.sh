#!/usr/bin/env bash
# Build native/ with AddressSanitizer + UBSan in a scratch copy of HEAD and run the
# tests that exercise C (ring, forward, concurrent ring ends, packets, memory, checks,
# channels, end to end, fuzz), vmbusd subprocesses included. Slower than CI; run it
# after changing native/.
#   usage: native/sanitize.sh [pytest args...]
#          native/sanitize.sh --fuzz [scripts/fuzz args...]
# --fuzz: the same build, then scripts/fuzz runs the atheris targets against it (the
# targets load it through VMBUSD_FUZZ_NATIVE; every Python allocation goes through
# malloc, PYTHONMALLOC=malloc, so ASan sees the buffers C is handed). Without target
# names it fuzzes the targets with native code: ring, packet, hyperv, rndis.
set -euo pipefail
fuzz=0
caller_asan=${ASAN_OPTIONS:-}
if [ "${1:-}" = --fuzz ]; then
    fuzz=1
    shift
fi
top=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
py=${PYTHON:-$top/.venv/bin/python}
work=$(mktemp -d /tmp/vmbusd-asan.XXXXXX)
trap 'rm -rf "$work"' EXIT
git -C "$top" archive HEAD | tar -x -C "$work"
cd "$work"
# (for --fuzz the extension is not linked against gcc's libasan: atheris's clang ASan
# runtime, preloaded below, provides the __asan_* symbols, and two runtimes refuse to mix)
link='"-fsanitize=address,undefined"'
[ "$fuzz" = 1 ] && link='"-fsanitize=undefined"'
sed -i 's/extra_compile_args=\[[^]]*\]/extra_compile_args=["-O1", "-g", "-fno-omit-frame-pointer", "-std=gnu11", "-fsanitize=address,undefined"], extra_link_args=['"$link"']/' native/build_native.py
"$py" setup.py -q build_ext --inplace --force
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
if [ "$fuzz" = 1 ]; then
    so=$(find "$work/vmbus" -maxdepth 1 -name '_native*.so' | head -n 1)
    [ -n "$so" ] || { echo "sanitize.sh: no extension built in $work" >&2; exit 1; }
    export VMBUSD_FUZZ_NATIVE="$so" PYTHONMALLOC=malloc
    # atheris's own ASan runtime (clang's, with libFuzzer in it): with gcc's libasan
    # preloaded the coverage callbacks resolve to libasan and atheris sees no coverage.
    # gcc's UBSan runtime stays for the extension's -fsanitize=undefined checks.
    atheris_dir=$("$py" -c 'import atheris; print(atheris.path())')
    export LD_PRELOAD="$atheris_dir/asan_with_fuzzer.so $(gcc -print-file-name=libubsan.so)"
    # ASan reports a fault itself; libFuzzer then writes the input as a crash file.
    # malloc_context_size=0: with PYTHONMALLOC=malloc every Python object is an ASan
    # allocation, and recording its 30-frame stack halved the executions per second;
    # it only feeds the "allocated by"/"freed by" stacks of a report (detection is unchanged). To
    # see it for a crash file, rerun it with ASAN_OPTIONS=malloc_context_size=30 set:
    # the caller's ASAN_OPTIONS are appended, so they win.
    export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:allocator_may_return_null=1:malloc_context_size=0${caller_asan:+:$caller_asan}
    named=0
    for a in "$@"; do
        [ -e "$top/tests/fuzz/fuzz_$a.py" ] && named=1
    done
    [ "$named" = 1 ] || set -- "$@" ring packet hyperv rndis
    PYTHON="$py" "$top/scripts/fuzz" "$@"
    exit $?
fi
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
