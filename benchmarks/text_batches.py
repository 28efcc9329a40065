"""What grouping texts of similar length into batches saves: the same student trained for the same
epochs (alpha=0) with length-grouped batches and with plain shuffled ones, in one process, repeated.

Prints a Markdown table: seconds an epoch (median over repeats) and the ratio plain / grouped, with
the share of padded positions each kind of batch holds.

  python benchmarks/text_batches.py search_spaces/text_reviews.yaml --student hf.bert-L2-H128-A2 --repeats 2
"""
from __future__ import annotations

import argparse
import logging
import statistics
from unittest import mock

import torch

import trainables.data.batches as batches
from orchestrator.plan.config import load_config
from orchestrator.plan.prepare import check_data
from trainables.data import load_splits
from trainables.data.batches import epoch_batches, text_lengths
from trainables.loop import train_student
from trainables.reporters import LocalReporter

log = logging.getLogger("kdsweep.bench")


def padding_share(lengths: torch.Tensor, batch_size: int, grouped: bool) -> float:
    """Padded positions a model computes (each batch cut to its longest text), as a share of all."""
    from trainables.config import AugmentConfig

    batches = [idx for _, idx, _ in epoch_batches(len(lengths), batch_size, 0, 0, AugmentConfig(), (1, 1),
                                                  lengths=lengths if grouped else None)]
    computed = sum(int(lengths[b].max()) * len(b) for b in batches)
    return 1.0 - sum(int(lengths[b].sum()) for b in batches) / computed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--student", required=True)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config(args.config, args.overrides)
    check_data(cfg)
    splits = load_splits(cfg.dataset)
    lengths = text_lengths(splits)
    over = {"loss.alpha": 0.0, "train.epochs": args.epochs, "train.robust_samples": 0, "seed": 0}
    trial = cfg.trial(args.student, over, distill=False, profile=False)
    seconds: dict[str, list[float]] = {"grouped": [], "plain": []}
    for _ in range(args.repeats):
        for kind in ("plain", "grouped"):
            patch = mock.patch.object(batches, "text_lengths", lambda s: None) if kind == "plain" else mock.patch.object(batches, "text_lengths", text_lengths)
            with patch:
                r = train_student(trial, LocalReporter(None, log_epochs=False))
            seconds[kind].append(statistics.median(h["epoch_time_s"] for h in r.history))
            log.info("%s: %.1f s an epoch, val_acc %.4f", kind, seconds[kind][-1], r.metrics["val_acc"])
    plain, grouped = (statistics.median(seconds[k]) for k in ("plain", "grouped"))
    b = cfg.train.batch_size
    print(f"\n{args.student}, {len(lengths)} train texts, max_length {splits.input_shape[0]}, batch {b}, "
          f"{args.repeats} repeats (median), one process\n")
    print("| batches | s / epoch | padded positions computed | plain / grouped |")
    print("|---|---|---|---|")
    print(f"| plain (shuffled) | {plain:.1f} | {100 * padding_share(lengths, b, False):.1f} % | 1.00 |")
    print(f"| grouped by length | {grouped:.1f} | {100 * padding_share(lengths, b, True):.1f} % | {plain / grouped:.2f} |")


if __name__ == "__main__":
    main()
