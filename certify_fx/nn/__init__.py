"""Lipschitz layers: activations, per-channel affine, LiResNet block, skew-orthogonal convolution,
projection pooling, token mixing and the LLN head."""

from .activations import GroupSort, HouseHolder, MinMax
from .affine import Affine
from .linear_bottleneck import LinearBottleneck
from .liresnet_block import LiResNetBlock
from .lln import LLNLinear
from .normalize import Normalize
from .projection_pool import ProjectionPool2d
from .resnet_block import ResNetBlock
from .soc import SOC
from .token_mixing import TokenMixing

__all__ = ["Affine", "GroupSort", "HouseHolder", "LLNLinear", "LiResNetBlock", "LinearBottleneck", "MinMax", "Normalize",
           "ProjectionPool2d", "ResNetBlock", "SOC", "TokenMixing"]
