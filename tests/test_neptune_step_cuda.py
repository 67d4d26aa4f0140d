"""What only the CUDA operator has: its argument tables and their cache (on the real
kernels and on the SIMT-emulated ones), launch counts, CUDA graphs, streams and tensors
over 2^31 elements (real GPU only, skipped without one). What every backend must do is in
test_operator_contract.py."""
from __future__ import annotations

import pytest
import torch

import neptune_ext
from neptune_ext import neptune_step_, neptune_step_reference_multi
from neptune_ext import testing as T
from neptune_ext.ops import StepLists

HAS_GPU = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
CUDA_BACKENDS = [b for b in T.BACKENDS if b.emulated or b.device == "cuda"]
CUDA = next(b for b in CUDA_BACKENDS if b.device == "cuda")
SIMT = next(b for b in CUDA_BACKENDS if b.emulated)
DEV = "cuda"


@pytest.fixture(params=CUDA_BACKENDS, ids=[b.name for b in CUDA_BACKENDS])
def backend(request, monkeypatch):
    request.param.use(monkeypatch)
    return request.param


@cuda_only
def test_cuda_kernel_registered():
    assert neptune_ext.has_kernel("cuda"), neptune_ext.ops.describe_build()


# -- argument tables ----------------------------------------------------------------------------


@pytest.mark.parametrize("shapes", [((64, 1000), (64000,)), ((40, 500), (20, 1000)), ((4, 5000), (5000, 4))],
                         ids=str)
def test_same_storage_new_shape_gets_new_table(backend, shapes):
    # The device table is cached by content: the same pointers stepped with other units
    # (a view with another shape) must not reuse the first shape's table.
    gen = torch.Generator().manual_seed(41)
    ref = T.make_case([shapes[0]], torch.float32, seed=40)
    dev = backend.to_device(ref)
    backend.step(*dev, **T.HYPER)
    neptune_step_reference_multi(*ref, **T.HYPER)
    T.assert_lists_close(dev, ref, f"{shapes[0]}")
    uploads = backend.table_uploads()
    ref = StepLists(*[[t.reshape(shapes[1]) for t in lst] for lst in ref[:4]], ref.steps)
    ref.grads[:] = T.make_grads(ref.params, ref.exp_avgs, generator=gen)
    dev = StepLists(*[[t.view(shapes[1]) for t in lst] for lst in dev[:4]], dev.steps)
    for d_list, r_list in zip(dev, ref):
        for d, r in zip(d_list, r_list):
            d.copy_(r)  # resync to the reference state, in place: the same pointers as before
    backend.step(*dev, **T.HYPER)
    neptune_step_reference_multi(*ref, **T.HYPER)
    T.assert_lists_close(dev, ref, f"{shapes[0]} as {shapes[1]}")
    assert backend.table_uploads() > uploads


def test_table_cache_lifetimes():
    # The cache shared by both backends, on CPU tables: a table held by its caller survives
    # the eviction of its entry (an evicted table nobody holds is poisoned as it is freed);
    # tables made during graph captures are never cached (the graph's pool owns them), so
    # repeated captures cannot grow the cache.
    intact, size, uploads = torch.ops.neptune_ext._table_cache_check()
    assert intact == 1, "a held table was freed by an eviction"
    assert size == 4, f"{size} entries after 100 captures (limit 4)"
    assert uploads == 111


# -- the emulated runtime ------------------------------------------------------------------------


def test_pending_cuda_error_is_not_blamed_on_the_step():
    # An error left by an earlier, unrelated CUDA call (here planted in the emulated runtime's
    # last-error slot) is reported as such before anything runs, not as this step's launch
    # failure; it is consumed, so the next step runs.
    dev = SIMT.to_device(T.make_case([(5, 7), (9,)], torch.float32, seed=71))
    before = T.copy_lists(dev)
    torch.ops.neptune_ext._simt_set_pending_error(719)  # cudaErrorLaunchFailure
    with pytest.raises(RuntimeError, match="an earlier CUDA call left an error pending: cudaErrorLaunchFailure"):
        neptune_ext.ops.neptune_step_simt_(*dev, **T.HYPER)
    T.assert_lists_equal(dev, before, "after the refused call:")
    neptune_ext.ops.neptune_step_simt_(*dev, **T.HYPER)
    assert float(dev.steps[0]) == float(before.steps[0]) + 1


def test_schedule_must_be_non_negative():
    dev = SIMT.to_device(T.make_case([(9,)], torch.float32, seed=72))
    with pytest.raises(ValueError, match="schedule must be >= 0"):
        neptune_ext.ops.neptune_step_simt_(*dev, **T.HYPER, schedule=-1)


# -- real hardware only ------------------------------------------------------------------------


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
    lists = StepLists(*[[torch.randn(1000, device=DEV) for _ in range(n)] for _ in range(2)],
                      *[[torch.zeros(1000, device=DEV) for _ in range(n)] for _ in range(2)],
                      [torch.zeros((), device=DEV) for _ in range(n)])
    neptune_step_(*lists, **T.HYPER)  # first step uploads the table
    uploads = CUDA.table_uploads()
    names = _neptune_kernel_launches(lambda: neptune_step_(*lists, **T.HYPER))
    assert CUDA.table_uploads() == uploads, "steady state re-uploaded the table"
    assert len(names) <= 2, names
    assert all(float(x) == 2.0 for x in torch.stack(lists.steps[:10]).cpu())


@cuda_only
def test_cuda_graph_capture_matches_eager():
    base = T.make_case(CUDA.shapes, torch.float32, seed=12)
    eager, graphed = CUDA.to_device(base), CUDA.to_device(base)
    h = dict(T.HYPER, grad_scale=torch.ones((), device=DEV), found_inf=torch.zeros((), device=DEV))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    snapshot = T.copy_lists(graphed)
    with torch.cuda.stream(side):
        # warm-up on a side stream, as torch advises; tables are per stream, so the capture
        # (on torch.cuda.graph's own stream) uploads its own, inside the graph
        neptune_step_(*graphed, **h)
    torch.cuda.current_stream().wait_stream(side)
    for d_list, s_list in zip(graphed, snapshot):
        for d, s in zip(d_list, s_list):
            d.copy_(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        neptune_step_(*graphed, **h)
    for _ in range(2):
        graph.replay()
        neptune_step_(*eager, **h)
    torch.cuda.synchronize()
    T.assert_lists_equal(graphed, eager, "graph vs eager:")
    h["found_inf"].fill_(1.0)  # a skipped replay changes nothing
    before = T.copy_lists(graphed)
    graph.replay()
    torch.cuda.synchronize()
    T.assert_lists_equal(graphed, before, "skipped replay:")


@cuda_only
def test_side_stream_and_empty_only():
    base = T.make_case(CUDA.shapes, torch.float32, seed=50)
    a, b = CUDA.to_device(base), CUDA.to_device(base)
    neptune_step_(*a, **T.HYPER)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        neptune_step_(*b, **T.HYPER)  # a table for (these tensors, this stream)
        neptune_step_(*b, **T.HYPER)
    torch.cuda.current_stream().wait_stream(side)
    neptune_step_(*a, **T.HYPER)
    T.assert_lists_equal(a, b, "side stream:")
    # Only zero-size tensors: no math launch, the step counters still advance.
    empty = CUDA.to_device(T.make_case([(0,), (3, 0, 2)], torch.bfloat16, seed=51))
    neptune_step_(*empty, **T.HYPER)
    assert [float(s) for s in empty.steps] == [4.0, 4.0]


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
    h = T.HYPER
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
        T.assert_param_close(flat(p)[a:b], rp.reshape(-1), f"slice {a}:{b}")
        T.assert_state_close(flat(m)[a:b], rm.reshape(-1), f"exp_avg slice {a}:{b}")
        T.assert_state_close(flat(v)[a:b], rv.reshape(-1), f"exp_avg_sq slice {a}:{b}")
    assert float(s) == 1.0
    del p, g, m, v
    torch.cuda.empty_cache()
