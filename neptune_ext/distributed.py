"""DTensor params (FSDP2's ``fully_shard``) in the optimizer's step.

The operator steps plain tensors. A DTensor whose local shard holds whole units
(replicated, or rows of an ndim >= 2 param sharded along dim 0) is stepped through its
local shard: units are independent (docs/rule.md, property 5), so that is exact with no
communication. Any other DTensor (a 1-D param sharded along dim 0, a shard along another
dim) is gathered, stepped whole identically on every rank, and its local shard written
back. torch.distributed is imported only when a DTensor is met.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .ops import StepLists


def is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "placements")


def units_are_local(t: Tensor) -> bool:
    """A DTensor's local shard holds whole units: replicated, or rows of an ndim >= 2 param."""
    for placement in t.placements:
        if placement.is_replicate():
            continue
        if placement.is_shard() and placement.dim == 0 and t.dim() >= 2:
            continue
        return False
    return True


def split_dtensors(lists: StepLists) -> tuple[StepLists, StepLists]:
    """(lists with DTensors replaced by their local shards, the DTensors to step whole)."""
    if not any(is_dtensor(p) for p in lists.params):
        return lists, StepLists.empty()
    local, whole = StepLists.empty(), StepLists.empty()
    for p, g, m, v, s in zip(*lists):
        if is_dtensor(p) and not units_are_local(p):
            whole.append(p, g, m, v, s)
        else:
            local.append(*(t.to_local() if is_dtensor(t) else t for t in (p, g, m, v, s)))
    return local, whole


def local_grads(whole: StepLists) -> list[tuple[torch.device, list[Tensor]]]:
    """[(device, [local gradient shard])] of the DTensors stepped whole: what this rank
    checks for non-finite values."""
    return [(g.device, [g.to_local()]) for g in whole.grads]


def step_whole(whole: StepLists, step: Callable[[torch.device, StepLists], None]) -> None:
    """Steps each DTensor of `whole` as a full tensor, gathered on every rank, with
    `step(device, lists)`, then writes this rank's shards of the new param and moments
    back. Every rank computes the same full step (the step counter is a plain tensor)."""
    for p, g, m, v, s in zip(*whole):
        full = StepLists([p.full_tensor()], [g.full_tensor()], [m.full_tensor()], [v.full_tensor()], [s])
        step(full.params[0].device, full)
        for dst, src in ((p, full.params), (m, full.exp_avgs), (v, full.exp_avg_sqs)):
            dst.to_local().copy_(local_shard_of(src[0], dst))


def local_shard_of(full: Tensor, like: Tensor) -> Tensor:
    """This rank's shard of a replicated full tensor, with `like`'s placements."""
    from torch.distributed.tensor import DTensor, Replicate

    replicated = DTensor.from_local(full, like.device_mesh, [Replicate()] * like.device_mesh.ndim, run_check=False)
    return replicated.redistribute(like.device_mesh, like.placements).to_local()
