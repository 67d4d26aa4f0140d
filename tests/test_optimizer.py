"""The Neptune optimizer class: torch.optim.Optimizer behaviour around the operator."""
import copy
import io
import warnings

import pytest
import torch
from torch import nn

import neptune_ext
from neptune_ext import Neptune, neptune_step_reference
from neptune_ext import ops as neptune_ops
from neptune_ext import optimizer as neptune_optimizer
from neptune_ext.testing import assert_param_close, cpu_kernel_sets

IMPLS = ["reference", "op"]


def _params(seed=0, shapes=((6, 5), (5,), (4, 3, 3, 3), (11,)), dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def _set_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 0.1).to(p.dtype)


@pytest.fixture(autouse=True)
def _need_op(request):
    if "impl" in request.fixturenames and request.getfixturevalue("impl") == "op":
        if not neptune_ext.has_kernel("cpu"):
            pytest.skip("CPU extension not built")


@pytest.mark.parametrize("impl", IMPLS)
def test_equals_adamw_without_clip_and_mask(impl):
    ours, theirs = _params(), _params()
    opt = Neptune(ours, lr=3e-3, betas=(0.8, 0.99), weight_decay=0.05, clip=0.0, cautious=False, implementation=impl)
    ref = torch.optim.AdamW(theirs, lr=3e-3, betas=(0.8, 0.99), weight_decay=0.05)
    for k in range(6):
        _set_grads(ours, k)
        _set_grads(theirs, k)
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_matches_reference_per_param_with_groups_and_scheduler(impl):
    params = _params()
    groups = [
        {"params": params[:2], "clip": 0.05},
        {"params": params[2:], "weight_decay": 0.0, "cautious": False, "lr": 5e-3},
    ]
    opt = Neptune(groups, lr=1e-2, implementation=impl)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    shadow = [p.detach().clone() for p in params]
    state = [(torch.zeros_like(p), torch.zeros_like(p), torch.tensor(0.0)) for p in params]
    for k in range(3):
        _set_grads(params, k)
        lrs = [g["lr"] for g in opt.param_groups]
        opt.step()
        sched.step()
        for i, (p, s) in enumerate(zip(shadow, state)):
            g = opt.param_groups[0] if i < 2 else opt.param_groups[1]
            hyper = dict(lr=lrs[0] if i < 2 else lrs[1], beta1=0.9, beta2=0.999, eps=1e-8,
                         weight_decay=g["weight_decay"], clip=g["clip"], cautious=g["cautious"], maximize=False)
            neptune_step_reference(p, params[i].grad, s[0], s[1], s[2], **hyper)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 8)
    for a, b in zip(params, shadow):
        torch.testing.assert_close(a.detach(), b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_state_keys_dtypes_and_devices(impl, dtype):
    params = _params(dtype=dtype)
    opt = Neptune(params, implementation=impl)
    _set_grads(params, 0)
    opt.step()
    for p in params:
        st = opt.state[p]
        assert set(st) == {"step", "exp_avg", "exp_avg_sq"}
        assert st["step"].dtype == torch.float32 and st["step"].dim() == 0 and st["step"].item() == 1
        assert st["exp_avg"].dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.float32
        assert st["exp_avg"].shape == p.shape and st["step"].device == p.device
        assert p.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_op_and_reference_optimizers_agree_for_half_params(dtype):
    if not neptune_ext.has_kernel("cpu"):
        pytest.skip("CPU extension not built")
    a, b = _params(dtype=dtype), _params(dtype=dtype)
    oa, ob = Neptune(a, implementation="op"), Neptune(b, implementation="reference")
    _set_grads(a, 0)
    _set_grads(b, 0)
    oa.step()
    ob.step()
    for x, y in zip(a, b):
        assert_param_close(x.detach(), y.detach(), str(x.shape))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_and_bitwise_resume(impl, dtype):
    def run(params, opt, start, stop):
        for k in range(start, stop):
            _set_grads(params, k)
            opt.step()

    straight = _params(dtype=dtype)
    opt = Neptune(straight, implementation=impl)
    run(straight, opt, 0, 5)

    first = _params(dtype=dtype)
    opt1 = Neptune(first, implementation=impl)
    run(first, opt1, 0, 3)
    buf = io.BytesIO()
    torch.save({"model": [p.detach() for p in first], "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    resumed = [nn.Parameter(t.clone()) for t in ckpt["model"]]
    opt2 = Neptune(resumed, implementation=impl)
    opt2.load_state_dict(ckpt["opt"])
    for p in resumed:  # state stays fp32 for bf16 params (torch's default load would cast it)
        assert opt2.state[p]["exp_avg"].dtype == torch.float32
        assert opt2.state[p]["step"].dtype == torch.float32
    run(resumed, opt2, 3, 5)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)
    for a, b in zip(straight, resumed):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[a][key], opt2.state[b][key])


def test_load_state_dict_does_not_alias_the_checkpoint():
    params = _params()
    opt = Neptune(params)
    _set_grads(params, 0)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(sd)
    _set_grads(params, 1)
    opt.step()
    assert sd["state"][0]["step"].item() == 1


def test_step_closure_hooks_zero_grad_and_repr():
    model = nn.Linear(4, 3)
    opt = Neptune(model.parameters(), lr=1e-2)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    x = torch.randn(8, 4)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    before = model.weight.detach().clone()
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    assert calls == ["pre", "post"]
    assert not torch.equal(before, model.weight)
    opt.zero_grad()
    assert model.weight.grad is None
    text = repr(opt)
    assert text.startswith("Neptune (") and "clip: 0.1" in text and "cautious: True" in text


def test_params_without_grad_are_skipped():
    params = _params()
    opt = Neptune(params)
    _set_grads(params, 0)
    params[1].grad = None
    before = params[1].detach().clone()
    opt.step()
    assert torch.equal(params[1], before)
    assert len(opt.state[params[1]]) == 0
    assert opt.state[params[0]]["step"].item() == 1


@pytest.mark.parametrize(
    "kwargs, name, valid",
    [
        ({"lr": -1e-3}, "lr", ">= 0"),
        ({"lr": torch.tensor([1e-3, 1e-3])}, "lr", "one-element"),
        ({"betas": (1.0, 0.999)}, r"betas\[0\]", r"\[0, 1\)"),
        ({"betas": (0.9, -0.1)}, r"betas\[1\]", r"\[0, 1\)"),
        ({"betas": (0.9,)}, "betas", "pair"),
        ({"eps": 0.0}, "eps", "> 0"),
        ({"weight_decay": -0.1}, "weight_decay", ">= 0"),
        ({"clip": -1.0}, "clip", ">= 0"),
        ({"cautious": "yes"}, "cautious", "True or False"),
        ({"maximize": 1}, "maximize", "True or False"),
        ({"implementation": "fast"}, "implementation", "auto"),
    ],
)
def test_invalid_hyperparameters(kwargs, name, valid):
    with pytest.raises(ValueError, match=f"invalid {name}=.*valid range: .*{valid}"):
        Neptune(_params(), **kwargs)


def test_invalid_param_group_is_rejected():
    params = _params()
    opt = Neptune(params[:2])
    with pytest.raises(ValueError, match="invalid clip"):
        opt.add_param_group({"params": params[2:], "clip": -0.5})
    assert len(opt.param_groups) == 1


def test_sparse_gradient_raises_and_nothing_is_updated():
    emb = nn.Embedding(10, 4, sparse=True)
    dense = nn.Parameter(torch.randn(3, 3))
    opt = Neptune([{"params": [dense]}, {"params": emb.parameters()}])
    emb(torch.tensor([1, 2])).sum().backward()
    dense.grad = torch.randn(3, 3)
    before = dense.detach().clone()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert torch.equal(dense, before), "the first group must not be stepped before the error"


def test_complex_param_raises():
    p = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    p.grad = torch.randn(3, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="complex"):
        Neptune([p]).step()


def test_float64_params_need_the_default_or_reference_implementation():
    """The operator has no float64 kernel: implementation='op' says so; 'auto' (the default)
    steps float64 params exactly (tests/test_dropin.py)."""
    p = nn.Parameter(torch.randn(3, dtype=torch.float64))
    p.grad = torch.randn(3, dtype=torch.float64)
    with pytest.raises(TypeError, match="float32, bfloat16 and float16 params, got torch.float64"):
        Neptune([p], implementation="op").step()
    Neptune([p], implementation="reference").step()


def test_missing_kernel_warns_once_then_errors_when_required(monkeypatch):
    monkeypatch.setattr(neptune_ops, "has_kernel", lambda device_type: False)
    monkeypatch.setattr(neptune_optimizer, "_warned_devices", set())
    params = _params()
    opt = Neptune(params)
    _set_grads(params, 0)
    with pytest.warns(RuntimeWarning, match=r"no compiled Neptune kernel for device 'cpu'.*pip install"):
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # once only
    monkeypatch.setenv("NEPTUNE_REQUIRE_KERNEL", "1")
    with pytest.raises(RuntimeError, match="no compiled Neptune kernel"):
        opt.step()
    monkeypatch.delenv("NEPTUNE_REQUIRE_KERNEL")
    with pytest.raises(RuntimeError, match="implementation='op'"):
        Neptune(params, implementation="op").step()


def test_build_info_reports_the_build():
    info = neptune_ext.build_info()
    assert info["cpu"] is True and info["cpu_kernel_loaded"] is True
    assert info["cpu_isa"] in cpu_kernel_sets()
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]


def test_trains_a_small_model():
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = (x[:, :3].sum(1) > 0).long()
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
    opt = Neptune(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.9, acc


def test_a_later_group_that_cannot_step_updates_nothing(monkeypatch):
    a, b = _params()[:2]
    opt = Neptune([{"params": [a], "implementation": "reference"}, {"params": [b], "implementation": "op"}])
    _set_grads([a, b], 0)
    monkeypatch.setattr(neptune_ops, "has_kernel", lambda device_type: False)
    before = a.detach().clone()
    with pytest.raises(RuntimeError, match="no compiled Neptune kernel"):
        opt.step()
    assert torch.equal(a, before), "the first group must not be stepped before the error"
    assert opt.state[a]["step"].item() == 0


def test_gradient_with_other_strides_is_accepted():
    p = nn.Parameter(torch.randn(4, 6))
    q = nn.Parameter(p.detach().clone())
    p.grad = torch.randn(6, 4).t()  # same values layout-wise, transposed strides
    q.grad = p.grad.contiguous()
    Neptune([p]).step()
    Neptune([q]).step()
    assert torch.equal(p, q)


def test_channels_last_after_loading_a_contiguous_checkpoint():
    conv = nn.Conv2d(3, 8, 3)
    opt = Neptune(conv.parameters())
    conv.weight.grad = torch.randn_like(conv.weight)
    conv.bias.grad = torch.randn_like(conv.bias)
    opt.step()
    sd = opt.state_dict()
    conv_cl = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    conv_cl.load_state_dict(conv.state_dict())
    opt_cl = Neptune(conv_cl.parameters())
    opt_cl.load_state_dict(sd)
    conv_cl.weight.grad = conv.weight.grad.to(memory_format=torch.channels_last)
    conv_cl.bias.grad = conv.bias.grad.clone()
    opt.step()
    opt_cl.step()
    torch.testing.assert_close(conv_cl.weight, conv.weight, rtol=1e-6, atol=1e-7)


def test_loads_an_adamw_checkpoint():
    params = _params()
    adamw = torch.optim.AdamW(params, lr=3e-3)
    _set_grads(params, 0)
    adamw.step()
    opt = Neptune(params)
    opt.load_state_dict(adamw.state_dict())
    assert opt.param_groups[0]["clip"] == 0.1 and opt.param_groups[0]["lr"] == 3e-3
    opt.step()
    assert opt.state[params[0]]["step"].item() == 2


def test_tensor_lr_survives_a_state_dict_round_trip():
    params = _params()
    opt = Neptune(params, lr=torch.tensor(2e-3))
    _set_grads(params, 0)
    opt.step()
    opt2 = Neptune(params, lr=torch.tensor(5e-3))
    opt2.load_state_dict(opt.state_dict())
    assert isinstance(opt2.param_groups[0]["lr"], torch.Tensor)
    assert opt2.param_groups[0]["lr"].item() == pytest.approx(2e-3)
    opt2.step()


# -- found by tests/test_fuzz_optimizer.py --------------------------------------------------------


def _two_groups(impl):
    a, b = _params()[:2]
    opt = Neptune([{"params": [a]}, {"params": [b]}], lr=1e-2, implementation=impl)
    _set_grads([a, b], 0)
    opt.step()  # state exists
    _set_grads([a, b], 1)
    return a, b, opt


def _frozen(opt, params):
    return [p.detach().clone() for p in params] + [t.clone() for p in params for t in opt.state[p].values()]


def _assert_frozen(before, opt, params):
    now = _frozen(opt, params)
    assert all(torch.equal(x, y) for x, y in zip(before, now)), "a refused step wrote"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("key, value, name", [("lr", -1.0, "lr"), ("lr", float("nan"), "lr"),
                                              ("lr", torch.tensor(-1.0), "lr"), ("betas", (1.0, 0.5), r"betas\[0\]"),
                                              ("clip", -1.0, "clip"), ("weight_decay", float("nan"), "weight_decay")])
def test_hyperparameters_set_after_construction_are_checked_before_any_group_steps(impl, key, value, name):
    """Set on a group by a scheduler or by hand: the operator refused them only when it
    reached that group (the first one was stepped already), the reference stepped them."""
    a, b, opt = _two_groups(impl)
    opt.param_groups[1][key] = value
    before = _frozen(opt, [a, b])
    with pytest.raises(ValueError, match=f"invalid {name}=.*valid range"):
        opt.step()
    _assert_frozen(before, opt, [a, b])


@pytest.mark.parametrize("change", ["lr", "betas in place", "eps", "clip"])
def test_hyperparameters_changed_after_a_step_are_checked_again(change):
    """step() validates a group again only when a value changed since its last check: the
    change is seen, also one made in place in a list of betas."""
    a, b, opt = _two_groups("auto")
    opt.param_groups[1]["betas"] = [0.9, 0.999]
    opt.step()
    group = opt.param_groups[1]
    if change == "betas in place":
        group["betas"][1] = 1.5
    else:
        group[change] = -1.0
    before = _frozen(opt, [a, b])
    with pytest.raises(ValueError, match=r"invalid (lr|betas\[1\]|eps|clip)=.*valid range"):
        opt.step()
    _assert_frozen(before, opt, [a, b])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", ["dtype", "shape"])
def test_a_grad_unlike_its_param_is_refused_before_any_group_steps(impl, bad):
    """A grad of another dtype (p.grad_dtype = None allows one) or shape (through .data):
    the operator refused it when it reached that group, the reference broadcast it."""
    a, b, opt = _two_groups(impl)
    if bad == "dtype":
        b.grad_dtype = None
        b.grad = b.grad.double()
    else:
        b.grad.data = torch.randn(b.shape[0] + 2)
    before = _frozen(opt, [a, b])
    with pytest.raises(RuntimeError, match="a grad must have its param's dtype and shape"):
        opt.step()
    _assert_frozen(before, opt, [a, b])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_expanded_param_is_refused_before_anything_is_written(dtype):
    """Its new values could not be written back: that failed after its state (and the
    other params) had been written."""
    a = nn.Parameter(torch.randn(3, 4, dtype=dtype))
    e = nn.Parameter(torch.randn(3, 1, dtype=dtype).expand(3, 4))
    opt = Neptune([a, e])
    a.grad, e.grad = torch.randn(3, 4, dtype=dtype), torch.randn(3, 4, dtype=dtype)
    before = [a.detach().clone(), e.detach().clone()]
    with pytest.raises(RuntimeError, match="share memory.*must be distinct"):
        opt.step()
    assert torch.equal(a, before[0]) and torch.equal(e, before[1])
    assert all(float(opt.state[p]["step"]) == 0 for p in opt.state)


def test_a_param_twice_in_a_group_is_refused():
    """The operator would be asked to write it twice in one call (refused there, mid-step),
    the reference stepped it twice."""
    a, b = _params()[:2]
    with pytest.raises(ValueError, match="the same param at positions 0 and 2 of a param group"):
        Neptune([a, b, a])
    opt = Neptune([b])
    with pytest.raises(ValueError, match="the same param"):
        opt.add_param_group({"params": [a, a]})
    assert len(opt.param_groups) == 1


def test_a_meta_param_is_refused_before_anything_is_written():
    """Its grad has no values: with skip_nonfinite its flag could not be read, and stepping
    it computed nothing."""
    a = nn.Parameter(torch.randn(3, 4))
    m = nn.Parameter(torch.empty(3, 4, device="meta"))
    a.grad, m.grad = torch.randn(3, 4), torch.empty(3, 4, device="meta")
    opt = Neptune([{"params": [a]}, {"params": [a.new_empty(0).requires_grad_(), m], "skip_nonfinite": True}])
    before = a.detach().clone()
    with pytest.raises(RuntimeError, match="meta device.*must be on a device with data"):
        opt.step()
    assert torch.equal(a, before)


def test_skip_nonfinite_with_an_expanded_grad():
    """The non-finite check writes the grads it checks: a grad with a stride of 0 (of a
    float64 param, whose grad is not copied to the param's layout) was refused by torch
    there, after the groups before it had been stepped."""
    a, b = _params()[0], _params(dtype=torch.float64)[1]
    opt = Neptune([{"params": [a]}, {"params": [b], "skip_nonfinite": True}])
    a.grad = torch.randn(a.shape)
    b.grad = torch.randn(1, dtype=b.dtype).expand(b.shape)
    twin_a, twin_b = nn.Parameter(a.detach().clone()), nn.Parameter(b.detach().clone())
    twin = Neptune([{"params": [twin_a]}, {"params": [twin_b], "skip_nonfinite": True}])
    twin_a.grad, twin_b.grad = a.grad.clone(), b.grad.contiguous()
    opt.step()
    twin.step()
    assert torch.equal(a, twin_a) and torch.equal(b, twin_b)


def test_a_grad_whose_size_one_dims_have_other_strides():
    """(1, 5) param, grad from a transposed (5, 1) tensor (strides (1, 1)): the operator
    refused it ("strides must match") though the memory layout is the same."""
    p = nn.Parameter(torch.randn(1, 5))
    q = nn.Parameter(p.detach().clone())
    p.grad = torch.randn(5, 1).t()
    q.grad = p.grad.contiguous()
    Neptune([p], implementation="op").step()
    Neptune([q], implementation="op").step()
    assert torch.equal(p, q)
