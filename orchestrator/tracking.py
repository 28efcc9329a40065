"""MLflow tracking owned by the driver: one parent run per sweep, exactly one child run per trial.

Run identity lives in MLflow itself (tags `kdsweep.sweep`, `kdsweep.trial_id`), not in memory, so a
restored sweep reattaches to its runs instead of duplicating them, and runs of trials that never come
back are closed. Only the driver writes, so a local SQLite store never sees concurrent writers.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import platform
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, TypeVar

from ray.tune import Callback

from orchestrator.config import short_name
from orchestrator.search import point_of
from trainables.config import TRIAL_CONFIG
from trainables.metrics import EPOCH_METRICS, FINAL_METRICS, TEXT_METRICS
from trainables.registry import ConfigError

SWEEP, ROLE, TRIAL, STATUS, ERROR = "kdsweep.sweep", "kdsweep.role", "kdsweep.trial_id", "kdsweep.status", "kdsweep.error"
PARENT_FILTER = "tags.`kdsweep.sweep` = '{sweep}' and tags.`kdsweep.role` = 'parent'"
#: The MLflow UI's shared view of a sweep (`kdsweep ui` prints its address) and its metric columns.
UI_VIEW = "kdsweep"
UI_METRICS = ("val_acc", "kd_gain", "size_params", "robust_acc", "size_latency_cpu_b1_ms")

log = logging.getLogger(__name__)
T = TypeVar("T")


def default_tracking_uri(workdir: str | Path = ".") -> str:
    return f"sqlite:///{Path(workdir).resolve() / 'mlruns' / 'mlflow.db'}"


def check_tracking_uri(uri: str, timeout: float = 3.0) -> None:
    """Fail fast (before Ray starts) when a tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            if r.status >= 400:
                raise OSError(f"HTTP {r.status}")
    except (OSError, urllib.error.URLError) as e:
        raise ConfigError(f"`tracking.uri` {uri} is unreachable ({getattr(e, 'reason', e)}): start `mlflow server` or fix --tracking-uri") from None


class SweepTracker:
    """Thin wrapper over MlflowClient for one sweep's experiment."""

    def __init__(self, uri: str, experiment: str) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri, self.experiment_name = uri, experiment
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(uri)
        self.client = RetryingClient(MlflowClient(uri))
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            location = None
            if uri.startswith("sqlite:///"):  # artifacts beside the DB, fixed at creation
                location = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts" / experiment).as_uri()
            self.experiment_id = retried(self.client.once.create_experiment, experiment, artifact_location=location,
                                         recover=lambda: getattr(self.client.get_experiment_by_name(experiment), "experiment_id", None))
        else:
            self.experiment_id = exp.experiment_id

    def set_ui_view(self, searched: list[str]) -> None:
        """What the MLflow UI opens on (3.x): a model-training experiment, not MLflow's GenAI overview,
        and a shared view (`?viewStateShareKey=kdsweep`, the address `kdsweep ui` prints) listing the
        trial runs, best first, with val_acc, kd_gain, size and the searched parameters as columns.
        (The parent row would hide its children collapsed: the view filters to trial runs.)"""
        self.client.set_experiment_tag(self.experiment_id, "mlflow.experimentKind", "custom_model_development")
        columns = [f"metrics.`{m}`" for m in UI_METRICS] + [f"params.`{p}`" for p in ["student", *searched]]
        view = {"searchFilter": f"tags.`{ROLE}` = 'trial'", "orderByKey": "metrics.`val_acc`", "orderByAsc": False,
                "selectedColumns": columns, "columnOrder": columns, "runListHidden": False}
        self.client.set_experiment_tag(self.experiment_id, f"mlflow.sharedViewState.{UI_VIEW}", json.dumps(view))

    def find_runs(self, filter_string: str, max_results: int = 10_000):
        return self.client.search_runs([self.experiment_id], filter_string=filter_string, max_results=max_results)

    def create_run(self, run_name: str, tags: dict[str, str]) -> str:
        """A run made once: when the answer to its creation is cut short, the store is searched by
        its tags (each run's are unique: sweep and role, or parent and trial id) before asking again."""
        found = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        return retried(self.client.once.create_run, self.experiment_id, run_name=run_name, tags=tags,
                       recover=lambda: next(iter(self.find_runs(found)), None)).info.run_id

    def parent_run(self, sweep: str, config: dict[str, Any]) -> str:
        """The sweep's parent run: reattached if it exists, else created with config and versions."""
        runs = self.find_runs(PARENT_FILTER.format(sweep=sweep))
        if runs:
            run_id = runs[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run_id = self.create_run(sweep, {SWEEP: sweep, ROLE: "parent"})
        self.set_ui_view([short_name(k) for k in config.get("search", {})])
        flat = flatten(config)
        self.log_params(run_id, {k: v for k, v in flat.items() if not k.startswith("search.")})
        self.client.log_text(run_id, json.dumps(config, indent=2, sort_keys=True), "sweep_config.json")
        for k, v in versions().items():
            self.client.set_tag(run_id, f"kdsweep.version.{k}", v)
        return run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        new = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(run_id, params=new[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    def close_orphans(self, parent_id: str) -> int:
        """Children still RUNNING when the sweep ends belong to trials that will never report again
        (their trial was lost with a killed driver). A stub that never logged an epoch is deleted,
        so a restored sweep keeps exactly one run per trial; one with epochs is marked KILLED."""
        orphans = self.find_runs(f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'RUNNING'")
        for r in orphans:
            if not self.client.get_metric_history(r.info.run_id, "val_acc"):
                self.client.delete_run(r.info.run_id)
                continue
            self.client.set_tag(r.info.run_id, STATUS, "orphaned")
            self.client.set_terminated(r.info.run_id, "KILLED")
        return len(orphans)


def _in_chain(e: BaseException | None, test: Callable[[BaseException], bool]) -> bool:
    """Whether `e` or anything that caused it (MLflow re-raises inside `except`) passes `test`."""
    while e is not None:
        if test(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def cut_short(e: BaseException | None) -> bool:
    """Whether `e` (or what caused it) is a server's answer cut off mid-body (the server killed
    while it answered). MLflow's HTTP retries cover requests that got no answer, not this one,
    since the request may have been applied."""
    import requests

    return _in_chain(e, lambda x: isinstance(x, requests.exceptions.ChunkedEncodingError))


def retried(fn: Callable[..., T], *args, recover: Callable[[], T | None] | None = None, attempts: int = 3, **kwargs) -> T:
    """fn(*args, **kwargs), made again when its answer was cut short. `recover` first looks for
    what a non-idempotent call (a creation) may already have made. While the server is down, the
    next attempt waits in MLflow's own retries."""
    for attempt in range(1, attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not cut_short(e):
                raise
            log.warning("MLflow's answer to %s was cut short (%s); asking again", getattr(fn, "__name__", fn), type(e).__name__)
        time.sleep(attempt)
        if recover is not None and (found := recover()) is not None:
            return found
    return fn(*args, **kwargs)


class RetryingClient:
    """An MlflowClient whose calls are made again when an answer is cut short (`retried`). Every
    call the driver makes through it is idempotent (metrics carry their timestamp; MLflow drops
    exact duplicates); creations go through `once`, the bare client, with a `recover`."""

    def __init__(self, client) -> None:
        self.once = client

    def __getattr__(self, name: str):
        if name == "once":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        attr = getattr(self.once, name)
        return functools.partial(retried, attr) if callable(attr) else attr


class TrackingUnavailable(RuntimeError):
    """The tracking server stopped answering for longer than MLflow's own retries wait: while it
    is down, MLflow's HTTP client retries the driver's writes with backoff
    (MLFLOW_HTTP_REQUEST_MAX_RETRIES: 7 by default, about 4 minutes) and nothing is lost."""


def unreachable(e: BaseException | None) -> bool:
    """Whether `e` (or what caused it) is MLflow giving up on a server that does not answer, or
    one whose answers were still cut short after `retried` asked again."""
    import requests

    return cut_short(e) or _in_chain(e, lambda x: isinstance(x, requests.exceptions.ConnectionError) or "Max retries exceeded" in str(x))


def outage_message(uri: str, sweep: str) -> str:
    return (f"`tracking.uri` {uri} stopped answering for longer than MLflow's retries wait (MLFLOW_HTTP_REQUEST_MAX_RETRIES, "
            f"about 4 minutes by default): the sweep stopped; once the server is back, `kdsweep resume {sweep}` continues it")


class MlflowTrialCallback(Callback):
    """Tune callback: child run per trial (found by tag, so restores reattach), epochs with step=epoch.

    Each trial's config (built once by the driver, in Tune's trial config) is logged whole, so a
    run records exactly what its trial trained with; `model_info` carries the data's shape and
    classes and each architecture's size metrics (profiled once per sweep)."""

    def __init__(self, tracker: SweepTracker, parent_id: str, sweep: str, model_info: dict[str, Any]) -> None:
        self.tracker, self.parent_id, self.sweep = tracker, parent_id, sweep
        self.model_info = model_info
        self._runs: dict[str, tuple[str, int]] = {}  # trial_id -> (run_id, last logged epoch); a cache only

    def __getstate__(self):  # pickled into Tune's state; `kdsweep resume` hands in a live one
        return {"sweep": self.sweep}

    def run_for(self, trial) -> tuple[str, int]:
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        t = self.tracker
        found = t.find_runs(f"tags.`{TRIAL}` = '{trial.trial_id}' and tags.mlflow.parentRunId = '{self.parent_id}'")
        if found:
            run_id = found[0].info.run_id
            t.client.update_run(run_id, status="RUNNING")
            history = t.client.get_metric_history(run_id, "val_acc")
            last = max((m.step for m in history), default=0)
        else:
            cfg = trial.config[TRIAL_CONFIG]
            run_id = t.create_run(run_name(cfg.student, cfg.loss, trial.trial_id),
                                  {"mlflow.parentRunId": self.parent_id, SWEEP: self.sweep, TRIAL: trial.trial_id, ROLE: "trial", STATUS: "running"})
            last = 0
            resolved = cfg.model_dump(mode="json")
            searched = {short_name(k): v for k, v in point_of(trial.config).items()}
            t.log_params(run_id, {**searched, "trial_id": trial.trial_id, **self.model_info["fixed_params"], **flatten(resolved, "trial.")})
            t.client.log_text(run_id, json.dumps(resolved, indent=2, sort_keys=True), "trial_config.json")
            t.log_metrics(run_id, self.model_info["sizes"].get(cfg.student, {}), step=0)
        self._runs[trial.trial_id] = (run_id, last)
        return run_id, last

    def on_trial_start(self, iteration, trials, trial, **info):
        self.run_for(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id, last = self.run_for(trial)
        epoch = int(result.get("epoch", 0))
        if epoch <= last:  # a resumed trial re-reporting an epoch we already hold
            return
        self.tracker.log_metrics(run_id, {k: result[k] for k in (*EPOCH_METRICS, *FINAL_METRICS) if k in result}, step=epoch)
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
                t.client.set_tag(run_id, f"kdsweep.{key}", str(last[key]))
        t.client.set_tag(run_id, STATUS, status)
        t.client.set_terminated(run_id, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        """The trial's error, where a user looks first: its last line as tag kdsweep.error, the
        whole traceback as error.txt."""
        run_id, _ = self.run_for(trial)
        path = trial.error_file
        text = Path(path).read_text(errors="replace") if path and Path(path).is_file() else ""
        if text:
            last = [line for line in text.splitlines() if line.strip()][-1]
            self.tracker.client.set_tag(run_id, ERROR, last[:500])
            self.tracker.client.log_text(run_id, text, "error.txt")
        self.tracker.client.set_tag(run_id, STATUS, "failed")
        self.tracker.client.set_terminated(run_id, "FAILED")


def completed_status(trial) -> str:
    """How a trial Tune calls complete ended: its last reported status, `stopped` when ASHA ended
    it while still running, `failed` when it never reported."""
    status = (trial.last_result or {}).get("status", "failed")
    return "stopped" if status == "running" else status


def sweep_views(uri: str, base_url: str) -> list[tuple[str, str]]:
    """(experiment, address of its kdsweep view in the MLflow UI) for each sweep in the store."""
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return []
    client = MlflowClient(uri)
    return [(e.name, f"{base_url}/#/experiments/{e.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={UI_VIEW}")
            for e in client.search_experiments() if f"mlflow.sharedViewState.{UI_VIEW}" in e.tags]


def run_name(student: str, loss, trial_id: str) -> str:
    """`<student>-T<temperature>-a<alpha>-<trial>` (w<distill_weight> in the explicit-weights form)."""
    weight = f"a{loss.alpha:.2f}" if loss.alpha is not None else f"w{loss.distill_weight:g}"
    return f"{student}-T{loss.temperature:.2f}-{weight}-{trial_id}"


def log_student_weights(tracker: SweepTracker, run_id: str, checkpoint, trial, model_info: dict) -> None:
    """The student's weights (safetensors) and card from the trial's last checkpoint (a
    ray.train.Checkpoint), and its evaluation tables (per class, per corruption and severity) as CSV."""
    import tempfile

    from safetensors.torch import save_file

    from trainables.card import StudentCard, build, write
    from trainables.loop import STATE_FILE, load_state

    with checkpoint.as_directory() as d, tempfile.TemporaryDirectory() as out:
        state = load_state(Path(d) / STATE_FILE)
        save_file({k: v.contiguous() for k, v in state["model"].items()}, os.path.join(out, "student.safetensors"))
        card = build(StudentCard, {"arch": trial.student, "arch_kwargs": trial.student_kwargs, "num_classes": model_info["num_classes"],
                                   "input_shape": model_info["input_shape"], "classes": model_info.get("classes", []), "epoch": state["epoch"],
                                   **state.get("preprocess", {})})  # mean/std: what export and the registered model normalize with
        write(card, Path(out, "student.json"))
        tracker.client.log_artifacts(run_id, out, "student")
    tables = state.get("eval") or {}
    if "per_class" in tables:
        pc = tables["per_class"]
        rows = ["class,precision,recall,f1,support"] + [
            f"{c},{pc['precision'][c]:.6f},{pc['recall'][c]:.6f},{pc['f1'][c]:.6f},{int(pc['support'][c])}" for c in range(len(pc["f1"]))]
        tracker.client.log_text(run_id, "\n".join(rows) + "\n", "eval/per_class.csv")
    if "corruptions" in tables:
        tracker.client.log_text(run_id, corruption_csv(tables["corruptions"]), "eval/corruptions.csv")


def corruption_csv(table: dict[str, list[float]]) -> str:
    """robustness()'s table (corruption -> accuracies at severities 1..5) as CSV with the mean."""
    rows = ["corruption,s1,s2,s3,s4,s5,mean"]
    for name, accs in sorted(table.items()):
        rows.append(",".join([name, *(f"{a:.6f}" for a in accs), f"{sum(accs) / len(accs):.6f}"]))
    return "\n".join(rows) + "\n"


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def versions() -> dict[str, str]:
    import mlflow
    import optuna
    import ray
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
           "mlflow": mlflow.__version__, "optuna": optuna.__version__, "cuda": str(torch.version.cuda)}
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                           cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        out["git_commit"] = "unknown"
    return out
