"""The confirmation stage without Ray: what it plans, the statistics it reports, the searcher that
hands it out (and survives a driver restart), and the champion it crowns."""
from __future__ import annotations

import pytest
from ray.tune.search import Searcher

from orchestrator.plan import confirm
from orchestrator.plan.config import load_config
from orchestrator.track.rows import TrialRow, settings_key
from orchestrator.plan.search import ConfirmStage, ResolvedSearch, TrialBuilder, control_point, done
from orchestrator.select.selection import choose
from orchestrator.track.store import SweepTracker, flatten
from trainables.config import TRIAL_CONFIG
from trainables.eval.metrics import Objective

VAL = [Objective.parse("val_acc")]


def cfg_(*sets):
    return load_config(None, ["teacher.path=/tmp/t", *sets])


def ended(cfg, trial_id, point, val, status="finished", of=None, **metrics):
    """A Done as the searcher records it, from the trial config the driver would build."""
    trial = TrialBuilder(cfg, teacher_path="/tmp/t")(point)
    return done(trial_id, point, trial, status, {"val_acc": val, **metrics}, {"of": of} if of else None)


def test_plan_confirms_the_top_finalists_on_fresh_seeds_beside_controls_at_the_same_settings():
    cfg = cfg_()
    kd = {"student": "cnn_tiny", "loss.temperature": 2.0, "loss.alpha": 0.5, "train.optimizer.lr": 0.1}
    searched_control = {"student": "cnn_tiny", "loss.temperature": 4.0, "loss.alpha": 0.0, "train.optimizer.lr": 0.1}
    other = {"student": "mlp_32", "loss.temperature": 3.0, "loss.alpha": 0.7, "train.optimizer.lr": 0.05}
    runs = [ended(cfg, "a", kd, 0.95), ended(cfg, "b", searched_control, 0.90), ended(cfg, "c", other, 0.93),
            ended(cfg, "d", {**other, "loss.alpha": 0.9}, 0.99, status="stopped")]  # stopped: never a finalist
    todo = confirm.plan(runs, VAL, 2, 3, lambda p: control_point(cfg, p))
    mine = [(p["seed"], m["control"], p["loss.alpha"]) for p, m in todo if m["of"] == "a"]
    # seeds 1 and 2 with KD; controls at seeds 1 and 2 only: the search's control at lr 0.1, seed 0, is reused
    assert mine == [(1, False, 0.5), (2, False, 0.5), (1, True, 0.0), (2, True, 0.0)]
    control = next(p for p, m in todo if m["of"] == "a" and m["control"])
    assert control["loss.temperature"] == searched_control["loss.temperature"] and control["train.optimizer.lr"] == 0.1
    assert sorted((p["seed"], m["control"]) for p, m in todo if m["of"] == "c") == [(0, True), (1, False), (1, True), (2, False), (2, True)]
    assert len(todo) <= confirm.cap(2, 3)
    # planned again after those ran: nothing left; with 4 seeds: one more seed per finalist, and its control
    runs += [ended(cfg, f"x{i}", p, 0.9, of=m["of"]) for i, (p, m) in enumerate(todo)]
    assert confirm.plan(runs, VAL, 2, 3, lambda p: control_point(cfg, p)) == []
    more = confirm.plan(runs, VAL, 2, 4, lambda p: control_point(cfg, p))
    assert sorted((m["of"], p["seed"], m["control"]) for p, m in more) == [("a", 3, False), ("a", 3, True), ("c", 3, False), ("c", 3, True)]


def test_finalists_put_the_pareto_front_first_and_a_control_finalist_needs_no_other_control():
    cfg = cfg_("search.objectives=[val_acc:max, size_params:min]")
    objs = [Objective.parse(o) for o in cfg.objectives]
    big = ended(cfg, "big", {"student": "cnn_tiny", "loss.alpha": 0.0}, 0.96, size_params=5000.0)
    small = ended(cfg, "small", {"student": "mlp_32", "loss.alpha": 0.5}, 0.90, size_params=100.0)
    middle = ended(cfg, "mid", {"student": "mlp_32", "loss.alpha": 0.9}, 0.93, size_params=6000.0)  # beaten by big on both
    assert [d.trial_id for d in confirm.finalists([middle, small, big], objs, 3)] == ["big", "small", "mid"]
    todo = confirm.plan([big], objs, 1, 3, lambda p: control_point(cfg, p))
    assert [(p["seed"], m["control"]) for p, m in todo] == [(1, True), (2, True)]


def test_two_finalists_that_differ_only_in_loss_keys_share_one_control():
    cfg = cfg_()
    a = ended(cfg, "a", {"student": "mlp_32", "loss.temperature": 2.0, "loss.alpha": 0.5, "train.optimizer.lr": 0.1}, 0.95)
    b = ended(cfg, "b", {"student": "mlp_32", "loss.temperature": 8.0, "loss.alpha": 0.8, "train.optimizer.lr": 0.1}, 0.94)
    todo = confirm.plan([a, b], VAL, 2, 2, lambda p: control_point(cfg, p))
    assert sorted((m["of"], p["seed"], m["control"]) for p, m in todo) == [("a", 0, True), ("a", 1, False), ("a", 1, True), ("b", 1, False)]


def test_paired_gain_is_the_paired_t_interval():
    from scipy import stats

    kd, control = [0.95, 0.97, 0.96, 0.99], [0.94, 0.95, 0.96, 0.955]
    mean, half, n = confirm.paired([k - c for k, c in zip(kd, control)])
    ci = stats.ttest_rel(kd, control).confidence_interval(0.95)
    assert n == 4 and mean == pytest.approx((ci.low + ci.high) / 2) and half == pytest.approx((ci.high - ci.low) / 2)
    assert confirm.paired([0.01]) == (0.01, None, 1) and confirm.paired([]) == (None, None, 0)


def row(trial_id, student, seed, val, control=False, confirms=None, status="finished", lr=0.05, epochs=3, kd_gain=None, **metrics):
    flat = flatten({"student": student, "seed": seed, "train": {"optimizer": {"lr": lr}, "epochs": 3}}, "trial.")
    return TrialRow(f"run-{trial_id}", trial_id, status, student, "kd", seed, settings_key(flat), control, 4.0, 0.0 if control else 0.9, lr,
                    epochs, {"final_val_acc": val, "size_params": 100.0, **metrics}, confirms, kd_gain=kd_gain)


def test_selection_crowns_the_best_mean_not_the_lucky_seed_and_reports_diverged_runs():
    rows = [
        row("lucky", "lottery", 0, 0.99), row("l1", "lottery", 1, 0.60, confirms="lucky"), row("l2", "lottery", 2, 0.61, confirms="lucky"),
        row("lc0", "lottery", 0, 0.58, control=True, confirms="lucky"), row("lc1", "lottery", 1, 0.59, control=True, confirms="lucky"),
        row("lc2", "lottery", 2, 0.60, control=True, confirms="lucky"),
        row("steady", "steady", 0, 0.90), row("s1", "steady", 1, 0.91, confirms="steady"),
        row("s2", "steady", 2, float("nan"), confirms="steady", status="diverged"),
        row("sc0", "steady", 0, 0.88, control=True), row("sc1", "steady", 1, 0.88, control=True, confirms="steady"),
        row("sc2", "steady", 2, 0.89, control=True, confirms="steady"),
    ]
    confirmed = confirm.confirmations(rows, VAL[0])
    assert [c.finalist.trial_id for c in confirmed] == ["lucky", "steady"]
    lottery, steady = confirmed
    assert lottery.mean() == pytest.approx((0.99 + 0.60 + 0.61) / 3) and sorted(steady.kd) == [0, 1]
    assert steady.excluded == [(2, "kd", "diverged")]  # reported, not averaged
    assert steady.gain()[2] == 2 and steady.gain()[0] == pytest.approx(((0.90 - 0.88) + (0.91 - 0.88)) / 2)
    assert "2 seeds" in steady.verdict() and "3 seeds" in lottery.verdict()
    best = choose([confirm.mean_row(c) for c in confirmed], VAL[0]).confirmed
    assert best is steady and best.best_run().trial_id == "s1"  # the registered seed: the best of its seeds on val
    assert confirm.mean_row(steady).val_acc == pytest.approx((0.90 + 0.91) / 2)  # the objective reads the mean over seeds
    assert choose([r for r in rows if not r.confirms], VAL[0]).trial_id == "lucky"  # what a single-seed search would crown
    text = confirm.table(confirmed)
    assert "| lucky | lottery |" in text and "seed 2 kd diverged" in text


def test_the_searcher_hands_out_the_stage_after_the_search_and_restores_mid_stage(tmp_path):
    cfg = cfg_("search={}", "budget.confirm={top: 1, seeds: 3}")

    class Two(Searcher):  # an inner search of two points
        def __init__(self):
            super().__init__(metric="val_acc", mode="max")
            self.points = [{"student": "mlp_32"}, {"student": "cnn_tiny"}]

        def suggest(self, trial_id):
            return self.points.pop(0) if self.points else None

        def on_trial_complete(self, trial_id, result=None, error=False):
            pass

        def save(self, path):
            open(path, "w").write(repr(self.points))

        def restore(self, path):
            self.points = eval(open(path).read())

    build = TrialBuilder(cfg, teacher_path="/tmp/t")
    search = ResolvedSearch(Two(), build, 2, ConfirmStage(cfg, 1, 3))
    a, b = search.suggest("a"), search.suggest("b")
    assert a[TRIAL_CONFIG].student == "mlp_32" and b[TRIAL_CONFIG].student == "cnn_tiny" and confirm.CONFIRM not in a
    search.on_trial_complete("a", {"val_acc": 0.9, "status": "finished", "epoch": 12})
    assert search.suggest("c") is None  # b still runs: the finalists are not known yet
    search.on_trial_complete("b", {"val_acc": 0.95, "status": "finished", "epoch": 12})
    first = search.suggest("c")
    assert first["seed"] == 1 and first[confirm.CONFIRM] == {"of": "b", "control": False} and first[TRIAL_CONFIG].seed == 1
    search.save(str(tmp_path / "state"))

    again = ResolvedSearch(Two(), build, 2, ConfirmStage(cfg, 1, 3))
    again.restore(str(tmp_path / "state"))
    rest = []
    while isinstance(c := again.suggest(f"t{len(rest)}"), dict):
        rest.append(c)
    assert c == Searcher.FINISHED
    assert [(c["seed"], c[confirm.CONFIRM]["control"]) for c in rest] == [(2, False), (0, True), (1, True), (2, True)]
    assert all(not c[TRIAL_CONFIG].loss.distills for c in rest[1:]) and rest[0][TRIAL_CONFIG].loss.distills


def test_gains_compare_equal_budgets_and_a_stopped_trial_says_where_it_stopped():
    """The embedded default's old report showed a 4-epoch ASHA-stopped trial (val 0.934, below the
    control's 0.962) with a positive gain "at the same epoch": the finished trial that beat its
    control is the one to show, and a stopped trial's gain is labelled with its epoch."""
    from orchestrator.select.report import kd_gains
    from orchestrator.select.selection import format_table

    rows = [row("c", "cnn_tiny", 0, 0.962, control=True, epochs=12, kd_gain=0.0),
            row("stopped", "cnn_tiny", 0, 0.934, status="stopped", epochs=4, kd_gain=0.010),
            row("finished", "cnn_tiny", 0, 0.965, epochs=12, kd_gain=0.003)]
    (gain,) = kd_gains(rows, Objective("val_acc", True))
    assert gain[:4] == ["cnn_tiny", 0.962, 0.965, 12] and gain[5:7] == [0.003, "final (both finished)"]
    (only,) = kd_gains([rows[0], rows[1]], Objective("val_acc", True))
    assert only[2:4] == [0.934, 4] and only[6] == "epoch 4 (KD trial stopped there)"
    table = format_table(rows, "leaderboard")
    assert "+0.0100@4" in table and "+0.0030 " in table + " " and "+0.0030@" not in table


def _run(trial_id, seed, metrics, control=False, status="finished"):
    """An MLflow run as selection.leaderboard reads it (params, tags, latest metrics)."""
    from types import SimpleNamespace

    from orchestrator.track.store import Tag

    params = {"student": "mlp_32", "seed": str(seed), "control": str(control), "trial.seed": str(seed), "trial.student": "mlp_32",
              "trial.train.optimizer.lr": "0.05", "trial.loss.alpha": "0.0" if control else "0.9", "trial.loss.temperature": "4.0"}
    tags = {Tag.TRIAL: trial_id, Tag.STATUS: status}
    return SimpleNamespace(info=SimpleNamespace(run_id=f"run-{trial_id}"), data=SimpleNamespace(params=params, tags=tags, metrics=metrics))


def test_a_minimised_objective_runs_asha_the_gain_and_the_verdict_the_right_way_round(tmp_path):
    """With val_loss:min first (as a language model's perplexity will be), lower is better
    everywhere the objective is read: ASHA's mode, Optuna's, the leaderboard's order and KD gain,
    the confirmation's gain, verdict and registered seed, and the report's tables, plot and
    Optuna's plots, which name it."""
    from types import SimpleNamespace

    from orchestrator.plan.search import scheduler, searcher
    from orchestrator.select.selection import leaderboard

    cfg = cfg_("search.objectives=[val_loss:min]")
    assert cfg.primary == Objective("val_loss", False) and cfg_().primary == Objective("val_acc", True)  # the task's default
    asha = scheduler(cfg)
    assert (asha._metric, asha._mode) == ("val_loss", "min")
    tpe = searcher(cfg, cfg.students)
    assert (tpe.metric, tpe.mode) == ("val_loss", "min")
    resolved = ResolvedSearch(None, TrialBuilder(cfg, teacher_path="/tmp/t"), 0, ConfirmStage(cfg, 1, 2, []))
    assert (resolved.metric, resolved.mode) == ("val_loss", "min")

    # the leaderboard: KD at 0.30 against its control's 0.40 at the same epoch is a gain of +0.10; best (lowest) first
    runs = [_run("kd", 0, {"val_loss": 0.30, "val_acc": 0.80, "epochs_run": 2.0}),
            _run("worse", 0, {"val_loss": 0.45, "val_acc": 0.85, "epochs_run": 2.0}),
            _run("ctrl", 0, {"val_loss": 0.40, "val_acc": 0.82, "epochs_run": 2.0}, control=True)]
    history = {"run-ctrl": [SimpleNamespace(step=1, value=0.9), SimpleNamespace(step=2, value=0.40)]}
    tracker = SweepTracker.__new__(SweepTracker)
    tracker.trial_runs = lambda parent: runs
    tracker.client = SimpleNamespace(get_metric_history=lambda run_id, key: history[run_id] if key == "val_loss" else [])
    rows = leaderboard(tracker, "parent", cfg.primary)
    assert [r.trial_id for r in rows] == ["kd", "ctrl", "worse"]
    assert [(r.control, r.alpha, r.temperature, r.lr) for r in rows] == [(False, 0.9, 4.0, 0.05), (True, 0.0, 4.0, 0.05), (False, 0.9, 4.0, 0.05)]
    gains = {r.trial_id: r.kd_gain for r in rows}
    assert gains["kd"] == pytest.approx(0.10) and gains["worse"] == pytest.approx(-0.05)

    # confirmation: lower val_loss than the controls on both seeds holds; the registered seed is the lowest
    def r(trial_id, seed, loss, control=False, confirms=None):
        return row(trial_id, "mlp_32", seed, 0.8, control=control, confirms=confirms, val_loss=loss)

    rows = [r("f", 0, 0.30), r("f1", 1, 0.28, confirms="f"), r("c0", 0, 0.40, control=True), r("c1", 1, 0.37, control=True, confirms="f")]
    (c,) = confirm.confirmations(rows, cfg.primary)
    mean, half, n = c.gain()
    assert n == 2 and mean == pytest.approx(((0.40 - 0.30) + (0.37 - 0.28)) / 2)
    assert c.verdict().startswith("KD gain +0.0950 +- ") and "val_loss down" in c.verdict() and c.verdict().endswith("holds")
    assert c.best_run().trial_id == "f1"
    assert "| val loss (KD) | val loss (alpha=0 control) |" in confirm.table([c])

    # the report: each student's gain and each method's best read val_loss, lowest best
    from orchestrator.select.report import kd_gains, pareto_plot
    from orchestrator.select.selection import gains_by_method, gains_by_method_header

    rows = [r("k1", 0, 0.30), r("k2", 0, 0.25), r("c", 0, 0.40, control=True)]
    for x, gain in zip(rows, (0.10, 0.15, 0.0)):
        x.kd_gain = gain
    (g,) = kd_gains(rows, cfg.primary)
    assert g[1:3] == [0.40, 0.25] and g[5] == 0.15  # the control's val_loss, the best KD trial's (k2), its gain
    assert gains_by_method(rows, cfg.primary) == [["kd", "mlp_32", 2, 0.25, 0.15, pytest.approx(0.125)]]
    assert gains_by_method_header(cfg.primary)[3] == "best val loss"
    import matplotlib.pyplot as plt

    drawn = {}
    real = plt.Axes.set_ylabel
    plt.Axes.set_ylabel = lambda ax, text, *a, **k: drawn.setdefault("y", text) and real(ax, text, *a, **k)
    try:
        pareto_plot(rows, tmp_path / "pareto.png", cfg.primary)
    finally:
        plt.Axes.set_ylabel = real
    assert drawn["y"] == "val loss (lower is better)" and (tmp_path / "pareto.png").stat().st_size > 0


def test_optuna_plots_name_the_sweeps_objective(tmp_path, monkeypatch):
    """The study carries its objectives' names (export_study); every plot's axis takes the first,
    and a multi-objective Pareto front all of them (Optuna would say "Objective Value")."""
    import optuna
    import optuna.visualization.matplotlib as vis

    from orchestrator.track.study import plot_study

    seen = {}
    for fn in ("plot_optimization_history", "plot_slice", "plot_pareto_front"):
        real = getattr(vis, fn)
        monkeypatch.setattr(vis, fn, lambda study, _fn=fn, _real=real, **kw: seen.setdefault(_fn, kw) and _real(study, **kw))
    for directions, names in ((["minimize"], ["val_loss"]), (["minimize", "minimize"], ["val_loss", "size_params"])):
        seen.clear()
        study = optuna.create_study(directions=directions)
        study.set_user_attr("objectives", names)
        for i in range(3):
            study.add_trial(optuna.trial.create_trial(params={"x": float(i)}, distributions={"x": optuna.distributions.FloatDistribution(0, 3)},
                                                      values=[1.0 / (i + 1), float(i)][: len(names)]))
        assert plot_study(study, tmp_path / str(len(names)))
        assert seen["plot_optimization_history"]["target_name"] == "val_loss" and seen["plot_slice"]["target_name"] == "val_loss"
        assert len(names) == 1 or seen["plot_pareto_front"] == {"target_names": names}
