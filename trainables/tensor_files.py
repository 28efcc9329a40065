"""Reading tensor files safely, for data (arrays files) and weights alike: a leaf, so that data
and models share it without importing each other."""
from __future__ import annotations

from pathlib import Path

import torch


def load_tensor_file(path: str | Path):
    """What a tensor file holds, never unpickling anything but tensors and plain containers:
    `.safetensors` via safetensors, `.npz` via numpy (allow_pickle=False), else torch.load(weights_only=True).
    Raises whatever the reader raises on a foreign or truncated file."""
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    if p.suffix == ".npz":
        import numpy as np

        with np.load(p, allow_pickle=False) as z:
            return {k: torch.from_numpy(z[k]) for k in z.files}
    return torch.load(p, map_location="cpu", weights_only=True)


def untied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict as safetensors takes it: contiguous CPU tensors, one name per shared storage
    (a causal LM's output head tied to its embeddings: the first name is kept; `retied` restores)."""
    out, seen = {}, set()
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.numel() else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        out[k] = v.detach().cpu().contiguous()
    return out


def retied(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with the names `untied` left out put back from the tensors `model` ties them to."""
    own = model.state_dict()
    groups: dict[tuple, list[str]] = {}
    for k, v in own.items():
        if v.numel():
            groups.setdefault((v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)), []).append(k)
    out = dict(state)
    for names in groups.values():
        present = [n for n in names if n in out]
        for n in names:
            if n not in out and present:
                out[n] = out[present[0]]
    return out
