"""kdsweep: distillation sweeps from the command line. Thin: parse -> validate -> act.

Every user error is one line on stderr and exit code 2, raised before Ray starts or files are written.
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import threading
from typing import Sequence

from trainables.registry import ConfigError

log = logging.getLogger("orchestrator.cli")  # not __name__: `python -m orchestrator.cli` runs this as __main__


def _add_config(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("config", nargs=None if required else "?", help="sweep YAML (default: the embedded digits sweep)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (dotted path or alias: temperature, alpha, lr, epochs, ...)")


def cmd_teacher(args: argparse.Namespace) -> int:
    from orchestrator.plan.config import load_config
    from orchestrator.plan.prepare import check_data, ensure_teacher

    cfg = load_config(args.config, args.overrides)
    info = check_data(cfg)
    ensure_teacher(cfg, info, train_missing=True)
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    """One standalone trial of the config's base values (no Ray), per-epoch metrics printed."""
    from orchestrator.plan.config import load_config
    from orchestrator.plan.prepare import check_data, check_teacher, ensure_teacher
    from trainables.api import check_model, train

    cfg = load_config(args.config, args.overrides)
    student = args.student or cfg.students[0]
    if student not in cfg.students:
        try:
            cfg.students.append(check_model(student))
        except ValueError as e:
            raise ConfigError(f"`--student` {e}") from None
    needs_teacher = cfg.loss.distills
    trial = cfg.trial(student, distill=needs_teacher, checkpoint_dir=args.checkpoint_dir)  # validated before anything runs
    info = check_data(cfg)
    if needs_teacher:
        check_teacher(cfg, info) or ensure_teacher(cfg, info)
    log.info("distilling %s (loss=%s, T=%s, alpha=%s, lr=%s) on %s", student, cfg.loss.name, cfg.loss.temperature, cfg.loss.alpha,
             cfg.train.optimizer.lr, cfg.dataset.name)
    result = train(trial)
    key = cfg.primary.key
    log.info("final %s=%.4f params=%d", key, result.metrics.get(key, float("nan")), int(result.metrics.get("size_params", 0)))
    return 0


def _selection(args: argparse.Namespace) -> dict:
    """The selection flags as the Python API takes them (parsed before anything runs, so a typo
    fails in the first second)."""
    from orchestrator.select.selection import parse_bounds
    from trainables.eval.metrics import Objective, metric

    for o in args.objective or []:
        Objective.parse(o)
    minimum = parse_bounds(args.min, "--min")
    maximum = parse_bounds(args.max, "--max")
    if args.max_params is not None:
        maximum[metric("params").name] = args.max_params
    if args.max_latency_ms is not None:
        maximum[metric("latency_ms").name] = args.max_latency_ms
    return {"objectives": args.objective or None, "minimum": minimum, "maximum": maximum}


def cmd_run(args: argparse.Namespace) -> int:
    from orchestrator.api import run_sweep_from
    from orchestrator.plan.config import load_config
    from orchestrator.run.sweep import make_plan

    selection = _selection(args)
    if args.dry_run:
        plan, _ = make_plan(load_config(args.config, args.overrides), args.tracking_uri, args.address)
        log.info("%s", plan.describe())
        return 0
    run_sweep_from(args.config, args.overrides, address=args.address, tracking_uri=args.tracking_uri, verbose=args.verbose, **selection)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from orchestrator.api import resume_sweep

    resume_sweep(args.name, args.storage, address=args.address, tracking_uri=args.tracking_uri, verbose=args.verbose, **_selection(args))
    return 0


def cmd_best(args: argparse.Namespace) -> int:
    from orchestrator.api import best_of

    if args.confirm_top is not None and args.confirm_seeds is None:
        raise ConfigError("`--confirm-top` goes with --confirm-seeds N (the seeds each finalist should have in all): add it")
    best_of(args.name, args.storage, args.tracking_uri, confirm_seeds=args.confirm_seeds, confirm_top=args.confirm_top,
            address=args.address, verbose=args.verbose, **_selection(args))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from orchestrator.select.report import write_report

    from orchestrator.run.sweep import open_sweep

    saved, tracker, parent = open_sweep(args.name, args.storage, args.tracking_uri)
    out = write_report(saved, tracker, parent, args.out)
    log.info("report written to %s/report.md and %s/report.html (also logged to the sweep's parent run)", out, out)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from orchestrator.select.export import export

    from orchestrator.run.sweep import open_sweep

    saved, tracker, parent = open_sweep(args.name, args.storage, args.tracking_uri)
    export(saved, tracker, parent, args.format, args.out, args.trial)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    import subprocess

    from orchestrator.track.store import default_tracking_uri, sweep_views

    uri = args.tracking_uri or default_tracking_uri()
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port)]
    log.info("serving %s on http://%s:%d", uri, args.host, args.port)
    for name, url in sweep_views(uri, f"http://{args.host}:{args.port}"):
        log.info("  sweep %s: %s", name, url)
    # Its own process group, so the server's workers stop with it whichever way we end. MLflow's job
    # runner (eight huey consumers, each importing mlflow: GenAI judges and trace rollups) serves
    # nothing a sweep logs: off unless the environment turns it on.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    server = subprocess.Popen(cmd, start_new_session=True, env=env)
    try:
        return server.wait()
    finally:
        _stop_group(server)


def _stop_group(proc, grace_s: float = 10.0) -> None:
    import subprocess

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; its group may not be
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return


def _add_sweep_name(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="the sweep's name (its folder under --storage)")
    p.add_argument("--storage", help="the sweep's storage path (default: ./runs)")
    p.add_argument("--tracking-uri", help="override the tracking URI the sweep was run with")


def _add_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--objective", action="append", metavar="METRIC[:max|min]",
                   help="Pareto objectives; the first picks the winner (default: val_acc, params:min, latency_ms:min)")
    p.add_argument("--min", action="append", default=[], metavar="METRIC=X", help="constraint on any logged metric, e.g. robust_acc=0.8")
    p.add_argument("--max", action="append", default=[], metavar="METRIC=X", help="constraint on any logged metric, e.g. params=1e6")
    p.add_argument("--max-params", type=float, help="shortcut for --max params=N")
    p.add_argument("--max-latency-ms", type=float, help="shortcut for --max latency_ms=X (CPU, batch 1)")


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

    r = sub.add_parser("run", help="run a sweep (Ray Tune + Optuna over Ray Train trials, tracked in MLflow)")
    _add_config(r)
    r.add_argument("--address", help="join an existing Ray cluster (e.g. ray://host:10001 or auto; default: RAY_ADDRESS, else a local Ray of its own)")
    r.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite DB under ./mlruns)")
    r.add_argument("--dry-run", action="store_true", help="validate and print the plan; start nothing")
    r.add_argument("--verbose", action="store_true", help="Tune's own progress output instead of kdsweep's table")
    _add_selection(r)
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("resume", help="finish a sweep whose driver died (Tuner.restore)")
    _add_sweep_name(s)
    s.add_argument("--address")
    s.add_argument("--verbose", action="store_true", help="Tune's own progress output instead of kdsweep's table")
    _add_selection(s)
    s.set_defaults(func=cmd_resume)

    b = sub.add_parser("best", help="leaderboard, Pareto front and champion of a finished sweep")
    _add_sweep_name(b)
    _add_selection(b)
    b.add_argument("--confirm-seeds", type=int, metavar="N",
                   help="first train the finalists again until each has N seeds (beside their alpha=0 controls), without searching again")
    b.add_argument("--confirm-top", type=int, metavar="K", help="with --confirm-seeds: the finalists to confirm (default: the sweep's budget.confirm.top, at least 1)")
    b.add_argument("--address", help="with --confirm-seeds: join an existing Ray cluster")
    b.add_argument("--verbose", action="store_true", help="with --confirm-seeds: Tune's own progress output instead of kdsweep's table")
    b.set_defaults(func=cmd_best)

    rp = sub.add_parser("report", help="Markdown/HTML summary of a finished sweep with plots, logged to MLflow")
    _add_sweep_name(rp)
    rp.add_argument("--out", help="output folder (default: STORAGE/NAME/report)")
    rp.set_defaults(func=cmd_report)

    e = sub.add_parser("export", help="the champion (or --trial) alone: ONNX, TorchScript or safetensors, preprocessing built in")
    _add_sweep_name(e)
    e.add_argument("--format", default="onnx", help="onnx (default), torchscript or safetensors")
    e.add_argument("--out", help="output folder (default: STORAGE/NAME/export)")
    e.add_argument("--trial", help="a trial id instead of the champion")
    e.set_defaults(func=cmd_export)

    u = sub.add_parser("ui", help="serve the MLflow UI for the local store on 127.0.0.1")
    u.add_argument("--tracking-uri")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=5000)
    u.set_defaults(func=cmd_ui)
    return p


class _Stdout(logging.StreamHandler):
    """Progress goes to the current stdout (stderr carries only errors: one line, exit 2)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _):
        pass


def _setup_logging() -> None:
    for name in ("orchestrator", "trainables"):
        logger = logging.getLogger(name)
        if not any(isinstance(h, _Stdout) for h in logger.handlers):
            handler = _Stdout()
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _terminate(signum, frame) -> None:
    """SIGTERM ends a command like Ctrl-C ends it: through every `finally`, so the Ray it started
    and the servers it runs stop with it."""
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    _setup_logging()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"kdsweep: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from orchestrator.track.store import TrackingUnavailable

        if not isinstance(e, TrackingUnavailable):
            raise
        print(f"kdsweep: error: {e}", file=sys.stderr)
        return 1


def entry() -> None:
    """The `kdsweep` command: main(), then exit without the interpreter's last garbage collection,
    which walks every object torch, Ray and MLflow made (2 s of a 2-core CPU, after the work is
    done; atexit handlers and non-daemon threads still run, and the OS frees the memory)."""
    rc = main()
    gc.freeze()
    sys.exit(rc)


if __name__ == "__main__":
    entry()
