import json

import pytest
import torch

from trainables.models import create_model
from trainables.registry import ConfigError
from trainables.teacher import WEIGHTS, load_teacher, save_teacher


@pytest.fixture
def saved(tmp_path):
    model = create_model("cnn_tiny", 10, (1, 8, 8))
    save_teacher(model, tmp_path, {"arch": "cnn_tiny", "num_classes": 10, "input_shape": [1, 8, 8], "dataset": "digits"})
    return model, tmp_path


def test_round_trip(saved):
    model, path = saved
    loaded, card = load_teacher(path, 10, (1, 8, 8), "digits")
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(model.eval()(x), loaded(x)) and not loaded.training
    assert all(not p.requires_grad for p in loaded.parameters())
    assert len(card["sha256"]) == 64


def test_class_count_shape_and_dataset_mismatches(saved):
    _, path = saved
    with pytest.raises(ConfigError, match="num_classes=10 but the dataset has 100"):
        load_teacher(path, 100)
    with pytest.raises(ConfigError, match="input_shape"):
        load_teacher(path, 10, (3, 32, 32))
    with pytest.raises(ConfigError, match="trained on 'digits'"):
        load_teacher(path, 10, (1, 8, 8), "mnist")


def test_corrupt_weights_and_card(saved):
    _, path = saved
    (path / WEIGHTS).write_bytes((path / WEIGHTS).read_bytes()[:-10])
    with pytest.raises(ConfigError, match="sha256"):
        load_teacher(path)
    card = json.loads((path / "teacher.json").read_text())
    card["sha256"] = __import__("hashlib").sha256((path / WEIGHTS).read_bytes()).hexdigest()
    (path / "teacher.json").write_text(json.dumps(card))
    with pytest.raises(ConfigError, match="corrupt teacher.safetensors"):
        load_teacher(path)
    (path / "teacher.json").write_text("{not json")
    with pytest.raises(ConfigError, match="corrupt teacher.json"):
        load_teacher(path)


def test_missing_teacher(tmp_path):
    with pytest.raises(ConfigError, match="kdsweep teacher CONFIG"):
        load_teacher(tmp_path / "nothing")
