"""Text classification: token ids (N, max_length) of the dataset's tokenizer, one label each;
Hugging Face encoders (`hf` checkpoints, hf.<family> configs); typos and dropped or swapped words,
tokenized again."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainables.eval.text_corruptions import SEVERITIES, TEXT_CORRUPTIONS, text_robustness
from trainables.tasks import TASKS, Predict, Task

if TYPE_CHECKING:
    from trainables.config import DatasetConfig
    from trainables.data import DataSplits


class Tokenized:
    """What the tasks over one tokenizer's ids share (text classification, causal language
    modelling): the tokenizer defaults to the teacher checkpoint's and is saved beside a teacher."""

    def resolve_dataset(self, dataset: "DatasetConfig", checkpoint: str | None) -> "DatasetConfig":
        """No dataset.tokenizer: the teacher checkpoint's."""
        if dataset.tokenizer is None and checkpoint:
            return dataset.model_copy(update={"tokenizer": checkpoint})
        return dataset

    def save_with_teacher(self, dataset: "DatasetConfig", folder: Path) -> None:
        """The tokenizer beside the weights: the folder is a teacher.path (and a checkpoint) on its own."""
        from trainables.hf_files import load_tokenizer

        load_tokenizer(dataset.resolved().tokenizer).save_pretrained(str(folder))


@TASKS.register(name="text_classification")
class TextClassification(Tokenized, Task):
    name = "text_classification"
    input_words = "text (token ids)"
    unit = "texts"
    datasets = ("text",)
    models = ("hf", "hf.")
    models_hint = "use hf.<family> models (or teacher.arch hf) with text data (dataset.name: text)"
    corruptions = tuple(TEXT_CORRUPTIONS.names())
    severities = SEVERITIES
    features = ("transformer",)
    serving = "tokens"
    input_name = "input_ids"

    def input_description(self, shape, model_kwargs):
        return f"token ids (N, L <= {shape[0]}) from the tokenizer beside the weights, right-padded"

    def example_input(self, shape, batch, device, dtype=None):
        """Token ids (N, L) with no padding (id 1: in every vocabulary, and never a pad id 0), so
        attention runs over the full length."""
        import torch

        return torch.ones(batch, *shape, dtype=torch.long, device=device)

    def input_variants(self, shape):
        """The full length, and a quarter and half of it (latency grows with the sequence)."""
        return {"": tuple(shape), **{f"_len{p}": (max(2, shape[0] * p // 100),) for p in (25, 50)}}

    def robustness(self, predict: Predict, splits: "DataSplits", split: str, n: int | None, seed: int, batch: int, clean_acc: float,
                   tokenizer: str | None = None):
        texts, y = getattr(splits, f"{split}_text")[:n], getattr(splits, f"{split}_y")[:n]
        return text_robustness(predict, texts, y, tokenizer or splits.tokenizer, splits.input_shape[0], seed, clean_acc)

    def read_unlabeled(self, root, like, options):
        """Raw text, tokenized once as the labelled text is (the same tokenizer and max_length): a
        .txt file (one example per line), a .csv/.jsonl/.json table's text column, or a folder
        of .txt files (one example each)."""
        from trainables.data import cache_dir
        from trainables.data.text import tokenize_unlabeled

        return tokenize_unlabeled(root, cache_dir(options.get("cache")), options["tokenizer"], options["max_length"],
                                  options.get("text_column", "text"))

    def model_kwargs(self, arch: str, weights: str | None, dataset: "DatasetConfig") -> dict[str, Any]:
        """An hf.<family> model's tokenizer: the one saved with its weights checkpoint, else the data's."""
        from trainables.hf_files import has_tokenizer
        from trainables.models.hf import PREFIX

        if not arch.startswith(PREFIX):
            return {}
        return {"tokenizer": weights if weights and has_tokenizer(weights) else dataset.tokenizer}

    def check_models(self, cfg: Any, input_shape: tuple[int, ...]) -> None:
        """Every vocabulary and position table holds the data's tokens; a student with its own
        tokenizer gets its own ids (tokenized here, once) and distils from logits only; a student
        taking the teacher's layers, or compared with its hidden states (cosine), has its sizes."""
        from trainables.config import TEACHER_LAYERS
        from trainables.hf_files import tokenizer_info
        from trainables.losses import LOSSES
        from trainables.models.hf import PREFIX, card_config, check_fit, check_layers_fit, family_config, model_config
        from trainables.models.teacher import CARD, read_card
        from trainables.registry import ConfigError

        length, tokenizer = input_shape[0], cfg.dataset.resolved().tokenizer
        vocab = tokenizer_info(tokenizer)["vocab_size"]
        teacher = None
        for i, t in enumerate(cfg.members):
            field = f"teacher{f'[{i}]' if cfg.is_ensemble else ''}"
            if t.arch == "hf" and not t.path:
                teacher = model_config(t.arch_kwargs["config"])
                check_fit(teacher, f"{field}.weights", length, vocab)
            elif t.arch.startswith(PREFIX) and not t.path:  # built from a config, trained here: the data's tokenizer
                teacher = family_config(t.arch, tokenizer, **t.arch_kwargs)
                check_fit(teacher, f"{field}.arch", length, vocab)
            elif t.path and (Path(t.path) / CARD).is_file():
                card = read_card(t.path)
                teacher = card_config(card.arch, card.arch_kwargs)
        for s in cfg.students:
            own = cfg.student_kwargs(s)["tokenizer"]
            if own != tokenizer:  # its own tokenizer: the text tokenized for it too, once, here
                self.splits(cfg.student_dataset(s))
                if any(LOSSES.get(m).needs_teacher_features for m in cfg.methods) or cfg.train.teacher_targets == "online":
                    raise ConfigError(f"`student_weights.{s}` brings its own tokenizer, so its tokens are not the teacher's: distil it from "
                                      "cached logits (loss kd, dkd or dist; train.teacher_targets auto), not token-aligned features")
            config = family_config(s, own)
            check_fit(config, f"students {s}", length, tokenizer_info(own)["vocab_size"])
            if cfg.student_weights.get(s) == TEACHER_LAYERS and teacher is not None:
                check_layers_fit(config, teacher, s)
            if "cosine" in cfg.methods and teacher is not None and config.hidden_size != teacher.hidden_size:
                raise ConfigError(f"`loss.name` cosine compares hidden states of the teacher's width ({teacher.hidden_size}), but student {s} "
                                  f"has {config.hidden_size}: use tinybert (it learns a projection) or students of width {teacher.hidden_size}")
