"""Teachers on disk: safetensors weights + a JSON card; loaded with checks, never unpickled. An
ensemble's folder holds ensemble.json, naming its members' folders (trainables.models.ensemble)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from trainables.atomic import atomic_path
from trainables.card import TeacherCard, build, read, write
from trainables.models.ensemble import ENSEMBLE, EnsembleCard, EnsembleTeacher, is_ensemble
from trainables.models import check_model, create_model
from trainables.registry import ConfigError, missing
from trainables.models.weights import file_sha256
from trainables.tensor_files import retied, untied

WEIGHTS, CARD = "teacher.safetensors", "teacher.json"


def save_teacher(model: nn.Module, out_dir: str | Path, card: TeacherCard | Mapping[str, Any]) -> TeacherCard:
    """Write weights and card; the card records the weights' sha256 so loads can verify them.
    `card`: every TeacherCard field but sha256 (a given one is replaced); one missing is a
    ConfigError raised before the weights file is put in place."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fields = card.model_dump() if isinstance(card, TeacherCard) else dict(card)
    state = untied(model.state_dict())
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(state, str(tmp))
        saved = build(TeacherCard, {**fields, "sha256": file_sha256(tmp)})
    write(saved, out / CARD)
    return saved


def read_card(path: str | Path) -> TeacherCard:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"`teacher.path` {missing(str(path), f'a teacher folder ({WEIGHTS} and {CARD}); train one with `kdsweep teacher CONFIG`')}")
    if not (p / CARD).is_file() or not (p / WEIGHTS).is_file():
        raise ConfigError(
            f"`teacher.path` must be a folder with {WEIGHTS} and {CARD}, but got teacher.path={str(path)!r}: "
            "train one with `kdsweep teacher CONFIG`"
        )
    return read(TeacherCard, p / CARD, "teacher.path")


def save_ensemble(out_dir: str | Path, members: list[str | Path], weights: list[float], combine: str, val_acc: float,
                  cards: list[TeacherCard] | None = None) -> EnsembleCard:
    """Write an ensemble's card over saved member teachers: `cards`, their cards as the caller's
    load_teacher just checked them, or None to load and check each here."""
    cards = cards if cards is not None else [load_teacher(m)[1] for m in members]
    first = cards[0]
    digest = hashlib.sha256(json.dumps([[c.sha256 for c in cards], weights, combine]).encode()).hexdigest()
    card = build(EnsembleCard, {
        "arch": "ensemble", "arch_kwargs": {}, "num_classes": first.num_classes, "input_shape": first.input_shape, "classes": first.classes,
        "mean": [0.0] * first.input_shape[0], "std": [1.0] * first.input_shape[0], "dataset": first.dataset, "sha256": digest,
        "val_acc": val_acc, "epochs": 0, "normalize": "auto", "combine": combine,
        "members": [{"path": str(Path(m).resolve()), "sha256": c.sha256, "arch": c.arch, "weight": w, "val_acc": c.val_acc}
                    for m, c, w in zip(members, cards, weights)],
    })
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write(card, Path(out_dir) / ENSEMBLE)
    return card


def load_ensemble(path: str | Path, num_classes: int | None = None, input_shape: tuple[int, ...] | None = None,
                  dataset: str | None = None, device: torch.device | str = "cpu") -> tuple[EnsembleTeacher, EnsembleCard]:
    """An ensemble in eval mode: every member loaded with load_teacher's checks, and each still the
    one the card recorded (its weights hash)."""
    card = read(EnsembleCard, Path(path) / ENSEMBLE, "teacher")
    models, stats = [], []
    for i, m in enumerate(card.members):
        try:
            model, member = load_teacher(m.path, num_classes or card.num_classes, input_shape or tuple(card.input_shape), dataset, device)
        except ConfigError as e:
            raise ConfigError(f"`teacher[{i}]` (ensemble member {m.path}): {e}") from None
        if member.sha256 != m.sha256:
            raise ConfigError(f"`teacher[{i}]` (ensemble member {m.path}) is not the teacher {path} was made from (its weights changed): "
                              f"delete {path} and run again")
        models.append(model)
        stats.append(member.stats)
    model = EnsembleTeacher(models, stats, [m.weight for m in card.members], card.combine)
    return model.to(device).eval(), card


def read_teacher_card(path: str | Path) -> TeacherCard:
    """A teacher folder's card alone (an ensemble's: its EnsembleCard), no weights read: what the
    sweep's cache is keyed by, on the driver; load_teacher checks the weights against it."""
    return read(EnsembleCard, Path(path) / ENSEMBLE, "teacher") if is_ensemble(path) else read_card(path)


def teacher_card_file(path: str | Path) -> Path:
    """The card of a teacher folder: teacher.json, or an ensemble's ensemble.json."""
    return Path(path) / (ENSEMBLE if is_ensemble(path) else CARD)


def weights_mtime(path: str | Path) -> int:
    """When a teacher folder last changed (its weights, or an ensemble's card): a warm process
    reloads a rewritten one."""
    p = Path(path)
    return ((p / ENSEMBLE) if is_ensemble(p) else (p / WEIGHTS)).stat().st_mtime_ns


def load_teacher(
    path: str | Path, num_classes: int | None = None, input_shape: tuple[int, ...] | None = None,
    dataset: str | None = None, device: torch.device | str = "cpu",
) -> tuple[nn.Module, TeacherCard]:
    """Load a teacher (or an ensemble of them) in eval mode, checking card, hash, architecture,
    class count and input shape."""
    if is_ensemble(path):
        return load_ensemble(path, num_classes, input_shape, dataset, device)
    card = read_card(path)
    p = Path(path)
    try:
        check_model(card.arch)
    except ValueError as e:
        raise ConfigError(f"`teacher.path` card names an unknown model: {e}") from None
    if num_classes is not None and card.num_classes != num_classes:
        raise ConfigError(
            f"`teacher.path` teacher has num_classes={card.num_classes} but the dataset has {num_classes}: "
            "use a teacher trained on this dataset"
        )
    if input_shape is not None and tuple(card.input_shape) != tuple(input_shape):
        raise ConfigError(
            f"`teacher.path` teacher takes input_shape={tuple(card.input_shape)} but the data are {tuple(input_shape)}: "
            "use a teacher trained on this dataset"
        )
    if dataset is not None and card.dataset != dataset:
        raise ConfigError(f"`teacher.path` teacher was trained on {card.dataset!r}, not dataset.name={dataset!r}")
    if file_sha256(p / WEIGHTS) != card.sha256:
        raise ConfigError(f"`teacher.path` weights do not match the card's sha256 (corrupt or replaced) in {path}: retrain the teacher")
    try:
        state = load_file(str(p / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"`teacher.path` has a corrupt {WEIGHTS} ({e}) in {path}: retrain the teacher") from None
    model = create_model(card.arch, card.num_classes, card.input_shape, **card.arch_kwargs)
    try:
        model.load_state_dict(retied(model, state))
    except RuntimeError as e:
        raise ConfigError(f"`teacher.path` weights do not fit arch={card.arch!r} ({str(e).splitlines()[0]}): retrain the teacher") from None
    for q in model.parameters():
        q.requires_grad_(False)
    return model.to(device).eval(), card
