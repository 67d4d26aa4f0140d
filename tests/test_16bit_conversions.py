"""The CPU kernels' hardware 16-bit conversions (F16C; AVX512-BF16) against the software
conversions of csrc/rule.h, for every float (and every half, loading): tests/conversions_exhaustive.cpp,
built here against csrc. Needs g++ and an x86-64 CPU with AVX512-BF16 (else it skips);
test_neptune_step_cpu.py checks the kernel sets against each other on any CPU."""
import os
import platform
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("g++") is None or platform.machine() != "x86_64", reason="needs g++ on x86-64")
def test_hardware_conversions_match_the_emulation_for_every_input(tmp_path):
    exe = tmp_path / "conversions_exhaustive"
    subprocess.run(["g++", "-O2", "-ffp-contract=off", "-fno-math-errno", "-Wno-psabi", "-std=c++17",
                    "-I" + os.path.join(ROOT, "csrc"), "-o", str(exe),
                    os.path.join(ROOT, "tests", "conversions_exhaustive.cpp")], check=True, timeout=300)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    if run.stdout.startswith("SKIP"):
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0 and run.stdout.count("mismatches") == 2, run.stdout + run.stderr
