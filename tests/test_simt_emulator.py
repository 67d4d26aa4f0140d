"""The SIMT emulator itself (csrc/simt/) must be able to fail: kernels written to be wrong,
and mutated copies of the real kernel source, are each caught.

Built here, torch-free, with the host compiler (-O0: seconds each): tests/simt/bad_kernels.cpp
(one kernel per kind of bug) and tests/simt/step_driver.cpp, which runs a copy of
csrc/cuda/kernels.cu on a fixed mixed case (warp, block and chunked units, fp32/bf16/
fp16 params, fp32 and bf16 state, a param misaligned against its state) and prints a hash
of every output. A mutant is caught when the emulator reports an error, when the four
schedules disagree (a race), or when its outputs differ from the unmutated kernel's.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
KERNEL = os.path.join(CSRC, "cuda", "kernels.cu")
CXX = os.environ.get("CXX", "g++")
SCHEDULES = (0, 1, 2, 3)

pytestmark = pytest.mark.skipif(shutil.which(CXX) is None, reason=f"no host C++ compiler ({CXX})")

# (what the mutation plants, text in the kernel, replacement): each text must occur once.
MUTANTS = {
    "barrier removed from the block reduction": (
        "      sb[warp] = b;\n    }\n    __syncthreads();\n", "      sb[warp] = b;\n    }\n"),
    "lanes past a unit's end return before the shuffles": (
        "int64_t n, int tid) {\n  float s = 1.f;\n", "int64_t n, int tid) {\n  if (tid >= n) return;\n  float s = 1.f;\n"),
    "half a block skips the norm reduction": (
        "  float s = 1.f;\n  if (c.clip > 0.f) {\n    float w_sq, g_sq;\n    group_norms<D, S, BLOCK>",
        "  float s = 1.f;\n  if (c.clip > 0.f && (!BLOCK || tid < kThreads / 2)) {\n    float w_sq, g_sq;\n"
        "    group_norms<D, S, BLOCK>"),
    "alignment fallback removed": (
        "  if ((((uintptr_t)(w + h) | (uintptr_t)(g + h) | (uintptr_t)(m + h) | (uintptr_t)(v + h)) & 15u) != 0) h = n;\n",
        ""),
    "chunk blocks read the norm partials in the launch that writes them": (
        "      a.norm_partials[2 * w.long_index + 1] = g_sq;\n    }\n    return;\n",
        "      a.norm_partials[2 * w.long_index + 1] = g_sq;\n    }\n"),
    "bf16 state: exp_avg_sq rounded with exp_avg's random bits": (
        "store_state<S, VEC>(v + i, vf, uoff + i, sr_step, 1);", "store_state<S, VEC>(v + i, vf, uoff + i, sr_step, 0);"),
}


def _compile(out: str, *sources: str, defines: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = [CXX, "-std=c++17", "-O0", "-ffp-contract=off", f"-I{CSRC}", *(f"-D{d}" for d in defines), *sources,
           "-o", out]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    d = tmp_path_factory.mktemp("simt")
    sched = str(d / "scheduler.o")
    r = subprocess.run([CXX, "-std=c++17", "-O0", f"-I{CSRC}", "-c", os.path.join(CSRC, "simt", "scheduler.cpp"), "-o", sched],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    src = open(KERNEL).read()
    jobs = {"bad_kernels": ([os.path.join(ROOT, "tests", "simt", "bad_kernels.cpp")], ())}
    variants = {"original": src}
    for name, (old, new) in MUTANTS.items():
        assert src.count(old) == 1, f"mutation '{name}' no longer applies: update it with the kernel"
        variants[name] = src.replace(old, new)
    for k, (name, text) in enumerate(variants.items()):
        path = d / f"kernel_{k}.cu"
        path.write_text(text)
        jobs[name] = ([os.path.join(ROOT, "tests", "simt", "step_driver.cpp")], (f'NEPTUNE_KERNEL_SOURCE="{path}"',))
    exes = {name: str(d / f"exe_{k}") for k, name in enumerate(jobs)}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        futures = {n: pool.submit(_compile, exes[n], *srcs, sched, defines=defs) for n, (srcs, defs) in jobs.items()}
        for n, f in futures.items():
            r = f.result()
            assert r.returncode == 0, f"{n}: {r.stderr[-3000:]}"
    return exes


def _run(exe: str, *args: str) -> str:
    r = subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode in (0, 3), f"{exe} {args}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout.strip()


@pytest.mark.parametrize("kernel,expected", [
    ("shfl_after_exit", r"__shfl_xor_sync at bad_kernels.cpp:\d+ \(mask 0xffffffff\): lane 16 of warp 0 has exited"),
    ("shfl_absent_lanes", r"lane 16 of warp 1 does not exist \(the block has 48 threads\)"),
    ("shfl_outside_mask", r"bad_kernels.cpp:\d+: lane 3 reads lane 19, outside the mask 0x0000ffff"),
    ("shfl_not_in_own_mask", r"bad_kernels.cpp:\d+: called by lane \d+, which is not in its mask 0x0000ffff"),
    ("barrier_after_exit", r"__syncthreads at bad_kernels.cpp:\d+ reached by 127 threads after 1 threads"),
    ("different_barriers", r"different barriers: thread \d+ at bad_kernels.cpp:(\d+), thread \d+ at bad_kernels.cpp:(?!\1)"),
    ("same_line_other_copy", r"different barriers: .*bad_kernels.cpp:(\d+), .*bad_kernels.cpp:\1 \(another inlined copy\)"),
    ("shuffle_meets_barrier", r"__shfl_xor_sync at bad_kernels.cpp:\d+ .*lane \d+ waits at __syncthreads at bad_kernels"),
    ("misaligned_vector", r"misaligned 16-byte vector load at 0x[0-9a-f]+ \(bad_kernels.cpp:\d+\)"),
    ("bad_config", r"launch: cudaErrorInvalidConfiguration"),
])
def test_bug_is_reported_with_file_and_line(build, kernel, expected):
    import re

    for s in SCHEDULES:
        out = _run(build["bad_kernels"], kernel, str(s))
        assert out.startswith("ERROR"), out
        assert re.search(expected, out), out


def test_shared_memory_is_poisoned_between_blocks(build):
    # A block reads a shared slot no thread of it wrote: 0xFF bytes, a NaN, in every block.
    out = _run(build["bad_kernels"], "shared_read_before_write", "0")
    assert out.startswith("OK") and out.endswith("nans=4"), out


@pytest.mark.parametrize("kernel", ["shared_missing_barrier", "blocks_race"])
def test_races_make_schedules_disagree(build, kernel):
    outs = {_run(build["bad_kernels"], kernel, str(s)) for s in SCHEDULES}
    assert all(o.startswith("OK") for o in outs)
    assert len(outs) > 1, f"{kernel}: every schedule gave {outs}"


def test_correct_kernel_agrees_under_every_schedule(build):
    outs = {_run(build["bad_kernels"], "correct_reduction", str(s)) for s in SCHEDULES}
    assert len(outs) == 1 and next(iter(outs)).endswith("nans=0"), outs


def test_original_kernel_agrees_under_every_schedule(build):
    outs = {_run(build["original"], str(s)) for s in SCHEDULES}
    assert len(outs) == 1 and next(iter(outs)).startswith("HASH"), outs


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_planted_kernel_bug_is_caught(build, mutant):
    original = _run(build["original"], "0")
    outs = [_run(build[mutant], str(s)) for s in SCHEDULES]
    errors = [o for o in outs if o.startswith("ERROR")]
    caught = bool(errors) or len(set(outs)) > 1 or outs[0] != original
    assert caught, f"{mutant}: not caught ({outs[0]} under every schedule, as the original)"
    for e in errors:  # a reported bug names the kernel file and a line
        assert "kernel_" in e and ".cu:" in e, e


@pytest.mark.parametrize("snippet,message", [
    ("__global__ void k(float* o) { __shared__ float s[32]; o[0] = s[0]; }", "declare shared memory with NEPTUNE_SHARED"),
    ("__global__ void k(float* o) { atomicAdd(o, 1.f); }", "atomicAdd"),
    ("__global__ void k(float* o) { o[0] = __ldg(o + 1); }", "__ldg"),
])
def test_unsupported_cuda_feature_fails_to_compile(tmp_path, snippet, message):
    src = tmp_path / "k.cpp"
    src.write_text('#include "simt/dialect.h"\n' + snippet + "\n")
    r = subprocess.run([CXX, "-std=c++17", "-fsyntax-only", f"-I{CSRC}", str(src)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and message in r.stderr, r.stderr[-2000:]
