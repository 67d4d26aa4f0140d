"""The reference against an independent float64 implementation of docs/rule.md, "One step".
The properties of docs/rule.md, checked on every backend, are in test_operator_contract.py."""
import math

import pytest
import torch

from neptune_ext import neptune_step_reference
from neptune_ext.testing import HYPER, make_case


def scalar_neptune(w, g, m, v, t, lr, beta1, beta2, eps, weight_decay, clip, cautious, maximize):
    """One unit, in plain Python floats (float64), straight from docs/rule.md, "One step"."""
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
    # In float32 the moments stay within 1e-6 of float64 (docs/rule.md, "Numerics and tolerances").
    P, G, M, V, S = make_case([shape], torch.float32, clip=hyper["clip"], maximize=hyper["maximize"])
    want = scalar_step(P[0], G[0], M[0], V[0], S[0].item() + 1, **hyper)
    neptune_step_reference(P[0], G[0], M[0], V[0], S[0], **hyper)
    torch.testing.assert_close(M[0].double(), want[1], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(V[0].double(), want[2], rtol=1e-6, atol=1e-12)
