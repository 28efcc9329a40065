"""The task contract: what differs between kinds of work (image, text and audio classification,
causal language modelling) lives in one `Task` each, chosen once from the dataset (`task_for`). The
trial loop, the driver's checks, the metrics' declarations and the report ask the task; they do
not test the modality.

A task owns: the datasets it reads (its splits, and unlabelled examples read as its labelled
ones), the model families it takes, the unit its throughput is counted in, its default objective
(metric and direction), and its robustness suite (names, severities, and how a model is scored
under them)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from trainables.registry import ConfigError, Registry

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from trainables.config import DatasetConfig
    from trainables.data import DataSplits

Predict = Callable[["Tensor"], "Tensor"]


@dataclass(frozen=True)
class Inputs:
    """A model's inputs as its task makes examples of them (profiles, latency): `shape` per
    example, and the task's name (picklable: a Ray task takes it)."""

    task: str
    shape: tuple[int, ...]

    def example(self, batch: int, device: "torch.device | str", dtype: "torch.dtype | None" = None, shape: tuple[int, ...] | None = None):
        return task_named(self.task).example_input(shape or self.shape, batch, device, dtype)

    def variants(self) -> dict[str, tuple[int, ...]]:
        """Suffix -> shape of every input size a latency is reported at ("" : the data's)."""
        return task_named(self.task).input_variants(self.shape)


class Task:
    """One kind of work. Subclasses set the class attributes and `robustness`."""

    name: ClassVar[str]
    #: what the inputs are, in messages ("images", "text (token ids)")
    input_words: ClassVar[str]
    #: what one example is called: the epoch's throughput is logged as `<unit>_per_s`
    unit: ClassVar[str]
    #: the dataset loaders (trainables.data.DATASETS) whose splits this task reads
    datasets: ClassVar[tuple[str, ...]] = ()
    #: the model names this task takes: these exactly, or starting with one ending in "."; empty:
    #: every model no other task claims (a plugin's models included)
    models: ClassVar[tuple[str, ...]] = ()
    #: how a message tells a user to pick its models
    models_hint: ClassVar[str]
    #: METRIC:max|min the search and selection optimise by default
    objective: ClassVar[str] = "val_acc:max"
    #: the robustness suite: corruption names and severities (accuracy at each is logged)
    corruptions: ClassVar[tuple[str, ...]] = ()
    severities: ClassVar[tuple[int, ...]] = ()
    #: whether a list of teachers distils as one ensemble (trainables.models.ensemble)
    ensembles: ClassVar[bool] = False
    #: the features its models give besides logits (trainables.losses.FEATURES keys): the losses that read them fit
    features: ClassVar[tuple[str, ...]] = ()
    #: whether train.channels_last applies (the inputs are NCHW images)
    channels_last: ClassVar[bool] = False
    #: how a model of this task is served alone (its registered MLflow model, its exports):
    #: "tensors" (the splits' inputs as they are, e.g. raw pixels or waveforms), "tokens" (strings
    #: in, through its tokenizer) or "generate" (prompts in, generated text out); the driver's
    #: exporters are keyed by it
    serving: ClassVar[str] = "tensors"
    #: the exported model's input name (ONNX)
    input_name: ClassVar[str] = "inputs"
    #: the logits its models give and its losses score: "classes" (N, C) per example, or "tokens"
    #: (N, L, V), one next-token distribution per position (trainables.losses: DistillLoss.reads)
    outputs: ClassVar[str] = "classes"
    #: the leaderboard's columns (selection's table, its MLflow artifact, the report), by metric name or alias
    leaderboard: ClassVar[tuple[str, ...]] = ("student", "loss", "status", "temperature", "alpha", "lr", "val_acc", "kd_gain", "macro_f1",
                                              "robust_acc", "ece", "params", "bytes", "latency_ms", "epochs")
    #: the champion-vs-teacher table's test numbers: (metric, label)
    versus: ClassVar[tuple[tuple[str, str], ...]] = (
        ("test_acc", "clean acc"), ("test_macro_f1", "macro F1"), ("test_robust_acc", "mean corruption acc"),
        ("test_relative_robustness", "relative robustness"), ("test_ece", "ECE"), ("test_nll", "NLL"))
    #: what a logit indexes, in messages ("classes"; a language model's "vocabulary tokens")
    label_words: ClassVar[str] = "classes"
    #: whether a whole split's teacher logits are held as one tensor (the val split's, for the
    #: metrics; the train split's, precomputed): one row per example. False (a language model's
    #: (N, L, V) would not fit): val is scored against the teacher model each epoch, and training
    #: targets come from the teacher cache or the teacher on every batch
    whole_split_logits: ClassVar[bool] = True
    #: the standard point a sweep runs first beside each control (where the searched ranges hold it):
    #: Hinton's T=4, alpha=0.9 for classifiers
    standard_point: ClassVar[dict[str, float]] = {"loss.temperature": 4.0, "loss.alpha": 0.9}
    #: the loss whose alpha=0 form is the task's plain cross-entropy (what a teacher trains with)
    ce_loss: ClassVar[str] = "kd"
    #: the numbers `validate` reports, behind a split prefix (val_, test_): name -> higher is better
    split_metrics: ClassVar[dict[str, bool]] = {"acc": True, "macro_recall": True, "macro_f1": True, "nll": False, "ece": False,
                                                "top5_acc": True, "agreement": True, "kl_teacher": False}

    @property
    def throughput(self) -> str:
        """The epoch metric that counts training examples per second."""
        return f"{self.unit}_per_s"

    def per_example(self, shape: tuple[int, ...]) -> int:
        """How many `unit`s one example of `shape` counts for in the throughput (1: the example itself)."""
        return 1

    def timed_forms(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], Callable[[Any], Any], int]]:
        """Latency settings of the task's own, beside a forward at each input size: metric key ->
        (input shape, a wrapper of the model whose call is timed, the units one call makes). None
        for classifiers."""
        return {}

    def validate(self, trial: Any, model: "torch.nn.Module", final: bool) -> tuple[dict[str, float], dict[str, Any]]:
        """The epoch's val numbers (`val_` + split_metrics' names, against the teacher where the
        trial has one) and, after the final epoch (`final`, on rank 0), its tables and the
        robustness suite's summary (`trial`: trainables.loop.Trial). Classification: every val
        logit row at once (one (N, C) tensor), per-class scores, the task's corruption suite."""
        from trainables.eval.classification import classification_metrics, per_class

        splits, cfg = trial.splits, trial.cfg
        logits = trial.evaluate(model, splits.val_x)
        val = classification_metrics(logits, splits.val_y, trial.targets.val_logits)
        tables: dict[str, Any] = {}
        if final and trial.rank == 0:
            tables["per_class"] = {k: v.tolist() for k, v in per_class(logits, splits.val_y).items()}
            n = min(cfg.train.robust_samples, len(splits.val_y))
            clean = float((logits[:n].argmax(1) == splits.val_y[:n]).float().mean()) if n else 0.0
            if n:  # the task's suite: corrupted images, or texts with typos and dropped or swapped words (tokenized again)
                summary, tables["corruptions"] = self.robustness(lambda x: trial.evaluate_counted(model, x), splits, "val", n, cfg.seed,
                                                                 cfg.train.eval_batch_size, clean)
                val.update(summary)
        return val, tables

    def evaluate_split(self, student, teacher, splits: "DataSplits", split: str = "test", members=(), student_splits=None, seed: int = 0,
                       batch: int = 2048) -> dict[str, dict[str, float]]:
        """Clean metrics and the task's corruption suite on one split (`<split>_acc`, ...), for the
        student and its teacher (and an ensemble's `members`, by name), the student's agreement with
        the teacher too. Models take raw inputs (their own normalization inside) or token ids: the
        student those of `student_splits` when it has its own tokenizer (the same examples in the
        same order)."""
        import contextlib

        from trainables.eval.inference import predict
        from trainables.eval.classification import classification_metrics

        def logits_of(model, x):
            return predict(model, x, lambda v: v.float(), batch, contextlib.nullcontext, False)

        xs, ys = getattr(splits, f"{split}_x"), getattr(splits, f"{split}_y")
        t_logits = logits_of(teacher, xs) if teacher is not None else None
        out = {}
        for who, model in (("student", student), ("teacher", teacher), *members):
            if model is None:
                continue
            own = who == "student" and student_splits is not None
            logits = t_logits if who == "teacher" else logits_of(model, getattr(student_splits, f"{split}_x") if own else xs)
            m = classification_metrics(logits, ys, t_logits if who == "student" else None, prefix=f"{split}_")
            summary, _ = self.robustness(lambda x, model=model: logits_of(model, x), splits, split, None, seed, batch, m[f"{split}_acc"],
                                         student_splits.tokenizer if own else None)  # text: its tokens, its tokenizer
            m.update({f"{split}_{k}": v for k, v in summary.items()})
            if who not in ("student", "teacher"):
                m["params"] = sum(p.numel() for p in model.parameters())
            out[who] = m
        return out

    @classmethod
    def claims(cls, arch: str) -> bool:
        return any(arch == m or (m.endswith(".") and arch.startswith(m)) for m in cls.models)

    def takes(self, arch: str) -> bool:
        """Whether `arch` (a model name, or `hf` for a checkpoint's config) reads this task's inputs."""
        if self.models:
            return self.claims(arch)
        return not any(TASKS.get(other).claims(arch) for other in TASKS if other != self.name)

    def inputs(self, shape: tuple[int, ...]) -> Inputs:
        return Inputs(self.name, tuple(shape))

    def example_input(self, shape: tuple[int, ...], batch: int, device: "torch.device | str", dtype: "torch.dtype | None" = None):
        """A batch of `shape` a model of this task takes (for timing and FLOPs; values carry no meaning)."""
        raise NotImplementedError

    def input_variants(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return {"": tuple(shape)}

    def input_description(self, shape: tuple[int, ...], model_kwargs: dict[str, Any]) -> str:
        """What a served model takes, for its card and registered model's metadata."""
        return f"{self.input_words}, (N, {', '.join(map(str, shape))})"

    def check_model(self, field: str, arch: str) -> None:
        if not self.takes(arch):
            raise ConfigError(f"`{field}` {arch} does not take {self.input_words}: {self.models_hint}")

    def check_teachers(self, count: int) -> None:
        """A list of teachers is refused before any member trains where this task has no ensemble."""
        if count > 1 and not self.ensembles:
            raise ConfigError(f"`teacher` is a list of {count} teachers, but {self.name.replace('_', ' ')} distils from one (its "
                              "teachers do not combine into an ensemble yet): keep one teacher, or run one sweep per teacher")

    def check_models(self, cfg: Any, input_shape: tuple[int, ...]) -> None:
        """The task's own checks of a sweep's models against its data, from configs only, on the
        driver before Ray starts (`cfg`: the sweep's config; none for images)."""

    def resolve_dataset(self, dataset: "DatasetConfig", checkpoint: str | None) -> "DatasetConfig":
        """The dataset config completed from the teachers (`checkpoint`: a teacher folder that
        carries its own input processing, such as a tokenizer)."""
        return dataset

    def model_kwargs(self, arch: str, weights: str | None, dataset: "DatasetConfig") -> dict[str, Any]:
        """What a model named `arch` (starting from `weights`, if any) is built with beyond its name
        and the data's shape."""
        return {}

    def splits(self, dataset: "DatasetConfig") -> "DataSplits":
        """The dataset's splits (trainables.data.load_splits), with `dataset.unlabeled.root` read as
        this task reads examples (read_unlabeled)."""
        from trainables.data import load_splits

        return load_splits(dataset, self.read_unlabeled)

    def read_unlabeled(self, root: str, like: "Tensor", options: dict[str, Any]) -> "Tensor":
        """`dataset.unlabeled.root`: examples without labels in the train split's form (`like`: its
        labelled examples; `options`: what the dataset's loader was called with, by name)."""
        raise ConfigError(f"`dataset.unlabeled.root` is not read for {self.name.replace('_', ' ')}: use labels_kept")

    def save_with_teacher(self, dataset: "DatasetConfig", folder: Path) -> None:
        """What a trained teacher's folder keeps beside its weights to be used on its own."""

    def robustness(self, predict: Predict, splits: "DataSplits", split: str, n: int | None, seed: int, batch: int, clean_acc: float,
                   tokenizer: str | None = None) -> tuple[dict[str, float], dict[str, list[float]]]:
        """(summary, table) of the suite on the first `n` (None: all) examples of `split` (val, test):
        `corr_<name>` (mean over severities), `robust_acc`, `relative_robustness`; the table: each
        name's accuracy per severity. `tokenizer`: the model's own, where its inputs are tokens."""
        raise NotImplementedError


TASKS: Registry[type[Task]] = Registry("task", "task")


def task_for(dataset: str) -> Task:
    """The task that reads `dataset` (a DATASETS name); a dataset no task names (a plugin's) is
    image classification, as the loaders' contract (uint8 NCHW) has it."""
    for name in TASKS:
        if dataset in TASKS.get(name).datasets:
            return TASKS.get(name)()
    return TASKS.get("image_classification")()


def task_named(name: str) -> Task:
    return TASKS.get(name)()


from trainables.tasks import audio, causal_lm, image, text  # noqa: E402,F401  (the built-in tasks register themselves)
