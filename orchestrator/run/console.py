"""What `kdsweep run` shows while trials run (driver side): one compact table and a sweep line,
live in a terminal (rich), one line per event otherwise (CI, files). Tune's own per-trial dump is
off unless --verbose."""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ray.tune import Callback

from orchestrator.plan.config import SweepConfig
from orchestrator.plan.confirm import CONFIRM
from orchestrator.track.tracking import completed_status
from trainables.config import TRIAL_CONFIG
from trainables.eval.metrics import metric
from trainables.api import ProgressBoard

log = logging.getLogger(__name__)

COLUMNS = ("trial", "student", "loss", "T", "alpha", "lr", "seed", "epoch", "{objective}", "status", "role")


@dataclass
class Row:
    trial: str
    student: str
    loss: str
    temperature: float
    alpha: float | None
    lr: float
    seed: int
    epochs: int
    role: str = "search"  # or "confirms <trial>" / "control for <trial>" in the confirmation stage
    epoch: int = 0
    score: float | None = None  # the sweep's first objective (val_acc by default), at the last epoch reported
    status: str = "running"

    def cells(self) -> list[str]:
        shown = {k: metric(k).show(getattr(self, k)) for k in ("temperature", "alpha", "lr")}
        return [self.trial, self.student, self.loss, shown["temperature"], shown["alpha"], shown["lr"], str(self.seed), f"{self.epoch}/{self.epochs}",
                "-" if self.score is None else f"{self.score:.4f}", self.status, self.role]


@dataclass
class ConsoleReporter(Callback):
    """Tune callback. The table shows the values a trial really trains with (searched or not),
    read from the trial config the driver built for it."""

    cfg: SweepConfig
    total: int
    board: Any = None  # progress_board(): the trials' progress lines within long epochs
    live: bool = field(default_factory=lambda: sys.stdout.isatty())
    rows: dict[str, Row] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self._live = None
        self._taking, self._took = None, 0.0

    def __getstate__(self) -> dict[str, Any]:  # pickled into Tune's state: resume hands in a live one
        return {}

    # --- Tune events -----------------------------------------------------------------------

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self.cfg.primary.key if c == "{objective}" else c for c in COLUMNS)

    def on_trial_start(self, iteration, trials, trial, **info):
        t = trial.config[TRIAL_CONFIG]
        of = trial.config.get(CONFIRM)
        role = "search" if of is None else f"{'control for' if of['control'] else 'confirms'} {of['of']}"
        self.rows[trial.trial_id] = Row(trial.trial_id, t.student, t.loss.name, t.loss.temperature, t.loss.alpha, t.train.optimizer.lr, t.seed, t.train.epochs, role)
        self._show(f"start  {self._line(trial.trial_id)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        row = self._row(trial)
        row.epoch, row.score = int(result.get("epoch", row.epoch)), result.get(self.cfg.primary.key, row.score)
        self._show(f"epoch  {self._line(trial.trial_id)}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        row = self._row(trial)
        row.status = completed_status(trial)
        self._show(f"done   {self._line(trial.trial_id)}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._row(trial).status = "failed"
        self._show(f"failed {self._line(trial.trial_id)}")

    def on_step_end(self, iteration, trials, **info):
        self._progress()

    def on_experiment_end(self, trials, **info):
        self._progress()
        if self._live is not None:
            self._live.stop()
            self._live = None
        self._release_board()

    def _release_board(self) -> None:
        """The board ends with its Tune run: an API caller's process runs sweep after sweep on one
        Ray, and each board is a process of its own (a CLI's would end with its driver)."""
        if self.board is None:
            return
        import ray

        board, self.board, self._taking = self.board, None, None
        try:
            ray.kill(board)
        except ray.exceptions.RayError:  # already gone with its node
            pass

    def _progress(self) -> None:
        """The board's lines, read without blocking Tune's loop: one take in flight at a time, at
        most one a second, shown when it has come back."""
        if self.board is None:
            return
        import ray

        if self._taking is None:
            if time.monotonic() - self._took >= 1.0:
                self._taking, self._took = self.board.take.remote(), time.monotonic()
            return
        if not ray.wait([self._taking], timeout=0)[0]:
            return
        taking, self._taking = self._taking, None
        try:
            lines = ray.get(taking)
        except ray.exceptions.RayError as err:  # its node lost: epochs and results still come through Tune
            log.warning("progress lines within epochs stop here: the console's board is gone (%s: %s)", type(err).__name__,
                        (str(err).strip().splitlines() or [""])[0])
            self.board = None
            return
        for trial_id, line in lines:
            if trial_id in self.rows:
                self._show(f"progress  trial={trial_id}  student={self.rows[trial_id].student}  {line}")

    # --- rendering -------------------------------------------------------------------------

    def _row(self, trial) -> Row:
        if trial.trial_id not in self.rows:
            self.on_trial_start(0, [], trial)
        return self.rows[trial.trial_id]

    def _line(self, trial_id: str) -> str:
        return "  ".join(f"{c}={v}" for c, v in zip(self.columns, self.rows[trial_id].cells()))

    def sweep_line(self) -> str:
        """Trials done/running/left, best so far, resources trials hold now, and an ETA from the
        epochs run so far (an upper bound: ASHA may stop trials early; the search's, before the
        confirmation stage is planned)."""
        done = sum(r.status != "running" for r in self.rows.values())
        running = len(self.rows) - done
        confirming = sum(r.role != "search" for r in self.rows.values())
        left = max(0, self.total - (len(self.rows) - confirming))
        primary = self.cfg.primary
        scores = [r.score for r in self.rows.values() if r.score is not None]
        best = (max if primary.maximize else min)(scores, default=None)
        r = self.cfg.resources
        held = f"{running * r.num_workers * r.cpus_per_trial:g} CPU" + (f", {running * r.num_workers * r.gpus_per_trial:g} GPU" if r.gpus_per_trial else "")
        epochs_run = sum(row.epoch for row in self.rows.values())
        epochs_left = sum(row.epochs - row.epoch for row in self.rows.values() if row.status == "running") + left * self.cfg.train.epochs
        elapsed = time.monotonic() - self.started
        eta = f"{elapsed / epochs_run * epochs_left:.0f} s" if epochs_run else "-"
        stage = f" + {confirming} confirming" if confirming else ""
        search = f", {left} left of {self.total}" if self.total else ""
        return (f"sweep {self.cfg.name}: {done} done, {running} running{search}{stage}; "
                f"best {primary.key} {'-' if best is None else f'{best:.4f}'}; trials hold {held}; ETA <= {eta}")

    def _show(self, event: str) -> None:
        if not self.live:  # a line per event; the sweep line when a trial starts or ends
            print(event if event.startswith(("epoch", "progress")) else f"{event}\n  {self.sweep_line()}", flush=True)
            return
        if event.startswith("progress") and self._live is not None:
            self._live.console.print(event)  # above the live table
            return
        from rich.live import Live

        if self._live is None:
            self._live = Live(self._table(), refresh_per_second=4, transient=False)
            self._live.start()
        self._live.update(self._table())

    def _table(self):
        from rich.console import Group
        from rich.table import Table

        table = Table(*self.columns, box=None, pad_edge=False)
        for row in self.rows.values():
            table.add_row(*row.cells())
        return Group(table, self.sweep_line())


def progress_board():
    """Where trials post progress lines for the console: a ProgressBoard actor that holds no CPU,
    pinned to the driver's node, so that losing a worker node never takes the console's board."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(ProgressBoard).options(num_cpus=0, scheduling_strategy=here).remote()
