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
    from orchestrator.config import load_config
    from orchestrator.prepare import check_data, ensure_teacher

    out = tmp_path_factory.mktemp("teacher") / "digits-cnn_small"
    cfg = load_config(None, [f"teacher.path={out}", "teacher.epochs=10"])
    ensure_teacher(cfg, check_data(cfg), printer=lambda s: None)
    return out


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def shared_fashion_root() -> str | None:
    root = os.environ.get("KD_DATA_ROOT") or (str(SHARED_DATA) if (SHARED_DATA / "FashionMNIST" / "raw").is_dir() else None)
    return root
