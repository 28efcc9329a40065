"""Teacher soft targets computed once per view and shared by every trial of a sweep.

Each example's view is a pure function of (seed, epoch, example) (data.epoch_views), whatever the
batch size or the worker, so targets are stored per example: `static.pt` when views never change,
else one `epoch_<e>.pt` per epoch, plus `val.pt` (the val split's logits, for the agreement metrics).
The sweep's driver only writes the cache's key (meta.json); every file is built by the first trial
that needs it (one builder at a time, under a file lock: the others wait, then read it), so trials
start at once, teacher forwards stay one per view whatever the trial count, and epochs that ASHA
stops every trial before are never computed. Files are written atomically: a killed builder leaves
no half-written file, and the next trial to need it builds it. A builder that stops making progress
(no chunk of teacher forwards done for STALE_S) is taken as hung: a waiting trial says so in its log
and builds the file itself, beating as a builder does (the other waiters wait for it).

Targets are stored per example as the teacher gives them, over its last axis: a classifier's
(classes,), a causal language model's (length, vocabulary), one next-token distribution per
position (its val split is not cached: the task scores val against the teacher model each epoch).
They are fp16 logits (what the bf16/fp32 loss would see, to within fp16 rounding), or with
`train.teacher_topk: k` only each target's k largest logits, their class indices and the fill logit
of the other classes, which gives them the remaining probability mass. FKD (Shen & Xing, ECCV 2022)
keeps that mass at T=1 only; softened at T=4 a T=1 fill gives the other classes far too much of it
(100 classes, top-10: half the mass left on the top 10 instead of two thirds), so the fill is
stored at FILL_TEMPERATURES and read at the loss's temperature (linear in 1/T between them): the
top k and the rest keep their true shares at any T. The rest's shape is not stored: `spread` spreads
its mass evenly (FKD's marginal smoothing, the same at T=1), `bucket` (the default) as the student
spreads its own, so the KL is the one over the top k and the rest as one class and the student's
tail is left free (docs/benchmarks.md: 2.8 val points lost to the even spread on 100 classes, none
to the bucket). k x 4 + 12 bytes a view instead of 2 x classes; with k = classes it is the dense
target exactly.

The cache is keyed by the teacher's weights hash and input statistics, the dataset and split, the
augmentation, top-k (not how its rest is read), and the seed when views are random; a trial whose
key differs (a confirmation seed with random views) runs the teacher online.
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
from trainables.data import DataSplits
from trainables.data.batches import augment, epoch_views
from trainables.data.placement import place
from trainables.data.normalize import normalizer
from trainables.models.ensemble import members_of, target_model
from trainables.tasks import task_for

log = logging.getLogger(__name__)

META = "meta.json"
FORMAT = 3  # 2: targets per example (views independent of the batch size), lazy epochs, top-k; 3: the fill per temperature
CHUNK = 2048  # examples per teacher forward, at most
CHUNK_LOGITS = 2**25  # logits per teacher forward, at most (a language model's (L, V) per example: 128 MiB of float32)
STALE_S = 900.0  # an epoch's builder with no chunk done for this long is taken as hung (a GPU chunk takes seconds)


def cache_key(cfg: TrialConfig, card: TeacherCard) -> dict:
    """What the cached targets depend on; `card` is the teacher's (weights hash, input statistics)."""
    aug = cfg.dataset.augment_or_default()
    # mode="json": as meta.json holds it (a resized crop's scale is a tuple here, a list read back)
    key = {"teacher_sha256": card.sha256, "teacher_norm": [list(card.mean), list(card.std)], "augment": aug.model_dump(mode="json"),
           "format": FORMAT, "topk": cfg.train.teacher_topk,  # not the unlabelled ratio: targets are per example, whatever the mix
           "dataset": cfg.dataset.model_dump(mode="json", exclude={"download": True, "placement": True, "device_share": True, "unlabeled": {"ratio"}})}
    if not aug.static:  # the views, and so the targets, depend on the seed too
        key.update(seed=cfg.seed)
    return key


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


FILL_TEMPERATURES = (0.5, 1.0, 2.0, 4.0, 8.0, math.inf)  # inf: the rest's mean logit, the limit as T grows
_FILL_U = tuple(1.0 / t for t in FILL_TEMPERATURES)  # 1/T, what fill_at interpolates in


def sparse(logits: Tensor, k: int | None) -> Tensor | dict[str, Tensor]:
    """Targets as stored: fp16 logits, or their top-k (values, indices) and, at each of
    FILL_TEMPERATURES, the fill logit that gives the other classes their true mass spread evenly:
    T * (log(sum of exp(z / T) over them) - log(their count))."""
    if k is None:
        return logits.half()
    z = logits.float()
    values, indices = z.topk(k, dim=-1)
    n = max(1, z.shape[-1] - k)
    rest = z.scatter(-1, indices, float("-inf"))
    fill = [t * ((rest / t).logsumexp(-1) - math.log(n)) for t in FILL_TEMPERATURES[:-1]]
    fill.append((z.sum(-1) - values.sum(-1)) / n if z.shape[-1] > k else fill[-1])  # the mean (k = classes: no rest, -inf)
    return {"values": values.half(), "indices": indices.to(torch.int16 if z.shape[-1] <= 32767 else torch.int32),
            "fill": torch.stack(fill, -1).clamp_min(-6e4).half()}  # fp16's range: a fill below it spreads no mass anyway


def fill_at(fill: Tensor, temperature: float) -> Tensor:
    """The fill logit for softening at `temperature`: linear in 1/T between FILL_TEMPERATURES
    (the lowest one's below it, where the rest holds the least mass)."""
    u, grid = 1.0 / temperature, _FILL_U
    if u >= grid[0]:
        return fill[..., :1]
    a = next(i for i in range(len(grid) - 1) if grid[i + 1] <= u)
    w = (u - grid[a + 1]) / (grid[a] - grid[a + 1])
    return w * fill[..., a : a + 1] + (1 - w) * fill[..., a + 1 : a + 2]


def dense(stored: Tensor | dict[str, Tensor], num_classes: int, temperature: float = 1.0, student: Tensor | None = None) -> Tensor:
    """Stored targets (rows of `sparse`) as float logits, for softening at `temperature`. Top-k
    rows: the other classes hold the teacher's mass for them at `temperature` (FILL_TEMPERATURES),
    spread evenly, or with `student` (the student's logits on the same examples) spread as the
    student spreads its own: the KL over all classes is then the KL over k + 1 (the top k, and the
    rest as one class), and the teacher's targets say nothing of the rest's shape, which they do not know."""
    if not isinstance(stored, dict):
        return stored.float()
    values, indices = stored["values"].float(), stored["indices"].long()
    fill = fill_at(stored["fill"].float(), temperature)
    rest = num_classes - values.shape[-1]
    if student is None or not rest:
        out = fill.expand(*values.shape[:-1], num_classes).clone()
    else:
        s = student.detach().float()
        if values.dim() == s.dim() + 1:  # an ensemble's members (batch, member, class): each member's rest alike
            s = s.unsqueeze(-2).expand(*values.shape[:-1], num_classes)
        others = (s / temperature).scatter(-1, indices, float("-inf")).logsumexp(-1, keepdim=True)
        out = s + fill + temperature * (math.log(rest) - others)
    return out.scatter_(-1, indices, values)


def _rows(stored: Tensor | dict[str, Tensor], idx: Tensor) -> Tensor | dict[str, Tensor]:
    return {k: v[idx] for k, v in stored.items()} if isinstance(stored, dict) else stored[idx]


def _cat(parts: list) -> Tensor | dict[str, Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if isinstance(parts[0], dict) else torch.cat(parts)


def _save(stored, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save({k: v.contiguous().cpu() for k, v in stored.items()} if isinstance(stored, dict) else stored.contiguous().cpu(), tmp)


class Builder:
    """Computes cache files with a loaded teacher: in the trial that first needs one
    (trainables.targets), or up front in build_teacher_cache."""

    def __init__(self, cfg: TrialConfig, teacher: torch.nn.Module, card: TeacherCard, splits: DataSplits, on_device: bool,
                 device: torch.device | str) -> None:
        self.cfg, self.splits, self.on_device, self.device = cfg, splits, on_device, torch.device(device)
        self.norm = normalizer(*card.stats, device)
        self.cuda = self.device.type == "cuda"
        self.teacher = teacher.eval()
        self.train_model, self.members = target_model(teacher), members_of(teacher)
        self.ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if self.cuda else contextlib.nullcontext
        self.forwards = 0  # teacher image forwards (an ensemble's: one per member and image)
        task = task_for(cfg.dataset.name)
        self.chunk = max(1, min(CHUNK, CHUNK_LOGITS // (splits.num_classes * task.per_example(splits.input_shape))))

    @torch.no_grad()
    def _forward(self, model: torch.nn.Module, x: Tensor) -> Tensor:
        x = self.norm(x.to(self.device, non_blocking=True))
        self.forwards += len(x) * self.members
        with self.ctx():
            return model(x.contiguous(memory_format=torch.channels_last) if self.cfg.train.channels_last and x.dim() == 4 else x).float()

    def val(self, beat: Callable[[], None] | None = None) -> Tensor:
        """The val split's logits (an ensemble's combined), fp16."""
        x, parts = self.splits.val_x, []
        for i in range(0, len(x), self.chunk):
            parts.append(self._forward(self.teacher, x[i : i + self.chunk]).half())
            if beat is not None:
                beat()
        return _finite(torch.cat(parts))

    def train(self, epoch: int | None, beat: Callable[[], None] | None = None) -> Tensor | dict[str, Tensor]:
        """Every train example's target for `epoch`'s views (None: the fixed views); `beat()` after
        each chunk tells the trials waiting for this epoch that its builder is alive."""
        x_all, aug, parts = self.splits.train_x, self.cfg.dataset.augment_or_default(), []
        views = None if epoch is None else epoch_views(len(x_all), self.cfg.seed, epoch, aug, self.splits.input_shape[1:])
        for i in range(0, len(x_all), self.chunk):
            x = x_all[i : i + self.chunk].to(self.device, non_blocking=True)
            if views is not None:
                x = augment(x, views[i : i + self.chunk], aug)
            parts.append(sparse(self._forward(self.train_model, x), self.cfg.train.teacher_topk))
            if beat is not None:
                beat()
        out = _cat(parts)
        _finite(out["values"] if isinstance(out, dict) else out)
        return out


def _finite(targets: Tensor) -> Tensor:
    """fp16 targets as stored, or an error: a teacher whose logits pass float16's range (65504) has
    diverged, and its targets would be inf, their softmax NaN (one check per file, not per batch)."""
    if not bool(torch.isfinite(targets).all()):
        raise RuntimeError("the teacher's logits pass float16's range (65504), in which the teacher cache keeps them: the teacher "
                           "has diverged; train it again (e.g. a lower teacher.optimizer.lr), or turn the cache off "
                           "(train.teacher_cache: false)")
    return targets


def create_cache(cfg: TrialConfig, card: TeacherCard, root: str | Path, num_classes: int) -> Path:
    """The sweep's cache folder for `cfg`'s views, keyed (meta.json) but empty: the trials build
    its files. Cheap, on the driver; the folder is found again when it exists."""
    key = cache_key(cfg, card)
    out = Path(root) / key_digest(key)
    if not (out / META).exists():
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / META) as tmp:
            tmp.write_text(json.dumps({"key": key, "num_classes": num_classes}, indent=2, sort_keys=True))
    return out


def build_teacher_cache(cfg: TrialConfig, teacher: torch.nn.Module, card: TeacherCard, root: str | Path,
                        device: torch.device | str = "cpu") -> tuple[Path, int]:
    """Create (or find) the cache and build now, with `teacher`, what every trial reads first: val
    (where the task keeps val logits), and the static targets when views never change (augmented epochs are left to the trials). For
    benchmarks and tests that train outside a sweep. Returns its folder and the teacher image
    forwards run now (0 when those files existed)."""
    s, on_device = place(task_for(cfg.dataset.name).splits(cfg.dataset), cfg.dataset, device)
    cache = TeacherCache.open(create_cache(cfg, card, root, s.num_classes), cfg, card)
    cache.builder = Builder(cfg, teacher.to(device, memory_format=torch.channels_last if torch.device(device).type == "cuda" else torch.contiguous_format),
                            card, s, on_device, device)
    if task_for(cfg.dataset.name).whole_split_logits:  # (a language model's val is scored against the teacher, not cached)
        cache.val(device)
    if cache.static:
        cache.for_epoch(0, device)
    return cache.path, cache.builder.forwards


MASS_TEMPERATURES = (1.0, 2.0, 4.0, 8.0)


def topk_mass(logits: Tensor, k: int) -> dict[str, float]:
    """The mean share of an example's softened teacher probabilities in its k largest classes, at
    each of MASS_TEMPERATURES: what top-k targets keep as the teacher gave it (the other classes keep
    their mass but not its shape: the less the top k hold, the more of the teacher's structure is lost)."""
    z = logits.float()
    return {f"{t:g}": float(torch.softmax(z / t, -1).topk(k, -1).values.sum(-1).mean()) for t in MASS_TEMPERATURES}


def bytes_per_view(num_classes: int, topk: int | None, members: int = 1) -> int:
    """What one view's target takes in the cache (the plan prints it)."""
    index = 2 if num_classes <= 32767 else 4
    return members * (2 * num_classes if topk is None else topk * (2 + index) + 2 * len(FILL_TEMPERATURES))


TOPK_MASS = "val_topk_mass.json"


def read_topk_mass(path: str | Path) -> dict[str, float] | None:
    """topk_mass on val, as the trial that built val.pt recorded it (None: dense, or not built yet)."""
    f = Path(path) / TOPK_MASS
    return json.loads(f.read_text()) if f.exists() else None


class TeacherCache:
    """Read side: val and one epoch's targets on the training device, rows by example. A missing
    file is built here by `builder` (a Builder with this trial's teacher), one builder at a time."""

    def __init__(self, path: Path, static: bool, num_classes: int, topk: int | None, rest: str) -> None:
        self.path, self.static, self.num_classes, self.topk, self.rest = path, static, num_classes, topk, rest
        self._epoch, self._stored = None, None
        self.builder: Builder | None = None

    @classmethod
    def open(cls, path: str | Path | None, cfg: TrialConfig, card: TeacherCard) -> "TeacherCache | None":
        """The cache at `path` if it holds exactly this trial's views, else None (go online)."""
        if not path or not (Path(path) / META).exists():
            return None
        meta = json.loads((Path(path) / META).read_text())
        if meta["key"] != cache_key(cfg, card):
            return None
        return cls(Path(path), cfg.dataset.augment_or_default().static, meta["num_classes"], cfg.train.teacher_topk, cfg.train.teacher_topk_rest)

    def val(self, device) -> Tensor:
        """The val split's teacher logits; the trial that builds them records topk_mass beside them."""

        def make(beat: Callable[[], None]) -> Tensor:
            val = self.builder.val(beat)
            if self.topk:
                with atomic_path(self.path / TOPK_MASS) as tmp:
                    tmp.write_text(json.dumps(topk_mass(val, self.topk)))
            return val

        return torch.load(self._file("val", make), map_location=device, weights_only=True).float()

    def _file(self, name: str, make: Callable[[Callable[[], None]], Tensor | dict[str, Tensor]]) -> Path:
        """<name>.pt, built by `make(beat)` under <name>.lock when missing: the first trial to get the
        lock builds it, touching the lock file after each chunk; the others wait for the lock and then
        find the file, unless the lock file goes STALE_S without a touch (a hung builder: a killed
        one frees the lock), when they build it themselves (writes are atomic: two builders of the
        same views write the same file)."""
        path = self.path / f"{name}.pt"
        if path.exists() or self.builder is None:
            return path
        lock_path = self.path / f"{name}.lock"

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
                        log.warning("teacher cache: the builder of %s has done no teacher forward for %.0f s (hung?): building it here",
                                    name, quiet)
                        beat()  # the other waiters now see this build's progress, and wait for it
                        _save(make(beat), path)
                        return path
                    if time.monotonic() - since > 60:
                        log.info("teacher cache: waiting for another trial to build %s", name)
                        since = time.monotonic()
                    time.sleep(0.2)
            if not path.exists():
                beat()
                _save(make(beat), path)
        return path

    def for_epoch(self, epoch: int, device):
        key = None if self.static else epoch
        if self._stored is None or self._epoch != key:
            self._stored = None  # free the last epoch's before loading the next
            name = "static" if self.static else f"epoch_{epoch}"
            self._stored = torch.load(self._file(name, lambda beat: self.builder.train(key, beat)), map_location=device, weights_only=True)
            self._epoch = key
        return self._stored

    def batch(self, epoch: int, idx: Tensor, device, temperature: float = 1.0, student: Tensor | None = None) -> Tensor:
        """The targets of examples `idx` in `epoch`'s views, as float logits to soften at
        `temperature` (idx on `device`); `student`, the student's logits on them, shapes the rest
        of top-k targets under `train.teacher_topk_rest: bucket`."""
        shaped = student if self.rest == "bucket" else None
        return dense(_rows(self.for_epoch(epoch, device), idx), self.num_classes, temperature, shaped)
