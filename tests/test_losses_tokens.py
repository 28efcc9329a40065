"""Token-level divergences for causal-LM distillation (trainables/losses/tokens.py), checked two ways
on the same seeded tensors, values and gradients w.r.t. the student's logits:

(a) against figures of their authors' code (tests/fixtures/reference/{trl,distillm,torchtune}.npz,
    made by benchmarks/reference_figures.py from snapshots kept outside this repository; a fingerprint
    checks that they are these tensors):
    - TRL: huggingface/trl @ f2cd57710ae345ea6428ae95363267fcf38a3dc8,
      trl/experimental/gkd/gkd_trainer.py, GKDTrainer.generalized_jsd_loss (beta 0, 0.1, 0.5, 0.9, 1);
    - DistiLLM: jongwooko/distillm @ d47e77ff9d27721783b32213be38c1204230cc0a, distillm/losses.py:
      forward_kl, reverse_kl, js_distance, tv_distance, skewed_forward_kl, skewed_reverse_kl;
    - torchtune: pytorch/torchtune @ bd2a0fc7c31430972728494fa01aaeeb0ebf1ba1,
      torchtune/modules/loss/kd_losses.py: ForwardKLLoss, ReverseKLLoss.
(b) against our own float64 derivation of each formula from probabilities (below).

Within 1e-5 of the reference's largest magnitude (`rel_err`, as tests/test_losses_reference.py):
padding, T = 1 and 2, a vocabulary of 50,257, a confident teacher, a padded vocabulary (-inf
logits), no token kept. DistiLLM's and torchtune's forward and skew KL are cross-entropies (they
leave out the teacher's entropy, a constant for the student): their values are compared after
subtracting that entropy, computed here in float64; their gradients as they are. The figures keep
gradients of up to 512 entries whole, of more about 256 fixed entries (and every position's teacher
argmax); the derivation is compared on every entry.

Precision: TRL's code runs in float64 as well, and ours is held to those figures at 1e-5. DistiLLM's
and torchtune's cast to float32, which at a 50k vocabulary is itself up to ~2e-4 from the exact
gradient: there ours is held to 1e-5 of our derivation, and theirs to the derivation at 1e-3 (the
figures and the derivation compute the same thing). With -inf logits their gradients are NaN (the
log of a zero probability, masked only after it is taken): the values are compared there.

Last, the teacher cache's top-k targets read per token: with the rest shaped as the student's, every
divergence is the one over k + 1 buckets; with k the vocabulary, the dense target to fp16 precision.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

from tests.test_losses_modern import figures  # the one reader of tests/fixtures/reference/*.npz
from tests.test_losses_reference import rel_err
from trainables.losses.tokens import DIVERGENCES, per_token, tempered, token_divergence

RTOL = 1e-5
KEEP = 256


# --- the tests' inputs (the reference script imports these) -------------------------------------


def _batch(seed: int, n: int, length: int, vocab: int, pads: list[int], scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, length, vocab, generator=g) * scale
    t = torch.randn(n, length, vocab, generator=g) * scale
    labels = torch.randint(0, vocab, (n, length), generator=g)
    for row, pad in enumerate(pads):
        if pad:
            labels[row, length - pad:] = -100
    return s, t, labels


@functools.cache
def token_cases() -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]:
    """case -> (student logits, teacher logits, labels with -100 where a token does not count, T)."""
    cases = {}
    s, t, y = _batch(0, 3, 6, 64, pads=[0, 2, 4])
    cases["padded, T=1"], cases["padded, T=2"] = (s, t, y, 1.0), (s, t, y, 2.0)
    s, t, y = _batch(1, 2, 3, 50257, pads=[0, 1])
    cases["vocab 50257, T=1"], cases["vocab 50257, T=2"] = (s, t, y, 1.0), (s, t, y, 2.0)
    s, t, y = _batch(2, 2, 4, 64, pads=[0, 1])
    top = t.argmax(-1, keepdim=True)
    t = t.scatter(-1, top, t.gather(-1, top) + 30.0)  # the teacher's top token 30+ above the rest: p ~ 1 - 1e-12
    cases["confident teacher, T=1"], cases["confident teacher, T=2"] = (s, t, y, 1.0), (s, t, y, 2.0)
    s, t, y = _batch(3, 2, 4, 64, pads=[0, 1])
    s[..., -5:] = float("-inf")  # a vocabulary padded to a multiple: rows no token uses
    t[..., -5:] = float("-inf")
    cases["padded vocabulary (-inf), T=1"] = (s, t, y, 1.0)
    s, t, y = _batch(4, 2, 3, 64, pads=[3, 3])
    cases["no token kept, T=1"] = (s, t, y, 1.0)
    return cases


# the cases each reference runs on: TRL turns -inf logits into NaN (0 * inf), DistiLLM divides by a count of 0
TRL_CASES = [c for c in token_cases() if "-inf" not in c]
DISTILLM_CASES = [c for c in token_cases() if "no token" not in c]
TORCHTUNE_CASES = list(token_cases())

TRL_BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)
DISTILLM_LAMS = (0.1, 0.5, 0.9)  # js_distance's lam is 1 - beta; the skew KLs' lam is our skew
DISTILLM = {  # function -> (our kind, our keyword, whether its value leaves out the teacher's entropy)
    "forward_kl": ("fkl", {}, True),
    "reverse_kl": ("rkl", {}, False),
    "tv_distance": ("tvd", {}, False),
    **{f"js_distance(lam={lam})": ("jsd", {"beta": 1.0 - lam}, False) for lam in DISTILLM_LAMS},
    **{f"skewed_forward_kl(lam={lam})": ("skl", {"skew": lam}, True) for lam in DISTILLM_LAMS},
    **{f"skewed_reverse_kl(lam={lam})": ("srkl", {"skew": lam}, False) for lam in DISTILLM_LAMS},
}
TORCHTUNE = {"ForwardKLLoss": ("fkl", {}, True), "ReverseKLLoss": ("rkl", {}, False)}


def kept(shape: tuple[int, ...], teacher: torch.Tensor) -> torch.Tensor | None:
    """Flat indices of the gradient entries a figure keeps: all (None) up to 2 * KEEP; past that every
    k-th entry (k coprime to the vocabulary, so every token id is hit across positions) and each
    position's teacher argmax."""
    n, vocab = math.prod(shape), shape[-1]
    if n <= 2 * KEEP:
        return None
    k = next(k for k in range(-(-n // KEEP), n) if math.gcd(k, vocab) == 1)
    argmax = teacher.reshape(-1, vocab).argmax(-1) + torch.arange(n // vocab) * vocab
    return torch.cat([torch.arange(0, n, k), argmax]).unique()


def fingerprint(*inputs: torch.Tensor) -> torch.Tensor:
    """Sum and sum of squares of each input's finite entries, in float64."""
    rows = []
    for x in inputs:
        x = x.double()
        x = x[torch.isfinite(x)]
        rows.append([x.sum().item(), x.pow(2).sum().item()])
    return torch.tensor(rows, dtype=torch.float64)


def figure(name: str, case: str, entry: str) -> dict[str, torch.Tensor]:
    s, t, y, _ = token_cases()[case]
    prefix = f"{case}|{entry}|"
    got = {k[len(prefix):]: v for k, v in figures(name).items() if k.startswith(prefix)}
    assert got, f"{name}.npz has no {case!r} {entry!r}: rerun benchmarks/reference_figures.py (docs/losses.md)"
    assert torch.allclose(fingerprint(s, t, y), figures(name)[f"{case}|inputs"], rtol=1e-9, atol=1e-9), f"{case}: not the figures' inputs"
    return got


# --- ours, and our float64 derivation ------------------------------------------------------------


def ours(kind: str, case: str, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Our value and gradient w.r.t. the student's logits, in float32."""
    s, t, y, temp = token_cases()[case]
    s = s.clone().requires_grad_(True)
    value = token_divergence(kind, s, t, y != -100, temperature=temp, **kw)
    return value.detach(), torch.autograd.grad(value, s)[0]


def derived(kind: str, s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, temp: float, beta: float = 0.5, skew: float = 0.1) -> torch.Tensor:
    """Each formula from probabilities in float64, over the vocabulary entries finite on both sides."""
    live = torch.isfinite(s[0, 0]) & torch.isfinite(t[0, 0])
    p_s = torch.softmax(s[..., live].double() / temp, -1)
    p_t = torch.softmax(t[..., live].double() / temp, -1)

    def kl(p, q):
        return (p * (p.log() - q.log())).sum(-1)

    if kind == "fkl":
        d = kl(p_t, p_s)
    elif kind == "rkl":
        d = kl(p_s, p_t)
    elif kind == "jsd":
        m = beta * p_t + (1 - beta) * p_s
        d = kl(p_t, p_s) if beta == 0 else kl(p_s, p_t) if beta == 1 else beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)
    elif kind == "skl":
        d = kl(p_t, skew * p_t + (1 - skew) * p_s)
    elif kind == "srkl":
        d = kl(p_s, (1 - skew) * p_t + skew * p_s)
    elif kind == "tvd":
        d = 0.5 * (p_t - p_s).abs().sum(-1)
    mask = (y != -100).double()
    return (d * mask).sum() / mask.sum().clamp_min(1.0)


def derived_grad(kind: str, case: str, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    s, t, y, temp = token_cases()[case]
    s = s.double().requires_grad_(True)
    value = derived(kind, s, t, y, temp, **kw)
    return value.detach(), torch.autograd.grad(value, s)[0]


def teacher_entropy(case: str) -> float:
    """The masked mean of H(teacher at T), float64: what a cross-entropy form adds to the KL."""
    _, t, y, temp = token_cases()[case]
    live = torch.isfinite(t[0, 0])
    logp = torch.log_softmax(t[..., live].double() / temp, -1)
    h = -(logp.exp() * logp).sum(-1)
    mask = (y != -100).double()
    return ((h * mask).sum() / mask.sum().clamp_min(1.0)).item()


def compare(value: torch.Tensor, grad: torch.Tensor, ref: dict[str, torch.Tensor], bits: int, offset: float = 0.0) -> tuple[float, float]:
    """(value error, gradient error) against a figure run in float`bits`: the gradient at its kept entries."""
    at = ref.get("kept")
    g = grad.reshape(-1)[at] if at is not None else grad.reshape(-1)
    r_value = ref[f"value{bits}"].double().item() - offset
    e_value = abs(value.double().item() - r_value) / max(abs(r_value), 1e-30) if r_value or value.item() else 0.0
    r_grad = ref[f"grad{bits}"].reshape(-1)
    return e_value, rel_err(g, r_grad) if r_grad.abs().max() > 0 or g.abs().max() > 0 else 0.0


def assert_matches_float32_code(name: str, case: str, entry: str, kind: str, kw: dict, cross_entropy: bool) -> None:
    """Ours against a figure of float32-only code: at 1e-5; where float32 itself is further than that
    from the exact figure, ours at 1e-5 of the derivation and theirs at 1e-3 of it."""
    ref = figure(name, case, entry)
    value, grad = ours(kind, case, **kw)
    offset = teacher_entropy(case) if cross_entropy else 0.0
    e_value, e_grad = compare(value, grad, ref, 32, offset)
    if torch.isnan(ref["grad32"]).any():  # their -inf case: values only (the gradient is NaN there, see above)
        assert "-inf" in case and kind != "fkl" and e_value <= RTOL, (e_value, case, kind)
        return
    if e_value <= RTOL and e_grad <= RTOL:
        return
    exact_value, exact_grad = derived_grad(kind, case, **kw)
    exact_grad = exact_grad.reshape(-1)[ref["kept"]] if "kept" in ref else exact_grad.reshape(-1)
    theirs = (abs(ref["value32"].item() - offset - exact_value.item()) / abs(exact_value.item()), rel_err(ref["grad32"], exact_grad))
    assert max(theirs) > RTOL / 2, (e_value, e_grad, theirs)  # only float32's own limit excuses a miss
    ours_exact = (rel_err(value, exact_value), rel_err(grad, derived_grad(kind, case, **kw)[1]))
    assert max(theirs) <= 1e-3 and max(ours_exact) <= RTOL, (theirs, ours_exact)


KW_CASES = [(kind, kw) for kind in DIVERGENCES for kw in ([{"beta": b} for b in TRL_BETAS] if kind == "jsd" else
                                                          [{"skew": v} for v in DISTILLM_LAMS] if kind in ("skl", "srkl") else [{}])]


@pytest.mark.parametrize("case", list(token_cases()))
@pytest.mark.parametrize("kind,kw", KW_CASES, ids=lambda v: str(v) if not isinstance(v, dict) else ",".join(f"{k}={x}" for k, x in v.items()) or "-")
def test_each_divergence_matches_its_float64_derivation(kind, kw, case):
    value, grad = ours(kind, case, **kw)
    ref_value, ref_grad = derived_grad(kind, case, **kw)
    assert torch.isfinite(grad).all()
    if "no token" in case:
        assert value.item() == 0.0 == ref_value.item() and grad.abs().max() == 0
        return
    assert rel_err(value, ref_value) <= RTOL and rel_err(grad, ref_grad) <= RTOL


@pytest.mark.parametrize("case", TRL_CASES)
@pytest.mark.parametrize("beta", TRL_BETAS)
def test_jsd_matches_trl_generalized_jsd_loss(beta, case):
    ref = figure("trl", case, f"generalized_jsd_loss(beta={beta})")
    value, grad = ours("jsd", case, beta=beta)
    e_value, e_grad = compare(value, grad, ref, 64)
    assert e_value <= RTOL and e_grad <= RTOL, (e_value, e_grad)
    # our float64 derivation is the authors' float64 figure (the derivation is what the float32-only references lean on)
    d_value, _ = derived_grad("jsd", case, beta=beta)
    assert abs(d_value.item() - ref["value64"].item()) <= 1e-9 * max(abs(ref["value64"].item()), 1.0)


@pytest.mark.parametrize("case", DISTILLM_CASES)
@pytest.mark.parametrize("function", list(DISTILLM))
def test_divergences_match_distillm(function, case):
    kind, kw, cross_entropy = DISTILLM[function]
    assert_matches_float32_code("distillm", case, function, kind, kw, cross_entropy)


@pytest.mark.parametrize("case", TORCHTUNE_CASES)
@pytest.mark.parametrize("loss", list(TORCHTUNE))
def test_kls_match_torchtune(loss, case):
    kind, kw, cross_entropy = TORCHTUNE[loss]
    if "no token" in case:  # torchtune returns a constant 0 (no graph); ours is 0 with a zero gradient
        value, grad = ours(kind, case, **kw)
        assert figure("torchtune", case, loss)["value32"].item() == 0.0 == value.item() and grad.abs().max() == 0
        return
    assert_matches_float32_code("torchtune", case, loss, kind, kw, cross_entropy)


WRONG = {  # a deliberately wrong formula for each kind: the checks above must refuse it
    "fkl": lambda s, t, m, T: token_divergence("rkl", s, t, m, temperature=T),                      # direction swapped
    "rkl": lambda s, t, m, T: token_divergence("rkl", s, t, None, temperature=T),                   # padding counted
    "jsd": lambda s, t, m, T: token_divergence("jsd", s, t, m, temperature=T, beta=0.4),             # another beta
    "skl": lambda s, t, m, T: token_divergence("srkl", s, t, m, temperature=T, skew=0.1),            # the other skew
    "srkl": lambda s, t, m, T: token_divergence("srkl", s, t, m, temperature=1.0, skew=0.1),         # T forgotten
    "tvd": lambda s, t, m, T: 2 * token_divergence("tvd", s, t, m, temperature=T),                   # no 1/2
}


@pytest.mark.parametrize("kind", list(WRONG))
def test_a_wrong_formula_fails_the_reference_check(kind):
    """The comparisons have teeth: each wrong variant is refused by the figures it would have to match."""
    case = "padded, T=2"
    function, kw = {"fkl": ("forward_kl", {}), "rkl": ("reverse_kl", {}), "jsd": ("js_distance(lam=0.5)", {}),
                    "skl": ("skewed_forward_kl(lam=0.1)", {}), "srkl": ("skewed_reverse_kl(lam=0.1)", {}), "tvd": ("tv_distance", {})}[kind]
    ref = figure("distillm", case, function)
    offset = teacher_entropy(case) if DISTILLM[function][2] else 0.0
    s, t, y, temp = token_cases()[case]
    s = s.clone().requires_grad_(True)
    wrong = WRONG[kind](s, t, y != -100, temp)
    grad = torch.autograd.grad(wrong, s)[0]
    e_value, e_grad = compare(wrong.detach(), grad, ref, 32, offset)
    assert e_value > 100 * RTOL or e_grad > 100 * RTOL, (e_value, e_grad)
    right_value, right_grad = ours(DISTILLM[function][0], case, **DISTILLM[function][1])  # and the right one passes the same check
    assert max(compare(right_value, right_grad, ref, 32, offset)) <= RTOL


# --- properties --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_equal_distributions_give_zero_and_no_gradient(kind):
    s, _, y, _ = token_cases()["padded, T=1"]
    x = s.clone().requires_grad_(True)
    value = token_divergence(kind, x, s, y != -100)
    grad = torch.autograd.grad(value, x)[0]
    assert abs(value.item()) <= 1e-6 and grad.abs().max() <= 1e-6


def test_the_limits_of_jsd_and_the_skews_are_the_two_kls():
    s, t, y, _ = token_cases()["padded, T=2"]
    s, t = tempered(s, 2.0, torch.float64), tempered(t, 2.0, torch.float64)
    fkl, rkl = per_token("fkl", s, t), per_token("rkl", s, t)
    assert torch.equal(per_token("jsd", s, t, beta=0.0), fkl) and torch.equal(per_token("jsd", s, t, beta=1.0), rkl)
    torch.testing.assert_close(per_token("jsd", s, t, beta=1e-6) / 1e-6, fkl, rtol=1e-2, atol=1e-3)  # GKD: JSD(beta)/beta -> KL(t||s)
    torch.testing.assert_close(per_token("skl", s, t, skew=0.0), fkl)
    torch.testing.assert_close(per_token("srkl", s, t, skew=0.0), rkl)
    assert (per_token("skl", s, t, skew=0.5) < fkl).all()  # skewing bounds the divergence: log(1/skew) at most
    assert (per_token("skl", s, t, skew=0.1) <= math.log(1 / 0.1) + 1e-6).all()
    tvd = per_token("tvd", s, t)
    assert ((tvd >= 0) & (tvd <= 1)).all()


def test_no_kept_token_gives_zero_with_a_gradient_path():
    s, t, y, _ = token_cases()["no token kept, T=1"]
    x = s.clone().requires_grad_(True)
    for kind in DIVERGENCES:
        value = token_divergence(kind, x, t, y != -100)
        (grad,) = torch.autograd.grad(value, x)
        assert value.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


def test_bfloat16_logits_are_compared_in_float32():
    s, t, y, _ = token_cases()["padded, T=1"]
    low = token_divergence("fkl", s.bfloat16(), t.bfloat16(), y != -100)
    assert low.dtype == torch.float32
    assert abs(low.item() - token_divergence("fkl", s.bfloat16().float(), t.bfloat16().float(), y != -100).item()) <= 1e-6


def test_the_teacher_gets_no_gradient_and_bad_parameters_are_refused():
    s, t, y, _ = token_cases()["padded, T=1"]
    t = t.clone().requires_grad_(True)
    token_divergence("jsd", s.clone().requires_grad_(True), t, y != -100).backward()
    assert t.grad is None
    with pytest.raises(ValueError, match="beta must be in"):
        token_divergence("jsd", s, t, beta=1.5)
    with pytest.raises(ValueError, match="skew must be in"):
        token_divergence("skl", s, t, skew=-0.1)
    with pytest.raises(ValueError, match="one of fkl, rkl, jsd"):
        token_divergence("kl", s, t)


# --- per-token top-k targets (the teacher cache's layout, read per token) --------------------------


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("k", [4, 16])
def test_topk_targets_per_token_give_the_divergence_over_k_plus_one_buckets(kind, k):
    """The cache's top-k targets (trainables.teacher_cache: fp16 top-k logits, their indices and the
    rest's fill per temperature) read with the student's shape for the rest: every divergence is then
    the one over k + 1 buckets (the top k, and the rest as one), derived here in float64."""
    from trainables.teacher_cache import FILL_TEMPERATURES, dense, sparse

    s, t, y, temp = token_cases()["padded, T=2"]
    stored = sparse(t, k)
    got = token_divergence(kind, s, dense(stored, t.shape[-1], temp, student=s), y != -100, temperature=temp)

    values, indices = stored["values"].double(), stored["indices"].long()
    fill = stored["fill"].double()[..., FILL_TEMPERATURES.index(temp)]
    rest = t.shape[-1] - k
    t_top = torch.cat([values / temp, (fill / temp + math.log(rest)).unsqueeze(-1)], -1).softmax(-1)  # k + 1 buckets
    p_s = (s.double() / temp).softmax(-1)
    s_top = p_s.gather(-1, indices)
    s_top = torch.cat([s_top, (1 - s_top.sum(-1)).unsqueeze(-1)], -1)
    d = per_token(kind, s_top.log(), t_top.log(), beta=0.5, skew=0.1)
    mask = (y != -100).double()
    expected = (d * mask).sum() / mask.sum()
    assert rel_err(got, expected) <= RTOL


def test_topk_targets_with_k_the_vocabulary_are_the_dense_target_to_fp16_precision():
    from trainables.teacher_cache import bytes_per_view, dense, sparse

    s, t, y, temp = token_cases()["padded, T=2"]
    vocab = t.shape[-1]
    for kind in DIVERGENCES:
        full = token_divergence(kind, s, dense(sparse(t, vocab), vocab, temp, student=s), y != -100, temperature=temp)
        assert rel_err(full, token_divergence(kind, s, t, y != -100, temperature=temp)) <= 2e-3  # fp16's 11 bits on logits ~ 3 * 2
    assert bytes_per_view(50257, None) == 2 * 50257 and bytes_per_view(50257, 32) < bytes_per_view(50257, None) / 300  # per token
