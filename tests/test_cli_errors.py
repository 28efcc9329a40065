"""Every bad input: one line naming the field, exit code 2, nothing written, Ray never started."""
import os
import sys

import pytest

from orchestrator.cli import main

DEFAULT = os.path.join(os.path.dirname(__file__), "..", "search_spaces", "default.yaml")


@pytest.fixture
def no_ray(monkeypatch):
    """Checks that the command started no Ray: it never called orchestrator.run.sweep.init_ray, and,
    unless an earlier test left the session's shared Ray up in this process, none is initialized."""
    import orchestrator.run.sweep as sweep

    starts, real = [], sweep.init_ray
    monkeypatch.setattr(sweep, "init_ray", lambda *a, **k: (starts.append(a), real(*a, **k))[1])
    up_before = "ray" in sys.modules and __import__("ray").is_initialized()

    def check() -> None:
        assert starts == [], f"the command started Ray: init_ray{starts[0]}"
        assert up_before or "ray" not in sys.modules or not __import__("ray").is_initialized()

    return check


def run_cli(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


BAD = [
        (["loss.temperature=0"], "`loss.temperature`"),
        (["temperature=-2"], "`loss.temperature`"),
        (["alpha=1.5"], "`loss.alpha`"),
        (["students=[resnet9]"], "`students[0]` must be one of"),
        (["teacher.arch=vit"], "`teacher.arch`"),
        (["students=[torchvision.no_such_model]"], "`students[0]` must be one of"),
        (["teacher.arch=torchvision.no_such_model"], "torchvision classifiers, e.g. torchvision.resnet18"),
        (["dataset.name=imagenet"], "`dataset.name` must be one of"),
        (["loss.name=crd"], "`loss.name` must be one of"),
        (["search.temperature.low=0"], "`search.temperature`"),
        (["search.alpha.high=2"], "`search.alpha`"),
        (["dataset.name=fashion_mnist", "dataset.root=/no/such/dir"], "`dataset.root` does not exist: nothing at '/no/such/dir' (it takes a folder"),
        (["teacher.path=/no/such/teacher"], "`teacher.path` does not exist: nothing at '/no/such/teacher' (it takes a teacher folder"),
        (["budgett.num_samples=3"], "`budgett` is not a known key"),
        (["budget.confirm.seeds=1"], "`budget.confirm.seeds`"),
        (["budget.confirm.top=-1"], "`budget.confirm.top`"),
        (["loss.schedule.temperature.end=0"], "`loss.schedule.temperature.end` must be > 0"),
        (["dataset.unlabeled.root=/no/such/dir"], "`dataset.unlabeled.root` does not exist: nothing at '/no/such/dir'"),
        (["dataset.unlabeled.labels_kept=1.5"], "`dataset.unlabeled.labels_kept`"),
        (["dataset.unlabeled.ratio=0.5"], "`dataset.unlabeled` needs `root`"),
        (["ensemble.weights=[1, 2]"], "`ensemble.weights` needs one weight per teacher (1)"),
        (["loss.name=tinybert"], "`loss.name` tinybert distils transformer hidden states, which the models of image classification lack: use at or hint"),
        (["students=[hf.bert-L2-H64-A2]"], "`students` hf.bert-L2-H64-A2 does not take images"),
]
# `kdsweep teacher` trains into a teacher.path that does not exist yet, so that case is distill-only.
CASES = [(c, s, n) for c in ("distill", "teacher") for s, n in BAD if not (c == "teacher" and s[0].startswith("teacher.path"))]


@pytest.mark.parametrize("command,sets,needle", CASES)
def test_bad_input_exits_2_with_one_line(command, sets, needle, capsys, in_tmp, monkeypatch, no_ray):
    monkeypatch.delenv("KD_DATA_ROOT", raising=False)
    args = [command, DEFAULT]
    for s in sets:
        args += ["--set", s]
    code, err = run_cli(args, capsys)
    assert code == 2
    assert len(err.splitlines()) == 1 and needle in err, err
    assert os.listdir(in_tmp) == []
    no_ray()


def test_malformed_yaml_and_missing_file(capsys, in_tmp):
    (in_tmp / "bad.yaml").write_text("name: x\nstudents: [a, b\n")
    code, err = run_cli(["distill", str(in_tmp / "bad.yaml")], capsys)
    assert code == 2 and "`CONFIG` is not valid YAML at line" in err and len(err.splitlines()) == 1
    code, err = run_cli(["distill", str(in_tmp / "missing.yaml")], capsys)
    assert code == 2 and "`CONFIG` must be a YAML file" in err
    (in_tmp / "list.yaml").write_text("- a\n- b\n")
    code, err = run_cli(["distill", str(in_tmp / "list.yaml")], capsys)
    assert code == 2 and "YAML mapping" in err
    assert sorted(os.listdir(in_tmp)) == ["bad.yaml", "list.yaml"]


def test_teacher_class_mismatch(capsys, in_tmp, digits_teacher):
    code, err = run_cli(["distill", DEFAULT, "--set", f"teacher.path={digits_teacher}", "--set", "dataset.name=synthetic",
                         "--set", "dataset.kwargs={n_train: 100, n_test: 10, shape: [1, 8, 8], num_classes: 5}"], capsys)
    assert code == 2 and "num_classes=10 but the dataset has 5" in err
    assert os.listdir(in_tmp) == []


def test_distill_runs_and_prints_epochs(capsys, in_tmp, digits_teacher):
    code = main(["distill", DEFAULT, "--set", f"teacher.path={digits_teacher}", "--set", "epochs=2", "--student", "cnn_tiny"])
    out = capsys.readouterr().out
    assert code == 0 and "epoch=2" in out and "val_agreement=" in out and "final val_acc=" in out


@pytest.mark.parametrize("sets,needle", [
    (["resources.cpus_per_trial=64"], "`resources.cpus_per_trial` asks for 64 CPUs per worker, but this machine has at most"),
    (["resources.num_workers=64"], "`resources.num_workers` asks for 64 workers"),
    (["resources.gpus_per_trial=1"], "`resources.gpus_per_trial` asks for 1 GPU per worker, but this machine has no GPU"),
    (["train.batch_size=5000"], "`train.batch_size` must be <= the 1150 labelled train images"),
])
def test_run_with_resources_this_machine_lacks_exits_2_before_anything(sets, needle, capsys, in_tmp, no_ray):
    """On a local Ray, a trial that could never be placed would stay PENDING forever."""
    import torch

    if "gpus" in sets[0] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args = ["run"]
    for s in sets:
        args += ["--set", s]
    code, err = run_cli(args, capsys)
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert os.listdir(in_tmp) == []
    no_ray()


@pytest.mark.parametrize("source,needle", [
    (None, "`plugins` entry 'no_such_kd_plugin' is not importable (ModuleNotFoundError"),
    ("raise RuntimeError('broken on purpose')", "`plugins` entry 'no_such_kd_plugin' raised on import (RuntimeError: broken on purpose)"),
    ("import no_such_dependency_xyz", "`plugins` entry 'no_such_kd_plugin' raised on import (ModuleNotFoundError: No module named 'no_such_dependency_xyz')"),
])
@pytest.mark.parametrize("command", ["run", "distill"])
def test_bad_plugin_exits_2_with_one_line(source, needle, command, capsys, in_tmp, monkeypatch, tmp_path_factory):
    import sys as _sys

    if source is not None:
        d = tmp_path_factory.mktemp("badplugin")
        (d / "no_such_kd_plugin.py").write_text(source)
        monkeypatch.syspath_prepend(str(d))
    monkeypatch.delitem(_sys.modules, "no_such_kd_plugin", raising=False)
    code, err = run_cli([command, DEFAULT, "--set", "plugins=[no_such_kd_plugin]"], capsys)
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert os.listdir(in_tmp) == []


def test_entry_point_plugins_register_on_load(tmp_path, monkeypatch):
    """An installed package's `kdsweep.plugins` entry point is imported without being named."""
    from trainables.models import MODELS
    from trainables.plugins import load_plugins

    (tmp_path / "kd_ep_plugin.py").write_text(
        "import torch.nn as nn\nfrom trainables.models import MODELS\n\n@MODELS.register\ndef ep_net(num_classes, input_shape):\n"
        "    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))\n")
    dist = tmp_path / "kd_ep_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kd-ep-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[kdsweep.plugins]\nmodels = kd_ep_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "ep_net" not in MODELS
    assert "kd_ep_plugin" in load_plugins()
    assert "ep_net" in MODELS


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """Weights files outside the working folder: a text file, another architecture's, a 5-class one."""
    import torch

    from trainables.models import create_model

    d = tmp_path_factory.mktemp("weights")
    (d / "notes.pth").write_text("not tensors\n")
    torch.save(create_model("mlp_32", 10, (1, 8, 8)).state_dict(), d / "mlp.pth")
    torch.save(create_model("cnn_small", 5, (1, 8, 8)).state_dict(), d / "five.pth")
    return d


@pytest.mark.parametrize("sets,needle", [
    (["teacher.weights={d}/notes.pth"], "`teacher.weights` '{d}/notes.pth' is not a tensor file (UnpicklingError)"),
    (["teacher.weights={d}/mlp.pth"], "`teacher.weights` '{d}/mlp.pth' does not fit this architecture (missing stages.0.1.bias"),
    (["teacher.weights={d}/nothing.pth"], "`teacher.weights` does not exist: nothing at '{d}/nothing.pth' (it takes a state_dict file"),
    (["teacher.weights={d}/five.pth", "teacher.finetune.epochs=0"], "`teacher.finetune.epochs` must be >= 1"),
    (["teacher.weights={d}/five.pth", "teacher.path={d}"], "`teacher.path` (a saved kdsweep teacher) and `teacher.weights`"),
    (["student_weights={{cnn_tiny: {d}/mlp.pth}}"], "`student_weights.cnn_tiny` '{d}/mlp.pth' does not fit this architecture"),
    (["student_weights={{resnet8: {d}/mlp.pth}}"], "`student_weights` names 'resnet8', which is not in students"),
    (["loss.student_layers={{cnn: [stages.0]}}"], "`loss.student_layers` names 'cnn', which is not in students"),
    (["student_weights.cnn_tiny=teacher"], "`student_weights.cnn_tiny: teacher` copies a Hugging Face teacher's layers into an hf student, "
                                           "but the student is cnn_tiny and the teacher cnn_small"),
], ids=["not-tensors", "wrong-keys", "missing", "new-head-no-finetune", "path-and-weights", "student-wrong-keys", "student-unknown",
        "layers-unknown-student", "student-copies-image-teacher"])
@pytest.mark.parametrize("command", ["run", "distill"])
def test_bad_weights_exit_2_with_one_line_before_anything(sets, needle, command, weight_files, capsys, in_tmp, no_ray):
    args = [command, DEFAULT]
    for s in sets:
        args += ["--set", s.format(d=weight_files)]
    code, err = run_cli(args, capsys)
    assert code == 2 and needle.format(d=weight_files) in err and len(err.splitlines()) == 1, err
    assert os.listdir(in_tmp) == []
    no_ray()


def test_distill_rejects_an_unknown_student_before_training_a_teacher(capsys, in_tmp):
    code, err = run_cli(["distill", DEFAULT, "--student", "resnet9000"], capsys)
    assert code == 2 and "`--student` must be one of" in err and "'resnet9000'" in err and len(err.splitlines()) == 1, err
    assert os.listdir(in_tmp) == []  # no teachers/: nothing trained


@pytest.mark.parametrize("given", ["--address", "RAY_ADDRESS"])
def test_unreachable_address_is_one_line_in_bounded_time(capsys, in_tmp, monkeypatch, given, no_ray):
    """Nothing listens on port 1: ray.init would retry for minutes, printing connection warnings.
    RAY_ADDRESS (as `ray job submit` sets it) is the default `--address`."""
    import time

    args = ["run", "--set", "resources.connect_timeout_s=5"]
    if given == "RAY_ADDRESS":
        monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    else:
        args += ["--address", "127.0.0.1:1"]
    started = time.monotonic()
    code, err = run_cli(args, capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"{'RAY_ADDRESS (the default `--address`)' if given == 'RAY_ADDRESS' else '`--address`'} 127.0.0.1:1 cannot be reached" in err
    assert "ray start --head" in err
    assert time.monotonic() - started < 30
    assert os.listdir(in_tmp) == []
    no_ray()


@pytest.mark.parametrize("search,needle", [
    ("{loss.name: {type: categorical, choices: [kd, dkdx]}}", "`search.loss.name` reaches 'dkdx', which a trial rejects: `loss.name` must be one of"),
    ("{train.optimizer.name: {type: categorical, choices: [sgd, lamb]}}", "`search.train.optimizer.name` reaches 'lamb'"),
    ("{loss.temperature: {type: float, low: 0, high: 4}}", "`search.loss.temperature` reaches 0.0"),
    ("{train.teacher_cache: {type: categorical, choices: [true, false]}}", "`search.train.teacher_cache` reaches True, which a trial rejects"),
    # a method search: a method's own key needs its method among the choices, and the method is a categorical
    ("{loss.name: {type: categorical, choices: [kd, dist]}, loss.dkd_beta: {type: float, low: 2, high: 8}}",
     "`search.loss.dkd_beta` is a parameter of none of the searched losses ['kd', 'dist'] (it is dkd's): add dkd to search.loss.name"),
    ("{loss.name: {type: int, low: 0, high: 2}}", "`search.loss.name` searches the method: it must be a categorical"),
    # a schedule's end, searched beyond what its value may be
    ("{loss.schedule.alpha.end: {type: float, low: 0, high: 1.5}}", "`search.loss.schedule.alpha.end` reaches 1.5, which a trial rejects"),
])
def test_every_searched_value_is_checked_like_a_fixed_one(search, needle, capsys, in_tmp):
    code, err = run_cli(["run", "--dry-run", "--set", f"search={search}"], capsys)
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert os.listdir(in_tmp) == []


def test_one_class_image_folder_says_two_classes_are_needed(capsys, in_tmp, tmp_path_factory):
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("oneclass")
    (root / "train" / "cat").mkdir(parents=True)
    for i in range(20):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(root / "train" / "cat" / f"{i}.png")
    code, err = run_cli(["run", "--dry-run", "--set", "dataset.name=image_folder", "--set", f"dataset.root={root}"], capsys)
    assert code == 2 and "at least two classes" in err and "batch_size" not in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("args,needle", [
    (["--confirm-seeds", "1"], "`--confirm-seeds` must be >= 2"),
    (["--confirm-top", "2"], "`--confirm-top` goes with --confirm-seeds N"),
])
def test_bad_confirmation_flags_exit_2_before_ray(args, needle, capsys, in_tmp, no_ray):
    """A saved sweep (its sweep.json and parent run) is enough to reach the flag checks."""
    import json

    from orchestrator.plan.config import load_config
    from orchestrator.track.store import SweepTracker

    cfg = load_config(None, ["name=done"])
    (in_tmp / "runs" / "done").mkdir(parents=True)
    uri = f"sqlite:///{in_tmp / 'mlruns' / 'mlflow.db'}"
    (in_tmp / "runs" / "done" / "sweep.json").write_text(json.dumps({"config": cfg.model_dump(), "tracking_uri": uri, "teacher": "t"}))
    SweepTracker(uri, "done").parent_run("done", cfg.model_dump())
    capsys.readouterr()
    before = sorted(p.name for p in in_tmp.rglob("*"))
    code, err = run_cli(["best", "done", *args], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert sorted(p.name for p in in_tmp.rglob("*")) == before
    no_ray()
