"""bf16 state (Neptune(..., state_dtype=torch.bfloat16)): exp_avg / exp_avg_sq stored in
bfloat16 with deterministic stochastic rounding (docs/rule.md, "bf16 state"). What the
optimizer and the rule add; every backend's step with bf16 state (against the reference,
misaligned views, row shards, reproducibility) is in test_operator_contract.py."""
import io

import pytest
import torch
from torch import nn

import neptune_ext
from neptune_ext import Neptune
from neptune_ext import testing as T

# the rule's own behaviour, on every backend but the slow emulated one
needs_cpu_op = pytest.mark.skipif(not neptune_ext.has_kernel("cpu"), reason="CPU extension not built")
RULE_BACKENDS = [b for b in T.backends(every_cpu_kernel_set=False) if not b.emulated]


@pytest.mark.parametrize("backend", RULE_BACKENDS, ids=[b.name for b in RULE_BACKENDS])
def test_stochastic_rounding_lets_exp_avg_sq_decay(backend, monkeypatch):
    backend.use(monkeypatch)
    # With zero gradients V decays by beta2 each step. In bf16 with round-to-nearest,
    # 0.999 * v rounds back to v and V would never decay; rounded stochastically it
    # decays as in float32, on average.
    n, steps = 20000, 300
    lists = backend.to_device(T.StepLists([torch.ones(n)], [torch.zeros(n)], [torch.zeros(n, dtype=torch.bfloat16)],
                                          [torch.ones(n, dtype=torch.bfloat16)], [torch.tensor(0.0)]))
    V = lists.exp_avg_sqs
    hyper = {**T.HYPER, "clip": 0.0, "cautious": False}
    for _ in range(steps):
        backend.step(*lists, **hyper)
    expected = 0.999**steps
    assert abs(V[0].float().mean().item() / expected - 1) < 0.01
    assert V[0].float().std().item() > 0  # individual elements were rounded up or down


@needs_cpu_op
def test_optimizer_state_dtype_memory_and_checkpoint():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
    opt = Neptune(model.parameters(), lr=1e-2, state_dtype=torch.bfloat16)
    x = torch.randn(128, 10)
    y = (x[:, 0] > 0).long()
    for _ in range(40):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert (model(x).argmax(1) == y).float().mean() > 0.9
    for p in model.parameters():
        st = opt.state[p]
        assert st["exp_avg"].dtype == torch.bfloat16 and st["exp_avg_sq"].dtype == torch.bfloat16
        assert st["exp_avg"].element_size() * 2 == p.element_size()  # half of float32 state
        assert st["step"].dtype == torch.float32
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = Neptune(model.parameters(), lr=1e-2, state_dtype="bfloat16")
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt2.state[p][key].dtype == torch.bfloat16
            assert torch.equal(opt2.state[p][key], opt.state[p][key])


@needs_cpu_op
def test_op_and_reference_optimizers_agree():
    a = [nn.Parameter(torch.randn(6, 7)), nn.Parameter(torch.randn(7))]
    b = [nn.Parameter(t.detach().clone()) for t in a]
    oa = Neptune(a, state_dtype=torch.bfloat16, implementation="op")
    ob = Neptune(b, state_dtype=torch.bfloat16, implementation="reference")
    for k in range(3):
        gen = torch.Generator().manual_seed(k)
        for x, y in zip(a, b):
            x.grad = torch.randn(x.shape, generator=gen) * 0.1
            y.grad = x.grad.clone()
        oa.step()
        ob.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_invalid_state_dtype():
    with pytest.raises(ValueError, match=r"invalid state_dtype=.*valid range: torch.float32 or torch.bfloat16"):
        Neptune([nn.Parameter(torch.randn(3))], state_dtype=torch.float16)
