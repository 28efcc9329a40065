"""Where a split lives during training: whole on the training device when it fits (the fast
path), else in host memory with each batch copied ahead from pinned memory on a side stream."""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from trainables.data import DataSplits

if TYPE_CHECKING:
    from trainables.config import DatasetConfig

def place(splits: DataSplits, ds: "DatasetConfig", device: torch.device | str) -> tuple[DataSplits, bool]:
    """Labels on the device, and the images too under `device` placement (`auto`: when all splits
    take at most `dataset.device_share` of the device's free memory; always on a CPU). Returns the
    placed splits and whether the images are on the device."""
    dev = torch.device(device)
    if ds.placement == "auto":
        on_device = dev.type != "cuda" or splits.nbytes() <= ds.device_share * torch.cuda.mem_get_info(dev)[0]
    else:
        on_device = ds.placement == "device"
    return splits.to(dev, images=on_device), on_device


def device_batches(x_all: Tensor, y_all: Tensor, batches, device: torch.device | str, on_device: bool):
    """(batch_idx, indices, images, labels, view params) on the device for each of `batches`
    (epoch_batches, on the device when the images are there, else on the host).

    Device placement: slices of the resident split. Host placement: gathered on the host (from
    memory or a memory-mapped cache), pinned, and copied on a side CUDA stream one batch ahead, so
    the copy of batch b+1 overlaps the compute of batch b. The same indices either way: the same
    batches."""
    if on_device:
        for b, idx, view in batches:
            yield b, idx, x_all[idx], y_all[idx], view
        return
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    stream = torch.cuda.Stream(dev) if cuda else None

    def copy(item):
        b, idx, view = item
        x = x_all[idx]
        if cuda:
            x = x.pin_memory()
        with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
            return b, idx.to(dev, non_blocking=True), x.to(dev, non_blocking=True), view.to(dev, non_blocking=True)

    it = iter(batches)
    first = next(it, None)
    pending = copy(first) if first is not None else None
    while pending is not None:
        if cuda:
            torch.cuda.current_stream(dev).wait_stream(stream)
            for t in pending[1:]:
                t.record_stream(torch.cuda.current_stream(dev))
        b, idx, x, view = pending
        following = next(it, None)
        pending = copy(following) if following is not None else None  # in flight while batch b computes
        yield b, idx, x, y_all[idx], view
