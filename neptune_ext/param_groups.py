"""Build the recommended param groups for Neptune from a model (units: docs/rule.md, "Units"):

- weights with ``ndim >= 2`` (conv filters, linear matrices, embeddings): decayed and clipped;
- biases, norm gains and other ``ndim <= 1`` tensors: not decayed (``weight_decay=0``),
  clipped like the weights (only the head is exempt from clipping, as in NFNets);
- the classifier head (its weight and bias): not clipped (``clip=0``); its weight is
  decayed, its bias is not.

    from neptune_ext import Neptune
    from neptune_ext.param_groups import param_groups
    opt = Neptune(param_groups(model), lr=1e-3)

The same decay split serves torch optimizers: ``param_groups(model, for_optimizer="torch")``
leaves out every ``clip`` key (``torch.optim.AdamW`` and ``SGD`` would keep an unknown key
silently, but it means nothing to them and would be misleading in their state dict).
"""
from __future__ import annotations

import warnings
from torch import nn

__all__ = ["param_groups", "find_head"]

_FOR = ("neptune", "torch")


def find_head(model: nn.Module, num_classes: int | None = None) -> nn.Module | None:
    """The classifier head of ``model`` as ``param_groups`` finds it when ``head=None``.

    Rule: among the ``nn.Linear`` modules of ``model`` in ``model.modules()`` order, the
    last one whose ``out_features == num_classes`` when ``num_classes`` is given, else the
    last one. ``None`` when the model has no (matching) ``nn.Linear``.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if num_classes is not None:
        linears = [m for m in linears if m.out_features == num_classes]
    return linears[-1] if linears else None


def _head_names(model: nn.Module, head, num_classes: int | None) -> set[str]:
    named = dict(model.named_parameters())
    if head is False:
        return set()
    if head is None:
        module = find_head(model, num_classes)
        if module is None:
            warnings.warn(
                "param_groups: no nn.Linear head found"
                + (f" with out_features={num_classes}" if num_classes is not None else "")
                + "; every parameter is clipped (pass head=<module or name prefix> to exempt one)",
                stacklevel=3,
            )
            return set()
        head = module
    if isinstance(head, nn.Module):
        ids = {id(p) for p in head.parameters()}
        names = {n for n, p in named.items() if id(p) in ids}
        what = f"module {type(head).__name__}"
    elif isinstance(head, str):
        prefix = head.rstrip(".")
        names = {n for n in named if n == prefix or n.startswith(prefix + ".")}
        what = f"prefix {head!r}"
    else:
        raise TypeError(f"param_groups: head must be an nn.Module, a name prefix string, None or False, got {type(head).__name__}")
    if not names:
        raise ValueError(f"param_groups: head {what} matches no trainable parameter of the model")
    return names


def param_groups(
    model: nn.Module,
    weight_decay: float | None = 1e-2,
    head: nn.Module | str | None | bool = None,
    clip: float | None = None,
    *,
    num_classes: int | None = None,
    for_optimizer: str = "neptune",
) -> list[dict]:
    """Param groups for ``Neptune`` (or, with ``for_optimizer="torch"``, AdamW/SGD).

    Args:
        model: the model; only parameters with ``requires_grad`` are included, each once
            (shared parameters are deduplicated as ``named_parameters()`` does).
        weight_decay: decay of the ``ndim >= 2`` weights (head weight included); ``None``
            leaves the key out so the optimizer's default applies. ``ndim <= 1`` tensors
            always get ``weight_decay=0``.
        head: the classifier head, exempt from clipping: an ``nn.Module`` of the model, a
            parameter-name prefix (``"fc"`` matches ``fc.weight`` and ``fc.bias``), ``None``
            to find it (see ``find_head``: the last ``nn.Linear``, or the last one with
            ``out_features == num_classes``) or ``False`` for no head.
        clip: AGC threshold of the non-head groups; ``None`` leaves the key out so the
            optimizer's default applies. The head groups always get ``clip=0``.
        num_classes: narrows the automatic head search to ``nn.Linear(out_features=num_classes)``.
        for_optimizer: ``"neptune"`` or ``"torch"`` (no ``clip`` keys at all).

    Returns:
        A list of up to four dicts (empty ones are dropped), each with ``params`` and a
        ``name`` among ``decay``, ``no_decay``, ``head_decay``, ``head_no_decay``.
    """
    if for_optimizer not in _FOR:
        raise ValueError(f"param_groups: for_optimizer must be one of {_FOR}, got {for_optimizer!r}")
    if weight_decay is not None and not weight_decay >= 0:
        raise ValueError(f"param_groups: weight_decay must be >= 0, got {weight_decay!r}")
    if clip is not None and not clip >= 0:
        raise ValueError(f"param_groups: clip must be >= 0, got {clip!r}")
    head_names = _head_names(model, head, num_classes)

    buckets: dict[str, list] = {"decay": [], "no_decay": [], "head_decay": [], "head_no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = ("head_" if name in head_names else "") + ("decay" if p.ndim >= 2 else "no_decay")
        buckets[key].append(p)

    groups = []
    for key, params in buckets.items():
        if not params:
            continue
        group: dict = {"params": params, "name": key}
        if key in ("decay", "head_decay"):
            if weight_decay is not None:
                group["weight_decay"] = weight_decay
        else:
            group["weight_decay"] = 0.0
        if for_optimizer == "neptune":
            if key.startswith("head_"):
                group["clip"] = 0.0
            elif clip is not None:
                group["clip"] = clip
        groups.append(group)
    return groups

