"""Sweep throughput: the peer recipe (../shared/bench/peer_sweep.py, the Ray/Optuna/MLflow docs way)
against kdsweep on the same sweep, run one after the other on the same machine, one table.

Same data shape (random uint8 images of CIFAR shape), teacher (resnet32x4), student (resnet8x4),
trials, epochs and search space; ASHA is told to stop nothing, so both run the same trial-epochs.
Both are timed the same way: as whole processes, from Python's start to its exit (imports,
ray.init, the sweep, Ray's shutdown). The kdsweep teacher is trained for one epoch in a process of
its own before (the peer's is untrained; neither is timed). GPU busy is nvidia-smi's utilization
sampled every 250 ms during each sweep process.

`--floor` adds the floor of any Ray Tune sweep on this machine, timed the same way: a process that
imports torch and Ray, starts Ray as kdsweep does, runs the same trials x epochs through a Tune run
of trials that only report (and make their CUDA context where there is a GPU), and shuts Ray down.
Peer wall / floor wall is the most any Tune-based tool could beat the peer by on this sweep.

  python benchmarks/sweep_throughput.py                      # one GPU: 4 trials x 2 epochs, 50k images
  python benchmarks/sweep_throughput.py --smoke              # CPU, tiny: checks the pipeline (CI); its columns run side by side
"""
from __future__ import annotations

import argparse
import gc
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


def timed(cmd: list[str], log: Path) -> tuple[float, float | None, str]:
    """(wall s, GPU busy, stdout) of a whole process; its output is kept in `log`."""
    with GpuSampler() as gpu:
        t0 = time.perf_counter()
        # RAY_ADDRESS=local: each process starts a Ray of its own (the peer's bare ray.init() would join the last `ray start`'s)
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": "local"})
        wall = time.perf_counter() - t0
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode:
        raise SystemExit(f"{cmd[1]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, gpu.busy, proc.stdout


def last_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def run_peer(args, out: Path) -> dict:
    trials, epochs = args.peer_trials or args.trials, args.peer_epochs or args.epochs
    cmd = [sys.executable, str(args.peer), "--trials", str(trials), "--epochs", str(epochs), "--n-train", str(args.n_train),
           "--n-test", str(args.n_test), "--classes", str(args.classes), "--batch", str(args.peer_batch),
           "--workers", str(args.peer_workers), "--out", str(out)]
    wall, busy, stdout = timed(cmd, out / "process.log")
    res = last_json(stdout)
    steps = args.n_train // args.peer_batch
    per_trial_train = epochs * steps * args.peer_batch / res["median_train_images_per_s"]
    return {"wall_s": wall, "trial_epochs_per_hour": trials * epochs * 3600 / wall, "gpu_busy": busy, "trials_x_epochs": f"{trials} x {epochs}",
            "overhead_s": res["wall_s"] / trials - per_trial_train, "teacher_forwards": trials * epochs * steps * args.peer_batch,
            "best_val_acc": res["best_val_acc"], "runs": res["mlflow_runs"]}


def sweep_config(args, out: Path, warm: bool = True) -> dict:
    cfg = yaml.safe_load((REPO / "search_spaces" / "default.yaml").read_text())
    vf = args.n_test / (args.n_train + args.n_test)  # the train split keeps n_train images, like the peer's
    cfg.update(name="throughput", storage=str(out / "runs"), students=["resnet8x4"], mode="joint")
    cfg["dataset"] = {"name": "synthetic", "val_fraction": vf, "augment": {"crop_pad": 4, "flip": True},
                      "kwargs": {"n_train": args.n_train + args.n_test, "n_test": args.n_test, "shape": [3, 32, 32], "num_classes": args.classes}}
    # the teacher is not timed nor compared: no corruption suite at its end (15 s of a CPU smoke's 23)
    cfg["teacher"] = {"arch": "resnet32x4", "epochs": 1, "batch_size": args.batch, "path": str(out / "teacher"), "robust_samples": 0}
    cfg["loss"] = {"name": "kd", "temperature": 4.0, "alpha": 0.9}
    cfg["train"] = {"epochs": args.epochs, "batch_size": args.batch, "optimizer": {"name": "sgd", "lr": 0.05}, "compile": args.compile}
    cfg["search"] = {"temperature": {"type": "float", "low": 1.0, "high": 8.0}, "alpha": {"type": "float", "low": 0.1, "high": 0.95},
                     "lr": {"type": "float", "low": 1e-3, "high": 0.2, "log": True}}
    cfg["budget"] = {"num_samples": args.trials, "max_concurrent": args.concurrent, "grace_period": args.epochs, "reduction_factor": 2, "confirm": {"top": 0}}
    cfg["resources"] = {"cpus_per_trial": args.cpus_per_trial, "gpus_per_trial": args.gpus_per_trial, "num_workers": 1, "warm_trials": warm}
    cfg["tracking"] = {"uri": f"sqlite:///{out / 'mlruns' / 'mlflow.db'}"}
    return cfg


def run_kdsweep(args, out: Path, warm: bool = True) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    config = out / "sweep.json"
    config.write_text(json.dumps(sweep_config(args, out, warm)))
    # the teacher, in a process of its own (not timed: the peer's is untrained)
    subprocess.run([sys.executable, "-m", "orchestrator.cli", "teacher", str(config)], check=True, cwd=REPO, capture_output=True)
    wall, busy, stdout = timed([sys.executable, __file__, "--sweep-process", str(config)], out / "process.log")
    res = last_json(stdout)
    return {"wall_s": wall, "trial_epochs_per_hour": args.trials * args.epochs * 3600 / wall, "gpu_busy": busy,
            "trials_x_epochs": f"{args.trials} x {args.epochs}", **res}


def run_floor(args, out: Path) -> dict:
    wall, busy, _ = timed([sys.executable, __file__, "--floor-process", json.dumps(
        {"trials": args.trials, "epochs": args.epochs, "concurrent": args.concurrent, "cpus": args.cpus_per_trial,
         "gpus": args.gpus_per_trial})], out / "process.log")
    return {"wall_s": wall, "trial_epochs_per_hour": args.trials * args.epochs * 3600 / wall, "gpu_busy": busy,
            "trials_x_epochs": f"{args.trials} x {args.epochs}", "overhead_s": None, "teacher_forwards": 0,
            "best_val_acc": None, "runs": 0}


def floor_process(spec: str) -> None:
    """The timed floor: Ray started as a sweep starts it, Tune trials that only report."""
    import tempfile

    import ray
    import torch
    from ray import tune

    from orchestrator.run.sweep import ray_session

    o = json.loads(spec)

    def trial(config: dict) -> None:
        if torch.cuda.is_available():
            torch.zeros(1, device="cuda")  # a real trial's CUDA context
        for epoch in range(1, o["epochs"] + 1):
            tune.report({"epoch": epoch})

    with ray_session(None):
        trainable = tune.with_resources(trial, {"CPU": o["cpus"], "GPU": o["gpus"]})
        tune.Tuner(trainable, param_space={"i": tune.grid_search(list(range(o["trials"])))},
                   tune_config=tune.TuneConfig(max_concurrent_trials=o["concurrent"], reuse_actors=True),
                   run_config=tune.RunConfig(storage_path=tempfile.mkdtemp(), verbose=0)).fit()
    assert not ray.is_initialized()
    gc.freeze()  # the same exit as kdsweep's process


def sweep_process(config: Path) -> None:
    """The timed kdsweep process: the sweep of `config`, then one JSON line of what it measured."""
    import logging

    from orchestrator.plan.config import SweepConfig, validate
    from orchestrator.run.sweep import run_sweep

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")  # the timeline, in process.log
    cfg = validate(SweepConfig, json.loads(config.read_text()), "benchmark")
    h = run_sweep(cfg)
    import mlflow  # after the sweep, as `kdsweep run` has it: imported while Ray starts, by the tracker's thread

    client = mlflow.tracking.MlflowClient(cfg.tracking.uri)
    runs = h["tracker"].trial_runs(h["parent_run_id"])
    startup = [client.get_metric_history(r.info.run_id, "trial_startup_s")[0].value for r in runs]
    trial_forwards = sum(max((m.value for m in client.get_metric_history(r.info.run_id, "teacher_forward_images")), default=0) for r in runs)
    print(json.dumps({"overhead_s": statistics.median(startup), "startup_s": startup, "teacher_forwards": int(trial_forwards),
                      "best_val_acc": max(r.data.metrics.get("final_val_acc", 0.0) for r in runs), "runs": len(runs)}))
    h["plots"].result()  # drawn beside the queries above; the process's exit waits for them either way
    gc.freeze()  # as the kdsweep command exits (orchestrator.cli.entry): no last collection


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
    p.add_argument("--peer-trials", type=int, help="run the peer on fewer trials than kdsweep (its rate per trial-epoch is compared)")
    p.add_argument("--peer-epochs", type=int, help="run the peer on fewer epochs per trial than kdsweep")
    p.add_argument("--concurrent", type=int, default=4, help="kdsweep trials at once")
    p.add_argument("--gpus-per-trial", type=float, default=0.25)
    p.add_argument("--cpus-per-trial", type=float, default=2.0)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--cold", action="store_true", help="also run kdsweep with resources.warm_trials: false (a worker group per trial)")
    p.add_argument("--floor", action="store_true", help="also time a Ray Tune run of trials that do nothing (the floor of any Tune sweep)")
    p.add_argument("--peer", type=Path, default=REPO.parent / "shared" / "bench" / "peer_sweep.py")
    p.add_argument("--no-peer", action="store_true", help="leave the peer out (no speed-up row: use with --floor)")
    p.add_argument("--out", type=Path)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--sweep-process", type=Path, help=argparse.SUPPRESS)  # the timed kdsweep child
    p.add_argument("--floor-process", help=argparse.SUPPRESS)  # the timed floor child
    args = p.parse_args()
    if args.sweep_process:
        return sweep_process(args.sweep_process)
    if args.floor_process:
        return floor_process(args.floor_process)
    if args.smoke:
        # the peer's resnet32x4 teacher runs at a few images/s on a 2-core CPU: keep it tiny
        args.trials, args.epochs, args.n_train, args.n_test, args.classes = 2, 1, 64, 32, 10
        args.batch, args.peer_batch, args.peer_workers, args.concurrent = 32, 32, 0, 1
        args.gpus_per_trial, args.cpus_per_trial = 0.0, 1.0
    if not args.no_peer and not args.peer.is_file():
        raise SystemExit(f"peer recipe not found at {args.peer}: pass --peer PATH")
    out = args.out or Path(tempfile.mkdtemp(prefix="kdsweep-throughput-"))
    out.mkdir(parents=True, exist_ok=True)
    columns = {}
    if args.smoke and not args.no_peer:
        # a smoke checks the pipeline, not speed: the peer's process runs beside kdsweep's teacher and
        # sweep (each with its own Ray), half the wall of one after the other; a measurement runs them apart
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            peer, ours = pool.submit(run_peer, args, out / "peer"), pool.submit(run_kdsweep, args, out / "kdsweep")
            columns["peer (docs recipe)"], columns["kdsweep"] = peer.result(), ours.result()
    else:
        if not args.no_peer:
            columns["peer (docs recipe)"] = run_peer(args, out / "peer")
            print("peer:", json.dumps(columns["peer (docs recipe)"]), flush=True)
        columns["kdsweep"] = run_kdsweep(args, out / "kdsweep")
    if args.cold:
        columns["kdsweep, warm_trials off"] = run_kdsweep(args, out / "kdsweep-cold", warm=False)
    if args.floor:
        columns["floor: Tune trials that do nothing"] = run_floor(args, out / "floor")
    print("results:", json.dumps(columns), flush=True)
    fmt = lambda v, f: "n/a" if v is None else f.format(v)  # noqa: E731
    rows = [("trials x epochs", "{}", "trials_x_epochs"), ("trial-epochs per hour (whole process)", "{:,.1f}", "trial_epochs_per_hour"),
            ("process wall (s)", "{:.1f}", "wall_s"), ("GPU busy", "{:.0%}", "gpu_busy"),
            ("fixed overhead per trial (s; kdsweep: median trial_startup_s)", "{:.2f}", "overhead_s"),
            ("teacher image forwards", "{:,}", "teacher_forwards"), ("best val acc", "{:.4f}", "best_val_acc"), ("MLflow runs", "{}", "runs")]
    print(f"\n{args.trials} trials x {args.epochs} epochs, {args.n_train} train images {'(smoke, CPU)' if args.smoke else ''}\n")
    print("| | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for label, f, key in rows:
        print(f"| {label} | " + " | ".join(fmt(c[key], f) for c in columns.values()) + " |")
    if not args.no_peer:
        rate = columns["peer (docs recipe)"]["trial_epochs_per_hour"]
        print("| **speed-up (trial-epochs/h)** | " + " | ".join(f"**{c['trial_epochs_per_hour'] / rate:.1f}x**" for c in columns.values()) + " |")
    if args.floor:
        floor = columns["floor: Tune trials that do nothing"]["wall_s"]
        print("| wall / floor wall | " + " | ".join(f"{c['wall_s'] / floor:.2f}" for c in columns.values()) + " |")
    if args.json:
        named = {"peer": columns.get("peer (docs recipe)"), "kdsweep": columns["kdsweep"], "floor": columns.get("floor: Tune trials that do nothing")}
        args.json.write_text(json.dumps({**named, "columns": columns, "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))


if __name__ == "__main__":
    main()
