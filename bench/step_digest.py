"""Digests of the Neptune step's outputs on a fixed set of inputs, for every backend this
build runs: the reference, the CPU operator under each CPU kernel set, and the CUDA
kernels under the SIMT emulator. Two builds that print the same digests compute the same
bits. Usage:

    python bench/step_digest.py --out before.json          # on the old build
    python bench/step_digest.py --compare before.json      # on the new one: exit 1 on a difference

Each case runs three steps on a list of tensors (odd sizes, a misaligned view, a unit
long enough to be chunked, clipped and unclipped units, random signs) and hashes every
param, exp_avg, exp_avg_sq and step after every step, twice: as raw bytes, and with every
NaN made the same NaN. Only the emulated CUDA kernels may differ in NaN payloads alone (the
host's NaN propagation, which no GPU reproduces: a GPU writes one canonical NaN).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import torch

import neptune_ext
from neptune_ext import ops

PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STATE_DTYPES = {"f32state": torch.float32, "bf16state": torch.bfloat16}
BASE = dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8, clip=0.1, cautious=True, maximize=False)
VARIANTS = {
    "default": {},
    "noclip_nocautious": dict(clip=0.0, cautious=False),
    "clip_only": dict(cautious=False),
    "cautious_only": dict(clip=0.0),
    "maximize_gradscale": dict(maximize=True, grad_scale=1024.0),
    "tensor_lr": dict(lr="tensor"),
    "nonfinite": dict(nonfinite=True),
}
# (shape, offset): offset > 0 makes the param a view starting `offset` elements into a buffer.
SHAPES_CPU = [((7,), 0), ((3, 33), 0), ((5, 17, 3), 0), ((129,), 1), ((2, 40000), 0), ((300, 65), 0), ((4, 1000), 3)]
SHAPES_SIMT = [((7,), 0), ((3, 33), 0), ((5, 17, 3), 0), ((129,), 1), ((2, 20000), 0), ((40, 65), 0), ((4, 300), 3)]


def make_tensors(shapes, dtype, state_dtype, gen):
    P, M, V, S = [], [], [], []
    for k, (shape, off) in enumerate(shapes):
        n = 1
        for d in shape:
            n *= d
        buf = torch.randn(n + off, generator=gen).to(dtype)
        p = buf[off:].view(shape)
        if len(shape) >= 2:  # rows of very different scales: some units clipped, some not
            scale = torch.logspace(-2, 1, shape[0]).to(dtype).view(-1, *([1] * (len(shape) - 1)))
            p.mul_(scale)
        m = (torch.randn(shape, generator=gen) * 0.01).to(state_dtype)
        v = (torch.rand(shape, generator=gen) * 1e-4).to(state_dtype)
        P.append(p)
        M.append(m)
        V.append(v)
        S.append(torch.tensor(float(k % 3)))
    return P, M, V, S


def make_grads(P, gen, nonfinite):
    G = []
    for i, p in enumerate(P):
        g = (torch.randn(p.shape, generator=gen) * (10.0 if i % 2 else 0.01)).to(p.dtype)
        g[torch.rand(p.shape, generator=gen) < 0.05] = 0  # exact zeros: inactive elements
        if nonfinite and p.numel() > 4:
            flat = g.view(-1)
            flat[1] = float("nan")
            flat[3] = float("inf")
        G.append(g)
    return G


def run_case(step_fn, shapes, dtype, state_dtype, variant, seed):
    gen = torch.Generator().manual_seed(seed)
    P, M, V, S = make_tensors(shapes, dtype, state_dtype, gen)
    hyper = dict(BASE)
    extra = dict(variant)
    nonfinite = extra.pop("nonfinite", False)
    hyper.update(extra)
    if hyper["lr"] == "tensor":
        hyper["lr"] = torch.tensor(3e-3)
    if "grad_scale" in hyper:
        hyper["grad_scale"] = torch.tensor(float(hyper["grad_scale"]))
    h, hc = hashlib.sha256(), hashlib.sha256()
    for _ in range(3):
        G = make_grads(P, gen, nonfinite)
        if "grad_scale" in hyper:
            G = [(g.float() * float(hyper["grad_scale"])).to(g.dtype) for g in G]
        step_fn(P, G, M, V, S, **hyper)
        for t in P + M + V + S:
            t = t.contiguous().reshape(-1)
            h.update(t.view(torch.uint8).numpy().tobytes())
            # NaN payloads are the host's when the CUDA kernels are emulated (a GPU writes
            # one canonical NaN): the second digest sees every NaN as the same value.
            hc.update(torch.where(t.isnan(), torch.full_like(t, float("nan")), t).view(torch.uint8).numpy().tobytes())
    return h.hexdigest(), hc.hexdigest()


def backends():
    out = {"reference": (neptune_ext.neptune_step_reference_multi, SHAPES_CPU, None)}
    if neptune_ext.has_kernel("cpu"):
        for s in torch.ops.neptune_ext.cpu_kernel_sets():
            out["cpu-" + ("sse2" if s == "scalar" else s)] = (ops.neptune_step_, SHAPES_CPU, s)
    if hasattr(torch.ops.neptune_ext, "_neptune_step_simt_"):
        out["cuda-simt"] = (ops.neptune_step_simt_, SHAPES_SIMT, None)
    return out


def digests():
    result = {}
    for bname, (fn, shapes, kset) in backends().items():
        if kset is not None:
            os.environ["NEPTUNE_CPU_ISA"] = kset
        else:
            os.environ.pop("NEPTUNE_CPU_ISA", None)
        for dname, dt in PARAM_DTYPES.items():
            for sname, sdt in STATE_DTYPES.items():
                for vname, var in VARIANTS.items():
                    case = f"{dname}/{sname}/{vname}"  # the same inputs on every backend
                    result[f"{bname}/{case}"] = run_case(fn, shapes, dt, sdt, var, seed=sum(map(ord, case)))
        os.environ.pop("NEPTUNE_CPU_ISA", None)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the digests to this JSON file")
    ap.add_argument("--compare", help="compare with the digests in this JSON file; exit 1 on a difference")
    args = ap.parse_args()
    torch.set_num_threads(2)
    d = digests()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(d, f, indent=1, sort_keys=True)
        print(f"{len(d)} digests written to {args.out}")
    if args.compare:
        with open(args.compare) as f:
            ref = json.load(f)
        common = sorted(set(d) & set(ref))
        diff = [k for k in common if d[k][0] != ref[k][0]]
        nan_only = [k for k in diff if d[k][1] == ref[k][1]]
        only_new = sorted(set(d) - set(ref))
        only_old = sorted(set(ref) - set(d))
        print(f"{len(common)} cases compared: {len(common) - len(diff)} bitwise identical, "
              f"{len(nan_only)} identical but for NaN payloads, {len(diff) - len(nan_only)} different")
        for k in diff:
            print("  NaN payloads differ" if k in nan_only else "  DIFFERENT", k)
        if only_new or only_old:
            print(f"  only here: {only_new}\n  only in {args.compare}: {only_old}")
        # NaN payloads may differ only where the CUDA kernels are emulated.
        bad = [k for k in diff if k not in nan_only or not k.startswith("cuda-simt/")]
        sys.exit(1 if bad or only_old else 0)


if __name__ == "__main__":
    main()
