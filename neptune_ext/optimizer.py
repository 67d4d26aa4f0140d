"""Neptune as a torch.optim.Optimizer: groups tensors and calls the fused operator."""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import distributed, ops
from .bf16_state import STATE_DTYPE_RANGE, STATE_DTYPES, state_dtype_name
from .ops import StepLists
from .reference import neptune_step_reference, neptune_step_reference_multi

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the operator's
# Stepped by the reference computed in float64, with float64 state (as AdamW keeps it):
# exact where float32 arithmetic would round a float64 param's update away.
EXACT_DTYPES = (torch.float64,)
_IMPLEMENTATIONS = ("auto", "op", "reference")
# How this process runs the step, not what the training computes: a loaded checkpoint
# keeps the values the optimizer was built with (its state is converted to them).
_RUNTIME_KEYS = ("implementation", "state_dtype", "foreach", "fused")
_warned_devices: set[str] = set()


def _check_range(name: str, value: Any, ok: bool, valid: str) -> None:
    if not ok:
        raise ValueError(f"Neptune: invalid {name}={value!r}; valid range: {valid}")


def validate_hyperparameters(group: dict, read_device_lr: bool = True) -> None:
    """Raise ValueError naming the parameter, its value and the valid range.

    read_device_lr=False (at every step): the value of an lr tensor off the CPU is not
    read (that would wait for the device, and cannot be done in a CUDA graph capture)."""
    lr = group["lr"]
    if isinstance(lr, Tensor):
        _check_range("lr", lr, lr.numel() == 1 and lr.is_floating_point() and lr.device.type != "meta",
                     "a float or a one-element float tensor >= 0 (with a value: not on the meta device)")
        lr_value = float(lr) if read_device_lr or lr.device.type == "cpu" else 0.0
    else:
        lr_value = lr
    _check_range("lr", lr, isinstance(lr_value, (int, float)) and lr_value >= 0, ">= 0")
    betas = group["betas"]
    _check_range("betas", betas, isinstance(betas, (tuple, list)) and len(betas) == 2, "a pair (beta1, beta2)")
    for i, b in enumerate(betas):
        _check_range(f"betas[{i}]", b, isinstance(b, (int, float)) and 0.0 <= b < 1.0, "[0, 1)")
    _check_range("eps", group["eps"], isinstance(group["eps"], (int, float)) and group["eps"] > 0, "> 0")
    wd = group["weight_decay"]
    _check_range("weight_decay", wd, isinstance(wd, (int, float)) and wd >= 0, ">= 0")
    clip = group["clip"]
    _check_range("clip", clip, isinstance(clip, (int, float)) and clip >= 0, ">= 0 (0 turns clipping off)")
    for flag in ("cautious", "maximize", "capturable", "skip_nonfinite"):
        _check_range(flag, group[flag], isinstance(group[flag], bool), "True or False")
    impl = group["implementation"]
    _check_range("implementation", impl, impl in _IMPLEMENTATIONS, " | ".join(_IMPLEMENTATIONS))
    for flag in ("foreach", "fused"):
        value = group.get(flag)
        _check_range(flag, value, value is None or isinstance(value, bool), "None, True or False")
    if group.get("fused") and group.get("foreach"):
        raise ValueError("Neptune: invalid fused=True with foreach=True; valid range: at most one of them True "
                         "(as in torch.optim.AdamW)")
    if group.get("fused") and impl == "reference":
        raise ValueError("Neptune: invalid fused=True with implementation='reference'; valid range: fused=True "
                         "asks for the compiled operator, so implementation 'auto' or 'op'")
    diff = group.get("differentiable", False)
    _check_range("differentiable", diff, diff is False,
                 "False (the step is a fused in-place operator with no autograd formula, run under "
                 "torch.no_grad(), so nothing can be differentiated through it, as with "
                 "torch.optim.AdamW(fused=True))")
    sd = group.get("state_dtype", "float32")
    _check_range("state_dtype", sd, state_dtype_name(sd, strict=False) is not None, STATE_DTYPE_RANGE)


class Neptune(Optimizer):
    """Adam-family optimizer with unit-wise adaptive gradient clipping, a cautious
    sign-agreement mask and decoupled weight decay (the rule: docs/rule.md).

    A drop-in for ``torch.optim.AdamW``: with ``clip=0`` and ``cautious=False`` it is AdamW.
    A unit is one row ``p[i]`` of a parameter with ``ndim >= 2`` (an output channel or
    neuron), or the whole of a parameter with ``ndim <= 1``.

    Args:
        params: parameters or param groups.
        lr: step size, >= 0; a float or a one-element tensor (read at every step, so LR
            schedulers work as with AdamW).
        betas: moment decay rates, each in [0, 1).
        eps: denominator guard, > 0.
        weight_decay: decoupled decay, scaled by lr, >= 0.
        clip: adaptive gradient clipping threshold; 0 turns clipping off.
        cautious: apply the sign-agreement mask.
        maximize: ascend instead of descend.
        implementation: "auto" (the compiled operator where one is built for the device,
            else the reference with a warning; NEPTUNE_REQUIRE_KERNEL=1 makes that an
            error), "op" (the operator or an error) or "reference" (pure PyTorch).
        capturable: allow the step to be captured in a CUDA graph. State (``step``) is
            always on the param's device and the CUDA operator never syncs with the host,
            so this only lifts the guard that stops an accidental capture; pass ``lr`` as
            a CUDA tensor for a schedule that changes between replays.
        skip_nonfinite: skip the whole step of a group (params, moments and ``step``
            unchanged), decided on the device with no host sync, when any of its
            gradients holds an inf or NaN. Off by default, as in torch's AdamW, where
            non-finite gradients propagate into the params.
        state_dtype: ``torch.float32`` or ``torch.bfloat16``: the bf16 state keeps
            ``exp_avg`` / ``exp_avg_sq`` in bfloat16, halving optimizer memory; the
            arithmetic stays float32 and the state is stochastically rounded with
            deterministic random bits, alike on every backend (docs/rule.md, "bf16 state").
        foreach, fused: accepted as ``torch.optim.AdamW`` takes them (None, True or
            False; not both True). In AdamW they choose an implementation with the same
            result; Neptune has one multi-tensor fused step per device, so ``foreach`` and
            ``fused=False`` change nothing, and ``fused=True`` forbids the fallback to the
            reference when no kernel is compiled for a param's device (an error instead,
            as AdamW(fused=True) raises on a device without a fused kernel).
        differentiable: only False: the step is a fused in-place operator with no autograd
            formula, so it cannot be differentiated through.

    Params may have any strides (transposed, sliced, expanded along no dim): a param whose
    units are not contiguous spans (dense with dim 0 outermost) is stepped through a dense
    scratch copy, with its state kept in that copy's layout. float64 params are stepped exactly by the
    reference computed in float64, with float64 state, in the same step as the group's
    other params.

    Distributed: DDP and ``ZeroRedundancyOptimizer(optimizer_class=Neptune)`` work as they
    do for AdamW. With FSDP2 (``fully_shard``, DTensor params) the operator steps the local
    shards: rows of a weight sharded along dim 0 are whole units, so that is exact with no
    communication; a DTensor whose units are split across ranks (a 1-D param sharded along
    dim 0, or a shard along another dim) is gathered, stepped whole identically on every
    rank, and its local shard written back (neptune_ext/distributed.py).

    State per parameter: ``step`` (float32 scalar on the param's device), ``exp_avg`` and
    ``exp_avg_sq`` (float32, or the group's ``state_dtype``, whatever the param dtype;
    float64 for float64 params).
    """

    # GradScaler passes grad_scale / found_inf; unscaling happens inside the operator.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        clip: float = 0.1,
        cautious: bool = True,
        maximize: bool = False,
        *,
        implementation: str = "auto",
        capturable: bool = False,
        skip_nonfinite: bool = False,
        state_dtype: torch.dtype | str = torch.float32,
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, clip=clip,
            cautious=cautious, maximize=maximize, implementation=implementation,
            capturable=capturable, skip_nonfinite=skip_nonfinite,
            state_dtype=state_dtype_name(state_dtype), foreach=foreach, fused=fused,
            differentiable=differentiable,
        )
        validate_hyperparameters(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        validate_hyperparameters({**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}})
        params = param_group["params"]
        if not isinstance(params, (Tensor, set)):  # torch refuses a set itself
            param_group["params"] = params = list(params)
            seen: dict[int, int] = {}
            for i, p in enumerate(params):
                j = seen.setdefault(id(p), i)
                if j != i:
                    # one op call would write it twice (refused there), the reference step it twice
                    raise ValueError(f"Neptune: invalid params: the same param at positions {j} and {i} of a "
                                     "param group; valid range: each param once (torch.optim warns of this and "
                                     "will refuse it)")
        if "state_dtype" in param_group:
            param_group["state_dtype"] = state_dtype_name(param_group["state_dtype"])
        super().add_param_group(param_group)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # Older or foreign (e.g. AdamW) checkpoints: fill what they lack from the defaults.
        for group in self.param_groups:
            for key, value in getattr(self, "defaults", {}).items():
                group.setdefault(key, value)
            group.setdefault("implementation", "auto")
            group.setdefault("capturable", False)
            group.setdefault("skip_nonfinite", False)
            group.setdefault("state_dtype", "float32")
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("differentiable", False)

    # -- state ---------------------------------------------------------------------------

    def _init_group(self, group: dict, params: list, grads: list, exp_avgs: list, exp_avg_sqs: list,
                    steps: list, x_params: list, x_grads: list, x_exp_avgs: list, x_exp_avg_sqs: list,
                    x_steps: list, scratch_params: list, scratch_copies: list) -> bool:
        """Fill the lists with the group's params that have a grad, creating their state.

        Same convention as torch's own optimizers (the lists are filled in place and the
        return value is a constant), which torch.compile special-cases so that this loop
        is not traced at every step (hence flat lists only). float64 params go to the
        five x_ lists. A param whose units are not contiguous spans goes to the lists as a
        dense scratch copy, the param and its copy to scratch_params / scratch_copies, for
        the step to write back. (step() wraps the lists in StepLists.)
        """
        # Per param and step the common case costs about 1 us (10,000 params: 10 ms): cheap
        # checks first. Autograd and the .grad setter keep grads to the param's dtype, device and
        # shape; code that writes p.grad.data need not, and the first group must not be
        # stepped before a later one is refused (0.3 us per param for these two checks).
        implementation = group["implementation"]
        sdt = STATE_DTYPES[group["state_dtype"]]
        kernel = StepLists(params, grads, exp_avgs, exp_avg_sqs, steps)
        exact = StepLists(x_params, x_grads, x_exp_avgs, x_exp_avg_sqs, x_steps)
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            state = self.state[p]
            # The common case in a few attribute reads: a contiguous param of a kernel dtype
            # whose grad and existing state are contiguous goes to the operator as it is.
            # Anything else (first step, other layouts, dtypes, DTensors, bad grads) takes
            # the general path below, which decides the same for this case.
            if (state and grad.layout is torch.strided and grad.dtype is p.dtype and p.dtype in SUPPORTED_DTYPES
                    and p.is_contiguous() and grad.is_contiguous() and grad.shape == p.shape
                    and not distributed.is_dtensor(p)):
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if m.is_contiguous() and v.is_contiguous():
                    params.append(p)
                    grads.append(grad)
                    exp_avgs.append(m)
                    exp_avg_sqs.append(v)
                    steps.append(state["step"])
                    continue
            if grad.layout is not torch.strided:
                raise RuntimeError("Neptune does not support sparse gradients (use dense gradients, e.g. sparse=False in nn.Embedding)")
            dtype = p.dtype
            if grad.dtype is not dtype or grad.shape != p.shape:
                raise RuntimeError(
                    f"Neptune: a param of dtype {dtype} and shape {tuple(p.shape)} has a grad of dtype {grad.dtype} "
                    f"and shape {tuple(grad.shape)}; a grad must have its param's dtype and shape (as autograd "
                    "and the .grad setter keep it; was p.grad.data set?)")
            lists = kernel
            if dtype not in SUPPORTED_DTYPES:
                if dtype.is_complex:
                    raise RuntimeError("Neptune does not support complex parameters (view them as real with torch.view_as_real)")
                if dtype in EXACT_DTYPES and implementation != "op":
                    lists = exact
                elif implementation != "reference":
                    raise TypeError(
                        f"Neptune: the operator supports float32, bfloat16 and float16 params, got {dtype}; "
                        "implementation='auto' steps float64 params exactly (the reference in float64), "
                        "implementation='reference' steps other dtypes"
                    )
            # The operator wants units as contiguous spans and grad and state with the
            # param's strides. Dense params keep their layout (no copy); others are
            # stepped through a dense copy (dim 0 outermost, the other dims in the
            # param's memory order: the cheapest copy), their state kept in that layout.
            # The reference (float64) takes any layout.
            spans = lists is exact or distributed.is_dtensor(p) or _units_are_spans(p)
            if len(state) == 0:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = _new_state(p, _state_dtype_of(p, sdt), spans)
                state["exp_avg_sq"] = _new_state(p, _state_dtype_of(p, sdt), spans)
            elif lists is not exact and not (_same_layout(state["exp_avg"], p, spans)
                                             and _same_layout(state["exp_avg_sq"], p, spans)):
                for key in ("exp_avg", "exp_avg_sq"):  # e.g. after model.to(memory_format=...)
                    state[key] = _new_state(p, state[key].dtype, spans).copy_(state[key])
            p_step = p
            if not spans or (lists is exact and not _units_are_spans(p)):
                _check_distinct_elements(p)
            if not spans:
                p_step = _new_state(p, p.dtype, False).copy_(p.detach())
                scratch_params.append(p)
                scratch_copies.append(p_step)
                if grad.stride() != p_step.stride():
                    grad = _new_state(p, grad.dtype, False).copy_(grad)
            elif lists is not exact and not _same_layout(grad, p, True):
                grad = _like_param(p, grad)  # the operator walks all four tensors alike
            lists.append(p_step, grad, state["exp_avg"], state["exp_avg_sq"], state["step"])
        return False

    def load_state_dict(self, state_dict: dict) -> None:
        """As Optimizer.load_state_dict, with these conversions:

        - ``exp_avg`` / ``exp_avg_sq`` take the group's state dtype as this optimizer was
          built (float32, or bfloat16 with the bf16 state; float64 for float64
          params) whatever the checkpoint holds: bfloat16 moments widen exactly to float32,
          float32 ones are rounded to the nearest bfloat16 (torch's default would cast
          them to the param's dtype, rounding fp32 moments of bf16 params to bf16); they
          live on the param's device in the layout the step uses;
        - ``step`` becomes a float32 scalar tensor on the param's device, also when the
          checkpoint holds a plain number (older PyTorch checkpoints), as AdamW does;
        - ``implementation``, ``state_dtype``, ``foreach`` and ``fused`` stay as this
          optimizer was built: they say how this process steps, not what it computes.
          Groups lacking Neptune's keys (an AdamW checkpoint) take this optimizer's
          defaults; everything else (lr, betas, clip, ...) comes from the checkpoint.

        A state dict that cannot be loaded as it is meant is refused with a ValueError or
        TypeError naming what is wrong, and the optimizer is left as it was: one that is
        not a dict with ``state`` and ``param_groups``, other numbers of groups or params,
        hyperparameters out of range, AMSGrad's (``amsgrad=True``, ``max_exp_avg_sq``:
        Neptune has no AMSGrad), a param's state lacking one of ``step``, ``exp_avg`` and
        ``exp_avg_sq`` or holding other keys, a ``step`` that is not a finite count >= 0,
        moments that are not real floating-point tensors of the param's shape with values
        (the meta device has none). A param with no entry, or an empty one, starts afresh.
        """
        _check_state_dict(state_dict, self.param_groups, self.defaults)
        was = (self.state, self.param_groups)
        try:
            self._load_checked_state_dict(state_dict)
        except BaseException:
            # Optimizer.load_state_dict builds new state and groups, leaving these as they were
            self.state, self.param_groups = was
            raise

    def _load_checked_state_dict(self, state_dict: dict) -> None:
        saved = state_dict["state"]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        runtime = [{k: g[k] for k in _RUNTIME_KEYS if k in g} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, keep in zip(self.param_groups, runtime):
            group.update(keep)
            validate_hyperparameters(group)
        groups = [g for g in self.param_groups for _ in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p, group in zip(saved_ids, params, groups):
            if saved_id not in saved:
                continue
            spans = distributed.is_dtensor(p) or p.dtype in EXACT_DTYPES or _units_are_spans(p)
            for key, value in saved[saved_id].items():
                if key == "step":
                    self.state[p][key] = torch.as_tensor(value).to(device=p.device, dtype=torch.float32, copy=True).reshape(())
                else:  # exp_avg, exp_avg_sq (checked)
                    dtype = _state_dtype_of(p, STATE_DTYPES[group["state_dtype"]])
                    self.state[p][key] = _new_state(p, dtype, spans).copy_(value)

    # -- step ----------------------------------------------------------------------------

    def _use_op(self, device: torch.device, group: dict) -> bool:
        implementation = group["implementation"]
        if implementation == "reference":
            return False
        if ops.has_kernel(device.type):
            return True
        message = (
            f"neptune_ext: no compiled Neptune kernel for device '{device.type}' "
            f"({ops.describe_build()}); {ops.REBUILD_HINT}."
        )
        if implementation == "op" or group.get("fused") or ops.require_kernel():
            raise RuntimeError(message + f" ({ops.REQUIRE_KERNEL_ENV}=1, implementation='op' or fused=True forbids the "
                               "fallback: they need a compiled kernel for the params' device)")
        if device.type not in _warned_devices:
            _warned_devices.add(device.type)
            warnings.warn(
                message + f" Falling back to the slow pure-PyTorch reference; set {ops.REQUIRE_KERNEL_ENV}=1 to make this an error.",
                RuntimeWarning,
                stacklevel=3,
            )
        return False

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_capture()

        # Set by torch.amp.GradScaler for optimizers with _step_supports_amp_scaling.
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)

        # Collect (and validate) every group before anything is written.
        steppers = []
        validated = self.__dict__.setdefault("_validated_hyper", {})  # id(group) -> _hyper_key
        for group in self.param_groups:
            lists, exact = StepLists.empty(), StepLists.empty()  # operator; float64 (the reference)
            scratch: tuple[list, list] = ([], [])
            self._init_group(group, *lists, *exact, *scratch)
            if not lists.params and not exact.params:
                continue
            # Set since construction (by a scheduler or by hand): checked before any group is
            # stepped, whichever implementation steps it; again only when a value changed.
            key = _hyper_key(group)
            if key is None or validated.get(id(group)) != key:
                validate_hyperparameters(group, read_device_lr=False)
                validated[id(group)] = key
            hyper = dict(
                lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
                weight_decay=group["weight_decay"], eps=group["eps"], clip=group["clip"],
                cautious=group["cautious"], maximize=group["maximize"],
            )
            local, whole = distributed.split_dtensors(lists)
            steppers.append((group, hyper, _buckets_by_device(local), whole, exact, scratch))
        # Devices and kernel availability (which may raise) before anything is written.
        for group, _, buckets, _, exact, _ in steppers:
            for device in [d for d, _ in buckets] + [p.device for p in exact.params]:
                if device.type == "meta":
                    raise RuntimeError("Neptune: a param on the meta device has a grad; a param must be on a "
                                       "device with data to be stepped (materialize it first, e.g. "
                                       "module.to_empty(device=...))")
            for device, _ in buckets:
                self._use_op(device, group)
        for group, hyper, buckets, whole, exact, scratch in steppers:
            inf = found_inf
            if group["skip_nonfinite"]:
                grads = [(device, bucket.grads) for device, bucket in buckets]
                grads += distributed.local_grads(whole)
                grads += [(g.device, [g]) for g in exact.grads]
                inf = _nonfinite_flags(grads, found_inf)

            def step_lists(device: torch.device, lists: StepLists) -> None:
                self._step_lists(group, device, lists, hyper, grad_scale, inf)

            for device, bucket in buckets:
                step_lists(device, bucket)
            distributed.step_whole(whole, step_lists)  # DTensors whose units span ranks
            for p, g, m, v, s in zip(*exact):  # float64: the reference in float64
                neptune_step_reference(p, g, m, v, s, **_device_kwargs(p.device, hyper, grad_scale, inf),
                                       compute_dtype=torch.float64)
            for p, work in zip(*scratch):
                p.copy_(work)
        return loss

    def _step_lists(self, group, device, lists: StepLists, hyper, grad_scale, found_inf) -> None:
        kw = _device_kwargs(device, hyper, grad_scale, found_inf)
        if self._use_op(device, group):
            ops.neptune_step_(*lists, **kw)
        else:
            neptune_step_reference_multi(*lists, **kw)

    def _check_capture(self) -> None:
        if not torch.cuda.is_available() or not torch.cuda.is_current_stream_capturing():
            return
        if not all(group["capturable"] for group in self.param_groups):
            raise RuntimeError(
                "Neptune.step() is being captured in a CUDA graph but the optimizer was built with "
                "capturable=False; build it with Neptune(..., capturable=True) (and warm it up with a "
                "few eager steps before capture)"
            )
        for group in self.param_groups:
            lr = group["lr"]
            if isinstance(lr, Tensor) and lr.device.type == "cpu":
                raise RuntimeError(
                    "Neptune: a CUDA graph would keep the value that the CPU tensor lr has at capture; "
                    "pass lr as a CUDA tensor (a schedule then works between replays) or as a float"
                )
            for p in group["params"]:
                if p.grad is not None and p.device.type != "cuda":
                    raise RuntimeError(f"Neptune: CUDA graph capture needs CUDA params, got one on {p.device}")


_HYPER_KEYS = ("lr", "betas", "eps", "weight_decay", "clip", "cautious", "maximize", "capturable", "skip_nonfinite",
               "implementation", "foreach", "fused", "differentiable", "state_dtype")


def _hyper_key(group: dict) -> tuple | None:
    """The values validate_hyperparameters reads (a list of betas copied, as it may change in
    place), or None when lr is a tensor, whose value may change in place."""
    if isinstance(group["lr"], Tensor):
        return None
    return tuple(tuple(v) if isinstance(v, list) else v for v in map(group.get, _HYPER_KEYS))


def _buckets_by_device(lists: StepLists) -> list[tuple[torch.device, StepLists]]:
    """[(device, lists)]: one operator call per device. The operator takes mixed param
    dtypes in one list, so one device needs no grouping at all, and the common
    single-device case skips torch's grouping (17 ms for 10,000 params)."""
    params = lists.params
    if not params:
        return []
    if not torch.compiler.is_compiling():
        device = params[0].device
        if all(p.device == device for p in params):
            return [(device, lists)]
    buckets = []
    for (device, _dtype), (tensors, _) in Optimizer._group_tensors_by_device_and_dtype(list(lists)).items():
        if device is None:  # torch.compile skips the grouping (one device assumed)
            device = tensors[0][0].device
        buckets.append((device, StepLists(*tensors)))
    return buckets


def _device_kwargs(device, hyper, grad_scale, found_inf) -> dict:
    """The step's keyword arguments with grad_scale, found_inf and a device lr on `device`."""
    # Non-blocking only into CUDA: a CPU kernel reads the value at once.
    nb = device.type == "cuda"
    scale = grad_scale.to(device, non_blocking=nb) if grad_scale is not None else None
    inf = found_inf.to(device, non_blocking=nb) if found_inf is not None else None
    lr = hyper["lr"]
    # The op dispatches on its tensors' device: move a device lr to CPU params. A CPU lr
    # stays as it is for CUDA params, whose op reads it on the host (a copy to the
    # device would block on the host every step).
    if isinstance(lr, Tensor) and lr.device != device and lr.device.type != "cpu":
        lr = lr.to(device)
    return dict(hyper, lr=lr, grad_scale=scale, found_inf=inf)


_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


def _check_state_dict(state_dict: Any, groups: list[dict], defaults: dict) -> None:
    """Refuses (ValueError / TypeError naming it) what Neptune.load_state_dict cannot load
    as it is meant, before anything changes (see there)."""
    where = "Neptune.load_state_dict:"
    if not isinstance(state_dict, dict) or not all(k in state_dict for k in ("state", "param_groups")):
        what = type(state_dict).__name__ if not isinstance(state_dict, dict) else \
            f"a dict lacking {[k for k in ('state', 'param_groups') if k not in state_dict]}"
        raise ValueError(f"{where} got {what}; expected a dict with 'state' and 'param_groups' "
                         "(as Optimizer.state_dict() returns)")
    saved_state, saved_groups = state_dict["state"], state_dict["param_groups"]
    if not isinstance(saved_state, dict):
        raise TypeError(f"{where} 'state' is a {type(saved_state).__name__}; expected a dict of param id to state")
    if not isinstance(saved_groups, (list, tuple)) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), (list, tuple)) for g in saved_groups):
        raise TypeError(f"{where} 'param_groups' must be a list of dicts, each with a list 'params'")
    if len(saved_groups) != len(groups):
        raise ValueError(f"{where} the state dict has {len(saved_groups)} param groups, this optimizer "
                         f"{len(groups)}; they must match")
    for gi, (saved, group) in enumerate(zip(saved_groups, groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"{where} param group {gi} has {len(saved['params'])} params in the state dict, "
                             f"{len(group['params'])} in this optimizer; they must match")
        if saved.get("amsgrad", False) is not False:
            raise ValueError(f"{where} param group {gi} has amsgrad={saved['amsgrad']!r}; valid range: False or "
                             "absent (Neptune has no AMSGrad variant)")
        merged = {**defaults, **{k: v for k, v in saved.items() if k != "params"},
                  **{k: group[k] for k in _RUNTIME_KEYS if k in group}}
        try:
            validate_hyperparameters(merged)
        except ValueError as e:
            raise ValueError(f"{where} param group {gi}: {e}") from None
        for pi, (pid, p) in enumerate(zip(saved["params"], group["params"])):
            entry = saved_state.get(pid)
            if entry is None:
                continue
            what = f"{where} the state of param {pi} of group {gi} (id {pid})"
            if not isinstance(entry, dict):
                raise TypeError(f"{what} is a {type(entry).__name__}; expected a dict")
            if not entry:
                continue
            extra = [k for k in entry if k not in _STATE_KEYS]
            missing = [k for k in _STATE_KEYS if k not in entry]
            if extra or missing:
                raise ValueError(f"{what} has keys {sorted(map(str, entry))}: "
                                 + (f"{', '.join(map(repr, missing))} missing; " if missing else "")
                                 + (f"{', '.join(map(repr, extra))} unknown to Neptune (AMSGrad's max_exp_avg_sq?); "
                                    if extra else "")
                                 + "valid: exactly 'step', 'exp_avg' and 'exp_avg_sq' (or an empty entry)")
            _check_step_value(entry["step"], what)
            for key in ("exp_avg", "exp_avg_sq"):
                v = entry[key]
                if not isinstance(v, Tensor):
                    raise TypeError(f"{what}: {key} is a {type(v).__name__}; expected a tensor")
                if not v.is_floating_point():
                    raise TypeError(f"{what}: {key} has dtype {v.dtype}; expected a real floating-point tensor")
                if v.shape != p.shape:
                    raise ValueError(f"{what}: {key} has shape {tuple(v.shape)}; expected the param's "
                                     f"{tuple(p.shape)}")
                if v.device.type == "meta" and p.device.type != "meta":
                    raise ValueError(f"{what}: {key} is on the meta device (no values); expected a tensor with "
                                     "values")


def _check_step_value(step: Any, what: str) -> None:
    ok_type = (isinstance(step, (int, float)) and not isinstance(step, bool)) or (
        isinstance(step, Tensor) and step.numel() == 1 and step.dtype != torch.bool and not step.is_complex()
        and step.device.type != "meta")
    if not ok_type:
        raise TypeError(f"{what}: step is {step!r}; expected a number or a one-element real tensor with a value")
    value = float(step)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{what}: step is {value}; valid range: a finite count >= 0")


def _check_distinct_elements(p: Tensor) -> None:
    """A param with a stride of 0 (expand()) has elements that share memory: writing its new
    values would fail, after its state (and other params) were written."""
    if any(st == 0 and n > 1 for st, n in zip(p.stride(), p.shape)):
        raise RuntimeError(
            f"Neptune: a param of shape {tuple(p.shape)} has strides {p.stride()}: elements that share memory "
            "(a stride of 0, as expand() gives); a param's elements must be distinct to be stepped (clone() it)")


def _is_dense(t: Tensor) -> bool:
    """Non-overlapping and dense: the elements fill one span of memory, in any dim order."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _units_are_spans(p: Tensor) -> bool:
    """What the operator accepts (csrc/args.h, units_are_spans): dense memory with
    dim 0 outermost, so each unit p[i] is one contiguous span (channels_last conv weights
    are; transposed, sliced or strided views are not)."""
    if p.numel() == 0 or p.is_contiguous():
        return True
    if not _is_dense(p):
        return False
    return p.dim() < 2 or p.shape[0] <= 1 or p.stride(0) == p.numel() // p.shape[0]


def _span_strides(p: Tensor) -> tuple[int, ...]:
    """Dense strides for p's shape with dim 0 outermost and the other dims in p's memory
    order: copying p there moves whole runs that are already contiguous (a transposed
    conv weight becomes one 2-D transpose, not a 4-D permutation)."""
    strides = [0] * p.dim()
    acc = 1
    for d in sorted(range(1, p.dim()), key=lambda d: (p.stride(d), -d)):  # innermost first
        strides[d] = acc
        acc *= p.shape[d]
    if p.dim():
        strides[0] = acc
    return tuple(strides)


def _same_layout(t: Tensor, p: Tensor, spans: bool) -> bool:
    """Whether `t` has the layout the step wants for `p`: p's strides when its units are
    spans (dense), else those of p's scratch copy (_span_strides)."""
    if not spans:
        return t.stride() == _span_strides(p)
    return (p.is_contiguous() and t.is_contiguous()) or t.stride() == p.stride()


def _new_state(p: Tensor, dtype: torch.dtype, spans: bool) -> Tensor:
    """Zeros in the layout the step wants for p (see _same_layout)."""
    if spans:
        return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
    return torch.empty_strided(p.shape, _span_strides(p), dtype=dtype, device=p.device).zero_()


def _state_dtype_of(p: Tensor, group_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if p.dtype in EXACT_DTYPES else group_dtype


def _like_param(p: Tensor, value: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A copy of `value` with `p`'s device, layout (strides) and the given dtype."""
    return torch.empty_like(p, dtype=dtype or value.dtype).copy_(value)


def _nonfinite_flags(grads_by_device, found_inf):
    """One flag for the whole group: > 0 when any of its gradients ([(device, grads)])
    holds an inf or NaN, or when the GradScaler's found_inf is set. Per rank: under FSDP2
    each rank sees its own gradient shards."""
    flags = {}
    for device, grads in grads_by_device:
        flag = flags.setdefault(device, torch.zeros(1, dtype=torch.float32, device=device))
        # Only checks here (an inverse scale of 1 leaves the grads as they are), but it
        # writes them: a grad with a stride of 0 (expand()) would be refused, so it is
        # checked in a copy.
        grads = [g.clone() if 0 in g.stride() else g for g in grads]
        torch._amp_foreach_non_finite_check_and_unscale_(
            grads, flag, torch.ones(1, dtype=torch.float32, device=device)
        )
    total = sum(f.to(next(iter(flags)), non_blocking=True) for f in flags.values())
    if found_inf is not None:
        total = total + found_inf.to(total.device)
    return total
