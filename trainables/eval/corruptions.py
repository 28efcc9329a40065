"""Common corruptions generated on the device, in the style of CIFAR-10-C / ImageNet-C
(Hendrycks & Dietterich, ICLR 2019): seven corruptions at severities 1-5, no download.

Every corruption maps float images in [0, 1], (B, C, H, W), to the same range, and is a pure
function of (images, severity, generator): the same seed gives the same corrupted set. Severity
constants follow CIFAR-10-C where it defines them.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from trainables.registry import Registry

Corruption = Callable[[Tensor, int, torch.Generator], Tensor]
CORRUPTIONS: Registry[Corruption] = Registry("corruption", "corruption")
SEVERITIES = (1, 2, 3, 4, 5)


def _level(values: tuple, severity: int):
    if severity not in SEVERITIES:
        raise ValueError(f"`1 <= severity <= 5` must hold, but got severity={severity}")
    return values[severity - 1]


@CORRUPTIONS.register
def gaussian_noise(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    sigma = _level((0.04, 0.06, 0.08, 0.09, 0.10), severity)
    return (x + sigma * torch.randn(x.shape, generator=g, device=x.device)).clamp(0, 1)


@CORRUPTIONS.register
def shot_noise(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    photons = _level((500, 250, 100, 75, 50), severity)
    return (torch.poisson(x * photons, generator=g) / photons).clamp(0, 1)


@CORRUPTIONS.register
def gaussian_blur(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    sigma = _level((0.4, 0.6, 0.7, 0.8, 1.0), severity)
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (radius,) * 4, mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c).clamp(0, 1)


@CORRUPTIONS.register
def contrast(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    c = _level((0.75, 0.5, 0.4, 0.3, 0.15), severity)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * c + mean).clamp(0, 1)


@CORRUPTIONS.register
def brightness(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    return (x + _level((0.1, 0.2, 0.3, 0.4, 0.5), severity)).clamp(0, 1)


@CORRUPTIONS.register
def pixelate(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    c = _level((0.95, 0.9, 0.85, 0.75, 0.65), severity)
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, int(h * c)), max(1, int(w * c))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")


@CORRUPTIONS.register
def occlusion(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    """A random grey square per image, its side a growing fraction of the image."""
    frac = _level((0.1, 0.2, 0.3, 0.4, 0.5), severity)
    b, _, h, w = x.shape
    sh, sw = max(1, round(h * frac)), max(1, round(w * frac))
    top = torch.randint(0, h - sh + 1, (b,), generator=g, device=x.device)
    left = torch.randint(0, w - sw + 1, (b,), generator=g, device=x.device)
    rows = torch.arange(h, device=x.device)[None, :, None]
    cols = torch.arange(w, device=x.device)[None, None, :]
    mask = (rows >= top[:, None, None]) & (rows < (top + sh)[:, None, None]) & (cols >= left[:, None, None]) & (cols < (left + sw)[:, None, None])
    return torch.where(mask[:, None], torch.full_like(x, 0.5), x)


def corrupt(x_u8: Tensor, name: str, severity: int, seed: int) -> Tensor:
    """uint8 images -> corrupted float images on the same 0..255 scale (what `normalizer` takes)."""
    g = torch.Generator(device=x_u8.device).manual_seed(seed * 1009 + SEVERITIES.index(severity) * 97 + CORRUPTIONS.names().index(name))
    return CORRUPTIONS.get(name)(x_u8.float() / 255.0, severity, g) * 255.0


@torch.inference_mode()  # its outputs are only counted: cheaper than no_grad
def robustness(predict_fn: Callable[[Tensor], Tensor], x_u8: Tensor, y: Tensor, seed: int, batch: int = 1024,
               clean_acc: float | None = None, suite: Registry | None = None,
               corrupt_fn: Callable[[Tensor, str, int, int], Tensor] = corrupt) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(summary, table): the summary holds `corr_<name>` (mean over severities), `robust_acc` (mean
    over all) and `relative_robustness` (robust_acc / clean acc); the table maps each corruption to
    its accuracies at severities 1..5. `predict_fn` maps 0..255 float images to logits. Another
    kind of input brings its own `suite` (a registry of corruptions) and `corrupt_fn` (what
    `corrupt` is to images; the clean inputs are `x_u8` as float)."""
    table: dict[str, list[float]] = {}
    for name in (suite or CORRUPTIONS).names():
        per_sev = []
        for s in SEVERITIES:
            correct = 0
            for i in range(0, len(y), batch):
                xc = corrupt_fn(x_u8[i : i + batch], name, s, seed + i)
                correct += (predict_fn(xc).argmax(1) == y[i : i + batch]).sum()
            per_sev.append(float(correct) / len(y))
        table[name] = per_sev
    summary = {f"corr_{name}": sum(accs) / len(accs) for name, accs in table.items()}
    summary["robust_acc"] = sum(sum(a) for a in table.values()) / sum(len(a) for a in table.values())
    if clean_acc is None:
        correct = sum(int((predict_fn(x_u8[i : i + batch].float()).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(y), batch))
        clean_acc = correct / len(y)
    summary["relative_robustness"] = summary["robust_acc"] / clean_acc if clean_acc > 0 else 0.0
    return summary, table
