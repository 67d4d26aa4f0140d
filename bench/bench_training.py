"""Training benchmark: Neptune vs AdamW vs SGD (Nesterov 0.9) on image classification,
plus the ablations Neptune without clipping (clip=0) and without the cautious mask.

    python bench/bench_training.py --quick                   # seconds: 1 seed, 3 arms, fixed lrs
    python bench/bench_training.py --jobs 2                  # digits on CPU, ~6 min on 2 cores
    python bench/bench_training.py --dataset fashion-mnist --jobs 2   # CPU, ~40 min on 2 cores
    python bench/bench_training.py --dataset fashion-mnist --full     # all 60,000 images, on a GPU
    python bench/bench_training.py --dataset cifar10 --data-dir ~/data   # on a GPU

Protocol (full mode):
1. lr sweep on a validation split: --val-size class-balanced images of the training set
   are held out (fixed), the sweep trains on the rest and is scored on them, never on the
   test set. Each optimizer at 4 peak lrs on --sweep-seeds seeds (seeds 1000, 1001, ...);
   a best lr on the grid's edge extends the grid by one lr that way (twice at most).
   Neptune's clip is swept too, at its best lr. Selection: best mean final validation accuracy.
2. final: every arm on --seeds fresh seeds (0, 1, ...), disjoint from the sweep's, trained
   on the whole training set (or its --train-size subset) and scored on the test set.
   Ablations run at Neptune's lr (--ablation-lrs both: also at AdamW's).
   A seed fixes the training subset, the initial weights and the batch order, identical
   across arms: differences between arms are paired per seed.
--lrs neptune=0.01,adamw=0.03,sgd=0.3 skips the sweep and uses those lrs; --arms picks arms.
Same network, schedule (linear warm-up 20% then linear decay to 0, per step), label
smoothing 0.2, epochs and batch size for every arm; Neptune uses
neptune_ext.param_groups (decay split, head not clipped), AdamW and SGD the same decay split.

Writes <out-dir>/training_<dataset>[_full][_<tag>].md, .csv (every run) and .png
(--quick: *_quick.*).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import time

import torch

from neptune_ext import training as lib
from neptune_ext.ops import cpu_name

HERE = os.path.dirname(os.path.abspath(__file__))

LR_GRID = {"neptune": [1e-3, 3e-3, 1e-2, 3e-2], "adamw": [1e-3, 3e-3, 1e-2, 3e-2], "sgd": [0.01, 0.03, 0.1, 0.3]}
# fashion-mnist: 3 lrs around a probe's (3e-3 / 0.1 at batch 128) to fit the CPU budget; the edge rule extends them
LR_GRID_SMALL = {"neptune": [1e-3, 3e-3, 1e-2], "adamw": [1e-3, 3e-3, 1e-2], "sgd": [0.03, 0.1, 0.3]}
# Budgets where the methods differ (on full digits every optimizer saturates near 98%).
# fashion-mnist: chosen by timing probes on the 2-core CPU (see bench/results/training_fashion-mnist.md).
PRESETS = {
    "digits": dict(epochs=8, batch_size=32, width=8, train_size=256, target=0.85, val_size=300,
                   sweep_seeds=5, seeds=20, ablation_lrs="both", best_clip_arm=True, clip_sweep=True),
    "fashion-mnist": dict(epochs=8, batch_size=128, width=8, train_size=5000, target=0.84, val_size=3000,
                          sweep_seeds=2, seeds=5, ablation_lrs="neptune", lr_grid=LR_GRID_SMALL, best_clip_arm=False,
                          clip_sweep=False),
    "cifar10": dict(epochs=10, batch_size=512, width=32, train_size=None, target=0.90, val_size=5000,
                    sweep_seeds=3, seeds=5, ablation_lrs="neptune", best_clip_arm=False, clip_sweep=True),
}
# --full: every training image, sized for a GPU
FULL = {
    "fashion-mnist": dict(epochs=8, batch_size=512, width=16, train_size=None, target=0.90),
    "cifar10": dict(epochs=10, batch_size=512, width=32, train_size=None, target=0.90),
}
CLIP_GRID = [0.03, 0.1, 0.3]  # Neptune's clip, swept at Neptune's best lr (0.1 = the default)
QUICK_LR = lib.DEFAULT_LR  # the digits sweep's choices
ARMS = ("neptune", "adamw", "sgd", "neptune clip=0", "neptune cautious=False")
EVAL_TRAIN_SIZE = 2000  # clean train accuracy (for the gap) after the last epoch, on this many images

# -- workers ----------------------------------------------------------------------------

_DATA = {}


def _init_worker(dataset, data_dir, threads, val_size):
    torch.set_num_threads(threads)
    data = lib.get_data(dataset, data_dir, log=lambda m: None)
    _DATA["test"] = data
    if val_size:  # only the sweep needs it
        _DATA["validation"] = lib.validation_split(data, val_size)


def _run(job: dict) -> dict:
    cfg = lib.RunConfig(**job["cfg"], eval_train_size=EVAL_TRAIN_SIZE, eval_train_every_epoch=False)
    t0 = time.perf_counter()
    hist = lib.train(cfg, _DATA[job["split"]], job["device"], log=lambda m: None)
    wall = time.perf_counter() - t0
    target = job["target"]
    hit = next((r for r in hist if r["test_acc"] >= target), None)
    last = hist[-1]
    return dict(
        phase=job["phase"], scored_on=job["split"], arm=job["arm"], optimizer=cfg.optimizer, lr=cfg.lr,
        clip="" if cfg.optimizer != "neptune" else (0.1 if cfg.clip is None else cfg.clip),
        cautious="" if cfg.optimizer != "neptune" else cfg.cautious, seed=cfg.seed,
        final_test_acc=last["test_acc"], best_test_acc=max(r["test_acc"] for r in hist),
        final_train_acc=last["train_eval_acc"], gap=last["train_eval_acc"] - last["test_acc"],
        final_train_loss=last["train_loss"],
        epochs_to_target=hit["epoch"] if hit else "", seconds_to_target=round(hit["seconds"], 3) if hit else "",
        train_seconds=round(last["seconds"], 3), wall_seconds=round(wall, 3),
        test_acc_curve=";".join(f"{r['test_acc']:.4f}" for r in hist),
    )


def run_key(phase, arm, cfg: dict) -> tuple:
    """What identifies a run in the progress log (--resume skips the jobs already there)."""
    nep = cfg["optimizer"] == "neptune"
    return (phase, arm, cfg["optimizer"], float(cfg["lr"]), cfg["seed"],
            (0.1 if cfg.get("clip") is None else float(cfg["clip"])) if nep else "",
            cfg.get("cautious", True) if nep else "")


def run_jobs(jobs, args, desc):
    out = [args.done[k] for k in (run_key(j["phase"], j["arm"], j["cfg"]) for j in jobs) if k in args.done]
    jobs = [j for j in jobs if run_key(j["phase"], j["arm"], j["cfg"]) not in args.done]
    if not jobs:
        return out
    from tqdm import tqdm


    def keep(r):  # every finished run also goes to the progress log, so a cut-short run can be reported
        out.append(r)
        with open(args.stem + ".runs.jsonl", "a") as f:
            f.write(json.dumps(r) + "\n")

    if args.jobs > 1:
        import multiprocessing as mp

        ctx = mp.get_context("fork" if sys.platform.startswith("linux") and args.device == "cpu" else "spawn")
        with ctx.Pool(args.jobs, _init_worker, (args.dataset, args.data_dir, args.threads, args.sweep_val_size)) as pool:
            for r in tqdm(pool.imap_unordered(_run, jobs), total=len(jobs), desc=desc, disable=args.no_progress):
                keep(r)
    else:
        for j in tqdm(jobs, desc=desc, disable=args.no_progress):
            keep(_run(j))
    return out


# -- statistics -------------------------------------------------------------------------


def mstd(xs):
    xs = [float(x) for x in xs]
    n = len(xs)
    m = sum(xs) / n
    s = statistics.stdev(xs) if n > 1 else float("nan")
    return m, s, s / math.sqrt(n) if n > 1 else float("nan"), n


def pct(m, s=None, se=None):
    out = f"{100 * m:.2f}"
    if s is not None and not math.isnan(s):
        out += f" ± {100 * s:.2f}"
    if se is not None and not math.isnan(se):
        out += f" (SE {100 * se:.2f})"
    return out


# -- main -------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=lib.DATASETS, default="digits")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--quick", action="store_true", help="1 seed, 3 arms, fixed lrs, 3 epochs (a demo, not a result)")
    p.add_argument("--full", action="store_true", help="train on the whole training set with the GPU budget (FULL)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per arm in the final comparison")
    p.add_argument("--sweep-seeds", type=int, default=None)
    p.add_argument("--val-size", type=int, default=None, help="training images held out to score the sweep")
    for k in ("epochs", "batch_size", "width", "train_size"):
        p.add_argument("--" + k.replace("_", "-"), type=int, default=None)
    p.add_argument("--target", type=float, default=None, help="test accuracy for time-to-target")
    p.add_argument("--lrs", default=None, help="skip the sweep: e.g. neptune=3e-3,adamw=3e-3,sgd=0.1")
    p.add_argument("--arms", default=None, help=f"comma-separated subset of {', '.join(ARMS)}")
    p.add_argument("--ablation-lrs", choices=("neptune", "both"), default=None,
                   help="run the clip/mask ablations at Neptune's lr, or at AdamW's too")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--jobs", type=int, default=1, help="parallel worker processes (CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--tag", default="", help="suffix of the output names")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs already in <stem>.runs.jsonl (same arguments) and run only the missing ones")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the .md/.png from the runs already in <stem>.runs.jsonl (a cut-short run, or a report change)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    # resolve the fallback once, here (it prints the one-line reason), so the results are named after what ran
    data = lib.get_data(args.dataset, args.data_dir)
    args.dataset, args.flip = data.name, data.flip
    preset = dict(PRESETS[args.dataset])
    if args.full:
        if args.dataset not in FULL:
            p.error(f"--full: no full budget for {args.dataset}")
        preset.update(FULL[args.dataset])
    args.lr_grid = preset.pop("lr_grid", LR_GRID)
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.quick:
        args.epochs = min(args.epochs, 3)
    args.lr_fixed = {}
    if args.lrs:
        for item in args.lrs.split(","):
            opt, _, lr = item.partition("=")
            if opt not in lib.OPTIMIZERS or not lr:
                p.error(f"--lrs: expected OPT=LR with OPT in {lib.OPTIMIZERS}, got {item!r}")
            args.lr_fixed[opt] = float(lr)
        if set(args.lr_fixed) != set(lib.OPTIMIZERS):
            p.error(f"--lrs: give an lr for each of {lib.OPTIMIZERS}")
    args.arm_list = list(ARMS) if args.arms is None else [a.strip() for a in args.arms.split(",")]
    bad = [a for a in args.arm_list if a not in ARMS]
    if bad:
        p.error(f"--arms: unknown {bad}; valid: {', '.join(ARMS)}")
    return args


def git_head() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def base_cfg(args, optimizer, lr, seed, **kw):
    return dict(optimizer=optimizer, lr=lr, seed=seed, epochs=args.epochs, batch_size=args.batch_size,
                width=args.width, train_size=args.train_size, **kw)


def job(args, phase, arm, cfg):
    return dict(phase=phase, arm=arm, cfg=cfg, device=args.device, target=args.target,
                split="validation" if phase == "sweep" else "test")


def sweep(args, runs):
    """The lr sweep (and Neptune's clip sweep) on the validation split; returns (best_lr, best_clip)."""
    def mean_acc(opt, lr, clip=0.1):
        return mstd([r["final_test_acc"] for r in runs if r["optimizer"] == opt and r["lr"] == lr
                     and (opt != "neptune" or (r["clip"] == clip and r["cautious"] is True))])[0]

    sweep_seeds = [1000 + i for i in range(args.sweep_seeds)]
    jobs = [job(args, "sweep", f"{opt}", base_cfg(args, opt, lr, s))
            for opt, lrs in args.lr_grid.items() for lr in lrs for s in sweep_seeds]
    runs += run_jobs(jobs, args, "lr sweep")
    grid = {opt: list(lrs) for opt, lrs in args.lr_grid.items()}
    best_lr = {}
    for _ in range(2):  # a best lr on the edge of the grid: extend the grid by one lr (x3) that way, twice at most
        best_lr = {opt: max(lrs, key=lambda lr: mean_acc(opt, lr)) for opt, lrs in grid.items()}
        extra = {}
        for opt, lrs in grid.items():
            if best_lr[opt] == max(lrs):
                extra[opt] = float(f"{max(lrs) * 3:.3g}")
            elif best_lr[opt] == min(lrs):
                extra[opt] = float(f"{min(lrs) / 3:.3g}")
        if not extra:
            break
        for opt, lr in extra.items():
            grid[opt] = sorted(grid[opt] + [lr])
        runs += run_jobs([job(args, "sweep", opt, base_cfg(args, opt, lr, s)) for opt, lr in extra.items()
                          for s in sweep_seeds], args, "lr sweep (grid edge)")
    best_lr = {opt: max(lrs, key=lambda lr: mean_acc(opt, lr)) for opt, lrs in grid.items()}
    if not args.clip_sweep:  # the final arm "neptune clip=0" still measures clipping, paired
        return best_lr, None
    jobs = [job(args, "sweep", "neptune", base_cfg(args, "neptune", best_lr["neptune"], s, clip=c))
            for c in CLIP_GRID + [0.0] if c != 0.1 for s in sweep_seeds]
    runs += run_jobs(jobs, args, "clip sweep")
    best_clip = max(CLIP_GRID + [0.0], key=lambda c: mean_acc("neptune", best_lr["neptune"], c))
    return best_lr, best_clip


def final_arms(args, best_lr, best_clip=None):
    """name -> config (seed 0) of every arm of the final comparison."""
    lr_n, lr_a = best_lr["neptune"], best_lr["adamw"]
    cfgs = {
        "neptune": base_cfg(args, "neptune", lr_n, 0),
        "adamw": base_cfg(args, "adamw", lr_a, 0),
        "sgd": base_cfg(args, "sgd", best_lr["sgd"], 0),
        "neptune clip=0": base_cfg(args, "neptune", lr_n, 0, clip=0.0),
        "neptune cautious=False": base_cfg(args, "neptune", lr_n, 0, cautious=False),
    }
    arms = {a: cfgs[a] for a in args.arm_list}
    # Neptune with clip=0 and cautious=False *is* AdamW, so {AdamW, clip only, mask only, Neptune}
    # is a 2x2 design at one lr; --ablation-lrs both runs it at AdamW's lr too when the lrs differ.
    if args.ablation_lrs == "both" and lr_a != lr_n and set(ARMS) <= set(arms):
        sfx = f" lr={lr_a:g}"
        arms["neptune" + sfx] = base_cfg(args, "neptune", lr_a, 0)
        arms["adamw lr=" + f"{lr_n:g}"] = base_cfg(args, "adamw", lr_n, 0)
        arms["neptune clip=0" + sfx] = base_cfg(args, "neptune", lr_a, 0, clip=0.0)
        arms["neptune cautious=False" + sfx] = base_cfg(args, "neptune", lr_a, 0, cautious=False)
    if args.best_clip_arm and best_clip not in (None, 0.1, 0.0) and "neptune" in arms:
        arms[f"neptune clip={best_clip:g}"] = base_cfg(args, "neptune", lr_n, 0, clip=best_clip)
    return arms


def main(argv=None):
    args = parse_args(argv)
    args.load_start = os.getloadavg()[0]
    args.git_head = git_head()
    args.sweep_val_size = None if (args.quick or args.lr_fixed) else args.val_size
    os.makedirs(args.out_dir, exist_ok=True)
    name = f"training_{args.dataset}" + ("_full" if args.full else "") + (f"_{args.tag}" if args.tag else "")
    args.stem = stem = os.path.join(args.out_dir, name + ("_quick" if args.quick else ""))
    if args.report_only:
        return write_outputs(args, *replay(args))
    args.done = {}
    if args.resume and os.path.exists(stem + ".runs.jsonl"):
        with open(stem + ".runs.jsonl") as f:
            for r in (json.loads(line) for line in f if line.strip()):
                args.done[(r["phase"], r["arm"], r["optimizer"], float(r["lr"]), r["seed"], r["clip"], r["cautious"])] = r
        print(f"resuming: {len(args.done)} runs already in {stem}.runs.jsonl")
    elif os.path.exists(stem + ".runs.jsonl"):
        os.remove(stem + ".runs.jsonl")
    if not (args.resume and os.path.exists(stem + ".meta.json")):
        with open(stem + ".meta.json", "w") as f:
            json.dump(dict(start=time.time(), load_start=args.load_start, git_head=args.git_head), f)
    with open(stem + ".meta.json") as f:
        meta = json.load(f)
    args.load_start, args.git_head = meta["load_start"], meta["git_head"]
    t_start = time.perf_counter() - (time.time() - meta["start"])  # a resumed run counts from its first start
    if args.jobs == 1:
        _init_worker(args.dataset, args.data_dir, args.threads, args.sweep_val_size)
    runs, best_lr, best_clip = [], {}, None

    if args.quick:
        seeds = [0]
        best_lr = dict(QUICK_LR)
        arms = {opt: base_cfg(args, opt, QUICK_LR[opt], 0) for opt in ("neptune", "adamw", "sgd")}
    else:
        if args.lr_fixed:
            best_lr = dict(args.lr_fixed)
        else:
            best_lr, best_clip = sweep(args, runs)
        seeds = list(range(args.seeds))
        arms = final_arms(args, best_lr, best_clip)
    args.sweep_minutes = (time.perf_counter() - t_start) / 60

    # seed by seed, so that a run cut short has the same seeds in every arm
    jobs = [job(args, "final", arm, dict(cfg, seed=s)) for s in seeds for arm, cfg in arms.items()]
    runs += run_jobs(jobs, args, "final")
    total = time.perf_counter() - t_start
    os.remove(stem + ".meta.json")
    runs = write_outputs(args, runs, arms, best_lr, best_clip, total)
    os.remove(stem + ".runs.jsonl")
    return runs


def replay(args):
    """(runs, arms, best_lr, best_clip, total) from the progress log of a run with these arguments."""
    with open(args.stem + ".runs.jsonl") as f:
        runs = [json.loads(line) for line in f if line.strip()]
    meta = {}
    if os.path.exists(args.stem + ".meta.json"):
        with open(args.stem + ".meta.json") as f:
            meta = json.load(f)
        args.load_start, args.git_head = meta["load_start"], meta["git_head"]
    sweep_runs = [r for r in runs if r["phase"] == "sweep"]
    final = [r for r in runs if r["phase"] == "final"]
    best_lr = {}
    for o in lib.OPTIMIZERS:  # the final arm's lr, else (cut short before it) the sweep's best
        mine = [r for r in sweep_runs if r["optimizer"] == o and (o != "neptune" or (r["clip"] == 0.1 and r["cautious"] is True))]
        lrs = {r["lr"] for r in mine}
        best = max(lrs, key=lambda lr: mstd([r["final_test_acc"] for r in mine if r["lr"] == lr])[0], default=None)
        best_lr[o] = next((r["lr"] for r in final if r["arm"] == o), best)
    clips = {r["clip"] for r in sweep_runs if r["optimizer"] == "neptune" and r["lr"] == best_lr.get("neptune")}
    best_clip = None
    if len(clips) > 1:
        best_clip = max(clips, key=lambda c: mstd([r["final_test_acc"] for r in sweep_runs if r["optimizer"] == "neptune"
                                                  and r["lr"] == best_lr["neptune"] and r["clip"] == c
                                                  and r["cautious"] is True])[0])
    arms = {}
    for r in final:  # in the order the runs finished; a cut-short arm is reported with its seeds so far
        arms.setdefault(r["arm"], dict(optimizer=r["optimizer"], lr=r["lr"],
                                       **({"cautious": r["cautious"]} if r["optimizer"] == "neptune" else {}),
                                       **({"clip": r["clip"]} if "clip=" in r["arm"] else {})))
    args.sweep_minutes = float("nan")
    total = time.time() - meta.get("start", time.time())
    return runs, arms, best_lr, best_clip, total


def write_outputs(args, runs, arms, best_lr, best_clip, total):
    stem = args.stem
    write_csv(stem + ".csv", runs)
    plot(stem + ".png", runs, list(arms), args)
    md = report(runs, arms, best_lr, best_clip, args, total, os.path.basename(stem))
    with open(stem + ".md", "w") as f:
        f.write(md)
    final = [r for r in runs if r["phase"] == "final"]
    for arm in arms:
        m, s, se, n = mstd([r["final_test_acc"] for r in final if r["arm"] == arm])
        print(f"{arm:>24}: final test acc {pct(m, s, se)} % (n={n})")
    print(f"wrote {stem}.md/.csv/.png in {total:.0f}s")
    return runs


def write_csv(path, runs):
    fields = list(runs[0].keys())
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in sorted(runs, key=lambda r: (r["phase"] != "sweep", r["arm"], r["lr"], str(r["clip"]), r["seed"])):
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def curves(runs, arm):
    cs = [[float(v) for v in r["test_acc_curve"].split(";")] for r in runs if r["phase"] == "final" and r["arm"] == arm]
    return [mstd(col) for col in zip(*cs)]


def label(arm, final):
    if "lr=" in arm:
        return arm
    return f"{arm} lr={next(float(r['lr']) for r in final if r['arm'] == arm):g}"


def plot(path, runs, arms, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    final = [r for r in runs if r["phase"] == "final"]
    if not final:  # a report of a run cut short in its sweep
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for arm in arms:
        st = curves(runs, arm)
        ep = list(range(1, len(st) + 1))
        m = [100 * x[0] for x in st]
        se = [0 if math.isnan(x[2]) else 100 * x[2] for x in st]
        line = a.plot(ep, m, marker="o", ms=3, label=label(arm, final))[0]
        a.fill_between(ep, [u - v for u, v in zip(m, se)], [u + v for u, v in zip(m, se)], alpha=0.2, color=line.get_color())
    a.axhline(100 * args.target, color="gray", ls=":", lw=1)
    a.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy, mean ± SE over seeds")
    a.set_ylim(bottom=max(0, min(100 * curves(runs, arm)[len(curves(runs, arm)) // 2][0] for arm in arms) - 10))
    a.legend(fontsize=8)
    stats = [mstd([r["final_test_acc"] for r in final if r["arm"] == arm]) for arm in arms]
    b.barh(range(len(arms)), [100 * s[0] for s in stats],
           xerr=[0 if math.isnan(s[2]) else 100 * s[2] for s in stats], color="C0", alpha=0.7, capsize=3)
    b.set_yticks(range(len(arms)), [label(arm, final) for arm in arms])
    lo = min(100 * s[0] for s in stats)
    b.set_xlim(max(0, lo - 5), min(100, max(100 * s[0] for s in stats) + 2))
    b.set(xlabel="final test accuracy (%), mean ± SE", title=f"n = {stats[0][3]} seeds per arm")
    fig.suptitle(f"{args.dataset}: width {args.width}, {args.epochs} epochs, batch {args.batch_size}, "
                 f"train size {args.train_size or 'all'}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def find_arm(arms, optimizer, lr, clip=None, cautious=True):
    """The arm running ``optimizer`` at ``lr`` with these Neptune settings (None: not run)."""
    for name, c in arms.items():
        if c["optimizer"] == optimizer and c["lr"] == lr and c.get("clip") == clip and c.get("cautious", True) == cautious:
            return name
    return None


def report(runs, arms, best_lr, best_clip, args, total, stem):
    final = [r for r in runs if r["phase"] == "final"]
    sweep = [r for r in runs if r["phase"] == "sweep"]
    n_seeds = len({r["seed"] for r in final})
    L = [f"# Training benchmark: {args.dataset}{' (quick demo: 1 seed, fixed lrs, not a result)' if args.quick else ''}", ""]
    dev = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else cpu_name()
    L.append(f"Generated by `python bench/bench_training.py {' '.join(args.argv)}` in {total / 60:.1f} min "
             f"(sweep {args.sweep_minutes:.1f} min) on {args.device} ({dev}, {os.cpu_count()} cores, "
             f"{args.jobs} worker(s) x {args.threads} thread(s), torch {torch.__version__}), "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.")
    from neptune_ext import build_info

    head = args.git_head

    L.append(f"Code: git {head or '?'} at the start (uncommitted changes not tracked here); Neptune CPU kernel ISA: "
             f"{build_info().get('cpu_isa', '?')}. Adam-family trajectories are chaotic (docs/rule.md, 'Numerics and tolerances'): a kernel change "
             "that moves rounding changes individual runs, not the statistics.")
    L.append("")
    if args.device == "cpu":
        L.append(f"Load average (1 min) at start/end: {args.load_start:.1f} / {os.getloadavg()[0]:.1f} on "
                 f"{os.cpu_count()} cores. The seconds columns are wall time of runs sharing that machine "
                 f"({args.jobs} parallel worker(s), and any other load on it); read them as rough, and "
                 "epochs-to-target as the speed measure.")
        L.append("")
    aug = "random crop of the reflect-padded image" + (" + horizontal flip" if args.flip else "")
    L.append(f"Setup: ResNet-9 style net (neptune_ext/training.py), width {args.width}, {args.epochs} epochs, batch "
             f"{args.batch_size}, training subset {args.train_size or 'all'} images (class-balanced, chosen by the seed), "
             f"augmentation: {aug}; label smoothing 0.2, linear warm-up (20% of steps) then linear "
             "decay to 0. Weight decay 1e-2 for Neptune/AdamW, 5e-4 for SGD (Nesterov, momentum 0.9), on ndim>=2 weights "
             "only; Neptune's head is not clipped (neptune_ext.param_groups). Final runs: test accuracy on the "
             f"dataset's test split; 'train' accuracy is clean (no augmentation) on {EVAL_TRAIN_SIZE} images of the "
             f"training subset after the last epoch. Target for time-to-target: {100 * args.target:.0f}% test accuracy.")
    L.append("")
    if sweep:
        L += ["## Learning-rate sweep (validation split)", "",
              f"Mean final validation accuracy (%) over {args.sweep_seeds} sweep seeds (1000+), disjoint from the final "
              f"seeds. Validation: {args.val_size} class-balanced images held out of the training set (fixed); the "
              "sweep's training subsets are drawn from the rest. The test set is not used.", ""]
        L.append("| optimizer | lr: mean final validation acc (%) | chosen lr |")
        L.append("|---|---|---|")
        for opt in LR_GRID:
            cells = []
            for lr in sorted({r["lr"] for r in sweep if r["optimizer"] == opt}):
                m = mstd([r["final_test_acc"] for r in sweep if r["optimizer"] == opt and r["lr"] == lr and
                          (opt != "neptune" or (r["clip"] == 0.1 and r["cautious"] is True))])[0]
                cells.append(f"{lr:g}: {100 * m:.2f}")
            chosen = f"**{best_lr[opt]:g}**" if best_lr.get(opt) is not None else "-"
            L.append(f"| {opt} | " + ", ".join(cells) + f" | {chosen} |")
        L.append("")
        if any(r["optimizer"] == "neptune" and r["clip"] != 0.1 for r in sweep):  # the clip sweep ran
            L += [f"Neptune's clip at lr {best_lr['neptune']:g} (same sweep seeds):", ""]
            L.append("| clip | " + " | ".join(f"{c:g}" for c in [0.0] + CLIP_GRID) + " |")
            L.append("|---|" + "---|" * (len(CLIP_GRID) + 1))
            cells = []
            for c in [0.0] + CLIP_GRID:
                xs = [r["final_test_acc"] for r in sweep if r["optimizer"] == "neptune" and r["lr"] == best_lr["neptune"]
                      and r["clip"] == c and r["cautious"] is True]
                cells.append(f"{100 * mstd(xs)[0]:.2f}" if xs else "-")  # "-": not run (a run cut short)
            L.append("| final validation acc (%) | " + " | ".join(cells) + " |")
        L.append("")

    L += ["## Final comparison", "",
          f"{n_seeds} seeds per arm (0..{n_seeds - 1}). mean ± std (SE = std/sqrt(n)). Gap = clean train accuracy minus "
          "test accuracy at the end (overfitting). Time-to-target: epochs and training seconds (evaluation excluded) to "
          "first reach the target, averaged over the seeds that reach it.", ""]
    L.append("| arm | lr | final test acc (%) | best-epoch test acc (%) | train acc (%) | gap (points) | reached target "
             "| epochs to target | s to target | s per run |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for arm in arms:
        rs = [r for r in final if r["arm"] == arm]
        f = mstd([r["final_test_acc"] for r in rs])
        bt = mstd([r["best_test_acc"] for r in rs])
        tr = mstd([r["final_train_acc"] for r in rs])
        gap = mstd([r["gap"] for r in rs])
        hit = [r for r in rs if r["epochs_to_target"] != ""]
        ett = f"{mstd([r['epochs_to_target'] for r in hit])[0]:.2f}" if hit else "-"
        stt = f"{mstd([r['seconds_to_target'] for r in hit])[0]:.2f}" if hit else "-"
        sec = mstd([r["train_seconds"] for r in rs])[0]
        L.append(f"| {arm} | {rs[0]['lr']:g} | {pct(*f[:3])} | {pct(bt[0])} | {pct(tr[0])} | "
                 f"{100 * gap[0]:.2f} ± {100 * gap[1] if gap[3] > 1 else float('nan'):.2f} | {len(hit)}/{len(rs)} | "
                 f"{ett} | {stt} | {sec:.2f} |")
    L.append("")
    if n_seeds > 1:
        for ref in ("adamw", "sgd"):
            if ref not in arms:
                continue
            L += [f"### Paired differences against {ref} (arm minus {ref}, same seeds)", "",
                  "| arm | final test acc: mean diff (points) | SE | wins/ties/losses | verdict (|mean| > 2 SE) "
                  "| best-epoch test acc: mean diff | SE | wins/ties/losses |", "|---|---|---|---|---|---|---|---|"]
            for arm in arms:
                if arm == ref:
                    continue
                cells = []
                for key in ("final_test_acc", "best_test_acc"):
                    base = {r["seed"]: r[key] for r in final if r["arm"] == ref}
                    d = [r[key] - base[r["seed"]] for r in final if r["arm"] == arm]
                    m, s, se, n = mstd(d)
                    w, t, l = sum(x > 1e-9 for x in d), sum(abs(x) <= 1e-9 for x in d), sum(x < -1e-9 for x in d)
                    cells += [f"{100 * m:+.2f}", f"{100 * se:.2f}", f"{w}/{t}/{l}"]
                    if key == "final_test_acc":
                        cells.append("no significant difference" if abs(m) <= 2 * se else ("better" if m > 0 else "worse"))
                L.append(f"| {arm} | " + " | ".join(cells) + " |")
            L.append("")
        ablation_lrs = sorted({arms[a]["lr"] for a in arms if a.startswith("neptune clip=0")})
        for lr in ablation_lrs:
            full = find_arm(arms, "neptune", lr)
            cells = {(0, 0): find_arm(arms, "adamw", lr), (1, 0): find_arm(arms, "neptune", lr, cautious=False),
                     (0, 1): find_arm(arms, "neptune", lr, clip=0.0), (1, 1): full}
            L += [f"### Ablations at lr {lr:g} (paired against full Neptune at that lr, same seeds)", "",
                  "| arm | mean diff vs neptune (points) | SE | verdict |", "|---|---|---|---|"]
            nb = {r["seed"]: r["final_test_acc"] for r in final if r["arm"] == full}
            others = [cells[(0, 1)], cells[(1, 0)], cells[(0, 0)]]
            others += [a for a in arms if arms[a]["lr"] == lr and arms[a]["optimizer"] == "neptune"
                       and arms[a].get("clip") not in (None, 0.0)]
            for arm in others:
                if arm is None:
                    continue
                d = [r["final_test_acc"] - nb[r["seed"]] for r in final if r["arm"] == arm]
                m, s, se, n = mstd(d)
                verdict = "no significant difference" if abs(m) <= 2 * se else ("better" if m > 0 else "worse")
                L.append(f"| {arm} | {100 * m:+.2f} | {100 * se:.2f} | {verdict} |")
            L.append("")
            if None not in cells.values():
                acc = {k: pct(*mstd([r["final_test_acc"] for r in final if r["arm"] == a])[:3]) for k, a in cells.items()}
                L += [f"2x2 at lr {lr:g}, clipping x cautious mask (final test acc %, mean ± std (SE)):", "",
                      "| | cautious off | cautious on |", "|---|---|---|",
                      f"| clip off | {acc[(0, 0)]} (= AdamW) | {acc[(0, 1)]} |",
                      f"| clip on (0.1) | {acc[(1, 0)]} | {acc[(1, 1)]} (= Neptune) |", ""]
    L += [f"Plot: `{stem}.png`. Every run: `{stem}.csv` (per-epoch test accuracy in `test_acc_curve`).", ""]
    return "\n".join(L)


if __name__ == "__main__":
    main()
