"""Fuzzing aids: random calls of the step operator, described by plain literals, and the
property every call must have (tests/test_fuzz_*.py generate the cases).

A case is a dict of plain Python values (a *spec*). `operator_source(spec)` renders it as a
self-contained Python snippet that builds the call's tensors with torch and makes the call
through `check_operator_call`; the fuzzer runs exactly that snippet (`run_source`), so the
snippet printed for a failing case (`reproducer`) is by construction what failed.

The property (`check_operator_call`): a call either
- matches the reference run in float64 on copies of its inputs, within the tolerances of
  docs/rule.md ("Numerics and tolerances", with the non-finite rule where NaN or inf
  appear), leaving its grads and every byte around its tensors as they were; or
- raises a clear refusal (`refusal_problem`) with every byte of every storage it was given
  unchanged.
Which of the two is due is decided beforehand by `operator_faults`, an independent reading
of the operator's contract: a valid call must not be refused and an invalid one must not be
computed.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import ops
from . import testing as T
from .ops import StepLists
from .reference import neptune_step_reference_multi

DTYPE_NAMES = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64,
    "int32": torch.int32, "int64": torch.int64, "bool": torch.bool, "complex64": torch.complex64,
}
LIST_NAMES = StepLists._fields  # params, grads, exp_avgs, exp_avg_sqs, steps
SINGULAR = {"params": "param", "grads": "grad", "exp_avgs": "exp_avg", "exp_avg_sqs": "exp_avg_sq", "steps": "step"}
HYPER_RANGES = {"lr": ">= 0", "beta1": "[0, 1)", "beta2": "[0, 1)", "eps": "> 0", "weight_decay": ">= 0",
                "clip": ">= 0"}
# A refusal states what is valid: one of these words (case-insensitive) is in its message.
REQUIREMENT_WORDS = ("must", "valid", "expected", "support", "need", "only")


# -- building tensors --------------------------------------------------------------------------


def values(n: int, seed: int, dtype: str = "float32", kind: str = "randn", scale: float = 1.0,
           special=(), zeros: float = 0.0, device: str = "cpu") -> Tensor:
    """A 1-D buffer of n elements: seeded random values (`kind` randn, or rand for
    non-negative ones) times `scale`, a fraction `zeros` of exact zeros, and `special`
    values [(index, "nan" | "inf" | "-inf")]. On the meta device: no values."""
    dt = DTYPE_NAMES[dtype]
    if device == "meta":
        return torch.empty(n, dtype=dt, device="meta")
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand if kind == "rand" else torch.randn)(n, generator=gen, dtype=torch.float64) * scale
    if zeros:
        x[torch.rand(n, generator=gen) < zeros] = 0
    for i, what in special:
        x[i % max(n, 1)] = float(what)
    if dt.is_complex:
        return x.to(dt)
    return x.to(dt) if dt.is_floating_point else x.round().to(dt)


def edge_safe_(lists: StepLists, hyper: dict) -> None:
    """Moves the gradients away from the rule's discontinuities (testing.make_grads), each
    for its own param, state and grad_scale; a grad whose storage another argument shares
    is left alone (changing it would change that argument too)."""
    ptrs = {}
    for lst in lists:
        for t in lst:
            if t.device.type != "meta" and t.layout == torch.strided:
                ptrs.setdefault(t.untyped_storage().data_ptr(), []).append(t)
    gs = hyper.get("grad_scale")
    gs = float(gs) if isinstance(gs, Tensor) and gs.numel() == 1 and gs.device.type != "meta" else 1.0
    if not (math.isfinite(gs) and gs != 0):
        return
    clip, beta1 = hyper.get("clip"), hyper.get("beta1")
    if not isinstance(clip, float) or not isinstance(beta1, float) or not (clip >= 0 and 0 <= beta1 < 1):
        return
    gmul = (-1.0 if hyper.get("maximize") else 1.0) / gs
    for p, g, m in zip(lists.params, lists.grads, lists.exp_avgs):
        usable = all(t.device.type == "cpu" and t.layout == torch.strided and t.dtype.is_floating_point
                     and not t.dtype == torch.float64 and t.shape == p.shape and _dense(t) for t in (p, g, m))
        if not usable or len(ptrs.get(g.untyped_storage().data_ptr(), ())) > 1 or p.numel() == 0:
            continue
        work = g.clone()
        T._edge_safe_(p, work, m, clip, beta1, gmul)
        g.copy_(work)


def _lit(x) -> str:
    """A Python literal for a plain value (floats that repr cannot spell included)."""
    if isinstance(x, float) and not math.isfinite(x):
        return f"float('{x}')"
    if isinstance(x, tuple):
        return "(" + "".join(_lit(v) + ", " for v in x) + ")"
    if isinstance(x, list):
        return "[" + ", ".join(_lit(v) for v in x) + "]"
    return repr(x)


def _scalar_tensor_source(t: dict) -> str:
    """torch code for {"value", "dtype", "shape", "device"} (a step, lr, grad_scale, ...)."""
    return (f"torch.full({_lit(tuple(t['shape']))}, {_lit(t['value'])}, dtype=torch.{t['dtype']}, "
            f"device={t.get('device', 'cpu')!r})")


def operator_source(spec: dict) -> str:
    """The self-contained snippet of an operator case (see the module docstring).

    spec: backend (a testing.BACKENDS name), call ("wrapper": neptune_ext.neptune_step_ /
    ops.neptune_step_simt_; "packet": the torch.ops overload packet), schedule (emulator),
    buffers [kwargs of `values`], tensors [{buf, shape, stride, offset, sparse}], steps
    [scalar tensor specs], lists {params, grads, exp_avgs, exp_avg_sqs: tensor indices;
    steps: step indices}, hyper {lr (a float or {"tensor": spec}), beta1, ..., grad_scale,
    found_inf (None or a scalar tensor spec)}, edge_safe (bool).
    """
    out = ["import torch", "from neptune_ext import fuzzing", "from neptune_ext.ops import StepLists", ""]
    for k, b in enumerate(spec["buffers"]):
        args = ", ".join(f"{key}={_lit(v)}" for key, v in b.items())
        out.append(f"buf{k} = fuzzing.values({args})")
    for k, t in enumerate(spec["tensors"]):
        line = f"t{k} = buf{t['buf']}.as_strided({_lit(tuple(t['shape']))}, {_lit(tuple(t['stride']))}, {t['offset']})"
        out.append(line + (".to_sparse()" if t.get("sparse") else ""))
    for k, s in enumerate(spec["steps"]):
        out.append(f"s{k} = {_scalar_tensor_source(s)}")
    L = spec["lists"]
    out.append("lists = StepLists(")
    for name in LIST_NAMES:
        prefix = "s" if name == "steps" else "t"
        out.append(f"    [{', '.join(prefix + str(i) for i in L[name])}],  # {name}")
    out.append(")")
    hyper = []
    for key, v in spec["hyper"].items():
        if isinstance(v, dict):
            hyper.append(f"{key}={_scalar_tensor_source(v['tensor'] if 'tensor' in v else v)}")
        else:
            hyper.append(f"{key}={_lit(v)}")
    out.append(f"hyper = dict({', '.join(hyper)})")
    if spec.get("edge_safe"):
        out.append("fuzzing.edge_safe_(lists, hyper)")
    out.append(f"fuzzing.check_operator_call({spec['backend']!r}, {spec['call']!r}, lists, hyper, "
               f"schedule={spec.get('schedule', 0)})")
    return "\n".join(out) + "\n"


def _tensor_source(t: dict) -> str:
    """{"buf": values() kwargs, "shape", "stride", "offset", "param", "sparse"} as torch code."""
    args = ", ".join(f"{k}={_lit(v)}" for k, v in t["buf"].items())
    code = f"fuzzing.values({args}).as_strided({_lit(tuple(t['shape']))}, " \
           f"{_lit(tuple(t['stride']))}, {t['offset']})"
    if t.get("sparse"):
        code += ".to_sparse()"
    return f"torch.nn.Parameter({code})" if t.get("param") else code


def _value_source(v) -> str:
    if isinstance(v, dict) and "tensor" in v:
        return _scalar_tensor_source(v["tensor"])
    return _lit(v)


def optimizer_source(spec: dict) -> str:
    """The self-contained snippet of an optimizer case (tests/test_fuzz_optimizer.py draws
    the specs): params, per-step grads, groups, defaults, scaler, after_init, backend."""
    out = ["import torch", "from neptune_ext import fuzzing", ""]
    for i, p in enumerate(spec["params"]):
        out.append(f"w{i} = {_tensor_source(p)}")
    for k, step in enumerate(spec["grads"]):
        for i, g in enumerate(step):
            if g is not None:
                out.append(f"g{k}_{i} = {_tensor_source(g)}")
    out.append("groups = [")
    for g in spec["groups"]:
        items = [f"params=[{', '.join(f'w{i}' for i in g['params'])}]"]
        items += [f"{k}={_value_source(v)}" for k, v in g.items() if k != "params"]
        out.append(f"    dict({', '.join(items)}),")
    out.append("]")
    out.append(f"defaults = dict({', '.join(f'{k}={_value_source(v)}' for k, v in spec['defaults'].items())})")
    rows = ", ".join("[" + ", ".join("None" if g is None else f"g{k}_{i}" for i, g in enumerate(step)) + "]"
                     for k, step in enumerate(spec["grads"]))
    out.append(f"grads = [{rows}]")
    scaler = spec.get("scaler")
    out.append("scaler = " + ("None" if scaler is None else
                              "dict(" + ", ".join(f"{k}={_value_source(v)}" for k, v in scaler.items()) + ")"))
    out.append("after_init = [" + ", ".join(f"({g}, {k!r}, {_value_source(v)})" for g, k, v in spec["after_init"])
               + "]")
    out.append(f"fuzzing.check_optimizer_case({spec['backend']!r}, groups, defaults, grads, scaler, after_init)")
    return "\n".join(out) + "\n"


def checkpoint_source(spec: dict) -> str:
    """The self-contained snippet of a checkpoint case (tests/test_fuzz_checkpoint.py)."""
    out = ["import torch", "from neptune_ext import fuzzing", ""]
    out.append("params = [")
    for p in spec["params"]:
        out.append(f"    {_tensor_source(p)},")
    out.append("]")
    args = ", ".join(f"{k}={_lit(spec[k])}" for k in ("groups", "source", "source_kwargs", "source_steps",
                                                       "target_kwargs", "target_steps", "mutations", "seed"))
    out.append(f"fuzzing.check_checkpoint_case({spec['backend']!r}, params, {args})")
    return "\n".join(out) + "\n"


def run_source(source: str) -> dict:
    """Runs a snippet as a script would (its own namespace); returns the namespace."""
    namespace = {"__name__": "__fuzz_case__"}
    exec(compile(source, "<fuzz case>", "exec"), namespace)
    return namespace


def reproducer(source: str, what: str) -> str:
    """The snippet as printed for a failing case."""
    return (f"# neptune_ext fuzz reproducer: {what}\n# run from the repository root: python repro.py "
            "(raises AssertionError while the failure is there)\n" + source)


# -- the expected outcome ------------------------------------------------------------------------


@dataclass
class Fault:
    """Why a call must be refused: `names` are the alternative spellings of the argument a
    clear refusal names (each a tuple of substrings that must all be in the message);
    `valid`: the valid range, which must be in the message too, when the contract spells
    one (hyperparameters). `may`: either a clear refusal or a result that matches."""

    what: str
    names: list = field(default_factory=list)
    valid: str | None = None
    may: bool = False


def _arg(name: str, i: int) -> list:
    """Ways to name element i of a tensor list: 'grads[3]', or 'params[3]' and 'grad'."""
    alts = [(f"{name}[{i}]",)]
    if name != "params":
        alts.append((f"params[{i}]", SINGULAR[name]))
    return alts


def _non_overlapping_and_dense(t: Tensor) -> bool:
    """The elements fill one span of memory, in any dim order (size-1 dims aside)."""
    expected = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _dense(t: Tensor) -> bool:
    return t.layout == torch.strided and (t.numel() == 0 or _non_overlapping_and_dense(t))


def units_are_spans(p: Tensor) -> bool:
    """csrc/args.h's rule, read again: dense, and dim 0 outermost when it has several units."""
    if p.numel() == 0:
        return True
    if not _non_overlapping_and_dense(p):
        return False
    return p.dim() < 2 or p.shape[0] <= 1 or p.stride(0) == p.numel() // p.shape[0]


def same_layout(a: Tensor, b: Tensor) -> bool:
    """Equal sizes address the same element offsets: equal strides where a size exceeds 1."""
    return a.shape == b.shape and all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def _extent(t: Tensor) -> tuple[int, int] | None:
    if t.device.type == "meta" or t.layout != torch.strided or t.numel() == 0:
        return None
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def operator_faults(emulated: bool, lists: StepLists, hyper: dict) -> list[Fault]:
    """What the operator must refuse in this call (empty: it must compute it)."""
    F: list[Fault] = []
    lr = hyper["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            F.append(Fault("lr with several elements", [("lr",)]))
        elif lr.is_complex():
            F.append(Fault("complex lr", [("lr",)]))
        elif lr.device.type == "meta":
            F.append(Fault("lr on meta", [("lr",)]))
        elif not emulated and not float(lr) >= 0:  # a device lr is read by the kernels, unchecked
            F.append(Fault("lr out of range", [("lr",)], HYPER_RANGES["lr"]))
    elif not lr >= 0:
        F.append(Fault("lr out of range", [("lr",)], HYPER_RANGES["lr"]))
    for name in ("beta1", "beta2"):
        if not 0 <= hyper[name] < 1:
            F.append(Fault(f"{name} out of range", [(name,)], HYPER_RANGES[name]))
    if not hyper["eps"] > 0:
        F.append(Fault("eps out of range", [("eps",)], HYPER_RANGES["eps"]))
    for name in ("weight_decay", "clip"):
        if not hyper[name] >= 0:
            F.append(Fault(f"{name} out of range", [(name,)], HYPER_RANGES[name]))
    for name in ("grad_scale", "found_inf"):
        t = hyper.get(name)
        if t is not None and (t.numel() != 1 or t.dtype != torch.float32 or t.device.type != "cpu"):
            F.append(Fault(f"bad {name}", [(name,)]))

    n = len(lists.params)
    if any(len(lst) != n for lst in lists):
        F.append(Fault("lists of different lengths", [("same length",)]))
        return F
    all_meta = all(t.device.type == "meta" for lst in lists for t in lst)
    for i in range(n):
        p, g, m, v, s = (lst[i] for lst in lists)
        if g.layout != torch.strided:  # (before the dtype: the operator may check either first)
            F.append(Fault("sparse grad", _arg("grads", i)))
        if p.is_complex() or p.dtype not in T.DTYPES:
            F.append(Fault("param dtype", _arg("params", i)))
            continue
        devices = [t.device.type for t in (p, g, m, v, s)]
        if any(d != "cpu" for d in devices) and not all_meta:
            F.append(Fault("device", [a for name, d in zip(LIST_NAMES, devices) if d != "cpu" for a in _arg(name, i)]
                           + [(f"params[{i}]", "device")]))
        if g.dtype != p.dtype:
            F.append(Fault("grad dtype", _arg("grads", i)))
        if not (m.dtype == v.dtype and m.dtype in T.STATE_DTYPES):
            F.append(Fault("state dtype", _arg("exp_avgs", i) + _arg("exp_avg_sqs", i)))
        if s.dtype != torch.float32 or s.numel() != 1:
            F.append(Fault("step", _arg("steps", i)))
        bad_shape = [name for name, t in zip(LIST_NAMES[1:4], (g, m, v)) if t.shape != p.shape]
        if bad_shape:
            F.append(Fault("shape", [a for name in bad_shape for a in _arg(name, i)] + [(f"params[{i}]", "shape")]))
            continue
        if p.numel() == 0:
            continue
        if not units_are_spans(p):
            F.append(Fault("param layout", _arg("params", i)))
            continue
        bad_strides = [name for name, t in zip(LIST_NAMES[1:4], (g, m, v))
                       if t.layout == torch.strided and not same_layout(t, p)]
        if bad_strides:
            F.append(Fault("strides", [a for name in bad_strides for a in _arg(name, i)]
                           + [(f"params[{i}]", "strides")]))
    if all_meta:  # a meta call computes nothing, and its fake implementation checks devices only
        for f in F:
            f.may = True
        return F
    # Written tensors may share no memory with any other argument (shared steps included).
    spans = []
    for name, lst in zip(LIST_NAMES, lists):
        for i, t in enumerate(lst):
            e = _extent(t)
            if e is not None and _dense(t):
                spans.append((e[0], e[1], name, i))
    spans.sort()
    for a in range(len(spans)):
        for b in range(a + 1, len(spans)):
            if spans[b][0] >= spans[a][1]:
                break
            (_, _, na, ia), (_, _, nb, ib) = spans[a], spans[b]
            if na != "grads" or nb != "grads":
                F.append(Fault(f"{na}[{ia}] overlaps {nb}[{ib}]", _arg(na, ia) + _arg(nb, ib)))
    return F


def refusal_problem(exc: BaseException, faults: list[Fault]) -> str | None:
    """None if `exc` is a clear refusal of a call with these faults, else what it lacks.

    Clear: a ValueError, TypeError or RuntimeError (not NotImplementedError, the
    dispatcher's "no kernel"), whose message names the argument of one of the faults (all
    substrings of one of its spellings), states what is valid (one of REQUIREMENT_WORDS),
    and, for a hyperparameter, spells its valid range (e.g. ">= 0", "[0, 1)")."""
    if not isinstance(exc, (ValueError, TypeError, RuntimeError)) or isinstance(exc, NotImplementedError):
        return f"a {type(exc).__name__}, not a ValueError, TypeError or RuntimeError"
    msg = str(exc)
    named = [f for f in faults if any(all(s in msg for s in alt) for alt in f.names)]
    if not named:
        return f"names none of {[f.names for f in faults]}"
    if not any(w in msg.lower() for w in REQUIREMENT_WORDS):
        return f"does not say what is valid (none of {REQUIREMENT_WORDS})"
    if not any(f.valid is None or f.valid in msg for f in named):
        return f"does not spell the valid range {[f.valid for f in named]}"
    return None


# -- snapshots ---------------------------------------------------------------------------------


def _storages(tensors) -> dict[int, Tensor]:
    """Every distinct storage of the tensors (meta and sparse ones have no bytes to keep)."""
    out = {}
    for t in tensors:
        if isinstance(t, Tensor) and t.device.type != "meta" and t.layout == torch.strided:
            st = t.untyped_storage()
            out.setdefault(st.data_ptr(), st)
    return out


def _storage_bytes(st) -> Tensor:
    return torch.empty(0, dtype=torch.uint8).set_(st, 0, (st.nbytes(),), (1,)).clone()


def snapshot(tensors) -> dict[int, Tensor]:
    """The bytes of every storage the tensors live in (NaN payloads included)."""
    return {ptr: _storage_bytes(st) for ptr, st in _storages(tensors).items()}


def changed_bytes(tensors, before: dict[int, Tensor], allowed=()) -> str | None:
    """None if every storage holds the bytes it held (outside the elements of the tensors in
    `allowed`, the written ones), else where it differs."""
    for ptr, st in _storages(tensors).items():
        now = _storage_bytes(st)
        diff = now != before[ptr]
        if allowed:
            mask = torch.zeros(now.numel(), dtype=torch.bool)
            for t in allowed:
                if t.device.type != "meta" and t.layout == torch.strided and t.numel() and \
                        t.untyped_storage().data_ptr() == ptr:
                    es = t.element_size()
                    pos = torch.arange(now.numel() // es).as_strided(t.shape, t.stride(), t.storage_offset())
                    idx = (pos.reshape(-1, 1) * es + torch.arange(es)).reshape(-1)
                    mask[idx] = True
            diff &= ~mask
        if diff.any():
            return f"storage {ptr:#x}: {int(diff.sum())} bytes changed, the first at byte {int(diff.nonzero()[0])}"
    return None


# -- the operator's property ---------------------------------------------------------------------


def _backend(name: str) -> T.Backend:
    for b in T.BACKENDS:
        if b.name == name:
            return b
    raise ValueError(f"no backend {name!r}; valid: {T.BACKEND_IDS}")


def _call(backend: T.Backend, call: str, lists: StepLists, hyper: dict, schedule: int) -> None:
    if backend.emulated:
        if call == "packet":
            torch.ops.neptune_ext._neptune_step_simt_(*lists, **hyper, schedule=schedule)
        else:
            ops.neptune_step_simt_(*lists, **hyper, schedule=schedule)
        return
    with T._env(T.CPU_ISA_ENV, backend.kernel_set):
        if call == "packet":
            torch.ops.neptune_ext.neptune_step_(*lists, **hyper)
        else:
            ops.neptune_step_(*lists, **hyper)


def _same_nonfinite(a: Tensor, b: Tensor) -> bool:
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(torch.isinf(a), torch.isinf(b))


def _assert_close(kind: str, actual: Tensor, expected: Tensor, what: str, expected32=None) -> None:
    """actual against the float64 reference's `expected`, within docs/rule.md's tolerances.
    expected32 (a callable, called only if needed): the same tensor from the rule computed
    in float32, the compiled operators' precision. Element by element, NaN and inf may sit
    where it puts them instead (an update beyond float32's range meeting an infinite weight,
    or a masked element: inf * 0 = NaN where float64 keeps a finite or infinite value;
    docs/rule.md, "Non-finite values"). Judged per element because the operators and the
    float32 reference order the update's products differently, so near float32's edge each
    overflows on some elements the other does not. The elements finite in both are still
    compared with the float64 result."""
    if not (torch.isfinite(expected).all() and torch.isfinite(actual).all()):
        if expected32 is not None and not _same_nonfinite(actual, expected):
            a, e, e32 = actual.detach().cpu(), expected.detach().cpu(), expected32().detach().cpu()
            same64 = _same_class(a, e)
            same32 = _same_class(a, e32) & ~torch.isfinite(a)  # only its non-finite places
            ok = same64 | same32
            assert ok.all(), (f"{what}: {int((~ok).sum())} elements non-finite where neither the float64 nor the "
                              f"float32 result has them (first at flat index {int((~ok).flatten().nonzero()[0])})")
            both = torch.isfinite(a) & torch.isfinite(e)
            T.assert_param_close(a[both], e[both], what + " (non-finite where float32 has them)")
            return
        T.assert_nonfinite_close(actual, expected, what)
    elif kind == "params":
        T.assert_param_close(actual, expected, what)
    elif expected.dtype == torch.bfloat16:
        T.assert_bf16_state_close(actual, expected, what)
    else:
        T.assert_state_close(actual, expected, what)


def _same_class(a: Tensor, b: Tensor) -> Tensor:
    """Per element: both finite, both NaN, or the same infinity."""
    return (torch.isfinite(a) & torch.isfinite(b)) | (torch.isnan(a) & torch.isnan(b)) | \
        (torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b)))


def _reference(inputs: StepLists, hyper: dict, compute_dtype) -> StepLists:
    ref = StepLists(*[[t.clone() for t in lst] for lst in inputs])
    neptune_step_reference_multi(*ref, **{k: (v.clone() if isinstance(v, Tensor) else v) for k, v in hyper.items()},
                                 compute_dtype=compute_dtype)
    return ref


def _assert_lists_close(actual: StepLists, expected: StepLists, expected32=None) -> None:
    """expected32: a callable giving the reference's StepLists computed in float32 (_assert_close)."""
    for k, name in enumerate(LIST_NAMES):
        for i, (a, e) in enumerate(zip(actual[k], expected[k])):
            what = f"{name}[{i}] {tuple(a.shape)} {a.dtype}"
            if name == "steps":
                assert torch.equal(a, e), f"{what}: {a} != {e}"
            elif name != "grads":
                _assert_close(name, a, e, what, expected32 and (lambda k=k, i=i: expected32()[k][i]))


def check_operator_call(backend_name: str, call: str, lists: StepLists, hyper: dict, schedule: int = 0) -> str:
    """Makes the call and checks the property (module docstring); returns "computed" or
    "refused", or raises AssertionError saying how the property failed."""
    backend = _backend(backend_name)
    why = backend.missing()
    assert why is None, f"backend {backend_name}: {why}"
    faults = operator_faults(backend.emulated, lists, hyper)
    must = [f for f in faults if not f.may]
    every = [t for lst in lists for t in lst] + [v for v in hyper.values() if isinstance(v, Tensor)]
    before = snapshot(every)
    inputs = None
    if not faults and not all(t.device.type == "meta" for lst in lists for t in lst):
        # clones keep the layout: the bf16 state's rounding bits follow memory order
        inputs = StepLists(*[[t.clone() for t in lst] for lst in lists])
        hyper_copy = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in hyper.items()}
        ref = _reference(inputs, hyper_copy, torch.float64)
        ref32 = functools.lru_cache(maxsize=None)(lambda: _reference(inputs, hyper_copy, torch.float32))
    try:
        _call(backend, call, lists, hyper, schedule)
    except Exception as e:  # noqa: BLE001 - judged below
        assert faults, f"refused a valid call: {type(e).__name__}: {e}"
        problem = refusal_problem(e, faults)
        assert problem is None, f"unclear refusal ({problem}): {type(e).__name__}: {e}"
        changed = changed_bytes(every, before)
        assert changed is None, f"the refused call wrote: {changed} ({type(e).__name__}: {e})"
        return "refused"
    assert not must, f"accepted an invalid call; expected a refusal for: {[f.what for f in must]}"
    if inputs is None:
        return "computed"
    _assert_lists_close(lists, ref, ref32)
    written = [t for k in (0, 2, 3, 4) for t in lists[k]]
    changed = changed_bytes(every, before, allowed=written)
    assert changed is None, f"wrote outside its params, state and steps (a grad or a gap): {changed}"
    return "computed"


# -- the optimizer's property --------------------------------------------------------------------

OPTIMIZER_DEFAULTS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, clip=0.1, cautious=True,
                          maximize=False)


def _valid_number(x, ok) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and ok(x)


def hyper_faults(group: dict) -> list[Fault]:
    """What Neptune must refuse in a param group's settings (docs/rule.md, "Hyperparameters";
    the AdamW keywords of Neptune's docstring), read independently of validate_hyperparameters."""
    F = []
    lr = group.get("lr", OPTIMIZER_DEFAULTS["lr"])
    if isinstance(lr, Tensor):
        ok = lr.numel() == 1 and lr.is_floating_point() and lr.device.type != "meta" and float(lr) >= 0
    else:
        ok = _valid_number(lr, lambda v: v >= 0)
    if not ok:
        F.append(Fault("lr", [("lr",)], ">= 0"))
    betas = group.get("betas", OPTIMIZER_DEFAULTS["betas"])
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        F.append(Fault("betas", [("betas",)]))
    else:
        for i, b in enumerate(betas):
            if not _valid_number(b, lambda v: 0 <= v < 1):
                F.append(Fault(f"betas[{i}]", [(f"betas[{i}]",)], "[0, 1)"))
    for name, ok, valid in (("eps", lambda v: v > 0, "> 0"), ("weight_decay", lambda v: v >= 0, ">= 0"),
                            ("clip", lambda v: v >= 0, ">= 0")):
        if not _valid_number(group.get(name, OPTIMIZER_DEFAULTS[name]), ok):
            F.append(Fault(name, [(name,)], valid))
    for flag in ("cautious", "maximize", "skip_nonfinite", "capturable"):
        if not isinstance(group.get(flag, False), bool):
            F.append(Fault(flag, [(flag,)]))
    if group.get("implementation", "auto") not in ("auto", "op", "reference"):
        F.append(Fault("implementation", [("implementation",)]))
    if group.get("differentiable", False) is not False:
        F.append(Fault("differentiable", [("differentiable",)]))
    return F


def _set_grad(p: Tensor, g: Tensor | None) -> None:
    """p.grad = g; a grad that autograd's setter refuses (another dtype or shape) is put there
    the way code that writes .data gets it there."""
    if g is None:
        p.grad = None
        return
    try:
        p.grad = g
        return
    except RuntimeError:
        pass
    if g.shape == p.shape and hasattr(p, "grad_dtype"):  # torch >= 2.10: grads of any dtype allowed
        p.grad_dtype = None
        p.grad = g
        return
    p.grad = torch.zeros_like(p)
    p.grad.data = g


def _param_faults(p: Tensor, g: Tensor | None, implementation: str, index: str) -> list[Fault]:
    if g is None:
        return []
    if g.layout != torch.strided:
        return [Fault("sparse grad", [("sparse",)])]
    if p.is_complex():
        return [Fault("complex param", [("complex",)])]
    if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
        return [Fault("grad unlike its param", [(index, "grad"), ("grad", "dtype"), ("grad", "shape")])]
    if p.dtype == torch.float64 and implementation == "op":
        return [Fault("float64 with implementation='op'", [("float64",)])]
    # a param may be both: either refusal is right (the optimizer checks overlap first)
    faults = []
    if p.device.type == "meta":
        faults.append(Fault("a param with no data", [("meta",)]))
    if p.layout == torch.strided and p.numel() and not _no_internal_overlap(p):
        faults.append(Fault("param with overlapping elements", [("share memory",), (index,)]))
    return faults


def _no_internal_overlap(t: Tensor) -> bool:
    """No two elements of t at one address (every offset computed: exact)."""
    offsets = torch.zeros((), dtype=torch.int64)
    for n, st in zip(t.shape, t.stride()):
        offsets = (offsets.unsqueeze(-1) + torch.arange(n) * st)
    return offsets.unique().numel() == t.numel()


def _state_of(opt, p) -> dict:
    st = opt.state.get(p, {})
    return {k: (v.detach().clone() if isinstance(v, Tensor) else v) for k, v in st.items()}


def check_optimizer_case(backend_name: str, groups: list, defaults: dict, grads: list, scaler: dict | None = None,
                         after_init: list = ()) -> str:
    """Builds Neptune(groups, **defaults) on the backend (its implementation, kernel set or
    emulated CUDA operator), sets `after_init` [(group, key, value)] on its groups (as a
    scheduler or a user would), then for each step k sets grads[k] (one per param, in the
    groups' order, None for none) and steps. Each construction and step either refuses
    clearly, with every param, grad and existing state tensor bitwise unchanged, or does
    what the reference does from the same params and state: for every param with a grad,
    neptune_step_reference in float64 (state in the group's state dtype, float64 for
    float64 params), skipped as GradScaler's found_inf and skip_nonfinite say."""
    import pytest

    from .optimizer import Neptune
    from .reference import neptune_step_reference

    backend = _backend(backend_name)
    params = list(dict.fromkeys(p for g in groups for p in g["params"]))  # in order, each once
    with pytest.MonkeyPatch.context() as mp:
        if backend.is_op:
            why = backend.missing()
            assert why is None, f"backend {backend_name}: {why}"
            if backend.kernel_set is not None:
                mp.setenv(T.CPU_ISA_ENV, backend.kernel_set)
            if backend.emulated:
                mp.setattr(ops, "neptune_step_", ops.neptune_step_simt_)
        faults = hyper_faults(defaults) + [f for g in groups for f in hyper_faults({**defaults, **g})]
        faults += [Fault("a param twice in a group", [("same param", "positions")]) for g in groups
                   if len({id(p) for p in g["params"]}) != len(g["params"])]
        before = snapshot(params)
        try:
            opt = Neptune(groups, **defaults)
        except Exception as e:  # noqa: BLE001
            assert faults, f"Neptune(...) refused valid settings: {type(e).__name__}: {e}"
            problem = refusal_problem(e, faults)
            assert problem is None, f"unclear refusal ({problem}): {type(e).__name__}: {e}"
            assert changed_bytes(params, before) is None, "a refused construction wrote"
            return "refused"
        assert not faults, f"Neptune(...) accepted invalid settings: {[f.what for f in faults]}"
        for gi, key, value in after_init:
            opt.param_groups[gi][key] = value
        for k, step_grads in enumerate(grads):
            for p, g in zip(params, step_grads):
                _set_grad(p, g)
            if scaler is not None:
                opt.grad_scale = scaler.get("grad_scale")
                opt.found_inf = scaler.get("found_inf")
            outcome = _check_optimizer_step(opt, params, k, neptune_step_reference)
            if outcome == "refused":
                return outcome
    return "computed"


def _group_hyper(group: dict) -> dict:
    hyper = dict(lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
                 weight_decay=group["weight_decay"], eps=group["eps"], clip=group["clip"],
                 cautious=group["cautious"], maximize=group["maximize"])
    return {k: (float(v) if isinstance(v, Tensor) else v) for k, v in hyper.items()}


def _check_optimizer_step(opt, params, k, neptune_step_reference) -> str:
    from .bf16_state import STATE_DTYPES

    faults = []
    index = {id(p): i for i, p in enumerate(params)}
    for group in opt.param_groups:
        if any(p.grad is not None for p in group["params"]):  # a group with nothing to step is not read
            faults += hyper_faults(group)
        for p in group["params"]:
            faults += _param_faults(p, p.grad, group["implementation"], f"params[{index[id(p)]}]")
    states = {id(p): _state_of(opt, p) for p in params}
    grad_scale, found_inf = getattr(opt, "grad_scale", None), getattr(opt, "found_inf", None)
    # Inputs of the reference's step: the params, grads and state as they are, the grads
    # made edge-safe for them (the optimizer gets the same grads).
    inputs = []  # (group, [(p, StepLists of one)])
    if not faults:
        for group in opt.param_groups:
            sdt = STATE_DTYPES[group["state_dtype"]]
            lists, owners = StepLists.empty(), []
            for p in dict.fromkeys(group["params"]):
                if p.grad is None or p.device.type == "meta":
                    continue
                st = states[id(p)]
                dt = torch.float64 if p.dtype == torch.float64 else sdt
                lists.append(p.detach().clone(), p.grad.clone(),
                             st["exp_avg"] if st else torch.zeros(p.shape, dtype=dt),
                             st["exp_avg_sq"] if st else torch.zeros(p.shape, dtype=dt),
                             st["step"] if st else torch.zeros(()))
                owners.append(p)
            edge_safe_(lists, {**_group_hyper(group), "grad_scale": grad_scale})
            for i, (p, g) in enumerate(zip(owners, lists.grads)):
                if any(st == 0 and n > 1 for st, n in zip(p.grad.stride(), p.grad.shape)):
                    lists.grads[i] = p.grad.clone()  # cannot be written: not made edge-safe
                elif not torch.equal(_bytes(p.grad), _bytes(g)):
                    p.grad.copy_(g)
            inputs.append((group, owners, lists))
    # skip_nonfinite's check (torch._amp_foreach_non_finite_check_and_unscale_ with a scale
    # of 1) writes its grads back: the values stay, a NaN's sign and payload do not (not fixed)
    nan_rewritten = [p.grad for g in opt.param_groups if g["skip_nonfinite"] for p in g["params"]
                     if p.grad is not None and p.grad.layout == torch.strided and p.grad.device.type != "meta"]
    nan_before = [g.clone() for g in nan_rewritten]
    everything = params + [p.grad for p in params if p.grad is not None] + \
        [v for st in (opt.state.get(p, {}) for p in params) for v in st.values() if isinstance(v, Tensor)]
    before = snapshot(everything)
    try:
        opt.step()
    except Exception as e:  # noqa: BLE001
        assert faults, f"step {k + 1}: refused a valid step: {type(e).__name__}: {e}"
        problem = refusal_problem(e, faults)
        assert problem is None, f"step {k + 1}: unclear refusal ({problem}): {type(e).__name__}: {e}"
        changed = changed_bytes(everything, before)
        assert changed is None, f"step {k + 1}: the refused step wrote: {changed} ({type(e).__name__}: {e})"
        for p in params:
            was, now = states[id(p)], _state_of(opt, p)
            if was:
                assert was.keys() == now.keys(), f"step {k + 1}: the refused step changed the state's keys"
                for key in was:
                    assert torch.equal(_bytes(was[key]), _bytes(now[key])), f"step {k + 1}: refused, but {key} changed"
        return "refused"
    must = [f for f in faults if not f.may]
    assert not must, f"step {k + 1}: accepted an invalid step; expected a refusal for {[f.what for f in must]}"
    grads = [p.grad for p in params if p.grad is not None]
    changed = changed_bytes(grads, before, allowed=params + nan_rewritten + [
        v for st in (opt.state.get(p, {}) for p in params) for v in st.values() if isinstance(v, Tensor)])
    assert changed is None, f"step {k + 1}: wrote a grad (or a gap next to a param): {changed}"
    for g, was in zip(nan_rewritten, nan_before):
        assert torch.equal(g.isnan(), was.isnan()) and torch.equal(g[~g.isnan()], was[~was.isnan()]), \
            f"step {k + 1}: skip_nonfinite changed a grad's values"
    for group, owners, lists in inputs:
        hyper = _group_hyper(group)
        skip = found_inf is not None and bool(found_inf.item())
        if group["skip_nonfinite"]:
            skip = skip or any(not torch.isfinite(g).all() for g in lists.grads)
        for p, w, g, m, v, s in zip(owners, *lists):
            st = opt.state[p]
            # The state in the layout the optimizer keeps it in (the bf16 state's rounding
            # bits follow memory order), with the values it had before the step.
            m, v = (torch.empty_strided(x.shape, st[key].stride(), dtype=x.dtype).copy_(x)
                    for x, key in ((m, "exp_avg"), (v, "exp_avg_sq")))
            s = s.clone()
            before_step = [t.clone() for t in (w, m, v, s)]

            @functools.lru_cache(maxsize=None)
            def in_float32(w0=before_step[0], g=g, m0=before_step[1], v0=before_step[2], s0=before_step[3]):
                w32, m32, v32, s32 = w0.clone(), m0.clone(), v0.clone(), s0.clone()
                if not skip:
                    neptune_step_reference(w32, g, m32, v32, s32, **hyper, grad_scale=grad_scale,
                                           compute_dtype=torch.float32)
                return w32, m32, v32

            if not skip:
                neptune_step_reference(w, g, m, v, s, **hyper, grad_scale=grad_scale, compute_dtype=torch.float64)
            what = f"step {k + 1} params[{index[id(p)]}] {tuple(p.shape)} {p.dtype}"
            wide = p.dtype == torch.float64  # stepped in float64 (no float32 alternative)
            _assert_close("params", p.detach(), w, what, None if wide else lambda f=in_float32: f()[0])
            _assert_close("state", st["exp_avg"], m, what + " exp_avg", None if wide else lambda f=in_float32: f()[1])
            _assert_close("state", st["exp_avg_sq"], v, what + " exp_avg_sq",
                          None if wide else lambda f=in_float32: f()[2])
            assert torch.equal(st["step"], s), f"{what}: step {st['step']} != {s}"
    return "computed"


def _bytes(t: Tensor) -> Tensor:
    if t.device.type == "meta":
        return torch.empty(0)
    # a fresh contiguous copy: a one-element view may keep any stride, which view() refuses
    return t.detach().cpu().clone(memory_format=torch.contiguous_format).reshape(-1).view(torch.uint8)


# -- checkpoints -----------------------------------------------------------------------------------

# Mutations of a state dict: each (name, *args) -> what it does; the faults it makes
# (empty: the dict stays loadable, its meaning unchanged or documented).
NEPTUNE_KEYS = ("maximize", "clip", "cautious", "state_dtype", "foreach", "fused", "differentiable", "capturable",
                "implementation", "skip_nonfinite")


def _grads_for(params, seed: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.1).to(p.dtype) for p in params]


def _stepped(opt, params, n_steps: int, seed: int) -> None:
    for k in range(n_steps):
        for p, g in zip(params, _grads_for(params, seed + k)):
            p.grad = g
        opt.step()


def source_state_dict(kind: str, params, groups, kwargs: dict, steps: int, seed: int) -> dict:
    """The state dict of an optimizer of `kind` ("neptune", "adamw") with `kwargs`, over
    copies of the params grouped as `groups` (lists of indices), after `steps` steps."""
    from .optimizer import Neptune

    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    pg = [{"params": [copies[i] for i in g]} for g in groups]
    opt = (Neptune if kind == "neptune" else torch.optim.AdamW)(pg, **kwargs)
    _stepped(opt, copies, steps, seed)
    return opt.state_dict()


def _param_state_entries(sd: dict):
    """[(saved id, state entry)] of the params in group order that have state."""
    return [(i, sd["state"][i]) for g in sd["param_groups"] for i in g.get("params", ()) if i in sd["state"]]


def mutate_state_dict(sd: dict, mutations) -> tuple[dict, list[Fault]]:
    """A changed deep copy of `sd` and the faults it has (see NEPTUNE_KEYS and the cases
    below). A mutation that finds nothing to change (no state yet) changes nothing."""
    import copy

    sd = copy.deepcopy(sd)
    F: list[Fault] = []
    keyed: dict = {}  # (entry, key) -> the fault of the last change of that value, or None
    moment_shapes: dict = {}  # (entry, key) -> the moment's shape before any change
    # group counts and sizes are judged on the final dict: a group added then dropped, or a
    # param added then removed, leaves a loadable dict
    sizes0 = [len(g.get("params", ())) for g in sd["param_groups"]] if isinstance(sd, dict) and isinstance(
        sd.get("param_groups"), list) else None
    for name, *args in mutations:
        entries = _param_state_entries(sd) if isinstance(sd, dict) and isinstance(sd.get("state"), dict) else []
        k = args[0] if args and isinstance(args[0], int) else 0
        entry = entries[k % len(entries)][1] if entries else None
        if name == "drop_top_key":
            del sd[args[0]]
            F.append(Fault(f"no {args[0]!r}", [(repr(args[0]),)]))
            return sd, F
        if name == "not_a_dict":
            return [sd], [Fault("not a dict", [("dict",)])]
        if name == "state_not_a_dict":
            sd["state"] = list(sd["state"].values())
            return sd, [Fault("'state' not a dict", [("'state'",)])]
        if ("group" in name) and not sd["param_groups"]:
            continue  # no group left to change
        if name == "extra_group":
            g = copy.deepcopy(sd["param_groups"][-1])
            g["params"] = [10_000 + i for i in range(len(g.get("params", ())))]
            sd["param_groups"].append(g)
        elif name == "drop_group":
            sd["param_groups"].pop()
        elif name == "group_extra_param":
            g = sd["param_groups"][k % len(sd["param_groups"])]
            if "params" not in g:
                continue
            g["params"].append(20_000)
        elif name == "group_missing_param":
            g = sd["param_groups"][k % len(sd["param_groups"])]
            if g.get("params"):
                g["params"].pop()
        elif name == "group_no_params":
            if sd["param_groups"][k % len(sd["param_groups"])].pop("params", None) is None:
                continue
            F.append(Fault("a group without 'params'", [("'params'",)]))
        elif name == "group_set":  # (group, key, value, valid)
            g, key, value, valid = args
            group = sd["param_groups"][g % len(sd["param_groups"])]
            group[key] = value
            keyed[id(group), key] = (group, key, None if valid else Fault(f"{key}={value!r}", [(key,)]))
        elif name == "group_drop_neptune_keys":
            for g in sd["param_groups"]:
                for key in NEPTUNE_KEYS:
                    g.pop(key, None)
        elif name == "junk_state_id":
            sd["state"][30_000] = {"step": torch.tensor(1.0)}
        elif entry is None or (not entry and name in ("step", "moment", "drop_state_key", "extra_state_key")):
            continue  # nothing to change (an empty entry stays one)
        elif name == "drop_param_state":
            del sd["state"][entries[k % len(entries)][0]]
        elif name == "empty_param_state":
            sd["state"][entries[k % len(entries)][0]] = {}
        elif name == "drop_state_key":
            key = args[1]
            if key in entry:
                del entry[key]
                keyed[id(entry), "no " + key] = (entry, None, Fault(f"no {key}", [(key,)]))
        elif name == "extra_state_key":
            entry[args[1]] = torch.zeros(())  # (an unknown key: a fault of the final dict, below)
        elif name == "step":  # (k, kind, valid)
            kind, valid = args[1], args[2]
            v = entry.get("step")
            try:
                v = float(v)
            except (TypeError, ValueError, RuntimeError, NotImplementedError):
                v = 3.0
            v = v if math.isfinite(v) and v >= 0 else 3.0
            entry["step"] = {
                "int": int(v), "float": float(v), "int64": torch.tensor(int(v)), "float64": torch.tensor(v).double(),
                "shape1": torch.tensor([v]), "nan": float("nan"), "negative": -1.0, "inf": torch.tensor(float("inf")),
                "string": "3", "none": None, "bool": True, "shape2": torch.tensor([v, v]),
                "complex": torch.tensor(v, dtype=torch.complex64), "meta": torch.tensor(v, device="meta"),
            }[kind]
            keyed[id(entry), "step"] = (entry, "step", None if valid else Fault(f"step {kind}", [("step",)]))
        elif name == "moment":  # (k, key, kind, valid)
            key, kind, valid = args[1], args[2], args[3]
            if key not in entry or not isinstance(entry[key], Tensor):
                continue
            v = entry[key]
            entry[key] = {
                "float16": lambda: v.to(torch.float16), "bfloat16": lambda: v.to(torch.bfloat16),
                "float64": lambda: v.double(), "transposed": lambda: v.t().contiguous().t() if v.dim() == 2 else v.clone(),
                "flat": lambda: v.reshape(-1).clone(), "broadcastable": lambda: v.reshape(-1)[:1].clone(),
                "longer": lambda: torch.cat([v.reshape(-1), v.reshape(-1)[:1]]),
                "int": lambda: v.to(torch.int32), "bool": lambda: v > 0, "complex": lambda: v.to(torch.complex64),
                "meta": lambda: v.to("meta"), "list": lambda: v.tolist(), "none": lambda: None,
            }[kind]()
            # judged on the final value (below): a valid change may make a bad moment good
            # (float16 of an int one) or leave it bad (float16 of a flat one)
            shape0 = moment_shapes.setdefault((id(entry), key), v.shape)
            keyed[id(entry), key] = (entry, key, None if _loadable_moment(entry[key], shape0)
                                     else Fault(f"{key} {kind}", [(key,)]))
    live = [id(e) for e in sd["state"].values()] if isinstance(sd, dict) and isinstance(sd.get("state"), dict) else []
    live += [id(g) for g in sd["param_groups"]] if isinstance(sd, dict) and isinstance(sd.get("param_groups"), list) else []
    if sizes0 is not None and all("params" in g for g in sd["param_groups"]):
        sizes = [len(g["params"]) for g in sd["param_groups"]]
        if len(sizes) != len(sizes0):
            F.append(Fault("an extra param group" if len(sizes) > len(sizes0) else "a param group fewer",
                           [("param groups",), ("parameter groups",)]))
        elif sizes != sizes0:
            F.append(Fault("a group with another number of params", [("param group", "params")]))
    # a change counts if its entry is still there (and the changed key, or the dropped one's absence)
    return sd, F + [f for e, key, f in keyed.values()
                    if f is not None and id(e) in live and (key in e if key else f.what[3:] not in e)]


def _loadable_moment(t, shape) -> bool:
    """A moment Neptune.load_state_dict takes: a real floating tensor of its param's shape
    with data (any float dtype and strides: it is converted)."""
    return (isinstance(t, Tensor) and t.is_floating_point() and t.device.type != "meta" and t.layout == torch.strided
            and t.shape == shape)


def well_formed(sd: dict, params) -> dict:
    """The plain equivalent of a loadable state dict: steps as float32 scalar tensors,
    moments as contiguous float32 (float64 for float64 params), empty entries dropped."""
    import copy

    sd = copy.deepcopy(sd)
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    for i, p in zip(ids, params):
        entry = sd["state"].get(i)
        if entry is None:
            continue
        if not entry:
            del sd["state"][i]
            continue
        entry["step"] = torch.tensor(float(entry["step"]), dtype=torch.float32)
        for key in ("exp_avg", "exp_avg_sq"):
            entry[key] = entry[key].to(torch.float64 if p.dtype == torch.float64 else torch.float32).contiguous()
    return sd


def _same(a, b, where="") -> str | None:
    """None if nested dicts / lists / tensors are equal (tensors bitwise, dtype and device
    included), else where they differ."""
    if type(a) is not type(b):
        return f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, Tensor):
        if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
            return f"{where}: {a.dtype} {tuple(a.shape)} {a.device} != {b.dtype} {tuple(b.shape)} {b.device}"
        return None if a.device.type == "meta" or torch.equal(_bytes(a), _bytes(b)) else f"{where}: values differ"
    if isinstance(a, dict):
        if set(a) != set(b):
            return f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            r = _same(a[k], b[k], f"{where}[{k!r}]")
            if r:
                return r
        return None
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return f"{where}: lengths {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            r = _same(x, y, f"{where}[{i}]")
            if r:
                return r
        return None
    if isinstance(a, float) and math.isnan(a) and math.isnan(b):
        return None
    return None if a == b else f"{where}: {a!r} != {b!r}"


def _optimizer_snapshot(opt) -> dict:
    import copy

    return {"state": {id(p): copy.deepcopy(st) for p, st in opt.state.items()},
            "param_groups": [{k: (copy.deepcopy(v) if k != "params" else [id(p) for p in v]) for k, v in g.items()}
                             for g in opt.param_groups]}


def check_checkpoint_case(backend_name: str, params, groups, source: str, source_kwargs: dict, source_steps: int,
                          target_kwargs: dict, target_steps: int, mutations, seed: int = 0) -> str:
    """Loads a changed state dict into a Neptune optimizer (on the backend) over copies of
    `params` grouped as `groups`, which was stepped `target_steps` times first. The state
    dict is that of a `source` optimizer ("neptune" or "adamw", with `source_kwargs`)
    stepped `source_steps` times, changed by `mutations` (mutate_state_dict). Either the
    load is refused clearly (refusal_problem), the optimizer's state and param groups
    unchanged (deep compare) and it steps as a twin that never tried; or it loads, leaves
    the dict it was given unchanged, holds what a twin holds after loading the dict's
    well-formed equivalent (well_formed), steps as that twin, bitwise, and its step
    matches the reference (as check_optimizer_case)."""
    import copy

    import pytest

    from .optimizer import Neptune
    from .reference import neptune_step_reference

    backend = _backend(backend_name)
    sd = source_state_dict(source, params, groups, source_kwargs, source_steps, seed)
    mutated, faults = mutate_state_dict(sd, mutations)
    if isinstance(mutated, dict) and isinstance(mutated.get("param_groups"), list):
        # AMSGrad's state (AdamW(amsgrad=True)) cannot be honoured
        if any(isinstance(g, dict) and g.get("amsgrad") is True for g in mutated["param_groups"]):
            faults.append(Fault("amsgrad=True", [("amsgrad",)]))
        if isinstance(mutated.get("state"), dict):
            extra = {k for _, e in _param_state_entries(mutated) if isinstance(e, dict) for k in e
                     if k not in ("step", "exp_avg", "exp_avg_sq")}
            faults += [Fault(f"state key {k}", [(str(k),)]) for k in extra]
    given = copy.deepcopy(mutated)
    with pytest.MonkeyPatch.context() as mp:
        if backend.is_op:
            if backend.kernel_set is not None:
                mp.setenv(T.CPU_ISA_ENV, backend.kernel_set)
            if backend.emulated:
                mp.setattr(ops, "neptune_step_", ops.neptune_step_simt_)
        kwargs = {**target_kwargs, "implementation": "auto" if backend.is_op else "reference"}

        def build():
            copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
            opt = Neptune([{"params": [copies[i] for i in g]} for g in groups], **kwargs)
            _stepped(opt, copies, target_steps, seed + 100)
            return copies, opt

        (ps, opt), (twin_ps, twin) = build(), build()
        before = _optimizer_snapshot(opt)
        try:
            opt.load_state_dict(mutated)
        except Exception as e:  # noqa: BLE001
            assert faults, f"refused a loadable state dict: {type(e).__name__}: {e}"
            problem = refusal_problem(e, faults)
            assert problem is None, f"unclear refusal ({problem}): {type(e).__name__}: {e}"
            diff = _same(_optimizer_snapshot(opt), before, "optimizer")
            assert diff is None, f"the refused load changed the optimizer: {diff} ({type(e).__name__}: {e})"
        else:
            assert not faults, f"loaded a state dict it must refuse: {[f.what for f in faults]}"
            diff = _same(mutated, given, "state_dict")
            assert diff is None, f"loading changed the dict it was given: {diff}"
            twin.load_state_dict(well_formed(given, ps))
            diff = _same({id(p): opt.state[p] for p in ps if opt.state.get(p)},  # an empty entry: no state
                         {id(p): twin.state[q] for p, q in zip(ps, twin_ps) if twin.state.get(q)}, "state")
            assert diff is None, f"loaded otherwise than its well-formed equivalent: {diff}"
            for i, (g, h) in enumerate(zip(opt.param_groups, twin.param_groups)):
                diff = _same({k: v for k, v in g.items() if k != "params"},
                             {k: v for k, v in h.items() if k != "params"}, f"param_groups[{i}]")
                assert diff is None, f"loaded otherwise than its well-formed equivalent: {diff}"
        # Either way it steps, as its twin does (on the same, edge-safe, grads).
        for p, g in zip(ps, _grads_for(ps, seed + 200)):
            p.grad = g
        outcome = _check_optimizer_step(opt, ps, 0, neptune_step_reference)
        assert outcome == "computed", "refused to step after the load"
        for p, q in zip(ps, twin_ps):
            q.grad = p.grad.clone()
        twin.step()
        for i, (p, q) in enumerate(zip(ps, twin_ps)):
            assert torch.equal(_bytes(p), _bytes(q)), f"params[{i}] steps otherwise than its twin's"
    return "refused" if faults else "loaded"
