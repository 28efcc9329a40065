"""The trial loop: exact resume, divergence, and what only the KD term can cause."""
import pytest
import torch
import torch.nn.functional as F

from trainables.data import load_dataset, normalizer
from trainables.loop import LocalReporter, load_state, train_student
from trainables.registry import ConfigError
from trainables.teacher import load_teacher


def trial(**kw):
    base = {"dataset": {"name": "digits", "val_fraction": 0.2}, "student": "cnn_tiny", "epochs": 4,
            "batch_size": 64, "loss": {"alpha": 0.0}, "profile": False, "device": "cpu"}
    base.update(kw)
    return base


class StopAfter(LocalReporter):
    def __init__(self, checkpoint_dir, epochs):
        super().__init__(checkpoint_dir, printer=None)
        self.left = epochs

    def report(self, metrics, state):
        super().report(metrics, state)
        self.left -= 1
        if self.left == 0:
            raise KeyboardInterrupt("simulated kill")


def test_resume_from_mid_run_checkpoint_gives_identical_weights(tmp_path, digits_teacher):
    cfg = trial(teacher_path=str(digits_teacher), loss={"alpha": 0.7, "temperature": 3.0},
                schedule={"name": "cosine", "warmup_epochs": 1})
    straight = train_student(cfg, LocalReporter(None, printer=None))
    with pytest.raises(KeyboardInterrupt):
        train_student(cfg, StopAfter(str(tmp_path), 2))
    assert load_state(tmp_path / "state.pt")["epoch"] == 2
    resumed = train_student(cfg, LocalReporter(str(tmp_path), printer=None))
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    assert resumed.metrics["val_acc"] == straight.metrics["val_acc"]


def test_divergent_run_reports_itself_instead_of_crashing():
    result = train_student(trial(optimizer={"name": "sgd", "lr": 1e8, "momentum": 0.9}, epochs=3))
    assert result.metrics["status"] == "diverged"
    assert result.metrics["epoch"] < 3 or result.history[-1]["status"] == "diverged"


def test_kd_term_pulls_student_towards_teacher(digits_teacher):
    """Same student, same seeds: only the KD term can pull the softened outputs (T=4) to the teacher's."""
    s = load_dataset("digits", val_fraction=0.2)
    teacher, _ = load_teacher(digits_teacher)
    norm = normalizer(s, "cpu")
    with torch.no_grad():
        t_val = teacher(norm(s.val_x))
    kl = {}
    for alpha in (0.0, 0.9):
        vals = []
        for seed in (0, 1):
            r = train_student(trial(student="mlp_32", epochs=6, seed=seed, teacher_path=str(digits_teacher),
                                    loss={"alpha": alpha, "temperature": 4.0}), LocalReporter(None, printer=None))
            with torch.no_grad():
                vals.append(F.kl_div(F.log_softmax(r.model(norm(s.val_x)) / 4, 1), F.log_softmax(t_val / 4, 1),
                                     reduction="batchmean", log_target=True).item())
        kl[alpha] = sum(vals) / len(vals)
    assert kl[0.9] < 0.5 * kl[0.0], kl


def test_kd_without_teacher_is_a_config_error():
    with pytest.raises(ConfigError, match="`teacher_path` is required"):
        train_student(trial(loss={"alpha": 0.5}))


def test_corrupt_checkpoint_is_a_config_error(tmp_path):
    (tmp_path / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="corrupt"):
        train_student(trial(), LocalReporter(str(tmp_path), printer=None))


def test_feature_losses_train(digits_teacher):
    for name in ("at", "hint", "dkd"):
        r = train_student(trial(epochs=1, teacher_path=str(digits_teacher), loss={"name": name, "alpha": 0.5}),
                          LocalReporter(None, printer=None))
        assert r.metrics["status"] == "finished" and 0 <= r.metrics["val_acc"] <= 1
