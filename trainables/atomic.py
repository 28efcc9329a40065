"""Atomic file writes shared by checkpoints, teachers and the teacher cache."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a unique temporary path beside `final`; rename it onto `final` when the block succeeds.

    A kill mid-write never leaves a half-written file, and concurrent writers (trials, the cache
    task) never share a temporary name.
    """
    final = Path(final)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
