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
    float64 is what the reference checks use, at twice the memory of the (N, L, V) temporaries).

    `lmbda` (GKD's on-policy share, Agarwal et al. 2024; TRL's name): that fraction of training
    batches, drawn by a coin seeded by (trial seed, epoch, batch), trains on continuations the
    student samples (`max_new_tokens` at `sample_temperature`, one full forward a token), scored by
    the teacher online: there the loss is the divergence over the sampled tokens alone (no labels
    to take CE against), weighted as the distillation term is."""

    reads = "tokens"
    kind = "fkl"

    def __init__(self, alpha: float | None = None, temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1,
                 precision: str = "float32", lmbda: float = 0.0, max_new_tokens: int = 16, sample_temperature: float = 1.0,
                 **weights) -> None:
        super().__init__(alpha, temperature, **weights)
        self.check_params({"beta": beta, "skew": skew, "lmbda": lmbda, "precision": precision, "max_new_tokens": max_new_tokens,
                           "sample_temperature": sample_temperature})
        self.beta, self.skew, self.dtype = float(beta), float(skew), PRECISIONS[precision]
        self.lmbda, self.max_new_tokens, self.sample_temperature = float(lmbda), int(max_new_tokens), float(sample_temperature)

    @classmethod
    def check_params(cls, params: dict) -> None:
        for key in ("beta", "skew", "lmbda"):
            value = params.get(key, 0.0)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"`loss.{key}` must lie in [0, 1], but got loss.{key}={value}")
        if params.get("precision", "float32") not in PRECISIONS:
            raise ConfigError(f"`loss.precision` must be one of {list(PRECISIONS)}, but got loss.precision={params['precision']!r}")
        new, temp = params.get("max_new_tokens", 16), params.get("sample_temperature", 1.0)
        if not (isinstance(new, int) and new >= 1) or not temp > 0:
            raise ConfigError(f"`loss.max_new_tokens >= 1` (an integer) and `loss.sample_temperature > 0` must hold, but got "
                              f"loss.max_new_tokens={new}, loss.sample_temperature={temp}")

    @torch.no_grad()
    def rollout(self, student: torch.nn.Module, x: Tensor, y: Tensor, seed: tuple[int, ...]) -> tuple[Tensor, Tensor] | None:
        """This batch as the student's own samples, or None (a share 1 - lmbda of batches, a control,
        lmbda 0). Each row keeps its first P tokens as the prompt and the student samples up to
        `max_new_tokens` after them: P is the batch's shortest prompt (the first scored position)
        for prompt/response pairs, else the block's length less the tokens sampled. The labels
        score the sampled tokens only."""
        if self.lmbda == 0.0 or self.distill_weight == 0.0:
            return None
        g = torch.Generator().manual_seed(hash(seed) % 2**63)
        if float(torch.rand((), generator=g)) >= self.lmbda:
            return None
        length = x.shape[1]
        scored = (y != IGNORE).float().argmax(1)  # each row's first scored position
        prompt = int(scored.min()) if bool((y[:, 1] == IGNORE).any()) else length - self.max_new_tokens  # pairs: a prompt of 2 tokens or more
        prompt = max(1, min(prompt, length - 1))
        new = min(self.max_new_tokens, length - prompt)
        seq = x[:, :prompt].long()
        mode = student.training
        student.eval()
        for _ in range(new):  # plain sampling, one full forward a token (no cache): cheap at these lengths, costly on long ones
            logits = student(seq)[:, -1].float() / self.sample_temperature
            nxt = torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=g).to(seq.device)
            seq = torch.cat([seq, nxt], 1)
        student.train(mode)
        out = torch.cat([seq, x[:, seq.shape[1]:].long()], 1).to(x.dtype)  # the rest of the block stays, unscored
        labels = torch.full_like(y, IGNORE)
        labels[:, prompt : prompt + new] = seq[:, prompt:]
        return out, labels

    def _divergence(self, s: Tensor, t_logits: Tensor, target: Tensor) -> Tensor:
        """T^2 * D over the scored tokens: `s` the shifted student logits, the teacher's cut to them."""
        t = self.temperature
        return token_divergence(self.kind, s, t_logits[:, : s.shape[1]], target != IGNORE, temperature=t, beta=self.beta, skew=self.skew,
                                dtype=self.dtype) * (t * t)

    def forward(self, s_logits: Tensor, t_logits: Tensor | None, y: Tensor, s_feats=None, t_feats=None, on_policy: bool = False):
        s, target = shifted(s_logits, y)
        if on_policy:  # the student's own samples: the divergence alone, over them
            d = self._divergence(s, t_logits, target)
            return self.distill_weight * self.warmup_factor() * d, {"ce": torch.zeros_like(d.detach()), "kd": d.detach()}
        ce = token_ce(s, target)
        weighted_ce = ce if self.ce_weight == 1.0 else self.ce_weight * ce
        if self.distill_weight == 0.0:  # the no-KD control: exactly next-token CE, no teacher needed
            return weighted_ce, {"ce": ce.detach(), "kd": torch.zeros_like(ce)}
        d = self._divergence(s, t_logits, target)
        return self.distill_weight * self.warmup_factor() * d + weighted_ce, {"ce": ce.detach(), "kd": d.detach()}


for _kind in DIVERGENCES:
    LOSSES.register(type(_kind, (TokenLoss,), {"kind": _kind, "__doc__": f"Token-level {_kind} (trainables.losses.tokens) mixed with "
                                                                            "next-token CE: see TokenLoss.", "__module__": __name__}),
                    name=_kind)
