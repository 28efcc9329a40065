"""Pretrained weights from local files (no machine here reaches a model hub).

A weights file is a state_dict: `.pth`/`.pt` read with `torch.load(weights_only=True)` (never
unpickled), or `.safetensors`. A checkpoint dict holding the state_dict under `state_dict` or
`model` is accepted too, and DDP's `module.` prefix is dropped. When only the classifier head's
shapes differ (an ImageNet file, 1000 classes, for a 10-class dataset), the backbone is loaded and
the head keeps its fresh initialization: the caller fine-tunes it.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import torch.nn as nn
from torch import Tensor

from trainables.registry import ConfigError, missing
from trainables.tensor_files import load_tensor_file

SUFFIXES = (".pth", ".pt", ".safetensors")
#: Keys shown in an error before "...".
SHOW = 4


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@functools.cache
def _cached_sha(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def weights_sha256(path: str | Path) -> str:
    """The file's sha256, computed once per (path, size, mtime) in this process (cache keys ask often).
    A Hugging Face checkpoint folder's: of its config and safetensors files' hashes."""
    if os.path.isdir(path):
        parts = [f"{f.name}:{weights_sha256(f)}" for f in sorted(Path(path).iterdir()) if f.suffix == ".safetensors" or f.name == "config.json"]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()
    st = os.stat(path)
    return _cached_sha(os.path.abspath(path), st.st_size, st.st_mtime_ns)


def check_weights_path(path: str) -> str:
    """ValueError (for pydantic, which names the field) unless `path` is an existing file with a
    weights suffix, or a Hugging Face checkpoint folder; returns it absolute. Nothing is downloaded:
    a hub name says how to point at a local copy."""
    p = Path(path).expanduser()
    if p.is_dir():
        from trainables.models.hf import check_checkpoint

        return check_checkpoint(path)
    from trainables.hf_files import hub_name

    if not p.exists() and not hub_name(path):
        raise ValueError(missing(path, f"a state_dict file ({', '.join(SUFFIXES)}) or a Hugging Face checkpoint folder"))
    if p.suffix not in SUFFIXES and hub_name(path):
        raise ValueError(f"{path!r} is no file or folder here (a Hugging Face hub name?): nothing is downloaded; save the model with "
                         "save_pretrained(DIR) where you have it, copy DIR here and point at it")
    if p.suffix not in SUFFIXES:
        raise ValueError(f"must be a state_dict file ({', '.join(SUFFIXES)}), but got {path!r}")
    if not p.is_file():
        raise ValueError(f"must be an existing file, but got {path!r}: fix the path")
    return str(p.resolve())


def read_weights(path: str | Path, field: str) -> dict[str, Tensor]:
    """The file's tensors by name; anything that is not a tensor file is a one-line ConfigError."""
    try:
        state = load_tensor_file(path)
    except Exception as e:  # torch and safetensors raise many types for foreign or truncated files
        raise ConfigError(f"`{field}` {str(path)!r} is not a tensor file ({type(e).__name__}): save it with "
                          "torch.save(model.state_dict(), path) or safetensors") from None
    if isinstance(state, dict) and not any(isinstance(v, Tensor) for v in state.values()):
        state = next((state[k] for k in ("state_dict", "model") if isinstance(state.get(k), dict)), state)
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ConfigError(f"`{field}` {str(path)!r} holds no state_dict (a mapping of names to tensors): "
                          "save it with torch.save(model.state_dict(), path)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def head_names(model: nn.Module) -> tuple[str, ...]:
    """The classifier head(s), which a file of another class count leaves new: the modules a timm
    model's pretrained_cfg names as its classifier (`fc`, `head.fc`, `classifier`, `head`; `head` and
    `head_dist` for distilled ViTs, whose last Linear alone is not the head), else the last nn.Linear
    (torchvision's fc, classifier.N, heads.head...)."""
    modules = dict(model.named_modules())
    for prefix, m in modules.items():  # the model itself, or the timm network inside a TimmModel
        cfg = getattr(m, "pretrained_cfg", None)
        named = cfg.get("classifier") if isinstance(cfg, dict) else None
        if named:
            heads = [f"{prefix}.{h}" if prefix else h for h in ((named,) if isinstance(named, str) else named)]
            heads = [h for h in heads if h in modules and any(True for _ in modules[h].parameters())]
            if heads:
                return tuple(heads)
            break
    linears = [name for name, m in modules.items() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear head: its weights cannot be given a new head")
    return (linears[-1],)


def _target(model: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """The module the file was saved from: the model itself, or the library's network inside a
    ZooModel or TimmModel (files from torchvision or timm name `fc.weight`, ours `net.fc.weight`)."""
    inner = model.tap_root() if hasattr(model, "tap_root") else model
    overlap = lambda m: len(state.keys() & m.state_dict().keys())  # noqa: E731
    return inner if overlap(inner) > overlap(model) else model


def _some(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:SHOW]) + (f", ... ({len(keys)} in all)" if len(keys) > SHOW else "")


def load_weights(model: nn.Module, path: str | Path, field: str, new_head_ok: bool) -> bool:
    """Load `path` into `model`; returns True when the head was left new because its shape differs.
    Missing, unexpected or mismatched keys elsewhere: a ConfigError listing the first few."""
    if os.path.isdir(path):
        from trainables.models.hf import load_checkpoint

        return load_checkpoint(model, path, field, new_head_ok)
    state = read_weights(path, field)
    target = _target(model, state)
    own = target.state_dict()
    missing = {k for k in own.keys() - state.keys() if not k.endswith("num_batches_tracked")}
    unexpected = state.keys() - own.keys()
    if missing or unexpected:
        what = "; ".join(p for p in (f"missing {_some(missing)}" if missing else "",
                                     f"unexpected {_some(unexpected)}" if unexpected else "") if p)
        raise ConfigError(f"`{field}` {str(path)!r} does not fit this architecture ({what}): use weights saved from the same architecture")
    shapes = {k for k in own.keys() & state.keys() if own[k].shape != state[k].shape}
    heads = head_names(target)
    head_keys = {k for k in own if k.startswith(tuple(h + "." for h in heads))}
    if shapes - head_keys:
        bad = sorted(shapes - head_keys)
        detail = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in bad[:SHOW])
        raise ConfigError(f"`{field}` {str(path)!r} has tensors of other shapes ({detail}{', ...' if len(bad) > SHOW else ''}): "
                          "use weights saved from the same architecture and input channels")
    if shapes and not new_head_ok:
        key = min(shapes, key=lambda k: (not k.endswith(".weight"), k))
        raise ConfigError(f"`{field}` {str(path)!r} has a head of another class count ({key} "
                          f"{tuple(state[key].shape)}, the dataset needs {tuple(own[key].shape)})")
    target.load_state_dict({k: v for k, v in state.items() if k not in shapes}, strict=not shapes)
    return bool(shapes)


def freeze_backbone(model: nn.Module) -> list[str]:
    """Train only the head: every other parameter gets requires_grad=False. Returns the trainable names.
    BatchNorm statistics still adapt to the new data (the modules stay in train mode)."""
    target = model.tap_root() if hasattr(model, "tap_root") else model
    trainable = {id(p) for h in head_names(target) for p in target.get_submodule(h).parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    return [n for n, p in model.named_parameters() if p.requires_grad]
