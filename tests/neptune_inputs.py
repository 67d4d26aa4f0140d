"""Random inputs for comparing a fast Neptune path with the reference.

The rule is discontinuous where M_new * G crosses 0 (cautious mask) and where a unit's
gradient norm crosses the clip threshold, so two correct implementations may disagree
there by rounding alone. `make_case` builds random inputs with random signs (and some
exact zeros) and then moves every element and unit away from those edges:
- a unit whose clip ratio is within 1e-3 of 1 gets its gradient doubled;
- an element whose new moment would be within 1e-3 (relative) of 0 gets its gradient's
  sign flipped, which keeps the unit's norm, so the clip factor does not move.
"""
from __future__ import annotations

import torch

from neptune_ext.reference import units_view

# Odd shapes: 0-d, 1-d, a prime length, a conv filter bank, a prime row length, and
# units longer than the CPU kernel's in-cache limit (1-D and 2-D).
SHAPES = [(), (1,), (7,), (1031,), (64, 3, 3, 3), (5, 1031), (0,), (3, 0, 2)]
LONG_SHAPES = [(70001,), (2, 40000)]


def _edge_safe_(W: torch.Tensor, G: torch.Tensor, M: torch.Tensor, clip: float, beta1: float, gmul: float) -> None:
    if W.numel() == 0:
        return
    Gu = units_view(G)
    Wd = units_view(W).double()
    Md = units_view(M).double()
    if clip > 0:
        w_norm = torch.linalg.vector_norm(Wd, dim=1).clamp(min=1e-3)
        g_norm = torch.linalg.vector_norm(Gu.double() * gmul, dim=1)
        ratio = clip * w_norm / g_norm.clamp(min=1e-6)
        near = ((ratio - 1).abs() < 1e-3) & (g_norm > 1e-6)
        Gu[near] = Gu[near] * 2  # exact in every float dtype
    Gd = Gu.double() * gmul
    s = torch.ones(Gd.shape[0], 1, dtype=torch.float64)
    if clip > 0:
        w_norm = torch.linalg.vector_norm(Wd, dim=1, keepdim=True).clamp(min=1e-3)
        g_norm = torch.linalg.vector_norm(Gd, dim=1, keepdim=True).clamp(min=1e-6)
        s = (clip * w_norm / g_norm).clamp(max=1)
    m_new = beta1 * Md + (1 - beta1) * s * Gd
    scale = beta1 * Md.abs() + (1 - beta1) * s * Gd.abs()
    near = (m_new.abs() < 1e-3 * scale) & (Gd != 0)
    Gu[near] = -Gu[near]  # exact; keeps the norm


def make_grads(params, exp_avgs, *, clip=0.1, beta1=0.9, maximize=False, grad_scale=1.0, generator=None,
               zero_frac=0.05):
    """Edge-safe random gradients (param dtype) for the current state."""
    grads = []
    for p, m in zip(params, exp_avgs):
        g = torch.randn(p.shape, generator=generator, dtype=torch.float64)
        if p.numel():
            gu = units_view(g)
            # Per-unit magnitudes over 2.5 decades: some units clipped, some not.
            gu *= 10 ** (-2.5 * torch.rand(gu.shape[0], 1, generator=generator, dtype=torch.float64))
            gu[torch.rand(gu.shape, generator=generator) < zero_frac] = 0
            if gu.shape[0] >= 3:
                gu[1] = 0  # one unit with an all-zero gradient
        g = (g * grad_scale).to(p.dtype)
        gmul = (-1.0 if maximize else 1.0) / grad_scale
        _edge_safe_(p, g, m, clip, beta1, gmul)
        grads.append(g)
    return grads


def make_case(shapes, dtype, *, seed=0, step=3.0, **grad_kw):
    """params, grads, exp_avgs, exp_avg_sqs, steps: a mid-training state, on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    exp_avgs = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    exp_avg_sqs = [torch.rand(s, generator=gen) * 1e-3 + 1e-8 for s in shapes]
    steps = [torch.tensor(step) for _ in shapes]
    grads = make_grads(params, exp_avgs, generator=gen, **grad_kw)
    return params, grads, exp_avgs, exp_avg_sqs, steps


def clone_all(lists):
    return [[t.clone() for t in lst] for lst in lists]


def ulp_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place between two bf16 / fp16 tensors (same sign)."""
    ia = a.contiguous().view(torch.int16).to(torch.int32)
    ib = b.contiguous().view(torch.int16).to(torch.int32)
    # Map sign-magnitude to a monotonic integer line so -0 and +0 are 0 apart.
    ia = torch.where(ia < 0, -(ia & 0x7FFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFF), ib)
    return (ia - ib).abs()


def assert_param_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """The spec's tolerance: fp32 relative 1e-5; bf16/fp16 within one ulp."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    if actual.numel() == 0:
        return
    if actual.dtype in (torch.bfloat16, torch.float16):
        d = ulp_diff(actual, expected)
        assert int(d.max()) <= 1, f"{what}: {int(d.max())} ulp apart (max allowed 1)"
    else:
        scale = expected.double().pow(2).mean().sqrt().item()
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale, msg=what or None)


def assert_state_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    if actual.numel() == 0:
        return
    scale = expected.double().pow(2).mean().sqrt().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale + 1e-30, msg=what or None)


def assert_nonfinite_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """NaN and inf exactly where `expected` has them; the finite elements as assert_param_close."""
    actual = actual.cpu()
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), f"{what}: NaN positions differ"
    assert torch.equal(torch.isinf(actual), torch.isinf(expected)), f"{what}: inf positions differ"
    finite = torch.isfinite(expected)
    assert_param_close(actual[finite], expected[finite], what)
