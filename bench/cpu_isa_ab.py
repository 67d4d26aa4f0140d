"""Interleaved A/B of the CPU kernel sets on one parameter list: the Neptune operator's
step time with NEPTUNE_CPU_ISA set to each named set in turn, round-robin per step.

    python bench/cpu_isa_ab.py --set resnet50 --dtype bf16 --threads 1
    python bench/cpu_isa_ab.py --set resnet50 --isas avx2,avx512

--isas defaults to every set this machine can run (torch.ops.neptune_ext.cpu_kernel_sets(),
oldest first). Prints the median and p20/p80 ms per step for each set (the sets give
bitwise the same result, so only time differs); nothing is written.
"""
import argparse
import os
import statistics
import time

import torch

from neptune_ext import neptune_step_
from step_sets import build_sets  # bench/, the script's own directory (on sys.path when run)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", default="resnet50", help="a named set of bench/step_sets.py")
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.add_argument("--state-dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--isas", default=None,
                   help="comma list of NEPTUNE_CPU_ISA values (default: every set this machine can run)")
    p.add_argument("--steps", type=int, default=40, help="timed steps per set (after 3 untimed)")
    p.add_argument("--quick", action="store_true", help="the tiny stand-in of the set (smoke tests)")
    args = p.parse_args()
    runnable = list(torch.ops.neptune_ext.cpu_kernel_sets())
    isas = args.isas.split(",") if args.isas else runnable
    unknown = [isa for isa in isas if isa not in runnable]
    if unknown:
        p.error(f"--isas: {', '.join(unknown)} not runnable here; this machine runs {', '.join(runnable)}")
    torch.set_num_threads(args.threads)
    dtype, sdt = DTYPES[args.dtype], DTYPES[args.state_dtype]
    pset = build_sets(args.set, "cpu", quick=args.quick)[0]
    g = torch.Generator().manual_seed(0)
    P = [(torch.randn(s, generator=g) * 0.02).to(dtype) for s in pset.shapes]
    G = [(torch.randn(s, generator=g) * 1e-3).to(dtype) for s in pset.shapes]
    M = [torch.zeros(s, dtype=sdt) for s in pset.shapes]
    V = [torch.zeros(s, dtype=sdt) for s in pset.shapes]
    S = [torch.zeros(()) for _ in pset.shapes]
    times = {isa: [] for isa in isas}
    for k in range(args.steps + 3):
        for isa in isas:
            os.environ["NEPTUNE_CPU_ISA"] = isa
            t0 = time.perf_counter()
            neptune_step_(P, G, M, V, S, lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=1e-2, eps=1e-8, clip=0.1,
                          cautious=True, maximize=False)
            if k >= 3:
                times[isa].append(time.perf_counter() - t0)
    print(f"{args.set} ({pset.n_params:,} params), {args.dtype} params, "
          f"{args.state_dtype} state, {args.threads} thread(s), {args.steps} interleaved steps each:")
    for isa, t in times.items():
        t = sorted(1e3 * x for x in t)
        print(f"  {isa:12s} median {statistics.median(t):7.2f} ms  p20 {t[len(t) // 5]:7.2f}  p80 {t[4 * len(t) // 5]:7.2f}")


if __name__ == "__main__":
    main()
