"""Image classification: uint8 NCHW images, one label each; convolutional and timm/torchvision
models; CIFAR-10-C-style corruptions."""
from __future__ import annotations

from typing import TYPE_CHECKING

from trainables.eval.corruptions import CORRUPTIONS, SEVERITIES, robustness
from trainables.registry import ConfigError
from trainables.tasks import TASKS, Predict, Task

if TYPE_CHECKING:
    from torch import Tensor

    from trainables.data import DataSplits


@TASKS.register(name="image_classification")
class ImageClassification(Task):
    name = "image_classification"
    input_words = "images"
    unit = "images"
    datasets = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "image_folder", "arrays", "synthetic")
    models_hint = "use image models (cnn_*, resnet*, torchvision.*, timm.*) with image data"
    corruptions = tuple(CORRUPTIONS.names())
    severities = SEVERITIES
    features = ("stages",)
    ensembles = True
    channels_last = True
    input_name = "images"

    def input_description(self, shape, model_kwargs):
        return "raw 0..255 pixels, (N, C, H, W)"

    def example_input(self, shape, batch, device, dtype=None):
        """Normalized-image-like noise (N, C, H, W), seeded."""
        import torch

        return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0)).to(device, dtype or torch.float32)

    def robustness(self, predict: Predict, splits: "DataSplits", split: str, n: int | None, seed: int, batch: int, clean_acc: float,
                   tokenizer: str | None = None):
        x, y = getattr(splits, f"{split}_x")[:n], getattr(splits, f"{split}_y")[:n]
        return robustness(predict, x, y, seed, batch, clean_acc)

    def read_unlabeled(self, root, like: "Tensor", options):
        """A folder of images, decoded once to the train images' channels and (square) size."""
        from trainables.data import cache_dir
        from trainables.data.images import decode_unlabeled, image_decoding

        c, h, w = like.shape[1:]
        if h != w:
            raise ConfigError(f"`dataset.unlabeled.root` images are decoded square, but the train images are {h}x{w}: use square images")
        return decode_unlabeled(root, cache_dir(options.get("cache")), image_decoding(h, c))[0]
