"""Input normalization, defined once: which statistics a model takes (`model_stats`), and the one
operation on raw 0..255 pixels, (x - 255 mean) / (255 std): `Normalize`, which the trial loop, the
teacher cache and the teacher's own inputs use, and `Normalized`, a model with it built in (the
registered MLflow model, the test evaluation and every export take raw pixels)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn as nn
from torch import Tensor

if TYPE_CHECKING:
    from trainables.data import DataSplits

def model_stats(normalize: str, pretrained: bool, arch: str, splits: "DataSplits") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) a model's inputs are normalized with: with `auto` and a weights file on a
    library's model, what that library's weights expect (ImageNet's for torchvision.<name>, the
    model's own pretrained_cfg for timm.<name>); ImageNet's for `imagenet`; else the train split's.
    Grey images get the channel means (the network sees three equal channels)."""
    from trainables.models import zoo_of
    from trainables.models.zoo import IMAGENET_MEAN, IMAGENET_STD

    if not splits.mean:
        return (), ()  # inputs without channel statistics (token ids) take none
    zoo = zoo_of(arch)
    if normalize == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif normalize == "auto" and pretrained and zoo is not None and zoo.stats is not None:
        mean, std = zoo.stats(arch.removeprefix(zoo.prefix))
    else:
        return splits.mean, splits.std
    c = splits.input_shape[0]
    if c == len(mean):
        return tuple(mean), tuple(std)
    return (sum(mean) / len(mean),) * c, (sum(std) / len(std),) * c


class Normalize(nn.Module):
    """uint8 (or float 0..255) images -> float, normalized with channel statistics on the 0..1 scale.
    No statistics (token ids): the input as it is."""

    def __init__(self, mean, std) -> None:
        super().__init__()
        self.identity = len(mean) == 0
        self.register_buffer("offset", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("scale", 1.0 / (torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0))

    def forward(self, x: Tensor) -> Tensor:
        if self.identity:
            return x
        return (x.float() - self.offset) * self.scale


def normalizer(mean, std, device: torch.device | str) -> Callable[[Tensor], Tensor]:
    """`Normalize`'s operation on `device`, as a plain function: the loop calls it every batch,
    without nn.Module's call machinery."""
    if len(mean) == 0:
        return lambda x: x
    return Normalize(mean, std).to(device).forward


class Normalized(nn.Module):
    """A model that takes raw 0..255 images (N, C, H, W) and returns logits: its normalization built in."""

    def __init__(self, model: nn.Module, mean, std) -> None:
        super().__init__()
        self.model = model
        self.normalize = Normalize(mean, std)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(self.normalize(x))
