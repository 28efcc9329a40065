"""Metrics against hand-computed references, corruptions for shape, range, determinism, severity."""
import math

import pytest
import torch
import torch.nn.functional as F

from trainables.eval.corruptions import CORRUPTIONS, SEVERITIES, corrupt, robustness
from trainables.eval.metrics import EPOCH_METRICS, FINAL_METRICS, classification_metrics, expected_calibration_error, per_class
from trainables.eval.sounds import SOUNDS
from trainables.eval.text_corruptions import TEXT_CORRUPTIONS

# 3 classes, 6 samples: predictions 0,0,1,1,2,0 against labels 0,1,1,1,2,2
LOGITS = torch.log(torch.tensor([
    [0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.5, 0.2, 0.3],
]))
Y = torch.tensor([0, 1, 1, 1, 2, 2])


def test_macro_f1_and_recall_by_hand():
    # class 0: tp 1, predicted 3, support 1 -> P 1/3, R 1, F1 0.5
    # class 1: tp 2, predicted 2, support 3 -> P 1, R 2/3, F1 0.8
    # class 2: tp 1, predicted 1, support 2 -> P 1, R 1/2, F1 2/3
    m = classification_metrics(LOGITS, Y)
    assert m["val_acc"] == pytest.approx(4 / 6)
    assert m["val_macro_recall"] == pytest.approx((1 + 2 / 3 + 1 / 2) / 3)
    assert m["val_macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert torch.allclose(per_class(LOGITS, Y)["precision"], torch.tensor([1 / 3, 1.0, 1.0], dtype=torch.float64))
    assert m["val_nll"] == pytest.approx(-sum(math.log(p) for p in (0.7, 0.3, 0.8, 0.5, 0.8, 0.3)) / 6, rel=1e-5)
    assert "val_top5_acc" not in m


def test_ece_by_hand():
    # confidences 0.7, 0.6, 0.8, 0.5, 0.8, 0.5 ; correct 1,0,1,1,1,0 ; 15 bins of width 1/15
    # bin (7/15, 8/15] holds 0.5, 0.5: acc 1/2, conf 0.5 -> 0
    # bin (8/15, 9/15] holds 0.6: acc 0, conf 0.6 -> 0.6 * 1/6
    # bin (10/15, 11/15] holds 0.7: acc 1, conf 0.7 -> 0.3 * 1/6
    # bin (11/15, 12/15] holds 0.8, 0.8: acc 1, conf 0.8 -> 0.2 * 2/6
    expected = (0.6 + 0.3 + 0.4) / 6
    assert expected_calibration_error(LOGITS, Y, 15) == pytest.approx(expected, rel=1e-5)
    assert expected_calibration_error(torch.tensor([[10.0, -10.0]] * 4), torch.tensor([0, 0, 0, 0])) == pytest.approx(0.0, abs=1e-6)


def test_agreement_kl_and_top5():
    teacher = LOGITS.flip(0)
    m = classification_metrics(LOGITS, Y, teacher)
    s_pred, t_pred = LOGITS.argmax(1), teacher.argmax(1)
    assert m["val_agreement"] == pytest.approx((s_pred == t_pred).float().mean().item())
    kl = sum((F.softmax(t, 0) * (F.log_softmax(t, 0) - F.log_softmax(s, 0))).sum() for s, t in zip(LOGITS, teacher)) / 6
    assert m["val_kl_teacher"] == pytest.approx(kl.item(), rel=1e-5)
    big = torch.randn(50, 10)
    y = big.topk(5, 1).indices[:, 4]
    assert classification_metrics(big, y, prefix="")["top5_acc"] == 1.0


def smooth_images(n=6, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.interpolate(torch.rand(n, 3, 6, 6, generator=g), size=(size, size), mode="bilinear", align_corners=False) * 200 + 25).to(torch.uint8)


@pytest.mark.parametrize("name", CORRUPTIONS.names())
def test_corruption_shape_range_determinism(name):
    x = smooth_images()
    a, b = corrupt(x, name, 3, seed=1), corrupt(x, name, 3, seed=1)
    assert a.shape == x.shape and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 255
    assert torch.equal(a, b)
    assert not torch.equal(a, x.float())


def distortion(name, clean, out):
    if name in ("gaussian_noise", "shot_noise"):
        return (out - clean).std().item()
    if name == "gaussian_blur":  # total variation removed
        tv = lambda z: (z[..., 1:, :] - z[..., :-1, :]).abs().mean() + (z[..., :, 1:] - z[..., :, :-1]).abs().mean()
        return (tv(clean) - tv(out)).item()
    if name == "contrast":
        return (clean.std() - out.std()).item()
    if name == "brightness":
        return (out.mean() - clean.mean()).item()
    if name == "pixelate":  # lost resolution: fewer distinct rows
        return -len(torch.unique(out[0, 0], dim=0))
    if name == "occlusion":
        return (out != clean).float().mean().item()
    raise KeyError(name)


@pytest.mark.parametrize("name", CORRUPTIONS.names())
def test_severity_is_monotonic_in_the_distortion_applied(name):
    x = smooth_images(n=16)
    d = [distortion(name, x.float(), corrupt(x, name, s, seed=0)) for s in SEVERITIES]
    assert all(a < b for a, b in zip(d, d[1:])), d


#: The final metrics only another task's corruption suite reports (text: trainables/eval/text_corruptions.py; audio: sounds.py).
TEXT_ONLY = {f"corr_{n}" for n in (*TEXT_CORRUPTIONS.names(), *SOUNDS.names())}


def test_robustness_summary():
    x, y = smooth_images(n=8), torch.arange(8) % 2
    oracle = lambda z: F.one_hot(y[: len(z)], 2).float()  # ignores the image: always right
    r, table = robustness(oracle, x, y, seed=0, batch=8, clean_acc=1.0)
    assert r["robust_acc"] == 1.0 and r["relative_robustness"] == 1.0
    assert sorted(table) == CORRUPTIONS.names() and all(accs == [1.0] * 5 for accs in table.values())
    assert set(r) == set(FINAL_METRICS) - TEXT_ONLY  # the schema names exactly what the suite reports (text models: their own corruptions)


def test_the_loop_reports_exactly_the_declared_schema(digits_teacher):
    """Every numeric key a trial reports is declared once (epoch, final or size); text keys are declared too."""
    from trainables.loop import LocalReporter, train_student
    from trainables.eval.metrics import TEXT_METRICS

    seen = []

    class Keep(LocalReporter):
        def report(self, metrics, state):
            seen.append(dict(metrics))

    train_student({"dataset": {"name": "digits", "val_fraction": 0.2}, "student": "cnn_tiny", "train": {"epochs": 2, "batch_size": 64, "robust_samples": 50},
                   "teacher_path": str(digits_teacher), "loss": {"alpha": 0.5}, "profile": False},
                  Keep(None, log_epochs=False))
    declared = {"epoch", *EPOCH_METRICS, *TEXT_METRICS}
    assert set(seen[0]) <= declared, set(seen[0]) - declared
    assert set(seen[-1]) - set(seen[0]) == set(FINAL_METRICS) - TEXT_ONLY
    assert {"teacher_forward_images", "val_agreement"} <= set(seen[0]) - {k for k in seen[0] if k.startswith("teacher_") and k != "teacher_forward_images"}


def test_profiled_sizes_and_the_leaderboard_use_declared_names():
    """The size metrics a profile measures, and every leaderboard column, are in the one declaration."""
    from trainables.eval.metrics import LEADERBOARD, METRICS, SIZE_METRICS, metric
    from trainables.models import create_model
    from trainables.models.profile import size_metrics
    from trainables.tasks import task_for

    sizes = size_metrics(create_model("mlp_32", 10, (1, 8, 8)), task_for("digits").inputs((1, 8, 8)), gpu=False)
    assert {f"size_{k}" for k in sizes} <= set(SIZE_METRICS)
    assert all(metric(c).name in METRICS for c in LEADERBOARD)
