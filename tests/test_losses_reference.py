"""Each loss against a float64 re-implementation of its published formula, as the reference code
computes it (mdistiller distillers/{KD,DKD,AT,FitNet}.py, RepDistiller distiller_zoo/{KD,AT,FitNet}.py):
values and gradients, extreme cases included (confident students, mismatched stage sizes).

Tolerance: 1e-5 relative, float32 under test against float64 references.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainables.config import LossConfig, validate
from trainables.losses import LOSSES, hint_regressor
from trainables.registry import ConfigError

RTOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def logits(seed: int, n: int, c: int, y: torch.Tensor, margin: float | None = None, scale: float = 3.0) -> torch.Tensor:
    """Random logits; with `margin`, the target logit sits `margin` above the largest other one."""
    z = torch.randn(n, c, generator=torch.Generator().manual_seed(seed)) * scale
    if margin is not None:
        others = z.masked_fill(F.one_hot(y, c).bool(), float("-inf")).amax(1)
        z[torch.arange(n), y] = others + margin
    return z


def value_and_grad(fn, *inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves)
    return out.detach(), list(grads)


# --- float64 references of the published formulas ---------------------------------------------


def ref_kd(s: torch.Tensor, t: torch.Tensor, temp: float) -> torch.Tensor:
    p_t = F.softmax(t.double() / temp, 1)
    log_p_s = F.log_softmax(s.double() / temp, 1)
    return (p_t * (p_t.log() - log_p_s)).sum(1).mean() * temp**2


def ref_dkd(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, temp: float, a: float, b: float) -> torch.Tensor:
    """Zhao et al. 2022, eq. (4)-(5): b = [p_y, sum_{j != y} p_j]; NCKD over renormalized non-targets."""
    s, t = s.double() / temp, t.double() / temp
    gt = F.one_hot(y, s.shape[1]).bool()
    p_s, p_t = F.softmax(s, 1), F.softmax(t, 1)
    b_s = torch.stack([p_s[gt], p_s.masked_fill(gt, 0).sum(1)], 1)
    b_t = torch.stack([p_t[gt], p_t.masked_fill(gt, 0).sum(1)], 1)
    tckd = (b_t * (b_t.log() - b_s.log())).sum(1).mean()
    n, c = s.shape
    q_s = F.softmax(s[~gt].view(n, c - 1), 1)
    q_t = F.softmax(t[~gt].view(n, c - 1), 1)
    nckd = (q_t * (q_t.log() - q_s.log())).sum(1).mean()
    return temp**2 * (a * tckd + b * nckd)


def ref_at_stage(fs: torch.Tensor, ft: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """RepDistiller Attention.at_loss: pool the larger *features* to the smaller size, then Q."""
    fs, ft = fs.double(), ft.double()
    sh, th = fs.shape[2], ft.shape[2]
    if sh > th:
        fs = F.adaptive_avg_pool2d(fs, (th, th))
    elif sh < th:
        ft = F.adaptive_avg_pool2d(ft, (sh, sh))

    def q(f):
        a = f.pow(p).mean(1).flatten(1)
        return a / a.norm(dim=1, keepdim=True)

    return (q(fs) - q(ft)).pow(2).mean()


def ref_hint(fs: torch.Tensor, ft: torch.Tensor, conv: nn.Module, bn: nn.BatchNorm2d, beta: float) -> torch.Tensor:
    """mdistiller ConvReg (conv -> BN in training mode -> ReLU), then MSE to the teacher stage."""
    x = fs.double()
    if isinstance(conv, nn.ConvTranspose2d):
        x = F.conv_transpose2d(x, conv.weight.double(), conv.bias.double(), conv.stride, conv.padding)
    else:
        x = F.conv2d(x, conv.weight.double(), conv.bias.double(), conv.stride, conv.padding)
    mean, var = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), unbiased=False, keepdim=True)
    x = (x - mean) / (var + bn.eps).sqrt() * bn.weight.double().view(1, -1, 1, 1) + bn.bias.double().view(1, -1, 1, 1)
    return beta * (x.relu() - ft.double()).pow(2).mean()


# --- logit losses --------------------------------------------------------------------------------

CASES = [(seed, c, temp) for seed in (0, 1, 2) for c in (10, 100) for temp in (1.0, 4.0, 8.0)]


@pytest.mark.parametrize("seed,c,temp", CASES)
def test_kd_value_and_gradient_match_reference(seed, c, temp):
    y = torch.randint(0, c, (16,), generator=torch.Generator().manual_seed(seed))
    s, t = logits(seed, 16, c, y), logits(seed + 100, 16, c, y)
    loss = LOSSES.get("kd")(alpha=1.0, temperature=temp)
    val, (g,) = value_and_grad(lambda x: loss.distill(x, t, y, None, None), s)
    ref, (g_ref,) = value_and_grad(lambda x: ref_kd(x, t, temp), s.double())
    assert rel_err(val, ref) <= RTOL and rel_err(g, g_ref) <= RTOL


@pytest.mark.parametrize("seed,c,temp", CASES)
def test_dkd_value_and_gradient_match_reference(seed, c, temp):
    y = torch.randint(0, c, (16,), generator=torch.Generator().manual_seed(seed))
    s, t = logits(seed, 16, c, y), logits(seed + 100, 16, c, y, margin=2.0)
    loss = LOSSES.get("dkd")(alpha=1.0, temperature=temp, dkd_alpha=1.0, dkd_beta=8.0)
    val, (g,) = value_and_grad(lambda x: loss.distill(x, t, y, None, None), s)
    ref, (g_ref,) = value_and_grad(lambda x: ref_dkd(x, t, y, temp, 1.0, 8.0), s.double())
    assert rel_err(val, ref) <= RTOL and rel_err(g, g_ref) <= RTOL


@pytest.mark.parametrize("margin,temp", [(15.0, 1.0), (20.0, 1.0), (80.0, 4.0)])
@pytest.mark.parametrize("c", [10, 100])
def test_dkd_confident_student_matches_reference(margin, temp, c):
    """1 - p_y must not cancel when the student is sure: the binary part keeps value and gradient."""
    y = torch.randint(0, c, (32,), generator=torch.Generator().manual_seed(3))
    s, t = logits(3, 32, c, y, margin=margin), logits(4, 32, c, y, margin=3.0)
    loss = LOSSES.get("dkd")(alpha=1.0, temperature=temp)
    val, (g,) = value_and_grad(lambda x: loss.distill(x, t, y, None, None), s)
    ref, (g_ref,) = value_and_grad(lambda x: ref_dkd(x, t, y, temp, 1.0, 8.0), s.double())
    assert rel_err(val, ref) <= RTOL, (val.item(), ref.item())
    assert rel_err(g, g_ref) <= RTOL


@pytest.mark.parametrize("epoch,factor", [(0, 0.0), (10, 0.5), (20, 1.0), (30, 1.0)])
def test_dkd_warmup_scales_the_distill_term_like_mdistiller(epoch, factor):
    """mdistiller: min(epoch / warmup, 1) * dkd, warmup 20 by default; CE is never scaled."""
    y = torch.tensor([0, 3, 7, 9])
    s, t = logits(5, 4, 10, y), logits(6, 4, 10, y)
    loss = LOSSES.get("dkd")(ce_weight=1.0, distill_weight=1.0, temperature=4.0)
    assert loss.warmup_epochs == 20
    loss.set_epoch(epoch)
    total, _ = loss(s, t, y)
    expected = F.cross_entropy(s.double(), y) + factor * ref_dkd(s, t, y, 4.0, 1.0, 8.0)
    assert rel_err(total, expected) <= RTOL


def test_trial_loop_feeds_the_warmup_the_epoch(monkeypatch):
    """The loop tells the loss which epoch trains (from 1), so epoch 1 uses 1/warmup of the term."""
    from trainables import loop

    seen = []
    real = LOSSES.get("dkd").set_epoch
    monkeypatch.setattr(LOSSES.get("dkd"), "set_epoch", lambda self, e, epochs=None: (seen.append(e), real(self, e, epochs)))
    cfg = {"dataset": {"name": "synthetic", "kwargs": {"n_train": 96, "n_test": 32, "shape": [3, 8, 8]}}, "student": "cnn_tiny",
           "train": {"epochs": 3, "batch_size": 32, "robust_samples": 0}, "loss": {"name": "dkd", "alpha": 0.0}, "profile": False}
    loop.train_student(cfg, loop.LocalReporter(log_epochs=False))
    assert seen == [1, 2, 3]


@pytest.mark.parametrize("name", ["kd", "dkd"])
def test_explicit_weights_form(name):
    y = torch.tensor([1, 2, 0, 4])
    s, t = logits(7, 4, 5, y), logits(8, 4, 5, y)
    loss = LOSSES.get(name)(ce_weight=1.0, distill_weight=0.25, temperature=4.0, warmup_epochs=0)
    total, parts = loss(s, t, y)
    distill = ref_kd(s, t, 4.0) if name == "kd" else ref_dkd(s, t, y, 4.0, 1.0, 8.0)
    assert rel_err(total, F.cross_entropy(s.double(), y) + 0.25 * distill) <= RTOL
    assert rel_err(parts["kd"], distill) <= RTOL
    # the same loss written with alpha is a different loss: CE:distill = (1 - alpha) : alpha
    mixed, _ = LOSSES.get(name)(alpha=0.2, temperature=4.0, warmup_epochs=0)(s, t, y)
    assert rel_err(mixed, 0.8 * F.cross_entropy(s.double(), y) + 0.2 * distill) <= RTOL


def test_explicit_weights_and_alpha_are_exclusive():
    with pytest.raises(ConfigError, match="exclusive"):
        LOSSES.get("kd")(alpha=0.5, ce_weight=1.0, distill_weight=1.0)
    with pytest.raises(ConfigError, match="exclusive"):
        validate(LossConfig, {"name": "kd", "alpha": 0.5, "ce_weight": 1.0, "distill_weight": 1.0})
    with pytest.raises(ConfigError, match="go together"):
        validate(LossConfig, {"name": "kd", "ce_weight": 1.0})
    cfg = validate(LossConfig, {"name": "dkd", "ce_weight": 1.0, "distill_weight": 1.0})
    assert cfg.alpha is None and cfg.distills and cfg.params()["ce_weight"] == 1.0
    assert validate(LossConfig, {"name": "kd"}).alpha == 0.9
    assert not validate(LossConfig, {"name": "kd", "ce_weight": 1.0, "distill_weight": 0.0}).distills


# --- feature losses --------------------------------------------------------------------------------


@pytest.mark.parametrize("s_hw,t_hw", [(8, 8), (8, 4), (4, 8), (16, 4)])
def test_at_matches_reference_on_equal_and_mismatched_sizes(s_hw, t_hw):
    g = torch.Generator().manual_seed(s_hw * 31 + t_hw)
    fs = [torch.randn(4, 6, s_hw, s_hw, generator=g).relu(), torch.randn(4, 12, s_hw // 2, s_hw // 2, generator=g).relu()]
    ft = [torch.randn(4, 10, t_hw, t_hw, generator=g).relu(), torch.randn(4, 20, t_hw // 2, t_hw // 2, generator=g).relu()]
    loss = LOSSES.get("at")(ce_weight=1.0, distill_weight=1.0)
    val, gs = value_and_grad(lambda a, b: loss.distill(torch.zeros(4, 3), None, None, [a, b], ft), *fs)
    ref, gs_ref = value_and_grad(lambda a, b: 1000.0 * (ref_at_stage(a, ft[0]) + ref_at_stage(b, ft[1])), *(f.double() for f in fs))
    assert rel_err(val, ref) <= RTOL
    for g_, g_ref in zip(gs, gs_ref):
        assert rel_err(g_, g_ref) <= RTOL


def test_at_pool_maps_is_the_documented_alternative():
    g = torch.Generator().manual_seed(0)
    fs, ft = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 5, 4, 4, generator=g)
    maps = LOSSES.get("at")(alpha=1.0, pool="maps").distill(torch.zeros(2, 3), None, None, [fs], [ft])
    q_s = F.normalize(F.adaptive_avg_pool2d(fs.double().pow(2).mean(1, keepdim=True), 4).flatten(1), dim=1)
    q_t = F.normalize(ft.double().pow(2).mean(1).flatten(1), dim=1)
    assert rel_err(maps, 1000.0 * (q_s - q_t).pow(2).mean()) <= RTOL
    feats = LOSSES.get("at")(alpha=1.0).distill(torch.zeros(2, 3), None, None, [fs], [ft])
    assert rel_err(feats, 1000.0 * ref_at_stage(fs, ft)) <= RTOL
    assert abs(maps.item() - feats.item()) > 1e-3  # the two orders are genuinely different losses
    with pytest.raises(ConfigError, match="loss.pool"):
        LOSSES.get("at")(alpha=1.0, pool="sideways")


@pytest.mark.parametrize("s_shape,t_shape,conv_type", [
    ((8, 8, 8), (16, 8, 8), nn.Conv2d),            # equal size: 1x1 conv
    ((8, 8, 8), (16, 4, 4), nn.Conv2d),            # student twice the teacher: 3x3 stride 2
    ((8, 4, 4), (16, 8, 8), nn.ConvTranspose2d),   # student half the teacher: 4x4 stride-2 transposed
    ((8, 6, 6), (16, 4, 4), nn.Conv2d),            # larger: 3x3 valid conv
])
def test_hint_regressor_with_relu_matches_reference(s_shape, t_shape, conv_type):
    g = torch.Generator().manual_seed(11)
    loss = LOSSES.get("hint")(ce_weight=1.0, distill_weight=1.0, beta=100.0, s_shapes=[s_shape], t_shapes=[t_shape], student_stage=0, teacher_stage=0)
    conv, bn, relu = loss.regressor
    assert isinstance(conv, conv_type) and isinstance(relu, nn.ReLU)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=g)
        bn.bias.uniform_(-0.5, 0.5, generator=g)
    fs = torch.randn(8, *s_shape, generator=g).relu()
    ft = torch.randn(8, *t_shape, generator=g).relu()  # post-ReLU hint layers, as in CRD's ResNets
    params = [conv.weight, conv.bias, bn.weight, bn.bias]

    def ours(x, *ps):
        return loss.distill(None, None, None, [x], [ft])

    val = ours(fs.requires_grad_(True))
    grads = torch.autograd.grad(val, [fs, *params])
    fs64 = fs.detach().double().requires_grad_(True)
    ref = ref_hint(fs64, ft, conv, bn, 100.0)
    grads_ref = torch.autograd.grad(ref, [fs64])
    assert rel_err(val, ref) <= RTOL
    assert rel_err(grads[0], grads_ref[0]) <= RTOL
    # regressor parameters: the same reference, differentiated w.r.t. float64 copies of them
    p64 = [p.detach().double().requires_grad_(True) for p in params]
    conv64 = type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding).double()
    conv64.weight, conv64.bias = nn.Parameter(p64[0]), nn.Parameter(p64[1])
    bn64 = nn.BatchNorm2d(bn.num_features).double()
    bn64.weight, bn64.bias = nn.Parameter(p64[2]), nn.Parameter(p64[3])
    ref_p = torch.autograd.grad(ref_hint(fs.detach(), ft, conv64, bn64, 100.0), [conv64.weight, conv64.bias, bn64.weight, bn64.bias])
    # one scale for all: BN cancels the conv bias, so its gradient is ~0 in both and has no scale of its own
    assert rel_err(torch.cat([g_.flatten() for g_ in grads[1:]]), torch.cat([g_.flatten() for g_ in ref_p])) <= RTOL


def test_hint_relu_is_the_default_and_can_be_turned_off():
    shapes = dict(s_shapes=[(4, 4, 4)], t_shapes=[(8, 4, 4)])
    assert isinstance(LOSSES.get("hint")(alpha=1.0, **shapes).regressor[-1], nn.ReLU)
    assert isinstance(LOSSES.get("hint")(alpha=1.0, relu=False, **shapes).regressor[-1], nn.BatchNorm2d)
    assert isinstance(hint_regressor((32,), (64,))[-1], nn.ReLU)


@pytest.mark.parametrize("name", ["at", "hint"])
def test_feature_losses_explicit_weights(name):
    g = torch.Generator().manual_seed(2)
    fs, ft = [torch.randn(4, 4, 4, 4, generator=g).relu()], [torch.randn(4, 8, 4, 4, generator=g).relu()]
    y = torch.tensor([0, 1, 2, 0])
    s = logits(9, 4, 3, y)
    kw = dict(s_shapes=[(4, 4, 4)], t_shapes=[(8, 4, 4)]) if name == "hint" else {}
    loss = LOSSES.get(name)(ce_weight=1.0, distill_weight=1.0, **kw)
    total, parts = loss(s, None, y, fs, ft)
    assert rel_err(total, F.cross_entropy(s.double(), y) + parts["kd"].double()) <= RTOL
