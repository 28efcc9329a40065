"""Teachers on disk: safetensors weights + a JSON card; loaded with checks, never unpickled."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from trainables.atomic import atomic_path
from trainables.models import check_model, create_model
from trainables.registry import ConfigError
from trainables.weights import file_sha256

WEIGHTS, CARD = "teacher.safetensors", "teacher.json"


def save_teacher(model: nn.Module, out_dir: str | Path, card: dict[str, Any]) -> dict[str, Any]:
    """Write weights and card; the card records the weights' sha256 so loads can verify them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    card = {**card, "sha256": file_sha256(out / WEIGHTS)}
    with atomic_path(out / CARD) as tmp:
        tmp.write_text(json.dumps(card, indent=2, sort_keys=True))
    return card


def teacher_stats(card: dict[str, Any], splits) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) the teacher's inputs are normalized with: its card's (cards before these
    were recorded: the data's train statistics, what such teachers were trained with)."""
    if "mean" in card and "std" in card:
        return tuple(card["mean"]), tuple(card["std"])
    return splits.mean, splits.std


def read_card(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not (p / CARD).is_file() or not (p / WEIGHTS).is_file():
        raise ConfigError(
            f"`teacher.path` must be a folder with {WEIGHTS} and {CARD}, but got teacher.path={str(path)!r}: "
            "train one with `kdsweep teacher CONFIG`"
        )
    try:
        card = json.loads((p / CARD).read_text())
        for key in ("arch", "num_classes", "input_shape", "sha256"):
            card[key]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"`teacher.path` has a corrupt {CARD} ({e!r}) in {path}: retrain the teacher") from None
    return card


def load_teacher(
    path: str | Path, num_classes: int | None = None, input_shape: tuple[int, ...] | None = None,
    dataset: str | None = None, device: torch.device | str = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a teacher in eval mode, checking hash, architecture, class count and input shape."""
    card = read_card(path)
    p = Path(path)
    try:
        check_model(card["arch"], "arch")
    except ValueError as e:
        raise ConfigError(f"`teacher.path` card names an unknown model: {e}") from None
    if num_classes is not None and card["num_classes"] != num_classes:
        raise ConfigError(
            f"`teacher.path` teacher has num_classes={card['num_classes']} but the dataset has {num_classes}: "
            "use a teacher trained on this dataset"
        )
    if input_shape is not None and tuple(card["input_shape"]) != tuple(input_shape):
        raise ConfigError(
            f"`teacher.path` teacher takes input_shape={tuple(card['input_shape'])} but the data are {tuple(input_shape)}: "
            "use a teacher trained on this dataset"
        )
    if dataset is not None and card.get("dataset") not in (None, dataset):
        raise ConfigError(f"`teacher.path` teacher was trained on {card['dataset']!r}, not dataset.name={dataset!r}")
    if file_sha256(p / WEIGHTS) != card["sha256"]:
        raise ConfigError(f"`teacher.path` weights do not match the card's sha256 (corrupt or replaced) in {path}: retrain the teacher")
    try:
        state = load_file(str(p / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"`teacher.path` has a corrupt {WEIGHTS} ({e}) in {path}: retrain the teacher") from None
    model = create_model(card["arch"], card["num_classes"], card["input_shape"], **card.get("arch_kwargs", {}))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"`teacher.path` weights do not fit arch={card['arch']!r} ({str(e).splitlines()[0]}): retrain the teacher") from None
    for q in model.parameters():
        q.requires_grad_(False)
    return model.to(device).eval(), card
