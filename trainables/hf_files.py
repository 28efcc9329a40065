"""Hugging Face folders on this machine: a tokenizer or checkpoint is a local folder, never a
download nor remote code. A leaf that data (tokenizing) and models (building from a tokenizer,
loading a checkpoint) both read, so neither imports the other."""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from trainables.registry import ConfigError, missing


@functools.cache
def quiet() -> None:
    """transformers without its progress bars and load reports on the console (a sweep's output is
    its own); called before any model is built or loaded."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def hub_name(path: str) -> bool:
    """A name that is no path here but has a hub id's shape (`bert-base-uncased`, `org/model`):
    what a user means who expects a download."""
    p = Path(path).expanduser()
    return not p.exists() and not p.is_absolute() and path.count("/") <= 1 and not path.startswith(".")


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model")


def check_local_dir(path: str, field: str, what: str) -> Path:
    """`path` as an existing folder; a name that is no folder here (a hub id such as
    `bert-base-uncased`) is a one-line ConfigError saying how to point at a local copy."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p.resolve()
    if hub_name(path):
        raise ConfigError(f"`{field}` {path!r} is not a folder here (a Hugging Face hub name?): nothing is downloaded; save the {what} "
                          f"with save_pretrained(DIR) where you have it, copy DIR here and set {field}=DIR")
    raise ConfigError(f"`{field}` {missing(path, f'a folder ({what})')}")


@functools.lru_cache(maxsize=8)
def _tokenizer(path: str, mtime_ns: int):
    from transformers import AutoTokenizer

    quiet()
    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)


def has_tokenizer(path: str | Path) -> bool:
    """A folder with a tokenizer's files (a checkpoint saved with its tokenizer)."""
    return Path(path).is_dir() and any((Path(path) / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(path: str, field: str = "dataset.tokenizer"):
    """A tokenizer from a local folder (never downloaded, never remote code), one per folder per process."""
    p = check_local_dir(path, field, "tokenizer")
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"`{field}` {str(p)!r} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...): save one there with "
                          "tokenizer.save_pretrained(DIR), or set dataset.tokenizer to a folder that has one")
    try:
        tok = _tokenizer(str(p), max((p / f).stat().st_mtime_ns for f in os.listdir(p)))
    except Exception as e:  # transformers raises many types for foreign files
        raise ConfigError(f"`{field}` {str(p)!r} cannot be loaded as a tokenizer ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    if tok.pad_token_id is None:
        raise ConfigError(f"`{field}` {str(p)!r} tokenizer has no pad token: set one (tokenizer.pad_token = ...) and save it again")
    return tok


def tokenizer_info(path: str) -> dict[str, Any]:
    """What a model built for this tokenizer needs: its vocabulary size (with added tokens), pad id,
    and its begin/end-of-text ids where it has them (what a causal LM generates from and stops at)."""
    tok = load_tokenizer(path)
    ends = {k: int(v) for k, v in (("bos_token_id", tok.bos_token_id), ("eos_token_id", tok.eos_token_id)) if v is not None}
    return {"vocab_size": len(tok), "pad_token_id": int(tok.pad_token_id), **ends}
