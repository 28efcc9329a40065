"""Datasets as splits: the loader registry (DATASETS), a deterministic validation and test carve,
unlabelled examples appended, channel statistics. By concept beside it: `builtin.py` (the
registered loaders: digits, MNIST-likes, CIFAR, folders, arrays, text, synthetic), `audio.py`
(clips), `batches.py` (epochs, views, augmentation and the batch layout: pure functions of seed,
epoch and example), `placement.py` (splits on the device, or batches copied ahead from the host),
`images.py` and `text.py` (decoding and tokenizing once into the cache), `normalize.py`.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from trainables.data.images import RawData, stratified_split
from trainables.registry import ConfigError, Registry, missing

if TYPE_CHECKING:
    from trainables.config import DatasetConfig, UnlabeledConfig

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


# The built-in loaders register themselves; they build on this module.
from trainables.data import audio, builtin  # noqa: E402,F401
