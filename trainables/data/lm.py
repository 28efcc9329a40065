"""Text for a causal language model, tokenized once into the cache.

Two forms, decided by the columns `dataset.root` has:

- **plain text**: a .txt file, a folder of .txt files, or a .csv/.tsv/.jsonl table's `text_column`.
  Every document is tokenized, ended with the tokenizer's end-of-text token, and the stream is
  packed into blocks of `max_length` tokens (the remainder shorter than a block is dropped), as
  Hugging Face's run_clm groups texts. Every token is a target.
- **prompt/response pairs**: a table with `prompt_column` and `response_column`. Each row is one
  example, `prompt + response + eos`, truncated to `max_length` and right-padded; the labels of the
  prompt and of the padding are -100 (PyTorch's ignore_index), so the loss and the metrics count
  response tokens only.

The splits are carved here, seeded by `split_seed`: blocks (or pairs) are shuffled once and the
first `test_fraction` become test, the next `val_fraction` val. Inputs are int32 ids (N,
max_length), labels int64 (N, max_length), aligned with the inputs (the model's logits at position
i are scored against the label at i + 1: trainables.losses.tokens shifts).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from trainables.atomic import atomic_path
from trainables.data.images import RawData
from trainables.data.text import TABLES, _files_digest, _read_table
from trainables.hf_files import load_tokenizer
from trainables.registry import ConfigError, missing

log = logging.getLogger(__name__)

FORMAT = 1  # bump when packing changes: old caches are then ignored
IGNORE = -100  # the label of a token nothing is scored against (prompt, padding)


def _documents(root: Path, text_column: str) -> tuple[list[str], list[Path]]:
    """The documents of plain text at `root`, and the files to key the cache on."""
    if root.is_file() and root.suffix == ".txt":
        return [root.read_text(encoding="utf-8", errors="replace")], [root]
    if root.is_file() and root.suffix in TABLES:
        return _read_table(root, text_column, None)[0], [root]
    if root.is_dir():
        files = sorted(root.rglob("*.txt"))
        if not files:
            raise ConfigError(f"`dataset.root` {root} holds no .txt files: give a .txt file, a folder of them, or a .csv/.tsv/.jsonl table")
        return [f.read_text(encoding="utf-8", errors="replace") for f in files], files
    if not root.exists():
        raise ConfigError(f"`dataset.root` {missing(str(root), 'a .txt file, a folder of .txt files or a .csv/.tsv/.jsonl table')}")
    raise ConfigError(f"`dataset.root` must be a .txt, .csv, .tsv or .jsonl file (or a folder of .txt files), but got {root.name!r}")


def _eos(tok) -> int:
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    if eos is None:
        raise ConfigError("`dataset.tokenizer` has no end-of-text token (eos_token): set tokenizer.eos_token and save it again")
    return int(eos)


def pack(tok, documents: list[str], max_length: int) -> np.ndarray:
    """Documents tokenized, each ended with eos, concatenated and cut into (N, max_length) blocks."""
    eos = _eos(tok)
    stream: list[int] = []
    for ids in tok(documents, add_special_tokens=False)["input_ids"]:
        stream += ids + [eos]
    n = len(stream) // max_length
    if n < 3:
        raise ConfigError(f"`dataset.root` holds {len(stream)} tokens, fewer than the 3 blocks of dataset.max_length={max_length} tokens a "
                          "train, val and test split need: give more text or lower dataset.max_length")
    return np.asarray(stream[: n * max_length], dtype=np.int32).reshape(n, max_length)


def pairs(tok, prompts: list[str], responses: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, labels) of prompt + response + eos per row, truncated to `max_length`, right-padded;
    labels -100 on the prompt and the padding. Rows whose response is truncated away are dropped."""
    eos, pad = _eos(tok), int(tok.pad_token_id)
    p_ids = tok(prompts, add_special_tokens=False)["input_ids"]
    r_ids = tok(responses, add_special_tokens=False)["input_ids"]
    ids = np.full((len(prompts), max_length), pad, dtype=np.int32)
    labels = np.full((len(prompts), max_length), IGNORE, dtype=np.int64)
    keep = []
    for i, (p, r) in enumerate(zip(p_ids, r_ids)):
        seq = (p + r + [eos])[:max_length]
        if len(seq) - max(len(p), 1) < 1:
            continue  # no response token left to score (position 0 is never predicted)
        ids[i, : len(seq)] = seq
        labels[i, len(p) : len(seq)] = seq[len(p) :]
        labels[i, 0] = IGNORE  # position 0 is never predicted
        keep.append(i)
    if not keep:
        raise ConfigError(f"`dataset.max_length` {max_length} truncates every response away (the prompts are as long): raise "
                          "dataset.max_length or shorten the prompts")
    return ids[keep], labels[keep]


def tokenize_lm(root: str | Path, cache: str | Path, tokenizer: str, max_length: int, text_column: str = "text",
                prompt_column: str | None = None, response_column: str | None = None, val_fraction: float = 0.1,
                test_fraction: float = 0.1, split_seed: int = 0) -> RawData:
    """RawData of the text at `root` for a causal LM (the module's docstring), tokenized at most
    once per (files, tokenizer, max_length, columns, carve); every split is memory-mapped after."""
    root = Path(root).expanduser()
    if (prompt_column is None) != (response_column is None):
        raise ConfigError("`dataset.kwargs.prompt_column` and `dataset.kwargs.response_column` go together: give both (pairs) or "
                          "neither (plain text)")
    if prompt_column is not None and not (root.is_file() and root.suffix in TABLES):
        raise ConfigError(f"`dataset.root` must be a .csv/.tsv/.jsonl table for prompt/response pairs, but got {str(root)!r}")
    tok_dir = Path(tokenizer)
    tok = load_tokenizer(tokenizer)
    carve = {"val_fraction": val_fraction, "test_fraction": test_fraction, "split_seed": split_seed}
    files = [root] if root.is_file() else sorted(root.rglob("*.txt")) if root.is_dir() else []
    h = hashlib.sha256(json.dumps({"format": FORMAT, "max_length": max_length, "text": text_column, "prompt": prompt_column,
                                   "response": response_column, "root": str(root.resolve()), "carve": carve}, sort_keys=True).encode())
    _files_digest(files, h)
    _files_digest([f for f in tok_dir.iterdir() if f.is_file()], h)
    out_dir = Path(cache) / "lm" / f"{root.stem}-{h.hexdigest()[:20]}"
    t0 = time.perf_counter()
    if not (out_dir / "meta.json").exists():
        if prompt_column is not None:
            ids, labels = pairs(tok, *_read_columns(root, prompt_column, response_column), max_length)
        else:
            ids = pack(tok, _documents(root, text_column)[0], max_length)
            labels = ids.astype(np.int64)
            labels[:, 0] = IGNORE  # position 0 is never predicted
        n = len(ids)
        if n < 3:
            raise ConfigError(f"`dataset.root` gives {n} examples, fewer than the 3 a train, val and test split need: give more rows")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed)).numpy()
        n_test = max(1, round(n * test_fraction)) if test_fraction else 0
        n_val = max(1, round(n * val_fraction))
        if n - n_test - n_val < 1:
            raise ConfigError(f"`dataset.val_fraction` and `dataset.test_fraction` leave no train examples of {n}: lower them or give more text")
        parts = {"test": np.sort(order[:n_test]), "val": np.sort(order[n_test : n_test + n_val]), "train": np.sort(order[n_test + n_val :])}
        out_dir.mkdir(parents=True, exist_ok=True)
        for split, idx in parts.items():
            for name, arr in (("x", ids[idx]), ("y", labels[idx])):
                with atomic_path(out_dir / f"{split}_{name}.npy") as tmp:
                    with open(tmp, "wb") as f:
                        np.save(f, arr)
        with atomic_path(out_dir / "meta.json") as tmp:  # written last: its presence means complete
            tmp.write_text(json.dumps({"root": str(root), "tokenizer": str(tok_dir), "max_length": max_length, "vocab": len(tok),
                                       "pad_token_id": int(tok.pad_token_id), "pairs": prompt_column is not None,
                                       "tokens": {s: int((labels[i] != IGNORE).sum()) for s, i in parts.items()}}, indent=2))
        decode_s = time.perf_counter() - t0
        log.info("tokenized %s for a causal LM: %d examples of %d tokens in %.1f s -> %s", root, n, max_length, decode_s, out_dir)
    else:
        decode_s = 0.0
    meta = json.loads((out_dir / "meta.json").read_text())

    def load(split: str):
        return (torch.from_numpy(np.load(out_dir / f"{split}_x.npy", mmap_mode="c")), torch.from_numpy(np.load(out_dir / f"{split}_y.npy")))

    (train_x, train_y), (val_x, val_y), (test_x, test_y) = (load(s) for s in ("train", "val", "test"))
    return RawData(train_x, train_y, test_x, test_y, val_x, val_y, decode_s=decode_s, pad_id=meta["pad_token_id"], n_classes=meta["vocab"])


def _read_columns(path: Path, prompt_column: str, response_column: str) -> tuple[list[str], list[str]]:
    columns = []
    for key, column in (("prompt_column", prompt_column), ("response_column", response_column)):
        try:
            columns.append(_read_table(path, column, None)[0])
        except ConfigError as e:
            raise ConfigError(str(e).replace("dataset.kwargs.text_column", f"dataset.kwargs.{key}")) from None
    return columns[0], columns[1]


def prompts_of(splits, split: str, tokenizer, n: int, tokens: int = 8) -> list[str]:
    """The first `n` prompts of a split as text: a pair's prompt (its tokens before the first
    scored one), or a block's first `tokens` tokens."""
    out = []
    for ids, labels in zip(getattr(splits, f"{split}_x")[:n].tolist(), getattr(splits, f"{split}_y")[:n].tolist()):
        scored = [i for i, v in enumerate(labels) if v != IGNORE]
        end = scored[0] if scored and scored[0] > 1 else tokens
        out.append(tokenizer.decode(ids[:end], skip_special_tokens=True))
    return out
