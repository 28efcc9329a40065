"""Teacher soft targets computed once per view and shared by every trial of a sweep.

Each example's view is a pure function of (seed, epoch, example) (data.epoch_views), whatever the
batch size or the worker, so targets are stored per example: `static.pt` when views never change,
else one `epoch_<e>.pt` per epoch, plus `val.pt` (the val split's logits, for the agreement metrics).
The sweep builds val (and static) before the trials; each augmented epoch is built by the first
trial that needs it (one builder at a time, under a file lock: the others wait, then read it), so
trials start at once, teacher forwards stay one per view whatever the trial count, and epochs that
ASHA stops every trial before are never computed. Files are written atomically: a killed builder
leaves no half-written epoch, and the next trial to need it builds it. A builder that stops making
progress (no chunk of teacher forwards done for STALE_S) is taken as hung: a waiting trial says so
in its log and builds the epoch itself, beating as a builder does (the other waiters wait for it).

Targets are fp16 logits (what the bf16/fp32 loss would see, to within fp16 rounding), or with
`train.teacher_topk: k` only each target's k largest logits, their class indices and one fill
logit for the other classes, chosen so they share the remaining probability mass (at T=1) evenly,
as FKD's marginal smoothing does (Shen & Xing, ECCV 2022): k x 4 + 2 bytes a view instead of
2 x classes. With k = classes it is the dense target exactly.

The cache is keyed by the teacher's weights hash and input statistics, the dataset and split, the
augmentation, top-k, and the seed when views are random; a trial whose key differs (a confirmation
seed with random views) runs the teacher online.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from trainables.atomic import atomic_path
from trainables.card import TeacherCard
from trainables.config import TrialConfig
from trainables.data import DataSplits, augment, epoch_views, load_splits, place, resolved_augment
from trainables.data.normalize import normalizer
from trainables.models.ensemble import members_of, target_model

log = logging.getLogger(__name__)

META = "meta.json"
FORMAT = 2  # 2: targets per example (views independent of the batch size), lazy epochs, top-k
CHUNK = 2048  # images per teacher forward
STALE_S = 900.0  # an epoch's builder with no chunk done for this long is taken as hung (a GPU chunk takes seconds)


def cache_key(cfg: TrialConfig, card: TeacherCard) -> dict:
    """What the cached targets depend on; `card` is the teacher's (weights hash, input statistics)."""
    aug = resolved_augment(cfg)
    key = {"teacher_sha256": card.sha256, "teacher_norm": [card.mean, card.std], "augment": aug.model_dump(), "format": FORMAT,
           "dataset": cfg.dataset.model_dump(exclude={"download": True, "placement": True, "device_share": True, "unlabeled": {"ratio"}}),
           "topk": cfg.train.teacher_topk}  # not the unlabelled ratio: targets are per example, whatever the mix
    if not aug.static:  # the views, and so the targets, depend on the seed too
        key.update(seed=cfg.seed)
    return key


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def sparse(logits: Tensor, k: int | None) -> Tensor | dict[str, Tensor]:
    """Targets as stored: fp16 logits, or their top-k (values, indices) and the fill logit of the
    other classes, log(sum of their exp) - log(their count): they keep their mass at T=1, spread evenly."""
    if k is None:
        return logits.half()
    z = logits.float()
    values, indices = z.topk(k, dim=-1)
    rest = z.scatter(-1, indices, float("-inf")).logsumexp(-1, keepdim=True) - math.log(max(1, z.shape[-1] - k))
    return {"values": values.half(), "indices": indices.to(torch.int16 if z.shape[-1] <= 32767 else torch.int32),
            "fill": rest.clamp_min(-6e4).half()}  # fp16's range: a fill below it spreads no mass anyway


def dense(stored: Tensor | dict[str, Tensor], num_classes: int) -> Tensor:
    """Stored targets (rows of `sparse`) as float logits."""
    if not isinstance(stored, dict):
        return stored.float()
    values = stored["values"].float()
    out = stored["fill"].float().expand(*values.shape[:-1], num_classes).clone()
    return out.scatter_(-1, stored["indices"].long(), values)


def _rows(stored: Tensor | dict[str, Tensor], idx: Tensor) -> Tensor | dict[str, Tensor]:
    return {k: v[idx] for k, v in stored.items()} if isinstance(stored, dict) else stored[idx]


def _cat(parts: list) -> Tensor | dict[str, Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if isinstance(parts[0], dict) else torch.cat(parts)


def _save(stored, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save({k: v.contiguous().cpu() for k, v in stored.items()} if isinstance(stored, dict) else stored.contiguous().cpu(), tmp)


class Builder:
    """Computes cache files with a loaded teacher: the sweep's task (val, static) and any trial
    that first needs an epoch (trainables.targets)."""

    def __init__(self, cfg: TrialConfig, teacher: torch.nn.Module, card: TeacherCard, splits: DataSplits, on_device: bool,
                 device: torch.device | str) -> None:
        self.cfg, self.splits, self.on_device, self.device = cfg, splits, on_device, torch.device(device)
        self.norm = normalizer(*card.stats, device)
        self.cuda = self.device.type == "cuda"
        self.teacher = teacher.eval()
        self.train_model, self.members = target_model(teacher), members_of(teacher)
        self.ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if self.cuda else contextlib.nullcontext
        self.forwards = 0  # teacher image forwards (an ensemble's: one per member and image)

    @torch.no_grad()
    def _forward(self, model: torch.nn.Module, x: Tensor) -> Tensor:
        x = self.norm(x.to(self.device, non_blocking=True))
        self.forwards += len(x) * self.members
        with self.ctx():
            return model(x.contiguous(memory_format=torch.channels_last) if self.cuda and x.dim() == 4 else x).float()

    def val(self) -> Tensor:
        x = self.splits.val_x
        return torch.cat([self._forward(self.teacher, x[i : i + CHUNK]) for i in range(0, len(x), CHUNK)]).half()

    def train(self, epoch: int | None, beat: Callable[[], None] | None = None) -> Tensor | dict[str, Tensor]:
        """Every train example's target for `epoch`'s views (None: the fixed views); `beat()` after
        each chunk tells the trials waiting for this epoch that its builder is alive."""
        x_all, aug, parts = self.splits.train_x, resolved_augment(self.cfg), []
        views = None if epoch is None else epoch_views(len(x_all), self.cfg.seed, epoch, aug, self.splits.input_shape[1:])
        for i in range(0, len(x_all), CHUNK):
            x = x_all[i : i + CHUNK].to(self.device, non_blocking=True)
            if views is not None:
                x = augment(x, views[i : i + CHUNK], aug)
            parts.append(sparse(self._forward(self.train_model, x), self.cfg.train.teacher_topk))
            if beat is not None:
                beat()
        return _cat(parts)


def build_teacher_cache(cfg: TrialConfig, teacher: torch.nn.Module, card: TeacherCard, root: str | Path,
                        device: torch.device | str = "cpu") -> tuple[Path, int]:
    """Create (or find) the cache for `cfg`'s views, with what every trial needs first: val, and the
    static targets when views never change (augmented epochs: built by the trials, lazily).
    Returns its folder and the teacher image forwards this call ran (0 when it existed)."""
    key = cache_key(cfg, card)
    out = Path(root) / key_digest(key)
    if (out / META).exists():
        return out, 0
    out.mkdir(parents=True, exist_ok=True)
    s, on_device = place(load_splits(cfg.dataset), cfg.dataset, device)
    build = Builder(cfg, teacher.to(device, memory_format=torch.channels_last if torch.device(device).type == "cuda" else torch.contiguous_format),
                    card, s, on_device, device)
    val = build.val()
    _save(val, out / "val.pt")
    if resolved_augment(cfg).static:
        _save(build.train(None), out / "static.pt")
    meta = {"key": key, "forward_images": build.forwards, "num_classes": s.num_classes}
    if cfg.train.teacher_topk:
        meta["topk_mass"] = topk_mass(val, cfg.train.teacher_topk)
    with atomic_path(out / META) as tmp:  # last: its presence means val (and static) are there
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out, build.forwards


MASS_TEMPERATURES = (1.0, 2.0, 4.0, 8.0)


def topk_mass(logits: Tensor, k: int) -> dict[str, float]:
    """The mean share of an example's softened teacher probabilities in its k largest classes, at
    each of MASS_TEMPERATURES: what top-k targets keep as the teacher gave it (the rest of the mass
    is spread evenly over the other classes, their structure lost)."""
    z = logits.float()
    return {f"{t:g}": float(torch.softmax(z / t, -1).topk(k, -1).values.sum(-1).mean()) for t in MASS_TEMPERATURES}


def bytes_per_view(num_classes: int, topk: int | None, members: int = 1) -> int:
    """What one view's target takes in the cache (the plan prints it)."""
    index = 2 if num_classes <= 32767 else 4
    return members * (2 * num_classes if topk is None else topk * (2 + index) + 2)


class TeacherCache:
    """Read side: one epoch's targets on the training device, rows by example. A missing augmented
    epoch is built here by `build(epoch, beat)` (the trial's teacher), one builder at a time."""

    def __init__(self, path: Path, static: bool, num_classes: int) -> None:
        self.path, self.static, self.num_classes = path, static, num_classes
        self._epoch, self._stored = None, None
        self.build: Callable[[int, Callable[[], None]], Tensor | dict[str, Tensor]] | None = None  # (epoch, beat)

    @classmethod
    def open(cls, path: str | Path | None, cfg: TrialConfig, card: TeacherCard) -> "TeacherCache | None":
        """The cache at `path` if it holds exactly this trial's views, else None (go online)."""
        if not path or not (Path(path) / META).exists():
            return None
        meta = json.loads((Path(path) / META).read_text())
        if meta["key"] != cache_key(cfg, card):
            return None
        return cls(Path(path), resolved_augment(cfg).static, meta["num_classes"])

    def val(self, device) -> Tensor:
        return torch.load(self.path / "val.pt", map_location=device, weights_only=True).float()

    def _epoch_file(self, epoch: int) -> Path:
        """epoch_<e>.pt, built under the epoch's lock when missing: the first trial to get the lock
        builds it, touching the lock file after each chunk; the others wait for the lock and then
        find the file, unless the lock file goes STALE_S without a touch (a hung builder: a killed
        one frees the lock), when they build it themselves (writes are atomic: two builders of the
        same views write the same file)."""
        path = self.path / f"epoch_{epoch}.pt"
        if path.exists() or self.build is None:
            return path
        lock_path = self.path / f"epoch_{epoch}.lock"

        def beat() -> None:
            with contextlib.suppress(OSError):
                os.utime(lock_path)

        with open(lock_path, "a") as lock:
            since, waiting = time.monotonic(), time.time()
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if path.exists():
                        return path
                    quiet = time.time() - max(lock_path.stat().st_mtime, waiting)  # a touch from before this wait says nothing
                    if quiet > STALE_S:
                        log.warning("teacher cache: epoch %d's builder has done no teacher forward for %.0f s (hung?): building it here",
                                    epoch, quiet)
                        beat()  # the other waiters now see this build's progress, and wait for it
                        _save(self.build(epoch, beat), path)
                        return path
                    if time.monotonic() - since > 60:
                        log.info("teacher cache: waiting for another trial to build epoch %d's targets", epoch)
                        since = time.monotonic()
                    time.sleep(0.2)
            if not path.exists():
                beat()
                _save(self.build(epoch, beat), path)
        return path

    def for_epoch(self, epoch: int, device):
        key = None if self.static else epoch
        if self._stored is None or self._epoch != key:
            self._stored = None  # free the last epoch's before loading the next
            path = self.path / "static.pt" if self.static else self._epoch_file(epoch)
            self._stored = torch.load(path, map_location=device, weights_only=True)
            self._epoch = key
        return self._stored

    def batch(self, epoch: int, idx: Tensor, device) -> Tensor:
        """The targets of examples `idx` in `epoch`'s views, as float logits (idx on `device`)."""
        return dense(_rows(self.for_epoch(epoch, device), idx), self.num_classes)


def cache_task(cfg: TrialConfig, root: str) -> tuple[str, int, dict[str, float] | None]:
    """Ray task body (orchestrator.sweep.ensure_cache): create the sweep's cache, on a GPU if given
    one. Returns its folder, the teacher forwards run now and, with top-k, topk_mass on val."""
    from trainables.models.teacher import load_teacher
    from trainables.plugins import load_plugins

    load_plugins(cfg.plugins)
    teacher, card = load_teacher(cfg.teacher_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path, forwards = build_teacher_cache(cfg, teacher, card, root, device)
    return str(path), forwards, json.loads((path / META).read_text()).get("topk_mass")
