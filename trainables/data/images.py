"""Your own data: an image folder (torchvision's ImageFolder layout) or arrays, decoded once.

A folder is decoded in parallel (a process pool) into uint8 NCHW arrays, written to the cache
(`dataset.cache`, i.e. $KDSWEEP_CACHE or ~/.cache/kdsweep, resolved on the driver) under a key of
the file list, sizes, mtimes and the preprocessing; every later load (the teacher, the teacher
cache, every trial, the next sweep over the same folder) memory-maps those arrays instead of
decoding again. Preprocessing: EXIF orientation applied, converted to `channels` (1: greyscale, 3:
RGB; palette and alpha images are converted, alpha dropped), the shorter side resized to
`image_size` (bilinear, antialiased) and the centre `image_size` x `image_size` cropped.
Files that are not images or cannot be decoded are skipped, counted and named in one warning.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from trainables.atomic import atomic_path
from trainables.registry import ConfigError, missing
from trainables.tensor_files import load_tensor_file

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
#: Files shown by name in the skipped-files warning.
SHOW = 5
FORMAT = 1  # bump when the decoding changes: old caches are then ignored
_warned: set[str] = set()  # decoded folders whose skipped files this process has named already


@dataclass
class RawData:
    """What a dataset loader returns when it has more to say than (train, test, num_classes):
    its own val split, class names, files it skipped. Absent val/test splits are carved from train
    (seeded, stratified) by trainables.data.load_dataset."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor | None = None
    test_y: Tensor | None = None
    val_x: Tensor | None = None
    val_y: Tensor | None = None
    classes: tuple[str, ...] = ()
    skipped: list[str] = field(default_factory=list)
    decode_s: float = 0.0  # seconds spent decoding in this call (0: read from the cache)
    texts: dict[str, list[str]] = field(default_factory=dict)  # text: the val and test strings (the text corruption suite)
    pad_id: int | None = None  # text: the tokenizer's pad id (the ids are right-padded with it)
    n_classes: int | None = None  # what the labels index when the train split need not show the largest (a vocabulary)

    @property
    def num_classes(self) -> int:
        if self.n_classes is not None:
            return self.n_classes
        return len(self.classes) if self.classes else int(self.train_y.max()) + 1


def stratified_split(y: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(kept, held-out) indices, sorted: `fraction` of every class held out (seeded), at least one
    image of a class that has two or more."""
    g = torch.Generator().manual_seed(seed)
    held = []
    for c in torch.unique(y).tolist():
        idx = (y == c).nonzero().flatten()
        n = round(len(idx) * fraction) if fraction > 0 else 0
        n = max(n, 1 if fraction > 0 and len(idx) > 1 else 0)
        held.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    held_idx = torch.cat(held).sort().values if held else torch.zeros(0, dtype=torch.long)
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[held_idx] = False
    return mask.nonzero().flatten(), held_idx


@dataclass(frozen=True)
class Decoding:
    """How the files of a class-folder tree decode into examples (images here, clips in
    data/audio.py): one decode per file in a process pool, stacked per split into the cache."""

    kind: str  #: what the files are, in messages: "images"
    folder: str  #: the cache's sub-folder: "folders"
    decode: Callable[[str], "np.ndarray | str"]  #: path -> one example, or why it was skipped (picklable)
    params: dict  #: what the decoded arrays depend on besides the files (part of the cache key)
    shape: tuple[int, ...]  #: one example's shape
    dtype: type = np.uint8
    #: whether class folders may sit right under the root (all train; val and test carved)
    flat: bool = False


def image_decoding(image_size: int, channels: int) -> Decoding:
    return Decoding("images", "folders", functools.partial(_decode, size=image_size, channels=channels),
                    {"image_size": image_size, "channels": channels}, (channels, image_size, image_size))


def _decode(path: str, size: int, channels: int) -> np.ndarray | str:
    """One file -> uint8 (C, S, S), or the reason it was skipped (a worker process)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im = im.convert("RGBA" if im.mode in ("P", "PA", "LA") else im.mode).convert("L" if channels == 1 else "RGB")
            w, h = im.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            im = im.resize((nw, nh), Image.BILINEAR, reducing_gap=None)
            left, top = (nw - size) // 2, (nh - size) // 2
            im = im.crop((left, top, left + size, top + size))
            a = np.asarray(im, dtype=np.uint8)
    except Exception as e:  # PIL raises many types for truncated or foreign files
        return f"{type(e).__name__}: {e}"
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1).copy()


def _listing(root: Path, kind: str = "images", flat: bool = False) -> dict[str, list[tuple[str, int]]]:
    """split -> [(relative file, class index)], classes from train's sub-folders; val/test must match.
    `flat`: without train/, the root's own sub-folders are the classes (all train)."""
    train = root / "train"
    if not root.exists():
        raise ConfigError(f"`dataset.root` {missing(str(root), f'a folder with train/<class>/<{kind}>')}")
    if flat and not train.is_dir() and root.is_dir():
        train = root
    if not train.is_dir():
        raise ConfigError(f"`dataset.root` must hold train/<class>/<{kind}> (torchvision's ImageFolder layout), but {train} is missing")
    classes = sorted(d.name for d in train.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise ConfigError(f"`dataset.root` {train} has {len(classes)} class sub-folder{'' if len(classes) == 1 else 's'} {classes}: "
                          f"classification needs at least two classes, one folder each under {'' if train == root else 'train/'}<class>/")
    out = {}
    for split in SPLITS:
        if split != "train" and train == root:
            continue  # a flat tree: val and test are carved
        d = train if split == "train" else root / split
        if not d.is_dir():
            continue
        have = sorted(c.name for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))
        lacking, extra = sorted(set(classes) - set(have)), sorted(set(have) - set(classes))
        if lacking or extra:
            what = f"lacks class {lacking[0]!r}" if lacking else f"has class {extra[0]!r} that train/ lacks"
            raise ConfigError(f"`dataset.root` {split}/ {what}: val/ and test/ must have exactly train/'s classes")
        out[split] = [(str(f.relative_to(root)), i) for i, c in enumerate(classes)
                      for f in sorted((d / c).rglob("*")) if f.is_file() and not f.name.startswith(".")]
        empty = sorted(set(classes) - {classes[i] for _, i in out[split]})
        if empty:
            where = f"{d.relative_to(root)}/{empty[0]}" if d != root else empty[0]
            raise ConfigError(f"`dataset.root` class folder {where}/ holds no files: add its {kind} or remove the folder")
    out["classes"] = classes  # type: ignore[assignment]
    return out


def _key(root: Path, listing: dict, params: dict, carve: dict) -> str:
    h = hashlib.sha256(json.dumps({"format": FORMAT, **params, "carve": carve}, sort_keys=True).encode())
    for split in SPLITS:
        for rel, label in listing.get(split, []):
            st = os.stat(root / rel)
            h.update(f"{split}\0{rel}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def decode_folder(root: str | Path, cache: str | Path, image_size: int, channels: int = 3, workers: int | None = None,
                  val_fraction: float = 0.1, test_fraction: float = 0.1, split_seed: int = 0) -> RawData:
    """An image folder's splits as uint8 tensors (decode_tree)."""
    return decode_tree(root, cache, image_decoding(image_size, channels), workers, val_fraction, test_fraction, split_seed)


def decode_tree(root: str | Path, cache: str | Path, how: Decoding, workers: int | None = None,
                val_fraction: float = 0.1, test_fraction: float = 0.1, split_seed: int = 0) -> RawData:
    """The folder's splits as tensors, decoded at most once per (files, preprocessing, carve).
    Absent val/test splits are carved here from the decoded train examples (seeded, stratified: test
    with split_seed, then val with split_seed + 1, as trainables.data.load_dataset carves arrays) and
    stored as their own arrays, so every split is memory-mapped and no process copies one."""
    import time

    root = Path(root)
    listing = _listing(root, how.kind, how.flat)
    classes = tuple(listing.pop("classes"))
    carve = {"val_fraction": val_fraction if "val" not in listing else None,
             "test_fraction": test_fraction if "test" not in listing else None, "split_seed": split_seed}
    key = _key(root, listing, how.params, carve)
    out_dir = Path(cache) / how.folder / f"{root.name}-{key}"
    t0 = time.perf_counter()
    if not (out_dir / "meta.json").exists():
        files = [(split, rel, label) for split in listing for rel, label in listing[split]]
        jobs = [str(root / rel) for _, rel, _ in files]
        workers = workers or min(8, os.cpu_count() or 1)
        with ProcessPoolExecutor(workers) as pool:
            decoded = list(pool.map(how.decode, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
        skipped = [f"{rel} ({r})" for (_, rel, _), r in zip(files, decoded) if isinstance(r, str)]
        splits = {split: [(r, label) for (s, _, label), r in zip(files, decoded) if s == split and not isinstance(r, str)]
                  for split in listing}
        lost = sorted(set(range(len(classes))) - {label for _, label in splits["train"]})
        if lost and len(lost) < len(classes):  # (none decodable at all: said below, after the warning)
            bad = [f"{rel} ({r})" for (split, rel, label), r in zip(files, decoded) if split == "train" and label == lost[0] and isinstance(r, str)]
            raise ConfigError(f"`dataset.root` class {classes[lost[0]]!r} has no decodable {how.kind} in train ({len(bad)} skipped, e.g. "
                              f"{bad[0] if bad else '-'}): replace its files or remove the folder")
        out_dir.mkdir(parents=True, exist_ok=True)
        for split, fraction, seed in (("test", carve["test_fraction"], split_seed), ("val", carve["val_fraction"], split_seed + 1)):
            if fraction is not None:
                kept, held = stratified_split(torch.tensor([label for _, label in splits["train"]], dtype=torch.long), fraction, seed)
                splits[split] = [splits["train"][i] for i in held.tolist()]
                splits["train"] = [splits["train"][i] for i in kept.tolist()]
        for split, keep in splits.items():
            x = np.stack([r for r, _ in keep]) if keep else np.zeros((0, *how.shape), how.dtype)
            for name, arr in (("x", x), ("y", np.array([label for _, label in keep], dtype=np.int64))):
                with atomic_path(out_dir / f"{split}_{name}.npy") as tmp:
                    with open(tmp, "wb") as f:
                        np.save(f, arr)
        with atomic_path(out_dir / "meta.json") as tmp:  # written last: its presence means complete
            tmp.write_text(json.dumps({"classes": classes, "skipped": skipped, "splits": list(splits), "root": str(root), "carve": carve},
                                      indent=2))
        decode_s = time.perf_counter() - t0
        log.info("decoded %s: %d %s in %.1f s -> %s", root, len(files) - len(skipped), how.kind, decode_s, out_dir)
    else:
        decode_s = 0.0
    meta = json.loads((out_dir / "meta.json").read_text())
    if meta["skipped"] and str(out_dir) not in _warned:
        _warned.add(str(out_dir))
        shown = ", ".join(meta["skipped"][:SHOW]) + (f", ... ({len(meta['skipped'])} in all)" if len(meta["skipped"]) > SHOW else "")
        log.warning("dataset.root %s: skipped %d file(s) that are not decodable %s: %s", root, len(meta["skipped"]), how.kind, shown)

    def load(split: str) -> tuple[Tensor | None, Tensor | None]:
        if split not in meta["splits"]:
            return None, None
        x = np.load(out_dir / f"{split}_x.npy", mmap_mode="c")  # pages shared by every process that reads it (copy-on-write)
        if x.size == 0:
            x = np.array(x)
        return torch.from_numpy(x), torch.from_numpy(np.load(out_dir / f"{split}_y.npy"))

    (train_x, train_y), (val_x, val_y), (test_x, test_y) = (load(s) for s in SPLITS)
    if len(train_y) == 0:
        raise ConfigError(f"`dataset.root` {root}{'' if how.flat and not (root / 'train').is_dir() else '/train'} has no decodable "
                          f"{how.kind}: see the warning above")
    return RawData(train_x, train_y, test_x, test_y, val_x, val_y, classes, meta["skipped"], decode_s)


def decode_unlabeled(root: str | Path, cache: str | Path, how: Decoding, workers: int | None = None) -> tuple[Tensor, list[str]]:
    """`dataset.unlabeled.root`: every file under a folder with no class sub-folders, decoded once
    by `how` (as decode_tree decodes a labelled tree; keyed by files, sizes, mtimes and `how`'s
    params) to the train split's example shape. Returns the examples and the files skipped as
    undecodable (named in one warning)."""
    root = Path(root).expanduser()
    field, kind = "dataset.unlabeled.root", how.kind
    if not root.exists():
        raise ConfigError(f"`{field}` {missing(str(root), f'a folder of {kind}')}")
    if not root.is_dir():
        raise ConfigError(f"`{field}` must be a folder of {kind}, but got the file {str(root)!r}")
    files = sorted(f for f in root.rglob("*") if f.is_file() and not any(p.startswith(".") for p in f.relative_to(root).parts))
    classes = sorted({f.relative_to(root).parts[0] for f in files if len(f.relative_to(root).parts) > 1})
    if len(classes) > 1:
        raise ConfigError(f"`{field}` has sub-folders {classes[:3]}{' ...' if len(classes) > 3 else ''}, as a labelled class tree has: "
                          f"unlabelled data are one folder of {kind} without class sub-folders (move them up, or use labels_kept)")
    if not files:
        raise ConfigError(f"`{field}` {root} holds no files: point it at a folder of {kind}")
    h = hashlib.sha256(json.dumps({"format": FORMAT, **how.params}, sort_keys=True).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    out = Path(cache) / how.folder / f"{root.name}-unlabeled-{h.hexdigest()[:20]}.npy"
    skipped_file = out.with_suffix(".skipped.json")
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        workers = workers or min(8, os.cpu_count() or 1)
        with ProcessPoolExecutor(workers) as pool:
            decoded = list(pool.map(how.decode, [str(f) for f in files], chunksize=max(1, len(files) // (4 * workers))))
        examples = [r for r in decoded if not isinstance(r, str)]
        skipped = [f"{f.relative_to(root)} ({r})" for f, r in zip(files, decoded) if isinstance(r, str)]
        if not examples:
            raise ConfigError(f"`{field}` {root} has no decodable {kind} ({len(files)} files, none decodable): point it at a folder of {kind}")
        with atomic_path(skipped_file) as tmp:
            tmp.write_text(json.dumps(skipped))
        with atomic_path(out) as tmp:  # written last: its presence means complete
            with open(tmp, "wb") as f:
                np.save(f, np.stack(examples).astype(how.dtype, copy=False))
        log.info("decoded %s: %d unlabelled %s -> %s", root, len(examples), kind, out)
    skipped = json.loads(skipped_file.read_text())
    if skipped and str(out) not in _warned:
        _warned.add(str(out))
        log.warning("%s %s: skipped %d file(s) that are not decodable %s: %s", field, root, len(skipped), kind, ", ".join(skipped[:SHOW]))
    return torch.from_numpy(np.load(out, mmap_mode="c")), skipped


def _images(split: str, x) -> Tensor:
    """An arrays file's images as uint8 NCHW, or a one-line error."""
    if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
        got = f"{x.dtype}, {x.dim()}-D" if isinstance(x, Tensor) else type(x).__name__
        raise ConfigError(f"`dataset.root` {split}_x must be uint8 images (N, C, H, W) or (N, H, W, C), but got {got}")
    if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] not in (1, 3):
        raise ConfigError(f"`dataset.root` {split}_x must have 1 or 3 channels, but got shape {tuple(x.shape)}")
    return x


def read_arrays(path: str | Path, examples: Callable[[str, object], Tensor] = _images, kind: str = "images") -> RawData:
    """A .npz, .pt (weights_only) or .safetensors file: `train_x` (uint8, NCHW or NHWC; or what
    `examples` takes and returns), `train_y` (integer labels), optional `val_x`/`val_y` and
    `test_x`/`test_y`; checked with one-line errors."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"`dataset.root` {missing(str(path), 'an arrays file (.npz, .pt, .safetensors)')}")
    if not p.is_file():
        raise ConfigError(f"`dataset.root` must be an arrays file (.npz, .pt, .safetensors), but got the folder {str(path)!r}")
    if p.suffix not in (".npz", ".safetensors", ".pt", ".pth"):
        raise ConfigError(f"`dataset.root` must end in .npz, .pt or .safetensors, but got {p.name!r}")
    try:
        data = load_tensor_file(p)
    except Exception as e:
        raise ConfigError(f"`dataset.root` {str(path)!r} cannot be read as arrays ({type(e).__name__}): save train_x/train_y with "
                          "numpy.savez, torch.save or safetensors") from None
    if not isinstance(data, dict) or "train_x" not in data or "train_y" not in data:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ConfigError(f"`dataset.root` arrays file needs train_x and train_y, but holds {keys}")
    out = {}
    for split in SPLITS:
        x, y = data.get(f"{split}_x"), data.get(f"{split}_y")
        if (x is None) != (y is None):
            raise ConfigError(f"`dataset.root` arrays file has {split}_{'x' if y is None else 'y'} without {split}_{'y' if y is None else 'x'}")
        if x is None:
            continue
        x = examples(split, x)
        if not isinstance(y, Tensor) or y.dtype.is_floating_point or y.dim() != 1 or len(y) != len(x):
            got = f"{y.dtype}, shape {tuple(y.shape)}" if isinstance(y, Tensor) else type(y).__name__
            raise ConfigError(f"`dataset.root` {split}_y must be {len(x)} integer labels, one per {kind.removesuffix('s')}, but got {got}")
        if len(y) and y.min() < 0:
            raise ConfigError(f"`dataset.root` {split}_y has negative labels: labels are class indices 0..K-1")
        out[split] = (x.contiguous(), y.long())
    shapes = {tuple(x.shape[1:]) for x, _ in out.values()}
    if len(shapes) > 1:
        raise ConfigError(f"`dataset.root` splits have different {kind} shapes {sorted(shapes)}: make them equal")
    (tx, ty) = out["train"]
    vx, vy = out.get("val", (None, None))
    sx, sy = out.get("test", (None, None))
    k = int(max(int(y.max()) for _, y in out.values() if len(y))) + 1
    return RawData(tx, ty, sx, sy, vx, vy, tuple(str(i) for i in range(k)))
