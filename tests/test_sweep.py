"""End-to-end sweeps on CPU against one shared Ray instance (see conftest.ray_address)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import mlflow
import optuna
import pytest
import torch

from orchestrator.cli import main
from tests.conftest import count_rows, free_port, mlflow_store, sweep_yaml, wait_for_http

pytestmark = pytest.mark.integration


def child_runs(uri: str, experiment: str):
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("kdsweep.role") == "trial"]


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, digits_teacher, ray_address):
    """The default sweep, small, run once from its own folder (`kdsweep run` as a user runs it); the
    tests below read what it left and go on from it (best, report, export, the UI), in this order.
    Sequential trials make ASHA's decisions deterministic, so a stopped trial is always covered; the
    teacher is trained by the sweep (as from an empty folder), for fewer epochs."""
    tmp_path = tmp_path_factory.mktemp("e2e")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        cfg = sweep_yaml(tmp_path, digits_teacher, "e2e", **{"budget.max_concurrent": 1, "teacher.path": None, "teacher.epochs": 4,
                                                             "train.robust_samples": 1000})
        console = io.StringIO()
        with contextlib.redirect_stdout(console):
            code = main(["run", str(cfg), "--address", ray_address])
        assert code == 0, console.getvalue()[-3000:]
        uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
        yield SimpleNamespace(path=tmp_path, cfg=cfg, out=console.getvalue(), uri=uri, client=mlflow.tracking.MlflowClient(uri),
                              runs=child_runs(uri, "e2e"))
    finally:
        os.chdir(cwd)


def test_joint_sweep_end_to_end(e2e, ray_address, capsys):
    tmp_path, cfg, out, uri, client, runs = e2e.path, e2e.cfg, e2e.out, e2e.uri, e2e.client, e2e.runs
    assert "leaderboard" in out and "Pareto front" in out and "kd_gain" in out and "champion:" in out
    # the console: kdsweep's compact lines (not a TTY here), not Tune's per-trial dump or its token resource line
    assert re.search(r"^done   trial=\w+  student=(mlp_32|cnn_tiny)  loss=kd  T=[\d.]+  alpha=[\d.]+  lr=[\d.]+  seed=0  epoch=\d/3  val_acc=[\d.]+  status=\w+  role=search", out, re.M)
    assert re.search(r"^  sweep e2e: 5 done, 0 running, 0 left of 5; best val_acc 0\.\d+; trials hold 0 CPU; ETA", out, re.M)
    assert "Logical resource usage" not in out and "Trial status" not in out and "Configuration for experiment" not in out

    assert len(runs) == 5
    assert {r.info.status for r in runs} == {"FINISHED"}
    statuses = Counter(r.data.tags["kdsweep.status"] for r in runs)
    assert set(statuses) == {"finished", "stopped"} and statuses["finished"] >= 2, statuses
    stopped = [r for r in runs if r.data.tags["kdsweep.status"] == "stopped"]
    assert all(r.data.metrics["epochs_run"] < 3 for r in stopped)
    # trials that started after an ASHA stop still got their workers (no leaked placement group)
    last_start = max(r.info.start_time for r in runs)
    assert any(r.info.start_time < last_start for r in stopped)
    for r in runs:
        assert {"student", "temperature", "alpha", "lr", "loss", "seed", "trial_id"} <= set(r.data.params)
        # the fully resolved trial config: flattened params and a JSON artifact, searched values applied
        p = r.data.params
        assert float(p["trial.train.optimizer.lr"]) == float(p["lr"]) and float(p["trial.loss.temperature"]) == float(p["temperature"])
        assert {"trial.train.grad_clip", "trial.train.batch_size", "trial.dataset.cache", "trial.teacher_path"} <= set(p)
        with tempfile.TemporaryDirectory() as d:
            resolved = json.loads(open(client.download_artifacts(r.info.run_id, "trial_config.json", d)).read())
        assert resolved["train"]["optimizer"]["lr"] == float(p["lr"]) and resolved["student"] == p["student"]
        assert r.data.tags["kdsweep.teacher_targets"] in ("cache", "precomputed", "none")
        # teacher_forward_images is per epoch (one value per epoch), never folded into size metrics
        assert [m.step for m in client.get_metric_history(r.info.run_id, "teacher_forward_images")] == list(range(1, int(r.data.metrics["epochs_run"]) + 1))
        # size metrics come from the once-per-architecture profile, identical for one student
        assert [m.step for m in client.get_metric_history(r.info.run_id, "size_params")] == [0]
        assert r.data.metrics["size_params"] > 0 and r.data.metrics["size_bytes"] > 0
        assert r.data.metrics["size_latency_cpu_b1_ms"] > 0 and r.data.metrics["size_flops"] > 0
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_acc")]
        assert steps == list(range(1, int(r.data.metrics["epochs_run"]) + 1))
        assert {"val_macro_f1", "val_macro_recall", "val_ece", "val_nll", "val_agreement", "val_kl_teacher"} <= set(r.data.metrics)
        assert r.data.metrics["compression_params"] > 1 and r.data.metrics["teacher_params"] > r.data.metrics["size_params"]
        if r.data.tags["kdsweep.status"] == "finished":
            assert [a.path for a in client.list_artifacts(r.info.run_id, "student")] == ["student/student.json", "student/student.safetensors"]
            assert {a.path for a in client.list_artifacts(r.info.run_id, "eval")} >= {"eval/per_class.csv", "eval/corruptions.csv"}
            assert 0 < r.data.metrics["robust_acc"] <= 1 and "corr_gaussian_noise" in r.data.metrics
    # the alpha=0 controls ran every epoch (ASHA never stops them), one per student
    controls = [r for r in runs if float(r.data.params["alpha"]) == 0.0]
    assert sorted(r.data.params["student"] for r in controls) == ["cnn_tiny", "mlp_32"]
    assert all(r.data.tags["kdsweep.status"] == "finished" for r in controls)

    # MLflow UI: a model-training experiment with kdsweep's shared view; readable run names
    exp = client.get_experiment_by_name("e2e")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(exp.tags["mlflow.sharedViewState.kdsweep"])
    assert {"metrics.`val_acc`", "metrics.`kd_gain`", "metrics.`size_params`", "params.`temperature`", "params.`alpha`", "params.`lr`"} <= set(view["selectedColumns"])
    for r in runs:
        assert re.fullmatch(rf"{r.data.params['student']}-kd-T\d+\.\d\d-a\d\.\d\d-{r.data.tags['kdsweep.trial_id']}", r.info.run_name), r.info.run_name
        assert "kd_gain" in client.get_run(r.info.run_id).data.metrics or r.data.tags["kdsweep.status"] not in ("finished", "stopped")
    # Optuna's study, kept and loadable; its plots on the parent run
    study = optuna.load_study(study_name="e2e-joint", storage=f"sqlite:///{tmp_path / 'runs' / 'e2e' / 'optuna.db'}")
    assert len(study.trials) == 5 and study.best_value == max(r.data.metrics["val_acc"] for r in runs)

    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model("models:/kdsweep-e2e@champion")
    pred = model(torch.rand(4, 1, 8, 8) * 255)
    assert pred.shape == (4, 10)
    requirements = (Path(mlflow.artifacts.download_artifacts("models:/kdsweep-e2e@champion")) / "requirements.txt").read_text().split()
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements and any(r.startswith("mlflow==") for r in requirements)
    parent = [r for r in client.search_runs([runs[0].info.experiment_id]) if r.data.tags.get("kdsweep.role") == "parent"]
    assert len(parent) == 1 and "champion_test_acc" in parent[0].data.metrics
    assert {"champion_test_robust_acc", "teacher_test_acc", "teacher_test_robust_acc"} <= set(parent[0].data.metrics)
    assert "kdsweep.version.git_commit" in parent[0].data.tags
    assert "| teacher |" in out and "| champion (" in out
    # latency: the teacher and every student timed back to back, interleaved, while nothing else ran
    # (no trial's run, not the teacher's training), and every number shown comes from that one measurement
    with tempfile.TemporaryDirectory() as d:
        record = json.loads(open(client.download_artifacts(parent[0].info.run_id, "latency.json", d)).read())
    (t0, t1), (_, train1) = record["window"], record["teacher_training"]
    assert record["running"] == [] and record["threads"] == 1 and all(3 <= n <= 7 for n in record["rounds"].values()), record
    for r in runs:  # a trial ran from its run's start to its last logged result (selection reopens the champion's run later)
        end = max(m.timestamp for m in client.get_metric_history(r.info.run_id, "epochs_run"))
        assert end <= 1000 * t0 or r.info.start_time >= 1000 * t1, (r.info.run_name, r.info.start_time, end, record["window"])
    assert train1 <= t0
    times = record["latency"]
    assert set(times) == {"teacher", "mlp_32", "cnn_tiny"}
    for r in runs:
        mine = times[r.data.params["student"]]
        assert r.data.metrics["size_latency_cpu_b1_ms"] == pytest.approx(mine["latency_cpu_b1_ms"])
        assert r.data.metrics["teacher_latency_cpu_b1_ms"] == pytest.approx(times["teacher"]["latency_cpu_b1_ms"])
        assert r.data.metrics["speedup_latency_cpu_b1"] == pytest.approx(times["teacher"]["latency_cpu_b1_ms"] / mine["latency_cpu_b1_ms"])
    assert "speedup (CPU, batch 1; 1 thread, interleaved with the teacher, after the search, no trial running) |" in out

    # the same name again is a one-line error, not a second sweep mixed into the first
    assert main(["run", str(cfg), "--address", ray_address]) == 2
    assert "already has a sweep" in capsys.readouterr().err


def e2e_parent(e2e):
    (parent,) = [r for r in e2e.client.search_runs([e2e.runs[0].info.experiment_id]) if r.data.tags.get("kdsweep.role") == "parent"]
    return parent


def test_best_rereads_mlflow_honours_constraints_and_does_not_test_a_winner_again(e2e, capsys):
    tmp_path, uri, client, runs = e2e.path, e2e.uri, e2e.client, e2e.runs
    assert main(["best", "e2e", "--storage", str(tmp_path / "runs"), "--max-params", "2000"]) == 0
    out = capsys.readouterr().out
    assert "champion: cnn_tiny" in out  # mlp_32 has 2,410 parameters, cnn_tiny 1,702
    versions = len(client.search_model_versions("name='kdsweep-e2e'"))
    assert main(["best", "e2e", "--storage", str(tmp_path / "runs"), "--max-params", "2000"]) == 0  # same champion again
    assert len(client.search_model_versions("name='kdsweep-e2e'")) == versions
    sizes = {}
    for r in runs:  # one profile per architecture: every trial of a student carries the same numbers
        sizes.setdefault(r.data.params["student"], set()).add(r.data.metrics["size_latency_cpu_b1_ms"])
    assert all(len(v) == 1 for v in sizes.values()), sizes
    assert main(["best", "e2e", "--storage", str(tmp_path / "runs"), "--objective", "robust_acc", "--objective", "val_acc",
                 "--min", "val_acc=0.5", "--max", "params=1e6"]) == 0
    out = capsys.readouterr().out
    assert "Pareto front (robust_acc up, val_acc up)" in out
    finished = [r for r in child_runs(uri, "e2e") if "robust_acc" in r.data.metrics]
    best_robust = max(finished, key=lambda r: r.data.metrics["robust_acc"])
    assert f"(trial {best_robust.data.tags['kdsweep.trial_id']})" in out


def test_the_report_writes_its_files_and_its_numbers_are_mlflows(e2e):
    tmp_path, client, parent = e2e.path, e2e.client, [e2e_parent(e2e)]
    assert main(["report", "e2e", "--storage", str(tmp_path / "runs")]) == 0
    report = tmp_path / "runs" / "e2e" / "report"
    from PIL import Image

    for png in ("pareto.png", "robustness.png"):
        with Image.open(report / png) as im:
            assert im.size[0] > 400 and im.getextrema() != ((255, 255), (255, 255), (255, 255), (255, 255))
    md = (report / "report.md").read_text()
    champion = client.get_run(parent[0].info.run_id).data.tags["kdsweep.champion_run_id"]
    assert f"{client.get_run(champion).data.metrics['test_acc']:.4f}" in md
    row = next(line for line in md.splitlines() if line.startswith("| gaussian_noise |"))  # the task's suite, beside the plot
    assert f"| {client.get_run(champion).data.metrics['corr_gaussian_noise']:.4f} |" in row, row
    assert "<table>" in (report / "report.html").read_text()
    assert {a.path for a in client.list_artifacts(parent[0].info.run_id, "report")} >= {"report/report.md", "report/pareto.png"}
    parent_files = {a.path for a in client.list_artifacts(parent[0].info.run_id, "optuna")}
    assert {f"optuna/e2e-joint-{p}.png" for p in ("optimization_history", "param_importances", "parallel_coordinate", "slice")} <= parent_files
    assert "![e2e-joint-optimization_history](optuna/e2e-joint-optimization_history.png)" in md
    assert "leaderboard.json" in {a.path for a in client.list_artifacts(parent[0].info.run_id)}


def test_export_takes_the_champion_out_alone(e2e, capsys):
    """ONNX checked by onnxruntime against PyTorch, preprocessing inside; TorchScript and safetensors."""
    import onnxruntime

    tmp_path, client = e2e.path, e2e.client
    champion = client.get_run(e2e_parent(e2e).info.run_id).data.tags["kdsweep.champion_run_id"]
    mlflow.set_tracking_uri(e2e.uri)
    model = mlflow.pytorch.load_model("models:/kdsweep-e2e@champion")

    for fmt in ("onnx", "torchscript", "safetensors"):
        assert main(["export", "e2e", "--storage", str(tmp_path / "runs"), "--format", fmt]) == 0
    out = capsys.readouterr().out
    assert "student.onnx: max abs logit difference vs PyTorch on" in out
    exported = tmp_path / "runs" / "e2e" / "export"
    assert sorted(f.name for f in exported.iterdir()) == ["student.json", "student.onnx", "student.safetensors", "student.torchscript.pt"]
    raw = torch.rand(3, 1, 8, 8) * 255  # any batch size: the batch dimension is dynamic
    ort = onnxruntime.InferenceSession(str(exported / "student.onnx"), providers=["CPUExecutionProvider"])
    assert torch.allclose(torch.from_numpy(ort.run(None, {"images": raw.numpy()})[0]), model(raw).detach(), atol=1e-4)
    assert torch.allclose(torch.jit.load(str(exported / "student.torchscript.pt"))(raw), model(raw), atol=1e-4)
    champion_metrics = client.get_run(champion).data.metrics
    assert champion_metrics["export_onnx_max_abs_diff"] <= 1e-4 and champion_metrics["export_torchscript_max_abs_diff"] <= 1e-4
    assert {"export/student.onnx", "export/student.safetensors"} <= {a.path for a in client.list_artifacts(champion, "export")}
    assert main(["export", "e2e", "--storage", str(tmp_path / "runs"), "--format", "tflite"]) == 2
    assert "`--format` must be one of" in capsys.readouterr().err


def test_the_sweep_in_a_real_browser(e2e):
    """What a user sees: the UI's sweep view and the HTML report, in headless Chromium; `kdsweep ui`'s
    server stops with it."""
    report = e2e.path / "runs" / "e2e" / "report"
    if not (report / "report.html").is_file():  # run alone, without the report's test
        assert main(["report", "e2e", "--storage", str(e2e.path / "runs")]) == 0
    browse(e2e.path, e2e.uri, report / "report.html", [r.info.run_name for r in e2e.runs])


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


def chrome(url: str, *args: str) -> str:
    """Headless Chromium as the machine allows it (no sandbox as root, no network beyond loopback)."""
    with tempfile.TemporaryDirectory() as profile:
        cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
               "--window-size=1600,1000", "--virtual-time-budget=20000", *args, url]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=180).stdout


def browse(folder, uri: str, report_html, run_names: list[str]) -> None:
    """`kdsweep ui` on 127.0.0.1, opened at the address it prints: the sweep's runs with val_acc are
    on the page; screenshots of it and of the HTML report are written beside the test. SIGTERM then
    stops the UI's server with it, no process left. Without Chromium (outside CI) the server's part
    still runs, then the test skips."""
    import psutil

    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "ui", "--port", str(port), "--tracking-uri", uri],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(ui.stdout.readline, "")), daemon=True)
    reader.start()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not any("sweep e2e: " in line for line in lines):
            time.sleep(0.2)
        url = next(line for line in lines if "sweep e2e: " in line).split(": ", 1)[1].strip()
        assert url.startswith(f"http://127.0.0.1:{port}/#/experiments/") and "viewStateShareKey=kdsweep" in url, lines
        wait_for_http(f"http://127.0.0.1:{port}/health")
        server = psutil.Process(ui.pid).children(recursive=True)
        assert server
        if browser:
            chrome(url, f"--screenshot={folder / 'mlflow-ui.png'}")
            dom = chrome(url, "--dump-dom")
    finally:
        ui.send_signal(signal.SIGTERM)
        ui.wait(timeout=60)
    _, alive = psutil.wait_procs(server, timeout=15)  # the server stopped with `kdsweep ui`
    for p in alive:
        p.kill()
    assert alive == []
    chromium()  # outside CI, no Chromium: skipped here, the server's part done
    assert (folder / "mlflow-ui.png").stat().st_size > 10_000
    assert all(name in dom for name in run_names), "the sweep's trial runs are not listed"
    assert "val_acc" in dom and "kd_gain" in dom and "Token Usage" not in dom
    chrome(report_html.as_uri(), f"--screenshot={folder / 'report.png'}")
    assert (folder / "report.png").stat().st_size > 10_000
    report_dom = chrome(report_html.as_uri(), "--dump-dom")
    assert "KD gain over each student" in report_dom and "optimization_history" in report_dom


def test_runs_created_before_the_profiles_finish_get_their_sizes_when_they_do(tmp_path):
    """The sizes are queued when the first trial starts (if not before), and no trial waits for them: a run
    made before the sizes are in gets them at a later report, at the latest when the experiment
    ends, once, at step 0."""
    from orchestrator.plan.config import load_config
    from orchestrator.plan.search import TrialBuilder
    from orchestrator.track.store import SweepTracker
    from orchestrator.track.tracking import MlflowTrialCallback
    from trainables.config import TRIAL_CONFIG

    class Sizes:
        def __init__(self):
            self.done, self.started = False, 0

        def start(self):
            self.started += 1

        def reports(self):
            self.done = True
            return {"mlp_32": {"size_params": 123.0}, "cnn_tiny": {"size_params": 456.0}}

        def ready(self):
            return self.reports() if self.done else None

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = SweepTracker(uri, "sizes")
    parent = tracker.parent_run("sizes", {})
    sizes = Sizes()
    callback = MlflowTrialCallback(tracker, parent, "sizes", {"fixed_params": {}}, sizes)
    build = TrialBuilder(load_config(None, ["teacher.path=/tmp/t"]), profile=False)
    trials = [SimpleNamespace(trial_id=f"t{i}", config={"student": s, TRIAL_CONFIG: build({"student": s})})
              for i, s in enumerate(["mlp_32", "cnn_tiny", "mlp_32"])]
    assert not sizes.started  # queued once the first trial has its resources, not before
    callback.on_trial_start(0, trials, trials[0])
    callback.on_trial_start(0, trials, trials[1])
    assert sizes.started
    callback.on_trial_result(0, trials, trials[0], {"epoch": 1, "val_acc": 0.5})
    runs = {r.data.params["student"]: r for r in tracker.trial_runs(parent)}
    assert all("size_params" not in r.data.metrics for r in runs.values())  # not in yet: nothing waited for
    sizes.done = True
    callback.on_trial_result(0, trials, trials[1], {"epoch": 1, "val_acc": 0.5})
    callback.on_trial_start(0, trials, trials[2])
    callback.on_experiment_end(trials)
    client = tracker.client
    got = sorted((r.data.params["student"], [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, "size_params")])
                 for r in tracker.trial_runs(parent))
    assert got == [("cnn_tiny", [(0, 456.0)]), ("mlp_32", [(0, 123.0)]), ("mlp_32", [(0, 123.0)])]
    late = SimpleNamespace(trial_id="t3", config={"student": "cnn_tiny", TRIAL_CONFIG: build({"student": "cnn_tiny"})})
    MlflowTrialCallback(tracker, parent, "sizes", {"fixed_params": {}}, Sizes()).on_trial_start(0, [late], late)  # its driver dies
    resumed = MlflowTrialCallback(tracker, parent, "sizes", {"fixed_params": {}}, sizes)  # the next driver finds the run
    resumed.on_trial_start(0, [late], late)
    resumed.on_experiment_end([late])
    (run,) = tracker.trial_runs(parent, "t3")
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "size_params")] == [(0, 456.0)]


def test_a_lucky_seed_wins_the_search_and_loses_the_confirmation(tmp_path, digits_teacher, ray_address, capsys, monkeypatch):
    """lottery_mlp sees the whole image for seed 0 (the search's) and 3% of it for seed 1: it wins
    the single-seed search (about 0.93 against 0.82), and the confirmation on two seeds (its mean
    about 0.6) crowns steady_mlp, which sees every other pixel on every seed. Both students exist only
    in a plugin module."""
    monkeypatch.chdir(tmp_path)
    cfg = sweep_yaml(tmp_path, digits_teacher, "lucky", students=["lottery_mlp", "steady_mlp"], plugins=["kd_test_plugin"], search={},
                     **{"budget.num_samples": 2, "budget.max_concurrent": 1, "budget.grace_period": 3, "budget.confirm": {"top": 2, "seeds": 2},
                        "train.epochs": 3, "train.robust_samples": 0})
    assert main(["run", str(cfg), "--address", ray_address]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^start  trial=\w+  student=lottery_mlp .* seed=1  epoch=0/3 .* role=confirms \w+", out, re.M)
    assert re.search(r"^start  trial=\w+  student=steady_mlp .* alpha=0.00 .* seed=1  epoch=0/3 .* role=control for \w+", out, re.M)
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    runs = child_runs(uri, "lucky")
    search = {r.data.params["student"]: r for r in runs if "kdsweep.confirms" not in r.data.tags}
    confirming = [r for r in runs if "kdsweep.confirms" in r.data.tags]
    lottery, steady = search["lottery_mlp"], search["steady_mlp"]
    assert lottery.data.metrics["final_val_acc"] > steady.data.metrics["final_val_acc"]  # the search alone would crown the lucky seed
    # per finalist: seed 1 with KD, and the alpha=0 control at the same settings on seeds 0 and 1
    assert len(runs) == 2 + 2 * 3 and {r.data.tags["kdsweep.status"] for r in runs} == {"finished"}
    # the students exist only in a plugin module: every Ray process that reads a trial config (trial
    # actors, the profiling and cache tasks, the latency task) imported it itself
    assert all(r.data.metrics["size_params"] == 64 * 128 + 128 + 128 * 10 + 10 and r.data.metrics["size_latency_cpu_b1_ms"] > 0 for r in runs)
    # same resources, same cache: fixed views on digits, so every seed's KD trial reads the sweep's teacher cache
    assert {r.data.tags["kdsweep.teacher_targets"] for r in runs if r.data.params["control"] == "False"} == {"cache"}
    for finalist in (lottery, steady):
        mine = [r for r in confirming if r.data.tags["kdsweep.confirms"] == finalist.data.tags["kdsweep.trial_id"]]
        assert sorted((r.data.params["seed"], r.data.params["control"]) for r in mine) == [("0", "True"), ("1", "False"), ("1", "True")]
        assert all(r.data.params["trial.train.optimizer.lr"] == finalist.data.params["trial.train.optimizer.lr"] for r in mine)
    client = mlflow.tracking.MlflowClient(uri)
    parent = client.get_run(runs[0].data.tags["mlflow.parentRunId"])
    champion = client.get_run(parent.data.tags["kdsweep.champion_run_id"])
    assert champion.data.params["student"] == "steady_mlp"
    assert parent.data.metrics["champion_confirmed_seeds"] == 2 and "champion_kd_gain_mean" in parent.data.metrics
    table = client.download_artifacts(parent.info.run_id, "confirmation.md", str(tmp_path))
    assert re.search(r"\| lottery_mlp \|.*\| 0, 1 \|.*KD gain [+-][\d.]+ \+- [\d.]+ pts, 2 seeds", Path(table).read_text())
    # the Optuna study holds the search alone
    assert len(optuna.load_study(study_name="lucky-joint", storage=f"sqlite:///{tmp_path / 'runs' / 'lucky' / 'optuna.db'}").trials) == 2

    # more seeds later, without searching again: the top finalist (the lottery) gets seed 2 and its control
    assert main(["best", "lucky", "--storage", str(tmp_path / "runs"), "--confirm-seeds", "3", "--confirm-top", "1", "--address", ray_address]) == 0
    runs = child_runs(uri, "lucky")
    added = [r for r in runs if r.data.params.get("seed") == "2"]
    assert len(runs) == 10 and sorted(r.data.params["control"] for r in added) == ["False", "True"]
    assert {r.data.params["student"] for r in added} == {"lottery_mlp"}
    assert client.get_run(client.get_run(parent.info.run_id).data.tags["kdsweep.champion_run_id"]).data.params["student"] == "steady_mlp"
    assert "| lottery_mlp |" in capsys.readouterr().out
    from orchestrator.api import best_of

    champion = best_of("lucky", str(tmp_path / "runs")).champion  # the Python API: the same champion, its confirmed numbers
    assert champion.student == "steady_mlp" and champion.confirmed["seeds"] == 2 and "2 seeds" in champion.confirmed["verdict"]


def test_a_method_search_trains_each_method_and_groups_kd_gain_by_method(tmp_path, digits_teacher, ray_address, capsys, monkeypatch):
    """10 trials over kd, dkd and dist x two students: each method drawn and trained for each
    student, its own keys logged with it alone, the method in the console, run names, leaderboard
    and report, and the KD gain grouped by method."""
    monkeypatch.chdir(tmp_path)
    search = {"loss.name": {"type": "categorical", "choices": ["kd", "dkd", "dist"]}, "loss.dkd_beta": {"type": "float", "low": 2.0, "high": 8.0},
              "loss.gamma": {"type": "float", "low": 0.5, "high": 2.0}, "alpha": {"type": "float", "low": 0.0, "high": 1.0}}
    cfg = sweep_yaml(tmp_path, digits_teacher, "methods", search=search,
                     **{"budget.num_samples": 10, "budget.grace_period": 2, "train.epochs": 2, "train.robust_samples": 0,
                        "loss.warmup_epochs": 1})
    assert main(["run", str(cfg), "--address", ray_address]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^done   trial=\w+  student=cnn_tiny  loss=dist  T=", out, re.M)
    table = out[out.index("KD gain by method"):].split("\n\n")[0]
    assert all(re.search(rf"^\s*{m}\s+{s}\s+\d+ ", table, re.M) for m in ("kd", "dkd", "dist") for s in ("mlp_32", "cnn_tiny")), table
    runs = child_runs(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}", "methods")
    assert len(runs) == 10 and {r.data.tags["kdsweep.status"] for r in runs} == {"finished"}
    for r in runs:
        p = r.data.params
        assert r.info.run_name.startswith(f"{p['student']}-{p['loss']}-") and p["loss.name"] == p["loss"] == p["trial.loss.name"]
        assert ("loss.dkd_beta" in p, "loss.gamma" in p) == (p["loss"] == "dkd", p["loss"] == "dist"), p
        assert ("trial.loss.dkd_beta" in p, "trial.loss.gamma" in p) == (p["loss"] == "dkd", p["loss"] == "dist")
    drawn = Counter((r.data.params["student"], r.data.params["loss"]) for r in runs if r.data.params["control"] == "False")
    assert set(drawn) == {(s, m) for s in ("mlp_32", "cnn_tiny") for m in ("kd", "dkd", "dist")}, drawn
    assert main(["report", "methods", "--storage", str(tmp_path / "runs")]) == 0
    assert "## KD gain by method" in (tmp_path / "runs" / "methods" / "report" / "report.md").read_text()


def test_per_student_mode_gives_each_student_its_share(tmp_path, digits_teacher, ray_address, capsys, monkeypatch):
    """Also a searched alpha whose range leaves 0 out (as text_reviews.yaml's): each student's
    control still trains at alpha=0 exactly, every epoch, outside its study, and the KD trials'
    gains are measured against it."""
    monkeypatch.chdir(tmp_path)
    cfg = sweep_yaml(tmp_path, digits_teacher, "per-student", mode="per_student",
                     **{"budget.num_samples": 4, "train.epochs": 2, "search.objectives": ["val_acc:max", "size_params:min"],
                        "search.alpha.low": 0.1})
    assert main(["run", str(cfg), "--address", ray_address]) == 0
    assert "each student's alpha=0 control (alpha=0 exactly; search.alpha [0.1, 1] leaves 0 out" in capsys.readouterr().out
    runs = child_runs(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}", "per-student")
    assert Counter(r.data.params["student"] for r in runs) == {"mlp_32": 2, "cnn_tiny": 2}
    controls = [r for r in runs if r.data.params["control"] == "True"]
    assert sorted(r.data.params["student"] for r in controls) == ["cnn_tiny", "mlp_32"]
    assert all(float(r.data.params["trial.loss.alpha"]) == 0.0 and r.data.metrics["epochs_run"] == 2 for r in controls)
    assert all("kd_gain" in r.data.metrics for r in runs if r.data.params["control"] == "False")
    # multi-objective: Optuna searched the accuracy/size front itself, and its Pareto plot is logged
    storage = f"sqlite:///{tmp_path / 'runs' / 'per-student' / 'optuna.db'}"
    for student in ("mlp_32", "cnn_tiny"):
        study = optuna.load_study(study_name=f"per-student-{student}", storage=storage)
        assert len(study.directions) == 2 and len(study.trials) == 1  # the control never reached TPE
        assert all(t.values[1] == runs[0].data.metrics["size_params"] or t.params["student"] != runs[0].data.params["student"] for t in study.trials)
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    parent = next(r for r in client.search_runs([runs[0].info.experiment_id]) if r.data.tags.get("kdsweep.role") == "parent")
    assert "optuna/per-student-mlp_32-pareto_front.png" in {a.path for a in client.list_artifacts(parent.info.run_id, "optuna")}
    # one Tune run for both studies: the students' trials ran side by side, handed out round robin
    assert sorted((tmp_path / "runs" / "per-student").glob("tune-*")) == [tmp_path / "runs" / "per-student" / "tune-per_student"]
    first_two = sorted(runs, key=lambda r: r.info.start_time)[:2]
    assert {r.data.params["student"] for r in first_two} == {"mlp_32", "cnn_tiny"}


def test_warm_trials_share_one_actor_and_a_stopped_trial_frees_it(tmp_path, digits_teacher, ray_address, monkeypatch):
    """One trial at a time: every trial trains in the same Tune actor process (Tune's `pid` in
    each trial's results), trials ASHA stopped included, and each still logs its weights."""
    monkeypatch.chdir(tmp_path)
    cfg = sweep_yaml(tmp_path, digits_teacher, "warm", students=["mlp_32"],
                     **{"budget.num_samples": 6, "budget.max_concurrent": 1, "budget.grace_period": 1, "budget.reduction_factor": 2,
                        "train.epochs": 4, "train.robust_samples": 0})
    assert main(["run", str(cfg), "--address", ray_address]) == 0
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    runs = child_runs(uri, "warm")
    assert len(runs) == 6
    statuses = Counter(r.data.tags["kdsweep.status"] for r in runs)
    assert statuses["stopped"] >= 1 and statuses["finished"] >= 1, statuses
    pids = {json.loads(f.read_text().splitlines()[0])["pid"] for f in (tmp_path / "runs" / "warm" / "tune-joint").glob("*/result.json")}
    assert len(pids) == 1, pids
    client = mlflow.tracking.MlflowClient(uri)
    assert all("student/student.safetensors" in {a.path for a in client.list_artifacts(r.info.run_id, "student")} for r in runs)


def test_own_torchvision_teacher_from_imagenet_weights_plugin_student_at_loss_onnx(tmp_path, ray_address, capsys, monkeypatch):
    """The issue's whole path: a torchvision.resnet18 teacher from a 1000-class weights file (head
    replaced, fine-tuned, ImageNet statistics), students torchvision.mobilenet_v3_small (from its
    own 1000-class file) and a plugin model, `at` on layers named per student, ONNX export."""
    import onnxruntime
    import torchvision
    import yaml

    from trainables.data import load_splits
    from trainables.models.zoo import IMAGENET_MEAN
    from trainables.config import DatasetConfig

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), tmp_path / "resnet18-imagenet.pth")
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=1000).state_dict(), tmp_path / "mnv3-imagenet.pth")
    data = {"name": "synthetic", "val_fraction": 0.2, "kwargs": {"n_train": 192, "n_test": 64, "shape": [3, 32, 32], "num_classes": 4},
            "augment": {"crop_pad": 2, "flip": True}}
    cfg = {
        "name": "own", "storage": str(tmp_path / "runs"), "plugins": ["kd_test_plugin"], "dataset": data,
        "teacher": {"arch": "torchvision.resnet18", "weights": str(tmp_path / "resnet18-imagenet.pth"), "batch_size": 32,
                    "finetune": {"epochs": 2, "lr": 0.01}, "augment": {"crop_pad": 4, "flip": True}},
        "students": ["torchvision.mobilenet_v3_small", "plugin_cnn"],
        "student_weights": {"torchvision.mobilenet_v3_small": str(tmp_path / "mnv3-imagenet.pth")},
        "loss": {"name": "at", "ce_weight": 1.0, "distill_weight": 1.0, "teacher_layers": ["layer2", "layer3"],
                 "student_layers": {"torchvision.mobilenet_v3_small": ["features.3", "features.8"], "plugin_cnn": ["stages.0", "stages.1"]}},
        "train": {"epochs": 2, "batch_size": 32, "robust_samples": 64},
        "search": {"lr": {"type": "float", "low": 0.01, "high": 0.1, "log": True}},
        "budget": {"num_samples": 2, "max_concurrent": 1, "grace_period": 2, "confirm": {"top": 0}},
        "tracking": {"uri": mlflow_store(tmp_path / "mlruns")},
    }
    (tmp_path / "own.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "own.yaml"), "--address", ray_address]) == 0
    out = capsys.readouterr().out
    assert "fine-tuning" in out and "champion:" in out

    (teacher_dir,) = (tmp_path / "teachers").iterdir()
    card = json.loads((teacher_dir / "teacher.json").read_text())
    assert card["arch"] == "torchvision.resnet18" and card["num_classes"] == 4 and card["epochs"] == 2
    assert card["mean"] == list(IMAGENET_MEAN) and card["weights_sha256"] and card["finetune"]["epochs"] == 2
    uri = cfg["tracking"]["uri"]
    runs = child_runs(uri, "own")
    assert sorted(r.data.params["student"] for r in runs) == ["plugin_cnn", "torchvision.mobilenet_v3_small"]
    assert {r.data.tags["kdsweep.status"] for r in runs} == {"finished"}
    assert all(r.data.metrics["train_kd"] > 0 and r.data.params["trial.train.teacher_targets"] == "auto" for r in runs)
    client = mlflow.tracking.MlflowClient(uri)
    s = load_splits(DatasetConfig(**data))
    for r in runs:  # each student's own statistics in its card: ImageNet's for the pretrained one
        local = client.download_artifacts(r.info.run_id, "student/student.json", str(tmp_path / r.info.run_id))
        mean = json.loads(open(local).read())["mean"]
        assert mean == (list(IMAGENET_MEAN) if r.data.params["student"].startswith("torchvision.") else list(s.mean))

    assert main(["export", "own", "--storage", str(tmp_path / "runs"), "--format", "onnx"]) == 0
    diff, bound = map(float, re.search(r"max abs logit difference vs PyTorch on \d+ test images = (\S+) \(bound (\S+)\)",
                                       capsys.readouterr().out).groups())
    assert diff <= bound
    parent = [r for r in client.search_runs([client.get_experiment_by_name("own").experiment_id]) if r.data.tags.get("kdsweep.role") == "parent"]
    champion = client.get_run(parent[0].info.run_id).data.tags["kdsweep.champion_run_id"]
    assert client.get_run(champion).data.metrics["export_onnx_max_abs_diff"] == pytest.approx(diff, rel=1e-2)  # printed to 3 digits
    assert "export/student.onnx" in {a.path for a in client.list_artifacts(champion, "export")}
    model = mlflow.pytorch.load_model("models:/kdsweep-own@champion")  # the registered model: preprocessing inside
    ort = onnxruntime.InferenceSession(str(tmp_path / "runs" / "own" / "export" / "student.onnx"), providers=["CPUExecutionProvider"])
    raw = s.test_x.float()
    with torch.no_grad():
        want = model(raw)
    got = torch.from_numpy(ort.run(None, {"images": raw.numpy()})[0])
    assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())  # float32: relative to the logits' scale


def test_sweep_over_an_image_folder_decodes_once_and_names_bad_files(tmp_path, ray_address, capsys, monkeypatch):
    """A folder of mixed photos (two bad files among them, no val split): the sweep runs, the
    warning names the bad files, the count and decode time reach MLflow, and a second sweep's plan
    over the same folder reuses the decoded cache (no decode: the driver's check_data is where a
    sweep decodes)."""
    import yaml

    from orchestrator.plan.config import load_config
    from orchestrator.plan.prepare import check_data
    from tests.test_images import CLASSES, write_folder

    monkeypatch.chdir(tmp_path)
    write_folder(tmp_path / "photos")
    uri = mlflow_store(tmp_path / "mlruns")
    for name in ("photos-a", "photos-b"):
        cfg = {"name": name, "storage": str(tmp_path / "runs"),
               "dataset": {"name": "image_folder", "root": str(tmp_path / "photos"), "image_size": 16, "val_fraction": 0.2,
                           "augment": {"resized_crop": {"scale": [0.5, 1.0]}, "flip": True}},
               "teacher": {"arch": "cnn_tiny", "epochs": 2, "batch_size": 8}, "students": ["mlp_32"],
               "train": {"epochs": 1, "batch_size": 8, "robust_samples": 0}, "search": {},
               "budget": {"num_samples": 1, "max_concurrent": 1, "confirm": {"top": 0}}, "tracking": {"uri": uri}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "photos-a.yaml"), "--address", ray_address]) == 0
    out = capsys.readouterr()
    assert "skipped 2 file(s)" in out.out + out.err and "train/cat/broken.jpg" in out.out + out.err
    client = mlflow.tracking.MlflowClient(uri)
    (parent,) = [r for r in client.search_runs([client.get_experiment_by_name("photos-a").experiment_id])
                 if r.data.tags.get("kdsweep.role") == "parent"]
    assert parent.data.metrics["data_skipped_files"] == 2 and parent.data.metrics["data_decode_s"] > 0
    (child,) = child_runs(uri, "photos-a")
    assert child.data.tags["kdsweep.status"] == "finished"
    again = check_data(load_config(str(tmp_path / "photos-b.yaml")))  # what the next sweep's plan decodes: nothing
    assert again.decode_s == 0 and len(again.skipped) == 2
    (teacher,) = (tmp_path / "teachers").iterdir()
    assert json.loads((teacher / "teacher.json").read_text())["classes"] == list(CLASSES)
    assert mlflow.pyfunc.load_model("models:/kdsweep-photos-a@champion").metadata.metadata["classes"] == list(CLASSES)


def test_a_diverging_trial_is_marked_never_selected_and_the_sweep_goes_on(tmp_path, digits_teacher, ray_address, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = sweep_yaml(tmp_path, digits_teacher, "blowup", students=["mlp_32"], search={"lr": {"type": "categorical", "choices": [0.05, 10000.0]}},
                     **{"budget.num_samples": 4, "budget.max_concurrent": 1, "train.epochs": 2, "train.robust_samples": 0})
    assert main(["run", str(cfg), "--address", ray_address]) == 0
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    runs = child_runs(uri, "blowup")
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    status = {r.info.run_id: (float(r.data.params["lr"]), r.data.tags["kdsweep.status"]) for r in runs}
    assert {s for lr, s in status.values() if lr == 10000.0} == {"diverged"}, status  # seed 0 samples both values
    assert {s for lr, s in status.values() if lr == 0.05} == {"finished"}, status
    client = mlflow.tracking.MlflowClient(uri)
    (parent,) = [r for r in client.search_runs([client.get_experiment_by_name("blowup").experiment_id]) if r.data.tags.get("kdsweep.role") == "parent"]
    assert status[parent.data.tags["kdsweep.champion_run_id"]] == (0.05, "finished")


def test_kill_driver_then_resume(tmp_path, digits_teacher, ray_address):
    """Resume finishes every trial, each in its one run, then the confirmation stage (the searcher's
    state restored: no search trial issued twice); --tracking-uri on resume is honoured by the
    trial runs too (Tune would otherwise use the callbacks pickled with the killed driver)."""
    cfg = sweep_yaml(tmp_path, digits_teacher, "killme", **{"budget.num_samples": 5, "train.epochs": 4,
                                                            "budget.confirm": {"top": 1, "seeds": 2}})
    db = tmp_path / "mlruns" / "mlflow.db"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(cfg), "--address", ray_address],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    finished_sql = "select count(*) from tags where key='kdsweep.status' and value in ('finished','stopped')"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if count_rows(db, finished_sql, polling=True) >= 2:
            break
        time.sleep(0.5)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert count_rows(db, finished_sql) < 5

    moved = tmp_path / "moved" / "mlflow.db"  # the store moves: resume must follow it
    moved.parent.mkdir()
    shutil.copy(db, moved)
    before = count_rows(db, "select count(*) from metrics")
    assert main(["resume", "killme", "--storage", str(tmp_path / "runs"), "--address", ray_address,
                 "--tracking-uri", f"sqlite:///{moved}"]) == 0
    assert count_rows(db, "select count(*) from metrics") == before  # nothing went to the old store
    runs = child_runs(f"sqlite:///{moved}", "killme")
    searched = [r for r in runs if "kdsweep.confirms" not in r.data.tags]
    assert len(searched) == 5 and 1 <= len(runs) - 5 <= 2 * 2 - 1
    assert all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.tags["kdsweep.trial_id"] for r in runs}) == len(runs)
    finalists = {r.data.tags.get("kdsweep.confirms") for r in runs} - {None}
    assert len(finalists) == 1 and finalists <= {r.data.tags["kdsweep.trial_id"] for r in searched}
    assert {r.data.params["seed"] for r in runs if "kdsweep.confirms" in r.data.tags} <= {"0", "1"}
    client = mlflow.tracking.MlflowClient(f"sqlite:///{moved}")
    for r in runs:  # resumed trials continued their own runs: every epoch logged exactly once
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_acc")]
        assert steps == list(range(1, int(r.data.metrics["epochs_run"]) + 1))
    assert count_rows(moved, "select count(*) from runs where status='RUNNING'") == 0


def _trial_processes(title: str, tune_dir: Path) -> list:
    """The processes running this sweep's trial: its Tune actor (the pid in the trial's latest
    result: an earlier test's actor may still be on its way out of the shared Ray, and Ray may have
    started this one in an older pooled process), or the Ray Train workers."""
    import psutil

    if title == "ImplicitFunc":
        lines = [f.read_text().splitlines() for f in tune_dir.glob("*/result.json")]
        pids = {json.loads(ls[-1])["pid"] for ls in lines if ls}
        return [psutil.Process(pid) for pid in pids if psutil.pid_exists(pid)]
    return [p for p in psutil.process_iter(["cmdline"]) if title in " ".join(p.info["cmdline"] or [])]


@pytest.mark.parametrize("warm,title,workers", [(True, "ImplicitFunc", 1), (False, "RayTrainWorker", 2)], ids=["tune-actor", "ddp-worker"])
def test_a_killed_trial_process_resumes_from_its_checkpoint_in_the_same_run(tmp_path, digits_teacher, ray_address, warm, title, workers):
    """SIGKILL the process running a trial mid-run (the warm Tune actor, or one of a DDP trial's two
    Ray Train workers, gloo): Tune (Train) restarts it from the last checkpoint (every 2 epochs
    here), the trial keeps its one MLflow run, every epoch logged once (a DDP trial's ranks report
    once per epoch)."""
    cfg = sweep_yaml(tmp_path, digits_teacher, "lostworker", students=["cnn_tiny"], search={},
                     **{"budget.num_samples": 1, "budget.max_concurrent": 1, "budget.max_failures": 2, "train.epochs": 6,
                        "train.batch_size": 16, "train.checkpoint_every": 2, "train.robust_samples": 0, "train.progress_every_s": 0.05,
                        "resources.warm_trials": warm, "resources.num_workers": workers})
    db = tmp_path / "mlruns" / "mlflow.db"
    tune_dir = tmp_path / "runs" / "lostworker" / "tune-joint"
    console = open(tmp_path / "console.txt", "w")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(cfg), "--address", ray_address],
                            cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=console,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    epochs_sql = "select count(*) from metrics where key='val_acc'"
    deadline, killed = time.time() + 300, None
    try:
        while time.time() < deadline and proc.poll() is None:
            if count_rows(db, epochs_sql, polling=True) >= 3 and (workers := _trial_processes(title, tune_dir)):
                killed = workers[0].pid
                os.kill(killed, signal.SIGKILL)
                break
            time.sleep(0.2)
        assert killed is not None, "the trial ended before its worker could be killed"
        at = count_rows(db, epochs_sql)
        assert at < 6
        assert proc.wait(timeout=300) == 0
    finally:  # a failed check must not leave its sweep running on the shared Ray (the next tests' trials would wait for its CPUs)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    uri = f"sqlite:///{db}"
    (run,) = child_runs(uri, "lostworker")
    assert run.info.status == "FINISHED" and run.data.tags["kdsweep.status"] == "finished"
    steps = [m.step for m in mlflow.tracking.MlflowClient(uri).get_metric_history(run.info.run_id, "val_acc")]
    assert steps == list(range(1, 7)), steps  # the epochs re-run after the restore are not logged twice
    assert count_rows(db, "select count(*) from runs where status='RUNNING'") == 0
    assert all(w.pid != killed for w in _trial_processes(title, tune_dir))
    console.close()
    shown = (tmp_path / "console.txt").read_text()
    reported = [int(m) for m in re.findall(r"^epoch .* epoch=(\d+)/6", shown, re.M)]
    # Progress within epochs reaches the console from the actor, or from a DDP group's rank 0 alone.
    progress = re.findall(r"^progress  trial=\w+  student=cnn_tiny  epoch=(\d+)/6  batch (\d+)/(\d+) ", shown, re.M)
    assert progress and all(int(b) < int(n) for _, b, n in progress), shown[-2000:]
    # The restored trial started after its last checkpoint (an even epoch), not from epoch 1: where
    # it re-ran epochs the console shows them again; killed just after a checkpoint, it goes on
    # with the next epoch and the console shows no step back (the new pid above is the restore).
    restart = next((i for i in range(1, len(reported)) if reported[i] <= reported[i - 1]), None)
    assert restart is None or (reported[restart] > 1 and (reported[restart] - 1) % 2 == 0 and reported[restart] <= at + 1), reported
    assert sorted(set(reported)) == list(range(1, 7)), reported
    assert reported[-1] == 6


def test_placement_groups_left_by_ended_trials_are_removed(ray_address):
    """A CPU placement group with no actor in it past the grace period goes (what a stopped trial's
    worker group sometimes leaves); one with a live actor, and Tune's token groups, stay."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from orchestrator.plan.resources import PlacementGroupReaper

    @ray.remote(num_cpus=0.25)
    class Worker:
        def ping(self):
            return 1

    PlacementGroupReaper(grace_s=0).reap()  # whatever earlier tests' trials left (the shared instance)
    orphan, busy, token = placement_group([{"CPU": 0.25}]), placement_group([{"CPU": 0.25}]), placement_group([{"memory": 2**20}])
    ray.get([orphan.ready(), busy.ready(), token.ready()], timeout=60)
    worker = Worker.options(scheduling_strategy=PlacementGroupSchedulingStrategy(busy)).remote()
    assert ray.get(worker.ping.remote(), timeout=60) == 1
    try:
        assert PlacementGroupReaper(grace_s=3600).reap() == []  # too young: perhaps about to be used
        assert PlacementGroupReaper(grace_s=0).reap() == [orphan.id.hex()]
        assert ray.util.placement_group_table(orphan)["state"] == "REMOVED"
        assert ray.util.placement_group_table(busy)["state"] == "CREATED" and ray.util.placement_group_table(token)["state"] == "CREATED"
    finally:
        ray.kill(worker)
        for pg in (busy, token):
            remove_placement_group(pg)


def test_resources_the_cluster_cannot_give_fail_before_anything_is_written(tmp_path, ray_address, capsys, monkeypatch):
    """The shared Ray has 2 CPUs and no GPU: a trial that can never be placed is an error, not a hang."""
    monkeypatch.chdir(tmp_path)
    for sets, needle in ((["resources.cpus_per_trial=64"], "`resources.cpus_per_trial` asks for 64 CPUs per worker"),
                         (["resources.gpus_per_trial=1"], "`resources.gpus_per_trial` asks for 1 GPU per worker"),
                         (["resources.num_workers=3"], "`resources.num_workers` asks for 3 workers")):
        if "gpus" in sets[0] and torch.cuda.is_available():
            continue
        args = ["run", "--address", ray_address, "--set", "resources.placement_timeout_s=1"]
        for s_ in sets:
            args += ["--set", s_]
        started = time.time()
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "waited 1 s" in err and len(err.splitlines()) == 1, err
        assert time.time() - started < 30
        assert os.listdir(tmp_path) == []


def test_unreachable_tracking_server_fails_before_ray(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["run", "--tracking-uri", "http://127.0.0.1:9", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "`tracking.uri` http://127.0.0.1:9 is unreachable" in err and len(err.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []


# The Python entry point (orchestrator/api.py): here, among the tests that share the session's Ray
# (a test file of its own would sort before test_cli_errors, which asserts Ray never started).
def test_sweep_from_a_dict_returns_its_champion_leaderboard_and_mlflow_ids(tmp_path, digits_teacher, ray_address, monkeypatch):
    import yaml

    from orchestrator.api import best_of, run_sweep_from
    from trainables.registry import ConfigError

    monkeypatch.chdir(tmp_path)
    data = yaml.safe_load(sweep_yaml(tmp_path, digits_teacher, "api").read_text())
    before = yaml.safe_dump(data)
    result = run_sweep_from(data, {"budget.num_samples": 3, "epochs": 2, "search": {"alpha": {"type": "float", "low": 0.0, "high": 1.0}},
                                   "train.teacher_topk": 4}, address=ray_address, maximum={"params": 5000})
    assert yaml.safe_dump(data) == before  # the caller's dict is not changed
    assert result.config.train.epochs == 2 and list(result.config.search) == ["loss.alpha"]
    assert len(result.leaderboard) == 3 and result.champion.run_id in {r.run_id for r in result.leaderboard}
    assert result.champion.val_acc == max(r.val_acc for r in result.leaderboard if r.status == "finished" and r.value("params") <= 5000)
    assert {r.alpha for r in result.leaderboard if r.control} == {0.0} and all(r.kd_gain is not None for r in result.leaderboard)
    assert 0 < result.champion.test["test_acc"] <= 1 and result.champion.version >= 1
    client = mlflow.tracking.MlflowClient(result.tracking_uri)
    assert client.get_run(result.parent_run_id).info.experiment_id == result.experiment_id
    assert client.get_run(result.parent_run_id).data.tags["kdsweep.champion_run_id"] == result.champion.run_id
    mass = [client.get_run(result.parent_run_id).data.metrics[f"teacher_topk_mass_t{t}"] for t in (1, 2, 4, 8)]  # top-4 of 10
    assert 1 >= mass[0] >= mass[1] >= mass[2] >= mass[3] >= 0.4  # k of n classes hold at least k/n
    assert client.get_model_version_by_alias(result.config.registered_model, "champion").run_id == result.champion.run_id
    again = best_of("api", str(tmp_path / "runs"))  # the CLI's `kdsweep best`: same champion, not tested or registered again
    assert again.champion.run_id == result.champion.run_id and again.champion.version == result.champion.version
    with pytest.raises(ConfigError, match="`loss.alpha`"):
        run_sweep_from(data, {"alpha": 2.0})


def test_the_console_shows_posted_progress_and_goes_on_when_its_board_is_lost(ray_address, capsys, caplog):
    """Trials post progress lines without waiting; the console takes them without blocking Tune's
    loop. The board lives beside the driver; were it lost all the same, the sweep goes on without
    the lines (a lost worker node once took a board with it and failed the whole sweep)."""
    import ray

    from orchestrator.plan.config import load_config
    from orchestrator.run.console import ConsoleReporter, Row, progress_board
    from trainables.board import post_to

    board = progress_board()
    console = ConsoleReporter(load_config(None), total=1, board=board, live=False)
    console.rows["t1"] = Row("t1", "cnn_tiny", "kd", 4.0, 0.9, 0.01, 0, 3, "search")
    post_to(board, "t1")("batch 5/10  1200 images/s  epoch ETA 3s")
    post_to(board, "t2")("a trial the console never started")

    shown = []

    def poll_until(seen):
        deadline = time.time() + 30
        while time.time() < deadline and not seen():
            console._took = 0.0  # no 1 s pacing in a test
            console.on_step_end(0, [])
            shown.append(capsys.readouterr().out)
            time.sleep(0.05)

    poll_until(lambda: "batch 5/10" in "".join(shown))
    assert "board is gone" not in "".join(shown) + caplog.text, "".join(shown) + caplog.text
    assert "progress  trial=t1  student=cnn_tiny  batch 5/10  1200 images/s  epoch ETA 3s" in "".join(shown)
    assert "never started" not in "".join(shown)
    ray.kill(board)
    post_to(board, "t1")("after the board is gone")  # a trial's post neither raises nor waits
    with caplog.at_level("WARNING", logger="orchestrator.run.console"):
        poll_until(lambda: console.board is None)
    # the warning reaches the log: caplog's, or the console's handler where an earlier test ran the CLI in this process
    assert console.board is None and "board is gone (ActorDiedError" in caplog.text + "".join(shown) + capsys.readouterr().out
    console.on_step_end(0, [])  # and polling on is a no-op


def test_the_progress_board_ends_with_its_tune_run(ray_address):
    """A process that runs sweep after sweep on one Ray (an API caller, a notebook) does not keep
    one board process per sweep alive: the console releases its board when the Tune run ends."""
    import ray

    from orchestrator.plan.config import load_config
    from orchestrator.run.console import ConsoleReporter, progress_board

    board = progress_board()
    assert ray.get(board.take.remote(), timeout=60) == []
    console = ConsoleReporter(load_config(None), total=1, board=board, live=False)
    console.on_experiment_end([])
    assert console.board is None

    def answers() -> bool:
        try:
            ray.get(board.take.remote(), timeout=60)
            return True
        except ray.exceptions.RayActorError:
            return False

    # ray.kill is asynchronous: a call that races it may still be answered, so wait (bounded) for the death
    deadline = time.time() + 30
    while answers() and time.time() < deadline:
        time.sleep(0.1)
    assert not answers(), "the board still answers 30 s after its Tune run ended"
    console.on_experiment_end([])  # ending twice (a resumed run's callbacks) is harmless
