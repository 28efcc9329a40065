"""Teacher ensembles: the target is the weighted mean of the members' softened probabilities (or of
their logits), the sweep's cache holds every view once (member forwards = members x views), the
test table shows the ensemble and each member, and bad members are one-line errors."""
from __future__ import annotations

import json
import os

import mlflow
import pytest
import torch
import torch.nn.functional as F

from orchestrator.cli import main
from trainables.config import TrialConfig
from trainables.data import load_splits
from trainables.data.batches import train_batches, augment
from trainables.data.placement import device_batches
from trainables.data.normalize import normalizer
from trainables.loop import LocalReporter, train_student
from trainables.models.ensemble import combine_targets, soft_target
from trainables.models.teacher import load_teacher, save_ensemble
from trainables.teacher_cache import Builder, TeacherCache, build_teacher_cache
from tests.conftest import sweep_yaml, trial_dict


@pytest.fixture(scope="module")
def mlp_teacher(tmp_path_factory):
    """A second, different digits teacher (mlp_32, a few epochs)."""
    from orchestrator.plan.config import load_config
    from orchestrator.plan.prepare import check_data, ensure_teacher

    out = tmp_path_factory.mktemp("teacher") / "digits-mlp_32"
    cfg = load_config(None, [f"teacher.path={out}", "teacher.arch=mlp_32", "teacher.epochs=3"])
    ensure_teacher(cfg, check_data(cfg))
    return out


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 20.0])
def test_soft_target_is_the_weighted_mean_of_the_members_softened_probabilities(temperature):
    torch.manual_seed(0)
    z = torch.randn(16, 3, 10, dtype=torch.float64) * 5
    z[0, 0, 3] = 300.0  # a member certain beyond float range of exp
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    target = F.softmax(soft_target(z, w, temperature) / temperature, -1)
    expected = (w.view(1, -1, 1) * F.softmax(z / temperature, -1)).sum(1)
    assert torch.allclose(target, expected, atol=1e-12)
    assert torch.equal(combine_targets(z[:, 0], w, temperature), z[:, 0])  # one teacher's logits pass through


def _trial(ensemble, **kw):
    base = {"dataset": {"name": "digits", "val_fraction": 0.2, "augment": {"crop_pad": 1, "flip": True}}, "student": "mlp_32",
            "epochs": 2, "batch_size": 64, "teacher_path": str(ensemble), "loss": {"alpha": 0.9, "temperature": 3.0}, "profile": False,
            "robust_samples": 0}
    base.update(kw)
    return TrialConfig.model_validate(trial_dict(**base))


@pytest.mark.parametrize("combine", ["probs", "logits"])
def test_the_cache_holds_one_target_per_view_and_the_trial_mixes_it_at_its_temperature(tmp_path, digits_teacher, mlp_teacher, combine):
    ens = tmp_path / "ensemble"
    save_ensemble(ens, [digits_teacher, mlp_teacher], [1.0, 3.0], combine, val_acc=0.0)
    c = _trial(ens)
    teacher, card = load_teacher(ens)
    path, forwards = build_teacher_cache(c, teacher, card, tmp_path / "cache")
    s = load_splits(c.dataset)
    assert forwards == 2 * len(s.val_y)  # each member, each val image; the epochs' views are built by the first trial
    cache = TeacherCache.open(path, c, card)
    build = Builder(c, teacher, card, s, True, "cpu")
    cache.builder = build
    members = [load_teacher(p) for p in (digits_teacher, mlp_teacher)]
    w = torch.tensor([0.25, 0.75])
    aug = c.dataset.augment_or_default()
    for _, idx, x, _, view in device_batches(s.train_x, s.train_y, train_batches(s, c, 1, "cpu"), "cpu", True):
        raw = augment(x, view, aug)
        with torch.no_grad():
            z = torch.stack([net(normalizer(*mc.stats, "cpu")(raw)) for net, mc in members], 1)
        got = cache.batch(1, idx, "cpu")
        assert got.shape == ((64, 2, 10) if combine == "probs" else (64, 10))
        t_logits = combine_targets(got, w, 3.0)
        if combine == "probs":
            expected = (w.view(1, -1, 1) * F.softmax(z / 3.0, -1)).sum(1)
            assert torch.allclose(F.softmax(t_logits / 3.0, -1), expected, atol=2e-3)  # fp16 storage
        else:
            assert torch.allclose(t_logits, (w.view(1, -1, 1) * z).sum(1), rtol=1e-3, atol=2e-2)
    assert build.forwards == 2 * len(s.train_y)  # each member sees each example's view once
    cached = train_student(c.model_copy(update={"teacher_cache": str(path)}), LocalReporter(None, log_epochs=False))
    online = train_student(c.model_copy(update={"train": c.train.model_copy(update={"teacher_targets": "online"})}),
                           LocalReporter(None, log_epochs=False))
    assert cached.metrics["teacher_targets"] == "cache" and cached.metrics["teacher_forward_images"] == 2 * len(s.train_y)  # epoch 0
    views = 2 * (len(s.train_y) // 64) * 64
    assert online.metrics["teacher_forward_images"] == 2 * (views + len(s.val_y))
    assert abs(online.metrics["train_kd"] - cached.metrics["train_kd"]) <= 0.01 * online.metrics["train_kd"]


def test_a_sweep_distils_an_ensemble_and_compares_the_champion_with_each_member(tmp_path, digits_teacher, ray_address, capsys, monkeypatch):
    """The second member is trained by the sweep; the cache is built once, by the trials (member
    forwards = members x views, whatever the trial count); the ensemble's card, with every member, is on the parent
    run; the test table has the ensemble and each member."""
    monkeypatch.chdir(tmp_path)
    cfg = ensemble_yaml(tmp_path, digits_teacher, "ens", [{"path": str(digits_teacher)}, {"arch": "mlp_32", "epochs": 2}],
                     ensemble={"combine": "probs", "weights": [2.0, 1.0]},
                     **{"budget.num_samples": 3, "train.epochs": 2, "train.robust_samples": 0, "students": ["mlp_32"]})
    assert main(["run", str(cfg), "--address", ray_address]) == 0
    out = capsys.readouterr().out
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ens")
    parent = next(r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("kdsweep.role") == "parent")
    card = json.loads(open(client.download_artifacts(parent.info.run_id, "teacher/ensemble.json", str(tmp_path))).read())
    assert [m["arch"] for m in card["members"]] == ["cnn_small", "mlp_32"] and [m["weight"] for m in card["members"]] == [2.0, 1.0]
    s = load_splits(load_config_of(cfg).dataset)
    table = open(client.download_artifacts(parent.info.run_id, "champion_vs_teacher.md", str(tmp_path))).read()
    assert "| teacher |" in table and "| teacher[0] cnn_small (member) |" in table and "| teacher[1] mlp_32 (member) |" in table
    assert {"teacher_member0_test_acc", "teacher_member1_test_acc", "teacher_test_acc"} <= set(parent.data.metrics)
    assert "teacher: " in out and "ensemble" in out
    trials = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("kdsweep.role") == "trial"]
    forwards = sorted(int(r.data.metrics["teacher_forward_images"]) for r in trials)  # the cache's files, built by the first trials
    assert sum(forwards) == 2 * (len(s.train_y) + len(s.val_y)) and forwards[0] == 0  # static views: once each, whatever the trial count


def ensemble_yaml(tmp_path, digits_teacher, name, members, **over):
    """sweep_yaml's tiny sweep with a teacher list (its `teacher` argument names one folder)."""
    import yaml

    path = sweep_yaml(tmp_path, digits_teacher, name, **over)
    data = yaml.safe_load(path.read_text())
    data["teacher"] = members
    path.write_text(yaml.safe_dump(data))
    return path


def load_config_of(path):
    from orchestrator.plan.config import load_config

    return load_config(str(path))


def test_a_member_with_another_class_count_is_one_line_exit_2_and_writes_nothing(tmp_path, digits_teacher, capsys, monkeypatch):
    from trainables.models import create_model
    from trainables.models.teacher import save_teacher

    monkeypatch.chdir(tmp_path)
    three = tmp_path / "three-classes"
    save_teacher(create_model("cnn_tiny", 3, (1, 8, 8)), three, {
        "arch": "cnn_tiny", "arch_kwargs": {}, "num_classes": 3, "input_shape": [1, 8, 8], "classes": ["a", "b", "c"], "mean": [0.3],
        "std": [0.4], "dataset": "digits", "val_acc": 0.5, "epochs": 1, "normalize": "auto"})
    cfg = ensemble_yaml(tmp_path, digits_teacher, "bad", [{"path": str(digits_teacher)}, {"path": str(three)}])
    before = sorted(os.listdir(tmp_path))
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "`teacher[1].path` teacher has num_classes=3 but the dataset has 10" in err, err
    assert sorted(os.listdir(tmp_path)) == before  # checked by the plan, before Ray starts: no runs/, mlruns/ or teachers/
