"""Lipschitz layers: activations, per-channel affine, the LiResNet block and the LLN head."""

from .activations import GroupSort, MinMax
from .affine import Affine
from .liresnet_block import LiResNetBlock
from .lln import LLNLinear
from .normalize import Normalize

__all__ = ["Affine", "GroupSort", "LLNLinear", "LiResNetBlock", "MinMax", "Normalize"]
