"""torchvision's classifiers as models (`torchvision.<name>`): built for the dataset, features by layer name."""
from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from trainables.models import FeatureTaps
from trainables.registry import ConfigError


class ZooModel(FeatureTaps, nn.Module):
    """A torchvision classifier built for the dataset: `num_classes` outputs, and grey images fed to
    a 3-channel first layer as three equal channels. Features: the layers named with
    set_feature_layers (`loss.student_layers` / `loss.teacher_layers`)."""

    def __init__(self, arch: str, num_classes: int, input_shape: tuple[int, ...], **kwargs) -> None:
        import torchvision

        super().__init__()
        self.arch = arch
        self.net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
        first = next(m for m in self.net.modules() if isinstance(m, nn.Conv2d))
        if input_shape[0] not in (first.in_channels, 1):
            raise ConfigError(f"`dataset` has {input_shape[0]}-channel images, but torchvision.{arch} takes {first.in_channels}: "
                              "use a 1- or 3-channel dataset")
        self.expand = first.in_channels if input_shape[0] == 1 and first.in_channels != 1 else 0

    def tap_root(self) -> nn.Module:
        return self.net

    def _logits(self, x: Tensor) -> Tensor:
        return self.net(x.expand(-1, self.expand, -1, -1) if self.expand else x)

    def forward(self, x: Tensor, with_features: bool = False):
        if not with_features:
            return self._logits(x)
        if not self.feature_layers:
            raise ConfigError(f"feature losses on torchvision.{self.arch} need layer names: set loss.student_layers / "
                              "loss.teacher_layers (e.g. [layer2, layer3] for ResNets)")
        return self.tapped(x, self._logits)
