"""torchvision's classifiers as teachers and students: built for the dataset, logit and feature
losses (layers by name), grey images on 3-channel networks."""
import pytest
import torch

from trainables.config import DatasetConfig
from trainables.data import load_splits
from trainables.loop import LocalReporter, train_student
from trainables.models import create_model, zoo_names
from trainables.models.zoo import ZooModel
from trainables.registry import ConfigError
from trainables.models.teacher import save_teacher
from tests.conftest import trial_dict

SYNTH = {"name": "synthetic", "val_fraction": 0.25, "kwargs": {"n_train": 96, "n_test": 16, "shape": [3, 16, 16], "num_classes": 5}}


def test_every_torchvision_classifier_is_a_model_name():
    names = zoo_names("torchvision.")
    assert {"torchvision.resnet18", "torchvision.mobilenet_v3_small", "torchvision.efficientnet_b0"} <= set(names)
    m = create_model("torchvision.mobilenet_v3_small", 7, (1, 16, 16))
    assert isinstance(m, ZooModel) and m(torch.zeros(2, 1, 16, 16)).shape == (2, 7)  # grey in, 3-channel net


def test_layers_by_name_and_bad_names():
    m = create_model("torchvision.resnet18", 5, (3, 16, 16))
    with pytest.raises(ConfigError, match="feature losses on torchvision.resnet18 need layer names"):
        m(torch.zeros(2, 3, 16, 16), with_features=True)
    m.set_feature_layers(["layer2", "layer3"], "loss.teacher_layers")
    logits, feats = m(torch.zeros(2, 3, 16, 16), with_features=True)
    assert logits.shape == (2, 5) and [f.shape[1] for f in feats] == [128, 256]
    assert m(torch.zeros(2, 3, 16, 16)).shape == (2, 5)  # plain calls record nothing
    with pytest.raises(ConfigError, match=r"`loss.teacher_layers` names no layer 'layer9'.*'layer1'"):
        m.set_feature_layers(["layer9"], "loss.teacher_layers")


@pytest.fixture(scope="module")
def zoo_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo-teacher")
    s = load_splits(DatasetConfig(**SYNTH))
    save_teacher(create_model("torchvision.resnet18", 5, (3, 16, 16)), out,
                 {"arch": "torchvision.resnet18", "arch_kwargs": {}, "dataset": "synthetic", "num_classes": 5, "input_shape": [3, 16, 16],
                  "classes": [], "val_acc": 0.0, "epochs": 0, "normalize": "dataset", "mean": list(s.mean), "std": list(s.std)})
    return out


@pytest.mark.parametrize("loss", [
    {"name": "kd", "alpha": 0.9},
    {"name": "at", "ce_weight": 1.0, "distill_weight": 1.0, "student_layers": ["features.3", "features.8"], "teacher_layers": ["layer2", "layer3"]},
    {"name": "hint", "alpha": 0.5, "student_layers": ["features.8"], "teacher_layers": ["layer3"]},
])
def test_torchvision_teacher_distils_torchvision_student(loss, zoo_teacher):
    r = train_student(trial_dict(dataset=SYNTH, student="torchvision.mobilenet_v3_small", teacher_path=str(zoo_teacher), loss=loss,
                                 epochs=1, batch_size=32, profile=False, robust_samples=0), LocalReporter(None, log_epochs=False))
    assert r.metrics["status"] == "finished" and r.metrics["train_kd"] > 0
    assert r.metrics["teacher_targets"] == ("online" if loss["name"] != "kd" else "precomputed")
