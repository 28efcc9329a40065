"""The registered text champion as MLflow logs it (models from code): strings in, a class and its
probabilities out, with the student's tokenizer inside. This file is copied into every registered
text model, so it imports only MLflow, transformers and torch: loading the model needs no kdsweep.

    model = mlflow.pyfunc.load_model("models:/kdsweep-NAME@champion")
    model.predict(["a superb and moving film", "the plot was dull"])   # DataFrame: label, p_<class>...
"""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd


class TextClassifier(mlflow.pyfunc.PythonModel):
    """artifacts["student"]: a save_pretrained folder (model and tokenizer) and kdsweep.json (the
    class names and max_length the student was trained with)."""

    def load_context(self, context) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = Path(context.artifacts["student"])
        meta = json.loads((folder / "kdsweep.json").read_text())
        self.classes, self.max_length = meta["classes"], meta["max_length"]
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(str(folder), local_files_only=True, use_safetensors=True).eval()

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        import torch

        if isinstance(model_input, pd.DataFrame):
            model_input = model_input.iloc[:, 0]
        texts = [str(t) for t in (model_input.tolist() if hasattr(model_input, "tolist") else model_input)]
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        with torch.no_grad():
            probs = self.model(**{k: enc[k] for k in ("input_ids", "attention_mask")}).logits.float().softmax(-1)
        out = pd.DataFrame(probs.numpy(), columns=[f"p_{c}" for c in self.classes])
        out.insert(0, "label", [self.classes[i] for i in probs.argmax(-1).tolist()])
        return out


mlflow.models.set_model(TextClassifier())
