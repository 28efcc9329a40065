"""Token losses for causal language models: alpha * T^2 * D + (1 - alpha) * CE, per token.

D is one of trainables.losses.tokens' divergences between the teacher's and the student's
next-token distributions, each registered under its name (`loss.name: fkl`, `rkl`, `jsd`, `skl`,
`srkl`, `tvd`) so a sweep searches the method as it searches classification losses. The logits
are (N, L, V) and the labels (N, L), aligned with the inputs (-100 where nothing is scored: the
prompt, padding): the logits at position i are scored against the label at i + 1, as Hugging
Face's causal LMs shift. Both terms average over the scored tokens of the batch; alpha = 0 is
plain next-token CE (the control: no teacher). The temperature defaults to 1, the setting of GKD,
MiniLLM and DistiLLM.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from trainables.losses import LOSSES, DistillLoss
from trainables.losses.tokens import DIVERGENCES, masked_mean, token_divergence
from trainables.registry import ConfigError

IGNORE = -100
PRECISIONS = {"float32": torch.float32, "float64": torch.float64}


def shifted(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(logits at 0..L-2, labels at 1..L-1): each position's prediction and the token it predicts.
    `labels` may be longer than the logits (a model that trimmed padding columns): cut to them."""
    n = logits.shape[1]
    return logits[:, :-1], labels[:, 1:n]


def token_ce(s_logits: Tensor, target: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the scored tokens (0, with a gradient path, when none is)."""
    per = F.cross_entropy(s_logits.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE, reduction="none")
    return masked_mean(per, (target != IGNORE).flatten())


class TokenLoss(DistillLoss):
    """A divergence `kind` per token, mixed with next-token CE by alpha (or the explicit weights).

    `beta`: jsd's teacher weight (TRL's convention: 0 is fkl, 1 is rkl); `skew`: skl/srkl's
    mixture weight (DistiLLM's 0.1). `precision`: the divergence's arithmetic (float32 by default;
    float64 is what the reference checks use, at twice the memory of the (N, L, V) temporaries)."""

    reads = "tokens"
    kind = "fkl"

    def __init__(self, alpha: float | None = None, temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1,
                 precision: str = "float32", **weights) -> None:
        super().__init__(alpha, temperature, **weights)
        for field, value in (("loss.beta", beta), ("loss.skew", skew)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"`{field}` must lie in [0, 1], but got {field}={value}")
        if precision not in PRECISIONS:
            raise ConfigError(f"`loss.precision` must be one of {list(PRECISIONS)}, but got loss.precision={precision!r}")
        self.beta, self.skew, self.dtype = float(beta), float(skew), PRECISIONS[precision]

    def forward(self, s_logits: Tensor, t_logits: Tensor | None, y: Tensor, s_feats=None, t_feats=None):
        s, target = shifted(s_logits, y)
        ce = token_ce(s, target)
        weighted_ce = ce if self.ce_weight == 1.0 else self.ce_weight * ce
        if self.distill_weight == 0.0:  # the no-KD control: exactly next-token CE, no teacher needed
            return weighted_ce, {"ce": ce.detach(), "kd": torch.zeros_like(ce)}
        t = self.temperature
        d = token_divergence(self.kind, s, t_logits[:, : s_logits.shape[1] - 1], target != IGNORE, temperature=t, beta=self.beta,
                             skew=self.skew, dtype=self.dtype) * (t * t)
        return self.distill_weight * self.warmup_factor() * d + weighted_ce, {"ce": ce.detach(), "kd": d.detach()}


for _kind in DIVERGENCES:
    LOSSES.register(type(_kind, (TokenLoss,), {"kind": _kind, "__doc__": f"Token-level {_kind} (trainables.losses.tokens) mixed with "
                                                                            "next-token CE: see TokenLoss.", "__module__": __name__}),
                    name=_kind)
