"""The built-in models, registered on import. The CIFAR ResNets, WRNs, MobileNetV2 and ShuffleNetV2
follow the CRD benchmark's definitions (Tian et al., 2020, github.com/HobbitLong/RepDistiller)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from trainables.models import MODELS, StagedNet


# --- CRD CIFAR ResNets -------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(StagedNet):
    """CRD's CIFAR ResNet: 3x3 stem, three stages of (depth-2)/6 basic blocks, strides 1-2-2."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int, input_shape) -> None:
        super().__init__()
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        cin, stages = widths[0], []
        for i, w in enumerate(widths[1:]):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(cin, num_classes)


@MODELS.register
def resnet8x4(num_classes: int, input_shape) -> nn.Module:
    return CifarResNet(8, (32, 64, 128, 256), num_classes, input_shape)


@MODELS.register
def resnet32x4(num_classes: int, input_shape) -> nn.Module:
    return CifarResNet(32, (32, 64, 128, 256), num_classes, input_shape)


@MODELS.register
def resnet20(num_classes: int, input_shape) -> nn.Module:
    return CifarResNet(20, (16, 16, 32, 64), num_classes, input_shape)


@MODELS.register
def resnet56(num_classes: int, input_shape) -> nn.Module:
    return CifarResNet(56, (16, 16, 32, 64), num_classes, input_shape)


# --- Wide ResNets (pre-activation, as in CRD) --------------------------------------------------


class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(StagedNet):
    def __init__(self, depth: int, widen: int, num_classes: int, input_shape) -> None:
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(input_shape[0], widths[0], 3, 1, 1, bias=False)
        stages, cin = [], widths[0]
        for i, w in enumerate(widths[1:]):
            stages.append(nn.Sequential(*[WideBlock(cin if j == 0 else w, w, (1 if i == 0 else 2) if j == 0 else 1) for j in range(n)]))
            cin = w
        # The final BN-ReLU belongs to the last stage so its feature is what the head sees.
        stages[-1].append(nn.BatchNorm2d(cin))
        stages[-1].append(nn.ReLU())
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(cin, num_classes)


@MODELS.register
def wrn_16_2(num_classes: int, input_shape) -> nn.Module:
    return WideResNet(16, 2, num_classes, input_shape)


@MODELS.register
def wrn_40_2(num_classes: int, input_shape) -> nn.Module:
    return WideResNet(40, 2, num_classes, input_shape)


# --- MobileNetV2 for small images (CRD's "mobile_half": expansion 6, width 0.5) ----------------


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(StagedNet):
    SETTING = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes: int, input_shape, width: float = 0.5, expand: int = 6) -> None:
        super().__init__()
        cin = int(32 * width)
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], cin, 3, 1, 1, bias=False), nn.BatchNorm2d(cin), nn.ReLU())
        stages = []
        for t, c, n, s in self.SETTING:
            cout, blocks = int(c * width), []
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, s if i == 0 else 1, expand if t != 1 else 1))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        stages[-1].append(nn.Sequential(nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU()))
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(1280, num_classes)


@MODELS.register
def mobilenetv2(num_classes: int, input_shape, width: float = 0.5) -> nn.Module:
    return MobileNetV2(num_classes, input_shape, width=width)


# --- ShuffleNetV2 for small images (CRD's ShuffleV2, net_size 1) -------------------------------


def channel_shuffle(x: Tensor, groups: int = 2) -> Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        half = c // 2
        self.branch = nn.Sequential(
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
            nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        a, b = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([a, self.branch(b)], 1))


class ShuffleDown(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        mid = cout // 2
        self.left = nn.Sequential(
            nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
        )
        self.right = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
            nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False), nn.BatchNorm2d(mid),
            nn.Conv2d(mid, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1))


class ShuffleNetV2(StagedNet):
    def __init__(self, num_classes: int, input_shape, widths=(116, 232, 464), blocks=(3, 7, 3)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], 24, 3, 1, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        cin, stages = 24, []
        for w, n in zip(widths, blocks):
            stages.append(nn.Sequential(ShuffleDown(cin, w), *[ShuffleBlock(w) for _ in range(n)]))
            cin = w
        stages[-1].append(nn.Sequential(nn.Conv2d(cin, 1024, 1, bias=False), nn.BatchNorm2d(1024), nn.ReLU()))
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(1024, num_classes)


@MODELS.register
def shufflev2(num_classes: int, input_shape) -> nn.Module:
    return ShuffleNetV2(num_classes, input_shape)


# --- MLPs (Hinton et al., 2015) and small CNNs for 8x8 / 28x28 images --------------------------


class MLP(StagedNet):
    """Flatten -> [Linear-ReLU] per hidden width -> Linear. Each hidden layer is a stage."""

    def __init__(self, hidden: tuple[int, ...], num_classes: int, input_shape, dropout: float = 0.0) -> None:
        super().__init__()
        self.stem = nn.Flatten()
        cin, stages = math.prod(input_shape), []
        for h in hidden:
            stages.append(nn.Sequential(nn.Linear(cin, h), nn.ReLU(), nn.Dropout(dropout)))
            cin = h
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(cin, num_classes)


@MODELS.register
def mlp_1200x1200(num_classes: int, input_shape, dropout: float = 0.0) -> nn.Module:
    return MLP((1200, 1200), num_classes, input_shape, dropout)


@MODELS.register
def mlp_800x800(num_classes: int, input_shape, dropout: float = 0.0) -> nn.Module:
    return MLP((800, 800), num_classes, input_shape, dropout)


@MODELS.register
def mlp_32(num_classes: int, input_shape, dropout: float = 0.0) -> nn.Module:
    """A deliberately small student (one hidden layer of 32) for the digits default sweep."""
    return MLP((32,), num_classes, input_shape, dropout)


class SmallCNN(StagedNet):
    """Three conv-BN-ReLU stages (stride 1-2-2), global pool, linear: sized by `widths`."""

    def __init__(self, widths: tuple[int, int, int], num_classes: int, input_shape) -> None:
        super().__init__()
        self.stem = nn.Identity()
        cin, stages = input_shape[0], []
        for i, w in enumerate(widths):
            stages.append(nn.Sequential(nn.Conv2d(cin, w, 3, 1 if i == 0 else 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(cin, num_classes)


@MODELS.register
def cnn_small(num_classes: int, input_shape) -> nn.Module:
    return SmallCNN((32, 64, 128), num_classes, input_shape)


@MODELS.register
def cnn_tiny(num_classes: int, input_shape) -> nn.Module:
    return SmallCNN((4, 8, 16), num_classes, input_shape)
