"""benchmarks/sweep_throughput.py --smoke: the peer recipe and kdsweep on the same tiny sweep (CPU)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PEER = REPO.parent / "shared" / "bench" / "peer_sweep.py"

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # the benchmark scripts end to end: CI runs them, the fast loop leaves them out


def _run_alone(cmd: list[str], tmp_path, timeout: float, **env: str) -> subprocess.CompletedProcess:
    """A benchmark in a session of its own, every Ray in it local and its own (RAY_ADDRESS=local:
    the peer's bare ray.init() would join the last `ray start` cluster recorded in Ray's temp dir).
    Past `timeout` (under pytest's) its whole process group, Ray included, is killed: nothing is
    left running for a later test to join or to wait behind."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "local", **env}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{Path(cmd[1]).name} ran past {timeout:g} s:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _smoke(script: str, tmp_path, *args: str) -> tuple[str, dict]:
    """`benchmarks/<script> --smoke` in a process of its own (its own local Ray): stdout and its --json."""
    out = tmp_path / "bench.json"
    proc = _run_alone([sys.executable, str(REPO / "benchmarks" / script), "--smoke", "--out", str(tmp_path / "b"),
                       "--json", str(out), *args], tmp_path, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_throughput_smoke(tmp_path):
    assert PEER.is_file(), f"the peer yardstick is missing at {PEER}"
    stdout, res = _smoke("sweep_throughput.py", tmp_path, "--peer-trials", "1")  # the peer's rate from one trial: 20 s less
    assert "| trial-epochs per hour (whole process) |" in stdout and "speed-up" in stdout
    assert res["peer"]["runs"] == 1 and res["kdsweep"]["runs"] == 2 and res["peer"]["teacher_forwards"] == 1 * 1 * 64
    # the teacher sees each view once per sweep (64 train views, 32 val images), not trials x epochs x n_train
    assert res["kdsweep"]["teacher_forwards"] == 64 + 32
    assert res["kdsweep"]["overhead_s"] > 0 and res["kdsweep"]["trial_epochs_per_hour"] > 0


def test_kd_vs_ce_reports_diverged_runs_instead_of_crashing(tmp_path, digits_teacher):
    """A KD recipe that blows up (here lr=1e8) is a row saying so, not a traceback in statistics.stdev."""
    proc = _run_alone([sys.executable, str(REPO / "benchmarks" / "kd_vs_ce.py"), "--set", f"teacher.path={digits_teacher}",
                       "--set", "epochs=2", "--set", "lr=1e8", "--seeds", "0", "1", "--student", "mlp_32"], tmp_path, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| mlp_32 ")]
    assert len(rows) == 2 and all("| 2/2 | diverged |" in row for row in rows), proc.stdout


def test_folder_throughput_smoke(tmp_path):
    """benchmarks/folder_throughput.py, tiny: both pipelines run on the same folder, one table."""
    out = tmp_path / "folder.json"
    proc = _run_alone([sys.executable, str(REPO / "benchmarks" / "folder_throughput.py"), "--images", "300", "--trials", "2", "--epochs", "1",
                       "--json", str(out)], tmp_path, timeout=540, KDSWEEP_CACHE=str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| trial-epochs per hour |" in proc.stdout and "| speed-up |" in proc.stdout
    res = json.loads(out.read_text())
    assert res["kdsweep"]["decode_s"] > 0 and res["kdsweep"]["second_decode_s"] == 0
    assert res["peer"]["trial_epochs_per_hour"] > 0 and res["kdsweep"]["trial_epochs_per_hour"] > 0


def test_imagenet_shaped_smoke(tmp_path):
    """benchmarks/imagenet_shaped.py --smoke: torchvision resnet50 -> mobilenet_v3_large and resnet18,
    random-resized-crop views, top-k cache, each student inside the sweep and alone (CPU, tiny)."""
    stdout, res = _smoke("imagenet_shaped.py", tmp_path)
    assert "| torchvision.resnet18 |" in stdout
    assert set(res) == {"torchvision.mobilenet_v3_large", "torchvision.resnet18"}
    assert all(r["sweep"]["steady"] > 0 and r["alone"]["steady"] > 0 for r in res.values())
    assert all(r["sweep"]["targets"] == "cache" for r in res.values())  # the resized-crop views read the top-k cache
