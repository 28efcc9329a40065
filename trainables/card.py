"""Model cards: the JSON beside a teacher's or a student's weights, written and read only here.

One typed card per kind (pydantic, unknown keys rejected). A card that lacks a field, or holds a
wrong one, is a one-line ConfigError naming the file, the fields and the fix; nothing is defaulted
on read (a teacher's or student's input statistics are never guessed from the data).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Mapping, TypeVar

from pydantic import Field, ValidationError, model_validator

from trainables.atomic import atomic_path
from trainables.config import Normalize
from trainables.schema import Strict, format_errors
from trainables.registry import ConfigError


class ModelCard(Strict):
    """What any saved model needs to be rebuilt and fed: its architecture and its inputs."""

    #: Which card this is, and what to do when a file of it is missing, corrupt or incomplete.
    kind: ClassVar[str] = "model"
    fix: ClassVar[str] = "write the card again"

    arch: str
    arch_kwargs: dict[str, Any]
    num_classes: int = Field(ge=1)
    input_shape: list[int] = Field(min_length=1)
    classes: list[str]
    mean: list[float] = Field(description="per-channel input mean, 0..1 pixel scale; [] for token ids")
    std: list[float] = Field(description="per-channel input std, 0..1 pixel scale; [] for token ids")

    @model_validator(mode="after")
    def _stats(self) -> "ModelCard":
        channels = self.input_shape[0] if len(self.input_shape) == 3 else 0  # (C, H, W) images; (L,) token ids take no statistics
        if not len(self.mean) == len(self.std) == channels:
            raise ValueError(f"`mean` and `std` must have one value per input channel ({channels}), "
                             f"but got {len(self.mean)} and {len(self.std)}")
        if not all(s > 0 for s in self.std):
            raise ValueError(f"`std` must be > 0 for every channel, but got std={self.std}")
        return self

    @property
    def stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std): what this model's inputs are normalized with (trainables.data.normalize)."""
        return tuple(self.mean), tuple(self.std)


class TeacherCard(ModelCard):
    """teacher.json beside teacher.safetensors (trainables.models.teacher)."""

    kind: ClassVar[str] = "teacher"
    fix: ClassVar[str] = "delete its folder and train it again (`kdsweep teacher CONFIG`, or a sweep trains a missing one)"

    dataset: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="of the weights file, checked on every load")
    val_acc: float
    epochs: int = Field(ge=0)
    normalize: Normalize
    weights: str | None = Field(None, description="the pretrained file it started from")
    weights_sha256: str | None = None
    finetune: dict[str, Any] | None = None
    node_id: str | None = Field(None, description="the Ray node that trained it")


class StudentCard(ModelCard):
    """student.json beside student.safetensors (MLflow artifacts and `kdsweep export`)."""

    kind: ClassVar[str] = "student"
    fix: ClassVar[str] = "retrain the student (a new sweep logs a complete card)"

    epoch: int = Field(ge=0)
    input: str | None = Field(None, description="exports: how the raw inputs are to be fed")


C = TypeVar("C", bound=ModelCard)


def _say(field: str | None, article: str, body: str) -> str:
    """"`field` has a <body>" when a setting pointed at the file, else the body alone."""
    return f"`{field}` has {article}{body}" if field else body


def build(cls: type[C], data: Mapping[str, Any], source: str | Path | None = None, field: str | None = None) -> C:
    """A validated card from `data`; ConfigError (one line: the file `source`, the fields, the fix)
    if it does not fit."""
    try:
        return cls.model_validate(dict(data))
    except ValidationError as e:
        what = f"{Path(str(source)).name} at {source}" if source else f"{cls.kind} card"
        raise ConfigError(_say(field, "an ", f"incomplete or invalid {what} ({format_errors(e)}): {cls.fix}")) from None


def write(card: ModelCard, path: str | Path) -> Path:
    """Atomically (a reader never sees half a card), keys sorted; unset optional fields left out."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(card.model_dump(mode="json", exclude_none=True), indent=2, sort_keys=True) + "\n")
    return path


def read(cls: type[C], path: str | Path, field: str | None = None, shown_as: str | None = None) -> C:
    """The card at `path`, validated as `cls`; a missing, corrupt or incomplete file is a one-line
    ConfigError naming the file (and `field`, the setting that pointed at it) and the fix.
    `shown_as`: how messages name the file when `path` is a temporary copy (e.g. an MLflow
    artifact's runs:/ URI)."""
    path = Path(path)
    shown = shown_as or str(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(_say(field, "", f"no {path.name} at {shown}: {cls.fix}")) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        reason = f"{e.msg} at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
        raise ConfigError(_say(field, "a ", f"corrupt {path.name} ({reason}) at {shown}: {cls.fix}")) from None
    if not isinstance(data, dict):
        raise ConfigError(_say(field, "a ", f"corrupt {path.name} (not a JSON object) at {shown}: {cls.fix}"))
    return build(cls, data, shown, field)
