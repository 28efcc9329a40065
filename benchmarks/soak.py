"""Soak: many short trials through two reused trial actors. Does memory creep, does MLflow keep up,
does the console stay readable?

  python benchmarks/soak.py                 # 200 trials of mlp_32 on digits, 2 epochs each, 2 at a time
  python benchmarks/soak.py --trials 40     # a quicker look

Runs `kdsweep run` as a process from an empty folder (confirmation off), samples the driver's resident
memory, then reads MLflow: each trial's actor (`kdsweep.trial_pid`) and its resident memory at the
trial's last epoch (`process_rss_mb`). Prints, per actor and for the driver, the memory after its 20th
trial and after its last and the growth between them (target: <= 10 %), the child runs by status
(target: `trials` runs, none left RUNNING) and the console's size.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import mlflow
import psutil


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--student", default="mlp_32")
    ap.add_argument("--after", type=int, default=20, help="growth measured from each process's Nth trial")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        cmd = [sys.executable, "-m", "orchestrator.cli", "run", "--set", "name=soak", "--set", f"budget.num_samples={args.trials}",
               "--set", "budget.max_concurrent=2", "--set", "budget.confirm.top=0", "--set", f"train.epochs={args.epochs}",
               "--set", f"students=[{args.student}]", "--set", "train.robust_samples=0"]
        samples: list[tuple[float, float]] = []  # (time, driver rss MiB)
        start = time.time()
        proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        driver = psutil.Process(proc.pid)

        def sample() -> None:
            while proc.poll() is None:
                try:
                    rss = driver.memory_info().rss / 2**20
                except psutil.Error:
                    return
                if rss:  # 0 once the process has exited
                    samples.append((time.time(), rss))
                time.sleep(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        out = proc.communicate()[0]
        sampler.join()
        wall = time.time() - start
        if proc.returncode != 0:
            print(out[-4000:])
            raise SystemExit(f"kdsweep run exited {proc.returncode}")

        client = mlflow.tracking.MlflowClient(f"sqlite:///{work / 'mlruns' / 'mlflow.db'}")
        exp = client.get_experiment_by_name("soak")
        runs = [r for r in client.search_runs([exp.experiment_id], max_results=10000) if r.data.tags.get("kdsweep.role") == "trial"]
        # When the driver logged each trial's last epoch (a run's end_time can move later: the selection
        # writes to the champion's run after the sweep).
        last_epoch = {r.info.run_id: max(m.timestamp for m in client.get_metric_history(r.info.run_id, "val_acc")) / 1000 for r in runs}

    by_actor: dict[str, list] = defaultdict(list)
    for r in sorted(runs, key=lambda r: last_epoch[r.info.run_id]):
        by_actor[r.data.tags.get("kdsweep.trial_pid", "?")].append(r)
    statuses: dict[str, int] = defaultdict(int)
    for r in runs:
        statuses[f"{r.info.status} / {r.data.tags.get('kdsweep.status', '-')}"] += 1

    print(f"\n{args.trials} trials x {args.epochs} epochs of {args.student} on digits, 2 at a time, {wall:.0f} s wall\n")
    print(f"| process | trials | RSS after trial {args.after} (MiB) | RSS after the last (MiB) | growth |")
    print("|---|---|---|---|---|")
    for pid, rs in sorted(by_actor.items(), key=lambda kv: -len(kv[1])):
        if len(rs) < args.after:
            print(f"| actor {pid} | {len(rs)} | - | {rs[-1].data.metrics.get('process_rss_mb', float('nan')):.0f} | (fewer than {args.after} trials) |")
            continue
        a, b = rs[args.after - 1].data.metrics["process_rss_mb"], rs[-1].data.metrics["process_rss_mb"]
        print(f"| actor {pid} | {len(rs)} | {a:.0f} | {b:.0f} | {100 * (b - a) / a:+.1f} % |")
    ended = sorted(last_epoch.values())
    if len(ended) >= args.after and samples:
        def rss_at(t: float) -> float:  # the last sample taken by then (Tune's result grid is built right after the last trial)
            return max((s for s in samples if s[0] <= t), default=samples[0])[1]

        at, last = rss_at(ended[args.after - 1]), rss_at(ended[-1])
        print(f"| driver | {len(runs)} | {at:.0f} | {last:.0f} | {100 * (last - at) / at:+.1f} % |")
        after = [rss for t, rss in samples if t > ended[-1]]
        print(f"| driver, after the trials (Tune's result grid, Optuna's export and plots, selection) | | | {max(after, default=last):.0f} (peak) | |")
        marks = sorted({n for n in (args.after, len(ended) // 4, len(ended) // 2, 3 * len(ended) // 4, len(ended)) if n >= 1})
        print("\ndriver RSS (MiB) after trial " + ", ".join(f"{n}: {rss_at(ended[n - 1]):.0f}" for n in marks))
    print(f"\nchild runs: {len(runs)} (" + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) + ")")
    lines = out.splitlines()
    print(f"console: {len(lines)} lines, the longest {max(map(len, lines))} characters; its last lines:\n")
    print("\n".join(lines[-6:]))


if __name__ == "__main__":
    main()
