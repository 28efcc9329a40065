"""The sweep's MLflow store, driver side: the one tracking surface every driver module writes and
reads through (SweepTracker; every call asked again when an answer is cut short), the tag names,
the one query for a sweep's runs, the one reader that turns a trial's run into a TrialRow
(read_trial), and what a server outage means.

Run identity lives in MLflow itself (tags `kdsweep.sweep`, `kdsweep.trial_id`), not in memory, so a
restored sweep reattaches to its runs instead of duplicating them. Only the driver writes, so a
local SQLite store never sees concurrent writers."""
from __future__ import annotations

import functools
import json
import logging
import platform
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, TypeVar

from orchestrator.plan.config import canonical, short_name
from orchestrator.track.rows import TrialRow, settings_key
from trainables.eval.metrics import LEADERBOARD, metric
from trainables.registry import ConfigError


#: The parent run's artifact holding every model's latency and how and when it was timed (sweep.log_latency).
LATENCY_RECORD = "latency.json"


class Tag:
    """Every tag kdsweep sets, named once."""

    SWEEP = "kdsweep.sweep"
    ROLE = "kdsweep.role"  # parent | trial
    TRIAL = "kdsweep.trial_id"
    STATUS = "kdsweep.status"
    ERROR = "kdsweep.error"
    CONFIRMS = "kdsweep.confirms"  # on a confirmation trial's run: the trial id of the finalist it confirms
    POINT = "kdsweep.point"  # a trial's sampled point as JSON (what `kdsweep best --confirm-seeds` trains again)
    CHAMPION = "kdsweep.champion_run_id"  # on the parent
    TEST_EVALUATED = "kdsweep.test_evaluated"  # on a run whose student saw the test split
    PARENT = "mlflow.parentRunId"

    @staticmethod
    def text(name: str) -> str:
        """A trial's last text metric (trainables.eval.metrics, kind text) as its run's tag."""
        return f"kdsweep.{name}"

    @staticmethod
    def version(name: str) -> str:
        return f"kdsweep.version.{name}"


def read_trial(run) -> TrialRow:
    """An MLflow run of a trial, read: its params are its resolved trial config logged whole
    (trial.<path>), its tags how it ended. The one place that knows how MLflow spells a trial."""
    p, tags = run.data.params, run.data.tags

    def trained_with(key: str) -> float | None:  # runs logged before the config was nested: trial.<path without train.>
        path = canonical(key)
        v = p.get(f"trial.{path}", p.get(f"trial.{path.removeprefix('train.')}"))
        return None if v in (None, "None") else float(v)

    alpha = trained_with("alpha")
    return TrialRow(run_id=run.info.run_id, trial_id=tags.get(Tag.TRIAL), status=tags.get(Tag.STATUS, "?"), student=p.get("student", "?"),
                    loss=p.get("loss", p.get("trial.loss.name", "?")), seed=int(p.get("seed", p.get("trial.seed", 0))), settings=settings_key(p),
                    # a no-KD control, as its trial config said; older runs: alpha=0
                    control=p.get("control", str(alpha == 0.0)) == "True", temperature=trained_with("temperature"), alpha=alpha,
                    lr=trained_with("lr"), epochs=int(run.data.metrics.get("epochs_run", 0)), metrics=dict(run.data.metrics),
                    confirms=tags.get(Tag.CONFIRMS), point=json.loads(tags[Tag.POINT]) if Tag.POINT in tags else None, error=tags.get(Tag.ERROR))


#: The MLflow UI's shared view of a sweep (`kdsweep ui` prints its address); its metric columns are
#: the leaderboard's logged metrics.
UI_VIEW = "kdsweep"
VIEW_TAG = f"mlflow.sharedViewState.{UI_VIEW}"  # an experiment tag the MLflow UI (3.x) reads
UI_METRICS = tuple(metric(c).name for c in LEADERBOARD if metric(c).kind in ("epoch", "final", "size", "run") and metric(c).maximize is not None)

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
    """One sweep's experiment: every MLflow call the driver makes goes through its methods."""

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
        view = {"searchFilter": f"tags.`{Tag.ROLE}` = 'trial'", "orderByKey": "metrics.`val_acc`", "orderByAsc": False,
                "selectedColumns": columns, "columnOrder": columns, "runListHidden": False}
        self.client.set_experiment_tag(self.experiment_id, VIEW_TAG, json.dumps(view))

    def find_runs(self, filter_string: str, max_results: int = 10_000):
        return self.client.search_runs([self.experiment_id], filter_string=filter_string, max_results=max_results)

    def parent_runs(self, sweep: str):
        """The sweep's parent run (a list: empty before the sweep started)."""
        return self.find_runs(f"tags.`{Tag.SWEEP}` = '{sweep}' and tags.`{Tag.ROLE}` = 'parent'")

    def trial_runs(self, parent_id: str, trial_id: str | None = None, running: bool = False):
        """The one query for a sweep's trial runs: all of them, one trial's, or those still RUNNING."""
        where = [f"tags.`{Tag.PARENT}` = '{parent_id}'"]
        if trial_id is not None:
            where.append(f"tags.`{Tag.TRIAL}` = '{trial_id}'")
        if running:
            where.append("attributes.status = 'RUNNING'")
        return self.find_runs(" and ".join(where))

    def trial_rows(self, parent_id: str) -> list[TrialRow]:
        """The sweep's trials, read (the one typed reader of trial runs)."""
        return [read_trial(r) for r in self.trial_runs(parent_id)]

    def metric_history(self, run_id: str, key: str) -> dict[int, float]:
        """step -> value of one metric of a run."""
        return {m.step: m.value for m in self.client.get_metric_history(run_id, key)}

    # --- the tracking surface: every MLflow call the driver makes goes through the methods here ---

    def tags(self, run_id: str) -> dict[str, str]:
        return self.client.get_run(run_id).data.tags

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.client.set_tag(run_id, key, value)

    def log_text(self, run_id: str, text: str, path: str) -> None:
        self.client.log_text(run_id, text, path)

    def log_files(self, run_id: str, local: str | Path, folder: str | None = None) -> None:
        """A file, or a folder's files, as artifacts of the run under `folder`."""
        if Path(local).is_dir():
            self.client.log_artifacts(run_id, str(local), folder)
        else:
            self.client.log_artifact(run_id, str(local), folder)

    def log_table(self, run_id: str, columns: dict[str, list], path: str) -> None:
        self.client.log_table(run_id, columns, path)

    def download(self, run_id: str, path: str, dest: str | Path) -> Path:
        """A run's artifact (file or folder) copied under `dest`."""
        return Path(self.client.download_artifacts(run_id, path, str(dest)))

    def artifact_paths(self, run_id: str, folder: str | None = None) -> list[str]:
        return [a.path for a in self.client.list_artifacts(run_id, folder)]

    def reopen(self, run_id: str) -> None:
        """A run picked up again (a restored sweep's parent, a resumed trial's)."""
        self.client.update_run(run_id, status="RUNNING")

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def registered_run(self, model: str, alias: str = "champion") -> tuple[str, int] | None:
        """(run id, version) the registered model's alias points at; None when there is none."""
        from mlflow.exceptions import MlflowException

        try:
            v = self.client.get_model_version_by_alias(model, alias)
        except MlflowException:
            return None
        return v.run_id, int(v.version)

    def point_alias(self, model: str, version: int, alias: str = "champion") -> None:
        self.client.set_registered_model_alias(model, alias, str(version))

    def active(self, run_id: str):
        """The run as MLflow's active run (a context), for its model-logging APIs (log_model)."""
        import mlflow

        return mlflow.start_run(run_id=run_id)

    def create_run(self, run_name: str, tags: dict[str, str]) -> str:
        """A run made once: when the answer to its creation is cut short, the store is searched by
        its tags (each run's are unique: sweep and role, or parent and trial id) before asking again."""
        found = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        return retried(self.client.once.create_run, self.experiment_id, run_name=run_name, tags=tags,
                       recover=lambda: next(iter(self.find_runs(found)), None)).info.run_id

    def parent_run(self, sweep: str, config: dict[str, Any]) -> str:
        """The sweep's parent run: reattached if it exists, else created with config and versions."""
        runs = self.parent_runs(sweep)
        if runs:
            run_id = runs[0].info.run_id
            self.reopen(run_id)
            return run_id
        run_id = self.create_run(sweep, {Tag.SWEEP: sweep, Tag.ROLE: "parent"})
        self.set_ui_view([short_name(k) for k in config.get("search", {})])
        flat = flatten(config)
        self.log_params(run_id, {k: v for k, v in flat.items() if not k.startswith("search.")})
        self.log_text(run_id, json.dumps(config, indent=2, sort_keys=True), "sweep_config.json")
        for k, v in versions().items():
            self.set_tag(run_id, Tag.version(k), v)
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

    def read_json(self, run_id: str, path: str) -> Any:
        """A JSON artifact of a run (log_text'd), None when the run has none at `path`."""
        import tempfile

        folder = str(Path(path).parent) if Path(path).parent != Path(".") else None
        if path not in self.artifact_paths(run_id, folder):
            return None
        with tempfile.TemporaryDirectory() as d:
            return json.loads(self.download(run_id, path, d).read_text())

    def close_orphans(self, parent_id: str) -> int:
        """Children still RUNNING when the sweep ends belong to trials that will never report again
        (their trial was lost with a killed driver). A stub that never logged an epoch is deleted,
        so a restored sweep keeps exactly one run per trial; one with epochs is marked KILLED."""
        orphans = self.trial_runs(parent_id, running=True)
        for r in orphans:
            if not self.client.get_metric_history(r.info.run_id, "val_acc"):
                self.client.set_terminated(r.info.run_id, "KILLED")  # a deleted run keeps its status: not RUNNING
                self.client.delete_run(r.info.run_id)
                continue
            self.client.set_tag(r.info.run_id, Tag.STATUS, "orphaned")
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


def sweep_views(uri: str, base_url: str) -> list[tuple[str, str]]:
    """(experiment, address of its kdsweep view in the MLflow UI) for each sweep in the store."""
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return []
    client = MlflowClient(uri)
    return [(e.name, f"{base_url}/#/experiments/{e.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={UI_VIEW}")
            for e in client.search_experiments() if VIEW_TAG in e.tags]


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):  # an ensemble's teachers: teacher.1.arch (MLflow keys take no [])
            for i, x in enumerate(v):
                out.update(flatten(x, f"{key}.{i}."))
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
