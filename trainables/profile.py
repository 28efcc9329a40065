"""Size metrics of any model: parameters, serialized bytes, median latency, FLOPs."""
from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn as nn
from safetensors.torch import save as st_save
from torch.utils.flop_counter import FlopCounterMode


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def serialized_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict as safetensors (what a deployment would ship)."""
    return len(st_save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}))


@torch.no_grad()
def flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Forward FLOPs for one image (torch.utils.flop_counter; a multiply-add counts as 2)."""
    p = next(model.parameters())
    x = torch.zeros(1, *input_shape, device=p.device, dtype=p.dtype)
    with FlopCounterMode(display=False) as fc:
        model(x)
    return int(fc.get_total_flops())


@torch.no_grad()
def latency_ms(model: nn.Module, input_shape: tuple[int, ...], batch: int, device: torch.device | str, repeats: int = 10,
               warmup: int = 3) -> float:
    """Median wall time of one forward pass in ms (CUDA timed with events after warm-up)."""
    device = torch.device(device)
    x = torch.randn(batch, *input_shape, device=device)
    times = []
    for i in range(repeats + warmup):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(x)
            end.record()
            torch.cuda.synchronize()
            t = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            model(x)
            t = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(t)
    return statistics.median(times)


def size_metrics(model: nn.Module, input_shape: tuple[int, ...], batch: int = 64, gpu: bool | None = None) -> dict[str, float]:
    """params, bytes, FLOPs and latency at batch 1 and `batch` on CPU (and on CUDA when present)."""
    m = copy.deepcopy(model).float().eval().cpu()
    out = {
        "params": float(param_count(m)),
        "bytes": float(serialized_bytes(m)),
        "flops": float(flops(m, input_shape)),
        "latency_cpu_b1_ms": latency_ms(m, input_shape, 1, "cpu"),
        # a big teacher at batch 64 on CPU costs seconds a pass: few repeats keep trial start-up short
        f"latency_cpu_b{batch}_ms": latency_ms(m, input_shape, batch, "cpu", repeats=3, warmup=1),
    }
    if (torch.cuda.is_available() if gpu is None else gpu):
        g = m.cuda()
        out["latency_gpu_b1_ms"] = latency_ms(g, input_shape, 1, "cuda")
        out[f"latency_gpu_b{batch}_ms"] = latency_ms(g, input_shape, batch, "cuda")
    return out
