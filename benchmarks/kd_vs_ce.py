"""Does distillation help? The same student trained with alpha=0 (plain CE) and with KD, several seeds.

Prints one Markdown table (mean +- std over seeds): the teacher, the alpha=0 student and the KD
student (one row per `--methods` loss) on the test split, in the task's numbers (Task.versus: a
classifier's clean accuracy, macro F1, mean corruption accuracy, ECE...; a language model's
perplexity, NLL, next-token accuracy...), agreement with the teacher, and parameter and CPU
latency ratios to the teacher. The teacher is trained once (cached under teachers/). Settings are fixed
up front, not tuned, so reading the test split here is a measurement, not a search.

  python benchmarks/kd_vs_ce.py                                   # digits, a minute on CPU
  python benchmarks/kd_vs_ce.py search_spaces/fashion_mnist.yaml --set dataset.root=../shared/data \\
      --seeds 0 1 2 --student mlp_32
  python benchmarks/kd_vs_ce.py search_spaces/fashion_mnist.yaml --set dataset.root=../shared/data \\
      --set dataset.unlabeled.labels_kept=0.1 --seeds 0 1 2 --student cnn_tiny   # 10% of the labels: teacher
      # and no-KD student on them alone, the KD student with the other 90% as unlabelled transfer data
  python benchmarks/kd_vs_ce.py search_spaces/lm_kjv.yaml --methods fkl rkl jsd --seeds 0 1 2   # a language model
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time

from orchestrator.plan.config import load_config
from orchestrator.plan.prepare import check_data, ensure_teacher
from trainables.api import Normalized, evaluate_on_split
from trainables.models.profile import profile_together
from trainables.loop import train_student
from trainables.reporters import LocalReporter
from trainables.models.teacher import load_teacher
from trainables.teacher_cache import build_teacher_cache

log = logging.getLogger("kdsweep.bench")
#: the numbers shown as percentages (the rest as they are: NLL, perplexity)
PERCENT = {"acc": 100.0, "macro_f1": 100.0, "robust_acc": 100.0, "relative_robustness": 100.0, "ece": 100.0, "agreement": 100.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--student")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--alpha", type=float, default=None, help="KD alpha (default: the config's)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--methods", nargs="+", help="KD losses, one row each (default: the config's loss.name)")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--kd-only", action="store_true", help="only the KD student (its no-KD row measured before)")
    only.add_argument("--control-only", action="store_true",
                      help="only the no-KD student (e.g. with more epochs: as many steps as the KD student's labelled + unlabelled epochs)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    cfg = load_config(args.config, args.overrides)
    info = check_data(cfg)
    teacher_dir = ensure_teacher(cfg, info)
    student = args.student or cfg.students[0]
    ds = cfg.dataset
    splits = cfg.task.splits(ds)
    teacher, card = load_teacher(teacher_dir)
    raw = teacher
    teacher = Normalized(teacher, *card.stats).eval()
    t_eval = evaluate_on_split(cfg.task, teacher, None, splits, seed=cfg.seed)["student"]
    t_eval.setdefault("test_robust_acc", None)  # text: no corruption suite
    objective = cfg.primary.key  # the task's (val_acc; a language model's val_ppl)
    shown = [(k, label) for k, label in cfg.task.versus if k != "test_agreement" and not k.startswith("test_kl")]
    kd = {"loss.alpha": args.alpha if args.alpha is not None else cfg.loss.alpha,
          "loss.temperature": args.temperature if args.temperature is not None else cfg.loss.temperature}
    rows = {}
    mixed = splits.n_unlabeled and (ds.unlabeled.ratio is None or ds.unlabeled.ratio > 0)  # ratio 0: KD on the labelled alone
    unlabeled = f" + {splits.n_unlabeled} unlabelled" if mixed else ""
    methods = args.methods or [cfg.loss.name]
    kd_arms = [(f"KD {m if args.methods else ''} (T={kd['loss.temperature']}, alpha={kd['loss.alpha']}){unlabeled}".replace("KD  ", "KD "),
                {**kd, "loss.name": m}) for m in methods]
    arms = [("no-KD (alpha=0)", {"loss.alpha": 0.0}), *kd_arms]
    for label, overrides in arms[1:] if args.kd_only else arms[:1] if args.control_only else arms:
        runs = []
        for seed in args.seeds:
            trial = cfg.trial(student, {**overrides, "seed": seed, "train.robust_samples": 0}, teacher_path=teacher_dir, profile=False)
            if trial.loss.distills and cfg.train.teacher_cache:  # as in a sweep: the targets from its cache (train.teacher_topk applies)
                raw_teacher, raw_card = load_teacher(teacher_dir)
                path, _ = build_teacher_cache(trial, raw_teacher, raw_card, cfg.sweep_dir() / "teacher_cache")
                trial = trial.model_copy(update={"teacher_cache": str(path)})
            t0 = time.perf_counter()
            r = train_student(trial, LocalReporter(None, log_epochs=False))
            if r.metrics["status"] == "diverged":  # NaN/inf loss: reported as such, kept out of the means
                runs.append({"diverged": True, "epoch": r.metrics["epoch"]})
                log.info("%s seed=%d: diverged at epoch %d", label, seed, r.metrics["epoch"])
                continue
            test = evaluate_on_split(cfg.task, Normalized(r.model, r.preprocess["mean"], r.preprocess["std"]).eval(), teacher, splits, seed=cfg.seed)["student"]
            both = profile_together({"s": r.model, "t": raw}, cfg.task.inputs(splits.input_shape))  # timed interleaved, one thread
            size, t_size = both["s"], both["t"]
            runs.append({objective: r.metrics[objective], **{k: test.get(k) for k, _ in shown}, "test_agreement": test["test_agreement"],
                         "params_ratio": t_size["params"] / size["params"],
                         "latency_ratio": t_size["latency_cpu_b1_ms"] / size["latency_cpu_b1_ms"], "seconds": time.perf_counter() - t0})
            log.info("%s seed=%d: %s", label, seed, " ".join(f"{k}={v:.4f}" for k, v in runs[-1].items() if v is not None))
        rows[label] = runs

    def ms(runs, key, scale=None, digits=2):
        scale = scale if scale is not None else PERCENT.get(key.removeprefix("test_"), 1.0)
        vals = [scale * r[key] for r in runs if not r.get("diverged") and r.get(key) is not None]
        if not vals:
            return "diverged" if any(r.get("diverged") for r in runs) else "-"
        return f"{statistics.mean(vals):.{digits}f} +- {(statistics.stdev(vals) if len(vals) > 1 else 0):.{digits}f}"

    per = cfg.task.per_example(splits.input_shape)
    examples = cfg.task.unit if per == 1 else f"blocks of {per} {cfg.task.unit}"
    topk = f", teacher targets top-{cfg.train.teacher_topk} of {splits.num_classes}" if cfg.train.teacher_topk else ""
    print(f"\n{ds.name}: teacher {card.arch} (val acc {100 * card.val_acc:.2f}%), student {student}{topk}, "
          f"{cfg.train.epochs} epochs, seeds {args.seeds}; {splits.n_labeled} labelled train {examples}{unlabeled or ' (no unlabelled)'}; "
          "test split, mean +- std over seeds\n")
    labels = [f"test {label}{' %' if k.removeprefix('test_') in PERCENT else ''}" for k, label in shown]
    print("| model | diverged | " + " | ".join(labels) + " | agreement w/ teacher % | params ratio | CPU latency ratio (b1) |")
    print("|---" * (len(shown) + 5) + "|")
    print(f"| teacher {card.arch} | - | " + " | ".join(ms([t_eval], k).split(" +- ")[0] for k, _ in shown) + " | 100 | 1.0 | 1.0 |")
    for label, runs in rows.items():
        diverged = sum(bool(r.get("diverged")) for r in runs)
        ratio = next((f"{r['params_ratio']:.1f}" for r in runs if not r.get("diverged")), "-")
        print(f"| {student} {label} | {diverged}/{len(runs)} | " + " | ".join(ms(runs, k) for k, _ in shown)
              + f" | {ms(runs, 'test_agreement')} | {ratio} | {ms(runs, 'latency_ratio', 1.0, 1)} |")


if __name__ == "__main__":
    main()
