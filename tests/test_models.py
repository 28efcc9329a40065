import pytest
import torch

from trainables.models import MODELS, create_model
from trainables.models.profile import size_metrics
from trainables.tasks import task_for
from trainables.registry import ConfigError, Registry


@pytest.mark.parametrize("name,millions", [("resnet8x4", 1.23), ("resnet32x4", 7.43), ("resnet20", 0.28), ("resnet56", 0.86)])
def test_crd_resnet_parameter_counts(name, millions):
    model = create_model(name, 100, (3, 32, 32))
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == millions


@pytest.mark.parametrize("name", [n for n in MODELS.names() if n != "hf"])  # hf: token ids (tests/test_text.py)
def test_every_model_gives_logits_and_stage_features(name):
    shape = (1, 28, 28) if name.startswith(("mlp", "cnn")) else (3, 32, 32)
    model = create_model(name, 7, shape).eval()
    x = torch.randn(2, *shape)
    logits, feats = model(x, with_features=True)
    assert logits.shape == (2, 7) and len(feats) >= 1
    assert torch.allclose(model.forward_head(feats[-1]), logits)
    assert torch.allclose(model(x), logits)


def test_registry_rejects_duplicates_and_lists_choices():
    reg = Registry("thing", "thing.name")
    reg.register(lambda: 1, name="a")
    with pytest.raises(KeyError, match="twice"):
        reg.register(lambda: 2, name="a")
    with pytest.raises(ConfigError, match=r"`model` must be one of \[.*resnet8x4.*\], but got model='resnet9'"):
        create_model("resnet9", 10, (3, 32, 32))


def test_size_metrics():
    model = create_model("cnn_tiny", 10, (1, 8, 8))
    m = size_metrics(model, task_for("digits").inputs((1, 8, 8)), batch=8, gpu=False)
    assert m["params"] == sum(p.numel() for p in model.parameters())
    assert m["bytes"] > 4 * m["params"]  # float32 weights plus BN buffers and the header
    assert m["flops"] > 2 * 16 * 8 * 3 * 3 * 4  # at least the second conv's multiply-adds
    assert m["latency_cpu_b1_ms"] > 0 and not any("cpu_b8" in k for k in m)  # batch 8: on CUDA only
