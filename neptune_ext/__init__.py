"""neptune_ext: the Neptune optimizer as one fused CPU/CUDA operator.

    from neptune_ext import Neptune
    opt = Neptune(model.parameters(), lr=1e-3)   # in place of torch.optim.AdamW
"""
from ._version import __version__
from .ops import build_info, has_kernel, neptune_step_
from .optimizer import Neptune
from .param_groups import find_head, param_groups
from .reference import neptune_step_reference, neptune_step_reference_multi
from .timm_registry import register_timm

__all__ = [
    "Neptune",
    "build_info",
    "find_head",
    "has_kernel",
    "neptune_step_",
    "neptune_step_reference",
    "neptune_step_reference_multi",
    "param_groups",
    "register_timm",
]
