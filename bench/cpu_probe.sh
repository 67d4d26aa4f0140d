#!/usr/bin/env bash
# Build and run bench/cpu_probe.cpp (no torch needed): per-pass costs of the real CPU
# kernels in cache, and one-pass vs look-then-update memory patterns from DRAM, on one
# thread. Writes bench/results/cpu_probe.txt (or $PROBE_OUT).
# Usage: bash bench/cpu_probe.sh [reps] [quick]   (quick: 16 MB arrays, a smoke test)
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
flags="-O3 -g0 -ffp-contract=off -fno-math-errno -Wno-psabi -std=c++17 -Icsrc"
g++ $flags -march=native -o "$out/cpu_probe" bench/cpu_probe.cpp \
    csrc/cpu/set_sse2.cpp csrc/cpu/set_avx2.cpp csrc/cpu/set_avx512.cpp csrc/cpu/set_avx512bf16.cpp
{
  echo "# cpu_probe: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) ($(nproc) logical CPUs)"
  echo "# git $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "# command: bash bench/cpu_probe.sh ${1:-15} ${2:-}"
  "$out/cpu_probe" "${1:-15}" "${2:-full}"
} | tee "${PROBE_OUT:-bench/results/cpu_probe.txt}"
rm -rf "$out"
