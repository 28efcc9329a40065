"""The Python entry point: a sweep from a dict with overrides, a typed result, the CLI's code path."""
from __future__ import annotations

import pytest
import yaml

from tests.conftest import sweep_yaml

pytestmark = pytest.mark.integration


def test_sweep_from_a_dict_returns_its_champion_leaderboard_and_mlflow_ids(tmp_path, digits_teacher, ray_address, monkeypatch):
    import mlflow

    from orchestrator.api import best_of, run_sweep_from
    from trainables.registry import ConfigError

    monkeypatch.chdir(tmp_path)
    data = yaml.safe_load(sweep_yaml(tmp_path, digits_teacher, "api").read_text())
    before = yaml.safe_dump(data)
    result = run_sweep_from(data, {"budget.num_samples": 3, "epochs": 2, "search": {"alpha": {"type": "float", "low": 0.0, "high": 1.0}}},
                            address=ray_address, maximum={"params": 5000})
    assert yaml.safe_dump(data) == before  # the caller's dict is not changed
    assert result.config.train.epochs == 2 and list(result.config.search) == ["loss.alpha"]
    assert len(result.leaderboard) == 3 and result.champion.run_id in {r["run_id"] for r in result.leaderboard}
    assert result.champion.val_acc == max(r["val_acc"] for r in result.leaderboard if r["status"] == "finished" and r["params"] <= 5000)
    assert 0 < result.champion.test["test_acc"] <= 1 and result.champion.version >= 1
    client = mlflow.tracking.MlflowClient(result.tracking_uri)
    assert client.get_run(result.parent_run_id).info.experiment_id == result.experiment_id
    assert client.get_run(result.parent_run_id).data.tags["kdsweep.champion_run_id"] == result.champion.run_id
    assert client.get_model_version_by_alias(result.config.registered_model, "champion").run_id == result.champion.run_id
    again = best_of("api", str(tmp_path / "runs"))  # the CLI's `kdsweep best`: same champion, not tested or registered again
    assert again.champion.run_id == result.champion.run_id and again.champion.version == result.champion.version
    with pytest.raises(ConfigError, match="`loss.alpha`"):
        run_sweep_from(data, {"alpha": 2.0})
