"""Weights files: reading (.pth weights_only, .safetensors), head swap, frozen backbones, and each
model's own input statistics (teacher card -> cache, online targets, exports)."""
from __future__ import annotations

import pickle

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from trainables.config import AugmentConfig, DatasetConfig, TrainConfig, TrialConfig
from trainables.data import load_splits
from trainables.data.normalize import model_stats, normalizer
from trainables.models.zoo import IMAGENET_MEAN, IMAGENET_STD
from trainables.eval.inference import predict
from trainables.loop import LocalReporter, train_student
from trainables.models import create_model
from trainables.registry import ConfigError
from trainables.models.teacher import load_teacher, save_teacher
from trainables.models.weights import freeze_backbone, load_weights, read_weights
from tests.conftest import trial_dict

SYNTH = {"name": "synthetic", "kwargs": {"n_train": 96, "n_test": 16, "shape": [3, 16, 16], "num_classes": 4}, "augment": {"crop_pad": 0, "flip": False}}


def test_pth_and_safetensors_read_alike_with_ddp_prefix_and_checkpoint_dicts(tmp_path):
    state = create_model("cnn_tiny", 10, (1, 8, 8)).state_dict()
    torch.save({"module." + k: v for k, v in state.items()}, tmp_path / "ddp.pth")
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "ckpt.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    for name in ("ddp.pth", "ckpt.pt", "w.safetensors"):
        got = read_weights(tmp_path / name, "teacher.weights")
        assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


class Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


@pytest.mark.parametrize("content,needle", [
    (b"this is not a tensor file\n", "is not a tensor file"),
    (pickle.dumps(Evil()), "is not a tensor file"),  # weights_only refuses arbitrary objects: never unpickled
    (None, "holds no state_dict"),
], ids=["text", "pickled-object", "settings-dict"])
def test_files_that_hold_no_weights_are_one_line_errors(tmp_path, content, needle, capsys):
    path = tmp_path / "bad.pth"
    if content is None:
        torch.save({"lr": 0.1, "epochs": 3}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=needle) as e:
        read_weights(path, "teacher.weights")
    assert "`teacher.weights`" in str(e.value) and "\n" not in str(e.value)
    assert "unpickled!" not in capsys.readouterr().out


def test_wrong_keys_and_shapes_list_the_first_few(tmp_path):
    torch.save(create_model("mlp_32", 10, (1, 8, 8)).state_dict(), tmp_path / "other.pth")
    with pytest.raises(ConfigError, match=r"`teacher.weights` .* does not fit this architecture \(missing stages.0.1.bias, .*\(14 in all\); unexpected stages.0.0.bias\)"):
        load_weights(create_model("cnn_tiny", 10, (1, 8, 8)), tmp_path / "other.pth", "teacher.weights", new_head_ok=True)
    state = torchvision.models.resnet18(num_classes=1000).state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(32, 64, 3, 3)  # a slimmer variant's file
    torch.save(state, tmp_path / "slim.pth")
    with pytest.raises(ConfigError, match=r"tensors of other shapes \(layer1.0.conv1.weight \(32, 64, 3, 3\) vs \(64, 64, 3, 3\)\)"):
        load_weights(create_model("torchvision.resnet18", 10, (3, 8, 8)), tmp_path / "slim.pth", "teacher.weights", new_head_ok=True)


def test_an_imagenet_head_is_replaced_and_the_backbone_loaded(tmp_path):
    imagenet = torchvision.models.resnet18(num_classes=1000)
    torch.save(imagenet.state_dict(), tmp_path / "r18.pth")
    model = create_model("torchvision.resnet18", 10, (3, 32, 32))
    fresh_head = model.net.fc.weight.clone()
    assert load_weights(model, tmp_path / "r18.pth", "teacher.weights", new_head_ok=True) is True
    assert torch.equal(model.net.layer3[0].conv1.weight, imagenet.layer3[0].conv1.weight)
    assert torch.equal(model.net.fc.weight, fresh_head) and model.net.fc.out_features == 10
    with pytest.raises(ConfigError, match=r"head of another class count \(fc.weight \(1000, 512\), the dataset needs \(10, 512\)\)"):
        load_weights(model, tmp_path / "r18.pth", "teacher.weights", new_head_ok=False)
    # A same-class-count file loads exactly, ours (net.*) or torchvision's names.
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "ours.safetensors"))
    again = create_model("torchvision.resnet18", 10, (3, 32, 32))
    assert load_weights(again, tmp_path / "ours.safetensors", "student_weights", new_head_ok=False) is False
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_frozen_backbone_trains_only_the_head(tmp_path):
    model = create_model("cnn_tiny", 4, (3, 16, 16))
    torch.save(model.state_dict(), tmp_path / "w.pth")
    assert freeze_backbone(model) == ["head.weight", "head.bias"]
    r = train_student(trial_dict(dataset=SYNTH, student="cnn_tiny", student_weights=str(tmp_path / "w.pth"), freeze_backbone=True,
                                 loss={"alpha": 0.0}, epochs=2, batch_size=32, profile=False, robust_samples=0),
                      LocalReporter(None, log_epochs=False))
    before = torch.load(tmp_path / "w.pth", weights_only=True)
    after = r.model.state_dict()
    assert not torch.equal(after["head.weight"], before["head.weight"])
    assert all(torch.equal(after[k], before[k]) for k in before if k.endswith("weight") and not k.startswith("head.") and before[k].dim() > 1)


def test_statistics_follow_the_weights():
    s = load_splits(DatasetConfig(**SYNTH))
    assert model_stats("auto", True, "torchvision.resnet18", s) == (IMAGENET_MEAN, IMAGENET_STD)
    assert model_stats("auto", False, "torchvision.resnet18", s) == (s.mean, s.std)
    assert model_stats("auto", True, "cnn_tiny", s) == (s.mean, s.std)  # our own models' files: trained on the data
    assert model_stats("dataset", True, "torchvision.resnet18", s) == (s.mean, s.std)
    grey = load_splits(DatasetConfig(name="digits"))
    mean, std = model_stats("imagenet", False, "cnn_tiny", grey)
    assert len(mean) == 1 and mean[0] == pytest.approx(sum(IMAGENET_MEAN) / 3)


def test_the_teacher_sees_its_own_statistics_online_and_in_the_cache(tmp_path, monkeypatch):
    """A teacher whose card says ImageNet statistics is fed ImageNet-normalized inputs, while the
    student gets the data's: the cached targets, the online targets and the val logits agree."""
    from trainables.teacher_cache import build_teacher_cache

    s = load_splits(DatasetConfig(**SYNTH))
    net = create_model("cnn_tiny", 4, (3, 16, 16))
    save_teacher(net, tmp_path / "t", {"arch": "cnn_tiny", "arch_kwargs": {}, "num_classes": 4, "input_shape": [3, 16, 16], "classes": [],
                                       "dataset": "synthetic", "val_acc": 0.0, "epochs": 0, "normalize": "imagenet",
                                       "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)})
    teacher, card = load_teacher(tmp_path / "t")
    want = predict(teacher, s.val_x, normalizer(IMAGENET_MEAN, IMAGENET_STD, "cpu"), 64, torch.no_grad, False)
    wrong = predict(teacher, s.val_x, normalizer(s.mean, s.std, "cpu"), 64, torch.no_grad, False)
    assert not torch.allclose(want, wrong, atol=1e-3)
    cfg = TrialConfig(dataset=DatasetConfig(**SYNTH), student="cnn_tiny", teacher_path=str(tmp_path / "t"), train=TrainConfig(batch_size=32, epochs=1))
    path, _ = build_teacher_cache(cfg, teacher, card, tmp_path / "cache")
    assert torch.allclose(torch.load(path / "val.pt", weights_only=True).float(), want, atol=2e-2)  # fp16 storage
    other = card.model_copy(update={"mean": list(s.mean), "std": list(s.std)})  # other statistics: another cache entry
    assert build_teacher_cache(cfg, teacher, other, tmp_path / "cache")[0] != path

    seen = []
    teacher.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().clone()))
    monkeypatch.setattr("trainables.loop.load_teacher", lambda *a, **k: (teacher, card))
    r = train_student({**cfg.model_dump(), "dataset": {**SYNTH, "augment": AugmentConfig(crop_pad=1).model_dump()},
                       "train": {**cfg.train.model_dump(), "teacher_targets": "online", "robust_samples": 0}, "profile": False}, LocalReporter(None, log_epochs=False))
    assert r.metrics["teacher_targets"] == "online"
    assert r.preprocess == {"mean": list(s.mean), "std": list(s.std)}  # the student: the data's statistics
    x = seen[-1]  # a training batch as the teacher received it: ImageNet-normalized
    raw = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255 + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    assert torch.allclose(raw, raw.round(), atol=1e-3) and raw.min() >= -1e-3 and raw.max() <= 255 + 1e-3


def test_teacher_from_weights_is_fine_tuned_with_its_own_settings_and_cached_by_the_file_hash(tmp_path):
    from orchestrator.plan.config import load_config

    torch.save(create_model("cnn_small", 5, (1, 8, 8)).state_dict(), tmp_path / "t.pth")
    sets = [f"teacher.weights={tmp_path / 't.pth'}", "teacher.finetune={epochs: 3, lr: 0.002, freeze_backbone: true}",
            "teacher.augment={crop_pad: 1, flip: false}"]
    cfg = load_config(None, sets)
    t = cfg.teacher_trial()
    assert (t.train.epochs, t.train.optimizer.lr, t.freeze_backbone, t.student_weights) == (3, 0.002, True, str(tmp_path / "t.pth"))
    assert t.dataset.augment == AugmentConfig(crop_pad=1, flip=False)
    assert cfg.trial("cnn_tiny").dataset.augment == AugmentConfig(crop_pad=0, flip=False)  # students: the dataset's
    first = cfg.teacher_dir()
    torch.save(create_model("cnn_small", 5, (1, 8, 8)).state_dict(), tmp_path / "t.pth")  # same path, other weights
    assert load_config(None, sets).teacher_dir() != first
    assert load_config(None, sets[:1]).teacher_dir() != load_config(None, sets[:1] + ["teacher.normalize=imagenet"]).teacher_dir()
