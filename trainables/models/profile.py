"""Size metrics of any model: parameters, serialized bytes, median latency, FLOPs."""
from __future__ import annotations

import copy
import logging

import torch
import torch.nn as nn
from safetensors.torch import save as st_save
from torch.utils.flop_counter import FlopCounterMode


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def serialized_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict as safetensors (what a deployment would ship)."""
    return len(st_save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}))


def example_input(input_shape: tuple[int, ...], batch: int, device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A batch a model takes: normalized images (N, C, H, W), or token ids (N, L) with no padding
    (id 1: in every vocabulary, and never a pad id 0), so attention runs over the full length."""
    if len(input_shape) == 1:
        return torch.ones(batch, *input_shape, dtype=torch.long, device=device)
    return torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)


@torch.no_grad()
def flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Forward FLOPs for one example (torch.utils.flop_counter; a multiply-add counts as 2)."""
    p = next(model.parameters())
    x = example_input(input_shape, 1, p.device, p.dtype)
    with FlopCounterMode(display=False) as fc:
        model(x)
    return int(fc.get_total_flops())


@torch.no_grad()
def latency_ms(model: nn.Module, input_shape: tuple[int, ...], batch: int, device: torch.device | str, min_run_time: float = 0.2) -> float:
    """Median time of one forward pass in ms (torch.utils.benchmark: warm-up, CUDA synchronised,
    enough runs to fill `min_run_time`)."""
    # torch.utils.benchmark imports cpp_extension, which warns about CUDA_HOME on CPU-only machines
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import torch.utils.benchmark as benchmark

    x = example_input(input_shape, batch, device)
    timer = benchmark.Timer(stmt="model(x)", globals={"model": model, "x": x}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def size_metrics(model: nn.Module, input_shape: tuple[int, ...], batch: int = 64, gpu: bool | None = None) -> dict[str, float]:
    """params, bytes, FLOPs and latency at batch 1 and `batch` on CPU (and on CUDA when present)."""
    m = copy.deepcopy(model).float().eval().cpu()
    out = {
        "params": float(param_count(m)),
        "bytes": float(serialized_bytes(m)),
        "flops": float(flops(m, input_shape)),
        "latency_cpu_b1_ms": latency_ms(m, input_shape, 1, "cpu"),
        f"latency_cpu_b{batch}_ms": latency_ms(m, input_shape, batch, "cpu"),
    }
    shorter = {f"len{p}": (max(2, input_shape[0] * p // 100),) for p in (25, 50)} if len(input_shape) == 1 else {}  # text: per length
    out.update({f"latency_cpu_b1_{k}_ms": latency_ms(m, s, 1, "cpu") for k, s in shorter.items()})
    if (torch.cuda.is_available() if gpu is None else gpu):
        g = m.cuda()
        out["latency_gpu_b1_ms"] = latency_ms(g, input_shape, 1, "cuda")
        out[f"latency_gpu_b{batch}_ms"] = latency_ms(g, input_shape, batch, "cuda")
        out.update({f"latency_gpu_b1_{k}_ms": latency_ms(g, s, 1, "cuda") for k, s in shorter.items()})
    return out


def size_report(student: dict[str, float], teacher: dict[str, float] | None) -> dict[str, float]:
    """A student's size metrics as logged: size_<k>, and with its teacher's numbers (measured the
    same way, on the same device) teacher_<k>, compression_<params|bytes|flops> and
    speedup_<latency key> (teacher / student)."""
    out = {f"size_{k}": v for k, v in student.items()}
    if teacher:
        out.update({f"teacher_{k}": v for k, v in teacher.items()})
        out.update({f"compression_{k}": teacher[k] / student[k] for k in ("params", "bytes", "flops")})
        out.update({f"speedup_{k.removesuffix('_ms')}": teacher[k] / student[k] for k in teacher if k.startswith("latency_")})
    return out


def profile_task(arch: str | None = None, shape: list[int] | None = None, num_classes: int | None = None,
                 teacher_path: str | None = None, plugins: list[str] = (), arch_kwargs: dict | None = None) -> dict[str, float]:
    """Ray task body (orchestrator.sweep.Profiles): size metrics of one architecture,
    freshly built, or of the saved teacher."""
    from trainables.plugins import load_plugins

    load_plugins(plugins)
    if teacher_path is not None:
        from trainables.models.teacher import load_teacher

        model, card = load_teacher(teacher_path)
        shape = card.input_shape
    else:
        from trainables.models import create_model

        model = create_model(arch, num_classes, shape, **(arch_kwargs or {}))
    return size_metrics(model, tuple(shape))
