"""Tune's experiment state, kept restorable: a last-good copy swapped in atomically (driver side)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pickletools
import shutil
import time
from pathlib import Path

from ray.tune import Callback

log = logging.getLogger(__name__)


class TuneStateBackup(Callback):
    """Keeps a last-good copy of Tune's experiment state, swapped in atomically.

    Tune writes its experiment_state JSON in place, so a driver killed mid-write leaves an empty
    file and Tune would silently restart the whole study. After a step in which Tune rewrote its
    state files, they are copied aside, validated, and swapped in with one rename; `resume` falls
    back to this copy when the live state does not parse. The files grow with the trials and Tune
    rewrites them every step (TUNE_GLOBAL_CHECKPOINT_S=0), so copies are spaced: at least
    MIN_INTERVAL_S apart and 20 times as long as the last one took (at most ~5 % of the driver's
    time), and once more when the run ends. Copying every step made a long sweep's driver quadratic.

    A trial's start is not left to the spacing: its MLflow run exists from then on, and a copy
    without it would have the searcher issue another trial (another run) in its place. The copy is
    taken at the first step end whose state holds every trial started since the last one.
    """

    MIN_INTERVAL_S = 2.0

    def __init__(self) -> None:
        self.experiment_dir: Path | None = None
        self._saved: tuple | None = None  # the files' (name, size, mtime) when last copied
        self._next = 0.0  # monotonic time of the next copy allowed
        self._started: set[str] = set()  # trials started since the last copy that holds them

    def on_trial_start(self, iteration, trials, trial, **info):
        self._started.add(trial.trial_id)

    def on_step_end(self, iteration, trials, **info):
        if self._started or time.monotonic() >= self._next:
            self._copy()

    def on_experiment_end(self, trials, **info):
        self._copy()

    def _copy(self) -> None:
        if self.experiment_dir is None:
            return
        now = _signature(self.experiment_dir)
        if not now or now == self._saved:
            return
        started = time.monotonic()
        if _snapshot(self.experiment_dir):
            self._saved = now
            held = _trial_ids(self.experiment_dir / BACKUP)
            self._started = set() if held is None else self._started - held
            took = time.monotonic() - started
            self._next = time.monotonic() + max(self.MIN_INTERVAL_S, 20 * took)


BACKUP = ".kdsweep-state-backup"


def _signature(experiment_dir: Path) -> tuple:
    """Tune's state files as they stand: a change means Tune wrote them since."""
    with contextlib.suppress(OSError):
        return tuple(sorted((f.name, st.st_size, st.st_mtime_ns) for f in experiment_dir.iterdir()
                            if f.is_file() and (st := f.stat())))
    return ()


def _trial_ids(state_dir: Path) -> set[str] | None:
    """The trials Tune's experiment state in `state_dir` holds; None where its layout is not the
    one known (a later Ray): the copies are then spaced only."""
    ids = set()
    try:
        for f in state_dir.glob("experiment_state-*.json"):
            for entry in json.loads(f.read_text())["trial_data"]:
                ids.add(json.loads(entry[0])["trial_id"])
    except (OSError, ValueError, LookupError, TypeError):
        return None
    return ids


def _pickle_is_complete(data: bytes) -> bool:
    """Walk a pickle's opcodes without executing any (no imports, no __setstate__, no network):
    a write cut short has no final STOP."""
    last = None
    try:
        for last, _, _ in pickletools.genops(data):
            pass
    except Exception:  # genops raises ValueError (and others) on a truncated or foreign stream
        return False
    return last is not None and last.name == "STOP"


def _state_is_valid(files: list[Path]) -> bool:
    states = [f for f in files if f.name.startswith("experiment_state-")]
    try:
        for f in states:
            json.loads(f.read_text())
    except (OSError, ValueError):
        return False
    # the searcher's pickles, and the search generator's (a cloudpickle, though named .json)
    pickles = [f for f in files if f.suffix == ".pkl" or f.name.startswith("search_gen_state-")]
    return bool(states) and all(_pickle_is_complete(f.read_bytes()) for f in pickles)


def _snapshot(experiment_dir: Path) -> bool:
    tmp = experiment_dir / f"{BACKUP}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for f in experiment_dir.iterdir():
        if f.is_file():
            shutil.copy2(f, tmp / f.name)
    if not _state_is_valid(list(tmp.iterdir())):
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    old = experiment_dir / f"{BACKUP}.old"
    shutil.rmtree(old, ignore_errors=True)
    if (experiment_dir / BACKUP).exists():
        os.replace(experiment_dir / BACKUP, old)
    os.replace(tmp, experiment_dir / BACKUP)
    shutil.rmtree(old, ignore_errors=True)
    return True


def repair_state(experiment_dir: Path) -> None:
    """Before a restore: if the live state is unreadable, put the last good copy back."""
    backup = experiment_dir / BACKUP
    if not backup.is_dir() or _state_is_valid([f for f in experiment_dir.iterdir() if f.is_file()]):
        return
    for f in experiment_dir.iterdir():
        if f.is_file() and (f.name.startswith("experiment_state-") or (backup / f.name).exists()):
            f.unlink()
    for f in backup.iterdir():
        shutil.copy2(f, experiment_dir / f.name)
    log.info("restored Tune state from the last good copy in %s", backup)
