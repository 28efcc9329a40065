"""The one declaration of every number kdsweep logs (`METRICS`): when it is reported, which
way is better, its short name and how a table shows it, and the one parser of `METRIC[:max|min]`
(`Objective.parse`). The trial loop reports these names, tracking logs them by kind, and the
search, selection, leaderboard, console and report read them from here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from trainables.eval.classification import classification_metrics, confusion, expected_calibration_error, per_class  # noqa: F401  (their home)
from trainables.registry import ConfigError
from trainables.tasks import TASKS, task_named

#: every task's throughput metric and corruption names (trainables.tasks)
_TASKS = [task_named(n) for n in TASKS]
THROUGHPUTS = tuple(dict.fromkeys(t.throughput for t in _TASKS))

#: epoch: every epoch (MLflow step = the epoch); final: with the last epoch; text: a string every
#: epoch, whose last value becomes the run's tag kdsweep.<name>; size: once per architecture
#: (trainables.models.profile); run: written by the driver (selection, tracking); field: a leaderboard
#: column read from the trial's config or run, not a metric; table: columns every epoch, an MLflow
#: table artifact of the run (<name>/epoch_NNN.json).
Kind = Literal["epoch", "final", "text", "size", "run", "field", "table"]


@dataclass(frozen=True)
class Metric:
    name: str
    kind: Kind
    maximize: bool | None = None  # None: no better direction (lr, status)
    alias: str | None = None  # the short name for tables, objectives and constraints (params, latency_ms)
    fmt: str = "{:.4f}"

    def show(self, value: Any) -> str:
        return "-" if value is None else self.fmt.format(value)


#: every task's split metrics (Task.split_metrics: classification_metrics', the LM's), behind a split prefix (val_, test_), with their direction.
SPLIT_METRICS = {k: up for t in _TASKS for k, up in t.split_metrics.items()}
_SPLIT_ALIASES = {"macro_f1": "macro_f1", "nll": "nll", "ece": "ece", "agreement": "agreement", "ppl": "ppl"}
#: size metrics, logged as size_<name> (trainables.models.profile.size_metrics measures them).
SIZE_KEYS = ("params", "bytes", "flops", "latency_cpu_b1_ms", "latency_gpu_b1_ms", "latency_gpu_b64_ms",
             # text models: batch 1 at a quarter and half of dataset.max_length (the two above: at all of it)
             "latency_cpu_b1_len25_ms", "latency_cpu_b1_len50_ms", "latency_gpu_b1_len25_ms", "latency_gpu_b1_len50_ms",
             # a language model: per generated token, batch 1, KV cache on (Task.timed_forms)
             "latency_cpu_b1_token_ms")
_SIZE = {"params": ("params", "{:.0f}"), "bytes": ("bytes", "{:.0f}"), "flops": ("flops", "{:.0f}"), "latency_cpu_b1_ms": ("latency_ms", "{:.3f}")}

METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("train_loss", "epoch", False), Metric("train_kd", "epoch", False), Metric("train_ce", "epoch", False),
    *(Metric(f"val_{k}", "epoch", up, _SPLIT_ALIASES.get(k)) for k, up in SPLIT_METRICS.items()),
    Metric("val_loss", "epoch", False), *(Metric(n, "epoch", True, fmt="{:.0f}") for n in THROUGHPUTS), Metric("epoch_time_s", "epoch", False, fmt="{:.2f}"),
    Metric("lr", "epoch", None), Metric("kd_weight", "epoch", None), Metric("kd_temperature", "epoch", None), Metric("teacher_forward_images", "epoch", False, fmt="{:.0f}"), Metric("trial_startup_s", "epoch", False, fmt="{:.2f}"),
    # the first epoch of a (resumed) run: where its set-up went (train_student's phases, seconds)
    Metric("setup_data_s", "epoch", False, fmt="{:.2f}"), Metric("setup_models_s", "epoch", False, fmt="{:.2f}"),
    Metric("setup_targets_s", "epoch", False, fmt="{:.2f}"),
    # the process that ran the loop (a reused Tune actor runs many trials; DDP: rank 0) and its resident memory
    Metric("process_rss_mb", "epoch", None, fmt="{:.0f}"), Metric("trial_pid", "text", fmt="{}"),
    # the final epoch's corruption suite (per severity: eval/corruptions.csv)
    Metric("robust_acc", "final", True), Metric("relative_robustness", "final", True),
    *(Metric(f"corr_{n}", "final", True) for n in dict.fromkeys(c for t in _TASKS for c in t.corruptions)),
    # node_id: the Ray node that ran the trial's loop (its rank 0 for DDP)
    # a language model's greedy continuations of fixed val prompts: {"prompt": [...], "generated": [...]}
    Metric("samples", "table", fmt="{}"),
    Metric("status", "text", fmt="{}"), Metric("teacher_targets", "text", fmt="{}"), Metric("node_id", "text", fmt="{}"),
    *(Metric(f"size_{k}", "size", False, *_SIZE.get(k, (None, "{:.3f}"))) for k in SIZE_KEYS),
    Metric("final_val_acc", "run", True), Metric("epochs_run", "run", True, fmt="{:.0f}"), Metric("kd_gain", "run", True, fmt="{:+.4f}"),
    Metric("student", "field", fmt="{}"), Metric("loss", "field", fmt="{}"), Metric("temperature", "field", fmt="{:.2f}"), Metric("alpha", "field", fmt="{:.2f}"),
    Metric("epochs", "field", fmt="{}"),
)}
ALIASES = {m.alias: m.name for m in METRICS.values() if m.alias}


def names(*kinds: Kind) -> tuple[str, ...]:
    return tuple(n for n, m in METRICS.items() if m.kind in kinds)


EPOCH_METRICS, FINAL_METRICS, TEXT_METRICS, SIZE_METRICS, TABLE_METRICS = names("epoch"), names("final"), names("text"), names("size"), names("table")
#: What Optuna may optimize (search.objectives): the per-epoch val metrics and the sizes.
SEARCH_OBJECTIVES = tuple(n for n in (*EPOCH_METRICS, *SIZE_METRICS) if n.startswith(("val_", "size_")))
#: Selection's default: accuracy first (it picks the champion), then the smallest and fastest.
DEFAULT_OBJECTIVES = ("val_acc:max", "size_params:min", "size_latency_cpu_b1_ms:min")
#: Every task's leaderboard columns (Task.leaderboard), by name or alias: what the MLflow UI shows first.
LEADERBOARD = tuple(dict.fromkeys(c for t in _TASKS for c in t.leaderboard))
#: What one epoch line of a standalone run (and of the teacher's training) shows.
EPOCH_LINE = ("epoch", "train_loss", "train_kd", "train_ce", "val_acc", "val_loss", "val_ppl", "val_macro_f1", "val_agreement", "robust_acc",
              *THROUGHPUTS, "status")


def format_epoch(m: dict[str, Any]) -> str:
    """One epoch as a console line (standalone runs, the teacher's training)."""
    return "  ".join(f"{k}={m[k]:.4g}" if isinstance(m[k], float) else f"{k}={m[k]}" for k in EPOCH_LINE if k in m)


def metric(name: str) -> Metric:
    """The declaration of a logged name or alias; a name logged but not declared (teacher_*,
    compression_*, speedup_*, test_*) is larger-is-better, except test_nll/test_ece."""
    key = ALIASES.get(name, name)
    if key in METRICS:
        return METRICS[key]
    split = key.partition("_")[2]
    return Metric(key, "run", SPLIT_METRICS.get(split, True) if key.startswith("test_") else True)


@dataclass(frozen=True)
class Objective:
    """`METRIC[:max|min]`: what the search optimizes, the Pareto front's axes and the winner's key."""

    key: str
    maximize: bool

    @classmethod
    def parse(cls, text: str, field: str = "--objective", allowed: tuple[str, ...] | None = None) -> "Objective":
        name, _, sense = text.partition(":")
        m = metric(name)
        if sense not in ("", "max", "min") or (allowed is not None and m.name not in allowed):
            among = f" with METRIC in {list(allowed)}" if allowed is not None else ""
            raise ConfigError(f"`{field}` takes METRIC, METRIC:max or METRIC:min{among}, but got {text!r}")
        if not sense and m.maximize is None:
            raise ConfigError(f"`{field}` {text!r} has no better direction: write {name}:max or {name}:min")
        return cls(m.name, sense == "max" if sense else bool(m.maximize))

    def __str__(self) -> str:
        return f"{self.key}:{'max' if self.maximize else 'min'}"

    @property
    def label(self) -> str:
        """As a table's column or a plot's axis says it: `val_acc` -> "val acc"."""
        return self.key.replace("_", " ")
