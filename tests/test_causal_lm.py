"""The causal-LM task: text packed into blocks or prompt/response pairs, hf.<family> causal LMs,
token losses mixed with next-token CE, streamed perplexity metrics, and one CLI sweep end to end
(a tiny GPT-2 teacher trained first, two students, fkl/rkl/jsd searched, confirmation, the champion
generating through MLflow, ONNX). The corpus and tokenizer are made here: a word-level grammar."""
from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import count_rows, mlflow_store
from orchestrator.cli import main
from trainables.registry import ConfigError

SUBJECTS = ["the cat", "a dog", "the bird", "my friend", "the old man", "a child"]
VERBS = ["sees", "likes", "finds", "follows", "hears"]
OBJECTS = ["the ball", "a tree", "the river", "some bread", "the moon", "a song"]


def write_corpus(path: Path, n: int = 400, seed: int = 0) -> Path:
    """Sentences of a small grammar, one per line: the subject comes back in the second clause, so
    a model that reads context predicts better than one that counts words."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        s, v, o = rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)
        lines.append(f"{s} {v} {o} and then {s} {rng.choice(['sleeps', 'sings'])} .")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_tokenizer(out: Path, corpus: Path) -> Path:
    """A word-level tokenizer of the corpus (pad 0, unk 1, eos 2), saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus.read_text().splitlines(), trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<eos>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>", bos_token="<eos>").save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def lm_case(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(corpus.txt, tokenizer folder, pairs.jsonl)."""
    d = tmp_path_factory.mktemp("lm")
    corpus = write_corpus(d / "corpus.txt")
    tok = write_tokenizer(d / "tok", corpus)
    rng = random.Random(1)
    rows = [{"prompt": f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)}", "response": f"{rng.choice(OBJECTS)} ."} for _ in range(60)]
    pairs = d / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return corpus, tok, pairs


def dataset(root: Path, tok: Path, cache: Path, **kw):
    from trainables.config import DatasetConfig

    return DatasetConfig(name="lm_text", root=str(root), tokenizer=str(tok), max_length=kw.pop("max_length", 16), cache=str(cache), **kw)


# ---------------------------------------------------------------------------------------------
# Data


def test_text_is_packed_into_blocks_once_and_pairs_score_the_response_only(lm_case, tmp_path):
    from transformers import AutoTokenizer

    from trainables.tasks import task_for

    corpus, tok_dir, pairs = lm_case
    task = task_for("lm_text")
    assert task.name == "causal_lm" and task.objective == "val_ppl:min"
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    splits = task.splits(dataset(corpus, tok_dir, tmp_path))
    assert splits.decode_s > 0 and task.splits(dataset(corpus, tok_dir, tmp_path)).decode_s == 0  # tokenized once
    blocks = torch.cat([splits.train_x, splits.val_x, splits.test_x])
    assert blocks.shape[1] == 16 and splits.num_classes == len(tok)
    # every block is a window of the one stream (documents ended with eos), none lost or repeated but the tail
    stream = []
    for line in [corpus.read_text()]:
        stream += tok(line, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    windows = {tuple(stream[i : i + 16]) for i in range(0, len(stream) - 15, 16)}
    assert {tuple(b) for b in blocks.tolist()} == windows and len(blocks) == len(stream) // 16
    # labels are the inputs, but position 0 (never predicted)
    assert (splits.train_y[:, 1:] == splits.train_x[:, 1:].long()).all() and (splits.train_y[:, 0] == -100).all()

    p = task.splits(dataset(pairs, tok_dir, tmp_path, kwargs={"prompt_column": "prompt", "response_column": "response"}))
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    x, y = torch.cat([p.train_x, p.val_x, p.test_x]), torch.cat([p.train_y, p.val_y, p.test_y])
    assert len(x) == len(rows)
    for ids, labels in zip(x.tolist(), y.tolist()):
        n_prompt = next(i for i, v in enumerate(labels) if v != -100)
        scored = [v for v in labels if v != -100]
        real = [i for i in ids if i != tok.pad_token_id]
        assert scored == real[n_prompt:] and scored[-1] == tok.eos_token_id  # the response and its eos, nothing else
        text = tok.decode(real[:n_prompt])
        assert any(text == r["prompt"] and tok.decode(scored[:-1]) == r["response"] for r in rows)


@pytest.mark.parametrize("over,needle", [
    ({"max_length": 4000, "root": "tiny"}, "fewer than the 3 blocks"),
    ({"kwargs": {"prompt_column": "question", "response_column": "response"}}, "`dataset.kwargs.prompt_column` 'question' is not a column"),
    ({"kwargs": {"prompt_column": "prompt"}}, "go together"),
    ({"max_length": 2, "kwargs": {"prompt_column": "prompt", "response_column": "response"}}, "truncates every response away"),
])
def test_bad_lm_data_are_one_line_config_errors(lm_case, tmp_path, over, needle):
    from trainables.tasks import task_for

    corpus, tok, pairs = lm_case
    root = {"tiny": corpus}.get(over.pop("root", None)) or (pairs if "kwargs" in over else corpus)
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        task_for("lm_text").splits(dataset(root, tok, tmp_path, **over))


# ---------------------------------------------------------------------------------------------
# Models and losses


def test_families_build_causal_lms_whose_tied_weights_save_once_and_load_back(lm_case, tmp_path):
    from trainables.models import create_model
    from trainables.models.hf import HFCausalLM, init_from_teacher
    from trainables.models.profile import serialized_bytes
    from trainables.models.teacher import load_teacher, save_teacher
    from trainables.tasks import task_for

    corpus, tok, _ = lm_case
    task = task_for("lm_text")
    ds = dataset(corpus, tok, tmp_path).resolved()
    splits = task.splits(ds)
    x = splits.val_x[:3]
    for name in ("hf.gpt2-L2-H32-A2", "hf.llama-L1-H32-A4-I64", "hf.qwen2-L1-H32-A4-I64"):
        kw = task.model_kwargs(name, None, ds)
        model = create_model(name, splits.num_classes, splits.input_shape, **kw)
        assert isinstance(model, HFCausalLM) and model(x).shape == (3, 16, splits.num_classes)
        c = model.config
        assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads) == ((2, 32, 2) if "gpt2" in name else (1, 32, 4))
        assert getattr(c, "num_key_value_heads", c.num_attention_heads) == c.num_attention_heads and c.eos_token_id == 2 and c.pad_token_id == 0
    gpt2 = create_model("hf.gpt2-L2-H32-A2", splits.num_classes, splits.input_shape, **task.model_kwargs("hf.gpt2-L2-H32-A2", None, ds))
    embed = gpt2.net.get_input_embeddings().weight
    assert gpt2.net.get_output_embeddings().weight.data_ptr() == embed.data_ptr()  # GPT-2 ties its head to its embeddings
    assert serialized_bytes(gpt2) < sum(v.numel() * v.element_size() for v in gpt2.state_dict().values())  # stored once
    card = {"arch": "hf.gpt2-L2-H32-A2", "arch_kwargs": task.model_kwargs("hf.gpt2-L2-H32-A2", None, ds), "num_classes": splits.num_classes,
            "input_shape": list(splits.input_shape), "dataset": "lm_text", "val_acc": 0.0, "epochs": 0, "classes": [], "mean": [], "std": [],
            "normalize": "auto"}
    save_teacher(gpt2, tmp_path / "t", card)
    back, _ = load_teacher(tmp_path / "t")
    assert torch.equal(back.eval()(x), gpt2.eval()(x))
    assert back.net.get_output_embeddings().weight.data_ptr() == back.net.get_input_embeddings().weight.data_ptr()
    # DistilGPT2's start: every other teacher layer (GPT-2 numbers its blocks h.0, h.1, ...)
    student = create_model("hf.gpt2-L1-H32-A2", splits.num_classes, splits.input_shape, **task.model_kwargs("hf.gpt2-L1-H32-A2", None, ds))
    assert init_from_teacher(student, gpt2) == [0]
    assert torch.equal(student.net.transformer.h[0].attn.c_attn.weight, gpt2.net.transformer.h[0].attn.c_attn.weight)


def _direct_kl(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) per row, float64, written out."""
    p = torch.softmax(t.double() / temperature, -1)
    return (p * (p.log() - torch.log_softmax(s.double() / temperature, -1))).sum(-1)


def test_token_losses_shift_mask_and_mix_next_token_ce():
    from trainables.losses import build_loss

    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 6, 11, generator=g, requires_grad=True)
    t = 3 * torch.randn(3, 6, 11, generator=g)
    y = torch.randint(0, 11, (3, 6), generator=g)
    y[:, :2] = -100  # a prompt of two tokens
    y[2, 4:] = -100  # padding
    target, keep = y[:, 1:], y[:, 1:] != -100
    ce = F.cross_entropy(s[:, :-1].reshape(-1, 11).double(), target.reshape(-1), ignore_index=-100)
    control, parts = build_loss("fkl", {"alpha": 0.0})(s, None, y)  # the control: next-token CE alone, no teacher
    assert torch.allclose(control.double(), ce, atol=1e-6) and parts["kd"] == 0
    loss, parts = build_loss("fkl", {"alpha": 0.7, "temperature": 2.0})(s, t, y)
    kl = _direct_kl(s[:, :-1], t[:, :-1], 2.0)[keep].mean()
    assert torch.allclose(loss.double(), 0.7 * 4.0 * kl + 0.3 * ce, atol=1e-5) and torch.allclose(parts["kd"].double(), 4 * kl, atol=1e-5)
    # nothing at a masked position (the prompt, padding, the last position: it predicts no label) moves the loss
    moved = t.clone()
    moved[:, 0] += 5
    moved[2, 3:] -= 7
    moved[:, -1] += 3
    assert torch.allclose(build_loss("fkl", {"alpha": 0.7, "temperature": 2.0})(s, moved, y)[0], loss)
    loss.backward()
    assert s.grad[:, -1].abs().max() == 0 and s.grad[0, 0].abs().max() == 0 and s.grad[0, 1].abs().max() > 0
    # each divergence is its registered loss (jsd's beta reaches it: 0 is forward KL)
    for name, params in (("rkl", {}), ("jsd", {"beta": 0.0}), ("tvd", {})):
        value = build_loss(name, {"alpha": 1.0, "temperature": 1.0, **params})(s, t, y)[0]
        if name == "rkl":
            expect = _direct_kl(t[:, :-1], s[:, :-1], 1.0)[keep].mean()
        elif name == "jsd":
            expect = _direct_kl(s[:, :-1], t[:, :-1], 1.0)[keep].mean()
        else:
            expect = 0.5 * (torch.softmax(t[:, :-1].double(), -1) - torch.softmax(s[:, :-1].double(), -1)).abs().sum(-1)[keep].mean()
        assert torch.allclose(value.double(), expect, atol=1e-5), name
    with pytest.raises(ConfigError, match="loss.beta"):
        build_loss("jsd", {"beta": 1.5})


def test_on_policy_batches_are_the_students_samples_scored_by_the_divergence_alone(lm_case, tmp_path):
    """GKD's lmbda: a seeded share of batches is replaced by the student's continuations of each
    row's prompt; only the sampled tokens are scored, and without CE (no labels to take it against)."""
    from trainables.losses import build_loss
    from trainables.models import create_model
    from trainables.tasks import task_for

    corpus, tok, pairs = lm_case
    task = task_for("lm_text")
    ds = dataset(corpus, tok, tmp_path).resolved()
    splits = task.splits(ds)
    torch.manual_seed(0)
    student = create_model("hf.gpt2-L1-H16-A2", splits.num_classes, splits.input_shape, **task.model_kwargs("hf.gpt2-L1-H16-A2", None, ds))
    x, y = splits.train_x[:4], splits.train_y[:4]
    half = build_loss("fkl", {"alpha": 0.5, "lmbda": 0.5, "max_new_tokens": 5})
    drawn = [half.rollout(student, x, y, (0, 0, b)) is not None for b in range(40)]
    assert 8 < sum(drawn) < 32 and drawn == [half.rollout(student, x, y, (0, 0, b)) is not None for b in range(40)]  # seeded by batch
    assert build_loss("fkl", {"alpha": 0.0, "lmbda": 1.0}).rollout(student, x, y, (0, 0, 0)) is None  # a control never samples
    always = build_loss("fkl", {"alpha": 0.5, "lmbda": 1.0, "max_new_tokens": 5, "sample_temperature": 0.7})
    rx, ry = always.rollout(student, x, y, (0, 0, 1))
    assert student.training  # (sampled in eval mode, restored)
    assert torch.equal(rx[:, :11], x[:, :11]) and rx.dtype == x.dtype and rx.shape == x.shape  # a 16-token block: 11 kept, 5 sampled
    assert (ry[:, :11] == -100).all() and torch.equal(ry[:, 11:], rx[:, 11:].long())
    s = student(rx)
    t = s.detach() + torch.randn_like(s)
    loss, parts = always(s, t, ry, on_policy=True)
    kl = _direct_kl(s[:, 10:15].detach(), t[:, 10:15], 1.0).mean()  # positions 10..14 predict the sampled tokens 11..15
    assert torch.allclose(loss.double(), 0.5 * kl, atol=1e-5) and parts["ce"] == 0
    # prompt/response pairs: the batch's shortest prompt is kept and the student answers after it
    p = task.splits(dataset(pairs, tok, tmp_path, kwargs={"prompt_column": "prompt", "response_column": "response"}))
    px, py = p.train_x[:6], p.train_y[:6]
    start = int((py != -100).float().argmax(1).min())
    qx, qy = always.rollout(student, px, py, (0, 0, 1))
    assert torch.equal(qx[:, :start], px[:, :start]) and (qy[:, :start] == -100).all() and (qy[:, start : start + 5] != -100).all()
    with pytest.raises(ConfigError, match="loss.lmbda"):
        build_loss("jsd", {"lmbda": 1.5})


def test_a_trial_with_every_batch_on_policy_trains_on_the_teachers_scores_of_its_samples(lm_case, tmp_path):
    """The loop's on-policy path, lmbda = 1 (the one trial that samples: generation is slow on a CPU)."""
    from conftest import trial_dict
    from trainables.loop import train_student
    from trainables.models import create_model
    from trainables.models.teacher import save_teacher
    from trainables.tasks import task_for

    corpus, tok, _ = lm_case
    task = task_for("lm_text")
    ds = dataset(corpus, tok, tmp_path).resolved()
    splits = task.splits(ds)
    kw = task.model_kwargs("hf.gpt2-L1-H16-A2", None, ds)
    save_teacher(create_model("hf.gpt2-L1-H16-A2", splits.num_classes, splits.input_shape, **kw), tmp_path / "teacher",
                 {"arch": "hf.gpt2-L1-H16-A2", "arch_kwargs": kw, "num_classes": splits.num_classes, "input_shape": list(splits.input_shape),
                  "dataset": "lm_text", "val_acc": 0.0, "epochs": 0, "classes": [], "mean": [], "std": [], "normalize": "auto"})
    cfg = trial_dict(student="hf.gpt2-L1-H16-A2", student_kwargs=kw, dataset=ds.model_dump(), teacher_path=str(tmp_path / "teacher"),
                     loss={"name": "jsd", "alpha": 0.5, "lmbda": 1.0, "max_new_tokens": 4}, epochs=1, batch_size=64,
                     optimizer={"name": "adamw", "lr": 1e-3, "weight_decay": 0.0}, checkpoint_dir=str(tmp_path / "ck"), profile=False)
    m = train_student(cfg).metrics
    steps = len(splits.train_y) // 64
    assert m["status"] == "finished" and m["train_ce"] == 0 and m["train_kd"] > 0  # every batch the student's own: the divergence alone
    assert m["teacher_forward_images"] == steps * 64 + len(splits.val_y)  # each sampled batch scored once, and val
    assert m["val_teacher_ppl"] > 1 and math.isfinite(m["val_ppl"])


def test_a_loss_must_score_what_the_tasks_models_give():
    from trainables.losses import check_fits
    from trainables.tasks import task_for

    lm, text = task_for("lm_text"), task_for("text")
    for method in ("fkl", "rkl", "jsd", "skl", "srkl", "tvd"):
        check_fits(method, lm.features, "causal lm", lm.outputs)
        with pytest.raises(ConfigError, match=f"`loss.name` {method} distils next-token distributions.*use .*kd"):
            check_fits(method, text.features, "text classification", text.outputs)
    with pytest.raises(ConfigError, match="`loss.name` kd distils one class distribution per example.*use fkl, jsd, rkl"):
        check_fits("kd", lm.features, "causal lm", lm.outputs)


def test_lm_metrics_are_the_scored_tokens_means():
    from trainables.eval.lm import lm_metrics

    g = torch.Generator().manual_seed(1)
    s_logits, t_logits = torch.randn(5, 7, 9, generator=g), torch.randn(5, 7, 9, generator=g)
    y = torch.randint(0, 9, (5, 7), generator=g)
    y[:, 0], y[1, 3:] = -100, -100

    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, x):
            return self.logits[x[:, 0]]

    x = torch.arange(5)[:, None].repeat(1, 7)
    m = lm_metrics(Fixed(s_logits), Fixed(t_logits), x, y, 2, torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False))
    keep = y[:, 1:] != -100
    s, t, tgt = s_logits[:, :-1][keep], t_logits[:, :-1][keep], y[:, 1:][keep]
    nll = F.cross_entropy(s.double(), tgt)
    assert m["val_nll"] == pytest.approx(nll.item(), rel=1e-6) and m["val_ppl"] == pytest.approx(math.exp(nll.item()), rel=1e-6)
    assert m["val_acc"] == pytest.approx((s.argmax(-1) == tgt).double().mean().item())
    assert m["val_agreement"] == pytest.approx((s.argmax(-1) == t.argmax(-1)).double().mean().item())
    assert m["val_kl_teacher"] == pytest.approx(_direct_kl(s, t, 1.0).mean().item(), rel=1e-5)
    assert m["val_teacher_nll"] == pytest.approx(F.cross_entropy(t.double(), tgt).item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# One sweep, end to end


def lm_yaml(path: Path, corpus: Path, tok: Path, name: str = "lm", **over) -> Path:
    cfg = {
        "name": name, "seed": 0, "storage": str(path / "runs"), "tracking": {"uri": mlflow_store(path / "mlruns")},
        "dataset": {"name": "lm_text", "root": str(corpus), "tokenizer": str(tok), "max_length": 16, "cache": str(path / "cache")},
        "teacher": {"arch": "hf.gpt2-L2-H32-A2", "epochs": 3, "batch_size": 16, "path": str(path / "teacher"),
                    "optimizer": {"name": "adamw", "lr": 5e-3, "weight_decay": 0.0}},
        "students": ["hf.gpt2-L1-H16-A2", "hf.llama-L1-H16-A2-I32"],
        "loss": {"name": "fkl", "temperature": 1.0, "alpha": 0.5},
        "train": {"epochs": 1, "batch_size": 16, "optimizer": {"name": "adamw", "lr": 5e-3, "weight_decay": 0.0}, "teacher_topk": 8},
        "search": {"loss.name": {"type": "categorical", "choices": ["fkl", "rkl", "jsd"]}, "alpha": {"type": "float", "low": 0.0, "high": 1.0}},
        "budget": {"num_samples": 5, "max_concurrent": 1, "grace_period": 1, "reduction_factor": 2, "confirm": {"top": 1, "seeds": 2}},
        "mode": "joint", "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0, "num_workers": 1},
    }
    for key, value in over.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    out = path / f"{name}.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


def _bad_lm_cases(root: Path, corpus: Path, tok: Path, pairs: Path) -> list[tuple[dict, str]]:
    """(overrides of lm_yaml, what the one line must say) for inputs refused before Ray starts."""
    from test_text import make_checkpoint

    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    other = write_tokenizer(root / "other", write_corpus(root / "other.txt", n=50, seed=3))  # a student checkpoint with its own vocabulary
    GPT2LMHeadModel(GPT2Config(vocab_size=len(AutoTokenizer.from_pretrained(str(other))), n_layer=1, n_embd=16, n_head=2,
                               pad_token_id=0)).save_pretrained(str(other))
    bert = make_checkpoint(root / "bert")
    return [
        ({"dataset.max_length": 4000}, "fewer than the 3 blocks of dataset.max_length=4000 tokens"),
        ({"teacher.arch_kwargs": {"max_position_embeddings": 8}}, "`dataset.max_length` 16 is more than teacher.arch's 8 positions"),
        ({"dataset.root": str(pairs), "dataset.kwargs": {"prompt_column": "question", "response_column": "response"}},
         "`dataset.kwargs.prompt_column` 'question' is not a column of pairs.jsonl"),
        ({"dataset.root": str(pairs), "dataset.max_length": 2, "dataset.kwargs": {"prompt_column": "prompt", "response_column": "response"}},
         "truncates every response away"),
        ({"student_weights": {"hf.gpt2-L1-H16-A2": str(other)}}, "brings its own tokenizer, whose vocabulary is not the teacher's"),
        ({"search": {"loss.name": {"type": "categorical", "choices": ["fkl", "kd"]}}}, "`loss.name` kd distils one class distribution per example, but the models of causal lm give next-token"),
        ({"students": ["cnn_small"]}, "`students` cnn_small does not take token ids for a causal language model"),
        ({"loss.lmbda": 1.5}, "`loss.lmbda` must lie in [0, 1], but got loss.lmbda=1.5"),
        ({"student_weights": {"hf.gpt2-L1-H16-A2": "teacher"}}, "copies the teacher's layers, so the student needs the teacher's model type "
                                                                 "and sizes but depth (n <= 2): use hf.gpt2-L<n>-H32-A2"),
        ({"teacher": {"weights": str(bert)}}, "does not fit this architecture"),
    ]


def test_bad_lm_inputs_exit_2_with_one_line_before_ray(lm_case, tmp_path, capsys, monkeypatch):
    import orchestrator.run.sweep

    monkeypatch.setattr(orchestrator.run.sweep, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    (tmp_path / "inputs").mkdir()
    cases = _bad_lm_cases(tmp_path / "inputs", *lm_case)
    for i, (over, needle) in enumerate(cases):
        work = tmp_path / f"case{i}"
        work.mkdir()
        monkeypatch.chdir(work)
        cfg = lm_yaml(tmp_path / "inputs", *lm_case[:2], name=f"bad{i}", storage=str(work / "runs"),
                      **{"tracking.uri": f"sqlite:///{work / 'mlruns' / 'db'}", "teacher.path": None}, **over)
        capsys.readouterr()
        code = main(["run", str(cfg)])
        err = capsys.readouterr().err.strip()
        assert code == 2, (over, err)
        assert len(err.splitlines()) == 1 and needle in err, (over, err)
        assert os.listdir(work) == [], (over, os.listdir(work))


def test_the_plan_prices_the_per_token_cache(lm_case, tmp_path):
    from orchestrator.plan.config import load_config
    from orchestrator.plan.prepare import check_data
    from orchestrator.run.sweep import cache_line

    cfg = load_config(str(lm_yaml(tmp_path, *lm_case[:2])), [])
    info = check_data(cfg)
    # 8 fp16 values, 8 int16 token ids and 6 fp16 fills a token; 16 tokens a block
    line = cache_line(cfg, info)
    assert line.startswith(f"top-8 of 30 logits (the rest: bucket), 44 bytes a token (704 a block of 16), {704 * info.n_train / 2**20:.1f} MiB"), line


@pytest.mark.integration
def test_lm_sweep_end_to_end(lm_case, tmp_path, ray_address, monkeypatch):
    import mlflow

    corpus, tok, _ = lm_case
    monkeypatch.chdir(tmp_path)
    cfg = lm_yaml(tmp_path, corpus, tok)
    assert main(["teacher", str(cfg)]) == 0  # the teacher first: a tiny GPT-2 trained here on the corpus
    card = json.loads((tmp_path / "teacher" / "teacher.json").read_text())
    assert card["arch"] == "hf.gpt2-L2-H32-A2" and card["arch_kwargs"]["head"] == "causal_lm"
    assert main(["run", str(cfg), "--address", ray_address]) == 0
    db = tmp_path / "mlruns" / "mlflow.db"
    assert count_rows(db, "select count(*) from runs where status='RUNNING'") == 0
    # the search: the three methods trained; controls exactly alpha=0; every trial scored in perplexity against the teacher
    losses = {v for (v,) in __import__("conftest").sqlite_rows(db, "select distinct value from params where key='loss'")}
    assert losses == {"fkl", "rkl", "jsd"}
    assert count_rows(db, "select count(*) from params where key='alpha' and value='0.0'") >= 2
    assert count_rows(db, "select count(*) from metrics where key='val_ppl' and value > 1") >= 5
    assert count_rows(db, "select count(*) from metrics where key='val_teacher_ppl' and value > 1") >= 5
    assert count_rows(db, "select count(*) from metrics where key='val_agreement'") >= 5
    assert count_rows(db, "select count(*) from metrics where key='tokens_per_s' and value > 0") >= 5
    # latency per generated token (batch 1, KV cache on), each student's and against the teacher's, timed interleaved
    assert count_rows(db, "select count(*) from metrics where key='size_latency_cpu_b1_token_ms' and value > 0") >= 5
    assert count_rows(db, "select count(*) from metrics where key='speedup_latency_cpu_b1_token' and value > 0") >= 5
    assert count_rows(db, "select count(*) from metrics where key like 'val_macro%' or key like 'corr_%'") == 0  # no classification numbers
    # KD trials read the teacher's per-token targets from the sweep's cache, built once by the first (fixed views)
    assert count_rows(db, "select count(*) from tags where key='kdsweep.teacher_targets' and value='cache'") >= 3
    (static,) = (tmp_path / "runs" / "lm" / "teacher_cache").glob("*/static.pt")
    stored = torch.load(static, weights_only=True)  # each train block's every position: its top 8 of the 30 tokens, and the rest's fill
    assert stored["values"].shape[1:] == (16, 8) and stored["indices"].shape[1:] == (16, 8) and stored["values"].dtype == torch.float16
    # each epoch, what the student writes from the first val prompts: an MLflow table of the run
    client = mlflow.tracking.MlflowClient(f"sqlite:///{db}")
    (trial,) = [r for r in client.search_runs([client.get_experiment_by_name("lm").experiment_id])
                if r.data.tags.get("kdsweep.role") == "trial" and r.data.params.get("alpha") == "0.0"][:1]
    with __import__("tempfile").TemporaryDirectory() as d:
        table = json.loads(Path(client.download_artifacts(trial.info.run_id, "samples/epoch_001.json", d)).read_text())
    rows = dict(zip(table["columns"], zip(*table["data"])))
    assert len(rows["prompt"]) == 3 and all(isinstance(g, str) and g for g in rows["generated"]), rows
    # confirmation: the finalist on 2 seeds beside its control; the champion tested once, in perplexity
    assert count_rows(db, "select count(*) from tags where key='kdsweep.confirms'") >= 1
    assert count_rows(db, "select count(*) from metrics where key='champion_test_ppl' and value > 1") == 1
    assert count_rows(db, "select count(*) from metrics where key='teacher_test_ppl' and value > 1") == 1
    # the registered champion generates from a prompt, with nothing of kdsweep
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    out = mlflow.pyfunc.load_model("models:/kdsweep-lm@champion").predict(["the cat sees"], params={"max_new_tokens": 6})
    assert list(out.columns) == ["prompt", "generated"] and len(out["generated"][0].split()) >= 3
    # out alone: a save_pretrained folder with its tokenizer, and the decoder's logits as ONNX (checked against PyTorch on export)
    assert main(["export", "lm", "--storage", str(tmp_path / "runs"), "--format", "onnx"]) == 0
    folder = tmp_path / "runs" / "lm" / "export"
    assert {"config.json", "model.safetensors", "tokenizer.json", "student.onnx"} <= set(os.listdir(folder))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    net, t = AutoModelForCausalLM.from_pretrained(str(folder)), AutoTokenizer.from_pretrained(str(folder))
    ids = t("the cat", add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert net.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=t.pad_token_id).shape[1] == ids.shape[1] + 4
    assert count_rows(db, "select count(*) from metrics where key='export_onnx_max_abs_diff' and value < 1e-3") == 1
