"""Model families, registered with timm on import (``timm.create_model("liresnet_l12w512")``)."""

from .liresnet import LiResNet

__all__ = ["LiResNet"]
