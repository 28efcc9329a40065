"""Batched eval forwards on uint8 images: shared by the loop (val, corruptions, teacher targets),
the teacher cache and the driver's once-only test evaluation."""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
import torch.nn as nn
from torch import Tensor


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 matmuls and convolutions natively: a CUDA GPU, or a CPU with
    AMX tiles (Intel Xeon since Sapphire Rapids), where bf16 convnet forwards run 3-4x faster than
    fp32 (elsewhere on CPU bf16 is emulated and slower)."""
    if device.type == "cuda":
        return True
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # torch's own dispatch test; private, so looked up
    return device.type == "cpu" and amx is not None and bool(amx())


def suite_autocast(device: torch.device, amp: bool) -> Callable[[], ContextManager]:
    """The context of the corruption suites' forwards (35 an image, their outputs only counted):
    bf16 autocast with `train.amp` where the device computes bf16 natively, fp32 elsewhere. On a
    CPU with AMX that is 3-4x faster for convnets, and a Fashion-MNIST cnn_small's robust_acc moved
    by 0.05 points; the metrics a sweep selects on (val) stay fp32 on a CPU."""
    if amp and native_bf16(device):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, norm, batch: int, autocast, channels_last: bool, device: torch.device | None = None) -> Tensor:
    """Logits (float32) for uint8 images in big batches: no augmentation, model in eval mode.
    `device`: where the model is, when x may be in host memory (host placement)."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        xb = norm(xb.to(device, non_blocking=True) if device is not None else xb)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with autocast():
            out.append(model(xb).float())
    model.train(was_training)
    return torch.cat(out)
