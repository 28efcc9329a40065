"""Models: one registry (`MODELS`, `create_model(name, ...)`), plain nn.Modules with
`forward_features` (per-stage features) and `forward_head`, or any model's layers by name.

Every factory takes `num_classes` and `input_shape` (C, H, W). The built-ins (models/builtin.py)
register on import; libraries' models are models by prefix (ZOOS: `torchvision.<name>`,
`timm.<name>`; models/zoo.py).
Beside them: weights files (weights.py), the teacher folder (teacher.py), size and latency
(profile.py).
"""
from __future__ import annotations

import difflib
import functools
import importlib
from dataclasses import dataclass
from typing import Callable, Iterable

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from trainables.registry import ConfigError, Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model", "model")


@dataclass(frozen=True)
class Zoo:
    """A model library whose every model is a model name here as `<prefix><name>`, without a plugin.
    Its functions take names without the prefix and import the library on first use, so a library
    that no config names costs nothing and a missing one is one line saying what to install. A new
    library is one more entry in ZOOS."""

    prefix: str  #: "timm."
    package: str  #: the import name, "timm"
    extra: str  #: the pip extra that installs it (`pip install -e ".[timm]"`), "" for a core dependency
    what: str  #: how messages name its models, "timm models (...)"
    examples: tuple[str, ...]  #: names shown when a name is unknown
    build: Callable[..., nn.Module]  #: (name, num_classes, input_shape, **kwargs) -> the model
    names: Callable[[], Iterable[str]] | None = None  #: every model name, for a library that lists them
    #: or, for names that follow a rule instead of a list: raises ValueError naming the rule
    check: Callable[[str], object] | None = None
    #: (mean, std) its pretrained weights expect, for `normalize: auto` with a weights file; None: the data's
    stats: Callable[[str], tuple[tuple[float, ...], tuple[float, ...]]] | None = None


def zoo_of(name: str) -> Zoo | None:
    """The library a model name belongs to by its prefix; None for a registered model."""
    if name in MODELS:
        return None
    return next((zoo for prefix, zoo in ZOOS.items() if name.startswith(prefix)), None)


@functools.cache
def zoo_names(prefix: str) -> tuple[str, ...]:
    """Every model name of the library at `prefix`, prefixed (none for a library of rules); a
    one-line ConfigError when the library is not installed."""
    zoo = ZOOS[prefix]
    try:
        importlib.import_module(zoo.package)
    except ImportError:
        fix = f'pip install -e ".[{zoo.extra}]"' if zoo.extra else "pip install -e ."
        raise ConfigError(f"{prefix}<name> models need the {zoo.package} package, which is not installed: {fix}") from None
    return tuple(prefix + n for n in zoo.names()) if zoo.names else ()


def _check_zoo(name: str, zoo: Zoo) -> None:
    """ValueError unless the library has `name`: in its list (the closest names shown), or by its rule."""
    names = zoo_names(zoo.prefix)
    if zoo.check is not None:
        zoo.check(name.removeprefix(zoo.prefix))
    elif name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.8)
        examples = ", ".join(zoo.prefix + e for e in zoo.examples)
        raise ValueError(f"must be one of the {len(names)} {zoo.what}, e.g. {examples}"
                         f"{' (closest: ' + ', '.join(close) + ')' if close else ''}, but got {name!r}")


def check_model(name: str) -> str:
    """`name`, or ValueError (for pydantic, which names the field) unless `name` is a registered model
    or a model of a library in ZOOS (`torchvision.resnet18`, `timm.resnet10t`)."""
    zoo = zoo_of(name)
    if zoo is not None:
        _check_zoo(name, zoo)
        return name
    if name in MODELS:
        return name
    libraries = ", ".join(f"{p}<name> for a model of {z.package}" for p, z in ZOOS.items())
    raise ValueError(f"must be one of {MODELS.names()}, or {libraries}, but got {name!r}")


def create_model(name: str, num_classes: int, input_shape: tuple[int, ...] | list[int], **kwargs) -> nn.Module:
    """Build a registered model or a library's model (ZOOS); `None` kwargs are dropped so configs
    can leave them unset."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    zoo = zoo_of(name)
    if zoo is not None:
        try:
            _check_zoo(name, zoo)
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(f"`model` {e}") from None
        return zoo.build(name.removeprefix(zoo.prefix), num_classes, tuple(input_shape), **kwargs)
    return MODELS.get(name)(num_classes=num_classes, input_shape=tuple(input_shape), **kwargs)


class FeatureTaps:
    """Features of any model by layer name (its `named_modules()`: for torchvision models the module
    nodes `torchvision.models.feature_extraction.get_graph_node_names` lists, for timm models the
    stages its `feature_info` names among others): forward hooks record those layers' outputs during
    the normal forward; nothing is copied or traced."""

    feature_layers: tuple[str, ...] = ()

    def tap_root(self) -> nn.Module:
        """The module whose layer names users write (a torchvision or timm model's own names)."""
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
                          "(build it on trainables.models.StagedNet, or use a torchvision.<name> or timm.<name> model)")
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
from trainables.models.zoo import TIMM, TORCHVISION  # noqa: E402  (they build on FeatureTaps and Zoo above)

from trainables.models.hf import HF  # noqa: E402  (registers `hf`, a checkpoint's own architecture)
from trainables.models.audio import AUDIO  # noqa: E402  (builds on create_model above)

#: The model libraries by name prefix: `torchvision.resnet18`, `timm.resnet10t`, `hf.bert-L4-H256-A4`,
#: `audio.cnn_small` (a log-mel front end before a model of this table or the registry).
ZOOS: dict[str, Zoo] = {zoo.prefix: zoo for zoo in (TORCHVISION, TIMM, HF, AUDIO)}
