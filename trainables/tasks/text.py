"""Text classification: token ids (N, max_length) of the dataset's tokenizer, one label each;
Hugging Face encoders (`hf` checkpoints, hf.<family> configs); typos and dropped or swapped words,
tokenized again."""
from __future__ import annotations

from typing import TYPE_CHECKING

from trainables.eval.text_corruptions import SEVERITIES, TEXT_CORRUPTIONS, text_robustness
from trainables.tasks import TASKS, Predict, Task

if TYPE_CHECKING:
    from trainables.data import DataSplits


@TASKS.register(name="text_classification")
class TextClassification(Task):
    name = "text_classification"
    inputs = "text (token ids)"
    unit = "texts"
    datasets = ("text",)
    models = ("hf", "hf.")
    models_hint = "use hf.<family> models (or teacher.arch hf) with text data (dataset.name: text)"
    corruptions = tuple(TEXT_CORRUPTIONS.names())
    severities = SEVERITIES
    features = ("transformer",)

    def robustness(self, predict: Predict, splits: "DataSplits", split: str, n: int | None, seed: int, batch: int, clean_acc: float,
                   tokenizer: str | None = None):
        texts, y = getattr(splits, f"{split}_text")[:n], getattr(splits, f"{split}_y")[:n]
        return text_robustness(predict, texts, y, tokenizer or splits.tokenizer, splits.input_shape[0], seed, clean_acc)
