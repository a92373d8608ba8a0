"""A Lipschitz vision transformer (Hu et al., 2023, App. I): spatial-MLP token mixing and LiFFN.

Self-attention and LayerNorm are not globally Lipschitz, so each layer is
``x <- MinMax(x + TokenMixing(x))`` (a learned tokens x tokens map: the spatial MLP) then
``x <- MinMax(x + s * W2 W1 x)`` (LiFFN: the feed-forward branch without its activation, so the
whole residual is one linear map the bound compiler folds and bounds exactly). Registered with timm
as ``lipschitz_vit_{tiny,small}_patch{4,8}``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from ..nn import LLNLinear, MinMax, Normalize, TokenMixing
from ._classifier import TimmClassifier
from ._registry import register_family

__all__ = ["LiFFN", "LipschitzViT"]


class LiFFN(nn.Module):
    """``y = x + s * W2 W1 x`` over the feature dim of (batch, tokens, dim) tokens, ``s = 1/sqrt(L)``."""

    def __init__(self, dim: int, hidden: int, num_blocks: int = 1) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.scale = 1.0 / math.sqrt(num_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.fc1(x)) * self.scale


class LipschitzBlock(nn.Module):
    """Spatial MLP then LiFFN, each followed by MinMax over features."""

    def __init__(self, num_tokens: int, dim: int, mlp_ratio: float, num_blocks: int) -> None:
        super().__init__()
        self.token_mixing = TokenMixing(num_tokens)
        self.act1 = MinMax(dim=-1)
        self.ffn = LiFFN(dim, int(dim * mlp_ratio), num_blocks)
        self.act2 = MinMax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(x + self.token_mixing(x))
        return self.act2(self.ffn(x))


class LipschitzViT(TimmClassifier):
    """Patch embedding, ``depth`` Lipschitz blocks, mean over tokens, LLN head.

    Args:
        num_classes, in_chans, img_size: output and input sizes.
        patch_size: side of the square, non-overlapping patches (a conv with kernel == stride,
            bounded exactly).
        embed_dim: token width (even, for MinMax).
        depth: number of blocks ``L``.
        mlp_ratio: LiFFN hidden width / ``embed_dim``.
        mean, std: input normalisation.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, img_size: int = 32, patch_size: int = 4,
                 embed_dim: int = 256, depth: int = 12, mlp_ratio: float = 2.0,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        num_tokens = (img_size // patch_size) ** 2
        self.normalize = Normalize(mean or [0.0] * in_chans, std or [1.0] * in_chans)
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        self.blocks = nn.Sequential(*(LipschitzBlock(num_tokens, embed_dim, mlp_ratio, depth) for _ in range(depth)))
        self._init_classifier(LLNLinear(embed_dim, num_classes), (in_chans, img_size, img_size), num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(self.normalize(x)).flatten(2).transpose(1, 2)  # (b, h*w, d); fx-traceable
        return self.blocks(tokens + self.pos_embed).mean(dim=1)


def _factory(embed_dim: int, depth: int, patch_size: int):
    def build(**kwargs: Any) -> LipschitzViT:
        kwargs.setdefault("patch_size", patch_size)
        return LipschitzViT(embed_dim=embed_dim, depth=depth, **kwargs)

    return build


for _size, (_dim, _depth) in {"tiny": (192, 12), "small": (384, 12), "micro": (64, 4)}.items():
    for _patch in (4, 8):
        register_family(f"lipschitz_vit_{_size}_patch{_patch}", _factory(_dim, _depth, _patch), __name__,
                        f"Lipschitz ViT-{_size} ({_dim} dims, {_depth} blocks, {_patch}x{_patch} patches).")
