"""Optuna's view of a sweep, kept: each study exported to an Optuna storage file in the sweep's
folder (`optuna.db`, `optuna.load_study(study_name=..., storage="sqlite:///.../optuna.db")`) and
Optuna's plots logged to the sweep's parent run (driver side).

The study is rebuilt from Tune's results, the same points and values Optuna was told (a trial ASHA
stopped carries its last val_acc), so it is exact after a resume too.
"""
from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import optuna

from orchestrator.plan.config import SweepConfig
from orchestrator.plan.confirm import CONFIRM
from orchestrator.plan.search import objectives, outside, point_of, space

log = logging.getLogger(__name__)

#: Optuna's matplotlib plots logged for every study (file stem -> plot function name).
PLOTS = {
    "optimization_history": "plot_optimization_history",
    "param_importances": "plot_param_importances",
    "parallel_coordinate": "plot_parallel_coordinate",
    "slice": "plot_slice",
}


def storage_url(sweep_dir: Path) -> str:
    return f"sqlite:///{sweep_dir / 'optuna.db'}"


def export_study(cfg: SweepConfig, study: str, students: list[str], results, sweep_dir: Path) -> optuna.Study:
    """Write the study of one Tune run (its ResultGrid) to the sweep's Optuna storage: the search
    trials, what Optuna was told (the confirmation stage's trials are not samples of it, nor a
    control outside the searched ranges: search.searcher)."""
    name = f"{cfg.name}-{study}"
    url = storage_url(sweep_dir)
    if name in optuna.get_all_study_names(url):
        optuna.delete_study(study_name=name, storage=url)  # a resumed sweep: write it whole again
    metrics, modes = objectives(cfg)
    out = optuna.create_study(study_name=name, storage=url, directions=["maximize" if m == "max" else "minimize" for m in modes])
    out.set_user_attr("objectives", list(metrics))  # the plots' axes name them
    dists = space(cfg, students)
    for result in results:
        if CONFIRM in (result.config or {}) or outside(cfg, point_of(result.config or {})):
            continue
        params = {k: v for k, v in (result.config or {}).items() if k in dists}
        values = [(result.metrics or {}).get(m) for m in metrics]
        ok = result.error is None and all(v is not None and math.isfinite(v) for v in values)
        out.add_trial(optuna.trial.create_trial(
            params=params, distributions={k: dists[k] for k in params}, values=values if ok else None,
            state=optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.FAIL,
            user_attrs={"trial_id": (result.metrics or {}).get("trial_id"), "epochs": (result.metrics or {}).get("epoch")},
        ))
    log.info("Optuna study %r: %d trials in %s", name, len(out.trials), url)
    return out


def plot_study(study: optuna.Study, out_dir: Path) -> list[Path]:
    """Optuna's plots as PNGs (and the Pareto front when multi-objective, the others then on the
    first objective); a plot the study cannot support (e.g. importances from one finished trial)
    is named in the log and left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    multi = len(study.directions) > 1
    plots = {**PLOTS, "pareto_front": "plot_pareto_front"} if multi else PLOTS
    named = {"target_name": study.user_attrs["objectives"][0]} if study.user_attrs.get("objectives") else {}  # the first objective's name
    first = {"target": lambda t: t.values[0], **named} if multi else named
    for stem, fn in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # experimental-API and degenerate-axis warnings from optuna/matplotlib
                pareto = {"target_names": study.user_attrs["objectives"]} if named else {}
                ax = getattr(vis, fn)(study, **(pareto if stem == "pareto_front" else first))
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            log.info("Optuna plot %s skipped for %s: %s", stem, study.study_name, e)
            continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        fig.set_size_inches(10, 6)
        path = out_dir / f"{study.study_name}-{stem}.png"
        fig.savefig(path, dpi=90, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
