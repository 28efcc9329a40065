"""kdsweep: distillation sweeps from the command line. Thin: parse -> validate -> act.

Every user error is one line on stderr and exit code 2, raised before Ray starts or files are written.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from trainables.registry import ConfigError


def _add_config(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("config", nargs=None if required else "?", help="sweep YAML (default: the embedded digits sweep)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (dotted path or alias: temperature, alpha, lr, epochs, ...)")


def cmd_teacher(args: argparse.Namespace) -> int:
    from orchestrator.config import load_config
    from orchestrator.prepare import check_data, ensure_teacher

    cfg = load_config(args.config, args.overrides)
    info = check_data(cfg)
    ensure_teacher(cfg, info, train_missing=True)
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    """One standalone trial of the config's base values (no Ray), per-epoch metrics printed."""
    from orchestrator.config import load_config
    from orchestrator.prepare import check_data, check_teacher, ensure_teacher
    from trainables.loop import train_student

    cfg = load_config(args.config, args.overrides)
    student = args.student or cfg.students[0]
    if student not in cfg.students and args.student:
        cfg.students.append(student)
    info = check_data(cfg)
    needs_teacher = cfg.loss.alpha > 0
    teacher = None
    if needs_teacher:
        teacher = check_teacher(cfg, info) or ensure_teacher(cfg, info)
    trial = cfg.trial(student, teacher_path=str(teacher) if teacher else None)
    if not needs_teacher:
        trial["teacher_path"] = None
    trial["checkpoint_dir"] = args.checkpoint_dir
    print(f"distilling {student} (loss={cfg.loss.name}, T={cfg.loss.temperature}, alpha={cfg.loss.alpha}, "
          f"lr={cfg.train.optimizer.lr}) on {cfg.dataset.name}")
    result = train_student(trial)
    print(f"final val_acc={result.metrics['val_acc']:.4f} params={int(result.metrics.get('size_params', 0))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdsweep", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("teacher", help="train and save the config's teacher")
    _add_config(t)
    t.set_defaults(func=cmd_teacher)

    d = sub.add_parser("distill", help="one standalone distillation trial (no Ray)")
    _add_config(d)
    d.add_argument("--student", help="student architecture (default: the config's first student)")
    d.add_argument("--checkpoint-dir", help="save a checkpoint every epoch here, and resume from it")
    d.set_defaults(func=cmd_distill)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"kdsweep: error: {e}", file=sys.stderr)
        return 2


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
