"""Named parameter sets for the step microbenchmark (bench/bench_step.py).

Each set is a list of shapes, in the order the model's ``parameters()`` yields them, with
PyTorch's layouts (conv: out x in x kh x kw; nn.Linear: out x in). The generators
reproduce the real models without importing torchvision or transformers;
tests/test_bench_step.py checks ResNet-50 against torchvision when it is importable.

Sets:
  resnet50     torchvision ResNet-50: 161 tensors, 25,557,032 params.
  gpt2-small   GPT-2 124M (d=768, 12 layers, vocab 50257, ctx 1024, tied head counted once):
               148 tensors, 124,439,808 params. Linear weights in nn.Linear layout (out x in).
  gpt2-medium  GPT-2 355M (d=1024, 24 layers): 292 tensors, 354,823,168 params (CUDA).
  many-small   10,000 tensors of shape (1000,): 1-D, so each tensor is exactly one unit
               (launch/loop overhead dominated), 10,000,000 params.
  single       one 2-D tensor (n/1024, 1024) per size n = 2^k (rows are units of 1024):
               k = 10, 12, ..., 26 on CPU, 16, 17, ..., 28 on CUDA by default.
  single:1d    one 1-D tensor (n,) per size: a single unit of n elements (worst case for
               the per-unit reductions: nothing to parallelise over but the elements).
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ParamSet:
    name: str  # set name as written in the results ("single" for every size of the sweep)
    shapes: tuple[Shape, ...]
    note: str = ""  # short human description (e.g. "16384x1024")

    @property
    def n_tensors(self) -> int:
        return len(self.shapes)

    @property
    def n_params(self) -> int:
        return sum(prod(s) for s in self.shapes)


def resnet50_shapes(width: int = 64, layers: tuple[int, ...] = (3, 4, 6, 3), num_classes: int = 1000) -> list[Shape]:
    """torchvision.models.resnet50 parameter shapes, in parameters() order.

    width/layers/num_classes shrink it for smoke tests (width=64 etc. is the real model).
    """
    expansion = 4
    shapes: list[Shape] = [(width, 3, 7, 7), (width,), (width,)]  # conv1, bn1
    inplanes = width
    for stage, blocks in enumerate(layers):
        planes = width * 2**stage
        for b in range(blocks):
            shapes += [
                (planes, inplanes, 1, 1), (planes,), (planes,),  # conv1, bn1
                (planes, planes, 3, 3), (planes,), (planes,),  # conv2, bn2
                (planes * expansion, planes, 1, 1), (planes * expansion,), (planes * expansion,),  # conv3, bn3
            ]
            if b == 0:  # downsample (1x1 conv + bn) on the first block of every stage
                shapes += [(planes * expansion, inplanes, 1, 1), (planes * expansion,), (planes * expansion,)]
            inplanes = planes * expansion
    shapes += [(num_classes, inplanes), (num_classes,)]  # fc
    return shapes


def gpt2_shapes(n_layer: int = 12, d: int = 768, vocab: int = 50257, ctx: int = 1024) -> list[Shape]:
    """GPT-2 parameter shapes (HF GPT2LMHeadModel order, lm_head tied to wte so counted once),
    with every projection in nn.Linear layout (out x in) rather than HF's Conv1D (in x out)."""
    shapes: list[Shape] = [(vocab, d), (ctx, d)]  # wte, wpe
    for _ in range(n_layer):
        shapes += [
            (d,), (d,),  # ln_1
            (3 * d, d), (3 * d,),  # attn.c_attn
            (d, d), (d,),  # attn.c_proj
            (d,), (d,),  # ln_2
            (4 * d, d), (4 * d,),  # mlp.c_fc
            (d, 4 * d), (d,),  # mlp.c_proj
        ]
    shapes += [(d,), (d,)]  # ln_f
    return shapes


def many_small_shapes(count: int = 10_000, size: int = 1000) -> list[Shape]:
    return [(size,)] * count


def single_sizes(lo_log2: int, hi_log2: int, step: int = 1) -> list[int]:
    return [2**k for k in range(lo_log2, hi_log2 + 1, step)]


def single_set(n: int, one_d: bool = False) -> ParamSet:
    if one_d:
        return ParamSet("single:1d", ((n,),), f"({n},)")
    rows = max(n // 1024, 1)
    cols = n // rows
    return ParamSet("single", ((rows, cols),), f"{rows}x{cols}")


NAMED = ("resnet50", "gpt2-small", "gpt2-medium", "many-small")
SWEEPS = ("single", "single:1d")


def build_sets(name: str, device: str, quick: bool = False, single_range: tuple[int, int, int] | None = None) -> list[ParamSet]:
    """The ParamSets for one --sets entry. quick=True gives tiny stand-ins with the same
    structure (for smoke tests; their results are written under a '_quick' file name)."""
    if name == "resnet50":
        s = resnet50_shapes(width=8, layers=(1, 1, 1, 1), num_classes=10) if quick else resnet50_shapes()
        return [ParamSet(name, tuple(s), "conv/bn/fc")]
    if name in ("gpt2-small", "gpt2-medium"):
        if quick:
            s = gpt2_shapes(n_layer=2, d=64, vocab=1000, ctx=128)
        elif name == "gpt2-small":
            s = gpt2_shapes()
        else:
            s = gpt2_shapes(n_layer=24, d=1024)
        return [ParamSet(name, tuple(s), "emb/linear/ln")]
    if name == "many-small":
        count = 200 if quick else 10_000
        return [ParamSet(name, tuple(many_small_shapes(count)), f"{count}x(1000,)")]
    if name in SWEEPS:
        if single_range is None:
            if quick:
                single_range = (10, 14, 2)
            else:
                # CPU: every other power of 2 keeps the default run near 10 minutes on 2 cores
                single_range = (10, 26, 2) if device == "cpu" else (16, 28, 1)
        return [single_set(n, one_d=name == "single:1d") for n in single_sizes(*single_range)]
    raise ValueError(f"unknown set {name!r}; known: {', '.join(NAMED + SWEEPS)}")
