"""neptune_ext.datasets: the IDX reader and the Fashion-MNIST locator/loader, on small files
written here (raw and gzipped, good and corrupt). The smoke test at the end uses the real
Fashion-MNIST files when they are installed and skips otherwise."""
import gzip
import os
import struct

import numpy as np
import pytest
import torch

from neptune_ext import datasets as ds
from neptune_ext.datasets import IDXError, find_fashion_mnist, load_fashion_mnist, read_idx

CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}


def idx_bytes(arr: np.ndarray) -> bytes:
    """The IDX encoding of ``arr``, written independently of the reader (struct, big-endian)."""
    head = struct.pack(">BBBB", 0, 0, CODES[arr.dtype.type], arr.ndim)
    head += struct.pack(">" + "I" * arr.ndim, *arr.shape)
    return head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write(path, data: bytes, gz: bool = False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(data)
    return str(path)


@pytest.fixture
def no_system_copy(monkeypatch, tmp_path):
    """Hide the Debian location so the lookup sees only the test's files."""
    monkeypatch.setattr(ds, "FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "not-installed"))


def write_fashion(directory, n_train=30, n_test=10, gz=True, side=28, n_labels=None, max_label=9):
    """The four Fashion-MNIST files with n images each; image k is filled with k, label k % 10."""
    os.makedirs(directory, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = np.stack([np.full((side, side), k % 256, np.uint8) for k in range(n)])
        y = (np.arange(n_labels if n_labels is not None else n) % (max_label + 1)).astype(np.uint8)
        sfx = ".gz" if gz else ""
        write(os.path.join(directory, f"{split}-images-idx3-ubyte{sfx}"), idx_bytes(x), gz)
        write(os.path.join(directory, f"{split}-labels-idx1-ubyte{sfx}"), idx_bytes(y), gz)
    return str(directory)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize("dtype,shape", [(np.uint8, (5, 7, 3)), (np.uint8, (11,)), (np.int8, (4, 3)),
                                         (np.int16, (3, 5)), (np.int32, (2, 3, 2)), (np.float32, (6,)),
                                         (np.float64, (2, 2))])
def test_read_idx_round_trip(tmp_path, gz, dtype, shape):
    rng = np.random.default_rng(0)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        arr = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    else:
        arr = (rng.standard_normal(shape) * 1e3).astype(dtype)
    path = write(tmp_path / ("a.idx" + (".gz" if gz else "")), idx_bytes(arr), gz)
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative and out.shape == shape
    np.testing.assert_array_equal(out, arr)
    out[...] = 0  # writable: not a view of the file's buffer


GOOD = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize("data,message", [
    (b"", "too short"),
    (b"\x00\x00", "too short"),
    (b"\x08\x03" + GOOD[2:], "bad magic number"),
    (b"\x00\x01" + GOOD[2:], "bad magic number"),
    (GOOD[:2] + b"\x07" + GOOD[3:], "unknown IDX dtype code 0x07"),
    (GOOD[:3] + b"\x00" + GOOD[4:], "0 dimensions"),
    (GOOD[:10], "truncated header"),
    (GOOD[:-1], "truncated: 39 bytes"),
    (GOOD[:16], "truncated: 16 bytes"),
    (GOOD + b"\x00", "trailing bytes"),
    (GOOD[:3] + b"\x02" + GOOD[4:], "trailing bytes"),  # says 2 dims of the 3 written: sizes misread as data
    (GOOD[:3] + b"\x04" + GOOD[4:], "means"),  # says 4 dims: a data byte read as a size
], ids=["empty", "2-bytes", "magic-1st", "magic-2nd", "dtype", "ndim0", "short-header", "short-data-1",
        "no-data", "trailing", "ndim-low", "ndim-high"])
def test_read_idx_rejects_malformed_file_naming_it(tmp_path, gz, data, message):
    path = write(tmp_path / ("bad-file.idx" + (".gz" if gz else "")), data, gz)
    with pytest.raises(IDXError, match=message) as e:
        read_idx(path)
    assert path in str(e.value)


def test_read_idx_rejects_wrong_itemsize(tmp_path):
    """A header saying int32 over uint8 data: the length check catches the mismatch."""
    path = write(tmp_path / "x.idx", GOOD[:2] + b"\x0c" + GOOD[3:])
    with pytest.raises(IDXError, match=r"int32.*means 112"):
        read_idx(path)


@pytest.mark.parametrize("cut", [10, 40, -9, -1])
def test_read_idx_rejects_truncated_gzip_stream(tmp_path, cut):
    raw = gzip.compress(idx_bytes(np.arange(4000, dtype=np.int32)))
    path = write(tmp_path / "cut.gz", raw[:cut])
    with pytest.raises(IDXError, match="corrupt or truncated gzip") as e:
        read_idx(path)
    assert path in str(e.value)


@pytest.mark.parametrize("layout", ["flat", "fashion-mnist", "FashionMNIST/raw", "data/fashion"])
@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_find_fashion_mnist_layouts(tmp_path, no_system_copy, layout, gz):
    root = tmp_path / "root"
    where = root if layout == "flat" else root / layout
    write_fashion(str(where), gz=gz)
    files = find_fashion_mnist(str(root))
    assert files is not None and set(files) == set(ds.FASHION_MNIST_FILES)
    assert all(os.path.dirname(p) == str(where) and p.endswith(".gz") == gz for p in files.values())
    tx, ty, vx, vy = load_fashion_mnist(str(root))
    assert tx.shape == (30, 28, 28) and tx.dtype == torch.uint8 and vx.shape == (10, 28, 28)
    assert ty.dtype == torch.int64 and ty.tolist() == [k % 10 for k in range(30)]
    assert (tx[7] == 7).all() and (vx[9] == 9).all()


def test_find_fashion_mnist_needs_all_four_files_in_one_place(tmp_path, no_system_copy):
    d = write_fashion(str(tmp_path / "d"), gz=False)
    os.remove(os.path.join(d, "t10k-labels-idx1-ubyte"))
    # the missing file in another candidate folder does not complete the set
    write(tmp_path / "d" / "fashion-mnist" / "t10k-labels-idx1-ubyte", idx_bytes(np.zeros(10, np.uint8)))
    assert find_fashion_mnist(d) is None
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(d)


def test_find_fashion_mnist_falls_back_to_the_system_dir(tmp_path, monkeypatch):
    system = write_fashion(str(tmp_path / "system"))
    monkeypatch.setattr(ds, "FASHION_MNIST_SYSTEM_DIR", system)
    files = find_fashion_mnist(str(tmp_path / "empty"))
    assert files is not None and all(os.path.dirname(p) == system for p in files.values())


@pytest.mark.parametrize("kind,kw,message", [
    ("count", dict(n_labels=29), r"holds 30 images but .*train-labels-idx1-ubyte.gz holds 29 labels"),
    ("side", dict(side=32), r"train-images-idx3-ubyte.gz: holds uint8 of shape \(30, 32, 32\), expected uint8 of shape \(N, 28, 28\)"),
    ("label", dict(max_label=10), r"train-labels-idx1-ubyte.gz: label 10 out of range 0..9"),
])
def test_load_fashion_mnist_rejects_mismatched_files(tmp_path, no_system_copy, kind, kw, message):
    d = write_fashion(str(tmp_path / kind), n_train=30, **kw)
    with pytest.raises(IDXError, match=message):
        load_fashion_mnist(d)


def test_load_fashion_mnist_rejects_wrong_dtype(tmp_path, no_system_copy):
    d = write_fashion(str(tmp_path / "d"), gz=False)
    write(os.path.join(d, "t10k-labels-idx1-ubyte"), idx_bytes(np.zeros(10, np.int32)))
    with pytest.raises(IDXError, match=r"t10k-labels-idx1-ubyte: holds int32"):
        load_fashion_mnist(d)


def test_real_fashion_mnist_smoke():
    """The real files (Debian's dataset-fashion-mnist, or data/fashion-mnist/): sizes and class balance."""
    if find_fashion_mnist("data") is None:
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    tx, ty, vx, vy = load_fashion_mnist("data")
    assert tx.shape == (60000, 28, 28) and vx.shape == (10000, 28, 28)
    assert torch.bincount(ty).tolist() == [6000] * 10 and torch.bincount(vy).tolist() == [1000] * 10
    assert 0 < tx.float().mean() < 255 and tx.max() == 255
