"""Sweep throughput: the peer recipe (../shared/bench/peer_sweep.py, the Ray/Optuna/MLflow docs way)
against kdsweep on the same sweep, run one after the other on the same machine, one table.

Same data shape (random uint8 images of CIFAR shape), teacher (resnet32x4), student (resnet8x4),
trials, epochs and search space; ASHA is told to stop nothing, so both run the same trial-epochs.
The kdsweep teacher is trained for one epoch before the timed sweep (the peer's is untrained; neither
is timed). GPU busy is nvidia-smi's utilization sampled every 250 ms during each sweep.

  python benchmarks/sweep_throughput.py                      # one GPU: 4 trials x 2 epochs, 50k images
  python benchmarks/sweep_throughput.py --smoke              # CPU, tiny: checks the pipeline (CI)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


class GpuSampler:
    """Mean GPU utilization over a window, from nvidia-smi; None where there is no NVIDIA GPU."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.proc = None

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "250"],
                                         stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.samples.append(float(line.split(",")[0]))
            except ValueError:
                pass

    def __exit__(self, *exc) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait()

    @property
    def busy(self) -> float | None:
        return statistics.mean(self.samples) / 100 if self.samples else None


def run_peer(args, out: Path) -> dict:
    cmd = [sys.executable, str(args.peer), "--trials", str(args.trials), "--epochs", str(args.epochs), "--n-train", str(args.n_train),
           "--n-test", str(args.n_test), "--classes", str(args.classes), "--batch", str(args.peer_batch),
           "--workers", str(args.peer_workers), "--out", str(out)]
    with GpuSampler() as gpu:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"peer failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    res = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    steps = args.n_train // args.peer_batch
    per_trial_train = args.epochs * steps * args.peer_batch / res["median_train_images_per_s"]
    return {"wall_s": wall, "trial_epochs_per_hour": args.trials * args.epochs * 3600 / res["wall_s"], "gpu_busy": gpu.busy,
            "overhead_s": res["wall_s"] / args.trials - per_trial_train, "teacher_forwards": args.trials * args.epochs * steps * args.peer_batch,
            "best_val_acc": res["best_val_acc"], "runs": res["mlflow_runs"]}


def sweep_config(args, out: Path) -> dict:
    cfg = yaml.safe_load((REPO / "search_spaces" / "default.yaml").read_text())
    vf = args.n_test / (args.n_train + args.n_test)  # the train split keeps n_train images, like the peer's
    cfg.update(name="throughput", storage=str(out / "runs"), students=["resnet8x4"], mode="joint")
    cfg["dataset"] = {"name": "synthetic", "val_fraction": vf, "augment": {"crop_pad": 4, "flip": True},
                      "kwargs": {"n_train": args.n_train + args.n_test, "n_test": args.n_test, "shape": [3, 32, 32], "num_classes": args.classes}}
    cfg["teacher"] = {"arch": "resnet32x4", "epochs": 1, "batch_size": args.batch, "path": str(out / "teacher")}
    cfg["loss"] = {"name": "kd", "temperature": 4.0, "alpha": 0.9}
    cfg["train"] = {"epochs": args.epochs, "batch_size": args.batch, "optimizer": {"name": "sgd", "lr": 0.05}, "compile": args.compile}
    cfg["search"] = {"temperature": {"type": "float", "low": 1.0, "high": 8.0}, "alpha": {"type": "float", "low": 0.1, "high": 0.95},
                     "lr": {"type": "float", "low": 1e-3, "high": 0.2, "log": True}}
    cfg["budget"] = {"num_samples": args.trials, "max_concurrent": args.concurrent, "grace_period": args.epochs, "reduction_factor": 2}
    cfg["resources"] = {"cpus_per_trial": args.cpus_per_trial, "gpus_per_trial": args.gpus_per_trial, "num_workers": 1}
    cfg["tracking"] = {"uri": f"sqlite:///{out / 'mlruns' / 'mlflow.db'}"}
    return cfg


def run_kdsweep(args, out: Path) -> dict:
    import mlflow

    from orchestrator.config import SweepConfig, validate
    from orchestrator.prepare import check_data, ensure_teacher
    from orchestrator.sweep import run_sweep

    cfg = validate(SweepConfig, sweep_config(args, out), "benchmark")
    ensure_teacher(cfg, check_data(cfg))  # not timed: the peer's teacher is untrained
    with GpuSampler() as gpu:
        t0 = time.perf_counter()
        h = run_sweep(cfg)
        wall = time.perf_counter() - t0
    client = mlflow.tracking.MlflowClient(cfg.tracking.uri)
    runs = [r for r in h["tracker"].find_runs(f"tags.mlflow.parentRunId = '{h['parent_run_id']}'")]
    startup = [client.get_metric_history(r.info.run_id, "trial_startup_s")[0].value for r in runs]
    trial_forwards = sum(max((m.value for m in client.get_metric_history(r.info.run_id, "teacher_forward_images")), default=0) for r in runs)
    parent = client.get_run(h["parent_run_id"]).data.metrics
    return {"wall_s": wall, "trial_epochs_per_hour": args.trials * args.epochs * 3600 / wall, "gpu_busy": gpu.busy,
            "overhead_s": statistics.mean(startup), "teacher_forwards": int(parent.get("teacher_cache_forward_images", 0) + trial_forwards),
            "best_val_acc": max(r.data.metrics.get("final_val_acc", 0.0) for r in runs), "runs": len(runs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU-sized run that checks the pipeline (CI)")
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--n-train", type=int, default=50000)
    p.add_argument("--n-test", type=int, default=10000)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--batch", type=int, default=512, help="kdsweep batch")
    p.add_argument("--peer-batch", type=int, default=64)
    p.add_argument("--peer-workers", type=int, default=4)
    p.add_argument("--concurrent", type=int, default=4, help="kdsweep trials at once")
    p.add_argument("--gpus-per-trial", type=float, default=0.25)
    p.add_argument("--cpus-per-trial", type=float, default=2.0)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--peer", type=Path, default=REPO.parent / "shared" / "bench" / "peer_sweep.py")
    p.add_argument("--out", type=Path)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    if args.smoke:
        # the peer's resnet32x4 teacher runs at a few images/s on a 2-core CPU: keep it tiny
        args.trials, args.epochs, args.n_train, args.n_test, args.classes = 2, 1, 64, 32, 10
        args.batch, args.peer_batch, args.peer_workers, args.concurrent = 32, 32, 0, 1
        args.gpus_per_trial, args.cpus_per_trial = 0.0, 1.0
    if not args.peer.is_file():
        raise SystemExit(f"peer recipe not found at {args.peer}: pass --peer PATH")
    out = args.out or Path(tempfile.mkdtemp(prefix="kdsweep-throughput-"))
    out.mkdir(parents=True, exist_ok=True)
    peer = run_peer(args, out / "peer")
    ours = run_kdsweep(args, out / "kdsweep")
    fmt = lambda v, f: "n/a" if v is None else f.format(v)
    rows = [("trial-epochs per hour", "{:,.1f}", "trial_epochs_per_hour"), ("sweep wall (s)", "{:.1f}", "wall_s"),
            ("GPU busy", "{:.0%}", "gpu_busy"), ("fixed overhead per trial (s)", "{:.1f}", "overhead_s"),
            ("teacher image forwards", "{:,}", "teacher_forwards"), ("best val acc", "{:.4f}", "best_val_acc"), ("MLflow runs", "{}", "runs")]
    print(f"\n{args.trials} trials x {args.epochs} epochs, {args.n_train} train images {'(smoke, CPU)' if args.smoke else ''}\n")
    print("| | peer (docs recipe) | kdsweep |\n|---|---|---|")
    for label, f, key in rows:
        print(f"| {label} | {fmt(peer[key], f)} | {fmt(ours[key], f)} |")
    print(f"| **speed-up (trial-epochs/h)** | 1.0x | **{ours['trial_epochs_per_hour'] / peer['trial_epochs_per_hour']:.1f}x** |")
    if args.json:
        args.json.write_text(json.dumps({"peer": peer, "kdsweep": ours, "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))


if __name__ == "__main__":
    main()
