"""The CUDA operator against the reference, the CPU operator and itself (needs a GPU).

Inputs come from neptune_inputs (random with random signs, moved away from the rule's
discontinuities). Multi-step tests resynchronise the CUDA state to the reference state
before every step, so that they test steps > 1 (bias corrections, cautious masks on a
nonzero momentum) without chaotic divergence between two correct implementations.
"""
from __future__ import annotations

import pytest
import torch

import neptune_ext
from neptune_ext import neptune_step_, neptune_step_reference_multi
from neptune_inputs import (
    assert_nonfinite_close, assert_param_close, assert_state_close, clone_all, make_case, make_grads, ulp_diff,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEV = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Odd sizes; warp units (<= 2048), block units (<= 16384), chunked units (longer);
# rows misaligned for 16-byte vectors (1031); zero-size tensors mixed in.
SHAPES = [(), (1,), (7,), (0,), (1031,), (64, 3, 3, 3), (5, 1031), (3, 0, 2), (4, 5000), (2, 16385),
          (3, 70000), (200000,)]
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05)


def hyper(clip=0.1, cautious=True, maximize=False, **kw):
    return dict(HYPER, clip=clip, cautious=cautious, maximize=maximize, **kw)


def to_dev(lists):
    return [[t.to(DEV) for t in lst] for lst in lists]


def assert_case_close(dev_lists, ref_lists, what=""):
    p, _, m, v, s = dev_lists
    rp, _, rm, rv, rs = ref_lists
    for i in range(len(p)):
        assert_param_close(p[i].cpu(), rp[i], f"{what} param {i} {tuple(rp[i].shape)}")
        assert_state_close(m[i].cpu(), rm[i], f"{what} exp_avg {i} {tuple(rp[i].shape)}")
        assert_state_close(v[i].cpu(), rv[i], f"{what} exp_avg_sq {i} {tuple(rp[i].shape)}")
        assert torch.equal(s[i].cpu(), rs[i]), f"{what} step {i}"


def step_dev(lists, h, grad_scale=None, found_inf=None):
    p, g, m, v, s = lists
    neptune_step_(p, g, m, v, s, **h, grad_scale=grad_scale, found_inf=found_inf)


def run_vs_reference(shapes, dtype, h, *, n_steps=3, seed=0, grad_scale=None):
    ref = list(make_case(shapes, dtype, seed=seed, clip=h["clip"], beta1=h["beta1"], maximize=h["maximize"],
                         grad_scale=grad_scale or 1.0))
    dev = to_dev(ref)
    gen = torch.Generator().manual_seed(seed + 1)
    gs_dev = None if grad_scale is None else torch.tensor(grad_scale, device=DEV)
    gs_ref = None if grad_scale is None else torch.tensor(grad_scale)
    for k in range(n_steps):
        if k > 0:  # fresh edge-safe gradients for the reference's state; resync the device state
            grads = make_grads(ref[0], ref[2], clip=h["clip"], beta1=h["beta1"], maximize=h["maximize"],
                               grad_scale=grad_scale or 1.0, generator=gen)
            ref[1] = grads
            for d_list, r_list in zip(dev, ref):
                for d, r in zip(d_list, r_list):
                    d.copy_(r)  # in place: same pointers, so the cached device table is reused
        step_dev(dev, h, grad_scale=gs_dev)
        neptune_step_reference_multi(*ref, **h, grad_scale=gs_ref)
        assert_case_close(dev, ref, f"step {k + 1}")
    return dev, ref


def test_cuda_kernel_registered():
    assert neptune_ext.has_kernel("cuda"), neptune_ext.ops.describe_build()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("clip", [0.0, 0.1])
@pytest.mark.parametrize("cautious", [False, True])
def test_matches_reference(dtype, clip, cautious):
    run_vs_reference(SHAPES, dtype, hyper(clip=clip, cautious=cautious))


@pytest.mark.parametrize("clip", [0.0, 0.1], ids=["no-clip", "clip"])
def test_nonfinite_grads_match_reference(clip):
    """As on the CPU: NaN / inf gradient elements count as active, a NaN norm makes the
    unit NaN, and the mask multiplies, so no NaN is masked away (warp, block and chunked
    units)."""
    shapes = [(5, 1031), (37,), (3, 40), (2, 16385), (70000,)]
    ref = list(make_case(shapes, torch.float32, clip=clip))
    g = ref[1]
    g[0][1, 7] = float("nan")
    g[0][2, 1030] = float("inf")
    g[0][4, 3] = -float("inf")
    g[1][20] = float("nan")
    g[2][0, 33] = float("nan")
    g[3][1, 16000] = float("nan")
    g[4][69999] = float("inf")
    dev = to_dev(ref)
    h = hyper(clip=clip)
    step_dev(dev, h)
    neptune_step_reference_multi(*ref, **h)
    for k, name in ((0, "param"), (2, "exp_avg"), (3, "exp_avg_sq")):
        for i, (got, want) in enumerate(zip(dev[k], ref[k])):
            assert_nonfinite_close(got, want, f"{name} {i}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_maximize_and_grad_scale(dtype):
    run_vs_reference(SHAPES, dtype, hyper(maximize=True), grad_scale=1024.0, seed=5)
    run_vs_reference(SHAPES, dtype, hyper(maximize=False), grad_scale=4096.0, seed=6, n_steps=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_cpu_op(dtype):
    h = hyper()
    cpu = make_case(SHAPES, dtype, seed=11)
    dev = to_dev(cpu)
    neptune_step_(*cpu, **h)
    step_dev(dev, h)
    assert_case_close(dev, cpu, "cuda vs cpu op")


def test_bitwise_reproducible():
    h = hyper()
    base = make_case(SHAPES + [(1 << 20,), (300, 700)], torch.float32, seed=3)
    outs = []
    for _ in range(2):
        dev = to_dev(clone_all(base))
        for _ in range(3):
            step_dev(dev, h)
        outs.append(dev)
    for a_list, b_list in zip(outs[0], outs[1]):
        for a, b in zip(a_list, b_list):
            assert torch.equal(a, b)


def test_every_element_written():
    # Nonzero W and G everywhere, decay > 0: (almost) every element of W, M and V changes.
    # An element the kernel skipped keeps its old value; beyond matching the reference, every
    # element left unchanged on the device must be one the reference leaves unchanged too
    # (by rounding coincidence), and those must be rare.
    # (cautious off: the zeros filled in below were not moved away from the mask's edge)
    h = hyper(weight_decay=0.1, cautious=False)
    shapes = [(7,), (1031,), (5, 1031), (4, 5000), (3, 70000), (200000,), (33, 33)]
    ref = make_case(shapes, torch.float32, seed=2, zero_frac=0.0)
    for g in ref[1]:
        g[g == 0] = 1e-3
    dev = to_dev(ref)
    before = clone_all(ref)
    step_dev(dev, h)
    neptune_step_reference_multi(*ref, **h)
    assert_case_close(dev, ref)
    for k in (0, 2, 3):
        for old, new, r in zip(before[k], dev[k], ref[k]):
            same_dev = new.cpu() == old
            same_ref = r == old
            assert not bool((same_dev & ~same_ref).any()), f"list {k}: an element was not written"
            assert int(same_dev.sum()) <= max(2, old.numel() // 10000)


def test_many_tensors_one_step():
    h = hyper()
    gen = torch.Generator().manual_seed(0)
    shapes = []
    for i in range(5000):
        r = int(torch.randint(0, 4, (1,), generator=gen))
        n = int(torch.randint(1, 400, (1,), generator=gen))
        shapes.append([(n,), (3, n), (n, 3, 3), (0,)][r])
    ref = make_case(shapes, torch.float32, seed=4)
    dev = to_dev(ref)
    step_dev(dev, h)
    neptune_step_reference_multi(*ref, **h)
    assert_case_close(dev, ref)


def _neptune_kernel_launches(fn):
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if "neptune" in e.name and e.device_type == torch.autograd.DeviceType.CUDA]


def test_many_small_two_launches_per_step():
    n = 10_000
    p = [torch.randn(1000, device=DEV) for _ in range(n)]
    g = [torch.randn(1000, device=DEV) for _ in range(n)]
    m = [torch.zeros(1000, device=DEV) for _ in range(n)]
    v = [torch.zeros(1000, device=DEV) for _ in range(n)]
    s = [torch.zeros((), device=DEV) for _ in range(n)]
    h = hyper()
    neptune_step_(p, g, m, v, s, **h)  # first step uploads the table
    uploads = torch.ops.neptune_ext._cuda_table_uploads()
    names = _neptune_kernel_launches(lambda: neptune_step_(p, g, m, v, s, **h))
    assert torch.ops.neptune_ext._cuda_table_uploads() == uploads, "steady state re-uploaded the table"
    assert len(names) <= 2, names
    assert all(float(x) == 2.0 for x in torch.stack(s[:10]).cpu())


def test_found_inf_changes_nothing():
    h = hyper()
    ref = make_case(SHAPES, torch.float32, seed=8)
    dev = to_dev(ref)
    before = clone_all(dev)
    step_dev(dev, h, found_inf=torch.ones((), device=DEV))
    for a_list, b_list in zip(dev, before):
        for a, b in zip(a_list, b_list):
            assert torch.equal(a, b)
    # and found_inf == 0 steps normally
    step_dev(dev, h, found_inf=torch.zeros((), device=DEV))
    neptune_step_reference_multi(*ref, **h)
    assert_case_close(dev, ref)


@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64])
def test_tensor_lr_on_device(lr_dtype):
    h = hyper()
    ref = make_case(SHAPES, torch.bfloat16, seed=9)
    dev = to_dev(ref)
    lr = torch.tensor(h["lr"], dtype=lr_dtype)
    step_dev(dev, dict(h, lr=lr.to(DEV)))
    neptune_step_reference_multi(*ref, **dict(h, lr=float(lr)))
    assert_case_close(dev, ref)


def test_cuda_graph_capture_matches_eager():
    h = hyper()
    base = make_case(SHAPES, torch.float32, seed=12)
    eager = to_dev(clone_all(base))
    graphed = to_dev(clone_all(base))
    gs = torch.ones((), device=DEV)
    fi = torch.zeros((), device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    snapshot = clone_all(graphed)
    with torch.cuda.stream(side):
        # warm-up on a side stream, as torch advises; tables are per stream, so the capture
        # (on torch.cuda.graph's own stream) uploads its own, inside the graph
        step_dev(graphed, h, grad_scale=gs, found_inf=fi)
    torch.cuda.current_stream().wait_stream(side)
    for d_list, s_list in zip(graphed, snapshot):
        for d, s in zip(d_list, s_list):
            d.copy_(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step_dev(graphed, h, grad_scale=gs, found_inf=fi)
    for _ in range(2):
        graph.replay()
        step_dev(eager, h, grad_scale=gs, found_inf=fi)
    torch.cuda.synchronize()
    for a_list, b_list in zip(graphed, eager):
        for a, b in zip(a_list, b_list):
            assert torch.equal(a, b)
    fi.fill_(1.0)  # a skipped replay changes nothing
    before = clone_all(graphed)
    graph.replay()
    torch.cuda.synchronize()
    for a_list, b_list in zip(graphed, before):
        for a, b in zip(a_list, b_list):
            assert torch.equal(a, b)


def test_bad_call_writes_nothing():
    h = hyper()
    dev = to_dev(make_case([(5, 7), (9,)], torch.float32, seed=1))
    before = clone_all(dev)
    dev[2][1] = dev[2][1].double()  # wrong state dtype on the second tensor
    with pytest.raises(RuntimeError):
        step_dev(dev, h)
    for k in (0, 3, 4):
        for a, b in zip(dev[k], before[k]):
            assert torch.equal(a, b)


def _offset_view(t, offset):
    """t's values in a fresh buffer on the device, `offset` elements into it."""
    buf = torch.zeros(t.numel() + offset, dtype=t.dtype, device=DEV)
    v = buf[offset:].view(t.shape)
    v.copy_(t)
    return v


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offsets", [(1, 1, 1, 1), (3, 3, 3, 3), (1, 1, 0, 0), (0, 3, 0, 0)], ids=str)
def test_misaligned_views(dtype, offsets):
    # Element offsets of (param, grad, exp_avg, exp_avg_sq) into their buffers. Equal offsets
    # keep the four arrays co-aligned (scalar head, 16-byte vectors, scalar tail, for every
    # dtype); unequal ones leave no common 16-byte boundary: the all-scalar fallback.
    h = hyper()
    ref = make_case(SHAPES, dtype, seed=21)
    dev = [[_offset_view(t, off) for t in lst] for lst, off in zip(ref[:4], offsets)]
    dev.append([s.to(DEV, copy=True) for s in ref[4]])
    step_dev(dev, h)
    neptune_step_reference_multi(*ref, **h)
    assert_case_close(dev, ref, f"offsets {offsets}")


def test_mixed_dtypes_one_call():
    # fp32, bf16 and fp16 tensors interleaved in one list: warp units of different dtypes
    # share blocks, block units and chunks of each dtype follow one another.
    h = hyper()
    cases = [make_case(SHAPES, dt, seed=30 + k) for k, dt in enumerate(DTYPES)]
    ref = [[c[j][i] for i in range(len(SHAPES)) for c in cases] for j in range(5)]
    dev = to_dev(ref)
    step_dev(dev, h)
    neptune_step_reference_multi(*ref, **h)
    assert_case_close(dev, ref, "mixed dtypes")


@pytest.mark.parametrize("shapes", [((64, 1000), (64000,)), ((40, 500), (20, 1000)), ((4, 5000), (5000, 4))],
                         ids=str)
def test_same_storage_new_shape_gets_new_table(shapes):
    # The device table is cached by content: the same pointers stepped with other units
    # (a view with another shape) must not reuse the first shape's table.
    h = hyper()
    gen = torch.Generator().manual_seed(41)
    ref = list(make_case([shapes[0]], torch.float32, seed=40))
    dev = to_dev(ref)
    step_dev(dev, h)
    neptune_step_reference_multi(*ref, **h)
    assert_case_close(dev, ref, f"{shapes[0]}")
    uploads = torch.ops.neptune_ext._cuda_table_uploads()
    ref = [[t.reshape(shapes[1]) for t in lst] for lst in ref[:4]] + [ref[4]]
    ref[1] = make_grads(ref[0], ref[2], generator=gen)
    dev = [[t.view(shapes[1]) for t in lst] for lst in dev[:4]] + [dev[4]]
    for d_list, r_list in zip(dev, ref):
        for d, r in zip(d_list, r_list):
            d.copy_(r)  # resync to the reference state, in place: the same pointers as before
    step_dev(dev, h)
    neptune_step_reference_multi(*ref, **h)
    assert_case_close(dev, ref, f"{shapes[0]} as {shapes[1]}")
    assert torch.ops.neptune_ext._cuda_table_uploads() > uploads


def test_side_stream_and_empty_only():
    h = hyper()
    base = make_case(SHAPES, torch.float32, seed=50)
    a, b = to_dev(clone_all(base)), to_dev(clone_all(base))
    step_dev(a, h)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step_dev(b, h)  # a table for (these tensors, this stream)
        step_dev(b, h)
    torch.cuda.current_stream().wait_stream(side)
    step_dev(a, h)
    for a_list, b_list in zip(a, b):
        for x, y in zip(a_list, b_list):
            assert torch.equal(x, y)
    # Only zero-size tensors: no math launch, the step counters still advance.
    empty = to_dev(make_case([(0,), (3, 0, 2)], torch.bfloat16, seed=51))
    step_dev(empty, h)
    assert [float(s) for s in empty[4]] == [4.0, 4.0]


@pytest.mark.parametrize("lr_dtype,lr_device", [(torch.bfloat16, DEV), (torch.float16, DEV), (torch.float32, "cpu"),
                                                (torch.float64, "cpu")], ids=str)
def test_tensor_lr_other_dtypes_and_cpu(lr_dtype, lr_device):
    h = hyper()
    ref = make_case(SHAPES, torch.float32, seed=52)
    dev = to_dev(ref)
    lr = torch.tensor(h["lr"], dtype=lr_dtype, device=lr_device)
    step_dev(dev, dict(h, lr=lr))
    neptune_step_reference_multi(*ref, **dict(h, lr=float(lr)))
    assert_case_close(dev, ref)


def _free_bytes():
    free, _ = torch.cuda.mem_get_info()
    return free


@pytest.mark.parametrize("shape", [(2**31 + 4096,), (2**21 + 1, 1024)], ids=["1d-chunked", "2d-warp-units"])
def test_tensor_over_2_31_elements(shape):
    numel = 1
    for d in shape:
        numel *= d
    need = numel * (2 + 2 + 4 + 4) + (2 << 30)  # bf16 W, G; fp32 M, V; slack
    if _free_bytes() < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory")
    # Step 1 from zero state with a gradient far below the clip threshold: s = 1 and
    # rho = 1 for every unit, so any slice stepped alone by the reference must match.
    h = hyper(clip=0.1, cautious=True)
    gen = torch.Generator(device=DEV).manual_seed(0)
    p = torch.randn(shape, generator=gen, device=DEV, dtype=torch.bfloat16)
    g = (torch.randn(shape, generator=gen, device=DEV, dtype=torch.bfloat16) * 1e-4).to(torch.bfloat16)
    m = torch.zeros(shape, device=DEV)
    v = torch.zeros(shape, device=DEV)
    s = torch.zeros((), device=DEV)
    flat = lambda t: t.reshape(-1)  # noqa: E731
    picks = [(0, 4096), (2**31 - 2048, 2**31 + 2048), (numel - 4096, numel)]
    saved = [(flat(p)[a:b].cpu(), flat(g)[a:b].cpu()) for a, b in picks]
    neptune_step_([p], [g], [m], [v], [s], **h)
    for (a, b), (pw, pg) in zip(picks, saved):
        rp, rm, rv, rs = pw.clone(), torch.zeros(b - a), torch.zeros(b - a), torch.zeros(())
        if len(shape) == 2:  # whole rows of 1024 inside the slice: reference by rows
            rp, pg, rm, rv = (t.reshape(-1, 1024) for t in (rp, pg, rm, rv))
        neptune_step_reference_multi([rp], [pg], [rm], [rv], [rs], **h)
        assert_param_close(flat(p)[a:b].cpu(), rp.reshape(-1), f"slice {a}:{b}")
        assert_state_close(flat(m)[a:b].cpu(), rm.reshape(-1), f"exp_avg slice {a}:{b}")
        assert_state_close(flat(v)[a:b].cpu(), rv.reshape(-1), f"exp_avg_sq slice {a}:{b}")
    assert float(s) == 1.0
    del p, g, m, v
    torch.cuda.empty_cache()


# --- memory-lean variant: exp_avg / exp_avg_sq in bfloat16, stochastically rounded ---

# Warp, block and chunked units (> 16384: 70000 and 200000), misaligned rows, zero-size.
LEAN_SHAPES = [(), (1,), (7,), (0,), (1031,), (64, 3, 3, 3), (5, 1031), (3, 0, 2), (4, 5000), (2, 16385),
               (3, 70000), (200000,), (33, 33)]


def _lean(lists):
    p, g, m, v, s = lists
    return [p, g, [x.bfloat16() for x in m], [x.bfloat16() for x in v], s]


def _assert_lean_state(actual, expected, what):
    # Same float32 moment and the same random bits: the same bf16; one ulp apart where the
    # two float32 moments differ in their last bits (more only for a moment near zero after
    # cancellation, where an fp32 ulp of the clipped gradient is many bf16 ulps of the
    # result: those must be close in absolute terms, as fp32 state would be).
    assert actual.dtype == torch.bfloat16 and expected.dtype == torch.bfloat16, what
    if actual.numel() == 0:
        return
    a, e = actual.cpu(), expected.cpu()
    far = ulp_diff(a, e) > 1
    if far.any():
        scale = e.double().pow(2).mean().sqrt().item()
        worst = (a[far].double() - e[far].double()).abs().max().item()
        assert worst <= 1e-5 * scale + 1e-30 and far.float().mean() < 1e-3, f"{what}: {int(far.sum())} > 1 ulp"
    assert (a == e).float().mean() > 0.99, "rounding bits differ: " + what


def _assert_lean_close(dev_lists, ref_lists, what):
    p, _, m, v, s = dev_lists
    rp, _, rm, rv, rs = ref_lists
    for i in range(len(p)):
        shape = tuple(rp[i].shape)
        assert_param_close(p[i].cpu(), rp[i].cpu(), f"{what} param {i} {shape}")
        _assert_lean_state(m[i], rm[i], f"{what} exp_avg {i} {shape}")
        _assert_lean_state(v[i], rv[i], f"{what} exp_avg_sq {i} {shape}")
        assert torch.equal(s[i].cpu(), rs[i].cpu()), f"{what} step {i}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", [{}, {"cautious": False}, {"clip": 0.0}], ids=["default", "no-mask", "no-clip"])
def test_bf16_state_matches_cpu_op_and_reference(dtype, variant):
    h = dict(hyper(), **variant)
    cpu = _lean(list(make_case(LEAN_SHAPES, dtype, seed=60, clip=h["clip"])))
    ref = clone_all(cpu)
    dev = to_dev(cpu)
    gen = torch.Generator().manual_seed(61)
    for k in range(3):
        if k > 0:  # fresh edge-safe gradients; resync device and reference to the CPU op's state
            cpu[1] = make_grads(cpu[0], [m.float() for m in cpu[2]], clip=h["clip"], generator=gen)
            for d_list, r_list, c_list in zip(dev, ref, cpu):
                for d, r, c in zip(d_list, r_list, c_list):
                    d.copy_(c)
                    r.copy_(c)
        neptune_step_(*cpu, **h)
        step_dev(dev, h)
        neptune_step_reference_multi(*ref, **h)
        _assert_lean_close(dev, cpu, f"step {k + 1} vs cpu op")
        _assert_lean_close(dev, ref, f"step {k + 1} vs reference")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bf16_state_misaligned_views(dtype):
    # Element offsets of (param, grad, exp_avg, exp_avg_sq): with bf16 state the 16-byte
    # boundaries of the state fall every 8 elements, of fp32 params every 4.
    h = hyper()
    for offsets in [(1, 1, 1, 1), (4, 4, 4, 4), (0, 0, 4, 4), (4, 4, 0, 0), (0, 0, 1, 1)]:
        cpu = _lean(list(make_case(LEAN_SHAPES, dtype, seed=62)))
        dev = [[_offset_view(t, off) for t in lst] for lst, off in zip(cpu[:4], offsets)]
        dev.append([s.to(DEV, copy=True) for s in cpu[4]])
        step_dev(dev, h)
        neptune_step_(*cpu, **h)
        _assert_lean_close(dev, cpu, f"offsets {offsets}")


def test_bf16_state_row_shards_round_like_the_whole_tensor():
    # The rounding bits follow the index within the unit: rows [0:4] stepped alone, and the
    # rows after them, give the whole tensor's results bitwise (warp, block, chunked units).
    h = hyper()
    for dtype in DTYPES:
        P, G, M, V, S = to_dev(_lean(list(make_case([(10, 3, 3), (9, 17), (6, 5000), (5, 20000)], dtype, seed=63))))
        whole = clone_all([P, G, M, V, S])
        step_dev(whole, h)
        for i in range(len(P)):
            for rows in (slice(0, 4), slice(4, None)):
                shard = [[x[i][rows].clone()] for x in (P, G, M, V)] + [[S[i].clone()]]
                step_dev(shard, h)
                for k in (0, 2, 3):
                    assert torch.equal(shard[k][0], whole[k][i][rows]), (dtype, i, rows, k)


def test_bf16_state_bitwise_reproducible_and_mixed_with_fp32_state():
    # Two runs agree bitwise; lean and fp32-state tensors of all dtypes in one call.
    h = hyper()
    cases = [make_case(LEAN_SHAPES, dt, seed=64 + k) for k, dt in enumerate(DTYPES)]
    base = [[c[j][i] for i in range(len(LEAN_SHAPES)) for c in cases] for j in range(5)]
    for j in (2, 3):  # every other tensor lean
        base[j] = [x.bfloat16() if i % 2 == 0 else x for i, x in enumerate(base[j])]
    outs = []
    for _ in range(2):
        dev = to_dev(clone_all(base))
        for _ in range(2):
            step_dev(dev, h)
        outs.append(dev)
    for a_list, b_list in zip(outs[0], outs[1]):
        for a, b in zip(a_list, b_list):
            assert torch.equal(a, b)
    cpu = clone_all(base)
    neptune_step_(*cpu, **h)
    neptune_step_(*cpu, **h)
    for i in range(len(base[0])):
        if i % 2 == 0:
            _assert_lean_state(outs[0][2][i], cpu[2][i], f"exp_avg {i}")
            _assert_lean_state(outs[0][3][i], cpu[3][i], f"exp_avg_sq {i}")
