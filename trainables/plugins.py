"""Plugins: modules that register models, losses and datasets with the same decorators the
built-ins use (`@MODELS.register`, `@LOSSES.register`, `@DATASETS.register`).

Two sources: the `plugins:` list of a sweep (module names, importable where the sweep runs: an
installed package, or a folder on PYTHONPATH / in Ray's runtime_env on every node), and the
`kdsweep.plugins` entry-point group of installed packages. Imported on the driver before the
config is validated (so `students: [my_net]` validates) and in every Ray worker before a trial
config is read (so a trial on another node knows what the driver knew).
"""
from __future__ import annotations

import importlib
import importlib.metadata
from typing import Sequence

from trainables.registry import ConfigError

ENTRY_POINT_GROUP = "kdsweep.plugins"


def load_plugins(modules: Sequence[str] = ()) -> list[str]:
    """Import every entry-point plugin and each named module once; returns the modules imported.
    A module that is missing or raises on import is a ConfigError naming it and its error."""
    names = [ep.value.split(":")[0] for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)]
    names += [m for m in modules if m not in names]
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # any error inside a user's module: name it, with its own message
            kind = "is not importable" if isinstance(e, ModuleNotFoundError) and e.name == name else "raised on import"
            raise ConfigError(f"`plugins` entry {name!r} {kind} ({type(e).__name__}: {e}): install it on every node or fix the module") from None
    return names
