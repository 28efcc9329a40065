"""Text: data tokenized once, Hugging Face teachers and students, the bad inputs, one sweep end to end.

Every model and data set here is made by the test: a WordPiece vocabulary of 40 words, a 2-layer
BERT (hidden 32) saved with save_pretrained, and a two-class "review" set whose class a single
word decides."""
from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from orchestrator.cli import main  # noqa: E402
from tests.conftest import count_rows, mlflow_store, sqlite_rows  # noqa: E402

GOOD = "great fun lovely superb delightful moving brilliant charming".split()
BAD = "awful dull boring terrible clumsy tedious bland painful".split()
FILL = "the a movie film plot actor story was is and but very quite".split()


def write_texts(path: Path, n: int = 400, seed: int = 0, sep: str = ",", labels: tuple[str, str] = ("pos", "neg")) -> Path:
    r = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=sep)
        w.writerow(["text", "label"])
        for _ in range(n):
            y = r.randint(0, 1)
            words = [r.choice(FILL) for _ in range(r.randint(3, 10))] + [r.choice(GOOD if y else BAD)]
            r.shuffle(words)
            w.writerow([" ".join(words), labels[0] if y else labels[1]])
    return path


def make_checkpoint(out: Path, layers: int = 2, hidden: int = 32, positions: int = 64, vocab_extra: int = 0, intermediate: int = 64,
                    words: list[str] | None = None, heads: int = 2) -> Path:
    """A tiny BERT sequence classifier and its tokenizer (`words` in this order), saved as a Hugging Face checkpoint folder."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + (words or sorted(set(GOOD + BAD + FILL)))
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(str(out / "vocab.txt"), do_lower_case=True).save_pretrained(str(out))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab) + vocab_extra, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=intermediate, max_position_embeddings=positions, num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def text_case(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("text")
    return make_checkpoint(root / "bert-tiny"), write_texts(root / "reviews.csv")


# ---------------------------------------------------------------------------------------------
# Data


def test_tokenized_once_and_every_format_reads_the_same(text_case, tmp_path):
    import datasets

    from trainables.data import load_dataset

    ckpt, table = text_case
    kw = dict(cache=str(tmp_path / "cache"), tokenizer=str(ckpt), max_length=16)
    first = load_dataset("text", str(table), **kw)
    again = load_dataset("text", str(table), **kw)
    assert first.decode_s > 0 and again.decode_s == 0.0  # the second load memory-maps the cached ids
    assert first.tokenizer and first.pad_id is not None and first.input_shape == (16,) and first.train_x.dtype == torch.int32
    assert first.classes == ("neg", "pos") and first.mean == ()
    assert torch.equal(first.train_x, again.train_x) and torch.equal(first.test_y, again.test_y)
    n = len(first.train_y) + len(first.val_y) + len(first.test_y)
    assert n == 400

    # The val and test strings ride along, in the splits' order (the text corruption suite perturbs them).
    retok = __import__("transformers").AutoTokenizer.from_pretrained(str(ckpt))(
        list(first.test_text), truncation=True, max_length=16, padding="max_length")["input_ids"]
    assert len(first.val_text) == len(first.val_y) and torch.equal(torch.tensor(retok, dtype=torch.int32), first.test_x)

    rows = list(csv.DictReader(open(table)))
    tok = __import__("transformers").AutoTokenizer.from_pretrained(str(ckpt))
    assert first.train_x[0][0].item() == tok.cls_token_id and (first.train_x == tok.pad_token_id).any()

    # The same texts as TSV, JSONL, class folders of .txt files and a save_to_disk folder: the same ids.
    tsv = write_texts(tmp_path / "reviews.tsv", sep="\t")
    jsonl = tmp_path / "reviews.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    folders = tmp_path / "folders"
    for i, r in enumerate(rows):
        (folders / r["label"]).mkdir(parents=True, exist_ok=True)
        (folders / r["label"] / f"{i:04d}.txt").write_text(r["text"])
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": [r["text"] for r in rows], "label": [r["label"] for r in rows]}).save_to_disk(str(saved))

    def all_ids(s):
        return sorted(map(tuple, torch.cat([s.train_x, s.val_x, s.test_x]).tolist()))

    for source in (tsv, jsonl, saved, folders):
        other = load_dataset("text", str(source), **kw)
        assert other.classes == ("neg", "pos"), source
        assert all_ids(other) == all_ids(first), source


def test_given_splits_and_labels_not_in_train(text_case, tmp_path):
    from trainables.data import load_dataset
    from trainables.registry import ConfigError

    ckpt, _ = text_case
    write_texts(tmp_path / "train.csv", 100, seed=1)
    write_texts(tmp_path / "test.csv", 30, seed=2)
    s = load_dataset("text", str(tmp_path), cache=str(tmp_path / "c"), tokenizer=str(ckpt), max_length=16)
    assert len(s.test_y) == 30 and len(s.train_y) + len(s.val_y) == 100
    with open(tmp_path / "test.csv", "a") as f:
        f.write("a strange review,meh\n")
    with pytest.raises(ConfigError, match="test split has label 'meh' that train lacks"):
        load_dataset("text", str(tmp_path), cache=str(tmp_path / "c"), tokenizer=str(ckpt), max_length=16)


def test_text_corruptions_are_seeded_and_grow_with_severity():
    from trainables.eval.text_corruptions import TEXT_CORRUPTIONS, corrupt_texts

    texts = [" ".join(f"word{i}x{j}" for j in range(20)) for i in range(200)]

    def touched(name: str, severity: int) -> int:
        """Words changed: moved (swap), or gone from / new in the text (drop, typo)."""
        out = corrupt_texts(texts, name, severity, seed=0)
        if name == "word_swap":
            return sum(a != b for t, c in zip(texts, out) for a, b in zip(t.split(), c.split()))
        return sum(len(set(t.split()) ^ set(c.split())) for t, c in zip(texts, out))

    for name in TEXT_CORRUPTIONS.names():
        assert corrupt_texts(texts, name, 2, seed=0) == corrupt_texts(texts, name, 2, seed=0)
        assert corrupt_texts(texts, name, 2, seed=0) != corrupt_texts(texts, name, 2, seed=1)
        assert touched(name, 1) < touched(name, 2) < touched(name, 3), name
    dropped = corrupt_texts(["one two"] * 500, "word_drop", 3, 0)
    assert all(d for d in dropped) and {len(d.split()) for d in dropped} == {1, 2}
    typo = corrupt_texts(["abcdef"] * 300, "char_typo", 1, 0)
    assert 0.05 < sum(t != "abcdef" for t in typo) / 300 < 0.2  # about 10% of the words at severity 1


# ---------------------------------------------------------------------------------------------
# Models


def test_student_from_family_and_teacher_layers(text_case):
    from trainables.models import create_model
    from trainables.models.hf import init_from_teacher, load_checkpoint

    ckpt, _ = text_case
    teacher = create_model("hf", 2, (16,), config=str(ckpt))
    assert load_checkpoint(teacher, ckpt, "teacher.weights", new_head_ok=True) is False  # a 2-class head: loaded as is
    deep = make_checkpoint(ckpt.parent / "bert-4", layers=4)
    t4 = create_model("hf", 2, (16,), config=str(deep))
    load_checkpoint(t4, deep, "teacher.weights", new_head_ok=True)
    student = create_model("hf.bert-L2-H32-A2-I64", 2, (16,), tokenizer=str(ckpt))
    assert student.config.num_hidden_layers == 2 and student.config.vocab_size == teacher.config.vocab_size == 34
    assert init_from_teacher(student, t4) == [0, 2]  # every other layer
    s, t = student.net.state_dict(), t4.net.state_dict()
    for j, i in ((0, 0), (1, 2)):
        key = "bert.encoder.layer.{}.attention.self.query.weight"
        assert torch.equal(s[key.format(j)], t[key.format(i)])
    assert not torch.equal(s["bert.encoder.layer.1.output.dense.weight"], t["bert.encoder.layer.1.output.dense.weight"])
    assert torch.equal(s["bert.embeddings.word_embeddings.weight"], t["bert.embeddings.word_embeddings.weight"])
    # The mask comes from the pad id, and padding every row has is cut: the transformer's own output with the full padding.
    x = torch.tensor([[2, 20, 21, 3, 0, 0, 0, 0], [2, 22, 3, 0, 0, 0, 0, 0]])
    full = student.eval().net(input_ids=x, attention_mask=(x != 0).long()).logits
    assert student._trimmed(x).shape == (2, 4) and torch.allclose(student(x), full, atol=1e-5)


def test_batches_group_similar_lengths():
    from trainables.config import AugmentConfig
    from trainables.data.batches import epoch_batches, epoch_permutation

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 48, (1000,), generator=g)
    none = AugmentConfig()

    def batches(epoch, lengths=lengths):
        return [idx for _, idx, _ in epoch_batches(1000, 32, 0, epoch, none, (1, 1), lengths=lengths)]

    first = batches(1)
    assert len(first) == 1000 // 32 and all(torch.equal(a, b) for a, b in zip(first, batches(1)))
    assert not all(torch.equal(a, b) for a, b in zip(first, batches(2)))
    used = torch.cat(first)  # each text once an epoch, but the permutation's last 1000 % 32 (as without grouping)
    assert sorted(used.tolist() + epoch_permutation(1000, 0, 1)[len(used):].tolist()) == list(range(1000))
    spread = torch.tensor([float(lengths[b].max() - lengths[b].min()) for b in first]).mean()
    plain = torch.tensor([float(lengths[b].max() - lengths[b].min()) for b in batches(1, None)]).mean()
    assert spread < 0.25 * plain, (spread, plain)  # padding to a batch's longest text is mostly gone


def test_a_student_with_its_own_tokenizer_reads_its_own_ids(text_case, tmp_path, monkeypatch):
    """A student checkpoint whose tokenizer numbers the words the other way round (and has 5 more):
    it trains and is tested on its own ids while the teacher's cached logits come from the
    teacher's ids, example by example. Pure distillation (alpha=1): had either side read the other's
    ids, the student would learn nothing the teacher knows."""
    from orchestrator.plan.config import load_config
    from orchestrator.plan.prepare import check_data, ensure_teacher
    from trainables.data import load_splits
    from trainables.eval.inference import predict
    from trainables.loop import train_student
    from trainables.models.teacher import load_teacher
    from trainables.teacher_cache import build_teacher_cache

    ckpt, table = text_case
    monkeypatch.chdir(tmp_path)
    words = sorted(set(GOOD + BAD + FILL), reverse=True) + [f"extra{i}" for i in range(5)]
    own = make_checkpoint(tmp_path / "student-ckpt", layers=1, hidden=32, positions=512, intermediate=64, words=words)
    student = "hf.bert-L1-H32-A2-I64"
    cfg = load_config(str(text_yaml(tmp_path, ckpt, table, students=[student], student_weights={student: str(own)}, search={},
                                    **{"loss.alpha": 1.0, "train.epochs": 6})), [])
    assert cfg.student_kwargs(student) == {"tokenizer": str(own)}
    teacher_dir = ensure_teacher(cfg, check_data(cfg))
    trial = cfg.trial(student, {"seed": 0}, teacher_path=teacher_dir)
    teacher, card = load_teacher(teacher_dir)
    path, _ = build_teacher_cache(trial, teacher, card, tmp_path / "cache")
    result = train_student(trial.model_copy(update={"teacher_cache": str(path)}))
    assert result.metrics["teacher_targets"] == "cache" and result.metrics["teacher_forward_images"] == 0

    theirs, mine = load_splits(cfg.dataset), load_splits(cfg.student_dataset(student))
    assert torch.equal(theirs.val_y, mine.val_y) and not torch.equal(theirs.val_x, mine.val_x)
    def acc(model, x):
        return (predict(model, x, lambda v: v, 256, __import__("contextlib").nullcontext, False).argmax(1) == mine.val_y).float().mean()

    assert result.metrics["val_acc"] > 0.9 and acc(result.model, mine.val_x) > 0.9  # (0.56 when it trained on the teacher's ids)
    control = train_student(cfg.trial(student, {"seed": 0, "loss.alpha": 0.0}, teacher_path=teacher_dir))  # its alpha=0 control
    assert acc(control.model, mine.val_x) > 0.9  # trained on its own ids too (0.72 when it took the teacher's)


def test_a_teacher_from_a_config_with_a_wordpiece_tokenizer_trained_on_the_data(text_case, tmp_path, monkeypatch):
    """No checkpoint, no tokenizer: a WordPiece vocabulary learnt from the train split (once), a
    BERT teacher trained from scratch on it, and a student distilled from it."""
    import yaml

    from orchestrator.plan.config import load_config
    from orchestrator.plan.prepare import check_data, ensure_teacher
    from trainables.loop import train_student
    from trainables.models.teacher import load_teacher

    _, table = text_case
    monkeypatch.chdir(tmp_path)
    path = text_yaml(tmp_path, Path("unused"), table, students=["hf.bert-L1-H16-A2"], student_weights={}, search={})
    raw = yaml.safe_load(path.read_text())
    raw["dataset"]["tokenizer"] = {"vocab_size": 250}
    raw["teacher"] = {"arch": "hf.bert-L2-H32-A2-I64", "epochs": 8, "batch_size": 32,
                      "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.0}, "schedule": {"name": "constant"}}
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(str(path), [])
    folder = cfg.dataset.resolved().tokenizer
    assert Path(folder, "vocab.txt").is_file() and cfg.dataset.resolved().tokenizer == folder  # trained once, then found
    tok = __import__("transformers").AutoTokenizer.from_pretrained(folder)
    assert len(tok) <= 250 and tok.tokenize("superb") == ["superb"]  # the data's words are in it
    teacher_dir = ensure_teacher(cfg, check_data(cfg))
    teacher, card = load_teacher(teacher_dir)
    assert card.arch == "hf.bert-L2-H32-A2-I64" and card.arch_kwargs == {"tokenizer": folder} and card.val_acc > 0.9
    result = train_student(cfg.trial("hf.bert-L1-H16-A2", {"seed": 0}, teacher_path=teacher_dir))
    assert result.metrics["val_acc"] > 0.9
    saved = load_config(str(path), [f"teacher.path={teacher_dir}"])  # the saved teacher, named: its card describes its config
    assert check_data(saved).input_shape == (16,)


# ---------------------------------------------------------------------------------------------
# Bad inputs: one line, exit 2, nothing written, before Ray starts


def text_yaml(path: Path, ckpt: Path, data: Path, name: str = "text", **over) -> Path:
    import yaml

    from orchestrator.plan.config import set_dotted

    cfg = {
        "name": name, "storage": str(path / "runs"),
        "dataset": {"name": "text", "root": str(data), "max_length": 16, "val_fraction": 0.15},
        "teacher": {"weights": str(ckpt), "finetune": {"epochs": 6, "lr": 3e-3}, "batch_size": 32,
                    "optimizer": {"name": "adamw", "weight_decay": 0.0}},
        "students": ["hf.bert-L1-H32-A2-I64", "hf.bert-L1-H32-A2-I32"],
        "student_weights": {"hf.bert-L1-H32-A2-I64": "teacher"},
        "loss": {"name": "kd", "temperature": 2.0, "alpha": 0.5},
        "train": {"epochs": 5, "batch_size": 32, "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.0},
                  "schedule": {"name": "constant"}, "eval_batch_size": 256},
        "search": {"loss.name": {"type": "categorical", "choices": ["kd", "cosine", "tinybert"]},
                   "alpha": {"type": "float", "low": 0.3, "high": 0.9}},
        "budget": {"num_samples": 5, "max_concurrent": 2, "grace_period": 1, "reduction_factor": 2, "confirm": {"top": 0}},
        "tracking": {"uri": mlflow_store(path / "mlruns")},
    }
    for k, v in over.items():
        set_dotted(cfg, k, v)
    out = path / f"{name}.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


def _bad_cases(root: Path, ckpt: Path, table: Path) -> list[tuple[dict, str]]:
    (root / "empty.csv").write_text("text,label\n")
    (root / "nolabel").mkdir()
    write_texts(root / "nolabel" / "train.csv", 50)
    with open(root / "nolabel" / "val.csv", "w") as f:
        f.write("text,label\nthe plot,meh\n")
    bare = root / "noconfig"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes(b"")
    pickled = make_checkpoint(root / "pickled")
    from safetensors.torch import load_file

    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    big_vocab = make_checkpoint(root / "other-vocab", vocab_extra=-10)  # a model with fewer embeddings than the tokenizer's tokens
    own = make_checkpoint(root / "own-tokenizer", layers=1, positions=512, words=sorted(set(GOOD + BAD + FILL), reverse=True))
    return [
        ({"dataset.kwargs": {"text_column": "review"}}, "`dataset.kwargs.text_column` 'review' is not a column"),
        ({"dataset.root": str(root / "nolabel")}, "val split has label 'meh' that train lacks"),
        ({"dataset.root": str(root / "empty.csv")}, "has no examples"),
        ({"teacher.weights": str(bare)}, "folder without config.json"),
        ({"teacher.weights": "bert-base-uncased"}, "hub name"),
        ({"dataset.tokenizer": "bert-base-uncased"}, "`dataset.tokenizer` 'bert-base-uncased' is not a folder here"),
        ({"teacher.weights": str(big_vocab), "dataset.tokenizer": str(ckpt)}, "`teacher.weights` has 24 token embeddings but the tokenizer (dataset.tokenizer) has 34"),
        ({"dataset.max_length": 100}, "`dataset.max_length` 100 is more than teacher.weights's 64 positions"),
        ({"teacher.weights": str(pickled)}, "pickle weights only"),
        ({"students": ["cnn_tiny"], "student_weights": {}}, "`students` cnn_tiny does not take text"),
        ({"teacher": [{"weights": str(ckpt), "finetune": {"epochs": 1}}] * 2, "student_weights": {}, "search": {}},
         "`teacher` is a list of 2 teachers, but text classification distils from one"),
        ({"student_weights": {"hf.bert-L1-H32-A2-I32": "teacher"}}, "`student_weights.hf.bert-L1-H32-A2-I32: teacher` copies the teacher's layers"),
        ({"students": ["hf.bert-L1-H16-A2"], "student_weights": {}}, "`loss.name` cosine compares hidden states of the teacher's width (32)"),
        ({"students": ["hf.nosuchfamily-L1"], "student_weights": {}}, "names no transformers model type 'nosuchfamily'"),
        ({"students": ["hf.bert-L1-H32-A2-I64"], "student_weights": {"hf.bert-L1-H32-A2-I64": str(own)}},
         "`student_weights.hf.bert-L1-H32-A2-I64` brings its own tokenizer, so its tokens are not the teacher's"),
    ]


def test_bad_text_inputs_exit_2_with_one_line(text_case, tmp_path, capsys, monkeypatch):
    import orchestrator.run.sweep

    monkeypatch.setattr(orchestrator.run.sweep, "init_ray", lambda *a, **k: pytest.fail("Ray started"))  # (a shared Ray may be up already)
    ckpt, table = text_case
    cases = _bad_cases(tmp_path / "inputs", *text_case) if (tmp_path / "inputs").mkdir() is None else []
    capsys.readouterr()  # (save_pretrained's own progress bars)
    for i, (over, needle) in enumerate(cases):
        work = tmp_path / f"case{i}"
        work.mkdir()
        monkeypatch.chdir(work)
        cfg = text_yaml(tmp_path / "inputs", ckpt, table, name=f"bad{i}", storage=str(work / "runs"),
                        **{"tracking.uri": f"sqlite:///{work / 'mlruns' / 'db'}"}, **over)
        capsys.readouterr()  # (the session's MLflow store template, made by the first text_yaml when this test runs alone)
        code = main(["run", str(cfg)])
        err = capsys.readouterr().err.strip()
        assert code == 2, (over, err)
        assert len(err.splitlines()) == 1 and needle in err, (over, err)
        assert os.listdir(work) == [], (over, os.listdir(work))


# ---------------------------------------------------------------------------------------------
# One sweep, end to end


@pytest.mark.integration
def test_text_sweep_end_to_end(text_case, tmp_path, ray_address, monkeypatch):
    ckpt, table = text_case
    monkeypatch.chdir(tmp_path)
    cfg = text_yaml(tmp_path, ckpt, table)
    assert main(["run", str(cfg), "--address", ray_address]) == 0
    db = tmp_path / "mlruns" / "mlflow.db"
    assert count_rows(db, "select count(*) from runs where status='RUNNING'") == 0
    assert count_rows(db, "select count(*) from runs r join tags t on t.run_uuid=r.run_uuid "
                          "where t.key='kdsweep.role' and t.value='trial' and r.status='FINISHED'") >= 2
    teacher_dir = next((tmp_path / "teachers").glob("text-hf-*"))
    card = json.loads((teacher_dir / "teacher.json").read_text())
    assert card["arch"] == "hf" and card["input_shape"] == [16] and card["mean"] == [] and card["val_acc"] > 0.9
    assert (teacher_dir / "tokenizer.json").is_file()  # the folder is a teacher.path on its own
    # kd trials read the teacher's cached logits, built by the first to need them (val and the fixed
    # views: 54 + 306 forwards in all); cosine and tinybert run it (they need its hidden states).
    runs = sqlite_rows(db, "select p.value, max(m.value) from params p join metrics m on m.run_uuid=p.run_uuid "
                           "where p.key='loss' and m.key='teacher_forward_images' group by p.run_uuid")
    losses = {loss: sorted(v for name, v in runs if name == loss) for loss, _ in runs}
    assert set(losses) == {"kd", "cosine", "tinybert"} and sum(losses["kd"]) == 54 + 306 and losses["kd"][0] == 0, losses
    assert min(losses["cosine"]) > 0 and min(losses["tinybert"]) > 0, losses
    test_acc = count_rows(db, "select count(*) from metrics where key='champion_test_acc' and value > 0.8")
    assert test_acc >= 1
    # Latency per sequence length, beside the full length's.
    assert count_rows(db, "select count(*) from metrics where key='size_latency_cpu_b1_len25_ms' and value > 0") >= 2
    # The text corruption suite: on each finished trial's val split, and once on the champion's test split.
    assert count_rows(db, "select count(*) from metrics where key='corr_word_drop'") >= 2
    assert count_rows(db, "select count(*) from metrics where key='corr_gaussian_noise'") == 0  # (the image suite's)
    assert count_rows(db, "select count(*) from metrics where key='champion_test_robust_acc' and value > 0.5") == 1
    # Throughput in the task's unit (texts, not images).
    assert count_rows(db, "select count(*) from metrics where key='texts_per_s' and value > 0") >= 2
    assert count_rows(db, "select count(*) from metrics where key='images_per_s'") == 0
    # The report's robustness table and plot are the text suite's, with the champion's numbers (not the image suite's 0.0 bars).
    assert main(["report", "text", "--storage", str(tmp_path / "runs")]) == 0
    md = (tmp_path / "runs" / "text" / "report" / "report.md").read_text()
    champ = sqlite_rows(db, "select m.value from metrics m join tags t on t.run_uuid=m.run_uuid where t.key='kdsweep.role' and t.value='trial' "
                            "and m.key='corr_word_drop' and m.run_uuid=(select value from tags where key='kdsweep.champion_run_id')")
    row = next(line for line in md.splitlines() if line.startswith("| word_drop |"))
    assert f"| {champ[0][0]:.4f} |" in row and champ[0][0] > 0, row
    assert "| gaussian_noise |" not in md

    # The registered champion takes strings (its tokenizer inside; loading it needs no kdsweep).
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{db}")
    served = mlflow.pyfunc.load_model("models:/kdsweep-text@champion").predict(["a superb and moving film", "awful"])
    assert list(served["label"]) == ["pos", "neg"] and list(served.columns) == ["label", "p_neg", "p_pos"]

    # Out: ONNX with dynamic batch and sequence axes, its tokenizer beside it, run on raw strings.
    import numpy as np
    import onnxruntime
    from transformers import AutoTokenizer

    from orchestrator.select.selection import load_student
    from orchestrator.track.store import SweepTracker, Tag

    assert main(["export", "text", "--storage", str(tmp_path / "runs"), "--format", "onnx"]) == 0
    out = tmp_path / "runs" / "text" / "export"
    assert {"student.onnx", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    texts = ["a superb and moving film", "the plot was dull", "awful"]
    enc = tok(texts, padding=True, return_tensors="np")  # its own length: 7 tokens, not the sweep's 16
    session = onnxruntime.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)})[0]
    tracker = SweepTracker(f"sqlite:///{db}", "text")
    parent = tracker.client.search_runs([tracker.client.get_experiment_by_name("text").experiment_id],
                                        f"tags.`{Tag.ROLE}` = 'parent'")[0]
    model = load_student(tracker, parent.data.tags[Tag.CHAMPION])
    with torch.no_grad():
        ids = torch.from_numpy(enc["input_ids"]).long()
        expected = model(ids).numpy()
    assert np.abs(got - expected).max() < 1e-4
    assert list(got.argmax(1)) == [1, 0, 0]  # pos, neg, neg
