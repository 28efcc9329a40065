"""The registered causal-LM champion as MLflow logs it (models from code): prompts in, generated
text out, with the student's tokenizer inside. This file is copied into every registered language
model, so it imports only MLflow, transformers and torch: loading the model needs no kdsweep.

    model = mlflow.pyfunc.load_model("models:/kdsweep-NAME@champion")
    model.predict(["once upon a time"])                                  # DataFrame: prompt, generated
    model.predict(["once upon a time"], params={"max_new_tokens": 40, "temperature": 0.8})
"""
from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd


class TextGenerator(mlflow.pyfunc.PythonModel):
    """artifacts["student"]: a save_pretrained folder (AutoModelForCausalLM and its tokenizer).
    Greedy decoding unless `params` give a temperature > 0 (then sampled, seeded by `seed`)."""

    def load_context(self, context) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = Path(context.artifacts["student"])
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, use_safetensors=True).eval()

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        import torch

        params = {"max_new_tokens": 20, "temperature": 0.0, "seed": 0, **(params or {})}
        if isinstance(model_input, pd.DataFrame):
            model_input = model_input.iloc[:, 0]
        prompts = [str(t) for t in (model_input.tolist() if hasattr(model_input, "tolist") else model_input)]
        out = []
        for prompt in prompts:  # one at a time: no padding to reason about, batch 1 as a chat serves
            ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
            if ids.shape[1] == 0:
                ids = torch.tensor([[self.tokenizer.eos_token_id]])
            torch.manual_seed(int(params["seed"]))
            sample = float(params["temperature"]) > 0
            with torch.no_grad():
                gen = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(params["max_new_tokens"]),
                                          do_sample=sample, pad_token_id=self.tokenizer.pad_token_id,
                                          **({"temperature": float(params["temperature"]), "top_k": 0} if sample else {}))
            out.append(self.tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
        return pd.DataFrame({"prompt": prompts, "generated": out})


mlflow.models.set_model(TextGenerator())
