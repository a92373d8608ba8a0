"""Gradient-norm-preserving, 1-Lipschitz activations: GroupSort, its pairwise case MinMax, and the
HouseHolder activation that generalises MinMax (Singla et al., 2022)."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["GroupSort", "HouseHolder", "MinMax"]


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


class HouseHolder(nn.Module):
    """Each channel pair ``z = (a, b)`` is kept if ``v . z > 0``, else reflected: ``z - 2 (v . z) v``.

    ``v = (cos theta, sin theta)`` is a learned unit vector per pair. Both pieces are isometries and
    they agree on the hyperplane ``v . z = 0`` (the reflection fixes it), so the map is continuous,
    piecewise isometric and hence 1-Lipschitz. The initial ``theta = 3 pi / 4`` is MinMax:
    ``v ~ (-1, 1)`` reflects (swaps) exactly the pairs with ``a > b``.
    """

    def __init__(self, channels: int, dim: int = 1) -> None:
        super().__init__()
        if channels % 2:
            raise ValueError(f"HouseHolder acts on channel pairs; {channels} channels is odd")
        self.dim = dim
        self.theta = nn.Parameter(torch.full((channels // 2,), 3 * math.pi / 4))  # MinMax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = self.dim % x.dim()
        size = _check_divisible(x, dim, 2, "HouseHolder")
        a, b = x.unflatten(dim, (size // 2, 2)).unbind(dim + 1)
        shape = [1] * a.dim()
        shape[dim] = -1
        c, s = self.theta.cos().view(shape), self.theta.sin().view(shape)
        dot = (a * c + b * s).clamp_max(0)  # reflect only where v . z <= 0
        return torch.stack((a - 2 * dot * c, b - 2 * dot * s), dim + 1).flatten(dim, dim + 1)

    def extra_repr(self) -> str:
        return f"channels={2 * self.theta.numel()}, dim={self.dim}"
