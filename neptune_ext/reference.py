"""Pure-PyTorch reference of the Neptune rule (docs/rule.md).

Written to be read, one parameter at a time: it is the ground truth that the C++ and
CUDA operators are tested against. Works on any device and dtype: the arithmetic runs
in ``compute_dtype`` (float32 by default, float64 for tests) and only the final weight
is rounded back to the parameter's dtype. State is float32, or bfloat16 with the bf16
state (docs/rule.md, "bf16 state"; its stochastic rounding is in bf16_state.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .bf16_state import store_state_

# Floors (docs/rule.md, "One step").
W_NORM_FLOOR = 1e-3
G_NORM_FLOOR = 1e-6
RHO_FLOOR = 1e-3


def units_view(t: Tensor) -> Tensor:
    """A 2-D view (units, unit_len): rows for ndim >= 2, one row for ndim <= 1."""
    if t.dim() >= 2:
        return t.reshape(t.shape[0], -1)
    return t.reshape(1, -1)


def bias_corrections(step: Tensor, beta1: float, beta2: float) -> tuple[Tensor, Tensor]:
    """1 - beta^t, computed in float64 where the device has it (as torch's AdamW does)."""
    wide = torch.float32 if step.device.type == "mps" else torch.float64
    t = step.to(wide)
    return 1 - beta1**t, 1 - beta2**t


def neptune_step_reference(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    clip: float,
    cautious: bool,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> None:
    """One Neptune step for one parameter, in place on param, exp_avg, exp_avg_sq, step
    (docs/rule.md, "One step": parts 1 to 4 below)."""
    if found_inf is not None and bool(found_inf.item()):
        return  # a skipped step changes nothing, `step` included (docs/rule.md, property 6)
    step += 1
    if param.numel() == 0:
        return

    cd = compute_dtype
    lr = float(lr) if isinstance(lr, Tensor) else lr
    bc1, bc2 = bias_corrections(step, beta1, beta2)
    bc1, bc2 = bc1.to(cd), bc2.to(cd)

    W = units_view(param).to(cd)
    G = units_view(grad).to(cd)
    M = units_view(exp_avg).to(cd)
    V = units_view(exp_avg_sq).to(cd)
    if maximize:
        G = -G
    if grad_scale is not None:
        G = G / grad_scale.to(cd)

    # 1. gradient adjustment: unit-wise adaptive gradient clipping (norms of the old W)
    if clip > 0:
        w_norm = torch.linalg.vector_norm(W, dim=1, keepdim=True).clamp(min=W_NORM_FLOOR)
        g_norm = torch.linalg.vector_norm(G, dim=1, keepdim=True).clamp(min=G_NORM_FLOOR)
        s = (clip * w_norm / g_norm).clamp(max=1.0)
        G = s * G

    # 2. moments
    M = beta1 * M + (1 - beta1) * G
    V = beta2 * V + (1 - beta2) * G * G
    U = (M / bc1) / (torch.sqrt(V / bc2) + eps)

    # 3. update-rule adjustment: cautious mask renormalised over the unit's active elements
    if cautious:
        C = (M * G > 0).to(cd)
        A = (G != 0).to(cd)
        rho = C.sum(dim=1, keepdim=True) / A.sum(dim=1, keepdim=True).clamp(min=1)
        U = U * C / rho.clamp(min=RHO_FLOOR)

    # 4. weight adjustment: decoupled weight decay, then the step
    W = W * (1 - lr * weight_decay) - lr * U

    param.copy_(W.reshape(param.shape))
    # State in its dtype: float32 as is, bf16 state stochastically rounded.
    unit_len = M.shape[1]
    store_state_(exp_avg, M.reshape(exp_avg.shape), step, unit_len, stream=0)
    store_state_(exp_avg_sq, V.reshape(exp_avg_sq.shape), step, unit_len, stream=1)


def neptune_step_reference_multi(
    params, grads, exp_avgs, exp_avg_sqs, steps, **hyper
) -> None:
    """The operator's multi-tensor signature, one tensor at a time."""
    for p, g, m, v, s in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        neptune_step_reference(p, g, m, v, s, **hyper)
