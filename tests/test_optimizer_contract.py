"""torch.optim's contract, as PyTorch's own optimizer tests (test/test_optim.py) check it,
for Neptune with the default implementation. Every case runs on the params those tests
use: contiguous, non-contiguous (a transposed weight, as weight tying and converted
checkpoints give, and torch's own ``randn(10, 5, 2)[..., 0]``) and float64."""
import copy
import inspect

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler, swa_utils

from neptune_ext import Neptune

KINDS = ["contiguous", "transposed", "sliced", "float64"]


def _weight_bias(kind: str, seed: int = 0):
    """(weight (10, 5), bias (10,)) as nn.Parameters of the given kind, same values per seed."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(10, 5, generator=gen)
    b = torch.randn(10, generator=gen)
    if kind == "transposed":
        w = w.t().contiguous().t()
    elif kind == "sliced":
        w = torch.stack([w, torch.zeros_like(w)], dim=-1)[..., 0]
        b = torch.stack([b, torch.zeros_like(b)], dim=-1)[..., 0]
    elif kind == "float64":
        w, b = w.double(), b.double()
    return nn.Parameter(w), nn.Parameter(b)


def _input(kind, seed=1):
    x = torch.randn(5, generator=torch.Generator().manual_seed(seed))
    return x.double() if kind == "float64" else x


def _assert_same(a, b, where="state_dict"):
    """Nested dicts / lists / tuples equal, tensors bitwise (dtype and device included)."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.device == b.device and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _closure(opt, weight, bias, x):
    def closure():
        opt.zero_grad()
        loss = (weight.mv(x) + bias).pow(2).sum()
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("maximize", [False, True], ids=["minimize", "maximize"])
@pytest.mark.parametrize("kind", KINDS)
def test_goes_right_direction(kind, maximize):
    weight, bias = _weight_bias(kind)
    assert weight.is_contiguous() == (kind in ("contiguous", "float64"))
    x = _input(kind)
    opt = Neptune([weight, bias], lr=1e-2, maximize=maximize)
    closure = _closure(opt, weight, bias, x)
    initial = closure().item()
    for _ in range(20):
        opt.step(closure)
    final = closure().item()
    assert final > initial if maximize else final < initial
    assert weight.dtype == (torch.float64 if kind == "float64" else torch.float32)


def _stepped(kind, n_steps=3, **kw):
    weight, bias = _weight_bias(kind)
    x = _input(kind)
    opt = Neptune([weight, bias], lr=1e-2, **kw)
    closure = _closure(opt, weight, bias, x)
    for _ in range(n_steps):
        opt.step(closure)
    return weight, bias, x, opt


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_deterministic_and_not_mutated_by_loading(kind):
    weight, bias, x, opt = _stepped(kind)
    # Equal (not identical) params, loaded from the first optimizer's state dict.
    weight_c = nn.Parameter(weight.detach().clone())
    bias_c = nn.Parameter(bias.detach().clone())
    opt_c = Neptune([weight_c, bias_c], lr=1e-2)
    state_dict = copy.deepcopy(opt.state_dict())
    state_dict_c = copy.deepcopy(opt.state_dict())
    opt_c.load_state_dict(state_dict_c)
    closure, closure_c = _closure(opt, weight, bias, x), _closure(opt_c, weight_c, bias_c, x)
    for _ in range(3):
        opt.step(closure)
        opt_c.step(closure_c)
        assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c)
    _assert_same(opt.state_dict(), opt_c.state_dict())
    # Loading (and stepping after) did not modify the dict it was given.
    _assert_same(state_dict_c, state_dict)
    # Repeated groups have identical representations (pytorch#36831).
    opt_c.param_groups.extend(opt_c.param_groups)
    assert opt.state_dict()["param_groups"][-1] == opt_c.state_dict()["param_groups"][-1]


@pytest.mark.parametrize("kind", KINDS)
def test_can_load_older_state_dict(kind):
    """Groups without `maximize` (or any Neptune key: an AdamW-era checkpoint) and a plain
    number as `step` (PyTorch < 1.12 checkpoints)."""
    weight, bias, x, opt = _stepped(kind)
    new_sd = copy.deepcopy(opt.state_dict())
    old_sd = copy.deepcopy(opt.state_dict())
    for group in old_sd["param_groups"]:
        for key in ("maximize", "clip", "cautious", "state_dtype", "foreach", "fused", "differentiable",
                    "capturable", "implementation", "skip_nonfinite"):
            del group[key]
    for state in old_sd["state"].values():
        state["step"] = int(state["step"].item())
    runs = []
    for sd in (new_sd, old_sd):
        w, b = nn.Parameter(weight.detach().clone()), nn.Parameter(bias.detach().clone())
        o = Neptune([w, b], lr=1e-2)
        o.load_state_dict(sd)
        for p in (w, b):
            step = o.state[p]["step"]
            assert isinstance(step, torch.Tensor) and step.dtype == torch.float32 and step.dim() == 0
        closure = _closure(o, w, b, x)
        for _ in range(2):
            o.step(closure)
        runs.append((w, b))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("kind", KINDS)
def test_deepcopy_copies_all_public_attrs(kind):
    weight, bias, x, opt = _stepped(kind)
    twin = copy.deepcopy(opt)

    def public(o):
        return {k for k in o.__dict__ if not k.startswith("_")}

    assert public(opt) == public(twin)
    assert twin.defaults == opt.defaults
    # The copy steps on its own params, as the original would.
    w2, b2 = twin.param_groups[0]["params"]
    assert w2 is not weight and torch.equal(w2, weight)
    opt.step(_closure(opt, weight, bias, x))
    twin.step(_closure(twin, w2, b2, x))
    assert torch.equal(w2, weight) and torch.equal(b2, bias)


# -- LR schedulers ----------------------------------------------------------------------

SCHEDULERS = {
    "LambdaLR": lambda o: lr_scheduler.LambdaLR(o, lambda k: 0.9**k),
    "MultiplicativeLR": lambda o: lr_scheduler.MultiplicativeLR(o, lambda k: 0.95),
    "StepLR": lambda o: lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o: lr_scheduler.MultiStepLR(o, milestones=[2, 4], gamma=0.5),
    "ConstantLR": lambda o: lr_scheduler.ConstantLR(o, factor=0.5, total_iters=3),
    "LinearLR": lambda o: lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=4),
    "ExponentialLR": lambda o: lr_scheduler.ExponentialLR(o, gamma=0.9),
    "PolynomialLR": lambda o: lr_scheduler.PolynomialLR(o, total_iters=8, power=2.0),
    "CosineAnnealingLR": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=6),
    "CosineAnnealingWarmRestarts": lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=3),
    # cycle_momentum: both rewrite betas[0] at every step
    "CyclicLR": lambda o: lr_scheduler.CyclicLR(o, base_lr=1e-3, max_lr=1e-2, step_size_up=3,
                                                base_momentum=0.8, max_momentum=0.95),
    "OneCycleLR": lambda o: lr_scheduler.OneCycleLR(o, max_lr=2e-2, total_steps=10, base_momentum=0.8,
                                                    max_momentum=0.95),
    "ReduceLROnPlateau": lambda o: lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0, threshold=10.0),
    "SequentialLR": lambda o: lr_scheduler.SequentialLR(
        o, [lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=2), lr_scheduler.ExponentialLR(o, gamma=0.9)],
        milestones=[2]),
    "ChainedScheduler": lambda o: lr_scheduler.ChainedScheduler(
        [lr_scheduler.ConstantLR(o, factor=0.5, total_iters=3), lr_scheduler.ExponentialLR(o, gamma=0.9)]),
}


def test_every_torch_scheduler_is_covered():
    public = {name for name, obj in inspect.getmembers(lr_scheduler, inspect.isclass)
              if obj.__module__ == lr_scheduler.__name__ and not name.startswith("_")
              and (issubclass(obj, lr_scheduler.LRScheduler) or obj is lr_scheduler.ReduceLROnPlateau)
              and obj not in (lr_scheduler.LRScheduler, getattr(lr_scheduler, "_LRScheduler", None))}
    assert public <= set(SCHEDULERS), f"not covered: {sorted(public - set(SCHEDULERS))}"


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("kind", KINDS)
def test_lr_scheduler_drives_the_step(kind, name):
    """Each step uses the lr and betas the scheduler has just set: a twin stepped by the
    reference, handed the same hyperparameters before each step, stays equal."""
    weight, bias = _weight_bias(kind)
    x = _input(kind)
    opt = Neptune([weight, bias], lr=1e-2)
    sched = SCHEDULERS[name](opt)
    tw, tb = nn.Parameter(weight.detach().clone()), nn.Parameter(bias.detach().clone())
    twin = Neptune([tw, tb], lr=1e-2, implementation="reference")
    closure, twin_closure = _closure(opt, weight, bias, x), _closure(twin, tw, tb, x)
    initial = closure().item()
    seen = set()
    for _ in range(8):
        twin.param_groups[0]["lr"] = opt.param_groups[0]["lr"]
        twin.param_groups[0]["betas"] = opt.param_groups[0]["betas"]
        seen.add((opt.param_groups[0]["lr"], opt.param_groups[0]["betas"][0]))
        loss = opt.step(closure)
        twin.step(twin_closure)
        sched.step(loss.item()) if name == "ReduceLROnPlateau" else sched.step()
    assert len(seen) > 1, "the scheduler changed nothing"
    torch.testing.assert_close(weight, tw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bias, tb, rtol=1e-5, atol=1e-6)
    assert closure().item() < initial


@pytest.mark.parametrize("kind", KINDS)
def test_averaged_model_with_swalr(kind):
    weight, bias = _weight_bias(kind)
    model = nn.Linear(5, 10).to(weight.dtype)
    model.weight, model.bias = weight, bias
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(2)).to(weight.dtype)
    swa_model = swa_utils.AveragedModel(model)
    opt = Neptune(model.parameters(), lr=1e-2)
    swa = swa_utils.SWALR(opt, swa_lr=1e-3, anneal_epochs=2)
    history = []
    for _ in range(5):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
        swa.step()
        swa_model.update_parameters(model)
        history.append(model.weight.detach().clone())
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    torch.testing.assert_close(swa_model.module.weight.detach(), torch.stack(history).mean(0))


@pytest.mark.parametrize("kind", KINDS)
def test_add_param_group_after_steps(kind):
    weight, bias, x, opt = _stepped(kind, n_steps=2)
    extra, _ = _weight_bias(kind, seed=5)
    start = extra.detach().clone()
    opt.add_param_group({"params": [extra], "lr": 5e-2, "clip": 0.0})
    _closure(opt, weight, bias, x)()
    extra.grad = torch.ones_like(extra)
    opt.step()
    assert opt.state[weight]["step"].item() == 3 and opt.state[extra]["step"].item() == 1
    # First step with grad 1, no clipping: every element moves by lr (1 + wd * w) downhill.
    torch.testing.assert_close(extra.detach(), start * (1 - 5e-2 * 1e-2) - 5e-2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_grad_set_to_none_false_then_step_is_a_noop(kind):
    """zero_grad(set_to_none=False) leaves zero tensors; a step of a fresh optimizer on
    zero grads without weight decay changes no param (torch's step_is_noop_for_zero_grads)."""
    weight, bias, x, opt = _stepped(kind)
    opt.zero_grad(set_to_none=False)
    assert weight.grad is not None and torch.count_nonzero(weight.grad) == 0
    assert bias.grad is not None and torch.count_nonzero(bias.grad) == 0
    fresh = Neptune([weight, bias], lr=1e-2, weight_decay=0.0)
    before = (weight.detach().clone(), bias.detach().clone())
    fresh.step()
    assert torch.equal(weight, before[0]) and torch.equal(bias, before[1])
    assert fresh.state[weight]["step"].item() == 1


@pytest.mark.parametrize("kind", KINDS)
def test_params_whose_grad_is_none_are_left_alone(kind):
    weight, bias = _weight_bias(kind)
    other, _ = _weight_bias(kind, seed=3)
    opt = Neptune([weight, other, bias], lr=1e-2)
    x = _input(kind)
    before = other.detach().clone()
    for _ in range(2):
        opt.step(_closure(opt, weight, bias, x))
    assert other.grad is None and torch.equal(other, before) and len(opt.state[other]) == 0
    assert opt.state[weight]["step"].item() == 2


@pytest.mark.parametrize("kind", KINDS)
def test_same_tensor_in_two_groups_is_rejected(kind):
    weight, bias = _weight_bias(kind)
    with pytest.raises(ValueError, match="more than one parameter group"):
        Neptune([{"params": [weight, bias]}, {"params": [weight], "clip": 0.0}])
    opt = Neptune([{"params": [weight]}, {"params": [bias]}])
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [bias]})
    assert len(opt.param_groups) == 2
    x = _input(kind)
    opt.step(_closure(opt, weight, bias, x))  # the optimizer is still whole


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_algorithms(kind):
    """Under torch.use_deterministic_algorithms(True) the step runs (nothing in it is
    flagged nondeterministic) and repeats bitwise."""
    results = []
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            weight, bias, x, opt = _stepped(kind, n_steps=4, state_dtype=torch.bfloat16)
            results.append((weight.detach().clone(), bias.detach().clone(),
                            opt.state[weight]["exp_avg"].clone()))
    finally:
        torch.use_deterministic_algorithms(prev)
    for a, b in zip(*results):
        assert torch.equal(a, b)
