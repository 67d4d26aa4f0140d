"""Neptune.load_state_dict with state dicts it must refuse, found by
tests/test_fuzz_checkpoint.py: each is refused with an error naming what is wrong, and the
optimizer is left as it was (state and param groups) and steps as if it never tried."""
import copy

import pytest
import torch
from torch import nn

from neptune_ext import Neptune, fuzzing


def _stepped(n_steps=2, **kw):
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in ((4, 3), (5,))]
    opt = Neptune([{"params": params[:1]}, {"params": params[1:]}], **kw)
    for _ in range(n_steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return params, opt


def _entry(sd, k=0):
    return sd["state"][sd["param_groups"][0]["params"][0] if k == 0 else sd["param_groups"][1]["params"][0]]


def _set(path, value):
    def mutate(sd):
        *head, last = path
        target = sd
        for key in head:
            target = target[key]
        target[last] = value
        return sd
    return mutate


def _meta_moment(sd):
    _entry(sd)["exp_avg"] = _entry(sd)["exp_avg"].to("meta")
    return sd


def _broadcastable_moment(sd):  # copy_ broadcast it over the param's rows
    _entry(sd)["exp_avg_sq"] = _entry(sd)["exp_avg_sq"][:1].clone()
    return sd


def _amsgrad(sd):
    sd["param_groups"][0]["amsgrad"] = True
    _entry(sd)["max_exp_avg_sq"] = _entry(sd)["exp_avg_sq"].clone()
    return sd


def _drop(*path):
    def mutate(sd):
        *head, last = path
        target = sd
        for key in head:
            target = target[key]
        del target[last]
        return sd
    return mutate


def _first_state_key(key):
    def mutate(sd):
        del _entry(sd)[key]
        return sd
    return mutate


# (id, mutation, what the message must say): what happened before, in the comment
BAD = [
    ("no-state", _drop("state"), r"lacking \['state'\]"),  # KeyError: 'state'
    ("no-param_groups", _drop("param_groups"), r"lacking \['param_groups'\]"),  # KeyError
    ("not-a-dict", lambda sd: [sd], "got list; expected a dict"),  # TypeError: list indices must be integers
    ("state-a-list", lambda sd: {**sd, "state": list(sd["state"].values())}, "'state' is a list"),  # AttributeError
    ("group-without-params", _drop("param_groups", 0, "params"), "'param_groups' must be a list of dicts, each with"),
    ("a-group-more", lambda sd: {**sd, "param_groups": sd["param_groups"] + [copy.deepcopy(sd["param_groups"][1])]},
     "has 3 param groups, this optimizer 2; they must match"),
    ("a-param-more", lambda sd: _set(("param_groups", 1, "params"), sd["param_groups"][1]["params"] + [99])(sd),
     "param group 1 has 2 params in the state dict, 1 in this optimizer; they must match"),
    # loaded, then refused: state and groups already replaced
    ("lr-negative", _set(("param_groups", 1, "lr"), -1.0), r"param group 1: Neptune: invalid lr=-1.0; valid range"),
    ("clip-none", _set(("param_groups", 0, "clip"), None), "invalid clip=None"),
    ("amsgrad", _amsgrad, "amsgrad=True; valid range: False or absent"),  # loaded, AMSGrad silently dropped
    ("no-exp_avg", _first_state_key("exp_avg"), "'exp_avg' missing"),  # loaded; the next step: KeyError
    ("no-step", _first_state_key("step"), "'step' missing"),
    ("unknown-key", lambda sd: _set(("state", sd["param_groups"][0]["params"][0], "foo"), torch.zeros(()))(sd),
     "'foo' unknown to Neptune"),
    ("step-string", lambda sd: _set(("state", 0, "step"), "3")(sd), "step is '3'; expected a number"),  # loaded
    ("step-none", lambda sd: _set(("state", 0, "step"), None)(sd), "step is None"),  # loaded; next step: TypeError
    ("step-nan", lambda sd: _set(("state", 0, "step"), float("nan"))(sd), "step is nan; valid range"),  # loaded
    ("step-negative", lambda sd: _set(("state", 0, "step"), -1)(sd), "step is -1.0; valid range"),  # loaded
    ("step-two-elements", lambda sd: _set(("state", 0, "step"), torch.tensor([1.0, 2.0]))(sd),
     "expected a number or a one-element real tensor"),  # RuntimeError: shape '[]' is invalid, mid-load
    ("step-meta", lambda sd: _set(("state", 0, "step"), torch.tensor(2.0, device="meta"))(sd), "with a value"),
    ("moment-broadcastable", _broadcastable_moment, r"exp_avg_sq has shape \(1, 3\); expected the param's \(4, 3\)"),
    ("moment-int", lambda sd: _set(("state", 0, "exp_avg"), torch.zeros(4, 3, dtype=torch.int32))(sd),
     "exp_avg has dtype torch.int32; expected a real floating-point"),  # loaded (converted)
    ("moment-complex", lambda sd: _set(("state", 0, "exp_avg"), torch.zeros(4, 3, dtype=torch.complex64))(sd),
     "exp_avg has dtype torch.complex64"),  # loaded, imaginary part dropped
    ("moment-meta", _meta_moment, "exp_avg is on the meta device"),  # NotImplementedError, mid-load
    ("moment-list", lambda sd: _set(("state", 0, "exp_avg"), [0.0] * 12)(sd), "exp_avg is a list; expected a tensor"),
]


@pytest.mark.parametrize("mutate, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_a_bad_state_dict_is_refused_and_changes_nothing(mutate, message):
    params, opt = _stepped()
    twin_params, twin = _stepped()
    sd = mutate(copy.deepcopy(opt.state_dict()))
    before = fuzzing._optimizer_snapshot(opt)
    with pytest.raises((ValueError, TypeError), match=message):
        opt.load_state_dict(sd)
    assert fuzzing._same(fuzzing._optimizer_snapshot(opt), before, "optimizer") is None
    for p, q in zip(params, twin_params):  # and it steps as if it had never tried
        p.grad = torch.ones(p.shape)
        q.grad = torch.ones(q.shape)
    opt.step()
    twin.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twin_params))


def test_an_adamw_dict_without_amsgrad_still_loads():
    params = [nn.Parameter(torch.randn(4, 3))]
    adamw = torch.optim.AdamW(params, amsgrad=False)
    params[0].grad = torch.randn(4, 3)
    adamw.step()
    opt = Neptune(params)
    opt.load_state_dict(adamw.state_dict())  # amsgrad: False is in every AdamW group
    assert opt.state[params[0]]["step"].item() == 1
