"""What KD itself costs per epoch: the same student, the same epochs, in one process, trained with
alpha=0 (CE alone), with KD from the sweep's teacher cache (dense), and with KD from a top-k cache;
the cache's epochs built before timing (as the first trial of a sweep builds them), each arm run in
turn `--repeats` times. Also what a sweep's first trial adds before its first epoch: the val
split's targets, whatever the epoch count (the driver only writes the cache's key; augmented epochs
are built by the trials that reach them).

  python benchmarks/kd_overhead.py                      # CIFAR-100-shaped random images, CPU
  python benchmarks/kd_overhead.py --device cuda --n-train 50000 --student resnet8x4

Prints one table: median epoch seconds (epochs after the first), the ratio to alpha=0, the cache's
bytes per view. The target (issue "Scale"): KD epoch <= 1.10x the alpha=0 epoch.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from trainables.config import TrialConfig
from trainables.data import load_splits
from trainables.data.placement import place
from trainables.loop import train_student
from trainables.models import create_model
from trainables.models.teacher import load_teacher, save_teacher
from trainables.reporters import LocalReporter
from trainables.teacher_cache import Builder, TeacherCache, build_teacher_cache, bytes_per_view


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--student", default="cnn_tiny")
    ap.add_argument("--teacher", default="cnn_small")
    ap.add_argument("--topk", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        data = {"name": "synthetic", "val_fraction": 0.1, "cache": str(root / "data"), "augment": {"crop_pad": 4, "flip": True},
                "kwargs": {"n_train": args.n_train, "n_test": 256, "shape": [3, 32, 32], "num_classes": args.classes}}
        s = load_splits(TrialConfig.model_validate({"dataset": data}).dataset)
        teacher_dir = root / "teacher"
        save_teacher(create_model(args.teacher, args.classes, s.input_shape), teacher_dir, {
            "arch": args.teacher, "arch_kwargs": {}, "num_classes": args.classes, "input_shape": list(s.input_shape), "classes": list(s.classes),
            "mean": list(s.mean), "std": list(s.std), "dataset": "synthetic", "val_acc": 0.0, "epochs": 0, "normalize": "dataset"})
        teacher, card = load_teacher(teacher_dir, device=args.device)

        def trial(alpha: float, topk: int | None = None, cache: str | None = None) -> TrialConfig:
            return TrialConfig.model_validate({
                "dataset": data, "student": args.student, "teacher_path": str(teacher_dir), "teacher_cache": cache, "device": args.device,
                "loss": {"name": "kd", "alpha": alpha, "temperature": 4.0}, "profile": False,
                "train": {"epochs": args.epochs, "batch_size": args.batch_size, "robust_samples": 0, "teacher_topk": topk}})

        caches, prepare = {}, {}
        for topk in (None, args.topk):
            c = trial(0.9, topk)
            t0 = time.perf_counter()
            path, _ = build_teacher_cache(c, teacher, card, root / "cache", args.device)
            prepare[topk] = time.perf_counter() - t0
            opened = TeacherCache.open(path, c, card)
            opened.builder = Builder(c, teacher, card, *place(s, c.dataset, args.device), args.device)
            for epoch in range(args.epochs):  # what the first trial of a sweep would build
                opened.for_epoch(epoch, "cpu")
            caches[topk] = str(path)

        arms = {"alpha=0 (CE alone)": trial(0.0), "KD, dense cache": trial(0.9, None, caches[None]),
                f"KD, top-{args.topk} cache": trial(0.9, args.topk, caches[args.topk])}
        times: dict[str, list[float]] = {name: [] for name in arms}
        for _ in range(args.repeats):
            for name, cfg in arms.items():
                r = train_student(cfg, LocalReporter(None, log_epochs=False))
                assert name.startswith("alpha=0") or r.metrics["teacher_targets"] == "cache", r.metrics["teacher_targets"]
                times[name] += [h["epoch_time_s"] for h in r.history[1:]]

    base = statistics.median(times["alpha=0 (CE alone)"])
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"\n{args.student} on {args.n_train} random 3x32x32 images, {args.classes} classes, batch {args.batch_size}, crop+flip, "
          f"{args.epochs} epochs x {args.repeats} repeats, {device}; epochs after each run's first\n")
    print("| arm | median epoch s | vs alpha=0 | bytes a view |")
    print("|---|---|---|---|")
    for name, t in times.items():
        per_view = "-" if name.startswith("alpha=0") else bytes_per_view(args.classes, args.topk if "top-" in name else None)
        print(f"| {name} | {statistics.median(t):.3f} | {statistics.median(t) / base:.3f}x | {per_view} |")
    print(f"\nthe val split's targets, built by a sweep's first trial before its first epoch (the driver only keys the cache): "
          f"{prepare[None]:.2f} s dense, {prepare[args.topk]:.2f} s top-{args.topk}, whatever the epoch count")


if __name__ == "__main__":
    main()
