"""Next-token metrics of a causal LM on a split, streamed batch by batch (a split's (N, L, V) logits
would not fit in memory at a real vocabulary): the scored tokens' NLL and perplexity, next-token
accuracy, and against a teacher its own NLL, top-1 agreement and KL(teacher || student) per token."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100
#: logit elements per evaluation batch (batch x length x vocabulary): 32M floats, 128 MiB in float32
EVAL_ELEMENTS = 2**25


def eval_batch(batch: int, length: int, vocab: int) -> int:
    """An evaluation batch that keeps one batch's logits near EVAL_ELEMENTS (never above `batch`)."""
    return max(1, min(batch, EVAL_ELEMENTS // max(1, length * vocab)))


@torch.no_grad()
def lm_metrics(model: nn.Module, teacher: nn.Module | None, x: Tensor, y: Tensor, batch: int, device: torch.device,
               autocast: Callable = torch.autocast, prefix: str = "val_") -> dict[str, float]:
    """`prefix` + nll, ppl, acc and, with a teacher, agreement, kl_teacher, teacher_nll, teacher_ppl:
    each a mean over the scored tokens (labels != -100, shifted: the logits at i against label i + 1)."""
    models = [m for m in (model, teacher) if m is not None]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # nll, correct, agreement, kl, teacher nll
    count = 0
    for i in range(0, len(x), batch):
        xb, yb = x[i : i + batch].to(device), y[i : i + batch].to(device)
        target = yb[:, 1:]
        keep = target != IGNORE
        if not keep.any():
            continue
        with autocast():
            s = model(xb)[:, :-1].float()
        t_log = s.log_softmax(-1)[keep]
        tgt = target[keep]
        sums[0] += F.nll_loss(t_log, tgt, reduction="sum").double()
        sums[1] += (t_log.argmax(-1) == tgt).sum()
        if teacher is not None:
            with autocast():
                t = teacher(xb)[:, :-1].float()
            t_logp = t.log_softmax(-1)[keep]
            sums[2] += (t_logp.argmax(-1) == t_log.argmax(-1)).sum()
            sums[3] += (t_logp.exp() * (t_logp - t_log)).sum().double()
            sums[4] += F.nll_loss(t_logp, tgt, reduction="sum").double()
        count += int(keep.sum())
    for m, mode in zip(models, modes):
        m.train(mode)
    means = (sums / max(1, count)).tolist()
    out = {"nll": means[0], "ppl": math.exp(min(means[0], 700.0)), "acc": means[1]}
    if teacher is not None:
        out.update(agreement=means[2], kl_teacher=means[3], teacher_nll=means[4], teacher_ppl=math.exp(min(means[4], 700.0)))
    return {prefix + k: v for k, v in out.items()}


@torch.no_grad()
def greedy(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, eos: int | None, device: torch.device) -> list[list[int]]:
    """Each prompt's greedy continuation (token ids), one prompt and one full forward a token at a
    time (no cache: a few short samples an epoch), stopping at `eos`."""
    mode = model.training
    model.eval()
    out = []
    for prompt in prompts:
        seq = torch.tensor([prompt], dtype=torch.long, device=device)
        for _ in range(max_new_tokens):
            nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            if eos is not None and int(nxt) == eos:
                break
        out.append(seq[0, len(prompt):].tolist())
    model.train(mode)
    return out
