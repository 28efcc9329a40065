"""Audio models: `audio.<model>` is a log-mel front end (`LogMel`) before any image model of this
package (`audio.cnn_small`, `audio.resnet8x4`, `audio.timm.<name>`). By default the body sees the
mel bins as channels over a 1 x frames strip, so its 3x3 convolutions run along time and its first
layer sees the whole spectrum (temporal convolution, as TC-ResNet does for keyword spotting; a
globally pooled CNN over a one-channel spectrogram image cannot tell where in frequency a pattern
is: on pitched tones it stays near chance where this layout is exact). `mel_as: image` gives the
one-channel image (1, n_mels, frames) instead. The front end is fixed (no
parameters), so a model takes raw waveforms and exports to ONNX as it is: its STFT is a
convolution with windowed cosine and sine kernels (torchaudio's wheels need an older torch than
ours, and `torch.stft` has no ONNX export)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from trainables.models import FeatureTaps, Zoo, check_model, create_model, tap_layers
from trainables.registry import ConfigError

PREFIX = "audio."


def hz_to_mel(f: Tensor) -> Tensor:
    """HTK's mel scale."""
    return 2595.0 * torch.log10(1.0 + f / 700.0)


def mel_to_hz(m: Tensor) -> Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0, f_max: float | None = None) -> Tensor:
    """(n_fft // 2 + 1, n_mels) triangular filters, equally spaced on HTK's mel scale, unnormalized
    (torchaudio's melscale_fbanks with norm=None, mel_scale="htk"), in float64."""
    f_max = sample_rate / 2 if f_max is None else f_max
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    lo, hi = hz_to_mel(torch.tensor([f_min, f_max], dtype=torch.float64)).tolist()
    edges = mel_to_hz(torch.linspace(lo, hi, n_mels + 2, dtype=torch.float64))
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rise = (freqs[:, None] - lower) / (center - lower)
    fall = (upper - freqs[:, None]) / (upper - center)
    return torch.clamp(torch.minimum(rise, fall), min=0.0)


class LogMel(nn.Module):
    """(N, L) waveforms in [-1, 1] -> (N, 1, n_mels, L // hop + 1) log-mel power, each clip's mean
    removed (so a clip's loudness shifts nothing the network sees; clipping still does).
    Frames are centred as `torch.stft(center=True, pad_mode="constant")` centres them."""

    def __init__(self, sample_rate: int = 16000, n_fft: int = 400, hop: int = 160, n_mels: int = 40, f_min: float = 20.0) -> None:
        super().__init__()
        self.sample_rate, self.n_fft, self.hop, self.n_mels = sample_rate, n_fft, hop, n_mels
        n = torch.arange(n_fft, dtype=torch.float64)
        k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)[:, None]
        window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
        angle = 2 * math.pi * k * n / n_fft
        kernel = torch.cat([torch.cos(angle) * window, -torch.sin(angle) * window])[:, None]  # (2F, 1, n_fft): real rows, then imaginary
        self.register_buffer("kernel", kernel.float(), persistent=False)
        self.register_buffer("filters", mel_filterbank(sample_rate, n_fft, n_mels, f_min).T.float().contiguous(), persistent=False)

    def frames(self, samples: int) -> int:
        return samples // self.hop + 1

    def power(self, x: Tensor) -> Tensor:
        """(N, n_fft // 2 + 1, frames) |STFT|^2."""
        half = self.n_fft // 2
        spec = F.conv1d(F.pad(x[:, None], (half, half)), self.kernel, stride=self.hop)
        re, im = spec.float().chunk(2, dim=1)
        return re * re + im * im

    def forward(self, x: Tensor) -> Tensor:
        mel = torch.matmul(self.filters, self.power(x.float()))
        logmel = torch.log(mel + 1e-6)
        return (logmel - logmel.mean(dim=(1, 2), keepdim=True))[:, None]


class AudioNet(FeatureTaps, nn.Module):
    """LogMel, then `body` (an image model over the spectrogram). Its features are the body's."""

    def __init__(self, body: str, num_classes: int, input_shape: tuple[int, ...], sample_rate: int = 16000, n_mels: int = 40,
                 n_fft: int | None = None, hop: int | None = None, mel_as: str = "channels", **body_kwargs) -> None:
        super().__init__()
        if mel_as not in ("channels", "image"):
            raise ConfigError(f"`arch_kwargs.mel_as` must be 'channels' or 'image', but got {mel_as!r}")
        # 25 ms windows every 10 ms, whatever the rate
        self.frontend = LogMel(sample_rate, n_fft or round(0.025 * sample_rate), hop or round(0.010 * sample_rate), n_mels)
        self.channels = mel_as == "channels"
        frames = self.frontend.frames(input_shape[-1])
        self.body = create_model(body, num_classes, (n_mels, 1, frames) if self.channels else (1, n_mels, frames), **body_kwargs)

    def spectrogram(self, x: Tensor) -> Tensor:
        """What the body sees: (N, n_mels, 1, frames), or (N, 1, n_mels, frames) with mel_as: image."""
        spec = self.frontend(x)
        return spec.transpose(1, 2) if self.channels else spec

    def set_feature_layers(self, layers: list[str], field: str) -> None:
        tap_layers(self.body, layers, field)

    def forward(self, x: Tensor, with_features: bool = False):
        return self.body(self.spectrogram(x), with_features=with_features) if with_features else self.body(self.spectrogram(x))


def _check(name: str) -> None:
    if name.startswith((PREFIX, "hf.")):
        raise ValueError(f"must be audio.<an image model> (a log-mel front end before it, e.g. audio.cnn_small), but got {PREFIX + name!r}")
    check_model(name)


def _build(name: str, num_classes: int, input_shape: tuple[int, ...], **kwargs) -> nn.Module:
    return AudioNet(name, num_classes, input_shape, **kwargs)


AUDIO = Zoo(prefix=PREFIX, package="torch", extra="", what="audio models (a log-mel front end before an image model)",
            examples=("cnn_small", "cnn_tiny", "resnet8x4"), build=_build, check=_check)
