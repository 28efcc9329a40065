"""Where a trial's teacher outputs come from, decided once per trial, in one place.

Cheapest first: the sweep's soft-target cache (no teacher forwards at all), the train split's
logits once per trial when views never change ("precomputed"), the teacher on every batch
("online", also whenever a feature loss needs the teacher's stages), or no teacher ("none": the
no-KD control, or a run without one).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn as nn
from torch import Tensor

from trainables.card import TeacherCard
from trainables.config import TrialConfig
from trainables.registry import ConfigError
from trainables.data import DataSplits
from trainables.models.ensemble import EnsembleTeacher, combine_targets, members_of, target_model
from trainables.tasks import task_for
from trainables.teacher_cache import Builder, TeacherCache

Source = Literal["cache", "precomputed", "online", "none"]


@dataclass
class TeacherTargets:
    """Teacher logits (and features, for feature losses) for each training batch, and for val."""

    source: Source
    teacher: nn.Module | None
    features: bool
    val_logits: Tensor | None
    norm: Callable[[Tensor], Tensor] | None = None  # the teacher's own input statistics (None: the student's)
    channels_last: bool = False
    cache: TeacherCache | None = None
    train_logits: Tensor | None = None
    forwards: int = 0  # teacher image forwards run outside the cache (an ensemble's: one per member and image)
    weights: Tensor | None = None  # an ensemble's member weights: its targets are mixed at the loss's temperature
    members: int = 1
    val_model: nn.Module | None = None  # the teacher a token task scores val against each epoch (no (N, L, V) val logits are kept)

    @property
    def teacher_forwards(self) -> int:
        """Teacher image forwards run by this trial, the cache files it built included."""
        return self.forwards + (self.cache.builder.forwards if self.cache is not None and self.cache.builder is not None else 0)

    @torch.no_grad()
    def score(self, x: Tensor) -> Tensor:
        """The teacher's logits on inputs no split holds (a student's samples: loss.lmbda)."""
        self.forwards += len(x) * self.members
        return self.teacher(x)

    def batch(self, raw: Tensor, x: Tensor, epoch: int, idx: Tensor, temperature: float,
              student: Tensor | None = None) -> tuple[Tensor | None, list | None]:
        """Targets for one batch of examples `idx`: `raw` is the augmented batch (0..255), `x` the
        student's input; an ensemble's members are mixed at `temperature`, the loss's now. `student`,
        the student's logits on the batch, shapes the classes a top-k cache left out (`bucket`)."""
        if self.source == "cache":
            return combine_targets(self.cache.batch(epoch, idx, x.device, temperature, student), self.weights, temperature), None
        if self.source == "precomputed":
            return combine_targets(self.train_logits[idx], self.weights, temperature), None
        if self.source == "online":
            self.forwards += len(idx) * self.members
            if self.norm is not None:
                x = self.norm(raw)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                out = self.teacher(x, with_features=self.features)
            return out if self.features else (combine_targets(out, self.weights, temperature), None)
        return None, None


def teacher_targets(cfg: TrialConfig, teacher: nn.Module | None, card: TeacherCard | None, needs_features: bool, splits: DataSplits,
                    on_device: bool, predict: Callable[[nn.Module, Tensor], Tensor], norm: Callable[[Tensor], Tensor] | None,
                    channels_last: bool) -> TeacherTargets:
    """Decide the source for this trial. `teacher` is None when there is none to load; it still
    gives val logits (agreement, KL) to a no-KD control. `predict(model, x)` runs eval forwards
    with the teacher's inputs; `norm` is its input normalization (from its card), None when it
    equals the student's. A file missing from the sweep's cache (val, an epoch) is built by this trial's teacher."""
    train_x, val_x = splits.train_x, splits.val_x
    static = cfg.dataset.augment_or_default().static
    if cfg.train.teacher_targets == "precomputed" and not static:
        raise ConfigError("`train.teacher_targets=precomputed` needs fixed views: set dataset.augment to crop_pad: 0, flip: false")
    if teacher is None:
        return TeacherTargets("none", None, False, None)
    held = task_for(cfg.dataset.name).whole_split_logits  # else val is scored against the teacher each epoch (val_model)
    cache = None
    if not needs_features and cfg.train.teacher_targets != "online":
        cache = TeacherCache.open(cfg.teacher_cache, cfg, card)
    members = members_of(teacher)
    val, forwards = None, 0
    if cache is not None:
        cache.builder = Builder(cfg, teacher, card, splits, on_device, next(teacher.parameters()).device)
        if held:
            val = cache.val(val_x.device)
    elif held:
        val, forwards = predict(teacher, val_x), len(val_x) * members
    val_model = None if held else teacher
    if not cfg.loss.distills:
        return TeacherTargets("none", None, False, val, forwards=forwards, cache=cache, val_model=val_model)
    ensemble = {"weights": teacher.weights, "members": members} if isinstance(teacher, EnsembleTeacher) else {}
    if cache is not None:
        return TeacherTargets("cache", teacher, False, val, cache=cache, val_model=val_model, **ensemble)
    if held and static and not needs_features and cfg.train.teacher_targets != "online":
        return TeacherTargets("precomputed", teacher, False, val, train_logits=predict(target_model(teacher), train_x),
                              forwards=forwards + len(train_x) * members, **ensemble)
    return TeacherTargets("online", target_model(teacher) if not needs_features else teacher, needs_features, val, norm=norm,
                          channels_last=channels_last, forwards=forwards, val_model=val_model, **ensemble)
