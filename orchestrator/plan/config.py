"""The sweep config (search_spaces/*.yaml): validated once, here, before anything starts."""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Literal

import optuna
import yaml
from pydantic import Field, field_validator, model_validator

from trainables.config import (AugmentConfig, DatasetConfig, LossConfig, ModelName, Normalize, StudentWeights, Strict, TrainConfig,
                               TrialConfig, WeightsFile, set_dotted, validate, with_overrides)
from trainables.eval.metrics import SEARCH_OBJECTIVES, Objective
from trainables.api import LOSSES, Task, load_plugins, task_for, weights_sha256
from trainables.registry import MISSING, ConfigError

#: Short names for searched and --set keys: alias -> dotted path in the sweep config. Input sugar
#: only: validation turns every key into its path, which is also its path in the trial config.
ALIASES = {
    "temperature": "loss.temperature",
    "alpha": "loss.alpha",
    "lr": "train.optimizer.lr",
    "weight_decay": "train.optimizer.weight_decay",
    "momentum": "train.optimizer.momentum",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
}
DEFAULT_CONFIG = Path(__file__).parents[1] / "default.yaml"


def canonical(key: str) -> str:
    """A searched or --set key as its dotted path (`alpha` -> `loss.alpha`)."""
    return ALIASES.get(key, key)


def short_name(path: str) -> str:
    """The alias of a path, where it has one (`loss.alpha` -> `alpha`): MLflow params and tables."""
    return next((alias for alias, p in ALIASES.items() if p == path), path)


class Finetune(Strict):
    """How a teacher starts from `teacher.weights`: epochs on the user's data (0: use the file as is,
    possible only when its head already has the dataset's class count)."""

    epochs: int = Field(5, ge=0)
    lr: float = Field(0.01, gt=0.0, description="replaces teacher.optimizer.lr while fine-tuning")
    freeze_backbone: bool = Field(False, description="train only the new head")


class TeacherSpec(TrainConfig):
    """The teacher: a saved folder, or an architecture trained (once, cached) with its own TrainConfig,
    from scratch or from a weights file (head replaced and fine-tuned when its class count differs)."""

    path: str | None = Field(None, description="a saved teacher folder; null: train one into teachers/ (cached by config and weights hash)")
    arch: ModelName = "cnn_small"
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    weights: WeightsFile | None = Field(None, description="a state_dict file (.pth read weights_only, or .safetensors) to start from")
    finetune: Finetune = Field(default_factory=Finetune)
    augment: AugmentConfig | None = Field(None, description="the teacher's own training augmentation; null: the dataset's")
    normalize: Normalize = Field("auto", description="auto: ImageNet statistics for torchvision weights, else the data's")
    seed: int = 0

    @model_validator(mode="after")
    def _one_source(self) -> "TeacherSpec":
        if self.path and self.weights:
            raise ValueError("`teacher.path` (a saved kdsweep teacher) and `teacher.weights` (a file to start from) exclude each other: keep one")
        if self.weights and Path(self.weights).is_dir():  # a Hugging Face checkpoint folder: its own architecture
            if "arch" in self.model_fields_set and self.arch != "hf":
                raise ValueError(f"`teacher.arch` must be hf for a Hugging Face checkpoint folder (teacher.weights), but got {self.arch!r}")
            from trainables.api import config_dict

            self.arch = "hf"
            self.arch_kwargs = {"config": config_dict(self.weights), **self.arch_kwargs}
        return self

    @property
    def checkpoint(self) -> str | None:
        """teacher.weights when it is a Hugging Face checkpoint folder (its tokenizer is the text's
        default; a saved text teacher's folder holds its tokenizer too)."""
        return self.weights if self.weights and Path(self.weights).is_dir() else None


class Ensemble(Strict):
    """How the members of a `teacher:` list make one target (trainables.models.ensemble)."""

    combine: Literal["probs", "logits"] = Field("probs", description="probs: the weighted mean of the members' softened probabilities "
                                                                        "(at each trial's temperature); logits: of their logits")
    weights: list[float] | None = Field(None, description="one per member, > 0 (normalized to sum 1); null: equal")

    @field_validator("weights")
    @classmethod
    def _positive(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and not all(w > 0 for w in v):
            raise ValueError(f"`ensemble.weights` must all be > 0, but got {v}")
        return v


class SweepTrain(TrainConfig):
    """The sweep's `train:` section: every trial's TrainConfig plus sweep-wide switches."""

    teacher_cache: bool = Field(True, description="compute teacher logits once per sweep for every view; trials read them")


class SearchParam(Strict):
    """One searched key, in the style of Optuna's distributions; built with Optuna's own
    constructors during validation, so every rule of theirs is checked before anything starts."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> "SearchParam":
        if self.type == "categorical" and not self.choices:
            raise ValueError("a categorical needs a non-empty `choices` list")
        if self.type != "categorical" and (self.low is None or self.high is None):
            raise ValueError(f"a {self.type} needs `low` and `high`")
        try:
            self.distribution()
        except ValueError as e:
            raise ValueError(f"optuna rejects it: {e}") from None
        return self

    def distribution(self) -> optuna.distributions.BaseDistribution:
        if self.type == "categorical":
            return optuna.distributions.CategoricalDistribution(self.choices)
        if self.type == "int":
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def suggest(self, trial, name: str) -> Any:
        """This parameter drawn from an Optuna trial (a define-by-run space)."""
        if self.type == "categorical":
            return trial.suggest_categorical(name, self.choices)
        if self.type == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)

    def holds(self, value: Any) -> bool:
        """Whether `value` lies in this parameter's space (a choice, or within [low, high])."""
        if self.type == "categorical":
            return value in self.choices
        return isinstance(value, (int, float)) and self.low <= value <= self.high

    def extremes(self) -> list[Any]:
        """Every value a rule could reject: each choice, or both ends of the range."""
        if self.type == "categorical":
            return list(self.choices)
        return [int(self.low), int(self.high)] if self.type == "int" else [float(self.low), float(self.high)]


class Confirm(Strict):
    """The confirmation stage after the search (orchestrator.plan.confirm): the `top` finalists trained on
    `seeds` seeds in all (the search trial's included), each beside its alpha=0 control at the same
    settings and seeds; the champion is the best mean."""

    top: int = Field(3, ge=0, description="finalists to confirm (0: off; the champion is then the best single-seed trial)")
    seeds: int = Field(3, ge=2, description="seeds per finalist, its search trial's included")


class Budget(Strict):
    num_samples: int = Field(8, ge=1, description="trials in all (joint) or per student (per_student)")
    max_concurrent: int = Field(2, ge=1)
    grace_period: int = Field(1, ge=1, description="ASHA: epochs before a trial can be stopped")
    reduction_factor: float = Field(3.0, gt=1.0)
    max_failures: int = Field(1, ge=0, description="retries of a failed trial (FailureConfig)")
    confirm: Confirm = Field(default_factory=Confirm)


class Resources(Strict):
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0, description="per Ray Train worker; fractions pack trials on a GPU")
    num_workers: int = Field(1, ge=1, description="Ray Train workers per trial (>1: DDP)")
    warm_trials: bool = Field(True, description="one-worker trials train in reused Tune actors that keep torch, data and teacher "
                                                "loaded; false: every trial starts its own Ray Train worker group")
    placement_timeout_s: float = Field(60.0, ge=0, description="--address: how long to wait for nodes that can hold a trial (autoscaling)")
    connect_timeout_s: float = Field(10.0, gt=0, description="--address: how long to wait for the cluster's head to answer")

    @property
    def warm(self) -> bool:
        """Trials train in their (reused) Tune actors: one worker each, warm_trials on."""
        return self.num_workers == 1 and self.warm_trials


class Tracking(Strict):
    uri: str | None = Field(None, description="MLflow tracking URI; null: sqlite DB under ./mlruns")
    experiment: str | None = Field(None, description="null: the sweep name")
    registered_model: str | None = Field(None, description="null: kdsweep-<name>")


class SweepConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    prepare: str | None = Field(None, description="the command that makes this config's local files (data, checkpoints): "
                                                  "named in the message when one of them does not exist")
    plugins: list[str] = Field(default_factory=list, description="modules registering models/losses/datasets (see trainables/plugins.py)")
    seed: int = 0
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    teacher: TeacherSpec | list[TeacherSpec] = Field(default_factory=TeacherSpec, description="one teacher, or a list: an ensemble")
    ensemble: Ensemble = Field(default_factory=Ensemble, description="with a teacher list: how the members combine")
    students: list[ModelName] = Field(min_length=1)
    student_weights: dict[str, StudentWeights] = Field(default_factory=dict, description="student -> state_dict file or checkpoint folder "
                                                       "to start from (head replaced when needed); `teacher`: an hf student from the teacher's layers")
    normalize: Normalize = Field("auto", description="the students' input statistics: auto (ImageNet for torchvision weights, else the data's)")
    loss: LossConfig = Field(default_factory=LossConfig)
    train: SweepTrain = Field(default_factory=SweepTrain)
    search: dict[str, SearchParam] = Field(default_factory=dict)
    objectives: list[str] = Field(default_factory=list, description="what Optuna optimizes (YAML: search.objectives), e.g. [val_acc:max, "
                                  "size_params:min]; the first is ASHA's and the KD gain's. Default: the task's objective (val_acc:max)")
    budget: Budget = Field(default_factory=Budget)
    mode: Literal["joint", "per_student"] = "joint"
    resources: Resources = Field(default_factory=Resources)
    tracking: Tracking = Field(default_factory=Tracking)
    storage: str | None = Field(None, description="Ray storage path for checkpoints; null: ./runs")

    @model_validator(mode="before")
    @classmethod
    def _objectives_live_under_search(cls, data: Any) -> Any:
        """`search.objectives` in the YAML is the searcher's objective list, not a searched key."""
        if isinstance(data, dict) and isinstance(data.get("search"), dict) and "objectives" in data["search"]:
            data = {**data, "search": {k: v for k, v in data["search"].items() if k != "objectives"}, "objectives": data["search"]["objectives"]}
        return data

    @field_validator("teacher", mode="before")
    @classmethod
    def _members(cls, v: Any) -> Any:
        """Each member validated as a teacher, its errors named by its place (`teacher[1].arch`)."""
        try:
            if isinstance(v, list):
                if not v:
                    raise ConfigError("`teacher` is an empty list: give one teacher, or two or more for an ensemble")
                members = [validate(TeacherSpec, m, prefix=f"teacher[{i}].") for i, m in enumerate(v)]
                return members[0] if len(members) == 1 else members
            return v if isinstance(v, TeacherSpec) else validate(TeacherSpec, v if v is not None else {}, prefix="teacher.")
        except ConfigError as e:
            raise ValueError(str(e)) from None

    @field_validator("objectives")
    @classmethod
    def _known_objectives(cls, v: list[str]) -> list[str]:
        """Each parsed by the one objective parser and kept as METRIC:max|min."""
        try:
            parsed = [Objective.parse(text, "search.objectives", SEARCH_OBJECTIVES) for text in v]
        except ConfigError as e:
            raise ValueError(str(e)) from None
        if parsed and not parsed[0].key.startswith("val_"):
            raise ValueError(f"`search.objectives` must start with a val_ metric (ASHA stops trials on it every epoch), but got {v[0]!r}")
        return [str(o) for o in parsed]

    @model_validator(mode="after")
    def _check(self) -> "SweepConfig":
        if not self.objectives:
            self.objectives = [task_for(self.dataset.name).objective]
        checkpoint = next((t.checkpoint for t in self.members if t.checkpoint), None) or next(
            (t.path for t in self.members if t.path and (Path(t.path) / "tokenizer_config.json").is_file()), None)
        self.dataset = task_for(self.dataset.name).resolve_dataset(self.dataset, checkpoint)
        if self.ensemble.weights is not None and len(self.ensemble.weights) != len(self.members):
            raise ValueError(f"`ensemble.weights` needs one weight per teacher ({len(self.members)}), but got {len(self.ensemble.weights)}")
        for field, keys in (("student_weights", self.student_weights), ("loss.student_layers", self.loss.student_layers)):
            extra = [k for k in (keys if isinstance(keys, dict) else {}) if k not in self.students]
            if extra:
                raise ValueError(f"`{field}` names {extra[0]!r}, which is not in students {self.students}: fix the key")
        names = next((p for k, p in self.search.items() if canonical(k) == "loss.name"), None)
        if names is not None and names.type != "categorical":
            raise ValueError("`search.loss.name` searches the method: it must be a categorical of loss names, e.g. "
                             "{type: categorical, choices: [kd, dkd, dist]}")
        methods = list(names.choices) if names is not None else [self.loss.name]
        featured = [m for m in methods if m in LOSSES.names() and LOSSES.get(m).needs_teacher_features]
        if self.is_ensemble and featured:
            raise ValueError(f"`loss.name` {featured[0]!r} distils one teacher's stages, but `teacher` is an ensemble of {len(self.members)}: "
                             "use kd, dkd or dist (they distil the ensemble's outputs), or keep one teacher")
        search: dict[str, SearchParam] = {}
        for key, p in self.search.items():
            path = canonical(key)
            if path in search:
                raise ValueError(f"`search.{key}` searches {path} a second time: keep one of the two keys")
            if path == "students":
                raise ValueError(f"`search.{key}`: students are searched via `students` and `mode`, not in `search`")
            if not path.startswith(("loss.", "train.")):
                raise ValueError(f"`search.{key}` must be one of {sorted(ALIASES)} or a dotted loss./train. path, but got {key!r}")
            if path == "loss.alpha" and self.loss.alpha is None:
                raise ValueError(f"`search.{key}` searches alpha, but loss.ce_weight/loss.distill_weight fix the weights: drop them or the search key")
            for value in p.extremes():
                self._check_point(key, path, value, methods)
            search[path] = p
        self.search = search
        return self

    def _check_point(self, key: str, path: str, value: Any, methods: list[str]) -> None:
        """A searched value checked as the fixed value is: by the same model, at its path (a loss
        name in the registry, T > 0, 0 <= alpha <= 1, a loss's own parameters, ...). In a method
        search a loss's own key is checked as the (first searched) loss it belongs to."""
        section, field = path.split(".", 1)
        try:
            loss = self.loss
            if path == "loss.name":
                loss = self.loss.as_method(value)
            elif section == "loss" and not LossConfig.applies(field, loss.name):
                takers = [m for m in methods if LossConfig.applies(field, m)]
                owners = [m for m in LOSSES.names() if LossConfig.applies(field, m)]
                if not takers and owners:
                    raise ValueError(f"`search.{key}` is a parameter of none of the searched losses {methods} (it is {owners[0]}'s): "
                                     f"add {owners[0]} to search.loss.name or remove the key")
                if takers:  # else no loss takes it: validated below, as a misspelt key of the loss
                    loss = self.loss.as_method(takers[0])
            data = {"loss": loss.model_dump(), "train": _train_fields(self.train).model_dump()}  # what a trial's config holds
            set_dotted(data, path, value)
            validate({"loss": LossConfig, "train": TrainConfig}[section], data[section], prefix=f"{section}.")
        except ConfigError as e:
            raise ValueError(f"`search.{key}` reaches {value!r}, which a trial rejects: {e}") from None

    @property
    def methods(self) -> list[str]:
        """The losses trials train with: the searched `loss.name` choices, or the fixed loss."""
        return list(self.search["loss.name"].choices) if "loss.name" in self.search else [self.loss.name]

    # --- derived values ---------------------------------------------------------------------

    @property
    def members(self) -> list[TeacherSpec]:
        """The teachers: one, or an ensemble's members."""
        return self.teacher if isinstance(self.teacher, list) else [self.teacher]

    @property
    def task(self) -> Task:
        """The kind of work, chosen once from the dataset (trainables.tasks)."""
        return task_for(self.dataset.name)

    @property
    def primary(self) -> Objective:
        """The first objective: what ASHA stops on, what a KD gain and a confirmation's verdict are
        measured in, and which way is better."""
        return Objective.parse(self.objectives[0])

    @property
    def is_ensemble(self) -> bool:
        return isinstance(self.teacher, list)

    def member(self, i: int) -> "SweepConfig":
        """This config with member i as its only teacher: every single-teacher step (its folder,
        its training, its checks) applies to it unchanged."""
        return self.model_copy(update={"teacher": self.members[i]})

    @property
    def teacher_name(self) -> str:
        """The teacher's architecture, or an ensemble's members' (`ensemble(cnn_small+resnet8x4)`)."""
        return f"ensemble({'+'.join(t.arch for t in self.members)})" if self.is_ensemble else self.teacher.arch

    @property
    def ensemble_weights(self) -> list[float]:
        return list(self.ensemble.weights or [1.0] * len(self.members))

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name

    @property
    def registered_model(self) -> str:
        return self.tracking.registered_model or f"kdsweep-{self.name}"

    def storage_path(self) -> str:
        """Local folders made absolute; URIs (s3://, gs://, ...) passed to Ray as they are."""
        storage = self.storage or "runs"
        return storage if "://" in storage else os.path.abspath(storage)

    def ray_storage(self) -> str:
        """Where Ray keeps this sweep's Tune experiments and Train checkpoints (a folder or a URI)."""
        return f"{self.storage_path()}/{self.name}"

    def sweep_dir(self) -> Path:
        """This sweep's own files (sweep.json, teacher cache): the storage folder, or ./runs/NAME
        on the driver when storage is a URI."""
        storage = self.storage_path()
        return Path(storage if "://" not in storage else os.path.abspath("runs")) / self.name

    def teacher_dir(self) -> Path:
        """Explicit path, or teachers/<dataset>-<arch>-<hash of everything that shapes the teacher>;
        an ensemble's: teachers/<dataset>-ensemble-<hash of its members' folders, weights, combination>."""
        if self.is_ensemble:
            spec = {"members": [str(self.member(i).teacher_dir().resolve()) for i in range(len(self.members))],
                    "weights": self.ensemble_weights, "combine": self.ensemble.combine}
            digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
            return Path("teachers") / f"{self.dataset.name}-ensemble-{digest}"
        if self.teacher.path:
            return Path(self.teacher.path)
        dataset = self.dataset.model_dump(exclude={"root", "cache", "placement", "device_share", "unlabeled"})
        if self.dataset.unlabeled and self.dataset.unlabeled.labels_kept:  # it trains on the labels kept (unlabelled data: none)
            dataset["labels_kept"] = self.dataset.unlabeled.labels_kept
        spec = {"teacher": self.teacher.model_dump(exclude={"path", "weights", "teacher_topk", "teacher_topk_rest", "progress_every_s"}),  # top-k: the cache's
                "dataset": dataset,
                "weights_sha256": weights_sha256(self.teacher.weights) if self.teacher.weights else None}
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
        return Path("teachers") / f"{self.dataset.name}-{self.teacher.arch}-{digest}"

    def student_kwargs(self, student: str) -> dict[str, Any]:
        """What a student is built with beyond its name, as its task says (text: an hf.<family>
        student's tokenizer, the one saved with its student_weights checkpoint, else the data's)."""
        return self.task.model_kwargs(student, self.student_weights.get(student), self.dataset.resolved())

    def teacher_kwargs(self) -> dict[str, Any]:
        """What the (one) teacher is built with: its arch_kwargs, and an hf.<family> teacher the data's tokenizer."""
        return {**self.student_kwargs(self.teacher.arch), **self.teacher.arch_kwargs}

    def student_dataset(self, student: str) -> DatasetConfig:
        """The dataset as this student reads it: tokenized with its own tokenizer (text), resolved."""
        ds = self.dataset.resolved()
        own = self.student_kwargs(student).get("tokenizer")
        return ds.model_copy(update={"tokenizer": own}) if own and own != ds.tokenizer else ds

    def teacher_trial(self) -> TrialConfig:
        """The teacher is trained by the same loop: CE only (alpha=0), no teacher of its own, with its
        own augmentation; from a weights file it is fine-tuned (finetune's epochs and lr). One
        teacher's: an ensemble's members train one by one (`member(i).teacher_trial()`)."""
        if self.is_ensemble:
            raise ValueError("an ensemble trains member by member: call member(i).teacher_trial()")
        t = self.teacher
        train = _train_fields(t)
        kwargs = self.teacher_kwargs()
        if t.weights:
            train = train.model_copy(update={"epochs": t.finetune.epochs, "optimizer": t.optimizer.model_copy(update={"lr": t.finetune.lr})})
        dataset = self.dataset.resolved()
        if t.augment is not None:
            dataset = dataset.model_copy(update={"augment": t.augment})
        return validate(TrialConfig, {
            "train": train, "dataset": dataset, "student": t.arch, "student_kwargs": kwargs, "student_weights": t.weights,
            "freeze_backbone": t.finetune.freeze_backbone, "normalize": t.normalize,
            "loss": LossConfig(name=self.task.ce_loss, alpha=0.0), "seed": t.seed, "profile": False, "plugins": self.plugins,
        }, prefix="teacher.")

    def trial(self, student: str, overrides: dict[str, Any] | None = None, teacher_path: str | Path | None = None, *,
              distill: bool = True, teacher_cache: str | None = None, checkpoint_dir: str | None = None,
              profile: bool = True) -> TrialConfig:
        """The trial config with searched (or --set) values applied, every path resolved on the driver.

        `overrides` are dotted paths (`loss.alpha`, `train.optimizer.lr`: the sweep's canonical
        keys, the same in both configs); `distill=False` leaves the teacher out (a standalone no-KD
        run needs none)."""
        teacher = str(Path(teacher_path or self.teacher_dir()).resolve()) if distill else None
        overrides = dict(overrides or {})
        method = overrides.get("loss.name", self.loss.name)  # a method search's draw: its own keys only
        loss = self.loss if method == self.loss.name else self.loss.as_method(method)
        overrides = {k: v for k, v in overrides.items() if not k.startswith("loss.") or LossConfig.applies(k[5:], method)}
        base = validate(TrialConfig, {
            "train": _train_fields(self.train), "dataset": self.dataset.resolved(), "student": student, "loss": loss,
            "seed": self.seed, "teacher_path": teacher, "teacher_cache": teacher_cache, "checkpoint_dir": checkpoint_dir,
            "profile": profile, "plugins": self.plugins, "student_weights": self.student_weights.get(student), "normalize": self.normalize,
            "student_kwargs": self.student_kwargs(student),
        }, prefix="trial.")
        return with_overrides(base, overrides)


def _train_fields(section: TrainConfig) -> TrainConfig:
    """The TrainConfig part of a section that extends it (teacher, sweep train)."""
    return TrainConfig(**{k: getattr(section, k) for k in TrainConfig.model_fields})


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs (values parsed as YAML scalars) -> {dotted path: value}."""
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"`--set` takes key=value, but got {pair!r}: e.g. --set loss.alpha=0.5")
        out[canonical(key)] = yaml.safe_load(raw)
    return out


def load_config(path: str | Path | dict | None, overrides: list[str] | dict[str, Any] | None = None) -> SweepConfig:
    """Read YAML (the embedded default when path is None; a dict is taken as the YAML's content),
    apply overrides (`--set` pairs, or a dict of keys to values), validate."""
    if isinstance(path, dict):
        return _validated(copy.deepcopy(path), overrides, "config dict")
    source = str(path) if path else "embedded default.yaml"
    p = Path(path) if path else DEFAULT_CONFIG
    if not p.is_file():
        raise ConfigError(f"`CONFIG` must be a YAML file, but got {source!r}: check the path (see search_spaces/)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"`CONFIG` is not valid YAML{where} ({getattr(e, 'problem', e)}) in {source}: fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"`CONFIG` must be a YAML mapping of sweep keys, but got {type(data).__name__} in {source}")
    return _validated(data, overrides, source)


@contextlib.contextmanager
def preparing(prepare: str | None) -> Iterator[None]:
    """A missing file or folder of a config that says how its files are made (`prepare:`): the
    message names that command."""
    try:
        yield
    except ConfigError as e:
        if prepare and MISSING in str(e) and prepare not in str(e):
            raise ConfigError(f"{e}; this config's files are made by: {prepare}") from None
        raise


def _validated(data: dict, overrides: list[str] | dict[str, Any] | None, source: str) -> SweepConfig:
    pairs = {canonical(k): v for k, v in overrides.items()} if isinstance(overrides, dict) else parse_overrides(overrides or [])
    for key, value in pairs.items():
        set_dotted(data, key, value)
    plugins = data.get("plugins") or []
    if not isinstance(plugins, list) or not all(isinstance(m, str) for m in plugins):
        raise ConfigError(f"`plugins` must be a list of module names, but got plugins={plugins!r} ({source})")
    load_plugins(plugins)  # before validation: `students: [my_net]` must find my_net
    with preparing(data.get("prepare") if isinstance(data.get("prepare"), str) else None):
        return validate(SweepConfig, data, source)
