"""Your own data: an image folder of mixed files decoded once, arrays files, host/device placement,
random-resized-crop views."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from trainables.config import DatasetConfig
from trainables.data import load_splits
from trainables.registry import ConfigError
from tests.conftest import trial_dict

CLASSES = ("cat", "dog", "emu")


def write_folder(root, per_class: int = 12, val: bool = False, bad: bool = True):
    """JPEGs and PNGs of several sizes and modes (a palette GIF, a greyscale, an RGBA PNG), one
    truncated JPEG and one text file; train/ and test/ (val/ only when asked)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 4)) + ((("val", 3),) if val else ()):
        for c, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = (20 + 3 * i, 16 + 2 * i) if i % 2 else (16 + i, 24)
                a = (rng.integers(0, 60, (h, w, 3)) + 80 * c).clip(0, 255).astype(np.uint8)
                im = Image.fromarray(a)
                kind = i % 5
                if kind == 0:
                    im.save(d / f"{i}.jpg", quality=90)
                elif kind == 1:
                    im.save(d / f"{i}.png")
                elif kind == 2:
                    im.convert("P", palette=Image.ADAPTIVE).save(d / f"{i}.gif")
                elif kind == 3:
                    im.convert("L").save(d / f"{i}.png")
                else:
                    im.convert("RGBA").save(d / f"{i}.png")
    if bad:
        good = (root / "train" / "cat" / "0.jpg").read_bytes()
        (root / "train" / "cat" / "broken.jpg").write_bytes(good[: len(good) // 3])
        (root / "train" / "dog" / "notes.txt").write_text("not an image\n")


def memory_mapped(t: torch.Tensor) -> bool:
    """Whether the tensor's memory is a mapping of a decoded-cache file (Linux: /proc/self/maps)."""
    ptr = t.data_ptr()
    for line in open("/proc/self/maps"):
        parts = line.split()
        lo, hi = (int(v, 16) for v in parts[0].split("-"))
        if lo <= ptr < hi and len(parts) > 5 and parts[5].endswith("_x.npy"):
            return True
    return False


def folder_config(root, cache, **kw) -> DatasetConfig:
    return DatasetConfig(name="image_folder", root=str(root), cache=str(cache), image_size=16, **kw)


def test_folder_decoded_once_bad_files_named_classes_kept(tmp_path, caplog, monkeypatch):
    write_folder(tmp_path / "photos")
    monkeypatch.setattr(logging.getLogger("trainables"), "propagate", True)  # the CLI's own set-up turns it off
    with caplog.at_level(logging.WARNING):
        s = load_splits(folder_config(tmp_path / "photos", tmp_path / "cache"))
    warning = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warning) == 1 and "skipped 2 file(s)" in warning[0]
    assert "train/cat/broken.jpg" in warning[0] and "train/dog/notes.txt" in warning[0]
    assert s.classes == CLASSES and s.num_classes == 3 and len(s.skipped) == 2
    assert s.train_x.dtype == torch.uint8 and s.input_shape == (3, 16, 16)
    assert len(s.test_y) == 12 and len(s.train_y) + len(s.val_y) == 36  # 2 bad files skipped, test untouched
    assert torch.bincount(s.val_y).tolist() == [1, 1, 1]  # stratified: 10% of each class
    assert s.decode_s > 0
    again = load_splits(folder_config(tmp_path / "photos", tmp_path / "cache"))
    assert again.decode_s == 0 and torch.equal(again.train_x, s.train_x) and torch.equal(again.val_y, s.val_y)
    assert all(memory_mapped(t) for t in (again.train_x, again.val_x, again.test_x))  # carved splits too: no process copies one
    (tmp_path / "photos" / "train" / "emu" / "0.jpg").unlink()  # the file list changed: decoded anew
    assert load_splits(folder_config(tmp_path / "photos", tmp_path / "cache")).decode_s > 0


def test_folder_images_are_resized_centre_cropped_and_converted(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, 8:32] = 200  # bright a little beyond the centre 20x20 of a 40x20 image; dark outside
    for cls in ("a", "b"):  # two classes: a one-class folder is refused
        d = tmp_path / "one" / "train" / cls
        d.mkdir(parents=True)
        Image.fromarray(a).save(d / "wide.png")
    s = load_splits(DatasetConfig(name="image_folder", root=str(tmp_path / "one"), cache=str(tmp_path / "c"), image_size=10,
                                  channels=1, val_fraction=0.5, test_fraction=0.0))
    assert s.input_shape == (1, 10, 10)
    x = torch.cat([s.train_x, s.val_x]).float()
    assert x.min() > 190  # shorter side 20 -> 10 (40 -> 20), the centre 10x10 kept: only the bright part
    assert s.train_x.shape[0] + s.val_x.shape[0] == 2


def test_class_sets_must_match(tmp_path):
    write_folder(tmp_path / "p", per_class=2, val=True, bad=False)
    (tmp_path / "p" / "val" / "emu").rename(tmp_path / "p" / "val" / "ostrich")
    with pytest.raises(ConfigError, match=r"`dataset.root` val/ lacks class 'emu'"):
        load_splits(folder_config(tmp_path / "p", tmp_path / "c"))
    (tmp_path / "p" / "val" / "ostrich").rename(tmp_path / "p" / "val" / "emu")
    (tmp_path / "p" / "test" / "yak").mkdir()
    with pytest.raises(ConfigError, match=r"`dataset.root` test/ has class 'yak' that train/ lacks"):
        load_splits(folder_config(tmp_path / "p", tmp_path / "c"))


def test_given_val_split_is_used_as_is(tmp_path):
    write_folder(tmp_path / "p", per_class=5, val=True, bad=False)
    s = load_splits(folder_config(tmp_path / "p", tmp_path / "c"))
    assert (len(s.train_y), len(s.val_y), len(s.test_y)) == (15, 9, 12)


@pytest.mark.parametrize("fmt", ["npz", "pt", "safetensors"])
def test_arrays_files(tmp_path, fmt):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (60, 12, 12, 3), generator=g, dtype=torch.uint8)  # NHWC
    y = torch.arange(60) % 4
    path = tmp_path / f"data.{fmt}"
    if fmt == "npz":
        np.savez(path, train_x=x.numpy(), train_y=y.numpy())
    elif fmt == "pt":
        torch.save({"train_x": x, "train_y": y}, path)
    else:
        from safetensors.torch import save_file

        save_file({"train_x": x, "train_y": y}, str(path))
    s = load_splits(DatasetConfig(name="arrays", root=str(path), val_fraction=0.25, test_fraction=0.2))
    assert s.input_shape == (3, 12, 12) and s.num_classes == 4
    assert len(s.test_y) == 12 and len(s.val_y) == 12 and len(s.train_y) == 36
    assert torch.bincount(s.test_y).tolist() == [3, 3, 3, 3]  # stratified
    assert torch.equal(s.train_x[0], x[(s.train_x[0].permute(1, 2, 0) == x).flatten(1).all(1).nonzero()[0, 0]].permute(2, 0, 1))


@pytest.mark.parametrize("content,needle", [
    ({"train_x": np.zeros((4, 8, 8), np.uint8), "train_y": np.zeros(4, np.int64)}, "train_x must be uint8 images (N, C, H, W) or (N, H, W, C), but got torch.uint8, 3-D"),
    ({"train_x": np.zeros((4, 1, 8, 8), np.float32), "train_y": np.zeros(4, np.int64)}, "train_x must be uint8 images"),
    ({"train_x": np.zeros((4, 1, 8, 8), np.uint8), "train_y": np.zeros(3, np.int64)}, "train_y must be 4 integer labels, one per image"),
    ({"train_x": np.zeros((4, 1, 8, 8), np.uint8), "train_y": np.zeros(4, np.float32)}, "train_y must be 4 integer labels"),
    ({"images": np.zeros((4, 1, 8, 8), np.uint8)}, "needs train_x and train_y, but holds ['images']"),
    ({"train_x": np.zeros((4, 1, 8, 8), np.uint8), "train_y": np.zeros(4, np.int64), "test_x": np.zeros((2, 1, 8, 8), np.uint8)},
     "has test_x without test_y"),
    ({"train_x": np.zeros((4, 5, 8, 8), np.uint8), "train_y": np.zeros(4, np.int64)}, "must have 1 or 3 channels"),
])
def test_bad_arrays_are_one_line_errors(tmp_path, content, needle):
    np.savez(tmp_path / "a.npz", **content)
    with pytest.raises(ConfigError, match="`dataset.root`") as e:
        load_splits(DatasetConfig(name="arrays", root=str(tmp_path / "a.npz")))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_host_and_device_placement_give_the_same_batches_and_weights(tmp_path):
    from trainables.config import AugmentConfig
    from trainables.data.batches import epoch_batches
    from trainables.data.placement import device_batches, place
    from trainables.loop import LocalReporter, train_student

    write_folder(tmp_path / "p", bad=False)
    ds = folder_config(tmp_path / "p", tmp_path / "c", augment={"resized_crop": {"scale": [0.5, 1.0]}, "flip": True})
    s = load_splits(ds)
    aug = AugmentConfig(resized_crop={"scale": [0.5, 1.0]}, flip=True)
    got = {}
    for placement in ("device", "host"):
        placed, on_device = place(s, ds.model_copy(update={"placement": placement}), "cpu")
        assert on_device == (placement == "device")
        batches = epoch_batches(len(s.train_y), 8, 0, 1, aug, (16, 16), "cpu")
        got[placement] = [(x.clone(), y.clone(), v.clone()) for _, _, x, y, v in device_batches(placed.train_x, placed.train_y, batches, "cpu", on_device)]
    assert len(got["host"]) == len(s.train_y) // 8
    assert all(torch.equal(a, b) for ga, gb in zip(got["device"], got["host"]) for a, b in zip(ga, gb))
    weights = {}
    for placement in ("device", "host"):
        r = train_student(trial_dict(dataset={**ds.model_dump(), "placement": placement}, student="cnn_tiny", loss={"alpha": 0.0},
                                      epochs=2, batch_size=8, profile=False, robust_samples=8), LocalReporter(None, log_epochs=False))
        weights[placement] = r.model.state_dict()
    assert all(torch.equal(weights["device"][k], weights["host"][k]) for k in weights["device"])


def test_resized_crop_views_are_torchvision_like_and_repeatable():
    from trainables.config import AugmentConfig
    from trainables.data.batches import augment, epoch_views

    aug = AugmentConfig(resized_crop={"scale": [0.25, 0.5], "ratio": [0.5, 2.0]})
    p = epoch_views(512, 3, 2, aug, (32, 48))
    assert torch.equal(p, epoch_views(512, 3, 2, aug, (32, 48)))
    y0, x0, h, w = p[:, 3:].T
    assert (y0 >= 0).all() and (x0 >= 0).all() and (y0 + h <= 32).all() and (x0 + w <= 48).all()
    share = (h * w).float() / (32 * 48)
    assert 0.2 < share.min() and share.max() < 0.55 and 0.4 < (w / h).float().min() and (w / h).float().max() < 2.3
    x = torch.randint(0, 256, (512, 3, 32, 48), dtype=torch.uint8)
    out = augment(x, p, aug)
    assert out.shape == x.shape and out.dtype == torch.float32
    from torchvision.transforms.functional import resized_crop

    for i in range(8):  # each crop is torchvision's resized_crop (bilinear, antialias off), to float rounding, inside
        # the one-pixel rim, where we interpolate with the pixels just outside the box and torchvision clamps to its edge
        ref = resized_crop(x[i].float(), int(y0[i]), int(x0[i]), int(h[i]), int(w[i]), [32, 48], antialias=False)
        assert torch.allclose(out[i, :, 1:-1, 1:-1], ref[:, 1:-1, 1:-1], atol=1e-3), (out[i] - ref)[:, 1:-1, 1:-1].abs().max()
    whole = AugmentConfig(resized_crop={"scale": [1.0, 1.0], "ratio": [1.5, 1.5]})
    assert torch.allclose(augment(x[:4], epoch_views(4, 0, 0, whole, (32, 48)), whole), x[:4].float(), atol=1e-3)
    with pytest.raises(ValueError, match="exclude each other"):
        AugmentConfig(crop_pad=2, resized_crop={})


def test_exif_orientation_is_applied(tmp_path):
    """A camera JPEG stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to view)."""
    a = np.zeros((10, 20, 3), np.uint8)
    a[:, :10] = 250  # stored: left half bright; as viewed (rotated clockwise): top half bright
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6
    for cls in ("a", "b"):  # two classes: a one-class folder is refused
        d = tmp_path / "cam" / "train" / cls
        d.mkdir(parents=True)
        im.save(d / "0.jpg", exif=exif, quality=95)
    s = load_splits(DatasetConfig(name="image_folder", root=str(tmp_path / "cam"), cache=str(tmp_path / "c"), image_size=10,
                                  val_fraction=0.5, test_fraction=0.0))
    x = s.train_x[0].float().mean(0)
    assert x[:4].mean() > 200 and x[6:].mean() < 50  # top bright, bottom dark
    assert abs(x[:, :4].mean() - x[:, 6:].mean()) < 20  # not left/right
