"""Smoke test of bench/cpu_probe.sh: the torch-free probe of the CPU kernels builds against
csrc and prints every section with positive timings (quick mode: 16 MB arrays)."""
import os
import platform
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("g++") is None or platform.machine() != "x86_64", reason="needs g++ on x86-64")
def test_cpu_probe_quick(tmp_path):
    out = tmp_path / "probe.txt"
    env = {**os.environ, "PROBE_OUT": str(out)}
    subprocess.run(["bash", "bench/cpu_probe.sh", "1", "quick"], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=600)
    text = out.read_text()
    for section in ("1. in L2", "1b. in L2 by param / state dtype", "2-3. streaming from DRAM (16 MB per array)", "4. one core"):
        assert section in text, text
    rows = [line.split() for line in text.splitlines() if re.match(r"^\s+\d+\s", line)]
    assert [int(r[0]) for r in rows] == [576, 2304, 4608, 256, 576, 1024, 2304, 4608], text
    assert all(float(x) > 0 for r in rows for x in r[1:]), text
    kinds = [line.split() for line in text.splitlines() if re.match(r"^(fp32|bf16|fp16)/", line)]
    assert [r[0] for r in kinds] == ["fp32/fp32", "bf16/fp32", "fp16/fp32", "fp32/bf16", "bf16/bf16"], text
    assert all(float(x) > 0 for r in kinds for x in r[1:]), text
