"""Shared fixtures: a digits teacher trained once per session, and a clean working directory."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KDSWEEP_CACHE", str(tmp_path_factory.getbasetemp() / "kdsweep-cache"))


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory) -> Path:
    """A cnn_small teacher on digits (about 5 s on 2 CPU cores)."""
    from orchestrator.plan.config import load_config
    from orchestrator.plan.prepare import check_data, ensure_teacher

    out = tmp_path_factory.mktemp("teacher") / "digits-cnn_small"
    cfg = load_config(None, [f"teacher.path={out}", "teacher.epochs=10"])
    ensure_teacher(cfg, check_data(cfg))
    return out


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def trial_dict(**kw) -> dict:
    """A trial config dict from flat keywords: TrainConfig's fields go under `train:`, as in the YAML."""
    from trainables.config import TrainConfig

    train = {k: kw.pop(k) for k in list(kw) if k in TrainConfig.model_fields}
    return {**kw, "train": {**kw.pop("train", {}), **train}}


def shared_fashion_root() -> str | None:
    root = os.environ.get("KD_DATA_ROOT") or (str(SHARED_DATA) if (SHARED_DATA / "FashionMNIST" / "raw").is_dir() else None)
    return root


PLUGIN = """
import torch
import torch.nn as nn

from trainables.models import MODELS, StagedNet


class Wide(StagedNet):
    def __init__(self, num_classes, input_shape):
        super().__init__()
        self.stem = nn.Flatten()
        size = 1
        for d in input_shape:
            size *= d
        self.stages = nn.ModuleList([nn.Sequential(nn.Linear(size, 48), nn.ReLU())])
        self.head = nn.Linear(48, num_classes)


@MODELS.register
def plugin_mlp(num_classes, input_shape):
    return Wide(num_classes, input_shape)


class TwoConv(StagedNet):
    def __init__(self, num_classes, input_shape, width=8):
        super().__init__()
        self.stem = nn.Identity()
        self.stages = nn.ModuleList([
            nn.Sequential(nn.Conv2d(input_shape[0], width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU()),
            nn.Sequential(nn.Conv2d(width, 2 * width, 3, 2, 1), nn.BatchNorm2d(2 * width), nn.ReLU()),
        ])
        self.head = nn.Linear(2 * width, num_classes)


@MODELS.register
def plugin_cnn(num_classes, input_shape, width=8):
    return TwoConv(num_classes, input_shape, width)


class Mask(nn.Module):
    def __init__(self, keep):
        super().__init__()
        self.register_buffer("keep", keep)

    def forward(self, x):
        return x.flatten(1) * self.keep


class Lottery(StagedNet):
    \"\"\"A student whose quality is drawn at initialization: for about half of the seeds (0 and 3
    among 0-5) it sees the whole image, for the others a random 3% of its pixels.\"\"\"

    def __init__(self, num_classes, input_shape):
        super().__init__()
        lucky = bool(torch.rand(()) < 0.5)
        size = 1
        for d in input_shape:
            size *= d
        self.stem = Mask(torch.ones(size) if lucky else (torch.rand(size) < 0.03).float())
        self.stages = nn.ModuleList([nn.Sequential(nn.Linear(size, 128), nn.ReLU())])
        self.head = nn.Linear(128, num_classes)


@MODELS.register
def lottery_mlp(num_classes, input_shape):
    return Lottery(num_classes, input_shape)


class Steady(StagedNet):
    \"\"\"Every other pixel, whatever the seed: a mediocre student that is the same on every seed.\"\"\"

    def __init__(self, num_classes, input_shape):
        super().__init__()
        size = 1
        for d in input_shape:
            size *= d
        keep = torch.zeros(size)
        keep[::2] = 1.0
        self.stem = Mask(keep)
        self.stages = nn.ModuleList([nn.Sequential(nn.Linear(size, 128), nn.ReLU())])
        self.head = nn.Linear(128, num_classes)


@MODELS.register
def steady_mlp(num_classes, input_shape):
    return Steady(num_classes, input_shape)
"""


@pytest.fixture(scope="session")
def plugin_dir(tmp_path_factory) -> Path:
    """A folder with a plugin module (`kd_test_plugin`: model `plugin_mlp`) on PYTHONPATH before Ray
    starts, as an installed package is on every node; nothing imports it but kdsweep's plugin loading."""
    d = tmp_path_factory.mktemp("plugins")
    (d / "kd_test_plugin.py").write_text(PLUGIN)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(d), os.environ.get("PYTHONPATH")]))
    import sys

    sys.path.insert(0, str(d))
    return d


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory, plugin_dir):
    """One local Ray instance for every integration test; its GCS address lets a subprocess join."""
    import ray

    from orchestrator.run.sweep import init_ray

    temp = tmp_path_factory.mktemp("ray")
    # A 2-CPU instance shared by every test: a DDP trial's two workers may wait for the previous
    # test's placement groups to be released (the sweep's PlacementGroupReaper removes leaked ones
    # after 30 s), which under load can outlast Train's 60 s default.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    init_ray(None, num_cpus=2, object_store_memory=256 * 1024**2, _temp_dir=str(temp) if len(str(temp)) < 60 else None)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def sweep_yaml(path: Path, teacher: Path, name: str, **over) -> Path:
    """A tiny digits sweep (a few seconds of training per trial) written to `path`; no corruption
    suite unless a test asks for it (train.robust_samples)."""
    import yaml

    from orchestrator.plan.config import set_dotted

    cfg = yaml.safe_load((REPO / "search_spaces" / "default.yaml").read_text())
    cfg.update(name=name, storage=str(path / "runs"))
    cfg["teacher"]["path"] = str(teacher)
    cfg["train"]["epochs"] = 3
    cfg["train"]["robust_samples"] = 0
    cfg["budget"] = {"num_samples": 5, "max_concurrent": 2, "grace_period": 1, "reduction_factor": 2, "confirm": {"top": 0}}
    cfg["tracking"] = {"uri": mlflow_store(path / "mlruns")}
    for k, v in over.items():
        set_dotted(cfg, k, v)
    out = path / f"{name}.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


_STORE_TEMPLATE: list[Path] = []


def mlflow_store(folder: Path) -> str:
    """The URI of a new SQLite MLflow store at folder/mlflow.db, copied from one this session made
    once: MLflow takes a new file through its whole schema history (4-5 s on 2 cores), and every
    sweep here has a store of its own. (A store made from nothing: the benchmark smokes' sweeps.)"""
    import shutil
    import tempfile

    if not _STORE_TEMPLATE:
        import mlflow

        made = Path(tempfile.mkdtemp(prefix="kdsweep-mlflow-")) / "mlflow.db"
        mlflow.tracking.MlflowClient(f"sqlite:///{made}").search_experiments()  # creates the store, tables migrated
        _STORE_TEMPLATE.append(made)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(_STORE_TEMPLATE[0], folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


def mlflow_server_env() -> dict[str, str]:
    """The environment of an `mlflow server` a test starts: without MLflow's job runner (eight huey
    consumers importing mlflow, for GenAI judges and trace rollups), as `kdsweep ui` starts it."""
    return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, seconds: float = 120.0) -> None:
    """Until `url` answers (an MLflow server's /health), or fail the test."""
    import time
    import urllib.request

    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{url} never answered")


def sqlite_rows(db: Path, sql: str) -> list[tuple]:
    import sqlite3

    with sqlite3.connect(db) as con:
        return con.execute(sql).fetchall()


def count_rows(db: Path, sql: str, *, polling: bool = False) -> int:
    """`select count(*)` on an MLflow SQLite store. With `polling`, 0 while the file or its tables do
    not exist yet: the driver creates the store in a thread while Ray starts, so a poll can see it
    half made; without, a missing table fails the test."""
    import sqlite3

    if polling and not db.exists():
        return 0
    try:
        with sqlite3.connect(db) as con:
            return con.execute(sql).fetchone()[0]
    except sqlite3.OperationalError:
        if polling:
            return 0
        raise
