"""The SIMT emulator under AddressSanitizer: its fiber switches are announced to ASan
(csrc/simt/scheduler.cpp), so that ASan's stack checks stay sound on the fibers' stacks.

tests/simt/asan_fibers.cpp, built here torch-free with -fsanitize=address (seconds): a
kernel that throws while other threads wait in frames with poisoned redzones must leave no
false report behind, and a real overflow of a kernel's local must be reported with its
frame and variable (without the annotations it is "a wild pointer").
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
CXX = os.environ.get("CXX", "g++")

pytestmark = pytest.mark.skipif(shutil.which(CXX) is None, reason=f"no host C++ compiler ({CXX})")


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("simt_asan") / "asan_fibers")
    cmd = [CXX, "-std=c++17", "-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address", f"-I{CSRC}",
           os.path.join(ROOT, "tests", "simt", "asan_fibers.cpp"), os.path.join(CSRC, "simt", "scheduler.cpp"),
           "-o", out]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _run(exe: str, kernel: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # the program links its own runtime
    env["ASAN_OPTIONS"] = "detect_leaks=0"
    return subprocess.run([exe, kernel], capture_output=True, text=True, timeout=120, env=env)


def test_a_throw_in_a_kernel_leaves_no_false_report(exe):
    r = _run(exe, "after_throw")
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
    assert "AddressSanitizer" not in r.stderr, r.stderr


def test_a_stack_overflow_in_a_kernel_names_its_frame(exe):
    r = _run(exe, "stack_overflow")
    assert r.returncode != 0 and "ERROR: AddressSanitizer: stack-buffer-overflow" in r.stderr, r.stdout + r.stderr
    assert "is located in stack of thread T0" in r.stderr and "in overflow_local" in r.stderr, r.stderr
