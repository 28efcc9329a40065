"""A method search without Ray: `loss.name` as a categorical of the search, each method's own keys
drawn only with it, its standard point evaluated first, its trials built with its keys alone."""
from __future__ import annotations

from orchestrator.plan.config import load_config
from orchestrator.plan.search import TrialBuilder, control_point, control_points, searcher
from orchestrator.run.sweep import warmup_notes

METHODS = ("search={loss.name: {type: categorical, choices: [kd, dkd, dist]}, loss.dkd_beta: {type: float, low: 2, high: 8}, "
           "loss.gamma: {type: float, low: 0.5, high: 2}, alpha: {type: float, low: 0, high: 1}, temperature: {type: float, low: 1, high: 8}}")


def method_search(*sets):
    return load_config(None, ["teacher.path=/tmp/t", METHODS, *sets])


def test_each_method_draws_only_its_own_keys_and_trains_with_them():
    cfg = method_search("loss.warmup_epochs=2")
    search, build = searcher(cfg, cfg.students), TrialBuilder(cfg, teacher_path="/tmp/t")
    drawn = []
    for i in range(16):
        point = search.suggest(str(i))
        trial = build(point)
        own = {k for k in point if k in ("loss.dkd_beta", "loss.gamma")}
        assert own == {"dkd": {"loss.dkd_beta"}, "dist": {"loss.gamma"}, "kd": set()}[point["loss.name"]], point
        assert trial.loss.name == point["loss.name"] and set(trial.loss.model_extra) <= {"warmup_epochs", *(k[5:] for k in own)}
        assert {k: v for k, v in trial.loss.params().items() if k in ("dkd_beta", "gamma")} == {k[5:]: point[k] for k in own}
        search.on_trial_complete(str(i), {"val_acc": 0.5 + 0.01 * (i % 5), "training_iteration": 1})
        drawn.append((point["student"], point["loss.name"], point["loss.alpha"]))
    # first, per student: its control and every method's standard point (own keys at the loss's defaults)
    assert drawn[:8] == [(s, m, a) for s in ("mlp_32", "cnn_tiny") for m, a in (("kd", 0.0), ("kd", 0.9), ("dkd", 0.9), ("dist", 0.9))]
    points = control_points(cfg, ["mlp_32"])
    assert points[2]["loss.dkd_beta"] == 8.0 and points[3]["loss.gamma"] == 1.0
    assert {m for _, m, _ in drawn[8:]} <= {"kd", "dkd", "dist"}
    again = searcher(method_search("loss.warmup_epochs=2"), cfg.students)  # seeded: the same draws
    assert [again.suggest(str(i))["loss.name"] for i in range(10)] == [m for _, m, _ in drawn[:10]]


def test_a_method_finalists_control_drops_the_methods_own_keys():
    cfg = method_search()
    finalist = {"student": "mlp_32", "loss.name": "dkd", "loss.dkd_beta": 5.0, "loss.alpha": 0.5, "loss.temperature": 2.0}
    control = control_point(cfg, finalist)
    assert control == {"student": "mlp_32", "loss.name": "kd", "loss.alpha": 0.0, "loss.temperature": 4.0}
    assert not TrialBuilder(cfg, teacher_path="/tmp/t")(control).loss.distills


def test_fixed_keys_of_one_method_leave_the_others_alone():
    cfg = method_search("loss.name=dkd", "loss.dkd_alpha=2.0")
    build = TrialBuilder(cfg, teacher_path="/tmp/t")
    assert build({"student": "mlp_32", "loss.name": "kd"}).loss.params().get("dkd_alpha") is None
    assert build({"student": "mlp_32", "loss.name": "dkd"}).loss.params()["dkd_alpha"] == 2.0


def test_the_plan_says_when_a_warm_up_outlasts_the_trials():
    notes = warmup_notes(method_search())
    assert len(notes) == 1 and notes[0].startswith("dkd warms its distillation term up over 20 epochs, more than the trials' 12")
    assert warmup_notes(method_search("loss.warmup_epochs=3")) == []


def test_a_control_is_alpha_zero_whatever_the_searched_range():
    """search.alpha over [0.1, 1]: each student's control still trains at alpha=0 exactly, first,
    outside TPE's space (its result never reaches the study); ASHA never stops it; the plan says so."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from orchestrator.plan.search import ControlKeepingASHA, ResolvedSearch, is_control
    from trainables.config import TRIAL_CONFIG

    cfg = load_config(None, ["teacher.path=/tmp/t", "search.alpha.low=0.1"])
    inner = searcher(cfg, cfg.students)
    search = ResolvedSearch(inner, TrialBuilder(cfg, teacher_path="/tmp/t"), 8)
    configs = [search.suggest(f"t{i}") for i in range(8)]
    assert [(c["student"], c["loss.alpha"]) for c in configs[:4]] == [("mlp_32", 0.0), ("cnn_tiny", 0.0), ("mlp_32", 0.9), ("cnn_tiny", 0.9)]
    assert [is_control(c) for c in configs] == [True, True] + [False] * 6
    assert all(c[TRIAL_CONFIG].loss.alpha == 0.0 and not c[TRIAL_CONFIG].loss.distills for c in configs[:2])
    assert all(0.1 <= c["loss.alpha"] <= 1.0 for c in configs[2:])
    asha = ControlKeepingASHA(time_attr="epoch", metric="val_acc", mode="max", max_t=12, grace_period=1, reduction_factor=2)
    for i, c in enumerate(configs):
        trial = SimpleNamespace(trial_id=f"t{i}", config=c)
        asha.on_trial_add(None, trial)
        decision = asha.on_trial_result(None, trial, {"epoch": 1, "val_acc": 0.1 if i < 2 else 0.9 - 0.01 * i})
        assert decision == TrialScheduler.CONTINUE or i >= 2
        search.on_trial_complete(f"t{i}", {"val_acc": 0.5, "training_iteration": 1, "epoch": 1})
    assert len(inner.inner._ot_study.trials) == 6  # the two controls never fed TPE
    assert all(t.params["loss.alpha"] >= 0.1 for t in inner.inner._ot_study.trials)
    from orchestrator.plan.search import first_trials

    line = first_trials(cfg, 8)
    assert "alpha=0 control (alpha=0 exactly; search.alpha [0.1, 1] leaves 0 out" in line and "standard point (T=4, alpha=0.9)" in line


def test_a_control_sets_the_distill_weight_to_zero_and_a_left_out_standard_point_is_skipped():
    cfg = load_config(None, ["loss.ce_weight=1.0", "loss.distill_weight=1.0", "loss.alpha=null",
                             "search={loss.distill_weight: {type: float, low: 0.5, high: 2}}"])
    points = control_points(cfg, ["mlp_32"])
    assert points == [{"loss.distill_weight": 0.0, "student": "mlp_32"}, {"loss.distill_weight": 1.0, "student": "mlp_32"}]
    assert not TrialBuilder(cfg, teacher_path="/tmp/t")(points[0]).loss.distills
    cfg = load_config(None, ["search.alpha.high=0.5"])
    assert [p["loss.alpha"] for p in control_points(cfg, ["mlp_32"])] == [0.0]  # no standard point moved to alpha=0.5
    from orchestrator.plan.search import first_trials

    assert first_trials(cfg, 8) == ("first 2 trials: each student's alpha=0 control; the T=4, alpha=0.9 standard point is skipped: "
                                    "search.alpha [0, 0.5] leaves alpha=0.9 out")
    cfg = load_config(None, ["search={lr: {type: float, low: 0.01, high: 0.1}}"])  # alpha not searched: no control, and the plan says so
    assert control_points(cfg, ["mlp_32"]) == [{"train.optimizer.lr": 0.05, "student": "mlp_32"}]
    assert first_trials(cfg, 8) == ("first 2 trials: no alpha=0 control (alpha is not searched: every search trial trains at alpha=0.9; "
                                    "the confirmation trains its finalists' controls) and the standard point (T=4, alpha=0.9)")
