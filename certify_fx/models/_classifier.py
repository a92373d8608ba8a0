"""The classifier API timm models share (``forward_features``, ``forward_head``, ``get_classifier``,
``reset_classifier``, ``num_classes``, ``pretrained_cfg``), for the certify-fx families."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..pretrained_cfg import pixel_space_cfg

__all__ = ["TimmClassifier"]


class TimmClassifier(nn.Module):
    """Base of the zoo models: ``forward = forward_head(forward_features(x))`` with a ``head``.

    Subclasses call :meth:`_init_classifier` and define :meth:`forward_features`.
    """

    head: nn.Module

    def _init_classifier(self, head: nn.Linear, input_shape: Sequence[int], num_classes: int) -> None:
        self.head = head
        self._head_type = type(head)  # reset_classifier makes the same kind (LLN stays LLN)
        self.num_features, self.num_classes = head.in_features, num_classes
        self.pretrained_cfg = pixel_space_cfg(input_shape, num_classes)

    @property
    def default_cfg(self) -> dict:  # the name older timm releases read
        return self.pretrained_cfg

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits from features; ``pre_logits`` returns the features the classifier sees."""
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh classifier of the same kind for ``num_classes`` (0: none, features out)."""
        if global_pool is not None:
            raise ValueError("certify-fx models have a fixed pooling; reset_classifier takes no global_pool")
        self.head = self._head_type(self.num_features, num_classes) if num_classes else nn.Identity()
        self.num_classes = num_classes
        self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": num_classes}
