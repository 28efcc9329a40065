"""Run, resume and plan a sweep: Tune (Optuna TPE + ASHA) over Ray Train TorchTrainer trials.

Layout of a sweep's storage (`storage/NAME/`): sweep.json (the resolved config, so `kdsweep resume
NAME` needs nothing else), one Tune experiment per study (tune-joint or tune-<student>), and one Ray
Train run per trial (train/trial-<id>) holding its checkpoints. Train V2 restores a run from its
storage snapshot when the same name and path are used again, so a restored trial resumes from its
last epoch.
"""
from __future__ import annotations

import json
import os
import pickletools
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ray.train.v2.api.callback import UserCallback
from ray.tune import Callback

from orchestrator.config import SweepConfig
from orchestrator.prepare import DataInfo, check_data, check_teacher, ensure_teacher
from orchestrator.search import control_points, scheduler, searcher, trial_budget
from orchestrator.tracking import MlflowTrialCallback, SweepTracker, check_tracking_uri, default_tracking_uri
from trainables.registry import ConfigError


@dataclass
class Plan:
    name: str
    storage: str
    tracking_uri: str
    experiment: str
    studies: list[tuple[str, list[str], int]]
    trial_resources: dict[str, float]
    teacher: str
    data: DataInfo
    controls: int

    def describe(self) -> str:
        total = sum(n for _, _, n in self.studies)
        lines = [
            f"sweep {self.name}: {total} trials in {len(self.studies)} stud{'y' if len(self.studies) == 1 else 'ies'}",
            *[f"  {study}: {n} trials over {students}" for study, students, n in self.studies],
            f"  first {self.controls} trials: alpha=0 controls and the T=4, alpha=0.9 standard point",
            f"  data: {self.data.n_train} train / {self.data.n_val} val / {self.data.n_test} test, "
            f"{self.data.num_classes} classes, input {self.data.input_shape}",
            f"  teacher: {self.teacher}",
            f"  resources per trial: {self.trial_resources}",
            f"  storage: {self.storage}",
            f"  tracking: {self.tracking_uri} (experiment {self.experiment!r})",
        ]
        return "\n".join(lines)


def make_plan(cfg: SweepConfig, tracking_uri: str | None) -> tuple[Plan, DataInfo]:
    """Everything checked that can be checked before Ray starts; writes nothing."""
    uri = tracking_uri or cfg.tracking.uri or default_tracking_uri()
    check_tracking_uri(uri)
    info = check_data(cfg)
    teacher = check_teacher(cfg, info)
    r = cfg.resources
    res = {"workers": r.num_workers, "CPU_per_worker": r.cpus_per_trial, "GPU_per_worker": r.gpus_per_trial}
    plan = Plan(cfg.name, str(Path(cfg.storage_path()) / cfg.name), uri, cfg.experiment, trial_budget(cfg), res,
                str(teacher) if teacher else f"{cfg.teacher_dir()} (trained before the sweep starts)", info,
                len(control_points(cfg, cfg.students)))
    return plan, info


#: Environment for every process of the job (driver, Tune actors, Train controllers and workers).
JOB_ENV = {
    "RAY_TRAIN_V2_ENABLED": "1",
    # Train V2's controller collects worker reports on this poll; its default (2 s) adds up to
    # 2 s to every epoch of a small trial.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    # Save Tune's experiment state at every step, so a killed driver loses no started trial.
    "TUNE_GLOBAL_CHECKPOINT_S": "0",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def init_ray(address: str | None, **kwargs) -> None:
    """Join `address`, or start a local Ray (dashboard on 127.0.0.1: the State API that cleans up
    ASHA-stopped trials' placement groups needs it)."""
    import ray

    for k, v in JOB_ENV.items():
        os.environ.setdefault(k, v)
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": {k: os.environ[k] for k in JOB_ENV}}
    if address:
        ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
    else:
        kwargs.setdefault("object_store_memory", int(os.environ.get("KDSWEEP_OBJECT_STORE_BYTES", 512 * 1024**2)))
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False, runtime_env=runtime_env, **kwargs)


class QueueReport(UserCallback):
    """Ray Train callback (runs in the Train controller): rank 0's metrics of every report, with
    the persisted checkpoint's path, into a queue that the Tune trial function drains.

    This replaces ray.tune.integration.ray_train.TuneReportCallback, which hands results to Tune's
    main thread; when a trial ends right after its last report, that path races the function's own
    final result for a one-slot queue and deadlocks (seen with Ray 2.60 on short trials).
    """

    def __init__(self, queue) -> None:
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint) -> None:
        item = dict(metrics[0])
        if checkpoint is not None:
            item["checkpoint_path"] = checkpoint.path
        self.queue.put(item)


_DONE = "__kdsweep_done__"


def build_cache(trial_cfg: dict[str, Any], root: str, epochs: int) -> tuple[str, int]:
    """Ray task: the sweep's teacher soft-target cache (trainables.teacher_cache), on a GPU if given one."""
    import torch

    from trainables.config import TrialConfig
    from trainables.teacher import load_teacher
    from trainables.teacher_cache import build_teacher_cache

    cfg = TrialConfig.model_validate(trial_cfg)
    teacher, card = load_teacher(cfg.teacher_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path, forwards = build_teacher_cache(cfg, teacher, card["sha256"], root, epochs, device)
    return str(path), forwards


def ensure_cache(cfg: SweepConfig, teacher: str, sweep_dir: Path, printer=print) -> tuple[str | None, int]:
    """Teacher forwards per sweep do not grow with trials: the teacher sees each view once, here."""
    from trainables.losses import LOSSES

    if not cfg.train.teacher_cache or cfg.train.teacher_targets == "online" or LOSSES.get(cfg.loss.name).needs_teacher_features:
        return None, 0
    import ray

    r = cfg.resources
    task = ray.remote(num_cpus=r.cpus_per_trial, num_gpus=1 if r.gpus_per_trial > 0 else 0)(build_cache)
    trial = cfg.trial(cfg.students[0], teacher_path=teacher)
    path, forwards = ray.get(task.remote(trial.model_dump(), str(sweep_dir / "teacher_cache"), cfg.train.epochs))
    printer(f"teacher cache: {path} ({forwards} teacher image forwards{' now' if forwards else ', already built'})")
    return path, forwards


def tune_trial(config: dict[str, Any], sweep: dict[str, Any], teacher_path: str, train_storage: str,
               teacher_cache: str | None = None) -> None:
    """One Tune trial = one Ray Train TorchTrainer run (DDP when num_workers > 1).

    Runs inside a Tune actor; the worker side gets only the trial config (trainables never import
    the orchestrator). The trainer runs in a thread; this function's thread forwards its reports
    to Tune with tune.report, so ASHA sees every epoch.
    """
    import threading

    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from trainables.loop import train_loop_per_worker

    cfg = SweepConfig.model_validate(sweep)
    student = config["student"]
    # The trial checks the cache's key and goes online on a mismatch.
    trial = cfg.trial(student, {k: v for k, v in config.items() if k != "student"}, teacher_path, teacher_cache=teacher_cache)
    r = cfg.resources
    reports = Queue(actor_options={"num_cpus": 0})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=trial.model_dump(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=r.num_workers, use_gpu=r.gpus_per_trial > 0,
            resources_per_worker={"CPU": r.cpus_per_trial, **({"GPU": r.gpus_per_trial} if r.gpus_per_trial else {})},
        ),
        run_config=ray.train.RunConfig(
            name=f"trial-{tune.get_context().get_trial_id()}",
            storage_path=train_storage,
            callbacks=[QueueReport(reports)],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),  # the previous one survives a kill mid-persist
            # A finite controller limit: an unplaceable worker group fails the trial instead of hanging.
            failure_config=ray.train.FailureConfig(max_failures=cfg.budget.max_failures, controller_failure_limit=2),
        ),
    )
    errors: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # re-raised below, in the trial's own thread
            errors.append(e)
        finally:
            reports.put(_DONE)

    started = time.perf_counter()
    thread = threading.Thread(target=fit, name="kdsweep-trainer", daemon=True)
    thread.start()
    first = True
    while (item := reports.get()) != _DONE:
        if first:  # fixed cost before the first epoch: actors, worker group, data, model, teacher
            item["trial_startup_s"] = time.perf_counter() - started - item.get("epoch_time_s", 0.0)
            first = False
        tune.report(item)
    thread.join()
    if errors:
        raise errors[0]


class TuneStateBackup(Callback):
    """Keeps a last-good copy of Tune's experiment state, swapped in atomically.

    Tune writes its experiment_state JSON in place, so a driver killed mid-write leaves an empty
    file and Tune would silently restart the whole study. After every step in which a trial
    changed, the state files are copied aside, validated, and swapped in with one rename; `resume`
    falls back to this copy when the live state does not parse.
    """

    def __init__(self) -> None:
        self.experiment_dir: Path | None = None
        self._dirty = False

    def on_trial_start(self, iteration, trials, trial, **info):
        self._dirty = True

    on_trial_result = on_trial_complete = on_trial_error = on_trial_start  # type: ignore[assignment]

    def on_step_end(self, iteration, trials, **info):
        if self._dirty and self.experiment_dir is not None and _snapshot(self.experiment_dir):
            self._dirty = False


BACKUP = ".kdsweep-state-backup"


def _pickle_is_complete(data: bytes) -> bool:
    """Walk a pickle's opcodes without executing any (no imports, no __setstate__, no network):
    a write cut short has no final STOP."""
    try:
        ops = list(pickletools.genops(data))
    except Exception:  # genops raises ValueError (and others) on a truncated or foreign stream
        return False
    return bool(ops) and ops[-1][0].name == "STOP"


def _state_is_valid(files: list[Path]) -> bool:
    states = [f for f in files if f.name.startswith("experiment_state-")]
    try:
        for f in states:
            json.loads(f.read_text())
    except (OSError, ValueError):
        return False
    return bool(states) and all(_pickle_is_complete(f.read_bytes()) for f in files if f.suffix == ".pkl")


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


def _repair_state(experiment_dir: Path, printer=print) -> None:
    """Before a restore: if the live state is unreadable, put the last good copy back."""
    backup = experiment_dir / BACKUP
    if not backup.is_dir() or _state_is_valid([f for f in experiment_dir.iterdir() if f.is_file()]):
        return
    for f in experiment_dir.iterdir():
        if f.is_file() and (f.name.startswith("experiment_state-") or (backup / f.name).exists()):
            f.unlink()
    for f in backup.iterdir():
        shutil.copy2(f, experiment_dir / f.name)
    printer(f"restored Tune state from the last good copy in {backup}")


def _tuner(cfg: SweepConfig, study: str, students: list[str], n: int, teacher: str, sweep_dir: Path, callbacks: list,
           restore: bool, cache: str | None):
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(tune_trial, sweep=cfg.model_dump(), teacher_path=teacher, train_storage=str(sweep_dir / "train"),
                             teacher_cache=cache),
        {"memory": 2**20},  # a token request: the TorchTrainer inside reserves the real resources
    )
    path = sweep_dir / f"tune-{study}"
    callbacks[1].experiment_dir = path
    if restore and path.is_dir():
        _repair_state(path)
    if restore and tune.Tuner.can_restore(str(path)):
        return tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            num_samples=n, search_alg=searcher(cfg, students), scheduler=scheduler(cfg),
            max_concurrent_trials=cfg.budget.max_concurrent,
        ),
        run_config=tune.RunConfig(
            name=f"tune-{study}", storage_path=str(sweep_dir), callbacks=list(callbacks),  # Tune appends to it
            failure_config=tune.FailureConfig(max_failures=cfg.budget.max_failures), verbose=int(os.environ.get("KDSWEEP_TUNE_VERBOSE", 1)),
        ),
    )


def run_sweep(cfg: SweepConfig, address: str | None = None, tracking_uri: str | None = None, restore: bool = False,
              printer=print) -> dict[str, Any]:
    """Validate, prepare the teacher, run every study, close orphans. Returns the tracking handles."""
    plan, info = make_plan(cfg, tracking_uri)
    sweep_dir = Path(plan.storage)
    if not restore and (sweep_dir / "sweep.json").exists():
        raise ConfigError(f"`name` {cfg.name!r} already has a sweep in {sweep_dir}: `kdsweep resume {cfg.name}` finishes it, "
                          "or start a new one with --set name=NEW")
    teacher = str(ensure_teacher(cfg, info, printer=printer).resolve())
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "sweep.json").write_text(json.dumps({"config": cfg.model_dump(), "tracking_uri": plan.tracking_uri, "teacher": teacher}, indent=2))
    tracker = SweepTracker(plan.tracking_uri, plan.experiment)
    parent = tracker.parent_run(cfg.name, cfg.model_dump())
    model_info = {"num_classes": info.num_classes, "input_shape": list(info.input_shape),
                  "fixed_params": {"loss": cfg.loss.name, "seed": cfg.seed, "dataset": cfg.dataset.name, "teacher": cfg.teacher.arch}}
    callbacks = [MlflowTrialCallback(tracker, parent, cfg.name, model_info), TuneStateBackup()]
    printer(plan.describe())
    init_ray(address)
    cache, forwards = ensure_cache(cfg, teacher, sweep_dir, printer)
    if forwards:
        tracker.log_metrics(parent, {"teacher_cache_forward_images": forwards}, step=0)
    try:
        for study, students, n in plan.studies:
            _tuner(cfg, study, students, n, teacher, sweep_dir, callbacks, restore, cache).fit()
    finally:
        closed = tracker.close_orphans(parent)
        if closed:
            printer(f"closed {closed} orphaned trial run(s)")
    tracker.client.set_terminated(parent, "FINISHED")
    return {"tracker": tracker, "parent_run_id": parent, "teacher": teacher, "data": asdict(info)}


@dataclass
class SavedSweep:
    config: SweepConfig
    tracking_uri: str
    teacher: str
    directory: Path


def load_sweep(name: str, storage: str | None = None) -> SavedSweep:
    """The resolved config, tracking URI and teacher a sweep was started with (resume, best, report)."""
    path = Path(storage or "runs").resolve() / name / "sweep.json"
    if not path.is_file():
        raise ConfigError(f"`NAME` has no sweep at {path}: check the name or pass --storage")
    saved = json.loads(path.read_text())
    return SavedSweep(SweepConfig.model_validate(saved["config"]), saved["tracking_uri"], saved["teacher"], path.parent)
