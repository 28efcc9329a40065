"""Datasets as device-resident uint8 tensors, a deterministic validation split, and batched augmentation.

No DataLoader in the hot loop: a whole split lives on the training device, batches are slices of a
seeded permutation, and crop/flip run batched on the device. Every random choice of an epoch is a pure
function of (seed, epoch) and the example, so the same view can be re-created anywhere (teacher
caching, exact resume) without saving RNG state, whatever the batch size.
"""
from __future__ import annotations

import contextlib
import functools
import gzip
import importlib.util
import inspect
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import Tensor

from trainables.data.images import RawData, decode_folder, read_arrays, stratified_split
from trainables.data.text import tokenize_text
from trainables.registry import ConfigError, Registry, missing

if TYPE_CHECKING:
    from trainables.config import DatasetConfig, TrialConfig, UnlabeledConfig

#: The label of an unlabelled training example: PyTorch's cross-entropy ignore_index, so CE skips it.
UNLABELED = -100

# name -> loader(root, download, cache, **kwargs) -> (train_x, train_y, test_x, test_y, num_classes) or RawData
# (RawData: own val split, class names, skipped files). A loader that takes `image_size` / `channels`
# (`tokenizer` / `max_length`) gets the dataset config's; one that takes all of CARVES carves its own absent splits with the
# config's values (digits' own `test_fraction` keeps its meaning: it takes only that one).
Loader = Callable[..., "tuple[Tensor, Tensor, Tensor, Tensor, int] | RawData"]
DATASETS: Registry[Loader] = Registry("dataset", "dataset.name")
CARVES = {"val_fraction", "test_fraction", "split_seed"}

#: Augmentation each dataset gets unless the config says otherwise.
DEFAULT_AUGMENT = {"cifar10": {"crop_pad": 4, "flip": True}, "cifar100": {"crop_pad": 4, "flip": True}}


def cache_dir(cache: str | None) -> Path:
    """Where decompressed files go: never inside a user's (possibly read-only) data root.
    `cache` is dataset.cache, resolved on the driver (DatasetConfig.resolved)."""
    from trainables.schema import DEFAULT_CACHE

    return Path(cache or DEFAULT_CACHE) / "data"


@dataclass(frozen=True)
class DataSplits:
    """Train/val/test inputs and labels (int64); val is carved from the official train. Inputs are
    images (uint8, NCHW) or token ids (int32, (N, max_length), right-padded: trainables.data.text).
    The last `n_unlabeled` train examples have no label (UNLABELED): transfer data for the
    distillation term (dataset.unlabeled)."""

    name: str
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    mean: tuple[float, ...]  # per channel, 0..1 scale; () for token ids
    std: tuple[float, ...]
    classes: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()  # files the loader could not decode (image folders)
    decode_s: float = 0.0  # seconds this load spent decoding (0: read from the decode-once cache)
    n_unlabeled: int = 0
    tokenizer: str | None = None  # text: the tokenizer the ids come from
    pad_id: int | None = None  # text: its pad id (the ids are right-padded with it)
    val_text: tuple[str, ...] = ()  # text: the val and test strings, in the splits' order
    test_text: tuple[str, ...] = ()

    @property
    def n_labeled(self) -> int:
        return len(self.train_y) - self.n_unlabeled

    def labeled(self) -> "DataSplits":
        """The splits without the unlabelled examples (what CE alone trains on: a control, a teacher)."""
        if not self.n_unlabeled:
            return self
        return replace(self, train_x=self.train_x[: self.n_labeled], train_y=self.train_y[: self.n_labeled], n_unlabeled=0)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """(C, H, W) for images, (max_length,) for token ids."""
        return tuple(self.train_x.shape[1:])

    def to(self, device: torch.device | str, images: bool = True) -> "DataSplits":
        """Labels (and, unless images=False, the images) on `device`."""
        keys = ("train_y", "val_y", "test_y") + (("train_x", "val_x", "test_x") if images else ())
        return replace(self, **{k: getattr(self, k).to(device) for k in keys})

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.train_x, self.val_x, self.test_x))


def load_dataset(
    name: str,
    root: str | None = None,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    download: bool = False,
    cache: str | None = None,
    test_fraction: float = 0.1,
    image_size: int = 32,
    channels: int = 3,
    unlabeled: "UnlabeledConfig | None" = None,
    tokenizer: str | None = None,
    max_length: int = 128,
    read_unlabeled: "ReadUnlabeled | None" = None,
    **kwargs,
) -> DataSplits:
    """Load a registered dataset; carve what it lacks from its train split: the test split
    (`test_fraction`, stratified) and the validation split (`val_fraction`).

    The splits depend on `split_seed` only (not the trial seed), so every trial of a sweep, and the
    teacher, see the same train/val partition and the test split is never touched by the search.
    Built-in datasets keep their original (unstratified) val carve, so their numbers do not move.
    `unlabeled` (dataset.unlabeled) then drops the labels of all but `labels_kept` of the train
    split (stratified, seeded by split_seed + 2) and appends the examples at its `root`, unlabelled,
    after the labelled ones: read by `read_unlabeled` (the task's: Task.read_unlabeled, handed the
    root, the train split and the loader's arguments), so they come in the train split's form.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"`0 < dataset.val_fraction < 1` must hold, but got dataset.val_fraction={val_fraction}")
    loader = DATASETS.get(name)
    params = inspect.signature(loader).parameters
    extra = {k: v for k, v in (("image_size", image_size), ("channels", channels), ("tokenizer", tokenizer), ("max_length", max_length))
             if k in params}
    if CARVES.issubset(params):  # a loader that carves its own splits (image_folder: into its decode cache)
        extra.update(val_fraction=val_fraction, test_fraction=test_fraction, split_seed=split_seed)
    try:
        bound = inspect.signature(loader).bind(root=root, download=download, cache=cache, **extra, **kwargs)
    except TypeError as e:
        raise ConfigError(f"`dataset.kwargs` do not fit dataset.name={name!r} ({e}): fix or remove them") from None
    out = loader(root=root, download=download, cache=cache, **extra, **kwargs)
    if isinstance(out, RawData):
        raw = out
        train_x, train_y = raw.train_x, raw.train_y
        if raw.test_x is None:
            keep, test_idx = stratified_split(train_y, test_fraction, split_seed)
            raw.test_x, raw.test_y = train_x[test_idx], train_y[test_idx]
            train_x, train_y = train_x[keep], train_y[keep]
        if raw.val_x is None:
            tr_idx, val_idx = stratified_split(train_y, val_fraction, split_seed + 1)
            val_x, val_y, train_x, train_y = train_x[val_idx], train_y[val_idx], train_x[tr_idx], train_y[tr_idx]
        else:
            val_x, val_y = raw.val_x, raw.val_y
        test_x, test_y, num_classes, classes = raw.test_x, raw.test_y, raw.num_classes, raw.classes
    else:
        full_x, full_y, test_x, test_y, num_classes = out
        n = len(full_y)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
        n_val = max(1, round(n * val_fraction))
        val_idx, tr_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
        train_x, train_y, val_x, val_y = full_x[tr_idx], full_y[tr_idx], full_x[val_idx], full_y[val_idx]
        raw, classes = None, tuple(str(i) for i in range(num_classes))
    if num_classes < 2:
        raise ConfigError(f"`dataset.name` {name!r} gave {num_classes} class: classification needs at least two classes (check its labels)")
    n_unlabeled = 0
    if unlabeled is not None:
        bound.apply_defaults()  # what the loader read the data with: the unlabelled examples are read the same way
        options = {k: v for k, v in bound.arguments.items() if k != "kwargs"} | bound.arguments.get("kwargs", {})
        read = functools.partial(read_unlabeled, options=options) if read_unlabeled else None
        train_x, train_y, n_unlabeled = _with_unlabeled(train_x, train_y, unlabeled, split_seed, read)
    mean, std = channel_stats(train_x) if train_x.dim() == 4 else ((), ())
    return DataSplits(
        name=name,
        train_x=train_x.contiguous(),
        train_y=train_y.contiguous(),
        val_x=val_x.contiguous(),
        val_y=val_y.contiguous(),
        test_x=test_x.contiguous(),
        test_y=test_y.contiguous(),
        num_classes=num_classes,
        mean=mean,
        std=std,
        classes=tuple(classes),
        skipped=tuple(raw.skipped) if raw else (),
        decode_s=raw.decode_s if raw else 0.0,
        n_unlabeled=n_unlabeled,
        tokenizer=tokenizer if "tokenizer" in params else None,
        pad_id=raw.pad_id if raw else None,
        val_text=tuple(raw.texts.get("val", ())) if raw else (),
        test_text=tuple(raw.texts.get("test", ())) if raw else (),
    )


#: How a task reads `dataset.unlabeled.root` (Task.read_unlabeled): (root, the train split's
#: examples, the loader's arguments by name) -> examples in the train split's form.
ReadUnlabeled = Callable[..., Tensor]


def _with_unlabeled(x: Tensor, y: Tensor, unlabeled: "UnlabeledConfig", split_seed: int,
                    read: Callable[[str, Tensor], Tensor] | None) -> tuple[Tensor, Tensor, int]:
    """The train split with its unlabelled examples last (labels UNLABELED), and their count."""
    parts = []
    if unlabeled.labels_kept is not None:
        kept, dropped = stratified_split(y, 1.0 - unlabeled.labels_kept, split_seed + 2)
        parts.append(x[dropped])
        x, y = x[kept], y[kept]
    if unlabeled.root:
        if read is None:
            raise TypeError("dataset.unlabeled.root is read by the task: load the splits with Task.splits")
        extra = read(unlabeled.root, x)
        if extra.shape[1:] != x.shape[1:] or extra.dtype != x.dtype:
            raise ConfigError(f"`dataset.unlabeled.root` examples are {tuple(extra.shape[1:])} {extra.dtype}, but the train split's are "
                              f"{tuple(x.shape[1:])} {x.dtype}: its reader must give them in the train split's form")
        parts.append(extra)
    n = sum(len(p) for p in parts)
    if n == 0:
        raise ConfigError("`dataset.unlabeled` gave no unlabelled examples: lower labels_kept or add examples to root")
    return torch.cat([x, *parts]), torch.cat([y, torch.full((n,), UNLABELED, dtype=y.dtype)]), n


def channel_stats(x: Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std on the 0..1 scale, in chunks (a memory-mapped split is never
    copied whole into float)."""
    c = x.shape[1]
    total, sq, n = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64), 0
    for i in range(0, len(x), chunk):
        xb = x[i : i + chunk].to(torch.float64).div_(255.0)
        total += xb.sum(dim=(0, 2, 3))
        sq += xb.pow(2).sum(dim=(0, 2, 3))
        n += xb.numel() // c
    mean = total / n
    std = ((sq / n - mean.pow(2)) * n / max(1, n - 1)).clamp_min(0).sqrt().clamp_min(1e-3)
    return tuple(mean.float().tolist()), tuple(std.float().tolist())


def load_splits(ds: "DatasetConfig", read_unlabeled: ReadUnlabeled | None = None) -> DataSplits:
    """`load_dataset` for a validated dataset config (the form every caller holds). Callers load
    through their task (Task.splits), which reads `dataset.unlabeled.root`."""
    ds = ds.resolved()
    return load_dataset(ds.name, ds.root, ds.val_fraction, ds.split_seed, ds.download, ds.cache, ds.test_fraction, ds.image_size,
                        ds.channels, ds.unlabeled, ds.tokenizer, ds.max_length, read_unlabeled, **ds.kwargs)


# ---------------------------------------------------------------------------------------------
# Registered datasets


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


def _resolve_root(root: str | None, field: str = "dataset.root") -> Path:
    if not root:
        raise ConfigError(
            f"`{field}` is required for this dataset: set it to the folder that holds the data "
            "(or export KD_DATA_ROOT)"
        )
    path = Path(root).expanduser()
    if not path.is_dir():
        raise ConfigError(f"`{field}` {missing(root, 'a folder of this dataset') if not path.exists() else f'must be a folder, but got the file {root!r}'}")
    return path


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


# ---------------------------------------------------------------------------------------------
# Batches and augmentation: pure functions of (seed, epoch) and the example


def _mix(seed: int, epoch: int, stream: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_000_033 + stream) % (2**63 - 1)


def epoch_permutation(n: int, seed: int, epoch: int, device: torch.device | str = "cpu") -> Tensor:
    """The order of the train split for one epoch (generated on CPU so every device agrees)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, epoch, -1))).to(device)


def epoch_views(n: int, seed: int, epoch: int, aug, hw: tuple[int, int]) -> Tensor:
    """Per-example (dy, dx, flip[, y0, x0, h, w]) for one epoch, int64 on CPU: row i is the whole
    randomness of example i's view, whatever the batch size, the batch it lands in or the worker
    that trains it (so a searched batch size still reads the teacher cache). `aug` is an
    AugmentConfig; the crop box columns exist with `resized_crop`, sampled as torchvision's
    RandomResizedCrop does (10 tries at a scale and log-ratio, else the whole image), from the same
    generator after the shifts and flips."""
    g = torch.Generator().manual_seed(_mix(seed, epoch, -3))
    shifts = torch.randint(0, 2 * aug.crop_pad + 1, (n, 2), generator=g)
    flips = torch.randint(0, 2, (n, 1), generator=g) if aug.flip else torch.zeros(n, 1, dtype=torch.long)
    cols = [shifts, flips]
    if aug.resized_crop is not None:
        cols.append(_crop_boxes(g, n, hw, aug.resized_crop.scale, aug.resized_crop.ratio))
    return torch.cat(cols, dim=1)


def _crop_boxes(g: torch.Generator, n: int, hw: tuple[int, int], scale, ratio, tries: int = 10) -> Tensor:
    h, w = hw
    area = torch.empty(n, tries).uniform_(scale[0], scale[1], generator=g) * (h * w)
    r = torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g).exp()
    cw, ch = (area * r).sqrt().round().long(), (area / r).sqrt().round().long()
    ok = (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h)
    first = ok.long().argmax(1, keepdim=True)
    found = ok.any(1)
    cw = torch.where(found, cw.gather(1, first).squeeze(1), torch.full((n,), w))
    ch = torch.where(found, ch.gather(1, first).squeeze(1), torch.full((n,), h))
    u = torch.rand(n, 2, generator=g)
    y0, x0 = (u[:, 0] * (h - ch + 1)).long(), (u[:, 1] * (w - cw + 1)).long()
    return torch.stack([y0, x0, ch, cw], dim=1)


def augment(x: Tensor, params: Tensor, aug) -> Tensor:
    """Random crop with zero padding, random-resized-crop (bilinear, back to the input size) and
    horizontal flip, batched on x's device; x is (B, C, H, W) uint8 (float after a resized crop).
    Decided from the config, never from the params' values: no host sync in the hot loop."""
    if aug.crop_pad == 0 and not aug.flip and aug.resized_crop is None:
        return x
    b, c, h, w = x.shape
    params = params.to(x.device, non_blocking=True)
    if aug.crop_pad:
        p = aug.crop_pad
        padded = torch.nn.functional.pad(x, (p,) * 4)
        rows = (params[:, 0, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (params[:, 1, None] + torch.arange(w, device=x.device))[:, None, None, :]
        bi = torch.arange(b, device=x.device)[:, None, None, None]
        ci = torch.arange(c, device=x.device)[None, :, None, None]
        x = padded[bi, ci, rows, cols]
    if aug.resized_crop is not None:
        from torchvision.ops import roi_align

        y0, x0, ch, cw = params[:, 3:7].float().unbind(1)
        boxes = torch.stack([torch.arange(b, device=x.device, dtype=torch.float32), x0, y0, x0 + cw, y0 + ch], dim=1)
        x = roi_align(x.float(), boxes, output_size=(h, w), spatial_scale=1.0, sampling_ratio=1, aligned=True)
    return torch.where(params[:, 2, None, None, None].bool(), x.flip(3), x) if aug.flip else x


@dataclass(frozen=True)
class BatchLayout:
    """How an epoch's global batches are made: `labeled` labelled examples first, then `unlabeled`
    unlabelled ones (dataset.unlabeled), `steps` batches an epoch. Without unlabelled data it is
    today's plain layout: one permutation of the train split, the last partial batch dropped.
    With them an epoch is one pass's worth of batches over all examples, each kind drawn from its
    own seeded permutations (repeated as needed), so the mix holds at the set ratio."""

    n: int  # labelled train examples
    n_unlabeled: int
    batch_size: int
    unlabeled: int  # per global batch

    @classmethod
    def of(cls, n: int, batch_size: int, n_unlabeled: int = 0, ratio: float | None = None) -> "BatchLayout":
        if not n_unlabeled:
            return cls(n, 0, batch_size, 0)
        share = n_unlabeled / (n + n_unlabeled) if ratio is None else ratio
        if batch_size < 2:
            raise ConfigError(f"`train.batch_size` must be >= 2 with dataset.unlabeled (a labelled and an unlabelled example), but got {batch_size}")
        return cls(n, n_unlabeled, batch_size, min(batch_size - 1, max(1, round(batch_size * share))))

    @property
    def labeled(self) -> int:
        return self.batch_size - self.unlabeled

    @property
    def steps(self) -> int:
        return (self.n + self.n_unlabeled) // self.batch_size if self.n_unlabeled else self.n // self.batch_size

    def check_world(self, world: int) -> None:
        """Every DDP rank gets the same share of each kind, so each rank's CE is a mean over the
        same number of labelled examples and the averaged gradient is the one-process gradient."""
        if self.unlabeled and (self.labeled % world or self.unlabeled % world):
            raise ConfigError(f"`dataset.unlabeled.ratio` splits each batch of {self.batch_size} into {self.labeled} labelled and "
                              f"{self.unlabeled} unlabelled examples, which do not divide over {world} workers: change the ratio or batch size")

    def rows(self, rank: int = 0, world: int = 1) -> slice | Tensor:
        """This rank's positions within a global batch (a slice where contiguous)."""
        if not self.unlabeled or world == 1:
            per = self.batch_size // world
            return slice(rank * per, (rank + 1) * per)
        lr, ur = self.labeled // world, self.unlabeled // world
        return torch.cat([torch.arange(rank * lr, (rank + 1) * lr), self.labeled + torch.arange(rank * ur, (rank + 1) * ur)])


def _stream(n: int, count: int, g: torch.Generator) -> Tensor:
    """`count` indices from successive permutations of range(n)."""
    perms = [torch.randperm(n, generator=g) for _ in range(-(-count // n))]
    return torch.cat(perms)[:count] if perms else torch.zeros(0, dtype=torch.long)


def by_length(order: Tensor, lengths: Tensor, batch_size: int, g: torch.Generator, chunk: int = 50) -> Tensor:
    """The permutation regrouped so each batch holds texts of similar length (a model then computes
    little padding): every run of `chunk` batches' worth of it sorted by length, cut into batches,
    and the batches shuffled. Still a pure function of the permutation and the generator."""
    full = len(order) // batch_size * batch_size
    span = chunk * batch_size
    runs = [order[i : min(i + span, full)] for i in range(0, full, span)]
    grouped = torch.cat([r[lengths[r].argsort(stable=True)] for r in runs]).view(-1, batch_size) if full else order[:0].view(0, batch_size)
    return torch.cat([grouped[torch.randperm(len(grouped), generator=g)].flatten(), order[full:]])


def epoch_batches(
    n: int, batch_size: int, seed: int, epoch: int, aug, hw: tuple[int, int], device: torch.device | str = "cpu",
    rank: int = 0, world_size: int = 1, n_unlabeled: int = 0, ratio: float | None = None, lengths: Tensor | None = None,
):
    """Yield (batch_idx, indices, view params) for one epoch, both on `device`: `n` labelled
    examples, then `n_unlabeled` unlabelled ones (indices n..), mixed as BatchLayout says; each
    example's view is its row of epoch_views. `lengths` (text, CPU): batches of similar lengths
    (by_length).

    With several DDP workers each rank takes its own share of every global batch, so the global
    batch (and hence the math) is the same whatever the world size.
    """
    layout = BatchLayout.of(n, batch_size, n_unlabeled, ratio)
    rows = layout.rows(rank, world_size)
    if not n_unlabeled and lengths is not None:
        g = torch.Generator().manual_seed(_mix(seed, epoch, -4))
        order = by_length(epoch_permutation(n, seed, epoch), lengths, batch_size, g).to(device)
    elif not n_unlabeled:
        order = epoch_permutation(n, seed, epoch, device)
    else:
        g_l, g_u = (torch.Generator().manual_seed(_mix(seed, epoch, k)) for k in (-1, -2))
        steps = layout.steps
        lab = _stream(n, steps * layout.labeled, g_l).view(steps, layout.labeled)
        unl = n + _stream(n_unlabeled, steps * layout.unlabeled, g_u).view(steps, layout.unlabeled)
        order = torch.cat([lab, unl], 1).flatten().to(device)
    on = rows if isinstance(rows, slice) else rows.to(order.device)
    views = None if aug.static else epoch_views(n + n_unlabeled, seed, epoch, aug, hw).to(device)
    still = torch.zeros(batch_size // world_size, 3, dtype=torch.long, device=device)  # fixed views: augment reads nothing
    for b in range(layout.steps):
        idx = order[b * batch_size : (b + 1) * batch_size][on]
        yield b, idx, still if views is None else views[idx]


def train_batches(splits: DataSplits, cfg: "TrialConfig", epoch: int, device: torch.device | str, rank: int = 0, world: int = 1):
    """epoch_batches for a trial's train split: the one call the trial loop and the teacher cache
    share, so the cache holds exactly the views a trial trains on."""
    return epoch_batches(splits.n_labeled, cfg.train.batch_size, cfg.seed, epoch, cfg.dataset.augment_or_default(), splits.input_shape[1:], device,
                         rank, world, splits.n_unlabeled, cfg.dataset.unlabeled_ratio, text_lengths(splits))


def text_lengths(splits: DataSplits) -> Tensor | None:
    """Each train example's token count (CPU), when the inputs are padded token ids: its batches group similar lengths."""
    if splits.pad_id is None:
        return None
    return (splits.train_x != splits.pad_id).sum(1).cpu()


def batch_layout(splits: DataSplits, cfg: "TrialConfig") -> BatchLayout:
    """A trial's BatchLayout over its train split."""
    return BatchLayout.of(splits.n_labeled, cfg.train.batch_size, splits.n_unlabeled, cfg.dataset.unlabeled_ratio)


def place(splits: DataSplits, ds: "DatasetConfig", device: torch.device | str) -> tuple[DataSplits, bool]:
    """Labels on the device, and the images too under `device` placement (`auto`: when all splits
    take at most `dataset.device_share` of the device's free memory; always on a CPU). Returns the
    placed splits and whether the images are on the device."""
    dev = torch.device(device)
    if ds.placement == "auto":
        on_device = dev.type != "cuda" or splits.nbytes() <= ds.device_share * torch.cuda.mem_get_info(dev)[0]
    else:
        on_device = ds.placement == "device"
    return splits.to(dev, images=on_device), on_device


def device_batches(x_all: Tensor, y_all: Tensor, batches, device: torch.device | str, on_device: bool):
    """(batch_idx, indices, images, labels, view params) on the device for each of `batches`
    (epoch_batches, on the device when the images are there, else on the host).

    Device placement: slices of the resident split. Host placement: gathered on the host (from
    memory or a memory-mapped cache), pinned, and copied on a side CUDA stream one batch ahead, so
    the copy of batch b+1 overlaps the compute of batch b. The same indices either way: the same
    batches."""
    if on_device:
        for b, idx, view in batches:
            yield b, idx, x_all[idx], y_all[idx], view
        return
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    stream = torch.cuda.Stream(dev) if cuda else None

    def copy(item):
        b, idx, view = item
        x = x_all[idx]
        if cuda:
            x = x.pin_memory()
        with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
            return b, idx.to(dev, non_blocking=True), x.to(dev, non_blocking=True), view.to(dev, non_blocking=True)

    it = iter(batches)
    first = next(it, None)
    pending = copy(first) if first is not None else None
    while pending is not None:
        if cuda:
            torch.cuda.current_stream(dev).wait_stream(stream)
            for t in pending[1:]:
                t.record_stream(torch.cuda.current_stream(dev))
        b, idx, x, view = pending
        following = next(it, None)
        pending = copy(following) if following is not None else None  # in flight while batch b computes
        yield b, idx, x, y_all[idx], view


from trainables.data import audio  # noqa: E402,F401  (registers the `audio` loader, which builds on this module)
