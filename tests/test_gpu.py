"""The CUDA path (`pytest -m gpu`; skipped where no CUDA GPU is visible): bf16 autocast,
channels_last, the teacher cache built on the GPU, GPU latency, and four trials sharing one GPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from trainables.loop import LocalReporter, train_student
from tests.conftest import trial_dict

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def trial(**kw) -> dict:
    base = {"dataset": {"name": "digits", "val_fraction": 0.2}, "student": "cnn_tiny", "epochs": 3, "batch_size": 64,
            "loss": {"alpha": 0.0}, "profile": False, "device": "cuda", "robust_samples": 0}
    base.update(kw)
    return trial_dict(**base)


class Recorder(LocalReporter):
    """Records the dtype and memory format every conv and linear layer sees while training."""

    def __init__(self) -> None:
        super().__init__(None, log_epochs=False)
        self.seen: set[tuple[str, torch.dtype, bool]] = set()

    def watch(self, model: nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        x = inputs[0]
        if module.training and not (x.dim() == 4 and x.shape[1] == 1):  # one channel: both layouts at once
            last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            self.seen.add((type(module).__name__, output.dtype, last))


def _train_watched(cfg: dict, monkeypatch) -> Recorder:
    import trainables.loop as loop

    rec = Recorder()
    create = loop.create_model

    def watched(*a, **kw):
        model = create(*a, **kw)
        rec.watch(model)
        return model

    monkeypatch.setattr(loop, "create_model", watched)
    result = train_student(cfg, rec)
    assert result.metrics["status"] == "finished" and result.metrics["val_acc"] > 0.5
    return rec


def test_bf16_autocast_and_channels_last_on_cuda(monkeypatch):
    rec = _train_watched(trial(amp=True, channels_last=True), monkeypatch)
    convs = {s for s in rec.seen if s[0] == "Conv2d"}
    assert convs and all(dtype == torch.bfloat16 and last for _, dtype, last in convs), convs
    assert {dtype for name, dtype, _ in rec.seen if name == "Linear"} == {torch.bfloat16}


def test_amp_off_trains_in_float32_contiguous(monkeypatch):
    rec = _train_watched(trial(amp=False, channels_last=False), monkeypatch)
    assert {dtype for _, dtype, _ in rec.seen} == {torch.float32}
    assert not any(last for _, _, last in rec.seen)


def test_bf16_reaches_float32_accuracy():
    """Same seed: bf16 autocast costs no accuracy worth naming on digits (val of 360 images)."""
    bf16 = train_student(trial(amp=True, epochs=6), LocalReporter(None, log_epochs=False)).metrics["val_acc"]
    fp32 = train_student(trial(amp=False, epochs=6), LocalReporter(None, log_epochs=False)).metrics["val_acc"]
    assert bf16 > 0.85 and abs(bf16 - fp32) < 0.03, (bf16, fp32)


def test_teacher_cache_built_on_the_gpu_matches_the_cpu_one_and_trials_read_it(tmp_path, digits_teacher):
    from trainables.config import trial_from_dict
    from trainables.models.teacher import load_teacher
    from trainables.data import load_splits
    from trainables.data.placement import place
    from trainables.teacher_cache import Builder, TeacherCache, build_teacher_cache

    cfg = trial_from_dict(trial(teacher_path=str(digits_teacher), loss={"alpha": 0.9, "temperature": 4.0},
                                dataset={"name": "digits", "val_fraction": 0.2, "augment": {"crop_pad": 1, "flip": True}}))
    teacher, card = load_teacher(digits_teacher)
    dirs = {}
    for device in ("cuda", "cpu"):
        dirs[device], forwards = build_teacher_cache(cfg, teacher, card, tmp_path / device, device)
        assert forwards > 0
        cache = TeacherCache.open(dirs[device], cfg, card)
        cache.builder = Builder(cfg, teacher.to(device), card, *place(load_splits(cfg.dataset), cfg.dataset, device), device)
        cache.for_epoch(0, device)  # as the first trial needing it builds it, on its device
    for name in ("val.pt", "epoch_0.pt"):
        g = torch.load(dirs["cuda"] / name, weights_only=True).float()
        c = torch.load(dirs["cpu"] / name, weights_only=True).float()
        assert g.device.type == "cpu" and g.shape == c.shape
        assert (g - c).norm() / c.norm() < 2e-2  # bf16 autocast on the GPU vs float32 on the CPU
        assert (g.argmax(1) == c.argmax(1)).float().mean() > 0.97
    cached = train_student(cfg.model_copy(update={"teacher_cache": str(dirs["cuda"])}), LocalReporter(None, log_epochs=False)).metrics
    assert cached["teacher_targets"] == "cache"  # the later epochs built by the trial itself, on the GPU


def test_gpu_latency_is_measured_and_positive():
    from trainables.models import create_model
    from trainables.models.profile import size_metrics
    from trainables.tasks import task_for

    m = size_metrics(create_model("cnn_tiny", 10, (1, 8, 8)), task_for("digits").inputs((1, 8, 8)))
    assert m["latency_gpu_b1_ms"] > 0 and m["latency_gpu_b64_ms"] > 0
    assert m["latency_gpu_b64_ms"] < 50 * m["latency_gpu_b1_ms"]  # batching is not serialised


@pytest.mark.integration
def test_four_trials_share_one_gpu_at_once(tmp_path, digits_teacher, monkeypatch):
    """gpus_per_trial=0.25: four trials train at the same time on the one GPU (their epoch
    intervals overlap)."""
    import ray

    from orchestrator.plan.config import load_config
    from orchestrator.run.sweep import run_sweep
    from tests.conftest import sweep_yaml

    monkeypatch.chdir(tmp_path)
    if ray.is_initialized():
        ray.shutdown()
    epochs = 40
    path = sweep_yaml(tmp_path, digits_teacher, "fourgpu", students=["cnn_tiny"],
                      **{"budget.num_samples": 4, "budget.max_concurrent": 4, "budget.grace_period": epochs, "train.epochs": epochs,
                         "train.batch_size": 16, "resources.gpus_per_trial": 0.25, "resources.cpus_per_trial": 1,
                         "train.robust_samples": 0})
    cfg = load_config(str(path), [])
    handles = run_sweep(cfg)
    assert handles["plots"].result()  # Optuna's plots, drawn beside the rest
    client = handles["tracker"].client
    runs = handles["tracker"].find_runs(f"tags.mlflow.parentRunId = '{handles['parent_run_id']}'")
    assert len(runs) == 4
    spans = []
    for r in runs:
        hist = client.get_metric_history(r.info.run_id, "val_acc")
        assert len(hist) == epochs and r.data.tags["kdsweep.status"] == "finished"
        spans.append((min(m.timestamp for m in hist), max(m.timestamp for m in hist)))
    latest_start, earliest_end = max(s for s, _ in spans), min(e for _, e in spans)
    assert latest_start < earliest_end, spans  # all four were training at one moment
