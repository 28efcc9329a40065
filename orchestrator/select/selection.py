"""Choose the best student: leaderboard, KD gain over each student's alpha=0 control, Pareto front
over any logged metrics, a constrained winner tested once on the test split (beside the teacher's
own numbers) and registered as `champion`."""
from __future__ import annotations

import json
import logging
import math
import tempfile
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from orchestrator.plan import confirm
from orchestrator.plan.config import SweepConfig
from orchestrator.track.rows import TrialRow
from orchestrator.track.store import LATENCY_RECORD, SweepTracker, Tag
from trainables.api import STUDENT_CARD, Normalized, evaluate_on_split, load_student as from_folder, load_teacher_models, load_tokenizer
from trainables.eval.metrics import DEFAULT_OBJECTIVES, LEADERBOARD, Objective, metric
from trainables.registry import ConfigError

log = logging.getLogger(__name__)

USABLE = ("finished", "stopped")  # trials with a meaningful val_acc (stopped: truncated by ASHA)
#: Only trials that ran every epoch compete on the Pareto front and for champion.
COMPLETE = ("finished",)


def parse_bounds(pairs: list[str], flag: str) -> dict[str, float]:
    out = {}
    for p in pairs:
        name, sep, value = p.partition("=")
        try:
            out[metric(name).name] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ConfigError(f"`{flag}` takes METRIC=NUMBER (e.g. {flag} robust_acc=0.8), but got {p!r}")
    return out


def leaderboard(tracker: SweepTracker, parent_id: str, primary: Objective) -> list[TrialRow]:
    """One row per trial (confirmation trials included, marked by `confirms`), with its KD gain over
    the alpha=0 control at the same settings and seed (else its student's control from the search),
    both at the trial's last epoch, in `primary` (the sweep's first objective): positive is better
    whichever its direction. Best first."""
    rows = tracker.trial_rows(parent_id)
    key, sign = primary.key, 1.0 if primary.maximize else -1.0
    # KD gain compares like with like: against the control's value at the trial's own last epoch,
    # so a trial ASHA stopped early is not charged for the epochs it never ran (tables mark it).
    same: dict[tuple, TrialRow] = {}
    search: dict[tuple[str, int], TrialRow] = {}
    for row in rows:
        if row.control and row.status in USABLE:
            same.setdefault(row.settings, row)
            if not row.confirms:
                search.setdefault((row.student, row.seed), row)
    histories: dict[str, dict[int, float]] = {}
    for row in rows:
        c = same.get(row.settings) or search.get((row.student, row.seed))
        if c is not None and c.run_id not in histories:
            histories[c.run_id] = tracker.metric_history(c.run_id, key)
        at = histories[c.run_id].get(row.epochs) if c is not None and row.epochs else None
        row.kd_gain = None if at is None or row.value(key) is None else sign * (row.value(key) - at)

    def rank(r: TrialRow) -> tuple[bool, float]:
        v = r.value(key)
        return r.status in USABLE, -math.inf if v is None else sign * v

    return sorted(rows, key=rank, reverse=True)


def gains_by_method(rows: list[TrialRow], primary: Objective) -> list[list[Any]]:
    """Per loss and student, over the search's finished KD trials: how many, the best value of the
    primary objective (its direction), and the KD gain (best and mean) over the control at the same epoch."""
    out = []
    done = [r for r in rows if not r.confirms and not r.control and r.status in COMPLETE]
    best = max if primary.maximize else min
    for loss, student in sorted({(r.loss, r.student) for r in done}):
        mine = [r for r in done if (r.loss, r.student) == (loss, student)]
        gains = [r.kd_gain for r in mine if r.kd_gain is not None]
        out.append([loss, student, len(mine), best((r.value(primary.key) for r in mine if r.value(primary.key) is not None), default=None),
                    max(gains, default=None), sum(gains) / len(gains) if gains else None])
    return out


def gains_by_method_header(primary: Objective) -> list[str]:
    return ["loss", "student", "finished KD trials", f"best {primary.label}", "best KD gain", "mean KD gain"]


def ended_trials(tracker: SweepTracker, parent_id: str, primary: Objective) -> list[confirm.Done]:
    """A sweep's ended trials as the confirmation stage reads them (`kdsweep best --confirm-seeds`)."""
    rows = leaderboard(tracker, parent_id, primary)
    if any(r.point is None for r in rows):
        raise ConfigError("`--confirm-seeds` needs each trial's sampled point, which runs logged by an older kdsweep lack: "
                          "start a new sweep (--set name=NEW)")
    return [confirm.Done(r.trial_id, r.point, r.settings, r.seed, r.control, r.status, r.numbers(), r.confirms) for r in rows]


def pareto_front(rows: list[TrialRow], objectives: list[Objective]) -> list[TrialRow]:
    """Finished rows that no other row beats on every objective (and strictly on one)."""
    cands = [r for r in rows if r.status in COMPLETE and all(r.value(o.key) is not None for o in objectives)]
    return confirm.pareto(cands, objectives, TrialRow.value)


def choose(rows: list[TrialRow], objective: Objective, minimum: dict[str, float] | None = None,
           maximum: dict[str, float] | None = None) -> TrialRow:
    """The best finished row on `objective` meeting every bound (a missing metric fails)."""
    minimum, maximum = minimum or {}, maximum or {}
    ok = [r for r in rows if r.status in COMPLETE and r.value(objective.key) is not None
          and all(r.value(k) is not None and r.value(k) >= v for k, v in minimum.items())
          and all(r.value(k) is not None and r.value(k) <= v for k, v in maximum.items())]
    if not ok:
        raise ConfigError(f"no finished trial meets --min {minimum} --max {maximum}: relax the constraints")
    return max(ok, key=lambda r: (r.value(objective.key) if objective.maximize else -r.value(objective.key), -(r.value("size_params") or 0)))


def load_student(tracker: SweepTracker, run_id: str) -> "Normalized":
    """A trial's student as logged (its `student/` folder), its own input statistics built in: raw
    inputs in, logits out. A card without them is an error naming the run's file."""
    with tempfile.TemporaryDirectory() as d:
        model, _ = from_folder(tracker.download(run_id, "student", d), shown_as=f"runs:/{run_id}/student/{STUDENT_CARD}")
    return model


def register(tracker: SweepTracker, cfg: SweepConfig, run_id: str, model: Normalized, splits, student: str) -> int:
    """Log the winner as an MLflow model (as its task serves it: Task.serving), register it, point
    alias `champion` at it. A champion that is already this run's registered model is kept: no new version."""
    current = tracker.registered_run(cfg.registered_model)
    if current is not None and current[0] == run_id:
        return current[1]
    version = REGISTER[cfg.task.serving](tracker, cfg, run_id, model, splits, student)
    tracker.point_alias(cfg.registered_model, version)
    return version


def _register_tensors(tracker: SweepTracker, cfg: SweepConfig, run_id: str, model: Normalized, splits, student: str) -> int:
    """A champion that takes its split's tensors as they are (raw pixels, waveforms) as an MLflow
    PyTorch model."""
    import mlflow.pytorch
    import numpy as np

    example = splits.val_x[:2].float().numpy().astype(np.float32)
    described = cfg.task.input_description(splits.input_shape, cfg.student_kwargs(student))
    with tracker.active(run_id):
        # The model is saved as a torch.export program (MLflow's default): it needs torch alone. Named
        # here, MLflow does not infer requirements by loading the model in a subprocess (5 s on CPU).
        info = mlflow.pytorch.log_model(model, name="model", input_example=example, registered_model_name=cfg.registered_model,
                                        pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
                                        metadata={"classes": list(splits.classes), "input": described})
    return int(info.registered_model_version)


def _register_tokens(tracker: SweepTracker, cfg: SweepConfig, run_id: str, normalized: Normalized, splits, student: str) -> int:
    """A text champion as an MLflow model that takes strings (orchestrator/select/text_model.py, logged as
    code): the student saved with save_pretrained beside its tokenizer, needing transformers alone."""
    import mlflow.pyfunc

    model = normalized.model
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "student"
        net = model.net
        net.config.id2label = dict(enumerate(splits.classes))
        net.config.label2id = {c: i for i, c in enumerate(splits.classes)}
        net.save_pretrained(str(folder))
        load_tokenizer(splits.tokenizer).save_pretrained(str(folder))
        (folder / "kdsweep.json").write_text(json.dumps({"classes": list(splits.classes), "max_length": splits.input_shape[0]}))
        with tracker.active(run_id):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(Path(__file__).with_name("text_model.py")), artifacts={"student": str(folder)},
                input_example=list(splits.test_text[:2]), registered_model_name=cfg.registered_model,
                pip_requirements=[f"torch=={__import__('torch').__version__.split('+')[0]}", f"transformers=={__import__('transformers').__version__}",
                                  "tokenizers", "pandas", f"mlflow=={mlflow.__version__}"],
                metadata={"classes": list(splits.classes), "input": "strings (a list, or a DataFrame's first column)"})
    return int(info.registered_model_version)


def _register_generator(tracker: SweepTracker, cfg: SweepConfig, run_id: str, normalized: Normalized, splits, student: str) -> int:
    """A causal-LM champion as an MLflow model that generates: prompts in, continuations out
    (orchestrator/select/lm_model.py, logged as code), the student saved with save_pretrained beside
    its tokenizer, needing transformers alone. The input example: the starts of two test examples."""
    import mlflow.pyfunc

    from trainables.api import prompts_of

    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "student"
        tokenizer = load_tokenizer(splits.tokenizer)
        normalized.model.net.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
        with tracker.active(run_id):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(Path(__file__).with_name("lm_model.py")), artifacts={"student": str(folder)},
                input_example=prompts_of(splits, "test", tokenizer, 2), params={"max_new_tokens": 20, "temperature": 0.0, "seed": 0},
                registered_model_name=cfg.registered_model,
                pip_requirements=[f"torch=={__import__('torch').__version__.split('+')[0]}", f"transformers=={__import__('transformers').__version__}",
                                  "tokenizers", "pandas", f"mlflow=={mlflow.__version__}"],
                metadata={"input": "prompts (a list of strings, or a DataFrame's first column)", "output": "prompt, generated"})
    return int(info.registered_model_version)


#: Task.serving -> how a champion of that kind is registered
REGISTER = {"tensors": _register_tensors, "tokens": _register_tokens, "generate": _register_generator}


def latency_how(record: dict[str, Any] | None) -> str:
    """How a sweep's latencies were timed, for tables: `1 thread, interleaved with the teacher, after the search`."""
    if not record:
        return "each model alone"
    return f"{record['threads']} thread{'' if record['threads'] == 1 else 's'}, interleaved with the teacher, {record['when']}"


def student_vs_teacher(test: dict[str, dict[str, float]], winner: TrialRow, how: str, keys: tuple[tuple[str, str], ...]) -> str:
    """Markdown table: the winner beside its teacher on the test split (`keys`: the task's numbers,
    Task.versus), with compression ratios; `how` says how the latencies behind the speedup were timed (latency_how)."""
    lines = ["| | " + " | ".join(label for _, label in keys) + f" | params | compression (params) | speedup (CPU, batch 1; {how}) |",
             "|---" * (len(keys) + 4) + "|"]
    for who in ("teacher", *sorted(k for k in test if k.startswith("teacher[")), "student"):
        if who not in test:
            continue
        m = test[who]
        member = who.startswith("teacher[")
        params = m.get("params") if member else winner.metrics.get("teacher_params" if who == "teacher" else "size_params")
        ratio = "-" if member else "1.00x" if who == "teacher" else f"{winner.metrics.get('compression_params', float('nan')):.2f}x"
        speed = "-" if member else "1.00x" if who == "teacher" else f"{winner.metrics.get('speedup_latency_cpu_b1', float('nan')):.2f}x"
        name = f"{who} (member)" if member else "teacher" if who == "teacher" else f"champion ({winner.student})"
        lines.append(f"| {name} | " + " | ".join(f"{m.get(k, float('nan')):.4f}" for k, _ in keys)
                     + f" | {params if params is None else int(params)} | {ratio} | {speed} |")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Selected:
    """The champion's row (with its seeds, when confirmed), its once-only test metrics, its
    registered version, the student-vs-teacher table, and the whole leaderboard."""

    champion: TrialRow
    test: dict[str, dict[str, float]]
    version: int
    table: str
    leaderboard: list[TrialRow]


def select(cfg: SweepConfig, tracker: SweepTracker, parent_id: str, objectives: list[str] | None = None,
           minimum: dict[str, float] | None = None, maximum: dict[str, float] | None = None,
           teacher_path: str | None = None) -> Selected:
    """The champion: the best confirmed finalist (its mean over seeds), registered as its best
    seed's run; without a confirmation stage, the best single-seed trial. Its test split is touched once."""
    objs = [Objective.parse(o) for o in (objectives or (cfg.objectives[0], *DEFAULT_OBJECTIVES[1:]))]
    rows = leaderboard(tracker, parent_id, cfg.primary)
    if not rows:
        raise ConfigError(f"`NAME` sweep {cfg.name!r} has no trial runs in MLflow yet: run it first")
    searched = [r for r in rows if not r.confirms]
    columns = cfg.task.leaderboard
    log.info("%s", format_table(searched, "leaderboard (search trials; kd_gain@N: stopped at epoch N, against the control at epoch N)", columns))
    log_leaderboard(tracker, parent_id, rows, columns)
    if len({r.loss for r in searched}) > 1:  # a method search: which method helped which student
        log.info("%s", text_table(gains_by_method_header(cfg.primary), gains_by_method(searched, cfg.primary),
                                  "KD gain by method (finished search trials, against the control at the same epoch)"))
    log.info("%s", format_table(pareto_front(searched, objs), "Pareto front (" + ", ".join(f"{o.key} {'up' if o.maximize else 'down'}" for o in objs) + ")",
                                columns))
    if not any(r.status in COMPLETE for r in rows):
        counts = ", ".join(f"{n} {status}" for status, n in sorted(Counter(r.status for r in rows).items()))
        error = next((r.error for r in rows if r.error), None)
        raise ConfigError(f"sweep {cfg.name!r} has no finished trial ({counts})" + (f"; first error: {error}" if error else "")
                          + ": fix the cause and start a new sweep (--set name=NEW)")
    confirmed = confirm.confirmations(rows, cfg.primary)
    winner = None
    if confirmed:
        summary = confirm.table(confirmed)
        log.info("\nconfirmation (val split; each finalist on several seeds beside its alpha=0 control at the same settings and seeds)\n%s", summary)
        tracker.log_text(parent_id, summary, "confirmation.md")
        try:
            best = choose([confirm.mean_row(c) for c in confirmed if c.kd], objs[0], minimum, maximum).confirmed
            winner = replace(best.best_run(objs[0]), confirmed=best)
        except ConfigError:
            log.warning("no confirmed finalist meets the constraints: the champion is the best single-seed search trial "
                        "(`kdsweep best %s --confirm-seeds N --confirm-top K` confirms more finalists)", cfg.name)
    if winner is None:
        winner = choose(searched, objs[0], minimum, maximum)
    splits = cfg.task.splits(cfg.dataset)  # the teacher's inputs
    own = cfg.task.splits(cfg.student_dataset(winner.student))  # the champion's (text: its own tokenizer's ids)
    model = load_student(tracker, winner.run_id)
    tags = tracker.tags(winner.run_id)
    if tags.get(Tag.TEST_EVALUATED) == "true":  # touch the test split once per model
        with tempfile.TemporaryDirectory() as d:
            test = json.loads(tracker.download(winner.run_id, "eval/test.json", d).read_text())
    else:
        teacher, members = None, []
        if teacher_path or cfg.teacher_dir().exists():
            teacher, members = load_teacher_models(teacher_path or cfg.teacher_dir())
        test = evaluate_on_split(cfg.task, model, teacher, splits, "test", members, own, cfg.seed)  # the once-only look at test
        tracker.log_metrics(winner.run_id, test["student"], step=0)
        tracker.log_text(winner.run_id, json.dumps(test, indent=2), "eval/test.json")
        tracker.set_tag(winner.run_id, Tag.TEST_EVALUATED, "true")
    table = student_vs_teacher(test, winner, latency_how(tracker.read_json(parent_id, LATENCY_RECORD)), cfg.task.versus)
    tracker.log_metrics(parent_id, {"champion_val_acc": winner.val_acc, **{f"champion_{k}": v for k, v in test["student"].items()},
                                    **{f"teacher_{k}": v for k, v in test.get("teacher", {}).items()}, **confirmed_metrics(winner),
                                    **{f"teacher_member{who[8:who.index(']')]}_test_acc": m["test_acc"] for who, m in test.items()
                                       if who.startswith("teacher[")}}, step=0)
    tracker.set_tag(parent_id, Tag.CHAMPION, winner.run_id)
    tracker.log_text(parent_id, table, "champion_vs_teacher.md")
    version = register(tracker, cfg, winner.run_id, model, own, winner.student)
    log.info("\nchampion vs teacher (test split, once)\n%s", table)
    key = cfg.primary.key
    test_key = "test_" + key.removeprefix("val_")
    log.info(f"champion: {winner.student} (trial {winner.trial_id}) {key}={winner.value(key):.4f} "
             f"{test_key}={test['student'].get(test_key, float('nan')):.4f} -> models:/{cfg.registered_model}@champion (version {version})")
    if winner.confirmed:
        c = winner.confirmed
        log.info(f"  confirmed on {len(c.kd)} seed(s): {key} {c.mean():.4f}" + (f" +- {c.std():.4f}" if c.std() is not None else "")
                 + f"; {c.verdict()}. Registered: seed {winner.seed} (run {winner.run_id}), the best {key} of its seeds; "
                 "the test split was touched for it alone")
    return Selected(winner, test, version, table, rows)


def confirmed_metrics(winner: TrialRow) -> dict[str, float]:
    """The champion's confirmed numbers, for the parent run."""
    c = winner.confirmed
    if c is None:
        return {}
    mean, half, pairs = c.gain()
    out = {"champion_confirmed_seeds": len(c.kd), "champion_confirmed_val_acc_mean": c.mean()}
    if c.std() is not None:
        out["champion_confirmed_val_acc_std"] = c.std()
    if mean is not None:
        out.update(champion_kd_gain_mean=mean, champion_kd_gain_pairs=pairs)
    if half is not None:
        out["champion_kd_gain_ci95"] = half
    return out


def log_leaderboard(tracker: SweepTracker, parent_id: str, rows: list[TrialRow], columns: tuple[str, ...] = LEADERBOARD) -> None:
    """Each trial's KD gain as a metric of its run (a column in the MLflow UI), and the leaderboard
    as a table artifact of the parent run (MLflow's table view)."""
    for r in rows:
        if r.kd_gain is not None:
            tracker.log_metrics(r.run_id, {"kd_gain": r.kd_gain}, step=r.epochs)
    columns = [*columns, "seed", "confirms", "trial_id", "run_id"]
    tracker.log_table(parent_id, {c: [r.value(c) for r in rows] for c in columns}, "leaderboard.json")


def _render(title: str, header: list[str], cells: list[list[str]]) -> str:
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
    return "\n".join([f"\n{title}", *("  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in [header, *cells])])


def text_table(header: list[str], rows: list[list[Any]], title: str) -> str:
    """Rows of plain values under a header, right-justified (gains signed)."""
    def show(h, v):
        return "-" if v is None else f"{v:+.4f}" if isinstance(v, float) and "gain" in h else f"{v:.4f}" if isinstance(v, float) else str(v)

    return _render(title, header, [[show(h, v) for h, v in zip(header, r)] for r in rows])


def format_table(rows: list[TrialRow], title: str, columns=LEADERBOARD) -> str:
    """Leaderboard rows as their declared metrics show them; a stopped trial's kd_gain shows the
    epoch it was compared at (`+0.0208@4`)."""
    def cell(r: TrialRow, c: str) -> str:
        shown = metric(c).show(r.value(c))
        return f"{shown}@{r.epochs}" if c == "kd_gain" and r.kd_gain is not None and r.status != "finished" else shown

    return _render(title, list(columns), [[cell(r, c) for c in columns] for r in rows])
