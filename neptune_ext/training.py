"""The image-classification training library behind the training example and benchmark:
data (CIFAR-10 via torchvision, Fashion-MNIST from its IDX files, or scikit-learn's
embedded digits), a validation split, batched tensor augmentation, a ResNet-9 style
network of configurable width, optimizers with the recommended param groups, a warm-up +
decay schedule, and the training loop.

Used by examples/train.py and bench/bench_training.py. Not imported by ``import
neptune_ext``; torchvision, scikit-learn and tqdm are imported only by the functions
that need them.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .datasets import FASHION_MNIST_INSTALL_HINT, load_fashion_mnist
from .optimizer import Neptune
from .param_groups import param_groups

OPTIMIZERS = ("neptune", "adamw", "sgd")
DATASETS = ("cifar10", "fashion-mnist", "digits")
# peak lrs among the best of the digits sweep (bench/results/training_digits.md); sweep again for CIFAR-10
DEFAULT_LR = {"neptune": 1e-2, "adamw": 1e-2, "sgd": 0.1}
DEFAULT_WD = {"neptune": 1e-2, "adamw": 1e-2, "sgd": 5e-4}


# -- data -------------------------------------------------------------------------------


@dataclass
class ImageData:
    """Whole dataset as tensors: images uint8 NCHW, labels int64."""

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    mean: Tensor  # per channel, in [0, 255] units
    std: Tensor
    flip: bool  # horizontal flips preserve the label (CIFAR and Fashion-MNIST yes, digits no)
    # Provenance, for the benchmark's protocol checks: the indices of the train (and, for a
    # validation split, the test) images in the source dataset's training set.
    train_index: Tensor | None = None
    test_index: Tensor | None = None
    train_y_clean: Tensor | None = None  # the true labels when train_y has label noise

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_x.shape[-1]

    def to(self, device) -> "ImageData":
        return replace(self, **{k: getattr(self, k).to(device) for k in _TENSOR_FIELDS if getattr(self, k) is not None})


_TENSOR_FIELDS = ("train_x", "train_y", "test_x", "test_y", "mean", "std", "train_index", "test_index", "train_y_clean")


def _stats(x: Tensor) -> tuple[Tensor, Tensor]:
    xf = x.float()
    return xf.mean(dim=(0, 2, 3)), xf.std(dim=(0, 2, 3)).clamp_min(1.0)


def load_cifar10(data_dir: str, download: bool = False) -> ImageData:
    """CIFAR-10 through torchvision.datasets.CIFAR10 (which verifies the files' md5s).
    Raises RuntimeError (not found / corrupted) or OSError (download failed)."""
    from torchvision.datasets import CIFAR10

    train = CIFAR10(data_dir, train=True, download=download)
    test = CIFAR10(data_dir, train=False, download=False)

    def tensors(ds):
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW uint8
        return x, torch.tensor(ds.targets, dtype=torch.int64)

    tx, ty = tensors(train)
    vx, vy = tensors(test)
    mean, std = _stats(tx)
    return ImageData("cifar10", tx, ty, vx, vy, len(train.classes), mean, std, flip=True)


def load_digits_data(image_size: int = 16, test_fraction: float = 0.3) -> ImageData:
    """scikit-learn's embedded digits (1797 8x8 grayscale images, 10 classes), upsampled
    bilinearly to ``image_size``; a fixed stratified split (seed 0) into train and test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(d.images).float().unsqueeze(1) * (255.0 / 16.0)  # N,1,8,8 in [0,255]
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8)
    y = torch.from_numpy(d.target).long()
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=test_fraction, random_state=0, stratify=y.numpy()
    )
    tx, ty, vx, vy = x[idx_train], y[idx_train], x[idx_test], y[idx_test]
    mean, std = _stats(tx)
    return ImageData("digits", tx, ty, vx, vy, 10, mean, std, flip=False)


def load_fashion_mnist_data(data_dir: str | None = None) -> ImageData:
    """Fashion-MNIST (60,000 + 10,000 28x28 grayscale images, 10 classes) through
    neptune_ext.datasets: from ``data_dir`` or the Debian location. Raises
    FileNotFoundError when absent, neptune_ext.datasets.IDXError when a file is malformed."""
    tx, ty, vx, vy = load_fashion_mnist(data_dir)
    tx, vx = tx.unsqueeze(1), vx.unsqueeze(1)  # N,1,28,28
    mean, std = _stats(tx)
    return ImageData("fashion-mnist", tx, ty, vx, vy, 10, mean, std, flip=True)


def get_data(dataset: str, data_dir: str = "data", download: bool = False, log=print) -> ImageData:
    """``dataset`` one of DATASETS. If CIFAR-10 or Fashion-MNIST cannot be found, say so in
    one line (through ``log``: how to get it, what is used instead) and return the digits
    dataset. A Fashion-MNIST file that is present but malformed raises (no fallback)."""
    if dataset == "digits":
        return load_digits_data()
    if dataset == "fashion-mnist":
        try:
            return load_fashion_mnist_data(data_dir)
        except FileNotFoundError:
            log(f"Fashion-MNIST not found in {os.path.abspath(data_dir)!r} or the Debian location; "
                f"{FASHION_MNIST_INSTALL_HINT}: training on the embedded digits dataset instead")
            return load_digits_data()
    if dataset != "cifar10":
        raise ValueError(f"unknown dataset {dataset!r}; use one of {DATASETS}")
    try:
        return load_cifar10(data_dir, download=download)
    except (RuntimeError, OSError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        hint = "" if download else "; pass --download to fetch it"
        log(f"CIFAR-10 not available in {os.path.abspath(data_dir)!r} ({reason}){hint}: training on the embedded digits dataset instead")
        return load_digits_data()


def subsample(x: Tensor, y: Tensor, n: int | None, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` examples, class-balanced (as far as ``n`` allows), chosen by ``seed``."""
    keep = subsample_index(y, n, seed)
    return x[keep], y[keep]


def subsample_index(y: Tensor, n: int | None, seed: int) -> Tensor:
    """The indices ``subsample`` keeps (all of them, in order, when ``n`` is None or too large)."""
    if n is None or n >= len(y):
        return torch.arange(len(y))
    return _balanced_order(y, torch.Generator().manual_seed(seed))[:n]


def _balanced_order(y: Tensor, g: torch.Generator) -> Tensor:
    """All indices of ``y``, shuffled within each class by ``g``, then interleaved
    round-robin over the classes: every prefix is as class-balanced as it can be."""
    per = [torch.nonzero(y == c).flatten() for c in torch.unique(y)]
    per = [idx[torch.randperm(len(idx), generator=g)] for idx in per]
    longest = max(map(len, per))
    padded = torch.stack([torch.cat([p, p.new_full((longest - len(p),), -1)]) for p in per], 1).flatten()
    return padded[padded >= 0]


def validation_split(data: ImageData, n_val: int, seed: int = 12345) -> ImageData:
    """The training set cut in two, for choosing hyperparameters without the test set:
    ``n_val`` class-balanced training images (fixed by ``seed``) become the returned
    dataset's test split, the rest its training split. Normalization statistics are kept."""
    if not 0 < n_val < len(data.train_y):
        raise ValueError(f"validation_split: n_val must be in 1..{len(data.train_y) - 1}, got {n_val}")
    g = torch.Generator().manual_seed(seed)
    order = _balanced_order(data.train_y, g)
    val, rest = order[:n_val], order[n_val:].sort().values
    source = data.train_index if data.train_index is not None else torch.arange(len(data.train_y))
    clean = data.train_y_clean
    return replace(data, name=data.name + "-val", train_x=data.train_x[rest], train_y=data.train_y[rest],
                   test_x=data.train_x[val], test_y=data.train_y[val], train_index=source[rest],
                   test_index=source[val], train_y_clean=None if clean is None else clean[rest])


def with_label_noise(data: ImageData, fraction: float, seed: int = 2024) -> ImageData:
    """``data`` with exactly ``round(fraction * n)`` training labels, chosen by ``seed``,
    replaced by another class drawn uniformly (so every chosen label is wrong); the test
    labels are left clean and the true training labels kept in ``train_y_clean``."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"with_label_noise: fraction must be in [0, 1), got {fraction}")
    g = torch.Generator().manual_seed(seed)
    n = len(data.train_y)
    flip = torch.randperm(n, generator=g)[: round(fraction * n)]
    shift = torch.randint(1, data.num_classes, (len(flip),), generator=g)
    noisy = data.train_y.clone()
    noisy[flip] = (noisy[flip] + shift) % data.num_classes
    return replace(data, name=f"{data.name}-noise{round(100 * fraction)}", train_y=noisy, train_y_clean=data.train_y)


# -- augmentation (batched, on tensors) -------------------------------------------------


def normalize(x: Tensor, data: ImageData) -> Tensor:
    return (x.float() - data.mean.view(1, -1, 1, 1)) / data.std.view(1, -1, 1, 1)


def augment(x: Tensor, pad: int, flip: bool, generator: torch.Generator | None = None) -> Tensor:
    """Random translation by up to ``pad`` pixels (reflect padding, then a random crop back
    to the original size, independently per image) and, if ``flip``, random horizontal
    flips; one gather for the whole batch."""
    n, c, h, w = x.shape
    dev = x.device
    if flip:
        do = torch.rand(n, generator=generator).to(dev) < 0.5
        x = torch.where(do.view(n, 1, 1, 1), x.flip(3), x)
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(dev)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(dev)
        rows = (dy.view(n, 1) + torch.arange(h, device=dev)).view(n, 1, h, 1)
        cols = (dx.view(n, 1) + torch.arange(w, device=dev)).view(n, 1, 1, w)
        x = xp[torch.arange(n, device=dev).view(n, 1, 1, 1), torch.arange(c, device=dev).view(1, c, 1, 1), rows, cols]
    return x


# -- model ------------------------------------------------------------------------------


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    # no conv bias: BatchNorm follows (a bias there has zero true gradient)
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _pool() -> nn.MaxPool2d:
    return nn.MaxPool2d(2, ceil_mode=True)


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    """ResNet-9 (the Myrtle / airbench family): prep conv, three stages of conv + max-pool
    (residual blocks after the first and third), global max pool, linear head with a fixed
    logit scale. ``width`` is the prep width (64 in the original; widths w, 2w, 4w, 8w).
    Any square input of side >= 8 works: the pools round up, so 28x28 (Fashion-MNIST) goes
    28 -> 14 -> 7 -> 4 without dropping the last row and column (even sides are unchanged)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64, logit_scale: float = 0.125):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_bn(in_channels, w),
            conv_bn(w, 2 * w), _pool(), Residual(2 * w),
            conv_bn(2 * w, 4 * w), _pool(),
            conv_bn(4 * w, 8 * w), _pool(), Residual(8 * w),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(8 * w, num_classes)
        self.logit_scale = logit_scale

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x)) * self.logit_scale


class _Block(nn.Module):
    """Pre-norm transformer block: multi-head self-attention, then a GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, mlp_ratio * dim), nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """A small vision transformer: non-overlapping ``patch`` x ``patch`` patches embedded by
    a strided conv, a learned position embedding, ``depth`` pre-norm blocks, a final
    LayerNorm, mean pooling over the tokens and a linear head. The defaults (patch 4,
    width 64, depth 4, 4 heads, MLP ratio 2) give 139k parameters on 28x28 grayscale
    images, the size of ResNet9(width=8)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, patch: int = 4,
                 dim: int = 64, depth: int = 4, heads: int = 4, mlp_ratio: int = 2):
        super().__init__()
        self.embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        tokens = (image_size // patch) ** 2
        self.pos = nn.Parameter(torch.empty(1, tokens, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*[_Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.fc(self.norm(self.blocks(x)).mean(1))


ARCHS = ("resnet9", "vit")


def make_model(arch: str, num_classes: int, in_channels: int, image_size: int, width: int) -> nn.Module:
    """``resnet9`` of prep width ``width``, or ``vit`` (its defaults; ``width`` unused)."""
    if arch == "resnet9":
        return ResNet9(num_classes, in_channels, width)
    if arch == "vit":
        return ViT(num_classes, in_channels, image_size)
    raise ValueError(f"unknown arch {arch!r}; use one of {ARCHS}")


# -- optimizer and schedule -------------------------------------------------------------


def make_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float | None = None,
                   clip: float | None = None, cautious: bool = True, num_classes: int | None = None,
                   state_dtype: str = "float32"):
    """Neptune with the recommended groups (``state_dtype="bfloat16"``: bf16 state); AdamW
    with the same decay split (no clip); SGD with Nesterov momentum 0.9 and the same decay
    split. AdamW and SGD use torch's fused kernels (the fastest torch implementation, on
    CPU and CUDA alike), so that time comparisons are against their best. ``weight_decay=None``
    takes DEFAULT_WD[name]; ``clip=None`` takes Neptune's default."""
    wd = DEFAULT_WD[name] if weight_decay is None else weight_decay
    if name == "neptune":
        groups = param_groups(model, weight_decay=wd, clip=clip, num_classes=num_classes)
        kw = {} if clip is None else {"clip": clip}
        return Neptune(groups, lr=lr, cautious=cautious, state_dtype=state_dtype, **kw)
    if state_dtype != "float32":
        raise ValueError(f"state_dtype={state_dtype!r} is a Neptune option; {name} keeps float32 state")
    groups = param_groups(model, weight_decay=wd, num_classes=num_classes, for_optimizer="torch")
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, fused=True)
    raise ValueError(f"unknown optimizer {name!r}; use one of {OPTIMIZERS}")


def warmup_decay(optimizer, total_steps: int, warmup_frac: float = 0.2, kind: str = "linear"):
    """Per-step schedule: linear warm-up from 0 over ``warmup_frac`` of the steps, then
    linear (or cosine) decay to 0 at ``total_steps``."""
    warm = max(1, int(round(warmup_frac * total_steps)))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 1.0 - t if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# -- training ---------------------------------------------------------------------------


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, data: ImageData, batch_size: int = 1000) -> Tensor:
    """The model's class for every image of ``x`` (uint8, unnormalized), in eval mode."""
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb = _prepare(normalize(x[i:i + batch_size], data))
        with _autocast(xb.device):
            out.append(model(xb).argmax(1))
    model.train()
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64, device=x.device)


def evaluate(model: nn.Module, x: Tensor, y: Tensor, data: ImageData, batch_size: int = 1000) -> float:
    return (predict(model, x, data, batch_size) == y).sum().item() / max(1, len(y))


def _autocast(device: torch.device):
    # bf16 autocast on GPU only; on CPU full float32
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def _prepare(x: Tensor) -> Tensor:
    # channels_last on every device: on the CPU too, the convolutions run ~30% faster in it
    return x.contiguous(memory_format=torch.channels_last)


@dataclass
class RunConfig:
    optimizer: str = "neptune"
    lr: float | None = None
    epochs: int = 10
    batch_size: int = 256
    seed: int = 0
    arch: str = "resnet9"  # one of ARCHS
    width: int = 16  # resnet9 only
    label_smoothing: float = 0.2
    warmup_frac: float = 0.2
    schedule: str = "linear"
    weight_decay: float | None = None
    clip: float | None = None  # Neptune only; None = optimizer default
    cautious: bool = True  # Neptune only
    state_dtype: str = "float32"  # Neptune only: "bfloat16" for bf16 state
    augment: bool = True  # random crops (and flips where they keep the label); False: the images as they are
    train_size: int | None = None
    eval_train_size: int = 5000  # clean (no augmentation) train accuracy on this many images
    eval_train_every_epoch: bool = True  # False: only after the last epoch (an evaluation costs ~40% of a training pass)
    eval_test_every_epoch: bool = True  # False: test accuracy only after the last epoch (None before)
    eval_batch_size: int = 250  # on CPU, batches of 1000 run ~25% slower than 250 (cache)


def train(cfg: RunConfig, data: ImageData, device: str | torch.device = "cpu", progress: bool = False,
          log=print) -> list[dict]:
    """Train one model; return per-epoch records: epoch, train_loss and train_acc (running,
    on augmented batches), train_eval_acc (clean, on up to ``eval_train_size`` training
    images against the labels trained on; None before the last epoch unless
    ``cfg.eval_train_every_epoch``), test_acc (None before the last epoch unless
    ``cfg.eval_test_every_epoch``), seconds (cumulative training time, evaluation
    excluded), optimizer_seconds (the part of it spent in ``optimizer.step()``),
    steps_per_epoch and total_steps (the schedule's length). When the training labels
    are noisy (``data.train_y_clean``), the last epoch's record also has
    train_eval_clean_acc (the same images against their true labels) and memorized
    (of those whose label is wrong, the fraction predicted as that wrong label)."""
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    keep = subsample_index(data.train_y, cfg.train_size, cfg.seed)
    tx, ty = data.train_x[keep].to(device), data.train_y[keep].to(device)
    vx, vy = data.test_x.to(device), data.test_y.to(device)
    ex, ey = tx[: cfg.eval_train_size], ty[: cfg.eval_train_size]
    ey_clean = None if data.train_y_clean is None else data.train_y_clean[keep][: cfg.eval_train_size].to(device)
    data = data.to(device)

    model = make_model(cfg.arch, data.num_classes, data.in_channels, data.image_size, cfg.width).to(device)
    model = model.to(memory_format=torch.channels_last)
    lr = DEFAULT_LR[cfg.optimizer] if cfg.lr is None else cfg.lr
    opt = make_optimizer(cfg.optimizer, model, lr, cfg.weight_decay, cfg.clip, cfg.cautious, data.num_classes,
                         cfg.state_dtype)
    steps_per_epoch = math.ceil(len(ty) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    sched = warmup_decay(opt, total_steps, cfg.warmup_frac, cfg.schedule)
    pad = max(1, data.image_size // 8) if cfg.augment else 0
    flip = data.flip and cfg.augment
    cuda = device.type == "cuda"

    history, elapsed, opt_elapsed = [], 0.0, 0.0
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        perm = torch.randperm(len(ty), generator=gen).to(device)
        batches = range(steps_per_epoch)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(batches, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, dynamic_ncols=True)
            batches = bar
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        opt_events = []  # CUDA: (start, end) events of every optimizer step, read after the epoch's sync
        for b in batches:
            idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            xb = _prepare(augment(normalize(tx[idx], data), pad, flip, gen))
            yb = ty[idx]
            with _autocast(device):
                out = model(xb)
                loss = F.cross_entropy(out.float(), yb, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cuda:
                ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                ev[0].record()
                opt.step()
                ev[1].record()
                opt_events.append(ev)
            else:
                t_opt = time.perf_counter()
                opt.step()
                opt_elapsed += time.perf_counter() - t_opt
            sched.step()
            loss_sum += loss.detach() * len(idx)
            correct += (out.argmax(1) == yb).sum()
            if bar is not None and b % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        if cuda:
            torch.cuda.synchronize()
            opt_elapsed += sum(a.elapsed_time(e) for a, e in opt_events) / 1000
        elapsed += time.perf_counter() - t0
        if not math.isfinite(loss_sum.item()):
            log(f"warning: non-finite loss at epoch {epoch} ({cfg.optimizer}, lr={lr})")
        last = epoch == cfg.epochs
        rec = dict(
            epoch=epoch,
            train_loss=loss_sum.item() / len(ty),
            train_acc=correct.item() / len(ty),
            train_eval_acc=None,
            test_acc=(evaluate(model, vx, vy, data, cfg.eval_batch_size)
                      if cfg.eval_test_every_epoch or last else None),
            seconds=elapsed,
            optimizer_seconds=opt_elapsed,
            steps_per_epoch=steps_per_epoch,
            total_steps=total_steps,
        )
        if cfg.eval_train_every_epoch or last:
            pred = predict(model, ex, data, cfg.eval_batch_size)
            rec["train_eval_acc"] = (pred == ey).float().mean().item() if len(ey) else 0.0
            if ey_clean is not None and last:
                rec["train_eval_clean_acc"] = (pred == ey_clean).float().mean().item()
                wrong = ey != ey_clean
                rec["memorized"] = (pred[wrong] == ey[wrong]).float().mean().item() if wrong.any() else 0.0
        history.append(rec)
    return history
