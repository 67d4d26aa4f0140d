"""Neptune in place of torch.optim.AdamW: AdamW's keyword arguments, float64 params and
checkpoints (numeric steps, state dtypes)."""
import copy
import io

import pytest
import torch
from torch import nn

import neptune_ext
from neptune_ext import Neptune, neptune_step_reference
from neptune_ext import ops as neptune_ops
from neptune_ext import optimizer as neptune_optimizer
from neptune_ext import testing

HYPER = {**testing.HYPER, "weight_decay": 1e-2}  # Neptune's defaults: what a bare Neptune(params, lr) steps


def _params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in ((6, 5), (5,), (4, 3, 3, 3))]


def _grads(params, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 0.1).to(p.dtype)


def _step_side_by_side(pairs, n_steps):
    """Steps each (params, optimizer) pair n_steps times on the same gradients."""
    for k in range(n_steps):
        for params, opt in pairs:
            _grads(params, k)
            opt.step()


# -- foreach / fused / capturable / differentiable -----------------------------------------


@pytest.mark.parametrize("kwargs", [
    {}, {"foreach": None}, {"foreach": True}, {"foreach": False}, {"fused": None}, {"fused": True},
    {"fused": False}, {"foreach": False, "fused": True}, {"capturable": True}, {"differentiable": False},
    # what torch.optim.AdamW's own defaults spell out, as code copying them passes
    {"foreach": None, "fused": None, "capturable": False, "differentiable": False, "maximize": False},
], ids=repr)
def test_adamw_keywords_are_accepted_and_change_nothing(kwargs):
    ref, ours = _params(), _params()
    o_ref, o = Neptune(ref, lr=1e-2), Neptune(ours, lr=1e-2, **kwargs)
    _step_side_by_side([(ref, o_ref), (ours, o)], 3)
    for a, b in zip(ref, ours):
        assert torch.equal(a, b)
    group = o.state_dict()["param_groups"][0]
    for key, value in kwargs.items():
        assert group[key] == value


@pytest.mark.parametrize("kwargs, match", [
    ({"differentiable": True}, r"invalid differentiable=True; valid range: False \(the step is a fused in-place operator with no autograd formula"),
    ({"fused": True, "foreach": True}, r"invalid fused=True with foreach=True.*as in torch.optim.AdamW"),
    ({"fused": True, "implementation": "reference"}, r"invalid fused=True with implementation='reference'"),
    ({"foreach": 1}, r"invalid foreach=1; valid range: None, True or False"),
    ({"fused": "yes"}, r"invalid fused='yes'; valid range: None, True or False"),
])
def test_adamw_keywords_that_cannot_be_honoured_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Neptune(_params(), **kwargs)
    opt = Neptune(_params()[:1])
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": _params(seed=1)[:1], **kwargs})


def test_fused_true_forbids_the_reference_fallback(monkeypatch):
    monkeypatch.setattr(neptune_ops, "has_kernel", lambda device_type: False)
    monkeypatch.setattr(neptune_optimizer, "_warned_devices", set())
    params = _params()
    _grads(params, 0)
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="fused=True forbids the fallback"):
        Neptune(params, fused=True).step()
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    with pytest.warns(RuntimeWarning, match="Falling back"):
        Neptune(params, fused=False).step()


# -- float64 --------------------------------------------------------------------------------


def test_float64_params_step_exactly_with_the_default_implementation():
    """The exact path: the reference computed in float64, with float64 state."""
    params = _params(torch.float64)
    opt = Neptune(params, lr=HYPER["lr"])
    shadow = [(p.detach().clone(), torch.zeros_like(p), torch.zeros_like(p), torch.tensor(0.0)) for p in params]
    for k in range(3):
        _grads(params, k)
        opt.step()
        for p, (w, m, v, s) in zip(params, shadow):
            neptune_step_reference(w, p.grad, m, v, s, **HYPER, compute_dtype=torch.float64)
    for p, (w, m, v, s) in zip(params, shadow):
        assert p.dtype == torch.float64 and torch.equal(p.detach(), w)
        st = opt.state[p]
        assert st["exp_avg"].dtype == torch.float64 and torch.equal(st["exp_avg"], m)
        assert torch.equal(st["exp_avg_sq"], v) and st["step"].dtype == torch.float32 and st["step"].item() == 3


def test_float64_matches_adamw_in_float64():
    ours, theirs = _params(torch.float64), _params(torch.float64)
    opt = Neptune(ours, lr=3e-3, weight_decay=0.05, clip=0.0, cautious=False)
    ref = torch.optim.AdamW(theirs, lr=3e-3, weight_decay=0.05)
    _step_side_by_side([(ours, opt), (theirs, ref)], 5)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_mixed_float64_and_float32_in_one_group(monkeypatch):
    """float32 through the operator and float64 through the exact path, in one step."""
    p32 = _params(torch.float32)
    p64 = _params(torch.float64, seed=1)
    ordered = [p32[0], p64[0], p32[1], p64[1], p32[2], p64[2]]
    to_op = []
    real = neptune_ops.neptune_step_

    def spy(params, *args, **kw):
        to_op.append([p.dtype for p in params])
        real(params, *args, **kw)

    monkeypatch.setattr(neptune_ops, "neptune_step_", spy)
    opt = Neptune(ordered, lr=HYPER["lr"], skip_nonfinite=True)
    shadow = [(p.detach().clone(), torch.zeros_like(p, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32),
               None, torch.tensor(0.0)) for p in ordered]
    shadow = [(w, m, m.clone(), s) for w, m, _, s in shadow]
    for k in range(2):
        _grads(ordered, k)
        opt.step()
        for p, (w, m, v, s) in zip(ordered, shadow):
            cd = torch.float64 if p.dtype == torch.float64 else torch.float32
            neptune_step_reference(w, p.grad, m, v, s, **HYPER, compute_dtype=cd)
    assert to_op == [[torch.float32] * 3] * 2
    for p, (w, *_rest) in zip(ordered, shadow):
        if p.dtype == torch.float64:
            assert torch.equal(p.detach(), w)
        else:
            torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-6)
    # skip_nonfinite looks at the float64 grads too: a NaN there skips the whole group.
    _grads(ordered, 9)
    ordered[1].grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in ordered]
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, ordered))


def test_float64_with_implementation_op_is_refused_before_anything_is_written():
    a = nn.Parameter(torch.randn(3, 4))
    b = nn.Parameter(torch.randn(3, dtype=torch.float64))
    a.grad, b.grad = torch.randn(3, 4), torch.randn(3, dtype=torch.float64)
    before = a.detach().clone()
    with pytest.raises(TypeError, match="got torch.float64"):
        Neptune([{"params": [a]}, {"params": [b], "implementation": "op"}]).step()
    assert torch.equal(a, before)


# -- checkpoints ---------------------------------------------------------------------------


def _round_trip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("step_value", [3, 3.0], ids=["int", "float"])
def test_numeric_step_loads_as_a_float32_tensor(step_value):
    params = _params()
    opt = Neptune(params)
    _step_side_by_side([(params, opt)], 3)
    sd = copy.deepcopy(opt.state_dict())
    for st in sd["state"].values():
        st["step"] = step_value
    twin = [nn.Parameter(p.detach().clone()) for p in params]
    opt2 = Neptune(twin)
    opt2.load_state_dict(_round_trip(sd))
    for p in twin:
        step = opt2.state[p]["step"]
        assert isinstance(step, torch.Tensor) and step.dtype == torch.float32 and step.shape == ()
        assert step.device == p.device and step.item() == 3
    _grads(params, 5)
    _grads(twin, 5)
    opt.step()
    opt2.step()
    for a, b in zip(params, twin):
        assert torch.equal(a, b)


@pytest.mark.parametrize("saved, loading", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)],
                         ids=["bf16-into-fp32", "fp32-into-bf16"])
def test_state_dtype_of_the_loading_optimizer_wins(saved, loading):
    """The moments are converted to the loading optimizer's state dtype: bf16 -> fp32
    widens exactly, fp32 -> bf16 rounds to nearest; the group keeps its state_dtype."""
    params = _params()
    opt = Neptune(params, state_dtype=saved)
    _step_side_by_side([(params, opt)], 3)
    twin = [nn.Parameter(p.detach().clone()) for p in params]
    opt2 = Neptune(twin, state_dtype=loading)
    opt2.load_state_dict(_round_trip(opt.state_dict()))
    assert opt2.param_groups[0]["state_dtype"] == str(loading).removeprefix("torch.")
    for a, b in zip(params, twin):
        for key in ("exp_avg", "exp_avg_sq"):
            got, was = opt2.state[b][key], opt.state[a][key]
            assert got.dtype == loading
            assert torch.equal(got, was.to(loading))
    _grads(twin, 7)
    opt2.step()
    assert all(opt2.state[p]["exp_avg"].dtype == loading for p in twin)


def test_strided_param_state_loads_in_the_layout_the_step_uses():
    w = nn.Parameter(torch.randn(5, 10).t())
    opt = Neptune([w])
    w.grad = torch.randn(10, 5)
    opt.step()
    sd = _round_trip(opt.state_dict())
    w2 = nn.Parameter(w.detach().clone().t().contiguous().t())
    opt2 = Neptune([w2])
    opt2.load_state_dict(sd)
    assert opt2.state[w2]["exp_avg"].is_contiguous()  # a transposed param steps via a dense copy
    w2.grad = w.grad.clone()
    opt.step()
    opt2.step()
    assert torch.equal(w, w2)


def test_compiled_step_with_strided_and_float64_params():
    """torch.compile(opt.step) runs the scratch-copy and float64 paths as eager does."""
    if not neptune_ext.has_kernel("cpu"):
        pytest.skip("CPU extension not built")
    torch._dynamo.reset()

    def run(compiled):
        w = nn.Parameter(torch.randn(5, 10, generator=torch.Generator().manual_seed(0)).t())
        d = nn.Parameter(torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
        opt = Neptune([w, d], lr=1e-2)
        step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        for k in range(3):
            gen = torch.Generator().manual_seed(10 + k)
            w.grad = torch.randn(10, 5, generator=gen)
            d.grad = torch.randn(4, 3, dtype=torch.float64, generator=gen)
            step()
        return w.detach().clone(), d.detach().clone()

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)
