"""Spoken words: clips as float waveforms (N, samples) at one rate, one label each; models are
`audio.<image model>` (a fixed log-mel front end, so they take raw waveforms, in training and in
ONNX alike); the robustness suite adds noise, shifts and clipping gain."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trainables.eval.corruptions import SEVERITIES, robustness
from trainables.eval.sounds import SOUNDS, corrupt_clips
from trainables.registry import ConfigError
from trainables.tasks import TASKS, Predict, Task

if TYPE_CHECKING:
    from trainables.config import DatasetConfig
    from trainables.data import DataSplits


@TASKS.register(name="audio_classification")
class AudioClassification(Task):
    name = "audio_classification"
    input_words = "audio clips (waveforms)"
    unit = "clips"
    datasets = ("audio",)
    models = ("audio.",)
    models_hint = "use audio.<model> (a log-mel front end before an image model: audio.cnn_small, audio.resnet8x4, audio.timm.<name>)"
    corruptions = tuple(SOUNDS.names())
    severities = SEVERITIES
    features = ("stages",)
    ensembles = True
    input_name = "waveforms"

    def input_description(self, shape, model_kwargs):
        return f"float waveforms in [-1, 1], (N, {shape[-1]}) at {model_kwargs.get('sample_rate', 16000)} Hz, mono"

    def example_input(self, shape, batch, device, dtype=None):
        """Quiet noise (N, samples), seeded."""
        import torch

        return (0.1 * torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))).to(device, dtype or torch.float32)

    def model_kwargs(self, arch: str, weights: str | None, dataset: "DatasetConfig") -> dict[str, Any]:
        """The front end's rate: the clips'."""
        return {"sample_rate": int(dataset.kwargs.get("sample_rate", 16000))} if self.claims(arch) else {}

    def check_models(self, cfg: Any, input_shape: tuple[int, ...]) -> None:
        aug = cfg.dataset.augment
        if aug is not None and not aug.static:
            raise ConfigError("`dataset.augment` crops and flips images, which clips do not take: remove it (the robustness suite "
                              "shifts clips in time)")

    def robustness(self, predict: Predict, splits: "DataSplits", split: str, n: int | None, seed: int, batch: int, clean_acc: float,
                   tokenizer: str | None = None):
        x, y = getattr(splits, f"{split}_x")[:n], getattr(splits, f"{split}_y")[:n]
        return robustness(predict, x, y, seed, batch, clean_acc, suite=SOUNDS, corrupt_fn=corrupt_clips)

    def read_unlabeled(self, root, like, options):
        """A folder of .wav clips, decoded once as the labelled ones are (mono, the loader's rate,
        fitted to its clip length)."""
        from trainables.data import cache_dir
        from trainables.data.audio import clip_decoding
        from trainables.data.images import decode_unlabeled

        return decode_unlabeled(root, cache_dir(options.get("cache")), clip_decoding(options["sample_rate"], options["clip_seconds"]))[0]
