"""Testing aids for Neptune's step, as torch.testing is for torch: shared by the tests and
the benchmarks.

- Inputs: `make_case` / `make_grads` build a random mid-training state with random signs
  (and some exact zeros), moved away from the rule's discontinuities (see below);
  `HYPER`, `DTYPES`, `STATE_DTYPES`, `SHAPES`, `LONG_SHAPES` are the shared settings.
- Tolerances (docs/rule.md, "Numerics and tolerances"): `assert_param_close`,
  `assert_state_close`, `assert_bf16_state_close`, `assert_nonfinite_close`,
  `assert_lists_close`.
- `compare_with_reference`: steps a backend and the reference side by side.
- `BACKENDS` / `backends()`: every implementation of the step, each able to run one
  (`Backend.step`) or to stand behind the optimizer (`Backend.use`).

Edges: the rule is discontinuous where M_new * G crosses 0 (cautious mask) and where a
unit's gradient norm crosses the clip threshold, so two correct implementations may
disagree there by rounding alone. `make_grads` moves every element and unit away:
- a unit whose clip ratio is within 1e-3 of 1 gets its gradient doubled;
- an element whose new moment would be within 1e-3 (relative) of 0 gets its gradient's
  sign flipped, which keeps the unit's norm, so the clip factor does not move.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import ops
from .ops import StepLists
from .reference import neptune_step_reference_multi, units_view

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8, clip=0.1, cautious=True, maximize=False)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # param dtypes
STATE_DTYPES = (torch.float32, torch.bfloat16)  # exp_avg / exp_avg_sq dtypes (bfloat16: bf16 state)
# Odd shapes: 0-d, 1-d, a prime length, a conv filter bank, prime row lengths (misaligned
# for 16-byte vectors), zero-size tensors.
SHAPES = [(), (1,), (7,), (0,), (1031,), (64, 3, 3, 3), (5, 1031), (3, 0, 2)]
# Long units: a CUDA block's (over 2048 elements), chunked on CUDA (over 16384), chunked
# on the CPU (over 32768: two and three chunks).
LONG_SHAPES = [(4, 5000), (2, 16385), (2, 40000), (70001,)]
CPU_ISA_ENV = "NEPTUNE_CPU_ISA"


# -- inputs ---------------------------------------------------------------------------------


def _edge_safe_(W: Tensor, G: Tensor, M: Tensor, clip: float, beta1: float, gmul: float) -> None:
    if W.numel() == 0:
        return
    Gu = units_view(G)
    Wd = units_view(W).double()
    Md = units_view(M).double()
    if clip > 0:
        w_norm = torch.linalg.vector_norm(Wd, dim=1).clamp(min=1e-3)
        g_norm = torch.linalg.vector_norm(Gu.double() * gmul, dim=1)
        ratio = clip * w_norm / g_norm.clamp(min=1e-6)
        near = ((ratio - 1).abs() < 1e-3) & (g_norm > 1e-6)
        Gu[near] = Gu[near] * 2  # exact in every float dtype
    Gd = Gu.double() * gmul
    s = torch.ones(Gd.shape[0], 1, dtype=torch.float64)
    if clip > 0:
        w_norm = torch.linalg.vector_norm(Wd, dim=1, keepdim=True).clamp(min=1e-3)
        g_norm = torch.linalg.vector_norm(Gd, dim=1, keepdim=True).clamp(min=1e-6)
        s = (clip * w_norm / g_norm).clamp(max=1)
    m_new = beta1 * Md + (1 - beta1) * s * Gd
    scale = beta1 * Md.abs() + (1 - beta1) * s * Gd.abs()
    near = (m_new.abs() < 1e-3 * scale) & (Gd != 0)
    Gu[near] = -Gu[near]  # exact; keeps the norm


def make_grads(params, exp_avgs, *, clip=0.1, beta1=0.9, maximize=False, grad_scale=1.0, generator=None,
               zero_frac=0.05) -> list[Tensor]:
    """Edge-safe random gradients (param dtype, CPU) for the current state."""
    grads = []
    for p, m in zip(params, exp_avgs):
        p, m = p.detach().cpu(), m.detach().cpu().float()
        g = torch.randn(p.shape, generator=generator, dtype=torch.float64)
        if p.numel():
            gu = units_view(g)
            # Per-unit magnitudes over 2.5 decades: some units clipped, some not.
            gu *= 10 ** (-2.5 * torch.rand(gu.shape[0], 1, generator=generator, dtype=torch.float64))
            gu[torch.rand(gu.shape, generator=generator) < zero_frac] = 0
            if gu.shape[0] >= 3:
                gu[1] = 0  # one unit with an all-zero gradient
        g = (g * grad_scale).to(p.dtype)
        gmul = (-1.0 if maximize else 1.0) / grad_scale
        _edge_safe_(p, g, m, clip, beta1, gmul)
        grads.append(g)
    return grads


def make_case(shapes, dtype, *, seed=0, step=3.0, state_dtype=torch.float32, **grad_kw) -> StepLists:
    """A mid-training state on the CPU: params of `dtype`, state of `state_dtype`, step
    counters at `step`, and edge-safe gradients (`grad_kw` as for make_grads)."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    exp_avgs = [(torch.randn(s, generator=gen) * 0.02).to(state_dtype) for s in shapes]
    exp_avg_sqs = [(torch.rand(s, generator=gen) * 1e-3 + 1e-8).to(state_dtype) for s in shapes]
    steps = [torch.tensor(step) for _ in shapes]
    grads = make_grads(params, exp_avgs, generator=gen, **grad_kw)  # edge-safe for the state as stored
    return StepLists(params, grads, exp_avgs, exp_avg_sqs, steps)


def copy_lists(lists, device=None) -> StepLists:
    """Copies of five tensor lists (on `device` if given, else where they are)."""
    return StepLists(*[[t.to(device or t.device, copy=True) for t in lst] for lst in lists])


def clone_all(lists) -> list[list[Tensor]]:
    """Copies of any number of tensor lists."""
    return [[t.clone() for t in lst] for lst in lists]


def hyper_for(hyper: dict, device) -> dict:
    """`hyper` with its tensors (lr, grad_scale, found_inf) moved to `device`."""
    return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in hyper.items()}


# -- tolerances -------------------------------------------------------------------------------


def ulp_diff(a: Tensor, b: Tensor) -> Tensor:
    """Distance in units in the last place between two bf16 / fp16 tensors (same sign)."""
    ia = a.contiguous().view(torch.int16).to(torch.int32)
    ib = b.contiguous().view(torch.int16).to(torch.int32)
    # Map sign-magnitude to a monotonic integer line so -0 and +0 are 0 apart.
    ia = torch.where(ia < 0, -(ia & 0x7FFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFF), ib)
    return (ia - ib).abs()


def _assert_16bit_close(actual: Tensor, expected: Tensor, what: str) -> None:
    # One ulp; more only where a result near zero came from cancellation (W * decay
    # against lr * u, or a moment against the new gradient term), where one float32
    # rounding of the operands is many 16-bit ulps of the result: those must be as close
    # in absolute terms as float32 values would have to be, and rare.
    # (Rare: under 0.1% of the elements, or one in a tensor of under 1,000 elements.)
    far = ulp_diff(actual, expected) > 1
    if far.any():
        scale = expected.double().pow(2).mean().sqrt().item()
        worst = (actual[far].double() - expected[far].double()).abs().max().item()
        n_far = int(far.sum())
        assert worst <= 1e-5 * scale + 1e-30 and (n_far == 1 or n_far < 1e-3 * far.numel()), (
            f"{what}: {n_far} elements > 1 ulp apart, up to {worst:.3g} (rms {scale:.3g})")


def _with(what: str):
    """assert_close's message prefixed with `what` (a plain msg would replace its figures)."""
    return (lambda message: f"{what}: {message}") if what else None


def assert_param_close(actual: Tensor, expected: Tensor, what: str = "") -> None:
    """fp32: relative 1e-5 (absolute 1e-5 of the tensor's rms); bf16 / fp16: one ulp
    (see _assert_16bit_close for results near zero)."""
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    if actual.numel() == 0:
        return
    if actual.dtype in (torch.bfloat16, torch.float16):
        _assert_16bit_close(actual, expected, what)
    else:
        scale = expected.double().pow(2).mean().sqrt().item()
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale, msg=_with(what))


def assert_state_close(actual: Tensor, expected: Tensor, what: str = "") -> None:
    """float32 state: relative 1e-5 (absolute 1e-5 of the tensor's rms)."""
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    if actual.numel() == 0:
        return
    scale = expected.double().pow(2).mean().sqrt().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale + 1e-30, msg=_with(what))


def assert_bf16_state_close(actual: Tensor, expected: Tensor, what: str = "") -> None:
    """bf16 state: the same float32 moment and the same random bits give the same bf16,
    so nearly all elements are equal; one ulp apart where the two float32 moments differ
    in their last bits (more only after cancellation, as for 16-bit params)."""
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    assert actual.dtype == torch.bfloat16 and expected.dtype == torch.bfloat16, what
    assert actual.shape == expected.shape, what
    if actual.numel() == 0:
        return
    _assert_16bit_close(actual, expected, what)
    # One element may differ in any tensor: two float32 moments a rounding apart straddle a
    # rounding boundary now and then (about one element in 10^4 to 10^5), so "99%" alone
    # would fail tensors of under 100 elements by chance.
    differ = int((actual != expected).sum())
    assert differ <= max(1, actual.numel() // 100), f"rounding bits differ in {differ} elements: " + what


def assert_nonfinite_close(actual: Tensor, expected: Tensor, what: str = "") -> None:
    """NaN and inf exactly where `expected` has them; the finite elements as assert_param_close."""
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), f"{what}: NaN positions differ"
    assert torch.equal(torch.isinf(actual), torch.isinf(expected)), f"{what}: inf positions differ"
    finite = torch.isfinite(expected)
    assert_param_close(actual[finite], expected[finite], what)


def assert_lists_close(actual, expected, what: str = "") -> None:
    """Params, state (float32 or bf16) and step counters of two StepLists."""
    a, e = StepLists(*actual), StepLists(*expected)
    for i, p in enumerate(e.params):
        where = f"{what} tensor {i} {tuple(p.shape)} {p.dtype}"
        assert_param_close(a.params[i], p, "param " + where)
        for name, x, y in (("exp_avg", a.exp_avgs[i], e.exp_avgs[i]), ("exp_avg_sq", a.exp_avg_sqs[i], e.exp_avg_sqs[i])):
            if y.dtype == torch.bfloat16:
                assert_bf16_state_close(x, y, f"{name} {where}")
            else:
                assert_state_close(x, y, f"{name} {where}")
        assert torch.equal(a.steps[i].cpu(), e.steps[i].cpu()), f"step {where}"


def assert_lists_equal(actual, expected, what: str = "") -> None:
    """Bitwise equal, list by list (NaNs with their payloads included)."""
    for name, a_list, e_list in zip(StepLists._fields, actual, expected):
        assert len(a_list) == len(e_list), f"{what} {name}: lengths differ"
        for i, (a, e) in enumerate(zip(a_list, e_list)):
            assert a.dtype == e.dtype and a.shape == e.shape, f"{what} {name}[{i}]"
            assert torch.equal(_bytes(a), _bytes(e)), f"{what} {name}[{i}] {tuple(a.shape)} differs"


def _bytes(t: Tensor) -> Tensor:
    return t.detach().cpu().reshape(-1).contiguous().view(torch.uint8)


# -- the compare-with-reference helper ----------------------------------------------------------


def compare_with_reference(step, shapes, dtype, hyper=None, *, n_steps=2, seed=0, grad_scale=None,
                           state_dtype=torch.float32, device="cpu") -> StepLists:
    """Steps `step` (neptune_step_'s signature, in place, on tensors on `device`) `n_steps`
    times from a random mid-training state, and after each step checks it against the
    reference run from the same state and gradients in float64 arithmetic. Before every
    step after the first, fresh edge-safe gradients for the state reached. Returns the
    stepped lists."""
    h = dict(HYPER if hyper is None else hyper)
    gs = 1.0 if grad_scale is None else grad_scale
    grad_kw = dict(clip=h["clip"], beta1=h["beta1"], maximize=h["maximize"], grad_scale=gs)
    lists = copy_lists(make_case(shapes, dtype, seed=seed, state_dtype=state_dtype, **grad_kw), device)
    gen = torch.Generator().manual_seed(seed + 1)
    scale = None if grad_scale is None else torch.tensor(float(grad_scale))
    for k in range(n_steps):
        if k > 0:  # in place: the same pointers (a device table cached for them is reused)
            for d, g in zip(lists.grads, make_grads(lists.params, lists.exp_avgs, generator=gen, **grad_kw)):
                d.copy_(g)
        ref = copy_lists(lists, "cpu")
        step(*lists, **hyper_for(h, device), grad_scale=None if scale is None else scale.to(device))
        neptune_step_reference_multi(*ref, **h, grad_scale=scale, compute_dtype=torch.float64)
        assert_lists_close(lists, ref, f"step {k + 1}")
    return lists


# -- backends ---------------------------------------------------------------------------------

SIMT_SCHEDULES = (0, 1, 2, 3)  # the emulator's orders: ascending, descending, two seeded random


@contextlib.contextmanager
def _env(name: str, value: str | None):
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                del os.environ[name]
            else:
                os.environ[name] = old


def _twin(t: Tensor) -> Tensor:
    """A copy of t at the same offset into a fresh buffer: the same 16-byte alignment."""
    if t.layout != torch.strided:  # a sparse grad (to be refused): as it is
        return t.clone()
    extent = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride())) if t.numel() else 1
    buf = torch.empty(t.storage_offset() + extent, dtype=t.dtype, device=t.device)
    return buf.as_strided(t.shape, t.stride(), t.storage_offset()).copy_(t)


@dataclass(frozen=True)
class Backend:
    """One implementation of the step.

    `device`: where its tensors live; `implementation`: Neptune(implementation=...);
    `kernel_set`: for the CPU operator, the kernel set it runs (NEPTUNE_CPU_ISA);
    `emulated`: the CUDA operator's path (validation, plan, argument table, unchanged
    kernels) on CPU tensors, run by the SIMT emulator under every schedule of
    SIMT_SCHEDULES, which must agree bitwise. `long_shapes`, `n_steps`: how big and how
    long a comparison with the reference is on it (the emulator is slow).
    """

    name: str
    device: str
    implementation: str
    kernel_set: str | None = None
    emulated: bool = False
    long_shapes: list = field(default_factory=lambda: list(LONG_SHAPES))
    n_steps: int = 3

    @property
    def shapes(self) -> list:
        return SHAPES + self.long_shapes

    @property
    def is_op(self) -> bool:
        return self.implementation == "op"

    def missing(self) -> str | None:
        """Why this backend cannot run here, or None."""
        if self.device == "cuda" and not torch.cuda.is_available():
            return "needs a CUDA GPU"
        if self.is_op and not ops.has_kernel(self.device):
            return f"no compiled Neptune kernel for {self.device}"
        if self.emulated and not hasattr(torch.ops.neptune_ext, "_neptune_step_simt_"):
            return "the SIMT emulator's operator is not built"
        return None

    def use(self, monkeypatch) -> None:
        """For a test: skip if unavailable; make the optimizer step on this backend."""
        import pytest

        why = self.missing()
        if why:
            pytest.skip(f"backend {self.name}: {why}")
        if self.kernel_set is not None:
            monkeypatch.setenv(CPU_ISA_ENV, self.kernel_set)
            assert torch.ops.neptune_ext.cpu_isa() == self.kernel_set
        if self.emulated:
            monkeypatch.setattr(ops, "neptune_step_", ops.neptune_step_simt_)

    def to_device(self, lists) -> StepLists:
        """Copies on this backend's device (also when already there: a step must not write
        the caller's tensors)."""
        return copy_lists(lists, self.device)

    def step(self, params, grads, exp_avgs, exp_avg_sqs, steps, **hyper) -> None:
        """One step in place, as neptune_step_ (hyper: lr, ..., grad_scale, found_inf)."""
        lists = StepLists(params, grads, exp_avgs, exp_avg_sqs, steps)
        if not self.is_op:
            neptune_step_reference_multi(*lists, **hyper)
        elif self.emulated:
            self._step_every_schedule(lists, hyper)
        else:
            with _env(CPU_ISA_ENV, self.kernel_set):
                if self.kernel_set is not None:
                    assert torch.ops.neptune_ext.cpu_isa() == self.kernel_set
                ops.neptune_step_(*lists, **hyper)

    def _step_every_schedule(self, lists: StepLists, hyper: dict) -> None:
        others = []
        for sched in SIMT_SCHEDULES[1:]:  # on twins, then the first schedule in place
            twin = StepLists(*[[_twin(t) for t in lst] for lst in lists])
            ops.neptune_step_simt_(*twin, **hyper, schedule=sched)
            others.append((sched, twin))
        ops.neptune_step_simt_(*lists, **hyper, schedule=SIMT_SCHEDULES[0])
        for sched, twin in others:
            assert_lists_equal(twin, lists, f"schedule {sched} vs schedule {SIMT_SCHEDULES[0]}:")

    def table_uploads(self) -> int:
        """Argument tables uploaded so far by this CUDA backend (its table cache's misses)."""
        op = torch.ops.neptune_ext._simt_table_uploads if self.emulated else torch.ops.neptune_ext._cuda_table_uploads
        return int(op())


def cpu_kernel_sets() -> list[str]:
    """The CPU kernel sets this machine can run, oldest first (empty if not built)."""
    return list(torch.ops.neptune_ext.cpu_kernel_sets()) if ops.HAS_CPU_EXT else []


def backends(every_cpu_kernel_set: bool = True) -> list[Backend]:
    """reference, the CPU operator (under each kernel set this machine runs, or only the
    newest, which it picks by default), the CUDA operator's kernels under the SIMT
    emulator, the CUDA operator. Each unavailable one is still listed (its tests skip)."""
    sets = cpu_kernel_sets()
    if not every_cpu_kernel_set:
        sets = sets[-1:]
    cpu = [Backend(f"cpu-{s}", "cpu", "op", kernel_set=s) for s in sets] or [Backend("cpu", "cpu", "op")]
    return [
        # the reference has no path that depends on a unit's length: one long shape
        Backend("reference", "cpu", "reference", long_shapes=[(2, 16385)], n_steps=2),
        *cpu,
        # the same kinds of unit as on CUDA with fewer elements: 2 units of 2 chunks, 1 of 4
        Backend("cuda-simt", "cpu", "op", emulated=True, long_shapes=[(4, 5000), (2, 16385), (50000,)], n_steps=2),
        Backend("cuda", "cuda", "op", long_shapes=[(4, 5000), (2, 16385), (3, 70000), (200000,)]),
    ]


BACKENDS = backends()
BACKEND_IDS = [b.name for b in BACKENDS]
