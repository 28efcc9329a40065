"""A trial's checkpoint: one `state.pt` of tensors and plain types, written atomically and read
with torch.load(weights_only=True). What it holds, how it is written and how a resumed trial is put
back are defined here only (the loop, the Tune and Train reporters, and the driver, which logs a
finished trial's weights from it)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from trainables.atomic import atomic_path
from trainables.registry import ConfigError

STATE_FILE = "state.pt"


def load_state(path: str | Path) -> dict:
    """Load a checkpoint written by the loop: tensors and plain types only (weights_only=True)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise ConfigError(f"`checkpoint` {path} is corrupt or not a kdsweep checkpoint ({type(e).__name__}): delete it to start fresh") from None


def save_state(state: dict, directory: str | Path) -> None:
    """Write atomically, so a kill mid-save never leaves a half-written checkpoint."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    with atomic_path(d / STATE_FILE) as tmp:
        torch.save(state, tmp)


def snapshot(epoch: int, student: nn.Module, loss_fn: nn.Module, opt, sched, history: list[dict], tables: dict,
             mean, std) -> dict[str, Any]:
    """Everything a resumed trial needs to continue exactly, plus the final epoch's evaluation
    tables and the student's input statistics (for its card)."""
    return {"model": student.state_dict(), "loss": loss_fn.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "epoch": epoch, "rng_cpu": torch.get_rng_state(), "history": history, "eval": tables,
            "preprocess": {"mean": list(mean), "std": list(std)}}


def restore(state: dict, student: nn.Module, loss_fn: nn.Module, opt, sched) -> tuple[int, list[dict]]:
    """Put a snapshot back into the trial's objects; returns (epochs done, history)."""
    student.load_state_dict(state["model"])
    loss_fn.load_state_dict(state["loss"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    return state["epoch"], list(state["history"])
