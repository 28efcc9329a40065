"""No process a command started outlives it: a local Ray after SIGTERM mid-sweep, or at its end
(`kdsweep ui`'s server: tests/test_sweep.py, browse)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import count_rows, sweep_yaml

pytestmark = pytest.mark.integration


def _processes_mentioning(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if marker in " ".join(p.cmdline()) or any(marker in v for v in p.environ().values()):
                found.append(p)
        except psutil.Error:
            continue
    return found


def _running(p: psutil.Process) -> bool:
    """Not gone and not a zombie (a zombie has exited; only its exit status waits to be read)."""
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_sigterm_mid_sweep_leaves_no_ray_process(tmp_path, digits_teacher):
    ray_tmp = tempfile.mkdtemp(prefix="kdr", dir="/tmp")  # short: Ray's socket paths have a length limit
    cfg = sweep_yaml(tmp_path, digits_teacher, "term", **{"budget.num_samples": 3, "budget.max_concurrent": 1, "train.epochs": 30})
    db = tmp_path / "mlruns" / "mlflow.db"
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(cfg)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if count_rows(db, "select count(*) from metrics where key='val_acc'", polling=True):
            break
        time.sleep(0.5)
    assert proc.poll() is None, "the sweep ended before it could be stopped"
    assert _processes_mentioning(ray_tmp), "the local Ray should be running now"
    proc.send_signal(signal.SIGTERM)
    # Our handler, not the one ray.init installs (drain up to 30 s, kill, exit 1 before any `finally`).
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    time.sleep(1)
    left = [p for p in _processes_mentioning(ray_tmp) if _running(p)]
    seen = [_describe(p) for p in left]
    for p in left:
        p.kill()
    assert left == [], seen


def _describe(p: psutil.Process) -> str:
    try:
        return f"{p.name()} pid={p.pid} ppid={p.ppid()} RAY_RAYLET_PID={p.environ().get('RAY_RAYLET_PID')}"
    except psutil.Error:
        return f"pid={p.pid} (gone)"


def test_a_local_ray_is_its_own_stops_its_autoscaler_monitor_first_and_leaves_nothing(tmp_path):
    """ray.shutdown() would give the monitor a second to report to a GCS it has already stopped.
    A local sweep starts a Ray of its own even where Ray's temp dir names the last `ray start`'s
    cluster (ray.init() with no address joins that one, here long gone)."""
    ray_tmp = tempfile.mkdtemp(prefix="kdm", dir="/tmp")
    Path(ray_tmp, "ray").mkdir()
    Path(ray_tmp, "ray", "ray_current_cluster").write_text("127.0.0.1:1")  # where `ray start` writes it under RAY_TMPDIR
    code = """if True:
        import json, ray
        from ray._private import ray_constants
        from orchestrator.run.sweep import ray_session
        seen, real = {}, ray.shutdown
        def shutdown(*a, **k):
            node = ray._private.worker._global_node
            seen["monitor"] = [i.process.poll() for i in node.all_processes[ray_constants.PROCESS_TYPE_MONITOR]]
            return real(*a, **k)
        ray.shutdown = shutdown
        with ray_session(None):
            pass
        print(json.dumps(seen))"""
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "RAY_TMPDIR": ray_tmp}, capture_output=True, text=True,
                         timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"monitor": [-signal.SIGKILL]}
    assert "Terminated with signal" not in out.stderr
    left = [p for p in _processes_mentioning(ray_tmp) if _running(p)]
    assert left == [], [p.name() for p in left]
