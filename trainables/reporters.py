"""Reporters: what the trial loop reports to, one per kind of process that runs it (a plain
process, a Tune trial actor, a Ray Train worker, the teacher's Ray task). Each also answers where
a resumed trial finds its last checkpoint and whether the trial was stopped from outside."""
from __future__ import annotations

import logging
import queue
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from trainables.checkpoint import STATE_FILE, load_state, save_state
from trainables.eval.metrics import format_epoch

log = logging.getLogger(__name__)


class Reporter(Protocol):
    """Where epochs go, where a resumed trial finds its last state, and whether to stop now: what
    the loop asks of the process it runs in. The defaults suit a plain process: nothing to
    restore, never stopped from outside."""

    #: True inside a Ray Train worker group (rank, world size and device come from Ray Train).
    in_worker_group = False
    #: True in a process that runs trial after trial (a reused Tune actor): keep data and teacher.
    warm = False

    def restore(self) -> dict | None:
        return None

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        raise NotImplementedError

    def stop_requested(self) -> bool:
        return False

    def progress(self, line: str) -> None:
        """A line on how a long epoch is going, for a person watching (never a result): dropped
        where nobody would see it."""


class TrialStopped(Exception):
    """Raised inside the loop when its reporter says the trial was stopped (ASHA, the driver)."""


@dataclass
class LocalReporter(Reporter):
    """Standalone runs: log each epoch, checkpoint into `checkpoint_dir` (resume if one is there)."""

    checkpoint_dir: str | None = None
    log_epochs: bool = True

    def restore(self) -> dict | None:
        if self.checkpoint_dir and (Path(self.checkpoint_dir) / STATE_FILE).exists():
            return load_state(Path(self.checkpoint_dir) / STATE_FILE)
        return None

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        if state is not None and self.checkpoint_dir:
            save_state(state, self.checkpoint_dir)
        if self.log_epochs:
            log.info("%s", format_epoch(metrics))

    def progress(self, line: str) -> None:
        if self.log_epochs:
            log.info("%s", line)


#: The key of a worker group's train_loop_config that holds (board, trial id) for progress lines.
PROGRESS = "kdsweep_progress"


class RayTrainReporter(Reporter):
    """Inside a TorchTrainer: ray.train.report every epoch; rank 0 attaches the checkpoint (Ray
    Train ends its workers itself when a trial is stopped) and posts progress lines."""

    in_worker_group = True

    def __init__(self, post: Callable[[str], None] | None = None) -> None:
        self.post = post

    def progress(self, line: str) -> None:
        import ray.train

        if self.post is not None and ray.train.get_context().get_world_rank() == 0:
            self.post(line)

    def restore(self) -> dict | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            if (Path(d) / STATE_FILE).exists():
                return load_state(Path(d) / STATE_FILE)
        # A driver killed while Ray persisted the latest checkpoint leaves it without our file:
        # resume from the newest complete one beside it (the sweep keeps two).
        siblings = sorted(Path(ckpt.path).parent.glob("checkpoint_*/" + STATE_FILE), reverse=True) if Path(ckpt.path).exists() else []
        return load_state(siblings[0]) if siblings else None

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        import ray
        import ray.train

        metrics = {**metrics, "node_id": ray.get_runtime_context().get_node_id()}
        if state is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            save_state(state, d)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


class TuneReporter(Reporter):
    """The loop's side of a one-worker trial in its Tune actor: epochs (and checkpoint files, saved
    here because the weights change on) go into a local queue without waiting for the driver."""

    warm = True

    def __init__(self, checkpoint, post: Callable[[str], None] | None = None) -> None:
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.stop = threading.Event()
        self.checkpoint = checkpoint  # tune.get_checkpoint() of this (restored) trial
        self.post = post  # progress lines to the driver's console (post_to)

    def progress(self, line: str) -> None:
        if self.post is not None:
            self.post(line)

    def restore(self) -> dict | None:
        if self.checkpoint is None:
            return None
        with self.checkpoint.as_directory() as d:
            return load_state(Path(d) / STATE_FILE) if (Path(d) / STATE_FILE).exists() else None

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        if self.stop.is_set():
            raise TrialStopped
        folder = None
        if state is not None:
            folder = tempfile.mkdtemp(prefix="kdsweep-ckpt-")
            save_state(state, folder)
        self.queue.put((metrics, folder))

    def stop_requested(self) -> bool:
        return self.stop.is_set()


class QueueReporter(Reporter):
    """The teacher's training in a Ray task: each epoch's metrics into a queue the task streams to
    the driver's console (no checkpoints: a lost task is simply run again)."""

    def __init__(self, epochs) -> None:
        self.epochs = epochs

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        self.epochs.put(metrics)

    def progress(self, line: str) -> None:
        self.epochs.put(line)  # a str: the task streams it as {"progress": line}
