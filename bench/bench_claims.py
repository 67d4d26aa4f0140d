"""The seed's three claims, measured on Fashion-MNIST: does Neptune train faster, with fewer
resources, with less overfitting (and on more than one architecture)?

    python bench/bench_claims.py --jobs 2                 # every CPU experiment (hours on 2 cores), resumable
    python bench/bench_claims.py --jobs 2 --resume        # continue after an interruption
    python bench/bench_claims.py --timing                 # step and run times, alone on a quiet machine
    python bench/bench_claims.py --memory                 # optimizer-state bytes and peak process memory
    python bench/bench_claims.py --report-only            # rewrite the report from what has run
    python bench/bench_claims.py --quick                  # seconds: every experiment, tiny, on digits (a demo)
    python bench/bench_claims.py --experiments speed-60k-gpu --device cuda   # on a GPU

Experiments and the protocol (validation-chosen lrs per budget, disjoint seeds, budgets run
separately) are in bench/claims_protocol.py; its rules are checked before the report is
written. Training runs record accuracy and epochs; their wall time is kept but not
quoted, since they share the cores with each other (2 workers) and with anything else
running. Seconds are measured by ``--timing``, one run at a time on an otherwise idle
machine, and a budget's seconds are its steps times the measured step time, checked
against whole runs timed in the same pass.

Writes bench/results/claims.md (the report), claims_runs.csv (every run),
claims_timing.csv, claims_memory.csv and claims_*.png; progress in claims.runs.jsonl.
"""
from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import resource
import subprocess
import sys
import time

import torch

from neptune_ext import training as lib
from neptune_ext.ops import cpu_name

import claims_protocol as P  # bench/, the script's own directory (on sys.path when run)

HERE = os.path.dirname(os.path.abspath(__file__))

RESULTS = os.path.join(HERE, "results")

# -- workers --------------------------------------------------------------------------------

_STATE: dict = {}


def _init_worker(dataset: str, data_dir: str, threads: int) -> None:
    torch.set_num_threads(threads)
    _STATE.clear()
    _STATE["base"] = lib.get_data(dataset, data_dir, log=lambda m: None)


def _data(label_noise: float, val_size: int, split: str) -> lib.ImageData:
    """An experiment's data: noisy training labels if asked, and for the sweep the
    validation split (checked disjoint from what the sweep trains on)."""
    key = (label_noise, val_size if split == "validation" else None)
    if key not in _STATE:
        d = _STATE["base"]
        if label_noise:
            d = lib.with_label_noise(d, label_noise)
        if split == "validation":
            d = lib.validation_split(d, val_size)
            P.check_split(d)
        _STATE[key] = d
    return _STATE[key]


def run_one(j: dict) -> dict:
    cfg = lib.RunConfig(**j["cfg"], eval_train_every_epoch=False, eval_test_every_epoch=False)
    data = _data(j["label_noise"], j["val_size"], j["split"])
    t0 = time.perf_counter()
    hist = lib.train(cfg, data, j["device"], log=lambda m: None)
    wall = time.perf_counter() - t0
    last = hist[-1]
    return dict(
        exp=j["exp"], phase=j["phase"], arm=j["arm"], budget=j["budget"], optimizer=cfg.optimizer, lr=cfg.lr,
        seed=cfg.seed, clip="" if cfg.optimizer != "neptune" else (0.1 if cfg.clip is None else cfg.clip),
        cautious="" if cfg.optimizer != "neptune" else cfg.cautious, state_dtype=cfg.state_dtype,
        scored_on=j["split"], acc=last["test_acc"], train_acc=last["train_eval_acc"],
        gap=last["train_eval_acc"] - last["test_acc"], train_clean_acc=last.get("train_eval_clean_acc"),
        memorized=last.get("memorized"), train_loss=last["train_loss"], epochs_run=len(hist),
        steps_per_epoch=last["steps_per_epoch"], total_steps=last["total_steps"],
        n_train=min(len(data.train_y), cfg.train_size or len(data.train_y)),
        train_seconds=round(last["seconds"], 3), optimizer_seconds=round(last["optimizer_seconds"], 3),
        wall_seconds=round(wall, 3), device=j["device"], machine=machine(j["device"]),
    )


@functools.lru_cache(maxsize=None)
def machine(device: str) -> str:
    """What a result was measured on: the CPU's or the GPU's name (the report names it)."""
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else cpu_name()


def run_key(j: dict) -> str:
    c = j["cfg"]
    return json.dumps([j["exp"], j["phase"], j["arm"], j["budget"], c["optimizer"], float(c["lr"]), c["seed"]])


def record_key(r: dict) -> str:
    return json.dumps([r["exp"], r["phase"], r["arm"], r["budget"], r["optimizer"], float(r["lr"]), r["seed"]])


class Runner:
    """Runs jobs on a pool of worker processes, appending every finished run to the progress
    log (so ``--resume`` continues an interrupted benchmark without rerunning anything)."""

    def __init__(self, args):
        self.args = args
        self.log_path = args.stem + ".runs.jsonl"
        self.done: dict[str, dict] = {}
        if args.resume and os.path.exists(self.log_path):
            with open(self.log_path) as f:
                for line in f:
                    if line.strip():
                        r = json.loads(line)
                        self.done[record_key(r)] = r
            print(f"resuming: {len(self.done)} runs already in {self.log_path}", flush=True)
        elif os.path.exists(self.log_path) and not args.report_only:
            os.remove(self.log_path)
        self.pool = None

    @property
    def runs(self) -> list[dict]:
        return list(self.done.values())

    def run(self, jobs: list[dict], desc: str) -> None:
        todo = [j for j in jobs if run_key(j) not in self.done]
        if not todo:
            return
        for j in todo:
            j["device"] = self.args.device
        # longest first, so the pool's workers finish together
        todo.sort(key=lambda j: -(j["budget"] * (j["cfg"]["train_size"] or 60000) * (3 if j["cfg"]["arch"] == "vit" else 1)))
        t0 = time.time()
        results = (self._pool().imap_unordered(run_one, todo) if self.args.jobs > 1 else map(run_one, todo))
        for i, r in enumerate(results, 1):
            self.done[record_key(r)] = r
            with open(self.log_path, "a") as f:
                f.write(json.dumps(r) + "\n")
            if not self.args.no_progress:
                print(f"[{desc}] {i}/{len(todo)} {time.time() - t0:.0f}s: {r['arm']} lr={r['lr']:g} budget={r['budget']} "
                      f"seed={r['seed']} {r['scored_on']} acc={100 * r['acc']:.2f}", flush=True)

    def _pool(self):
        if self.pool is None:
            import multiprocessing as mp

            ctx = mp.get_context("fork" if sys.platform.startswith("linux") and self.args.device == "cpu" else "spawn")
            self.pool = ctx.Pool(self.args.jobs, _init_worker, (self.args.dataset, self.args.data_dir, self.args.threads))
        return self.pool

    def close(self):
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


def run_experiment(e: P.Experiment, runner: Runner) -> None:
    runner.run(P.sweep_jobs(e), f"{e.name} sweep")
    for b, grid in P.edge_extension(runner.runs, e).items():  # one extension per budget and optimizer, at most
        ext = P.Experiment(**{**e.__dict__, "budgets": [b], "lr_grid": grid})
        runner.run(P.sweep_jobs(ext), f"{e.name} sweep (grid edge)")
    runner.run(P.final_jobs(e, runner.runs), f"{e.name} final")
    P.check_protocol(e, runner.runs)


# -- timing (quiet machine) -----------------------------------------------------------------


def timing(args, exps: list[P.Experiment]) -> list[dict]:
    """Step times per experiment and arm: 2-epoch runs of ``TIMING_STEPS`` steps each, the
    second epoch timed (the first warms up), arms interleaved over ``args.rounds`` rounds;
    plus the test-set evaluation and one whole run per arm at each experiment's smallest
    budget, to check that budget x steps x step time predicts a run's seconds."""
    _init_worker(args.dataset, args.data_dir, args.threads)
    rows = []
    steps = 30
    for e in exps:
        for rnd in range(args.rounds):
            order = e.arms[rnd % len(e.arms):] + e.arms[:rnd % len(e.arms)]
            for arm in order:
                cfg = P.run_cfg(e, arm, lib.DEFAULT_LR[P.ARMS[arm]["optimizer"]], 0, 2)
                cfg.update(train_size=steps * e.batch_size, eval_train_size=0)
                c = lib.RunConfig(**cfg, eval_train_every_epoch=False, eval_test_every_epoch=False)
                data = _data(e.label_noise, e.val_size, "test")
                h = lib.train(c, data, args.device, log=lambda m: None)
                n = h[-1]["steps_per_epoch"]
                step = (h[1]["seconds"] - h[0]["seconds"]) / n
                opt = (h[1]["optimizer_seconds"] - h[0]["optimizer_seconds"]) / n
                model = lib.make_model(e.arch, data.num_classes, data.in_channels, data.image_size, e.width)
                model = model.to(args.device).to(memory_format=torch.channels_last)
                t0 = time.perf_counter()
                lib.predict(model, data.test_x.to(args.device), data.to(args.device), 250)
                ev = time.perf_counter() - t0
                rows.append(dict(kind="step", exp=e.name, arm=arm, round=rnd, step_ms=1e3 * step,
                                 optimizer_ms=1e3 * opt, eval_s=ev, run_s=""))
                print(f"timing {e.name} {arm} round {rnd}: step {1e3 * step:.1f} ms, optimizer {1e3 * opt:.2f} ms, "
                      f"test eval {ev:.2f} s", flush=True)
        if args.whole_runs == "all" or e.name in (args.whole_runs or "").split(","):
            b = min(e.budgets)
            for arm in e.arms:
                cfg = P.run_cfg(e, arm, lib.DEFAULT_LR[P.ARMS[arm]["optimizer"]], 0, b)
                t0 = time.perf_counter()
                lib.train(lib.RunConfig(**cfg, eval_train_every_epoch=False, eval_test_every_epoch=False),
                          _data(e.label_noise, e.val_size, "test"), args.device, log=lambda m: None)
                rows.append(dict(kind="run", exp=e.name, arm=arm, round=0, step_ms="", optimizer_ms="", eval_s="",
                                 run_s=time.perf_counter() - t0, budget=b))
                print(f"timing {e.name} {arm}: whole budget-{b} run {rows[-1]['run_s']:.1f} s", flush=True)
    return rows


# -- memory ---------------------------------------------------------------------------------

MEMORY_MODELS = {  # name -> (arch, width, batch)
    "resnet9 w8": ("resnet9", 8, 128),
    "vit": ("vit", 8, 128),
    "resnet9 w64": ("resnet9", 64, 32),
    "resnet9 w128": ("resnet9", 128, 8),
}
MEMORY_ARMS = ["none", "sgd", "adamw", "neptune", "neptune bf16 state"]


def memory_child(spec: dict) -> dict:
    """In a fresh process: a model, 3 training steps of one arm ("none": SGD without momentum, which keeps no state),
    then the optimizer state's bytes and the process's peak resident memory."""
    torch.set_num_threads(1)
    arch, width, batch = MEMORY_MODELS[spec["model"]]
    model = lib.make_model(arch, 10, 1, 28, width).to(memory_format=torch.channels_last)
    if spec["arm"] == "none":  # the baseline: an optimizer's machinery (torch.optim imports torch._dynamo) without state
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    else:
        a = P.ARMS[spec["arm"]]
        opt = lib.make_optimizer(a["optimizer"], model, 1e-3, state_dtype=a.get("state_dtype", "float32"))
    x = torch.randn(batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    for _ in range(3):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    n_params = sum(p.numel() for p in model.parameters())
    state = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    return dict(model=spec["model"], arm=spec["arm"], params=n_params, state_bytes=state,
                state_bytes_per_param=state / n_params, peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def memory(args) -> list[dict]:
    rows = []
    for rnd in range(args.rounds):
        for m in MEMORY_MODELS:
            for arm in MEMORY_ARMS:
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child",
                                      json.dumps(dict(model=m, arm=arm))], capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                r["round"] = rnd
                rows.append(r)
                print(f"memory {m} {arm}: state {r['state_bytes_per_param']:.2f} B/param, "
                      f"peak RSS {r['peak_rss_mib']:.1f} MiB", flush=True)
    return rows


# -- output ---------------------------------------------------------------------------------


def write_csv(path: str, rows: list[dict]) -> None:
    if not rows:
        return
    fields = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def read_csv(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            try:
                r[k] = float(v) if v not in ("", "True", "False") else {"": None, "True": True, "False": False}[v]
            except ValueError:
                pass
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiments", default=None, help=f"comma-separated; default: {','.join(P.CPU_EXPERIMENTS)}")
    p.add_argument("--dataset", default="fashion-mnist", choices=lib.DATASETS)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1, help="parallel worker processes (CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--quick", action="store_true", help="every experiment tiny, on digits: seconds, not a result")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--timing", action="store_true", help="measure step and run times (run it alone)")
    p.add_argument("--whole-runs", nargs="?", const="all", default=None, metavar="EXPERIMENTS",
                   help="with --timing: also time one whole run per arm (of these experiments, comma-separated; "
                        "default: all)")
    p.add_argument("--memory", action="store_true", help="measure optimizer-state bytes and peak memory")
    p.add_argument("--rounds", type=int, default=3, help="--timing/--memory repetitions (medians are quoted)")
    p.add_argument("--out-dir", default=RESULTS)
    p.add_argument("--tag", default="", help="suffix of the output names (e.g. the GPU's name)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    names = P.CPU_EXPERIMENTS if args.experiments is None else [x.strip() for x in args.experiments.split(",")]
    bad = [n for n in names if n not in P.EXPERIMENTS]
    if bad:
        p.error(f"--experiments: unknown {bad}; valid: {', '.join(P.EXPERIMENTS)}")
    if args.quick:
        args.dataset = "digits"
    args.exps = [P.quick(P.EXPERIMENTS[n]) if args.quick else P.EXPERIMENTS[n] for n in names]
    args.stem = os.path.join(args.out_dir, "claims" + (f"_{args.tag}" if args.tag else "") + ("_quick" if args.quick else ""))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return 0
    os.makedirs(args.out_dir, exist_ok=True)
    from claims_report import write_report

    if args.timing:
        write_csv(args.stem + "_timing.csv", [dict(r, machine=machine(args.device)) for r in timing(args, args.exps)])
    if args.memory:
        write_csv(args.stem + "_memory.csv", [dict(r, machine=machine("cpu")) for r in memory(args)])
    if not (args.timing or args.memory or args.report_only):
        runner = Runner(args)
        if args.jobs == 1:
            _init_worker(args.dataset, args.data_dir, args.threads)
        try:
            for e in args.exps:
                run_experiment(e, runner)
        finally:
            runner.close()
        write_csv(args.stem + "_runs.csv", sorted(runner.runs, key=_order))
    elif args.report_only and os.path.exists(args.stem + ".runs.jsonl"):
        runner = Runner(argparse.Namespace(**{**vars(args), "resume": True}))
        write_csv(args.stem + "_runs.csv", sorted(runner.runs, key=_order))
    write_report(args)
    return 0


def _order(r: dict):
    return (r["exp"], r["phase"] != "sweep", r["budget"], r["arm"], float(r["lr"]), r["seed"])


if __name__ == "__main__":
    sys.exit(main())
