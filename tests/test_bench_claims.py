"""The three-claims benchmark (bench/bench_claims.py): its protocol rules each catch a planted
violation, its statistics, and a quick end-to-end run that writes the report."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import pytest
import torch

from neptune_ext import training as lib

from scripts import load_bench

_load = load_bench

P = _load("claims_protocol")
_load("claims_report")
B = _load("bench_claims")

TINY = P.Experiment("tiny", "faster", budgets=[1, 2], arms=["neptune", "adamw", "sgd"], width=4, train_size=120,
                    batch_size=60, val_size=150, sweep_seeds=1, seeds=2,
                    lr_grid={"neptune": [1e-2, 3e-2], "adamw": [1e-2, 3e-2], "sgd": [0.1, 0.3]}, targets=[0.2, 0.3],
                    eval_train_size=60)


def _runner(tmp_path):
    args = argparse.Namespace(stem=str(tmp_path / "claims"), resume=False, report_only=False, jobs=1, device="cpu",
                              dataset="digits", data_dir="data", threads=1, no_progress=True)
    B._init_worker("digits", "data", 1)
    return B.Runner(args)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    runner = _runner(tmp_path_factory.mktemp("claims"))
    B.run_experiment(TINY, runner)
    return runner.runs


# -- the protocol as run ---------------------------------------------------------------------


def test_a_real_run_keeps_every_rule(tiny_runs):
    P.check_protocol(TINY, tiny_runs)
    sweep = [r for r in tiny_runs if r["phase"] == "sweep"]
    final = [r for r in tiny_runs if r["phase"] == "final"]
    assert {r["seed"] for r in sweep} == {1000} and {r["seed"] for r in final} == {0, 1}
    assert {r["scored_on"] for r in sweep} == {"validation"} and {r["scored_on"] for r in final} == {"test"}
    assert len(final) == 2 * 3 * 2  # budgets x arms x seeds
    for r in final:
        assert r["epochs_run"] == r["budget"] and r["total_steps"] == r["budget"] * r["steps_per_epoch"] == r["budget"] * 2
        assert r["lr"] == P.select_lr(sweep, "tiny", r["budget"], r["optimizer"])


def test_rule1_leaky_validation_split_is_caught(tmp_path, monkeypatch):
    real = lib.validation_split

    def leaky(data, n_val, seed=12345):  # planted: the sweep may train on validation images
        v = real(data, n_val, seed)
        return dataclasses.replace(v, train_x=torch.cat([v.train_x, v.test_x[:5]]), train_y=torch.cat([v.train_y, v.test_y[:5]]),
                                   train_index=torch.cat([v.train_index, v.test_index[:5]]))

    monkeypatch.setattr(lib, "validation_split", leaky)
    with pytest.raises(P.ProtocolError, match="5 validation images are also training images"):
        B.run_experiment(TINY, _runner(tmp_path))


def test_validation_split_provenance_follows_the_images():
    data = lib.load_digits_data()
    v = lib.validation_split(data, 300)
    P.check_split(v)
    assert torch.equal(data.train_x[v.test_index], v.test_x) and torch.equal(data.train_x[v.train_index], v.train_x)
    noisy = lib.validation_split(lib.with_label_noise(data, 0.2), 300)
    assert torch.equal(noisy.train_y_clean, data.train_y[noisy.train_index])


def test_rule2_shared_seeds_are_caught(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "final_seeds", lambda e: [1000, 1001])  # planted: finals reuse the sweep's seeds
    with pytest.raises(P.ProtocolError, match=r"seeds \[1000\] are used by both"):
        B.run_experiment(TINY, _runner(tmp_path))


def test_rule3_sweep_scored_on_the_test_set_is_caught(tmp_path, monkeypatch):
    real = P.job

    def on_test(e, phase, arm, cfg):  # planted: the sweep looks at the test set
        return {**real(e, phase, arm, cfg), "split": "test"}

    monkeypatch.setattr(P, "job", on_test)
    with pytest.raises(P.ProtocolError, match="sweep run .* was scored on test, not validation"):
        B.run_experiment(TINY, _runner(tmp_path))


def test_rule3_final_lr_not_the_validation_choice_is_caught(tiny_runs):
    sweep = [r for r in tiny_runs if r["phase"] == "sweep"]
    final = [r for r in tiny_runs if r["phase"] == "final"]
    # planted: AdamW's lr picked by its test accuracy instead (the other grid point)
    other = {1e-2: 3e-2, 3e-2: 1e-2}
    tuned = [dict(r, lr=other.get(r["lr"], r["lr"])) if r["arm"] == "adamw" else r for r in final]
    with pytest.raises(P.ProtocolError, match="final arm adamw at budget 1 ran at lr .* but the validation sweep chose"):
        P.check_protocol(TINY, sweep + tuned)


def test_rule4_budget_read_off_a_longer_run_is_caught(tmp_path, monkeypatch):
    real = lib.train

    def one_long_run(cfg, data, device="cpu", progress=False, log=print):  # planted: budget 1 = epoch 1 of a 2-epoch run
        longer = dataclasses.replace(cfg, epochs=max(TINY.budgets), eval_test_every_epoch=True, eval_train_every_epoch=True)
        return real(longer, data, device, progress, log)[: cfg.epochs]

    monkeypatch.setattr(lib, "train", one_long_run)
    with pytest.raises(P.ProtocolError, match="a budget-1 result .* comes from a run of 1 epochs with a 4-step schedule"):
        B.run_experiment(TINY, _runner(tmp_path))


def test_resume_reruns_nothing(tmp_path, monkeypatch):
    runner = _runner(tmp_path)
    B.run_experiment(TINY, runner)
    n = len(runner.runs)
    again = B.Runner(argparse.Namespace(**{**vars(runner.args), "resume": True}))
    monkeypatch.setattr(B, "run_one", lambda j: pytest.fail(f"reran {j}"))
    B.run_experiment(TINY, again)
    assert len(again.runs) == n


# -- statistics ----------------------------------------------------------------------------


def test_select_lr_takes_the_best_validation_mean_and_the_smaller_lr_on_ties():
    runs = [dict(exp="x", phase="sweep", budget=2, optimizer="adamw", lr=lr, acc=a)
            for lr, a in [(0.01, 0.75), (0.01, 0.875), (0.03, 0.8125), (0.03, 0.8125), (0.1, 0.5)]]
    assert P.select_lr(runs, "x", 2, "adamw") == 0.01  # a tie of the means: the smaller lr
    runs += [dict(exp="x", phase="sweep", budget=2, optimizer="adamw", lr=0.1, acc=0.99)] * 2  # mean 0.83
    assert P.select_lr(runs, "x", 2, "adamw") == 0.1
    assert P.select_lr(runs, "x", 4, "adamw") is None


def test_edge_extension_goes_one_lr_beyond_the_best_edge():
    e = dataclasses.replace(TINY, budgets=[1], lr_grid={"adamw": [0.01, 0.03]})
    runs = [dict(exp="tiny", phase="sweep", budget=1, optimizer="adamw", lr=lr, acc=a) for lr, a in [(0.01, 0.5), (0.03, 0.6)]]
    assert P.edge_extension(runs, e) == {1: {"adamw": [0.09]}}
    runs.append(dict(exp="tiny", phase="sweep", budget=1, optimizer="adamw", lr=0.09, acc=0.7))
    assert P.edge_extension(runs, e) == {}  # extended once, not again


def test_epochs_to_target_interpolates_in_log_budget():
    R = _load("claims_report")
    curve = [(2, 0.80), (4, 0.84), (8, 0.86)]
    assert R.epochs_to(curve, 0.79) == 2.0
    assert R.epochs_to(curve, 0.82) == pytest.approx(2 * 2 ** 0.5)
    assert R.epochs_to(curve, 0.86) == pytest.approx(8.0)
    assert R.epochs_to(curve, 0.87) is None


def test_paired_differences_by_seed():
    final = [dict(arm=a, budget=1, seed=s, acc=v) for a, vals in [("x", [0.9, 0.8, 0.7]), ("y", [0.8, 0.8, 0.6])]
             for s, v in enumerate(vals)]
    d = P.paired(final, "x", "y", 1)
    assert d["n"] == 3 and d["mean"] == pytest.approx(0.2 / 3) and (d["wins"], d["ties"], d["losses"]) == (2, 1, 0)


# -- the library parts it uses -------------------------------------------------------------


def test_label_noise_makes_exactly_that_fraction_wrong_and_leaves_test_labels():
    data = lib.load_digits_data()
    n = lib.with_label_noise(data, 0.2, seed=3)
    wrong = n.train_y != data.train_y
    assert wrong.sum().item() == round(0.2 * len(data.train_y))
    assert torch.equal(n.train_y_clean, data.train_y) and torch.equal(n.test_y, data.test_y)
    assert torch.equal(lib.with_label_noise(data, 0.2, seed=3).train_y, n.train_y)
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\)"):
        lib.with_label_noise(data, 1.0)


def test_noisy_run_reports_memorization_and_clean_accuracy():
    data = lib.with_label_noise(lib.load_digits_data(), 0.3, seed=1)
    h = lib.train(lib.RunConfig(epochs=1, width=4, batch_size=128, eval_train_size=400, eval_test_every_epoch=False), data)
    r = h[-1]
    assert 0.0 <= r["memorized"] <= 1.0 and 0.0 <= r["train_eval_clean_acc"] <= 1.0
    assert r["optimizer_seconds"] > 0 and r["total_steps"] == r["steps_per_epoch"] == -(-len(data.train_y) // 128)


def test_vit_shapes_and_size():
    m = lib.make_model("vit", 10, 1, 28, 8)
    assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert sum(p.numel() for p in m.parameters()) == 138_890
    with pytest.raises(ValueError, match="unknown arch 'mlp'"):
        lib.make_model("mlp", 10, 1, 28, 8)


def test_quick_run_writes_report_csv_and_plots(tmp_path):
    assert B.main(["--quick", "--experiments", "speed-5k,small-1k", "--out-dir", str(tmp_path), "--no-progress"]) == 0
    md = (tmp_path / "claims_quick.md").read_text()
    assert "## speed-5k" in md and "## small-1k" in md and "Time to accuracy (speed-5k)" in md
    for f in ("claims_quick_runs.csv", "claims_quick_speed.png", "claims_quick_equal_budget.png"):
        assert (tmp_path / f).stat().st_size > 0
