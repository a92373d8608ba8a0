"""The linear residual block of LiResNet (Hu et al., 2023)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LiResNetBlock"]


class LiResNetBlock(nn.Module):
    """``y = x + beta / sqrt(L) * Conv(x)``: a residual block whose branch is linear.

    The whole block is one convolution with kernel ``W' = Delta + beta / sqrt(L) * W`` (``Delta`` the
    identity kernel), so its Lipschitz constant is the exact norm of that single conv rather than
    the loose ``1 + ||branch||``. The nonlinearity (MinMax) goes *after* the block.

    Args:
        channels: input and output channels.
        num_blocks: ``L``, the depth of the backbone; the branch is scaled by ``1 / sqrt(L)``.
        kernel_size: odd kernel size, zero "same" padding.
    """

    def __init__(self, channels: int, num_blocks: int = 1, kernel_size: int = 3, bias: bool = True) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"LiResNetBlock needs an odd kernel_size for 'same' padding, got {kernel_size}")
        self.channels, self.num_blocks = channels, num_blocks
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, bias=bias)
        self.beta = nn.Parameter(torch.ones(channels))
        self.scale = 1.0 / math.sqrt(num_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) * (self.beta * self.scale).view(1, -1, 1, 1)

    def folded_weight(self) -> torch.Tensor:
        """The kernel of the single conv equal to the whole block (bias aside)."""
        w = self.conv.weight * (self.beta * self.scale).view(-1, 1, 1, 1)
        k = w.shape[-1] // 2
        eye = torch.eye(self.channels, dtype=w.dtype, device=w.device)
        return w + F.pad(eye[:, :, None, None], (k, k, k, k))

    def folded_bias(self) -> torch.Tensor | None:
        b = self.conv.bias
        return None if b is None else b * self.beta * self.scale

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_blocks={self.num_blocks}, kernel_size={self.conv.kernel_size[0]}"
