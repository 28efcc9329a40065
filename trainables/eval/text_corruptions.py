"""Text corruptions, in the place of the image suite for text models: character typos, dropped
words and swapped neighbouring words, at severities 1-3 (the share of words touched), applied to
the raw strings and tokenized again with the model's own tokenizer.

Every corruption is a pure function of (text, severity, random.Random): the same seed gives the
same corrupted set, whatever the model.
"""
from __future__ import annotations

import random
import string
from typing import Callable

import torch
from torch import Tensor

from trainables.registry import Registry

TextCorruption = Callable[[str, int, random.Random], str]
TEXT_CORRUPTIONS: Registry[TextCorruption] = Registry("text corruption", "corruption")
SEVERITIES = (1, 2, 3)
RATES = (0.1, 0.2, 0.35)  # the share of words a corruption touches, by severity


def _rate(severity: int) -> float:
    if severity not in SEVERITIES:
        raise ValueError(f"`1 <= severity <= 3` must hold, but got severity={severity}")
    return RATES[severity - 1]


def _typo(word: str, rng: random.Random) -> str:
    if len(word) < 2:
        return word
    i = rng.randrange(len(word) - 1)
    edit = rng.randrange(4)
    if edit == 0:  # swap two neighbouring characters
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if edit == 1:  # delete one
        return word[:i] + word[i + 1:]
    letter = rng.choice(string.ascii_lowercase)
    if edit == 2:  # insert one
        return word[:i] + letter + word[i:]
    return word[:i] + letter + word[i + 1:]  # replace one


@TEXT_CORRUPTIONS.register
def char_typo(text: str, severity: int, rng: random.Random) -> str:
    """One character edit (swap, delete, insert, replace) in each word chosen with the severity's rate."""
    p = _rate(severity)
    return " ".join(_typo(w, rng) if rng.random() < p else w for w in text.split())


@TEXT_CORRUPTIONS.register
def word_drop(text: str, severity: int, rng: random.Random) -> str:
    """Each word dropped with the severity's rate (at least one kept)."""
    words = text.split()
    p = _rate(severity)
    kept = [w for w in words if rng.random() >= p]
    return " ".join(kept or words[:1])


@TEXT_CORRUPTIONS.register
def word_swap(text: str, severity: int, rng: random.Random) -> str:
    """Neighbouring words swapped, each position chosen with the severity's rate."""
    words = text.split()
    p = _rate(severity)
    i = 0
    while i < len(words) - 1:
        if rng.random() < p:
            words[i], words[i + 1] = words[i + 1], words[i]
            i += 2
        else:
            i += 1
    return " ".join(words)


def corrupt_texts(texts: list[str] | tuple[str, ...], name: str, severity: int, seed: int) -> list[str]:
    """Every text through one corruption at one severity, seeded by (seed, corruption, severity)."""
    rng = random.Random(seed * 1009 + SEVERITIES.index(severity) * 97 + TEXT_CORRUPTIONS.names().index(name))
    fn = TEXT_CORRUPTIONS.get(name)
    return [fn(t, severity, rng) for t in texts]


@torch.no_grad()
def text_robustness(predict_fn: Callable[[Tensor], Tensor], texts: list[str] | tuple[str, ...], y: Tensor, tokenizer: str,
                    max_length: int, seed: int, clean_acc: float) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(summary, table) as trainables.eval.corruptions.robustness gives for images: `corr_<name>`
    (mean over severities), `robust_acc`, `relative_robustness` (robust_acc / clean_acc), and each
    corruption's accuracies at severities 1..3. `predict_fn` maps token ids (N, max_length) of
    `tokenizer` (a folder) to logits."""
    from trainables.hf_files import load_tokenizer

    tok = load_tokenizer(tokenizer)
    y = y.cpu()
    table: dict[str, list[float]] = {}
    for name in TEXT_CORRUPTIONS.names():
        per_sev = []
        for s in SEVERITIES:
            enc = tok(corrupt_texts(texts, name, s, seed), truncation=True, max_length=max_length, padding="max_length",
                      return_attention_mask=False)
            ids = torch.tensor(enc["input_ids"], dtype=torch.int32)
            per_sev.append(float((predict_fn(ids).argmax(1).cpu() == y).float().mean()))
        table[name] = per_sev
    summary = {f"corr_{name}": sum(accs) / len(accs) for name, accs in table.items()}
    summary["robust_acc"] = sum(sum(a) for a in table.values()) / sum(len(a) for a in table.values())
    summary["relative_robustness"] = summary["robust_acc"] / clean_acc if clean_acc > 0 else 0.0
    return summary, table
