"""Model libraries as models: torchvision's classifiers (`torchvision.<name>`) and timm's models
(`timm.<name>`), built for the dataset, features by the library's own layer names. Each library is
a `Zoo` (names, builder, weights' statistics); `trainables.models.ZOOS` lists them by prefix."""
from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from trainables.models import FeatureTaps, Zoo
from trainables.registry import ConfigError


#: torchvision's ImageNet statistics: what its pretrained weights expect.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class LibraryModel(FeatureTaps, nn.Module):
    """A library's network (`net`) built for the dataset: grey images fed to a 3-channel first layer
    as three equal channels (`expand`), so 3-channel weights files load as they are. Features: the
    layers of `net` named with set_feature_layers (`loss.student_layers` / `loss.teacher_layers`)."""

    prefix = ""
    arch: str
    net: nn.Module
    expand: int

    def layers_hint(self) -> str:
        return ""

    def tap_root(self) -> nn.Module:
        return self.net

    def _logits(self, x: Tensor) -> Tensor:
        return self.net(x.expand(-1, self.expand, -1, -1) if self.expand else x)

    def forward(self, x: Tensor, with_features: bool = False):
        if not with_features:
            return self._logits(x)
        if not self.feature_layers:
            raise ConfigError(f"feature losses on {self.prefix}{self.arch} need layer names: set loss.student_layers / "
                              f"loss.teacher_layers ({self.layers_hint()})")
        return self.tapped(x, self._logits)


class ZooModel(LibraryModel):
    """A torchvision classifier built for the dataset: `num_classes` outputs, 1- or 3-channel images."""

    prefix = "torchvision."

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

    def layers_hint(self) -> str:
        return "e.g. [layer2, layer3] for ResNets"


class TimmModel(LibraryModel):
    """A timm model built for the dataset: `num_classes` outputs, `in_chans` the data's channels
    (grey: 3, expanded, unless `in_chans: 1` is given), and models of a fixed input size (ViTs,
    Swin, ...) built for the dataset's image size. Never pretrained: weights come from files."""

    prefix = "timm."

    def __init__(self, arch: str, num_classes: int, input_shape: tuple[int, ...], **kwargs) -> None:
        import timm

        super().__init__()
        self.arch = arch
        c, size = input_shape[0], tuple(input_shape[1:])
        in_chans = kwargs.pop("in_chans", 3 if c == 1 else c)
        if in_chans != c and c != 1:
            raise ConfigError(f"`dataset` has {c}-channel images, but timm.{arch} was given in_chans={in_chans}: "
                              f"leave in_chans out or set it to {c}")
        cfg = timm.get_pretrained_cfg(arch)
        if cfg is not None and cfg.fixed_input_size and len(size) == 2 and size != tuple(cfg.input_size[1:]):
            kwargs.setdefault("img_size", size)
        try:
            self.net = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
        except (TypeError, ValueError, AssertionError, RuntimeError) as e:
            first = (str(e).splitlines() or [""])[0]
            raise ConfigError(f"`model` timm.{arch} cannot be built for {tuple(input_shape)} images with {kwargs} "
                              f"({type(e).__name__}: {first}): choose another model or its arguments") from None
        self.expand = in_chans if c == 1 and in_chans != 1 else 0

    def layers_hint(self) -> str:
        stages = [i["module"] for i in getattr(self.net, "feature_info", []) if isinstance(i, dict) and i.get("module")]
        return f"e.g. its stages in feature_info: {stages}" if stages else "module names of the timm model"


def torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def timm_names() -> list[str]:
    """Every architecture, and every one with a pretrained tag (`resnet18.a1_in1k`): a tag picks the
    pretrained_cfg, so the statistics, of the weights a file holds."""
    import timm

    return timm.list_models() + timm.list_pretrained()


def imagenet_stats(arch: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """What torchvision's pretrained weights expect, for every model."""
    return IMAGENET_MEAN, IMAGENET_STD


def timm_stats(arch: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The model's own pretrained_cfg mean and std (ImageNet's, 0.5, CLIP's, ... by model and tag)."""
    import timm

    cfg = timm.get_pretrained_cfg(arch)
    if cfg is None or not cfg.mean or not cfg.std:
        return imagenet_stats(arch)
    return tuple(float(m) for m in cfg.mean), tuple(float(s) for s in cfg.std)


TORCHVISION = Zoo(prefix="torchvision.", package="torchvision", extra="", what="torchvision classifiers",
                  examples=("resnet18", "mobilenet_v3_small"), build=ZooModel, names=torchvision_names, stats=imagenet_stats)
TIMM = Zoo(prefix="timm.", package="timm", extra="timm", what="timm models and tagged variants (timm.list_models(), timm.list_pretrained())",
           examples=("resnet18", "mobilenetv3_small_050", "convnext_atto"), build=TimmModel, names=timm_names, stats=timm_stats)
