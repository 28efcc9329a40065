"""Every loss against a hand-computed reference on fixed tensors."""
import math

import pytest
import torch
import torch.nn.functional as F

from trainables.losses import LOSSES, build_loss
from trainables.models import create_model
from trainables.registry import ConfigError

S = torch.tensor([[2.0, 1.0, 0.1], [0.5, 2.5, -1.0]])
T = torch.tensor([[1.5, 0.5, 0.0], [0.0, 3.0, 0.5]])
Y = torch.tensor([0, 1])


def softmax(row, t):
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def ce_ref(logits, y):
    return sum(-math.log(softmax(r, 1.0)[c]) for r, c in zip(logits.tolist(), y.tolist())) / len(y)


def kl_ref(s, t, temp):
    total = 0.0
    for rs, rt in zip(s.tolist(), t.tolist()):
        ps, pt = softmax(rs, temp), softmax(rt, temp)
        total += sum(b * math.log(b / a) for a, b in zip(ps, pt))
    return total / len(s)


@pytest.mark.parametrize("temp,alpha", [(1.0, 0.5), (4.0, 0.9), (2.5, 1.0)])
def test_kd_matches_hand_reference(temp, alpha):
    loss, parts = LOSSES.get("kd")(alpha=alpha, temperature=temp)(S, T, Y)
    expected = alpha * temp**2 * kl_ref(S, T, temp) + (1 - alpha) * ce_ref(S, Y)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert parts["kd"].item() == pytest.approx(temp**2 * kl_ref(S, T, temp), rel=1e-5)


def test_alpha_zero_is_exactly_cross_entropy_and_needs_no_teacher():
    for name in ("kd", "dkd"):
        loss, parts = LOSSES.get(name)(alpha=0.0, temperature=3.0)(S, None, Y)
        assert torch.equal(loss, F.cross_entropy(S, Y))
        assert parts["kd"].item() == 0.0


def test_kd_gradient_has_t_squared_scale():
    """With the T^2 factor the soft-target gradient tends to ((s - mean s) - (t - mean t)) / (N * B)
    as T grows (Hinton 2015, sec. 2.1); without it, it would shrink like 1/T^2."""
    s = S.clone().requires_grad_(True)
    LOSSES.get("kd")(alpha=1.0, temperature=100.0)(s, T, Y)[0].backward()
    limit = ((S - S.mean(1, keepdim=True)) - (T - T.mean(1, keepdim=True))) / (S.shape[1] * S.shape[0])
    assert torch.allclose(s.grad, limit, rtol=0.02, atol=1e-3)


def test_dkd_matches_hand_reference():
    temp, a, b = 2.0, 1.0, 8.0
    tckd = nckd = 0.0
    for rs, rt, c in zip(S.tolist(), T.tolist(), Y.tolist()):
        ps, pt = softmax(rs, temp), softmax(rt, temp)
        bs, bt = [ps[c], 1 - ps[c]], [pt[c], 1 - pt[c]]
        tckd += sum(q * math.log(q / p) for p, q in zip(bs, bt))
        rest = [i for i in range(3) if i != c]
        qs = softmax([rs[i] for i in rest], temp)
        qt = softmax([rt[i] for i in rest], temp)
        nckd += sum(q * math.log(q / p) for p, q in zip(qs, qt))
    expected = temp**2 * (a * tckd + b * nckd) / 2
    loss, parts = LOSSES.get("dkd")(alpha=1.0, temperature=temp, dkd_alpha=a, dkd_beta=b, warmup_epochs=0)(S, T, Y)
    assert parts["kd"].item() == pytest.approx(expected, rel=1e-4)
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_at_matches_hand_reference():
    g = torch.Generator().manual_seed(0)
    fs = [torch.randn(2, 3, 4, 4, generator=g)]
    ft = [torch.randn(2, 5, 4, 4, generator=g)]

    def att(f):
        a = (f**2).mean(1).flatten(1)
        return a / a.norm(dim=1, keepdim=True)

    expected = 1000.0 * ((att(fs[0]) - att(ft[0])) ** 2).mean().item()
    loss, parts = LOSSES.get("at")(alpha=0.5, beta=1000.0)(S, T, Y, fs, ft)
    assert parts["kd"].item() == pytest.approx(expected, rel=1e-5)
    assert loss.item() == pytest.approx(0.5 * expected + 0.5 * ce_ref(S, Y), rel=1e-5)


def test_hint_is_mse_of_regressed_student_stage():
    student = create_model("cnn_tiny", 3, (1, 8, 8))
    teacher = create_model("cnn_small", 3, (1, 8, 8))
    loss_fn = build_loss("hint", {"alpha": 1.0, "beta": 2.0}, student, teacher, (1, 8, 8))
    x = torch.randn(4, 1, 8, 8)
    fs, ft = student.forward_features(x), teacher.forward_features(x)
    loss_fn.eval()
    expected = 2.0 * F.mse_loss(loss_fn.regressor(fs[loss_fn.s_idx]), ft[loss_fn.t_idx]).item()
    loss, _ = loss_fn(S[:1].repeat(4, 1), T[:1].repeat(4, 1), Y[:1].repeat(4), fs, ft)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", ["kd", "dkd", "at", "hint"])
def test_gradients_reach_only_student_and_loss_parameters(name):
    student = create_model("cnn_tiny", 3, (1, 8, 8))
    teacher = create_model("cnn_small", 3, (1, 8, 8))
    loss_fn = build_loss(name, {"alpha": 0.7, "temperature": 3.0}, student, teacher, (1, 8, 8))
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    s_logits, s_feats = student(x, with_features=True)
    t_logits, t_feats = teacher(x, with_features=True)
    loss, _ = loss_fn(s_logits, t_logits, y, s_feats, t_feats)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters() if p.requires_grad)
    for p in loss_fn.parameters():
        assert p.grad is not None


def test_bad_loss_inputs_are_config_errors():
    with pytest.raises(ConfigError, match="loss.temperature"):
        LOSSES.get("kd")(alpha=0.5, temperature=0.0)
    with pytest.raises(ConfigError, match="loss.alpha"):
        LOSSES.get("kd")(alpha=1.5)
    with pytest.raises(ConfigError, match=r"loss.name.*\['at', 'cosine', 'dist', 'dkd', 'fkl', 'hint', 'jsd', 'kd', 'rkl', 'skl', 'srkl', 'tinybert', 'tvd'\]"):
        LOSSES.get("fitnet")
    with pytest.raises(ConfigError, match="does not take"):
        build_loss("kd", {"alpha": 0.5, "beta": 3})
