"""Unlabelled transfer data (dataset.unlabeled): the mixed batches, CE blind to unlabelled
examples and the distillation term seeing them, the teacher cache covering them, bad folders."""
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from trainables.config import AugmentConfig, DatasetConfig, TrialConfig
from trainables.data import UNLABELED, load_splits
from trainables.data.batches import BatchLayout, epoch_batches
from trainables.losses import build_loss, kd_kl
from trainables.loop import LocalReporter, train_student
from trainables.models.teacher import load_teacher
from trainables.registry import ConfigError
from trainables.tasks import task_for
from trainables.teacher_cache import TeacherCache, build_teacher_cache
from tests.conftest import trial_dict
from tests.test_audio import RATE, tone, write_clips, write_wav
from tests.test_text import BAD, FILL, GOOD, make_checkpoint, write_texts

AUG = AugmentConfig(crop_pad=1, flip=True)


def test_batches_mix_at_the_ratio_labelled_first_and_ranks_share_both_kinds():
    n, n_u = 40, 160
    for ratio, k_u in ((None, 13), (0.25, 4)):  # None: the unlabelled share of the data (0.8 of 16 -> 13)
        layout = BatchLayout.of(n, 16, n_u, ratio)
        assert (layout.labeled, layout.unlabeled, layout.steps) == (16 - k_u, k_u, (n + n_u) // 16)
        batches = [(idx.clone(), p.clone()) for _, idx, p in epoch_batches(n, 16, 0, 3, AUG, (8, 8), n_unlabeled=n_u, ratio=ratio)]
        assert len(batches) == layout.steps
        for idx, params in batches:
            assert len(idx) == len(params) == 16
            assert (idx[: 16 - k_u] < n).all() and (idx[16 - k_u :] >= n).all() and (idx < n + n_u).all()
        seen = torch.cat([idx for idx, _ in batches])
        drawn = set(seen[seen < n].tolist())  # without repeats until every labelled example is drawn, then again
        assert len(drawn) == min(n, layout.steps * layout.labeled)
    layout = BatchLayout.of(n, 16, n_u, 0.25)
    whole = list(epoch_batches(n, 16, 0, 3, AUG, (8, 8), n_unlabeled=n_u, ratio=0.25))
    ranks = [list(epoch_batches(n, 16, 0, 3, AUG, (8, 8), rank=r, world_size=2, n_unlabeled=n_u, ratio=0.25)) for r in (0, 1)]
    for (_, idx, p), (_, i0, p0), (_, i1, p1) in zip(whole, *ranks):
        assert torch.equal(torch.cat([i0, i1]).sort().values, idx.sort().values)
        assert (i0 < n).sum() == (i1 < n).sum() == layout.labeled // 2  # each rank: the same number of labelled examples
        assert torch.equal(torch.cat([p[layout.rows(r, 2)] for r in (0, 1)]), torch.cat([p0, p1]))
    with pytest.raises(ConfigError, match="dataset.unlabeled.ratio"):
        BatchLayout.of(n, 16, n_u, 0.3).check_world(2)  # 5 unlabelled of 16 do not halve


def test_labels_kept_drops_the_others_labels_stratified_and_leaves_val_and_test_alone():
    plain = load_splits(DatasetConfig(name="digits", val_fraction=0.2))
    s = load_splits(DatasetConfig(name="digits", val_fraction=0.2, unlabeled={"labels_kept": 0.1}))
    assert len(s.train_y) == len(plain.train_y) and torch.equal(s.val_y, plain.val_y) and torch.equal(s.test_y, plain.test_y)
    assert s.n_labeled == pytest.approx(0.1 * len(plain.train_y), abs=10) and s.n_unlabeled == len(plain.train_y) - s.n_labeled
    assert (s.train_y[s.n_labeled :] == UNLABELED).all() and (s.train_y[: s.n_labeled] >= 0).all()
    kept, total = torch.bincount(s.train_y[: s.n_labeled]), torch.bincount(plain.train_y)
    assert ((kept - 0.1 * total).abs() <= 1).all()  # every class keeps its share
    assert s.labeled().n_unlabeled == 0 and len(s.labeled().train_y) == s.n_labeled


def _pngs(folder, n, size=(10, 12), mode="L"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        shape = size[::-1] + ((3,) if mode == "RGB" else ())
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(folder / f"{i}.png")


def test_an_unlabelled_folder_is_decoded_once_to_the_train_shape(tmp_path):
    _pngs(tmp_path / "unl", 7, mode="RGB")
    (tmp_path / "unl" / "notes.txt").write_text("not an image")
    ds = DatasetConfig(name="digits", val_fraction=0.2, cache=str(tmp_path / "cache"), unlabeled={"root": str(tmp_path / "unl")})
    s = task_for("digits").splits(ds)
    assert s.n_unlabeled == 7 and s.train_x.shape[1:] == (1, 8, 8) and (s.train_y[-7:] == UNLABELED).all()
    assert len(list((tmp_path / "cache").rglob("*-unlabeled-*.npy"))) == 1
    again = task_for("digits").splits(ds)  # memory-mapped from the cache
    assert torch.equal(again.train_x, s.train_x)


@pytest.mark.parametrize("layout, match", [
    ("classes", "has sub-folders"),
    ("empty", "holds no files"),
    ("text", "no decodable images"),
    ("missing", "does not exist: nothing at"),
])
def test_bad_unlabelled_folders_are_one_line_errors(tmp_path, layout, match):
    root = tmp_path / "unl"
    if layout == "classes":
        _pngs(root / "cat", 2)
        _pngs(root / "dog", 2)
    elif layout == "empty":
        root.mkdir()
    elif layout == "text":
        root.mkdir()
        (root / "a.txt").write_text("hello")
    ds = DatasetConfig(name="digits", cache=str(tmp_path / "cache"), unlabeled={"root": str(root)})
    with pytest.raises(ConfigError, match=match) as e:
        task_for("digits").splits(ds)
    assert "\n" not in str(e.value) and "dataset.unlabeled.root" in str(e.value)
    assert not list((tmp_path / "cache").rglob("*.npy"))


def test_ce_never_sees_an_unlabelled_example_and_the_distillation_term_does():
    torch.manual_seed(0)
    s = torch.randn(8, 5, requires_grad=True)
    t = torch.randn(8, 5)
    y = torch.tensor([0, 3, 1, 4, UNLABELED, UNLABELED, UNLABELED, UNLABELED])
    for name in ("kd", "dkd", "dist"):
        loss_fn = build_loss(name, {"alpha": 0.5, "temperature": 2.0})
        total, parts = loss_fn(s, t, y)
        assert torch.allclose(parts["ce"], F.cross_entropy(s[:4], y[:4]))  # labelled rows alone
        ce_grad, = torch.autograd.grad(0.5 * F.cross_entropy(s, y), s)
        assert (ce_grad[4:] == 0).all() and (ce_grad[:4] != 0).any()
        grad, = torch.autograd.grad(total, s)
        assert (grad[4:] != 0).any()  # the distillation term reaches the unlabelled rows
        assert torch.isfinite(total)
    kd = build_loss("kd", {"alpha": 0.5, "temperature": 2.0})
    total, _ = kd(s, t, y)
    assert torch.allclose(total, 0.5 * kd_kl(s, t, 2.0) + 0.5 * F.cross_entropy(s[:4], y[:4]))
    dkd = build_loss("dkd", {"alpha": 1.0, "temperature": 2.0, "warmup_epochs": 0})  # unlabelled rows: the teacher's class
    pseudo = torch.where(y >= 0, y, t.argmax(1))
    assert torch.allclose(dkd(s, t, y)[0], dkd(s, t, pseudo)[0])


def _trial(teacher, **kw):
    base = {"dataset": {"name": "digits", "val_fraction": 0.2, "augment": {"crop_pad": 1, "flip": True}, "unlabeled": {"labels_kept": 0.25, "ratio": 0.5}},
            "student": "mlp_32", "epochs": 1, "batch_size": 32, "teacher_path": str(teacher), "loss": {"alpha": 0.7}, "profile": False,
            "robust_samples": 0}
    base.update(kw)
    return TrialConfig.model_validate(trial_dict(**base))


def test_kd_trials_train_on_mixed_batches_and_controls_on_the_labelled_alone(digits_teacher, monkeypatch):
    import trainables.loop as loop

    seen: dict[str, list] = {}
    made = loop.build_loss

    def spy(name, params, *a, **k):
        fn = made(name, params, *a, **k)
        calls = seen.setdefault(str(params["alpha"]), [])
        forward = fn.forward
        fn.forward = lambda s, t, y, *r: calls.append(y.clone()) or forward(s, t, y, *r)
        return fn

    monkeypatch.setattr(loop, "build_loss", spy)
    kd = train_student(_trial(digits_teacher), LocalReporter(None, log_epochs=False))
    control = train_student(_trial(digits_teacher, loss={"alpha": 0.0}), LocalReporter(None, log_epochs=False))
    alone = _trial(digits_teacher, loss={"alpha": 0.5})  # ratio 0: KD on the labelled alone, the same labels kept
    alone = alone.model_copy(update={"dataset": alone.dataset.model_copy(update={"unlabeled": alone.dataset.unlabeled.model_copy(update={"ratio": 0.0})})})
    train_student(alone, LocalReporter(None, log_epochs=False))
    s = load_splits(_trial(digits_teacher).dataset)
    assert all(((y == UNLABELED).sum() == 16) and (y[:16] >= 0).all() for y in seen["0.7"])
    assert len(seen["0.7"]) == len(s.train_y) // 32
    assert all((y >= 0).all() for y in seen["0.0"]) and len(seen["0.0"]) == s.n_labeled // 32
    assert all((y >= 0).all() for y in seen["0.5"]) and len(seen["0.5"]) == s.n_labeled // 32
    assert kd.metrics["train_kd"] > 0 and control.metrics["train_kd"] == 0


def test_the_cache_holds_the_unlabelled_views_too(tmp_path, digits_teacher):
    from trainables.data.batches import augment, train_batches
    from trainables.data.placement import device_batches
    from trainables.data.normalize import normalizer
    from trainables.teacher_cache import Builder

    c = _trial(digits_teacher, epochs=2)
    teacher, card = load_teacher(digits_teacher)
    path, forwards = build_teacher_cache(c, teacher, card, tmp_path)
    s = load_splits(c.dataset)
    assert forwards == len(s.val_y)
    cache = TeacherCache.open(path, c, card)
    build = Builder(c, teacher, card, s, True, "cpu")
    cache.builder = build
    norm = normalizer(s.mean, s.std, "cpu")
    for rank in (0, 1):  # each DDP rank reads its own share of the global batch
        for _, idx, x, _, view in device_batches(s.train_x, s.train_y, train_batches(s, c, 1, "cpu", rank, 2), "cpu", True):
            with torch.no_grad():
                expected = teacher(norm(augment(x, view, AUG)))
            assert torch.allclose(cache.batch(1, idx, "cpu"), expected, rtol=1e-3, atol=2e-3)
            assert (idx >= s.n_labeled).any()
    assert build.forwards == len(s.train_y)  # every example's view, labelled and unlabelled, once
    cached = train_student(c.model_copy(update={"teacher_cache": str(path)}), LocalReporter(None, log_epochs=False))
    assert cached.metrics["teacher_targets"] == "cache" and cached.metrics["teacher_forward_images"] == len(s.train_y)  # built epoch 0


def test_a_labelled_folder_as_unlabelled_data_fails_the_cli_in_one_line_with_nothing_written(tmp_path, capsys, monkeypatch):
    import os

    from orchestrator.cli import main

    _pngs(tmp_path / "data" / "cat", 2)
    _pngs(tmp_path / "data" / "dog", 2)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["run", "--set", f"dataset.unlabeled.root={tmp_path / 'data'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "`dataset.unlabeled.root` has sub-folders ['cat', 'dog']" in err, err
    assert os.listdir(work) == []


def test_a_ratio_that_does_not_divide_over_ddp_workers_fails_the_plan(tmp_path, capsys, monkeypatch):
    from orchestrator.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["run", "--dry-run", "--set", "dataset.unlabeled.labels_kept=0.5", "--set", "dataset.unlabeled.ratio=0.3",
            "--set", "resources.num_workers=2", "--set", "train.batch_size=64"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "`dataset.unlabeled.ratio` splits each batch of 64 into 45 labelled and 19 unlabelled" in err, err
    assert main(args[:-4] + ["--set", "dataset.unlabeled.ratio=0.25"]) == 0  # 48 + 16: halves
    assert re.search(r"data: \d+ train \+ \d+ unlabelled \(the distillation term only", capsys.readouterr().out)


# ---------------------------------------------------------------------------------------------
# Unlabelled data of the other tasks: read as each task reads its labelled examples


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("unl-text")
    return make_checkpoint(root / "bert", layers=1), write_texts(root / "reviews.csv", n=120)


def _ids(tokenizer_dir, texts, max_length):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    return torch.tensor(tok(texts, truncation=True, max_length=max_length, padding="max_length")["input_ids"], dtype=torch.int32)


def test_unlabelled_text_is_tokenized_as_the_labelled_text_in_each_form_and_with_each_models_tokenizer(text_data, tmp_path):
    """A .txt file (a text per line), a .jsonl table's text column (dataset.kwargs.text_column, as
    for the labelled table) and a folder of .txt files (a text each) give the same examples, tokenized with the dataset's tokenizer and max_length, after
    the labelled ones; a student with its own tokenizer reads the same texts in its own ids."""
    import json

    ckpt, table = text_data
    texts = ["the plot was brilliant", "quite dull and very tedious film", "a charming story", "boring"]
    (tmp_path / "more.txt").write_text("\n".join(texts[:2]) + "\n\n" + "\n".join(texts[2:]) + "\n")
    (tmp_path / "more.jsonl").write_text("".join(json.dumps({"text": t, "stars": 3}) + "\n" for t in texts))
    for i, t in enumerate(texts):
        (tmp_path / "more" / f"{i}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "more" / f"{i}.txt").write_text(t + "\n")
    plain = task_for("text").splits(DatasetConfig(name="text", root=str(table), tokenizer=str(ckpt), max_length=12))
    expected = _ids(ckpt, texts, 12)
    for root, kwargs in ((tmp_path / "more.txt", {}), (tmp_path / "more.jsonl", {}), (tmp_path / "more", {})):
        ds = DatasetConfig(name="text", root=str(table), tokenizer=str(ckpt), max_length=12, kwargs=kwargs,
                           cache=str(tmp_path / "cache"), unlabeled={"root": str(root), "ratio": 0.25})
        s = task_for("text").splits(ds)
        assert s.n_unlabeled == 4 and torch.equal(s.train_x[-4:], expected), root
        assert torch.equal(s.train_x[:-4], plain.train_x) and (s.train_y[-4:] == UNLABELED).all() and torch.equal(s.val_x, plain.val_x)
        assert torch.equal(task_for("text").splits(ds).train_x, s.train_x)  # again: from the cache
    assert len(list((tmp_path / "cache").rglob("*-unlabeled-*.npy"))) == 3
    words = sorted(set(GOOD + BAD + FILL), reverse=True)  # another numbering of the same words
    own = make_checkpoint(tmp_path / "own", layers=1, words=words)
    mine = task_for("text").splits(ds.model_copy(update={"tokenizer": str(own)}))
    assert torch.equal(mine.train_x[-4:], _ids(own, texts, 12)) and not torch.equal(mine.train_x[-4:], expected)


@pytest.mark.parametrize("layout, match", [
    ("classes", "has sub-folders"),
    ("empty", "holds no text"),
    ("missing", "does not exist: nothing at"),
    ("image", "must be a .txt file"),
    ("column", "text_column"),
])
def test_bad_unlabelled_text_is_a_one_line_error_and_nothing_is_cached(text_data, tmp_path, layout, match):
    ckpt, table = text_data
    root = tmp_path / "unl"
    if layout == "classes":
        for c in ("pos", "neg"):
            (root / c).mkdir(parents=True)
            (root / c / "a.txt").write_text("great film")
    elif layout == "empty":
        root.mkdir()
    elif layout == "image":
        root = tmp_path / "photo.png"
        root.write_bytes(b"\x89PNG")
    elif layout == "column":
        root = tmp_path / "more.csv"
        root.write_text("review\ngreat\n")
    ds = DatasetConfig(name="text", root=str(table), tokenizer=str(ckpt), max_length=12, cache=str(tmp_path / "cache"),
                       unlabeled={"root": str(root)})
    with pytest.raises(ConfigError, match=match) as e:
        task_for("text").splits(ds)
    assert "\n" not in str(e.value) and "dataset.unlabeled.root" in str(e.value) or "text_column" in str(e.value)
    assert not list((tmp_path / "cache").rglob("*unlabeled*"))


def test_unlabelled_clips_are_decoded_as_the_labelled_ones_and_a_bad_file_is_named(tmp_path, caplog, capsys):
    """Clips at another rate and in stereo are resampled and mixed down to the labelled clips' form;
    a text file named .wav and an empty clip are skipped and named in one warning."""
    from trainables.data.audio import clip_decoding

    labelled = write_clips(tmp_path / "words", per_class=6, seconds=0.25)
    rng = np.random.default_rng(1)
    unl = tmp_path / "unl"
    write_wav(unl / "a.wav", tone(700.0, 0.3, rng))
    write_wav(unl / "b.wav", tone(1300.0, 0.2, rng, rate=8000), rate=8000, channels=2)
    write_wav(unl / "c.wav", tone(300.0, 0.25, rng), width=3)
    write_wav(unl / "empty.wav", np.zeros(0))
    (unl / "notes.wav").write_text("not a clip")
    ds = DatasetConfig(name="audio", root=str(labelled), cache=str(tmp_path / "cache"), kwargs={"sample_rate": RATE, "clip_seconds": 0.25},
                       unlabeled={"root": str(unl)})
    with caplog.at_level("WARNING"):
        s = task_for("audio").splits(ds)
    assert s.n_unlabeled == 3 and s.train_x.dtype == torch.float32 and s.train_x.shape[1:] == (RATE // 4,)
    decode = clip_decoding(RATE, 0.25).decode
    for i, name in enumerate(("a.wav", "b.wav", "c.wav")):
        assert torch.equal(s.train_x[-3 + i], torch.from_numpy(decode(str(unl / name))))
    # the warning reaches the log: caplog's, or the console's handler where a test ran the CLI in this process
    (warning,) = [line for line in caplog.text.splitlines() + capsys.readouterr().out.splitlines() if "skipped 2 file(s)" in line]
    assert "empty.wav" in warning and "notes.wav" in warning and "\n" not in warning


def test_a_task_that_reads_no_unlabelled_root_says_so_and_loading_around_the_task_is_refused(tmp_path):
    from trainables.tasks import Task

    class Bare(Task):
        name = "bare_task"

    with pytest.raises(ConfigError, match="`dataset.unlabeled.root` is not read for bare task: use labels_kept"):
        Bare().read_unlabeled("x", torch.zeros(1), {})
    with pytest.raises(TypeError, match="Task.splits"):
        load_splits(DatasetConfig(name="digits", unlabeled={"root": str(tmp_path)}))
