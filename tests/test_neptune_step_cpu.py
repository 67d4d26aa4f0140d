"""The CPU operator against the reference, and its own contract (validation, determinism)."""
import math
import os

import pytest
import torch

import neptune_ext
from neptune_ext import neptune_step_, neptune_step_reference_multi
from neptune_inputs import (
    LONG_SHAPES, SHAPES, assert_nonfinite_close, assert_param_close, assert_state_close, clone_all, make_case,
    make_grads,
)

pytestmark = pytest.mark.skipif(not neptune_ext.has_kernel("cpu"), reason="CPU extension not built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8, clip=0.1, cautious=True, maximize=False)


def _supported_isas():
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    isas = ["scalar"]
    if all(f in flags for f in (" avx2", " fma", " f16c", " bmi2")):
        isas.append("avx2")
    if all(f in flags for f in (" avx512f", " avx512bw", " avx512vl", " avx512dq")):
        isas.append("avx512")
        if " avx512_bf16" in flags:
            isas.append("avx512bf16")
    return isas


ISAS = _supported_isas()


@pytest.fixture
def isa(request, monkeypatch):
    monkeypatch.setenv("NEPTUNE_CPU_ISA", request.param)
    assert torch.ops.neptune_ext.cpu_isa() == request.param
    return request.param


def _compare_steps(shapes, dtype, hyper, n_steps=3, seed=0, grad_scale=None):
    """Several steps; each one compared against the reference run from the op's state."""
    gs_value = 1.0 if grad_scale is None else grad_scale
    P, G, M, V, S = make_case(shapes, dtype, seed=seed, clip=hyper["clip"], beta1=hyper["beta1"],
                              maximize=hyper["maximize"], grad_scale=gs_value)
    gen = torch.Generator().manual_seed(seed + 1)
    scale_t = None if grad_scale is None else torch.tensor(float(grad_scale))
    for step in range(n_steps):
        if step > 0:
            G = make_grads(P, M, clip=hyper["clip"], beta1=hyper["beta1"], maximize=hyper["maximize"],
                           grad_scale=gs_value, generator=gen)
        rP, rM, rV, rS = clone_all([P, M, V, S])
        neptune_step_(P, G, M, V, S, **hyper, grad_scale=scale_t)
        neptune_step_reference_multi(rP, G, rM, rV, rS, **hyper, grad_scale=scale_t)
        for i in range(len(P)):
            what = f"step {step} tensor {i} shape {tuple(P[i].shape)} {dtype}"
            assert_param_close(P[i], rP[i], "param " + what)
            assert_state_close(M[i], rM[i], "exp_avg " + what)
            assert_state_close(V[i], rV[i], "exp_avg_sq " + what)
            assert S[i].item() == rS[i].item()
    return P


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"cautious": False},
        {"clip": 0.0},
        {"clip": 0.0, "cautious": False},
        {"maximize": True},
        {"clip": 0.02, "weight_decay": 0.0, "beta1": 0.0},
    ],
    ids=["default", "no-mask", "no-clip", "adamw", "maximize", "hard-clip"],
)
def test_op_matches_reference(isa, dtype, variant):
    _compare_steps(SHAPES, dtype, {**HYPER, **variant})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "variant",
    [{}, {"cautious": False}, {"clip": 0.0}, {"maximize": True}, {"clip": 0.02}, {"clip": 10.0}],
    ids=["default", "no-mask", "no-clip", "maximize", "hard-clip", "never-clipped"],
)
def test_long_units_match_reference(dtype, variant):
    # Units longer than the in-cache limit take the chunked path (with the s == 1 counts
    # from the norms pass, and a recount for clipped units).
    _compare_steps(LONG_SHAPES + [(3, 33001)], dtype, {**HYPER, **variant}, n_steps=2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_scale_unscales_inside(dtype):
    _compare_steps(SHAPES, dtype, HYPER, n_steps=2, grad_scale=1024.0)


def test_every_element_written():
    # Every element of a unit with a gradient must be written: M and V always change; a
    # weight may land on its old value by coincidence, but then so does the reference's.
    P, G, M, V, S = make_case(SHAPES + LONG_SHAPES, torch.float32, zero_frac=0.0)
    before = clone_all([P, M, V])
    rP, rM, rV, rS = clone_all([P, M, V, S])
    hyper = {**HYPER, "cautious": False}
    neptune_step_(P, G, M, V, S, **hyper)
    neptune_step_reference_multi(rP, G, rM, rV, rS, **hyper)
    for name, old, new, ref in zip("PMV", before, [P, M, V], [rP, rM, rV]):
        for i, (a, b, r) in enumerate(zip(old, new, ref)):
            live = G[i] != 0
            unchanged = (a == b) & live
            assert torch.equal(unchanged, (a == r) & live), f"{name}[{i}] has unwritten elements"
            if name != "P":
                assert not unchanged.any(), f"{name}[{i}] has unwritten elements"


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_isas_give_bitwise_identical_results(monkeypatch, state_dtype):
    results = []
    for isa in ISAS:
        monkeypatch.setenv("NEPTUNE_CPU_ISA", isa)
        for dtype in DTYPES:
            P, G, M, V, S = make_case(SHAPES + LONG_SHAPES, dtype, seed=3)
            M, V = [m.to(state_dtype) for m in M], [v.to(state_dtype) for v in V]
            neptune_step_(P, G, M, V, S, **HYPER)
            results.append((isa, dtype, P, M, V))
    by_dtype = {}
    for isa, dtype, *out in results:
        by_dtype.setdefault(dtype, []).append((isa, out))
    for dtype, runs in by_dtype.items():
        (isa0, ref), rest = runs[0], runs[1:]
        for isa, out in rest:
            for a_list, b_list in zip(ref, out):
                for a, b in zip(a_list, b_list):
                    assert torch.equal(a, b), f"{isa} differs from {isa0} for {dtype}"


def _extreme_case(dtype, seed):
    """Weights over the exponent range of `dtype` (down to its denormals; for fp16 up to
    its max), a unit with NaN gradients, one with -inf weights, one with NaN-with-payload
    weights. The stored weights include denormals (masked elements: W * decay), overflow
    (fp16, lr 50) and NaNs, where the hardware 16-bit conversions (F16C, AVX512-BF16)
    differ from the emulated ones unless the kernel steps around them."""
    gen = torch.Generator().manual_seed(seed)
    info = torch.finfo(dtype)
    lo, hi = math.log2(info.smallest_normal) - 6, min(math.log2(info.max), 60.0)  # |W|^2 finite in fp32
    params, grads = [], []
    for shape in [(9, 1031), (64, 3, 3, 3), (1037,)]:
        sign = torch.randint(0, 2, shape, generator=gen).float() * 2 - 1
        w = sign * torch.exp2(lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64)).float()
        g = torch.randn(shape, generator=gen) * 1e-3
        w.view(-1)[::97] = 0.0
        params.append(w.to(dtype))
        grads.append(g.to(dtype))
    params[0][6] = params[0][6].sign() * min(info.max * 0.99, 2.0**60)  # fp16: a step from overflow
    grads[0][7, 5::50] = float("nan")
    params[0][8, 3::40] = -float("inf")
    payload_nan = 0x7E55 if dtype == torch.float16 else 0x7FD5  # a quiet NaN with payload bits
    params[0].view(torch.int16)[4, 1::40] = payload_nan
    exp_avgs = [torch.randn(p.shape, generator=gen) * 1e-2 for p in params]
    exp_avg_sqs = [torch.rand(p.shape, generator=gen) * 1e-6 for p in params]
    steps = [torch.tensor(4.0) for _ in params]
    return params, grads, exp_avgs, exp_avg_sqs, steps


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("flush_denormal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_params_bitwise_across_isas_at_extremes(monkeypatch, dtype, flush_denormal, state_dtype):
    runs = []
    try:
        torch.set_flush_denormal(flush_denormal)
        for isa in ISAS:
            monkeypatch.setenv("NEPTUNE_CPU_ISA", isa)
            P, G, M, V, S = _extreme_case(dtype, seed=11)
            M, V = [m.to(state_dtype) for m in M], [v.to(state_dtype) for v in V]
            neptune_step_(P, G, M, V, S, lr=50.0, beta1=0.9, beta2=0.999, weight_decay=1e-4, eps=1e-8, clip=0.1,
                          cautious=True, maximize=False)
            runs.append((isa, P, M, V))
    finally:
        torch.set_flush_denormal(False)
    isa0, *ref = runs[0]
    # The case reaches what it is for.
    p_all = torch.cat([p.float().flatten() for p in ref[0]])
    if not flush_denormal:
        assert ((p_all != 0) & (p_all.abs() < torch.finfo(dtype).smallest_normal)).any()
    assert p_all.isnan().any() and (p_all == -float("inf")).any() and (p_all.isfinite().mean(dtype=float) > 0.75)
    if dtype == torch.float16:
        assert (p_all[p_all.isfinite()].abs() > 6e4).any() and (p_all == float("inf")).any()
    assert torch.cat([m.float().flatten() for m in ref[1]]).isnan().any()  # NaN moments too
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
    for isa, *out in runs[1:]:
        for name, a_list, b_list in zip("PMV", ref, out):
            for i, (a, b) in enumerate(zip(a_list, b_list)):
                assert torch.equal(a.view(bits[a.dtype]), b.view(bits[b.dtype])), f"{name}[{i}]: {isa} != {isa0}"


@pytest.mark.parametrize("threads", [2, 3])
def test_bitwise_reproducible_across_thread_counts(threads):
    old = torch.get_num_threads()
    try:
        outs = []
        for n in (1, threads):
            torch.set_num_threads(n)
            P, G, M, V, S = make_case(SHAPES + LONG_SHAPES + [(300, 300)], torch.float32, seed=5)
            neptune_step_(P, G, M, V, S, **HYPER)
            outs.append(P + M + V)
        for a, b in zip(*outs):
            assert torch.equal(a, b)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("clip", [0.0, 0.1], ids=["no-clip", "clip"])
def test_nonfinite_grads_match_reference(isa, clip):
    """NaN / inf gradient elements count as active (G != 0 is true for NaN), so they set
    rho for the rest of their unit exactly as in the reference; with clipping on the
    unit's norm is non-finite and the whole unit follows the reference's NaNs."""
    shapes = [(5, 1031), (37,), (3, 40)]
    P, G, M, V, S = make_case(shapes, torch.float32, clip=clip)
    G[0][1, 7] = float("nan")
    G[0][2, 1030] = float("inf")
    G[0][4, 3] = -float("inf")
    G[1][20] = float("nan")
    G[2][0, 33] = float("nan")  # in the vector tail of a 40-element unit
    hyper = {**HYPER, "clip": clip}
    rP, rM, rV, rS = clone_all([P, M, V, S])
    neptune_step_(P, G, M, V, S, **hyper)
    neptune_step_reference_multi(rP, G, rM, rV, rS, **hyper)
    for i in range(len(P)):
        for name, got, want in (("param", P[i], rP[i]), ("exp_avg", M[i], rM[i]), ("exp_avg_sq", V[i], rV[i])):
            assert torch.isfinite(want).any() or clip > 0
            assert_nonfinite_close(got, want, f"{name} {i}")


@pytest.mark.parametrize("step", [0.0, 9999.0, 3e6])
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.0, 0.0), (0.99, 0.99999)], ids=["default", "zero", "high"])
@pytest.mark.parametrize("lr", [0.0, 1e-2])
def test_folded_bias_corrections_match_reference(step, betas, lr):
    """The op folds lr, eps and the bias corrections into two per-tensor constants; at the
    first step, deep into training and for extreme betas it still agrees with the spec's
    literal (M / bc1) / (sqrt(V / bc2) + eps)."""
    hyper = {**HYPER, "lr": lr, "beta1": betas[0], "beta2": betas[1]}
    P, G, M, V, S = make_case(SHAPES, torch.float32, step=step, clip=hyper["clip"], beta1=betas[0])
    rP, rM, rV, rS = clone_all([P, M, V, S])
    neptune_step_(P, G, M, V, S, **hyper)
    neptune_step_reference_multi(rP, G, rM, rV, rS, **hyper)
    for i in range(len(P)):
        assert_param_close(P[i], rP[i], f"param {i} step {step} betas {betas} lr {lr}")
        assert_state_close(M[i], rM[i], f"exp_avg {i}")
        assert_state_close(V[i], rV[i], f"exp_avg_sq {i}")


@pytest.mark.parametrize("eps", [1e-45, 1e-30])
def test_tiny_eps_keeps_untouched_elements_finite(eps):
    """eps is folded into eps * sqrt(bc2) in float: it must not round to 0, or an element
    with no gradient and no history would compute 0 / 0."""
    P = [torch.randn(4, 33)]
    G = [torch.zeros(4, 33)]
    G[0][0] = torch.randn(33)  # one unit with a gradient, three without
    M, V, S = [torch.zeros(4, 33)], [torch.zeros(4, 33)], [torch.zeros(())]
    rP, rM, rV, rS = clone_all([P, M, V, S])
    hyper = {**HYPER, "eps": eps, "clip": 0.0}
    neptune_step_(P, G, M, V, S, **hyper)
    neptune_step_reference_multi(rP, G, rM, rV, rS, **hyper)
    assert torch.isfinite(P[0]).all()
    assert_param_close(P[0], rP[0], f"eps={eps}")


def test_zero_size_tensors_advance_step():
    P = [torch.empty(0), torch.empty(3, 0)]
    G = [torch.empty(0), torch.empty(3, 0)]
    M = [torch.empty(0), torch.empty(3, 0)]
    V = [torch.empty(0), torch.empty(3, 0)]
    S = [torch.tensor(0.0), torch.tensor(5.0)]
    neptune_step_(P, G, M, V, S, **HYPER)
    assert [s.item() for s in S] == [1.0, 6.0]


def test_tensor_lr_equals_float_lr():
    P, G, M, V, S = make_case(SHAPES, torch.float32)
    P2, M2, V2, S2 = clone_all([P, M, V, S])
    hyper = dict(HYPER)
    neptune_step_(P, G, M, V, S, **hyper)
    hyper["lr"] = torch.tensor(hyper["lr"])
    neptune_step_(P2, G, M2, V2, S2, **hyper)
    for a, b in zip(P + M + V, P2 + M2 + V2):
        assert torch.equal(a, b)


def test_channels_last_param_matches_contiguous():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 8, 3, 3, generator=gen)
    g = torch.randn(16, 8, 3, 3, generator=gen) * 0.1
    cl = [t.to(memory_format=torch.channels_last) for t in (w, g)]
    outs = []
    for p, gr in ((w.clone(), g), cl):
        m = torch.zeros_like(p)
        v = torch.zeros_like(p)
        s = torch.tensor(0.0)
        for _ in range(2):
            neptune_step_([p], [gr], [m], [v], [s], **HYPER)
        outs.append(p.contiguous())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-7)


def _valid_lists():
    P, G, M, V, S = make_case([(4, 5), (6,)], torch.float32)
    return P, G, M, V, S


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda L: L[1].pop(), "same length"),
        (lambda L: L[2].__setitem__(1, L[2][1].double()), "float32"),
        (lambda L: L[1].__setitem__(1, L[1][1].half()), "dtype"),
        (lambda L: L[1].__setitem__(1, torch.zeros(7)), "shape"),
        (lambda L: L[3].__setitem__(1, torch.zeros(6, 1)), "shape"),
        (lambda L: L[4].__setitem__(1, torch.zeros(2)), "steps"),
        (lambda L: L[0].__setitem__(1, torch.zeros(6, dtype=torch.int32)), "dtype"),
        (lambda L: [L[i].__setitem__(1, torch.zeros(6, 2)[:, 0]) for i in (0, 1, 2, 3)], "dense"),
        (lambda L: L[4].__setitem__(1, L[4][0]), r"steps\[0\] and steps\[1\] are the same counter"),
    ],
    ids=["length", "state-dtype", "grad-dtype", "grad-shape", "state-shape", "step", "int-param", "strided",
         "shared-step"],
)
def test_invalid_lists_raise_and_change_nothing(mutate, message):
    lists = list(_valid_lists())
    mutate(lists)
    before = clone_all([lists[0], lists[2], lists[4]])
    with pytest.raises((RuntimeError, ValueError), match=message):
        neptune_step_(*lists, **HYPER)
    for old, new in zip(before, [lists[0], lists[2], lists[4]]):
        for a, b in zip(old, new):
            assert torch.equal(a, b), "a failed call must not write anything"


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("lr", -1.0, "lr must be >= 0"),
        ("beta1", 1.0, r"beta1 must be in \[0, 1\)"),
        ("beta2", -0.5, r"beta2 must be in \[0, 1\)"),
        ("eps", 0.0, "eps must be > 0"),
        ("weight_decay", -1e-3, "weight_decay must be >= 0"),
        ("clip", -0.1, "clip must be >= 0"),
    ],
)
def test_invalid_hyperparameters_raise_value_error(name, value, message):
    P, G, M, V, S = _valid_lists()
    before = clone_all([P, M, V, S])
    with pytest.raises(ValueError, match=message):
        neptune_step_(P, G, M, V, S, **{**HYPER, name: value})
    for old, new in zip(before, [P, M, V, S]):
        assert all(torch.equal(a, b) for a, b in zip(old, new))


def test_bad_isa_env_raises(monkeypatch):
    monkeypatch.setenv("NEPTUNE_CPU_ISA", "sse9")
    P, G, M, V, S = _valid_lists()
    with pytest.raises(ValueError, match="NEPTUNE_CPU_ISA"):
        neptune_step_(P, G, M, V, S, **HYPER)


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_opcheck(tensor_lr):
    P, G, M, V, S = make_case([(4, 5), (7,), (0,)], torch.float32)
    kwargs = dict(HYPER)
    op = torch.ops.neptune_ext.neptune_step_.default
    if tensor_lr:
        kwargs["lr"] = torch.tensor(kwargs["lr"])
        op = torch.ops.neptune_ext.neptune_step_.tensor_lr
    torch.library.opcheck(op, (P, G, M, V, S), kwargs)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("shape", [(4, 300), (4, 40000)], ids=["in-cache", "long"])
def test_spec_floors(isa, shape):
    # ||W_u|| below 1e-3, ||G_u|| below 1e-6 and rho below 1e-3: the floors decide.
    gen = torch.Generator().manual_seed(0)
    n = shape[1]
    W = torch.randn(shape, generator=gen)
    G = torch.randn(shape, generator=gen) * 0.1
    M = torch.randn(shape, generator=gen).abs() * 0.01 * G.sign()
    V = torch.rand(shape, generator=gen) * 1e-3
    W[0] = 0.0                      # ||W|| = 0: the 1e-3 floor
    G[1] = G[1] * 1e-9              # ||G|| ~ 1e-8: the 1e-6 floor (s = 1)
    M[2] = -G[2] * 100              # all but one disagree: rho = 1/n < 1e-3
    M[2, 0] = G[2, 0]
    W0 = W.clone()
    P, Gs, Ms, Vs = [W], [G], [M], [V]
    S = [torch.tensor(3.0)]
    rP, rM, rV, rS = clone_all([P, Ms, Vs, S])
    neptune_step_(P, Gs, Ms, Vs, S, **HYPER)
    neptune_step_reference_multi(rP, Gs, rM, rV, rS, **HYPER)
    assert_param_close(P[0], rP[0], "param")
    assert_state_close(Ms[0], rM[0], "exp_avg")
    # The one agreeing element of row 2 moved by lr * u / 1e-3, not by lr * u * n.
    moved = (P[0][2] - W0[2] * (1 - HYPER["lr"] * HYPER["weight_decay"])).abs()
    assert moved[0] > 0 and moved[1:].max() == 0
