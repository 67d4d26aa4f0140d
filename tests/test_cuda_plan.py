"""The CUDA operator's work plan (csrc/cuda/plan.h), checked on the CPU.

torch.ops.neptune_ext._cuda_plan walks the grid exactly as the CUDA kernels do and lists
the work of every block / warp; these tests check that every element of every tensor is
stepped exactly once, that no work crosses a unit, that chunked units are consistent
between the launches, and the launch counts, for the benchmark's parameter sets and for
random lists, with int64 sizes (tensors described by sizes only, never allocated).
"""
from __future__ import annotations

import math
import random

import pytest
import torch

import neptune_ext  # noqa: F401  (loads the extension)

pytestmark = pytest.mark.skipif(
    not hasattr(torch.ops.neptune_ext, "_cuda_plan"), reason="CPU extension without the _cuda_plan debug op"
)

# Mirrors csrc/cuda/plan.h.
WARP_MAX_LEN = 2048
BLOCK_MAX_LEN = 16384
WARPS_PER_BLOCK = 8
KIND_EMPTY, KIND_WARP, KIND_BLOCK, KIND_CHUNKED = 0, 1, 2, 3
LAUNCH_MAIN, LAUNCH_LONG, LAUNCH_STEPS = 0, 1, 2
ROLE_NORM, ROLE_COUNT, ROLE_UPDATE = 0, 1, 2
COLS = ["launch", "block", "warp", "tensor", "kind", "unit", "begin", "end", "long_index", "unit_long_begin", "chunks"]


def unit_len(shape) -> int:
    numel = math.prod(shape)
    if len(shape) >= 2:
        return 0 if shape[0] == 0 else numel // shape[0]
    return numel


def sizes(shapes):
    return [math.prod(s) for s in shapes], [unit_len(s) for s in shapes]


# ---------------------------------------------------------------- benchmark parameter sets
def resnet50_shapes():
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for b in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,)]
            shapes += [(planes, planes, 3, 3), (planes,), (planes,)]
            shapes += [(planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if b == 0:
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    shapes += [(1000, 2048), (1000,)]
    return shapes


def gpt2_shapes(d=768, layers=12, vocab=50257, ctx=1024):
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


BENCH_SETS = {
    "resnet50": resnet50_shapes(),
    "gpt2-small": gpt2_shapes(),
    "gpt2-medium": gpt2_shapes(d=1024, layers=24),
    "many-small": [(1000,)] * 10_000,
    **{f"single-2^{k}": [(2**k,)] for k in (10, 14, 16, 20, 24, 28)},
}


def test_bench_set_sizes():
    assert len(BENCH_SETS["resnet50"]) == 161
    assert abs(sum(math.prod(s) for s in BENCH_SETS["resnet50"]) - 25.56e6) < 0.1e6
    assert abs(sum(math.prod(s) for s in BENCH_SETS["gpt2-small"]) - 124.4e6) < 0.5e6


# ---------------------------------------------------------------- coverage checker
def check_plan(numels, unit_lens):
    items = torch.ops.neptune_ext._cuda_plan(numels, unit_lens)
    assert items.dtype == torch.int64 and items.dim() == 2 and items.shape[1] == len(COLS)
    c = {name: items[:, i] for i, name in enumerate(COLS)}
    info = torch.ops.neptune_ext._cuda_plan_info(numels, unit_lens, True, True)
    main_blocks, long_blocks = info[0], info[1]
    n = len(numels)

    main = c["launch"] == 0
    lng = c["launch"] == 1
    assert bool((main | lng).all())

    # Main launch: blocks in range, each (block, warp) at most once, and a block is either
    # block-level work (warp -1, one row) or warp work only.
    mb, mw = c["block"][main], c["warp"][main]
    if mb.numel():
        assert int(mb.min()) >= 0 and int(mb.max()) < main_blocks
    key = mb * (WARPS_PER_BLOCK + 1) + (mw + 1)
    assert key.unique().numel() == key.numel(), "a (block, warp) has two pieces of work"
    blk_level = mb[mw < 0]
    assert blk_level.unique().numel() == blk_level.numel()
    assert not bool(torch.isin(blk_level, mb[mw >= 0]).any()), "a block mixes block-level and warp work"
    assert bool((mw < WARPS_PER_BLOCK).all())
    # Warp work is exactly the warp units, block-level work the rest.
    assert bool(((c["kind"][main] == KIND_WARP) == (mw >= 0)).all())

    # Every element of every tensor covered exactly once by the main launch.
    t, b, e, u, kind = (c[k][main] for k in ("tensor", "begin", "end", "unit", "kind"))
    L = torch.tensor(unit_lens, dtype=torch.int64)[t] if n else t
    order = torch.argsort(t * 0 + b, stable=True)  # by begin, then stably by tensor
    order = order[torch.argsort(t[order], stable=True)]
    t, b, e, u, kind, L = t[order], b[order], e[order], u[order], kind[order], L[order]
    assert bool((e > b).all())
    # Each piece lies inside its unit.
    assert bool((b // L == u).all()) and bool(((e - 1) // L == u).all())
    assert bool(((kind == KIND_CHUNKED) | ((b == u * L) & (e == b + L))).all())
    expect_kind = torch.tensor(
        [
            KIND_EMPTY if (nu == 0 or ul == 0) else KIND_WARP if ul <= WARP_MAX_LEN else
            KIND_BLOCK if ul <= BLOCK_MAX_LEN else KIND_CHUNKED
            for nu, ul in zip(numels, unit_lens)
        ],
        dtype=torch.int64,
    )
    if t.numel():
        assert bool((kind == expect_kind[t]).all())
    # Contiguous tiling per tensor: starts at 0, each piece begins where the last ended,
    # and the last one ends at numel.
    if t.numel():
        same = t[1:] == t[:-1]
        assert bool((b[1:][same] == e[:-1][same]).all()), "gap or overlap inside a tensor"
        first = torch.ones_like(t, dtype=torch.bool)
        first[1:] = ~same
        last = torch.ones_like(t, dtype=torch.bool)
        last[:-1] = ~same
        assert bool((b[first] == 0).all())
        numel_t = torch.tensor(numels, dtype=torch.int64)
        assert bool((e[last] == numel_t[t[last]]).all())
    covered = set(t.unique().tolist())
    assert covered == {i for i in range(n) if numels[i] > 0}

    # Chunks: dense long indices, the same chunk in the main launch and in long space,
    # and the unit's first chunk index consistent with the chunk's position.
    ch = main & (c["kind"] == KIND_CHUNKED)
    li = c["long_index"][ch]
    assert li.numel() == long_blocks
    assert torch.equal(li.sort().values, torch.arange(long_blocks))
    assert int(lng.sum()) == long_blocks
    assert torch.equal(c["block"][lng], torch.arange(long_blocks))
    lrows = items[lng][torch.argsort(c["long_index"][lng])]
    mrows = items[ch][torch.argsort(li)]
    for col in ("tensor", "kind", "unit", "begin", "end", "long_index", "unit_long_begin", "chunks"):
        j = COLS.index(col)
        assert torch.equal(lrows[:, j], mrows[:, j]), col
    if li.numel():
        tl = mrows[:, COLS.index("tensor")]
        ul = torch.tensor(unit_lens, dtype=torch.int64)[tl]
        chunks = mrows[:, COLS.index("chunks")]
        # chunk length as the plan computes it: ceil(L / 1024) rounded up to 2048, >= 16384
        chunk_len = (torch.div(torch.div(ul + 1023, 1024, rounding_mode="floor") + 2047, 2048,
                               rounding_mode="floor") * 2048).clamp(min=16384)
        assert torch.equal(chunks, torch.div(ul + chunk_len - 1, chunk_len, rounding_mode="floor"))
        beg = mrows[:, COLS.index("begin")]
        end = mrows[:, COLS.index("end")]
        unit = mrows[:, COLS.index("unit")]
        ci = mrows[:, COLS.index("long_index")] - mrows[:, COLS.index("unit_long_begin")]
        assert bool((ci >= 0).all()) and bool((ci < chunks).all())
        assert torch.equal(beg, unit * ul + ci * chunk_len)
        assert torch.equal(end, torch.minimum(beg + chunk_len, (unit + 1) * ul))
        # chunk starts keep 16-byte alignment (multiples of 2048 elements from the unit start)
        assert bool((((beg - unit * ul) % 2048) == 0).all())
        assert bool((chunks <= 1024).all())
    return items, info


@pytest.mark.parametrize("name", list(BENCH_SETS))
def test_bench_sets_covered(name):
    check_plan(*sizes(BENCH_SETS[name]))


@pytest.mark.parametrize("name", list(BENCH_SETS))
@pytest.mark.parametrize("clip,cautious", [(False, False), (True, False), (False, True), (True, True)])
def test_launch_counts(name, clip, cautious):
    numels, uls = sizes(BENCH_SETS[name])
    info = torch.ops.neptune_ext._cuda_plan_info(numels, uls, clip, cautious)
    main_blocks, long_blocks, launches = info[0], info[1], info[2]
    seq = [tuple(info[4 + 3 * i: 7 + 3 * i]) for i in range(launches)]
    assert seq[0][0] == LAUNCH_MAIN and seq[0][2] == main_blocks
    assert seq[-1][0] == LAUNCH_STEPS
    assert main_blocks < 2**31
    if long_blocks == 0:
        assert launches == 2  # one launch for all the math, one for the step counters
    else:
        assert launches == 2 + int(clip) + int(cautious)
        assert [s[1] for s in seq[:-1]] == [r for r, on in ((ROLE_NORM, clip), (ROLE_COUNT, cautious), (ROLE_UPDATE, True)) if on]
    if name == "many-small":
        assert launches <= 2
        assert main_blocks == 10_000 // WARPS_PER_BLOCK  # 8 units per block


def test_many_small_packs_tensors_into_blocks():
    items, _ = check_plan(*sizes([(1000,)] * 10_000))
    assert items.shape[0] == 10_000
    blocks = items[:, COLS.index("block")]
    assert blocks.unique().numel() == 1250


def test_thresholds_and_zero_size():
    shapes = [
        (0,), (1,), (), (7,), (2048,), (2049,), (16384,), (16385,), (0, 5), (5, 0), (3, 0, 2),
        (1031,), (5, 1031), (3, 70000), (200000,), (64, 3, 3, 3), (1, 2049), (2, 16385), (4, 2048),
    ]
    numels, uls = sizes(shapes)
    check_plan(numels, uls)


def test_int64_sizes_never_allocated():
    # 1-D over 2^31 (chunked), 2-D with block-unit rows over 2^31 elements in total,
    # rows long enough to be chunked, and warp units at offsets over 2^31.
    shapes = [(2**31 + 16,), (7,), (2**17 + 1, 16385), (3, 2**30 + 2049), (2**20 + 3, 2048), (5,)]
    numels, uls = sizes(shapes)
    assert max(numels) > 2**31
    items, info = check_plan(numels, uls)
    assert int(items[:, COLS.index("end")].max()) > 2**31
    single = sizes([(2**33,)])
    _, info = check_plan(*single)
    assert info[1] == 1024  # at most 1024 chunks per unit


@pytest.mark.parametrize("seed", range(12))
def test_random_lists(seed):
    rng = random.Random(seed)
    shapes = []
    for _ in range(rng.randint(1, 60)):
        r = rng.random()
        if r < 0.1:
            shapes.append(rng.choice([(0,), (0, 3), (4, 0), ()]))
        elif r < 0.35:
            shapes.append((rng.choice([1, 2, 3, 5, 31, 32, 33, 255, 1000, 2047, 2048, 2049, 4097, 16384, 16385,
                                        50_000, 262_145]),))
        elif r < 0.8:
            shapes.append((rng.randint(1, 300), rng.choice([1, 3, 7, 64, 513, 2048, 2049, 9000, 16385, 40_000])))
        else:
            shapes.append((rng.randint(1, 64), rng.randint(1, 64), rng.choice([1, 3]), rng.choice([1, 3])))
    check_plan(*sizes(shapes))


def test_empty_list():
    info = torch.ops.neptune_ext._cuda_plan_info([], [], True, True)
    assert info[:3] == [0, 0, 0]
    assert torch.ops.neptune_ext._cuda_plan([], []).shape == (0, len(COLS))
