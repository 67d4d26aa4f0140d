#!/usr/bin/env bash
# Plants one of the bugs in tests/sanitize/planted/ (NAME.patch), rebuilds the sanitizer
# build and runs the part of the sanitizer stage's selection that reaches it (the patch's
# "Run:" line, TEST_FILE -k EXPRESSION); expects the run to die with a sanitizer report,
# prints the report's SUMMARY line (and for ASan the access and its allocation), and takes
# the patch out again (also on failure or Ctrl-C). The build left in build/sanitize/lib is the last planted
# one's: the next .ci/sanitize.sh rebuilds it from the restored sources.
#   tests/sanitize/planted.sh a_cuda_tail_overread     (one; no name: all four)
set -euo pipefail
cd "$(dirname "$0")/../.."
names=("$@")
[ ${#names[@]} = 0 ] && names=(a_cuda_tail_overread b_cpu_tail_overwrite c_arg_table_index d_size_overflow)
failed=0
for name in "${names[@]}"; do
  patch="tests/sanitize/planted/$name.patch"
  git apply --check "$patch" || { echo "planted: $patch no longer applies: update it with the code"; exit 2; }
  run=$(sed -n 's/^Run: //p' "$patch")  # "TEST_FILE -k EXPRESSION"
  git apply "$patch"
  trap 'git apply -R "$patch"' EXIT
  log=$(mktemp)
  rc=0
  .ci/sanitize.sh -- python -m pytest -q -x -p no:cacheprovider --capture=sys "${run%% -k *}" -k "${run#* -k }" > "$log" 2>&1 || rc=$?
  git apply -R "$patch"
  trap - EXIT
  summary=$(grep -m1 -E "^SUMMARY: (AddressSanitizer|UndefinedBehaviorSanitizer)|runtime error:" "$log" || true)
  if [ "$rc" -gt 128 ] && [ -n "$summary" ]; then
    echo "planted $name: caught (exit status $rc): $summary"
    grep -m2 -E "^(READ|WRITE) of size|is located .* region" "$log" | sed 's/^/  /' || true
    rm -f "$log"
  else
    echo "planted $name: NOT caught (exit status $rc); log: $log"
    failed=1
  fi
done
exit "$failed"
