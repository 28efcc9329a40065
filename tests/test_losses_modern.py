"""DIST and logit standardization against their authors' code, copied verbatim below and run in
float64 on the same tensors: values and gradients, extreme cases included.

- DIST: hunto/image_classification_sota @ d9662f7df68fe46b973c4580b7c9b896cedcd301 (the commit
  hunto/DIST_KD pins), lib/models/losses/dist_kd.py.
- Logit standardization: sunshangquan/logit-standardization-KD @ f6e5aa5172bad618e801163c3385322eea673754,
  mdistiller/distillers/KD.py (normalize, kd_loss) and DKD.py (dkd_loss and its helpers).

Tolerance: 1e-5 relative (float32 under test).
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.test_losses_reference import RTOL, logits, rel_err, value_and_grad
from trainables.config import LossConfig, validate
from trainables.losses import LOSSES
from trainables.registry import ConfigError

# --- hunto/image_classification_sota lib/models/losses/dist_kd.py, verbatim -------------------------


def cosine_similarity(a, b, eps=1e-8):
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def pearson_correlation(a, b, eps=1e-8):
    return cosine_similarity(a - a.mean(1).unsqueeze(1),
                             b - b.mean(1).unsqueeze(1), eps)


def inter_class_relation(y_s, y_t):
    return 1 - pearson_correlation(y_s, y_t).mean()


def intra_class_relation(y_s, y_t):
    return inter_class_relation(y_s.transpose(0, 1), y_t.transpose(0, 1))


class DIST(nn.Module):
    def __init__(self, beta=1.0, gamma=1.0, tau=1.0):
        super(DIST, self).__init__()
        self.beta = beta
        self.gamma = gamma
        self.tau = tau

    def forward(self, z_s, z_t):
        y_s = (z_s / self.tau).softmax(dim=1)
        y_t = (z_t / self.tau).softmax(dim=1)
        inter_loss = self.tau**2 * inter_class_relation(y_s, y_t)
        intra_loss = self.tau**2 * intra_class_relation(y_s, y_t)
        kd_loss = self.beta * inter_loss + self.gamma * intra_loss
        return kd_loss


# --- sunshangquan/logit-standardization-KD mdistiller/distillers/{KD,DKD}.py, verbatim -------------


def normalize(logit):
    mean = logit.mean(dim=-1, keepdims=True)
    stdv = logit.std(dim=-1, keepdims=True)
    return (logit - mean) / (1e-7 + stdv)


def kd_loss(logits_student_in, logits_teacher_in, temperature, logit_stand):
    logits_student = normalize(logits_student_in) if logit_stand else logits_student_in
    logits_teacher = normalize(logits_teacher_in) if logit_stand else logits_teacher_in
    log_pred_student = F.log_softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    loss_kd = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean()
    loss_kd *= temperature**2
    return loss_kd


def dkd_loss(logits_student_in, logits_teacher_in, target, alpha, beta, temperature, logit_stand):
    logits_student = normalize(logits_student_in) if logit_stand else logits_student_in
    logits_teacher = normalize(logits_teacher_in) if logit_stand else logits_teacher_in

    gt_mask = _get_gt_mask(logits_student, target)
    other_mask = _get_other_mask(logits_student, target)
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    pred_student = cat_mask(pred_student, gt_mask, other_mask)
    pred_teacher = cat_mask(pred_teacher, gt_mask, other_mask)
    log_pred_student = torch.log(pred_student)
    tckd_loss = (
        F.kl_div(log_pred_student, pred_teacher, size_average=False)
        * (temperature**2)
        / target.shape[0]
    )
    pred_teacher_part2 = F.softmax(
        logits_teacher / temperature - 1000.0 * gt_mask, dim=1
    )
    log_pred_student_part2 = F.log_softmax(
        logits_student / temperature - 1000.0 * gt_mask, dim=1
    )
    nckd_loss = (
        F.kl_div(log_pred_student_part2, pred_teacher_part2, size_average=False)
        * (temperature**2)
        / target.shape[0]
    )
    return alpha * tckd_loss + beta * nckd_loss


def _get_gt_mask(logits, target):
    target = target.reshape(-1)
    mask = torch.zeros_like(logits).scatter_(1, target.unsqueeze(1), 1).bool()
    return mask


def _get_other_mask(logits, target):
    target = target.reshape(-1)
    mask = torch.ones_like(logits).scatter_(1, target.unsqueeze(1), 0).bool()
    return mask


def cat_mask(t, mask1, mask2):
    t1 = (t * mask1).sum(dim=1, keepdims=True)
    t2 = (t * mask2).sum(1, keepdims=True)
    rt = torch.cat([t1, t2], dim=1)
    return rt


# --- the checks ------------------------------------------------------------------------------------

CASES = [(seed, n, c, temp) for seed in (0, 1) for n, c in ((16, 10), (64, 100), (4, 1000)) for temp in (1.0, 4.0)]


def check(ours, reference, x: torch.Tensor) -> None:
    """Our float32 loss against the reference, value and gradient w.r.t. the student: within RTOL
    of it run in float32 on the same tensors, and of it in float64, or as close as its own float32
    run comes where float32 itself is the limit (a loss at its minimum, saturated softmaxes)."""
    val, (g,) = value_and_grad(ours, x)
    ref32, (g32,) = value_and_grad(lambda z: reference(z, torch.float32), x)
    ref, (g_ref,) = value_and_grad(lambda z: reference(z, torch.float64), x.double())
    assert rel_err(val, ref32) <= RTOL and rel_err(g, g32) <= RTOL, (val.item(), ref32.item())
    assert rel_err(val, ref) <= max(RTOL, 1.5 * rel_err(ref32, ref)), (val.item(), ref.item())
    assert rel_err(g, g_ref) <= max(RTOL, 1.5 * rel_err(g32, g_ref))


@pytest.mark.parametrize("seed,n,c,temp", CASES)
@pytest.mark.parametrize("beta,gamma", [(1.0, 1.0), (2.0, 0.5)])
def test_dist_matches_the_authors_code(seed, n, c, temp, beta, gamma):
    y = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(seed))
    s, t = logits(seed, n, c, y), logits(seed + 100, n, c, y)
    loss = LOSSES.get("dist")(alpha=1.0, temperature=temp, beta=beta, gamma=gamma)
    check(lambda x: loss.distill(x, t, y, None, None), lambda x, dt: DIST(beta, gamma, temp)(x, t.to(dt)), s)


@pytest.mark.parametrize("case", ["confident teacher", "confident student", "student equals teacher", "batch of two", "huge logits"])
def test_dist_extreme_cases_match_the_authors_code(case):
    n, c, temp = 16, 100, 1.0
    y = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(7))
    s, t = logits(7, n, c, y), logits(8, n, c, y)
    if case == "confident teacher":
        t = logits(8, n, c, y, margin=40.0)
    elif case == "confident student":
        s = logits(7, n, c, y, margin=25.0)
    elif case == "student equals teacher":
        s = t.clone()
    elif case == "batch of two":
        s, t, y = s[:2], t[:2], y[:2]
    elif case == "huge logits":
        s, t = s * 50, t * 50
    loss = LOSSES.get("dist")(alpha=1.0, temperature=temp)
    check(lambda x: loss.distill(x, t, y, None, None), lambda x, dt: DIST(1.0, 1.0, temp)(x, t.to(dt)), s)


def test_dist_teacher_gets_no_gradient_and_the_control_needs_no_teacher():
    y = torch.tensor([0, 1, 2, 3])
    s, t = logits(1, 4, 5, y).requires_grad_(), logits(2, 4, 5, y).requires_grad_()
    total, parts = LOSSES.get("dist")(alpha=0.5)(s, t, y)
    total.backward()
    assert t.grad is None and s.grad is not None and parts["kd"] > 0
    control, _ = LOSSES.get("dist")(alpha=0.0)(s, None, y)  # alpha=0: exactly CE, no teacher
    assert rel_err(control, F.cross_entropy(s.double(), y)) <= RTOL


@pytest.mark.parametrize("seed,n,c,temp", CASES)
def test_standardized_kd_matches_the_authors_code(seed, n, c, temp):
    y = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(seed))
    s, t = logits(seed, n, c, y), logits(seed + 100, n, c, y, scale=8.0)
    loss = LOSSES.get("kd")(alpha=1.0, temperature=temp, standardize_logits=True)
    check(lambda x: loss.distill(x, t, y, None, None), lambda x, dt: kd_loss(x, t.to(dt), temp, True), s)
    plain = LOSSES.get("kd")(alpha=1.0, temperature=temp)  # the flag off: their kd_loss is mdistiller's
    check(lambda x: plain.distill(x, t, y, None, None), lambda x, dt: kd_loss(x, t.to(dt), temp, False), s)


@pytest.mark.filterwarnings("ignore:size_average")  # the authors' dkd_loss uses the legacy reduction
@pytest.mark.parametrize("seed,n,c,temp", CASES)
def test_standardized_dkd_matches_the_authors_code(seed, n, c, temp):
    y = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(seed))
    s, t = logits(seed, n, c, y), logits(seed + 100, n, c, y, margin=2.0)
    loss = LOSSES.get("dkd")(alpha=1.0, temperature=temp, dkd_alpha=9.0, dkd_beta=72.0, standardize_logits=True)
    check(lambda x: loss.distill(x, t, y, None, None), lambda x, dt: dkd_loss(x, t.to(dt), y, 9.0, 72.0, temp, True), s)


@pytest.mark.parametrize("case", ["confident teacher", "confident student", "constant student", "huge logits"])
def test_standardized_kd_extreme_cases_match_the_authors_code(case):
    n, c, temp = 16, 100, 2.0
    y = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(9))
    s, t = logits(9, n, c, y), logits(10, n, c, y)
    if case == "confident teacher":
        t = logits(10, n, c, y, margin=60.0)
    elif case == "confident student":
        s = logits(9, n, c, y, margin=60.0)
    elif case == "constant student":  # zero std: the z-score is 0 / 1e-7 = 0 (uniform), as theirs
        s = torch.full((n, c), 3.0)
    elif case == "huge logits":
        s, t = s * 1e4, t * 1e4
    loss = LOSSES.get("kd")(alpha=1.0, temperature=temp, standardize_logits=True)
    check(lambda x: loss.distill(x, t, y, None, None), lambda x, dt: kd_loss(x, t.to(dt), temp, True), s)


def test_standardized_kd_ignores_the_students_scale_and_offset():
    """What the paper is for: a student whose logits are an affine copy of the teacher's (any
    positive scale, any offset) has nothing left to learn."""
    y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(0))
    t = logits(0, 8, 10, y)
    loss = LOSSES.get("kd")(alpha=1.0, temperature=2.0, standardize_logits=True)
    assert loss.distill(0.1 * t + 5.0, t, y, None, None).abs() < 1e-6
    assert LOSSES.get("kd")(alpha=1.0, temperature=2.0).distill(0.1 * t + 5.0, t, y, None, None) > 0.1


def test_config_takes_the_new_keys_only_where_they_apply():
    assert validate(LossConfig, {"name": "dist", "beta": 2.0, "gamma": 2.0}).params()["gamma"] == 2.0
    assert validate(LossConfig, {"name": "dkd", "standardize_logits": True}).params()["standardize_logits"] is True
    with pytest.raises(ConfigError, match="`loss.standardize_logits` is not a parameter of loss.name='dist'"):
        validate(LossConfig, {"name": "dist", "standardize_logits": True})
    with pytest.raises(ConfigError, match="`loss.gamma` is not a parameter of loss.name='kd'"):
        validate(LossConfig, {"name": "kd", "gamma": 1.0})


# --- schedules of alpha and the temperature ----------------------------------------------------------


@pytest.mark.parametrize("name,mid", [("linear", 2.5), ("cosine", 2.5), ("constant", 4.0)])
def test_a_ramp_runs_from_the_loss_value_at_epoch_1_to_its_end_at_the_last(name, mid):
    from trainables.config import Ramp

    ramp = Ramp(name=name, end=None if name == "constant" else 1.0)
    values = [ramp.at(4.0, e, 5) for e in range(1, 6)]
    assert values[0] == 4.0 and values[2] == pytest.approx(mid) and values[-1] == (4.0 if name == "constant" else 1.0)
    if name == "cosine":  # slow at both ends
        assert values[0] - values[1] < values[1] - values[2]


def test_a_scheduled_kd_trains_each_epoch_with_that_epochs_temperature_and_weight():
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(0))
    s, t = logits(0, 16, 10, y), logits(1, 16, 10, y)
    cfg = validate(LossConfig, {"name": "kd", "alpha": 0.8, "temperature": 8.0,
                                "schedule": {"alpha": {"end": 0.2}, "temperature": {"name": "cosine", "end": 2.0}}})
    loss = LOSSES.get("kd")(**cfg.params())
    for epoch, (alpha, temp) in enumerate([(0.8, 8.0), (0.5, 5.0), (0.2, 2.0)], start=1):
        loss.set_epoch(epoch, 3)
        total, parts = loss(s, t, y)
        assert loss.now() == pytest.approx({"kd_weight": alpha, "kd_temperature": temp})
        expected = (1 - alpha) * F.cross_entropy(s.double(), y) + alpha * kd_loss(s.double(), t.double(), temp, False)
        assert rel_err(total, expected) <= RTOL


def test_an_alpha_zero_control_stays_one_whatever_its_schedule():
    cfg = validate(LossConfig, {"name": "kd", "alpha": 0.0, "schedule": {"alpha": {"end": 0.9}}})
    loss = LOSSES.get("kd")(**cfg.params())
    loss.set_epoch(5, 5)
    assert not cfg.distills and loss.now()["kd_weight"] == 0.0


@pytest.mark.parametrize("schedule,needle", [
    ({"alpha": {"end": 1.5}}, "`loss.schedule.alpha.end` must lie in [0, 1]"),
    ({"temperature": {"name": "cosine", "end": 0.0}}, "`loss.schedule.temperature.end` must be > 0"),
    ({"temperature": {"name": "linear"}}, "needs `end`"),
    ({"alpha": {"name": "step", "end": 0.5}}, "`loss.schedule.alpha.name`"),
])
def test_bad_schedules_name_their_field(schedule, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        validate(LossConfig, {"name": "kd", "schedule": schedule}, prefix="loss.")
    with pytest.raises(ConfigError, match="fix the weights"):
        validate(LossConfig, {"name": "kd", "ce_weight": 1.0, "distill_weight": 1.0, "schedule": {"alpha": {"end": 0.5}}})
