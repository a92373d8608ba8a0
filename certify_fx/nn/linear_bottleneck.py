"""A LiResNet block kept in factored form: ``shortcut(x) + conv_k(...conv_1(x))`` with no activation inside."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["LinearBottleneck"]


class LinearBottleneck(nn.Module):
    """``y = x + branch(x)`` (or ``shortcut(x) + branch(x)``) where ``branch`` is a chain of
    convolutions without activations.

    The linear form of a residual block whose convs are kept as they are: a bottleneck ``1x1 ->
    3x3 -> 1x1`` (composed into one full-width 3x3 conv it would have about 6 times the parameters:
    resnet50 25.6M -> 158M), a basic block's two 3x3 convs (18 c^2 weights, 25 c^2 composed into a
    5x5), or a downsampling block with its projection ``shortcut``. Kept factored, the block has the
    source's parameters and trains faster, while its bound is the same: the bound compiler folds the
    chain into one conv exactly where nothing pads between its convs (the conversion puts all the
    padding on the first), adds the shortcut (or the identity tap) and bounds ``y`` as that one
    conv, not as ``1 + ||branch||``.

    Args:
        convs: the branch's convolutions, in order (BatchNorm already folded into them).
        shortcut: a linear map of ``x`` with the branch's output shape (a strided 1x1 conv); None
            for the identity.
    """

    def __init__(self, convs: Sequence[nn.Conv2d], shortcut: nn.Module | None = None) -> None:
        super().__init__()
        self.branch = nn.Sequential(*convs)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x if self.shortcut is None else self.shortcut(x)) + self.branch(x)

    def extra_repr(self) -> str:
        kernels = "->".join(f"{c.kernel_size[0]}x{c.kernel_size[1]}" for c in self.branch)
        return f"channels={self.branch[0].in_channels}, branch={kernels}"
