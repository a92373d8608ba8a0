"""Lipschitz layers: activations, per-channel affine, LiResNet block, skew-orthogonal convolution,
block reflector orthogonal convolution (BRO), projection pooling, token mixing,
Cholesky-orthogonalised (CHORD) layers, the LLN head and the CRC-Lip softplus head."""

from .activations import GroupSort, HouseHolder, MinMax
from .affine import Affine
from .bro import BRO, block_reflector
from .chord import CholeskyConv2d, CholeskyLinear, cholesky_orthogonal
from .linear_bottleneck import LinearBottleneck
from .liresnet_block import LiResNetBlock
from .lln import LLNLinear
from .normalize import Normalize
from .projection_pool import ProjectionPool2d
from .resnet_block import ResNetBlock
from .soc import SOC
from .softplus_mlp import SmoothSoftplus, SoftplusMLP
from .token_mixing import TokenMixing

__all__ = ["Affine", "BRO", "CholeskyConv2d", "CholeskyLinear", "GroupSort", "HouseHolder", "LLNLinear", "LiResNetBlock",
           "LinearBottleneck", "MinMax", "Normalize", "ProjectionPool2d", "ResNetBlock", "SOC", "SmoothSoftplus",
           "SoftplusMLP", "TokenMixing", "block_reflector", "cholesky_orthogonal"]
