"""Choose the best student: leaderboard, KD gain over each student's alpha=0 control, Pareto front,
a constrained winner tested once on the test split and registered as `champion`."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from orchestrator.config import SweepConfig
from orchestrator.tracking import STATUS, TRIAL, SweepTracker
from trainables.registry import ConfigError

USABLE = ("finished", "stopped")


def leaderboard(tracker: SweepTracker, parent_id: str) -> list[dict[str, Any]]:
    rows = []
    for r in tracker.find_runs(f"tags.mlflow.parentRunId = '{parent_id}'"):
        p, m, tags = r.data.params, r.data.metrics, r.data.tags
        rows.append({
            "run_id": r.info.run_id, "trial_id": tags.get(TRIAL), "status": tags.get(STATUS, "?"),
            "student": p.get("student", "?"),
            "temperature": float(p["temperature"]) if "temperature" in p else None,
            "alpha": float(p["alpha"]) if "alpha" in p else None,
            "lr": float(p["lr"]) if "lr" in p else None,
            "val_acc": m.get("final_val_acc", m.get("val_acc", 0.0)),
            "epochs": int(m.get("epochs_run", 0)),
            "params": m.get("size_params"), "bytes": m.get("size_bytes"),
            "latency_ms": m.get("size_latency_cpu_b1_ms"), "test_acc": m.get("test_acc"),
        })
    controls: dict[str, float] = {}
    for row in rows:
        if row["alpha"] == 0.0 and row["status"] in USABLE:
            controls[row["student"]] = max(controls.get(row["student"], 0.0), row["val_acc"])
    for row in rows:
        c = controls.get(row["student"])
        row["kd_gain"] = None if c is None else row["val_acc"] - c
    return sorted(rows, key=lambda r: (r["status"] in USABLE, r["val_acc"]), reverse=True)


def pareto_front(rows: list[dict[str, Any]], keys=(("val_acc", "max"), ("params", "min"), ("latency_ms", "min"))) -> list[dict]:
    """Rows no other row beats on every objective (and strictly on one)."""
    def better_or_equal(a, b, key, sense):
        return a[key] >= b[key] if sense == "max" else a[key] <= b[key]

    cands = [r for r in rows if r["status"] in USABLE and all(r.get(k) is not None for k, _ in keys)]
    front = []
    for r in cands:
        dominated = any(
            all(better_or_equal(o, r, k, s) for k, s in keys) and any(o[k] != r[k] for k, _ in keys) for o in cands if o is not r
        )
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: -r["val_acc"])


def choose(rows: list[dict[str, Any]], max_params: float | None = None, max_latency_ms: float | None = None) -> dict[str, Any]:
    ok = [r for r in rows if r["status"] in USABLE
          and (max_params is None or (r["params"] or 0) <= max_params)
          and (max_latency_ms is None or (r["latency_ms"] or 0) <= max_latency_ms)]
    if not ok:
        raise ConfigError(f"no finished trial meets --max-params={max_params} --max-latency-ms={max_latency_ms}: relax the constraints")
    return max(ok, key=lambda r: (r["val_acc"], -(r["params"] or 0)))


def load_student(tracker: SweepTracker, run_id: str) -> torch.nn.Module:
    from safetensors.torch import load_file

    from trainables.models import create_model

    with tempfile.TemporaryDirectory() as d:
        local = Path(tracker.client.download_artifacts(run_id, "student", d))
        card = json.loads((local / "student.json").read_text())
        model = create_model(card["arch"], card["num_classes"], card["input_shape"])
        model.load_state_dict(load_file(str(local / "student.safetensors")))
    return model.eval()


def test_accuracy(cfg: SweepConfig, model: torch.nn.Module) -> float:
    """The once-only look at the test split, for the chosen winner."""
    from trainables.data import load_dataset, normalizer
    from trainables.loop import predict

    ds = cfg.dataset
    s = load_dataset(ds.name, ds.root, ds.val_fraction, ds.split_seed, ds.download, **ds.kwargs)
    logits = predict(model, s.test_x, normalizer(s, "cpu"), 2048, torch.no_grad, False)
    return (logits.argmax(1) == s.test_y).float().mean().item()


class Normalized(torch.nn.Module):
    """The registered artifact: raw uint8-range images in, logits out (normalization baked in)."""

    def __init__(self, model: torch.nn.Module, mean, std) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x.float() - self.mean) / self.std)


def register(tracker: SweepTracker, cfg: SweepConfig, run_id: str, model: torch.nn.Module) -> int:
    """Log the winner as an MLflow PyTorch model, register it, point alias `champion` at it."""
    import mlflow.pytorch
    import numpy as np

    from trainables.data import load_dataset

    ds = cfg.dataset
    s = load_dataset(ds.name, ds.root, ds.val_fraction, ds.split_seed, ds.download, **ds.kwargs)
    wrapped = Normalized(model, s.mean, s.std).eval()
    example = s.val_x[:2].float().numpy().astype(np.float32)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(wrapped, name="model", input_example=example, registered_model_name=cfg.registered_model)
    version = int(info.registered_model_version)
    tracker.client.set_registered_model_alias(cfg.registered_model, "champion", str(version))
    return version


def select(cfg: SweepConfig, tracker: SweepTracker, parent_id: str, max_params: float | None = None,
           max_latency_ms: float | None = None, printer=print) -> dict[str, Any]:
    rows = leaderboard(tracker, parent_id)
    if not rows:
        raise ConfigError(f"`NAME` sweep {cfg.name!r} has no trial runs in MLflow yet: run it first")
    printer(format_table(rows, "leaderboard"))
    printer(format_table(pareto_front(rows), "Pareto front (val_acc up, params down, latency down)"))
    winner = choose(rows, max_params, max_latency_ms)
    tags = tracker.client.get_run(winner["run_id"]).data.tags
    model = load_student(tracker, winner["run_id"])
    if tags.get("kdsweep.test_evaluated") == "true":
        test_acc = winner["test_acc"]
    else:
        test_acc = test_accuracy(cfg, model)
        tracker.log_metrics(winner["run_id"], {"test_acc": test_acc}, step=0)
        tracker.client.set_tag(winner["run_id"], "kdsweep.test_evaluated", "true")
    tracker.log_metrics(parent_id, {"champion_val_acc": winner["val_acc"], "champion_test_acc": test_acc}, step=0)
    tracker.client.set_tag(parent_id, "kdsweep.champion_run_id", winner["run_id"])
    version = register(tracker, cfg, winner["run_id"], model)
    printer(f"champion: {winner['student']} (trial {winner['trial_id']}) val_acc={winner['val_acc']:.4f} "
            f"test_acc={test_acc:.4f} -> models:/{cfg.registered_model}@champion (version {version})")
    return {**winner, "test_acc": test_acc, "version": version}


def format_table(rows: list[dict[str, Any]], title: str) -> str:
    cols = [("student", "{}"), ("status", "{}"), ("temperature", "{:.2f}"), ("alpha", "{:.2f}"), ("lr", "{:.4f}"),
            ("val_acc", "{:.4f}"), ("kd_gain", "{:+.4f}"), ("params", "{:.0f}"), ("bytes", "{:.0f}"), ("latency_ms", "{:.3f}"), ("epochs", "{}")]
    cells = [[("-" if r.get(c) is None else f.format(r[c])) for c, f in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, (c, _) in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))
    return "\n".join([f"\n{title}", line([c for c, _ in cols]), *(line(r) for r in cells)])
