"""Batched eval forwards on uint8 images: shared by the loop (val, corruptions, teacher targets),
the teacher cache and the driver's once-only test evaluation."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor


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
