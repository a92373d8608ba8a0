"""The conventional (nonlinear) residual block used as the LiResNet paper's baseline (App. D)."""

from __future__ import annotations

import torch
from torch import nn

from .activations import MinMax

__all__ = ["ResNetBlock"]


class ResNetBlock(nn.Module):
    """``y = x + beta * Conv(MinMax(Conv(x)))`` with a per-channel ``beta`` initialised to zero.

    Its branch is nonlinear, so a bound can only add the branch's constant to the skip's
    (``1 + max|beta| ||Conv|| ||Conv||``): the looseness LiResNet removes.
    """

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.channels = channels
        self.conv1 = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.act = MinMax()
        self.conv2 = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act(self.conv1(x))) * self.beta.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"
