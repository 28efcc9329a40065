"""DIST and logit standardization checked two ways, values and gradients, extreme cases included:

(a) against figures their authors' code produced on the same inputs. The code itself is not kept
    here: benchmarks/reference_figures.py runs it from snapshots of the authors' repositories and
    writes tests/fixtures/reference/{dist,logit_standardization}.npz, which record the repository,
    commit, file and function each figure came from. The inputs are rebuilt here from their seeds
    (a fingerprint in the figures checks that they are the same tensors).
    - DIST: hunto/image_classification_sota @ d9662f7df68fe46b973c4580b7c9b896cedcd301 (the commit
      hunto/DIST_KD pins), lib/models/losses/dist_kd.py, DIST.forward.
    - Logit standardization: sunshangquan/logit-standardization-KD @ f6e5aa5172bad618e801163c3385322eea673754,
      mdistiller/distillers/KD.py kd_loss and DKD.py dkd_loss.
(b) against our own float64 derivation of each paper's formula (below), on every gradient entry;
    the derivation itself is checked against the authors' float64 figures.

The figures hold the authors' value in float32 and float64 and their float64 gradient w.r.t. the
student; the float32 gradient too where it is small (1,600 entries or fewer: the extreme cases).
Gradients over 2,048 entries are kept at a fixed ~1,000 of them (`kept`: every k-th entry, k coprime
to the class count, and every target entry); (b) covers all of them.

Tolerance: 1e-5 relative (float32 under test), or, where float32 itself is the limit (a loss at its
minimum, saturated softmaxes), as close as the authors' own float32 run came to their float64 one.
"""
from __future__ import annotations

import functools
import itertools
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.test_losses_reference import RTOL, logits, ref_dkd, ref_kd, rel_err, value_and_grad
from trainables.config import LossConfig, validate
from trainables.losses import LOSSES
from trainables.registry import ConfigError

# --- the authors' figures --------------------------------------------------------------------------

FIGURES = Path(__file__).resolve().parent / "fixtures" / "reference"
KEEP = 1024  # gradient entries a figure keeps of a gradient over 2 * KEEP entries


def case_key(kind: str, **args) -> str:
    """A case's name in the figures: its kind and the arguments that build its inputs."""
    return kind + ":" + ",".join(f"{k}={v}" for k, v in args.items())


def fingerprint(*inputs: torch.Tensor) -> torch.Tensor:
    """Sum and sum of squares of each input, in float64: whether these are the tensors a figure was made from."""
    return torch.tensor([[x.double().sum().item(), x.double().pow(2).sum().item()] for x in inputs], dtype=torch.float64)


def kept(n: int, c: int, y: torch.Tensor) -> torch.Tensor | None:
    """Flat indices of the gradient entries a figure keeps: all (None) up to 2 * KEEP; past that every
    k-th entry, k the first integer >= n * c / KEEP coprime to c (so every row and every class is hit),
    and each row's target class."""
    if n * c <= 2 * KEEP:
        return None
    k = next(k for k in itertools.count(-(-n * c // KEEP)) if math.gcd(k, c) == 1)
    return torch.cat([torch.arange(0, n * c, k), torch.arange(n) * c + y]).unique()


@functools.cache
def figures(name: str) -> dict[str, torch.Tensor]:
    """tests/fixtures/reference/<name>.npz: entry name -> tensor (its `meta` says where they came from)."""
    with np.load(FIGURES / f"{name}.npz", allow_pickle=False) as z:
        return {k: torch.from_numpy(z[k]) for k in z.files if k != "meta"}


def figure(name: str, case: str, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """One case's figures, once `inputs` are known to be the tensors the reference ran on."""
    prefix = case + "|"
    got = {k[len(prefix):]: v for k, v in figures(name).items() if k.startswith(prefix)}
    assert got, f"{name}.npz has no case {case!r}: rerun benchmarks/reference_figures.py (docs/losses.md)"
    assert torch.allclose(fingerprint(*inputs), got["inputs"], rtol=1e-9, atol=1e-9), f"{case}: not the inputs of the figures"
    return got


# --- our float64 derivations of the papers' formulas -------------------------------------------------


def pearson(a: torch.Tensor, b: torch.Tensor, dim: int, eps: float = 1e-8) -> torch.Tensor:
    """Pearson's r along `dim`: the cosine of the centred vectors. DIST's code adds eps = 1e-8 to the
    product of the norms (the paper's rho has none), which decides r where a column is constant."""
    a, b = a - a.mean(dim, keepdim=True), b - b.mean(dim, keepdim=True)
    return (a * b).sum(dim) / ((a * a).sum(dim).sqrt() * (b * b).sum(dim).sqrt() + eps)


def my_dist(s: torch.Tensor, t: torch.Tensor, temp: float, beta: float, gamma: float) -> torch.Tensor:
    """DIST (Huang et al., NeurIPS 2022): Y = softmax(Z / tau) per row,
    L = tau^2 (beta * mean over rows of (1 - r(Y_s[i], Y_t[i])) + gamma * mean over classes of (1 - r(Y_s[:, j], Y_t[:, j])))."""
    p_s, p_t = F.softmax(s.double() / temp, 1), F.softmax(t.double() / temp, 1)
    inter = (1 - pearson(p_s, p_t, dim=1)).mean()
    intra = (1 - pearson(p_s, p_t, dim=0)).mean()
    return temp**2 * (beta * inter + gamma * intra)


def zscore(z: torch.Tensor) -> torch.Tensor:
    """Logit standardization (Sun et al., CVPR 2024): each row minus its mean, over its standard deviation (unbiased, as
    torch.std; the code adds 1e-7 to it, so a constant row becomes all zeros)."""
    z = z.double()
    return (z - z.mean(1, keepdim=True)) / (z.std(1, keepdim=True) + 1e-7)


def my_kd(s: torch.Tensor, t: torch.Tensor, temp: float, standardize: bool) -> torch.Tensor:
    return ref_kd(zscore(s), zscore(t), temp) if standardize else ref_kd(s, t, temp)


# --- the checks ------------------------------------------------------------------------------------

CASES = [(seed, n, c, temp) for seed in (0, 1) for n, c in ((16, 10), (64, 100), (4, 1000)) for temp in (1.0, 4.0)]
BETA_GAMMA = [(1.0, 1.0), (2.0, 0.5)]
DIST_EXTREMES = ["confident teacher", "confident student", "student equals teacher", "batch of two", "huge logits"]
KD_EXTREMES = ["confident teacher", "confident student", "constant student", "huge logits"]


def case_inputs(seed: int, n: int, c: int, **teacher) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student and teacher logits and labels of one of CASES (`teacher`: margin or scale of its logits)."""
    y = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(seed))
    return logits(seed, n, c, y), logits(seed + 100, n, c, y, **teacher), y


def dist_extreme(case: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, c = 16, 100
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
    return s, t, y


def kd_extreme(case: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, c = 16, 100
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
    return s, t, y


def check(name: str, case: str, ours, mine, s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
    """Our float32 loss, value and gradient w.r.t. the student `s`, (a) against the authors' figures:
    within RTOL of their float32 run and of their float64 one, or as close as their float32 run comes
    to it where float32 itself is the limit; (b) against `mine`, our float64 derivation, on every
    entry, as close; and the derivation within RTOL of the authors' float64 figures."""
    fig = figure(name, case, s, t, y)
    val, (g,) = value_and_grad(ours, s)
    val64, (g64,) = value_and_grad(mine, s.double())
    lim_v = max(RTOL, 1.5 * rel_err(fig["value32"], fig["value64"]))
    lim_g = max(RTOL, 1.5 * fig["grad_e32"].item())
    idx = kept(*s.shape, y)

    def vs_fig(grad: torch.Tensor) -> float:  # rel_err over the kept entries, scaled by the whole gradient's largest
        part, ref = grad.flatten() if idx is None else grad.flatten()[idx], fig["grad64"].flatten()
        assert part.shape == ref.shape, f"{case}: the figures keep other entries: rerun benchmarks/reference_figures.py"
        return ((part.double() - ref.double()).abs().max() / fig["grad_max"]).item()

    assert rel_err(val, fig["value32"]) <= RTOL, (val.item(), fig["value32"].item())
    assert rel_err(val, fig["value64"]) <= lim_v, (val.item(), fig["value64"].item())
    assert vs_fig(g) <= lim_g
    if "grad32" in fig:
        assert rel_err(g, fig["grad32"]) <= RTOL
    assert rel_err(val, val64) <= lim_v and rel_err(g, g64) <= lim_g, (val.item(), val64.item())
    assert rel_err(val64, fig["value64"]) <= RTOL and vs_fig(g64) <= RTOL, (val64.item(), fig["value64"].item())


@pytest.mark.parametrize("seed,n,c,temp", CASES)
@pytest.mark.parametrize("beta,gamma", BETA_GAMMA)
def test_dist_matches_the_authors_code(seed, n, c, temp, beta, gamma):
    s, t, y = case_inputs(seed, n, c)
    loss = LOSSES.get("dist")(alpha=1.0, temperature=temp, beta=beta, gamma=gamma)
    check("dist", case_key("dist", seed=seed, n=n, c=c, T=temp, beta=beta, gamma=gamma),
          lambda x: loss.distill(x, t, y, None, None), lambda x: my_dist(x, t, temp, beta, gamma), s, t, y)


@pytest.mark.parametrize("case", DIST_EXTREMES)
def test_dist_extreme_cases_match_the_authors_code(case):
    s, t, y = dist_extreme(case)
    loss = LOSSES.get("dist")(alpha=1.0, temperature=1.0)
    check("dist", case_key("dist", case=case), lambda x: loss.distill(x, t, y, None, None),
          lambda x: my_dist(x, t, 1.0, 1.0, 1.0), s, t, y)


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
    s, t, y = case_inputs(seed, n, c, scale=8.0)
    loss = LOSSES.get("kd")(alpha=1.0, temperature=temp, standardize_logits=True)
    check("logit_standardization", case_key("kd", stand=True, seed=seed, n=n, c=c, T=temp),
          lambda x: loss.distill(x, t, y, None, None), lambda x: my_kd(x, t, temp, True), s, t, y)
    plain = LOSSES.get("kd")(alpha=1.0, temperature=temp)  # the flag off: their kd_loss is mdistiller's
    check("logit_standardization", case_key("kd", stand=False, seed=seed, n=n, c=c, T=temp),
          lambda x: plain.distill(x, t, y, None, None), lambda x: my_kd(x, t, temp, False), s, t, y)


@pytest.mark.parametrize("seed,n,c,temp", CASES)
def test_standardized_dkd_matches_the_authors_code(seed, n, c, temp):
    s, t, y = case_inputs(seed, n, c, margin=2.0)
    loss = LOSSES.get("dkd")(alpha=1.0, temperature=temp, dkd_alpha=9.0, dkd_beta=72.0, standardize_logits=True)
    check("logit_standardization", case_key("dkd", stand=True, seed=seed, n=n, c=c, T=temp),
          lambda x: loss.distill(x, t, y, None, None), lambda x: ref_dkd(zscore(x), zscore(t), y, temp, 9.0, 72.0), s, t, y)


@pytest.mark.parametrize("case", KD_EXTREMES)
def test_standardized_kd_extreme_cases_match_the_authors_code(case):
    s, t, y = kd_extreme(case)
    loss = LOSSES.get("kd")(alpha=1.0, temperature=2.0, standardize_logits=True)
    check("logit_standardization", case_key("kd", stand=True, case=case), lambda x: loss.distill(x, t, y, None, None),
          lambda x: my_kd(x, t, 2.0, True), s, t, y)


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
    from trainables.schema import Ramp

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
        expected = (1 - alpha) * F.cross_entropy(s.double(), y) + alpha * ref_kd(s, t, temp)
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
