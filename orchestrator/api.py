"""kdsweep from Python (a notebook, a script): the same code path as `kdsweep run` and `kdsweep best`.

    from orchestrator.api import run_sweep_from
    result = run_sweep_from("search_spaces/default.yaml", {"train.epochs": 4, "budget.num_samples": 6})
    result.champion.student, result.champion.val_acc, result.model_uri
    [(row.student, row.val_acc, row.kd_gain) for row in result.leaderboard]

User errors raise trainables.registry.ConfigError (the CLI prints it as one line and exits 2).
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.plan.config import SweepConfig, load_config
from orchestrator.track.rows import TrialRow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Champion:
    run_id: str
    trial_id: str
    student: str
    val_acc: float
    test: dict[str, float]  # the once-only test metrics (test_acc, test_macro_f1, ...)
    version: int  # its registered model's version (alias `champion`)
    seed: int = 0  # the registered run's seed (the confirmed finalist's best on val)
    confirmed: dict[str, Any] | None = None  # over its seeds: seeds, val_acc_mean/std, kd_gain_mean/ci95/pairs, verdict


@dataclass(frozen=True)
class SweepResult:
    """What a finished sweep left: where it is tracked, its leaderboard and its champion."""

    config: SweepConfig
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    teacher: str
    leaderboard: list[TrialRow]  # one row per trial, best first (selection.leaderboard)
    champion: Champion

    @property
    def model_uri(self) -> str:
        """For mlflow.pytorch.load_model (with mlflow.set_tracking_uri(self.tracking_uri))."""
        return f"models:/{self.config.registered_model}@champion"


def run_sweep_from(config: str | Path | dict | None = None, overrides: list[str] | dict[str, Any] | None = None, *,
                   address: str | None = None, tracking_uri: str | None = None, objectives: list[str] | None = None,
                   minimum: dict[str, float] | None = None, maximum: dict[str, float] | None = None,
                   verbose: bool = False) -> SweepResult:
    """Validate, run the sweep, select and register the champion, as `kdsweep run` does.

    `config`: a YAML path, a dict of the YAML's content, or None (the embedded default);
    `overrides`: `--set` pairs or a dict of keys (aliases or dotted paths) to values;
    `objectives`/`minimum`/`maximum`: as --objective/--min/--max (metric names or aliases)."""
    from orchestrator.run.sweep import run_sweep

    cfg = load_config(config, overrides)
    handles = run_sweep(cfg, address, tracking_uri, verbose=verbose)
    return _selected(cfg, handles["tracker"], handles["parent_run_id"], handles["teacher"], objectives, minimum, maximum, handles["plots"])


def resume_sweep(name: str, storage: str | None = None, *, address: str | None = None, tracking_uri: str | None = None,
                 objectives: list[str] | None = None, minimum: dict[str, float] | None = None,
                 maximum: dict[str, float] | None = None, verbose: bool = False) -> SweepResult:
    """Finish a sweep whose driver died, then select, as `kdsweep resume` does."""
    from orchestrator.run.sweep import load_sweep, run_sweep

    saved = load_sweep(name, storage)
    handles = run_sweep(saved.config, address, tracking_uri or saved.tracking_uri, restore=True, verbose=verbose)
    return _selected(saved.config, handles["tracker"], handles["parent_run_id"], handles["teacher"], objectives, minimum, maximum,
                     handles["plots"])


def best_of(name: str, storage: str | None = None, tracking_uri: str | None = None, *, objectives: list[str] | None = None,
            minimum: dict[str, float] | None = None, maximum: dict[str, float] | None = None, confirm_seeds: int | None = None,
            confirm_top: int | None = None, address: str | None = None, verbose: bool = False) -> SweepResult:
    """Re-select a finished sweep from MLflow, as `kdsweep best` does (the test split is touched
    once per model: a champion already tested is not tested again). With `confirm_seeds`, first
    train its top `confirm_top` finalists (default: the sweep's budget.confirm.top, at least 1)
    until each has that many seeds, beside their controls, without searching again."""
    from orchestrator.run.sweep import confirm_sweep, open_sweep
    from trainables.registry import ConfigError

    saved, tracker, parent = open_sweep(name, storage, tracking_uri)
    if confirm_seeds is not None:
        top = confirm_top if confirm_top is not None else max(1, saved.config.budget.confirm.top)
        if confirm_seeds < 2 or top < 1:
            raise ConfigError(f"`--confirm-seeds` must be >= 2 and `--confirm-top` >= 1, but got {confirm_seeds} and {top}: "
                              "one seed confirms nothing")
        confirm_sweep(saved, tracker, parent, top, confirm_seeds, address, verbose)
    return _selected(saved.config, tracker, parent, saved.teacher, objectives, minimum, maximum)


def _selected(cfg: SweepConfig, tracker, parent_id: str, teacher: str, objectives, minimum, maximum, plots: Future | None = None) -> SweepResult:
    """Select (and register) the champion; `plots`, the sweep's Optuna plots still being drawn, are
    waited for after it (they are drawn beside it)."""
    from orchestrator.select.selection import confirmed_metrics, select
    from trainables.eval.metrics import metric

    minimum = {metric(k).name: float(v) for k, v in (minimum or {}).items()}  # aliases (params, latency_ms) as on the CLI
    maximum = {metric(k).name: float(v) for k, v in (maximum or {}).items()}
    try:
        won = select(cfg, tracker, parent_id, objectives, minimum, maximum, teacher_path=teacher)
    finally:
        if plots is not None:
            wait([plots])
    if plots is not None and plots.exception() is not None:  # the champion is registered: say so, do not fail for a plot
        log.warning("Optuna's plots were not logged to the sweep's run: %s", plots.exception())
    row, confirmed = won.champion, None
    if row.confirmed:
        confirmed = {k.removeprefix("champion_").removeprefix("confirmed_"): v for k, v in confirmed_metrics(row).items()}
        confirmed["verdict"] = row.confirmed.verdict()
    champion = Champion(row.run_id, row.trial_id, row.student, row.val_acc, won.test["student"], won.version, row.seed, confirmed)
    return SweepResult(cfg, tracker.uri, tracker.experiment_id, parent_id, teacher, won.leaderboard, champion)
