"""The built-in dataset loaders, registered in DATASETS: scikit-learn's digits (offline, the
embedded default), MNIST, Fashion-MNIST, CIFAR-10/100 (torchvision's files), an image folder, an
arrays file, text, and synthetic images for benchmarks."""
from __future__ import annotations

import gzip
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from trainables.data import DATASETS, _resolve_root, cache_dir
from trainables.data.images import decode_folder, read_arrays
from trainables.data.text import tokenize_text
from trainables.registry import ConfigError

@DATASETS.register
def digits(root: str | None = None, download: bool = False, cache: str | None = None, test_fraction: float = 0.2):
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes): offline, the embedded default.

    It has no official test split; a fixed 20% (seed 0) is held out as test.
    """
    pixels, target = _digits_file()
    x = torch.from_numpy(pixels).reshape(-1, 1, 8, 8).mul(255.0 / 16.0).round().clamp(0, 255).to(torch.uint8)
    y = torch.from_numpy(target).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_test = round(len(y) * test_fraction)
    te, tr = perm[:n_test].sort().values, perm[n_test:].sort().values
    return x[tr], y[tr], x[te], y[te], 10


def _digits_file() -> tuple[np.ndarray, np.ndarray]:
    """The digits' pixels (0..16, 64 a row) and labels, read from the file scikit-learn ships
    (what `load_digits` reads): importing sklearn.datasets costs ~0.9 s in every process that loads
    the default data (the driver, the teacher's task, each trial actor), reading the file 5 ms."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():  # another layout: ask scikit-learn
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.data, d.target
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1], table[:, -1].astype(np.int64)


def _mnist_like(cls_name: str, root: str | None, download: bool, cache: str | None):
    """torchvision's MNIST-family class over a local root; .gz files are decompressed into our cache."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, cls_name)
    files = [os.path.splitext(os.path.basename(url))[0] for url, _ in cls.resources]
    if download:
        path = _resolve_root(root) if root else cache_dir(cache)
        tv_root = path
    else:
        path = _resolve_root(root)
        raw = next(
            (d for d in (path / cls_name / "raw", path / "raw", path) if any((d / f).exists() or (d / f"{f}.gz").exists() for f in files)),
            None,
        )
        if raw is None:
            raise ConfigError(
                f"`dataset.root` has no {cls_name} files ({files[0]}[.gz]) under {path} or {path / cls_name / 'raw'}: "
                "fix the path or set dataset.download: true"
            )
        if all((raw / f).exists() for f in files) and raw.name == "raw" and raw.parent.name == cls_name:
            tv_root = raw.parent.parent
        else:
            tv_root = cache_dir(cache)
            dest = tv_root / cls_name / "raw"
            dest.mkdir(parents=True, exist_ok=True)
            for f in files:
                if (dest / f).exists():
                    continue
                src = raw / f if (raw / f).exists() else raw / f"{f}.gz"
                if not src.exists():
                    raise ConfigError(f"`dataset.root` lacks {src.name} for {cls_name}: fix the path or set dataset.download: true")
                # Decompress to a temporary name then rename: concurrent trials may race here.
                with tempfile.NamedTemporaryFile(dir=dest, delete=False) as tmp:
                    opener = gzip.open if src.suffix == ".gz" else open
                    with opener(src, "rb") as fin:
                        shutil.copyfileobj(fin, tmp)
                os.replace(tmp.name, dest / f)
    train = cls(str(tv_root), train=True, download=download)
    test = cls(str(tv_root), train=False, download=download)
    return train.data.unsqueeze(1), train.targets.long(), test.data.unsqueeze(1), test.targets.long(), len(cls.classes)


@DATASETS.register
def mnist(root: str | None = None, download: bool = False, cache: str | None = None):
    return _mnist_like("MNIST", root, download, cache)


@DATASETS.register
def fashion_mnist(root: str | None = None, download: bool = False, cache: str | None = None):
    return _mnist_like("FashionMNIST", root, download, cache)


def _cifar(cls_name: str, root: str | None, download: bool, cache: str | None):
    import torchvision.datasets as tvd

    path = cache_dir(cache) if (download and not root) else _resolve_root(root)
    try:
        train = getattr(tvd, cls_name)(str(path), train=True, download=download)
        test = getattr(tvd, cls_name)(str(path), train=False, download=download)
    except RuntimeError as e:
        raise ConfigError(
            f"`dataset.root` has no {cls_name} batches under {path} ({e}): fix the path or set dataset.download: true"
        ) from e

    def to_tensors(ds):
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets, dtype=torch.long)

    (xtr, ytr), (xte, yte) = to_tensors(train), to_tensors(test)
    return xtr, ytr, xte, yte, len(train.classes)


@DATASETS.register
def cifar10(root: str | None = None, download: bool = False, cache: str | None = None):
    return _cifar("CIFAR10", root, download, cache)


@DATASETS.register
def cifar100(root: str | None = None, download: bool = False, cache: str | None = None):
    return _cifar("CIFAR100", root, download, cache)


@DATASETS.register
def image_folder(root: str | None = None, download: bool = False, cache: str | None = None, image_size: int = 32, channels: int = 3,
                 val_fraction: float = 0.1, test_fraction: float = 0.1, split_seed: int = 0):
    """Your photos in torchvision's ImageFolder layout (root/train/<class>/*, optional val/, test/),
    decoded once into the cache with absent splits carved there, so every split is memory-mapped
    (trainables/data/images.py)."""
    return decode_folder(_resolve_root(root), cache_dir(cache), image_size, channels, val_fraction=val_fraction,
                         test_fraction=test_fraction, split_seed=split_seed)


@DATASETS.register
def arrays(root: str | None = None, download: bool = False, cache: str | None = None):
    """Your arrays: `dataset.root` is a .npz / .pt / .safetensors file with train_x, train_y
    (optional val_*, test_*); see trainables/data/images.py."""
    if not root:
        raise ConfigError("`dataset.root` is required for arrays: set it to the .npz, .pt or .safetensors file")
    return read_arrays(Path(root).expanduser())


@DATASETS.register
def text(root: str | None = None, download: bool = False, cache: str | None = None, tokenizer: str | None = None, max_length: int = 128,
         text_column: str = "text", label_column: str = "label", val_fraction: float = 0.1, test_fraction: float = 0.1, split_seed: int = 0):
    """Your text: a .csv/.tsv/.jsonl file (or train/val/test ones in a folder), class folders of .txt
    files, or a `datasets.save_to_disk` folder; tokenized once with `dataset.tokenizer` into the
    cache (trainables/data/text.py)."""
    if not root:
        raise ConfigError("`dataset.root` is required for text: set it to a .csv/.tsv/.jsonl file or a folder of text")
    if not tokenizer:
        raise ConfigError("`dataset.tokenizer` is required for text: set it to a folder with tokenizer files (a sweep with a Hugging Face "
                          "teacher uses the teacher's checkpoint folder), or to {vocab_size: 8000} to train a WordPiece tokenizer on the train split")
    return tokenize_text(root, cache_dir(cache), tokenizer, max_length, text_column, label_column, val_fraction, test_fraction, split_seed)


@DATASETS.register
def lm_text(root: str | None = None, download: bool = False, cache: str | None = None, tokenizer: str | None = None, max_length: int = 128,
            text_column: str = "text", prompt_column: str | None = None, response_column: str | None = None, val_fraction: float = 0.1,
            test_fraction: float = 0.1, split_seed: int = 0):
    """Text for a causal language model: plain text packed into blocks of `max_length` tokens, or
    prompt/response pairs scored on the response (trainables/data/lm.py); tokenized once into the cache."""
    from trainables.data.lm import tokenize_lm

    if not root:
        raise ConfigError("`dataset.root` is required for lm_text: set it to a .txt file, a folder of .txt files or a .csv/.tsv/.jsonl table")
    if not tokenizer:
        raise ConfigError("`dataset.tokenizer` is required for lm_text: set it to a folder with tokenizer files (a sweep with a Hugging Face "
                          "teacher uses the teacher's checkpoint folder)")
    return tokenize_lm(root, cache_dir(cache), tokenizer, max_length, text_column, prompt_column, response_column, val_fraction,
                       test_fraction, split_seed)


@DATASETS.register
def synthetic(
    root: str | None = None,
    download: bool = False,
    cache: str | None = None,
    n_train: int = 5000,
    n_test: int = 1000,
    shape: tuple[int, int, int] | list[int] = (3, 32, 32),
    num_classes: int = 10,
    seed: int = 0,
):
    """Random uint8 images of any shape: measures speed exactly as real images would, not accuracy."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    x = torch.randint(0, 256, (n_train + n_test, *shape), generator=g, dtype=torch.uint8)
    y = torch.randint(0, num_classes, (n_train + n_test,), generator=g)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:], num_classes
