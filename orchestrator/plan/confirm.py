"""The confirmation stage (driver side): is the champion's gain real?

A search ranks single-seed trials, so its winner may be a lucky seed and its KD gain over the
control may be noise. After the search, the top finalists (Pareto front members first, then by the
first objective) are trained again with fresh seeds, each beside its student's alpha=0 control at
the same settings and seeds, as ordinary trials of the same Tune run. Selection then ranks the
finalists by their mean over seeds and states each KD gain as a paired difference per seed with a
95% confidence interval.

One rule matches runs: a control belongs to a KD run when both trained the same student with the same
`train` settings and seed (`settings_key`), read from the resolved trial config each run carries
(live from the TrialConfig, later from its MLflow params), so the searcher that plans the stage and
the selection that reads it afterwards agree.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Sequence

from orchestrator.track.rows import TrialRow, with_seed
from trainables.eval.metrics import Objective

#: Where a confirmation trial's Tune config says what it confirms: {"of": finalist trial id, "control": bool}.
CONFIRM = "confirm"
#: How a run ended when its seed counts as measured (a diverged one is reported, not run again);
#: a failed or orphaned (killed) run's seed is trained again by the next plan.
MEASURED = ("finished", "diverged")


def numbers(d: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a Tune result (booleans are not numbers here)."""
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@dataclass
class Done:
    """A trial that has ended, as the stage needs it (from Tune's last result or from MLflow)."""

    trial_id: str
    point: dict[str, Any]  # the sampled point: student, searched paths (and seed, for a confirmation)
    settings: tuple[tuple[str, str], ...]
    seed: int
    control: bool  # a no-KD control (its loss gives the distillation term no weight)
    status: str  # finished, stopped, diverged, failed, ...
    metrics: dict[str, float] = field(default_factory=dict)
    of: str | None = None  # the finalist a confirmation trial confirms


def pareto(items: Sequence[Any], objectives: Sequence[Objective], value: Callable[[Any, str], float]) -> list[Any]:
    """Items that no other item beats on every objective (and strictly on one), best first on the first."""
    def score(x, o):
        return value(x, o.key) if o.maximize else -value(x, o.key)

    front = [x for x in items if not any(
        all(score(y, o) >= score(x, o) for o in objectives) and any(score(y, o) > score(x, o) for o in objectives)
        for y in items if y is not x)]
    return sorted(front, key=lambda x: -score(x, objectives[0]))


def finalists(done: Iterable[Done], objectives: Sequence[Objective], top: int) -> list[Done]:
    """The `top` finished search trials: Pareto front members first, then the rest, each group by
    the first objective."""
    cands = [d for d in done if d.of is None and d.status == "finished" and all(o.key in d.metrics for o in objectives)]
    first = objectives[0]
    front = pareto(cands, objectives, lambda d, k: d.metrics[k])
    rest = sorted((d for d in cands if d not in front), key=lambda d: d.metrics[first.key], reverse=first.maximize)
    return (front + rest)[:top]


def fresh_seeds(base: int, used: set[int], n: int) -> list[int]:
    """`n` seeds after `base` that no run of this finalist has used."""
    out, s = [], base
    while len(out) < n:
        s += 1
        if s not in used:
            out.append(s)
    return out


def plan(done: list[Done], objectives: Sequence[Objective], top: int, seeds: int,
         control_of: Callable[[dict[str, Any]], dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(point, what it confirms) for every trial the stage still needs: per finalist, KD runs up
    to `seeds` seeds (its search trial's included) and the control at the same settings for each of
    them, unless a run with those settings already exists (a search control, or another finalist's)."""
    have = {d.settings for d in done if d.control and d.status in MEASURED}
    out: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for f in finalists(done, objectives, top):
        ran = [f.seed] + [d.seed for d in done if d.of == f.trial_id and d.control == f.control and d.status in MEASURED]
        new = fresh_seeds(f.seed, set(ran), seeds - len(ran))
        for s in new:
            out.append(({**f.point, "seed": s}, {"of": f.trial_id, "control": f.control}))
            if f.control:
                have.add(with_seed(f.settings, s))
        if f.control:
            continue
        control = control_of(f.point)
        for s in ran + new:
            if with_seed(f.settings, s) not in have:
                have.add(with_seed(f.settings, s))
                out.append(({**control, "seed": s}, {"of": f.trial_id, "control": True}))
    return out


def cap(top: int, seeds: int) -> int:
    """The most trials a stage can add: per finalist, seeds - 1 KD runs and a control per seed."""
    return top * (2 * seeds - 1)


# --- the confirmed numbers (selection) -----------------------------------------------------

@dataclass
class Confirmed:
    """A finalist measured on several seeds: its KD runs and its controls, by seed."""

    finalist: TrialRow  # the search trial's leaderboard row
    kd: dict[int, TrialRow]  # seed -> finished run (the finalist's own seed included)
    controls: dict[int, TrialRow]  # seed -> finished control at the same settings
    excluded: list[tuple[int, str, str]]  # (seed, "kd" | "control", status): runs that did not finish, not averaged
    primary: Objective  # the sweep's first objective: what the gain and verdict are measured in

    def values(self, key: str | None = None) -> list[float]:
        key = key or self.primary.key
        return [r.value(key) for r in self.kd.values() if r.value(key) is not None]

    def mean(self, key: str | None = None) -> float | None:
        v = self.values(key)
        return sum(v) / len(v) if v else None

    def std(self, key: str | None = None) -> float | None:
        v = self.values(key)
        return statistics.stdev(v) if len(v) > 1 else None

    def gain(self) -> tuple[float | None, float | None, int]:
        """(mean, 95% CI half-width, pairs) of the KD run's improvement over its control, per seed,
        in the primary objective: positive is better (a minimised metric's gain is control - KD)."""
        if self.finalist.control:
            return None, None, 0
        key, sign = self.primary.key, 1.0 if self.primary.maximize else -1.0
        d = [sign * (self.kd[s].value(key) - self.controls[s].value(key)) for s in sorted(self.kd) if s in self.controls]
        return paired(d)

    def verdict(self) -> str:
        if self.finalist.control:
            return "no KD (the alpha=0 control itself)"
        mean, half, n = self.gain()
        if n == 0:
            return "no finished control: no gain"
        pts = self.primary.key.endswith("acc")  # accuracies read in points, other metrics in their own unit
        scale, unit = (100, " pts") if pts else (1, f" {self.primary.key} {'up' if self.primary.maximize else 'down'}")
        text = (f"KD gain {scale * mean:+.{2 if pts else 4}f}" + (f" +- {scale * half:.{2 if pts else 4}f}" if half is not None else "")
                + f"{unit}, {n} seed{'s' if n > 1 else ''}")
        if half is None:
            return text + ", one pair: no interval"
        return text + (", holds" if mean - half > 0 else ", hurts" if mean + half < 0 else ", within noise")

    def best_run(self, objective: Objective | None = None) -> TrialRow:
        """The seed registered as the champion: the best on val in `objective` (default: the primary;
        selection may look at val freely; the test split is touched once, for this run alone)."""
        o = objective or self.primary
        return max(self.kd.values(), key=lambda r: r.value(o.key) if o.maximize else -r.value(o.key))


def paired(d: list[float]) -> tuple[float | None, float | None, int]:
    """Mean and Student-t 95% half-width of paired differences."""
    n = len(d)
    if n == 0:
        return None, None, 0
    mean = sum(d) / n
    if n == 1:
        return mean, None, 1
    from scipy.stats import t

    return mean, float(t.ppf(0.975, n - 1)) * statistics.stdev(d) / math.sqrt(n), n


def confirmations(rows: list[TrialRow], primary: Objective) -> list[Confirmed]:
    """Each confirmed finalist from leaderboard rows (their `confirms`, `seed`, `settings` and
    `control` fields), in the order the stage confirmed them, measured in `primary`."""
    search = {r.trial_id: r for r in rows if not r.confirms}
    controls: dict[tuple, TrialRow] = {}
    for r in rows:
        if r.control and r.status == "finished":
            controls.setdefault(r.settings, r)
    out = []
    for fid in dict.fromkeys(r.confirms for r in rows if r.confirms):
        f = search.get(fid)
        if f is None:
            continue
        runs = [f] + [r for r in rows if r.confirms == fid and r.control == f.control]
        kd = {r.seed: r for r in runs if r.status == "finished"}
        excluded = [(r.seed, "kd", r.status) for r in runs if r.status != "finished"]
        ctrl = {}
        if not f.control:
            for s in sorted({r.seed for r in runs}):
                c = controls.get(with_seed(f.settings, s))
                if c is not None:
                    ctrl[s] = c
            excluded += [(r.seed, "control", r.status) for r in rows if r.confirms == fid and r.control and r.status != "finished"]
        out.append(Confirmed(f, kd, ctrl, excluded, primary))
    return out


def mean_row(c: Confirmed) -> TrialRow:
    """The finalist's row with every metric its finished KD runs share replaced by their mean
    (constraints and the objective read the confirmed numbers)."""
    runs = [r.numbers() for r in c.kd.values()]
    shared = set.intersection(*(set(r) for r in runs)) if runs else set()
    means = {k: sum(r[k] for r in runs) / len(runs) for k in shared}
    if "val_acc" in means:  # the row's val_acc is its final one
        means["final_val_acc"] = means["val_acc"]
    return replace(c.finalist, metrics={**c.finalist.metrics, **means}, confirmed=c)


def table(confirmed: list[Confirmed]) -> str:
    """Markdown: each finalist's seeds, val accuracy mean +- std, its control's, and the verdict."""
    def ms(values: list[float]) -> str:
        if not values:
            return "-"
        m = sum(values) / len(values)
        return f"{m:.4f} +- {statistics.stdev(values):.4f}" if len(values) > 1 else f"{m:.4f}"

    what = confirmed[0].primary.label if confirmed else "val acc"
    lines = [f"| finalist | student | T | alpha | lr | seeds | {what} (KD) | {what} (alpha=0 control) | paired KD gain (95% CI) | not averaged |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in confirmed:
        f = c.finalist
        setting = [f"{v:.2f}" if isinstance(v, float) else "-" for v in (f.temperature, f.alpha)]
        lr = f"{f.lr:.4g}" if isinstance(f.lr, float) else "-"
        seeds = ", ".join(str(s) for s in sorted(c.kd))
        dropped = "; ".join(f"seed {s} {who} {status}" for s, who, status in c.excluded) or "-"
        lines.append(f"| {f.trial_id} | {f.student} | {setting[0]} | {setting[1]} | {lr} | {seeds} | {ms(c.values())} | "
                     f"{ms([r.value(c.primary.key) for r in c.controls.values()]) if not f.control else '-'} | {c.verdict()} | {dropped} |")
    return "\n".join(lines) + "\n"
