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


class Bench:
    """A benchmark started in a session of its own, every Ray in it local and its own (RAY_ADDRESS=local:
    the peer's bare ray.init() would join the last `ray start` cluster recorded in Ray's temp dir)."""

    def __init__(self, cmd: list[str], cwd: Path, json_out: Path | None = None, **env: str) -> None:
        cwd.mkdir(parents=True, exist_ok=True)
        self.cmd, self.json_out = cmd, json_out
        env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "local", **env}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd, start_new_session=True)

    def result(self, timeout: float = 540) -> subprocess.CompletedProcess:
        """Its exit, stdout and stderr. Past `timeout` (under pytest's) its whole process group, Ray
        included, is killed: nothing is left running for a later test to join or to wait behind."""
        try:
            stdout, stderr = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            stdout, stderr = self.proc.communicate()
            pytest.fail(f"{Path(self.cmd[1]).name} ran past {timeout:g} s:\n{stderr[-3000:]}")
        return subprocess.CompletedProcess(self.cmd, self.proc.returncode, stdout, stderr)

    def smoke(self) -> tuple[str, dict]:
        """A `--smoke` run that must succeed: its stdout and its --json."""
        proc = self.result()
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout, json.loads(self.json_out.read_text())

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)


def _smoke(script: str, cwd: Path, *args: str) -> Bench:
    """`benchmarks/<script> --smoke` in a process of its own (its own local Ray), writing --json."""
    out = cwd / "bench.json"
    return Bench([sys.executable, str(REPO / "benchmarks" / script), "--smoke", "--out", str(cwd / "b"), "--json", str(out), *args], cwd, out)


@pytest.fixture(scope="module")
def benches(tmp_path_factory, digits_teacher):
    """Every benchmark of this module, started side by side as the first test asks: each is a process
    of its own with its own Ray and spends most of its wall waiting on Ray's start-up and shutdown,
    so on 2 cores they overlap well (about a minute less than one after another). Nothing they
    assert is a timing."""
    d = tmp_path_factory.mktemp("bench")
    runs = {
        # the peer's rate from one trial: 20 s less
        "throughput": _smoke("sweep_throughput.py", d / "throughput", "--peer-trials", "1"),
        "imagenet": _smoke("imagenet_shaped.py", d / "imagenet"),
        "folder": Bench([sys.executable, str(REPO / "benchmarks" / "folder_throughput.py"), "--images", "300", "--trials", "2", "--epochs", "1",
                         "--json", str(d / "folder" / "folder.json")], d / "folder", d / "folder" / "folder.json", KDSWEEP_CACHE=str(d / "folder" / "cache")),
        "diverged": Bench([sys.executable, str(REPO / "benchmarks" / "kd_vs_ce.py"), "--set", f"teacher.path={digits_teacher}",
                           "--set", "epochs=2", "--set", "lr=1e8", "--seeds", "0", "1", "--student", "mlp_32"], d / "diverged"),
    }
    yield runs
    for bench in runs.values():
        bench.kill()


def test_throughput_smoke(benches):
    assert PEER.is_file(), f"the peer yardstick is missing at {PEER}"
    stdout, res = benches["throughput"].smoke()
    assert "| trial-epochs per hour (whole process) |" in stdout and "speed-up" in stdout
    assert res["peer"]["runs"] == 1 and res["kdsweep"]["runs"] == 2 and res["peer"]["teacher_forwards"] == 1 * 1 * 64
    # the teacher sees each view once per sweep (64 train views, 32 val images), not trials x epochs x n_train
    assert res["kdsweep"]["teacher_forwards"] == 64 + 32
    assert res["kdsweep"]["overhead_s"] > 0 and res["kdsweep"]["trial_epochs_per_hour"] > 0


def test_kd_vs_ce_reports_diverged_runs_instead_of_crashing(benches):
    """A KD recipe that blows up (here lr=1e8) is a row saying so, not a traceback in statistics.stdev."""
    proc = benches["diverged"].result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| mlp_32 ")]
    assert len(rows) == 2 and all("| 2/2 | diverged |" in row for row in rows), proc.stdout


def test_folder_throughput_smoke(benches):
    """benchmarks/folder_throughput.py, tiny: both pipelines run on the same folder, one table."""
    proc = benches["folder"].result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| trial-epochs per hour |" in proc.stdout and "| speed-up |" in proc.stdout
    res = json.loads(benches["folder"].json_out.read_text())
    assert res["kdsweep"]["decode_s"] > 0 and res["kdsweep"]["second_decode_s"] == 0
    assert res["peer"]["trial_epochs_per_hour"] > 0 and res["kdsweep"]["trial_epochs_per_hour"] > 0


def test_imagenet_shaped_smoke(benches):
    """benchmarks/imagenet_shaped.py --smoke: torchvision resnet50 -> mobilenet_v3_large and resnet18,
    random-resized-crop views, top-k cache, each student inside the sweep and alone (CPU, tiny)."""
    stdout, res = benches["imagenet"].smoke()
    assert "| torchvision.resnet18 |" in stdout
    assert set(res) == {"torchvision.mobilenet_v3_large", "torchvision.resnet18"}
    assert all(r["sweep"]["steady"] > 0 and r["alone"]["steady"] > 0 for r in res.values())
    assert all(r["sweep"]["targets"] == "cache" for r in res.values())  # the resized-crop views read the top-k cache
