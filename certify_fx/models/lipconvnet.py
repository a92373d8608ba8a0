"""LipConvnet-n (Singla & Feizi, 2022, Table 2): 1-Lipschitz by construction, from SOC layers.

A stem SOC (``in_chans -> width``) with MaxMin, then 5 LipBlocks; block ``b`` on ``q`` channels
runs ``n/5 - 1`` SOC + MaxMin layers, then a strided SOC (space-to-depth by 2, ``4q -> 4q``) and a
pooling that halves the channels (``max`` of channel pairs, or ``projection`` pooling), so every
block halves the resolution and doubles the channels: 32x32x32 -> ... -> 1024x1x1 on 32x32 inputs.
28x28 inputs are zero-padded to 32x32 first (an isometry). The head is an LLN linear layer (the
Lipschitz certificate) or a 1-hidden-layer softplus MLP (``head="mlp"``, the CRC-Lip certificate,
``certify(..., method="crc")``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import SOC, LLNLinear, MinMax, Normalize, ProjectionPool2d, SoftplusMLP
from ._classifier import TimmClassifier
from ._registry import register_family

__all__ = ["LipConvnet", "PairMax"]

#: Depths of the paper's family; each LipBlock has depth / 5 SOC layers.
DEPTHS = (5, 10, 15, 20, 25, 30, 35, 40)


class PairMax(nn.Module):
    """Halve the channels: the max of each adjacent channel pair (1-Lipschitz)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(1, (-1, 2)).amax(dim=2)


class LipConvnet(TimmClassifier):
    """LipConvnet-``depth``; see the module docstring.

    Args:
        depth: n, a multiple of 5.
        width: channels after the stem (32 in the paper; smaller for CPU runs).
        pool: ``"max"`` (the paper's baseline) or ``"projection"`` (projection pooling).
        train_terms, eval_terms: Taylor terms of every SOC in training and at evaluation.
        head: ``"lln"`` (LLN linear classifier) or ``"mlp"`` (:class:`SoftplusMLP`, for CRC-Lip).
        head_hidden: hidden width of the ``"mlp"`` head (the feature count if omitted).
        fast_gradients: every SOC uses the paper's faster kernel gradients (equation (5)).
    """

    def __init__(self, num_classes: int = 10, depth: int = 5, width: int = 32, in_chans: int = 3, img_size: int = 32,
                 pool: str = "max", train_terms: int = 6, eval_terms: int = 12, head: str = "lln",
                 head_hidden: int | None = None, fast_gradients: bool = False, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        super().__init__()
        if depth % 5 or depth < 5:
            raise ValueError(f"LipConvnet depth must be a multiple of 5, got {depth}")
        if img_size not in (28, 32):
            raise ValueError(f"LipConvnet is sized for 28x28 or 32x32 inputs, got {img_size}")
        if pool not in ("max", "projection"):
            raise ValueError(f"pool must be 'max' or 'projection', got {pool!r}")
        if head not in ("lln", "mlp"):
            raise ValueError(f"head must be 'lln' or 'mlp', got {head!r}")
        terms = dict(train_terms=train_terms, eval_terms=eval_terms, fast_gradients=fast_gradients)
        self.depth, self.pad = depth, (32 - img_size) // 2
        self.normalize = Normalize(mean or [0.0] * in_chans, std or [1.0] * in_chans)
        layers: list[nn.Module] = [SOC(in_chans, width, **terms), MinMax()]
        channels = width
        for _ in range(5):
            for _ in range(depth // 5 - 1):
                layers += [SOC(channels, channels, **terms), MinMax()]
            layers.append(SOC(channels, 4 * channels, stride=2, **terms))
            layers.append(PairMax() if pool == "max" else ProjectionPool2d(4 * channels))
            channels *= 2
        self.features = nn.Sequential(*layers)
        classifier = (LLNLinear(channels, num_classes) if head == "lln"
                      else SoftplusMLP(channels, num_classes, hidden_features=head_hidden))
        self._init_classifier(classifier, (in_chans, img_size, img_size), num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        if self.pad:
            x = F.pad(x, (self.pad,) * 4)
        return self.features(x).flatten(1)


def _register(depth: int) -> None:
    def build(**kwargs: Any) -> LipConvnet:
        return LipConvnet(depth=depth, **kwargs)

    register_family(f"lipconvnet_{depth}", build, __name__, f"LipConvnet-{depth}: SOC layers, 5 LipBlocks.")


for _depth in DEPTHS:
    _register(_depth)
