import gzip
import os
import stat
import struct

import pytest
import torch

from trainables.config import AugmentConfig, DatasetConfig
from trainables.data import load_dataset, load_splits
from trainables.data.batches import augment, epoch_batches, epoch_views
from trainables.registry import ConfigError


NONE = AugmentConfig()


def test_same_seed_same_batches_and_views_other_epoch_differs():
    def batches(epoch):
        return [(idx.clone(), p.clone()) for _, idx, p in epoch_batches(100, 16, seed=3, epoch=epoch, aug=AugmentConfig(crop_pad=4, flip=True), hw=(8, 8))]

    a, b, c = batches(0), batches(0), batches(1)
    assert all(torch.equal(i, j) and torch.equal(p, q) for (i, p), (j, q) in zip(a, b))
    assert not all(torch.equal(i, j) for (i, _), (j, _) in zip(a, c))
    assert not all(torch.equal(p, q) for (_, p), (_, q) in zip(a, c))
    assert len(a) == 100 // 16


def test_ranks_split_each_global_batch():
    full = [idx for _, idx, _ in epoch_batches(64, 16, 0, 0, NONE, (8, 8))]
    r0 = [idx for _, idx, _ in epoch_batches(64, 16, 0, 0, NONE, (8, 8), rank=0, world_size=2)]
    r1 = [idx for _, idx, _ in epoch_batches(64, 16, 0, 0, NONE, (8, 8), rank=1, world_size=2)]
    assert all(torch.equal(f, torch.cat([a, b])) for f, a, b in zip(full, r0, r1))


def test_augment_crop_and_flip():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    # dy=1,dx=1 (no shift with pad 1), no flip / dy=0, dx=2, flip
    params = torch.tensor([[1, 1, 0], [0, 2, 1]])
    out = augment(x, params, AugmentConfig(crop_pad=1, flip=True))
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(out[0], x[0])
    shifted = torch.zeros(4, 4, dtype=torch.uint8)
    shifted[1:, :3] = x[1, 0, :3, 1:]  # moved up-left by (dy-1, dx-1) = (-1, +1)
    assert torch.equal(out[1, 0], shifted.flip(1))
    p = epoch_views(8, 0, 0, AugmentConfig(crop_pad=4, flip=True), (8, 8))
    assert p.shape == (8, 3) and p[:, :2].max() <= 8 and set(p[:, 2].tolist()) <= {0, 1}


def test_validation_split_is_deterministic_disjoint_and_separate_from_test():
    a = load_dataset("digits", val_fraction=0.2, split_seed=0)
    b = load_dataset("digits", val_fraction=0.2, split_seed=0)
    c = load_dataset("digits", val_fraction=0.2, split_seed=1)
    assert torch.equal(a.val_x, b.val_x) and not torch.equal(a.val_x, c.val_x)
    assert len(a.train_y) + len(a.val_y) + len(a.test_y) == 1797
    rows = lambda x: {bytes(r.flatten().tolist()) for r in x}
    assert not rows(a.val_x) & rows(a.test_x) - rows(a.train_x)  # no val image comes from the test split
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10 and a.train_x.dtype == torch.uint8


def _write_idx_gz(path, data: bytes, header: bytes):
    with gzip.open(path, "wb") as f:
        f.write(header + data)


def test_mnist_gz_in_read_only_root_is_decompressed_into_our_cache(tmp_path, monkeypatch):
    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 20), ("t10k", 5)):
        imgs = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8)
        _write_idx_gz(raw / f"{prefix}-images-idx3-ubyte.gz", bytes(imgs.flatten().tolist()), struct.pack(">IIII", 2051, n, 28, 28))
        _write_idx_gz(raw / f"{prefix}-labels-idx1-ubyte.gz", bytes([i % 10 for i in range(n)]), struct.pack(">II", 2049, n))
    for f in raw.iterdir():
        f.chmod(stat.S_IREAD)
    raw.chmod(stat.S_IREAD | stat.S_IEXEC)
    cache = tmp_path / "cache"
    monkeypatch.setenv("KDSWEEP_CACHE", str(cache))
    try:
        s = load_splits(DatasetConfig(name="fashion_mnist", root=str(tmp_path / "root"), val_fraction=0.25))
    finally:
        raw.chmod(stat.S_IRWXU)
    assert s.input_shape == (1, 28, 28) and s.num_classes == 10
    assert len(s.train_y) == 15 and len(s.val_y) == 5 and len(s.test_y) == 5
    assert sorted(os.listdir(cache / "data" / "FashionMNIST" / "raw")) == sorted(f.name[:-3] for f in raw.iterdir())


def test_missing_root_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("KD_DATA_ROOT", raising=False)
    with pytest.raises(ConfigError, match=r"`dataset.root` does not exist: nothing at .*nope"):
        load_dataset("fashion_mnist", root=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"`dataset.root` is required"):
        load_dataset("cifar10")
    with pytest.raises(ConfigError, match=r"`dataset.root` has no FashionMNIST files"):
        load_dataset("fashion_mnist", root=str(tmp_path))
    with pytest.raises(ConfigError, match=r"`dataset.name` must be one of \["):
        load_dataset("imagenet")


def test_synthetic_shapes():
    s = load_dataset("synthetic", n_train=100, n_test=10, shape=[3, 32, 32], num_classes=100)
    assert s.input_shape == (3, 32, 32) and s.num_classes == 100 and len(s.test_y) == 10


def test_digits_are_scikit_learns_read_without_importing_it(monkeypatch):
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    import trainables.data.builtin as data

    d = load_digits()
    want = torch.from_numpy(d.images).mul(255.0 / 16.0).round().clamp(0, 255).to(torch.uint8).unsqueeze(1)
    perm = torch.randperm(1797, generator=torch.Generator().manual_seed(0))  # the fixed 20 % test split
    te, tr = perm[:359].sort().values, perm[359:].sort().values
    x_tr, y_tr, x_te, y_te, classes = data.digits()
    assert classes == 10
    assert torch.equal(x_tr, want[tr]) and torch.equal(x_te, want[te])
    assert y_tr.tolist() == d.target[tr.numpy()].tolist() and y_te.tolist() == d.target[te.numpy()].tolist()
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)  # another layout: load_digits itself
    for a, b in zip(data.digits(), (x_tr, y_tr, x_te, y_te, classes)):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    code = "import sys; from trainables.data.builtin import digits; digits(); print('sklearn.datasets' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
