"""Fuzzing checkpoints: Neptune.load_state_dict with state dicts of Neptune and of
torch.optim.AdamW (amsgrad, capturable, foreach, fused), changed: truncated (no 'state',
no 'param_groups', a param's state or one of its keys dropped), wrongly shaped or typed
moments (flat, broadcastable, longer, int, bool, complex, float16 / bfloat16 / float64,
transposed, a list, None), steps of every kind (int, float, int64 / float64 tensors, shape
(1,) and (2,), NaN, negative, inf, a string, None, bool, complex, meta), tensors on the
meta device, extra and missing param groups, a group with a param more or fewer, groups
without Neptune's keys (older dicts), odd or invalid group fields, state for a param id no
group lists. Each loads as its well-formed equivalent would (then steps alike, and as the
reference does) or is refused clearly with the optimizer unchanged and still stepping
(neptune_ext.fuzzing.check_checkpoint_case; long runs and replays: tests/fuzz_support.py).
"""
import pytest
from hypothesis import strategies as st

from neptune_ext import fuzzing
from neptune_ext import testing as T

from fuzz_support import cases_asked, run_fuzz
from test_fuzz_operator import _rare, layout_of

BACKEND_NAMES = [b.name for b in T.BACKENDS if b.device == "cpu" and b.missing() is None]
CI_CASES = 600  # measured: tests/test_fuzz_checkpoint.py adds about 10 s on a 2-core machine
SHAPES = [(), (7,), (3, 5), (4, 2, 3, 3), (0,)]
NAN = float("nan")

VALID_STEPS = ["int", "float", "int64", "float64", "shape1"]
INVALID_STEPS = ["nan", "negative", "inf", "string", "none", "bool", "shape2", "complex", "meta"]
VALID_MOMENTS = ["float16", "bfloat16", "float64", "transposed"]
INVALID_MOMENTS = ["flat", "broadcastable", "longer", "int", "bool", "complex", "meta", "list", "none"]
GROUP_FIELDS = [  # (key, value, valid)
    ("initial_lr", 0.1, True), ("foo", 1, True), ("amsgrad", False, True), ("decoupled_weight_decay", True, True),
    ("fused", True, True), ("foreach", False, True), ("param_names", ["a"], True), ("capturable", True, True),
    ("lr", -1.0, False), ("lr", NAN, False), ("betas", (1.0, 0.9), False), ("eps", 0.0, False),
    ("clip", None, False), ("weight_decay", -0.5, False), ("amsgrad", True, False), ("differentiable", True, False),
    ("cautious", "yes", False),
]


@st.composite
def checkpoint_specs(draw, backends=tuple(BACKEND_NAMES)):
    seeds = iter(range(draw(st.integers(0, 2**16)), 2**31))
    n = draw(st.integers(1, 3))
    params = []
    for _ in range(n):
        shape = draw(st.sampled_from(SHAPES))
        dtype = draw(st.sampled_from(["float32", "bfloat16", "float64"]))
        layout = draw(st.sampled_from(["contiguous", "channels_last", "transposed"])) if _rare(draw, 25) else "contiguous"
        strides, offset, size = layout_of(shape, layout)
        params.append({"buf": {"n": size + offset, "seed": next(seeds), "dtype": dtype}, "shape": list(shape),
                       "stride": strides, "offset": offset, "param": True})
    groups = [list(range(n))] if n == 1 or not _rare(draw, 50) else [[0], list(range(1, n))]
    source = draw(st.sampled_from(["neptune", "adamw"]))
    capturable = False
    if source == "neptune":
        source_kwargs = {"state_dtype": draw(st.sampled_from(["float32", "bfloat16"])),
                         "implementation": "reference"}
    else:
        source_kwargs = {}
        for key in ("amsgrad", "capturable", "foreach", "fused"):
            if _rare(draw, 20):
                source_kwargs[key] = True
        capturable = source_kwargs.get("capturable")  # AdamW(capturable=True) steps CUDA params only
        if source_kwargs.get("fused"):
            source_kwargs.pop("foreach", None)
    broken = _rare(draw, 50)
    if source_kwargs.get("amsgrad"):  # AMSGrad state cannot be honoured: refused
        broken = True
    mutations = []
    for _ in range(draw(st.integers(0, 3))):
        k = draw(st.integers(0, 5))
        choice = draw(st.integers(0, 99))
        if choice < 25:
            valid = not (broken and _rare(draw, 50))
            mutations.append(("step", k, draw(st.sampled_from(VALID_STEPS if valid else INVALID_STEPS)), valid))
        elif choice < 50:
            valid = not (broken and _rare(draw, 50))
            mutations.append(("moment", k, draw(st.sampled_from(["exp_avg", "exp_avg_sq"])),
                              draw(st.sampled_from(VALID_MOMENTS if valid else INVALID_MOMENTS)), valid))
        elif choice < 65:
            fields = [f for f in GROUP_FIELDS if f[2] or broken]
            key, value, valid = draw(st.sampled_from(fields))
            mutations.append(("group_set", k, key, value, valid))
        elif choice < 80:
            mutations.append(draw(st.sampled_from([("drop_param_state", k), ("empty_param_state", k),
                                                   ("group_drop_neptune_keys",), ("junk_state_id",)])))
        elif broken:
            mutations.append(draw(st.sampled_from([
                ("drop_top_key", "state"), ("drop_top_key", "param_groups"), ("not_a_dict",), ("state_not_a_dict",),
                ("extra_group",), ("drop_group",), ("group_extra_param", k), ("group_missing_param", k),
                ("group_no_params", k), ("drop_state_key", k, "exp_avg"), ("drop_state_key", k, "exp_avg_sq"),
                ("drop_state_key", k, "step"), ("extra_state_key", k, "max_exp_avg_sq"),
                ("extra_state_key", k, "foo")])))
    target_kwargs = {}
    if _rare(draw, 30):
        target_kwargs["state_dtype"] = "bfloat16"
    if _rare(draw, 20):
        target_kwargs["clip"] = 0.0
    return {"backend": draw(st.sampled_from(backends)), "params": params, "groups": groups, "source": source,
            "source_kwargs": source_kwargs, "source_steps": 0 if capturable else draw(st.integers(0, 2)), "target_kwargs": target_kwargs,
            "target_steps": draw(st.integers(0, 1)), "mutations": mutations, "seed": draw(st.integers(0, 1000))}


def run_checkpoint_case(spec, note=print):
    source = fuzzing.checkpoint_source(spec)
    note(fuzzing.reproducer(source, f"checkpoint on {spec['backend']}"))
    fuzzing.run_source(source)


@pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")
def test_fuzz_checkpoint():
    n = run_fuzz(checkpoint_specs(), run_checkpoint_case, CI_CASES, "checkpoint")
    assert n >= cases_asked(CI_CASES)


@pytest.mark.parametrize("mutations, outcome", [
    ([("extra_group",), ("drop_group",)], "loaded"),  # the added group dropped again
    ([("group_extra_param", 0), ("group_missing_param", 0)], "loaded"),  # the added param removed again
    ([("drop_group",), ("extra_group",)], "refused"),  # one group in place of another, of another size
])
def test_group_changes_that_undo_each_other_are_judged_on_the_final_dict(mutations, outcome):
    """Found by this fuzzer (long mode): a group added and then dropped was counted as two
    faults, so the property expected a refusal of a dict that loads as it should."""
    import torch

    params = [torch.nn.Parameter(fuzzing.values(n=1, seed=0, dtype="float32").as_strided((), (), 0)),
              torch.nn.Parameter(fuzzing.values(n=7, seed=1, dtype="float32").as_strided((7,), (1,), 0)),
              torch.nn.Parameter(fuzzing.values(n=15, seed=2, dtype="float32").as_strided((3, 5), (5, 1), 0))]
    got = fuzzing.check_checkpoint_case("reference", params, groups=[[0, 1], [2]], source="neptune",
                                        source_kwargs={"implementation": "reference"}, source_steps=1,
                                        target_kwargs={}, target_steps=0, mutations=mutations, seed=0)
    assert got == outcome


@pytest.mark.parametrize("mutations, outcome", [
    ([("moment", 0, "exp_avg_sq", "int", False), ("moment", 0, "exp_avg_sq", "float16", True)], "loaded"),
    ([("moment", 0, "exp_avg_sq", "longer", False), ("moment", 0, "exp_avg_sq", "float16", True)], "refused"),
])
def test_a_moment_changed_twice_is_judged_by_its_final_value(mutations, outcome):
    """Found by this fuzzer (long mode): an int moment converted to float16 afterwards is a
    loadable float16 moment, but was still counted as an int one."""
    import torch

    params = [torch.nn.Parameter(fuzzing.values(n=7, seed=0, dtype="float32").as_strided((7,), (1,), 0))]
    got = fuzzing.check_checkpoint_case("reference", params, groups=[[0]], source="neptune",
                                        source_kwargs={"implementation": "reference"}, source_steps=1,
                                        target_kwargs={}, target_steps=0, mutations=mutations, seed=0)
    assert got == outcome
