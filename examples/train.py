"""Train a ResNet-9 style image classifier (CIFAR-10, Fashion-MNIST or scikit-learn's
digits) with Neptune, AdamW or SGD.

    python examples/train.py --dataset fashion-mnist --optimizer neptune --epochs 10
    python examples/train.py --dataset cifar10 --data-dir ~/data --download
    python examples/train.py --dataset digits --epochs 5          # nothing to install

Fashion-MNIST (the default) is read from the four IDX files, gzipped or not, in --data-dir
(or its fashion-mnist/ or torchvision's FashionMNIST/raw/ folder) or where Debian's
`apt-get install dataset-fashion-mnist` puts them (/usr/share/datasets/fashion-mnist).
CIFAR-10 is read with torchvision from --data-dir (downloaded there only with --download).
When the dataset cannot be found, one line says how to get it and the run uses the
embedded digits dataset (8x8 grayscale, upsampled to 16x16) instead. Augmentation: random
crop from a reflect-padded image (pad = side/8) and, except on digits, horizontal flips.
On a GPU: bf16 autocast and channels_last. Writes <out-dir>/<run>.csv (per epoch: train
loss, train accuracy, test accuracy, seconds) and <run>.png, and ends with a one-line
summary.
"""
from __future__ import annotations

import argparse
import csv
import os
import time

import torch

from neptune_ext.training import DATASETS, DEFAULT_LR, OPTIMIZERS, RunConfig, get_data, train

CSV_FIELDS = ["epoch", "train_loss", "train_acc", "train_eval_acc", "test_acc", "seconds"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="neptune")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default: {DEFAULT_LR})")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=16, help="network width (ResNet-9 original: 64)")
    p.add_argument("--weight-decay", type=float, default=None, help="default: 1e-2 (neptune, adamw), 5e-4 (sgd)")
    p.add_argument("--clip", type=float, default=None, help="Neptune's AGC threshold (default: the optimizer's)")
    p.add_argument("--no-cautious", action="store_true", help="Neptune without the sign-agreement mask")
    p.add_argument("--label-smoothing", type=float, default=0.2)
    p.add_argument("--warmup", type=float, default=0.2, help="fraction of steps for linear warm-up")
    p.add_argument("--schedule", choices=("linear", "cosine"), default="linear", help="decay after warm-up")
    p.add_argument("--dataset", choices=DATASETS, default="fashion-mnist")
    p.add_argument("--data-dir", default="data",
                   help="directory holding cifar-10-batches-py/ or the Fashion-MNIST IDX files")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 into --data-dir if missing")
    p.add_argument("--train-size", type=int, default=None, help="subsample this many training images")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out-dir", default="runs")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def write_csv(path: str, history: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in history:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in CSV_FIELDS})


def plot(path: str, history: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [r["train_loss"] for r in history], marker="o")
    a.set(xlabel="epoch", ylabel="train loss", title="train loss")
    b.plot(ep, [100 * r["train_acc"] for r in history], marker="o", label="train (augmented)")
    b.plot(ep, [100 * r["test_acc"] for r in history], marker="o", label="test")
    b.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = get_data(args.dataset, args.data_dir, args.download)
    cfg = RunConfig(
        optimizer=args.optimizer, lr=args.lr if args.lr is not None else DEFAULT_LR[args.optimizer],
        epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, width=args.width,
        label_smoothing=args.label_smoothing, warmup_frac=args.warmup, schedule=args.schedule,
        weight_decay=args.weight_decay, clip=args.clip, cautious=not args.no_cautious, train_size=args.train_size,
    )
    t0 = time.perf_counter()
    history = train(cfg, data, args.device, progress=not args.no_progress)
    wall = time.perf_counter() - t0

    os.makedirs(args.out_dir, exist_ok=True)
    run = f"{data.name}_{args.optimizer}_lr{cfg.lr:g}_seed{args.seed}"
    csv_path, png_path = os.path.join(args.out_dir, run + ".csv"), os.path.join(args.out_dir, run + ".png")
    write_csv(csv_path, history)
    plot(png_path, history, f"{args.optimizer} lr={cfg.lr:g} on {data.name} ({len(history)} epochs)")
    final, best = history[-1]["test_acc"], max(r["test_acc"] for r in history)
    print(
        f"summary: optimizer={args.optimizer} dataset={data.name} epochs={args.epochs} "
        f"final_test_acc={100 * final:.2f}% best_test_acc={100 * best:.2f}% time={wall:.1f}s "
        f"(csv: {csv_path}, plot: {png_path})"
    )
    return dict(history=history, csv=csv_path, png=png_path, dataset=data.name)


if __name__ == "__main__":
    main()
