"""Build-time checks of the CUDA side that need no GPU: the toolkit version rule, and the
kernels compiled for sm_90 by nvcc on the CPU with their register and spill counts."""
from __future__ import annotations

import os
import re
import subprocess

import pytest

from scripts import ROOT, load_setup

SETUP = load_setup()


@pytest.mark.parametrize("version", [(11, 8), (12, 0)])
def test_old_toolkit_fails_the_build_with_a_clear_message(version):
    with pytest.raises(SystemExit, match=r"need CUDA 12\.1 or newer .*nvcc %d\.%d" % version):
        SETUP.check_cuda_version(version, "/opt/cuda-old")


@pytest.mark.parametrize("version", [(12, 1), (12, 8), (13, 0), None])
def test_supported_or_unknown_toolkit_passes(version):
    SETUP.check_cuda_version(version, "/opt/cuda")


def _ptxas_report(log: str) -> dict[str, dict[str, int]]:
    """{kernel: {registers, stack, spill_stores, spill_loads}} from nvcc -Xptxas -v output."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            k = re.search(r"\d(neptune_[a-z]+_kernel)(?:ILb([01])E)?", m.group(1))  # after its length
            current = k.group(1) + ("" if k.group(2) is None else ("<bf16 state>" if k.group(2) == "1" else "<fp32 state>"))
            out[current] = {}
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and not out[current]:
            out[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[current]["registers"] = int(m.group(1))
            current = None
    return out


# Spill bytes (stores, loads) tolerated per fp32-state kernel with nvcc 13.0, -O3 --fmad=false:
# none, but for the main kernel's 16/40 (it was 40/64 before its 8-element vectors stopped
# being unrolled; the rest is not in its loops' unrolling, and removing it needs a GPU to
# weigh against the occupancy of __launch_bounds__(256, 3)). A kernel spilling more fails.
SPILL_ALLOWED = {"neptune_main_kernel<fp32 state>": (16, 40)}


def test_kernels_compile_for_sm90_and_fp32_state_kernels_do_not_spill_more():
    home = SETUP.resolve_cuda_home()
    if home is None:
        pytest.skip("no CUDA toolkit (nvcc)")
    nvcc = os.path.join(home, "bin", "nvcc")
    cmd = [nvcc, "-cubin", "-arch=sm_90", "-O3", "--fmad=false", "-Xptxas", "-v", f"-I{os.path.join(ROOT, 'csrc')}",
           os.path.join(ROOT, "csrc", "cuda", "kernels.cu"), "-o", os.devnull]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]
    report = _ptxas_report(r.stdout + r.stderr)
    table = "\n".join(f"{k:32s} {v}" for k, v in sorted(report.items()))
    print(table)
    expected = {"neptune_main_kernel<fp32 state>", "neptune_main_kernel<bf16 state>", "neptune_long_kernel<fp32 state>",
                "neptune_long_kernel<bf16 state>", "neptune_steps_kernel", "neptune_upload_kernel"}
    assert set(report) == expected, table
    for k, v in report.items():
        if "bf16 state" in k:
            continue  # the bf16 state's rounding hashes spill by design (reported, not checked)
        stores, loads = SPILL_ALLOWED.get(k, (0, 0))
        assert v["spill_stores"] <= stores and v["spill_loads"] <= loads, (
            f"{k} spills more than {stores}/{loads} bytes (stores/loads):\n{table}")
