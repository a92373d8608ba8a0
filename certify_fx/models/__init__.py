"""Model families, registered with timm on import (``timm.create_model("liresnet_l12w512")``).

- :class:`LiResNet` (``liresnet_l{L}w{W}``) and its baselines ``gloro_convnet_l{L}w{W}`` /
  ``gloro_resnet_l{L}w{W}`` (LiResNet App. B-D);
- :class:`ConvNet` (``convnet_4c3f``, ``convnet_6c2f``, ``convnet_8c2f``; GloRo / CLL appendices);
- :class:`LipschitzViT` (``lipschitz_vit_{micro,tiny,small}_patch{4,8}``; LiResNet App. I);
- :class:`LipConvnet` (``lipconvnet_{5,10,...,40}``; SOC layers, 1-Lipschitz by construction).
"""

from .convnet import CONVNET_SPECS, ConvNet
from .liresnet import BLOCKS, STEMS, LiResNet
from .lipconvnet import LipConvnet
from .lipschitz_vit import LiFFN, LipschitzViT

__all__ = ["BLOCKS", "CONVNET_SPECS", "ConvNet", "LiFFN", "LiResNet", "LipConvnet", "LipschitzViT", "STEMS"]
