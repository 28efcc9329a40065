"""From the YAML search section to Optuna distributions, seeded TPE, ASHA and the control points."""
from __future__ import annotations

import os
import pickle
import tempfile
from typing import Any, Callable

import optuna
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from orchestrator.plan import confirm
from orchestrator.plan.config import SearchParam, SweepConfig, short_name
from orchestrator.track.rows import settings_key
from orchestrator.track.store import flatten
from trainables.config import TRIAL_CONFIG, LossConfig, TrialConfig
from trainables.eval.metrics import Objective
from trainables.api import loss_defaults

#: The alpha=0 control and the standard KD point, evaluated first for every student (search keys
#: are canonical paths: an alias in the YAML was turned into its path by validation).
CONTROL_POINT = {"loss.alpha": 0.0}
STANDARD_POINT = {"loss.temperature": 4.0, "loss.alpha": 0.9}  # classification's (Task.standard_point)


def space(cfg: SweepConfig, students: list[str]) -> dict[str, optuna.distributions.BaseDistribution]:
    """Searched keys plus `student` (a one-choice categorical in per_student studies, so every trial
    config and MLflow run names its student the same way)."""
    return {**{k: p.distribution() for k, p in cfg.search.items()}, "student": optuna.distributions.CategoricalDistribution(students)}


def active(path: str, method: str) -> bool:
    """Whether a searched key applies to a trial of loss `method`: train keys and the keys every
    loss has always; a loss's own key (dkd_beta, gamma, ...) only when that loss is drawn."""
    return not path.startswith("loss.") or LossConfig.applies(path[5:], method)


class MethodSpace:
    """Optuna's define-by-run space of a method search (`loss.name` searched): the student and the
    method first, then the searched keys that apply to the drawn method, so TPE models each
    method's own parameters only from the trials that used them. Picklable (Tune saves it)."""

    def __init__(self, cfg: SweepConfig, students: list[str]) -> None:
        self.students, self.search, self.methods = list(students), dict(cfg.search), cfg.methods

    def __call__(self, trial) -> None:
        trial.suggest_categorical("student", self.students)
        method = trial.suggest_categorical("loss.name", self.methods)
        for path, p in self.search.items():
            if path != "loss.name" and active(path, method):
                p.suggest(trial, path)


def _base_value(cfg: SweepConfig, path: str) -> Any:
    """The config's value at `path`; a schedule's end not set there: its start (no movement)."""
    node: Any = cfg.model_dump()
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    parts = path.split(".")
    if node is None and parts[:2] == ["loss", "schedule"] and parts[-1] == "end":
        return _base_value(cfg, f"loss.{parts[2]}")
    return node


def _fit(p: SearchParam, value: Any) -> Any:
    """A base value moved inside the searched range (the search's first points take the config's
    values where the range holds them, its nearest end where not)."""
    if p.type == "categorical":
        return value if value in p.choices else p.choices[0]
    v = min(max(value if value is not None else p.low, p.low), p.high)
    return int(round(v)) if p.type == "int" else float(v)


def weight_key(cfg: SweepConfig) -> str:
    """The key that gives the distillation term its weight: `loss.alpha`, or `loss.distill_weight`
    in the explicit-weights form. At 0 a trial is the no-KD control."""
    return "loss.alpha" if cfg.loss.alpha is not None else "loss.distill_weight"


def outside(cfg: SweepConfig, point: dict[str, Any]) -> list[str]:
    """The keys of `point` that are not in the search space as Optuna holds it: not searched, or
    searched over a range that leaves the value out."""
    out = []
    for k, v in point.items():
        if k == "student":
            continue
        p = cfg.search.get(k)
        if p is None or not p.holds(v):
            out.append(k)
    return out


def standard_skipped(cfg: SweepConfig) -> str | None:
    """Why the task's standard point (classification: T=4, alpha=0.9) is not run, or None when it
    is: it runs only inside the searched ranges (a range is the user's statement of where to look)."""
    standard = cfg.task.standard_point
    left_out = [k for k, v in standard.items() if k in cfg.search and outside(cfg, {k: v})]
    if not left_out:
        return None
    ranges = ", ".join(f"search.{short_name(k)} [{cfg.search[k].low:g}, {cfg.search[k].high:g}]" for k in left_out)
    values = " and ".join(f"{short_name(k)}={standard[k]:g}" for k in left_out)
    point = ", ".join(f"{'T' if k == 'loss.temperature' else short_name(k)}={v:g}" for k, v in standard.items())
    return f"the {point} standard point is skipped: {ranges} leave{'s' if len(left_out) == 1 else ''} {values} out"


def control_points(cfg: SweepConfig, students: list[str]) -> list[dict[str, Any]]:
    """Per student: the no-KD control, then the task's standard point (classification: T=4,
    alpha=0.9) of each searched method.

    Evaluated before TPE proposes anything, so every leaderboard can show each student's KD gain.
    The control gives the distillation term a weight of exactly 0, whatever the searched range
    (a control moved to alpha=0.1 would be a distilled run); its other searched keys take the
    config's values, moved into their ranges. A weight that is not searched has no control in the
    search (every trial trains at the config's weight; the confirmation stage adds its finalists'
    controls). The standard point runs only where the ranges hold it (standard_skipped). A point
    outside the space is run but does not feed TPE (searcher).
    """
    points = []
    base = {k: _fit(p, _base_value(cfg, k)) for k, p in cfg.search.items()}
    # a method search: the standard point of every searched method (the control's method is the base one),
    # each method's own keys at their values in the config, else at that loss's defaults
    methods = [base.get("loss.name", cfg.loss.name), *(m for m in cfg.methods if m != base.get("loss.name", cfg.loss.name))]
    own = {m: {k: _fit(p, loss_defaults(m).get(k[5:])) for k, p in cfg.search.items()
               if k.startswith("loss.") and _base_value(cfg, k) is None and k[5:] in loss_defaults(m)} for m in methods}
    weight = weight_key(cfg)
    standard = [] if standard_skipped(cfg) else [{**cfg.task.standard_point, **own[m], "loss.name": m} for m in methods]
    for student in students:
        control = {**base, weight: 0.0} if weight in cfg.search else dict(base)  # not searched: no control (the first point is the base)
        for i, fixed in enumerate((control, *standard)):
            point = dict(base) if i else fixed
            for k, v in (fixed.items() if i else ()):
                if k in cfg.search:
                    point[k] = v
            method = point.get("loss.name", cfg.loss.name)
            point = {k: v for k, v in point.items() if active(k, method) or k == weight}
            point["student"] = student
            if point not in points:
                points.append(point)
    return points


def first_trials(cfg: SweepConfig, total: int) -> str:
    """The plan's line on the points run before TPE proposes any: exactly what they are, which of
    them lie outside the search space (run, not fed to TPE), and a skipped standard point."""
    points = control_points(cfg, cfg.students)
    weight, name = weight_key(cfg), short_name(weight_key(cfg))
    if weight in cfg.search:
        p = cfg.search[weight]
        what = f"each student's {name}=0 control" if len(cfg.students) > 1 else f"the {name}=0 control"
        if not p.holds(0.0):
            what += f" ({name}=0 exactly; search.{name} [{p.low:g}, {p.high:g}] leaves 0 out: it runs outside TPE's space and its result does not feed TPE)"
    else:
        what = (f"no {name}=0 control ({name} is not searched: every search trial trains at {name}={_base_value(cfg, weight):g}; "
                + ("the confirmation trains its finalists' controls" if cfg.budget.confirm.top else "no KD gain can be measured") + ")")
    skipped = standard_skipped(cfg)
    standard = [p for p in points if p.get(weight) != 0.0]
    if skipped is None and standard:
        t, w = standard[0].get("loss.temperature", cfg.loss.temperature), standard[0].get(weight, _base_value(cfg, weight))
        what += f" and the standard point (T={t:g}, {name}={w:g})" + (" of each searched loss" if len(cfg.methods) > 1 else "")
    line = f"first {min(len(points), total)} trials: {what}"
    return line + (f"; {skipped}" if skipped else "")


def control_point(cfg: SweepConfig, point: dict[str, Any]) -> dict[str, Any]:
    """A sampled point's no-KD control at the same settings: the distillation term's weight set to
    0, the loss's other searched keys (no effect without it: the method too) as the student's search
    control has them, so two finalists that differ only in those share one control."""
    base = control_points(cfg, [point["student"]])[0]
    out = {k: base[k] if k.startswith("loss.") and k in base else v for k, v in point.items()}
    out["loss.alpha" if cfg.loss.alpha is not None else "loss.distill_weight"] = 0.0
    return {k: v for k, v in out.items() if active(k, out.get("loss.name", cfg.loss.name))}


def objectives(cfg: SweepConfig) -> tuple[list[str], list[str]]:
    """(metrics, modes) Optuna optimizes: val_acc alone by default, or the accuracy/size front."""
    parsed = [Objective.parse(o) for o in cfg.objectives]
    return [o.key for o in parsed], ["max" if o.maximize else "min" for o in parsed]


def searcher(cfg: SweepConfig, students: list[str]) -> Searcher:
    """Seeded TPE. Trials ASHA stops reach Optuna as COMPLETE with their truncated val_acc: a lower
    bound from a trial that ranked in the bottom of its rung, which is the signal TPE should learn.

    The first points (control_points) inside the search space are Optuna's points to evaluate, so
    TPE learns from them as from its own; those outside it (an alpha=0 control when search.alpha
    starts above 0, or when alpha is not searched) are handed out first by OutsideFirst and never
    reach TPE, whose model covers the searched ranges only: a control's low score at alpha=0 would
    be read as a score at the range's lower end, steering TPE away from it for a reason that
    does not hold there."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # Tune's study lives in memory; kdsweep exports it (study.py)
    metrics, modes = objectives(cfg)
    points = control_points(cfg, students)
    tpe = OptunaSearch(
        space=MethodSpace(cfg, students) if "loss.name" in cfg.search else space(cfg, students),
        metric=metrics if len(metrics) > 1 else metrics[0], mode=modes if len(modes) > 1 else modes[0],
        points_to_evaluate=[p for p in points if not outside(cfg, p)] or None,
        sampler=optuna.samplers.TPESampler(seed=cfg.seed),
    )
    fixed = [p for p in points if outside(cfg, p)]
    return OutsideFirst(tpe, fixed) if fixed else tpe


class OutsideFirst(Searcher):
    """Hands out `points` first, then the inner searcher's; results of its own points never reach
    the inner searcher (they lie outside its space). Picklable; Tune saves and restores it whole."""

    def __init__(self, inner: Searcher, points: list[dict[str, Any]]) -> None:
        super().__init__(metric=inner.metric, mode=inner.mode)
        self.inner, self.queue, self.mine = inner, [dict(p) for p in points], set()

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.inner.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str):
        if self.queue:
            self.mine.add(trial_id)
            return self.queue.pop(0)
        return self.inner.suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self.mine:
            self.inner.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self.mine:
            self.inner.on_trial_complete(trial_id, result=result, error=error)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__.copy(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


def is_control(config: dict[str, Any]) -> bool:
    """Whether a Tune trial's config is a no-KD control (its resolved trial config says alpha=0)."""
    trial = config.get(TRIAL_CONFIG)
    return trial is not None and not trial.loss.distills


class ControlKeepingASHA(ASHAScheduler):
    """ASHA that never stops an alpha=0 control: a KD gain is only honest against a control trained
    for the same number of epochs; nor a confirmation trial, which exists to run every epoch again
    (and stays out of the rungs). Everything else is plain ASHA."""

    def on_trial_result(self, tune_controller, trial, result):
        if confirm.CONFIRM in trial.config:
            return TrialScheduler.CONTINUE
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP and is_control(trial.config):
            return TrialScheduler.CONTINUE
        return decision


def scheduler(cfg: SweepConfig) -> ASHAScheduler:
    primary = cfg.primary  # ASHA's: the first objective, a val_ metric every epoch reports, with its direction
    return ControlKeepingASHA(time_attr="epoch", metric=primary.key, mode="max" if primary.maximize else "min", max_t=cfg.train.epochs, grace_period=min(cfg.budget.grace_period, cfg.train.epochs),
                         reduction_factor=cfg.budget.reduction_factor)


def trial_budget(cfg: SweepConfig) -> list[tuple[str, list[str], int]]:
    """(study name, students, num_samples): one study in joint mode, one per student otherwise.

    per_student splits `budget.num_samples` evenly (the first students take any remainder), so
    every student gets its own search and its own share of the budget. All studies run in one Tune
    run either way (PerStudentSearch), so no student's trials wait for another's to finish.
    """
    if cfg.mode == "joint":
        return [("joint", list(cfg.students), cfg.budget.num_samples)]
    n, k = cfg.budget.num_samples, len(cfg.students)
    return [(s, [s], n // k + (1 if i < n % k else 0)) for i, s in enumerate(cfg.students)]


class PerStudentSearch(Searcher):
    """per_student mode in one Tune run: one seeded Optuna study per student, each with its own
    control points and its share of the budget, handing out trials round robin among the students
    with budget left. While one student's last trials finish, the others' keep the cluster busy
    (a loop of Tuner.fit() per student would leave it idle). Saved and restored whole by Tune."""

    def __init__(self, cfg: SweepConfig) -> None:
        metrics, modes = objectives(cfg)
        super().__init__(metric=metrics if len(metrics) > 1 else metrics[0], mode=modes if len(modes) > 1 else modes[0])
        self.quota = {study: n for study, _, n in trial_budget(cfg)}
        self.studies = {study: searcher(cfg, students) for study, students, _ in trial_budget(cfg)}
        self.issued = {study: 0 for study in self.studies}
        self.owner: dict[str, str] = {}
        self.turn = 0

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return all(s.set_search_properties(metric, mode, config, **spec) for s in self.studies.values())

    def suggest(self, trial_id: str):
        order = list(self.studies)
        for i in range(len(order)):
            study = order[(self.turn + i) % len(order)]
            if self.issued[study] >= self.quota[study]:
                continue
            config = self.studies[study].suggest(trial_id)
            if config is None or config == Searcher.FINISHED:
                continue
            self.turn = (self.turn + i + 1) % len(order)
            self.issued[study] += 1
            self.owner[trial_id] = study
            return config
        return Searcher.FINISHED

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.owner:
            self.studies[self.owner[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.owner:
            self.studies[self.owner[trial_id]].on_trial_complete(trial_id, result=result, error=error)

    def save(self, checkpoint_path: str) -> None:
        """Tune's searcher checkpoint (a file in its experiment folder, read back only by Tune's
        restore in this driver): the shares, the owners and every study, as OptunaSearch saves its own."""
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__.copy(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


class PerStudentScheduler(FIFOScheduler):
    """One ASHA (ControlKeepingASHA) per student: a trial is stopped only against its own
    student's trials at the same rung, never because another architecture learns faster."""

    def __init__(self, cfg: SweepConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.by_student: dict[str, ASHAScheduler] = {}

    def _asha(self, trial) -> ASHAScheduler:
        student = trial.config.get("student")
        if student not in self.by_student:
            self.by_student[student] = scheduler(self.cfg)
        return self.by_student[student]

    def on_trial_add(self, tune_controller, trial) -> None:
        self._asha(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result) -> str:
        return self._asha(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result) -> None:
        self._asha(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_error(self, tune_controller, trial) -> None:
        self._asha(trial).on_trial_error(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._asha(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "; ".join(f"{s}: {a.debug_string()}" for s, a in self.by_student.items())


class TrialBuilder:
    """A sampled point -> its student's full trial config, built and validated once, on the driver
    (picklable: Tune saves it with the searcher, and a resumed sweep builds with it)."""

    def __init__(self, cfg: SweepConfig, **fixed: Any) -> None:
        self.cfg, self.fixed = cfg, fixed  # teacher_path, teacher_cache, profile: the same for every trial

    def __call__(self, point: dict[str, Any]) -> TrialConfig:
        return self.cfg.trial(point["student"], {k: v for k, v in point.items() if k != "student"}, **self.fixed)


class ResolvedSearch(Searcher):
    """Tune's searcher, with each suggested point handed out together with the trial config it
    resolves to (under TRIAL_CONFIG): the trial trains with that object, and the driver's
    callbacks (MLflow, console, ASHA's control rule) read the same object. Nothing rebuilds it.

    It hands out `search_trials` points of the inner searcher, then, once every one of them has
    ended, the confirmation stage's trials (orchestrator.plan.confirm), and then says FINISHED. `inner`
    None: the stage alone (`kdsweep best --confirm-seeds`, over a finished search's `done`)."""

    def __init__(self, inner: Searcher | None, build: Callable[[dict[str, Any]], TrialConfig], search_trials: int,
                 stage: "ConfirmStage | None" = None) -> None:
        primary = stage.cfg.primary if stage else None
        super().__init__(metric=inner.metric if inner else primary.key, mode=inner.mode if inner else "max" if primary.maximize else "min")
        self.inner, self.build, self.stage = inner, build, stage
        self.search_trials, self.issued = search_trials, 0
        self.trials: dict[str, tuple[dict[str, Any], TrialConfig, dict[str, Any] | None]] = {}
        self.running: set[str] = set()  # search trials not ended yet

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.inner.set_search_properties(metric, mode, config, **spec) if self.inner else True

    def suggest(self, trial_id: str):
        if self.issued < self.search_trials:
            point = self.inner.suggest(trial_id)
            if point == Searcher.FINISHED:  # the inner search ended early (per-student quotas)
                self.search_trials = self.issued
            elif not isinstance(point, dict):  # None: ask again later
                return point
            else:
                self.issued += 1
                self.running.add(trial_id)
                return self._hand_out(trial_id, point, None)
        if self.stage is None:
            return Searcher.FINISHED
        if self.running:  # the finalists are known once every search trial has ended
            return None
        item = self.stage.next()
        return Searcher.FINISHED if item is None else self._hand_out(trial_id, *item)

    def _hand_out(self, trial_id: str, point: dict[str, Any], meta: dict[str, Any] | None) -> dict[str, Any]:
        trial = self.build(point)
        self.trials[trial_id] = (point, trial, meta)
        return {**point, TRIAL_CONFIG: trial, **({confirm.CONFIRM: meta} if meta else {})}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.inner and trial_id in self.running:
            self.inner.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.running:
            self.running.discard(trial_id)
            self.inner.on_trial_complete(trial_id, result=result, error=error)
        if self.stage is not None and trial_id in self.trials:
            point, trial, meta = self.trials[trial_id]
            status = "failed" if error or not result else str(result.get("status", "failed"))
            self.stage.record(done(trial_id, point, trial, "stopped" if status == "running" else status, result or {}, meta))

    def save(self, checkpoint_path: str) -> None:
        """Tune's searcher checkpoint (read back only by Tune's restore in this driver): the inner
        searcher's own checkpoint, and where the search and its confirmation stand."""
        inner = b""
        if self.inner:
            with tempfile.TemporaryDirectory() as d:
                self.inner.save(os.path.join(d, "inner"))
                with open(os.path.join(d, "inner"), "rb") as f:
                    inner = f.read()
        state = {k: v for k, v in self.__dict__.items() if k not in ("inner", "build")}
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"kdsweep_search": 2, "inner": inner, "state": state}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            saved = pickle.load(f)
        if saved["inner"] and self.inner:
            with tempfile.TemporaryDirectory() as d:
                with open(os.path.join(d, "inner"), "wb") as f:
                    f.write(saved["inner"])
                self.inner.restore(os.path.join(d, "inner"))
        self.__dict__.update(saved["state"])


def done(trial_id: str, point: dict[str, Any], trial: TrialConfig, status: str, metrics: dict[str, Any],
         meta: dict[str, Any] | None) -> confirm.Done:
    """An ended trial as the confirmation stage reads it."""
    return confirm.Done(trial_id, point, settings_key(flatten(trial.model_dump(mode="json"), "trial.")), trial.seed,
                        not trial.loss.distills, status, confirm.numbers(metrics), (meta or {}).get("of"))


class ConfirmStage:
    """The trials the searcher hands out after the search (orchestrator.plan.confirm.plan), planned
    once every search trial has ended, from the ended trials it has recorded."""

    def __init__(self, cfg: SweepConfig, top: int, seeds: int, ended: list[confirm.Done] | None = None) -> None:
        self.cfg, self.top, self.seeds = cfg, top, seeds
        self.ended: list[confirm.Done] = list(ended or [])
        self.queue: list[tuple[dict[str, Any], dict[str, Any]]] | None = None

    def record(self, d: confirm.Done) -> None:
        self.ended.append(d)

    def planned(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """The stage's trials not handed out yet (planned on the first call)."""
        if self.queue is None:
            objs = [Objective.parse(o) for o in self.cfg.objectives]
            self.queue = confirm.plan(self.ended, objs, self.top, self.seeds, lambda p: control_point(self.cfg, p))
        return self.queue

    def next(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        queue = self.planned()
        return queue.pop(0) if queue else None


def point_of(config: dict[str, Any]) -> dict[str, Any]:
    """A Tune trial's sampled point alone (student, searched paths, a confirmation's seed),
    without its trial config or what it confirms."""
    return {k: v for k, v in config.items() if k not in (TRIAL_CONFIG, confirm.CONFIRM)}
