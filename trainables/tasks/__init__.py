"""The task contract: what differs between kinds of work (image classification, text
classification, ...) lives in one `Task` each, chosen once from the dataset (`task_for`). The
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
    #: "tensors" (the splits' inputs as they are, e.g. raw pixels or waveforms) or "tokens" (strings
    #: in, through its tokenizer); the driver's exporters are keyed by it
    serving: ClassVar[str] = "tensors"
    #: the exported model's input name (ONNX)
    input_name: ClassVar[str] = "inputs"

    @property
    def throughput(self) -> str:
        """The epoch metric that counts training examples per second."""
        return f"{self.unit}_per_s"

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


from trainables.tasks import audio, image, text  # noqa: E402,F401  (the built-in tasks register themselves)
