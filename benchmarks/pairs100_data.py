"""A CIFAR-100-shaped set from real images, for the top-k cache benchmark (no CIFAR-100 copy here):
Fashion-MNIST pairs. Each 32x32 RGB image holds two Fashion-MNIST items side by side, each squeezed
to 32x16 and tinted with its own random colour; the class is (left item's class, right item's class),
10 x 10 = 100 classes, 500 train and 100 test images each (50,000 / 10,000, CIFAR-100's counts).
Like CIFAR-100's superclasses, every class shares half its picture with 18 others, so a teacher's
probabilities spread over related classes: the mass top-k must keep.

  python benchmarks/pairs100_data.py --root ../shared/data [--out ~/.cache/kdsweep/fashion-pairs100.npz]

Train images come from Fashion-MNIST's train split and test images from its test split (seeded,
balanced); the output is an `arrays` dataset file (dataset.name: arrays, dataset.root: the .npz).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainables.data import DATASETS


def pairs(x: torch.Tensor, y: torch.Tensor, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`per_class` images of each of the 100 (left, right) classes from uint8 (N, 1, 28, 28) items."""
    g = torch.Generator().manual_seed(seed)
    by_class = [torch.nonzero(y == c).flatten() for c in range(10)]
    labels = torch.arange(100).repeat_interleave(per_class)
    left = torch.stack([by_class[int(c)][torch.randint(len(by_class[int(c)]), (1,), generator=g)] for c in labels // 10]).flatten()
    right = torch.stack([by_class[int(c)][torch.randint(len(by_class[int(c)]), (1,), generator=g)] for c in labels % 10]).flatten()

    def half(idx: torch.Tensor) -> torch.Tensor:  # (n, 3, 32, 16): the item squeezed, tinted with a random colour
        item = F.interpolate(x[idx].float() / 255, size=(32, 16), mode="bilinear", antialias=True, align_corners=False)
        tint = 0.35 + 0.65 * torch.rand(len(idx), 3, 1, 1, generator=g)
        return item * tint

    img = torch.cat([half(left), half(right)], dim=3)
    order = torch.randperm(len(labels), generator=g)
    return (img[order] * 255).round().clamp(0, 255).to(torch.uint8).numpy(), labels[order].numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="the folder holding FashionMNIST/raw/*.gz")
    p.add_argument("--out", type=Path, default=Path.home() / ".cache" / "kdsweep" / "fashion-pairs100.npz")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    train_x, train_y, test_x, test_y, _ = DATASETS.get("fashion_mnist")(root=args.root)  # decompressed into the kdsweep cache
    tx, ty = pairs(train_x, train_y, 500, args.seed)
    ex, ey = pairs(test_x, test_y, 100, args.seed + 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, train_x=tx, train_y=ty, test_x=ex, test_y=ey)
    print(f"{args.out}: train {tx.shape} test {ex.shape}, {len(np.unique(ty))} classes")


if __name__ == "__main__":
    main()
