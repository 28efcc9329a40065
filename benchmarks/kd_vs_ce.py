"""Does distillation help? The same student trained with alpha=0 (plain CE) and with KD, several seeds.

Prints one Markdown table (mean +- std over seeds) of val accuracy, test accuracy and the student's
agreement with the teacher. The teacher is trained once (cached under teachers/). Settings are fixed
up front, not tuned, so reading the test split here is a measurement, not a search.

  python benchmarks/kd_vs_ce.py                                   # digits, a minute on CPU
  python benchmarks/kd_vs_ce.py search_spaces/fashion_mnist.yaml --set dataset.root=../shared/data \\
      --seeds 0 1 2 --student mlp_32
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from orchestrator.config import load_config
from orchestrator.prepare import check_data, ensure_teacher
from trainables.data import load_dataset, normalizer
from trainables.loop import LocalReporter, predict, train_student
from trainables.teacher import load_teacher


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--student")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--alpha", type=float, default=None, help="KD alpha (default: the config's)")
    p.add_argument("--temperature", type=float, default=None)
    args = p.parse_args()

    cfg = load_config(args.config, args.overrides)
    info = check_data(cfg)
    teacher_dir = ensure_teacher(cfg, info)
    student = args.student or cfg.students[0]
    ds = cfg.dataset
    splits = load_dataset(ds.name, ds.root, ds.val_fraction, ds.split_seed, ds.download, **ds.kwargs)
    norm = normalizer(splits, "cpu")
    teacher, card = load_teacher(teacher_dir)
    t_test = predict(teacher, splits.test_x, norm, 2048, torch.no_grad, False).argmax(1)
    kd = {"alpha": args.alpha if args.alpha is not None else cfg.loss.alpha,
          "temperature": args.temperature if args.temperature is not None else cfg.loss.temperature}
    rows = {}
    for label, overrides in (("no-KD (alpha=0)", {"alpha": 0.0}), (f"KD (T={kd['temperature']}, alpha={kd['alpha']})", kd)):
        runs = []
        for seed in args.seeds:
            trial = cfg.trial(student, overrides, teacher_path=str(teacher_dir))
            trial.update(seed=seed, profile=False)
            t0 = time.perf_counter()
            r = train_student(trial, LocalReporter(None, printer=None))
            pred = predict(r.model, splits.test_x, norm, 2048, torch.no_grad, False).argmax(1)
            runs.append({"val_acc": r.metrics["val_acc"], "test_acc": (pred == splits.test_y).float().mean().item(),
                         "agreement": (pred == t_test).float().mean().item(), "seconds": time.perf_counter() - t0})
            print(f"{label} seed={seed}: " + " ".join(f"{k}={v:.4f}" for k, v in runs[-1].items()), flush=True)
        rows[label] = runs

    def ms(runs, key):
        vals = [r[key] for r in runs]
        return f"{100 * statistics.mean(vals):.2f} +- {100 * (statistics.stdev(vals) if len(vals) > 1 else 0):.2f}"

    print(f"\n{ds.name}: teacher {card['arch']} (val {100 * card['val_acc']:.2f}%), student {student}, "
          f"{cfg.train.epochs} epochs, seeds {args.seeds}\n")
    print("| run | val acc % | test acc % | test agreement with teacher % |")
    print("|---|---|---|---|")
    for label, runs in rows.items():
        print(f"| {label} | {ms(runs, 'val_acc')} | {ms(runs, 'test_acc')} | {ms(runs, 'agreement')} |")


if __name__ == "__main__":
    main()
