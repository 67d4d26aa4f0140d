"""Neptune under torch.distributed (gloo, 2 CPU processes), each against single-process
training on the whole batch: DDP, ZeroRedundancyOptimizer and FSDP2 (DTensor shards,
with 1-D params split across ranks)."""
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import neptune_ext
from neptune_ext import Neptune

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"),
    pytest.mark.skipif(sys.platform != "linux", reason="spawned gloo workers are tested on Linux"),
]

WORLD = 2
STEPS = 3
HYPER = dict(lr=1e-2, weight_decay=0.1, clip=0.05)


def _model():
    torch.manual_seed(0)
    # No BatchNorm / conv bias: trajectories stay comparable across reduction orders.
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 6), nn.Tanh(), nn.Linear(6, 4))


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 12, generator=gen), torch.randint(0, 4, (16,), generator=gen)) for _ in range(STEPS)]


def _single_process():
    model = _model()
    opt = Neptune(model.parameters(), **HYPER)
    for x, y in _batches():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach() for p in model.parameters()]


def _worker(rank, mode, init_file, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = _model()
        if mode == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (WORLD,))
            for layer in model:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            net, opt = model, Neptune(model.parameters(), **HYPER)
        else:
            net = nn.parallel.DistributedDataParallel(model)
            if mode == "zero":
                from torch.distributed.optim import ZeroRedundancyOptimizer

                opt = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=Neptune, **HYPER)
            else:
                opt = Neptune(net.parameters(), **HYPER)
        half = 16 // WORLD
        for x, y in _batches():
            opt.zero_grad()
            xs, ys = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
            nn.functional.cross_entropy(net(xs), ys).backward()
            opt.step()
        params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
        if mode == "fsdp2":
            kinds = sorted({type(p).__name__ for p in model.parameters()})
            assert kinds == ["DTensor"], kinds
        if rank == 0:
            torch.save([p.detach().clone() for p in params], out_file)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Gloo's threads can abort a worker at interpreter teardown now and then ("terminate
    # called without an active exception"; with torch's AdamW as well): the work is done
    # and saved, so leave without running the C++ destructors.
    os._exit(0)


@pytest.mark.parametrize("mode", ["ddp", "zero", "fsdp2"])
def test_matches_single_process(mode, tmp_path):
    if not neptune_ext.has_kernel("cpu"):
        pytest.skip("CPU extension not built")
    out_file = tmp_path / "params.pt"
    mp.spawn(_worker, args=(mode, str(tmp_path / "init"), str(out_file)), nprocs=WORLD, join=True)
    got = torch.load(out_file, weights_only=True)
    want = _single_process()
    assert len(got) == len(want)
    start = _model()
    for g, w, s in zip(got, want, start.parameters()):
        assert not torch.equal(w, s.detach()), "training must move every param"
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def _skip_worker(rank, init_file, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        model = _model()
        mesh = init_device_mesh("cpu", (WORLD,))
        fully_shard(model, mesh=mesh)
        opt = Neptune(model.parameters(), skip_nonfinite=True, **HYPER)
        x, y = _batches()[0]
        nn.functional.cross_entropy(model(x), y).backward()
        # Every rank puts a NaN in its shard of a 1-D param's gradient: such a param is
        # gathered and stepped whole, outside the per-device buckets, and must be skipped too.
        model[0].bias.grad.to_local()[0] = float("nan")
        before = [p.full_tensor().clone() for p in model.parameters()]
        opt.step()
        after = [p.full_tensor() for p in model.parameters()]
        torch.save([torch.equal(a, b) for a, b in zip(before, after)], f"{out_file}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)


def test_fsdp2_skip_nonfinite_covers_gathered_params(tmp_path):
    if not neptune_ext.has_kernel("cpu"):
        pytest.skip("CPU extension not built")
    out_file = tmp_path / "unchanged.pt"
    mp.spawn(_skip_worker, args=(str(tmp_path / "init"), str(out_file)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        assert all(torch.load(f"{out_file}.{rank}", weights_only=True)), f"rank {rank} stepped a param"
