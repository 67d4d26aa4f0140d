"""Readers for image datasets stored as IDX files (the MNIST / Fashion-MNIST format).

    from neptune_ext.datasets import read_idx, load_fashion_mnist
    x = read_idx("train-images-idx3-ubyte.gz")          # numpy uint8 (60000, 28, 28)
    train_x, train_y, test_x, test_y = load_fashion_mnist("data")   # torch tensors

IDX layout (big-endian): two zero bytes, a dtype code, the number of dimensions ``d``,
then ``d`` uint32 sizes, then the elements. ``read_idx`` checks every part of it and the
file's exact length, so a truncated or mismatched file raises ``IDXError`` naming the
file instead of reading short or failing later in a reshape.
"""
from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

__all__ = ["IDXError", "read_idx", "find_fashion_mnist", "load_fashion_mnist", "FASHION_MNIST_FILES",
           "FASHION_MNIST_SYSTEM_DIR", "FASHION_MNIST_INSTALL_HINT"]

# code -> big-endian numpy dtype (the IDX specification's list)
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# where Debian's dataset-fashion-mnist package installs the four files
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL_HINT = (
    "install it with 'apt-get install dataset-fashion-mnist' or put the four IDX files "
    "(train-images-idx3-ubyte[.gz], ...) in --data-dir"
)


class IDXError(ValueError):
    """A file that is not a well-formed IDX file (or not the one expected)."""


def _read_bytes(path: str) -> bytes:
    """The file's bytes, decompressed when it is gzipped (detected by its magic, not its name)."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:  # truncated stream, bad CRC or length
        raise IDXError(f"{path}: corrupt or truncated gzip stream ({e})") from None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (raw or gzipped) into a numpy array of its dtype (native byte order).

    Raises ``IDXError`` naming ``path`` when the magic number, dtype code or dimensions
    are invalid or the data length differs from what the header announces."""
    path = os.fspath(path)
    buf = _read_bytes(path)
    if len(buf) < 4:
        raise IDXError(f"{path}: {len(buf)} bytes, too short for an IDX header (4-byte magic number)")
    if buf[0] != 0 or buf[1] != 0:
        raise IDXError(f"{path}: bad magic number {buf[:4].hex()}: an IDX file starts with two zero bytes")
    code, ndim = buf[2], buf[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise IDXError(f"{path}: unknown IDX dtype code 0x{code:02X} (valid: {known})")
    if ndim < 1:
        raise IDXError(f"{path}: IDX header says 0 dimensions (must be >= 1)")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise IDXError(f"{path}: truncated header: {len(buf)} bytes, {ndim} dimensions need {header}")
    dims = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(buf) != expected:
        what = "truncated" if len(buf) < expected else "has trailing bytes"
        raise IDXError(f"{path}: {what}: {len(buf)} bytes, but the header (dtype {dtype.name}, shape {dims}) "
                       f"means {expected}")
    arr = np.frombuffer(buf, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)  # native order, writable


def _find_file(directory: str, stem: str) -> str | None:
    for name in (stem, stem + ".gz"):
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            return p
    return None


def _candidate_dirs(data_dir: str | None) -> list[str]:
    dirs = []
    if data_dir:
        # the files themselves, a fashion-mnist/ folder, torchvision's FashionMNIST/raw, Zalando's repo layout
        dirs += [data_dir, os.path.join(data_dir, "fashion-mnist"), os.path.join(data_dir, "FashionMNIST", "raw"),
                 os.path.join(data_dir, "data", "fashion")]
    dirs.append(FASHION_MNIST_SYSTEM_DIR)
    return dirs


def find_fashion_mnist(data_dir: str | None = None) -> dict[str, str] | None:
    """Paths of the four Fashion-MNIST files (keys of ``FASHION_MNIST_FILES``), from the first
    place that holds all four: ``data_dir``, ``data_dir/fashion-mnist``,
    ``data_dir/FashionMNIST/raw`` (torchvision), ``data_dir/data/fashion`` (Zalando's
    repository), then ``FASHION_MNIST_SYSTEM_DIR``. Each file may be gzipped or not.
    ``None`` when no place has them all."""
    for d in _candidate_dirs(data_dir):
        found = {k: _find_file(d, stem) for k, stem in FASHION_MNIST_FILES.items()}
        if all(found.values()):
            return found
    return None


def _check(arr: np.ndarray, path: str, ndim: int, tail: tuple = ()) -> None:
    if arr.dtype != np.uint8 or arr.ndim != ndim or arr.shape[1:] != tail:
        want = "uint8 of shape (N" + "".join(f", {t}" for t in tail) + ")"
        raise IDXError(f"{path}: holds {arr.dtype} of shape {arr.shape}, expected {want}")


def load_fashion_mnist(data_dir: str | None = None, num_classes: int = 10):
    """Fashion-MNIST as torch tensors ``(train_x, train_y, test_x, test_y)``: images uint8
    ``(N, 28, 28)``, labels int64. Looked up as in ``find_fashion_mnist``; raises
    ``FileNotFoundError`` (with the install hint) when absent and ``IDXError`` when a file
    is malformed or the images and labels do not match."""
    import torch

    files = find_fashion_mnist(data_dir)
    if files is None:
        where = ", ".join(repr(d) for d in _candidate_dirs(data_dir))
        raise FileNotFoundError(f"Fashion-MNIST not found (looked in {where}); {FASHION_MNIST_INSTALL_HINT}")
    out = []
    for split in ("train", "test"):
        xp, yp = files[f"{split}_images"], files[f"{split}_labels"]
        x, y = read_idx(xp), read_idx(yp)
        _check(x, xp, 3, (28, 28))
        _check(y, yp, 1)
        if len(x) != len(y):
            raise IDXError(f"{xp} holds {len(x)} images but {yp} holds {len(y)} labels")
        if len(y) and int(y.max()) >= num_classes:
            raise IDXError(f"{yp}: label {int(y.max())} out of range 0..{num_classes - 1}")
        out += [torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))]
    return tuple(out)
