"""Distillation losses, one registry, one call signature.

Convention (Hinton et al., 2015, and this whole project): **alpha weights the distillation term,
(1 - alpha) the cross-entropy on labels**:

    loss = alpha * distill(student, teacher) + (1 - alpha) * CE(student, y)

so alpha=0 is the no-KD control and alpha=1 is pure distillation. torchdistill's KDLoss uses the
opposite (its alpha weights CE): flip it when porting settings.

Every loss is an nn.Module called as `loss(s_logits, t_logits, y, s_feats, t_feats)` and returns
`(total, parts)` where parts holds the detached "kd" and "ce" terms for logging. Teacher inputs are
detached inside, so gradients reach only the student (and a loss's own parameters, e.g. hint
regressors, which the trial loop hands to the optimizer).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from trainables.registry import ConfigError, Registry

LOSSES: Registry[Callable[..., nn.Module]] = Registry("loss", "loss.name")


def _check_alpha_temperature(alpha: float, temperature: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"`0 <= loss.alpha <= 1` must hold, but got loss.alpha={alpha}")
    if not temperature > 0:
        raise ConfigError(f"`loss.temperature > 0` must hold, but got loss.temperature={temperature}")


def kd_kl(s_logits: Tensor, t_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch (Hinton's gradient scaling)."""
    t = temperature
    log_p_s = F.log_softmax(s_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(t_logits.detach().float() / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


class DistillLoss(nn.Module):
    """Shared alpha/CE mixing. Subclasses implement `distill` (the term alpha weights)."""

    needs_teacher_features = False

    def __init__(self, alpha: float, temperature: float = 4.0) -> None:
        super().__init__()
        _check_alpha_temperature(alpha, temperature)
        self.alpha, self.temperature = float(alpha), float(temperature)

    def distill(self, s_logits: Tensor, t_logits: Tensor, y: Tensor, s_feats, t_feats) -> Tensor:
        raise NotImplementedError

    def forward(self, s_logits: Tensor, t_logits: Tensor | None, y: Tensor, s_feats=None, t_feats=None):
        ce = F.cross_entropy(s_logits.float(), y)
        if self.alpha == 0.0:  # the no-KD control: exactly CE, no teacher needed
            return ce, {"ce": ce.detach(), "kd": torch.zeros_like(ce)}
        kd = self.distill(s_logits, t_logits, y, s_feats, t_feats)
        return self.alpha * kd + (1.0 - self.alpha) * ce, {"ce": ce.detach(), "kd": kd.detach()}


@LOSSES.register
class kd(DistillLoss):
    """Hinton KD: alpha * T^2 * KL(p_t^T || p_s^T) + (1 - alpha) * CE (Hinton et al., 2015)."""

    def distill(self, s_logits, t_logits, y, s_feats, t_feats):
        return kd_kl(s_logits, t_logits, self.temperature)


@LOSSES.register
class dkd(DistillLoss):
    """Decoupled KD (Zhao et al., CVPR 2022): KD split into target and non-target parts.

    distill = dkd_alpha * TCKD + dkd_beta * NCKD, with
      TCKD = T^2 KL([p_t(y), 1-p_t(y)] || [p_s(y), 1-p_s(y)])      (binary target-class KD)
      NCKD = T^2 KL(p̂_t || p̂_s) over the non-target classes only (renormalized).
    The paper's alpha/beta are `dkd_alpha`/`dkd_beta` here; our `alpha` still mixes with CE.
    """

    def __init__(self, alpha: float, temperature: float = 4.0, dkd_alpha: float = 1.0, dkd_beta: float = 8.0) -> None:
        super().__init__(alpha, temperature)
        self.dkd_alpha, self.dkd_beta = float(dkd_alpha), float(dkd_beta)

    def distill(self, s_logits, t_logits, y, s_feats, t_feats):
        t = self.temperature
        s, tt = s_logits.float() / t, t_logits.detach().float() / t
        gt = F.one_hot(y, s.shape[1]).bool()
        p_s, p_t = F.softmax(s, 1), F.softmax(tt, 1)
        b_s = torch.stack([p_s[gt], 1 - p_s[gt]], 1).clamp_min(1e-12)
        b_t = torch.stack([p_t[gt], 1 - p_t[gt]], 1).clamp_min(1e-12)
        tckd = (b_t * (b_t.log() - b_s.log())).sum(1).mean() * t * t
        log_q_s = F.log_softmax(s.masked_fill(gt, -1e4), 1)
        log_q_t = F.log_softmax(tt.masked_fill(gt, -1e4), 1)
        nckd = F.kl_div(log_q_s, log_q_t, reduction="batchmean", log_target=True) * t * t
        return self.dkd_alpha * tckd + self.dkd_beta * nckd


def _paired(s_feats: list[Tensor], t_feats: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """Pair the last k student stages with the last k teacher stages (k = the shorter list)."""
    k = min(len(s_feats), len(t_feats))
    return list(zip(s_feats[-k:], t_feats[-k:]))


def _attention(f: Tensor, size: tuple[int, int]) -> Tensor:
    a = f.float().pow(2).mean(1, keepdim=True)
    if a.shape[-2:] != size:
        a = F.adaptive_avg_pool2d(a, size)
    return F.normalize(a.flatten(1), dim=1)


@LOSSES.register
class at(DistillLoss):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017) on paired stage features.

    distill = beta * sum_stages mean((Q_s - Q_t)^2), Q = l2-normalized channel-mean of f^2;
    maps of different sizes are pooled to the smaller one. Needs conv features (not MLPs).
    """

    needs_teacher_features = True

    def __init__(self, alpha: float, temperature: float = 4.0, beta: float = 1000.0) -> None:
        super().__init__(alpha, temperature)
        self.beta = float(beta)

    def distill(self, s_logits, t_logits, y, s_feats, t_feats):
        total = s_logits.new_zeros((), dtype=torch.float32)
        for fs, ft in _paired(s_feats, t_feats):
            if fs.dim() != 4 or ft.dim() != 4:
                raise ConfigError("`loss.name=at` needs convolutional stage features: use kd/dkd/hint for MLPs")
            size = tuple(min(a, b) for a, b in zip(fs.shape[-2:], ft.shape[-2:]))
            total = total + (_attention(fs, size) - _attention(ft.detach(), size)).pow(2).mean()
        return self.beta * total


@LOSSES.register
class hint(DistillLoss):
    """FitNets hints (Romero et al., ICLR 2015): a learned regressor maps a student stage onto a
    teacher stage; distill = beta * MSE(regressor(f_s), f_t). The regressor trains with the student.

    `student_stage` / `teacher_stage` index the stage lists (default: the middle student stage and
    the teacher stage of the same relative depth). Shapes come from `build_loss`'s probe.
    """

    needs_teacher_features = True

    def __init__(
        self, alpha: float, temperature: float = 4.0, beta: float = 100.0, student_stage: int | None = None,
        teacher_stage: int | None = None, s_shapes=None, t_shapes=None,
    ) -> None:
        super().__init__(alpha, temperature)
        if s_shapes is None or t_shapes is None:
            raise ConfigError("`loss.name=hint` must be built with build_loss(), which probes feature shapes")
        self.beta = float(beta)
        self.s_idx = len(s_shapes) // 2 if student_stage is None else int(student_stage)
        self.t_idx = round(self.s_idx * (len(t_shapes) - 1) / max(1, len(s_shapes) - 1)) if teacher_stage is None else int(teacher_stage)
        for field, idx, shapes in (("loss.student_stage", self.s_idx, s_shapes), ("loss.teacher_stage", self.t_idx, t_shapes)):
            if not -len(shapes) <= idx < len(shapes):
                raise ConfigError(f"`{field}` must index one of {len(shapes)} stages, but got {field}={idx}")
        s_shape, t_shape = s_shapes[self.s_idx], t_shapes[self.t_idx]
        if len(s_shape) == 3 and len(t_shape) == 3:
            self.regressor = nn.Sequential(nn.Conv2d(s_shape[0], t_shape[0], 1, bias=False), nn.BatchNorm2d(t_shape[0]))
            self.t_size = tuple(t_shape[1:])
        else:
            self.regressor = nn.Linear(s_shape[0] if len(s_shape) == 1 else s_shape[0] * s_shape[1] * s_shape[2], t_shape[0] if len(t_shape) == 1 else t_shape[0])
            self.t_size = None

    def distill(self, s_logits, t_logits, y, s_feats, t_feats):
        fs, ft = s_feats[self.s_idx], t_feats[self.t_idx].detach().float()
        if self.t_size is None:
            fs = fs.flatten(1)
            ft = ft.flatten(1) if ft.dim() == 2 else F.adaptive_avg_pool2d(ft, 1).flatten(1)
        elif tuple(fs.shape[-2:]) != self.t_size:
            fs = F.adaptive_avg_pool2d(fs, self.t_size)
        return self.beta * F.mse_loss(self.regressor(fs).float(), ft)


@torch.no_grad()
def _feature_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    was_training = model.training
    model.eval()
    p = next(model.parameters())
    feats = model.forward_features(torch.zeros(2, *input_shape, device=p.device))
    model.train(was_training)
    return [tuple(f.shape[1:]) for f in feats]


def build_loss(
    name: str, params: dict, student: nn.Module | None = None, teacher: nn.Module | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> DistillLoss:
    """Create a registered loss; feature losses get the stage shapes of student and teacher."""
    cls = LOSSES.get(name)
    params = dict(params)
    if name == "hint":
        if student is None or teacher is None or input_shape is None:
            raise ConfigError("`loss.name=hint` needs a teacher: set teacher.path or train one first")
        params["s_shapes"] = _feature_shapes(student, input_shape)
        params["t_shapes"] = _feature_shapes(teacher, input_shape)
    try:
        return cls(**params)
    except TypeError as e:
        raise ConfigError(f"`loss` has a parameter that loss.name={name!r} does not take ({e}): remove it") from e
