"""Neptune where a torch optimizer is expected: GradScaler, non-finite gradients,
torch.compile, CUDA graphs, checkpoints across devices."""
import io

import pytest
import torch
from torch import nn

import neptune_ext
from neptune_ext import Neptune

needs_cpu_op = pytest.mark.skipif(not neptune_ext.has_kernel("cpu"), reason="CPU extension not built")
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and neptune_ext.has_kernel("cuda")), reason="needs a CUDA GPU and the CUDA extension"
)


def _mlp(seed=0, device="cpu"):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4)).to(device)


def _batch(seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(32, 12, generator=gen).to(device), torch.randint(0, 4, (32,), generator=gen).to(device)


def _snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()] + [
        t.clone() for p in model.parameters() for t in opt.state[p].values()
    ]


# -- GradScaler ---------------------------------------------------------------------------


def _scaler_run(device, n_steps=4, poison_step=None):
    model, plain = _mlp(device=device), _mlp(device=device)
    opt, plain_opt = Neptune(model.parameters(), lr=1e-2), Neptune(plain.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    for k in range(n_steps):
        x, y = _batch(k, device)
        opt.zero_grad()
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        if k == poison_step:
            next(model.parameters()).grad[0, 0] = float("inf")
            before = _snapshot(model, opt)
            scale_before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if k == poison_step:
            after = _snapshot(model, opt)
            assert all(torch.equal(a, b) for a, b in zip(before, after)), "a found_inf step must change nothing"
            assert scaler.get_scale() == scale_before / 2
            continue
        plain_opt.zero_grad()
        nn.functional.cross_entropy(plain(x), y).backward()
        plain_opt.step()
    return model, plain


@needs_cpu_op
def test_grad_scaler_unscales_inside_the_step_cpu():
    model, plain = _scaler_run("cpu")
    for a, b in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # power-of-2 scale: exact up to reduction order


@needs_cpu_op
def test_grad_scaler_found_inf_step_changes_nothing_cpu():
    _scaler_run("cpu", n_steps=3, poison_step=1)


@needs_cuda
def test_grad_scaler_cuda():
    model, plain = _scaler_run("cuda")
    for a, b in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    _scaler_run("cuda", n_steps=3, poison_step=1)


# -- non-finite gradients without a scaler ------------------------------------------------


@pytest.mark.parametrize("impl", ["op", "reference"])
def test_nonfinite_gradients_propagate_like_adamw_by_default(impl):
    if impl == "op" and not neptune_ext.has_kernel("cpu"):
        pytest.skip("CPU extension not built")
    p = nn.Parameter(torch.ones(3, 4))
    q = nn.Parameter(torch.ones(3, 4))
    ours = Neptune([p], implementation=impl, clip=0.0, cautious=False)
    adamw = torch.optim.AdamW([q])
    for t in (p, q):
        t.grad = torch.ones(3, 4)
        t.grad[1, 2] = float("nan")
    ours.step()
    adamw.step()
    assert torch.equal(torch.isnan(p), torch.isnan(q))


@pytest.mark.parametrize("impl", ["op", "reference"])
def test_nonfinite_gradients_propagate_with_the_default_rule(impl):
    """Clipping and the mask on: a NaN gradient makes its unit's norm NaN, so the whole
    unit (row) turns NaN, as the spec's reference computes it; it is never masked away."""
    if impl == "op" and not neptune_ext.has_kernel("cpu"):
        pytest.skip("CPU extension not built")
    p = nn.Parameter(torch.ones(3, 4))
    q = nn.Parameter(torch.ones(3, 4))
    ours = Neptune([p], implementation=impl)
    adamw = torch.optim.AdamW([q])
    for t in (p, q):
        t.grad = torch.full((3, 4), 0.5)
        t.grad[1, 2] = float("nan")
    ours.step()
    adamw.step()
    assert torch.isnan(p)[torch.isnan(q)].all()
    assert torch.isnan(p[1]).all() and torch.isfinite(p[0]).all() and torch.isfinite(p[2]).all()


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_skip_nonfinite_skips_the_group_step(bad):
    model = _mlp()
    opt = Neptune(model.parameters(), skip_nonfinite=True)
    x, y = _batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    model[2].bias.grad[1] = bad
    before = _snapshot(model, opt)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(model, opt)))
    model[2].bias.grad[1] = 0.0
    opt.step()
    assert all(s["step"].item() == 2 for s in opt.state.values())


def test_skip_nonfinite_covers_every_dtype_of_the_group():
    a = nn.Parameter(torch.randn(4, 5))
    b = nn.Parameter(torch.randn(4, 5).bfloat16())
    opt = Neptune([a, b], skip_nonfinite=True)
    a.grad = torch.randn(4, 5)
    b.grad = torch.randn(4, 5).bfloat16()
    b.grad[0, 0] = float("nan")
    before = [a.detach().clone(), b.detach().clone()]
    opt.step()
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])
    assert all(s["step"].item() == 0 for s in opt.state.values())


def test_grad_scaler_after_unscale_cpu():
    if not neptune_ext.has_kernel("cpu"):
        pytest.skip("CPU extension not built")
    model, plain = _mlp(), _mlp()
    opt, plain_opt = Neptune(model.parameters(), lr=1e-2), Neptune(plain.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x, y = _batch(0)
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.unscale_(opt)  # e.g. to clip gradients: the step then gets grad_scale=None
    scaler.step(opt)
    scaler.update()
    nn.functional.cross_entropy(plain(x), y).backward()
    plain_opt.step()
    for a, b in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# -- torch.compile ------------------------------------------------------------------------


def _compile_pair(lr):
    models = [_mlp(), _mlp()]
    opts = [Neptune(m.parameters(), lr=lr if not isinstance(lr, torch.Tensor) else lr.clone()) for m in models]
    return models, opts


def _grads_for(model, k):
    x, y = _batch(k)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


@needs_cpu_op
def test_compiled_step_equals_eager():
    torch._dynamo.reset()
    (m_eager, m_comp), (o_eager, o_comp) = _compile_pair(1e-2)
    step = torch.compile(o_comp.step, backend="aot_eager")
    for k in range(3):
        _grads_for(m_eager, k)
        _grads_for(m_comp, k)
        o_eager.step()
        step()
    for a, b in zip(m_eager.parameters(), m_comp.parameters()):
        assert torch.equal(a, b)


@needs_cpu_op
def test_tensor_lr_schedule_does_not_recompile():
    torch._dynamo.reset()
    model = _mlp()
    opt = Neptune(model.parameters(), lr=torch.tensor(1e-2))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    step = torch.compile(opt.step, backend="aot_eager")
    for k in range(2):  # warm-up: the first call compiles
        _grads_for(model, k)
        step()
        sched.step()
    before = [p.detach().clone() for p in model.parameters()]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for k in range(2, 5):
            _grads_for(model, k)
            step()
            sched.step()
    assert opt.param_groups[0]["lr"].item() == pytest.approx(1e-2 / 32)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@needs_cpu_op
def test_operator_traces_without_graph_break():
    torch._dynamo.reset()
    P = [torch.randn(4, 5), torch.randn(7)]
    G = [torch.randn(4, 5), torch.randn(7)]
    M = [torch.zeros(4, 5), torch.zeros(7)]
    V = [torch.zeros(4, 5), torch.zeros(7)]
    S = [torch.tensor(0.0), torch.tensor(0.0)]
    P2, M2, V2, S2 = ([t.clone() for t in L] for L in (P, M, V, S))
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8, clip=0.1, cautious=True, maximize=False)

    def fn(params, grads, exp_avgs, exp_avg_sqs, steps):
        neptune_ext.neptune_step_(params, grads, exp_avgs, exp_avg_sqs, steps, **kw)

    torch.compile(fn, backend="aot_eager", fullgraph=True)(P, G, M, V, S)  # fullgraph: a break would raise
    fn(P2, G, M2, V2, S2)
    for a, b in zip(P + M + V + S, P2 + M2 + V2 + S2):
        assert torch.equal(a, b)


# -- CUDA graphs and cross-device checkpoints (GPU only) ------------------------------------


@needs_cuda
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "capturable=True"),
        # a CPU tensor lr would be read once, at capture
        ({"lr": torch.tensor(1e-2), "capturable": True}, "CUDA tensor"),
    ],
)
def test_capture_raises_where_replays_would_be_wrong(kwargs, message):
    model = _mlp(device="cuda")
    opt = Neptune(model.parameters(), **kwargs)
    x, y = _batch(0, "cuda")
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match=message):
        with torch.cuda.graph(graph):
            opt.step()


@needs_cuda
@pytest.mark.parametrize(
    "variant", ["float-lr", "cuda-lr", "cpu-lr", "grad-scaler", "skip-nonfinite", "bf16-state"]
)
def test_cuda_steps_do_not_sync_with_the_host(variant):
    """Steady-state steps (after one eager warm-up) under torch's sync debug mode, which
    raises on any host synchronisation (.item(), blocking copies, nonzero...)."""
    model = _mlp(device="cuda")
    lr = {"cuda-lr": torch.tensor(1e-2, device="cuda"), "cpu-lr": torch.tensor(1e-2)}.get(variant, 1e-2)
    opt = Neptune(model.parameters(), lr=lr, skip_nonfinite=variant == "skip-nonfinite",
                  state_dtype=torch.bfloat16 if variant == "bf16-state" else torch.float32)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10) if variant == "grad-scaler" else None
    for k in range(3):
        x, y = _batch(k, "cuda")
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        (scaler.scale(loss) if scaler else loss).backward()
        before = [p.detach().clone() for p in model.parameters()]
        torch.cuda.set_sync_debug_mode("error" if k > 0 else "default")
        try:
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters())), "the step moved nothing"


@needs_cuda
def test_captured_step_replays_like_eager():
    models = [_mlp(device="cuda"), _mlp(device="cuda")]
    opts = [Neptune(m.parameters(), lr=torch.tensor(1e-2, device="cuda"), capturable=True) for m in models]
    grads = []
    for k in range(4):
        x, y = _batch(k, "cuda")
        models[0].zero_grad()
        nn.functional.cross_entropy(models[0](x), y).backward()
        grads.append([p.grad.clone() for p in models[0].parameters()])
    for m in models:
        for p, g in zip(m.parameters(), grads[0]):
            p.grad = g.clone()
    for o in opts:  # eager warm-up step (also uploads the CUDA op's tensor table)
        o.step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side), torch.cuda.graph(graph):
        opts[1].step()
    torch.cuda.current_stream().wait_stream(side)
    for k in range(1, 4):
        for p, g in zip(models[0].parameters(), grads[k]):
            p.grad.copy_(g)
        for p, g in zip(models[1].parameters(), grads[k]):
            p.grad.copy_(g)
        opts[0].param_groups[0]["lr"].fill_(1e-2 / (k + 1))
        opts[1].param_groups[0]["lr"].fill_(1e-2 / (k + 1))
        opts[0].step()
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)


@needs_cuda
def test_checkpoint_cuda_to_cpu_and_back():
    model = _mlp(device="cuda")
    opt = Neptune(model.parameters())
    for k in range(2):
        _x, _y = _batch(k, "cuda")
        opt.zero_grad()
        nn.functional.cross_entropy(model(_x), _y).backward()
        opt.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, map_location="cpu", weights_only=True)
    cpu_model = _mlp()
    cpu_model.load_state_dict(ckpt["model"])
    cpu_opt = Neptune(cpu_model.parameters())
    cpu_opt.load_state_dict(ckpt["opt"])
    for p in cpu_model.parameters():
        assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in cpu_opt.state[p].values())
    back = _mlp(device="cuda")
    back.load_state_dict(cpu_model.state_dict())
    back_opt = Neptune(back.parameters())
    back_opt.load_state_dict(cpu_opt.state_dict())
    for p in back.parameters():
        assert all(t.device.type == "cuda" for t in back_opt.state[p].values())
    x, y = _batch(9, "cuda")
    for m, o in ((model, opt), (back, back_opt)):
        o.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        o.step()
    for a, b in zip(model.parameters(), back.parameters()):
        assert torch.equal(a, b)
