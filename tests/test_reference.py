"""The reference against an independent float64 implementation, and the spec's properties
(checked on the reference and on every compiled operator available)."""
import math

import pytest
import torch

import neptune_ext
from neptune_ext import neptune_step_, neptune_step_reference, neptune_step_reference_multi
from neptune_inputs import SHAPES, clone_all, make_case

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8, clip=0.1, cautious=True, maximize=False)


def scalar_neptune(w, g, m, v, t, lr, beta1, beta2, eps, weight_decay, clip, cautious, maximize):
    """One unit, in plain Python floats (float64), straight from the spec's pseudo-code."""
    n = len(w)
    g = [-x if maximize else x for x in g]
    bc1, bc2 = 1 - beta1**t, 1 - beta2**t
    if clip > 0:
        wn = max(math.sqrt(sum(x * x for x in w)), 1e-3)
        gn = max(math.sqrt(sum(x * x for x in g)), 1e-6)
        s = min(1.0, clip * wn / gn)
        g = [s * x for x in g]
    m = [beta1 * m[i] + (1 - beta1) * g[i] for i in range(n)]
    v = [beta2 * v[i] + (1 - beta2) * g[i] * g[i] for i in range(n)]
    u = [(m[i] / bc1) / (math.sqrt(v[i] / bc2) + eps) for i in range(n)]
    if cautious:
        c = [1.0 if m[i] * g[i] > 0 else 0.0 for i in range(n)]
        a = sum(1 for x in g if x != 0)
        rho = sum(c) / max(a, 1)
        u = [u[i] * c[i] / max(rho, 1e-3) for i in range(n)]
    w = [w[i] * (1 - lr * weight_decay) - lr * u[i] for i in range(n)]
    return w, m, v


def scalar_step(p, g, m, v, t, **hyper):
    rows = p.shape[0] if p.dim() >= 2 else 1
    P, G, M, V = (x.double().reshape(rows, -1).tolist() for x in (p, g, m, v))
    out = [scalar_neptune(P[r], G[r], M[r], V[r], t, **hyper) for r in range(rows)]
    return tuple(torch.tensor([o[k] for o in out], dtype=torch.float64).reshape(p.shape) for k in range(3))


@pytest.mark.parametrize("variant", [{}, {"cautious": False}, {"clip": 0.0}, {"maximize": True}])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (4, 2, 3), ()])
def test_reference_matches_scalar_float64(shape, variant):
    hyper = {**HYPER, **variant}
    P, G, M, V, S = make_case([shape], torch.float64, clip=hyper["clip"], maximize=hyper["maximize"])
    M, V = [M[0].double()], [V[0].double()]
    want = scalar_step(P[0], G[0], M[0], V[0], S[0].item() + 1, **hyper)
    neptune_step_reference(P[0], G[0], M[0], V[0], S[0], **hyper, compute_dtype=torch.float64)
    for got, exp in zip((P[0], M[0], V[0]), want):
        torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-14)
    # In float32 the moments stay within 1e-6 of float64 (the spec's numerics).
    P, G, M, V, S = make_case([shape], torch.float32, clip=hyper["clip"], maximize=hyper["maximize"])
    want = scalar_step(P[0], G[0], M[0], V[0], S[0].item() + 1, **hyper)
    neptune_step_reference(P[0], G[0], M[0], V[0], S[0], **hyper)
    torch.testing.assert_close(M[0].double(), want[1], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(V[0].double(), want[2], rtol=1e-6, atol=1e-12)


def _stepper(kind):
    if kind == "reference":
        return neptune_step_reference_multi
    if kind == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not neptune_ext.has_kernel(kind):
        pytest.skip(f"no compiled {kind} kernel")
    device = torch.device(kind)

    def run(P, G, M, V, S, **kw):
        moved = [[t.to(device) for t in lst] for lst in (P, G, M, V, S)]
        kw = {k: (x.to(device) if isinstance(x, torch.Tensor) else x) for k, x in kw.items()}
        neptune_step_(*moved, **kw)
        for dst, src in zip((P, G, M, V, S), moved):
            for d, s in zip(dst, src):
                d.copy_(s)

    return run


KINDS = ["reference", "cpu", "cuda"]


@pytest.mark.parametrize("kind", KINDS)
def test_property1_is_adamw_without_clip_and_mask(kind):
    step = _stepper(kind)
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in [(5, 7), (13,), (2, 3, 4)]]
    ours = [p.clone() for p in params]
    theirs = [p.clone().requires_grad_() for p in params]
    adamw = torch.optim.AdamW(theirs, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    M = [torch.zeros_like(p) for p in params]
    V = [torch.zeros_like(p) for p in params]
    S = [torch.tensor(0.0) for _ in params]
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for t, g in zip(theirs, grads):
            t.grad = g.clone()
        adamw.step()
        step(ours, grads, M, V, S, lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, eps=1e-8, clip=0.0,
             cautious=False, maximize=False)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_property2_mask_changes_nothing_at_step_one(kind):
    step = _stepper(kind)
    P, G, M, V, S = make_case(SHAPES, torch.float32, step=0.0)
    M = [torch.zeros_like(m) for m in M]
    V = [torch.zeros_like(v) for v in V]
    runs = []
    for cautious in (True, False):
        lists = clone_all([P, G, M, V, S])
        step(*lists, **{**HYPER, "cautious": cautious})
        runs.append(lists)
    for a, b in zip(runs[0][0], runs[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_property3_zero_gradient_elements_only_decay(kind):
    step = _stepper(kind)
    P, G, M, V, S = make_case([(6, 50), (40,)], torch.float32, zero_frac=0.2)
    G[0][2] = 0  # a unit with no gradient at all
    before = [p.clone() for p in P]
    step(P, G, M, V, S, **HYPER)
    decay = 1 - HYPER["lr"] * HYPER["weight_decay"]
    for p, b, g in zip(P, before, G):
        zero = g == 0
        assert zero.sum() > 0
        torch.testing.assert_close(p[zero], b[zero] * decay, rtol=1e-7, atol=0)
        assert not torch.allclose(p[~zero], b[~zero] * decay)


@pytest.mark.parametrize("kind", KINDS)
def test_property4_clipping_only_shrinks(kind):
    step = _stepper(kind)
    P, G, M, V, S = make_case([(8, 30), (25,)], torch.float32, step=0.0)
    M = [torch.zeros_like(m) for m in M]
    V = [torch.zeros_like(v) for v in V]
    clip = HYPER["clip"]
    Pc = [p.clone() for p in P]
    step(Pc, G, M, V, S, **HYPER)
    clipped_some = unclipped_some = False
    for p, g, m in zip(P, G, M):
        rows = p.shape[0] if p.dim() >= 2 else 1
        g_norm = g.reshape(rows, -1).norm(dim=1)
        limit = clip * p.reshape(rows, -1).norm(dim=1).clamp(min=1e-3)
        g_after = m.reshape(rows, -1).norm(dim=1) / (1 - HYPER["beta1"])  # M = (1 - beta1) G at step 1
        torch.testing.assert_close(g_after, torch.minimum(g_norm, limit), rtol=1e-5, atol=0)
        clipped_some |= bool((g_norm > limit).any())
        unclipped_some |= bool((g_norm < limit).any())
    assert clipped_some and unclipped_some, "inputs must exercise both sides of the clip"


@pytest.mark.parametrize("kind", KINDS)
def test_property5_rows_are_independent(kind):
    step = _stepper(kind)
    P, G, M, V, S = make_case([(10, 3, 3), (9, 17)], torch.float32)
    whole = clone_all([P, G, M, V, S])
    step(*whole, **HYPER)
    for i in range(len(P)):
        for rows in (slice(0, 4), slice(4, None)):
            shard = [[x[i][rows].clone()] for x in (P, G, M, V)] + [[S[i].clone()]]
            step(*shard, **HYPER)
            for k in range(3):
                torch.testing.assert_close(shard[k][0], whole[k][i][rows], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_property6_found_inf_changes_nothing(kind):
    step = _stepper(kind)
    P, G, M, V, S = make_case(SHAPES, torch.float32)
    before = clone_all([P, M, V, S])
    step(P, G, M, V, S, **HYPER, grad_scale=torch.tensor(8.0), found_inf=torch.tensor(1.0))
    for old, new in zip(before, [P, M, V, S]):
        for a, b in zip(old, new):
            assert torch.equal(a, b)
    step(P, G, M, V, S, **HYPER, found_inf=torch.tensor(0.0))  # and found_inf == 0 steps
    assert all(s.item() == 4.0 for s in S)
