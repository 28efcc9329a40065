"""Driver-side checks before Ray starts (data, weights files, an existing teacher) and the
teacher's training when it is missing: a Ray task in a sweep, in-process for the standalone
commands."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from orchestrator.plan.config import SweepConfig, preparing
from trainables.api import (CARD, WEIGHTS, check_copies_teacher, check_fits, check_weights_file, ensemble_val_acc, is_ensemble, load_teacher,
                            model_from_state, read_card, save_ensemble, save_teacher, score_pretrained, task_for, teacher_task, train,
                            weights_sha256)
from trainables.config import TEACHER_LAYERS
from trainables.registry import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataInfo:
    num_classes: int
    input_shape: tuple[int, ...]
    n_train: int  # labelled
    n_val: int
    n_test: int
    classes: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()  # undecodable files of an image folder
    decode_s: float = 0.0  # seconds the driver spent decoding (0: the decode-once cache had it)
    n_unlabeled: int = 0  # dataset.unlabeled: train examples without labels


def check_data(cfg: SweepConfig) -> DataInfo:
    """Load the dataset once on the driver: a missing root fails here, not inside a worker, and an
    image folder is decoded here, before Ray starts, for every later load to memory-map."""
    with preparing(cfg.prepare):
        s = cfg.task.splits(cfg.dataset)
        info = DataInfo(s.num_classes, s.input_shape, s.n_labeled, len(s.val_y), len(s.test_y), s.classes, s.skipped, s.decode_s, s.n_unlabeled)
        check_models_fit(cfg, info)
    return info


def check_models_fit(cfg: SweepConfig, info: DataInfo) -> None:
    """Every model against the task: the families it takes, the losses whose features its models
    give, one teacher or an ensemble, and the task's own checks (text: vocabularies and positions
    hold the data's tokens, a student taking the teacher's layers has its sizes). From configs only,
    before anything is built."""
    for s, weights in cfg.student_weights.items():
        if weights == TEACHER_LAYERS:
            t = cfg.teacher
            card = Path(t.path) / CARD if t.path and not cfg.is_ensemble else None
            check_copies_teacher(s, "ensemble" if cfg.is_ensemble else read_card(t.path).arch if card and card.is_file() else t.arch)
    task = task_for(cfg.dataset.name)
    task.check_teachers(len(cfg.members))
    named = [(f"teacher{f'[{i}]' if cfg.is_ensemble else ''}.arch", t.arch) for i, t in enumerate(cfg.members) if not t.path]
    for field, arch in named + [("students", s) for s in cfg.students]:
        task.check_model(field, arch)
    for method in cfg.methods:
        check_fits(method, task.features, task.name.replace("_", " "), task.outputs)
    task.check_models(cfg, info.input_shape)


def check_weights(cfg: SweepConfig, info: DataInfo, teacher: bool = True) -> None:
    """Every weights file against its architecture, on the driver, before Ray starts: wrong keys,
    shapes or a file that holds no tensors fail here with the keys named, never in a worker."""
    if teacher and cfg.teacher.weights:
        t = cfg.teacher
        new_head = check_weights_file(t.arch, info.num_classes, info.input_shape, cfg.teacher_kwargs(), t.weights, "teacher.weights")
        if new_head and t.finetune.epochs == 0:
            raise ConfigError(f"`teacher.finetune.epochs` must be >= 1: teacher.weights has a head of another class count than the "
                              f"dataset's {info.num_classes}, and the new head must be trained")
    for student, path in cfg.student_weights.items():
        if path == TEACHER_LAYERS:  # the teacher's layers: checked against the teacher's config (check_models_fit)
            continue
        check_weights_file(student, info.num_classes, info.input_shape, cfg.student_kwargs(student), path, f"student_weights.{student}")


def _as_member(i: int, e: ConfigError) -> ConfigError:
    """A single teacher's message about an ensemble's member i: its fields named `teacher[i].`."""
    return ConfigError(str(e).replace("`teacher.", f"`teacher[{i}]."))


def check_teacher(cfg: SweepConfig, info: DataInfo, train_missing: bool = False) -> Path | None:
    """Verify an existing teacher against the data, and every weights file; None when the teacher
    is still to be trained (or fine-tuned). An ensemble: every member (each error names its
    member), then its own folder.

    A teacher.path the user named must exist unless we are asked to train into it
    (`kdsweep teacher`); the automatic teachers/ cache is filled on demand.
    """
    with preparing(cfg.prepare):
        if cfg.is_ensemble:
            found = []
            for i in range(len(cfg.members)):
                try:
                    found.append(check_teacher(cfg.member(i), info, train_missing))
                except ConfigError as e:
                    raise _as_member(i, e) from None
            path = cfg.teacher_dir()
            if all(found) and is_ensemble(path):
                load_teacher(path, info.num_classes, info.input_shape, cfg.dataset.name)
                return path
            return None
        path = cfg.teacher_dir()
        missing = not (path / CARD).exists() and not (path / WEIGHTS).exists()
        check_weights(cfg, info, teacher=missing)
        if missing:
            if cfg.teacher.path is not None and not train_missing:
                read_card(path)  # raises the one-line "train one with `kdsweep teacher CONFIG`"
            return None
        load_teacher(path, info.num_classes, info.input_shape, cfg.dataset.name)
        return path


def ensure_teacher(cfg: SweepConfig, info: DataInfo, train_missing: bool = True, on_ray: bool = False,
                   beside: Callable[[], None] | None = None) -> Path:
    """Return a verified teacher folder, training (and caching) one when it is missing: in this
    process, or with `on_ray` (a sweep: Ray is up) in a Ray task holding one trial's resources, so
    with --address it trains on a node where trials train, not on the head's CPU. `beside()` is
    called once that task is queued: what should run beside it queues behind it, not before."""
    path = check_teacher(cfg, info, train_missing)
    if path is not None:
        return path
    if cfg.is_ensemble:
        return ensure_ensemble(cfg, info, train_missing, on_ray, beside)
    path, t = cfg.teacher_dir(), cfg.teacher
    card = {"arch": t.arch, "arch_kwargs": cfg.teacher_kwargs(), "dataset": cfg.dataset.name,
            "num_classes": info.num_classes, "input_shape": list(info.input_shape), "classes": list(info.classes)}
    if t.weights:
        card.update(weights=t.weights, weights_sha256=weights_sha256(t.weights), finetune=t.finetune.model_dump())
    if t.weights and t.finetune.epochs == 0:
        log.info("teacher %s from %s as is (finetune.epochs=0) -> %s", t.arch, t.weights, path)
        model, preprocess, val_acc = pretrained_as_is(cfg, cfg.task.splits(cfg.dataset))
        card.update(val_acc=val_acc, epochs=0)
    else:
        how = f"fine-tuning {t.weights} for {t.finetune.epochs} epochs" if t.weights else f"{t.epochs} epochs"
        log.info("training teacher %s on %s (%s) -> %s", t.arch, cfg.dataset.name, how, path)
        if on_ray:
            out = train_on_ray(cfg, beside)
            model = model_from_state(t.arch, info.num_classes, info.input_shape, cfg.teacher_kwargs(), out["state"])
            metrics, preprocess = out["metrics"], out["preprocess"]
            card.update(node_id=out["node_id"])
        else:
            result = train(cfg.teacher_trial())  # standalone commands (kdsweep teacher, distill) train in-process
            model, metrics, preprocess = result.model, result.metrics, result.preprocess
        card.update(val_acc=metrics["val_acc"], epochs=metrics["epoch"])
        key = cfg.primary.key  # the task's objective (val_acc; a language model's val_ppl), said beside the card's val_acc
        if key != "val_acc" and key in metrics:
            log.info("teacher %s=%.4f", key, metrics[key])
    card.update(preprocess, normalize=t.normalize)  # mean/std: what every trial, the cache and exports feed it
    saved = save_teacher(model, path, card)  # a trainables.card.TeacherCard: a missing field fails here
    task_for(cfg.dataset.name).save_with_teacher(cfg.dataset, path)  # text: its tokenizer, so the folder is a teacher.path on its own
    log.info("teacher val_acc=%.4f saved to %s", saved.val_acc, path)
    return path


def ensure_ensemble(cfg: SweepConfig, info: DataInfo, train_missing: bool, on_ray: bool, beside: Callable[[], None] | None = None) -> Path:
    """Each member found or trained (as a single teacher is), then the ensemble's card written
    beside them, with the ensemble's own val accuracy (each member's is on its own card)."""
    members = []
    for i in range(len(cfg.members)):
        try:
            members.append(ensure_teacher(cfg.member(i), info, train_missing, on_ray, beside).resolve())
        except ConfigError as e:
            raise _as_member(i, e) from None
    val_acc, cards = ensemble_val_acc(members, cfg.ensemble_weights, cfg.ensemble.combine, cfg.task.splits(cfg.dataset))
    path = cfg.teacher_dir()
    save_ensemble(path, members, cfg.ensemble_weights, cfg.ensemble.combine, val_acc, cards)  # checked above
    log.info("teacher ensemble %s (%s): val_acc=%.4f (members %s) -> %s", cfg.teacher_name, cfg.ensemble.combine, val_acc,
             ", ".join(f"{card.val_acc:.4f}" for card in cards), path)
    return path


def train_on_ray(cfg: SweepConfig, beside: Callable[[], None] | None = None) -> dict:
    """The teacher's training as a Ray task with one trial's resources (a streaming generator: its
    epochs are logged here as they finish), `beside()` called once it is queued. Returns
    trainables.trial.teacher_task's result."""
    import ray

    from trainables.eval.metrics import format_epoch

    r = cfg.resources
    task = ray.remote(num_cpus=r.cpus_per_trial, num_gpus=r.gpus_per_trial, max_retries=cfg.budget.max_failures,
                      num_returns="streaming")(teacher_task)
    epochs = task.remote(cfg.teacher_trial())
    if beside is not None:
        beside()
    try:
        for ref in epochs:
            item = ray.get(ref)
            if "epoch" in item:
                log.info("teacher %s", format_epoch(item["epoch"]))
            elif "progress" in item:
                log.info("teacher %s", item["progress"])
            else:
                return item["result"]
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, ConfigError):  # the user's error, raised in the task: one line, as on the driver
            raise e.cause from None
        raise
    raise RuntimeError("the teacher's task ended without its result")


def pretrained_as_is(cfg: SweepConfig, splits):
    """A teacher whose weights file already fits the dataset: loaded and scored on val, not trained."""
    t = cfg.teacher
    return score_pretrained(t.arch, cfg.teacher_kwargs(), t.weights, t.normalize, splits, t.eval_batch_size)
