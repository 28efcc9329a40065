"""One registry per concept (models, datasets, losses), filled by decorators at import time."""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

F = TypeVar("F", bound=Callable)


class ConfigError(ValueError):
    """A user-facing configuration problem: one line that names the field and the fix."""


#: How every message about a path that is not there begins (after its field's name): a config
#: that says how its files are made (`prepare:`) adds that command to such a message.
MISSING = "does not exist"


def missing(path: str, takes: str) -> str:
    """The message (without its field's name) for a path that is neither file nor folder here;
    `takes` says what the field takes ("a folder", "a file or a folder", ...)."""
    return f"{MISSING}: nothing at {path!r} (it takes {takes}): fix the path"


class Registry(Generic[F]):
    """Name -> factory. Registering a name twice raises; an unknown name lists the valid choices."""

    def __init__(self, concept: str, field: str) -> None:
        self.concept, self.field = concept, field
        self._items: dict[str, F] = {}

    def register(self, fn: F | None = None, *, name: str | None = None):
        def add(f: F) -> F:
            key = name or f.__name__
            if key in self._items:
                raise KeyError(f"{self.concept} '{key}' is registered twice")
            self._items[key] = f
            return f

        return add(fn) if fn is not None else add

    def get(self, key: str) -> F:
        if key not in self._items:
            raise ConfigError(
                f"`{self.field}` must be one of {sorted(self._items)}, but got {self.field}={key!r}"
            )
        return self._items[key]

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)
