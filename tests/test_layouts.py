"""Params, grads and state in any memory layout, on every backend, against the reference.

A unit is p[i] along dim 0 whatever the layout. The operator takes units that are
contiguous spans with grad and state in the param's strides; the optimizer steps other
params through a dense scratch copy and brings grads and state to the layout it wants.
The expected values come from the reference on contiguous copies of the same numbers.
"""
import pytest
import torch
from torch import nn

from neptune_ext import Neptune, neptune_step_reference
from neptune_ext import ops as neptune_ops
from neptune_ext.testing import HYPER, assert_param_close, assert_state_close, backends, make_grads

# Layouts are the optimizer's and the operators' host code: one CPU kernel set is enough.
BACKENDS = backends(every_cpu_kernel_set=False)
BACKEND_IDS = [b.name for b in BACKENDS]


def in_layout(x: torch.Tensor, layout: str, device: str) -> torch.Tensor:
    """A tensor holding x's values (except "expanded") in the given memory layout."""
    x = x.to(device)
    if layout == "contiguous":
        return x.clone()
    if layout == "channels_last":  # dense, units still spans
        return x.to(memory_format=torch.channels_last)
    if layout == "reversed":  # dense, dims in reverse order: a transposed weight
        dims = list(range(x.dim()))[::-1]
        return x.permute(dims).contiguous().permute(dims)
    if layout == "sliced":  # every other element of a wider last dim (torch's randn(10, 5, 2)[..., 0])
        big = torch.full((*x.shape[:-1], 2 * x.shape[-1]), float("nan"), dtype=x.dtype, device=device)
        view = big[..., ::2]
        view.copy_(x)
        return view
    if layout == "rows-sliced":  # every other row of a taller tensor
        big = torch.full((2 * x.shape[0], *x.shape[1:]), float("nan"), dtype=x.dtype, device=device)
        view = big[::2]
        view.copy_(x)
        return view
    if layout == "expanded":  # stride 0 along the last dim (values: x[..., :1] broadcast)
        return x[..., :1].expand(x.shape)
    raise ValueError(layout)


# (shape, param layout): every layout that applies to the shape.
PARAM_CASES = [
    ((6, 5, 3, 3), "contiguous"), ((6, 5, 3, 3), "channels_last"), ((6, 5, 3, 3), "reversed"),
    ((6, 5, 3, 3), "sliced"), ((6, 5, 3, 3), "rows-sliced"),
    ((7, 11), "contiguous"), ((7, 11), "reversed"), ((7, 11), "sliced"), ((7, 11), "rows-sliced"),
    ((13,), "contiguous"), ((13,), "sliced"),
]
PARAM_IDS = [f"{'x'.join(map(str, s))}-{lay}" for s, lay in PARAM_CASES]
GRAD_LAYOUTS = ["contiguous", "reversed", "sliced", "expanded"]
STATE_LAYOUTS = ["as-created", "reversed", "sliced"]


def _check_layouts(backend, monkeypatch, shape, p_layout, g_layout, s_layout, dtype, steps=3):
    backend.use(monkeypatch)
    dev = backend.device
    gen = torch.Generator().manual_seed(len(shape) * 100 + len(p_layout) * 10 + len(g_layout) + len(s_layout))
    w0 = torch.randn(shape, generator=gen).to(dtype)
    p = nn.Parameter(in_layout(w0, p_layout, dev))
    opt = Neptune([p], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                  weight_decay=HYPER["weight_decay"], clip=HYPER["clip"], implementation=backend.implementation)
    W, M, V, S = w0.clone(), torch.zeros(shape), torch.zeros(shape), torch.tensor(0.0)
    for k in range(steps):
        (g,) = make_grads([W], [M], clip=HYPER["clip"], beta1=HYPER["beta1"], generator=gen)
        p.grad = in_layout(g, g_layout, dev)
        if s_layout != "as-created" and k == 1:  # state in another layout (e.g. loaded, or set by hand)
            for key in ("exp_avg", "exp_avg_sq"):
                opt.state[p][key] = in_layout(opt.state[p][key].cpu(), s_layout, dev)
        opt.step()
        neptune_step_reference(W, p.grad.cpu().contiguous(), M, V, S, **HYPER)
        what = f"{backend.name} {shape} param {p_layout} grad {g_layout} state {s_layout} step {k + 1}"
        assert p.stride() == in_layout(w0, p_layout, dev).stride(), "the param keeps its layout"
        assert_param_close(p.detach().cpu(), W, what)
        assert_state_close(opt.state[p]["exp_avg"].cpu(), M, what + " exp_avg")
        assert_state_close(opt.state[p]["exp_avg_sq"].cpu(), V, what + " exp_avg_sq")
        assert opt.state[p]["step"].item() == k + 1
    if p_layout in ("sliced", "rows-sliced"):  # the gaps of the underlying storage are untouched
        assert torch.isnan(p.detach().as_strided((p.untyped_storage().nbytes() // p.element_size(),), (1,))).any()


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("s_layout", STATE_LAYOUTS)
@pytest.mark.parametrize("g_layout", GRAD_LAYOUTS)
@pytest.mark.parametrize("shape, p_layout", PARAM_CASES, ids=PARAM_IDS)
def test_every_layout_combination_matches_the_reference(backend, monkeypatch, shape, p_layout, g_layout, s_layout):
    _check_layouts(backend, monkeypatch, shape, p_layout, g_layout, s_layout, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape, p_layout", PARAM_CASES, ids=PARAM_IDS)
def test_16bit_params_in_every_layout(backend, monkeypatch, shape, p_layout, dtype):
    _check_layouts(backend, monkeypatch, shape, p_layout, "reversed", "sliced", dtype)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_bf16_state_with_a_strided_param(backend, monkeypatch):
    """bf16 state (stochastically rounded by element index in memory order): a strided
    param steps exactly as its contiguous copy does, the state being contiguous for both."""
    backend.use(monkeypatch)
    dev = backend.device
    w0 = torch.randn(9, 10)
    a = nn.Parameter(in_layout(w0, "reversed", dev))
    b = nn.Parameter(w0.clone().to(dev))
    opts = [Neptune([t], state_dtype=torch.bfloat16, implementation=backend.implementation) for t in (a, b)]
    for k in range(3):
        g = torch.randn(9, 10, generator=torch.Generator().manual_seed(k))
        a.grad, b.grad = in_layout(g, "sliced", dev), g.clone().to(dev)
        for o in opts:
            o.step()
    assert torch.equal(a.detach().contiguous(), b.detach())
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opts[0].state[a][key], opts[1].state[b][key])


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.is_op], ids=[b.name for b in BACKENDS if b.is_op])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_dense_params_reach_the_operator_without_a_copy(backend, monkeypatch, layout):
    """Dense params whose units are spans keep today's path: the operator gets the param,
    its grad and its state themselves."""
    backend.use(monkeypatch)
    seen = []
    real = neptune_ops.neptune_step_

    def spy(params, grads, exp_avgs, exp_avg_sqs, steps, **kw):
        seen.append([t.data_ptr() for t in params + grads + exp_avgs + exp_avg_sqs])
        real(params, grads, exp_avgs, exp_avg_sqs, steps, **kw)

    monkeypatch.setattr(neptune_ops, "neptune_step_", spy)
    p = nn.Parameter(in_layout(torch.randn(6, 5, 3, 3), layout, backend.device))
    opt = Neptune([p], implementation="op")
    for _ in range(2):
        p.grad = in_layout(torch.randn(6, 5, 3, 3), layout, backend.device)
        opt.step()
        st = opt.state[p]
        assert seen[-1] == [p.data_ptr(), p.grad.data_ptr(), st["exp_avg"].data_ptr(), st["exp_avg_sq"].data_ptr()]
        assert st["exp_avg"].stride() == p.stride()
