"""Fuzzing the optimizer: random models stepped by neptune_ext.Neptune on every backend
(implementation="reference"; the operator under each CPU kernel set, with implementation
"auto" or "op"; the emulated CUDA operator), each construction and step either matching the
reference from the same params and state or refused clearly with nothing written
(neptune_ext.fuzzing.check_optimizer_case; long runs and replays: tests/fuzz_support.py).

Inputs: params of odd shapes in every layout (offset, channels_last, transposed, sliced,
expanded), fp32 / bf16 / fp16 / fp64 (and now and then complex or on the meta device),
None grads, grads in another layout, of another dtype or shape (put there through .data),
sparse grads, NaN / inf in grads, several groups with their own settings, valid and
invalid hyperparameters at construction and set on a group afterwards (as a scheduler or
a user would), GradScaler's grad_scale / found_inf, skip_nonfinite, bf16 state.
"""
import math

import pytest
from hypothesis import strategies as st

from neptune_ext import fuzzing
from neptune_ext import testing as T

from fuzz_support import cases_asked, run_fuzz
from test_fuzz_operator import SHAPES, _pick, _rare, fault_picker, layout_of

BACKEND_NAMES = [b.name for b in T.BACKENDS if b.device == "cpu" and b.missing() is None]
CI_CASES = 600  # measured: tests/test_fuzz_optimizer.py adds about 10 s on a 2-core machine
LAYOUTS = ["contiguous", "offset", "channels_last", "transposed", "sliced", "rows-sliced"]
NAN, INF = float("nan"), float("inf")
# The kinds of fault optimizer_specs plants (test_fuzz_operator.fault_picker).
OPTIMIZER_FAULTS = ("lr", "betas", "eps", "weight_decay", "clip", "flags", "param dtype", "layout", "grad dtype",
                    "grad shape", "sparse", "param twice", "set later")


def _scalar(value, dtype="float32", shape=(), device="cpu"):
    return {"tensor": {"value": value, "dtype": dtype, "shape": list(shape), "device": device}}


def _hyper(draw, bad):
    """Settings for Neptune(...) or one group: each, now and then, at its range's edge, or
    beyond it (bad(p, kind): fault_picker)."""
    h = {}

    def value(key, p_set, usual, extreme, invalid):
        if bad(8, "flags" if key in ("cautious", "maximize", "skip_nonfinite") else key):
            h[key] = draw(st.sampled_from(invalid))
        elif _rare(draw, p_set):
            h[key] = _pick(draw, usual, extreme, 30)

    value("lr", 50, 1e-2, [0.0, INF, 1.0, _scalar(1e-2), _scalar(1e-2, "float64"), _scalar(0.0, shape=[1])],
          [-1e-3, NAN, _scalar(-1e-2), _scalar(1e-2, "int64"), _scalar(1e-2, shape=[2]), _scalar(1e-2, device="meta")])
    value("betas", 30, (0.9, 0.99), [(0.0, 0.0), (0.5, 1 - 1e-9)], [(1.0, 0.999), (0.9, 1.0), (NAN, 0.9), (0.9,), (-0.1, 0.9)])
    value("eps", 20, 1e-8, [1e-30, 1.0, INF], [0.0, -1e-8, NAN])
    value("weight_decay", 30, 0.1, [0.0, 1e6], [-0.1, NAN])
    value("clip", 30, 0.1, [0.0, 1e-4, 10.0, INF], [-0.1, NAN])
    for flag in ("cautious", "maximize", "skip_nonfinite"):
        value(flag, 30, draw(st.booleans()), [True, False], ["yes", 1])
    if _rare(draw, 25):
        h["state_dtype"] = "bfloat16"
    return h


@st.composite
def optimizer_specs(draw, backends=tuple(BACKEND_NAMES)):
    backend = draw(st.sampled_from(backends))
    implementation = "reference" if backend == "reference" else draw(st.sampled_from(["auto", "op"]))
    seeds = iter(range(draw(st.integers(0, 2**16)), 2**31))
    _, bad = fault_picker(draw, OPTIMIZER_FAULTS)

    n_params = draw(st.integers(1, 4))
    n_steps = draw(st.integers(1, 2))
    params, grads = [], [[] for _ in range(n_steps)]

    def tensor(shape, dtype, layout, device="cpu", scale=1.0, special=(), zeros=0.0):
        strides, offset, n = layout_of(shape, layout)
        buf = {"n": n + offset, "seed": next(seeds), "dtype": dtype, "scale": scale}
        if special:
            buf["special"] = list(special)
        if zeros:
            buf["zeros"] = zeros
        if device != "cpu":
            buf["device"] = device
        return {"buf": buf, "shape": list(shape), "stride": strides, "offset": offset}

    for i in range(n_params):
        shape = draw(st.sampled_from(SHAPES))
        dtype = "complex64" if bad(4, "param dtype") else draw(st.sampled_from(["float32", "bfloat16", "float16", "float64"]))
        layout = "expanded" if bad(5, "layout") else _pick(draw, "contiguous", LAYOUTS[1:], 35)
        device = _pick(draw, "cpu", ["meta"], 3)
        params.append({**tensor(shape, dtype, layout, device), "param": True})
        for k in range(n_steps):
            if _rare(draw, 12):
                grads[k].append(None)
                continue
            g_shape, g_dtype = shape, dtype
            if bad(5, "grad dtype"):
                g_dtype = draw(st.sampled_from([d for d in ("float32", "bfloat16", "float64") if d != dtype]))
            if bad(4, "grad shape"):
                g_shape = draw(st.sampled_from([s for s in SHAPES if s != shape]))
            n = math.prod(g_shape)
            special = ()
            if n and _rare(draw, 12):
                special = [(draw(st.integers(0, n - 1)), draw(st.sampled_from(["nan", "inf", "-inf"])))]
            g = tensor(g_shape, g_dtype, _pick(draw, "contiguous", LAYOUTS[1:] + ["expanded"], 30), device,
                       scale=0.1, special=special, zeros=draw(st.sampled_from([0.0, 0.05])))
            if bad(4, "sparse") and device == "cpu":
                g = {**tensor(shape, dtype, "contiguous", device, scale=0.1), "sparse": True}
            grads[k].append(g)
    # groups: a partition of the params, in order
    cuts = sorted(set(draw(st.lists(st.integers(1, n_params - 1), max_size=2)))) if n_params > 1 else []
    bounds = [0] + cuts + [n_params]
    groups = []
    for a, b in zip(bounds, bounds[1:]):
        groups.append({"params": list(range(a, b)), **_hyper(draw, bad)})
    if bad(5, "param twice") and n_params > 1:  # the same param twice in a group
        groups[0]["params"].append(groups[0]["params"][0])
    defaults = {**_hyper(draw, bad), "implementation": implementation}
    after_init = []
    later_bad = bad(100, "set later")
    if _rare(draw, 15) or later_bad:
        changes = [("lr", 0.5), ("lr", 0.0), ("clip", 0.0), ("cautious", False), ("betas", (0.5, 0.9))]
        if later_bad:
            changes += [("lr", -1.0), ("lr", NAN), ("lr", _scalar(-1.0)), ("betas", (1.0, 0.5)), ("clip", -1.0),
                        ("weight_decay", NAN), ("eps", 0.0)]
        key, value = draw(st.sampled_from(changes))
        after_init.append((draw(st.integers(0, len(groups) - 1)), key, value))
    scaler = None
    if _rare(draw, 15):
        scaler = {"grad_scale": _scalar(_pick(draw, 1024.0, [0.0, -2.0], 20)),
                  "found_inf": _scalar(draw(st.sampled_from([0.0, 0.0, 1.0])))}
    return {"backend": backend, "params": params, "grads": grads, "groups": groups, "defaults": defaults,
            "after_init": after_init, "scaler": scaler}


def run_optimizer_case(spec, note=print):
    source = fuzzing.optimizer_source(spec)
    note(fuzzing.reproducer(source, f"optimizer on {spec['backend']}"))
    fuzzing.run_source(source)


@pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")
def test_fuzz_optimizer():
    n = run_fuzz(optimizer_specs(), run_optimizer_case, CI_CASES, "optimizer")
    assert n >= cases_asked(CI_CASES)
