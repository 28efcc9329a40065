"""Driver-side checks and set-up that must happen before Ray starts: data, teacher."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config import SweepConfig
from trainables.data import load_splits
from trainables.loop import train_student
from trainables.teacher import CARD, WEIGHTS, load_teacher, read_card, save_teacher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataInfo:
    num_classes: int
    input_shape: tuple[int, ...]
    n_train: int
    n_val: int
    n_test: int


def check_data(cfg: SweepConfig) -> DataInfo:
    """Load the dataset once on the driver: a missing root fails here, not inside a worker."""
    s = load_splits(cfg.dataset)
    return DataInfo(s.num_classes, s.input_shape, len(s.train_y), len(s.val_y), len(s.test_y))


def check_teacher(cfg: SweepConfig, info: DataInfo, train_missing: bool = False) -> Path | None:
    """Verify an existing teacher against the data; None when one is still to be trained.

    A teacher.path the user named must exist unless we are asked to train into it
    (`kdsweep teacher`); the automatic teachers/ cache is filled on demand.
    """
    path = cfg.teacher_dir()
    if not (path / CARD).exists() and not (path / WEIGHTS).exists():
        if cfg.teacher.path is not None and not train_missing:
            read_card(path)  # raises the one-line "train one with `kdsweep teacher CONFIG`"
        return None
    load_teacher(path, info.num_classes, info.input_shape, cfg.dataset.name)
    return path


def ensure_teacher(cfg: SweepConfig, info: DataInfo, train_missing: bool = True) -> Path:
    """Return a verified teacher folder, training (and caching) one when it is missing."""
    path = check_teacher(cfg, info, train_missing)
    if path is not None:
        return path
    path = cfg.teacher_dir()
    log.info("training teacher %s on %s -> %s", cfg.teacher.arch, cfg.dataset.name, path)
    result = train_student(cfg.teacher_trial())
    card = {
        "arch": cfg.teacher.arch, "arch_kwargs": cfg.teacher.arch_kwargs, "dataset": cfg.dataset.name,
        "num_classes": info.num_classes, "input_shape": list(info.input_shape),
        "val_acc": result.metrics["val_acc"], "epochs": cfg.teacher.epochs,
    }
    save_teacher(result.model, path, card)
    log.info("teacher val_acc=%.4f saved to %s", card["val_acc"], path)
    return path
