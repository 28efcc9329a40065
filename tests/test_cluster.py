"""A Ray cluster on this machine (127.0.0.1: a head that only coordinates, two worker nodes), a
sweep joined with --address: the teacher trains on a worker, trials land on both workers, and when
the second is removed mid-sweep its trials are retried on the first."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import mlflow
import psutil
import pytest

from tests.conftest import count_rows, sweep_yaml

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _trial_actor_on(node, title: str = "ImplicitFunc") -> bool:
    """Whether an actor (a Tune trial's by default) runs under `node`'s raylet (workers are the
    raylet's children, titled ray::<class>)."""
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    return any(title in " ".join(c.cmdline()) for c in raylet.children(recursive=True) if c.is_running())


def _reporting_nodes(tmp_path) -> set[str]:
    """The nodes named by the epochs Tune has recorded so far (each trial's result.json)."""
    nodes = set()
    for f in (tmp_path / "runs" / "twonodes" / "tune-joint").glob("*/result.json"):
        for line in f.read_text().splitlines():
            try:
                nodes.add(json.loads(line)["node_id"])
            except (ValueError, KeyError):  # a line still being written
                pass
    return nodes


def test_a_missing_teacher_trains_on_a_worker_trials_run_on_both_and_a_lost_node_is_retried_elsewhere(tmp_path, plugin_dir):
    """A head with no CPU for work (num_cpus=0, as on a cluster whose head only coordinates) and two
    worker nodes: the missing teacher is trained by a Ray task where trials train (its card names
    that node, its epochs stream to the console); trials land on both workers, and when the second
    is removed mid-sweep its trial is retried on the first, every epoch logged once."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    first, second = cluster.add_node(num_cpus=1), cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        samples, epochs = 4, 12
        cfg = sweep_yaml(tmp_path, tmp_path, "twonodes", students=["plugin_cnn"], plugins=["kd_test_plugin"],
                         **{"teacher.path": None, "teacher.arch": "cnn_tiny", "teacher.epochs": 2,
                            "budget.num_samples": samples, "budget.max_concurrent": 2, "budget.grace_period": epochs, "budget.max_failures": 3,
                            "train.epochs": epochs, "train.batch_size": 8, "train.robust_samples": 0})
        db = tmp_path / "mlruns" / "mlflow.db"
        log = open(tmp_path / "console.txt", "w")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(cfg), "--address", cluster.address],
                                cwd=tmp_path, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline, removed = time.time() + 300, False
        while time.time() < deadline and proc.poll() is None:
            # a trial on the second node has reported an epoch and its actor still runs there: take the node away
            if second.node_id in _reporting_nodes(tmp_path) and _trial_actor_on(second):
                # the console's board is beside the driver (the head), never on a node that may go
                assert _trial_actor_on(cluster.head_node, "ProgressBoard") and not _trial_actor_on(second, "ProgressBoard")
                cluster.remove_node(second, allow_graceful=False)
                removed = True
                break
            time.sleep(0.3)
        assert removed, "no trial ran on the second node before the sweep ended"
        assert proc.wait(timeout=400) == 0, (tmp_path / "console.txt").read_text()[-3000:]
        log.close()
        console = (tmp_path / "console.txt").read_text()
        assert "teacher epoch=1" in console and "teacher epoch=2" in console  # its epochs streamed to the console
        (card,) = [json.loads(p.read_text()) for p in (tmp_path / "teachers").glob("*/teacher.json")]
        assert card["node_id"] in {first.node_id, second.node_id} and card["node_id"] != cluster.head_node.node_id
        assert card["epochs"] == 2 and 0 < card["val_acc"] <= 1

        client = mlflow.tracking.MlflowClient(f"sqlite:///{db}")
        exp = client.get_experiment_by_name("twonodes")
        runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("kdsweep.role") == "trial"]
        assert len(runs) == samples and len({r.data.tags["kdsweep.trial_id"] for r in runs}) == samples
        assert {r.data.tags["kdsweep.status"] for r in runs} == {"finished"}
        assert count_rows(db, "select count(*) from runs where status='RUNNING'") == 0
        for r in runs:  # each epoch logged once, retried trials included
            steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_acc")]
            assert steps == list(range(1, epochs + 1)), steps
        # every report names the node that ran it: both workers ran trials, and the trial the second
        # was running when it went finished on the first
        per_trial = [{json.loads(line)["node_id"] for line in f.read_text().splitlines() if line.strip()}
                     for f in (tmp_path / "runs" / "twonodes" / "tune-joint").glob("*/result.json")]
        first_id, second_id = first.node_id, second.node_id
        assert set().union(*per_trial) == {first_id, second_id}, per_trial
        assert {first_id, second_id} in per_trial, per_trial
        assert {r.data.tags["kdsweep.node_id"] for r in runs} <= {first_id, second_id}
    finally:
        cluster.shutdown()
