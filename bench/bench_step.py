#!/usr/bin/env python
"""Step microbenchmark: one optimizer step of Neptune against AdamW, on real parameter sets.

    python bench/bench_step.py --device cpu --threads 1,2 --dtype fp32,bf16 \
        --sets resnet50,gpt2-small,many-small,single
    python bench/bench_step.py --device cuda --dtype fp32,bf16 \
        --sets resnet50,gpt2-small,gpt2-medium,many-small,single

Contenders (filter with --contenders):
  neptune-op          neptune_ext.neptune_step_ on the tensor lists (the fused operator alone)
  neptune-op-bf16-state  the same with exp_avg / exp_avg_sq in bf16 (the bf16 state)
  neptune-optimizer   neptune_ext.Neptune(...).step() (operator + Python grouping overhead)
  neptune-optimizer-strided  the same with every ndim >= 2 param (and its grad) stored
                      transposed (dims reversed: dense, but units are not contiguous spans),
                      so it takes the optimizer's scratch path (a dense copy in and out)
  neptune-reference   neptune_step_reference_multi (pure PyTorch; slow: capped reps, and
                      skipped above REFERENCE_LIMIT params unless --reference-all)
  adamw-forloop       torch.optim.AdamW(foreach=False)
  adamw-foreach       torch.optim.AdamW(foreach=True)
  adamw-fused         torch.optim.AdamW(fused=True)   (the ratio column's reference)
  deepspeed-cpu-adam  DeepSpeedCPUAdam (CPU only, only when deepspeed is importable)
  timm-agc-cadamw-foreach / timm-agc-cadamw-forloop   (only when timm is importable)
                      the closest composite a user can assemble from timm:
                      timm.utils.agc.adaptive_clip_grad(params, clip_factor=0.1, eps=1e-3)
                      then timm.optim.create_optimizer_v2(params, "cadamw", foreach=True/False).
                      A composite, not the same rule: the clipping is unit-wise like
                      Neptune's, but cadamw's caution mask is normalised by its mean over
                      the whole tensor rather than per unit (and over all elements, not the
                      active ones), and it masks exp_avg rather than the update.
Hyperparameters: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 1e-2; Neptune clip 0.1,
cautious True (the defaults; the composite's clip_factor is the same 0.1). Params and grads
are random normal (grads scaled 1e-3).

How the contenders share the machine (the "mode" column):
  interleaved  when every contender's tensors together fit in --mem-gb (default 6 GiB on CPU,
               60% of free memory on CUDA): every contender gets its own params, grads and state
               (copies of the same values), and the timed steps go round-robin, one step of each
               contender per round, the starting contender rotating each round, so drift and
               neighbours' noise hit all contenders alike.
  blocked      bigger sets (e.g. gpt2-small fp32 on CPU): one contender alive at a time. Params
               and grads are built once and shared; each contender builds its state, warms up,
               runs a block of its reps, and frees its state; --rounds blocks per contender, in
               order A B C ... then ... C B A (ABBA), so drift still hits all alike.
Reps: with --reps N every contender runs N timed steps (the reference min(N, --ref-reps));
without it, reps adapt so each contender gets about --target-s seconds of timed steps,
between --min-reps and --max-reps (reference: between 2 and --ref-reps), from the time of
its last warm-up step. Warm-up: --warmup untimed steps (the first builds the state), cut
short once they pass --target-s (big sets on CPU: one).

Timing: CPU: time.perf_counter() around each step (torch.set_num_threads per --threads
entry). CUDA: torch.cuda.Event around each step, with a synchronize before (after an L2
flush that reads a buffer of 2x the L2 size, outside the timed region) and after each step,
so CPU-side launch overhead that starves the GPU counts. Sets smaller than 2x L2 also get
2-3 full copies of their tensors (params, grads, state), used in rotation.
Reported: median, p20, p80 ms per step.

Bytes per step are the minimum traffic of the rule, counted from the tensors each contender
actually touches (state dtype read from the optimizer's state after the first step):
param read + write, grad read, each state tensor read + write (step counters ignored).
fp32 Neptune/AdamW: 28 B/param (Neptune with the bf16 state: 20); bf16 params: Neptune (fp32 state) 22 B/param, torch AdamW
(bf16 state) 14 B/param; fp64 (float64 state for both): 56 B/param. GB_s = bytes / median (1 GB = 1e9 B). Temporaries of the
forloop/foreach/reference paths are not counted, so their GB_s is "effective".
ratio_to_adamw_fused = contender median / adamw-fused median (same set, size, dtype, threads).
ratio_to_neptune = contender median / neptune-optimizer median (neptune-op when the optimizer
is not run): what swapping the drop-in optimizer costs.
The composite's AGC pass (read W and G, write G) is not counted in its bytes: like the
temporaries of forloop/foreach, its GB_s is "effective" at the same 28 B/param (fp32).
CUDA also: frac_of_copy = GB_s / (device-to-device copy_ of a 2 GiB tensor, bytes = 2 x 2 GiB),
and launches = GPU activities (kernels + memcpy + memset) that torch.profiler records for one
step (left empty for steps slower than LAUNCH_COUNT_MAX_S). CPU: the header gives a memory copy's GB/s for orientation.

Output, in --out-dir (default bench/results), one group per (device, dtype, threads):
  step_cpu_fp32_t2.{csv,md,png}   (CUDA: step_cuda_fp32.{csv,md,png}; --tag T appends _T;
                                   --quick appends _quick so smoke runs never overwrite)
The PNG: named sets as grouped bars (GB/s per contender, per set) with the measured copy
ceiling as a line; the single-tensor sweeps as lines of GB/s against parameter count.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from neptune_ext.ops import StepLists, cpu_name
from step_sets import ParamSet, build_sets  # bench/, the script's own directory (on sys.path when run)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTENDERS = (
    "neptune-op", "neptune-op-bf16-state", "neptune-optimizer", "neptune-optimizer-strided", "neptune-reference",
    "adamw-forloop", "adamw-foreach", "adamw-fused", "deepspeed-cpu-adam",
    "timm-agc-cadamw-foreach", "timm-agc-cadamw-forloop",
)
TIMM_CONTENDERS = ("timm-agc-cadamw-foreach", "timm-agc-cadamw-forloop")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
# float64: Neptune's optimizer steps it exactly through the reference in float64; the
# operator contenders have no float64 kernel and are left out.
FP64_CONTENDERS = ("neptune-optimizer", "neptune-optimizer-strided", "adamw-forloop", "adamw-foreach", "adamw-fused")
HP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
NEPTUNE_HP = dict(clip=0.1, cautious=True, maximize=False)
# The reference allocates several temporaries per tensor: skip it above this many params
# unless --reference-all (gpt2-small takes ~6-15 s per reference step on 2 EPYC cores;
# resnet50, 25.6M, is in).
REFERENCE_LIMIT = {"cpu": 30_000_000, "cuda": 400_000_000}
# The reference launches ~30 kernels per tensor on CUDA: 10,000 tensors take seconds a step.
REFERENCE_TENSOR_LIMIT = {"cpu": 1_000_000, "cuda": 2_000}
# Profiling a step of hundreds of thousands of launches (the reference on many-small) takes
# minutes to post-process: launches are left empty for steps slower than this.
LAUNCH_COUNT_MAX_S = 1.0
COLUMNS = (
    "set", "shape", "n_tensors", "n_params", "dtype", "threads", "contender", "reps",
    "median_ms", "p20_ms", "p80_ms", "bytes_per_step", "GB_s", "ratio_to_adamw_fused",
    "ratio_to_neptune", "frac_of_copy", "launches", "mode", "copies",
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# Contenders


@dataclass
class Instance:
    """One contender's tensors, ready to step."""
    step: Callable[[], None]
    bytes_fn: Callable[[], int]
    keep: list = field(default_factory=list)  # owns the tensors


def make_params(pset: ParamSet, dtype: torch.dtype, device: str, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in pset.shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=g, device=device, dtype=torch.float32).mul_(0.02).to(dtype))
        p.grad = torch.randn(shape, generator=g, device=device, dtype=torch.float32).mul_(1e-3).to(dtype)
        params.append(p)
    return params


def clone_params(src: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """Own copies of params and grads (cheaper than drawing them again)."""
    out = []
    for p in src:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()
        out.append(q)
    return out


def _traffic(p: torch.Tensor, state_tensors: list[torch.Tensor]) -> int:
    n = p.numel()
    b = n * p.element_size() * 2 + n * p.grad.element_size()  # W read + write, G read
    for s in state_tensors:
        b += 2 * s.numel() * s.element_size()  # read + write
    return b


def _transposed(p: torch.nn.Parameter) -> torch.nn.Parameter:
    """p (and its grad) with the dims' memory order reversed: same values, units not spans."""
    if p.dim() < 2:
        return p
    dims = list(range(p.dim()))[::-1]
    q = torch.nn.Parameter(p.detach().permute(dims).contiguous().permute(dims))
    q.grad = p.grad.permute(dims).contiguous().permute(dims)
    return q


def _neptune_lists(params, state_dtype=torch.float32) -> StepLists:
    ms = [torch.zeros_like(p, dtype=state_dtype) for p in params]
    vs = [torch.zeros_like(p, dtype=state_dtype) for p in params]
    steps = [torch.zeros((), dtype=torch.float32, device=p.device) for p in params]
    return StepLists([p.detach() for p in params], [p.grad for p in params], ms, vs, steps)


def _neptune_kwargs():
    return dict(lr=HP["lr"], beta1=HP["betas"][0], beta2=HP["betas"][1], weight_decay=HP["weight_decay"],
                eps=HP["eps"], **NEPTUNE_HP)


def build_instance(name: str, params: list[torch.nn.Parameter]) -> Instance:
    import neptune_ext

    if name in ("neptune-op", "neptune-op-bf16-state", "neptune-reference"):
        # neptune-op-bf16-state: the bf16 state (exp_avg / exp_avg_sq in bf16).
        lists = _neptune_lists(params, torch.bfloat16 if name == "neptune-op-bf16-state" else torch.float32)
        fn = neptune_ext.neptune_step_reference_multi if name == "neptune-reference" else neptune_ext.neptune_step_
        kw = _neptune_kwargs()

        def step():
            fn(*lists, **kw)

        def nbytes():
            return sum(_traffic(p, [m, v]) for p, m, v in zip(params, lists.exp_avgs, lists.exp_avg_sqs))

        return Instance(step, nbytes, [params, lists])

    if name in TIMM_CONTENDERS:
        from timm.optim import create_optimizer_v2
        from timm.utils.agc import adaptive_clip_grad

        opt = create_optimizer_v2(params, "cadamw", **HP, foreach=name.endswith("-foreach"))
        clip = NEPTUNE_HP["clip"]

        def step():
            adaptive_clip_grad(params, clip_factor=clip, eps=1e-3)
            opt.step()

        def nbytes():
            return sum(_traffic(p, [opt.state[p][k] for k in ("exp_avg", "exp_avg_sq")]) for p in params)

        return Instance(step, nbytes, [params, opt])

    if name == "neptune-optimizer-strided":
        params = [_transposed(p) for p in params]
    if name in ("neptune-optimizer", "neptune-optimizer-strided"):
        # float64 has no kernel: the default implementation steps it through the exact path.
        impl = "auto" if params and params[0].dtype == torch.float64 else "op"
        opt = neptune_ext.Neptune(params, **HP, **NEPTUNE_HP, implementation=impl)
    elif name == "adamw-forloop":
        opt = torch.optim.AdamW(params, **HP, foreach=False)
    elif name == "adamw-foreach":
        opt = torch.optim.AdamW(params, **HP, foreach=True)
    elif name == "adamw-fused":
        opt = torch.optim.AdamW(params, **HP, fused=True)
    elif name == "deepspeed-cpu-adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(params, lr=HP["lr"], betas=HP["betas"], eps=HP["eps"],
                               weight_decay=HP["weight_decay"], adamw_mode=True)
    else:
        raise ValueError(f"unknown contender {name!r}")

    def nbytes():
        total = 0
        for p in params:
            st = opt.state[p]
            total += _traffic(p, [st[k] for k in ("exp_avg", "exp_avg_sq") if k in st])
        return total

    return Instance(opt.step, nbytes, [params, opt])


def available_contenders(device: str, wanted: list[str]) -> tuple[list[str], list[str]]:
    """(contenders to run, notes on the ones skipped)."""
    import neptune_ext

    run, notes = [], []
    for c in wanted:
        if c == "deepspeed-cpu-adam":
            if device != "cpu":
                notes.append("deepspeed-cpu-adam: CPU only")
                continue
            try:
                from deepspeed.ops.adam import DeepSpeedCPUAdam  # noqa: F401
            except Exception as e:  # not installed or its op cannot build: skipped
                notes.append(f"deepspeed-cpu-adam: skipped, deepspeed not importable ({type(e).__name__})")
                continue
        if c in TIMM_CONTENDERS:
            try:
                import timm.optim  # noqa: F401
                import timm.utils.agc  # noqa: F401
            except ImportError as e:
                notes.append(f"{c}: skipped, timm not importable ({type(e).__name__})")
                continue
        if (c in ("neptune-op", "neptune-op-bf16-state", "neptune-optimizer", "neptune-optimizer-strided")
                and not neptune_ext.has_kernel(device)):
            notes.append(f"{c}: skipped, no compiled Neptune kernel for {device} ({neptune_ext.ops.describe_build()})")
            continue
        run.append(c)
    return run, notes


# ---------------------------------------------------------------------------------------
# Timing


class Timer:
    def __init__(self, device: str, l2_bytes: int = 0):
        self.cuda = device == "cuda"
        self.flush_buf = None
        if self.cuda and l2_bytes:
            self.flush_buf = torch.empty(2 * l2_bytes // 4, dtype=torch.float32, device="cuda").fill_(1.0)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time_step(self, step: Callable[[], None]) -> float:
        """Seconds for one step."""
        if not self.cuda:
            t0 = time.perf_counter()
            step()
            return time.perf_counter() - t0
        if self.flush_buf is not None:
            self.flush_buf.sum()  # read-only flush: evicts the set from L2, leaves no dirty lines
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def count_launches(step: Callable[[], None]) -> int | str:
    """GPU activities (kernels, memcpy, memset) torch.profiler records for one step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    try:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        events = prof.events()
        # A record_function range (torch.optim's "Optimizer.step#...") is mirrored on the GPU
        # timeline as a user annotation: not an activity of the step.
        n = sum(1 for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False))
        if n == 0:  # no CUPTI device records: count the runtime calls on the CPU side
            n = sum(1 for e in events if e.device_type == DeviceType.CPU and
                    any(k in e.name for k in ("LaunchKernel", "cudaMemcpy", "cudaMemset")))
        return n
    except Exception as e:  # profiler unavailable: leave the column empty
        log(f"  launches: profiler failed ({type(e).__name__}: {e})")
        return ""


def copy_ceiling(device: str, nbytes: int, reps: int = 10) -> float:
    """GB/s of a tensor copy_ (bytes = 2 x size: read + write)."""
    timer = Timer(device)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    timer.sync()
    ts = [timer.time_step(lambda: dst.copy_(src)) for _ in range(reps)]
    del src, dst
    if device == "cuda":
        torch.cuda.empty_cache()
    return 2 * nbytes / quantile(ts, 0.5) / 1e9


# ---------------------------------------------------------------------------------------
# One cell: one set (one size), one dtype, one thread count, all contenders


def _reps_for(name: str, t_est: float, args) -> int:
    ref = name == "neptune-reference"
    if args.reps is not None:
        return max(1, min(args.reps, args.ref_reps) if ref else args.reps)
    lo, hi = (min(2, args.ref_reps), args.ref_reps) if ref else (args.min_reps, args.max_reps)
    return int(min(hi, max(lo, round(args.target_s / max(t_est, 1e-7)))))


def warm_up(instances: list[Instance], n: int, args, timer: Timer) -> float:
    """Up to n untimed steps of each instance (fewer once they take over --target-s; at
    least 1 on CPU, 2 on CUDA); returns the last step's time, the estimate for reps."""
    spent, t = 0.0, 0.0
    for w in range(n):
        for i in instances:
            t = timer.time_step(i.step)
            spent += t
        if spent > args.target_s and w + 1 >= (2 if timer.cuda else 1):
            break
    return t


def _warmups(name: str, args) -> int:
    # Each warm-up also primes the optimizer's state; the reference's state is prebuilt.
    return 1 if name == "neptune-reference" else max(1, args.warmup)


def _free(device: str):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def footprint(pset: ParamSet, dtype: torch.dtype, name: str) -> int:
    es = torch.empty((), dtype=dtype).element_size()
    state = 8 if (name.startswith("neptune") and es < 8) or dtype == torch.float32 else 2 * es
    temp = 2 * 4 if name in ("adamw-foreach", "adamw-forloop") else 0  # intermediates, rough
    if name in TIMM_CONTENDERS:
        temp = 3 * 4  # AGC's clipped and selected grads, cadamw's mask
    if name == "neptune-optimizer-strided":
        temp = 2 * es  # transposed copies of the params and grads, and the scratch copy
    if name == "neptune-reference":
        temp = 8 * 4 * max(math.prod(s) for s in pset.shapes) / max(pset.n_params, 1)
    return int(pset.n_params * (2 * es + state + temp))


def run_cell(pset: ParamSet, dtype: torch.dtype, contenders: list[str], args, timer: Timer, l2_bytes: int,
             mem_budget: int) -> list[dict]:
    device = args.device
    total = sum(footprint(pset, dtype, c) for c in contenders)
    mode = "interleaved" if total <= mem_budget else "blocked"
    times: dict[str, list[float]] = {c: [] for c in contenders}
    nbytes: dict[str, int] = {}
    launches: dict[str, int | str] = {}
    copies = 1

    with torch.no_grad():
        if mode == "interleaved":
            per = max(total // max(len(contenders), 1), 1)
            if device == "cuda" and per < 2 * l2_bytes:
                copies = min(3, max(2, math.ceil(2 * l2_bytes / per)))
            inst: dict[str, list[Instance]] = {}
            reps: dict[str, int] = {}
            src = make_params(pset, dtype, device)
            for c in contenders:
                inst[c] = [build_instance(c, clone_params(src)) for _ in range(copies)]
                t_est = warm_up(inst[c], _warmups(c, args), args, timer)
                reps[c] = _reps_for(c, t_est, args)
                nbytes[c] = inst[c][0].bytes_fn()
            del src
            for r in range(max(reps.values())):
                k = r % len(contenders)
                for c in contenders[k:] + contenders[:k]:
                    if len(times[c]) < reps[c]:
                        times[c].append(timer.time_step(inst[c][r % copies].step))
            if device == "cuda" and not args.no_launches:
                for c in contenders:
                    if quantile(times[c], 0.5) <= LAUNCH_COUNT_MAX_S:
                        launches[c] = count_launches(inst[c][0].step)
            del inst
            _free(device)
        else:
            params = make_params(pset, dtype, device)
            reps = {}
            order = list(contenders)
            for rnd in range(args.rounds):
                for c in (order if rnd % 2 == 0 else order[::-1]):
                    if c in reps and len(times[c]) >= reps[c]:
                        continue
                    instance = build_instance(c, params)
                    # later rounds: one step rebuilds the state
                    t_est = warm_up([instance], _warmups(c, args) if c not in reps else 1, args, timer)
                    if c not in reps:
                        reps[c] = _reps_for(c, t_est, args)
                        nbytes[c] = instance.bytes_fn()
                    rounds_left = args.rounds - rnd
                    n = math.ceil((reps[c] - len(times[c])) / rounds_left)
                    for _ in range(n):
                        times[c].append(timer.time_step(instance.step))
                    if (device == "cuda" and not args.no_launches and c not in launches
                            and quantile(times[c], 0.5) <= LAUNCH_COUNT_MAX_S):
                        launches[c] = count_launches(instance.step)
                    del instance
                    _free(device)
            del params
            _free(device)

    rows = []
    for c in contenders:
        ts = times[c]
        med = quantile(ts, 0.5)
        rows.append(dict(
            set=pset.name, shape=pset.note, n_tensors=pset.n_tensors, n_params=pset.n_params,
            dtype=args._dtype_name, threads=args._threads, contender=c, reps=len(ts),
            median_ms=med * 1e3, p20_ms=quantile(ts, 0.2) * 1e3, p80_ms=quantile(ts, 0.8) * 1e3,
            bytes_per_step=nbytes[c], GB_s=nbytes[c] / med / 1e9,
            launches=launches.get(c, ""), mode=mode, copies=copies,
        ))
    fused = next((r["median_ms"] for r in rows if r["contender"] == "adamw-fused"), None)
    by_name = {r["contender"]: r["median_ms"] for r in rows}
    neptune = by_name.get("neptune-optimizer", by_name.get("neptune-op"))
    for r in rows:
        r["ratio_to_adamw_fused"] = r["median_ms"] / fused if fused else ""
        r["ratio_to_neptune"] = r["median_ms"] / neptune if neptune else ""
        r["frac_of_copy"] = r["GB_s"] / args._copy_gbs if args._copy_gbs and device == "cuda" else ""
    return rows


# ---------------------------------------------------------------------------------------
# Output


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def machine_name(device: str) -> str:
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB, L2 {p.L2_cache_size / 2**20:.0f} MiB, {p.multi_processor_count} SMs)"
    return f"{cpu_name()} ({os.cpu_count()} logical CPUs)"


def stem(args, dtype_name: str, threads: int) -> str:
    s = f"step_{args.device}_{dtype_name}" + (f"_t{threads}" if args.device == "cpu" else "")
    if args.tag:
        s += f"_{args.tag}"
    if args.quick:
        s += "_quick"
    return s


def _fmt(v, col: str) -> str:
    if v == "" or v is None:
        return ""
    if col in ("median_ms", "p20_ms", "p80_ms"):
        return f"{v:.4g}"
    if col == "GB_s":
        return f"{v:.3g}"
    if col in ("ratio_to_adamw_fused", "ratio_to_neptune", "frac_of_copy"):
        return f"{v:.3g}"
    return str(v)


def header_lines(args, dtype_name: str, threads: int) -> list[str]:
    import neptune_ext

    lines = [
        f"# Neptune step microbenchmark: {args.device}, {dtype_name}"
        + (f", {threads} threads" if args.device == "cpu" else ""),
        "",
        f"- machine: {machine_name(args.device)}",
        f"- torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if args.device == "cuda" else "")
        + f"; neptune_ext: {neptune_ext.ops.describe_build()}; CPU ISA {neptune_ext.build_info().get('cpu_isa')}",
        f"- git: {git_sha()}",
        f"- threads: {threads} (torch.set_num_threads)" if args.device == "cpu"
        else f"- threads: n/a on CUDA (host torch threads {threads}, the threads column)",
        f"- date: {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- command: `python bench/bench_step.py {' '.join(args._argv)}` ({args._group_s:.0f} s for this file's rows)",
        f"- contenders: {', '.join(args._contenders)}",
    ]
    for note in args._notes:
        lines.append(f"- {note}")
    if args.quick:
        lines.append("- QUICK MODE: tiny stand-in sets, not the real models")
    if args.device == "cuda":
        lines.append(f"- copy ceiling: {args._copy_gbs:.1f} GB/s (copy_ of a {args._copy_bytes / 2**30:.2f} GiB tensor, "
                     "bytes = 2 x size); frac_of_copy = GB_s / ceiling; launches = GPU activities in one profiled step")
        lines.append("- timing: CUDA events, synchronize before/after each step, L2 flushed (read) before each step, "
                     "small sets rotated over 2-3 copies")
    else:
        lines.append(f"- memory copy (for orientation): {args._copy_gbs:.1f} GB/s at this thread count "
                     f"({args._copy_bytes / 2**20:.0f} MiB copy_, bytes = 2 x size); ratio column is the CPU ceiling reference")
        lines.append("- timing: time.perf_counter around each step")
    lines.append(f"- hyperparameters: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 1e-2; Neptune clip 0.1, cautious")
    lines.append("- bytes_per_step: param r/w + grad r + state r/w from the tensors each contender touches "
                 "(fp32 28 B/param; bf16 Neptune 22, torch AdamW bf16 state 14; fp64 56); GB_s = bytes / median")
    lines.append("- ratio_to_adamw_fused = median / adamw-fused median (< 1: faster than fused AdamW); "
                 "ratio_to_neptune = median / neptune-optimizer median (neptune-op if the optimizer is not run); "
                 "mode: interleaved (round-robin per step) or blocked (ABBA blocks, one contender in memory)")
    if any(c in TIMM_CONTENDERS for c in args._contenders):
        lines.append("- timm-agc-cadamw-*: a composite, not Neptune's rule: timm.utils.agc.adaptive_clip_grad "
                     "(clip_factor 0.1, eps 1e-3; unit-wise like Neptune's clipping) then timm's cadamw "
                     "(foreach / for-loop), whose caution mask is normalised per tensor rather than per unit; "
                     "its AGC pass is not counted in bytes_per_step")
    return lines


def write_outputs(rows: list[dict], args, dtype_name: str, threads: int) -> list[str]:
    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, stem(args, dtype_name, threads))
    paths = []
    with open(base + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in COLUMNS})
    paths.append(base + ".csv")
    cols = [c for c in COLUMNS if args.device == "cuda" or c not in ("frac_of_copy", "launches")]
    lines = header_lines(args, dtype_name, threads) + ["", "| " + " | ".join(cols) + " |",
                                                        "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[c], c) for c in cols) + " |")
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    paths.append(base + ".md")
    png = plot(rows, base + ".png", f"{args.device} {dtype_name}" + (f" t{threads}" if args.device == "cpu" else ""),
               ceiling_gbs=args._copy_gbs)
    if png:
        paths.append(png)
    return paths


def plot(rows: list[dict], path: str, title: str, ceiling_gbs: float | None = None) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not importable: no plot")
        return None
    fig = figure(rows, title, ceiling_gbs)
    if fig is None:
        return None
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def figure(rows: list[dict], title: str, ceiling_gbs: float | None = None):
    """Named sets as grouped bars (GB/s per contender, per set; the copy ceiling as a line),
    the single-tensor sweeps as lines of GB/s against parameter count."""
    import matplotlib.pyplot as plt

    contenders = list(dict.fromkeys(r["contender"] for r in rows))
    colors = {c: f"C{i % 10}" for i, c in enumerate(contenders)}
    named = list(dict.fromkeys(r["set"] for r in rows if not r["set"].startswith("single")))
    sweeps = [s for s in ("single", "single:1d") if any(r["set"] == s for r in rows)]
    panels = (["bars"] if named else []) + (["lines"] if sweeps else [])
    if not panels:
        return None
    widths = [max(2.0, 1.2 * len(named)) if p == "bars" else 4.0 for p in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(3 + 2 * sum(widths), 5.5), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    for ax, panel in zip(axes[0], panels):
        if panel == "bars":
            width = 0.8 / len(contenders)
            for i, c in enumerate(contenders):
                xs, ys = [], []
                for j, s in enumerate(named):
                    v = next((r["GB_s"] for r in rows if r["contender"] == c and r["set"] == s), None)
                    if v is not None:
                        xs.append(j - 0.4 + width * (i + 0.5))
                        ys.append(v)
                bars = ax.bar(xs, ys, width, color=colors[c], label=c)
                ax.bar_label(bars, fmt="%.3g", fontsize=6, rotation=90, padding=2)
            if ceiling_gbs:
                ax.axhline(ceiling_gbs, color="black", ls="--", lw=1,
                           label=f"memory copy ceiling {ceiling_gbs:.3g} GB/s")
            ax.set_xticks(range(len(named)), named)
            ax.set_ylabel("GB/s (minimum bytes / median step time)")
            ax.set_title("named parameter sets")
            ax.margins(y=0.15)
            ax.grid(True, axis="y", alpha=0.3)
            ax.legend(fontsize=7, loc="upper right")
        else:
            for c in contenders:
                for sweep, ls in (("single", "-"), ("single:1d", ":")):
                    pts = sorted((r["n_params"], r["GB_s"]) for r in rows if r["contender"] == c and r["set"] == sweep)
                    if pts:
                        ax.plot(*zip(*pts), ls, color=colors[c], marker=".",
                                label=c if sweep == "single" else f"{c} (1-D)")
            if ceiling_gbs:
                ax.axhline(ceiling_gbs, color="black", ls="--", lw=1, label="memory copy ceiling")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("parameters in the single tensor")
            ax.set_ylabel("GB/s")
            ax.set_title("single-tensor sweep" + (" (dotted: 1-D)" if "single:1d" in sweeps else ""))
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"Optimizer step, {title}")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", default=None, help="comma list of torch.set_num_threads values (CPU; default: current)")
    p.add_argument("--dtype", default="fp32", help="comma list of param dtypes: fp32,bf16,fp16")
    p.add_argument("--sets", default="resnet50,gpt2-small,many-small,single",
                   help="comma list: resnet50, gpt2-small, gpt2-medium, many-small, single, single:1d")
    p.add_argument("--single-range", default=None,
                   help="log2 sizes for the single sweeps, LO:HI[:STEP] (default 10:26:2 on CPU, 16:28 on CUDA)")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help="comma list filter")
    p.add_argument("--reps", type=int, default=None, help="timed steps per contender (default: adaptive, see --target-s)")
    p.add_argument("--target-s", type=float, default=None, help="adaptive reps: timed seconds per contender and set (CPU 0.3, CUDA 0.2)")
    p.add_argument("--min-reps", type=int, default=5)
    p.add_argument("--max-reps", type=int, default=100)
    p.add_argument("--ref-reps", type=int, default=3, help="max timed steps of neptune-reference")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per contender first (the first builds state)")
    p.add_argument("--rounds", type=int, default=2, help="blocked mode: blocks per contender (ABBA order)")
    p.add_argument("--mem-gb", type=float, default=None,
                   help="interleave when all contenders' tensors fit (default CPU 6, CUDA 60%% of free memory)")
    p.add_argument("--reference-all", action="store_true", help=f"run the reference on every set (default: sets <= {REFERENCE_LIMIT})")
    p.add_argument("--no-launches", action="store_true", help="CUDA: skip the profiler launch count")
    p.add_argument("--out-dir", default=os.path.join(REPO, "bench", "results"))
    p.add_argument("--tag", default="", help="appended to the output file names")
    p.add_argument("--quick", action="store_true", help="tiny stand-in sets, few reps (smoke tests); files get _quick")
    args = p.parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.reps = args.reps or 3
        args.warmup = min(args.warmup, 1)
    if args.target_s is None:
        args.target_s = 0.3 if args.device == "cpu" else 0.2
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    dtype_names = [d.strip() for d in args.dtype.split(",") if d.strip()]
    for d in dtype_names:
        if d not in DTYPES:
            raise SystemExit(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    wanted = [c.strip() for c in args.contenders.split(",") if c.strip()]
    for c in wanted:
        if c not in CONTENDERS:
            raise SystemExit(f"unknown contender {c!r}; choose from {', '.join(CONTENDERS)}")
    single_range = None
    if args.single_range:
        parts = [int(x) for x in args.single_range.split(":")]
        single_range = (parts[0], parts[1], parts[2] if len(parts) > 2 else 1)
    sets: list[ParamSet] = []
    for name in (s.strip() for s in args.sets.split(",") if s.strip()):
        try:
            sets += build_sets(name, device, quick=args.quick, single_range=single_range)
        except ValueError as e:
            raise SystemExit(str(e))
    default_threads = torch.get_num_threads()
    thread_list = [int(t) for t in args.threads.split(",")] if (args.threads and device == "cpu") else [default_threads]

    contenders, notes = available_contenders(device, wanted)
    if not contenders:
        raise SystemExit("no contender to run: " + "; ".join(notes))
    args._contenders, args._notes = contenders, notes
    if "neptune-reference" in contenders and not args.reference_all:
        notes.append(f"neptune-reference: skipped on sets above {REFERENCE_LIMIT[device]:,} params "
                     f"or {REFERENCE_TENSOR_LIMIT[device]:,} tensors (--reference-all to run it), "
                     f"at most {args.ref_reps} timed steps")
    if "adamw-fused" not in contenders:
        notes.append("adamw-fused not run: ratio_to_adamw_fused left empty")

    l2 = 0
    if device == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or 50 * 2**20
        free, _ = torch.cuda.mem_get_info()
        mem_budget = int((args.mem_gb * 2**30) if args.mem_gb else 0.6 * free)
        args._copy_bytes = (64 if args.quick else 2048) * 2**20
    else:
        mem_budget = int((args.mem_gb or 6.0) * 2**30)
        args._copy_bytes = (16 if args.quick else 256) * 2**20
    timer = Timer(device, l2)
    log(f"bench_step: {device}, dtypes {dtype_names}, threads {thread_list}, {len(sets)} sets, contenders {contenders}")
    for n in notes:
        log(f"  note: {n}")

    all_rows: list[dict] = []
    args._paths = []
    t_start = time.perf_counter()
    try:
        for dtype_name in dtype_names:
            dtype = DTYPES[dtype_name]
            for threads in thread_list:
                if device == "cpu":
                    torch.set_num_threads(threads)
                args._dtype_name, args._threads = dtype_name, threads
                args._copy_gbs = copy_ceiling(device, args._copy_bytes)
                log(f"[{device} {dtype_name} t{threads}] copy ceiling {args._copy_gbs:.1f} GB/s")
                rows: list[dict] = []
                t_group = time.perf_counter()
                for pset in sets:
                    too_big = (pset.n_params > REFERENCE_LIMIT[device]
                               or len(pset.shapes) > REFERENCE_TENSOR_LIMIT[device])
                    cs = [c for c in contenders
                          if not (c == "neptune-reference" and not args.reference_all and too_big)]
                    if dtype != torch.float32:
                        cs = [c for c in cs if c != "deepspeed-cpu-adam"]
                    if dtype == torch.float64:
                        cs = [c for c in cs if c in FP64_CONTENDERS]
                    t0 = time.perf_counter()
                    cell = run_cell(pset, dtype, cs, args, timer, l2, mem_budget)
                    rows += cell
                    summary = ", ".join(f"{r['contender']} {r['median_ms']:.3g} ms (n={r['reps']})" for r in cell)
                    log(f"[{device} {dtype_name} t{threads}] {pset.name} {pset.note} {pset.n_params:,} params, "
                        f"{cell[0]['mode']}: {summary} [{time.perf_counter() - t0:.1f} s]")
                args._group_s = time.perf_counter() - t_group
                args._paths += write_outputs(rows, args, dtype_name, threads)
                log(f"[{device} {dtype_name} t{threads}] wrote {stem(args, dtype_name, threads)}.{{csv,md,png}} "
                    f"in {args.out_dir} ({time.perf_counter() - t_start:.0f} s so far)")
                all_rows += rows
        log(f"bench_step: done in {time.perf_counter() - t_start:.0f} s")
    finally:
        if device == "cpu":
            torch.set_num_threads(default_threads)
    return all_rows


if __name__ == "__main__":
    main()
