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

    def robustness(self, predict: Predict, splits: "DataSplits", n: int, seed: int, batch: int, clean_acc: float):
        return text_robustness(predict, splits.val_text[:n], splits.val_y[:n], splits.tokenizer, splits.input_shape[0], seed, clean_acc)
