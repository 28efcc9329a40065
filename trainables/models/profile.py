"""Size metrics of any model: parameters, serialized bytes, median latency, FLOPs."""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import statistics
import time
from typing import Iterator

import torch
import torch.nn as nn
from safetensors.torch import save as st_save
from torch.utils.flop_counter import FlopCounterMode

from trainables.tasks import Inputs, task_named
from trainables.tensor_files import untied


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def serialized_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict as safetensors (what a deployment would ship)."""
    return len(st_save(untied(model.state_dict())))


@torch.no_grad()
def flops(model: nn.Module, inputs: Inputs) -> int:
    """Forward FLOPs for one example (torch.utils.flop_counter; a multiply-add counts as 2)."""
    p = next(model.parameters())
    x = inputs.example(1, p.device, p.dtype)
    with FlopCounterMode(display=False) as fc:
        model(x)
    return int(fc.get_total_flops())


def _timer(model: nn.Module, x: torch.Tensor, threads: int):
    # torch.utils.benchmark imports cpp_extension, which warns about CUDA_HOME on CPU-only machines
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import torch.utils.benchmark as benchmark

    return benchmark.Timer(stmt="model(x)", globals={"model": model, "x": x}, num_threads=threads)


@torch.no_grad()
def latency_ms(model: nn.Module, inputs: Inputs, batch: int, device: torch.device | str, min_run_time: float = 0.2) -> float:
    """Median time of one forward pass in ms (torch.utils.benchmark: warm-up, CUDA synchronised,
    enough runs to fill `min_run_time`)."""
    x = inputs.example(batch, device)
    return _timer(model, x, torch.get_num_threads()).blocked_autorange(min_run_time=min_run_time).median * 1e3


def latency_settings(inputs: Inputs, batch: int = 64, gpu: bool | None = None) -> dict[str, tuple[tuple[int, ...], int, str]]:
    """Every latency a profile reports: key -> (input shape, batch, device). Batch 1 (a request at
    a time: what a deployment waits for) on the CPU and on CUDA when there is one, at each input
    size the task names (text: also 25 % and 50 % of its length); batch `batch` on CUDA only (a
    large teacher's batch on one CPU thread costs seconds a forward, several times over, and says
    little a batch-1 time does not)."""
    variants = inputs.variants()
    devices = ["cpu", *(["gpu"] if (torch.cuda.is_available() if gpu is None else gpu) else [])]
    out = {}
    for d in devices:
        out[f"latency_{d}_b1_ms"] = (inputs.shape, 1, d)
        if d == "gpu":
            out[f"latency_{d}_b{batch}_ms"] = (inputs.shape, batch, d)
        out.update({f"latency_{d}_b1{k}_ms": (shape, 1, d) for k, shape in variants.items() if k})
    return out


@torch.no_grad()
def interleaved_latency(models: dict[str, nn.Module], inputs: Inputs, threads: int, rounds: int = 7, batch: int = 64,
                        gpu: bool | None = None, budget_s: float = 1.0, block_s: float = 0.01,
                        rounds_used: dict[str, int] | None = None) -> dict[str, dict[str, float]]:
    """Each model's latency (ms) per setting (latency_settings), timed back to back and interleaved:
    each round times every model once, the models' order rotating by round, with `threads` CPU
    threads; the value is the median over the rounds. Load that comes and goes then falls on every
    model alike, so their ratios (a student's speedup over its teacher) hold.

    Per setting: one warm-up call per model, one to size its block (calls filling `block_s`), then
    as many rounds as fit `budget_s` (3 at least, `rounds` at most): a large teacher at batch 64
    costs a few of its forwards, not a fixed number of seconds of them. `rounds_used` receives
    each setting's count."""
    names = list(models)
    ready = {n: copy.deepcopy(m).float().eval().cpu() for n, m in models.items()}
    settings = latency_settings(inputs, batch, gpu)
    on_gpu = {n: copy.deepcopy(m).cuda() for n, m in ready.items()} if any(d == "gpu" for *_, d in settings.values()) else {}
    out: dict[str, dict[str, float]] = {n: {} for n in names}
    with _threads(threads):
        for key, (shape, b, device) in settings.items():
            x = inputs.example(b, "cuda" if device == "gpu" else "cpu", shape=shape)
            _time_setting(on_gpu if device == "gpu" else ready, x, key, out, rounds, budget_s, block_s, rounds_used)
        # the task's own timed forms (a language model: its greedy generation, per generated token), CPU, batch 1
        for key, (shape, wrap, per) in task_named(inputs.task).timed_forms(inputs.shape).items():
            _time_setting({n: wrap(m) for n, m in ready.items()}, inputs.example(1, "cpu", shape=shape), key, out, rounds, budget_s, block_s,
                          rounds_used, per)
    return out


def _time_setting(models: dict[str, nn.Module], x: torch.Tensor, key: str, out: dict[str, dict[str, float]], rounds: int, budget_s: float,
                  block_s: float, rounds_used: dict[str, int] | None, per: int = 1) -> None:
    """One setting of interleaved_latency: milliseconds per call (divided by `per`, the units a call makes)."""
    names = list(models)
    once, calls = {}, {}
    for n in names:
        _per_call(models[n], x, 1)  # warm-up: allocations, kernels chosen
        once[n] = max(_per_call(models[n], x, 1), 1e-7)
        calls[n] = max(1, math.ceil(block_s / once[n]))
    per_round = sum(calls[n] * once[n] for n in names)
    samples: dict[str, list[float]] = {n: [] for n in names}
    count = max(3, min(rounds, int(budget_s / max(per_round, 1e-9))))
    if rounds_used is not None:
        rounds_used[key] = count
    for r in range(count):
        for n in names[r % len(names):] + names[:r % len(names)]:
            samples[n].append(_per_call(models[n], x, calls[n]) * 1e3 / per)
    for n in names:
        out[n][key] = statistics.median(samples[n])


def _per_call(model: nn.Module, x: torch.Tensor, calls: int) -> float:
    """Seconds per forward over `calls` back-to-back forwards (CUDA synchronised)."""
    cuda = x.is_cuda
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        model(x)
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def static_size(model: nn.Module, inputs: Inputs) -> dict[str, float]:
    """params, bytes and FLOPs: what does not depend on when or where it is measured."""
    m = copy.deepcopy(model).float().eval().cpu()
    return {"params": float(param_count(m)), "bytes": float(serialized_bytes(m)), "flops": float(flops(m, inputs))}


def size_metrics(model: nn.Module, inputs: Inputs, batch: int = 64, gpu: bool | None = None) -> dict[str, float]:
    """params, bytes, FLOPs and latency (latency_settings: batch 1, and `batch` on CUDA) of one
    model alone; to compare models, time them together (profile_together)."""
    return {**static_size(model, inputs),
            **interleaved_latency({"m": model}, inputs, torch.get_num_threads(), rounds=3, batch=batch, gpu=gpu)["m"]}


def profile_together(models: dict[str, nn.Module], inputs: Inputs, threads: int = 1, rounds: int = 7) -> dict[str, dict[str, float]]:
    """Size metrics of several models whose latencies are compared (a student and its teacher):
    static sizes, and latencies timed interleaved (interleaved_latency)."""
    times = interleaved_latency(models, inputs, threads, rounds)
    return {n: {**static_size(m, inputs), **times[n]} for n, m in models.items()}


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


def profile_sizes(task: str, arch: str | None = None, shape: list[int] | None = None, num_classes: int | None = None,
                  teacher_path: str | None = None, plugins: list[str] = (), arch_kwargs: dict | None = None) -> dict[str, float]:
    """The static sizes (static_size) of one architecture, freshly built, or of the saved teacher
    (orchestrator.run.sweep.Profiles, in a driver thread). Nothing here is timed: it may run beside
    anything."""
    from trainables.plugins import load_plugins

    load_plugins(plugins)
    model, shape = _build(arch, shape, num_classes, teacher_path, arch_kwargs)
    return static_size(model, task_named(task).inputs(shape))


#: The name of the teacher among the models a latency task times.
TEACHER = "teacher"


def latency_task(task: str, teacher_path: str, students: dict[str, dict], shape: list[int], num_classes: int, plugins: list[str] = (),
                 threads: int = 1, rounds: int = 7) -> dict:
    """Ray task body (orchestrator.run.sweep.Profiles.measure_latency), run while no trial runs: the
    teacher and every student (name -> create_model kwargs) timed interleaved, `threads` threads.
    Returns the latencies by model, and how and when they were measured (wall-clock window)."""
    import socket
    import time

    from trainables.plugins import load_plugins

    load_plugins(plugins)
    models = {TEACHER: _build(None, None, None, teacher_path, None)[0]}
    models.update({name: _build(name, shape, num_classes, None, kw)[0] for name, kw in students.items()})
    start, used = time.time(), {}
    times = interleaved_latency(models, task_named(task).inputs(shape), threads, rounds, rounds_used=used)
    return {"latency": times, "window": [start, time.time()], "threads": threads, "rounds": used, "host": socket.gethostname(),
            "order": "interleaved, the models' order rotating by round; each value the median over the rounds"}
