"""Run, resume and plan a sweep (driver side): Tune (Optuna TPE + ASHA) over distillation trials.

A sweep's files: the local sweep folder (`storage/NAME/`, or `./runs/NAME/` when storage is a URI)
holds sweep.json (the resolved config, so `kdsweep resume NAME` needs nothing else) and the teacher
cache; Ray's storage (`storage/NAME/`, local or s3://...) holds the sweep's one Tune experiment
(tune-joint, or tune-per_student with one Optuna study per student) and each trial's
checkpoints: a one-worker (warm) trial's in its Tune trial folder, a DDP trial's in its Ray Train
run (train/trial-<id>; Train V2 restores a run from its storage snapshot when the same name and path
are used again). Either way a restored trial resumes from its last checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from orchestrator.plan.config import SweepConfig
from orchestrator.plan.confirm import cap as confirm_cap
from orchestrator.run.console import ConsoleReporter, progress_board
from orchestrator.plan.prepare import DataInfo, check_data, check_teacher, ensure_teacher
from orchestrator.plan.resources import PlacementGroupReaper, check_local, check_reachable, ray_address, wait_for_cluster
from orchestrator.plan.search import (ConfirmStage, PerStudentScheduler, PerStudentSearch, ResolvedSearch, TrialBuilder, first_trials,
                                 objectives, scheduler, searcher, trial_budget)
from orchestrator.track.study import export_study, plot_study
from orchestrator.track.store import LATENCY_RECORD, SweepTracker, TrackingUnavailable, check_tracking_uri, default_tracking_uri, outage_message, unreachable
from orchestrator.track.tracking import MlflowTrialCallback
from orchestrator.run.tune_state import TuneStateBackup, repair_state
from trainables.config import validate
from trainables.eval.metrics import metric
from trainables.api import BatchLayout, TrialRun, bytes_per_view, load_plugins, teacher_card_file, tune_trial
from trainables.registry import ConfigError

log = logging.getLogger(__name__)


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
    first: str  # what the trials before TPE's own are (search.first_trials)
    confirm: tuple[int, int]  # (top, seeds)
    random_views: bool  # augmentation draws new views per seed: a confirmation seed's are not in the teacher cache
    notes: list[str]  # what will not take full effect (a loss's warm-up longer than the trials)
    cache: str  # what the teacher cache holds and costs
    label_words: str = "classes"  # what a logit indexes (Task.label_words)

    def describe(self) -> str:
        total = sum(n for _, _, n in self.studies)
        top, seeds = self.confirm
        lines = [
            f"sweep {self.name}: {total} trials in {len(self.studies)} stud{'y' if len(self.studies) == 1 else 'ies'}, one Tune run",
            *[f"  {study}: {n} trials over {students}" for study, students, n in self.studies],
            f"  {self.first}",
            *(f"  note: {n}" for n in self.notes),
            f"  then confirmation: the top {top} finalist(s) on {seeds} seeds each (the search trial's included), each beside its "
            f"alpha=0 control at the same settings and seeds: up to {confirm_cap(top, seeds)} more trials"
            + ("; random views: the new seeds' KD trials run the teacher online (the cache holds the search seed's views)"
               if self.random_views else "") if top else
            "  no confirmation (budget.confirm.top: 0): the champion is the best single-seed trial",
            f"  data: {self.data.n_train} train"
            + (f" + {self.data.n_unlabeled} unlabelled (the distillation term only; controls train on the labelled)"
               if self.data.n_unlabeled else "")
            + f" / {self.data.n_val} val / {self.data.n_test} test, {self.data.num_classes} {self.label_words}, input {self.data.input_shape}"
            + (f", {len(self.data.skipped)} undecodable file(s) skipped" if self.data.skipped else ""),
            f"  teacher: {self.teacher}",
            f"  teacher cache: {self.cache}",
            f"  resources per trial: {self.trial_resources}",
            f"  storage: {self.storage}",
            f"  tracking: {self.tracking_uri} (experiment {self.experiment!r})",
        ]
        return "\n".join(lines)


def make_plan(cfg: SweepConfig, tracking_uri: str | None, address: str | None = None) -> tuple[Plan, DataInfo]:
    """Everything checked that can be checked before Ray starts; writes nothing. On a local Ray
    that includes whether this machine can ever hold a trial (with --address: run_sweep asks the
    cluster once connected)."""
    uri = tracking_uri or cfg.tracking.uri or default_tracking_uri()
    check_tracking_uri(uri)
    address = ray_address(address)
    if address is not None:
        check_reachable(address, cfg.resources.connect_timeout_s)
    info = check_data(cfg)
    teacher = check_teacher(cfg, info)
    largest = max([cfg.train.batch_size, *(max(p_.extremes()) for k, p_ in cfg.search.items() if k == "train.batch_size")])
    if largest > info.n_train:
        raise ConfigError(f"`train.batch_size` must be <= the {info.n_train} labelled train {cfg.task.unit}, but got up to {largest:g}: lower it")
    check_against_data(cfg, info)
    if address is None:
        check_local(cfg.resources)
    r = cfg.resources
    res = {"workers": r.num_workers, "CPU_per_worker": r.cpus_per_trial, "GPU_per_worker": r.gpus_per_trial}
    plan = Plan(cfg.name, cfg.ray_storage(), uri, cfg.experiment, trial_budget(cfg), res,
                str(teacher) if teacher else f"{cfg.teacher_dir()} (trained before the sweep starts)", info,
                first_trials(cfg, sum(n for _, _, n in trial_budget(cfg))), (cfg.budget.confirm.top, cfg.budget.confirm.seeds),
                not cfg.trial(cfg.students[0], distill=False).dataset.augment_or_default().static, warmup_notes(cfg) + on_policy_notes(cfg), cache_line(cfg, info),
                cfg.task.label_words)
    return plan, info


def cache_line(cfg: SweepConfig, info: DataInfo) -> str:
    """The plan's line on the teacher cache: what a view costs, what an epoch costs, when it is built."""
    if not cfg.train.teacher_cache or cfg.train.teacher_targets == "online":
        return "off (every KD trial runs the teacher)"
    members = len(cfg.members) if cfg.is_ensemble and cfg.ensemble.combine == "probs" else 1
    per_row = bytes_per_view(info.num_classes, cfg.train.teacher_topk, members)  # one distribution: an example's, or a token's
    rows = cfg.task.per_example(info.input_shape)
    views = info.n_train + info.n_unlabeled
    what = (f"top-{cfg.train.teacher_topk} of {info.num_classes} logits (the rest: {cfg.train.teacher_topk_rest})" if cfg.train.teacher_topk
            else f"all {info.num_classes} logits")
    static = cfg.trial(cfg.students[0], distill=False).dataset.augment_or_default().static
    when = ("fixed views: built once, by the first trial (the others wait for it, then read it)" if static else
            "random views: each epoch built by the first trial that needs it (the others wait for it, then read it)")
    size = per_row * rows * views
    shown = f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
    each = f"{per_row} bytes a view" if rows == 1 else f"{per_row} bytes a {cfg.task.unit[:-1]} ({per_row * rows:,} a block of {rows})"
    return f"{what}, {each}{' (every member)' if members > 1 else ''}, {shown} an epoch; {when}"


def check_against_data(cfg: SweepConfig, info: DataInfo) -> None:
    """What only the data can tell, before Ray starts: top-k within the class count, an unlabelled
    mix that divides over a trial's DDP workers (each rank the same number of each kind)."""
    k = cfg.train.teacher_topk
    if k is not None and k > info.num_classes:
        raise ConfigError(f"`train.teacher_topk` must be <= the {info.num_classes} classes, but got train.teacher_topk={k}: lower it (or null: all)")
    if info.n_unlabeled and cfg.resources.num_workers > 1:
        BatchLayout.of(info.n_train, cfg.train.batch_size, info.n_unlabeled, cfg.dataset.unlabeled_ratio).check_world(cfg.resources.num_workers)


def warmup_notes(cfg: SweepConfig) -> list[str]:
    """The losses whose distillation warm-up outlasts a trial (dkd's 20 epochs in a 12-epoch sweep):
    they never reach full weight."""
    from trainables.api import LOSSES

    if "loss.warmup_epochs" in cfg.search:
        return []
    shortest = min([cfg.train.epochs, *(min(p.extremes()) for k, p in cfg.search.items() if k == "train.epochs")])
    notes = []
    for m in cfg.methods:
        warm = (cfg.loss.model_extra or {}).get("warmup_epochs", LOSSES.get(m).default_warmup_epochs)
        if warm > shortest:
            notes.append(f"{m} warms its distillation term up over {warm:g} epochs, more than the trials' {shortest}: it never reaches "
                         f"full weight (set loss.warmup_epochs, e.g. {max(1, shortest // 4)})")
    return notes


def on_policy_notes(cfg: SweepConfig) -> list[str]:
    """What GKD's on-policy share costs, when loss.lmbda can be above 0: sampling and the teacher online."""
    extra = cfg.loss.model_extra or {}
    top = max([float(extra.get("lmbda", 0.0)), *(max(p.extremes()) for k, p in cfg.search.items() if k == "loss.lmbda")])
    if top <= 0:
        return []
    new = int(extra.get("max_new_tokens", 16))
    return [f"on-policy (loss.lmbda up to {top:g}): that share of KD batches samples up to {new} tokens from the student, one full "
            f"forward a token, and runs the teacher on them (they are not in the cache): each costs about {new + 1} forwards of a batch more"]


#: Environment for every process of the job (driver, Tune actors, Train controllers and workers).
JOB_ENV = {
    "RAY_TRAIN_V2_ENABLED": "1",
    # Train V2's controller collects worker reports on this poll; its default (2 s) adds up to
    # 2 s to every epoch of a small trial.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    # Save Tune's experiment state at every step, so a killed driver loses no started trial.
    "TUNE_GLOBAL_CHECKPOINT_S": "0",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # A reused Tune actor waits this long for a stopped trial's loop to finish its batch (or its
    # val pass) before it is replaced by a fresh one; Tune's default is 2 s.
    "TUNE_FUNCTION_THREAD_TIMEOUT_S": "30",
}


def init_ray(address: str | None, **kwargs) -> None:
    """Join `address`, or start a local Ray of our own (its dashboard, when ray[default] is installed,
    on 127.0.0.1: the State API that cleans up stopped DDP trials' placement groups needs it)."""
    import ray

    for k, v in JOB_ENV.items():
        os.environ.setdefault(k, v)
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": {k: os.environ[k] for k in JOB_ENV}}
    ours = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    if address:
        ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
    else:
        kwargs.setdefault("object_store_memory", int(os.environ.get("KDSWEEP_OBJECT_STORE_BYTES", 512 * 1024**2)))
        ray.init(address="local", include_dashboard=None, dashboard_host="127.0.0.1", log_to_driver=False, runtime_env=runtime_env, **kwargs)
    if callable(ours):
        # ray.init replaces a SIGTERM handler with its own: a head node drains for up to 30 s, kills
        # its processes and exits before any `finally` runs (seen: killed by SIGABRT). The command's own (cli._terminate)
        # ends through every `finally` instead, ray_session's reaper included.
        signal.signal(signal.SIGTERM, ours)


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Join `address`, or start a local Ray that ends with the sweep, every process it started
    included, whichever way the sweep ends (a Train controller must not outlive a failed sweep).
    Its processes exit while the driver goes on (selection needs no Ray): a non-daemon thread waits
    for them, and Python's exit waits for that thread."""
    import ray

    started = address is None and not ray.is_initialized()
    init_ray(address)
    try:
        yield
    finally:
        if started:
            procs, raylets = _local_ray_processes()
            _kill_monitor()
            ray.shutdown()
            threading.Thread(target=_reap, args=(procs, raylets), name="kdsweep-ray-reaper").start()


def _kill_monitor() -> None:
    """ray.shutdown() stops the raylet and the GCS first, then gives every other process a second to
    exit on SIGTERM; the autoscaler monitor spends all of it trying to tell the stopped GCS that it
    was terminated. The monitor of a Ray this driver started holds nothing: it is killed first."""
    import ray
    from ray._private import ray_constants

    node = getattr(ray._private.worker, "_global_node", None)  # private, as in _local_ray_processes
    for info in getattr(node, "all_processes", {}).get(ray_constants.PROCESS_TYPE_MONITOR, []):
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            info.process.kill()
            info.process.wait(timeout=5)


def _local_ray_processes() -> tuple[list, set[str]]:
    """The processes of the Ray this driver started (its GCS, raylet, ... and their workers), and
    its raylets' pids (every worker a raylet starts carries RAY_RAYLET_PID)."""
    import psutil
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # private, but the only handle on them
    roots, raylets = [], set()
    for kind, infos in getattr(node, "all_processes", {}).items():
        for info in infos:
            if kind == "raylet":  # even when it has exited: the workers it started may not have
                raylets.add(str(info.process.pid))
            with contextlib.suppress(psutil.Error, AttributeError):
                roots.append(psutil.Process(info.process.pid))
    procs = list(roots)
    for r in roots:
        with contextlib.suppress(psutil.Error):
            procs += r.children(recursive=True)
    return procs, raylets


def _reap(procs: list, raylets: set[str], grace_s: float = 10.0) -> None:
    """Wait for the Ray processes to exit, then kill what is left: those listed first (a raylet
    among them starts no worker once it is gone), then any worker a raylet started after the list
    was taken (a trial actor starting while the sweep stopped)."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    _kill(alive, grace_s)
    late = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.pid != os.getpid() and p.status() != psutil.STATUS_ZOMBIE and p.environ().get("RAY_RAYLET_PID") in raylets:
                late.append(p)
    _kill(late, grace_s)


def _kill(procs: list, grace_s: float) -> None:
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.Error):
            log.info("stopping leftover Ray process %d (%s)", p.pid, p.name())
            p.kill()
    psutil.wait_procs(procs, timeout=grace_s)


def ensure_cache(cfg: SweepConfig, teacher: str, sweep_dir: Path, num_classes: int) -> str | None:
    """The sweep's teacher cache: keyed here, built by the trials (val, and each set of views, by the
    first trial that needs it), so teacher forwards per sweep do not grow with trials and no trial
    waits for views it will not reach. None when no trial would read it."""
    from trainables.api import LOSSES, create_cache, read_teacher_card

    if not cfg.train.teacher_cache or cfg.train.teacher_targets == "online" or all(LOSSES.get(m).needs_teacher_features for m in cfg.methods):
        return None
    path = create_cache(cfg.trial(cfg.students[0], teacher_path=teacher), read_teacher_card(teacher), sweep_dir / "teacher_cache", num_classes)
    log.info("teacher cache: %s", path)
    return str(path)


def log_topk_mass(cfg: SweepConfig, cache: str | None, tracker: SweepTracker, parent: str) -> None:
    """With top-k targets, the share of the teacher's softened mass they keep (teacher_cache.topk_mass,
    recorded by the trial that built val): said, and logged to the sweep's run."""
    from trainables.api import read_topk_mass

    mass = read_topk_mass(cache) if cache and cfg.train.teacher_topk else None
    if not mass:
        return
    log.info("teacher cache: the top-%d classes hold %s of the teacher's softened probabilities on val at T = %s; the shape of "
             "the rest is not kept, so the less they hold, the more of the teacher's structure is lost (docs/benchmarks.md: top-k)",
             cfg.train.teacher_topk, ", ".join(f"{100 * v:.1f} %" for v in mass.values()), ", ".join(mass))
    tracker.log_metrics(parent, {f"teacher_topk_mass_t{t}": v for t, v in mass.items()}, step=0)


class Profiles:
    """Each architecture's size, once per sweep, never inside trials that compete for the machine.

    Static sizes (params, bytes, FLOPs: the same whenever and wherever they are measured, on a CPU
    copy) are worked out in one thread of this process, which already builds the config's models
    and loads the teacher: a Ray task would start a worker process (seconds of imports) and wait
    behind the trials for a CPU, which in a small sweep is its last seconds. The students' begin
    beside the teacher's training, the teacher's once it is saved; no trial waits for them unless
    an objective reads them: `ready()` says whether they are in, `reports()` waits.
    Latency is timed otherwise (measure_latency): the teacher and every student back to back,
    interleaved, with a fixed thread count, while no trial runs and no size is being worked out,
    so that the speedup over the teacher and the students' order compare like with like."""

    def __init__(self, cfg: SweepConfig, info: DataInfo, local: bool = False) -> None:
        import ray

        from trainables.api import latency_task

        r = cfg.resources
        self.cfg, self.info = cfg, info
        self.task_name = cfg.task.name  # what the models' example inputs are
        self.here = local and not r.gpus_per_trial  # a local CPU sweep: this process is on the trials' kind of device
        self.latency_task = ray.remote(num_cpus=r.cpus_per_trial, num_gpus=r.gpus_per_trial)(latency_task)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="kdsweep-sizes")
        self.students: dict[str, Future] = {}
        self.teacher: Future | None = None
        self.teacher_path: str | None = None  # the teacher's size is worked out once this is known
        self.latency: dict[str, Any] | None = None  # measure_latency's record

    def start(self) -> None:
        """Queue the sizes not queued yet: the students', and the teacher's once teacher_path is set."""
        from trainables.api import profile_sizes

        cfg, info = self.cfg, self.info
        if not self.students:
            self.students = {s: self.pool.submit(profile_sizes, self.task_name, arch=s, shape=list(info.input_shape), num_classes=info.num_classes,
                                                 plugins=cfg.plugins, arch_kwargs=cfg.student_kwargs(s)) for s in cfg.students}
        if self.teacher_path is not None and self.teacher is None:
            self.teacher = self.pool.submit(profile_sizes, self.task_name, teacher_path=self.teacher_path, plugins=cfg.plugins)

    def measure_latency(self, when: str) -> dict[str, Any]:
        """Time the teacher and every student (latency_task), now: the caller makes sure no trial
        runs (`when` says at which moment, for the record), and the sizes are waited for first.
        Threads: the trial's CPUs, at least 1. A local CPU sweep times them in this process (no
        worker to start), else a Ray task holding one trial's resources does."""
        import ray

        from trainables.api import latency_task

        self.start()
        for f in filter(None, (self.teacher, *self.students.values())):
            f.exception()  # done (a failure is raised by reports())
        cfg, info = self.cfg, self.info
        threads = max(1, int(cfg.resources.cpus_per_trial))
        log.info("timing the teacher and %d student(s) back to back, interleaved (%d thread%s), %s", len(cfg.students), threads,
                 "" if threads == 1 else "s", when)
        args = (self.task_name, self.teacher_path, {s: cfg.student_kwargs(s) for s in cfg.students}, list(info.input_shape), info.num_classes, cfg.plugins, threads)
        self.latency = {**(latency_task(*args) if self.here else ray.get(self.latency_task.remote(*args))), "when": when}
        return self.latency

    def reports(self) -> dict[str, dict[str, float]]:
        """Each student's size_report (its latency keys once measured), waiting for the sizes
        (queued now if they were not)."""
        from trainables.api import TEACHER, size_report

        self.start()
        times = (self.latency or {}).get("latency", {})
        teacher = {**self.teacher.result(), **times.get(TEACHER, {})}
        return {name: size_report({**f.result(), **times.get(name, {})}, teacher) for name, f in self.students.items()}

    def ready(self) -> dict[str, dict[str, float]] | None:
        """reports() once every size is in, else None at once."""
        if self.teacher is None or not all(f.done() for f in (self.teacher, *self.students.values())):
            return None
        return self.reports()


def log_latency(profiles: Profiles, tracker: SweepTracker, parent: str, teacher_training: tuple[float, float] | None = None) -> None:
    """The latency record on the sweep's run (latency.json: every model's numbers, how and when they
    were timed, and what else ran in that window: the trial runs and the teacher's training that
    overlap it, none when all is well) and each trial run's latency keys, from that one measurement."""
    record = dict(profiles.latency or {})
    if not record:
        return
    runs = tracker.trial_runs(parent)
    if "running" not in record:  # said once, when measured (later, selection reopens the champion's run: its end moves)
        t0, t1 = (1000 * t for t in record["window"])
        record["running"] = [r.info.run_name for r in runs if r.info.start_time < t1 and (r.info.end_time or t1) > t0]
        if teacher_training and teacher_training[0] < record["window"][1] and teacher_training[1] > record["window"][0]:
            record["running"].append("teacher training")
        record["teacher_training"] = list(teacher_training) if teacher_training else None
    tracker.log_text(parent, json.dumps(record, indent=2), LATENCY_RECORD)
    reports = profiles.reports()
    for r in runs:
        student = r.data.params.get("student")
        timed = {k: v for k, v in reports.get(student, {}).items() if "latency" in k}
        if timed:
            tracker.log_metrics(r.info.run_id, timed, step=0)


def _tune_output(verbose: bool) -> None:
    """Tune's own progress output only with --verbose (its new output engine prints its headers
    even when silent; the old one obeys verbose=0)."""
    os.environ["RAY_AIR_NEW_OUTPUT"] = "1" if verbose else "0"
    logging.getLogger("ray.tune").setLevel(logging.NOTSET if verbose else logging.WARNING)


def _tuner(cfg: SweepConfig, trainable, callbacks: list, restore: bool, verbose: bool, build: TrialBuilder):
    """The sweep's one Tune run: every study's trials (joint: one Optuna study over all students;
    per_student: one per student, PerStudentSearch handing out trials round robin)."""
    from ray import tune

    _tune_output(verbose)
    study = "joint" if cfg.mode == "joint" else "per_student"
    path = f"{cfg.ray_storage()}/tune-{study}"
    local = Path(path) if "://" not in path else None
    callbacks[1].experiment_dir = local
    if restore and local is not None and local.is_dir():
        repair_state(local)
    if restore and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
        # Tuner.restore takes no run config (Ray 2.60) and would run the callbacks pickled with the
        # first driver, with its tracking URI: hand it this driver's, and its TrialBuilder (its teacher and cache).
        tuner._local_tuner.get_run_config().callbacks = list(callbacks)
        search = tuner._local_tuner._tune_config.search_alg
        if not isinstance(search, ResolvedSearch) or not hasattr(search, "stage"):
            raise ConfigError(f"`NAME` {cfg.name!r} was started by an older kdsweep, whose trials this one cannot continue: "
                              "start a new sweep (--set name=NEW)")
        search.build = build
        return tuner
    top, seeds = cfg.budget.confirm.top, cfg.budget.confirm.seeds
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            num_samples=cfg.budget.num_samples + confirm_cap(top, seeds),  # the searcher says when it is done
            search_alg=ResolvedSearch(searcher(cfg, cfg.students) if cfg.mode == "joint" else PerStudentSearch(cfg), build,
                                      cfg.budget.num_samples, ConfirmStage(cfg, top, seeds) if top else None),
            scheduler=scheduler(cfg) if cfg.mode == "joint" else PerStudentScheduler(cfg),
            max_concurrent_trials=cfg.budget.max_concurrent,
            reuse_actors=True,  # one-worker trials: the next trial finds torch, data and teacher loaded
        ),
        run_config=_run_config(cfg, f"tune-{study}", callbacks, verbose),
    )


def _run_config(cfg: SweepConfig, name: str, callbacks: list, verbose: bool):
    """A Tune run of this sweep (the search, or a later confirmation) in the sweep's storage."""
    from ray import tune

    return tune.RunConfig(
        name=name, storage_path=cfg.ray_storage(), callbacks=list(callbacks),  # Tune appends to it
        failure_config=tune.FailureConfig(max_failures=cfg.budget.max_failures), verbose=1 if verbose else 0,
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),  # the previous one survives a kill mid-persist
    )


def run_sweep(cfg: SweepConfig, address: str | None = None, tracking_uri: str | None = None, restore: bool = False,
              verbose: bool = False) -> dict[str, Any]:
    """Validate, prepare the teacher, run every study, close orphans. Returns the tracking handles,
    and `plots`: a future of Optuna's plots, still being drawn and logged (its result() waits).

    Nothing is written until every check has passed, the cluster's resources included. `verbose`
    shows Tune's own progress output instead of kdsweep's table."""
    address = ray_address(address)
    plan, info = make_plan(cfg, tracking_uri, address)
    sweep_dir = cfg.sweep_dir()
    if not restore and (sweep_dir / "sweep.json").exists():
        raise ConfigError(f"`name` {cfg.name!r} already has a sweep in {sweep_dir}: `kdsweep resume {cfg.name}` finishes it, "
                          "or start a new one with --set name=NEW")
    # A local sweep has passed every check: its MLflow store (created in ~2 s the first time) is
    # opened while Ray starts. With --address the cluster is asked first, before anything is written.
    opening = _in_background(SweepTracker, plan.tracking_uri, plan.experiment) if address is None else None
    with ray_session(address):
        if address is not None:
            wait_for_cluster(cfg.resources, address)
        profiles = Profiles(cfg, info, local=address is None)  # the students' tasks run beside the teacher's training, queued behind it
        started = time.time()
        teacher = str(ensure_teacher(cfg, info, on_ray=True, beside=profiles.start).resolve())
        teacher_training = (started, time.time())
        profiles.teacher_path = teacher  # the rest are queued when the first trial starts (MlflowTrialCallback)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / "sweep.json").write_text(json.dumps({"config": cfg.model_dump(), "tracking_uri": plan.tracking_uri, "teacher": teacher}, indent=2))
        tracker = opening.result() if opening else SweepTracker(plan.tracking_uri, plan.experiment)
        parent = tracker.parent_run(cfg.name, cfg.model_dump())
        log.info("%s", plan.describe())
        tracker.log_files(parent, teacher_card_file(teacher), "teacher")  # an ensemble's records every member
        cache = ensure_cache(cfg, teacher, sweep_dir, info.num_classes)
        tracker.log_metrics(parent, {"data_skipped_files": len(info.skipped), "data_decode_s": info.decode_s}, step=0)
        if info.skipped:
            tracker.log_text(parent, "\n".join(info.skipped) + "\n", "data/skipped_files.txt")
        build = TrialBuilder(cfg, teacher_path=teacher, teacher_cache=cache, profile=False)
        trainable, callbacks = _trials(cfg, info, profiles, tracker, parent, sum(n for _, _, n in plan.studies), verbose)
        server_down = False
        try:
            results = list(_tuner(cfg, trainable, callbacks, restore, verbose, build).fit())
            if profiles.latency is None:  # no objective needed it before the trials: now, while none runs
                profiles.measure_latency("after the search, no trial running")
            log_latency(profiles, tracker, parent, teacher_training)
            log_topk_mass(cfg, cache, tracker, parent)
            studies = [export_study(cfg, study, students, [r for r in results if (r.config or {}).get("student") in students], sweep_dir)
                       for study, students, _ in plan.studies]
            plots = _in_background(_log_plots, tracker, parent, studies, sweep_dir / "optuna")
        except Exception as e:
            # The tracking server gone past MLflow's retries (the callbacks' writes): nothing more can be written.
            server_down = unreachable(e)
            if server_down:
                raise TrackingUnavailable(outage_message(plan.tracking_uri, cfg.name)) from e
            raise
        finally:
            if not server_down:
                closed = tracker.close_orphans(parent)
                if closed:
                    log.info("closed %d orphaned trial run(s)", closed)
        tracker.end_run(parent)
    return {"tracker": tracker, "parent_run_id": parent, "teacher": teacher, "data": asdict(info), "plots": plots}


def _log_plots(tracker: SweepTracker, parent: str, studies: list, out_dir: Path) -> list[Path]:
    """Optuna's plots of every study, logged to the sweep's run. In a thread of their own (run_sweep's
    `plots`), beside Ray's shutdown and the selection: they take seconds of imports and drawing."""
    pngs = [png for study in studies for png in plot_study(study, out_dir)]
    for png in pngs:
        tracker.log_files(parent, png, "optuna")
    return pngs


def _trials(cfg: SweepConfig, info: DataInfo, profiles: Profiles, tracker: SweepTracker, parent: str, total: int,
            verbose: bool) -> tuple[Any, list]:
    """The trainable every trial of the sweep runs (in a reused Tune actor, or a Ray Train worker
    group) and the driver's callbacks that track and show them: one set-up for the search with its
    confirmation and for a later `kdsweep best --confirm-seeds`."""
    from ray import tune

    size_objectives = [m for m in objectives(cfg)[0] if metric(m).kind == "size"]
    if any("latency" in m for m in size_objectives) and profiles.latency is None:
        profiles.measure_latency("before the trials")  # Optuna reads it from each report: timed while no trial runs yet
    sizes = profiles.reports() if size_objectives else {}  # Optuna reads them from each report: wait for them
    constants = {s: {m: sizes[s][m] for m in size_objectives} for s in cfg.students}
    r = cfg.resources
    run = TrialRun(r.num_workers, r.cpus_per_trial, r.gpus_per_trial, cfg.budget.max_failures, f"{cfg.ray_storage()}/train", r.warm)
    # A one-worker trial trains in its Tune actor, which holds the trial's resources; a DDP
    # trial's actor only waits for its TorchTrainer, which reserves them (a token request here).
    resources = {"CPU": r.cpus_per_trial, "GPU": r.gpus_per_trial} if r.warm else {"memory": 2**20}
    board = None if verbose else progress_board()
    trainable = tune.with_resources(tune.with_parameters(tune_trial, run=run, constants=constants, board=board), resources)
    model_info = {"num_classes": info.num_classes, "input_shape": list(info.input_shape), "classes": list(info.classes),
                  "fixed_params": {"dataset": cfg.dataset.name, "teacher": cfg.teacher_name}}
    callbacks = [MlflowTrialCallback(tracker, parent, cfg.name, model_info, profiles), TuneStateBackup()]
    if not r.warm:  # Ray Train worker groups: their placement groups can outlive a stopped trial
        callbacks.append(PlacementGroupReaper())
    if not verbose:
        callbacks.append(ConsoleReporter(cfg, total=total, board=board))
    return trainable, callbacks


def confirm_sweep(saved: "SavedSweep", tracker: SweepTracker, parent: str, top: int, seeds: int, address: str | None = None,
                  verbose: bool = False) -> int:
    """Confirm a finished sweep's finalists on more seeds without searching again: a Tune run of
    its own (tune-confirm-<n>) whose searcher hands out only the confirmation stage, over the
    search's ended trials read back from MLflow. Returns the trials it ran."""
    from ray import tune

    from orchestrator.select.selection import ended_trials

    cfg, address = saved.config, ray_address(address)
    stage = ConfirmStage(cfg, top, seeds, ended_trials(tracker, parent, cfg.primary))
    todo = len(stage.planned())
    if not todo:
        log.info("sweep %s: its top %d finalist(s) already ran on %d seeds: nothing to confirm", cfg.name, top, seeds)
        return 0
    info = check_data(cfg)
    check_against_data(cfg, info)
    if address is None:
        check_local(cfg.resources)
    base = Path(cfg.ray_storage()) if "://" not in cfg.ray_storage() else None
    n = 1 + sum(1 for _ in base.glob("tune-confirm-*")) if base and base.is_dir() else 1
    with ray_session(address):
        if address is not None:
            wait_for_cluster(cfg.resources, address)
        profiles = Profiles(cfg, info, local=address is None)
        profiles.teacher_path = saved.teacher
        cache = ensure_cache(cfg, saved.teacher, saved.directory, info.num_classes)
        build = TrialBuilder(cfg, teacher_path=saved.teacher, teacher_cache=cache, profile=False)
        trainable, callbacks = _trials(cfg, info, profiles, tracker, parent, 0, verbose)
        _tune_output(verbose)
        log.info("sweep %s: confirming its top %d finalist(s) on %d seeds: %d trial(s)", cfg.name, top, seeds, todo)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(num_samples=todo, max_concurrent_trials=cfg.budget.max_concurrent, reuse_actors=True,
                                        search_alg=ResolvedSearch(None, build, 0, stage)),
            run_config=_run_config(cfg, f"tune-confirm-{n}", callbacks, verbose),
        )
        try:
            tuner.fit()
            profiles.latency = tracker.read_json(parent, LATENCY_RECORD) or profiles.measure_latency("after the confirmation trials, no trial running")
            log_latency(profiles, tracker, parent)  # the new runs get the sweep's one measurement
        finally:
            tracker.close_orphans(parent)
    return todo



def _in_background(fn: Callable, *args) -> Future:
    """fn(*args) in a thread of its own, which ends with it."""
    pool = ThreadPoolExecutor(1)
    future = pool.submit(fn, *args)
    pool.shutdown(wait=False)
    return future


@dataclass
class SavedSweep:
    config: SweepConfig
    tracking_uri: str
    teacher: str
    directory: Path


def open_sweep(name: str, storage: str | None = None, tracking_uri: str | None = None) -> tuple[SavedSweep, SweepTracker, str]:
    """A started sweep's saved config, its MLflow store and its parent run (best, report, export)."""
    saved = load_sweep(name, storage)
    uri = tracking_uri or saved.tracking_uri
    check_tracking_uri(uri)
    tracker = SweepTracker(uri, saved.config.experiment)
    parents = tracker.parent_runs(saved.config.name)
    if not parents:
        raise ConfigError(f"`NAME` {name!r} has no parent run in {uri}: run the sweep first")
    return saved, tracker, parents[0].info.run_id


def load_sweep(name: str, storage: str | None = None) -> SavedSweep:
    """The resolved config, tracking URI and teacher a sweep was started with (resume, best, report)."""
    local = storage if storage and "://" not in storage else "runs"
    path = Path(local).resolve() / name / "sweep.json"
    if not path.is_file():
        raise ConfigError(f"`NAME` has no sweep at {path}: check the name or pass --storage")
    saved = json.loads(path.read_text())
    load_plugins(saved["config"].get("plugins", []))
    return SavedSweep(validate(SweepConfig, saved["config"], str(path)), saved["tracking_uri"], saved["teacher"], path.parent)
