"""The fuzzers' reproducers (docs/fuzzing.md): a failing case is printed as a snippet that
runs on its own and fails as the case did; passing cases print snippets that run clean."""
import os
import subprocess
import sys

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from neptune_ext import fuzzing

import fuzz_support
from fuzz_support import run_fuzz
from test_fuzz_checkpoint import checkpoint_specs
from test_fuzz_operator import BACKEND_NAMES, operator_specs, run_operator_case
from test_fuzz_optimizer import optimizer_specs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_script(tmp_path, source):
    path = tmp_path / "repro.py"
    path.write_text(source)
    # the checkout's neptune_ext, as for a repro.py saved at the repository root
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _specs(strategy, n):
    """The first n specs of the derandomized stream."""
    out = []

    @settings(max_examples=n, derandomize=True, database=None, deadline=None, phases=(Phase.generate,))
    @given(strategy)
    def collect(spec):
        out.append(spec)

    collect()
    return out


pytestmark = pytest.mark.skipif(not BACKEND_NAMES, reason="the CPU extension is not built")


@pytest.mark.parametrize("strategy, render", [(operator_specs(), fuzzing.operator_source),
                                              (optimizer_specs(), fuzzing.optimizer_source),
                                              (checkpoint_specs(), fuzzing.checkpoint_source)],
                         ids=["operator", "optimizer", "checkpoint"])
def test_a_printed_case_runs_on_its_own(tmp_path, strategy, render):
    sources = [render(spec) for spec in _specs(strategy, 6)]
    # one interpreter for the six: each snippet is a script of its own
    script = "\n".join(f"exec(compile({s!r}, 'case {i}', 'exec'), {{'__name__': '__main__'}})"
                       for i, s in enumerate(sources))
    done = _run_script(tmp_path, fuzzing.reproducer(script, "six cases"))
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_failing_case_fails_on_its_own(tmp_path):
    """The float32 limit of docs/rule.md ("Non-finite values"): a gradient whose squared norm
    overflows float32. Its snippet raises the property's AssertionError in a fresh process."""
    spec = {"backend": BACKEND_NAMES[0], "call": "wrapper", "schedule": 0,
            "buffers": [{"n": 4, "seed": 1, "dtype": "float32"}, {"n": 4, "seed": 2, "dtype": "float32", "scale": 1e20},
                        {"n": 4, "seed": 3, "dtype": "float32", "scale": 0.0},
                        {"n": 4, "seed": 4, "dtype": "float32", "scale": 0.0}],
            "tensors": [{"buf": k, "shape": [4], "stride": [1], "offset": 0} for k in range(4)],
            "steps": [{"value": 0.0, "dtype": "float32", "shape": [], "device": "cpu"}],
            "lists": {"params": [0], "grads": [1], "exp_avgs": [2], "exp_avg_sqs": [3], "steps": [0]},
            "hyper": {"lr": 0.01, "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.1, "eps": 1e-8, "clip": 0.1,
                      "cautious": False, "maximize": False, "grad_scale": None, "found_inf": None},
            "edge_safe": False}
    done = _run_script(tmp_path, fuzzing.reproducer(fuzzing.operator_source(spec), "a known failure"))
    assert done.returncode != 0 and "AssertionError" in done.stderr, done.stderr[-3000:]
    assert "params[0] (4,) torch.float32" in done.stderr


def test_a_failure_is_shrunk_and_printed_as_its_reproducer(monkeypatch, tmp_path):
    """With a planted bug (every refusal judged unclear), the fuzzer fails; the snippet in
    its report, and the file it saves, fail again when run."""
    monkeypatch.setattr(fuzzing, "refusal_problem", lambda *a: "planted")
    monkeypatch.setenv(fuzz_support.REPRO_DIR_ENV, str(tmp_path))
    with pytest.raises(AssertionError) as e:
        run_fuzz(operator_specs(), run_operator_case, 200, "operator")
    notes = getattr(e.value, "__notes__", [])
    printed = [n for n in notes if n.startswith("# neptune_ext fuzz reproducer: operator")]
    saved = [n for n in notes if n.startswith("reproducer saved: ")]
    assert printed and saved, notes
    path = saved[-1].split()[-1]
    with open(path) as f:
        assert f.read() == printed[-1]
    with pytest.raises(AssertionError, match=r"unclear refusal \(planted\)"):
        fuzzing.run_source(printed[-1])
