"""`kdsweep report NAME`: a Markdown + HTML summary of a finished sweep, with two plots, written
to disk and logged to the sweep's parent run. Every number is read back from MLflow."""
from __future__ import annotations

import html
import json
import tempfile
from pathlib import Path
from typing import Any

from orchestrator.plan.confirm import confirmations, table
from orchestrator.track.rows import TrialRow
from orchestrator.select.selection import COMPLETE, USABLE, gains_by_method, gains_by_method_header, leaderboard, pareto_front
from orchestrator.track.store import SweepTracker, Tag
from trainables.eval.metrics import Objective, metric
from trainables.api import Task, task_for


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{int(v)}" if v.is_integer() and abs(v) >= 100 else f"{v:.4f}"
        return str(v)

    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(fmt(v) for v in r) + " |" for r in rows)])


def kd_gains(rows: list[TrialRow], primary: Objective) -> list[list[Any]]:
    """Per student, from the search: its alpha=0 control and its KD trial with the largest gain at
    an equal budget (in `primary`, the sweep's first objective, whichever its direction): finished
    trials against the finished control; only when no KD trial finished, the best stopped one,
    against the control at the epoch ASHA stopped it (labelled so)."""
    out = []
    for student in sorted({r.student for r in rows}):
        mine = [r for r in rows if r.student == student and not r.confirms and r.kd_gain is not None]
        control = next((r for r in mine if r.control and r.status in COMPLETE), None)
        kd = [r for r in mine if not r.control]
        best = max((r for r in kd if r.status in COMPLETE), key=lambda r: r.kd_gain, default=None)
        budget = "final (both finished)"
        if best is None:
            best = max(kd, key=lambda r: r.kd_gain, default=None)
            budget = best and f"epoch {best.epochs} (KD trial stopped there)"
        out.append([student, control and control.value(primary.key), best and best.value(primary.key), best and best.epochs,
                    best and f"{best.loss}, T={best.temperature:.2f}, alpha={best.alpha:.2f}", best and best.kd_gain, budget,
                    control and control.value("robust_acc"), best and best.value("robust_acc")])
    return out


def pareto_plot(rows: list[TrialRow], path: Path, primary: Objective) -> None:
    """The primary objective against parameters, each student's trials, its controls marked."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = primary.key
    objs = [primary, Objective.parse("params")]
    front = {id(r) for r in pareto_front(rows, objs)}
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=110)
    usable = [r for r in rows if r.status in COMPLETE and r.value("size_params") and r.value(key) is not None]
    for student in sorted({r.student for r in usable}):
        pts = [r for r in usable if r.student == student]
        ax.scatter([r.value("size_params") for r in pts], [r.value(key) for r in pts], label=student, alpha=0.75,
                   marker="o", edgecolors=["black" if id(r) in front else "none" for r in pts], linewidths=1.5)
        ctrl = [r for r in pts if r.control]
        ax.scatter([r.value("size_params") for r in ctrl], [r.value(key) for r in ctrl], marker="x", color="red", s=60)
    fr = sorted((r for r in usable if id(r) in front), key=lambda r: r.value("size_params"))
    ax.plot([r.value("size_params") for r in fr], [r.value(key) for r in fr], "k--", lw=1, label="Pareto front")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("parameters (log)")
    ax.set_ylabel(f"{primary.label} ({'higher' if primary.maximize else 'lower'} is better)")
    ax.set_title(f"Finished trials: {primary.label} vs size (x = alpha=0 control)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def robustness_rows(task: Task, test: dict | None, champion: TrialRow | None, control: TrialRow | None) -> list[list[Any]]:
    """Per corruption of the sweep's task: the teacher and champion on test, the champion and its
    alpha=0 control on val (accuracy, mean over the task's severities; None where not measured)."""
    series = [((test or {}).get("teacher", {}), "test_corr_"), ((test or {}).get("student", {}), "test_corr_"),
              (champion.metrics if champion else {}, "corr_"), (control.metrics if control else {}, "corr_")]
    return [[name, *(m.get(prefix + name) for m, prefix in series)] for name in task.corruptions]


def robustness_plot(task: Task, rows: list[list[Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    x = np.arange(len(rows))
    panels = [(axes[0], "test split: champion vs teacher", [("teacher", 1), ("champion", 2)]),
              (axes[1], "val split: champion vs its alpha=0 control", [("champion", 3), ("alpha=0 control", 4)])]
    for ax, title, series in panels:
        for i, (name, col) in enumerate(series):
            ax.bar(x + (i - 0.5) * 0.4, [r[col] or 0.0 for r in rows], 0.4, label=name)
        ax.set_xticks(x, [r[0].replace("_", "\n") for r in rows], fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"accuracy (mean over severities {task.severities[0]}-{task.severities[-1]})")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(saved, tracker: SweepTracker, parent_id: str, out: str | None = None) -> Path:
    cfg = saved.config
    out_dir = Path(out) if out else saved.directory / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = leaderboard(tracker, parent_id, cfg.primary)
    champ_id = tracker.tags(parent_id).get(Tag.CHAMPION)
    champion = next((r for r in rows if r.run_id == champ_id), None)
    test = vs_table = None
    if champ_id:
        with tempfile.TemporaryDirectory() as d:
            test = json.loads(tracker.download(champ_id, "eval/test.json", d).read_text())
            vs_table = tracker.download(parent_id, "champion_vs_teacher.md", d).read_text()
    control = None
    if champion:  # its control at the same settings and seed, else its student's control from the search
        controls = [r for r in rows if r.student == champion.student and r.control and r.status in COMPLETE]
        control = next((r for r in controls if r.settings == champion.settings), next((r for r in controls if not r.confirms), None))
    optuna_pngs = []
    (out_dir / "optuna").mkdir(exist_ok=True)
    for path in tracker.artifact_paths(parent_id, "optuna"):  # Optuna's plots, logged by the sweep
        optuna_pngs.append(tracker.download(parent_id, path, out_dir / "optuna").relative_to(out_dir))
    pareto_plot([r for r in rows if not r.confirms], out_dir / "pareto.png", cfg.primary)
    task = task_for(cfg.dataset.name)
    robust = robustness_rows(task, test, champion, control)
    robustness_plot(task, robust, out_dir / "robustness.png")

    lb = md_table([*task.leaderboard, "seed", "confirms"], [[metric(c).show(r.value(c)) for c in task.leaderboard] + [r.seed, r.confirms] for r in rows])
    searched = [r for r in rows if not r.confirms]
    what = cfg.primary.label
    gains = md_table(["student", f"alpha=0 {what} (final)", f"KD {what}", "KD epochs", "KD setting", "KD gain", "compared at",
                      "alpha=0 robust acc", "KD robust acc"], kd_gains(searched, cfg.primary))
    confirmed = confirmations(rows, cfg.primary)
    methods = md_table(gains_by_method_header(cfg.primary), gains_by_method(searched, cfg.primary)) if len({r.loss for r in searched}) > 1 else None
    md = "\n\n".join([
        f"# kdsweep report: {cfg.name}",
        f"Dataset `{cfg.dataset.name}`, teacher `{cfg.teacher_name}`, loss `{cfg.loss.name}`, {len(searched)} search trials "
        f"({sum(r.status in USABLE for r in searched)} usable) and {len(rows) - len(searched)} confirmation trials, mode `{cfg.mode}`. "
        f"Tracking: `{saved.tracking_uri}`, parent run `{parent_id}`.",
        "## Confirmation: the finalists on several seeds, each beside its alpha=0 control at the same settings and seeds (val split)",
        table(confirmed) if confirmed else "_No confirmation stage ran (budget.confirm.top: 0): `kdsweep best NAME --confirm-seeds 3` runs one._",
        *[f"Champion: finalist {c.finalist.trial_id}, the best mean over its seeds; registered: its seed {champion.seed} "
          f"(run `{champion.run_id}`), the best on val of its seeds, the one model that saw the test split."
          for c in confirmed if champion and champion.run_id in {r.run_id for r in c.kd.values()}],
        "## KD gain over each student's alpha=0 control in the search (val split, one seed)", gains,
        *(["## KD gain by method (finished search trials, against the control at the same epoch)", methods] if methods else []),
        "## Champion vs teacher (test split, evaluated once)", vs_table or "_No champion selected yet: run `kdsweep best NAME`._",
        f"## {what[0].upper() + what[1:]} vs size", "![Pareto front](pareto.png)",
        "## Robustness per corruption", "![Robustness](robustness.png)",
        md_table(["corruption", "teacher (test)", "champion (test)", "champion (val)", "alpha=0 control (val)"], robust),
        "## Leaderboard (val split)", lb,
        "## Optuna's view of the search", *(f"![{p.stem}]({p.as_posix()})" for p in sorted(optuna_pngs)),
    ]) + "\n"
    (out_dir / "report.md").write_text(md)
    (out_dir / "report.html").write_text(markdown_to_html(md, cfg.name))
    tracker.log_files(parent_id, out_dir, "report")
    return out_dir


def markdown_to_html(md: str, title: str) -> str:
    """Just enough Markdown (headings, tables, images, paragraphs) for this report."""
    body, table = [], []

    def flush():
        if table:
            head, *rest = [[c.strip() for c in row.strip("|").split("|")] for row in table if not set(row) <= set("|-")]
            body.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rest) + "</table>")
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("!["):
            alt, src = line[2:].split("](")
            body.append(f'<img alt="{html.escape(alt)}" src="{html.escape(src.rstrip(")"))}">')
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    flush()
    style = "body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{max-width:100%}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n"
