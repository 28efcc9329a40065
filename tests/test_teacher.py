import json

import pytest
import torch

from trainables.models import create_model
from trainables.registry import ConfigError
from trainables.card import TeacherCard
from trainables.models.teacher import WEIGHTS, load_teacher, save_teacher

FIELDS = {"arch": "cnn_tiny", "arch_kwargs": {}, "num_classes": 10, "input_shape": [1, 8, 8], "classes": [str(i) for i in range(10)],
          "dataset": "digits", "val_acc": 0.5, "epochs": 1, "normalize": "auto", "mean": [0.3], "std": [0.4]}


@pytest.fixture
def saved(tmp_path):
    model = create_model("cnn_tiny", 10, (1, 8, 8))
    save_teacher(model, tmp_path, FIELDS)
    return model, tmp_path


def test_round_trip(saved):
    model, path = saved
    loaded, card = load_teacher(path, 10, (1, 8, 8), "digits")
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(model.eval()(x), loaded(x)) and not loaded.training
    assert all(not p.requires_grad for p in loaded.parameters())
    assert isinstance(card, TeacherCard) and len(card.sha256) == 64 and card.stats == ((0.3,), (0.4,))
    assert card.model_dump(exclude={"sha256"}, exclude_none=True) == FIELDS


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


def test_a_card_without_statistics_is_an_error_naming_the_file_not_the_data_s(saved):
    """Cards are read field by field: no silent fallback to the dataset's mean/std."""
    _, path = saved
    card = json.loads((path / "teacher.json").read_text())
    del card["mean"], card["std"]
    (path / "teacher.json").write_text(json.dumps(card))
    with pytest.raises(ConfigError) as e:
        load_teacher(path)
    msg = str(e.value)
    assert msg.startswith("`teacher.path` has an incomplete or invalid teacher.json at " + str(path / "teacher.json"))
    assert "`mean` is required" in msg and "`std` is required" in msg and msg.endswith("or a sweep trains a missing one)") and "\n" not in msg


def test_an_incomplete_card_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="`mean` is required"):
        save_teacher(create_model("cnn_tiny", 10, (1, 8, 8)), tmp_path, {k: v for k, v in FIELDS.items() if k != "mean"})
    assert list(tmp_path.iterdir()) == []
