#!/usr/bin/env bash
# CI stage: the CPU extension (CPU kernels, SIMT emulator, emulated CUDA kernels) built
# under AddressSanitizer + UBSan (NEPTUNE_SANITIZE=1, into build/sanitize/lib only), then
# the operator contract and layouts suites on the backends that compare with the
# reference (the CPU kernel sets and cuda-simt), the CUDA plan and the CPU probe tests.
# Any sanitizer report aborts the Python process, and a pytest run that dies by a signal
# fails the stage. See docs/sanitize.md.
#
#   .ci/sanitize.sh                     build, then the stage's test selection
#   .ci/sanitize.sh -- CMD [ARGS...]    build, then CMD under the sanitizer environment
#   NEPTUNE_SANITIZE_NO_BUILD=1 ...     reuse build/sanitize/lib as it is
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${NEPTUNE_SANITIZE_NO_BUILD:-0}" != 1 ]; then
  start=$(date +%s)
  NEPTUNE_SANITIZE=1 NEPTUNE_BUILD_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" python setup.py -q build
  echo "sanitize: build took $(( $(date +%s) - start )) s"
fi

# The runtime must be the process's first library: gcc's libasan, preloaded (it carries
# UBSan's handlers too; libubsan comes with the extension). libstdc++ with it: ASan binds
# its __cxa_throw hook when it starts, and python itself does not load libstdc++, so
# without it the first C++ exception (any TORCH_CHECK) kills the process with
# "CHECK failed: ... real___cxa_throw". Leak checking off: the interpreter leaks by
# design. abort_on_error: a report kills the process by SIGABRT.
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(readlink -f "$(g++ -print-file-name=libstdc++.so)")${LD_PRELOAD:+ $LD_PRELOAD}"
export LD_PRELOAD
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_stack_use_after_return=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:abort_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
# The sanitized package first, and not the checkout's neptune_ext (PYTHONSAFEPATH: the
# current directory is not put on sys.path).
export PYTHONSAFEPATH=1
export PYTHONPATH="build/sanitize/lib${PYTHONPATH:+:$PYTHONPATH}"
# OpenMP threads that sleep rather than spin at the end of each parallel region: on a
# runner shared with other jobs, spinning threads wait for descheduled ones and the small
# steps of these tests took four times as long.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

python - <<'EOF'
import neptune_ext
info = neptune_ext.ops.build_info()
assert info.get("sanitize") and info["cpu_kernel_loaded"], f"not the sanitizer build: {neptune_ext.__file__} {info}"
import torch
try:  # a C++ exception must reach Python as one (see LD_PRELOAD above)
    torch.ones(2).view(3)
    raise AssertionError("torch accepted a bad view")
except RuntimeError:
    pass
print("sanitize:", neptune_ext.__file__, "|", neptune_ext.ops.describe_build())
EOF

if [ "${1:-}" = "--" ]; then
  shift
  exec "$@"
fi

start=$(date +%s)
# --capture=sys: a sanitizer writes its report to file descriptor 2 and aborts, which
# pytest's default fd capture would swallow with the process.
PYTEST=(python -m pytest -q -p no:cacheprovider --capture=sys)
rc=0
# The reference-comparing backends of the two suites; the CUDA plan's int64 size
# arithmetic (sizes over 2^31, never allocated: UBSan's signed-integer-overflow); the
# torch-free CPU probe, whose allocations the preloaded runtime checks.
"${PYTEST[@]}" tests/test_operator_contract.py tests/test_layouts.py -k "cpu- or cuda-simt" || rc=$?
[ "$rc" = 0 ] && { "${PYTEST[@]}" tests/test_cuda_plan.py tests/test_cpu_probe.py || rc=$?; }
echo "sanitize: tests took $(( $(date +%s) - start )) s (exit status $rc)"
[ "$rc" -gt 128 ] && echo "sanitize: pytest was killed by signal $(( rc - 128 )) (a sanitizer report above)"
exit "$rc"
