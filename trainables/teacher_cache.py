"""Teacher soft targets computed once per view and shared by every trial of a sweep.

Augmentation is a pure function of (seed, epoch, batch index), so the teacher's logits for every
view a trial will see can be computed before the trials start: once per sweep, however many
trials read them. Logits are stored as fp16 (what the bf16/fp32 loss would see, to within fp16
rounding), one file per epoch (or one for all epochs when views never change), plus the val split's
logits for the agreement metrics. The cache is keyed by the teacher's weights hash and input
statistics, the dataset and split, the augmentation, the seed and the batch size; a trial whose key differs (e.g. a searched
batch size) falls back to running the teacher online.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor

from trainables.atomic import atomic_path
from trainables.card import TeacherCard
from trainables.config import TrialConfig
from trainables.data import augment, device_batches, load_splits, place, resolved_augment, train_batches
from trainables.data.normalize import normalizer
from trainables.models.ensemble import members_of, target_model

META = "meta.json"


def cache_key(cfg: TrialConfig, card: TeacherCard) -> dict:
    """What the cached logits depend on; `card` is the teacher's (weights hash, input statistics)."""
    aug = resolved_augment(cfg)
    key = {"teacher_sha256": card.sha256, "teacher_norm": [card.mean, card.std], "dataset": cfg.dataset.model_dump(exclude={"download", "placement", "device_share"}), "augment": aug.model_dump(), "format": 1}
    if not aug.static:  # the views, and so the targets, depend on these too
        key.update(seed=cfg.seed, batch_size=cfg.train.batch_size)
    return key


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _save(t: Tensor, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(t.contiguous().cpu(), tmp)


@torch.no_grad()
def build_teacher_cache(cfg: TrialConfig, teacher: torch.nn.Module, card: TeacherCard, root: str | Path,
                        epochs: int, device: torch.device | str = "cpu") -> tuple[Path, int]:
    """Compute (or find) the cache for `cfg`'s views; returns its folder and the teacher image
    forwards this call ran (an ensemble's: one per member and image; 0 when the cache was already complete)."""
    key = cache_key(cfg, card)
    out = Path(root) / key_digest(key)
    if (out / META).exists():
        return out, 0
    out.mkdir(parents=True, exist_ok=True)
    s, on_device = place(load_splits(cfg.dataset), cfg.dataset, device)
    norm = normalizer(*card.stats, device)
    cuda = torch.device(device).type == "cuda"
    teacher = teacher.to(device, memory_format=torch.channels_last if cuda else torch.contiguous_format).eval()
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    batch = 2048  # images per teacher forward: training batches' views are gathered up to this

    train_model, members = target_model(teacher), members_of(teacher)

    def logits(x_u8_or_float: Tensor, model: torch.nn.Module = train_model) -> Tensor:
        """A training view's target (an ensemble's: every member's logits, or their mean), or with
        `model=teacher` the teacher's own logits (val)."""
        x = norm(x_u8_or_float.to(device, non_blocking=True))
        with ctx():
            return model(x.contiguous(memory_format=torch.channels_last) if cuda else x).half()

    def chunked(views) -> Tensor:
        """Logits of a stream of training batches' views, forwarded `batch` images at a time."""
        parts, pending, n = [], [], 0
        for v in views:
            pending.append(v)
            n += len(v)
            if n >= batch:
                parts.append(logits(torch.cat(pending)))
                pending, n = [], 0
        if pending:
            parts.append(logits(torch.cat(pending)))
        return torch.cat(parts)

    forwards = 0
    _save(torch.cat([logits(s.val_x[i : i + batch], teacher) for i in range(0, len(s.val_y), batch)]), out / "val.pt")
    forwards += len(s.val_y) * members
    aug = resolved_augment(cfg)
    if aug.static:
        _save(torch.cat([logits(s.train_x[i : i + batch]) for i in range(0, len(s.train_y), batch)]), out / "static.pt")
        forwards += len(s.train_y) * members
    else:
        for epoch in range(epochs):
            batches = train_batches(s, cfg, epoch, device if on_device else "cpu")
            views = chunked(augment(x, view, aug) for _, _, x, _, view in device_batches(s.train_x, s.train_y, batches, device, on_device))
            _save(views, out / f"epoch_{epoch}.pt")
            forwards += len(views) * members
    (out / META).write_text(json.dumps({"key": key, "epochs": epochs, "forward_images": forwards}, indent=2, sort_keys=True))
    return out, forwards


class TeacherCache:
    """Read side: the logits for one epoch's batches, on the training device."""

    def __init__(self, path: Path, static: bool, batch_size: int) -> None:
        self.path, self.static, self.batch_size = path, static, batch_size
        self._epoch, self._logits = None, None

    @classmethod
    def open(cls, path: str | Path | None, cfg: TrialConfig, card: TeacherCard) -> "TeacherCache | None":
        """The cache at `path` if it holds exactly this trial's views, else None (go online)."""
        if not path or not (Path(path) / META).exists():
            return None
        meta = json.loads((Path(path) / META).read_text())
        if meta["key"] != cache_key(cfg, card) or (not resolved_augment(cfg).static and meta["epochs"] < cfg.train.epochs):
            return None
        return cls(Path(path), resolved_augment(cfg).static, cfg.train.batch_size)

    def val(self, device) -> Tensor:
        return torch.load(self.path / "val.pt", map_location=device, weights_only=True).float()

    def for_epoch(self, epoch: int, device) -> Tensor:
        if self._epoch != (None if self.static else epoch) or self._logits is None:
            name = "static.pt" if self.static else f"epoch_{epoch}.pt"
            self._logits = torch.load(self.path / name, map_location=device, weights_only=True)
            self._epoch = None if self.static else epoch
        return self._logits

    def batch(self, epoch: int, b: int, idx: Tensor, rows: slice | Tensor, device) -> Tensor:
        """Static views are indexed by sample; augmented views by position in the epoch's batches
        (`rows`: this rank's positions in global batch `b`, data.BatchLayout.rows, on the device)."""
        logits = self.for_epoch(epoch, device)
        if self.static:
            return logits[idx].float()
        start = b * self.batch_size
        if isinstance(rows, slice):
            return logits[start + rows.start : start + rows.stop].float()
        return logits[start + rows].float()


def cache_task(cfg: TrialConfig, root: str, epochs: int) -> tuple[str, int]:
    """Ray task body (orchestrator.sweep.ensure_cache): build the sweep's cache, on a GPU if given one."""
    from trainables.models.teacher import load_teacher
    from trainables.plugins import load_plugins

    load_plugins(cfg.plugins)
    teacher, card = load_teacher(cfg.teacher_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path, forwards = build_teacher_cache(cfg, teacher, card, root, epochs, device)
    return str(path), forwards
