"""A driver killed while Tune writes its state leaves an unreadable file: resume uses the last good copy."""
import json
import pickle
import time

from orchestrator.run.tune_state import BACKUP, TuneStateBackup, _snapshot, _state_is_valid, repair_state


def make_state(d, n_trials):
    (d / "experiment_state-2026.json").write_text(json.dumps({"trial_data": list(range(n_trials))}))
    (d / "searcher-state-2026.pkl").write_bytes(pickle.dumps({"trials": n_trials}))


def test_snapshot_then_repair_after_truncated_write(tmp_path):
    make_state(tmp_path, 3)
    assert _snapshot(tmp_path)
    make_state(tmp_path, 4)
    (tmp_path / "experiment_state-2026.json").write_text("")  # the kill landed mid-write
    assert not _state_is_valid(list(tmp_path.glob("*.*")))
    repair_state(tmp_path)
    assert json.loads((tmp_path / "experiment_state-2026.json").read_text()) == {"trial_data": [0, 1, 2]}
    assert pickle.loads((tmp_path / "searcher-state-2026.pkl").read_bytes()) == {"trials": 3}


def test_an_empty_search_generator_state_is_repaired_too(tmp_path):
    """Tune's search_gen_state-*.json is a cloudpickle copied to storage after each step: a driver
    killed mid-copy leaves it empty, and Tune's restore then starts the study over."""
    make_state(tmp_path, 3)
    (tmp_path / "search_gen_state-2026.json").write_bytes(pickle.dumps({"counter": 3}))
    assert _snapshot(tmp_path)
    (tmp_path / "search_gen_state-2026.json").write_bytes(b"")
    assert not _state_is_valid(list(tmp_path.glob("*.*")))
    repair_state(tmp_path)
    assert pickle.loads((tmp_path / "search_gen_state-2026.json").read_bytes()) == {"counter": 3}


def test_invalid_state_never_replaces_the_backup(tmp_path):
    make_state(tmp_path, 2)
    assert _snapshot(tmp_path)
    (tmp_path / "searcher-state-2026.pkl").write_bytes(b"\x80\x04trunc")
    assert not _snapshot(tmp_path)
    assert pickle.loads((tmp_path / BACKUP / "searcher-state-2026.pkl").read_bytes()) == {"trials": 2}


def test_valid_live_state_is_left_alone(tmp_path):
    make_state(tmp_path, 2)
    assert _snapshot(tmp_path)
    make_state(tmp_path, 5)
    repair_state(tmp_path)
    assert json.loads((tmp_path / "experiment_state-2026.json").read_text()) == {"trial_data": [0, 1, 2, 3, 4]}


def test_the_callback_copies_what_tune_rewrote_spaced_out_and_at_the_end(tmp_path, monkeypatch):
    """The state files grow with the trials and Tune rewrites them every step: a step with nothing
    rewritten copies nothing, copies are spaced MIN_INTERVAL_S apart, and the run's end copies the last."""
    monkeypatch.setattr(TuneStateBackup, "MIN_INTERVAL_S", 0.5)
    cb = TuneStateBackup()
    cb.experiment_dir = tmp_path
    make_state(tmp_path, 2)
    cb.on_step_end(iteration=1, trials=[])
    copy = tmp_path / BACKUP / "experiment_state-2026.json"
    assert json.loads(copy.read_text()) == {"trial_data": [0, 1]}
    make_state(tmp_path, 3)
    cb.on_step_end(iteration=2, trials=[])  # rewritten, but too soon after the last copy
    assert json.loads(copy.read_text()) == {"trial_data": [0, 1]}
    time.sleep(0.6)
    cb.on_step_end(iteration=3, trials=[])
    assert json.loads(copy.read_text()) == {"trial_data": [0, 1, 2]}
    copy.write_text("marker")  # a second copy would overwrite it
    time.sleep(0.6)
    cb.on_step_end(iteration=4, trials=[])  # nothing rewritten since
    assert copy.read_text() == "marker"
    make_state(tmp_path, 4)
    cb.on_experiment_end(trials=[])  # the last state, whenever the run ends
    assert json.loads(copy.read_text()) == {"trial_data": [0, 1, 2, 3]}


CALLS = []


def _record():
    CALLS.append("unpickled")
    return {}


class SideEffect:
    def __reduce__(self):
        return (_record, ())


def test_validation_never_executes_a_pickle(tmp_path):
    """tuner.pkl holds our tracker, whose __setstate__ connects to MLflow: checking the state must
    not run it (or anything else a pickle can run)."""
    make_state(tmp_path, 1)
    (tmp_path / "tuner.pkl").write_bytes(pickle.dumps(SideEffect()))
    assert _state_is_valid(list(tmp_path.glob("*.*")))
    assert _snapshot(tmp_path)
    assert CALLS == []
    (tmp_path / "tuner.pkl").write_bytes(pickle.dumps(SideEffect())[:-3])
    assert not _state_is_valid(list(tmp_path.glob("*.*")))


def tune_state(d, trial_ids, results=0):
    """Tune's experiment state as Ray 2.60 writes it: each trial a (JSON state, metadata) pair."""
    entries = [[json.dumps({"trial_id": t, "results": results}), "{}"] for t in trial_ids]
    (d / "experiment_state-2026.json").write_text(json.dumps({"trial_data": entries}))
    (d / "searcher-state-2026.pkl").write_bytes(pickle.dumps({"trials": len(trial_ids)}))


def test_a_started_trial_is_copied_at_once_whatever_the_spacing(tmp_path, monkeypatch):
    """Its MLflow run exists from its start: a last good copy without it would, on resume, have the
    searcher issue another trial (and another run) in its place."""
    from types import SimpleNamespace

    monkeypatch.setattr(TuneStateBackup, "MIN_INTERVAL_S", 3600.0)
    cb = TuneStateBackup()
    cb.experiment_dir = tmp_path
    copy = tmp_path / BACKUP / "experiment_state-2026.json"
    held = lambda: [json.loads(e[0])["trial_id"] for e in json.loads(copy.read_text())["trial_data"]]  # noqa: E731
    tune_state(tmp_path, ["a"])
    cb.on_step_end(iteration=1, trials=[])
    assert held() == ["a"]
    cb.on_trial_start(iteration=2, trials=[], trial=SimpleNamespace(trial_id="b"))
    tune_state(tmp_path, ["a"], results=1)  # this step's state does not hold b yet
    cb.on_step_end(iteration=2, trials=[])
    tune_state(tmp_path, ["a", "b"])
    cb.on_step_end(iteration=3, trials=[])  # an hour's spacing, yet copied: it holds b
    assert held() == ["a", "b"]
    tune_state(tmp_path, ["a", "b"], results=1)
    cb.on_step_end(iteration=4, trials=[])  # no trial started since: spaced again
    assert json.loads(json.loads(copy.read_text())["trial_data"][0][0])["results"] == 0
