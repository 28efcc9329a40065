"""Image-folder throughput: kdsweep's decode-once against the peer's DataLoader + ImageFolder per trial.

Writes a folder of N JPEGs (10 classes, sizes varying around --source-size), then runs the same
trials (student, epochs, batch size, optimizer, image size) both ways on this machine, one after
the other, and prints one table:

- kdsweep: `image_folder` decoded once in parallel into the uint8 cache (the first trial pays it),
  every trial memory-maps the cache, batches and augmentation (random-resized-crop + flip) on the
  training device (trainables/loop.train_student, as a sweep trial runs it).
- peer: torchvision ImageFolder + DataLoader(num_workers=--workers) with RandomResizedCrop +
  flip + ToTensor + Normalize, built per trial; every epoch decodes every JPEG again, as the
  Ray/Optuna/MLflow docs way does. Validation each epoch, like kdsweep's.

Times are whole trials (model build, data, epochs, validation), wall clock, same process.

  python benchmarks/folder_throughput.py                     # 4000 images, 3 trials x 2 epochs
  python benchmarks/folder_throughput.py --images 400 --trials 2 --epochs 1   # smoke (CI)
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainables.data import load_splits  # noqa: E402
from trainables.config import DatasetConfig  # noqa: E402
from trainables.loop import train_student
from trainables.reporters import LocalReporter  # noqa: E402
from trainables.models import create_model  # noqa: E402

log = logging.getLogger("kdsweep.bench")


def write_folder(root: Path, n: int, size: int, classes: int = 10) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        c = i % classes
        d = root / "train" / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        h, w = size + int(rng.integers(-size // 4, size // 4)), size + int(rng.integers(-size // 4, size // 4))
        base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3)).astype(np.uint8)
        a = np.kron(base, np.ones((8, 8, 1), np.uint8))[:h, :w] // 2 + np.uint8(12 * c)
        Image.fromarray(a).save(d / f"{i}.jpg", quality=90)


def run_kdsweep(root: Path, cache: Path, args) -> dict:
    ds = {"name": "image_folder", "root": str(root), "cache": str(cache), "image_size": args.image_size, "val_fraction": 0.1,
          "test_fraction": 0.1, "augment": {"resized_crop": {"scale": [0.35, 1.0]}, "flip": True}}
    t0 = time.perf_counter()
    decode_s = load_splits(DatasetConfig(**ds)).decode_s  # what the driver does before Ray starts (check_data)
    accs = []
    for trial in range(args.trials):
        r = train_student({"dataset": ds, "student": args.student, "loss": {"alpha": 0.0}, "seed": trial, "profile": False, "device": args.device,
                           "train": {"epochs": args.epochs, "batch_size": args.batch_size, "robust_samples": 0}}, LocalReporter(None, log_epochs=False))
        accs.append(r.metrics["val_acc"])
    wall = time.perf_counter() - t0
    t1 = time.perf_counter()
    reload_s = load_splits(DatasetConfig(**ds)).decode_s
    return {"wall_s": wall, "decode_s": decode_s, "second_decode_s": reload_s, "second_load_s": time.perf_counter() - t1,
            "trial_epochs_per_hour": args.trials * args.epochs * 3600 / wall, "val_acc": float(np.mean(accs))}


def run_peer(root: Path, args) -> dict:
    import torchvision.transforms as T
    from torch.utils.data import DataLoader, Subset
    from torchvision.datasets import ImageFolder

    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    norm = T.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    train_tf = T.Compose([T.RandomResizedCrop(args.image_size, scale=(0.35, 1.0)), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    val_tf = T.Compose([T.Resize(args.image_size), T.CenterCrop(args.image_size), T.ToTensor(), norm])
    t0 = time.perf_counter()
    accs = []
    for trial in range(args.trials):
        torch.manual_seed(trial)
        n = len(ImageFolder(str(root / "train")))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
        n_val, n_test = n // 10, n // 10
        train = Subset(ImageFolder(str(root / "train"), transform=train_tf), perm[n_val + n_test :])
        val = Subset(ImageFolder(str(root / "train"), transform=val_tf), perm[:n_val])
        loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, num_workers=args.workers, drop_last=True,
                            pin_memory=device.type == "cuda", persistent_workers=False)
        val_loader = DataLoader(val, batch_size=512, num_workers=args.workers)
        model = create_model(args.student, 10, (3, args.image_size, args.image_size)).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
        for _ in range(args.epochs):
            model.train()
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            model.eval()
            correct = 0
            with torch.no_grad():
                for x, y in val_loader:
                    correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
        accs.append(correct / len(val))
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "trial_epochs_per_hour": args.trials * args.epochs * 3600 / wall, "val_acc": float(np.mean(accs))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--source-size", type=int, default=96, help="typical side of the JPEGs written")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--student", default="cnn_tiny")
    p.add_argument("--workers", type=int, default=2, help="the peer's DataLoader workers")
    p.add_argument("--device", default="auto")
    p.add_argument("--json")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "photos"
        write_folder(root, args.images, args.source_size)
        kd = run_kdsweep(root, Path(d) / "cache", args)
        peer = run_peer(root, args)
    print(f"\n{args.images} JPEGs (~{args.source_size}px) -> {args.image_size}px, {args.trials} trials x {args.epochs} epochs of "
          f"{args.student}, batch {args.batch_size}; whole trials, wall clock, same machine, same run\n")
    print("| | peer (DataLoader + ImageFolder per trial) | kdsweep (decode once) |")
    print("|---|---|---|")
    print(f"| wall s | {peer['wall_s']:.1f} | {kd['wall_s']:.1f} |")
    print(f"| trial-epochs per hour | {peer['trial_epochs_per_hour']:.0f} | {kd['trial_epochs_per_hour']:.0f} |")
    print(f"| speed-up | 1.00x | {kd['trial_epochs_per_hour'] / peer['trial_epochs_per_hour']:.2f}x |")
    print(f"| decode s (first load / next sweep) | every epoch, in {args.workers} workers | {kd['decode_s']:.2f} / {kd['second_decode_s']:.2f} "
          f"(load {kd['second_load_s']:.2f}) |")
    print(f"| mean val acc | {peer['val_acc']:.4f} | {kd['val_acc']:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"peer": peer, "kdsweep": kd, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
