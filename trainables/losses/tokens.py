"""Token-level divergences between a teacher's and a student's next-token distributions, for
distilling causal language models: one value per token, averaged over the tokens a mask keeps
(padding and, for prompt/response pairs, the prompt are left out).

Every divergence reads two log-probability tensors over the same support, (..., V), so the same code
serves dense logits (`log_softmax(logits / T)`, `tempered`) and, later, a cached top-k teacher with
its tail mass as one more bucket. Conventions, the ones of the code each is checked against
(tests/test_losses_tokens.py):

- `fkl`: KL(teacher || student), Hinton's term per token. `rkl`: KL(student || teacher) (MiniLLM).
- `jsd`: GKD's generalized Jensen-Shannon divergence (Agarwal et al. 2024, eq. 1, as TRL's
  `generalized_jsd_loss`): beta * KL(t || m) + (1 - beta) * KL(s || m), m = beta * t + (1 - beta) * s;
  beta 0 is `fkl` and beta 1 is `rkl` (TRL's limits: the mixture's divergence itself vanishes there).
- `skl`: skew KL (DistiLLM, Ko et al. 2024): KL(t || skew * t + (1 - skew) * s).
  `srkl`: skew reverse KL: KL(s || (1 - skew) * t + skew * s).
- `tvd`: total variation, 0.5 * sum |t - s|.

A vocabulary entry with an infinite logit on either side (a padded vocabulary row, a banned token)
contributes nothing, as in DistiLLM's and torchtune's code. Values are divergences, zero when the
two distributions agree (DistiLLM's and torchtune's forward and skew KL leave out the teacher's
entropy, a constant for the student: same gradients, values shifted by it). Temperature scaling of
the logits happens before (`tempered`); the T^2 factor of Hinton's objective is the caller's.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

DIVERGENCES = ("fkl", "rkl", "jsd", "skl", "srkl", "tvd")


def tempered(logits: Tensor, temperature: float = 1.0, dtype: torch.dtype = torch.float32) -> Tensor:
    """log softmax(logits / T) in `dtype` (bf16 or fp16 logits lose the tail otherwise)."""
    return torch.log_softmax(logits.to(dtype) / temperature, dim=-1)


def _kl_terms(p_logp: Tensor, q_logp: Tensor, live: Tensor) -> Tensor:
    """Per-token KL(p || q) = sum p (log p - log q) over the entries `live` keeps (their inputs finite)."""
    terms = p_logp.exp() * (p_logp - q_logp)
    return torch.where(live, terms, torch.zeros((), dtype=terms.dtype, device=terms.device)).sum(-1)


def _mixture(a_logp: Tensor, b_logp: Tensor, weight_a: float) -> Tensor:
    """log(w * a + (1 - w) * b), computed from log-probabilities (stable where either underflows)."""
    if weight_a <= 0.0:
        return b_logp
    if weight_a >= 1.0:
        return a_logp
    return torch.logaddexp(a_logp + math.log(weight_a), b_logp + math.log1p(-weight_a))


def per_token(kind: str, student_logp: Tensor, teacher_logp: Tensor, *, beta: float = 0.5, skew: float = 0.1) -> Tensor:
    """The divergence `kind` at every position: (..., V) log-probabilities -> (...)."""
    live = torch.isfinite(student_logp) & torch.isfinite(teacher_logp)
    # dead entries are zeroed before any arithmetic: an inf there would turn the masked-out gradient into NaN
    s = torch.where(live, student_logp, torch.zeros((), dtype=student_logp.dtype, device=student_logp.device))
    t = torch.where(live, teacher_logp, torch.zeros((), dtype=teacher_logp.dtype, device=teacher_logp.device))
    if kind == "jsd" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd's beta must be in [0, 1], got {beta}")
    if kind in ("skl", "srkl") and not 0.0 <= skew <= 1.0:
        raise ValueError(f"{kind}'s skew must be in [0, 1], got {skew}")
    if kind == "fkl" or (kind == "jsd" and beta == 0.0):
        return _kl_terms(t, s, live)
    if kind == "rkl" or (kind == "jsd" and beta == 1.0):
        return _kl_terms(s, t, live)
    if kind == "jsd":
        m = _mixture(t, s, beta)
        return beta * _kl_terms(t, m, live) + (1.0 - beta) * _kl_terms(s, m, live)
    if kind == "skl":
        return _kl_terms(t, _mixture(t, s, skew), live)
    if kind == "srkl":
        return _kl_terms(s, _mixture(s, t, skew), live)
    if kind == "tvd":
        diff = (t.exp() - s.exp()).abs()
        return 0.5 * torch.where(live, diff, torch.zeros((), dtype=diff.dtype, device=diff.device)).sum(-1)
    raise ValueError(f"unknown token divergence {kind!r}: one of {', '.join(DIVERGENCES)}")


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over the positions `mask` keeps (all where None); 0 with a gradient path when it keeps none
    (a batch whose responses were all truncated away)."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def token_divergence(kind: str, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
                     temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1,
                     dtype: torch.dtype = torch.float64) -> Tensor:
    """The mean divergence `kind` over the kept tokens, both sides' logits softened by `temperature`.
    `mask`: (...) true where a token counts (labels != -100); logits (..., V); the value in float32
    (or the logits' wider type). `dtype`: the arithmetic's. float64 by default: over a 50k vocabulary
    float32's softmax backward alone is ~2e-4 off the exact gradient (relative), where these are
    checked to 1e-5; float32 halves the memory of the (..., V) temporaries for large batches."""
    s, t = tempered(student_logits, temperature, dtype), tempered(teacher_logits.detach(), temperature, dtype)
    out = masked_mean(per_token(kind, s, t, beta=beta, skew=skew), mask)
    return out.to(torch.promote_types(student_logits.dtype, torch.float32))
