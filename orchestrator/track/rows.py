"""A trial as the driver reads it back after the fact (selection, confirmation, the report, the
API), and the rule that pairs a control with the KD run it controls. A leaf: the reader that makes
rows from MLflow runs is store.read_trial."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from trainables.eval.metrics import ALIASES

#: The resolved trial config's flattened keys a control shares with the KD run it controls.
SETTINGS = ("trial.student", "trial.seed", "trial.train.")


def settings_key(flat: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """Student (and its kwargs and weights), seed and every train setting, as MLflow holds them
    (strings): `flat` is a trial config flattened as `trial.<path>` (a run's params). Live (the
    searcher plans the confirmation) and read back (selection), the same rule."""
    return tuple(sorted((k, str(v)) for k, v in flat.items() if k.startswith(SETTINGS)))


def with_seed(settings: tuple[tuple[str, str], ...], seed: int) -> tuple[tuple[str, str], ...]:
    return tuple((k, str(seed) if k == "trial.seed" else v) for k, v in settings)


@dataclass
class TrialRow:
    """One trial as selection, confirmation, the report and the API read it. Made in one place
    (store.read_trial, from its MLflow run's params, tags and metrics), so no reader knows how MLflow
    spells what a trial trained with; a column or a constraint reads `value(key)`."""

    run_id: str
    trial_id: str
    status: str  # finished, stopped, diverged, failed, orphaned, ...
    student: str
    loss: str
    seed: int
    settings: tuple[tuple[str, str], ...]  # what pairs it with its control (settings_key)
    control: bool  # a no-KD control (its loss gives the distillation term no weight)
    temperature: float | None  # what it trained with, searched or not
    alpha: float | None
    lr: float | None
    epochs: int  # epochs run (a stopped trial's fewer)
    metrics: dict[str, float] = field(default_factory=dict)  # every logged metric, its latest value
    confirms: str | None = None  # on a confirmation trial: the finalist's trial id
    point: dict[str, Any] | None = None  # the sampled point (what `--confirm-seeds` trains again)
    error: str | None = None
    kd_gain: float | None = None  # selection.leaderboard: against the control at the trial's last epoch
    confirmed: Any = None  # selection: for a confirmed finalist, its seeds (confirm.Confirmed)

    @property
    def val_acc(self) -> float:
        return self.metrics.get("final_val_acc", self.metrics.get("val_acc", 0.0))

    def value(self, key: str) -> Any:
        """A table's column or a constraint's metric: a field (student, kd_gain, ...), else the logged
        metric by its name or alias (params: size_params); None when the run has none."""
        if key == "val_acc" or key in _ROW_FIELDS:
            return getattr(self, key)
        return self.metrics.get(ALIASES.get(key, key))

    def numbers(self) -> dict[str, float]:
        """Its metrics, the objective's value as the tables read it (val_acc: the final one)."""
        return {**self.metrics, "val_acc": self.val_acc}


_ROW_FIELDS = {f.name for f in dataclasses.fields(TrialRow)} - {"metrics", "point", "confirmed", "settings"}
