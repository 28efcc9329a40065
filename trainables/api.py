"""The driver's one door into trainables (besides the config types: config, schema, registry and
eval.metrics' declarations): orchestrator/ imports this module and nothing else of trainables.

Two kinds of names. Whole steps the driver asks for, defined here so that what they compose
(cards, checkpoint states, input normalization, the model registry, inference, the task's
corruption suite) stays on this side: a student folder written from a trial's checkpoint and read
back, a model evaluated on a split, a teacher folder's models, a weights file checked, a pretrained
teacher scored, an ensemble's val accuracy, a standalone run of the loop. And the entry points
trainables defines elsewhere (the task and the registries, what Ray runs, teacher folders, the
cache), named by module in ENTRY_POINTS and loaded on first use.

A student is a folder: `student.safetensors` (its weights) beside `student.json` (its card: the
architecture, the classes, the input statistics). A trial's checkpoint becomes one (`save_student`,
logged as the trial run's `student/` artifact); `load_student` gives it back as a model that
takes raw inputs (0..255 pixels, waveforms, token ids), which selection tests, registers and
export writes out.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from trainables.config import TrialConfig

#: What the driver uses as trainables defines it, by the module that does: named here, loaded on
#: first use (`kdsweep --help` and a config's exit-2 check import neither Ray Train nor the cache).
ENTRY_POINTS = {
    # the task contract and the registries a config is validated against
    "trainables.tasks": ("Task", "task_for"),
    "trainables.losses": ("LOSSES", "check_fits", "loss_defaults"),
    "trainables.models": ("check_model",),
    "trainables.plugins": ("load_plugins",),
    "trainables.models.weights": ("weights_sha256",),
    "trainables.models.hf": ("check_copies_teacher", "config_dict"),
    # what Ray runs: a trial, the teacher's training, the latency timing; the console's board
    "trainables.trial": ("TrialRun", "teacher_task", "tune_trial"),
    "trainables.models.profile": ("TEACHER", "latency_task", "profile_sizes", "size_report"),
    "trainables.board": ("ProgressBoard",),
    # teacher folders, the teacher cache, batches
    "trainables.models.teacher": ("CARD", "WEIGHTS", "load_teacher", "read_card", "read_teacher_card", "save_ensemble", "save_teacher",
                                  "teacher_card_file"),
    "trainables.models.ensemble": ("is_ensemble",),
    "trainables.teacher_cache": ("bytes_per_view", "create_cache", "read_topk_mass"),
    "trainables.data.batches": ("BatchLayout",),
    # a model taking raw inputs; a student's card; a text model's tokenizer
    "trainables.data.normalize": ("Normalized",),
    "trainables.card": ("StudentCard", "build_card", "write_card"),
    "trainables.hf_files": ("load_tokenizer",),
    # a language model's prompts (its registered model's input example, its export's check)
    "trainables.data.lm": ("prompts_of",),
}
_WHERE = {name: module for module, names in ENTRY_POINTS.items() for name in names}
_RENAMED = {"build_card": "build", "write_card": "write"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


#: A student folder's files.
STUDENT_WEIGHTS, STUDENT_CARD = "student.safetensors", "student.json"


def save_student(checkpoint_dir: str | Path, out: str | Path, trial: TrialConfig, model_info: dict[str, Any]) -> dict[str, Any]:
    """The student of a trial's checkpoint as a folder `out` (weights and card); returns the
    evaluation tables the checkpoint holds (per class, per corruption and severity), if any.
    `model_info`: num_classes, input_shape and classes of the sweep's data."""
    from safetensors.torch import save_file

    from trainables.card import StudentCard, build, write
    from trainables.tensor_files import untied
    from trainables.checkpoint import STATE_FILE, load_state

    state = load_state(Path(checkpoint_dir) / STATE_FILE)
    save_file(untied(state["model"]), str(Path(out) / STUDENT_WEIGHTS))
    card = build(StudentCard, {"arch": trial.student, "arch_kwargs": trial.student_kwargs, "num_classes": model_info["num_classes"],
                               "input_shape": model_info["input_shape"], "classes": model_info.get("classes", []), "epoch": state["epoch"],
                               **state.get("preprocess", {})})  # mean/std: what export and the registered model normalize with
    write(card, Path(out) / STUDENT_CARD)
    return state.get("eval") or {}


def load_student(folder: str | Path, shown_as: str | None = None):
    """(model, card) of a student folder: the model with its card's input statistics built in
    (raw inputs in, logits out), in eval mode. A missing or incomplete card is a one-line
    ConfigError naming the file (`shown_as`: how to name it, e.g. its runs:/ URI)."""
    from safetensors.torch import load_file

    from trainables.card import StudentCard, read
    from trainables.tensor_files import retied
    from trainables.data.normalize import Normalized
    from trainables.models import create_model

    folder = Path(folder)
    card = read(StudentCard, folder / STUDENT_CARD, shown_as=shown_as)
    model = create_model(card.arch, card.num_classes, card.input_shape, **card.arch_kwargs)
    model.load_state_dict(retied(model, load_file(str(folder / STUDENT_WEIGHTS))))
    return Normalized(model, card.mean, card.std).eval(), card


def load_teacher_models(path: str | Path):
    """(teacher, members): the teacher folder's model taking raw inputs, and an ensemble's members
    each alone, named `teacher[i] arch` (an empty list for a single teacher)."""
    from trainables.data.normalize import Normalized
    from trainables.models.ensemble import EnsembleTeacher
    from trainables.models.teacher import load_teacher

    net, card = load_teacher(path)
    members = []
    if isinstance(net, EnsembleTeacher):
        for i, (m, spec) in enumerate(zip(net.members, card.members)):
            members.append((f"teacher[{i}] {spec.arch}", Normalized(m, net.mean[i].flatten().tolist(), net.std[i].flatten().tolist()).eval()))
    return Normalized(net, *card.stats).eval(), members


def evaluate_on_split(task, student, teacher, splits, split: str = "test", members=(), student_splits=None, seed: int = 0,
                      batch: int = 2048) -> dict[str, dict[str, float]]:
    """The task's metrics on one split for the student, its teacher and an ensemble's members
    (Task.evaluate_split), so "student vs teacher" is one table."""
    return task.evaluate_split(student, teacher, splits, split, members, student_splits, seed, batch)


# --- teachers: a folder (weights and card) the driver checks, trains into, or builds an ensemble in ---

def check_weights_file(arch: str, num_classes: int, input_shape: tuple[int, ...], arch_kwargs: dict[str, Any], path: str,
                       field: str, new_head_ok: bool = True) -> bool:
    """A weights file against the architecture it is for (keys, shapes, a file that holds tensors):
    a one-line ConfigError naming `field` and the keys. True when only the classifier head differs
    (another class count: it must be trained)."""
    from trainables.models import create_model
    from trainables.models.weights import load_weights

    return load_weights(create_model(arch, num_classes, input_shape, **arch_kwargs), path, field, new_head_ok=new_head_ok)


def model_from_state(arch: str, num_classes: int, input_shape: tuple[int, ...], arch_kwargs: dict[str, Any], state: dict):
    """The architecture with a state dict loaded (a teacher trained in a Ray task comes back so)."""
    from trainables.models import create_model

    model = create_model(arch, num_classes, input_shape, **arch_kwargs)
    model.load_state_dict(state)
    return model


def score_pretrained(arch: str, arch_kwargs: dict[str, Any], weights: str, normalize, splits, batch: int):
    """(model, preprocess, val_acc) of a weights file that already fits the data: loaded, its input
    statistics chosen as a trial would (`normalize`), scored on val; not trained."""
    import contextlib

    from trainables.data.normalize import model_stats, normalizer
    from trainables.eval.inference import predict
    from trainables.eval.metrics import classification_metrics
    from trainables.models import create_model
    from trainables.models.weights import load_weights

    model = create_model(arch, splits.num_classes, splits.input_shape, **arch_kwargs)
    load_weights(model, weights, "teacher.weights", new_head_ok=False)
    mean, std = model_stats(normalize, True, arch, splits)
    logits = predict(model, splits.val_x, normalizer(mean, std, "cpu"), batch, contextlib.nullcontext, False)
    return model.eval(), {"mean": list(mean), "std": list(std)}, classification_metrics(logits, splits.val_y)["val_acc"]


def ensemble_val_acc(members: list[Path], weights: list[float], combine: str, splits) -> tuple[float, list]:
    """(val accuracy, member cards) of the ensemble the member teacher folders make, as its target
    model combines them."""
    import contextlib

    from trainables.eval.inference import predict
    from trainables.eval.metrics import classification_metrics
    from trainables.models.ensemble import EnsembleTeacher
    from trainables.models.teacher import load_teacher

    loaded = [load_teacher(m) for m in members]
    model = EnsembleTeacher([net for net, _ in loaded], [card.stats for _, card in loaded], weights, combine)
    logits = predict(model, splits.val_x, lambda x: x.float() / 255.0, 1024, contextlib.nullcontext, False)
    return classification_metrics(logits, splits.val_y)["val_acc"], [card for _, card in loaded]


def train(trial: TrialConfig, reporter=None):
    """A trial's loop run in this process (`kdsweep distill`, `kdsweep teacher`): its result. The
    loop is imported here, when called: a sweep's driver imports this module, never the loop."""
    from trainables.loop import train_student

    return train_student(trial, reporter)
