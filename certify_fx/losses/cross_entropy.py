"""Plain cross-entropy with the common loss signature (the non-robust baseline)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, margin: torch.Tensor | None = None,
                  eps: float = 0.0, label_smoothing: float = 0.0) -> torch.Tensor:
    """``CE(f, y)``; ``margin`` and ``eps`` are ignored (standard training)."""
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
