"""The sweep's teacher cache returns the teacher's own logits for the same views, and a trial that
reads it trains exactly as one that runs the teacher online."""
import torch

from trainables.config import AugmentConfig, TrialConfig
from trainables.data import augment, epoch_batches, load_dataset
from trainables.data.normalize import normalizer
from trainables.loop import LocalReporter, train_student
from trainables.models.teacher import load_teacher
from trainables.teacher_cache import TeacherCache, build_teacher_cache
from tests.conftest import trial_dict


def cfg(teacher, **kw):
    base = {"dataset": {"name": "digits", "val_fraction": 0.2, "augment": {"crop_pad": 1, "flip": True}}, "student": "cnn_tiny",
            "epochs": 2, "batch_size": 64, "teacher_path": str(teacher), "loss": {"alpha": 0.9}, "profile": False, "robust_samples": 0}
    base.update(kw)
    return TrialConfig.model_validate(trial_dict(**base))


def test_cache_holds_the_teachers_logits_for_each_view(tmp_path, digits_teacher):
    c = cfg(digits_teacher)
    teacher, card = load_teacher(digits_teacher)
    path, forwards = build_teacher_cache(c, teacher, card, tmp_path, epochs=2)
    s = load_dataset("digits", val_fraction=0.2)
    assert forwards == 2 * (len(s.train_y) // 64) * 64 + len(s.val_y)
    assert build_teacher_cache(c, teacher, card, tmp_path, epochs=2) == (path, 0)  # built once
    cache = TeacherCache.open(path, c, card)
    norm = normalizer(s.mean, s.std, "cpu")
    aug = AugmentConfig(crop_pad=1, flip=True)
    for b, idx, view in epoch_batches(len(s.train_y), 64, c.seed, 1, aug, (8, 8)):
        with torch.no_grad():
            expected = teacher(norm(augment(s.train_x[idx], view, aug)))
        got = cache.batch(1, b, idx, slice(0, 64), "cpu")
        assert torch.allclose(got, expected, rtol=1e-3, atol=2e-3)  # fp16 rounding
    assert TeacherCache.open(path, cfg(digits_teacher, seed=1), card) is None  # other views: go online
    assert TeacherCache.open(path, cfg(digits_teacher, batch_size=32), card) is None


def test_cached_trial_matches_online_trial_and_runs_no_teacher(tmp_path, digits_teacher):
    c = cfg(digits_teacher)
    teacher, card = load_teacher(digits_teacher)
    path, _ = build_teacher_cache(c, teacher, card, tmp_path, epochs=2)
    online = train_student(c.model_copy(update={"train": c.train.model_copy(update={"teacher_targets": "online"})}), LocalReporter(None, log_epochs=False))
    cached = train_student(c.model_copy(update={"teacher_cache": str(path)}), LocalReporter(None, log_epochs=False))
    assert online.metrics["teacher_targets"] == "online" and cached.metrics["teacher_targets"] == "cache"
    assert cached.metrics["teacher_forward_images"] == 0 and online.metrics["teacher_forward_images"] > 0
    assert abs(online.metrics["val_acc"] - cached.metrics["val_acc"]) <= 0.02
    assert abs(online.metrics["train_kd"] - cached.metrics["train_kd"]) <= 0.01 * online.metrics["train_kd"]
