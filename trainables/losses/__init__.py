"""Distillation losses, one registry, one call signature.

Two ways to weight the terms, exclusive in one config:

    alpha mixing (default, the knob the search turns; Hinton et al., 2015):
        loss = alpha * w(epoch) * distill + (1 - alpha) * CE(student, y)
    explicit weights (a paper's exact loss, as mdistiller/RepDistiller write it):
        loss = distill_weight * w(epoch) * distill + ce_weight * CE(student, y)

alpha weights the distillation term, so alpha=0 is the no-KD control (exactly CE, no teacher).
torchdistill's KDLoss uses the opposite (its alpha weights CE): flip it when porting settings.
w(epoch) = min(epoch / warmup_epochs, 1) is mdistiller's linear warm-up of the distillation term,
with epochs counted from 1 (the first epoch trains with 1/warmup of it); 1 when warmup_epochs=0.

Every loss is an nn.Module called as `loss(s_logits, t_logits, y, s_feats, t_feats)` and returns
`(total, parts)`; an unlabelled example (dataset.unlabeled) has y = -100, PyTorch's ignore_index,
so CE leaves it out and only the distillation term sees it (a loss that needs its class, as dkd
does, takes the teacher's). `parts` parts holds the detached, unweighted "kd" and "ce" terms for logging. Teacher
inputs are detached inside, so gradients reach only the student (and a loss's own parameters, e.g.
hint regressors, which the trial loop hands to the optimizer). The trial loop calls
`set_epoch(epoch, epochs)` before each epoch: the warm-up, and `schedule` (alpha and the temperature
moving from their values at epoch 1 to each ramp's `end` at the last epoch, linearly or along a
cosine; an alpha=0 control never distills), read it.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from trainables.schema import LossSchedule, validate
from trainables.registry import ConfigError, Registry

LOSSES: Registry[Callable[..., nn.Module]] = Registry("loss", "loss.name")


def loss_weights(alpha: float | None, ce_weight: float | None, distill_weight: float | None) -> tuple[float, float]:
    """(ce weight, distill weight) from alpha mixing or the explicit form; alpha defaults to 0.9."""
    explicit = ce_weight is not None or distill_weight is not None
    if explicit and alpha is not None:
        raise ConfigError(
            "`loss.alpha` and `loss.ce_weight`/`loss.distill_weight` are exclusive, but got both: "
            "keep alpha (mixing) or the two weights (a paper's exact loss)"
        )
    if explicit:
        if ce_weight is None or distill_weight is None:
            raise ConfigError("`loss.ce_weight` and `loss.distill_weight` go together: give both (e.g. 1.0 and 1.0 for DKD)")
        for field, w in (("loss.ce_weight", ce_weight), ("loss.distill_weight", distill_weight)):
            if not w >= 0:
                raise ConfigError(f"`{field} >= 0` must hold, but got {field}={w}")
        return float(ce_weight), float(distill_weight)
    alpha = 0.9 if alpha is None else alpha
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"`0 <= loss.alpha <= 1` must hold, but got loss.alpha={alpha}")
    return 1.0 - float(alpha), float(alpha)


#: Filled by build_loss from the models, never by a config.
_PROBED = ("s_shapes", "t_shapes")


def loss_parameters(name: str) -> list[str]:
    """The keyword arguments a registered loss takes, from its signature (and its bases' when it
    passes **kwargs on), so a misspelt key fails on the driver rather than inside every trial."""
    names: list[str] = []
    for klass in inspect.getmro(LOSSES.get(name)):
        if klass is nn.Module or "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names += [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self" and p.name not in names]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return [n for n in names if n not in _PROBED]


def loss_defaults(name: str) -> dict[str, object]:
    """A registered loss's keyword defaults (its own and the shared ones), from its signature."""
    out: dict[str, object] = {}
    for klass in inspect.getmro(LOSSES.get(name)):
        if klass is nn.Module or "__init__" not in vars(klass):
            continue
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.default is not p.empty and p.name not in _PROBED:
                out.setdefault(p.name, p.default)
    return out


def loss_schedule(schedule: dict | LossSchedule | None, alpha_form: bool) -> LossSchedule:
    """A schedule's ramps, checked as the values they move are: alpha's end in [0, 1] and only with
    alpha mixing (explicit weights have no alpha to move), the temperature's end > 0."""
    ramps = schedule if isinstance(schedule, LossSchedule) else validate(LossSchedule, schedule or {}, prefix="loss.schedule.")
    if ramps.alpha and ramps.alpha.end is not None:
        if not alpha_form:
            raise ConfigError("`loss.schedule.alpha` moves alpha, but loss.ce_weight/loss.distill_weight fix the weights: "
                              "use alpha or drop the schedule")
        if not 0.0 <= ramps.alpha.end <= 1.0:
            raise ConfigError(f"`loss.schedule.alpha.end` must lie in [0, 1] as alpha does, but got loss.schedule.alpha.end={ramps.alpha.end}")
    if ramps.temperature and ramps.temperature.end is not None and not ramps.temperature.end > 0:
        raise ConfigError(f"`loss.schedule.temperature.end` must be > 0 as the temperature, but got "
                          f"loss.schedule.temperature.end={ramps.temperature.end}")
    return ramps


def check_loss_params(name: str, keys) -> None:
    known = loss_parameters(name)
    bad = [k for k in keys if k not in known]
    if bad:
        raise ConfigError(f"`loss.{bad[0]}` is not a parameter of loss.name={name!r}, which takes {known}: fix its spelling or remove it")


def kd_kl(s_logits: Tensor, t_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch (Hinton's gradient scaling)."""
    t = temperature
    log_p_s = F.log_softmax(s_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(t_logits.detach().float() / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


#: The model features a loss may read besides logits (DistillLoss.features), as messages name them;
#: each task says which its models give (trainables.tasks.Task.features).
FEATURES = {"stages": "convolutional stage features", "transformer": "transformer hidden states"}


class DistillLoss(nn.Module):
    """Shared CE/distill weighting and warm-up. Subclasses implement `distill` (the weighted term)."""

    needs_teacher_features = False
    features: str | None = None  # a FEATURES key: what it reads of both models besides logits (None: logits only)
    reads = "classes"  # the logits it scores: "classes" (N, C) per example, or "tokens" (N, L, V) per next token (losses/lm.py)
    default_warmup_epochs = 0.0

    def __init__(
        self, alpha: float | None = None, temperature: float = 4.0, *, ce_weight: float | None = None,
        distill_weight: float | None = None, warmup_epochs: float | None = None, schedule: dict | None = None,
    ) -> None:
        super().__init__()
        if not temperature > 0:
            raise ConfigError(f"`loss.temperature > 0` must hold, but got loss.temperature={temperature}")
        self.ce_weight, self.distill_weight = loss_weights(alpha, ce_weight, distill_weight)
        self.temperature = float(temperature)
        self.warmup_epochs = float(self.default_warmup_epochs if warmup_epochs is None else warmup_epochs)
        if not self.warmup_epochs >= 0:
            raise ConfigError(f"`loss.warmup_epochs >= 0` must hold, but got loss.warmup_epochs={warmup_epochs}")
        self.epoch = 1
        # alpha and temperature at epoch 1, and how they move (an alpha=0 control never distills)
        alpha_form = ce_weight is None and distill_weight is None
        self.start = {"alpha": self.distill_weight if alpha_form else None, "temperature": self.temperature}
        ramps = loss_schedule(schedule, alpha_form)
        self.ramps = {k: r for k, r in (("alpha", ramps.alpha), ("temperature", ramps.temperature))
                      if r is not None and r.end is not None and (k != "alpha" or self.start["alpha"])}

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        """A one-line ConfigError for a value of this loss's own keys it cannot take, from the config
        alone (the driver asks, before Ray starts; the loss asks again when built)."""

    @classmethod
    def probe(cls, name: str, student: nn.Module | None, teacher: nn.Module | None, input_shape: tuple[int, ...] | None) -> dict[str, Any]:
        """What this loss is built with that only the models can say (their stages' shapes, a
        transformer's sizes), read by build_loss before the loss exists: nothing, for logits."""
        return {}

    def prepare(self, student: nn.Module | None, teacher: nn.Module | None) -> None:
        """Set the models up for what this loss reads (e.g. attention maps): nothing, for logits."""

    def rollout(self, student: nn.Module, x: Tensor, y: Tensor, seed: tuple[int, ...]) -> tuple[Tensor, Tensor] | None:
        """This batch replaced by the student's own samples (GKD's on-policy batches: token losses
        with loss.lmbda > 0), or None: train on the batch as it is."""
        return None

    def set_epoch(self, epoch: int, epochs: int | None = None) -> None:
        """The epoch about to train, counted from 1 (as mdistiller's trainer counts), of `epochs`:
        the schedules move alpha and the temperature to that epoch's values."""
        self.epoch = epoch
        if epochs is None:
            return
        if "temperature" in self.ramps:
            self.temperature = self.ramps["temperature"].at(self.start["temperature"], epoch, epochs)
        if "alpha" in self.ramps:
            a = self.ramps["alpha"].at(self.start["alpha"], epoch, epochs)
            self.ce_weight, self.distill_weight = 1.0 - a, a

    def now(self) -> dict[str, float]:
        """The weight and temperature this epoch trains with (logged per epoch)."""
        return {"kd_weight": self.distill_weight, "kd_temperature": self.temperature}

    def warmup_factor(self) -> float:
        return min(self.epoch / self.warmup_epochs, 1.0) if self.warmup_epochs > 0 else 1.0

    def distill(self, s_logits: Tensor, t_logits: Tensor, y: Tensor, s_feats, t_feats) -> Tensor:
        raise NotImplementedError

    def forward(self, s_logits: Tensor, t_logits: Tensor | None, y: Tensor, s_feats=None, t_feats=None):
        ce = F.cross_entropy(s_logits.float(), y)
        weighted_ce = ce if self.ce_weight == 1.0 else self.ce_weight * ce
        if self.distill_weight == 0.0:  # the no-KD control: exactly CE, no teacher needed
            return weighted_ce, {"ce": ce.detach(), "kd": torch.zeros_like(ce)}
        kd = self.distill(s_logits, t_logits, y, s_feats, t_feats)
        return self.distill_weight * self.warmup_factor() * kd + weighted_ce, {"ce": ce.detach(), "kd": kd.detach()}


def standardize(z: Tensor) -> Tensor:
    """Logit standardization (Sun et al., CVPR 2024; their `normalize`): each row's z-score over the
    classes, with the unbiased std and 1e-7 added to it, so only the logits' shape is distilled
    (a student need not match the teacher's scale or offset)."""
    return (z - z.mean(1, keepdim=True)) / (1e-7 + z.std(1, keepdim=True))


@LOSSES.register
class kd(DistillLoss):
    """Hinton KD: distill = T^2 * KL(p_t^T || p_s^T) (Hinton et al., 2015; mdistiller KD.kd_loss).

    `standardize_logits`: both logits z-scored per example before the temperature (Sun et al.,
    CVPR 2024, logit-standardization-KD's kd_loss); T is then their base temperature (2 in the
    paper, with CE 0.1 and distill 9: ce_weight/distill_weight) and still scales by T^2."""

    def __init__(self, alpha: float | None = None, temperature: float = 4.0, standardize_logits: bool = False, **weights) -> None:
        super().__init__(alpha, temperature, **weights)
        self.standardize_logits = bool(standardize_logits)

    def distill(self, s_logits, t_logits, y, s_feats, t_feats):
        if self.standardize_logits:
            s_logits, t_logits = standardize(s_logits.float()), standardize(t_logits.detach().float())
        return kd_kl(s_logits, t_logits, self.temperature)


def _binary_log_probs(z: Tensor, gt: Tensor) -> Tensor:
    """log [p(y), 1 - p(y)] of softmax(z), with 1 - p(y) as the sum of the other classes' mass
    (logsumexp), so a confident distribution (p(y) -> 1) keeps its exact value and gradient."""
    lse = z.logsumexp(1)
    log_other = z.masked_fill(gt, float("-inf")).logsumexp(1)
    return torch.stack([z[gt] - lse, log_other - lse], 1)


@LOSSES.register
class dkd(DistillLoss):
    """Decoupled KD (Zhao et al., CVPR 2022; mdistiller distillers/DKD.py): KD split into a
    target-class and a non-target part.

    distill = dkd_alpha * TCKD + dkd_beta * NCKD, with
      TCKD = T^2 KL([p_t(y), 1-p_t(y)] || [p_s(y), 1-p_s(y)])      (binary target-class KD)
      NCKD = T^2 KL(p̂_t || p̂_s) over the non-target classes only (renormalized).
    Warmed up over `warmup_epochs` (default 20, mdistiller's CIFAR-100 setting). The paper's
    alpha/beta are `dkd_alpha`/`dkd_beta` here; `alpha` (or the explicit weights) mixes with CE.
    `standardize_logits` as for kd (the paper: T=2, dkd_alpha and dkd_beta times 9).
    """

    default_warmup_epochs = 20.0

    def __init__(self, alpha: float | None = None, temperature: float = 4.0, dkd_alpha: float = 1.0, dkd_beta: float = 8.0,
                 standardize_logits: bool = False, **weights) -> None:
        super().__init__(alpha, temperature, **weights)
        self.dkd_alpha, self.dkd_beta = float(dkd_alpha), float(dkd_beta)
        self.standardize_logits = bool(standardize_logits)

    def distill(self, s_logits, t_logits, y, s_feats, t_feats):
        t = self.temperature
        s, tt = s_logits.float(), t_logits.detach().float()
        if self.standardize_logits:  # as kd's (logit-standardization-KD's dkd_loss)
            s, tt = standardize(s), standardize(tt)
        s, tt = s / t, tt / t
        y = torch.where(y >= 0, y, tt.argmax(1))  # an unlabelled example (data.UNLABELED): the teacher's class
        gt = F.one_hot(y, s.shape[1]).bool()
        log_b_s, log_b_t = _binary_log_probs(s, gt), _binary_log_probs(tt, gt)
        tckd = F.kl_div(log_b_s, log_b_t, reduction="batchmean", log_target=True) * t * t
        rest = ~gt
        n, c = s.shape
        log_q_s = F.log_softmax(s[rest].view(n, c - 1), 1)
        log_q_t = F.log_softmax(tt[rest].view(n, c - 1), 1)
        nckd = F.kl_div(log_q_s, log_q_t, reduction="batchmean", log_target=True) * t * t
        return self.dkd_alpha * tckd + self.dkd_beta * nckd


def _pearson(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Per-row Pearson correlation, as DIST's code computes it: a cosine of the centred rows with
    eps added to the product of their norms."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


@LOSSES.register
class dist(DistillLoss):
    """DIST (Huang et al., NeurIPS 2022; hunto/image_classification_sota lib/models/losses/dist_kd.py):
    the teacher's *relations* rather than its exact probabilities, which a much stronger teacher's
    student cannot match. With p = softmax(z / T):

      distill = T^2 * (beta * (1 - mean_i rho(p_s[i, :], p_t[i, :]))      inter-class: each example
                       + gamma * (1 - mean_c rho(p_s[:, c], p_t[:, c])))   intra-class: each class over the batch

    rho is Pearson's correlation. The intra-class term depends on the batch (with DDP: each
    worker's). The authors' settings: CE + 2 * DIST with beta = gamma = 1, T = 4 on CIFAR-100, T = 1
    on ImageNet (ce_weight: 1, distill_weight: 2). Works from logits alone (cached teacher targets).
    """

    def __init__(self, alpha: float | None = None, temperature: float = 4.0, beta: float = 1.0, gamma: float = 1.0, **weights) -> None:
        super().__init__(alpha, temperature, **weights)
        self.beta, self.gamma = float(beta), float(gamma)

    def distill(self, s_logits, t_logits, y, s_feats, t_feats):
        t = self.temperature
        p_s = F.softmax(s_logits.float() / t, 1)
        p_t = F.softmax(t_logits.detach().float() / t, 1)
        inter = 1 - _pearson(p_s, p_t).mean()
        intra = 1 - _pearson(p_s.t(), p_t.t()).mean()
        return t * t * (self.beta * inter + self.gamma * intra)


def _paired(s_feats: list[Tensor], t_feats: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """Pair the last k student stages with the last k teacher stages (k = the shorter list)."""
    k = min(len(s_feats), len(t_feats))
    return list(zip(s_feats[-k:], t_feats[-k:]))


def _attention(f: Tensor, p: float) -> Tensor:
    """Q = l2-normalized channel mean of |f|^p, flattened."""
    return F.normalize(f.float().pow(p).mean(1).flatten(1), dim=1)


def _pool_to(f: Tensor, size: tuple[int, ...]) -> Tensor:
    return f if tuple(f.shape[-2:]) == size else F.adaptive_avg_pool2d(f, size)


@LOSSES.register
class at(DistillLoss):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017; RepDistiller distiller_zoo/AT.py,
    mdistiller distillers/AT.py) on paired stage features.

    distill = beta * sum_stages mean((Q_s - Q_t)^2), Q = l2-normalized channel mean of f^p.
    Stages of different spatial sizes: `pool="features"` (default, as the references) average-pools
    the larger *features* to the smaller size before forming Q; `pool="maps"` forms Q at full size
    and pools the maps instead. Needs conv features (not MLPs).
    """

    needs_teacher_features = True
    features = "stages"

    def __init__(
        self, alpha: float | None = None, temperature: float = 4.0, beta: float = 1000.0, p: float = 2.0,
        pool: Literal["features", "maps"] = "features", **weights,
    ) -> None:
        super().__init__(alpha, temperature, **weights)
        if pool not in ("features", "maps"):
            raise ConfigError(f"`loss.pool` must be one of ['features', 'maps'], but got loss.pool={pool!r}")
        self.beta, self.p, self.pool = float(beta), float(p), pool

    def _stage(self, fs: Tensor, ft: Tensor) -> Tensor:
        size = tuple(min(a, b) for a, b in zip(fs.shape[-2:], ft.shape[-2:]))
        if self.pool == "features":
            return (_attention(_pool_to(fs, size), self.p) - _attention(_pool_to(ft, size), self.p)).pow(2).mean()
        maps = [f.float().pow(self.p).mean(1, keepdim=True) for f in (fs, ft)]
        qs, qt = (F.normalize(_pool_to(m, size).flatten(1), dim=1) for m in maps)
        return (qs - qt).pow(2).mean()

    def distill(self, s_logits, t_logits, y, s_feats, t_feats):
        pairs = _paired(s_feats, t_feats)
        if any(fs.dim() != 4 or ft.dim() != 4 for fs, ft in pairs):
            raise ConfigError("`loss.name=at` needs convolutional stage features: use kd/dkd/hint for MLPs")
        return self.beta * sum(self._stage(fs, ft.detach()) for fs, ft in pairs)


def hint_regressor(s_shape: tuple[int, ...], t_shape: tuple[int, ...], relu: bool = True) -> nn.Module:
    """FitNets' regressor from a student stage onto a teacher stage: conv -> BN (-> ReLU).

    Conv shapes follow the references' ConvReg (mdistiller distillers/_common.py, RepDistiller
    models/util.py): 3x3 stride 2 when the student map is twice the teacher's, a 4x4 stride-2
    transposed conv when half, a (1+dH)x(1+dW) valid conv when larger; any other size pair is pooled
    to the teacher's size first, then a 1x1 conv. Vector stages (MLPs) get Linear (-> ReLU).
    `relu=True` (the references' default) matches post-ReLU hint layers; `relu=False` keeps it linear.
    """
    act = [nn.ReLU()] if relu else []
    if len(s_shape) == 3 and len(t_shape) == 3:
        (sc, sh, sw), (tc, th, tw) = s_shape, t_shape
        if sh == 2 * th:
            conv = nn.Conv2d(sc, tc, 3, stride=2, padding=1)
        elif 2 * sh == th:
            conv = nn.ConvTranspose2d(sc, tc, 4, stride=2, padding=1)
        elif sh >= th and sw >= tw:
            conv = nn.Conv2d(sc, tc, (1 + sh - th, 1 + sw - tw))
        else:
            conv = nn.Sequential(nn.AdaptiveAvgPool2d((th, tw)), nn.Conv2d(sc, tc, 1))
        return nn.Sequential(conv, nn.BatchNorm2d(tc), *act)
    s_dim = s_shape[0] if len(s_shape) == 1 else s_shape[0] * s_shape[1] * s_shape[2]
    return nn.Sequential(nn.Flatten(), nn.Linear(s_dim, t_shape[0]), *act)


@LOSSES.register
class hint(DistillLoss):
    """FitNets hints (Romero et al., ICLR 2015; mdistiller distillers/FitNet.py): a learned regressor
    maps a student stage onto a teacher stage; distill = beta * MSE(regressor(f_s), f_t). The
    regressor (see `hint_regressor`, ReLU by default) trains with the student.

    `student_stage` / `teacher_stage` index the stage lists (default: the middle student stage and
    the teacher stage of the same relative depth). Shapes come from `probe`.
    """

    needs_teacher_features = True

    @classmethod
    def probe(cls, name, student, teacher, input_shape):
        if student is None or teacher is None or input_shape is None:
            raise ConfigError("`loss.name=hint` needs a teacher: set teacher.path or train one first")
        return {"s_shapes": _feature_shapes(student, input_shape), "t_shapes": _feature_shapes(teacher, input_shape)}
    features = "stages"

    def __init__(
        self, alpha: float | None = None, temperature: float = 4.0, beta: float = 100.0, student_stage: int | None = None,
        teacher_stage: int | None = None, relu: bool = True, s_shapes=None, t_shapes=None, **weights,
    ) -> None:
        super().__init__(alpha, temperature, **weights)
        if s_shapes is None or t_shapes is None:
            raise ConfigError("`loss.name=hint` must be built with build_loss(), which probes feature shapes")
        self.beta = float(beta)
        self.s_idx = len(s_shapes) // 2 if student_stage is None else int(student_stage)
        self.t_idx = round(self.s_idx * (len(t_shapes) - 1) / max(1, len(s_shapes) - 1)) if teacher_stage is None else int(teacher_stage)
        for field, idx, shapes in (("loss.student_stage", self.s_idx, s_shapes), ("loss.teacher_stage", self.t_idx, t_shapes)):
            if not -len(shapes) <= idx < len(shapes):
                raise ConfigError(f"`{field}` must index one of {len(shapes)} stages, but got {field}={idx}")
        self.regressor = hint_regressor(s_shapes[self.s_idx], t_shapes[self.t_idx], relu)

    def distill(self, s_logits, t_logits, y, s_feats, t_feats):
        ft = t_feats[self.t_idx].detach().float()
        out = self.regressor(s_feats[self.s_idx]).float()
        if out.dim() == 2 and ft.dim() == 4:  # a vector regressor onto a conv teacher stage: its pooled channels
            ft = F.adaptive_avg_pool2d(ft, 1).flatten(1)
        return self.beta * F.mse_loss(out, ft)


@torch.no_grad()
def _feature_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    was_training = model.training
    model.eval()
    p = next(model.parameters())
    _, feats = model(torch.zeros(2, *input_shape, device=p.device), with_features=True)
    model.train(was_training)
    return [tuple(f.shape[1:]) for f in feats]


def check_fits(method: str, features: tuple[str, ...], task: str, outputs: str = "classes") -> None:
    """A loss that reads features the models of `task` (its name, as a message says it) do not give,
    or scores other logits than its models' `outputs` (Task.outputs: classes or tokens), is refused,
    with the losses that fit: on the driver before Ray starts, and where a trial builds it."""
    if LOSSES.get(method).reads != outputs:
        fit = [n for n in LOSSES if LOSSES.get(n).reads == outputs]
        what = {"classes": "one class distribution per example", "tokens": "next-token distributions"}
        raise ConfigError(f"`loss.name` {method} distils {what[LOSSES.get(method).reads]}, but the models of {task} give "
                          f"{what[outputs]}: use {', '.join(fit)}")
    need = LOSSES.get(method).features
    if need is not None and need not in features:
        fit = [n for n in LOSSES if LOSSES.get(n).features in features]
        logits = [n for n in LOSSES if LOSSES.get(n).features is None and LOSSES.get(n).reads == outputs]
        raise ConfigError(f"`loss.name` {method} distils {FEATURES[need]}, which the models of {task} lack: use "
                          f"{' or '.join(fit) or 'a logit loss'} (or a logit loss: {', '.join(logits)})")


def build_loss(
    name: str, params: dict, student: nn.Module | None = None, teacher: nn.Module | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> DistillLoss:
    """Create a registered loss with what it reads of the models (`probe`: a feature loss's stage
    shapes, a transformer loss's sizes), the models set up for it (`prepare`: attention maps)."""
    cls = LOSSES.get(name)  # (whether the task's models give the features it reads: check_fits, before)
    params = {**params, **cls.probe(name, student, teacher, input_shape)}
    try:
        loss = cls(**params)
    except TypeError as e:
        raise ConfigError(f"`loss` has a parameter that loss.name={name!r} does not take ({e}): remove it") from e
    loss.prepare(student, teacher)
    return loss


import trainables.losses.lm  # noqa: E402,F401  registers the token losses of causal language models
import trainables.losses.text  # noqa: E402,F401  registers the transformer losses
