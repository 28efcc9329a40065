"""Causal language modelling: token ids (N, max_length) of the dataset's tokenizer with one label
per position (-100 where nothing is scored); Hugging Face causal LMs (`hf` checkpoints,
hf.<family> configs such as hf.gpt2-L2-H128-A2, hf.llama-..., hf.qwen2-...) with the
AutoModelForCausalLM head; token losses (fkl, rkl, jsd, skl, srkl, tvd: trainables.losses.lm);
perplexity, minimised, as the objective."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainables.registry import ConfigError
from trainables.tasks import TASKS, Task
from trainables.tasks.text import Tokenized

if TYPE_CHECKING:
    from trainables.config import DatasetConfig


SAMPLE_PROMPTS, SAMPLE_TOKENS = 3, 20  # the val prompts a trial continues each epoch, and how far
GENERATED = 16  # tokens a timed generation makes (latency per generated token)


class Generates:
    """A causal LM's `generate` as a call on prompt ids: `n` tokens, greedy, its KV cache on (what
    serving a prompt costs per token, which a forward over the whole block does not say)."""

    def __init__(self, model, n: int) -> None:
        self.model, self.n = model, n

    def __call__(self, ids):
        import torch

        net = self.model.net
        return net.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.n, min_new_tokens=self.n, do_sample=False,
                            pad_token_id=net.config.pad_token_id, eos_token_id=None)


@TASKS.register(name="causal_lm")
class CausalLM(Tokenized, Task):
    name = "causal_lm"
    input_words = "token ids for a causal language model"
    unit = "tokens"
    datasets = ("lm_text",)
    models = ("hf", "hf.")
    models_hint = "use hf.<family> causal LMs (hf.gpt2-L2-H128-A2, hf.llama-..., hf.qwen2-...) or teacher.arch hf with lm_text data"
    objective = "val_ppl:min"
    serving = "generate"
    input_name = "input_ids"
    outputs = "tokens"
    label_words = "vocabulary tokens"
    whole_split_logits = False
    standard_point = {"loss.temperature": 1.0, "loss.alpha": 0.5}  # torchtune's KD recipe (kd_ratio 0.5), GKD's and MiniLLM's T=1
    ce_loss = "fkl"
    split_metrics = {"nll": False, "ppl": False, "acc": True, "agreement": True, "kl_teacher": False, "teacher_nll": False,
                     "teacher_ppl": False}

    leaderboard = ("student", "loss", "status", "temperature", "alpha", "lr", "val_ppl", "kd_gain", "val_acc", "agreement", "val_kl_teacher",
                   "params", "bytes", "latency_ms", "size_latency_cpu_b1_token_ms", "epochs")
    versus = (("test_ppl", "perplexity"), ("test_nll", "NLL"), ("test_acc", "next-token acc"), ("test_agreement", "agreement with the teacher"),
              ("test_kl_teacher", "KL(teacher || student)"))

    def timed_forms(self, shape):
        """Greedy generation at batch 1 from a prompt of half the block, GENERATED tokens with the
        model's KV cache: latency_cpu_b1_token_ms is a call's time per generated token."""
        return {"latency_cpu_b1_token_ms": ((max(1, shape[0] // 2),), lambda m: Generates(m, GENERATED), GENERATED)}

    def per_example(self, shape):
        return int(shape[0])

    def input_description(self, shape, model_kwargs):
        return f"token ids (N, L <= {shape[0]}) from the tokenizer beside the weights; logits (N, L, vocabulary) for the next token"

    def example_input(self, shape, batch, device, dtype=None):
        """Token ids (N, L), all 1 (an id every vocabulary has)."""
        import torch

        return torch.ones(batch, *shape, dtype=torch.long, device=device)

    def validate(self, trial, model, final):
        """Streamed over val (trainables.eval.lm): NLL, perplexity, next-token accuracy, and against
        the teacher (the trial's, a control's too) agreement, KL and the teacher's own perplexity."""
        from trainables.data.lm import prompts_of
        from trainables.eval.lm import eval_batch, greedy, lm_metrics
        from trainables.hf_files import load_tokenizer

        splits, teacher = trial.splits, trial.targets.val_model
        batch = eval_batch(trial.cfg.train.eval_batch_size, splits.input_shape[0], splits.num_classes)
        if teacher is not None:
            trial.targets.forwards += len(splits.val_y)  # (counted as teacher forwards: val is not cached)
        val = lm_metrics(model, teacher, splits.val_x, splits.val_y, batch, trial.device, trial.autocast)
        if trial.rank == 0:  # what the student writes now, from the first val prompts: a table each epoch (MLflow: samples/)
            tok = load_tokenizer(splits.tokenizer)
            prompts = prompts_of(splits, "val", tok, SAMPLE_PROMPTS)
            ids = [tok(p, add_special_tokens=False)["input_ids"] or [tok.eos_token_id] for p in prompts]
            made = greedy(model, ids, SAMPLE_TOKENS, tok.eos_token_id, trial.device)
            val["samples"] = {"prompt": prompts, "generated": [tok.decode(g, skip_special_tokens=True) for g in made]}
        return val, {}

    def evaluate_split(self, student, teacher, splits, split="test", members=(), student_splits=None, seed=0, batch=2048):
        """NLL, perplexity and next-token accuracy of the student (with agreement and KL against the
        teacher) and of the teacher, streamed over the split."""
        import contextlib

        import torch

        from trainables.eval.lm import eval_batch, lm_metrics

        xs, ys = getattr(splits, f"{split}_x"), getattr(splits, f"{split}_y")
        batch = eval_batch(batch, splits.input_shape[0], splits.num_classes)
        out = {"student": lm_metrics(student, teacher, xs, ys, batch, torch.device("cpu"), contextlib.nullcontext, prefix=f"{split}_")}
        if teacher is not None:
            out["teacher"] = lm_metrics(teacher, None, xs, ys, batch, torch.device("cpu"), contextlib.nullcontext, prefix=f"{split}_")
        return out

    def robustness(self, predict, splits, split, n, seed, batch, clean_acc, tokenizer=None):
        return {}, {}

    def model_kwargs(self, arch: str, weights: str | None, dataset: "DatasetConfig") -> dict[str, Any]:
        """The causal-LM head; an hf.<family> model's tokenizer: the one saved with its weights, else the data's."""
        from trainables.hf_files import has_tokenizer
        from trainables.models.hf import PREFIX

        if arch == "hf":
            return {"head": "causal_lm"}
        if not arch.startswith(PREFIX):
            return {}
        return {"head": "causal_lm", "tokenizer": weights if weights and has_tokenizer(weights) else dataset.tokenizer}

    def check_models(self, cfg: Any, input_shape: tuple[int, ...]) -> None:
        """Every vocabulary and position table holds the data's tokens; every student reads the
        teacher's tokenizer (token losses compare distributions over one vocabulary); a student
        taking the teacher's layers has its sizes."""
        from trainables.config import TEACHER_LAYERS
        from trainables.hf_files import tokenizer_info
        from trainables.models.hf import PREFIX, card_config, check_fit, check_layers_fit, family_config, model_config
        from trainables.models.teacher import CARD, read_card

        length, tokenizer = input_shape[0], cfg.dataset.resolved().tokenizer
        vocab = tokenizer_info(tokenizer)["vocab_size"]
        teacher = None
        for t in cfg.members:
            if t.arch == "hf" and not t.path:
                teacher = model_config(t.arch_kwargs["config"])
                check_fit(teacher, "teacher.weights", length, vocab)
            elif t.arch.startswith(PREFIX) and not t.path:
                teacher = family_config(t.arch, tokenizer, **{k: v for k, v in t.arch_kwargs.items() if k != "head"})
                check_fit(teacher, "teacher.arch", length, vocab)
            elif t.path and (Path(t.path) / CARD).is_file():
                card = read_card(t.path)
                teacher = card_config(card.arch, {k: v for k, v in card.arch_kwargs.items() if k != "head"})
        for s in cfg.students:
            own = cfg.student_kwargs(s).get("tokenizer")
            if own != tokenizer and cfg.loss.distills:
                raise ConfigError(f"`student_weights.{s}` brings its own tokenizer, whose vocabulary is not the teacher's: the token losses "
                                  "(fkl, rkl, jsd, skl, srkl, tvd) compare one vocabulary: give the student the teacher's tokenizer")
            config = family_config(s, own)
            check_fit(config, f"students {s}", length, tokenizer_info(own)["vocab_size"])
            if cfg.student_weights.get(s) == TEACHER_LAYERS and teacher is not None:
                check_layers_fit(config, teacher, s)
