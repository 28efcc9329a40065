"""MLflow tracking of a running sweep (driver side): the Tune callback that gives every trial
exactly one child run, and the artifacts a trial leaves (weights, card, evaluation tables).
The store, its client and its tags: orchestrator.track.store."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Protocol

from ray.tune import Callback

from orchestrator.plan.config import short_name
from orchestrator.plan.confirm import CONFIRM
from orchestrator.plan.search import point_of
from orchestrator.track.store import Tag, SweepTracker, flatten
from trainables.config import TRIAL_CONFIG
from trainables.eval.metrics import EPOCH_METRICS, FINAL_METRICS, TABLE_METRICS, TEXT_METRICS

log = logging.getLogger(__name__)


class SizeSource(Protocol):
    """Each architecture's size metrics, profiled once per sweep (orchestrator.run.sweep.Profiles)."""

    def start(self) -> None: ...

    def ready(self) -> dict[str, dict[str, float]] | None: ...

    def reports(self) -> dict[str, dict[str, float]]: ...


class MlflowTrialCallback(Callback):
    """Tune callback: child run per trial (found by tag, so restores reattach), epochs with step=epoch.

    Each trial's config (built once by the driver, in Tune's trial config) is logged whole, so a
    run records exactly what its trial trained with; `model_info` carries the data's shape and
    classes. `sizes` gives each architecture's size metrics (profiled once per sweep, in tasks
    queued by `start()` when the first trial starts, so that they never hold what it needs):
    `ready()` without waiting, None until all are in, or `reports()`. A run created before they are
    in gets them later: at a trial's report, at the latest when the experiment ends (Tune has
    released the trials' resources by then)."""

    def __init__(self, tracker: SweepTracker, parent_id: str, sweep: str, model_info: dict[str, Any], sizes: SizeSource) -> None:
        self.tracker, self.parent_id, self.sweep = tracker, parent_id, sweep
        self.model_info, self.sizes = model_info, sizes
        self._runs: dict[str, tuple[str, int]] = {}  # trial_id -> (run_id, last logged epoch); a cache only
        self._unsized: list[tuple[str, str]] = []  # (run_id, student) still without its size metrics

    def __getstate__(self):  # pickled into Tune's state; `kdsweep resume` hands in a live one
        return {"sweep": self.sweep}

    def run_for(self, trial) -> tuple[str, int]:
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        t = self.tracker
        found = t.trial_runs(self.parent_id, trial.trial_id)
        if found:
            run_id = found[0].info.run_id
            t.reopen(run_id)
            last = max(t.metric_history(run_id, "val_acc"), default=0)
            if not any(k.startswith("size_") for k in found[0].data.metrics):  # its driver died before the sizes were in
                self._unsized.append((run_id, trial.config[TRIAL_CONFIG].student))
        else:
            cfg = trial.config[TRIAL_CONFIG]
            confirms = trial.config.get(CONFIRM, {}).get("of")
            point = point_of(trial.config)
            tags = {Tag.PARENT: self.parent_id, Tag.SWEEP: self.sweep, Tag.TRIAL: trial.trial_id, Tag.ROLE: "trial", Tag.STATUS: "running",
                    Tag.POINT: json.dumps(point, sort_keys=True), **({Tag.CONFIRMS: confirms} if confirms else {})}
            run_id = t.create_run(run_name(cfg, trial.trial_id, confirms), tags)
            last = 0
            resolved = cfg.model_dump(mode="json")
            searched = {short_name(k): v for k, v in point.items()}
            t.log_params(run_id, {**searched, "trial_id": trial.trial_id, "loss": cfg.loss.name, "control": not cfg.loss.distills, "seed": cfg.seed,
                                  **self.model_info["fixed_params"], **flatten(resolved, "trial.")})
            t.log_text(run_id, json.dumps(resolved, indent=2, sort_keys=True), "trial_config.json")
            self._unsized.append((run_id, cfg.student))
            self._log_sizes()
        self._runs[trial.trial_id] = (run_id, last)
        return run_id, last

    def _log_sizes(self, wait: bool = False) -> None:
        if not self._unsized:
            return
        sizes = self.sizes.reports() if wait else self.sizes.ready()
        if sizes is None:
            return
        for run_id, student in self._unsized:
            self.tracker.log_metrics(run_id, sizes.get(student, {}), step=0)
        self._unsized.clear()

    def on_trial_start(self, iteration, trials, trial, **info):
        self.sizes.start()
        self.run_for(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._log_sizes()
        run_id, last = self.run_for(trial)
        epoch = int(result.get("epoch", 0))
        if epoch <= last:  # a resumed trial re-reporting an epoch we already hold
            return
        self.tracker.log_metrics(run_id, {k: result[k] for k in (*EPOCH_METRICS, *FINAL_METRICS) if k in result}, step=epoch)
        for key in TABLE_METRICS:
            if isinstance(result.get(key), dict):
                self.tracker.log_table(run_id, result[key], f"{key}/epoch_{epoch:03d}.json")
        self._runs[trial.trial_id] = (run_id, epoch)

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id, _ = self.run_for(trial)
        last = trial.last_result or {}
        status = completed_status(trial)
        t = self.tracker
        t.log_metrics(run_id, {"final_val_acc": last.get("val_acc", 0.0), "epochs_run": last.get("epoch", 0)}, step=int(last.get("epoch", 0)))
        # One-worker trials checkpoint through Tune (trial.checkpoint); DDP trials through Ray Train,
        # whose persisted path their reports carry.
        import ray.train

        path = last.get("checkpoint_path")
        ckpt = trial.checkpoint or (ray.train.Checkpoint(path) if path else None)
        if ckpt is not None and status != "diverged":
            log_student_weights(t, run_id, ckpt, trial.config[TRIAL_CONFIG], self.model_info)
        for key in TEXT_METRICS:
            if key in last:
                t.set_tag(run_id, Tag.text(key), str(last[key]))
        t.set_tag(run_id, Tag.STATUS, status)
        t.end_run(run_id)

    def on_experiment_end(self, trials, **info):
        self._log_sizes(wait=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        """The trial's error, where a user looks first: its last line as tag kdsweep.error, the
        whole traceback as error.txt."""
        run_id, _ = self.run_for(trial)
        path = trial.error_file
        text = Path(path).read_text(errors="replace") if path and Path(path).is_file() else ""
        if text:
            last = [line for line in text.splitlines() if line.strip()][-1]
            self.tracker.set_tag(run_id, Tag.ERROR, last[:500])
            self.tracker.log_text(run_id, text, "error.txt")
        self.tracker.set_tag(run_id, Tag.STATUS, "failed")
        self.tracker.end_run(run_id, "FAILED")


def completed_status(trial) -> str:
    """How a trial Tune calls complete ended: its last reported status, `stopped` when ASHA ended
    it while still running, `failed` when it never reported."""
    status = (trial.last_result or {}).get("status", "failed")
    return "stopped" if status == "running" else status


def run_name(trial, trial_id: str, confirms: str | None = None) -> str:
    """`<student>-<loss>-T<temperature>-a<alpha>-<trial>` (w<distill_weight> in the explicit-weights
    form); a confirmation run: `...-seed<seed>-confirms-<finalist trial>`."""
    loss = trial.loss
    weight = f"a{loss.alpha:.2f}" if loss.alpha is not None else f"w{loss.distill_weight:g}"
    name = f"{trial.student}-{loss.name}-T{loss.temperature:.2f}-{weight}-{trial_id}"
    return f"{name}-seed{trial.seed}-confirms-{confirms}" if confirms else name


def log_student_weights(tracker: SweepTracker, run_id: str, checkpoint, trial, model_info: dict) -> None:
    """The student of the trial's last checkpoint (a ray.train.Checkpoint) as the run's `student/`
    folder (weights and card: trainables.api.save_student), and its evaluation tables (per class,
    per corruption and severity) as CSV."""
    import tempfile

    from trainables.api import save_student

    with checkpoint.as_directory() as d, tempfile.TemporaryDirectory() as out:
        tables = save_student(d, out, trial, model_info)
        tracker.log_files(run_id, out, "student")
    if "per_class" in tables:
        pc = tables["per_class"]
        rows = ["class,precision,recall,f1,support"] + [
            f"{c},{pc['precision'][c]:.6f},{pc['recall'][c]:.6f},{pc['f1'][c]:.6f},{int(pc['support'][c])}" for c in range(len(pc["f1"]))]
        tracker.log_text(run_id, "\n".join(rows) + "\n", "eval/per_class.csv")
    if "corruptions" in tables:
        tracker.log_text(run_id, corruption_csv(tables["corruptions"]), "eval/corruptions.csv")


def corruption_csv(table: dict[str, list[float]]) -> str:
    """robustness()'s table (corruption -> accuracies at severities 1..5; text's 1..3) as CSV with the mean."""
    severities = max((len(a) for a in table.values()), default=5)
    rows = ["corruption," + ",".join(f"s{i}" for i in range(1, severities + 1)) + ",mean"]
    for name, accs in sorted(table.items()):
        rows.append(",".join([name, *(f"{a:.6f}" for a in accs), f"{sum(accs) / len(accs):.6f}"]))
    return "\n".join(rows) + "\n"
