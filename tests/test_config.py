import os
from pathlib import Path

import pytest

from orchestrator.config import load_config
from orchestrator.search import control_points, trial_budget

SPACES = sorted(Path(__file__).resolve().parents[1].joinpath("search_spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_every_shipped_sweep_validates(path):
    cfg = load_config(path)
    for student in cfg.students:
        trial = cfg.trial(student)
        assert trial.student == student


def test_shipped_sweeps_cover_the_issue():
    names = {p.name for p in SPACES}
    assert {"default.yaml", "fashion_mnist.yaml", "cifar100_crd.yaml", "cifar100_ddp.yaml"} <= names
    assert load_config(Path(SPACES[0]).parent / "cifar100_ddp.yaml").resources.num_workers == 2
    assert load_config(Path(SPACES[0]).parent / "cifar100_crd.yaml").resources.gpus_per_trial == 0.25


def test_embedded_default_is_the_shipped_default():
    assert load_config(None) == load_config(SPACES[0].parent / "default.yaml")


def test_controls_come_first_for_every_student():
    cfg = load_config(None)
    points = control_points(cfg, cfg.students)
    assert [(p["student"], p["loss.alpha"]) for p in points] == [("mlp_32", 0.0), ("mlp_32", 0.9), ("cnn_tiny", 0.0), ("cnn_tiny", 0.9)]
    assert all(p["loss.temperature"] == 4.0 and p["train.optimizer.lr"] == 0.05 for p in points)


def test_per_student_budget_split():
    cfg = load_config(None, ["mode=per_student", "budget.num_samples=5"])
    assert trial_budget(cfg) == [("mlp_32", ["mlp_32"], 3), ("cnn_tiny", ["cnn_tiny"], 2)]
    assert trial_budget(load_config(None)) == [("joint", ["mlp_32", "cnn_tiny"], 8)]


def test_per_student_search_hands_out_each_students_share_round_robin_controls_first(tmp_path):
    import pickle

    from orchestrator.search import PerStudentSearch
    from ray.tune.search import Searcher

    cfg = load_config(None, ["mode=per_student", "budget.num_samples=5"])
    search = PerStudentSearch(cfg)
    got = [search.suggest(f"t{i}") for i in range(5)]
    assert [c["student"] for c in got] == ["mlp_32", "cnn_tiny", "mlp_32", "cnn_tiny", "mlp_32"]
    assert [c["loss.alpha"] for c in got[:4]] == [0.0, 0.0, 0.9, 0.9]  # each study's controls first, its own
    assert search.suggest("t5") == Searcher.FINISHED  # 3 + 2: every share used
    for i, c in enumerate(got):
        search.on_trial_complete(f"t{i}", {"val_acc": 0.5 + 0.01 * i, **c})
    assert [len(s._ot_study.trials) for s in search.studies.values()] == [3, 2]  # each result went to its own study
    search.save(str(tmp_path / "searcher.pkl"))  # Tune checkpoints it whole; a restored one continues
    again = PerStudentSearch(cfg)
    again.restore(str(tmp_path / "searcher.pkl"))
    assert again.issued == {"mlp_32": 3, "cnn_tiny": 2} and again.suggest("t6") == Searcher.FINISHED
    pickle.dumps(search)


def test_overrides_and_aliases():
    cfg = load_config(None, ["lr=0.2", "temperature=3", "loss.dkd_beta=2", "loss.name=dkd"])
    assert cfg.train.optimizer.lr == 0.2 and cfg.loss.temperature == 3 and cfg.loss.params()["dkd_beta"] == 2
    trial = cfg.trial("mlp_32", {"loss.alpha": 0.3, "loss.dkd_beta": 5.0})
    assert trial.loss.alpha == 0.3 and trial.loss.params()["dkd_beta"] == 5.0


def test_explicit_loss_weights_reach_the_trial_and_exclude_a_searched_alpha():
    from trainables.registry import ConfigError

    sets = ["loss.name=dkd", "loss.ce_weight=1.0", "loss.distill_weight=1.0", "loss.alpha=null"]
    with pytest.raises(ConfigError, match="search.alpha.*searches alpha"):
        load_config(None, sets)
    cfg = load_config(None, [*sets, "search={}"])
    loss = cfg.trial("mlp_32").loss
    assert (loss.ce_weight, loss.distill_weight, loss.alpha) == (1.0, 1.0, None)
    with pytest.raises(ConfigError, match="exclusive"):
        load_config(None, ["loss.ce_weight=1.0", "loss.distill_weight=1.0", "search={}"])


def test_worker_paths_are_resolved_on_the_driver(tmp_path, monkeypatch):
    """A worker on another node has none of the driver's environment: the trial config carries it."""
    root = tmp_path / "data"
    root.mkdir()
    monkeypatch.setenv("KD_DATA_ROOT", str(root))
    monkeypatch.setenv("KDSWEEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["teacher.path=t"])
    trial = cfg.trial("mlp_32")
    assert trial.dataset.root == str(root) and trial.dataset.cache == str(tmp_path / "cache")
    assert trial.teacher_path == str(tmp_path / "t")
    monkeypatch.delenv("KD_DATA_ROOT")
    monkeypatch.delenv("KDSWEEP_CACHE")
    from trainables.config import TrialConfig

    again = TrialConfig.model_validate(trial.model_dump())  # what the worker does with it
    assert again.dataset.resolved().root == str(root) and again.dataset.resolved().cache == str(tmp_path / "cache")


def test_search_spaces_are_checked_by_optuna_and_loss_keys_by_signature():
    from trainables.registry import ConfigError

    with pytest.raises(ConfigError, match=r"`search.lr`.*optuna rejects it.*step"):
        load_config(None, ["search.lr={type: float, low: 0.01, high: 0.2, log: true, step: 0.01}"])
    with pytest.raises(ConfigError, match=r"`loss.dkd_betta` is not a parameter of loss.name='dkd'.*dkd_beta"):
        load_config(None, ["loss.name=dkd", "loss.dkd_betta=8"])
    with pytest.raises(ConfigError, match=r"`search.loss.betaa`.*`loss.betaa` is not a parameter"):
        load_config(None, ["loss.name=at", "search={loss.betaa: {type: float, low: 1, high: 10}}"])
    assert load_config(None, ["loss.name=dkd", "loss.dkd_beta=2", "search={loss.dkd_alpha: {type: float, low: 0.5, high: 2}}"])


def test_remote_storage_uris_are_not_made_local_paths():
    assert load_config(None, ["storage=s3://bucket/kd"]).storage_path() == "s3://bucket/kd"
    assert load_config(None, ["storage=rel"]).storage_path() == os.path.abspath("rel")


def test_search_objectives():
    from trainables.registry import ConfigError

    cfg = load_config(None, ["search.objectives=[val_acc:max, size_params:min]"])
    assert cfg.objectives == ["val_acc:max", "size_params:min"] and "objectives" not in cfg.search
    assert load_config(None).objectives == ["val_acc:max"]
    assert load_config(None, ["search.objectives=[val_acc:max, size_params:min]"]) == validate_again(cfg)
    # one parser for every objective: aliases and default directions as on the command line
    assert load_config(None, ["search.objectives=[val_acc, params]"]).objectives == ["val_acc:max", "size_params:min"]
    with pytest.raises(ConfigError, match="objectives`.*METRIC:max or METRIC:min"):
        load_config(None, ["search.objectives=[val_acc:max, params:smallest]"])
    with pytest.raises(ConfigError, match="`search.objectives` must start with val_acc"):
        load_config(None, ["search.objectives=[size_params:min]"])


def validate_again(cfg):
    from orchestrator.config import SweepConfig

    return SweepConfig.model_validate(cfg.model_dump())  # what sweep.json / resume do


def test_dotted_search_keys_plan_the_same_controls_as_aliases():
    """`loss.alpha` and `alpha` are one key: the same canonical search, controls and standard points."""
    from orchestrator.search import CONTROL_POINT, STANDARD_POINT

    space = "{%s: {type: float, low: 0.0, high: 1.0}, %s: {type: float, low: 1.0, high: 8.0, log: true}}"
    alias = load_config(None, ["search=" + space % ("alpha", "temperature")])
    dotted = load_config(None, ["search=" + space % ("loss.alpha", "loss.temperature")])
    assert list(alias.search) == list(dotted.search) == ["loss.alpha", "loss.temperature"]
    points = control_points(dotted, dotted.students)
    assert points == control_points(alias, alias.students) and len(points) == 4
    for student in dotted.students:
        assert {**CONTROL_POINT, "loss.temperature": 4.0, "student": student} in points
        assert {**STANDARD_POINT, "student": student} in points


def test_asha_never_stops_a_control_whichever_key_searched_alpha():
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from orchestrator.search import ControlKeepingASHA, TrialBuilder
    from trainables.config import TRIAL_CONFIG

    cfg = load_config(None, ["search={loss.alpha: {type: float, low: 0.0, high: 1.0}}", "teacher.path=/tmp/t"])
    build = TrialBuilder(cfg, profile=False)
    asha = ControlKeepingASHA(time_attr="epoch", metric="val_acc", mode="max", max_t=8, grace_period=1, reduction_factor=2)
    decisions = {}
    for alpha in (0.0, 0.9):
        for i in range(4):  # four trials at the rung; the control is the worst
            point = {"student": "mlp_32", "loss.alpha": alpha if i == 0 else 0.5}
            trial = SimpleNamespace(trial_id=f"{alpha}-{i}", config={**point, TRIAL_CONFIG: build(point)})
            asha.on_trial_add(None, trial)
            decisions[trial.trial_id] = asha.on_trial_result(None, trial, {"epoch": 1, "val_acc": 0.1 if i == 0 else 0.9 - 0.01 * i})
    assert decisions["0.0-0"] == TrialScheduler.CONTINUE
    assert decisions["0.9-0"] == TrialScheduler.STOP


def test_the_driver_never_imports_the_trial_loop():
    """Driver modules read trial configs and checkpoints; the loop (and what it drags in) runs in
    Ray's processes only."""
    import subprocess
    import sys

    code = ("import sys, orchestrator.cli, orchestrator.sweep, orchestrator.selection, orchestrator.report, orchestrator.export, "
            "orchestrator.tracking, orchestrator.prepare; print(sorted(m for m in sys.modules if m == 'trainables.loop'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
