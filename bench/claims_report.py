"""The three-claims benchmark's report: claims.md and the PNGs, from the runs, the timing
pass and the memory pass (bench/bench_claims.py writes them; --report-only rewrites it)."""
from __future__ import annotations

import math
import os
import subprocess
import time

import torch

import claims_protocol as P
from claims_protocol import mstd, paired

ORDER = ["neptune", "adamw", "sgd", "neptune clip=0", "neptune no mask", "neptune bf16 state"]


def pct(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def acc_cell(xs) -> str:
    m, s, se, n = mstd(xs)
    return f"{pct(m)} ± {pct(s)}" if n > 1 else pct(m)


def diff_cell(d: dict | None) -> str:
    if d is None:
        return "-"
    return f"{100 * d['mean']:+.2f} ± {100 * d['se']:.2f} ({d['wins']}/{d['n']})"


def median(xs):
    xs = sorted(float(x) for x in xs)
    n = len(xs)
    return float("nan") if n == 0 else (xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2)


# -- time ---------------------------------------------------------------------------------


def step_times(timing: list[dict]) -> dict:
    """(exp, arm) -> dict(step_ms, optimizer_ms, eval_s): medians over the timing rounds."""
    out = {}
    for key in {(r["exp"], r["arm"]) for r in timing if r["kind"] == "step"}:
        rs = [r for r in timing if r["kind"] == "step" and (r["exp"], r["arm"]) == key]
        out[key] = dict(step_ms=median(r["step_ms"] for r in rs), optimizer_ms=median(r["optimizer_ms"] for r in rs),
                        eval_s=median(r["eval_s"] for r in rs), n=len(rs))
    return out


def run_seconds(st: dict | None, steps_per_epoch: int, budget: float) -> float:
    """Training seconds of a budget (epochs) from the measured step time."""
    return float("nan") if st is None else budget * steps_per_epoch * st["step_ms"] / 1e3


def epochs_to(curve: list[tuple[int, float]], target: float) -> float | None:
    """Epochs at which accuracy first reaches ``target`` on the curve of (budget, accuracy)
    points, interpolated linearly in log2(budget) between the budgets around the crossing;
    None if never reached, the smallest budget if it is reached there already."""
    curve = sorted(curve)
    if not curve:
        return None
    if curve[0][1] >= target:
        return float(curve[0][0])
    for (b0, a0), (b1, a1) in zip(curve, curve[1:]):
        if a1 >= target > a0:
            f = (target - a0) / (a1 - a0)
            return 2 ** (math.log2(b0) + f * (math.log2(b1) - math.log2(b0)))
    return None


def seed_curves(final: list[dict], arm: str) -> dict[int, list[tuple[int, float]]]:
    out: dict[int, list] = {}
    for r in final:
        if r["arm"] == arm:
            out.setdefault(int(r["seed"]), []).append((int(r["budget"]), r["acc"]))
    return out


def mean_curve(final: list[dict], arm: str) -> list[tuple[int, float]]:
    bs = sorted({int(r["budget"]) for r in final if r["arm"] == arm})
    return [(b, mstd([r["acc"] for r in final if r["arm"] == arm and int(r["budget"]) == b])[0]) for b in bs]


# -- sections -------------------------------------------------------------------------------


def header(args, runs, timing, memory) -> list[str]:
    dev = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else P_cpu()
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(__file__),
                              capture_output=True, text=True).stdout.strip()
    except OSError:
        head = "?"
    from neptune_ext import build_info

    L = [f"# The three claims, measured{' (quick demo: tiny sizes on digits, not a result)' if args.quick else ''}", "",
         f"Report written by `python bench/bench_claims.py {' '.join(args.argv)}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
         f"git {head or '?'}; {args.device} ({dev}, {os.cpu_count()} cores), torch {torch.__version__}, Neptune CPU kernel set "
         f"{build_info().get('cpu_isa')}. {len(runs)} training runs, {len(timing)} timing rows, {len(memory)} memory rows. "
         f"Measured on: {measured_on(runs, timing, memory)}.", "",
         "Protocol (bench/claims_protocol.py, checked before this report was written): for every budget separately, each "
         "optimizer's peak lr is chosen by mean final accuracy on a validation split held out of the training set "
         "(sweep seeds 1000+), then every arm trains on the training set on the final seeds (0..4), which the sweep "
         "never used, and is scored once on the test set (10,000 images, labels always clean). A budget is a whole "
         "run with its own schedule (linear warm-up over 20% of the steps, then linear decay to 0), never an "
         "intermediate epoch of a longer run. The ablations (clip=0, no mask) and bf16 state run at Neptune's chosen "
         "lr. Paired differences: mean ± SE over seeds (same seed = same initial weights, data subset and batch "
         "order in every arm), with the number of seeds the arm won; 'higher'/'lower' when |mean| > 2 SE.", ""]
    return L


def measured_on(runs, timing, memory) -> str:
    """Which machine each part ran on (results from several sessions may be combined)."""
    parts = []
    for what, rows in (("training runs", runs), ("timing", timing), ("memory", memory)):
        counts: dict[str, int] = {}
        for r in rows:
            name = r.get("machine") or "not recorded"
            counts[name] = counts.get(name, 0) + 1
        if counts:
            parts.append(f"{what} " + ", ".join(f"{k} ({n})" for k, n in counts.items()))
    return "; ".join(parts) or "nothing yet"


def P_cpu() -> str:
    from neptune_ext.ops import cpu_name

    return cpu_name()


def experiment_section(e: P.Experiment, runs, st_times) -> list[str]:
    sweep = [r for r in runs if r["exp"] == e.name and r["phase"] == "sweep"]
    final = [r for r in runs if r["exp"] == e.name and r["phase"] == "final"]
    if not sweep and not final:
        return []
    L = [f"## {e.name}: {e.about}", ""]
    n_final = len({r["seed"] for r in final})
    L.append(f"{e.arch}{f' width {e.width}' if e.arch == 'resnet9' else ''}, training set "
             f"{e.train_size or 'all 60,000'} images{f' with {100 * e.label_noise:.0f}% of the labels wrong' if e.label_noise else ''}, "
             f"batch {e.batch_size}, augmentation {'random crop + flip' if e.augment else 'none'}, budgets "
             f"{', '.join(map(str, e.budgets))} epochs; validation {e.val_size} training images, {e.sweep_seeds} sweep "
             f"seed(s); {n_final} final seeds per arm{' (cut short: not all arms have every seed)' if _ragged(final) else ''}.")
    L.append("")
    if sweep:
        L += ["Validation accuracy (%) of the lr sweep, mean over sweep seeds (chosen lr in bold):", "",
              "| budget | " + " | ".join(P.OPTIMIZERS) + " |", "|---|" + "---|" * len(P.OPTIMIZERS)]
        for b in e.budgets:
            cells = []
            for opt in P.OPTIMIZERS:
                sc = P.sweep_scores(sweep, e.name, b, opt)
                best = P.select_lr(sweep, e.name, b, opt)
                cells.append(", ".join((f"**{lr:g}: {pct(a)}**" if lr == best else f"{lr:g}: {pct(a)}") for lr, a in sc.items()) or "-")
            L.append(f"| {b} | " + " | ".join(cells) + " |")
        L.append("")
    if not final:
        return L
    arms = [a for a in ORDER if any(r["arm"] == a for r in final)]
    noisy = e.label_noise > 0
    cols = ["arm", "lr", "test acc (%)", "vs AdamW (points)", "vs SGD", "vs Neptune", "train acc (%)",
            "train-test gap (points)", "gap vs AdamW", "gap vs SGD"]
    if noisy:
        cols[6] = "train acc on its noisy labels (%)"
        cols += ["train acc on the true labels (%)", "wrong labels memorized (%)"]
    if st_times:
        cols += ["step (ms)", "optimizer (ms)", "training s"]
    for b in e.budgets:
        fb = [r for r in final if r["budget"] == b]
        if not fb:
            continue
        L += [f"Budget {b} epoch(s), test accuracy on the final seeds (mean ± std; paired differences mean ± SE (seeds won)):", "",
              "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for arm in arms:
            rs = [r for r in fb if r["arm"] == arm]
            if not rs:
                continue
            row = [arm, f"{rs[0]['lr']:g}", acc_cell(r["acc"] for r in rs),
                   diff_cell(paired(fb, arm, "adamw", b)) if arm != "adamw" else "-",
                   diff_cell(paired(fb, arm, "sgd", b)) if arm != "sgd" else "-",
                   diff_cell(paired(fb, arm, "neptune", b)) if arm != "neptune" else "-",
                   acc_cell(r["train_acc"] for r in rs),
                   f"{100 * mstd([r['gap'] for r in rs])[0]:.2f}",
                   diff_cell(paired(fb, arm, "adamw", b, "gap")) if arm != "adamw" else "-",
                   diff_cell(paired(fb, arm, "sgd", b, "gap")) if arm != "sgd" else "-"]
            if noisy:
                row += [acc_cell(r["train_clean_acc"] for r in rs), acc_cell(r["memorized"] for r in rs)]
            if st_times:
                st = st_times.get((e.name, arm))
                row += [f"{st['step_ms']:.1f}" if st else "-", f"{st['optimizer_ms']:.2f}" if st else "-",
                        f"{run_seconds(st, int(rs[0]['steps_per_epoch']), b):.0f}" if st else "-"]
            L.append("| " + " | ".join(row) + " |")
        L.append("")
    if e.targets and len(e.budgets) > 1:
        L += time_to_accuracy(e, final, arms, st_times)
    return L


def _ragged(final) -> bool:
    per = {}
    for r in final:
        per.setdefault((r["arm"], r["budget"]), set()).add(r["seed"])
    return len({frozenset(v) for v in per.values()}) > 1


def time_to_accuracy(e: P.Experiment, final, arms, st_times) -> list[str]:
    """Per target: each arm's smallest budget whose seed-mean accuracy reaches it, and the
    epochs (and seconds) to reach it interpolated between budgets, per seed, paired."""
    spe = int(final[0]["steps_per_epoch"])
    L = [f"Time to accuracy ({e.name}). 'smallest budget': the smallest of the budgets run whose mean test "
         "accuracy reaches the target (its training seconds from the measured step time). 'epochs (interpolated)': "
         "per seed, where the accuracy-vs-budget curve crosses the target (linear in log2 budget between the two "
         "budgets around it), mean over the seeds that reach it; 'ratio vs AdamW/SGD': the per-seed ratio of those "
         "epochs, geometric mean ± SE factor over seeds where both reach the target (below 1: fewer epochs).", "",
         "| target | arm | smallest budget (epochs) | seconds at it | epochs (interpolated) | seconds (interpolated) "
         "| seeds reaching | ratio vs AdamW | ratio vs SGD |", "|---|---|---|---|---|---|---|---|---|"]
    curves = {arm: seed_curves(final, arm) for arm in arms}
    for t in e.targets:
        per_seed = {arm: {s: epochs_to(c, t) for s, c in curves[arm].items()} for arm in arms}
        for arm in arms:
            st = st_times.get((e.name, arm)) if st_times else None
            sb = next((b for b, a in mean_curve(final, arm) if a >= t), None)
            hits = [v for v in per_seed[arm].values() if v is not None]
            ep = mstd(hits)[0] if hits else None
            ratios = []
            for ref in ("adamw", "sgd"):
                logs = [math.log(per_seed[arm][s] / per_seed[ref][s]) for s in per_seed[arm]
                        if ref != arm and ref in per_seed and per_seed[arm][s] and per_seed[ref].get(s)]
                if not logs:
                    ratios.append("-")
                    continue
                m, _, se, n = mstd(logs)
                ratios.append(f"{math.exp(m):.2f} ×/ {math.exp(se):.2f} (n={n})" if n > 1 else f"{math.exp(m):.2f} (n=1)")
            cells = [f"{100 * t:.0f}%", arm, "not reached" if sb is None else str(sb),
                     f"{run_seconds(st, spe, sb):.0f}" if sb is not None and st else "-",
                     f"{ep:.2f}" if ep is not None else "-",
                     f"{run_seconds(st, spe, ep):.0f}" if ep is not None and st else "-",
                     f"{len(hits)}/{len(per_seed[arm])}"] + ratios
            L.append("| " + " | ".join(cells) + " |")
    L.append("")
    return L


def timing_section(timing, runs) -> list[str]:
    if not timing:
        return ["## Time", "", "Not measured yet (`python bench/bench_claims.py --timing`, alone on the machine).", ""]
    st = step_times(timing)
    L = ["## Time (measured alone, one process, one thread)", "",
         "Step = one training step as the loop runs it (batch preparation, forward, backward, optimizer step, "
         "schedule), the median of the timing rounds, each the mean over an epoch of 30 steps after a warm-up epoch; "
         "optimizer = the optimizer.step() part of it. Training seconds of a budget = budget x steps per epoch x step.", "",
         "| experiment | arm | step (ms) | optimizer.step (ms) | optimizer share | test-set evaluation (s) | rounds |",
         "|---|---|---|---|---|---|---|"]
    for (exp, arm), v in sorted(st.items(), key=lambda kv: (kv[0][0], ORDER.index(kv[0][1]))):
        L.append(f"| {exp} | {arm} | {v['step_ms']:.1f} | {v['optimizer_ms']:.2f} | "
                 f"{100 * v['optimizer_ms'] / v['step_ms']:.1f}% | {v['eval_s']:.2f} | {v['n']} |")
    L.append("")
    whole = [r for r in timing if r["kind"] == "run"]
    if whole:
        L += ["Check of that model: whole runs timed in the same pass (training and final evaluation) against "
              "budget x steps x step (training only):", "", "| experiment | arm | budget | whole run (s) | predicted training (s) |",
              "|---|---|---|---|---|"]
        for r in whole:
            spe = next((int(x["steps_per_epoch"]) for x in runs if x["exp"] == r["exp"] and x["phase"] == "final"), None)
            pred = run_seconds(st.get((r["exp"], r["arm"])), spe, int(r["budget"])) if spe else float("nan")
            L.append(f"| {r['exp']} | {r['arm']} | {int(r['budget'])} | {r['run_s']:.1f} | {pred:.1f} |")
        L.append("")
    return L


def memory_section(memory) -> list[str]:
    if not memory:
        return ["## Memory", "", "Not measured yet (`python bench/bench_claims.py --memory`).", ""]
    L = ["## Memory (fresh process per row; 3 training steps on CPU, 1 thread)", "",
         "State bytes per parameter: the optimizer state's tensors (moments and step counters) over the model's "
         "parameter count. Peak RSS: the process's maximum resident memory (getrusage), median over rounds; "
         "'none' steps SGD without momentum, an optimizer that keeps no state (the first step of any torch.optim optimizer loads about 150 MiB of torch's modules), the baseline of the deltas.", "",
         "| model | params | arm | state bytes / param | peak RSS (MiB) | peak RSS minus 'none' (MiB) |",
         "|---|---|---|---|---|---|"]
    models = list(dict.fromkeys(r["model"] for r in memory))
    for m in models:
        base = median(r["peak_rss_mib"] for r in memory if r["model"] == m and r["arm"] == "none")
        for arm in ["none", "sgd", "adamw", "neptune", "neptune bf16 state"]:
            rs = [r for r in memory if r["model"] == m and r["arm"] == arm]
            if not rs:
                continue
            peak = median(r["peak_rss_mib"] for r in rs)
            L.append(f"| {m} | {int(rs[0]['params']):,} | {arm} | {rs[0]['state_bytes_per_param']:.2f} | {peak:.1f} | "
                     f"{peak - base:+.1f} |")
    L.append("")
    return L


def plot_speed(path, exps, runs, st_times) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = [e for e in exps if e.targets and len(e.budgets) > 1 and any(r["exp"] == e.name and r["phase"] == "final" for r in runs)]
    if not speed:
        return
    fig, axes = plt.subplots(1, len(speed), figsize=(6.5 * len(speed), 4.6), squeeze=False)
    for ax, e in zip(axes[0], speed):
        final = [r for r in runs if r["exp"] == e.name and r["phase"] == "final"]
        for arm in [a for a in ORDER if any(r["arm"] == a for r in final)]:
            st = st_times.get((e.name, arm)) if st_times else None
            pts = []
            for b in sorted({int(r["budget"]) for r in final if r["arm"] == arm}):
                accs = [r["acc"] for r in final if r["arm"] == arm and int(r["budget"]) == b]
                spe = int(next(r["steps_per_epoch"] for r in final if r["arm"] == arm))
                x = run_seconds(st, spe, b) if st else b
                pts.append((x, 100 * mstd(accs)[0], 100 * min(accs), 100 * max(accs)))
            xs, m, lo, hi = zip(*pts)
            line = ax.plot(xs, m, marker="o", ms=4, label=arm)[0]
            ax.fill_between(xs, lo, hi, alpha=0.18, color=line.get_color())
        ax.set_xscale("log")
        ax.set(xlabel="training seconds, measured step time x steps (log)" if st_times else "budget (epochs, log)",
               ylabel="test accuracy (%)", title=f"{e.name}: mean over seeds, band = min..max")
        for t in e.targets:
            ax.axhline(100 * t, color="gray", lw=0.5, ls=":")
        ax.legend(fontsize=8)
    fig.suptitle("Fashion-MNIST, one budget per point (each its own schedule),\nlr chosen on validation per budget", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_equal_budget(path, exps, runs) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eb = [e for e in exps if len(e.budgets) == 1 and any(r["exp"] == e.name and r["phase"] == "final" for r in runs)]
    if not eb:
        return
    fig, axes = plt.subplots(2, len(eb), figsize=(5.2 * len(eb), 6.5), squeeze=False)
    for j, e in enumerate(eb):
        final = [r for r in runs if r["exp"] == e.name and r["phase"] == "final"]
        arms = [a for a in ORDER if any(r["arm"] == a for r in final)]
        for i, (key, lab) in enumerate([("acc", "test accuracy (%)"), ("gap", "train - test (points)")]):
            st = [mstd([100 * r[key] for r in final if r["arm"] == a]) for a in arms]
            ax = axes[i][j]
            ax.barh(range(len(arms)), [s[0] for s in st], xerr=[0 if math.isnan(s[2]) else s[2] for s in st],
                    color="C0" if i == 0 else "C3", alpha=0.75, capsize=3)
            ax.set_yticks(range(len(arms)), arms)
            if i == 0:
                lo = min(s[0] for s in st)
                ax.set_xlim(max(0, lo - 4), min(100, max(s[0] for s in st) + 1.5))
            ax.set(xlabel=lab + ", mean ± SE", title=e.name if i == 0 else "")
    fig.suptitle("Equal budget: test accuracy and overfitting gap")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(args) -> None:
    from bench_claims import read_csv  # noqa: the runner's CSV reader

    runs = read_csv(args.stem + "_runs.csv")
    timing = read_csv(args.stem + "_timing.csv")
    memory = read_csv(args.stem + "_memory.csv")
    exps = [e for e in args.exps] + [P.EXPERIMENTS[n] for n in P.EXPERIMENTS
                                      if n not in {x.name for x in args.exps} and any(r["exp"] == n for r in runs)]
    for e in exps:
        if any(r["exp"] == e.name and r["phase"] == "final" for r in runs):
            P.check_protocol(e, runs)
    st = step_times(timing)
    L = header(args, runs, timing, memory)
    for e in exps:
        L += experiment_section(e, runs, st)
    L += timing_section(timing, runs)
    L += memory_section(memory)
    stem = os.path.basename(args.stem)
    L += [f"Files: `{stem}_runs.csv` (every run), `{stem}_timing.csv`, `{stem}_memory.csv`, `{stem}_speed.png` "
          f"(accuracy against seconds), `{stem}_equal_budget.png`.", ""]
    with open(args.stem + ".md", "w") as f:
        f.write("\n".join(L))
    plot_speed(args.stem + "_speed.png", exps, runs, st)
    plot_equal_budget(args.stem + "_equal_budget.png", exps, runs)
    print(f"wrote {args.stem}.md", flush=True)
