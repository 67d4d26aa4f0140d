"""The CUDA operator against the reference, the CPU operator and itself.

Every test that does not need real hardware runs on two backends:
- "simt": the unchanged CUDA kernels on the CPU under the SIMT emulator
  (torch.ops.neptune_ext._neptune_step_simt_, CPU tensors), in every CI run. Each step runs
  under four schedules (blocks and threads in ascending, descending and two random
  orders) and the outputs must agree bitwise: a race between threads or blocks shows.
- "cuda": the real kernels on a GPU (skipped without one).
Tests of what only hardware has (streams, CUDA graphs, launch counts, sync-free steps,
tensors over 2^31 elements) run on "cuda" only.

Inputs come from neptune_inputs (random with random signs, moved away from the rule's
discontinuities). Multi-step tests resynchronise the device state to the reference state
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

HAS_GPU = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Odd sizes; warp units (<= 2048), block units (<= 16384), chunked units (longer);
# rows misaligned for 16-byte vectors (1031); zero-size tensors mixed in.
SHAPES = [(), (1,), (7,), (0,), (1031,), (64, 3, 3, 3), (5, 1031), (3, 0, 2), (4, 5000), (2, 16385),
          (3, 70000), (200000,)]
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05)
SCHEDULES = (0, 1, 2, 3)  # the emulator's orders: ascending, descending, two seeded random
# On the emulator every step runs four times and the reference is float64 on the CPU: the
# same kinds of unit with fewer elements (chunked: 2 units of 2 chunks, 1 unit of 4).
SIMT_SHAPES = [(), (1,), (7,), (0,), (1031,), (64, 3, 3, 3), (5, 1031), (3, 0, 2), (4, 5000), (2, 16385),
               (50000,)]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _twin(t: torch.Tensor) -> torch.Tensor:
    """A copy of t at the same offset into a fresh buffer: the same 16-byte alignment."""
    buf = torch.empty(t.storage_offset() + max(t.numel(), 1), dtype=t.dtype, device=t.device)
    return buf.as_strided(t.shape, t.stride(), t.storage_offset()).copy_(t)


class Backend:
    def __init__(self, name: str):
        self.name = name
        self.dev = "cuda" if name == "cuda" else "cpu"
        self.shapes = SHAPES if name == "cuda" else SIMT_SHAPES
        self.big = 1 << 20 if name == "cuda" else 1 << 16  # elements of the reproducibility test's long unit
        self.many = 5000 if name == "cuda" else 300  # tensors of the many-tensors test
        self.n_steps = 3 if name == "cuda" else 2  # steps of the multi-step comparisons
        self.lean_shapes = self.shapes + [(33, 33)]

    def to_dev(self, lists):
        # copies, also on the CPU: the emulated step must not write the caller's tensors
        return [[t.to(self.dev, copy=True) for t in lst] for lst in lists]

    def step(self, lists, h, grad_scale=None, found_inf=None):
        p, g, m, v, s = lists
        if self.name == "cuda":
            neptune_step_(p, g, m, v, s, **h, grad_scale=grad_scale, found_inf=found_inf)
            return
        others = []
        for sched in SCHEDULES[1:]:  # on twins, then schedule 0 in place
            twin = [[_twin(t) for t in lst] for lst in lists]
            neptune_ext.ops.neptune_step_simt_(*twin, **h, grad_scale=grad_scale, found_inf=found_inf, schedule=sched)
            others.append(twin)
        neptune_ext.ops.neptune_step_simt_(p, g, m, v, s, **h, grad_scale=grad_scale, found_inf=found_inf,
                                           schedule=SCHEDULES[0])
        for sched, twin in zip(SCHEDULES[1:], others):
            for k, (a_list, b_list) in enumerate(zip(lists, twin)):
                for i, (a, b) in enumerate(zip(a_list, b_list)):
                    assert torch.equal(_bytes(a), _bytes(b)), (
                        f"schedule {sched} differs from schedule 0: list {k}, tensor {i} {tuple(a.shape)}")

    def table_uploads(self) -> int:
        op = torch.ops.neptune_ext._cuda_table_uploads if self.name == "cuda" else torch.ops.neptune_ext._simt_table_uploads
        return int(op())


@pytest.fixture(params=["simt", pytest.param("cuda", marks=cuda_only)])
def be(request):
    return Backend(request.param)


# CUDA-only tests use these.
CUDA = Backend("cuda")
DEV = "cuda"
to_dev = CUDA.to_dev
step_dev = CUDA.step


def hyper(clip=0.1, cautious=True, maximize=False, **kw):
    return dict(HYPER, clip=clip, cautious=cautious, maximize=maximize, **kw)


def assert_case_close(dev_lists, ref_lists, what=""):
    p, _, m, v, s = dev_lists
    rp, _, rm, rv, rs = ref_lists
    for i in range(len(p)):
        assert_param_close(p[i].cpu(), rp[i], f"{what} param {i} {tuple(rp[i].shape)}")
        assert_state_close(m[i].cpu(), rm[i], f"{what} exp_avg {i} {tuple(rp[i].shape)}")
        assert_state_close(v[i].cpu(), rv[i], f"{what} exp_avg_sq {i} {tuple(rp[i].shape)}")
        assert torch.equal(s[i].cpu(), rs[i]), f"{what} step {i}"


def run_vs_reference(be, shapes, dtype, h, *, n_steps=None, seed=0, grad_scale=None):
    n_steps = be.n_steps if n_steps is None else n_steps
    ref = list(make_case(shapes, dtype, seed=seed, clip=h["clip"], beta1=h["beta1"], maximize=h["maximize"],
                         grad_scale=grad_scale or 1.0))
    dev = be.to_dev(ref)
    gen = torch.Generator().manual_seed(seed + 1)
    gs_dev = None if grad_scale is None else torch.tensor(grad_scale, device=be.dev)
    gs_ref = None if grad_scale is None else torch.tensor(grad_scale)
    for k in range(n_steps):
        if k > 0:  # fresh edge-safe gradients for the reference's state; resync the device state
            grads = make_grads(ref[0], ref[2], clip=h["clip"], beta1=h["beta1"], maximize=h["maximize"],
                               grad_scale=grad_scale or 1.0, generator=gen)
            ref[1] = grads
            for d_list, r_list in zip(dev, ref):
                for d, r in zip(d_list, r_list):
                    d.copy_(r)  # in place: same pointers, so the cached device table is reused
        be.step(dev, h, grad_scale=gs_dev)
        neptune_step_reference_multi(*ref, **h, grad_scale=gs_ref)
        assert_case_close(dev, ref, f"step {k + 1}")
    return dev, ref


@cuda_only
def test_cuda_kernel_registered():
    assert neptune_ext.has_kernel("cuda"), neptune_ext.ops.describe_build()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("clip", [0.0, 0.1])
@pytest.mark.parametrize("cautious", [False, True])
def test_matches_reference(be, dtype, clip, cautious):
    run_vs_reference(be, be.shapes, dtype, hyper(clip=clip, cautious=cautious))


@pytest.mark.parametrize("clip", [0.0, 0.1], ids=["no-clip", "clip"])
def test_nonfinite_grads_match_reference(be, clip):
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
    dev = be.to_dev(ref)
    h = hyper(clip=clip)
    be.step(dev, h)
    neptune_step_reference_multi(*ref, **h)
    for k, name in ((0, "param"), (2, "exp_avg"), (3, "exp_avg_sq")):
        for i, (got, want) in enumerate(zip(dev[k], ref[k])):
            assert_nonfinite_close(got, want, f"{name} {i}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_maximize_and_grad_scale(be, dtype):
    run_vs_reference(be, be.shapes, dtype, hyper(maximize=True), grad_scale=1024.0, seed=5)
    run_vs_reference(be, be.shapes, dtype, hyper(maximize=False), grad_scale=4096.0, seed=6, n_steps=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_cpu_op(be, dtype):
    h = hyper()
    cpu = make_case(be.shapes, dtype, seed=11)
    dev = be.to_dev(cpu)
    neptune_step_(*cpu, **h)
    be.step(dev, h)
    assert_case_close(dev, cpu, "cuda vs cpu op")


def test_bitwise_reproducible(be):
    h = hyper()
    base = make_case(be.shapes + [(be.big,), (300, 700)], torch.float32, seed=3)
    outs = []
    for _ in range(2):
        dev = be.to_dev(clone_all(base))
        for _ in range(3):
            be.step(dev, h)
        outs.append(dev)
    for a_list, b_list in zip(outs[0], outs[1]):
        for a, b in zip(a_list, b_list):
            assert torch.equal(a, b)


def test_every_element_written(be):
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
    dev = be.to_dev(ref)
    before = clone_all(ref)
    be.step(dev, h)
    neptune_step_reference_multi(*ref, **h)
    assert_case_close(dev, ref)
    for k in (0, 2, 3):
        for old, new, r in zip(before[k], dev[k], ref[k]):
            same_dev = new.cpu() == old
            same_ref = r == old
            assert not bool((same_dev & ~same_ref).any()), f"list {k}: an element was not written"
            assert int(same_dev.sum()) <= max(2, old.numel() // 10000)


def test_many_tensors_one_step(be):
    h = hyper()
    gen = torch.Generator().manual_seed(0)
    shapes = []
    for i in range(be.many):
        r = int(torch.randint(0, 4, (1,), generator=gen))
        n = int(torch.randint(1, 400, (1,), generator=gen))
        shapes.append([(n,), (3, n), (n, 3, 3), (0,)][r])
    ref = make_case(shapes, torch.float32, seed=4)
    dev = be.to_dev(ref)
    be.step(dev, h)
    neptune_step_reference_multi(*ref, **h)
    assert_case_close(dev, ref)


def _neptune_kernel_launches(fn):
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if "neptune" in e.name and e.device_type == torch.autograd.DeviceType.CUDA]


@cuda_only
def test_many_small_two_launches_per_step():
    n = 10_000
    p = [torch.randn(1000, device=DEV) for _ in range(n)]
    g = [torch.randn(1000, device=DEV) for _ in range(n)]
    m = [torch.zeros(1000, device=DEV) for _ in range(n)]
    v = [torch.zeros(1000, device=DEV) for _ in range(n)]
    s = [torch.zeros((), device=DEV) for _ in range(n)]
    h = hyper()
    neptune_step_(p, g, m, v, s, **h)  # first step uploads the table
    uploads = CUDA.table_uploads()
    names = _neptune_kernel_launches(lambda: neptune_step_(p, g, m, v, s, **h))
    assert CUDA.table_uploads() == uploads, "steady state re-uploaded the table"
    assert len(names) <= 2, names
    assert all(float(x) == 2.0 for x in torch.stack(s[:10]).cpu())


def test_found_inf_changes_nothing(be):
    h = hyper()
    ref = make_case(be.shapes, torch.float32, seed=8)
    dev = be.to_dev(ref)
    before = clone_all(dev)
    be.step(dev, h, found_inf=torch.ones((), device=be.dev))
    for a_list, b_list in zip(dev, before):
        for a, b in zip(a_list, b_list):
            assert torch.equal(a, b)
    # and found_inf == 0 steps normally
    be.step(dev, h, found_inf=torch.zeros((), device=be.dev))
    neptune_step_reference_multi(*ref, **h)
    assert_case_close(dev, ref)


@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64])
def test_tensor_lr_on_device(be, lr_dtype):
    h = hyper()
    ref = make_case(be.shapes, torch.bfloat16, seed=9)
    dev = be.to_dev(ref)
    lr = torch.tensor(h["lr"], dtype=lr_dtype)
    be.step(dev, dict(h, lr=lr.to(be.dev)))
    neptune_step_reference_multi(*ref, **dict(h, lr=float(lr)))
    assert_case_close(dev, ref)


@cuda_only
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


def test_bad_call_writes_nothing(be):
    h = hyper()
    dev = be.to_dev(make_case([(5, 7), (9,)], torch.float32, seed=1))
    before = clone_all(dev)
    dev[2][1] = dev[2][1].double()  # wrong state dtype on the second tensor
    with pytest.raises(RuntimeError):
        be.step(dev, h)
    for k in (0, 3, 4):
        for a, b in zip(dev[k], before[k]):
            assert torch.equal(a, b)


def _offset_view(t, offset, device):
    """t's values in a fresh buffer on the device, `offset` elements into it."""
    buf = torch.zeros(t.numel() + offset, dtype=t.dtype, device=device)
    v = buf[offset:].view(t.shape)
    v.copy_(t)
    return v


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offsets", [(1, 1, 1, 1), (3, 3, 3, 3), (1, 1, 0, 0), (0, 3, 0, 0)], ids=str)
def test_misaligned_views(be, dtype, offsets):
    # Element offsets of (param, grad, exp_avg, exp_avg_sq) into their buffers. Equal offsets
    # keep the four arrays co-aligned (scalar head, 16-byte vectors, scalar tail, for every
    # dtype); unequal ones leave no common 16-byte boundary: the all-scalar fallback.
    h = hyper()
    ref = make_case(be.shapes, dtype, seed=21)
    dev = [[_offset_view(t, off, be.dev) for t in lst] for lst, off in zip(ref[:4], offsets)]
    dev.append([s.to(be.dev, copy=True) for s in ref[4]])
    be.step(dev, h)
    neptune_step_reference_multi(*ref, **h)
    assert_case_close(dev, ref, f"offsets {offsets}")


def test_mixed_dtypes_one_call(be):
    # fp32, bf16 and fp16 tensors interleaved in one list: warp units of different dtypes
    # share blocks, block units and chunks of each dtype follow one another.
    h = hyper()
    cases = [make_case(be.shapes, dt, seed=30 + k) for k, dt in enumerate(DTYPES)]
    ref = [[c[j][i] for i in range(len(be.shapes)) for c in cases] for j in range(5)]
    dev = be.to_dev(ref)
    be.step(dev, h)
    neptune_step_reference_multi(*ref, **h)
    assert_case_close(dev, ref, "mixed dtypes")


@pytest.mark.parametrize("shapes", [((64, 1000), (64000,)), ((40, 500), (20, 1000)), ((4, 5000), (5000, 4))],
                         ids=str)
def test_same_storage_new_shape_gets_new_table(be, shapes):
    # The device table is cached by content: the same pointers stepped with other units
    # (a view with another shape) must not reuse the first shape's table.
    h = hyper()
    gen = torch.Generator().manual_seed(41)
    ref = list(make_case([shapes[0]], torch.float32, seed=40))
    dev = be.to_dev(ref)
    be.step(dev, h)
    neptune_step_reference_multi(*ref, **h)
    assert_case_close(dev, ref, f"{shapes[0]}")
    uploads = be.table_uploads()
    ref = [[t.reshape(shapes[1]) for t in lst] for lst in ref[:4]] + [ref[4]]
    ref[1] = make_grads(ref[0], ref[2], generator=gen)
    dev = [[t.view(shapes[1]) for t in lst] for lst in dev[:4]] + [dev[4]]
    for d_list, r_list in zip(dev, ref):
        for d, r in zip(d_list, r_list):
            d.copy_(r)  # resync to the reference state, in place: the same pointers as before
    be.step(dev, h)
    neptune_step_reference_multi(*ref, **h)
    assert_case_close(dev, ref, f"{shapes[0]} as {shapes[1]}")
    assert be.table_uploads() > uploads


@cuda_only
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


@pytest.mark.parametrize("lr_dtype,lr_device", [(torch.bfloat16, "dev"), (torch.float16, "dev"), (torch.float32, "cpu"),
                                                (torch.float64, "cpu")], ids=str)
def test_tensor_lr_other_dtypes_and_cpu(be, lr_dtype, lr_device):
    lr_device = be.dev if lr_device == "dev" else lr_device
    h = hyper()
    ref = make_case(be.shapes, torch.float32, seed=52)
    dev = be.to_dev(ref)
    lr = torch.tensor(h["lr"], dtype=lr_dtype, device=lr_device)
    be.step(dev, dict(h, lr=lr))
    neptune_step_reference_multi(*ref, **dict(h, lr=float(lr)))
    assert_case_close(dev, ref)


def _free_bytes():
    free, _ = torch.cuda.mem_get_info()
    return free


@cuda_only
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
def test_bf16_state_matches_cpu_op_and_reference(be, dtype, variant):
    h = dict(hyper(), **variant)
    cpu = _lean(list(make_case(be.lean_shapes, dtype, seed=60, clip=h["clip"])))
    ref = clone_all(cpu)
    dev = be.to_dev(cpu)
    gen = torch.Generator().manual_seed(61)
    for k in range(be.n_steps):
        if k > 0:  # fresh edge-safe gradients; resync device and reference to the CPU op's state
            cpu[1] = make_grads(cpu[0], [m.float() for m in cpu[2]], clip=h["clip"], generator=gen)
            for d_list, r_list, c_list in zip(dev, ref, cpu):
                for d, r, c in zip(d_list, r_list, c_list):
                    d.copy_(c)
                    r.copy_(c)
        neptune_step_(*cpu, **h)
        be.step(dev, h)
        neptune_step_reference_multi(*ref, **h)
        _assert_lean_close(dev, cpu, f"step {k + 1} vs cpu op")
        _assert_lean_close(dev, ref, f"step {k + 1} vs reference")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bf16_state_misaligned_views(be, dtype):
    # Element offsets of (param, grad, exp_avg, exp_avg_sq): with bf16 state the 16-byte
    # boundaries of the state fall every 8 elements, of fp32 params every 4.
    h = hyper()
    for offsets in [(1, 1, 1, 1), (4, 4, 4, 4), (0, 0, 4, 4), (4, 4, 0, 0), (0, 0, 1, 1)]:
        cpu = _lean(list(make_case(be.lean_shapes, dtype, seed=62)))
        dev = [[_offset_view(t, off, be.dev) for t in lst] for lst, off in zip(cpu[:4], offsets)]
        dev.append([s.to(be.dev, copy=True) for s in cpu[4]])
        be.step(dev, h)
        neptune_step_(*cpu, **h)
        _assert_lean_close(dev, cpu, f"offsets {offsets}")


def test_bf16_state_row_shards_round_like_the_whole_tensor(be):
    # The rounding bits follow the index within the unit: rows [0:4] stepped alone, and the
    # rows after them, give the whole tensor's results bitwise (warp, block, chunked units).
    h = hyper()
    for dtype in DTYPES:
        P, G, M, V, S = be.to_dev(_lean(list(make_case([(10, 3, 3), (9, 17), (6, 5000), (5, 20000)], dtype, seed=63))))
        whole = clone_all([P, G, M, V, S])
        be.step(whole, h)
        for i in range(len(P)):
            for rows in (slice(0, 4), slice(4, None)):
                shard = [[x[i][rows].clone()] for x in (P, G, M, V)] + [[S[i].clone()]]
                be.step(shard, h)
                for k in (0, 2, 3):
                    assert torch.equal(shard[k][0], whole[k][i][rows]), (dtype, i, rows, k)


def test_bf16_state_bitwise_reproducible_and_mixed_with_fp32_state(be):
    # Two runs agree bitwise; lean and fp32-state tensors of all dtypes in one call.
    h = hyper()
    cases = [make_case(be.lean_shapes, dt, seed=64 + k) for k, dt in enumerate(DTYPES)]
    base = [[c[j][i] for i in range(len(be.lean_shapes)) for c in cases] for j in range(5)]
    for j in (2, 3):  # every other tensor lean
        base[j] = [x.bfloat16() if i % 2 == 0 else x for i, x in enumerate(base[j])]
    outs = []
    for _ in range(2):
        dev = be.to_dev(clone_all(base))
        for _ in range(2):
            be.step(dev, h)
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


# --- host-side rules shared by both backends (neptune_cuda_args.h, neptune_table_cache.h) ---

def _op_of(be):
    return neptune_step_ if be.name == "cuda" else neptune_ext.ops.neptune_step_simt_


def test_shared_step_counter_is_rejected_before_writing(be):
    # Two params with one step tensor: the CPU op would count it twice, the CUDA op once and
    # racily. Every backend refuses the call, naming both, and writes nothing.
    h = hyper()
    dev = be.to_dev(make_case([(5, 7), (9,), (3, 4)], torch.float32, seed=70))
    dev[4][2] = dev[4][0]
    before = clone_all(dev)
    with pytest.raises(ValueError, match=r"steps\[0\] and steps\[2\] are the same counter"):
        _op_of(be)(*dev, **h)
    for a_list, b_list in zip(dev, before):
        for a, b in zip(a_list, b_list):
            assert torch.equal(a, b)


def test_pending_cuda_error_is_not_blamed_on_the_step():
    # An error left by an earlier, unrelated CUDA call (here planted in the emulated runtime's
    # last-error slot) is reported as such before anything runs, not as this step's launch
    # failure; it is consumed, so the next step runs.
    h = hyper()
    dev = Backend("simt").to_dev(make_case([(5, 7), (9,)], torch.float32, seed=71))
    before = clone_all(dev)
    torch.ops.neptune_ext._simt_set_pending_error(719)  # cudaErrorLaunchFailure
    with pytest.raises(RuntimeError, match="an earlier CUDA call left an error pending: cudaErrorLaunchFailure"):
        neptune_ext.ops.neptune_step_simt_(*dev, **h)
    for a_list, b_list in zip(dev, before):
        for a, b in zip(a_list, b_list):
            assert torch.equal(a, b)
    neptune_ext.ops.neptune_step_simt_(*dev, **h)
    assert float(dev[4][0]) == float(before[4][0]) + 1


def test_table_cache_lifetimes():
    # The cache shared by both backends, on CPU tables: a table held by its caller survives
    # the eviction of its entry (an evicted table nobody holds is poisoned as it is freed);
    # tables made during graph captures are never cached (the graph's pool owns them), so
    # repeated captures cannot grow the cache.
    intact, size, uploads = torch.ops.neptune_ext._table_cache_check()
    assert intact == 1, "a held table was freed by an eviction"
    assert size == 4, f"{size} entries after 100 captures (limit 4)"
    assert uploads == 111


def test_schedule_must_be_non_negative():
    dev = Backend("simt").to_dev(make_case([(9,)], torch.float32, seed=72))
    with pytest.raises(ValueError, match="schedule must be >= 0"):
        neptune_ext.ops.neptune_step_simt_(*dev, **hyper(), schedule=-1)
