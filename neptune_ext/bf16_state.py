"""The bf16 state (docs/rule.md, "bf16 state"): exp_avg / exp_avg_sq kept in bfloat16.

The arithmetic of a step stays float32; only the stored moments are narrowed, by
stochastic rounding with deterministic random bits, so that every backend (reference,
CPU and CUDA operators) stores bitwise the same state. Chosen per param group with
``Neptune(..., state_dtype=torch.bfloat16)``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

# The state dtypes a param group may ask for, by the name kept in its state_dict
# (a string keeps param groups plain data).
STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
STATE_DTYPE_RANGE = "torch.float32 or torch.bfloat16"

_M32 = 0xFFFFFFFF


def state_dtype_name(dtype: Any, strict: bool = True) -> str | None:
    """'float32' / 'bfloat16' for a dtype or its name; None (or ValueError when strict)
    for anything else."""
    for name, dt in STATE_DTYPES.items():
        if dtype == dt or dtype == name:
            return name
    if strict:
        raise ValueError(f"Neptune: invalid state_dtype={dtype!r}; valid range: {STATE_DTYPE_RANGE}")
    return None


def sr_bits(index: Tensor, step: int, stream: int) -> Tensor:
    """The kernels' stochastic-rounding hash on int64 tensors (uint32 arithmetic, wrapping
    products): one hash of (index, step); its low 16 bits round exp_avg (stream 0), its
    high 16 exp_avg_sq (stream 1)."""
    x = (index & _M32) ^ (((index >> 32) * 0x85EBCA6B) & _M32)
    x = x ^ ((step * 0x9E3779B9) & _M32)
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    x = x ^ (x >> 16)
    return (x >> (16 * stream)) & 0xFFFF


def index_in_unit(t: Tensor, unit_len: int) -> Tensor:
    """Each element's index within its unit, in memory order (also for channels_last):
    an int64 tensor with t's shape and strides. Depends on nothing outside the unit, so
    row shards round alike (docs/rule.md, property 5)."""
    index = torch.empty_strided(t.shape, t.stride(), dtype=torch.int64, device=t.device)
    index.as_strided((t.numel(),), (1,)).copy_(torch.arange(t.numel(), device=t.device) % unit_len)
    return index


def round_to_bf16(value: Tensor, bits: Tensor) -> Tensor:
    """float32 `value` stochastically rounded to bfloat16: the 16 random `bits` are added
    below the kept half, then truncated; NaN stays a (quiet) NaN."""
    wide = value.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & _M32
    rounded = (wide + (bits & 0xFFFF)) >> 16
    rounded = torch.where(torch.isnan(value), torch.full_like(rounded, 0x7FC0), rounded)
    rounded = torch.where(rounded >= 0x8000, rounded - 0x10000, rounded).to(torch.int16)
    return rounded.view(torch.bfloat16)


def store_state_(dst: Tensor, value: Tensor, step: Tensor, unit_len: int, stream: int) -> None:
    """Write float32 `value` into the state tensor `dst`: as is for float32 state; for
    bf16 state, stochastically rounded with bits hashed from each element's index within
    its unit (of `unit_len` elements) and the step count (the value of `step` after its
    increment). `stream`: 0 for exp_avg, 1 for exp_avg_sq."""
    if dst.dtype != torch.bfloat16:
        dst.copy_(value)
        return
    bits = sr_bits(index_in_unit(dst, unit_len), int(step.item()), stream)
    dst.copy_(round_to_bf16(value, bits))
