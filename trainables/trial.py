"""What runs in a Tune trial actor.

A one-worker trial trains right in its Tune actor, which Tune reuses for the next trial
(`reuse_actors`): torch, the data (on the device) and the teacher stay loaded, so a trial after the
first starts in well under a second. The loop runs in a thread and hands each epoch over without
waiting; the actor's own thread reports it to Tune (`tune.report`, the checkpoint persisted to the
trial's storage, where Tune's failure handling restores it from).

A DDP trial (num_workers > 1, or any trial with resources.warm_trials off) is one Ray Train
TorchTrainer run, whose reports reach Tune through a queue the Train controller fills.

The driver hands this module only trial configs (TrialConfig objects, built and validated once on
the driver, under TRIAL_CONFIG in Tune's trial config) and a TrialRun; nothing here imports the
orchestrator, so a trial on any node needs nothing but this package.
"""
from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

from ray.train.v2.api.callback import UserCallback

from trainables.config import TRIAL_CONFIG, TrialConfig
from trainables.board import post_to
from trainables.reporters import PROGRESS, QueueReporter, TrialStopped, TuneReporter

_DONE = "__kdsweep_done__"


@dataclass(frozen=True)
class TrialRun:
    """How every trial of a sweep runs on Ray: workers, their resources, retries, storage."""

    num_workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    max_failures: int
    storage: str
    warm: bool  # one worker: trials train in the (reused) Tune actor itself


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


def _train_in_actor(trial: TrialConfig, extra: dict[str, float], board=None) -> None:
    """One-worker trial: the loop in a thread of this (reused) Tune actor; this thread reports.

    tune.report returns once the driver has taken the result, and raises SystemExit when Tune
    stops the trial (ASHA): the loop is then told to stop at its next batch and joined, so the actor
    is free for the next trial."""
    import ray
    from ray import tune

    from trainables.loop import train_student  # here, not at import: the driver imports this module, never the loop

    node = ray.get_runtime_context().get_node_id()
    reporter = TuneReporter(tune.get_checkpoint(), post_to(board, tune.get_context().get_trial_id()))
    errors: list[BaseException] = []

    def fit() -> None:
        try:
            train_student(trial, reporter)
        except TrialStopped:
            pass
        except BaseException as e:  # re-raised below, in the trial's own thread
            errors.append(e)
        finally:
            reporter.queue.put(_DONE)

    started = time.perf_counter()
    thread = threading.Thread(target=fit, name="kdsweep-loop", daemon=True)
    thread.start()
    first = True
    try:
        while (item := reporter.queue.get()) != _DONE:
            metrics, folder = item
            if first:  # fixed cost before the first epoch: data, model, teacher (once per actor when warm)
                metrics["trial_startup_s"] = time.perf_counter() - started - metrics.get("epoch_time_s", 0.0)
                first = False
            try:
                tune.report({**metrics, **extra, "node_id": node}, checkpoint=tune.Checkpoint.from_directory(folder) if folder else None)
            finally:
                if folder:
                    shutil.rmtree(folder, ignore_errors=True)
    finally:
        reporter.stop.set()
        thread.join()
        while not reporter.queue.empty():  # epochs reported after the stop: drop their files
            item = reporter.queue.get()
            if item != _DONE and item[1]:
                shutil.rmtree(item[1], ignore_errors=True)
    if errors:
        raise errors[0]


def tune_trial(config: dict[str, Any], run: TrialRun, constants: dict[str, dict[str, float]] | None = None, board=None) -> None:
    """Tune function trainable: one-worker trials train in this actor, DDP trials in a Ray Train
    worker group. `constants[student]` joins every report (the architecture's sizes, when Optuna
    optimizes them); `board` (the driver console's ProgressBoard actor) takes progress lines."""
    trial: TrialConfig = config[TRIAL_CONFIG]
    extra = (constants or {}).get(trial.student, {})
    if run.warm:
        _train_in_actor(trial, extra, board)
    else:
        _train_in_worker_group(trial, run, extra, board)


def _train_in_worker_group(trial: TrialConfig, run: TrialRun, extra: dict[str, float], board=None) -> None:
    """A worker-group trial (DDP, or warm_trials off): a TorchTrainer runs in a thread; this
    thread forwards its reports to Tune with tune.report, so ASHA sees every epoch."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from trainables.loop import train_loop_per_worker

    # Beside this trial's actor: a node lost elsewhere never takes another trial's reports with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    reports = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={TRIAL_CONFIG: trial, PROGRESS: (board, tune.get_context().get_trial_id())},
        scaling_config=ray.train.ScalingConfig(
            num_workers=run.num_workers, use_gpu=run.gpus_per_worker > 0,
            resources_per_worker={"CPU": run.cpus_per_worker, **({"GPU": run.gpus_per_worker} if run.gpus_per_worker else {})},
        ),
        run_config=ray.train.RunConfig(
            name=f"trial-{tune.get_context().get_trial_id()}",
            storage_path=run.storage,
            callbacks=[QueueReport(reports)],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),  # the previous one survives a kill mid-persist
            # A finite controller limit: an unplaceable worker group fails the trial instead of hanging.
            failure_config=ray.train.FailureConfig(max_failures=run.max_failures, controller_failure_limit=2),
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
    first, checkpoint = True, None
    while (item := reports.get()) != _DONE:
        if first:  # fixed cost before the first epoch: actors, worker group, data, model, teacher
            item["trial_startup_s"] = time.perf_counter() - started - item.get("epoch_time_s", 0.0)
            first = False
        # Epochs between checkpoints (train.checkpoint_every) carry the latest one, so a trial ASHA
        # stops still has weights to log.
        if item.get("checkpoint_path"):
            checkpoint = item["checkpoint_path"]
        elif checkpoint:
            item["checkpoint_path"] = checkpoint
        tune.report({**item, **extra})
    thread.join()
    if errors:
        raise errors[0]


def teacher_task(trial: TrialConfig) -> Iterator[dict[str, Any]]:
    """Ray streaming-generator task body (orchestrator.plan.prepare.train_on_ray): the teacher trained (or
    fine-tuned) by the trial loop on a node where trials train, with one trial's resources. Yields
    {"epoch": metrics} as each epoch ends, then {"result": ...}: its weights, final metrics, input
    statistics and the node that trained it; the driver writes the folder."""
    import queue

    import ray

    from trainables.loop import train_student

    epochs: queue.SimpleQueue = queue.SimpleQueue()
    out: dict[str, Any] = {}

    def fit() -> None:
        try:
            out["result"] = train_student(trial, QueueReporter(epochs))
        except BaseException as e:  # re-raised below, in the task's own thread
            out["error"] = e
        finally:
            epochs.put(_DONE)

    thread = threading.Thread(target=fit, name="kdsweep-teacher", daemon=True)
    thread.start()
    while (metrics := epochs.get()) != _DONE:
        yield {"progress": metrics} if isinstance(metrics, str) else {"epoch": metrics}
    thread.join()
    if "error" in out:
        raise out["error"]
    result = out["result"]
    yield {"result": {"state": {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}, "metrics": result.metrics,
                      "preprocess": result.preprocess, "node_id": ray.get_runtime_context().get_node_id()}}
