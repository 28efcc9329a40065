"""ImageNet-shaped distillation on one GPU: is a student as fast inside a kdsweep sweep as alone?

224 px images, 1000 classes, random uint8 data held on the GPU, a torchvision resnet50 teacher
(trained one epoch here: speed, not accuracy), torchvision mobilenet_v3_large and resnet18 students,
random-resized-crop and flip views, the teacher's top-k cache (`train.teacher_topk`). Each student's
images/s:
- inside the sweep: its trials' `images_per_s` (KD from the cache, the cache's epochs built by the
  first trial that needs them), one trial at a time on the GPU;
- alone: the same student, same data, views, batch and epochs, trained by `train_student` in this
  process with alpha=0 and no teacher (plain supervised training, the floor for this student).

  python benchmarks/imagenet_shaped.py             # one GPU (bf16, channels_last)
  python benchmarks/imagenet_shaped.py --smoke     # CPU, tiny (32 px, 10 classes): checks the pipeline
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STUDENTS = ["torchvision.mobilenet_v3_large", "torchvision.resnet18"]


def sweep_config(args, out: Path) -> dict:
    cfg = yaml.safe_load((REPO / "search_spaces" / "default.yaml").read_text())
    n = args.n_train + args.n_val
    cfg.update(name="imagenet-shaped", storage=str(out / "runs"), students=STUDENTS, mode="joint")
    cfg["dataset"] = {"name": "synthetic", "val_fraction": args.n_val / n,
                      "augment": {"resized_crop": {}, "flip": True},
                      "kwargs": {"n_train": n, "n_test": args.n_val, "shape": [3, args.size, args.size], "num_classes": args.classes}}
    cfg["teacher"] = {"arch": "torchvision.resnet50", "epochs": 1, "batch_size": args.batch, "path": str(out / "teacher"), "robust_samples": 0,
                      "optimizer": {"name": "sgd", "lr": 0.01 if args.smoke else 0.1, "momentum": 0.9}}  # smoke: 2 steps at 0.1 diverge
    cfg["loss"] = {"name": "kd", "temperature": 4.0, "alpha": 0.9}
    cfg["train"] = {"epochs": args.epochs, "batch_size": args.batch, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
                    "teacher_topk": args.topk, "robust_samples": 0}
    cfg["search"] = {"lr": {"type": "float", "low": 0.05, "high": 0.2, "log": True}}
    # one trial per student (the standard point), ASHA told to stop nothing, no confirmation stage
    cfg["budget"] = {"num_samples": len(STUDENTS), "max_concurrent": 1, "grace_period": args.epochs, "reduction_factor": 2,
                     "confirm": {"top": 0}}
    cfg["resources"] = {"cpus_per_trial": args.cpus, "gpus_per_trial": 0.0 if args.smoke else 1.0, "num_workers": 1}
    cfg["tracking"] = {"uri": f"sqlite:///{out / 'mlruns' / 'mlflow.db'}"}
    return cfg


def steady(rates: list[float]) -> float:
    """Median images/s over epochs after the first (the first pays cuDNN's autotuning and, in
    the sweep, the cache's first build); the first epoch alone when there is no other."""
    return statistics.median(rates[1:] or rates)


def in_sweep(cfg) -> dict[str, dict[str, float]]:
    """Each student's images/s inside a sweep of `cfg`: {student: {"steady": ..., "first": ...}}."""
    import mlflow

    from orchestrator.run.sweep import run_sweep

    h = run_sweep(cfg)
    client = mlflow.tracking.MlflowClient(cfg.tracking.uri)
    out = {}
    for run in h["tracker"].trial_runs(h["parent_run_id"]):
        student = run.data.params["trial.student"]
        rates = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "images_per_s"), key=lambda m: m.step)]
        out[student] = {"steady": steady(rates), "first": rates[0], "targets": run.data.tags.get("kdsweep.teacher_targets")}
    h["plots"].result()
    return out


def alone(cfg, student: str) -> dict[str, float]:
    """The student trained with alpha=0 and no teacher, in this process: its images/s."""
    from trainables.loop import LocalReporter, train_student

    trial = cfg.trial(student, {"loss.alpha": 0.0, "seed": 0}, distill=False, profile=False)
    r = train_student(trial, LocalReporter(None, log_epochs=False))
    rates = [h["images_per_s"] for h in r.history]
    return {"steady": steady(rates), "first": rates[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny: 32 px, 10 classes, 32 images, 1 epoch")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--n-val", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--cpus", type=float, default=8.0, help="CPUs per trial")
    p.add_argument("--out", type=Path)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    if args.smoke:
        args.size, args.classes, args.n_train, args.n_val, args.epochs, args.batch, args.topk, args.cpus = 32, 10, 32, 16, 1, 16, 3, 1.0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = args.out or Path(tempfile.mkdtemp(prefix="kdsweep-imagenet-shaped-"))
    out.mkdir(parents=True, exist_ok=True)
    config = out / "sweep.json"
    config.write_text(json.dumps(sweep_config(args, out)))
    subprocess.run([sys.executable, "-m", "orchestrator.cli", "teacher", str(config)], check=True, cwd=REPO)

    from orchestrator.plan.config import SweepConfig, validate

    cfg = validate(SweepConfig, json.loads(config.read_text()), "benchmark")
    swept = in_sweep(cfg)
    rows = {s: (swept[s], alone(cfg, s)) for s in STUDENTS}
    print(f"\n{args.n_train} images of {args.size} px, {args.classes} classes, batch {args.batch}, {args.epochs} epochs; "
          f"teacher torchvision.resnet50, top-{args.topk} cache; random-resized-crop + flip views\n")
    print("| student | images/s in the sweep (KD, top-k cache) | alone (alpha=0, no teacher) | sweep / alone | first epoch: sweep, alone |")
    print("|---|---|---|---|---|")
    for s, (a, b) in rows.items():
        print(f"| {s} | {a['steady']:,.0f} | {b['steady']:,.0f} | {a['steady'] / b['steady']:.2f} | {a['first']:,.0f}, {b['first']:,.0f} |")
        if a["targets"] != "cache":
            logging.warning("%s's trial ran its teacher %s, not from the cache", s, a["targets"])
    if args.json:
        args.json.write_text(json.dumps({s: {"sweep": a, "alone": b} for s, (a, b) in rows.items()}, indent=2))


if __name__ == "__main__":
    main()
