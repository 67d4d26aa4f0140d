import csv
import importlib.util
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("sklearn")

from test_datasets import write_fashion  # noqa: E402

from neptune_ext import datasets as ds  # noqa: E402
from neptune_ext import training as lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")


def load_script(path: str, name: str):
    """A script of the repository (examples/, bench/) as a fresh module."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_bench():
    return load_script("bench/bench_training.py", "bench_training")


train = load_script("examples/train.py", "train")


def write_tiny_cifar(root, per_batch=4, test=6):
    """torchvision's CIFAR-10 layout with a few images per file: image k of a file has
    every pixel of channel c equal to (10*k + c) and label k % 10."""
    base = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(base)

    def batch(n, offset):
        data = np.zeros((n, 3072), dtype=np.uint8)
        labels = []
        for k in range(n):
            img = np.stack([np.full((32, 32), 10 * (k + offset) + c, dtype=np.uint8) for c in range(3)])
            data[k] = img.reshape(-1)  # CHW flattened, as in the real files
            labels.append((k + offset) % 10)
        # the real files are Python 2 pickles: their str keys read back as b"data" with
        # encoding="bytes" and as "data" with encoding="latin1" (what torchvision uses)
        return {"data": data, "labels": labels, "batch_label": "x"}

    for i in range(1, 6):
        with open(os.path.join(base, f"data_batch_{i}"), "wb") as f:
            pickle.dump(batch(per_batch, (i - 1) * per_batch), f, protocol=2)
    with open(os.path.join(base, "test_batch"), "wb") as f:
        pickle.dump(batch(test, 0), f, protocol=2)
    with open(os.path.join(base, "batches.meta"), "wb") as f:
        names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch}, f, protocol=2)
    return root


@pytest.fixture
def skip_md5(monkeypatch):
    """Our tiny files cannot match the real md5s: bypass only the checksum; the rest is the
    path a real user takes (torchvision.datasets.CIFAR10 reading the pickles)."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def test_tiny_cifar_loads_with_right_shapes_and_labels(tmp_path, skip_md5):
    root = write_tiny_cifar(str(tmp_path))
    data = lib.load_cifar10(root)
    assert data.name == "cifar10" and data.num_classes == 10 and data.flip
    assert data.train_x.shape == (20, 3, 32, 32) and data.train_x.dtype == torch.uint8
    assert data.test_x.shape == (6, 3, 32, 32)
    assert data.train_y.tolist() == [k % 10 for k in range(20)]
    assert data.test_y.tolist() == [0, 1, 2, 3, 4, 5]
    # HWC -> CHW done right: channel c of image k is 10k + c everywhere
    for k in (0, 7, 19):
        for c in range(3):
            assert (data.train_x[k, c] == 10 * k + c).all()
    assert data.mean.tolist() == pytest.approx([95.0, 96.0, 97.0])
    # get_data takes the same path
    assert lib.get_data("cifar10", root).name == "cifar10"


def test_real_cifar_md5_check_is_in_force(tmp_path):
    """Without the bypass, torchvision rejects the tiny files: the user path verifies md5s."""
    root = write_tiny_cifar(str(tmp_path))
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        lib.load_cifar10(root)


def test_missing_cifar_falls_back_to_digits_with_one_line(tmp_path):
    lines = []
    data = lib.get_data("cifar10", str(tmp_path / "nothing"), log=lines.append)
    assert data.name == "digits" and data.in_channels == 1 and data.num_classes == 10
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "CIFAR-10 not available" in lines[0] and "digits" in lines[0] and "--download" in lines[0]


def test_augment_shapes_and_translation():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    y = lib.augment(x, pad=0, flip=False, generator=g)
    assert torch.equal(x, y)
    y = lib.augment(x, pad=2, flip=True, generator=g)
    assert y.shape == x.shape
    # every output image is a translated (and maybe flipped) window of its own reflect-padded input
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(2):
        found = any(
            torch.equal(y[i], w) or torch.equal(y[i], w.flip(2))
            for dy in range(5) for dx in range(5) for w in [xp[i, :, dy:dy + 8, dx:dx + 8]]
        )
        assert found


def test_subsample_is_balanced_and_seeded():
    data = lib.load_digits_data()
    x1, y1 = lib.subsample(data.train_x, data.train_y, 100, seed=1)
    x2, y2 = lib.subsample(data.train_x, data.train_y, 100, seed=1)
    x3, _ = lib.subsample(data.train_x, data.train_y, 100, seed=2)
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert torch.bincount(y1, minlength=10).tolist() == [10] * 10


def test_one_epoch_digits_run_writes_csv_png_and_summary(tmp_path, capsys):
    torch.set_num_threads(1)
    out = train.main([
        "--dataset", "digits", "--epochs", "1", "--train-size", "200", "--batch-size", "50", "--width", "4",
        "--out-dir", str(tmp_path), "--no-progress",
    ])
    printed = capsys.readouterr().out
    summary = [l for l in printed.splitlines() if l.startswith("summary:")]
    assert len(summary) == 1
    assert "optimizer=neptune" in summary[0] and "dataset=digits" in summary[0] and "epochs=1" in summary[0]
    assert "final_test_acc=" in summary[0] and "best_test_acc=" in summary[0] and "time=" in summary[0]
    with open(out["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1
    assert set(train.CSV_FIELDS) <= set(rows[0])
    assert 0.0 <= float(rows[0]["test_acc"]) <= 1.0 and float(rows[0]["train_loss"]) > 0
    with open(out["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_falls_back_when_cifar_missing(tmp_path):
    r = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "train.py"), "--dataset", "cifar10", "--data-dir", str(tmp_path / "none"),
         "--epochs", "1", "--train-size", "50", "--batch-size", "50", "--width", "2", "--threads", "1",
         "--out-dir", str(tmp_path / "out"), "--no-progress", "--optimizer", "sgd"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert sum("CIFAR-10 not available" in l for l in lines) == 1
    assert lines[-1].startswith("summary: optimizer=sgd dataset=digits epochs=1")


def test_bench_training_quick_writes_report(tmp_path):
    """The README's demo command: bench/bench_training.py --quick (1 seed, 3 arms)."""
    runs = load_bench().main(["--quick", "--epochs", "1", "--width", "2", "--no-progress", "--out-dir", str(tmp_path)])
    assert sorted(r["arm"] for r in runs) == ["adamw", "neptune", "sgd"]
    assert all(0.0 <= r["final_test_acc"] <= 1.0 for r in runs)
    md = (tmp_path / "training_digits_quick.md").read_text()
    assert "| neptune | 0.01 |" in md and "| sgd | 0.1 |" in md
    assert (tmp_path / "training_digits_quick.csv").read_text().count("\n") == 4
    assert (tmp_path / "training_digits_quick.png").read_bytes()[:4] == b"\x89PNG"


# -- Fashion-MNIST -----------------------------------------------------------------------


@pytest.fixture
def no_system_fashion(monkeypatch, tmp_path):
    """Hide the Debian copy, if installed, so only the test's files can be found."""
    monkeypatch.setattr(ds, "FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "not-installed"))


def test_missing_fashion_mnist_falls_back_to_digits_with_install_hint(tmp_path, no_system_fashion):
    lines = []
    data = lib.get_data("fashion-mnist", str(tmp_path / "nothing"), log=lines.append)
    assert data.name == "digits"
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "Fashion-MNIST not found" in lines[0] and "apt-get install dataset-fashion-mnist" in lines[0]
    assert "embedded digits" in lines[0]


def test_corrupt_fashion_mnist_raises_instead_of_falling_back(tmp_path, no_system_fashion):
    d = write_fashion(str(tmp_path / "d"), gz=False)
    path = os.path.join(d, "train-images-idx3-ubyte")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 5)
    with pytest.raises(ds.IDXError, match="train-images-idx3-ubyte: truncated"):
        lib.get_data("fashion-mnist", d, log=lambda m: pytest.fail("fell back: " + m))


def test_fashion_mnist_data_and_model_cover_28x28(tmp_path, no_system_fashion):
    d = write_fashion(str(tmp_path / "d"), n_train=40, n_test=20)
    data = lib.get_data("fashion-mnist", d)
    assert data.name == "fashion-mnist" and data.flip and data.in_channels == 1 and data.image_size == 28
    assert data.train_x.shape == (40, 1, 28, 28) and data.test_x.shape == (20, 1, 28, 28)
    # pools round up: 28 -> 14 -> 7 -> 4, so the last row/column of the 7x7 map is pooled, not dropped
    model = lib.ResNet9(10, 1, width=2)
    assert model.features[:-2](torch.zeros(1, 1, 28, 28)).shape[-2:] == (4, 4)
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    # even sides are unchanged (CIFAR-10 32 -> 4, digits 16 -> 2)
    assert model.features[:-2](torch.zeros(1, 1, 32, 32)).shape[-2:] == (4, 4)
    assert model.features[:-2](torch.zeros(1, 1, 16, 16)).shape[-2:] == (2, 2)


def test_validation_split_is_disjoint_balanced_and_fixed():
    data = lib.load_digits_data()
    v = lib.validation_split(data, 300)
    assert v.name == "digits-val" and len(v.test_y) == 300 and len(v.train_y) == len(data.train_y) - 300
    assert torch.bincount(v.test_y, minlength=10).tolist() == [30] * 10
    # together they are the training set, each image once (digits images are not all distinct: compare rows)
    both = torch.cat([v.train_x, v.test_x]).flatten(1)
    assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, data.train_x.flatten(1).tolist()))
    assert torch.equal(lib.validation_split(data, 300).test_x, v.test_x)
    assert torch.equal(v.mean, data.mean) and torch.equal(v.std, data.std)
    with pytest.raises(ValueError, match="n_val must be in 1..1256"):
        lib.validation_split(data, len(data.train_y))


def test_cli_trains_on_fashion_mnist_files_in_data_dir(tmp_path):
    d = write_fashion(str(tmp_path / "data" / "FashionMNIST" / "raw"), n_train=40, n_test=20, gz=False)
    r = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "train.py"), "--dataset", "fashion-mnist",
         "--data-dir", str(tmp_path / "data"), "--epochs", "2", "--batch-size", "20", "--width", "2",
         "--threads", "1", "--out-dir", str(tmp_path / "out"), "--no-progress", "--optimizer", "adamw"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1].startswith("summary: optimizer=adamw dataset=fashion-mnist epochs=2")
    with open(tmp_path / "out" / "fashion-mnist_adamw_lr0.01_seed0.csv") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2"]
    assert d.endswith("raw")


def test_bench_fashion_mnist_sweeps_on_validation_and_scores_on_test(tmp_path, monkeypatch, no_system_fashion):
    """The protocol on tiny files: every sweep run trains and is scored inside the training set
    (never on the test images), with seeds disjoint from the final runs, which are scored on
    the test set; the report has the paired tables against AdamW and SGD."""
    d = write_fashion(str(tmp_path / "d"), n_train=60, n_test=20)
    bench = load_bench()
    seen = []
    real_train = bench.lib.train

    def spy(cfg, data, *a, **kw):
        seen.append((cfg.seed, data.name, data.train_x.clone(), data.test_x.clone()))
        return real_train(cfg, data, *a, **kw)

    monkeypatch.setattr(bench.lib, "train", spy)
    runs = bench.main(["--dataset", "fashion-mnist", "--data-dir", d, "--sweep-seeds", "1", "--seeds", "2",
                       "--epochs", "1", "--width", "2", "--batch-size", "20", "--train-size", "30",
                       "--val-size", "20", "--no-progress", "--out-dir", str(tmp_path / "out")])
    full = lib.get_data("fashion-mnist", d)
    sweep = [s for s in seen if s[0] >= 1000]
    final = [s for s in seen if s[0] < 1000]
    assert sweep and final and len(seen) == len(runs)
    for seed, name, tx, vx in sweep:
        assert name == "fashion-mnist-val" and len(vx) == 20 and len(tx) == 40
        # training image k is filled with k: the held-out images are not trained on
        assert not {int(v) for v in vx[:, 0, 0, 0]} & {int(v) for v in tx[:, 0, 0, 0]}
        assert torch.equal(torch.cat([tx, vx]).sort(0).values, full.train_x.sort(0).values)
    for seed, name, tx, vx in final:
        assert name == "fashion-mnist" and torch.equal(vx, full.test_x)
    assert all(r["scored_on"] == ("validation" if r["phase"] == "sweep" else "test") for r in runs)
    assert {r["seed"] for r in runs if r["phase"] == "final"} == {0, 1}
    assert set(bench.ARMS) <= {r["arm"] for r in runs if r["phase"] == "final"}  # + the best clip, if not 0.1
    md = (tmp_path / "out" / "training_fashion-mnist.md").read_text()
    assert "## Learning-rate sweep (validation split)" in md
    assert "### Paired differences against adamw" in md and "### Paired differences against sgd" in md
    assert (tmp_path / "out" / "training_fashion-mnist.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_fixed_lrs_and_arms_skip_the_sweep(tmp_path, no_system_fashion):
    d = write_fashion(str(tmp_path / "d"), n_train=40, n_test=20)
    runs = load_bench().main(["--dataset", "fashion-mnist", "--data-dir", d, "--lrs", "neptune=0.003,adamw=0.002,sgd=0.1",
                              "--arms", "neptune,adamw,sgd", "--seeds", "2", "--epochs", "1", "--width", "2",
                              "--batch-size", "20", "--no-progress", "--out-dir", str(tmp_path), "--tag", "t"])
    assert all(r["phase"] == "final" for r in runs) and len(runs) == 6
    assert {(r["arm"], r["lr"]) for r in runs} == {("neptune", 0.003), ("adamw", 0.002), ("sgd", 0.1)}
    assert (tmp_path / "training_fashion-mnist_t.md").exists()


def test_bench_cut_short_then_report_only_and_resume(tmp_path, monkeypatch, no_system_fashion):
    """A run stopped after 4 final runs: the progress log holds them (seed by seed, so seed 0
    of 4 arms), --report-only reports them, and --resume runs only the 6 missing ones."""
    d = write_fashion(str(tmp_path / "d"), n_train=40, n_test=20)
    bench = load_bench()
    argv = ["--dataset", "fashion-mnist", "--data-dir", d, "--lrs", "neptune=0.003,adamw=0.003,sgd=0.1",
            "--seeds", "2", "--epochs", "1", "--width", "2", "--batch-size", "20", "--no-progress",
            "--out-dir", str(tmp_path / "out")]
    real, calls = bench._run, []

    def run(job, stop_after=None):
        if stop_after is not None and len(calls) == stop_after:
            raise KeyboardInterrupt
        calls.append((job["arm"], job["cfg"]["seed"]))
        return real(job)

    monkeypatch.setattr(bench, "_run", lambda job: run(job, stop_after=4))
    with pytest.raises(KeyboardInterrupt):
        bench.main(argv)
    log = tmp_path / "out" / "training_fashion-mnist.runs.jsonl"
    assert calls == [(arm, 0) for arm in bench.ARMS[:4]] and len(log.read_text().splitlines()) == 4

    bench.main(argv + ["--report-only"])
    md = (tmp_path / "out" / "training_fashion-mnist.md").read_text()
    assert "| neptune clip=0 | 0.003 |" in md and "| neptune cautious=False |" not in md  # not run yet
    assert "1 seeds per arm" in md

    calls.clear()
    monkeypatch.setattr(bench, "_run", run)
    runs = bench.main(argv + ["--resume"])
    assert sorted(calls) == sorted([(bench.ARMS[4], 0)] + [(arm, 1) for arm in bench.ARMS])
    assert len(runs) == 10 and not log.exists()
    assert "2 seeds per arm" in (tmp_path / "out" / "training_fashion-mnist.md").read_text()


def test_real_fashion_mnist_trains(tmp_path):
    """Smoke test on the real files when installed: one short epoch through the example."""
    if ds.find_fashion_mnist("data") is None:
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    torch.set_num_threads(1)
    out = train.main(["--dataset", "fashion-mnist", "--epochs", "1", "--train-size", "1000", "--batch-size", "25",
                      "--width", "4", "--out-dir", str(tmp_path), "--no-progress"])
    assert out["dataset"] == "fashion-mnist"
    # 10 classes: chance is 10%; 40 steps on 1,000 images reach about 57% (seed 0, this setup)
    assert out["history"][-1]["test_acc"] > 0.4
