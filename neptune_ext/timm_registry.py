"""Neptune in timm's optimizer registry (timm >= 1.0), so that timm's factory and its
training scripts (``--opt neptune``) build it:

    import neptune_ext, timm
    neptune_ext.register_timm()
    opt = timm.optim.create_optimizer_v2(model, "neptune", lr=1e-3, weight_decay=0.05)

timm groups the parameters as it does for every optimizer (no weight decay for biases,
norm gains and the model's ``no_weight_decay()`` names; layer-wise lr decay when asked),
and Neptune's head rule is added on top: the classifier head (``find_head``: the last
``nn.Linear``) gets ``clip=0``, as ``neptune_ext.param_groups`` does. timm hands the
optimizer class only the groups, not the model, so the model is taken from the calling
``create_optimizer`` (timm's factory); a group that already sets ``clip`` keeps it.
Nothing here imports timm until ``register_timm()`` is called.
"""
from __future__ import annotations

import inspect
import warnings

from torch import nn

from .optimizer import Neptune
from .param_groups import find_head

__all__ = ["register_timm", "create_for_timm"]

# The registry method that calls the optimizer class, and its argument holding the model.
_TIMM_FACTORY = "create_optimizer"
_TIMM_MODEL_ARG = "model_or_params"


def _model_of_timm_factory() -> tuple[bool, nn.Module | None]:
    """(called from timm's factory, the model it was given or None for plain params)."""
    frame = inspect.currentframe()
    try:
        f = frame.f_back if frame is not None else None
        while f is not None:
            if f.f_code.co_name == _TIMM_FACTORY and f.f_globals.get("__name__", "").startswith("timm."):
                model = f.f_locals.get(_TIMM_MODEL_ARG)
                return True, model if isinstance(model, nn.Module) else None
            f = f.f_back
        return False, None
    finally:
        del frame


def with_head_rule(groups: list[dict], head: nn.Module) -> list[dict]:
    """`groups` with the head's params moved to copies of their groups with clip=0."""
    head_ids = {id(p) for p in head.parameters()}
    out = []
    for g in groups:
        params = list(g["params"])
        if "clip" in g or not any(id(p) in head_ids for p in params):
            out.append({**g, "params": params})
            continue
        rest = [p for p in params if id(p) not in head_ids]
        mine = [p for p in params if id(p) in head_ids]
        if rest:
            out.append({**g, "params": rest})
        out.append({**g, "params": mine, "clip": 0.0})
    return out


def create_for_timm(params, **kwargs) -> Neptune:
    """The optimizer "class" registered in timm: Neptune on timm's groups plus the head rule."""
    _, model = _model_of_timm_factory()
    params = list(params)
    if model is not None and params and isinstance(params[0], dict):
        head = find_head(model)
        if head is not None:
            params = with_head_rule(params, head)
        else:
            warnings.warn("neptune_ext (timm): the model has no nn.Linear head; every parameter is clipped",
                          stacklevel=2)
    return Neptune(params, **kwargs)


def register_timm(name: str = "neptune") -> None:
    """Register Neptune in timm's optimizer registry under `name` (idempotent).

    After this, ``timm.optim.create_optimizer_v2(model, name, lr=..., weight_decay=...)``,
    ``timm.optim.list_optimizers()`` and timm's train.py (``--opt neptune``) know it. timm's
    ``eps``, ``betas`` and ``foreach`` pass through; Neptune's own keywords (``clip``,
    ``cautious``, ``state_dtype``, ...) go through ``**kwargs`` / ``--opt-kwargs``.
    """
    try:
        from timm.optim import OptimInfo
        from timm.optim._optim_factory import default_registry
    except ImportError as e:
        raise ImportError("neptune_ext.register_timm() needs timm >= 1.0 (pip install timm)") from e
    if name.lower() in default_registry.list_optimizers():
        if default_registry.get_optimizer_info(name).opt_class is create_for_timm:
            return
    default_registry.register(OptimInfo(
        name=name,
        opt_class=create_for_timm,
        description="Neptune: unit-wise AGC, cautious mask renormalised per unit, decoupled weight decay "
                    "(neptune_ext, one fused operator)",
        has_eps=True,
        has_betas=True,
    ))
