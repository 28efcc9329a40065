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
