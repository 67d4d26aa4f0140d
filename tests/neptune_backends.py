"""The backends an optimizer-level test runs on: one entry each, skipped where unavailable.

A backend is the device the params live on, the optimizer's ``implementation``, and
optionally another operator with ``neptune_step_``'s signature to stand in for it (the
optimizer calls ``neptune_ext.ops.neptune_step_``; ``use`` patches it). "cuda-simt" is the
CUDA operator's path with its unchanged kernels run on the CPU by the SIMT emulator.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import neptune_ext
from neptune_ext import ops as neptune_ops


@dataclass(frozen=True)
class Backend:
    name: str
    device: str
    implementation: str  # the Neptune(implementation=...) to use
    op_name: str | None = None  # torch.ops.neptune_ext.<op_name> replaces neptune_step_

    def missing(self) -> str | None:
        """Why this backend cannot run here, or None."""
        if self.device == "cuda" and not torch.cuda.is_available():
            return "needs a CUDA GPU"
        if self.implementation == "op" and not neptune_ext.has_kernel(self.device):
            return f"no compiled Neptune kernel for {self.device}"
        if self.op_name is not None and not hasattr(torch.ops.neptune_ext, self.op_name):
            return f"torch.ops.neptune_ext.{self.op_name} is not built"
        return None

    def use(self, monkeypatch) -> None:
        """Skip if unavailable; route the optimizer's operator calls to op_name if set."""
        why = self.missing()
        if why:
            pytest.skip(f"backend {self.name}: {why}")
        if self.op_name is not None:
            op = getattr(torch.ops.neptune_ext, self.op_name)

            def step(*lists, **kw):
                neptune_ops.call_step_op(op, *lists, **kw)

            monkeypatch.setattr(neptune_ops, "neptune_step_", step)


BACKENDS = [
    Backend("reference", "cpu", "reference"),
    Backend("cpu-op", "cpu", "op"),
    Backend("cuda-simt", "cpu", "op", op_name="_neptune_step_simt_"),
    Backend("cuda-op", "cuda", "op"),
]
BACKEND_IDS = [b.name for b in BACKENDS]
