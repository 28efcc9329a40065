"""The trial loop: one plain function that distils one student, standalone or as a Ray Train worker.

    train_student(config)                   # standalone: prints epochs, checkpoints to checkpoint_dir
    train_student(config, TuneReporter())   # a one-worker trial, in its (reused) Tune actor (trainables.trial, .reporters)
    train_loop_per_worker(config)           # inside a Ray Train TorchTrainer (DDP trials, >1 worker)

Hot loop: data already on the device as uint8, a seeded permutation per epoch, batched crop/flip,
bf16 autocast + channels_last on CUDA (eval forwards channels_last everywhere, the corruption suite bf16 on CPUs with
AMX too), and one host sync per epoch (the loss sums and the NaN check).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch
import torch.nn as nn
from torch import Tensor

from trainables.checkpoint import restore, snapshot
from trainables.card import TeacherCard
from trainables.config import TEACHER_LAYERS, TRIAL_CONFIG, DatasetConfig, OptimizerConfig, ScheduleConfig, TrialConfig, trial_from_dict
from trainables.eval.inference import predict, suite_autocast
from trainables.data import DataSplits
from trainables.data.batches import augment, batch_layout, train_batches
from trainables.data.placement import device_batches, place
from trainables.data.normalize import model_stats, normalizer
from trainables.losses import build_loss, check_fits
from trainables.plugins import load_plugins
from trainables.models import create_model, tap_layers
from trainables.models.profile import profile_together, size_report
from trainables.registry import ConfigError
from trainables.board import post_to
from trainables.reporters import PROGRESS, LocalReporter, RayTrainReporter, Reporter, TrialStopped
from trainables.tasks import Task, task_for
from trainables.targets import teacher_targets
from trainables.models.hf import check_copies_teacher, init_from_teacher
from trainables.models.teacher import load_teacher, weights_mtime
from trainables.models.weights import freeze_backbone, load_weights

log = logging.getLogger(__name__)

@dataclass
class TrialResult:
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    model: nn.Module | None = None
    preprocess: dict[str, list[float]] = field(default_factory=dict)  # the mean/std the model's inputs were normalized with


def make_optimizer(cfg: OptimizerConfig, params) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_schedule(opt: torch.optim.Optimizer, cfg: ScheduleConfig, epochs: int, steps_per_epoch: int):
    """Per-step LR multiplier: linear warm-up, then cosine to 0, step decay, or constant."""
    total, warm = epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    milestones = [m * total for m in cfg.milestones]

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.name == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1.0, total - warm)))
        if cfg.name == "step":
            return cfg.gamma ** sum(step >= m for m in milestones)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)



def epoch_means(sums: Tensor, steps: int, world: int) -> list[float]:
    """The epoch's mean loss terms over every rank, in one host sync: all ranks see the same
    numbers, so they take the same divergence decision and none waits alone in a collective."""
    if world > 1:
        torch.distributed.all_reduce(sums)
    return (sums / (steps * world)).tolist()


def _placement(cfg: TrialConfig, in_worker_group: bool) -> tuple[int, int, torch.device]:
    """(rank, world size, device): from Ray Train inside a worker group, else from the config."""
    if in_worker_group:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("`device=cuda` but no CUDA GPU is visible: use device=auto or cpu")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    return 0, 1, torch.device("cuda" if use_cuda else "cpu")


@functools.lru_cache(maxsize=2)
def _warm_splits(ds_json: str, device: str) -> tuple[DataSplits, bool]:
    ds = DatasetConfig.model_validate_json(ds_json)
    return place(task_for(ds.name).splits(ds), ds, device)


def _load_teacher(path: str, num_classes: int, shape: tuple[int, ...], dataset: str, device: str, channels_last: bool):
    teacher, card = load_teacher(path, num_classes, shape, dataset, device)
    return (teacher.to(memory_format=torch.channels_last) if channels_last else teacher), card


@functools.lru_cache(maxsize=2)
def _warm_teacher(mtime_ns: int, *args):  # the weights' mtime: a rewritten teacher folder loads anew
    return _load_teacher(*args)


def _splits(ds: DatasetConfig, device: torch.device, warm: bool) -> tuple[DataSplits, bool]:
    """The splits placed for `device`. A warm process (trial after trial) keeps them, on the
    device when they fit, so only its first trial reads, decodes and copies them."""
    if warm:
        return _warm_splits(ds.model_dump_json(), str(device))
    return place(task_for(ds.name).splits(ds), ds, device)


def _teacher(cfg: TrialConfig, num_classes: int, shape: tuple[int, ...], device: torch.device, channels_last: bool,
             warm: bool) -> tuple[nn.Module, TeacherCard]:
    """The trial's teacher in eval mode. A warm process keeps it between trials (not when layers
    are tapped for a feature loss: tapping changes the module)."""
    args = (cfg.teacher_path, num_classes, tuple(shape), cfg.dataset.name, str(device), channels_last)
    if warm and not cfg.loss.teacher_layers:
        return _warm_teacher(weights_mtime(cfg.teacher_path), *args)
    return _load_teacher(*args)


@dataclass
class Trial:
    """Everything the epoch loop uses, made once by `set_up` (data placed, models built and
    restored, the teacher's outputs decided)."""

    cfg: TrialConfig
    rank: int
    world: int
    device: torch.device
    autocast: Any
    channels_last: bool  # the training layout
    eval_channels_last: bool
    splits: DataSplits
    on_device: bool
    aug: Any
    mean: tuple[float, ...]
    std: tuple[float, ...]
    norm: Any
    student: nn.Module
    step_model: nn.Module  # the student as trained: DDP-wrapped and/or compiled
    loss_fn: nn.Module
    params: list
    opt: torch.optim.Optimizer
    sched: Any
    targets: Any
    size: dict[str, float]
    setup: dict[str, float]  # seconds per set-up phase, reported with the run's first epoch
    steps: int  # batches an epoch
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def task(self) -> Task:
        return task_for(self.cfg.dataset.name)

    def evaluate(self, model: nn.Module, x: Tensor) -> Tensor:
        return predict(model, x, self.norm, self.cfg.train.eval_batch_size, self.autocast, self.eval_channels_last, self.device)

    def evaluate_counted(self, model: nn.Module, x: Tensor) -> Tensor:
        """Eval forwards whose predictions are only counted (the corruption suites): bf16 where the device computes it natively."""
        bf16 = suite_autocast(self.device, self.cfg.train.amp)
        return predict(model, x, self.norm, self.cfg.train.eval_batch_size, bf16, self.eval_channels_last, self.device)


def set_up(cfg: TrialConfig, reporter: Reporter) -> Trial:
    """Data, teacher, student, loss, optimizer and schedule for one trial, restored from the
    reporter's checkpoint when it has one; each phase timed."""
    clock = time.perf_counter()
    setup: dict[str, float] = {}

    def phase(name: str) -> None:
        nonlocal clock
        setup[f"setup_{name}_s"], clock = time.perf_counter() - clock, time.perf_counter()

    rank, world, device = _placement(cfg, reporter.in_worker_group)
    cuda = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if (cuda and cfg.train.amp) else contextlib.nullcontext
    every, on_device = _splits(cfg.dataset, device, reporter.warm)  # images on the device, or batches copied from the host
    # Image batches in channels_last: on CUDA always; on CPU for eval forwards only (val, the corruption suite, the
    # teacher's targets: 5-40 % faster for the built-in convnets), as training there is faster for some and slower for others.
    eval_channels_last = cfg.train.channels_last and task_for(cfg.dataset.name).channels_last
    channels_last = cuda and eval_channels_last
    unlabeled = cfg.dataset.unlabeled
    splits = every
    own = cfg.student_kwargs.get("tokenizer")
    if own and own != cfg.dataset.tokenizer:  # a student with its own tokenizer: its own ids, example by
        splits, _ = _splits(cfg.dataset.model_copy(update={"tokenizer": own}), device, reporter.warm)  # example the teacher's
    if not cfg.loss.distills or (unlabeled is not None and unlabeled.ratio == 0):  # CE alone (a control, a teacher), or asked
        splits = splits.labeled()  # to leave them out: unlabelled examples would add nothing but steps
    mean, std = model_stats(cfg.normalize, cfg.student_weights is not None, cfg.student, splits)
    norm = normalizer(mean, std, device)
    n_train, shape = len(splits.train_y), splits.input_shape
    phase("data")
    if cfg.train.batch_size > n_train or cfg.train.batch_size % world:
        raise ConfigError(
            f"`train.batch_size` must be <= the {n_train} train images and divisible by {world} workers, but got train.batch_size={cfg.train.batch_size}"
        )
    batching = batch_layout(splits, cfg)  # batches an epoch, and each one's labelled/unlabelled mix
    batching.check_world(world)

    # The teacher trains the student only when the distill term has weight; with alpha=0 (the control) it is still
    # loaded, when given, so the control reports agreement and compression against it too.
    teacher, card = None, None
    if cfg.loss.distills and not cfg.teacher_path:
        raise ConfigError("`teacher_path` is required when loss.alpha (or loss.distill_weight) > 0: train one with `kdsweep teacher CONFIG`")
    if cfg.teacher_path:
        teacher, card = _teacher(cfg, splits.num_classes, shape, device, channels_last, reporter.warm)
    # Seeded here, after loading: a warm process skips the teacher's (random) construction, which
    # must not move the student's initialization.
    torch.manual_seed(cfg.seed)
    student = create_model(cfg.student, splits.num_classes, shape, **cfg.student_kwargs)
    if cfg.student_weights == TEACHER_LAYERS:
        check_copies_teacher(cfg.student, card.arch if card is not None else None)
        init_from_teacher(student, teacher)
    elif cfg.student_weights:
        load_weights(student, cfg.student_weights, "student_weights", new_head_ok=True)
    if cfg.freeze_backbone:
        freeze_backbone(student)
    student = student.to(device)
    if cfg.loss.layers_for(cfg.student):
        tap_layers(student, cfg.loss.layers_for(cfg.student), "loss.student_layers")
    if cfg.loss.teacher_layers and teacher is not None:
        tap_layers(teacher, cfg.loss.teacher_layers, "loss.teacher_layers")
    task = task_for(cfg.dataset.name)
    check_fits(cfg.loss.name, task.features, task.name.replace("_", " "), task.outputs)  # the driver's rule, again where the loss is built
    loss_fn = build_loss(cfg.loss.name, cfg.loss.params(), student, teacher if cfg.loss.distills else None, shape).to(device)
    size = {}
    if cfg.profile and rank == 0:  # standalone runs; a sweep profiles each architecture once (orchestrator.run.sweep)
        both = profile_together({"student": student, **({"teacher": teacher} if teacher is not None else {})}, task.inputs(shape))
        size = size_report(both["student"], both.get("teacher"))
    if channels_last:
        student = student.to(memory_format=torch.channels_last)

    params = [p for p in (*student.parameters(), *loss_fn.parameters()) if p.requires_grad]  # hint regressors train with the student
    opt = make_optimizer(cfg.train.optimizer, params)
    sched = make_schedule(opt, cfg.train.schedule, cfg.train.epochs, batching.steps)
    start_epoch, history = 0, []
    if (state := reporter.restore()) is not None:
        start_epoch, history = restore(state, student, loss_fn, opt, sched)
    model = student
    if world > 1:
        import ray.train.torch

        model = ray.train.torch.prepare_model(student, move_to_device=False)
    step_model = torch.compile(model) if cfg.train.compile else model
    phase("models")

    t_stats = card.stats if card is not None else (mean, std)  # each model its own statistics (the teacher's: its card's)
    t_norm = normalizer(*t_stats, device)
    if splits.train_x is not every.train_x and (loss_fn.needs_teacher_features or cfg.train.teacher_targets == "online"):
        raise ConfigError("`student_weights` gives this student its own tokenizer: its tokens are not the teacher's, so it distils "
                          "from cached logits only (loss kd, dkd or dist; train.teacher_targets auto)")
    targets = teacher_targets(cfg, teacher, card, loss_fn.needs_teacher_features, every, on_device,  # the cache covers every example
                              lambda model, x: predict(model, x, t_norm, cfg.train.eval_batch_size, autocast, eval_channels_last, device),
                              None if tuple(t_stats) == (tuple(mean), tuple(std)) else t_norm, channels_last)
    phase("targets")
    return Trial(cfg, rank, world, device, autocast, channels_last, eval_channels_last, splits, on_device, cfg.dataset.augment_or_default(), mean, std, norm, student,
                 step_model, loss_fn, params, opt, sched, targets, size, setup, batching.steps, start_epoch, history)


def train_student(config: dict | TrialConfig, reporter: Reporter | None = None) -> TrialResult:
    """Distil (or, with alpha=0 and no teacher, plainly train) one student; returns final metrics.
    A TrialConfig is used as built (on the driver); a dict is validated first."""
    cfg = config if isinstance(config, TrialConfig) else trial_from_dict(config)
    load_plugins(cfg.plugins)  # this process's registries know the models and losses the driver's knew
    reporter = reporter or LocalReporter(cfg.checkpoint_dir)
    t = set_up(cfg, reporter)
    student, loss_fn, opt, sched, targets, splits = t.student, t.loss_fn, t.opt, t.sched, t.targets, t.splits
    batch_size, steps_per_epoch = cfg.train.batch_size, t.steps
    norm, autocast, channels_last, step_model = t.norm, t.autocast, t.channels_last, t.step_model
    history, metrics = t.history, {}
    per_example = t.task.per_example(splits.input_shape)  # units an example counts for (a language model's block: its tokens)
    process = psutil.Process()
    last_checkpoint = time.monotonic()
    for epoch in range(t.start_epoch, cfg.train.epochs):
        student.train()
        loss_fn.set_epoch(epoch + 1, cfg.train.epochs)
        t0 = time.perf_counter()
        next_line = time.monotonic() + cfg.train.progress_every_s
        sums = torch.zeros(3, device=t.device)
        batches = train_batches(splits, cfg, epoch, t.device if t.on_device else "cpu", t.rank, t.world)
        for b, idx, images, y, view in device_batches(splits.train_x, splits.train_y, batches, t.device, t.on_device):
            if reporter.stop_requested():  # a plain flag read, no device sync
                raise TrialStopped
            if b and time.monotonic() >= next_line:  # a clock read; the line holds no tensor value
                reporter.progress(progress_line(epoch + 1, cfg.train.epochs, b, steps_per_epoch, b * batch_size * per_example,
                                                time.perf_counter() - t0, t.task.unit))
                next_line = time.monotonic() + cfg.train.progress_every_s
            raw = augment(images, view, t.aug)
            x = norm(raw)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            rolled = loss_fn.rollout(student, x, y, (cfg.seed, epoch, b))  # GKD's on-policy share: None but for token losses with lmbda > 0
            if rolled is not None:
                x, y = rolled
            with autocast():
                out = step_model(x, with_features=targets.features)
                s_logits, s_feats = out if targets.features else (out, None)
                if rolled is None:
                    t_logits, t_feats = targets.batch(raw, x, epoch, idx, loss_fn.temperature, s_logits)
                    loss, parts = loss_fn(s_logits, t_logits, y, s_feats, t_feats)
                else:  # the student's samples: the teacher scores them now (no cache holds them)
                    loss, parts = loss_fn(s_logits, targets.score(x), y, on_policy=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(t.params, cfg.train.grad_clip)
            opt.step()
            sched.step()
            sums += torch.stack([loss.detach(), parts["kd"], parts["ce"]])
        train_loss, train_kd, train_ce = epoch_means(sums, steps_per_epoch, t.world)  # the epoch's one host sync
        seconds = time.perf_counter() - t0

        diverged = not math.isfinite(train_loss)
        final = epoch + 1 == cfg.train.epochs and not diverged
        val, tables = t.task.validate(t, student, final)  # the task's numbers; after the final epoch, its tables and robustness suite
        metrics = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "train_kd": train_kd,
            "train_ce": train_ce,
            **val,
            "val_loss": val["val_nll"],
            t.task.throughput: steps_per_epoch * batch_size * per_example / seconds,
            "epoch_time_s": seconds,
            "lr": opt.param_groups[0]["lr"],
            "teacher_forward_images": targets.teacher_forwards,
            "teacher_targets": targets.source,
            "process_rss_mb": process.memory_info().rss / 2**20,
            "trial_pid": process.pid,
            **loss_fn.now(),
            **t.size,
            **(t.setup if epoch == t.start_epoch else {}),
        }
        metrics["status"] = "diverged" if diverged else ("finished" if final else "running")
        history.append({k: v for k, v in metrics.items() if k not in t.size})
        state = None
        if t.rank == 0 and not diverged and cfg.train.checkpoint_due(epoch + 1, time.monotonic() - last_checkpoint):
            last_checkpoint = time.monotonic()
            state = snapshot(epoch + 1, student, loss_fn, opt, sched, history, tables, t.mean, t.std)
        reporter.report(metrics, state)
        if diverged:
            break
    return TrialResult(metrics=metrics, history=history, model=student.float().cpu().eval(),
                       preprocess={"mean": list(t.mean), "std": list(t.std)})


def progress_line(epoch: int, epochs: int, done: int, steps: int, examples: int, seconds: float, unit: str) -> str:
    """`epoch=3/10  batch 120/400 (30 %)  850 images/s  epoch ETA 33 s`: `done` batches (of this
    process's share) after `seconds`. On a GPU the rate is the host's: kernels may still be queued."""
    rate = examples / seconds if seconds > 0 else 0.0
    eta = (steps - done) * seconds / done if done else float("nan")
    return f"epoch={epoch}/{epochs}  batch {done}/{steps} ({100 * done // max(1, steps)} %)  {rate:.0f} {unit}/s  epoch ETA {eta:.0f} s"


def train_loop_per_worker(config: dict) -> None:
    """Entry point for ray.train.torch.TorchTrainer(train_loop_per_worker=...): the TrialConfig the
    driver built, under TRIAL_CONFIG."""
    board, trial_id = config.get(PROGRESS) or (None, None)
    train_student(config[TRIAL_CONFIG], RayTrainReporter(post_to(board, trial_id)))
