"""Quality is not traded for warm trials: the same Fashion-MNIST sweep, per seed, once with warm
trials (one reused Tune actor trains trial after trial, data and teacher kept) and once with a Ray
Train worker group per trial (`resources.warm_trials: false`); one table of val accuracy per trial.

One trial at a time, so Optuna (seeded by the sweep's seed) proposes the same points on both paths
whenever the results agree; trials 2.. of a warm sweep run in the actor the first one started.

  python benchmarks/warm_quality.py --root ../shared/data            # 3 seeds x 3 trials x 2 epochs
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def sweep(root: str, out: Path, seed: int, warm: bool, trials: int, epochs: int) -> dict:
    cfg = yaml.safe_load((REPO / "search_spaces" / "fashion_mnist.yaml").read_text())
    cfg.update(name=f"quality-s{seed}-{'warm' if warm else 'group'}", seed=seed, storage=str(out / "runs"), students=["cnn_tiny"], mode="joint")
    cfg["dataset"]["root"] = root
    cfg["teacher"]["path"] = str(out / "teacher")
    cfg["train"].update(epochs=epochs, batch_size=256, robust_samples=0)
    cfg["budget"] = {"num_samples": trials, "max_concurrent": 1, "grace_period": epochs, "confirm": {"top": 0}}
    cfg["resources"] = {"cpus_per_trial": 2, "gpus_per_trial": 0, "num_workers": 1, "warm_trials": warm}
    cfg["tracking"] = {"uri": f"sqlite:///{out / 'mlflow.db'}"}
    return cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="folder holding FashionMNIST/raw")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from orchestrator.plan.config import SweepConfig, validate
    from orchestrator.plan.prepare import check_data, ensure_teacher
    from orchestrator.run.sweep import ray_session, run_sweep

    out = args.out or Path(tempfile.mkdtemp(prefix="kdsweep-quality-"))
    rows = []
    with ray_session(None):
        for seed in args.seeds:
            accs = {}
            for warm in (True, False):
                cfg = validate(SweepConfig, sweep(args.root, out, seed, warm, args.trials, args.epochs), "quality")
                ensure_teacher(cfg, check_data(cfg))
                h = run_sweep(cfg)
                h["plots"].result()
                runs = h["tracker"].trial_runs(h["parent_run_id"])
                runs.sort(key=lambda r: r.info.start_time)
                accs[warm] = [(r.data.params["temperature"], r.data.params["alpha"], r.data.params["lr"], r.data.metrics["val_acc"]) for r in runs]
            for i, (w, g) in enumerate(zip(accs[True], accs[False])):
                rows.append({"seed": seed, "trial": i + 1, "point": w[:3], "same_point": w[:3] == g[:3], "warm": w[3], "group": g[3]})
    print("\n| seed | trial | T, alpha, lr | val acc, warm actor | val acc, worker group per trial | same |\n|---|---|---|---|---|---|")
    for r in rows:
        t, a, lr = (float(v) for v in r["point"])
        print(f"| {r['seed']} | {r['trial']} | {t:.2f}, {a:.2f}, {lr:.4f} | {r['warm']:.4f} | {r['group']:.4f} | "
              f"{'yes' if r['same_point'] and r['warm'] == r['group'] else 'NO'} |")
    (out / "quality.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
