"""Smoke tests of the step microbenchmark (bench/bench_step.py: runs its main() on tiny
sets and checks the files it writes, plus the shapes of the named parameter sets) and of
bench/cpu_isa_ab.py."""
import csv
import math
import os
import subprocess
import sys

import pytest
import torch

import neptune_ext

from scripts import BENCH, load_bench

_load = load_bench


step_sets = _load("step_sets")


def _load_bench():
    return _load("bench_step")


def test_named_set_sizes():
    r50 = step_sets.build_sets("resnet50", "cpu")[0]
    assert (r50.n_tensors, r50.n_params) == (161, 25_557_032)
    g_s = step_sets.build_sets("gpt2-small", "cpu")[0]
    assert (g_s.n_tensors, g_s.n_params) == (148, 124_439_808)
    assert g_s.shapes[0] == (50257, 768) and (2304, 768) in g_s.shapes and (768, 3072) in g_s.shapes
    g_m = step_sets.build_sets("gpt2-medium", "cpu")[0]
    assert (g_m.n_tensors, g_m.n_params) == (292, 354_823_168)
    ms = step_sets.build_sets("many-small", "cpu")[0]
    assert ms.n_tensors == 10_000 and set(ms.shapes) == {(1000,)}
    cpu_single = step_sets.build_sets("single", "cpu")
    assert [s.n_params for s in cpu_single] == [2**k for k in range(10, 27, 2)]
    assert cpu_single[-1].shapes == ((2**16, 1024),)
    assert [s.n_params for s in step_sets.build_sets("single", "cuda")] == [2**k for k in range(16, 29)]
    assert step_sets.build_sets("single:1d", "cpu")[0].shapes == ((1024,),)


def test_resnet50_matches_torchvision():
    tv = pytest.importorskip("torchvision")
    model = tv.models.resnet50(weights=None)
    assert step_sets.resnet50_shapes() == [tuple(p.shape) for p in model.parameters()]


def test_bench_step_quick_run(tmp_path):
    bench = _load_bench()
    contenders = "neptune-op,neptune-op-bf16-state,neptune-optimizer,neptune-reference,adamw-foreach,adamw-fused"
    try:  # the timm composite runs when timm is installed (CI installs it)
        import timm  # noqa: F401

        contenders += ",timm-agc-cadamw-foreach,timm-agc-cadamw-forloop"
    except ImportError:
        pass
    n_contenders = len(contenders.split(","))
    rows = bench.main([
        "--quick", "--device", "cpu", "--threads", "1", "--dtype", "fp32,bf16",
        "--sets", "resnet50,many-small,single", "--single-range", "10:12:2",
        "--contenders", contenders, "--reps", "3", "--out-dir", str(tmp_path),
    ])
    for dt in ("fp32", "bf16"):
        for ext in ("csv", "md", "png"):
            path = tmp_path / f"step_cpu_{dt}_t1_quick.{ext}"
            assert path.is_file() and path.stat().st_size > 0, path

    with open(tmp_path / "step_cpu_fp32_t1_quick.csv") as f:
        got = list(csv.DictReader(f))
    required = ["set", "n_tensors", "n_params", "dtype", "threads", "contender", "median_ms", "p20_ms",
                "p80_ms", "bytes_per_step", "GB_s", "ratio_to_adamw_fused", "ratio_to_neptune", "frac_of_copy",
                "launches"]
    assert all(c in got[0] for c in required)
    # 4 sets (resnet50, many-small, single 2^10, 2^12) x the contenders
    assert len(got) == 4 * n_contenders
    assert {r["contender"] for r in got} == set(contenders.split(","))
    for r in got:
        med, p20, p80 = float(r["median_ms"]), float(r["p20_ms"]), float(r["p80_ms"])
        assert 0 < p20 <= med <= p80 and math.isfinite(p80)
        assert float(r["GB_s"]) > 0 and int(r["reps"]) >= 1
        n = int(r["n_params"])
        # fp32: 28 bytes per param for Neptune and AdamW alike; 20 with the bf16 state
        per = 20 if r["contender"] == "neptune-op-bf16-state" else 28
        assert int(r["bytes_per_step"]) == per * n, r
        assert math.isclose(float(r["GB_s"]), per * n / (med * 1e-3) / 1e9, rel_tol=1e-3)
        assert r["frac_of_copy"] == "" and r["launches"] == ""  # CUDA only
        if r["contender"] == "adamw-fused":
            assert math.isclose(float(r["ratio_to_adamw_fused"]), 1.0)
        else:
            assert float(r["ratio_to_adamw_fused"]) > 0
        if r["contender"] == "neptune-optimizer":
            assert math.isclose(float(r["ratio_to_neptune"]), 1.0)
        mine = [x for x in got if x["set"] == r["set"] and x["n_params"] == r["n_params"]]
        neptune = next(float(x["median_ms"]) for x in mine if x["contender"] == "neptune-optimizer")
        assert math.isclose(float(r["ratio_to_neptune"]), med / neptune, rel_tol=1e-3)
    single = [r for r in got if r["set"] == "single"]
    assert sorted({int(r["n_params"]) for r in single}) == [1024, 4096]

    # bf16 params: Neptune keeps fp32 state (22 B/param) unless asked for the bf16 state,
    # torch AdamW bf16 state (14 B/param)
    bf = [r for r in rows if r["dtype"] == "bf16"]
    for r in bf:
        fp32_state = r["contender"].startswith("neptune") and r["contender"] != "neptune-op-bf16-state"
        per = 22 if fp32_state else 14  # timm's cadamw: bf16 state, like AdamW
        assert r["bytes_per_step"] == per * r["n_params"], r

    md = (tmp_path / "step_cpu_bf16_t1_quick.md").read_text()
    assert "torch " + torch.__version__ in md and "git:" in md and "threads: 1" in md
    header = next(line for line in md.splitlines() if line.startswith("| set"))
    for col in ("contender", "median_ms", "p20_ms", "p80_ms", "GB_s", "ratio_to_adamw_fused", "ratio_to_neptune"):
        assert col in header
    table = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| set")]
    assert len(table) == 4 * n_contenders
    if "timm" in contenders:
        assert "composite" in md and "normalised per tensor rather than per unit" in md


def test_plot_draws_named_sets_as_grouped_bars_and_the_sweep_as_lines():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    bench = _load_bench()
    rows = [dict(set=s, n_params=n, contender=c, GB_s=g)
            for s, n in (("resnet50", 25_557_032), ("many-small", 10_000_000))
            for c, g in (("neptune-op", 10.0), ("adamw-fused", 8.0), ("timm-agc-cadamw-foreach", 2.0))]
    rows += [dict(set="single", n_params=2**k, contender=c, GB_s=k * f)
             for k in (10, 12) for c, f in (("neptune-op", 1.0), ("adamw-fused", 0.5))]
    fig = bench.figure(rows, "test", ceiling_gbs=20.0)
    bars, lines = fig.axes
    assert len(bars.containers) == 3  # one bar group per contender
    assert [len(c) for c in bars.containers] == [2, 2, 2]  # one bar per set
    assert [t.get_text() for t in bars.get_xticklabels()] == ["resnet50", "many-small"]
    assert any(list(line.get_ydata()) == [20.0, 20.0] for line in bars.get_lines())  # the ceiling
    assert {line.get_label() for line in lines.get_lines()} >= {"neptune-op", "adamw-fused"}
    plt.close(fig)


def test_bench_step_rejects_unknown_set(tmp_path):
    bench = _load_bench()
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--sets", "nope", "--out-dir", str(tmp_path)])


def test_bench_step_blocked_mode(tmp_path):
    """Sets too big for --mem-gb run one contender at a time, in ABBA blocks."""
    bench = _load_bench()
    rows = bench.main([
        "--quick", "--device", "cpu", "--threads", "1", "--sets", "many-small", "--mem-gb", "0.0001",
        "--contenders", "neptune-op,adamw-fused", "--reps", "4", "--out-dir", str(tmp_path),
    ])
    assert [r["contender"] for r in rows] == ["neptune-op", "adamw-fused"]
    for r in rows:
        assert r["mode"] == "blocked" and r["reps"] == 4 and r["median_ms"] > 0
        assert r["bytes_per_step"] == 28 * r["n_params"]


@pytest.mark.skipif(not neptune_ext.has_kernel("cpu"), reason="CPU extension not built")
def test_cpu_isa_ab_quick():
    """bench/cpu_isa_ab.py times every kernel set this machine runs (its default) on a tiny
    set, and rejects a set it cannot run."""
    sets = list(torch.ops.neptune_ext.cpu_kernel_sets())
    script = os.path.join(BENCH, "cpu_isa_ab.py")
    out = subprocess.run([sys.executable, script, "--quick", "--steps", "3", "--dtype", "bf16"],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    rows = [line.split() for line in out.splitlines() if "median" in line]
    assert [r[0] for r in rows] == sets and all(float(r[2]) > 0 for r in rows), out
    bad = subprocess.run([sys.executable, script, "--quick", "--isas", f"{sets[0]},no-such-set"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no-such-set not runnable here" in bad.stderr, bad.stderr
