"""Your own text: a CSV/TSV/JSONL file (or one per split), a folder of `.txt` files per class, or a
Hugging Face `datasets` folder (`save_to_disk`), tokenized once.

Tokenized on the first load (the driver's data check, before Ray starts) into the cache under a key
of the source files (names, sizes, mtimes), the tokenizer's files and `max_length`; every later
load (the teacher, the teacher cache, every trial, the next sweep) memory-maps the token ids. Ids
are int32 (N, max_length), padded on the right with the tokenizer's pad id: a model's attention
mask is `ids != pad_id` (trainables.models.hf), so nothing else is stored.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainables.atomic import atomic_path
from trainables.data.images import SPLITS, RawData, stratified_split
from trainables.hf_files import load_tokenizer
from trainables.registry import ConfigError, missing

log = logging.getLogger(__name__)

FORMAT = 1  # bump when tokenization changes: old caches are then ignored
TABLES = {".csv": ",", ".tsv": "\t", ".jsonl": None, ".json": None}
#: Files a split may be given as in a folder: train.csv, val.tsv, validation.jsonl, test.csv ...
SPLIT_NAMES = {"train": ("train",), "val": ("val", "validation", "dev"), "test": ("test",)}
def _files_digest(paths: list[Path], h) -> None:
    for f in sorted(paths):
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())


def _source(root: Path) -> tuple[str, dict[str, Any], list[Path]]:
    """(kind, split -> where, files to key the cache on) for what `dataset.root` holds."""
    if root.is_file():
        if root.suffix not in TABLES:
            raise ConfigError(f"`dataset.root` must be a .csv, .tsv or .jsonl file (or a folder), but got {root.name!r}")
        return "table", {"train": root}, [root]
    if not root.is_dir():
        raise ConfigError(f"`dataset.root` {missing(str(root), 'a .csv/.tsv/.jsonl file or a folder of text')}")
    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        return "datasets", {}, [f for f in root.rglob("*") if f.is_file()]
    tables = {}
    for split, names in SPLIT_NAMES.items():
        for name in names:
            for suffix in TABLES:
                if (root / f"{name}{suffix}").is_file():
                    tables.setdefault(split, root / f"{name}{suffix}")
    if tables:
        if "train" not in tables:
            raise ConfigError(f"`dataset.root` {root} has {sorted(tables)} files but no train.csv/.tsv/.jsonl: add the train split")
        return "table", tables, list(tables.values())
    base = root / "train" if (root / "train").is_dir() else root
    classes = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ConfigError(f"`dataset.root` {root} holds no train.csv/.tsv/.jsonl, no save_to_disk dataset and no class folders of .txt "
                          "files: see docs/data.md#text")
    splits = {"train": base} if base == root else {s: root / s for s in SPLITS if (root / s).is_dir()}
    return "folders", splits, [f for d in splits.values() for f in d.rglob("*.txt")]


def _read_table(path: Path, text_column: str, label_column: str | None, field: str = "dataset.root") -> tuple[list[str], list[Any]]:
    """A table's texts and labels (label_column None: texts alone, labels None)."""
    rows: list[dict[str, Any]] = []
    if TABLES[path.suffix] is None:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ConfigError(f"`{field}` {path.name} line {n} is not JSON ({e.msg}): one JSON object per line") from None
        columns = sorted({k for r in rows for k in r}) if rows else []
    else:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter=TABLES[path.suffix])
            rows = list(reader)
            columns = list(reader.fieldnames or [])
    if not rows:
        raise ConfigError(f"`{field}` {path} has no examples: give it a header row and one row per example")
    for key, col in (("text_column", text_column), ("label_column", label_column)):
        if col is not None and col not in columns:
            raise ConfigError(f"`dataset.kwargs.{key}` {col!r} is not a column of {path.name} (columns: {columns}): set dataset.kwargs.{key}")
    texts = [r.get(text_column) for r in rows]
    if any(not isinstance(t, str) for t in texts):
        n = next(i for i, t in enumerate(texts) if not isinstance(t, str))
        raise ConfigError(f"`dataset.kwargs.text_column` {text_column!r} of {path.name} row {n + 1} is not text ({texts[n]!r})")
    return texts, [r.get(label_column) for r in rows] if label_column is not None else [None] * len(rows)


def _read_folders(split_dir: Path) -> tuple[list[str], list[Any]]:
    texts, labels = [], []
    for c in sorted(d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith(".")):
        for f in sorted(c.rglob("*.txt")):
            texts.append(f.read_text(encoding="utf-8", errors="replace"))
            labels.append(c.name)
    return texts, labels


def _read_datasets(root: Path, text_column: str, label_column: str) -> tuple[dict[str, tuple[list[str], list[Any]]], list[str] | None]:
    """A `save_to_disk` folder: a DatasetDict (train / validation / test) or one Dataset (train).
    Class names from a ClassLabel feature, when the labels have one."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(root))
    except Exception as e:
        raise ConfigError(f"`dataset.root` {root} cannot be read by datasets.load_from_disk ({type(e).__name__}): save it with save_to_disk") from None
    parts = dict(ds) if isinstance(ds, datasets.DatasetDict) else {"train": ds}
    out, names = {}, None
    for split, aliases in SPLIT_NAMES.items():
        d = next((parts[a] for a in aliases if a in parts), None)
        if d is None:
            continue
        for key, col in (("text_column", text_column), ("label_column", label_column)):
            if col not in d.column_names:
                raise ConfigError(f"`dataset.kwargs.{key}` {col!r} is not a column of the {split} split (columns: {d.column_names}): "
                                  f"set dataset.kwargs.{key}")
        feature = d.features[label_column]
        if isinstance(feature, datasets.ClassLabel):
            names = list(feature.names)
        out[split] = (list(d[text_column]), list(d[label_column]))
    if "train" not in out:
        raise ConfigError(f"`dataset.root` {root} has splits {sorted(parts)} but no train split: save a DatasetDict with a train split")
    return out, names


def wordpiece_tokenizer(root: str | Path, cache: str | Path, vocab_size: int, lowercase: bool = True, text_column: str = "text",
                        label_column: str = "label") -> str:
    """A BERT WordPiece tokenizer trained on the train texts at `root`, saved (save_pretrained) in the
    cache under a key of the files and the settings; trained once, its folder returned after."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    root = Path(root).expanduser()
    kind, where, files = _source(root)
    h = hashlib.sha256(json.dumps({"format": FORMAT, "vocab_size": vocab_size, "lowercase": lowercase, "text": text_column,
                                   "root": str(root.resolve())}, sort_keys=True).encode())
    _files_digest(files, h)
    out = Path(cache) / "data" / "tokenizers" / f"{root.stem}-wordpiece-{h.hexdigest()[:20]}"
    if not (out / "tokenizer.json").is_file():
        if kind == "datasets":
            texts = _read_datasets(root, text_column, label_column)[0]["train"][0]
        elif kind == "table":
            texts = _read_table(where["train"], text_column, label_column)[0]
        else:
            texts = _read_folders(where["train"])[0]
        wp = BertWordPieceTokenizer(lowercase=lowercase)
        wp.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, show_progress=False)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        wp.save_model(str(tmp))
        BertTokenizerFast(str(tmp / "vocab.txt"), do_lower_case=lowercase).save_pretrained(str(tmp))
        try:
            os.replace(tmp, out)  # a reader sees the whole folder or none
        except OSError:  # another process put it in place first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        log.info("trained a WordPiece tokenizer (%d tokens) on %d texts of %s -> %s", vocab_size, len(texts), root, out)
    return str(out)


def _classes(splits: dict[str, tuple[list[str], list[Any]]], names: list[str] | None) -> tuple[list[str], dict[str, list[int]]]:
    """Class names (sorted; numbers numerically, or a ClassLabel's names) and each split's label indices."""
    if names is not None:
        return names, {s: [int(v) for v in labels] for s, (_, labels) in splits.items()}
    train = {str(v) for v in splits["train"][1] if v is not None and str(v) != ""}
    numeric = all(v.lstrip("-").isdigit() for v in train)
    classes = sorted(train, key=int if numeric else str)
    index = {c: i for i, c in enumerate(classes)}
    out = {}
    for split, (_, labels) in splits.items():
        missing = next((v for v in labels if str(v) not in index), None) if split != "train" else None
        if split == "train" and any(v is None or str(v) == "" for v in labels):
            raise ConfigError("`dataset.kwargs.label_column` has empty labels in the train split: give every example a label")
        if missing is not None:
            raise ConfigError(f"`dataset.root` {split} split has label {missing!r} that train lacks: every val/test label must occur in train")
        out[split] = [index[str(v)] for v in labels]
    return classes, out


def token_ids(tok, strings: list[str], max_length: int) -> np.ndarray:
    """Texts as int32 ids (N, max_length), truncated and right-padded: one tokenization for the
    labelled splits and the unlabelled examples alike."""
    enc = tok(strings, truncation=True, max_length=max_length, padding="max_length", return_attention_mask=False)
    return np.asarray(enc["input_ids"], dtype=np.int32).reshape(len(strings), max_length)


def tokenize_text(root: str | Path, cache: str | Path, tokenizer: str, max_length: int, text_column: str = "text",
                  label_column: str = "label", val_fraction: float = 0.1, test_fraction: float = 0.1, split_seed: int = 0) -> RawData:
    """The text at `root` as RawData of int32 token ids (N, max_length), tokenized at most once per
    (files, tokenizer, max_length, columns, carve). Absent val/test splits are carved here, as
    load_dataset carves arrays (stratified: test with split_seed, then val with split_seed + 1), so
    every split is memory-mapped; the val and test texts are kept too (the text corruption suite
    perturbs strings)."""
    root = Path(root).expanduser()
    kind, where, files = _source(root)
    tok_dir = Path(tokenizer)
    tok = load_tokenizer(tokenizer)
    carve = {"val_fraction": val_fraction, "test_fraction": test_fraction, "split_seed": split_seed}
    h = hashlib.sha256(json.dumps({"format": FORMAT, "max_length": max_length, "text": text_column, "label": label_column,
                                   "root": str(root.resolve()), "carve": carve}, sort_keys=True).encode())
    _files_digest(files, h)
    _files_digest([f for f in tok_dir.iterdir() if f.is_file()], h)
    out_dir = Path(cache) / "text" / f"{root.stem}-{h.hexdigest()[:20]}"
    t0 = time.perf_counter()
    if not (out_dir / "meta.json").exists():
        names = None
        if kind == "datasets":
            splits, names = _read_datasets(root, text_column, label_column)
        elif kind == "table":
            splits = {s: _read_table(p, text_column, label_column) for s, p in where.items()}
        else:
            splits = {s: _read_folders(d) for s, d in where.items()}
        if not splits["train"][0]:
            raise ConfigError(f"`dataset.root` {root} has no train examples")
        classes, labels = _classes(splits, names)
        texts = {s: t for s, (t, _) in splits.items()}
        for split, fraction, seed in (("test", test_fraction, split_seed), ("val", val_fraction, split_seed + 1)):
            if split not in texts and fraction:
                kept, held = stratified_split(torch.tensor(labels["train"]), fraction, seed)
                for part in (texts, labels):
                    part[split] = [part["train"][i] for i in held.tolist()]
                    part["train"] = [part["train"][i] for i in kept.tolist()]
        out_dir.mkdir(parents=True, exist_ok=True)
        for split, strings in texts.items():
            ids = token_ids(tok, strings, max_length)
            for name, arr in (("x", ids), ("y", np.asarray(labels[split], dtype=np.int64))):
                with atomic_path(out_dir / f"{split}_{name}.npy") as tmp:
                    with open(tmp, "wb") as f:
                        np.save(f, arr)
            if split != "train":
                with atomic_path(out_dir / f"{split}_text.json") as tmp:
                    tmp.write_text(json.dumps(strings))
        with atomic_path(out_dir / "meta.json") as tmp:  # written last: its presence means complete
            tmp.write_text(json.dumps({"classes": classes, "splits": list(texts), "root": str(root), "tokenizer": str(tok_dir),
                                       "max_length": max_length, "pad_token_id": tok.pad_token_id}, indent=2))
        decode_s = time.perf_counter() - t0
        log.info("tokenized %s: %d texts in %.1f s -> %s", root, sum(len(t) for t in texts.values()), decode_s, out_dir)
    else:
        decode_s = 0.0
    meta = json.loads((out_dir / "meta.json").read_text())

    def load(split: str):
        if split not in meta["splits"]:
            return None, None
        return torch.from_numpy(np.load(out_dir / f"{split}_x.npy", mmap_mode="c")), torch.from_numpy(np.load(out_dir / f"{split}_y.npy"))

    (train_x, train_y), (val_x, val_y), (test_x, test_y) = (load(s) for s in SPLITS)
    strings = {s: json.loads((out_dir / f"{s}_text.json").read_text()) for s in ("val", "test") if (out_dir / f"{s}_text.json").is_file()}
    return RawData(train_x, train_y, test_x, test_y, val_x, val_y, tuple(meta["classes"]), [], decode_s, texts=strings,
                   pad_id=int(meta["pad_token_id"]))


def _unlabeled_texts(root: Path, text_column: str) -> tuple[list[str], list[Path]]:
    """`dataset.unlabeled.root`'s texts and the files they come from: a .txt file (one example per
    non-blank line), a table's text column, or a folder of .txt files (one example each)."""
    field = "dataset.unlabeled.root"
    what = "a .txt file (one text per line), a .csv/.tsv/.jsonl file with a text column, or a folder of .txt files"
    if not root.exists():
        raise ConfigError(f"`{field}` {missing(str(root), what)}")
    if root.is_file():
        if root.suffix == ".txt":
            return [line.strip() for line in root.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()], [root]
        if root.suffix not in TABLES:
            raise ConfigError(f"`{field}` must be {what}, but got {root.name!r}")
        return _read_table(root, text_column, None, field)[0], [root]
    files = sorted(f for f in root.rglob("*.txt") if not any(p.startswith(".") for p in f.relative_to(root).parts))
    classes = sorted({f.relative_to(root).parts[0] for f in files if len(f.relative_to(root).parts) > 1})
    if len(classes) > 1:
        raise ConfigError(f"`{field}` has sub-folders {classes[:3]}{' ...' if len(classes) > 3 else ''} of .txt files, as labelled "
                          "class folders have: unlabelled text is one folder of .txt files (move them up, or use labels_kept)")
    return [t for t in (f.read_text(encoding="utf-8", errors="replace").strip() for f in files) if t], files


def tokenize_unlabeled(root: str | Path, cache: str | Path, tokenizer: str, max_length: int, text_column: str = "text") -> torch.Tensor:
    """`dataset.unlabeled.root` for text: its texts tokenized as the labelled ones are (the same
    tokenizer, truncation and padding to max_length) into int32 (N, max_length), at most once per
    (files, tokenizer, max_length, column); memory-mapped from the cache after that."""
    root = Path(root).expanduser()
    texts, files = _unlabeled_texts(root, text_column)
    if not texts:
        raise ConfigError(f"`dataset.unlabeled.root` {root} holds no text: point it at text without labels")
    h = hashlib.sha256(json.dumps({"format": FORMAT, "max_length": max_length, "text": text_column, "root": str(root.resolve())},
                                  sort_keys=True).encode())
    _files_digest(files, h)
    _files_digest([f for f in Path(tokenizer).iterdir() if f.is_file()], h)
    out = Path(cache) / "text" / f"{root.stem}-unlabeled-{h.hexdigest()[:20]}.npy"
    if not out.exists():
        t0 = time.perf_counter()
        ids = token_ids(load_tokenizer(tokenizer), texts, max_length)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, ids)
        log.info("tokenized %s: %d unlabelled texts in %.1f s -> %s", root, len(texts), time.perf_counter() - t0, out)
    return torch.from_numpy(np.load(out, mmap_mode="c"))
