"""The three-claims benchmark's plan and protocol rules (bench/bench_claims.py runs it).

An experiment is a setting (data, model, budgets, arms). For each training budget
separately, every optimizer's peak lr is chosen on a validation split held out of the
training set (sweep seeds 1000+), then every arm trains on the training set with fresh
seeds (0, 1, ...) and is scored once on the test set. The rules, each checked by
``check_protocol`` / ``check_split`` before anything is reported:

1. the validation split is disjoint from the images the sweep trains on;
2. the sweep's seeds are disjoint from the final seeds;
3. no test-set tuning: sweeps are scored on the validation split only, finals on the
   test split only, and each final arm's lr is the one the validation scores choose;
4. budgets run separately: a result at budget B comes from a run whose schedule is B
   epochs long and that ran B epochs (never an intermediate epoch of a longer run).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

SWEEP_SEED0 = 1000
OPTIMIZERS = ("neptune", "adamw", "sgd")

# arm name -> what it changes from its optimizer's defaults; an arm runs at its
# optimizer's chosen lr (the ablations and bf16 state at Neptune's).
ARMS = {
    "neptune": dict(optimizer="neptune"),
    "adamw": dict(optimizer="adamw"),
    "sgd": dict(optimizer="sgd"),
    "neptune clip=0": dict(optimizer="neptune", clip=0.0),
    "neptune no mask": dict(optimizer="neptune", cautious=False),
    "neptune bf16 state": dict(optimizer="neptune", state_dtype="bfloat16"),
}
ABLATIONS = ("neptune", "adamw", "sgd", "neptune clip=0", "neptune no mask")

# Peak-lr grids, centred on earlier sweeps at these sizes; a best lr on the grid's edge
# adds one more lr (x3 or /3) that way.
CNN_GRID = {"neptune": [3e-3, 1e-2, 3e-2], "adamw": [1e-2, 3e-2, 1e-1], "sgd": [0.1, 0.3, 1.0]}
VIT_GRID = {"neptune": [1e-3, 3e-3, 1e-2], "adamw": [1e-3, 3e-3, 1e-2], "sgd": [0.03, 0.1, 0.3]}


@dataclass
class Experiment:
    name: str
    claim: str  # faster | resources | overfitting | architecture
    budgets: list[int]  # epochs; each budget is its own run with its own schedule
    arms: list[str]
    arch: str = "resnet9"
    width: int = 8
    train_size: int | None = 5000  # None: the whole training set
    batch_size: int = 128
    augment: bool = True
    label_noise: float = 0.0
    val_size: int = 3000
    sweep_seeds: int = 2
    seeds: int = 5
    lr_grid: dict = field(default_factory=lambda: dict(CNN_GRID))
    targets: list[float] = field(default_factory=list)  # test accuracies for time-to-accuracy
    eval_train_size: int = 2000
    about: str = ""


EXPERIMENTS = {
    e.name: e
    for e in [
        Experiment("speed-5k", "faster", budgets=[2, 4, 8, 16],
                   arms=["neptune", "adamw", "sgd", "neptune bf16 state"],
                   targets=[0.84, 0.86, 0.87, 0.88, 0.89],
                   about="time to accuracy on a 5,000-image subset; bf16 state beside fp32 state"),
        Experiment("small-1k", "overfitting", budgets=[80], arms=list(ABLATIONS), train_size=1000,
                   batch_size=100, augment=False, eval_train_size=1000,
                   about="1,000 training images, 80 epochs, no augmentation"),
        Experiment("vit-5k", "architecture", budgets=[8], arms=list(ABLATIONS), arch="vit",
                   lr_grid=dict(VIT_GRID), about="a small vision transformer at an equal budget"),
        Experiment("noisy-60k", "overfitting", budgets=[2], arms=list(ABLATIONS), train_size=None,
                   label_noise=0.2, val_size=5000, sweep_seeds=1, eval_train_size=5000,
                   about="all 60,000 training images, 20% of their labels replaced by a wrong class"),
        Experiment("speed-60k", "faster", budgets=[1, 2], arms=["neptune", "adamw", "sgd"], train_size=None,
                   val_size=5000, sweep_seeds=1, targets=[0.88, 0.89, 0.90, 0.91, 0.92],
                   about="time to accuracy on all 60,000 training images"),
        # for a GPU (bench/gpu_check.sh): the full-size time-to-accuracy protocol
        Experiment("speed-60k-gpu", "faster", budgets=[2, 4, 8, 16], arms=["neptune", "adamw", "sgd"],
                   train_size=None, width=16, batch_size=512, val_size=5000, sweep_seeds=2,
                   targets=[0.90, 0.91, 0.92, 0.93],
                   lr_grid={"neptune": [3e-3, 1e-2, 3e-2], "adamw": [3e-3, 1e-2, 3e-2], "sgd": [0.1, 0.3, 1.0]},
                   about="time to accuracy on all 60,000 training images, width 16, batch 512 (GPU)"),
    ]
}
CPU_EXPERIMENTS = ["speed-5k", "small-1k", "vit-5k", "speed-60k", "noisy-60k"]


def quick(e: Experiment) -> Experiment:
    """A seconds-long version of ``e`` (the demo and the tests): tiny budgets and grids."""
    return Experiment(e.name, e.claim, budgets=[1, 2][: len(e.budgets) if len(e.budgets) > 1 else 1],
                      arms=e.arms, arch=e.arch, width=4, train_size=200 if e.train_size else None, batch_size=64,
                      augment=e.augment, label_noise=e.label_noise, val_size=200, sweep_seeds=1, seeds=2,
                      lr_grid={o: lrs[1:] for o, lrs in e.lr_grid.items()}, targets=e.targets,
                      eval_train_size=100, about=e.about)


def sweep_seeds(e: Experiment) -> list[int]:
    return [SWEEP_SEED0 + i for i in range(e.sweep_seeds)]


def final_seeds(e: Experiment) -> list[int]:
    return list(range(e.seeds))


def run_cfg(e: Experiment, arm: str, lr: float, seed: int, budget: int) -> dict:
    """The training library's RunConfig fields of one run of ``arm`` (a key of ARMS)."""
    cfg = dict(lr=lr, seed=seed, epochs=budget, batch_size=e.batch_size, arch=e.arch, width=e.width,
               train_size=e.train_size, augment=e.augment, eval_train_size=e.eval_train_size)
    cfg.update(ARMS[arm])
    return cfg


def job(e: Experiment, phase: str, arm: str, cfg: dict) -> dict:
    return dict(exp=e.name, phase=phase, arm=arm, budget=cfg["epochs"], cfg=cfg, label_noise=e.label_noise,
                val_size=e.val_size, split="validation" if phase == "sweep" else "test")


def sweep_jobs(e: Experiment, grid: dict | None = None) -> list[dict]:
    grid = e.lr_grid if grid is None else grid
    return [job(e, "sweep", opt, run_cfg(e, opt, lr, s, b))  # an optimizer's default arm has its name
            for b in e.budgets for opt, lrs in grid.items() for lr in lrs for s in sweep_seeds(e)]


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def sweep_scores(runs: list[dict], exp: str, budget: int, optimizer: str) -> dict[float, float]:
    """lr -> mean validation accuracy of the default-settings sweep runs of one optimizer."""
    by_lr: dict[float, list[float]] = {}
    for r in runs:
        if r["exp"] == exp and r["phase"] == "sweep" and r["budget"] == budget and r["optimizer"] == optimizer:
            by_lr.setdefault(float(r["lr"]), []).append(r["acc"])
    return {lr: mean(v) for lr, v in sorted(by_lr.items())}


def select_lr(runs: list[dict], exp: str, budget: int, optimizer: str) -> float | None:
    """The chosen lr: best mean validation accuracy (ties: the smaller lr). Sweep runs only."""
    scores = sweep_scores(runs, exp, budget, optimizer)
    return max(scores, key=lambda lr: (scores[lr], -lr)) if scores else None


def edge_extension(runs: list[dict], e: Experiment) -> dict:
    """{budget: {optimizer: [lr]}}: one more lr beyond the grid's edge where the best lr sits on it."""
    out = {}
    for b in e.budgets:
        for opt in e.lr_grid:
            scores = sweep_scores(runs, e.name, b, opt)
            if len(scores) != len(e.lr_grid[opt]):  # already extended (or incomplete)
                continue
            best = select_lr(runs, e.name, b, opt)
            if best == max(scores):
                out.setdefault(b, {})[opt] = [float(f"{best * 3:.3g}")]
            elif best == min(scores):
                out.setdefault(b, {})[opt] = [float(f"{best / 3:.3g}")]
    return out


def final_jobs(e: Experiment, runs: list[dict]) -> list[dict]:
    """Every arm at every budget on the final seeds, at the lrs the sweep chose (seed-major,
    so a run cut short has the same seeds in every arm)."""
    out = []
    for b in e.budgets:
        lrs = {opt: select_lr(runs, e.name, b, opt) for opt in OPTIMIZERS}
        for s in final_seeds(e):
            for arm in e.arms:
                out.append(job(e, "final", arm, run_cfg(e, arm, lrs[ARMS[arm]["optimizer"]], s, b)))
    return out


# -- the rules ----------------------------------------------------------------------------


class ProtocolError(AssertionError):
    pass


def check_split(val_data) -> None:
    """Rule 1: the validation images are none of the images the sweep may train on."""
    if val_data.test_index is None or val_data.train_index is None:
        raise ProtocolError(f"{val_data.name}: a validation split must record where its images come from")
    overlap = set(val_data.train_index.tolist()) & set(val_data.test_index.tolist())
    if overlap:
        raise ProtocolError(f"{val_data.name}: {len(overlap)} validation images are also training images "
                            f"(e.g. index {min(overlap)})")


def check_protocol(e: Experiment, runs: list[dict]) -> None:
    """Rules 2-4 on the finished runs of experiment ``e`` (raises ProtocolError)."""
    runs = [r for r in runs if r["exp"] == e.name]
    sweep = [r for r in runs if r["phase"] == "sweep"]
    final = [r for r in runs if r["phase"] == "final"]
    both = {r["seed"] for r in sweep} & {r["seed"] for r in final}
    if both:
        raise ProtocolError(f"{e.name}: seeds {sorted(both)} are used by both the sweep and the final runs")
    for r in runs:
        want = "validation" if r["phase"] == "sweep" else "test"
        if r["scored_on"] != want:
            raise ProtocolError(f"{e.name}: a {r['phase']} run ({r['arm']}, lr {r['lr']}, seed {r['seed']}) "
                                f"was scored on {r['scored_on']}, not {want}")
        if r["epochs_run"] != r["budget"] or r["total_steps"] != r["budget"] * r["steps_per_epoch"]:
            raise ProtocolError(f"{e.name}: a budget-{r['budget']} result ({r['phase']} {r['arm']}, seed {r['seed']}) "
                                f"comes from a run of {r['epochs_run']} epochs with a {r['total_steps']}-step "
                                f"schedule ({r['steps_per_epoch']} steps per epoch): budgets must run separately")
    for r in final:
        chosen = select_lr(sweep, e.name, r["budget"], r["optimizer"])
        if chosen is None or not math.isclose(float(r["lr"]), chosen, rel_tol=1e-9):
            raise ProtocolError(f"{e.name}: final arm {r['arm']} at budget {r['budget']} ran at lr {r['lr']}, "
                                f"but the validation sweep chose {chosen}")


# -- statistics ---------------------------------------------------------------------------


def mstd(xs) -> tuple[float, float, float, int]:
    """mean, standard deviation, standard error, n."""
    xs = [float(x) for x in xs]
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan"), float("nan"), 0
    m = sum(xs) / n
    s = statistics.stdev(xs) if n > 1 else float("nan")
    return m, s, (s / math.sqrt(n) if n > 1 else float("nan")), n


def paired(final: list[dict], arm: str, ref: str, budget: int, key: str = "acc") -> dict | None:
    """Per-seed differences ``arm - ref`` at ``budget``: mean, se, wins/ties/losses, verdict."""
    a = {r["seed"]: r[key] for r in final if r["arm"] == arm and r["budget"] == budget and r.get(key) is not None}
    b = {r["seed"]: r[key] for r in final if r["arm"] == ref and r["budget"] == budget and r.get(key) is not None}
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = [a[s] - b[s] for s in seeds]
    m, _, se, n = mstd(d)
    verdict = ("no significant difference" if n < 2 or abs(m) <= 2 * se else ("higher" if m > 0 else "lower"))
    return dict(mean=m, se=se, n=n, wins=sum(x > 1e-12 for x in d), ties=sum(abs(x) <= 1e-12 for x in d),
                losses=sum(x < -1e-12 for x in d), verdict=verdict)
