"""The memory-lean variant: exp_avg / exp_avg_sq in bfloat16 with deterministic
stochastic rounding (reference and CPU operator here; the CUDA operator's own tests are
in test_neptune_step_cuda.py)."""
import io

import pytest
import torch
from torch import nn

import neptune_ext
from neptune_ext import Neptune, neptune_step_, neptune_step_reference_multi
from neptune_inputs import SHAPES, LONG_SHAPES, assert_param_close, clone_all, make_case, make_grads, ulp_diff

pytestmark = pytest.mark.skipif(not neptune_ext.has_kernel("cpu"), reason="CPU extension not built")

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8, clip=0.1, cautious=True, maximize=False)


def _lean_case(shapes, dtype, seed=0):
    P, G, M, V, S = make_case(shapes, dtype, seed=seed)
    return P, G, [m.bfloat16() for m in M], [v.bfloat16() for v in V], S


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", [{}, {"cautious": False}, {"clip": 0.0}], ids=["default", "no-mask", "no-clip"])
def test_op_matches_reference(dtype, variant):
    hyper = {**HYPER, **variant}
    P, G, M, V, S = _lean_case(SHAPES + LONG_SHAPES, dtype)
    gen = torch.Generator().manual_seed(7)
    for step in range(3):
        if step:
            G = make_grads(P, [m.float() for m in M], clip=hyper["clip"], generator=gen)
        rP, rM, rV, rS = clone_all([P, M, V, S])
        neptune_step_(P, G, M, V, S, **hyper)
        neptune_step_reference_multi(rP, G, rM, rV, rS, **hyper)
        for i in range(len(P)):
            what = f"step {step} tensor {i} {tuple(P[i].shape)} {dtype}"
            assert M[i].dtype == torch.bfloat16 and V[i].dtype == torch.bfloat16
            assert_param_close(P[i], rP[i], "param " + what)
            if M[i].numel():
                # Same float32 moment and the same random bits: the same bf16, or one ulp
                # apart where the two float32 moments differ in their last bit.
                assert int(ulp_diff(M[i], rM[i]).max()) <= 1, "exp_avg " + what
                assert int(ulp_diff(V[i], rV[i]).max()) <= 1, "exp_avg_sq " + what
                assert (M[i] == rM[i]).float().mean() > 0.99, "exp_avg rounding bits differ " + what
                assert (V[i] == rV[i]).float().mean() > 0.99, "exp_avg_sq rounding bits differ " + what


def test_bitwise_reproducible_and_thread_independent():
    old = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            P, G, M, V, S = _lean_case(SHAPES + LONG_SHAPES + [(300, 300)], torch.float32, seed=3)
            neptune_step_(P, G, M, V, S, **HYPER)
            outs.append(P + M + V)
        for a, b, c in zip(*outs):
            assert torch.equal(a, b) and torch.equal(b, c)
    finally:
        torch.set_num_threads(old)


def test_stochastic_rounding_lets_exp_avg_sq_decay():
    # With zero gradients V decays by beta2 each step. In bf16 with round-to-nearest,
    # 0.999 * v rounds back to v and V would never decay; rounded stochastically it
    # decays as in float32, on average.
    n, steps = 20000, 300
    P = [torch.ones(n)]
    G = [torch.zeros(n)]
    M = [torch.zeros(n, dtype=torch.bfloat16)]
    V = [torch.ones(n, dtype=torch.bfloat16)]
    S = [torch.tensor(0.0)]
    hyper = {**HYPER, "clip": 0.0, "cautious": False}
    for _ in range(steps):
        neptune_step_(P, G, M, V, S, **hyper)
    expected = 0.999**steps
    assert abs(V[0].float().mean().item() / expected - 1) < 0.01
    assert V[0].float().std().item() > 0  # individual elements were rounded up or down


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


def test_mixed_state_dtypes_rejected():
    P, G, M, V, S = make_case([(4, 5)], torch.float32)
    with pytest.raises(RuntimeError, match="must both be float32 or both bfloat16"):
        neptune_step_(P, G, [M[0].bfloat16()], V, S, **HYPER)


def test_row_shards_round_like_the_whole_tensor():
    # Spec property 5 holds for the lean variant too: rounding bits follow the index
    # within the unit, not within the tensor.
    P, G, M, V, S = _lean_case([(10, 3, 3), (9, 17)], torch.float32)
    whole = clone_all([P, G, M, V, S])
    neptune_step_(*whole, **HYPER)
    for i in range(len(P)):
        for rows in (slice(0, 4), slice(4, None)):
            shard = [[x[i][rows].clone()] for x in (P, G, M, V)] + [[S[i].clone()]]
            neptune_step_(*shard, **HYPER)
            for k in (0, 2, 3):
                assert torch.equal(shard[k][0], whole[k][i][rows])
