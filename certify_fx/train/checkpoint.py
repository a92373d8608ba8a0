"""Training checkpoints: plain tensors and data only, written atomically, loaded without pickle code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..files import atomic_torch_save
from ..weights import CHECKPOINT_FORMAT, CONVERTED_FORMAT, read_torch_file

__all__ = ["CHECKPOINT_FORMAT", "load_checkpoint", "save_checkpoint"]

_REQUIRED = ("recipe", "epoch", "model", "bound", "optimizer", "history")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (a temporary file renamed over it): a crash leaves
    the previous checkpoint intact, never a half-written one."""
    return atomic_torch_save({"format": CHECKPOINT_FORMAT, "version": 1, **state}, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)`` (an untrusted file cannot run code).

    Raises:
        CheckpointError: missing, truncated, corrupt, or not a certify-fx training checkpoint.
    """
    state = read_torch_file(path, map_location)
    if isinstance(state, dict) and state.get("format") == CONVERTED_FORMAT:
        raise CheckpointError(f"{path} is a converted model (certify-fx convert -o), not a training checkpoint; "
                              "train it with a recipe whose model.checkpoint names it")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a certify-fx training checkpoint (no {CHECKPOINT_FORMAT!r} format tag)")
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    return state
