"""The building blocks of kdsweep's configs, a leaf both sides read: strict pydantic models, one
ConfigError that lists every problem of a config, and the loss schedule's types (the losses
read them without importing the configs that hold them)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trainables.registry import MISSING, ConfigError

M = TypeVar("M", bound=BaseModel)

#: Where kdsweep keeps what it derives from data (decoded, tokenized, downloaded) unless `dataset.cache` says otherwise.
DEFAULT_CACHE = Path.home() / ".cache" / "kdsweep"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Ramp(Strict):
    """One loss value over a trial's epochs: the loss's own value at epoch 1, `end` at the last."""

    name: Literal["constant", "linear", "cosine"] = "linear"
    end: float | None = Field(None, description="the value at the last epoch (linear, cosine)")

    @model_validator(mode="after")
    def _end(self) -> "Ramp":
        if (self.name == "constant") != (self.end is None):
            raise ValueError("a linear or cosine schedule needs `end`; a constant one takes none")
        return self

    def at(self, start: float, epoch: int, epochs: int) -> float:
        """The value for `epoch` (from 1) of `epochs`."""
        if self.end is None:
            return start
        u = (epoch - 1) / (epochs - 1) if epochs > 1 else 1.0
        if self.name == "linear":
            return start + (self.end - start) * u
        return self.end + (start - self.end) * (1 + math.cos(math.pi * u)) / 2


class LossSchedule(Strict):
    """How `alpha` and `temperature` move over a trial (from their loss values to each ramp's end)."""

    alpha: Ramp | None = None
    temperature: Ramp | None = None


def _loc(err: dict) -> str:
    """`a.b[0].c` from pydantic's location tuple (list items by index)."""
    out = ""
    for p in err["loc"]:
        if isinstance(p, int):
            out += f"[{p}]"
        elif not str(p).startswith("function-"):
            out += f".{p}" if out else str(p)
    return out


def format_errors(e: ValidationError, source: str | None = None, prefix: str = "") -> str:
    """All pydantic errors as one line: "`field`: rule, but got field=value (source)"."""
    where = f" ({source})" if source else ""
    parts = []
    for err in e.errors():
        field = prefix + _loc(err)
        msg = err["msg"].removeprefix("Value error, ")
        if not _loc(err) or msg.startswith("`"):  # a message that already names its field
            parts.append(f"{msg}{where}")
        elif err["type"] == "extra_forbidden":
            parts.append(f"`{field}` is not a known key: remove it or fix its spelling{where}")
        elif err["type"] == "missing":
            parts.append(f"`{field}` is required{where}")
        elif "but got" in msg or msg.startswith(MISSING):
            parts.append(f"`{field}` {msg}{where}")
        else:
            parts.append(f"`{field}`: {msg[0].lower() + msg[1:]}, but got {field}={err.get('input')!r}{where}")
    return "; ".join(parts)


def validate(model: type[M], data: Any, source: str | None = None, prefix: str = "") -> M:
    """Validate `data` as `model`, raising one ConfigError that lists every problem."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e, source, prefix)) from None
