"""Models: one registry (`MODELS`, `create_model(name, ...)`), plain nn.Modules with
`forward_features` (per-stage features) and `forward_head`, or any model's layers by name.

Every factory takes `num_classes` and `input_shape` (C, H, W). The built-ins (models/builtin.py)
register on import; torchvision's classifiers are models as `torchvision.<name>` (models/zoo.py).
Beside them: weights files (weights.py), the teacher folder (teacher.py), size and latency
(profile.py).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from trainables.registry import ConfigError, Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model", "model")


#: Any torchvision classification model is a model here as `torchvision.<name>`.
ZOO = "torchvision."


@functools.cache
def zoo_names() -> tuple[str, ...]:
    import torchvision

    return tuple(ZOO + n for n in torchvision.models.list_models(module=torchvision.models))


def check_model(name: str) -> str:
    """`name`, or ValueError (for pydantic, which names the field) unless `name` is a registered model or a torchvision classifier."""
    if name in MODELS or (name.startswith(ZOO) and name in zoo_names()):
        return name
    hint = " or torchvision.<name> for one of torchvision's classification models" if not name.startswith(ZOO) else \
        f" ({len(zoo_names())} torchvision classifiers, e.g. torchvision.resnet18, torchvision.mobilenet_v3_small)"
    raise ValueError(f"must be one of {MODELS.names()}{hint}, but got {name!r}")


def create_model(name: str, num_classes: int, input_shape: tuple[int, ...] | list[int], **kwargs) -> nn.Module:
    """Build a registered model or a torchvision classifier; `None` kwargs are dropped so configs
    can leave them unset."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if name.startswith(ZOO) and name not in MODELS:
        from trainables.models.zoo import ZooModel

        return ZooModel(name.removeprefix(ZOO), num_classes, tuple(input_shape), **kwargs)
    return MODELS.get(name)(num_classes=num_classes, input_shape=tuple(input_shape), **kwargs)


class FeatureTaps:
    """Features of any model by layer name (its `named_modules()`, which for torchvision models are
    the module nodes `torchvision.models.feature_extraction.get_graph_node_names` lists): forward
    hooks record those layers' outputs during the normal forward; nothing is copied or traced."""

    feature_layers: tuple[str, ...] = ()

    def tap_root(self) -> nn.Module:
        """The module whose layer names users write (a torchvision model's own names)."""
        return self

    def set_feature_layers(self, layers: list[str], field: str) -> None:
        names = dict(self.tap_root().named_modules())
        bad = [layer for layer in layers if layer not in names or not layer]
        if bad:
            some = [n for n in names if n and n.count(".") <= 1][:12]
            raise ConfigError(f"`{field}` names no layer {bad[0]!r} of this model: use module names such as {some}")
        for handle in getattr(self, "_tap_handles", []):
            handle.remove()
        self.feature_layers = tuple(layers)
        self._taps: list[Tensor] = []
        self._tapping = False
        self._tap_handles = [names[layer].register_forward_hook(lambda m, i, out: self._taps.append(out) if self._tapping else None)
                             for layer in layers]

    def tapped(self, x: Tensor, forward) -> tuple[Tensor, list[Tensor]]:
        self._taps, self._tapping = [], True
        try:
            logits = forward(x)
        finally:
            self._tapping = False
        return logits, self._taps


def tap_layers(model: nn.Module, layers: list[str], field: str) -> None:
    """Have `model(x, with_features=True)` return these layers' outputs (feature losses)."""
    if not isinstance(model, FeatureTaps):
        raise ConfigError(f"`{field}` needs a model that takes layer names: {type(model).__name__} does not "
                          "(build it on trainables.models.StagedNet, or use a torchvision.<name> model)")
    model.set_feature_layers(layers, field)


class StagedNet(FeatureTaps, nn.Module):
    """stem -> stages -> pooled head. Subclasses fill `stem`, `stages` (ModuleList) and `head`.
    Its features are its stage outputs, or the layers named with set_feature_layers."""

    stem: nn.Module
    stages: nn.ModuleList
    head: nn.Module

    def forward_features(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats

    def forward_head(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.head(x)

    def _logits(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x)[-1])

    def forward(self, x: Tensor, with_features: bool = False):
        """Logits, or (logits, features) so DDP-wrapped models can serve feature losses."""
        if with_features and self.feature_layers:
            return self.tapped(x, self._logits)
        feats = self.forward_features(x)
        logits = self.forward_head(feats[-1])
        return (logits, feats) if with_features else logits


import trainables.models.builtin  # noqa: E402,F401  registers the built-ins (they build on StagedNet above)
