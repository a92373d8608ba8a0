"""Per-channel affine map: BatchNorm's affine part without the statistics (normalisation-free nets)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Affine"]


class Affine(nn.Module):
    """``y = weight * x + bias`` with one weight and bias per entry of ``dim``.

    Its Lipschitz constant is ``max |weight|``; the bound compiler folds it into a neighbouring
    conv or dense layer when there is one.
    """

    def __init__(self, num_features: int, dim: int = 1, bias: bool = True) -> None:
        super().__init__()
        self.num_features, self.dim = num_features, dim
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features)) if bias else None

    def _view(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        shape = [1] * ndim
        shape[self.dim % ndim] = -1
        return t.view(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * self._view(self.weight, x.dim())
        return y + self._view(self.bias, x.dim()) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"{self.num_features}, dim={self.dim}, bias={self.bias is not None}"
