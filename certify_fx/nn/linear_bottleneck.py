"""A LiResNet block kept in factored form: ``x + conv_k(...conv_1(x))`` with no activation inside."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["LinearBottleneck"]


class LinearBottleneck(nn.Module):
    """``y = x + branch(x)`` where ``branch`` is a chain of convolutions without activations.

    The linear form of a bottleneck ``1x1 -> 3x3 -> 1x1`` residual block. Composing the branch into
    one full-width 3x3 conv (:class:`LiResNetBlock`) multiplies its parameters by about 6 (resnet50:
    25.6M -> 158M); kept factored, the block has the original parameter count and trains faster,
    while its bound is the same: the bound compiler folds pointwise convs into their neighbour
    exactly, so ``x + branch(x)`` is bounded as one conv (identity tap included), not as
    ``1 + ||branch||``.

    Args:
        convs: the branch's convolutions, in order (BatchNorm already folded into them).
    """

    def __init__(self, convs: Sequence[nn.Conv2d]) -> None:
        super().__init__()
        self.branch = nn.Sequential(*convs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)

    def extra_repr(self) -> str:
        kernels = "->".join(f"{c.kernel_size[0]}x{c.kernel_size[1]}" for c in self.branch)
        return f"channels={self.branch[0].in_channels}, branch={kernels}"
