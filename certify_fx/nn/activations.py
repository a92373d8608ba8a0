"""Gradient-norm-preserving, 1-Lipschitz activations: GroupSort and its pairwise case MinMax."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["GroupSort", "MinMax"]


def _check_divisible(x: torch.Tensor, dim: int, group_size: int, name: str) -> int:
    size = x.shape[dim]
    if size % group_size:
        raise ValueError(
            f"{name} sorts groups of {group_size} along dim {dim}, but that dim has {size} entries "
            f"(not divisible by {group_size}); use an even channel count"
        )
    return size


class GroupSort(nn.Module):
    """Sort each consecutive group of ``group_size`` entries along ``dim`` (Anil et al., 2019).

    A permutation of coordinates per input, so it is 1-Lipschitz in l2 and preserves gradient norm.
    ``dim=1`` sorts over channels of (N, C, ...) tensors; use ``dim=-1`` for tokens (N, T, D).
    """

    def __init__(self, group_size: int = 2, dim: int = 1) -> None:
        super().__init__()
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.group_size, self.dim = group_size, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = self.dim % x.dim()
        size = _check_divisible(x, dim, self.group_size, type(self).__name__)
        grouped = x.unflatten(dim, (size // self.group_size, self.group_size))
        return grouped.sort(dim=dim + 1).values.flatten(dim, dim + 1)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, dim={self.dim}"


class MinMax(GroupSort):
    """GroupSort with groups of two: each channel pair ``(a, b)`` becomes ``(min, max)``."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__(group_size=2, dim=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = self.dim % x.dim()
        size = _check_divisible(x, dim, 2, "MinMax")
        a, b = x.unflatten(dim, (size // 2, 2)).unbind(dim + 1)
        return torch.stack((torch.minimum(a, b), torch.maximum(a, b)), dim + 1).flatten(dim, dim + 1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
