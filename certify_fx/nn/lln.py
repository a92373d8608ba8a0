"""Last-layer normalisation (LLN) head (Singla et al., 2022)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LLNLinear"]


class LLNLinear(nn.Linear):
    """A linear classifier whose weight rows are normalised to unit l2 norm in every forward.

    Margins between classes then depend only on the angle between class directions, which keeps
    the margin Lipschitz constants ``||w_i - w_j||`` (<= 2) from growing during training.
    """

    def normalized_weight(self) -> torch.Tensor:
        return F.normalize(self.weight, dim=1, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.normalized_weight(), self.bias)
