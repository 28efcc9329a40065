"""timm's models as teachers and students (`timm.<name>`): names checked against timm's lists,
built for the dataset, timm weights files with a new head, layers by timm's own names, the
statistics of the model's pretrained_cfg, ONNX export."""
import sys

import pytest
import torch
from safetensors.torch import save_file

timm = pytest.importorskip("timm")

from trainables.config import DatasetConfig  # noqa: E402
from trainables.data import load_splits  # noqa: E402
from trainables.data.normalize import Normalized, model_stats  # noqa: E402
from trainables.models.zoo import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from trainables.loop import LocalReporter, train_student  # noqa: E402
from trainables.models import check_model, create_model, tap_layers, zoo_names  # noqa: E402
from trainables.models.teacher import save_teacher  # noqa: E402
from trainables.models.weights import freeze_backbone, load_weights  # noqa: E402
from trainables.models.zoo import TimmModel  # noqa: E402
from trainables.registry import ConfigError  # noqa: E402
from tests.conftest import trial_dict  # noqa: E402

SYNTH = {"name": "synthetic", "val_fraction": 0.25, "kwargs": {"n_train": 64, "n_test": 16, "shape": [3, 32, 32], "num_classes": 5},
         "augment": {"crop_pad": 0, "flip": False}}


def test_timm_names_are_checked_against_timms_lists():
    assert check_model("timm.resnet10t") == "timm.resnet10t"
    assert check_model("timm.vit_base_patch16_clip_224.openai")  # a pretrained tag picks the pretrained_cfg
    assert {"timm.resnet10t", "timm.mobilenetv3_small_050"} <= set(zoo_names("timm."))
    with pytest.raises(ValueError, match=r"must be one of the \d+ timm models .*e\.g\. timm\.resnet18.*\(closest: timm\.resnet10t.*but got 'timm\.resnet10'"):
        check_model("timm.resnet10")
    with pytest.raises(ValueError, match=r"or torchvision\.<name> .*, timm\.<name> for a model of timm, hf\.<name> .*, but got 'resnet10t'"):
        check_model("resnet10t")
    with pytest.raises(ConfigError, match=r"`model` must be one of the \d+ timm models"):
        create_model("timm.no_such_net", 5, (3, 32, 32))


def test_unknown_timm_names_in_a_sweep_config_name_the_field():
    from orchestrator.plan.config import load_config

    cfg = load_config(None, ["teacher.arch=timm.resnet10t", "students=[timm.mobilenetv3_small_050, cnn_tiny]"])
    assert cfg.teacher.arch == "timm.resnet10t" and cfg.students[0] == "timm.mobilenetv3_small_050"
    with pytest.raises(ConfigError, match=r"`students\[0\]` must be one of the \d+ timm models") as e:
        load_config(None, ["students=[timm.resnet9000]"])
    assert "\n" not in str(e.value)


def test_without_timm_a_timm_name_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    zoo_names.cache_clear()
    try:
        for call in (lambda: check_model("timm.resnet10t"), lambda: create_model("timm.resnet10t", 5, (3, 32, 32))):
            with pytest.raises(ConfigError, match=r'timm\.<name> models need the timm package, which is not installed: pip install -e "\.\[timm\]"') as e:
                call()
            assert "\n" not in str(e.value)
        assert check_model("torchvision.resnet18") == "torchvision.resnet18"  # the other libraries are unaffected
    finally:
        zoo_names.cache_clear()


@pytest.mark.parametrize("shape,kwargs,in_chans,expand", [
    ((1, 32, 32), {}, 3, 3),  # grey: three equal channels, so 3-channel weights files fit
    ((1, 32, 32), {"in_chans": 1}, 1, 0),
    ((3, 32, 32), {}, 3, 0),
    ((4, 32, 32), {}, 4, 0),
])
def test_built_for_the_dataset(shape, kwargs, in_chans, expand):
    m = create_model("timm.resnet10t", 7, shape, **kwargs)
    assert isinstance(m, TimmModel) and (m.net.conv1[0].in_channels, m.expand) == (in_chans, expand)
    assert m(torch.zeros(2, *shape)).shape == (2, 7) and m.net.fc.out_features == 7


def test_fixed_size_models_are_built_for_the_images():
    vit = create_model("timm.test_vit", 7, (3, 32, 32))  # its pretrained_cfg: a fixed 160x160
    assert vit(torch.zeros(2, 3, 32, 32)).shape == (2, 7) and vit.net.pos_embed.shape[1] == 4 + vit.net.num_prefix_tokens
    with pytest.raises(ConfigError, match=r"`dataset` has 3-channel images, but timm.resnet10t was given in_chans=1: leave in_chans out"):
        create_model("timm.resnet10t", 7, (3, 32, 32), in_chans=1)


@pytest.mark.parametrize("name,kwargs,head", [
    ("resnet10t", {}, "fc"),
    ("mobilenetv3_small_050", {}, "classifier"),
    ("test_convnext", {}, "head.fc"),
    ("test_vit", {"img_size": 32}, "head"),
])
def test_a_timm_file_of_another_class_count_loads_the_backbone_and_leaves_a_new_head(tmp_path, name, kwargs, head):
    source = timm.create_model(name, pretrained=False, num_classes=1000, **kwargs)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.save(source.state_dict(), tmp_path / "w.pth")
    for file in ("w.safetensors", "w.pth"):
        model = create_model(f"timm.{name}", 10, (3, 32, 32))
        fresh = model.net.get_submodule(head).weight.clone()
        assert load_weights(model, tmp_path / file, "student_weights", new_head_ok=True) is True
        own = model.net.state_dict()
        backbone = [k for k in own if not k.startswith(head + ".")]
        assert backbone and all(torch.equal(own[k], source.state_dict()[k]) for k in backbone)
        assert torch.equal(model.net.get_submodule(head).weight, fresh) and model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ConfigError, match=rf"`student_weights` .* head of another class count \({head}.weight \(1000, "):
        load_weights(model, tmp_path / "w.pth", "student_weights", new_head_ok=False)


def test_a_distilled_vits_two_heads_are_both_new_and_both_trained(tmp_path):
    source = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=1000, img_size=32)
    torch.save(source.state_dict(), tmp_path / "deit.pth")
    model = create_model("timm.deit_tiny_distilled_patch16_224", 10, (3, 32, 32))
    assert load_weights(model, tmp_path / "deit.pth", "teacher.weights", new_head_ok=True) is True
    assert torch.equal(model.net.blocks[11].mlp.fc2.weight, source.blocks[11].mlp.fc2.weight)
    assert sorted(freeze_backbone(model)) == ["net.head.bias", "net.head.weight", "net.head_dist.bias", "net.head_dist.weight"]


def test_our_own_files_load_exactly_and_other_image_sizes_are_named(tmp_path):
    model = create_model("timm.resnet10t", 5, (3, 32, 32))
    torch.save(model.state_dict(), tmp_path / "ours.pth")  # net.* names, as a trial's student is saved
    again = create_model("timm.resnet10t", 5, (3, 32, 32))
    assert load_weights(again, tmp_path / "ours.pth", "student_weights", new_head_ok=False) is False
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    torch.save(timm.create_model("test_vit", pretrained=False).state_dict(), tmp_path / "vit160.pth")  # 160x160 position embeddings
    with pytest.raises(ConfigError, match=r"tensors of other shapes \(pos_embed "):
        load_weights(create_model("timm.test_vit", 5, (3, 32, 32)), tmp_path / "vit160.pth", "teacher.weights", new_head_ok=True)


def test_layers_by_timms_own_names():
    m = create_model("timm.resnet10t", 5, (3, 32, 32)).eval()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ConfigError, match=r"feature losses on timm.resnet10t need layer names: .*feature_info: \['act1', 'layer1', 'layer2'"):
        m(x, with_features=True)
    tap_layers(m, ["layer2", "layer3"], "loss.student_layers")
    logits, feats = m(x, with_features=True)
    want = m.net.forward_intermediates(x, indices=[2, 3], intermediates_only=True)
    assert logits.shape == (2, 5) and [f.shape for f in feats] == [w.shape for w in want]
    assert all(torch.allclose(f, w) for f, w in zip(feats, want))
    assert torch.allclose(m(x), logits)
    with pytest.raises(ConfigError, match=r"`loss.student_layers` names no layer 'stages.1' of this model: use module names such as \[.*'layer1'"):
        tap_layers(m, ["stages.1"], "loss.student_layers")


def test_auto_statistics_are_the_models_pretrained_cfg():
    s = load_splits(DatasetConfig(**SYNTH))
    assert model_stats("auto", True, "timm.test_vit", s) == ((0.5,) * 3, (0.5,) * 3)
    assert model_stats("auto", True, "timm.resnet10t", s) == (IMAGENET_MEAN, IMAGENET_STD)
    mean, std = model_stats("auto", True, "timm.vit_base_patch16_clip_224.openai", s)  # the tag's: CLIP's
    assert mean == pytest.approx((0.48145466, 0.4578275, 0.40821073)) and std == pytest.approx((0.26862954, 0.26130258, 0.27577711))
    assert model_stats("auto", False, "timm.test_vit", s) == (s.mean, s.std)  # from scratch: the data's
    assert model_stats("dataset", True, "timm.test_vit", s) == (s.mean, s.std)
    assert model_stats("imagenet", True, "timm.test_vit", s) == (IMAGENET_MEAN, IMAGENET_STD)
    grey = load_splits(DatasetConfig(name="digits"))
    assert model_stats("auto", True, "timm.test_vit", grey) == ((0.5,), (0.5,))


def test_timm_teacher_distils_a_timm_student_from_a_weights_file_on_named_layers(tmp_path):
    """The trial loop end to end: a timm teacher, a timm student started from a 1000-class timm
    file (its pretrained_cfg statistics), `at` on timm's layer names."""
    s = load_splits(DatasetConfig(**SYNTH))
    save_teacher(create_model("timm.resnet10t", 5, (3, 32, 32)), tmp_path / "t",
                 {"arch": "timm.resnet10t", "arch_kwargs": {}, "dataset": "synthetic", "num_classes": 5, "input_shape": [3, 32, 32],
                  "classes": [], "val_acc": 0.0, "epochs": 0, "normalize": "dataset", "mean": list(s.mean), "std": list(s.std)})
    torch.save(timm.create_model("test_convnext", pretrained=False).state_dict(), tmp_path / "s.pth")
    loss = {"name": "at", "ce_weight": 1.0, "distill_weight": 1.0, "student_layers": ["stages.1", "stages.2"], "teacher_layers": ["layer2", "layer3"]}
    r = train_student(trial_dict(dataset=SYNTH, student="timm.test_convnext", student_weights=str(tmp_path / "s.pth"), teacher_path=str(tmp_path / "t"),
                                 loss=loss, epochs=1, batch_size=32, profile=False, robust_samples=0), LocalReporter(None, log_epochs=False))
    assert r.metrics["status"] == "finished" and r.metrics["train_kd"] > 0 and r.metrics["teacher_targets"] == "online"
    assert r.preprocess == {"mean": [0.5] * 3, "std": [0.5] * 3}


def test_onnx_export_of_a_timm_student_with_its_preprocessing(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    model = Normalized(create_model("timm.resnet10t", 5, (1, 32, 32)), (0.5,), (0.5,)).eval()  # grey in: expanded in the graph
    x = torch.randint(0, 256, (3, 1, 32, 32)).float()
    torch.onnx.export(model, (x[:2],), str(tmp_path / "s.onnx"), input_names=["images"], output_names=["logits"],
                      dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}}, dynamo=True, external_data=False, verbose=False)
    got = onnxruntime.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        assert got.shape == (3, 5) and (torch.from_numpy(got) - model(x)).abs().max().item() <= 1e-4
