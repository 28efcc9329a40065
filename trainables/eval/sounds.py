"""Corruptions of spoken clips, the audio task's robustness suite: additive white noise at a
signal-to-noise ratio, a time shift, and gain that clips. Each maps float waveforms in [-1, 1],
(B, samples), to the same range, and is a pure function of (clips, severity, generator), as the
image corruptions (eval/corruptions.py) are."""
from __future__ import annotations

import torch
from torch import Tensor

from trainables.eval.corruptions import SEVERITIES, Corruption, _level
from trainables.registry import Registry

SOUNDS: Registry[Corruption] = Registry("audio corruption", "corruption")


@SOUNDS.register
def noise(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    """White noise at 30, 20, 10, 5, 0 dB SNR (relative to each clip's power)."""
    snr_db = _level((30.0, 20.0, 10.0, 5.0, 0.0), severity)
    rms = x.pow(2).mean(dim=1, keepdim=True).sqrt()
    return (x + rms * 10 ** (-snr_db / 20) * torch.randn(x.shape, generator=g, device=x.device)).clamp(-1, 1)


@SOUNDS.register
def shift(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    """The clip moved earlier or later (a random side per clip) by 5 to 30 % of its length, zero-filled."""
    frac = _level((0.05, 0.1, 0.15, 0.2, 0.3), severity)
    n = x.shape[1]
    k = max(1, round(frac * n))
    sign = torch.randint(0, 2, (x.shape[0], 1), generator=g, device=x.device).bool()
    later = torch.nn.functional.pad(x, (k, 0))[:, :n]
    earlier = torch.nn.functional.pad(x, (0, k))[:, k:]
    return torch.where(sign, later, earlier)


@SOUNDS.register
def gain(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    """Amplified by 6 to 24 dB and clipped to [-1, 1] (an overdriven microphone)."""
    db = _level((6.0, 10.0, 14.0, 18.0, 24.0), severity)
    return (x * 10 ** (db / 20)).clamp(-1, 1)


def corrupt_clips(x: Tensor, name: str, severity: int, seed: int) -> Tensor:
    g = torch.Generator(device=x.device).manual_seed(seed * 1009 + SEVERITIES.index(severity) * 97 + SOUNDS.names().index(name))
    return SOUNDS.get(name)(x.float(), severity, g)
