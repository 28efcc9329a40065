"""Teacher ensembles: several saved teachers used as one, their soft targets combined per view.

An ensemble is a folder like a teacher's: `ensemble.json` (its card: every member's folder, weights
hash, architecture, weight and val accuracy, and how they combine), so a trial, the teacher cache
and the test evaluation take its path wherever they take a teacher's. The members' own folders hold
their weights; each is loaded (and its hash checked) by trainables.models.teacher.

Targets at temperature T:
  combine=probs  (default): the weighted mean of the members' softened probabilities,
                 q_T = sum_m w_m softmax(z_m / T). T depends on the trial (searched, scheduled), so the
                 cache keeps every member's logits per view and the trial mixes them at its own T.
  combine=logits: softmax(sum_m w_m z_m / T): one logit vector per view, whatever T.
Either way a loss receives logits: for probs, T * log q_T, whose softmax at T is q_T exactly.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from trainables.card import TeacherCard
from trainables.schema import Strict
from trainables.registry import ConfigError

ENSEMBLE = "ensemble.json"
Combine = Literal["probs", "logits"]


class Member(Strict):
    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    arch: str
    weight: float = Field(gt=0)
    val_acc: float


class EnsembleCard(TeacherCard):
    """ensemble.json: a TeacherCard (arch "ensemble"; mean 0 and std 1, i.e. 0..1 pixels, since
    each member applies its own statistics inside) that records every member. Its sha256 is over
    the members' hashes, weights and the combination: what the teacher cache is keyed by."""

    kind: ClassVar[str] = "ensemble teacher"
    fix: ClassVar[str] = "delete its folder: a sweep writes it again from its members"

    members: list[Member] = Field(min_length=2)
    combine: Combine


def soft_target(z: Tensor, weights: Tensor, temperature: float) -> Tensor:
    """Logits whose softmax at `temperature` is the weighted mean of the members' softmaxes at it:
    T * log sum_m w_m softmax(z_m / T), for z of shape (batch, members, classes)."""
    t = temperature
    return t * torch.logsumexp(weights.log().view(1, -1, 1) + F.log_softmax(z.float() / t, dim=-1), dim=1)


class EnsembleTeacher(nn.Module):
    """The members behind one forward: inputs on the 0..1 pixel scale, each member normalized with
    its own statistics. `forward` gives the ensemble's logits at T=1 (its predictions, val
    agreement, the test table); `targets` what the teacher cache stores per view."""

    def __init__(self, members: list[nn.Module], stats: list[tuple], weights: list[float], combine: Combine) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.combine = combine
        w = torch.tensor(weights, dtype=torch.float32)
        self.register_buffer("weights", w / w.sum())
        self.register_buffer("mean", torch.tensor([m for m, _ in stats], dtype=torch.float32)[:, :, None, None])  # (members, C, 1, 1)
        self.register_buffer("std", torch.tensor([s for _, s in stats], dtype=torch.float32)[:, :, None, None])

    def stacked(self, x: Tensor) -> Tensor:
        """Every member's logits, (batch, members, classes)."""
        return torch.stack([m((x - self.mean[i]) / self.std[i]) for i, m in enumerate(self.members)], 1)

    def targets(self, x: Tensor) -> Tensor:
        """What a view's cached target holds: every member's logits (probs), or their weighted mean (logits)."""
        return self.stacked(x) if self.combine == "probs" else self(x)

    def forward(self, x: Tensor, with_features: bool = False) -> Tensor:
        if with_features:
            raise ConfigError("feature losses need one teacher's stages, but the teacher is an ensemble: use kd, dkd or dist")
        z = self.stacked(x)
        if self.combine == "logits":
            return (self.weights.view(1, -1, 1) * z.float()).sum(1)
        return soft_target(z, self.weights, 1.0)


class _Targets(nn.Module):
    def __init__(self, ensemble: EnsembleTeacher) -> None:
        super().__init__()
        self.ensemble = ensemble

    def forward(self, x: Tensor, with_features: bool = False) -> Tensor:
        return self.ensemble.targets(x)


def target_model(teacher: nn.Module) -> nn.Module:
    """The module whose outputs are a view's training targets: the teacher itself, or for an
    ensemble one that returns what its cache stores (EnsembleTeacher.targets)."""
    return _Targets(teacher) if isinstance(teacher, EnsembleTeacher) else teacher


def members_of(teacher: nn.Module) -> int:
    """Teacher forwards per image: an ensemble runs each member."""
    return len(teacher.members) if isinstance(teacher, EnsembleTeacher) else 1


def combine_targets(t: Tensor, weights: Tensor | None, temperature: float) -> Tensor:
    """A batch of targets as logits for the loss: an ensemble's members' logits (N, members, C) mixed
    at `temperature`; one teacher's (any shape: (N, C), or a causal LM's (N, L, V)) as they are."""
    return soft_target(t, weights, temperature) if weights is not None and t.dim() == 3 else t


def is_ensemble(path: str | Path) -> bool:
    return (Path(path) / ENSEMBLE).is_file()
