"""The trial config: the only thing the orchestrator hands a worker. Validated with pydantic.

Errors are reported all at once, one line, in optuna's form: the rule, then the value and its source.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from trainables.registry import ConfigError
from trainables.schema import DEFAULT_CACHE, LossSchedule, Strict, validate  # noqa: F401  (DEFAULT_CACHE, validate: part of this module's face)

#: Where a Tune trial's config (and a Ray Train loop config) holds its TrialConfig object.
TRIAL_CONFIG = "trial_config"


def _model_name(name: str) -> str:
    from trainables.models import check_model

    return check_model(name)


def _weights_file(path: str) -> str:
    from trainables.models.weights import check_weights_path

    return check_weights_path(path)


#: `student_weights: teacher`: a Hugging Face student starts from its teacher's layers (trainables.models.hf.init_from_teacher).
TEACHER_LAYERS = "teacher"


def _student_weights(path: str) -> str:
    return path if path == TEACHER_LAYERS else _weights_file(path)


def _dataset_name(name: str) -> str:
    from trainables.data import DATASETS

    try:
        DATASETS.get(name)
    except ConfigError as e:
        raise ValueError(str(e)) from None
    return name


#: A registered model or torchvision.<name>: one rule wherever a config names an architecture.
ModelName = Annotated[str, AfterValidator(_model_name)]
#: An existing .pth/.pt/.safetensors file or Hugging Face checkpoint folder, made absolute.
WeightsFile = Annotated[str, AfterValidator(_weights_file)]
#: A WeightsFile, or `teacher` (an hf student initialised from its teacher's layers).
StudentWeights = Annotated[str, AfterValidator(_student_weights)]


class ResizedCrop(Strict):
    """torchvision's RandomResizedCrop, batched on the device: a box of `scale` of the area and
    aspect `ratio`, resized back to the image size."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    @model_validator(mode="after")
    def _ranges(self) -> "ResizedCrop":
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"`resized_crop.scale` must satisfy 0 < low <= high <= 1, but got {list(self.scale)}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"`resized_crop.ratio` must satisfy 0 < low <= high, but got {list(self.ratio)}")
        return self


class AugmentConfig(Strict):
    crop_pad: int = Field(0, ge=0, description="random-crop padding in pixels (0: no crop)")
    flip: bool = Field(False, description="random horizontal flip")
    resized_crop: ResizedCrop | None = Field(None, description="random-resized-crop for photos (exclusive with crop_pad)")

    @model_validator(mode="after")
    def _one_crop(self) -> "AugmentConfig":
        if self.crop_pad and self.resized_crop is not None:
            raise ValueError("`augment.crop_pad` and `augment.resized_crop` exclude each other: keep one")
        return self

    @property
    def static(self) -> bool:
        """Views never change (no randomness): teacher logits once per image suffice."""
        return self.crop_pad == 0 and not self.flip and self.resized_crop is None


#: How a model's inputs are normalized (trainables.data.normalize.model_stats).
Normalize = Literal["auto", "dataset", "imagenet"]


class UnlabeledConfig(Strict):
    """Transfer data without labels (unsupervised KD): the distillation term sees them, CE never
    does. Val and test stay labelled."""

    root: str | None = Field(None, description="examples without labels, read by the task as it reads the labelled ones: a folder of "
                                               "images (or of .wav clips) with no class sub-folders, decoded once to the train split's form; "
                                               "for text a .txt file (a text per line), a table's text column, or a folder of .txt files")
    labels_kept: float | None = Field(None, gt=0.0, lt=1.0, description="keep the labels of this share of the train split (stratified), "
                                                                          "the rest become unlabelled (the semi-supervised protocol)")
    ratio: float | None = Field(None, ge=0.0, lt=1.0, description="the unlabelled share of every batch (0: none, KD on the labelled "
                                                                  "alone with the same labels kept); null: their share of the data")

    @model_validator(mode="after")
    def _some(self) -> "UnlabeledConfig":
        if self.root is None and self.labels_kept is None:
            raise ValueError("`dataset.unlabeled` needs `root` (examples without labels) or `labels_kept` (a share of train "
                             "that keeps its labels), or both")
        return self


class WordPiece(Strict):
    """A WordPiece tokenizer trained on the train split (text whose model comes with none)."""

    vocab_size: int = Field(8000, ge=100, description="tokens in the vocabulary, the five special ones included")
    lowercase: bool = True


class DatasetConfig(Strict):
    name: Annotated[str, AfterValidator(_dataset_name)] = "digits"
    root: str | None = Field(None, description="local data folder; $KD_DATA_ROOT when unset")
    cache: str | None = Field(None, description="where decompressed files go; $KDSWEEP_CACHE or ~/.cache/kdsweep when unset")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share carved as test when the data have no test split")
    split_seed: int = 0
    image_size: int = Field(32, ge=1, description="image_folder: shorter side resized to this, centre-cropped square")
    channels: Literal[1, 3] = Field(3, description="image_folder: 1 (greyscale) or 3 (RGB)")
    tokenizer: str | WordPiece | None = Field(None, description="text: a folder with the tokenizer's files, or {vocab_size, lowercase}: a "
                                                                 "WordPiece tokenizer trained on the train split; null: the Hugging Face teacher's checkpoint folder")
    max_length: int = Field(128, ge=2, description="text: tokens per example (truncated, padded on the right)")
    placement: Literal["auto", "device", "host"] = Field(
        "auto", description="device: splits on the training device; host: in host memory, batches copied ahead; auto: device when they fit")
    device_share: float = Field(0.5, gt=0.0, le=1.0, description="auto: the share of free device memory the splits may take")
    download: bool = False
    augment: AugmentConfig | None = Field(None, description="None: the dataset's default (crop+flip for CIFAR)")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    unlabeled: UnlabeledConfig | None = Field(None, description="transfer data without labels, for the distillation term only")

    def augment_or_default(self) -> AugmentConfig:
        """The augmentation its batches take: its own, else its dataset's default (CIFAR: crop and flip)."""
        from trainables.data import DEFAULT_AUGMENT

        return self.augment or AugmentConfig(**DEFAULT_AUGMENT.get(self.name, {}))

    @property
    def unlabeled_ratio(self) -> float | None:
        """The unlabelled share of every batch (None: their share of the data, or no unlabelled data)."""
        return self.unlabeled.ratio if self.unlabeled is not None else None

    def resolved(self) -> "DatasetConfig":
        """Paths made absolute, environment defaults applied: the one place that reads
        KD_DATA_ROOT and KDSWEEP_CACHE, on the driver, so workers on any node need neither."""
        root = self.root or os.environ.get("KD_DATA_ROOT")
        cache = self.cache or os.environ.get("KDSWEEP_CACHE") or str(DEFAULT_CACHE)
        unlabeled, tokenizer = self.unlabeled, self.tokenizer
        if isinstance(tokenizer, WordPiece) and root:  # trained once (cached by the files and the settings): its folder
            from trainables.data.text import wordpiece_tokenizer

            tokenizer = wordpiece_tokenizer(os.path.expanduser(root), os.path.expanduser(cache), tokenizer.vocab_size, tokenizer.lowercase,
                                            **{k: v for k, v in self.kwargs.items() if k in ("text_column", "label_column")})
        elif tokenizer and Path(tokenizer).expanduser().exists():
            tokenizer = os.path.abspath(os.path.expanduser(tokenizer))
        if unlabeled is not None and unlabeled.root:
            unlabeled = unlabeled.model_copy(update={"root": os.path.abspath(os.path.expanduser(unlabeled.root))})
        return self.model_copy(update={
            "root": os.path.abspath(os.path.expanduser(root)) if root else None,
            "cache": os.path.abspath(os.path.expanduser(cache)),
            "unlabeled": unlabeled,
            "tokenizer": tokenizer,
        })


class OptimizerConfig(Strict):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    nesterov: bool = True


class ScheduleConfig(Strict):
    name: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0.0)
    milestones: list[float] = Field(default_factory=lambda: [0.5, 0.75], description="step: fractions of the epochs")
    gamma: float = Field(0.1, gt=0.0)


class LossConfig(BaseModel):
    """name + weights + temperature; any other key is passed to the loss (e.g. dkd_beta, beta).

    Weights: `alpha` (mixing, default 0.9) or `ce_weight` + `distill_weight` (a paper's exact loss),
    never both; see trainables/losses/.
    """

    model_config = ConfigDict(extra="allow")
    name: str = "kd"
    alpha: float | None = Field(None, ge=0.0, le=1.0, description="distill weight; 1 - alpha weights CE (0.9 when no weights are given)")
    ce_weight: float | None = Field(None, ge=0.0, description="explicit form, with distill_weight (exclusive with alpha)")
    distill_weight: float | None = Field(None, ge=0.0)
    temperature: float = Field(4.0, gt=0.0)
    student_layers: list[str] | dict[str, list[str]] | None = Field(
        None, description="feature losses: the student's layers by name (default: its stages); a mapping gives each student its own")
    teacher_layers: list[str] | None = Field(None, description="feature losses: the teacher's layers, paired in order with student_layers")
    schedule: LossSchedule | None = Field(None, description="alpha and temperature over the epochs, e.g. {temperature: {name: cosine, end: 1}}")

    @model_validator(mode="after")
    def _check(self) -> "LossConfig":
        from trainables.losses import LOSSES, check_loss_params, loss_schedule, loss_weights

        try:
            loss_weights(self.alpha, self.ce_weight, self.distill_weight)
            check_loss_params(self.name, list(self.model_extra or {}))
            LOSSES.get(self.name).check_params(dict(self.model_extra or {}))
            loss_schedule(self.schedule, alpha_form=self.ce_weight is None and self.distill_weight is None)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        if self.alpha is None and self.ce_weight is None:
            self.alpha = 0.9
        return self

    @staticmethod
    def applies(field: str, method: str) -> bool:
        """Whether loss key `field` means something to loss `method`: a key every loss has (alpha,
        temperature, the weights, layers) or one of that loss's own parameters."""
        from trainables.losses import loss_parameters

        return field.split(".")[0] in LossConfig.model_fields or field in loss_parameters(method)

    def as_method(self, method: str) -> "LossConfig":
        """This config for another loss (a method search's draw): its extras that loss does not take are left out."""
        extra = {k: v for k, v in (self.model_extra or {}).items() if LossConfig.applies(k, method)}
        return validate(LossConfig, {**self.model_dump(exclude=set(self.model_extra or {})), "name": method, **extra}, prefix="loss.")

    def layers_for(self, student: str) -> list[str] | None:
        """The student's layer names (a mapping keyed by student name gives each its own)."""
        return self.student_layers.get(student) if isinstance(self.student_layers, dict) else self.student_layers

    @property
    def distills(self) -> bool:
        """Whether the distillation term has any weight (False: a no-KD control, no teacher needed;
        an alpha=0 control stays one whatever its schedule says)."""
        return (self.alpha if self.alpha is not None else self.distill_weight or 0.0) > 0

    def params(self) -> dict[str, Any]:
        weights = {"alpha": self.alpha} if self.alpha is not None else {"ce_weight": self.ce_weight, "distill_weight": self.distill_weight}
        schedule = {"schedule": self.schedule.model_dump()} if self.schedule else {}
        return {**weights, "temperature": self.temperature, **schedule, **(self.model_extra or {})}  # layers go to the models, not the loss


class TrainConfig(Strict):
    """How a network trains: the sweep's `train:` section, the teacher's, and part of every trial.

    Defined once here; the sweep's `train:` and the teacher's section extend it and every trial
    config holds one under `train`, so a new field reaches every trial without a list of keys to
    keep in step.
    """

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(2048, ge=1)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    grad_clip: float | None = Field(None, gt=0.0, description="clip the global gradient norm to this (off: null)")
    amp: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU)")
    channels_last: bool = True
    compile: bool = False
    teacher_targets: Literal["auto", "online", "precomputed"] = Field(
        "auto", description="precomputed: teacher logits once per trial when views never change"
    )
    teacher_topk: int | None = Field(None, ge=1, description="the sweep's cache keeps each view's k largest teacher logits "
                                                               "(the other classes share the remaining mass); null: all")
    teacher_topk_rest: Literal["bucket", "spread"] = Field(
        "bucket", description="how top-k targets give the other classes their mass: as one class, shaped as the student's own "
                              "(bucket), or evenly (spread: FKD's marginal smoothing)")
    robust_samples: int = Field(1000, ge=0, description="val images in the final-epoch corruption suite (0: off)")
    progress_every_s: float = Field(10.0, gt=0, description="a console line (batches done, examples/s, the epoch's ETA) at most this "
                                                            "often within a long epoch; never a Tune result or an MLflow metric")
    checkpoint_every: int | str = Field(1, description="checkpoint every N epochs, or every '<seconds>s' (e.g. '120s'); the last epoch always")

    @field_validator("checkpoint_every", mode="before")
    @classmethod
    def _period(cls, v: Any) -> int | str:
        if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
            return v
        if isinstance(v, str) and v.endswith("s"):
            try:
                if float(v[:-1]) >= 0:
                    return v
            except ValueError:
                pass
        raise ValueError(f"must be a number of epochs >= 1 or seconds such as '120s', but got checkpoint_every={v!r}")

    def checkpoint_due(self, epoch: int, seconds_since: float) -> bool:
        """Whether epoch `epoch` (from 1) checkpoints: on the period, and always the last one."""
        if epoch >= self.epochs:
            return True
        if isinstance(self.checkpoint_every, int):
            return epoch % self.checkpoint_every == 0
        return seconds_since >= float(self.checkpoint_every[:-1])


class TrialConfig(Strict):
    """Everything one trial needs, with every path resolved on the driver (workers read no environment).

    Nested as the sweep YAML is (`train.optimizer.lr`, `loss.alpha`, `dataset.augment`), so a
    sweep's dotted path is the trial's path."""

    train: TrainConfig = Field(default_factory=TrainConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    student: ModelName = "cnn_tiny"
    student_kwargs: dict[str, Any] = Field(default_factory=dict)
    student_weights: StudentWeights | None = Field(None, description="initial weights (.pth state_dict, .safetensors, a Hugging Face "
                                                   "checkpoint folder, or `teacher`: an hf student from its teacher's layers); a head of "
                                                   "another class count is replaced")
    freeze_backbone: bool = Field(False, description="train only the classifier head (fine-tuning pretrained weights)")
    normalize: Normalize = Field("auto", description="input statistics: auto (ImageNet for torchvision weights, else the data's), dataset, imagenet")
    teacher_path: str | None = Field(None, description="folder with teacher.safetensors + teacher.json")
    loss: LossConfig = Field(default_factory=LossConfig)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    teacher_cache: str | None = Field(None, description="folder of a sweep's teacher soft-target cache (see teacher_cache.py)")
    checkpoint_dir: str | None = Field(None, description="standalone runs: save/resume here")
    profile: bool = Field(True, description="measure params/bytes/latency/FLOPs (and the teacher's, for ratios)")
    plugins: list[str] = Field(default_factory=list, description="modules imported before this config is read or trained")

    def __str__(self) -> str:  # Tune puts str(config value) into trial tags and folder names
        return f"{self.student}-{self.loss.name}"


def set_dotted(d: dict, path: str, value: Any) -> None:
    """d[a][b][c] = value for path "a.b.c", creating the mappings on the way."""
    keys = path.split(".")
    for k in keys[:-1]:
        if not isinstance(d.get(k), dict):
            d[k] = {}
        d = d[k]
    d[keys[-1]] = value


def with_overrides(cfg: TrialConfig, overrides: dict[str, Any]) -> TrialConfig:
    """A copy of `cfg` with dotted paths set (e.g. "train.optimizer.lr", "loss.alpha"), validated again."""
    if not overrides:
        return cfg
    data = cfg.model_dump()
    for path, value in overrides.items():
        set_dotted(data, path, value)
    return validate(TrialConfig, data, prefix="trial.")


def trial_from_dict(data: dict[str, Any]) -> TrialConfig:
    """A trial config from a dict (standalone callers, tests): its plugins imported first, so
    their models, losses and datasets are known to this process's registries when it is
    validated. Ray's processes receive the TrialConfig object the driver built."""
    from trainables.plugins import load_plugins

    load_plugins(data.get("plugins", []))
    return validate(TrialConfig, data)
