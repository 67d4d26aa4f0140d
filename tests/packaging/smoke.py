"""Smoke test of an installed neptune_ext (from the sdist or a wheel), run from a directory
outside the source tree by .ci/package_check.sh:

    python smoke.py [--no-compiler] [--expect-cuda]

--no-compiler: fail unless no C++ compiler (cc, gcc, g++, c++, nvcc, ...) is on PATH, so
that the installed wheel is shown to need none. --expect-cuda: fail unless the CUDA
extension was built (its kernels cannot run without a GPU; the emulated CUDA operator is
checked either way).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import sys
import sysconfig

COMPILERS = ("cc", "gcc", "g++", "c++", "clang", "clang++", "nvcc")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-compiler", action="store_true")
    ap.add_argument("--expect-cuda", action="store_true")
    args = ap.parse_args()

    if args.no_compiler:
        found = {c: shutil.which(c) for c in COMPILERS if shutil.which(c)}
        assert not found, f"a compiler is on PATH: {found}"
        print("no compiler on PATH:", os.environ.get("PATH"))

    import torch
    from torch import nn

    import neptune_ext
    from neptune_ext import ops, testing

    # The installed package, not a checkout: inside this venv's site-packages.
    assert sys.prefix != sys.base_prefix, "not running in a virtual environment"
    site = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}
    where = os.path.realpath(neptune_ext.__file__)
    assert any(where.startswith(s + os.sep) for s in site), f"neptune_ext from {where}, not from {site}"
    print("neptune_ext", neptune_ext.__version__, "from", where)

    info = neptune_ext.build_info()
    print("build_info():", info)
    assert info["version"] == neptune_ext.__version__ == importlib.metadata.version("neptune_ext"), info
    assert info["cpu"] and info["cpu_kernel_loaded"], info
    assert "load_errors" not in info, info["load_errors"]
    sets = testing.cpu_kernel_sets()
    assert sets and info["cpu_isa"] in sets, (info["cpu_isa"], sets)
    if not os.environ.get(testing.CPU_ISA_ENV):  # chosen at run time: the newest this CPU runs
        assert info["cpu_isa"] == sets[-1], (info["cpu_isa"], sets)
    if args.expect_cuda:
        assert info["cuda"] and info["cuda_kernel_loaded"], info

    # The compiled CPU operator (under every kernel set this CPU runs) and the CUDA
    # operator's kernels under the SIMT emulator, against the reference, at odd sizes.
    shapes = [(7,), (1031,), (5, 1031), (64, 3, 3, 3), (2, 40000)]
    backends = [b for b in testing.backends() if b.is_op and b.device == "cpu"]
    assert any(b.emulated for b in backends) and any(not b.emulated for b in backends), [b.name for b in backends]
    for b in backends:
        assert b.missing() is None, f"{b.name}: {b.missing()}"
        for dtype in (torch.float32, torch.bfloat16):
            testing.compare_with_reference(b.step, shapes, dtype, n_steps=2, seed=11)
            print(f"{b.name} {dtype}: matches the reference")

    # A small model, stepped by the compiled operator.
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = (x[:, :3].sum(1) > 0).long()
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
    opt = neptune_ext.Neptune(model.parameters(), lr=1e-2, implementation="op")
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    print(f"model: loss {losses[0]:.4f} -> {losses[-1]:.4f} in {len(losses)} steps")
    assert ops.has_kernel("cpu")
    print("smoke test passed")


if __name__ == "__main__":
    main()
