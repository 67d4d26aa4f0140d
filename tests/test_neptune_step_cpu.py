"""What only the CPU operator has: kernel sets (NEPTUNE_CPU_ISA) and threads, which must
not change a single bit, and the chunked path for long units. What every backend must do
is in test_operator_contract.py."""
import math

import pytest
import torch

import neptune_ext
from neptune_ext import neptune_step_
from neptune_ext import testing as T

pytestmark = pytest.mark.skipif(not neptune_ext.has_kernel("cpu"), reason="CPU extension not built")

SETS = T.cpu_kernel_sets()
CPU = [b for b in T.backends(every_cpu_kernel_set=False) if b.kernel_set is not None]
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def test_kernel_sets_are_listed_and_selectable(monkeypatch):
    # The newest set this machine runs is the default; each one listed can be picked.
    assert SETS and len(set(SETS)) == len(SETS)
    monkeypatch.delenv(T.CPU_ISA_ENV, raising=False)
    assert torch.ops.neptune_ext.cpu_isa() == SETS[-1]
    for s in SETS:
        monkeypatch.setenv(T.CPU_ISA_ENV, s)
        assert torch.ops.neptune_ext.cpu_isa() == s


def test_bad_kernel_set_env_raises(monkeypatch):
    monkeypatch.setenv(T.CPU_ISA_ENV, "sse9")
    with pytest.raises(ValueError, match=T.CPU_ISA_ENV):
        neptune_step_(*T.make_case([(4, 5)], torch.float32), **T.HYPER)


@pytest.mark.parametrize("state_dtype", T.STATE_DTYPES, ids=["fp32-state", "bf16-state"])
def test_kernel_sets_give_bitwise_identical_results(monkeypatch, state_dtype):
    for dtype in T.DTYPES:
        runs = []
        for s in SETS:
            monkeypatch.setenv(T.CPU_ISA_ENV, s)
            lists = T.make_case(T.SHAPES + T.LONG_SHAPES, dtype, seed=3, state_dtype=state_dtype)
            neptune_step_(*lists, **T.HYPER)
            runs.append(lists)
        for s, lists in zip(SETS[1:], runs[1:]):
            T.assert_lists_equal(lists, runs[0], f"{s} vs {SETS[0]}, {dtype}:")


def _extreme_case(dtype, seed, state_dtype):
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
    exp_avgs = [(torch.randn(p.shape, generator=gen) * 1e-2).to(state_dtype) for p in params]
    exp_avg_sqs = [(torch.rand(p.shape, generator=gen) * 1e-6).to(state_dtype) for p in params]
    steps = [torch.tensor(4.0) for _ in params]
    return T.StepLists(params, grads, exp_avgs, exp_avg_sqs, steps)


@pytest.mark.parametrize("state_dtype", T.STATE_DTYPES, ids=["fp32-state", "bf16-state"])
@pytest.mark.parametrize("flush_denormal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_params_bitwise_across_kernel_sets_at_extremes(monkeypatch, dtype, flush_denormal, state_dtype):
    runs = []
    try:
        torch.set_flush_denormal(flush_denormal)
        for s in SETS:
            monkeypatch.setenv(T.CPU_ISA_ENV, s)
            lists = _extreme_case(dtype, 11, state_dtype)
            neptune_step_(*lists, **{**T.HYPER, "lr": 50.0, "weight_decay": 1e-4})
            runs.append(lists)
    finally:
        torch.set_flush_denormal(False)
    ref = runs[0]
    # The case reaches what it is for.
    p_all = torch.cat([p.float().flatten() for p in ref.params])
    if not flush_denormal:
        assert ((p_all != 0) & (p_all.abs() < torch.finfo(dtype).smallest_normal)).any()
    assert p_all.isnan().any() and (p_all == -float("inf")).any() and (p_all.isfinite().mean(dtype=float) > 0.75)
    if dtype == torch.float16:
        assert (p_all[p_all.isfinite()].abs() > 6e4).any() and (p_all == float("inf")).any()
    assert torch.cat([m.float().flatten() for m in ref.exp_avgs]).isnan().any()  # NaN moments too
    for s, lists in zip(SETS[1:], runs[1:]):
        T.assert_lists_equal(lists, ref, f"{s} vs {SETS[0]}:")


@pytest.mark.parametrize("state_dtype", T.STATE_DTYPES, ids=["fp32-state", "bf16-state"])
@pytest.mark.parametrize("threads", [2, 3])
def test_bitwise_reproducible_across_thread_counts(threads, state_dtype):
    old = torch.get_num_threads()
    try:
        outs = []
        for n in (1, threads, threads):
            torch.set_num_threads(n)
            lists = T.make_case(T.SHAPES + T.LONG_SHAPES + [(300, 300)], torch.float32, seed=5,
                                state_dtype=state_dtype)
            neptune_step_(*lists, **T.HYPER)
            outs.append(lists)
        T.assert_lists_equal(outs[1], outs[0], f"{threads} threads vs 1:")
        T.assert_lists_equal(outs[2], outs[1], f"{threads} threads, second run:")
    finally:
        torch.set_num_threads(old)


# Units around the chunk length (32768): exactly one chunk, one element more, a remainder
# chunk in every row, several chunks.
CHUNK_SHAPES = [(32768,), (32769,), (3, 33001), (2, 98305)]


@pytest.mark.parametrize("backend", CPU, ids=[b.name for b in CPU])
@pytest.mark.parametrize("dtype", T.DTYPES, ids=str)
@pytest.mark.parametrize(
    "variant",
    [{}, {"cautious": False}, {"clip": 0.0}, {"maximize": True}, {"clip": 0.02}, {"clip": 10.0}],
    ids=["default", "no-mask", "no-clip", "maximize", "hard-clip", "never-clipped"],
)
def test_chunked_units_match_reference(backend, dtype, variant):
    # Units longer than a chunk: per-chunk norm partials and agreement counts (counted for
    # s == 1 in the norms pass, recounted for clipped units), summed in chunk order.
    T.compare_with_reference(backend.step, CHUNK_SHAPES, dtype, {**T.HYPER, **variant}, n_steps=2)


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_opcheck(tensor_lr):
    kwargs = dict(T.HYPER)
    op = torch.ops.neptune_ext.neptune_step_.default
    if tensor_lr:
        kwargs["lr"] = torch.tensor(kwargs["lr"])
        op = torch.ops.neptune_ext.neptune_step_.tensor_lr
    torch.library.opcheck(op, tuple(T.make_case([(4, 5), (7,), (0,)], torch.float32)), kwargs)
