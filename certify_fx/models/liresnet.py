"""The LiResNet family (Hu et al., 2023, App. B), registered with timm as ``liresnet_l{L}w{W}``.

The same skeleton with the block swapped gives the paper's baselines (App. C/D):
``gloro_convnet_l{L}w{W}`` (a plain 3x3 conv per block) and ``gloro_resnet_l{L}w{W}`` (the
conventional nonlinear residual block).

stem (conv + MinMax) -> L x (LiResNetBlock -> MinMax) -> neck (conv k4 s4 to 2W + MinMax, flatten,
dense to d + MinMax) -> LLN head. Input normalisation is part of the model, so certificates are in
[0, 1] pixel space.

``chord_liresnet_l{L}w{W}`` is the CHORD LiResNet of "A Recipe for Improved Certifiable Robustness"
(Hu et al., ICLR 2024): the neck is Cholesky-orthogonalised (a k4 s4 patch conv to W channels and a
dense map to d, no activation between them) and is followed by 8 residual-initialised
Cholesky-orthogonalised dense layers, each with a MinMax.

``bronet_l{L}w{W}`` is that network with a block reflector orthogonal convolution (BRO; Lai et al.,
ICML 2025) as each backbone block instead of the LiResNet block (BRONet; its dense part here is the
CHORD one, orthogonal as BRONet's BRO dense layers are). ``block="soc"`` gives the skew-orthogonal
convolution in the same place, for comparisons at equal skeleton.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..nn import BRO, SOC, CholeskyConv2d, CholeskyLinear, LiResNetBlock, LLNLinear, MinMax, Normalize, ResNetBlock
from ._classifier import TimmClassifier
from ._registry import register_family

__all__ = ["BLOCKS", "LiResNet", "NECKS", "STEMS"]

#: (kernel, stride, padding) of the stem per input size; each gives a 16x16 feature map (App. B).
STEMS: dict[int, tuple[int, int, int]] = {32: (5, 2, 2), 64: (7, 4, 3), 224: (14, 14, 0), 28: (5, 2, 2)}

#: Backbone block kinds: ``block(width, depth) -> nn.Module``.
BLOCKS = {
    "liresnet": lambda width, depth: LiResNetBlock(width, depth),
    "conv": lambda width, depth: nn.Conv2d(width, width, 3, padding=1),
    "resnet": lambda width, depth: ResNetBlock(width),
    "bro": lambda width, depth: BRO(width),
    "soc": lambda width, depth: SOC(width, width),
}

#: Neck kinds: ``plain`` (conv to 2W + MinMax, dense + MinMax) or ``chord`` (orthogonalised, see above).
NECKS = ("plain", "chord")


def _neck(kind: str, width: int, pooled: int, neck_dim: int) -> nn.Sequential:
    if kind == "chord":
        return nn.Sequential(CholeskyConv2d(width, width, 4), nn.Flatten(),
                             CholeskyLinear(width * pooled * pooled, neck_dim), MinMax())
    return nn.Sequential(nn.Conv2d(width, 2 * width, 4, 4), MinMax(), nn.Flatten(),
                         nn.Linear(2 * width * pooled * pooled, neck_dim), MinMax())


def _dense_blocks(depth: int, features: int) -> nn.Sequential:
    # each starts near the identity, its random part scaled by 1/sqrt(depth) as in the authors' code
    return nn.Sequential(*(nn.Sequential(CholeskyLinear(features, features, identity_init=True,
                                                        init_scale=depth**-0.5), MinMax()) for _ in range(depth)))


class LiResNet(TimmClassifier):
    """A GloRo-ready residual network whose every block is exactly bounded.

    Args:
        num_classes: number of logits.
        depth: ``L``, the number of LiResNet blocks.
        width: ``W``, channels in the backbone.
        in_chans: input channels.
        img_size: input height and width (chooses the stem, see :data:`STEMS`).
        neck_dim: ``d``, width of the dense neck layer (2048; 4096 on ImageNet).
        mean, std: input normalisation statistics (identity by default).
        stem: ``(kernel, stride, padding)`` of the stem conv, overriding the per-size default.
        block: backbone block, one of :data:`BLOCKS` (``liresnet``; ``conv`` and ``resnet`` are
            the paper's baselines, ``bro`` and ``soc`` orthogonal convolutions).
        neck: one of :data:`NECKS`.
        dense_depth: Cholesky-orthogonalised dense layers (each + MinMax) between neck and head.
    """

    def __init__(
        self,
        num_classes: int = 10,
        depth: int = 12,
        width: int = 512,
        in_chans: int = 3,
        img_size: int = 32,
        neck_dim: int = 2048,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        stem: tuple[int, int, int] | None = None,
        block: str = "liresnet",
        neck: str = "plain",
        dense_depth: int = 0,
    ) -> None:
        super().__init__()
        if width % 2:
            raise ValueError(f"width must be even for MinMax, got {width}")
        if block not in BLOCKS:
            raise ValueError(f"unknown block {block!r}; choose one of {', '.join(BLOCKS)}")
        if neck not in NECKS:
            raise ValueError(f"unknown neck {neck!r}; choose one of {', '.join(NECKS)}")
        kernel, stride, padding = stem or STEMS.get(img_size, (3, 1, 1))
        self.depth, self.width = depth, width
        self.normalize = Normalize(mean or [0.0] * in_chans, std or [1.0] * in_chans)
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, kernel, stride, padding), MinMax())
        self.blocks = nn.Sequential(
            *(nn.Sequential(BLOCKS[block](width, depth), MinMax()) for _ in range(depth))
        )
        feature = (img_size + 2 * padding - kernel) // stride + 1
        pooled = feature // 4
        if pooled < 1:
            raise ValueError(f"img_size {img_size} is too small for the stem {kernel, stride, padding} and neck")
        if neck == "chord" and neck_dim > width * pooled * pooled:
            raise ValueError(f"the chord neck maps {width * pooled * pooled} features to neck_dim={neck_dim}; "
                             "it must not widen them (orthonormal rows)")
        self.neck = _neck(neck, width, pooled, neck_dim)
        self.dense = _dense_blocks(dense_depth, neck_dim)
        self._init_classifier(LLNLinear(neck_dim, num_classes), (in_chans, img_size, img_size), num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(self.neck(self.blocks(self.stem(self.normalize(x)))))


#: family prefix -> (block, neck, dense layers)
_FAMILIES = {"liresnet": ("liresnet", "plain", 0), "gloro_convnet": ("conv", "plain", 0),
             "gloro_resnet": ("resnet", "plain", 0), "chord_liresnet": ("liresnet", "chord", 8),
             "bronet": ("bro", "chord", 8)}


def _register(prefix: str, depth: int, width: int) -> None:
    block, neck, dense_depth = _FAMILIES[prefix]

    def build(**kwargs: Any) -> LiResNet:
        defaults = {"block": block, "neck": neck, "dense_depth": dense_depth}
        return LiResNet(depth=depth, width=width, **{**defaults, **kwargs})

    register_family(f"{prefix}_l{depth}w{width}", build, __name__,
                    f"{prefix} with {depth} {block} blocks of width {width}.")


# The paper's configurations (L6W128 ... L12W588), deeper ones from App. D, and CPU-sized ones.
for _depth, _width in [(6, 128), (12, 256), (12, 512), (12, 588), (18, 512), (24, 512), (6, 64), (12, 64), (4, 32),
                       (6, 32), (12, 32), (6, 512)]:
    _register("liresnet", _depth, _width)
    _register("chord_liresnet", _depth, _width)
    _register("bronet", _depth, _width)
for _depth, _width in [(6, 256), (12, 256), (18, 256), (6, 64), (6, 32), (12, 32)]:
    _register("gloro_convnet", _depth, _width)
    _register("gloro_resnet", _depth, _width)
