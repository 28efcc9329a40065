"""Your spoken words: folders of .wav clips per class, or arrays of waveforms, decoded once.

A folder holds <class>/*.wav (all train; val and test carved, stratified) or train/<class>/*.wav
with optional val/ and test/ beside it (torchvision's ImageFolder layout). Each clip is read with
the standard `wave` module (PCM, 8 to 32 bits; channels averaged to mono), resampled to
`sample_rate` (scipy's polyphase filter), and cut or zero-padded at its end to `clip_seconds`;
the splits are written to the cache as float32 (N, samples) arrays in [-1, 1] under a key of the
files and these settings (data/images.py `decode_tree`), and every later load memory-maps them.
Files that are not PCM .wav are skipped, counted and named in one warning.

Arrays: a .npz / .pt / .safetensors file with `train_x` (N, samples): float waveforms in
[-1, 1] or int16 PCM; `train_y`; optional val_*/test_*, and `sample_rate` (resampled when it
differs from the dataset's).
"""
from __future__ import annotations

import functools
import math
import wave
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from trainables.data import DATASETS, _resolve_root, cache_dir
from trainables.data.images import Decoding, RawData, decode_tree, read_arrays
from trainables.registry import ConfigError, missing

FORMAT = 1  # bump when the decoding changes: old caches are then ignored


def clip_samples(sample_rate: int, clip_seconds: float) -> int:
    return int(round(sample_rate * clip_seconds))


def check_settings(sample_rate: int, clip_seconds: float) -> None:
    if not 1000 <= sample_rate <= 192000:
        raise ConfigError(f"`dataset.kwargs.sample_rate` must be a rate in Hz between 1000 and 192000, but got {sample_rate}")
    if not 0.05 <= clip_seconds <= 60:
        raise ConfigError(f"`dataset.kwargs.clip_seconds` must be between 0.05 and 60 seconds, but got {clip_seconds}")


def resample(x: np.ndarray, rate: int, to: int) -> np.ndarray:
    """`x` (..., samples) from `rate` to `to` Hz (polyphase, anti-aliased)."""
    if rate == to:
        return x
    from scipy.signal import resample_poly

    g = math.gcd(rate, to)
    return resample_poly(x, to // g, rate // g, axis=-1).astype(np.float32)


def fit(x: np.ndarray, samples: int) -> np.ndarray:
    """Cut at the end, or zero-pad at the end, to `samples`."""
    if x.shape[-1] >= samples:
        return x[..., :samples]
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, samples - x.shape[-1])])


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """A PCM .wav file as float32 mono in [-1, 1], and its rate."""
    with wave.open(str(path), "rb") as w:
        width, channels, rate, n = w.getsampwidth(), w.getnchannels(), w.getframerate(), w.getnframes()
        raw = w.readframes(n)
    if width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        x = ((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8).astype(np.float32) / 8388608.0
    elif width == 4:
        x = np.frombuffer(raw, "<i4").astype(np.float32) / 2147483648.0
    else:
        raise ValueError(f"{8 * width}-bit samples")
    return x.reshape(-1, channels).mean(axis=1), rate


def _decode(path: str, sample_rate: int, samples: int) -> np.ndarray | str:
    """One file -> float32 (samples,), or the reason it was skipped (a worker process)."""
    try:
        x, rate = read_wav(path)
    except (wave.Error, EOFError, ValueError) as e:
        return f"not a PCM .wav: {e}"
    if len(x) == 0:
        return "no samples"
    return fit(resample(x, rate, sample_rate), samples).astype(np.float32)


def clip_decoding(sample_rate: int, clip_seconds: float) -> Decoding:
    samples = clip_samples(sample_rate, clip_seconds)
    return Decoding("clips", "clips", functools.partial(_decode, sample_rate=sample_rate, samples=samples),
                    {"audio_format": FORMAT, "sample_rate": sample_rate, "samples": samples}, (samples,), np.float32, flat=True)


def decode_clips(root: Path, cache: Path, sample_rate: int, clip_seconds: float, val_fraction: float, test_fraction: float,
                 split_seed: int) -> RawData:
    return decode_tree(root, cache, clip_decoding(sample_rate, clip_seconds), val_fraction=val_fraction, test_fraction=test_fraction,
                       split_seed=split_seed)


def read_clip_arrays(path: Path, sample_rate: int, clip_seconds: float) -> RawData:
    """An arrays file of waveforms, at `sample_rate` and `clip_seconds`, float32 in [-1, 1]."""
    from trainables.tensor_files import load_tensor_file

    samples = clip_samples(sample_rate, clip_seconds)
    try:
        rate = load_tensor_file(path).get("sample_rate") if path.is_file() else None
    except Exception:
        rate = None  # read_arrays says what is wrong with the file
    rate = int(rate.item() if isinstance(rate, Tensor) else rate) if rate is not None else sample_rate

    def waveforms(split: str, x) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 2 or not (x.dtype.is_floating_point or x.dtype == torch.int16):
            got = f"{x.dtype}, {x.dim()}-D" if isinstance(x, Tensor) else type(x).__name__
            raise ConfigError(f"`dataset.root` {split}_x must be waveforms (N, samples), float in [-1, 1] or int16, but got {got}")
        w = x.float() / 32768.0 if x.dtype == torch.int16 else x.float()
        if len(w) and w.abs().max() > 1.0 + 1e-6:
            raise ConfigError(f"`dataset.root` {split}_x has samples beyond [-1, 1] (max |x| = {float(w.abs().max()):.3g}): "
                              "scale float waveforms to [-1, 1], or save int16 PCM")
        return torch.from_numpy(fit(resample(w.numpy(), rate, sample_rate), samples).astype(np.float32))

    return read_arrays(path, waveforms, "clips")


@DATASETS.register
def audio(root: str | None = None, download: bool = False, cache: str | None = None, sample_rate: int = 16000, clip_seconds: float = 1.0,
          val_fraction: float = 0.1, test_fraction: float = 0.1, split_seed: int = 0):
    """Your spoken words: a folder of <class>/*.wav (or train/<class>/*.wav with optional val/,
    test/), or an arrays file of waveforms; decoded once to `sample_rate` Hz and `clip_seconds`
    into the cache (trainables/data/audio.py)."""
    check_settings(sample_rate, clip_seconds)
    if not root:
        raise ConfigError("`dataset.root` is required for audio: set it to a folder of <class>/*.wav clips or an arrays file (.npz)")
    path = Path(root).expanduser()
    if not path.exists():
        raise ConfigError(f"`dataset.root` {missing(root, 'a folder of <class>/*.wav clips, or an arrays file (.npz)')}")
    if path.is_file():
        return read_clip_arrays(path, sample_rate, clip_seconds)
    return decode_clips(_resolve_root(root), cache_dir(cache), sample_rate, clip_seconds, val_fraction, test_fraction, split_seed)
