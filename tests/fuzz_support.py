"""What the fuzz tests share: how many cases a run makes, and the hypothesis runner.

A CI run makes a fixed number of cases per test, in hypothesis runs of RUN cases with the
fixed seeds 0, 1, 2, ... (no example database): every run the same cases. The long mode:

    NEPTUNE_FUZZ_CASES=100000 python -m pytest tests/test_fuzz_operator.py   # that many per test
    NEPTUNE_FUZZ_SECONDS=86400 python -m pytest tests/test_fuzz_operator.py  # for a day per test
    NEPTUNE_FUZZ_SEED=7 ...          # another stream of cases than the CI's (the default: a fresh one)

A failing case is shrunk, then printed as "Falsifying example" followed by its reproducer: a
self-contained Python snippet (neptune_ext.fuzzing), also saved to a file whose path and
command line the failure names (in NEPTUNE_FUZZ_REPRO_DIR, by default the temporary folder).
"""
from __future__ import annotations

import os
import random
import tempfile
import time

from hypothesis import HealthCheck, Phase, given, note, seed, settings

CASES_ENV, SECONDS_ENV, SEED_ENV = "NEPTUNE_FUZZ_CASES", "NEPTUNE_FUZZ_SECONDS", "NEPTUNE_FUZZ_SEED"
REPRO_DIR_ENV = "NEPTUNE_FUZZ_REPRO_DIR"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Cases per hypothesis run (each run its own seed). Within a run hypothesis draws variations
# of the cases it has made, so short runs spread the cases wider: measured on the optimizer
# fuzzer, 150 cases as one run held 102 distinct specs (54 distinct settings), as 15 runs of
# 10: 125 (122).
RUN = 10


def _settings(max_examples: int) -> settings:
    return settings(max_examples=max_examples, database=None, deadline=None,
                    suppress_health_check=list(HealthCheck), print_blob=False, report_multiple_bugs=False,
                    phases=(Phase.explicit, Phase.generate, Phase.shrink))


def cases_asked(ci_cases: int) -> int:
    """How many cases a run must make: NEPTUNE_FUZZ_CASES, else ci_cases (a timed run: 1)."""
    if os.environ.get(SECONDS_ENV) and not os.environ.get(CASES_ENV):
        return 1
    return int(os.environ.get(CASES_ENV, "0") or 0) or ci_cases


def run_fuzz(strategy, run_case, ci_cases: int, what: str) -> int:
    """Runs run_case(spec) -> reproducer source on specs drawn from `strategy`: ci_cases
    cases (runs of RUN with the seeds 0, 1, ...), or as the environment asks (module
    docstring). Returns the number of cases run (shrinking's included)."""
    count, last = [0], [None]

    def record(source):
        last[0] = source
        note(source)

    def test():
        def body(spec):  # a fresh function per hypothesis run: each takes its own settings
            count[0] += 1
            run_case(spec, record)
        return given(strategy)(body)

    seconds = float(os.environ.get(SECONDS_ENV, "0") or 0)
    cases = int(os.environ.get(CASES_ENV, "0") or 0) or ci_cases
    user_seed = os.environ.get(SEED_ENV)
    ci = not seconds and not user_seed and not os.environ.get(CASES_ENV)
    base = 0 if ci else int(user_seed) if user_seed else random.randrange(2**32)
    if not ci:
        print(f"\n{what}: fuzzing with {SEED_ENV}={base}", flush=True)
    deadline = time.monotonic() + seconds if seconds else None
    k, reported = 0, 0
    try:
        while True:
            n = RUN if deadline else min(RUN, cases - k * RUN)
            if n <= 0:
                break
            saving_reproducer(seed(base + k)(_settings(n)(test())), last, what)()
            k += 1
            if not ci and count[0] >= reported + 1000:  # a day-long run's progress
                reported = count[0]
                print(f"{what}: {count[0]} cases so far", flush=True)
            if deadline and time.monotonic() > deadline:
                break
    except BaseException:
        print(f"{what}: failed at seed {base + k} after {count[0]} cases", flush=True)
        raise
    if not ci:
        print(f"{what}: {count[0]} cases, seeds {base}..{base + k - 1}", flush=True)
    return count[0]


def saving_reproducer(run, last: list, what: str):
    """run() with the last reproducer saved to a file if it fails, named in the failure
    (hypothesis runs the shrunk failing case last, so `last` then holds its reproducer)."""
    def wrapped():
        try:
            run()
        except Exception as e:  # (not an interrupt: no failing case)
            if last[0] is not None:
                folder = os.environ.get(REPRO_DIR_ENV) or tempfile.gettempdir()
                path = os.path.join(folder, f"neptune_fuzz_{what}_repro_{os.getpid()}.py")
                with open(path, "w") as f:
                    f.write(last[0])
                e.add_note(f"reproducer saved: PYTHONPATH={ROOT} python {path}")
            raise
    return wrapped
