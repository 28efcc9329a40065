"""Size metrics of any model: parameters, serialized bytes, median latency, FLOPs."""
from __future__ import annotations

import contextlib
import copy
import logging
import statistics
from typing import Iterator

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


def _timer(model: nn.Module, x: torch.Tensor, threads: int):
    # torch.utils.benchmark imports cpp_extension, which warns about CUDA_HOME on CPU-only machines
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import torch.utils.benchmark as benchmark

    return benchmark.Timer(stmt="model(x)", globals={"model": model, "x": x}, num_threads=threads)


@torch.no_grad()
def latency_ms(model: nn.Module, input_shape: tuple[int, ...], batch: int, device: torch.device | str, min_run_time: float = 0.2) -> float:
    """Median time of one forward pass in ms (torch.utils.benchmark: warm-up, CUDA synchronised,
    enough runs to fill `min_run_time`)."""
    x = example_input(input_shape, batch, device)
    return _timer(model, x, torch.get_num_threads()).blocked_autorange(min_run_time=min_run_time).median * 1e3


def latency_settings(input_shape: tuple[int, ...], batch: int = 64, gpu: bool | None = None) -> dict[str, tuple[tuple[int, ...], int, str]]:
    """Every latency a profile reports: key -> (input shape, batch, device). CPU at batch 1 and
    `batch`; text also at 25 % and 50 % of its length; the same on CUDA when there is one."""
    shorter = {f"_len{p}": (max(2, input_shape[0] * p // 100),) for p in (25, 50)} if len(input_shape) == 1 else {}
    devices = ["cpu", *(["gpu"] if (torch.cuda.is_available() if gpu is None else gpu) else [])]
    out = {}
    for d in devices:
        out[f"latency_{d}_b1_ms"] = (input_shape, 1, d)
        out[f"latency_{d}_b{batch}_ms"] = (input_shape, batch, d)
        out.update({f"latency_{d}_b1{k}_ms": (shape, 1, d) for k, shape in shorter.items()})
    return out


@torch.no_grad()
def interleaved_latency(models: dict[str, nn.Module], input_shape: tuple[int, ...], threads: int, rounds: int = 5, batch: int = 64,
                        gpu: bool | None = None, min_run_time: float = 0.02) -> dict[str, dict[str, float]]:
    """Each model's latencies (latency_settings), timed back to back and interleaved: every round
    times every model once per setting, the models' order rotating by round, with `threads` CPU
    threads; each value is the median over the rounds. Load that comes and goes then falls on
    every model alike, so their ratios (a student's speedup over its teacher) hold."""
    names = list(models)
    ready = {n: copy.deepcopy(m).float().eval().cpu() for n, m in models.items()}
    on_gpu = {n: copy.deepcopy(m).cuda() for n, m in ready.items()} if any(d == "gpu" for *_, d in latency_settings(input_shape, batch, gpu).values()) else {}
    samples: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    with _threads(threads):
        for r in range(rounds):
            for key, (shape, b, device) in latency_settings(input_shape, batch, gpu).items():
                x = example_input(shape, b, "cuda" if device == "gpu" else "cpu")
                for n in names[r % len(names):] + names[:r % len(names)]:
                    model = on_gpu[n] if device == "gpu" else ready[n]
                    t = _timer(model, x, threads).blocked_autorange(min_run_time=min_run_time)
                    samples[n].setdefault(key, []).append(t.median * 1e3)
    return {n: {k: statistics.median(v) for k, v in per.items()} for n, per in samples.items()}


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def static_size(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, float]:
    """params, bytes and FLOPs: what does not depend on when or where it is measured."""
    m = copy.deepcopy(model).float().eval().cpu()
    return {"params": float(param_count(m)), "bytes": float(serialized_bytes(m)), "flops": float(flops(m, input_shape))}


def size_metrics(model: nn.Module, input_shape: tuple[int, ...], batch: int = 64, gpu: bool | None = None) -> dict[str, float]:
    """params, bytes, FLOPs and latency at batch 1 and `batch` on CPU (and on CUDA when present) of
    one model alone; to compare models, time them together (profile_together)."""
    return {**static_size(model, input_shape),
            **interleaved_latency({"m": model}, input_shape, torch.get_num_threads(), rounds=3, batch=batch, gpu=gpu)["m"]}


def profile_together(models: dict[str, nn.Module], input_shape: tuple[int, ...], threads: int = 1, rounds: int = 5) -> dict[str, dict[str, float]]:
    """Size metrics of several models whose latencies are compared (a student and its teacher):
    static sizes, and latencies timed interleaved (interleaved_latency)."""
    times = interleaved_latency(models, input_shape, threads, rounds)
    return {n: {**static_size(m, input_shape), **times[n]} for n, m in models.items()}


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


def _build(arch: str | None, shape: list[int] | None, num_classes: int | None, teacher_path: str | None,
           arch_kwargs: dict | None) -> tuple[nn.Module, tuple[int, ...]]:
    if teacher_path is not None:
        from trainables.models.teacher import load_teacher

        model, card = load_teacher(teacher_path)
        return model, tuple(card.input_shape)
    from trainables.models import create_model

    return create_model(arch, num_classes, shape, **(arch_kwargs or {})), tuple(shape)


def profile_task(arch: str | None = None, shape: list[int] | None = None, num_classes: int | None = None,
                 teacher_path: str | None = None, plugins: list[str] = (), arch_kwargs: dict | None = None) -> dict[str, float]:
    """Ray task body (orchestrator.sweep.Profiles): the static sizes (static_size) of one
    architecture, freshly built, or of the saved teacher. Nothing here is timed: it may run beside
    anything."""
    from trainables.plugins import load_plugins

    load_plugins(plugins)
    model, shape = _build(arch, shape, num_classes, teacher_path, arch_kwargs)
    return static_size(model, shape)


#: The name of the teacher among the models a latency task times.
TEACHER = "teacher"


def latency_task(teacher_path: str, students: dict[str, dict], shape: list[int], num_classes: int, plugins: list[str] = (),
                 threads: int = 1, rounds: int = 5) -> dict:
    """Ray task body (orchestrator.sweep.Profiles.measure_latency), run while no trial runs: the
    teacher and every student (name -> create_model kwargs) timed interleaved, `threads` threads.
    Returns the latencies by model, and how and when they were measured (wall-clock window)."""
    import socket
    import time

    from trainables.plugins import load_plugins

    load_plugins(plugins)
    models = {TEACHER: _build(None, None, None, teacher_path, None)[0]}
    models.update({name: _build(name, shape, num_classes, None, kw)[0] for name, kw in students.items()})
    start = time.time()
    times = interleaved_latency(models, tuple(shape), threads, rounds)
    return {"latency": times, "window": [start, time.time()], "threads": threads, "rounds": rounds, "host": socket.gethostname(),
            "order": "interleaved, the models' order rotating by round; each value the median over the rounds"}
